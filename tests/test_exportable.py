"""Exportable by construction: every mixer's default path goes through torch.export with a
dynamic batch and length, and its step graph with state in and state out.

The exporters of ``export/`` build on exactly this; here the exported programs are run by
torch at shapes other than the traced ones and compared with eager.
"""
from __future__ import annotations

import pytest
import torch
from torch.export import Dim, export

import seqmix
from seqmix.export.graphs import size_oblivious
from mixer_cases import WIDTH

# Lengths are declared a multiple of the largest default chunk, so chunked paths need no
# padding inside the graph (padding there made export guard on the symbolic length).
LENGTH_UNIT = 128
CASES = [(name, {}) for name in seqmix.list_mixers()] + [
    ("ema", {"causal": False}),
    ("softmax_attention", {"causal": False}),
    ("gated_attention", {"causal": False}),
    ("gated_attention", {"normalized": True, "heads": 2}),
]


class Stepper(torch.nn.Module):
    """The step graph: (x (B, T, D), state) -> (y, new state)."""

    def __init__(self, mixer):
        super().__init__()
        self.mixer = mixer

    def forward(self, x, state):
        return self.mixer.step(x, state)


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}{o or ''}" for n, o in CASES])
def test_parallel_graph_exports_with_dynamic_batch_and_length(name, options):
    torch.manual_seed(0)
    mixer = seqmix.build_mixer(name, WIDTH, **options).eval()
    example = torch.randn(2, 2 * LENGTH_UNIT, WIDTH)
    shapes = ({0: Dim("batch", min=1, max=64), 1: LENGTH_UNIT * Dim("units", min=1, max=64)},)
    with size_oblivious():
        program = export(mixer, (example,), dynamic_shapes=shapes)
    with torch.no_grad():
        for batch, length in [(1, LENGTH_UNIT), (3, 3 * LENGTH_UNIT), (2, 8 * LENGTH_UNIT)]:
            x = torch.randn(batch, length, WIDTH)
            torch.testing.assert_close(program.module()(x), mixer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, options", [c for c in CASES if seqmix.build_mixer(c[0], WIDTH, **c[1]).causal], ids=str)
def test_step_graph_exports_with_state_in_and_out(name, options):
    torch.manual_seed(0)
    mixer = seqmix.build_mixer(name, WIDTH, **options).eval()
    program = export(Stepper(mixer), (torch.randn(2, 1, WIDTH), mixer.init_state(2)))
    exported_state, eager_state = mixer.init_state(2), mixer.init_state(2)
    with torch.no_grad():
        for _ in range(6):
            x = torch.randn(2, 1, WIDTH)
            y_exported, exported_state = program.module()(x, exported_state)
            y_eager, eager_state = mixer.step(x, eager_state)
            torch.testing.assert_close(y_exported, y_eager, rtol=1e-5, atol=1e-5)
