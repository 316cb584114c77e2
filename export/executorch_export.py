"""ExecuTorch export of a seqmix model: the parallel graph and the step graph, lowered to XNNPACK.

- parallel: token ids (B, L) -> logits (B, L, V) (or the head's output), at one fixed (B, L).
  ExecuTorch takes bounded shapes only, so the length is chosen at export; a multiple of
  ``length_unit(model)`` leaves no chunk padded inside the graph.
- decoder (``step.pte``): (input_ids (B, T), state...) -> (logits (B, T, V), new state...), the
  state tensors named as in ONNX (``past_key_values.{i}.key``, ``past_state.{i}.ema``, ...; see
  ``graphs``) and of fixed shape: what an edge device runs to stream. One program prefills a prompt
  and decodes: T is dynamic, from 1 to ``decoder_token_limit`` (memory is planned for the largest
  call); B is fixed at export, because XNNPACK reshapes take one dynamic dimension. The chunk loop
  is unrolled (a scan would leave XNNPACK), so a call may hold one chunk of an EMA/CEMA at most:
  the call is the chunk, with no padding, and a decode step costs one token. Longer prompts are
  fed in calls of at most that many tokens.

Both go torch.export -> ``to_edge_transform_and_lower`` with the XNNPACK partitioner ->
``.to_executorch()`` -> a .pte file, which ``run_pte`` runs on CPU through ``executorch.runtime``.
Operators XNNPACK does not take stay on ExecuTorch's portable kernels; the manifest counts both.

With ``quantize="int8"`` the exported graph first goes through the XNNPACK quantizer (torchao's
PT2E flow): every linear and convolution gets int8 weights, symmetric per output channel, and
int8 activations quantized per call (dynamic: no calibration data). Embedding tables (tokens,
learned positions) become int8 rows with one scale each (``Int8Embedding``), read by ExecuTorch's
quantized ``embedding_byte`` kernel. Everything else (norms, attention's activation x activation
matmuls, the EMA's kernels and carry) stays float32. ``compare_pte_variant`` measures what that
buys: size, latency and the task's metric.
"""
from __future__ import annotations

import copy
import operator
import traceback
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

import seqmix
from seqmix import SeqmixError
from seqmix.operators import recurrence
from seqmix.errors import not_a_file, one_line, require_int, kind_of
from seqmix.tasks.base import IGNORE, Batch
from seqmix.timing import summarize, time_once

from .graphs import (StepGraph, quiet_exporters, require_stream_matches_forward, restores_model, size_oblivious, stream_limit,
                     use_exportable_paths)
from .agreement import max_difference
from .manifest import initial_fill, verify_in_export

INSTALL_HINT = "pip install executorch==1.5.1"
LIBRARY_DIR = Path(seqmix.__file__).resolve().parent
EXPORT_DIR = Path(__file__).resolve().parent
SCALAR_TYPES = {3: torch.int32, 4: torch.int64, 5: torch.float16, 6: torch.float32, 7: torch.float64, 11: torch.bool, 15: torch.bfloat16}
"""ExecuTorch's ScalarType codes (c10's numbering), as ``MethodMeta`` reports input dtypes."""
QUANTIZATIONS = ("int8",)
"""The ``quantize`` values a .pte takes besides None (float32)."""
INT8_TOLERANCE = 0.1
"""Largest max |int8 − float32| of a quantized .pte's outputs, relative to the largest |float32|
output. Dynamic int8 with per-channel weights stays within a few percent on every preset; a
larger error is a broken quantization, not rounding."""
DECODER_MAX_TOKENS = 512
"""The default bound of T in a decoder program whose mixers set none (no chunked path, no short cache)."""


def _require_executorch():
    """(to_edge_transform_and_lower, XnnpackPartitioner), or a SeqmixError saying how to install them."""
    try:
        import executorch.kernels.quantized  # noqa: F401  (defines quantized_decomposed.embedding_byte for export)
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as error:
        raise SeqmixError(f"ExecuTorch export needs executorch ({error}): {INSTALL_HINT}") from None
    return to_edge_transform_and_lower, XnnpackPartitioner


def _runtime():
    """The ExecuTorch runtime singleton, or a SeqmixError saying how to install it."""
    try:
        import executorch.kernels.quantized  # noqa: F401  (registers the int8 embedding kernel int8 programs call)
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


def check_quantize(quantize: str | None) -> None:
    """Refuse a ``quantize`` value that no .pte exporter takes."""
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise SeqmixError(f"ExecuTorch: quantize={quantize!r} is not valid; expected one of {list(QUANTIZATIONS)} or None (float32)")


def _int8_quantizer():
    """The XNNPACK quantizer set to dynamic int8 activations and int8 per-channel symmetric weights."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    class DynamicXNNPACKQuantizer(XNNPACKQuantizer):
        # The base class first turns every scalar operand of add/mul into a float32 tensor, which
        # static quantization of add and mul needs; dynamic quantization annotates only linear and
        # convolution, and the rewrite turned integer index arithmetic (attention's relative
        # positions) into float, which then fails as an index (executorch 1.5.1).
        def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            return model

    return DynamicXNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))


def _dynamic_int8_partitioner():
    """A partitioner that delegates each dynamically quantized linear or convolution, with its
    activation's quantize chain, as a delegate of its own, before ``XnnpackPartitioner`` takes the rest.

    XnnpackPartitioner alone merges quantized linears that share one activation's chain
    (megalodon's projections of the same normed input) into groups whose nodes interleave with
    float nodes, and lowering fails with "Invalid partition, found dependency cycles" (executorch 1.5.1).
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackDynamicallyQuantizedPartitioner

    return XnnpackDynamicallyQuantizedPartitioner(per_op_mode=True)


def _quantized_int8(program, example: tuple[Tensor, ...], dynamic_shapes=None):
    """``program`` (an ExportedProgram) with int8 linears and convolutions, exported again at ``example``."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(program.module(), _int8_quantizer())
    # One call runs the weight observers; dynamic activations need no calibration data.
    prepared(*example)
    # The converted module takes the example's tensors as flat positional inputs, so the shapes
    # follow flat: a decoder program's (tokens, (state, ...)) becomes (tokens, state, ...).
    if dynamic_shapes is not None:
        dynamic_shapes = tuple(tree_flatten(dynamic_shapes, is_leaf=lambda spec: isinstance(spec, dict))[0])
    return torch.export.export(convert_pt2e(prepared), example, dynamic_shapes=dynamic_shapes)


class Int8Embedding(nn.Module):
    """An embedding table as int8 rows with one float32 scale per row (symmetric), looked up by
    ExecuTorch's quantized ``embedding_byte`` kernel (D >= 2): (...) token ids -> (..., D) float32."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        _require_executorch()  # the kernel's definition
        weight = embedding.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("weight", torch.round(weight / scales[:, None]).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scales", scales)

    def forward(self, ids: Tensor) -> Tensor:
        return torch.ops.quantized_decomposed.embedding_byte(self.weight, self.scales, None, -128, 127, ids)


def _with_int8_embeddings(graph: nn.Module) -> nn.Module:
    """A copy of ``graph`` with every ``nn.Embedding`` an ``Int8Embedding``. A head tied to the
    token embedding keeps the float weight, which the quantizer then turns into int8 as a linear's."""
    graph = copy.deepcopy(graph)
    for name, module in list(graph.named_modules()):
        if isinstance(module, nn.Embedding):
            parent, _, attribute = name.rpartition(".")
            setattr(graph.get_submodule(parent), attribute, Int8Embedding(module))
    return graph


def _spec(names: list[str], values) -> list[dict]:
    return [{"name": n, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for n, v in zip(names, values)]


def lower_to_pte(graph: nn.Module, example: tuple[Tensor, ...], path: str | Path, model: nn.Module, what: str,
                 quantize: str | None = None, dynamic_shapes=None):
    """Export ``graph`` at ``example`` (with torch.export's ``dynamic_shapes``), quantize it
    (``quantize="int8"``), lower it to XNNPACK and write the .pte to ``path``.

    ``model`` and ``what`` name the model and the graph in the error raised when lowering fails.
    Returns the graph's outputs as traced (fake tensors: shape and dtype) and the delegation counts.
    """
    check_quantize(quantize)
    to_edge_transform_and_lower, XnnpackPartitioner = _require_executorch()
    path = Path(path)
    try:
        with torch.no_grad(), recurrence.unrolled_chunks(), quiet_exporters():
            if quantize == "int8":
                graph = _with_int8_embeddings(graph)
            program = torch.export.export(graph, example, dynamic_shapes=dynamic_shapes)
            partitioners = [XnnpackPartitioner()]
            if quantize == "int8":
                program = _quantized_int8(program, example, dynamic_shapes)
                partitioners.insert(0, _dynamic_int8_partitioner())
            edge = to_edge_transform_and_lower(program, partitioner=partitioners)
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


@restores_model
def export_parallel_pte(model: nn.Module, path: str | Path, length: int, batch_size: int = 1,
                        quantize: str | None = None) -> dict:
    """Write the parallel graph, token ids (batch_size, length) -> model output, as a .pte.

    The model is exported in eval mode on its exportable paths (``use_exportable_paths``); its own
    mode and paths are restored afterwards.

    Args:
        model: a SequenceModel.
        path: the .pte file to write.
        length: L, fixed in the graph (ExecuTorch has no dynamic length here); best a multiple of
            ``length_unit(model)``, and at most ``max_len`` with learned positions.
        batch_size: B, fixed in the graph.
        quantize: None for float32, or "int8" (dynamic int8 linears and convolutions, see the module doc).
    Returns:
        The manifest entry: file, inputs and outputs (name, shape, dtype), length, batch_size,
        quantize, the impl of every mixer, and the operators delegated to XNNPACK
        (``delegated_nodes`` of ``total_nodes``).
    """
    require_int("export_parallel_pte", "length", length)
    require_int("export_parallel_pte", "batch_size", batch_size)
    check_quantize(quantize)
    model.eval()
    impls = use_exportable_paths(model)
    tokens = torch.zeros(batch_size, length, dtype=torch.long)
    what = f"parallel graph (B={batch_size}, L={length}{', ' + quantize if quantize else ''})"
    outputs, delegation = lower_to_pte(model, (tokens,), path, model, what, quantize)
    return {
        "file": Path(path).name,
        "inputs": _spec(["tokens"], [tokens]),
        "outputs": _spec(["logits"], outputs),
        "length": length,
        "batch_size": batch_size,
        "quantize": quantize,
        "impls": impls,
        **delegation,
    }


def decoder_token_limit(model: nn.Module, max_tokens: int = DECODER_MAX_TOKENS) -> int:
    """The most tokens one call of ``model``'s decoder program takes: ``max_tokens``, the model's
    stream limit, and the smallest chunk of its mixers (``length_unit`` of each), since the chunk
    loop is unrolled and a call must fit one chunk."""
    from seqmix.contract import Mixer

    chunks = [module.length_unit() for module in model.modules() if isinstance(module, Mixer) and module.length_unit() > 1]
    return min([max_tokens, stream_limit(model), *chunks])


@restores_model
def export_step_pte(model: nn.Module, path: str | Path, batch_size: int = 1, max_tokens: int = DECODER_MAX_TOKENS,
                    quantize: str | None = None) -> dict:
    """Write the decoder program, (input_ids (B, T), state...) -> (logits (B, T, V), new state...), as a .pte.

    T is dynamic, 1 to ``decoder_token_limit(model, max_tokens)``; the model is exported in eval mode on
    its exportable paths (``use_exportable_paths``), its own mode and paths restored afterwards.

    Args:
        model: a causal SequenceModel with a per-token head.
        path: the .pte file to write.
        batch_size: B, fixed in the program and in every state tensor.
        max_tokens: the most tokens per call asked for; the model may allow fewer.
        quantize: None for float32, or "int8" (dynamic int8 linears and convolutions, see the module doc).
    Returns:
        The manifest entry: file, inputs, outputs and state (name, shape with ``"tokens"`` for T, dtype;
        each state entry with its output name), batch_size, tokens_per_call ``"1..N"``, max_tokens N,
        quantize, the impl of every mixer, and the operators delegated to XNNPACK (``delegated_nodes``
        of ``total_nodes``).
    """
    from torch.export import Dim

    from seqmix.contract import any_token_count

    require_int("export_step_pte", "batch_size", batch_size)
    require_int("export_step_pte", "max_tokens", max_tokens)
    check_quantize(quantize)
    if not getattr(model, "causal", False):
        raise SeqmixError(
            f"export_step_pte: {_describe(model)} has bidirectional layers, so it cannot stream and has no "
            "decoder program; export its parallel graph with export_parallel_pte"
        )
    model.eval()
    impls = use_exportable_paths(model)
    require_stream_matches_forward(model, "decoder program")
    graph = StepGraph(model, batch_size)
    state = graph.initial_state(batch_size)
    limit = decoder_token_limit(model, max_tokens)
    tokens = torch.zeros(batch_size, min(2, limit), dtype=torch.long)
    dims = ({1: Dim("tokens", min=1, max=limit)} if limit > 1 else {}, tuple({} for _ in state))
    what = f"decoder program (B={batch_size}, T=1..{limit}{', ' + quantize if quantize else ''})"
    with any_token_count(), size_oblivious():
        outputs, delegation = lower_to_pte(graph, (tokens, *state), path, model, what, quantize, dims)
    token_shape = [batch_size, "tokens"]
    return {
        "file": Path(path).name,
        "inputs": [{"name": "input_ids", "shape": token_shape, "dtype": "int64"}, *_spec(graph.state_names, state)],
        "outputs": [{"name": "logits", "shape": [*token_shape, *outputs[0].shape[2:]], "dtype": "float32"},
                    *_spec(graph.present_names, outputs[1:])],
        # fill: the state a client starts from (−1 in an attention cache's empty slots, not 0).
        "state": [{**entry, "output": present, "fill": initial_fill(entry["name"], initial)}
                  for entry, present, initial in zip(_spec(graph.state_names, state), graph.present_names, state)],
        "batch_size": batch_size,
        "tokens_per_call": f"1..{limit}",
        "max_tokens": limit,
        "quantize": quantize,
        "impls": impls,
        **delegation,
    }


def load_pte_method(path: str | Path):
    """The ``forward`` method of a .pte file, loaded once for repeated calls. A .pte in a ``seqmix
    export format=executorch`` directory must have the size and sha256 its manifest records."""
    path = Path(path)
    if not path.is_file():
        raise SeqmixError(f"run_pte: {path} {not_a_file(path)}; write it with export_parallel_pte or export_step_pte")
    verify_in_export(path, "executorch", "an ExecuTorch program")
    try:
        return _runtime().load_program(path).load_method("forward")
    except RuntimeError as error:  # the runtime's "Failed to load program, error: 0x23" for any other file
        raise SeqmixError(f"run_pte: {path} is not an ExecuTorch program this runtime can load ({one_line(error)}); "
                          "write it with export_parallel_pte or export_step_pte") from None


def _input_name(index: int) -> str:
    return "input_ids" if index == 0 else f"state tensor {index - 1}"


def _check_inputs(method, inputs: tuple[Tensor, ...], vocab_size: int | None) -> None:
    """Raise a SeqmixError naming the input unless ``inputs`` match the program's count, shapes and
    dtypes (and, given ``vocab_size``, the token ids lie in [0, vocab_size)); the runtime's own
    errors name neither the input nor what it expected.

    A decoder program (token ids, then state) takes any T up to the one it was planned for; a
    parallel program (token ids alone) takes exactly its (B, L).
    """
    meta = method.metadata
    expected = [tuple(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]
    got = [tuple(t.shape) if isinstance(t, Tensor) else kind_of(t) for t in inputs]
    if len(inputs) != len(expected):
        raise SeqmixError(
            f"run_pte: the program takes {len(expected)} inputs (token ids, then the state) of shapes {expected}, got "
            f"{len(inputs)}: {got}; was the state built for another model?"
        )
    for index, (tensor, shape) in enumerate(zip(inputs, expected)):
        name = _input_name(index)
        if not isinstance(tensor, Tensor):
            raise SeqmixError(f"run_pte: input {index} ({name}) is {kind_of(tensor)}; expected a torch.Tensor of shape {shape}")
        if index == 0 and len(expected) > 1:
            if tensor.dim() != 2 or tensor.shape[0] != shape[0] or not 1 <= tensor.shape[1] <= shape[1]:
                raise SeqmixError(
                    f"run_pte: input_ids has shape {tuple(tensor.shape)}; this decoder program takes ({shape[0]}, T) "
                    f"with 1 <= T <= {shape[1]}: feed a longer prompt in calls of at most {shape[1]} tokens"
                )
        elif tuple(tensor.shape) != shape:
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
    try:
        return list(method.execute([t.contiguous() for t in inputs]))
    except RuntimeError as error:
        hint = "" if vocab_size is not None else "; were the token ids within the vocabulary? pass vocab_size= to have them checked"
        raise SeqmixError(f"run_pte: the program failed ({one_line(error)}){hint}") from None


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
        worst = max(worst, max_difference(expected, _execute(method, (tokens,), model.vocab_size)[0], "ExecuTorch parallel program"))
    return worst


def decoder_calls(limit: int) -> list[int]:
    """Tokens per call of the stream that checks a decoder program planned for T <= ``limit``:
    one token, the most it takes, a few in between, none of them the traced T = 2 alone."""
    return [1, limit, max(1, limit // 2 + 1), 1, min(3, limit), 1]


def verify_pte_step(model: nn.Module, path: str | Path) -> float:
    """Max |eager ``model.step`` − .pte| over the logits of a stream of calls of ``decoder_calls`` tokens
    and the final state.

    The .pte's state outputs are fed back as its next state inputs, as a device would; the batch
    size and the most tokens per call are read from the program.
    """
    return max(error for error, _ in stream_errors(model, path))


def stream_errors(model: nn.Module, path: str | Path) -> list[tuple[float, float]]:
    """(max |eager − .pte|, max |eager|) of the logits over every call, then of each final state
    tensor, streamed as ``verify_pte_step`` does: each output's error beside its own size, since the
    state (a key/value cache, a convolution's window) is not on the logits' scale. An integer state
    tensor that differs gives (inf, 0)."""
    method = load_pte_method(path)
    batch_size, limit = method.metadata.input_tensor_meta(0).sizes()
    generator = torch.Generator().manual_seed(1)
    eager_state = model.init_state(batch_size)
    state = tree_flatten(model.init_state(batch_size))[0]
    worst = scale = 0.0
    for count in decoder_calls(limit):
        tokens = torch.randint(0, model.vocab_size, (batch_size, count), generator=generator)
        with torch.no_grad():
            expected, eager_state = model.step(tokens, eager_state)
        logits, *state = _execute(method, (tokens, *state), model.vocab_size)
        worst = max(worst, max_difference(expected, logits, "ExecuTorch decoder program"))
        scale = max(scale, expected.abs().max().item())
    errors = [(worst, scale)]
    for want, got in zip(tree_flatten(eager_state)[0], state):
        if want.is_floating_point():
            errors.append((max_difference(want, got, "ExecuTorch decoder program's state"), want.abs().max().item()))
        elif not torch.equal(want, got):
            errors.append((float("inf"), 0.0))
    return errors


def pte_eval_rows(task, length: int, batch_size: int = 8, batches: int = 8) -> list[Batch]:
    """The task's evaluation batches as single sequences of exactly ``length`` tokens: what a
    parallel .pte at (1, length) takes.

    Each row of ``task.eval_batches(batch_size, batches)`` is cut to its first ``length`` tokens
    (per-token targets with it) or padded at the end with token 0 and target ``IGNORE``. The
    program has no padding-mask input, so a padded row is read whole; quantized and float32
    programs see the same rows, so their metric change is quantization's alone.
    """
    require_int("pte_eval_rows", "length", length)
    rows = []
    for batch in task.eval_batches(batch_size, batches):
        for inputs, targets in zip(batch.inputs, batch.targets):
            inputs = inputs[:length]
            pad = length - inputs.numel()
            inputs = torch.nn.functional.pad(inputs, (0, pad))
            if targets.dim() == 1:  # per-token targets; a label (a 0-dim row) stays as it is
                targets = torch.nn.functional.pad(targets[:length], (0, pad), value=IGNORE)
            rows.append(Batch(inputs[None], targets[None]))
    return rows


def _scores(task, outputs: list[Tensor], rows: list[Batch]) -> dict[str, float]:
    """Loss and the task's metric of ``outputs`` (one program output per row) against the rows' targets."""
    from seqmix.training.loop import correct_count, loss_sum_and_count, task_scores

    total, count, correct = 0.0, 0, 0
    for output, row in zip(outputs, rows):
        loss, n = loss_sum_and_count(output, row)
        total += float(loss)
        count += int(n)
        correct += int(correct_count(output, row))
    return task_scores(task, total, count, correct)


def _interleaved_latency(calls: dict[str, object], repeats: int = 7, warmup: int = 2) -> dict[str, dict]:
    """{name: Timing as a dict} of each call, timed in rounds (a b c a b c ...) so drift hits all alike."""
    times = {name: [] for name in calls}
    for index in range(warmup + repeats):
        for name, call in calls.items():
            seconds = time_once(call)
            if index >= warmup:
                times[name].append(seconds)
    return {name: summarize(seconds).as_dict() for name, seconds in times.items()}


def _checked_relative(error: float, scale: float, what: str) -> float:
    """``error / scale``, or a SeqmixError when it exceeds ``INT8_TOLERANCE``."""
    relative = error / scale if scale > 0 else error
    if not relative <= INT8_TOLERANCE:
        raise SeqmixError(
            f"{what}: max |int8 − float32| = {error:.3e} is {relative:.1%} of the largest float32 output {scale:.3e}, "
            f"over the tolerance {INT8_TOLERANCE:.0%}"
        )
    return relative


def compare_pte_variant(model: nn.Module, task, reference: Path, variant: Path, length: int,
                        step_reference: Path | None = None, step_variant: Path | None = None,
                        batch_size: int = 8, batches: int = 8) -> dict:
    """Size, latency and the task's metric of a quantized parallel .pte against the float32 one, both at (1, length).

    The metric is taken on ``pte_eval_rows(task, length, batch_size, batches)``; latency is the
    median (with the fastest and slowest call) of eager, float32 and quantized calls on one
    random (1, length) input, timed in alternation. Raises SeqmixError when the quantized
    outputs on those rows, or the quantized step program's streamed logits against eager
    ``step``, differ from float32 by more than ``INT8_TOLERANCE`` of the largest float32 output.

    Returns the manifest's ``quantized`` entry: file, bytes, fp32_bytes, size_ratio (variant /
    float32), the eager, float32 and variant latencies and ``speedup`` (float32 / variant median),
    metric, metric_fp32, metric_variant, metric_change (points ×100 for accuracy, bits as is),
    eval_rows, eval_length, relative_error; and with a step program the same sizes and
    relative error under ``step_*``.
    """
    rows = pte_eval_rows(task, length, batch_size, batches)
    fp32, small = pte_runner(reference, model.vocab_size), pte_runner(variant, model.vocab_size)
    fp32_outputs = [fp32(row.inputs)[0] for row in rows]
    variant_outputs = [small(row.inputs)[0] for row in rows]
    error = max((a - b).abs().max().item() for a, b in zip(fp32_outputs, variant_outputs))
    scale = max(a.abs().max().item() for a in fp32_outputs)
    relative = _checked_relative(error, scale, f"{variant.name} on the task's evaluation rows")
    reference_scores, variant_scores = _scores(task, fp32_outputs, rows), _scores(task, variant_outputs, rows)
    metric = task.metric
    change = variant_scores[metric] - reference_scores[metric]
    tokens = torch.randint(0, model.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latency = _interleaved_latency({"eager": lambda: model(tokens), "fp32": lambda: fp32(tokens), "variant": lambda: small(tokens)})
    entry = {
        "file": variant.name,
        "bytes": variant.stat().st_size,
        "fp32_bytes": reference.stat().st_size,
        "size_ratio": variant.stat().st_size / reference.stat().st_size,
        "speedup": latency["fp32"]["median_ms"] / latency["variant"]["median_ms"],
        "eager_latency": latency["eager"],
        "fp32_latency": latency["fp32"],
        "variant_latency": latency["variant"],
        "metric": metric,
        "metric_fp32": reference_scores[metric],
        "metric_variant": variant_scores[metric],
        # Accuracy change in points (×100); bits per byte or token as is.
        "metric_change": 100 * change if metric == "accuracy" else change,
        "eval_rows": len(rows),
        "eval_length": length,
        "relative_error": relative,
    }
    if step_variant is not None:
        step_error, step_scale = max(stream_errors(model, step_variant), key=lambda pair: pair[0] / pair[1] if pair[1] > 0 else pair[0])
        entry.update({
            "step_file": step_variant.name,
            "step_bytes": step_variant.stat().st_size,
            "step_fp32_bytes": step_reference.stat().st_size,
            "step_size_ratio": step_variant.stat().st_size / step_reference.stat().st_size,
            "step_relative_error": _checked_relative(step_error, step_scale, f"{step_variant.name} streamed against eager step"),
        })
    return entry
