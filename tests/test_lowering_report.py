"""tools/lowering_report.py and export/report.py: every ratio is measured and tabulated (no timing targets)."""
from __future__ import annotations

import subprocess
from pathlib import Path


from conftest import SEQMIX, tiny_preset
from seqmix.tasks.mqar import MQAR

from seqmix.export.report import lowering_report, lowering_table, matmul_throughput, step_growth, throughput_line

ROOT = Path(__file__).resolve().parent.parent


def test_report_measures_every_ratio_for_a_streaming_model(tmp_path):
    model = tiny_preset("megalodon").eval()
    task = MQAR(vocab_size=model.vocab_size, seq_len=128, num_pairs=8)
    report = lowering_report(model, task, tmp_path, length=256, far=512, compile_training=False)
    assert report["onnxruntime_vs_eager"]["length"] == 256 and report["onnxruntime_vs_eager"]["speedup"] > 0
    assert 0 < report["int8_vs_fp32"]["size_ratio"] and report["int8_vs_fp32"]["metric"] == "accuracy"
    growth = report["step_growth"]
    assert (growth["near"], growth["far"], growth["cache_limit"]) == (64, 512, None)
    assert growth["eager_ratio"] > 0 and growth["onnxruntime_ratio"] > 0
    for runtime in ("eager", "onnxruntime"):
        for position in ("near", "far"):
            timing = growth[f"{runtime}_{position}"]
            assert timing["runs"] == 50 and timing["low_ms"] <= timing["median_ms"] <= timing["high_ms"]
            assert growth[f"{runtime}_{position}_ms"] == timing["median_ms"]
        assert growth[f"{runtime}_ratio"] == growth[f"{runtime}_far_ms"] / growth[f"{runtime}_near_ms"]
    latency = report["onnxruntime_vs_eager"]
    assert latency["speedup"] == latency["eager"]["median_ms"] / latency["onnxruntime"]["median_ms"]
    table = lowering_table({"megalodon": report})
    assert "| megalodon |" in table and "not run" in table
    eager = latency["eager"]
    assert f"({eager['median_ms']:.1f} [{eager['low_ms']:.1f}–{eager['high_ms']:.1f}] → " in table


def test_attention_caches_cap_the_far_position():
    model = tiny_preset("transformer", "model.mixers.attention.max_len=256").eval()
    growth = step_growth(model, None, near=16, far=8192, repeats=3)
    assert growth["cache_limit"] == 256 and growth["far"] == 255 and "onnxruntime_ratio" not in growth
    assert growth["eager_near"]["runs"] == growth["eager_far"]["runs"] == 3


def test_the_command_needs_runs_or_presets():
    result = subprocess.run([*SEQMIX, "lowering"], capture_output=True, text=True)
    assert result.returncode == 2 and "give runs=[<run dir>,...] or presets=[<preset>,...]" in result.stderr


def test_matmul_throughput_measures_both_runtimes_on_the_same_product():
    measured = matmul_throughput(rows=256, inner=64, columns=128, repeats=3)
    assert measured["shape"] == [256, 64, 128] and measured["cpu"]
    assert measured["torch_gflops"] > 0 and measured["onnxruntime_gflops"] > 0
    for runtime in ("torch", "onnxruntime"):
        timing = measured[runtime]
        assert timing["runs"] == 3 and timing["low_ms"] <= timing["median_ms"] <= timing["high_ms"]
    line = throughput_line(measured)
    assert "256×64 · 64×128" in line and f"PyTorch {measured['torch_gflops']:.0f} GFLOP/s" in line
