"""Turn a composed root config (model + task + train) into a ready model, task and run options."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from seqmix.configs import CONF_DIR
from seqmix.errors import SeqmixError
from seqmix.model.checkpoint import instantiate_model
from seqmix.model.sequence_model import SequenceModel
from seqmix.targets import check_targets, translate_legacy_targets
from seqmix.tasks.base import Task
from seqmix.training.loop import TrainConfig

HEAD_TARGETS = {
    "causal_lm": "seqmix.CausalLMHead",
    "masked_lm": "seqmix.MaskedLMHead",
    "classification": "seqmix.ClassificationHead",
}


@dataclass
class Experiment:
    """What a training or evaluation run needs."""

    model: SequenceModel
    task: Task
    train: TrainConfig
    model_config: dict
    task_config: dict


def build_task(task_config: DictConfig | dict) -> Task:
    """Instantiate a ``conf/task`` config (only this project's targets)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    container = translate_legacy_targets(OmegaConf.to_container(OmegaConf.create(task_config), resolve=True))
    check_targets(container, "task")
    try:
        return instantiate(container)
    except InstantiationException as error:
        if isinstance(error.__cause__, SeqmixError):
            raise error.__cause__ from None
        raise


def adapt_model_config(model_config: DictConfig | dict, task: Task) -> dict:
    """The model config with the task's vocabulary and the head the task needs.

    A preset's LM head is swapped for a classification head on classification tasks (untying the
    embedding), and for a masked-LM head on masked objectives.
    """
    config = OmegaConf.to_container(OmegaConf.create(model_config), resolve=True)
    config["vocab_size"] = task.vocab_size
    wanted = HEAD_TARGETS[task.head]
    if config.get("head", {}).get("_target_") != wanted:
        config["head"] = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "head" / f"{task.head}.yaml"))
    if task.head == "classification":
        config["head"]["num_classes"] = task.num_classes
        config["tie_embeddings"] = False
    return config


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


def build_experiment(config: DictConfig) -> Experiment:
    """Model (seeded, adapted to the task), task and train options from a root config."""
    options = OmegaConf.to_container(config.train, resolve=True)
    accepted = list(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SeqmixError(f"train has no option {unknown[0]!r}; accepted options are {accepted}")
    train = TrainConfig(**options)
    task = build_task(config.task)
    model_config = adapt_model_config(config.model, task)
    torch.manual_seed(train.seed)
    model = instantiate_model(model_config)
    check_fits(model, task)
    task_config = OmegaConf.to_container(config.task, resolve=True)
    return Experiment(model, task, train, model_config, task_config)
