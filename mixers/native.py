"""Native code that seqmix ships as C++ source, built on first use with the machine's compiler.

A fast path written in C++ (``impl="native"`` of the EMA, CEMA and TCN) is built once per machine
into seqmix's cache and loaded with ctypes: no build step at install, no wheel per platform, and
``-march=native`` lets the compiler vectorise for the CPU it runs on. Paths that need it say so
by name, and a machine without a compiler gets an error that names the compiler looked for and
the path to use instead.

The build needs a C++ compiler: ``$CXX``, else the first of ``c++``, ``g++`` and ``clang++`` on
``PATH``. OpenMP (threads) and ``-march=native`` are used when the compiler takes them. The library lands in
``$SEQMIX_CACHE_DIR/native`` (default ``$XDG_CACHE_HOME/seqmix``, else ``~/.cache/seqmix``),
named by a hash of the source and the headers beside it (``*.h``, which the source may include),
the compiler and its flags, and the CPU's feature flags: a cache
shared between machines never loads a library built for another CPU. A library is loaded only
from a folder owned by the current user that nobody else can write to.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch

from seqmix.errors import SeqmixError

COMPILERS = ("c++", "g++", "clang++")
# The dtypes native kernels are built for, by the suffix of their symbols.
DTYPE_SUFFIXES = {torch.float32: "f32", torch.float64: "f64"}
BASE_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c++17")
OPENMP_FLAG = "-fopenmp"


def cache_dir() -> Path:
    """Where built libraries live: ``$SEQMIX_CACHE_DIR/native``, default ``$XDG_CACHE_HOME/seqmix/native`` or ``~/.cache/seqmix/native``."""
    root = os.environ.get("SEQMIX_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "seqmix")
    return Path(root) / "native"


def compiler() -> str:
    """The C++ compiler's path: ``$CXX``, else the first of COMPILERS on PATH; a SeqmixError when none is found."""
    wanted = os.environ.get("CXX")
    candidates = (wanted,) if wanted else COMPILERS
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    looked = f"CXX={wanted!r}" if wanted else f"any of {list(COMPILERS)} on PATH"
    raise SeqmixError(f"native code needs a C++ compiler and found none ({looked}); install one (e.g. g++), "
                      "or use a path that needs none (impl='chunked' for the EMA and CEMA, impl='channels_last' for the TCN)")


def _cpu_flags() -> str:
    """The CPU's model and feature flags, which ``-march=native`` compiles for."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            lines = [line for line in info if line.startswith(("flags", "Features", "model name"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _compiler_version(path: str) -> str:
    try:
        return subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _private_dir(path: Path) -> Path:
    """``path``, created with mode 0700 if missing; a SeqmixError unless it is a folder the current
    user owns and nobody else can write to (a library loaded from it runs as this process)."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = path.stat()
    except OSError as error:
        raise SeqmixError(f"native code cache {str(path)!r} cannot be created or read ({error.strerror}); set "
                          "SEQMIX_CACHE_DIR to a folder you can write to") from error
    if not stat.S_ISDIR(info.st_mode):
        raise SeqmixError(f"native code cache {str(path)!r} is not a folder; set SEQMIX_CACHE_DIR to a private folder")
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        raise SeqmixError(
            f"native code cache {str(path)!r} is writable by another user (owner uid {info.st_uid}, mode "
            f"{stat.filemode(info.st_mode)}); seqmix loads native code only from a folder that only you can "
            "write to: set SEQMIX_CACHE_DIR to one"
        )
    return path


def _headers(source: Path) -> list[Path]:
    """The headers beside ``source``, which it may include, in a fixed order."""
    return sorted(source.parent.glob("*.h"))


def _build(source: Path, target: Path, cxx: str) -> list[str]:
    """Compile ``source`` into the shared library ``target`` (atomically), with OpenMP and
    ``-march=native`` when the compiler takes them, and the source's folder on the include path;
    returns the flags used. A SeqmixError with the compiler's output of every attempt on failure."""
    # Without OpenMP the kernel runs on one thread; without -march=native (a compiler that does not
    # know it for this CPU) it vectorises for the architecture's baseline.
    portable = [flag for flag in BASE_FLAGS if flag != "-march=native"]
    attempts = [[*BASE_FLAGS, OPENMP_FLAG], list(BASE_FLAGS), portable]
    errors = []
    for flags in attempts:
        handle, partial = tempfile.mkstemp(suffix=".so.partial", dir=target.parent)
        os.close(handle)
        try:
            result = subprocess.run([cxx, *flags, f"-I{source.parent}", str(source), "-o", partial], capture_output=True, text=True, timeout=600)
            if result.returncode == 0:
                os.chmod(partial, 0o700)
                os.replace(partial, target)
                return flags
            # The first lines: a compiler's first error is the one that explains the rest.
            errors.append(f"$ {cxx} {' '.join(flags)} ...\n{result.stderr[:2000]}")
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    raise SeqmixError(f"could not build {source.name} with {cxx}:\n" + "\n".join(errors))


@functools.lru_cache(maxsize=None)
def load(package: str, name: str) -> ctypes.CDLL:
    """The library built from the C++ source ``name`` in ``package`` (e.g. ``seqmix.operators``),
    built into ``cache_dir()`` on the first call on this machine (a second or so) and loaded once per process."""
    cxx = compiler()
    with resources.as_file(resources.files(package) / name) as source:
        code = [source.read_bytes(), *(header.read_bytes() for header in _headers(source))]
        key = hashlib.sha256(b"\0".join([
            *code, cxx.encode(), _compiler_version(cxx).encode(), " ".join(BASE_FLAGS + (OPENMP_FLAG,)).encode(),
            _cpu_flags().encode(), sys.platform.encode(),
        ])).hexdigest()[:24]
        folder = _private_dir(cache_dir())
        target = folder / f"{Path(name).stem}-{key}.so"
        if not target.exists():
            print(f"seqmix: building native code {name} with {cxx} (once per machine) into {folder}", file=sys.stderr)
            _build(source, target, cxx)
    return ctypes.CDLL(str(target))


def dtype_suffix(dtype: torch.dtype, path: str) -> str:
    """The symbol suffix of ``dtype`` in seqmix's native libraries (``f32``, ``f64``); a SeqmixError
    naming ``path`` (e.g. ``"tcn impl='native'"``) for any other dtype."""
    if dtype not in DTYPE_SUFFIXES:
        raise SeqmixError(f"{path} runs in float32 or float64, not {dtype}")
    return DTYPE_SUFFIXES[dtype]


def pointers(*tensors: torch.Tensor | None) -> list[int | None]:
    """The data pointers native kernels take, None for an absent operand. Callers make every tensor
    contiguous on the CPU; anything else is a bug here, not a user's error."""
    for tensor in tensors:
        if tensor is not None and not tensor.is_contiguous():
            raise AssertionError("native kernel operands must be contiguous")
    return [None if tensor is None else tensor.data_ptr() for tensor in tensors]


def gradient_rows(grad: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The gradient reaching a native output shaped like ``like`` (B, L, D), as kernels read it: rows
    of D contiguous values in ``like``'s dtype, with the strides between batch rows and between steps.

    A gradient that is one row everywhere (``y.sum().backward()`` sends an expanded scalar; no
    gradient at all is zeros) is passed as that row with strides 0, not copied out to (B, L, D).
    """
    if grad is None:
        return like.new_zeros(1, 1, like.shape[-1]), (0, 0)
    if grad.stride(0) == 0 and grad.stride(1) == 0:
        return grad[:1, :1].to(like.dtype).contiguous(), (0, 0)
    grad = grad.to(like.dtype)
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    return grad, (grad.stride(0), grad.stride(1))


def row_pointer(tensor: torch.Tensor) -> int:
    """The data pointer of an operand a kernel reads as rows of contiguous values at strides passed
    beside it (the rows themselves must be contiguous; anything else is a bug here)."""
    if tensor.numel() > 0 and tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise AssertionError("native kernel rows must be contiguous")
    return tensor.data_ptr()


def function(library: ctypes.CDLL, symbol: str, addresses: int, sizes: int, flags: int, status: bool = False):
    """``symbol`` of ``library``, typed as seqmix's kernels are: ``addresses`` data pointers, then
    ``sizes`` int64 sizes, then ``flags`` ints; returning an int status when ``status`` (0: done,
    1: its scratch memory could not be allocated), else nothing."""
    kernel = getattr(library, symbol)
    kernel.argtypes = [ctypes.c_void_p] * addresses + [ctypes.c_int64] * sizes + [ctypes.c_int] * flags
    kernel.restype = ctypes.c_int if status else None
    return kernel
