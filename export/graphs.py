"""The two graphs every exporter lowers: the parallel graph and the step graph.

- parallel: (token ids (B, L), padding mask (B, L)) -> logits, L a dynamic multiple of ``length_unit``.
- step: (token ids (B, T), state tensors...) -> (logits (B, T, V), new state tensors...), the
  state flattened into named tensors of fixed shape per sequence, so a device streams with constant
  memory. Both exporters trace it for any T (``contract.any_token_count``): one graph prefills a
  prompt and decodes one token per call. ONNX also leaves B dynamic and takes any T in one call;
  ExecuTorch fixes B and takes up to one chunk per call (``executorch_export``).

State tensors are named per layer and per kind, after the decoder exports of optimum and ONNX
Runtime GenAI: a key/value cache is ``past_key_values.{i}.key`` / ``.value``, every other tensor
``past_state.{i}.<its fields>`` (``past_state.0.local.ema``, ``past_state.2.norm.mean``,
``past_state.0.kv.key_pos``), the model's own ``past_state.final_norm.*`` and ``past_state.pos``;
each output is the input's name with ``past_key_values`` or ``past_state`` replaced by ``present``.

Exporters first switch every mixer to the path it names for export (``use_exportable_paths``;
each mixer's ``lowered_impls["export"]``), e.g. the chunked EMA/CEMA, whose plain matmuls every
backend runs, where the FFT path needs DFT and the recurrent one a loop over L.
"""
from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils._pytree import GetAttrKey, SequenceKey, tree_flatten, tree_flatten_with_path, tree_unflatten

from seqmix.contract import Mixer, switch_impls
from seqmix.errors import SeqmixError


def restores_model(export: Callable) -> Callable:
    """Decorate an exporter whose first argument is the model: it exports in eval mode on the
    exportable paths, and once it returns or raises the model's mode and every mixer's path are
    what they were (an export in the middle of training left dropout off and the mixers switched)."""

    @functools.wraps(export)
    def exported_then_restored(model, *args, **kwargs):
        if not isinstance(model, nn.Module):
            return export(model, *args, **kwargs)
        was_training = model.training
        paths = [(module, module.impl) for module in model.modules() if isinstance(module, Mixer)]
        try:
            return export(model, *args, **kwargs)
        finally:
            for module, impl in paths:
                module.impl = impl
            model.train(was_training)

    return exported_then_restored


def use_exportable_paths(model: nn.Module) -> dict[str, str]:
    """Switch every mixer to the path it runs when exported; return {module name: impl used}."""
    return switch_impls(model, "export")


MAX_TOKENS = 1 << 16
"""The most tokens one stream may take, unless the model holds fewer."""


def stream_limit(model: nn.Module) -> int:
    """The most tokens one stream of ``model`` can take: its ``token_limit`` (its smallest attention
    cache, its learned positions), or ``MAX_TOKENS``."""
    limit = model.token_limit
    return MAX_TOKENS if limit is None else min(MAX_TOKENS, limit)


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


KV_FIELDS = {"keys": "key", "values": "value"}
"""Fields of a key/value cache (``seqmix.operators.kv_cache.KVState``) and the names exports give them."""


def _key_name(key) -> str:
    if isinstance(key, GetAttrKey):
        return key.name
    if isinstance(key, SequenceKey):
        return str(key.idx)
    raise TypeError(f"unexpected state container key {key!r}")


def state_input_names(state) -> list[str]:
    """The graph input name of every tensor of a model's state, in ``tree_flatten`` order (see the module doc)."""
    names = []
    for path, _ in tree_flatten_with_path(state)[0]:
        parts = [_key_name(key) for key in path]
        if parts[0] == "blocks":
            layer, fields = parts[1], parts[2:]
            if fields and fields[-1] in KV_FIELDS:
                names.append(f"past_key_values.{layer}.{KV_FIELDS[fields[-1]]}")
            else:
                names.append(".".join(["past_state", layer, *fields]))
        else:
            names.append(".".join(["past_state", *parts]))
    if len(set(names)) != len(names):
        raise ValueError(f"state names collide: {names}")
    return names


def present_name(input_name: str) -> str:
    """The output name of the state tensor fed as ``input_name``: ``past_*.`` becomes ``present.``."""
    return "present." + input_name.split(".", 1)[1]


class StepGraph(nn.Module):
    """``model.step`` with its state as a flat list of tensors, for exporters.

    Args:
        model: a causal SequenceModel.
        batch_size: B of the state the graph is traced with (the batch dim can stay dynamic).
    Attributes:
        state_names: the input names of the state tensors, in input (and output) order.
        present_names: their output names.
    """

    def __init__(self, model: nn.Module, batch_size: int = 1):
        super().__init__()
        self.model = model
        state = model.init_state(batch_size)
        self._spec = tree_flatten(state)[1]
        self.state_names = state_input_names(state)
        self.present_names = [present_name(name) for name in self.state_names]

    def initial_state(self, batch_size: int) -> list[Tensor]:
        """The flat state before any token."""
        return tree_flatten(self.model.init_state(batch_size))[0]

    def forward(self, tokens: Tensor, *state: Tensor):
        logits, new_state = self.model.step(tokens, tree_unflatten(list(state), self._spec))
        # A state tensor a mixer passes through unchanged is copied: an output that is an input
        # became one value of two names in the ONNX graph, and ONNX Runtime asked for a missing input.
        given = {id(tensor) for tensor in state}
        return (logits, *(tensor.clone() if id(tensor) in given else tensor for tensor in tree_flatten(new_state)[0]))


STREAM_CALLS = (1, 3, 2)
"""Tokens per ``step`` call of the stream ``require_stream_matches_forward`` compares with one forward."""


def require_stream_matches_forward(model: nn.Module, what: str) -> None:
    """Raise unless ``model.step`` over a stream (calls of ``STREAM_CALLS`` tokens, B = 2) gives the
    logits one ``forward`` gives over the same tokens, to 1e-3 of their scale. A decoder graph is
    verified against eager ``step``: a mixer whose ``mix_step`` is not its ``mix`` streamed (a user's
    registered one) shipped a decoder that disagreed with the parallel graph, reported as verified."""
    calls, limit = [], stream_limit(model)
    for count in STREAM_CALLS:
        if sum(calls) + count <= limit:
            calls.append(count)
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, model.vocab_size, (2, sum(calls)), generator=generator)
    with torch.no_grad():
        whole = model(tokens)
        state, pieces = model.init_state(2), []
        for piece in tokens.split(calls, dim=1):
            logits, state = model.step(piece, state)
            pieces.append(logits)
    streamed = torch.cat(pieces, dim=1)
    difference = (streamed - whole).abs().nan_to_num(float("inf")).max().item()
    if difference > 1e-3 * max(1.0, whole.abs().max().item()):
        layers = sorted({type(block.mixer).__name__ for block in getattr(model, "blocks", [])})
        raise SeqmixError(f"{what}: the model's step over a stream gives other logits than its forward over the same "
                          f"tokens (max difference {difference:.3g}); a mixer's mix_step is not its mix streamed "
                          f"(mixers: {layers}), so no decoder graph is written")
