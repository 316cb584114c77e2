"""The ``search`` node of a search config: ``SearchSettings`` (validated), the sampler and pruner it
names, the objectives' directions, and ``compose_search_config`` (the root config with
``conf/search/<name>.yaml`` applied).
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
from omegaconf import DictConfig, OmegaConf

from seqmix.configs import compose_config, config_groups, require_overrides
from seqmix.errors import (SeqmixError, require_choice, require_int, require_path, require_writable_dir,
                           require_writable_file)
from seqmix.search.space import SearchSpace

OBJECTIVES = ("metric", "latency", "params")
SAMPLERS = ("tpe", "nsga2", "random")
PRUNERS = ("none", "median", "hyperband", "successive_halving")
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
"""A study name: it becomes a folder under search.out_dir and the start of preset file names (and of a
glob that finds the old ones), so nothing that walks out of a folder, hides a file or matches others."""

SETTINGS = (
    "study_name", "n_trials", "objectives", "runtime", "latency", "storage", "sampler", "sampler_options",
    "pruner", "pruner_options", "out_dir", "seed", "worker", "top_k", "heartbeat_s", "stale_after_s",
    "retries", "enqueue", "space",
)
LATENCY_SETTINGS = ("length", "batch_size", "repeats")


def compose_search_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The root config with ``conf/search/<name>.yaml`` applied, then ``overrides``.

    An unknown name raises SeqmixError listing the search configs.
    """
    from hydra.errors import HydraException

    searches = config_groups().get("search", [])
    require_choice("search", name, searches)
    require_overrides(overrides)
    try:
        return compose_config([f"+search={name}", *overrides])
    except HydraException as error:
        # e.g. a dict given whole: Hydra merges it into the existing one, new keys need ++key=...
        raise SeqmixError(f"the overrides {list(overrides)} do not apply to search={name}: {error}") from None


def metric_direction(metric: str) -> str:
    """``maximize`` for accuracy, ``minimize`` for losses and bits per byte."""
    return "maximize" if metric == "accuracy" else "minimize"


SQLITE_PREFIX = "sqlite:///"
JOURNAL_PREFIX = "journal:"


def storage_file(url: str) -> Path | None:
    """The file a ``sqlite:///<file>`` or ``journal:<file>`` storage URL names; None for a database server."""
    for prefix in (SQLITE_PREFIX, JOURNAL_PREFIX):
        if url.startswith(prefix):
            return Path(url[len(prefix):]).expanduser()
    return None


def _output_folder(text) -> Path:
    """``search.out_dir`` as a Path, refused first if empty: Path("") would be the current folder
    (``validate`` checks the rest)."""
    require_path("search.out_dir", text)
    return Path(text)


@dataclass
class SearchSettings:
    """The ``search`` node of a search config (see ``conf/search/mqar.yaml`` for every field)."""

    study_name: str
    n_trials: int
    objectives: list[str]
    out_dir: Path
    space: SearchSpace
    runtime: str = "eager"
    latency_length: int | None = None
    latency_batch_size: int = 1
    latency_repeats: int = 7
    storage: str | None = None
    sampler: str = "tpe"
    sampler_options: dict = field(default_factory=dict)
    pruner: str = "none"
    pruner_options: dict = field(default_factory=dict)
    seed: int | None = 0
    worker: int = 0
    top_k: int = 5
    heartbeat_s: int = 10
    stale_after_s: float = 60.0
    retries: int = 2
    enqueue: list[dict] = field(default_factory=list)

    @classmethod
    def from_config(cls, node: DictConfig) -> SearchSettings:
        options = OmegaConf.to_container(node, resolve=True)
        unknown = sorted(set(options) - set(SETTINGS))
        if unknown:
            raise SeqmixError(f"search has no option {unknown[0]!r}; accepted options are {list(SETTINGS)}")
        missing = [key for key in ("study_name", "n_trials", "objectives", "out_dir", "space") if options.get(key) is None]
        if missing:
            raise SeqmixError(f"search.{missing[0]} is required; set it in the search config or as search.{missing[0]}=...")
        for key in ("sampler_options", "pruner_options"):
            options[key] = options.get(key) or {}
        options["enqueue"] = options.get("enqueue") or []
        latency = options.pop("latency", None) or {}
        unknown = sorted(set(latency) - set(LATENCY_SETTINGS))
        if unknown:
            raise SeqmixError(f"search.latency has no option {unknown[0]!r}; accepted options are {list(LATENCY_SETTINGS)}")
        settings = cls(
            **{**options, "out_dir": _output_folder(options["out_dir"]), "space": SearchSpace.from_config(options["space"])},
            latency_length=latency.get("length"),
            latency_batch_size=latency.get("batch_size", 1),
            latency_repeats=latency.get("repeats", 7),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        if not isinstance(self.study_name, str) or not STUDY_NAME.fullmatch(self.study_name):
            raise SeqmixError(f"search.study_name={self.study_name!r} is not valid; expected 1 to 100 letters, digits, '_', "
                              "'-' and '.', starting with a letter or digit: it names the study's folder and preset files")
        require_writable_dir("search.out_dir", self.out_dir)
        if isinstance(self.storage, str) and re.fullmatch(r"sqlite:(//|///:memory:.*|///)", self.storage.strip()):
            # Accepted before: the study vanished when the search ended (no resume, no other worker),
            # and ':memory:' was even taken for a file name in the current folder.
            raise SeqmixError(f"search.storage={self.storage!r} keeps the study in memory, lost when the search ends and "
                              "shared with no other worker; give a file (sqlite:///<path>) or leave search.storage unset "
                              "(<search.out_dir>/study.db)")
        file = storage_file(self.storage) if isinstance(self.storage, str) else None
        if file is not None:
            # Its folder also takes the lock file beside it: checked now, not when the first worker opens it.
            require_writable_file("search.storage file", file)
        require_int("search", "n_trials", self.n_trials)
        require_int("search", "top_k", self.top_k)
        require_int("search", "worker", self.worker, 0)
        require_int("search", "retries", self.retries, 0)
        require_int("search.latency", "batch_size", self.latency_batch_size)
        require_int("search.latency", "repeats", self.latency_repeats)
        if self.latency_length is not None:
            require_int("search.latency", "length", self.latency_length)
        # Each name is checked before the set of them is taken: a list among them is unhashable.
        if not isinstance(self.objectives, (list, tuple)) or not self.objectives:
            raise SeqmixError(f"search.objectives={self.objectives!r} must be a list naming each objective once, "
                              f"from {list(OBJECTIVES)}")
        for objective in self.objectives:
            require_choice("search.objectives", objective, OBJECTIVES)
        if len(set(self.objectives)) != len(self.objectives):
            raise SeqmixError(f"search.objectives={self.objectives!r} must name each objective once, from {list(OBJECTIVES)}")
        require_choice("search.sampler", self.sampler, SAMPLERS)
        require_choice("search.pruner", self.pruner, PRUNERS)
        # Options of no pruner would go nowhere without a word (a pruner of a multi-objective study is
        # unused too, and the search says so when it starts: a sweep may mix both kinds of study).
        if self.pruner == "none" and self.pruner_options:
            raise SeqmixError(f"search.pruner_options={self.pruner_options!r} would not be used: search.pruner=none; "
                              f"name a pruner, one of {sorted(set(PRUNERS) - {'none'})}")
        # Whole seconds: Optuna's RDB storages take no other heartbeat interval.
        require_int("search", "heartbeat_s", self.heartbeat_s, meaning="seconds between a running trial's heartbeats")
        if isinstance(self.stale_after_s, bool) or not isinstance(self.stale_after_s, (int, float)) or not self.stale_after_s > 2 * self.heartbeat_s:
            raise SeqmixError(
                f"search: stale_after_s={self.stale_after_s!r} is not valid; expected a number of seconds more than twice "
                f"heartbeat_s={self.heartbeat_s} (a live trial must never look stale)"
            )
        if not isinstance(self.enqueue, list) or not all(isinstance(params, dict) for params in self.enqueue):
            raise SeqmixError(f"search.enqueue={self.enqueue!r} must be a list of {{parameter: value}} trials to run first")
        for index, params in enumerate(self.enqueue):
            self.space.check_trial(params, f"search.enqueue[{index}]")
        if self.seed is not None:
            require_int("search", "seed", self.seed, 0, "seeds the sampler; null for an unseeded one")
        # Built once here, so that their options are refused before the storage is created (a
        # pruner's too where this study would not use it: a sweep may run it with one objective).
        make_sampler(self)
        if self.pruner != "none":
            _configured_pruner(self)

    @property
    def measures_latency(self) -> bool:
        return "latency" in self.objectives

    @property
    def prunes(self) -> bool:
        """Optuna prunes single-objective studies only, so a pruner is used only then."""
        return self.pruner != "none" and len(self.objectives) == 1


def make_sampler(settings: SearchSettings, previous_trials: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded from (``search.seed``, ``search.worker``, ``previous_trials``).

    Seeding from the worker index and the number of trials the study already holds keeps parallel
    and restarted workers from proposing the trials another worker or an earlier run proposed.
    """
    seed = None
    if settings.seed is not None:
        seed = int(np.random.SeedSequence([settings.seed, settings.worker, previous_trials]).generate_state(1)[0])
    options = dict(settings.sampler_options)
    if settings.sampler == "tpe":
        # Grouped multivariate TPE models the conditional space (mixer knobs exist only with their
        # mixers); the constant liar keeps parallel workers from piling onto one point.
        options = {"multivariate": True, "group": True, "constant_liar": True, **options}
        cls = optuna.samplers.TPESampler
    elif settings.sampler == "nsga2":
        cls = optuna.samplers.NSGAIISampler
    else:
        cls = optuna.samplers.RandomSampler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return cls(seed=seed, **options)
        except (TypeError, ValueError) as error:
            raise SeqmixError(
                f"search.sampler_options={settings.sampler_options!r} do not fit search.sampler={settings.sampler}: {error}"
            ) from None


def make_pruner(settings: SearchSettings) -> optuna.pruners.BasePruner:
    """The configured pruner when the study has one objective; never pruning otherwise."""
    if not settings.prunes:
        return optuna.pruners.NopPruner()
    return _configured_pruner(settings)


def _configured_pruner(settings: SearchSettings) -> optuna.pruners.BasePruner:
    """search.pruner (not ``none``) built with search.pruner_options; a SeqmixError naming options it does not take."""
    cls = {
        "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    }[settings.pruner]
    try:
        return cls(**settings.pruner_options)
    except (TypeError, ValueError) as error:
        raise SeqmixError(
            f"search.pruner_options={settings.pruner_options!r} do not fit search.pruner={settings.pruner}: {error}"
        ) from None
