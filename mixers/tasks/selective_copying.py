"""Selective copying (Gu & Dao 2023): reproduce the data tokens scattered among blanks, in order.

Layout of a sequence of length L with N tokens to copy and P = L − N − 1:

    positions 0 .. P−1   the N data tokens at random positions (order kept), blanks (0) elsewhere
    position  P          the delimiter (1)
    positions P+1 .. L−1 blanks: the answer region, whose inputs carry nothing (no teacher forcing)

The model emits data token j after reading position P + j, so solving it needs content-aware
(selective) memory: where the data tokens sit varies from row to row.
"""
from __future__ import annotations

import torch

from seqmix.errors import SeqmixError, require_int, require_seed
from seqmix.tasks._checks import check_request
from seqmix.tasks.base import IGNORE, Batch, Task, generator_for

BLANK = 0
DELIMITER = 1
FIRST_DATA = 2
"""Data tokens are FIRST_DATA .. FIRST_DATA + num_tokens − 1."""


class SelectiveCopying(Task):
    """Selective copying: emit, after a delimiter, the data tokens scattered among blanks before it.

    Args:
        num_tokens: distinct data tokens; the vocabulary adds the blank and the delimiter to them.
        num_tokens_to_copy: N, data tokens per sequence.
        seq_len: L, the whole sequence (data region, delimiter and answer region).
        seed: seeds every batch.

    Attributes:
        vocab_size: num_tokens + 2.

    Batches: inputs (B, L) long; targets (B, L) long, data token j at position P + j (P the
    delimiter's position) and IGNORE elsewhere.
    """

    name = "selective_copying"
    head = "causal_lm"
    metric = "accuracy"

    def __init__(self, num_tokens: int = 16, num_tokens_to_copy: int = 16, seq_len: int = 256, seed: int = 0):
        require_int(self.name, "num_tokens", num_tokens, 1)
        require_int(self.name, "num_tokens_to_copy", num_tokens_to_copy, 1)
        require_int(self.name, "seq_len", seq_len, 3)
        require_seed(self.name, "seed", seed)
        if 2 * num_tokens_to_copy + 1 > seq_len:
            raise SeqmixError(
                f"{self.name}: num_tokens_to_copy={num_tokens_to_copy} is not valid for seq_len={seq_len}; expected "
                f"2 * num_tokens_to_copy + 1 <= seq_len (the data region, the delimiter and the answer region)"
            )
        self.num_tokens = num_tokens
        self.num_tokens_to_copy = num_tokens_to_copy
        self.seq_len = seq_len
        self.seed = seed
        self.vocab_size = num_tokens + 2
        self.delimiter_position = seq_len - num_tokens_to_copy - 1

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        check_request(self.name, split, index, batch_size, self.seq_len)
        generator = generator_for(self.seed, split, index)
        count, delimiter = self.num_tokens_to_copy, self.delimiter_position
        # The top-N of i.i.d. uniforms picks N distinct positions; sorting keeps the tokens' order.
        positions = torch.rand(batch_size, delimiter, generator=generator).topk(count).indices.sort(dim=1).values
        tokens = torch.randint(FIRST_DATA, FIRST_DATA + self.num_tokens, (batch_size, count), generator=generator)
        inputs = torch.full((batch_size, self.seq_len), BLANK, dtype=torch.long)
        inputs.scatter_(1, positions, tokens)
        inputs[:, delimiter] = DELIMITER
        targets = torch.full_like(inputs, IGNORE)
        targets[:, delimiter:delimiter + count] = tokens
        return Batch(inputs, targets)
