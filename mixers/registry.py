"""Name -> mixer class registry, so configs and tools can build any mixer by name.

Built-in mixers register with ``@register_mixer``. A mixer from another installed package
registers through the entry-point group ``seqmix.mixers``: in that package's pyproject.toml,

    [project.entry-points."seqmix.mixers"]
    my_mixer = "my_package.my_module:MyMixer"

names a ``Mixer`` subclass, registered as ``my_mixer`` the first time the registry is asked
anything. It then works wherever a built-in mixer does: ``build_mixer``, ``model.layers``,
configs, training, export, search and the benchmarks.
"""
from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable

from seqmix.contract import Mixer
from seqmix.errors import SeqmixError, SeqmixWarning, one_line, require_choice

ENTRY_POINT_GROUP = "seqmix.mixers"
NOT_INSTALLED_HINT = (f"a mixer from another package (the {ENTRY_POINT_GROUP} entry points) is known only where that "
                      "package is installed")
"""What a refusal of an unknown mixer name adds: a saved model names the mixers it was built with."""

_MIXERS: dict[str, type[Mixer]] = {}
_plugins_loaded = False


def _load_plugins() -> None:
    """Register the mixers other installed packages declare in ``ENTRY_POINT_GROUP`` (once).

    A plugin that fails to import, names something that is not a Mixer, or takes a name already
    registered is skipped with a warning naming it: one broken package must not break seqmix.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        where = f"mixer plugin {entry.name!r} ({entry.value}, from {entry.dist.name if entry.dist else 'an unknown package'})"
        try:
            cls = entry.load()
        except Exception as error:  # noqa: BLE001  (any import failure of foreign code is reported, not raised)
            warnings.warn(f"seqmix: {where} could not be loaded and is skipped: {type(error).__name__}: {error}",
                          SeqmixWarning, stacklevel=2)
            continue
        problem = _name_problem(entry.name) or _class_problem(cls)
        if problem:
            warnings.warn(f"seqmix: {where}: {problem}; skipped", SeqmixWarning, stacklevel=2)
            continue
        if _MIXERS.get(entry.name, cls) is not cls:
            warnings.warn(f"seqmix: {where} takes the name of the registered {_MIXERS[entry.name].__qualname__}; skipped",
                          SeqmixWarning, stacklevel=2)
            continue
        _MIXERS[entry.name] = cls
        cls.registered_name = entry.name


OVERRIDE_VALUES = {"null": "None", "true": "True", "false": "False", "nan": "a float", "inf": "a float"}
"""Identifiers a Hydra override reads as another value, in any case: no mixer can be named by them."""


def _name_problem(name) -> str | None:
    """Why ``name`` cannot name a mixer, or None. A name is written in configs, Hydra overrides
    (``model.mixers.<key>.mixer=<name>``) and the benchmark's ``name/impl`` entries, so it is an
    identifier; a name of another type would also break sorting the registered names."""
    if not (isinstance(name, str) and name.isidentifier() and name.isascii()):
        return (f"name={name!r} is not valid; expected an identifier of ASCII letters, digits and '_', not starting "
                "with a digit (an override cannot spell other letters)")
    if name.lower() in OVERRIDE_VALUES:
        return f"name={name!r} is not valid: an override reads {name} as a value ({OVERRIDE_VALUES[name.lower()]}), not a name"
    return None


def _class_problem(cls) -> str | None:
    """Why ``cls`` cannot be registered as a mixer, or None."""
    if not (isinstance(cls, type) and issubclass(cls, Mixer)) or cls is Mixer:
        return f"{cls!r} is not a seqmix.Mixer subclass"
    if cls.mix is Mixer.mix:
        return f"{cls.__qualname__} does not implement mix(x, padding_mask) -> (B, L, D), which every mixer provides"
    return None


def register_mixer(name: str) -> Callable[[type[Mixer]], type[Mixer]]:
    """Class decorator that makes a mixer buildable as ``build_mixer(name, d_model, ...)``.

    The name is checked here and the class where the decorator is applied."""
    problem = _name_problem(name)
    if problem:
        raise SeqmixError(f"register_mixer: {problem}")

    def register(cls: type[Mixer]) -> type[Mixer]:
        problem = _class_problem(cls)
        if problem:
            raise SeqmixError(f"register_mixer({name!r}): {problem}")
        if name in _MIXERS and _MIXERS[name] is not cls:
            raise SeqmixError(f"mixer name {name!r} is already registered to {_MIXERS[name].__qualname__}")
        _MIXERS[name] = cls
        cls.registered_name = name
        return cls

    return register


def list_mixers() -> list[str]:
    """The registered mixer names (built in and from plugins), sorted."""
    _load_plugins()
    return sorted(_MIXERS)


def mixer_class(name: str) -> type[Mixer]:
    """The class registered under ``name``; unknown names list the valid ones."""
    _load_plugins()
    require_choice("mixer", name, _MIXERS)
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
    try:
        mixer = cls(d_model, **options)
    except SeqmixError:
        raise
    except Exception as error:
        # A plugin's own code: named, with its error, as one line (the traceback stays chained).
        raise SeqmixError(f"mixer {name!r} ({cls.__qualname__}) could not be built for d_model={d_model} with options "
                          f"{options}: {one_line(error)}") from error
    if "_impl" not in vars(mixer) or vars(mixer).get("d_model") != d_model:
        raise SeqmixError(f"mixer {name!r} ({cls.__qualname__}) did not call Mixer.__init__(d_model, causal=...) with its "
                          f"d_model={d_model}, which sets what the rest of seqmix reads (d_model, causal, impl)")
    return mixer
