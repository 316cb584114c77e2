"""manifest.json: what an export directory holds, checked before anything runs it.

An export directory is written whole or not at all (``staged_export``): the exporter writes into
a fresh hidden directory beside the target, ``write_manifest`` records every file's sha256 and size
in the manifest's ``files``, and the directory is renamed into place. ``read_manifest`` checks the
manifest and verifies every file it lists before anything opens one; ``run_onnx.py`` restates the
same checks for the graphs it runs, without seqmix; the checks of files and names are the runner's own
functions, which this module reuses.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from seqmix import SeqmixError
from seqmix.errors import first_few, require_writable_dir
# The standalone runner (NumPy only until it opens a session) holds the file checks both readers make.
from seqmix.export import run_onnx

MANIFEST = "manifest.json"
FORMATS = ("onnx", "executorch", "tensorrt")
"""The deployment formats an export directory can hold (``seqmix.export.formats`` writes each)."""
REQUIRED = {"format", "vocab_size", "impls", "files"}
STATE_DTYPES = ("bfloat16", "bool", "float16", "float32", "float64", "int32", "int64")
# The runners build the initial state from each entry's fill. ExecuTorch manifests record it too,
# but those written before it did lack it, and are still read.
NEEDS_FILL = ("onnx", "tensorrt")
# Formats whose parallel graph takes any multiple of ``length_unit`` tokens.
DYNAMIC_LENGTH = ("onnx", "tensorrt")
FILE_NAME = run_onnx.FILE_NAME
COMPANIONS = run_onnx.COMPANIONS


def _as_seqmix_error(check: Callable, *args):
    """``check(*args)``, one of the runner's checks, with its ExportError raised as a SeqmixError."""
    try:
        return check(*args)
    except run_onnx.ExportError as error:
        raise SeqmixError(str(error)) from None


is_file_name = run_onnx.is_file_name
file_record = run_onnx.file_record


def verify_file(out_dir: Path, name: str, files: dict, what: str) -> Path:
    """Check that ``name`` is a regular file of ``out_dir`` (not a symlink) with the size and sha256
    that the manifest's (already validated) ``files`` records for it; return its path.

    Raises SeqmixError naming the file and ``what`` it is for: missing, a symlink or not a regular
    file, not listed in ``files``, another size (truncated or replaced) or another sha256 (modified).
    """
    return _as_seqmix_error(run_onnx.verify_file, out_dir, name, files, what)


def verify_in_export(path: Path, format: str, what: str) -> None:
    """Check a file opened by its own path against the manifest beside it, when that is a ``format``
    export's: the file must be among those it records, with their size and sha256 (``verify_file``).
    A file with no such manifest beside it is left as it is: it was not written by an export.

    Raises SeqmixError naming the file, or the manifest when it cannot be read.
    """
    manifest_path = path.parent / MANIFEST
    if not manifest_path.is_file():
        return
    manifest = _as_seqmix_error(run_onnx.load_json, manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != format:
        return

    def bad(field: str, value, expected: str) -> NoReturn:
        raise SeqmixError(f"{manifest_path}: {field}={value!r} is not valid; expected {expected}. Re-export the model")

    verify_file(path.parent, path.name, run_onnx.check_files(manifest.get("files"), bad), what)


def write_manifest(out_dir: str | Path, manifest: dict) -> dict:
    """Write ``manifest`` to ``out_dir/manifest.json`` atomically, with ``files`` recording every
    regular file of ``out_dir`` (sha256 and size, by file name; the manifest itself excepted).
    Returns the manifest as written; ``manifest`` itself is left unchanged."""
    out_dir = Path(out_dir)
    files = {
        entry.name: file_record(Path(entry.path))
        for entry in sorted(os.scandir(out_dir), key=lambda entry: entry.name)
        if entry.name != MANIFEST and entry.is_file(follow_symlinks=False)
    }
    written = {**manifest, "files": files}
    path = out_dir / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(written, indent=2))
    os.replace(tmp, path)
    return written


def initial_fill(name: str, initial) -> int | float | bool:
    """The one constant a state tensor ``name`` starts as (0, or −1 for empty cache slots), which a
    manifest records as its ``fill``; a tensor that does not start as one constant is refused."""
    fill = initial.flatten()[0].item() if initial.numel() else 0
    if not bool((initial == fill).all()):
        raise SeqmixError(f"state tensor {name} does not start as one constant value; the manifest cannot describe it")
    return fill


def check_export_target(out_dir: str | Path) -> None:
    """Refuse to export into ``out_dir`` unless it is absent, an empty directory or a seqmix export,
    which the new export replaces as a whole: a manifest.json of a seqmix format, and nothing else
    beside it but the files it lists (any folder holding a file of that name was deleted whole: a
    web app's, with its sources)."""
    out_dir = Path(os.path.abspath(out_dir))
    if out_dir == out_dir.parent:
        raise SeqmixError(f"out={str(out_dir)!r} is a filesystem root; choose a directory for the export")
    if out_dir.is_symlink():
        raise SeqmixError(f"out={str(out_dir)!r} is a symbolic link; give the directory itself")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise SeqmixError(f"out={str(out_dir)!r} is not a directory; choose a directory for the export")
    if not any(out_dir.iterdir()):
        return
    if not (out_dir / MANIFEST).is_file():
        raise SeqmixError(f"out={str(out_dir)!r} holds files but no {MANIFEST}, so it is not a seqmix export; "
                          "refusing to replace it. Choose another directory or empty it")
    try:
        manifest = json.loads((out_dir / MANIFEST).read_bytes())
    except (OSError, ValueError, RecursionError):
        manifest = None
    if not (isinstance(manifest, dict) and manifest.get("format") in FORMATS and isinstance(manifest.get("files"), dict)):
        raise SeqmixError(f"out={str(out_dir)!r} holds a {MANIFEST} that is not a seqmix export's (no format of {list(FORMATS)} "
                          "and files); refusing to replace the directory. Choose another directory or empty it")
    foreign = sorted(entry.name for entry in os.scandir(out_dir)
                     if entry.name != MANIFEST and (entry.name not in manifest["files"] or not entry.is_file(follow_symlinks=False)))
    if foreign:
        shown = first_few(foreign)
        raise SeqmixError(f"out={str(out_dir)!r} is a seqmix export with more in it than its {MANIFEST} lists ({shown}); "
                          "refusing to replace the directory. Choose another directory or move those out")


@contextmanager
def staged_export(out_dir: str | Path) -> Iterator[Path]:
    """A fresh directory to write an export into, renamed to ``out_dir`` when the block completes.

    The staging directory, ``.<name>.partial-<pid>-<random>``, sits beside ``out_dir`` (the same
    filesystem, so the rename is atomic) and is removed when the block raises. An existing export
    at ``out_dir`` is replaced only once the new one is complete: it is renamed to
    ``.<name>.replaced-<pid>-<random>``, the new one renamed into place, then the old one removed.
    A process killed mid-export leaves its ``.partial-`` directory behind, which nothing reads.
    """
    out_dir = Path(os.path.abspath(out_dir))  # "." and ".." resolved, so the siblings have a name to derive from
    check_export_target(out_dir)
    require_writable_dir("export: out_dir", out_dir)
    # The folders made for it go again if the export fails: a refused length left <run>/export/ behind.
    made = [folder for folder in (out_dir.parent, *out_dir.parent.parents) if not folder.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(out_dir, "partial")
    staging.mkdir()
    try:
        yield staging
        check_export_target(out_dir)
        _replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in made:  # the deepest first
            try:
                folder.rmdir()
            except OSError:  # another process put something there meanwhile
                break
        raise


def _sibling(out_dir: Path, kind: str) -> Path:
    return out_dir.with_name(f".{out_dir.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _replace(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``, moving an existing ``out_dir`` aside first and deleting it after."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    backup = _sibling(out_dir, "replaced")
    os.rename(out_dir, backup)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(backup, out_dir)
        raise
    shutil.rmtree(backup)


def read_manifest(out_dir: str | Path) -> dict:
    """Load and validate ``manifest.json``, and verify every file it lists, before anything uses it.

    Checks the required keys and their types (a known ``format``, an integer ``vocab_size``,
    ``impls`` a mapping of names, ``files`` a mapping of file names to {sha256, bytes}), that
    every file it names is a bare file name, that inputs and outputs are lists of {name, shape,
    dtype}, that a dynamic-length graph has an integer ``length_unit``, and that the step graph's
    state entries have a name among its inputs, that input's fixed shape, a known dtype and (for
    ONNX) a finite fill. Then every file the manifest names (graphs, optimized graph, variants,
    engine) must be listed in ``files``, and every listed file must be a regular file, not a
    symlink, of the recorded size and sha256 (``verify_file``). Any failure raises SeqmixError
    naming the manifest or the file, the field and the bad value.
    """
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    manifest = _as_seqmix_error(run_onnx.load_json, path)
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
            _check_graph(manifest[section], section, fail)
    if manifest["format"] in DYNAMIC_LENGTH:
        unit = manifest["parallel"].get("length_unit")
        if not _is_int(unit) or unit < 1:
            fail("parallel.length_unit", unit, "an integer >= 1 (exported lengths are multiples of it)")
    if "step" in manifest:
        _check_state(manifest["step"], manifest["format"] in NEEDS_FILL, path, fail)
    files = run_onnx.check_files(manifest["files"], fail)
    named = _named_files(manifest, fail)
    for field, name in named:
        verify_file(out_dir, name, files, field)
    for name in sorted(set(files) - {name for _, name in named}):
        verify_file(out_dir, name, files, "a file the manifest lists")
    return manifest


def _named_files(manifest: dict, fail) -> list[tuple[str, str]]:
    """(field, file name) of every file the manifest points a runtime at, each a bare file name."""
    named = []

    def add(field: str, name) -> None:
        if not is_file_name(name):
            fail(field, name, FILE_NAME)
        named.append((field, name))

    add("parallel.file", manifest["parallel"]["file"])
    if "optimized_file" in manifest["parallel"]:
        add("parallel.optimized_file", manifest["parallel"]["optimized_file"])
    if "step" in manifest:
        add("step.file", manifest["step"]["file"])
    quantized = manifest.get("quantized", {})
    if not isinstance(quantized, dict) or not all(isinstance(entry, dict) for entry in quantized.values()):
        fail("quantized", quantized, "a mapping of variant names to {file, ...}")
    for kind, entry in quantized.items():
        add(f"quantized.{kind}.file", entry.get("file"))
    if "engine" in manifest:
        engine = manifest["engine"]
        add("engine.file", engine.get("file") if isinstance(engine, dict) else engine)
    for name, key in COMPANIONS.items():
        if key in manifest:
            if manifest[key] != name:
                fail(key, manifest[key], repr(name))
            add(key, name)
    return named


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_graph(entry, section: str, fail) -> None:
    """A graph entry: a bare file name (its file is verified later), and well-formed input/output specs."""
    if not isinstance(entry, dict):
        fail(section, entry, "a mapping with file, inputs and outputs")
    # A bare file name: a manifest must not point a runtime at files outside its directory.
    if not is_file_name(entry.get("file")):
        fail(f"{section}.file", entry.get("file"), FILE_NAME)
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
        if not run_onnx.is_state_shape(shape):
            fail(f"{where}.shape", shape, "a list of integer sizes >= 0, the first of which may be 'batch' (state shapes are fixed per sequence)")
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
