"""Search architectures with Optuna: mixers per layer, width, depth and mixer options, scored by
the task's validation metric against the deployed latency and/or the parameter count.

    python tools/search.py search=<name> [overrides...]
    python tools/search.py search=mqar search.n_trials=40 search.runtime=executorch
    python tools/search.py search=mqar search.storage=journal:/shared/mqar.log search.worker=1

search=<name> picks conf/search/<name>.yaml; the other arguments are Hydra overrides of the
composed config (search.*, task.*, train.*, model.*). Writes out_dir/leaderboard.{csv,md},
out_dir/pareto.png, out_dir/presets/model/<study>_trial<n>.yaml and one run per trial in
out_dir/trials/<n>/. Running it again continues the study; run it on several machines against
one storage to share the trials.
"""
import logging
import sys
import warnings
from pathlib import Path

# Run as a script, tools/ would come first on the path and tools/export.py would shadow the
# `export` package; search from the project root instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from seqmix import SeqmixError  # noqa: E402
from seqmix.search import SearchSettings, compose_search_config, run_search  # noqa: E402 (says how to install optuna)

import optuna  # noqa: E402

from seqmix.export.latency import check_runtime, deployed_latency_ms  # noqa: E402


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    names = [arg.split("=", 1)[1] for arg in argv if arg.lstrip("+").startswith("search=")]
    overrides = [arg for arg in argv if not arg.lstrip("+").startswith("search=")]
    if len(names) != 1:
        print(f"error: give one search=<name>\n{__doc__}", file=sys.stderr)
        return 2
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Every trial's ONNX export repeats the same benign notices (the export wrapper module's
    # training flag, merged axis names, torchvision ops it skips); keep the log to one line a trial.
    for message in ("Exporting a model while it is in training mode", "# The axis name", "`isinstance(treespec, LeafSpec)`"):
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        config = compose_search_config(names[0], overrides)
        settings = SearchSettings.from_config(config.search)
        if settings.measures_latency:
            check_runtime(settings.runtime, field="search.runtime")
        outcome = run_search(config, measure_latency=deployed_latency_ms if settings.measures_latency else None)
    except SeqmixError as error:
        print(f"search: error: {error}", file=sys.stderr)
        return 2
    print(f"\nthis worker ran {outcome.trials_run} trial(s); the study has {len(outcome.study.trials)}")
    for note in outcome.notes:
        print(f"note: {note}")
    for path in outcome.files:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
