"""task=text: the user's own corpus from files, JSONL, CSV, Parquet or a saved dataset, cached as memory-mapped tokens."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqmix import SeqmixError
from seqmix.tasks import build_task
from seqmix.tasks.documents import DocumentSource
from seqmix.tasks.text import TextCorpus
from seqmix.tokenization import ByteTokenizer, token_dtype

from conftest import examples, write_text_corpus


def _task(path, tmp_path, **options) -> TextCorpus:
    return build_task("text", path=str(path), cache_dir=str(tmp_path / "cache"), **{"seq_len": 16, **options})


def test_a_directory_of_files_trains_reuses_its_cache_and_gives_the_same_batches(tmp_path, monkeypatch, capsys):
    from seqmix.cli import main

    corpus = write_text_corpus(tmp_path / "corpus")
    first = _task(corpus, tmp_path)
    assert first.meta["documents"]["train"] + first.meta["documents"]["valid"] == 40
    assert isinstance(first.data["train"], np.memmap)
    monkeypatch.setattr(TextCorpus, "_tokenize", lambda self: pytest.fail("the cache was not reused"))
    second = _task(corpus, tmp_path)
    for split in ("train", "valid"):
        for index in (0, 5):
            torch.testing.assert_close(second.batch(split, index, 3).inputs, first.batch(split, index, 3).inputs, rtol=0, atol=0)
    monkeypatch.undo()
    run = tmp_path / "run"
    arguments = ["train", "model=transformer", "model.d_model=16", "model.depth=1", "task=text", f"task.path={corpus}",
                 "task.seq_len=32", f"task.cache_dir={tmp_path / 'cache'}", "train.batch_size=2", "train.max_steps=2",
                 "train.eval_batches=1", "train.checkpoint_every=1", "train.log_every=1", "train.progress=false", "train.device=cpu", f"train.out_dir={run}"]
    assert main(arguments) == 0
    assert main([*arguments[:-1], f"train.out_dir={run}", "train.max_steps=3", "train.resume=true"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["split"] == "train"] == [1, 2, 3]


def test_binary_files_are_left_out_of_a_corpus_by_name_and_read_when_asked(tmp_path, capsys):
    import gzip

    from seqmix.cli import main
    from seqmix.errors import SeqmixWarning

    corpus = Path(write_text_corpus(tmp_path / "corpus"))
    texts = sum(_task(corpus, tmp_path).meta["documents"].values())
    (corpus / "notes.txt.gz").write_bytes(gzip.compress(b"compressed words " * 200))
    (corpus / "wide.txt").write_bytes("text saved as UTF-16\n".encode("utf-16") * 50)
    # The NUL past the probe: the file is text up to there, and read as such.
    (corpus / "late.txt").write_bytes(b"a" * 8192 + b"\0")
    with pytest.warns(SeqmixWarning, match=r"left out 2 of 43 files, which hold binary data.*notes.txt.gz, .*wide.txt"):
        assert sum(_task(corpus, tmp_path).meta["documents"].values()) == texts + 1
    assert sum(_task(corpus, tmp_path, format="text").meta["documents"].values()) == texts + 3
    with pytest.raises(SeqmixError, match=r"every file holds binary data.*notes.txt.gz; give text files, or task.format=text"):
        _task(corpus / "notes.txt.gz", tmp_path)
    # The command prints it as one line, without Python's file and line.
    out = tmp_path / "tokenizer.json"
    assert main(["tokenizer", f"path={corpus}", "vocab_size=300", f"out={out}"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned and warned[0].startswith("seqmix: warning: tokenizer: left out 2 of 43 files"), warned


def test_an_edited_file_makes_a_new_cache(tmp_path):
    corpus = write_text_corpus(tmp_path / "corpus")
    key = _task(corpus, tmp_path).key
    (tmp_path / "corpus" / "doc000.txt").write_text("changed\n" * 50)
    assert _task(corpus, tmp_path).key != key


def test_two_corpora_whose_names_and_bytes_run_together_alike_get_their_own_caches(tmp_path):
    """The key hashed each file's name, a NUL and its bytes with no length: a.txt = X + 'b.tx' beside
    a file 't' = Y hashed as a.txt = X beside b.txt = Y, and trained on that corpus's cached tokens."""
    fillers = {f"z{i}.txt": f"filler document {i} " * 20 for i in range(8)}
    first = {"a.txt": "first text " * 30, "b.txt": "second text " * 30, **fillers}
    second = {"a.txt": "first text " * 30 + "b.tx", "t": "second text " * 30, **fillers}
    keys = []
    for name, files in (("one", first), ("two", second)):
        (tmp_path / name).mkdir()
        for file, text in files.items():
            (tmp_path / name / file).write_text(text)
        task = _task(tmp_path / name, tmp_path, valid_fraction=0.5)
        keys.append(task.key)
        assert task.meta["source"] == str(tmp_path / name)
    assert keys[0] != keys[1]


def test_jsonl_csv_parquet_and_a_saved_dataset_give_the_same_documents(tmp_path):
    documents = [f"row {i}: " + "abc " * (20 + i) for i in range(30)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(documents)))
    (tmp_path / "data.csv").write_text("id,text\n" + "".join(f'{i},"{d}"\n' for i, d in enumerate(documents)))
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": documents}), tmp_path / "data.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": documents}).save_to_disk(str(tmp_path / "saved"))
    metas = [_task(tmp_path / name, tmp_path).meta for name in ("data.jsonl", "data.csv", "data.parquet", "saved")]
    assert len({meta["content_sha256"] for meta in metas}) == 1
    assert metas[0]["documents"]["train"] + metas[0]["documents"]["valid"] == len(documents)


def test_bad_corpora_are_refused_naming_the_file_and_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SeqmixError, match="names no files; the corpus is empty"):
        _task(tmp_path / "empty", tmp_path)
    with pytest.raises(SeqmixError, match="does not exist"):
        _task(tmp_path / "nowhere", tmp_path)
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x" * 100}) + "\n" + json.dumps({"body": "y"}) + "\n")
    with pytest.raises(SeqmixError, match=r"a.jsonl line 2 has no column 'text'"):
        _task(tmp_path / "a.jsonl", tmp_path)
    (tmp_path / "b.jsonl").write_text("{not json\n")
    with pytest.raises(SeqmixError, match=r"b.jsonl line 1 is not a JSON object"):
        _task(tmp_path / "b.jsonl", tmp_path)
    (tmp_path / "array.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}], indent=1))
    with pytest.raises(SeqmixError, match=r"array.json line 1 is not a JSON object .*read as JSON Lines, one object per line"):
        _task(tmp_path / "array.json", tmp_path)
    (tmp_path / "c.csv").write_text("id,body\n1,hello\n")
    with pytest.raises(SeqmixError, match=r"c.csv has no column 'text'"):
        _task(tmp_path / "c.csv", tmp_path)
    # A field missing from a column not read was taken: a short row is a broken line all the same.
    (tmp_path / "d.csv").write_text("text,label,extra\n" + "a document of words,1,x\n" * 3 + "a document of words,1\n")
    with pytest.raises(SeqmixError, match=r"d.csv line 5 has fewer fields than the header \['text', 'label', 'extra'\]"):
        _task(tmp_path / "d.csv", tmp_path)
    mixed = write_text_corpus(tmp_path / "mixed")
    (tmp_path / "mixed" / "latin1.txt").write_bytes(("ok\n" * 40).encode() + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(SeqmixError, match=r"latin1.txt line 41 holds bytes that are not UTF-8"):
        _task(mixed, tmp_path, decode_errors="strict")
    assert sum(_task(mixed, tmp_path).meta["documents"].values()) == 41  # replace: U+FFFD stands in for the byte
    (tmp_path / "short").mkdir()
    for index in range(2):
        (tmp_path / "short" / f"{index}.txt").write_text("tiny")
    with pytest.raises(SeqmixError, match="split .* has .* tokens .* fewer than seq_len"):
        _task(tmp_path / "short", tmp_path, valid_fraction=0.5)
    # One file is one document, which goes to one split whole: the error says so rather than suggest
    # a valid_fraction that cannot help, and before the file is tokenized into a cache it leaves behind.
    (tmp_path / "novel.txt").write_text("a long single document. " * 200)
    caches = set((tmp_path / "cache" / "text").iterdir())
    with pytest.raises(SeqmixError, match="novel.txt' is one text file, which is one document"):
        _task(tmp_path / "novel.txt", tmp_path)
    assert set((tmp_path / "cache" / "text").iterdir()) == caches
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "a long single document. " * 200}) + "\n")
    with pytest.raises(SeqmixError, match="split .* has 0 tokens \\(0 documents\\).* the corpus is one document"):
        _task(tmp_path / "one.jsonl", tmp_path)
    (tmp_path / "three").mkdir()
    for index in range(3):
        (tmp_path / "three" / f"{index}.txt").write_text(f"document {index}. " * 20)
    with pytest.raises(SeqmixError, match="valid split .* none of the 3 went to valid: give more documents"):
        _task(tmp_path / "three", tmp_path, valid_fraction=1e-9)
    with pytest.raises(SeqmixError, match="path='' is not valid"):
        build_task("text")
    (tmp_path / "broken.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(SeqmixError, match=r"broken.parquet is not a readable Parquet file \(ArrowInvalid: "):
        _task(tmp_path / "broken.parquet", tmp_path)


def test_a_csv_document_longer_than_the_csv_modules_default_field_limit_is_read(tmp_path):
    """The csv module refuses fields over 128 KiB by default; a document (one field) may be any length."""
    corpus = tmp_path / "long.csv"
    documents = ["word " * 40_000, *(f"document {index}. " * 30 for index in range(30))]
    corpus.write_text("text\n" + "".join(f'"{text}"\n' for text in documents))
    task = _task(corpus, tmp_path, valid_fraction=0.5)
    assert sum(task.meta["documents"].values()) == len(documents)


@given(documents=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=25), seed=st.integers(0, 2**16))
@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_document_lands_whole_in_one_split_whatever_the_file_order(documents, seed, tmp_path_factory):
    """Tokens = each document's UTF-8 bytes plus a separator, and a document's split depends on its bytes alone."""
    root = tmp_path_factory.mktemp("docs")
    order = np.random.default_rng(seed).permutation(len(documents))
    for position, index in enumerate(order):
        (root / f"{position:03d}.txt").write_text(documents[index])
    task = TextCorpus.__new__(TextCorpus)
    task.format, task.text_column, task.decode_errors, task.valid_fraction = "auto", "text", "replace", 0.3
    task.path, task.source = str(root), DocumentSource(str(root))
    task.tokenizer, task.dtype = ByteTokenizer(), token_dtype(256)
    task.key, task.cache = "probe", root / ".cache" / "probe"
    task._tokenize()
    meta = json.loads((task.cache / "meta.json").read_text())
    expected = {"train": 0, "valid": 0}
    for document in documents:
        raw = document.encode("utf-8", errors="replace").decode("utf-8", errors="replace").encode()
        expected[task._split_of(raw)] += len(raw) + 1
    assert meta["tokens"] == expected
    assert sum(meta["documents"].values()) == len(documents)


def test_a_cache_dir_under_a_file_is_refused_by_name_before_the_corpus_is_read(tmp_path):
    """task.cache_dir=/dev/null/x failed with "Not a directory" (exit 1), naming no option."""
    (tmp_path / "a_file").write_text("")
    (tmp_path / "corpus.txt").write_text("some text\n" * 100)
    with pytest.raises(SeqmixError, match=r"text: cache_dir='.*a_file/x' is not valid: '.*a_file' is a file, not a folder"):
        TextCorpus(path=str(tmp_path / "corpus.txt"), seq_len=8, cache_dir=tmp_path / "a_file" / "x")


def test_a_path_that_exists_is_itself_and_a_glob_follows_no_folder_links(tmp_path):
    """``data[1].csv`` was read as the glob ``data1.csv`` (another file, silently), and ``**`` followed
    a link back up: each file repeated once per level, and two such links never ended."""
    from seqmix.tasks.documents import source_files

    corpus = tmp_path / "corpus"
    (corpus / "a").mkdir(parents=True)
    (corpus / "data[1].txt").write_text("the bracketed one")
    (corpus / "data1.txt").write_text("the other one")
    (corpus / "a" / "deep.txt").write_text("deep")
    (corpus / "a" / "up").symlink_to(corpus)
    (corpus / "a" / "self").symlink_to(corpus / "a")
    (corpus / "a" / "again.txt").symlink_to(corpus / "data1.txt")
    (corpus / ".hidden").mkdir()
    (corpus / ".hidden" / "secret.txt").write_text("hidden")
    assert source_files(str(corpus / "data[1].txt")) == [corpus / "data[1].txt"]
    assert source_files(str(corpus / "data[12].txt")) == [corpus / "data1.txt"]  # no such file: a glob
    # data1.txt once, first reached through the link a/again.txt
    assert source_files(str(corpus / "**" / "*.txt")) == [corpus / "a" / "again.txt", corpus / "a" / "deep.txt", corpus / "data[1].txt"]
    assert source_files(str(corpus / ".hidden" / "*.txt")) == [corpus / ".hidden" / "secret.txt"]  # named, so matched
    # The folder itself reads data1.txt once too (through the link it was read twice, its document trained on twice).
    assert source_files(str(corpus)) == [corpus / "a" / "again.txt", corpus / "a" / "deep.txt", corpus / "data[1].txt"]
    with pytest.raises(SeqmixError, match=r"names no files; the corpus is empty"):
        source_files(str(corpus / "*.csv"))


def test_a_bad_model_option_or_a_finished_run_is_refused_before_the_corpus_is_read(tmp_path, monkeypatch, capsys):
    """The corpus was tokenized and its cache written before model.d_model=-3, a seq_len beyond the
    learned positions, or an out_dir already holding a run was told: minutes on a large corpus."""
    from seqmix.cli import main

    corpus = write_text_corpus(tmp_path / "corpus")
    common = ["train", "task=text", f"task.path={corpus}", f"task.cache_dir={tmp_path / 'cache'}", "train.max_steps=1",
              "train.progress=false", "model.d_model=16", "model.depth=1"]
    finished = tmp_path / "finished"
    (finished / "checkpoints" / "step-00000001").mkdir(parents=True)
    (finished / "run.json").write_text("{}")
    from seqmix.tasks import documents

    monkeypatch.setattr(documents, "source_files", lambda *args, **kwargs: pytest.fail("the corpus was read"))
    cases = [
        (["model.d_model=-3", f"train.out_dir={tmp_path / 'a'}"], "model: d_model=-3 is not valid"),
        (["model=gpt2", "model.d_model=16", "model.max_len=4", "task.seq_len=8", f"train.out_dir={tmp_path / 'b'}"],
         "task.seq_len=8 exceeds the model's learned positions"),
        ([f"train.out_dir={finished}"], "already holds a run; pass train.resume=true"),
        ([f"train.out_dir={tmp_path / 'c'}", "train.resume=true"], "holds no run to resume"),
        # The next run on the corpus read this one's checkpoints as documents.
        ([f"train.out_dir={corpus}/run1"], f"train.out_dir='{corpus}/run1' is inside the corpus task.path="),
        ([f"train.out_dir={tmp_path / 'd'}", f"train.save_pretrained={corpus}/hf"], "train.save_pretrained="),
        ([f"task.path={tmp_path}/corpus/*.txt", f"train.out_dir={corpus}/x.txt"], "is inside the corpus task.path="),
    ]
    for overrides, message in cases:
        assert main([*common, *overrides]) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "finished"]


def test_a_damaged_token_cache_is_refused_naming_the_folder_to_remove(tmp_path):
    """The cache was trusted on meta.json alone: a token file cut to an even length trained on part of
    the data without a word; cut to an odd length, emptied or removed, it failed in numpy."""
    import shutil

    corpus = write_text_corpus(tmp_path / "corpus")
    first = _task(corpus, tmp_path)
    cache = first.cache
    pristine = tmp_path / "pristine"
    shutil.copytree(cache, pristine)
    token_file = first._token_file("train")
    size = (cache / token_file).stat().st_size
    damages = {
        "cut even": lambda: os.truncate(cache / token_file, size - 2),
        "cut odd": lambda: os.truncate(cache / token_file, size - 1),
        "emptied": lambda: os.truncate(cache / token_file, 0),
        "removed": lambda: (cache / token_file).unlink(),
        "meta not JSON": lambda: (cache / "meta.json").write_text("{"),
        "meta counts": lambda: (cache / "meta.json").write_text(json.dumps({**first.meta, "tokens": {"train": "many"}})),
        # Tokenized again, this ended in "Directory not empty" from the rename, on every run.
        "meta removed": lambda: (cache / "meta.json").unlink(),
    }
    for what, damage in damages.items():
        shutil.rmtree(cache)
        shutil.copytree(pristine, cache)
        damage()
        with pytest.raises(SeqmixError, match=rf"text: the token cache {re.escape(str(cache))} is damaged .*remove that folder"):
            _task(corpus, tmp_path)
    shutil.rmtree(cache)
    assert _task(corpus, tmp_path).meta == first.meta  # removed, it is made again


def test_a_cache_inside_the_corpus_folder_is_not_read_as_documents(tmp_path):
    """From the second run on, the cache's tokens and meta.json were part of the corpus (and refused
    as a stray JSON file); classify's datasets files went to ~/.cache whatever task.cache_dir said."""
    from seqmix.tasks.documents import DocumentSource

    corpus = Path(write_text_corpus(tmp_path / "corpus"))
    first = build_task("text", path=str(corpus), cache_dir=str(corpus / "cache"), seq_len=16)
    again = build_task("text", path=str(corpus), cache_dir=str(corpus / "cache"), seq_len=16)
    assert again.key == first.key and again.files == first.files
    assert not any("cache" in file.parts for file in again.files)
    (tmp_path / "only_cache" / "cache").mkdir(parents=True)
    (tmp_path / "only_cache" / "cache" / "x.txt").write_text("cached")
    with pytest.raises(SeqmixError, match="holds no files outside task.cache_dir"):
        DocumentSource(str(tmp_path / "only_cache"), cache_dir=tmp_path / "only_cache" / "cache")


def test_jsonl_with_cr_line_ends_reads_and_its_messages_say_what_is_wrong(tmp_path):
    """CR-only JSONL was one line ('Extra data'); an undecodable line was told as 'not a JSON object'
    around the decoding error; a corpus of empty files was told to add documents or change the split."""
    from seqmix.errors import require_writable_file

    cr = tmp_path / "cr.jsonl"
    cr.write_bytes(b"".join(json.dumps({"text": f"document {i} " * 20}).encode() + b"\r" for i in range(40)))
    assert sum(_task(cr, tmp_path).meta["documents"].values()) == 40
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
    with pytest.raises(SeqmixError, match=r"^text: .*bad.jsonl line 2 holds bytes that are not UTF-8 \(invalid start byte\); fix the file"):
        _task(bad, tmp_path, decode_errors="strict")
    blank = tmp_path / "blank"
    blank.mkdir()
    for i in range(30):
        (blank / f"{i}.txt").write_text(" \n" * (i % 3))
    with pytest.raises(SeqmixError, match=r"holds no text: its 30 documents are empty or white space only"):
        _task(blank, tmp_path)
    with pytest.raises(SeqmixError, match=r"ends with '/', so it names a folder"):
        require_writable_file("out", f"{tmp_path}/tokenizers/new/")


def test_a_nul_in_a_text_is_no_document_boundary_for_the_byte_tokenizer(tmp_path):
    """NUL is the byte tokenizer's separator: one inside a document (a JSON "\\u0000", a text file's NUL
    past the binary probe) split it in two, and closed a classification text early."""
    from seqmix.errors import SeqmixWarning
    from seqmix.tasks.classify import Classify

    corpus = tmp_path / "nul.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} holds a\u0000NUL " * 8, "label": f"{i % 2}"}) + "\n"
                              for i in range(40)))
    with pytest.warns(SeqmixWarning, match=r"text: 40 texts held a NUL byte.*each became U\+FFFD: .*nul.jsonl line 1, .*and 37 more"):
        task = _task(corpus, tmp_path)
    for split, documents in task.meta["documents"].items():
        tokens = np.fromfile(task.cache / task._token_file(split), dtype=task.dtype)
        assert int((tokens == ByteTokenizer.separator).sum()) == documents
    assert ByteTokenizer().decode(ByteTokenizer().encode("a\0b")) == "a\ufffdb"
    with pytest.warns(SeqmixWarning, match=r"classify: 40 texts held a NUL byte"):
        rows = Classify(path=str(corpus), seq_len=400, cache_dir=str(tmp_path / "classify"))
    lengths = np.load(rows.cache / "train.lengths.npy")
    assert (lengths == len(("document 0 holds a\ufffdNUL " * 8).encode()) + 1).sum() > 0


def _rows(prefix: str, count: int = 60) -> list[dict]:
    return [{"text": f"{prefix} document {i} " + "word " * (i % 7 + 5)} for i in range(count)]


def test_a_saved_dataset_dict_trains_on_its_train_split_only(tmp_path):
    """Every split of a saved DatasetDict was merged: a user's held-out test rows were trained on."""
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows("kept")),
                          "test": datasets.Dataset.from_list(_rows("HELDOUT"))}).save_to_disk(str(tmp_path / "saved"))
    with pytest.warns(UserWarning, match=r"read from its 'train' split only; 'test' left out"):
        task = _task(tmp_path / "saved", tmp_path, valid_fraction=0.2)
    text = b"".join(bytes(task.data[split].astype(np.uint8)) for split in ("train", "valid"))
    assert b"kept document" in text and b"HELDOUT" not in text
    datasets.DatasetDict({"test": datasets.Dataset.from_list(_rows("x"))}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(SeqmixError, match=r"has the splits \['test'\] and no 'train'"):
        _task(tmp_path / "no_train", tmp_path)


def test_files_read_through_datasets_are_read_again_when_they_change_and_bad_ones_are_named(tmp_path):
    """datasets keyed its own cache on paths and modification times: a file rewritten at the same size
    with its time kept was read as it was, and its old text cached under the new content's key. A file
    datasets could not read ended in its traceback (exit 1)."""
    pytest.importorskip("datasets")
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _rows("AAAA")))
    stamp = path.stat()
    first = _task(path, tmp_path, format="datasets", valid_fraction=0.2)
    path.write_text("".join(json.dumps(row) + "\n" for row in _rows("ZZZZ")))
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    second = _task(path, tmp_path, format="datasets", valid_fraction=0.2)
    assert second.key != first.key
    text = bytes(second.data["train"].astype(np.uint8))
    assert b"ZZZZ" in text and b"AAAA" not in text
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(SeqmixError, match=r"text: datasets could not read .*broken.jsonl.* as json \(.*\); datasets reads UTF-8 only"):
        _task(tmp_path / "broken.jsonl", tmp_path, format="datasets")


def test_a_utf8_byte_order_mark_is_no_part_of_a_text_or_jsonl_document(tmp_path):
    """A text file's byte order mark (Windows editors write one) was kept as the start of its document,
    and made line 1 of a JSONL file 'not a JSON object'; a CSV's was already dropped."""
    bom = "\ufeff".encode()
    (tmp_path / "corpus").mkdir()
    for index in range(2):
        (tmp_path / "corpus" / f"{index}.txt").write_bytes(bom + f"text file {index}".encode())
    (tmp_path / "corpus" / "rows.jsonl").write_bytes(bom + b'{"text": "a row"}\n{"text": "another"}\n')
    documents = [values["text"] for _, values in DocumentSource(str(tmp_path / "corpus")).rows({"text": "text"})]
    assert sorted(documents) == ["a row", "another", "text file 0", "text file 1"]
