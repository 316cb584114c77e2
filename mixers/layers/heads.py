"""Output heads: what a model predicts from its final hidden states h (B, L, D).

Every head is built as ``head(d_model, vocab_size)`` so configs can swap them freely.
"""
from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from seqmix.errors import require_choice, require_int

POOLINGS = ("mean", "first")


class CausalLMHead(nn.Module):
    """Next-token logits: (B, L, D) -> (B, L, V). Needs causal mixers; its weight can be tied to the embedding.

    Args:
        d_model: D. vocab_size: V.
    """

    requires_causal: ClassVar[bool] = True
    per_token: ClassVar[bool] = True

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__()
        require_int("head", "d_model", d_model, meaning="D")
        require_int("head", "vocab_size", vocab_size, 2, "V")
        self.proj = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, h: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return self.proj(h)


class MaskedLMHead(CausalLMHead):
    """Logits of masked tokens for bidirectional encoders: (B, L, D) -> (B, L, V)."""

    requires_causal = False


class ClassificationHead(nn.Module):
    """Sequence classification: pool over L, then a linear layer: (B, L, D) -> (B, num_classes).

    Args:
        d_model: D.
        vocab_size: unused; every head shares one signature.
        num_classes: output classes.
        pooling: ``mean`` over unpadded positions, or ``first`` (the first token's state).
    """

    requires_causal: ClassVar[bool] = False
    per_token: ClassVar[bool] = False

    def __init__(self, d_model: int, vocab_size: int, num_classes: int = 2, pooling: str = "mean"):
        super().__init__()
        require_int("classification head", "d_model", d_model, meaning="D")
        require_int("classification head", "num_classes", num_classes, 2)
        require_choice("head.pooling", pooling, POOLINGS)
        self.pooling = pooling
        self.proj = nn.Linear(d_model, num_classes)

    def forward(self, h: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        if self.pooling == "first":
            return self.proj(h[:, 0])
        if padding_mask is None:
            return self.proj(h.mean(dim=1))
        keep = (~padding_mask).unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        pooled = (h * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return self.proj(pooled)
