"""Option and request checks shared by the built-in tasks, so every task words its errors alike."""
from __future__ import annotations

import math

from seqmix.errors import SeqmixError, require_choice, require_int
from seqmix.tasks.base import SPLITS
from seqmix.timing import physical_memory_bytes


def require_number(owner: str, field: str, value, low: float, high: float = math.inf, *, low_inclusive: bool = False,
                   high_inclusive: bool = False) -> None:
    """Raise unless ``value`` is a finite real number in the interval from ``low`` to ``high``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    above = number and (value >= low if low_inclusive else value > low)
    below = number and (value <= high if high_inclusive else value < high)
    if not (above and below):
        interval = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
        raise SeqmixError(f"{owner}: {field}={value!r} is not valid; expected a number in {interval}")


BATCH_BYTES_PER_TOKEN = 8 * 3
"""What a batch holds per token at least: its inputs, targets and mask, as int64 (a mask as wide, to be safe)."""


def check_request(owner: str, split: str, index: int, batch_size: int, seq_len: int) -> None:
    """Raise unless (split, index, batch_size) names a batch of ``seq_len`` tokens per row a task can
    produce, and this machine can hold: batch_size=10**12 was torch's allocator error."""
    require_choice(f"{owner}: split", split, SPLITS)
    require_int(owner, "index", index, 0)
    require_int(owner, "batch_size", batch_size, 1)
    needed = batch_size * seq_len * BATCH_BYTES_PER_TOKEN
    memory = physical_memory_bytes()
    if needed > memory:
        raise SeqmixError(f"{owner}: a batch of batch_size={batch_size} rows of seq_len={seq_len} tokens needs at least "
                          f"{needed / 2**30:,.1f} GiB, more than this machine's {memory / 2**30:,.1f} GiB")
