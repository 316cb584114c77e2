"""Layers of a model: a token mixer and a feed-forward network joined by a residual rule.

Residual rules, for input x (B, L, D):

    pre:     h = x + mixer(norm1(x));   out = h + ffn(norm2(h))        (GPT-2, standalone EMA/TCN)
    post:    h = norm1(x + mixer(x));   out = norm2(h + ffn(h))        (original Transformer)
    gated:   h = mixer(x);              out = h + ffn(norm2(h))        (Mega: the gated residual
                                                                         x + u ⊙ (h − x) is inside the mixer)
    two_hop: h = mixer(x);              out = x + ffn(norm2(h))        (Megalodon: the FFN's residual
                                                                         is the block input, not h)
    auto:    gated for a mixer with its own residual, else pre.

Without an FFN the block returns h.

Activation recomputation (``recompute``): ``none`` keeps every activation for the backward pass;
``mixer`` keeps only the mixer's input and runs the mixer again in the backward pass; ``block``
does so for the whole block, so a block keeps only its input (B, L, D). It is active only in a
training-mode forward with gradients enabled, outside export and tracing; ``step`` never
recomputes. The gradients are those of ``none``: the recomputation replays the random state
(dropout masks) of the forward it repeats.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from seqmix.contract import Mixer, State
from seqmix.errors import INT_LIMIT, SeqmixError, choice_error, one_line, require_bool, require_choice, require_int, kind_of
from seqmix.layers.norms import LayerNorm

RESIDUALS = ("pre", "post", "gated", "two_hop", "auto")
ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}
Recompute = Literal["none", "mixer", "block"]
"""What a block's backward pass recomputes instead of keeping (see the module docstring). Not a plain
``str`` annotation, so that a value of the wrong type reaches ``require_recompute`` and is refused
with the accepted values."""
RECOMPUTE: tuple[str, ...] = get_args(Recompute)


def require_recompute(field: str, value) -> None:
    """Raise unless ``value`` is one of ``RECOMPUTE``; ``field`` names the option in the message."""
    if not isinstance(value, str) or value not in RECOMPUTE:
        raise choice_error(field, value, RECOMPUTE)


def check_part_width(owner: str, part: nn.Module, width: int, keeps_width: bool = True) -> None:
    """Refuse ``part`` (named ``owner``) when it cannot take a (B, L, width) input, or, with
    ``keeps_width``, when its output is not (B, L, width): a factory that built it for another width
    otherwise failed at the model's first call, with torch's shape error naming neither the part nor D.

    The part runs once on zeros of shape (1, 2, width) on its own device, without gradients, on copies
    of its buffers and with the random state restored after, so that building a model is unchanged.
    A part on the meta device is not run: it cannot be called, its real build is checked, and a
    call there dispatches through Python, which doubled the time of describing a model.
    """
    parameters = dict(part.named_parameters(remove_duplicate=False))
    buffers = {name: tensor.clone() for name, tensor in part.named_buffers(remove_duplicate=False)}
    tensors = [*parameters.values(), *buffers.values()]
    device = next((tensor.device for tensor in tensors), torch.device("cpu"))
    dtype = next((tensor.dtype for tensor in tensors if tensor.is_floating_point()), torch.get_default_dtype())
    if device.type == "meta":
        return
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            out = torch.func.functional_call(part, {**parameters, **buffers}, (torch.zeros(1, 2, width, device=device, dtype=dtype),))
    except Exception as error:
        raise SeqmixError(f"{owner} ({type(part).__name__}) does not take inputs of width D={width}: {one_line(error)}; "
                          "build it for D (its factory is called with D)") from None
    if keeps_width and (not isinstance(out, Tensor) or tuple(out.shape) != (1, 2, width)):
        got = tuple(out.shape) if isinstance(out, Tensor) else kind_of(out)
        raise SeqmixError(f"{owner} ({type(part).__name__}) turns a (B, L, {width}) input into {got} for (B, L) = (1, 2); "
                          f"it must give (B, L, {width}): build it for D={width} (its factory is called with D)")


class FeedForward(nn.Module):
    """Position-wise MLP: fc2(act(fc1 x)), or with ``swiglu`` fc2(SiLU(fc1 x) ⊙ fc3 x).

    Args:
        d_model: D.
        hidden: F, the hidden width (default 4·D).
        activation: ``gelu``, ``silu`` or ``relu`` (ignored with swiglu).
        swiglu: gate the hidden layer with a third projection.
        bias: biases on the projections.
    """

    def __init__(self, d_model: int, hidden: int | None = None, activation: str = "gelu", swiglu: bool = False, bias: bool = True):
        super().__init__()
        require_bool("ffn", "swiglu", swiglu)
        require_bool("ffn", "bias", bias)
        require_choice("ffn.activation", activation, ACTIVATIONS)
        require_int("ffn", "d_model", d_model, meaning="D")
        hidden = 4 * d_model if hidden is None else hidden
        if not isinstance(hidden, int) or isinstance(hidden, bool) or not 1 <= hidden <= INT_LIMIT:
            raise SeqmixError(f"ffn: hidden={hidden!r} is not valid; expected a positive integer (at most 2**63 - 1)")
        self.activation = activation
        self.fc1 = nn.Linear(d_model, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, d_model, bias=bias)
        self.fc3 = nn.Linear(d_model, hidden, bias=bias) if swiglu else None

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, L, D)."""
        if self.fc3 is not None:
            return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


class Block(nn.Module):
    """One layer: mixer + optional FFN + norms + a residual rule (see the module docstring).

    Args:
        d_model: D.
        mixer: the token mixer, built for width D.
        ffn: the feed-forward network, or None for a mixer-only block.
        norm: factory of the block's norms, called with D.
        residual: one of ``RESIDUALS``.
        recompute: one of ``RECOMPUTE``: what the backward pass recomputes instead of keeping
            (see the module docstring).
    """

    def __init__(
        self,
        d_model: int,
        mixer: Mixer,
        ffn: nn.Module | None = None,
        norm: Callable[[int], nn.Module] = LayerNorm,
        residual: str = "auto",
        recompute: Recompute = "none",
    ):
        super().__init__()
        require_choice("block.residual", residual, RESIDUALS)
        require_recompute("block.recompute", recompute)
        if not isinstance(mixer, Mixer):
            raise SeqmixError(f"block: mixer must be a seqmix Mixer, got {kind_of(mixer)}")
        if not callable(norm):
            raise SeqmixError(f"block: norm={norm!r} is not valid; expected a factory taking D (a class or function)")
        if ffn is not None and not isinstance(ffn, nn.Module):
            raise SeqmixError(f"block: ffn must be a torch.nn.Module or None, got {kind_of(ffn)}")
        if mixer.d_model != d_model:
            raise SeqmixError(f"block: the mixer has d_model={mixer.d_model} but the block has d_model={d_model}")
        owns_residual = mixer.includes_residual
        if residual == "auto":
            residual = "gated" if owns_residual else "pre"
        if residual in ("gated", "two_hop") and not owns_residual:
            raise SeqmixError(
                f"block: residual={residual!r} needs a mixer that adds its own residual (gated_attention); "
                f"{type(mixer).__name__} does not, so use residual='pre' or 'post'"
            )
        if residual in ("pre", "post") and owns_residual:
            raise SeqmixError(
                f"block: {type(mixer).__name__} already adds its own residual, so residual={residual!r} would add "
                "it twice; use residual='gated' (Mega) or 'two_hop' (Megalodon)"
            )
        if residual == "two_hop" and ffn is None:
            raise SeqmixError("block: residual='two_hop' joins the mixer and the FFN; it needs an ffn")
        self.d_model = d_model
        self.residual = residual
        self.recompute = recompute
        self.mixer = mixer
        self.ffn = ffn
        self.norm1 = norm(d_model) if residual in ("pre", "post") else None
        self.norm2 = norm(d_model) if ffn is not None else None
        norm_part = self.norm1 if self.norm1 is not None else self.norm2
        if norm_part is not None and not isinstance(norm_part, nn.Module):
            raise SeqmixError(f"block: norm={norm!r} built {kind_of(norm_part)}, not a torch.nn.Module")
        for name, part in (("ffn", ffn), ("norm", norm_part)):
            if part is not None:
                check_part_width(f"block: the {name}", part, d_model)

    @property
    def causal(self) -> bool:
        return self.mixer.causal

    def _finish(self, x: Tensor, h: Tensor) -> Tensor:
        """The FFN half, given the block input x and the mixer half's output h (B, T, D)."""
        if self.ffn is None:
            return h
        if self.residual == "post":
            return self.norm2(h + self.ffn(h))
        base = x if self.residual == "two_hop" else h
        return base + self.ffn(self.norm2(h))

    def _recomputes(self, part: str) -> bool:
        """True when this forward should recompute ``part`` (``mixer`` or ``block``) in the backward pass."""
        if self.recompute != part or not (self.training and torch.is_grad_enabled()):
            return False
        # An exported or traced graph is an inference graph: a checkpoint there would only add a
        # higher-order op that exporters and runtimes do not need. torch.compile traces it.
        return not (torch.compiler.is_exporting() or torch.jit.is_tracing())

    def _mix(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        """The mixer on x (B, L, D), recomputed in the backward pass under ``recompute=mixer``."""
        if self._recomputes("mixer"):
            # Non-reentrant: works under torch.compile and DDP, and with inputs that need no
            # gradient. It saves and restores the RNG state (the default), so dropout replays its mask.
            return checkpoint(self.mixer, x, padding_mask, use_reentrant=False)
        return self.mixer(x, padding_mask)

    def _forward(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        if self.residual == "pre":
            h = x + self._mix(self.norm1(x), padding_mask)
        elif self.residual == "post":
            h = self.norm1(x + self._mix(x, padding_mask))
        else:
            h = self._mix(x, padding_mask)
        return self._finish(x, h)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """(B, L, D) -> (B, L, D); padding_mask (B, L) bool, True at padding."""
        if self._recomputes("block"):
            return checkpoint(self._forward, x, padding_mask, use_reentrant=False)
        return self._forward(x, padding_mask)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        """The mixer's streaming state (norms and FFN are position-wise and hold none)."""
        return self.mixer.init_state(batch_size, device, dtype)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """Continue a stream by x (B, T, D); outputs equal ``forward`` over the whole stream."""
        if self.residual == "pre":
            y, state = self.mixer.step(self.norm1(x), state)
            h = x + y
        elif self.residual == "post":
            y, state = self.mixer.step(x, state)
            h = self.norm1(x + y)
        else:
            h, state = self.mixer.step(x, state)
        return self._finish(x, h), state
