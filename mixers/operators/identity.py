"""The identity mixer: y = x. A placeholder local mixer for gated attention, and a baseline."""
from __future__ import annotations

from torch import Tensor

from seqmix.contract import Mixer, Stages
from seqmix.registry import register_mixer


@register_mixer("identity")
class Identity(Mixer):
    """Returns its input unchanged; its streaming state is empty.

    Args:
        d_model: D.
        causal: whether it may be used as a causal mixer (it is both).
    """

    def __init__(self, d_model: int, causal: bool = True, impl: str | None = None):
        super().__init__(d_model, causal=causal, impl=impl)

    @property
    def receptive_field(self) -> int:
        return 1

    def stages(self, batch_size: int, length: int, pass_: str) -> Stages:
        """Nothing: the output is the input tensor itself, neither computed nor copied."""
        return Stages()

    def mix(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        return x

    def mix_step(self, x: Tensor, state: tuple) -> tuple[Tensor, tuple]:
        return x, state

    def empty_state(self, batch_size: int, device, dtype) -> tuple:
        return ()
