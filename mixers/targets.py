"""The objects a config may build, under their public names: the only ``_target_``s seqmix instantiates.

A config names what it builds by its public seqmix name (``seqmix.EMA``, ``seqmix.build_model``,
``seqmix.tasks.MQAR``), never by the module that defines it, so moving a file inside the package
breaks no saved run. Loading accepts exactly these names: an exact-name table, not a prefix test,
because anything a seqmix module imports would sit behind an allowed prefix.

Runs saved by seqmix 0.1.0 name the modules of its checkout layout (``mixers.ema.EMA``, ...);
``translate_legacy_targets`` maps each of those names to its public one before the check.
"""
from __future__ import annotations

from typing import Any

from seqmix.errors import SeqmixError

BUILT_IN_TARGETS = (
    "build_model", "Block", "FeedForward",
    "EMA", "CEMA", "TCN", "GatedAttention", "SoftmaxAttention", "Identity",
    "LayerNorm", "RMSNorm", "ScaleNorm", "TimestepNorm",
    "CausalLMHead", "MaskedLMHead", "ClassificationHead",
)
"""Top-level ``seqmix`` symbols a model config may build."""

TASK_TARGETS = ("ByteLM", "MQAR", "ListOps", "SelectiveCopying", "MaskedSegment")
"""``seqmix.tasks`` symbols a task config may build."""

LEGACY_TARGETS = {
    "mixers.model.build_model": "seqmix.build_model",
    "mixers.blocks.Block": "seqmix.Block",
    "mixers.blocks.FeedForward": "seqmix.FeedForward",
    "mixers.ema.EMA": "seqmix.EMA",
    "mixers.cema.CEMA": "seqmix.CEMA",
    "mixers.tcn.TCN": "seqmix.TCN",
    "mixers.gated_attention.GatedAttention": "seqmix.GatedAttention",
    "mixers.softmax_attention.SoftmaxAttention": "seqmix.SoftmaxAttention",
    "mixers.identity.Identity": "seqmix.Identity",
    "mixers.norms.LayerNorm": "seqmix.LayerNorm",
    "mixers.norms.RMSNorm": "seqmix.RMSNorm",
    "mixers.norms.ScaleNorm": "seqmix.ScaleNorm",
    "mixers.norms.TimestepNorm": "seqmix.TimestepNorm",
    "mixers.heads.CausalLMHead": "seqmix.CausalLMHead",
    "mixers.heads.MaskedLMHead": "seqmix.MaskedLMHead",
    "mixers.heads.ClassificationHead": "seqmix.ClassificationHead",
    "mixers.tasks.byte_lm.ByteLM": "seqmix.tasks.ByteLM",
    "mixers.tasks.mqar.MQAR": "seqmix.tasks.MQAR",
    "mixers.tasks.listops.ListOps": "seqmix.tasks.ListOps",
    "mixers.tasks.selective_copying.SelectiveCopying": "seqmix.tasks.SelectiveCopying",
    "mixers.tasks.masked_segment.MaskedSegment": "seqmix.tasks.MaskedSegment",
}
"""seqmix 0.1.0's module paths -> the public names that replaced them (frozen: never derived from today's modules)."""

ALLOWED_TARGETS = frozenset(
    [f"seqmix.{name}" for name in BUILT_IN_TARGETS] + [f"seqmix.tasks.{name}" for name in TASK_TARGETS]
)


def target_of(obj: Any) -> str | None:
    """The ``_target_`` that builds ``obj`` (a class or function of the table above), or None."""
    import seqmix
    import seqmix.tasks

    for prefix, module, names in (("seqmix", seqmix, BUILT_IN_TARGETS), ("seqmix.tasks", seqmix.tasks, TASK_TARGETS)):
        for name in names:
            if getattr(module, name) is obj:
                return f"{prefix}.{name}"
    return None


def public_target(obj: Any) -> str:
    """The ``_target_`` that builds ``obj``; an object outside the table is refused by name."""
    target = target_of(obj)
    if target is None:
        raise SeqmixError(f"{getattr(obj, '__qualname__', obj)!r} is not buildable from a config; buildable: {sorted(ALLOWED_TARGETS)}")
    return target


def translate_legacy_targets(config: Any) -> Any:
    """A copy of ``config`` (nested dicts and lists) with seqmix 0.1.0's ``_target_`` paths replaced by public names."""
    if isinstance(config, dict):
        return {
            key: (LEGACY_TARGETS.get(value, value) if key == "_target_" and isinstance(value, str) else translate_legacy_targets(value))
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [translate_legacy_targets(value) for value in config]
    return config


def check_targets(config: Any, where: str = "model") -> None:
    """Raise unless every ``_target_`` in the (nested) config is one of ``ALLOWED_TARGETS`` exactly."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, (DictConfig, dict)):
        items = config.items()
    elif isinstance(config, (list, tuple)) or OmegaConf.is_list(config):
        items = ((str(i), v) for i, v in enumerate(config))
    else:
        return
    for key, value in items:
        if key == "_target_":
            if value not in ALLOWED_TARGETS:
                raise SeqmixError(
                    f"{where}._target_={value!r} is not something seqmix builds from a config; "
                    f"allowed targets are {sorted(ALLOWED_TARGETS)}"
                )
        else:
            check_targets(value, f"{where}.{key}")
