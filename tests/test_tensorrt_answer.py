"""TensorRT's own answer: ``ask_tensorrt`` asks TensorRT's ONNX parser when it can and otherwise
falls back to the copied operator list, labelled with the TensorRT version it came from; the
manifest's ``tensorrt_check`` says which of the two answered.

The choice is tested on CPU with stand-ins for the ``tensorrt`` module (a parser that answers, a
builder that fails as it does without a GPU); the real parser only where TensorRT and a GPU are."""
from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import onnx
import pytest
from onnx import TensorProto, helper

from seqmix import SeqmixError
from seqmix.export.tensorrt import FALLBACK_SOURCE, SUPPORT_LIST_VERSION, ask_tensorrt, tensorrt_checks

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture
def graph(tmp_path):
    """A three-node graph (Relu, Det, Relu): Det is not in the copied list."""
    value = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="first"), helper.make_node("Det", ["a"], ["d"], name="det"),
             helper.make_node("Relu", ["d"], ["y"], name="last")]
    model = helper.make_model(helper.make_graph(nodes, "g", [value("x", [2, 2])], [value("y", [])]),
                              opset_imports=[helper.make_opsetid("", 20)])
    path = tmp_path / "g.onnx"
    onnx.save(model, path)
    return path


class Error:
    def __init__(self, node, op, desc):
        self.node_name, self.node_operator, self.desc = (lambda: node), (lambda: op), (lambda: desc)


def stand_in(version="10.99.1", subgraphs=(([0], True), ([1], False), ([2], True)), errors=(), builder_error=None):
    """A ``tensorrt`` module whose parser answers with ``subgraphs`` ((node indices, supported), ...)."""
    calls = []

    class Builder:
        def __init__(self, logger):
            if builder_error is not None:
                raise builder_error

        def create_network(self, flags):
            return "network"

    class Parser:
        def __init__(self, network, logger):
            self.num_subgraphs, self.num_errors = len(subgraphs), len(errors)

        def supports_model_v2(self, serialized, path):
            calls.append((len(serialized), path))
            return all(ok for _, ok in subgraphs)

        def get_subgraph_nodes(self, index):
            return subgraphs[index][0]

        def is_subgraph_supported(self, index):
            return subgraphs[index][1]

        def get_error(self, index):
            return errors[index]

    class ILogger:
        class Severity:
            WARNING = 2

        def __init__(self):
            pass

    return SimpleNamespace(__version__=version, Builder=Builder, OnnxParser=Parser, ILogger=ILogger), calls


def test_tensorrt_answers_when_its_parser_can_be_made(graph):
    trt, calls = stand_in(errors=[Error("det", "Det", "No importer registered for op: Det")])
    report = ask_tensorrt(graph, trt)
    assert calls and calls[0][1] == str(graph), "the parser was not asked about the file"
    assert report.answered_by == "tensorrt" and report.source == "TensorRT 10.99.1 OnnxParser.supports_model_v2"
    assert report.tensorrt_version == "10.99.1" and report.fallback_reason is None
    assert not report.ok and report.unsupported == {"Det": 1}
    assert any("Det det: No importer registered" in flag for flag in report.flags), report.summary()
    assert report.op_counts == {"Det": 1, "Relu": 2}


def test_tensorrt_accepting_a_graph_the_copied_list_refuses_is_believed_and_noted(graph):
    trt, _ = stand_in(subgraphs=(([0, 1, 2], True),))
    report = ask_tensorrt(graph, trt)
    assert report.ok and report.answered_by == "tensorrt"
    assert any(f"copied TensorRT {SUPPORT_LIST_VERSION} operator list says NOT OK" in note for note in report.notes)


def test_without_a_parser_the_copied_list_answers_labelled_with_why(graph):
    trt, _ = stand_in(builder_error=RuntimeError("CUDA initialization failure with error: 35"))
    report = ask_tensorrt(graph, trt)
    assert report.answered_by == "operator_list" and report.source == FALLBACK_SOURCE
    assert f"TensorRT {SUPPORT_LIST_VERSION}" in report.source and "fallback" in report.source
    assert "CUDA initialization failure" in report.fallback_reason and "10.99.1" in report.fallback_reason
    assert not report.ok and report.unsupported == {"Det": 1}  # the list's verdict
    assert "TensorRT was not asked" in report.summary()


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_without_tensorrt_installed_the_fallback_says_so(graph):
    report = ask_tensorrt(graph)
    assert report.answered_by == "operator_list" and "not installed" in report.fallback_reason


def test_the_manifest_records_which_answered_for_every_graph(graph, tmp_path):
    trt, _ = stand_in()
    asked = tensorrt_checks({"parallel": graph, "step": tmp_path / "absent.onnx"}, trt)
    fallback = tensorrt_checks({"parallel": graph}, stand_in(builder_error=RuntimeError("no GPU"))[0])
    assert set(asked) == {"parallel"}  # graphs that were not written are not checked
    assert json.loads(json.dumps(asked))["parallel"]["answered_by"] == "tensorrt"
    assert fallback["parallel"]["answered_by"] == "operator_list" and fallback["parallel"]["source"] == FALLBACK_SOURCE


def test_a_missing_graph_is_refused(tmp_path):
    with pytest.raises(SeqmixError, match="not a file"):
        ask_tensorrt(tmp_path / "absent.onnx")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason="tensorrt is not installed (pip install tensorrt; needs an NVIDIA GPU)")
@pytest.mark.parametrize("preset", ["mega", "megalodon", "transformer"])
def test_tensorrt_itself_accepts_the_exported_graphs(preset, exported_presets):
    _, result = exported_presets(preset)
    for path in (result.parallel, result.step):
        report = ask_tensorrt(path)
        assert report.answered_by == "tensorrt", report.summary()
        assert report.ok, report.summary()
