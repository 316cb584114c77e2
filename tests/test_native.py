"""The EMA's and CEMA's ``native`` path: the loop as C++, held to the reference loop, and the code that builds it.

``recurrence.native`` runs recurrence_native.cpp, built on first use by ``seqmix.native``. The
kernel vectorises across channels (8 float64 or 16 float32 lanes), takes the states four at a time
(two in the complex recurrence's adjoint) and the steps in segments of 128, keeping the state every 64 steps for its adjoint; these tests
draw widths, orders and lengths across all three boundaries and compare outputs, final states and
every gradient with the literal loop (``recurrence.recurrent`` followed by the skip and the SiLU).
"""
from __future__ import annotations

import os
import stat

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from mixer_cases import assert_streams_alike
from test_chunked_carry import assert_equals_the_loop

import seqmix
from seqmix import native
from seqmix.errors import SeqmixError
from seqmix.operators import recurrence

NATIVE = pytest.mark.native


@NATIVE
@settings(max_examples=40, deadline=None)
@given(
    complex_=st.booleans(), batch=st.integers(1, 3), width=st.integers(1, 19), order=st.integers(1, 10),
    length=st.integers(1, 300), with_state=st.booleans(), with_skip=st.booleans(), silu=st.booleans(),
    threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**16),
)
def test_native_equals_the_loop_with_its_state_and_every_gradient(complex_, batch, width, order, length, with_state, with_skip,
                                                                  silu, threads, seed):
    """float64 to rounding: widths across a vector (8 lanes), orders across a group of states (4, 2 in the complex adjoint,
    and 8 in the real forward, taken where N padded to a multiple of 4 is a multiple of 8: 5-8, not 9-10),
    lengths across checkpoints (64) and segments (128), a start state, the skip and the SiLU, on one, two and three
    threads (whose shares of the (batch row, block) pairs end in part of a tile, and may hold none)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_equals_the_loop(lambda x, coef, h0, skip, silu: recurrence.native(x, coef, h0, skip, silu), complex_, batch, width,
                               order, length, with_state, with_skip, silu, seed, rtol=1e-10, grad_rtol=1e-9)
    finally:
        torch.set_num_threads(previous)


@NATIVE
@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("batch, width, threads", [(1, 5, 3), (3, 17, 2), (2, 17, 4)])
def test_native_splits_the_pairs_over_threads_in_tiles_that_need_not_fill(complex_, batch, width, threads):
    """Each thread takes a share of the (batch row, block) pairs, which the adjoint works through two
    pairs at a time: one block on three threads (two of them with no pairs); nine pairs on two
    (shares of four and five, a tile across two batch rows, a last tile of one pair); six on four
    (shares of one and two pairs: a tile ends at its share's end, not in the next share). Outputs,
    state and gradients against the loop, over lengths past a segment."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_equals_the_loop(lambda x, coef, h0, skip, silu: recurrence.native(x, coef, h0, skip, silu), complex_, batch,
                               width, 5, 2 * 128 + 70, True, True, True, seed=5, rtol=1e-10, grad_rtol=1e-9)
    finally:
        torch.set_num_threads(previous)


@NATIVE
@pytest.mark.parametrize("complex_", [False, True])
def test_native_writes_outputs_past_the_cache_around_it_and_still_equals_the_loop(complex_):
    """Outputs of 2 MiB and more (x here: 4.5 MB of float64) are written with streaming stores,
    beside the plain stores of a partial vector (D = 268: 33 vectors of 8 and one of 4): outputs,
    state and gradients against the loop."""
    assert_equals_the_loop(lambda x, coef, h0, skip, silu: recurrence.native(x, coef, h0, skip, silu), complex_, 1, 268,
                           5, 2 * 1024 + 70, True, True, True, seed=3, rtol=1e-10, grad_rtol=1e-9)


@NATIVE
@pytest.mark.parametrize("name", ["ema", "cema"])
def test_native_mixers_in_float32_match_the_loop_forward_streaming_and_backward(name):
    """The mixers as users build them (D = 40: two float32 vectors and a partial one), a length of
    three segments and a bit: training outputs and gradients, the eval output with its SiLU fused,
    and a stream of steps carrying the state, against ``impl="recurrent"``."""
    torch.manual_seed(0)
    reference = seqmix.build_mixer(name, 40, impl="recurrent")
    fast = seqmix.build_mixer(name, 40, impl="native")
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3 * 128 + 5, 40, requires_grad=True)
    weights = torch.randn(2, 3 * 128 + 5, 40)
    grads = [torch.autograd.grad((mixer(x) * weights).sum(), [x, *mixer.parameters()]) for mixer in (reference, fast)]
    for grad, grad_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(grad, grad_ref, rtol=2e-4, atol=2e-5)
    with torch.inference_mode():
        torch.testing.assert_close(fast.eval()(x), reference.eval()(x), rtol=1e-4, atol=1e-5)
        assert_streams_alike(reference, fast, x[:, :150], 50, rtol=1e-4, atol=1e-5)


def silu_probe(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, recurrence.Coefficients]:
    """Values x (W,) for the SiLU tests below, the skip (W,) that multiplies them, and a one-state
    recurrence of W channels with b = 0, which adds nothing: its output is SiLU(skip ⊙ x). x spans
    ±1e-30 .. ±1e30, the range where e^y leaves the normal numbers until SiLU's own e^-y overflows
    (about -87 to -88.7 in float32, -708 to -709.8 in float64), ±0, NaN, and the largest finite
    values, which a skip of 10 turns into ±inf (an infinite x would meet b = 0 in the state and
    make it NaN)."""
    magnitudes = torch.logspace(-30, 30, 2001, dtype=torch.float64)
    edges = torch.linspace(-760, 100, 8601, dtype=torch.float64)
    largest = torch.finfo(dtype).max
    values = torch.cat([magnitudes, -magnitudes, edges, torch.tensor([0.0, -0.0, float("nan"), largest, -largest],
                                                                      dtype=torch.float64)]).to(dtype)
    skip = torch.ones_like(values)
    skip[-2:] = 10.0
    width = values.numel()
    coef = recurrence.Coefficients(log_r=torch.full((width, 1), -0.1, dtype=dtype), phase=None,
                                   b=torch.zeros(width, 1, dtype=dtype), c=(torch.ones(width, 1, dtype=dtype), None))
    return values, skip, coef


@NATIVE
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_fused_silu_is_torchs_silu_from_tiny_to_huge_and_at_inf_and_nan(dtype):
    """The kernel's own exponential against torch's SiLU over ``silu_probe``'s values: the output
    SiLU(skip ⊙ x) of a recurrence that adds nothing."""
    values, skip, coef = silu_probe(dtype)
    width = values.numel()
    with torch.inference_mode():
        y, _ = recurrence.native(values.view(1, 1, width), coef, skip=skip, silu=True)
    expected = F.silu(skip * values)
    assert expected[-2] == float("inf") and expected[-1].isnan()
    tolerance = {torch.float32: dict(rtol=4e-7, atol=1e-42), torch.float64: dict(rtol=1e-14, atol=1e-320)}[dtype]
    torch.testing.assert_close(y.view(-1), expected, equal_nan=True, **tolerance)
    # Signs too (-0 where torch returns -0), but not at ±0 itself: y + 0 turns -0 into +0 before the SiLU.
    nonzero = values != 0
    assert torch.equal(torch.signbit(y.view(-1)[nonzero]), torch.signbit(expected[nonzero]))


@NATIVE
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_slope_the_forward_keeps_gives_torchs_silu_gradient_from_tiny_to_huge_and_at_inf_and_nan(dtype):
    """While training, the forward keeps SiLU' of the sums from the exponential its SiLU computes,
    and the adjoint multiplies the incoming gradient by it: with b = 0, dy/dx = skip ⊙ SiLU'(skip ⊙ x),
    against torch's gradient of its SiLU over ``silu_probe``'s values (NaN where torch's is)."""
    values, skip, coef = silu_probe(dtype)
    width = values.numel()
    x = values.view(1, 1, width).clone().requires_grad_(True)
    y, _ = recurrence.native(x, coef, skip=skip, silu=True)
    weights = torch.linspace(0.5, 2.0, width, dtype=dtype).view(1, 1, width)
    (grad,) = torch.autograd.grad((y * weights).sum(), x)
    reference = x.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((F.silu(skip * reference) * weights).sum(), reference)
    assert expected.view(-1)[-3:].isnan().all()
    tolerance = {torch.float32: dict(rtol=1e-6, atol=1e-42), torch.float64: dict(rtol=1e-14, atol=1e-320)}[dtype]
    torch.testing.assert_close(grad, expected, equal_nan=True, **tolerance)


@NATIVE
@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("dtype, weight, state", [
    (torch.float64, 0.0, 0.0),     # b = 0 on a zero state: carried divided by b
    (torch.float64, 0.0, 1.5),     # b = 0 on a nonzero state: h / b would be infinite
    (torch.float32, 1e-30, 1e20),  # h / b overflows float32
    (torch.float32, 1e-30, 1e-5),  # h / b is finite: carried divided by b
    (torch.float64, float("inf"), 1.5),  # an infinite b: inf * 0 must stay NaN, as in the loop
])
def test_states_carried_divided_by_b_or_not_equal_the_loop(complex_, dtype, weight, state):
    """Over a segment the kernel carries each state divided by its input weight b, and keeps the
    plain recurrence where a state cannot be divided (b = 0, or a quotient past the dtype's range) or
    where a b is infinite: each against the loop, with some b set to ``weight`` and the start state
    to ``state`` there."""
    generator = torch.Generator().manual_seed(3)
    width, order, length = 20, 5, 300
    log_r = -0.5 * torch.rand(width, order, generator=generator, dtype=dtype) - 1e-3
    b = torch.rand(width, order, generator=generator, dtype=dtype) + 0.5
    b[::3, 1::2] = weight
    phase = torch.rand(width, order, generator=generator, dtype=dtype) if complex_ else None
    c = tuple(torch.randn(width, order, generator=generator, dtype=dtype) for _ in range(2))
    coef = recurrence.Coefficients(log_r=log_r, phase=phase, b=b, c=(c[0], c[1] if complex_ else None))
    h0 = tuple(torch.randn(2, width, order, generator=generator, dtype=dtype) for _ in range(2))
    for part in h0:
        part[:, ::3, 1::2] = state
    h0 = h0 if complex_ else (h0[0], None)
    x = torch.randn(2, length, width, generator=generator, dtype=dtype)
    x[:, 0, ::3] = 0.0  # b x is inf * 0 there when b is infinite
    y, h = recurrence.native(x, coef, h0)
    y_ref, h_ref = recurrence.recurrent(x, coef, h0)
    rtol = {torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    # Absolute tolerances scale with the largest finite value: a state of 1e20 makes outputs whose
    # states cancel. Non-finite values must match exactly (NaN where NaN, inf where inf).
    for value, reference in [(y, y_ref), *((part, ref) for part, ref in zip(h, h_ref) if ref is not None)]:
        largest = reference[reference.isfinite()].abs().max().item()
        torch.testing.assert_close(value, reference, rtol=rtol, atol=rtol * largest, equal_nan=True)


@NATIVE
@pytest.mark.parametrize("layout", ["scalar", "row", "strided", "transposed", "none"])
def test_gradients_that_reach_the_output_in_any_layout_equal_the_loops(layout):
    """The adjoint reads the gradient reaching the output in place, by its strides: an expanded
    scalar (what ``y.sum()`` sends), one (D,) row expanded over batch and steps, every other step
    of a longer tensor, a (B, D, L) tensor transposed, and none at all (only the final state used);
    each against the loop's gradients with the SiLU."""
    generator = torch.Generator().manual_seed(5)
    batch, width, order, length = 2, 20, 4, 200
    dtype = torch.float64

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    leaves = [torch.rand(width, order, generator=generator, dtype=dtype).requires_grad_(True) for _ in range(3)]
    x = draw(batch, length, width).requires_grad_(True)
    grad_y = {"scalar": draw(1, 1, 1).expand(batch, length, width), "row": draw(width).expand(batch, length, width),
              "strided": draw(batch, 2 * length, width)[:, ::2], "transposed": draw(batch, width, length).transpose(1, 2),
              "none": None}[layout]
    grad_h = draw(batch, width, order)

    def grads(path):
        log_r, b, c = leaves
        y, h = path(x, recurrence.Coefficients(log_r=-0.5 * log_r - 1e-3, phase=None, b=b, c=(c, None)))
        outputs, grad_outputs = ([y], [grad_y]) if grad_y is not None else ([h[0]], [grad_h])
        return torch.autograd.grad(outputs, [x, *leaves], grad_outputs, allow_unused=True, materialize_grads=True)

    def looped(x, coef):
        y, h = recurrence.recurrent(x, coef)
        return F.silu(y), h

    for grad, grad_ref in zip(grads(lambda x, coef: recurrence.native(x, coef, silu=True)), grads(looped)):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-10)


@NATIVE
def test_a_nan_reaches_only_later_steps_as_in_the_loop():
    torch.manual_seed(0)
    mixer = seqmix.build_mixer("cema", 20, impl="native").eval()
    x = torch.randn(1, 300, 20)
    x[0, 200, 3] = float("nan")
    with torch.inference_mode():
        clean, poisoned = mixer(x.nan_to_num()), mixer(x)
    assert torch.equal(poisoned[:, :200], clean[:, :200])
    assert torch.isnan(poisoned[:, 200:, 3]).all()


@NATIVE
def test_tracers_take_the_chunked_path_and_lowerings_switch_to_it():
    """Native code is a call tracers cannot see into: exporters and Inductor switch the path, and
    a graph traced with it anyway is the chunked path's."""
    for name in ("ema", "cema"):
        lowered = seqmix.mixer_class(name).lowered_impls
        assert lowered["export"]["native"] == "chunked" and lowered["inductor"]["native"] == "chunked"
    torch.manual_seed(0)
    mixer = seqmix.build_mixer("ema", 16, impl="native").eval()
    x = torch.randn(1, 70, 16)
    graph = torch.export.export(mixer, (x,))
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert any("bmm" in target for target in targets), targets
    torch.testing.assert_close(graph.module()(x), mixer(x), rtol=1e-5, atol=1e-6)


def test_a_half_precision_input_is_refused_by_name():
    coef = recurrence.Coefficients(log_r=torch.full((4, 2), -0.1), phase=None, b=torch.ones(4, 2), c=(torch.ones(4, 2), None))
    with pytest.raises(SeqmixError, match=r"impl='native' runs in float32 or float64, not torch.bfloat16"):
        recurrence.native(torch.randn(1, 3, 4, dtype=torch.bfloat16), coef)


@NATIVE
@pytest.mark.parametrize("bad, message", [
    ({"b": torch.ones(4, 2, dtype=torch.float64)}, r"b is torch.float64 \(4, 2\).*must be torch.float32 \(4, 2\)"),
    ({"b": torch.ones(5, 2)}, r"b is torch.float32 \(5, 2\).*must be torch.float32 \(4, 2\)"),
    ({"h0": (torch.zeros(1, 4, 3), None)}, r"h0 \(real part\) is torch.float32 \(1, 4, 3\).*must be torch.float32 \(1, 4, 2\)"),
    ({"skip": torch.ones(3)}, r"skip is torch.float32 \(3,\).*must be torch.float32 \(4,\)"),
])
def test_operands_that_do_not_match_x_are_refused_before_native_code_reads_them(bad, message):
    """Native code reads raw memory: a wrong dtype or shape would be a wrong answer or a crash, so it is an error first."""
    parts = {"b": torch.ones(4, 2), "h0": None, "skip": None, **bad}
    coef = recurrence.Coefficients(log_r=torch.full((4, 2), -0.1), phase=None, b=parts["b"], c=(torch.ones(4, 2), None))
    with pytest.raises(SeqmixError, match=message):
        recurrence.native(torch.randn(1, 3, 4), coef, parts["h0"], parts["skip"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to put the input on")
def test_a_cuda_input_is_refused_with_the_path_to_use_instead():
    mixer = seqmix.build_mixer("ema", 8, impl="native").cuda()
    with pytest.raises(SeqmixError, match=r"runs on the CPU, and x is on cuda.*impl='chunked'"):
        mixer(torch.randn(1, 4, 8, device="cuda"))


def test_without_a_compiler_the_error_names_what_was_looked_for(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(SeqmixError, match=r"C\+\+ compiler.*CXX='no-such-compiler-here'.*impl='chunked'"):
        native.compiler()
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("PATH", "")
    with pytest.raises(SeqmixError, match=r"any of \['c\+\+', 'g\+\+', 'clang\+\+'\] on PATH"):
        native.compiler()


@NATIVE
def test_the_library_is_built_once_into_the_cache_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQMIX_CACHE_DIR", str(tmp_path))
    build = native.load.__wrapped__
    build("seqmix.operators", "recurrence_native.cpp")
    built = list((tmp_path / "native").glob("recurrence_native-*.so"))
    assert len(built) == 1 and stat.S_IMODE((tmp_path / "native").stat().st_mode) == 0o700
    mtime = built[0].stat().st_mtime_ns
    library = build("seqmix.operators", "recurrence_native.cpp")
    assert built[0].stat().st_mtime_ns == mtime and library.seqmix_recurrence_checkpoint() == 64
    assert not list((tmp_path / "native").glob("*.partial"))


@NATIVE
def test_a_header_beside_the_source_is_included_and_a_change_to_it_rebuilds(tmp_path, monkeypatch):
    """Sources include the headers beside them (native_simd.h): the folder is on the include path
    and the headers enter the library's name, so editing one never loads a stale library."""
    package = tmp_path / "probe_package"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "probe.cpp").write_text('#include "probe.h"\nextern "C" int probe() { return PROBE; }\n', encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SEQMIX_CACHE_DIR", str(tmp_path / "cache"))
    answers = []
    for value in (1, 2):
        (package / "probe.h").write_text(f"#define PROBE {value}\n", encoding="utf-8")
        answers.append(native.load.__wrapped__("probe_package", "probe.cpp").probe())
    assert answers == [1, 2]
    assert len(list((tmp_path / "cache" / "native").glob("probe-*.so"))) == 2


@NATIVE
@pytest.mark.skipif(not hasattr(os, "getuid"), reason="ownership and modes are POSIX")
def test_a_cache_folder_others_can_write_to_is_refused(tmp_path, monkeypatch):
    """A library in the cache runs as this process: one that another user could have put there is never loaded."""
    shared = tmp_path / "native"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("SEQMIX_CACHE_DIR", str(tmp_path))
    with pytest.raises(SeqmixError, match=r"writable by another user.*drwxrwxrwx.*SEQMIX_CACHE_DIR"):
        native.load.__wrapped__("seqmix.operators", "recurrence_native.cpp")


@NATIVE
def test_a_source_that_does_not_compile_reports_the_compilers_words(tmp_path, monkeypatch):
    source = tmp_path / "broken.cpp"
    source.write_text("this is not C++\n", encoding="utf-8")
    monkeypatch.setenv("SEQMIX_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(SeqmixError, match=r"(?s)could not build broken.cpp with .*broken.cpp.*error"):
        native._build(source, native._private_dir(native.cache_dir()) / "broken.so", native.compiler())
    assert not list((tmp_path / "cache" / "native").iterdir())


@NATIVE
@pytest.mark.parametrize("refused", ["-fopenmp", "-march=native"])
def test_a_compiler_that_refuses_openmp_or_the_native_architecture_still_builds_the_library(refused, tmp_path, monkeypatch):
    """The build falls back: without OpenMP (one thread), then without -march=native (the
    architecture's baseline); the library it gets loads, one file in the cache."""
    wrapper = tmp_path / "picky-c++"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = "{refused}" ] && {{ echo "unsupported {refused}" >&2; exit 1; }}; done\n'
                       f'exec {native.compiler()} "$@"\n', encoding="utf-8")
    wrapper.chmod(0o755)
    monkeypatch.setenv("CXX", str(wrapper))
    monkeypatch.setenv("SEQMIX_CACHE_DIR", str(tmp_path / "cache"))
    library = native.load.__wrapped__("seqmix.operators", "recurrence_native.cpp")
    assert library.seqmix_recurrence_checkpoint() == 64
    assert len(list((tmp_path / "cache" / "native").glob("recurrence_native-*.so"))) == 1


def test_a_cache_path_that_is_a_file_is_refused_by_name(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("", encoding="utf-8")
    monkeypatch.setenv("SEQMIX_CACHE_DIR", str(blocker))
    with pytest.raises(SeqmixError, match=r"native code cache '.*not-a-folder/native' cannot be created or read.*SEQMIX_CACHE_DIR"):
        native._private_dir(native.cache_dir())
