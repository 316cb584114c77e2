"""seqmix: pluggable sequence mixers behind one streaming contract.

Importing the package registers every built-in mixer, so ``build_mixer(name, d_model)`` works
for each name in ``list_mixers()``.
"""
from .contract import Mixer, State
from .errors import SeqmixError
from .registry import build_mixer, list_mixers, mixer_class, register_mixer
from . import cema, ema, gated_attention, identity, softmax_attention, tcn  # noqa: F401  (register the mixers)

__all__ = ["Mixer", "SeqmixError", "State", "build_mixer", "list_mixers", "mixer_class", "register_mixer"]
