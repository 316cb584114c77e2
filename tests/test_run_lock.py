"""The run directory's lock: one training process per train.out_dir, refused with the holder's pid,
released when the holder exits or is killed, and invisible to the tools that read runs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from seqmix import SeqmixError
from seqmix.training.checkpoints import latest_checkpoint, load_run
from seqmix.training.loop import LOCK, run_dir_lock
from seqmix.training.runs import collect_runs

from test_training import metric_rows, run, small

TINY = ("model.d_model=16", "model.depth=1", "train.batch_size=2", "train.eval_batches=1")

# Another process holding a run directory's lock, as a training run does, until its stdin closes.
HOLDER = textwrap.dedent("""
    import sys
    from seqmix.training.loop import run_dir_lock
    with run_dir_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()
""")


def hold(out_dir) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_is_refused_naming_the_holder_and_trains_once_it_has_exited(tmp_path):
    out_dir = tmp_path / "run"
    run(small(tmp_path, *TINY, "train.max_steps=2"))
    rows = metric_rows(out_dir)
    holder = hold(out_dir)
    try:
        with pytest.raises(SeqmixError, match=rf"in use: the process with pid {holder.pid} is training into it"):
            run(small(tmp_path, *TINY, "train.max_steps=3", "train.resume=true"))
        assert metric_rows(out_dir) == rows, "the refused run must not touch the holder's run"
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    run(small(tmp_path, *TINY, "train.max_steps=3", "train.resume=true"))
    assert [row["step"] for row in metric_rows(out_dir) if row["split"] == "train"] == [1, 2, 3]


def test_the_lock_of_a_killed_holder_is_released(tmp_path):
    holder = hold(tmp_path / "run")
    with pytest.raises(SeqmixError, match=f"pid {holder.pid}"):
        run(small(tmp_path, *TINY, "train.max_steps=1"))
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    experiment, result = run(small(tmp_path, *TINY, "train.max_steps=1"))
    assert result.steps == 1 and (tmp_path / "run" / "run.json").is_file()


def test_one_process_cannot_take_the_lock_twice_and_a_failed_run_releases_it(tmp_path):
    with run_dir_lock(tmp_path / "run"):
        with pytest.raises(SeqmixError, match=f"pid {os.getpid()}"):
            run(small(tmp_path, *TINY, "train.max_steps=1"))
    # Refused after the lock: nothing to resume in a directory this run created, which it removes again.
    with pytest.raises(SeqmixError, match="holds no run to resume"):
        run(small(tmp_path, *TINY, "train.max_steps=1", "train.resume=true", out="fresh"))
    assert not (tmp_path / "fresh").exists()
    run(small(tmp_path, *TINY, "train.max_steps=1", out="fresh"))


def test_the_lock_file_is_invisible_to_loading_gathering_and_resuming(tmp_path):
    out_dir = tmp_path / "runs" / "a"
    run(small(tmp_path, *TINY, "train.max_steps=2", out="runs/a"))
    assert (out_dir / LOCK).is_file()
    model, record = load_run(out_dir)
    assert latest_checkpoint(out_dir).name == "step-00000002" and record["task"]
    assert [row["run"] for row in collect_runs(tmp_path / "runs").rows] == [str(out_dir)]
    run(small(tmp_path, *TINY, "train.max_steps=3", "train.resume=true", out="runs/a"))
    assert latest_checkpoint(out_dir).name == "step-00000003"
