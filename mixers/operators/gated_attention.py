"""Gated chunked attention: the Mega layer (arXiv 2209.10655, §3.2–3.3) and Megalodon's normalized form.

Mega layer, for x (B, L, D) and a local mixer ℓ (EMA by default):

    xn = norm(x) if prenorm else x
    v  = SiLU(v_proj(xn))                               (B, L, E)
    m  = ℓ(xn)                                          the EMA includes SiLU(y + omega ⊙ x)
    u, zr, hx = split(mx_proj(m), [D, S + E, D])
    u  = σ(u);  z, r = split(SiLU(zr), [S, E])
    q  = z ⊙ gamma[0] + beta[0];  k = z ⊙ gamma[1] + beta[1]
    A  = attn(q, k) v within chunks of C (or over the whole sequence)
    h  = SiLU(hx + h_proj(A ⊙ r))
    out = x + u ⊙ (h − x)                               post-norm instead returns norm(out)

attn: softmax(q kᵀ/√(S/H) + bias), or laplace / relu² of (q kᵀ / #visible keys + bias); the
bias is ``simple`` (one learned weight per offset) or ``rotary`` (Rot(a)·Rot(b)).

Megalodon's normalized form (``normalized=True``, CEMA by default):

    xt = timestep_norm(x);  m = RMSNorm(ℓ(xt))
    ẑ  = per-head unit-RMS(W_z m);  q = ẑ ⊙ (gamma[0] + 1)/√(S/H) + beta[0], likewise k
    q, k rotated by their position inside the chunk;  A = softmax(q kᵀ) v   (no extra scale)
    v = SiLU(W_v xt);  r = SiLU(W_r m);  out = x + W_h1 m + W_h2(A ⊙ r)  (no update gate)

Causal attention masks future keys inside each chunk and the local mixer carries context
across chunks. Streaming keeps only the current chunk's keys and values (a cache of C slots).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqmix.contract import Mixer, Stages, State, assert_in_compiled_graph, compute_dtype, linear_stages, parameter_reads, traceable_reshape
from seqmix.errors import INT_LIMIT, SeqmixError, require_bool, require_choice, require_int
from seqmix.layers.norms import NORMS, RMSNorm, TimestepNorm, build_norm
from seqmix.layers.positions import RotaryRelativeBias, SimpleRelativeBias, rotary
from seqmix.operators import kv_cache, masking
from seqmix.registry import build_mixer, list_mixers, mixer_class, register_mixer

ATTENTIONS = ("softmax", "laplace", "relu2")
POSITION_BIASES = ("simple", "rotary")


class GatedAttentionState(NamedTuple):
    """Streaming state: the local mixer's, the timestep norm's (empty unless normalized), the chunk's keys/values."""

    local: State
    norm: State
    kv: kv_cache.KVState


def laplace(x: Tensor) -> Tensor:
    """Mega's laplace attention function ½[1 + erf((x − μ)/(σ√2))], μ = √½, σ = √(1/4π)."""
    mu, sigma = 0.5**0.5, (1.0 / (4.0 * torch.pi)) ** 0.5
    return 0.5 * (1.0 + torch.erf((x - mu) / (sigma * 2.0**0.5)))


def _resolve_local(local, local_options: dict | None, d_model: int, causal: bool) -> Mixer:
    """Build the local mixer from a registered name, a factory taking d_model, or a module."""
    if local_options is not None and not isinstance(local_options, Mapping):
        raise SeqmixError(f"gated_attention: local_options={local_options!r} is not valid; expected {{option: value}} "
                          "for the local mixer, or None")
    if isinstance(local, Mixer):
        mixer = local
    elif isinstance(local, str):
        if local_options and "causal" in local_options:
            raise SeqmixError("gated_attention: local_options may not set 'causal'; the local mixer follows the layer's causal flag")
        require_choice("gated_attention.local", local, list_mixers())
        mixer = build_mixer(local, d_model, causal=causal, **(local_options or {}))
    elif callable(local):
        mixer = local(d_model)
    else:
        raise SeqmixError(f"gated_attention: local={local!r} must be a mixer name, a Mixer, or a factory taking d_model")
    if not isinstance(mixer, Mixer) or mixer.d_model != d_model:
        raise SeqmixError(f"gated_attention: the local mixer must be a Mixer of width d_model={d_model}, got {mixer!r}")
    if mixer.causal != causal:
        raise SeqmixError(
            f"gated_attention: the local mixer has causal={mixer.causal} but the layer has causal={causal}; they must agree"
        )
    return mixer


@register_mixer("gated_attention")
class GatedAttention(Mixer):
    """The Mega layer (or, with ``normalized=True``, Megalodon's) with a pluggable local mixer.

    Args:
        d_model: D.
        local: the local mixer: a registered name (``ema``, ``cema``, ``tcn``, ``identity``), a
            factory taking d_model, or a Mixer. Default ``cema`` when normalized, else ``ema``.
        local_options: options for a local mixer given by name.
        z_dim: S, the shared query/key width (default D/2).
        v_dim: E, the value width (default 2D).
        heads: H; must divide S and E.
        chunk_size: C; None attends over the whole sequence (up to ``max_len`` when streaming).
        attention: ``softmax``, ``laplace`` or ``relu2``.
        position_bias: ``simple`` or ``rotary`` (the normalized form always rotates q and k).
        causal: mask future keys; False for encoders (no streaming).
        norm: ``layernorm``, ``rmsnorm``, ``scalenorm`` or None (Mega form only).
        prenorm: normalise the input (True) or the output (False).
        normalized: Megalodon's form (timestep norm, RMSNorm, normalized q/k, no update gate).
        norm_groups: groups of the timestep norm.
        max_len: longest sequence for full attention and its streaming cache.
    """

    includes_residual = True

    def __init__(
        self,
        d_model: int,
        local: str | Mixer | Callable[[int], Mixer] | None = None,
        local_options: dict | None = None,
        z_dim: int | None = None,
        v_dim: int | None = None,
        heads: int = 1,
        chunk_size: int | None = 128,
        attention: str = "softmax",
        position_bias: str = "simple",
        causal: bool = True,
        norm: str | None = "layernorm",
        prenorm: bool = True,
        normalized: bool = False,
        norm_groups: int = 1,
        max_len: int = 2048,
        impl: str | None = None,
    ):
        super().__init__(d_model, causal=causal, impl=impl)
        require_bool("gated_attention", "prenorm", prenorm)
        require_bool("gated_attention", "normalized", normalized)
        z_dim = d_model // 2 if z_dim is None else z_dim
        v_dim = 2 * d_model if v_dim is None else v_dim
        require_choice("gated_attention.attention", attention, ATTENTIONS)
        require_choice("gated_attention.position_bias", position_bias, POSITION_BIASES)
        if chunk_size is not None:
            require_int("gated_attention", "chunk_size", chunk_size, meaning="C, or None for full attention")
        require_int("gated_attention", "max_len", max_len, meaning="longest full-attention sequence")
        require_int("gated_attention", "heads", heads, meaning="H, dividing z_dim and v_dim")
        for field, value in (("z_dim", z_dim), ("v_dim", v_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= INT_LIMIT or value % heads:
                raise SeqmixError(f"gated_attention: {field}={value!r} must be a positive multiple of heads={heads}")
        if norm is not None:
            require_choice("gated_attention.norm", norm, NORMS)
        require_int("gated_attention", "norm_groups", norm_groups, meaning="groups of the timestep norm")
        # Each form ignores the other's norm option: one given to the wrong form would go nowhere without a word.
        if not normalized and norm_groups != 1:
            raise SeqmixError(f"gated_attention: norm_groups={norm_groups!r} sets the timestep norm of normalized=True only")
        if normalized and norm not in (None, "layernorm"):
            raise SeqmixError(f"gated_attention: norm={norm!r} applies to the Mega form only; normalized=True uses its "
                              "timestep norm and RMSNorm")
        if normalized and attention != "softmax":
            raise SeqmixError(f"gated_attention: normalized=True uses softmax attention, got attention={attention!r}")
        rotates = normalized or position_bias == "rotary"
        if rotates and (z_dim // heads) % 2:
            raise SeqmixError(f"gated_attention: rotary positions need an even head width, got z_dim/heads={z_dim // heads}")
        self.z_dim, self.v_dim, self.heads = z_dim, v_dim, heads
        self.chunk_size = chunk_size
        self.attention = attention
        self.position_bias = position_bias
        self.prenorm = prenorm
        self.normalized = normalized
        self.max_len = max_len
        if local is None:
            local = "cema" if normalized else "ema"
        self.local = _resolve_local(local, local_options, d_model, causal)
        self.gamma = nn.Parameter(torch.empty(2, z_dim))
        self.beta = nn.Parameter(torch.zeros(2, z_dim))
        if normalized:
            self.timestep_norm = TimestepNorm(d_model, groups=norm_groups)
            self.local_norm = RMSNorm(d_model)
            self.v_proj = nn.Linear(d_model, v_dim)
            self.z_proj = nn.Linear(d_model, z_dim)
            self.r_proj = nn.Linear(d_model, v_dim)
            self.h1_proj = nn.Linear(d_model, d_model)
            self.h2_proj = nn.Linear(v_dim, d_model, bias=False)
            nn.init.zeros_(self.gamma)
        else:
            self.norm = None if norm is None else build_norm(norm, d_model)
            self.v_proj = nn.Linear(d_model, v_dim)
            self.mx_proj = nn.Linear(d_model, d_model + z_dim + v_dim + d_model)
            self.h_proj = nn.Linear(v_dim, d_model)
            nn.init.normal_(self.gamma, mean=0.0, std=0.02)
            span = chunk_size if chunk_size is not None else max_len
            self.bias = SimpleRelativeBias(span) if position_bias == "simple" else RotaryRelativeBias(z_dim // heads)

    @property
    def receptive_field(self) -> int | None:
        """Unbounded when the local mixer is (an EMA); else the local field plus a chunk of attention."""
        local = self.local.receptive_field
        if local is None or self.chunk_size is None:
            return None
        return local + self.chunk_size - 1

    def complexity(self) -> str:
        span = "L²" if self.chunk_size is None else "L·C"
        return f"O({span}·(S+E)) attention + local {self.local.complexity()}"

    def length_unit(self) -> int:
        return self.chunk_size or 1

    def attention_scores(self, batch_size: int, length: int, fused: bool) -> int:
        """(B, H, L/C, C, C) scores, C = L for full attention; never fused (the bias is added to them)."""
        span = self.chunk_size or length
        return batch_size * self.heads * math.ceil(length / span) * span * span

    def cache_capacity(self) -> int | None:
        return self.max_len if self.chunk_size is None else None

    def stages(self, batch_size: int, length: int, pass_: str) -> Stages | None:
        """The local mixer's stages, every projection (``linear_stages``), chunked attention and the residual.

        The local mixer reads x (its norm fused into the read) and writes m. Every projection's
        output is read once by a later stage, except the output projection's, which the residual
        (reading x once more) turns into y. Attention runs over L padded to whole chunks of C (C = L
        for full attention), computing all C² pairs of a chunk as the path does (causal ones masked):
        q·k over S and weights·v over E, writing the (B, H, L/C, C, C) scores and the weights and
        reading each once, and writing its output (B, L, E). The rotary bias is a (C, C) product of its own.
        """
        local = self.local.stages(batch_size, length, pass_)
        if local is None:
            return None
        rows = batch_size * length
        span = self.chunk_size if self.chunk_size is not None else length
        padded = batch_size * -(-length // span) * span
        projections = [module for name, module in self.named_modules() if isinstance(module, nn.Linear) and not name.startswith("local.")]
        consumed = sum(rows * layer.out_features for layer in projections) - rows * self.d_model
        scores = self.heads * padded * span
        attention = Stages(2 * padded * span * (self.z_dim + self.v_dim), 2 * scores, 2 * scores + padded * self.v_dim)
        if not self.normalized and self.position_bias == "rotary":
            attention += Stages(2 * span * span * (self.z_dim // self.heads), 0, span * span)
        return (local + linear_stages(projections, rows) + Stages(reads=consumed + rows * self.d_model) + attention
                + parameter_reads(self, self.local))

    @staticmethod
    def local_class(options: dict) -> type[Mixer]:
        """The class of the local mixer a config names (its default: cema when normalized, else ema)."""
        local = options.get("local") or ("cema" if options.get("normalized") else "ema")
        return mixer_class(local)

    @classmethod
    def search_knobs(cls, options: dict) -> dict[str, int]:
        local = cls.local_class(options)
        return {"chunk_size": 1, **local.search_knobs(dict(options.get("local_options") or {}))}

    @classmethod
    def apply_search_knobs(cls, options: dict, knobs: dict[str, int]) -> None:
        if "chunk_size" in knobs:
            options["chunk_size"] = knobs["chunk_size"]
        local_options = dict(options.get("local_options") or {})
        cls.local_class(options).apply_search_knobs(local_options, knobs)
        options["local_options"] = local_options or None

    # --- projections shared by forward and step ------------------------------------------

    def _split_heads(self, t: Tensor) -> Tensor:
        """(B, T, H·w) -> (B, H, T, w)."""
        batch, tokens, width = t.shape
        return t.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)

    def _queries_keys(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """q, k (B, H, T, S/H) from z (B, T, S)."""
        if self.normalized:
            z = self._split_heads(z)
            z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-5)
            gamma = (self.gamma + 1.0).view(2, self.heads, 1, -1) / (self.z_dim // self.heads) ** 0.5
            beta = self.beta.view(2, self.heads, 1, -1)
            return z * gamma[0] + beta[0], z * gamma[1] + beta[1]
        q = z * self.gamma[0] + self.beta[0]
        k = z * self.gamma[1] + self.beta[1]
        return self._split_heads(q), self._split_heads(k)

    def _branches(self, x: Tensor, m: Tensor, xn: Tensor):
        """From the input x, local output m and normalised input xn: q, k, v (B, H, T, ·), and
        a function that finishes the layer given the attention output (B, T, E)."""
        if self.normalized:
            m = self.local_norm(m)
            q, k = self._queries_keys(self.z_proj(m))
            v = self._split_heads(F.silu(self.v_proj(xn)))
            r = F.silu(self.r_proj(m))

            def finish(attended: Tensor) -> Tensor:
                return x + self.h1_proj(m) + self.h2_proj(attended * r)

            return q, k, v, finish
        d, s, e = self.d_model, self.z_dim, self.v_dim
        u, zr, hx = self.mx_proj(m).split([d, s + e, d], dim=-1)
        z, r = F.silu(zr).split([s, e], dim=-1)
        q, k = self._queries_keys(z)
        v = self._split_heads(F.silu(self.v_proj(xn)))

        def finish(attended: Tensor) -> Tensor:
            h = F.silu(hx + self.h_proj(attended * r))
            out = x + torch.sigmoid(u) * (h - x)
            return out if self.prenorm or self.norm is None else self.norm(out)

        return q, k, v, finish

    def _input_norm(self, x: Tensor) -> Tensor:
        if self.prenorm and self.norm is not None:
            return self.norm(x)
        return x

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, visible: Tensor) -> Tensor:
        """Attention of q (..., Tq, S/H) over k, v (..., Tk, ·); positions (..., Tq) and (..., Tk)
        are inside the chunk; ``visible`` (..., Tq, Tk) bool. Scores are computed in float32.

        Masked-out keys are selected away, never multiplied by 0: a key or value holding a NaN or
        infinity is zeroed before the products and exactly the queries that see it get NaN (``masking``).
        """
        dtype = compute_dtype(q.dtype)
        clean = masking.all_finite(k, v)
        if not clean:
            k, bad_keys = masking.split_nonfinite(k)
            v, bad_values = masking.split_nonfinite(v)
        if self.normalized:
            q, k = rotary(q, q_pos), rotary(k, k_pos)
        scores = (q @ k.transpose(-1, -2)).to(dtype)
        if self.normalized:
            weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        elif self.attention == "softmax":
            scores = scores / (self.z_dim // self.heads) ** 0.5 + self.bias(q_pos, k_pos).to(dtype)
            weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        else:
            count = visible.sum(-1, keepdim=True).clamp(min=1).to(dtype)
            scores = scores / count + self.bias(q_pos, k_pos).to(dtype)
            weights = laplace(scores) if self.attention == "laplace" else F.relu(scores).square()
            weights = weights.masked_fill(~visible, 0.0)
        attended = weights.to(v.dtype) @ v
        return attended if clean else masking.poison(attended, masking.seen_by(visible, bad_keys | bad_values))

    def _merge(self, attended: Tensor) -> Tensor:
        """(B, H, T, E/H) -> (B, T, E)."""
        batch, _, tokens, _ = attended.shape
        return traceable_reshape(attended.transpose(1, 2), batch, tokens, self.v_dim)

    # --- the contract -------------------------------------------------------------------

    def mix(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        batch, length, _ = x.shape
        if self.chunk_size is None and length > self.max_len:
            raise SeqmixError(
                f"gated_attention: length {length} exceeds max_len={self.max_len} of full attention; "
                "raise max_len or set a chunk_size"
            )
        if padding_mask is not None:
            # Attention weighs padded values by 0, and 0 · NaN is NaN: padding must hold finite values.
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        xn = self.timestep_norm(x, padding_mask) if self.normalized else self._input_norm(x)
        m = self.local(xn, padding_mask)
        q, k, v, finish = self._branches(x, m, xn)

        size = self.chunk_size if self.chunk_size is not None else length
        pad = (-length) % size
        key_ok = torch.ones(batch, length, dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            key_ok = F.pad(key_ok, (0, pad), value=False)
        chunks = (length + pad) // size

        def by_chunk(t: Tensor) -> Tensor:
            return t.reshape(batch, self.heads, chunks, size, t.shape[-1])  # (B, H, nC, C, ·)

        positions = torch.arange(size, device=x.device)
        visible = key_ok.view(batch, 1, chunks, 1, size)
        if self.causal:
            visible = visible & (positions.unsqueeze(-1) >= positions)
        # A query may always see itself: keeps padded queries finite without touching valid ones.
        visible = visible | torch.eye(size, dtype=torch.bool, device=x.device)
        attended = self._attend(by_chunk(q), by_chunk(k), by_chunk(v), positions, positions, visible)
        # Crop after merging heads: cropping first leaves a strided view whose reshape would
        # make torch.export specialise on batch size 1.
        return finish(self._merge(attended.flatten(2, 3))[:, :length])

    def mix_step(self, x: Tensor, state: GatedAttentionState) -> tuple[Tensor, GatedAttentionState]:
        tokens = x.shape[1]
        if self.chunk_size is None:
            # Past max_len the cache ring would wrap and attend like a window: wrong logits, no error.
            assert_in_compiled_graph(lambda: state.kv.pos.max() + tokens <= self.max_len,
                                     f"gated_attention: the stream would reach more tokens than full attention holds "
                                     f"(max_len={self.max_len}); raise max_len or set a chunk_size")
            if not torch.compiler.is_compiling():
                seen = int(state.kv.pos.max())
                if seen + tokens > self.max_len:
                    raise SeqmixError(
                        f"gated_attention: the stream would reach {seen + tokens} tokens but full attention holds "
                        f"max_len={self.max_len}; raise max_len or set a chunk_size"
                    )
        if self.normalized:
            xn, norm_state = self.timestep_norm.step(x, state.norm)
        else:
            xn, norm_state = self._input_norm(x), state.norm
        m, local_state = self.local.step(xn, state.local)
        q, k, v, finish = self._branches(x, m, xn)

        q_abs = kv_cache.query_positions(state.kv, tokens)  # (B, T)
        keys, values, k_abs, kv = kv_cache.extend(state.kv, k, v)
        size = self.chunk_size if self.chunk_size is not None else self.max_len
        # Keys are visible when already seen, not in the future, and in the query's chunk.
        visible = (k_abs.unsqueeze(1) >= 0) & (k_abs.unsqueeze(1) <= q_abs.unsqueeze(2))
        visible = visible & (k_abs.unsqueeze(1) // size == q_abs.unsqueeze(2) // size)
        q_pos, k_pos = (q_abs % size).unsqueeze(1), (k_abs.clamp(min=0) % size).unsqueeze(1)
        attended = self._attend(q, keys, values, q_pos, k_pos, visible.unsqueeze(1))
        return finish(self._merge(attended)), GatedAttentionState(local_state, norm_state, kv)

    def empty_state(self, batch_size: int, device, dtype) -> GatedAttentionState:
        device, dtype = self.param_dtype_device(device, dtype)
        capacity = self.chunk_size if self.chunk_size is not None else self.max_len
        heads = self.heads
        kv = kv_cache.empty_kv(batch_size, heads, capacity, self.z_dim // heads, self.v_dim // heads, device, dtype)
        norm_state = self.timestep_norm.zero_state(batch_size, device, dtype) if self.normalized else ()
        return GatedAttentionState(self.local.empty_state(batch_size, device, dtype), norm_state, kv)
