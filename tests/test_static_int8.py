"""Static int8 (QDQ) for ONNX Runtime: the variant is calibrated on the task's validation batches,
runs, stays close to float32, and is recorded in the manifest with its metric change; bad
``quantize`` values are refused by name; the calibration and evaluation feeds are padded to the
graph's length unit."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix import SeqmixError
from seqmix.export.formats import QUANTIZATIONS, check_export_options, summary_lines
from seqmix.export.manifest import read_manifest, write_manifest
from seqmix.export.onnx_export import session
from seqmix.export.quantize import CALIBRATION_BATCHES, calibration_feeds, graph_inputs, make_variant, measured_variant
from seqmix.tasks.base import IGNORE, Batch
from seqmix.tasks.mqar import MQAR
from conftest import examples

PRESET = "tcnca"  # its chunked graph takes lengths in multiples of 128: the task's 100 tokens are padded


@pytest.fixture(scope="module")
def static_export(exported_presets, tmp_path_factory):
    """(model, export directory, manifest with the int8_static variant measured, task) for one tiny preset."""
    model, result = exported_presets(PRESET)
    out = tmp_path_factory.mktemp("static_int8")
    shutil.copyfile(result.parallel, out / result.parallel.name)
    manifest = {key: value for key, value in result.manifest.items() if key != "step"}
    manifest["parallel"] = {k: v for k, v in manifest["parallel"].items() if k != "optimized_file"}
    task = MQAR(vocab_size=model.vocab_size, seq_len=100, num_pairs=8)
    unit = manifest["parallel"]["length_unit"]
    manifest["quantized"] = {"int8_static": measured_variant("int8_static", out / result.parallel.name, task, 2 * unit, unit)}
    return model, out, write_manifest(out, manifest), task


def test_static_variant_is_recorded_in_the_manifest_with_its_metric_change(static_export):
    _, out, manifest, task = static_export
    entry = read_manifest(out)["quantized"]["int8_static"]  # the file is listed and its hash verified
    assert entry == manifest["quantized"]["int8_static"]
    assert entry["file"] == "model.int8_static.onnx" and entry["metric"] == task.metric == "accuracy"
    assert abs(entry["metric_change"]) <= 1.0, entry  # the target: at most 1 point
    assert entry["metric_change"] == pytest.approx(100 * (entry["metric_variant"] - entry["metric_fp32"]))
    assert entry["speedup"] == entry["fp32_latency"]["median_ms"] / entry["variant_latency"]["median_ms"]
    assert 0.15 < entry["size_ratio"] < 0.6, entry  # int8 weights, float32 norms and EMA parameters
    calibration = entry["calibration"]
    assert calibration["format"] == "QDQ" and calibration["batches"] * calibration["batch_size"] > 0
    assert calibration["quantized_nodes"] > 0
    (line,) = [text for text in _variant_lines(manifest) if text.startswith("int8_static")]
    assert "accuracy" in line and "calibrated on" in line


@pytest.mark.parametrize("kind", ["fp16", "int8"])
def test_a_variant_is_timed_at_whole_chunks_whatever_length_it_is_given(kind, static_export, tmp_path):
    # seqmix export quantize=fp16 length=16 on a model of 64-token chunks ended in ONNX Runtime's
    # Reshape error: the variant was timed at the length as given, which the chunked graph refuses.
    _, out, manifest, task = static_export
    unit = manifest["parallel"]["length_unit"]
    assert unit > 1
    shutil.copyfile(out / "model.onnx", tmp_path / "model.onnx")
    for length in (unit // 2, unit + 5):
        entry = measured_variant(kind, tmp_path / "model.onnx", task, length, unit)
        assert entry["variant_latency"]["median_ms"] > 0 and np.isfinite(entry["metric_variant"])


def _variant_lines(manifest: dict) -> list[str]:
    from seqmix.timing import Timing

    timing = Timing(median_ms=1.0, low_ms=1.0, high_ms=1.0, runs=1).as_dict()
    latency = {"batch": 1, "length": 128, "eager": timing, "onnxruntime": timing, "speedup": 1.0}
    return summary_lines({**manifest, "latency": latency})


def test_static_variant_holds_int8_weights_and_quantize_dequantize_pairs(static_export):
    _, out, manifest, _ = static_export
    graph = onnx.load(str(out / manifest["quantized"]["int8_static"]["file"])).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and np.prod(t.dims) >= 32 * 32]
    assert int8_weights, "no weight matrix was stored as int8"


@settings(max_examples=examples(12), deadline=None)
@given(index=st.integers(CALIBRATION_BATCHES[1], 10_000), rows=st.integers(1, 3), pad=st.integers(0, 99))
def test_static_variant_outputs_stay_close_to_float32(static_export, index, rows, pad):
    # Validation batches the variant was not calibrated on, the last row cut short by padding.
    _, out, manifest, task = static_export
    fp32, small = _sessions(out, manifest)
    batch = task.batch("valid", index, rows)
    if pad:
        mask = torch.zeros_like(batch.inputs, dtype=torch.bool)
        mask[-1, task.seq_len - pad:] = True
        batch = Batch(batch.inputs, batch.targets, mask)
    feed, _ = graph_inputs(batch, manifest["parallel"]["length_unit"])
    reference, quantized = fp32.run(None, feed)[0], small.run(None, feed)[0]
    kept = ~feed["padding_mask"]
    error = np.abs(reference - quantized)[kept]
    spread = reference[kept].max() - reference[kept].min()
    # The model is untrained, so its logits span little and its top tokens are near ties. Over 150
    # random validation batches the largest error reached 8% of the span, the mean 0.64%, and greedy
    # agreement fell to 80% (median 90%). Doubling half the graph's quantization scales gave a
    # largest error of 36% of the span, a mean of 4.7%, and 46% agreement.
    assert error.max() <= 0.1 * spread, f"max |fp32 − int8_static| = {error.max():.4f}, logits span {spread:.4f}"
    assert error.mean() <= 0.01 * spread, f"mean |fp32 − int8_static| = {error.mean():.4f}, logits span {spread:.4f}"
    assert error.max() > 0, "the variant computes exactly what float32 does: nothing was quantized"
    agree = (reference.argmax(-1) == quantized.argmax(-1))[kept].mean()
    assert agree >= 0.75, f"greedy tokens agree at {agree:.0%} of positions"


_SESSIONS: dict = {}


def _sessions(out, manifest):
    key = str(out)
    if key not in _SESSIONS:
        _SESSIONS[key] = (session(out / manifest["parallel"]["file"], threads=1),
                          session(out / manifest["quantized"]["int8_static"]["file"], threads=1))
    return _SESSIONS[key]


def test_static_variant_needs_calibration_batches(static_export):
    _, out, manifest, _ = static_export
    with pytest.raises(SeqmixError, match="int8_static.*calibrat"):
        make_variant("int8_static", out / manifest["parallel"]["file"])


ACCEPTED = [value for values in QUANTIZATIONS.values() for value in values]


@settings(max_examples=examples(60), deadline=None)
@given(fmt=st.sampled_from(sorted(QUANTIZATIONS)), value=st.text(min_size=1, max_size=12))
def test_a_bad_quantize_value_is_refused_by_name(fmt, value):
    if value in QUANTIZATIONS[fmt]:
        check_export_options(fmt, value, 128)
        return
    with pytest.raises(SeqmixError) as refused:
        check_export_options(fmt, value, 128)
    message = str(refused.value)
    assert repr(value) in message and f"format={fmt}" in message
    assert all(repr(accepted) in message for accepted in QUANTIZATIONS[fmt])


def test_onnx_takes_static_and_dynamic_int8_and_other_formats_refuse_static():
    assert {"int8", "int8_static", "fp16"} <= set(QUANTIZATIONS["onnx"])
    for fmt in ("executorch", "tensorrt"):
        with pytest.raises(SeqmixError, match=f"quantize='int8_static' is not valid for format={fmt}"):
            check_export_options(fmt, "int8_static", 128)
    with pytest.raises(SeqmixError, match="quantize='int4_static' is not valid.*'int8_static'"):
        make_variant("int4_static", Path("model.onnx"))


@settings(max_examples=examples(40), deadline=None)
@given(rows=st.integers(1, 3), length=st.integers(1, 40), unit=st.integers(1, 16), per_token=st.booleans(),
       padded=st.booleans(), seed=st.integers(0, 2**16))
def test_graph_inputs_pad_to_the_length_unit_and_score_nothing_there(rows, length, unit, per_token, padded, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (rows, length), generator=generator)
    targets = torch.randint(0, 50, (rows, length) if per_token else (rows,), generator=generator)
    mask = torch.rand(rows, length, generator=generator) < 0.3 if padded else None
    feed, padded_targets = graph_inputs(Batch(tokens, targets, mask), unit)
    total = feed["tokens"].shape[1]
    assert total % unit == 0 and length <= total < length + unit
    assert feed["tokens"].dtype == np.int64 and feed["padding_mask"].dtype == np.bool_
    np.testing.assert_array_equal(feed["tokens"][:, :length], tokens.numpy())
    given_mask = np.zeros((rows, length), dtype=bool) if mask is None else mask.numpy()
    np.testing.assert_array_equal(feed["padding_mask"][:, :length], given_mask)
    assert feed["padding_mask"][:, length:].all()
    if per_token:
        np.testing.assert_array_equal(padded_targets[:, :length], targets.numpy())
        assert (padded_targets[:, length:] == IGNORE).all()
    else:
        np.testing.assert_array_equal(padded_targets, targets.numpy())


def test_calibration_feeds_are_the_tasks_validation_batches_padded():
    task = MQAR(vocab_size=64, seq_len=100, num_pairs=4)
    feeds = list(calibration_feeds(task, 128, batch_size=2, batches=3))
    expected = list(task.eval_batches(2, 3))
    assert len(feeds) == 3
    for feed, batch in zip(feeds, expected):
        assert feed["tokens"].shape == (2, 128)
        np.testing.assert_array_equal(feed["tokens"][:, :100], batch.inputs.numpy())
