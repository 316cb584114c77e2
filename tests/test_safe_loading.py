"""Safe loading: nothing in a load path unpickles, configs build only this project's objects, and
manifests are validated before any runtime reads them."""
from __future__ import annotations

import ast
import copy
import hashlib
import json
import pickle
import shutil
import subprocess
from pathlib import Path

import onnxruntime
import pytest

from seqmix import SeqmixError, load_model
from seqmix.model.checkpoint import write_checksums
from seqmix.configs import compose_config
from seqmix.training.experiment import build_experiment
from seqmix.training.checkpoints import latest_checkpoint, load_run
from seqmix.training.loop import train

from seqmix.export.manifest import read_manifest, write_manifest

from conftest import SEQMIX, onnx_runner

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("mixers", "compile", "export", "tools")
UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def _unsafe_loads(source: str) -> list[str]:
    """Every construct in ``source`` that can unpickle: torch.load without weights_only=True, an
    import of a pickling module, pickle-style calls, np.load(allow_pickle=True), yaml's unsafe loaders."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLING_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in UNPICKLING_MODULES:
            found.append(f"{node.value.id}.{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            keywords = {k.arg: k.value for k in node.keywords}

            def is_true(name: str) -> bool:
                return isinstance(keywords.get(name), ast.Constant) and keywords[name].value is True

            if owner == "torch" and node.func.attr == "load" and not is_true("weights_only"):
                found.append("torch.load without weights_only=True")
            if node.func.attr == "load" and is_true("allow_pickle"):
                found.append(f"{owner}.load(allow_pickle=True)")
            if node.func.attr in ("read_pickle", "unsafe_load", "full_load") or (owner == "yaml" and node.func.attr == "load"):
                found.append(f"{owner}.{node.func.attr}")
    return found


def test_the_scanner_finds_every_kind_of_unpickling():
    planted = """
import pickle, dill
import joblib
from cloudpickle import loads
torch.load(path)
torch.load(path, weights_only=False)
np.load(path, allow_pickle=True)
yaml.load(text)
pandas.read_pickle(path)
pickle.loads(data)
"""
    assert _unsafe_loads(planted) == [
        "import pickle", "import dill", "import joblib", "from cloudpickle import ...", "torch.load without weights_only=True",
        "torch.load without weights_only=True", "np.load(allow_pickle=True)", "yaml.load", "pandas.read_pickle", "pickle.loads",
    ]
    assert _unsafe_loads("torch.load(path, weights_only=True)\nnp.load(path, mmap_mode='r')\nyaml.safe_load(t)") == []


def test_nothing_in_the_library_or_tools_can_unpickle():
    files = [path for package in SCANNED for path in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 40
    offences = {str(path.relative_to(ROOT)): found for path in files if (found := _unsafe_loads(path.read_text()))}
    assert offences == {}


class _Payload:
    """Unpickling this touches a marker file: proof that a loader ran pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def command(name: str, *arguments: str) -> int:
    """The exit status of ``seqmix <name> <arguments>``, run in this process."""
    from seqmix.cli import main

    return main([name, *arguments])


def test_a_pickle_in_place_of_the_weights_is_refused_and_never_run(run, tmp_path):
    marker = tmp_path / "unpickled"
    checkpoint = latest_checkpoint(run)
    (checkpoint / "model.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    # Refused by its size against a safetensors header it does not have, before hashing or parsing.
    with pytest.raises(SeqmixError, match="model.safetensors holds .* bytes with no safetensors header"):
        load_run(run)
    write_checksums(checkpoint)  # a matching digest changes nothing: the size check comes first
    with pytest.raises(SeqmixError, match="model.safetensors holds .* bytes with no safetensors header"):
        load_run(run)
    (checkpoint / "checksums.json").unlink()
    with pytest.raises(SeqmixError, match="checksums.json is missing"):
        load_model(checkpoint)
    with pytest.raises(SeqmixError, match="not a readable safetensors file"):
        load_model(checkpoint, allow_unverified=True)
    assert not marker.exists()


def _marker_config(text: str, marker: Path) -> str:
    """A model config whose FFN names os.system with a command that would create ``marker``."""
    assert "\nffn:\n" in text
    return text.replace("\nffn:\n", f"\nffn:\n  _target_: os.system\n  command: touch {marker}\n", 1)


def test_load_run_and_the_tools_refuse_a_checkpoint_config_outside_the_project(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    checkpoint = latest_checkpoint(run)
    config = checkpoint / "config.yaml"
    config.write_text(_marker_config(config.read_text(), marker))
    write_checksums(checkpoint)  # an intact checkpoint whose config is hostile
    with pytest.raises(SeqmixError, match="os.system.*not a part seqmix builds"):
        load_run(run)
    for name, arguments in (("evaluate", [f"checkpoint={run}"]), ("generate", [f"checkpoint={run}", "tokens=1"])):
        assert command(name, *arguments) == 2
        assert "not a part seqmix builds" in capsys.readouterr().err
    export = subprocess.run([*SEQMIX, "export", f"checkpoint={run}"], capture_output=True, text=True)
    assert export.returncode == 2 and "not a part seqmix builds" in export.stderr, export.stderr[-2000:]
    assert not marker.exists()


@pytest.mark.parametrize("part", ["task", "model"])
def test_load_run_refuses_a_run_record_naming_a_target_outside_the_project(part, run, tmp_path, capsys):
    checkpoint = latest_checkpoint(run)
    record = json.loads((checkpoint / "run.json").read_text())
    record[part]["_target_"] = "os.system"
    (checkpoint / "run.json").write_text(json.dumps(record))
    with pytest.raises(SeqmixError, match="run.json does not match its sha256"):
        load_run(run)
    write_checksums(checkpoint)  # whoever can edit the record can rewrite the checksums too
    with pytest.raises(SeqmixError, match=f"run.json: {part}._target_='os.system' is not a part seqmix builds"):
        load_run(run)
    assert command("evaluate", f"checkpoint={run}") == 2
    assert "not a part seqmix builds" in capsys.readouterr().err


def test_load_run_trusts_the_checksummed_record_not_the_one_beside_the_checkpoints(run):
    record = json.loads((run / "run.json").read_text())
    record["task"]["_target_"] = "os.system"
    (run / "run.json").write_text(json.dumps(record))
    _, loaded = load_run(run)
    assert loaded["task"]["task"] == "mqar"


def test_resume_refuses_a_run_record_that_names_another_model(run):
    record = json.loads((run / "run.json").read_text())
    record["model"]["d_model"] = 32
    (run / "run.json").write_text(json.dumps(record))
    config = compose_config([
        "model=mega", "model.d_model=16", "model.depth=1", "task=mqar", "task.vocab_size=64", "task.seq_len=64",
        "task.num_pairs=4", "train.batch_size=2", "train.max_steps=2", "train.progress=false", "train.device=cpu",
        f"train.out_dir={run}", "train.resume=true",
    ])
    experiment = build_experiment(config)
    with pytest.raises(SeqmixError, match="another model or task"):
        train(experiment.model, experiment.task, experiment.train, {"model": experiment.model_config, "task": experiment.task_config})


def test_a_corrupted_run_record_or_latest_pointer_is_refused_by_name(run):
    (run / "checkpoints" / "latest").write_text('{"checkpoint": "../../elsewhere"}')
    with pytest.raises(SeqmixError, match="latest names '../../elsewhere', which is not a checkpoint directory"):
        load_run(run)
    (run / "checkpoints" / "latest").write_text("{")
    with pytest.raises(SeqmixError, match="latest is corrupted"):
        load_run(run)
    # A step of more digits than Python reads as an integer (4,300) was a ValueError from int().
    (run / "checkpoints" / "latest").write_text(json.dumps({"checkpoint": "step-" + "9" * 5000}))
    with pytest.raises(SeqmixError, match="which is not a checkpoint directory"):
        load_run(run)
    checkpoint = next((run / "checkpoints").glob("step-*"))
    (checkpoint / "run.json").write_text("{")
    write_checksums(checkpoint)
    with pytest.raises(SeqmixError, match="run.json is not valid JSON"):
        load_run(checkpoint)


# --- manifests --------------------------------------------------------------------------------

STATE_SHAPE = [1, 16, 4]
VALID_MANIFEST = {
    "format": "onnx",
    "vocab_size": 256,
    "impls": {"blocks.0.mixer": "chunked"},
    "parallel": {
        "file": "model.onnx",
        "inputs": [{"name": "tokens", "shape": ["batch", "length"], "dtype": "tensor(int64)"},
                   {"name": "padding_mask", "shape": ["batch", "length"], "dtype": "tensor(bool)"}],
        "outputs": [{"name": "logits", "shape": ["batch", "length", 256], "dtype": "tensor(float)"}],
        "length_unit": 64,
    },
    "step": {
        "file": "step.onnx",
        "inputs": [{"name": "tokens", "shape": [1, 1], "dtype": "tensor(int64)"},
                   {"name": "state_0", "shape": STATE_SHAPE, "dtype": "tensor(float)"},
                   {"name": "state_1", "shape": [1, 8], "dtype": "tensor(int64)"}],
        "state": [{"name": "state_0", "shape": STATE_SHAPE, "dtype": "float32", "fill": 0},
                  {"name": "state_1", "shape": [1, 8], "dtype": "int64", "fill": -1}],
    },
}


def _set(manifest: dict, path: str, value) -> dict:
    """A copy of ``manifest`` with the dotted ``path`` (list indices as numbers) set, or removed for ``...``."""
    manifest = copy.deepcopy(manifest)
    *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
    node = manifest
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return manifest


# (dotted path, bad value, what both readers must say; None where the ONNX runner says something else)
BAD_MANIFESTS = [
    ("vocab_size", "256", "vocab_size='256' is not valid"),
    ("vocab_size", True, "vocab_size=True is not valid"),
    ("parallel.file", "../model.onnx", "parallel.file='../model.onnx' is not valid"),
    ("parallel.file", 3, "parallel.file=3 is not valid"),
    ("step.file", "gone.onnx", "gone.onnx.*missing"),
    ("parallel.inputs", "tokens", "parallel.inputs='tokens' is not valid"),
    ("parallel.inputs.0.shape", "B,L", r"parallel.inputs\[0\].shape='B,L' is not valid"),
    ("parallel.length_unit", 0, "parallel.length_unit=0 is not valid"),
    ("step.state", "none", "step.state='none' is not valid"),
    ("step.state.0.name", "state_9", r"step.state\[0\].name='state_9' is not valid"),
    ("step.state.0.shape", [1, 16, 5], r"step.state\[0\].shape=\[1, 16, 5\] is not valid"),
    ("step.state.0.shape", [-1, 16, 4], r"step.state\[0\].shape=\[-1, 16, 4\] is not valid"),
    ("step.state.0.dtype", "complex64", r"step.state\[0\].dtype='complex64' is not valid"),
    ("step.state.0.fill", "zero", r"step.state\[0\].fill='zero' is not valid"),
    ("step.state.0.fill", ..., r"step.state\[0\].fill=None is not valid"),
    ("step.state.1.fill", float("nan"), r"step.state\[1\].fill=nan is not valid"),
    # The runner's np.full truncated it to 0 without a word.
    ("step.state.1.fill", 0.5, r"step.state\[1\].fill=0.5 is not valid; expected an integer for dtype int64"),
]
ONLY_READ_MANIFEST = [
    ("format", "coreml", "format='coreml' is not valid"),
    ("impls", ["chunked"], r"impls=\['chunked'\] is not valid"),
    ("parallel", ..., "names no parallel graph"),
]
ONLY_RUNNER = [
    ("format", "executorch", "describes a 'executorch' export; this runner takes ONNX"),
    ("parallel.inputs.0.dtype", "tensor(double)", r"parallel.inputs\[0\].dtype='tensor\(double\)' is not valid"),
    ("step.inputs", VALID_MANIFEST["step"]["inputs"][:2], r"step.state\[1\].name='state_1' is not valid"),
]


@pytest.fixture
def export_dir(tmp_path) -> Path:
    """A directory with (empty) graph files, as validation never opens them."""
    for name in ("model.onnx", "step.onnx"):
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def test_a_well_formed_manifest_passes_both_readers(export_dir):
    written = write_manifest(export_dir, VALID_MANIFEST)
    assert written == {**VALID_MANIFEST, "files": {name: {"sha256": hashlib.sha256(b"").hexdigest(), "bytes": 0}
                                                   for name in ("model.onnx", "step.onnx")}}
    assert read_manifest(export_dir) == written
    assert onnx_runner().load(export_dir) == written


@pytest.mark.parametrize("path, value, message", BAD_MANIFESTS + ONLY_READ_MANIFEST, ids=lambda v: str(v)[:30])
def test_read_manifest_refuses_a_malformed_manifest_naming_the_field(path, value, message, export_dir):
    write_manifest(export_dir, _set(VALID_MANIFEST, path, value))
    with pytest.raises(SeqmixError, match=message):
        read_manifest(export_dir)


@pytest.mark.parametrize("path, value, message", BAD_MANIFESTS + ONLY_RUNNER, ids=lambda v: str(v)[:30])
def test_the_onnx_runner_refuses_a_malformed_manifest_before_opening_a_session(path, value, message, export_dir, monkeypatch, capsys):
    runner = onnx_runner()
    opened = []
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *args, **kwargs: opened.append(args))
    write_manifest(export_dir, _set(VALID_MANIFEST, path, value))
    with pytest.raises(runner.ExportError, match=message):
        runner.load(export_dir)
    assert runner.main([str(export_dir), "generate", "--tokens", "1"]) == 2
    assert "run_onnx: error" in capsys.readouterr().err
    assert opened == []


def test_the_onnx_runner_names_a_state_too_large_to_build(export_dir, monkeypatch):
    """A shape of a million by a million passed, and NumPy's allocation failed with a traceback."""
    runner = onnx_runner()
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *args, **kwargs: pytest.fail("a session was opened"))
    huge = ["batch", 2**20, 2**20]
    write_manifest(export_dir, _set(_set(VALID_MANIFEST, "step.inputs.1.shape", huge), "step.state.0.shape", huge))
    with pytest.raises(runner.ExportError, match=r"step.state\[0\].shape=.* expected at most 2,147,483,648 numbers per sequence"):
        runner.load(export_dir)


def test_an_executorch_manifest_needs_no_fill(export_dir):
    manifest = _set(_set(VALID_MANIFEST, "format", "executorch"), "step.state.0.fill", ...)
    write_manifest(export_dir, _set(manifest, "parallel.length_unit", ...))
    assert read_manifest(export_dir)["format"] == "executorch"


def test_a_weights_name_that_is_no_file_is_named_by_the_run_loaders(tmp_path):
    """evaluate said 'holds no checkpoint' for a folder whose model.safetensors is a folder or a FIFO."""
    import os

    (tmp_path / "folder" / "model.safetensors").mkdir(parents=True)
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "model.safetensors")
    for name, kind in (("folder", "is a directory"), ("fifo", "is a FIFO")):
        with pytest.raises(SeqmixError, match=rf"{name}/model.safetensors {kind}.*; a saved model's weights are a regular file"):
            load_run(tmp_path / name)
