"""JSON read from files someone else may have written: every malformed text raises ValueError.

``json.loads`` raises ``RecursionError`` instead, a RuntimeError no reader expects, for arrays or
objects nested deeper than Python's recursion limit (a file of 100,000 ``[`` is enough), so one
such run record, checkpoint pointer, pretrained config or corpus line ended a command with a
traceback. Every reader of those files parses with ``parse_json``, and its ``except ValueError``
covers them all.
"""
from __future__ import annotations

import json
import math


def parse_json(text: str | bytes):
    """``json.loads(text)``; a ValueError for any text that is not JSON it can read, nesting too
    deep included (``json.JSONDecodeError`` and ``UnicodeDecodeError`` are ValueErrors already)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


def strict_json(value, **options) -> str:
    """``json.dumps(value)`` that every JSON parser reads: a NaN or infinity (which Python writes as
    the bare words NaN and Infinity, outside JSON, and jq refuses) becomes null, at any depth."""
    def plain(item):
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: plain(entry) for key, entry in item.items()}
        if isinstance(item, (list, tuple)):
            return [plain(entry) for entry in item]
        return item

    return json.dumps(plain(value), allow_nan=False, **options)
