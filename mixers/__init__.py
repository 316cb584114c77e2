"""seqmix: pluggable sequence mixers behind one streaming contract.

Importing the package registers every built-in mixer, so ``build_mixer(name, d_model)`` works
for each name in ``list_mixers()``. Configs and saved models name these parts by their registered
names (``{mixer: ema}``, ``{norm: rmsnorm}``); see ``seqmix.model.description``.
"""
from seqmix.contract import Mixer, State
from seqmix.errors import SeqmixError, SeqmixWarning, TrainingStopped
from seqmix.layers.blocks import Block, FeedForward
from seqmix.layers.heads import CausalLMHead, ClassificationHead, MaskedLMHead
from seqmix.layers.norms import LayerNorm, RMSNorm, ScaleNorm, TimestepNorm
from seqmix.model.checkpoint import instantiate_model, load_model, save_model
from seqmix.model.pretrained import from_pretrained, push_to_hub, save_pretrained
from seqmix.model.sequence_model import SequenceModel, build_model
from seqmix.operators.cema import CEMA
from seqmix.operators.ema import EMA
from seqmix.operators.gated_attention import GatedAttention
from seqmix.operators.identity import Identity
from seqmix.operators.softmax_attention import SoftmaxAttention
from seqmix.operators.tcn import TCN
from seqmix.registry import build_mixer, list_mixers, mixer_class, register_mixer

__version__ = "0.3.0"

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
    "SeqmixWarning",
    "SequenceModel",
    "SoftmaxAttention",
    "State",
    "TCN",
    "TimestepNorm",
    "TrainingStopped",
    "build_mixer",
    "build_model",
    "from_pretrained",
    "instantiate_model",
    "list_mixers",
    "load_model",
    "mixer_class",
    "push_to_hub",
    "register_mixer",
    "save_model",
    "save_pretrained",
]
