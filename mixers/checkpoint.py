"""Build a model from its config, save it, and load it back without unpickling anything.

A saved model is a directory with ``model.safetensors`` (the weights) and ``config.yaml`` (the
resolved model config). Loading instantiates only ``_target_``s inside this project's packages,
so a config cannot make the loader import or call anything else (``os.system``, say).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import SeqmixError

ALLOWED_PACKAGES = ("mixers", "compile", "export")
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


def check_targets(config: Any, where: str = "model") -> None:
    """Raise unless every ``_target_`` in the (nested) config lies in this project's packages."""
    if isinstance(config, (DictConfig, dict)):
        items = config.items()
    elif isinstance(config, (list, tuple)) or OmegaConf.is_list(config):
        items = ((str(i), v) for i, v in enumerate(config))
    else:
        return
    for key, value in items:
        if key == "_target_":
            root = str(value).split(".")[0]
            if root not in ALLOWED_PACKAGES:
                raise SeqmixError(
                    f"{where}._target_={value!r} is outside seqmix; configs may only build objects from the "
                    f"packages {list(ALLOWED_PACKAGES)}"
                )
        else:
            check_targets(value, f"{where}.{key}")


def instantiate_model(config: DictConfig | dict):
    """Build the model a ``conf/model`` config describes, remembering the resolved config on it."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    config = OmegaConf.create(config) if isinstance(config, dict) else config
    resolved = OmegaConf.to_container(config, resolve=True)
    check_targets(resolved)
    try:
        model = instantiate(resolved, _convert_="all")
    except InstantiationException as error:
        # Hydra wraps our own validation errors; surface them as they were raised.
        if isinstance(error.__cause__, SeqmixError):
            raise error.__cause__ from None
        raise SeqmixError(f"model config could not be built: {error}") from error
    model.config = resolved
    return model


def save_model(model, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and ``config.yaml`` into ``directory``, each atomically.

    The model must come from ``instantiate_model`` (or ``load_model``), which records its config.
    """
    from safetensors.torch import save_model as save_weights

    config = getattr(model, "config", None)
    if config is None:
        raise SeqmixError("save_model: the model has no config; build it with mixers.instantiate_model(config)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Write to a temporary name and rename, so a crash never leaves a half-written file behind.
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as handle:
        weights_tmp = handle.name
    save_weights(model, weights_tmp)
    os.replace(weights_tmp, directory / WEIGHTS)
    config_tmp = directory / (CONFIG + ".tmp")
    OmegaConf.save(OmegaConf.create(config), config_tmp)
    os.replace(config_tmp, directory / CONFIG)
    return directory


def load_model(directory: str | os.PathLike, device: str = "cpu"):
    """Rebuild a model saved by ``save_model``: config first (targets checked), then the weights."""
    from safetensors.torch import load_model as load_weights

    directory = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (directory / name).is_file():
            raise SeqmixError(f"load_model: {directory / name} does not exist; expected a directory written by save_model")
    config = OmegaConf.load(directory / CONFIG)
    model = instantiate_model(config)
    load_weights(model, directory / WEIGHTS, strict=True, device=device)
    return model.to(device)
