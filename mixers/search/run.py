"""One worker of an architecture search: ``run_search`` works on the study until it holds ``n_trials``
trials, then writes the report.

A search is a config in ``conf/search/`` (``# @package _global_``): it picks the base model preset
(blocks, FFN, norms, head), the task and the training budget through the root config's ``model``,
``task`` and ``train`` groups, and describes the study under ``search``: the space, the
objectives, the storage and the sampler (``settings``). The worker opens the study in its storage
(``storage``), claims trials from the budget it shares with other workers (``claims``: exactly
``n_trials``, none run twice, a dead worker's trial run again), runs each one (``trial``: build,
measure, train, score) and writes the leaderboard, the Pareto plot and the best presets
(``report``). Workers share a study through its storage alone: a SQLite file, a journal file on a
shared disk, or a database server (``postgresql+psycopg://...``).

This module never imports ``export``: the latency measurement is passed in by the caller
(``seqmix search`` passes ``seqmix.export.latency.deployed_latency``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from omegaconf import DictConfig, OmegaConf

from seqmix.errors import SeqmixError
from seqmix.search.claims import next_trial
from seqmix.search.report import task_overrides, write_report
from seqmix.search.settings import SearchSettings
from seqmix.search.storage import open_study
from seqmix.search.trial import LatencyFn, TrialContext, claim_out_dir, run_claimed
from seqmix.training.experiment import build_experiment


@dataclass
class SearchOutcome:
    """A finished worker's view of the study and the report files it wrote."""

    study: optuna.Study
    settings: SearchSettings
    metric: str
    trials_run: int
    files: list[Path]
    notes: list[str]


def run_search(config: DictConfig, measure_latency: LatencyFn | None = None, log: Callable[[str], None] = print) -> SearchOutcome:
    """Work on the study ``config.search`` describes until it has ``n_trials`` trials, then write the report.

    Args:
        config: a root config composed with a search config (``compose_search_config``).
        measure_latency: ``(model, runtime=, length=, batch_size=, repeats=, work_dir=) -> Timing``,
            required when ``latency`` is an objective (``export.latency.deployed_latency``).
        log: receives one line per event (trial results, retries, waiting).
    """
    settings = SearchSettings.from_config(config.search)
    if settings.measures_latency and measure_latency is None:
        raise SeqmixError(
            "search.objectives includes latency but no latency measurement was given; "
            "seqmix search passes seqmix.export.latency.deployed_latency"
        )
    if settings.pruner != "none" and not settings.prunes:
        log(f"search.pruner={settings.pruner} is not used: Optuna prunes single-objective studies only, "
            f"and search.objectives={settings.objectives}")
    # Builds the base model once: a bad preset, task or train option fails here, before any trial.
    experiment = build_experiment(config)
    task = experiment.task
    claim_out_dir(settings)
    study, storage = open_study(settings, task, log, experiment.task_config)
    context = TrialContext(
        settings, task, experiment.task_config, experiment.train, OmegaConf.to_container(config.model, resolve=True),
        measure_latency, storage, storage.get_heartbeat_stale_trial_callback(),
    )
    trials_run = 0
    while (trial := next_trial(study, storage, settings, log)) is not None:
        run_claimed(study, trial, context, log)
        trials_run += 1
    files, notes = write_report(study, settings, task.metric, task_overrides(experiment.task_config, task.name))
    return SearchOutcome(study, settings, task.metric, trials_run, files, notes)
