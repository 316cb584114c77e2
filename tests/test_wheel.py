"""The wheel as a new user installs it: one top-level package, seqmix, that works from any directory.

The wheel is built from a copy of the checkout and installed into a fresh virtual environment
outside it; its dependencies (torch above all) come from this interpreter's environment through
``--system-site-packages``, so nothing is downloaded. Every command then runs from an empty
temporary directory, where no file of the checkout can be picked up by accident.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COPY_IGNORED = shutil.ignore_patterns(".git", "build", "dist", "runs", "outputs", "__pycache__", "*.egg-info", ".pytest_cache",
                                     "node_modules")
TINY = [
    "model=ema_conv", "model.d_model=16", "model.depth=1", "task=mqar", "task.vocab_size=64", "task.seq_len=128",
    "task.num_pairs=4", "train.batch_size=2", "train.max_steps=3", "train.warmup_steps=1", "train.eval_every=3",
    "train.eval_batches=1", "train.checkpoint_every=3", "train.progress=false", "train.device=cpu",
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
    """A fresh virtual environment with the wheel installed and this environment's packages visible."""
    home = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(home)], check=True, timeout=120)
    # This environment's pip, run by the venv's interpreter, installs into the venv.
    installed = subprocess.run([str(home / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return home


def in_venv(venv: Path, cwd: Path, *command: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)
    return subprocess.run(list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_holds_one_top_level_package_with_its_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"seqmix"}
    assert "seqmix/conf/model/megalodon.yaml" in names and "seqmix/conf/config.yaml" in names
    assert "seqmix/export/run_onnx.py" in names and "seqmix/compile/compiler.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "seqmix = seqmix.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_wheel_describes_trains_exports_and_evaluates_from_anywhere(venv, tmp_path):
    where = in_venv(venv, tmp_path, "python", "-c", "import seqmix; print(seqmix.__file__); seqmix.build_mixer('ema', 64)")
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()).is_relative_to(venv), "the import must come from the installed wheel"

    described = in_venv(venv, tmp_path, "seqmix", "describe", "model=megalodon")
    assert described.returncode == 0, described.stderr[-2000:]
    assert "gated_attention (local cema)" in described.stdout and "total parameters" in described.stdout

    trained = in_venv(venv, tmp_path, "seqmix", "train", *TINY, "train.out_dir=run")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step-00000003" / "model.safetensors").is_file()

    exported = in_venv(venv, tmp_path, "seqmix", "export", "checkpoint=run", "format=onnx", "length=128")
    assert exported.returncode == 0, exported.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "export" / "onnx" / "manifest.json").read_text())
    assert manifest["parallel"]["max_error"] < 1e-4 and (tmp_path / "run" / "export" / "onnx" / "run_onnx.py").is_file()

    evaluated = in_venv(venv, tmp_path, "seqmix", "evaluate", "checkpoint=run", "batches=1", "batch_size=2")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout)["task"] == "mqar"

    checked = in_venv(venv, tmp_path, "python", "-m", "pip", "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
