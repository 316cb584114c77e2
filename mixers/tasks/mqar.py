"""Multi-query associative recall (MQAR) with the rules of Zoology's generator (Arora et al. 2023).

A sequence lists K key-value pairs, then queries every key once; after reading a queried key the
model must output the value that was paired with it. Keys come from the lower half of the
vocabulary (without token 0, the filler), values from the upper half, both drawn without
replacement so every key has exactly one value and no value is ambiguous.

Query placement, as in Zoology: the query region (the L − 2K positions after the pairs) is cut into
S = ⌊(L − 2K)/2⌋ slots at even offsets (slot s at position 2K + 2s, so a filler follows every
query). The K keys go to K distinct slots drawn without replacement with probability
∝ (s + 1)^(a − 1) for slot s, i.e. p(gap) ∝ a·gap^(a − 1) with the gap measured in slots from the
start of the query region. Small ``power_a`` favours early slots, which leaves most queries close to
their pairs and a power-law tail of long-range ones.
"""
from __future__ import annotations

import torch

from seqmix.errors import SeqmixError, require_int, require_seed
from seqmix.tasks._checks import check_request, require_number
from seqmix.tasks.base import IGNORE, Batch, Task, generator_for

FILLER = 0
"""Token of every position that is neither a pair nor a query."""


class MQAR(Task):
    """Multi-query associative recall: k1 v1 … kK vK, then each key queried once among filler tokens.

    Args:
        vocab_size: V; keys are drawn from [1, V // 2), values from [V // 2, V).
        seq_len: L.
        num_pairs: K key-value pairs per sequence (each queried once).
        power_a: a, the power-law exponent of the query slots (module docstring).
        seed: seeds every batch.

    Batches: inputs (B, L) long; targets (B, L) long, the paired value at each query position
    (targets[t] is what the model emits after reading inputs[:t + 1]) and IGNORE elsewhere, so each
    row has exactly K targets.
    """

    name = "mqar"
    head = "causal_lm"
    metric = "accuracy"

    def __init__(self, vocab_size: int = 8192, seq_len: int = 256, num_pairs: int = 16, power_a: float = 0.01,
                 seed: int = 0):
        require_int(self.name, "vocab_size", vocab_size, 4)
        require_int(self.name, "seq_len", seq_len, 4)
        require_int(self.name, "num_pairs", num_pairs, 1)
        require_number(self.name, "power_a", power_a, 0.0)
        require_seed(self.name, "seed", seed)
        if 4 * num_pairs > seq_len:
            raise SeqmixError(
                f"{self.name}: num_pairs={num_pairs} is not valid for seq_len={seq_len}; expected "
                f"4 * num_pairs <= seq_len (2 tokens per pair and 2 per query)"
            )
        if num_pairs > vocab_size // 2 - 1:
            raise SeqmixError(
                f"{self.name}: num_pairs={num_pairs} is not valid for vocab_size={vocab_size}; expected at most "
                f"vocab_size // 2 - 1 = {vocab_size // 2 - 1} (distinct keys from the lower half without token 0)"
            )
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.num_pairs = num_pairs
        self.power_a = power_a
        self.seed = seed
        slots = (seq_len - 2 * num_pairs) // 2
        # The constant factor a of a·gap^(a−1) cancels when multinomial normalises the weights, and so
        # does dividing every gap by the largest: (gap / slots)^(a−1) is at most 1 for a >= 1, where
        # gap^(a−1) overflowed to infinity (power_a=160 at seq_len=256) and the first batch failed
        # inside torch.multinomial.
        gaps = torch.arange(1, slots + 1, dtype=torch.float64)
        self.slot_weights = (gaps / (slots if power_a >= 1 else 1)).pow(power_a - 1)
        usable = int((self.slot_weights > 0).sum())
        if usable < num_pairs or not bool(torch.isfinite(self.slot_weights).all()):
            raise SeqmixError(
                f"{self.name}: power_a={power_a!r} leaves {usable} of the {slots} query slots a weight a float64 holds "
                f"(gap^(power_a - 1)), fewer than num_pairs={num_pairs}; lower power_a"
            )

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        check_request(self.name, split, index, batch_size, self.seq_len)
        generator = generator_for(self.seed, split, index)
        half, pairs = self.vocab_size // 2, self.num_pairs
        # The top-K of i.i.d. uniforms is a uniform draw of K distinct indices per row.
        keys = torch.rand(batch_size, half - 1, generator=generator).topk(pairs).indices + 1
        values = torch.rand(batch_size, self.vocab_size - half, generator=generator).topk(pairs).indices + half
        slots = torch.multinomial(self.slot_weights.expand(batch_size, -1), pairs, replacement=False,
                                  generator=generator)
        inputs = torch.full((batch_size, self.seq_len), FILLER, dtype=torch.long)
        inputs[:, 0:2 * pairs:2] = keys
        inputs[:, 1:2 * pairs:2] = values
        queries = 2 * pairs + 2 * slots
        inputs.scatter_(1, queries, keys)
        targets = torch.full_like(inputs, IGNORE).scatter_(1, queries, values)
        return Batch(inputs, targets)
