"""Backward passes written out by hand, which autograd cannot differentiate a second time."""
from __future__ import annotations

import functools

import torch

from seqmix.errors import SeqmixError


def first_order(path: str, differentiable: str):
    """Decorate a ``torch.autograd.Function``'s hand-written backward, which runs without autograd.

    A gradient of a gradient through it (``create_graph=True``, which runs the backward with grad
    mode on) raises a SeqmixError naming ``path`` and the paths that take one (``differentiable``).
    torch's ``once_differentiable`` instead returned second derivatives that were missing (None) or
    wrong, without a word, wherever the rest of the graph still carried a gradient.
    """
    def decorate(backward):
        @functools.wraps(backward)
        def checked(ctx, *grads):
            if torch.is_grad_enabled():
                raise SeqmixError(
                    f"{path} takes first derivatives only: its backward is written out by hand, so a gradient of a "
                    f"gradient through it (create_graph=True) cannot be taken; build the mixer with {differentiable}"
                )
            return backward(ctx, *grads)

        return checked

    return decorate
