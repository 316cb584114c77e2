"""ONNX export of a seqmix model: the parallel graph and the step graph, verified with ONNX Runtime.

- ``model.onnx``: token ids (B, L) -> logits, with B dynamic and L a dynamic multiple of the
  model's chunk size (``length_unit``); the chunked EMA carries its state across chunks with an
  ONNX ``Scan``. ``model.ort.onnx`` beside it is ONNX Runtime's optimized graph.
- ``step.onnx``: (token ids (1, 1), state_0 ... state_k) -> (logits (1, 1, V), new state_0 ...
  new state_k), every state tensor of fixed shape, so a device streams with constant memory; its
  EMA/CEMA run their recurrent path (one step, no chunk padding).

The exporter's default optimizer constant-folds every tensor derived from parameters alone, such
as the EMA's per-chunk kernels (D, N, C) of each layer, into the file. That doubled mega's
model.onnx and left its int8 variant larger than float32, since the quantizer only shrinks MatMul
weights. ``_optimize`` runs the same optimizer with folding limited to small tensors; ONNX Runtime
folds the large ones in memory when a session starts.

Every export is checked against eager at shapes other than the traced ones before it is
reported; a mismatch raises ``ExportMismatch`` with the largest error and where it occurred.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.export import Dim
from torch.utils._pytree import tree_flatten

from seqmix import SeqmixError
from seqmix.errors import first_few, require_module, require_writable_dir
from seqmix.contract import length_unit
from seqmix.timing import Timing, time_calls

from .graphs import (ParallelGraph, StepGraph, quiet_exporters, require_stream_matches_forward, restores_model, size_oblivious,
                     stream_limit, use_exportable_paths)
from .agreement import as_array, first_index, max_difference
from .manifest import initial_fill

OPSET = 23
TOLERANCE = 1e-4
FOLD_LIMIT = 1024
"""Largest tensor (elements) the exporter may constant-fold into the file."""


class ExportMismatch(SeqmixError):
    """An exported graph disagrees with eager beyond the tolerance."""


def _require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise SeqmixError("ONNX export needs onnxruntime and onnxscript: pip install onnx onnxruntime onnxscript") from None
    return onnxruntime


def session(path: str | Path | bytes, optimized_path: str | Path | None = None, threads: int | None = None):
    """An ONNX Runtime CPU session for a file (or a serialized model); with ``optimized_path`` it
    also saves the optimized graph there.

    ``threads`` defaults to torch's intra-op thread count, so ONNX Runtime and eager PyTorch are
    timed on the same number of cores and follow the same thread policy.
    """
    ort = _require_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads or torch.get_num_threads()
    if optimized_path is not None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized_path)
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _io_spec(values) -> list[dict]:
    return [{"name": v.name, "shape": [d if isinstance(d, int) else str(d) for d in v.shape], "dtype": v.type} for v in values]


def _compare(reference: np.ndarray, result: np.ndarray, what: str, tolerance: float) -> float:
    """Max |reference − result| (``max_difference``); raise ExportMismatch naming where it is when above tolerance."""
    worst = max_difference(reference, result, what)
    if worst > tolerance:
        difference = np.abs(as_array(reference) - as_array(result))
        where = first_index(~(difference <= tolerance))
        raise ExportMismatch(f"{what}: max |eager − exported| = {worst:.3e} at index {where} > tolerance {tolerance:.0e}")
    return worst


@dataclass
class OnnxExport:
    """Files written and how well they agree with eager."""

    manifest: dict
    parallel: Path
    step: Path | None


def _optimize(program) -> None:
    """onnxscript's graph cleanup (Split for sequence ops, dead nodes, small constants) without
    folding large parameter-derived tensors into the file; and no per-node stack traces, which the
    exporter records for debugging (8% of mega's file, and paths of the machine that exported it)."""
    from onnx_ir.traversal import RecursiveGraphIterator
    from onnxscript import optimizer

    optimizer.optimize_ir(program.model, output_size_limit=FOLD_LIMIT)
    for node in RecursiveGraphIterator(program.model.graph):
        node.metadata_props.clear()


def export_parallel(model: nn.Module, path: Path, tolerance: float = TOLERANCE) -> dict:
    """Write the parallel graph and check it with ONNX Runtime at two untraced shapes."""
    unit = length_unit(model)
    example = torch.randint(0, model.vocab_size, (2, 2 * unit))
    mask = torch.zeros(2, 2 * unit, dtype=torch.bool)
    dims = {0: Dim("batch", min=1, max=1024), 1: unit * Dim("units", min=1, max=1024)}
    with size_oblivious(), torch.no_grad(), quiet_exporters():
        program = torch.onnx.export(ParallelGraph(model).eval(), (example, mask), dynamic_shapes=(dims, dims), dynamo=True,
                                    optimize=False, opset_version=OPSET, verbose=False, input_names=["tokens", "padding_mask"],
                                    output_names=["logits"])
    _optimize(program)
    program.save(str(path))
    optimized = path.with_suffix(".ort.onnx")
    runner = session(path, optimized_path=optimized)
    worst = 0.0
    generator = torch.Generator().manual_seed(0)
    for batch, units in ((1, 1), (3, 3)):
        tokens = torch.randint(0, model.vocab_size, (batch, units * unit), generator=generator)
        mask = torch.zeros(batch, units * unit, dtype=torch.bool)
        mask[-1, units * unit // 2 :] = True  # one right-padded row
        with torch.no_grad():
            expected = model(tokens, mask).numpy()
        got = runner.run(None, {"tokens": tokens.numpy(), "padding_mask": mask.numpy()})[0]
        worst = max(worst, _compare(expected, got, f"parallel graph at B={batch}, L={units * unit}", tolerance))
    return {
        "file": path.name,
        "optimized_file": optimized.name,
        "inputs": _io_spec(runner.get_inputs()),
        "outputs": _io_spec(runner.get_outputs()),
        "dynamic_dims": {"batch": "1..1024", "length": f"multiple of {unit}, up to {1024 * unit}"},
        "length_unit": unit,
        "max_error": worst,
    }


def _state_entry(name: str, initial: torch.Tensor, output: str) -> dict:
    """A state tensor's layout per sequence, its output name and its initial value, which is one
    constant (0, or −1 for empty cache slots). ``shape`` is ["batch", ...]: the first dim is B."""
    return {"name": name, "output": output, "shape": ["batch", *initial.shape[1:]],
            "dtype": str(initial.dtype).replace("torch.", ""), "fill": initial_fill(name, initial)}


STEP_CHECKS = ((1, (1, 5, 1)), (3, (2, 1, 1)), (2, (1, 3)))
"""(B, token counts of successive calls) the decoder graph is checked at, none of them the traced (2, 5);
``export_step`` adds one call of two chunks and a bit, so a prefill crosses chunk boundaries."""


def export_step(model: nn.Module, path: Path, tolerance: float = TOLERANCE) -> dict:
    """Write the decoder graph (any B, any T) and check streams of several (B, T) against eager ``step``."""
    from seqmix.contract import any_token_count

    require_stream_matches_forward(model, "decoder graph")
    graph = StepGraph(model, batch_size=2).eval()
    state = graph.initial_state(2)
    limit = stream_limit(model)
    traced_tokens = min(5, limit)
    example = torch.zeros(2, traced_tokens, dtype=torch.long)
    batch, tokens = Dim("batch", min=1, max=1024), Dim("tokens", min=1, max=limit)
    dims = ({0: batch, 1: tokens}, tuple({0: batch} for _ in state))
    with size_oblivious(), any_token_count(), torch.no_grad(), quiet_exporters():
        program = torch.onnx.export(graph, (example, *state), dynamic_shapes=dims, dynamo=True, optimize=False,
                                    opset_version=OPSET, verbose=False, input_names=["input_ids", *graph.state_names],
                                    output_names=["logits", *graph.present_names])
    _optimize(program)
    program.save(str(path))
    runner = session(path)
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    prefill = min(2 * length_unit(model) + 3, limit - 2)
    checks = [*STEP_CHECKS, (1, (prefill, 1))]
    for rows, calls in checks:
        if sum(calls) > limit:
            continue
        eager_state = model.init_state(rows)
        onnx_state = [t.numpy() for t in graph.initial_state(rows)]
        for call, count in enumerate(calls):
            ids = torch.randint(0, model.vocab_size, (rows, count), generator=generator)
            with torch.no_grad():
                expected, eager_state = model.step(ids, eager_state)
            outputs = runner.run(None, {"input_ids": ids.numpy(), **dict(zip(graph.state_names, onnx_state))})
            onnx_state = outputs[1:]
            where = f"decoder graph at B={rows}, call {call} of T={count}"
            worst = max(worst, _compare(expected.numpy(), outputs[0], where, tolerance))
        for name, want, got in zip(graph.state_names, tree_flatten(eager_state)[0], onnx_state):
            if want.is_floating_point():
                worst = max(worst, _compare(want.numpy(), got, f"decoder graph state {name} at B={rows}", tolerance))
            elif not np.array_equal(want.numpy(), got):
                raise ExportMismatch(f"decoder graph state {name} at B={rows} differs from eager")
    return {
        "file": path.name,
        "inputs": _io_spec(runner.get_inputs()),
        "outputs": _io_spec(runner.get_outputs()),
        "state": [_state_entry(name, tensor, present) for name, present, tensor in
                  zip(graph.state_names, graph.present_names, graph.initial_state(1))],
        "tokens_per_call": f"1..{limit}",
        "dynamic_dims": {"batch": "1..1024", "tokens": f"1..{limit}"},
        "checked_at": [{"batch": rows, "tokens": list(calls)} for rows, calls in checks if sum(calls) <= limit],
        "max_error": worst,
    }


@restores_model
def export_onnx(model: nn.Module, out_dir: str | Path, tolerance: float = TOLERANCE, measure_prefill: bool = False) -> OnnxExport:
    """Export ``model`` (in eval mode on its exportable paths, both restored afterwards) into ``out_dir``,
    a new or empty folder; return the manifest section.

    The step graph is written for causal models with a per-token head; ``measure_prefill`` also
    times a prompt through it in one call against token by token (``compare_prefill``; ``seqmix
    export`` does, into the manifest's ``step.prefill``).
    """
    require_module("export_onnx: model", model)
    require_writable_dir("export_onnx: out_dir", out_dir)
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        # Its model.onnx and step.onnx replaced the user's files of those names without a word.
        raise SeqmixError(f"export_onnx: out_dir={str(out_dir)!r} holds {first_few(sorted(p.name for p in out_dir.iterdir()))}; "
                          "give a new or empty folder (seqmix.export.formats.export_model, as `seqmix export`, "
                          "replaces an earlier export whole)")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    impls = use_exportable_paths(model)
    manifest = {"format": "onnx", "opset": OPSET, "impls": impls, "vocab_size": model.vocab_size}
    manifest["parallel"] = export_parallel(model, out_dir / "model.onnx", tolerance)
    step_path = None
    if model.causal and getattr(model.head, "per_token", False):
        step_path = out_dir / "step.onnx"
        manifest["step"] = export_step(model, step_path, tolerance=tolerance)
        if measure_prefill:
            manifest["step"]["prefill"] = compare_prefill(step_path, manifest["step"], model.vocab_size)
        (out_dir / GENAI_CONFIG).write_text(json.dumps(genai_config(model, manifest["step"]), indent=2))
        manifest["step"]["genai_config"] = GENAI_CONFIG
    return OnnxExport(manifest, out_dir / "model.onnx", step_path)


PREFILL_TOKENS = 512


def compare_prefill(path: Path, step: dict, vocab_size: int, tokens: int = PREFILL_TOKENS, repeats: int = 3) -> dict:
    """A prompt of ``tokens`` tokens through the decoder graph in ONNX Runtime, in one call against one
    token per call (B = 1, the same graph and session): medians, spread and the speed-up."""
    limit = int(step["dynamic_dims"]["tokens"].split("..")[1])
    tokens = min(tokens, limit)
    runner = session(path)
    names = [entry["name"] for entry in step["state"]]
    initial = {entry["name"]: np.full([1, *entry["shape"][1:]], entry["fill"], dtype=np.dtype(entry["dtype"]))
               for entry in step["state"]}
    prompt = np.random.default_rng(0).integers(0, vocab_size, size=(1, tokens))

    def one_call():
        runner.run(None, {"input_ids": prompt, **initial})

    def token_by_token():
        state = initial
        for t in range(tokens):
            outputs = runner.run(None, {"input_ids": prompt[:, t : t + 1], **state})
            state = dict(zip(names, outputs[1:]))

    whole = time_calls(one_call, repeats=repeats, warmup=1)
    stepped = time_calls(token_by_token, repeats=repeats, warmup=1)
    return {"tokens": tokens, "one_call": whole.as_dict(), "token_by_token": stepped.as_dict(),
            "speedup": stepped.median_ms / whole.median_ms}


GENAI_CONFIG = "genai_config.json"
GENAI_DIFFERENCES = [
    "no attention_mask or position_ids inputs: positions live in the state (past_state.pos), and every row of a "
    "batch advances by the same T tokens per call",
    "recurrent state beside the key/value caches: past_state.{i}.* in, present.{i}.* out, listed in decoder.state",
    "each key/value cache is a ring of fixed capacity (past_state.{i}.*key_pos holds each slot's position, -1 "
    "when empty), so present.* has the shape of past_* and buffers can be reused; there is no past sequence axis",
    "type 'seqmix' is not a model type ONNX Runtime GenAI builds: drive the graph with ONNX Runtime itself "
    "(run_onnx.py, or the JavaScript client in tools/js)",
]


def genai_config(model: nn.Module, step: dict) -> dict:
    """The decoder graph described in ONNX Runtime GenAI's ``genai_config.json`` layout, with what differs."""
    state = step["state"]
    key_layers = sorted({int(entry["name"].split(".")[1]) for entry in state if entry["name"].startswith("past_key_values.")})
    inputs = {"input_ids": "input_ids"}
    outputs = {"logits": "logits"}
    if key_layers:
        inputs.update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
        outputs.update(present_key_names="present.%d.key", present_value_names="present.%d.value")
    limit = int(step["dynamic_dims"]["tokens"].split("..")[1])
    return {
        "model": {
            "type": "seqmix",
            "vocab_size": model.vocab_size,
            "context_length": limit,
            "decoder": {
                "filename": step["file"],
                "hidden_size": model.d_model,
                "num_hidden_layers": len(model.blocks),
                "key_value_layers": key_layers,
                "inputs": inputs,
                "outputs": outputs,
                "state": [{key: entry[key] for key in ("name", "output", "shape", "dtype", "fill")} for entry in state],
            },
        },
        "search": {"max_length": limit, "do_sample": False, "num_beams": 1},
        "differences_from_onnxruntime_genai": GENAI_DIFFERENCES,
    }


def latency_entry(batch: int, length: int, eager: Timing, runtime: str, deployed: Timing) -> dict:
    """A manifest's or report's ``latency``: eager against ``runtime`` at token ids (batch, length).

    ``eager_ms`` and ``<runtime>_ms`` are the medians and ``speedup`` their ratio (eager /
    runtime); ``eager`` and ``<runtime>`` hold each side's Timing (median, fastest, slowest, runs,
    load, note); ``load`` is the highest load average seen when the machine was busier than its
    cores, else None.
    """
    loads = [timing.load for timing in (eager, deployed) if timing.load is not None]
    return {
        "batch": batch,
        "length": length,
        "eager_ms": eager.median_ms,
        f"{runtime}_ms": deployed.median_ms,
        "speedup": eager.median_ms / deployed.median_ms,
        "eager": eager.as_dict(),
        runtime: deployed.as_dict(),
        "load": max(loads) if loads else None,
    }


def compare_latency(model: nn.Module, onnx_path: str | Path, length: int = 1024, batch: int = 1) -> dict:
    """Eager vs ONNX Runtime forward latency at (batch, length) (``latency_entry``), and their max difference."""
    unit = length_unit(model)
    length = max(unit, (length // unit) * unit)
    tokens = torch.randint(0, model.vocab_size, (batch, length))
    runner = session(onnx_path)
    feed = {"tokens": tokens.numpy(), "padding_mask": np.zeros(tokens.shape, dtype=bool)}
    with torch.no_grad():
        eager = time_calls(lambda: model(tokens))
        expected = model(tokens).numpy()
    onnxruntime = time_calls(lambda: runner.run(None, feed))
    got = runner.run(None, feed)[0]
    latency = latency_entry(batch, length, eager, "onnxruntime", onnxruntime)
    latency["max_abs_difference"] = float(np.abs(expected - got).max())
    return latency
