"""TensorRT: will an exported ONNX graph import, and building an engine from it.

- ``ask_tensorrt`` asks TensorRT itself when it is installed and can make a parser (its ONNX
  parser's ``supports_model_v2``), and otherwise answers with ``check_tensorrt_support``, the
  labelled CPU fallback; the report says which answered (``answered_by``, ``source``).
- ``check_tensorrt_support`` reads an ONNX graph with only the ``onnx`` package (no GPU, no
  TensorRT) against an operator list copied from TensorRT 10.15 and reports what TensorRT's ONNX
  parser would refuse: operators it has no importer
  for, DFT (no importer before TensorRT 11.2), complex tensors (TensorRT has no complex type),
  operators in non-default domains (they would need a plugin), and the documented restrictions
  that can be read off the graph (Attention inputs, constant ``axes``, Loop scan outputs, ...).
  It walks Scan/Loop/If bodies and the model's local functions.
- ``build_engine`` builds a serialized engine with the ``tensorrt`` Python API, one optimization
  profile covering every dynamic input; ``run_engine`` runs one on torch CUDA tensors.
- ``onnxruntime_tensorrt_session`` runs the graph through ONNX Runtime's TensorRT execution
  provider instead.

``tensorrt`` (and ``onnxruntime-gpu`` for the execution provider) pin CUDA versions and need an
NVIDIA GPU, so they are optional extras: without them the last three raise ``SeqmixError`` saying
what is missing, while the static check works everywhere.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqmix.errors import SeqmixError
from seqmix.staging import new_file

# The operators TensorRT's ONNX parser imports ("Y" rows of the operator support matrix in
# onnx/onnx-tensorrt, docs/operators.md, the revision describing TensorRT 10.15: opsets 9 to 24).
SUPPORT_LIST_SOURCE = "onnx/onnx-tensorrt docs/operators.md (Supported ONNX Operators), TensorRT 10.15"
SUPPORT_LIST_VERSION = "10.15"
FALLBACK_SOURCE = f"CPU fallback: seqmix's copy of the TensorRT {SUPPORT_LIST_VERSION} ONNX parser operator list"
"""What ``TensorRTReport.source`` says when TensorRT did not answer: the copied list, which will go stale."""
SUPPORTED_OPSETS = (9, 24)
SUPPORTED_OPS: frozenset[str] = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool
    BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape
    Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum
    Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
    GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
    GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If
    ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
    LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
    RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements
    ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
    SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile TopK
    Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)
# The same list's "N" rows: named so a report can say "listed as unsupported", not just "unknown".
LISTED_UNSUPPORTED: frozenset[str] = frozenset(
    """
    AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad
    Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder
    MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss
    Optional OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch
    SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength
    SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit
    TfIdfVectorizer Unique
    """.split()
)
# The parser gained a DFT importer in TensorRT 11.2 (its release notes); the list above
# predates it and marks DFT unsupported.
DFT_SINCE = (11, 2)
DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})

# Inputs the support matrix requires to be known when the engine is built: {op: {index: name}}.
CONSTANT_INPUTS: dict[str, dict[int, str]] = {
    "CumSum": {1: "axis"},
    "Squeeze": {1: "axes"},
    "Unsqueeze": {1: "axes"},
    "Dropout": {2: "training_mode"},
    "OneHot": {1: "depth"},
    "STFT": {1: "frame_step", 2: "window"},
    **{op: {1: "axes"} for op in (
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
    )},
}
# Ops whose output changes from run to run: never constant even with constant inputs.
NONDETERMINISTIC = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial"})
GRAPH_BODIES = {"Scan": ("body",), "Loop": ("body",), "If": ("then_branch", "else_branch")}


def _onnx():
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is a dependency of every export path
        raise SeqmixError("checking a graph for TensorRT needs the onnx package: pip install onnx") from None
    return onnx


def _element_type_names() -> tuple[frozenset[int], frozenset[int], dict[int, str]]:
    """(complex types, types TensorRT has, {type: name}) from onnx.TensorProto."""
    proto = _onnx().TensorProto
    names = {value: name for name, value in proto.DataType.items()}
    complex_types = frozenset(getattr(proto, n) for n in ("COMPLEX64", "COMPLEX128") if hasattr(proto, n))
    trt_types = frozenset(
        getattr(proto, n)
        for n in ("FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE", "INT32", "INT64", "INT8", "UINT8", "BOOL",
                  "INT4", "FLOAT8E4M3FN", "FLOAT4E2M1")
        if hasattr(proto, n)
    )
    return complex_types, trt_types, names


def _version_tuple(version: str | Sequence[int]) -> tuple[int, int]:
    """(major, minor) from "10.15", "10.15.1.29" or (10, 15)."""
    if isinstance(version, str):
        match = re.match(r"\s*(\d+)(?:\.(\d+))?", version)
        if match is None:
            raise SeqmixError(f"tensorrt_version={version!r} is not valid; expected 'MAJOR.MINOR', e.g. '10.15'")
        return int(match.group(1)), int(match.group(2) or 0)
    parts = [int(part) for part in version]
    return parts[0], parts[1] if len(parts) > 1 else 0


@dataclass
class TensorRTReport:
    """What TensorRT's ONNX parser would make of one graph.

    Attributes:
        ok: no unsupported operator and no blocking flag.
        unsupported: {op: count} of operators the parser cannot import; ops outside the default
            domain are keyed ``domain::op``.
        flags: human-readable blocking findings (unsupported ops, complex tensors, custom domains,
            violated restrictions), each with how often and where first.
        op_counts: {op: count} over every node, Scan/Loop/If bodies included and calls of local
            functions replaced by their bodies (as the parser inlines them).
        opset: the default-domain opset the model imports (None when it imports none).
        notes: findings that do not stop the import but deserve a look (restrictions the static
            check cannot decide, DOUBLE tensors narrowed to FLOAT, ...).
        tensorrt_version: the TensorRT version the verdict is for.
        answered_by: ``tensorrt`` (TensorRT's own ONNX parser was asked) or ``operator_list`` (the
            copied list of TensorRT ``SUPPORT_LIST_VERSION``, the CPU fallback).
        source: what answered, in words (the parser call, or ``FALLBACK_SOURCE``).
        fallback_reason: why TensorRT was not asked (None when it was, or when the list was asked for).
    """

    ok: bool
    unsupported: dict[str, int]
    flags: list[str]
    op_counts: dict[str, int]
    opset: int | None = None
    notes: list[str] = field(default_factory=list)
    tensorrt_version: str = SUPPORT_LIST_VERSION
    answered_by: str = "operator_list"
    source: str = FALLBACK_SOURCE
    fallback_reason: str | None = None

    def summary(self) -> str:
        """A few lines for a log or an assertion message."""
        total = sum(self.op_counts.values())
        lines = [
            f"TensorRT {self.tensorrt_version} ONNX parser check: {'OK' if self.ok else 'NOT OK'} "
            f"(opset {self.opset}, {total} nodes, {len(self.op_counts)} op types; answered by {self.source})"
        ]
        if self.fallback_reason:
            lines.append(f"TensorRT was not asked: {self.fallback_reason}")
        if self.unsupported:
            lines.append("unsupported ops: " + ", ".join(f"{op} x{n}" for op, n in sorted(self.unsupported.items())))
        lines += [f"flag: {flag}" for flag in self.flags]
        lines += [f"note: {note}" for note in self.notes]
        lines.append("ops: " + ", ".join(f"{op} x{n}" for op, n in sorted(self.op_counts.items())))
        return "\n".join(lines)


class _Findings:
    """Messages counted by text, keeping where each was first seen."""

    def __init__(self):
        self._seen: dict[str, list] = {}

    def add(self, message: str, where: str) -> None:
        entry = self._seen.setdefault(message, [0, where])
        entry[0] += 1

    def render(self) -> list[str]:
        return [f"{message} ({count}x, first at {where})" for message, (count, where) in self._seen.items()]


class _Checker:
    def __init__(self, model, tensorrt_version: tuple[int, ...]):
        self.onnx = _onnx()
        self.model = model
        self.version = tensorrt_version
        self.complex_types, self.trt_types, self.type_names = _element_type_names()
        self.functions = {(f.domain, f.name, getattr(f, "overload", "")): f for f in model.functions}
        self.op_counts: dict[str, int] = {}
        self.unsupported: dict[str, int] = {}
        self.flags = _Findings()
        self.notes = _Findings()

    # -- types -------------------------------------------------------------------------------
    def _check_element_type(self, elem_type: int, what: str, where: str) -> None:
        if elem_type == 0:  # UNDEFINED: not inferred, nothing to say
            return
        name = self.type_names.get(elem_type, str(elem_type))
        if elem_type in self.complex_types:
            self.flags.add(f"complex dtype {name}: TensorRT has no complex tensors; keep complex arithmetic "
                           "as real/imaginary float pairs", f"{where}, {what}")
        elif elem_type not in self.trt_types:
            self.flags.add(f"dtype {name}: TensorRT has no such tensor type", f"{where}, {what}")
        elif name == "DOUBLE":
            self.notes.add("DOUBLE tensors are narrowed to FLOAT by TensorRT", f"{where}, {what}")

    def _check_value_type(self, type_proto, what: str, where: str) -> None:
        kind = type_proto.WhichOneof("value")
        if kind in ("tensor_type", "sparse_tensor_type"):
            self._check_element_type(getattr(type_proto, kind).elem_type, what, where)
        elif kind in ("sequence_type", "optional_type"):
            self.flags.add(f"{kind.replace('_type', '')} value: TensorRT imports only tensors", f"{where}, {what}")
            self._check_value_type(getattr(type_proto, kind).elem_type, what, where)
        elif kind == "map_type":
            self.flags.add("map value: TensorRT imports only tensors", f"{where}, {what}")

    def _check_attribute_types(self, node, where: str) -> None:
        attribute = self.onnx.AttributeProto
        for attr in node.attribute:
            if attr.type == attribute.TENSOR:
                self._check_element_type(attr.t.data_type, f"{node.op_type}.{attr.name} constant", where)
            elif attr.type == attribute.TENSORS:
                for tensor in attr.tensors:
                    self._check_element_type(tensor.data_type, f"{node.op_type}.{attr.name} constant", where)
            elif attr.type == attribute.INT and attr.name in ("to", "dtype", "output_dtype"):
                self._check_element_type(attr.i, f"{node.op_type} {attr.name}= target", where)

    # -- graphs ------------------------------------------------------------------------------
    def check_graph(self, graph, where: str, outer_constants: frozenset[str], outer_ranks: dict[str, int]) -> None:
        for value in graph.input:
            self._check_value_type(value.type, f"input {value.name!r}", where)
        for value in graph.output:
            self._check_value_type(value.type, f"output {value.name!r}", where)
        for value in graph.value_info:
            self._check_value_type(value.type, f"tensor {value.name!r}", where)
        for tensor in graph.initializer:
            self._check_element_type(tensor.data_type, f"initializer {tensor.name!r}", where)
        for sparse in graph.sparse_initializer:
            self._check_element_type(sparse.values.data_type, f"initializer {sparse.values.name!r}", where)
        constants = set(outer_constants) | {t.name for t in graph.initializer}
        constants |= {s.values.name for s in graph.sparse_initializer}
        ranks = dict(outer_ranks)
        for value in (*graph.input, *graph.output, *graph.value_info):
            if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
                ranks[value.name] = len(value.type.tensor_type.shape.dim)
        for tensor in graph.initializer:
            ranks[tensor.name] = len(tensor.dims)
        self.check_nodes(graph.node, where, constants, ranks)

    def check_nodes(self, nodes, where: str, constants: set[str], ranks: dict[str, int], stack: tuple = ()) -> None:
        for node in nodes:
            here = f"{where}/{node.op_type}:{node.name or '?'}"
            self._check_attribute_types(node, here)
            function = self.functions.get((node.domain, node.op_type, getattr(node, "overload", "")))
            if function is not None:
                self.check_function(node, function, here, constants, ranks, stack)
                continue
            self.check_node(node, here, constants, ranks)
            if node.op_type == "Constant" or (
                node.input and all(not name or name in constants for name in node.input)
                and node.op_type not in NONDETERMINISTIC and node.domain in DEFAULT_DOMAINS
                and node.op_type not in GRAPH_BODIES
            ):
                constants.update(name for name in node.output if name)
            for attr in node.attribute:
                for body in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    self.check_graph(body, f"{here}.{attr.name}", frozenset(constants), ranks)

    def check_function(self, node, function, where: str, constants: set[str], ranks: dict[str, int], stack: tuple) -> None:
        """Walk a local function's body as if inlined at this call (the parser expands it too)."""
        key = (function.domain, function.name)
        if key in stack:
            self.flags.add(f"local function {function.domain}::{function.name} calls itself; it cannot be inlined", where)
            return
        # Formal names are scoped to the body: map what is known about the actual arguments.
        inner_constants = {formal for formal, actual in zip(function.input, node.input) if actual in constants}
        inner_ranks = {formal: ranks[actual] for formal, actual in zip(function.input, node.input) if actual in ranks}
        for value in getattr(function, "value_info", ()):
            self._check_value_type(value.type, f"tensor {value.name!r}", where)
        self.check_nodes(function.node, f"{where}[{function.domain}::{function.name}]", inner_constants, inner_ranks, (*stack, key))
        if all(formal in inner_constants for formal in function.output):
            constants.update(actual for actual in node.output if actual)

    def check_node(self, node, where: str, constants: set[str], ranks: dict[str, int]) -> None:
        op = node.op_type
        key = op if node.domain in DEFAULT_DOMAINS else f"{node.domain}::{op}"
        self.op_counts[key] = self.op_counts.get(key, 0) + 1
        if node.domain not in DEFAULT_DOMAINS:
            self.unsupported[key] = self.unsupported.get(key, 0) + 1
            self.flags.add(
                f"{key}: operator outside the default ONNX domain; TensorRT's parser imports it only "
                "through a plugin registered under that name", where,
            )
            return
        if op == "DFT":
            if self.version >= DFT_SINCE:
                self.notes.add(
                    "DFT: imported from TensorRT 11.2 on, after the 10.15 operator "
                    "list this check encodes; check that release's DFT restrictions", where,
                )
            else:
                self.unsupported[op] = self.unsupported.get(op, 0) + 1
                self.flags.add(
                    "DFT: TensorRT's ONNX parser has no DFT importer before TensorRT 11.2; switch FFT "
                    "mixers to their chunked path (export.graphs.use_exportable_paths)", where,
                )
            return
        if op not in SUPPORTED_OPS:
            self.unsupported[op] = self.unsupported.get(op, 0) + 1
            why = "listed as not supported" if op in LISTED_UNSUPPORTED else "not in the support list"
            self.flags.add(f"{op}: {why} by TensorRT's ONNX parser ({SUPPORT_LIST_SOURCE})", where)
            return
        if op == "STFT":
            self.notes.add(
                "STFT: imported for real FP32 input with constant frame_step and window only; DFT itself "
                "has no importer before TensorRT 11.2", where,
            )
        for index, name in CONSTANT_INPUTS.get(op, {}).items():
            if index < len(node.input) and node.input[index] and node.input[index] not in constants:
                self.flags.add(f"{op}: input `{name}` must be a constant when the engine is built; here it is computed", where)
        if op == "Attention":
            self._check_attention(node, where, ranks)
        elif op == "Loop":
            self._check_loop(node, where, constants)
        elif op == "If":
            self._check_if(node, where)

    def _check_attention(self, node, where: str, ranks: dict[str, int]) -> None:
        names = ("Q", "K", "V", "attn_mask")
        for index, name in enumerate(names):
            if index >= len(node.input) or not node.input[index]:
                continue
            rank = ranks.get(node.input[index])
            if rank is None:
                self.notes.add(f"Attention: the rank of `{name}` is unknown; TensorRT needs it 4D", where)
            elif rank != 4:
                self.flags.add(f"Attention: `{name}` is {rank}D; TensorRT imports Attention with 4D Q, K, V and mask only", where)
        extra = [name for name in node.input[4:] if name]
        if extra:
            self.flags.add("Attention: past_key/past_value/nonpad_kv_seqlen inputs are unsupported by TensorRT", where)
        if any(name for name in node.output[1:]):
            self.flags.add("Attention: present_key/present_value/qk_matmul_output outputs are unsupported by TensorRT", where)
        for attr in node.attribute:
            if attr.name in ("softcap", "qk_matmul_output_mode") and (attr.f if attr.name == "softcap" else attr.i):
                self.flags.add(f"Attention: attribute {attr.name} is unsupported by TensorRT", where)

    def _check_loop(self, node, where: str, constants: set[str]) -> None:
        body = next((attr.g for attr in node.attribute if attr.name == "body"), None)
        if body is None:
            return
        carried = len(body.input) - 2
        scanned = len(body.output) - 1 - carried
        trip_count = node.input[0] if node.input else ""
        if scanned > 0 and (not trip_count or trip_count not in constants):
            self.flags.add(
                "Loop: scan outputs with a trip count only known at run time; TensorRT needs the scan "
                "output length fixed when the engine is built", where,
            )

    def _check_if(self, node, where: str) -> None:
        branches = {attr.name: attr.g for attr in node.attribute if attr.name in ("then_branch", "else_branch")}
        if len(branches) != 2:
            return
        then_outputs, else_outputs = branches["then_branch"].output, branches["else_branch"].output
        shared = {o.name for o in then_outputs} & {o.name for o in else_outputs}
        if shared:
            self.flags.add(f"If: both branches name an output {sorted(shared)}; TensorRT needs different names", where)
        for first, second in zip(then_outputs, else_outputs):
            ranks = [len(v.type.tensor_type.shape.dim) if v.type.tensor_type.HasField("shape") else None for v in (first, second)]
            if None not in ranks and ranks[0] != ranks[1]:
                self.flags.add(f"If: branch outputs {first.name!r} and {second.name!r} differ in rank {ranks}; TensorRT needs equal ranks", where)


def _load(onnx_path_or_model):
    onnx = _onnx()
    if isinstance(onnx_path_or_model, onnx.ModelProto):
        return onnx_path_or_model
    if isinstance(onnx_path_or_model, (bytes, bytearray)):
        return onnx.load_model_from_string(bytes(onnx_path_or_model))
    path = Path(onnx_path_or_model)
    if not path.is_file():
        raise SeqmixError(f"onnx_path={str(path)!r} is not a file; expected an exported .onnx model or an onnx.ModelProto")
    # Weights stay on disk: only names, types and shapes matter here.
    return onnx.load(str(path), load_external_data=False)


def _with_inferred_shapes(model):
    """The model with value_info filled in where ONNX shape inference can; the model itself if it cannot."""
    onnx = _onnx()
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is a best-effort refinement (e.g. models over 2 GB)
        return model


def check_tensorrt_support(onnx_path_or_model, tensorrt_version: str | Sequence[int] = SUPPORT_LIST_VERSION) -> TensorRTReport:
    """Check an ONNX graph against TensorRT's ONNX parser without TensorRT or a GPU.

    Args:
        onnx_path_or_model: a ``.onnx`` path, its bytes, or an ``onnx.ModelProto``.
        tensorrt_version: the TensorRT the graph is meant for, "MAJOR.MINOR". The operator list is
            the one for 10.15; a version from 11.2 on also accepts DFT.
    Returns:
        a ``TensorRTReport``; ``report.ok`` is False when the parser would refuse the graph.
    """
    version = _version_tuple(tensorrt_version)
    model = _with_inferred_shapes(_load(onnx_path_or_model))
    checker = _Checker(model, version)
    opset = next((entry.version for entry in model.opset_import if entry.domain in DEFAULT_DOMAINS), None)
    low, high = SUPPORTED_OPSETS
    if opset is not None and not low <= opset <= high:
        checker.flags.add(f"opset {opset}: TensorRT {SUPPORT_LIST_VERSION} imports opsets {low} to {high}", "model")
    checker.check_graph(model.graph, model.graph.name or "graph", frozenset(), {})
    flags = checker.flags.render()
    return TensorRTReport(
        ok=not checker.unsupported and not flags,
        unsupported=dict(sorted(checker.unsupported.items())),
        flags=flags,
        op_counts=dict(sorted(checker.op_counts.items())),
        opset=opset,
        notes=checker.notes.render(),
        tensorrt_version=".".join(map(str, version)),
    )


# -- TensorRT's own answer ----------------------------------------------------------------------
def _parser_error(error) -> str:
    """One line from a TensorRT IParserError: the node, its operator and the description."""
    def field(name):
        value = getattr(error, name, None)
        return value() if callable(value) else value

    where = " ".join(str(part) for part in (field("node_operator"), field("node_name")) if part)
    return f"{where}: {field('desc')}" if where else str(field("desc") or error)


def _tensorrt_report(trt, path: Path) -> TensorRTReport:
    """Ask TensorRT's ONNX parser which subgraphs of ``path`` it supports (no engine is built)."""
    listed = check_tensorrt_support(path, trt.__version__)
    logger = _logger(trt)
    builder = trt.Builder(logger)
    major = int(str(trt.__version__).split(".")[0])
    network = builder.create_network(0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    parser = trt.OnnxParser(network, logger)
    serialized = path.read_bytes()
    if hasattr(parser, "supports_model_v2"):
        call = "supports_model_v2"
        supported = parser.supports_model_v2(serialized, str(path))
        subgraphs = [(list(parser.get_subgraph_nodes(i)), bool(parser.is_subgraph_supported(i))) for i in range(parser.num_subgraphs)]
    else:  # TensorRT before 10.x's supports_model_v2
        call = "supports_model"
        supported, subgraphs = parser.supports_model(serialized, str(path))
    nodes = _load(path).graph.node
    unsupported: dict[str, int] = {}
    for indices, ok in subgraphs:
        for index in indices if not ok else ():
            op = nodes[index].op_type if index < len(nodes) else f"node #{index}"
            unsupported[op] = unsupported.get(op, 0) + 1
    flags = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
    flags += [f"{op}: in a subgraph TensorRT's parser does not support ({n}x)" for op, n in sorted(unsupported.items())]
    notes = [] if listed.ok == bool(supported) else [
        f"the copied TensorRT {SUPPORT_LIST_VERSION} operator list says {'OK' if listed.ok else 'NOT OK'}: "
        + ("; ".join(listed.flags) or "no flags")
    ]
    return TensorRTReport(
        ok=bool(supported) and not unsupported and not flags, unsupported=dict(sorted(unsupported.items())), flags=flags,
        op_counts=listed.op_counts, opset=listed.opset, notes=notes, tensorrt_version=str(trt.__version__),
        answered_by="tensorrt", source=f"TensorRT {trt.__version__} OnnxParser.{call}",
    )


def ask_tensorrt(onnx_path: str | os.PathLike, tensorrt: Any = None) -> TensorRTReport:
    """Will TensorRT import this graph? TensorRT's own answer when it can give one, else the copied list's.

    Args:
        onnx_path: an exported ``.onnx`` file (external weights beside it are found by the parser).
        tensorrt: the ``tensorrt`` module to ask (default: import it).
    Returns:
        a ``TensorRTReport`` whose ``answered_by`` is ``tensorrt`` when TensorRT's parser answered, or
        ``operator_list`` (``check_tensorrt_support``, labelled ``FALLBACK_SOURCE``) with
        ``fallback_reason`` saying why TensorRT could not be asked: not installed, or no parser
        without a GPU (TensorRT's builder needs CUDA).
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise SeqmixError(f"onnx_path={str(path)!r} is not a file; expected an exported .onnx model")
    reason = None
    if tensorrt is None:
        try:
            import tensorrt
        except ImportError:
            reason = "the tensorrt package is not installed (pip install tensorrt; needs an NVIDIA GPU)"
    if tensorrt is not None:
        try:
            return _tensorrt_report(tensorrt, path)
        except Exception as error:  # noqa: BLE001 - any failure to make a parser (no CUDA device, driver) means: fall back
            reason = f"TensorRT {getattr(tensorrt, '__version__', '?')} could not check the graph: {type(error).__name__}: {error}"
    report = check_tensorrt_support(path)
    report.fallback_reason = reason
    return report


def tensorrt_checks(graphs: Mapping[str, Path], tensorrt: Any = None) -> dict[str, dict]:
    """The manifest's ``tensorrt_check``: ``ask_tensorrt``'s report of each existing graph, by name, as a dict."""
    from dataclasses import asdict

    return {name: asdict(ask_tensorrt(path, tensorrt)) for name, path in graphs.items() if Path(path).is_file()}


# -- building and running engines ---------------------------------------------------------------
def _import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise SeqmixError(
            "TensorRT is not installed: pip install tensorrt; needs an NVIDIA GPU with a CUDA driver "
            "(check_tensorrt_support works without it)"
        ) from None
    return tensorrt


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SeqmixError("no CUDA device: TensorRT builds and runs engines only on an NVIDIA GPU, and torch sees none here")


def _check_profile(min_shapes, opt_shapes, max_shapes) -> dict[str, tuple[tuple[int, ...], ...]]:
    names = set(min_shapes) | set(opt_shapes) | set(max_shapes)
    profile = {}
    for name in sorted(names):
        missing = [label for label, shapes in (("min_shapes", min_shapes), ("opt_shapes", opt_shapes), ("max_shapes", max_shapes)) if name not in shapes]
        if missing:
            raise SeqmixError(f"input {name!r} has no shape in {missing}; give min, opt and max shapes for every dynamic input")
        low, opt, high = (tuple(int(d) for d in shapes[name]) for shapes in (min_shapes, opt_shapes, max_shapes))
        if not len(low) == len(opt) == len(high) or any(not a <= b <= c for a, b, c in zip(low, opt, high)):
            raise SeqmixError(f"input {name!r}: shapes min={low}, opt={opt}, max={high} are not valid; expected equal ranks and min <= opt <= max")
        profile[name] = (low, opt, high)
    return profile


def _logger(trt):
    class Collecting(trt.ILogger):
        """Keeps warnings and errors so a failed build can say why."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                self.messages.append(f"[{severity.name}] {msg}")

    return Collecting()


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    min_shapes: Mapping[str, Sequence[int]],
    opt_shapes: Mapping[str, Sequence[int]],
    max_shapes: Mapping[str, Sequence[int]],
    fp16: bool = False,
    tf32: bool = False,
    workspace_bytes: int | None = None,
) -> Path:
    """Build a serialized TensorRT engine from an ONNX graph and write it atomically.

    Args:
        onnx_path: the exported graph (external weights beside it are found by the parser).
        engine_path: where the engine is written.
        min_shapes, opt_shapes, max_shapes: {input name: shape} for every input with a dynamic
            dimension; they make the one optimization profile (shapes of static inputs may be
            given, they must then match).
        fp16: let TensorRT pick FP16 kernels (TensorRT 10; on 11 bake the precision into the graph).
        tf32: allow TF32 matmuls/convolutions (off: FP32 engines match eager FP32 closely).
        workspace_bytes: a limit for the builder's scratch memory.
    Returns:
        ``engine_path`` as a Path.
    """
    trt = _import_tensorrt()
    _require_cuda()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise SeqmixError(f"onnx_path={str(onnx_path)!r} is not a file; expected an exported .onnx model")
    profile_shapes = _check_profile(min_shapes, opt_shapes, max_shapes)

    logger = _logger(trt)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SeqmixError(
            f"TensorRT {trt.__version__} could not parse {onnx_path}: {errors}\n"
            + check_tensorrt_support(onnx_path, trt.__version__).summary()
        )

    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    unknown = sorted(set(profile_shapes) - set(inputs))
    if unknown:
        raise SeqmixError(f"shapes given for {unknown}, which are not inputs of {onnx_path.name}; its inputs are {sorted(inputs)}")
    profile = builder.create_optimization_profile()
    dynamic = False
    for name, shape in inputs.items():
        given = profile_shapes.get(name)
        if any(d < 0 for d in shape):
            if given is None:
                raise SeqmixError(f"input {name!r} has dynamic shape {shape}; give it min, opt and max shapes")
            if any(len(s) != len(shape) or any(d >= 0 and d != g for d, g in zip(shape, s)) for s in given):
                raise SeqmixError(f"input {name!r}: shapes {given} do not fit its declared shape {shape} (-1 = dynamic)")
            profile.set_shape(name, *given)
            dynamic = True
        elif given is not None and any(tuple(s) != shape for s in given):
            raise SeqmixError(f"input {name!r} is static with shape {shape}; the shapes given, {given}, differ")

    config = builder.create_builder_config()
    if dynamic:
        config.add_optimization_profile(profile)
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise SeqmixError(f"TensorRT {trt.__version__} has no FP16 builder flag: precision comes from the graph's types; export the model in float16 instead")
        config.set_flag(trt.BuilderFlag.FP16)
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        log = "\n".join(logger.messages[-20:])
        raise SeqmixError(f"TensorRT {trt.__version__} could not build an engine from {onnx_path}:\n{log}")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = new_file(engine_path.parent, f".{engine_path.name}.")
    try:
        with open(temporary, "wb") as file:
            file.write(memoryview(serialized))
        os.replace(temporary, engine_path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return engine_path


def run_engine(engine_path: str | os.PathLike, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Run a serialized engine once: {input name: tensor} -> {output name: CUDA tensor}."""
    import numpy as np
    import torch

    trt = _import_tensorrt()
    _require_cuda()
    logger = _logger(trt)
    runtime = trt.Runtime(logger)  # must outlive the engine
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise SeqmixError(f"{engine_path} is not an engine this TensorRT ({trt.__version__}) and GPU can load:\n" + "\n".join(logger.messages))
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    missing = sorted(set(input_names) - set(inputs))
    if missing:
        raise SeqmixError(f"inputs {missing} of the engine were not given; it takes {input_names}")

    def torch_dtype(name):
        return torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype

    keep = {}
    for name in input_names:
        tensor = torch.as_tensor(inputs[name]).to(device="cuda", dtype=torch_dtype(name)).contiguous()
        keep[name] = tensor
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    outputs = {}
    for name in names:
        if name in keep:
            continue
        outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=torch_dtype(name), device="cuda")
        context.set_tensor_address(name, outputs[name].data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise SeqmixError(f"TensorRT failed to run {engine_path}:\n" + "\n".join(logger.messages[-20:]))
    stream.synchronize()
    return outputs


def _shape_option(shapes: Mapping[str, Sequence[int]]) -> str:
    return ",".join(f"{name}:{'x'.join(str(int(d)) for d in shape)}" for name, shape in shapes.items())


def onnxruntime_tensorrt_session(
    onnx_path: str | os.PathLike,
    min_shapes: Mapping[str, Sequence[int]] | None = None,
    opt_shapes: Mapping[str, Sequence[int]] | None = None,
    max_shapes: Mapping[str, Sequence[int]] | None = None,
    fp16: bool = False,
    cache_dir: str | os.PathLike | None = None,
    fallback: bool = True,
    session_options=None,
):
    """An ONNX Runtime session that runs the graph through the TensorRT execution provider.

    Args:
        onnx_path: the exported graph.
        min_shapes, opt_shapes, max_shapes: an explicit optimization profile, {input: shape}
            (all three or none; without them the provider builds profiles from the shapes it sees).
        fp16: let TensorRT use FP16 kernels.
        cache_dir: keep built engines there across sessions.
        fallback: hand nodes TensorRT cannot take to the CUDA, then CPU, provider (else fail).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise SeqmixError("onnxruntime is not installed: pip install onnxruntime-gpu (with TensorRT and an NVIDIA GPU)") from None
    available = ort.get_available_providers()
    if "TensorrtExecutionProvider" not in available:
        raise SeqmixError(
            f"onnxruntime {ort.__version__} here offers {available}, not TensorrtExecutionProvider: it needs the "
            "GPU build (pip uninstall onnxruntime; pip install onnxruntime-gpu), the TensorRT and CUDA libraries "
            "(pip install tensorrt) on the library path, and an NVIDIA GPU"
        )
    if not Path(onnx_path).is_file():
        raise SeqmixError(f"onnx_path={str(onnx_path)!r} is not a file; expected an exported .onnx model")
    options: dict[str, str] = {"trt_fp16_enable": str(bool(fp16))}
    given = [shapes is not None for shapes in (min_shapes, opt_shapes, max_shapes)]
    if any(given):
        if not all(given):
            raise SeqmixError("give all of min_shapes, opt_shapes and max_shapes, or none")
        _check_profile(min_shapes, opt_shapes, max_shapes)
        options.update(
            trt_profile_min_shapes=_shape_option(min_shapes),
            trt_profile_opt_shapes=_shape_option(opt_shapes),
            trt_profile_max_shapes=_shape_option(max_shapes),
        )
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        options.update(trt_engine_cache_enable="True", trt_engine_cache_path=str(cache_dir))
    providers: list = [("TensorrtExecutionProvider", options)]
    if fallback:
        providers += [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    session = ort.InferenceSession(str(onnx_path), sess_options=session_options, providers=providers)
    if "TensorrtExecutionProvider" not in session.get_providers():
        # ONNX Runtime drops a provider whose libraries fail to load, with only a warning.
        raise SeqmixError(
            f"onnxruntime could not start TensorrtExecutionProvider (the session got {session.get_providers()}): "
            "are the TensorRT and CUDA libraries of the versions this onnxruntime-gpu was built with on the library path?"
        )
    return session
