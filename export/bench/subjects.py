"""What the benchmark times: subjects (registered mixers, model presets, peer modules), built
fresh per cell with their inputs, and the attention memory a cell would need.

- mixers run on x (B, L, D) float32, D = ``bench.width``; an entry names ``name`` (the mixer's
  default compute path) or ``name/impl``; ``*`` stands for every registered mixer and ``name/*``
  (or ``*/*``) for every compute path of ``name`` (of every mixer), so a plugin's mixer is
  included with no edit.
- presets (``conf/model/<name>.yaml``) run on token ids (B, L) at their own width.
- peers (``peers.PEERS``) run on x (B, L, D) at the sizes of the mixer they mirror.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from seqmix import SeqmixError
from seqmix.configs import compose_config, config_groups
from seqmix.contract import Mixer
from seqmix.errors import choice_error, require_choice
from seqmix.model.checkpoint import instantiate_model
from seqmix.registry import build_mixer, list_mixers, mixer_class

from .peers import PEERS

# (L, L)-sized float32 matrices alive at the peak of the math attention path, measured with the
# CPU profiler at L = 1024 and 2048: scores and softmax weights (plus the causal bool mask) in the
# forward, about one more for the saved activations and their gradients in the backward.
SCORE_COPIES = {"forward": 2.5, "fwd+bwd": 3.5}
EVERY = "*"


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


def expand_mixers(entry) -> list[str]:
    """The ``name`` or ``name/impl`` entries one ``bench.mixers`` entry stands for: ``*`` every
    registered mixer, ``name/*`` every compute path of ``name``, ``*/*`` both; others themselves."""
    if not isinstance(entry, str):
        return [entry]
    name, slash, impl = entry.partition("/")
    names = list_mixers() if name == EVERY else [name]
    if impl != EVERY:
        return [f"{n}{slash}{impl}" for n in names]
    return [f"{n}/{path}" for n in names for path in mixer_class(n).impls]


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
    require_choice(where, name, presets)
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


def lowering_config(subject: Subject, task: str) -> DictConfig:
    """The composed config (model and task) of a preset subject built for the lowering mode's ``task``."""
    return compose_config([f"model={subject.name}", f"task={task}", *subject.overrides])


def check_subject(subject: Subject, width: int, task: str | None = None) -> None:
    """Raise the SeqmixError building ``subject`` at width D = ``width`` raises (a bad option or
    override), before any measurement; a preset is built on the meta device, allocating nothing,
    composed with ``task`` when given (the lowering mode builds its presets for a task, whose
    ``task.*`` overrides they may carry)."""
    if subject.kind == "mixer":
        # On the meta device, as the presets: a huge bench.width (1e8) filled the machine's memory here.
        with torch.device("meta"):
            build_subject(subject, width)
    elif subject.kind == "peer":
        with torch.device("meta"):
            build_mixer(PEERS[subject.name].against, width, **subject.options)
    elif task is None:
        instantiate_model(preset_config(subject.name, subject.overrides), device="meta")
    else:
        instantiate_model(lowering_config(subject, task).model, device="meta")


def least_memory_bytes(subject: Subject, width: int, batch: int, length: int, pass_: str) -> int:
    """A lower bound of the memory one call of ``subject`` at (batch, length) takes, from its sizes
    alone (built on the meta device): its parameters (twice in fwd+bwd, with their gradients), its
    input and output (float32 (B, L, D); token ids and (B, L, V) logits for a preset), and the
    input's gradient in fwd+bwd. Every path needs at least this much."""
    with torch.device("meta"):
        module = (instantiate_model(preset_config(subject.name, subject.overrides)) if subject.kind == "preset"
                  else build_mixer(PEERS[subject.name].against if subject.kind == "peer" else subject.name, width,
                                   **subject.options))
    parameters = sum(p.numel() * p.element_size() for p in module.parameters())
    tokens = batch * length
    if subject.kind == "preset":
        inputs, outputs = tokens * 8, tokens * module.vocab_size * 4
    else:
        inputs = outputs = tokens * width * 4
    training = pass_ == "fwd+bwd"
    return parameters * (2 if training else 1) + inputs * (2 if training and subject.kind != "preset" else 1) + outputs


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

    Per mixer from its ``attention_scores`` (float32, ``SCORE_COPIES`` alive per pass);
    with ``fused_kernels`` False (exported graphs) no score matrix is skipped by a fused kernel. A
    forward frees each layer's scores before the next; a backward keeps every layer's until it runs.
    """
    per_layer = [
        int(scores * 4 * SCORE_COPIES[pass_])
        for child in module.modules()
        if isinstance(child, Mixer) and (scores := child.attention_scores(batch, length, fused=fused_kernels))
    ]
    if not per_layer:
        return 0
    return sum(per_layer) if pass_ == "fwd+bwd" else max(per_layer)
