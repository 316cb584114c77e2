"""One parity harness over every registered mixer and compute path (see mixer_cases.py).

- fast paths equal the reference: outputs, final state, gradients of x and every parameter;
- one forward equals step fed in random piece sizes (T = 1 included);
- lengths that do not divide the chunk size; padding never changes unpadded outputs;
- causality; bf16 autocast stays finite and near fp32.
"""
from __future__ import annotations

import re

import pytest
import torch
from torch.utils._pytree import tree_flatten

from mixer_cases import WIDTH, build, causal_cases, fast_impl_cases, impl_cases, mixer_cases

LENGTHS = (1, 7, 63, 130)
# Stated tolerances: float64 must agree to rounding; float32 to what reordered sums allow.
TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-4)}
GRAD_TOLERANCE = {torch.float64: dict(rtol=1e-8, atol=1e-9), torch.float32: dict(rtol=2e-3, atol=2e-3)}
BF16_RELATIVE_ERROR = 0.05


def ids(cases):
    return [case[0] for case in cases]


def _inputs(length: int, dtype, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, WIDTH, generator=generator, dtype=dtype)


def _random_pieces(length: int, seed: int) -> list[int]:
    """Piece sizes summing to length: a 1 first, then random sizes up to 40."""
    generator = torch.Generator().manual_seed(seed)
    pieces, left = [], length
    while left:
        size = 1 if not pieces else int(torch.randint(1, 41, (1,), generator=generator))
        pieces.append(min(size, left))
        left -= pieces[-1]
    return pieces


def _run(mixer, x: torch.Tensor, padding_mask=None):
    """Outputs, final state (None when bidirectional) and gradients of x and every parameter."""
    mixer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = mixer(x, padding_mask)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    (y * weights).sum().backward()
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in mixer.named_parameters() if p.grad is not None})
    state = None
    if mixer.causal:
        with torch.no_grad():
            _, state = mixer.step(x.detach(), mixer.init_state(x.shape[0]))
    return y.detach(), state, grads


# float64 at every length; float32 (looser, stated tolerance) at the longest only.
PRECISIONS = [(length, torch.float64) for length in LENGTHS] + [(LENGTHS[-1], torch.float32)]


@pytest.mark.parametrize("length, dtype", PRECISIONS, ids=[f"{n}-{str(d)[6:]}" for n, d in PRECISIONS])
@pytest.mark.parametrize("case", fast_impl_cases(), ids=ids(fast_impl_cases()))
def test_fast_path_matches_reference(case, length, dtype):
    _, name, options, impl = case
    mixer = build(name, options, dtype=dtype)
    reference_impl = type(mixer).impls[0]
    x = _inputs(length, dtype)
    mixer.impl = reference_impl
    y_ref, state_ref, grads_ref = _run(mixer, x)
    mixer.impl = impl
    y, state, grads = _run(mixer, x)
    torch.testing.assert_close(y, y_ref, **TOLERANCE[dtype])
    if state_ref is not None:
        for got, want in zip(tree_flatten(state)[0], tree_flatten(state_ref)[0]):
            torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    assert grads.keys() == grads_ref.keys()
    for key in grads_ref:
        torch.testing.assert_close(grads[key], grads_ref[key], **GRAD_TOLERANCE[dtype], msg=lambda m: f"gradient of {key}: {m}")


@pytest.mark.parametrize("length", [7, 130])
@pytest.mark.parametrize("case", impl_cases(causal_cases()), ids=ids(impl_cases(causal_cases())))
def test_step_in_pieces_matches_forward(case, length):
    _, name, options, impl = case
    mixer = build(name, options, dtype=torch.float64, seed=2)
    mixer.impl = impl
    x = _inputs(length, torch.float64, seed=3)
    with torch.no_grad():
        y_full = mixer(x)
        state = mixer.init_state(x.shape[0])
        outputs, start = [], 0
        for size in _random_pieces(length, seed=length):
            y_piece, state = mixer.step(x[:, start : start + size], state)
            outputs.append(y_piece)
            start += size
        _, state_whole = mixer.step(x, mixer.init_state(x.shape[0]))
    torch.testing.assert_close(torch.cat(outputs, dim=1), y_full, **TOLERANCE[torch.float64])
    for got, want in zip(tree_flatten(state)[0], tree_flatten(state_whole)[0]):
        torch.testing.assert_close(got, want, **TOLERANCE[torch.float64])


@pytest.mark.parametrize("case", impl_cases(mixer_cases()), ids=ids(impl_cases(mixer_cases())))
def test_padding_never_changes_unpadded_outputs(case):
    _, name, options, impl = case
    mixer = build(name, options, dtype=torch.float64)
    mixer.impl = impl
    length = 63
    x = _inputs(length, torch.float64, batch=3)
    generator = torch.Generator().manual_seed(5)
    mask = torch.rand(3, length, generator=generator) < 0.3
    mask[2, 40:] = True  # one row right-padded: must equal the truncated sequence
    other = torch.where(mask.unsqueeze(-1), 100.0 * _inputs(length, torch.float64, batch=3, seed=9), x)
    with torch.no_grad():
        y = mixer(x, mask)
        y_other = mixer(other, mask)
        keep = ~mask
        torch.testing.assert_close(y[keep], y_other[keep], **TOLERANCE[torch.float64])
        assert torch.isfinite(y).all()
        right_padded = torch.zeros(1, length, dtype=torch.bool)
        right_padded[0, 40:] = True
        truncated = mixer(x[2:3, :40])
        torch.testing.assert_close(mixer(x[2:3], right_padded)[:, :40], truncated, **TOLERANCE[torch.float64])


@pytest.mark.parametrize("case", impl_cases(causal_cases()), ids=ids(impl_cases(causal_cases())))
def test_causality(case):
    _, name, options, impl = case
    mixer = build(name, options, dtype=torch.float64)
    mixer.impl = impl
    x = _inputs(130, torch.float64)
    with torch.no_grad():
        y = mixer(x)
        for t in (0, 1, 64, 129):
            changed = x.clone()
            changed[:, t] += 3.0
            y_changed = mixer(changed)
            torch.testing.assert_close(y_changed[:, :t], y[:, :t], rtol=0, atol=1e-12)
            assert (y_changed[:, t] - y[:, t]).abs().max() > 0, "changing x_t must change y_t"


def assert_bf16_autocast_is_finite_and_close(mixer, x: torch.Tensor) -> None:
    """Under bf16 autocast on x's device, forward (and step, when causal) stay finite, and forward
    stays within BF16_RELATIVE_ERROR of float32 (relative L2)."""
    with torch.no_grad():
        y32 = mixer(x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            y16 = mixer(x)
            if mixer.causal:
                y_step, _ = mixer.step(x, mixer.init_state(x.shape[0]))
                assert torch.isfinite(y_step).all()
    assert torch.isfinite(y16).all()
    error = (y16.float() - y32).norm() / y32.norm()
    assert error < BF16_RELATIVE_ERROR, f"bf16 relative error {error:.4f} >= {BF16_RELATIVE_ERROR}"


@pytest.mark.parametrize("case", mixer_cases(), ids=ids(mixer_cases()))
def test_bf16_autocast_is_finite_and_close(case):
    _, name, options = case
    assert_bf16_autocast_is_finite_and_close(build(name, options), _inputs(130, torch.float32))


def _second_derivatives(mixer, x: torch.Tensor) -> dict | str:
    """d/dθ of |dL/dx|² for x and every parameter (L a fixed weighting of the outputs), or the
    SeqmixError's message where the path takes first derivatives only."""
    from seqmix import SeqmixError

    x = x.clone().requires_grad_(True)
    y = mixer(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    try:
        (grad_x,) = torch.autograd.grad((y * weights).sum(), x, create_graph=True)
    except SeqmixError as error:
        return str(error)
    inputs = {"x": x, **dict(mixer.named_parameters())}
    try:
        found = torch.autograd.grad(grad_x.pow(2).sum(), list(inputs.values()), allow_unused=True)
    except RuntimeError as error:  # torch's own kernels without one: sdpa's CPU flash attention
        assert "derivative for" in str(error) and "is not implemented" in str(error), error
        return str(error)
    return {name: value for name, value in zip(inputs, found) if value is not None}


@pytest.mark.parametrize("case", fast_impl_cases(), ids=ids(fast_impl_cases()))
def test_a_fast_path_gives_the_references_second_derivatives_or_refuses_them_by_name(case):
    """The hand-written backward passes (torch's once_differentiable) gave second derivatives that
    were missing or wrong, silently: create_graph=True through them now raises, naming the paths
    that take one, and those give the reference's."""
    _, name, options, impl = case
    mixer = build(name, options, dtype=torch.float64)
    x = _inputs(7, torch.float64)
    reference = _second_derivatives(mixer, x)
    mixer.impl = impl
    fast = _second_derivatives(mixer, x)
    if isinstance(fast, str) and "is not implemented" in fast:
        return
    if isinstance(fast, str):
        assert re.search(r"takes first derivatives only.*build the mixer with impl=", fast), fast
        named = re.findall(r"impl='(\w+)'", fast.split("build the mixer with")[1])
        assert impl not in named and named, fast
        return
    if isinstance(reference, str):  # the reference runs a first-order part (a local mixer's path) as well
        assert "takes first derivatives only" in reference
        return
    assert fast.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(fast[key], reference[key], **GRAD_TOLERANCE[torch.float64], msg=lambda m: f"{key}: {m}")
