"""Loading files someone else wrote: descriptions build only registered parts, configs cannot ask for more than
their weights hold, and integrity cannot be switched off by deleting or linking files.

Each property runs over many generated cases (hypothesis); the counts are the ``max_examples`` below.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqmix
from seqmix import SeqmixError
from conftest import composed_config
from seqmix.model.checkpoint import CHECKSUMS, check_description_fits, read_header, write_checksums
from seqmix.model.description import model_description
from seqmix.training.checkpoints import latest_checkpoint, load_run, save_checkpoint

from conftest import examples, fails_after

FUZZ = settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _copy(finished_run: Path, root: Path) -> Path:
    """A fresh copy of the run under ``root`` (hypothesis reuses one tmp_path for all its cases)."""
    copy = root / f"run-{time.monotonic_ns()}"
    shutil.copytree(finished_run, copy, symlinks=True)
    return copy


# --- class 1: descriptions build registered parts only ------------------------------------------

plain = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
KEYS = ["vocab_size", "d_model", "layers", "depth", "mixers", "block", "ffn", "norm", "final_norm", "head",
        "positions", "max_len", "tie_embeddings", "_target_", "mixer", "local", "local_options"]


def _paths(node, prefix=()):
    """Every (path, map) of the maps nested in ``node``."""
    if isinstance(node, dict):
        yield prefix, node
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))


@functools.cache
def _mega_description() -> str:
    return json.dumps(model_description(composed_config(["model=mega", "model.d_model=16", "model.depth=1"]).model))


@given(data=st.data())
@FUZZ
def test_any_edit_of_a_description_is_built_or_refused_by_name(data):
    """Arbitrary values at arbitrary places of a valid description: a model or a SeqmixError, nothing else."""
    description = json.loads(_mega_description())
    path, node = data.draw(st.sampled_from(list(_paths(description))))
    key = data.draw(st.sampled_from(sorted(node) + KEYS))
    node[key] = data.draw(plain)
    try:
        canonical = model_description(description)
        model = seqmix.instantiate_model(canonical, device="meta")
    except SeqmixError:
        return
    assert "_target_" not in json.dumps(canonical) and model.config == canonical


TARGETS = st.sampled_from(["os.system", "subprocess.run", "builtins.eval", "torch.load", "seqmix.model.checkpoint.os.system",
                           "seqmix.EMA.__init__", "mixers.ema.torch.load", "seqmix.tasks.byte_lm.Path.write_text"]) | st.text(max_size=40)


@given(data=st.data(), target=TARGETS)
@FUZZ
def test_a_target_anywhere_in_a_saved_config_is_refused_before_anything_runs(finished_run, tmp_path, data, target):
    run = _copy(finished_run, tmp_path)
    checkpoint = latest_checkpoint(run)
    config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    path, node = data.draw(st.sampled_from(list(_paths(config))))
    marker = tmp_path / "pwned"
    node.update({"_target_": target, "_args_": [f"touch {marker}"], "path": str(marker)})
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(config))
    write_checksums(checkpoint)  # whoever edits the config can rewrite the checksums too
    before = set(sys.modules)
    with pytest.raises(SeqmixError):
        load_run(run)
    assert not marker.exists()
    assert set(sys.modules) == before, "refusing a config must not import anything"


# --- class 2: a config may not ask for more than its weights hold -------------------------------

BLOWUPS = [
    ("vocab_size",), ("d_model",), ("depth",), ("max_len",), ("ffn", "hidden"),
    ("mixers", "mega", "z_dim"), ("mixers", "mega", "v_dim"), ("mixers", "mega", "heads"),
    ("mixers", "mega", "chunk_size"), ("mixers", "mega", "max_len"), ("mixers", "mega", "local_options"),
]


@given(where=st.sampled_from(BLOWUPS), size=st.integers(2, 10**12))
@FUZZ
def test_a_config_asking_for_a_huge_model_is_refused_before_allocating(finished_run, where, size):
    """The description checked against the weights' header alone: refused fast, or it fits the weights."""
    checkpoint = latest_checkpoint(finished_run)
    description = model_description(yaml.safe_load((checkpoint / "config.yaml").read_text()))
    node = description
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = {"order": size} if where[-1] == "local_options" else size
    header = read_header(checkpoint / "model.safetensors")
    started = time.perf_counter()
    try:
        check_description_fits(model_description(description), header, "model.safetensors")
    except SeqmixError:
        assert time.perf_counter() - started < 5
        return
    # Accepted: then building it costs no more than the weights themselves.
    model = seqmix.instantiate_model(description, device="meta")
    stored = sum(nbytes for _, nbytes in header.values())
    assert sum(p.numel() * p.element_size() for p in model.parameters()) <= stored


def test_a_config_bomb_is_refused_without_memory_or_time(finished_run, tmp_path):
    """The probe's cases end to end, under a 2 GB address-space limit: millions of layers, a huge width or vocabulary."""
    runs = []
    for key, value in (("depth", 10**7), ("d_model", 10**6), ("vocab_size", 10**9)):
        run = _copy(finished_run, tmp_path)
        checkpoint = latest_checkpoint(run)
        config = yaml.safe_load((checkpoint / "config.yaml").read_text())
        config[key] = value
        (checkpoint / "config.yaml").write_text(yaml.safe_dump(config))
        write_checksums(checkpoint)
        runs.append(str(run))
    script = (
        "import resource, sys, time\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "from seqmix.cli import main\n"
        "for run in sys.argv[1:]:\n"
        "    started = time.perf_counter()\n"
        "    status = main(['evaluate', 'checkpoint=' + run])\n"
        "    print(status, round(time.perf_counter() - started, 3))\n"
    )
    probe = subprocess.run([sys.executable, "-c", script, *runs], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert probe.returncode == 0, probe.stderr[-2000:]
    results = [line.split() for line in probe.stdout.splitlines()]
    assert [status for status, _ in results] == ["2"] * len(runs), probe.stderr[-2000:]
    assert all(float(seconds) < 10 for _, seconds in results), results
    refusals = [line for line in probe.stderr.splitlines() if "error:" in line]
    assert len(refusals) == len(runs) and all("does not belong to these weights" in line or "refusing to allocate" in line
                                              for line in refusals), refusals


# --- class 3: integrity that cannot be switched off ---------------------------------------------

CHECKPOINT_FILES = ["checksums.json", "trainer.json", "optimizer.safetensors", "run.json", "config.yaml", "model.safetensors"]


@given(removed=st.sets(st.sampled_from(CHECKPOINT_FILES), min_size=1))
@FUZZ
def test_deleting_files_never_skips_verification(finished_run, tmp_path, removed):
    run = _copy(finished_run, tmp_path)
    checkpoint = latest_checkpoint(run)
    for name in removed:
        (checkpoint / name).unlink()
    with pytest.raises(SeqmixError):
        load_run(run)
    if removed == {CHECKSUMS} or removed <= {CHECKSUMS, "trainer.json", "optimizer.safetensors", "run.json"} and CHECKSUMS in removed:
        # Asked for by name, an unverified load of a complete model works.
        model, _ = load_run(run, allow_unverified=True)
        assert model.vocab_size == 64


@given(name=st.sampled_from(CHECKPOINT_FILES), offset=st.floats(0, 1, exclude_max=True), flip=st.integers(1, 255))
@FUZZ
def test_a_changed_byte_in_any_checkpoint_file_is_refused(finished_run, tmp_path, name, offset, flip):
    run = _copy(finished_run, tmp_path)
    path = latest_checkpoint(run) / name
    data = bytearray(path.read_bytes())
    data[int(offset * len(data))] ^= flip
    path.write_bytes(bytes(data))
    with pytest.raises(SeqmixError):
        load_run(run)


@given(name=st.sampled_from(CHECKPOINT_FILES))
@FUZZ
def test_a_symlink_in_a_checkpoint_is_refused_even_to_identical_bytes(finished_run, tmp_path, name):
    run = _copy(finished_run, tmp_path)
    checkpoint = latest_checkpoint(run)
    outside = tmp_path / f"outside-{time.monotonic_ns()}"
    shutil.move(checkpoint / name, outside)
    (checkpoint / name).symlink_to(outside)
    for allow_unverified in (False, True):
        with pytest.raises(SeqmixError, match="symbolic link"):
            load_run(run, allow_unverified=allow_unverified)


def test_a_symlinked_checkpoint_is_never_loaded_counted_or_deleted_through(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.copytree(latest_checkpoint(run), outside)
    link = run / "checkpoints" / "step-99999999"
    link.symlink_to(outside, target_is_directory=True)
    (run / "checkpoints" / "latest").write_text(json.dumps({"checkpoint": link.name, "step": 99999999}))
    with pytest.raises(SeqmixError, match="symbolic links are refused"):
        load_run(run)
    # A new checkpoint with keep=1 keeps the real one it wrote; the link is neither kept nor followed.
    model, _ = load_run(latest := sorted(p for p in (run / "checkpoints").glob("step-0*"))[-1])
    optimizer = torch.optim.AdamW(model.parameters())
    final = save_checkpoint(run, 5, model, optimizer, keep=1)
    assert final.is_dir() and latest_checkpoint(run) == final
    assert sorted(outside.iterdir()) and (outside / "model.safetensors").is_file(), "the outside directory was deleted"
    assert not latest.exists()


def test_checkpoints_past_99_999_999_steps_are_found_and_kept_by_step_not_by_name(finished_run, tmp_path):
    """step-100000000 has a ninth digit: it is still a checkpoint, and it sorts after step-99999999."""
    run = _copy(finished_run, tmp_path)
    model, _ = load_run(run)
    optimizer = torch.optim.AdamW(model.parameters())
    before = save_checkpoint(run, 99_999_999, model, optimizer, keep=2)
    after = save_checkpoint(run, 100_000_000, model, optimizer, keep=1)
    assert after.name == "step-100000000" and latest_checkpoint(run) == after
    assert not before.exists(), "keep=1 kept the older checkpoint"
    assert load_run(run)[0] is not None


def test_evaluate_refuses_an_unverified_checkpoint_unless_asked_by_name(finished_run, tmp_path, capsys):
    from seqmix.cli import main

    run = _copy(finished_run, tmp_path)
    (latest_checkpoint(run) / CHECKSUMS).unlink()
    assert main(["evaluate", f"checkpoint={run}", "batches=1", "batch_size=2"]) == 2
    assert "checksums.json is missing" in capsys.readouterr().err
    assert main(["evaluate", f"checkpoint={run}", "batches=1", "batch_size=2", "allow_unverified=true"]) == 0
    assert "loss" in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("evaluation", [
    {"batches": 0, "batch_size": 2, "bf16": False}, {"batches": "1", "batch_size": 2, "bf16": False},
    {"batches": 1, "batch_size": 2.0, "bf16": False}, {"batches": 1, "batch_size": 2, "bf16": "false"},
    {"batches": 1, "batch_size": 2}, {"batches": 1, "batch_size": 2, "bf16": False, "_target_": "os.system"}, [1, 2, False],
    {1: 2, "batches": 1},
], ids=["zero batches", "a string count", "a float size", "a string bool", "a missing key", "an extra key", "a list",
        "keys that do not sort together"])
@pytest.mark.parametrize("where", ["run", "pretrained"])
def test_a_recorded_evaluation_that_is_not_one_is_refused_naming_the_file(finished_run, tmp_path, capsys, evaluation, where):
    """A run record's or pretrained config's ``evaluation`` (how evaluate scores by default) that is not
    {batches, batch_size, bf16} with counts >= 1 and a boolean is refused by evaluate naming the file,
    even with the checksums rewritten; save_pretrained refuses it before writing anything."""
    from seqmix.cli import main

    if where == "run":
        directory = latest_checkpoint(_copy(finished_run, tmp_path))
        name = "run.json"
    else:
        model, record = load_run(finished_run)
        with pytest.raises(SeqmixError, match=r"save_pretrained: evaluation"):
            seqmix.save_pretrained(model, tmp_path / "refused", task=record["task"], evaluation=evaluation)
        assert not (tmp_path / "refused").exists()
        directory = seqmix.save_pretrained(model, tmp_path / "pretrained", task=record["task"])
        name = "config.json"
    content = json.loads((directory / name).read_text())
    content["evaluation"] = evaluation
    (directory / name).write_text(json.dumps(content))
    write_checksums(directory)
    assert main(["evaluate", f"checkpoint={directory}"]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"{re.escape(name)}: evaluation(=|: )", err), err


def test_a_task_path_in_a_loaded_record_is_never_followed(tmp_path, monkeypatch):
    """A record's cache_dir belongs to the machine that wrote it; evaluate uses the local default instead."""
    from seqmix.training.records import build_task

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    record = {"task": "byte_lm", "cache_dir": str(tmp_path / "planted"), "max_bytes": 20_000, "seq_len": 32}
    task = build_task(record, trust_paths=False)
    assert not (tmp_path / "planted").exists()
    assert all(path.is_relative_to(tmp_path / "home") for path in task.corpus.cache_paths.values())


# --- JSON nested past Python's recursion limit ----------------------------------------------------

DEEP_JSON = "[" * 100_000
"""100,000 nested arrays: json.loads raises RecursionError on it, which no reader's ``except ValueError`` catches."""


def _deep_run_record(run: Path) -> None:
    (run / "run.json").write_text(DEEP_JSON)
    from seqmix.training.records import read_run_record

    read_run_record(run / "run.json")


def _deep_latest_pointer(run: Path) -> None:
    (run / "checkpoints" / "latest").write_text('{"checkpoint": ' + DEEP_JSON)
    latest_checkpoint(run)


def _deep_checksums(run: Path) -> None:
    from seqmix.model.checkpoint import verify_checksums

    checkpoint = latest_checkpoint(run)
    (checkpoint / CHECKSUMS).write_text(DEEP_JSON)
    verify_checksums(checkpoint)


def _deep_trainer_state(run: Path) -> None:
    from seqmix.training.checkpoints import load_training_state

    checkpoint = latest_checkpoint(run)
    model, _ = load_run(run)
    (checkpoint / "trainer.json").write_text(DEEP_JSON)
    write_checksums(checkpoint)
    load_training_state(checkpoint, model, torch.optim.AdamW(model.parameters()))


def _deep_pretrained_config(run: Path) -> None:
    model, _ = load_run(run)
    seqmix.save_pretrained(model, run / "hf")
    (run / "hf" / "config.json").write_text(DEEP_JSON)
    write_checksums(run / "hf")
    seqmix.from_pretrained(run / "hf")


def _deep_corpus_line(run: Path) -> None:
    from seqmix.tasks import build_task

    corpus = run / "corpus.jsonl"
    corpus.write_text('{"text": "a line"}\n' + DEEP_JSON + "\n")
    build_task("text", path=str(corpus), cache_dir=str(run / "cache"), seq_len=8)


DEEP_READERS = {
    "run record": (_deep_run_record, "run.json is not valid JSON (JSON nested too deeply to read)"),
    "latest pointer": (_deep_latest_pointer, "checkpoints/latest is corrupted"),
    "checksums": (_deep_checksums, "checksums.json is corrupted (JSON nested too deeply to read)"),
    "trainer state": (_deep_trainer_state, "trainer.json or optimizer.safetensors is unreadable (ValueError: JSON nested too deeply to read)"),
    "pretrained config": (_deep_pretrained_config, "config.json is not readable JSON (JSON nested too deeply to read)"),
    "corpus line": (_deep_corpus_line, "corpus.jsonl line 2 is not a JSON object (JSON nested too deeply to read)"),
}


@pytest.mark.parametrize("reader", DEEP_READERS, ids=str)
def test_json_nested_past_the_recursion_limit_is_refused_by_name_wherever_it_is_read(finished_run, tmp_path, reader):
    """Each reader of a JSON file someone else may have written refuses it with a SeqmixError naming the file."""
    damage, named = DEEP_READERS[reader]
    with pytest.raises(SeqmixError, match=re.escape(named)):
        damage(_copy(finished_run, tmp_path))


def test_gather_leaves_out_a_run_whose_record_is_nested_too_deeply(finished_run, tmp_path):
    from seqmix.training.runs import collect_runs

    run = _copy(finished_run, tmp_path)
    (run / "run.json").write_text(DEEP_JSON)
    gathered = collect_runs(tmp_path)
    assert gathered.rows == [] and gathered.problems == [f"left out {run}: run.json is not UTF-8 JSON (JSON nested too deeply to read)"]


def test_a_library_error_quoted_in_a_refusal_is_told_in_one_line(finished_run, tmp_path):
    """YAML's parser error runs over four lines; the refusal quoting it is one."""
    run = _copy(finished_run, tmp_path)
    checkpoint = latest_checkpoint(run)
    (checkpoint / "config.yaml").write_text("a: [1, 2\nb: {")
    write_checksums(checkpoint)
    with pytest.raises(SeqmixError, match=r"config.yaml is not a readable YAML config \(ParserError: while parsing") as refused:
        load_run(run)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("name, grown_to, named", [
    ("model.safetensors", 1 << 40, "model.safetensors holds 1,099,511,627,776 bytes where its safetensors header describes"),
    ("config.yaml", 1 << 40, "config.yaml holds 1,099,511,627,776 bytes, more than such a file may"),
    ("checksums.json", 1 << 40, "checksums.json holds 1,099,511,627,776 bytes, more than such a file may"),
])
def test_a_sparse_terabyte_listed_in_checksums_is_refused_by_its_size_before_any_hashing(finished_run, tmp_path, name,
                                                                                          grown_to, named):
    """A hostile directory can list a sparse file of a terabyte (no disk, hours of hashing) with its
    true digest: the size check refuses it first, in well under a second."""
    run = _copy(finished_run, tmp_path)
    checkpoint = latest_checkpoint(run)
    grown = checkpoint / name
    os.truncate(grown, grown_to)  # sparse: the file system stores no zeros
    try:
        with fails_after(10, "loading the checkpoint"), pytest.raises(SeqmixError, match=re.escape(named)):
            load_run(run)
    finally:
        grown.unlink()  # no terabyte left behind for a tool that copies the test's folders


@pytest.mark.parametrize("name", ["optimizer.safetensors", "model.safetensors"])
def test_a_sparse_weights_file_whose_header_describes_its_length_is_refused_before_any_hashing(finished_run, tmp_path, name):
    """A header describing one 16 GiB tensor made the file's length consistent: it passed the size
    check and was hashed for minutes (hours at a terabyte)."""
    run = _copy(finished_run, tmp_path)
    checkpoint = latest_checkpoint(run)
    length = 1 << 34
    header = json.dumps({"w": {"dtype": "U8", "shape": [length], "data_offsets": [0, length]}}).encode()
    grown = checkpoint / name
    grown.write_bytes(len(header).to_bytes(8, "little") + header)
    os.truncate(grown, 8 + len(header) + length)  # the zeros take no disk
    record = json.loads((checkpoint / "checksums.json").read_text())
    record["files"][name] = "0" * 64  # the size check comes before any digest
    (checkpoint / "checksums.json").write_text(json.dumps(record))
    try:
        with fails_after(10, "loading the checkpoint"), pytest.raises(SeqmixError, match=f"{name} holds 17,179,869,.* bytes of which only .* are on disk \\(a sparse file"):
            load_run(run)
    finally:
        grown.unlink()


@pytest.mark.parametrize("entry", [{"data_offsets": 5}, {"data_offsets": []}, {"data_offsets": [0, "8"]}, [1, 2], "x"])
def test_a_safetensors_header_entry_of_the_wrong_shape_is_refused_by_name(finished_run, tmp_path, entry):
    run = _copy(finished_run, tmp_path)
    checkpoint = latest_checkpoint(run)
    header = json.dumps({"w": entry}).encode()
    (checkpoint / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    write_checksums(checkpoint)
    with pytest.raises(SeqmixError, match="model.safetensors has a safetensors header that is not a map of tensors"):
        load_run(run)
