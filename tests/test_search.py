"""Architecture search (seqmix.search, seqmix search, seqmix.export.latency) on conf/search/tiny.yaml:
a whole study and its report, two workers sharing one study, failing and abandoned trials, the
space's mapping onto model configs, and the errors of bad search configs."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

optuna = pytest.importorskip("optuna")
pytest.importorskip("matplotlib")

import seqmix  # noqa: E402
from seqmix import SeqmixError  # noqa: E402
from seqmix.configs import compose_config  # noqa: E402
from seqmix.training.experiment import build_experiment  # noqa: E402
from seqmix.search import SearchSettings, SearchSpace, compose_search_config, run_search  # noqa: E402
from seqmix.search.claims import budget_trials  # noqa: E402
from seqmix.search.settings import make_pruner  # noqa: E402

from seqmix.export.latency import check_runtime, deployed_latency  # noqa: E402

from conftest import SEQMIX  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Trains a one-layer TCN at lr = 1e9: the loss is NaN at the second step, every time.
DIVERGING_TRIAL = "{pattern_length: 1, layer_0: tcn, d_model: 16, tcn_kernel: 2, tcn_depth: 2, lr: 1.0e9}"


def tiny(out_dir: Path, *overrides: str):
    return compose_search_config("tiny", [f"search.out_dir={out_dir}", *overrides])


def stored_study(out_dir: Path):
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{out_dir / 'study.db'}")


def test_tiny_search_writes_leaderboard_pareto_plot_and_presets_the_train_tool_accepts(tmp_path):
    out_dir = tmp_path / "search"
    lines = []
    outcome = run_search(tiny(out_dir), measure_latency=deployed_latency, log=lines.append)

    assert outcome.trials_run == 3
    trials = outcome.study.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert all(t.user_attrs["latency_ms"] > 0 and t.user_attrs["parameters"] > 0 for t in trials)
    for t in trials:
        spread = t.user_attrs["latency"]
        assert spread["median_ms"] == t.user_attrs["latency_ms"] and spread["runs"] >= 1
        assert spread["low_ms"] <= spread["median_ms"] <= spread["high_ms"]
    csv_lines = (out_dir / "leaderboard.csv").read_text().splitlines()
    assert csv_lines[0].startswith("trial,state,architecture,params,accuracy,latency_ms,latency_low_ms,latency_high_ms")
    assert len(csv_lines) == 4
    markdown = (out_dir / "leaderboard.md").read_text()
    assert "| trial | state | architecture |" in markdown and " d=" in markdown and "×" in markdown
    assert (out_dir / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert all((out_dir / "trials" / f"{t.number:04d}" / "metrics.jsonl").is_file() for t in trials)

    presets = sorted((out_dir / "presets" / "model").glob("tiny_trial*.yaml"))
    front = {t.number for t in outcome.study.best_trials}
    assert presets and {int(p.stem.removeprefix("tiny_trial")) for p in presets} == front
    preset = presets[0]
    trial = trials[int(preset.stem.removeprefix("tiny_trial"))]

    # compose_config finds the preset through the search path, and the model it builds is the trial's.
    task = ["task=mqar", "task.vocab_size=64", "task.seq_len=32", "task.num_pairs=4"]
    config = compose_config([f"hydra.searchpath=[file://{preset.parent.parent}]", f"model={preset.stem}", *task])
    model = build_experiment(config).model
    assert model.config == trial.user_attrs["model_config"]
    assert sum(p.numel() for p in model.parameters()) == trial.user_attrs["parameters"]

    # The command in the preset's header trains it with seqmix train.
    command = next(line for line in preset.read_text().splitlines() if "seqmix train" in line).lstrip("# ").split()
    assert command[:2] == ["seqmix", "train"] and "--config-dir" in command
    short = ["train.max_steps=1", "train.eval_batches=1", "train.batch_size=2", "train.progress=false", f"train.out_dir={tmp_path / 'retrain'}"]
    result = subprocess.run([*SEQMIX, *command[1:], *short], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"d_model={trial.user_attrs['model_config']['d_model']}" in result.stdout


def test_two_workers_share_one_study_and_run_each_trial_once(tmp_path):
    out_dir = tmp_path / "search"
    command = [*SEQMIX, "search", "search=tiny", f"search.out_dir={out_dir}", "search.n_trials=4"]
    workers = [subprocess.Popen([*command, f"search.worker={index}"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for index in range(2)]
    outputs = [worker.communicate(timeout=240)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs

    trials = stored_study(out_dir).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4
    ran = sum(int(line.split()[3]) for output in outputs for line in output.splitlines() if line.startswith("this worker ran"))
    assert ran == 4
    assert sorted(p.name for p in (out_dir / "trials").iterdir()) == ["0000", "0001", "0002", "0003"]


def test_a_diverging_trial_fails_and_the_study_goes_on_with_intermediate_reports(tmp_path):
    out_dir = tmp_path / "search"
    # On a journal file, the storage for studies shared through a network disk.
    config = tiny(out_dir, f"search.storage=journal:{tmp_path / 'journal' / 'study.log'}", "search.objectives=[metric]", "search.pruner=median",
                  "++search.pruner_options={n_startup_trials: 1, n_warmup_steps: 0}", f"search.enqueue=[{DIVERGING_TRIAL}]")
    with pytest.warns(UserWarning, match="out of range"):  # the enqueued lr lies outside the space
        outcome = run_search(config, log=lambda line: None)

    failed, *others = outcome.study.trials
    assert failed.state == optuna.trial.TrialState.FAIL
    assert "loss became nan" in failed.user_attrs["error"]
    assert len(others) == 2 and others[0].state == optuna.trial.TrialState.COMPLETE
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in others)
    assert all(3 in t.intermediate_values for t in others)  # reported at the eval point, for the pruner
    assert "| fail |" in (out_dir / "leaderboard.md").read_text() and "loss became nan" in (out_dir / "leaderboard.csv").read_text()
    assert (tmp_path / "journal" / "study.log").is_file() and not (out_dir / "study.db").exists()


def test_a_trial_left_running_by_a_killed_worker_is_failed_and_rerun_with_its_parameters(tmp_path):
    out_dir = tmp_path / "search"
    config = tiny(out_dir, "search.objectives=[metric]", "search.n_trials=2")
    # What a worker killed during trial 0 leaves behind: a running trial whose heartbeat stopped.
    out_dir.mkdir(parents=True)
    study = optuna.create_study(storage=f"sqlite:///{out_dir / 'study.db'}", study_name="tiny", direction="maximize")
    abandoned = study.ask()
    SearchSettings.from_config(config.search).space.suggest(abandoned, OmegaConf.to_container(config.model, resolve=True))
    abandoned.set_user_attr("heartbeat", time.time() - 3600)

    lines = []
    run_search(config, log=lines.append)

    killed, retry, fresh = stored_study(out_dir).trials
    assert killed.state == optuna.trial.TrialState.FAIL and "no heartbeat" in killed.user_attrs["error"]
    assert retry.state == fresh.state == optuna.trial.TrialState.COMPLETE
    assert retry.params == killed.params and retry.user_attrs["retry_of"] == 0
    assert len(budget_trials([killed, retry, fresh])) == 2
    assert any("queued again" in line for line in lines)
    assert "retry of trial 0" in (out_dir / "leaderboard.csv").read_text()


def test_space_sets_mixer_options_on_the_base_preset():
    base = OmegaConf.to_container(compose_config(["model=mega"]).model, resolve=True)
    space = SearchSpace.from_config({"repeats": [1, 2], "chunk_size": [16, 32], "ema_order": [4, 8], "tcn_kernel": [2, 3]})
    candidate = space.suggest(optuna.trial.FixedTrial({"repeats": 2, "chunk_size": 32, "ema_order": 4}), base)
    gated = candidate.model_config["mixers"]["mega"]
    assert candidate.model_config["depth"] == 2 and gated["chunk_size"] == 32
    assert gated["local_options"] == {"order": 4, "chunk_size": 32}  # tcn_kernel is not asked: no TCN here
    assert candidate.summary == "mega ×2 d=128"

    space = SearchSpace.from_config({"mixers": ["tcn", "ema"], "pattern_length": [2], "d_model": [16], "tcn_kernel": [3], "tcn_depth": [2]})
    candidate = space.suggest(optuna.trial.FixedTrial({"pattern_length": 2, "layer_0": "tcn", "layer_1": "tcn", "d_model": 16,
                                                       "tcn_kernel": 3, "tcn_depth": 2}), base)
    assert candidate.model_config["layers"] == ["tcn", "tcn"] and list(candidate.model_config["mixers"]) == ["tcn"]
    assert candidate.model_config["mixers"]["tcn"].items() >= {"kernel_size": 3, "dilation_base": 3, "depth": 2}.items()
    model = seqmix.instantiate_model(candidate.model_config)
    assert model(torch.randint(0, 256, (1, 12))).shape == (1, 12, 256)


def test_bad_search_configs_name_the_valid_choices(tmp_path):
    with pytest.raises(SeqmixError, match=r"search='nope'.*'mqar'.*'tiny'"):
        compose_search_config("nope")
    with pytest.raises(SeqmixError, match=r"search.space.mixers='lstm'.*'softmax_attention'.*'tcn'"):
        SearchSpace.from_config({"mixers": ["tcn", "lstm"]})
    with pytest.raises(SeqmixError, match=r"no entry 'width'.*'d_model'"):
        SearchSpace.from_config({"width": [16]})
    with pytest.raises(SeqmixError, match=r"search.space: d_model=16.5"):
        SearchSpace.from_config({"d_model": [16.5]})
    with pytest.raises(SeqmixError, match=r"search.objectives='speed'.*'latency'.*'metric'.*'params'"):
        SearchSettings.from_config(tiny(tmp_path, "search.objectives=[metric,speed]").search)
    with pytest.raises(SeqmixError, match=r"search.sampler='cmaes'.*'nsga2'.*'tpe'"):
        SearchSettings.from_config(tiny(tmp_path, "search.sampler=cmaes").search)
    with pytest.raises(SeqmixError, match=r"search has no option 'trials'.*'n_trials'"):
        SearchSettings.from_config(tiny(tmp_path, "+search.trials=3").search)
    with pytest.raises(SeqmixError, match=r"runtime='tflite'.*'executorch'.*'onnxruntime'"):
        check_runtime("tflite")
    # "tensorrt" is torch-tensorrt's torch.compile backend, which times no deployed graph.
    with pytest.raises(SeqmixError, match=r"search.runtime='tensorrt'.*'onnxruntime_tensorrt'"):
        check_runtime("tensorrt", field="search.runtime")
    with pytest.raises(SeqmixError, match="latency but no latency measurement"):
        run_search(tiny(tmp_path))


def test_pruning_is_used_for_one_objective_only(tmp_path):
    single = SearchSettings.from_config(tiny(tmp_path, "search.objectives=[metric]", "search.pruner=median").search)
    multi = SearchSettings.from_config(tiny(tmp_path, "search.pruner=median").search)
    assert isinstance(make_pruner(single), optuna.pruners.MedianPruner)
    assert isinstance(make_pruner(multi), optuna.pruners.NopPruner)


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is not None, reason="tensorrt is installed")
def test_tensorrt_runtime_without_tensorrt_names_the_package():
    with pytest.raises(SeqmixError, match="needs the tensorrt package.*pip install tensorrt"):
        check_runtime("onnxruntime_tensorrt")


def test_onnxruntime_latency_times_a_verified_export_padded_to_whole_chunks(tmp_path):
    pytest.importorskip("onnxruntime")
    config = compose_config(["model=ema_conv", "model.d_model=16", "model.depth=1", "model.vocab_size=32",
                             "model.mixers.ema.chunk_size=16", "model.mixers.ema.impl=recurrent"])
    model = seqmix.instantiate_model(config.model)
    latency = deployed_latency(model, "onnxruntime", length=20, repeats=2, work_dir=tmp_path)
    assert latency.runs == 2 and 0 < latency.low_ms <= latency.median_ms <= latency.high_ms
    assert (tmp_path / "model.onnx").is_file()
    assert model.blocks[0].mixer.impl == "recurrent"  # the caller's model is not switched to its exportable path
