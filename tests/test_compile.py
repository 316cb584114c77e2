"""compile/: every preset traces as one graph, compiled models equal eager ones, training works.

Inductor compiles take tens of seconds per graph on 2 cores, so Inductor runs only on the two
presets that cover both kinds of mixer, at tiny sizes: mega's training step (EMA with its
cross-chunk ``scan``, gated attention, and their backward) and transformer's forward and decoding
step (softmax attention with a KV cache); plus one tcnca forward (Inductor runs its TCN on the
``taps`` path). With --runslow also mega's decoding step and one megalodon forward at static
shapes (a regression case). Every other preset, mega's forward and step included, runs through ``aot_eager``,
which traces the same forward, step and backward graphs (``scan`` included) and runs them
with eager kernels. Graph breaks are checked on every preset with ``torch._dynamo.explain``,
which needs no backend compiler.
"""
from __future__ import annotations

import copy
import subprocess
import sys
import types

import pytest
import torch
from torch.utils._pytree import tree_flatten

from seqmix.compile import BACKENDS, compile_model, explain_model, graph_breaks
import seqmix
from seqmix import SeqmixError
from seqmix.configs import config_groups
from conftest import preset_model
from seqmix.operators.tcn import TCN

# torch's own tracing of scan calls a deprecated torch.jit API; nothing here can change that.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

PRESETS = config_groups()["model"]
BIDIRECTIONAL = {"mega_encoder"}
# Inductor's first compile in a process builds its CPU probes and precompiled header (~15 s on a
# 2-core machine, once per empty cache directory); on one worker, the later compiles reuse them.
INDUCTOR = pytest.mark.xdist_group("inductor")
# Float32, compiled vs eager: Inductor reorders sums and fuses ops, errors seen are ~1e-6.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def build(preset: str, depth: int = 1):
    """The preset at width 32, its layer pattern once (the hybrid's has 3 layers)."""
    depth = 3 if preset == "hybrid_tcn_attention" else depth
    return preset_model(f"model={preset}", "model.d_model=32", f"model.depth={depth}")


def random_tokens(model, batch: int = 2, length: int = 256) -> torch.Tensor:
    # 256 tokens span two 128-chunks, so the cross-chunk carry runs.
    return torch.randint(0, model.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled graphs and recompile counters must not leak from one case into the next."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def graph_cases() -> list:
    """(preset, graph) for every graph a preset has: a list, since pytest is dropping generators in
    parametrize (PytestRemovedIn10Warning)."""
    return [pytest.param(preset, graph, id=f"{preset}-{graph}")
            for preset in PRESETS for graph in (("forward",) if preset in BIDIRECTIONAL else ("forward", "step"))]


@pytest.mark.parametrize("preset, graph", graph_cases())
def test_preset_traces_as_one_graph(preset, graph):
    model = build(preset)
    tokens = random_tokens(model)
    assert model.causal == (preset not in BIDIRECTIONAL)
    if graph == "forward":
        breaks = graph_breaks(model.forward, tokens)
    else:
        breaks = graph_breaks(model.step, tokens[:, :1], model.init_state(2))
    assert breaks == []


def test_graph_breaks_names_a_break_and_where():
    def broken(x):
        x = x.sin()
        torch._dynamo.graph_break()
        return x.cos()

    breaks = graph_breaks(broken, torch.randn(3))
    assert len(breaks) == 1
    assert f"{__file__}:" in breaks[0]


def test_explain_model_reports_step_only_for_streaming_models():
    causal, bidirectional = build("transformer", depth=1), build("mega_encoder", depth=1)
    assert explain_model(causal, random_tokens(causal, length=16)) == {"forward": [], "step": []}
    assert explain_model(bidirectional, random_tokens(bidirectional, length=16)) == {"forward": []}


def assert_step_matches_eager(compiled, model, tokens, steps: int = 4):
    """Stream ``steps`` single tokens through both; logits and the final state must agree, and
    the step graph compiled for the first token serves every later one."""
    compiled_state, eager_state = model.init_state(tokens.shape[0]), model.init_state(tokens.shape[0])
    with torch.no_grad():
        for t in range(steps):
            with torch._dynamo.config.patch(error_on_recompile=t > 0):
                got, compiled_state = compiled.step(tokens[:, t : t + 1], compiled_state)
            want, eager_state = model.step(tokens[:, t : t + 1], eager_state)
            torch.testing.assert_close(got, want, **TOLERANCE)
    for got, want in zip(tree_flatten(compiled_state)[0], tree_flatten(eager_state)[0], strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE)


@INDUCTOR
@pytest.mark.parametrize("preset", ["transformer", pytest.param("mega", marks=pytest.mark.slow)])
def test_inductor_step_equals_eager(preset):
    model = build(preset, depth=1).eval()
    assert_step_matches_eager(compile_model(model), model, random_tokens(model))


@INDUCTOR
@pytest.mark.parametrize("name", ["ema", "cema"])
def test_a_plain_torch_compile_of_the_chunked_recurrence_equals_eager(name):
    """torch.compile(mixer) without compile_model's settings failed inside Inductor at L > chunk_size
    (DataDependentOutputException on the scan's loop index): it now carries the chunks with the loop."""
    mixer = seqmix.build_mixer(name, 8, order=2, chunk_size=4)
    x = torch.randn(1, 10, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(mixer)(x), mixer(x), **TOLERANCE)


@INDUCTOR
def test_inductor_forward_equals_eager():
    model = build("transformer", depth=1).eval()
    tokens = random_tokens(model)
    with torch.no_grad():
        torch.testing.assert_close(compile_model(model)(tokens), model(tokens), **TOLERANCE)


@INDUCTOR
@pytest.mark.slow
def test_inductor_static_forward_of_megalodon_equals_eager():
    # Regression: TimestepNorm took the first valid step as argmax of an all-True mask, which
    # Inductor (torch 2.13) compiled at static shapes into a garbage index and an out-of-bounds
    # read that aborted the process. Restoring that argmax no longer fails here with torch
    # 2.13.0, so this 20 s compile runs with --runslow only.
    model = build("megalodon", depth=1).eval()
    tokens = random_tokens(model, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(compile_model(model, dynamic=False)(tokens), model(tokens), **TOLERANCE)


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "transformer"])
def test_aot_eager_forward_and_step_equal_eager(preset):
    model = build(preset, depth=1).eval()
    compiled = compile_model(model, backend="aot_eager")
    tokens = random_tokens(model)
    padding_mask = torch.zeros(tokens.shape, dtype=torch.bool)
    padding_mask[1, 200:] = True
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens, padding_mask), model(tokens, padding_mask), **TOLERANCE)
    if preset not in BIDIRECTIONAL:
        assert_step_matches_eager(compiled, model, tokens)


@pytest.mark.parametrize("preset, backend", [pytest.param("mega", "inductor", marks=INDUCTOR), ("megalodon", "aot_eager")])
def test_training_through_compiled_model_updates_the_model(preset, backend):
    model = build(preset, depth=1).train()
    reference = copy.deepcopy(model)
    compiled = compile_model(model, backend=backend)
    # The wrapper owns nothing: its parameters are the model's, so the optimizer trains the model.
    assert [id(p) for p in compiled.parameters()] == [id(p) for p in model.parameters()]
    tokens = random_tokens(model)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    # The first step's loss and gradients equal eager ones.
    loss = loss_of(compiled(inputs))
    loss.backward()
    reference_loss = loss_of(reference(inputs))
    reference_loss.backward()
    torch.testing.assert_close(loss, reference_loss, **TOLERANCE)
    for (name, got), want in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(compiled.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        if losses:
            loss = loss_of(compiled(inputs))
            loss.backward()
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    unchanged = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == []


def tcn_impls(model) -> set[str]:
    return {module.impl for module in model.modules() if isinstance(module, TCN)}


@INDUCTOR
def test_inductor_runs_the_tcn_on_its_taps_and_matches_the_convolution():
    model = build("tcnca", depth=1).eval()
    tokens = random_tokens(model)
    assert tcn_impls(model) == {"channels_last"}
    with torch.no_grad():
        expected = model(tokens)
        compiled = compile_model(model)
        assert tcn_impls(model) == {"taps"}
        torch.testing.assert_close(compiled(tokens), expected, **TOLERANCE)


@pytest.mark.parametrize("backend, options", [("inductor", {"switch_paths": False}), ("aot_eager", {})])
def test_the_tcn_keeps_its_path_unless_inductor_may_switch_it(backend, options):
    model = build("tcnca", depth=1)
    compile_model(model, backend=backend, **options)
    assert tcn_impls(model) == {"channels_last"}


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(SeqmixError, match="backend='xla'") as error:
        compile_model(build("transformer", depth=1), backend="xla")
    for backend in BACKENDS:
        assert repr(backend) in str(error.value)


def test_mode_is_for_inductor_only_and_must_exist():
    model = build("transformer", depth=1)
    with pytest.raises(SeqmixError, match="backend=.inductor. only"):
        compile_model(model, backend="aot_eager", mode="max-autotune")
    with pytest.raises(SeqmixError, match="'max-autotune'"):
        compile_model(model, mode="fastest")
    # A list where a name goes was a TypeError (unhashable) from the lookup among Inductor's modes.
    with pytest.raises(SeqmixError, match=r"mode=\['default'\] is not valid"):
        compile_model(model, mode=["default"])


def test_a_refused_compile_leaves_the_models_paths_as_they_were():
    """mode='bogus' was refused after the mixers had been switched to their Inductor paths, and the
    boolean options took any value: 'no' meant yes, and dynamic='yes' was torch's AssertionError."""
    from seqmix.contract import Mixer, switch_impls

    def mixer_impls(model):
        return {name: module.impl for name, module in model.named_modules() if isinstance(module, Mixer)}

    model = build("tcnca", depth=1)
    before = mixer_impls(model)
    assert before != switch_impls(build("tcnca", depth=1), "inductor")
    for options, message in [({"mode": "bogus"}, "mode='bogus' is not valid"),
                             ({"dynamic": "yes"}, "dynamic='yes' is not valid; expected True or False"),
                             ({"fullgraph": "no"}, "fullgraph='no' is not valid"),
                             ({"switch_paths": 0}, "switch_paths=0 is not valid")]:
        with pytest.raises(SeqmixError, match=f"compile_model: {message}"):
            compile_model(model, **options)
        assert mixer_impls(model) == before


def test_compile_model_names_a_model_that_is_not_a_module():
    """A string was an AttributeError ('str' object has no attribute 'named_modules')."""
    with pytest.raises(SeqmixError, match="compile_model: model must be a torch.nn.Module .*got a str"):
        compile_model("transformer")


def test_tensorrt_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # makes `import torch_tensorrt` fail
    with pytest.raises(SeqmixError, match=r"pip install torch-tensorrt \(needs an NVIDIA GPU and the torch version it pins\)"):
        compile_model(build("transformer", depth=1), backend="tensorrt")


def test_tensorrt_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", types.ModuleType("torch_tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SeqmixError, match="needs a CUDA device"):
        compile_model(build("transformer", depth=1), backend="tensorrt")


def test_step_of_a_compiled_bidirectional_model_refuses_like_the_model():
    model = build("mega_encoder", depth=1)
    with pytest.raises(SeqmixError, match="cannot stream"):
        compile_model(model, backend="eager").step(random_tokens(model, length=4), ())


def test_the_library_never_imports_compile_or_export():
    code = ("import sys, seqmix, seqmix.training.loop; "
            "assert not {'seqmix.compile', 'seqmix.export'} & set(sys.modules), 'the library imported compile or export'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_compiled_model_fails_where_its_values_are_wrong_instead_of_running_on():
    """The checks that read values ran on eager calls only: a compiled model streamed past its
    attention cache, whose ring wrapped into a sliding window (wrong logits, no error), and a
    negative token id reached the embedding (an index error from inside a kernel)."""
    model = preset_model("model=transformer", "model.d_model=16", "model.depth=1", "model.mixers.attention.max_len=16").eval()
    compiled = compile_model(model, backend="eager")
    tokens = random_tokens(model, batch=1, length=24)
    state = compiled.init_state(1)
    with torch.no_grad():
        _, state = compiled.step(tokens[:, :16], state)  # the cache holds exactly these
        with pytest.raises(RuntimeError, match=r"softmax_attention: the stream would reach more tokens than the cache "
                                               r"holds \(max_len=16\)"):
            compiled.step(tokens[:, 16:], state)
        with pytest.raises(RuntimeError, match=r"model: token ids must lie in \[0, vocab_size=256\)"):
            compiled(torch.tensor([[5, -1, 7]]))
    gated = seqmix.build_mixer("gated_attention", 16, chunk_size=None, max_len=8).eval()
    step = torch.compile(gated.step, backend="eager")
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"gated_attention: the stream would reach more tokens than full "
                                                            r"attention holds \(max_len=8\)"):
        step(torch.randn(1, 9, 16), gated.init_state(1))
    learned = preset_model("model=gpt2", "model.d_model=16", "model.depth=1", "model.max_len=8").eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"model: the stream would run past max_len=8 of the learned positions"):
        compile_model(learned, backend="eager").step(random_tokens(learned, batch=1, length=4), _past(learned, 6))


def _past(model, tokens: int):
    """The model's state after ``tokens`` tokens, as its own eager step leaves it."""
    _, state = model.step(random_tokens(model, batch=1, length=tokens), model.init_state(1))
    return state
