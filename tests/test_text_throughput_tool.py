"""tools/measure_text_throughput.py runs end to end: a smoke run of a few MB writes a report of real numbers."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "measure_text_throughput.py"
TINY = ["model.d_model=16", "model.depth=1", "task.seq_len=32", "train.batch_size=2"]


def _run(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(TOOL), *arguments], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=120)


def _numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [number for value in tree.values() for number in _numbers(value)]
    if isinstance(tree, list):
        return [number for value in tree for number in _numbers(value)]
    return [float(tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_a_small_run_writes_a_report_of_positive_finite_numbers(tmp_path):
    out = tmp_path / "out"
    done = _run("--small", "--out-dir", str(out), "--work-dir", str(tmp_path), "--override", *TINY, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "text_throughput.json").read_text())
    measured = {
        "corpus": report["corpus"],
        "tokenization": {key: value for key, value in report["tokenization"].items() if key.endswith(("seconds", "per_s", "bytes"))},
        "training": {name: {key: subject[key] for key in ("tokens_per_s", "tokens_per_cpu_s", "fetch_ms", "step_ms")}
                     for name, subject in report["training"]["subjects"].items()},
        "ratios": [report["training"]["tokens_per_s_ratio_of_medians"], report["training"]["tokens_per_cpu_s_ratio_of_medians"]],
        "cold_fetch_ms": report["cold_fetch_ms_each"],
    }
    numbers = _numbers(measured)
    assert len(numbers) >= 20 and all(math.isfinite(number) and number > 0 for number in numbers), measured
    rounds = report["training"]["rounds"]
    assert all(len(subject[key]) == rounds for subject in report["training"]["subjects"].values()
               for key in ("tokens_per_s", "tokens_per_cpu_s", "fetch_ms"))
    assert report["corpus"]["bytes"] > 3 * 2**20
    ratio = report["training"]["tokens_per_s_ratio_of_medians"]
    assert report["target"]["met"] == (ratio >= 0.95)
    markdown = (out / "text_throughput.md").read_text()
    assert markdown.startswith("# task=text throughput") and f"{ratio:.1%}" in markdown
    assert list(tmp_path.glob("text-throughput-*")) == [], "the work directory is removed without --keep"


def test_a_full_run_below_one_gigabyte_is_refused_naming_the_size(tmp_path):
    done = _run("--gigabytes", "0.5", "--out-dir", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and "--gigabytes 0.5" in done.stderr and "at least 1.0" in done.stderr
    assert not (tmp_path / "text_throughput.json").exists()
