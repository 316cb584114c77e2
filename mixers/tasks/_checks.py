"""Option and request checks shared by the built-in tasks, so every task words its errors alike."""
from __future__ import annotations

import math

from seqmix.errors import SeqmixError, require_choice, require_int
from seqmix.tasks.base import SPLITS


def require_number(owner: str, field: str, value, low: float, high: float = math.inf, *, low_inclusive: bool = False,
                   high_inclusive: bool = False) -> None:
    """Raise unless ``value`` is a finite real number in the interval from ``low`` to ``high``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    above = number and (value >= low if low_inclusive else value > low)
    below = number and (value <= high if high_inclusive else value < high)
    if not (above and below):
        interval = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
        raise SeqmixError(f"{owner}: {field}={value!r} is not valid; expected a number in {interval}")


def check_request(owner: str, split: str, index: int, batch_size: int) -> None:
    """Raise unless (split, index, batch_size) names a batch a task can produce."""
    require_choice(f"{owner}: split", split, SPLITS)
    require_int(owner, "index", index, 0)
    require_int(owner, "batch_size", batch_size, 1)
