"""Runs saved by older seqmix versions, whose configs named code paths, still load, compute the same and resume.

seqmix 0.1.0 wrote module paths of its checkout (``mixers.ema.EMA``), 0.2.0 public ``_target_``
names (``seqmix.EMA``); both are translated into registry-name descriptions by a frozen table.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from seqmix import SeqmixError
from seqmix.model.description import model_description
from seqmix.model.legacy import LEGACY_TARGETS, translate
from seqmix.training.checkpoints import load_run
from seqmix.training.records import build_task, same_run

from conftest import examples

FIXTURES = Path(__file__).resolve().parent / "fixtures"
VERSIONS = {"0.1.0": "_target_: mixers.", "0.2.0": "_target_: seqmix."}
PRESETS = ["mega", "megalodon", "hybrid_tcn_attention"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("preset", PRESETS)
def test_an_old_run_loads_and_gives_the_same_logits(version, preset):
    run = FIXTURES / f"runs_{version}" / preset
    saved = (run / "checkpoints" / "step-00000003" / "config.yaml").read_text()
    assert VERSIONS[version] in saved, "the fixture must keep the old form"
    model, record = load_run(run)
    expected = load_file(str(FIXTURES / f"runs_{version}" / f"{preset}.expected.safetensors"))
    with torch.no_grad():
        logits = model.eval()(expected["tokens"])
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    assert record["preset"]["model"] == preset
    assert "_target_" not in json.dumps(record) and "_target_" not in json.dumps(model.config)
    assert build_task(record["task"]).vocab_size == 64


def test_only_a_checkpoint_of_a_run_reads_the_record_two_folders_up(tmp_path):
    """A saved model two folders below any run.json took that run's record, and evaluate scored it on
    that run's task. An old run's checkpoint, which holds no copy of the record, still reads its run's."""
    import seqmix

    old = FIXTURES / "runs_0.1.0" / "mega"
    assert load_run(old)[1]["preset"]["model"] == "mega"
    shutil.copy(old / "run.json", tmp_path / "run.json")
    seqmix.save_model(seqmix.load_model(old), tmp_path / "a" / "b")
    model, record = load_run(tmp_path / "a" / "b")
    assert "task" not in record and "preset" not in record


@pytest.mark.parametrize("version", VERSIONS)
def test_an_old_run_resumes_with_todays_config(version, tmp_path):
    from seqmix.configs import compose_config
    from seqmix.training.experiment import build_experiment
    from seqmix.training.loop import train

    run = tmp_path / "mega"
    shutil.copytree(FIXTURES / f"runs_{version}" / "mega", run)
    old = json.loads((run / "run.json").read_text())
    config = compose_config([
        "model=mega", "model.d_model=16", "model.depth=1", "task=mqar", "task.vocab_size=64", "task.seq_len=64",
        "task.num_pairs=4", "train.batch_size=4", "train.max_steps=4", "train.warmup_steps=1", "train.eval_every=4",
        "train.eval_batches=1", "train.checkpoint_every=4", "train.keep_checkpoints=1", "train.log_every=1",
        "train.progress=false", "train.device=cpu", "train.resume=true", f"train.out_dir={run}",
    ])
    experiment = build_experiment(config)
    record = {"model": experiment.model_config, "task": experiment.task_config}
    assert experiment.model_config == model_description(old["model"])
    assert same_run(old, record)
    result = train(experiment.model, experiment.task, experiment.train, record)
    assert result.checkpoint.name == "step-00000004"


def test_every_old_target_translates_to_a_registered_part():
    for target, (kind, name) in LEGACY_TARGETS.items():
        translated = translate({"_target_": target, "_partial_": True})
        assert "_target_" not in translated and (name is None or translated[kind] == name)


@given(st.sampled_from(sorted(LEGACY_TARGETS)), st.text(min_size=1, max_size=30))
@settings(max_examples=examples(200), deadline=None)
def test_a_target_outside_the_frozen_table_is_refused(known, suffix):
    """Anything reachable behind a known path (``seqmix.EMA.os``, ``seqmix.model.checkpoint.os.system``) is refused."""
    for target in (f"{known}.{suffix}", f"{known.rsplit('.', 1)[0]}.{suffix}", f"{suffix}.{known}"):
        if target in LEGACY_TARGETS:
            continue
        with pytest.raises(SeqmixError, match="not a part seqmix builds"):
            translate({"model": {"ffn": {"_target_": target}}})
