"""The TCN mixer: receptive field, streaming in pieces, padding, option validation, and its paths held to ``conv``."""
import itertools
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from mixer_cases import assert_streams_alike
from torch import nn

from seqmix import SeqmixError, build_mixer
from seqmix.operators import tcn as tcn_module
from seqmix.operators.tcn import TCN


@pytest.mark.parametrize(("K", "f", "depth"), [(4, 4, 2), (2, 2, 3), (3, 1, 4), (3, 2, 3), (2, 3, 2)])
def test_impulse_reaches_exactly_the_receptive_field(K, f, depth):
    torch.manual_seed(0)
    tcn = TCN(3, kernel_size=K, dilation_base=f, depth=depth, activation="none", residual=False).double()
    with torch.no_grad():
        # Positive taps rule out cancellations, so every reachable offset really changes the output;
        # omega = 0 leaves the stack (linear here) as the only path from input to output.
        for conv in tcn.convs:
            conv.weight.uniform_(0.5, 1.5)
        tcn.omega.zero_()
    rf = tcn.receptive_field
    assert rf == 1 + (K - 1) * sum(f**i for i in range(depth))
    if f == K:
        assert rf == K**depth
    if f == 1:
        assert rf == 1 + depth * (K - 1)

    t, length = 5, 5 + rf + 4
    zero = torch.zeros(2, length, 3, dtype=torch.float64)
    impulse = zero.clone()
    impulse[:, t, :] = 1.0
    changed = (tcn(impulse) != tcn(zero)).any(dim=-1)  # (B, L)
    # Offsets reached are the sums Σ k_i·f^i with 0 <= k_i < K: contiguous 0 .. RF−1 when f <= K.
    offsets = {sum(k * f**i for i, k in enumerate(ks)) for ks in itertools.product(range(K), repeat=depth)}
    assert max(offsets) == rf - 1
    if f <= K:
        assert offsets == set(range(rf))
    expected = torch.zeros(length, dtype=torch.bool)
    expected[[t + o for o in offsets]] = True
    assert torch.equal(changed, expected.expand(2, length))
    assert not changed[:, t + rf].any()


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("activation", ["none", "silu", "gelu"])
def test_step_in_pieces_matches_forward(activation, residual):
    torch.manual_seed(1)
    tcn = TCN(4, kernel_size=3, dilation_base=2, depth=3, activation=activation, residual=residual).double()
    largest = max(tcn.windows)  # 8
    pieces = [1, 3, largest + 5, 1, 2, 7, 1]
    x = torch.randn(2, sum(pieces), 4, dtype=torch.float64)

    state = tcn.init_state(2)
    outs = []
    for piece in x.split(pieces, dim=1):
        y, state = tcn.step(piece, state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, dim=1), tcn(x), rtol=0, atol=1e-12)

    y_once, state_once = tcn.step(x, tcn.init_state(2))
    torch.testing.assert_close(y_once, tcn(x), rtol=0, atol=1e-12)
    assert [s.shape for s in state.tcn] == [(2, 4, w) for w in tcn.windows]
    for got, want in zip(state, state_once):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert tcn.state_size() == 4 * sum(tcn.windows)


@pytest.mark.parametrize("impl", TCN.impls)
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("activation", ["none", "silu", "gelu"])
def test_forward_and_gradients_follow_the_equations(activation, residual, impl):
    torch.manual_seed(3)
    tcn = TCN(4, kernel_size=3, dilation_base=2, depth=3, activation=activation, residual=residual, impl=impl).double()
    x = torch.randn(3, 30, 4, dtype=torch.float64, requires_grad=True)
    act = {"none": lambda h: h, "silu": F.silu, "gelu": F.gelu}[activation]
    # Independent of the module's own padding and layout: symmetric padding, then drop the look-ahead.
    h = x.transpose(1, 2)
    for i, conv in enumerate(tcn.convs):
        pad = 2 * 2**i
        out = F.conv1d(h, conv.weight, conv.bias, padding=pad, dilation=2**i, groups=4)[..., :-pad]
        out = act(out) if i < 2 else out
        h = h + out if residual else out
    expected = F.silu(h.transpose(1, 2) + tcn.omega * x)
    got = tcn(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # Gradients of one random projection of the outputs, for the input and every parameter.
    projection = torch.randn_like(expected)
    wrt = [x, *tcn.parameters()]
    for got_grad, want_grad in zip(torch.autograd.grad((got * projection).sum(), wrt),
                                   torch.autograd.grad((expected * projection).sum(), wrt), strict=True):
        torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("activation", ["none", "silu", "gelu"])
def test_the_channels_last_inference_path_equals_the_convolution_with_padding_and_state(activation, residual):
    """Without autograd the channels-last path runs its activations and sums in place, into the next
    layer's context: outputs and states after a padded prefill and one more call equal ``conv``'s."""
    torch.manual_seed(4)
    conv = TCN(4, kernel_size=3, dilation_base=2, depth=3, activation=activation, residual=residual, impl="conv").double()
    fast = TCN(4, kernel_size=3, dilation_base=2, depth=3, activation=activation, residual=residual, impl="channels_last").double()
    fast.load_state_dict(conv.state_dict())
    x = torch.randn(2, 21, 4, dtype=torch.float64)
    mask = torch.zeros(2, 21, dtype=torch.bool)
    mask[0, :5] = True  # left padding of the first row
    with torch.no_grad():
        torch.testing.assert_close(fast(x, mask), conv(x, mask), rtol=0, atol=1e-12)
        states = []
        for mixer in (conv, fast):
            y, state = mixer.step(x[:, :13], mixer.init_state(2))
            y_next, state = mixer.step(x[:, 13:], state)
            states.append((torch.cat([y, y_next], dim=1), state))
    (y_conv, state_conv), (y_fast, state_fast) = states
    torch.testing.assert_close(y_fast, y_conv, rtol=0, atol=1e-12)
    for got, want in zip(state_fast.tcn, state_conv.tcn, strict=True):
        assert got.is_contiguous() and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_the_channels_last_path_gives_the_bf16_outputs_of_the_convolution_it_runs_under_autograd():
    """Under bf16 autocast the in-place sums keep the dtype the out-of-place ones promote to, and
    the channels-last kernel agrees with the channel-major one to bf16's rounding."""
    torch.manual_seed(5)
    fast = TCN(8, impl="channels_last")
    x = torch.randn(2, 40, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recorded = fast(x)
        with torch.no_grad():
            in_place = fast(x)
    assert in_place.dtype == recorded.dtype
    torch.testing.assert_close(in_place, recorded.detach(), rtol=2e-2, atol=2e-2)


def test_the_default_path_runs_the_channels_last_kernel_whether_or_not_autograd_records():
    """``channels_last``, the default: the 2-D channels-last kernel in inference and whenever
    autograd records, whether for x or the parameters; never ``nn.Conv1d``'s channel-major one."""
    torch.manual_seed(6)
    tcn = TCN(8, depth=2)
    assert tcn.impl == "channels_last"
    x = torch.randn(2, 40, 8)

    def kernels(call) -> tuple[int, int]:
        with mock.patch.object(tcn_module.F, "conv2d", wraps=F.conv2d) as conv2d, \
                mock.patch.object(nn.modules.conv.F, "conv1d", wraps=F.conv1d) as conv1d:
            call()
        return conv2d.call_count, conv1d.call_count

    assert kernels(lambda: tcn(x)) == (2, 0)  # the parameters require grad
    assert kernels(lambda: tcn(x.requires_grad_(True))) == (2, 0)
    with torch.no_grad():
        assert kernels(lambda: tcn(x)) == (2, 0)
    with torch.inference_mode():
        assert kernels(lambda: tcn(x.detach())) == (2, 0)
    tcn.requires_grad_(False)
    assert kernels(lambda: tcn(x.detach())) == (2, 0)


def test_left_padding_acts_as_if_absent():
    torch.manual_seed(2)
    tcn = TCN(4, kernel_size=2, dilation_base=2, depth=3).double()
    x = torch.randn(3, 12, 4, dtype=torch.float64)
    garbage = torch.full((3, 5, 4), 1e6, dtype=torch.float64)
    mask = torch.zeros(3, 17, dtype=torch.bool)
    mask[:, :5] = True
    # Biases make the hidden values at padded positions nonzero; zeroing every layer's input
    # (not just x) is what keeps them out.
    padded_out = tcn(torch.cat([garbage, x], dim=1), mask)
    torch.testing.assert_close(padded_out[:, 5:], tcn(x), rtol=0, atol=1e-12)


def test_padded_values_never_reach_unpadded_outputs():
    torch.manual_seed(2)
    tcn = TCN(4, kernel_size=2, dilation_base=2, depth=3).double()
    x = torch.randn(3, 20, 4, dtype=torch.float64)
    mask = torch.rand(3, 20) < 0.3
    garbage = x.masked_fill(mask.unsqueeze(-1), 1e6)
    kept = ~mask
    torch.testing.assert_close(tcn(garbage, mask)[kept], tcn(x, mask)[kept], rtol=0, atol=0)


def test_registered_under_tcn():
    tcn = build_mixer("tcn", 8, kernel_size=2, dilation_base=2, depth=5)
    assert isinstance(tcn, TCN)
    assert tcn.receptive_field == 32
    assert tcn(torch.randn(1, 6, 8)).shape == (1, 6, 8)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"kernel_size": 1}, "kernel_size"),
        ({"kernel_size": 2.0}, "kernel_size"),
        ({"kernel_size": True}, "kernel_size"),
        ({"dilation_base": 0}, "dilation_base"),
        ({"depth": 0}, "depth"),
        ({"depth": "4"}, "depth"),
        ({"activation": "relu"}, "activation"),
        ({"residual": 1}, "residual"),
        ({"causal": False}, "causal"),
        ({"impl": "fft"}, "impl"),
    ],
)
def test_bad_options_name_the_field(options, field):
    with pytest.raises(SeqmixError, match=field):
        TCN(4, **options)


@pytest.mark.parametrize("activation", ["none", "silu", "gelu"])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("slab_bytes", [tcn_module.TAP_SLAB_BYTES, 1])
def test_the_channels_last_backward_equals_the_convolutions_through_a_state_and_under_autocast(activation, residual,
                                                                                              slab_bytes, monkeypatch):
    """While autograd records, ``channels_last`` runs its kernel with its own backward
    (``_DepthwiseConvRows``): outputs, next windows and the gradients of x, of a start state and of
    every parameter equal ``conv``'s (float64, a streamed step, and a padded batch), and under bf16
    autocast the gradients come back in the operands' dtype. The weight gradient sums its products
    in one slab of steps here, and with the smallest slabs (TAP_SLAB_MIN_ROWS = 16 steps) in two
    and three, the last one partial."""
    monkeypatch.setattr(tcn_module, "TAP_SLAB_BYTES", slab_bytes)
    torch.manual_seed(7)
    options = dict(kernel_size=3, dilation_base=3, depth=3, activation=activation, residual=residual)
    conv = TCN(6, impl="conv", **options).double()
    fast = TCN(6, impl="channels_last", **options).double()
    fast.load_state_dict(conv.state_dict())
    x = torch.randn(3, 25, 6, dtype=torch.float64, requires_grad=True)
    state = tuple(torch.randn_like(w).requires_grad_(True) for w in conv.init_state(3).tcn)
    mask = torch.zeros(3, 25, dtype=torch.bool)
    mask[1, :7] = True  # a left-padded row
    projection = torch.randn(3, 25, 6, dtype=torch.float64)
    for start, padding in ((state, None), (None, mask)):
        results = []
        for mixer in (conv, fast):
            y, after = mixer._run(x, padding, None if start is None else type(conv.init_state(3))(start))
            loss = (y * projection).sum() + sum((w * w.flip(-1)).sum() for w in after.tcn)
            results.append((y, *after.tcn, *torch.autograd.grad(loss, [x, *(start or ()), *mixer.parameters()])))
        for got, want in zip(results[1], results[0], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    conv, fast = conv.float(), fast.float()
    x = torch.randn(2, 40, 6, requires_grad=True)
    grads = []
    for mixer in (conv, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = mixer(x)
        grads.append(torch.autograd.grad(y.float().sum(), [x, *mixer.parameters()]))
    for got, want in zip(grads[1], grads[0], strict=True):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)


# The ``native`` path: tcn_native.cpp, one C++ pass per layer, held to ``conv``.

def _native_pair(width: int, **options) -> tuple[TCN, TCN]:
    """A ``conv`` TCN and a ``native`` one with the same parameters, in float64."""
    reference = TCN(width, impl="conv", **options).double()
    fast = TCN(width, impl="native", **options).double()
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def _streamed_step_and_grads(mixer: TCN, x: torch.Tensor, start: tuple[torch.Tensor, ...] | None,
                             mask: torch.Tensor | None, projection: torch.Tensor):
    """y and the next windows of one step from ``start`` (or of the whole sequence with ``mask``
    when ``start`` is None), and the gradients of a loss that reads both, for x, the start windows
    and every parameter."""
    if start is None:
        y, after = mixer._run(x, mask, None)
    else:
        y, after = mixer.step(x, type(mixer.init_state(1))(start))
    loss = (y * projection).sum() + sum((w * w.flip(-1)).sum() for w in after.tcn)
    wrt = [*([x] if x.requires_grad else []), *(start or ()), *mixer.parameters()]
    return y, after, torch.autograd.grad(loss, wrt)


@pytest.mark.native
@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3), width=st.integers(1, 19), kernel_size=st.integers(2, 4), dilation_base=st.integers(1, 3),
    depth=st.integers(1, 3), length=st.integers(1, 300), activation=st.sampled_from(["none", "silu", "gelu"]),
    residual=st.booleans(), start=st.sampled_from(["zeros", "state", "mask"]), x_grad=st.booleans(),
    threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16),
)
def test_native_equals_conv_with_its_windows_and_every_gradient(batch, width, kernel_size, dilation_base, depth, length,
                                                                 activation, residual, start, x_grad, threads, seed):
    """float64 to rounding: widths across a vector (8 lanes) and its tail, lengths shorter and
    longer than each layer's window, B·T rows across the kernel's tiles of 256, every activation, with and without the residual, from zeros,
    from a start state that takes gradients, or with a padding mask; the next windows enter the
    loss, so their gradients flow back too; x itself with or without a gradient (the first layer's
    input gradient is then skipped). One and two threads (the parameter gradients are summed per
    thread, and the backward's ranges of rows recompute the window past their ends). From a start
    state, the same step without autograd too, where the kernel gathers from the state's layout."""
    torch.manual_seed(seed)
    reference, fast = _native_pair(width, kernel_size=kernel_size, dilation_base=dilation_base, depth=depth,
                                   activation=activation, residual=residual)
    x = torch.randn(batch, length, width, dtype=torch.float64, requires_grad=x_grad)
    projection = torch.randn(batch, length, width, dtype=torch.float64)
    state = mask = None
    if start == "state":
        state = tuple(torch.randn_like(w).requires_grad_(True) for w in reference.init_state(batch).tcn)
    elif start == "mask":
        mask = torch.rand(batch, length) < 0.3
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        want = _streamed_step_and_grads(reference, x, state, mask, projection)
        got = _streamed_step_and_grads(fast, x, state, mask, projection)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    for window, window_ref in zip(got[1].tcn, want[1].tcn, strict=True):
        assert window.shape == window_ref.shape
        torch.testing.assert_close(window, window_ref, rtol=1e-10, atol=1e-12)
    for grad, grad_ref in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-10)
    if state is not None:
        # Without autograd the kernel reads the state's (B, D, window) layout itself.
        with torch.no_grad():
            states = [type(mixer.init_state(1))(state) for mixer in (reference, fast)]
            (y_ref, after_ref), (y, after) = reference.step(x, states[0]), fast.step(x, states[1])
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(after.tcn, after_ref.tcn, rtol=1e-10, atol=1e-12)


@pytest.mark.native
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("layout", ["scalar", "row", "strided", "transposed", "none"])
def test_native_reads_the_gradient_reaching_its_output_in_any_layout(layout, residual):
    """The last layer's backward reads the gradient reaching the output in place, by its strides:
    an expanded scalar (what ``y.sum()`` sends), one (D,) row expanded over batch and steps, every
    other step of a longer tensor, a (B, D, T) tensor transposed, and none at all (only the next
    windows used); gradients of x and every parameter against ``conv``'s."""
    torch.manual_seed(4)
    batch, width, length = 2, 11, 150
    reference, fast = _native_pair(width, kernel_size=3, dilation_base=2, depth=3, residual=residual)
    x = torch.randn(batch, length, width, dtype=torch.float64, requires_grad=True)
    grad_y = {"scalar": torch.randn(1, 1, 1, dtype=torch.float64).expand(batch, length, width),
              "row": torch.randn(width, dtype=torch.float64).expand(batch, length, width),
              "strided": torch.randn(batch, 2 * length, width, dtype=torch.float64)[:, ::2],
              "transposed": torch.randn(batch, width, length, dtype=torch.float64).transpose(1, 2), "none": None}[layout]

    def grads(mixer: TCN):
        y, after = mixer._run(x, None, None)
        if grad_y is None:
            outputs, grad_outputs = [sum((w * w.flip(-1)).sum() for w in after.tcn)], None
        else:
            outputs, grad_outputs = [y], [grad_y]
        return torch.autograd.grad(outputs, [x, *mixer.parameters()], grad_outputs, allow_unused=True, materialize_grads=True)

    for grad, grad_ref in zip(grads(fast), grads(reference), strict=True):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-10)


@pytest.mark.native
def test_native_in_float32_matches_conv_training_eval_and_streaming():
    """The mixer as users build it (D = 40: two float32 vectors and a partial one; the default
    four layers, windows up to 192), a length past the largest window: training outputs and
    gradients, the eval output with a padding mask, and a stream of steps carrying the state."""
    torch.manual_seed(0)
    reference = build_mixer("tcn", 40, impl="conv")
    fast = build_mixer("tcn", 40, impl="native")
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(2, 389, 40, requires_grad=True)
    weights = torch.randn(2, 389, 40)
    grads = [torch.autograd.grad((mixer(x) * weights).sum(), [x, *mixer.parameters()]) for mixer in (reference, fast)]
    for grad, grad_ref in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-4)
    mask = torch.zeros(2, 389, dtype=torch.bool)
    mask[1, :50] = True
    with torch.inference_mode():
        torch.testing.assert_close(fast(x, mask), reference(x, mask), rtol=1e-5, atol=1e-5)
        assert_streams_alike(reference, fast, x, 97, rtol=1e-5, atol=1e-5)


@pytest.mark.native
def test_native_refuses_other_dtypes_devices_and_mismatched_parameters_by_name():
    """The contract hands ``mix`` x in the parameters' dtype; a bf16 model is refused by dtype, and
    parameters left in another dtype than x (a direct ``mix`` call) are named before native code
    reads their memory."""
    with pytest.raises(SeqmixError, match=r"tcn impl='native' runs in float32 or float64, not torch.bfloat16"):
        TCN(8, impl="native").bfloat16()(torch.randn(1, 5, 8, dtype=torch.bfloat16))
    tcn = TCN(8, impl="native")
    with pytest.raises(SeqmixError, match=r"parameter omega is torch.float32 on cpu, x is torch.float64"):
        tcn.mix(torch.randn(1, 5, 8, dtype=torch.float64), None)
    if torch.cuda.is_available():
        with pytest.raises(SeqmixError, match=r"runs on the CPU, and x is on cuda"):
            tcn.cuda()(torch.randn(1, 5, 8, device="cuda"))


@pytest.mark.native
def test_native_is_traced_as_conv_and_lowerings_switch_it():
    """Tracers cannot see into native code: exporters take ``conv`` and Inductor ``taps``, and a
    graph traced from a native TCN anyway holds the convolutions and equals it."""
    assert TCN.lowered_impls["export"]["native"] == "conv" and TCN.lowered_impls["inductor"]["native"] == "taps"
    torch.manual_seed(0)
    tcn = TCN(8, impl="native").eval()
    x = torch.randn(1, 70, 8)
    graph = torch.export.export(tcn, (x,))
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert any("conv" in target for target in targets), targets
    torch.testing.assert_close(graph.module()(x), tcn(x), rtol=1e-5, atol=1e-6)


@pytest.mark.native
def test_native_inference_keeps_two_sequences_alive_whatever_the_depth():
    """Without autograd (``no_grad`` too, where the parameters still require grad) each layer's
    input is freed once the next is written: the peak of allocations is two (B, T, D) sequences
    at depth 1 and at depth 6, where training keeps every layer's input."""
    from seqmix.export.bench.measure import peak_memory_bytes

    x = torch.randn(1, 2048, 64)
    sequence = x.numel() * x.element_size()
    for depth in (1, 6):
        tcn = TCN(64, kernel_size=2, dilation_base=2, depth=depth, impl="native")

        def infer():
            with torch.no_grad():
                tcn(x)

        infer()
        assert peak_memory_bytes(infer, torch.device("cpu")) < 2.5 * sequence, depth
