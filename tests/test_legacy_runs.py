"""Runs saved by seqmix 0.1.0 (module paths like ``mixers.ema.EMA`` in their configs) still load and compute the same."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seqmix import SeqmixError
from seqmix.training.experiment import build_task
from seqmix.targets import LEGACY_TARGETS, check_targets, translate_legacy_targets
from seqmix.training.checkpoints import load_run

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "runs_0.1.0"
PRESETS = ["mega", "megalodon", "hybrid_tcn_attention"]


@pytest.mark.parametrize("preset", PRESETS)
def test_a_run_saved_by_0_1_0_loads_and_gives_the_same_logits(preset):
    run = FIXTURES / preset
    saved = (run / "checkpoints" / "step-00000003" / "config.yaml").read_text()
    assert "_target_: mixers." in saved, "the fixture must keep the old module paths"
    model, record = load_run(run)
    expected = load_file(str(FIXTURES / f"{preset}.expected.safetensors"))
    with torch.no_grad():
        logits = model.eval()(expected["tokens"])
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    assert record["preset"]["model"] == preset
    assert build_task(record["task"]).vocab_size == 64


def test_a_run_saved_by_0_1_0_resumes(tmp_path):
    from seqmix.configs import compose_config
    from seqmix.training.experiment import build_experiment
    from seqmix.training.loop import train

    run = tmp_path / "mega"
    shutil.copytree(FIXTURES / "mega", run)
    old = json.loads((run / "run.json").read_text())
    config = compose_config([
        "model=mega", "model.d_model=16", "model.depth=1", "task=mqar", "task.vocab_size=64", "task.seq_len=64",
        "task.num_pairs=4", "train.batch_size=4", "train.max_steps=4", "train.warmup_steps=1", "train.eval_every=4",
        "train.eval_batches=1", "train.checkpoint_every=4", "train.keep_checkpoints=1", "train.log_every=1",
        "train.progress=false", "train.device=cpu", "train.resume=true", f"train.out_dir={run}",
    ])
    experiment = build_experiment(config)
    assert experiment.model_config == translate_legacy_targets(old["model"])
    result = train(experiment.model, experiment.task, experiment.train, {"model": experiment.model_config, "task": experiment.task_config})
    assert result.checkpoint.name == "step-00000004"


def test_every_legacy_target_translates_to_an_allowed_one():
    config = {"_target_": next(iter(LEGACY_TARGETS)), "parts": [{"_target_": old} for old in LEGACY_TARGETS]}
    check_targets(translate_legacy_targets(config))


@pytest.mark.parametrize("target", ["mixers.checkpoint.os.system", "seqmix.model.checkpoint.os.system", "seqmix.os.system", "mixers.os.system"])
def test_a_target_behind_an_allowed_prefix_is_refused(target):
    with pytest.raises(SeqmixError, match="not something seqmix builds"):
        check_targets(translate_legacy_targets({"_target_": target}))
