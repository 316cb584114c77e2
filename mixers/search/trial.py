"""One trial: build the candidate the space suggests, measure it, train it for the fixed budget in
``<out_dir>/trials/<n>/`` (an ordinary run directory), and record how it ended in the study.

The latency measurement is passed in (``LatencyFn``): this module never imports ``export``.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import torch
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import TrialState

from seqmix.errors import SeqmixError
from seqmix.model.checkpoint import instantiate_model
from seqmix.search.claims import RetryTrial, heartbeat
from seqmix.search.settings import SearchSettings
from seqmix.staging import new_file
from seqmix.tasks.base import Task
from seqmix.timing import Timing
from seqmix.training.experiment import adapt_model_config, check_fits
from seqmix.training.loop import METRICS, TrainConfig, train

# A crash or a NaN in one trial fails that trial only (SeqmixError is a ValueError; torch raises
# RuntimeErrors, out-of-memory included). Anything else is a bug and stops the search.
TRIAL_ERRORS = (ValueError, RuntimeError, ArithmeticError, MemoryError)
TRIALS = "trials"
STUDY_MARK = "study.json"
"""The file in search.out_dir naming the study whose runs and report it holds."""


def claim_out_dir(settings: SearchSettings) -> None:
    """Bind ``search.out_dir`` to this study, or raise when another study's runs are there.

    Optuna numbers each study's trials from 0, so a second study in the same folder replaced the
    first's runs (``trials/0000``, ...) and report without a word. The folder's STUDY_MARK names its
    study; a folder written before it was kept is taken for this study, as it was before.
    """
    mark = settings.out_dir / STUDY_MARK
    if os.path.lexists(mark):
        try:
            named = json.loads(mark.read_text()).get("study_name") if mark.is_file() and not mark.is_symlink() else None
        except (OSError, ValueError, AttributeError):
            named = None
        if named != settings.study_name:
            held = f"the runs of study {named!r}" if isinstance(named, str) else f"a {STUDY_MARK} seqmix did not write"
            raise SeqmixError(f"search.out_dir={str(settings.out_dir)!r} holds {held}; this search is study "
                              f"{settings.study_name!r}, whose trials would replace them: choose another search.out_dir"
                              + (f", or search.study_name={named} to continue that study" if isinstance(named, str) else ""))
        return
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    staged = new_file(settings.out_dir, f".{STUDY_MARK}.", ".tmp")
    staged.write_text(json.dumps({"study_name": settings.study_name}) + "\n")
    os.replace(staged, mark)

LatencyFn = Callable[..., Timing]
"""``(model, runtime=, length=, batch_size=, repeats=, work_dir=) -> Timing``; its median is the objective."""


class _ReportingTask:
    """``task`` as the trainer sees it, reporting each validation result to the trial for pruning.

    The trainer evaluates at every ``eval_every`` steps and appends the row to metrics.jsonl
    before it asks for the next training batch; at that request this wrapper reads the row,
    reports it, and raises ``optuna.TrialPruned`` when the pruner says so.
    """

    def __init__(self, task: Task, trial: optuna.Trial, run_dir: Path, eval_every: int):
        self._task, self._trial, self._run_dir, self._eval_every = task, trial, run_dir, eval_every

    def __getattr__(self, name: str):
        return getattr(self._task, name)

    def batch(self, split: str, index: int, batch_size: int):
        if split == "train" and index > 0 and index % self._eval_every == 0:
            self._report(index)
        return self._task.batch(split, index, batch_size)

    def _report(self, step: int) -> None:
        rows = [json.loads(line) for line in (self._run_dir / METRICS).read_text().splitlines() if line.strip()]
        scores = next((row for row in rows if row["split"] == "valid" and row["step"] == step), None)
        if scores is None:
            return
        value = scores[self._task.metric]
        self._trial.report(value, step)
        if self._trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} with {self._task.metric} {value:.4f}")


@dataclass
class TrialContext:
    """What every trial of one worker shares: ``storage`` records its heartbeats, ``retry`` queues an interrupted one again."""

    settings: SearchSettings
    task: Task
    task_config: dict
    train: TrainConfig
    base_model: dict
    measure_latency: LatencyFn | None
    storage: BaseHeartbeat
    retry: RetryTrial


def _run_trial(trial: optuna.Trial, context: TrialContext) -> list[float]:
    """Build, measure and train one candidate; return the objective values in ``search.objectives`` order."""
    settings, task = context.settings, context.task
    # First: a retry starts with the attributes of the attempt it replaces, its worker's included.
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    candidate = settings.space.suggest(trial, context.base_model)
    model_config = adapt_model_config(candidate.model_config, task)
    trial.set_user_attr("architecture", candidate.summary)
    trial.set_user_attr("model_config", model_config)
    run_dir = settings.out_dir / TRIALS / f"{trial.number:04d}"
    if run_dir.is_symlink() or (os.path.lexists(run_dir) and not run_dir.is_dir()):
        raise SeqmixError(f"{run_dir} is a symbolic link or not a folder; a trial's run is written into a folder of "
                          "its own, so it is left as it is: remove it, or choose another search.out_dir")
    if run_dir.exists():  # left by an attempt of this study that stopped (another study's out_dir is refused first)
        shutil.rmtree(run_dir)
    torch.manual_seed(context.train.seed)
    model = instantiate_model(model_config)
    check_fits(model, task)
    parameters = sum(p.numel() for p in model.parameters())
    trial.set_user_attr("parameters", parameters)
    latency = None
    if settings.measures_latency:
        # Measured before training: an architecture that does not export fails before it costs a run.
        timing = context.measure_latency(
            model, runtime=settings.runtime, length=settings.latency_length or task.seq_len,
            batch_size=settings.latency_batch_size, repeats=settings.latency_repeats, work_dir=run_dir / "export",
        )
        latency = timing.median_ms
        trial.set_user_attr("latency_ms", latency)
        trial.set_user_attr("latency", timing.as_dict())
    train_config = replace(context.train, out_dir=str(run_dir), resume=False, lr=candidate.lr or context.train.lr)
    record = {
        "preset": {"model": f"{settings.study_name}_trial{trial.number}", "task": task.name},
        "model": model_config,
        "task": context.task_config,
        "search": {"study": settings.study_name, "trial": trial.number, "params": trial.params},
    }
    watched = _ReportingTask(task, trial, run_dir, train_config.eval_every) if settings.prunes else task
    result = train(model, watched, train_config, record)
    metric = result.final_eval[task.metric]
    trial.set_user_attr("metric", metric)
    trial.set_user_attr("seconds", result.seconds)
    values = {"metric": metric, "latency": latency, "params": float(parameters)}
    return [values[name] for name in settings.objectives]


def _shown(objective: str, value: float, metric: str) -> str:
    """An objective value for the log, e.g. ``accuracy 0.9531``, ``latency 1.234 ms``, ``params 52,416``."""
    if objective == "latency":
        return f"latency {value:.3f} ms"
    if objective == "params":
        return f"params {int(value):,}"
    return f"{metric} {value:.4f}"


def _running(study: optuna.Study, trial: optuna.Trial) -> bool:
    """False when another worker failed ``trial`` meanwhile.

    That happens when its heartbeats did not reach the storage for ``search.stale_after_s`` (an
    overloaded machine or storage): the trial was then queued again, and the retry counts.
    """
    return study.get_trials(deepcopy=False)[trial.number].state == TrialState.RUNNING


def _tell(study: optuna.Study, trial: optuna.Trial, context: TrialContext, log, values=None, state=None) -> bool:
    """Record how ``trial`` ended; False, said in the log, when another worker had failed it (``_running``)."""
    if not _running(study, trial):
        log(f"trial {trial.number}: another worker failed it, its last heartbeat being older than search.stale_after_s="
            f"{context.settings.stale_after_s}, and queued it again; this result is dropped (raise search.stale_after_s)")
        return False
    study.tell(trial, values, state=state, skip_if_finished=True)
    return True


def run_claimed(study: optuna.Study, trial: optuna.Trial, context: TrialContext, log) -> None:
    """Run a claimed trial and record how it ended; only errors outside TRIAL_ERRORS propagate."""
    started = time.perf_counter()
    try:
        with heartbeat(context.storage, trial):
            values = _run_trial(trial, context)
    except optuna.TrialPruned as pruned:
        if _tell(study, trial, context, log, state=TrialState.PRUNED):
            log(f"trial {trial.number}: {trial.user_attrs.get('architecture', '?')}: {pruned}")
        return
    except TRIAL_ERRORS as error:
        if _running(study, trial):
            trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:1000])
        if _tell(study, trial, context, log, state=TrialState.FAIL):
            log(f"trial {trial.number}: {trial.user_attrs.get('architecture', '?')}: failed: {type(error).__name__}: {error}")
        return
    except BaseException as error:
        # Interrupted (Ctrl-C) or a bug: record it as failed, and queue an interrupted trial
        # again, so that resuming the search runs it.
        if _running(study, trial):
            # An interrupted trial's own message said "continue with train.resume=true", which a search
            # does not do: it queues the trial again, and the retry trains it from the start.
            told = (f"interrupted ({getattr(error, 'signal_name', 'KeyboardInterrupt')}); queued again, and resuming the "
                    "search trains it afresh") if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
            trial.set_user_attr("error", told[:1000])
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            if isinstance(error, KeyboardInterrupt):
                context.retry.requeue(study, study.get_trials(deepcopy=False)[trial.number], "interrupted")
        raise
    if _tell(study, trial, context, log, values=values):
        shown = ", ".join(_shown(name, value, context.task.metric) for name, value in zip(context.settings.objectives, values))
        log(f"trial {trial.number}: {trial.user_attrs['architecture']}: {shown} ({time.perf_counter() - started:.0f} s)")
