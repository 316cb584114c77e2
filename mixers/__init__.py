"""seqmix: pluggable sequence mixers behind one streaming contract.

Importing the package registers every built-in mixer, so ``build_mixer(name, d_model)`` works
for each name in ``list_mixers()``. The classes and functions below are also the names configs
build from (``_target_: seqmix.EMA``; see ``seqmix.targets``).
"""
from .contract import Mixer, State
from .errors import SeqmixError
from .registry import build_mixer, list_mixers, mixer_class, register_mixer
from .cema import CEMA
from .ema import EMA
from .gated_attention import GatedAttention
from .identity import Identity
from .softmax_attention import SoftmaxAttention
from .tcn import TCN
from .blocks import Block, FeedForward
from .heads import CausalLMHead, ClassificationHead, MaskedLMHead
from .norms import LayerNorm, RMSNorm, ScaleNorm, TimestepNorm
from .checkpoint import instantiate_model, load_model, save_model
from .model import SequenceModel, build_model

__version__ = "0.2.0"

__all__ = [
    "Block",
    "CEMA",
    "CausalLMHead",
    "ClassificationHead",
    "EMA",
    "FeedForward",
    "GatedAttention",
    "Identity",
    "LayerNorm",
    "MaskedLMHead",
    "Mixer",
    "RMSNorm",
    "ScaleNorm",
    "SeqmixError",
    "SequenceModel",
    "SoftmaxAttention",
    "State",
    "TCN",
    "TimestepNorm",
    "build_mixer",
    "build_model",
    "instantiate_model",
    "list_mixers",
    "load_model",
    "mixer_class",
    "register_mixer",
    "save_model",
]
