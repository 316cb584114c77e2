"""How far an exported graph's outputs are from eager's: the one measure every verification uses.

A NaN compares false with everything, so a maximum taken with Python's ``max`` or compared with
``<=`` let a NaN output pass as agreement (an ExecuTorch program whose logits were NaN verified
with error 0), and numpy's ``nanargmax`` raised on an all-NaN difference. Here a non-finite eager
output is refused (there is nothing to compare with) and a non-finite exported one is an infinite error.
"""
from __future__ import annotations

import numpy as np

from seqmix.errors import SeqmixError


def as_array(values) -> np.ndarray:
    """A tensor (any device, any dtype) or array as a float64 NumPy array."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def first_index(where: np.ndarray) -> tuple[int, ...]:
    """The index of the first True of ``where``."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(where)), where.shape))


def max_difference(reference, result, what: str) -> float:
    """max |reference − result| (inf where ``result`` is not finite but ``reference`` is).

    Raises SeqmixError when ``reference`` (eager's outputs, named by ``what``) is not finite.
    """
    reference, result = as_array(reference), as_array(result)
    if not np.isfinite(reference).all():
        raise SeqmixError(f"{what}: the model's own (eager) outputs are not finite (at index {first_index(~np.isfinite(reference))}); "
                          "its weights give NaN or infinity, so there is nothing to verify the export against")
    difference = np.abs(reference - result)
    return float(difference.max()) if np.isfinite(difference).all() else float("inf")
