"""Text from files someone else wrote reaches the terminal with its control characters escaped:
tables, error lines, the training sample, ``seqmix generate`` and the export's own runner."""
from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import unicodedata
from pathlib import Path

import pytest
import torch

from seqmix.cli import main
from seqmix.tables import markdown_table, write_csv
from seqmix.terminal import CONTROLS, escape_controls
from conftest import onnx_runner
from test_training import run, small

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = "a\x1b]0;title\x07\x1b[2Jb\rc\u202edcba\u2066\x9b31m\x7f\x00d"
"""Escape sequences (retitle, clear), a carriage return, a right-to-left override, an isolate, a
one-character CSI, DEL and NUL: each is acted on by some terminal when printed raw."""


def acted_on(text: str) -> list[str]:
    """The characters of ``text`` that a terminal would act on, line feeds and tabs aside."""
    return [c for c in text if c not in "\n\t" and (unicodedata.category(c) in ("Cc", "Cs") or c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")]


def run_onnx_module():
    spec = importlib.util.spec_from_file_location("run_onnx_under_test", ROOT / "export" / "run_onnx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_control_character_is_escaped_as_python_writes_it_and_nothing_else_changes():
    # Every code point of the Basic Multilingual Plane, surrogates included, and a few beyond it.
    for code in [*range(0x10000), 0x1F600, 0x10FFFF]:
        character = chr(code)
        shown = escape_controls(f"<{character}>")
        if CONTROLS.fullmatch(character):
            assert shown == f"<{repr(character)[1:-1]}>" and shown.isascii() and not acted_on(shown), hex(code)
        else:
            assert shown == f"<{character}>", hex(code)
    assert not acted_on(escape_controls(HOSTILE)) and "\\x1b[2J" in escape_controls(HOSTILE)
    # What ``keep`` names passes unchanged; the rest is still escaped.
    assert escape_controls("a\n\tb\r", keep="\n\t") == "a\n\tb\\r"


def test_the_standalone_runner_escapes_the_same_characters_the_same_way():
    runner = run_onnx_module()
    for code in range(0x10000):
        text = f"x{chr(code)}y"
        assert runner.escape_controls(text, keep="\n\t") == escape_controls(text, keep="\n\t"), hex(code)


def test_a_table_cell_or_header_holding_control_characters_or_line_breaks_stays_one_row():
    table = markdown_table([f"name{HOSTILE}"], [[HOSTILE + "\nsecond line|x"], ["plain"]])
    lines = table.splitlines()
    assert len(lines) == 4 and not acted_on(table)
    assert lines[2] == f"| {escape_controls(HOSTILE)}\\nsecond line\\|x |"


def test_gather_shows_a_hostile_run_record_escaped(tmp_path, capsys):
    run(small(tmp_path, "train.max_steps=2", out="runs/r0"))
    record_path = tmp_path / "runs" / "r0" / "run.json"
    record = json.loads(record_path.read_text())
    record["preset"] = {"model": "mega", "task": HOSTILE}
    record_path.write_text(json.dumps(record))
    hostile_dir = tmp_path / "runs" / "r0"
    hostile_dir.rename(tmp_path / "runs" / "r\x1b[31m0")
    capsys.readouterr()
    assert main(["gather", f"root={tmp_path / 'runs'}"]) == 0
    out = capsys.readouterr().out
    assert not acted_on(out), out
    assert escape_controls(HOSTILE) in out and "r\\x1b[31m0" in out


def test_an_error_line_quoting_a_hostile_name_is_one_line_with_it_escaped(tmp_path, capsys):
    missing = tmp_path / f"run{HOSTILE.replace(chr(0), '')}"
    assert main(["evaluate", f"checkpoint='{missing}'"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not acted_on(err), err
    assert err.startswith("seqmix evaluate: error: ") and "\\x1b[2J" in err


def tokens_spelling(text: str):
    """A stand-in for ``stream_tokens`` that yields the bytes of ``text`` as (1, 1) token tensors."""

    def stream(model, prompt, count, **options):
        for byte in text.encode():
            yield torch.tensor([[byte]])

    return stream


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("terminal")
    run(small(directory, "train.max_steps=2"))
    return directory / "run"


def test_gather_csv_writes_text_a_spreadsheet_would_evaluate_as_text(byte_run, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    hostile = runs / "=HYPERLINK(1)"
    shutil.copytree(byte_run, hostile)
    record = json.loads((hostile / "run.json").read_text())
    record["preset"] = {"model": "@SUM(A1)", "task": "-1+2"}
    (hostile / "run.json").write_text(json.dumps(record))
    monkeypatch.chdir(runs)
    assert main(["gather", "root=.", f"csv={tmp_path / 'runs.csv'}"]) == 0
    with open(tmp_path / "runs.csv", newline="", encoding="utf-8") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["run"] == "'=HYPERLINK(1)" and row["model"] == "'@SUM(A1)" and row["task"] == "'-1+2"
    # Numbers stay numbers, negative ones too.
    numeric = [value for key, value in row.items() if key not in ("run", "model", "task") and value]
    assert numeric and all(not value.startswith("'") for value in numeric), row
    assert "=HYPERLINK(1)" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["=1+1", "+1", "-1", "@A1", "\tx", "\rx"])
def test_a_csv_text_cell_that_a_spreadsheet_would_evaluate_is_quoted_and_numbers_are_not(text, tmp_path):
    write_csv([{"text": text, "number": -1.5, "count": -3, "plain": "a=b"}], tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="", encoding="utf-8") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row == {"text": "'" + text, "number": "-1.5", "count": "-3", "plain": "a=b"}


@pytest.mark.parametrize("raw", [False, True])
def test_generate_escapes_what_the_model_and_tokenizer_produce_unless_asked_for_raw_text(byte_run, raw, monkeypatch, capsys):
    import seqmix.model.generation

    produced = HOSTILE + "\n\tend"
    monkeypatch.setattr(seqmix.model.generation, "stream_tokens", tokens_spelling(produced))
    capsys.readouterr()
    assert main(["generate", f"checkpoint={byte_run}", "prompt='def '", f"raw={str(raw).lower()}"]) == 0
    out = capsys.readouterr().out
    if raw:
        assert out == "def " + produced + "\n"
    else:
        assert out == "def " + escape_controls(produced, keep="\n\t") + "\n" and not acted_on(out)


def test_a_prompt_of_bytes_that_are_not_utf8_is_shown_as_text_and_given_to_the_model_as_bytes(byte_run, monkeypatch, capsys):
    """A prompt typed as bytes 0xff 0xfe was echoed as the escapes of Python's surrogates (\\udcff\\udcfe)."""
    import seqmix.model.generation

    given = []
    real = seqmix.model.generation.stream_tokens
    monkeypatch.setattr(seqmix.model.generation, "stream_tokens", lambda model, prompt, *a, **k: given.append(prompt.tolist()) or real(model, prompt, *a, **k))
    prompt = b"a\xff\xfe".decode("utf-8", "surrogateescape")  # as Python decodes such a command-line argument
    capsys.readouterr()
    assert main(["generate", f"checkpoint={byte_run}", f"prompt='{prompt}'", "tokens=1", "temperature=0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("a\ufffd\ufffd") and "udc" not in out
    assert given == [[[97, 255, 254]]]


def test_the_training_sample_is_printed_escaped(tmp_path, monkeypatch, capsys):
    import seqmix.training.reporting

    monkeypatch.setattr(seqmix.training.reporting, "sample_text", lambda model, task: ("def ", HOSTILE + "\n\tx"))
    config = small(tmp_path, "train.max_steps=1")
    overrides = ["model.d_model=32", "model.depth=2", "train.batch_size=4", "train.max_steps=1", "train.eval_batches=1",
                 "train.progress=false", "train.device=cpu", f"train.out_dir={tmp_path / 'run'}",
                 f"task.cache_dir={config.task.cache_dir}", f"task.max_bytes={config.task.max_bytes}"]
    capsys.readouterr()
    assert main(["train", *overrides]) == 0
    out = capsys.readouterr().out
    assert "def " + escape_controls(HOSTILE) + "\n\tx" in out and not acted_on(out)


@pytest.mark.parametrize("raw", [False, True])
def test_the_standalone_runner_escapes_generated_text_and_errors(tmp_path, raw, monkeypatch, capsys):
    runner = run_onnx_module()
    monkeypatch.setattr(runner, "load", lambda directory: {})
    monkeypatch.setattr(runner, "generate", lambda *arguments: HOSTILE)
    assert runner.main([str(tmp_path), "generate", "--prompt", "p", *(["--raw"] if raw else [])]) == 0
    out = capsys.readouterr().out
    assert out == ("p" + HOSTILE if raw else escape_controls("p" + HOSTILE, keep="\n\t")) + "\n"
    # Bytes of the prompt that are not UTF-8 (Python's surrogates for them) are shown as U+FFFD.
    assert runner.main([str(tmp_path), "generate", "--prompt", b"p\xff".decode("utf-8", "surrogateescape")]) == 0
    assert capsys.readouterr().out.startswith("p\ufffd")
    monkeypatch.undo()
    # A path cannot hold NUL (nor can a command line): the rest of HOSTILE as a directory name.
    assert runner.main([str(tmp_path / f"export{HOSTILE.replace(chr(0), '')}"), "classify", "--ids", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not acted_on(err) and "\\x1b[2J" in err, err


def test_generate_shows_no_prompt_when_the_stream_is_refused_at_its_first_step(byte_run, monkeypatch, capsys):
    """The stream allocates its state and checks its logits on its first step, after the prompt was
    printed: 'def ' on stdout, then the refusal (a state beyond the memory, logits not finite)."""
    import seqmix.model.generation

    def refused_at_first_step(*args, **kwargs):
        raise seqmix.SeqmixError("generate: the model's logits for new token 0 are not all finite")
        yield  # a generator, as the real stream is

    monkeypatch.setattr(seqmix.model.generation, "_sampled_tokens", refused_at_first_step)
    capsys.readouterr()
    assert main(["generate", f"checkpoint={byte_run}", "prompt='def '", "tokens=3"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "not all finite" in captured.err


SAMPLING_OPTIONS = [
    ("tokens", 0, False), ("tokens", -1, False), ("tokens", 1, True),
    ("top_k", 0, True), ("top_k", 256, True), ("top_k", 10**6, True), ("top_k", -1, False),
    ("seed", 2**32 - 1, True), ("seed", 2**32, False), ("seed", -1, False),
]


@pytest.mark.parametrize("option, value, taken", SAMPLING_OPTIONS, ids=[f"{o}={v}" for o, v, _ in SAMPLING_OPTIONS])
def test_generate_and_the_exports_runner_take_and_refuse_the_same_sampling_options(option, value, taken, byte_run,
                                                                                    exported_presets, capsys):
    """They differed: tokens=0 and a top_k above the vocabulary taken by one and refused by the other
    (a top_k above it keeps every token: the default 40 must suit a vocabulary of 14), seeds above
    2**32 taken by run_onnx.py only, and 0 for no cut-off refused by seqmix generate."""
    runner = onnx_runner()
    _, export = exported_presets("transformer")  # byte-level, as byte_run's model
    assert runner.load(export.parallel.parent)["vocab_size"] == 256
    options = {"tokens": 2, "temperature": 0.8, "top_k": 40, "seed": 0, option: value}
    cli_status = main(["generate", f"checkpoint={byte_run}", *(f"{key}={number}" for key, number in options.items())])
    flags = [f"--{key.replace('_', '-')}={number}" for key, number in options.items()]
    runner_status = runner.main([str(export.parallel.parent), "generate", *flags])
    err = capsys.readouterr().err
    assert (cli_status, runner_status) == ((0, 0) if taken else (2, 2)), err
    if not taken:
        assert f"{option}={value}" in err and f"--{option.replace('_', '-')}={value}" in err
