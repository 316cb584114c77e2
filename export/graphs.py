"""The two graphs every exporter lowers: the parallel graph and the step graph.

- parallel: (token ids (B, L), padding mask (B, L)) -> logits, L a dynamic multiple of ``length_unit``.
- step: (token ids (B, T), state tensors...) -> (logits (B, T, V), new state tensors...), the
  state flattened into named tensors of fixed shape, so a device streams with constant memory.

Exporters first switch every mixer to a path each backend can run, and runs well
(``use_exportable_paths``): the chunked EMA/CEMA (plain matmuls; the FFT path needs DFT, the
recurrent one a loop over L), and the TCN's ``conv`` (one ``Conv`` node per layer, faster in ONNX
Runtime than the ``taps`` path's K slices and products).
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from seqmix.contract import switch_impls
from seqmix.ema import steps_recurrently

EXPORTABLE_IMPLS = {"recurrent": "chunked", "fft": "chunked", "taps": "conv"}


def largest_chunk(model: nn.Module) -> int:
    """The least common multiple of every chunk size in the model (1 when there is none).

    Declaring the exported length as a multiple of it means no mixer pads inside the graph.
    """
    import math

    unit = 1
    for module in model.modules():
        size = getattr(module, "chunk_size", None)
        if isinstance(size, int):
            unit = math.lcm(unit, size)
    return unit


def use_exportable_paths(model: nn.Module) -> dict[str, str]:
    """Switch every mixer whose impl exporters do not run to the path they do (``EXPORTABLE_IMPLS``);
    return {module name: impl used}."""
    return switch_impls(model, EXPORTABLE_IMPLS)


def stepwise_recurrences(model: nn.Module, tokens_per_step: int) -> dict[str, str]:
    """{module name: "recurrent"} for every chunked recurrence that a step of ``tokens_per_step``
    tokens runs on its recurrent loop (``seqmix.ema.steps_recurrently``), for manifests."""
    return {
        name: "recurrent"
        for name, module in model.named_modules()
        if "recurrent" in getattr(type(module), "impls", ())
        and steps_recurrently(getattr(module, "impl", None), tokens_per_step, getattr(module, "chunk_size", 0))
    }


@contextmanager
def quiet_exporters():
    """Silence the exporters' progress and warning logs (missing torchvision, deprecations inside
    torch, notes on dynamic axis names): lines on every export that ask nothing of the user.
    Errors still raise."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "executorch")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextmanager
def size_oblivious():
    """Let export treat sizes seen as > 1 as possibly 1 (otherwise batch size 1 gets refused).

    Dynamo's caches are cleared first: a scan traced by an earlier export at a fixed batch size
    was otherwise reused and brought its batch guard into this dynamic export (torch 2.13).
    """
    import torch.fx.experimental._config as fx_config

    torch._dynamo.reset()
    with fx_config.patch(backed_size_oblivious=True):
        yield


class ParallelGraph(nn.Module):
    """``model.forward`` with an explicit padding mask input, for exporters.

    forward(tokens (B, L) long, padding_mask (B, L) bool, True at padding) -> model output.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, padding_mask: Tensor):
        return self.model(tokens, padding_mask)


class StepGraph(nn.Module):
    """``model.step`` with its state as a flat list of tensors, for exporters.

    Args:
        model: a causal SequenceModel.
        batch_size: B of the state the graph is traced with (the batch dim can stay dynamic).
    Attributes:
        state_names: the names of the state tensors, in input (and output) order.
    """

    def __init__(self, model: nn.Module, batch_size: int = 1):
        super().__init__()
        self.model = model
        leaves, self._spec = tree_flatten(model.init_state(batch_size))
        self.state_names = [f"state_{i}" for i in range(len(leaves))]

    def initial_state(self, batch_size: int) -> list[Tensor]:
        """The flat state before any token."""
        return tree_flatten(self.model.init_state(batch_size))[0]

    def forward(self, tokens: Tensor, *state: Tensor):
        logits, new_state = self.model.step(tokens, tree_unflatten(list(state), self._spec))
        return (logits, *tree_flatten(new_state)[0])
