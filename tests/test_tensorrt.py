"""TensorRT: every preset's exported graphs pass the static ONNX-parser check, the check catches
what TensorRT refuses (DFT, complex tensors, custom-domain ops, ops inside bodies and functions),
and, on a GPU with TensorRT, engines built from the graphs match eager.

Each preset is exported once per module, tiny, and reused by every test that needs it.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import seqmix
from seqmix.contract import length_unit
from seqmix.export.graphs import StepGraph
from seqmix.export.tensorrt import (
    LISTED_UNSUPPORTED,
    SUPPORTED_OPS,
    build_engine,
    check_tensorrt_support,
    onnxruntime_tensorrt_session,
    run_engine,
)
from seqmix.configs import config_groups

PRESETS = config_groups()["model"]
BIDIRECTIONAL = {"mega_encoder"}  # no state, so no step graph
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(not HAS_TENSORRT, reason="tensorrt is not installed (pip install tensorrt; needs an NVIDIA GPU)")


class Graphs:
    """The session's exported tiny presets (see conftest.exported_presets), by graph."""

    def __init__(self, exported):
        self.exported = exported

    def model(self, preset: str) -> torch.nn.Module:
        model = self.exported(preset)[0]
        assert model.causal == (preset not in BIDIRECTIONAL), f"{preset}: update BIDIRECTIONAL"
        return model

    def parallel(self, preset: str):
        return self.exported(preset)[1].parallel

    def step(self, preset: str):
        return self.exported(preset)[1].step


@pytest.fixture
def graphs(exported_presets):
    return Graphs(exported_presets)


# -- every preset ---------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
def test_parallel_graph_of_every_preset_imports_into_tensorrt(preset, graphs):
    report = check_tensorrt_support(graphs.parallel(preset))
    assert report.ok, report.summary()
    assert report.opset == 23


STEP_CASES = [p for p in PRESETS if p not in BIDIRECTIONAL]


@pytest.mark.parametrize("preset", STEP_CASES)
def test_step_graph_of_every_causal_preset_imports_into_tensorrt(preset, graphs):
    report = check_tensorrt_support(graphs.step(preset))
    assert report.ok, report.summary()


def test_check_walks_scan_bodies_of_the_chunked_ema(graphs):
    report = check_tensorrt_support(graphs.parallel("mega"))
    top_level = {node.op_type for node in onnx.load(str(graphs.parallel("mega")), load_external_data=False).graph.node}
    assert "Scan" in report.op_counts
    assert set(report.op_counts) - top_level, "ops of the Scan body are not counted"


def test_fft_path_of_the_ema_is_refused_for_its_dft():
    # Why use_exportable_paths swaps it for the chunked path before a TensorRT export.
    mixer = seqmix.build_mixer("ema", 16, impl="fft").eval()
    program = torch.onnx.export(mixer, (torch.randn(1, 64, 16),), dynamo=True, opset_version=23, verbose=False)
    report = check_tensorrt_support(program.model_proto)
    assert not report.ok and set(report.unsupported) == {"DFT"}, report.summary()


# -- synthetic graphs -------------------------------------------------------------------------------
def make_model(nodes, inputs, outputs, opset=20, initializers=(), functions=(), domains=()):
    graph = helper.make_graph(nodes, "synthetic", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def tensor(name, elem_type=TensorProto.FLOAT, shape=(2, 3)):
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def test_dft_is_flagged_as_supported_only_from_tensorrt_11_2(tmp_path):
    model = make_model([helper.make_node("DFT", ["x"], ["y"])], [tensor("x", shape=(1, 16, 1))], [tensor("y", shape=(1, 16, 2))])
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "dft.onnx")
    report = check_tensorrt_support(tmp_path / "dft.onnx")
    assert not report.ok
    assert report.unsupported == {"DFT": 1}
    assert any("DFT" in flag and "11.2" in flag for flag in report.flags), report.summary()
    later = check_tensorrt_support(model, tensorrt_version="11.2")
    assert later.ok and "DFT" not in later.unsupported, later.summary()
    assert any("DFT" in note for note in later.notes)


def complex_input():
    return make_model([helper.make_node("Identity", ["x"], ["y"])], [tensor("x", TensorProto.COMPLEX64)], [tensor("y", TensorProto.COMPLEX64)])


def complex_cast():
    return make_model(
        [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.COMPLEX64), helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT)],
        [tensor("x")], [tensor("y")],
    )


def complex_initializer():
    weight = helper.make_tensor("w", TensorProto.COMPLEX128, [2], [1 + 0j, 1j])
    return make_model([helper.make_node("Identity", ["w"], ["y"])], [], [tensor("y", TensorProto.COMPLEX128, (2,))], initializers=[weight])


@pytest.mark.parametrize("build", [complex_input, complex_cast, complex_initializer])
def test_complex_tensors_are_flagged(build):
    report = check_tensorrt_support(build())
    assert not report.ok
    assert any("complex" in flag and "COMPLEX" in flag for flag in report.flags), report.summary()


@pytest.mark.parametrize("domain, op", [("com.example", "MysteryOp"), ("com.microsoft", "FusedMatMul")])
def test_ops_outside_the_default_domain_are_flagged(domain, op):
    model = make_model([helper.make_node(op, ["x"], ["y"], domain=domain)], [tensor("x")], [tensor("y")], domains=[domain])
    report = check_tensorrt_support(model)
    assert not report.ok
    assert report.unsupported == {f"{domain}::{op}": 1}
    assert any(domain in flag and "plugin" in flag for flag in report.flags), report.summary()


def test_unsupported_op_inside_a_scan_body_is_found():
    body = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["s_out"]), helper.make_node("Det", ["xi"], ["d"])],
        "body", [tensor("s", shape=(1,)), tensor("xi", shape=(2, 2))], [tensor("s_out", shape=(1,)), tensor("d", shape=())],
    )
    scan = helper.make_node("Scan", ["s0", "x"], ["s_final", "dets"], body=body, num_scan_inputs=1)
    model = make_model([scan], [tensor("s0", shape=(1,)), tensor("x", shape=(5, 2, 2))], [tensor("s_final", shape=(1,)), tensor("dets", shape=(5,))])
    onnx.checker.check_model(model)
    report = check_tensorrt_support(model)
    assert report.unsupported == {"Det": 1}
    assert any("Det" in flag and "listed as not supported" in flag and "body" in flag for flag in report.flags), report.summary()
    assert report.op_counts == {"Det": 1, "Identity": 1, "Scan": 1}


def local_function(body_op):
    return helper.make_function(
        "local", "Inner", ["a"], ["b"], [helper.make_node(body_op, ["a"], ["b"])], [helper.make_opsetid("", 20)]
    )


@pytest.mark.parametrize("body_op, ok", [("Relu", True), ("Det", False)])
def test_local_functions_are_walked_not_flagged_as_custom_ops(body_op, ok):
    shape = (2, 2, 2)
    output = tensor("y", shape=shape if body_op == "Relu" else (2,))
    model = make_model([helper.make_node("Inner", ["x"], ["y"], domain="local")], [tensor("x", shape=shape)], [output],
                       functions=[local_function(body_op)], domains=["local"])
    report = check_tensorrt_support(model)
    assert report.ok == ok, report.summary()
    assert report.op_counts == {body_op: 1}
    assert "local::Inner" not in report.unsupported


@pytest.mark.parametrize("rank, ok", [(4, True), (3, False)])
def test_attention_needs_4d_inputs(rank, ok):
    shape = (1, 2, 5, 4) if rank == 4 else (1, 5, 8)
    heads = {} if rank == 4 else {"q_num_heads": 2, "kv_num_heads": 2}
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], **heads)
    model = make_model([node], [tensor(n, shape=shape) for n in "qkv"], [tensor("y", shape=shape)], opset=23)
    report = check_tensorrt_support(model)
    assert report.ok == ok, report.summary()
    if not ok:
        assert any("Attention" in flag and "4D" in flag for flag in report.flags)


def test_computed_axes_are_flagged_and_constant_ones_are_not():
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [0])
    constant = make_model([helper.make_node("Unsqueeze", ["x", "axes"], ["y"])], [tensor("x")], [tensor("y", shape=(1, 2, 3))], initializers=[axes])
    assert check_tensorrt_support(constant).ok
    computed = make_model([helper.make_node("Unsqueeze", ["x", "a"], ["y"])], [tensor("x"), tensor("a", TensorProto.INT64, (1,))], [tensor("y", shape=(1, 2, 3))])
    report = check_tensorrt_support(computed)
    assert not report.ok and any("axes" in flag for flag in report.flags), report.summary()


@pytest.mark.parametrize("trip_count_known, ok", [(True, True), (False, False)])
def test_loop_scan_outputs_need_a_trip_count_known_at_build_time(trip_count_known, ok):
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Identity", ["s"], ["s_out"]),
         helper.make_node("Identity", ["s"], ["y"])],
        "body",
        [tensor("i", TensorProto.INT64, ()), tensor("cond", TensorProto.BOOL, ()), tensor("s", shape=(1,))],
        [tensor("cond_out", TensorProto.BOOL, ()), tensor("s_out", shape=(1,)), tensor("y", shape=(1,))],
    )
    loop = helper.make_node("Loop", ["m", "", "s0"], ["s_final", "ys"], body=body)
    trip = helper.make_tensor("m", TensorProto.INT64, [], [3])
    inputs = [tensor("s0", shape=(1,))] + ([] if trip_count_known else [tensor("m", TensorProto.INT64, ())])
    model = make_model([loop], inputs, [tensor("s_final", shape=(1,)), tensor("ys", shape=(3, 1))],
                       initializers=[trip] if trip_count_known else [])
    report = check_tensorrt_support(model)
    assert report.ok == ok, report.summary()
    if not ok:
        assert any("Loop" in flag and "trip count" in flag for flag in report.flags)


def test_support_list_is_consistent():
    assert not SUPPORTED_OPS & LISTED_UNSUPPORTED
    assert {"Scan", "Einsum", "Attention", "LayerNormalization", "RMSNormalization", "Gelu"} <= SUPPORTED_OPS
    assert "DFT" in LISTED_UNSUPPORTED


def test_missing_graph_says_so(tmp_path):
    with pytest.raises(seqmix.SeqmixError, match="not a file"):
        check_tensorrt_support(tmp_path / "absent.onnx")


# -- optional runtimes -------------------------------------------------------------------------------
@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_build_engine_without_tensorrt_says_what_to_install(tmp_path):
    with pytest.raises(seqmix.SeqmixError, match="pip install tensorrt; needs an NVIDIA GPU"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", {}, {}, {})


def test_onnxruntime_session_without_tensorrt_provider_says_what_is_missing(tmp_path):
    import onnxruntime

    if "TensorrtExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT execution provider")
    with pytest.raises(seqmix.SeqmixError, match="TensorrtExecutionProvider.*onnxruntime-gpu"):
        onnxruntime_tensorrt_session(tmp_path / "m.onnx")


def io_names(path):
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in initializers], [o.name for o in graph.output]


@pytest.mark.gpu
@needs_tensorrt
@pytest.mark.parametrize("preset", ["transformer", "mega", "megalodon"])
def test_engine_of_the_parallel_graph_matches_eager(preset, graphs, tmp_path):
    path, model = graphs.parallel(preset), graphs.model(preset)
    unit = length_unit(model)
    names, (output,) = io_names(path)  # tokens, padding_mask

    def profile(batch, units):
        return {name: (batch, units * unit) for name in names}

    engine = build_engine(path, tmp_path / f"{preset}.engine", profile(1, 1), profile(2, 2), profile(4, 4))
    for batch, units in [(1, 1), (3, 3), (4, 4)]:
        tokens = torch.randint(0, 256, (batch, units * unit))
        mask = torch.zeros(batch, units * unit, dtype=torch.bool)
        logits = run_engine(engine, {"tokens": tokens, "padding_mask": mask})[output]
        with torch.no_grad():
            expected = model(tokens)
        torch.testing.assert_close(logits.cpu().float(), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@needs_tensorrt
@pytest.mark.parametrize("preset", ["transformer", "mega"])
def test_engine_of_the_step_graph_streams_like_eager(preset, graphs, tmp_path):
    path, model = graphs.step(preset), graphs.model(preset)
    inputs, outputs = io_names(path)
    engine = build_engine(path, tmp_path / f"{preset}_step.engine", {}, {}, {})
    state, eager_state = StepGraph(model, 1).initial_state(1), model.init_state(1)  # exported for B = 1
    for _ in range(4):
        tokens = torch.randint(0, 256, (1, 1))
        results = run_engine(engine, {inputs[0]: tokens, **dict(zip(inputs[1:], state))})
        state = [results[name] for name in outputs[1:]]
        with torch.no_grad():
            expected, eager_state = model.step(tokens, eager_state)
        torch.testing.assert_close(results[outputs[0]].cpu().float(), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_onnxruntime_tensorrt_session_matches_eager(graphs, tmp_path):
    import onnxruntime

    if "TensorrtExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime here has no TensorrtExecutionProvider (needs onnxruntime-gpu and TensorRT)")
    path, model = graphs.parallel("transformer"), graphs.model("transformer")
    names, _ = io_names(path)  # tokens, padding_mask
    session = onnxruntime_tensorrt_session(
        path, {n: (1, 1) for n in names}, {n: (2, 64) for n in names}, {n: (4, 256) for n in names}, cache_dir=tmp_path
    )
    tokens = torch.randint(0, 256, (3, 48))
    (logits,) = session.run(None, {"tokens": tokens.numpy(), "padding_mask": np.zeros((3, 48), dtype=bool)})
    with torch.no_grad():
        expected = model(tokens)
    torch.testing.assert_close(torch.from_numpy(np.asarray(logits)), expected, rtol=1e-3, atol=1e-3)
