"""Configs saved before models were described by registry names: a frozen translation into descriptions.

seqmix 0.1.0 and 0.2.0 saved every part of a model or task as a Hydra ``_target_`` (0.1.0 named
the modules of its checkout, ``mixers.ema.EMA``; 0.2.0 public names, ``seqmix.EMA``). Such a
config still loads: ``translate`` replaces each ``{_target_: <path>, _partial_: true, <options>}``
by the registered part it named (``{mixer: ema, <options>}``). The table below is frozen: it lists
exactly the paths those versions wrote, and is never derived from today's modules, so a path
outside it (``os.system``, or anything a seqmix module happens to import) is refused by name
instead of being imported. Nothing in a translated config is ever called.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from seqmix.errors import SeqmixError

_PUBLIC_PARTS = {
    "seqmix.build_model": ("model", None),
    "seqmix.Block": ("block", None),
    "seqmix.FeedForward": ("ffn", None),
    "seqmix.EMA": ("mixer", "ema"),
    "seqmix.CEMA": ("mixer", "cema"),
    "seqmix.TCN": ("mixer", "tcn"),
    "seqmix.GatedAttention": ("mixer", "gated_attention"),
    "seqmix.SoftmaxAttention": ("mixer", "softmax_attention"),
    "seqmix.Identity": ("mixer", "identity"),
    "seqmix.LayerNorm": ("norm", "layernorm"),
    "seqmix.RMSNorm": ("norm", "rmsnorm"),
    "seqmix.ScaleNorm": ("norm", "scalenorm"),
    "seqmix.TimestepNorm": ("norm", "timestepnorm"),
    "seqmix.CausalLMHead": ("head", "causal_lm"),
    "seqmix.MaskedLMHead": ("head", "masked_lm"),
    "seqmix.ClassificationHead": ("head", "classification"),
    "seqmix.tasks.ByteLM": ("task", "byte_lm"),
    "seqmix.tasks.MQAR": ("task", "mqar"),
    "seqmix.tasks.ListOps": ("task", "listops"),
    "seqmix.tasks.SelectiveCopying": ("task", "selective_copying"),
    "seqmix.tasks.MaskedSegment": ("task", "masked_segment"),
}

_MODULE_PATHS_0_1 = {
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

LEGACY_TARGETS: dict[str, tuple[str, str | None]] = {
    **_PUBLIC_PARTS,
    **{path: _PUBLIC_PARTS[public] for path, public in _MODULE_PATHS_0_1.items()},
}
"""Every ``_target_`` seqmix 0.1.0 or 0.2.0 wrote -> (kind of part, registered name or None for single-class parts)."""


def translate(config: Any, where: str = "config") -> Any:
    """A copy of ``config`` (nested maps and lists) with every ``_target_`` part replaced by its registered name.

    A map without ``_target_`` keys is returned unchanged (a current description); a ``_target_``
    outside ``LEGACY_TARGETS`` raises SeqmixError naming it.
    """
    if isinstance(config, Mapping):
        if "_target_" not in config:
            return {key: translate(value, f"{where}.{key}") for key, value in config.items()}
        target = config["_target_"]
        if not isinstance(target, str) or target not in LEGACY_TARGETS:
            raise SeqmixError(
                f"{where}._target_={target!r} is not a part seqmix builds; saved configs name registered parts "
                f"(e.g. {{mixer: ema}}), and the only code paths still read are those older seqmix versions wrote"
            )
        kind, name = LEGACY_TARGETS[target]
        options = {key: translate(value, f"{where}.{key}") for key, value in config.items() if key not in ("_target_", "_partial_")}
        return {kind: name, **options} if name is not None else options
    if isinstance(config, list):
        return [translate(value, f"{where}[{index}]") for index, value in enumerate(config)]
    return config
