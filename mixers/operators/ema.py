"""Multi-dimensional damped EMA (Mega, arXiv 2209.10655, §3.1).

Per channel d and order n (parameters of shape (D, N), rows doubled when bidirectional):

    p = σ(alpha)                     input weight   (paper α)
    q = 1 − p·σ(delta)               damped decay   (paper δ)
    h_t = p·beta ⊙ x_t + q ⊙ h_{t−1}  beta expands each channel into N states
    y_t = Σ_n (eta_n/√N)·h_{t,n}      eta projects them back (paper η)
    out = SiLU(y + omega ⊙ x)

Bidirectional: a second parameter set gives a backward kernel and y_t = Σ_{s≥0} k_f[s] x_{t−s}
+ Σ_{s≥0} k_b[s] x_{t+s} (lag 0 counted in both, as in the reference code). NB the reference
code names alpha and delta the other way round; these are the paper's names.

The recurrence runs in float32 at least, whatever the model's dtype or autocast.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqmix.contract import compute_dtype
from seqmix.errors import require_int
from seqmix.operators import recurrence
from seqmix.registry import register_mixer


class EMAState(NamedTuple):
    """Streaming state of the EMA: its hidden state h, (B, D, N) (``ema``, the name exported graphs give it)."""

    ema: Tensor


@register_mixer("ema")
class EMA(recurrence.RecurrenceMixer):
    """Mega's multi-dimensional damped EMA with output SiLU(y + omega ⊙ x).

    Args:
        d_model: D.
        order: N, states per channel.
        causal: False for the bidirectional EMA (no streaming).
        impl: ``recurrent`` (reference loop), ``fft`` (FFT convolution), ``chunked`` (default;
            inputs shorter than one chunk run the loop), ``native`` (the loop as C++ built on first
            use with the machine's compiler: the fastest on a CPU, float32 and float64).
        chunk_size: C of the chunked path.
    """

    def __init__(self, d_model: int, order: int = 16, causal: bool = True, impl: str | None = None, chunk_size: int = 64):
        super().__init__(d_model, causal=causal, impl=impl)
        require_int("ema", "order", order, meaning="N states per channel")
        require_int("ema", "chunk_size", chunk_size, meaning="C of the chunked path")
        self.order = order
        self.chunk_size = chunk_size
        rows = d_model if causal else 2 * d_model
        self.alpha = nn.Parameter(torch.empty(rows, order))
        self.delta = nn.Parameter(torch.empty(rows, order))
        self.beta = nn.Parameter(torch.empty(rows, order))
        self.eta = nn.Parameter(torch.empty(rows, order))
        self.omega = nn.Parameter(torch.empty(d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Mega's initialisation: beta = ±1 alternating over n plus small noise."""
        with torch.no_grad():
            nn.init.normal_(self.alpha, mean=0.0, std=0.2)
            nn.init.normal_(self.delta, mean=0.0, std=0.2)
            signs = torch.ones(self.order)
            signs[1::2] = -1.0
            self.beta.normal_(mean=0.0, std=0.02).add_(signs)
            nn.init.normal_(self.eta, mean=0.0, std=1.0)
            nn.init.normal_(self.omega, mean=0.0, std=1.0)

    def coefficients(self, dtype: torch.dtype, backward: bool = False) -> recurrence.Coefficients:
        """The recurrence of one direction, in ``dtype``: rows [0, D) forward, [D, 2D) backward."""
        rows = slice(self.d_model, 2 * self.d_model) if backward else slice(0, self.d_model)
        p = torch.sigmoid(self.alpha[rows].to(dtype))
        log_q = torch.log1p(-p * torch.sigmoid(self.delta[rows].to(dtype)))
        c = self.eta[rows].to(dtype) / math.sqrt(self.order)
        return recurrence.Coefficients(log_r=log_q, phase=None, b=p * self.beta[rows].to(dtype), c=(c, None))

    def kernel(self, length: int, backward: bool = False) -> Tensor:
        """k[d, j] = Σ_n (eta/√N)·p·beta·q^j for j < length -> (D, length), float32 at least."""
        return self.coefficients(compute_dtype(self.alpha.dtype), backward).kernel(length, self.alpha.device)

    def _recur(self, x: Tensor, h0, backward: bool = False, need_state: bool = True, skip: Tensor | None = None,
               silu: bool = False):
        """``recurrence.run`` of one direction; ``skip`` and ``silu`` give SiLU(y + skip ⊙ x), fused on the chunked path."""
        coef, prepared = self.prepared(lambda: self.coefficients(x.dtype, backward), x.dtype, x.shape[1],
                                       "backward" if backward else "forward", skip)
        return recurrence.run(self.impl, x, coef, h0, self.chunk_size, prepared, need_state, skip, silu)

    def mix(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            xs = x.to(compute_dtype(x.dtype))
            if padding_mask is not None:
                xs = xs.masked_fill(padding_mask.unsqueeze(-1), 0.0)
            omega = self.omega.to(xs.dtype)
            # Causal: the whole output SiLU(y + omega ⊙ x) in the recurrence's passes. Bidirectional:
            # the forward direction adds omega ⊙ x, the SiLU waits for the backward direction.
            out, _ = self._recur(xs, None, need_state=False, skip=omega, silu=self.causal)
            if not self.causal:
                y_back, _ = self._recur(xs.flip(1), None, backward=True, need_state=False)
                out = F.silu(out + y_back.flip(1))
        return out.to(x.dtype)

    def mix_step(self, x: Tensor, state: EMAState) -> tuple[Tensor, EMAState]:
        with torch.autocast(x.device.type, enabled=False):
            xs = x.to(compute_dtype(x.dtype))
            out, (h, _) = self._recur(xs, (state.ema.to(xs.dtype), None), skip=self.omega.to(xs.dtype), silu=True)
        return out.to(x.dtype), EMAState(h.to(state.ema.dtype))

    def empty_state(self, batch_size: int, device, dtype) -> EMAState:
        device, dtype = self.param_dtype_device(device, dtype)
        return EMAState(torch.zeros(batch_size, self.d_model, self.order, device=device, dtype=compute_dtype(dtype)))
