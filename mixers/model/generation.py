"""Sampling text from a causal model through its streaming ``step``: constant memory per token."""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from seqmix.errors import SeqmixError, require_int, require_module, kind_of


def stream_tokens(
    model,
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Sampled tokens one at a time, after feeding ``prompt`` through ``model.step``.

    The arguments are checked when this is called, before any token is asked for: a caller that
    prints as it streams prints nothing for a bad argument.

    Args:
        model: a causal ``SequenceModel`` with a language-model head.
        prompt: (B, P) token ids, P >= 1.
        max_new_tokens: how many tokens to sample, >= 0. The prompt and all of them but the last (which
            is sampled, never fed back) must fit ``model.token_limit``, else they are refused up front.
        temperature: 0 picks the argmax (greedy); higher values flatten the distribution. Finite.
        top_k: sample only among the k most likely tokens (None: all).
        generator: for reproducible sampling.
    Returns:
        an iterator of (B,) token ids.
    """
    if not isinstance(prompt, Tensor):
        raise SeqmixError(f"generate: the prompt must be a (B, P) tensor of token ids, got {kind_of(prompt)}")
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise SeqmixError(f"generate: the prompt must be (B, P) token ids with P >= 1, got shape {tuple(prompt.shape)}")
    require_int("generate", "max_new_tokens", max_new_tokens, 0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not _finite(temperature) \
            or temperature < 0:
        raise SeqmixError(f"generate: temperature={temperature!r} must be a finite number >= 0")
    temperature = float(temperature)  # an int as large as 2**64 would not convert when the logits are divided
    if top_k is not None:
        require_int("generate", "top_k", top_k, 1, "or None for no cut-off")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise SeqmixError(f"generate: generator={generator!r} is not valid; expected a torch.Generator or None")
    require_module("generate: model", model)
    limit = getattr(model, "token_limit", None)
    # The prompt and every sampled token but the last go through the model.
    if limit is not None and prompt.shape[1] + max_new_tokens - 1 > limit:
        raise SeqmixError(
            f"generate: a prompt of {prompt.shape[1]} tokens and {max_new_tokens} new ones are more than one stream "
            f"of this model takes ({limit} tokens: its learned positions or attention cache); "
            + (f"ask for at most {limit - prompt.shape[1] + 1} tokens" if prompt.shape[1] <= limit else "shorten the prompt")
        )
    return _sampled_tokens(model, prompt, max_new_tokens, temperature, top_k, generator)


PROMPT_PIECE = 512
"""Tokens of the prompt the model steps through per call: memory stays that of a piece, whatever the prompt."""


def _finite(number: int | float) -> bool:
    """Whether ``number`` is a finite float, or an int that converts to one."""
    try:
        return math.isfinite(float(number))
    except OverflowError:
        return False


@torch.no_grad()
def _sampled_tokens(model, prompt: Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
                    generator: torch.Generator | None) -> Iterator[Tensor]:
    """``stream_tokens``'s loop, on checked arguments, in eval mode: the model's own mode comes back
    when the stream ends or is closed (sampling in the middle of training left it in eval mode)."""
    was_training = model.training
    model.eval()
    try:
        yield from _sampling_loop(model, prompt, max_new_tokens, temperature, top_k, generator)
    finally:
        model.train(was_training)


def _sampling_loop(model, prompt: Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
                   generator: torch.Generator | None) -> Iterator[Tensor]:
    state = model.init_state(prompt.shape[0])
    # In pieces, as any split gives the same logits: one step over a long prompt built attention
    # scores of (T, T + cache) at once, quadratic in T (a 100,000-byte prompt took 16 GB).
    for piece in prompt.split(PROMPT_PIECE, dim=1):
        logits, state = model.step(piece, state)
    for index in range(max_new_tokens):
        last = logits[:, -1].double()
        if not torch.isfinite(last).all():
            # The sampler's own error was "probability tensor contains either inf, nan or element < 0",
            # and the argmax of NaN a token all the same.
            raise SeqmixError(f"generate: the model's logits for new token {index} are not all finite; its weights "
                              "or its state hold NaN or infinity")
        if temperature == 0:
            token = last.argmax(-1)
        else:
            # Shifted so that the largest is 0 before the division: a temperature so small that a
            # logit over it overflows (1e-45) gave inf - inf = NaN, and torch.multinomial's error;
            # this way the others go to -inf and the sample is the argmax, the limit it tends to.
            last = (last - last.max(dim=-1, keepdim=True).values) / temperature
            if top_k is not None:
                kth = torch.topk(last, min(top_k, last.shape[-1]), dim=-1).values[:, -1:]
                last = last.masked_fill(last < kth, float("-inf"))
            token = torch.multinomial(torch.softmax(last, dim=-1), 1, generator=generator).squeeze(-1)
        yield token
        if index + 1 < max_new_tokens:
            logits, state = model.step(token.unsqueeze(1), state)


def generate(model, prompt: Tensor, max_new_tokens: int, **sampling) -> Tensor:
    """The prompt followed by ``max_new_tokens`` sampled tokens -> (B, P + max_new_tokens)."""
    new = list(stream_tokens(model, prompt, max_new_tokens, **sampling))
    return torch.cat([prompt, torch.stack(new, dim=1)], dim=1) if new else prompt
