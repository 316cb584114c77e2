"""Multi-head softmax attention (the Transformer / GPT-2 baseline).

    q, k, v = split(W_qkv x) into H heads of width D/H;  q, k rotated by position (optional)
    A = softmax(q kᵀ / √(D/H) + mask) · v;  y = W_o A

Causal or bidirectional, optionally restricted to a sliding window of the last ``window``
positions. Streaming keeps a key/value cache of ``max_len`` slots (``window`` slots with a
window, used as a ring). Two compute paths: ``math`` (the formula, the reference) and ``sdpa``
(``torch.nn.functional.scaled_dot_product_attention``, the default).

Padding never builds an (L, L) mask without a window, so ``sdpa`` keeps its fused, O(L)-memory
kernel: a bidirectional layer masks padded keys with a (B, 1, 1, L) mask; a causal one attends
over each row reordered so that its unpadded positions come first, in order, and the padded ones
after them. Unpadded outputs are exactly those of the masked formula; a padded query sees every
unpadded key and the padded keys before it (every key when a bidirectional row is all padding),
so its output stays finite. With a window, padded keys are masked densely and a padded query sees
itself. Every output that attends to a key or value holding a NaN or infinity is NaN, and no
other output changes (``masking``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqmix.contract import Mixer, Stages, assert_in_compiled_graph, compute_dtype, linear_stages, parameter_reads, traceable_contiguous, traceable_reshape
from seqmix.errors import INT_LIMIT, SeqmixError, require_bool, require_int
from seqmix.layers.positions import rotary
from seqmix.operators import kv_cache, masking
from seqmix.registry import register_mixer


def visible_keys(q_pos: Tensor, k_pos: Tensor, causal: bool, window: int | None) -> Tensor:
    """Which keys each query may attend to, from positions alone.

    Args:
        q_pos: (..., Tq) query positions; k_pos: (..., Tk) key positions, −1 for an empty slot.
    Returns:
        (..., Tq, Tk) bool.
    """
    offset = q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)  # how far back the key lies
    visible = k_pos.unsqueeze(-2) >= 0
    if causal:
        visible = visible & (offset >= 0)
    if window is not None:
        visible = visible & (offset.abs() < window)
    return visible


@register_mixer("softmax_attention")
class SoftmaxAttention(Mixer):
    """Multi-head softmax attention with an optional key/value-cache stream.

    Args:
        d_model: D.
        heads: H; must divide D.
        causal: mask future positions; False gives a bidirectional encoder layer (no streaming).
        use_rotary: rotate q and k by absolute position (half-split rotary embedding).
        window: attend only to the last ``window`` positions (None: all).
        max_len: cache capacity for streaming without a window.
        impl: ``math`` (reference) or ``sdpa`` (default).
    """

    impls = ("math", "sdpa")
    default_impl = "sdpa"
    # Exporters decompose sdpa into the formula plus a guard for rows with no visible key (a
    # comparison, a reduction and a selection over every score), which causal rows never need.
    lowered_impls = {"export": {"sdpa": "math"}}

    def __init__(
        self,
        d_model: int,
        heads: int = 4,
        causal: bool = True,
        use_rotary: bool = True,
        window: int | None = None,
        max_len: int = 2048,
        impl: str | None = None,
    ):
        super().__init__(d_model, causal=causal, impl=impl)
        require_bool("softmax_attention", "use_rotary", use_rotary)
        if not isinstance(heads, int) or isinstance(heads, bool) or not 1 <= heads <= INT_LIMIT or d_model % heads:
            raise SeqmixError(f"softmax_attention: heads={heads!r} must be a positive integer that divides d_model={d_model}")
        head_dim = d_model // heads
        if use_rotary and head_dim % 2:
            raise SeqmixError(f"softmax_attention: use_rotary=True needs an even head width, got d_model/heads={head_dim}")
        if window is not None:
            require_int("softmax_attention", "window", window, meaning="positions attended, or None for all")
        require_int("softmax_attention", "max_len", max_len, meaning="streaming cache capacity")
        self.heads = heads
        self.head_dim = head_dim
        self.use_rotary = use_rotary
        self.window = window
        self.max_len = max_len
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    @property
    def receptive_field(self) -> int | None:
        return self.window

    def complexity(self) -> str:
        return "O(L²·D)" if self.window is None else "O(L·W·D), W = window"

    @property
    def capacity(self) -> int:
        """Cache slots: the window when there is one, else ``max_len``."""
        return self.window if self.window is not None else self.max_len

    def attention_scores(self, batch_size: int, length: int, fused: bool) -> int:
        """(B, H, L, L) scores, none under a fused kernel: ``sdpa`` without a window (a window's mask
        sends PyTorch back to the math kernel)."""
        if fused and self.impl == "sdpa" and self.window is None:
            return 0
        return batch_size * self.heads * length * length

    def cache_capacity(self) -> int | None:
        return self.max_len if self.window is None else None

    def stages(self, batch_size: int, length: int, pass_: str) -> Stages:
        """The qkv projection, attention and the output projection (``linear_stages``).

        Attention reads q, k, v (B, L, 3D) and writes its output (B, L, D), with q·k and weights·v
        over the pairs the path computes: on ``sdpa`` without a window, the L(L+1)/2 visible ones
        when causal (the fused kernel skips the blocks above the diagonal); otherwise all L² (a
        window's mask is applied to the full product). ``math`` also writes the (B, H, L, L) scores
        and the softmax weights and reads each once; the fused kernel never materialises them.
        """
        rows = batch_size * length
        fused = self.impl == "sdpa"
        pairs = length * (length + 1) // 2 if fused and self.causal and self.window is None else length * length
        attention = Stages(4 * batch_size * pairs * self.d_model, 3 * rows * self.d_model, rows * self.d_model)
        if not fused:
            scores = batch_size * self.heads * length * length
            attention += Stages(0, 2 * scores, 2 * scores)
        return linear_stages((self.qkv, self.out), rows) + attention + parameter_reads(self)

    def _project(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, H, T, D/H) for x (B, T, D) at ``positions`` broadcastable to (B, 1, T)."""
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.use_rotary:
            q, k = rotary(q, positions), rotary(k, positions)
        return q, k, v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None, is_causal: bool) -> Tensor:
        """softmax(q kᵀ/√(D/H) masked) v for (B, H, T, ·) tensors; ``visible`` broadcasts to the scores.

        A key or value holding a NaN or infinity is zeroed before the product (0 · NaN would reach
        queries that cannot see it) and the queries that do see it get NaN (``masking``).
        """
        clean = masking.all_finite(k, v)
        if not clean:
            k, bad_keys = masking.split_nonfinite(k)
            v, bad_values = masking.split_nonfinite(v)
        # The fused kernels need unit stride along the head width (rotary's cat leaves a wider one
        # at small widths); without it PyTorch falls back to the math kernel and its (L, L) scores.
        # The formula's products traced for any T would otherwise ask whether T is 1 to lay them out.
        q, k, v = traceable_contiguous(q), traceable_contiguous(k), traceable_contiguous(v)
        if self.impl == "sdpa":
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, is_causal=is_causal)
        else:
            scores = (q @ k.transpose(-1, -2)).to(compute_dtype(q.dtype)) / self.head_dim**0.5
            if is_causal:
                # An (L, L) bias added, not a (B, H, L, L) selection: an exported graph's runtime
                # delegates the sum and would run the selection with a generic kernel.
                scores = scores + torch.full(scores.shape[-2:], float("-inf"), dtype=scores.dtype, device=q.device).triu(1)
            elif visible is not None:
                scores = scores.masked_fill(~visible, float("-inf"))
            attended = torch.softmax(scores, dim=-1).to(v.dtype) @ v
        if clean:
            return attended
        bad = bad_keys | bad_values  # (B, H, Tk)
        if is_causal:
            reached = masking.seen_causally(bad)
        elif visible is None:
            reached = bad.any(-1, keepdim=True)
        else:
            reached = masking.seen_by(visible, bad)
        return masking.poison(attended, reached)

    def _merge(self, attended: Tensor) -> Tensor:
        """(B, H, T, D/H) -> output projection of (B, T, D)."""
        batch, _, tokens, _ = attended.shape
        return self.out(traceable_reshape(attended.transpose(1, 2), batch, tokens, self.d_model))

    def mix(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        length = x.shape[1]
        if padding_mask is not None:
            # Attention weighs padded values by 0, and 0 · NaN is NaN: padding must hold finite values.
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        positions = torch.arange(length, device=x.device)
        if self.window is not None:
            q, k, v = self._project(x, positions)
            visible = visible_keys(positions, positions, self.causal, self.window)  # (L, L)
            if padding_mask is not None:
                visible = visible & ~padding_mask[:, None, None, :]
                # A query may always see itself, so a padded query with nothing else visible stays finite.
                visible = visible | torch.eye(length, dtype=torch.bool, device=x.device)
            return self._merge(self._attend(q, k, v, visible, is_causal=False))
        if padding_mask is not None and self.causal:
            return self._mix_unpadded_first(x, padding_mask)
        q, k, v = self._project(x, positions)
        if padding_mask is None:
            return self._merge(self._attend(q, k, v, None, is_causal=self.causal))
        # Every key of an all-padding row stays visible, so its outputs stay finite.
        keys = ~padding_mask | padding_mask.all(1, keepdim=True)
        return self._merge(self._attend(q, k, v, keys[:, None, None, :], is_causal=False))

    def _mix_unpadded_first(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        """Causal attention over (B, L, D) with padding and no window, without an (L, L) mask.

        Each row is reordered so that its unpadded positions come first, in order, and the padded
        ones after them; q and k are rotated by their true positions, so causal attention over the
        new order lets every unpadded query see exactly the unpadded keys at or before it. The
        outputs move back to their positions.
        """
        kept = ~padding_mask
        # destination[b, i]: where position i goes; source[b, j]: which position lands at j.
        destination = torch.where(kept, kept.cumsum(1) - 1, kept.sum(1, keepdim=True) + padding_mask.cumsum(1) - 1)
        positions = torch.arange(x.shape[1], device=x.device).expand_as(destination)
        source = torch.zeros_like(destination).scatter(1, destination, positions)
        moved = x.gather(1, source.unsqueeze(-1).expand_as(x))
        q, k, v = self._project(moved, source.unsqueeze(1))
        y = self._merge(self._attend(q, k, v, None, is_causal=True))
        return y.gather(1, destination.unsqueeze(-1).expand_as(y))

    def mix_step(self, x: Tensor, state: kv_cache.KVState) -> tuple[Tensor, kv_cache.KVState]:
        tokens = x.shape[1]
        if self.window is None:
            # Past max_len the cache ring would wrap and attend like a window: wrong logits, no error.
            assert_in_compiled_graph(lambda: state.pos.max() + tokens <= self.max_len,
                                     f"softmax_attention: the stream would reach more tokens than the cache holds "
                                     f"(max_len={self.max_len}); build the mixer with a larger max_len or a window")
            if not torch.compiler.is_compiling():
                seen = int(state.pos.max())
                if seen + tokens > self.max_len:
                    raise SeqmixError(
                        f"softmax_attention: the stream would reach {seen + tokens} tokens but the cache holds "
                        f"max_len={self.max_len}; build the mixer with a larger max_len or a window"
                    )
        q_pos = kv_cache.query_positions(state, tokens)  # (B, T)
        q, k, v = self._project(x, q_pos.unsqueeze(1))
        keys, values, k_pos, new_state = kv_cache.extend(state, k, v)
        visible = visible_keys(q_pos, k_pos, causal=True, window=self.window).unsqueeze(1)  # (B, 1, T, cap+T)
        return self._merge(self._attend(q, keys, values, visible, is_causal=False)), new_state

    def empty_state(self, batch_size: int, device, dtype) -> kv_cache.KVState:
        device, dtype = self.param_dtype_device(device, dtype)
        return kv_cache.empty_kv(batch_size, self.heads, self.capacity, self.head_dim, self.head_dim, device, dtype)
