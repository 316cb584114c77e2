"""What ``seqmix train`` prints: the plan before the first step, a summary table and a generated sample after."""
from __future__ import annotations

import os

import torch

from seqmix.model.generation import generate
from seqmix.tokenization import ByteTokenizer
from seqmix.training.loop import learning_rate, pick_device


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _schedule(train) -> str:
    """The learning rate's course: its peak, or, where the warm-up outlasts the run (warmup_steps=100
    for max_steps=4), the highest it reaches and that it never decays, which "lr 0.003" hid."""
    if train.warmup_steps < train.max_steps:
        return f"lr {train.lr:g} after {train.warmup_steps:,} warm-up steps, then cosine decay"
    reached = learning_rate(train, train.max_steps - 1)
    return (f"lr rising to {reached:.3g} only: the warm-up to train.lr={train.lr:g} over "
            f"train.warmup_steps={train.warmup_steps:,} outlasts the run")


def print_plan(experiment, choices: dict) -> None:
    """What is about to run: model, task, training budget, device and threads, and where it goes."""
    model, task, train = experiment.model, experiment.task, experiment.train
    parameters = sum(p.numel() for p in model.parameters())
    rows = [
        ("model", f"{choices.get('model') or 'model'}: {len(model.blocks)} layers, d_model={model.d_model}, "
                  f"{parameters:,} parameters"),
        ("task", f"{choices.get('task') or type(task).name}: sequences of {task.seq_len} tokens, "
                 f"vocabulary {task.vocab_size}, metric {task.metric}"),
        ("train", f"{train.max_steps:,} steps of {train.batch_size} sequences, {_schedule(train)}, "
                  f"evaluated every {train.eval_every} steps"),
        ("device", f"{pick_device(train.device)}, {torch.get_num_threads()} torch thread(s)"
                   + (" (OMP_NUM_THREADS sets it)" if os.environ.get("OMP_NUM_THREADS") else "")),
        ("out_dir", train.out_dir + (" (resuming)" if train.resume else "")),
    ]
    print(_table(rows), flush=True)


def print_summary(experiment, result) -> None:
    """A short table: model, task, steps (those of this process apart), time, throughput, final metrics, checkpoint."""
    model = experiment.model
    parameters = sum(p.numel() for p in model.parameters())
    done_here = result.steps - result.first_step
    resumed = f", {done_here:,} of them in this run after resuming at step {result.first_step:,}" if result.first_step else ""
    rows = [
        ("task", type(experiment.task).name),
        ("model", f"{len(model.blocks)} layers, d_model={model.d_model}, {parameters:,} parameters"),
        ("steps", f"{result.steps:,}{resumed}"),
        ("time", f"{result.seconds:.0f} s for {done_here:,} steps ({result.tokens_per_s:,.0f} tokens/s)"),
    ]
    rows += [(f"valid {name}", f"{value:.4f}") for name, value in result.final_eval.items()]
    rows.append(("checkpoint", str(result.checkpoint)))
    print("\n" + _table(rows))


def sample_text(model, task, prompt: str = "def ", length: int = 200, seed: int = 0) -> tuple[str, str] | None:
    """(prompt, continuation) sampled through ``step`` for causal models of text (the task's tokenizer, or bytes), else None.
    The continuation is ``length`` tokens, or fewer where the model holds fewer (``token_limit``)."""
    tokenizer = getattr(task, "tokenizer", ByteTokenizer() if task.vocab_size == ByteTokenizer.vocab_size else None)
    if not model.causal or task.head != "causal_lm" or tokenizer is None:
        return None
    tokens = torch.tensor([tokenizer.encode(prompt)], device=next(model.parameters()).device)
    limit = getattr(model, "token_limit", None)
    if limit is not None:
        # A stream of this model takes `limit` tokens (learned positions, an attention cache): the sample is cut to fit.
        length = min(length, limit - tokens.shape[1] + 1)
        if length < 1:
            return None
    generator = torch.Generator(device=tokens.device).manual_seed(seed)
    out = generate(model, tokens, length, temperature=0.8, top_k=40, generator=generator)
    return prompt, tokenizer.decode(out[0, tokens.shape[1] :].tolist())
