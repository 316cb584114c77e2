"""Peer packages timed beside seqmix's mixers (``bench.peers=true``).

Each peer is built with the sizes of the registered mixer it is compared with and maps x (B, L, D)
to (B, L, D). The packages are an optional extra (``pip install 'seqmix[peers]'``), imported only
when a peer is built; a missing one makes its cells skipped rows naming the ``pip install``.
"""
from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# The runtimes peers run on: eager PyTorch on the CPU and on the GPU.
PEER_RUNTIMES = ("eager", "cuda")


class TorchMultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` as a mixer: x (B, L, D) -> (B, L, D), self-attention.

    Causal attention passes a (L, L) mask with the ``is_causal`` hint, so PyTorch may use its
    fused causal kernel; the mask is built once per length and kept, out of the timed runs.
    """

    def __init__(self, d_model: int, heads: int, causal: bool):
        super().__init__()
        self.attention = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.causal = causal
        self._masks: dict[tuple[int, torch.device], Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        if not self.causal:
            return self.attention(x, x, x, need_weights=False)[0]
        key = (x.shape[1], x.device)
        if key not in self._masks:
            self._masks = {key: torch.ones(key[0], key[0], dtype=torch.bool, device=x.device).triu(1)}
        return self.attention(x, x, x, attn_mask=self._masks[key], is_causal=True, need_weights=False)[0]


def _mega_pytorch_ema(ema: nn.Module) -> nn.Module:
    from mega_pytorch import MultiHeadedEMA

    return MultiHeadedEMA(dim=ema.d_model, heads=ema.order, bidirectional=not ema.causal)


def _mega_pytorch_layer(layer: nn.Module) -> nn.Module:
    from mega_pytorch import MegaLayer

    return MegaLayer(
        dim=layer.d_model,
        ema_heads=getattr(layer.local, "order", 16),
        attn_dim_qk=layer.z_dim,
        attn_dim_value=layer.v_dim,
        causal=layer.causal,
    )


def _pytorch_tcn(tcn: nn.Module) -> nn.Module:
    from pytorch_tcn import TCN

    # pytorch-tcn offers no SiLU; GELU is its closest activation.
    activation = "gelu" if tcn.activation in ("silu", "gelu") else "relu"
    with warnings.catch_warnings():
        # It warns that its default initializer has no gain for GELU; irrelevant to timing.
        warnings.simplefilter("ignore", UserWarning)
        return TCN(
            num_inputs=tcn.d_model,
            num_channels=[tcn.d_model] * tcn.depth,
            kernel_size=tcn.kernel_size,
            dilations=[tcn.dilation_base**i for i in range(tcn.depth)],
            dropout=0.0,
            causal=True,
            use_norm=None,
            activation=activation,
            input_shape="NLC",
        )


def _torch_mha(attention: nn.Module) -> nn.Module:
    return TorchMultiheadAttention(attention.d_model, attention.heads, attention.causal)


@dataclass(frozen=True)
class Peer:
    """A peer package's module, built with the sizes of the seqmix mixer it is compared with.

    Attributes:
        name: its label in reports.
        against: the registered seqmix mixer it is compared with.
        package: the pip distribution; ``module`` its import name.
        build: (the seqmix mixer) -> a module mapping x (B, L, D) to (B, L, D).
        score_bytes: (the seqmix mixer, pass) -> bytes per B·L² at the pass's peak: its
            (L, L) matrices, measured with the CPU profiler at L = 512 and 1024.
        note: how it differs from the seqmix operator.
    """

    name: str
    against: str
    package: str
    module: str
    build: Callable[[nn.Module], nn.Module]
    score_bytes: Callable[[nn.Module, str], float]
    note: str


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer(
            "mega_pytorch.MultiHeadedEMA", "ema", "mega-pytorch", "mega_pytorch", _mega_pytorch_ema,
            lambda mixer, pass_: 0.0,
            "FFT convolution with a kernel recomputed every call; N heads of decays shared across channels",
        ),
        Peer(
            "mega_pytorch.MegaLayer", "gated_attention", "mega-pytorch", "mega_pytorch", _mega_pytorch_layer,
            lambda mixer, pass_: {"forward": 46.0, "fwd+bwd": 67.0}[pass_],
            "attends over the whole sequence (no chunks) with a T5 relative bias; seqmix's layer uses bench.mixer_options",
        ),
        Peer(
            "pytorch_tcn.TCN", "tcn", "pytorch-tcn", "pytorch_tcn", _pytorch_tcn,
            lambda mixer, pass_: 0.0,
            "two dense D→D convolutions per level (seqmix: one depthwise); same K, dilations and depth",
        ),
        Peer(
            "torch.nn.MultiheadAttention", "softmax_attention", "torch", "torch", _torch_mha,
            # Eval mode takes the native fast path, which materialises the scores; training goes through SDPA.
            lambda mixer, pass_: {"forward": 10.0 * mixer.heads, "fwd+bwd": 6.0}[pass_],
            "no rotary positions; heads as seqmix's softmax_attention",
        ),
    )
}


def peer_unavailable(peer: Peer) -> str | None:
    """Why ``peer`` cannot run here (its package is not importable), or None."""
    try:
        importlib.import_module(peer.module)
    except ImportError as error:
        return f"peer package {peer.package} is not installed ({error}): pip install {peer.package}"
    return None
