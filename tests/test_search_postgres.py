"""Architecture search on a real PostgreSQL server (``pgserver``'s binaries, never a mock): three
``seqmix search`` workers share one study through the server's URL, one of them is killed with
SIGKILL in the middle of a trial, and the study still ends with exactly ``n_trials`` complete trials
and no trial run twice.

``python -m pytest -q -s tests/test_search_postgres.py`` prints the study's summary (trials,
workers, the killed worker, duplicates).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

pgserver = pytest.importorskip("pgserver", reason="the postgres extra (pgserver) is not installed: pip install -e '.[postgres]'")
pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed: pip install -e '.[postgres]'")
optuna = pytest.importorskip("optuna")
pytest.importorskip("matplotlib")

from optuna.trial import TrialState  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from seqmix.search import SearchSettings, compose_search_config  # noqa: E402
from seqmix.search.storage import open_study  # noqa: E402
from seqmix.training.experiment import build_experiment  # noqa: E402

from conftest import SEQMIX  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
N_TRIALS = 4
# The key Optuna's RetryHeartbeatStaleTrialCallback gives a retry: the number of the trial it reruns.
RETRY_OF = "failed_trial"
# What a worker prints when it finishes a trial: "trial 3: tcn ×1 d=16: accuracy 0.1, params 9,024 (1 s)".
FINISHED_LINE = re.compile(r"^trial (\d+): .+ \(\d+ s\)$", re.MULTILINE)


@pytest.fixture(scope="module")
def server():
    """A PostgreSQL server of its own (unix socket only), stopped and deleted after the module.

    Not under pytest's tmp_path: run as root, pgserver runs PostgreSQL as a user of its own, who
    must reach the data directory, and every pytest session keeps /tmp/pytest-of-<user> private.
    """
    directory = Path(tempfile.mkdtemp(prefix="seqmix-pg-"))
    postgres = pgserver.get_server(directory / "data", cleanup_mode="stop")
    yield postgres
    postgres.cleanup()
    shutil.rmtree(directory, ignore_errors=True)


def new_database(server, name: str) -> str:
    """Create database ``name`` and return its URL in the form Optuna's SQLAlchemy takes with psycopg 3."""
    server.psql(f"CREATE DATABASE {name};")
    return make_url(server.get_uri()).set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)


def wait_for(condition, what: str, workers, timeout_s: float = 180.0):
    """Poll ``condition()`` until it returns something truthy; fail naming ``what`` if a worker exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        for worker in workers:
            if worker.poll() is not None:
                pytest.fail(f"a worker exited (code {worker.returncode}) while waiting for {what}:\n{worker.stdout.read()}")
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def open_at_once(settings: SearchSettings, task, count: int) -> tuple[list, list[Exception]]:
    """``count`` threads, each a worker with its own connections, open the study of ``settings`` at the same instant."""
    start, opened, errors = threading.Barrier(count), [], []

    def open_one() -> None:
        start.wait()
        try:
            opened.append(open_study(settings, task, log=lambda line: None)[0])
        except Exception as error:  # collected: the test's assertion shows it
            errors.append(error)

    threads = [threading.Thread(target=open_one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return opened, errors


def test_workers_opening_a_new_database_at_the_same_instant_all_open_one_study(server, tmp_path):
    """Each worker creates Optuna's tables when it finds none: on a server, racing creators collide
    (duplicate types, tables, version rows, study attributes), which must not stop any of them."""
    config = compose_search_config("tiny", [f"search.out_dir={tmp_path}"])
    task = build_experiment(config).task
    for round_index in range(2):
        settings = dataclasses.replace(SearchSettings.from_config(config.search), storage=new_database(server, f"race_{round_index}"))
        opened, errors = open_at_once(settings, task, count=3)
        assert errors == [] and len(opened) == 3
        assert len({study._study_id for study in opened}) == 1


def test_three_workers_on_postgres_survive_a_killed_worker_with_exactly_n_trials_and_none_run_twice(server, tmp_path):
    url = new_database(server, "tiny_search")
    out_dir = tmp_path / "search"
    command = [*SEQMIX, "search", "search=tiny", f"search.storage='{url}'", f"search.out_dir={out_dir}",
               f"search.n_trials={N_TRIALS}", "search.objectives=[metric,params]", "search.heartbeat_s=1", "search.stale_after_s=4"]
    host = socket.gethostname()

    def start(index: int, *overrides: str) -> subprocess.Popen:
        return subprocess.Popen([*command, f"search.worker={index}", *overrides], cwd=ROOT, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # The test's own connection, made before any worker: Optuna creates its tables in the new
    # database here (workers racing to create them are the test above), and polling reuses it.
    storage = optuna.storages.RDBStorage(url)

    def trials():
        try:
            return storage.get_all_trials(storage.get_study_id_from_name("tiny"), deepcopy=False)
        except KeyError:  # the study is not created yet
            return []

    def running_trial_of(worker_id: str, training: bool = False):
        # A trial is in training once its model is built ("parameters" recorded).
        return next((t for t in trials() if t.state == TrialState.RUNNING and t.user_attrs.get("worker") == worker_id
                     and (not training or "parameters" in t.user_attrs)), None)

    # The worker to kill trains far longer than the others, so that the kill lands inside its trial
    # however slow the machine is; its trial is rerun by a survivor on the common budget. The others
    # start once it holds a trial, so that it surely gets one, and it is killed once it trains.
    victim = start(0, "train.max_steps=100000")
    workers = [victim]
    try:
        victim_id = f"{host}:{victim.pid}"
        wait_for(lambda: running_trial_of(victim_id), "a trial claimed by the worker to kill", workers)
        survivors = [start(1), start(2)]
        workers += survivors
        killed = wait_for(lambda: running_trial_of(victim_id, training=True), "the trial of the worker to kill in training", workers)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        outputs = [worker.communicate(timeout=300)[0] for worker in survivors]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert victim.returncode == -signal.SIGKILL
    assert [worker.returncode for worker in survivors] == [0, 0], outputs

    study = optuna.load_study(study_name="tiny", storage=storage)
    final = study.trials
    by_number = {t.number: t for t in final}
    survivor_ids = {f"{host}:{worker.pid}" for worker in survivors}

    # Exactly n_trials complete, every one run by a surviving worker.
    complete = [t for t in final if t.state == TrialState.COMPLETE]
    assert len(complete) == N_TRIALS
    assert {t.user_attrs["worker"] for t in complete} <= survivor_ids

    # The killed worker's trial was failed (its heartbeat stopped) and rerun once, with its parameters, by a survivor.
    killed = by_number[killed.number]
    assert killed.state == TrialState.FAIL and killed.user_attrs["worker"] == victim_id
    retries = [t for t in final if t.system_attrs.get(RETRY_OF) == killed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE and retries[0].params == killed.params
    assert not any(RETRY_OF in t.system_attrs for t in final if t is not retries[0])

    # "Runs twice" means: one trial number trained by two workers, or one parameter set trained in two
    # trials other than a trial whose worker died and its retry. A trial is trained when its run
    # directory exists; a worker reports each trial it finishes ("trial <n>: ...") once.
    trained = sorted(int(path.name) for path in (out_dir / "trials").iterdir())
    assert len(trained) == N_TRIALS + 1  # the n_trials complete ones and the killed one: no surplus trial trained
    assert set(trained) == {t.number for t in complete} | {killed.number}
    reported = Counter(int(match[1]) for output in outputs for match in FINISHED_LINE.finditer(output))
    assert reported == Counter({t.number: 1 for t in complete})
    parameter_sets = Counter(tuple(sorted(by_number[n].params.items())) for n in trained)
    duplicates = {params: count for params, count in parameter_sets.items() if count > 1}
    assert duplicates == {tuple(sorted(killed.params.items())): 2}  # the killed trial and its retry, nothing else
    ran = sum(int(line.split()[3]) for output in outputs for line in output.splitlines() if line.startswith("this worker ran"))
    assert ran == N_TRIALS

    # Claims that lost a race for the last place (if any) were never trained and do not count.
    unrun = [t for t in final if t.number not in trained]
    assert all(t.state == TrialState.FAIL and "not_run" in t.user_attrs for t in unrun)
    leaderboard = (out_dir / "leaderboard.csv").read_text()
    assert f"retry of trial {killed.number}" in leaderboard

    print(f"\nPostgreSQL study {study.study_name!r} at {make_url(url).render_as_string(hide_password=True)}: "
          f"{len(final)} trials in the storage, {len(complete)} complete (n_trials={N_TRIALS}), "
          f"{len(trained)} trained, {len(unrun)} claims not run")
    print(f"workers: {victim_id} (killed with SIGKILL in trial {killed.number}, the others started), "
          + ", ".join(f"{host}:{w.pid} ran {sum(t.user_attrs['worker'] == f'{host}:{w.pid}' for t in complete)}" for w in survivors))
    print(f"trial {killed.number} failed on its stopped heartbeat and ran again as trial {retries[0].number} "
          f"(worker {retries[0].user_attrs['worker']}); parameter sets trained twice apart from that retry: 0; "
          f"trials reported by two workers: {sum(count > 1 for count in reported.values())}")
