"""Every config file under conf/, found recursively, builds and runs forward + backward."""
from __future__ import annotations

from pathlib import Path

import re

import pytest
import torch
from omegaconf import OmegaConf

import seqmix
from seqmix.configs import CONF_DIR, compose_config
from seqmix.layers.blocks import FeedForward
from seqmix.layers.norms import LayerNorm, TimestepNorm
from seqmix.model.description import part_factory
from seqmix.training.loop import TrainConfig
from seqmix.training.records import build_task

from conftest import task_test_options

WIDTH = 16
CONFIG_FILES = sorted(CONF_DIR.rglob("*.yaml"))


def _group(path: Path) -> str:
    return path.parent.relative_to(CONF_DIR).as_posix()


def _backward_is_finite(output: torch.Tensor, module: torch.nn.Module, x: torch.Tensor | None = None) -> None:
    """Backward reaches every parameter (and the input x) with finite gradients."""
    output.float().pow(2).mean().backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad] + ([x.grad] if x is not None else [])
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def _run_model(model) -> None:
    tokens = torch.randint(0, model.vocab_size, (2, 40))
    out = model(tokens)
    assert torch.isfinite(out).all()
    _backward_is_finite(out, model)


def _run_sequence_module(module, *call_extra) -> None:
    x = torch.randn(2, 20, WIDTH, requires_grad=True)
    y = module(x, *call_extra)
    assert y.shape == x.shape
    _backward_is_finite(y, module, x)


def _build_and_run(path: Path, tmp_path: Path) -> None:
    group = _group(path)
    if group == "." and path.stem == "config":
        _run_model(seqmix.instantiate_model(compose_config([], config_name=path.stem).model))
        return
    if group == ".":
        from seqmix.cli import COMMANDS, options_of

        # A command's own config: it must fit the command's schema once its required values are given.
        (command,) = [c for c in COMMANDS.values() if c.config_name == path.stem]
        config = compose_config([], config_name=path.stem)
        required = [key for key in config if OmegaConf.is_missing(config, key)]
        assert set(required) <= {"checkpoint", "root", "path"}, required
        for key in required:
            config[key] = str(tmp_path)
        options = options_of(config, command.schema, command.name)
        assert isinstance(options, command.schema)
        return
    if group == "model":
        _run_model(seqmix.instantiate_model(compose_config([f"model={path.stem}"]).model))
        return
    if group == "task":
        config = compose_config([f"task={path.stem}"]).task
        task = build_task({**config, **task_test_options(config, tmp_path)})
        batch = task.batch("train", 0, 2)
        assert batch.inputs.shape == (2, task.seq_len) and int(batch.inputs.max()) < task.vocab_size
        return
    if group == "train":
        options = OmegaConf.to_container(compose_config([f"train={path.stem}"]).train)
        assert TrainConfig(**options).max_steps >= 1
        return
    if group == "bench":
        from seqmix.export.bench import check_spec, compose_bench_spec

        # Validates the spec and builds each subject once; the timing grid itself is tests/test_bench.py's.
        assert check_spec(compose_bench_spec([f"bench={path.stem}"])) > 0
        return
    if group == "search":
        optuna = pytest.importorskip("optuna")
        from seqmix.training.experiment import build_experiment
        from seqmix.search import SearchSettings, compose_search_config

        # The search's task, train budget and base preset build; then one sampled candidate trains a step.
        config = compose_search_config(path.stem)
        build_experiment(config)
        settings = SearchSettings.from_config(config.search)
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
        candidate = settings.space.suggest(trial, OmegaConf.to_container(config.model, resolve=True))
        _run_model(seqmix.instantiate_model(candidate.model_config))
        return
    if group == "hydra/launcher":
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the launcher extra: pip install 'seqmix[launcher]'")
        from hydra.plugins.launcher import Launcher
        from hydra.utils import instantiate

        # A sweep's launcher: Hydra's own node, composed and built as `-m hydra/launcher=<name>` would (submits nothing).
        launcher = instantiate(compose_config([f"hydra/launcher={path.stem}"], with_choices=True).hydra.launcher)
        assert isinstance(launcher, Launcher)
        return
    # A part's config, composed as a model preset would compose it.
    factory = part_factory(group, compose_config([f"+{group}@probe={path.stem}"]).probe, str(path))
    if group == "mixer":
        _run_sequence_module(factory(WIDTH))
    elif group == "norm":
        norm = factory(WIDTH)
        _run_sequence_module(norm, None) if isinstance(norm, TimestepNorm) else _run_sequence_module(norm)
    elif group == "ffn":
        _run_sequence_module(factory(WIDTH))
    elif group == "block":
        residual = compose_config([f"+{group}@probe={path.stem}"]).probe.residual
        mixer_name = "gated_attention" if residual in ("gated", "two_hop") else "ema"
        mixer = seqmix.build_mixer(mixer_name, WIDTH, **({"normalized": True} if residual == "two_hop" else {}))
        _run_sequence_module(factory(d_model=WIDTH, mixer=mixer, ffn=FeedForward(WIDTH), norm=LayerNorm))
    elif group == "head":
        head = factory(WIDTH, 50)
        h = torch.randn(2, 20, WIDTH, requires_grad=True)
        _backward_is_finite(head(h, None), head, h)
    else:
        pytest.fail(f"conf/{group}/ has no builder in tests/test_configs.py; add one so its files are tested")


def test_configs_were_found():
    groups = {_group(p) for p in CONFIG_FILES}
    assert {"mixer", "norm", "ffn", "block", "head", "model", "task", "train"} <= groups
    assert len([p for p in CONFIG_FILES if _group(p) == "mixer"]) == len(seqmix.list_mixers())


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[str(p.relative_to(CONF_DIR)) for p in CONFIG_FILES])
def test_config_builds_and_trains_a_step(path, tmp_path):
    torch.manual_seed(0)
    assert "_target_" not in path.read_text(), "configs name registered parts, never code paths"
    _build_and_run(path, tmp_path)


@pytest.mark.parametrize("overrides", ["model=megalodon", [["model=megalodon"]], [1], [None], 5],
                         ids=["a bare string", "nested", "an int", "None", "not a list"])
def test_compose_config_refuses_overrides_that_are_not_a_list_of_strings(overrides):
    """A bare string was read one character at a time (override 'm'); anything else but strings was
    a TypeError from Hydra's parser."""
    with pytest.raises(seqmix.SeqmixError, match=r"overrides=.* is not valid; expected a list of strings"):
        compose_config(overrides)


@pytest.mark.parametrize("overrides, message", [
    (["model.d_model=${nope}"], r"cannot resolve model.d_model: Interpolation key 'nope' not found"),
    (["model.d_model=${model.d_model}"], r"cannot resolve model.d_model: Recursive interpolation detected"),
    (["model.d_model=${foo:bar}"], r"cannot resolve model.d_model: Unsupported interpolation type foo"),
    (["model=null"], r"cannot apply the overrides \['model=null'\]: Config group override must be a string"),
    # Hydra said only "Ambiguous value for argument".
    (["model=mega,gpt2"], r"'model=mega,gpt2' lists several values: a sweep runs one job for each with -m"),
])
def test_an_interpolation_that_cannot_resolve_is_named_when_the_config_is_composed(overrides, message):
    """Each was OmegaConf's (or Hydra's) traceback wherever the value was first read, in every command."""
    with pytest.raises(seqmix.SeqmixError, match=message):
        compose_config(overrides)


@pytest.mark.parametrize("content, message", [
    ("defaults:\n  - loop\n", "a config refers to itself in a loop"),
    ("defaults:\n  - gpt2\nmixers: &a [*a]\n", "a config refers to itself in a loop"),
    ("d_model: [16\n", r"a config file is not readable YAML \(ParserError: "),
])
def test_a_config_directory_of_looping_or_broken_yaml_is_refused_in_one_line(content, message, tmp_path):
    """A defaults list that comes back to itself or a self-referencing anchor was a RecursionError, a broken file YAML's traceback."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "loop.yaml").write_text(content)
    with pytest.raises(seqmix.SeqmixError, match=message):
        compose_config([f"hydra.searchpath=[file://{tmp_path}]", "model=loop"])


def test_an_unreadable_override_is_the_one_named_not_an_earlier_one_holding_an_equals_sign():
    """Hydra quotes only the token it stopped at ('='): the first override holding one was blamed,
    the search's own '+search=tiny' for a storage URL's unquoted '?host='."""
    from seqmix.search import compose_search_config

    with pytest.raises(seqmix.SeqmixError, match=re.escape("cannot read the override 'train.out_dir=a=b'")):
        compose_config(["model=gpt2", "model.d_model=16", "train.out_dir=a=b"])
    with pytest.raises(seqmix.SeqmixError, match=re.escape("cannot read the override 'search.study_name=a=b'")):
        compose_search_config("tiny", ["search.objectives=[metric]", "search.study_name=a=b"])
