"""Architecture search (seqmix.search, seqmix search, seqmix.export.latency) on conf/search/tiny.yaml:
a whole study and its report, two workers sharing one study, claims of racing workers, failing and
abandoned trials, the space's mapping onto model configs, and the errors of bad search configs."""
from __future__ import annotations

import csv
import os
import sqlite3
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

optuna = pytest.importorskip("optuna")
pytest.importorskip("matplotlib")

import seqmix  # noqa: E402
from seqmix import SeqmixError  # noqa: E402
from seqmix.configs import compose_config  # noqa: E402
from seqmix.training.experiment import build_experiment  # noqa: E402
from seqmix.search import SearchSettings, SearchSpace, compose_search_config, run_search  # noqa: E402
from seqmix.search.claims import NOT_RUN, RETRY_OF, HeartbeatJournalStorage, RetryTrial, budget_spent, budget_trials, keep_claim  # noqa: E402
from seqmix.search.settings import make_pruner  # noqa: E402

from seqmix.export.latency import check_runtime, deployed_latency  # noqa: E402

from conftest import SEQMIX, examples  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Trains a one-layer TCN at lr = 1e9: the loss is NaN at the second step, every time.
DIVERGING_TRIAL = "{pattern_length: 1, layer_0: tcn, d_model: 16, tcn_kernel: 2, tcn_depth: 2, lr: 1.0e9}"


def tiny(out_dir: Path, *overrides: str):
    return compose_search_config("tiny", [f"search.out_dir={out_dir}", *overrides])


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
    # The tiny trials take well under a second each: whole seconds would read 0.
    assert all(0 < float(row["seconds"]) < 60 for row in csv.DictReader(csv_lines))
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

    # The report again (the study is complete): presets of this study replaced, a user's files beside them
    # kept (the glob tiny_trial*.yaml deleted them).
    mine = [preset.with_name(f"{preset.stem}_tuned.yaml"), preset.with_name("tiny_trials_notes.yaml")]
    for path in mine:
        path.write_text("mine: 1\n")
    assert run_search(tiny(out_dir), measure_latency=deployed_latency, log=lines.append).trials_run == 0
    assert all(path.read_text() == "mine: 1\n" for path in mine)
    # Another study in the same folder: its trial 0 replaced this study's trials/0000, and its report this one's.
    runs = {path: path.read_bytes() for path in (out_dir / "trials").rglob("*") if path.is_file()}
    with pytest.raises(SeqmixError, match=r"holds the runs of study 'tiny'; this search is study 'other', whose trials would "
                                          r"replace them: choose another search.out_dir, or search.study_name=tiny"):
        run_search(tiny(out_dir, "search.study_name=other"), measure_latency=deployed_latency, log=lines.append)
    assert {path: path.read_bytes() for path in (out_dir / "trials").rglob("*") if path.is_file()} == runs


def test_a_diverging_trial_fails_and_the_study_goes_on_with_intermediate_reports(tmp_path):
    out_dir = tmp_path / "search"
    # On a journal file, the storage for studies shared through a network disk.
    # Without weight decay: lr = 1e9 with it is refused before the trial trains (lr × weight_decay >= 1).
    config = tiny(out_dir, f"search.storage=journal:{tmp_path / 'journal' / 'study.log'}", "search.objectives=[metric]", "search.pruner=median",
                  "train.weight_decay=0",
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


def abandon_a_trial(storage_url: str, config) -> None:
    """Leave what a worker killed during trial 0 leaves: a running trial whose last heartbeat is an hour old."""
    if storage_url.startswith("journal:"):
        storage = HeartbeatJournalStorage(optuna.storages.journal.JournalFileBackend(storage_url.removeprefix("journal:")), 1, 3)
    else:
        storage = optuna.storages.RDBStorage(storage_url)
    study = optuna.create_study(storage=storage, study_name="tiny", direction="maximize")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        abandoned = study.ask()
    SearchSettings.from_config(config.search).space.suggest(abandoned, OmegaConf.to_container(config.model, resolve=True))
    if isinstance(storage, HeartbeatJournalStorage):
        storage.set_trial_system_attr(abandoned._trial_id, "heartbeat", time.time() - 3600)
        return
    storage.record_heartbeat(abandoned._trial_id)
    # Optuna's RDB storages keep heartbeats in this table, in the database's clock (UTC for SQLite).
    with sqlite3.connect(storage_url.removeprefix("sqlite:///")) as database:
        database.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour')")


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_a_trial_left_running_by_a_killed_worker_is_failed_and_rerun_with_its_parameters(tmp_path, storage):
    out_dir = tmp_path / "search"
    out_dir.mkdir(parents=True)
    url = f"sqlite:///{out_dir / 'study.db'}" if storage == "sqlite" else f"journal:{out_dir / 'study.log'}"
    config = tiny(out_dir, "search.objectives=[metric]", "search.n_trials=2", f"search.storage={url}")
    abandon_a_trial(url, config)

    lines = []
    outcome = run_search(config, log=lines.append)

    killed, retry, fresh = outcome.study.trials
    assert killed.state == optuna.trial.TrialState.FAIL
    assert retry.state == fresh.state == optuna.trial.TrialState.COMPLETE
    assert retry.params == killed.params and retry.system_attrs[RETRY_OF] == 0
    assert len(budget_trials([killed, retry, fresh])) == 2
    assert any(line == "trial 0: its worker stopped (no heartbeat); queued again" for line in lines)
    leaderboard = (out_dir / "leaderboard.csv").read_text()
    assert "retry of trial 0" in leaderboard and "its worker stopped (no heartbeat)" in leaderboard


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_claims_of_racing_and_dying_workers_fill_exactly_n_trials_places_and_run_no_trial_twice(data):
    """Workers interleaved step by step as drawn: observe the study, ask for a trial, keep or refuse
    the claim, then finish it or die in it. Whatever the order, the study ends with exactly n_trials
    complete trials, and a parameter set runs again only as the retry of a trial whose worker died."""
    n_trials, n_workers = data.draw(st.integers(1, 4), label="n_trials"), data.draw(st.integers(2, 4), label="workers")
    deaths = data.draw(st.integers(0, n_workers - 1), label="deaths")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    storage = study._storage
    retry = RetryTrial(retries=deaths, log=lambda line: None)
    if data.draw(st.booleans(), label="search.enqueue queued by two workers at once"):
        study.enqueue_trial({"x": 0.5})
        study.enqueue_trial({"x": 0.5})
    states, claims, runs, dead = ["observe"] * n_workers, [None] * n_workers, [], []
    for step in range(2000):
        live = [index for index, state in enumerate(states) if state not in ("done", "dead")]
        if not live:
            break
        # Drawn first, then in turn, so that every run ends.
        index = data.draw(st.sampled_from(live), label="worker") if step < 60 else live[step % len(live)]
        state = states[index]
        if state == "observe":
            # fail_stale_trials, once the dead workers' heartbeats are older than the grace period.
            if dead and (step >= 60 or data.draw(st.booleans(), label="grace period over")):
                for trial in dead:
                    storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
                    retry(study, storage.get_trial(trial._trial_id))
                dead = []
            trials = study.get_trials(deepcopy=False)
            if not budget_spent(trials, n_trials):
                states[index] = "ask"
            elif not any(t.state == optuna.trial.TrialState.RUNNING for t in trials):
                states[index] = "done"
        elif state == "ask":
            claims[index], states[index] = study.ask(), "claimed"
        elif state == "claimed":
            if keep_claim(study, claims[index], n_trials, log=lambda line: None):
                claims[index].suggest_float("x", 0.0, 1.0)
                runs.append(claims[index].number)
                states[index] = "running"
            else:
                states[index] = "observe"
        elif len(dead) + states.count("dead") < deaths and data.draw(st.booleans(), label="dies in its trial"):
            states[index] = "dead"
            dead.append(claims[index])
        else:
            study.tell(claims[index], 1.0)
            states[index] = "observe"
    assert all(state in ("done", "dead") for state in states)

    trials = {t.number: t for t in study.get_trials()}
    assert [t.number for t in trials.values() if t.state == optuna.trial.TrialState.COMPLETE] == sorted(
        n for n in runs if trials[n].state == optuna.trial.TrialState.COMPLETE)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials.values()) == n_trials
    assert len(runs) == len(set(runs)) == n_trials + states.count("dead")
    assert all(NOT_RUN in t.user_attrs and t.state == optuna.trial.TrialState.FAIL for n, t in trials.items() if n not in runs)
    # A parameter set that ran twice is a trial whose worker died and its retries, and nothing else.
    by_params = {}
    for number in runs:
        by_params.setdefault(trials[number].params["x"], []).append(trials[number])
    for group in by_params.values():
        first, *again = sorted(group, key=lambda t: t.number)
        assert all(t.system_attrs.get(RETRY_OF) == first.number for t in again)
        assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in group) == 1


def test_a_search_whose_every_trial_failed_exits_1(tmp_path):
    """It exited 0 after "no completed trial": a width no attention head count divides fails every
    trial where the model is built, which a script running the search could not tell from success."""
    search = subprocess.run(
        [*SEQMIX, "search", "search=tiny", f"search.out_dir={tmp_path}", "search.n_trials=1", "search.objectives=[metric]",
         "search.space.d_model=[7]", "search.space.mixers=[softmax_attention]"],
        capture_output=True, text=True, env=ENV, timeout=600)
    assert search.returncode == 1, search.stderr[-2000:]
    assert "trial 0: " in search.stdout and ": failed: SeqmixError:" in search.stdout
    assert "seqmix search: error: no trial of study 'tiny' completed" in search.stderr


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
    # A string was read one character at a time: "cannot read the override ... Error parsing override 's'".
    with pytest.raises(SeqmixError, match=r"overrides='search.n_trials=2' is not valid; expected a list of strings"):
        compose_search_config("tiny", "search.n_trials=2")
    with pytest.raises(SeqmixError, match=r"search.space.mixers='lstm'.*'softmax_attention'.*'tcn'"):
        SearchSpace.from_config({"mixers": ["tcn", "lstm"]})
    with pytest.raises(SeqmixError, match=r"no entry 'width'.*'d_model'"):
        SearchSpace.from_config({"width": [16]})
    with pytest.raises(SeqmixError, match=r"search.space: d_model=16.5"):
        SearchSpace.from_config({"d_model": [16.5]})
    # A repeated choice was drawn twice as often, without a word.
    with pytest.raises(SeqmixError, match=r"search.space.mixers=\['tcn', 'tcn'\] lists 'tcn' more than once"):
        SearchSpace.from_config({"mixers": ["tcn", "tcn"]})
    with pytest.raises(SeqmixError, match=r"search.space.d_model=\[16, 32, 16\] lists 16 more than once"):
        SearchSpace.from_config({"d_model": [16, 32, 16]})
    with pytest.raises(SeqmixError, match=r"search.objectives='speed'.*'latency'.*'metric'.*'params'"):
        SearchSettings.from_config(tiny(tmp_path, "search.objectives=[metric,speed]").search)
    # A list among the names was an unhashable TypeError from the duplicate check; a name alone is no list.
    with pytest.raises(SeqmixError, match=r"search.objectives=\['metric'\] is not valid"):
        SearchSettings.from_config(tiny(tmp_path, "search.objectives=[[metric]]").search)
    with pytest.raises(SeqmixError, match=r"search.objectives='metric' must be a list"):
        SearchSettings.from_config(tiny(tmp_path, "search.objectives=metric").search)
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
    # A storage file's folder is checked with the settings, before any worker opens it: here a file
    # stands where the folder should be.
    (tmp_path / "a_file").write_text("")
    for url in (f"sqlite:///{tmp_path}/a_file/study.db", f"journal:{tmp_path}/a_file/study.log"):
        with pytest.raises(SeqmixError, match=r"search.storage file='.*a_file/study.*' is not valid: .*is a file, not a folder"):
            SearchSettings.from_config(tiny(tmp_path, f"search.storage='{url}'").search)


@pytest.mark.parametrize("name", ["../../../escaped", "a/b", "", "*", ".hidden", "a b", "x" * 101])
def test_a_study_name_that_is_no_plain_file_name_is_refused_before_anything_is_written(tmp_path, name):
    """The name becomes the study's folder, its preset files' names and a glob for its old presets:
    '../x' wrote presets outside search.out_dir, '*' would have matched another study's."""
    config = tiny(tmp_path, f"search.study_name='{name}'", f"search.out_dir={tmp_path / 'search'}")
    with pytest.raises(SeqmixError, match=r"search.study_name=.* is not valid; expected 1 to 100 letters"):
        SearchSettings.from_config(config.search)
    assert not (tmp_path / "search").exists()


def test_pruning_is_used_for_one_objective_only_and_options_of_no_pruner_are_refused(tmp_path):
    single = SearchSettings.from_config(tiny(tmp_path, "search.objectives=[metric]", "search.pruner=median").search)
    multi = SearchSettings.from_config(tiny(tmp_path, "search.pruner=median").search)
    assert isinstance(make_pruner(single), optuna.pruners.MedianPruner)
    assert isinstance(make_pruner(multi), optuna.pruners.NopPruner)
    # Options given with search.pruner=none went nowhere without a word.
    with pytest.raises(SeqmixError, match=r"search.pruner_options=\{'n_warmup_steps': 2\} would not be used: search.pruner=none"):
        SearchSettings.from_config(tiny(tmp_path, "++search.pruner_options={n_warmup_steps: 2}").search)
    assert not (tmp_path / "search").exists()


@pytest.mark.parametrize("overrides, message", [
    (["search.seed=-1"], r"search: seed=-1 is not valid; expected an integer >= 0"),
    (["search.seed=1.5"], r"search: seed=1.5 is not valid"),
    (["+search.sampler_options.bogus=1"], r"search.sampler_options=\{'bogus': 1\} do not fit search.sampler=tpe"),
    (["search.objectives=[metric]", "search.pruner=median", "+search.pruner_options.bogus=1"],
     r"search.pruner_options=\{'bogus': 1\} do not fit search.pruner=median"),
    # Unused by a study of two objectives, but refused all the same.
    (["search.pruner=median", "+search.pruner_options.bogus=1"], r"search.pruner_options=\{'bogus': 1\} do not fit"),
    # A trial to queue: a name outside the space was ignored, a choice outside it failed the trial.
    (["search.enqueue=[{bogus: 7}]"], r"search.enqueue\[0\]: 'bogus' is no parameter of this search's trials; they have \['layer_<i>'"),
    (["search.enqueue=[{d_model: 16}, {d_model: 7}]"], r"search.enqueue\[1\]: d_model=7 is not one of search.space.d_model=\[16, 32\]"),
    (["search.enqueue=[{layer_0: lstm}]"], r"search.enqueue\[0\]: layer_0='lstm' is not one of search.space.mixers"),
    (["search.enqueue=[{lr: fast}]"], r"search.enqueue\[0\]: lr='fast' is not valid; search.space.lr is a range of numbers"),
])
def test_sampler_and_pruner_settings_are_refused_before_the_study_is_stored(tmp_path, overrides, message):
    """The study's SQLite file was created before a bad seed or option was refused, and the seed's error
    said the new file could not be read as a study."""
    with pytest.raises(SeqmixError, match=message):
        SearchSettings.from_config(tiny(tmp_path / "search", *overrides).search)
    assert not (tmp_path / "search").exists()


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


def test_an_interrupted_trial_is_told_as_queued_again_not_as_a_run_to_resume(tmp_path, monkeypatch):
    """The leaderboard's note for a trial a signal stopped was training's own: 'continue with
    train.resume=true', which a search does not do (it queues the trial again and starts it afresh)."""
    import seqmix.search.trial as trial_module
    from seqmix.errors import TrainingStopped

    def stopped(trial, context):
        raise TrainingStopped("SIGINT", 1, 3, None)

    monkeypatch.setattr(trial_module, "_run_trial", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_search(tiny(tmp_path / "search"), measure_latency=deployed_latency, log=lambda line: None)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'search' / 'study.db'}")
    (failed,) = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed.user_attrs["error"] == "interrupted (SIGINT); queued again, and resuming the search trains it afresh"
    assert any(t.state == optuna.trial.TrialState.WAITING for t in study.trials)
