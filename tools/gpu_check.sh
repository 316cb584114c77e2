#!/usr/bin/env bash
# GPU check: the GPU-marked tests, a short GPU benchmark grid and the papers' claims on the GPU,
# every result in one folder.
#
#     tools/gpu_check.sh [OUT_DIR]          (default: gpu_results)
#
# OUT_DIR receives environment.txt (nvidia-smi, versions), pytest-gpu.log and pytest-gpu.xml
# (python -m pytest -m gpu; tests/conftest.py skips gpu-marked tests with a reason when torch sees no
# CUDA device), bench/ (conf/bench/gpu.yaml: results.json, results.csv, report.md, PNGs), claims/
# (conf/bench/paper_claims.yaml on the GPU: claims.md, claims.json), with TensorRT installed
# tensorrt_decoder.json (tools/check_tensorrt_decoder.py: engines built from the exported decoder graph,
# compared with eager), a log per step and summary.txt.
#
# Exit status: 0 when every step passed, 1 when one failed (a test, a failed benchmark cell, a claim
# that could not be measured, a step over its time limit). Without a CUDA device the script says so
# in summary.txt and exits 0, so it can run on any machine; set REQUIRE_GPU=1 to make that exit 1.
# Time on one H200: under 1 min of tests, the grid capped near 5 min (bench.max_total_seconds=270
# plus the last cell), about 1 min of claims. PYTHON selects the interpreter (default: python).
set -u -o pipefail

mkdir -p "${1:-gpu_results}"
out="$(cd "${1:-gpu_results}" && pwd)"
python="${PYTHON:-python}"
cd "$(dirname "$0")/.."
summary="$out/summary.txt"
: > "$summary"

if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); GPU tests and benchmarks not run" | tee "$summary"
    if [ "${REQUIRE_GPU:-0}" = "1" ]; then
        exit 1
    fi
    exit 0
fi

{
    # Which code ran: the commit, when this is a git checkout.
    commit="unknown (not a git checkout)"
    if head=$(git rev-parse HEAD 2>/dev/null); then
        commit=$head
        git diff --quiet HEAD || commit="$commit, with uncommitted changes"
    fi
    echo "seqmix $("$python" -c "import seqmix; print(seqmix.__version__)" 2>&1) at commit $commit"
    nvidia-smi
    "$python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
    "$python" -m pip list 2>/dev/null | grep -i -E "^(torch|onnx|executorch|tensorrt|triton|mega|pytorch-tcn)"
} > "$out/environment.txt" 2>&1

status=0
# step NAME LIMIT_S COMMAND...: run COMMAND under a time limit, its output to the terminal and to
# OUT_DIR/NAME.log, and record its exit status in summary.txt.
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "$name: exit $rc" | tee -a "$summary"
    if [ "$rc" -ne 0 ]; then
        status=1
    fi
}

step pytest-gpu 900 "$python" -m pytest -q -m gpu -rs --junitxml="$out/pytest-gpu.xml"
step bench-gpu 420 "$python" -m seqmix bench bench=gpu "bench.out_dir=$out/bench" bench.progress=false
step claims-gpu 420 "$python" -m seqmix bench bench=paper_claims bench.claim_runtime=cuda "bench.out_dir=$out/claims" \
    bench.progress=false bench.strict=true
# TensorRT engines from the exported decoder graph (step.onnx), streamed against eager; only where
# the tensorrt package imports (it is an optional extra that pins its own CUDA libraries).
if "$python" -c "import tensorrt" 2>/dev/null; then
    step tensorrt-decoder 600 "$python" tools/check_tensorrt_decoder.py --out-dir "$out"
else
    echo "tensorrt-decoder: skipped (the tensorrt package does not import: pip install tensorrt)" | tee -a "$summary"
fi

echo "gpu_check: results in $out (exit $status)" | tee -a "$summary"
exit "$status"
