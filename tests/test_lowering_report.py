"""The benchmark's lowering mode (export/bench/lowering.py, seqmix bench bench=lowering): every ratio
is measured and tabulated (no timing targets)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import SEQMIX, tiny_preset
from seqmix import SeqmixError
from seqmix.cli import main
from seqmix.export.bench import compose_bench_spec
from seqmix.export.bench.lowering import matmul_throughput, step_growth
from seqmix.export.bench.report import throughput_line

ROOT = Path(__file__).resolve().parent.parent


def test_attention_caches_cap_the_far_position():
    model = tiny_preset("transformer", "model.mixers.attention.max_len=256").eval()
    growth = step_growth(model, None, near=16, far=8192, repeats=3)
    assert growth["cache_limit"] == 256 and growth["far"] == 255 and "onnxruntime_ratio" not in growth
    assert growth["eager_near"]["runs"] == growth["eager_far"]["runs"] == 3


def test_the_command_needs_runs_or_presets(capsys):
    assert main(["bench", "bench=lowering", "bench.presets=[]"]) == 2
    assert "bench.mode=lowering needs bench.presets=[<preset>,...] or bench.lowering.runs=[<run dir>,...]" in capsys.readouterr().err


def test_the_lowering_mode_measures_a_preset_end_to_end(tmp_path):
    overrides = "['model.d_model=16','model.depth=1','task.vocab_size=32','task.seq_len=64','task.num_pairs=4']"
    command = [*SEQMIX, "bench", "bench=lowering", "bench.presets=[ema_conv]", f"bench.preset_overrides={overrides}",
               "bench.lowering.task=mqar", "bench.runtimes=[eager,onnxruntime]", "bench.lengths=[64]", "bench.lowering.far=128",
               "bench.progress=false", f"bench.out_dir={tmp_path}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| ema_conv |" in done.stdout and "not run" in done.stdout and "float32 matmul" in done.stdout
    data = json.loads((tmp_path / "lowering.json").read_text(encoding="utf-8"))
    assert set(data) == {"spec", "environment", "matmul", "reports"} and data["spec"]["mode"] == "lowering"
    report = data["reports"]["ema_conv"]
    assert report["int8_vs_fp32"]["metric"] == "accuracy" and "compile_vs_eager_training" not in report
    assert 0 < report["int8_vs_fp32"]["size_ratio"]
    latency = report["onnxruntime_vs_eager"]
    assert latency["length"] == 64 and latency["speedup"] > 0
    assert latency["speedup"] == latency["eager"]["median_ms"] / latency["onnxruntime"]["median_ms"]
    growth = report["step_growth"]
    assert (growth["near"], growth["far"], growth["cache_limit"]) == (64, 128, None)
    assert growth["eager_ratio"] > 0 and growth["onnxruntime_ratio"] > 0
    for runtime in ("eager", "onnxruntime"):
        for position in ("near", "far"):
            timing = growth[f"{runtime}_{position}"]
            assert timing["runs"] == 50 and timing["low_ms"] <= timing["median_ms"] <= timing["high_ms"]
            assert growth[f"{runtime}_{position}_ms"] == timing["median_ms"]
        assert growth[f"{runtime}_ratio"] == growth[f"{runtime}_far_ms"] / growth[f"{runtime}_near_ms"]
    table = (tmp_path / "lowering.md").read_text(encoding="utf-8")
    assert table in done.stdout
    eager = latency["eager"]
    assert f"({eager['median_ms']:.1f} [{eager['low_ms']:.1f}–{eager['high_ms']:.1f}] → " in table
    assert (tmp_path / "ema_conv" / "model.onnx").is_file()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["bench.lengths=[256,1024]"], ["bench.lengths=[256, 1024]", "expected one L"]),
        (["bench.runtimes=[eager]"], ["bench.runtimes=['eager']", "'onnxruntime'", "'compile'"]),
        (["bench.lowering.task=chess"], ["bench.lowering.task='chess'", "mqar"]),
        (["+bench.lowering.depth=3"], ["bench.lowering", "'depth'", "'far'"]),
        (["+bench.claims.x={title: t, source: s, metric: slope, figure: 1, subject: mega, pass: forward}"],
         ["bench.claims (['x'])", "not lowering"]),
    ],
)
def test_lowering_config_errors_name_the_field_and_the_valid_choices(overrides, expected):
    with pytest.raises(SeqmixError) as caught:
        compose_bench_spec(["bench=lowering", *overrides])
    for text in expected:
        assert text in str(caught.value)


def test_matmul_throughput_measures_both_runtimes_on_the_same_product():
    measured = matmul_throughput(rows=256, inner=64, columns=128, repeats=3)
    assert measured["shape"] == [256, 64, 128] and measured["cpu"]
    assert measured["torch_gflops"] > 0 and measured["onnxruntime_gflops"] > 0
    for runtime in ("torch", "onnxruntime"):
        timing = measured[runtime]
        assert timing["runs"] == 3 and timing["low_ms"] <= timing["median_ms"] <= timing["high_ms"]
    line = throughput_line(measured)
    assert "256×64 · 64×128" in line and f"PyTorch {measured['torch_gflops']:.0f} GFLOP/s" in line
