"""One way to time anything in seqmix: warm-up calls, then timed calls summarised by their median and spread.

Every latency seqmix prints or records (the benchmark engine's grid, operator sweep and claims,
exports, the lowering report, the search's deployed latency, the tour) comes from ``time_calls``, or, where two
things are timed in alternation so that drift hits both alike, from ``time_once`` per call and
``summarize`` per side. So a figure always carries how many calls it summarises and how far they
spread, and says when the machine was busier than its cores while it was taken. A single call is
never reported as a latency: on a shared machine one call can take twenty times the median.
"""
from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from seqmix.errors import SeqmixError, require_int


@dataclass(frozen=True)
class Timing:
    """Timed calls of one thing.

    Attributes:
        median_ms: the median call, in milliseconds.
        low_ms, high_ms: the fastest and the slowest timed call.
        runs: how many calls were timed.
        load: the machine's one-minute load average after the calls, when it exceeded its
            number of cores (other work competed for them); None otherwise.
        note: why fewer calls than asked were timed, if so.
    """

    median_ms: float
    low_ms: float
    high_ms: float
    runs: int
    load: float | None = None
    note: str | None = None

    @property
    def spread(self) -> float:
        """(slowest − fastest) / median: 0 for identical calls."""
        return (self.high_ms - self.low_ms) / self.median_ms if self.median_ms > 0 else 0.0

    def __str__(self) -> str:
        text = f"{_ms(self.median_ms)} ms (median of {self.runs}, {_ms(self.low_ms)}–{_ms(self.high_ms)})"
        return text + (f" [machine busy: load {self.load:.1f} on {os.cpu_count()} cores]" if self.load else "")

    def as_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def machine_load() -> float | None:
    """The one-minute load average when it exceeds the number of cores, else None (also where unknown)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    return load if load > (os.cpu_count() or 1) else None


@functools.cache
def physical_memory_bytes() -> int:
    """This machine's physical memory, read once: what a batch or a benchmark cell is checked against
    before it is allocated."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_bytes(device) -> int | None:
    """The memory of ``device`` (a torch.device or its name): the machine's physical memory for the
    CPU, a CUDA device's own (the current one for ``cuda``); None for any other (``meta``)."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return physical_memory_bytes()
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index if device.index is not None else torch.cuda.current_device()).total_memory
    return None


def time_once(call: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    """Seconds one call of ``call`` takes; ``sync`` (e.g. ``torch.cuda.synchronize``) runs before
    each clock read, so the clock reads the queued device work and not just its launch."""
    wait = sync or (lambda: None)
    wait()
    started = time.perf_counter()
    call()
    wait()
    return time.perf_counter() - started


def summarize(times_s: Sequence[float], note: str | None = None) -> Timing:
    """The Timing of timed calls that took ``times_s`` seconds each (at least one).

    ``note`` says why fewer calls than asked were timed, if so; the machine's load is read now.
    """
    if not times_s:
        raise SeqmixError("summarize: times_s=[] is not valid; expected the seconds of at least one timed call")
    return Timing(
        median_ms=1e3 * statistics.median(times_s),
        low_ms=1e3 * min(times_s),
        high_ms=1e3 * max(times_s),
        runs=len(times_s),
        load=machine_load(),
        note=note,
    )


def time_calls(
    call: Callable[[], object],
    repeats: int = 7,
    warmup: int = 2,
    sync: Callable[[], None] | None = None,
    max_seconds: float | None = None,
    max_total_seconds: float | None = None,
) -> Timing:
    """Call ``call`` ``warmup`` times untimed, then ``repeats`` times timed.

    Args:
        call: what to time; its result is discarded.
        repeats: timed calls (at least 1).
        warmup: untimed calls first (compilation, caches, lazy initialisation).
        sync: waits for queued device work (``torch.cuda.synchronize``) before each clock read.
        max_seconds: once one call takes longer, stop there: the summary covers the timed calls
            done so far, or that one over-long call when it was still warming up.
        max_total_seconds: once the timed calls add up to more, stop there (repeats=10**12 ran on
            until killed).
    """
    require_int("time_calls", "repeats", repeats)
    require_int("time_calls", "warmup", warmup, 0)
    for name, limit in (("max_seconds", max_seconds), ("max_total_seconds", max_total_seconds)):
        if limit is not None and not limit > 0:
            raise SeqmixError(f"time_calls: {name}={limit!r} is not valid; expected a positive number of seconds or None")
    times: list[float] = []
    note = None
    for index in range(warmup + repeats):
        seconds = time_once(call, sync)
        if index >= warmup:
            times.append(seconds)
            if max_total_seconds is not None and sum(times) > max_total_seconds and len(times) < repeats:
                note = f"the timed calls took {sum(times):.1f} s > {max_total_seconds:g} s in all: stopped after {len(times)}"
                break
        if max_seconds is not None and seconds > max_seconds:
            done = f"after {len(times)} timed call(s)" if times else "while warming up; that call is the figure"
            note = f"a call took {seconds:.1f} s > {max_seconds:g} s: stopped {done}"
            times = times or [seconds]
            break
    return summarize(times, note)


def busy_warning() -> str | None:
    """A line to print when the machine is busier than its cores, else None."""
    load = machine_load()
    if load is None:
        return None
    return (f"warning: load average {load:.1f} exceeds this machine's {os.cpu_count()} cores; "
            "other work is competing, so the timings spread wider than usual")
