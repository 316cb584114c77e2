"""ExecuTorch (XNNPACK) export of every model preset, run through ``executorch.runtime`` and checked against eager.

Every preset is built tiny (d_model=32, depth 2; 3 for hybrid_tcn_attention, whose pattern has three
layers). Lowering costs 5-25 s of CPU per graph, so by default:
- step graphs (B=1, one token per call, state fed back for 8 calls): every causal preset; the
  manifest must show every EMA/CEMA traced on its recurrent path (a chunk padded from 1 token to
  C would be far slower);
- parallel graphs (B=2, L=128): mega_encoder (bidirectional EMA carried across chunks, gated
  attention, masked-LM head: the only graph it has) and hybrid_tcn_attention (TCN with softmax
  attention). The other presets' parallel graphs (ema_conv, gpt2, mega, megalodon, tcnca,
  transformer; megalodon's alone takes 20-35 s) run with --runslow.
Logits must match eager within ATOL.
"""
from __future__ import annotations

import sys
from functools import cache

import pytest
import torch

pytest.importorskip("executorch.runtime", reason="executorch is not installed: pip install executorch==1.5.1")

import seqmix  # noqa: E402
from seqmix.operators import recurrence  # noqa: E402
from seqmix.export import executorch_export as et  # noqa: E402
from seqmix.contract import length_unit  # noqa: E402
from seqmix import SeqmixError  # noqa: E402
from seqmix.configs import compose_config, config_groups  # noqa: E402

ATOL = 1e-4
LENGTH = 128  # a multiple of every preset's chunk sizes (64, 128), and within gpt2's max_len
PARALLEL_BY_DEFAULT = {"mega_encoder", "hybrid_tcn_attention"}
PRESETS = config_groups()["model"]


@cache
def tiny(preset: str):
    depth = 3 if preset == "hybrid_tcn_attention" else 2
    torch.manual_seed(0)
    overrides = [f"model={preset}", "model.d_model=32", f"model.depth={depth}"]
    return seqmix.instantiate_model(compose_config(overrides).model).eval()


def parallel_case(preset: str):
    default = preset in PARALLEL_BY_DEFAULT or not tiny(preset).causal
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


@pytest.mark.parametrize("preset", [p for p in PRESETS if tiny(p).causal])
def test_step_graph_streams_like_eager(preset, tmp_path):
    model = tiny(preset)
    path = tmp_path / f"{preset}_step.pte"
    manifest = et.export_step_pte(model, path)
    error = et.verify_pte_step(model, path, steps=8)
    print(f"{preset} step: max error {error:.2e}, delegated {manifest['delegated_nodes']}/{manifest['total_nodes']}")
    assert error < ATOL
    state = manifest["state"]
    assert [i["name"] for i in manifest["inputs"]] == ["tokens", *(s["name"] for s in state)]
    assert [o["shape"] for o in manifest["outputs"]] == [[1, 1, model.vocab_size], *(s["shape"] for s in state)]
    assert manifest["delegated_nodes"] > 0
    # One token per call: every EMA/CEMA was traced on its recurrent path, then switched back.
    assert "chunked" not in manifest["impls"].values()
    assert "recurrent" not in {getattr(m, "impl", None) for m in model.modules()}


def test_step_export_refuses_a_bidirectional_model(tmp_path):
    with pytest.raises(SeqmixError, match="bidirectional.*export_parallel_pte"):
        et.export_step_pte(tiny("mega_encoder"), tmp_path / "step.pte")


def test_a_graph_that_cannot_be_traced_names_the_layers_and_the_line(monkeypatch, tmp_path):
    # Un-skipping step()'s learned-position check makes it read a tensor value while tracing.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    with pytest.raises(SeqmixError, match=r"step graph .*layers \['attention'\].*seqmix/model/sequence_model\.py:\d+ in step"):
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
