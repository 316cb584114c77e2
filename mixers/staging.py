"""Files and folders written for others to read: fresh names beside a target, for writes that end
in a rename onto it, and writes through libraries that make their files private.

``tempfile.mkdtemp`` and ``mkstemp`` create private entries (0700, 0600) whatever the umask, as does
safetensors' writer, and a rename keeps the mode: a model folder shared with others then held
weights no one else could read. These leave theirs as ``mkdir`` and ``open`` do, 0777 and 0666 less
the umask.
"""
from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path


def _fresh(parent: Path, prefix: str, suffix: str, create) -> Path:
    """``create(path)`` at the first free ``parent/<prefix><random><suffix>``."""
    while True:
        path = Path(parent) / f"{prefix}{secrets.token_hex(8)}{suffix}"
        try:
            create(path)
        except FileExistsError:
            continue
        return path


def new_directory(parent: str | os.PathLike, prefix: str) -> Path:
    """A new empty directory in ``parent`` whose name starts with ``prefix``, with the umask's mode."""
    return _fresh(Path(parent), prefix, "", os.mkdir)


def new_file(parent: str | os.PathLike, prefix: str, suffix: str = "") -> Path:
    """A new empty file in ``parent`` named ``<prefix>...<suffix>``, with the umask's mode."""
    return _fresh(Path(parent), prefix, suffix, lambda path: os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))


def write_shareable(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """``write(path)``, leaving ``path`` with the mode ``open`` gives it (0666 less the umask, or the
    mode it already has), whatever mode ``write`` gives its file."""
    path = Path(path)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        mode = stat.S_IMODE(os.fstat(descriptor).st_mode)
    finally:
        os.close(descriptor)
    write(path)
    os.chmod(path, mode)
