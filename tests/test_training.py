"""Training: a few steps per preset and task, exact resume, data parallelism, generation, bad input."""
from __future__ import annotations

import json
import re
import subprocess
import types
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

import seqmix
from seqmix import SeqmixError
from seqmix.configs import compose_config
from seqmix.training.experiment import build_experiment
from seqmix.model.generation import generate, stream_tokens
from seqmix.tasks.base import IGNORE
from seqmix.training.checkpoints import latest_checkpoint
from seqmix.training.loop import correct_count, loss_sum_and_count, predict, train
from seqmix.training.reporting import sample_text
from seqmix.cli import main

from conftest import SEQMIX, fails_after

ROOT = Path(__file__).resolve().parent.parent
SMALL_MODEL = ["model.d_model=32", "model.depth=2"]


def small(tmp_path: Path, *overrides: str, out: str = "run"):
    """A composed config for a tiny, fast run in tmp_path."""
    args = [
        *SMALL_MODEL,
        "train.batch_size=4",
        "train.max_steps=4",
        "train.warmup_steps=2",
        "train.eval_every=2",
        "train.eval_batches=2",
        "train.checkpoint_every=2",
        "train.log_every=1",
        "train.progress=false",
        "train.device=cpu",
        f"train.out_dir={tmp_path / out}",
        *overrides,
    ]
    config = compose_config(args)
    if "cache_dir" in config.task:
        with open_dict(config):
            config.task.cache_dir = str(tmp_path / "cache")
            config.task.max_bytes = 200_000
    return config


def run(config):
    experiment = build_experiment(config)
    record = {"model": experiment.model_config, "task": experiment.task_config}
    return experiment, train(experiment.model, experiment.task, experiment.train, record)


def metric_rows(out_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]


@pytest.mark.parametrize(
    "model, task",
    [
        ("mega", "byte_lm"), ("megalodon", "byte_lm"), ("tcnca", "byte_lm"), ("transformer", "byte_lm"),
        ("gpt2", "byte_lm"), ("hybrid_tcn_attention", "mqar"), ("ema_conv", "selective_copying"),
        ("mega", "listops"), ("mega_encoder", "masked_segment"),
    ],
)
def test_a_few_steps_train_every_preset(tmp_path, model, task):
    overrides = [f"model={model}", f"task={task}", "task.seq_len=64"]
    if model == "ema_conv":  # standalone blocks have no chunk to shrink; the default depth is 6
        overrides.append("model.depth=2")
    if task == "listops":
        overrides += ["task.min_length=16", "task.max_length=64"]
    if task == "mqar":
        overrides += ["task.vocab_size=64", "task.num_pairs=4", "model.depth=3"]
    if task == "selective_copying":
        overrides += ["task.num_tokens_to_copy=8"]
    config = small(tmp_path, *overrides, "train.max_steps=6", "train.lr=1e-2")
    experiment = build_experiment(config)
    initial = {name: p.detach().clone() for name, p in experiment.model.named_parameters()}
    result = train(experiment.model, experiment.task, experiment.train, {"model": experiment.model_config, "task": experiment.task_config})
    rows = [r for r in result.history if r["split"] == "train"]
    assert len(rows) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    changed = [name for name, p in experiment.model.named_parameters() if not torch.equal(p, initial[name])]
    assert len(changed) == len(initial), f"parameters never updated: {set(initial) - set(changed)}"
    if task == "byte_lm":  # from ln 256 ≈ 5.5 nats the loss falls fast and steadily
        assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert (latest_checkpoint(experiment.train.out_dir) / "model.safetensors").is_file()
    assert set(result.final_eval) >= {"loss", experiment.task.metric}


def test_resume_equals_an_uninterrupted_run(tmp_path):
    options = ["train.max_steps=6", "train.checkpoint_every=3", "train.eval_every=3"]
    run(small(tmp_path, *options, out="whole"))

    # The same run, killed at step 5 (after step 4 was logged, before checkpoint 6), then resumed.
    experiment = build_experiment(small(tmp_path, *options, out="halves"))
    real_batch = experiment.task.batch

    def batch_until_killed(split, index, batch_size):
        if split == "train" and index == 5:
            raise KeyboardInterrupt("killed")
        return real_batch(split, index, batch_size)

    experiment.task.batch = batch_until_killed
    with pytest.raises(KeyboardInterrupt):
        train(experiment.model, experiment.task, experiment.train, {"model": experiment.model_config, "task": experiment.task_config})
    run(small(tmp_path, *options, "train.resume=true", out="halves"))

    assert metric_rows(tmp_path / "halves") == metric_rows(tmp_path / "whole")
    from safetensors.torch import load_file

    a = load_file(str(latest_checkpoint(tmp_path / "whole") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "halves") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_scores_a_checkpoint_as_the_run_scored_itself_and_a_resume_records_its_own_evaluation(tmp_path, capsys):
    """A run records how it evaluates (batches, batch size, bf16): evaluate without options gives the
    validation row the run wrote at its last checkpoint and names the settings, and options override
    them. A run resumed with other settings records its own from then on."""
    out = tmp_path / "run"

    def evaluated(*options: str) -> dict:
        capsys.readouterr()
        assert main(["evaluate", f"checkpoint={out}", *options]) == 0
        return json.loads(capsys.readouterr().out)

    def last_valid() -> dict:
        return [row for row in metric_rows(out) if row["split"] == "valid"][-1]

    run(small(tmp_path, "task=mqar", "train.max_steps=2", "train.eval_batches=3"))
    assert json.loads((out / "run.json").read_text())["evaluation"] == {"batches": 3, "batch_size": 4, "bf16": False}
    scores = evaluated()
    assert {key: scores[key] for key in ("batches", "batch_size", "bf16")} == {"batches": 3, "batch_size": 4, "bf16": False}
    assert {key: scores[key] for key in ("loss", "accuracy")} == {key: last_valid()[key] for key in ("loss", "accuracy")}
    overridden = evaluated("batches=5", "batch_size=2", "bf16=true")
    assert {key: overridden[key] for key in ("batches", "batch_size", "bf16")} == {"batches": 5, "batch_size": 2, "bf16": True}
    assert overridden["loss"] != scores["loss"]

    run(small(tmp_path, "task=mqar", "train.max_steps=4", "train.eval_batches=1", "train.bf16=true", "train.resume=true"))
    recorded = {"batches": 1, "batch_size": 4, "bf16": True}
    assert json.loads((out / "run.json").read_text())["evaluation"] == recorded
    assert json.loads((latest_checkpoint(out) / "run.json").read_text())["evaluation"] == recorded
    scores = evaluated()
    assert {key: scores[key] for key in ("batches", "batch_size", "bf16", "loss", "accuracy")} == {
        **recorded, **{key: last_valid()[key] for key in ("loss", "accuracy")}}


def test_greedy_generation_through_step_equals_argmax_of_full_forward(tmp_path):
    experiment = build_experiment(small(tmp_path, "model=megalodon"))
    model = experiment.model.eval()
    prompt = torch.tensor([list(b"def "), list(b"for ")[:4]])
    generated = generate(model, prompt, 20, temperature=0)
    tokens = prompt
    with torch.no_grad():
        for _ in range(20):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens)


@pytest.mark.parametrize("prompt, named", [([[1, 2]], "got a list"), (torch.tensor([1, 2]), "got shape (2,)")])
def test_generation_names_a_prompt_that_is_not_a_b_by_p_tensor(prompt, named, tmp_path):
    """A list was an AttributeError ('list' object has no attribute 'dim')."""
    model = build_experiment(small(tmp_path, "model=ema_conv", "model.depth=1")).model
    with pytest.raises(SeqmixError, match=re.escape(named)):
        generate(model, prompt, 3)


@pytest.mark.parametrize("option, value, named", [
    ("temperature", -1.0, "temperature=-1.0"), ("temperature", float("nan"), "temperature=nan"),
    ("temperature", float("inf"), "temperature=inf"), ("top_k", 0, "top_k=0"), ("max_new_tokens", -2, "max_new_tokens=-2"),
])
def test_streaming_refuses_a_bad_argument_when_called_before_any_token_is_asked_for(option, value, named):
    """A generator checks nothing until its first token is asked for, so a caller that prints as
    it streams (``seqmix generate`` prints the prompt first) would print before the error: the
    arguments are checked at the call, and the model is never run."""
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the model was used ({name}) before the arguments were checked")

    arguments = {"max_new_tokens": 3, "temperature": 1.0, "top_k": None, option: value}
    with pytest.raises(SeqmixError, match=re.escape(named)):
        stream_tokens(Untouchable(), torch.tensor([[1, 2]]), **arguments)


def test_generation_and_the_training_sample_fit_what_one_stream_of_the_model_takes(tmp_path, capsys):
    """gpt2 with max_len=24 (learned positions and an attention cache of 24): the prompt and every
    sampled token but the last go through the model, so a 4-token prompt takes 21 new ones and 22 are
    refused before the model runs, naming the most it takes. ``seqmix train``'s closing sample (200
    tokens) is cut to fit, where it once ended a finished run with an error."""
    experiment = build_experiment(small(tmp_path, "model=gpt2", "model.max_len=24", "model.mixers.attention.max_len=24",
                                        "task.seq_len=16"))
    model = experiment.model.eval()
    assert model.token_limit == 24
    prompt = torch.tensor([list(b"def ")])
    assert generate(model, prompt, 21, temperature=0).shape == (1, 25)
    with pytest.raises(SeqmixError, match="a prompt of 4 tokens and 22 new ones .* ask for at most 21 tokens"):
        stream_tokens(model, prompt, 22)
    assert sample_text(model, experiment.task) is not None
    arguments = [f"{key}={value}" for key, value in [
        ("model", "gpt2"), ("model.max_len", 24), ("model.mixers.attention.max_len", 24), ("task.seq_len", 16),
        *[(option.split("=")[0], option.split("=")[1]) for option in SMALL_MODEL],
        ("train.max_steps", 1), ("train.batch_size", 2), ("train.eval_batches", 1), ("train.progress", "false"),
        ("train.out_dir", tmp_path / "cli"), ("task.max_bytes", 200_000), ("task.cache_dir", tmp_path / "cache")]]
    assert main(["train", *arguments]) == 0, capsys.readouterr().err
    assert "after the prompt 'def '" in capsys.readouterr().out


def test_an_unknown_task_or_preset_lists_the_valid_ones():
    with pytest.raises(SeqmixError, match="byte_lm.*mqar"):
        compose_config(["task=wikitext"])
    with pytest.raises(SeqmixError, match="megalodon"):
        compose_config(["model=llama"])


def test_a_sequence_the_model_cannot_take_is_refused(tmp_path):
    with pytest.raises(SeqmixError, match="task.seq_len=2048 exceeds the model's learned positions"):
        build_experiment(small(tmp_path, "model=gpt2", "task=mqar", "task.seq_len=2048"))


def test_an_out_dir_holding_another_run_is_refused(tmp_path):
    run(small(tmp_path, "train.max_steps=1"))
    with pytest.raises(SeqmixError, match="already holds a run.*train.resume=true"):
        run(small(tmp_path, "train.max_steps=1"))


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint_whole(tmp_path):
    experiment = build_experiment(small(tmp_path, "train.max_steps=6", "train.checkpoint_every=2"))
    model = experiment.model
    real_forward = model.forward
    calls = {"n": 0}

    def forward_that_breaks(tokens, padding_mask=None, output_index=None):
        out = real_forward(tokens, padding_mask, output_index)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 4:  # the fourth training step
                return out * float("nan")
        return out

    model.forward = forward_that_breaks
    with pytest.raises(SeqmixError, match="loss became nan at step 4.*step-00000002"):
        train(model, experiment.task, experiment.train, {"model": experiment.model_config, "task": experiment.task_config})
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not list(checkpoints.glob(".*partial"))
    from seqmix import load_model

    restored = load_model(latest_checkpoint(tmp_path / "run"))
    assert all(torch.isfinite(p).all() for p in restored.parameters())
    # The run directory itself loads its latest checkpoint, as the CLI's checkpoint= takes it.
    from_run = load_model(tmp_path / "run")
    for name, value in restored.state_dict().items():
        assert torch.equal(from_run.state_dict()[name], value), name


def test_evaluate_and_generate_read_a_run(tmp_path):
    run(small(tmp_path, "train.max_steps=2"))
    evaluation = subprocess.run(
        [*SEQMIX, "evaluate", f"checkpoint={tmp_path / 'run'}", "batches=1", "batch_size=2"],
        capture_output=True, text=True,
    )
    assert evaluation.returncode == 0, evaluation.stderr
    assert "bits_per_byte" in json.loads(evaluation.stdout)
    sample = subprocess.run(
        [*SEQMIX, "generate", f"checkpoint={tmp_path / 'run'}", "prompt='def '", "tokens=10", "temperature=0"],
        capture_output=True, text=True,
    )
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("def ")
    refused = subprocess.run(
        [*SEQMIX, "generate", f"checkpoint={tmp_path / 'run'}", "prompt='def '", "temperature=-1"],
        capture_output=True, text=True,
    )
    assert refused.returncode == 2 and "temperature=-1.0 must be a finite number >= 0" in refused.stderr
    assert refused.stdout == ""  # refused before the prompt was echoed
    from seqmix.cli import main

    # A negative seed, as everywhere else (train, tasks, run_onnx.py), is refused rather than wrapped.
    assert main(["generate", f"checkpoint={tmp_path / 'run'}", "seed=-1"]) == 2
    # A reader that stops early (`| head`) ends the stream quietly: no traceback, no error line.
    streaming = subprocess.Popen([*SEQMIX, "generate", f"checkpoint={tmp_path / 'run'}", "tokens=100000"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(streaming.stdout.read(10)) == 10
    streaming.stdout.close()
    assert streaming.wait(timeout=120) == 141  # a shell's status for SIGPIPE, not a failure's
    assert streaming.stderr.read() == b""


def test_gather_tabulates_runs(tmp_path):
    run(small(tmp_path, "train.max_steps=2", out="sweep/0"))
    run(small(tmp_path, "train.max_steps=2", "model=transformer", out="sweep/1"))
    result = subprocess.run(
        [*SEQMIX, "gather", f"root={tmp_path / 'sweep'}", f"csv={tmp_path / 't.csv'}"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    table = result.stdout.splitlines()
    assert table[0].startswith("| run |") and len(table) == 4
    assert "valid_bits_per_byte" in table[0]
    assert len((tmp_path / "t.csv").read_text().splitlines()) == 3


RECORD_DAMAGE = {
    "an array": (b"[]", "run.json holds an array, not a JSON object"),
    "null": (b"null", "run.json holds null, not a JSON object"),
    "not JSON": (b"{bad", "run.json is not UTF-8 JSON"),
    "not UTF-8": (b"\xff\xfe{}", "run.json is not UTF-8 JSON"),
    "a FIFO": (None, "run.json is a FIFO (named pipe), not a regular file"),
    "a directory": ("dir", "run.json is a directory, not a regular file"),
}


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory) -> Path:
    """A finished 2-step run; copy it before changing it."""
    root = tmp_path_factory.mktemp("two_step")
    run(small(root, "train.max_steps=2"))
    return root / "run"


@pytest.mark.parametrize("damage", RECORD_DAMAGE, ids=str)
def test_gather_leaves_out_a_run_whose_record_is_unreadable_naming_it_and_tabulates_the_rest(two_step_run, tmp_path,
                                                                                           damage, capsys):
    import os
    import shutil

    from seqmix.cli import main

    good, bad = tmp_path / "sweep" / "good", tmp_path / "sweep" / "bad"
    shutil.copytree(two_step_run, good)
    bad.mkdir()
    (bad / "metrics.jsonl").write_text((good / "metrics.jsonl").read_text())
    content, named = RECORD_DAMAGE[damage]
    if content is None:
        os.mkfifo(bad / "run.json")
    elif content == "dir":
        (bad / "run.json").mkdir()
    else:
        (bad / "run.json").write_bytes(content)

    capsys.readouterr()
    with fails_after(60, "gather"):  # a FIFO with no writer would block a plain read for ever
        assert main(["gather", f"root={tmp_path / 'sweep'}"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith(f"seqmix gather: left out {bad}: {named}") and err.count("\n") == 1, err
    rows = out.splitlines()[2:]
    assert len(rows) == 1 and rows[0].startswith(f"| {good} |")


def test_gather_reads_what_it_can_of_damaged_metrics_and_fields_of_the_wrong_type(tmp_path):
    from seqmix.training.runs import collect_runs

    run(small(tmp_path, "train.max_steps=2", out="runs/r"))
    directory = tmp_path / "runs" / "r"
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    valid = json.loads([line for line in lines if '"valid"' in line][-1])
    # Lines seqmix did not write, then the real rows, then a line torn by a run killed mid-write.
    damaged = [b"garbage", b"[1]", b'{"step": true, "split": "train"}', b'{"split": "train"}', b"\xff\xfe{}",
               *(line.encode() for line in lines), b'{"step": 2, "split": "skipped", "reason": "loss became nan"}',
               b'{"step": 9, "spl']
    (directory / "metrics.jsonl").write_bytes(b"\n".join(damaged))
    record = json.loads((directory / "run.json").read_text())
    record["preset"] = {"model": 5, "task": ["x"]}
    record["model"]["d_model"] = "128"
    (directory / "run.json").write_text(json.dumps(record))
    gathered = collect_runs(tmp_path / "runs")
    assert gathered.problems == [f"{directory / 'metrics.jsonl'}: left out 5 line(s) that are not metric records (line 1 "
                                 f"the first) and its unfinished last line {len(damaged)} (the run stopped while writing it)",
                                 # Shown as blank cells, which were not told of.
                                 f"{directory / 'run.json'}: preset.model is a JSON number, not a JSON string, preset.task is "
                                 "a JSON array, not a JSON string, model.d_model is a JSON string, not a JSON number; shown "
                                 "as empty cells"]
    (row,) = gathered.rows
    assert row["model"] == row["task"] == "?" and row["d_model"] is None and row["steps"] == 2
    assert row["valid_loss"] == valid["loss"]


def test_one_markdown_table_writer_escapes_aligns_and_fills_missing_keys():
    from seqmix.tables import markdown_table, records_table

    assert markdown_table(["name", "ms"], [["a|b", "1.5"]], right={1}) == "| name | ms |\n|---|---:|\n| a\\|b | 1.5 |"
    table = records_table([{"run": "r0", "loss": 0.123456}, {"run": "r1", "steps": 3, "note": None}]).splitlines()
    assert table == ["| run | loss | steps | note |", "|---|---|---|---|", "| r0 | 0.1235 |  |  |", "| r1 |  | 3 |  |"]


def test_bf16_autocast_and_gradient_accumulation_train(tmp_path):
    experiment, result = run(small(tmp_path, "train.bf16=true", "train.grad_accum=2", "train.max_steps=3"))
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in result.history)
    assert all(p.dtype == torch.float32 for p in experiment.model.parameters())


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    run(small(tmp_path, "train.grad_accum=1", "train.max_steps=2", out="big"))
    run(small(tmp_path, "train.grad_accum=4", "train.max_steps=2", out="accumulated"))
    big, accumulated = metric_rows(tmp_path / "big"), metric_rows(tmp_path / "accumulated")
    for a, b in zip(big, accumulated):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_tensorboard_logging_or_a_clear_message(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(SeqmixError, match="pip install tensorboard"):
            run(small(tmp_path, "train.tensorboard=true", "train.max_steps=1"))
        assert not (tmp_path / "run" / "run.json").exists(), "the run must fail before it starts"
    else:
        run(small(tmp_path, "train.tensorboard=true", "train.max_steps=1"))
        assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_training_through_torch_compile_updates_the_model(tmp_path):
    result = subprocess.run(
        [*SEQMIX, "train", "model=transformer", "model.d_model=32", "model.depth=1",
         "task=mqar", "task.vocab_size=64", "task.seq_len=64", "task.num_pairs=4", "train.max_steps=2", "train.batch_size=2",
         "train.eval_batches=1", "train.log_every=1", "train.progress=false", "train.device=cpu", "train.compile=aot_eager",
         f"train.out_dir={tmp_path / 'run'}"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = metric_rows(tmp_path / "run")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]


def test_an_unknown_train_option_lists_the_accepted_ones(tmp_path):
    with pytest.raises(SeqmixError, match="train has no option 'epochs'.*max_steps"):
        build_experiment(small(tmp_path, "+train.epochs=3"))


@pytest.mark.parametrize("task", ["mqar", "masked_segment", "byte_lm"])
def test_logits_at_target_positions_only_give_the_full_forward_loss(task, tmp_path):
    """Training projects to the vocabulary only where targets are; loss and accuracy do not change."""
    model_preset = "mega_encoder" if task == "masked_segment" else "mega"
    experiment = build_experiment(small(tmp_path, f"model={model_preset}", f"task={task}"))
    batch = experiment.task.batch("train", 0, 3)
    model = experiment.model.double()
    selected = predict(model, batch)
    full = model(batch.inputs, batch.padding_mask)
    assert selected.shape == (int((batch.targets != IGNORE).sum()), full.shape[-1])
    torch.testing.assert_close(loss_sum_and_count(selected, batch), loss_sum_and_count(full, batch))
    assert correct_count(selected, batch) == correct_count(full, batch)
    with pytest.raises(SeqmixError, match="classification head"):
        build_experiment(small(tmp_path, "task=listops")).model(torch.zeros_like(batch.inputs[:, :8]), None, torch.tensor([0]))


def test_a_run_record_or_tokenizer_that_is_not_a_regular_file_is_refused_by_what_it_is_without_blocking(tmp_path):
    import os

    from seqmix.errors import not_a_file
    from seqmix.tokenization import load_tokenizer

    run(small(tmp_path, "train.max_steps=1"))
    record = tmp_path / "run" / "run.json"
    record.unlink()
    os.mkfifo(record)
    # Reading a FIFO nobody writes to would block for ever; it is refused before any read.
    with fails_after(60, "the resume"), pytest.raises(
            SeqmixError, match="run.json is a FIFO \\(named pipe\\), not a regular file; expected the run record"):
        run(small(tmp_path, "train.max_steps=2", "train.resume=true"))
    with pytest.raises(SeqmixError, match="/dev/null is a character device, not a regular file"):
        load_tokenizer("/dev/null")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    assert not_a_file(tmp_path / "nowhere") == "does not exist"
    assert not_a_file(tmp_path / "link") == "is a broken symbolic link"
    assert not_a_file(tmp_path) == "is a directory, not a regular file"
    assert not_a_file(tmp_path / "run" / "metrics.jsonl") == "is a regular file"


def test_evaluation_scores_a_large_batch_in_pieces_with_the_same_scores(monkeypatch):
    """evaluate ran one forward over the whole batch: batch_size=100000 was killed by the kernel at 24 GB."""
    from seqmix.tasks import build_task
    from seqmix.training import loop

    task = build_task("mqar", vocab_size=64, seq_len=64, num_pairs=4)
    model = seqmix.build_model(task.vocab_size, 16, ["ema", "gated_attention"])
    whole = loop.evaluate(model, task, batch_size=12, batches=2, device="cpu")
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda tokens, *rest: seen.append(tokens.numel()) or forward(tokens, *rest))
    monkeypatch.setattr(loop, "EVAL_TOKENS", 5 * 64)
    pieces = loop.evaluate(model, task, batch_size=12, batches=2, device="cpu")
    assert max(seen) <= 5 * 64 and sum(seen) == 2 * 12 * 64
    assert pieces.keys() == whole.keys()
    for key in whole:
        assert pieces[key] == pytest.approx(whole[key], rel=1e-6)


def test_a_long_evaluation_off_a_terminal_writes_progress_lines(monkeypatch, capsys):
    """evaluate batches=10**11 into a log file or a pipe ran for ever without a word (its bar is drawn on a terminal only)."""
    from seqmix.tasks import build_task
    from seqmix.training import loop

    task = build_task("mqar", vocab_size=64, seq_len=32, num_pairs=4)
    model = seqmix.build_model(task.vocab_size, 16, ["ema"])
    clock = iter(range(0, 10**6, 20))  # each reading 20 s after the one before
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    loop.evaluate(model, task, batch_size=2, batches=4, device="cpu", progress=True)
    lines = capsys.readouterr().err.splitlines()
    # Readings at 0 (start), then one per batch at 20, 40, 60, 80 s: lines at 40 and at 80 s.
    assert lines == ["evaluate: 2 of 4 batches (50.0%), 40 s, about 40 s left",
                     "evaluate: 4 of 4 batches (100.0%), 80 s, about 0 s left"]
    loop.evaluate(model, task, batch_size=2, batches=4, device="cpu", progress=False)
    assert capsys.readouterr().err == ""


def test_the_training_bar_is_drawn_on_a_terminal_only(tmp_path, capsys):
    """train.progress=true drew its bar into a log file or a pipe: 36 KB of frames per 300 steps."""
    from conftest import library_run

    library_run(tmp_path / "run", "train.max_steps=3", "train.progress=true")
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "step/s" not in captured.err and "s/step" not in captured.err


def test_a_resume_past_max_steps_reports_the_step_the_model_is_at(tmp_path, capsys):
    """Resumed at step 3 with train.max_steps=1, the summary said 'steps 1, -2 of them in this run'."""
    from conftest import library_run, library_train
    from seqmix.training.reporting import print_summary

    out_dir = library_run(tmp_path / "run", "train.max_steps=3", "train.checkpoint_every=3")
    experiment, result = library_train(out_dir, "train.max_steps=1", "train.resume=true")
    assert (result.steps, result.first_step) == (3, 3)
    capsys.readouterr()
    print_summary(experiment, result)
    out = capsys.readouterr().out
    assert "-" not in "".join(line for line in out.splitlines() if line.startswith(("steps", "time")))


def test_the_plan_says_when_the_warm_up_outlasts_the_run(capsys):
    """A 4-step run with the default 100 warm-up steps peaked at lr 1.2e-4 while the plan said 'lr 0.003'."""
    from seqmix.training.reporting import print_plan

    for steps, told in ((4, "lr rising to 0.00012 only: the warm-up to train.lr=0.003 over train.warmup_steps=100 outlasts the run"),
                        (400, "lr 0.003 after 100 warm-up steps, then cosine decay")):
        config = small_config(steps)
        print_plan(types.SimpleNamespace(model=seqmix.build_model(16, 16, ["ema"]), task=types.SimpleNamespace(seq_len=8, vocab_size=16, metric="accuracy"),
                                         train=config), {"model": "m", "task": "t"})
        assert told in capsys.readouterr().out


def small_config(steps: int):
    from seqmix.training.loop import TrainConfig

    return TrainConfig(max_steps=steps, lr=0.003, warmup_steps=100, out_dir="unused", device="cpu")


def test_a_run_whose_latest_pointer_is_missing_resumes_from_its_newest_checkpoint(tmp_path, capsys):
    """A run killed between renaming its first checkpoint into place and writing 'latest' (or with the
    pointer deleted) resumed from step 0 and wrote over its checkpoints."""
    from conftest import library_run, library_train
    from seqmix.model.checkpoint import latest_checkpoint

    out_dir = library_run(tmp_path / "run", "train.max_steps=4", "train.checkpoint_every=2")
    (out_dir / "checkpoints" / "latest").unlink()
    assert latest_checkpoint(out_dir) == out_dir / "checkpoints" / "step-00000004"
    trained = [line for line in (out_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    capsys.readouterr()
    _, result = library_train(out_dir, "train.max_steps=5", "train.checkpoint_every=2", "train.resume=true")
    assert result.first_step == 4 and "continuing from" in capsys.readouterr().out
    text = (out_dir / "metrics.jsonl").read_text()
    assert trained and all(line in text for line in trained)  # the first 4 steps' rows kept, not truncated to step 0


def test_a_resume_continues_with_the_optimizer_options_it_is_given_and_says_which_changed(tmp_path, capsys):
    """train.weight_decay and train.beta1 given to a resume were replaced by the checkpoint's without a word."""
    from conftest import library_run, library_train

    out_dir = library_run(tmp_path / "run", "train.max_steps=2", "train.checkpoint_every=2")
    capsys.readouterr()
    library_train(out_dir, "train.max_steps=3", "train.resume=true", "train.weight_decay=0.5", "train.beta1=0.5")
    told = [line for line in capsys.readouterr().out.splitlines() if "the optimizer continues" in line]
    assert told == ["resume: the optimizer continues with the train options given, not the checkpoint's: "
                    "weight_decay 0.1 -> 0.5, betas (0.9, 0.98) -> (0.5, 0.98)"]
    groups = json.loads((out_dir / "checkpoints" / "step-00000003" / "trainer.json").read_text())["optimizer"]["param_groups"]
    assert groups[0]["weight_decay"] == 0.5 and groups[1]["weight_decay"] == 0.0
    assert all(group["betas"] == [0.5, 0.98] for group in groups)


def test_a_resume_with_another_task_is_refused_before_the_corpus_is_read_and_a_cache_folder_may_change(tmp_path):
    """A resume with another task.seq_len was refused only after the corpus had been read and cached,
    as 'another model or task'; a resume with only another task.cache_dir was refused as well."""
    from conftest import write_text_corpus

    corpus = write_text_corpus(tmp_path / "corpus")

    def config(*overrides):
        return compose_config(["model=mega", "model.d_model=16", "model.depth=1", "task=text", f"task.path={corpus}",
                               "task.seq_len=32", f"task.cache_dir={tmp_path / 'cache'}", "train.batch_size=2",
                               "train.max_steps=2", "train.eval_batches=1", "train.progress=false", "train.device=cpu",
                               f"train.out_dir={tmp_path / 'run'}", *overrides])

    experiment = build_experiment(config())
    train(experiment.model, experiment.task, experiment.train, {"model": experiment.model_config, "task": experiment.task_config})
    with pytest.raises(SeqmixError, match=r"holds a run of another task: task.seq_len=32 \(now 48\); resume with the run's task options"):
        build_experiment(config("train.resume=true", "task.seq_len=48", f"task.cache_dir={tmp_path / 'cache2'}"))
    assert not (tmp_path / "cache2").exists()
    resumed = build_experiment(config("train.resume=true", "train.max_steps=3", f"task.cache_dir={tmp_path / 'cache3'}"))
    result = train(resumed.model, resumed.task, resumed.train, {"model": resumed.model_config, "task": resumed.task_config})
    assert result.first_step == 2


def test_a_causal_model_on_a_task_read_from_both_sides_is_warned_of():
    """Task.causal was read nowhere: a causal model trained on masked_segment without a word."""
    import warnings

    from seqmix.errors import SeqmixWarning

    def built(preset):
        return build_experiment(compose_config([f"model={preset}", "model.d_model=16", "model.depth=1", "task=masked_segment",
                                                "task.max_bytes=100000", "train.progress=false", "train.device=cpu"]))

    with pytest.warns(SeqmixWarning, match=r"task=masked_segment predicts tokens from both sides, but every layer of this model is causal"):
        built("mega")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SeqmixWarning)
        built("mega_encoder")


def test_a_resume_runs_the_evaluation_a_stop_interrupted_at_its_checkpoint(tmp_path):
    """A SIGTERM during step 4's evaluation left checkpoint 4 without its validation row, and the resume
    went on from step 5: step 4 was never evaluated."""
    from conftest import library_run, library_train

    out_dir = library_run(tmp_path / "run", "train.max_steps=4", "train.eval_every=2", "train.checkpoint_every=2")
    metrics = out_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    evaluated = next(row for row in rows if row["split"] == "valid" and row["step"] == 4)
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows if row is not evaluated))  # as a stop left it
    library_train(out_dir, "train.max_steps=5", "train.eval_every=2", "train.resume=true")
    again = [json.loads(line) for line in metrics.read_text().splitlines()]
    redone = [row for row in again if row["split"] == "valid" and row["step"] == 4]
    assert len(redone) == 1 and redone[0]["loss"] == pytest.approx(evaluated["loss"], rel=1e-6)
