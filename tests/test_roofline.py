"""The roofline: every mixer's stated cost (``Mixer.cost``) against independent counts, the machine's
measured rates, and measured ÷ minimum in the benchmark's output.

FLOPs are checked against ``torch.utils.flop_counter.FlopCounterMode`` run on the path itself. It
counts matrix products and convolutions (forward and backward) but not elementwise arithmetic, so
the recurrences' elementwise updates and the carry between chunks are added by a hand count here;
it does not count FFTs either, so the FFT path is checked by how its count grows with L.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from mixer_cases import runnable_impls
from torch.utils.flop_counter import FlopCounterMode, bmm_flop

import seqmix
from seqmix import SeqmixError
from seqmix.contract import PASSES, Cost

# (mixer, options, FLOPs of its elementwise linear algebra per (B, L, D, N, chunks)), the paths the counter sees.
REAL_UPDATE, COMPLEX_UPDATE = 3, 8  # h = q·h + b·x per state element: real 2 mul + 1 add; complex q·h 6, + b·x 2
REAL_CARRY, COMPLEX_CARRY = 2, 8  # H = q^C·H + fed per state element and chunk


def _elementwise(name: str, impl: str, batch: int, length: int, width: int, order: int, chunk: int) -> int:
    """FLOPs the counter cannot see: the recurrence's updates (recurrent) or the carry (chunked)."""
    if name not in ("ema", "cema"):
        return 0
    complex_ = name == "cema"
    if impl == "recurrent":
        return (COMPLEX_UPDATE if complex_ else REAL_UPDATE) * batch * length * width * order
    return (COMPLEX_CARRY if complex_ else REAL_CARRY) * batch * (length // chunk) * width * order


def _in_place_baddbmm_flops(self_shape, a_shape, b_shape, *scales, out_shape=None, **kwargs) -> int:
    """The product's FLOPs, as FlopCounterMode counts baddbmm (the sum with self not counted)."""
    return bmm_flop(a_shape, b_shape)


# FlopCounterMode counts baddbmm but not its in-place form, which the chunked recurrence's backward runs.
COUNTED_TOO = {torch.ops.aten.baddbmm_: _in_place_baddbmm_flops}


def _counted_flops(mixer, x: torch.Tensor, pass_: str) -> int:
    """FLOPs FlopCounterMode counts for one pass of ``mixer`` on x, as the benchmark runs it: after a
    warm-up call, which in eval mode computes what the paths cache from the parameters alone."""
    if pass_ == "forward":
        mixer.eval()
        with torch.no_grad():
            mixer(x)
        with FlopCounterMode(display=False, custom_mapping=COUNTED_TOO) as counter, torch.no_grad():
            mixer(x)
    else:
        mixer.train()
        x = x.clone().requires_grad_(True)
        with FlopCounterMode(display=False, custom_mapping=COUNTED_TOO) as counter:
            mixer(x).sum().backward()
    return counter.get_total_flops()


SUBJECTS = st.sampled_from([
    ("ema", {"impl": "chunked"}), ("ema", {"impl": "recurrent"}), ("ema", {"impl": "chunked", "causal": False}),
    ("cema", {"impl": "chunked"}), ("cema", {"impl": "recurrent"}), ("tcn", {"impl": "conv"}),
    ("softmax_attention", {"impl": "math"}), ("softmax_attention", {"impl": "math", "causal": False, "heads": 2}),
    ("gated_attention", {"local": "identity"}), ("gated_attention", {"local": "identity", "position_bias": "rotary", "heads": 2}),
    ("gated_attention", {"local": "ema", "attention": "laplace"}), ("identity", {}),
])


# Two chunks at least: with one, every chunk starts from the constant zero state, and autograd skips
# the gradient of the readout's (zero) state operand that the stated count includes.
@settings(max_examples=40, deadline=None)
@given(subject=SUBJECTS, batch=st.integers(1, 2), chunks=st.integers(2, 4), chunk=st.sampled_from([4, 8]),
       order=st.sampled_from([2, 4]), pass_=st.sampled_from(PASSES))
def test_stated_flops_equal_the_flop_counter_plus_the_elementwise_recurrence(subject, batch, chunks, chunk, order, pass_):
    name, options = subject
    # FlopCounterMode ignores groups in convolution_backward's weight gradient: D times a depthwise
    # convolution's true count. The TCN's backward is left to the 3x rule checked below.
    assume(not (name == "tcn" and pass_ == "fwd+bwd"))
    width, length = 8, chunks * chunk
    options = dict(options)
    if name in ("ema", "cema"):
        options.update(order=order, chunk_size=chunk)
    elif name == "gated_attention":
        options.update(chunk_size=chunk)
        if options["local"] == "ema":
            options["local_options"] = {"order": order, "chunk_size": chunk}
    torch.manual_seed(0)
    mixer = seqmix.build_mixer(name, width, **options)
    impl = mixer.impl_for_tokens(length)
    counted = _counted_flops(mixer, torch.randn(batch, length, width), pass_)
    local = options.get("local")
    extra = _elementwise(name, impl, batch, length, width, order, chunk)
    if local == "ema":
        extra += _elementwise("ema", mixer.local.impl_for_tokens(length), batch, length, width, order, chunk)
    if not mixer.causal:
        extra *= 2  # one recurrence per direction
    stated = mixer.cost(batch, length, pass_)
    assert stated.flops == counted + (3 if pass_ == "fwd+bwd" else 1) * extra


def _every_path():
    for name in seqmix.list_mixers():
        for impl in seqmix.mixer_class(name).impls:
            yield name, impl


@pytest.mark.parametrize("name, impl", list(_every_path()))
def test_every_mixer_and_path_states_a_cost_that_moves_its_input_and_output(name, impl):
    mixer = seqmix.build_mixer(name, 16, impl=impl)
    for length in (64, 256):
        forward, both = mixer.cost(2, length, "forward"), mixer.cost(2, length, "fwd+bwd")
        assert isinstance(forward, Cost) and isinstance(both, Cost)
        if name == "identity":  # returns its input: nothing to compute, nothing to move
            assert forward == both == Cost(0, 0)
            continue
        assert forward.flops > 0 and forward.bytes >= 2 * 2 * length * 16 * 4  # x read and y written, float32
        assert both.bytes > 2 * forward.bytes
        # Training computes what the FFT and chunked paths derive from the parameters alone (the kernel
        # spectrum, the chunk weights), which the eval forward reads from its cache.
        # The gated attention's local mixer is the chunked EMA.
        cached = impl in ("fft", "chunked") or name == "gated_attention"
        assert both.flops > 3 * forward.flops if cached else both.flops == 3 * forward.flops


def _grows(name: str, impl: str, lengths, pass_: str = "forward", batch: int = 1, **options) -> list[Cost]:
    mixer = seqmix.build_mixer(name, 16, impl=impl, **options)
    return [mixer.cost(batch, length, pass_) for length in lengths]


@settings(max_examples=25, deadline=None)
@given(chunks=st.integers(1, 50), batch=st.integers(1, 3), pass_=st.sampled_from(PASSES),
       subject=st.sampled_from([("ema", "chunked"), ("cema", "chunked"), ("ema", "recurrent"), ("tcn", "conv"), ("tcn", "taps"),
                                ("tcn", "channels_last"), ("gated_attention", "reference")]))
def test_linear_paths_cost_an_affine_function_of_the_length(chunks, batch, pass_, subject):
    """In whole chunks (128, a multiple of every default chunk size) equal steps in L add equal work, FLOPs and bytes."""
    name, impl = subject
    one, two, three = _grows(name, impl, [128 * chunks, 256 * chunks, 384 * chunks], pass_, batch)
    assert two.flops - one.flops == three.flops - two.flops > 0
    assert two.bytes - one.bytes == three.bytes - two.bytes > 0


@settings(max_examples=25, deadline=None)
@given(length=st.integers(8, 4096), causal=st.booleans())
def test_attention_costs_grow_quadratically_and_its_fused_kernel_moves_no_scores(length, causal):
    math_path = _grows("softmax_attention", "math", [length, 2 * length, 3 * length], causal=causal)
    fused = _grows("softmax_attention", "sdpa", [length, 2 * length, 3 * length], causal=causal)
    # Second differences of a quadratic are constant and positive.
    for costs in (math_path, fused):
        assert costs[2].flops - 2 * costs[1].flops + costs[0].flops > 0
    # Causal: the fused kernel computes only the L(L+1)/2 visible pairs, the math path all L².
    assert fused[0].flops <= math_path[0].flops and (fused[0].flops < math_path[0].flops) == causal
    # The math path writes and reads the (B, H, L, L) scores and weights; the fused kernel never does.
    assert math_path[0].bytes - fused[0].bytes == 4 * 4 * 4 * length * length


@settings(max_examples=25, deadline=None)
@given(length=st.integers(64, 1 << 16))
def test_the_fft_path_grows_as_l_log_l(length):
    """An FFT of size 2L costs 2.5·2L·log2(2L): doubling L multiplies the FLOPs by a bit over 2, by
    2·log2(4L)/log2(2L) at most, and the eval forward reads the cached kernel spectrum instead of computing it."""
    short, long_ = _grows("ema", "fft", [length, 2 * length])
    ratio = long_.flops / short.flops
    assert 2 < ratio <= 2 * math.log2(4 * length) / math.log2(2 * length) + 1e-9
    training_short, = _grows("ema", "fft", [length], "fwd+bwd")
    assert training_short.flops > 3 * short.flops  # training computes the kernel and its spectrum


def test_cost_refuses_bad_arguments_naming_them():
    mixer = seqmix.build_mixer("ema", 8)
    with pytest.raises(SeqmixError, match="pass_='backward'.*fwd\\+bwd"):
        mixer.cost(1, 64, "backward")
    with pytest.raises(SeqmixError, match="length=0"):
        mixer.cost(1, 0)


def test_the_machine_measurement_gives_positive_finite_rates_and_the_minimum_time_follows():
    from seqmix.export.bench.roofline import measure_machine

    rates = measure_machine()
    assert rates.device == "cpu" and rates.threads == torch.get_num_threads()
    for value in (rates.matmul_gflops, rates.bandwidth_gbs, rates.matmul_median_gflops, rates.bandwidth_median_gbs):
        assert math.isfinite(value) and value > 0
    # The fastest call sets the rate; the median call is no faster.
    assert rates.matmul_gflops >= rates.matmul_median_gflops and rates.bandwidth_gbs >= rates.bandwidth_median_gbs
    compute = Cost(flops=rates.matmul_gflops * 1e9, bytes=1.0)  # one second of products, one byte
    memory = Cost(flops=1.0, bytes=rates.bandwidth_gbs * 1e9 * 2)  # two seconds of traffic
    assert rates.minimum_ms(compute) == pytest.approx(1e3) and rates.bound(compute) == "compute"
    assert rates.minimum_ms(memory) == pytest.approx(2e3) and rates.bound(memory) == "memory"
    assert "GFLOP/s" in rates.describe() and "GB/s" in rates.describe()


def test_the_roofline_tool_reports_measured_over_minimum_and_judges_the_cached_fft_target(tmp_path):
    """tools/measure_roofline.py on a tiny grid: every row carries measured ÷ minimum, and the
    chunked EMA's target against the FFT path with its cached kernel is judged from the same run."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parent.parent / "tools" / "measure_roofline.py"
    done = subprocess.run(
        [sys.executable, str(tool), "--threads", "1", "--out", str(tmp_path), "--allocator-rounds", "1", "bench.lengths=[64]", "bench.width=16",
         "bench.repeats=1", "bench.warmup=0", "bench.passes=[forward,fwd+bwd]", "bench.claims.chunked_vs_cached_fft_ema_16k.length=64",
         "bench.claims.native_vs_cached_fft_ema_16k.length=64"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = (tmp_path / "roofline.md").read_text(encoding="utf-8")
    rows = json.loads((tmp_path / "roofline.json").read_text(encoding="utf-8"))["runs"][0]["rows"]
    assert {row["subject"] for row in rows} == {"ema/chunked", "ema/native", "ema/fft", "cema/chunked", "cema/native", "gated_attention",
                                                "tcn/conv", "tcn/channels_last", "tcn/native"}
    runnable = {row["subject"] for row in rows if row["subject"].partition("/")[2] in ("", *runnable_impls(row["subject"].partition("/")[0]))}
    for row in rows:
        if row["subject"] not in runnable:  # native code without a C++ compiler: a row with the reason
            assert row["status"] == "skipped" and "C++ compiler" in row["reason"], row
            continue
        assert row["status"] == "measured" and row["vs_minimum"] == pytest.approx(row["time_ms"] / row["minimum_ms"]), row
    times = {row["subject"]: row["time_ms"] for row in rows if row["pass"] == "forward"}
    line = next(line for line in report.splitlines() if line.startswith("| chunked EMA vs FFT EMA with a cached kernel"))
    verdict = "PASS" if times["ema/fft"] / times["ema/chunked"] >= 5 else "MISS"
    assert "`ema/chunked` vs `ema/fft`, forward, L=64" in line and verdict in line, line
    line = next(line for line in report.splitlines() if line.startswith("| native EMA vs FFT EMA with a cached kernel"))
    if "ema/native" in runnable:
        verdict = "PASS" if times["ema/fft"] / times["ema/native"] >= 5 else "MISS"
    else:
        verdict = "MISSING"
    assert "`ema/native` vs `ema/fft`, forward, L=64" in line and verdict in line, line
    # The kernel floor: the chunked paths' products and transposes beside the minimum and the grid's own
    # time, forward and forward + backward.
    floors = json.loads((tmp_path / "roofline.json").read_text(encoding="utf-8"))["kernel_floor"]
    assert {floor["mixer"] for floor in floors} == {"ema/chunked", "cema/chunked"}
    minimum = {(row["subject"], row["pass"]): row["minimum_ms"] for row in rows}
    training_times = {row["subject"]: row["time_ms"] for row in rows if row["pass"] == "fwd+bwd"}
    for floor in floors:
        assert min(floor["products_ms"], floor["backward_products_ms"], floor["transposes_ms"], floor["copy_ms"]) > 0, floor
        assert floor["floor_ms"] == pytest.approx(floor["products_ms"] + floor["transposes_ms"]), floor
        assert floor["fwd_bwd_floor_ms"] == pytest.approx(floor["products_ms"] + floor["backward_products_ms"] + 2 * floor["transposes_ms"])
        for key, pass_, measured in (("", "forward", times), ("fwd_bwd_", "fwd+bwd", training_times)):
            assert floor[f"{key}minimum_ms"] == pytest.approx(minimum[floor["mixer"], pass_]), floor
            assert floor[f"{key}floor_vs_minimum"] == pytest.approx(floor[f"{key}floor_ms"] / floor[f"{key}minimum_ms"]), floor
            assert floor[f"{key}measured_ms"] == measured[floor["mixer"]], floor
    assert "## What torch's kernels allow the chunked forward" in report and "### And its forward + backward" in report
    # The TCN's floor: its convolutions, activations and sums beside the minimum and both paths' times.
    (tcn_floor,) = json.loads((tmp_path / "roofline.json").read_text(encoding="utf-8"))["tcn_kernel_floor"]
    tcn = seqmix.build_mixer("tcn", 16)
    parts = tcn_floor["convolutions_ms"] + tcn.depth * tcn_floor["silu_ms"] + (tcn.depth + 1) * tcn_floor["add_ms"]
    assert min(tcn_floor["convolutions_ms"], tcn_floor["silu_ms"], tcn_floor["add_ms"]) > 0 and tcn_floor["floor_ms"] == pytest.approx(parts)
    assert tcn_floor["minimum_ms"] == pytest.approx(minimum["tcn/conv", "forward"])
    assert tcn_floor["measured_ms"] == {impl: times[f"tcn/{impl}"] for impl in ("conv", "channels_last", "native")
                                        if f"tcn/{impl}" in runnable}
    assert "## What torch's kernels allow the TCN forward" in report
    # Machines with one processor name differ in the vector instructions torch uses: the header says which.
    assert f"({torch.backends.cpu.get_cpu_capability()} kernels)" in report.splitlines()[3]
    # The allocator: the run states it, and times each mixer's forward in one child process per setting.
    allocator = json.loads((tmp_path / "roofline.json").read_text(encoding="utf-8"))["allocator"]
    if allocator["in_use"].startswith("glibc malloc keeping"):
        assert allocator["in_use"] in report and allocator["policy"] == allocator["in_use"]
    assert [row["subject"] for row in allocator["rows"]] == [row["subject"] for row in rows
                                                             if row["subject"] in runnable and row["pass"] == "forward"]
    for row in allocator["rows"]:
        assert row["default_ms"] > 0 and row["kept_ms"] > 0 and row["default_range"][0] <= row["default_ms"] <= row["default_range"][1]
        assert row["ratio"] == pytest.approx(row["default_ms"] / row["kept_ms"]), row
    assert "## The allocator's share" in report


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--before", "no-such-commit"], "--before 'no-such-commit' is not valid: no such commit"),
        (["--threads", "0"], "expected thread counts >= 1"),
        (["--allocator-rounds", "-1"], "rounds >= 0"),
        (["--out", "{blocked}/report"], "is a file, not a folder"),
    ],
)
def test_the_roofline_tool_refuses_bad_arguments_before_measuring_anything(arguments, expected, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    spec = importlib.util.spec_from_file_location("measure_roofline", Path(__file__).resolve().parent.parent / "tools" / "measure_roofline.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit) as exited:
        tool.main([a.format(blocked=blocked) for a in arguments])
    assert exited.value.code == 2 and expected in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
