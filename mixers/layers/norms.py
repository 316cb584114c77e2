"""Normalisation layers of the Mega and Megalodon blocks, all over the last dim D.

    RMSNorm:      y = x / √(mean_d x² + eps) · weight            (weight (D,), init 1)
    ScaleNorm:    y = x · rsqrt(mean_d x² + eps) · g             (Mega; g a scalar, init 1)
    LayerNorm:    torch.nn.LayerNorm
    TimestepNorm: (Megalodon) the D features are split into G groups of D/G. For each row and group,
                  M_t and V_t are the mean and population variance over all features of the group and
                  all non-padded steps s ≤ t (cumulative), and
                  y_t = (x_t − M_t) / √(V_t + eps) · (weight + 1) + bias   (weight, bias (D,), init 0).
                  Padded steps output exactly 0 and leave the statistics unchanged.

TimestepNorm runs in parallel over L with cumulative sums. Each step contributes its count n_s, its
sum and its sum of squared deviations; the data are shifted by a per-(row, group) constant K first,
so that Σ(x − K)² − N·(mean − K)² does not cancel catastrophically when |mean| ≫ std (the variance
of shifted data equals the variance of the data). Its statistics run in float32 at least.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from seqmix.contract import check_state_request, compute_dtype
from seqmix.errors import INT_LIMIT, SeqmixError, require_bool, require_choice, require_int, kind_of

NORMS = ("layernorm", "rmsnorm", "scalenorm", "timestepnorm")

def require_eps(owner: str, eps) -> None:
    """Raise unless ``eps`` is a finite number > 0: a negative one, or NaN, gave NaN outputs, and a
    string torch's TypeError at the first forward."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise SeqmixError(f"{owner}: eps={eps!r} is not valid; expected a finite number > 0")


def require_last_dim(owner: str, x, dim: int) -> None:
    """Raise unless ``x`` is a tensor of at least one dimension whose last is ``dim``: RMSNorm failed
    inside torch's multiply, and ScaleNorm normalised a tensor of another width without a word."""
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != dim:
        shape = tuple(x.shape) if isinstance(x, Tensor) else kind_of(x)
        raise SeqmixError(f"{owner}: x has shape {shape}, expected (..., D={dim})")


class LayerNorm(nn.LayerNorm):
    """torch.nn.LayerNorm over the last dim D, its arguments checked first (torch took dim=0, and a
    negative or NaN eps, which give NaN outputs).

    Args:
        dim: D, the normalised (last) dim.
        eps: added to the variance.
        elementwise_affine: learn a weight (init 1) and, with ``bias``, a bias (init 0), each (D,).
    """

    def __init__(self, dim: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True):
        require_int("LayerNorm", "dim", dim, meaning="D")
        require_eps("LayerNorm", eps)
        require_bool("LayerNorm", "elementwise_affine", elementwise_affine)
        require_bool("LayerNorm", "bias", bias)
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine, bias=bias)


class RMSNorm(nn.Module):
    """Root-mean-square norm: x / √(mean x² + eps), times a per-feature weight.

    Args:
        dim: D, the normalised (last) dim.
        eps: added to the mean square.
        affine: learn a weight of shape (D,), init 1; False for none.
    """

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        require_int("RMSNorm", "dim", dim, meaning="D")
        require_eps("RMSNorm", eps)
        require_bool("RMSNorm", "affine", affine)
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        require_last_dim("RMSNorm", x, self.dim)
        xs = x.to(compute_dtype(x.dtype))
        y = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(xs.dtype)
        return y.to(x.dtype)


class ScaleNorm(nn.Module):
    """Mega's scale norm: x · rsqrt(mean x² + eps) times one learned scalar g.

    Args:
        dim: D, the normalised (last) dim.
        eps: added to the mean square.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        require_int("ScaleNorm", "dim", dim, meaning="D")
        require_eps("ScaleNorm", eps)
        self.dim = dim
        self.eps = eps
        self.scalar = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        require_last_dim("ScaleNorm", x, self.dim)
        xs = x.to(compute_dtype(x.dtype))
        y = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + self.eps) * self.scalar.to(xs.dtype)
        return y.to(x.dtype)


class TimestepNormState(NamedTuple):
    """Streaming state of TimestepNorm, each (B, G) in compute dtype.

    count: values accumulated so far (steps × D/G); mean, var: their mean and population variance.
    """

    count: Tensor
    mean: Tensor
    var: Tensor


class TimestepNorm(nn.Module):
    """Megalodon's timestep norm: causal group norm with cumulative statistics over time.

    Args:
        dim: D.
        groups: G, which must divide D; the statistics of each group of D/G features are shared.
        eps: added to the variance.
    """

    def __init__(self, dim: int, groups: int = 1, eps: float = 1e-5):
        super().__init__()
        require_int("TimestepNorm", "dim", dim, meaning="D")
        if not isinstance(groups, int) or isinstance(groups, bool) or not 1 <= groups <= INT_LIMIT or dim % groups:
            raise SeqmixError(
                f"TimestepNorm: groups={groups!r} does not divide d_model={dim}; expected a positive divisor of {dim}"
            )
        require_eps("TimestepNorm", eps)
        self.dim = dim
        self.groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def init_state(self, batch_size: int, device=None, dtype=None) -> TimestepNormState:
        """Zero statistics, (B, G) each; device and dtype default to the parameters'."""
        return self.zero_state(batch_size, check_state_request("TimestepNorm", batch_size, device, dtype), dtype)

    def zero_state(self, batch_size, device=None, dtype=None) -> TimestepNormState:
        """``init_state`` without its checks, for ``forward`` and the layers that hold this norm: their
        own checks ran already, and inside a traced call the batch size is symbolic."""
        device = self.weight.device if device is None else device
        dtype = compute_dtype(self.weight.dtype if dtype is None else dtype)
        zeros = torch.zeros(batch_size, self.groups, device=device, dtype=dtype)
        return TimestepNormState(zeros, zeros.clone(), zeros.clone())

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Normalise a whole sequence.

        Args:
            x: (B, L, D).
            padding_mask: (B, L) bool, True at padding.
        Returns:
            (B, L, D), 0 at padded steps.
        """
        self._check(x, padding_mask)
        y, _ = self.normalize(x, padding_mask, self.zero_state(x.shape[0], x.device, x.dtype))
        return y

    def step(self, x: Tensor, state: TimestepNormState) -> tuple[Tensor, TimestepNormState]:
        """Continue a stream by T >= 1 tokens.

        Args:
            x: (B, T, D).
            state: from ``init_state`` or the previous ``step``.
        Returns:
            (B, T, D) outputs, equal to those of ``forward`` over the whole stream, and the new state.
        """
        self._check(x, None)
        expected = (x.shape[0], self.groups)
        if len(state) != 3 or any(tuple(t.shape) != expected for t in state):
            raise SeqmixError(
                f"TimestepNorm: state shapes {[tuple(t.shape) for t in state]} do not match (B, G)={expected}"
            )
        return self.normalize(x, None, state)

    def normalize(
        self, x: Tensor, padding_mask: Tensor | None, state: TimestepNormState
    ) -> tuple[Tensor, TimestepNormState]:
        """Normalise x given the statistics of everything before it; shared by forward and step.

        Args:
            x: (B, L, D).
            padding_mask: (B, L) bool, True at padding, or None.
            state: statistics of the preceding steps, (B, G) each.
        Returns:
            (B, L, D) outputs and the statistics including x.
        """
        B, L, D = x.shape
        G = self.groups
        with torch.autocast(x.device.type, enabled=False):
            cd = compute_dtype(x.dtype)
            valid = torch.ones(B, L, dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask
            # masked_fill, not a product, so NaN or inf in padding cannot leak into the sums
            xs = x.to(cd).masked_fill(~valid.unsqueeze(-1), 0.0).view(B, L, G, D // G)
            c0, m0, v0 = (t.to(cd) for t in state)

            # shift K: the prior mean, or for a fresh row the first valid step's mean (0 if none)
            # The first valid step is the number of steps before it (L − 1 for a row of padding,
            # whose steps are all zeros). Counted, not argmax: Inductor (torch 2.13, CPU) compiles
            # the argmax of an all-True mask into a garbage index and then reads out of bounds.
            first = (valid.cumsum(1) == 0).sum(1).clamp_max(L - 1)  # (B,)
            first_mean = xs.gather(1, first.view(B, 1, 1, 1).expand(B, 1, G, D // G)).mean(-1).squeeze(1)  # (B, G)
            K = torch.where(c0 > 0, m0, first_mean)
            # shift before any sum, so that no sum ever holds a value as large as |mean|
            z = (xs - K.view(B, 1, G, 1)).masked_fill(~valid.view(B, L, 1, 1), 0.0)  # (B, L, G, D/G)

            n = valid.to(cd).unsqueeze(-1) * (D // G)  # (B, L, 1), 0 at padded steps
            step_mean = z.mean(-1)  # (B, L, G)
            step_ssd = (z - step_mean.unsqueeze(-1)).pow(2).sum(-1)  # (B, L, G)

            # the prior's shifted sum c0·(m0 − K) is 0 either way; its shifted squares are c0·v0
            count = c0.unsqueeze(1) + torch.cumsum(n.expand(B, L, G), 1)  # (B, L, G)
            shifted_sum = torch.cumsum(n * step_mean, 1)
            shifted_sq = (c0 * v0).unsqueeze(1) + torch.cumsum(step_ssd + n * step_mean.pow(2), 1)
            # before any valid token the count is 0: clamp, those outputs are masked to 0 anyway
            safe = count.clamp_min(1.0)
            mean_shift = shifted_sum / safe  # M_t − K
            var = (shifted_sq / safe - mean_shift.pow(2)).clamp_min(0.0)

            y = (z - mean_shift.unsqueeze(-1)) * torch.rsqrt(var + self.eps).unsqueeze(-1)
            y = y.reshape(B, L, D) * (self.weight.to(cd) + 1.0) + self.bias.to(cd)
            y = y.masked_fill(~valid.unsqueeze(-1), 0.0)

            new_state = TimestepNormState(count[:, -1], K + mean_shift[:, -1], var[:, -1])
        dtype = state.count.dtype
        return y.to(x.dtype), TimestepNormState(*(t.to(dtype) for t in new_state))

    def _check(self, x: Tensor, padding_mask: Tensor | None) -> None:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim or x.shape[1] < 1:
            shape = tuple(x.shape) if isinstance(x, Tensor) else kind_of(x)
            raise SeqmixError(f"TimestepNorm: x has shape {shape}, expected (B, L >= 1, D={self.dim})")
        if padding_mask is not None and (
            padding_mask.dtype != torch.bool or tuple(padding_mask.shape) != tuple(x.shape[:2])
        ):
            raise SeqmixError(
                f"TimestepNorm: padding_mask has shape {tuple(padding_mask.shape)} and dtype {padding_mask.dtype}, "
                f"expected (B, L)={tuple(x.shape[:2])} bool"
            )


def build_norm(name: str, dim: int, **options) -> nn.Module:
    """Build the norm called ``name`` (one of ``NORMS``) for width ``dim``."""
    classes = {"layernorm": LayerNorm, "rmsnorm": RMSNorm, "scalenorm": ScaleNorm, "timestepnorm": TimestepNorm}
    require_choice("norm", name, NORMS)
    return classes[name](dim, **options)
