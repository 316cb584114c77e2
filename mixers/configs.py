"""Compose seqmix's Hydra configs from command-line style overrides.

The configs ship inside the package as ``seqmix.conf`` (the repository's ``conf/``), so a wheel
installed anywhere composes the same presets as a checkout.
"""
from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

from omegaconf import DictConfig

from .errors import SeqmixError

CONF_DIR = Path(str(files("seqmix.conf")))
"""The config directory; Hydra reads it from the file system, so the package must not be zipped."""


def config_groups() -> dict[str, list[str]]:
    """Every config group under ``conf/`` and its options, e.g. {"model": ["gpt2", "mega", ...]}."""
    groups: dict[str, list[str]] = {}
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        if path.parent != CONF_DIR:
            groups.setdefault(path.parent.relative_to(CONF_DIR).as_posix(), []).append(path.stem)
    return groups


def compose_config(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The root config with Hydra overrides applied, e.g. ["model=megalodon", "model.d_model=256"].

    An unknown preset raises SeqmixError listing the valid ones.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException

    if not CONF_DIR.is_dir():
        raise SeqmixError(f"the config directory {CONF_DIR} is missing; reinstall seqmix (pip install seqmix)")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides))
    except MissingConfigException as error:
        groups = config_groups()
        hints = "; ".join(f"{group}: {', '.join(options)}" for group, options in groups.items() if group in str(error))
        raise SeqmixError(f"{str(error).splitlines()[0]} Valid options — {hints or groups}") from None
