"""Architecture search with Optuna: which mixers, how wide and how deep, against deployed latency.

A search is a config in ``conf/search/`` (``# @package _global_``): it picks the base model preset
(blocks, FFN, norms, head), the task and the training budget through the root config's ``model``,
``task`` and ``train`` groups, and describes the study under ``search``: the space, the
objectives, the storage and the sampler. Each trial builds one candidate from the space, measures
it, trains it for the fixed budget in ``<out_dir>/trials/<n>/`` (an ordinary run directory), and
reports the task's validation metric, the deployed latency and/or the parameter count.

Workers share a study through its storage: a SQLite file in out_dir by default, any Optuna
database URL, or ``journal:<file>`` (a JournalFileBackend log, e.g. on a shared disk). Each
worker claims trials until the study holds ``n_trials`` of them, so N workers together run
exactly ``n_trials``: with file storages the claim (count, then ask) holds a lock file beside
the storage; a database server has no such lock, so two workers claiming in the same instant may
run one trial too many each. A running trial writes a heartbeat into its user attributes; a
trial whose heartbeat is older than ``stale_after_s`` was left by a killed worker and is failed
and queued again with the same parameters, so a killed search resumes where it stopped (Optuna's
own heartbeat covers database storages only, not journal files, hence one mechanism for all).

This module never imports ``export``: the latency measurement is passed in by the caller
(``seqmix search`` passes ``seqmix.export.latency.deployed_latency``).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from seqmix.configs import CONF_DIR, compose_config, config_groups
from seqmix.contract import Mixer
from seqmix.errors import SeqmixError, choice_error, require_int
from seqmix.model.checkpoint import instantiate_model
from seqmix.model.description import part_defaults
from seqmix.registry import list_mixers, mixer_class
from seqmix.tables import records_table
from seqmix.tasks.base import Task
from seqmix.timing import Timing
from seqmix.training.experiment import adapt_model_config, build_experiment, check_fits
from seqmix.training.loop import METRICS, TrainConfig, train
from seqmix.training.runs import write_csv

try:
    import optuna
    from optuna.trial import FrozenTrial, TrialState
except ImportError as error:
    raise SeqmixError(f"architecture search needs optuna ({error}): pip install optuna matplotlib") from None

OBJECTIVES = ("metric", "latency", "params")
SAMPLERS = ("tpe", "nsga2", "random")
PRUNERS = ("none", "median", "hyperband", "successive_halving")
SETTINGS = (
    "study_name", "n_trials", "objectives", "runtime", "latency", "storage", "sampler", "sampler_options",
    "pruner", "pruner_options", "out_dir", "seed", "worker", "top_k", "heartbeat_s", "stale_after_s",
    "retries", "enqueue", "space",
)
LATENCY_SETTINGS = ("length", "batch_size", "repeats")
RANGE_KEYS = ("low", "high", "step", "log")
# The model's searchable sizes and the integer floor of each; the mixers add their own knobs
# (``Mixer.search_knobs``), and lr is a positive float.
MODEL_KNOBS = {"pattern_length": 1, "repeats": 1, "d_model": 1}
# A crash or a NaN in one trial fails that trial only (SeqmixError is a ValueError; torch raises
# RuntimeErrors, out-of-memory included). Anything else is a bug and stops the search.
TRIAL_ERRORS = (ValueError, RuntimeError, ArithmeticError, MemoryError)
LEADERBOARD = "leaderboard"
PARETO_PNG = "pareto.png"
PRESETS = "presets"
TRIALS = "trials"
CLAIM_POLL_S = 1.0
SQLITE_MAGIC = b"SQLite format 3\x00"

LatencyFn = Callable[..., Timing]
"""``(model, runtime=, length=, batch_size=, repeats=, work_dir=) -> Timing``; its median is the objective."""


def compose_search_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The root config with ``conf/search/<name>.yaml`` applied, then ``overrides``.

    An unknown name raises SeqmixError listing the search configs.
    """
    from hydra.errors import HydraException

    searches = config_groups().get("search", [])
    if name not in searches:
        raise choice_error("search", name, searches)
    try:
        return compose_config([f"+search={name}", *overrides])
    except HydraException as error:
        # e.g. a dict given whole: Hydra merges it into the existing one, new keys need ++key=...
        raise SeqmixError(f"the overrides {list(overrides)} do not apply to search={name}: {error}") from None


# --- the space ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Dimension:
    """One searched value: categorical ``choices``, or an int/float range ``low``..``high``."""

    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    def suggest(self, trial: optuna.Trial, name: str):
        if self.choices is not None:
            return trial.suggest_categorical(name, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def values(self) -> tuple:
        """The bounds or choices, for validation."""
        return self.choices if self.choices is not None else (self.low, self.high)

    def description(self) -> dict:
        """The dimension as JSON: ``{"choices": [...]}`` or ``{"low", "high", "step", "log"}``."""
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "step": self.step, "log": self.log}


def _dimension(key: str, entry: Any) -> Dimension:
    """A Dimension from a space entry: a list of choices, {low, high, step?, log?}, or one fixed value."""
    where = f"search.space.{key}"
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - set(RANGE_KEYS))
        if unknown or not {"low", "high"} <= set(entry):
            raise SeqmixError(f"{where}={entry!r} is not a range; a range has the keys {list(RANGE_KEYS)} (low and high required)")
        low, high = entry["low"], entry["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
            raise SeqmixError(f"{where}: low={low!r}, high={high!r} must be numbers with low <= high")
        return Dimension(low=low, high=high, step=entry.get("step"), log=bool(entry.get("log", False)))
    choices = tuple(entry) if isinstance(entry, list) else (entry,)
    if not choices:
        raise SeqmixError(f"{where} is empty; give at least one value")
    return Dimension(choices=choices)


@dataclass
class Candidate:
    """One architecture from the space.

    Attributes:
        model_config: a complete ``conf/model`` config (a model description).
        pattern: the mixer of each layer slot; the model repeats it ``repeats`` times.
        repeats, d_model: depth = len(pattern) · repeats; D.
        lr: the learning rate to train it with; None keeps train.lr.
    """

    model_config: dict
    pattern: list[str]
    repeats: int
    d_model: int
    lr: float | None

    @property
    def summary(self) -> str:
        """E.g. ``tcn,tcn,softmax_attention ×2 d=64``."""
        return f"{','.join(self.pattern)} ×{self.repeats} d={self.d_model}"


def mixer_class_of(entry: dict) -> type[Mixer] | None:
    """The mixer class a model config's mixer entry ``{"mixer": <registered name>, ...}`` builds (None for another entry)."""
    return mixer_class(entry["mixer"]) if isinstance(entry.get("mixer"), str) else None


def default_mixer_config(name: str) -> dict:
    """The composed ``conf/mixer/<name>.yaml`` of a registered mixer, or its code defaults when it has no file."""
    if (CONF_DIR / "mixer" / f"{name}.yaml").is_file():
        return OmegaConf.to_container(compose_config([f"+mixer@picked={name}"]).picked)
    return part_defaults("mixer", name)


def integer_knobs() -> dict[str, int]:
    """Every searchable integer knob and its floor: the model's sizes and every registered mixer's knobs."""
    knobs = dict(MODEL_KNOBS)
    for name in list_mixers():
        knobs.update(mixer_class(name).search_knobs({}))
    return knobs


def space_keys() -> tuple[str, ...]:
    """The entries ``search.space`` may have."""
    return ("mixers", *integer_knobs(), "lr")


@dataclass
class SearchSpace:
    """What a trial chooses (``search.space``); every entry is optional.

    Keys: ``mixers`` (the choices of every layer slot, registered mixer names; absent: the base
    preset's layers and mixers), ``pattern_length`` (layer slots; absent: the base pattern's),
    ``repeats`` (depth = pattern_length · repeats), ``d_model``, ``lr``, and every knob a
    registered mixer declares (``Mixer.search_knobs``; built in: ``chunk_size`` for the EMA/CEMA
    chunk and gated attention's C, ``ema_order`` N, ``tcn_kernel`` K, also the dilation base,
    ``tcn_depth``). A mixer knob is only asked for when a layer uses it. With ``mixers``,
    the block's residual rule becomes ``auto`` (gated for gated attention, pre for the others),
    the one rule every mixer can take.
    """

    dimensions: dict[str, Dimension]

    @classmethod
    def from_config(cls, node: DictConfig | dict) -> SearchSpace:
        entries = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        unknown = sorted(set(entries) - set(space_keys()))
        if unknown:
            raise SeqmixError(f"search.space has no entry {unknown[0]!r}; valid entries are {list(space_keys())}")
        dimensions = {key: _dimension(key, entry) for key, entry in entries.items()}
        registered = list_mixers()
        for key, dimension in dimensions.items():
            if key == "mixers":
                if dimension.choices is None:
                    raise SeqmixError("search.space.mixers must list mixer names, not a range")
                for name in dimension.choices:
                    if name not in registered:
                        raise choice_error("search.space.mixers", name, registered)
            elif key == "lr":
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in dimension.values()):
                    raise SeqmixError(f"search.space.lr={entries[key]!r} is not valid; expected positive learning rates")
            else:
                for value in dimension.values():
                    require_int("search.space", key, value, integer_knobs()[key])
        return cls(dimensions)

    def suggest(self, trial: optuna.Trial, base_model: dict) -> Candidate:
        """Ask ``trial`` for one candidate; ``base_model`` (a resolved model config) fills the rest."""
        config = copy.deepcopy(base_model)
        base_pattern = list(config["layers"])
        if "mixers" in self.dimensions:
            slots = self._pick(trial, "pattern_length", len(base_pattern))
            pattern = [self.dimensions["mixers"].suggest(trial, f"layer_{i}") for i in range(slots)]
            mixers = {name: default_mixer_config(name) for name in dict.fromkeys(pattern)}
            if isinstance(config.get("block"), dict):
                # Only `auto` suits every mixer: gated for gated attention, which adds its own residual, pre for the rest.
                config["block"]["residual"] = "auto"
        else:
            pattern = base_pattern
            mixers = copy.deepcopy(config.get("mixers") or {})
            for name in pattern:
                if name not in mixers and name in list_mixers():
                    mixers[name] = default_mixer_config(name)
        base_depth = config.get("depth") or len(base_pattern)
        repeats = self._pick(trial, "repeats", max(1, base_depth // len(base_pattern)))
        d_model = self._pick(trial, "d_model", config["d_model"])
        # Each layer's mixer says which knobs it uses; a knob no layer uses is never asked for.
        classes = {name: cls for name in dict.fromkeys(pattern) if (cls := mixer_class_of(mixers.get(name, {}))) is not None}
        used = {knob for name, cls in classes.items() for knob in cls.search_knobs(mixers[name])}
        knobs = {knob: self.dimensions[knob].suggest(trial, knob) for knob in integer_knobs() if knob in used and knob in self.dimensions}
        for name, cls in classes.items():
            cls.apply_search_knobs(mixers[name], knobs)
        config.update(d_model=d_model, layers=pattern, depth=len(pattern) * repeats, mixers=mixers)
        lr = self.dimensions["lr"].suggest(trial, "lr") if "lr" in self.dimensions else None
        return Candidate(config, pattern, repeats, d_model, lr)

    def description(self) -> dict[str, dict]:
        """Every entry's ``Dimension.description``, as a study stores it to compare a later search's space with."""
        return {key: dimension.description() for key, dimension in sorted(self.dimensions.items())}

    def _pick(self, trial: optuna.Trial, key: str, default):
        return self.dimensions[key].suggest(trial, key) if key in self.dimensions else default


# --- the study settings ------------------------------------------------------------------


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
    heartbeat_s: float = 10.0
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
            **{**options, "out_dir": Path(options["out_dir"]), "space": SearchSpace.from_config(options["space"])},
            latency_length=latency.get("length"),
            latency_batch_size=latency.get("batch_size", 1),
            latency_repeats=latency.get("repeats", 7),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        require_int("search", "n_trials", self.n_trials)
        require_int("search", "top_k", self.top_k)
        require_int("search", "worker", self.worker, 0)
        require_int("search", "retries", self.retries, 0)
        require_int("search.latency", "batch_size", self.latency_batch_size)
        require_int("search.latency", "repeats", self.latency_repeats)
        if self.latency_length is not None:
            require_int("search.latency", "length", self.latency_length)
        if not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise SeqmixError(f"search.objectives={self.objectives!r} must name each objective once, from {list(OBJECTIVES)}")
        for objective in self.objectives:
            if objective not in OBJECTIVES:
                raise choice_error("search.objectives", objective, OBJECTIVES)
        if self.sampler not in SAMPLERS:
            raise choice_error("search.sampler", self.sampler, SAMPLERS)
        if self.pruner not in PRUNERS:
            raise choice_error("search.pruner", self.pruner, PRUNERS)
        if not (self.heartbeat_s > 0 and self.stale_after_s > 2 * self.heartbeat_s):
            raise SeqmixError(
                f"search: heartbeat_s={self.heartbeat_s} and stale_after_s={self.stale_after_s} must be positive, "
                "with stale_after_s more than twice heartbeat_s (a live trial must never look stale)"
            )
        if not isinstance(self.enqueue, list) or not all(isinstance(params, dict) for params in self.enqueue):
            raise SeqmixError(f"search.enqueue={self.enqueue!r} must be a list of {{parameter: value}} trials to run first")

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


# --- storage and the shared trial budget ---------------------------------------------------


def open_storage(settings: SearchSettings) -> tuple[optuna.storages.BaseStorage, Path | None]:
    """The study's storage and the lock file that serializes claims (None for a database server).

    ``search.storage``: None (``<out_dir>/study.db``), ``sqlite:///<file>``, ``journal:<file>``, or
    any other Optuna database URL (``postgresql://...``, ``mysql://...``).
    """
    url = settings.storage
    if url is None:
        settings.out_dir.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(settings.out_dir / 'study.db').resolve()}"
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        with readable_storage(str(path)):
            # The journal is replayed here: a file of other lines fails now, not in a trial.
            backend = optuna.storages.journal.JournalFileBackend(str(path))
            return optuna.storages.journal.JournalStorage(backend), path
    if "://" not in url:
        raise SeqmixError(
            f"search.storage={url!r} is not valid; expected null (a SQLite file in out_dir), sqlite:///<file>, "
            "journal:<file>, or a database URL such as postgresql://user@host/db"
        )
    lock = Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None
    # Several processes write one SQLite file: wait for its lock instead of failing after 5 s.
    engine_kwargs = {"connect_args": {"timeout": 60}} if lock is not None else None
    if lock is not None:
        lock.parent.mkdir(parents=True, exist_ok=True)
    # Workers starting together would otherwise race to create the tables of a new file.
    with _claim_lock(lock), readable_storage(str(lock) if lock is not None else url):
        if lock is not None:
            check_sqlite_file(lock)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs), lock


def _storage_errors() -> tuple[type[BaseException], ...]:
    """What Optuna and its backends raise on a storage they cannot read (Optuna asserts on some journals)."""
    import sqlalchemy.exc

    return (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error, ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError)


@contextmanager
def readable_storage(where: str) -> Iterator[None]:
    """Turn the errors of a storage that cannot be read (corrupted, truncated, another program's file) into SeqmixError."""
    try:
        yield
    except SeqmixError:
        raise
    except _storage_errors() as error:
        detail = str(error).splitlines()[0][:200] if str(error) else ""
        raise SeqmixError(
            f"search.storage: {where} cannot be read as an Optuna study ({type(error).__name__}: {detail}); "
            "it is corrupted, truncated or not a study's storage. Move it away to start a new study, "
            "or point search.storage (or search.out_dir) elsewhere"
        ) from None


def check_sqlite_file(path: Path) -> None:
    """Raise unless ``path`` is missing, empty (a new study) or a whole SQLite database.

    SQLite would take a file shorter than its header for an empty database and write a new study
    over it; a truncated one fails later, at some query. Checked under a read transaction, so a
    worker writing the file meanwhile cannot make it look torn. The connection may write: SQLite
    rolls back the journal a killed writer left, which a read-only connection refuses to do.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb") as handle:
        if handle.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
            raise sqlite3.DatabaseError("file is not a database")
    connection = sqlite3.connect(path, timeout=60)
    connection.text_factory = lambda raw: raw.decode("utf-8", errors="replace")
    try:
        connection.execute("BEGIN")
        problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
        pages = connection.execute("PRAGMA page_count").fetchone()[0] * connection.execute("PRAGMA page_size").fetchone()[0]
        # In WAL mode the newest pages live in the -wal file, not yet in this one.
        whole = connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal"
        size = path.stat().st_size
    finally:
        connection.close()
    if problems != ["ok"]:
        raise sqlite3.DatabaseError(f"database disk image is malformed: {problems[0]}")
    if whole and pages != size:
        raise sqlite3.DatabaseError(f"the file holds {size} bytes, its header says {pages}")


@contextmanager
def _claim_lock(storage_file: Path | None) -> Iterator[None]:
    """Hold the lock file beside a file storage (an O_EXCL file, safe on NFS); nothing for a server."""
    if storage_file is None:
        yield
        return
    # Not the storage's own lock file: the journal backend takes that one inside every write.
    lock = optuna.storages.journal.JournalFileOpenLock(f"{storage_file}.claim")
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def budget_trials(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that use up ``n_trials``: all but those a retry replaced."""
    retried = {t.user_attrs.get("retry_of") for t in trials}
    return [t for t in trials if t.number not in retried]


def _requeue(study: optuna.Study, trial: FrozenTrial, retries: int) -> bool:
    """Queue ``trial``'s parameters again unless it used up its retries; True when queued."""
    attempt = trial.user_attrs.get("attempt", 1)
    if attempt > retries:
        return False
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "attempt": attempt + 1})
    return True


def fail_stale_trials(study: optuna.Study, storage: optuna.storages.BaseStorage, settings: SearchSettings, log) -> None:
    """Fail the running trials whose heartbeat is older than ``stale_after_s`` and queue them again."""
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        last = trial.user_attrs.get("heartbeat", trial.datetime_start.timestamp())
        if now - last < settings.stale_after_s:
            continue
        # FrozenTrial's storage id is private in Optuna's API, but the storage calls need it.
        trial_id = trial._trial_id
        try:
            storage.set_trial_user_attr(trial_id, "error", f"no heartbeat for {now - last:.0f} s: its worker stopped")
            if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first
        queued = _requeue(study, trial, settings.retries)
        log(f"trial {trial.number}: its worker stopped (no heartbeat for {now - last:.0f} s); "
            + ("queued again" if queued else f"not retried after {settings.retries} retries"))


def _next_trial(study: optuna.Study, storage, lock_file: Path | None, settings: SearchSettings, log) -> optuna.Trial | None:
    """Claim the next trial of the shared budget, or None when the study has ``n_trials`` and none runs.

    Queued trials (retries, ``search.enqueue``) come first. With the budget used up, wait while
    others run: one of them may turn out stale and come back as a retry.
    """
    waiting_said = False
    while True:
        with _claim_lock(lock_file):
            fail_stale_trials(study, storage, settings, log)
            trials = study.get_trials(deepcopy=False)
            queued = any(t.state == TrialState.WAITING for t in trials)
            if queued or len(budget_trials(trials)) < settings.n_trials:
                return study.ask()
            running = [t.number for t in trials if t.state == TrialState.RUNNING]
        if not running:
            return None
        if not waiting_said:
            log(f"all {settings.n_trials} trials claimed; waiting for trials {running} to finish")
            waiting_said = True
        time.sleep(CLAIM_POLL_S)


@contextmanager
def _heartbeat(trial: optuna.Trial, interval_s: float) -> Iterator[None]:
    """Write ``heartbeat`` (unix time) into the trial's user attributes every ``interval_s`` while it runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval_s):
            try:
                trial.set_user_attr("heartbeat", time.time())
            except Exception:  # a storage hiccup: the next beat tries again; only silence marks a trial stale
                continue

    trial.set_user_attr("heartbeat", time.time())
    thread = threading.Thread(target=beat, name=f"heartbeat-trial-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# --- one trial -------------------------------------------------------------------------------


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
class _Context:
    """What every trial of one worker shares."""

    settings: SearchSettings
    task: Task
    task_config: dict
    train: TrainConfig
    base_model: dict
    measure_latency: LatencyFn | None


def _run_trial(trial: optuna.Trial, context: _Context) -> list[float]:
    """Build, measure and train one candidate; return the objective values in ``search.objectives`` order."""
    settings, task = context.settings, context.task
    candidate = settings.space.suggest(trial, context.base_model)
    model_config = adapt_model_config(candidate.model_config, task)
    trial.set_user_attr("architecture", candidate.summary)
    trial.set_user_attr("model_config", model_config)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    run_dir = settings.out_dir / TRIALS / f"{trial.number:04d}"
    shutil.rmtree(run_dir, ignore_errors=True)  # left by an older study in this out_dir
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


def _run_claimed(study: optuna.Study, trial: optuna.Trial, context: _Context, log) -> None:
    """Run a claimed trial and record how it ended; only errors outside TRIAL_ERRORS propagate."""
    started = time.perf_counter()
    try:
        with _heartbeat(trial, context.settings.heartbeat_s):
            values = _run_trial(trial, context)
    except optuna.TrialPruned as pruned:
        study.tell(trial, state=TrialState.PRUNED)
        log(f"trial {trial.number}: {trial.user_attrs.get('architecture', '?')}: {pruned}")
        return
    except TRIAL_ERRORS as error:
        trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:1000])
        study.tell(trial, state=TrialState.FAIL)
        log(f"trial {trial.number}: {trial.user_attrs.get('architecture', '?')}: failed: {type(error).__name__}: {error}")
        return
    except BaseException as error:
        # Interrupted (Ctrl-C) or a bug: record it as failed, and queue an interrupted trial
        # again, so that resuming the search runs it.
        trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:1000])
        study.tell(trial, state=TrialState.FAIL)
        if isinstance(error, KeyboardInterrupt):
            _requeue(study, study.get_trials(deepcopy=False)[trial.number], context.settings.retries)
        raise
    study.tell(trial, values)
    shown = ", ".join(_shown(name, value, context.task.metric) for name, value in zip(context.settings.objectives, values))
    log(f"trial {trial.number}: {trial.user_attrs['architecture']}: {shown} ({time.perf_counter() - started:.0f} s)")


# --- the search ------------------------------------------------------------------------------


@dataclass
class SearchOutcome:
    """A finished worker's view of the study and the report files it wrote."""

    study: optuna.Study
    settings: SearchSettings
    metric: str
    trials_run: int
    files: list[Path]
    notes: list[str]


def metric_direction(metric: str) -> str:
    """``maximize`` for accuracy, ``minimize`` for losses and bits per byte."""
    return "maximize" if metric == "accuracy" else "minimize"


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
    context = _Context(
        settings, task, experiment.task_config, experiment.train, OmegaConf.to_container(config.model, resolve=True),
        measure_latency,
    )
    study, storage, lock_file = open_study(settings, task)
    trials_run = 0
    while (trial := _next_trial(study, storage, lock_file, settings, log)) is not None:
        _run_claimed(study, trial, context, log)
        trials_run += 1
    with _claim_lock(lock_file):
        files, notes = write_report(study, settings, task.metric, task_overrides(experiment.task_config, task.name))
    return SearchOutcome(study, settings, task.metric, trials_run, files, notes)


def open_study(settings: SearchSettings, task: Task) -> tuple[optuna.Study, optuna.storages.BaseStorage, Path | None]:
    """The study ``settings`` name, created or continued, with ``search.enqueue`` queued; its storage and claim lock file.

    A storage that cannot be read is refused (``readable_storage``), and so is a stored study made
    with other objectives, another task or another search space (``check_study``), before any trial runs.
    """
    storage, lock_file = open_storage(settings)
    directions = [metric_direction(task.metric) if name == "metric" else "minimize" for name in settings.objectives]
    with _claim_lock(lock_file):
        with readable_storage(str(lock_file) if lock_file is not None else str(settings.storage)):
            try:
                previous_trials = len(storage.get_all_trials(storage.get_study_id_from_name(settings.study_name), deepcopy=False))
            except KeyError:  # a new study
                previous_trials = 0
            study = optuna.create_study(
                storage=storage, study_name=settings.study_name, directions=directions, load_if_exists=True,
                sampler=make_sampler(settings, previous_trials), pruner=make_pruner(settings),
            )
            check_study(study, settings, task)
        for params in settings.enqueue:
            if len(budget_trials(study.get_trials(deepcopy=False))) < settings.n_trials:
                study.enqueue_trial(params, skip_if_exists=True)
    return study, storage, lock_file


def check_study(study: optuna.Study, settings: SearchSettings, task: Task) -> None:
    """Refuse to continue a stored study with other objectives, another task or another search space; record them on a new one.

    A study stored before its space was recorded takes this search's space.
    """
    wanted = {"objectives": settings.objectives, "metric": task.metric, "task": task.name}
    stored = {key: study.user_attrs.get(key) for key in wanted}
    if all(value is None for value in stored.values()):
        for key, value in wanted.items():
            study.set_user_attr(key, value)
    elif stored != wanted:
        raise SeqmixError(
            f"study {settings.study_name!r} in the storage was made with {stored}, but this search has {wanted}; "
            "choose another search.study_name or search.storage"
        )
    # As the storage gives it back (JSON: tuples become lists).
    space = json.loads(json.dumps(settings.space.description()))
    stored_space = study.user_attrs.get("space")
    if stored_space is None:
        study.set_user_attr("space", space)
        return
    differing = space_differences(stored_space, space) if isinstance(stored_space, dict) else [f"the study's space is {stored_space!r}"]
    if differing:
        raise SeqmixError(
            f"study {settings.study_name!r} in the storage was made with another search space: "
            + "; ".join(differing)
            + ". Its trials were sampled from the stored space: search that space again, or choose another "
            "search.study_name or search.storage"
        )


def space_differences(stored: dict, current: dict) -> list[str]:
    """One line per parameter whose dimension differs, e.g. ``search.space.d_model is [16, 32], the study's [16]``."""
    lines = []
    for key in sorted(set(stored) | set(current)):
        if stored.get(key) == current.get(key):
            continue
        before = _dimension_text(stored[key]) if key in stored else "absent"
        now = _dimension_text(current[key]) if key in current else "absent"
        lines.append(f"search.space.{key} is {now}, the study's {before}")
    return lines


def _dimension_text(description: dict) -> str:
    """A stored dimension as a space entry reads: ``[16, 32]`` or ``{low: 0.001, high: 0.01, log: true}``."""
    if "choices" in description:
        return json.dumps(description["choices"])
    parts = [f"{key}: {json.dumps(description.get(key))}" for key in ("low", "high", "step", "log") if description.get(key) not in (None, False)]
    return "{" + ", ".join(parts) + "}"


# --- the report ------------------------------------------------------------------------------


def _settings_text(params: dict) -> str:
    """The sampled knobs that the architecture summary does not show, e.g. ``chunk_size=16 lr=3.2e-03``."""
    shown = {"pattern_length", "repeats", "d_model"}
    parts = []
    for name, value in sorted(params.items()):
        if name in shown or name.startswith("layer_"):
            continue
        parts.append(f"{name}={value:.2e}" if isinstance(value, float) else f"{name}={value}")
    return " ".join(parts)


def _metric_of(trial: FrozenTrial) -> float | None:
    """The final metric of a finished trial, or the last reported one of a pruned trial."""
    if "metric" in trial.user_attrs:
        return trial.user_attrs["metric"]
    if trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """The completed trials no other trial beats on every objective (the best one for a single objective)."""
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    return study.best_trials


def leaderboard_rows(study: optuna.Study, metric: str) -> list[dict]:
    """One row per claimed trial: completed ones best metric first, then pruned, running and failed.

    ``latency_ms`` is the median deployed latency, ``latency_low_ms`` and ``latency_high_ms`` the
    fastest and the slowest timed call; None where latency was not measured.
    """
    front = {t.number for t in pareto_front(study)}
    sign = -1.0 if metric_direction(metric) == "maximize" else 1.0
    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2, TrialState.FAIL: 3}
    trials = [t for t in study.get_trials(deepcopy=False) if t.state in order]

    def rank(trial: FrozenTrial):
        value = _metric_of(trial)
        return order[trial.state], sign * value if value is not None and trial.state == TrialState.COMPLETE else 0.0, trial.number

    rows = []
    for trial in sorted(trials, key=rank):
        attrs = trial.user_attrs
        note = attrs.get("error", "")
        if "retry_of" in attrs:
            note = f"retry of trial {attrs['retry_of']}" + (f"; {note}" if note else "")
        rows.append({
            "trial": trial.number,
            "state": trial.state.name.lower(),
            "architecture": attrs.get("architecture", ""),
            "params": attrs.get("parameters"),
            metric: _metric_of(trial),
            "latency_ms": attrs.get("latency_ms"),
            "latency_low_ms": attrs.get("latency", {}).get("low_ms"),
            "latency_high_ms": attrs.get("latency", {}).get("high_ms"),
            "settings": _settings_text(trial.params),
            "pareto": "yes" if trial.number in front else "",
            "seconds": round(attrs["seconds"]) if "seconds" in attrs else None,
            "note": note,
        })
    return rows


def _write_atomic(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text)
    os.replace(staging, path)


def plot_pareto(study: optuna.Study, metric: str, runtime: str, path: Path) -> Path:
    """Metric against latency (or parameters when latency was not measured), the front labelled.

    Every completed trial is a grey point; the study's Pareto front over its objectives is drawn
    in colour, joined in order of the x axis, and labelled by architecture.
    """
    try:
        import matplotlib
    except ImportError:
        raise SeqmixError("the Pareto plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    by_latency = all("latency_ms" in t.user_attrs for t in done)
    x_key, x_label = ("latency_ms", f"latency on {runtime} (ms)") if by_latency else ("parameters", "parameters")
    front = sorted(pareto_front(study), key=lambda t: t.user_attrs[x_key])
    figure, axes = plt.subplots(figsize=(8, 5.5))
    axes.scatter([t.user_attrs[x_key] for t in done], [t.user_attrs["metric"] for t in done], color="0.7", label="trials")
    axes.plot([t.user_attrs[x_key] for t in front], [t.user_attrs["metric"] for t in front], "o-", color="tab:blue", label="Pareto front")
    for index, trial in enumerate(front):
        # Labels alternate above and below the line, so neighbouring points do not overwrite each other.
        axes.annotate(f"#{trial.number} {trial.user_attrs['architecture']}", (trial.user_attrs[x_key], trial.user_attrs["metric"]),
                      textcoords="offset points", xytext=(6, 6 if index % 2 else -12), fontsize=7)
    axes.set_xlabel(x_label)
    axes.set_ylabel(f"validation {metric}")
    axes.set_title(f"study {study.study_name}: {len(done)} completed trials")
    axes.margins(x=0.25, y=0.1)  # room for the labels of the outermost points
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    staging = path.with_name(".tmp-" + path.name)
    figure.savefig(staging, dpi=120)
    plt.close(figure)
    os.replace(staging, path)
    return path


def preset_name(study_name: str, number: int) -> str:
    """The preset name of trial ``number``, e.g. ``mqar_trial7``."""
    return f"{study_name}_trial{number}"


def _override_value(value) -> str:
    """``value`` in Hydra's override syntax."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def task_overrides(task_config: dict, name: str) -> list[str]:
    """Command-line overrides that turn ``conf/task/<name>.yaml`` into ``task_config`` (resolved)."""
    defaults = OmegaConf.to_container(compose_config([f"task={name}"]).task)
    changed = [f"task.{key}={_override_value(value)}" for key, value in task_config.items() if defaults.get(key) != value]
    return [f"task={name}", *changed]


def write_presets(study: optuna.Study, settings: SearchSettings, metric: str, task_args: Sequence[str]) -> list[Path]:
    """Save the best architectures as complete model presets in ``<out_dir>/presets/model/``.

    The Pareto front, best metric first, at most ``top_k`` of it; presets of an earlier report
    are replaced. ``seqmix train --config-dir <out_dir>/presets model=<name>`` trains one; each
    file's header gives the whole command, ``task_args`` and the searched learning rate included.
    """
    directory = settings.out_dir / PRESETS / "model"
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob(f"{settings.study_name}_trial*.yaml"):
        old.unlink()
    reverse = metric_direction(metric) == "maximize"
    best = sorted(pareto_front(study), key=lambda t: t.user_attrs["metric"], reverse=reverse)[: settings.top_k]
    paths = []
    for trial in best:
        name = preset_name(settings.study_name, trial.number)
        attrs = trial.user_attrs
        latency = f", {attrs['latency_ms']:.3f} ms on {settings.runtime}" if "latency_ms" in attrs else ""
        command = ["seqmix train", f"--config-dir {(settings.out_dir / PRESETS).resolve()}", f"model={name}", *task_args]
        if "lr" in trial.params:
            command.append(f"train.lr={trial.params['lr']:.3e}")
        header = (
            f"# Trial {trial.number} of the architecture search {settings.study_name!r} (seqmix search).\n"
            f"# {attrs['architecture']}: {attrs['parameters']:,} parameters, validation {metric} {attrs['metric']:.4f}{latency}.\n"
            f"# Train it:\n#   {' '.join(command)}\n"
        )
        path = directory / f"{name}.yaml"
        # The sizes first, so the file reads top down like the presets in conf/model.
        config = attrs["model_config"]
        ordered = {key: config[key] for key in ("vocab_size", "d_model", "layers", "depth") if key in config}
        _write_atomic(path, header + OmegaConf.to_yaml(OmegaConf.create({**ordered, **config})))
        paths.append(path)
    return paths


def write_report(study: optuna.Study, settings: SearchSettings, metric: str, task_args: Sequence[str] = ()) -> tuple[list[Path], list[str]]:
    """Write the leaderboard (CSV and Markdown), the Pareto plot and the best presets into out_dir.

    ``task_args`` are the task overrides the presets' train command repeats (``task_overrides``).

    Returns the files written and notes on what could not be written.
    """
    out_dir = settings.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = leaderboard_rows(study, metric)
    csv_path, markdown_path = out_dir / f"{LEADERBOARD}.csv", out_dir / f"{LEADERBOARD}.md"
    staging = out_dir / f".{LEADERBOARD}.csv.tmp"
    write_csv(rows, staging)
    os.replace(staging, csv_path)
    counts = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    heading = (
        f"# Study {settings.study_name}\n\n"
        f"Objectives: {', '.join(settings.objectives)} (metric: validation {metric}"
        + (f"; latency on {settings.runtime}" if settings.measures_latency else "") + "). "
        f"Trials: {', '.join(f'{n} {s}' for s, n in counts.items()) or 'none yet'}.\n\n"
    )
    _write_atomic(markdown_path, heading + records_table(rows) + "\n")
    files, notes = [csv_path, markdown_path], []
    if any(row["state"] == "complete" for row in rows):
        try:
            files.append(plot_pareto(study, metric, settings.runtime, out_dir / PARETO_PNG))
        except SeqmixError as error:
            notes.append(str(error))
    else:
        notes.append("no completed trial yet: no Pareto plot and no presets")
    files += write_presets(study, settings, metric, task_args)
    return files, notes
