"""``torch.compile`` (and torch-tensorrt) over a seqmix model's ``forward`` and ``step``.

``compile_model`` returns a ``CompiledModel``: an ``nn.Module`` holding the original model, with
``forward`` and ``step`` compiled separately. It owns no parameters of its own, so an optimizer
built on either module trains the same weights.

``graph_breaks`` and ``explain_model`` list where TorchDynamo splits a function into several
graphs; a preset should show none (each break costs a return to Python and blocks fusion).

With Inductor, ``compile_model`` first switches mixers to the paths Inductor compiles best (each
mixer's ``lowered_impls["inductor"]``), e.g. the TCN's ``taps``, which fuse into one kernel per layer, forward and
backward, where ``conv`` stays a library call (``seqmix bench "bench.mixers=[tcn/taps,tcn/conv]"`` measures both).

Two workarounds for torch 2.13's Inductor are applied when ``backend="inductor"``; both concern
the ``scan`` that ``seqmix.operators.recurrence`` uses under compilation to carry the EMA/CEMA state across
chunks. Inductor rewrites ``scan`` into a ``while_loop`` in a post-grad pass, and that rewrite
1. reads its loop index with ``.item()``, which the fake tensors refuse unless Dynamo was allowed
   to capture scalar outputs (it is, automatically, only with ``fullgraph=True``); and
2. insists that each loop-carried tensor keeps its strides from one iteration to the next, while
   a combine function (autograd's backward one above all) may return the carry in another
   layout, failing with "Expected carried_inputs and body_output to have same metadata".
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.utils._pytree import tree_map_only

from seqmix import SeqmixError
from seqmix.contract import switch_impls
from seqmix.errors import is_choice, require_bool, require_module

BACKENDS = ("inductor", "aot_eager", "eager", "tensorrt")
TENSORRT_INSTALL = "pip install torch-tensorrt (needs an NVIDIA GPU and the torch version it pins)"
"""impl -> the path ``compile_model`` uses instead with Inductor (``switch_paths=True``)."""


class AlignScanCarries(CustomGraphPass):
    """Inductor post-grad pre-pass: keep every ``scan`` carry contiguous on both sides of the loop.

    For each ``scan`` node of a graph, the initial carries get a contiguous copy where their
    recorded layout is another one, and the combine subgraph returns contiguous copies of its
    next carries. Inductor's ``scan`` → ``while_loop`` rewrite then sees the same strides going
    in and out whatever layout the combine's arithmetic produces. The price is at most one copy
    of each carry, (B, D, N), per chunk.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        aligned_combines = set()
        for node in graph.find_nodes(op="call_function", target=torch.ops.higher_order.scan):
            combine_attr, init, *rest = node.args
            # Scans may share one combine subgraph; its outputs need aligning once.
            if combine_attr.target not in aligned_combines:
                aligned_combines.add(combine_attr.target)
                combine = getattr(graph.owning_module, combine_attr.target)
                self._contiguous_outputs(combine.graph, count=len(init))
                combine.recompile()
            aligned = [
                value if value.meta["val"].is_contiguous() else _contiguous_copy(graph, value, before=node)
                for value in init
            ]
            node.args = (combine_attr, aligned, *rest)

    @staticmethod
    def _contiguous_outputs(graph: torch.fx.Graph, count: int) -> None:
        """Replace the first ``count`` outputs of ``graph`` (the next carries) by contiguous copies."""
        output = graph.output_node()
        values = list(output.args[0])
        values[:count] = [_contiguous_copy(graph, value, before=output) for value in values[:count]]
        output.args = (type(output.args[0])(values),)

    def uuid(self) -> bytes:
        # Inductor's FX graph cache keys compiled graphs on this: any edit to the pass changes it.
        return get_hash_for_files((__file__,))


def _contiguous_copy(graph: torch.fx.Graph, value: torch.fx.Node, before: torch.fx.Node) -> torch.fx.Node:
    """A node computing ``value.clone(memory_format=contiguous)``, with its fake value recorded."""
    with graph.inserting_before(before):
        copy = graph.call_function(
            torch.ops.aten.clone.default, (value,), {"memory_format": torch.contiguous_format}
        )
    # Later passes (and the scan rewrite itself) read shapes and strides from meta["val"].
    copy.meta["val"] = torch.ops.aten.clone.default(value.meta["val"], memory_format=torch.contiguous_format)
    return copy


class CompiledModel(nn.Module):
    """A model with ``forward`` and ``step`` compiled separately, sharing the model's parameters.

    Args:
        model: a ``SequenceModel`` (anything with ``forward(tokens, padding_mask)``, ``step`` and
            ``init_state``).
        compiler: ``torch.compile`` with its options bound, applied to each bound method.
        call_config: Dynamo settings active during every call (they are read when a call compiles).
    Attributes:
        model: the original model; its parameters are this module's parameters.
    """

    def __init__(self, model: nn.Module, compiler, call_config: dict[str, Any]):
        super().__init__()
        self.model = model
        self._forward = compiler(model.forward)
        self._step = compiler(model.step)
        self._call_config = call_config

    @property
    def causal(self) -> bool:
        """True when the model can stream with ``step``."""
        return self.model.causal

    def forward(self, tokens: Tensor, padding_mask: Tensor | None = None, output_index: Tensor | None = None) -> Tensor:
        """Token ids (B, L) and an optional padding mask (B, L) bool -> logits (B, L, V) or (B, classes);
        (N, V) at ``output_index`` (N,) as in ``SequenceModel.forward``."""
        with torch._dynamo.config.patch(self._call_config):
            return self._forward(tokens, padding_mask, output_index)

    def init_state(self, batch_size: int, device=None, dtype=None):
        """The model's state before any token (built eagerly: it is only zeros)."""
        return self.model.init_state(batch_size, device, dtype)

    def step(self, tokens: Tensor, state):
        """Continue a stream by tokens (B, T) -> (logits (B, T, V), new state), as ``model.step``."""
        # Dynamo guards on input strides, and some mixers return state views (the TCN's windows
        # are slices of a longer buffer): without this the second step recompiles for them.
        # contiguous() returns the tensor itself when it already is.
        state = tree_map_only(Tensor, Tensor.contiguous, state)
        with torch._dynamo.config.patch(self._call_config):
            return self._step(tokens, state)


def compile_model(
    model: nn.Module,
    backend: str = "inductor",
    mode: str | None = None,
    dynamic: bool | None = None,
    fullgraph: bool = False,
    switch_paths: bool = True,
) -> CompiledModel:
    """Compile a model's ``forward`` and ``step`` with ``torch.compile``.

    Args:
        model: a ``SequenceModel`` (e.g. from ``seqmix.instantiate_model``), on the device to run on.
        backend: ``inductor`` (generated kernels), ``aot_eager`` (traced forward and backward run
            by eager kernels: checks tracing without Inductor), ``eager`` (Dynamo only) or
            ``tensorrt`` (torch-tensorrt, CUDA only).
        mode: an Inductor mode (``default``, ``reduce-overhead``, ``max-autotune``, ...); inductor only.
        dynamic: as ``torch.compile``: None marks sizes dynamic once they change, True from the start.
        fullgraph: raise at the first graph break instead of splitting the graph.
        switch_paths: with Inductor, switch the model's mixers to their Inductor paths (``lowered_impls``)
            (on ``model`` itself: the compiled module shares it); False keeps every mixer's path.
    Returns:
        A ``CompiledModel``: ``forward(tokens (B, L), padding_mask=None)`` and
        ``step(tokens (B, T), state) -> (logits (B, T, V), state)`` equal the model's; compilation
        happens at the first call with new shapes.
    """
    require_module("compile_model: model", model)
    if not is_choice(backend, BACKENDS):
        raise SeqmixError(f"compile_model: backend={backend!r} is not valid; expected one of {list(BACKENDS)}")
    if mode is not None and backend != "inductor":
        raise SeqmixError(f"compile_model: mode={mode!r} applies to backend='inductor' only, got backend={backend!r}")
    if dynamic is not None:
        require_bool("compile_model", "dynamic", dynamic)
    require_bool("compile_model", "fullgraph", fullgraph)
    require_bool("compile_model", "switch_paths", switch_paths)
    modes = torch._inductor.list_mode_options()
    if mode is not None and not is_choice(mode, modes):
        raise SeqmixError(f"compile_model: mode={mode!r} is not valid; expected one of {list(modes)}")
    if backend == "tensorrt":
        _require_tensorrt(model)
    # Every argument is checked before the model's paths change: a refused call leaves it as it was.
    options: dict[str, Any] = {"backend": backend, "dynamic": dynamic, "fullgraph": fullgraph}
    call_config: dict[str, Any] = {}
    if backend == "inductor":
        if switch_paths:
            switch_impls(model, "inductor")
        # torch.compile takes a mode or options, never both: spell the mode out as its options.
        options["options"] = {
            **torch._inductor.list_mode_options(mode or "default", dynamic),
            "post_grad_custom_pre_pass": AlignScanCarries(),
        }
        call_config["capture_scalar_outputs"] = True
    return CompiledModel(model, functools.partial(torch.compile, **options), call_config)


def _require_tensorrt(model: nn.Module) -> None:
    """Raise unless torch-tensorrt is importable, a CUDA device exists and the model is on it."""
    try:
        import torch_tensorrt  # noqa: F401  (registers the "tensorrt" torch.compile backend)
    except ImportError as error:
        raise SeqmixError(f"compile_model: backend='tensorrt' needs torch_tensorrt ({error}); {TENSORRT_INSTALL}") from None
    if not torch.cuda.is_available():
        raise SeqmixError(
            "compile_model: backend='tensorrt' needs a CUDA device, and torch sees none "
            "(torch.cuda.is_available() is False); use backend='inductor' on CPUs"
        )
    devices = {parameter.device.type for parameter in model.parameters()}
    if devices != {"cuda"}:
        raise SeqmixError(
            f"compile_model: backend='tensorrt' needs the model on the GPU, its parameters are on {sorted(devices)}; "
            "call model.cuda() first"
        )


def graph_breaks(fn, *args) -> list[str]:
    """Where TorchDynamo breaks ``fn(*args)`` into several graphs: one line per break, [] for one graph.

    Each entry reads ``file:line (function): reason``. ``fn`` runs once (under Dynamo, no backend
    compiler). This resets Dynamo before and after, dropping every compiled graph of the process,
    so models compiled earlier recompile at their next call.
    """
    explanation = torch._dynamo.explain(fn)(*args)
    found = []
    for reason in explanation.break_reasons:
        where = ""
        if reason.user_stack:
            frame = reason.user_stack[-1]
            where = f"{frame.filename}:{frame.lineno} ({frame.name}): "
        found.append(f"{where}{reason.reason}")
    return found


def explain_model(model: nn.Module, tokens: Tensor, state=None) -> dict[str, list[str]]:
    """Graph breaks of a model's ``forward`` on ``tokens`` (B, L) and, when it streams, of ``step``.

    ``step`` is checked on one token per sequence, ``tokens[:, :1]`` (a decoding step), from
    ``state`` or, when None, ``model.init_state(B)``. Returns {"forward": [...], "step": [...]},
    without "step" for bidirectional models or pooling heads; empty lists mean no break.
    """
    report = {"forward": graph_breaks(model.forward, tokens)}
    if model.causal and getattr(model.head, "per_token", False):
        state = model.init_state(tokens.shape[0]) if state is None else state
        report["step"] = graph_breaks(model.step, tokens[:, :1], state)
    return report
