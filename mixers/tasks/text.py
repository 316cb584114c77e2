"""Language modelling on the user's own text: files, a directory, a glob, JSONL, CSV, Parquet or a saved dataset.

Documents are read once, tokenized (as bytes by default, or by a ``tokenizer.json``: see
``seqmix.tokenization``), packed with the tokenizer's separator between them, and written to two
memory-mapped token files, ``train.u16`` and ``valid.u16`` (``.u32`` when the vocabulary has more than
65,536 tokens), under ``<cache_dir>/text/<key>``. The key is the sha256 of every source file's bytes,
of the tokenizer and of the options that change the tokens, so a second run over the same corpus
reuses the cache and any edit makes a new one. Training reads windows straight from the memory map,
so a corpus larger than memory trains without loading it.

A document goes to ``valid`` when the sha256 of its bytes falls below ``valid_fraction``: the split
is stable however the files are ordered or added to. Batches are windows chosen by (seed, split,
index) alone, so a resumed or data-parallel run sees what an uninterrupted one does.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from seqmix.errors import SeqmixError, require_folder_path, require_int, require_seed, kind_of
from seqmix.tasks._checks import check_request, require_number
from seqmix.tasks.documents import BINARY_PROBE_BYTES, DocumentSource, is_binary
from seqmix.tasks.token_cache import META, cache_key, hashed_split, needs_building, read_meta, require_cache_file, split_counts, staged_cache
from seqmix.tasks.base import SPLITS, Batch, Task, generator_for
from seqmix.tokenization import BYTES, TOKENIZER_FILE, ByteTokenizer, load_tokenizer, token_dtype, warn_separators_replaced

ENCODE_BATCH_BYTES = 8 << 20
"""Documents are handed to a tokenizer.json in batches of about this many bytes (it encodes a batch in parallel)."""


def _starts_binary(path: Path, format: str) -> bool:
    """Whether a text file read as the corpus is binary data, which the reading refuses in its own words
    (``task.format=text`` reads such files as they are)."""
    if format == "text":
        return False
    with open(path, "rb") as handle:
        return is_binary(handle.read(BINARY_PROBE_BYTES))


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
        tokenizer: ``bytes`` (the 256 byte values), or the path of a ``tokenizer.json`` (one trained by
            ``seqmix tokenizer``, or any Hugging Face tokenizer with a separator token). It is saved with
            the run's checkpoints and exports.
        cache_dir: where the token files are cached.
        seed: seeds the training windows.

    Batches: inputs (B, L) long token ids, targets (B, L) the next token. The metric is the per-token
    cross-entropy in bits: ``bits_per_byte`` with the bytes tokenizer, ``bits_per_token`` with a tokenizer.json.
    """

    name = "text"
    head = "causal_lm"
    metric = "bits_per_byte"
    models_text = True
    reads_data = True

    def __init__(self, path: str = "", format: str = "auto", text_column: str = "text", seq_len: int = 256,
                 valid_fraction: float = 0.05, decode_errors: str = "replace", tokenizer: str = BYTES,
                 cache_dir: str | os.PathLike = "~/.cache/seqmix", seed: int = 0):
        if not isinstance(path, str) or not path:
            raise SeqmixError(f"text: path={path!r} is not valid; point it at your corpus: a file, directory, glob or saved dataset")
        if not isinstance(text_column, str) or not text_column:
            raise SeqmixError(f"text: text_column={text_column!r} is not valid; expected a column name")
        require_int(self.name, "seq_len", seq_len, 1)
        require_seed(self.name, "seed", seed)
        require_number(self.name, "valid_fraction", valid_fraction, 0.0, 1.0)
        if not isinstance(cache_dir, (str, os.PathLike)):
            raise SeqmixError(f"text: cache_dir={cache_dir!r} is not valid; expected a directory path")
        # Checked before the corpus is read: /dev/null/x failed with "Not a directory", naming no option.
        # (Not for writing: a cache someone else filled may be read-only.)
        require_folder_path("text: cache_dir", Path(cache_dir).expanduser())
        self.tokenizer = load_tokenizer(tokenizer)
        self.vocab_size = self.tokenizer.vocab_size
        self.metric = "bits_per_byte" if isinstance(self.tokenizer, ByteTokenizer) else "bits_per_token"
        self.dtype = token_dtype(self.vocab_size)
        self.path, self.format, self.text_column = path, format, text_column
        self.seq_len, self.valid_fraction, self.decode_errors, self.seed = seq_len, valid_fraction, decode_errors, seed
        self.source = DocumentSource(path, format, decode_errors, owner=self.name, cache_dir=cache_dir)
        self.files = self.source.files
        if (not self.source.saved and len(self.files) == 1 and self.source.kind_of(self.files[0]) == "text"
                and not _starts_binary(self.files[0], self.format)):
            # Told before the file is tokenized: it was refused after, its cache (twice its size) left behind.
            raise SeqmixError(f"text: {path!r} is one text file, which is one document, and each document goes to train "
                              "or valid whole, so one cannot fill both: give several (the files of a directory or a glob, "
                              "or one per row of JSONL, CSV or Parquet)")
        self.key = self._cache_key()
        self.cache = Path(cache_dir).expanduser() / "text" / self.key
        if needs_building(self.name, self.cache):
            self._tokenize()
        self.meta = read_meta(self.name, self.cache)
        split_counts(self.name, self.cache, self.meta, "tokens")
        split_counts(self.name, self.cache, self.meta, "documents")
        # numpy cannot map an empty file; an empty split is refused just below.
        self.data = {
            split: np.memmap(require_cache_file(self.name, self.cache, self._token_file(split),
                                                self.meta["tokens"][split] * self.dtype.itemsize),
                             dtype=self.dtype, mode="r") if self.meta["tokens"][split]
            else np.zeros(0, dtype=self.dtype)
            for split in SPLITS
        }
        documents = self.meta["documents"]
        for split, data in self.data.items():
            if data.size < seq_len + 1:
                # Documents go to a split whole: a one-document corpus (one text file) can never fill
                # both, and no valid_fraction changes where a given document goes when there are few.
                if sum(documents.values()) == 1:
                    advice = ("the corpus is one document, and each document goes to train or valid whole: give "
                              "several (the files of a directory or a glob, or one per row of JSONL, CSV or Parquet)")
                elif documents[split] == 0:
                    advice = (f"each document goes to train or valid whole, by its hash, and none of the "
                              f"{sum(documents.values())} went to {split}: give more documents or change task.valid_fraction")
                else:
                    advice = "add text, lower task.seq_len or change task.valid_fraction"
                raise SeqmixError(
                    f"text: the {split} split of {path!r} has {data.size} tokens ({documents[split]} documents), "
                    f"fewer than seq_len + 1 = {seq_len + 1}; {advice}"
                )

    def model_files(self) -> dict[str, bytes]:
        """The tokenizer.json a model trained on this task needs (none for bytes)."""
        # The bytes it read: the file at its path may have changed since (save_pretrained ran after training).
        raw = getattr(self.tokenizer, "file_bytes", None)
        return {} if raw is None else {TOKENIZER_FILE: raw}

    def _token_file(self, split: str) -> str:
        return f"{split}.u{8 * self.dtype.itemsize}"

    def _cache_key(self) -> str:
        """sha256 of the tokenizer, the options that change the tokens and every source file's name and bytes."""
        return cache_key([self.tokenizer.fingerprint, self.format, self.text_column, self.valid_fraction, self.decode_errors],
                         self.files)

    def _documents(self, separators: list[str]) -> Iterator[bytes]:
        """The UTF-8 bytes of every document, in file order; a text that is not a string is refused by row.
        Where a text holds the separator's text (``Tokenizer.holds_separator``) is appended to ``separators``."""
        for where, row in self.source.rows({"text_column": self.text_column}):
            text = row["text_column"]
            if not isinstance(text, str):
                raise SeqmixError(f"text: {where} column {self.text_column!r} holds {kind_of(text)}, not text")
            if self.tokenizer.holds_separator(text):
                separators.append(where)
            yield text.encode("utf-8", "replace")

    def _document_batches(self, separators: list[str]) -> Iterator[list[bytes]]:
        """The documents' UTF-8 bytes, in file order, grouped into batches of about ENCODE_BATCH_BYTES."""
        batch, size = [], 0
        for document in self._documents(separators):
            batch.append(document)
            size += len(document)
            if size >= ENCODE_BATCH_BYTES:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def _encode(self, documents: list[bytes]) -> list[np.ndarray]:
        """Token ids of each document; bytes are their own ids, without a round trip through str."""
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.encode_utf8(documents)
        return self.tokenizer.encode_batch([document.decode("utf-8") for document in documents])

    def _split_of(self, document: bytes) -> str:
        return hashed_split(document, self.valid_fraction)

    def _tokenize(self) -> None:
        """Write both splits' token files and meta.json into a fresh directory, renamed into place when complete."""
        with staged_cache(self.cache) as staging:
            counts = {split: 0 for split in SPLITS}
            tokens = {split: 0 for split in SPLITS}
            written = 0  # documents holding more than white space
            content = hashlib.sha256()
            separators = []
            with ExitStack() as files:
                streams = {split: files.enter_context(open(staging / self._token_file(split), "wb")) for split in SPLITS}
                for batch in self._document_batches(separators):
                    for document, ids in zip(batch, self._encode(batch)):
                        content.update(document + b"\0")
                        split = self._split_of(document)
                        array = np.append(ids, self.tokenizer.separator).astype(self.dtype)
                        streams[split].write(array.tobytes())
                        counts[split] += 1
                        tokens[split] += array.size
                        written += bool(document.strip())
            if not any(counts.values()):
                raise SeqmixError(f"text: {self.path!r} holds no documents; the corpus is empty")
            if not written:
                # Told as a split that no document reached, with advice to add documents or change the split.
                raise SeqmixError(f"text: {self.path!r} holds no text: its {sum(counts.values())} documents are empty or "
                                  "white space only")
            warn_separators_replaced("text", separators)
            meta = {"tokenizer": self.tokenizer.fingerprint, "dtype": self.dtype.name, "documents": counts, "tokens": tokens,
                    "content_sha256": content.hexdigest(), "source": self.path}
            (staging / META).write_text(json.dumps(meta, indent=2))

    def _starts(self, split: str, index: int, batch_size: int) -> np.ndarray:
        """The first token of each window of batch ``index`` -> (B,)."""
        data = self.data[split]
        if split == "train":
            span = self.seq_len + 1
            return torch.randint(0, data.size - span + 1, (batch_size,), generator=generator_for(self.seed, split, index)).numpy()
        windows = (data.size - 1) // self.seq_len
        return ((np.arange(batch_size) + index * batch_size) % windows) * self.seq_len

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        check_request(self.name, split, index, batch_size, self.seq_len)
        data = self.data[split]
        span = self.seq_len + 1
        window = torch.from_numpy(data[self._starts(split, index, batch_size)[:, None] + np.arange(span)].astype(np.int64))
        # Batch index + 1 is known now: ask the kernel to start reading its windows, so a corpus larger
        # than memory is read from disk while this batch trains, not when the next one is asked for.
        self._prefetch(split, index + 1, batch_size)
        return Batch(window[:, :-1], window[:, 1:])

    def _prefetch(self, split: str, index: int, batch_size: int) -> None:
        data = self.data[split]
        mapping = getattr(data, "_mmap", None)
        if mapping is None or not hasattr(mapping, "madvise"):
            return
        page, item = mmap.PAGESIZE, data.dtype.itemsize
        for start in self._starts(split, index, batch_size):
            first = int(start) * item + data.offset
            aligned = first - first % page
            mapping.madvise(mmap.MADV_WILLNEED, aligned, first - aligned + (self.seq_len + 1) * item)
