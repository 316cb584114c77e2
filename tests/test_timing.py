"""The one timing helper (seqmix.timing): what it counts, how it summarises, when it warns.

The clock is a fake that each call advances by a duration the test chooses, so the checks are
exact without depending on this machine's speed.
"""
from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest

from seqmix import SeqmixError, timing
from seqmix.timing import Timing, busy_warning, machine_load, summarize, time_calls, time_once


class ScriptedCall:
    """A call that advances a fake clock by the next of ``durations_s`` (seconds) each time."""

    def __init__(self, durations_s):
        self.durations_s = list(durations_s)
        self.now = 0.0
        self.calls = 0

    def clock(self) -> float:
        return self.now

    def __call__(self) -> None:
        self.now += self.durations_s[self.calls]
        self.calls += 1


@pytest.fixture
def scripted(monkeypatch):
    """Install a ScriptedCall's clock as seqmix.timing's perf_counter; returns a factory."""

    def make(durations_s) -> ScriptedCall:
        call = ScriptedCall(durations_s)
        monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=call.clock))
        return call

    return make


@pytest.fixture
def idle(monkeypatch):
    """A machine whose load average is below its cores, so Timing.load is None."""
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    monkeypatch.setattr(os, "cpu_count", lambda: 4)


def test_warmup_calls_are_made_but_not_counted(scripted, idle):
    call = scripted([0.5, 0.4, 0.003, 0.001, 0.002])
    result = time_calls(call, repeats=3, warmup=2)
    assert call.calls == 5
    assert result.runs == 3
    assert result.median_ms == pytest.approx(2.0)
    assert result.low_ms == pytest.approx(1.0) and result.high_ms == pytest.approx(3.0)
    assert result.note is None and result.load is None
    assert result.spread == pytest.approx((3.0 - 1.0) / 2.0)


def test_sync_runs_before_every_clock_read(scripted, idle):
    call = scripted([0.001] * 3)
    events = []

    def sync():
        events.append(("sync", call.calls))

    time_calls(call, repeats=2, warmup=1, sync=sync)
    # Before the start read and after the call, for each of the three calls.
    assert events == [("sync", 0), ("sync", 1), ("sync", 1), ("sync", 2), ("sync", 2), ("sync", 3)]


def test_max_seconds_stops_the_timed_calls_and_says_so(scripted, idle):
    call = scripted([0.001, 0.002, 5.0, 0.001, 0.001, 0.001])
    result = time_calls(call, repeats=5, warmup=1, max_seconds=1.0)
    assert call.calls == 3
    assert result.runs == 2
    assert result.low_ms == pytest.approx(2.0) and result.high_ms == pytest.approx(5000.0)
    assert "5.0 s > 1 s" in result.note and "stopped after 2 timed call(s)" in result.note


def test_max_total_seconds_stops_the_timed_calls_once_they_add_up_to_it(scripted, idle):
    """seqmix tour repeats=10**12 ran until it was killed."""
    call = scripted([9.0] + [0.4] * 10)
    result = time_calls(call, repeats=10**12, warmup=1, max_total_seconds=1.0)
    assert call.calls == 4 and result.runs == 3  # the warm-up call is not counted; 1.2 s > 1 s after three
    assert result.note == "the timed calls took 1.2 s > 1 s in all: stopped after 3"
    with pytest.raises(SeqmixError, match="max_total_seconds=0 is not valid"):
        time_calls(call, max_total_seconds=0)


def test_an_over_long_warmup_call_is_the_figure(scripted, idle):
    call = scripted([5.0, 0.001, 0.001])
    result = time_calls(call, repeats=2, warmup=1, max_seconds=1.0)
    assert call.calls == 1
    assert result.runs == 1 and result.median_ms == result.low_ms == result.high_ms == pytest.approx(5000.0)
    assert "while warming up" in result.note


def test_time_once_returns_the_seconds_of_one_call(scripted):
    call = scripted([0.25])
    assert time_once(call) == pytest.approx(0.25) and call.calls == 1


def test_summarize_builds_the_timing_of_given_calls(idle):
    result = summarize([0.004, 0.001, 0.002, 0.003], note="stopped early")
    assert result.runs == 4 and result.note == "stopped early"
    assert result.low_ms == pytest.approx(1.0) and result.high_ms == pytest.approx(4.0)
    assert result.median_ms == pytest.approx(2.5)  # the mean of the two middle calls
    assert result.low_ms <= result.median_ms <= result.high_ms


def test_summarize_of_no_calls_is_an_error():
    with pytest.raises(SeqmixError, match=r"times_s=\[\]"):
        summarize([])


@pytest.mark.parametrize(
    "arguments, named",
    [({"repeats": 0}, "repeats=0"), ({"warmup": -1}, "warmup=-1"), ({"max_seconds": 0}, "max_seconds=0")],
)
def test_bad_arguments_name_the_value(arguments, named):
    with pytest.raises(SeqmixError, match=named):
        time_calls(lambda: None, **arguments)


def test_real_calls_are_no_faster_than_they_sleep():
    result = time_calls(lambda: time.sleep(0.002), repeats=3, warmup=1)
    assert result.runs == 3
    assert 2.0 <= result.low_ms <= result.median_ms <= result.high_ms


def test_machine_load_is_reported_only_above_the_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 1.0, 1.0))
    assert machine_load() == 9.0
    warning = busy_warning()
    assert "9.0" in warning and "4 cores" in warning
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 1.0, 1.0))
    assert machine_load() is None and busy_warning() is None


def test_an_unknown_load_is_not_a_warning(monkeypatch):
    def unavailable():
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", unavailable)
    assert machine_load() is None and busy_warning() is None


def test_a_busy_timing_says_so_in_text_and_dict(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (7.5, 1.0, 1.0))
    result = summarize([0.002, 0.001, 0.003])
    assert result.load == 7.5
    text = str(result)
    assert "median of 3" in text and "machine busy: load 7.5 on 2 cores" in text
    assert result.as_dict() == {"median_ms": result.median_ms, "low_ms": result.low_ms, "high_ms": result.high_ms,
                                "runs": 3, "load": 7.5, "note": None}
    assert isinstance(result, Timing)
