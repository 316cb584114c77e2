"""Train a model on a built-in task, evaluate it, save it, and show what it learned.

    python tools/train.py model=<preset> task=<task> train.max_steps=<n> train.out_dir=<dir>
    python tools/train.py train.resume=true train.out_dir=<dir>        # continue a run
    torchrun --nproc_per_node=2 tools/train.py ...                     # data parallel
    python tools/train.py -m model=mega,tcnca task=mqar                # a Hydra sweep

Arguments are Hydra overrides of conf/config.yaml.
"""
import os
import sys

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from seqmix import SeqmixError
from seqmix.experiment import build_experiment
from seqmix.reporting import print_summary, sample_text
from seqmix.training import pick_device, train


def _init_distributed() -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group(backend)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(config: DictConfig) -> float:
    # Each job of a sweep gets its own directory; a single run uses train.out_dir as it is.
    with open_dict(config):
        config.train.out_dir = HydraConfig.get().runtime.output_dir
    _init_distributed()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    try:
        experiment = build_experiment(config)
        choices = HydraConfig.get().runtime.choices
        record = {
            "preset": {"model": choices.get("model"), "task": choices.get("task")},
            "model": experiment.model_config,
            "task": experiment.task_config,
        }
        compiled = None
        if experiment.train.compile:
            from seqmix.compile import compile_model

            device = pick_device(experiment.train.device)
            compiled = compile_model(experiment.model.to(device), backend=experiment.train.compile)
        result = train(experiment.model, experiment.task, experiment.train, record, forward_module=compiled)
    except SeqmixError as error:
        print(f"train: error: {error}", file=sys.stderr)
        sys.exit(2)
    if rank == 0:
        print_summary(experiment, result)
        sample = sample_text(experiment.model, experiment.task)
        if sample is not None:
            print(f"\nsample (temperature 0.8, top-k 40) after the prompt {sample[0]!r}:\n{sample[0]}{sample[1]}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    metric = experiment.task.metric
    return result.final_eval.get(metric, result.final_eval["loss"])


if __name__ == "__main__":
    main()
