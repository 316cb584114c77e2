"""A mixer from another installed package works wherever a built-in one does, without any edit to seqmix.

The test writes a small plugin package (one Mixer subclass and an entry point in the group
``seqmix.mixers``), installs it into a fresh virtual environment that sees this environment's
packages (seqmix included) through ``--system-site-packages``, and drives seqmix there: describe,
train, export to ONNX, search and bench all take the plugin's mixer by its registered name.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN_NAME = "shift_gate"
PYPROJECT = f"""
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "seqmix-shift-gate"
version = "0.1.0"

[project.entry-points."seqmix.mixers"]
{PLUGIN_NAME} = "shift_gate_mixer:ShiftGate"

[tool.setuptools]
py-modules = ["shift_gate_mixer"]
"""
MODULE = '''
"""A one-token causal convolution, y_t = now * x_t + prev * x_(t-1), as a seqmix mixer."""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqmix import Mixer


class ShiftGateState(NamedTuple):
    last: Tensor  # (B, D): the previous token


class ShiftGate(Mixer):
    def __init__(self, d_model: int, causal: bool = True, impl: str | None = None, prev_init: float = 0.5):
        super().__init__(d_model, causal=causal, impl=impl)
        self.now = nn.Parameter(torch.ones(d_model))
        self.prev = nn.Parameter(torch.full((d_model,), prev_init))

    def mix(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        previous = F.pad(x, (0, 0, 1, 0))[:, :-1]
        return x * self.now + previous * self.prev

    def mix_step(self, x: Tensor, state: ShiftGateState):
        previous = torch.cat([state.last.unsqueeze(1), x[:, :-1]], dim=1)
        return x * self.now + previous * self.prev, ShiftGateState(x[:, -1])

    def empty_state(self, batch_size: int, device, dtype) -> ShiftGateState:
        device, dtype = self.param_dtype_device(device, dtype)
        return ShiftGateState(torch.zeros(batch_size, self.d_model, device=device, dtype=dtype))
'''
LAYERS = f"model.layers=[{PLUGIN_NAME},attention]"
TINY = [
    "model=transformer", LAYERS, "model.depth=2", "model.d_model=16", "task=mqar", "task.vocab_size=64",
    "task.seq_len=64", "task.num_pairs=4", "train.batch_size=2", "train.max_steps=3", "train.warmup_steps=1",
    "train.eval_every=3", "train.eval_batches=1", "train.checkpoint_every=3", "train.progress=false", "train.device=cpu",
]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with the plugin installed; seqmix comes from this environment."""
    work = tmp_path_factory.mktemp("plugin")
    source = work / "seqmix-shift-gate"
    source.mkdir()
    (source / "pyproject.toml").write_text(PYPROJECT)
    (source / "shift_gate_mixer.py").write_text(textwrap.dedent(MODULE))
    home = work / "env"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(home)], check=True, timeout=120)
    installed = subprocess.run(
        [str(home / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    return home


def seqmix(venv: Path, cwd: Path, *arguments: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([str(venv / "bin" / "python"), "-m", "seqmix", *arguments], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_plugin_is_registered_and_this_environment_is_untouched(venv, tmp_path):
    listed = subprocess.run([str(venv / "bin" / "python"), "-c", "import seqmix; print(seqmix.list_mixers())"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert PLUGIN_NAME in listed.stdout
    import seqmix as here

    assert PLUGIN_NAME not in here.list_mixers()


def test_the_plugin_mixer_describes_trains_exports_searches_and_benches(venv, tmp_path):
    described = seqmix(venv, tmp_path, "describe", "model=transformer", LAYERS, "model.depth=2")
    assert described.returncode == 0, described.stderr[-2000:]
    assert PLUGIN_NAME in described.stdout

    trained = seqmix(venv, tmp_path, "train", *TINY, "train.out_dir=run")
    assert trained.returncode == 0, trained.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["model"]["layers"] == [PLUGIN_NAME, "attention"]

    exported = seqmix(venv, tmp_path, "export", "checkpoint=run", "format=onnx", "length=64")
    assert exported.returncode == 0, exported.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "export" / "onnx" / "manifest.json").read_text())
    assert manifest["parallel"]["max_error"] < 1e-4 and manifest["step"]["max_error"] < 1e-4

    searched = seqmix(venv, tmp_path, "search", "search=tiny", f"search.space.mixers=[{PLUGIN_NAME}]", "search.n_trials=1",
                      "search.out_dir=search")
    assert searched.returncode == 0, searched.stderr[-3000:]
    assert PLUGIN_NAME in (tmp_path / "search" / "leaderboard.md").read_text()

    benched = seqmix(venv, tmp_path, "bench", "bench=smoke", f"bench.mixers=[{PLUGIN_NAME}]", "bench.presets=[]",
                     "bench.baseline={}", "bench.runtimes=[eager,onnxruntime]", "bench.lengths=[32]", "bench.out_dir=bench",
                     "bench.progress=false")
    assert benched.returncode == 0, benched.stderr[-3000:]
    rows = json.loads((tmp_path / "bench" / "results.json").read_text())["rows"]
    measured = {row["runtime"] for row in rows if row["subject"] == PLUGIN_NAME and row.get("time_ms")}
    assert measured == {"eager", "onnxruntime"}, rows
