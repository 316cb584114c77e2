"""The trial budget workers share: how workers claim the trials of one study, so that it ends with
exactly ``n_trials`` of them and none runs twice, whatever the storage and however many workers die.

**Places.** Each first attempt of a trial takes one of the study's ``n_trials`` places; a retry
runs in its original's place (``budget_trials``). A refused claim (below) takes none.

**Claiming without a lock.** A worker asks Optuna for a trial (``study.ask``: the next queued one,
else a new one), then keeps it only when it holds one of the first ``n_trials`` places
(``claim_refusal``). Every Optuna storage numbers the trials of a study one after the other, with
no gap and no number given twice: an RDB storage (SQLite, PostgreSQL, MySQL) locks the study's row
while it numbers a new trial, and a journal numbers trials in the order its log holds them. So when
a worker holds trial n, every trial numbered below n is already stored, and the verdict is taken
from those alone: every worker would reach the same one, and the places go to the lowest numbers.
A claim past the last place (two workers asked for the last one at the same instant) is never
trained: it is told FAIL with a ``not_run`` user attribute saying why, and counts for nothing. The
same rule refuses a queued first attempt whose parameters an earlier one was queued with (workers
that start together each queue ``search.enqueue``). Hence no lock of seqmix's own, on a database
server or on a file. Optuna's ``MaxTrialsCallback`` is not enough for this: it stops a worker
after a trial once the study counts ``n_trials``, when the workers that asked meanwhile still run
one each (up to workers - 1 too many), and a stopped worker is not there to rerun the trial of a
worker that dies later.

**Workers that die.** A running trial records heartbeats (Optuna's: ``RDBStorage(heartbeat_interval=,
grace_period=, heartbeat_stale_trial_callback=)``). Before each claim a worker fails the trials whose
last heartbeat is older than the grace period (``optuna.storages.fail_stale_trials``); the storage
lets one worker only make that change, and that one queues the trial again with its parameters
(``RetryTrial``, Optuna's ``RetryHeartbeatStaleTrialCallback``), so it runs once more. While every
place is taken but trials still run, workers wait: one of those may yet come back as a retry.
Optuna's journal storage has no heartbeat: ``HeartbeatJournalStorage`` gives it one.
"""
from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalStorage
# Optuna's heartbeat protocol: fail_stale_trials works on any storage that implements it.
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from seqmix.search.settings import SearchSettings

CLAIM_POLL_S = 1.0
NOT_RUN = "not_run"
"""User attribute of a refused claim: why it was not run."""
RETRY_OF = "failed_trial"
"""System attribute RetryHeartbeatStaleTrialCallback gives a retry: the number of the first attempt."""
RETRY_HISTORY = "retry_history"
"""System attribute RetryHeartbeatStaleTrialCallback gives a retry: the numbers of the attempts before it."""
HEARTBEAT = "heartbeat"
"""System attribute where ``HeartbeatJournalStorage`` keeps a running trial's last heartbeat (unix time)."""


def is_retry(trial: FrozenTrial) -> bool:
    return RETRY_OF in trial.system_attrs


def budget_trials(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that hold a place in ``n_trials``: first attempts that were not refused."""
    return [t for t in trials if not is_retry(t) and NOT_RUN not in t.user_attrs]


def budget_spent(trials: Sequence[FrozenTrial], n_trials: int) -> bool:
    """True when every place is taken and no trial is queued (a queued retry runs in its original's place)."""
    return len(budget_trials(trials)) >= n_trials and not any(t.state == TrialState.WAITING for t in trials)


def claim_refusal(trials: Sequence[FrozenTrial], claimed: FrozenTrial, n_trials: int) -> str | None:
    """Why the ``claimed`` trial must not run, or None when it holds a place.

    Only the trials numbered below ``claimed`` are read: the storage had stored all of them when it
    numbered this one, so the verdict is the same whenever and by whichever worker it is taken.
    """
    if is_retry(claimed):
        return None
    earlier = [t for t in budget_trials(trials) if t.number < claimed.number]
    if len(earlier) >= n_trials:
        return f"not run: the study's {n_trials} trials were claimed before this one"
    # Optuna keeps the parameters a trial was queued with in this system attribute.
    queued_with = claimed.system_attrs.get("fixed_params")
    twin = next((t for t in earlier if queued_with is not None and t.system_attrs.get("fixed_params") == queued_with), None)
    if twin is not None:
        return f"not run: trial {twin.number} was queued with the same parameters"
    return None


def keep_claim(study: optuna.Study, trial: optuna.Trial, n_trials: int, log: Callable[[str], None]) -> bool:
    """True when ``trial`` (just asked for) holds a place; otherwise record it as a refused claim, never run."""
    trials = study.get_trials(deepcopy=False)
    reason = claim_refusal(trials, trials[trial.number], n_trials)
    if reason is None:
        return True
    trial.set_user_attr(NOT_RUN, reason)
    study.tell(trial, state=TrialState.FAIL)
    log(f"trial {trial.number}: {reason}")
    return False


def fail_stale_trials(study: optuna.Study) -> None:
    """Optuna's ``fail_stale_trials`` (experimental since Optuna 2.9; its warning is noise in every claim)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def next_trial(study: optuna.Study, storage: BaseHeartbeat, settings: SearchSettings, log: Callable[[str], None]) -> optuna.Trial | None:
    """Claim the next trial of the shared budget, or None when every place is taken and no trial runs.

    Queued trials (retries, ``search.enqueue``) come first. With every place taken, wait while
    others run: one of them may turn out stale and come back as a retry.
    """
    waiting_said = False
    while True:
        fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        if not budget_spent(trials, settings.n_trials):
            with warnings.catch_warnings():
                # Optuna's advice for its own optimize loop; this loop runs the heartbeat itself (``heartbeat``).
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
                trial = study.ask()
            # At once: a trial left running without any heartbeat is never found stale.
            storage.record_heartbeat(trial._trial_id)
            if keep_claim(study, trial, settings.n_trials, log):
                return trial
            continue
        running = [t.number for t in trials if t.state == TrialState.RUNNING]
        if not running:
            return None
        if not waiting_said:
            log(f"all {settings.n_trials} trials claimed; waiting for trials {running} to finish")
            waiting_said = True
        time.sleep(CLAIM_POLL_S)


@contextmanager
def heartbeat(storage: BaseHeartbeat, trial: optuna.Trial) -> Iterator[None]:
    """Record ``trial``'s heartbeat now and every heartbeat interval of ``storage`` while it runs."""
    stop = threading.Event()
    # FrozenTrial's storage id is private in Optuna's API, but the storage calls need it.
    trial_id = trial._trial_id

    def beat() -> None:
        while not stop.wait(storage.get_heartbeat_interval()):
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # a storage hiccup: the next beat tries again; only silence marks a trial stale
                continue

    storage.record_heartbeat(trial_id)
    thread = threading.Thread(target=beat, name=f"heartbeat-trial-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class RetryTrial:
    """Queue a trial whose worker stopped again, with its parameters, at most ``retries`` times, and log it.

    Optuna's ``RetryHeartbeatStaleTrialCallback`` does the queueing, so a retry carries Optuna's
    ``failed_trial`` and ``retry_history`` system attributes. Storages call it for the trials they
    find stale; a worker interrupted in a trial calls ``requeue`` itself.
    """

    def __init__(self, retries: int, log: Callable[[str], None]):
        self.retries, self.log = retries, log
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._retry = RetryHeartbeatStaleTrialCallback(max_retry=retries)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.requeue(study, trial, "its worker stopped (no heartbeat)")

    def requeue(self, study: optuna.Study, trial: FrozenTrial, why: str) -> None:
        queued = len(trial.system_attrs.get(RETRY_HISTORY, [])) < self.retries
        self._retry(study, trial)
        self.log(f"trial {trial.number}: {why}; " + ("queued again" if queued else f"not retried after {self.retries} retries"))


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal storage with the heartbeat Optuna gives RDB storages only.

    A journal on a shared disk is how workers on several machines share a study, and a worker
    there can die like any other; Optuna's ``JournalStorage`` records no heartbeat, so this one
    keeps it as a system attribute of the running trial (``HEARTBEAT``, the worker's unix time:
    the workers' clocks must agree to well within ``grace_period``, as they do under NTP).
    """

    def __init__(self, backend, heartbeat_interval: int, grace_period: float, heartbeat_stale_trial_callback=None):
        super().__init__(backend)
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # the trial ended (another worker may have failed it) between the beat's wake-up and now

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        # As in Optuna's RDB storage: a trial that never recorded a heartbeat is never stale.
        return [t._trial_id for t in running if HEARTBEAT in t.system_attrs and now - t.system_attrs[HEARTBEAT] > self.grace_period]

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self.heartbeat_stale_trial_callback
