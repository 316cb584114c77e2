"""Smoke test of the mixer benchmark on a tiny grid: rows, skips and files, never timings."""
from __future__ import annotations

import itertools
import json
import math
import subprocess
from pathlib import Path

import torch

import seqmix
from seqmix.benchmark import PASSES, BenchConfig, peak_memory_bytes, run_benchmark
from seqmix.operators.tcn import TCN

from conftest import SEQMIX

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = (64, 128)
WIDTH = 16
TINY = dict(lengths=LENGTHS, width=WIDTH, repeats=1, warmup=0)


def test_cpu_peak_counts_the_output_and_temporaries():
    x = torch.randn(2, 256, WIDTH)
    out_bytes = x.numel() * 4
    # exp(x) is a temporary still alive when the product is allocated: the peak holds both.
    assert peak_memory_bytes(lambda: torch.exp(x) * 2, torch.device("cpu")) >= 2 * out_bytes
    assert peak_memory_bytes(lambda: None, torch.device("cpu")) == 0


def test_every_cell_measured_with_a_finite_slope():
    names = ("ema", "tcn")
    result = run_benchmark(BenchConfig(mixers=names, **TINY), progress=False)
    cells = {(r.mixer, r.impl, r.pass_, r.length): r for r in result.rows}
    expected = {(n, i, p, L) for n in names for i in seqmix.mixer_class(n).impls for p in PASSES for L in LENGTHS}
    assert set(cells) == expected
    for row in cells.values():
        assert row.skipped is None, row
        assert row.time_ms > 0 and row.tokens_per_s > 0 and row.runs == 1
        assert 0 < row.time_low_ms <= row.time_ms <= row.time_high_ms
    # The EMA allocates its (B, L, D) float32 output at least.
    assert cells[("ema", "chunked", "forward", 128)].peak_mib * 2**20 >= 128 * WIDTH * 4
    assert {(s.mixer, s.impl, s.pass_) for s in result.slopes} == {key[:3] for key in expected}
    assert all(s.slope is not None and math.isfinite(s.slope) for s in result.slopes)
    assert any(line.startswith("slopes (target ≤ 1.15)") for line in result.targets)


def test_over_budget_memory_is_reported_as_skipped():
    config = BenchConfig(mixers=("softmax_attention",), memory_budget_gb=1e-9, **TINY)
    result = run_benchmark(config, progress=False)
    for row in result.rows:
        if row.impl == "math":
            assert row.time_ms is None and "score matrices" in row.skipped and "--memory-budget-gb" in row.skipped
        else:
            assert row.skipped is None and row.time_ms > 0
    math_slopes = [s for s in result.slopes if s.impl == "math"]
    assert math_slopes and all(s.slope is None and s.reason for s in math_slopes)


def test_over_budget_time_skips_the_longer_lengths():
    config = BenchConfig(mixers=("tcn",), max_seconds_per_run=1e-9, **TINY)
    rows = run_benchmark(config, progress=False).rows
    for impl, pass_ in itertools.product(TCN.impls, PASSES):
        first, second = [r for r in rows if r.impl == impl and r.pass_ == pass_]
        assert first.length == 64 and first.time_ms > 0 and "stopped" in first.note
        assert second.length == 128 and second.time_ms is None and "--max-seconds-per-run" in second.skipped


def test_command_line_writes_json_and_csv(tmp_path):
    command = [*SEQMIX, "bench-mixers", "lengths=[64,128]", f"width={WIDTH}", "repeats=1", "warmup=0",
               "mixers=[ema,softmax_attention]", "memory_budget_gb=1e-9", "progress=false", f"out={tmp_path}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "skipped: estimated score matrices" in done.stdout
    data = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert len(data["rows"]) == (3 + 2) * len(PASSES) * len(LENGTHS)
    csv_lines = (tmp_path / "results.csv").read_text(encoding="utf-8").splitlines()
    assert csv_lines[0].startswith("mixer,impl,pass,length") and len(csv_lines) == 1 + len(data["rows"])
    assert "time_ms,time_low_ms,time_high_ms" in csv_lines[0]
    measured = [row for row in data["rows"] if row["skipped"] is None]
    assert measured and all(row["time_low_ms"] <= row["time_ms"] <= row["time_high_ms"] for row in measured)
    assert "time ms (fastest–slowest)" in done.stdout
