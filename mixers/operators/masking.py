"""Non-finite values and masks: select masked-out positions away, never multiply them by zero.

A dense product over positions (attention weights · values, a Toeplitz matrix · inputs, an FFT)
multiplies every position by every other; where a position is masked out its factor is 0, and
0 · NaN = NaN, 0 · inf = NaN. One NaN or infinity at position t would then reach outputs it must
not reach: those before t in a causal mixer, those in other chunks, those that only see padding.
So the fast paths zero the rows that hold a non-finite number before the product and afterwards
mark as NaN exactly the outputs that do see one. Outputs that see none are then bit for bit what
they are without it, and outputs that do are never laundered into finite numbers.

Finding the non-finite values costs a pass over the tensors and the selection several more, so eager
code asks ``all_finite`` first and takes the plain path when there is nothing to select away (the
usual case); compiled and exported graphs cannot branch on values and always take the selecting path.

Shapes: (..., T, W) rows of width W at T positions; ``bad`` and ``reached`` are (..., T) bool.
"""
from __future__ import annotations

import torch
from torch import Tensor


def all_finite(*tensors: Tensor) -> bool:
    """True when running eagerly and every value of ``tensors`` is finite; always False while compiling or exporting.

    Tests the sum, one reduction without a temporary (30× cheaper than ``isfinite(t).all()``): a NaN
    or infinity anywhere makes it non-finite. A sum that overflows from finite values only sends the
    caller down the selecting path, which is correct for any input.
    """
    if torch.compiler.is_compiling():
        return False
    return all(bool(torch.isfinite(tensor.sum())) for tensor in tensors)


def split_nonfinite(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Rows (..., T, W) with every row that holds a NaN or infinity set to 0, and which rows those were (..., T)."""
    # 0·x is 0 for a finite x and NaN for a NaN or an infinity, so the row sums of 0·rows are NaN
    # exactly at the bad rows and cannot overflow: two passes where isfinite(rows).all(-1) takes
    # several, which an exported graph's runtime runs with generic kernels.
    bad = torch.isnan((rows * 0).sum(-1))
    return rows.masked_fill(bad.unsqueeze(-1), 0.0), bad


def seen_by(visible: Tensor, bad: Tensor) -> Tensor:
    """Which queries see a bad key: ``visible`` (..., Tq, Tk) bool (broadcasting), ``bad`` (..., Tk) -> (..., Tq)."""
    return (visible & bad.unsqueeze(-2)).any(-1)


def seen_causally(bad: Tensor, dim: int = -1) -> Tensor:
    """Which positions have a bad position at or before them along ``dim`` (time): same shape as ``bad``."""
    return torch.cumsum(bad.to(torch.int32), dim=dim) > 0


def zero_nonfinite(values: Tensor) -> tuple[Tensor, Tensor]:
    """``values`` with every NaN and infinity set to 0, and their marks 0·values: NaN at those, ±0
    elsewhere (same shape), which ``nan_after`` carries forward. Three elementwise passes, where
    ``isfinite`` alone takes four in an exported graph."""
    marks = values * 0
    return values.masked_fill(torch.isnan(marks), 0.0), marks


def nan_after(marks: Tensor, dim: int) -> Tensor:
    """From ``zero_nonfinite``'s marks: NaN at every position at or after a NaN or infinity along
    ``dim`` (time), −0 elsewhere, what to add to a causal path's outputs (x + (−0) is x). A running
    sum carries a NaN forward."""
    return marks.cumsum(dim).abs().neg()


def poison(outputs: Tensor, reached: Tensor) -> Tensor:
    """Outputs (..., T, W) with NaN in every row where ``reached`` (..., T, broadcasting) is True.

    Adds NaN to those rows and −0 to the others (x + (−0) is x, signed zeros included): the
    selection then runs over the (..., T) flags, and the sum over the outputs is a plain broadcast add.
    """
    nan_or_zero = torch.full_like(reached, -0.0, dtype=outputs.dtype).masked_fill(reached, float("nan"))
    return outputs + nan_or_zero.unsqueeze(-1)
