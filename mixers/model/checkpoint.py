"""Build a model from its config, save it, and load it back without unpickling anything.

A saved model is a directory with ``model.safetensors`` (the weights) and ``config.yaml`` (the
resolved model config). Loading instantiates only the public targets of ``seqmix.targets``, so a
config cannot make the loader import or call anything else (``os.system``, say); configs saved by
seqmix 0.1.0, which name its module paths, are translated first.

A training checkpoint adds ``checksums.json``: the sha256 of every other file in the directory,
written before the directory is renamed into place. Loaders verify it before reading anything,
so a truncated or corrupted file is refused by name instead of being half-loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from seqmix.errors import SeqmixError
from seqmix.targets import check_targets, translate_legacy_targets

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
CHECKSUMS = "checksums.json"


def instantiate_model(config: DictConfig | dict):
    """Build the model a ``conf/model`` config describes, remembering the resolved config on it."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    config = OmegaConf.create(config) if isinstance(config, dict) else config
    resolved = translate_legacy_targets(OmegaConf.to_container(config, resolve=True))
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
        raise SeqmixError("save_model: the model has no config; build it with seqmix.instantiate_model(config)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # The files are about to change, so a checksum record written for the old ones would be stale.
    (directory / CHECKSUMS).unlink(missing_ok=True)
    # Write to a temporary name and rename, so a crash never leaves a half-written file behind.
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as handle:
        weights_tmp = handle.name
    save_weights(model, weights_tmp)
    os.replace(weights_tmp, directory / WEIGHTS)
    config_tmp = directory / (CONFIG + ".tmp")
    OmegaConf.save(OmegaConf.create(config), config_tmp)
    os.replace(config_tmp, directory / CONFIG)
    return directory


def load_model(directory: str | os.PathLike, device: str = "cpu", require_checksums: bool = False):
    """Rebuild a model saved by ``save_model``: checksums, then config (targets checked), then weights.

    ``checksums.json`` is verified whenever the directory holds one; ``require_checksums`` refuses
    a directory without it (training checkpoints always have one).
    """
    directory = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (directory / name).is_file():
            raise SeqmixError(f"load_model: {directory / name} does not exist; expected a directory written by save_model")
    if require_checksums or (directory / CHECKSUMS).exists():
        verify_checksums(directory)
    try:
        config = OmegaConf.load(directory / CONFIG)
    except Exception as error:
        raise SeqmixError(f"load_model: {directory / CONFIG} is not a readable YAML config ({error})") from None
    model = instantiate_model(config)
    load_weights(model, read_tensors(directory / WEIGHTS, device), str(directory / WEIGHTS))
    return model.to(device)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: str | os.PathLike) -> Path:
    """Record the sha256 of every file in ``directory`` in ``checksums.json``, written atomically."""
    directory = Path(directory)
    files = {path.name: _sha256(path) for path in sorted(directory.iterdir()) if path.is_file() and path.name != CHECKSUMS}
    tmp = directory / (CHECKSUMS + ".tmp")
    tmp.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=2))
    os.replace(tmp, directory / CHECKSUMS)
    return directory / CHECKSUMS


def verify_checksums(directory: str | os.PathLike) -> None:
    """Raise unless ``checksums.json`` exists, lists every other file, and every file matches it."""
    directory = Path(directory)
    record_path = directory / CHECKSUMS
    if not record_path.is_file():
        raise SeqmixError(
            f"checkpoint {directory}: {CHECKSUMS} is missing, so its files cannot be verified; it was not written "
            "by seqmix's save_checkpoint (or has been damaged). If you trust it, record its checksums with "
            "seqmix.model.checkpoint.write_checksums(directory)"
        )
    try:
        record = json.loads(record_path.read_text())
        expected = record["files"]
        if record.get("algorithm") != "sha256" or not isinstance(expected, dict):
            raise ValueError("unknown layout")
    except (ValueError, KeyError, TypeError) as error:
        raise SeqmixError(f"checkpoint {directory}: {CHECKSUMS} is corrupted ({error}); refusing to load the checkpoint") from None
    present = sorted(path.name for path in directory.iterdir() if path.is_file() and path.name != CHECKSUMS)
    unlisted = [name for name in present if name not in expected]
    if unlisted:
        raise SeqmixError(f"checkpoint {directory}: {unlisted[0]} is not listed in {CHECKSUMS}; refusing an unverified file")
    for name, digest in expected.items():
        path = directory / name
        if Path(name).name != name or not path.is_file():
            raise SeqmixError(f"checkpoint {directory}: {name} is listed in {CHECKSUMS} but missing; the checkpoint is incomplete")
        if _sha256(path) != digest:
            raise SeqmixError(
                f"checkpoint {directory}: {name} does not match its sha256 in {CHECKSUMS} (truncated or corrupted); "
                "refusing to load it. Resume from an earlier checkpoint or retrain"
            )


def read_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; an unreadable file is refused by name."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except Exception as error:
        raise SeqmixError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error})") from None


def _storage(tensor: torch.Tensor) -> int | None:
    """Where a tensor's data lives, to recognise tied weights; None for empty tensors, which share nothing."""
    return tensor.untyped_storage().data_ptr() if tensor.numel() else None


def check_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str = WEIGHTS) -> None:
    """Raise unless ``tensors`` holds exactly the model's weights with the model's shapes.

    A tied weight is stored once under one of its names (safetensors refuses shared tensors), so
    a model name is covered when it, or a name sharing its storage, is in ``tensors``.
    """
    expected = model.state_dict()
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise SeqmixError(f"{source}: tensor {unexpected[0]!r} is not a weight of this model; was it saved from another model?")
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise SeqmixError(
                f"{source}: tensor {name!r} has shape {tuple(value.shape)}, the model expects {tuple(expected[name].shape)}"
            )
    stored = {_storage(expected[name]) for name in tensors} - {None}
    missing = [name for name, value in expected.items() if name not in tensors and _storage(value) not in stored]
    if missing:
        raise SeqmixError(f"{source}: the model's weight {missing[0]!r} is not in the file; was it saved from another model?")


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str = WEIGHTS) -> None:
    """Copy ``tensors`` into ``model`` after ``check_weights``: a refused load leaves the model untouched."""
    check_weights(model, tensors, source)
    model.load_state_dict(tensors, strict=False)
