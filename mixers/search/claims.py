"""The shared trial budget: how workers claim trials of one study without running one twice.

Each worker claims trials until the study holds ``n_trials`` of them (``next_trial``). With file
storages the claim (count, then ask) holds a lock file beside the storage (``claim_lock``); a
database server has no such lock, so two workers claiming in the same instant may run one trial
too many each. A running trial writes a heartbeat into its user attributes (``heartbeat``); a
trial whose heartbeat is older than ``stale_after_s`` was left by a killed worker and is failed
and queued again with the same parameters (``fail_stale_trials``, ``requeue``), so a killed search
resumes where it stopped. Optuna's own heartbeat covers database storages only, not journal
files, hence one mechanism for all.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from seqmix.search.settings import SearchSettings

CLAIM_POLL_S = 1.0


@contextmanager
def claim_lock(storage_file: Path | None) -> Iterator[None]:
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


def requeue(study: optuna.Study, trial: FrozenTrial, retries: int) -> bool:
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
        queued = requeue(study, trial, settings.retries)
        log(f"trial {trial.number}: its worker stopped (no heartbeat for {now - last:.0f} s); "
            + ("queued again" if queued else f"not retried after {settings.retries} retries"))


def next_trial(study: optuna.Study, storage, lock_file: Path | None, settings: SearchSettings, log) -> optuna.Trial | None:
    """Claim the next trial of the shared budget, or None when the study has ``n_trials`` and none runs.

    Queued trials (retries, ``search.enqueue``) come first. With the budget used up, wait while
    others run: one of them may turn out stale and come back as a retry.
    """
    waiting_said = False
    while True:
        with claim_lock(lock_file):
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
def heartbeat(trial: optuna.Trial, interval_s: float) -> Iterator[None]:
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
