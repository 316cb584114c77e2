"""Compose seqmix's Hydra configs from command-line style overrides.

The configs ship inside the package as ``seqmix.conf`` (the repository's ``conf/``), so a wheel
installed anywhere composes the same presets as a checkout.
"""
from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from seqmix.errors import SeqmixError, one_line

CONF_DIR = Path(str(files("seqmix.conf")))
"""The config directory; Hydra reads it from the file system, so the package must not be zipped."""


def config_groups() -> dict[str, list[str]]:
    """Every config group under ``conf/`` and its options, e.g. {"model": ["gpt2", "mega", ...]}."""
    groups: dict[str, list[str]] = {}
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        if path.parent != CONF_DIR:
            groups.setdefault(path.parent.relative_to(CONF_DIR).as_posix(), []).append(path.stem)
    return groups


def preset_picks(overrides: Sequence[str]) -> list[str]:
    """The overrides that decide which presets compose: a group's pick (``model=tcnca``, or ``+search=tiny`` for
    a group the root lacks) and Hydra's own settings (``hydra.searchpath``, where extra presets live)."""
    groups = config_groups()
    return [o for o in overrides if "=" in o and (o.split("=", 1)[0].lstrip("+") in groups or o.startswith("hydra."))]


DEFAULTS_GROUP = "defaults_of"
"""The config group of nodes generated from the code: ``defaults_of/<kind>/<name>`` holds every option of a
registered part with its default (``defaults_of/block`` and ``defaults_of/ffn`` for the single-class parts)."""


def store_code_defaults() -> None:
    """Register the ``defaults_of`` nodes with Hydra's ConfigStore.

    A config file pulls in the node of its part (``- /defaults_of/mixer/ema@_here_`` in its defaults
    list) and then sets only the options that differ, so defaults live in the code alone while the
    composed config still lists every option (and every option can be overridden without ``+``).
    Mixers registered by plugins get their node too.
    """
    from hydra.core.config_store import ConfigStore

    from seqmix.model.description import HEAD_PARTS, NORM_PARTS, part_defaults
    from seqmix.registry import list_mixers
    from seqmix.tasks import TASKS
    from seqmix.training.records import task_description

    store = ConfigStore.instance()
    for name in list_mixers():
        store.store(group=f"{DEFAULTS_GROUP}/mixer", name=name, node=part_defaults("mixer", name))
    for kind, registry in (("norm", NORM_PARTS), ("head", HEAD_PARTS)):
        for name in registry:
            store.store(group=f"{DEFAULTS_GROUP}/{kind}", name=name, node=part_defaults(kind, name))
    for kind in ("block", "ffn"):
        store.store(group=DEFAULTS_GROUP, name=kind, node=part_defaults(kind))
    for name in TASKS:
        store.store(group=f"{DEFAULTS_GROUP}/task", name=name, node=task_description({"task": name}))


def require_overrides(overrides) -> None:
    """Raise unless ``overrides`` is a list of strings: a bare string would be read one character at a
    time, and anything but strings reaches Hydra's parser. Callers that add overrides of their own check
    the caller's first."""
    if isinstance(overrides, (str, bytes)) or not isinstance(overrides, Sequence) or not all(isinstance(o, str) for o in overrides):
        raise SeqmixError(f"overrides={overrides!r} is not valid; expected a list of strings, e.g. "
                          "['model=megalodon', 'model.d_model=256']")


def compose_config(overrides: Sequence[str] = (), config_name: str = "config", with_choices: bool = False) -> DictConfig:
    """The root config with Hydra overrides applied, e.g. ["model=megalodon", "model.d_model=256"].

    Every mistake in the overrides raises SeqmixError in one short message: an unknown preset
    lists the group's options, an unknown key lists the keys beside it, an override Hydra cannot
    parse is quoted. ``with_choices`` keeps Hydra's own node, whose ``hydra.runtime.choices``
    names the preset picked in each group.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    require_overrides(overrides)
    if not CONF_DIR.is_dir():
        raise SeqmixError(f"the config directory {CONF_DIR} is missing; reinstall seqmix (pip install seqmix)")
    import yaml

    store_code_defaults()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            config = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=with_choices)
        # Resolved once here, so that an interpolation that cannot be (a missing key, a loop, an unknown
        # resolver) is named now, not as OmegaConf's traceback wherever a value is first read.
        # Hydra's own node is left out: its interpolations resolve only inside a running job.
        body = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"]) if with_choices else config
        OmegaConf.to_container(body, resolve=True)
        return config
    except (HydraException, OmegaConfBaseException) as error:
        raise SeqmixError(_composition_problem(error, overrides, config_name)) from None
    except yaml.YAMLError as error:
        raise SeqmixError(f"a config file is not readable YAML ({one_line(error)})") from None
    except RecursionError:
        raise SeqmixError("a config refers to itself in a loop: a defaults list that comes back to itself, or a YAML "
                          "anchor used inside itself") from None
    except ValueError as error:
        # Hydra's own, for an override it cannot apply (model=null: "Config group override must be a string or a list").
        raise SeqmixError(f"cannot apply the overrides {list(overrides)}: {' '.join(str(error).split())}") from None


def _parses(override: str) -> bool:
    """Whether Hydra's parser reads ``override`` on its own."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        OverridesParser.create().parse_overrides([override])
    except OverrideParseException:
        return False
    return True


def _composition_problem(error: Exception, overrides: Sequence[str], config_name: str) -> str:
    """One line (or a few) saying what is wrong with ``overrides``, in the user's terms."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, InterpolationResolutionError, UnsupportedInterpolationType

    text = str(error)
    if isinstance(error, MissingConfigException):
        for group, options in config_groups().items():
            if f"'{group}/" in text:
                picked = text.split(f"'{group}/", 1)[1].split("'", 1)[0]
                return f"{group}={picked!r} is not a preset; the {group} presets are {options}"
        return text.splitlines()[0]
    if "Ambiguous value for argument" in text:
        swept = next((o for o in overrides if "," in o.partition("=")[2]), None)
        return (f"{swept or 'an override'!r} lists several values: a sweep runs one job for each with -m "
                f"(seqmix <command> -m ...); quote a value holding a comma as key='a,b'")
    if isinstance(error, OverrideParseException):
        # Each parsed alone: Hydra's message quotes only the token it stopped at ('='), which the first
        # override holding one matched (a search's own '+search=tiny' was blamed for another's value).
        bad = next((o for o in overrides if not _parses(o)), None)
        problem = f"cannot read the override {bad!r}" if bad else "cannot read an override"
        return (f"{problem}: {text.splitlines()[0]} (Hydra's syntax: key=value, group=preset, +key=value, ~key; "
                "quote a value holding characters beyond ASCII letters, digits and -_./:@ (accented letters, brackets, "
                "=, #, ...) as key='value')")
    if isinstance(error, (InterpolationResolutionError, UnsupportedInterpolationType)):
        key = getattr(error, "full_key", None)
        return f"cannot resolve {key or 'an interpolation'}: {text.splitlines()[0]}"
    cause = error.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and "not in struct" in str(cause):
        key = getattr(cause, "full_key", None) or str(cause).split("'")[1]
        return f"unknown key {key!r}; {_keys_beside(key, overrides, config_name)}"
    return text.splitlines()[0]


def _keys_beside(full_key: str, overrides: Sequence[str], config_name: str) -> str:
    """'the keys of <parent> are [...]' for an unknown ``full_key``, from the config the presets picked compose to."""
    from omegaconf import OmegaConf

    picks = preset_picks(overrides)
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    try:
        node = compose_config(picks, config_name)
        node = OmegaConf.select(node, parent) if parent else node
    except SeqmixError:
        node = None
    if not OmegaConf.is_dict(node):
        return "check its spelling"
    if not node:
        # A map that starts empty (per-mixer options, say) takes new keys only with Hydra's '+'.
        return f"{parent} starts empty: add a key to it with +{full_key}=<value>"
    return f"the keys {'of ' + parent if parent else 'at the top'} are {sorted(node)}"
