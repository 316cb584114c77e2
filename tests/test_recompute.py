"""Activation recomputation (``model.recompute`` / ``model.block.recompute``): the same numbers for less memory.

A block with ``recompute=mixer`` or ``block`` keeps only its input for the backward pass and runs
that part's forward again there (``torch.utils.checkpoint``, non-reentrant, RNG state preserved).
These tests prove that the loss and every gradient are those of ``recompute=none`` to 1e-10 in
float64 with dropout in the recomputed parts, that the recomputation really runs and keeps less,
that it is off outside training, and that it trains under torch.compile and DDP.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import seqmix
from seqmix import SeqmixError
from seqmix.configs import config_groups
from conftest import composed_config
from seqmix.layers.blocks import RECOMPUTE, Block, FeedForward

from conftest import examples

PRESETS = config_groups()["model"]
MODES = ("mixer", "block")
DROPOUT = 0.25


@functools.lru_cache(maxsize=None)
def tiny_config(preset: str, recompute: str, depth_scale: int = 1):
    """The composed model config of a tiny ``preset`` (D = 16, two layers; three for a three-layer pattern)."""
    depth = (3 if preset == "hybrid_tcn_attention" else 2) * depth_scale
    return composed_config([f"model={preset}", "model.d_model=16", f"model.depth={depth}", f"model.recompute={recompute}"]).model


def tiny_model(preset: str, recompute: str, depth_scale: int = 1, dtype=torch.float64):
    """A tiny ``preset`` with ``recompute``, seeded so that every mode starts from the same weights."""
    torch.manual_seed(0)
    return seqmix.instantiate_model(tiny_config(preset, recompute, depth_scale)).to(dtype)


def add_dropout(model) -> list[int]:
    """Dropout on the output of every block's mixer and FFN, inside the parts that recompute.

    seqmix's layers hold no dropout of their own, so forward hooks add it: a recomputation that
    drew a new mask would change the gradients. Returns a one-element list counting mixer calls.
    """
    calls = [0]

    def drop(module, inputs, output):
        return F.dropout(output, DROPOUT, training=True)

    def count(module, inputs):
        calls[0] += 1

    for block in model.blocks:
        block.mixer.register_forward_pre_hook(count)
        block.mixer.register_forward_hook(drop)
        if block.ffn is not None:
            block.ffn.register_forward_hook(drop)
    return calls


def loss_and_gradients(model, tokens, padding_mask, targets, seed: int):
    """The cross-entropy of ``model(tokens)`` against ``targets``, and the gradient of every parameter."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(tokens, padding_mask)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset", PRESETS)
@settings(max_examples=examples(2), deadline=None)
@given(length=st.integers(1, 40), batch=st.integers(1, 2), padded=st.integers(0, 8), seed=st.integers(0, 2**16))
def test_recompute_keeps_the_loss_and_every_gradient_with_dropout(preset, mode, length, batch, padded, seed):
    plain, recomputing = tiny_model(preset, "none"), tiny_model(preset, mode)
    plain_calls, recomputing_calls = add_dropout(plain), add_dropout(recomputing)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, plain.vocab_size, (batch, length), generator=generator)
    targets = torch.randint(0, plain.vocab_size, (batch, length), generator=generator)
    padding_mask = torch.zeros(batch, length, dtype=torch.bool)
    padding_mask[-1, length - min(padded, length - 1):] = True  # the last row right-padded, never wholly
    want_loss, want = loss_and_gradients(plain, tokens, padding_mask, targets, seed)
    got_loss, got = loss_and_gradients(recomputing, tokens, padding_mask, targets, seed)
    layers = len(plain.blocks)
    # Every mixer ran once more in the backward pass: the recomputation happened.
    assert (plain_calls[0], recomputing_calls[0]) == (layers, 2 * layers)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=1e-10)
    assert got.keys() == want.keys() == {name for name, p in plain.named_parameters() if p.requires_grad}
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-10, msg=lambda m: f"{name}: {m}")


def saved_bytes(run) -> int:
    """Bytes of the tensors autograd keeps for the backward of ``run()``, outside the recomputed
    parts (those keep their own, dropped until the backward recomputes them)."""
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return total[0]


def training_forward(model, tokens):
    """A call running one training-mode forward of ``model`` on ``tokens``."""
    return lambda: model.train()(tokens)


@pytest.mark.parametrize("preset", PRESETS)
def test_block_recompute_keeps_nothing_inside_the_blocks(preset):
    """With recompute=block, each block adds to what autograd keeps exactly its input (B, L, D) and
    nothing of its insides; with recompute=mixer it adds less than without (the FFN and norms keep theirs)."""
    tokens = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    kept = {
        mode: [saved_bytes(training_forward(tiny_model(preset, mode, scale, torch.float32), tokens)) for scale in (1, 2)]
        for mode in ("none", *MODES)
    }
    growth = {mode: deeper - shallow for mode, (shallow, deeper) in kept.items()}
    added_blocks = len(tiny_model(preset, "none", 2).blocks) - len(tiny_model(preset, "none").blocks)
    assert growth["block"] == added_blocks * tokens.numel() * 16 * 4  # one float32 (1, 64, 16) input each
    assert growth["block"] < growth["mixer"] < growth["none"]


def peak_training_bytes(model, tokens) -> int:
    """Peak bytes allocated by one forward and backward, measured as the claims benchmark does."""
    from seqmix.export.bench.measure import peak_memory_bytes

    model.train()

    def run():
        model(tokens).sum().backward()

    peak = peak_memory_bytes(run, torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    return peak


@pytest.mark.parametrize("preset", ["mega", "transformer"])
def test_recompute_lowers_the_training_peak(preset):
    tokens = torch.randint(0, 256, (1, 512), generator=torch.Generator().manual_seed(0))
    peak = {mode: peak_training_bytes(tiny_model(preset, mode, 2, torch.float32), tokens) for mode in ("none", *MODES)}
    assert peak["block"] < peak["mixer"] < peak["none"], peak


def test_recompute_is_off_outside_training_with_gradients():
    """Evaluation with gradients (e.g. saliency) and streaming keep what a model without recomputation keeps."""
    plain, recomputing = tiny_model("mega", "none"), tiny_model("mega", "block")
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    for run in (lambda model: model.eval()(tokens), lambda model: model.train().step(tokens, model.init_state(2))):
        kept = saved_bytes(lambda: run(plain))
        assert kept > 0
        assert saved_bytes(lambda: run(recomputing)) == kept
    calls = add_dropout(recomputing)
    recomputing.eval()(tokens).sum().backward()
    assert calls[0] == len(recomputing.blocks)


def test_the_model_key_sets_every_block_and_the_block_key_one_config():
    assert {block.recompute for block in tiny_model("megalodon", "block").blocks} == {"block"}
    torch.manual_seed(0)
    model = seqmix.instantiate_model(composed_config(["model=hybrid_tcn_attention", "model.d_model=16",
                                                     "model.block.recompute=mixer"]).model)
    assert {block.recompute for block in model.blocks} == {"mixer"}
    assert {block.recompute for block in tiny_model("hybrid_tcn_attention", "none").blocks} == {"none"}


@pytest.mark.parametrize("override, named", [
    ("model.recompute=full", "model.recompute='full'"),
    ("model.recompute=true", "model.recompute=True"),
    ("model.block.recompute=layer", "block.recompute='layer'"),
])
def test_a_bad_recompute_value_is_refused_naming_it_and_the_accepted_ones(override, named):
    with pytest.raises(SeqmixError) as refused:
        seqmix.instantiate_model(composed_config(["model=mega", "model.d_model=16", "model.depth=1", override]).model)
    assert named in str(refused.value)
    assert all(mode in str(refused.value) for mode in RECOMPUTE)


def test_a_block_refuses_a_bad_recompute_value():
    mixer = seqmix.build_mixer("ema", 8)
    with pytest.raises(SeqmixError, match=r"block.recompute='all'.*\['block', 'mixer', 'none'\]"):
        Block(8, mixer, FeedForward(8), recompute="all")


def test_a_compiled_model_with_recompute_trains_a_step_like_eager():
    """Dynamo traces the checkpoints and AOTAutograd recomputes them (aot_eager: the transformer compiles
    in seconds where the chunked presets take tens of seconds; the checkpoint is the same Block code)."""
    from seqmix.compile import compile_model

    eager = tiny_model("transformer", "block", dtype=torch.float32)
    compiled_model = tiny_model("transformer", "block", dtype=torch.float32)
    compiled = compile_model(compiled_model, backend="aot_eager")
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    results = []
    for model, runner in ((eager, eager), (compiled_model, compiled)):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        logits = runner(tokens)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        optimizer.step()
        results.append((loss.detach(), grads, [p.detach().clone() for p in model.parameters()]))
    (want_loss, want_grads, want_after), (got_loss, got_grads, got_after) = results
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for got, want in zip(got_after, want_after):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_ddp_with_recompute_gives_the_gradients_of_a_plain_model(tmp_path):
    """One gloo process: DDP's gradient hooks fire once per parameter although the blocks run twice."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    plain, recomputing = tiny_model("megalodon", "none"), tiny_model("megalodon", "block")
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    padding_mask = torch.zeros(2, 24, dtype=torch.bool)
    _, want = loss_and_gradients(plain, tokens, padding_mask, targets, seed=0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        _, got = loss_and_gradients(DistributedDataParallel(recomputing), tokens, padding_mask, targets, seed=0)
    finally:
        dist.destroy_process_group()
    assert {name.removeprefix("module.") for name in got} == set(want)
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name.removeprefix("module.")], rtol=0, atol=1e-10)
