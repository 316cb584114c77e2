"""The wheel as a new user installs it: one top-level package, seqmix, that works from any directory,
and takes a mixer from another installed package wherever a built-in one goes, with no edit to seqmix.

The wheel is built from a copy of the checkout and installed into a fresh virtual environment
outside it, beside a small plugin package (one Mixer subclass and an entry point in the group
``seqmix.mixers``); their dependencies (torch above all) come from this interpreter's environment
through ``--system-site-packages``, so nothing is downloaded. Every command then runs from an empty
temporary directory, where no file of the checkout can be picked up by accident: describe, train,
export to ONNX, evaluate, search and bench, all on a model that uses the plugin's mixer.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from mixer_cases import native_unavailable

ROOT = Path(__file__).resolve().parent.parent
COPY_IGNORED = shutil.ignore_patterns(".git", "build", "dist", "runs", "outputs", "__pycache__", "*.egg-info", ".pytest_cache",
                                     "node_modules")
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
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=COPY_IGNORED)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = (work / "dist").glob("seqmix-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel and the plugin installed, this environment's packages visible."""
    work = tmp_path_factory.mktemp("venv")
    home = work / "env"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(home)], check=True, timeout=120)
    plugin = work / "seqmix-shift-gate"
    plugin.mkdir()
    (plugin / "pyproject.toml").write_text(PYPROJECT)
    (plugin / "shift_gate_mixer.py").write_text(textwrap.dedent(MODULE))
    # This environment's pip, run by the venv's interpreter, installs into the venv.
    for package in (str(wheel), str(plugin)):
        installed = subprocess.run([str(home / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                                    "--no-index", package], capture_output=True, text=True, timeout=300)
        assert installed.returncode == 0, installed.stderr[-3000:]
    return home


def in_venv(venv: Path, cwd: Path, *command: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)
    return subprocess.run(list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_holds_one_top_level_package_with_its_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"seqmix"}
    assert "seqmix/conf/model/megalodon.yaml" in names and "seqmix/conf/config.yaml" in names
    assert "seqmix/export/run_onnx.py" in names and "seqmix/compile/compiler.py" in names
    # The native paths' sources and the header they share, built on the user's machine.
    assert {"seqmix/operators/recurrence_native.cpp", "seqmix/operators/tcn_native.cpp", "seqmix/operators/native_simd.h"} <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "seqmix = seqmix.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_plugin_is_registered_there_and_this_environment_is_untouched(venv, tmp_path):
    listed = in_venv(venv, tmp_path, "python", "-c", "import seqmix; print(seqmix.list_mixers())")
    assert listed.returncode == 0, listed.stderr
    assert PLUGIN_NAME in listed.stdout
    import seqmix as here

    assert PLUGIN_NAME not in here.list_mixers()


def test_the_installed_wheel_describes_trains_exports_evaluates_searches_and_benches_a_plugin_mixer_from_anywhere(venv, tmp_path):
    where = in_venv(venv, tmp_path, "python", "-c", "import seqmix; print(seqmix.__file__); seqmix.build_mixer('ema', 64)")
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()).is_relative_to(venv), "the import must come from the installed wheel"
    if native_unavailable() is None:
        # The native EMA and TCN build from the sources inside the installed package, into the cache it is given.
        native = in_venv(venv, tmp_path, "python", "-c", "import os, torch; os.environ['SEQMIX_CACHE_DIR'] = 'cache'; import seqmix; "
                         "print([tuple(seqmix.build_mixer(name, 20, impl='native')(torch.randn(1, 9, 20)).shape) for name in ('ema', 'tcn')])")
        assert native.returncode == 0 and native.stdout.strip() == "[(1, 9, 20), (1, 9, 20)]", native.stderr[-2000:]
        for library in ("recurrence_native", "tcn_native"):
            assert len(list((tmp_path / "cache" / "native").glob(f"{library}-*.so"))) == 1

    described = in_venv(venv, tmp_path, "seqmix", "describe", "model=megalodon")
    assert described.returncode == 0, described.stderr[-2000:]
    assert "gated_attention (local cema)" in described.stdout and "total parameters" in described.stdout

    trained = in_venv(venv, tmp_path, "seqmix", "train", *TINY, "train.out_dir=run")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step-00000003" / "model.safetensors").is_file()
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["model"]["layers"] == [PLUGIN_NAME, "attention"]

    exported = in_venv(venv, tmp_path, "seqmix", "export", "checkpoint=run", "format=onnx", "length=64")
    assert exported.returncode == 0, exported.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "export" / "onnx" / "manifest.json").read_text())
    assert manifest["parallel"]["max_error"] < 1e-4 and manifest["step"]["max_error"] < 1e-4
    assert (tmp_path / "run" / "export" / "onnx" / "run_onnx.py").is_file()

    evaluated = in_venv(venv, tmp_path, "seqmix", "evaluate", "checkpoint=run", "batches=1", "batch_size=2")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout)["task"] == "mqar"

    searched = in_venv(venv, tmp_path, "seqmix", "search", "search=tiny", f"search.space.mixers=[{PLUGIN_NAME}]",
                       "search.n_trials=1", "search.out_dir=search")
    assert searched.returncode == 0, searched.stderr[-3000:]
    assert PLUGIN_NAME in (tmp_path / "search" / "leaderboard.md").read_text()

    benched = in_venv(venv, tmp_path, "seqmix", "bench", "bench=smoke", f"bench.mixers=[{PLUGIN_NAME}]", "bench.presets=[]",
                      "bench.baseline={}", "bench.runtimes=[eager,onnxruntime]", "bench.lengths=[32]", "bench.out_dir=bench",
                      "bench.progress=false")
    assert benched.returncode == 0, benched.stderr[-3000:]
    rows = json.loads((tmp_path / "bench" / "results.json").read_text())["rows"]
    measured = {row["runtime"] for row in rows if row["subject"] == PLUGIN_NAME and row.get("time_ms")}
    assert measured == {"eager", "onnxruntime"}, rows

    checked = in_venv(venv, tmp_path, "python", "-m", "pip", "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
