"""The search space: what one trial chooses, and how a chosen architecture becomes a model config.

``SearchSpace`` reads ``search.space``: each entry a ``Dimension`` (choices, a range, or one fixed
value). The mixers' knobs come from their contract (``Mixer.search_knobs`` and
``Mixer.apply_search_knobs``), never from a table here. A trial's choices become a ``Candidate``.
``space_differences`` compares two spaces as a study stores them (``SearchSpace.description``).
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from seqmix.configs import CONF_DIR, compose_config
from seqmix.contract import Mixer
from seqmix.errors import SeqmixError, is_choice, require_choice, require_int
from seqmix.model.description import part_defaults
from seqmix.registry import list_mixers, mixer_class

RANGE_KEYS = ("low", "high", "step", "log")
# The model's searchable sizes and the integer floor of each; the mixers add their own knobs
# (``Mixer.search_knobs``), and lr is a positive float.
MODEL_KNOBS = {"pattern_length": 1, "repeats": 1, "d_model": 1}


@dataclass(frozen=True)
class Dimension:
    """One searched value: categorical ``choices``, or an int/float range ``low``..``high``."""

    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    def suggest(self, trial: optuna.Trial, name: str):
        if self.choices is not None:
            return trial.suggest_categorical(name, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def values(self) -> tuple:
        """The bounds or choices, for validation."""
        return self.choices if self.choices is not None else (self.low, self.high)

    def description(self) -> dict:
        """The dimension as JSON: ``{"choices": [...]}`` or ``{"low", "high", "step", "log"}``."""
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "step": self.step, "log": self.log}


def _dimension(key: str, entry: Any) -> Dimension:
    """A Dimension from a space entry: a list of choices, {low, high, step?, log?}, or one fixed value."""
    where = f"search.space.{key}"
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - set(RANGE_KEYS))
        if unknown or not {"low", "high"} <= set(entry):
            raise SeqmixError(f"{where}={entry!r} is not a range; a range has the keys {list(RANGE_KEYS)} (low and high required)")
        low, high = entry["low"], entry["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
            raise SeqmixError(f"{where}: low={low!r}, high={high!r} must be numbers with low <= high")
        return Dimension(low=low, high=high, step=entry.get("step"), log=bool(entry.get("log", False)))
    choices = tuple(entry) if isinstance(entry, list) else (entry,)
    if not choices:
        raise SeqmixError(f"{where} is empty; give at least one value")
    # By type and value, as Optuna tells choices apart (1 and 1.0 and True are three); a repeated one
    # was drawn twice as often, without a word.
    repeated = [choice for index, choice in enumerate(choices)
                if any(type(choice) is type(other) and choice == other for other in choices[:index])]
    if repeated:
        raise SeqmixError(f"{where}={list(choices)!r} lists {repeated[0]!r} more than once, which would draw it more often; "
                          "list each choice once")
    return Dimension(choices=choices)


@dataclass
class Candidate:
    """One architecture from the space.

    Attributes:
        model_config: a complete ``conf/model`` config (a model description).
        pattern: the mixer of each layer slot; the model repeats it ``repeats`` times.
        repeats, d_model: depth = len(pattern) · repeats; D.
        lr: the learning rate to train it with; None keeps train.lr.
    """

    model_config: dict
    pattern: list[str]
    repeats: int
    d_model: int
    lr: float | None

    @property
    def summary(self) -> str:
        """E.g. ``tcn,tcn,softmax_attention ×2 d=64``."""
        return f"{','.join(self.pattern)} ×{self.repeats} d={self.d_model}"


def mixer_class_of(entry: dict) -> type[Mixer] | None:
    """The mixer class a model config's mixer entry ``{"mixer": <registered name>, ...}`` builds (None for another entry)."""
    return mixer_class(entry["mixer"]) if isinstance(entry.get("mixer"), str) else None


def default_mixer_config(name: str) -> dict:
    """The composed ``conf/mixer/<name>.yaml`` of a registered mixer, or its code defaults when it has no file."""
    if (CONF_DIR / "mixer" / f"{name}.yaml").is_file():
        return OmegaConf.to_container(compose_config([f"+mixer@picked={name}"]).picked)
    return part_defaults("mixer", name)


def integer_knobs() -> dict[str, int]:
    """Every searchable integer knob and its floor: the model's sizes and every registered mixer's knobs."""
    knobs = dict(MODEL_KNOBS)
    for name in list_mixers():
        knobs.update(mixer_class(name).search_knobs({}))
    return knobs


def space_keys() -> tuple[str, ...]:
    """The entries ``search.space`` may have."""
    return ("mixers", *integer_knobs(), "lr")


@dataclass
class SearchSpace:
    """What a trial chooses (``search.space``); every entry is optional.

    Keys: ``mixers`` (the choices of every layer slot, registered mixer names; absent: the base
    preset's layers and mixers), ``pattern_length`` (layer slots; absent: the base pattern's),
    ``repeats`` (depth = pattern_length · repeats), ``d_model``, ``lr``, and every knob a
    registered mixer declares (``Mixer.search_knobs``; built in: ``chunk_size`` for the EMA/CEMA
    chunk and gated attention's C, ``ema_order`` N, ``tcn_kernel`` K, also the dilation base,
    ``tcn_depth``). A mixer knob is only asked for when a layer uses it. With ``mixers``,
    the block's residual rule becomes ``auto`` (gated for gated attention, pre for the others),
    the one rule every mixer can take.
    """

    dimensions: dict[str, Dimension]

    @classmethod
    def from_config(cls, node: DictConfig | dict) -> SearchSpace:
        entries = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        unknown = sorted(set(entries) - set(space_keys()))
        if unknown:
            raise SeqmixError(f"search.space has no entry {unknown[0]!r}; valid entries are {list(space_keys())}")
        dimensions = {key: _dimension(key, entry) for key, entry in entries.items()}
        registered = list_mixers()
        for key, dimension in dimensions.items():
            if key == "mixers":
                if dimension.choices is None:
                    raise SeqmixError("search.space.mixers must list mixer names, not a range")
                for name in dimension.choices:
                    require_choice("search.space.mixers", name, registered)
            elif key == "lr":
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in dimension.values()):
                    raise SeqmixError(f"search.space.lr={entries[key]!r} is not valid; expected positive learning rates")
            else:
                for value in dimension.values():
                    require_int("search.space", key, value, integer_knobs()[key])
        return cls(dimensions)

    def suggest(self, trial: optuna.Trial, base_model: dict) -> Candidate:
        """Ask ``trial`` for one candidate; ``base_model`` (a resolved model config) fills the rest."""
        config = copy.deepcopy(base_model)
        base_pattern = list(config["layers"])
        if "mixers" in self.dimensions:
            slots = self._pick(trial, "pattern_length", len(base_pattern))
            pattern = [self.dimensions["mixers"].suggest(trial, f"layer_{i}") for i in range(slots)]
            mixers = {name: default_mixer_config(name) for name in dict.fromkeys(pattern)}
            if isinstance(config.get("block"), dict):
                # Only `auto` suits every mixer: gated for gated attention, which adds its own residual, pre for the rest.
                config["block"]["residual"] = "auto"
        else:
            pattern = base_pattern
            mixers = copy.deepcopy(config.get("mixers") or {})
            for name in pattern:
                if name not in mixers and name in list_mixers():
                    mixers[name] = default_mixer_config(name)
        base_depth = config.get("depth") or len(base_pattern)
        repeats = self._pick(trial, "repeats", max(1, base_depth // len(base_pattern)))
        d_model = self._pick(trial, "d_model", config["d_model"])
        # Each layer's mixer says which knobs it uses; a knob no layer uses is never asked for.
        classes = {name: cls for name in dict.fromkeys(pattern) if (cls := mixer_class_of(mixers.get(name, {}))) is not None}
        used = {knob for name, cls in classes.items() for knob in cls.search_knobs(mixers[name])}
        knobs = {knob: self.dimensions[knob].suggest(trial, knob) for knob in integer_knobs() if knob in used and knob in self.dimensions}
        for name, cls in classes.items():
            cls.apply_search_knobs(mixers[name], knobs)
        config.update(d_model=d_model, layers=pattern, depth=len(pattern) * repeats, mixers=mixers)
        lr = self.dimensions["lr"].suggest(trial, "lr") if "lr" in self.dimensions else None
        return Candidate(config, pattern, repeats, d_model, lr)

    def check_trial(self, params: dict, where: str) -> None:
        """Raise unless ``params`` (a trial to queue) names only parameters a trial of this space asks
        for (``layer_<i>`` for each slot's mixer, then the entries but ``mixers``) and gives each a
        value it can take: one of a list's choices, a number for a range (outside it, Optuna uses
        the value as given). Checked before the study is stored: a name outside the space was
        ignored without a word, and a choice outside it failed the trial."""
        for name, value in params.items():
            key = "mixers" if isinstance(name, str) and re.fullmatch(r"layer_\d+", name) else name
            if key not in self.dimensions or key == name == "mixers":
                names = ["layer_<i>" if entry == "mixers" else entry for entry in self.dimensions]
                raise SeqmixError(f"{where}: {name!r} is no parameter of this search's trials; they have {names}")
            dimension = self.dimensions[key]
            if dimension.choices is not None and not is_choice(value, dimension.choices):
                raise SeqmixError(f"{where}: {name}={value!r} is not one of search.space.{key}={list(dimension.choices)}")
            if dimension.choices is None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise SeqmixError(f"{where}: {name}={value!r} is not valid; search.space.{key} is a range of numbers")

    def description(self) -> dict[str, dict]:
        """Every entry's ``Dimension.description``, as a study stores it to compare a later search's space with."""
        return {key: dimension.description() for key, dimension in sorted(self.dimensions.items())}

    def _pick(self, trial: optuna.Trial, key: str, default):
        return self.dimensions[key].suggest(trial, key) if key in self.dimensions else default


def space_differences(stored: dict, current: dict) -> list[str]:
    """One line per parameter whose dimension differs, e.g. ``search.space.d_model is [16, 32], the study's [16]``."""
    lines = []
    for key in sorted(set(stored) | set(current)):
        if stored.get(key) == current.get(key):
            continue
        before = _dimension_text(stored[key]) if key in stored else "absent"
        now = _dimension_text(current[key]) if key in current else "absent"
        lines.append(f"search.space.{key} is {now}, the study's {before}")
    return lines


def _dimension_text(description: dict) -> str:
    """A stored dimension as a space entry reads: ``[16, 32]`` or ``{low: 0.001, high: 0.01, log: true}``."""
    if "choices" in description:
        return json.dumps(description["choices"])
    parts = [f"{key}: {json.dumps(description.get(key))}" for key in ("low", "high", "step", "log") if description.get(key) not in (None, False)]
    return "{" + ", ".join(parts) + "}"
