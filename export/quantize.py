"""Smaller ONNX variants: int8 dynamic quantization and float16, with their metric change measured."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from seqmix import SeqmixError
from seqmix.timing import time_calls

from .onnx_export import session

VARIANTS = ("int8", "fp16")


def quantize_int8(source: Path, target: Path) -> Path:
    """ONNX Runtime dynamic quantization: int8 weights of MatMul/Gemm and embedding tables (Gather), activations quantized on the fly."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_suffix(".pre.onnx")
    # Shape inference first: the quantizer needs shapes to pick what to quantize. Its graph
    # optimization is skipped because it would fold the EMA kernels (float32, larger than the
    # weights) into the file, as the exporter avoids doing (export/onnx_export.py).
    quant_pre_process(str(source), str(prepared), skip_optimization=True, skip_symbolic_shape=True)
    quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm", "Gather"])
    prepared.unlink()
    return target


def convert_fp16(source: Path, target: Path) -> Path:
    """Float16 weights and activations inside the graph; inputs and outputs keep their types."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))
    onnx.save(convert_float_to_float16(model, keep_io_types=True), str(target))
    return target


def make_variant(kind: str, source: Path) -> Path:
    """Write the ``kind`` variant of ``source`` beside it (model.int8.onnx, model.fp16.onnx)."""
    if kind not in VARIANTS:
        raise SeqmixError(f"quantize={kind!r} is not valid; expected one of {list(VARIANTS)}")
    target = source.with_name(f"{source.stem}.{kind}.onnx")
    return quantize_int8(source, target) if kind == "int8" else convert_fp16(source, target)


def evaluate_onnx(path: Path, task, batch_size: int = 8, batches: int = 8) -> dict[str, float]:
    """Loss and the task's metric of an exported parallel graph on the task's evaluation set."""
    from seqmix.tasks.base import IGNORE
    from seqmix.training.loop import task_scores

    runner = session(path)
    total, count, correct = 0.0, 0, 0
    for batch in task.eval_batches(batch_size, batches):
        mask = batch.padding_mask if batch.padding_mask is not None else np.zeros(batch.inputs.shape, dtype=bool)
        logits = runner.run(None, {"tokens": batch.inputs.numpy(), "padding_mask": np.asarray(mask)})[0].astype(np.float64)
        logits = logits.reshape(-1, logits.shape[-1])
        targets = batch.targets.numpy().reshape(-1)
        keep = targets != IGNORE
        shifted = logits[keep] - logits[keep].max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        total += float(-log_probs[np.arange(keep.sum()), targets[keep]].sum())
        correct += int((logits[keep].argmax(-1) == targets[keep]).sum())
        count += int(keep.sum())
    return task_scores(task, total, count, correct)


def compare_variant(reference: Path, variant: Path, task, length: int, metric: str) -> dict:
    """Size, speed and metric of ``variant`` against the float32 ``reference`` graph.

    ``speedup`` is the ratio of the median latencies at (1, length), float32 / variant;
    ``fp32_latency`` and ``variant_latency`` hold each side's Timing (median, fastest, slowest, runs).
    """
    tokens = np.random.default_rng(0).integers(0, task.vocab_size, size=(1, length)).astype(np.int64)
    feed = {"tokens": tokens, "padding_mask": np.zeros(tokens.shape, dtype=bool)}
    fp32, small = session(reference), session(variant)
    reference_scores, variant_scores = evaluate_onnx(reference, task), evaluate_onnx(variant, task)
    change = variant_scores[metric] - reference_scores[metric]
    fp32_latency, variant_latency = time_calls(lambda: fp32.run(None, feed)), time_calls(lambda: small.run(None, feed))
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
