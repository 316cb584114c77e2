"""A search's stored study is input someone else may have written: a corrupted, truncated or
foreign storage file is refused with a named error, and a stored study is continued only with the
search space it was made with (refused up front, naming the differing parameters)."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

optuna = pytest.importorskip("optuna")
pytest.importorskip("matplotlib")

from seqmix import SeqmixError  # noqa: E402
from seqmix.search import SearchSettings, SearchSpace, compose_search_config, run_search  # noqa: E402
from seqmix.search.storage import open_study  # noqa: E402
from seqmix.training.experiment import build_experiment  # noqa: E402

from conftest import examples  # noqa: E402

SQLITE_MAGIC = b"SQLite format 3\x00"
PROPERTY = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def tiny(out_dir: Path, *overrides: str):
    return compose_search_config("tiny", [f"search.out_dir={out_dir}", "search.objectives=[metric]", *overrides])


@pytest.fixture(scope="module")
def task():
    return build_experiment(compose_search_config("tiny")).task


@pytest.fixture(scope="module")
def base_settings(tmp_path_factory) -> SearchSettings:
    """search=tiny with the metric as its one objective (composed once: each example changes only what it needs)."""
    return SearchSettings.from_config(tiny(tmp_path_factory.mktemp("unused")).search)


@pytest.fixture(scope="module")
def stored_study(tmp_path_factory, task, base_settings) -> bytes:
    """The bytes of a study.db as a search leaves it: the study's attributes and three finished trials."""
    out_dir = tmp_path_factory.mktemp("search")
    study, _ = open_study(dataclasses.replace(base_settings, out_dir=out_dir), task)
    for _ in range(3):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
            trial = study.ask()
        trial.suggest_int("d_model", 16, 32)
        trial.set_user_attr("architecture", "tcn ×1 d=16")
        study.tell(trial, 0.5)
    return (out_dir / "study.db").read_bytes()


def open_stored(settings: SearchSettings, directory: Path, content: bytes, task, journal: bool = False):
    """Write ``content`` as the study's storage file (study.db, or a study.log journal) in ``directory`` and open the study from it."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    path = directory / ("study.log" if journal else "study.db")
    path.write_bytes(content)
    storage = f"journal:{path}" if journal else None
    return open_study(dataclasses.replace(settings, out_dir=directory, storage=storage), task)


def test_the_stored_study_opens_again(tmp_path, base_settings, stored_study, task):
    study, _ = open_stored(base_settings, tmp_path / "s", stored_study, task)
    assert len(study.trials) == 3 and study.user_attrs["task"] == "mqar"


def test_a_study_db_a_killed_writer_left_mid_transaction_is_rolled_back_and_opens(tmp_path, base_settings, stored_study, task):
    directory = tmp_path / "s"
    directory.mkdir()
    (directory / "study.db").write_bytes(stored_study)
    # A writer killed inside a transaction that had already spilled changed pages into the file.
    writer = ("import os, sqlite3, sys\n"
              "db = sqlite3.connect(sys.argv[1]); db.execute('PRAGMA cache_size=1'); db.execute('BEGIN')\n"
              "db.execute('UPDATE trial_values SET value = value + 1'); db.execute('DELETE FROM trial_user_attributes')\n"
              "os._exit(9)\n")
    subprocess.run([sys.executable, "-c", writer, str(directory / "study.db")], check=False)
    assert (directory / "study.db-journal").is_file(), "the writer left no journal: the case this test is about did not happen"
    study, _ = open_study(dataclasses.replace(base_settings, out_dir=directory), task)
    assert [t.values for t in study.trials] == [[0.5]] * 3
    assert all(t.user_attrs["architecture"] == "tcn ×1 d=16" for t in study.trials)


@settings(max_examples=examples(40), **PROPERTY)
@given(st.data())
def test_a_truncated_study_db_is_refused_naming_it(tmp_path, base_settings, stored_study, task, data):
    cut = data.draw(st.integers(1, len(stored_study) - 1), label="cut")
    with pytest.raises(SeqmixError, match=r"study.db.*cannot be read as an Optuna study"):
        open_stored(base_settings, tmp_path / "s", stored_study[:cut], task)


@settings(max_examples=examples(40), **PROPERTY)
@given(st.one_of(
    st.binary(min_size=1, max_size=8192).filter(lambda b: not SQLITE_MAGIC.startswith(b[:16])),
    st.text(min_size=1, max_size=200).map(str.encode).filter(lambda b: not SQLITE_MAGIC.startswith(b[:16])),
    st.binary(max_size=8192).map(lambda b: SQLITE_MAGIC + b),
))
def test_a_study_db_of_other_bytes_is_refused_naming_it(tmp_path, base_settings, task, content):
    with pytest.raises(SeqmixError, match=r"study.db.*cannot be read as an Optuna study"):
        open_stored(base_settings, tmp_path / "s", content, task)


@settings(max_examples=examples(20), **PROPERTY)
@given(st.data())
def test_a_study_db_with_a_damaged_range_opens_whole_or_is_refused(tmp_path, base_settings, stored_study, task, data):
    """SQLite keeps no checksums: garbage inside a record may go unnoticed, but never as a traceback."""
    start = data.draw(st.integers(0, len(stored_study) - 1), label="start")
    garbage = data.draw(st.binary(min_size=1, max_size=4096), label="garbage")
    damaged = stored_study[:start] + garbage + stored_study[start + len(garbage):]
    with contextlib.suppress(SeqmixError):
        study, _ = open_stored(base_settings, tmp_path / "s", damaged[: len(stored_study)], task)
        assert len(study.trials) <= 3


@settings(max_examples=examples(20), **PROPERTY)
@given(st.lists(st.one_of(st.binary(min_size=1, max_size=64), st.text(min_size=1, max_size=64).map(str.encode)), min_size=1, max_size=4))
def test_a_journal_of_other_lines_is_refused_naming_it(tmp_path, base_settings, task, lines):
    journal = b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n"
    with pytest.raises(SeqmixError, match=r"study.log.*cannot be read as an Optuna study"):
        open_stored(base_settings, tmp_path / "s", journal, task, journal=True)


def test_search_refuses_a_corrupted_study_db_before_any_trial(tmp_path):
    out_dir = tmp_path / "search"
    out_dir.mkdir()
    (out_dir / "study.db").write_text("not a database\n")
    with pytest.raises(SeqmixError, match=r"study.db.*cannot be read as an Optuna study"):
        run_search(tiny(out_dir), log=lambda line: None)
    assert not (out_dir / "trials").exists()


# --- the space a study was made with -------------------------------------------------------

SPACE_VARIANTS = {
    "mixers": [["tcn", "ema"], ["ema", "tcn"], ["tcn"]],
    "d_model": [[16, 32], [16], {"low": 16, "high": 32}, {"low": 16, "high": 32, "step": 8}],
    "lr": [{"low": 1.0e-3, "high": 1.0e-2, "log": True}, {"low": 1.0e-3, "high": 1.0e-2}, [0.001]],
    "repeats": [[1], [1, 2]],
    "tcn_kernel": [[2, 3], [2]],
}


@st.composite
def spaces(draw) -> dict:
    keys = draw(st.sets(st.sampled_from(sorted(SPACE_VARIANTS)), min_size=1))
    return {key: draw(st.sampled_from(SPACE_VARIANTS[key])) for key in keys}


@settings(max_examples=examples(25), **PROPERTY)
@given(spaces(), spaces())
def test_a_study_continues_only_with_the_space_it_was_made_with(tmp_path_factory, base_settings, task, first, second):
    out_dir = tmp_path_factory.mktemp("space")
    storage = f"journal:{out_dir / 'study.log'}"
    made = dataclasses.replace(base_settings, out_dir=out_dir, storage=storage, space=SearchSpace.from_config(first))
    again = dataclasses.replace(made, space=SearchSpace.from_config(second))
    open_study(made, task)
    differing = {key for key in first.keys() | second.keys() if made.space.dimensions.get(key) != again.space.dimensions.get(key)}
    if not differing:
        study, _ = open_study(again, task)
        assert json.dumps(study.user_attrs["space"], sort_keys=True) == json.dumps(made.space.description(), sort_keys=True)
        return
    with pytest.raises(SeqmixError, match="another search space") as refused:
        open_study(again, task)
    named = {key for key in SPACE_VARIANTS if f"search.space.{key}" in str(refused.value)}
    assert named == differing, str(refused.value)


def space_overrides(space: dict[str, str]) -> list[str]:
    return ["~search.space", "+search.space={" + ", ".join(f"{key}: {value}" for key, value in space.items()) + "}"]


def test_a_second_search_with_another_space_is_refused_before_any_trial_and_the_same_space_resumes(tmp_path):
    out_dir = tmp_path / "search"
    space = {"mixers": "[tcn]", "pattern_length": "[1]", "d_model": "[16]", "tcn_kernel": "[2]", "tcn_depth": "[2]"}
    fast = ("search.n_trials=1", "train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2")
    run_search(tiny(out_dir, *fast, *space_overrides(space)), log=lambda line: None)
    with pytest.raises(SeqmixError, match=r"another search space: search.space.d_model is \[16, 32\], the study.s \[16\]"):
        run_search(tiny(out_dir, *fast, *space_overrides({**space, "d_model": "[16, 32]"})), log=lambda line: None)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out_dir / 'study.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]
    outcome = run_search(tiny(out_dir, *fast, "search.n_trials=2", *space_overrides(space)), log=lambda line: None)
    assert outcome.trials_run == 1
    assert [t.state for t in outcome.study.trials] == [optuna.trial.TrialState.COMPLETE] * 2


# --- database URLs --------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("MySQLdb") is not None, reason="mysqlclient is installed: mysql:// has its driver")
def test_a_database_url_without_its_driver_names_the_forms_seqmix_documents(base_settings, task):
    with pytest.raises(SeqmixError, match=r"driver for it is not installed.*postgresql\+psycopg://.*mysql\+pymysql://") as refused:
        open_study(dataclasses.replace(base_settings, storage="mysql://seqmix:hunter2-secret@localhost/study"), task)
    assert "hunter2-secret" not in str(refused.value)


@settings(max_examples=examples(10), **PROPERTY)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~", min_size=8, max_size=24))
def test_a_database_server_that_cannot_be_reached_is_refused_naming_it_without_its_password(tmp_path, base_settings, task, password):
    pytest.importorskip("psycopg")
    # No server listens on a socket in this empty directory.
    url = f"postgresql+psycopg://seqmix:{password}@/study?host={tmp_path}"
    with pytest.raises(SeqmixError, match=r"postgresql\+psycopg://seqmix:\*\*\*@/study.*cannot be opened as an Optuna study") as refused:
        open_study(dataclasses.replace(base_settings, storage=url), task)
    assert password not in str(refused.value)


PASSWORDS = [
    ("postgresql+psycopg://searcher:S3cretPw@localhost:notaport/st1", "postgresql+psycopg://searcher:***@localhost:notaport/st1"),
    ("postgresql+psycopg://searcher:S3c@retPw@/nodb?host=/x", "postgresql+psycopg://searcher:***@/nodb?host=/x"),
    ("postgresql+psycopg://searcher@/nodb?host=/x&password=S3cretPw", "postgresql+psycopg://searcher@/nodb?host=/x&password=***"),
    ("mysql://u:S3cretPw@[::1/st1", "mysql://u:***@[::1/st1"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),
    ("sqlite:////tmp/study.db", "sqlite:////tmp/study.db"),
]


@pytest.mark.parametrize("url, shown", PASSWORDS)
def test_a_storage_urls_password_is_masked_in_every_form(url, shown):
    """A URL SQLAlchemy could not parse (a port that is no number, a bracket) was shown whole, a
    password in the query was not masked, and one holding an @ was masked only up to it."""
    from seqmix.search.storage import shown_url

    assert shown_url(url) == shown and "S3c" not in shown_url(url)


def test_no_error_line_and_no_sweep_shows_or_records_a_password(tmp_path, capsys):
    from seqmix.cli import main

    url = "postgresql+psycopg://searcher:S3cretPw@localhost:notaport/st1"
    assert main(["search", "search=tiny", f"search.storage='{url}'", f"search.out_dir={tmp_path / 'one'}"]) == 2
    err = capsys.readouterr().err
    assert "searcher:***@localhost" in err and "S3cretPw" not in err
    sweep = tmp_path / "sweep"
    assert main(["search", "-m", "search=tiny", f"search.storage='{url}'", f"hydra.sweep.dir={sweep}"]) == 2
    err = capsys.readouterr().err
    assert "holds a password, which a sweep would print" in err and "S3cretPw" not in err
    assert not sweep.exists()


def test_a_study_continued_under_other_task_options_or_latency_conditions_is_refused(tmp_path, base_settings, task):
    """The stored study kept only its objectives, metric and task name: a search at another seq_len,
    or timed on another runtime or batch size, joined it, and the report labelled every trial with
    the last search's conditions."""
    from seqmix.training.records import task_description

    config = task_description(compose_search_config("tiny").task)
    settings = dataclasses.replace(base_settings, out_dir=tmp_path, objectives=["metric", "latency"])
    open_study(settings, task, task_config=config)
    open_study(settings, task, task_config=config)
    # A task's cache folder differs between the machines sharing a study, and changes nothing it computes.
    from seqmix.training.records import task_without_paths

    text = task_description({"task": "text", "path": "notes", "cache_dir": str(tmp_path)})
    assert "cache_dir" not in task_without_paths(text) and task_without_paths(text)["path"] == "notes"
    refused = [
        (settings, {**config, "seq_len": config["seq_len"] * 2}, "task_options"),
        (dataclasses.replace(settings, runtime="onnxruntime"), config, "'runtime': 'onnxruntime'"),
        (dataclasses.replace(settings, latency_batch_size=4), config, "'batch_size': 4"),
    ]
    for changed, task_config, named in refused:
        with pytest.raises(SeqmixError, match=rf"study 'tiny' in the storage was made with .*{named}.*choose another search.study_name"):
            open_study(changed, task, task_config=task_config)


@pytest.mark.parametrize("url", ["postgres+psycopg://searcher@localhost/st1", "http://localhost/st1", "redis://localhost/0"])
def test_a_storage_url_of_no_database_sqlalchemy_knows_is_named_without_server_advice(url, tmp_path, capsys):
    """It was told to check that the server runs, that the database exists and the user's rights."""
    from seqmix.cli import main

    assert main(["search", "search=tiny", f"search.storage='{url}'", f"search.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "names a database SQLAlchemy does not know" in err and "postgresql+psycopg://" in err and "server runs" not in err


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite:///"])
def test_a_study_kept_in_memory_is_refused_before_anything_is_written(url, tmp_path, capsys):
    """Accepted before: the study vanished when the search ended, and ':memory:' was even taken as a
    file name in the current folder."""
    from seqmix.cli import main

    assert main(["search", "search=tiny", f"search.storage='{url}'", f"search.out_dir={tmp_path / 'out'}"]) == 2
    assert "keeps the study in memory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
