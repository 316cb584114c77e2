"""Smaller ONNX variants of the parallel graph, with their size, speed and metric change measured.

- ``int8``: ONNX Runtime dynamic quantization: int8 weights, activations quantized on the fly.
- ``int8_static``: static QDQ quantization: int8 weights and activation scales fixed beforehand by
  calibrating on the task's validation batches (``calibration_feeds``).
- ``fp16``: float16 inside the graph, float32 inputs and outputs.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from seqmix import SeqmixError
from seqmix.errors import is_choice
from seqmix.timing import summarize, time_once

from .onnx_export import session

VARIANTS = ("int8", "fp16")
"""Variants made from the graph alone."""
CALIBRATED_VARIANTS = ("int8_static",)
"""Variants calibrated on the task's validation batches (``make_variant``'s ``calibration``)."""


def _prepared(source: Path, target: Path) -> Path:
    """``source`` with inferred shapes, written beside ``target``: the quantizers need shapes to pick what to quantize.

    ONNX Runtime's graph optimization is skipped because it would fold the EMA kernels (float32,
    larger than the weights) into the file, as the exporter avoids doing (export/onnx_export.py).
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_suffix(".pre.onnx")
    quant_pre_process(str(source), str(prepared), skip_optimization=True, skip_symbolic_shape=True)
    return prepared


def quantize_int8(source: Path, target: Path) -> Path:
    """ONNX Runtime dynamic quantization: int8 weights of MatMul/Gemm and embedding tables (Gather), activations quantized on the fly."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    prepared = _prepared(source, target)
    quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm", "Gather"])
    prepared.unlink()
    return target


class _Feeds:
    """An ONNX Runtime ``CalibrationDataReader`` (it needs only ``get_next``) over prepared feeds."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


STATIC_OP_TYPES = ("MatMul", "Gemm")
STATIC_METHOD = "MinMax"
"""What ``quantize_int8_static`` quantizes: the matrix products with a constant weight (measured in
tools/perf/static_int8.md). Norms, the EMA's arithmetic and attention stay float32."""


def _weight_products(path: Path, op_types: Iterable[str]) -> list[str]:
    """Names of the top-level nodes of ``op_types`` whose second operand depends on stored weights alone.

    That includes a weight the graph transposes first (a tied embedding read as the output layer),
    which the exporter leaves unfolded (it folds only small tensors).
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constant = {t.name for t in graph.initializer}
    for node in graph.node:  # nodes are stored in topological order
        if node.op_type == "Constant" or (node.input and all(not name or name in constant for name in node.input)):
            constant.update(node.output)
    wanted = set(op_types)
    return [node.name for node in graph.node if node.op_type in wanted and node.input[1] in constant]


def quantize_int8_static(source: Path, target: Path, calibration: Iterable[dict[str, np.ndarray]],
                         op_types: Iterable[str] = STATIC_OP_TYPES, per_channel: bool = True,
                         method: str = STATIC_METHOD, products: str = "weights") -> Path:
    """ONNX Runtime static quantization in the QDQ format, calibrated on ``calibration``.

    Args:
        source, target: the float32 parallel graph and where the variant is written.
        calibration: feeds of the graph ({input name: array}), e.g. ``calibration_feeds``; each
            quantized tensor's scale comes from the values it took on them.
        op_types: the ONNX op types whose inputs are quantized.
        per_channel: one weight scale per output channel (else one per tensor).
        method: the calibration method: ``MinMax``, ``Entropy`` or ``Percentile``.
        products: which nodes of ``op_types`` are quantized: ``weights``, those whose second operand
            is a stored weight (activation × activation products, as in attention, stay float32), or
            ``all``.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"MinMax": CalibrationMethod.MinMax, "Entropy": CalibrationMethod.Entropy, "Percentile": CalibrationMethod.Percentile}
    if not is_choice(method, methods):
        raise SeqmixError(f"calibration method={method!r} is not valid; expected one of {list(methods)}")
    if products not in ("weights", "all"):
        raise SeqmixError(f"products={products!r} is not valid; expected 'weights' or 'all'")
    prepared = _prepared(source, target)
    # ONNX Runtime's MatMulConstBOnly option is not honoured by the QDQ quantizer: name the nodes instead.
    nodes = _weight_products(prepared, op_types) if products == "weights" else None
    try:
        # Unsigned activations with signed weights (U8S8) are the pairing ONNX Runtime's x86 int8 kernels run fastest.
        # The products' outputs stay float32: every consumer is a float op, and a quantize/dequantize pair
        # after each product made the variant slower than dynamic int8; without it ONNX Runtime fuses each
        # product into one MatMulIntegerToFloat.
        quantize_static(str(prepared), str(target), _Feeds(calibration), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(op_types), per_channel=per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=methods[method], nodes_to_quantize=nodes,
                        extra_options={"OpTypesToExcludeOutputQuantization": list(op_types)})
    finally:
        prepared.unlink()
    return target


def convert_fp16(source: Path, target: Path) -> Path:
    """Float16 weights and activations inside the graph; inputs and outputs keep their types."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))
    onnx.save(convert_float_to_float16(model, keep_io_types=True), str(target))
    return target


def make_variant(kind: str, source: Path, calibration: Iterable[dict[str, np.ndarray]] | None = None) -> Path:
    """Write the ``kind`` variant of ``source`` beside it (model.int8.onnx, model.int8_static.onnx, model.fp16.onnx).

    ``calibration``: feeds of the graph (``calibration_feeds``), needed by the calibrated variants.
    """
    if kind not in VARIANTS + CALIBRATED_VARIANTS:
        raise SeqmixError(f"quantize={kind!r} is not valid; expected one of {list(VARIANTS + CALIBRATED_VARIANTS)}")
    if kind in CALIBRATED_VARIANTS and calibration is None:
        raise SeqmixError(f"quantize={kind!r} is calibrated on the task's validation batches; pass calibration=calibration_feeds(task, length_unit)")
    target = source.with_name(f"{source.stem}.{kind}.onnx")
    if kind == "int8_static":
        return quantize_int8_static(source, target, calibration)
    return quantize_int8(source, target) if kind == "int8" else convert_fp16(source, target)


CALIBRATION_BATCHES = (8, 8)
"""(batch size, batches) of the task's validation split that calibrate a static variant: the
evaluation set ``evaluate_onnx`` scores, so the metric change is measured on the data the scales
were fitted to, as a deployment calibrated on its own validation data would be."""


def quantized_products(path: Path) -> int:
    """How many matrix products of a QDQ graph read a dequantized (int8) operand."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return sum(1 for node in graph.node if node.op_type in ("MatMul", "Gemm") and any(i in dequantized for i in node.input))


def measured_variant(kind: str, parallel: Path, task, length: int, length_unit: int) -> dict:
    """Make the ``kind`` variant of the parallel graph and measure it against float32 (``compare_variant``).

    A calibrated variant is calibrated on the task's validation batches, padded to ``length_unit``,
    and its entry says how (``calibration``).
    """
    batch_size, batches = CALIBRATION_BATCHES
    calibration = calibration_feeds(task, length_unit, batch_size, batches) if kind in CALIBRATED_VARIANTS else None
    variant = make_variant(kind, parallel, calibration)
    entry = compare_variant(parallel, variant, task, length, task.metric, length_unit)
    if calibration is not None:
        entry["calibration"] = {
            "format": "QDQ", "method": STATIC_METHOD, "per_channel": True, "activations": "uint8", "weights": "int8",
            "op_types": list(STATIC_OP_TYPES), "batch_size": batch_size, "batches": batches,
            "quantized_nodes": quantized_products(variant),
        }
    return entry


def graph_inputs(batch, length_unit: int = 1) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The parallel graph's feed for a task batch, and the batch's targets.

    The graph takes lengths that are multiples of ``length_unit`` (the manifest's
    ``parallel.length_unit``): tokens (B, L) int64 and padding_mask (B, L) bool are padded on the
    right to the next multiple, the padding masked, and per-token targets (B, L) padded with
    ``IGNORE`` so nothing is scored there; class targets (B,) are returned as they are.
    """
    from seqmix.tasks.base import IGNORE

    tokens = batch.inputs.numpy().astype(np.int64)
    mask = np.zeros(tokens.shape, dtype=bool) if batch.padding_mask is None else batch.padding_mask.numpy().astype(bool)
    targets = batch.targets.numpy()
    extra = -tokens.shape[1] % length_unit
    if extra:
        tokens = np.pad(tokens, ((0, 0), (0, extra)))
        mask = np.pad(mask, ((0, 0), (0, extra)), constant_values=True)
        if targets.ndim == 2:
            targets = np.pad(targets, ((0, 0), (0, extra)), constant_values=IGNORE)
    return {"tokens": tokens, "padding_mask": mask}, targets


def calibration_feeds(task, length_unit: int, batch_size: int = 8, batches: int = 8) -> Iterator[dict[str, np.ndarray]]:
    """Feeds of the parallel graph from the task's validation batches (``task.eval_batches``), for calibration."""
    for batch in task.eval_batches(batch_size, batches):
        yield graph_inputs(batch, length_unit)[0]


def evaluate_onnx(path: Path, task, batch_size: int = 8, batches: int = 8, length_unit: int = 1) -> dict[str, float]:
    """Loss and the task's metric of an exported parallel graph on the task's evaluation set.

    ``length_unit``: the graph's (manifest ``parallel.length_unit``); batches are padded to it (``graph_inputs``).
    """
    from seqmix.tasks.base import IGNORE
    from seqmix.training.loop import task_scores

    runner = session(path)
    total, count, correct = 0.0, 0, 0
    for batch in task.eval_batches(batch_size, batches):
        feed, targets = graph_inputs(batch, length_unit)
        logits = runner.run(None, feed)[0].astype(np.float64)
        logits = logits.reshape(-1, logits.shape[-1])
        targets = targets.reshape(-1)
        keep = targets != IGNORE
        shifted = logits[keep] - logits[keep].max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        total += float(-log_probs[np.arange(keep.sum()), targets[keep]].sum())
        correct += int((logits[keep].argmax(-1) == targets[keep]).sum())
        count += int(keep.sum())
    return task_scores(task, total, count, correct)


def interleaved_latency(first, second, feed: dict[str, np.ndarray], repeats: int = 7, warmup: int = 2):
    """Timings of two sessions on ``feed``, their calls interleaved (a b a b ...) so a shared machine's drift hits both."""
    for _ in range(warmup):
        first.run(None, feed), second.run(None, feed)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for runner, spent in zip((first, second), times):
            spent.append(time_once(lambda r=runner: r.run(None, feed)))
    return summarize(times[0]), summarize(times[1])


def compare_variant(reference: Path, variant: Path, task, length: int, metric: str, length_unit: int = 1) -> dict:
    """Size, speed and metric of ``variant`` against the float32 ``reference`` graph.

    ``speedup`` is the ratio of the median latencies at (1, length), float32 / variant, their calls
    interleaved; ``fp32_latency`` and ``variant_latency`` hold each side's Timing (median, fastest,
    slowest, runs). The metric is measured on the task's evaluation batches padded to ``length_unit``.
    ``length`` is taken down to whole units (at least one), the only lengths the graph takes.
    """
    length = max(length_unit, length // length_unit * length_unit)
    tokens = np.random.default_rng(0).integers(0, task.vocab_size, size=(1, length)).astype(np.int64)
    feed = {"tokens": tokens, "padding_mask": np.zeros(tokens.shape, dtype=bool)}
    fp32, small = session(reference), session(variant)
    reference_scores = evaluate_onnx(reference, task, length_unit=length_unit)
    variant_scores = evaluate_onnx(variant, task, length_unit=length_unit)
    change = variant_scores[metric] - reference_scores[metric]
    fp32_latency, variant_latency = interleaved_latency(fp32, small, feed)
    return {
        "file": variant.name,
        "size_ratio": variant.stat().st_size / reference.stat().st_size,
        "speedup": fp32_latency.median_ms / variant_latency.median_ms,
        "fp32_latency": fp32_latency.as_dict(),
        "variant_latency": variant_latency.as_dict(),
        "metric": metric,
        "metric_fp32": reference_scores[metric],
        "metric_variant": variant_scores[metric],
        # Accuracy change in points (×100); bits per byte as is.
        "metric_change": 100 * change if metric == "accuracy" else change,
    }
