"""What lowering buys, per model, measured as ratios within one process (shared machines are noisy):
the measurements of the benchmark's ``lowering`` mode (``conf/bench/lowering.yaml``, ``run.run_lowering``).

- ``onnxruntime_vs_eager``: forward latency at (1, L) of the exported parallel graph on ONNX
  Runtime against eager PyTorch (``compare_latency``).
- ``int8_vs_fp32``: the int8 variant's speed, file size and metric change against the float32 graph.
- ``step_growth``: the latency of one streamed token at position P_far against P_near, for eager
  ``model.step`` and for the ONNX step graph; 1.0 means constant cost per token. A softmax-attention
  cache holds at most ``max_len`` tokens, so presets with one are measured up to that position and
  say so; their per-token cost grows with the cache by design.
- ``compile_vs_eager_training``: the time of one training step (forward, backward, AdamW) compiled
  with Inductor (``compile_model``, which runs the TCN on its ``taps`` path) against eager, after
  compilation.

``matmul_throughput`` gives the context for all of them: the same float32 matrix product in
PyTorch and in ONNX Runtime, in GFLOP/s. Inductor calls PyTorch's BLAS for training matmuls, so
where that BLAS is slow a compiled step can only win on everything else, and ONNX Runtime's own
kernels win over eager for free.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from seqmix.contract import Mixer, length_unit
from seqmix.errors import require_int
from seqmix.timing import Timing, time_calls, time_once

from ..onnx_export import compare_latency, export_onnx, session
from ..quantize import compare_variant, make_variant
from .measure import cpu_name


def _advance(model: nn.Module, position: int, generator: torch.Generator):
    """The model's streaming state after ``position`` random tokens, fed in pieces of up to 512."""
    state = model.init_state(1)
    fed = 0
    with torch.no_grad():
        while fed < position:
            piece = min(512, position - fed)
            _, state = model.step(torch.randint(0, model.vocab_size, (1, piece), generator=generator), state)
            fed += piece
    return state


def _cache_limit(model: nn.Module) -> int | None:
    """The most tokens any mixer's streaming state in ``model`` takes (a full attention cache), or None."""
    limits = [m.cache_capacity() for m in model.modules() if isinstance(m, Mixer) and m.cache_capacity() is not None]
    return min(limits) if limits else None


def step_growth(model: nn.Module, onnx_step: Path | None, near: int = 64, far: int = 8192, repeats: int = 50) -> dict:
    """Per-token step latency at position ``far`` over position ``near`` (eager, and ONNX Runtime).

    ``<runtime>_near_ms`` and ``<runtime>_far_ms`` are medians of ``repeats`` steps and
    ``<runtime>_ratio`` their ratio; ``<runtime>_near`` and ``<runtime>_far`` hold each Timing.
    """
    limit = _cache_limit(model)
    far = min(far, limit - 1) if limit else far
    generator = torch.Generator().manual_seed(0)
    token = torch.zeros(1, 1, dtype=torch.long)
    result: dict = {"near": near, "far": far, "cache_limit": limit}
    states = {p: _advance(model, p, generator) for p in (near, far)}
    with torch.no_grad():
        eager = {p: time_calls(lambda s=s: model.step(token, s), repeats=repeats, warmup=5) for p, s in states.items()}
    result.update(_growth("eager", eager[near], eager[far]))
    if onnx_step is not None:
        runner = session(onnx_step)
        names = [i.name for i in runner.get_inputs()]
        timed = {}
        for p, s in states.items():
            feed = dict(zip(names, [token.numpy(), *[t.numpy() for t in tree_flatten(s)[0]]]))
            timed[p] = time_calls(lambda f=feed: runner.run(None, f), repeats=repeats, warmup=5)
        result.update(_growth("onnxruntime", timed[near], timed[far]))
    return result


def _growth(runtime: str, near: Timing, far: Timing) -> dict:
    """``step_growth``'s entries for one runtime: both medians (ms), their ratio, both Timings."""
    return {f"{runtime}_near_ms": near.median_ms, f"{runtime}_far_ms": far.median_ms,
            f"{runtime}_ratio": far.median_ms / near.median_ms,
            f"{runtime}_near": near.as_dict(), f"{runtime}_far": far.as_dict()}


def training_step_speedup(model: nn.Module, batch: int = 8, length: int = 512, steps: int = 7, warmup: int = 2) -> dict:
    """Median training-step time, eager vs ``compile_model`` (Inductor, with its path switches),
    on copies of ``model``, after ``warmup`` untimed steps (the first one compiles).

    ``eager_ms`` and ``compiled_ms`` are the medians of ``steps`` timed steps and ``speedup``
    their ratio; ``eager`` and ``compiled`` hold each Timing; ``first_step_s`` is the compiled
    network's first step, compilation included, in seconds.
    """
    from seqmix.compile import compile_model

    require_int("training_step_speedup", "warmup", warmup, 1, "untimed steps; the first one compiles")
    length = max(length_unit(model), (length // length_unit(model)) * length_unit(model))
    tokens = torch.randint(0, model.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))

    def timed(network: nn.Module, parameters) -> tuple[Timing, float]:
        """The Timing of the timed steps, and the seconds of the first (compiling) step."""
        optimizer = torch.optim.AdamW(parameters, lr=1e-4)

        def step():
            logits = network(tokens)
            nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        first_s = time_once(step)  # compiles, for the compiled network
        return time_calls(step, repeats=steps, warmup=warmup - 1), first_s

    eager_model, compiled_model = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    eager, _ = timed(eager_model, eager_model.parameters())
    compiled, compile_s = timed(compile_model(compiled_model), compiled_model.parameters())
    return {"batch": batch, "length": length, "eager_ms": eager.median_ms, "compiled_ms": compiled.median_ms,
            "speedup": eager.median_ms / compiled.median_ms, "eager": eager.as_dict(), "compiled": compiled.as_dict(),
            "first_step_s": compile_s}


def matmul_throughput(rows: int = 4096, inner: int = 128, columns: int = 512, repeats: int = 20) -> dict:
    """GFLOP/s of one float32 product (rows, inner) @ (inner, columns): ``torch.nn.functional.linear``
    against an ONNX Runtime ``MatMul`` with the weight as a constant, on this machine's threads."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, inner, generator=generator)
    weight = torch.randn(columns, inner, generator=generator)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight_t"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, inner])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, columns])],
        [numpy_helper.from_array(weight.t().contiguous().numpy(), "weight_t")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    runner = session(model.SerializeToString())
    feed = {"x": x.numpy()}
    gflop = 2 * rows * inner * columns / 1e9
    torch_time = time_calls(lambda: nn.functional.linear(x, weight), repeats=repeats)
    onnxruntime_time = time_calls(lambda: runner.run(None, feed), repeats=repeats)
    return {"cpu": cpu_name(), "threads": torch.get_num_threads(), "shape": [rows, inner, columns],
            "torch_gflops": gflop / torch_time.median_ms * 1e3, "onnxruntime_gflops": gflop / onnxruntime_time.median_ms * 1e3,
            "torch": torch_time.as_dict(), "onnxruntime": onnxruntime_time.as_dict()}


def lowering_report(model: nn.Module, task, out_dir: str | Path, length: int = 1024, far: int = 8192,
                    compile_training: bool = True) -> dict:
    """Every measurement of the module docstring for one model (exported to ``out_dir``)."""
    model = model.eval()
    exported = export_onnx(model, out_dir)
    report = {"parameters": sum(p.numel() for p in model.parameters())}
    report["onnxruntime_vs_eager"] = compare_latency(model, exported.parallel, length=length)
    variant = make_variant("int8", exported.parallel)
    report["int8_vs_fp32"] = compare_variant(exported.parallel, variant, task, report["onnxruntime_vs_eager"]["length"], task.metric)
    if exported.step is not None:
        report["step_growth"] = step_growth(model, exported.step, far=far)
    if compile_training:
        report["compile_vs_eager_training"] = training_step_speedup(model)
    return report


def as_builtin(value):
    """numpy scalars in a nested report turned into Python numbers, for JSON."""
    if isinstance(value, dict):
        return {k: as_builtin(v) for k, v in value.items()}
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
