"""Masked segment modelling on the stdlib byte corpus: recover contiguous masked spans of bytes.

As in InterBERT's masked segment modelling, whole contiguous spans are masked rather than single
tokens, so a span cannot be filled in from its immediate neighbours alone. The corpus, its split by
file and its cache are ByteLM's (mixers/tasks/byte_lm.py).

Masking one window of L bytes with M = round(mask_fraction · L) masked positions:

1. span lengths are drawn from a geometric distribution on {1, 2, …} with mean ``mean_span`` until
   they total at least M; the last span is trimmed so the total is exactly M;
2. the spans are placed at distinct gaps between the L − M unmasked bytes (a uniform draw of gaps),
   so two spans never touch and every span stays a separate run. When there are more spans than
   the L − M + 1 gaps (only for mask fractions near 1), the trailing spans are merged into one.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from seqmix.errors import SeqmixError, require_int, require_seed
from seqmix.tasks._checks import check_request, require_number
from seqmix.tasks.base import IGNORE, Batch, Task, generator_for
from seqmix.tasks.byte_lm import StdlibCorpus

MASK = 256
"""Input token of a masked byte."""


class MaskedSegment(Task):
    """Masked segment modelling: predict the bytes of contiguous masked spans of stdlib source.

    Args:
        seq_len: L, bytes per sequence.
        mask_fraction: share of the L positions masked; exactly round(mask_fraction · L) per row.
        mean_span: mean span length (>= 1) of the geometric span-length distribution.
        cache_dir: where the corpus arrays are cached (shared with ByteLM).
        max_bytes: cap on each split's bytes for quick runs; None uses the whole split.
        seed: seeds the windows and the masks.

    Attributes:
        corpus: the StdlibCorpus the windows come from.
        num_masked: M = round(mask_fraction · L).

    Batches: inputs (B, L) long, bytes with masked positions set to MASK (256); targets (B, L)
    long, the original byte at masked positions and IGNORE elsewhere. ``train`` windows start at
    random offsets; ``valid`` batch i holds the consecutive non-overlapping windows i·B .. i·B + B − 1
    of the split (wrapping around), each with its own random mask.
    """

    name = "masked_segment"
    head = "masked_lm"
    metric = "accuracy"
    causal = False
    vocab_size = 257

    def __init__(self, seq_len: int = 256, mask_fraction: float = 0.15, mean_span: float = 8,
                 cache_dir: str | os.PathLike = "~/.cache/seqmix", max_bytes: int | None = None, seed: int = 0):
        require_int(self.name, "seq_len", seq_len, 1)
        require_number(self.name, "mask_fraction", mask_fraction, 0.0, 1.0)
        require_number(self.name, "mean_span", mean_span, 1.0, low_inclusive=True)
        require_seed(self.name, "seed", seed)
        self.num_masked = round(mask_fraction * seq_len)
        if self.num_masked < 1:
            raise SeqmixError(
                f"{self.name}: mask_fraction={mask_fraction!r} is not valid for seq_len={seq_len}; "
                f"round(mask_fraction * seq_len) must be at least 1"
            )
        self.seq_len = seq_len
        self.mask_fraction = mask_fraction
        self.mean_span = mean_span
        self.seed = seed
        # log(1 − 1/mean_span): the log-probability that a span goes on past each byte.
        self.log_continue = torch.log1p(torch.tensor(-1 / mean_span, dtype=torch.float64))
        self.corpus = StdlibCorpus(cache_dir, max_bytes, self.name)
        for split, data in self.corpus.data.items():
            if data.numel() < seq_len:
                raise SeqmixError(
                    f"{self.name}: the {split} split has {data.numel()} bytes (max_bytes={max_bytes!r}), fewer than "
                    f"seq_len = {seq_len}; raise max_bytes or lower seq_len"
                )

    def span_mask(self, generator: torch.Generator) -> Tensor:
        """(L,) bool, True at the M masked positions of one window (module docstring)."""
        total, gaps = self.num_masked, self.seq_len - self.num_masked + 1
        # Inverse-CDF draw of Geometric(p = 1/mean_span) on {1, 2, …}; for mean 1 the divisor is −inf and
        # every length is 1.
        uniform = torch.rand(total, generator=generator, dtype=torch.float64)
        lengths = 1 + (torch.log1p(-uniform) / self.log_continue).floor().clamp(max=total).long()
        # M draws always suffice: each span is at least 1 long.
        count = int((lengths.cumsum(0) < total).sum()) + 1
        lengths = lengths[:count]
        lengths[-1] -= int(lengths.sum()) - total
        if count > gaps:
            lengths = torch.cat([lengths[: gaps - 1], lengths[gaps - 1:].sum(0, keepdim=True)])
            count = gaps
        chosen = torch.randperm(gaps, generator=generator)[:count].sort().values
        ends = lengths.cumsum(0)
        starts = chosen + ends - lengths  # unmasked bytes before the span plus the spans before it
        offsets = torch.arange(total) - (ends - lengths).repeat_interleave(lengths)
        mask = torch.zeros(self.seq_len, dtype=torch.bool)
        mask[starts.repeat_interleave(lengths) + offsets] = True
        return mask

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        check_request(self.name, split, index, batch_size, self.seq_len)
        generator = generator_for(self.seed, split, index)
        data = self.corpus.data[split]
        if split == "train":
            starts = torch.randint(0, data.numel() - self.seq_len + 1, (batch_size,), generator=generator)
        else:
            windows = data.numel() // self.seq_len
            starts = (torch.arange(batch_size) + index * batch_size) % windows * self.seq_len
        window = data[starts[:, None] + torch.arange(self.seq_len)].long()
        mask = torch.stack([self.span_mask(generator) for _ in range(batch_size)])
        return Batch(window.masked_fill(mask, MASK), torch.where(mask, window, IGNORE))
