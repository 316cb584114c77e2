"""Deployed latency: how long one forward pass of a model takes on the runtime it ships on.

The architecture search (``seqmix.search``) ranks candidates by this number, so every runtime
times the same thing: the parallel graph on token ids (batch_size, length), two warm-up calls,
then ``repeats`` timed calls summarised by ``seqmix.timing.time_calls`` (median, fastest, slowest).
Exported graphs are checked against eager first, so a latency is never reported for a graph that
computes something else.

- ``eager``: the PyTorch module itself, in eval mode, without gradients.
- ``onnxruntime``: the verified ONNX graph (``export_parallel``) on ONNX Runtime's CPU provider.
  Its length must be a multiple of the model's chunk (``length_unit``), so the tokens are
  right-padded to one and masked, as a deployment does.
- ``executorch``: the .pte lowered to XNNPACK at exactly (batch_size, length), run through
  ``executorch.runtime``.
- ``onnxruntime_tensorrt``: the ONNX graph on ONNX Runtime's TensorRT execution provider, with a
  fixed optimization profile and no fallback to other providers (NVIDIA GPU only).

The names, what each runtime needs and its install hint come from the one runtime catalogue,
``export.bench.runtimes``; ``DEPLOYED_RUNTIMES`` are those a deployed latency is timed on.
"""
from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from seqmix.errors import require_int
from seqmix.timing import Timing, time_calls

from .bench.runtimes import require_runtime

DEPLOYED_RUNTIMES = ("eager", "onnxruntime", "executorch", "onnxruntime_tensorrt")


def check_runtime(runtime: str, field: str = "runtime") -> None:
    """Raise unless ``runtime`` is one of ``DEPLOYED_RUNTIMES`` and can run here; errors name
    ``field`` and the valid runtimes, or the missing package (with its install line) or device."""
    require_runtime(runtime, field, among=DEPLOYED_RUNTIMES)


def deployed_latency(
    model: nn.Module,
    runtime: str,
    length: int,
    batch_size: int = 1,
    repeats: int = 7,
    work_dir: str | Path | None = None,
) -> Timing:
    """How long one forward pass of ``model`` takes on ``runtime``, in milliseconds: the median of
    the timed calls with the fastest and the slowest (``Timing``).

    Args:
        model: a SequenceModel; it is copied, so exporting never changes the caller's module.
        runtime: one of ``DEPLOYED_RUNTIMES``.
        length: L of the token ids timed.
        batch_size: B of the token ids timed.
        repeats: calls timed after two warm-up calls.
        work_dir: where exported graphs are written (a temporary directory when None).
    """
    check_runtime(runtime)
    require_int("deployed_latency", "length", length)
    require_int("deployed_latency", "batch_size", batch_size)
    require_int("deployed_latency", "repeats", repeats)
    model = copy.deepcopy(model).cpu().eval()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.vocab_size, (batch_size, length), generator=generator)
    if runtime == "eager":
        with torch.no_grad():
            return time_calls(lambda: model(tokens), repeats)
    work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="seqmix-latency-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    if runtime == "executorch":
        return time_calls(_executorch_forward(model, tokens, work_dir / "model.pte"), repeats)
    return time_calls(_onnx_forward(model, tokens, work_dir / "model.onnx", on_tensorrt=runtime == "onnxruntime_tensorrt"), repeats)


def _onnx_forward(model: nn.Module, tokens: torch.Tensor, path: Path, on_tensorrt: bool):
    """A call running the verified parallel ONNX graph once on ``tokens`` (B, L), padded to a whole chunk."""
    from seqmix.contract import length_unit

    from .graphs import use_exportable_paths
    from .onnx_export import export_parallel, session

    use_exportable_paths(model)
    export_parallel(model, path)
    unit = length_unit(model)
    batch_size, length = tokens.shape
    padded = unit * math.ceil(length / unit)
    feed = {
        "tokens": np.zeros((batch_size, padded), dtype=np.int64),
        "padding_mask": np.ones((batch_size, padded), dtype=bool),
    }
    feed["tokens"][:, :length] = tokens.numpy()
    feed["padding_mask"][:, :length] = False
    if on_tensorrt:
        from .tensorrt import onnxruntime_tensorrt_session

        shapes = {name: value.shape for name, value in feed.items()}
        runner = onnxruntime_tensorrt_session(path, shapes, shapes, shapes, fallback=False)
    else:
        runner = session(path)
    return lambda: runner.run(None, feed)


def _executorch_forward(model: nn.Module, tokens: torch.Tensor, path: Path):
    """A call running the verified .pte once on ``tokens`` (B, L), the shape it was lowered at."""
    from executorch.runtime import Runtime

    from .executorch_export import export_parallel_pte, verify_pte_parallel
    from .onnx_export import TOLERANCE, ExportMismatch

    batch_size, length = tokens.shape
    export_parallel_pte(model, path, length=length, batch_size=batch_size)
    error = verify_pte_parallel(model, path, length=length, batch_size=batch_size)
    if not error <= TOLERANCE:
        raise ExportMismatch(
            f"executorch graph at B={batch_size}, L={length}: max |eager − .pte| = {error:.3e} > tolerance {TOLERANCE:.0e}"
        )
    method = Runtime.get().load_program(path).load_method("forward")
    return lambda: method.execute([tokens])
