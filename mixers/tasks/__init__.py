"""The built-in tasks (every one makes its data locally; nothing is downloaded), buildable by name: ``build_task("mqar", num_pairs=8)``."""
from __future__ import annotations

import inspect

from seqmix.errors import SeqmixError, require_choice
from seqmix.tasks.base import IGNORE, Batch, Task, generator_for
from seqmix.tasks.byte_lm import ByteLM
from seqmix.tasks.classify import Classify
from seqmix.tasks.listops import ListOps
from seqmix.tasks.masked_segment import MaskedSegment
from seqmix.tasks.mqar import MQAR
from seqmix.tasks.selective_copying import SelectiveCopying
from seqmix.tasks.text import TextCorpus

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (ByteLM, MQAR, ListOps, SelectiveCopying, MaskedSegment, TextCorpus, Classify)}
"""Registered name -> task class."""

__all__ = ["IGNORE", "TASKS", "Batch", "ByteLM", "Classify", "ListOps", "MQAR", "MaskedSegment", "SelectiveCopying", "Task", "TextCorpus",
           "build_task", "generator_for", "list_tasks"]


def list_tasks() -> list[str]:
    """The registered task names, sorted."""
    return sorted(TASKS)


def build_task(name: str, **options) -> Task:
    """Build the task registered as ``name``; unknown names or options raise SeqmixError listing the valid ones."""
    require_choice("task", name, TASKS)
    cls = TASKS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SeqmixError(f"task {name!r} has no option {unknown[0]!r}; accepted options are {accepted}")
    return cls(**options)
