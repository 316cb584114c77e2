"""The streaming key/value cache: a ring of ``capacity`` slots, whatever number of tokens each call brings."""
from __future__ import annotations

from contextlib import nullcontext

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.contract import any_token_count
from seqmix.operators import kv_cache

from conftest import examples


@given(capacity=st.integers(1, 6), calls=st.lists(st.integers(1, 9), min_size=1, max_size=6), batch=st.integers(1, 3),
       any_count=st.booleans())
@settings(max_examples=examples(80), deadline=None)
def test_every_slot_holds_the_latest_token_of_its_residue_after_any_calls(capacity, calls, batch, any_count):
    """After tokens 0..p−1, slot s holds token p' = the latest p' < p with p' mod capacity = s (−1 when none),
    whether the tokens came one by one or more than ``capacity`` at a time, on the fixed-T path (a
    scatter) and on the path a graph traced for any T takes (a gather)."""
    with any_token_count() if any_count else nullcontext():
        _check_ring(capacity, calls, batch)


def _check_ring(capacity, calls, batch):
    heads, width = 2, 3
    state = kv_cache.empty_kv(batch, heads, capacity, width, width, "cpu", torch.float64)
    seen = 0
    for tokens in calls:
        positions = torch.arange(seen, seen + tokens, dtype=torch.float64)
        keys = positions.view(1, 1, tokens, 1).expand(batch, heads, tokens, width).clone()
        all_keys, all_values, all_pos, state = kv_cache.extend(state, keys, -keys)
        assert all_keys.shape[2] == capacity + tokens and bool((all_pos[:, capacity:] == positions.long()).all())
        seen += tokens
    expected = torch.tensor([max((p for p in range(seen) if p % capacity == slot), default=-1) for slot in range(capacity)])
    assert torch.equal(state.key_pos, expected.expand(batch, capacity))
    written = expected >= 0
    held = state.keys[:, :, written, 0]
    assert torch.equal(held, expected[written].to(torch.float64).expand_as(held))
    assert torch.equal(state.values[:, :, written, 0], -held)
    assert bool((state.pos == seen).all())
