"""The built-in tasks (every one makes its data locally; nothing is downloaded), buildable by name: ``build_task("mqar", num_pairs=8)``."""
from __future__ import annotations

import inspect

from ..errors import SeqmixError, choice_error
from .base import IGNORE, Batch, Task, generator_for
from .byte_lm import ByteLM
from .listops import ListOps
from .masked_segment import MaskedSegment
from .mqar import MQAR
from .selective_copying import SelectiveCopying

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (ByteLM, MQAR, ListOps, SelectiveCopying, MaskedSegment)}
"""Registered name -> task class."""

__all__ = ["IGNORE", "TASKS", "Batch", "ByteLM", "ListOps", "MQAR", "MaskedSegment", "SelectiveCopying", "Task",
           "build_task", "generator_for", "list_tasks"]


def list_tasks() -> list[str]:
    """The registered task names, sorted."""
    return sorted(TASKS)


def build_task(name: str, **options) -> Task:
    """Build the task registered as ``name``; unknown names or options raise SeqmixError listing the valid ones."""
    if name not in TASKS:
        raise choice_error("task", name, TASKS)
    cls = TASKS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SeqmixError(f"task {name!r} has no option {unknown[0]!r}; accepted options are {accepted}")
    return cls(**options)
