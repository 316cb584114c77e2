"""Complex EMA (Megalodon, arXiv 2404.08801, §3.1), in real arithmetic only.

Per channel d and order k = 1..N (parameters (D, N) unless noted):

    p = σ(alpha)                       input weight
    r = 1 − σ(alpha)·σ(delta)          decay magnitude
    φ_{d,k} = k·σ(theta_d)·2π/N        phase; theta is (D,)
    q = r·e^{iφ}
    h_t = p·x_t + q ⊙ h_{t−1}           complex h ∈ C^N
    y_t = Re Σ_k (eta_k/√N)·h_{t,k} + omega ⊙ x_t      eta complex, no activation

Every tensor stays real: eta is stored as ``eta_re`` and ``eta_im``, the state as its real and
imaginary parts, and complex products are written out. ONNX, TensorRT and ExecuTorch have no
complex dtype, so this is what lets the CEMA export. Causal only. The recurrence runs in float32
at least, whatever the model's dtype or autocast.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from seqmix.contract import compute_dtype
from seqmix.errors import SeqmixError, require_bool, require_int
from seqmix.operators import recurrence
from seqmix.registry import register_mixer


class CEMAState(NamedTuple):
    """Streaming state of the CEMA: the real and imaginary parts of h, each (B, D, N)."""

    cema_re: Tensor
    cema_im: Tensor


@register_mixer("cema")
class CEMA(recurrence.RecurrenceMixer):
    """Megalodon's complex EMA with output Re(y) + omega ⊙ x.

    Args:
        d_model: D.
        order: N, complex states per channel.
        causal: must be True; the CEMA has no bidirectional form.
        impl: ``recurrent`` (reference loop), ``fft`` (FFT convolution), ``chunked`` (default;
            inputs shorter than one chunk run the loop), ``native`` (the loop as C++ built on first
            use with the machine's compiler: the fastest on a CPU, float32 and float64).
        chunk_size: C of the chunked path.
    """

    complex_state = True

    def __init__(self, d_model: int, order: int = 16, causal: bool = True, impl: str | None = None, chunk_size: int = 64):
        require_bool("cema", "causal", causal)
        if not causal:
            raise SeqmixError("cema: causal=False is not supported; the complex EMA is causal only (use ema for a bidirectional EMA)")
        super().__init__(d_model, causal=True, impl=impl)
        require_int("cema", "order", order, meaning="N complex states per channel")
        require_int("cema", "chunk_size", chunk_size, meaning="C of the chunked path")
        self.order = order
        self.chunk_size = chunk_size
        self.alpha = nn.Parameter(torch.empty(d_model, order))
        self.delta = nn.Parameter(torch.empty(d_model, order))
        self.theta = nn.Parameter(torch.empty(d_model))
        self.eta_re = nn.Parameter(torch.empty(d_model, order))
        self.eta_im = nn.Parameter(torch.empty(d_model, order))
        self.omega = nn.Parameter(torch.empty(d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Megalodon's initialisation: theta = logit(D^(−j/D)) for j = 1..D, permuted; Im eta = 0."""
        with torch.no_grad():
            nn.init.normal_(self.alpha, mean=0.0, std=0.2)
            nn.init.normal_(self.delta, mean=0.0, std=0.2)
            j = torch.arange(1, self.d_model + 1, dtype=torch.float64)
            base = self.d_model ** (-j / self.d_model)
            # D^(-1) .. D^(-D/D) = 1/D; keep the logit finite at the top end.
            base = base.clamp(max=1.0 - 1e-4)
            self.theta.copy_(torch.logit(base)[torch.randperm(self.d_model)].to(self.theta.dtype))
            nn.init.normal_(self.eta_re, mean=0.0, std=1.0)
            nn.init.zeros_(self.eta_im)
            nn.init.normal_(self.omega, mean=0.0, std=1.0)

    def coefficients(self, dtype: torch.dtype) -> recurrence.Coefficients:
        """The recurrence in ``dtype``: log r, φ, p and eta/√N as real tensors (D, N)."""
        p = torch.sigmoid(self.alpha.to(dtype))
        log_r = torch.log1p(-p * torch.sigmoid(self.delta.to(dtype)))
        k = torch.arange(1, self.order + 1, device=self.theta.device, dtype=dtype)
        phase = torch.sigmoid(self.theta.to(dtype)).unsqueeze(-1) * k * (2 * math.pi / self.order)
        scale = 1.0 / math.sqrt(self.order)
        return recurrence.Coefficients(log_r=log_r, phase=phase, b=p, c=(self.eta_re.to(dtype) * scale, self.eta_im.to(dtype) * scale))

    def kernel(self, length: int) -> Tensor:
        """k[d, j] = (1/√N) Σ_k p r^j (eta_re cos jφ − eta_im sin jφ) for j < length -> (D, length)."""
        return self.coefficients(compute_dtype(self.alpha.dtype)).kernel(length, self.alpha.device)

    def _recur(self, xs: Tensor, h0, need_state: bool = True):
        """``recurrence.run`` with the output Re(y) + omega ⊙ x, the skip fused on the chunked path."""
        skip = self.omega.to(xs.dtype)
        coef, prepared = self.prepared(lambda: self.coefficients(xs.dtype), xs.dtype, xs.shape[1], skip=skip)
        return recurrence.run(self.impl, xs, coef, h0, self.chunk_size, prepared, need_state, skip=skip)

    def mix(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            xs = x.to(compute_dtype(x.dtype))
            if padding_mask is not None:
                xs = xs.masked_fill(padding_mask.unsqueeze(-1), 0.0)
            out, _ = self._recur(xs, None, need_state=False)
        return out.to(x.dtype)

    def mix_step(self, x: Tensor, state: CEMAState) -> tuple[Tensor, CEMAState]:
        with torch.autocast(x.device.type, enabled=False):
            xs = x.to(compute_dtype(x.dtype))
            out, (h_re, h_im) = self._recur(xs, (state.cema_re.to(xs.dtype), state.cema_im.to(xs.dtype)))
        return out.to(x.dtype), CEMAState(h_re.to(state.cema_re.dtype), h_im.to(state.cema_im.dtype))

    def empty_state(self, batch_size: int, device, dtype) -> CEMAState:
        device, dtype = self.param_dtype_device(device, dtype)
        zeros = torch.zeros(batch_size, self.d_model, self.order, device=device, dtype=compute_dtype(dtype))
        return CEMAState(zeros, zeros.clone())
