"""Turn a composed root config (model + task + train) into a ready model, task and run options."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from seqmix.errors import SeqmixError, SeqmixWarning, require_int
from seqmix.model.checkpoint import instantiate_model
from seqmix.model.description import model_description
from seqmix.model.sequence_model import SequenceModel
from seqmix.tasks import TASKS
from seqmix.tasks.base import Task
from seqmix.training.loop import TrainConfig, process_rank
from seqmix.training.checkpoints import RUN
from seqmix.training.records import build_task, read_run_record, task_description, task_differences


@dataclass
class Experiment:
    """What a training or evaluation run needs."""

    model: SequenceModel
    task: Task
    train: TrainConfig
    model_config: dict
    task_config: dict


def adapt_model_config(model_config: DictConfig | dict, task: Task) -> dict:
    """The model config with the task's vocabulary and the head the task needs.

    A preset's LM head is swapped for a classification head on classification tasks (untying the
    embedding), and for a masked-LM head on masked objectives.
    """
    config = model_description(model_config)
    # Checked though the task's replaces it: model.vocab_size=-1 went through without a word.
    require_int("model", "vocab_size", config["vocab_size"], 2, "replaced by the task's vocabulary in training")
    config["vocab_size"] = task.vocab_size
    if config["head"]["head"] != task.head:
        config["head"] = {"head": task.head}
    if task.head == "classification":
        config["head"]["num_classes"] = task.num_classes
        config["tie_embeddings"] = False
    return model_description(config)


def check_fits(model: SequenceModel, task: Task) -> None:
    """Refuse a task whose sequences the model cannot take."""
    if model.pos_embed is not None and task.seq_len > model.max_len:
        raise SeqmixError(
            f"task.seq_len={task.seq_len} exceeds the model's learned positions (model.max_len={model.max_len}); "
            "raise model.max_len or lower the task's seq_len"
        )
    for index, block in enumerate(model.blocks):
        mixer = block.mixer
        if getattr(mixer, "chunk_size", 0) is None and task.seq_len > mixer.max_len:
            raise SeqmixError(
                f"task.seq_len={task.seq_len} exceeds layer {index}'s full-attention max_len={mixer.max_len}; "
                "raise it or set a chunk_size"
            )


@dataclass
class _TaskShape:
    """What ``adapt_model_config`` and ``check_fits`` read of a task, known before its data is: its
    head and seq_len, and a stand-in vocabulary and class count (the task's own replace them when it
    is built)."""

    vocab_size: int
    head: str
    seq_len: int
    num_classes: int = 2


def check_model_before_data(model_config, task_config) -> None:
    """Build the model ``model_config`` describes on the meta device (no memory), with the head its
    task needs, before the task reads or tokenizes anything: a bad model option was told only after
    the corpus was tokenized and cached, minutes on a large one. The task's vocabulary and classes
    are not known yet; the model is built again with them, and ``check_fits`` follows."""
    description = task_description(task_config)
    config = model_description(model_config)
    require_int("model", "vocab_size", config["vocab_size"], 2, "replaced by the task's vocabulary in training")
    seq_len = description.get("seq_len")
    shape = _TaskShape(config["vocab_size"], TASKS[description["task"]].head, seq_len)
    model = instantiate_model(adapt_model_config(config, shape), device="meta")
    if isinstance(seq_len, int) and not isinstance(seq_len, bool) and seq_len > 0:
        check_fits(model, shape)


def _check_resumed_task(train: TrainConfig, task_config) -> None:
    """Refuse, before the task reads or tokenizes anything, to resume a run of another task, naming
    the options that differ: it was told only once the corpus had been read and cached, as "another
    model or task"."""
    record = Path(train.out_dir) / RUN
    if not train.resume or not record.is_file():
        return
    differences = task_differences(read_run_record(record).get("task"), task_config)
    if differences:
        raise SeqmixError(f"train.resume=true but {train.out_dir} holds a run of another task: {', '.join(differences)}; "
                          "resume with the run's task options")


def _refuse_outputs_in_corpus(train: TrainConfig, task_config) -> None:
    """Refuse a ``train.out_dir`` or ``train.save_pretrained`` where the corpus path reads (inside its
    folder, or matched by its glob), before the data is read: the next run on that corpus read the
    run's checkpoints as documents (a checksums.json refused as a bad JSON line, or, as text,
    trained on model.safetensors)."""
    path = task_config.get("path") if hasattr(task_config, "get") else None
    if not isinstance(path, str) or not path:
        return
    from seqmix.tasks.documents import inside_corpus

    for field, out in (("train.out_dir", train.out_dir), ("train.save_pretrained", train.save_pretrained)):
        if out is not None and inside_corpus(path, out):
            raise SeqmixError(f"{field}={os.fspath(out)!r} is inside the corpus task.path={path!r}, so a later run on that "
                              "corpus would read this run's files as documents; write the run outside the corpus")


def build_experiment(config: DictConfig) -> Experiment:
    """Model (seeded, adapted to the task), task and train options from a root config."""
    options = OmegaConf.to_container(config.train, resolve=True)
    accepted = list(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SeqmixError(f"train has no option {unknown[0]!r}; accepted options are {accepted}")
    train = TrainConfig(**options)
    if process_rank() == 0:
        train.require_writable_outputs()  # before the task's data is read or tokenized
    check_model_before_data(config.model, config.task)
    _check_resumed_task(train, config.task)
    _refuse_outputs_in_corpus(train, config.task)
    task = build_task(config.task)
    model_config = adapt_model_config(config.model, task)
    torch.manual_seed(train.seed)
    model = instantiate_model(model_config)
    check_fits(model, task)
    if not task.causal and model.causal:
        # Task.causal was read nowhere: a causal model trained on a masked objective without a word.
        warnings.warn(SeqmixWarning(f"task={task.name} predicts tokens from both sides, but every layer of this model is "
                                    "causal and sees only the left: a bidirectional model (model=mega_encoder, or "
                                    "causal=false mixers) can use the right side too"), stacklevel=2)
    # One row drawn now: a task that cannot make its data (listops with no tree in its length window)
    # failed at the first step, after the run directory was written.
    task.batch("train", 0, 1)
    task_config = task_description(config.task)
    return Experiment(model, task, train, model_config, task_config)
