"""The training loop: AdamW, warmup + cosine schedule, clipping, accumulation, bf16 autocast,
periodic evaluation, JSONL metrics, atomic checkpoints (``checkpoints``) and exact resume, on one
process or many.

Everything a step consumes is a function of the step number (the task's batch ``step``, the
schedule's learning rate), and a checkpoint holds the weights and the optimizer state, so a
resumed run continues bit for bit where it stopped. Under ``torchrun`` each rank takes its rows
of the same global batch and the loss is normalised by the global number of targets, so two
processes compute what one process computes on the whole batch.
"""
from __future__ import annotations

import fcntl
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from seqmix.contract import require_runs_on
from seqmix.errors import SeqmixError, SeqmixWarning, TrainingStopped, require_available_device, require_bool, require_choice, require_int, require_path, require_seed, require_writable_dir
from seqmix.jsontext import strict_json
from seqmix.model.pretrained import check_pretrained_target
from seqmix.training.records import data_sha256, evaluation_record, read_run_record, same_run
from seqmix.training.runs import metric_row
from seqmix.tasks.base import BITS_METRICS, IGNORE, MODEL_FILES, Batch, Task
from seqmix.training.checkpoints import (
    CHECKPOINTS,
    RUN,
    checkpoint_name,
    latest_checkpoint,
    load_training_state,
    save_checkpoint,
    write_json_atomic,
)

METRICS = "metrics.jsonl"
NONFINITE_ACTIONS = ("stop", "skip")
# The backends seqmix.compile.compile_model takes (the library never imports compile/; a test keeps the two equal).
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "tensorrt")
DEVICES = ("auto", "cpu", "cuda")
SWITCHES = ("bf16", "resume", "tensorboard", "progress")
POSITIVE_COUNTS = ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "checkpoint_every", "log_every")
LOCK = ".lock"


@dataclass
class TrainConfig:
    """Options of a training run (``conf/train/default.yaml`` mirrors them).

    Every field is checked against its domain on construction (and again when ``train`` starts),
    so a bad option raises SeqmixError naming it before anything is written to out_dir.

    Attributes:
        out_dir: where checkpoints, metrics.jsonl and run.json go (a non-empty path).
        max_steps: optimizer steps (>= 1).
        batch_size: sequences per optimizer step, over all processes and accumulation steps.
        grad_accum: micro-batches per optimizer step; divides batch_size.
        lr, min_lr_ratio, warmup_steps: peak learning rate (finite, > 0), the floor of the cosine
            decay as a fraction of it (in [0, 1]), and linear warm-up steps (>= 0).
        weight_decay, beta1, beta2: AdamW's: decay finite and >= 0 (not on biases, norms and EMA
            vectors), betas in [0, 1).
        grad_clip: max global gradient norm, finite and >= 0; 0 turns clipping off.
        bf16: run forward and backward under bfloat16 autocast (a bool, as are resume,
            tensorboard and progress: the string "false" is refused, not read as true).
        eval_every, eval_batches: evaluate every N steps (and at the end) on this many batches.
        checkpoint_every: write a checkpoint every N steps (and at the end); keep_checkpoints of them.
        log_every: write a training row to metrics.jsonl every N steps.
        resume: continue the run found in out_dir.
        on_nonfinite: what a step whose loss or gradient norm is NaN or infinite does: ``stop``
            raises (the weights keep the last good step), ``skip`` drops that step's update and
            goes on, logging a ``skipped`` row.
        max_nonfinite_skips: with ``skip``, the most non-finite steps in a row before the run
            stops anyway (a diverged run would otherwise skip every remaining step).
        seed: seeds the parameter initialisation (an integer in [0, 2**32 - 1]: torch's generators keep 32 bits of a seed).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:<index>``.
        tensorboard: also write TensorBoard scalars to out_dir/tensorboard.
        progress: show a progress bar (on a terminal only, as the data's bars).
        compile: None, or a torch.compile backend (``COMPILE_BACKENDS``) to run the
            training forward through; ``seqmix train`` passes the compiled module to ``train``
            (the library itself never imports ``compile/``).
        save_pretrained: None, or a directory where ``seqmix train`` writes the trained model in the
            Hugging Face layout (``seqmix.save_pretrained``) when the run ends.
    """

    out_dir: str = "runs/default"
    max_steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0
    bf16: bool = False
    eval_every: int = 250
    eval_batches: int = 16
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: bool = False
    on_nonfinite: str = "stop"
    max_nonfinite_skips: int = 10
    seed: int = 0
    device: str = "auto"
    tensorboard: bool = False
    progress: bool = True
    compile: str | None = None
    save_pretrained: str | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise SeqmixError naming the first field outside its domain (see the attributes)."""
        require_path("train.out_dir", self.out_dir)
        self.out_dir = os.fspath(self.out_dir)
        if self.save_pretrained is not None and (not isinstance(self.save_pretrained, (str, os.PathLike))
                                                 or not os.fspath(self.save_pretrained)):
            raise SeqmixError(f"train.save_pretrained={self.save_pretrained!r} is not valid; expected null or a directory path")
        for name in POSITIVE_COUNTS:
            require_int("train", name, getattr(self, name))
        require_int("train", "warmup_steps", self.warmup_steps, 0)
        require_int("train", "keep_checkpoints", self.keep_checkpoints, 1)
        require_int("train", "max_nonfinite_skips", self.max_nonfinite_skips, 1)
        require_seed("train", "seed", self.seed)
        if self.batch_size % self.grad_accum:
            raise SeqmixError(f"train: batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")
        _require_number("lr", self.lr, 0.0, math.inf, "finite and > 0", low_open=True)
        _require_number("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, "in [0, 1]: the floor of the decay as a fraction of lr")
        _require_number("weight_decay", self.weight_decay, 0.0, math.inf, "finite and >= 0")
        _require_number("beta1", self.beta1, 0.0, 1.0, "in [0, 1)", high_open=True)
        _require_number("beta2", self.beta2, 0.0, 1.0, "in [0, 1)", high_open=True)
        _require_number("grad_clip", self.grad_clip, 0.0, math.inf, "finite and >= 0; 0 turns clipping off")
        if self.lr * self.weight_decay >= 1:
            # AdamW multiplies each decayed weight by 1 - lr * weight_decay every step: at 1 or more it
            # zeroes or flips them, and the run diverges at its first steps.
            raise SeqmixError(f"train: lr={self.lr!r} times weight_decay={self.weight_decay!r} is {self.lr * self.weight_decay:g}; "
                              "it must be below 1 (AdamW scales the decayed weights by 1 - lr * weight_decay each step)")
        for name in SWITCHES:
            require_bool("train", name, getattr(self, name))
        require_choice("train.on_nonfinite", self.on_nonfinite, NONFINITE_ACTIONS)
        check_device_name(self.device)
        if self.compile is not None and self.compile not in COMPILE_BACKENDS:
            raise SeqmixError(f"train.compile={self.compile!r} is not valid; expected null or one of {list(COMPILE_BACKENDS)}")

    def require_writable_outputs(self) -> None:
        """Raise unless out_dir and save_pretrained can be written: the writing process (rank 0) asks,
        before any work; other ranks never write there and may not even see that file system."""
        require_writable_dir("train.out_dir", self.out_dir)
        problem = run_directory_problem(self)
        if problem:
            raise SeqmixError(problem)
        if self.save_pretrained is not None:
            # Checked now, not after the whole run: the model is saved there once training ends.
            if os.path.abspath(self.save_pretrained) == os.path.abspath(self.out_dir):
                raise SeqmixError(f"train.save_pretrained={self.save_pretrained!r} is train.out_dir, which will hold the "
                                  "run's checkpoints and records; name another directory (inside it is fine)")
            check_pretrained_target("train.save_pretrained", self.save_pretrained)
        if self.save_pretrained is not None:
            require_writable_dir("train.save_pretrained", self.save_pretrained)


def _require_number(name: str, value, low: float, high: float, domain: str, low_open: bool = False, high_open: bool = False) -> None:
    """Raise unless ``value`` is a finite int or float between ``low`` and ``high`` (bools are not numbers here).

    An int too large for a float counts as infinite: the schedule and AdamW compute in floats.
    """
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        finite = number and math.isfinite(value)
    except OverflowError:
        finite = False
    above = finite and (value > low if low_open else value >= low)
    below = finite and (value < high if high_open else value <= high)
    if not (above and below):
        raise SeqmixError(f"train.{name}={value!r} is not valid; expected a number {domain}")


def check_device_name(name) -> None:
    """Raise unless ``name`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:<index>`` (whether it exists is ``pick_device``'s)."""
    if not (isinstance(name, str) and (name in DEVICES or re.fullmatch(r"cuda:[0-9]+", name))):
        raise SeqmixError(f"train.device={name!r} is not valid; expected one of {list(DEVICES)} or cuda:<index>")


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``lr·min_lr_ratio``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms or per-channel vectors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Floats: an override of 0 is the int 0, and torch takes betas of one type only.
    return torch.optim.AdamW(groups, lr=float(config.lr), betas=(float(config.beta1), float(config.beta2)))


def target_index(batch: Batch) -> torch.Tensor | None:
    """Flat positions (N,) of a per-token batch's targets, for ``model(..., output_index=)``; None for labels."""
    if batch.targets.dim() != 2:
        return None
    return (batch.targets.reshape(-1) != IGNORE).nonzero().squeeze(1)


def predict(network: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits where ``batch`` has targets: (N, V) at the per-token targets, or (B, C) for labels."""
    index = target_index(batch)
    if index is None:
        return network(batch.inputs, batch.padding_mask)
    return network(batch.inputs, batch.padding_mask, index)


def _flat_targets(output: torch.Tensor, batch: Batch) -> torch.Tensor:
    targets = batch.targets.reshape(-1)
    if output.dim() == 2 and batch.targets.dim() == 2:  # logits of the selected positions only
        return targets[targets != IGNORE]
    return targets


def loss_sum_and_count(output: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the predicted targets, and how many there are.

    ``output`` is (B, L, V) logits for per-token targets (B, L), (N, V) at their N targets as
    ``predict`` gives, or (B, C) for labels (B,).
    """
    logits = output.float().reshape(-1, output.shape[-1])
    targets = _flat_targets(output, batch)
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    return total, (targets != IGNORE).sum()


def correct_count(output: torch.Tensor, batch: Batch) -> torch.Tensor:
    """How many predicted targets the argmax gets right (``output`` as in ``loss_sum_and_count``)."""
    targets = _flat_targets(output, batch)
    predictions = output.reshape(-1, output.shape[-1]).argmax(-1)
    return ((predictions == targets) & (targets != IGNORE)).sum()


EVAL_TOKENS = 1 << 16
"""The most tokens one forward of ``evaluate`` takes: a larger batch is scored in pieces of rows."""


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, batch_size: int, batches: int, device, bf16: bool = False,
             stop: Callable[[], bool] | None = None, progress: bool = False) -> dict[str, float] | None:
    """Loss per target and the task's metric over its fixed evaluation set.

    ``stop``, asked before each batch, ends the evaluation when it returns True, which then returns
    None (training asks whether a stop signal came: train.eval_batches=10**9 ran on past SIGTERM).
    ``progress`` shows a bar over the batches on stderr when it is a terminal; into a log file or
    a pipe, a line every PROGRESS_LINE_S seconds instead (batch=10**11 ran silently for ever there).
    """
    was_training = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    on_terminal = sys.stderr.isatty()
    lines = _ProgressLines("evaluate", batches, "batches") if progress and not on_terminal else None
    for batch in tqdm(task.eval_batches(batch_size, batches), total=batches, disable=not (progress and on_terminal),
                      unit="batch", desc="evaluate", dynamic_ncols=True):
        if stop is not None and stop():
            model.train(was_training)
            return None
        # Rows in pieces of at most EVAL_TOKENS tokens: the scores are sums over rows, and a forward
        # over batch_size=100000 rows held activations the kernel killed the process for (24 GB).
        rows = max(1, EVAL_TOKENS // max(1, batch.inputs[0].numel()))
        for start in range(0, batch.inputs.shape[0], rows):
            piece = batch.slice(start, start + rows).to(device)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                output = predict(model, piece)
            loss, n = loss_sum_and_count(output, piece)
            total += float(loss)
            count += int(n)
            correct += int(correct_count(output, piece))
        if lines is not None:
            lines.one_done()
    model.train(was_training)
    return task_scores(task, total, count, correct)


PROGRESS_LINE_S = 30.0
"""Seconds between the progress lines long work writes where stderr is not a terminal."""


class _ProgressLines:
    """Progress as plain lines on stderr, at most one every PROGRESS_LINE_S seconds, for logs and pipes,
    where a bar's frames are carriage returns: ``evaluate: 1,204 of 100,000 batches (1.2%), 30 s, about 41 min left``."""

    def __init__(self, what: str, total: int, unit: str):
        self.what, self.total, self.unit = what, total, unit
        self.done, self.started = 0, time.perf_counter()
        self.next_line = self.started + PROGRESS_LINE_S

    def one_done(self) -> None:
        """Count one item done, and write a line when one is due."""
        self.done += 1
        now = time.perf_counter()
        if now < self.next_line:
            return
        self.next_line = now + PROGRESS_LINE_S
        elapsed = now - self.started
        left = elapsed / self.done * (self.total - self.done)
        print(f"{self.what}: {self.done:,} of {self.total:,} {self.unit} ({self.done / self.total:.1%}), "
              f"{_duration(elapsed)}, about {_duration(left)} left", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    """``42 s``, ``17 min``, ``3.2 h``, ``12 days``."""
    for unit, size, limit in (("s", 1, 120), ("min", 60, 120 * 60), ("h", 3600, 72 * 3600)):
        if seconds < limit:
            return f"{seconds / size:.0f} {unit}" if unit != "h" else f"{seconds / size:.1f} h"
    return f"{seconds / 86400:,.0f} days"


def task_scores(task: Task, loss_sum: float, count: int, correct: int) -> dict[str, float]:
    """Mean loss per target and the task's metric, from summed loss, target count and correct argmaxes."""
    loss = loss_sum / max(count, 1)
    scores = {"loss": loss}
    if task.metric in BITS_METRICS:
        scores[task.metric] = loss / math.log(2)
    else:
        scores["accuracy"] = correct / max(count, 1)
    return scores


# --- the loop -----------------------------------------------------------------------------


@dataclass
class RunResult:
    """What a finished run reports.

    Attributes:
        steps: the step the run reached (``max_steps``, or its checkpoint's when resumed past it).
        first_step: the step this process started from (0, or the resumed checkpoint's).
        seconds, tokens_per_s: wall time and throughput of this process's steps alone.
    """

    steps: int
    first_step: int
    final_eval: dict[str, float]
    checkpoint: Path | None
    seconds: float
    tokens_per_s: float
    history: list[dict] = field(default_factory=list)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def process_rank() -> int:
    """This process's rank in the training process group; 0 without one."""
    return _world()[0]


def _require_one_resume_step(start: int, out_dir: Path, device: torch.device) -> None:
    """Refuse, on every rank, a resume where the ranks found checkpoints of different steps.

    Each rank reads ``out_dir`` itself, so a node that does not see rank 0's run directory (no
    shared file system) would train other steps than the rest and leave them waiting in a
    collective forever. ``start`` is this rank's step; the comparison is an all-gather.
    """
    found = torch.tensor([start], dtype=torch.long, device=device)
    starts = [torch.zeros_like(found) for _ in range(dist.get_world_size())]
    dist.all_gather(starts, found)
    steps = [int(step) for step in starts]
    other = next((rank for rank, step in enumerate(steps) if step != steps[0]), None)
    if other is not None:
        raise SeqmixError(
            f"train.resume: rank 0 resumes {out_dir} at step {steps[0]} but rank {other} at step {steps[other]}; "
            "every node must see the same train.out_dir, on a file system all nodes share"
        )


def pick_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for a CUDA device that is not there is an error."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return require_available_device("train.device", name)


def run_directory_problem(config: TrainConfig) -> str | None:
    """Why ``config.out_dir`` cannot take this run, read from what it holds, or None: a finished run
    (checkpoints) without ``resume``, or no run with ``resume``. Asked before any work (the corpus
    was tokenized first) and again as the run starts."""
    out_dir = Path(config.out_dir)
    record, checkpoints = out_dir / RUN, out_dir / CHECKPOINTS
    if record.exists() and not config.resume and checkpoints.is_dir() and any(checkpoints.iterdir()):
        return (f"train.out_dir={str(out_dir)!r} already holds a run; pass train.resume=true to continue it, "
                "or choose another train.out_dir")
    if config.resume and not record.exists():
        return f"train.resume=true but {out_dir} holds no run to resume"
    return None


def prepare_out_dir(config: TrainConfig, run_record: dict, model_files: Mapping[str, bytes] | None = None,
                    data: str | None = None) -> Path:
    """Create out_dir, refusing to mix a new run into another run's directory.

    ``model_files`` (the task's ``model_files()``: its tokenizer, its labels) are written beside
    run.json; a resumed run must bring the same ones, or its tokens would silently change meaning.
    ``data``, the sha256 of the user's data the task read (``data_sha256``), goes into run.json, so
    that ``seqmix evaluate`` can tell when it reads other data under the same path.
    """
    model_files = dict(model_files or {})
    out_dir = Path(config.out_dir)
    record = out_dir / RUN
    problem = run_directory_problem(config)
    if problem:
        raise SeqmixError(problem)
    if record.exists() and not config.resume:
        # A run that failed before its first checkpoint (out of memory, say) left only its record and
        # metrics: nothing to continue, and its retry was refused. It starts again in its place.
        warnings.warn(SeqmixWarning(f"train.out_dir={str(out_dir)!r} holds a run that stopped before its first checkpoint; "
                                    "starting it again from step 0"))
        (out_dir / METRICS).unlink(missing_ok=True)
    if config.resume:
        if not same_run(read_run_record(record), run_record):
            raise SeqmixError(f"train.resume=true but {out_dir} holds a run of another model or task; resume with the same config")
        for name in MODEL_FILES:
            path = out_dir / name
            stored = path.read_bytes() if path.is_file() and not path.is_symlink() else None
            if stored != model_files.get(name):
                raise SeqmixError(f"train.resume=true but the task's {name} is not the one {out_dir} trained with; "
                                  "resume with the same tokenizer and data")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not config.resume:
        for name, content in model_files.items():
            (out_dir / name).write_bytes(content)
    # A resumed run rewrites its record too: same model and task, but the evaluation it reports
    # from now on is this session's (checkpoints keep the copy they were written with).
    write_json_atomic(record, {**run_record, "evaluation": evaluation_record(config.eval_batches, config.batch_size, config.bf16),
                               **({"data_sha256": data} if data else {})})
    return out_dir


@contextmanager
def run_dir_lock(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on the run directory ``out_dir`` (created when missing) for the block.

    The lock is ``fcntl.flock`` on ``out_dir/.lock``, a file that holds the holder's pid. The
    kernel drops it when the holder exits or is killed, so a crashed run never leaves its
    directory locked. While it is held, a second process (or a second run in this one) is
    refused with a SeqmixError naming the holder's pid. When the block fails in a directory it
    created and that holds nothing but the lock, the directory is removed again.
    """
    out_dir = Path(out_dir).absolute()
    created = _outermost_missing(out_dir)
    path = out_dir / LOCK
    handle = _acquire_lock(path)
    try:
        yield out_dir
    except BaseException:
        if created is not None and list(out_dir.iterdir()) == [path]:
            path.unlink()
            _remove_empty_dirs(out_dir, created)
        raise
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _acquire_lock(path: Path):
    """The open lock file ``path``, locked by this process with its pid written in; SeqmixError when another holds it."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown (it is starting)"
            handle.close()
            raise SeqmixError(
                f"train.out_dir={str(path.parent)!r} is in use: the process with pid {holder} is training into it "
                f"(it holds {path}); wait for that run to end, or stop it, before training into this directory"
            ) from None
        # A holder that failed in a directory it had created unlinks the file before unlocking it:
        # the lock is only ours when the file we locked is still the one at ``path``.
        try:
            if os.path.samestat(os.fstat(handle.fileno()), path.stat()):
                break
        except FileNotFoundError:
            pass
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _outermost_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist (None when ``path`` exists)."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def _remove_empty_dirs(path: Path, outermost: Path) -> None:
    """Remove ``path`` and its parents up to ``outermost`` while they are empty."""
    while True:
        try:
            path.rmdir()
        except OSError:
            return
        if path == outermost:
            return
        path = path.parent


def train(model: nn.Module, task: Task, config: TrainConfig, run_record: dict, forward_module: nn.Module | None = None) -> RunResult:
    """Train ``model`` on ``task`` as ``config`` says; resume when asked.

    Args:
        model: built by ``instantiate_model`` (it carries its config, which checkpoints store).
        task: the task; its head and vocabulary must match the model's.
        config: the run's options.
        run_record: what to store in run.json (the resolved model and task configs); the
            record also keeps how the run evaluates (``evaluation_record``).
        forward_module: what runs the training forward, sharing ``model``'s parameters (e.g. a
            torch.compile wrapper); ``model`` itself when None.

    Everything that can refuse the run's options (their domains, the device, the optimizer) runs
    before anything is written to out_dir. The run directory is then locked for the whole run
    (``run_dir_lock``): a second process training into it is refused with the holder's pid.
    """
    config.validate()
    rank, world = _world()
    if rank == 0:
        config.require_writable_outputs()
    if config.batch_size % (world * config.grad_accum):
        raise SeqmixError(
            f"train: batch_size={config.batch_size} must split evenly over {world} processes × grad_accum={config.grad_accum}"
        )
    device = pick_device(config.device)
    require_runs_on(model, device, f"train.device={config.device!r}")
    if config.tensorboard and rank == 0:
        _require_tensorboard()
    model.to(device)
    optimizer = make_optimizer(model, config)
    with run_dir_lock(config.out_dir) if rank == 0 else nullcontext():
        return _train_in_locked_dir(model, task, config, run_record, forward_module, device, optimizer)


def _train_in_locked_dir(
    model: nn.Module, task: Task, config: TrainConfig, run_record: dict, forward_module: nn.Module | None,
    device: torch.device, optimizer: torch.optim.Optimizer,
) -> RunResult:
    """``train`` once its options are checked, the model is on ``device`` and rank 0 holds the run directory's lock."""
    rank, world = _world()
    out_dir = Path(config.out_dir)
    if rank == 0:
        prepare_out_dir(config, run_record, task.model_files(), data_sha256(task))
    writer = _tensorboard(out_dir) if (config.tensorboard and rank == 0) else None
    if world > 1:
        dist.barrier()
    start = 0
    if config.resume:
        checkpoint, changed = latest_checkpoint(out_dir), []
        if checkpoint is not None:
            start, changed = load_training_state(checkpoint, model, optimizer)
        if world > 1:
            _require_one_resume_step(start, out_dir, device)
        if rank == 0:
            _truncate_metrics(out_dir / METRICS, start)
            if checkpoint is None:
                print(f"resume: {out_dir} has no checkpoint yet; starting at step 0 of {config.max_steps:,}", flush=True)
            elif start >= config.max_steps:
                print(f"resume: {checkpoint} is at step {start:,}, already train.max_steps={config.max_steps:,}; "
                      "nothing left to train (raise train.max_steps to go on)", flush=True)
            else:
                print(f"resume: continuing from {checkpoint} at step {start:,} of {config.max_steps:,}", flush=True)
            if changed:
                print(f"resume: the optimizer continues with the train options given, not the checkpoint's: {', '.join(changed)}",
                      flush=True)
    network = model if forward_module is None else forward_module
    if world > 1:
        network = nn.parallel.DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    metrics_file = (out_dir / METRICS).open("a") if rank == 0 else None
    rows_per_rank = config.batch_size // world
    micro = rows_per_rank // config.grad_accum
    history: list[dict] = []
    # disable=None: drawn on a terminal only; into a log file or a pipe its frames were 36 KB per 300 steps.
    bar = tqdm(total=config.max_steps, initial=start, desc="train", unit="step",
               disable=None if config.progress and rank == 0 else True, dynamic_ncols=True)
    started, tokens_seen, checkpoint = time.perf_counter(), 0, latest_checkpoint(out_dir) if config.resume else None

    def log(row: dict) -> None:
        history.append(row)
        if metrics_file is not None:
            metrics_file.write(strict_json(row) + "\n")  # a NaN loss as null: Python's bare NaN is not JSON
            metrics_file.flush()
        if writer is not None:
            for key, value in row.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    writer.add_scalar(f"{row['split']}/{key}", value, row["step"])

    # Closed however the loop ends (a refused step, an interrupt, memory running out), so the bar
    # ends its line and the metrics rows are flushed and closed.
    stops = _StopRequests()
    try:
        stops.install()
        # The evaluation a stop interrupted at the checkpoint's step, which the loop below never
        # reaches again: its row was lost for good. It is rank 0's alone (no collective runs in it).
        if rank == 0 and config.resume and start and (start % config.eval_every == 0 or start == config.max_steps) \
                and not _evaluated_at(out_dir / METRICS, start):
            scores = evaluate(model, task, config.batch_size, config.eval_batches, device, config.bf16,
                              stop=lambda: stops.received is not None)
            if scores is not None:
                log({"step": start, "split": "valid", **scores})
        model.train()
        consecutive_skips = 0
        for step in range(start, config.max_steps):
            diverged = False
            lr = learning_rate(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            full = task.batch("train", step, config.batch_size)
            local = full.slice(rank * rows_per_rank, (rank + 1) * rows_per_rank).to(device)
            count = (full.targets != IGNORE).sum().to(device)  # the global number of targets
            step_loss = torch.zeros((), device=device)
            for index in range(config.grad_accum):
                part = local.slice(index * micro, (index + 1) * micro)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    output = predict(network, part)
                loss_sum, _ = loss_sum_and_count(output, part)
                # DDP averages gradients over ranks; scaling by the world size turns that into the sum.
                (loss_sum * world / count).backward()
                step_loss += loss_sum.detach()
            if world > 1:
                dist.all_reduce(step_loss)
            loss_value = float(step_loss / count)
            # The norm is what clip_grad_norm_ computes; taken always, since a non-finite gradient
            # poisons the weights as surely as a non-finite loss.
            grad_norm = nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            fault = _nonfinite_fault(loss_value, float(grad_norm))
            if fault is None:
                if config.grad_clip > 0:
                    nn.utils.clip_grads_with_norm_(model.parameters(), config.grad_clip, grad_norm)
                optimizer.step()
                consecutive_skips = 0
            elif config.on_nonfinite == "skip" and consecutive_skips < config.max_nonfinite_skips:
                consecutive_skips += 1
            else:
                last = latest_checkpoint(out_dir)
                if config.on_nonfinite == "skip":
                    why = f"after {consecutive_skips} skipped steps in a row (train.max_nonfinite_skips={config.max_nonfinite_skips})"
                    advice = "The run has diverged: lower train.lr, or resume from the checkpoint with a smaller one."
                else:
                    why = "with train.on_nonfinite=stop"
                    advice = ("Lower train.lr (or train.weight_decay), enable train.grad_clip if it is 0, or pass "
                              "train.on_nonfinite=skip to skip such steps.")
                # Steps are counted from 1, as metrics.jsonl counts them.
                raise SeqmixError(
                    f"train: the {fault} at step {step + 1} {why}; stopped without updating the weights. "
                    f"Last good checkpoint: {last if last else 'none yet'}. {advice}"
                )
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += full.inputs.numel()
            done = step + 1
            elapsed = time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):,.0f}", lr=f"{lr:.2e}")
            if fault is not None:
                log({"step": done, "split": "skipped", "reason": fault, "consecutive": consecutive_skips})
            elif done % config.log_every == 0 or done == config.max_steps:
                row = {"step": done, "split": "train", "loss": loss_value, "lr": lr, "tokens_per_s": tokens_seen / max(elapsed, 1e-9)}
                if task.metric in BITS_METRICS:
                    row[task.metric] = loss_value / math.log(2)
                log(row)
            if done % config.eval_every == 0 or done == config.max_steps:
                scores = evaluate(model, task, config.batch_size, config.eval_batches, device, config.bf16,
                                  stop=lambda: stops.received is not None)
                if rank == 0 and scores is not None:
                    log({"step": done, "split": "valid", **scores})
                    # Weights whose evaluation is not finite make no checkpoint: the stop message calls
                    # the latest one good, and a resume would start from diverged weights.
                    diverged = not all(math.isfinite(value) for value in scores.values())
                    bar.write(f"step {done}: " + ", ".join(f"valid {k} {v:.4f}" for k, v in scores.items()))
            if rank == 0 and (done % config.checkpoint_every == 0 or done == config.max_steps) and not diverged:
                checkpoint = save_checkpoint(out_dir, done, model, optimizer, config.keep_checkpoints)
            if done < config.max_steps and stops.stop_now(world, device):
                if rank == 0 and (checkpoint is None or checkpoint.name != checkpoint_name(done)):
                    checkpoint = save_checkpoint(out_dir, done, model, optimizer, config.keep_checkpoints)
                # A process that received nothing stops because another did: torchrun passes SIGTERM on to each.
                raise TrainingStopped(stops.received or "SIGTERM", done, config.max_steps, checkpoint if rank == 0 else None)
            if world > 1:
                dist.barrier()
    finally:
        stops.restore()
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if writer is not None:
            writer.close()
    final = next((row for row in reversed(history) if row["split"] == "valid"), None)
    if final is None:
        # None again when a stop signal came during the last step's evaluation: the run is whole, its scores unknown.
        final = evaluate(model, task, config.batch_size, config.eval_batches, device, config.bf16,
                         stop=lambda: stops.received is not None) or {}
    seconds = time.perf_counter() - started
    return RunResult(
        steps=max(config.max_steps, start),  # a resume past max_steps trains nothing: the model is at its checkpoint's step
        first_step=start,
        final_eval={k: v for k, v in final.items() if k not in ("step", "split")},
        checkpoint=checkpoint,
        seconds=seconds,
        tokens_per_s=tokens_seen / max(seconds, 1e-9),
        history=history,
    )


class _StopRequests:
    """While training: the first SIGTERM or SIGINT asks the loop to stop after the step it is in,
    with a checkpoint; a second one stops at once (KeyboardInterrupt), as before.

    Installed from the main thread only (Python runs handlers there), and not for a signal the
    process ignores (a job started with nohup, or in the background by a shell, keeps ignoring it).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                if signal.getsignal(number) is not signal.SIG_IGN:
                    self._previous[number] = signal.signal(number, self._handle)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            # None: the handler was set outside Python, which cannot put it back; the default stands in.
            signal.signal(number, signal.SIG_DFL if handler is None else handler)

    def _handle(self, number: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(number).name
        print(f"\ntrain: {self.received} received: stopping after this step with a checkpoint "
              "(send it again to stop at once, without one)", file=sys.stderr, flush=True)

    def stop_now(self, world: int, device: torch.device) -> bool:
        """Whether to stop after this step; with several processes, whether any was asked (they stop together)."""
        if world == 1:
            return self.received is not None
        asked = torch.tensor([0 if self.received is None else 1], device=device)
        dist.all_reduce(asked, op=dist.ReduceOp.MAX)
        return bool(asked.item())


def _nonfinite_fault(loss: float, grad_norm: float) -> str | None:
    """What went non-finite in a step ("loss became nan", ...), or None when both are finite."""
    if not math.isfinite(loss):
        return f"loss became {loss}"
    if not math.isfinite(grad_norm):
        return f"gradient norm became {grad_norm}"
    return None


def _evaluated_at(path: Path, step: int) -> bool:
    """Whether metrics.jsonl holds a validation row of ``step``."""
    if not path.is_file():
        return False
    return any((row := metric_row(line)) is not None and row["step"] == step and row.get("split") == "valid"
               for line in path.read_bytes().splitlines())


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows written after checkpoint ``step`` (the resumed run writes them again) and torn lines."""
    if not path.is_file():
        return
    kept = [line for line in path.read_bytes().splitlines() if (row := metric_row(line)) is not None and row["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(line + b"\n" for line in kept))
    os.replace(tmp, path)


def _require_tensorboard() -> None:
    """Fail before the run starts when TensorBoard logging is asked for but not installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise SeqmixError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from None


def _tensorboard(out_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out_dir / "tensorboard"))
