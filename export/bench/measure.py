"""How one pass is run and measured: the pass callables, the clock's device sync, peak memory,
and the environment the numbers depend on. Times themselves come from ``seqmix.timing``.

- passes: ``forward`` runs the module in eval mode under ``torch.no_grad``; ``fwd+bwd`` runs it
  in train mode and backpropagates the gradient of ``output.sum()``, held as a whole tensor of
  ones the size of the output (made on the first call), to every parameter and to the float
  inputs, their gradients cleared (set to None) first.
- peak memory, over ONE extra run, relative to the memory allocated when the run starts, so the
  inputs and parameters are not counted but the output, the activations saved for backward, the
  temporaries and the new gradients are. On CUDA this is the caching allocator's
  ``max_memory_allocated``. On CPU there is no allocator counter, so the run is profiled with
  ``profile_memory=True`` and the peak is the maximum of the running sum of its allocation events
  (+bytes allocated, −bytes freed, in time order): tensor allocations made by torch during the
  run. Memory that is not a torch tensor (Python objects, library workspaces, ONNX Runtime's and
  ExecuTorch's arenas) is not counted.
"""
from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from seqmix.allocator import applied_policy

# Versions recorded with every result, besides torch's and Python's.
VERSIONED = ("onnxruntime", "executorch", "torch-tensorrt", "tensorrt", "mega-pytorch", "pytorch-tcn")


def pass_callables(
    call: Callable[..., Tensor], module: nn.Module, inputs: tuple[Tensor, ...], pass_: str
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(run, clear) for one pass of ``call(*inputs)``, the module switched to eval or train mode.

    run discards its output, so nothing it allocates outlives it but gradients; clear sets the
    gradients of the parameters and the float inputs to None.
    """
    if pass_ == "forward":
        module.eval()

        def forward() -> None:
            with torch.no_grad():
                call(*inputs)

        return forward, lambda: None

    module.train()
    inputs = tuple(t.detach().clone().requires_grad_(True) if t.is_floating_point() else t for t in inputs)

    def clear() -> None:
        module.zero_grad(set_to_none=True)
        for tensor in inputs:
            tensor.grad = None

    gradients: list[Tensor] = []

    def forward_backward() -> None:
        clear()
        output = call(*inputs)
        if not gradients:
            # The gradient of output.sum() as a whole tensor, made on the first call and reused: a
            # loss hands backward one, and the roofline's minimum counts reading it, while
            # output.sum() hands it one value broadcast, which a kernel that reads the gradient at
            # its strides (the native paths) takes without touching memory.
            gradients.append(torch.ones_like(output, memory_format=torch.contiguous_format))
        output.backward(gradients[0])

    return forward_backward, clear


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so the clock reads the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_of_allocations(events: Sequence[tuple[int, int]]) -> int:
    """Peak of the running sum of (time, ±bytes) allocation events, relative to the start (>= 0)."""
    total = peak = 0
    for _, nbytes in sorted(events):
        total += nbytes
        peak = max(peak, total)
    return peak


def peak_memory_bytes(run: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by torch during one call of ``run``, relative to its start.

    CUDA: the caching allocator's peak counter. CPU: the profiler's allocation events.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    # The raw records, not prof.events(): the latter folds allocations made inside an operator
    # into that operator's net total, and keeps as "[memory]" events only those made between
    # operators, which hides the temporaries of every op.
    records = prof.profiler.kineto_results.events()
    return peak_of_allocations([(e.start_ns(), e.nbytes()) for e in records if e.name() == "[memory]"])


def peak_mib(run: Callable[[], None], clear: Callable[[], None], device: torch.device) -> float:
    """``peak_memory_bytes`` of one run in MiB, the gradients cleared before and after it (those
    left by an earlier run would be freed inside the measured one and offset its peak)."""
    clear()
    peak = peak_memory_bytes(run, device)
    clear()
    return peak / 2**20


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; ``platform.processor()`` elsewhere, often
    just the architecture). Speeds depend on it: MKL, PyTorch's CPU BLAS, takes slower code paths
    on non-Intel CPUs than ONNX Runtime's MLAS does."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(unavailable: Mapping[str, str]) -> dict:
    """What the numbers depend on besides the code: versions, threads, the CPU and the GPU, and
    ``unavailable`` ({runtime: why it cannot run here}) as ``runtimes_unavailable``."""
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": cpu_name(),
        # The widest vector instructions torch's CPU kernels use here (AVX2, AVX512, ...): machines
        # that share a processor name can differ in it, and matmul rates and bfloat16 with it.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        # Large temporaries are faulted in on every call unless freed memory is kept (seqmix.allocator).
        "allocator": applied_policy() or "C library's malloc as it is (seqmix.allocator not applied)",
    }
    env.update({distribution: _version(distribution) for distribution in VERSIONED})
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    env["runtimes_unavailable"] = dict(unavailable)
    return env
