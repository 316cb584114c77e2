"""Scale out on this machine: training across two torchrun "nodes" against one process, and sweeps and
search workers launched through submitit's local executor.

    python tools/measure_scale_out.py [--steps 20] [--out tools/perf]

- Multi-node equality: the same run (mega, byte_lm) as one process and as two torchrun launches of one
  process each (``--nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d`` on localhost, a free port), both
  with the same global batch; per-step training losses, the final evaluation and the largest weight
  difference, side by side.
- Launcher: a 2-job sweep (``seqmix train -m hydra/launcher=local``) and a 2-worker search
  (``seqmix search -m hydra/launcher=local search=tiny search.worker=0,1``): what each job wrote, the
  study's trials, which worker ran each and whether any parameters ran twice.

Every process runs one thread (OMP_NUM_THREADS=1). Writes scale_out.md and scale_out.json; the load
average is recorded before and after, since the machine may be shared.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from seqmix.errors import writable_dir_argument

ROOT = Path(__file__).resolve().parent.parent
SEQMIX = [sys.executable, "-m", "seqmix"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(command: list[str], timeout: float = 900) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=timeout)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {shlex.join(command)}\n{done.stderr[-3000:]}")
    return done, time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def torchrun_nodes(overrides: list[str], nodes: int = 2) -> tuple[list[str], float]:
    """Start ``nodes`` torchrun launches at once, one process each; torchrun's options (as every node
    gets them), and the wall time."""
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    options = [f"--nnodes={nodes}", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}",
               f"--rdzv-id={run_id}"]
    commands = [[sys.executable, "-m", "torch.distributed.run", *options, f"--node-rank={rank}", "-m", "seqmix", "train",
                 *overrides] for rank in range(nodes)]
    started = time.perf_counter()
    processes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
                 for c in commands]
    try:
        outputs = [p.communicate(timeout=900) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    for process, (_, err) in zip(processes, outputs):
        if process.returncode:
            raise SystemExit(f"a node failed ({process.returncode}):\n{err[-3000:]}")
    return options, time.perf_counter() - started


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    from seqmix.training.checkpoints import latest_checkpoint

    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def multinode(work: Path, steps: int) -> dict:
    common = [
        "model=mega", "model.d_model=64", "model.depth=2", "task=byte_lm", "task.seq_len=128",
        f"task.cache_dir={work / 'cache'}", "task.max_bytes=400000", "train.batch_size=8", f"train.max_steps={steps}",
        "train.warmup_steps=2", f"train.eval_every={steps // 2}", "train.eval_batches=2", f"train.checkpoint_every={steps}",
        "train.log_every=1", "train.progress=false", "train.device=cpu",
    ]
    single_command = [*SEQMIX, "train", *common, f"train.out_dir={work / 'one'}"]
    _, single_s = run(single_command)
    torchrun_options, nodes_s = torchrun_nodes([*common, f"train.out_dir={work / 'two'}"])
    one, two = metric_rows(work / "one"), metric_rows(work / "two")
    if [(r["step"], r["split"]) for r in one] != [(r["step"], r["split"]) for r in two]:
        raise SystemExit("the two runs logged different steps")
    a, b = weights(work / "one"), weights(work / "two")
    # As a reader would type them: runs/ for the temporary directory, PORT and ID for this run's free port and id.
    shown = [o.replace(str(work), "runs") for o in common]
    placeholders = {"--rdzv-endpoint": "localhost:PORT", "--rdzv-id": "ID"}
    shown_options = [f"{name}={placeholders.get(name, value)}" for name, value in (o.split("=", 1) for o in torchrun_options)]
    return {
        "single_command": shlex.join(["OMP_NUM_THREADS=1", "seqmix", "train", *shown, "train.out_dir=runs/one"]),
        "node_command": shlex.join(["OMP_NUM_THREADS=1", "torchrun", *shown_options, "-m", "seqmix", "train", *shown,
                                    "train.out_dir=runs/two"]) + "   # on each node at once",
        "single_s": single_s,
        "nodes_s": nodes_s,
        "rows": [{"step": x["step"], "split": x["split"], "one": x["loss"], "two": y["loss"]} for x, y in zip(one, two)],
        "max_abs_loss_difference": max(abs(x["loss"] - y["loss"]) for x, y in zip(one, two)),
        "max_rel_loss_difference": max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(one, two)),
        "max_abs_weight_difference": max(float((a[k] - b[k]).abs().max()) for k in a),
        "parameters": sum(t.numel() for t in a.values()),
    }


def launcher(work: Path) -> dict:
    import optuna

    tiny = [
        "model=mega", "model.d_model=16", "model.depth=1", "task=mqar", "task.vocab_size=64", "task.seq_len=32",
        "task.num_pairs=4", "train.batch_size=4", "train.warmup_steps=1", "train.eval_every=5", "train.eval_batches=1",
        "train.checkpoint_every=10", "train.log_every=5", "train.progress=false", "train.device=cpu",
    ]
    sweep_args = ["train", "-m", "hydra/launcher=local", *tiny, "train.max_steps=5,10"]
    _, sweep_s = run([*SEQMIX, *sweep_args, f"train.out_dir={work / 'sweep'}"])
    jobs = []
    for job_dir in sorted((work / "sweep").iterdir()):
        if job_dir.name.isdigit():
            final = metric_rows(job_dir)[-1]
            jobs.append({"job": int(job_dir.name), "step": final["step"], "valid_loss": final["loss"],
                         "accuracy": final["accuracy"]})
    search_args = ["search", "-m", "hydra/launcher=local", "search=tiny", "search.worker=0,1"]
    _, search_s = run([*SEQMIX, *search_args, f"search.out_dir={work / 'search'}"])
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{work / 'search' / 'study.db'}")
    logs = sorted((work / "search" / "workers" / ".submitit").glob("*/*_log.out"))
    per_worker = [int(log.read_text().split("this worker ran ")[1].split()[0]) for log in logs]
    # A claim that lost the race for the last place is failed with a not_run note and never trained.
    params = [json.dumps(t.params, sort_keys=True) for t in study.trials if "not_run" not in t.user_attrs]
    return {
        "sweep_command": shlex.join(["seqmix", *sweep_args, "train.out_dir=runs/sweep"]),
        "sweep_s": sweep_s,
        "sweep_jobs": jobs,
        "search_command": shlex.join(["seqmix", *search_args, "search.out_dir=runs/search/tiny"]),
        "search_s": search_s,
        "trials": [{"number": t.number, "state": t.state.name, "values": t.values} for t in study.trials],
        "trials_per_worker": per_worker,
        "repeated_parameters": len(params) - len(set(params)),
    }


def report(result: dict) -> str:
    node, launch = result["multinode"], result["launcher"]
    lines = [
        "# Scale out on this machine: two torchrun nodes against one process; launched sweeps and search workers",
        "",
        f"Generated by `python tools/measure_scale_out.py --steps {result['steps']}` on {result['machine']}; "
        f"load average {result['load_before']} before, {result['load_after']} after (the machine may be shared). "
        "One thread per process. Wall times are single runs, including each process's start-up, not benchmarks.",
        "",
        "## Two nodes of one process against one process (same global batch)",
        "",
        f"One process (`{node['single_command']}`): {node['single_s']:.1f} s.  ",
        f"Two nodes (`{node['node_command']}`): {node['nodes_s']:.1f} s.",
        "",
        "| step | split | loss, one process | loss, two nodes | difference |",
        "|---:|---|---:|---:|---:|",
    ]
    lines += [f"| {r['step']} | {r['split']} | {r['one']:.7f} | {r['two']:.7f} | {r['two'] - r['one']:+.1e} |" for r in node["rows"]]
    lines += [
        "",
        f"Largest loss difference {node['max_abs_loss_difference']:.1e} (relative {node['max_rel_loss_difference']:.1e}); "
        f"largest difference of the {node['parameters']:,} trained weights {node['max_abs_weight_difference']:.1e} "
        "(float32 summation order; the tests allow 1e-5 relative on losses).",
        "",
        "## A 2-job sweep through submitit's local executor",
        "",
        f"`{launch['sweep_command']}`: {launch['sweep_s']:.1f} s.",
        "",
        "| job | final step | valid loss | accuracy |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {j['job']} | {j['step']} | {j['valid_loss']:.4f} | {j['accuracy']:.3f} |" for j in launch["sweep_jobs"]]
    lines += [
        "",
        "## Two search workers as two jobs of one sweep",
        "",
        f"`{launch['search_command']}`: {launch['search_s']:.1f} s. Trials run by each worker: "
        f"{launch['trials_per_worker']}; trials with repeated parameters: {launch['repeated_parameters']}.",
        "",
        "| trial | state | objectives |",
        "|---:|---|---|",
    ]
    lines += [f"| {t['number']} | {t['state']} | {t['values']} |" for t in launch["trials"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps of the multi-node comparison (even)")
    parser.add_argument("--out", type=writable_dir_argument, default=ROOT / "tools" / "perf")
    args = parser.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as work:
        result = {
            "steps": args.steps,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "load_before": load_before,
            "multinode": multinode(Path(work) / "multinode", args.steps),
            "launcher": launcher(Path(work) / "launcher"),
        }
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale_out.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "scale_out.md").write_text(report(result))
    print(report(result))
    print(f"wrote {args.out / 'scale_out.md'} and {args.out / 'scale_out.json'}")


if __name__ == "__main__":
    main()
