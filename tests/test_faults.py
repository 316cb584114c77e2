"""Training under faults: a run killed with SIGKILL resumes to the same metrics; truncated or
corrupted checkpoints are refused by name and never half-loaded; NaN/inf losses and gradients
stop the run or skip the step, with the last good checkpoint intact.

Every fault here is injected on purpose, and each test says which and what must follow.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from seqmix import SeqmixError
from seqmix.model.checkpoint import write_checksums
from seqmix.configs import compose_config
from seqmix.training.experiment import build_experiment
from seqmix.training.checkpoints import latest_checkpoint, load_run, load_training_state
from seqmix.training.loop import TrainConfig, make_optimizer, train

from conftest import SEQMIX

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model=mega", "model.d_model=16", "model.depth=1", "task=mqar", "task.vocab_size=64", "task.seq_len=64",
    "task.num_pairs=4", "train.batch_size=4", "train.warmup_steps=2", "train.eval_batches=1", "train.log_every=1",
    "train.progress=false", "train.device=cpu",
]


def tiny_config(out_dir: Path, *overrides: str):
    return compose_config([*TINY, f"train.out_dir={out_dir}", *overrides])


def run_in_process(out_dir: Path, *overrides: str):
    experiment = build_experiment(tiny_config(out_dir, *overrides))
    return experiment, train(experiment.model, experiment.task, experiment.train, _record(experiment))


def _record(experiment) -> dict:
    return {"model": experiment.model_config, "task": experiment.task_config}


def metric_rows(out_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing column."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]


def parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# --- a run killed with SIGKILL --------------------------------------------------------------

KILL_RUN_STEPS = 40
KILL_RUN = ["train.checkpoint_every=1", "train.eval_every=5", f"train.max_steps={KILL_RUN_STEPS}"]


def _train_process(out_dir: Path, *overrides: str) -> subprocess.Popen:
    """``seqmix train`` on the tiny config, single-threaded so that every run computes the same floats."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*SEQMIX, "train", *TINY, *KILL_RUN, f"train.out_dir={out_dir}", *overrides]
    with open(out_dir.parent / f"{out_dir.name}.stderr", "a") as log:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=ROOT)


def _stderr(out_dir: Path) -> str:
    return (out_dir.parent / f"{out_dir.name}.stderr").read_text()[-3000:]


def _kill_after_checkpoint(process: subprocess.Popen, out_dir: Path, step: int, delay: float) -> None:
    """SIGKILL ``process`` ``delay`` seconds after its checkpoint ``step`` appears (mid-step, or mid-write)."""
    checkpoint = out_dir / "checkpoints" / f"step-{step:08d}"
    deadline = time.monotonic() + 300
    while not checkpoint.is_dir():
        assert process.poll() is None, f"the run ended before checkpoint {step}:\n{_stderr(out_dir)}"
        assert time.monotonic() < deadline, f"no checkpoint {step} after 300 s"
        time.sleep(0.002)
    time.sleep(delay)
    assert process.poll() is None, "the run finished before it was killed; kill it at an earlier step"
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def _killed_runs_resume_to_the_uninterrupted_metrics(tmp_path: Path, seed: int, kills: int) -> None:
    rng = random.Random(seed)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    uninterrupted = _train_process(whole)
    victim = _train_process(killed)
    kill_steps = sorted(rng.sample(range(2, KILL_RUN_STEPS - 12), kills))
    for number, step in enumerate(kill_steps):
        _kill_after_checkpoint(victim, killed, step, delay=rng.uniform(0.0, 0.03))
        if number + 1 < kills:
            victim = _train_process(killed, "train.resume=true")
    resumed = _train_process(killed, "train.resume=true")
    assert resumed.wait(timeout=300) == 0, _stderr(killed)
    assert uninterrupted.wait(timeout=300) == 0, _stderr(whole)
    context = f"seed {seed}, killed after checkpoints {kill_steps}"
    assert metric_rows(killed) == metric_rows(whole), context
    a = load_file(str(latest_checkpoint(whole) / "model.safetensors"))
    b = load_file(str(latest_checkpoint(killed) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), context


def test_a_run_killed_with_sigkill_resumes_to_the_same_metrics(tmp_path):
    """Fault: SIGKILL a seqmix train run at a random point after a random checkpoint (which may
    land while the next checkpoint or a metrics row is being written). Outcome: train.resume=true
    finishes it with metrics.jsonl and final weights equal to an uninterrupted run's."""
    _killed_runs_resume_to_the_uninterrupted_metrics(tmp_path, seed=8, kills=1)


@pytest.mark.fuzz
@pytest.mark.parametrize("attempt", range(5))
def test_a_run_killed_again_and_again_resumes_to_the_same_metrics(tmp_path, attempt):
    _killed_runs_resume_to_the_uninterrupted_metrics(tmp_path, seed=random.randrange(2**32), kills=3)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_training_after_its_step_with_a_checkpoint_that_resumes(tmp_path, stop_signal):
    """Fault: SIGTERM (a scheduler preempting the job, ``kill``) or SIGINT (Ctrl-C) between
    checkpoints. Outcome: the run stops after the step it was in, with that step's checkpoint, and
    exits with 128 + the signal's number, naming it; train.resume=true continues from that step.
    Before, the progress since the last checkpoint was lost."""
    if signal.getsignal(stop_signal) is signal.SIG_IGN:
        pytest.skip(f"{stop_signal.name} is ignored by this process, so the run it starts ignores it too")
    out = tmp_path / "run"
    forever = ["train.max_steps=100000", "train.checkpoint_every=100000", "train.eval_every=100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([*SEQMIX, "train", *TINY, *forever, f"train.out_dir={out}"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.poll() is not None else "no rows"
        time.sleep(0.02)
    process.send_signal(stop_signal)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + stop_signal.value, stderr
    stopped = re.search(rf"stopped by {stop_signal.name} after step (\d+) of 100,000, with checkpoint (\S+); continue with "
                        "train.resume=true", stderr)
    assert stopped, stderr
    step = int(stopped.group(1))
    assert step >= 3 and latest_checkpoint(out) == Path(stopped.group(2)) and latest_checkpoint(out).name == f"step-{step:08d}"
    resumed = subprocess.run([*SEQMIX, "train", *TINY, f"train.max_steps={step + 2}", f"train.out_dir={out}", "train.resume=true"],
                             capture_output=True, text=True, env=env, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert f"continuing from {latest_checkpoint(out).parent / f'step-{step:08d}'} at step {step}" in resumed.stdout
    assert [row["step"] for row in metric_rows(out) if row["split"] == "train"] == list(range(1, step + 3))


def test_a_stop_signal_during_a_long_evaluation_stops_it(tmp_path):
    """Fault: SIGTERM while an evaluation of train.eval_batches=10**9 batches runs. Outcome: the run
    stops after that step, its evaluation cut short and not logged; it ran on, past the signal."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([*SEQMIX, "train", *TINY, "train.max_steps=100000", "train.eval_every=1", "train.log_every=1",
                                "train.eval_batches=1000000000", f"train.out_dir={out}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 1):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.poll() is not None else "no rows"
        time.sleep(0.02)
    time.sleep(0.5)  # well into the evaluation of step 1
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM.value, stderr
    assert "stopped by SIGTERM after step 1 of 100,000" in stderr
    assert [row["split"] for row in metric_rows(out)] == ["train"]


def test_a_second_stop_signal_stops_at_once():
    from seqmix.training.loop import _StopRequests

    stops = _StopRequests()
    stops._handle(signal.SIGTERM, None)
    assert stops.received == "SIGTERM" and stops.stop_now(1, torch.device("cpu"))
    with pytest.raises(KeyboardInterrupt):
        stops._handle(signal.SIGINT, None)


@pytest.mark.parametrize("torn", [b'{"step": 3, "split": "tra', b'{"step": 3, "split": "tra\xff\xfe'], ids=["text", "not UTF-8"])
def test_a_torn_metrics_line_from_a_killed_run_is_dropped_on_resume(tmp_path, torn):
    """Fault: metrics.jsonl ends in half a row (a kill while writing it), or in bytes that are not
    UTF-8 (a damaged file). Outcome: resume drops it."""
    run_in_process(tmp_path / "run", "train.max_steps=2", "train.checkpoint_every=2", "train.eval_every=2")
    with (tmp_path / "run" / "metrics.jsonl").open("ab") as metrics:
        metrics.write(torn)
    run_in_process(tmp_path / "run", "train.max_steps=3", "train.checkpoint_every=2", "train.eval_every=2", "train.resume=true")
    assert [(row["step"], row["split"]) for row in metric_rows(tmp_path / "run")] == [
        (1, "train"), (2, "train"), (2, "valid"), (3, "train"), (3, "valid"),
    ]


# --- truncated and corrupted checkpoints ----------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 2-step run with checkpoints at steps 1 and 2."""
    out_dir = tmp_path_factory.mktemp("finished") / "run"
    run_in_process(out_dir, "train.max_steps=2", "train.checkpoint_every=1", "train.eval_every=2")
    return out_dir


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_trainer_step(path: Path) -> None:
    path.write_text(path.read_text().replace('"step": 2', '"step": 7'))


CORRUPTIONS = {
    # A truncated weights file is refused by its size against its own header, before any hashing.
    "truncated weights": ("model.safetensors", _truncate, "model.safetensors holds .* bytes where its safetensors header describes"),
    "flipped bit in weights": ("model.safetensors", _flip_a_byte, "model.safetensors does not match its sha256"),
    "truncated optimizer state": ("optimizer.safetensors", _truncate,
                                  "optimizer.safetensors holds .* bytes where its safetensors header describes"),
    "edited trainer.json": ("trainer.json", _edit_trainer_step, "trainer.json does not match its sha256"),
    "edited config": ("config.yaml", lambda p: p.write_text(p.read_text() + "depth: 9\n"), "config.yaml does not match its sha256"),
    "weights deleted": ("model.safetensors", Path.unlink, "model.safetensors"),
    "checksums deleted": ("checksums.json", Path.unlink, "checksums.json is missing"),
    "checksums garbled": ("checksums.json", lambda p: p.write_text("{\"files\": "), "checksums.json is corrupted"),
    "unlisted file added": ("extra.pkl", lambda p: p.write_bytes(b"\x80\x04."), "extra.pkl is not listed in checksums.json"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupted_checkpoint_is_refused_by_name_and_never_half_loaded(corruption, finished_run, tmp_path):
    """Fault: one file of the latest checkpoint truncated, bit-flipped, edited, deleted or added.
    Outcome: resume and load_run refuse it with a message naming the file; the model being
    resumed keeps every parameter it had."""
    file, damage, message = CORRUPTIONS[corruption]
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(latest_checkpoint(run) / file)

    with pytest.raises(SeqmixError, match=message):
        load_run(run)
    experiment = build_experiment(tiny_config(run, "train.max_steps=4", "train.checkpoint_every=1", "train.resume=true"))
    before = parameters(experiment.model)
    with pytest.raises(SeqmixError, match=message):
        train(experiment.model, experiment.task, experiment.train, _record(experiment))
    after = parameters(experiment.model)
    assert all(torch.equal(before[name], after[name]) for name in before)


def _model_and_optimizer(out_dir: Path):
    experiment = build_experiment(tiny_config(out_dir, "train.max_steps=4"))
    return experiment.model, make_optimizer(experiment.model, experiment.train)


@pytest.mark.parametrize("fault", ["last weight has another shape", "a weight is missing", "optimizer state of another shape",
                                   "last weight holds integers", "last weight holds booleans", "optimizer state holds integers"])
def test_a_checkpoint_from_another_model_changes_nothing_before_it_is_refused(fault, finished_run, tmp_path):
    """Fault: files that pass their checksums (rewritten and re-recorded) but hold another model's
    tensors (another shape, or integers or booleans where the model keeps floating-point values), the
    bad one last in file order. Outcome: refused naming the tensor; model and
    optimizer untouched, although every other tensor would have loaded."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(latest_checkpoint(finished_run), checkpoint)
    weights = load_file(str(checkpoint / "model.safetensors"))
    last = sorted(weights)[-1]
    if fault == "last weight has another shape":
        weights[last] = torch.zeros(weights[last].numel() + 1)
        save_file(weights, str(checkpoint / "model.safetensors"))
        message = f"tensor '{last}' has shape"
    elif fault.startswith("last weight holds"):
        dtype = torch.int32 if fault.endswith("integers") else torch.bool
        weights[last] = weights[last].to(dtype)
        save_file(weights, str(checkpoint / "model.safetensors"))
        message = f"tensor '{last}' holds {str(dtype).removeprefix('torch.')} values, the model's '{last}' is float32"
    elif fault == "a weight is missing":
        save_file({k: v for k, v in weights.items() if k != last}, str(checkpoint / "model.safetensors"))
        message = f"weight '{last}' is not in the file"
    else:
        moments = load_file(str(checkpoint / "optimizer.safetensors"))
        key = sorted(k for k in moments if k.endswith("exp_avg"))[-1]
        if fault == "optimizer state holds integers":
            moments[key] = moments[key].to(torch.int64)
            message = f"tensor {key} holds int64 values"
        else:
            moments[key] = torch.zeros(3, 3)
            message = f"tensor {key} has shape"
        save_file(moments, str(checkpoint / "optimizer.safetensors"))
    write_checksums(checkpoint)

    model, optimizer = _model_and_optimizer(tmp_path / "unused")
    before, optimizer_before = parameters(model), optimizer.state_dict()
    with pytest.raises(SeqmixError, match=message):
        load_training_state(checkpoint, model, optimizer)
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert optimizer.state_dict() == optimizer_before


# --- NaN and inf losses and gradients -------------------------------------------------------


def _nonfinite_logits_at(model, steps: set[int], value: str) -> None:
    """Multiply the logits of the given training steps (0-based) by ``value`` (``nan`` or ``inf``)."""
    real_forward = model.forward
    calls = {"n": 0}

    def forward(tokens, padding_mask=None, output_index=None):
        out = real_forward(tokens, padding_mask, output_index)
        if not model.training:
            return out
        calls["n"] += 1
        return out * float(value) if calls["n"] - 1 in steps else out

    model.forward = forward


def _infinite_gradient_at(model, steps: set[int]) -> None:
    """A finite loss whose gradient is infinite at the given training steps (0-based)."""
    calls = {"n": 0}
    weight = model.embed.weight

    def hook(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] - 1 in steps else grad

    weight.register_hook(hook)


@pytest.mark.parametrize("how", ["nan", "inf"])
def test_a_nonfinite_loss_stops_the_run_by_default_and_keeps_the_last_checkpoint(how, tmp_path):
    """Fault: the logits of the fourth training step (step 4, as metrics.jsonl counts) become NaN or
    inf. Outcome (on_nonfinite=stop, the default): SeqmixError naming that step and the last good
    checkpoint, which loads finite. The message counted from 0 ("step 3") where the metrics count from 1."""
    experiment = build_experiment(tiny_config(tmp_path / "run", "train.max_steps=6", "train.checkpoint_every=2", "train.eval_every=6"))
    _nonfinite_logits_at(experiment.model, {3}, how)
    with pytest.raises(SeqmixError, match=r"loss became (nan|inf) at step 4 with train.on_nonfinite=stop.*step-00000002.*on_nonfinite=skip"):
        train(experiment.model, experiment.task, experiment.train, _record(experiment))
    restored, _ = load_run(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in restored.parameters())


def test_an_infinite_gradient_with_a_finite_loss_stops_the_run(tmp_path):
    """Fault: a finite loss whose gradient is infinite at step 2. Outcome: stopped before the update."""
    experiment = build_experiment(tiny_config(tmp_path / "run", "train.max_steps=4", "train.checkpoint_every=1", "train.eval_every=4"))
    _infinite_gradient_at(experiment.model, {2})
    with pytest.raises(SeqmixError, match=r"gradient norm became (inf|nan) at step 3.*step-00000002"):
        train(experiment.model, experiment.task, experiment.train, _record(experiment))
    restored, _ = load_run(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in restored.parameters())


def test_skip_drops_the_nonfinite_steps_updates_and_finishes(tmp_path):
    """Fault: NaN logits at step 2, an infinite gradient at step 4 (of 6). Outcome with
    on_nonfinite=skip: both steps logged as skipped, the optimizer took 4 steps, the weights
    and the final checkpoint are finite."""
    experiment = build_experiment(tiny_config(
        tmp_path / "run", "train.max_steps=6", "train.checkpoint_every=3", "train.eval_every=6", "train.on_nonfinite=skip",
    ))
    _nonfinite_logits_at(experiment.model, {2}, "nan")
    _infinite_gradient_at(experiment.model, {4})
    result = train(experiment.model, experiment.task, experiment.train, _record(experiment))
    skipped = [row for row in metric_rows(tmp_path / "run") if row["split"] == "skipped"]
    assert [(row["step"], row["reason"].split(" became")[0]) for row in skipped] == [(3, "loss"), (5, "gradient norm")]
    assert [row["step"] for row in result.history if row["split"] == "train"] == [1, 2, 4, 6]
    optimizer_state = load_file(str(latest_checkpoint(tmp_path / "run") / "optimizer.safetensors"))
    assert {float(v) for k, v in optimizer_state.items() if k.endswith(".step")} == {4.0}
    assert all(torch.isfinite(p).all() for p in experiment.model.parameters())
    restored, _ = load_run(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in restored.parameters())


def test_skip_stops_after_too_many_nonfinite_steps_in_a_row(tmp_path):
    """Fault: NaN logits from step 2 on. Outcome with on_nonfinite=skip and max_nonfinite_skips=2:
    steps 2 and 3 are skipped, step 4 stops the run naming the cap; checkpoint 2 stays good."""
    experiment = build_experiment(tiny_config(
        tmp_path / "run", "train.max_steps=8", "train.checkpoint_every=2", "train.eval_every=8",
        "train.on_nonfinite=skip", "train.max_nonfinite_skips=2",
    ))
    _nonfinite_logits_at(experiment.model, set(range(2, 8)), "nan")
    with pytest.raises(SeqmixError, match=r"loss became nan at step 5 after 2 skipped steps in a row \(train.max_nonfinite_skips=2\)"):
        train(experiment.model, experiment.task, experiment.train, _record(experiment))
    assert latest_checkpoint(tmp_path / "run").name == "step-00000004"
    restored, _ = load_run(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in restored.parameters())


@pytest.mark.parametrize(
    "options, message",
    [({"on_nonfinite": "ignore"}, "train.on_nonfinite='ignore' is not valid.*skip.*stop"),
     ({"max_nonfinite_skips": 0}, "max_nonfinite_skips=0 is not valid")],
)
def test_bad_nonfinite_options_are_refused(options, message):
    with pytest.raises(SeqmixError, match=message):
        TrainConfig(**options)


def test_the_default_train_config_documents_on_nonfinite():
    text = (ROOT / "conf" / "train" / "default.yaml").read_text()
    assert "on_nonfinite: stop" in text and "max_nonfinite_skips:" in text
    composed = compose_config(["train.on_nonfinite=skip"]).train
    assert TrainConfig(**composed).on_nonfinite == "skip"


def test_diverged_weights_make_no_checkpoint_and_their_metrics_are_json(tmp_path):
    """Fault: lr = 1e30, so the weights diverge after step 1 and every later loss is NaN. With skips
    allowed, the evaluation at step 4 was NaN and its weights were still saved as checkpoint 4, which
    the stop message called the last good one; metrics.jsonl held the bare word NaN, which is no JSON."""
    with pytest.raises(SeqmixError, match=r"loss became nan at step 5 after 3 skipped steps .* Last good checkpoint: none yet"):
        run_in_process(tmp_path / "run", "train.lr=1e30", "train.weight_decay=0", "train.warmup_steps=0", "train.max_steps=8",
                       "train.log_every=1", "train.eval_every=4", "train.checkpoint_every=4", "train.on_nonfinite=skip",
                       "train.max_nonfinite_skips=3")
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    rows = [json.loads(line, parse_constant=lambda word: pytest.fail(f"{word} is not JSON")) for line in text.splitlines()]
    assert {"step": 4, "split": "valid", "loss": None} == {key: rows[-1][key] for key in ("step", "split", "loss")}
    assert not (tmp_path / "run" / "checkpoints").exists()
