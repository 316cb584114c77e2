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

from seqmix.staging import new_directory

META = "meta.json"


def cache_key(options: list, files: list[Path]) -> str:
    """sha256 (32 hex digits) of ``options`` (JSON) and of every file's name and bytes, in order."""
    digest = hashlib.sha256(json.dumps(options).encode())
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def hashed_split(content: bytes, valid_fraction: float) -> str:
    """``valid`` when the sha256 of ``content`` falls below ``valid_fraction`` of its range, else ``train``.

    A record's split depends on its own bytes alone: stable however the files are ordered or added to.
    """
    fraction = int.from_bytes(hashlib.sha256(content).digest()[:8], "big") / 2**64
    return "valid" if fraction < valid_fraction else "train"


def is_complete(cache: Path) -> bool:
    return (cache / META).is_file()


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
