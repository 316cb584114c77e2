"""Property-based fuzzing of the mixer contract with hypothesis.

- Random valid configurations of every registered mixer (widths, orders, chunk sizes, heads,
  local mixers, compute paths), at random batch sizes, lengths, padding masks and piece sizes:
  forward and backward are finite, the chosen compute paths equal the reference paths, padding
  never changes unpadded outputs, and a causal mixer fed through ``step`` in the drawn pieces
  gives what one ``forward`` gives.
- Random invalid configurations (one field made invalid) and invalid inputs fail with a
  SeqmixError whose message names the field and the bad value.

Sizes stay tiny (D <= 16, L <= 40) and equality is checked in float64. By default the runs are
derandomized (the same examples on every machine) and small; ``--fuzz`` or
SEQMIX_FUZZ_EXAMPLES=<n> draws n fresh examples per test (see conftest.py).
"""
from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_flatten

import seqmix
from conftest import examples
from mixer_cases import runnable_impls
from seqmix import Mixer, SeqmixError
from seqmix.operators.gated_attention import ATTENTIONS, POSITION_BIASES
from seqmix.operators.tcn import ACTIVATIONS as TCN_ACTIVATIONS

MAX_WIDTH = 16
MAX_LENGTH = 40
TOLERANCE = dict(rtol=1e-9, atol=1e-10)
NAMES = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def impls(name: str):
    return st.sampled_from(runnable_impls(name))


# --- valid configurations: one strategy per registered mixer -------------------------------


@st.composite
def ema_options(draw, d_model: int) -> dict:
    return {"order": draw(st.integers(1, 4)), "chunk_size": draw(st.integers(1, 16)), "causal": draw(st.booleans()),
            "impl": draw(impls("ema"))}


@st.composite
def cema_options(draw, d_model: int) -> dict:
    return {"order": draw(st.integers(1, 4)), "chunk_size": draw(st.integers(1, 16)), "impl": draw(impls("cema"))}


@st.composite
def tcn_options(draw, d_model: int) -> dict:
    return {"kernel_size": draw(st.integers(2, 4)), "dilation_base": draw(st.integers(1, 3)), "depth": draw(st.integers(1, 3)),
            "activation": draw(st.sampled_from(sorted(TCN_ACTIVATIONS))), "residual": draw(st.booleans())}


@st.composite
def identity_options(draw, d_model: int) -> dict:
    return {"causal": draw(st.booleans())}


@st.composite
def softmax_attention_options(draw, d_model: int) -> dict:
    heads = draw(st.sampled_from(divisors(d_model)))
    even_heads = (d_model // heads) % 2 == 0
    return {"heads": heads, "use_rotary": even_heads and draw(st.booleans()), "window": draw(st.none() | st.integers(1, 16)),
            "causal": draw(st.booleans()), "max_len": MAX_LENGTH, "impl": draw(impls("softmax_attention"))}


@st.composite
def local_mixer(draw, causal: bool) -> dict:
    """The ``local`` and ``local_options`` of a gated attention layer."""
    local = draw(st.sampled_from(["ema", "cema", "tcn", "identity"] if causal else ["ema", "identity"]))
    if local in ("ema", "cema"):
        return {"local": local, "local_options": {"order": draw(st.integers(1, 3)), "chunk_size": draw(st.integers(1, 8)),
                                                  "impl": draw(impls(local))}}
    if local == "tcn":
        return {"local": local, "local_options": {"kernel_size": draw(st.integers(2, 3)), "dilation_base": draw(st.integers(1, 2)),
                                                  "depth": draw(st.integers(1, 2))}}
    return {"local": local}


@st.composite
def gated_attention_options(draw, d_model: int) -> dict:
    causal, normalized = draw(st.booleans()), draw(st.booleans())
    heads = draw(st.integers(1, 2))
    position_bias = draw(st.sampled_from(POSITION_BIASES))
    rotates = normalized or position_bias == "rotary"
    options = {
        "heads": heads,
        "z_dim": heads * draw(st.integers(1, 4)) * (2 if rotates else 1),
        "v_dim": heads * draw(st.integers(1, 4)),
        "chunk_size": draw(st.none() | st.integers(1, 16)),
        "max_len": MAX_LENGTH,
        "causal": causal,
        "normalized": normalized,
        "position_bias": position_bias,
        **draw(local_mixer(causal)),
    }
    if normalized:
        options["norm_groups"] = draw(st.sampled_from(divisors(d_model)))
    else:
        options["attention"] = draw(st.sampled_from(ATTENTIONS))
        options["norm"] = draw(st.sampled_from(["layernorm", "rmsnorm", "scalenorm", None]))
        options["prenorm"] = draw(st.booleans())
    return options


OPTIONS = {
    "ema": ema_options,
    "cema": cema_options,
    "tcn": tcn_options,
    "identity": identity_options,
    "softmax_attention": softmax_attention_options,
    "gated_attention": gated_attention_options,
}


@st.composite
def mixer_configs(draw) -> tuple[str, int, dict]:
    """(registered name, D, options) of a valid mixer."""
    name = draw(st.sampled_from(seqmix.list_mixers()))
    d_model = draw(st.integers(1, MAX_WIDTH))
    return name, d_model, draw(OPTIONS[name](d_model))


@st.composite
def padding_masks(draw, batch: int, length: int) -> torch.Tensor | None:
    """None, or a (B, L) bool mask whose rows are unpadded, right-, left- or randomly padded, or all padding."""
    if draw(st.booleans()):
        return None
    rows = []
    for _ in range(batch):
        kind = draw(st.sampled_from(["none", "right", "left", "scattered", "all"]))
        if kind == "scattered":
            rows.append(draw(st.lists(st.booleans(), min_size=length, max_size=length)))
            continue
        cut = draw(st.integers(0, length))
        row = [False] * length
        if kind == "right":
            row = [t >= cut for t in range(length)]
        elif kind == "left":
            row = [t < cut for t in range(length)]
        elif kind == "all":
            row = [True] * length
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


@st.composite
def piece_sizes(draw, length: int) -> list[int]:
    """Sizes >= 1 summing to ``length``."""
    sizes: list[int] = []
    while sum(sizes) < length:
        sizes.append(draw(st.integers(1, length - sum(sizes))))
    return sizes


def test_every_registered_mixer_is_fuzzed():
    assert set(OPTIONS) == set(seqmix.list_mixers()), "give a new mixer a strategy of valid options in OPTIONS"


def _reference_outputs(mixer: Mixer, x: torch.Tensor, mask) -> torch.Tensor:
    """The mixer's outputs with it and every mixer inside it on its reference path (impls[0]); paths restored after."""
    chosen = {module: module.impl for module in mixer.modules() if isinstance(module, Mixer)}
    try:
        for module in chosen:
            module.impl = type(module).impls[0]
        return mixer(x, mask)
    finally:
        for module, impl in chosen.items():
            module.impl = impl


@settings(max_examples=examples(400), suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(config=mixer_configs(), data=st.data())
def test_random_valid_configurations_run_match_the_reference_ignore_padding_and_stream(config, data):
    name, d_model, options = config
    batch = data.draw(st.integers(1, 3), label="batch")
    length = data.draw(st.integers(1, MAX_LENGTH), label="length")
    mask = data.draw(padding_masks(batch, length), label="padding_mask")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    torch.manual_seed(seed)
    mixer = seqmix.build_mixer(name, d_model, **options).double()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, d_model, generator=generator, dtype=torch.float64)

    x_grad = x.clone().requires_grad_(True)
    y = mixer(x_grad, mask)
    assert y.shape == x.shape and torch.isfinite(y).all()
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    assert torch.isfinite(x_grad.grad).all()
    for parameter_name, parameter in mixer.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), f"gradient of {parameter_name} is not finite"

    with torch.no_grad():
        y = y.detach()
        torch.testing.assert_close(_reference_outputs(mixer, x, mask), y, **TOLERANCE, msg=lambda m: f"reference path: {m}")
        if mask is not None:
            garbage = torch.where(mask.unsqueeze(-1), 1e3 * torch.randn(x.shape, generator=generator, dtype=x.dtype), x)
            keep = ~mask
            torch.testing.assert_close(mixer(garbage, mask)[keep], y[keep], **TOLERANCE, msg=lambda m: f"padding leaked: {m}")
        if mixer.causal:
            pieces = data.draw(piece_sizes(length), label="pieces")
            state, outputs, start = mixer.init_state(batch), [], 0
            for size in pieces:
                out, state = mixer.step(x[:, start : start + size], state)
                outputs.append(out)
                start += size
            torch.testing.assert_close(torch.cat(outputs, dim=1), mixer(x), **TOLERANCE, msg=lambda m: f"step != forward: {m}")


@settings(max_examples=examples(100), suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(config=mixer_configs(), data=st.data())
def test_nan_and_inf_at_padded_positions_never_reach_unpadded_outputs(config, data):
    """Every mixer, attention included: padded values are selected away, never multiplied by a zero weight."""
    name, d_model, options = config
    batch, length = data.draw(st.integers(1, 3), label="batch"), data.draw(st.integers(1, MAX_LENGTH), label="length")
    mask = data.draw(padding_masks(batch, length).filter(lambda m: m is not None), label="padding_mask")
    torch.manual_seed(0)
    mixer = seqmix.build_mixer(name, d_model, **options).double()
    x = torch.randn(batch, length, d_model, dtype=torch.float64)
    poison = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]), label="padding value")
    with torch.no_grad():
        y = mixer(x, mask)
        y_poisoned = mixer(torch.where(mask.unsqueeze(-1), torch.full_like(x, poison), x), mask)
    keep = ~mask
    torch.testing.assert_close(y_poisoned[keep], y[keep], **TOLERANCE)


# --- invalid configurations: a valid one with one field made invalid ------------------------

NOT_POSITIVE = st.integers(-16, 0)
NOT_AN_INT = st.sampled_from([2.5, 16.0, "16", None, True])


@st.composite
def invalid_configurations(draw) -> tuple[str, int, dict, str]:
    """(name, D, options, text the error must contain): one field of a valid configuration made invalid."""
    name, d_model, options = draw(mixer_configs())
    accepted = inspect.signature(seqmix.mixer_class(name)).parameters
    mutations = ["d_model", "impl", "unknown option"]
    mutations += {
        "ema": ["order", "chunk_size"],
        "cema": ["order", "chunk_size"],
        "tcn": ["kernel_size", "dilation_base", "depth", "activation"],
        "softmax_attention": ["heads", "window", "max_len"],
        "gated_attention": ["heads", "chunk_size", "attention", "position_bias", "local", "local option"]
        + (["norm_groups"] if options.get("normalized") else ["norm"]),
    }.get(name, [])
    field = draw(st.sampled_from(mutations))
    if field == "d_model":
        d_model = draw(NOT_POSITIVE | NOT_AN_INT)
        return name, d_model, options, f"d_model={d_model!r}"
    if field == "impl":
        value = draw(NAMES.filter(lambda text: text not in seqmix.mixer_class(name).impls))
    elif field == "unknown option":
        option = draw(NAMES.filter(lambda text: text not in accepted))
        return name, d_model, {**options, option: 1}, f"no option {option!r}"
    elif field == "local option":
        local_accepted = inspect.signature(seqmix.mixer_class(options["local"])).parameters
        option = draw(NAMES.filter(lambda text: text not in local_accepted))
        return name, d_model, {**options, "local_options": {**options.get("local_options", {}), option: 1}}, f"no option {option!r}"
    elif field == "local":
        value = draw(NAMES.filter(lambda text: text not in seqmix.list_mixers()))
        # The registry's message names the mixer it was asked for, not the option that asked.
        return name, d_model, {**options, "local": value, "local_options": None}, f"gated_attention.local={value!r}"
    elif field == "heads" and name == "softmax_attention":
        value = draw(st.integers(1, 2 * MAX_WIDTH).filter(lambda h: d_model % h))
    elif field == "heads":
        value = draw(st.integers(1, 8).filter(lambda h: options["z_dim"] % h or options["v_dim"] % h))
    elif field == "norm_groups":
        value = draw(st.integers(1, 2 * MAX_WIDTH).filter(lambda g: d_model % g))
        return name, d_model, {**options, field: value}, f"groups={value!r}"
    elif field in ("activation", "attention", "position_bias", "norm"):
        value = draw(NAMES)
    elif field == "kernel_size":
        value = draw(st.integers(-16, 1) | NOT_AN_INT)
    else:
        value = draw(NOT_POSITIVE | NOT_AN_INT.filter(lambda v: v is not None))
    return name, d_model, {**options, field: value}, f"{field}={value!r}"


@settings(max_examples=examples(300))
@given(case=invalid_configurations())
def test_random_invalid_configurations_fail_naming_the_field_and_value(case):
    name, d_model, options, expected = case
    with pytest.raises(SeqmixError) as error:
        seqmix.build_mixer(name, d_model, **options)
    assert expected in str(error.value)


@st.composite
def invalid_inputs(draw):
    """(mixer, call, text the error must contain): a valid mixer and a call with one bad input."""
    name, d_model, options = draw(mixer_configs())
    torch.manual_seed(0)
    mixer = seqmix.build_mixer(name, d_model, **options)
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    good = torch.randn(batch, length, d_model)
    kinds = ["rank", "dtype", "width", "empty", "no sequences", "mask dtype", "mask shape"]
    kinds += ["state batch", "state of another mixer", "step dtype"] if mixer.causal else ["step"]
    kind = draw(st.sampled_from(kinds))
    if kind == "rank":
        rank = draw(st.sampled_from([1, 2, 4, 5]))
        return mixer, lambda: mixer(torch.randn(*([2] * (rank - 1)), d_model)), f"got rank {rank}"
    if kind == "dtype":
        dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.bool, torch.complex64]))
        return mixer, lambda: mixer(torch.zeros(batch, length, d_model, dtype=dtype)), f"dtype {dtype}"
    if kind == "width":
        width = draw(st.integers(1, MAX_WIDTH + 4).filter(lambda w: w != d_model))
        return mixer, lambda: mixer(torch.randn(batch, length, width)), f"width D={width}"
    if kind == "empty":
        return mixer, lambda: mixer(torch.randn(batch, 0, d_model)), "L=0"
    if kind == "no sequences":
        return mixer, lambda: mixer(torch.randn(0, length, d_model)), "B=0"
    if kind == "mask dtype":
        return mixer, lambda: mixer(good, torch.zeros(batch, length)), "padding_mask has dtype"
    if kind == "mask shape":
        shape = draw(st.sampled_from([(batch, length + 1), (batch + 1, length), (length,), (batch, length, 1)]))
        return mixer, lambda: mixer(good, torch.zeros(shape, dtype=torch.bool)), "padding_mask has shape"
    if kind == "step":
        return mixer, lambda: mixer.step(good, None), "causal=False"
    if kind == "step dtype":
        return mixer, lambda: mixer.step(good.long(), mixer.init_state(batch)), "dtype torch.int64"
    if kind == "state batch":
        other = draw(st.integers(1, 4).filter(lambda b: b != batch))
        assume(tree_flatten(mixer.init_state(other))[0])  # an empty state (identity) fits every batch size
        return mixer, lambda: mixer.step(good, mixer.init_state(other)), "state"
    other_name, other_width, other_options = draw(mixer_configs().filter(lambda c: c[0] != "identity"))
    other = seqmix.build_mixer(other_name, other_width, **{**other_options, "causal": True} if "causal" in other_options else other_options)
    expected = tree_flatten(mixer.init_state(batch))[0]
    foreign = tree_flatten(other.init_state(batch))[0]
    assume([t.shape for t in expected] != [t.shape for t in foreign])
    return mixer, lambda: mixer.step(good, other.init_state(batch)), "state"


@settings(max_examples=examples(200))
@given(case=invalid_inputs())
def test_random_invalid_inputs_fail_naming_the_input(case):
    mixer, call, expected = case
    with pytest.raises(SeqmixError) as error:
        call()
    assert expected in str(error.value)


# Found by the fuzzer (each was a crash, a silent acceptance or a NaN before it was fixed).
BAD_OPTIONS_FOUND = [
    ("gated_attention", {"heads": 0}, "heads=0"),
    ("gated_attention", {"heads": -2}, "heads=-2"),
    ("gated_attention", {"heads": "2"}, "heads='2'"),
    ("gated_attention", {"heads": True}, "heads=True"),
    ("softmax_attention", {"heads": True}, "heads=True"),
    ("ema", {"causal": "no"}, "causal='no'"),
    ("identity", {"causal": "yes"}, "causal='yes'"),
    ("gated_attention", {"local": "x"}, "gated_attention.local='x'"),
]
ATTENTION_WITH_PADDING = [
    ("softmax_attention", {}),
    ("gated_attention", {"chunk_size": 8}),
    ("gated_attention", {"chunk_size": None, "max_len": 64, "attention": "laplace"}),
]


@pytest.mark.parametrize("name, options, expected", BAD_OPTIONS_FOUND, ids=[e for _, _, e in BAD_OPTIONS_FOUND])
def test_options_the_fuzzer_found_are_refused(name, options, expected):
    with pytest.raises(SeqmixError, match=expected):
        seqmix.build_mixer(name, 16, **options)


@pytest.mark.parametrize("name, options", ATTENTION_WITH_PADDING, ids=[f"{n}{o}" for n, o in ATTENTION_WITH_PADDING])
def test_nan_at_padded_positions_never_reaches_real_outputs(name, options):
    torch.manual_seed(0)
    mixer = seqmix.build_mixer(name, 16, **options).double()
    x = torch.randn(2, 24, 16, dtype=torch.float64)
    mask = torch.zeros(2, 24, dtype=torch.bool)
    mask[:, 20:] = True
    with torch.no_grad():
        y = mixer(x, mask)
        y_poisoned = mixer(x.masked_fill(mask.unsqueeze(-1), float("nan")), mask)
    torch.testing.assert_close(y_poisoned[~mask], y[~mask], **TOLERANCE)
