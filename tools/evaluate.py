"""Evaluate a trained model on its task's validation set.

    python tools/evaluate.py checkpoint=<run dir or checkpoint dir> [batches=32] [batch_size=16]
"""
import json
import sys

from seqmix import SeqmixError
from seqmix.cli import key_value_options
from seqmix.experiment import build_task
from seqmix.training import evaluate, load_run


def main(argv: list[str]) -> int:
    options = key_value_options(argv, __doc__, required=("checkpoint",))
    try:
        model, record = load_run(options["checkpoint"])
        if "task" not in record:
            raise SeqmixError(f"{options['checkpoint']} has no run.json naming its task; was it written by tools/train.py?")
        task = build_task(record["task"])
        scores = evaluate(model, task, int(options.get("batch_size", 16)), int(options.get("batches", 32)), "cpu")
    except SeqmixError as error:
        print(f"evaluate: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"task": type(task).name, **scores}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
