"""manifest.json: what an export directory holds, checked before anything runs it."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import NoReturn

from seqmix import SeqmixError

MANIFEST = "manifest.json"
FORMATS = ("onnx", "executorch", "tensorrt")
"""The deployment formats an export directory can hold (``seqmix.export.formats`` writes each)."""
REQUIRED = {"format", "vocab_size", "impls"}
STATE_DTYPES = ("bfloat16", "bool", "float16", "float32", "float64", "int32", "int64")
# The ONNX runner builds the initial state from each entry's fill; ExecuTorch callers build it
# from the model, so its manifests record none.
NEEDS_FILL = ("onnx", "tensorrt")
# Formats whose parallel graph takes any multiple of ``length_unit`` tokens.
DYNAMIC_LENGTH = ("onnx", "tensorrt")


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    """Write ``manifest.json`` atomically."""
    path = Path(out_dir) / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)
    return path


def read_manifest(out_dir: str | Path) -> dict:
    """Load and validate ``manifest.json`` before anything uses it.

    Checks the required keys and their types (a known ``format``, an integer ``vocab_size``,
    ``impls`` a mapping of names), that every graph file it names is a file in ``out_dir``, that
    inputs and outputs are lists of {name, shape, dtype}, that a dynamic-length graph has an
    integer ``length_unit``, and that the step graph's state entries have a name among its
    inputs, that input's fixed shape, a known dtype and (for ONNX) a finite fill. Any failure
    raises SeqmixError naming the manifest, the field and the bad value.
    """
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise SeqmixError(f"{path} does not exist; export the model first with seqmix export")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SeqmixError(f"{path} is not valid JSON ({error}); re-export the model") from None
    if not isinstance(manifest, dict) or not REQUIRED <= set(manifest):
        present = set(manifest) if isinstance(manifest, dict) else set()
        raise SeqmixError(f"{path} lacks the keys {sorted(REQUIRED - present)}; re-export the model")

    def fail(field: str, value, expected: str) -> NoReturn:
        raise SeqmixError(f"{path}: {field}={value!r} is not valid; expected {expected}. Re-export the model")

    if manifest["format"] not in FORMATS:
        fail("format", manifest["format"], f"one of {list(FORMATS)}")
    if not _is_int(manifest["vocab_size"]) or manifest["vocab_size"] < 2:
        fail("vocab_size", manifest["vocab_size"], "an integer >= 2")
    impls = manifest["impls"]
    if not isinstance(impls, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in impls.items()):
        fail("impls", impls, "a mapping of module names to impl names")
    if "parallel" not in manifest:
        raise SeqmixError(f"{path} names no parallel graph; re-export the model")
    for section in ("parallel", "step"):
        if section in manifest:
            _check_graph(manifest[section], section, Path(out_dir), path, fail)
    if manifest["format"] in DYNAMIC_LENGTH:
        unit = manifest["parallel"].get("length_unit")
        if not _is_int(unit) or unit < 1:
            fail("parallel.length_unit", unit, "an integer >= 1 (exported lengths are multiples of it)")
    if "step" in manifest:
        _check_state(manifest["step"], manifest["format"] in NEEDS_FILL, path, fail)
    return manifest


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_graph(entry, section: str, out_dir: Path, path: Path, fail) -> None:
    """A graph entry: a file inside ``out_dir`` that exists, and well-formed input/output specs."""
    if not isinstance(entry, dict):
        fail(section, entry, "a mapping with file, inputs and outputs")
    file = entry.get("file")
    # A bare file name: a manifest must not point a runtime at files outside its directory.
    if not isinstance(file, str) or not file or Path(file).name != file or file in (".", ".."):
        fail(f"{section}.file", file, "the name of a file in the export directory")
    if not (out_dir / file).is_file():
        raise SeqmixError(f"{path} names {file} for the {section} graph, but that file is missing")
    # Every exporter records outputs, but only the inputs are needed to run a graph.
    for key in ("inputs", "outputs") if "outputs" in entry else ("inputs",):
        specs = entry.get(key)
        if not isinstance(specs, list) or not specs:
            fail(f"{section}.{key}", specs, "a non-empty list of {name, shape, dtype}")
        for index, spec in enumerate(specs):
            where = f"{section}.{key}[{index}]"
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("dtype"), str):
                fail(where, spec, "a mapping with a string name and dtype")
            shape = spec.get("shape")
            if not isinstance(shape, list) or not all((_is_int(d) and d >= 0) or isinstance(d, str) for d in shape):
                fail(f"{where}.shape", shape, "a list of sizes (integers >= 0, or names of dynamic dims)")


def _check_state(step: dict, needs_fill: bool, path: Path, fail) -> None:
    """The step graph's state entries: each named among its inputs, with its fixed shape, a known dtype and a fill."""
    state = step.get("state")
    if not isinstance(state, list):
        fail("step.state", state, "a list of {name, shape, dtype, fill}")
    inputs = {spec["name"]: spec for spec in step["inputs"]}
    names = set()
    for index, entry in enumerate(state):
        where = f"step.state[{index}]"
        if not isinstance(entry, dict):
            fail(where, entry, "a mapping with name, shape, dtype and fill")
        name, shape, dtype = entry.get("name"), entry.get("shape"), entry.get("dtype")
        if not isinstance(name, str) or name not in inputs or name in names:
            fail(f"{where}.name", name, f"a distinct name among the step graph's inputs {sorted(inputs)}")
        names.add(name)
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            fail(f"{where}.shape", shape, "a list of integer sizes >= 0 (state shapes are fixed)")
        graph_shape = inputs[name]["shape"]
        if len(graph_shape) != len(shape) or any(_is_int(g) and g != d for g, d in zip(graph_shape, shape)):
            fail(f"{where}.shape", shape, f"the shape of the step graph's input {name!r}, {graph_shape}")
        if dtype not in STATE_DTYPES:
            fail(f"{where}.dtype", dtype, f"one of {list(STATE_DTYPES)}")
        if "fill" in entry or needs_fill:
            fill = entry.get("fill")
            if not isinstance(fill, (int, float)) or isinstance(fill, bool) or not math.isfinite(fill):
                fail(f"{where}.fill", fill, "a finite number (the value every element starts at)")
            if not dtype.startswith(("float", "bfloat")) and fill != int(fill):
                fail(f"{where}.fill", fill, f"an integer for dtype {dtype}")
