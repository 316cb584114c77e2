"""Size, speed and metric of int8 ExecuTorch programs against float32, per model preset at its default size.

    python tools/measure_pte_int8.py [--presets mega tcnca] [--length 256] [--runs runs/quickstart/<time>]
                                     [--jobs 2] [--out tools/perf/pte_int8.md]

For every preset of ``conf/model`` (built at the preset's own sizes, untrained, seeded, for
``task=byte_lm``, or ``task=masked_segment`` when its layers are bidirectional) and every trained run
of ``--runs`` (with its own task), one fresh process (``--jobs`` at a time) writes the parallel
graph at (1, ``--length``) as a float32 and an int8 .pte (``export_parallel_pte``) and measures them
with ``compare_pte_variant``, exactly what ``seqmix export format=executorch quantize=int8`` records
in its manifest: file sizes, the median (fastest–slowest) latency of eager, float32 .pte and int8 .pte
calls timed in alternation on one thread (torch and ExecuTorch's XNNPACK pool), the task's metric
on its evaluation batches cut or padded to ``--length``, and the largest output difference. It also
counts the operators XNNPACK takes in each program and names the operators left to ExecuTorch's
portable kernels, which explain a preset that misses a target. It writes ``--out`` (Markdown) and
the same rows as JSON beside it.

The issue's targets: at most 35% of the float32 size, at most 1 point of metric change, and
faster than the float32 program on this CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from seqmix.errors import writable_file_argument

ROOT = Path(__file__).resolve().parent.parent
TARGET_SIZE_RATIO = 0.35
TARGET_METRIC_POINTS = 1.0
PORTABLE_SHOWN = 6
"""How many of the most frequent portable (non-delegated) operators a row names."""


def _portable_operators(path: Path) -> Counter:
    """Operators of a lowered program outside XNNPACK delegates, by name, from ExecuTorch's own program reader."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(path.read_bytes())
    program = getattr(program, "program", program)
    plan = program.execution_plan[0]
    counts = Counter()
    for chain in plan.chains:
        for instruction in chain.instructions:
            index = getattr(instruction.instr_args, "op_index", None)
            if index is not None:
                counts[plan.operators[index].name] += 1
    return counts


def _subject(spec: dict):
    """(model, task) of one row: a preset at its default size, untrained, or a trained run."""
    import torch

    from seqmix.configs import compose_config
    from seqmix.model.checkpoint import instantiate_model
    from seqmix.training.checkpoints import load_run
    from seqmix.training.experiment import adapt_model_config, build_task

    if "run" in spec:
        model, record = load_run(spec["run"])
        return model.eval(), build_task(record["task"])
    torch.manual_seed(0)
    composed = compose_config([f"model={spec['preset']}"])
    causal = instantiate_model(composed.model).causal
    composed = compose_config([f"model={spec['preset']}", f"task={'byte_lm' if causal else 'masked_segment'}"])
    task = build_task(composed.task)
    torch.manual_seed(0)
    return instantiate_model(adapt_model_config(composed.model, task)).eval(), task


def _child(spec: dict) -> dict:
    """Measure one row in this process (one thread); return it as a dict."""
    import time

    import torch

    from seqmix.contract import length_unit
    from seqmix.export.bench.runtimes import _match_executorch_threads
    from seqmix.export.executorch_export import compare_pte_variant, export_parallel_pte

    torch.set_num_threads(1)
    _match_executorch_threads()
    model, task = _subject(spec)
    unit = length_unit(model)
    length = max(unit, spec["length"] // unit * unit)
    row = {"name": spec.get("preset") or spec["run"], "parameters": sum(p.numel() for p in model.parameters()),
           "task": type(task).name, "length": length}
    with tempfile.TemporaryDirectory() as work:
        fp32, int8 = Path(work) / "model.pte", Path(work) / "model.int8.pte"
        started = time.perf_counter()
        fp32_entry = export_parallel_pte(model, fp32, length)
        row["fp32_lowering_s"] = time.perf_counter() - started
        started = time.perf_counter()
        int8_entry = export_parallel_pte(model, int8, length, quantize="int8")
        row["int8_lowering_s"] = time.perf_counter() - started
        row.update(compare_pte_variant(model, task, fp32, int8, length))
        for name, entry, path in (("fp32", fp32_entry, fp32), ("int8", int8_entry, int8)):
            row[f"{name}_delegation"] = {key: entry[key] for key in ("delegated_nodes", "total_nodes", "delegated_subgraphs")}
            row[f"{name}_portable_ops"] = dict(_portable_operators(path).most_common())
    return row


def _run_child(spec: dict) -> dict:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT, env=environment, check=False)
    if done.returncode != 0:
        name = spec.get("preset") or spec["run"]
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {"name": name, "error": lines[-1] if lines else f"exit status {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ms(timing: dict) -> str:
    return f"{timing['median_ms']:.3g} ({timing['low_ms']:.3g}–{timing['high_ms']:.3g})"


def _verdicts(row: dict) -> list[str]:
    """The targets a row misses, each with the figure."""
    missed = []
    if row["size_ratio"] > TARGET_SIZE_RATIO:
        missed.append(f"size {100 * row['size_ratio']:.0f}% > {100 * TARGET_SIZE_RATIO:.0f}%")
    points = abs(row["metric_change"]) * (1 if row["metric"] == "accuracy" else 100)
    if points > TARGET_METRIC_POINTS:
        missed.append(f"metric change {points:.2f} points > {TARGET_METRIC_POINTS:g}")
    if row["speedup"] <= 1.0:
        missed.append(f"speed {row['speedup']:.2f}x, not faster than float32")
    return missed


def _portable_summary(ops: dict) -> str:
    shown = list(ops.items())[:PORTABLE_SHOWN]
    rest = sum(ops.values()) - sum(count for _, count in shown)
    text = ", ".join(f"{name.removeprefix('aten::')} {count}" for name, count in shown)
    return text + (f", {rest} more" if rest else "")


def format_report(rows: list[dict], command: str, environment: dict) -> str:
    lines = [
        "# int8 ExecuTorch programs against float32, per preset",
        "",
        f"Generated by `{command}` on {environment['date']}; do not edit by hand.",
        (f"torch {environment['torch']}, executorch {environment['executorch']}, {environment['machine']}, "
         f"{environment['cpus']} CPUs, one thread; load average {environment['load']} at the start."),
        "",
        ("Parallel graph at (1, L), lowered to XNNPACK (`export_parallel_pte`); int8 = dynamic int8 activations, "
         "int8 per-channel weights for every linear and convolution (`quantize=\"int8\"`). Latency: median "
         "(fastest–slowest) of 7 calls each, eager, float32 and int8 in alternation. Metric: the task's, on its "
         "evaluation batches cut or padded to L; change = int8 − float32 (bits per byte: bits × 100 = points; "
         "accuracy: points). Targets: size ≤ 35% of float32, |change| ≤ 1 point, faster than float32."),
        "",
        "| model | params | task, L | fp32 .pte | int8 .pte | size | eager ms | fp32 .pte ms | int8 .pte ms | int8 speed-up | metric fp32 → int8 (change) | max rel. error | delegated nodes fp32 / int8 | targets missed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | | | | | | | | | | | | | failed: {row['error']} |")
            continue
        fp32, int8 = row["fp32_delegation"], row["int8_delegation"]
        lines.append(
            f"| {row['name']} | {row['parameters'] / 1e6:.2f}M | {row['task']}, {row['length']} | "
            f"{row['fp32_bytes'] / 1e6:.2f} MB | {row['bytes'] / 1e6:.2f} MB | {100 * row['size_ratio']:.0f}% | "
            f"{_ms(row['eager_latency'])} | {_ms(row['fp32_latency'])} | {_ms(row['variant_latency'])} | "
            f"{row['speedup']:.2f}x | {row['metric']} {row['metric_fp32']:.4f} → {row['metric_variant']:.4f} "
            f"({row['metric_change']:+.4f}) | {100 * row['relative_error']:.1f}% | "
            f"{fp32['delegated_nodes']}/{fp32['total_nodes']} / {int8['delegated_nodes']}/{int8['total_nodes']} | "
            f"{'; '.join(_verdicts(row)) or 'none'} |"
        )
    lines += ["", "## Where the time and the bytes stay float", "",
              "Operators each int8 program leaves to ExecuTorch's portable kernels (outside XNNPACK), most frequent first:", ""]
    for row in rows:
        if "error" not in row:
            lines.append(f"- **{row['name']}**: {_portable_summary(row['int8_portable_ops'])}")
    lines.append("")
    return "\n".join(lines)


def _environment() -> dict:
    import importlib.metadata

    import torch

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "executorch": importlib.metadata.version("executorch"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load": f"{os.getloadavg()[0]:.1f}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="*", help="model presets (default: every preset of conf/model)")
    parser.add_argument("--runs", nargs="*", default=[], help="trained run directories to measure too")
    parser.add_argument("--length", type=int, default=256, help="L of the programs (rounded down to the model's chunk)")
    parser.add_argument("--jobs", type=int, default=2, help="rows measured at once, each in its own one-thread process")
    parser.add_argument("--out", type=writable_file_argument, default=ROOT / "tools" / "perf" / "pte_int8.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    from seqmix.configs import config_groups

    presets = config_groups()["model"] if args.presets is None else args.presets
    specs = [{"preset": p, "length": args.length} for p in presets] + [{"run": r, "length": args.length} for r in args.runs]
    environment = _environment()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(_run_child, specs))
    command = "python tools/measure_pte_int8.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(format_report(rows, command.strip(), environment))
    args.out.with_suffix(".json").write_text(json.dumps({"environment": environment, "rows": rows}, indent=2))
    print(args.out.read_text())
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
