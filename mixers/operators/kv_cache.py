"""A fixed-capacity key/value cache for streaming attention.

Keys and values live in ``capacity`` slots; the token at absolute position p goes to slot
p mod capacity, and every slot remembers the position it holds (−1 when empty). Shapes never
change while streaming, which is what lets a step graph with state in and state out export.
Whoever attends decides which remembered positions are visible (a causal window, the current
chunk, ...), from the positions alone.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from seqmix.contract import token_count_is_dynamic


class KVState(NamedTuple):
    """Cache contents.

    Attributes:
        keys: (B, H, capacity, dk).
        values: (B, H, capacity, dv).
        key_pos: (B, capacity) long, the absolute position in each slot, −1 when empty.
        pos: (B,) long, tokens seen so far.
    """

    keys: Tensor
    values: Tensor
    key_pos: Tensor
    pos: Tensor


def empty_kv(batch: int, heads: int, capacity: int, key_dim: int, value_dim: int, device, dtype) -> KVState:
    """An empty cache of ``capacity`` slots."""
    return KVState(
        keys=torch.zeros(batch, heads, capacity, key_dim, device=device, dtype=dtype),
        values=torch.zeros(batch, heads, capacity, value_dim, device=device, dtype=dtype),
        key_pos=torch.full((batch, capacity), -1, device=device, dtype=torch.long),
        pos=torch.zeros(batch, device=device, dtype=torch.long),
    )


def query_positions(state: KVState, tokens: int) -> Tensor:
    """Absolute positions of the next ``tokens`` queries -> (B, T) long."""
    return state.pos.unsqueeze(1) + torch.arange(tokens, device=state.pos.device)


def extend(state: KVState, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor, KVState]:
    """Append T new keys and values.

    Args:
        state: the cache before these tokens.
        keys: (B, H, T, dk) new keys; values: (B, H, T, dv).
    Returns:
        all keys (B, H, capacity + T, dk) and values (B, H, capacity + T, dv) the new queries
        may see, their positions (B, capacity + T), and the cache after these tokens.
    """
    tokens = keys.shape[2]
    capacity = state.keys.shape[2]
    q_pos = query_positions(state, tokens)
    all_keys = torch.cat([state.keys.to(keys.dtype), keys], dim=2)
    all_values = torch.cat([state.values.to(values.dtype), values], dim=2)
    all_pos = torch.cat([state.key_pos, q_pos], dim=1)

    if token_count_is_dynamic():
        return all_keys, all_values, all_pos, _gathered(state, keys, values, tokens, capacity)
    # Only the last `capacity` new tokens can survive in the ring; older ones would be overwritten.
    kept = min(tokens, capacity)
    slots = q_pos[:, tokens - kept :] % capacity  # (B, kept)
    heads = keys.shape[1]
    key_index = slots[:, None, :, None].expand(-1, heads, -1, keys.shape[-1])
    value_index = slots[:, None, :, None].expand(-1, heads, -1, values.shape[-1])
    new_state = KVState(
        keys=state.keys.scatter(2, key_index, keys[:, :, tokens - kept :].to(state.keys.dtype)),
        values=state.values.scatter(2, value_index, values[:, :, tokens - kept :].to(state.values.dtype)),
        key_pos=state.key_pos.scatter(1, slots, q_pos[:, tokens - kept :]),
        pos=state.pos + tokens,
    )
    return all_keys, all_values, all_pos, new_state


def _gathered(state: KVState, keys: Tensor, values: Tensor, tokens, capacity: int) -> KVState:
    """The cache after ``tokens`` new keys and values, for a graph traced for any token count.

    Each slot s ends up holding the latest position p <= last with p mod capacity = s: one of the
    new tokens when p >= pos, else what it held. Gathered per slot, so no count of kept tokens
    (min(T, capacity)) is needed, which would fix T in the graph. (ExecuTorch's kernels, which
    run fixed T, take the scatter of ``extend`` instead.)
    """
    last = (state.pos + tokens - 1).unsqueeze(1)  # (B, 1)
    slot = torch.arange(capacity, device=keys.device)
    # last - slot > -capacity, so the dividend stays non-negative: ExecuTorch's remainder kernel
    # rounds toward zero like C, and differs from torch's on negative dividends.
    latest = last - (last - slot + capacity) % capacity  # (B, capacity)
    written = latest >= state.pos.unsqueeze(1)  # (B, capacity)
    index = (latest - state.pos.unsqueeze(1)).clamp(min=0)  # (B, capacity), a new token's index where written
    heads = keys.shape[1]

    def take(new: Tensor, old: Tensor) -> Tensor:
        picked = new.gather(2, index[:, None, :, None].expand(-1, heads, -1, new.shape[-1]))
        return torch.where(written[:, None, :, None], picked.to(old.dtype), old)

    return KVState(
        keys=take(keys, state.keys),
        values=take(values, state.values),
        key_pos=torch.where(written, latest, state.key_pos),
        pos=state.pos + tokens,
    )
