"""The chunked recurrence's eager path: the same function as the reference loop, and a cost per chunk that stays flat.

``recurrence.chunked`` carries the state across chunks with one fused multiply-add per chunk on
contiguous states inside one autograd node, folds the skip term ω·x into the Toeplitz diagonal and
applies the SiLU on the way out. These tests hold it, and the traced path beside it, to the literal loop (``recurrence.recurrent``
followed by the same skip and SiLU) on outputs, final state and every gradient, and hold its graph
to a size that does not grow with the number of chunks.
"""
from __future__ import annotations

import contextlib
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from seqmix.operators import recurrence


def _coefficients(width: int, order: int, complex_: bool, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Leaf tensors (float64, requiring grad) from which ``Coefficients`` are built, decays in (0.5, 1)."""
    def draw(*shape, low=-1.0, high=1.0):
        return (low + (high - low) * torch.rand(*shape, generator=generator, dtype=torch.float64)).requires_grad_(True)

    leaves = {"log_r": draw(width, order, low=math.log(0.5), high=-1e-3), "b": draw(width, order), "c_re": draw(width, order)}
    if complex_:
        leaves.update(phase=draw(width, order, low=-math.pi, high=math.pi), c_im=draw(width, order))
    return leaves


def _build(leaves: dict[str, torch.Tensor]) -> recurrence.Coefficients:
    return recurrence.Coefficients(log_r=leaves["log_r"], phase=leaves.get("phase"), b=leaves["b"], c=(leaves["c_re"], leaves.get("c_im")))


def _reference(x, coef, h0, skip, silu):
    y, h = recurrence.recurrent(x, coef, h0)
    if skip is not None:
        y = y + skip * x
    return (F.silu(y) if silu else y), h


@settings(max_examples=60, deadline=None)
@given(
    complex_=st.booleans(), batch=st.integers(1, 3), chunk=st.integers(1, 9), chunks=st.integers(1, 12),
    short_by=st.integers(0, 8), order=st.integers(1, 4), with_state=st.booleans(), with_skip=st.booleans(),
    silu=st.booleans(), seed=st.integers(0, 2**16), slab_bytes=st.sampled_from([1, 40, 1000, recurrence.TRANSPOSE_SLAB_BYTES]),
    threads=st.sampled_from([1, 2]),
)
def test_chunked_equals_the_loop_with_its_state_and_every_gradient(complex_, batch, chunk, chunks, short_by, order, with_state,
                                                                    with_skip, silu, seed, slab_bytes, threads):
    """Any chunk size (odd ones too), a last chunk cut short, a start state, the skip and the SiLU: float64 to rounding.

    The transposing copies run in slabs of ``slab_bytes``: one row at a time, slabs that do not divide
    the rows, or the whole tensor at once. On one thread the products write their strided targets
    directly, on two through buffers of their own (``_product_into``)."""
    def fast(x, coef, h0, skip, silu):
        return recurrence.chunked(x, coef, h0, chunk_size=chunk, skip=skip, silu=silu)

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with mock.patch.object(recurrence, "TRANSPOSE_SLAB_BYTES", slab_bytes):
            assert_equals_the_loop(fast, complex_, batch, 3, order, max(1, chunks * chunk - short_by % chunk), with_state,
                                   with_skip, silu, seed, rtol=1e-9, grad_rtol=1e-8)
    finally:
        torch.set_num_threads(previous)


def assert_equals_the_loop(path, complex_: bool, batch: int, width: int, order: int, length: int, with_state: bool,
                           with_skip: bool, silu: bool, seed: int, rtol: float, grad_rtol: float) -> None:
    """``path(x, coef, h0, skip, silu)`` against the literal loop in float64 on drawn coefficients, x
    (B, L, D), a start state and a skip (when asked): outputs and final state to ``rtol``, and the
    gradients of x, every coefficient, the skip and the start state to ``grad_rtol``, through a loss
    that weighs the outputs and the final state (absolute tolerances a tenth of each)."""
    generator = torch.Generator().manual_seed(seed)
    leaves = _coefficients(width, order, complex_, generator)
    x = torch.randn(batch, length, width, generator=generator, dtype=torch.float64, requires_grad=True)
    h0 = None
    if with_state:
        h0 = tuple(torch.randn(batch, width, order, generator=generator, dtype=torch.float64, requires_grad=True)
                   for _ in range(2 if complex_ else 1))
        h0 = h0 if complex_ else (h0[0], None)
    skip = torch.randn(width, generator=generator, dtype=torch.float64, requires_grad=True) if with_skip else None
    weights_y = torch.randn(batch, length, width, generator=generator, dtype=torch.float64)
    weights_h = torch.randn(batch, width, order, generator=generator, dtype=torch.float64)
    inputs = [x, *leaves.values(), *([skip] if skip is not None else []), *([t for t in h0 if t is not None] if h0 else [])]

    def loss_and_grads(run):
        y, h = run(x, _build(leaves), h0, skip, silu)
        loss = (y * weights_y).sum() + (h[0] * weights_h).sum() + (0 if h[1] is None else (h[1] * weights_h.flip(-1)).sum())
        return y.detach(), tuple(part.detach() for part in h if part is not None), torch.autograd.grad(loss, inputs)

    y, h, grads = loss_and_grads(path)
    y_ref, h_ref, grads_ref = loss_and_grads(_reference)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=rtol / 10)
    torch.testing.assert_close(h, h_ref, rtol=rtol, atol=rtol / 10)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=grad_rtol, atol=grad_rtol / 10)


@settings(max_examples=30, deadline=None)
@given(complex_=st.booleans(), chunk=st.integers(1, 9), chunks=st.integers(1, 5), short_by=st.integers(0, 8),
       unrolled=st.booleans(), seed=st.integers(0, 2**16))
def test_the_traced_path_equals_the_loop_for_lengths_that_divide_into_chunks_and_lengths_that_do_not(complex_, chunk, chunks,
                                                                                                  short_by, unrolled, seed):
    """``_chunked_traced``, what torch.compile, ONNX and ExecuTorch trace, run eagerly at fixed lengths: a length that
    divides into chunks skips the padding and the end state's rebuild, one that does not takes both."""
    width, order, batch = 3, 2, 2
    length = max(1, chunks * chunk - short_by % chunk)
    generator = torch.Generator().manual_seed(seed)
    leaves = _coefficients(width, order, complex_, generator)
    x = torch.randn(batch, length, width, generator=generator, dtype=torch.float64, requires_grad=True)
    h0 = tuple(torch.randn(batch, width, order, generator=generator, dtype=torch.float64) for _ in range(2))
    h0 = h0 if complex_ else (h0[0], None)
    with recurrence.unrolled_chunks() if unrolled else contextlib.nullcontext():
        y, h = recurrence._chunked_traced(x, _build(leaves), h0, chunk, call_is_chunk=False)
    y_ref, h_ref = recurrence.recurrent(x, _build(leaves), h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(tuple(p for p in h if p is not None), tuple(p for p in h_ref if p is not None), rtol=1e-9, atol=1e-10)
    grad, = torch.autograd.grad(y.sum(), x)
    grad_ref, = torch.autograd.grad(y_ref.sum(), x)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("size", [1, 2, 5, 64])
def test_the_toeplitz_blocks_hold_the_kernel_at_every_lag_below_the_diagonal_and_zeros_above(size):
    kernel = torch.randn(3, size, dtype=torch.float64)
    blocks = recurrence.lower_toeplitz(kernel)
    assert blocks.shape == (3, size, size)
    for i in range(size):
        for j in range(size):
            expected = kernel[:, i - j] if j <= i else torch.zeros(3, dtype=torch.float64)
            torch.testing.assert_close(blocks[:, i, j], expected, rtol=0, atol=0)


@pytest.mark.parametrize("size", [1, 2, 5, 64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_the_toeplitz_adjoint_is_the_gradient_of_the_block_in_any_memory_layout(size, layout):
    """``_toeplitz_adjoint(G)`` = d/dk of sum(block ⊙ G) for the block as the mix stores it, [j, i] = k[i - j]
    (j <= i), whether G is laid out row-major or transposed: autograd hands a gradient over in the layout it was made in."""
    generator = torch.Generator().manual_seed(size)
    kernel = torch.randn(3, size, generator=generator, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, size, size, generator=generator, dtype=torch.float64)
    expected, = torch.autograd.grad((recurrence.lower_toeplitz(kernel).transpose(1, 2) * grad).sum(), kernel)
    if layout == "transposed":
        grad = grad.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(recurrence._toeplitz_adjoint(grad), expected, rtol=1e-12, atol=1e-12)

def _autograd_nodes(output: torch.Tensor) -> int:
    """Nodes of the backward graph that produces ``output``."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


class _CountOps(TorchDispatchMode):
    """Counts the aten operators run under it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("complex_", [False, True], ids=["ema", "cema"])
def test_the_backward_graph_and_the_operators_per_chunk_stay_flat_as_chunks_are_added(complex_):
    """From 4 to 64 chunks the autograd graph keeps its size (no node per chunk, so no per-chunk
    gradient buffers in the backward), and each added chunk costs at most one operator forward and
    one backward: the carry's multiply-add and its adjoint."""
    generator = torch.Generator().manual_seed(0)
    chunk, width, order = 8, 4, 3
    leaves = _coefficients(width, order, complex_, generator)
    nodes, operators = {}, {}
    for chunks in (4, 64):
        x = torch.randn(2, chunks * chunk, width, generator=generator, dtype=torch.float64, requires_grad=True)
        with _CountOps() as counter:
            y, _ = recurrence.chunked(x, _build(leaves), None, chunk_size=chunk, silu=True)
            nodes[chunks] = _autograd_nodes(y)
            y.sum().backward()
        operators[chunks] = counter.count
    assert nodes[64] == nodes[4]
    assert operators[64] - operators[4] <= 2 * (64 - 4)


@pytest.mark.parametrize("complex_", [False, True], ids=["ema", "cema"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_a_finite_only_call_raises_at_a_non_finite_input_in_any_slab_and_otherwise_equals_the_loop(complex_, value):
    """``finite_only=True`` sums x slab by slab as the path copies it in (here a slab of one chunk):
    a NaN or an infinity in the first, a middle or the last (padded) chunk raises ``NonFiniteInput``; on a finite x the
    output, its SiLU applied in place under no_grad as each slab is copied out, equals the loop's."""
    generator = torch.Generator().manual_seed(3)
    leaves = _coefficients(4, 3, complex_, generator)
    chunk, length = 8, 5 * 8 - 3
    x = torch.randn(2, length, 4, generator=generator, dtype=torch.float64)
    skip = torch.randn(4, generator=generator, dtype=torch.float64)
    with torch.no_grad(), mock.patch.object(recurrence, "TRANSPOSE_SLAB_BYTES", 1):
        coef = _build(leaves)
        y, h = recurrence.chunked(x, coef, None, chunk_size=chunk, skip=skip, silu=True, finite_only=True)
        y_ref, h_ref = _reference(x, coef, None, skip, True)
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(h, h_ref, rtol=1e-9, atol=1e-10)
        for position in (0, 2 * chunk + 3, length - 1):
            bad = x.clone()
            bad[1, position, 2] = value
            with pytest.raises(recurrence.NonFiniteInput):
                recurrence.chunked(bad, coef, None, chunk_size=chunk, skip=skip, silu=True, finite_only=True)
