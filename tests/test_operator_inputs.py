"""What the mixers and layers accept at their trust boundary, as properties over generated cases.

- Every boolean option of every registered mixer and of every layer (norms, heads, positions, the
  FFN and block) takes only True or False: "false", 0 or None would otherwise build the opposite
  of what was asked.
- One dtype rule for every mixer: an input of any floating dtype is computed in the mixer's
  parameter dtype and returned in its own, in ``forward`` and ``step``.
- Every other bad input to ``forward``, ``init_state`` and ``step`` (masks that are lists, of another
  dtype, shape or device; inputs on another device; batch sizes that are not positive integers;
  states that are lists, None, of another structure, dtype or device) raises a SeqmixError naming
  it, never another exception.
"""
from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

import seqmix
import seqmix.layers.blocks
import seqmix.layers.heads
import seqmix.layers.norms
import seqmix.layers.positions
from conftest import examples
from seqmix import SeqmixError
from test_fuzz import mixer_configs

LAYER_MODULES = (seqmix.layers.norms, seqmix.layers.blocks, seqmix.layers.heads, seqmix.layers.positions)


def boolean_parameters(cls) -> list[str]:
    """The constructor parameters of ``cls`` that are booleans (annotated ``bool`` or defaulting to True/False)."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in parameters if p.annotation in (bool, "bool") or isinstance(p.default, bool)]


def layer_classes() -> list[type]:
    return [cls for module in LAYER_MODULES for cls in vars(module).values()
            if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == module.__name__]


def build_with(cls, field: str, value):
    """``cls`` built with ``field=value`` and width 8 for every required positional parameter."""
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    required = [8 for p in parameters if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    return cls(*required, **{field: value})


def build_option(owner, field: str, value):
    """The mixer registered as ``owner`` (a name) or the layer class ``owner``, built with ``field=value``."""
    return seqmix.build_mixer(owner, 8, **{field: value}) if isinstance(owner, str) else build_with(owner, field, value)


def assert_refused_naming(option, value) -> None:
    """Building ``option`` (owner, field) with ``field=value`` raises a SeqmixError that names ``field=value``."""
    owner, field = option
    with pytest.raises(SeqmixError) as error:
        build_option(owner, field, value)
    assert f"{field}={value!r}" in str(error.value)


BOOLEAN_OPTIONS = [(name, field) for name in seqmix.list_mixers() for field in boolean_parameters(seqmix.mixer_class(name))]
BOOLEAN_LAYER_OPTIONS = [(cls, field) for cls in layer_classes() for field in boolean_parameters(cls)]
NOT_BOOLEANS = (st.sampled_from(["false", "true", "False", "True", "no", "yes", "0", "1", "", "off"]) | st.text(max_size=6)
                | st.integers() | st.none() | st.floats(allow_nan=True) | st.just([]) | st.just(torch.tensor(True)))


def choice_parameters(cls) -> list[str]:
    """The constructor parameters of ``cls`` that take one of a few names (they default to one)."""
    return [p.name for p in inspect.signature(cls.__init__).parameters.values() if isinstance(p.default, str)]


CHOICE_OPTIONS = [(name, field) for name in seqmix.list_mixers() for field in ("impl", *choice_parameters(seqmix.mixer_class(name)))]
CHOICE_LAYER_OPTIONS = [(cls, field) for cls in layer_classes() for field in choice_parameters(cls)]
# Lists, dicts and sets are what a config gives by mistake; dicts and sets cannot even be looked up in a dict of names.
# None is left out: where an option takes it, it means the default or "none" (impl, norm).
NOT_NAMES = st.sampled_from([[], ["silu"], {"silu": 1}, {"silu"}, ("silu",), "", "nope", 3, 1.5, True, b"silu"])


def test_every_mixer_and_layer_has_its_choice_options_found():
    assert {("tcn", "activation"), ("gated_attention", "norm"), ("ema", "impl")} <= set(CHOICE_OPTIONS)
    assert {field for _, field in CHOICE_LAYER_OPTIONS} >= {"activation", "residual", "pooling"}


@settings(max_examples=examples(100))
@given(option=st.sampled_from(CHOICE_OPTIONS + CHOICE_LAYER_OPTIONS), value=NOT_NAMES)
def test_a_choice_option_refuses_anything_but_one_of_its_names_naming_it(option, value):
    """A list or dict raised TypeError (unhashable) from the lookup instead of the option's error."""
    assert_refused_naming(option, value)


# Values of every wrong kind; sizes stay small, so that an accepted value builds in a moment.
WRONG_KINDS = [None, "x", "", [1], {"a": 1}, {"a"}, (1,), b"x", -1, 0, 1.5, float("nan"), float("inf"), True, 2**64]


def test_every_constructor_argument_of_every_mixer_and_layer_builds_or_is_refused_by_name():
    """Each parameter of each registered mixer and each layer class, given each value of WRONG_KINDS,
    builds or raises SeqmixError; anything else (torch's TypeError, an AttributeError) is listed.
    A sweep found FeedForward(hidden=True), gated_attention(v_dim=True, local_options='x') this way."""
    crashes = []
    owners = [(name, seqmix.mixer_class(name)) for name in seqmix.list_mixers()] + [(cls, cls) for cls in layer_classes()]
    for owner, cls in owners:
        for parameter in list(inspect.signature(cls.__init__).parameters.values())[1:]:
            if isinstance(owner, str) and parameter.name == "d_model":
                continue  # build_mixer's own argument, checked in tests/test_contract.py
            required = {p.name: 8 for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
                        if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD}
            for value in WRONG_KINDS:
                try:
                    if isinstance(owner, str):
                        seqmix.build_mixer(owner, 8, **{parameter.name: value})
                    else:
                        owner(**{**required, parameter.name: value})
                except SeqmixError:
                    pass
                except Exception as error:  # noqa: BLE001  (collected, so that one run lists them all)
                    crashes.append(f"{getattr(owner, '__name__', owner)}({parameter.name}={value!r}): {type(error).__name__}: {error}")
    assert not crashes, "\n".join(crashes)


def test_every_mixer_and_layer_has_its_boolean_options_found():
    assert ("gated_attention", "normalized") in BOOLEAN_OPTIONS and ("gated_attention", "prenorm") in BOOLEAN_OPTIONS
    assert {field for _, field in BOOLEAN_LAYER_OPTIONS} >= {"affine", "swiglu", "bias"}


@settings(max_examples=examples(150))
@given(option=st.sampled_from(BOOLEAN_OPTIONS + BOOLEAN_LAYER_OPTIONS), value=NOT_BOOLEANS)
def test_a_boolean_option_refuses_anything_but_true_or_false(option, value):
    assert_refused_naming(option, value)


@pytest.mark.parametrize("option", BOOLEAN_OPTIONS + BOOLEAN_LAYER_OPTIONS, ids=lambda o: f"{getattr(o[0], '__name__', o[0])}.{o[1]}")
def test_a_boolean_option_still_takes_true_and_false(option):
    owner, field = option
    for value in (True, False):
        try:
            module = build_option(owner, field, value)
        except SeqmixError as error:
            # Some options have one valid value (the TCN and CEMA are causal only); the refusal names it.
            assert f"{field}={value!r}" in str(error)
        else:
            # An attribute of the option's name holds it, or is the part it asks for (LayerNorm.bias: a tensor or None).
            attribute = getattr(module, field, value)
            assert attribute == value if isinstance(attribute, bool) else (attribute is not None) == value


# --- the dtype rule -------------------------------------------------------------------------

FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@settings(max_examples=examples(60))
@given(config=mixer_configs(), parameter_dtype=st.sampled_from([torch.float32, torch.float64]),
       input_dtype=st.sampled_from(FLOATS), length=st.integers(1, 12))
def test_any_floating_input_is_computed_in_the_parameter_dtype_and_returned_in_its_own(config, parameter_dtype, input_dtype, length):
    name, d_model, options = config
    torch.manual_seed(0)
    mixer = seqmix.build_mixer(name, d_model, **options).to(parameter_dtype).eval()
    x = torch.randn(2, length, d_model).to(input_dtype)
    with torch.no_grad():
        y = mixer(x)
        expected = mixer(x.to(parameter_dtype)).to(input_dtype)
        assert y.dtype == input_dtype
        torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
        if mixer.causal:
            streamed, state = mixer.step(x, mixer.init_state(2))
            assert streamed.dtype == input_dtype
            torch.testing.assert_close(streamed, mixer.step(x.to(parameter_dtype), mixer.init_state(2))[0].to(input_dtype),
                                       rtol=0, atol=0, equal_nan=True)


# --- every other bad input is a SeqmixError -------------------------------------------------

BAD_BATCH_SIZES = st.sampled_from([-1, 0, 2.5, True, False, "2", None, 1.0]) | st.integers(max_value=0)


def _retyped(state, leaf_index: int, dtype) -> object:
    leaves, spec = tree_flatten(state)
    leaves[leaf_index] = leaves[leaf_index].to(dtype)
    return tree_unflatten(leaves, spec)


@st.composite
def bad_calls(draw):
    """(a call on a valid mixer with one bad input, text its error must contain)."""
    name, d_model, options = draw(mixer_configs())
    torch.manual_seed(0)
    mixer = seqmix.build_mixer(name, d_model, **options)
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    x = torch.randn(batch, length, d_model)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    kinds = ["mask list", "mask dtype", "mask shape", "mask device", "x not a tensor", "init batch", "init dtype"]
    if mixer.causal:
        kinds += ["state list", "state None", "state tensor", "state structure", "state dtype", "state device"]
    if list(mixer.parameters()):  # a mixer without parameters (the identity) lives on no device
        kinds += ["x device", "step x device"] if mixer.causal else ["x device"]
    kind = draw(st.sampled_from(kinds))
    if kind == "mask list":
        return lambda: mixer(x, mask.tolist()), "padding_mask"
    if kind == "mask dtype":
        dtype = draw(st.sampled_from([torch.float32, torch.int64, torch.uint8, torch.int8]))
        return lambda: mixer(x, mask.to(dtype)), f"padding_mask has dtype {dtype}"
    if kind == "mask shape":
        shape = draw(st.sampled_from([(batch, length + 1), (batch + 1, length), (length,), (batch, length, 1), ()]))
        return lambda: mixer(x, torch.zeros(shape, dtype=torch.bool)), "padding_mask has shape"
    if kind == "mask device":
        return lambda: mixer(x, mask.to("meta")), "padding_mask is on meta"
    if kind == "x device":
        return lambda: mixer(x.to("meta")), "x is on meta"
    if kind == "x not a tensor":
        return lambda: mixer(x.tolist()), "x must be a torch.Tensor"
    if kind == "init batch":
        bad = draw(BAD_BATCH_SIZES)
        if not mixer.causal:
            return lambda: mixer.init_state(bad), "causal=False"
        return lambda: mixer.init_state(bad), f"batch_size={bad!r}"
    if kind == "init dtype":
        dtype = draw(st.sampled_from([torch.int64, torch.bool, torch.complex64, "float32"]))
        if not mixer.causal:
            return lambda: mixer.init_state(batch, dtype=dtype), "causal=False"
        return lambda: mixer.init_state(batch, dtype=dtype), f"dtype={dtype!r}"
    state = mixer.init_state(batch)
    leaves = tree_flatten(state)[0]
    if kind == "state list":
        return lambda: mixer.step(x, list(state)), "state is a list"
    if kind == "state None":
        return lambda: mixer.step(x, None), "state is None"
    if kind == "state tensor":
        return lambda: mixer.step(x, torch.zeros(batch, d_model)), "state is a Tensor"
    if kind == "state structure":
        assume(type(state) is not tuple)  # a plain tuple of the right tensors is the right structure
        return lambda: mixer.step(x, tuple(state)), "state is a tuple"
    if kind == "step x device":
        return lambda: mixer.step(x.to("meta"), state), "x is on meta"
    assume(leaves)  # the identity's state is empty
    index = draw(st.integers(0, len(leaves) - 1))
    if kind == "state device":
        return lambda: mixer.step(x, _retyped(state, index, torch.device("meta"))), f"state tensor {index} is on meta"
    wrong = torch.int64 if leaves[index].is_floating_point() else draw(st.sampled_from([torch.float32, torch.int32]))
    return lambda: mixer.step(x, _retyped(state, index, wrong)), f"state tensor {index} has dtype {wrong}"


@settings(max_examples=examples(250))
@given(case=bad_calls())
def test_every_bad_input_raises_a_seqmix_error_naming_it(case):
    call, expected = case
    with pytest.raises(SeqmixError) as error:
        call()
    assert expected in str(error.value)


@pytest.mark.parametrize("batch_size", [-1, 2.5, True])
def test_init_state_names_the_batch_size(batch_size):
    with pytest.raises(SeqmixError, match=f"batch_size={batch_size!r}"):
        seqmix.build_mixer("tcn", 8).init_state(batch_size)


@settings(max_examples=examples(20))
@given(value=NOT_BOOLEANS)
def test_the_model_tie_embeddings_option_refuses_anything_but_true_or_false(value):
    with pytest.raises(SeqmixError) as error:
        seqmix.build_model(vocab_size=16, d_model=8, layers=["identity"], tie_embeddings=value)
    assert f"tie_embeddings={value!r}" in str(error.value)


@pytest.mark.parametrize("options, message", [
    ({"norm_groups": "bogus"}, "gated_attention: norm_groups='bogus' is not valid"),
    ({"norm_groups": 0}, "gated_attention: norm_groups=0 is not valid"),
    ({"norm_groups": 2}, "norm_groups=2 sets the timestep norm of normalized=True only"),
    ({"normalized": True, "norm": "bogus"}, r"gated_attention.norm='bogus' is not valid"),
    ({"normalized": True, "norm": "rmsnorm"}, "norm='rmsnorm' applies to the Mega form only"),
])
def test_gated_attention_refuses_a_norm_option_its_form_does_not_use(options, message):
    """norm_groups='bogus' (or 2) was accepted and unused when normalized=False, and norm='bogus' when normalized=True."""
    with pytest.raises(SeqmixError, match=message):
        seqmix.build_mixer("gated_attention", 16, **options)
    assert seqmix.build_mixer("gated_attention", 16, normalized=True, norm_groups=2).timestep_norm.groups == 2
