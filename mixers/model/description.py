"""A model described in seqmix's own terms: registry names and options, never code paths.

This is what ``conf/model`` presets compose to, what a checkpoint's ``config.yaml`` and a run's
``run.json`` store, and the only thing a model is ever rebuilt from. Like a Hugging Face
``config.json`` naming a ``model_type``, it says *which registered part* goes where and with which
options, so loading a file someone else wrote can build nothing but seqmix's registered parts::

    vocab_size: 256
    d_model: 128
    layers: [mega]            # names of entries in ``mixers`` or registered mixer names; repeated to ``depth``
    depth: 4
    mixers:
      mega: {mixer: gated_attention, local: ema, chunk_size: 128}
    block: {residual: gated}                     # seqmix.Block options
    ffn: {hidden: 512, activation: silu}         # seqmix.FeedForward options, or null
    norm: {norm: layernorm}                      # a registered norm and its options
    final_norm: {norm: layernorm}                # or null
    head: {head: causal_lm}                      # a registered head and its options
    positions: none
    max_len: 2048
    tie_embeddings: true

``model_description`` checks a description (every name registered, every option accepted by its
part, every value plain data) and returns its canonical form, with every option the code defaults
filled in, so two descriptions of the same model compare equal however much they spelled out.
Older forms (``_target_`` paths of seqmix 0.1.0 and 0.2.0) are translated first; see
``seqmix.model.legacy``.
"""
from __future__ import annotations

import inspect
import math
from contextlib import nullcontext
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from seqmix.errors import SeqmixError, choice_error, kind_of
from seqmix.layers.blocks import Block, FeedForward
from seqmix.layers.heads import CausalLMHead, ClassificationHead, MaskedLMHead
from seqmix.layers.norms import LayerNorm, RMSNorm, ScaleNorm, TimestepNorm
from seqmix.registry import NOT_INSTALLED_HINT, list_mixers, mixer_class

NORM_PARTS: dict[str, type[nn.Module]] = {
    "layernorm": LayerNorm, "rmsnorm": RMSNorm, "scalenorm": ScaleNorm, "timestepnorm": TimestepNorm,
}
"""Registered norm name -> class; each takes the width first."""

HEAD_PARTS: dict[str, type[nn.Module]] = {
    "causal_lm": CausalLMHead, "masked_lm": MaskedLMHead, "classification": ClassificationHead,
}
"""Registered head name -> class; each takes (D, V) first."""

INJECTED = {
    "mixer": ("self", "d_model"),
    "norm": ("self", "normalized_shape", "dim", "device", "dtype"),
    "head": ("self", "d_model", "vocab_size"),
    "block": ("self", "d_model", "mixer", "ffn", "norm"),
    "ffn": ("self", "d_model"),
}
"""Parameters the model fills in for each kind of part; a description never sets them."""

MODEL_OPTIONS = {
    "vocab_size": None, "d_model": None, "layers": None, "mixers": {}, "depth": None,
    "block": {"residual": "auto"}, "ffn": None, "norm": {"norm": "layernorm"}, "final_norm": None,
    "head": {"head": "causal_lm"}, "positions": "none", "max_len": 2048, "tie_embeddings": False, "recompute": None,
}
"""Every top-level key of a description, with its default (None for the sizes, which are required)."""

REQUIRED = ("vocab_size", "d_model", "layers")


def plain_data(value: Any, where: str) -> Any:
    """``value`` when it is plain data (str, int, float, bool, None, lists and string-keyed maps of them)."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SeqmixError(f"{where}={value!r} is not a finite number")
        return value
    if isinstance(value, (list, tuple)):
        return [plain_data(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise SeqmixError(f"{where} has the key {key!r}; keys must be strings")
            if key in ("_target_", "_partial_", "_args_"):
                raise SeqmixError(
                    f"{where}.{key} is not part of a model description: parts are named by registry names "
                    f"(e.g. {{mixer: ema}}), never by code paths"
                )
        return {key: plain_data(item, f"{where}.{key}") for key, item in value.items()}
    raise SeqmixError(f"{where} is {kind_of(value)}; a description holds only plain data (numbers, strings, lists, maps)")


_PLAIN_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None), "dict": dict, "list": list}


def check_annotation(value: Any, annotation: Any, where: str) -> Any:
    """``value`` when it has a type its parameter's annotation allows; SeqmixError naming both otherwise.

    Only plain annotations are checked (``int``, ``float | None``, ``bool``, ...): a bool is never
    an int here, an int is a float, and a string such as ``"false"`` is not a bool. Annotations
    naming other types (a Mixer, a callable, a path) accept any plain value; the part checks it.
    """
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    names = [name.strip() for name in text.split("|")]
    if annotation is inspect.Parameter.empty or not all(name in _PLAIN_TYPES for name in names):
        return value
    for name in names:
        expected = _PLAIN_TYPES[name]
        if expected is bool and isinstance(value, bool):
            return value
        if expected in (int, float) and isinstance(value, bool):
            continue
        if isinstance(value, expected) or (expected is float and isinstance(value, int)):
            return value
    raise SeqmixError(f"{where}={value!r} is {kind_of(value)}; expected {text}")


def _options(cls: Callable, kind: str, options: Mapping, where: str) -> dict:
    """``options`` checked against ``cls``'s keyword arguments, with every default it leaves out filled in."""
    parameters = {
        name: parameter for name, parameter in inspect.signature(cls).parameters.items()
        if name not in INJECTED[kind] and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    }
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        raise SeqmixError(f"{where} has no option {unknown[0]!r}; {getattr(cls, '__name__', cls)} accepts {sorted(parameters)}")
    filled = {}
    for name, parameter in parameters.items():
        if name in options:
            filled[name] = check_annotation(plain_data(options[name], f"{where}.{name}"), parameter.annotation, f"{where}.{name}")
        elif parameter.default is parameter.empty:
            raise SeqmixError(f"{where} needs the option {name!r}")
        elif parameter.default is None or isinstance(parameter.default, (str, bool, int, float)):
            filled[name] = parameter.default
    return filled


def _named_part(entry: Any, kind: str, registry: Mapping[str, Callable], where: str) -> dict:
    """A ``{<kind>: <registered name>, <option>: ...}`` entry (a bare name is short for ``{<kind>: name}``), canonical."""
    if isinstance(entry, str):
        entry = {kind: entry}
    if not isinstance(entry, Mapping):
        raise SeqmixError(f"{where} is {kind_of(entry)}; expected {{{kind}: <name>, <option>: <value>, ...}}")
    options = dict(entry)
    name = options.pop(kind, None)
    if not isinstance(name, str) or name not in registry:
        error = choice_error(f"{where}.{kind}", name, registry)
        if kind == "mixer" and isinstance(name, str) and name.isidentifier():
            error = SeqmixError(f"{error}; {NOT_INSTALLED_HINT}")
        raise error
    return {kind: name, **_options(registry[name], kind, options, f"{where} ({name})")}


def mixer_entry(entry: Any, where: str = "mixer") -> dict:
    """A mixer entry ``{mixer: <registered name>, <option>: <value>, ...}`` checked and canonical."""
    return _named_part(entry, "mixer", {name: mixer_class(name) for name in list_mixers()}, where)


def _unordered_part(entry: Any, kind: str, cls: Callable, where: str) -> dict:
    if not isinstance(entry, Mapping):
        raise SeqmixError(f"{where} is {kind_of(entry)}; expected a map of {cls.__name__} options")
    return _options(cls, kind, entry, where)


def model_description(config: Any) -> dict:
    """The canonical description of a model config (a description or an older ``_target_`` form).

    Raises SeqmixError naming the first key, name or value that is not a valid description.
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf

    from seqmix.model.legacy import translate

    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=True)
    if not isinstance(config, Mapping):
        raise SeqmixError(f"model config is {kind_of(config)}; expected a map (a conf/model preset)")
    config = translate(dict(config), "model")
    unknown = sorted(set(config) - set(MODEL_OPTIONS))
    if unknown:
        raise SeqmixError(f"model has no option {unknown[0]!r}; a model description has {sorted(MODEL_OPTIONS)}")
    missing = [key for key in REQUIRED if config.get(key) is None]
    if missing:
        raise SeqmixError(f"model needs {missing[0]!r}; a model description requires {list(REQUIRED)}")
    from seqmix.model.sequence_model import build_model

    annotations = {name: parameter.annotation for name, parameter in inspect.signature(build_model).parameters.items()}
    described = {
        key: check_annotation(plain_data(config.get(key, default), f"model.{key}"), annotations[key], f"model.{key}")
        for key, default in MODEL_OPTIONS.items()
    }
    if not isinstance(described["layers"], list) or not all(isinstance(name, str) for name in described["layers"]):
        raise SeqmixError(f"model.layers={described['layers']!r} must be a list of mixer names")
    if not isinstance(described["mixers"], Mapping):
        raise SeqmixError(f"model.mixers is {kind_of(described['mixers'])}; expected a map of name -> mixer entry")
    described["mixers"] = {name: mixer_entry(entry, f"model.mixers.{name}") for name, entry in described["mixers"].items()}
    described["block"] = _unordered_part(described["block"], "block", Block, "model.block")
    if described["ffn"] is not None:
        described["ffn"] = _unordered_part(described["ffn"], "ffn", FeedForward, "model.ffn")
    described["norm"] = _named_part(described["norm"], "norm", NORM_PARTS, "model.norm")
    if described["final_norm"] is not None:
        described["final_norm"] = _named_part(described["final_norm"], "norm", NORM_PARTS, "model.final_norm")
    described["head"] = _named_part(described["head"], "head", HEAD_PARTS, "model.head")
    return described


def part_factory(kind: str, entry: Any, where: str | None = None) -> Callable:
    """A factory for one part of a model from its config entry, checked now.

    ``kind`` is ``mixer``, ``norm``, ``head`` (entries ``{<kind>: <registered name>, <option>: ...}``),
    ``block`` or ``ffn`` (entries of options). The factory takes what the model injects: D for a
    mixer, norm or FFN; (D, V) for a head; (d_model, mixer, ffn, norm) for a block.
    """
    where = where or kind
    if kind == "mixer":
        entry = mixer_entry(entry, where)
        return partial(mixer_class(entry["mixer"]), **{key: value for key, value in entry.items() if key != "mixer"})
    if kind in ("norm", "head"):
        registry = NORM_PARTS if kind == "norm" else HEAD_PARTS
        entry = _named_part(entry, kind, registry, where)
        return partial(registry[entry[kind]], **{key: value for key, value in entry.items() if key != kind})
    if kind in ("block", "ffn"):
        cls = Block if kind == "block" else FeedForward
        return partial(cls, **_unordered_part(entry, kind, cls, where))
    raise choice_error("part kind", kind, ("mixer", "norm", "head", "block", "ffn"))


def part_defaults(kind: str, name: str | None = None) -> dict:
    """Every option of a part with the code's default: ``part_defaults("norm", "rmsnorm")``, ``part_defaults("ffn")``."""
    if kind == "mixer":
        return mixer_entry({"mixer": name})
    if kind in ("norm", "head"):
        return _named_part({kind: name}, kind, NORM_PARTS if kind == "norm" else HEAD_PARTS, kind)
    if kind in ("block", "ffn"):
        return _unordered_part({}, kind, Block if kind == "block" else FeedForward, kind)
    raise choice_error("part kind", kind, ("mixer", "norm", "head", "block", "ffn"))


RANDOM_FILLS = ("normal_", "uniform_", "random_", "bernoulli_", "exponential_", "geometric_", "log_normal_", "cauchy_")
"""The in-place random fills of a tensor, which initialisation calls for every parameter (and every
function of ``torch.nn.init`` fills its tensor in place and returns it)."""


class _RandomFillsSkipped(TorchFunctionMode):
    """Random fills and ``torch.nn.init`` initialisers of meta tensors give the tensor back untouched: a meta tensor holds no values,
    yet torch runs each fill's Python decomposition (about 0.3 ms a call, 40 times a CPU fill), and
    initialising a model of thousands of layers on meta, as ``describe``, saves and loads do, took
    minutes of that alone."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # An initialiser of torch.nn.init runs its fills with this mode off: skipped as a whole.
        if getattr(func, "__name__", None) in RANDOM_FILLS or getattr(func, "__module__", None) == "torch.nn.init":
            # Tensor methods pass the tensor first; torch.nn.init's functions pass it by name.
            filled = args[0] if args else kwargs.get("tensor")
            if isinstance(filled, torch.Tensor) and filled.is_meta:
                return filled
        return func(*args, **kwargs)


def build_described_model(description: Mapping, device=None) -> nn.Module:
    """Build the ``SequenceModel`` a canonical description (from ``model_description``) describes.

    Only registered parts are built; ``device`` (e.g. ``"meta"``) is where parameters are made.
    """
    from seqmix.model.sequence_model import build_model

    mixers = {name: part_factory("mixer", entry, f"model.mixers.{name}") for name, entry in description["mixers"].items()}
    ffn, final_norm = description["ffn"], description["final_norm"]
    on_meta = device is not None and torch.device(device).type == "meta"
    with torch.device(device) if device is not None else nullcontext(), _RandomFillsSkipped() if on_meta else nullcontext():
        return build_model(
            vocab_size=description["vocab_size"],
            d_model=description["d_model"],
            layers=description["layers"],
            mixers=mixers,
            depth=description["depth"],
            block=part_factory("block", description["block"], "model.block"),
            ffn=None if ffn is None else part_factory("ffn", ffn, "model.ffn"),
            norm=part_factory("norm", description["norm"], "model.norm"),
            head=part_factory("head", description["head"], "model.head"),
            final_norm=None if final_norm is None else part_factory("norm", final_norm, "model.final_norm"),
            positions=description["positions"],
            max_len=description["max_len"],
            tie_embeddings=description["tie_embeddings"],
            recompute=description["recompute"],
        )
