"""The study's storage: opening it (SQLite, journal file or database server), refusing one that
cannot be read, and opening the study in it (``open_study``) only when its stored objectives, task
and space (``check_study``) match this search.
"""
from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna

from seqmix.errors import SeqmixError
from seqmix.search.claims import budget_trials, claim_lock
from seqmix.search.settings import SearchSettings, make_pruner, make_sampler, metric_direction
from seqmix.search.space import space_differences
from seqmix.tasks.base import Task

SQLITE_MAGIC = b"SQLite format 3\x00"


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
    with claim_lock(lock), readable_storage(str(lock) if lock is not None else url):
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


def open_study(settings: SearchSettings, task: Task) -> tuple[optuna.Study, optuna.storages.BaseStorage, Path | None]:
    """The study ``settings`` name, created or continued, with ``search.enqueue`` queued; its storage and claim lock file.

    A storage that cannot be read is refused (``readable_storage``), and so is a stored study made
    with other objectives, another task or another search space (``check_study``), before any trial runs.
    """
    storage, lock_file = open_storage(settings)
    directions = [metric_direction(task.metric) if name == "metric" else "minimize" for name in settings.objectives]
    with claim_lock(lock_file):
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
