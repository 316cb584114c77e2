"""Tokenizers: bytes, a BPE tokenizer trained by `seqmix tokenizer`, or the user's tokenizer.json, end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqmix import SeqmixError
from seqmix.cli import main
from seqmix.model.generation import generate
from seqmix.tasks import build_task
from seqmix.tasks.base import MODEL_FILES
from seqmix.terminal import escape_controls
from seqmix.tokenization import ByteTokenizer, TextStream, load_tokenizer, saved_tokenizer, train_bpe

from conftest import examples, onnx_runner

pytestmark = pytest.mark.xdist_group("tokenizers")

WORDS = "the quick brown fox jumps over a lazy dog while mixers stream tokens é ü 漢字 🙂".split()


def write_jsonl(path: Path, documents: int = 120, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "w") as handle:
        for index in range(documents):
            handle.write(json.dumps({"id": index, "text": " ".join(rng.choice(WORDS, 40 + index % 13))}) + "\n")
    return path


def train_options(run: Path, corpus: Path, cache: Path, *extra: str) -> list[str]:
    return ["train", "model=transformer", "model.d_model=16", "model.depth=1", "task=text", f"task.path={corpus}",
            "task.seq_len=24", f"task.cache_dir={cache}", "train.batch_size=2", "train.max_steps=2", "train.eval_batches=1",
            "train.checkpoint_every=1", "train.log_every=1", "train.progress=false", "train.device=cpu",
            f"train.out_dir={run}", *extra]


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """A BPE tokenizer trained by the command, and a 2-step run of a tiny model with it."""
    root = tmp_path_factory.mktemp("bpe")
    corpus = write_jsonl(root / "corpus.jsonl")
    tokenizer = root / "tokenizer.json"
    assert main(["tokenizer", f"path={corpus}", "vocab_size=320", f"out={tokenizer}"]) == 0
    run = root / "run"
    assert main(train_options(run, corpus, root / "cache", f"task.tokenizer={tokenizer}")) == 0
    return root, corpus, tokenizer, run


def test_the_tokenizer_command_writes_a_bpe_tokenizer_that_round_trips(bpe_run):
    _, _, path, _ = bpe_run
    tokenizer = load_tokenizer(path)
    assert tokenizer.vocab_size == 320 and tokenizer.decode([tokenizer.separator]) == "<|endoftext|>"
    text = "the lazy fox streams 漢字 and something it never saw: ∮ E⋅da = Q"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges learned from the corpus shorten it


def test_the_tokenizer_command_refuses_bad_options_before_writing(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", 5)
    out = tmp_path / "t.json"
    for options, message in [
        (["vocab_size=100"], "vocab_size=100 is not valid"),
        # The trainer reserves memory per token up front; 10**9 aborted the process (70 GB allocation).
        (["vocab_size=1000000000"], "vocab_size=1000000000 is not valid; expected at most 1,048,576"),
        # The command's own option names, not a task's (task.text_column): what the user types here.
        (["text_column=body"], "no column 'body'.*; set text_column$"),
        (["format=xml"], "format"),
    ]:
        with pytest.raises(SeqmixError, match=message):
            _tokenizer(corpus, out, *options)
        assert not out.exists()
    out.write_text("mine")
    with pytest.raises(SeqmixError, match="already exists"):
        _tokenizer(corpus, out)
    assert out.read_text() == "mine"
    # overwrite=true replaces a regular file only: it turned a FIFO (and /dev/full) into a file, and
    # told a symbolic link to pass overwrite=true, which it had.
    os.mkfifo(tmp_path / "fifo")
    os.symlink(out, tmp_path / "link.json")
    for target, message in ((tmp_path / "fifo", "is a FIFO"), (tmp_path / "link.json", "is a symbolic link; name the file itself")):
        with pytest.raises(SeqmixError, match=f"out=.* is not valid: it {message}"):
            _tokenizer(corpus, target, "overwrite=true")
    assert (tmp_path / "fifo").is_fifo() and out.read_text() == "mine"
    for corpus_path, message in [(tmp_path / "missing.txt", "^path='.*missing.txt' does not exist"),
                                 (tmp_path / "no_files", "^path='.*no_files' names no files")]:
        if corpus_path.name == "no_files":
            corpus_path.mkdir()
        with pytest.raises(SeqmixError, match=message):
            _tokenizer(corpus_path, tmp_path / "m.json")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(SeqmixError, match="not UTF-8.*use decode_errors=replace$"):
        _tokenizer(tmp_path / "latin1.txt", tmp_path / "l.json", "decode_errors=strict")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SeqmixError, match="no text"):
        _tokenizer(tmp_path / "empty.jsonl", tmp_path / "e.json")
    assert not (tmp_path / "e.json").exists()


def _tokenizer(corpus, out, *options):
    from seqmix.cli import COMMANDS, TokenizerOptions, compose_command, options_of

    config, choices = compose_command(COMMANDS["tokenizer"], [f"path={corpus}", f"out={out}", *options])
    return COMMANDS["tokenizer"].run(options_of(config, TokenizerOptions, "tokenizer"), choices)


@pytest.fixture(scope="module")
def bpe_export(bpe_run):
    """The BPE run exported to ONNX once."""
    root, _, _, run = bpe_run
    out = root / "onnx"
    assert main(["export", f"checkpoint={run}", "format=onnx", f"out={out}", "length=32"]) == 0
    return out


def test_a_bpe_model_saves_its_tokenizer_generates_text_and_streams_the_same_tokens_through_run_onnx(bpe_run, bpe_export, capsys):
    root, _, path, run = bpe_run
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert (run / "tokenizer.json").read_bytes() == path.read_bytes() == (checkpoint / "tokenizer.json").read_bytes()
    assert json.loads((checkpoint / "checksums.json").read_text())["files"]["tokenizer.json"]

    capsys.readouterr()
    assert main(["generate", f"checkpoint={run}", "prompt=the lazy", "tokens=12", "temperature=0"]) == 0
    printed = capsys.readouterr().out.removesuffix("\n")
    model, _ = _load_run(run)
    tokenizer = load_tokenizer(path)
    prompt = tokenizer.encode("the lazy")
    expected = generate(model, torch.tensor([prompt]), 12, temperature=0)[0, len(prompt):].tolist()
    # Shown with its control characters escaped (an untrained model emits some); run_onnx below writes it raw.
    assert printed == escape_controls("the lazy" + tokenizer.decode(expected), keep="\n\t")

    out = bpe_export
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"] == "tokenizer.json" and manifest["files"]["tokenizer.json"]["sha256"]
    runner = _runner(out)
    ids = runner.generate_ids(out, runner.load(out), "the lazy", 12, 0.0, None, 0)
    assert ids == expected
    # The copy in the export runs with ONNX Runtime, NumPy and tokenizers alone.
    result = subprocess.run([sys.executable, str(out / "run_onnx.py"), str(out), "generate", "--prompt", "the lazy",
                             "--tokens", "12", "--temperature", "0", "--raw"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == "the lazy" + tokenizer.decode(expected)


def _load_run(run):
    from seqmix.training.checkpoints import load_run

    return load_run(run)


def _runner(directory: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("exported_run_onnx", directory / "run_onnx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_edited_tokenizer_in_an_export_is_refused(bpe_export, tmp_path):
    import shutil

    out = tmp_path / "onnx"
    shutil.copytree(bpe_export, out)
    edited = json.loads((out / "tokenizer.json").read_text())
    edited["added_tokens"][0]["content"] = "<|hijacked|>"
    (out / "tokenizer.json").write_text(json.dumps(edited))
    runner = _runner(out)
    with pytest.raises(runner.ExportError, match="tokenizer"):
        runner.load(out)
    from seqmix.export.manifest import read_manifest

    with pytest.raises(SeqmixError, match="tokenizer.json"):
        read_manifest(out)


def test_save_pretrained_carries_the_tokenizer_and_export_reads_it(bpe_run, tmp_path):
    root, _, path, run = bpe_run
    from seqmix.training.records import build_task as build_recorded_task

    model, record = _load_run(run)
    task = build_recorded_task(record["task"])
    saved = model.save_pretrained(tmp_path / "pretrained", task=record["task"], files=task.model_files())
    assert (saved / "tokenizer.json").read_bytes() == path.read_bytes()
    assert "tokenizer.json" in (saved / "README.md").read_text()
    loaded = type(model).from_pretrained(saved)
    tokens = torch.tensor([load_tokenizer(path).encode("the quick fox")])
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)
    assert saved_tokenizer(saved).fingerprint == load_tokenizer(path).fingerprint
    # Tools that load the directory (evaluate, generate, export) read the verified copy, not the recorded path.
    _, reread = _load_run(saved)
    assert reread["task"]["tokenizer"] == str(saved / "tokenizer.json") and reread["directory"] == str(saved)


def test_resuming_with_an_edited_tokenizer_is_refused(bpe_run, tmp_path, capsys):
    root, corpus, path, _ = bpe_run
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_bytes(path.read_bytes())
    run = tmp_path / "run"
    assert main(train_options(run, corpus, tmp_path / "cache", f"task.tokenizer={tokenizer}")) == 0
    # The same vocabulary size (so the same model), other merges.
    train_bpe((json.loads(line)["text"][::-1] for line in corpus.read_text().splitlines()), 320, tokenizer)
    assert tokenizer.read_bytes() != path.read_bytes()
    capsys.readouterr()
    assert main(train_options(run, corpus, tmp_path / "cache", f"task.tokenizer={tokenizer}", "train.resume=true",
                              "train.max_steps=3")) == 2
    assert "tokenizer.json is not the one" in capsys.readouterr().err


def test_a_vocabulary_above_65536_stores_uint32_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(70_000)]
    backend = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<|endoftext|>"])
    backend.save(str(tmp_path / "big.json"))
    rng = np.random.default_rng(0)
    chosen = rng.integers(60_000, 70_000, size=(30, 20))
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": " ".join(words[i] for i in row)}) + "\n" for row in chosen))
    task = build_task("text", path=str(tmp_path / "corpus.jsonl"), tokenizer=str(tmp_path / "big.json"),
                      cache_dir=str(tmp_path / "cache"), seq_len=8, valid_fraction=0.2)
    assert task.vocab_size == 70_002 and task.data["train"].dtype == np.uint32
    assert list((tmp_path / "cache" / "text").glob("*/train.u32"))
    batch = task.batch("train", 0, 4)
    assert int(batch.inputs.max()) >= 60_002  # ids above uint16 survive the cache


@pytest.mark.parametrize("source", ["directory", "jsonl", "saved_dataset", "datasets_files"])
def test_training_on_each_source_reuses_its_cache_and_resumes_onto_the_same_batches(source, tmp_path, monkeypatch):
    corpus = _source(source, tmp_path)
    cache = tmp_path / "cache"
    whole, first = tmp_path / "whole", tmp_path / "resumed"
    assert main(train_options(whole, corpus, cache, "train.max_steps=3", *_format(source))) == 0
    from seqmix.tasks.text import TextCorpus

    monkeypatch.setattr(TextCorpus, "_tokenize", lambda self: pytest.fail("the token cache was not reused"))
    assert main(train_options(first, corpus, cache, "train.max_steps=2", *_format(source))) == 0
    assert main(train_options(first, corpus, cache, "train.max_steps=3", "train.resume=true", *_format(source))) == 0
    rows = {name: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for name, run in
            (("whole", whole), ("resumed", first))}
    losses = {name: [row["loss"] for row in found if row["split"] == "train"] for name, found in rows.items()}
    assert len(losses["whole"]) == 3 and losses["resumed"] == losses["whole"]


def _format(source: str) -> list[str]:
    return ["task.format=datasets"] if source == "datasets_files" else []


def _source(source: str, tmp_path: Path) -> Path:
    from conftest import write_text_corpus

    if source == "directory":
        return Path(write_text_corpus(tmp_path / "corpus"))
    path = write_jsonl(tmp_path / "corpus.jsonl", 60)
    if source == "jsonl":
        return path
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if source == "datasets_files":
        return path
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    return saved


@given(text=st.text(max_size=60))
@settings(max_examples=examples(60), deadline=None)
def test_streamed_text_is_the_decoded_text_whatever_the_token_boundaries(text):
    tokenizer = ByteTokenizer()
    stream = TextStream(tokenizer)
    pieces = [stream.push(token) for token in tokenizer.encode(text)]
    # A NUL is the separator, which no text encodes to: it comes back as U+FFFD.
    assert "".join(pieces) + stream.finish() == text.replace("\0", "\ufffd")


@given(text=st.text(max_size=80))
@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_byte_level_bpe_decodes_any_text_exactly(text, bpe_run):
    tokenizer = load_tokenizer(bpe_run[2])
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
    stream = TextStream(tokenizer)
    assert "".join(stream.push(i) for i in ids) + stream.finish() == text


def test_a_special_token_written_in_a_text_is_text_not_the_separator(bpe_run):
    """'<|endoftext|>' inside a document became the separator id: a document boundary where there was none."""
    tokenizer = load_tokenizer(bpe_run[2])
    text = "hello <|endoftext|> world"
    ids = tokenizer.encode(text)
    assert tokenizer.separator not in ids and tokenizer.decode(ids) == text
    assert tokenizer.decode([tokenizer.separator]) == "<|endoftext|>"


def test_a_bad_tokenizer_json_is_refused_by_name(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(SeqmixError, match="broken.json.*not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "broken.json")
    with pytest.raises(SeqmixError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "nosep.json"))
    with pytest.raises(SeqmixError, match="none of the separator tokens"):
        load_tokenizer(tmp_path / "nosep.json")
    os.symlink(tmp_path / "nosep.json", tmp_path / "link.json")
    with pytest.raises(SeqmixError, match="symbolic link"):
        load_tokenizer(tmp_path / "link.json")


def test_the_export_runner_and_the_tasks_agree_on_the_companion_files():
    from seqmix.export.run_onnx import COMPANIONS

    assert set(COMPANIONS) == set(MODEL_FILES)


@pytest.mark.parametrize("name", ["üni code dir", "it's here", "a,b=c", "$HOME", 'say "hi"'])
def test_the_printed_train_command_reads_back_the_corpus_and_tokenizer_paths(name, tmp_path, capsys):
    """A path with a space or a letter outside ASCII was printed bare: the shell split it, Hydra's lexer refused it."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from seqmix.cli import main, shell_override

    corpus = tmp_path / name
    corpus.mkdir()
    write_jsonl(corpus / "c.jsonl", 5)
    out = tmp_path / f"{name}.json"
    arguments = [word for key, value in (("path", corpus), ("out", out)) for word in shlex.split(shell_override(key, value))]
    assert main(["tokenizer", *arguments, "vocab_size=300", "min_frequency=1"]) == 0
    command = capsys.readouterr().out.split("train with ")[1].strip()
    words = shlex.split(command)
    assert words[:3] == ["seqmix", "train", "task=text"]
    parser = OverridesParser.create()
    assert [parser.parse_override(word).value() for word in words[3:]] == [str(corpus), str(out)]


def test_the_tokenizer_command_never_writes_into_its_corpus(tmp_path, capsys):
    """out=<a corpus file> overwrite=true replaced the corpus with the tokenizer, and out inside the
    corpus folder was read as a document by the train command printed after it."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text(f"words of document {i} " * 20)
    before = {path: path.read_bytes() for path in corpus.iterdir()}
    for path, out, told in ((corpus, corpus / "0.txt", "is a file of the corpus"), (corpus, corpus / "tok.json", "is inside the corpus"),
                            (f"{corpus}/*.txt", corpus / "tok.txt", "is inside the corpus"),
                            (corpus / "1.txt", corpus / "1.txt", "is a file of the corpus")):
        assert main(["tokenizer", f"path={path}", "vocab_size=280", f"out={out}", "overwrite=true"]) == 2
        assert told in capsys.readouterr().err
    assert {path: path.read_bytes() for path in corpus.iterdir()} == before
    assert main(["tokenizer", f"path={corpus}", "vocab_size=280", f"out={tmp_path / 'tok.json'}"]) == 0


def _word_level(path: Path, vocabulary: dict[str, int], special=("<|endoftext|>",)) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(list(special))
    backend.save(str(path))
    return path


def test_a_vocabulary_with_gaps_is_as_large_as_its_largest_id(tmp_path):
    """Six tokens with ids up to 65539: the vocabulary read 6, the cache was uint16, and 'quick'
    (65538) was stored as 'the' (2), 'brown' as 'fox'."""
    path = _word_level(tmp_path / "gaps.json", {"[UNK]": 0, "<|endoftext|>": 1, "the": 2, "fox": 3, "quick": 65538, "brown": 65539})
    assert load_tokenizer(path).vocab_size == 65540
    words = np.random.default_rng(0).choice(["the", "quick", "brown", "fox"], size=(60, 12))
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": " ".join(row)}) + "\n" for row in words))
    task = build_task("text", path=str(tmp_path / "corpus.jsonl"), tokenizer=str(path), cache_dir=str(tmp_path / "cache"),
                      seq_len=8, valid_fraction=0.2)
    assert task.vocab_size == 65540 and task.data["train"].dtype == np.uint32
    assert {65538, 65539} <= set(np.unique(task.data["train"]).tolist())


def test_a_tokenizer_files_truncation_and_padding_do_not_cut_or_pad_texts(tmp_path, bpe_run):
    """A tokenizer.json truncating to 8 tokens cut every training document to 8; padding filled the
    corpus with pad tokens; run_onnx.py gave the model a prompt cut the same way."""
    settings = json.loads(Path(bpe_run[2]).read_text())
    settings["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    settings["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                           "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "tokenizer.json").write_text(json.dumps(settings))
    text = "the quick brown fox jumps over the lazy dog, again and again and again"
    whole = load_tokenizer(bpe_run[2]).encode(text)
    assert len(whole) > 8
    assert load_tokenizer(tmp_path / "export" / "tokenizer.json").encode(text) == whole
    codec = onnx_runner().TextCodec(tmp_path / "export", {"tokenizer": "tokenizer.json"})
    assert codec.encode(text) == whole
    assert codec.encode("a <|endoftext|> b") == load_tokenizer(bpe_run[2]).encode("a <|endoftext|> b")


def test_a_separator_that_is_an_ordinary_vocabulary_entry_is_refused(tmp_path):
    """'</s>' as a plain word: a text holding it encoded to the separator, splitting its document."""
    path = _word_level(tmp_path / "plain.json", {"[UNK]": 0, "</s>": 1, "a": 2}, special=())
    with pytest.raises(SeqmixError, match=r"none of the separator tokens .* as a special token \('</s>' is an ordinary "
                                          r"entry of its vocabulary.*add one to its added_tokens with special: true"):
        load_tokenizer(path)
    assert load_tokenizer(_word_level(tmp_path / "special.json", {"[UNK]": 0, "</s>": 1, "a": 2}, special=("</s>",))).separator == 1


def test_a_task_saves_the_tokenizer_it_read_not_the_file_as_it_is_now(tmp_path, bpe_run):
    """save_pretrained read tokenizer.json again when training ended: a file changed meanwhile was
    saved beside weights trained with the other one."""
    root, corpus, tokenizer, _ = bpe_run
    (tmp_path / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    task = build_task("text", path=str(corpus), tokenizer=str(tmp_path / "tokenizer.json"), cache_dir=str(root / "cache"),
                      seq_len=16)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert task.model_files()["tokenizer.json"] == tokenizer.read_bytes()
