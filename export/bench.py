"""Runtime benchmark grid, peer packages side by side, and the papers' speed claims.

``run_grid`` answers "which mixer is fastest for my length, on my runtime". For every cell

    subject × runtime × pass × sequence length L

it measures, on a batch of B = ``batch`` sequences in float32:

- subjects: registered mixers on x (B, L, D), D = ``width`` (``ema`` runs its default compute
  path, ``ema/fft`` a named one; options from ``mixer_options``); model presets
  (``conf/model/<name>.yaml`` plus ``preset_overrides``) on token ids (B, L) at their own width;
  with ``peers``, modules of peer packages built with the sizes of the seqmix mixer they are
  compared with (``PEERS``), run on the ``eager`` and ``cuda`` runtimes.
- runtimes: ``eager``; ``compile`` (torch.compile with static shapes and the settings of
  ``compile.compile_model``); ``onnxruntime`` (a graph exported at the cell's shape, run on ONNX
  Runtime's CPU provider); ``executorch`` (lowered to XNNPACK at the cell's shape, run through
  ``executorch.runtime``); ``cuda`` and ``cuda_compile`` (eager and compile on the GPU);
  ``tensorrt`` (torch.compile with the torch-tensorrt backend). Exported graphs run the
  exportable compute paths (``export.graphs.use_exportable_paths``) and are checked against eager
  before they are timed. ONNX Runtime and ExecuTorch get as many threads as torch.
- passes: ``forward`` (eval mode, no_grad) and ``fwd+bwd`` (train mode, backward of
  ``output.sum()`` to every parameter and to float inputs), the latter on the training runtimes
  only (eager, compile, cuda, cuda_compile).
- time: one untimed setup call (which compiles or exports; its wall time, export included, is
  ``setup_s``), then the median of ``repeats`` runs after ``warmup``, with the fastest and the
  slowest run (``time_low_ms``, ``time_high_ms``) and the load average when the machine was
  busier than its cores (``load``), all from ``seqmix.timing.time_calls``.
- peak memory: ``seqmix.benchmark.peak_memory_bytes`` over one more run, on the runtimes whose
  memory torch allocates (eager, compile, cuda, cuda_compile); None on ONNX Runtime, ExecuTorch
  and TensorRT, which allocate outside torch.
- tokens/s: B·L / median time.

Ratios come from the same run, because a shared machine's speed drifts between runs:
``speedup_vs_eager`` (the time of the same subject, pass and L in eager mode on the same device
/ this time; ``cuda`` is divided into CPU ``eager``),
``speedup_vs_baseline`` (the baseline subject's time at the same runtime, pass and L / this time;
``baseline.mixer`` for mixers and peers, ``baseline.preset`` for presets), ``memory_vs_baseline``
(this peak / the baseline's), and per peer ``seqmix_speedup`` (peer time / seqmix time) and
``memory_ratio`` (seqmix peak / peer peak).

Nothing requested is dropped. A cell that is not measured is a row whose ``status`` is
``skipped`` (the runtime or the peer package is missing, the pass does not apply to the runtime,
L is above the runtime's ``max_length``, the estimated attention scores exceed
``memory_budget_gb``, a shorter L of the same subject, runtime and pass ran longer than
``max_seconds_per_run`` or set up longer than ``max_setup_seconds``, ``max_total_seconds`` ran
out, or seqmix refused the configuration with a ``SeqmixError``) or ``failed`` (any other
exception, an exported graph disagreeing with eager included), with the reason.

``run_claims`` measures the pairs behind the papers' speed claims (``conf/bench/paper_claims.yaml``),
their timed runs interleaved so drift hits both sides alike, and sets each ratio beside the
paper's figure; each side's Timing is built with ``seqmix.timing.time_once`` and ``summarize``.
"""
from __future__ import annotations

import csv
import functools
import importlib
import importlib.metadata
import json
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm import tqdm

from seqmix import SeqmixError, benchmark
from seqmix.model.checkpoint import instantiate_model
from seqmix.configs import compose_config, config_groups
from seqmix.contract import Mixer
from seqmix.errors import choice_error, require_int
from seqmix.model.sequence_model import SequenceModel
from seqmix.registry import build_mixer, mixer_class
from seqmix.timing import Timing, summarize, time_calls, time_once

from .graphs import quiet_exporters, use_exportable_paths
from .onnx_export import ExportMismatch

PASSES = benchmark.PASSES
RUNTIMES = ("eager", "compile", "onnxruntime", "executorch", "cuda", "cuda_compile", "tensorrt")
TRAINING_RUNTIMES = ("eager", "compile", "cuda", "cuda_compile")
GPU_RUNTIMES = ("cuda", "cuda_compile", "tensorrt")
PEER_RUNTIMES = ("eager", "cuda")
# What ``speedup_vs_eager`` divides: eager on the same device (cuda itself against CPU eager).
EAGER_REFERENCE = {
    "eager": "eager", "compile": "eager", "onnxruntime": "eager", "executorch": "eager",
    "cuda": "eager", "cuda_compile": "cuda", "tensorrt": "cuda",
}
EXPORTED_RUNTIMES = ("onnxruntime", "executorch")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
MODES = ("grid", "claims")
METRICS = ("speed", "memory")
# Exporters reorder float32 arithmetic; relative to max(1, max |eager output|).
EXPORT_TOLERANCE = 1e-3
ROOT_CONFIG = "bench_root"


# --- peers ------------------------------------------------------------------------------------


class TorchMultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` as a mixer: x (B, L, D) -> (B, L, D), self-attention.

    Causal attention passes a (L, L) mask with the ``is_causal`` hint, so PyTorch may use its
    fused causal kernel; the mask is built once per length and kept, out of the timed runs.
    """

    def __init__(self, d_model: int, heads: int, causal: bool):
        super().__init__()
        self.attention = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.causal = causal
        self._masks: dict[tuple[int, torch.device], Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        if not self.causal:
            return self.attention(x, x, x, need_weights=False)[0]
        key = (x.shape[1], x.device)
        if key not in self._masks:
            self._masks = {key: torch.ones(key[0], key[0], dtype=torch.bool, device=x.device).triu(1)}
        return self.attention(x, x, x, attn_mask=self._masks[key], is_causal=True, need_weights=False)[0]


def _mega_pytorch_ema(ema: nn.Module) -> nn.Module:
    from mega_pytorch import MultiHeadedEMA

    return MultiHeadedEMA(dim=ema.d_model, heads=ema.order, bidirectional=not ema.causal)


def _mega_pytorch_layer(layer: nn.Module) -> nn.Module:
    from mega_pytorch import MegaLayer

    return MegaLayer(
        dim=layer.d_model,
        ema_heads=getattr(layer.local, "order", 16),
        attn_dim_qk=layer.z_dim,
        attn_dim_value=layer.v_dim,
        causal=layer.causal,
    )


def _pytorch_tcn(tcn: nn.Module) -> nn.Module:
    from pytorch_tcn import TCN

    # pytorch-tcn offers no SiLU; GELU is its closest activation.
    activation = "gelu" if tcn.activation in ("silu", "gelu") else "relu"
    with warnings.catch_warnings():
        # It warns that its default initializer has no gain for GELU; irrelevant to timing.
        warnings.simplefilter("ignore", UserWarning)
        return TCN(
            num_inputs=tcn.d_model,
            num_channels=[tcn.d_model] * tcn.depth,
            kernel_size=tcn.kernel_size,
            dilations=[tcn.dilation_base**i for i in range(tcn.depth)],
            dropout=0.0,
            causal=True,
            use_norm=None,
            activation=activation,
            input_shape="NLC",
        )


def _torch_mha(attention: nn.Module) -> nn.Module:
    return TorchMultiheadAttention(attention.d_model, attention.heads, attention.causal)


@dataclass(frozen=True)
class Peer:
    """A peer package's module, built with the sizes of the seqmix mixer it is compared with.

    Attributes:
        name: its label in reports.
        against: the registered seqmix mixer it is compared with.
        package: the pip distribution; ``module`` its import name.
        build: (the seqmix mixer) -> a module mapping x (B, L, D) to (B, L, D).
        score_bytes: (the seqmix mixer, pass) -> bytes per B·L² at the pass's peak: its
            (L, L) matrices, measured with the CPU profiler at L = 512 and 1024.
        note: how it differs from the seqmix operator.
    """

    name: str
    against: str
    package: str
    module: str
    build: Callable[[nn.Module], nn.Module]
    score_bytes: Callable[[nn.Module, str], float]
    note: str


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer(
            "mega_pytorch.MultiHeadedEMA", "ema", "mega-pytorch", "mega_pytorch", _mega_pytorch_ema,
            lambda mixer, pass_: 0.0,
            "FFT convolution with a kernel recomputed every call; N heads of decays shared across channels",
        ),
        Peer(
            "mega_pytorch.MegaLayer", "gated_attention", "mega-pytorch", "mega_pytorch", _mega_pytorch_layer,
            lambda mixer, pass_: {"forward": 46.0, "fwd+bwd": 67.0}[pass_],
            "attends over the whole sequence (no chunks) with a T5 relative bias; seqmix's layer uses bench.mixer_options",
        ),
        Peer(
            "pytorch_tcn.TCN", "tcn", "pytorch-tcn", "pytorch_tcn", _pytorch_tcn,
            lambda mixer, pass_: 0.0,
            "two dense D→D convolutions per level (seqmix: one depthwise); same K, dilations and depth",
        ),
        Peer(
            "torch.nn.MultiheadAttention", "softmax_attention", "torch", "torch", _torch_mha,
            # Eval mode takes the native fast path, which materialises the scores; training goes through SDPA.
            lambda mixer, pass_: {"forward": 10.0 * mixer.heads, "fwd+bwd": 6.0}[pass_],
            "no rotary positions; heads as seqmix's softmax_attention",
        ),
    )
}


def peer_unavailable(peer: Peer) -> str | None:
    """Why ``peer`` cannot run here (its package is not importable), or None."""
    try:
        importlib.import_module(peer.module)
    except ImportError as error:
        return f"peer package {peer.package} is not installed ({error}): pip install {peer.package}"
    return None


# --- what to measure ----------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """One thing to time: a registered mixer, a model preset, or a peer package's module.

    Attributes:
        label: its name in reports: ``ema``, ``ema/fft``, ``mega``, ``mega_pytorch.MegaLayer``.
        kind: ``mixer``, ``preset`` or ``peer``.
        name: the registered mixer, the preset (``conf/model/<name>.yaml``) or the peer (``PEERS``).
        impl: the mixer's compute path; None for its default.
        options: keyword options of the mixer (for a peer, of the seqmix mixer it mirrors).
        overrides: Hydra overrides of the preset, e.g. ``model.depth=2``.
        against: for a peer, the label of the seqmix subject it is compared with.
    """

    label: str
    kind: str
    name: str
    impl: str | None = None
    options: Mapping = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    against: str | None = None


def parse_mixer(entry: str, options: Mapping, where: str) -> Subject:
    """A mixer subject from ``name`` or ``name/impl``; unknown names and impls list the valid ones."""
    if not isinstance(entry, str):
        raise SeqmixError(f"{where}: {entry!r} is not valid; expected a mixer name or 'name/impl', e.g. 'ema/fft'")
    name, _, impl = entry.partition("/")
    cls = mixer_class(name)
    if impl and impl not in cls.impls:
        raise choice_error(f"{where}: impl of {name!r}", impl, cls.impls)
    return Subject(entry, "mixer", name, impl or None, dict(options or {}))


def parse_preset(name: str, overrides: Sequence[str], where: str) -> Subject:
    """A preset subject; an unknown preset lists the shipped ones."""
    presets = config_groups().get("model", [])
    if name not in presets:
        raise choice_error(where, name, presets)
    return Subject(name, "preset", name, overrides=tuple(overrides))


@functools.lru_cache(maxsize=None)
def preset_config(name: str, overrides: tuple[str, ...]) -> DictConfig:
    """The composed ``conf/model/<name>.yaml`` with ``overrides``, composed once per process
    (composing costs ~0.3 s; building a model from it does not change it)."""
    return compose_config([f"model={name}", *overrides]).model


def build_subject(subject: Subject, width: int) -> nn.Module:
    """A fresh module for ``subject`` on the CPU, seeded, in float32.

    Mixers and peers are built at width D = ``width``; presets at their own ``d_model``.
    """
    torch.manual_seed(0)
    if subject.kind == "preset":
        return instantiate_model(preset_config(subject.name, subject.overrides))
    if subject.kind == "peer":
        peer = PEERS[subject.name]
        seqmix = build_mixer(peer.against, width, **subject.options)
        torch.manual_seed(0)
        return peer.build(seqmix)
    impl = {"impl": subject.impl} if subject.impl else {}
    return build_mixer(subject.name, width, **subject.options, **impl)


def example_inputs(subject: Subject, module: nn.Module, batch: int, length: int, width: int) -> tuple[Tensor, ...]:
    """The inputs of one call: token ids (B, L) for presets, x (B, L, D) float32 otherwise."""
    generator = torch.Generator().manual_seed(0)
    if subject.kind == "preset":
        return (torch.randint(0, module.vocab_size, (batch, length), generator=generator),)
    return (torch.randn(batch, length, width, generator=generator),)


def subject_width(subject: Subject, module: nn.Module, width: int) -> int:
    """D of the subject: the preset's ``d_model``, else the grid's width."""
    return module.d_model if subject.kind == "preset" else width


def describe_impls(module: nn.Module) -> str:
    """The compute paths a module runs, e.g. ``ema=chunked, gated_attention=reference``; '' for none."""
    found = []
    for child in module.modules():
        impl = getattr(child, "impl", None)
        name = getattr(type(child), "registered_name", None)
        if isinstance(impl, str) and name and f"{name}={impl}" not in found:
            found.append(f"{name}={impl}")
    return ", ".join(found)


def attention_score_bytes(module: nn.Module, batch: int, length: int, pass_: str, fused_kernels: bool) -> int:
    """Estimated bytes of the attention score matrices alive at once in one pass; 0 without attention.

    Per mixer from its ``attention_scores`` (float32, ``benchmark.SCORE_COPIES`` alive per pass);
    with ``fused_kernels`` False (exported graphs) no score matrix is skipped by a fused kernel. A
    forward frees each layer's scores before the next; a backward keeps every layer's until it runs.
    """
    per_layer = [
        int(scores * 4 * benchmark.SCORE_COPIES[pass_])
        for child in module.modules()
        if isinstance(child, Mixer) and (scores := child.attention_scores(batch, length, fused=fused_kernels))
    ]
    if not per_layer:
        return 0
    return sum(per_layer) if pass_ == "fwd+bwd" else max(per_layer)


@dataclass(frozen=True)
class ClaimSpec:
    """One paper figure to reproduce: a ratio of two subjects' measurements.

    Attributes:
        title: what the paper claims, in words.
        source: the paper, its table and setting.
        metric: ``speed`` (baseline time / subject time) or ``memory`` (subject peak / baseline peak).
        paper: the paper's figure, or None for a context row the paper has no figure for.
        subject: label in ``claim_subjects`` of the faster / smaller side.
        baseline: label in ``claim_subjects`` it is compared with.
        pass_: ``forward`` or ``fwd+bwd``.
        length: L.
    """

    title: str
    source: str
    metric: str
    paper: float | None
    subject: str
    baseline: str
    pass_: str
    length: int


@dataclass(frozen=True)
class BenchSpec:
    """A benchmark run, as ``conf/bench/*.yaml`` describes it (``BenchSpec.from_config``).

    Attributes:
        mode: ``grid`` (``run_grid``) or ``claims`` (``run_claims``).
        mixers: mixer subjects, ``name`` or ``name/impl``.
        mixer_options: {mixer name: keyword options} for every subject of that mixer (and its peer).
        presets: model presets (``conf/model/``).
        preset_overrides: Hydra overrides applied to every preset subject, after its own.
        runtimes: from ``RUNTIMES``.
        passes: from ``PASSES``.
        lengths: sequence lengths L, measured in increasing order.
        batch: B.
        width: D of the mixers and peers.
        repeats: timed runs per cell (the median is reported); warmup: untimed runs before them.
        max_seconds_per_run: a run longer than this skips the longer L of its subject, runtime and pass.
        max_setup_seconds: a setup (compile, export) longer than this does too.
        max_total_seconds: once the grid has run this long, the remaining cells are skipped; None: no limit.
        memory_budget_gb: skip a cell whose estimated attention scores exceed this (GiB).
        max_length: {runtime: longest L}, e.g. ExecuTorch lowers every chunk unrolled.
        compile_backend: the torch.compile backend of ``compile`` and ``cuda_compile``.
        baseline: {"mixer": label, "preset": label} the speed-up ratios divide by.
        peers: also run the installed peer packages (``PEERS``) beside their seqmix mixers.
        plots: write the PNG plots; plot_runtime: runtime of the time and memory plots;
            plot_length: L of the throughput bars (None: the longest L measured on every runtime).
        out_dir: where results go.
        strict: exit status 1 when a cell failed (or a claim could not be measured).
        progress: show a progress bar.
        claim_runtime: ``eager`` or ``cuda``, the runtime of the claims.
        claim_subjects: {label: Subject} the claims compare.
        claims: {name: ClaimSpec}.
    """

    mode: str = "grid"
    mixers: tuple[Subject, ...] = ()
    mixer_options: Mapping = field(default_factory=dict)
    presets: tuple[Subject, ...] = ()
    preset_overrides: tuple[str, ...] = ()
    runtimes: tuple[str, ...] = ("eager",)
    passes: tuple[str, ...] = PASSES
    lengths: tuple[int, ...] = (1024,)
    batch: int = 1
    width: int = 256
    repeats: int = 5
    warmup: int = 2
    max_seconds_per_run: float = 20.0
    max_setup_seconds: float = 300.0
    max_total_seconds: float | None = None
    memory_budget_gb: float = 4.0
    max_length: Mapping = field(default_factory=dict)
    compile_backend: str = "inductor"
    baseline: Mapping = field(default_factory=dict)
    peers: bool = False
    plots: bool = True
    plot_runtime: str = "eager"
    plot_length: int | None = None
    out_dir: str = "bench_results/grid"
    strict: bool = False
    progress: bool = True
    claim_runtime: str = "eager"
    claim_subjects: Mapping = field(default_factory=dict)
    claims: Mapping = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: DictConfig | Mapping) -> BenchSpec:
        """Validate a ``bench`` config (``conf/bench/*.yaml``) and build the spec; errors name the field."""
        raw = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SeqmixError(f"bench: unknown field {unknown[0]!r}; valid fields are {sorted(known)}")
        options = raw.get("mixer_options") or {}
        if not isinstance(options, Mapping) or not all(isinstance(v, Mapping) for v in options.values()):
            raise SeqmixError(f"bench.mixer_options={options!r} is not valid; expected {{mixer name: {{option: value}}}}")
        for name in options:
            mixer_class(name)
        overrides = tuple(raw.get("preset_overrides") or ())
        values = dict(raw)
        values["mixers"] = tuple(
            parse_mixer(entry, options.get(str(entry).partition("/")[0], {}), "bench.mixers") for entry in raw.get("mixers") or ()
        )
        values["presets"] = tuple(parse_preset(name, overrides, "bench.presets") for name in raw.get("presets") or ())
        values["preset_overrides"] = overrides
        values["mixer_options"] = options
        values["runtimes"] = tuple(raw.get("runtimes") or ())
        values["passes"] = tuple(raw.get("passes") or ())
        values["lengths"] = tuple(sorted(set(raw.get("lengths") or ())))
        values["max_length"] = dict(raw.get("max_length") or {})
        values["baseline"] = dict(raw.get("baseline") or {})
        values["claim_subjects"] = {
            label: _parse_claim_subject(label, entry, overrides, options)
            for label, entry in (raw.get("claim_subjects") or {}).items()
        }
        values["claims"] = {name: _parse_claim(name, entry) for name, entry in (raw.get("claims") or {}).items()}
        return cls(**values)

    def __post_init__(self):
        if self.mode not in MODES:
            raise choice_error("bench.mode", self.mode, MODES)
        for runtime in self.runtimes:
            if runtime not in RUNTIMES:
                raise choice_error("bench.runtimes", runtime, RUNTIMES)
        for pass_ in self.passes:
            if pass_ not in PASSES:
                raise choice_error("bench.passes", pass_, PASSES)
        for runtime, length in self.max_length.items():
            if runtime not in RUNTIMES:
                raise choice_error("bench.max_length", runtime, RUNTIMES)
            require_int("bench", f"max_length.{runtime}", length, 1, "longest L on that runtime")
        for length in self.lengths:
            require_int("bench", "lengths", length, 1, "sequence length L")
        require_int("bench", "batch", self.batch, 1, "B")
        require_int("bench", "width", self.width, 1, "D of the mixers")
        require_int("bench", "repeats", self.repeats, 1, "timed runs")
        require_int("bench", "warmup", self.warmup, 0, "untimed runs")
        for name in ("max_seconds_per_run", "max_setup_seconds", "memory_budget_gb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise SeqmixError(f"bench.{name}={value!r} is not valid; expected a positive number")
        total = self.max_total_seconds
        if total is not None and (isinstance(total, bool) or not isinstance(total, (int, float)) or not total > 0):
            raise SeqmixError(f"bench.max_total_seconds={total!r} is not valid; expected a positive number or null")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise choice_error("bench.compile_backend", self.compile_backend, COMPILE_BACKENDS)
        if self.plot_runtime not in RUNTIMES:
            raise choice_error("bench.plot_runtime", self.plot_runtime, RUNTIMES)
        if self.plot_length is not None:
            require_int("bench", "plot_length", self.plot_length, 1, "L of the throughput bars, or null")
        if set(self.baseline) - {"mixer", "preset"}:
            raise SeqmixError(f"bench.baseline={dict(self.baseline)!r} is not valid; expected the keys 'mixer' and 'preset'")
        if self.claim_runtime not in PEER_RUNTIMES:
            raise choice_error("bench.claim_runtime", self.claim_runtime, PEER_RUNTIMES)
        labels = [s.label for s in (*self.mixers, *self.presets)]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise SeqmixError(f"bench: subject {duplicates[0]!r} is listed twice in bench.mixers / bench.presets")
        if self.mode == "grid":
            if not labels:
                raise SeqmixError("bench: the grid has no subject; list some in bench.mixers or bench.presets")
            for name in ("runtimes", "passes", "lengths"):
                if not getattr(self, name):
                    raise SeqmixError(f"bench.{name} is empty; give at least one")
        else:
            if not self.claims:
                raise SeqmixError("bench.mode=claims needs bench.claims; see conf/bench/paper_claims.yaml")
            for name, claim in self.claims.items():
                for side in ("subject", "baseline"):
                    label = getattr(claim, side)
                    if label not in self.claim_subjects:
                        raise choice_error(f"bench.claims.{name}.{side}", label, self.claim_subjects)

    def grid_subjects(self) -> list[Subject]:
        """The mixers, the presets and, with ``peers``, one peer subject per seqmix mixer it mirrors."""
        subjects = [*self.mixers, *self.presets]
        if self.peers:
            for peer in PEERS.values():
                for mixer in self.mixers:
                    if mixer.name == peer.against:
                        label = peer.name if mixer.impl is None else f"{peer.name} (vs {mixer.label})"
                        subjects.append(Subject(label, "peer", peer.name, options=mixer.options, against=mixer.label))
        return subjects


def _parse_claim_subject(label: str, entry, overrides: Sequence[str], options: Mapping) -> Subject:
    where = f"bench.claim_subjects.{label}"
    if not isinstance(entry, Mapping) or ("mixer" in entry) == ("preset" in entry):
        raise SeqmixError(
            f"{where}={entry!r} is not valid; expected {{mixer: name, impl: ..., options: {{...}}}} "
            "or {preset: name, overrides: [...]}"
        )
    if "preset" in entry:
        extra = sorted(set(entry) - {"preset", "overrides"})
        if extra:
            raise SeqmixError(f"{where}: unknown key {extra[0]!r} for a preset; valid keys are ['overrides', 'preset']")
        subject = parse_preset(entry["preset"], [*(entry.get("overrides") or ()), *overrides], f"{where}.preset")
    else:
        extra = sorted(set(entry) - {"mixer", "impl", "options"})
        if extra:
            raise SeqmixError(f"{where}: unknown key {extra[0]!r} for a mixer; valid keys are ['impl', 'mixer', 'options']")
        name = entry["mixer"] + (f"/{entry['impl']}" if entry.get("impl") else "")
        merged = {**options.get(entry["mixer"], {}), **(entry.get("options") or {})}
        subject = parse_mixer(name, merged, f"{where}.mixer")
    return Subject(label, subject.kind, subject.name, subject.impl, subject.options, subject.overrides)


def _parse_claim(name: str, entry) -> ClaimSpec:
    where = f"bench.claims.{name}"
    keys = {"title", "source", "metric", "paper", "subject", "baseline", "pass", "length"}
    if not isinstance(entry, Mapping) or set(entry) != keys:
        got = sorted(entry) if isinstance(entry, Mapping) else entry
        raise SeqmixError(f"{where}={got!r} is not valid; expected the keys {sorted(keys)}")
    if entry["metric"] not in METRICS:
        raise choice_error(f"{where}.metric", entry["metric"], METRICS)
    if entry["pass"] not in PASSES:
        raise choice_error(f"{where}.pass", entry["pass"], PASSES)
    require_int(where, "length", entry["length"], 1, "sequence length L")
    paper = entry["paper"]
    if paper is not None and (isinstance(paper, bool) or not isinstance(paper, (int, float)) or paper <= 0):
        raise SeqmixError(f"{where}.paper={paper!r} is not valid; expected a positive ratio or null")
    return ClaimSpec(
        entry["title"], entry["source"], entry["metric"], None if paper is None else float(paper),
        entry["subject"], entry["baseline"], entry["pass"], entry["length"],
    )


@dataclass(frozen=True)
class Cell:
    """One grid cell: a subject on a runtime, for one pass at one length."""

    subject: Subject
    runtime: str
    pass_: str
    length: int


def plan_grid(spec: BenchSpec) -> list[Cell]:
    """Every cell the grid reports, in measuring order.

    Runtime by runtime in ``spec.runtimes`` order, so when ``max_total_seconds`` runs out every
    subject has the first runtimes measured; L innermost, so budgets can skip the longer L.
    Peers get the runtimes of ``PEER_RUNTIMES`` that ``spec.runtimes`` lists.
    """
    subjects = spec.grid_subjects()
    cells = []
    for runtime in spec.runtimes:
        for subject in subjects:
            if subject.kind == "peer" and runtime not in PEER_RUNTIMES:
                continue
            for pass_ in spec.passes:
                cells.extend(Cell(subject, runtime, pass_, length) for length in spec.lengths)
    return cells


def plan_claims(spec: BenchSpec) -> list[tuple[Subject, Subject, str, int]]:
    """The (subject, baseline, pass, L) pairs the claims need, each measured once."""
    pairs = []
    for claim in spec.claims.values():
        pair = (spec.claim_subjects[claim.subject], spec.claim_subjects[claim.baseline], claim.pass_, claim.length)
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def check_spec(spec: BenchSpec) -> int:
    """Build every subject once (its config, options and overrides must be valid); time nothing.

    Returns how many cells (grid) or pairs (claims) the spec would measure.
    """
    if spec.mode == "claims":
        subjects = {s.label: s for pair in plan_claims(spec) for s in pair[:2]}.values()
        planned = len(plan_claims(spec))
    else:
        subjects = [s for s in spec.grid_subjects() if s.kind != "peer" or peer_unavailable(PEERS[s.name]) is None]
        planned = len(plan_grid(spec))
    for subject in subjects:
        build_subject(subject, spec.width)
    return planned


# --- runtimes -----------------------------------------------------------------------------


def runtime_unavailable(runtime: str) -> str | None:
    """Why ``runtime`` cannot run on this machine, or None when it can."""
    if runtime in GPU_RUNTIMES and not torch.cuda.is_available():
        return (
            f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda})"
        )
    if runtime == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as error:
            return f"ONNX Runtime is not installed ({error}): pip install 'seqmix[export]'"
    if runtime == "executorch":
        try:
            import executorch.exir  # noqa: F401
            import executorch.runtime  # noqa: F401
        except ImportError as error:
            return f"ExecuTorch is not installed ({error}): pip install 'seqmix[executorch]'"
    if runtime == "tensorrt":
        try:
            import torch_tensorrt  # noqa: F401  (registers the "tensorrt" torch.compile backend)
        except ImportError as error:
            from seqmix.compile.compiler import TENSORRT_INSTALL

            return f"torch-tensorrt is not installed ({error}): {TENSORRT_INSTALL}"
    return None


@dataclass
class Prepared:
    """A cell ready to time.

    Attributes:
        run: one pass; it discards its output. clear: drops the gradients a run leaves.
        device: where it runs (the clock synchronises it, see ``sync``).
        setup_s: wall time of building the runtime's graph and its first call.
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
        benchmark.synchronize(self.device)


def compile_module(module: nn.Module, backend: str) -> Callable[..., Tensor]:
    """``torch.compile`` of a mixer or peer module, with static shapes and ``compile_model``'s settings.

    Inductor needs the scan workarounds ``compile.compiler`` documents: the ``AlignScanCarries``
    pass and scalar outputs captured while a call compiles.
    """
    from seqmix.compile.compiler import AlignScanCarries

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
        from seqmix.compile.compiler import compile_model

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


def _onnxruntime_call(module: nn.Module, inputs: tuple[Tensor, ...], workdir: Path) -> Callable[..., Tensor]:
    """Export ``module`` at the inputs' shapes, load it into ONNX Runtime and check it against eager."""
    from .onnx_export import OPSET, session

    names = ["tokens"] if isinstance(module, SequenceModel) else ["x"]
    path = workdir / "graph.onnx"
    with torch.no_grad(), quiet_exporters():
        program = torch.onnx.export(
            module, inputs, dynamo=True, opset_version=OPSET, verbose=False, input_names=names, output_names=["output"]
        )
    program.save(str(path))
    runner = session(path)
    feed = {name: tensor.numpy() for name, tensor in zip(names, inputs)}

    def call(*_: Tensor) -> Tensor:
        return torch.from_numpy(runner.run(None, feed)[0])

    _check_against_eager(module, inputs, call(), "onnxruntime")
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
    from .executorch_export import load_pte_method, lower_to_pte

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


def _pass_callables(
    call: Callable[..., Tensor], module: nn.Module, inputs: tuple[Tensor, ...], pass_: str
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(run, clear) for one pass of ``call(*inputs)``, the module switched to eval or train mode.

    fwd+bwd backpropagates ``output.sum()`` to every parameter and to the float inputs; clear
    sets their gradients to None.
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

    def forward_backward() -> None:
        clear()
        call(*inputs).sum().backward()

    return forward_backward, clear


def prepare(
    runtime: str, module: nn.Module, inputs: tuple[Tensor, ...], pass_: str, compile_backend: str, workdir: Path
) -> Prepared:
    """Move, compile or export ``module`` for ``runtime`` and make its first call (the setup).

    Args:
        runtime: from ``RUNTIMES``; available (``runtime_unavailable`` is None).
        module: built by ``build_subject``, on the CPU.
        inputs: from ``example_inputs``, on the CPU.
        pass_: ``forward``, or ``fwd+bwd`` on a training runtime.
        compile_backend: the torch.compile backend of ``compile`` and ``cuda_compile``.
        workdir: an empty directory for exported files.
    """
    device = torch.device("cuda" if runtime in GPU_RUNTIMES else "cpu")
    module = module.to(device)
    inputs = tuple(t.to(device) for t in inputs)
    if runtime in EXPORTED_RUNTIMES:
        module.eval()
        use_exportable_paths(module)
    start = time.perf_counter()
    if runtime in ("eager", "cuda"):
        call = module
    elif runtime in ("compile", "cuda_compile"):
        call = _compiled_call(module, compile_backend)
    elif runtime == "tensorrt":
        call = _compiled_call(module, "tensorrt")
    elif runtime == "onnxruntime":
        call = _onnxruntime_call(module, inputs, workdir)
    else:
        call = _executorch_call(module, inputs, workdir)
    run, clear = _pass_callables(call, module, inputs, pass_)
    run()
    benchmark.synchronize(device)
    clear()
    setup_s = time.perf_counter() - start
    return Prepared(run, clear, device, setup_s, describe_impls(module), runtime in TRAINING_RUNTIMES)


# --- the grid -----------------------------------------------------------------------------


@dataclass
class GridRow:
    """One grid cell's outcome; ``status`` is ``measured``, ``skipped`` or ``failed`` (then ``reason``).

    ``time_ms`` is the median of the timed runs, ``time_low_ms`` and ``time_high_ms`` the fastest
    and the slowest; ``load`` the machine's load average when it exceeded its cores.
    """

    kind: str
    subject: str
    runtime: str
    pass_: str
    length: int
    batch: int
    width: int | None = None
    device: str | None = None
    impl: str | None = None
    time_ms: float | None = None
    time_low_ms: float | None = None
    time_high_ms: float | None = None
    peak_mib: float | None = None
    tokens_per_s: float | None = None
    runs: int = 0
    load: float | None = None
    setup_s: float | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_baseline: float | None = None
    memory_vs_baseline: float | None = None
    status: str = "measured"
    reason: str | None = None
    note: str | None = None

    def to_dict(self) -> dict:
        return benchmark.record(self)


@dataclass
class GridSlope:
    """Log-log slope of time against L for one (subject, runtime, pass); None with a reason when unfit."""

    subject: str
    runtime: str
    pass_: str
    slope: float | None
    lengths: list[int]
    reason: str | None = None

    def to_dict(self) -> dict:
        return benchmark.record(self)


@dataclass
class PeerComparison:
    """A peer against its seqmix subject at one runtime, pass and L.

    ``seqmix_speedup`` = peer time / seqmix time; ``memory_ratio`` = seqmix peak / peer peak;
    None with a reason when either side was not measured.
    """

    peer: str
    seqmix: str
    runtime: str
    pass_: str
    length: int
    seqmix_speedup: float | None = None
    memory_ratio: float | None = None
    reason: str | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return benchmark.record(self)


@dataclass
class GridResult:
    """Everything ``run_grid`` produced."""

    spec: BenchSpec
    environment: dict
    rows: list[GridRow]
    slopes: list[GridSlope]
    peers: list[PeerComparison]

    @property
    def failed(self) -> bool:
        return any(row.status == "failed" for row in self.rows)

    def to_dict(self) -> dict:
        return {
            "spec": _spec_dict(self.spec),
            "environment": self.environment,
            "rows": [row.to_dict() for row in self.rows],
            "slopes": [slope.to_dict() for slope in self.slopes],
            "peers": [peer.to_dict() for peer in self.peers],
        }


def _spec_dict(spec: BenchSpec) -> dict:
    """The spec as plain JSON data (subjects by label; claims with their fields)."""
    data = asdict(spec)
    data["mixers"] = [s.label for s in spec.mixers]
    data["presets"] = [s.label for s in spec.presets]
    return data


def _first_line(error: BaseException) -> str:
    """``Type: first line of the message`` of an exception."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def measure_cell(cell: Cell, spec: BenchSpec, row: GridRow, workdir: Path) -> None:
    """Build, set up and time one cell, filling ``row``; exceptions become a skipped or failed row."""
    try:
        module = build_subject(cell.subject, spec.width)
        row.width = subject_width(cell.subject, module, spec.width)
        if cell.subject.kind == "peer":
            seqmix = build_mixer(PEERS[cell.subject.name].against, spec.width, **cell.subject.options)
            estimate = int(PEERS[cell.subject.name].score_bytes(seqmix, cell.pass_) * spec.batch * cell.length**2)
        else:
            fused = cell.runtime not in EXPORTED_RUNTIMES
            estimate = attention_score_bytes(module, spec.batch, cell.length, cell.pass_, fused)
        if estimate > spec.memory_budget_gb * 2**30:
            row.status = "skipped"
            row.reason = f"estimated attention scores {estimate / 2**30:.1f} GiB > bench.memory_budget_gb={spec.memory_budget_gb:g}"
            return
        inputs = example_inputs(cell.subject, module, spec.batch, cell.length, spec.width)
        prepared = prepare(cell.runtime, module, inputs, cell.pass_, spec.compile_backend, workdir)
        row.device, row.impl, row.setup_s = str(prepared.device), prepared.impl, prepared.setup_s
        timing = time_calls(prepared.run, spec.repeats, spec.warmup, sync=prepared.sync, max_seconds=spec.max_seconds_per_run)
        if prepared.torch_memory:
            # Gradients left by the last run would be freed inside the measured run and offset its peak.
            prepared.clear()
            row.peak_mib = benchmark.peak_memory_bytes(prepared.run, prepared.device) / 2**20
            prepared.clear()
        _record_timing(row, timing)
        row.tokens_per_s = spec.batch * cell.length / (timing.median_ms / 1e3)
    except ExportMismatch as error:
        row.status, row.reason = "failed", str(error)
    except SeqmixError as error:
        row.status, row.reason = "skipped", f"seqmix refused it: {error}"
    except Exception as error:  # noqa: BLE001  (any failure of one cell is reported, the grid goes on)
        row.status, row.reason = "failed", _first_line(error)


def _record_timing(row: GridRow | Measurement, timing: Timing) -> None:
    """Copy a Timing into a grid row or a claims measurement."""
    row.time_ms, row.time_low_ms, row.time_high_ms = timing.median_ms, timing.low_ms, timing.high_ms
    row.runs, row.load, row.note = timing.runs, timing.load, timing.note


def _skip_reason(
    cell: Cell, spec: BenchSpec, unavailable: Mapping[str, str | None], stopped: Mapping[tuple, str], elapsed: float
) -> str | None:
    """Why ``cell`` is not measured, decided before building anything; None to measure it."""
    if cell.pass_ == "fwd+bwd" and cell.runtime not in TRAINING_RUNTIMES:
        return f"{cell.runtime} runs inference graphs only; fwd+bwd is measured on {', '.join(TRAINING_RUNTIMES)}"
    if unavailable.get(cell.runtime):
        return unavailable[cell.runtime]
    if cell.subject.kind == "peer" and unavailable.get(cell.subject.name):
        return unavailable[cell.subject.name]
    limit = spec.max_length.get(cell.runtime)
    if limit is not None and cell.length > limit:
        return f"L={cell.length} > bench.max_length.{cell.runtime}={limit}"
    key = (cell.subject.label, cell.runtime, cell.pass_)
    if key in stopped:
        return stopped[key]
    if spec.max_total_seconds is not None and elapsed > spec.max_total_seconds:
        return f"bench.max_total_seconds={spec.max_total_seconds:g} used up before this cell"
    return None


def _stop_reason(row: GridRow, spec: BenchSpec) -> str | None:
    """Why the longer lengths of this row's subject, runtime and pass are skipped, or None."""
    if row.status == "measured" and row.note is not None:
        return f"L={row.length} ran {row.time_ms / 1e3:.1f} s > bench.max_seconds_per_run={spec.max_seconds_per_run:g}"
    if row.status == "measured" and row.setup_s > spec.max_setup_seconds:
        return (
            f"setup (compile or export) at L={row.length} took {row.setup_s:.0f} s "
            f"> bench.max_setup_seconds={spec.max_setup_seconds:g}"
        )
    if row.status != "measured":
        return f"not measured at L={row.length}, {row.status}: {row.reason}"
    return None


def run_grid(spec: BenchSpec, progress: bool | None = None) -> GridResult:
    """Measure every cell of ``plan_grid(spec)``; see the module docstring.

    Args:
        spec: what to measure (``mode`` grid).
        progress: show a tqdm bar over the cells (stderr); None follows ``spec.progress``.
    """
    cells = plan_grid(spec)
    unavailable: dict[str, str | None] = {runtime: runtime_unavailable(runtime) for runtime in spec.runtimes}
    unavailable.update({s.name: peer_unavailable(PEERS[s.name]) for s in spec.grid_subjects() if s.kind == "peer"})
    stopped: dict[tuple, str] = {}
    rows: list[GridRow] = []
    start = time.perf_counter()
    show = spec.progress if progress is None else progress
    bar = tqdm(total=len(cells), disable=not show, unit="cell", dynamic_ncols=True)
    with tempfile.TemporaryDirectory(prefix="seqmix-bench-") as scratch:
        for index, cell in enumerate(cells):
            bar.set_description(f"{cell.subject.label} {cell.runtime} {cell.pass_} L={cell.length}")
            row = GridRow(cell.subject.kind, cell.subject.label, cell.runtime, cell.pass_, cell.length, spec.batch)
            reason = _skip_reason(cell, spec, unavailable, stopped, time.perf_counter() - start)
            if reason is not None:
                row.status, row.reason = "skipped", reason
            else:
                workdir = Path(scratch) / str(index)
                workdir.mkdir()
                measure_cell(cell, spec, row, workdir)
                stop = _stop_reason(row, spec)
                if stop is not None:
                    stopped[(cell.subject.label, cell.runtime, cell.pass_)] = stop
            rows.append(row)
            bar.update()
    bar.close()
    torch._dynamo.reset()
    _add_ratios(rows, spec)
    return GridResult(spec, environment(spec.runtimes), rows, fit_grid_slopes(rows), compare_peers(rows, spec))


def _add_ratios(rows: Sequence[GridRow], spec: BenchSpec) -> None:
    """Fill speedup_vs_eager, speedup_vs_baseline and memory_vs_baseline of the measured rows."""
    measured = {(r.subject, r.runtime, r.pass_, r.length): r for r in rows if r.status == "measured"}
    for row in measured.values():
        eager = measured.get((row.subject, EAGER_REFERENCE[row.runtime], row.pass_, row.length))
        if eager is not None:
            row.speedup_vs_eager = eager.time_ms / row.time_ms
        baseline_label = spec.baseline.get("preset" if row.kind == "preset" else "mixer")
        baseline = measured.get((baseline_label, row.runtime, row.pass_, row.length))
        if baseline is not None:
            row.speedup_vs_baseline = baseline.time_ms / row.time_ms
            if row.peak_mib is not None and baseline.peak_mib:
                row.memory_vs_baseline = row.peak_mib / baseline.peak_mib


def fit_grid_slopes(rows: Sequence[GridRow]) -> list[GridSlope]:
    """Log-log slope of time against L per (subject, runtime, pass), in row order."""
    groups: dict[tuple[str, str, str], list[GridRow]] = {}
    for row in rows:
        groups.setdefault((row.subject, row.runtime, row.pass_), []).append(row)
    slopes = []
    for (subject, runtime, pass_), group in groups.items():
        measured = [row for row in group if row.status == "measured"]
        lengths = [row.length for row in measured]
        if len(lengths) < 2:
            slopes.append(GridSlope(subject, runtime, pass_, None, lengths, f"needs 2 measured lengths, has {len(lengths)}"))
        else:
            slope = benchmark.loglog_slope(lengths, [r.time_ms for r in measured])
            slopes.append(GridSlope(subject, runtime, pass_, slope, lengths))
    return slopes


def compare_peers(rows: Sequence[GridRow], spec: BenchSpec) -> list[PeerComparison]:
    """Each peer row against the seqmix row it mirrors (same runtime, pass and L)."""
    by_key = {(r.subject, r.runtime, r.pass_, r.length): r for r in rows}
    against = {s.label: s for s in spec.grid_subjects() if s.kind == "peer"}
    comparisons = []
    for row in rows:
        if row.kind != "peer":
            continue
        subject = against[row.subject]
        seqmix = by_key.get((subject.against, row.runtime, row.pass_, row.length))
        comparison = PeerComparison(row.subject, subject.against, row.runtime, row.pass_, row.length, note=PEERS[subject.name].note)
        missing = [f"{r.subject}: {r.status} ({r.reason})" for r in (seqmix, row) if r is not None and r.status != "measured"]
        if seqmix is None:
            missing.append(f"{subject.against} was not in the grid")
        if missing:
            comparison.reason = "; ".join(missing)
        else:
            comparison.seqmix_speedup = row.time_ms / seqmix.time_ms
            if row.peak_mib and seqmix.peak_mib is not None:
                comparison.memory_ratio = seqmix.peak_mib / row.peak_mib
        comparisons.append(comparison)
    return comparisons


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(runtimes: Sequence[str] = ()) -> dict:
    """What the numbers depend on besides the code: ``seqmix.benchmark.environment`` plus runtime versions."""
    env = benchmark.environment(torch.device("cpu"))
    for distribution in ("onnxruntime", "executorch", "torch-tensorrt", "mega-pytorch", "pytorch-tcn"):
        env[distribution] = _version(distribution)
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    env["runtimes_unavailable"] = {r: reason for r in runtimes if (reason := runtime_unavailable(r))}
    return env


# --- claims -------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One subject's side of an interleaved pair: median time (with the fastest and slowest run and
    the load average when the machine was busier than its cores), peak memory, parameter count."""

    subject: str
    pass_: str
    length: int
    time_ms: float | None = None
    time_low_ms: float | None = None
    time_high_ms: float | None = None
    peak_mib: float | None = None
    parameters: int | None = None
    runs: int = 0
    load: float | None = None
    impl: str | None = None
    reason: str | None = None
    note: str | None = None

    def to_dict(self) -> dict:
        return benchmark.record(self)


@dataclass
class ClaimOutcome:
    """A claim set beside our measurement: ``ours`` is the ratio, ``verdict`` PASS, MISS, — or MISSING."""

    name: str
    claim: ClaimSpec
    ours: float | None
    verdict: str
    reason: str | None = None

    def to_dict(self) -> dict:
        data = asdict(self.claim)
        data["pass"] = data.pop("pass_")
        return {"name": self.name, **data, "ours": self.ours, "verdict": self.verdict, "reason": self.reason}


@dataclass
class ClaimsResult:
    """Everything ``run_claims`` produced."""

    spec: BenchSpec
    environment: dict
    measurements: list[Measurement]
    outcomes: list[ClaimOutcome]

    @property
    def failed(self) -> bool:
        return any(outcome.verdict == "MISSING" for outcome in self.outcomes)

    def to_dict(self) -> dict:
        return {
            "spec": _spec_dict(self.spec),
            "environment": self.environment,
            "measurements": [m.to_dict() for m in self.measurements],
            "claims": [outcome.to_dict() for outcome in self.outcomes],
        }


def measure_pair(subjects: Sequence[Subject], pass_: str, length: int, spec: BenchSpec, workdir: Path) -> list[Measurement]:
    """Time subjects on inputs of the same shape with their timed runs interleaved (a b a b ...).

    Each side gets ``warmup`` untimed runs, then ``repeats`` rounds of one timed run each; a run
    over ``max_seconds_per_run`` ends the rounds. Peak memory is measured per side afterwards. An
    exception leaves every side untimed, with the reason naming the side that raised it.
    """
    results = [Measurement(s.label, pass_, length) for s in subjects]
    current = subjects[0].label
    try:
        prepared: list[Prepared] = []
        for subject, result in zip(subjects, results):
            current = subject.label
            module = build_subject(subject, spec.width)
            result.parameters = sum(p.numel() for p in module.parameters())
            inputs = example_inputs(subject, module, spec.batch, length, spec.width)
            prepared.append(prepare(spec.claim_runtime, module, inputs, pass_, spec.compile_backend, workdir))
            result.impl = prepared[-1].impl
        for side, result in zip(prepared, results):
            current = result.subject
            for _ in range(spec.warmup):
                side.run()
        times_s: list[list[float]] = [[] for _ in prepared]
        note = None
        for _ in range(spec.repeats):
            for side, timed_s, result in zip(prepared, times_s, results):
                current = result.subject
                timed_s.append(time_once(side.run, side.sync))
            slowest = max(timed_s[-1] for timed_s in times_s)
            if slowest > spec.max_seconds_per_run:
                note = (
                    f"a run took {slowest:.1f} s > bench.max_seconds_per_run={spec.max_seconds_per_run:g}: "
                    f"stopped after {len(times_s[0])} round(s)"
                )
                break
        for side, timed_s, result in zip(prepared, times_s, results):
            current = result.subject
            side.clear()
            result.peak_mib = benchmark.peak_memory_bytes(side.run, side.device) / 2**20
            side.clear()
            _record_timing(result, summarize(timed_s, note))
    except Exception as error:  # noqa: BLE001  (a side that cannot run makes its claims MISSING, the others go on)
        for result in results:
            result.time_ms = result.time_low_ms = result.time_high_ms = result.peak_mib = result.load = result.note = None
            result.runs = 0
            result.reason = f"{current} failed: {_first_line(error)}"
    return results


def judge_claim(name: str, claim: ClaimSpec, subject: Measurement, baseline: Measurement) -> ClaimOutcome:
    """Our ratio for ``claim`` and its verdict.

    speed = baseline time / subject time, PASS when at least the paper's figure; memory =
    subject peak / baseline peak, PASS when at most the paper's; ``—`` when the paper gives no
    figure; MISSING when a side was not measured.
    """
    missing = list(dict.fromkeys(m.reason for m in (subject, baseline) if m.time_ms is None))
    if missing:
        return ClaimOutcome(name, claim, None, "MISSING", "; ".join(missing))
    if claim.metric == "speed":
        ours = baseline.time_ms / subject.time_ms
        meets = claim.paper is not None and ours >= claim.paper
    else:
        if not baseline.peak_mib:
            return ClaimOutcome(name, claim, None, "MISSING", f"{baseline.subject} allocated no measurable memory")
        ours = subject.peak_mib / baseline.peak_mib
        meets = claim.paper is not None and ours <= claim.paper
    verdict = "—" if claim.paper is None else ("PASS" if meets else "MISS")
    return ClaimOutcome(name, claim, ours, verdict)


def run_claims(spec: BenchSpec, progress: bool | None = None) -> ClaimsResult:
    """Measure the pairs behind ``spec.claims`` (``plan_claims``) and judge every claim."""
    unavailable = runtime_unavailable(spec.claim_runtime)
    if unavailable:
        raise SeqmixError(f"bench.claim_runtime={spec.claim_runtime!r} cannot run here: {unavailable}")
    pairs = plan_claims(spec)
    show = spec.progress if progress is None else progress
    measured: dict[tuple[str, str, str, int], tuple[Measurement, Measurement]] = {}
    with tempfile.TemporaryDirectory(prefix="seqmix-claims-") as scratch:
        for subject, baseline, pass_, length in tqdm(pairs, disable=not show, unit="pair", dynamic_ncols=True):
            sides = measure_pair((subject, baseline), pass_, length, spec, Path(scratch))
            measured[(subject.label, baseline.label, pass_, length)] = (sides[0], sides[1])
    outcomes = [
        judge_claim(name, claim, *measured[(claim.subject, claim.baseline, claim.pass_, claim.length)])
        for name, claim in spec.claims.items()
    ]
    measurements = [m for pair in measured.values() for m in pair]
    return ClaimsResult(spec, environment((spec.claim_runtime,)), measurements, outcomes)


# --- reporting ----------------------------------------------------------------------------


def _number(value: float | None, unit: str = "") -> str:
    """Three significant digits (no exponent below 10^6), or '—' for None."""
    if value is None:
        return "—"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return text + unit


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table (GitHub pipes), one string per line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in body]


def _machine_line(env: Mapping, spec: BenchSpec) -> str:
    device = env.get("cuda_device")
    cpu = env.get("processor") or env.get("platform")
    where = f"{cpu}, {env['threads']} torch threads" + (f"; GPU {device} (CUDA {env.get('cuda')})" if device else "")
    runs = f"{spec.repeats} run" + ("s" if spec.repeats != 1 else "")
    return f"torch {env['torch']} on {where}. B={spec.batch}, float32, median of {runs} after {spec.warmup} warm-up"


def _is_measured(row: GridRow | None) -> bool:
    return row is not None and row.status == "measured"


def _time_range(measured: GridRow | Measurement) -> str:
    """``7.92 (7.8–8.1)``: the median time in ms and the fastest–slowest run; '—' when not timed."""
    if measured.time_ms is None:
        return "—"
    return f"{_number(measured.time_ms)} ({_number(measured.time_low_ms)}–{_number(measured.time_high_ms)})"


def _cell_text(row: GridRow | None, text: Callable[[GridRow], str]) -> str:
    """``text(row)`` for a measured row (``*`` when a run exceeded the time budget), else skip/FAIL."""
    if row is None:
        return ""
    if row.status != "measured":
        return "skip" if row.status == "skipped" else "FAIL"
    return text(row) + ("*" if row.note else "")


def shown_runtime(spec: BenchSpec) -> str:
    """The runtime of the plots and of the baseline table: ``plot_runtime``, else the first one listed."""
    return spec.plot_runtime if spec.plot_runtime in spec.runtimes else spec.runtimes[0]


def format_grid_report(result: GridResult) -> str:
    """The grid as Markdown: time, memory and speed-up tables, slopes, peers, and what was not measured."""
    spec, rows = result.spec, result.rows
    runtimes = list(spec.runtimes)
    index = {(r.subject, r.runtime, r.pass_, r.length): r for r in rows}
    subjects = list(dict.fromkeys((r.kind, r.subject) for r in rows))
    lines = [
        "## Benchmark grid",
        "",
        _machine_line(result.environment, spec) + f". Mixers and peers at D={spec.width}, presets at their own width. "
        "Times: median (fastest–slowest run) in ms. `skip`/`FAIL`: see *Not measured*; `*`: a run exceeded the time budget.",
        "",
    ]
    busy = benchmark.busy_line([r.load for r in rows if r.status == "measured"])
    if busy:
        lines += [f"**{busy}.**", ""]
    for pass_ in spec.passes:
        shown = [r for r in runtimes if pass_ == "forward" or r in TRAINING_RUNTIMES]
        lines += [f"### Time (ms), {pass_}", ""]
        body = [
            [label, str(length)] + [_cell_text(index.get((label, r, pass_, length)), _time_range) for r in shown]
            for _, label in subjects
            for length in spec.lengths
            if any(index.get((label, r, pass_, length)) for r in shown)
        ]
        lines += markdown_table(["subject", "L", *shown], body) + [""]
    memory_runtimes = [r for r in runtimes if r in TRAINING_RUNTIMES]
    if memory_runtimes:
        lines += ["### Peak memory (MiB)", ""]
        header = [f"{r} {p}" for r in memory_runtimes for p in spec.passes]
        body = [
            [label, str(length)]
            + [_cell_text(index.get((label, r, p, length)), lambda x: _number(x.peak_mib)) for r in memory_runtimes for p in spec.passes]
            for _, label in subjects
            for length in spec.lengths
        ]
        lines += markdown_table(["subject", "L", *header], body) + [""]
    for kind in ("mixer", "preset"):
        baseline = spec.baseline.get(kind)
        measured_kind = [label for k, label in subjects if k == kind or (kind == "mixer" and k == "peer")]
        if not baseline or not measured_kind:
            continue
        runtime = shown_runtime(spec)
        lines += [f"### Speed-up vs `{baseline}` ({runtime}; baseline median time / subject median time)", ""]
        body = [
            [label, pass_]
            + [_cell_text(index.get((label, runtime, pass_, n)), lambda x: _number(x.speedup_vs_baseline, "×")) for n in spec.lengths]
            for label in measured_kind
            for pass_ in spec.passes
        ]
        lines += markdown_table(["subject", "pass", *[f"L={n}" for n in spec.lengths]], body) + [""]
    other = [r for r in runtimes if r != EAGER_REFERENCE[r] and EAGER_REFERENCE[r] in runtimes]
    if other:
        lines += ["### Speed-up vs eager (forward; eager median time on the same device / runtime median time; cuda vs CPU eager)", ""]
        body = [
            [label, runtime]
            + [_cell_text(index.get((label, runtime, "forward", n)), lambda x: _number(x.speedup_vs_eager, "×")) for n in spec.lengths]
            for _, label in subjects
            for runtime in other
            if any(_is_measured(index.get((label, runtime, "forward", n))) for n in spec.lengths)
        ]
        lines += markdown_table(["subject", "runtime", *[f"L={n}" for n in spec.lengths]], body) + [""]
    fitted = [s for s in result.slopes if s.slope is not None]
    if fitted:
        lines += ["### Log-log slope of time against L (1 = linear, 2 = quadratic)", ""]
        body = [[s.subject, s.runtime, s.pass_, f"{s.slope:.2f}", ", ".join(map(str, s.lengths))] for s in fitted]
        lines += markdown_table(["subject", "runtime", "pass", "slope", "over L"], body) + [""]
    if result.peers:
        compared = [p for p in result.peers if p.seqmix_speedup is not None]
        lines += ["### Peers (seqmix speed-up = peer time / seqmix time; memory ratio = seqmix peak / peer peak)", ""]
        body = [
            [p.seqmix, p.peer, p.runtime, p.pass_, str(p.length), _number(p.seqmix_speedup, "×"), _number(p.memory_ratio, "×")]
            for p in compared
        ]
        lines += markdown_table(["seqmix", "peer", "runtime", "pass", "L", "seqmix speed-up", "memory ratio"], body)
        lines += [""] + list(dict.fromkeys(f"- {p.peer}: {p.note}" for p in result.peers))
        if len(compared) < len(result.peers):
            lines.append(f"- {len(result.peers) - len(compared)} comparison(s) not made: a side was not measured (see *Not measured*)")
        lines.append("")
    lines += _not_measured(rows)
    return "\n".join(lines).rstrip() + "\n"


def _not_measured(rows: Sequence[GridRow]) -> list[str]:
    """Skipped and failed cells grouped by reason, so a missing runtime is one line, not forty."""
    groups: dict[tuple[str, str], list[GridRow]] = {}
    for row in rows:
        if row.status != "measured":
            groups.setdefault((row.status, row.reason), []).append(row)
    if not groups:
        return []
    body = []
    for (status, reason), group in groups.items():
        cells = sorted({f"{r.subject}/{r.runtime}/{r.pass_}" for r in group})
        lengths = sorted({r.length for r in group})
        where = ", ".join(cells[:6]) + (f" and {len(cells) - 6} more" if len(cells) > 6 else "")
        body.append([status, str(len(group)), f"{where}; L={','.join(map(str, lengths))}", reason])
    return ["### Not measured", ""] + markdown_table(["status", "cells", "which", "reason"], body) + [""]


CSV_FIELDS = tuple("pass" if f.name == "pass_" else f.name for f in fields(GridRow))


def _log_axes(ax, lengths: Sequence[int]) -> None:
    """Log-log axes with the grid's lengths as x ticks and plain numbers (not 10^k) as y ticks."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(lengths))
    ax.set_xticklabels([str(n) for n in lengths])
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.grid(True, which="both", alpha=0.3)


def plot_grid(result: GridResult, out_dir: Path) -> list[Path]:
    """time_vs_length.png, memory_vs_length.png (log-log, one line per subject, on ``shown_runtime``)
    and throughput_by_runtime.png (forward tokens/s per subject, one bar per runtime)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec, rows = result.spec, result.rows
    measured = [r for r in rows if r.status == "measured"]
    kinds = [k for k in ("mixer", "preset") if any(r.kind == k for r in rows)]
    runtime = shown_runtime(spec)
    paths = []
    line_plots = (("time_ms", "time per pass (ms)", "time_vs_length.png"), ("peak_mib", "peak memory (MiB)", "memory_vs_length.png"))
    for metric, ylabel, name in line_plots:
        figure, axes = plt.subplots(len(kinds), len(spec.passes), figsize=(6 * len(spec.passes), 4.2 * len(kinds)), squeeze=False)
        for row_index, kind in enumerate(kinds):
            for col_index, pass_ in enumerate(spec.passes):
                ax = axes[row_index][col_index]
                shown = [r for r in measured if r.runtime == runtime and r.pass_ == pass_ and getattr(r, metric) is not None
                         and (r.kind == kind or (kind == "mixer" and r.kind == "peer"))]
                for label in dict.fromkeys(r.subject for r in shown):
                    line = sorted((r for r in shown if r.subject == label), key=lambda r: r.length)
                    style = "--" if line[0].kind == "peer" else "-"
                    ax.plot([r.length for r in line], [getattr(r, metric) for r in line], style, marker="o", label=label)
                _log_axes(ax, spec.lengths)
                ax.set_title(f"{kind}s, {pass_}, {runtime}")
                ax.set_xlabel("sequence length L")
                ax.set_ylabel(ylabel)
                if shown:
                    ax.legend(fontsize=7)
                else:
                    ax.text(0.5, 0.5, "nothing measured", transform=ax.transAxes, ha="center")
        figure.tight_layout()
        paths.append(out_dir / name)
        figure.savefig(paths[-1], dpi=120)
        plt.close(figure)

    length = _throughput_length(result)
    forward = [r for r in measured if r.pass_ == "forward" and r.length == length]
    labels = list(dict.fromkeys(r.subject for r in forward))
    runtimes = [rt for rt in spec.runtimes if any(r.runtime == rt for r in forward)]
    figure, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.5))
    width = 0.8 / max(1, len(runtimes))
    for offset, runtime in enumerate(runtimes):
        values = {r.subject: r.tokens_per_s for r in forward if r.runtime == runtime}
        xs = [i + offset * width for i, label in enumerate(labels) if label in values]
        ax.bar(xs, [values[label] for label in labels if label in values], width, label=runtime)
    ax.set_xticks([i + width * (len(runtimes) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (forward)")
    ax.set_title(f"Throughput by runtime at L={length}, B={spec.batch}")
    if runtimes:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.text(0.5, 0.5, "nothing measured", transform=ax.transAxes, ha="center")
    figure.tight_layout()
    paths.append(out_dir / "throughput_by_runtime.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)
    return paths


def _throughput_length(result: GridResult) -> int:
    """``plot_length``, else the longest L whose forward was measured on every runtime that measured any."""
    if result.spec.plot_length is not None:
        return result.spec.plot_length
    forward = [r for r in result.rows if r.status == "measured" and r.pass_ == "forward"]
    runtimes = {r.runtime for r in forward}
    complete = [n for n in result.spec.lengths if runtimes and runtimes <= {r.runtime for r in forward if r.length == n}]
    return max(complete or result.spec.lengths)


def write_grid_results(result: GridResult, out_dir: str | Path) -> list[Path]:
    """results.json (everything), results.csv (one line per cell), report.md and, with ``plots``, the PNGs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path, report_path = out / "results.json", out / "results.csv", out / "report.md"
    json_path.write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in result.rows:
            writer.writerow(row.to_dict())
    report_path.write_text(format_grid_report(result), encoding="utf-8")
    paths = [json_path, csv_path, report_path]
    if result.spec.plots:
        paths += plot_grid(result, out)
    return paths


def format_claims(result: ClaimsResult) -> str:
    """The claims as Markdown: the papers' figures beside ours with PASS/MISS, then the measurements."""
    spec = result.spec
    runtime = "CPU, eager" if spec.claim_runtime == "eager" else f"GPU {result.environment.get('cuda_device')}, eager"
    lines = [
        "## Paper speed claims, measured side by side",
        "",
        _machine_line(result.environment, spec) + f"; {runtime}; the two sides' timed runs interleaved.",
        "",
    ]
    busy = benchmark.busy_line([m.load for m in result.measurements if m.time_ms is not None])
    if busy:
        lines += [f"**{busy}.**", ""]
    body = []
    for outcome in result.outcomes:
        claim = outcome.claim
        unit = "×"
        body.append([
            claim.title,
            claim.source,
            f"`{claim.subject}` vs `{claim.baseline}`, {claim.pass_}, L={claim.length}",
            _number(claim.paper, unit),
            _number(outcome.ours, unit),
            outcome.verdict + (f" ({outcome.reason})" if outcome.reason else ""),
        ])
    lines += markdown_table(["claim", "paper setting", "compared here", "paper", "ours", "verdict"], body)
    lines += [
        "",
        "speed = baseline median time / subject median time (PASS when at least the paper's figure); memory = "
        "subject peak / baseline peak (PASS when at most the paper's); — : context row, no paper figure.",
        "",
        "### Measurements",
        "",
    ]
    body = [
        [f"`{m.subject}`", m.pass_, str(m.length), _time_range(m), _number(m.peak_mib),
         f"{m.parameters:,}" if m.parameters else "—", m.impl or "", m.reason or m.note or ""]
        for m in result.measurements
    ]
    lines += markdown_table(
        ["subject", "pass", "L", "time ms (fastest–slowest)", "peak MiB", "parameters", "compute paths", "note"], body
    )
    subjects = {m.subject for m in result.measurements}
    lines += ["", "### Subjects", ""]
    for label, subject in spec.claim_subjects.items():
        if label in subjects:
            what = (f"preset `{subject.name}`" + (f" with {', '.join(subject.overrides)}" if subject.overrides else "")
                    if subject.kind == "preset" else
                    f"mixer `{subject.label if subject.impl is None else subject.name}` impl {subject.impl or 'default'}, "
                    f"D={spec.width}" + (f", options {dict(subject.options)}" if subject.options else ""))
            lines.append(f"- `{label}`: {what}")
    return "\n".join(lines).rstrip() + "\n"


def write_claims(result: ClaimsResult, out_dir: str | Path) -> list[Path]:
    """claims.md (the table) and claims.json (everything) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out / "claims.md", out / "claims.json"
    md_path.write_text(format_claims(result), encoding="utf-8")
    json_path.write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [md_path, json_path]


# --- configs and the command line ---------------------------------------------------------


def compose_bench_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The composed config for Hydra command-line ``overrides``, e.g. ["bench=smoke", "bench.peers=true"].

    The root config (registered here, not a file, so ``conf/`` keeps one root per command) holds
    the ``bench`` group of ``conf/bench/`` with ``default`` selected.
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=ROOT_CONFIG, node={"defaults": [{"bench": "default"}, "_self_"]})
    return compose_config(overrides, config_name=ROOT_CONFIG)


def compose_bench_spec(overrides: Sequence[str] = ()) -> BenchSpec:
    """The checked spec for Hydra command-line ``overrides`` (``compose_bench_config``, then ``BenchSpec.from_config``)."""
    return BenchSpec.from_config(compose_bench_config(overrides).bench)


@dataclass
class BenchRun:
    """What one ``run_bench`` did: the printable report, the files written, whether anything failed."""

    report: str
    paths: list[Path]
    failed: bool


def run_bench(spec: BenchSpec) -> BenchRun:
    """Run the grid or the claims of ``spec`` and write their files to ``spec.out_dir``."""
    if spec.mode == "claims":
        claims = run_claims(spec)
        return BenchRun(format_claims(claims), write_claims(claims, spec.out_dir), claims.failed)
    grid = run_grid(spec)
    return BenchRun(format_grid_report(grid), write_grid_results(grid, spec.out_dir), grid.failed)
