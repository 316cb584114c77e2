"""Training options: every field of TrainConfig is checked against its real domain, and nothing is
written to train.out_dir before the whole configuration has been validated."""
from __future__ import annotations

import ast
import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqmix import SeqmixError
from seqmix.cli import main
from seqmix.training.experiment import build_experiment
from seqmix.training.loop import COMPILE_BACKENDS, NONFINITE_ACTIONS, TrainConfig, train

from conftest import examples
from test_cli import TINY_TRAIN
from test_training import small

NOT_A_NUMBER = st.one_of(st.text(max_size=4), st.none(), st.booleans(), st.lists(st.integers(), max_size=2))
NON_FINITE = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf]), st.integers(min_value=2**1024))  # ints too large for a float


def _floats(low=None, high=None, exclude_low=False, exclude_high=False):
    return st.floats(low, high, allow_nan=False, allow_infinity=False, exclude_min=exclude_low, exclude_max=exclude_high)


# A value outside each field's domain; the field names itself in the error.
INVALID = {
    "out_dir": st.one_of(st.just(""), st.text(" \t\r\n", min_size=1, max_size=3), st.none(), st.integers(), st.booleans()),
    "lr": st.one_of(NOT_A_NUMBER, NON_FINITE, _floats(high=0.0), st.integers(max_value=0)),
    "min_lr_ratio": st.one_of(NOT_A_NUMBER, NON_FINITE, _floats(high=0.0, exclude_high=True), _floats(low=1.0, exclude_low=True)),
    "weight_decay": st.one_of(NOT_A_NUMBER, NON_FINITE, _floats(high=0.0, exclude_high=True), st.integers(max_value=-1)),
    "beta1": st.one_of(NOT_A_NUMBER, NON_FINITE, _floats(high=0.0, exclude_high=True), _floats(low=1.0), st.integers(min_value=1)),
    "beta2": st.one_of(NOT_A_NUMBER, NON_FINITE, _floats(high=0.0, exclude_high=True), _floats(low=1.0), st.integers(min_value=1)),
    "grad_clip": st.one_of(NOT_A_NUMBER, NON_FINITE, _floats(high=0.0, exclude_high=True), st.integers(max_value=-1)),
    "bf16": st.one_of(st.sampled_from(["false", "true", "no", ""]), st.integers(), st.none()),
    "resume": st.one_of(st.sampled_from(["false", "true", "yes"]), st.integers(), st.none()),
    "tensorboard": st.one_of(st.sampled_from(["false", "true"]), st.integers(), st.none()),
    "progress": st.one_of(st.sampled_from(["false", "off"]), st.integers(), st.none()),
    "on_nonfinite": st.one_of(st.text(max_size=6).filter(lambda s: s not in NONFINITE_ACTIONS), st.none(), st.integers()),
    "device": st.one_of(
        st.sampled_from(["tpu", "xla", "mps", "meta", "cuda:x", "cuda:-1", "cuda:", "cpu:0", "CUDA", "", "cuda:1.5"]),
        st.none(), st.integers(),
    ),
    "compile": st.one_of(st.text(max_size=8).filter(lambda s: s not in COMPILE_BACKENDS), st.integers(), st.booleans()),
    "save_pretrained": st.one_of(st.just(""), st.integers(), st.booleans(), st.lists(st.text(), max_size=2)),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32), st.booleans(), _floats(), st.text(max_size=3)),
    **{name: st.one_of(st.integers(max_value=0), st.booleans(), _floats(), st.none())
       for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "checkpoint_every", "log_every")},
    "warmup_steps": st.one_of(st.integers(max_value=-1), st.booleans(), _floats(), st.none()),
    "keep_checkpoints": st.one_of(st.integers(max_value=0), st.booleans(), _floats(), st.none()),
    "max_nonfinite_skips": st.one_of(st.integers(max_value=0), st.booleans(), _floats(), st.none()),
}


@st.composite
def valid_options(draw) -> dict:
    grad_accum = draw(st.integers(1, 8))
    return {
        "out_dir": draw(st.text(min_size=1, max_size=12).filter(lambda path: path.strip() and "\0" not in path)),
        "max_steps": draw(st.integers(1, 10**6)),
        "batch_size": grad_accum * draw(st.integers(1, 64)),
        "grad_accum": grad_accum,
        "lr": (lr := draw(st.one_of(_floats(low=0.0, exclude_low=True), st.integers(1, 2**1000)))),
        "min_lr_ratio": draw(st.one_of(_floats(0.0, 1.0), st.sampled_from([0, 1]))),
        "warmup_steps": draw(st.integers(0, 10**6)),
        # Below 1 / lr: AdamW scales the decayed weights by 1 - lr * weight_decay each step.
        "weight_decay": draw(st.one_of(_floats(low=0.0), st.integers(0, 2**1000)).filter(lambda decay: decay * lr < 1)),
        "beta1": draw(st.one_of(_floats(0.0, 1.0, exclude_high=True), st.just(0))),
        "beta2": draw(_floats(0.0, 1.0, exclude_high=True)),
        "grad_clip": draw(st.one_of(_floats(low=0.0), st.integers(0, 2**1000))),
        "bf16": draw(st.booleans()),
        "eval_every": draw(st.integers(1, 10**6)),
        "eval_batches": draw(st.integers(1, 10**3)),
        "checkpoint_every": draw(st.integers(1, 10**6)),
        "keep_checkpoints": draw(st.integers(1, 100)),
        "log_every": draw(st.integers(1, 10**6)),
        "resume": draw(st.booleans()),
        "on_nonfinite": draw(st.sampled_from(NONFINITE_ACTIONS)),
        "max_nonfinite_skips": draw(st.integers(1, 100)),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "device": draw(st.one_of(st.sampled_from(["auto", "cpu", "cuda"]), st.integers(0, 64).map(lambda i: f"cuda:{i}"))),
        "tensorboard": draw(st.booleans()),
        "progress": draw(st.booleans()),
        "compile": draw(st.one_of(st.none(), st.sampled_from(COMPILE_BACKENDS))),
        "save_pretrained": draw(st.one_of(st.none(), st.text(min_size=1, max_size=12))),
    }


def test_every_field_has_an_invalid_strategy():
    assert set(INVALID) == set(TrainConfig.__dataclass_fields__)


@settings(max_examples=examples(300), deadline=None)
@given(st.sampled_from(sorted(INVALID)).flatmap(lambda name: st.tuples(st.just(name), INVALID[name])))
def test_every_invalid_value_of_every_option_is_refused_naming_it(field_and_value):
    name, value = field_and_value
    with pytest.raises(SeqmixError, match=f"{name}=") as raised:
        TrainConfig(**{name: value})
    assert repr(value) in str(raised.value) or str(value) in str(raised.value)


@settings(max_examples=examples(150), deadline=None)
@given(valid_options())
def test_every_valid_configuration_is_accepted_as_given(options):
    config = TrainConfig(**options)
    for name, value in options.items():
        assert getattr(config, name) == value, name


def test_the_named_probes_are_refused():
    """The issue's probes: gradient ascent, NaN clipping and betas, negative decay, clipping silently off."""
    for options in ({"min_lr_ratio": -5}, {"grad_clip": math.nan}, {"beta2": math.nan}, {"weight_decay": -1},
                    {"grad_clip": -1}, {"beta1": 2}):
        with pytest.raises(SeqmixError, match=f"train.{next(iter(options))}="):
            TrainConfig(**options)
    with pytest.raises(SeqmixError, match="train.device='tpu'.*'auto'.*'cpu'.*'cuda'"):
        TrainConfig(device="tpu")


def test_the_compile_backends_are_those_compile_model_takes():
    """Read from compile/compiler.py's source: importing it would load Inductor for one tuple."""
    source = (Path(__file__).resolve().parent.parent / "compile" / "compiler.py").read_text()
    assignment = next(node for node in ast.parse(source).body
                      if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["BACKENDS"])
    assert set(COMPILE_BACKENDS) == set(ast.literal_eval(assignment.value))


# Overrides as a user types them, each outside its option's domain.
INVALID_OVERRIDES = [
    "lr=0", "lr=-1", "lr=nan", "lr=inf", "min_lr_ratio=-5", "min_lr_ratio=1.5", "min_lr_ratio=nan",
    "weight_decay=-1", "weight_decay=inf", "beta1=2", "beta1=-0.1", "beta1=1", "beta2=nan", "beta2=1.0",
    "grad_clip=-1", "grad_clip=nan", "grad_clip=inf", "device=tpu", "device=cuda:x", "device=cpu:0",
    "bf16='false'", "bf16=1", "progress='no'", "tensorboard=0", "compile=tpu_backend", "compile=1",
    "seed=-1", "seed=0.5", "resume='true'", "on_nonfinite=ignore", "out_dir=''",
    "batch_size=99999999999999999999", "seed=99999999999999999999", "seed=4294967296", "max_steps=99999999999999999999",
    "weight_decay=1000",
]


# Each example composes the config twice (about a second); the option domains themselves are the
# TrainConfig properties above, so this one checks the path from the command line to the refusal.
@settings(max_examples=examples(8), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(INVALID_OVERRIDES))
def test_seqmix_train_with_an_invalid_option_writes_nothing(tmp_path_factory, capsys, override):
    out_dir = tmp_path_factory.mktemp("invalid") / "run"
    with contextlib.chdir(out_dir.parent):  # where out_dir='' would write
        status = main(["train", *TINY_TRAIN, f"train.out_dir={out_dir}", f"train.{override}"])
        assert list(Path().iterdir()) == []
    err = capsys.readouterr().err
    assert status == 2, err
    assert f"{override.split('=')[0]}=" in err and "Traceback" not in err
    assert not out_dir.exists()


@pytest.mark.parametrize("bad", ["train.beta1=2", "train.device=tpu"])
def test_the_corrected_rerun_of_a_refused_run_trains(tmp_path, capsys, bad):
    out_dir = tmp_path / "run"
    assert main(["train", *TINY_TRAIN, "train.max_steps=1", bad, f"train.out_dir={out_dir}"]) == 2
    assert not out_dir.exists()
    status = main(["train", *TINY_TRAIN, "train.max_steps=1", f"train.out_dir={out_dir}"])
    assert status == 0, capsys.readouterr().err
    assert (out_dir / "run.json").is_file()


def test_betas_of_zero_written_as_integers_train(tmp_path, capsys):
    """train.beta1=0 passed the check as the int 0, then AdamW refused betas of two types."""
    status = main(["train", *TINY_TRAIN, "train.max_steps=1", "train.beta1=0", "train.beta2=0", f"train.out_dir={tmp_path / 'run'}"])
    assert status == 0, capsys.readouterr().err


def test_a_save_pretrained_target_save_pretrained_would_refuse_is_refused_before_training(tmp_path, capsys):
    """Both trained the whole run, then failed in save_pretrained: a folder of other files, and the run's own folder."""
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    out_dir = tmp_path / "run"
    for target, message in ((tmp_path / "other", "holds notes.txt, which this save does not write"), (out_dir, "is train.out_dir")):
        status = main(["train", *TINY_TRAIN, f"train.out_dir={out_dir}", f"train.save_pretrained={target}"])
        assert status == 2 and message in capsys.readouterr().err
        assert not out_dir.exists()
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_options_changed_after_construction_are_checked_before_anything_is_written(tmp_path):
    experiment = build_experiment(small(tmp_path, "model.d_model=16", "model.depth=1", "train.max_steps=1"))
    record = {"model": experiment.model_config, "task": experiment.task_config}
    experiment.train.beta1 = 2
    with pytest.raises(SeqmixError, match="train.beta1=2"):
        train(experiment.model, experiment.task, experiment.train, record)
    experiment.train.beta1 = 0.9
    experiment.train.device = "cuda:7"  # a valid name; no such device on this machine
    if torch.cuda.device_count() <= 7:
        with pytest.raises(SeqmixError, match="cuda:7"):
            train(experiment.model, experiment.task, experiment.train, record)
    assert not Path(experiment.train.out_dir).exists()
    experiment.train.device = "cpu"
    assert train(experiment.model, experiment.task, experiment.train, record).steps == 1


def test_a_device_a_mixers_path_cannot_run_on_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """The native paths run on the CPU only: on another device the run is refused up front, naming
    each mixer and the path to use there, not at its first step with the run directory written.
    The meta device stands in for a GPU here; tests/test_gpu.py asks a real one."""
    from seqmix.training import loop

    experiment = build_experiment(small(tmp_path, "model=ema_conv", "model.depth=2", "model.mixers.ema.impl=native",
                                        "train.device=auto", "train.max_steps=1"))
    record = {"model": experiment.model_config, "task": experiment.task_config}
    monkeypatch.setattr(loop, "pick_device", lambda name: torch.device("meta"))
    with pytest.raises(SeqmixError, match=r"train.device='auto' puts the model on meta, .*CPU only: "
                                          r"blocks.0.mixer \(EMA impl='native': use impl='chunked' there\); blocks.1.mixer"):
        train(experiment.model, experiment.task, experiment.train, record)
    assert not Path(experiment.train.out_dir).exists()
    assert all(p.device.type == "cpu" for p in experiment.model.parameters())


def test_a_model_vocabulary_the_task_replaces_is_still_checked(tmp_path, capsys):
    """model.vocab_size=-1 trained without a word: the task's vocabulary replaces it, unchecked."""
    out_dir = tmp_path / "run"
    assert main(["train", *TINY_TRAIN, "model.vocab_size=-1", f"train.out_dir={out_dir}"]) == 2
    assert "model: vocab_size=-1 is not valid; expected an integer >= 2" in capsys.readouterr().err
    assert not out_dir.exists()


def test_a_run_that_failed_before_its_first_checkpoint_can_be_run_again_in_place(tmp_path, capsys):
    """Its retry was refused: "already holds a run; pass train.resume=true", for a folder holding
    only the failed run's record and metrics."""
    out_dir = tmp_path / "run"
    diverging = ["train.lr=1e30", "train.weight_decay=0", "train.grad_clip=0", "train.checkpoint_every=1000", "train.max_steps=3"]
    assert main(["train", *TINY_TRAIN, *diverging, f"train.out_dir={out_dir}"]) == 2
    assert "Last good checkpoint: none yet" in capsys.readouterr().err
    assert (out_dir / "run.json").is_file()
    assert main(["train", *TINY_TRAIN, "train.max_steps=2", f"train.out_dir={out_dir}"]) == 0
    assert "holds a run that stopped before its first checkpoint; starting it again from step 0" in capsys.readouterr().err
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["split"] == "train"] == [1, 2]
    # With a checkpoint in it, the folder is a run to resume, as before.
    assert main(["train", *TINY_TRAIN, "train.max_steps=2", f"train.out_dir={out_dir}"]) == 2
    assert "already holds a run; pass train.resume=true" in capsys.readouterr().err
