"""What the tasks over the user's files share: the cache key, the hashed split, the staged cache directory.

A cache directory ``<cache_dir>/<task>/<key>`` is written under a temporary name beside its final
one and renamed into place only when complete, so a run killed while tokenizing leaves no cache
that a later run would trust; ``meta.json`` inside marks it complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from seqmix.errors import SeqmixError, json_kind
from seqmix.jsontext import parse_json
from seqmix.staging import new_directory

META = "meta.json"


CACHE_KEY_VERSION = 2
"""Version 1 hashed each file as its name, a NUL and its bytes, with no length: the file ``a.txt``
holding ``X`` + ``b.tx`` and a file ``t`` holding ``Y`` hashed as ``a.txt`` holding ``X`` and
``b.txt`` holding ``Y``, so one corpus trained on the other's cached tokens."""


def cache_key(options: list, files: list[Path]) -> str:
    """sha256 (32 hex digits) of ``options`` (JSON) and of every file, in order, as the lengths of its
    name and bytes before them: no two corpora give the same stream of hashed bytes."""
    digest = hashlib.sha256(json.dumps([CACHE_KEY_VERSION, options]).encode())
    for path in files:
        name = path.name.encode("utf-8", "surrogateescape")
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            digest.update(len(name).to_bytes(8, "big") + name + size.to_bytes(8, "big"))
            read = 0
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
                read += len(block)
        if read != size:
            raise SeqmixError(f"{path} changed while it was read ({size} bytes, then {read}); run again once it is written")
    return digest.hexdigest()[:32]


def hashed_split(content: bytes, valid_fraction: float) -> str:
    """``valid`` when the sha256 of ``content`` falls below ``valid_fraction`` of its range, else ``train``.

    A record's split depends on its own bytes alone: stable however the files are ordered or added to.
    """
    fraction = int.from_bytes(hashlib.sha256(content).digest()[:8], "big") / 2**64
    return "valid" if fraction < valid_fraction else "train"


def is_complete(cache: Path) -> bool:
    return (cache / META).is_file()


def needs_building(owner: str, cache: Path) -> bool:
    """Whether the cache is still to be made; one that is there without its meta.json is refused as
    damaged, before the corpus is read: a cache is renamed into place whole, meta.json in it, so the
    file was removed since, and rebuilding ended in an error from the rename after the whole tokenization."""
    if is_complete(cache):
        return False
    if os.path.lexists(cache):
        raise _damaged(owner, cache, f"{META} is missing")
    return True


def _damaged(owner: str, cache: Path, why: str) -> SeqmixError:
    return SeqmixError(f"{owner}: the token cache {cache} is damaged ({why}); remove that folder and the next run "
                       "tokenizes the data again")


def read_meta(owner: str, cache: Path) -> dict:
    """A complete cache's meta.json, a JSON object; anything else is refused naming the folder."""
    try:
        meta = parse_json((cache / META).read_bytes())
    except (OSError, ValueError) as error:
        raise _damaged(owner, cache, f"{META} is not readable JSON: {error}") from None
    if not isinstance(meta, dict):
        raise _damaged(owner, cache, f"{META} holds {json_kind(meta)}, not an object")
    return meta


def split_counts(owner: str, cache: Path, meta: dict, key: str) -> dict[str, int]:
    """``meta[key]``, a count (a non-negative int) for each split; anything else is refused naming the folder."""
    from seqmix.tasks.base import SPLITS

    counts = meta.get(key)
    valid = isinstance(counts, dict) and all(
        isinstance(counts.get(split), int) and not isinstance(counts.get(split), bool) and counts[split] >= 0 for split in SPLITS)
    if not valid:
        raise _damaged(owner, cache, f"its {META} holds {key}={counts!r}, not a count for each of {list(SPLITS)}")
    return counts


def require_cache_file(owner: str, cache: Path, name: str, size: int) -> Path:
    """``cache / name``, once it is a regular file of ``size`` bytes, the length its meta.json implies.
    The cache was trusted on meta.json alone: a cut token file trained on part of the data without a
    word, or failed in numpy (an odd length, an empty file, a missing one)."""
    path = cache / name
    if path.is_symlink() or not path.is_file():
        raise _damaged(owner, cache, f"{name} is missing")
    found = path.stat().st_size
    if found != size:
        raise _damaged(owner, cache, f"{name} holds {found:,} bytes where its {META} implies {size:,}")
    return path


def load_array(owner: str, cache: Path, name: str, length: int):
    """The 1-D ``.npy`` array ``cache / name`` memory-mapped, once it holds ``length`` values."""
    import numpy as np

    path = cache / name
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise _damaged(owner, cache, f"{name} is not readable: {error}") from None
    if array.shape != (length,):
        raise _damaged(owner, cache, f"{name} holds shape {array.shape} where its {META} implies ({length},)")
    return array


@contextmanager
def staged_cache(cache: Path) -> Iterator[Path]:
    """A fresh directory to write the cache into; renamed to ``cache`` when the block ends without error.

    The block must write ``meta.json`` last. When another process completed the same cache first,
    its copy is kept (same key, same contents) and this one removed.
    """
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = new_directory(cache.parent, f".{cache.name}.partial-")
    try:
        yield staging
        try:
            os.rename(staging, cache)
        except OSError:
            if not is_complete(cache):
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
