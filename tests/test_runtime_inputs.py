"""Wrong inputs to a streaming model get a SeqmixError that names them before any runtime sees
them: eager ``model.step``, the ONNX Runtime runner (export/run_onnx.py) and ExecuTorch's ``run_pte``.

Each wrapper is fed wrong shapes, wrong dtypes, token ids outside the vocabulary, and the state
of another model.
"""
from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from torch.utils._pytree import tree_flatten

from conftest import causal_presets, onnx_runner, tiny_preset
import seqmix
from seqmix import SeqmixError
from seqmix.export.graphs import state_input_names
from seqmix.model.sequence_model import ModelState
from seqmix.model.summary import describe_model

ROOT = Path(__file__).resolve().parent.parent


@cache
def tiny(preset: str, d_model: int = 32):
    return tiny_preset(preset, f"model.d_model={d_model}").eval()


CAUSAL = list(causal_presets())


# --- eager model.step ---------------------------------------------------------------------


@pytest.mark.parametrize("preset", CAUSAL)
def test_step_refuses_the_state_of_every_other_preset(preset):
    model = tiny(preset)
    tokens = torch.zeros(1, 1, dtype=torch.long)
    for other in CAUSAL:
        if other != preset:
            with pytest.raises(SeqmixError, match="state"):
                model.step(tokens, tiny(other).init_state(1))


def _with_pos(state: ModelState, pos: torch.Tensor) -> ModelState:
    return state._replace(pos=pos)


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda m: (torch.zeros(1, 1), m.init_state(1)), r"tokens must be a \(B, L\) tensor of torch.int64 or torch.int32 ids"),
        (lambda m: (torch.zeros(1, dtype=torch.long), m.init_state(1)), r"tokens must be a \(B, L\) tensor of torch.int64 or torch.int32 ids"),
        (lambda m: (torch.zeros(1, 0, dtype=torch.long), m.init_state(1)), "at least one row and one token"),
        (lambda m: (torch.full((1, 2), 256), m.init_state(1)), r"token ids must lie in \[0, vocab_size=256\), got ids from 256 to 256"),
        (lambda m: (torch.tensor([[3, -1]]), m.init_state(1)), r"token ids must lie in \[0, vocab_size=256\), got ids from -1"),
        (lambda m: (torch.zeros(2, 1, dtype=torch.long), m.init_state(1)), "for batch size 2; was it built by another model or batch size"),
        (lambda m: (torch.zeros(1, 1, dtype=torch.long), tuple(m.init_state(1))), "must be the ModelState"),
        (lambda m: (torch.zeros(1, 1, dtype=torch.long), tiny_preset("megalodon", "model.depth=2").init_state(1)),
         r"state holds 2 layer state\(s\) but this model has 1 layer\(s\)"),
        (lambda m: (torch.zeros(1, 1, dtype=torch.long), tiny("megalodon", 16).init_state(1)), r"state tensor \d+ of layer 0"),
        (lambda m: (torch.zeros(1, 1, dtype=torch.long), _with_pos(m.init_state(1), torch.zeros(1))), "pos has dtype torch.float32, expected torch.int64"),
    ],
    ids=["float tokens", "rank 1", "no tokens", "id too large", "negative id", "batch size", "plain tuple", "more layers",
         "narrower model", "float positions"],
)
def test_step_names_a_wrong_input(make_input, message):
    model = tiny("megalodon")
    tokens, state = make_input(model)
    with pytest.raises(SeqmixError, match=message):
        model.step(tokens, state)


@pytest.mark.parametrize("tokens, low, high", [([[1, 300]], 1, 300), ([[-1, 3]], -1, 3), ([[256]], 256, 256)],
                         ids=["too large", "negative", "vocab_size itself"])
def test_forward_names_a_token_id_outside_the_vocabulary_as_step_does(tokens, low, high):
    # The embedding alone failed with "index out of range in self" (a device-side assert on a GPU).
    model = tiny("megalodon")
    with pytest.raises(SeqmixError, match=rf"token ids must lie in \[0, vocab_size=256\), got ids from {low} to {high}"):
        model(torch.tensor(tokens))


@pytest.mark.parametrize(
    "arguments, message",
    [((256, 16, "ema"), r"layers='ema' is a string; give a list of mixer names, e.g. layers=\['ema'\]"),
     (("256", 16, ["ema"]), "vocab_size='256' is not valid"),
     ((256, 0, ["ema"]), "d_model=0 is not valid")],
    ids=["layers as a string", "vocab_size as a string", "zero width"],
)
def test_build_model_names_a_bad_argument_before_building_a_part(arguments, message):
    with pytest.raises(SeqmixError, match=message):
        seqmix.build_model(*arguments)


@pytest.mark.parametrize("call, message", [
    (lambda: seqmix.build_model(16, 16, [seqmix.build_mixer("ema", 16)]), r"layers\[0\] is an EMA module, not a factory"),
    (lambda: seqmix.build_model(16, 16, ["a"], mixers={"a": seqmix.build_mixer("ema", 16)}), r"mixers.a is an EMA module, not a factory"),
    (lambda: seqmix.build_model(16, 16, ["ema"], norm=seqmix.LayerNorm(16)), r"norm is a LayerNorm module, not a factory.*its class \(LayerNorm\)"),
    (lambda: seqmix.build_model(16, 16, ["ema"], block=lambda **parts: 3), r"block=.* built an int, not a seqmix Block"),
    (lambda: seqmix.instantiate_model({"vocab_size": 16, "d_model": 16, "layers": ["ema"]}, device="bogus"),
     r"instantiate_model: device='bogus' is not a device torch knows"),
    (lambda: seqmix.RMSNorm(16)(torch.randn(2, 3, 8)), r"RMSNorm: x has shape \(2, 3, 8\), expected \(..., D=16\)"),
    (lambda: seqmix.ScaleNorm(16)(torch.randn(2, 3, 8)), r"ScaleNorm: x has shape \(2, 3, 8\), expected \(..., D=16\)"),
    (lambda: describe_model(seqmix.build_mixer("ema", 16)), r"describe_model: model is an EMA, not a seqmix SequenceModel"),
    (lambda: seqmix.build_mixer("tcn", 16, dilation_base=10**12), r"give the last layer a window of 3,000,000,000,000,000,000,000,000,000,000,000,000 steps"),
    (lambda: seqmix.build_mixer("tcn", 16, dilation_base=10**12, depth=2)(torch.randn(1, 10, 16)),
     r"tcn: a layer's context for \(B, T\) = \(1, 10\) is 178,813.9 GiB \(a window of 3,000,000,000,000 steps"),
], ids=["mixer instance in layers", "mixer instance in mixers", "norm instance", "block factory", "device", "rmsnorm width",
        "scalenorm width", "describe a mixer", "tcn window", "tcn context"])
def test_a_part_given_where_a_factory_goes_a_bad_device_or_width_and_an_impossible_window_are_named(call, message):
    """Each ended in an error that named something else: the mixer's forward run on the integer D,
    'int' object has no attribute 'parameters', torch's device parser or multiply, an AttributeError
    for 'blocks', torch's 'Overflow when unpacking long long' or a 192 TB allocation."""
    with pytest.raises(SeqmixError, match=message):
        call()


# --- the ONNX Runtime runner ----------------------------------------------------------------


KEY, POSITIONS = "past_key_values.0.key", "past_state.0.key_pos"
"""Two state inputs of the transformer's decoder graph: its first layer's keys and their positions."""


@pytest.fixture(scope="module")
def onnx_step(exported_presets):
    """(runner module, the transformer's step graph as an OnnxModel, its initial state by name)."""
    runner = onnx_runner()
    _, result = exported_presets("transformer")
    manifest = runner.load(result.parallel.parent)
    step = runner.OnnxModel(result.parallel.parent, manifest["step"], manifest["vocab_size"])
    names = [s["name"] for s in manifest["step"]["state"]]
    return runner, step, dict(zip(names, runner.initial_state(manifest)))


def test_the_onnx_runner_refuses_the_state_of_another_model(onnx_step):
    runner, step, _ = onnx_step
    tokens = np.zeros((1, 1), dtype=np.int64)
    for other in ("megalodon", "mega", "gpt2"):
        state = tiny(other).init_state(1)
        foreign = {name: leaf.numpy() for name, leaf in zip(state_input_names(state), tree_flatten(state)[0])}
        with pytest.raises(runner.ExportError, match="input 'past_"):
            step.run({"input_ids": tokens, **foreign})


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda feed: {**feed, "input_ids": np.array([[256]])}, r"ids from 256 to 256; they must lie in \[0, vocab_size=256\)"),
        (lambda feed: {**feed, "input_ids": np.array([[-3]])}, "ids from -3"),
        (lambda feed: {**feed, "input_ids": [[1]]}, "input 'input_ids' is a list; expected a NumPy array"),
        (lambda feed: {**feed, KEY: feed[KEY].astype(np.float64)}, f"input '{KEY}' has dtype float64, expected float32"),
        (lambda feed: {**feed, "extra": np.zeros(1)}, "input 'extra' is not an input of this graph"),
        (lambda feed: {k: v for k, v in feed.items() if k != POSITIONS}, f"input '{POSITIONS}' is missing"),
        (lambda feed: {**feed, "input_ids": np.zeros((2, 3), dtype=np.int64)}, "batch=1 on axis 0 but input 'input_ids' has batch=2"),
    ],
    ids=["id too large", "negative id", "not an array", "state dtype", "unknown input", "missing state", "batch disagrees"],
)
def test_the_onnx_runner_names_a_wrong_input(change, message, onnx_step):
    runner, step, state = onnx_step
    with pytest.raises(runner.ExportError, match=message):
        step.run(change({"input_ids": np.zeros((1, 1), dtype=np.int64), **state}))


@pytest.mark.parametrize(
    "options, message",
    [({"tokens": -1}, "--tokens=-1"), ({"temperature": -0.5}, "--temperature=-0.5"), ({"top_k": -3}, "--top-k=-3")],
    ids=["tokens", "temperature", "top-k"],
)
def test_the_onnx_runner_names_a_bad_sampling_option_before_opening_a_session(options, message, exported_presets, monkeypatch):
    runner = onnx_runner()
    _, result = exported_presets("transformer")
    manifest = runner.load(result.parallel.parent)
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *args, **kwargs: pytest.fail("a session was opened"))
    arguments = {"tokens": 4, "temperature": 0.8, "top_k": 40, "seed": 0, **options}
    with pytest.raises(runner.ExportError, match=message):
        runner.generate(result.parallel.parent, manifest, "def ", **arguments)


def test_the_onnx_runner_streams_what_one_stream_takes_and_refuses_more_before_opening_a_session(exported_presets, monkeypatch):
    """gpt2's learned positions and cache take 1024 tokens: the prompt and every sampled token but the
    last go through the graph, so a 4-token prompt takes 1021 new ones (the last step once went past
    the positions, an ONNX Runtime error) and 1022 are refused before a session opens."""
    runner = onnx_runner()
    model, result = exported_presets("gpt2")
    manifest = runner.load(result.parallel.parent)
    limit = runner.stream_limit(manifest["step"])
    assert limit == model.token_limit == 1024
    ids = runner.generate_ids(result.parallel.parent, manifest, "def ", tokens=limit - 3, temperature=0, top_k=None, seed=0)
    assert len(ids) == limit - 3
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *args, **kwargs: pytest.fail("a session was opened"))
    with pytest.raises(runner.ExportError, match=f"--tokens={limit - 2} is not valid with a prompt of 4 tokens: one stream "
                                                 f"of this model takes {limit} tokens; ask for at most {limit - 3}"):
        runner.generate(result.parallel.parent, manifest, "def ", tokens=limit - 2, temperature=0, top_k=None, seed=0)
    for unreadable in ({"tokens": "1..x"}, {"tokens": "0..8"}, None, {"tokens": "1..1e9"}):
        damaged = {**manifest, "step": {**manifest["step"], "dynamic_dims": unreadable}}
        with pytest.raises(runner.ExportError, match="step.dynamic_dims=.* is not valid"):
            runner.generate(result.parallel.parent, damaged, "def ", tokens=4, temperature=0, top_k=None, seed=0)


# --- ExecuTorch's run_pte -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pte_step(tmp_path_factory):
    """A tiny ema_conv (D = 16, one layer) decoder program: inputs input_ids (1, T <= 64), then two state tensors (1, 16, 16) and (1,)."""
    pytest.importorskip("executorch.runtime", reason="executorch is not installed: pip install executorch==1.5.1")
    from seqmix.export import executorch_export as et

    model = tiny_preset("ema_conv", "model.d_model=16", "model.depth=1").eval()
    path = tmp_path_factory.mktemp("pte") / "step.pte"
    et.export_step_pte(model, path)
    return et, model, path


def test_run_pte_accepts_the_right_inputs(pte_step):
    et, model, path = pte_step
    state = tree_flatten(model.init_state(1))[0]
    logits, *_ = et.run_pte(path, torch.tensor([[5]]), *state, vocab_size=model.vocab_size)
    assert logits.shape == (1, 1, model.vocab_size)


@pytest.mark.parametrize(
    "make_inputs, message",
    [
        (lambda m: [torch.tensor([[5.0]]), *tree_flatten(m.init_state(1))[0]], r"input 0 \(input_ids\) has dtype torch.float32, the program takes torch.int64"),
        (lambda m: [torch.tensor([[5]]), *(t.double() if t.is_floating_point() else t for t in tree_flatten(m.init_state(1))[0])],
         r"input 1 \(state tensor 0\) has dtype torch.float64, the program takes torch.float32"),
        (lambda m: [torch.tensor([[5]]), *tree_flatten(tiny("transformer").init_state(1))[0]], "takes 3 inputs .* got 6:"),
        (lambda m: [torch.tensor([[5]]), *tree_flatten(tiny_preset("ema_conv", "model.depth=1").init_state(1))[0]],
         r"input 1 \(state tensor 0\) has shape \(1, 32, 16\)"),
        (lambda m: [torch.tensor([[5], [6]]), *tree_flatten(m.init_state(1))[0]], r"input_ids has shape \(2, 1\); this decoder program takes \(1, T\) with 1 <= T <= 64"),
        (lambda m: [[[5]], *tree_flatten(m.init_state(1))[0]], r"input 0 \(input_ids\) is a list"),
        (lambda m: [torch.tensor([[300]]), *tree_flatten(m.init_state(1))[0]], r"token ids must lie in \[0, vocab_size=256\), got ids from 300"),
    ],
    ids=["float tokens", "double state", "state of another preset", "state of a wider model", "two rows", "not a tensor", "id too large"],
)
def test_run_pte_names_a_wrong_input(make_inputs, message, pte_step):
    et, model, path = pte_step
    inputs = make_inputs(model)
    with pytest.raises(SeqmixError, match=message):
        et.run_pte(path, *inputs, vocab_size=model.vocab_size)
    with pytest.raises(SeqmixError, match=message):
        et.pte_runner(path, vocab_size=model.vocab_size)(*inputs)


def test_run_pte_names_a_file_that_is_no_program_and_a_failure_inside_the_runtime(pte_step, tmp_path):
    """Both were the runtime's RuntimeError ('Failed to load program, error: 0x23'; 'method->execute()
    failed with error 0x12' for an id past the vocabulary with no vocab_size to check it)."""
    et, model, path = pte_step
    for name, content in (("manifest.pte", b'{"format": "executorch"}'), ("zeros.pte", bytes(4096)),
                          ("cut.pte", path.read_bytes()[:1000])):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SeqmixError, match=rf"run_pte: .*{name} is not an ExecuTorch program this runtime can load"):
            et.run_pte(tmp_path / name, torch.tensor([[5]]))
    state = tree_flatten(model.init_state(1))[0]
    with pytest.raises(SeqmixError, match=r"run_pte: the program failed .*were the token ids within the vocabulary"):
        et.run_pte(path, torch.tensor([[10**6]]), *state)


def test_run_pte_checks_a_program_in_an_export_against_its_manifest(pte_step, tmp_path):
    """A .pte inside a format=executorch export was run as it was, where run_onnx.py and the JS client
    check the graph's sha256 first: a program changed after export ran unverified."""
    import shutil

    from seqmix.export.manifest import write_manifest

    et, model, path = pte_step
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(path, export / "step.pte")
    write_manifest(export, {"format": "executorch", "vocab_size": model.vocab_size})
    state = tree_flatten(model.init_state(1))[0]
    expected = et.run_pte(path, torch.tensor([[5]]), *state)[0]
    assert torch.equal(et.run_pte(export / "step.pte", torch.tensor([[5]]), *state)[0], expected)
    shutil.copy(export / "step.pte", export / "extra.pte")
    with pytest.raises(SeqmixError, match=r"extra.pte \(an ExecuTorch program\) is not among the files the manifest verifies"):
        et.run_pte(export / "extra.pte", torch.tensor([[5]]), *state)
    program = bytearray((export / "step.pte").read_bytes())
    program[-1] ^= 1
    (export / "step.pte").write_bytes(bytes(program))
    for load in (lambda: et.run_pte(export / "step.pte", torch.tensor([[5]]), *state), lambda: et.pte_runner(export / "step.pte")):
        with pytest.raises(SeqmixError, match=r"step.pte \(an ExecuTorch program\) does not match the sha256 the manifest records"):
            load()
    # Another tool's manifest.json beside a program says nothing about it.
    (export / "manifest.json").write_text('{"name": "my app", "files": []}')
    assert torch.equal(et.run_pte(export / "extra.pte", torch.tensor([[5]]), *state)[0], expected)


# Values of every wrong kind for a model's arguments: plain Python values and tensors of the wrong
# rank, dtype or range.
WRONG_ARGUMENTS = [None, "x", "", [1], {"a": 1}, {"a"}, (1,), b"x", -1, 0, 1.5, float("nan"), True, 2**64, torch.tensor(1.0),
                   torch.ones(2, 3), torch.ones(2, 5, dtype=torch.int64) * 999, torch.ones(2, 5, 16)]


@pytest.mark.parametrize("preset", ["mega", "megalodon", "transformer", "mega_encoder"])
def test_every_argument_of_a_models_calls_is_refused_by_name_whatever_its_kind(preset):
    """forward (tokens, padding mask, output index), init_state, step and generate, each given every
    value of WRONG_ARGUMENTS, work (None where it means the default, say) or raise SeqmixError;
    anything else is listed. A sweep found output_index
    (torch's index_select errors), generate's generator (multinomial's TypeError) and init_state of
    a model with a TimestepNorm (zeros' TypeError) this way."""
    from seqmix.model.generation import generate

    model = tiny_preset(preset).eval()
    tokens = torch.ones(2, 5, dtype=torch.int64)
    calls = {"forward(tokens)": lambda v: model(v), "forward(padding_mask)": lambda v: model(tokens, v),
             "forward(output_index)": lambda v: model(tokens, None, v)}
    if model.causal:
        calls.update({
            "init_state(batch_size)": lambda v: model.init_state(v), "init_state(dtype)": lambda v: model.init_state(2, dtype=v),
            "step(state)": lambda v: model.step(tokens, v), "step(tokens)": lambda v: model.step(v, model.init_state(2)),
            "generate(max_new_tokens)": lambda v: generate(model, tokens, v), "generate(prompt)": lambda v: generate(model, v, 2),
            "generate(temperature)": lambda v: generate(model, tokens, 2, temperature=v),
            "generate(top_k)": lambda v: generate(model, tokens, 2, top_k=v),
            "generate(generator)": lambda v: generate(model, tokens, 2, generator=v),
            "generate(model)": lambda v: generate(v, tokens, 2),
        })
    crashes = []
    for name, call in calls.items():
        for value in WRONG_ARGUMENTS:
            try:
                call(value)
            except SeqmixError:
                pass
            except Exception as error:  # noqa: BLE001  (collected, so that one run lists them all)
                crashes.append(f"{name}={value!r}: {type(error).__name__}: {error}")
    assert not crashes, "\n".join(crashes)


@pytest.mark.parametrize("temperature", [1e-45, 1e-320, 5e-324])
def test_a_tiny_temperature_samples_the_argmax_as_zero_does(temperature):
    """Logits over 1e-45 overflowed to inf, and inf - inf to NaN: torch.multinomial's "probability
    tensor contains either inf, nan or element < 0", and NumPy's in the exported runner."""
    from seqmix.export.run_onnx import sample
    from seqmix.model.generation import generate

    model = tiny_preset("mega").eval()
    prompt = torch.randint(0, model.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    greedy = generate(model, prompt, 4, temperature=0)
    assert torch.equal(generate(model, prompt, 4, temperature=temperature, generator=torch.Generator().manual_seed(1)), greedy)
    assert torch.equal(generate(model, prompt, 4, temperature=temperature, top_k=3), greedy)
    logits = np.random.default_rng(0).normal(size=50).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy's "overflow encountered in divide" was printed
        assert sample(logits, temperature, None, np.random.default_rng(1)) == int(logits.argmax())
        assert sample(logits, temperature, 5, np.random.default_rng(1)) == int(logits.argmax())


def test_generating_from_a_model_with_nan_weights_names_the_cause():
    """torch.multinomial's "probability tensor contains either inf, nan or element < 0" reached the user."""
    from seqmix.model.generation import generate

    model = tiny_preset("mega").eval()
    with torch.no_grad():
        model.embed.weight.fill_(float("nan"))
    for temperature in (0, 1.0):
        with pytest.raises(SeqmixError, match="generate: the model's logits for new token 0 are not all finite"):
            generate(model, torch.ones(1, 3, dtype=torch.int64), 2, temperature=temperature)


def test_sampling_in_the_middle_of_training_leaves_the_model_in_training_mode():
    """generate and stream_tokens switched the model to eval mode and left it there: training went on
    with dropout off and activation recomputation silently skipped."""
    from seqmix.model.generation import generate, stream_tokens

    model = tiny_preset("mega").train()
    generate(model, torch.ones(2, 3, dtype=torch.int64), 4)
    assert model.training and all(module.training for module in model.modules())
    stream = stream_tokens(model, torch.ones(1, 3, dtype=torch.int64), 5)
    next(stream)
    assert not model.training  # sampled in eval mode
    stream.close()
    assert model.training
    model.eval()
    generate(model, torch.ones(1, 3, dtype=torch.int64), 2)
    assert not model.training


def test_a_long_prompt_goes_through_the_model_in_pieces_with_the_same_tokens(monkeypatch):
    """The whole prompt went through one step: the attention's scores were (T, T + cache) at once, and a
    100,000-byte prompt to seqmix generate was killed by the kernel at 16 GB."""
    from seqmix.model import generation

    model = tiny_preset("mega").eval()
    prompt = torch.randint(0, model.vocab_size, (1, 2 * generation.PROMPT_PIECE + 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole, _ = model.step(prompt, model.init_state(1))
    calls = []
    step = model.step
    monkeypatch.setattr(model, "step", lambda tokens, state: calls.append(tokens.shape[1]) or step(tokens, state))
    tokens = generation.generate(model, prompt, 1, temperature=0)
    assert max(calls) <= generation.PROMPT_PIECE and sum(calls) == prompt.shape[1]
    assert int(tokens[0, -1]) == int(whole[0, -1].argmax())


def test_printed_json_holds_null_where_a_score_is_not_finite():
    """evaluate printed {"loss": NaN}, which jq and every strict parser refuse."""
    import json

    from seqmix.jsontext import strict_json

    text = strict_json({"loss": float("nan"), "runs": [1.0, float("inf")], "inner": {"x": -float("inf")}, "n": 2})
    assert json.loads(text, parse_constant=lambda word: pytest.fail(f"{word} in {text}")) == {
        "loss": None, "runs": [1.0, None], "inner": {"x": None}, "n": 2}


def test_the_onnx_runner_tells_a_graph_that_does_not_fit_its_manifest_in_one_line(exported_presets, tmp_path, capsys):
    """A damaged graph listed with its own hash (InvalidProtobuf), and a sequence longer than the
    export takes (ONNX Runtime's Gather error), were tracebacks with exit status 1."""
    import hashlib
    import json
    import shutil

    runner = onnx_runner()
    _, result = exported_presets("gpt2")
    directory = tmp_path / "export"
    shutil.copytree(result.parallel.parent, directory)
    status = runner.main([str(directory), "classify", "--ids", ",".join(["1"] * 1100)])
    assert status == 2 and "--ids holds 1100 tokens; this export takes at most 1024 in one sequence" in capsys.readouterr().err
    (directory / "step.onnx").write_bytes(b"not a graph" * 100)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"]["step.onnx"] = {"sha256": hashlib.sha256(b"not a graph" * 100).hexdigest(), "bytes": 1100}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    status = runner.main([str(directory), "generate", "--prompt", "def ", "--tokens", "2"])
    err = capsys.readouterr().err
    assert status == 2 and "does not run as its manifest describes (InvalidProtobuf: " in err and "Traceback" not in err


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(vocab_size=m["vocab_size"] + 7), r"step.onnx predicts \d+ tokens, but the manifest's vocab_size is \d+"),
    (lambda m: m["step"]["inputs"][0].update(name="tokens"), r"step.onnx takes the inputs .*, but the manifest lists"),
], ids=["vocab_size", "input name"])
def test_the_onnx_runner_names_a_manifest_that_does_not_match_its_graph(edit, message, exported_presets, tmp_path):
    """An IndexError from the sampler, or ONNX Runtime's "Required inputs are missing", at the first call."""
    import json
    import shutil

    runner = onnx_runner()
    _, result = exported_presets("gpt2")
    directory = tmp_path / "export"
    shutil.copytree(result.parallel.parent, directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    edit(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(runner.ExportError, match=message):
        runner.generate(directory, runner.load(directory), "def ", tokens=2, temperature=0, top_k=None, seed=0)
