"""Command line for the mixer benchmark: time, peak memory, tokens/s and log-log slopes.

    python tools/bench_mixers.py [--lengths 1024 4096 16384] [--batch 1] [--width 256]
        [--mixers ema cema ...] [--repeats 5] [--warmup 2] [--device cpu|cuda]
        [--max-seconds-per-run 20] [--memory-budget-gb 4] [--out DIR]

Prints the tables and the target checks; with --out writes DIR/results.json and DIR/results.csv.
What is measured and how: see ``mixers/benchmark.py``.
"""
from __future__ import annotations

import argparse
import os
import sys

# Kineto prints start/stop markers to stderr every time the profiler runs, which on CPU is once
# per cell; read when the profiler first starts, so setting it here (before any run) is enough.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

from seqmix import SeqmixError  # noqa: E402
from seqmix.benchmark import BenchConfig, format_report, run_benchmark, write_results  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(defaults.lengths), help="sequence lengths L")
    parser.add_argument("--batch", type=int, default=defaults.batch, help="batch size B")
    parser.add_argument("--width", type=int, default=defaults.width, help="model width D")
    parser.add_argument("--mixers", nargs="+", default=None, help="registered mixer names (default: all)")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed runs; the median is reported")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed runs before the timed ones")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=defaults.device)
    parser.add_argument(
        "--max-seconds-per-run",
        type=float,
        default=defaults.max_seconds_per_run,
        help="once a run takes longer, skip the longer lengths of that mixer/impl/pass",
    )
    parser.add_argument(
        "--memory-budget-gb",
        type=float,
        default=defaults.memory_budget_gb,
        help="skip configurations whose estimated attention score matrices exceed this (GiB)",
    )
    parser.add_argument("--out", default=None, help="directory for results.json and results.csv")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = BenchConfig(
            lengths=tuple(args.lengths),
            batch=args.batch,
            width=args.width,
            mixers=tuple(args.mixers) if args.mixers else None,
            repeats=args.repeats,
            warmup=args.warmup,
            device=args.device,
            max_seconds_per_run=args.max_seconds_per_run,
            memory_budget_gb=args.memory_budget_gb,
        )
        result = run_benchmark(config, progress=not args.no_progress)
    except SeqmixError as error:
        print(f"bench_mixers: error: {error}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.out:
        for path in write_results(result, args.out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
