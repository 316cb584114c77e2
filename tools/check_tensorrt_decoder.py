"""TensorRT engines from the exported decoder graph (step.onnx), compared with eager: a GPU check.

    python tools/check_tensorrt_decoder.py [--presets mega megalodon transformer tcnca] [--out-dir DIR]

For each preset at the tests' tiny size (seeded), it exports the ONNX graphs, asks TensorRT whether
it imports the decoder graph (``ask_tensorrt``), builds an engine from it (``build_engine``) with one
optimization profile read from the manifest's ``step`` section (``input_ids`` (B, T) and the
``past_*`` state, B in 1..4, T in 1..64), then streams a prompt prefilled in one call and a few
single-token calls through the engine, feeding each call's ``present.*`` outputs back as the next
call's ``past_*`` inputs, and compares the logits with eager ``model.step`` on the same tokens.

Writes tensorrt_decoder.json to --out-dir; exits 1 when an engine's logits differ from eager by more
than --tolerance, 2 when TensorRT or a CUDA device is missing.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from seqmix.errors import writable_dir_argument

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tiny_preset: the tests' tiny size

DIMENSIONS = {"batch": (1, 2, 4), "tokens": (1, 16, 64)}
"""(min, opt, max) of each named dynamic dimension of the decoder graph in the engine's profile."""


def profile(step: dict) -> tuple[dict, dict, dict]:
    """min, opt and max shapes of every decoder-graph input, from the manifest's ``step`` section."""
    shapes = ({}, {}, {})
    for spec in step["inputs"]:
        for which, target in enumerate(shapes):
            target[spec["name"]] = tuple(DIMENSIONS[d][which] if isinstance(d, str) else d for d in spec["shape"])
    return shapes


def check(preset: str, work: Path, tolerance: float) -> dict:
    from conftest import tiny_preset
    from seqmix.export.onnx_export import export_onnx
    from seqmix.export.tensorrt import ask_tensorrt, build_engine, run_engine

    model = tiny_preset(preset).eval()
    out = work / preset
    step = export_onnx(model, out).manifest["step"]
    graph = out / step["file"]
    report = ask_tensorrt(graph)
    engine = build_engine(graph, out / "step.engine", *profile(step))
    batch, prompt = 2, 16
    state_specs = step["state"]
    dtypes = {"float32": torch.float32, "int64": torch.int64, "bool": torch.bool, "int32": torch.int32, "float16": torch.float16}
    state = {s["name"]: torch.full((batch, *s["shape"][1:]), s["fill"], dtype=dtypes[s["dtype"]]) for s in state_specs}
    eager_state = model.init_state(batch)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for tokens in (prompt, 1, 1, 1):
        ids = torch.randint(0, model.vocab_size, (batch, tokens), generator=generator)
        outputs = run_engine(engine, {"input_ids": ids, **state})
        state = {s["name"]: outputs[s["output"]] for s in state_specs}
        with torch.no_grad():
            expected, eager_state = model.step(ids, eager_state)
        worst = max(worst, float((outputs["logits"].float().cpu() - expected).abs().max()))
    return {"preset": preset, "answered_by": report.source, "parser_ok": report.ok, "calls": [prompt, 1, 1, 1],
            "batch": batch, "max_error": worst, "ok": report.ok and worst <= tolerance}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["mega", "megalodon", "transformer", "tcnca"])
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest accepted |engine − eager| of a logit")
    parser.add_argument("--out-dir", type=writable_dir_argument, default=Path("gpu_results"))
    options = parser.parse_args(argv)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        print("check_tensorrt_decoder: tensorrt is not installed (pip install tensorrt; needs an NVIDIA GPU)")
        return 2
    if not torch.cuda.is_available():
        print("check_tensorrt_decoder: no CUDA device; TensorRT engines need an NVIDIA GPU")
        return 2
    results = []
    with tempfile.TemporaryDirectory() as work:
        for preset in options.presets:
            result = check(preset, Path(work), options.tolerance)
            print(f"{preset}: {result['answered_by']} says {'OK' if result['parser_ok'] else 'NOT OK'}; "
                  f"max |engine − eager| = {result['max_error']:.2e} -> {'ok' if result['ok'] else 'FAILED'}", flush=True)
            results.append(result)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    (options.out_dir / "tensorrt_decoder.json").write_text(json.dumps(results, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
