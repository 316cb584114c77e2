"""seqmix: pluggable sequence mixers behind one streaming contract.

Importing the package registers every built-in mixer, so ``build_mixer(name, d_model)`` works
for each name in ``list_mixers()``.
"""
from .contract import Mixer, State
from .errors import SeqmixError
from .registry import build_mixer, list_mixers, mixer_class, register_mixer
from . import cema, ema, gated_attention, identity, softmax_attention, tcn  # noqa: F401  (register the mixers)
from .blocks import Block, FeedForward
from .checkpoint import instantiate_model, load_model, save_model
from .model import SequenceModel, build_model

__all__ = [
    "Block",
    "FeedForward",
    "Mixer",
    "SeqmixError",
    "SequenceModel",
    "State",
    "build_mixer",
    "build_model",
    "instantiate_model",
    "list_mixers",
    "load_model",
    "mixer_class",
    "register_mixer",
    "save_model",
]
