"""Causality under non-finite inputs: a NaN, an infinity or a huge value at position t never reaches an
output before t, on any compute path, in ``forward`` or in ``step``.

A dense masked product (weights · values, a lower-triangular Toeplitz matrix · inputs, an FFT) puts
0 · NaN = NaN into earlier outputs unless masked-out positions are selected away rather than
multiplied by zero; these properties try every causal registered mixer with every compute path,
and the causal model presets, at generated batch sizes, lengths, positions and values.

The ``fft`` path is exempt from the huge finite value (1e30) only: an FFT's rounding error at every
output is relative to the largest input anywhere in the sequence, so earlier outputs move by about
1e30 · 1e-16. Its NaN and infinities are checked like every other path's.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seqmix
from conftest import causal_presets, examples
from mixer_cases import WIDTH, build, causal_cases, impl_cases, runnable_impls
from conftest import composed_config

VALUES = (math.nan, math.inf, -math.inf, 1e30)
CASES = [case for case in impl_cases(causal_cases()) if case[3] in runnable_impls(case[1])]
TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-4)}


def stream(mixer, x: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """``mixer.step`` over x (B, L, D) in pieces of the given sizes -> (B, L, D)."""
    state, outputs, start = mixer.init_state(x.shape[0]), [], 0
    for size in pieces:
        y, state = mixer.step(x[:, start : start + size], state)
        outputs.append(y)
        start += size
    return torch.cat(outputs, dim=1)


@st.composite
def piece_sizes(draw, length: int) -> list[int]:
    sizes: list[int] = []
    while sum(sizes) < length:
        sizes.append(draw(st.integers(1, length - sum(sizes))))
    return sizes


@st.composite
def poisoned_inputs(draw):
    """(case, dtype, clean x (B, L, D), poisoned x, position t, value, step pieces)."""
    case = draw(st.sampled_from(CASES))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    batch, length = draw(st.integers(1, 2)), draw(st.integers(1, 40))
    t = draw(st.integers(0, length - 1))
    allowed = VALUES if case[3] != "fft" else VALUES[:3]
    value = draw(st.sampled_from(allowed))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(batch, length, WIDTH, generator=generator, dtype=dtype)
    poisoned = x.clone()
    row = draw(st.integers(0, batch - 1))
    channels = draw(st.sampled_from(["one", "all"]))
    if channels == "one":
        poisoned[row, t, draw(st.integers(0, WIDTH - 1))] = value
    else:
        poisoned[row, t] = value
    return case, dtype, x, poisoned, t, value, draw(piece_sizes(length))


@settings(max_examples=examples(120))
@given(drawn=poisoned_inputs())
def test_a_non_finite_or_huge_input_never_reaches_earlier_outputs(drawn):
    (_, name, options, impl), dtype, x, poisoned, t, value, pieces = drawn
    mixer = build(name, options, dtype=dtype)
    mixer.impl = impl
    with torch.no_grad():
        clean = mixer(x)
        y = mixer(poisoned)
        streamed = stream(mixer, poisoned, pieces)
    torch.testing.assert_close(y[:, :t], clean[:, :t], **TOLERANCE[dtype])
    torch.testing.assert_close(streamed[:, :t], y[:, :t], **TOLERANCE[dtype])
    if not math.isfinite(value):
        # Nothing is laundered: the poisoned position itself is non-finite, in forward and in step.
        rows = ~torch.isfinite(poisoned[:, t]).all(-1)
        assert not torch.isfinite(y[rows, t]).all(-1).any()
        assert not torch.isfinite(streamed[rows, t]).all(-1).any()



@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_a_non_finite_input_never_reaches_earlier_outputs_under_torch_compile(case):
    """What Dynamo traces masks like the eager path: a path that tracers cannot see into (the
    native code) runs a traceable one instead, with the same selection of non-finite inputs. A
    NaN in one channel at step 30, an infinity in every channel of the other row at step 21 (past
    the first chunk of the chunk_size=16 cases, inside the one chunk of the default's)."""
    _, name, options, impl = case
    mixer = build(name, options, dtype=torch.float64)
    mixer.impl = impl
    x = torch.randn(2, 40, WIDTH, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    poisoned = x.clone()
    poisoned[0, 30, 1], poisoned[1, 21] = math.nan, math.inf
    torch._dynamo.reset()
    with torch.no_grad():
        clean = mixer(x)
        y = torch.compile(mixer, backend="eager", dynamic=False)(poisoned)
    torch.testing.assert_close(y[0, :30], clean[0, :30], **TOLERANCE[torch.float64])
    torch.testing.assert_close(y[1, :21], clean[1, :21], **TOLERANCE[torch.float64])
    assert not torch.isfinite(y[0, 30]).all() and not torch.isfinite(y[1, 21]).all()


PRESETS = list(causal_presets())


@pytest.mark.parametrize("preset", PRESETS)
@settings(max_examples=examples(2))
@given(length=st.integers(2, 40), data=st.data())
def test_a_non_finite_embedding_never_reaches_earlier_logits_of_a_preset(preset, length, data):
    """A token whose embedding row is NaN or infinite, first seen at t: logits before t are those of a clean model."""
    torch.manual_seed(0)
    model = seqmix.instantiate_model(composed_config([f"model={preset}", "model.tie_embeddings=false"]).model)
    model = model.double().eval()
    t = data.draw(st.integers(1, length - 1))
    value = data.draw(st.sampled_from(VALUES[:3]))
    poison_id = model.vocab_size - 1
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    tokens = torch.randint(0, poison_id, (2, length), generator=generator)
    tokens[0, t] = poison_id
    with torch.no_grad():
        clean = model(tokens)
        model.embed.weight[poison_id] = value
        poisoned = model(tokens)
        state, pieces, start = model.init_state(2), [], 0
        for size in data.draw(piece_sizes(length)):
            logits, state = model.step(tokens[:, start : start + size], state)
            pieces.append(logits)
            start += size
    streamed = torch.cat(pieces, dim=1)
    torch.testing.assert_close(poisoned[0, :t], clean[0, :t], **TOLERANCE[torch.float64])
    torch.testing.assert_close(poisoned[1], clean[1], **TOLERANCE[torch.float64])
    torch.testing.assert_close(streamed[0, :t], poisoned[0, :t], **TOLERANCE[torch.float64])
    assert not torch.isfinite(poisoned[0, t]).all()
