#!/usr/bin/env bash
# Regenerate the committed performance reports in tools/perf/ on this machine.
#
#     tools/regenerate_perf.sh [grid|claims|threads|all]      (default: all)
#
# grid:    the CPU benchmark grid (conf/bench/default.yaml): report.md, results.json, results.csv and
#          the PNG plots; about 20 minutes on an idle 2-core machine (21 with bench.peers=true).
# claims:  the papers' speed claims (conf/bench/paper_claims.yaml): claims.md, claims.json; minutes.
# threads: the thread policies (tools/measure_threads.py): threads.md, threads.json; about 20 minutes.
#
# Every report names its machine, versions and threads. Run it on an otherwise idle machine, or
# say in the commit what else was running: the reports print a warning when the load exceeded the
# number of cores while they measured. PYTHON selects the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
what="${1:-all}"
case "$what" in
    grid | claims | threads | all) ;;
    *) echo "regenerate_perf: unknown report '$what'; expected grid, claims, threads or all" >&2; exit 2 ;;
esac
if [ "$what" = grid ] || [ "$what" = all ]; then
    "$python" -m seqmix bench bench.out_dir=tools/perf
fi
if [ "$what" = claims ] || [ "$what" = all ]; then
    "$python" -m seqmix bench bench=paper_claims bench.out_dir=tools/perf
fi
if [ "$what" = threads ] || [ "$what" = all ]; then
    "$python" tools/measure_threads.py --out tools/perf
fi
