"""Attention keeps PyTorch's memory-efficient kernel with a padding mask and at every head width.

Each case runs in a fresh process (tools/measure_attention_memory.py) and reads its peak memory
above what the process held before the forward. At L = 4096, D = 8, a dense (L, L) mask or
score matrix costs at least 16 MiB (bool) to 256 MiB (float32 scores of 4 heads), against about
12 MiB for the fused kernel's whole forward, so falling off the fused path shows as a ratio far
above the bound. The full table at longer lengths is tools/perf/attention_memory.md.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "measure_attention_memory.py"
LENGTH = 4096
BOUND = 1.5


def _tool():
    spec = importlib.util.spec_from_file_location("measure_attention_memory", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def unmasked_default_heads():
    return _tool().peak_memory("softmax_attention", LENGTH, False, max_len=LENGTH)["peak_mib"]


@pytest.mark.parametrize("causal", [True, False])
def test_masked_attention_stays_within_one_and_a_half_times_the_unmasked_peak(unmasked_default_heads, causal):
    """Against the unmasked causal peak: the fused kernel's memory does not depend on causality."""
    masked = _tool().peak_memory("softmax_attention", LENGTH, True, max_len=LENGTH, causal=causal)["peak_mib"]
    assert masked <= BOUND * unmasked_default_heads, (
        f"masked {masked:.1f} MiB against unmasked {unmasked_default_heads:.1f} MiB at L={LENGTH}"
    )


def test_head_width_2_stays_near_head_width_4(unmasked_default_heads):
    """The default 4 heads at D = 8 (width 2) against 2 heads (width 4), both ways within the bound."""
    two_heads = _tool().peak_memory("softmax_attention", LENGTH, False, max_len=LENGTH, heads=2)["peak_mib"]
    assert unmasked_default_heads <= BOUND * two_heads and two_heads <= BOUND * unmasked_default_heads, (
        f"4 heads: {unmasked_default_heads:.1f} MiB against 2 heads: {two_heads:.1f} MiB at L={LENGTH}"
    )
