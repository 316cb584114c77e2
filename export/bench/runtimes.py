"""The runtime catalogue: every place seqmix times a subject, what it is, what it needs, and how a
subject is prepared on it. The benchmark grid (``bench.runtimes``), the claims
(``bench.claim_runtime``) and the deployed latency of the search (``search.runtime``,
``export.latency``) all name runtimes from ``RUNTIMES``, so a name means one thing everywhere:

- ``eager``: the PyTorch module as it is, on the CPU.
- ``compile``: ``torch.compile`` with static shapes and the settings of ``compile.compile_model``
  (backend ``bench.compile_backend``), on the CPU.
- ``onnxruntime``: an ONNX graph exported at the input's shape, on ONNX Runtime's CPU provider.
- ``executorch``: the module lowered to XNNPACK at the input's shape, run by ``executorch.runtime``.
- ``cuda`` and ``cuda_compile``: eager and ``torch.compile`` on the GPU.
- ``tensorrt``: ``torch.compile`` with torch-tensorrt's ``tensorrt`` backend, on the GPU (what
  ``compile_model(backend="tensorrt")`` runs).
- ``onnxruntime_tensorrt``: an ONNX graph on ONNX Runtime's TensorRT execution provider, one fixed
  optimization profile, no fallback to other providers (NVIDIA GPU).

Exported graphs (``onnxruntime``, ``executorch``, ``onnxruntime_tensorrt``) run the exportable
compute paths (``export.graphs.use_exportable_paths``), are exported from the module on the CPU,
and are checked against eager before they are timed; ONNX Runtime and ExecuTorch get as many
threads as torch. ``seqmix export format=tensorrt`` builds a standalone engine instead
(``export/tensorrt.py``); it is an export format, not a runtime here.
"""
from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from seqmix import SeqmixError
from seqmix.compile.compiler import TENSORRT_INSTALL, AlignScanCarries, compile_model
from seqmix.errors import require_choice
from seqmix.model.sequence_model import SequenceModel

from ..executorch_export import load_pte_method, lower_to_pte
from ..graphs import quiet_exporters, use_exportable_paths
from ..onnx_export import OPSET, ExportMismatch, session
from ..tensorrt import onnxruntime_tensorrt_session
from .measure import pass_callables, synchronize
from .subjects import describe_impls

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
# Exporters reorder float32 arithmetic; relative to max(1, max |eager output|).
EXPORT_TOLERANCE = 1e-3

# (module, inputs on the runtime's torch device, compile backend, empty work directory) -> call(*inputs) -> output
Build = Callable[[nn.Module, tuple[Tensor, ...], str, Path], Callable[..., Tensor]]


def compile_module(module: nn.Module, backend: str) -> Callable[..., Tensor]:
    """``torch.compile`` of a mixer or peer module, with static shapes and ``compile_model``'s settings.

    Inductor needs the scan workarounds ``compile.compiler`` documents: the ``AlignScanCarries``
    pass and scalar outputs captured while a call compiles.
    """
    options: dict = {"backend": backend, "dynamic": False}
    call_config: dict = {}
    if backend == "inductor":
        options["options"] = {
            **torch._inductor.list_mode_options("default", False),
            "post_grad_custom_pre_pass": AlignScanCarries(),
        }
        call_config["capture_scalar_outputs"] = True
    compiled = torch.compile(module, **options)

    def call(*inputs: Tensor) -> Tensor:
        with torch._dynamo.config.patch(call_config):
            return compiled(*inputs)

    return call


def _compiled_call(module: nn.Module, backend: str) -> Callable[..., Tensor]:
    """The module compiled for this cell alone: Dynamo's caches are dropped first, so earlier
    cells neither count against its recompile limit nor leave guards behind."""
    torch._dynamo.reset()
    if isinstance(module, SequenceModel):
        return compile_model(module, backend=backend, dynamic=False)
    return compile_module(module, backend)


def _check_against_eager(module: nn.Module, inputs: tuple[Tensor, ...], got: Tensor, runtime: str) -> None:
    """Raise ExportMismatch unless ``got`` matches eager on ``inputs`` within ``EXPORT_TOLERANCE``."""
    with torch.no_grad():
        expected = module(*inputs)
    difference = (expected.float() - got.float()).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    if not difference <= EXPORT_TOLERANCE * scale:
        raise ExportMismatch(
            f"{runtime}: max |eager − exported| = {difference:.3e} > {EXPORT_TOLERANCE:.0e} × {scale:.3g} "
            f"at inputs of shape {[tuple(t.shape) for t in inputs]}"
        )


def _onnx_graph_call(module: nn.Module, inputs: tuple[Tensor, ...], workdir: Path, tensorrt: bool) -> Callable[..., Tensor]:
    """Export ``module`` at the inputs' shapes, load it into ONNX Runtime (its CPU provider, or
    with ``tensorrt`` its TensorRT provider with the inputs' shapes as the one profile) and check
    it against eager."""
    names = ["tokens"] if isinstance(module, SequenceModel) else ["x"]
    path = workdir / "graph.onnx"
    with torch.no_grad(), quiet_exporters():
        program = torch.onnx.export(
            module, inputs, dynamo=True, opset_version=OPSET, verbose=False, input_names=names, output_names=["output"]
        )
    program.save(str(path))
    if tensorrt:
        shapes = {name: tuple(tensor.shape) for name, tensor in zip(names, inputs)}
        runner = onnxruntime_tensorrt_session(path, shapes, shapes, shapes, fallback=False)
    else:
        runner = session(path)
    feed = {name: tensor.numpy() for name, tensor in zip(names, inputs)}

    def call(*_: Tensor) -> Tensor:
        return torch.from_numpy(runner.run(None, feed)[0])

    _check_against_eager(module, inputs, call(), "onnxruntime_tensorrt" if tensorrt else "onnxruntime")
    return call


def _match_executorch_threads() -> None:
    """Give ExecuTorch's XNNPACK thread pool as many threads as torch, where the build exposes it."""
    from executorch.extension.pybindings import portable_lib

    reset = getattr(portable_lib, "_unsafe_reset_threadpool", None)
    count = getattr(portable_lib, "_threadpool_get_thread_count", None)
    if reset is not None and count is not None and count() != torch.get_num_threads():
        reset(torch.get_num_threads())


def _executorch_call(module: nn.Module, inputs: tuple[Tensor, ...], workdir: Path) -> Callable[..., Tensor]:
    """Lower ``module`` to XNNPACK at the inputs' shapes, load the .pte and check it against eager."""
    path = workdir / "graph.pte"
    shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
    lower_to_pte(module, inputs, path, module, f"graph at input shape {shapes}")
    _match_executorch_threads()
    method = load_pte_method(path)
    contiguous = [t.contiguous() for t in inputs]

    def call(*_: Tensor) -> Tensor:
        return method.execute(contiguous)[0]

    _check_against_eager(module, inputs, call(), "executorch")
    return call


@dataclass(frozen=True)
class Runtime:
    """One runtime of the catalogue.

    Attributes:
        name: its name in configs and reports.
        summary: what it is, in words.
        device: ``cpu`` or ``cuda``: where it computes; a ``cuda`` runtime needs a CUDA device.
        build: how a subject is prepared on it (compiled, exported, or used as it is).
        trains: it runs the ``fwd+bwd`` pass too (torch autograd); else inference graphs only.
            Torch allocates the memory of exactly these runtimes, so their peak is measured.
        exported: it runs a graph exported from the module on the CPU (eval mode, the exportable
            compute paths), fed host arrays and returning host outputs.
        reference: the runtime ``speedup_vs_eager`` divides into this one: eager on the same
            device (``cuda`` itself against CPU ``eager``).
        requires: (import name, pip distribution) of each package it needs.
        install: how to install them.
    """

    name: str
    summary: str
    device: str
    build: Build
    trains: bool = False
    exported: bool = False
    reference: str = "eager"
    requires: tuple[tuple[str, str], ...] = ()
    install: str = ""

    @property
    def torch_device(self) -> torch.device:
        """Where the module and its inputs live: the CPU for exported graphs, else ``device``."""
        return torch.device("cpu" if self.exported else self.device)


EXPORT_EXTRA = "pip install 'seqmix[export]'"
RUNTIMES: dict[str, Runtime] = {
    runtime.name: runtime
    for runtime in (
        Runtime("eager", "the PyTorch module as it is, on the CPU", "cpu", lambda module, inputs, backend, workdir: module,
                trains=True),
        Runtime("compile", "torch.compile (static shapes, compile_model's settings, bench.compile_backend), on the CPU", "cpu",
                lambda module, inputs, backend, workdir: _compiled_call(module, backend), trains=True),
        Runtime("onnxruntime", "an ONNX graph exported at the input's shape, on ONNX Runtime's CPU provider", "cpu",
                lambda module, inputs, backend, workdir: _onnx_graph_call(module, inputs, workdir, tensorrt=False),
                exported=True, requires=(("onnxruntime", "onnxruntime"), ("onnxscript", "onnxscript")), install=EXPORT_EXTRA),
        Runtime("executorch", "the module lowered to XNNPACK at the input's shape, run by executorch.runtime", "cpu",
                lambda module, inputs, backend, workdir: _executorch_call(module, inputs, workdir), exported=True,
                requires=(("executorch.exir", "executorch"), ("executorch.runtime", "executorch")),
                install="pip install 'seqmix[executorch]' (executorch==1.5.1)"),
        Runtime("cuda", "the PyTorch module as it is, on the GPU", "cuda", lambda module, inputs, backend, workdir: module,
                trains=True),
        Runtime("cuda_compile", "torch.compile (as compile), on the GPU", "cuda",
                lambda module, inputs, backend, workdir: _compiled_call(module, backend), trains=True, reference="cuda"),
        Runtime("tensorrt", "torch.compile with torch-tensorrt's tensorrt backend, on the GPU", "cuda",
                lambda module, inputs, backend, workdir: _compiled_call(module, "tensorrt"), reference="cuda",
                requires=(("torch_tensorrt", "torch-tensorrt"),), install=TENSORRT_INSTALL),
        Runtime("onnxruntime_tensorrt", "an ONNX graph on ONNX Runtime's TensorRT execution provider, no fallback, on the GPU",
                "cuda", lambda module, inputs, backend, workdir: _onnx_graph_call(module, inputs, workdir, tensorrt=True),
                exported=True, reference="cuda", requires=(("onnxruntime", "onnxruntime-gpu"), ("tensorrt", "tensorrt")),
                install="pip install tensorrt onnxruntime-gpu, on a machine with an NVIDIA GPU"),
    )
}
TRAINING_RUNTIMES = tuple(name for name, runtime in RUNTIMES.items() if runtime.trains)
GPU_RUNTIMES = tuple(name for name, runtime in RUNTIMES.items() if runtime.device == "cuda")


def runtime_unavailable(name: str) -> str | None:
    """Why runtime ``name`` cannot run on this machine (a package is missing, or the CUDA
    device it needs), or None when it can."""
    runtime = RUNTIMES[name]
    for module, distribution in runtime.requires:
        try:
            importlib.import_module(module)
        except ImportError as error:
            return f"{name} needs the {distribution} package, which is not installed ({error}): {runtime.install}"
    if runtime.device == "cuda" and not torch.cuda.is_available():
        return (
            f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda})"
        )
    return None


def require_runtime(name: str, field: str = "runtime", among: Sequence[str] | None = None) -> None:
    """Raise SeqmixError unless ``name`` is a runtime of ``among`` (default: every runtime) that
    can run here; the error names ``field`` and the valid runtimes, or what is missing."""
    allowed = tuple(RUNTIMES) if among is None else tuple(among)
    require_choice(field, name, allowed)
    reason = runtime_unavailable(name)
    if reason is not None:
        raise SeqmixError(f"{field}={name} cannot run here: {reason}")


@dataclass
class Prepared:
    """A subject ready to time on one runtime, for one pass.

    Attributes:
        run: one pass; it discards its output. clear: drops the gradients a run leaves.
        device: where its torch tensors live (the clock synchronises it, see ``sync``).
        setup_s: wall time of building the runtime's graph and its first call, in seconds.
        impl: the compute paths that run (``describe_impls``).
        torch_memory: True when torch allocates its memory, so its peak can be measured.
    """

    run: Callable[[], None]
    clear: Callable[[], None]
    device: torch.device
    setup_s: float
    impl: str
    torch_memory: bool

    def sync(self) -> None:
        """Wait for the device's queued work, before each clock read."""
        synchronize(self.device)


def prepare(
    runtime: str, module: nn.Module, inputs: tuple[Tensor, ...], pass_: str, compile_backend: str, workdir: Path
) -> Prepared:
    """Move, compile or export ``module`` for ``runtime`` and make its first call (the setup).

    Args:
        runtime: from ``RUNTIMES``; available (``runtime_unavailable`` is None).
        module: built by ``subjects.build_subject``, on the CPU.
        inputs: from ``subjects.example_inputs``, on the CPU: x (B, L, D) or token ids (B, L).
        pass_: ``forward``, or ``fwd+bwd`` on a training runtime.
        compile_backend: the torch.compile backend of ``compile`` and ``cuda_compile``.
        workdir: an empty directory for exported files.
    """
    entry = RUNTIMES[runtime]
    device = entry.torch_device
    module = module.to(device)
    inputs = tuple(t.to(device) for t in inputs)
    if entry.exported:
        module.eval()
        use_exportable_paths(module)
    start = time.perf_counter()
    call = entry.build(module, inputs, compile_backend, workdir)
    run, clear = pass_callables(call, module, inputs, pass_)
    run()
    synchronize(device)
    clear()
    setup_s = time.perf_counter() - start
    return Prepared(run, clear, device, setup_s, describe_impls(module), entry.trains)
