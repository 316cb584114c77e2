"""What the command-line tools print after a run: a summary table and a generated sample."""
from __future__ import annotations

import torch

from .generation import generate


def print_summary(experiment, result) -> None:
    """A short table: model, task, steps, time, throughput, final validation metrics, checkpoint."""
    model = experiment.model
    parameters = sum(p.numel() for p in model.parameters())
    rows = [
        ("task", type(experiment.task).name),
        ("model", f"{len(model.blocks)} layers, d_model={model.d_model}, {parameters:,} parameters"),
        ("steps", f"{result.steps:,} in {result.seconds:.0f} s ({result.tokens_per_s:,.0f} tokens/s)"),
    ]
    rows += [(f"valid {name}", f"{value:.4f}") for name, value in result.final_eval.items()]
    rows.append(("checkpoint", str(result.checkpoint)))
    width = max(len(name) for name, _ in rows)
    print("\n" + "\n".join(f"{name:<{width}}  {value}" for name, value in rows))


def sample_text(model, task, prompt: str = "def ", length: int = 200, seed: int = 0) -> tuple[str, str] | None:
    """(prompt, continuation) sampled through ``step`` for causal byte-level models, else None."""
    if not model.causal or task.head != "causal_lm" or task.vocab_size != 256:
        return None
    tokens = torch.tensor([list(prompt.encode())], device=next(model.parameters()).device)
    generator = torch.Generator(device=tokens.device).manual_seed(seed)
    out = generate(model, tokens, length, temperature=0.8, top_k=40, generator=generator)
    return prompt, bytes(out[0, tokens.shape[1] :].tolist()).decode("utf-8", errors="replace")
