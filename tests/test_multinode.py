"""Multi-node training: two torchrun "nodes" of one process each, meeting through a c10d rendezvous on
localhost, train exactly as one process does with the same global batch."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seqmix.cli import main
from seqmix.training.checkpoints import latest_checkpoint

from conftest import SEQMIX

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SUMMARY = "valid bits_per_byte"
"""A line of the summary that ``seqmix train`` prints at the end of a run, once per run."""


def common(tmp_path: Path, max_steps: int = 3) -> list[str]:
    return [
        "model=mega", "model.d_model=32", "model.depth=2", "task=byte_lm", "task.seq_len=64",
        f"task.cache_dir={tmp_path / 'cache'}", "task.max_bytes=200000", "train.batch_size=4",
        f"train.max_steps={max_steps}", "train.warmup_steps=1", "train.eval_every=3", "train.eval_batches=1",
        "train.checkpoint_every=3", "train.progress=false", "train.device=cpu", "train.log_every=1",
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def two_nodes(overrides_per_node: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Start one torchrun per node (``--nnodes=2 --nproc-per-node=1``) at once, rendezvous on a free local port."""
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
             f"--rdzv-endpoint=localhost:{port}", f"--rdzv-id={run_id}", f"--node-rank={rank}",
             *SEQMIX[1:], "train", *overrides],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True,
        )
        for rank, overrides in enumerate(overrides_per_node)
    ]
    done = []
    try:
        for node in nodes:
            out, err = node.communicate(timeout=300)
            done.append(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    finally:
        # A node left waiting (its peer failed to start) is ended with its worker: torchrun and its
        # process share a session of their own.
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    return done


def metric_rows(out_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """One process's 3-step run (in this process: no interpreter to start), and the overrides that made it."""
    root = tmp_path_factory.mktemp("multinode")
    overrides = common(root)
    assert main(["train", *overrides, f"train.out_dir={root / 'one'}"]) == 0
    return root / "one", overrides


def test_two_nodes_of_one_process_train_as_one_process_with_the_same_global_batch(single_run, tmp_path):
    one_dir, overrides = single_run
    two_dir = tmp_path / "two"
    nodes = two_nodes([[*overrides, f"train.out_dir={two_dir}"]] * 2)
    for node in nodes:
        assert node.returncode == 0, node.stderr[-3000:]
    one, two = metric_rows(one_dir), metric_rows(two_dir)
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two]
    assert one[-1]["split"] == "valid"
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["bits_per_byte"] == pytest.approx(b["bits_per_byte"], rel=1e-5, abs=1e-6)
    a = load_file(str(latest_checkpoint(one_dir) / "model.safetensors"))
    b = load_file(str(latest_checkpoint(two_dir) / "model.safetensors"))
    # Gradients agree to float32 summation order; Adam divides them by their own magnitude, so a
    # weight whose gradient is ~0 can move by a few 1e-6 differently (lr is 3e-3 here).
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=5e-5)
    # The run's summary (and sample) comes from rank 0 alone, not once per node.
    assert sum(SUMMARY in node.stdout for node in nodes) == 1, [node.stdout[-1500:] for node in nodes]


@pytest.mark.slow
def test_a_resume_where_the_nodes_see_different_checkpoints_is_refused_by_every_node(single_run, tmp_path):
    """A node that does not see the run directory rank 0 resumes from (no shared file system) would train
    other steps than the rest and hang them in a collective; every node refuses instead, naming both steps."""
    shared = tmp_path / "shared"
    shutil.copytree(single_run[0], shared)
    resume = [*common(single_run[0].parent, max_steps=4), "train.resume=true"]
    nodes = two_nodes([[*resume, f"train.out_dir={shared}"], [*resume, f"train.out_dir={tmp_path / 'elsewhere'}"]])
    for node in nodes:
        assert node.returncode != 0
        assert "step 3" in node.stderr and "step 0" in node.stderr and "train.out_dir" in node.stderr, node.stderr[-3000:]
    assert [row["step"] for row in metric_rows(shared)][-1] == 3
