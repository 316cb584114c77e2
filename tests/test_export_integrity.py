"""Exports someone else may have touched: hashes, symlinks, escaping paths, garbled manifests,
atomic replacement, and the standalone runner's arguments.

One tiny model (gpt2 at D = 16, one layer) is exported once per module through ``export_model``,
as ``seqmix export`` does; every case works on a copy of that directory. Both readers are held to
the same promises: ``read_manifest`` (what seqmix itself loads) and ``run_onnx.py`` (what runs on
a device with ONNX Runtime and NumPy alone). No test lets a session open on a refused directory:
ONNX Runtime's ``InferenceSession`` is replaced by one that fails the test.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import examples, onnx_runner, tiny_preset
from seqmix import SeqmixError
from seqmix.export import formats, onnx_export
from seqmix.export.manifest import MANIFEST, read_manifest, write_manifest

TESTS = Path(__file__).resolve().parent
VOCAB = 256
# One worker runs this file (with --dist loadgroup), so its module fixture exports once.
pytestmark = pytest.mark.xdist_group("export_integrity")


def _task():
    from seqmix.tasks.mqar import MQAR

    return MQAR(vocab_size=VOCAB, seq_len=128, num_pairs=8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A complete ONNX export directory (model.onnx, model.ort.onnx, step.onnx, run_onnx.py, manifest.json)."""
    out = tmp_path_factory.mktemp("integrity") / "onnx"
    formats.export_model(tiny_preset("gpt2", "model.d_model=16", "model.depth=1"), _task(), "onnx", out, length=128)
    return out


@pytest.fixture(scope="module")
def runner():
    return onnx_runner()


def _copy(source: Path, factory, name: str = "onnx") -> Path:
    target = factory.mktemp("case") / name
    shutil.copytree(source, target, symlinks=True)
    return target


@contextlib.contextmanager
def no_session(runner):
    """ONNX Runtime sessions fail the test while this is active."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"an InferenceSession was opened on {args[:1]}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnxruntime, "InferenceSession", refuse)
        yield


def _main(runner, argv: list[str]) -> tuple[int, str]:
    """The runner's command line in this process: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = runner.main(argv)
    return status, err.getvalue()


def _assert_one_line_error(status: int, err: str, *names: str) -> None:
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("run_onnx: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in err, (name, err)


def _both_refuse(runner, directory: Path, name: str) -> None:
    """read_manifest, the runner's load and its command line all refuse ``directory`` naming ``name``."""
    with pytest.raises(SeqmixError, match=name):
        read_manifest(directory)
    with no_session(runner):
        with pytest.raises(runner.ExportError, match=name):
            runner.load(directory)
        _assert_one_line_error(*_main(runner, [str(directory), "generate", "--tokens", "2", "--temperature", "0"]), name)


# --- hashes ---------------------------------------------------------------------------------


def test_the_manifest_records_every_file_with_its_sha256_and_size(exported, runner):
    manifest = json.loads((exported / MANIFEST).read_text())
    on_disk = sorted(p.name for p in exported.iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == on_disk
    assert {"model.onnx", "step.onnx", "model.ort.onnx", "run_onnx.py"} <= set(on_disk)
    for name, record in manifest["files"].items():
        data = (exported / name).read_bytes()
        assert record == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert read_manifest(exported) == manifest and runner.load(exported) == manifest


MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True), st.just(0)),
    st.tuples(st.just("extend"), st.just(0.0), st.integers(1, 255)),
)


def _mutate(path: Path, mutation) -> None:
    kind, where, value = mutation
    data = bytearray(path.read_bytes())
    offset = int(where * len(data))
    if kind == "flip":
        data[offset] ^= value
    elif kind == "truncate":
        del data[offset:]
    else:
        data += bytes([value])
    path.write_bytes(bytes(data))


@settings(max_examples=examples(40))
@given(graph=st.sampled_from(["model.onnx", "step.onnx"]), mutation=MUTATIONS)
def test_a_flipped_or_truncated_graph_is_refused_by_name_before_a_session_opens(graph, mutation, exported, runner,
                                                                                  tmp_path_factory):
    case = _copy(exported, tmp_path_factory)
    _mutate(case / graph, mutation)
    _both_refuse(runner, case, graph)


@settings(max_examples=examples(20))
@given(name=st.sampled_from(["model.ort.onnx", "run_onnx.py"]), mutation=MUTATIONS)
def test_read_manifest_refuses_any_changed_file_of_the_export(name, mutation, exported, tmp_path_factory):
    case = _copy(exported, tmp_path_factory)
    _mutate(case / name, mutation)
    with pytest.raises(SeqmixError, match=name):
        read_manifest(case)


def test_the_runner_script_refuses_a_tampered_graph_in_one_line_without_torch(exported, tmp_path_factory):
    """The issue's case: a truncated graph gave ONNX Runtime's traceback; a flipped one ran silently."""
    for mutation in (("truncate", 0.5, 0), ("flip", 0.9, 1)):
        case = _copy(exported, tmp_path_factory)
        _mutate(case / "step.onnx", mutation)
        blocked = ("import runpy, sys; sys.modules.update(torch=None, seqmix=None); "
                   f"sys.argv = ['run_onnx.py', {str(case)!r}, 'generate', '--tokens', '4', '--temperature', '0']; "
                   f"runpy.run_path({str(case / 'run_onnx.py')!r}, run_name='__main__')")
        done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stdout == "", (mutation, done.stdout, done.stderr)
        _assert_one_line_error(done.returncode, done.stderr, "step.onnx")


def test_a_graph_missing_from_the_files_list_is_refused(exported, runner, tmp_path_factory):
    case = _copy(exported, tmp_path_factory)
    manifest = json.loads((case / MANIFEST).read_text())
    del manifest["files"]["step.onnx"]
    (case / MANIFEST).write_text(json.dumps(manifest))
    _both_refuse(runner, case, "step.onnx")
    del manifest["files"]
    (case / MANIFEST).write_text(json.dumps(manifest))
    _both_refuse(runner, case, "files")


# --- symlinks and paths that leave the directory ----------------------------------------------


@pytest.mark.parametrize("where", ["outside", "inside"])
def test_a_symlinked_graph_is_refused_even_when_its_bytes_match(where, exported, runner, tmp_path_factory):
    case = _copy(exported, tmp_path_factory)
    original = case / "model.onnx"
    target = case.parent / "elsewhere.onnx" if where == "outside" else case / "spare.onnx"
    original.rename(target)
    original.symlink_to(target)
    _both_refuse(runner, case, "model.onnx")


def test_a_symlinked_manifest_or_a_directory_in_a_graphs_place_is_refused(exported, runner, tmp_path_factory):
    case = _copy(exported, tmp_path_factory)
    (case / MANIFEST).rename(case.parent / "real.json")
    (case / MANIFEST).symlink_to(case.parent / "real.json")
    _both_refuse(runner, case, MANIFEST)
    case = _copy(exported, tmp_path_factory)
    (case / "step.onnx").unlink()
    (case / "step.onnx").mkdir()
    _both_refuse(runner, case, "step.onnx")


SEGMENTS = st.sampled_from(["..", ".", "", "model.onnx", "sub", "outside.onnx", "..\\outside.onnx", "C:", "a\x00b"])
ESCAPING = st.one_of(
    st.lists(SEGMENTS, min_size=2, max_size=5).map("/".join),
    st.builds(lambda rest: "/" + rest, st.lists(SEGMENTS, max_size=3).map("/".join)),
    st.sampled_from(["..", ".", "", "..\\outside.onnx", "C:outside.onnx", "a\x00b"]),
    st.text(min_size=1, max_size=12).map(lambda text: text + "/" + "outside.onnx"),
).filter(lambda path: path != "model.onnx")


@settings(max_examples=examples(40))
@given(path=ESCAPING, field=st.sampled_from(["parallel", "step", "files"]))
def test_a_manifest_path_that_leaves_the_directory_is_refused(path, field, exported, runner, tmp_path_factory):
    """Every graph file and files-list name must be a bare file name in the export directory.

    A copy of the graph sits where ``../outside.onnx`` points, with the hash the manifest records,
    so a path is refused for what it is, not because nothing is there.
    """
    case = _copy(exported, tmp_path_factory)
    shutil.copyfile(case / "model.onnx", case.parent / "outside.onnx")
    manifest = json.loads((case / MANIFEST).read_text())
    record = manifest["files"]["model.onnx"]
    if field == "files":
        manifest["files"][path] = record
    else:
        manifest[field]["file"] = path
        manifest["files"][path] = record
    (case / MANIFEST).write_text(json.dumps(manifest))
    refusal = "not valid; expected the name of a file in the export directory"
    with pytest.raises(SeqmixError, match=refusal):
        read_manifest(case)
    with no_session(runner), pytest.raises(runner.ExportError, match=refusal):
        runner.load(case)


# --- garbled manifests ------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def _paths(node, prefix=()):
    """Every (key path) into a JSON tree, the root excluded."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def _load_outcome(runner, directory: Path) -> None:
    """Both readers either accept the directory or refuse it with their named error; nothing else escapes."""
    try:
        read_manifest(directory)
    except SeqmixError:
        pass
    with no_session(runner):
        try:
            runner.load(directory)
        except runner.ExportError:
            pass


@settings(max_examples=examples(60))
@given(data=st.data())
def test_a_garbled_manifest_gets_a_named_error_not_a_traceback(data, exported, runner, tmp_path_factory):
    case = _copy(exported, tmp_path_factory)
    text = (case / MANIFEST).read_bytes()
    how = data.draw(st.sampled_from(["bytes", "flips", "truncate", "value"]))
    if how == "bytes":
        garbled = data.draw(st.binary(max_size=64) | st.sampled_from([b"[" * 100_000, b"\xff\xfe{}", b"null", b"[]"]))
    elif how == "flips":
        garbled = bytearray(text)
        flips = st.lists(st.tuples(st.integers(0, len(text) - 1), st.integers(1, 255)), min_size=1, max_size=4)
        for offset, mask in data.draw(flips):
            garbled[offset] ^= mask
    elif how == "truncate":
        garbled = text[: data.draw(st.integers(0, len(text) - 1))]
    else:
        manifest = json.loads(text)
        *parents, last = data.draw(st.sampled_from(list(_paths(manifest))))
        node = manifest
        for key in parents:
            node = node[key]
        node[last] = data.draw(JSON_VALUES)
        garbled = json.dumps(manifest).encode()
    (case / MANIFEST).write_bytes(bytes(garbled))
    _load_outcome(runner, case)


# --- atomic exports ---------------------------------------------------------------------------


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def _fake_graphs(patch, source: Path, fail_in: str | None = None):
    """Replace the graph writers with ones that copy the fixture's graphs (fast), and the latency
    measurement with a stub; ``fail_in`` ("parallel" or "step") raises there after a partial write."""
    manifest = json.loads((source / MANIFEST).read_text())

    def writer(section):
        def write(model, path, *args, **kwargs):
            if section == fail_in:
                path.write_bytes(b"half a graph")
                raise RuntimeError(f"killed while writing the {section} graph")
            shutil.copyfile(source / manifest[section]["file"], path)
            if section == "parallel":
                shutil.copyfile(source / manifest["parallel"]["optimized_file"], path.with_suffix(".ort.onnx"))
            return dict(manifest[section])
        return write

    patch.setattr(onnx_export, "export_parallel", writer("parallel"))
    patch.setattr(onnx_export, "export_step", writer("step"))
    patch.setattr(formats, "compare_latency", lambda *args, **kwargs: {"stub": True})


def test_an_export_to_an_empty_path_is_refused_not_made_in_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SeqmixError, match="^export: out_dir='' is not valid; expected a non-empty path"):
        formats.export_model(tiny_preset("gpt2", "model.d_model=16", "model.depth=1"), _task(), "onnx", "", length=128)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fail_in", ["parallel", "step"])
def test_an_export_that_fails_part_way_leaves_the_old_export_intact(fail_in, exported, runner, tmp_path_factory, monkeypatch):
    old = _copy(exported, tmp_path_factory)
    before = _snapshot(old)
    _fake_graphs(monkeypatch, exported, fail_in=fail_in)
    with pytest.raises(RuntimeError, match=f"killed while writing the {fail_in} graph"):
        formats.export_model(tiny_preset("gpt2", "model.d_model=16", "model.depth=1"), _task(), "onnx", old, length=128)
    assert _snapshot(old) == before
    assert sorted(p.name for p in old.parent.iterdir()) == ["onnx"], "no temporary directory is left behind"
    read_manifest(old)
    runner.load(old)


def test_an_export_that_fails_removes_the_folders_it_made(exported, tmp_path, monkeypatch):
    """seqmix export with a length the model refuses left an empty <run>/export/ behind."""
    _fake_graphs(monkeypatch, exported, fail_in="parallel")
    with pytest.raises(RuntimeError, match="killed while writing the parallel graph"):
        formats.export_model(tiny_preset("gpt2", "model.d_model=16", "model.depth=1"), _task(), "onnx",
                             tmp_path / "export" / "step-1" / "onnx", length=128)
    assert list(tmp_path.iterdir()) == []


def test_an_export_killed_part_way_leaves_the_old_export_intact(exported, runner, tmp_path_factory):
    """SIGKILL while the new parallel graph is half written: the old export is untouched and still
    verifies; what is left is one hidden, clearly named partial directory that no reader opens."""
    old = _copy(exported, tmp_path_factory)
    before = _snapshot(old)
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(TESTS)!r})
from conftest import tiny_preset
from seqmix.export import formats, onnx_export
from seqmix.tasks.mqar import MQAR

def die(model, path, *args, **kwargs):
    path.write_bytes(b"half a graph")
    os.kill(os.getpid(), signal.SIGKILL)

onnx_export.export_parallel = die
formats.export_model(tiny_preset("gpt2", "model.d_model=16", "model.depth=1"), MQAR(vocab_size={VOCAB}, seq_len=128, num_pairs=8),
                     "onnx", {str(old)!r}, length=128)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    assert _snapshot(old) == before
    read_manifest(old)
    runner.load(old)
    leftovers = [p.name for p in old.parent.iterdir() if p.name != "onnx"]
    assert all(name.startswith(".onnx.partial-") for name in leftovers), leftovers


def test_an_export_replaces_an_existing_export_only_as_a_whole(exported, runner, tmp_path_factory, monkeypatch):
    old = _copy(exported, tmp_path_factory)
    (old / "model.int8.onnx").write_bytes(b"a variant of the old export")
    write_manifest(old, {key: value for key, value in json.loads((old / MANIFEST).read_text()).items() if key != "files"})
    _fake_graphs(monkeypatch, exported)
    manifest = formats.export_model(tiny_preset("gpt2", "model.d_model=16", "model.depth=1"), _task(), "onnx", old, length=128)
    assert manifest["latency"] == {"stub": True}
    assert sorted(p.name for p in old.parent.iterdir()) == ["onnx"], "no backup or temporary directory is left behind"
    assert sorted(p.name for p in old.iterdir()) == sorted([*manifest["files"], MANIFEST])
    assert "model.int8.onnx" not in manifest["files"]
    assert read_manifest(old) == manifest and runner.load(old) == manifest


def test_an_export_refuses_to_replace_what_is_not_an_export(tmp_path, monkeypatch):
    def must_not_export(*args, **kwargs):
        raise AssertionError("the export started")

    monkeypatch.setattr(onnx_export, "export_parallel", must_not_export)
    model = tiny_preset("gpt2", "model.d_model=16", "model.depth=1")
    other = tmp_path / "work"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SeqmixError, match="work.*not a seqmix export"):
        formats.export_model(model, _task(), "onnx", other)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(SeqmixError, match="file.*not a directory"):
        formats.export_model(model, _task(), "onnx", tmp_path / "file")
    (tmp_path / "link").symlink_to(other)
    with pytest.raises(SeqmixError, match="link.*symbolic link"):
        formats.export_model(model, _task(), "onnx", tmp_path / "link")
    with pytest.raises(SeqmixError, match="format='coreml' is not valid"):
        formats.export_model(model, _task(), "coreml", tmp_path / "new" / "dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "link", "work"]
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_an_export_replaces_no_folder_that_merely_holds_a_manifest_json_or_more_than_its_export(exported, tmp_path,
                                                                                                   monkeypatch):
    """A web app's folder (its own manifest.json, its sources) was deleted whole by export out=<it>."""
    def must_not_export(*args, **kwargs):
        raise AssertionError("the export started")

    monkeypatch.setattr(onnx_export, "export_parallel", must_not_export)
    model = tiny_preset("gpt2", "model.d_model=16", "model.depth=1")
    app = tmp_path / "app"
    (app / "src").mkdir(parents=True)
    (app / MANIFEST).write_text('{"name": "my-web-app"}')
    (app / "src" / "app.js").write_text("code")
    grown = tmp_path / "grown"
    shutil.copytree(exported, grown)
    (grown / "notes.txt").write_text("mine")
    for folder, message in ((app, "not a seqmix export's"), (grown, r"more in it than its manifest.json lists \(notes.txt\)")):
        with pytest.raises(SeqmixError, match=message):
            formats.export_model(model, _task(), "onnx", folder)
    assert (app / "src" / "app.js").read_text() == "code" and (grown / "notes.txt").read_text() == "mine"


# --- the runner's arguments -------------------------------------------------------------------



def _int_list(text: str) -> bool:
    try:
        [int(part) for part in text.split(",")]
    except ValueError:
        return False
    return True


NOT_INT = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=6).filter(lambda text: not _int_list(text))
BAD_ARGUMENTS = st.one_of(
    st.just(("generate", "--prompt=", "--prompt")),
    st.integers(max_value=0).map(lambda n: ("generate", f"--tokens={n}", "--tokens")),
    NOT_INT.map(lambda text: ("generate", f"--tokens={text}", "--tokens")),
    st.one_of(st.floats(max_value=-1e-9), st.sampled_from([float("nan"), float("inf"), float("-inf")])).map(
        lambda t: ("generate", f"--temperature={t}", "--temperature")),
    st.integers(max_value=-1).map(lambda k: ("generate", f"--top-k={k}", "--top-k")),
    st.integers(max_value=-1).map(lambda s: ("generate", f"--seed={s}", "--seed")),
    st.one_of(
        st.just(""),
        st.lists(st.one_of(st.integers(max_value=-1), st.integers(min_value=VOCAB)), min_size=1, max_size=3).map(
            lambda ids: ",".join(map(str, ids))),
        NOT_INT,
    ).map(lambda ids: ("classify", f"--ids={ids}", "--ids")),
)


@settings(max_examples=examples(60))
@given(bad=BAD_ARGUMENTS)
def test_the_runner_refuses_a_bad_argument_in_one_line_with_status_2(bad, exported, runner):
    mode, argument, option = bad
    with no_session(runner):
        _assert_one_line_error(*_main(runner, [str(exported), mode, argument]), option)


def test_the_runner_refuses_an_empty_prompt_and_a_missing_directory(exported, runner, tmp_path):
    with no_session(runner):
        _assert_one_line_error(*_main(runner, [str(exported), "generate", "--prompt", ""]), "--prompt", "at least one")
        _assert_one_line_error(*_main(runner, [str(tmp_path / "nowhere"), "generate"]), "nowhere")
        _assert_one_line_error(*_main(runner, [str(exported)]), "mode")


def test_a_non_finite_output_is_never_agreement():
    """Python's max kept 0.0 over a NaN (an ExecuTorch program with NaN logits verified with error
    0), and an all-NaN difference was numpy's ValueError from nanargmax, a traceback of seqmix export."""
    import numpy as np
    import torch

    from seqmix.export.agreement import max_difference
    from seqmix.export.onnx_export import ExportMismatch, _compare

    reference = np.ones((2, 3))
    nan_result = reference.copy()
    nan_result[1, 2] = np.nan
    assert max_difference(reference, reference + 1e-6, "graph") == pytest.approx(1e-6)
    assert max_difference(torch.ones(2, 3), torch.tensor(nan_result, dtype=torch.float32), "graph") == float("inf")
    assert max(0.0, max_difference(reference, nan_result, "graph")) == float("inf")
    with pytest.raises(ExportMismatch, match=r"max \|eager − exported\| = inf at index \(1, 2\)"):
        _compare(reference, nan_result, "parallel graph", 1e-4)
    with pytest.raises(SeqmixError, match=r"parallel graph: the model's own \(eager\) outputs are not finite \(at index \(0, 0\)\)"):
        _compare(np.full((2, 3), np.nan), np.full((2, 3), np.nan), "parallel graph", 1e-4)
    with pytest.raises(ExportMismatch, match=r"= 5.000e-01 at index \(0, 1\)"):
        _compare(reference, reference + np.array([[0, 0.5, 0], [0, 0, 0]]), "parallel graph", 1e-4)
