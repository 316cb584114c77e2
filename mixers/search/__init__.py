"""Architecture search with Optuna (``seqmix search``); README.md beside it describes the command.

The modules, in the order a search uses them:

- ``space``: the search space (``SearchSpace``, ``Dimension``, ``Candidate``); the mixers' knobs come from their contract.
- ``settings``: the ``search`` node (``SearchSettings``), its sampler and pruner, ``compose_search_config``.
- ``storage``: opening the study's storage and the study (``open_study``), refusing unreadable or mismatched ones.
- ``claims``: the trial budget workers share: claims, heartbeats, stale trials and retries.
- ``trial``: one trial: build, measure, train, and record how it ended.
- ``report``: the leaderboard, the Pareto plot and the best architectures as presets.
- ``run``: ``run_search``, one worker's loop over the study.
"""
from seqmix.errors import SeqmixError

# Every module here uses Optuna: one check, so that a missing install is named whichever module is imported first.
try:
    import optuna
except ImportError as error:
    raise SeqmixError(f"architecture search needs optuna ({error}): pip install optuna matplotlib") from None
# Retries of the trials whose worker died go through this callback, new in Optuna 4.9.
if not hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
    raise SeqmixError(f"architecture search needs optuna>=4.9, not {optuna.__version__}: pip install -U optuna")

from .run import SearchOutcome, run_search  # noqa: E402
from .settings import SearchSettings, compose_search_config  # noqa: E402
from .space import SearchSpace  # noqa: E402

__all__ = ["SearchOutcome", "SearchSettings", "SearchSpace", "compose_search_config", "run_search"]
