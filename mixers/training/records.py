"""A run's record (``run.json``): its model and task as descriptions, the options it trained with,
and how it computed the validation scores it reports (``evaluation``).

Both parts name registered things only: the model as a ``seqmix.model.description``, the task as
``{task: <registered name>, <option>: <value>, ...}``. Reading a record someone else wrote can
therefore build nothing but seqmix's registered models and tasks; records of older versions,
which named code paths, go through the frozen translation of ``seqmix.model.legacy``. Paths in a
record (a task's ``cache_dir``) are never followed: they belong to the machine that wrote it.
"""
from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from seqmix.errors import SeqmixError, require_choice, not_a_file, require_bool, require_int, json_kind, kind_of
from seqmix.jsontext import parse_json
from seqmix.model.description import model_description, plain_data
from seqmix.model.legacy import translate
from seqmix.tasks import TASKS, Task


def _task_parameters(name: str) -> dict[str, inspect.Parameter]:
    return {key: value for key, value in inspect.signature(TASKS[name].__init__).parameters.items() if key != "self"}


def task_without_paths(description: Mapping) -> dict:
    """A canonical task description without its path options (a cache folder), which differ between
    machines sharing one study and change nothing the task computes."""
    parameters = _task_parameters(description["task"])
    return {key: value for key, value in description.items()
            if key not in parameters or "PathLike" not in str(parameters[key].annotation)}


def task_description(config: Any) -> dict:
    """The canonical description ``{task: <name>, <every option>: <value>}`` of a task config (any version's form)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    if not isinstance(config, Mapping):
        raise SeqmixError(f"task config is {kind_of(config)}; expected {{task: <name>, <option>: <value>, ...}}")
    options = dict(translate(dict(config), "task"))
    name = options.pop("task", None)
    require_choice("task.task", name, TASKS)
    parameters = _task_parameters(name)
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        raise SeqmixError(f"task {name!r} has no option {unknown[0]!r}; accepted options are {sorted(parameters)}")
    filled = {key: plain_data(options.get(key, parameter.default), f"task.{key}") for key, parameter in parameters.items()}
    return {"task": name, **filled}


def build_task(config: Any, trust_paths: bool = True) -> Task:
    """Build the task a task config describes; ``trust_paths=False`` replaces path options by their defaults."""
    description = task_description(config)
    name = description.pop("task")
    if not trust_paths:
        for key, parameter in _task_parameters(name).items():
            if "PathLike" in str(parameter.annotation):
                description[key] = parameter.default
    return TASKS[name](**description)


def evaluation_record(batches: int, batch_size: int, bf16: bool) -> dict:
    """How a run computed the validation scores it reports (``train.eval_batches`` batches of
    ``train.batch_size`` sequences, under bfloat16 autocast or not): kept in its record, so that
    ``seqmix evaluate`` scores a checkpoint the same way and reproduces the run's figures."""
    return {"batches": batches, "batch_size": batch_size, "bf16": bf16}


def data_sha256(task) -> str | None:
    """The sha256 of the text a corpus task read (``meta["content_sha256"]``: the user's own data), or
    None for a task whose data is generated from its description."""
    content = getattr(task, "meta", None)
    return content.get("content_sha256") if isinstance(content, dict) else None


def read_evaluation(value: Any, source: str | os.PathLike) -> dict:
    """A recorded ``evaluation`` (``evaluation_record``) read from ``source`` (a file, or who passed it);
    anything else is refused by name."""
    keys = sorted(evaluation_record(1, 1, False))
    # Sets, not sorted lists: a mapping passed from Python may hold keys that do not sort together.
    if not isinstance(value, Mapping) or set(value) != set(keys):
        raise SeqmixError(f"{source}: evaluation={value!r} is not valid; expected a mapping of exactly {keys}: "
                          "the validation batches, their size and whether bfloat16 autocast was on")
    owner = f"{source}: evaluation"
    require_int(owner, "batches", value["batches"])
    require_int(owner, "batch_size", value["batch_size"])
    require_bool(owner, "bf16", value["bf16"])
    return dict(value)


EXECUTION_OPTIONS = ("recompute",)
"""Model and block options that change how training runs, not what the model computes or holds:
a run may resume with other values (e.g. ``model.recompute=block`` after running out of memory)."""


def _what_it_computes(description: Any) -> Any:
    """A model description without ``EXECUTION_OPTIONS``, at any depth."""
    if isinstance(description, Mapping):
        return {key: _what_it_computes(value) for key, value in description.items() if key not in EXECUTION_OPTIONS}
    if isinstance(description, list):
        return [_what_it_computes(value) for value in description]
    return description


def same_run(previous: Mapping, current: Mapping) -> bool:
    """True when two records describe the same model and task (however each spelled its defaults),
    whatever their ``EXECUTION_OPTIONS`` and the task's path options (a cache folder)."""
    return (
        _what_it_computes(model_description(previous.get("model"))) == _what_it_computes(model_description(current.get("model")))
        and not task_differences(previous.get("task"), current.get("task"))
    )


def task_differences(previous: Any, current: Any) -> list[str]:
    """The options in which two task configs differ, path options (a cache folder) aside, each as
    "task.<option>=<previous> (now <current>)", or the task's name when that differs."""
    before, after = task_without_paths(task_description(previous)), task_without_paths(task_description(current))
    if before["task"] != after["task"]:
        return [f"task={before['task']} (now {after['task']})"]
    return [f"task.{key}={before.get(key)!r} (now {after.get(key)!r})" for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)]


def read_task(config: Any, source: Path) -> dict:
    """The canonical task description ``config`` read from ``source``; a bad one is refused naming the file."""
    try:
        return task_description(config)
    except SeqmixError as error:
        raise SeqmixError(f"{source}: {error}") from None


def read_run_record(path: str | os.PathLike) -> dict:
    """A ``run.json`` with its model and task as canonical descriptions; anything else is refused by name."""
    path = Path(path)
    if path.is_symlink():
        raise SeqmixError(f"{path} is a symbolic link; seqmix reads only the run record the run wrote")
    if not path.is_file():
        raise SeqmixError(f"{path} {not_a_file(path)}; expected the run record written by seqmix train")
    try:
        record = parse_json(path.read_text())
    except (OSError, ValueError) as error:
        raise SeqmixError(f"{path} is not valid JSON ({error}); the run record is corrupted") from None
    if not isinstance(record, dict):
        raise SeqmixError(f"{path} holds {json_kind(record)}; expected the run record written by seqmix train")
    try:
        if "model" in record:
            record["model"] = model_description(record["model"])
        if "task" in record:
            record["task"] = task_description(record["task"])
    except SeqmixError as error:
        raise SeqmixError(f"{path}: {error}") from None
    if "evaluation" in record:
        record["evaluation"] = read_evaluation(record["evaluation"], path)
    if "data_sha256" in record and not (isinstance(record["data_sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", record["data_sha256"])):
        raise SeqmixError(f"{path}: data_sha256={record['data_sha256']!r} is not a sha256 (64 hex digits)")
    return record
