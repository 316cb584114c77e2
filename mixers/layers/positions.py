"""Position encodings shared by the attention mixers: rotary embeddings and relative biases."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from seqmix.contract import compute_dtype
from seqmix.errors import SeqmixError, require_int


def rotary(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Half-split rotary embedding: rotate feature pairs (i, i + dim/2) by position·base^(−2i/dim).

    Args:
        x: (..., T, dim) with dim even.
        positions: integer positions broadcastable to x.shape[:-1], e.g. (T,) or (B, 1, T).
    Returns:
        (..., T, dim), same dtype as x.
    """
    half = x.shape[-1] // 2
    dtype = compute_dtype(x.dtype)
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=dtype) / half)
    angles = positions.to(dtype).unsqueeze(-1) * inv_freq  # (..., T, dim/2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    x1, x2 = x.to(dtype).split(half, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class SimpleRelativeBias(nn.Module):
    """Learned bias per relative offset (Mega's "simple"): bias[i, j] = w[M − 1 + j − i].

    Args:
        max_positions: M; offsets j − i must lie in (−M, M).
    """

    def __init__(self, max_positions: int):
        super().__init__()
        require_int("SimpleRelativeBias", "max_positions", max_positions, meaning="M")
        self.max_positions = max_positions
        self.weight = nn.Parameter(torch.empty(2 * max_positions - 1).normal_(0.0, 0.02))

    def forward(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Bias for query positions (..., Tq) and key positions (..., Tk) -> (..., Tq, Tk)."""
        offset = k_pos.unsqueeze(-2) - q_pos.unsqueeze(-1) + (self.max_positions - 1)
        # Offsets outside the table only occur for masked-out keys; clamping keeps indexing legal.
        return self.weight[offset.clamp(0, 2 * self.max_positions - 2)]


class RotaryRelativeBias(nn.Module):
    """Mega's "rotary" bias: bias[i, j] = Rot(a, i) · Rot(b, j), a function of j − i only.

    Args:
        dim: width of the learned vectors a and b (even).
    """

    def __init__(self, dim: int):
        super().__init__()
        require_int("RotaryRelativeBias", "dim", dim, 2, "even: the rotation pairs its entries")
        if dim % 2:
            raise SeqmixError(f"RotaryRelativeBias: dim={dim} is not valid; expected an even integer >= 2 (the rotation pairs its entries)")
        self.a = nn.Parameter(torch.empty(dim).normal_(0.0, 0.02))
        self.b = nn.Parameter(torch.empty(dim).normal_(0.0, 0.02))

    def forward(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Bias for query positions (..., Tq) and key positions (..., Tk) -> (..., Tq, Tk)."""
        a = rotary(self.a.expand(*q_pos.shape, -1), q_pos)
        b = rotary(self.b.expand(*k_pos.shape, -1), k_pos)
        return a @ b.transpose(-1, -2)
