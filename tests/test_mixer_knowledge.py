"""What each mixer tells the rest of seqmix (lowering paths, length unit, scores, cache, search knobs),
and the rule that search, benchmarks, exporters and compilers ask it instead of naming mixers."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import seqmix
from seqmix.contract import LOWERINGS, length_unit, require_runs_on, switch_impls
from conftest import composed_config
from mixer_cases import build, mixer_cases

ROOT = Path(__file__).resolve().parent.parent
OPERATOR_MODULES = {"ema", "cema", "tcn", "gated_attention", "softmax_attention", "identity"}
OPERATOR_CLASSES = {"EMA", "CEMA", "TCN", "GatedAttention", "SoftmaxAttention", "Identity"}
# Code that must work for any registered mixer, a plugin's included.
MIXER_AGNOSTIC = [*sorted((ROOT / "export").rglob("*.py")), *sorted((ROOT / "compile").rglob("*.py")),
                  *sorted((ROOT / "mixers" / "search").rglob("*.py")), ROOT / "mixers" / "tables.py", ROOT / "mixers" / "cli.py"]


@pytest.mark.parametrize("case", mixer_cases(), ids=[c[0] for c in mixer_cases()])
def test_every_mixer_answers_the_questions_the_rest_of_seqmix_asks(case):
    _, name, options = case
    mixer = build(name, options)
    cls = type(mixer)
    assert set(cls.lowered_impls) <= set(LOWERINGS)
    for replacements in cls.lowered_impls.values():
        assert set(replacements) | set(replacements.values()) <= set(cls.impls), replacements
    unit = mixer.length_unit()
    assert isinstance(unit, int) and unit >= 1
    for tokens in (1, unit, 4 * unit + 1):
        assert mixer.impl_for_tokens(tokens) in cls.impls
    fused, materialised = mixer.attention_scores(2, 96, fused=True), mixer.attention_scores(2, 96, fused=False)
    assert 0 <= fused <= materialised
    capacity = mixer.cache_capacity()
    assert capacity is None or (isinstance(capacity, int) and capacity >= 1)


@pytest.mark.parametrize("case", mixer_cases(), ids=[c[0] for c in mixer_cases()])
def test_search_knobs_write_options_the_mixer_is_built_with(case):
    _, name, options = case
    cls = seqmix.mixer_class(name)
    knobs = cls.search_knobs(dict(options))
    assert all(isinstance(floor, int) and floor >= 1 for floor in knobs.values())
    chosen = {knob: floor + 1 for knob, floor in knobs.items()}
    written = dict(options)
    cls.apply_search_knobs(written, chosen)
    assert (written != options) == bool(knobs), "a mixer that declares knobs must use them"
    built = seqmix.build_mixer(name, 16, **written)
    if "chunk_size" in chosen and getattr(built, "chunk_size", None) is not None:
        assert built.chunk_size == chosen["chunk_size"]


CPU_ONLY = [(name, impl) for name in seqmix.list_mixers() for impl in seqmix.mixer_class(name).cpu_only_impls]


def test_the_native_paths_are_the_cpu_only_ones():
    assert {impl for _, impl in CPU_ONLY} == {"native"} and len(CPU_ONLY) == 3, CPU_ONLY


def test_require_runs_on_names_a_device_torch_does_not_know():
    with pytest.raises(seqmix.SeqmixError, match="train.device: device='gpu' is not a device torch knows"):
        require_runs_on(seqmix.build_mixer("ema", 8), "gpu", "train.device")


@pytest.mark.parametrize("name, impl", CPU_ONLY, ids=[f"{name}-{impl}" for name, impl in CPU_ONLY])
def test_a_cpu_only_path_names_one_of_the_mixers_paths_that_runs_elsewhere(name, impl):
    """On a GPU (tests/test_gpu.py) the path itself refuses a tensor there, naming the same one."""
    cls = seqmix.mixer_class(name)
    elsewhere = cls.cpu_only_impls[impl]
    assert impl in cls.impls and elsewhere in cls.impls and elsewhere not in cls.cpu_only_impls


def test_the_length_unit_of_a_model_covers_every_chunk_inside_it():
    model = seqmix.instantiate_model(composed_config(["model=mega", "model.d_model=16", "model.depth=1",
                                                     "model.mixers.mega.chunk_size=6", "+model.mixers.mega.local_options.chunk_size=4"]).model)
    assert length_unit(model) == math.lcm(6, 4)


def test_each_lowering_switches_to_the_paths_the_mixers_name():
    model = seqmix.instantiate_model(composed_config(["model=tcnca", "model.d_model=16", "model.depth=1"]).model)
    tcn = next(m for m in model.modules() if isinstance(m, seqmix.TCN))
    assert switch_impls(model, "inductor")[next(n for n, m in model.named_modules() if m is tcn)] == "taps"
    assert switch_impls(model, "export")[next(n for n, m in model.named_modules() if m is tcn)] == "conv"
    with pytest.raises(seqmix.SeqmixError, match="lowering='tflite'"):
        switch_impls(model, "tflite")


def test_attention_scores_count_what_the_kernels_hold():
    attention = seqmix.build_mixer("softmax_attention", 16, heads=2)
    assert attention.attention_scores(3, 50, fused=True) == 0
    assert attention.attention_scores(3, 50, fused=False) == 3 * 2 * 50 * 50
    gated = seqmix.build_mixer("gated_attention", 16, chunk_size=16, heads=2)
    assert gated.attention_scores(3, 50, fused=True) == 3 * 2 * 4 * 16 * 16
    assert seqmix.build_mixer("gated_attention", 16, chunk_size=None, max_len=64).cache_capacity() == 64
    with torch.no_grad():
        assert seqmix.build_mixer("ema", 16, chunk_size=8).impl_for_tokens(7) == "recurrent"


@pytest.mark.parametrize("path", MIXER_AGNOSTIC, ids=lambda p: str(p.relative_to(ROOT)))
def test_mixer_agnostic_code_imports_no_operator(path):
    """Search, benchmarks, exporters, compilers and the CLI reach mixers through the contract and the registry."""
    assert not operator_imports(path.read_text()), f"{path.name} imports operators; ask the Mixer contract instead"


def operator_imports(source: str) -> set[str]:
    """The operator modules (``seqmix.operators.<mixer>``) and classes ``source`` imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        parts = (node.module or "").split(".")
        if parts[:2] == ["seqmix", "operators"] and len(parts) > 2 and parts[2] in OPERATOR_MODULES:
            found.add(node.module)
        if parts == ["seqmix", "operators"]:
            found |= {alias.name for alias in node.names} & OPERATOR_MODULES
        if parts == ["seqmix"]:
            found |= {alias.name for alias in node.names} & OPERATOR_CLASSES
    return found


def test_the_operator_import_check_sees_every_form():
    assert operator_imports("from seqmix.operators.ema import EMA") == {"seqmix.operators.ema"}
    assert operator_imports("from seqmix.operators import tcn, recurrence") == {"tcn"}
    assert operator_imports("from seqmix import TCN, build_mixer") == {"TCN"}
    assert operator_imports("from seqmix.contract import Mixer\nfrom seqmix.operators import recurrence") == set()
