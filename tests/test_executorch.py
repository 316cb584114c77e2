"""ExecuTorch (XNNPACK) export of every model preset, run through ``executorch.runtime`` and checked against eager.

Every preset is built tiny (d_model=32, its layer pattern once: one layer, three for
hybrid_tcn_attention). Lowering costs 5-25 s of CPU per graph, so by default:
- decoder programs (T dynamic up to the model's smallest chunk, state fed back over calls of
  several T): one preset per kind of recurrent state, megalodon (chunked complex EMA, timestep
  norm, normalized gated attention) at B = 3 and tcnca (convolution windows) at B = 1. The
  key/value cache is lowered by default through gpt2's decoder program (``seqmix export`` in
  tests/test_onnx_export.py) and transformer's int8 one (tests/test_executorch_int8.py).
  ema_conv, gpt2, hybrid_tcn_attention, mega and transformer combine those same layers and states
  (mega's real EMA runs the chunked code megalodon's complex one does); their decoder programs
  here run with --runslow;
- parallel graphs (B=2, L=128): mega_encoder (bidirectional EMA carried across chunks, gated
  attention, masked-LM head: the only graph it has; tests/test_onnx_export.py also writes gpt2's
  through ``seqmix export``). The other presets' parallel graphs (ema_conv, gpt2,
  hybrid_tcn_attention, mega, megalodon, tcnca, transformer; megalodon's alone takes 20-35 s) run
  with --runslow; their layers are lowered in their decoder programs.
Logits must match eager within ATOL.
"""
from __future__ import annotations

import sys
from functools import cache

import pytest
import torch
from torch.utils._pytree import tree_flatten

pytest.importorskip("executorch.runtime", reason="executorch is not installed: pip install executorch==1.5.1")

import seqmix  # noqa: E402
from seqmix.operators import recurrence  # noqa: E402
from seqmix.export import executorch_export as et  # noqa: E402
from seqmix.contract import length_unit  # noqa: E402
from seqmix import SeqmixError  # noqa: E402
from seqmix.configs import config_groups  # noqa: E402
from conftest import causal_presets, tiny_preset  # noqa: E402

ATOL = 1e-4
LENGTH = 128  # a multiple of every preset's chunk sizes (64, 128), and within gpt2's max_len
PARALLEL_BY_DEFAULT = {"mega_encoder"}
PRESETS = config_groups()["model"]


@cache
def tiny(preset: str):
    """The preset at D = 32 with its layer pattern once, in eval mode (``conftest.tiny_preset``)."""
    return tiny_preset(preset).eval()


def parallel_case(preset: str):
    default = preset in PARALLEL_BY_DEFAULT or preset not in causal_presets()
    return pytest.param(preset, marks=() if default else pytest.mark.slow)


@pytest.mark.parametrize("preset", [parallel_case(p) for p in PRESETS])
def test_parallel_graph_matches_eager(preset, tmp_path):
    model = tiny(preset)
    assert LENGTH % length_unit(model) == 0
    path = tmp_path / f"{preset}.pte"
    manifest = et.export_parallel_pte(model, path, LENGTH, batch_size=2)
    error = et.verify_pte_parallel(model, path, LENGTH, batch_size=2)
    print(f"{preset} parallel: max error {error:.2e}, delegated {manifest['delegated_nodes']}/{manifest['total_nodes']}")
    assert error < ATOL
    assert manifest["inputs"] == [{"name": "tokens", "shape": [2, LENGTH], "dtype": "int64"}]
    assert manifest["outputs"] == [{"name": "logits", "shape": [2, LENGTH, model.vocab_size], "dtype": "float32"}]
    assert 0 < manifest["delegated_nodes"] < manifest["total_nodes"]
    with pytest.raises(SeqmixError, match="inputs of shapes"):
        et.run_pte(path, torch.zeros(1, LENGTH, dtype=torch.long))


DECODER_BY_DEFAULT = {"megalodon", "tcnca"}


def decoder_case(preset: str):
    """B = 1 (a device's stream) for most presets; B = 3 for the chunked presets and one cache-only preset."""
    marks = () if preset in DECODER_BY_DEFAULT else pytest.mark.slow
    return pytest.param(preset, 3 if preset in ("mega", "megalodon", "transformer") else 1, id=preset, marks=marks)


@pytest.mark.parametrize("preset, batch", [decoder_case(p) for p in causal_presets()])
def test_decoder_program_prefills_and_decodes_like_eager(preset, batch, tmp_path):
    """One program for every T up to its limit: a stream of calls of 1, N, N/2 + 1, 1, 3 and 1
    tokens (the trace used 2) matches eager ``step``, logits and final state."""
    model = tiny(preset)
    path = tmp_path / f"{preset}_step.pte"
    manifest = et.export_step_pte(model, path, batch_size=batch)
    error = et.verify_pte_step(model, path)
    limit = et.decoder_token_limit(model)
    print(f"{preset} decoder: T=1..{limit}, max error {error:.2e}, delegated {manifest['delegated_nodes']}/{manifest['total_nodes']}")
    assert error < ATOL
    assert limit > 3 and manifest["tokens_per_call"] == f"1..{limit}" and manifest["max_tokens"] == limit
    state = manifest["state"]
    assert all(s["name"].startswith(("past_key_values.", "past_state.")) for s in state)
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", *(s["name"] for s in state)]
    assert [o["name"] for o in manifest["outputs"]] == ["logits", *(s["output"] for s in state)]
    assert [o["shape"] for o in manifest["outputs"]] == [[batch, "tokens", model.vocab_size], *(s["shape"] for s in state)]
    assert manifest["delegated_nodes"] > 0
    # Every EMA/CEMA runs its chunked path, each call being one chunk; none was left switched.
    assert "recurrent" not in manifest["impls"].values()
    # A client starts from the manifest's fill (an attention cache's empty slots are −1, not 0): it
    # builds the model's own initial state, from which the program was verified above.
    state_inputs = [torch.full(s["shape"], s["fill"], dtype=getattr(torch, s["dtype"])) for s in state]
    initial = tree_flatten(model.init_state(batch))[0]
    assert all(torch.equal(built, own) for built, own in zip(state_inputs, initial, strict=True))
    with pytest.raises(SeqmixError, match=rf"1 <= T <= {limit}: feed a longer prompt in calls of at most {limit} tokens"):
        et.run_pte(path, torch.zeros(batch, limit + 1, dtype=torch.long), *state_inputs)


def test_step_export_refuses_a_bidirectional_model(tmp_path):
    with pytest.raises(SeqmixError, match="bidirectional.*export_parallel_pte"):
        et.export_step_pte(tiny("mega_encoder"), tmp_path / "step.pte")


def test_a_graph_that_cannot_be_traced_names_the_layers_and_the_line(monkeypatch, tmp_path):
    # Un-skipping the token checks makes them read a tensor value while tracing.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: False)
    with pytest.raises(SeqmixError, match=r"decoder program .*layers \['attention'\].*seqmix/model/sequence_model\.py:\d+ in _check_tokens"):
        et.export_step_pte(tiny("gpt2"), tmp_path / "step.pte")


def test_the_chunked_recurrence_exports_as_a_loop_not_a_scan():
    """torch.export alone gives the chunked EMA a scan, which ExecuTorch would run outside XNNPACK."""
    ema = seqmix.build_mixer("ema", 8, chunk_size=4).eval()
    x = torch.randn(1, 12, 8)

    def scans(program) -> int:
        return sum(n.target is torch.ops.higher_order.scan for n in program.graph.nodes)

    assert scans(torch.export.export(ema, (x,))) == 1
    with recurrence.unrolled_chunks():
        assert scans(torch.export.export(ema, (x,))) == 0
    assert scans(torch.export.export(ema, (x,))) == 1, "the switch must reset on exit"


def test_missing_executorch_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "executorch.exir", None)
    with pytest.raises(SeqmixError, match=r"pip install executorch==1\.5\.1"):
        et.export_parallel_pte(tiny("transformer"), tmp_path / "model.pte", LENGTH)
