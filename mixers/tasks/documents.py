"""Rows of the user's files: text files, JSONL, CSV, Parquet, or a Hugging Face ``datasets`` dataset.

``DocumentSource(path, format, decode_errors).rows({"text_column": "body"})`` yields ``(where, row)``
for every record, ``where`` naming the file and the line or row (for error messages) and ``row``
mapping each option (``text_column``) to that record's value in the column it names (``body``). A plain text file is one record whose only column is the text. Every problem is a
``SeqmixError`` naming the file and the line or row: a missing column, a value of the wrong type,
undecodable bytes under ``decode_errors=strict``, a line that is not JSON.
"""
from __future__ import annotations

import csv
import fnmatch
import io
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

from tqdm.auto import tqdm

from seqmix.errors import SeqmixError, SeqmixWarning, first_few, one_line, require_choice, require_path, json_kind
from seqmix.jsontext import parse_json

FORMATS = ("auto", "text", "jsonl", "csv", "parquet", "datasets")
DECODE_ERRORS = ("replace", "strict")
SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
DATASETS_BUILDERS = {"jsonl": "json", "csv": "csv", "parquet": "parquet", "text": "text"}
"""The ``datasets`` builder that reads local files of each format."""
BINARY_PROBE_BYTES = 8192
"""Leading bytes of a file searched for a NUL byte, which marks it binary (as git tells text from binary)."""


UTF8_BOM = "\ufeff".encode()
"""The UTF-8 byte order mark some editors write first; dropped from text, JSONL and CSV files."""


def is_binary(raw: bytes) -> bool:
    """Whether a file's bytes are binary data rather than text: a NUL among its first BINARY_PROBE_BYTES.

    Text never holds one, while compressed files, images, PDFs, compiled code and UTF-16 text do,
    almost always in their first few KiB."""
    return b"\0" in raw[:BINARY_PROBE_BYTES]


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``datasets``' ``save_to_disk``."""
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def source_files(path: str, options: str = "task.") -> list[Path]:
    """The files ``path`` names: itself, every file below a directory (hidden ones skipped), or a glob's matches, sorted.

    A path that exists is itself, whatever characters it holds (``data[1].csv`` was read as the glob
    ``data1.csv``); only one that does not is read as a glob. ``**`` does not follow symbolic links to
    folders (a link back up repeated every file, two of them never ended), and a file reached twice
    (through a link, in a folder or by a glob) is read once. ``options`` prefixes the option names errors cite (``task.path``; ``path`` for ``seqmix tokenizer``).
    """
    root = Path(path).expanduser()
    if root.exists():
        files = [root] if root.is_file() else _once(sorted(
            p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ))
    elif any(character in path for character in "*?["):
        files = _glob_files(os.path.expanduser(path))
    else:
        raise SeqmixError(f"{options}path={path!r} does not exist; give a file, a directory, a glob or a saved dataset")
    if not files:
        raise SeqmixError(f"{options}path={path!r} names no files; the corpus is empty")
    return files


def _once(files: list[Path]) -> list[Path]:
    """``files`` without those reached again by another name (a link to a file in the same folder was
    read twice, its document trained on twice)."""
    seen, kept = set(), []
    for file in files:
        real = os.path.realpath(file)
        if real not in seen:
            seen.add(real)
            kept.append(file)
    return kept


def _glob_files(pattern: str) -> list[Path]:
    """The files ``pattern`` matches, sorted, each once (by its real path): pathlib's glob below the
    pattern's folder without wildcards, whose ``**`` does not follow links to folders. Hidden files and
    folders are matched only where the pattern names them."""
    parts = Path(pattern).parts
    fixed = next(index for index, part in enumerate(parts) if any(character in part for character in "*?["))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    named = set(parts[fixed:])
    return _once([match for match in sorted(base.glob(str(Path(*parts[fixed:]))))
                  if match.is_file() and not any(part.startswith(".") and part not in named
                                                 for part in match.relative_to(base).parts)])


def _lines(path: Path) -> Iterator[bytes]:
    """The lines of a file, read as it streams: they end at LF (CRLF included), or at CR in a file
    whose first 64 KiB hold CR and no LF (classic Mac line ends, which were one line: "Extra data")."""
    with open(path, "rb") as handle:
        start = handle.read(1 << 16)
        if b"\r" in start and b"\n" not in start:
            yield from (start + handle.read()).split(b"\r")
            return
        handle.seek(0)
        yield from handle


def inside_corpus(corpus: str, target: str | os.PathLike) -> bool:
    """Whether ``target`` lies where the corpus path ``corpus`` reads: inside its folder, or matched by
    its glob (what a later run on the same corpus would read as documents)."""
    resolved = Path(os.path.realpath(Path(target).expanduser()))
    base = Path(corpus).expanduser()
    if base.is_dir():
        return Path(os.path.realpath(base)) in resolved.parents or Path(os.path.realpath(base)) == resolved
    if base.exists():
        return Path(os.path.realpath(base)) == resolved
    pattern = os.path.realpath(base)
    return fnmatch.fnmatch(str(resolved), pattern) or any(fnmatch.fnmatch(str(parent), pattern) for parent in resolved.parents)


def _named_classes(dataset, column: str) -> list:
    """A dataset column's values, a ``ClassLabel``'s as its class names (they were read as the integers
    0, 1, ...: a classifier's labels.json said "0" and "1" where the dataset said "negative" and
    "positive"); its -1, no label, as None."""
    import datasets

    values = dataset[column]
    feature = dataset.features.get(column)
    if isinstance(feature, datasets.ClassLabel):
        return [None if value is None or value < 0 else feature.int2str(int(value)) for value in values]
    return values


class DocumentSource:
    """The records of the user's files.

    Args:
        path: a file, a directory, a glob, or a directory written by ``datasets``' ``save_to_disk``.
        format: ``auto`` (by suffix: .jsonl/.json, .csv, .parquet, anything else text, leaving out files
            that hold binary data (``is_binary``) with a warning naming them; a saved dataset by its
            files), ``text`` (each file one record, binary or not), ``jsonl``, ``csv``, ``parquet``, or ``datasets``
            (a saved dataset, or the files read through ``datasets.load_dataset`` with the builder
            their suffix names).
        decode_errors: ``replace`` turns bytes that are not UTF-8 into U+FFFD; ``strict`` refuses them,
            naming the file and line.
        owner: the task name that prefixes error messages.
        options: what prefixes the option names they cite: ``task.`` for a task's, ``""`` for the
            ``seqmix tokenizer`` command's own.
        cache_dir: the task's cache folder: files under it are not part of the corpus, and ``datasets``
            keeps what it makes of local files in its ``datasets`` folder (its default cache when None).
    """

    def __init__(self, path: str, format: str = "auto", decode_errors: str = "replace", owner: str = "text",
                 cache_dir: str | os.PathLike | None = None, options: str = "task."):
        require_path(f"{owner}: {options}path", path)
        require_choice(f"{owner}: format", format, FORMATS)
        require_choice(f"{owner}: decode_errors", decode_errors, DECODE_ERRORS)
        self.path, self.format, self.decode_errors, self.owner, self.options = path, format, decode_errors, owner, options
        self.cache_dir = None if cache_dir is None else str(Path(cache_dir).expanduser() / "datasets")
        self.saved = is_saved_dataset(Path(path).expanduser())
        files = sorted(p for p in Path(path).expanduser().rglob("*") if p.is_file()) if self.saved else source_files(path, options)
        if cache_dir is not None:
            # A cache inside the corpus's folder: from the second run on, its tokens and meta.json
            # were read as documents (and refused as a stray JSON file).
            cache = Path(cache_dir).expanduser().resolve()
            files = [file for file in files if cache not in file.resolve().parents]
            if not files:
                raise SeqmixError(f"{owner}: {options}path={path!r} holds no files outside {options}cache_dir={str(cache_dir)!r}")
        self.files = files

    def kind_of(self, path: Path) -> str:
        return self.format if self.format not in ("auto", "datasets") else SUFFIX_FORMATS.get(path.suffix.lower(), "text")

    def rows(self, columns: Mapping[str, str]) -> Iterator[tuple[str, dict]]:
        """``(where, {option: value})`` of every record, in file order; ``columns`` maps each option to its column."""
        if self.saved or self.format == "datasets":
            yield from self._dataset_rows(columns)
            return
        binary = []
        # disable=None: a bar on a terminal only, none written into a log or a pipe.
        for path in tqdm(self.files, desc="reading", unit="file", leave=False, disable=None):
            kind = self.kind_of(path)
            if kind == "text":
                raw = path.read_bytes()
                if self.format == "auto" and is_binary(raw):
                    # With replace, its bytes would enter the corpus as U+FFFD and noise.
                    binary.append(path)
                    continue
                # A UTF-8 byte order mark (Windows editors write one) is no part of the text, as for CSV.
                yield f"{path}", {next(iter(columns)): self.decode(raw, path).removeprefix(UTF8_BOM).decode()}
            elif kind == "jsonl":
                yield from self._jsonl(path, columns)
            elif kind == "csv":
                yield from self._csv(path, columns)
            else:
                yield from self._parquet(path, columns)
        if binary:
            self._left_out_binary(binary)

    def _left_out_binary(self, binary: list[Path]) -> None:
        """Refuse a source whose files are all binary; otherwise warn, naming the binary files left out."""
        named = first_few(str(path) for path in binary)
        why = (f"binary data, not text (a NUL byte in the first {BINARY_PROBE_BYTES} bytes: compressed, image, "
               f"compiled or UTF-16 files)")
        if len(binary) == len(self.files):
            raise SeqmixError(f"{self.owner}: {self.options}path={self.path!r}: every file holds {why}: {named}; "
                              f"give text files, or {self.options}format=text to read them as they are")
        warnings.warn(f"seqmix: {self.owner}: left out {len(binary)} of {len(self.files)} files, which hold {why}: "
                      f"{named}; {self.options}format=text reads them as they are", SeqmixWarning, stacklevel=3)

    def decode(self, raw: bytes, where: Path | str, line: int | None = None) -> bytes:
        """``raw`` as valid UTF-8 bytes, under the decode_errors policy."""
        try:
            raw.decode("utf-8", errors="strict")
            return raw
        except UnicodeDecodeError as error:
            if self.decode_errors == "replace":
                return raw.decode("utf-8", errors="replace").encode()
            at = line if line is not None else raw.count(b"\n", 0, error.start) + 1
            raise SeqmixError(
                f"{self.owner}: {where} line {at} holds bytes that are not UTF-8 ({error.reason}); fix the file or use "
                f"{self.options}decode_errors=replace"
            ) from None

    def _missing(self, columns: Mapping[str, str], found: list, where: str) -> None:
        """Raise naming the first column of ``columns`` that ``found`` lacks, and the option that names it."""
        for option, column in columns.items():
            if column not in found:
                raise SeqmixError(f"{self.owner}: {where} has no column {column!r} (its columns: {found}); set {self.options}{option}")

    def _pick(self, row, columns: Mapping[str, str], where: str) -> dict:
        if not isinstance(row, dict):
            raise SeqmixError(f"{self.owner}: {where} is {json_kind(row)}, not an object with columns {list(columns.values())}")
        self._missing(columns, sorted(row), where)
        return {option: row[column] for option, column in columns.items()}

    def _jsonl(self, path: Path, columns: Mapping[str, str]) -> Iterator[tuple[str, dict]]:
        for number, raw in enumerate(_lines(path), 1):
            if not raw.strip():
                continue
            where = f"{path} line {number}"
            # Decoded first: its refusal (bytes that are not UTF-8) is its own, not "not a JSON object".
            text = self.decode(raw, path, number)
            if number == 1:
                text = text.removeprefix(UTF8_BOM)  # a byte order mark made line 1 "not a JSON object"
            try:
                row = parse_json(text)
            except ValueError as error:
                hint = ("; a .json file is read as JSON Lines, one object per line: write the array's objects one per "
                        "line (a .jsonl file)" if number == 1 and text.lstrip().startswith(b"[") else "")
                raise SeqmixError(f"{self.owner}: {where} is not a JSON object ({error}){hint}") from None
            yield where, self._pick(row, columns, where)

    def _csv(self, path: Path, columns: Mapping[str, str]) -> Iterator[tuple[str, dict]]:
        raw = path.read_bytes()
        if is_binary(raw):
            raise SeqmixError(f"{self.owner}: {path} holds NUL bytes, so it is not UTF-8 text (UTF-16, as some programs save "
                              "CSV, or a binary file); save it as UTF-8")
        # Excel saves UTF-8 CSV with a byte order mark, which would become part of the first column's name.
        text = self.decode(raw, path).removeprefix(UTF8_BOM).decode()
        # A document is one field, and the csv module refuses a field over 128 KiB by default: the
        # limit (process-wide) goes up to the file's length, which no field exceeds.
        csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
        # strict: a quote left open is an error where the file ends, not a record swallowing the rest.
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
        records = iter(reader)
        started = 1
        try:
            header = reader.fieldnames or []
            if not header:
                raise SeqmixError(f"{self.owner}: {path} is empty; a CSV starts with a header line naming its columns")
            repeated = sorted({name for name in header if header.count(name) > 1})
            if repeated:
                raise SeqmixError(f"{self.owner}: {path} names the column(s) {repeated} more than once in its header {header}")
            self._missing(columns, header, f"{path}")
            started = reader.line_num + 1
            for row in records:
                # The reader's line_num is the physical line a record ends on, so quoted newlines still point right.
                where = f"{path} line {reader.line_num}"
                if row.get(None):  # the fields past the header's, which DictReader keeps under None
                    raise SeqmixError(f"{self.owner}: {where} has more fields than the header {header}: quote a field "
                                      "that holds a comma")
                # Any field missing, not only the columns read: a short row is a sign of a broken line.
                if any(row.get(column) is None for column in header):
                    raise SeqmixError(f"{self.owner}: {where} has fewer fields than the header {header}")
                yield where, {option: row[column] for option, column in columns.items()}
                started = reader.line_num + 1
        except csv.Error as error:
            hint = "; is a quote left open there?" if "end of data" in str(error) else ""
            raise SeqmixError(f"{self.owner}: {path}: the record from line {started} is not valid CSV ({error}){hint}") from None

    def _parquet(self, path: Path, columns: Mapping[str, str]) -> Iterator[tuple[str, dict]]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SeqmixError(f"{self.owner}: reading {path} needs pyarrow: pip install 'seqmix[data]'") from None
        try:
            self._missing(columns, pq.read_schema(path).names, f"{path}")
            table = pq.read_table(path, columns=list(dict.fromkeys(columns.values()))).to_pydict()
        except SeqmixError:  # a missing column, told as such
            raise
        except (OSError, ValueError) as error:  # pyarrow: ArrowInvalid (a ValueError) for a file that is not Parquet
            raise SeqmixError(f"{self.owner}: {path} is not a readable Parquet file ({one_line(error)})") from None
        for number in range(len(next(iter(table.values())))):
            yield f"{path} row {number}", {option: table[column][number] for option, column in columns.items()}

    def _load_dataset(self):
        try:
            import datasets
        except ImportError:
            raise SeqmixError(f"{self.owner}: reading {self.path} through datasets needs it: pip install 'seqmix[data]'") from None
        if self.saved:
            loaded = datasets.load_from_disk(str(Path(self.path).expanduser()))
        else:
            kinds = {self.kind_of(path) for path in self.files}
            if len(kinds) != 1:
                raise SeqmixError(f"{self.owner}: {self.path!r} mixes file kinds {sorted(kinds)}; datasets reads one kind at a time")
            builder = DATASETS_BUILDERS[kinds.pop()]
            try:
                # Rebuilt from the files every time: datasets keys its own cache on their paths and
                # modification times, so a file rewritten at the same size with its time kept (cp -p,
                # rsync -a, tar x) was read as it was before, and its tokens cached under the new content's key.
                loaded = datasets.load_dataset(builder, data_files=[str(path) for path in self.files], split="train",
                                               cache_dir=self.cache_dir, download_mode=datasets.DownloadMode.FORCE_REDOWNLOAD)
            except Exception as error:  # noqa: BLE001  (datasets raises its own, pyarrow's and Python's errors for a bad file)
                raise SeqmixError(f"{self.owner}: datasets could not read {self.path!r} as {builder} ({one_line(error)}); "
                                  f"datasets reads UTF-8 only, whatever {self.options}decode_errors says: without "
                                  f"{self.options}format=datasets seqmix reads JSONL, CSV and text itself") from None
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise SeqmixError(f"{self.owner}: the saved dataset {self.path!r} has the splits {sorted(loaded)} and no "
                                  "'train'; seqmix makes its own validation split from the rows it trains on, so save the "
                                  "split to train on alone (or as 'train')")
            left_out = sorted(name for name in loaded if name != "train")
            if left_out:
                # Merged, a user's held-out test rows were trained on.
                warnings.warn(f"seqmix: {self.owner}: the saved dataset {self.path!r} is read from its 'train' split only; "
                              f"{first_few([repr(name) for name in left_out])} left out (seqmix makes its own validation split, "
                              f"{self.options}valid_fraction)", SeqmixWarning, stacklevel=3)
            return [("train", loaded["train"])]
        return [("", loaded)]

    def _dataset_rows(self, columns: Mapping[str, str]) -> Iterator[tuple[str, dict]]:
        for part, dataset in self._load_dataset():
            self._missing(columns, dataset.column_names, " ".join(filter(None, [f"the dataset {self.path}", part])))
            values = {option: _named_classes(dataset, column) for option, column in columns.items()}
            for number in tqdm(range(len(dataset)), desc="reading", unit="row", leave=False, disable=None):
                where = " ".join(filter(None, [f"the dataset {self.path}", part, f"row {number}"]))
                yield where, {option: values[option][number] for option in columns}
