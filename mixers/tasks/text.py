"""Language modelling on the user's own text: files, a directory, a glob, JSONL, CSV, Parquet or a saved dataset.

Documents are read once, tokenized as bytes (vocabulary: the 256 byte values; documents are packed
with a NUL byte between them) and written to two memory-mapped token files, ``train.u16`` and
``valid.u16``, under ``<cache_dir>/text/<key>``. The key is the sha256 of every source file's bytes
and of the options that change the tokens, so a second run over the same corpus reuses the cache and
any edit makes a new one. Training reads windows straight from the memory map, so a corpus larger
than memory trains without loading it.

A document goes to ``valid`` when the sha256 of its bytes falls below ``valid_fraction``: the split
is stable however the files are ordered or added to. Batches are windows chosen by (seed, split,
index) alone, so a resumed or data-parallel run sees what an uninterrupted one does.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from seqmix.errors import SeqmixError, choice_error, require_int
from seqmix.tasks._checks import check_request, require_number
from seqmix.tasks.base import SPLITS, Batch, Task, generator_for

FORMATS = ("auto", "text", "jsonl", "csv", "parquet", "datasets")
DECODE_ERRORS = ("replace", "strict")
SEPARATOR = 0
"""The token between packed documents (the NUL byte)."""
TOKENIZER = "bytes-v1"
SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def source_files(path: str) -> list[Path]:
    """The files ``path`` names: itself, every file below a directory (hidden ones skipped), or a glob's matches, sorted."""
    if any(character in path for character in "*?["):
        files = [Path(p) for p in sorted(glob.glob(os.path.expanduser(path), recursive=True)) if Path(p).is_file()]
    else:
        root = Path(path).expanduser()
        if not root.exists():
            raise SeqmixError(f"task.path={path!r} does not exist; give a text file, a directory, a glob or a saved dataset")
        files = [root] if root.is_file() else sorted(
            p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
    if not files:
        raise SeqmixError(f"task.path={path!r} names no files; the corpus is empty")
    return files


class TextCorpus(Task):
    """Next-byte prediction on the user's corpus.

    Args:
        path: a text file, a directory of them, a glob, a JSONL / CSV / Parquet file (or a directory or
            glob of them), or a directory written by ``datasets.Dataset.save_to_disk``.
        format: ``auto`` (by suffix; a saved dataset by its files), ``text`` (each file one document),
            ``jsonl``, ``csv``, ``parquet`` or ``datasets`` (one document per row).
        text_column: the column (key) holding the text in JSONL, CSV, Parquet and datasets.
        seq_len: L, tokens per sequence.
        valid_fraction: the share of documents held out for validation, chosen by their hash.
        decode_errors: ``replace`` turns bytes that are not UTF-8 into U+FFFD; ``strict`` refuses the
            corpus, naming the file and line.
        cache_dir: where the token files are cached.
        seed: seeds the training windows.

    Batches: inputs (B, L) long bytes, targets (B, L) the next byte, as ``byte_lm``.
    """

    name = "text"
    head = "causal_lm"
    metric = "bits_per_byte"
    vocab_size = 256

    def __init__(self, path: str = "", format: str = "auto", text_column: str = "text", seq_len: int = 256,
                 valid_fraction: float = 0.05, decode_errors: str = "replace", cache_dir: str | os.PathLike = "~/.cache/seqmix",
                 seed: int = 0):
        if not isinstance(path, str) or not path:
            raise SeqmixError(f"text: path={path!r} is not valid; point it at your corpus: a file, directory, glob or saved dataset")
        if format not in FORMATS:
            raise choice_error("text: format", format, FORMATS)
        if decode_errors not in DECODE_ERRORS:
            raise choice_error("text: decode_errors", decode_errors, DECODE_ERRORS)
        if not isinstance(text_column, str) or not text_column:
            raise SeqmixError(f"text: text_column={text_column!r} is not valid; expected a column name")
        require_int(self.name, "seq_len", seq_len, 1)
        require_int(self.name, "seed", seed, 0)
        require_number(self.name, "valid_fraction", valid_fraction, 0.0, 1.0)
        if not isinstance(cache_dir, (str, os.PathLike)):
            raise SeqmixError(f"text: cache_dir={cache_dir!r} is not valid; expected a directory path")
        self.path, self.format, self.text_column = path, format, text_column
        self.seq_len, self.valid_fraction, self.decode_errors, self.seed = seq_len, valid_fraction, decode_errors, seed
        self.files = source_files(path) if not _is_saved_dataset(Path(path)) else sorted(p for p in Path(path).rglob("*") if p.is_file())
        self.key = self._cache_key()
        self.cache = Path(cache_dir).expanduser() / "text" / self.key
        if not (self.cache / "meta.json").is_file():
            self._tokenize()
        self.meta = json.loads((self.cache / "meta.json").read_text())
        # numpy cannot map an empty file; an empty split is refused just below.
        self.data = {
            split: np.memmap(self.cache / f"{split}.u16", dtype=np.uint16, mode="r") if self.meta["tokens"][split]
            else np.zeros(0, dtype=np.uint16)
            for split in SPLITS
        }
        for split, data in self.data.items():
            if data.size < seq_len + 1:
                raise SeqmixError(
                    f"text: the {split} split of {path!r} has {data.size} tokens ({self.meta['documents'][split]} documents), "
                    f"fewer than seq_len + 1 = {seq_len + 1}; add text, lower seq_len or change valid_fraction"
                )

    def _cache_key(self) -> str:
        """sha256 of the options that change the tokens and of every source file's name and bytes."""
        digest = hashlib.sha256(json.dumps([TOKENIZER, self.format, self.text_column, self.valid_fraction, self.decode_errors]).encode())
        for path in self.files:
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()[:32]

    def _documents(self) -> Iterator[tuple[str, bytes]]:
        """(where, UTF-8 bytes) of every document, in file order."""
        if self.format == "datasets" or (self.format == "auto" and _is_saved_dataset(Path(self.path))):
            yield from self._dataset_rows()
            return
        for path in tqdm(self.files, desc="tokenizing", unit="file", leave=False):
            kind = self.format if self.format != "auto" else SUFFIX_FORMATS.get(path.suffix.lower(), "text")
            if kind == "text":
                yield f"{path}", self._decode(path.read_bytes(), path)
            elif kind == "jsonl":
                yield from self._jsonl(path)
            elif kind == "csv":
                yield from self._csv(path)
            else:
                yield from self._parquet(path)

    def _decode(self, raw: bytes, where: Path | str, line: int | None = None) -> bytes:
        try:
            return raw.decode("utf-8", errors="strict").encode()
        except UnicodeDecodeError as error:
            if self.decode_errors == "replace":
                return raw.decode("utf-8", errors="replace").encode()
            at = line if line is not None else raw.count(b"\n", 0, error.start) + 1
            raise SeqmixError(
                f"text: {where} line {at} holds bytes that are not UTF-8 ({error.reason}); fix the file or use "
                "task.decode_errors=replace"
            ) from None

    def _text_of(self, row, where: str) -> str:
        if not isinstance(row, dict) or self.text_column not in row:
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise SeqmixError(f"text: {where} has no column {self.text_column!r} (found {found}); set task.text_column")
        value = row[self.text_column]
        if not isinstance(value, str):
            raise SeqmixError(f"text: {where} column {self.text_column!r} holds a {type(value).__name__}, not text")
        return value

    def _jsonl(self, path: Path) -> Iterator[tuple[str, bytes]]:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                where = f"{path} line {number}"
                try:
                    row = json.loads(self._decode(raw, path, number))
                except ValueError as error:
                    raise SeqmixError(f"text: {where} is not a JSON object ({error})") from None
                yield where, self._text_of(row, where).encode()

    def _csv(self, path: Path) -> Iterator[tuple[str, bytes]]:
        text = self._decode(path.read_bytes(), path).decode()
        reader = csv.DictReader(text.splitlines())
        if self.text_column not in (reader.fieldnames or []):
            raise SeqmixError(f"text: {path} has no column {self.text_column!r} (its header: {reader.fieldnames}); set task.text_column")
        for number, row in enumerate(reader, 2):
            yield f"{path} row {number}", self._text_of(row, f"{path} row {number}").encode()

    def _parquet(self, path: Path) -> Iterator[tuple[str, bytes]]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SeqmixError(f"text: reading {path} needs pyarrow: pip install 'seqmix[data]'") from None
        names = pq.read_schema(path).names
        if self.text_column not in names:
            raise SeqmixError(f"text: {path} has no column {self.text_column!r} (its columns: {names}); set task.text_column")
        for number, value in enumerate(pq.read_table(path, columns=[self.text_column]).column(0).to_pylist()):
            yield f"{path} row {number}", self._text_of({self.text_column: value}, f"{path} row {number}").encode()

    def _dataset_rows(self) -> Iterator[tuple[str, bytes]]:
        try:
            import datasets
        except ImportError:
            raise SeqmixError(f"text: reading the saved dataset {self.path} needs datasets: pip install 'seqmix[data]'") from None
        loaded = datasets.load_from_disk(self.path)
        parts = [(name, loaded[name]) for name in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
        for part, dataset in parts:
            if self.text_column not in dataset.column_names:
                raise SeqmixError(f"text: the dataset {self.path} {part} has no column {self.text_column!r} "
                                  f"(its columns: {dataset.column_names}); set task.text_column")
            for number, value in enumerate(tqdm(dataset[self.text_column], desc="tokenizing", unit="doc", leave=False)):
                where = f"{self.path} {part} row {number}".replace("  ", " ")
                yield where, self._text_of({self.text_column: value}, where).encode()

    def _split_of(self, document: bytes) -> str:
        fraction = int.from_bytes(hashlib.sha256(document).digest()[:8], "big") / 2**64
        return "valid" if fraction < self.valid_fraction else "train"

    def _tokenize(self) -> None:
        """Write both splits' token files and meta.json into a fresh directory, renamed into place when complete."""
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{self.key}.partial-", dir=self.cache.parent))
        try:
            counts = {split: 0 for split in SPLITS}
            tokens = {split: 0 for split in SPLITS}
            content = hashlib.sha256()
            streams = {split: open(staging / f"{split}.u16", "wb") for split in SPLITS}
            try:
                for _, document in self._documents():
                    content.update(document + b"\0")
                    split = self._split_of(document)
                    array = np.frombuffer(document + bytes([SEPARATOR]), dtype=np.uint8).astype(np.uint16)
                    streams[split].write(array.tobytes())
                    counts[split] += 1
                    tokens[split] += array.size
            finally:
                for stream in streams.values():
                    stream.close()
            if not any(counts.values()):
                raise SeqmixError(f"text: {self.path!r} holds no documents; the corpus is empty")
            meta = {"tokenizer": TOKENIZER, "documents": counts, "tokens": tokens, "content_sha256": content.hexdigest(),
                    "source": self.path}
            (staging / "meta.json").write_text(json.dumps(meta, indent=2))
            try:
                os.rename(staging, self.cache)
            except OSError:
                if not (self.cache / "meta.json").is_file():  # another process finished first: its cache is the same
                    raise
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        check_request(self.name, split, index, batch_size)
        data = self.data[split]
        span = self.seq_len + 1
        if split == "train":
            starts = torch.randint(0, data.size - span + 1, (batch_size,), generator=generator_for(self.seed, split, index))
        else:
            windows = (data.size - 1) // self.seq_len
            starts = (torch.arange(batch_size) + index * batch_size) % windows * self.seq_len
        window = torch.from_numpy(data[starts.numpy()[:, None] + np.arange(span)].astype(np.int64))
        return Batch(window[:, :-1], window[:, 1:])
