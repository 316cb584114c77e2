"""A run directory's files: checkpoints (weights, optimizer state, checksums), the ``latest``
pointer, and loading a finished run back.

A checkpoint directory is written under a temporary name, its checksums recorded, then renamed,
and ``latest`` is replaced atomically, so a run killed at any moment leaves the previous
checkpoint intact and every checkpoint ``latest`` names complete and verifiable. Nothing here is
unpickled: weights and optimizer tensors are safetensors, the rest JSON.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqmix.errors import SeqmixError, not_a_file, one_line, require_path
from seqmix.jsontext import parse_json
from seqmix.model.checkpoint import (
    CHECKPOINTS,
    LATEST,
    WEIGHTS,
    check_weights,
    checkpoint_name,
    checkpoint_step,
    is_checkpoint_directory,
    latest_checkpoint,
    load_model,
    read_tensors,
    save_model,
    verify_checksums,
    write_checksums,
)
from seqmix.staging import write_shareable
from seqmix.tasks.base import MODEL_FILES
from seqmix.tokenization import BYTES, TOKENIZER_FILE
from seqmix.training.records import read_evaluation, read_run_record, read_task

RUN = "run.json"
OPTIMIZER = "optimizer.safetensors"
TRAINER = "trainer.json"


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, keep: int) -> Path:
    """Write checkpoint ``step`` (weights, config, optimizer state, checksums), then point ``latest`` at it.

    The directory is written under a temporary name, its checksums recorded, and renamed, and
    ``latest`` is replaced atomically, so a run killed at any moment leaves the previous
    checkpoint intact and every checkpoint ``latest`` names complete and verifiable.
    """
    from safetensors.torch import save_file

    root = out_dir / CHECKPOINTS
    final = root / checkpoint_name(step)
    staging = root / f".{final.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    save_model(model, staging)
    tensors, scalars = _flatten_optimizer(optimizer.state_dict())
    write_shareable(staging / OPTIMIZER, lambda path: save_file(tensors, str(path)))
    write_json_atomic(staging / TRAINER, {"step": step, "optimizer": scalars})
    if (out_dir / RUN).is_file():
        # A copy under the checkpoint's checksums: loaders trust this one, never the editable run.json beside it.
        shutil.copyfile(out_dir / RUN, staging / RUN)
    for name in MODEL_FILES:
        if (out_dir / name).is_file() and not (out_dir / name).is_symlink():
            shutil.copyfile(out_dir / name, staging / name)
    write_checksums(staging)
    _remove_checkpoint(final)
    os.replace(staging, final)
    write_json_atomic(root / LATEST, {"checkpoint": final.name, "step": step})
    # By step, not name: past 99,999,999 steps the names grow a digit.
    kept = sorted((path for path in root.iterdir() if is_checkpoint_directory(path)), key=checkpoint_step)
    for old in kept[:-keep]:
        if old != final:
            _remove_checkpoint(old)
    return final


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint directory; a symlink in its place is unlinked, never followed."""
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able scalars."""
    tensors, per_param = {}, {}
    for index, values in state["state"].items():
        per_param[str(index)] = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                per_param[str(index)][name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": per_param}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(values) for i, values in scalars["scalars"].items()}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": scalars["param_groups"]}


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a run directory (its latest checkpoint) or a checkpoint directory."""
    require_path("checkpoint", path)
    path = Path(path)
    if not path.is_dir():
        found = "does not exist" if not os.path.lexists(path) else "is not a directory"
        raise SeqmixError(f"{path} {found}: expected a run directory of seqmix train, a checkpoint in it or a saved model's directory")
    if (path / WEIGHTS).is_file():
        return path
    if os.path.lexists(path / WEIGHTS):
        # A weights name that is no regular file (a folder, a FIFO) was told as "holds no checkpoint".
        raise SeqmixError(f"{path / WEIGHTS} {not_a_file(path / WEIGHTS)}; a saved model's weights are a regular file")
    latest = latest_checkpoint(path)
    if latest is None:
        raise SeqmixError(f"{path} holds no checkpoint: expected a run directory of seqmix train or a checkpoint in it")
    return latest


def _read_optimizer_state(checkpoint: Path, optimizer: torch.optim.Optimizer, device: str) -> dict:
    """The optimizer state dict stored in ``checkpoint``, checked against ``optimizer``'s parameters."""
    try:
        trainer = parse_json((checkpoint / TRAINER).read_text())
        step = int(trainer["step"])
        state = _unflatten_optimizer(read_tensors(checkpoint / OPTIMIZER, device), trainer["optimizer"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise SeqmixError(f"checkpoint {checkpoint}: {TRAINER} or {OPTIMIZER} is unreadable ({one_line(error)})") from None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in state["state"].items():
        if not 0 <= index < len(params):
            raise SeqmixError(f"checkpoint {checkpoint}: {OPTIMIZER} holds state for parameter {index}, but the model has {len(params)}")
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and not value.is_floating_point():
                # Loading would convert it to the parameter's dtype without a word.
                raise SeqmixError(
                    f"checkpoint {checkpoint}: {OPTIMIZER} tensor {index}.{name} holds {str(value.dtype).removeprefix('torch.')} "
                    "values, where the optimizer keeps floating-point ones; was it saved from another model?"
                )
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[index].shape:
                raise SeqmixError(
                    f"checkpoint {checkpoint}: {OPTIMIZER} tensor {index}.{name} has shape {tuple(value.shape)}, "
                    f"its parameter has {tuple(params[index].shape)}; was it saved from another model?"
                )
    return {"state": state, "step": step}


OPTIMIZER_SETTINGS = ("weight_decay", "betas")
"""The optimizer's settings that come from the train options, not from the checkpoint, on a resume."""


def load_training_state(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, list[str]]:
    """Restore weights and optimizer state from ``checkpoint``; return the step to continue from and
    the OPTIMIZER_SETTINGS that differ from the checkpoint's, each as "<name> <old> -> <new>".

    The optimizer keeps the settings it was built with (the run's train options): loading the state
    brought back the checkpoint's, so train.weight_decay or train.beta1 given to a resume was ignored
    without a word. The checksums are verified and every file is read and checked against the model
    before anything is copied, so a refused checkpoint leaves ``model`` and ``optimizer`` untouched.
    """
    verify_checksums(checkpoint)
    device = str(next(model.parameters()).device)
    weights = read_tensors(checkpoint / WEIGHTS, device)
    check_weights(model, weights, str(checkpoint / WEIGHTS))
    stored = _read_optimizer_state(checkpoint, optimizer, device)
    given = [{key: group[key] for key in OPTIMIZER_SETTINGS} for group in optimizer.param_groups]
    try:
        # Validates the parameter groups before it changes anything.
        optimizer.load_state_dict(stored["state"])
    except ValueError as error:
        raise SeqmixError(f"checkpoint {checkpoint}: {OPTIMIZER} does not fit this model's optimizer ({one_line(error)})") from None
    changed = []
    for group, settings in zip(optimizer.param_groups, given):
        for key, value in settings.items():
            old = tuple(group[key]) if key == "betas" else group[key]
            new = tuple(value) if key == "betas" else value
            if old != new and f"{key} {old} -> {new}" not in changed:
                changed.append(f"{key} {old} -> {new}")
            group[key] = value
    model.load_state_dict(weights, strict=False)
    return stored["step"], changed



def load_run(path: str | os.PathLike, device: str = "cpu", allow_unverified: bool = False):
    """The model of a run's latest checkpoint (or of a checkpoint directory, or of a directory written by
    ``seqmix.save_pretrained``) and the run record.

    The checkpoint's files are verified against its ``checksums.json`` (``allow_unverified`` as in
    ``load_model``), and the run record is the copy inside the checkpoint, which those checksums
    cover. Runs saved before checkpoints carried that copy fall back to the run directory's
    ``run.json``. Either way the record's model and task are descriptions, checked and built only
    through seqmix's registries, so every tool that loads a run through here (evaluate, export,
    generate) refuses the same things. The record's ``directory`` is the verified directory, and a
    task's ``tokenizer`` names the copy saved there, never the path the record was written with.
    """
    from seqmix.model.pretrained import CONFIG_JSON, from_pretrained, pretrained_training

    require_path("checkpoint", path)  # the name the commands give it
    if (Path(path) / CONFIG_JSON).is_file():
        # A directory in the Hugging Face layout (seqmix.save_pretrained): its config.json records the
        # task and how the metrics of its card were computed.
        model = from_pretrained(path, device=device, allow_unverified=allow_unverified)
        training, source = pretrained_training(path), Path(path) / CONFIG_JSON
        record = {}
        if training.get("task") is not None:
            record["task"] = read_task(training["task"], source)
        if "evaluation" in training:
            record["evaluation"] = read_evaluation(training["evaluation"], source)
        return model, _with_saved_tokenizer(record, Path(path))
    checkpoint = resolve_checkpoint(path)
    model = load_model(checkpoint, device=device, allow_unverified=allow_unverified)
    record_path = checkpoint / RUN
    # The fallback is a training checkpoint's own run, <run>/checkpoints/step-N: any folder two levels up
    # gave a saved model another run's record, and evaluate scored it on that run's task.
    if not record_path.is_file() and is_checkpoint_directory(checkpoint) and checkpoint.parent.name == CHECKPOINTS:
        record_path = checkpoint.parent.parent / RUN
    record = read_run_record(record_path) if record_path.is_file() else {}
    return model, _with_saved_tokenizer(record, checkpoint)


def _with_saved_tokenizer(record: dict, directory: Path) -> dict:
    """``record`` with its ``directory``, and its task's tokenizer pointed at the copy saved in it."""
    task = record.get("task")
    if task is not None and task.get("tokenizer", BYTES) != BYTES:
        task["tokenizer"] = str(directory / TOKENIZER_FILE)
    return {**record, "directory": str(directory)}


def check_task_files(task, record: dict) -> None:
    """Refuse a task rebuilt from a record whose model files (its labels, its tokenizer) differ from
    the ones saved with the model: class ids or token ids would silently mean something else."""
    directory = Path(record["directory"])
    for name, content in task.model_files().items():
        saved = directory / name
        if not saved.is_file() or saved.is_symlink() or saved.read_bytes() != content:
            raise SeqmixError(
                f"{directory}: the task rebuilt from its data gives another {name} than the model was trained with "
                "(did the data change since training?); evaluate or export against the data the model was trained on"
            )
