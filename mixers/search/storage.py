"""The study's storage: opening it (SQLite, journal file or database server) with heartbeats and
retries of the trials whose worker died, refusing one that cannot be read, and opening the study
in it (``open_study``) only when its stored objectives, task and space (``check_study``) match
this search.
"""
from __future__ import annotations

import json
import random
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import optuna

from seqmix.errors import SeqmixError
from seqmix.search.claims import HeartbeatJournalStorage, RetryTrial, budget_trials
from seqmix.search.settings import (JOURNAL_PREFIX, SQLITE_PREFIX, SearchSettings, make_pruner, make_sampler,
                                    metric_direction, storage_file)
from seqmix.search.space import space_differences
from seqmix.tasks.base import Task
from seqmix.terminal import mask_url_secrets
from seqmix.training.records import task_without_paths

SQLITE_MAGIC = b"SQLite format 3\x00"
SCHEMA_ATTEMPTS = 5


def storage_url(settings: SearchSettings) -> str:
    """``search.storage``, or the URL of ``<out_dir>/study.db`` when it is null."""
    if settings.storage is not None:
        return settings.storage
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    return f"{SQLITE_PREFIX}{(settings.out_dir / 'study.db').resolve()}"


def shown_url(url: str) -> str:
    """``url`` as messages show it: a database URL's password masked, in its user part or its query,
    whether or not SQLAlchemy can parse the URL (one it could not was shown whole)."""
    return url if url.startswith(JOURNAL_PREFIX) else mask_url_secrets(url)


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for any other storage."""
    return storage_file(url) if url.startswith(SQLITE_PREFIX) else None


@contextmanager
def file_lock(path: Path | None) -> Iterator[None]:
    """Hold a lock file beside a SQLite file (an O_EXCL file, safe on NFS) while a worker opens it; nothing for other storages.

    Optuna creates its tables in a file that has none; workers that start together would race to
    do so. Database servers are handled by retrying (``open_study``); journals need neither.
    """
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = optuna.storages.journal.JournalFileOpenLock(f"{path}.lock")
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def open_storage(url: str, settings: SearchSettings, retry: RetryTrial) -> optuna.storages.BaseStorage:
    """The storage at ``url``, recording heartbeats every ``search.heartbeat_s`` and failing a trial
    silent for ``search.stale_after_s``, which ``retry`` queues again.

    ``url``: ``sqlite:///<file>``, ``journal:<file>``, or any other Optuna database URL
    (``postgresql+psycopg://...``, ``mysql+pymysql://...``).
    """
    heartbeats = {"heartbeat_interval": settings.heartbeat_s, "grace_period": settings.stale_after_s, "heartbeat_stale_trial_callback": retry}
    if url.startswith(JOURNAL_PREFIX):
        path = storage_file(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        with readable_storage(str(path)):
            # The journal is replayed here: a file of other lines fails now, not in a trial.
            return HeartbeatJournalStorage(optuna.storages.journal.JournalFileBackend(str(path)), **heartbeats)
    if "://" not in url:
        raise SeqmixError(
            f"search.storage={url!r} is not valid; expected null (a SQLite file in out_dir), sqlite:///<file>, "
            "journal:<file>, or a database URL such as postgresql+psycopg://user@host/db"
        )
    path = sqlite_file(url)
    # Several processes write one SQLite file: wait for its lock instead of failing after 5 s.
    engine_kwargs = {"connect_args": {"timeout": 60}} if path is not None else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with readable_storage(str(path)):
            check_sqlite_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeats)
    except ImportError as error:
        raise SeqmixError(
            f"search.storage={shown_url(url)}: SQLAlchemy's driver for it is not installed ({error}). For PostgreSQL "
            "write postgresql+psycopg://... (psycopg 3: pip install 'seqmix[postgres]'), for MySQL mysql+pymysql://..."
        ) from None


def _storage_errors() -> tuple[type[BaseException], ...]:
    """What Optuna and its backends raise on a storage they cannot read (Optuna asserts on some journals)."""
    import sqlalchemy.exc

    return (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error, ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError)


@contextmanager
def readable_storage(where: str) -> Iterator[None]:
    """Turn the errors of a storage that cannot be read (corrupted, truncated, another program's file,
    a server that cannot be reached) into SeqmixError; ``where`` is a file or a database URL."""
    try:
        yield
    except SeqmixError:
        raise
    except _storage_errors() as error:
        detail = str(error).splitlines()[0][:200] if str(error) else ""
        if "://" in where and type(error).__name__ == "NoSuchModuleError":
            # Another scheme than a database SQLAlchemy knows: no server to check.
            raise SeqmixError(
                f"search.storage: {shown_url(where)} names a database SQLAlchemy does not know ({detail}); write "
                "postgresql+psycopg://..., mysql+pymysql://..., sqlite:///<file> or journal:<file>"
            ) from None
        if "://" in where:
            raise SeqmixError(
                f"search.storage: {shown_url(where)} cannot be opened as an Optuna study ({type(error).__name__}: {detail}); "
                "check that the server runs, that the database exists and that this user may create tables in it"
            ) from None
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


def open_study(settings: SearchSettings, task: Task, log: Callable[[str], None] = print,
               task_config: Mapping | None = None) -> tuple[optuna.Study, optuna.storages.BaseStorage]:
    """The study ``settings`` name, created or continued, with ``search.enqueue`` queued, and its storage.

    A storage that cannot be read is refused (``readable_storage``), and so is a stored study made
    with other objectives, another task or another search space (``check_study``), before any trial
    runs. ``log`` receives a line for each trial of a stopped worker queued again.

    Optuna creates its tables, version rows and the study's attributes when it finds none; workers
    that start together on a new database collide there on a unique key (a table, a type or a row
    the other one made first: IntegrityError or ProgrammingError). Opening again finds them made.
    A SQLite file is opened under a lock file instead (``file_lock``).
    """
    import sqlalchemy.exc

    url = storage_url(settings)
    path = sqlite_file(url)
    retry = RetryTrial(settings.retries, log)
    on_server = path is None and not url.startswith(JOURNAL_PREFIX)
    races = (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) if on_server else ()
    with file_lock(path), readable_storage(str(path or url)):
        for attempt in range(1, SCHEMA_ATTEMPTS + 1):
            try:
                storage = open_storage(url, settings, retry)
                return _open_study_in(storage, settings, task, task_config), storage
            except races:
                if attempt == SCHEMA_ATTEMPTS:
                    raise
                time.sleep(random.uniform(0.05, 0.5))
    raise AssertionError("unreachable: the last attempt returns or raises")


def _open_study_in(storage: optuna.storages.BaseStorage, settings: SearchSettings, task: Task,
                   task_config: Mapping | None) -> optuna.Study:
    """Create or load the study in ``storage``, check it against this search and queue ``search.enqueue``."""
    directions = [metric_direction(task.metric) if name == "metric" else "minimize" for name in settings.objectives]
    try:
        previous_trials = len(storage.get_all_trials(storage.get_study_id_from_name(settings.study_name), deepcopy=False))
    except KeyError:  # a new study
        previous_trials = 0
    study = optuna.create_study(
        storage=storage, study_name=settings.study_name, directions=directions, load_if_exists=True,
        sampler=make_sampler(settings, previous_trials), pruner=make_pruner(settings),
    )
    check_study(study, settings, task, task_config)
    # Workers starting together may each queue these: the claim rule runs one of each (claims.claim_refusal).
    for params in settings.enqueue:
        if len(budget_trials(study.get_trials(deepcopy=False))) < settings.n_trials:
            study.enqueue_trial(params, skip_if_exists=True)
    return study


def measured_under(settings: SearchSettings, task_config: Mapping | None) -> dict:
    """What a trial's figures depend on beyond its architecture: the task's options (sequence length,
    sizes; not its cache folder) and, when latency is an objective, the runtime and the (B, L) it is
    timed at. A study continued under others mixed incomparable trials on one Pareto front."""
    conditions = {} if task_config is None else {"task_options": task_without_paths(task_config)}
    if settings.measures_latency:
        conditions["latency"] = {"runtime": settings.runtime, "length": settings.latency_length,
                                 "batch_size": settings.latency_batch_size}
    return json.loads(json.dumps(conditions))  # as the storage gives it back (JSON)


def check_study(study: optuna.Study, settings: SearchSettings, task: Task, task_config: Mapping | None = None) -> None:
    """Refuse to continue a stored study with other objectives, another task (or other task options),
    another latency runtime or shape, or another search space; record them on a new one.

    A study stored before its space (or these conditions) was recorded takes this search's. Attributes
    are compared one by one, and a missing one is recorded: workers that create a study together each
    record them, one attribute at a time, so another worker may find some recorded and not yet others.
    """
    wanted = {"objectives": settings.objectives, "metric": task.metric, "task": task.name,
              **measured_under(settings, task_config)}
    stored = {key: study.user_attrs.get(key) for key in wanted}
    if any(value is not None and value != wanted[key] for key, value in stored.items()):
        raise SeqmixError(
            f"study {settings.study_name!r} in the storage was made with {stored}, but this search has {wanted}; "
            "choose another search.study_name or search.storage"
        )
    for key, value in wanted.items():
        if stored[key] is None:
            study.set_user_attr(key, value)
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
