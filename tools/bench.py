"""Benchmark mixers and presets across runtimes and lengths, or reproduce the papers' speed claims.

    python tools/bench.py                          # the full CPU grid (conf/bench/default.yaml)
    python tools/bench.py bench=smoke              # a tiny grid, under a minute
    python tools/bench.py bench.peers=true         # + mega-pytorch, pytorch-tcn, nn.MultiheadAttention
    python tools/bench.py bench=paper_claims       # the papers' claims -> claims.md
    python tools/bench.py bench.lengths=[1024,4096] bench.out_dir=tools/perf

Arguments are Hydra overrides of the root config, whose ``bench`` group is conf/bench/ (default,
smoke, gpu, paper_claims). Writes results.json, results.csv, report.md and the PNG plots (claims
mode: claims.md and claims.json) to bench.out_dir and prints the report. Exit status: 0; 1 with
bench.strict=true when a cell failed or a claim could not be measured; 2 for a config error.
What is measured and how: export/bench.py.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Run as a script, this file's folder holds tools/export.py, which would shadow the `export`
# package; search from the project root instead of from tools/.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

# Kineto prints start/stop markers every time the CPU profiler runs (once per cell); it reads this
# when the profiler first starts.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

from seqmix.export.bench import compose_bench_spec, run_bench  # noqa: E402
from seqmix import SeqmixError  # noqa: E402


def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    try:
        spec = compose_bench_spec(argv)
        outcome = run_bench(spec)
    except SeqmixError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2
    print(outcome.report)
    for path in outcome.paths:
        print(f"wrote {path}")
    return 1 if spec.strict and outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
