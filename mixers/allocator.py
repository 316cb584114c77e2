"""How the ``seqmix`` command sets the C allocator: memory a call frees stays in the process for the next one.

torch allocates CPU tensors with malloc. glibc's malloc serves a large block (above a threshold
that starts at 128 KiB and adapts upward as such blocks are freed) from a fresh ``mmap`` and
returns it to the kernel when it is freed; it also trims the top of its heap when enough freed
memory collects there. Either way, a layer that allocates tens of MiB of temporaries per call
gets pages the kernel must fault in and zero again on every call, and whether it does depends on
what the process allocated before: the same call's time can double from one run to the next.
tools/perf/roofline.md (``python tools/measure_roofline.py``) times the operators both ways.

So the command keeps freed memory, as jemalloc and tcmalloc do: blocks up to 32 MiB (the most
glibc allows for the threshold) come from the heap, and the heap is never trimmed. The process
then holds on to its peak memory until it exits. Tensors larger than 32 MiB are still mapped per
call. Any ``MALLOC_*_`` variable, or ``glibc.malloc`` in ``GLIBC_TUNABLES``, means the user chose
the allocator's settings: they are left as they are. Other C libraries are left as they are too.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
"""glibc's ``mallopt`` parameter numbers (malloc.h)."""
MMAP_THRESHOLD = 32 * 2**20
"""The largest threshold glibc accepts on 64-bit systems: blocks up to this size come from the heap."""
TOP_PAD = 64 * 2**20
"""Extra memory the heap takes each time it grows, so that growing in small steps costs fewer system calls."""
NEVER_TRIM = 2**31 - 1
"""mallopt takes an int: the largest one, so that the heap's top is never given back while the process runs."""
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                  "MALLOC_ARENA_MAX")

_applied: str | None = None


def user_settings() -> str | None:
    """The environment variable through which the user set glibc's malloc, or None."""
    for name in USER_VARIABLES:
        if name in os.environ:
            return name
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return None


def applied_policy() -> str | None:
    """What ``keep_freed_memory`` answered in this process, or None when it has not run."""
    return _applied


def keep_freed_memory() -> str:
    """Set glibc's malloc to keep what it frees (see the module docstring); return what the process now uses.

    Idempotent: a second call returns the first call's answer. The answer is one line for reports,
    e.g. ``"glibc malloc keeping freed memory (mmap threshold 32 MiB, no trim)"``.
    """
    global _applied
    if _applied is not None:
        return _applied
    libc_name, _ = platform.libc_ver()
    chosen = user_settings()
    if libc_name != "glibc":
        _applied = f"{libc_name or 'the C library'}'s malloc as it is (not glibc)"
    elif chosen is not None:
        _applied = f"glibc malloc as set by {chosen}"
    else:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = [libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD), libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM),
                libc.mallopt(M_TOP_PAD, TOP_PAD)]
        if all(done):
            _applied = f"glibc malloc keeping freed memory (mmap threshold {MMAP_THRESHOLD // 2**20} MiB, no trim)"
        else:
            _applied = "glibc malloc with its defaults (mallopt refused the settings)"
    return _applied
