"""How many CPU threads torch uses under the ``seqmix`` command and the test suite.

torch's default is one thread per core, with OpenMP's threads spinning while they wait for each
other. That is the fastest setting on an idle machine and the slowest on a shared one: when
another process holds a core, every parallel region waits for a thread that is not running.
tools/measure_threads.py measures it (its report: tools/perf/threads.md): on 2 cores beside one
CPU-bound process, two threads trained at less than half the speed of one, OMP_WAIT_POLICY=PASSIVE
recovered only part of that (and must be set before torch loads), and one thread lost part of
the idle speed but none of it when the machine was shared. So seqmix uses half the cores, at
least one: one thread on a 2-core machine.

The test suite (``make test``) runs one single-threaded pytest-xdist worker per core instead.
An explicit OMP_NUM_THREADS always wins (torchrun sets it for each worker), so
``OMP_NUM_THREADS=2 seqmix train ...`` takes both cores of a machine you have to yourself.
"""
from __future__ import annotations

import os

THREADS_VARIABLE = "OMP_NUM_THREADS"


def default_threads(cores: int | None = None) -> int:
    """Half the cores, at least one: the number of torch threads seqmix uses unless told otherwise."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // 2)


def apply_thread_policy(workers: int = 0) -> int:
    """Set torch's intra-op threads unless OMP_NUM_THREADS is set; return the count in use.

    Args:
        workers: how many processes of the same job share the machine (pytest-xdist's workers);
            each then runs one thread. 0: this process alone, ``default_threads()``.
    """
    import torch

    if os.environ.get(THREADS_VARIABLE, "").strip():
        return torch.get_num_threads()
    threads = 1 if workers else default_threads()
    torch.set_num_threads(threads)
    return threads
