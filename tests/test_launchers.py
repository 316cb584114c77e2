"""Sweeps and search workers through Hydra's submitit launcher: the local executor runs the jobs as
separate processes here, as SLURM runs them on a cluster (conf/hydra/launcher/)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
from omegaconf import OmegaConf

from seqmix.cli import main
from seqmix.configs import compose_config

from conftest import SEQMIX

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the launcher extra: pip install 'seqmix[launcher]'")

TINY_TRAIN = [
    "model=mega", "model.d_model=16", "model.depth=1", "task=mqar", "task.vocab_size=64", "task.seq_len=32",
    "task.num_pairs=4", "train.batch_size=4", "train.warmup_steps=1", "train.eval_every=3", "train.eval_batches=1",
    "train.checkpoint_every=3", "train.log_every=1", "train.progress=false", "train.device=cpu",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def seqmix(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SEQMIX, *arguments], capture_output=True, text=True, env=ENV, timeout=300)


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_sweep_through_the_local_executor_runs_each_job_in_its_own_process_and_run_directory(tmp_path):
    sweep = tmp_path / "sweep"
    done = seqmix("train", "-m", "hydra/launcher=local", *TINY_TRAIN, "train.max_steps=3,4", f"train.out_dir={sweep}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Submitit 'local'" in done.stdout + done.stderr
    steps = {}
    for job in (0, 1):
        run = rows(sweep / str(job))
        final = run[-1]
        assert [r["step"] for r in run if r["split"] == "train"] == list(range(1, final["step"] + 1))
        assert final["split"] == "valid" and 0 <= final["accuracy"] <= 1
        steps[job] = final["step"]
        assert (sweep / str(job) / "checkpoints" / f"step-{final['step']:08d}").is_dir()
    assert sorted(steps.values()) == [3, 4]
    # Each job ran in a process of its own, and said so in its own log.
    logs = sorted(sweep.glob(".submitit/*/*_log.out"))
    assert len(logs) == 2 and all("Job completed successfully" in log.read_text() for log in logs)


@pytest.mark.slow
def test_a_bad_value_in_a_launched_job_gets_one_short_message_naming_it(tmp_path):
    done = seqmix("train", "-m", "hydra/launcher=local", *TINY_TRAIN, "train.max_steps=3", "train.lr=-1",
                  f"train.out_dir={tmp_path / 'sweep'}")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "seqmix train: error: train.lr=-1 is not valid" in done.stderr, done.stderr[-3000:]


def test_two_search_workers_launched_as_two_jobs_share_one_study(tmp_path):
    import optuna

    out_dir = tmp_path / "search"
    done = seqmix("search", "-m", "hydra/launcher=local", "search=tiny", "search.worker=0,1", f"search.out_dir={out_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out_dir / 'study.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    # A claim that lost the race for the last place is recorded as failed, never trained.
    assert all("not_run" in t.user_attrs for t in study.trials if t not in complete)
    assert len({t.number for t in complete}) == 3
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 3
    # Only the trials that ran have a run directory.
    assert sorted(p.name for p in (out_dir / "trials").iterdir()) == [f"{t.number:04d}" for t in sorted(complete, key=lambda t: t.number)]
    for trial in complete:
        run = rows(out_dir / "trials" / f"{trial.number:04d}")
        assert run[-1]["split"] == "valid" and run[-1]["step"] == 6
    # Both workers ran to the end as jobs of one sweep, which kept Hydra's files beside the study.
    logs = sorted(out_dir.glob("workers/.submitit/*/*_log.out"))
    assert len(logs) == 2 and all("Job completed successfully" in log.read_text() for log in logs)
    ran = [int(log.read_text().split("this worker ran ")[1].split()[0]) for log in logs]
    assert sum(ran) == 3
    assert (out_dir / "leaderboard.md").is_file()


def test_a_launcher_preset_without_the_launcher_extra_names_the_extra(tmp_path, monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.hydra_submitit") else real_find_spec(name, *a))
    status = main(["train", "-m", "hydra/launcher=slurm", *TINY_TRAIN, "train.max_steps=1,2", f"train.out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert status == 2 and "hydra/launcher=slurm needs Hydra's submitit launcher: pip install 'seqmix[launcher]'" in err
    assert not any(tmp_path.iterdir())


def test_the_slurm_form_in_the_docs_becomes_these_sbatch_lines(tmp_path, monkeypatch):
    """What hydra/launcher=slurm with a partition, GPUs and a time limit asks sbatch for, without a cluster:
    submitit's own SLURM executor writes the batch script from the composed launcher options."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    # submitit refuses to build a SLURM executor where there is no srun; a stand-in is enough to write the script.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = compose_config([
        "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2",
        "hydra.launcher.timeout_min=90", "hydra.launcher.cpus_per_task=8", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ], with_choices=True)
    launcher = instantiate(config.hydra.launcher)
    # The launcher's own split of its options into the executor's (see BaseSubmititLauncher.launch).
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    options = {key: value for key, value in launcher.params.items() if key not in {"submitit_folder", "max_num_timeout"}}
    executor = submitit.AutoExecutor(cluster="slurm", folder=launcher.params["submitit_folder"])
    executor.update_parameters(**{key if key in shared else f"slurm_{key}": value for key, value in options.items()})
    script = executor._executor._make_submission_file_text("python -m seqmix", "job")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --time=90", "#SBATCH --cpus-per-task=8",
                 "export OMP_NUM_THREADS=8"):
        assert line in script, script

