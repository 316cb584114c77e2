"""tools/measure_max_length.py: its tracked peak is the benchmark's profiled peak, and its search finds the boundary."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import examples

TOOL = Path(__file__).resolve().parent.parent / "tools" / "measure_max_length.py"
TINY = ("model.d_model=16", "model.depth=2")


def load_tool():
    spec = importlib.util.spec_from_file_location("measure_max_length", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = load_tool()


# What a kernel allocates and frees inside itself, which only the profiler sees: the CPU flash
# attention's per-thread buffers (32 KiB at these sizes) and a few scalars.
KERNEL_WORKSPACE = 64 * 1024


@pytest.mark.parametrize("preset, recompute", [("mega", "block"), ("transformer", "none")])
def test_the_tracked_peak_of_fake_tensors_is_the_profiled_peak(preset, recompute):
    """Counted without allocating anything, the pass's peak is what the claims benchmark's profiler
    records, less at most the kernels' own workspaces."""
    tracked = tool.tracked_peak_bytes(tool.FakeModel(preset, recompute, TINY), 128)
    profiled = tool.profiled_peak_bytes(tool.preset_model(preset, recompute, TINY), 128)
    assert tracked > 0
    assert 0 <= profiled - tracked <= KERNEL_WORKSPACE, (tracked, profiled)


@settings(max_examples=examples(50), deadline=None)
@given(per_token=st.integers(1, 10**6), fixed=st.integers(0, 10**9), budget=st.integers(1, 10**12),
       refused_from=st.none() | st.integers(1, 2**22))
def test_the_search_finds_the_longest_fitting_multiple_of_the_unit(per_token, fixed, budget, refused_from):
    def needs(length: int) -> int | None:
        return None if refused_from is not None and length >= refused_from else fixed + per_token * length

    length, probes, stopped = tool.longest_length(needs, budget)
    fits = lambda n: needs(n) is not None and needs(n) <= budget  # noqa: E731
    if length is None:
        assert not fits(tool.START_LENGTH)
        return
    assert length % tool.UNIT == 0 and fits(length)
    assert not fits(length + tool.UNIT)
    assert stopped == ("refused" if needs(length + tool.UNIT) is None else "budget")
    assert {probe["length"] for probe in probes} >= {length}
