"""Byte-level language modelling on the Python standard library's own source files.

The corpus is real text present on every machine that runs Python, so no download is needed. It is
split by file with a fixed hash (a file is wholly in ``train`` or wholly in ``valid``), each split is
the concatenation of its files' bytes (files separated by a newline), and the two arrays are cached
on disk so later runs do not re-read the sources.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from seqmix.errors import SeqmixError, require_int, require_seed
from seqmix.staging import new_file
from seqmix.tasks._checks import check_request
from seqmix.tasks.base import SPLITS, Batch, Task, generator_for

VALID_EVERY = 20
"""A file goes to ``valid`` when its path hash is divisible by this (about 5% of the files)."""


def split_of(relative: str) -> str:
    """The split of the stdlib file at ``relative`` (POSIX path below the stdlib root)."""
    digest = hashlib.sha1(relative.encode("utf-8")).hexdigest()
    return "valid" if int(digest, 16) % VALID_EVERY == 0 else "train"


def source_files(root: Path) -> list[Path]:
    """Every ``*.py`` file below ``root``, not descending into site-packages (third-party code)."""
    found = []
    for directory, subdirectories, names in os.walk(root):
        # Pruning in place stops os.walk before it lists the (often large) installed packages.
        subdirectories[:] = [name for name in subdirectories if name != "site-packages"]
        found.extend(Path(directory, name) for name in names if name.endswith(".py"))
    return found


def read_source(path: Path) -> bytes:
    """The bytes of one source file (a module-level function so tests can watch or forbid reads)."""
    return path.read_bytes()


class StdlibCorpus:
    """The stdlib's ``*.py`` files as two byte arrays, split by file and cached on disk.

    Args:
        cache_dir: where the split arrays are cached (``~`` is expanded).
        max_bytes: keep only the first ``max_bytes`` bytes of each split; None keeps everything.
        owner: the task name that error messages start with.

    Attributes:
        root: the stdlib directory the files come from.
        files: split -> sorted POSIX paths below ``root`` assigned to it (site-packages excluded).
        cache_paths: split -> the ``.npy`` cache file of its full byte array.
        data: split -> (N_split,) uint8 tensor, the split's bytes (capped at ``max_bytes``).
    """

    def __init__(self, cache_dir: str | os.PathLike = "~/.cache/seqmix", max_bytes: int | None = None,
                 owner: str = "byte_lm"):
        if not isinstance(cache_dir, (str, os.PathLike)):
            raise SeqmixError(f"{owner}: cache_dir={cache_dir!r} is not valid; expected a directory path")
        if max_bytes is not None:
            require_int(owner, "max_bytes", max_bytes, 1, "or None for the whole split")
        self.root = Path(sysconfig.get_paths()["stdlib"])
        paths = sorted(source_files(self.root))
        relatives = [p.relative_to(self.root).as_posix() for p in paths]
        self.files = {split: [r for r in relatives if split_of(r) == split] for split in SPLITS}
        # The cache key covers the file list and sizes, so an edited or upgraded stdlib gets a fresh cache.
        listing = hashlib.sha1()
        for path, relative in zip(paths, relatives):
            listing.update(f"{relative}\t{path.stat().st_size}\n".encode("utf-8"))
        directory = Path(cache_dir).expanduser()
        stem = f"byte_lm-{platform.python_version()}-{listing.hexdigest()[:16]}"
        self.cache_paths = {split: directory / f"{stem}-{split}.npy" for split in SPLITS}
        if not all(path.is_file() for path in self.cache_paths.values()):
            self._write_cache(directory, owner)
        self.data = {split: self._load(split, max_bytes) for split in SPLITS}

    def _write_cache(self, directory: Path, owner: str) -> None:
        """Read every source file once and write each split's byte array atomically."""
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SeqmixError(f"{owner}: cache_dir={str(directory)!r} cannot be created: {error}") from None
        for split in SPLITS:
            chunks = []
            for relative in self.files[split]:
                try:
                    chunks.append(read_source(self.root / relative))
                except OSError:
                    continue  # unreadable files (permissions, broken links) are simply not part of the corpus
            array = np.frombuffer(b"\n".join(chunks), dtype=np.uint8)
            # Temp file then os.replace: a crash or a concurrent run never leaves a half-written cache.
            temporary = new_file(directory, self.cache_paths[split].name, ".tmp")
            try:
                with open(temporary, "wb") as stream:
                    np.save(stream, array)
                os.replace(temporary, self.cache_paths[split])
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise

    def _load(self, split: str, max_bytes: int | None) -> Tensor:
        # Memory-mapping first means a capped split only touches its first max_bytes bytes on disk.
        array = np.load(self.cache_paths[split], mmap_mode="r")[:max_bytes]
        return torch.from_numpy(np.array(array))


class ByteLM(Task):
    """Next-byte prediction on the Python standard library's source (vocabulary: the 256 byte values).

    Args:
        seq_len: L, bytes per sequence.
        cache_dir: where the corpus arrays are cached.
        max_bytes: cap on each split's bytes for quick runs; None uses the whole split.
        seed: seeds the training windows.

    Attributes:
        corpus: the StdlibCorpus (``corpus.files`` lists each split's files; ``corpus.data`` the bytes).

    Batches: inputs (B, L) long bytes, targets (B, L) long = the next byte of each input
    (targets[:, t] = inputs[:, t + 1]). ``train`` windows start at random offsets; ``valid`` batch
    i holds windows i·B .. i·B + B − 1 of the split tiled with stride L (wrapping around), so the
    evaluation set is fixed and its targets cover every byte of the split exactly once per pass.
    """

    name = "byte_lm"
    head = "causal_lm"
    metric = "bits_per_byte"
    models_text = True
    vocab_size = 256

    def __init__(self, seq_len: int = 256, cache_dir: str | os.PathLike = "~/.cache/seqmix",
                 max_bytes: int | None = None, seed: int = 0):
        require_int(self.name, "seq_len", seq_len, 1)
        require_seed(self.name, "seed", seed)
        self.seq_len = seq_len
        self.seed = seed
        self.corpus = StdlibCorpus(cache_dir, max_bytes, self.name)
        for split, data in self.corpus.data.items():
            if data.numel() < seq_len + 1:
                raise SeqmixError(
                    f"{self.name}: the {split} split has {data.numel()} bytes (max_bytes={max_bytes!r}), fewer than "
                    f"seq_len + 1 = {seq_len + 1}; raise max_bytes or lower seq_len"
                )

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        check_request(self.name, split, index, batch_size, self.seq_len)
        data = self.corpus.data[split]
        span = self.seq_len + 1
        if split == "train":
            generator = generator_for(self.seed, split, index)
            starts = torch.randint(0, data.numel() - span + 1, (batch_size,), generator=generator)
        else:
            # Stride L (not L + 1): consecutive windows share one byte, so every byte is a target once.
            windows = (data.numel() - 1) // self.seq_len
            starts = (torch.arange(batch_size) + index * batch_size) % windows * self.seq_len
        window = data[starts[:, None] + torch.arange(span)].long()
        return Batch(window[:, :-1], window[:, 1:])
