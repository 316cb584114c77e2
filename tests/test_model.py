"""Models composed from presets: streaming, save/load, build-time validation, size, the describe tool."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_flatten

import seqmix
from seqmix import SeqmixError
from seqmix.configs import config_groups
from conftest import causal_presets, preset_model
from seqmix.model.checkpoint import write_checksums
from seqmix.training.checkpoints import load_run

from conftest import SEQMIX

ROOT = Path(__file__).resolve().parent.parent
PRESETS = config_groups()["model"]


def build(*overrides: str):
    return preset_model(*overrides)


def test_required_presets_exist():
    assert {"mega", "megalodon", "tcnca", "transformer", "gpt2"} <= set(PRESETS)
    hybrids = [name for name in PRESETS if name not in {"mega", "megalodon", "tcnca", "transformer", "gpt2", "mega_encoder"}]
    assert len(hybrids) >= 2


@pytest.mark.parametrize("preset", causal_presets())
def test_streaming_in_random_pieces_equals_forward(preset):
    model = build(f"model={preset}").double().eval()
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.vocab_size, (2, 150), generator=generator)  # crosses a 128-chunk boundary
    with torch.no_grad():
        logits = model(tokens)
        state, pieces, start = model.init_state(2), [], 0
        for size in (1, 7, 1, 40, 64, 37):
            out, state = model.step(tokens[:, start : start + size], state)
            pieces.append(out)
            start += size
    assert start == tokens.shape[1]
    torch.testing.assert_close(torch.cat(pieces, dim=1), logits, rtol=1e-9, atol=1e-9)
    assert int(state.pos[0]) == 150


@pytest.mark.parametrize("preset", PRESETS)
def test_save_then_load_gives_identical_outputs(preset, tmp_path):
    model = build(f"model={preset}").eval()
    tokens = torch.randint(0, model.vocab_size, (2, 33))
    seqmix.save_model(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checksums.json", "config.yaml", "model.safetensors"]
    loaded = seqmix.load_model(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)
    assert loaded.head_is_tied == model.head_is_tied


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_loads_in_the_dtype_it_was_saved_in_with_its_weights_still_tied(dtype, tmp_path):
    """A float64 save came back as float32, rounded without a word (max error 1e-8)."""
    model = build("model=mega").to(dtype).eval()
    assert model.head_is_tied
    tokens = torch.randint(0, model.vocab_size, (2, 33))
    seqmix.save_model(model, tmp_path)
    loaded = seqmix.load_model(tmp_path).eval()
    assert {p.dtype for p in loaded.parameters()} == {dtype} and loaded.head_is_tied
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("change, message", [
    (lambda m: setattr(m.blocks[0].mixer, "chunk_size", 8), r"blocks.0.mixer.chunk_size is 8, but the model's config builds it with 128"),
    (lambda m: setattr(m.blocks[0].mixer, "attention", "laplace"), r"blocks.0.mixer.attention is 'laplace', but .* 'softmax'"),
    (lambda m: setattr(m.blocks[1].mixer, "causal", False), r"blocks.1.mixer.causal is False, but .* True"),
    (lambda m: setattr(m.blocks[0], "mixer", seqmix.build_mixer("ema", m.d_model)), r"blocks.0.mixer is an EMA, where the model's config builds a GatedAttention"),
])
def test_a_setting_changed_after_the_build_is_refused_by_every_save_before_writing(change, message, tmp_path):
    """save_model wrote the config of the model as built beside a model changed since: the loaded
    model's outputs differed (logits 3-4% off for chunk_size, attention or causal)."""
    model = build("model=mega", "model.depth=2")
    model.blocks[0].mixer.impl = type(model.blocks[0].mixer).impls[0]  # a compute path is no setting: it computes the same
    model.blocks[0].recompute = "mixer"
    seqmix.save_model(model, tmp_path / "as_built")
    change(model)
    for save in (seqmix.save_model, seqmix.save_pretrained):
        with pytest.raises(SeqmixError, match=message):
            save(model, tmp_path / "changed")
        assert not (tmp_path / "changed").exists()


def test_load_refuses_targets_outside_the_project(tmp_path):
    model = build("model=ema_conv")
    seqmix.save_model(model, tmp_path)
    config = (tmp_path / "config.yaml").read_text()
    marker = tmp_path / "pwned"
    (tmp_path / "config.yaml").write_text(config.replace("ffn:\n", "ffn:\n  _target_: os.system\n  command: touch " + str(marker) + "\n", 1))
    # Whoever edits the config can rewrite the checksums too: the description itself must refuse.
    write_checksums(tmp_path)
    with pytest.raises(SeqmixError, match="os.system.*not a part seqmix builds"):
        seqmix.load_model(tmp_path)
    assert not marker.exists()


def test_load_refuses_yaml_anchors_before_expanding_them(tmp_path):
    model = build("model=ema_conv")
    seqmix.save_model(model, tmp_path)
    config = (tmp_path / "config.yaml").read_text()
    # "Billion laughs": each line repeats the one before nine times; 40 lines of anchors would expand
    # to 9**40 items. A hostile author rewrites the checksums too.
    bomb = ["laughs0: &laughs0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    bomb += [f"laughs{i}: &laughs{i} [{', '.join([f'*laughs{i - 1}'] * 9)}]" for i in range(1, 40)]
    (tmp_path / "config.yaml").write_text(config + "\n".join(bomb) + "\n")
    write_checksums(tmp_path)
    started = time.perf_counter()
    with pytest.raises(SeqmixError, match=r"config.yaml uses a YAML anchor or alias \(line \d+\)"):
        seqmix.load_model(tmp_path)
    assert time.perf_counter() - started < 10
    # One harmless alias is refused as well: seqmix never writes one.
    (tmp_path / "config.yaml").write_text(config.replace("ffn:", "extra: &width 8\nffn:", 1))
    write_checksums(tmp_path)
    with pytest.raises(SeqmixError, match="YAML anchor or alias"):
        seqmix.load_model(tmp_path)


def test_the_latest_pointer_of_a_run_names_a_checkpoint_inside_it(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "step-00000003"
    seqmix.save_model(build("model=ema_conv"), outside)
    (run / "checkpoints").mkdir(parents=True)
    for name in ("../../step-00000003", str(outside), "./../../step-00000003"):
        (run / "checkpoints" / "latest").write_text(json.dumps({"checkpoint": name}))
        with pytest.raises(SeqmixError, match="not a checkpoint directory in .*paths and symbolic links are refused"):
            seqmix.load_model(run)


def test_loaders_refuse_the_meta_device_by_name(tmp_path):
    seqmix.save_model(build("model=ema_conv"), tmp_path)
    # It read as if the file were broken: "model.safetensors is not a readable safetensors file".
    for loader, name in ((seqmix.load_model, "load_model"), (seqmix.from_pretrained, "from_pretrained")):
        with pytest.raises(SeqmixError, match=f"{name}: device='meta' holds no values"):
            loader(tmp_path, device="meta")


def test_loaders_and_init_state_name_a_device_this_machine_lacks_and_take_a_torch_device(tmp_path):
    model = build("model=ema_conv")
    seqmix.save_model(model, tmp_path)
    # The loaders failed as if the weights file were unreadable ("pin_memory=True requires a CUDA ...").
    for device, message in [("cuda:99", r"load_model: device='cuda:99' but (no CUDA device is available|this machine has \d+ CUDA)"),
                            ("tpu", "load_model: device='tpu' is not a device torch knows")]:
        with pytest.raises(SeqmixError, match=message):
            seqmix.load_model(tmp_path, device=device)
    with pytest.raises(SeqmixError, match="from_pretrained: device='tpu' is not a device torch knows"):
        seqmix.from_pretrained(tmp_path, device="tpu")
    loaded = seqmix.load_model(tmp_path, device=torch.device("cpu"))
    assert next(loaded.parameters()).device == torch.device("cpu")
    # init_state too: "cuda" failed with torch's AssertionError "Torch not compiled with CUDA enabled".
    with pytest.raises(SeqmixError, match=r"model: device='cuda:99' but"):
        loaded.init_state(1, device="cuda:99")
    with pytest.raises(SeqmixError, match=r"EMA: device='tpu' is not a device torch knows"):
        seqmix.build_mixer("ema", 8).init_state(1, device="tpu")


def test_load_names_a_missing_file(tmp_path):
    with pytest.raises(SeqmixError, match="config.yaml does not exist"):
        seqmix.load_model(tmp_path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=mega_encoder", "head@model.head=causal_lm"], r"layer 0 \(GatedAttention\) is bidirectional"),
        (["model=mega", "model.mixers.mega.heads=3"], "z_dim=64 must be a positive multiple of heads=3"),
        (["model=transformer", "model.mixers.attention.heads=5"], "heads=5 must be a positive integer that divides d_model=128"),
        (["model=mega", "model.layers=[mamba]"], "layer 0 names mixer 'mamba'.*registered"),
        (["model=hybrid_tcn_attention", "model.depth=4"], "depth=4 is not a multiple of the 3 layers"),
        (["model=mega", "block@model.block=pre"], "already adds its own residual"),
        (["model=ema_conv", "block@model.block=gated"], "needs a mixer that adds its own residual"),
        (["model=mega", "head@model.head=classification"], "tie_embeddings=True needs a language-model head"),
        (["model=gpt2", "block@model.block=auto", "+mixer@model.mixers.wide=gated_attention", "model.mixers.wide.chunk_size=2048", "model.layers=[wide]"],
         r"layer 0 \(GatedAttention\) runs in chunks of 2048 tokens, more than max_len=1024 of the learned positions"),
        (["model=mega", "model.mixers.mega.attention=sigmoid"], "attention='sigmoid' is not valid"),
        (["model=mega", "model.d_model=0"], "d_model=0"),
    ],
)
def test_invalid_compositions_fail_at_build_time_naming_the_field(overrides, message):
    with pytest.raises(SeqmixError, match=message):
        build(*overrides)


def test_bad_tokens_and_lengths_are_refused():
    model = build("model=gpt2")
    with pytest.raises(SeqmixError, match=r"\(B, L\) tensor of torch.int64 or torch.int32 ids"):
        model(torch.randn(2, 8))
    # uint8 is an integer type too: the message names the ones taken ("integer tensor" did not).
    with pytest.raises(SeqmixError, match=r"torch.int64 or torch.int32 ids .*, got \(2, 8\) torch.uint8"):
        model(torch.zeros(2, 8, dtype=torch.uint8))
    with pytest.raises(SeqmixError, match="1025 tokens exceed max_len=1024"):
        model(torch.zeros(1, 1025, dtype=torch.long))
    classifier = build("model=mega_encoder", "head@model.head=classification", "model.tie_embeddings=false")
    assert classifier(torch.zeros(3, 10, dtype=torch.long)).shape == (3, 10)
    with pytest.raises(SeqmixError, match="cannot stream"):
        classifier.init_state(1)


@pytest.mark.parametrize("preset", ["mega", "megalodon", "tcnca", "transformer", "gpt2"])
def test_presets_are_about_a_million_parameters_and_train_at_length_1024(preset):
    model = build(f"model={preset}")
    parameters = sum(p.numel() for p in model.parameters())
    assert 0.7e6 <= parameters <= 1.5e6, parameters
    tokens = torch.randint(0, model.vocab_size, (1, 1025))
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, model.vocab_size), tokens[:, 1:].reshape(-1))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_block_states_are_fixed_shape_for_every_preset():
    for preset in causal_presets():
        model = build(f"model={preset}")
        state = model.init_state(2)
        shapes = [t.shape for t in tree_flatten(state)[0]]
        with torch.no_grad():
            _, state = model.step(torch.zeros(2, 5, dtype=torch.long), state)
        assert [t.shape for t in tree_flatten(state)[0]] == shapes, preset


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["model=megalodon"], ["4 layers", "gated_attention (local cema)", "two_hop", "total parameters: 1,154,560"]),
        (["model=hybrid_tcn_attention", "model.layers=[tcn,tcn,softmax_attention]", "model.depth=3", "model.d_model=64"],
         ["3 layers", "tcn", "softmax_attention", "256", "O(L²·D)"]),
    ],
)
def test_describe_prints_the_architecture(arguments, expected):
    result = subprocess.run([*SEQMIX, "describe", *arguments], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for text in expected:
        assert text in result.stdout


def test_describe_shows_the_model_a_task_given_to_it_trains(tmp_path, capsys):
    """describe accepted task= and showed the preset's vocabulary and head: 256 tokens where task=mqar
    trains 8,192, a causal head where masked_segment trains a masked one over 257."""
    from seqmix.cli import main

    for arguments, shown in ((["model=mega", "model.depth=1", "task=mqar"], "mega for task=mqar: 1 layers, d_model=128, vocab_size=8192"),
                             (["model=mega_encoder", "model.depth=1", "task=masked_segment"],
                              "vocab_size=257, positions=none, head=MaskedLMHead, bidirectional"),
                             (["model=mega", "model.depth=1", "task=mqar", "task.vocab_size=300"], "vocab_size=300")):
        assert main(["describe", *arguments]) == 0
        assert shown in capsys.readouterr().out
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text " * 100)
    assert main(["describe", "model=mega", "model.depth=1", "task=text", f"task.path={corpus}", f"task.cache_dir={tmp_path / 'cache'}"]) == 0
    captured = capsys.readouterr()
    assert "vocab_size=256" in captured.out and "task=text takes its vocabulary and classes from its data" in captured.err
    assert not (tmp_path / "cache").exists()  # the corpus was not tokenized


def test_describe_lists_presets_for_an_unknown_one():
    result = subprocess.run([*SEQMIX, "describe", "model=nope"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "megalodon" in result.stderr and "nope" in result.stderr


@pytest.mark.parametrize("value", [None, "", "  ", 5, ["run"]], ids=["None", "empty", "blank", "an int", "a list"])
@pytest.mark.parametrize("loader, field", [(seqmix.load_model, "load_model: directory"), (seqmix.from_pretrained, "from_pretrained: name"),
                                           (load_run, "checkpoint")], ids=["load_model", "from_pretrained", "load_run"])
def test_every_loader_names_a_location_that_is_not_a_path(loader, field, value):
    """load_run(None) was os.fspath's TypeError, and load_run('') read config.json in the current folder."""
    with pytest.raises(SeqmixError, match=re.escape(f"{field}={value!r} is not valid; expected a non-empty path")):
        loader(value)


def test_weights_that_are_not_finite_are_refused_on_load(tmp_path):
    """A checksummed model.safetensors of NaN weights loaded, and gave NaN logits for every input."""
    from safetensors.torch import load_file, save_file

    seqmix.save_model(build("model=ema_conv"), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["embed.weight"][3, 1] = float("nan")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    write_checksums(tmp_path)
    with pytest.raises(SeqmixError, match="model.safetensors: tensor 'embed.weight' holds NaN or infinite values"):
        seqmix.load_model(tmp_path)


@pytest.mark.parametrize("edit", [("max_len: 64", "max_len: 99999999999999999999999999999"), ("positions: none", "positions: bogus")])
def test_a_config_that_reads_but_builds_no_model_is_named_by_its_file(edit, tmp_path):
    """Some refusals of a changed config.yaml (its checksums rewritten) named no file: 'model: max_len=... is not valid'."""
    seqmix.save_model(seqmix.instantiate_model({"vocab_size": 16, "d_model": 16, "layers": ["ema"], "max_len": 64}), tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(config.read_text().replace(*edit))
    write_checksums(tmp_path)
    with pytest.raises(SeqmixError, match=rf"^{re.escape(str(config))}: "):
        seqmix.load_model(tmp_path)


class _FillsSeen(torch.overrides.TorchFunctionMode):
    """Records the random fills and torch.nn.init calls that reach it (it sits below seqmix's own mode)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name.endswith("_") and (name in ("normal_", "uniform_") or getattr(func, "__module__", None) == "torch.nn.init"):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("preset", ["mega", "megalodon", "gpt2"])
def test_a_model_built_on_meta_runs_no_initialisation_and_has_the_cpu_models_parameters(preset):
    """Each random fill of a meta tensor ran torch's Python decomposition (0.3 ms): describe model.depth=100000
    spent minutes initialising weights that hold no values."""
    config = seqmix.configs.compose_config([f"model={preset}", "model.d_model=32", "model.depth=2"]).model
    with _FillsSeen() as fills:
        on_meta = seqmix.instantiate_model(config, device="meta")
    assert fills.seen == []
    with _FillsSeen() as fills:
        on_cpu = seqmix.instantiate_model(config, device="cpu")
    assert fills.seen  # the same spy sees the CPU model's initialisation
    meta_parameters = {name: (p.shape, p.dtype) for name, p in on_meta.named_parameters()}
    assert meta_parameters == {name: (p.shape, p.dtype) for name, p in on_cpu.named_parameters()}
    assert all(p.is_meta for p in on_meta.parameters())
