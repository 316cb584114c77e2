"""Classification of the user's rows: a text column and a label column in CSV, JSONL, Parquet or a saved dataset.

Every label is read as text (integers and booleans from JSONL or Parquet as Python prints them, so
the label ``1`` in JSONL and ``"1"`` in a CSV are one class; surrounding spaces are dropped), and
the distinct labels, sorted (integers by value, before text), are the classes: class id i is ``labels[i]``. ``labels.json`` (that list)
is saved with the run, its checkpoints and ``save_pretrained``.

Rows are read once, tokenized (bytes by default, or a ``tokenizer.json``), cut to ``seq_len - 1``
tokens and closed by the tokenizer's separator, and written per split under
``<cache_dir>/classify/<key>``: ``<split>.tokens.u16`` (``.u32`` past 65,536 tokens), the (N, L)
token matrix padded with the separator, memory-mapped; ``<split>.lengths.npy`` (N,) the unpadded
lengths; ``<split>.labels.npy`` (N,) the class ids; and ``meta.json``. The key is the sha256 of every
source file's bytes, of the tokenizer and of the options that change the rows, so a second run reuses
the cache and an edit makes a new one.

A row goes to ``valid`` when the sha256 of its text falls below ``valid_fraction``, so the split does
not depend on row order and a text repeated in the file never lands on both sides. Training batches
sample rows by (seed, split, index); validation batches walk the valid rows in order, wrapping.
"""
from __future__ import annotations

import hashlib
import json
import unicodedata
import warnings
import os
from array import array
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from seqmix.errors import SeqmixError, SeqmixWarning, first_few, require_folder_path, require_int, require_seed, kind_of
from seqmix.tasks._checks import check_request, require_number
from seqmix.tasks.base import SPLITS, Batch, Task, generator_for
from seqmix.tasks.documents import DocumentSource
from seqmix.tasks.token_cache import META, cache_key, hashed_split, load_array, needs_building, read_meta, require_cache_file, split_counts, staged_cache
from seqmix.tokenization import BYTES, TOKENIZER_FILE, load_tokenizer, token_dtype, warn_separators_replaced

LABELS_FILE = "labels.json"
"""The class names in id order (a JSON list), saved with the run."""
ENCODE_BATCH_ROWS = 4096
"""Texts handed to the tokenizer at once (a tokenizer.json encodes a batch in parallel)."""
CACHE_VERSION = "classify-v2"
"""v1 sorted integer labels as text ("10" before "2") and read a saved dataset's ClassLabel as integers."""


def _warn_of_labels_alike(labels: list[str]) -> None:
    """Warn of labels that differ only in their Unicode form ('café' composed and decomposed): they print
    alike but are different classes. Kept apart, as written: a label is the user's text."""
    forms: dict[str, list[str]] = {}
    for label in labels:
        forms.setdefault(unicodedata.normalize("NFC", label), []).append(label)
    alike = [group for group in forms.values() if len(group) > 1]
    if alike:
        shown = "; ".join(" and ".join(ascii(label) for label in group) for group in alike[:3])
        warnings.warn(f"seqmix: classify: labels that differ only in their Unicode form are different classes: {shown}; "
                      "write each class one way (NFC) to merge them", SeqmixWarning, stacklevel=4)


def label_order(label: str) -> tuple:
    """How the classes are ordered: integer labels by value ("2" before "10"), before any other, which sort as text."""
    try:
        return (0, int(label), label)
    except ValueError:
        return (1, 0, label)


def label_text(value, where: str, column: str) -> str:
    """The class name of a label cell: text stripped of surrounding spaces, or an integer or boolean as Python prints it."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise SeqmixError(f"classify: {where} has no label in column {column!r} ({value!r}); give every row a label")
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, np.integer)):
        return str(value)
    hint = ("; a column of integer labels with an empty cell is stored as floats (pandas writes the empty one as NaN): "
            "give every row a label, or drop the rows without one" if isinstance(value, float) else "")
    raise SeqmixError(f"classify: {where} column {column!r} holds the label {value!r} ({kind_of(value)}); "
                      f"expected text, an integer or a boolean{hint}")


class Classify(Task):
    """Sequence classification of the user's labelled rows.

    Args:
        path: a JSONL / CSV / Parquet file, a directory or glob of them, or a directory written by
            ``datasets.Dataset.save_to_disk``.
        format: ``auto`` (by suffix; a saved dataset by its files), ``jsonl``, ``csv``, ``parquet`` or
            ``datasets``. Plain text files hold no labels and are refused.
        text_column: the column holding the text.
        label_column: the column holding the label (text, an integer or a boolean).
        seq_len: L; a text is cut to L - 1 tokens and closed by the separator, shorter rows are padded.
        valid_fraction: the share of rows held out for validation, chosen by the hash of their text.
        decode_errors: ``replace`` turns bytes that are not UTF-8 into U+FFFD; ``strict`` refuses the
            file, naming it and the line.
        tokenizer: ``bytes`` (the 256 byte values) or the path of a ``tokenizer.json``; saved with the run.
        cache_dir: where the tokenized rows are cached.
        seed: seeds the training batches.

    Attributes:
        labels: the class names; class id i is ``labels[i]``.

    Batches: inputs (B, L) long token ids, padding_mask (B, L) bool (True at padding), targets (B,)
    long class ids. The metric is accuracy.
    """

    name = "classify"
    head = "classification"
    metric = "accuracy"
    reads_data = True

    def __init__(self, path: str = "", format: str = "auto", text_column: str = "text", label_column: str = "label",
                 seq_len: int = 256, valid_fraction: float = 0.1, decode_errors: str = "replace", tokenizer: str = BYTES,
                 cache_dir: str | os.PathLike = "~/.cache/seqmix", seed: int = 0):
        if not isinstance(path, str) or not path:
            raise SeqmixError(f"classify: path={path!r} is not valid; point it at your labelled CSV, JSONL, Parquet or saved dataset")
        for option, column in (("text_column", text_column), ("label_column", label_column)):
            if not isinstance(column, str) or not column:
                raise SeqmixError(f"classify: {option}={column!r} is not valid; expected a column name")
        if label_column == text_column:
            raise SeqmixError(f"classify: label_column={label_column!r} is the text_column too; name the column holding the labels")
        require_int(self.name, "seq_len", seq_len, 2, "a token of text and the separator")
        require_seed(self.name, "seed", seed)
        require_number(self.name, "valid_fraction", valid_fraction, 0.0, 1.0)
        if not isinstance(cache_dir, (str, os.PathLike)):
            raise SeqmixError(f"classify: cache_dir={cache_dir!r} is not valid; expected a directory path")
        # Checked before the corpus is read: /dev/null/x failed with "Not a directory", naming no option.
        # (Not for writing: a cache someone else filled may be read-only.)
        require_folder_path("classify: cache_dir", Path(cache_dir).expanduser())
        self.tokenizer = load_tokenizer(tokenizer)
        self.vocab_size = self.tokenizer.vocab_size
        self.dtype = token_dtype(self.vocab_size)
        self.path, self.format, self.text_column, self.label_column = path, format, text_column, label_column
        self.seq_len, self.valid_fraction, self.decode_errors, self.seed = seq_len, valid_fraction, decode_errors, seed
        self.source = DocumentSource(path, format, decode_errors, owner=self.name, cache_dir=cache_dir)
        self.files = self.source.files
        if not self.source.saved and format != "datasets":
            for file in self.files:
                if self.source.kind_of(file) == "text":
                    raise SeqmixError(f"classify: {file} is a text file, which holds no labels; give CSV, JSONL or Parquet "
                                      "rows with a text and a label column (task.format names the format of other suffixes)")
        self.key = self._cache_key()
        self.cache = Path(cache_dir).expanduser() / self.name / self.key
        if needs_building(self.name, self.cache):
            self._tokenize()
        self.meta = read_meta(self.name, self.cache)
        split_counts(self.name, self.cache, self.meta, "rows")
        if not (isinstance(self.meta.get("labels"), list) and all(isinstance(label, str) for label in self.meta["labels"])
                and self.meta["labels"]):
            raise SeqmixError(f"classify: the token cache {self.cache} is damaged (its meta.json holds no list of labels); "
                              "remove that folder and the next run tokenizes the data again")
        self.labels: list[str] = self.meta["labels"]
        self.num_classes = len(self.labels)
        if self.num_classes < 2:
            raise SeqmixError(f"classify: every row of {path!r} has the label {self.labels[0]!r}; classification needs at "
                              f"least 2 distinct labels in column {label_column!r}")
        rows = self.meta["rows"]
        for split in SPLITS:
            if not rows[split]:
                raise SeqmixError(f"classify: the {split} split of {path!r} has no rows ({sum(rows.values())} rows in all, "
                                  f"valid_fraction={valid_fraction}); add rows or change task.valid_fraction")
        self.tokens = {split: np.memmap(require_cache_file(self.name, self.cache, self._token_file(split),
                                                          rows[split] * seq_len * self.dtype.itemsize),
                                       dtype=self.dtype, mode="r", shape=(rows[split], seq_len))
                       for split in SPLITS}
        self.lengths = {split: load_array(self.name, self.cache, f"{split}.lengths.npy", rows[split]) for split in SPLITS}
        self.label_ids = {split: load_array(self.name, self.cache, f"{split}.labels.npy", rows[split]) for split in SPLITS}
        self._warn_of_labels_never_trained()

    def _warn_of_labels_never_trained(self) -> None:
        """Warn when the valid split holds labels the train split never shows: the model cannot
        learn them, and a label column that names every row apart (an id, a free text) looks so."""
        unseen = np.setdiff1d(self.label_ids["valid"], self.label_ids["train"])
        if not unseen.size:
            return
        named = first_few(repr(self.labels[i]) for i in unseen)
        warnings.warn(
            f"seqmix: classify: {unseen.size} of the {np.unique(self.label_ids['valid']).size} labels in the valid split of "
            f"{self.path!r} never occur in its train split ({named}), so the model cannot learn them; is "
            f"task.label_column={self.label_column!r} the label, with several rows of each?", SeqmixWarning, stacklevel=3)

    def model_files(self) -> dict[str, bytes]:
        """``labels.json`` (the class names in id order), and the tokenizer.json unless the tokenizer is bytes."""
        files = {LABELS_FILE: (json.dumps(self.labels, ensure_ascii=False, indent=2) + "\n").encode()}
        raw = getattr(self.tokenizer, "file_bytes", None)  # as read, not as the path holds it now
        if raw is not None:
            files[TOKENIZER_FILE] = raw
        return files

    def _token_file(self, split: str) -> str:
        return f"{split}.tokens.u{8 * self.dtype.itemsize}"

    def _cache_key(self) -> str:
        """sha256 of the tokenizer, the options that change the rows and every source file's name and bytes."""
        options = [CACHE_VERSION, self.tokenizer.fingerprint, self.format, self.text_column, self.label_column, self.seq_len,
                   self.valid_fraction, self.decode_errors]
        return cache_key(options, self.files)

    def _split_of(self, text: bytes) -> str:
        return hashed_split(text, self.valid_fraction)

    def _rows(self, separators: list[str]) -> Iterator[tuple[str, str]]:
        """(text, label) of every row in file order; a text that is not a string or an unusable label is refused by row.
        Where a text holds the separator's text (``Tokenizer.holds_separator``) is appended to ``separators``."""
        columns = {"text_column": self.text_column, "label_column": self.label_column}
        for where, row in self.source.rows(columns):
            text = row["text_column"]
            if not isinstance(text, str):
                raise SeqmixError(f"classify: {where} column {self.text_column!r} holds {kind_of(text)}, not text")
            if self.tokenizer.holds_separator(text):
                separators.append(where)
            # A lone surrogate (JSON may spell one) has no UTF-8 form: it becomes '?', as in task=text.
            yield text.encode("utf-8", "replace").decode("utf-8"), label_text(row["label_column"], where, self.label_column)

    def _row_batches(self, separators: list[str]) -> Iterator[list[tuple[str, str]]]:
        batch = []
        for row in tqdm(self._rows(separators), desc="tokenizing", unit="row", leave=False, disable=None):
            batch.append(row)
            if len(batch) == ENCODE_BATCH_ROWS:
                yield batch
                batch = []
        if batch:
            yield batch

    def _tokenize(self) -> None:
        """Write both splits' rows and meta.json into a fresh directory, renamed into place when complete."""
        with staged_cache(self.cache) as staging:
            lengths = {split: array("q") for split in SPLITS}
            first_seen_ids = {split: array("q") for split in SPLITS}
            seen: dict[str, int] = {}
            truncated = 0
            content = hashlib.sha256()
            separators = []
            with ExitStack() as files:
                streams = {split: files.enter_context(open(staging / self._token_file(split), "wb")) for split in SPLITS}
                for batch in self._row_batches(separators):
                    encoded = self.tokenizer.encode_batch([text for text, _ in batch])
                    for (text, label), ids in zip(batch, encoded):
                        raw = text.encode("utf-8")
                        content.update(raw + b"\0" + label.encode("utf-8") + b"\0")
                        split = self._split_of(raw)
                        kept = ids[: self.seq_len - 1]
                        truncated += int(kept.size < ids.size)
                        row = np.full(self.seq_len, self.tokenizer.separator, dtype=self.dtype)
                        row[: kept.size] = kept
                        streams[split].write(row.tobytes())
                        lengths[split].append(kept.size + 1)
                        first_seen_ids[split].append(seen.setdefault(label, len(seen)))
            if not seen:
                raise SeqmixError(f"classify: {self.path!r} holds no rows; nothing to classify")
            warn_separators_replaced("classify", separators)
            labels = sorted(seen, key=label_order)
            _warn_of_labels_alike(labels)
            # Ids were handed out in order of first appearance; class ids are positions among the sorted labels.
            rank = np.empty(len(seen), dtype=np.int64)
            rank[[seen[label] for label in labels]] = np.arange(len(labels))
            for split in SPLITS:
                np.save(staging / f"{split}.lengths.npy", np.asarray(lengths[split], dtype=np.int64))
                np.save(staging / f"{split}.labels.npy", rank[np.asarray(first_seen_ids[split], dtype=np.int64)])
            meta = {"tokenizer": self.tokenizer.fingerprint, "dtype": self.dtype.name, "seq_len": self.seq_len, "labels": labels,
                    "rows": {split: len(lengths[split]) for split in SPLITS}, "truncated": truncated,
                    "content_sha256": content.hexdigest(), "source": self.path}
            (staging / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False))

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        check_request(self.name, split, index, batch_size, self.seq_len)
        count = self.meta["rows"][split]
        if split == "train":
            rows = torch.randint(0, count, (batch_size,), generator=generator_for(self.seed, split, index))
        else:
            rows = (torch.arange(batch_size) + index * batch_size % count) % count
        picked = rows.numpy()
        inputs = torch.from_numpy(self.tokens[split][picked].astype(np.int64))
        lengths = torch.from_numpy(self.lengths[split][picked].astype(np.int64))
        targets = torch.from_numpy(self.label_ids[split][picked].astype(np.int64))
        return Batch(inputs, targets, torch.arange(self.seq_len) >= lengths[:, None])
