"""Export a trained model and verify it against eager before reporting success.

    python tools/export.py checkpoint=<run dir> format=onnx [quantize=int8|fp16] [out=<dir>] [length=1024]

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

from mixers import SeqmixError  # noqa: E402
from mixers.cli import key_value_options  # noqa: E402
from mixers.experiment import build_task  # noqa: E402
from mixers.training import load_run  # noqa: E402

from export.manifest import write_manifest  # noqa: E402
from export.onnx_export import compare_latency, export_onnx  # noqa: E402
from export.quantize import compare_variant, make_variant  # noqa: E402

FORMATS = ("onnx",)


def export_to_onnx(model, task, out: Path, quantize: str | None, length: int) -> dict:
    result = export_onnx(model, out)
    manifest = result.manifest
    manifest["latency"] = compare_latency(model, result.parallel, length=length)
    if quantize:
        variant = make_variant(quantize, result.parallel)
        manifest["quantized"] = {quantize: compare_variant(result.parallel, variant, task, length, task.metric)}
    return manifest


def main(argv: list[str]) -> int:
    options = key_value_options(argv, __doc__, required=("checkpoint",))
    try:
        kind = options.get("format", "onnx")
        if kind not in FORMATS:
            raise SeqmixError(f"format={kind!r} is not valid; expected one of {list(FORMATS)}")
        model, record = load_run(options["checkpoint"])
        task = build_task(record["task"])
        out = Path(options.get("out", Path(options["checkpoint"]) / "export" / kind))
        manifest = export_to_onnx(model, task, out, options.get("quantize"), int(options.get("length", 1024)))
        manifest["task"] = {"name": type(task).name, "head": task.head, "metric": task.metric}
        write_manifest(out, manifest)
    except SeqmixError as error:
        print(f"export: error: {error}", file=sys.stderr)
        return 2
    latency = manifest["latency"]
    print(f"exported to {out}: " + ", ".join(p.name for p in sorted(out.glob("*.onnx"))))
    print(f"parallel graph: max |eager − ONNX Runtime| = {manifest['parallel']['max_error']:.2e}")
    if "step" in manifest:
        print(f"step graph: streamed tokens agree to {manifest['step']['max_error']:.2e}")
    print(
        f"latency at B={latency['batch']}, L={latency['length']}: eager {latency['eager_ms']:.1f} ms, "
        f"ONNX Runtime {latency['onnxruntime_ms']:.1f} ms ({latency['speedup']:.2f}x)"
    )
    for name, variant in manifest.get("quantized", {}).items():
        print(f"{name}: {variant['speedup']:.2f}x speed, {100 * variant['size_ratio']:.0f}% size, "
              f"{variant['metric']} {variant['metric_fp32']:.4f} -> {variant['metric_variant']:.4f}")
    print(json.dumps({"manifest": str(out / "manifest.json")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
