"""Name -> mixer class registry, so configs and tools can build any mixer by name."""
from __future__ import annotations

import inspect
from collections.abc import Callable

from .contract import Mixer
from .errors import SeqmixError, choice_error

_MIXERS: dict[str, type[Mixer]] = {}


def register_mixer(name: str) -> Callable[[type[Mixer]], type[Mixer]]:
    """Class decorator that makes a mixer buildable as ``build_mixer(name, d_model, ...)``."""

    def register(cls: type[Mixer]) -> type[Mixer]:
        if name in _MIXERS and _MIXERS[name] is not cls:
            raise SeqmixError(f"mixer name {name!r} is already registered to {_MIXERS[name].__qualname__}")
        _MIXERS[name] = cls
        cls.registered_name = name
        return cls

    return register


def list_mixers() -> list[str]:
    """The registered mixer names, sorted."""
    return sorted(_MIXERS)


def mixer_class(name: str) -> type[Mixer]:
    """The class registered under ``name``; unknown names list the valid ones."""
    if name not in _MIXERS:
        raise choice_error("mixer", name, _MIXERS)
    return _MIXERS[name]


def build_mixer(name: str, d_model: int, **options) -> Mixer:
    """Build the mixer registered as ``name`` for width ``d_model``.

    Options are the mixer class's keyword arguments; an unknown option names the accepted ones.
    """
    cls = mixer_class(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "d_model")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SeqmixError(f"mixer {name!r} has no option {unknown[0]!r}; accepted options are {accepted}")
    return cls(d_model, **options)
