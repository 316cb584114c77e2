"""ONNX export: every preset's parallel and step graphs match eager in ONNX Runtime; variants,
manifests, the NumPy-only runner and the export tool."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import seqmix
from seqmix import SeqmixError
from seqmix.configs import config_groups
from seqmix.model.generation import generate
from seqmix.operators.kv_cache import KVState
from seqmix.timing import Timing
from conftest import SEQMIX, onnx_runner, tiny_preset

from seqmix.export.formats import summary_lines
from seqmix.export.manifest import read_manifest, write_manifest
from seqmix.export.onnx_export import ExportMismatch, export_onnx, latency_entry
from seqmix.export.quantize import VARIANTS, evaluate_onnx, make_variant

ROOT = Path(__file__).resolve().parent.parent
PRESETS = config_groups()["model"]


@pytest.fixture
def exports(exported_presets):
    return exported_presets


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_exports_and_matches_eager_in_onnx_runtime(preset, exports):
    model, result = exports(preset)
    manifest = result.manifest
    assert manifest["parallel"]["max_error"] < 1e-4
    assert (result.parallel.parent / manifest["parallel"]["optimized_file"]).is_file()
    assert [i["name"] for i in manifest["parallel"]["inputs"]] == ["tokens", "padding_mask"]
    assert manifest["parallel"]["inputs"][0]["shape"][0] == "batch"
    assert set(manifest["impls"].values()) <= {"chunked", "conv", "sdpa", "math", "reference"}
    if model.causal:
        assert_decoder_graph(model, result)
    else:
        assert result.step is None
    # Nothing computed from the parameters (EMA kernels, transposes) is folded into the file.
    import onnx

    graph = onnx.load(str(result.parallel), load_external_data=False).graph
    stored = sum(onnx.numpy_helper.to_array(t).nbytes for t in graph.initializer)
    assert stored <= 1.1 * sum(p.numel() * p.element_size() for p in model.parameters()) + 64 * 1024


def assert_decoder_graph(model, result) -> None:
    """The decoder graph: dynamic B and T, checked at untraced (B, T) against eager, state named per layer and kind."""
    step = result.manifest["step"]
    assert step["max_error"] < 1e-4
    checked = step["checked_at"]
    assert any(check["batch"] > 1 for check in checked) and any(max(check["tokens"]) > 1 for check in checked)
    assert any(1 in check["tokens"] for check in checked)  # decode (T = 1) after a prefill, in one graph
    assert all((check["batch"], check["tokens"][0]) != (2, 5) for check in checked), "the traced shape is no check"
    inputs = {spec["name"]: spec["shape"] for spec in step["inputs"]}
    assert inputs.pop("input_ids") == ["batch", "tokens"]
    names = [entry["name"] for entry in step["state"]]
    assert sorted(inputs) == sorted(names) and all(shape[0] == "batch" for shape in inputs.values())
    assert all(re.fullmatch(r"past_key_values\.\d+\.(key|value)|past_state\.(\d+|final_norm)\.[\w.]+|past_state\.pos", n) for n in names)
    assert [entry["output"] for entry in step["state"]] == ["present." + n.split(".", 1)[1] for n in names]
    outputs = [spec["name"] for spec in step["outputs"]]
    assert outputs == ["logits", *[entry["output"] for entry in step["state"]]]
    # A layer's key/value cache is named as optimum and ONNX Runtime GenAI name it.
    kv_layers = [i for i, block in enumerate(model.blocks) if any(isinstance(s, KVState) for s in _tuples(block.init_state(1)))]
    for layer in kv_layers:
        assert f"past_key_values.{layer}.key" in names and f"past_key_values.{layer}.value" in names
    config = json.loads((result.parallel.parent / step["genai_config"]).read_text())
    assert config["model"]["decoder"]["filename"] == result.step.name
    assert [entry["name"] for entry in config["model"]["decoder"]["state"]] == names
    assert config["model"]["decoder"]["key_value_layers"] == kv_layers


def _tuples(state):
    """Every tuple inside a streaming state, nested ones included."""
    found, stack = [], [state]
    while stack:
        item = stack.pop()
        if isinstance(item, tuple):
            found.append(item)
            stack.extend(item)
    return found


def test_streaming_with_onnx_runtime_alone_equals_eager_generation(exports):
    model, result = exports("megalodon")
    runner = onnx_runner()
    manifest = runner.load(result.parallel.parent)
    text = runner.generate(result.parallel.parent, manifest, "def ", 24, temperature=0, top_k=None, seed=0)
    eager = generate(model.eval(), torch.tensor([list(b"def ")]), 24, temperature=0)
    assert text == bytes(eager[0, 4:].tolist()).decode("utf-8", errors="replace")
    assert any(entry["fill"] == -1 for entry in manifest["step"]["state"]), "empty cache slots start at -1"


def test_the_runner_script_runs_where_neither_torch_nor_seqmix_can_be_imported(exports):
    model, result = exports("megalodon")
    script = Path(onnx_runner().__file__)
    # A None entry in sys.modules makes any import of that name fail, as on a machine without it.
    blocked = (
        "import runpy, sys; sys.modules.update(torch=None, seqmix=None); "
        f"sys.argv = ['run_onnx.py', {str(result.parallel.parent)!r}, 'generate', '--prompt', 'def ', '--tokens', '8', "
        f"'--temperature', '0']; runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    eager = generate(model.eval(), torch.tensor([list(b"def ")]), 8, temperature=0)
    assert done.stdout.rstrip("\n") == "def " + bytes(eager[0, 4:].tolist()).decode("utf-8", errors="replace")


def test_the_runner_rejects_wrong_shapes_and_dtypes_before_onnx_runtime(exports):
    _, result = exports("megalodon")
    runner = onnx_runner()
    manifest = runner.load(result.parallel.parent)
    step = runner.OnnxModel(result.parallel.parent, manifest["step"])
    state = dict(zip([s["name"] for s in manifest["step"]["state"]], runner.initial_state(manifest)))
    with pytest.raises(runner.ExportError, match="dtype float32, expected int64"):
        step.run({"input_ids": np.zeros((1, 1), dtype=np.float32), **state})
    with pytest.raises(runner.ExportError, match="has batch=1 on axis 0 but input 'input_ids' has batch=2"):
        step.run({"input_ids": np.zeros((2, 1), dtype=np.int64), **state})
    first = manifest["step"]["state"][0]["name"]
    with pytest.raises(runner.ExportError, match=f"input '{first}' has shape"):
        step.run({"input_ids": np.zeros((1, 1), dtype=np.int64), **{**state, first: np.zeros((1, 3), dtype=np.float32)}})
    with pytest.raises(runner.ExportError, match="no step graph"):
        runner.generate(result.parallel.parent, {k: v for k, v in manifest.items() if k != "step"}, "a", 1, 0, None, 0)


def test_a_verification_beyond_tolerance_fails_with_the_error_and_where(tmp_path):
    with pytest.raises(ExportMismatch, match=r"parallel graph at B=1, L=\d+: max \|eager − exported\| = .* at index \("):
        export_onnx(tiny_preset("gpt2"), tmp_path, tolerance=0.0)


@pytest.mark.parametrize("kind", VARIANTS)
def test_quantized_and_half_variants_run_and_are_measured(kind, exports, tmp_path):
    from seqmix.tasks.mqar import MQAR

    model, result = exports("transformer")
    variant = make_variant(kind, result.parallel)
    task = MQAR(vocab_size=256, seq_len=128, num_pairs=8)
    fp32, small = evaluate_onnx(result.parallel, task, 2, 2), evaluate_onnx(variant, task, 2, 2)
    assert np.isfinite(small["loss"]) and abs(small["loss"] - fp32["loss"]) < 0.05


def test_manifests_are_validated_before_use(tmp_path):
    with pytest.raises(SeqmixError, match="does not exist"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(SeqmixError, match="not valid JSON"):
        read_manifest(tmp_path)
    write_manifest(tmp_path, {"format": "onnx", "vocab_size": 256})
    with pytest.raises(SeqmixError, match="lacks the keys \\['impls'\\]"):
        read_manifest(tmp_path)
    tokens = {"name": "tokens", "shape": ["batch", "length"], "dtype": "tensor(int64)"}
    parallel = {"file": "gone.onnx", "inputs": [tokens], "length_unit": 128}
    write_manifest(tmp_path, {"format": "onnx", "vocab_size": 256, "impls": {}, "parallel": parallel})
    with pytest.raises(SeqmixError, match="gone.onnx.*missing"):
        read_manifest(tmp_path)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A one-step gpt2-sized run on MQAR, for ``seqmix export``."""
    run = tmp_path_factory.mktemp("export_tool") / "run"
    train = subprocess.run(
        [*SEQMIX, "train", "model=gpt2", "model.d_model=32", "model.depth=1", "task=mqar",
         "task.vocab_size=256", "task.seq_len=128", "task.num_pairs=8", "train.max_steps=1", "train.batch_size=2",
         "train.eval_batches=1", "train.progress=false", "train.device=cpu", f"train.out_dir={run}"],
        capture_output=True, text=True,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    return run


def assert_latency_entry(latency: dict, runtime: str) -> None:
    """Both sides of an export's latency carry their spread, and the speed-up is the ratio of medians."""
    for side in ("eager", runtime):
        timing = latency[side]
        assert timing["runs"] == 7 and 0 < timing["low_ms"] <= timing["median_ms"] <= timing["high_ms"]
        assert latency[f"{side}_ms"] == timing["median_ms"]
    assert latency["speedup"] == latency["eager_ms"] / latency[f"{runtime}_ms"]
    assert "load" in latency


def test_summary_prints_both_medians_with_their_range_and_the_ratio_of_medians():
    eager = Timing(median_ms=374.0, low_ms=360.0, high_ms=8168.0, runs=7)
    deployed = Timing(median_ms=187.0, low_ms=180.0, high_ms=190.0, runs=7, load=5.0)
    manifest = {"format": "onnx", "parallel": {"max_error": 1e-6},
                "latency": latency_entry(1, 256, eager, "onnxruntime", deployed)}
    (line,) = [text for text in summary_lines(manifest) if text.startswith("latency")]
    assert line == f"latency at B=1, L=256: eager {eager}, ONNX Runtime {deployed} (2.00x, ratio of medians)"
    assert "374 ms (median of 7, 360–8168)" in line and "machine busy: load 5.0" in line
    assert manifest["latency"]["load"] == 5.0
    # A length the model cannot take as it is (not whole chunks) is said to have been taken as another.
    (line,) = [text for text in summary_lines({**manifest, "length_requested": 200}) if text.startswith("latency")]
    assert line.startswith("latency at B=1, L=256 (length=200 taken as 256: whole chunks of the model's largest chunk): ")
    (line,) = [text for text in summary_lines({**manifest, "length_requested": 256}) if text.startswith("latency")]
    assert line.startswith("latency at B=1, L=256: ")


def export_tool(*options: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SEQMIX, "export", *options], capture_output=True, text=True)


def test_export_tool_writes_a_manifest_the_runner_reads(trained_run):
    export = export_tool(f"checkpoint={trained_run}", "format=onnx", "length=256", "quantize=int8")
    assert export.returncode == 0, export.stderr[-2000:]
    manifest = read_manifest(trained_run / "export" / "onnx")
    assert manifest["latency"]["length"] == manifest["length_requested"] == 256 and manifest["quantized"]["int8"]["metric"] == "accuracy"
    assert_latency_entry(manifest["latency"], "onnxruntime")
    quantized = manifest["quantized"]["int8"]
    assert quantized["speedup"] == quantized["fp32_latency"]["median_ms"] / quantized["variant_latency"]["median_ms"]
    assert "ONNX Runtime" in export.stdout and "(median of 7, " in export.stdout
    prefill = manifest["step"]["prefill"]
    assert prefill["speedup"] == prefill["token_by_token"]["median_ms"] / prefill["one_call"]["median_ms"] > 1
    assert f"prefill of {prefill['tokens']} tokens through the step graph" in export.stdout
    bad = export_tool(f"checkpoint={trained_run}", "format=coreml")
    assert bad.returncode == 2 and "format='coreml' is not valid" in bad.stderr


def test_export_tool_writes_verified_executorch_programs(trained_run):
    pytest.importorskip("executorch.runtime", reason="executorch is not installed: pip install executorch==1.5.1")
    export = export_tool(f"checkpoint={trained_run}", "format=executorch", "length=128")
    assert export.returncode == 0, export.stderr[-2000:]
    out = trained_run / "export" / "executorch"
    manifest = read_manifest(out)
    assert (out / "model.pte").is_file() and (out / "step.pte").is_file()
    assert manifest["parallel"]["max_error"] < 1e-4 and manifest["step"]["max_error"] < 1e-4
    assert manifest["latency"]["length"] == 128 and manifest["latency"]["executorch_ms"] > 0
    assert_latency_entry(manifest["latency"], "executorch")
    assert "ExecuTorch" in export.stdout and "(median of 7, " in export.stdout
    refused = export_tool(f"checkpoint={trained_run}", "format=executorch", "quantize=fp16")
    assert refused.returncode == 2 and "quantize='fp16' is not valid for format=executorch" in refused.stderr


def _tensorrt_runs_here() -> bool:
    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def test_export_tool_tensorrt_checks_operators_and_says_what_is_missing(trained_run):
    export = export_tool(f"checkpoint={trained_run}", "format=tensorrt", "length=128")
    manifest = read_manifest(trained_run / "export" / "tensorrt")
    assert manifest["tensorrt_check"]["parallel"]["ok"] and manifest["tensorrt_check"]["step"]["ok"]
    if _tensorrt_runs_here():
        assert export.returncode == 0, export.stderr[-2000:]
        assert manifest["engine"]["max_error"] < 1e-3
    else:
        # It failed part-way, after work it kept: status 1, not the 2 of input refused before any work,
        # and the message names what was kept and where.
        assert export.returncode == 1, export.stderr[-2000:]
        assert "pip install tensorrt" in export.stderr or "no CUDA device" in export.stderr
        kept = export.stderr.split(f"kept in {trained_run / 'export' / 'tensorrt'}: ")[1].split()
        assert {"manifest.json,", "model.onnx,", "step.onnx"} <= set(kept)


@pytest.mark.parametrize("impl", ["taps", "channels_last"])
def test_exporters_switch_paths_they_do_not_run(impl):
    from seqmix.export.graphs import use_exportable_paths
    from seqmix.operators.tcn import TCN

    model = tiny_preset("tcnca", f"model.mixers.mega.local_options.impl={impl}")
    tcn = next(m for m in model.modules() if isinstance(m, TCN))
    assert tcn.impl == impl
    used = use_exportable_paths(model)
    assert tcn.impl == "conv" and "conv" in used.values() and impl not in used.values()


def test_the_exporters_name_a_model_or_folder_that_is_not_one_before_writing_anything(tmp_path):
    """export_onnx made its folder before failing on a string model, and took None for a folder to
    os.fspath's TypeError; export_model read attributes of a string."""
    from seqmix.export.formats import export_model
    from seqmix.tasks import build_task

    with pytest.raises(SeqmixError, match="export_onnx: model must be a torch.nn.Module .*got a str"):
        export_onnx("mega", tmp_path / "a")
    with pytest.raises(SeqmixError, match=r"export_onnx: out_dir=None is not valid: expected a path"):
        export_onnx(tiny_preset("mega"), None)
    with pytest.raises(SeqmixError, match="export: model must be a torch.nn.Module .*got a str"):
        export_model("mega", build_task("byte_lm"), "onnx", tmp_path / "b")
    # Each was an AttributeError once the graphs had been exported.
    with pytest.raises(SeqmixError, match="export: model must be a seqmix model .*got a Linear"):
        export_model(torch.nn.Linear(2, 2), build_task("byte_lm"), "onnx", tmp_path / "c")
    with pytest.raises(SeqmixError, match="export: task must be a seqmix task .*got None"):
        export_model(tiny_preset("mega"), None, "onnx", tmp_path / "d")
    assert list(tmp_path.iterdir()) == []


class _KeepsState(seqmix.Mixer):
    """A user's causal mixer whose step passes its state through unchanged (step equals forward)."""

    def __init__(self, d_model: int):
        super().__init__(d_model, causal=True)
        self.gate = torch.nn.Parameter(torch.zeros(d_model))

    def mix(self, x, padding_mask=None):
        return torch.sigmoid(self.gate) * x

    def empty_state(self, batch_size, device=None, dtype=None):
        return (torch.zeros(batch_size, self.d_model, device=device),)

    def mix_step(self, x, state):
        return torch.sigmoid(self.gate) * x, state


class _StepsElsewhere(_KeepsState):
    """Its step is not its forward streamed."""

    def mix_step(self, x, state):
        return torch.sigmoid(self.gate) * x * 3 + 1, state


def test_a_passed_through_state_exports_and_a_step_unlike_forward_writes_no_decoder(tmp_path):
    """The first was ONNX Runtime's 'Required inputs ([present.0.0_orig]) are missing' traceback; the
    second exported a decoder graph disagreeing with the parallel one, reported as verified."""
    model = seqmix.build_model(vocab_size=32, d_model=8, layers=[_KeepsState]).eval()
    assert export_onnx(model, tmp_path / "kept").manifest["step"]["max_error"] < 1e-4
    model = seqmix.build_model(vocab_size=32, d_model=8, layers=[_StepsElsewhere]).eval()
    with pytest.raises(SeqmixError, match=r"decoder graph: the model's step over a stream gives other logits than its forward .*_StepsElsewhere"):
        export_onnx(model, tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere" / "step.onnx").exists()


def test_export_onnx_gives_the_model_back_as_it_was_and_writes_only_into_a_new_or_empty_folder(tmp_path):
    """It left a model exported mid-training in eval mode (dropout off) with its mixers on other paths,
    and wrote model.onnx and step.onnx over a user's files of those names."""
    from seqmix.export.graphs import restores_model

    model = tiny_preset("mega").train()
    model.blocks[0].mixer.local.impl = "fft"
    export_onnx(model, tmp_path / "export")
    assert model.training and model.blocks[0].mixer.local.impl == "fft"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "model.onnx").write_text("the user's")
    with pytest.raises(SeqmixError, match=r"out_dir=.*mine' holds model.onnx; give a new or empty folder"):
        export_onnx(model, tmp_path / "mine")
    assert (tmp_path / "mine" / "model.onnx").read_text() == "the user's"

    @restores_model
    def failing(exported):
        exported.eval()
        exported.blocks[0].mixer.local.impl = "chunked"
        raise RuntimeError("the exporter failed")

    with pytest.raises(RuntimeError, match="the exporter failed"):
        failing(model)
    assert model.training and model.blocks[0].mixer.local.impl == "fft"
