"""One call per deployment format: export a trained model, verify it, measure it, describe it.

Each ``export_<format>`` writes its artifacts into ``out_dir`` and returns the manifest (a dict
that ``write_manifest`` stores as manifest.json, with every file's sha256 and size): the inputs,
outputs, dynamic dims, state layout, the impl each mixer used, the verification's max error and
the measured latency. ``export_model`` runs them in a staging directory that replaces the target
only once the export is complete (``staged_export``).

- onnx: parallel graph (dynamic batch and length) and step graph, verified with ONNX Runtime;
  optionally an int8 or fp16 variant with its metric change on the task's evaluation split; and
  a copy of ``run_onnx.py``, which runs the directory with ONNX Runtime and NumPy alone.
- executorch: .pte files of the parallel graph at one fixed (1, length) and of the decoder
  program (batch 1, 1 to one chunk of tokens per call), lowered to XNNPACK and verified with
  ``executorch.runtime``.
- tensorrt: the ONNX export, TensorRT's own operator check (the copied list without it), then
  (with TensorRT and an NVIDIA GPU) an engine with an optimization profile over batch 1..8 and
  length unit..length, verified.
"""
from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from seqmix import SeqmixError
from seqmix.errors import require_int, require_module, require_path, kind_of
from seqmix.timing import Timing, time_calls

from seqmix.contract import length_unit
from seqmix.model.sequence_model import SequenceModel
from seqmix.tasks.base import Task
from .agreement import max_difference
from .graphs import restores_model
from .manifest import COMPANIONS, FORMATS, staged_export, write_manifest
from .onnx_export import TOLERANCE, compare_latency, export_onnx as export_onnx_graphs, latency_entry

QUANTIZATIONS = {"onnx": ("int8", "int8_static", "fp16"), "executorch": ("int8",), "tensorrt": ("fp16",)}
"""The ``quantize`` values each format takes (dynamic int8, static int8 (QDQ) and fp16 ONNX variants,
fp16 TensorRT kernels)."""
ENGINE_MAX_BATCH = 8


class IncompleteExport(SeqmixError):
    """An export that wrote usable artifacts but could not finish (a TensorRT export without
    TensorRT or a GPU keeps its ONNX graphs and operator check): ``export_model`` still puts the
    directory, with ``manifest``, in place, then raises this error, naming what it kept. The
    ``seqmix`` command exits with ``exit_status``: the run failed part-way, after work that was
    kept, which is not the bad input that status 2 says was refused before any work."""

    exit_status = 1

    def __init__(self, message: str, manifest: dict):
        super().__init__(message)
        self.manifest = manifest


def check_export_options(kind: str, quantize: str | None, length: int) -> None:
    """Refuse a format, quantization or length that no exporter takes, before anything is written."""
    if kind not in FORMATS:
        raise SeqmixError(f"format={kind!r} is not valid; expected one of {list(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZATIONS[kind]:
        allowed = QUANTIZATIONS[kind]
        expected = f"one of {list(allowed)} or null" if allowed else f"null (format={kind} exports float32 only)"
        raise SeqmixError(f"quantize={quantize!r} is not valid for format={kind}; expected {expected}")
    require_int("export", "length", length, 1, "tokens of the verification and latency inputs")


def fit_length(model: nn.Module, length: int) -> int:
    """``length`` rounded down to a multiple of the model's largest chunk (at least one chunk)."""
    unit = length_unit(model)
    return max(unit, (length // unit) * unit)


def export_onnx(model: nn.Module, task, out_dir: Path, quantize: str | None = None, length: int = 1024) -> dict:
    """ONNX parallel and step graphs, eager vs ONNX Runtime latency at (1, length), and a variant."""
    from .quantize import measured_variant

    check_export_options("onnx", quantize, length)
    result = export_onnx_graphs(model, out_dir, measure_prefill=True)
    # The runner needs only ONNX Runtime and NumPy, so the directory runs wherever it is copied.
    shutil.copyfile(Path(__file__).with_name("run_onnx.py"), out_dir / "run_onnx.py")
    manifest = result.manifest
    manifest["latency"] = compare_latency(model, result.parallel, length=length)
    if quantize:
        unit = manifest["parallel"]["length_unit"]
        manifest["quantized"] = {quantize: measured_variant(quantize, result.parallel, task, length, unit)}
    return manifest


def export_executorch(model: nn.Module, task, out_dir: Path, quantize: str | None = None, length: int = 1024) -> dict:
    """ExecuTorch .pte files (parallel at (1, length), and step when the model streams), verified;
    with ``quantize="int8"`` also model.int8.pte (and step.int8.pte), measured against float32."""
    from .executorch_export import (compare_pte_variant, export_parallel_pte, export_step_pte, pte_runner,
                                    verify_pte_parallel, verify_pte_step)

    check_export_options("executorch", quantize, length)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    length = fit_length(model, length)
    manifest = {"format": "executorch", "vocab_size": model.vocab_size}
    parallel = out_dir / "model.pte"
    manifest["parallel"] = export_parallel_pte(model, parallel, length)
    manifest["parallel"]["max_error"] = _checked(verify_pte_parallel(model, parallel, length), "parallel .pte")
    manifest["impls"] = manifest["parallel"]["impls"]
    if model.causal and getattr(model.head, "per_token", False):
        step = out_dir / "step.pte"
        manifest["step"] = export_step_pte(model, step)
        manifest["step"]["max_error"] = _checked(verify_pte_step(model, step), "step .pte")
    tokens = torch.randint(0, model.vocab_size, (1, length))
    runner = pte_runner(parallel)
    with torch.no_grad():
        eager = time_calls(lambda: model(tokens))
    manifest["latency"] = latency_entry(1, length, eager, "executorch", time_calls(lambda: runner(tokens)))
    if quantize:
        variant, step_variant = out_dir / f"model.{quantize}.pte", None
        delegation = {"parallel": export_parallel_pte(model, variant, length, quantize=quantize)}
        if "step" in manifest:
            step_variant = out_dir / f"step.{quantize}.pte"
            delegation["step"] = export_step_pte(model, step_variant, quantize=quantize)
        entry = compare_pte_variant(model, task, parallel, variant, length, out_dir / "step.pte", step_variant)
        entry["delegation"] = {graph: {key: value[key] for key in ("delegated_nodes", "total_nodes", "delegated_subgraphs")}
                               for graph, value in delegation.items()}
        manifest["quantized"] = {quantize: entry}
    return manifest


def _checked(error: float, what: str) -> float:
    if not error <= TOLERANCE:
        raise SeqmixError(f"{what}: max |eager − ExecuTorch| = {error:.3e} exceeds the tolerance {TOLERANCE:.0e}")
    return error


def export_tensorrt(model: nn.Module, task, out_dir: Path, quantize: str | None = None, length: int = 1024) -> dict:
    """The ONNX export with TensorRT's operator check, then an engine built and verified on the GPU.

    Without TensorRT or a GPU, it raises IncompleteExport, which says what is missing and carries
    the manifest of the ONNX graphs and the operator check, which ``export_model`` still writes.
    """
    from .tensorrt import build_engine, run_engine, tensorrt_checks

    check_export_options("tensorrt", quantize, length)
    manifest = export_onnx(model, task, out_dir, length=length)
    manifest["format"] = "tensorrt"
    graphs = {"parallel": out_dir / "model.onnx", "step": out_dir / "step.onnx"}
    manifest["tensorrt_check"] = tensorrt_checks(graphs)
    unit, length = length_unit(model), fit_length(model, length)
    shapes = {
        "min": {"tokens": (1, unit), "padding_mask": (1, unit)},
        "opt": {"tokens": (1, length), "padding_mask": (1, length)},
        "max": {"tokens": (ENGINE_MAX_BATCH, length), "padding_mask": (ENGINE_MAX_BATCH, length)},
    }
    try:
        engine = build_engine(graphs["parallel"], out_dir / "model.engine", shapes["min"], shapes["opt"], shapes["max"])
    except SeqmixError as error:
        raise IncompleteExport(str(error), manifest) from None
    tokens = torch.randint(0, model.vocab_size, (2, length))
    feed = {"tokens": tokens, "padding_mask": torch.zeros_like(tokens, dtype=torch.bool)}
    with torch.no_grad():
        expected = model(tokens).numpy()
    got = next(iter(run_engine(engine, feed).values())).float().cpu().numpy()
    worst = max_difference(expected, got, "TensorRT engine")
    manifest["engine"] = {
        "file": engine.name,
        "profile": {k: {n: list(s) for n, s in v.items()} for k, v in shapes.items()},
        "max_error": _checked_engine(worst),
    }
    return manifest


def _checked_engine(error: float) -> float:
    # TensorRT may reorder reductions and pick TF32-free but fused kernels: allow 10x the ONNX tolerance.
    if not error <= 10 * TOLERANCE:
        raise SeqmixError(f"TensorRT engine: max |eager − TensorRT| = {error:.3e} exceeds {10 * TOLERANCE:.0e}")
    return error


EXPORTERS = {"onnx": export_onnx, "executorch": export_executorch, "tensorrt": export_tensorrt}


@restores_model
def export_model(model: nn.Module, task, kind: str, out_dir: str | Path, quantize: str | None = None, length: int = 1024,
                 files: Mapping[str, bytes] | None = None) -> dict:
    """Export ``model`` to ``kind`` in ``out_dir``, write manifest.json there and return it.

    ``files`` are the model's companions saved beside its weights (``tokenizer.json``, ``labels.json``);
    they are copied into the export, and the manifest names them (``tokenizer``, ``labels``) so the
    runners encode prompts and decode tokens and classes as training did.

    Nothing is written before the options and the target are checked: ``out_dir`` must be absent,
    empty or an earlier export (``check_export_target``), which is replaced only once the new
    export is complete; an export that fails or is killed part-way leaves it as it was.
    """
    require_module("export: model", model)
    # Checked before any graph is written: a Linear, or a task of None, failed with an AttributeError
    # after the export's work was done.
    if not isinstance(model, SequenceModel):
        raise SeqmixError(f"export: model must be a seqmix model (seqmix.instantiate_model, load_model or from_pretrained), "
                          f"got {kind_of(model)}")
    if not isinstance(task, Task):
        raise SeqmixError(f"export: task must be a seqmix task (seqmix.tasks.build_task), got {task!r}")
    check_export_options(kind, quantize, length)
    require_path("export: out_dir", out_dir)  # the text itself: Path("") would be the current folder
    files = dict(files or {})
    unknown = sorted(set(files) - set(COMPANIONS))
    if unknown:
        raise SeqmixError(f"export: files={sorted(files)} is not valid; the companions an export carries are {sorted(COMPANIONS)}")
    incomplete = None
    with staged_export(Path(out_dir)) as staging:
        try:
            manifest = EXPORTERS[kind](model, task, staging, quantize, length)
        except IncompleteExport as error:
            manifest, incomplete = error.manifest, error
        manifest["task"] = {"name": type(task).name, "head": task.head, "metric": task.metric}
        manifest["length_requested"] = length
        for name, content in files.items():
            (staging / name).write_bytes(content)
            manifest[COMPANIONS[name]] = name
        manifest = write_manifest(staging, manifest)
    if incomplete is not None:
        kept = ", ".join(sorted(path.name for path in Path(out_dir).iterdir()))
        raise IncompleteExport(f"{incomplete}; what was exported before it is kept in {out_dir}: {kept}", manifest)
    return manifest


RUNTIME_NAMES = {"onnx": ("onnxruntime", "ONNX Runtime"), "tensorrt": ("onnxruntime", "ONNX Runtime"),
                 "executorch": ("executorch", "ExecuTorch")}
"""Per format: the key of the deployed side in the manifest's ``latency`` (``latency_entry``), and its name."""


def summary_lines(manifest: dict) -> list[str]:
    """What an export verified and measured, as lines to print."""
    kind = manifest["format"]
    key, runtime = RUNTIME_NAMES[kind]
    lines = [f"parallel graph: max |eager − {runtime}| = {manifest['parallel']['max_error']:.2e}"]
    if "step" in manifest:
        lines.append(f"step graph: streamed tokens agree to {manifest['step']['max_error']:.2e}")
    prefill = manifest.get("step", {}).get("prefill")
    if prefill is not None:
        whole, stepped = Timing(**prefill["one_call"]), Timing(**prefill["token_by_token"])
        lines.append(f"prefill of {prefill['tokens']} tokens through the step graph: one call {whole}, token by token "
                     f"{stepped} ({prefill['speedup']:.1f}x)")
    latency = manifest["latency"]
    eager, deployed = Timing(**latency["eager"]), Timing(**latency[key])
    requested = manifest.get("length_requested", latency["length"])
    taken = "" if requested == latency["length"] else (
        f" (length={requested} taken as {latency['length']}: whole chunks of the model's largest chunk)")
    lines.append(f"latency at B={latency['batch']}, L={latency['length']}{taken}: eager {eager}, {runtime} {deployed} "
                 f"({latency['speedup']:.2f}x, ratio of medians)")
    for name, variant in manifest.get("quantized", {}).items():
        calibration = variant.get("calibration")
        calibrated = f", calibrated on {calibration['batches']} validation batches of {calibration['batch_size']}" if calibration else ""
        lines.append(f"{name}: {variant['speedup']:.2f}x speed, {100 * variant['size_ratio']:.0f}% size, "
                     f"{variant['metric']} {variant['metric_fp32']:.4f} -> {variant['metric_variant']:.4f}{calibrated}")
    for graph, report in manifest.get("tensorrt_check", {}).items():
        verdict = "OK" if report["ok"] else "NOT OK: " + "; ".join(report["flags"])
        lines.append(f"TensorRT {report['tensorrt_version']} parser check of the {graph} graph ({report['source']}): {verdict}")
    if "engine" in manifest:
        lines.append(f"TensorRT engine {manifest['engine']['file']}: max |eager − TensorRT| = {manifest['engine']['max_error']:.2e}")
    return lines
