"""What lowering buys for trained runs or presets: ONNX Runtime vs eager, int8 vs fp32, streaming cost
at a far position vs a near one, and compiled vs eager training steps (see export/report.py).

    python tools/lowering_report.py runs=<run dir>[,<run dir>...] [length=1024] [far=8192] [compile=true] [out=<dir>]
    python tools/lowering_report.py presets=mega,tcnca [task=byte_lm] ...     # untrained presets

Writes <out>/lowering.json and <out>/lowering.md (default out: runs/lowering) and prints the table,
with the machine's float32 matmul speed in PyTorch and in ONNX Runtime under it (the context
for every ratio). The int8 metric change means something only for trained runs.
"""
import json
import sys
from pathlib import Path

# Run as a script, this file's folder would come first on the path; the `export` package lives at the root.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch  # noqa: E402

from seqmix import SeqmixError, instantiate_model  # noqa: E402
from seqmix.cli import key_value_options  # noqa: E402
from seqmix.configs import compose_config  # noqa: E402
from seqmix.experiment import adapt_model_config, build_task  # noqa: E402
from seqmix.training import load_run  # noqa: E402

from seqmix.export.report import as_builtin, lowering_report, markdown_table, matmul_throughput, throughput_line  # noqa: E402


def subjects(options: dict[str, str]):
    """(name, model, task) for every run or preset asked for."""
    if "runs" in options:
        for run in options["runs"].split(","):
            model, record = load_run(run)
            yield f"{record['preset']['model']} ({run})", model, build_task(record["task"])
    for preset in filter(None, options.get("presets", "").split(",")):
        config = compose_config([f"model={preset}", f"task={options.get('task', 'byte_lm')}"])
        task = build_task(config.task)
        torch.manual_seed(0)
        yield preset, instantiate_model(adapt_model_config(config.model, task)), task


def main(argv: list[str]) -> int:
    options = key_value_options(argv, __doc__)
    if "runs" not in options and "presets" not in options:
        print(f"error: give runs=... or presets=...\n{__doc__}", file=sys.stderr)
        return 2
    out = Path(options.get("out", "runs/lowering"))
    reports = {}
    try:
        for name, model, task in subjects(options):
            print(f"measuring {name} ...", flush=True)
            reports[name] = as_builtin(lowering_report(
                model, task, out / name.split(" ")[0], length=int(options.get("length", 1024)),
                far=int(options.get("far", 8192)), compile_training=options.get("compile", "true") == "true"))
    except SeqmixError as error:
        print(f"lowering_report: error: {error}", file=sys.stderr)
        return 2
    machine = as_builtin(matmul_throughput())
    out.mkdir(parents=True, exist_ok=True)
    (out / "lowering.json").write_text(json.dumps(
        {"torch": torch.__version__, "threads": torch.get_num_threads(), "matmul": machine, "reports": reports}, indent=2))
    table = markdown_table(reports) + "\n\n" + throughput_line(machine)
    (out / "lowering.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
