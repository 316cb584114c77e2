"""What every built-in task provides to the trainer: deterministic batches and a metric.

Batches are a pure function of (split, index): the trainer asks for batch ``index`` = the global
step, so a resumed run sees exactly the batches an uninterrupted one would, and data-parallel
ranks can each take their slice of the same global batch.
"""
from __future__ import annotations

import hashlib

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

IGNORE = -100
"""Target value that the loss and the metrics skip (torch's cross-entropy default)."""

SPLITS = ("train", "valid")

BITS_METRICS = ("bits_per_byte", "bits_per_token")
"""Metrics that are the per-token cross-entropy in bits (lower is better); the other metric is ``accuracy``."""

MODEL_FILES = ("tokenizer.json", "labels.json")
"""The names ``Task.model_files`` may use; the run directory's copies of these travel with every checkpoint."""


@dataclass
class Batch:
    """One batch.

    Attributes:
        inputs: (B, L) long token ids.
        targets: (B, L) long per-token targets with ``IGNORE`` where nothing is predicted
            (language modelling, recall, copying, masked segments), or (B,) long class labels.
        padding_mask: (B, L) bool, True at padding; None when nothing is padded.
    """

    inputs: Tensor
    targets: Tensor
    padding_mask: Tensor | None = None

    def slice(self, start: int, stop: int) -> "Batch":
        """Rows [start, stop) of the batch (for gradient accumulation and data parallelism)."""
        mask = None if self.padding_mask is None else self.padding_mask[start:stop]
        return Batch(self.inputs[start:stop], self.targets[start:stop], mask)

    def to(self, device) -> "Batch":
        mask = None if self.padding_mask is None else self.padding_mask.to(device)
        return Batch(self.inputs.to(device), self.targets.to(device), mask)


class Task:
    """Base class of a task.

    Class attributes:
        name: the registered name (``task=<name>`` on the command line).
        head: the model head it needs: ``causal_lm``, ``masked_lm`` or ``classification``.
        metric: ``bits_per_byte`` (per-token cross-entropy in bits, tokens being bytes), ``bits_per_token``
            (the same over a tokenizer's tokens) or ``accuracy``.
        causal: whether a causal model can solve it (False for masked objectives).
        models_text: whether its sequences are text a tokenizer decodes, so that a model trained on
            it continues text (``seqmix generate``); False for synthetic tokens and classification.
        reads_data: whether building it reads the user's files (and may tokenize them), so that its
            vocabulary and classes are known only then; False for generated and built-in data.
    Attributes set by subclasses:
        vocab_size: V, the number of token ids inputs use.
        num_classes: classes of a classification task, else None.
        seq_len: L of every batch.
    """

    name: ClassVar[str]
    head: ClassVar[str]
    metric: ClassVar[str]
    causal: ClassVar[bool] = True
    models_text: ClassVar[bool] = False
    reads_data: ClassVar[bool] = False
    vocab_size: int
    num_classes: int | None = None
    seq_len: int

    def model_files(self) -> dict[str, bytes]:
        """Files a model trained on this task needs beside its weights, by name (``tokenizer.json``,
        ``labels.json``): saved with the run, every checkpoint, ``save_pretrained`` and every export."""
        return {}

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        """Batch number ``index`` of ``split``: the same tensors every time it is asked for."""
        raise NotImplementedError

    def eval_batches(self, batch_size: int, count: int) -> Iterator[Batch]:
        """The fixed evaluation set: ``count`` batches of the validation split."""
        for index in range(count):
            yield self.batch("valid", index, batch_size)


INDEX_SPAN = 1_000_033
"""Batch indices the arithmetic seed of ``generator_for`` keeps apart: past it, one split's batch
took the seed of another's (train's batch 1,000,033 was valid's batch 0, repeated in training)."""


def generator_for(seed: int, split: str, index: int) -> torch.Generator:
    """A torch generator seeded from (seed, split, index), so batches never depend on call order.

    Below INDEX_SPAN the seed is arithmetic (the batches of every earlier version); from it on, a
    hash of the three, which no other split's or index's arithmetic seed is but by a 2**-40 chance.
    """
    offset = SPLITS.index(split) if split in SPLITS else len(SPLITS)
    if index >= INDEX_SPAN:
        digest = hashlib.blake2b(f"seqmix-batch:{seed}:{offset}:{index}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little"))
    # Modulo 2**64, the most manual_seed takes: a seed above 2**24 overflowed it. Below, nothing changes.
    return torch.Generator().manual_seed(((seed * 1_000_003 + offset) * INDEX_SPAN + index) % 2**64)
