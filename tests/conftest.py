import os
import sys

import pytest

# Make the tests' helper modules importable however pytest is started.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def tiny_preset(preset: str, *overrides: str):
    """A model preset at a tiny size (D = 32, two layers; three for a three-layer pattern), seeded."""
    import torch

    import mixers
    from mixers.configs import compose_config

    depth = "model.depth=3" if preset == "hybrid_tcn_attention" else "model.depth=2"
    torch.manual_seed(0)
    return mixers.instantiate_model(compose_config([f"model={preset}", "model.d_model=32", depth, *overrides]).model)


@pytest.fixture(scope="session")
def exported_presets(tmp_path_factory):
    """Each tiny preset exported to ONNX (verified parallel and step graphs) once per session.

    Returns a function preset -> (model, export.onnx_export.OnnxExport).
    """
    from export.manifest import write_manifest
    from export.onnx_export import export_onnx

    cache = {}

    def get(preset: str):
        if preset not in cache:
            model = tiny_preset(preset).eval()
            result = export_onnx(model, tmp_path_factory.mktemp(preset))
            write_manifest(result.parallel.parent, result.manifest)
            cache[preset] = (model, result)
        return cache[preset]

    return get
