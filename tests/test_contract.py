"""The contract's promises that are not numerics: registry, state shapes, clear errors."""
from __future__ import annotations

import re

import pytest
import torch
from torch.utils._pytree import tree_flatten

import seqmix
from seqmix import SeqmixError
from mixer_cases import WIDTH, build, causal_cases, mixer_cases

REQUIRED = {"ema", "cema", "tcn", "gated_attention", "softmax_attention"}


def test_registry_names_the_five_operators():
    assert REQUIRED <= set(seqmix.list_mixers())
    for name in seqmix.list_mixers():
        mixer = seqmix.build_mixer(name, WIDTH)
        assert isinstance(mixer, seqmix.Mixer)
        assert mixer.impl in type(mixer).impls


@pytest.mark.parametrize("case", causal_cases(), ids=[c[0] for c in causal_cases()])
def test_state_shapes_do_not_depend_on_tokens_seen(case):
    _, name, options = case
    mixer = build(name, options)
    state = mixer.init_state(3)
    shapes = [t.shape for t in tree_flatten(state)[0]]
    assert all(t.shape[0] == 3 for t in tree_flatten(state)[0])
    with torch.no_grad():
        for tokens in (1, 5, 17):
            _, state = mixer.step(torch.randn(3, tokens, WIDTH), state)
            assert [t.shape for t in tree_flatten(state)[0]] == shapes
    assert mixer.state_size() == sum(t[0].numel() for t in tree_flatten(mixer.init_state(1))[0])


def test_state_sizes_follow_the_design():
    assert seqmix.build_mixer("ema", 8, order=4).state_size() == 8 * 4
    assert seqmix.build_mixer("cema", 8, order=4).state_size() == 2 * 8 * 4
    tcn = seqmix.build_mixer("tcn", 8, kernel_size=4, dilation_base=4, depth=2)
    assert tcn.state_size() == 8 * (3 * 1 + 3 * 4)
    assert seqmix.build_mixer("ema", 8, causal=False).state_size() == 0


@pytest.mark.parametrize("case", mixer_cases(), ids=[c[0] for c in mixer_cases()])
def test_wrong_inputs_are_named(case):
    _, name, options = case
    mixer = build(name, options)
    with pytest.raises(SeqmixError, match="rank 2"):
        mixer(torch.randn(4, WIDTH))
    with pytest.raises(SeqmixError, match=f"width D={WIDTH + 1}.*d_model={WIDTH}"):
        mixer(torch.randn(2, 5, WIDTH + 1))
    with pytest.raises(SeqmixError, match="padding_mask has shape"):
        mixer(torch.randn(2, 5, WIDTH), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(SeqmixError, match="torch.bool"):
        mixer(torch.randn(2, 5, WIDTH), torch.zeros(2, 5))


def test_unknown_mixer_lists_the_registered_ones():
    with pytest.raises(SeqmixError) as error:
        seqmix.build_mixer("mamba", 8)
    for name in REQUIRED:
        assert name in str(error.value)


def test_unknown_impl_lists_the_valid_ones():
    with pytest.raises(SeqmixError, match=r"impl='cuda'.*\['chunked', 'fft', 'native', 'recurrent'\]"):
        seqmix.build_mixer("ema", 8, impl="cuda")
    mixer = seqmix.build_mixer("softmax_attention", 8)
    with pytest.raises(SeqmixError, match=r"\['math', 'sdpa'\]"):
        mixer.impl = "flash"


def test_unknown_option_lists_the_accepted_ones():
    with pytest.raises(SeqmixError, match="no option 'ndim'.*order"):
        seqmix.build_mixer("ema", 8, ndim=4)


@pytest.mark.parametrize("case", [c for c in mixer_cases() if not build(c[1], c[2]).causal], ids=lambda c: c[0])
def test_step_on_a_bidirectional_mixer_is_refused(case):
    mixer = build(case[1], case[2])
    with pytest.raises(SeqmixError, match="causal=False"):
        mixer.step(torch.randn(1, 2, WIDTH), ())


@pytest.mark.parametrize("case", [c for c in causal_cases() if c[1] != "identity"], ids=lambda c: c[0])
def test_state_for_another_batch_size_is_refused(case):
    mixer = build(case[1], case[2])
    with pytest.raises(SeqmixError, match="batch size 3, but x has batch size 2"):
        mixer.step(torch.randn(2, 1, WIDTH), mixer.init_state(3))


def test_state_of_another_mixer_is_refused():
    ema = seqmix.build_mixer("ema", 8)
    cema = seqmix.build_mixer("cema", 8)
    with pytest.raises(SeqmixError, match="CEMA: state is an EMAState holding 1 tensor; expected the CEMAState of 2"):
        cema.step(torch.randn(1, 1, 8), ema.init_state(1))
    # None flattens to one leaf, which is no tensor.
    with pytest.raises(SeqmixError, match="state is None; expected the CEMAState of 2"):
        cema.step(torch.randn(1, 1, 8), None)
    # The same count in another structure: it read "state has 1 tensors, expected 1".
    state = ema.init_state(1)
    with pytest.raises(SeqmixError, match="state is a list holding 1 tensor; expected the EMAState of 1"):
        ema.step(torch.randn(1, 1, 8), list(state))


@pytest.mark.parametrize(
    "name, options, field",
    [
        ("softmax_attention", {"heads": 3}, "heads=3"),
        ("gated_attention", {"z_dim": 6, "heads": 4}, "z_dim=6"),
        ("gated_attention", {"attention": "sigmoid"}, "attention='sigmoid'"),
        ("gated_attention", {"position_bias": "alibi"}, "position_bias='alibi'"),
        ("gated_attention", {"local": "ema", "causal": False, "local_options": {"causal": True}}, "may not set 'causal'"),
        ("ema", {"chunk_size": 0}, "chunk_size=0"),
        ("ema", {"order": 0}, "order=0"),
        ("cema", {"causal": False}, "causal=False"),
        ("tcn", {"causal": False}, "causal"),
        ("gated_attention", {"norm": "batchnorm"}, "batchnorm"),
    ],
)
def test_bad_options_name_the_field(name, options, field):
    with pytest.raises(SeqmixError, match=field):
        seqmix.build_mixer(name, 8, **options)


def test_step_past_the_cache_capacity_is_refused():
    mixer = seqmix.build_mixer("softmax_attention", 8, max_len=4)
    with torch.no_grad():
        _, state = mixer.step(torch.randn(1, 3, 8), mixer.init_state(1))
        with pytest.raises(SeqmixError, match="max_len=4"):
            mixer.step(torch.randn(1, 2, 8), state)


def test_full_attention_longer_than_max_len_is_refused():
    mixer = seqmix.build_mixer("gated_attention", 8, chunk_size=None, max_len=16)
    with pytest.raises(SeqmixError, match="max_len=16"):
        mixer(torch.randn(1, 17, 8))


def test_a_broken_mixer_plugin_is_skipped_with_a_warning_naming_it(monkeypatch):
    import importlib.metadata

    from seqmix import registry

    plugins = [
        importlib.metadata.EntryPoint("missing", "no_such_package.mixers:Missing", registry.ENTRY_POINT_GROUP),
        importlib.metadata.EntryPoint("not_a_mixer", "builtins:int", registry.ENTRY_POINT_GROUP),
        importlib.metadata.EntryPoint("ema", "seqmix.operators.tcn:TCN", registry.ENTRY_POINT_GROUP),
        # A name the benchmark would split as name/impl, and configs could not write.
        importlib.metadata.EntryPoint("my/tcn", "seqmix.operators.tcn:TCN", registry.ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: plugins if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    before = dict(registry._MIXERS)
    with pytest.warns(UserWarning) as caught:
        names = seqmix.list_mixers()
    messages = "\n".join(str(w.message) for w in caught)
    assert "'missing'" in messages and "ModuleNotFoundError" in messages
    assert "'not_a_mixer'" in messages and "not a seqmix.Mixer subclass" in messages
    assert "'ema'" in messages and "takes the name of the registered EMA" in messages
    assert "'my/tcn'" in messages and "name='my/tcn' is not valid; expected an identifier" in messages
    assert names == sorted(before) and registry._MIXERS == before


@pytest.mark.parametrize("name", [5, ["fast"], None, "", "my/mixer", "my mixer", "2fast", "émà"])
def test_register_mixer_refuses_a_name_configs_could_not_write(name):
    """A non-string name was registered and then broke list_mixers' sorting for every caller."""
    before = dict(seqmix.registry._MIXERS)
    with pytest.raises(SeqmixError, match=f"register_mixer: name={re.escape(repr(name))} is not valid; expected an identifier"):
        seqmix.register_mixer(name)
    assert seqmix.registry._MIXERS == before


@pytest.mark.parametrize("name", ["null", "NULL", "True", "false", "NaN", "inf"])
def test_register_mixer_refuses_a_name_an_override_reads_as_a_value(name):
    """model.mixers.a.mixer=null is None to Hydra, true a bool, nan a float: no override could name such a mixer."""
    with pytest.raises(SeqmixError, match=f"register_mixer: name='{name}' is not valid: an override reads {name} as a value"):
        seqmix.register_mixer(name)


def test_register_mixer_refuses_a_class_that_is_not_a_mixer():
    with pytest.raises(SeqmixError, match=r"register_mixer\('fast'\): <class 'torch.nn.modules.linear.Linear'> is not a seqmix.Mixer"):
        seqmix.register_mixer("fast")(torch.nn.Linear)
    # The abstract base, and a subclass that computes nothing, built and then raised a bare NotImplementedError.
    with pytest.raises(SeqmixError, match=r"register_mixer\('fast'\): <class 'seqmix.contract.Mixer'> is not a seqmix.Mixer subclass"):
        seqmix.register_mixer("fast")(seqmix.Mixer)

    class Empty(seqmix.Mixer):
        pass

    with pytest.raises(SeqmixError, match=r"Empty does not implement mix\(x, padding_mask\)"):
        seqmix.register_mixer("fast")(Empty)
    assert "fast" not in seqmix.list_mixers()


@pytest.mark.parametrize("options, named", [
    ({"layers": [["ema"]]}, "model: layers[0]=['ema'] is not valid"),
    ({"layers": [5]}, "model: layers[0]=5 is not valid"),
    ({"layers": 5}, "model: layers=5 is not valid"),
    ({"layers": ["ema"], "mixers": ["ema"]}, "model: mixers=['ema'] is not valid"),
    ({"layers": ["f"], "mixers": {"f": "ema"}}, "model.mixers.f='ema' is not valid"),
    ({"layers": ["ema"], "norm": ["layernorm"]}, "model: norm=['layernorm'] is not valid"),
    ({"layers": ["ema"], "head": 5}, "model: head=5 is not valid"),
], ids=["nested layer", "int layer", "int layers", "mixers list", "mixer string", "norm list", "head int"])
def test_build_model_names_a_part_of_the_wrong_kind(options, named):
    """Each was a TypeError or ValueError from calling or merging it ('list' object is not callable)."""
    with pytest.raises(SeqmixError, match=re.escape(named)):
        seqmix.build_model(vocab_size=32, d_model=16, **options)


def _block() -> seqmix.Block:
    return seqmix.Block(16, seqmix.build_mixer("ema", 16))


@pytest.mark.parametrize("build, named", [
    (lambda: seqmix.Block(16, seqmix.build_mixer("ema", 16), norm="layernorm"), "block: norm='layernorm' is not valid"),
    (lambda: seqmix.Block(16, seqmix.build_mixer("ema", 16), ffn="mlp"), "block: ffn must be a torch.nn.Module or None, got a str"),
    (lambda: seqmix.SequenceModel(32, 16, blocks=5, head=seqmix.CausalLMHead(16, 32)), "model: blocks=5 is not valid"),
    (lambda: seqmix.SequenceModel(32, 16, blocks=["ema"], head=seqmix.CausalLMHead(16, 32)), "model: blocks=['ema'] is not valid"),
    (lambda: seqmix.SequenceModel(32, 16, blocks=[_block()], head="lm"), "model: head must be a torch.nn.Module, got a str"),
    (lambda: seqmix.RMSNorm("16"), "RMSNorm: dim='16' is not valid"),
    (lambda: seqmix.TimestepNorm(None), "TimestepNorm: dim=None is not valid"),
    (lambda: seqmix.CausalLMHead("16", 32), "head: d_model='16' is not valid"),
    (lambda: seqmix.CausalLMHead(16, 1), "head: vocab_size=1 is not valid"),
], ids=["block norm", "block ffn", "blocks int", "blocks of names", "head str", "rmsnorm dim", "timestepnorm dim", "head width",
        "head vocab"])
def test_the_public_parts_name_an_argument_of_the_wrong_kind(build, named):
    """Each was torch's TypeError or an AttributeError from using it ('str' object is not callable)."""
    with pytest.raises(SeqmixError, match=re.escape(named)):
        build()


class _Counting(torch.nn.Module):
    """A user's FFN of width D with dropout and a buffer its forward changes."""

    def __init__(self, d_model: int):
        super().__init__()
        self.proj = torch.nn.Linear(d_model, d_model)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return torch.nn.functional.dropout(self.proj(x), 0.5, self.training)


@pytest.mark.parametrize("part, named", [
    ({"ffn": lambda d: seqmix.FeedForward(2 * d)}, "block: the ffn (FeedForward) does not take inputs of width D=16"),
    ({"ffn": lambda d: torch.nn.Linear(d, 2 * d)}, "block: the ffn (Linear) turns a (B, L, 16) input into (1, 2, 32)"),
    ({"norm": lambda d: seqmix.LayerNorm(2 * d)}, "block: the norm (LayerNorm) does not take inputs of width D=16"),
    ({"norm": lambda d: seqmix.TimestepNorm(2 * d)}, "block: the norm (TimestepNorm) does not take inputs of width D=16"),
    ({"norm": lambda d: (lambda x: x)}, "built a function, not a torch.nn.Module"),
    ({"head": lambda d, v: seqmix.CausalLMHead(2 * d, v)}, "model: the head (CausalLMHead) does not take inputs of width D=16"),
    ({"final_norm": lambda d: seqmix.RMSNorm(2 * d)}, "model: the final_norm (RMSNorm) does not take inputs of width D=16"),
], ids=["ffn in", "ffn out", "norm", "timestep norm", "norm function", "head", "final norm"])
def test_build_model_names_a_part_built_for_another_width(part, named):
    """Each built, and the first call failed with torch's shape error naming neither the part nor D."""
    with pytest.raises(SeqmixError, match=re.escape(named)):
        seqmix.build_model(vocab_size=32, d_model=16, layers=["ema"], ffn=part.pop("ffn", seqmix.FeedForward), **part)


def test_parts_of_the_right_width_build_and_their_check_changes_nothing():
    model = seqmix.build_model(vocab_size=32, d_model=16, layers=["ema"], ffn=lambda d: torch.nn.Linear(d, d),
                               norm=seqmix.TimestepNorm, final_norm=seqmix.TimestepNorm, head=lambda d, v: seqmix.CausalLMHead(d, 7))
    assert model(torch.randint(0, 32, (1, 5))).shape == (1, 5, 7)
    with torch.device("meta"):  # describe and the memory estimates build on meta, where a part cannot be called
        seqmix.build_model(vocab_size=32, d_model=16, layers=["ema"], norm=seqmix.TimestepNorm, final_norm=seqmix.TimestepNorm)
    # The check's call (dropout included) leaves the part's buffers and the random state as they were,
    # so that a seeded build gives the weights it gave before the check.
    from seqmix.layers.blocks import check_part_width

    part, random_state = _Counting(16), torch.get_rng_state()
    check_part_width("ffn", part, 16)
    assert part.calls.item() == 0 and torch.equal(torch.get_rng_state(), random_state)
    assert seqmix.build_model(vocab_size=32, d_model=16, layers=["ema"], ffn=_Counting).blocks[0].ffn.calls.item() == 0


def test_a_model_whose_layers_outgrow_the_memory_is_refused_after_one_pattern(monkeypatch):
    """model.depth=200000 took memory block by block until the system killed it."""
    import seqmix.timing

    built = []

    def counted(d_model):
        built.append(d_model)
        return seqmix.build_mixer("ema", d_model)

    block_bytes = sum(t.numel() * t.element_size() for t in seqmix.Block(16, seqmix.build_mixer("ema", 16), seqmix.FeedForward(16)).state_dict().values())
    monkeypatch.setattr(seqmix.timing, "physical_memory_bytes", lambda: 100 * block_bytes)
    with pytest.raises(SeqmixError, match=r"model: 1,000 layers need about .* GiB for their weights alone, more than .* of cpu memory"):
        seqmix.build_model(vocab_size=32, d_model=16, layers=["a", "b"], mixers={"a": counted, "b": counted}, depth=1000,
                           ffn=seqmix.FeedForward)
    assert len(built) == 2  # the pattern once, then refused
    assert len(seqmix.build_model(vocab_size=32, d_model=16, layers=["ema"], depth=90, ffn=seqmix.FeedForward).blocks) == 90
    with torch.device("meta"):  # nothing is allocated there
        assert len(seqmix.build_model(vocab_size=32, d_model=16, layers=["ema"], depth=1000).blocks) == 1000


def test_a_model_config_names_a_registered_mixer_and_its_options():
    model = seqmix.build_model(vocab_size=32, d_model=16, layers=["fast", "ema"], mixers={"fast": {"mixer": "tcn", "depth": 2}})
    assert isinstance(model.blocks[0].mixer, seqmix.TCN) and model.blocks[0].mixer.depth == 2
    with pytest.raises(SeqmixError, match=r"model.mixers.fast.mixer='tcnn' is not a registered mixer.*'tcn'"):
        seqmix.build_model(vocab_size=32, d_model=16, layers=["fast"], mixers={"fast": {"mixer": "tcnn"}})


class _MisshapenMixer(seqmix.Mixer):
    """A user's mixer whose mix widens its output and whose mix_step drops a token."""

    def __init__(self, d_model: int):
        super().__init__(d_model, causal=True)
        self.scale = torch.nn.Parameter(torch.ones(d_model))

    def mix(self, x, padding_mask=None):
        return torch.cat([x, x], dim=-1) * self.scale.repeat(2)

    def empty_state(self, batch_size, device=None, dtype=None):
        return (torch.zeros(batch_size, 1, device=device),)

    def mix_step(self, x, state):
        return x[:, :-1] * self.scale, state


def test_a_mixer_returning_another_shape_is_named_at_its_call():
    """Its forward returned (B, L, 2D) silently, and a model failed inside the block's residual with
    torch's error naming neither the mixer nor the method."""
    mixer, x = _MisshapenMixer(8), torch.randn(2, 5, 8)
    with pytest.raises(SeqmixError, match=re.escape("_MisshapenMixer.mix returned (2, 5, 16) for an input of shape (2, 5, 8)")):
        mixer(x)
    with pytest.raises(SeqmixError, match=re.escape("_MisshapenMixer.mix_step returned (2, 4, 8) for an input of shape (2, 5, 8)")):
        mixer.step(x, mixer.init_state(2))
    model = seqmix.build_model(vocab_size=32, d_model=8, layers=[_MisshapenMixer])
    with pytest.raises(SeqmixError, match="_MisshapenMixer.mix returned"):
        model(torch.randint(0, 32, (1, 4)))


class _NoStep(seqmix.Mixer):
    """A user's mixer with no streaming methods."""

    def __init__(self, d_model: int, causal: bool = True):
        super().__init__(d_model, causal=causal)

    def mix(self, x, padding_mask=None):
        return x


class _RaisesOnBuild(seqmix.Mixer):
    def __init__(self, d_model: int):
        raise ValueError(f"no width {d_model} for me")

    def mix(self, x, padding_mask=None):
        return x


class _SkipsTheBase(seqmix.Mixer):
    def __init__(self, d_model: int):
        torch.nn.Module.__init__(self)

    def mix(self, x, padding_mask=None):
        return x


def test_a_broken_user_mixer_is_named_as_it_is_built(monkeypatch):
    """A causal mixer without mix_step trained and checkpointed, then failed at the run's sample with
    NotImplementedError; one raising in __init__ was a bare traceback naming no layer; one skipping
    Mixer.__init__ an AttributeError ('d_model') somewhere later."""
    from seqmix import registry

    monkeypatch.setattr(registry, "_MIXERS", dict(registry._MIXERS))
    for name, cls in (("no_step", _NoStep), ("raises_on_build", _RaisesOnBuild), ("skips_the_base", _SkipsTheBase)):
        seqmix.register_mixer(name)(cls)
    refusals = [
        ("no_step", "_NoStep is built with causal=True but does not implement mix_step and empty_state"),
        ("raises_on_build", "mixer 'raises_on_build' (_RaisesOnBuild) could not be built for d_model=8 with options {}: "
                            "ValueError: no width 8 for me"),
        ("skips_the_base", "mixer 'skips_the_base' (_SkipsTheBase) did not call Mixer.__init__"),
    ]
    for name, message in refusals:
        with pytest.raises(SeqmixError, match=re.escape(message)):
            seqmix.build_mixer(name, 8)
    assert not seqmix.build_mixer("no_step", 8, causal=False).causal
    with pytest.raises(SeqmixError, match=re.escape("could not be built")):
        seqmix.build_model(vocab_size=32, d_model=8, layers=["raises_on_build"])


def test_a_streaming_state_beyond_the_memory_is_refused_by_name_before_it_is_allocated(monkeypatch):
    """A config asking for an attention cache of max_len=10**12 (edited by someone else), or a batch of
    10**15, was the allocator's RuntimeError naming neither, or took the machine's memory."""
    import seqmix.timing

    huge_cache = seqmix.build_mixer("softmax_attention", 16, max_len=10**12)
    with pytest.raises(SeqmixError, match=r"SoftmaxAttention: a streaming state for B=1 holds .* GiB .* max_len"):
        huge_cache.init_state(1)
    for name in seqmix.list_mixers():
        mixer = seqmix.build_mixer(name, 16)
        if mixer.causal and mixer.state_size():  # identity holds nothing, for any batch
            with pytest.raises(SeqmixError, match=rf"{type(mixer).__name__}: a streaming state for B={10**15}"):
                mixer.init_state(10**15)
            mixer.init_state(2)
    model = seqmix.build_model(vocab_size=32, d_model=16, layers=["attention"] * 3,
                               mixers={"attention": {"mixer": "softmax_attention", "max_len": 10**6}})
    per_layer = seqmix.contract.state_bytes(model.blocks[0].mixer.init_state(1))
    # Each layer alone fits; the three together do not.
    monkeypatch.setattr(seqmix.timing, "physical_memory_bytes", lambda: 2 * per_layer)
    model.blocks[0].mixer.init_state(1)
    with pytest.raises(SeqmixError, match=r"model: a streaming state for B=1 holds"):
        model.init_state(1)


class _StateAsList(seqmix.Mixer):
    """A user's mixer whose mix_step returns its state as a list."""

    def __init__(self, d_model: int):
        super().__init__(d_model, causal=True)
        self.scale = torch.nn.Parameter(torch.ones(d_model))

    def mix(self, x, padding_mask=None):
        return x * self.scale

    def empty_state(self, batch_size, device=None, dtype=None):
        return (torch.zeros(batch_size, self.d_model, device=device),)

    def mix_step(self, x, state):
        return x * self.scale, [state[0]]


def test_step_keeps_the_states_structure_and_floating_dtypes():
    """A bfloat16 state came back float32 from the recurrences (its dtype changed between steps), and a
    mix_step returning a list was told at the next step, as if the caller had passed it."""
    for name in seqmix.list_mixers():
        mixer = seqmix.build_mixer(name, 16)
        if not mixer.causal:
            continue
        for dtype in (torch.bfloat16, torch.float64):
            state = mixer.init_state(2, dtype=dtype)
            _, after = mixer.step(torch.randn(2, 3, 16), state)
            assert [t.dtype for t in tree_flatten(after)[0]] == [t.dtype for t in tree_flatten(state)[0]], (name, dtype)
            assert type(after) is type(state)
    mixer = _StateAsList(8)
    with pytest.raises(SeqmixError, match=r"_StateAsList.mix_step returned its state as a list of 1 leaves, not in the structure"):
        mixer.step(torch.randn(1, 2, 8), mixer.init_state(1))


def test_messages_name_a_values_kind_in_words():
    """Messages read "is a NoneType", "a int" and "a EMAState" where a value of the wrong kind was given."""
    from seqmix.errors import json_kind, kind_of

    assert [kind_of(v) for v in (None, 3, "x", [], torch.ones(1))] == ["None", "an int", "a str", "a list", "a Tensor"]
    assert [json_kind(v) for v in (None, [], {}, 1.5, True)] == ["JSON null", "a JSON array", "a JSON object", "a JSON number",
                                                                "JSON true or false"]
    ema, cema = seqmix.build_mixer("ema", 8), seqmix.build_mixer("cema", 8)
    model = seqmix.build_model(16, 8, ["ema"])
    calls = [lambda: ema(None), lambda: ema(3), lambda: ema.step(torch.ones(1, 2, 8), None),
             lambda: cema.step(torch.ones(1, 2, 8), ema.init_state(1)), lambda: ema(torch.ones(1, 2, 8), padding_mask=1),
             lambda: model(None), lambda: model.step(torch.ones(1, 2, dtype=torch.long), None)]
    for call in calls:
        with pytest.raises(SeqmixError) as raised:
            call()
        assert not re.search(r"NoneType|\ba (int|EMAState|ModelState)\b", str(raised.value)), str(raised.value)
        assert re.search(r"\b(None|an int|an EMAState)\b", str(raised.value)), str(raised.value)
