"""Export a trained model and verify it against eager before reporting success.

    python tools/export.py checkpoint=<run dir> [format=onnx|executorch|tensorrt] [quantize=int8|fp16] [out=<dir>] [length=1024]

Writes the graphs and manifest.json (inputs, outputs, dynamic dims, state layout, opset, the impl
each mixer used, the verification's max error, latency, quantized variants) to out, by default
<run dir>/export/<format>.
"""
import json
import sys
from pathlib import Path

# Run as a script, this file would shadow the `export` package it imports; search from the
# project root instead of from tools/.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from seqmix import SeqmixError  # noqa: E402
from seqmix.cli import key_value_options  # noqa: E402
from seqmix.experiment import build_task  # noqa: E402
from seqmix.training import load_run  # noqa: E402

from seqmix.export.formats import export_model, summary_lines  # noqa: E402


def main(argv: list[str]) -> int:
    options = key_value_options(argv, __doc__, required=("checkpoint",))
    try:
        kind = options.get("format", "onnx")
        model, record = load_run(options["checkpoint"])
        task = build_task(record["task"])
        out = Path(options.get("out", Path(options["checkpoint"]) / "export" / kind))
        manifest = export_model(model, task, kind, out, options.get("quantize"), int(options.get("length", 1024)))
    except SeqmixError as error:
        print(f"export: error: {error}", file=sys.stderr)
        return 2
    print(f"exported to {out}: " + ", ".join(sorted(p.name for p in out.iterdir() if p.suffix in (".onnx", ".pte", ".engine"))))
    for line in summary_lines(manifest):
        print(line)
    print(json.dumps({"manifest": str(out / "manifest.json")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
