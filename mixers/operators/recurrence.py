"""Diagonal linear recurrences: the engine under the EMA and CEMA mixers.

Per channel d and order n, with coefficients of shape (D, N):

    h_t = q ⊙ h_{t-1} + b ⊙ x_t          q = r·e^{iφ},  0 < r < 1
    y_t = Re Σ_n c_n h_{t,n}

Complex numbers travel as (real, imaginary) pairs of real tensors, so every path exports to
runtimes without complex dtypes (ONNX, TensorRT, ExecuTorch). A real recurrence (φ = 0 and
Im c = 0) passes ``None`` as the imaginary parts and skips their arithmetic. Powers are
exp(j·log r)·(cos jφ, sin jφ), never cumulative products (ONNX has no CumProd before opset 26
and products lose precision).

Four paths compute the same function of (x, h0):
- ``recurrent``: the literal loop over t; the reference.
- ``fft``: the kernel k[d, j] = Re Σ_n c b q^j for j < L, convolved by FFT at size 2L.
- ``chunked``: inside each chunk of C steps a lower-triangular Toeplitz matmul; across chunks
  the state is carried with q^C. O(L·C) work in plain matmuls, which export everywhere.
- ``native``: the literal loop as C++ (recurrence_native.cpp), vectorised across channels, its
  states in registers, SiLU fused, and its adjoint written out; built on first use with the
  machine's compiler (``seqmix.native``). The fastest eager path on a CPU; exporters and
  compilers take ``chunked`` instead.

``run`` also applies the mixers' output transform SiLU(y + skip ⊙ x) (either part optional). The
chunked path fuses it and runs eagerly as one autograd node (``_ChunkedRecurrence``) that views
its interleaved (real, imaginary) states as complex tensors internally; while tracing it runs
plain real ops (``_chunked_traced``), a scan or an unrolled loop carrying the state.
"""
from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._higher_order_ops import scan

from seqmix import native as native_code
from seqmix.contract import Mixer, Stages, parameter_reads, token_count_is_dynamic, traceable_reshape
from seqmix.errors import SeqmixError
from seqmix.operators import masking
from seqmix.operators.first_order import first_order

_UNROLL_CHUNKS = False


@contextmanager
def unrolled_chunks():
    """Carry the state across chunks with the Python loop even while tracing.

    For ExecuTorch, where a scan would run outside the delegated kernels: the number of chunks is
    then baked into the graph. A graph traced for any token count (``any_token_count``) then treats
    each call as one chunk of T tokens, so its T must stay within ``chunk_size``.
    """
    global _UNROLL_CHUNKS
    previous, _UNROLL_CHUNKS = _UNROLL_CHUNKS, True
    try:
        yield
    finally:
        _UNROLL_CHUNKS = previous


Pair = tuple[Tensor, Tensor | None]
"""A complex tensor as (real part, imaginary part or None when it is zero)."""


def _mul(a: Pair, b: Pair) -> Pair:
    """Complex product of two pairs (broadcasting)."""
    a_re, a_im = a
    b_re, b_im = b
    re = a_re * b_re
    if a_im is not None and b_im is not None:
        re = re - a_im * b_im
    im = None
    if a_im is not None:
        im = a_im * b_re
    if b_im is not None:
        im = a_re * b_im if im is None else im + a_re * b_im
    return re, im


def _add(a: Pair, b: Pair) -> Pair:
    """Complex sum of two pairs."""
    if a[1] is None and b[1] is None:
        return a[0] + b[0], None
    a_im = a[1] if a[1] is not None else torch.zeros_like(a[0])
    b_im = b[1] if b[1] is not None else torch.zeros_like(b[0])
    return a[0] + b[0], a_im + b_im


def _scale(a: Pair, real: Tensor) -> Pair:
    """A complex pair times a real tensor (broadcasting)."""
    return a[0] * real, None if a[1] is None else a[1] * real


def _real_contract(equation: str, real_input: Tensor, pair: Pair) -> Pair:
    """einsum of a real tensor with both parts of a complex pair."""
    re = torch.einsum(equation, real_input, pair[0])
    im = None if pair[1] is None else torch.einsum(equation, real_input, pair[1])
    return re, im


def _real_part_contract(equation: str, a: Pair, b: Pair) -> Tensor:
    """einsum of Re(a·b) where the contraction runs over shared indices."""
    out = torch.einsum(equation, a[0], b[0])
    if a[1] is not None and b[1] is not None:
        out = out - torch.einsum(equation, a[1], b[1])
    return out


@dataclass(frozen=True)
class Coefficients:
    """The recurrence's coefficients, each (D, N).

    Attributes:
        log_r: log |q|, negative.
        phase: φ, the angle of q; None for a real recurrence.
        b: real input weight.
        c: complex output weight as a pair.
    """

    log_r: Tensor
    phase: Tensor | None
    b: Tensor
    c: Pair

    def powers(self, exponents: Tensor) -> Pair:
        """q^j for every j in ``exponents`` (J,) -> (D, N, J) pair."""
        j = exponents.to(self.log_r.dtype)
        magnitude = torch.exp(self.log_r.unsqueeze(-1) * j)
        if self.phase is None:
            return magnitude, None
        angle = self.phase.unsqueeze(-1) * j
        return magnitude * torch.cos(angle), magnitude * torch.sin(angle)

    def q(self) -> Pair:
        """q = exp(log r + i phi) -> (D, N) pair: power(1) without an exponent tensor to build (the
        native path's operands are made at every training step)."""
        magnitude = torch.exp(self.log_r)
        if self.phase is None:
            return magnitude, None
        return magnitude * torch.cos(self.phase), magnitude * torch.sin(self.phase)

    def power(self, exponent: int, device) -> Pair:
        """q^exponent -> (D, N) pair."""
        re, im = self.powers(torch.tensor([exponent], device=device))
        return re[..., 0], None if im is None else im[..., 0]

    def kernel(self, length: int, device) -> Tensor:
        """k[d, j] = Re Σ_n c b q^j for j < length -> (D, length)."""
        q_j = self.powers(torch.arange(length, device=device))
        return _real_part_contract("dn,dnj->dj", _scale(self.c, self.b), q_j)

    def input_weights(self, steps: int, device) -> Pair:
        """b q^{T-1-j} for j < T = steps: how input j reaches the state after T steps -> (D, N, T)."""
        return _scale(self.powers(torch.arange(steps - 1, -1, -1, device=device)), self.b.unsqueeze(-1))

    def output_weights(self, exponents: Tensor) -> Pair:
        """c q^j for every j in ``exponents`` (J,): how the state reaches an output -> (D, N, J)."""
        c_col = (self.c[0].unsqueeze(-1), None if self.c[1] is None else self.c[1].unsqueeze(-1))
        return _mul(c_col, self.powers(exponents))

    def zero_state(self, batch_size: int) -> Pair:
        """h = 0 as a (B, D, N) pair, real-only when the recurrence is real."""
        zeros = self.b.new_zeros(batch_size, *self.b.shape)
        return zeros, None if self.phase is None else torch.zeros_like(zeros)


def _state_output(coef: Coefficients, h0: Pair, length: int, device) -> Tensor:
    """What the initial state adds to the outputs: Re Σ_n c q^{t+1} h0 for t < length -> (B, L, D)."""
    c_q = coef.output_weights(torch.arange(1, length + 1, device=device))
    return _real_part_contract("dnt,bdn->btd", c_q, h0)


def _state_after(coef: Coefficients, h0: Pair, x: Tensor) -> Pair:
    """h_T = q^T h0 + Σ_j b q^{T-1-j} x_j for x (B, T, D) -> (B, D, N) pair."""
    steps = x.shape[1]
    fed = _real_contract("btd,dnt->bdn", x, coef.input_weights(steps, x.device))
    return _add(_mul(coef.power(steps, x.device), h0), fed)


def recurrent(x: Tensor, coef: Coefficients, h0: Pair | None = None) -> tuple[Tensor, Pair]:
    """The literal recurrence, one step at a time (reference path).

    Args:
        x: (B, L, D) inputs.
        coef: coefficients (D, N).
        h0: (B, D, N) pair, the state before x; zero when None.
    Returns:
        y (B, L, D) and the state after the last step.
    """
    h = coef.zero_state(x.shape[0]) if h0 is None else h0
    q = coef.q()
    outputs = []
    for t in range(x.shape[1]):
        fed = (coef.b * x[:, t, :, None], None)  # (B, D, N)
        h = _add(_mul(q, h), fed)
        outputs.append(_real_part_contract("dn,bdn->bd", coef.c, h))
    return torch.stack(outputs, dim=1), h


def kernel_spectrum(coef: Coefficients, length: int, device) -> Tensor:
    """The FFT at size 2L of the length-L kernel -> (D, L + 1) complex: what ``fft`` multiplies by."""
    return torch.fft.rfft(coef.kernel(length, device), n=2 * length)


def fft(x: Tensor, coef: Coefficients, h0: Pair | None = None, spectrum: Tensor | None = None,
        need_state: bool = True) -> tuple[Tensor, Pair | None]:
    """Convolution with the length-L kernel by FFT at size 2L (the reference code's way).

    Same arguments and results as ``recurrent``, plus ``spectrum``: ``kernel_spectrum(coef, L)``
    when the caller holds it already (a mixer in eval mode caches it), else computed here; and
    ``need_state``: False returns None for the final state, whose D·N·L powers cost more than the
    convolution itself when only the outputs are wanted (a forward pass).
    """
    length = x.shape[1]
    x_f = torch.fft.rfft(x.transpose(1, 2), n=2 * length)  # (B, D, L+1)
    k_f = kernel_spectrum(coef, length, x.device) if spectrum is None else spectrum
    y = torch.fft.irfft(x_f * k_f, n=2 * length)[..., :length].transpose(1, 2)  # (B, L, D)
    h = coef.zero_state(x.shape[0]) if h0 is None else h0
    if h0 is not None:
        y = y + _state_output(coef, h0, length, x.device)
    return y, _state_after(coef, h, x) if need_state else None


def _plain_compile() -> bool:
    """Whether torch.compile traces without ``capture_scalar_outputs``, which Inductor's lowering of
    ``scan`` needs on torch 2.13 (``seqmix.compile.compile_model`` sets it): there the chunks are
    carried by the loop, whose graph holds the number of chunks (a new one recompiles), where
    ``torch.compile(mixer)`` failed inside Inductor. ``torch.export`` keeps the scan."""
    return (torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and not torch._dynamo.config.capture_scalar_outputs)


def _carry_across_chunks(q_chunk: Pair, fed: Pair, h0: Pair) -> tuple[Pair, Pair]:
    """State at the start of every chunk while tracing: H_0 = h0, H_{c+1} = q^C H_c + fed_c.

    Args:
        q_chunk: q^C as a (D, N) pair.
        fed: (nC, B, D, N) pair, what each chunk adds to a zero state.
        h0: (B, D, N) pair.
    Returns:
        starts (nC, B, D, N) pair and the state after the last chunk.
    """
    is_complex = fed[1] is not None
    if not _UNROLL_CHUNKS and not _plain_compile():
        # A Python loop would bake the number of chunks into the graph; scan keeps it dynamic
        # (torch.export turns it into an ONNX Scan). Eagerly scan is much slower than the loop.
        def combine(carry, fed_c):
            state = (carry[0], carry[1] if is_complex else None)
            step_in = (fed_c[0], fed_c[1] if is_complex else None)
            nxt = _add(_mul(q_chunk, state), step_in)
            # scan forbids outputs that alias its inputs, hence the clones.
            return (nxt if is_complex else (nxt[0],)), tuple(part.clone() for part in carry)

        init = h0 if is_complex else (h0[0],)
        # Contiguous, or the scan is traced against the strides of the view's base and fixes the chunk count.
        xs = tuple(part.contiguous() for part in (fed if is_complex else (fed[0],)))
        last, starts = scan(combine, init, xs)
        if is_complex:
            return (starts[0], starts[1]), (last[0], last[1])
        return (starts[0], None), (last[0], None)
    h = h0
    starts_re, starts_im = [], []
    for c in range(fed[0].shape[0]):
        starts_re.append(h[0])
        starts_im.append(h[1])
        h = _add(_mul(q_chunk, h), (fed[0][c], fed[1][c] if is_complex else None))
    starts = (torch.stack(starts_re), torch.stack(starts_im) if is_complex else None)
    return starts, h


def _finish(y: Tensor, x: Tensor, skip: Tensor | None, silu: bool) -> Tensor:
    """y + skip ⊙ x, then SiLU when asked: the output transform the eager chunked path fuses into its own passes."""
    if skip is not None:
        y = y + skip * x
    return F.silu(y) if silu else y


class NonFiniteInput(Exception):
    """Raised by ``chunked(..., finite_only=True)`` when it finds a NaN or an infinity in x (or cannot look, while tracing)."""


def chunked(x: Tensor, coef: Coefficients, h0: Pair | None = None, chunk_size: int = 64, skip: Tensor | None = None,
            silu: bool = False, need_state: bool = True, weights: tuple[Tensor, Tensor, Tensor] | None = None,
            finite_only: bool = False) -> tuple[Tensor, Pair | None]:
    """Chunk-parallel path: Toeplitz matmuls inside chunks, the state carried across them.

    Same arguments and results as ``recurrent``, plus ``chunk_size`` (C), and the output transform
    y ← SiLU(y + skip ⊙ x) with ``skip`` (D,) or None and ``silu``, which this path fuses (the skip
    rides on the Toeplitz diagonal, the SiLU on the pass that writes y); ``need_state=False``
    returns None for the state and skips rebuilding it; ``weights`` is ``chunk_weights(coef, C, skip)``
    when the caller holds it already (a mixer in eval mode caches it). A length that is not a
    multiple of C is padded with zeros at the end and cropped. ``finite_only=True`` raises
    ``NonFiniteInput`` when x holds a NaN or an infinity (or finite values whose sum overflows),
    found by summing x as the path copies it in, before any product; while tracing it always
    raises, as a graph cannot branch on values (``run`` then takes the path that masks them).

    Eagerly this runs ``_ChunkedRecurrence`` (one autograd node, the carry one fused multiply-add per
    chunk); while tracing it runs ``_chunked_traced``, which exporters can lower.
    """
    # An unrolled loop needs its chunk count while tracing, and for a token count known only at
    # run time one chunk is the only count right for every T: the call is the chunk (the exporter
    # bounds T by C), so a decode step costs one token, not a chunk padded from one.
    call_is_chunk = _UNROLL_CHUNKS and token_count_is_dynamic()
    if torch.compiler.is_compiling() or call_is_chunk:
        if finite_only:
            raise NonFiniteInput
        y, h = _chunked_traced(x, coef, h0, chunk_size, call_is_chunk)
        return _finish(y, x, skip, silu), h
    batch, length = x.shape[:2]
    chunks = -(-length // chunk_size)
    pad = chunks * chunk_size - length
    padded = F.pad(x, (0, 0, 0, pad)) if pad else x.contiguous()
    complex_ = coef.phase is not None
    feed, mix, q_chunk = chunk_weights(coef, chunk_size, skip) if weights is None else weights
    h = _interleave(coef.zero_state(batch) if h0 is None else h0, 2, complex_)
    records = torch.is_grad_enabled() and any(t.requires_grad for t in (padded, feed, mix, q_chunk, h))
    y, last_start, end = _ChunkedRecurrence.apply(padded, feed, mix, q_chunk, h, complex_, silu, records, finite_only)
    if pad:
        y = y[:, :length]
    if not need_state:
        return y, None
    if not pad:
        return y, _deinterleave(end, complex_)
    # The carried state ran over the zero padding too: rebuild it from the last chunk's start and its real tokens.
    real = length - (chunks - 1) * chunk_size
    return y, _state_after(coef, _deinterleave(last_start, complex_), x[:, length - real :])


def _interleave(pair: Pair, dim: int, complex_: bool) -> Tensor:
    """A pair with N along ``dim`` -> one real tensor with K along it: N real parts, or 2N for a
    complex recurrence with (real, imaginary) side by side, which ``torch.view_as_complex`` reads."""
    if not complex_:
        return pair[0]
    imaginary = pair[1] if pair[1] is not None else torch.zeros_like(pair[0])
    return torch.stack((pair[0], imaginary), dim=dim + 1).flatten(dim, dim + 1)


def _deinterleave(states: Tensor, complex_: bool) -> Pair:
    """(..., K) from ``_interleave`` along the last axis -> a (..., N) pair."""
    if not complex_:
        return states, None
    parts = states.unflatten(-1, (-1, 2))
    return parts[..., 0].contiguous(), parts[..., 1].contiguous()


def lower_toeplitz(kernel: Tensor) -> Tensor:
    """The lower-triangular Toeplitz blocks of a kernel: (D, C) -> (D, C, C), [d, i, j] = k[d, i - j] for j <= i, else 0.

    Built from copies and reshapes, without a gather: ExecuTorch runs a gather with its generic
    portable kernel, which took most of a lowered EMA model's time. The reversed
    kernel followed by C zeros, z = (k_{C-1}, ..., k_0, 0, ..., 0), tiled C times and read in rows
    of 2C - 1 holds z[C - 1 - i + j] at row i, column C - 1 + j: each row is the one above shifted
    right by one, with zeros shifted in. The C(2C - 1) values read are C - 1 copies of z and the
    first C of z, joined by a concatenation rather than cut from C copies, so that the reshape
    reads a contiguous tensor: a size known only at run time would otherwise be specialised.
    """
    width, size = kernel.shape
    period = F.pad(kernel.flip(-1), (0, size))  # (D, 2C)
    tiled = torch.cat((period.repeat(1, size - 1), period[:, :size]), dim=1)  # (D, C(2C - 1))
    return tiled.reshape(width, size, 2 * size - 1)[..., size - 1 :]


def chunk_weights(coef: Coefficients, size: int, skip: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """What the eager chunked path multiplies by, from one set of powers q^j, j <= C: the parameters'
    part of its work, the same for every call and length.

    Returns, with K = N (real) or 2N (complex, interleaved as in ``_interleave``):
        feed (D, C, K): b q^{C-1-j}, how input j of a chunk reaches the state after it;
        mix (D, K + C, C): the readout Re(c q^{i+1}) (imaginary rows negated) stacked on the
            transposed Toeplitz block, [j, i] = k[i - j] for j <= i with skip added to k[0];
        q_chunk (D, K): q^C, the carry's decay.
    One autograd node (``_ChunkWeights``), whose backward is written out.
    """
    c_im = coef.c[1]
    if coef.phase is not None and c_im is None:
        c_im = torch.zeros_like(coef.c[0])
    return _ChunkWeights.apply(coef.log_r, coef.phase, coef.b, coef.c[0], c_im, skip, size)


class _ChunkWeights(torch.autograd.Function):
    """``chunk_weights`` as one autograd node: its backward turns the weights' gradients into the
    coefficients' in a few passes over the (D, N, C + 1) powers, where autograd's record of the
    forward took several times as many (the weights are rebuilt at every training step, whatever L).

    With P_j = q^j = exp(j (log r + i phi)) and G_j the gradient reaching P_j as (real, imaginary)
    parts, summed over its uses (the kernel k_j = Re sum_n c b P_j, the feed b P_{C-1-j}, the
    readout c P_{i+1} and q^C):
        dl/dlog r = sum_j j Re(conj(G_j) P_j),    dl/dphi = -sum_j j Im(conj(G_j) P_j),
        dl/db = sum_j dl/dk_j Re(c P_j) + Re(conj(feed's gradient) P_{C-1-j}),
        dl/dc = conj(sum_j dl/dk_j b P_j + sum_i (readout's gradient)_i P_{i+1}),  dl/dskip = dl/dk_0.
    """

    @staticmethod
    def forward(ctx, log_r: Tensor, phase: Tensor | None, b: Tensor, c_re: Tensor, c_im: Tensor | None,
                skip: Tensor | None, size: int):
        """Coefficients (D, N) (c_im given with phase), skip (D,) or None -> feed, mix, q_chunk (``chunk_weights``)."""
        complex_ = phase is not None
        coef = Coefficients(log_r=log_r, phase=phase, b=b, c=(c_re, c_im))
        q_re, q_im = coef.powers(torch.arange(size + 1, device=log_r.device))  # (D, N, C + 1)
        within = (q_re[..., :size], None if q_im is None else q_im[..., :size])
        kernel = _real_part_contract("dn,dnj->dj", _scale(coef.c, b), within)  # (D, C)
        if skip is not None:
            kernel = kernel + F.pad(skip.unsqueeze(-1), (0, size - 1))
        width, order = b.shape
        states = 2 * order if complex_ else order
        # Each part written where it goes, rather than built apart and concatenated.
        mix = kernel.new_empty(width, states + size, size)
        # [j, i] = k[i - j]: windows of the kernel behind C - 1 zeros, [s, i] = k[s + i - (C - 1)],
        # with s reversed.
        torch.ops.aten.flip.out(F.pad(kernel, (size - 1, 0)).unfold(-1, size, 1), [1], out=mix[:, states:])
        # The readout rows Re(c q^{i+1}) and -Im(c q^{i+1}).
        after_re, c_col = q_re[..., 1:], c_re.unsqueeze(-1)
        rows = mix[:, :states].unflatten(1, (order, 2)) if complex_ else mix[:, :states].unsqueeze(2)
        torch.mul(c_col, after_re, out=rows[:, :, 0])
        if complex_:
            after_im, c_col_im = q_im[..., 1:], c_im.unsqueeze(-1)
            rows[:, :, 0].sub_(c_col_im * after_im)
            torch.mul(c_col, after_im, out=rows[:, :, 1]).add_(c_col_im * after_re).neg_()
        # b q^{C-1-j}, laid out (D, C, K) with a complex state's parts side by side.
        feed = (b.unsqueeze(1) * within[0].flip(-1).transpose(1, 2)).contiguous()
        if complex_:
            feed = torch.stack((feed, b.unsqueeze(1) * within[1].flip(-1).transpose(1, 2)), dim=-1).flatten(2)
        q_chunk = _interleave((q_re[..., size], None if q_im is None else q_im[..., size]), 1, complex_).contiguous()
        ctx.save_for_backward(q_re, q_im, b, c_re, c_im)
        ctx.size = size
        return feed, mix, q_chunk

    @staticmethod
    @first_order("impl='chunked' of the EMA and CEMA", "impl='recurrent' or impl='fft'")
    def backward(ctx, grad_feed: Tensor | None, grad_mix: Tensor | None, grad_q_chunk: Tensor | None):
        q_re, q_im, b, c_re, c_im = ctx.saved_tensors
        size = ctx.size
        complex_ = q_im is not None
        width, order = b.shape
        states = 2 * order if complex_ else order

        def parts(t: Tensor, dim: int) -> Pair:
            """An interleaved real tensor with K along ``dim`` -> its (real, imaginary) rows, N along ``dim``."""
            if not complex_:
                return t, None
            split = t.unflatten(dim, (order, 2))
            return split.select(dim + 1, 0), split.select(dim + 1, 1)

        # The products are those of the forward's one contraction, the kernel sum_n (c b)_n P_j (its two
        # adjoint products, as for any stage); the rest is pointwise work and sums over j.
        grad_re = q_re.new_zeros(q_re.shape)  # G_j, j <= C: (D, N, C + 1)
        grad_im = torch.zeros_like(grad_re) if complex_ else None
        within_re, within_im = q_re[..., :size], None if q_im is None else q_im[..., :size]
        grad_kernel = readout_re = readout_neg_im = kernel_re = kernel_im = None
        if grad_mix is not None:
            grad_kernel = _toeplitz_adjoint(grad_mix[:, states:])  # (D, C)
            # The kernel Re sum_n c b P_j: conj(c b) dl/dk_j reaches P_j, and sum_j dl/dk_j P_j reaches c b.
            grad_re[..., :size] += torch.bmm((c_re * b).unsqueeze(-1), grad_kernel.unsqueeze(1))
            kernel_re = torch.einsum("dnj,dj->dn", within_re, grad_kernel)
            if complex_:
                grad_im[..., :size] -= torch.bmm((c_im * b).unsqueeze(-1), grad_kernel.unsqueeze(1))
                kernel_im = torch.einsum("dnj,dj->dn", within_im, grad_kernel)
            # The readout rows Re(c P_{i+1}) and -Im(c P_{i+1}): conj(c) times their gradient.
            readout_re, readout_neg_im = parts(grad_mix[:, :states], 1)  # (D, N, C)
            grad_re[..., 1:] += c_re.unsqueeze(-1) * readout_re
            if complex_:
                grad_re[..., 1:] -= c_im.unsqueeze(-1) * readout_neg_im
                grad_im[..., 1:] -= c_re.unsqueeze(-1) * readout_neg_im + c_im.unsqueeze(-1) * readout_re
        feed_re = feed_im = None
        if grad_feed is not None:
            feed_re, feed_im = parts(grad_feed.transpose(1, 2), 1)  # (D, N, C), over j
            feed_re = feed_re.flip(-1)  # over the power C - 1 - j
            grad_re[..., :size] += b.unsqueeze(-1) * feed_re
            if complex_:
                feed_im = feed_im.flip(-1)
                grad_im[..., :size] += b.unsqueeze(-1) * feed_im
        if grad_q_chunk is not None:
            chunk_re, chunk_im = parts(grad_q_chunk, 1)
            grad_re[..., size] += chunk_re
            if complex_:
                grad_im[..., size] += chunk_im
        needs_log_r, needs_phase, needs_b, needs_c_re, needs_c_im, needs_skip = ctx.needs_input_grad[:6]
        steps = torch.arange(size + 1, device=q_re.device, dtype=q_re.dtype)
        grad_log_r = grad_phase = grad_b = grad_c_re = grad_c_im = grad_skip = None
        if needs_log_r:
            real_part = grad_re * q_re + grad_im * q_im if complex_ else grad_re * q_re
            grad_log_r = (real_part * steps).sum(-1)
        if complex_ and needs_phase:
            grad_phase = ((grad_im * q_re - grad_re * q_im) * steps).sum(-1)
        if needs_b:
            grad_b = torch.zeros_like(b)
            if kernel_re is not None:
                grad_b += c_re * kernel_re - c_im * kernel_im if complex_ else c_re * kernel_re
            if feed_re is not None:
                grad_b += (feed_re * within_re).sum(-1)
                if complex_:
                    grad_b += (feed_im * within_im).sum(-1)
        if needs_c_re or needs_c_im:
            grad_c_re = torch.zeros_like(c_re)
            grad_c_im = torch.zeros_like(c_re) if complex_ else None
            if kernel_re is not None:
                grad_c_re += b * kernel_re
                if complex_:
                    grad_c_im -= b * kernel_im
            if readout_re is not None:
                after_re, after_im = q_re[..., 1:], None if q_im is None else q_im[..., 1:]
                grad_c_re += (readout_re * after_re).sum(-1)
                if complex_:
                    grad_c_re -= (readout_neg_im * after_im).sum(-1)
                    grad_c_im -= (readout_neg_im * after_re + readout_re * after_im).sum(-1)
        if needs_skip and grad_kernel is not None:
            grad_skip = grad_kernel[:, 0].clone()
        return grad_log_r, grad_phase, grad_b, grad_c_re, grad_c_im, grad_skip, None


def _toeplitz_adjoint(grad: Tensor) -> Tensor:
    """The gradient of k from that of the Toeplitz block, (D, C, C) [j, i] = k[i - j] for j <= i:
    sum_j grad[j, j + m] -> (D, C).

    The diagonals are read through one strided view of the masked block, rows of C + 1 apart: a
    diagonal running past the last column continues in the next row's strictly lower part, which
    the mask has zeroed. The view stops a row short of the end, whose only term is [C-1, C-1].
    """
    width, size = grad.shape[0], grad.shape[-1]
    # Written into a contiguous buffer: the strided view below reads it by its offsets, and a product
    # takes the layout of its operands (autograd hands grad over in whatever layout it was made in).
    masked = torch.empty_like(grad, memory_format=torch.contiguous_format)  # (D, C, C)
    torch.mul(grad, torch.ones(size, size, dtype=grad.dtype, device=grad.device).triu_(), out=masked)
    sums = masked.as_strided((width, size, size - 1), (size * size, 1, size + 1)).sum(-1)
    sums[:, 0] += masked[:, -1, -1]
    return sums


def _as_complex(t: Tensor, complex_: bool) -> Tensor:
    """A real (..., K) tensor from ``_interleave`` as the complex (..., N) one it holds, sharing memory; real ones as they are."""
    return torch.view_as_complex(t.unflatten(-1, (-1, 2))) if complex_ else t


def _as_real(t: Tensor, complex_: bool) -> Tensor:
    """The inverse of ``_as_complex``: complex (..., N) -> real (..., 2N)."""
    return torch.view_as_real(t).flatten(-2) if complex_ else t


class _ChunkedRecurrence(torch.autograd.Function):
    """The eager chunked recurrence as one autograd node, with its backward written out.

    Shapes: B batch, nC chunks of C, D channels, K states per channel (N, or 2N interleaved for a
    complex recurrence), M = B·nC chunk rows. Every product is a matmul batched over the channels,
    (D, M, ·) @ (D, ·, ·), whose operands are strided views of buffers laid out (M, D, ·): a chunk's
    (C, D) block is transposed where it sits in cache, never the whole (L, D) sequence, and the
    matmuls read those layouts in place and write them in place on one thread (``_product_into``;
    the small fed product writes its own (D, M, K) layout). The carry H_{c+1} = q^C H_c + fed_c runs as one
    fused multiply-add per chunk on contiguous (B, D, K) states, written straight into the buffer
    the readout product reads, so it costs no autograd node, no copy and no per-chunk gradient
    buffer; its adjoint runs the same way backwards. Forward:

        stacked (M, D, K + C) = [starts | chunk inputs transposed]
        fed = inputs @ feed                      (D, M, K), then the carry fills starts
        y = stacked @ mix                        (D, M, C): readout and Toeplitz block in one product
    """

    @staticmethod
    def forward(ctx, x: Tensor, feed: Tensor, mix: Tensor, q_chunk: Tensor, h0: Tensor, complex_: bool, silu: bool,
                records: bool, finite_only: bool):
        """x (B, nC·C, D), feed (D, C, K), mix (D, K + C, C), q_chunk (D, K), h0 (B, D, K) ->
        y (B, nC·C, D), the last chunk's start state (B, D, K), the state after it (B, D, K).
        ``records``: whether autograd records the call, which the caller knows (inside forward grad
        mode is off); only then is the output kept before its SiLU. ``finite_only``: sum x while
        copying it in and raise ``NonFiniteInput`` before any product when the sum is not finite."""
        batch, length, width = x.shape
        size, states = mix.shape[-1], feed.shape[-1]
        chunks = length // size
        stacked = _stacked_buffer(x, batch * chunks, width, states + size)
        inputs = stacked[..., states : states + size]
        blocks = x.view(batch * chunks, size, width)
        sums = []
        copy_in_slabs(inputs, blocks.transpose(1, 2),
                      (lambda start, stop: sums.append(blocks[start:stop].sum())) if finite_only else None)
        if finite_only and not bool(torch.isfinite(torch.stack(sums).sum())):
            raise NonFiniteInput
        # Written in the product's own layout: into a transposed view the product runs up to 3x slower
        # on two threads, and the carry reads fed one small (B, D, K) slice at a time either way.
        fed = torch.bmm(inputs.transpose(0, 1), feed)  # (D, M, K)
        starts = stacked[..., :states].view(batch, chunks, width, states)
        starts[:, 0].copy_(h0)
        end = _carry(starts, fed.view(width, batch, chunks, states).permute(1, 2, 0, 3), q_chunk, complex_)
        operands = stacked[..., : states + size].transpose(0, 1)  # (D, M, K + C)
        y = x.new_empty(batch, length, width)
        keep_input = silu and records
        pre, out = (y, torch.empty_like(y)) if keep_input else (None, y)
        rows, out_rows = (y[0], out[0]) if batch == 1 else (y.view(-1, size, width), out.view(-1, size, width))
        finish = None
        # The SiLU runs on each slab of y as soon as it is copied out, while the slab is in cache.
        if keep_input:
            def finish(start: int, stop: int) -> None:
                torch.ops.aten.silu.out(rows[start:stop], out=out_rows[start:stop])
        elif silu:
            def finish(start: int, stop: int) -> None:
                F.silu(rows[start:stop], inplace=True)
        if batch == 1:
            # One sequence: the product writes its own (D, L) layout, and a 2-D transpose turns it
            # into (L, D). With several rows that transpose would be a general permutation, slower
            # than the per-chunk blocks below.
            copy_in_slabs(rows, torch.bmm(operands, mix).view(width, length).t(), finish)
        else:
            y_chunks = x.new_empty(batch * chunks, width, size)
            _product_into(y_chunks.transpose(0, 1), operands, mix)
            copy_in_slabs(rows, y_chunks.transpose(1, 2), finish)
        ctx.save_for_backward(stacked, feed, mix, q_chunk, pre)
        ctx.shape, ctx.complex_, ctx.silu = (batch, chunks, size, width, states), complex_, silu
        return out, starts[:, -1].clone(), end

    @staticmethod
    @first_order("impl='chunked' of the EMA and CEMA", "impl='recurrent' or impl='fft'")
    def backward(ctx, grad_y: Tensor, grad_last_start: Tensor, grad_end: Tensor):
        stacked, feed, mix, q_chunk, pre = ctx.saved_tensors
        batch, chunks, size, width, states = ctx.shape
        rows = batch * chunks
        needs_x, needs_feed, needs_mix, needs_q, needs_h0 = ctx.needs_input_grad[:5]
        if ctx.silu:
            grad_y = torch.ops.aten.silu_backward(grad_y, pre)
        grad_chunks = stacked.new_empty(rows, width, size)
        copy_in_slabs(grad_chunks, grad_y.reshape(rows, size, width).transpose(1, 2))
        grad_chunks = grad_chunks.transpose(0, 1)  # (D, M, C)
        operands = stacked[..., : states + size].transpose(0, 1)  # (D, M, K + C)
        grad_mix = torch.bmm(operands.transpose(1, 2), grad_chunks) if needs_mix else None
        if not (needs_x or needs_feed or needs_q or needs_h0):
            return None, None, grad_mix, None, None, None, None, None, None
        grad_stacked = _stacked_buffer(stacked, rows, width, states + size)
        _product_into(grad_stacked[..., : states + size].transpose(0, 1), grad_chunks, mix.transpose(1, 2))
        grad_starts = grad_stacked[..., :states].view(batch, chunks, width, states)
        grad_starts[:, -1] += grad_last_start
        starts = stacked[..., :states].view(batch, chunks, width, states)
        grad_fed, grad_h0, grad_q = _carry_adjoint(grad_starts, grad_end, starts, q_chunk, ctx.complex_)
        grad_fed = grad_fed.view(rows, width, states).transpose(0, 1)  # (D, M, K)
        inputs = stacked[..., states : states + size].transpose(0, 1)  # (D, M, C)
        grad_feed = torch.bmm(inputs.transpose(1, 2), grad_fed) if needs_feed else None
        grad_x = None
        if needs_x:
            # Added into the rows the transposing copy reads next.
            grad_inputs = grad_stacked[..., states : states + size]  # (M, D, C)
            _product_into(grad_inputs.transpose(0, 1), grad_fed, feed.transpose(1, 2), accumulate=True)
            grad_x = stacked.new_empty(batch, chunks * size, width)
            copy_in_slabs(grad_x.view(rows, size, width), grad_inputs.transpose(1, 2))
        return grad_x, grad_feed, grad_mix, grad_q if needs_q else None, grad_h0 if needs_h0 else None, None, None, None, None


def _product_into(target: Tensor, a: Tensor, b: Tensor, accumulate: bool = False) -> None:
    """target = a @ b (or += with ``accumulate``), batched, for a ``target`` that is a strided view of another layout.

    torch multiplies into such a target one batch (here: one channel) at a time, and no faster on
    several threads than on one; a product into a buffer of its own runs on all of them. So on one
    thread the product writes the target directly, saving a pass over it, and on several it
    writes a buffer of its own that one parallel copy (or sum) puts in place: on two threads that
    halves these products at L = 4096 (D = 256).
    """
    if torch.get_num_threads() == 1:
        if accumulate:
            target.baddbmm_(a, b)
        else:
            torch.bmm(a, b, out=target)
    elif accumulate:
        target.add_(torch.bmm(a, b))
    else:
        target.copy_(torch.bmm(a, b))


TRANSPOSE_SLAB_BYTES = 2 * 2**20
"""Bytes of the slabs ``copy_in_slabs`` moves at a time: a slab's source and target fit in cache together."""


def copy_in_slabs(target: Tensor, source: Tensor, after: Callable[[int, int], None] | None = None) -> None:
    """``target.copy_(source)`` for a transposing copy, one slab of rows along dim 0 at a time.

    torch copies a whole 2-D transpose with a cache-blocked kernel on one thread only, and a large
    permuted copy with strides that miss the cache; slabs of TRANSPOSE_SLAB_BYTES go through its
    general copy, which runs on every thread with each slab in cache. The gain is largest on two
    threads at long L (tools/perf/roofline.md times the chunked paths). ``after(start, stop)``, when
    given, runs as soon as rows [start, stop) are copied, while they are still in cache: a pass
    over the same rows there costs a fraction of one over the whole tensor.
    """
    row_bytes = max(1, math.prod(target.shape[1:]) * target.element_size())
    rows = max(1, TRANSPOSE_SLAB_BYTES // row_bytes)
    for start in range(0, target.shape[0], rows):
        stop = min(start + rows, target.shape[0])
        target[start:stop].copy_(source[start:stop])
        if after is not None:
            after(start, stop)


def _stacked_buffer(like: Tensor, rows: int, width: int, columns: int) -> Tensor:
    """An uninitialised (M, D, columns) buffer whose rows start at even offsets, so that complex views of its states hold."""
    return like.new_empty(rows, width, columns + columns % 2)[..., :columns]


def _carry(starts: Tensor, fed: Tensor, q_chunk: Tensor, complex_: bool) -> Tensor:
    """Fill starts[:, c] = q^C starts[:, c-1] + fed[:, c-1] for c >= 1, in place; return the state after the last chunk.

    starts and fed (B, nC, D, K), starts[:, 0] holding h0; q_chunk (D, K). One fused multiply-add
    per chunk: the work is nC·B·D·K, each state written once.
    """
    starts, fed = (_as_complex(t, complex_).unbind(1) for t in (starts, fed))
    q = _as_complex(q_chunk, complex_)
    for c in range(1, len(starts)):
        torch.addcmul(fed[c - 1], q, starts[c - 1], out=starts[c])
    return _as_real(torch.addcmul(fed[-1], q, starts[-1]), complex_)


def _carry_adjoint(grad_starts: Tensor, grad_end: Tensor, starts: Tensor, q_chunk: Tensor,
                   complex_: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The carry's backward: the same recurrence run from the last chunk with the conjugate decay.

    With G_c the gradient reaching starts[:, c] and fed[:, c] (the state after chunk c):
    fed's gradient is G_{nC-1} = grad_end, G_c = grad_starts[:, c+1] + conj(q^C) G_{c+1}; h0's is
    grad_starts[:, 0] + conj(q^C) G_0; q^C's is Σ conj(starts[:, c]) G_c over b and c. Returns
    (grad_fed (B, nC, D, K), grad_h0 (B, D, K), grad_q_chunk (D, K)).
    """
    grad_fed = torch.empty_like(grad_starts, memory_format=torch.contiguous_format)
    grad_fed[:, -1].copy_(grad_end)
    grad_starts_c, grad_fed_c, starts_c, q = (_as_complex(t, complex_) for t in (grad_starts, grad_fed, starts, q_chunk))
    q_conj = q.conj_physical()
    into, reaching = grad_fed_c.unbind(1), grad_starts_c.unbind(1)
    for c in range(len(into) - 2, -1, -1):
        torch.addcmul(reaching[c + 1], q_conj, into[c + 1], out=into[c])
    grad_h0 = torch.addcmul(reaching[0], q_conj, into[0])
    grad_q = (starts_c.conj_physical() * grad_fed_c).sum((0, 1))
    return grad_fed, _as_real(grad_h0, complex_), _as_real(grad_q, complex_)


def _chunked_traced(x: Tensor, coef: Coefficients, h0: Pair | None, chunk_size: int, call_is_chunk: bool) -> tuple[Tensor, Pair]:
    """``chunked`` as exporters trace it (before the output transform): plain ops and a scan or an unrolled loop.

    Every contraction is a matmul batched over the channels, with the chunks of all rows stacked:
    (D, B·nC, C) @ (D, C, ·). Written as einsums they cost the same in eager, but ONNX Runtime
    runs its generic Einsum kernel several times slower than MatMul. The layout (D, B·nC, C) is
    x (B, L, D) with its last axis moved to the front, a transpose runtimes do fast, where
    (D, C, B·nC) would need a general 4-D permutation in and out. With ``call_is_chunk`` (a graph
    for any token count with the loop unrolled) the call is one chunk: nothing is padded, cropped
    or rebuilt.
    """
    batch, length, width = x.shape
    if call_is_chunk:
        size, chunks = length, 1
    else:
        # A graph for any token count runs a call shorter than a chunk as one chunk of its own length,
        # so that a decode step (T = 1) costs one token, not a chunk padded from one.
        size = torch.sym_min(length, chunk_size) if token_count_is_dynamic() else chunk_size
        # Written as a ceiling division, not with a modulo, so that a symbolic length's solver can
        # bound nC >= 1 when tracing for any length.
        chunks = (length + size - 1) // size
    pad = chunks * size - length
    # A symbolic length is padded (by 0 when it divides) and its end state rebuilt unconditionally,
    # rather than branching on it; a length fixed at tracing that divides needs neither.
    padded = not (call_is_chunk or (isinstance(pad, int) and pad == 0))
    if padded:
        x = F.pad(x, (0, 0, 0, pad))

    regroup = traceable_reshape

    rows = regroup(x.permute(2, 0, 1), width, batch * chunks, size)  # (D, B·nC, C), row (b, c)
    j = torch.arange(size, device=x.device)

    # Inside a chunk: y_i = Σ_{j<=i} k[i-j] x_j, a (C, C) lower-triangular Toeplitz matrix per channel.
    toeplitz = lower_toeplitz(coef.kernel(size, x.device))  # (D, C, C)
    # What each chunk adds to a zero state, b q^{C-1-j} x_j summed, from the same matmul.
    feed_re, feed_im = coef.input_weights(size, x.device)  # (D, N, C)
    order = feed_re.shape[1]
    maps = [toeplitz, feed_re] + ([feed_im] if feed_im is not None else [])
    # bmm, not matmul: matmul's decomposition branches on a symbolic chunk length of 1.
    mixed = torch.bmm(rows, torch.cat(maps, dim=1).transpose(1, 2))  # (D, B·nC, C + N or C + 2N)
    y = mixed[..., :size]

    def by_chunk(part: Tensor) -> Tensor:
        """(D, B·nC, N) -> (nC, B, D, N)."""
        return regroup(part, width, batch, chunks, order).permute(2, 1, 0, 3)

    fed = (by_chunk(mixed[..., size : size + order]), by_chunk(mixed[..., size + order :]) if feed_im is not None else None)
    h = coef.zero_state(batch) if h0 is None else h0
    starts, h_end = _carry_across_chunks(coef.power(size, x.device), fed, h)

    # What each chunk's start state adds: y_i += Re Σ_n c q^{i+1} H_c, again one matmul.
    c_q = coef.output_weights(j + 1)  # (D, N, C) pair
    readout, carried = [c_q[0]], [starts[0]]
    if c_q[1] is not None and starts[1] is not None:
        readout.append(-c_q[1])
        carried.append(starts[1])
    carried = regroup(torch.cat(carried, dim=-1).permute(2, 1, 0, 3), width, batch * chunks, -1)  # (D, B·nC, N or 2N)
    y = y + torch.bmm(carried, torch.cat(readout, dim=1))
    y = regroup(y, width, batch, chunks * size).permute(1, 2, 0)  # (B, nC·C, D)
    if padded:
        # A slice to a symbolic length makes torch.export specialise it; an index_select does not.
        y = y.index_select(1, torch.arange(length, device=x.device))
        # The carried state ran over the zero padding too; rebuild the state after the last real
        # token from the last chunk's start: h = q^r H + Σ_{j<r} b q^{r-1-j} x_j for its r real
        # tokens. Written over the whole (zero-padded) chunk, with the weights past r masked, so that
        # r may be symbolic.
        real = length - (chunks - 1) * size
        last_start = (starts[0][-1], None if starts[1] is None else starts[1][-1])
        last_x = regroup(x, batch, chunks, size, width)[:, -1]  # (B, C, D)
        exponents = real - 1 - j  # (C,), negative past the real tokens
        reached = _scale(coef.powers(exponents.clamp(min=0)), coef.b.unsqueeze(-1))  # (D, N, C)
        reached = _scale(reached, (exponents >= 0).to(reached[0].dtype))
        h_end = _add(_mul(_squeeze_last(coef.powers(real - j[:1])), last_start), _real_contract("btd,dnt->bdn", last_x, reached))
    return y, h_end


def _squeeze_last(pair: Pair) -> Pair:
    """A (..., 1) pair -> (...)."""
    return pair[0][..., 0], None if pair[1] is None else pair[1][..., 0]


class _NativeRecurrence(torch.autograd.Function):
    """The recurrent loop as native code (recurrence_native.cpp), with its adjoint: one autograd node.

    Shapes: x (B, L, D); coefficients (N', P) with P = D padded to the kernel's vector width and N'
    = N padded to its group of states (the padding holds zeros and adds nothing); states (B, N', P).
    Forward keeps the state every ``checkpoint`` steps of the kernel when autograd records, so that
    backward recomputes each interval's states from there instead of storing all B·L·N of them.
    The SiLU runs in the kernel's passes either way: while autograd records, forward also writes
    its slope (SiLU' of the sums, from the exponential the SiLU computes anyway), and backward
    multiplies the incoming gradient by it as it reads it, instead of two more passes of torch's
    SiLU and its backward over (B, L, D) tensors.
    """

    @staticmethod
    def forward(ctx, x: Tensor, q_re: Tensor, q_im: Tensor | None, b: Tensor, c_re: Tensor, c_im: Tensor | None,
                skip: Tensor | None, h_re: Tensor, h_im: Tensor | None, silu: bool, records: bool):
        """-> y (B, L, D): y + skip ⊙ x, SiLU of it when ``silu``; the state after the last step, (B, N', P) pair.
        ``records``: whether autograd records the call (the caller knows; inside forward grad mode is off),
        the checkpoints and the SiLU's slope kept only then."""
        kernels = _native_kernels(x.dtype)
        batch, length, width = x.shape
        order, padded = q_re.shape
        x = x.contiguous()
        y = torch.empty_like(x)
        slope = torch.empty_like(x) if silu and records else None
        end_re, end_im = h_re.clone(), None if h_im is None else h_im.clone()
        checkpoints = -(-length // kernels.checkpoint)
        kept_re = x.new_empty(batch, checkpoints, order, padded) if records else None
        kept_im = x.new_empty(batch, checkpoints, order, padded) if records and h_im is not None else None
        kernels.forward(*native_code.pointers(x, y, slope, q_re, q_im, b, c_re, c_im, skip, end_re, end_im, kept_re, kept_im),
                        batch, length, width, padded, order, int(silu), torch.get_num_threads())
        ctx.save_for_backward(x, slope, q_re, q_im, b, c_re, c_im, skip, kept_re, kept_im)
        # An output nothing used reaches backward as None, not as zeros the size of y.
        ctx.set_materialize_grads(False)
        return y, end_re, end_im

    @staticmethod
    @first_order("impl='native' of the EMA and CEMA", "impl='recurrent' or impl='fft'")
    def backward(ctx, grad_y: Tensor | None, grad_end_re: Tensor | None, grad_end_im: Tensor | None):
        x, slope, q_re, q_im, b, c_re, c_im, skip, kept_re, kept_im = ctx.saved_tensors
        kernels = _native_kernels(x.dtype)
        batch, length, width = x.shape
        order, padded = q_re.shape
        complex_ = q_im is not None
        grad_y, grad_strides = native_code.gradient_rows(grad_y, x)
        carry_re = x.new_zeros(batch, order, padded) if grad_end_re is None else grad_end_re.clone(memory_format=torch.contiguous_format)
        carry_im = None
        if complex_:
            carry_im = torch.zeros_like(carry_re) if grad_end_im is None else grad_end_im.clone(memory_format=torch.contiguous_format)
        sums = [x.new_zeros(batch, order, padded) for _ in range(5 if complex_ else 3)]
        grad_q_re, grad_b, grad_c_re = sums[:3]
        grad_q_im, grad_c_im = (sums[3], sums[4]) if complex_ else (None, None)
        grad_skip = x.new_zeros(batch, padded) if skip is not None and ctx.needs_input_grad[6] else None
        grad_x = torch.empty_like(x)
        kernels.backward(*native_code.pointers(x), native_code.row_pointer(grad_y),
                         *native_code.pointers(slope, grad_x, q_re, q_im, b, c_re, c_im, skip, kept_re, kept_im, carry_re, carry_im,
                                               grad_q_re, grad_q_im, grad_b, grad_c_re, grad_c_im, grad_skip),
                         batch, length, width, padded, order, *grad_strides, torch.get_num_threads())

        def total(grad: Tensor | None) -> Tensor | None:
            return None if grad is None else grad.sum(0)

        return (grad_x, total(grad_q_re), total(grad_q_im), total(grad_b), total(grad_c_re), total(grad_c_im), total(grad_skip),
                carry_re, carry_im, None, None)


@dataclass(frozen=True)
class _NativeKernels:
    """The native library's entry points for one dtype, with the layout constants they were built with."""

    forward: object
    backward: object
    lanes: int
    group: int
    checkpoint: int


@functools.lru_cache(maxsize=None)
def _native_kernels(dtype: torch.dtype) -> _NativeKernels:
    """The native forward and backward for ``dtype`` (float32 or float64), built on first use (``seqmix.native``)."""
    suffix = native_code.dtype_suffix(dtype, "impl='native'")
    library = native_code.load("seqmix.operators", "recurrence_native.cpp")
    forward = native_code.function(library, f"seqmix_recurrence_forward_{suffix}", 13, 5, 2)
    backward = native_code.function(library, f"seqmix_recurrence_backward_{suffix}", 20, 7, 1)
    constants = [getattr(library, name) for name in
                 (f"seqmix_recurrence_lanes_{suffix}", "seqmix_recurrence_group", "seqmix_recurrence_checkpoint")]
    for constant in constants:
        constant.restype = ctypes.c_int64
    return _NativeKernels(forward, backward, *(constant() for constant in constants))


def _check_native_operands(x: Tensor, coefficients: dict[str, Tensor | None], states: dict[str, Tensor | None],
                           skip: Tensor | None) -> None:
    """Raise a SeqmixError unless every operand has x's dtype and device and its shape: coefficients
    (D, N), states (B, D, N), skip (D,). Native code reads raw memory, where a mismatch is no error
    but a wrong answer or a crash."""
    batch, _, width = x.shape
    order = coefficients["b"].shape[-1]
    expected = {**{name: (width, order) for name in coefficients}, **{name: (batch, width, order) for name in states}, "skip": (width,)}
    for name, tensor in {**coefficients, **states, "skip": skip}.items():
        if tensor is None:
            continue
        if tensor.dtype != x.dtype or tensor.device != x.device or tuple(tensor.shape) != expected[name]:
            raise SeqmixError(
                f"impl='native': {name} is {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}; with x {x.dtype} "
                f"{tuple(x.shape)} on {x.device} it must be {x.dtype} {expected[name]} on {x.device}"
            )


class NativeOperands(NamedTuple):
    """What native code multiplies by, laid out (N', P) (``native_operands``): q, b, c and the skip (P,)."""

    q_re: Tensor
    q_im: Tensor | None
    b: Tensor
    c_re: Tensor
    c_im: Tensor | None
    skip: Tensor | None


def _native_layout(dtype: torch.dtype, width: int, order: int) -> tuple[int, int]:
    """(P, N'): D padded to the native kernels' vector width, N to their group of states."""
    kernels = _native_kernels(dtype)
    return -(-width // kernels.lanes) * kernels.lanes, -(-order // kernels.group) * kernels.group


def _laid_out(t: Tensor | None, padded: int, orders: int) -> Tensor | None:
    """(..., D, N) -> (..., N', P), zero padded."""
    if t is None:
        return None
    width, order = t.shape[-2:]
    return F.pad(t.transpose(-1, -2), (0, padded - width, 0, orders - order)).contiguous()


class _NativeOperands(torch.autograd.Function):
    """``native_operands`` as one autograd node: q = exp(log r + i phi) and the layout, a dozen small
    operations that autograd recorded one by one, each with its own backward node, at every training
    step whatever L (the EMA's and CEMA's step 1.09x and 1.13x faster at L = 64, 1.02-1.03x at
    L = 4096; D = 256, one thread)."""

    @staticmethod
    def forward(ctx, log_r: Tensor, phase: Tensor | None, b: Tensor, c_re: Tensor, c_im: Tensor | None,
                skip: Tensor | None, padded: int, orders: int):
        """Coefficients (D, N) (c_im with phase), skip (D,) or None -> NativeOperands' six, (N', P) and (P,)."""
        q_re, q_im = Coefficients(log_r=log_r, phase=phase, b=b, c=(c_re, c_im)).q()
        ctx.save_for_backward(q_re, q_im)
        width = b.shape[0]
        return (_laid_out(q_re, padded, orders), _laid_out(q_im, padded, orders), _laid_out(b, padded, orders),
                _laid_out(c_re, padded, orders), _laid_out(c_im, padded, orders),
                None if skip is None else F.pad(skip, (0, padded - width)).contiguous())

    @staticmethod
    @first_order("impl='native' of the EMA and CEMA", "impl='recurrent' or impl='fft'")
    def backward(ctx, grad_q_re, grad_q_im, grad_b, grad_c_re, grad_c_im, grad_skip):
        q_re, q_im = ctx.saved_tensors
        width, order = q_re.shape

        def unlaid(grad: Tensor | None) -> Tensor | None:
            """(N', P) -> (D, N), the padding dropped."""
            return None if grad is None else grad[:order, :width].t()

        # dq/dlog r = q and dq/dphi = i q: the real parts of conj(dl/dq) q and of conj(dl/dq) i q.
        dq_re, dq_im = unlaid(grad_q_re), unlaid(grad_q_im)
        grad_log_r = grad_phase = None
        if dq_re is not None or dq_im is not None:
            dq_re = torch.zeros_like(q_re) if dq_re is None else dq_re
            grad_log_r = dq_re * q_re
            if q_im is not None:
                dq_im = torch.zeros_like(q_im) if dq_im is None else dq_im
                grad_log_r = grad_log_r + dq_im * q_im
                grad_phase = dq_im * q_re - dq_re * q_im
        return (grad_log_r, grad_phase, unlaid(grad_b), unlaid(grad_c_re), unlaid(grad_c_im),
                None if grad_skip is None else grad_skip[:width], None, None)


def native_operands(coef: Coefficients, width: int, skip: Tensor | None) -> NativeOperands:
    """The coefficients (D, N) and skip (D,) as the native kernels read them: the parameters' part of
    the native path's work, the same for every call and length (a mixer in eval mode caches it)."""
    padded, orders = _native_layout(coef.b.dtype, width, coef.b.shape[-1])
    complex_ = coef.phase is not None
    return NativeOperands(*_NativeOperands.apply(coef.log_r, coef.phase, coef.b, coef.c[0], coef.c[1] if complex_ else None,
                                                 skip, padded, orders))


# The path that computes what ``native`` does on a device its C++ cannot read.
NATIVE_ELSEWHERE = "chunked"


def native(x: Tensor, coef: Coefficients, h0: Pair | None = None, skip: Tensor | None = None, silu: bool = False,
           chunk_size: int = 64, operands: NativeOperands | None = None, need_state: bool = True) -> tuple[Tensor, Pair | None]:
    """The literal recurrence as native code, vectorised across channels (``seqmix.native`` builds it).

    Same arguments and results as ``recurrent``, plus the output transform SiLU(y + skip ⊙ x)
    (``skip`` (D,) or None, ``silu``), which the kernel applies as it writes y (keeping the sum
    for its backward while autograd records). ``operands`` is ``native_operands(coef, D, skip)``
    when the caller holds it already (a mixer in eval mode caches it); ``need_state=False``
    returns None for the state and skips laying it back out. Like the loop, a NaN or infinity at
    step t reaches steps >= t only. CPU only; float32 and float64. While compiling or exporting it
    runs what ``run`` runs for ``chunked`` with ``chunk_size``, masking of non-finite inputs
    included: tracers cannot see into native code.
    """
    if torch.compiler.is_compiling():
        return run("chunked", x, coef, h0, chunk_size, None, need_state, skip, silu)
    if x.device.type != "cpu":
        raise SeqmixError(f"impl='native' runs on the CPU, and x is on {x.device}; use impl={NATIVE_ELSEWHERE!r} there")
    batch, _, width = x.shape
    order = coef.b.shape[-1]
    padded, orders = _native_layout(x.dtype, width, order)
    h = coef.zero_state(batch) if h0 is None else h0
    _check_native_operands(x, {"log_r": coef.log_r, "phase": coef.phase, "b": coef.b, "c (real part)": coef.c[0],
                               "c (imaginary part)": coef.c[1]}, {"h0 (real part)": h[0], "h0 (imaginary part)": h[1]}, skip)
    if operands is None:
        operands = native_operands(coef, width, skip)
    complex_ = coef.phase is not None
    h_im = h[1] if h[1] is not None or not complex_ else torch.zeros_like(h[0])
    records = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, coef.log_r, coef.phase, coef.b, *coef.c, skip, *h))
    y, end_re, end_im = _NativeRecurrence.apply(
        x, *operands, _laid_out(h[0], padded, orders), _laid_out(h_im if complex_ else None, padded, orders), silu, records)
    if not need_state:
        return y, None

    def state(t: Tensor | None) -> Tensor | None:
        """(B, N', P) -> (B, D, N)."""
        return None if t is None else t[:, :order, :width].transpose(1, 2).contiguous()

    return y, (state(end_re), state(end_im))


PATHS = {"recurrent": recurrent, "fft": fft, "chunked": chunked, "native": native}
PREPARED_KEPT = 4
"""Kernel spectra or chunk weights a mixer keeps (paths, lengths, dtypes, directions); the oldest goes first."""


def _same_values(parameters: list[Tensor], copies: list[Tensor]) -> bool:
    """Whether every parameter still holds its copy's shape, dtype, device and values (NaN never does)."""
    return len(parameters) == len(copies) and all(
        p.shape == c.shape and p.dtype == c.dtype and p.device == c.device and torch.equal(p, c)
        for p, c in zip(parameters, copies)
    )


def steps_recurrently(impl: str, tokens: int, chunk_size: int) -> bool:
    """Whether a ``chunked`` call on ``tokens`` tokens runs the recurrent loop instead.

    Fewer tokens than one chunk (a streaming step) would be padded to a whole chunk and pay for
    the (D, C, C) Toeplitz matrix: at D = 128, N = 16, C = 64 that is 2.2 ms for one token
    against 0.06 ms for the loop, which stays faster up to T = C − 1 (0.9 against 3.1 ms). A graph
    traced for any T (``token_count_is_dynamic``) takes the chunked path, which is right for every T.
    """
    return impl == "chunked" and not token_count_is_dynamic() and tokens < chunk_size


def run(impl: str, x: Tensor, coef: Coefficients, h0, chunk_size: int, prepared=None,
        need_state: bool = True, skip: Tensor | None = None, silu: bool = False):
    """Run path ``impl`` on x (B, L, D) from state h0 (see ``steps_recurrently``) -> (y (B, L, D), final state).

    y is the recurrence's output transformed as SiLU(y + skip ⊙ x) (``skip`` (D,) or None, ``silu``
    a bool), which the chunked path fuses into its own passes and the others apply after.
    ``prepared`` is what the path computes from the parameters alone, when the caller caches it
    (``RecurrenceMixer.prepared``): the FFT path's kernel spectrum, the chunked path's chunk
    weights, the native path's laid-out operands. ``need_state=False`` lets the FFT, chunked and
    native paths skip the final state (``fft``, ``chunked``, ``native``); the state is then None on those paths.

    The loop (and its native code) lets a NaN or infinity at step t reach steps >= t only. The FFT and the chunks' Toeplitz
    matmuls would multiply it by the zeros above the diagonal into earlier steps too, so they run on
    x with its non-finite values zeroed, and every output of a channel from its first non-finite
    input on, and its final state, is NaN (the loop may give ±inf there instead).
    """
    if steps_recurrently(impl, x.shape[1], chunk_size):
        y, h = recurrent(x, coef, h0)
        return _finish(y, x, skip, silu), h
    if impl == "native":
        return native(x, coef, h0, skip, silu, chunk_size, prepared, need_state)
    if impl == "chunked" and not torch.compiler.is_compiling():
        # The eager chunked path tells a finite x while it copies it in, saving a pass over x here.
        try:
            return chunked(x, coef, h0, chunk_size, skip, silu, need_state, prepared, finite_only=True)
        except NonFiniteInput:
            clean = False
    else:
        clean = masking.all_finite(x)
    finite_x, marks = (x, None) if clean else masking.zero_nonfinite(x)
    if impl == "chunked":
        y, h = chunked(finite_x, coef, h0, chunk_size, skip, silu, need_state, prepared)
    else:
        paths = {**PATHS, "fft": partial(fft, spectrum=prepared, need_state=need_state)}
        y, h = paths[impl](finite_x, coef, h0)
        y = _finish(y, finite_x, skip, silu)
    if clean:
        return y, h
    # Along time in place, not transposed: torch.export cannot tell a transposed tensor's strides
    # apart at length 1 and would specialise a graph traced for any length.
    nan_after = masking.nan_after(marks, dim=1)  # (B, L, D)
    # The contiguous operand first: the sum takes its layout, not that of y, which the traced
    # chunked path leaves permuted.
    y = nan_after + y
    if h is None:
        return y, None
    reached = torch.isnan(nan_after[:, -1])  # (B, D)
    h_re = masking.poison(h[0], reached)  # (B, D, N) rows of channel d
    h_im = None if h[1] is None else masking.poison(h[1], reached)
    return y, (h_re, h_im)


# FLOPs per state element of the elementwise linear algebra, real / complex recurrence:
# the update h = q·h + b·x (real: 2 multiplies, 1 add; complex: q·h is 4 multiplies and 2 adds, b·x
# adds 2 more), its readout Re Σ_n c·h (real: 1 multiply-add; complex: 2), the carry q^C·H + fed.
UPDATE_FLOPS = {False: 3, True: 8}
READOUT_FLOPS = {False: 2, True: 4}
CARRY_FLOPS = {False: 2, True: 8}


def fft_flops(size: int) -> float:
    """FLOPs of one real FFT (or inverse) of ``size`` points: 2.5·n·log2(n), half a complex one's 5·n·log2(n)."""
    return 2.5 * size * math.log2(size)


def path_stages(impl: str, batch: int, length: int, width: int, order: int, chunk_size: int, complex_: bool,
                cached: bool) -> Stages:
    """The stages of one direction of the recurrence on ``impl`` over x (B, L, D), without the parameters.

    Each path reads x and writes y (B, L, D) once; where y is written by another stage than the one
    that read x, the output's ω·x term reads x once more. What else each must pass between its stages:

    - ``recurrent`` and ``native``: nothing; the (B, D, N) state stays in cache (or registers) from one step to the next.
    - ``chunked`` (L padded to nC·C): the per-chunk weights built from the parameters (unless
      ``cached``: in eval mode without autograd) and read, (D, C, C + kN) (the Toeplitz block beside
      the input weights; k = 2 for a complex state) and (D, kN, C) (the readout); the intra-chunk
      outputs (B, nC·C, D); what each chunk feeds the state, and the state at each chunk's start,
      (B, nC, D, kN) each. The Toeplitz block is counted dense, C² per chunk
      and channel, as the path computes it with a plain matrix product.
    - ``fft`` (size n = 2L): x's spectrum (B, D, L + 1) complex; the kernel spectrum (D, L + 1) read,
      ``cached`` (in eval mode without autograd), else computed from the kernel (D, L) first.
    """
    k = 2 if complex_ else 1
    sequence = batch * length * width
    if impl in ("recurrent", "native"):
        return Stages(sequence * order * (UPDATE_FLOPS[complex_] + READOUT_FLOPS[complex_]), sequence, sequence)
    if impl == "chunked":
        chunks = -(-length // chunk_size)
        padded = batch * chunks * chunk_size * width
        states = batch * chunks * width * k * order
        feed_weights, readout_weights = width * chunk_size * (chunk_size + k * order), width * k * order * chunk_size
        weights = Stages() if cached else Stages(2 * k * width * order * chunk_size, 0, feed_weights + readout_weights)
        intra = Stages(2 * padded * (chunk_size + k * order), sequence + feed_weights, padded + states)
        carry = Stages(CARRY_FLOPS[complex_] * batch * chunks * width * order, states, states)
        readout = Stages(2 * padded * k * order, states + readout_weights + padded + sequence, sequence)
        return weights + intra + carry + readout
    size, bins = 2 * length, length + 1
    spectra = 2 * batch * width * bins  # complex (B, D, L + 1) as real numbers
    kernel = Stages() if cached else Stages(
        2 * k * width * order * length + width * fft_flops(size), width * length, width * length + 2 * width * bins
    )
    transform = Stages(batch * width * fft_flops(size), sequence, spectra)
    # The product with the kernel spectrum (6 FLOPs per complex bin) runs inside the inverse transform's read.
    inverse = Stages(batch * width * (fft_flops(size) + 6 * bins), spectra + 2 * width * bins + sequence, sequence)
    return kernel + transform + inverse


class RecurrenceMixer(Mixer):
    """Base of the mixers this engine computes (EMA, CEMA): their paths and what they tell the rest of seqmix.

    Subclasses set ``chunk_size`` (C of the chunked path), ``order`` (N) and ``complex_state`` (a
    complex h, as real and imaginary parts), and run ``run``.
    """

    complex_state: ClassVar[bool] = False

    impls: ClassVar[tuple[str, ...]] = tuple(PATHS)
    default_impl: ClassVar[str] = "chunked"
    # Exported graphs need plain matmuls: the FFT path needs DFT, the loop a Loop over L. Native code
    # is a call tracers cannot see into: compiled and exported graphs take the chunked path instead.
    lowered_impls: ClassVar[dict[str, dict[str, str]]] = {"export": {"recurrent": "chunked", "fft": "chunked", "native": "chunked"},
                                                         "inductor": {"native": "chunked"}}
    cpu_only_impls: ClassVar[dict[str, str]] = {"native": NATIVE_ELSEWHERE}
    chunk_size: int

    def complexity(self) -> str:
        return {"recurrent": "O(L·D·N), sequential", "fft": "O(L·log L·D + L·D·N)", "chunked": "O(L·C·D + L·D·N)",
                "native": "O(L·D·N), sequential, vectorised over D"}[self.impl]

    def impl_for_tokens(self, tokens: int) -> str:
        return "recurrent" if steps_recurrently(self.impl, tokens, self.chunk_size) else self.impl

    def prepared(self, coefficients: Callable[[], Coefficients], dtype: torch.dtype, length: int,
                 direction: str = "forward", skip: Tensor | None = None) -> tuple[Coefficients, object | None]:
        """The recurrence's coefficients in ``dtype`` (``coefficients()`` computes them) and what the
        path computes from the parameters alone: the FFT path's kernel spectrum for length L, the
        chunked path's ``chunk_weights`` or the native path's ``native_operands`` (any L); both
        cached while nothing needs their gradient.

        In eval mode, outside autograd and tracing, these depend only on the path, L (the FFT's),
        the dtype, the device, whether ``skip`` (a parameter) rides on them, and the parameters'
        values, so they are kept, keyed by the first five, for as long as the parameters hold the
        values they were computed from. The values are compared, not version counters: writes
        through ``.data`` (weight averaging, ``vector_to_parameters``) change a parameter without
        bumping its version. Without the cache ``impl=fft`` recomputed D·N·L powers on every call,
        the chunked path its (D, C, C) Toeplitz block, and every path its coefficients (the native
        path also laid them out again: a third of its call at L = 4096, most of a one-token step).
        The second item is None when they must be computed with the call (training, autograd,
        tracing, or the loop, which has nothing to prepare).
        """
        # The cheap tests first: every call of every path (a one-token step included) asks.
        impl = self.impl_for_tokens(length)
        if impl not in ("fft", "chunked", "native") or self.training or torch.compiler.is_compiling():
            return coefficients(), None
        parameters = list(self.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in parameters):
            return coefficients(), None
        computed_from = self.__dict__.get("_prepared_from")
        if computed_from is None or not _same_values(parameters, computed_from):
            # A few (D, N) tensors: comparing them costs microseconds, a stale entry a wrong output.
            self.__dict__["_prepared_from"] = [p.detach().clone() for p in parameters]
            self.__dict__["_prepared"] = {}
        key = (impl, length if impl == "fft" else None, dtype, parameters[0].device, direction, skip is not None)
        cache = self.__dict__["_prepared"]
        if key not in cache:
            if len(cache) >= PREPARED_KEPT:
                cache.pop(next(iter(cache)))
            coef = coefficients()
            if impl == "fft":
                cache[key] = coef, kernel_spectrum(coef, length, coef.log_r.device)
            elif impl == "chunked":
                cache[key] = coef, chunk_weights(coef, self.chunk_size, skip)
            else:
                cache[key] = coef, native_operands(coef, self.d_model, skip)
        return cache[key]

    def length_unit(self) -> int:
        return self.chunk_size

    @property
    def directions(self) -> int:
        """Recurrences run per call: 2 for a bidirectional mixer, one per direction."""
        return 1 if self.causal else 2

    def stages(self, batch_size: int, length: int, pass_: str) -> Stages:
        """``path_stages`` once per direction; a second direction also reads the first one's output to add it."""
        impl = self.impl_for_tokens(length)
        cached = impl != "recurrent" and pass_ == "forward"
        one = path_stages(impl, batch_size, length, self.d_model, self.order, self.chunk_size, self.complex_state, cached)
        combine = Stages(reads=(self.directions - 1) * batch_size * length * self.d_model)
        return one * self.directions + combine + parameter_reads(self)

    @classmethod
    def search_knobs(cls, options: dict) -> dict[str, int]:
        return {"chunk_size": 1, "ema_order": 1}

    @classmethod
    def apply_search_knobs(cls, options: dict, knobs: dict[str, int]) -> None:
        options.update({key: knobs[knob] for knob, key in (("ema_order", "order"), ("chunk_size", "chunk_size")) if knob in knobs})

