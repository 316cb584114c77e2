"""ExecuTorch export of a seqmix model: the parallel graph and the step graph, lowered to XNNPACK.

- parallel: token ids (B, L) -> logits (B, L, V) (or the head's output), at one fixed (B, L).
  ExecuTorch takes bounded shapes only, so the length is chosen at export; a multiple of
  ``length_unit(model)`` leaves no chunk padded inside the graph.
- step: (token ids (B, T), state_0 ... state_k) -> (logits (B, T, V), new state_0 ... new
  state_k), every state tensor of fixed shape: what an edge device runs to stream. An EMA/CEMA
  whose chunk is longer than T runs its recurrent path there (T unrolled steps) rather than a
  chunk padded from T to C: measured 19x (megalodon) to 130x (ema_conv) faster per call at T=1.

Both go torch.export -> ``to_edge_transform_and_lower`` with the XNNPACK partitioner ->
``.to_executorch()`` -> a .pte file, which ``run_pte`` runs on CPU through ``executorch.runtime``.
Operators XNNPACK does not take stay on ExecuTorch's portable kernels; the manifest counts both.
"""
from __future__ import annotations

import operator
import traceback
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

import seqmix
from seqmix import SeqmixError
from seqmix.operators import recurrence
from seqmix.errors import require_int

from .graphs import StepGraph, quiet_exporters, stepwise_recurrences, use_exportable_paths

INSTALL_HINT = "pip install executorch==1.5.1"
LIBRARY_DIR = Path(seqmix.__file__).resolve().parent
EXPORT_DIR = Path(__file__).resolve().parent
SCALAR_TYPES = {3: torch.int32, 4: torch.int64, 5: torch.float16, 6: torch.float32, 7: torch.float64, 11: torch.bool, 15: torch.bfloat16}
"""ExecuTorch's ScalarType codes (c10's numbering), as ``MethodMeta`` reports input dtypes."""


def _require_executorch():
    """(to_edge_transform_and_lower, XnnpackPartitioner), or a SeqmixError saying how to install them."""
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as error:
        raise SeqmixError(f"ExecuTorch export needs executorch ({error}): {INSTALL_HINT}") from None
    return to_edge_transform_and_lower, XnnpackPartitioner


def _runtime():
    """The ExecuTorch runtime singleton, or a SeqmixError saying how to install it."""
    try:
        from executorch.runtime import Runtime
    except ImportError as error:
        raise SeqmixError(f"running a .pte needs executorch ({error}): {INSTALL_HINT}") from None
    return Runtime.get()


def _describe(model: nn.Module) -> str:
    """The model's layers and mixers, for error messages, e.g. "layers ['mega'] (GatedAttention(local=EMA))"."""
    mixer_names = []
    for block in getattr(model, "blocks", ()):
        mixer = block.mixer
        local = getattr(mixer, "local", None)
        name = type(mixer).__name__ + (f"(local={type(local).__name__})" if isinstance(local, nn.Module) else "")
        if name not in mixer_names:
            mixer_names.append(name)
    layers = getattr(model, "config", {}).get("layers")
    prefix = f"the model with layers {layers}" if layers else f"the {type(model).__name__}"
    return f"{prefix} ({', '.join(mixer_names) or 'no mixers'})"


def _where_in_library(error: BaseException) -> str:
    """' at seqmix/<file>:<line> in <function>: <code>' for the innermost frame in the library (not this exporter), else ''."""
    frames = [
        f for f in traceback.extract_tb(error.__traceback__)
        if Path(f.filename).resolve().is_relative_to(LIBRARY_DIR) and not Path(f.filename).resolve().is_relative_to(EXPORT_DIR)
    ]
    if not frames:
        return ""
    frame = frames[-1]
    where = Path(frame.filename).resolve().relative_to(LIBRARY_DIR).as_posix()
    return f" at seqmix/{where}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"


def _delegation(graph_module: torch.fx.GraphModule) -> dict:
    """Operators inside XNNPACK delegates vs all operators of a lowered edge graph.

    Tuple indexing (``getitem``) runs no kernel and is not counted.
    """
    from executorch.exir.delegate import executorch_call_delegate

    delegated = outside = subgraphs = 0
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        if node.target is executorch_call_delegate:
            subgraphs += 1
            lowered = getattr(graph_module, node.args[0].target)
            delegated += sum(
                n.op == "call_function" and n.target is not operator.getitem for n in lowered.original_module.graph.nodes
            )
        else:
            outside += 1
    return {"delegated_nodes": delegated, "total_nodes": delegated + outside, "delegated_subgraphs": subgraphs}


def _spec(names: list[str], values) -> list[dict]:
    return [{"name": n, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for n, v in zip(names, values)]


def lower_to_pte(graph: nn.Module, example: tuple[Tensor, ...], path: str | Path, model: nn.Module, what: str):
    """Export ``graph`` at ``example``, lower it to XNNPACK and write the .pte to ``path``.

    ``model`` and ``what`` name the model and the graph in the error raised when lowering fails.
    Returns the graph's outputs as traced (fake tensors: shape and dtype) and the delegation counts.
    """
    to_edge_transform_and_lower, XnnpackPartitioner = _require_executorch()
    path = Path(path)
    try:
        with torch.no_grad(), recurrence.unrolled_chunks(), quiet_exporters():
            program = torch.export.export(graph, example)
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            lowered = edge.to_executorch()
    except SeqmixError:
        raise
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise SeqmixError(
            f"ExecuTorch: the {what} of {_describe(model)} could not be lowered{_where_in_library(error)}: "
            f"{type(error).__name__}: {reason}"
        ) from error
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        lowered.write_to_file(handle)
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    traced_outputs = [arg.meta["val"] for arg in output_node.args[0]]
    return traced_outputs, _delegation(edge.exported_program().graph_module)


def export_parallel_pte(model: nn.Module, path: str | Path, length: int, batch_size: int = 1) -> dict:
    """Write the parallel graph, token ids (batch_size, length) -> model output, as a .pte.

    The model is put in eval mode and switched to its exportable paths (``use_exportable_paths``).

    Args:
        model: a SequenceModel.
        path: the .pte file to write.
        length: L, fixed in the graph (ExecuTorch has no dynamic length here); best a multiple of
            ``length_unit(model)``, and at most ``max_len`` with learned positions.
        batch_size: B, fixed in the graph.
    Returns:
        The manifest entry: file, inputs and outputs (name, shape, dtype), length, batch_size,
        the impl of every mixer, and the operators delegated to XNNPACK (``delegated_nodes`` of
        ``total_nodes``).
    """
    require_int("export_parallel_pte", "length", length)
    require_int("export_parallel_pte", "batch_size", batch_size)
    model.eval()
    impls = use_exportable_paths(model)
    tokens = torch.zeros(batch_size, length, dtype=torch.long)
    outputs, delegation = lower_to_pte(model, (tokens,), path, model, f"parallel graph (B={batch_size}, L={length})")
    return {
        "file": Path(path).name,
        "inputs": _spec(["tokens"], [tokens]),
        "outputs": _spec(["logits"], outputs),
        "length": length,
        "batch_size": batch_size,
        "impls": impls,
        **delegation,
    }


def export_step_pte(model: nn.Module, path: str | Path, batch_size: int = 1, tokens_per_step: int = 1) -> dict:
    """Write the step graph, (token ids (B, T), state...) -> (logits (B, T, V), new state...), as a .pte.

    The model is put in eval mode and switched to its exportable paths (``use_exportable_paths``);
    while tracing, recurrences with a chunk longer than T run their recurrent path instead.

    Args:
        model: a causal SequenceModel with a per-token head.
        path: the .pte file to write.
        batch_size: B, fixed in the graph and in every state tensor.
        tokens_per_step: T, tokens per call, fixed in the graph.
    Returns:
        The manifest entry: file, inputs, outputs and state (name, shape, dtype), batch_size,
        tokens_per_step, the impl of every mixer in the graph, and the operators delegated to
        XNNPACK (``delegated_nodes`` of ``total_nodes``).
    """
    require_int("export_step_pte", "batch_size", batch_size)
    require_int("export_step_pte", "tokens_per_step", tokens_per_step)
    if not getattr(model, "causal", False):
        raise SeqmixError(
            f"export_step_pte: {_describe(model)} has bidirectional layers, so it cannot stream and has no "
            "step graph; export its parallel graph with export_parallel_pte"
        )
    model.eval()
    impls = use_exportable_paths(model)
    graph = StepGraph(model, batch_size)
    state = graph.initial_state(batch_size)
    tokens = torch.zeros(batch_size, tokens_per_step, dtype=torch.long)
    what = f"step graph (B={batch_size}, T={tokens_per_step})"
    switched = stepwise_recurrences(model, tokens_per_step)
    outputs, delegation = lower_to_pte(graph, (tokens, *state), path, model, what)
    return {
        "file": Path(path).name,
        "inputs": _spec(["tokens", *graph.state_names], [tokens, *state]),
        "outputs": _spec(["logits", *graph.present_names], outputs),
        "state": _spec(graph.state_names, state),
        "batch_size": batch_size,
        "tokens_per_step": tokens_per_step,
        "impls": {**impls, **switched},
        **delegation,
    }


def load_pte_method(path: str | Path):
    """The ``forward`` method of a .pte file, loaded once for repeated calls."""
    path = Path(path)
    if not path.is_file():
        raise SeqmixError(f"run_pte: {path} does not exist; write it with export_parallel_pte or export_step_pte")
    return _runtime().load_program(path).load_method("forward")


def _input_name(index: int) -> str:
    return "tokens" if index == 0 else f"state_{index - 1}"


def _check_inputs(method, inputs: tuple[Tensor, ...], vocab_size: int | None) -> None:
    """Raise a SeqmixError naming the input unless ``inputs`` match the program's count, shapes and
    dtypes (and, given ``vocab_size``, the token ids lie in [0, vocab_size)); the runtime's own
    errors name neither the input nor what it expected."""
    meta = method.metadata
    expected = [tuple(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]
    got = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in inputs]
    if len(inputs) != len(expected):
        raise SeqmixError(
            f"run_pte: the program takes {len(expected)} inputs (tokens, then the state) of shapes {expected}, got "
            f"{len(inputs)}: {got}; was the state built for another model?"
        )
    for index, (tensor, shape) in enumerate(zip(inputs, expected)):
        name = _input_name(index)
        if not isinstance(tensor, Tensor):
            raise SeqmixError(f"run_pte: input {index} ({name}) is a {type(tensor).__name__}; expected a torch.Tensor of shape {shape}")
        if tuple(tensor.shape) != shape:
            raise SeqmixError(
                f"run_pte: input {index} ({name}) has shape {tuple(tensor.shape)}, but the program takes inputs of shapes "
                f"{expected}; was the state built for another model or batch size?"
            )
        dtype = SCALAR_TYPES.get(meta.input_tensor_meta(index).dtype())
        if dtype is not None and tensor.dtype != dtype:
            raise SeqmixError(f"run_pte: input {index} ({name}) has dtype {tensor.dtype}, the program takes {dtype}")
    tokens = inputs[0]
    if vocab_size is not None and tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < vocab_size:
        raise SeqmixError(
            f"run_pte: token ids must lie in [0, vocab_size={vocab_size}), got ids from {int(tokens.min())} to {int(tokens.max())}"
        )


def _execute(method, inputs: tuple[Tensor, ...], vocab_size: int | None = None) -> list[Tensor]:
    """Run ``method`` after ``_check_inputs``."""
    _check_inputs(method, inputs, vocab_size)
    return list(method.execute([t.contiguous() for t in inputs]))


def run_pte(path: str | Path, *inputs: Tensor, vocab_size: int | None = None) -> list[Tensor]:
    """Run a .pte file's ``forward`` on CPU through ``executorch.runtime``.

    Args:
        path: a file written by ``export_parallel_pte`` or ``export_step_pte``.
        inputs: the tensors in the program's input order, exact shapes and dtypes (token ids
            int64, then the state tensors of a step program).
        vocab_size: V, when known (the manifest's ``vocab_size``): token ids outside [0, V) are
            refused instead of failing inside the runtime.
    Returns:
        The outputs, e.g. [logits] or [logits, new state...].
    """
    return _execute(load_pte_method(path), inputs, vocab_size)


def pte_runner(path: str | Path, vocab_size: int | None = None):
    """``runner(*inputs) -> outputs`` over a .pte loaded once, for repeated calls (latency, streaming).

    Inputs are checked as ``run_pte`` checks them.
    """
    method = load_pte_method(path)
    return lambda *inputs: _execute(method, inputs, vocab_size)


def verify_pte_parallel(model: nn.Module, path: str | Path, length: int, batch_size: int = 1, trials: int = 2) -> float:
    """Max |eager − .pte| over the outputs for ``trials`` batches of random token ids (batch_size, length)."""
    method = load_pte_method(path)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(trials):
        tokens = torch.randint(0, model.vocab_size, (batch_size, length), generator=generator)
        with torch.no_grad():
            expected = model(tokens)
        worst = max(worst, (_execute(method, (tokens,), model.vocab_size)[0] - expected).abs().max().item())
    return worst


def verify_pte_step(model: nn.Module, path: str | Path, steps: int = 8) -> float:
    """Max |eager ``model.step`` − .pte| over the logits of a stream of ``steps`` calls.

    The .pte's state outputs are fed back as its next state inputs, as a device would; batch
    size and tokens per call are read from the program.
    """
    method = load_pte_method(path)
    batch_size, tokens_per_step = method.metadata.input_tensor_meta(0).sizes()
    generator = torch.Generator().manual_seed(1)
    eager_state = model.init_state(batch_size)
    state = tree_flatten(model.init_state(batch_size))[0]
    worst = 0.0
    for _ in range(steps):
        tokens = torch.randint(0, model.vocab_size, (batch_size, tokens_per_step), generator=generator)
        with torch.no_grad():
            expected, eager_state = model.step(tokens, eager_state)
        logits, *state = _execute(method, (tokens, *state), model.vocab_size)
        worst = max(worst, (logits - expected).abs().max().item())
    return worst
