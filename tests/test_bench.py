"""End-to-end check of the benchmark engine (export/bench/) on tiny grids: the runtime grid, the
operator sweep (conf/bench/operators.yaml), the paper claims, peers, and peak memory itself.

Rows, reasons, ratios, slopes, claims and files are checked; timings never are.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import platform
import re
import subprocess
from pathlib import Path

import pytest
import torch

import seqmix
from seqmix.export import bench
from seqmix.export.bench import PEERS, compose_bench_spec, plan_grid, run_claims, run_grid, write_claims, write_grid_results
from seqmix.export.bench import report as bench_report
from seqmix.export.bench import run as bench_run
from seqmix.export.bench.measure import pass_callables, peak_memory_bytes
from seqmix import SeqmixError
from seqmix.allocator import user_settings
from seqmix.contract import PASSES

from conftest import SEQMIX
from mixer_cases import runnable_impls

ROOT = Path(__file__).resolve().parents[1]
# The smoke grid, eager only: for the checks that do not need every runtime.
EAGER_ONLY = ["bench=smoke", "bench.runtimes=[eager]", "bench.presets=[]", "bench.progress=false"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """conf/bench/smoke.yaml with peers, run once: (spec, result, files written)."""
    out = tmp_path_factory.mktemp("smoke")
    spec = compose_bench_spec(["bench=smoke", "bench.peers=true", "bench.progress=false", f"bench.out_dir={out}"])
    result = run_grid(spec)
    return spec, result, write_grid_results(result, spec.out_dir)


def test_the_bench_replaces_only_an_earlier_benchs_files(smoke, tmp_path):
    """bench.out_dir's results.csv, report.md and the rest were written over whoever wrote them."""
    spec, _, written = smoke
    compose_bench_spec(["bench=smoke", f"bench.out_dir={spec.out_dir}"])  # its own earlier output: replaced
    for mode, name in (("smoke", "results.csv"), ("smoke", "report.md"), ("paper_claims", "claims.md"), ("lowering", "lowering.md")):
        folder = tmp_path / f"{mode}-{name}"
        folder.mkdir()
        (folder / name).write_text("mine\n")
        with pytest.raises(SeqmixError, match=rf"holds {re.escape(name)}, which this bench would replace, .* no record of an earlier seqmix bench"):
            compose_bench_spec([f"bench={mode}", f"bench.out_dir={folder}"])
        assert (folder / name).read_text() == "mine\n"
    # A record that is not a bench's does not vouch for the files beside it.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text('{"rows": []}')
    with pytest.raises(SeqmixError, match="holds results.json"):
        compose_bench_spec(["bench=smoke", f"bench.out_dir={tmp_path / 'other'}"])


def _cells(spec):
    return [(c.subject.label, c.runtime, c.pass_, c.length) for c in plan_grid(spec)]


def test_every_requested_cell_has_a_row_with_a_reason_when_not_measured(smoke):
    spec, result, _ = smoke
    assert [(r.subject, r.runtime, r.pass_, r.length) for r in result.rows] == _cells(spec)
    assert set(spec.runtimes) == set(bench.RUNTIMES)
    for row in result.rows:
        assert row.status in ("measured", "skipped"), row
        if row.status == "measured":
            assert row.time_ms > 0 and row.tokens_per_s > 0 and row.runs >= 1 and row.setup_s >= 0, row
            assert row.time_low_ms <= row.time_ms <= row.time_high_ms, row
        else:
            assert row.reason and row.time_ms is None, row
        if row.pass_ == "fwd+bwd" and row.runtime not in bench.TRAINING_RUNTIMES:
            assert row.status == "skipped" and "inference graphs only" in row.reason
        if row.runtime in bench.GPU_RUNTIMES and not torch.cuda.is_available():
            assert row.status == "skipped"
    by_key = {(r.subject, r.runtime, r.pass_, r.length): r for r in result.rows}
    # Every CPU runtime ran every subject: the mixers on x (B, L, D), the preset on token ids.
    for subject in ("tcn", "softmax_attention", "tcnca"):
        for runtime in ("eager", "compile", "onnxruntime", "executorch"):
            assert by_key[(subject, runtime, "forward", 32)].status == "measured"
    assert "L=64 > bench.max_length.executorch=32" in by_key[("tcn", "executorch", "forward", 64)].reason
    assert by_key[("tcnca", "eager", "forward", 64)].status == "measured"
    if not torch.cuda.is_available():
        assert "no CUDA device" in by_key[("tcn", "cuda", "forward", 32)].reason


def test_ratios_memory_and_slopes_are_computed(smoke):
    _, result, _ = smoke
    by_key = {(r.subject, r.runtime, r.pass_, r.length): r for r in result.rows}
    for length in (32, 64):
        assert by_key[("softmax_attention", "eager", "forward", length)].speedup_vs_baseline == 1.0
        tcn = by_key[("tcn", "eager", "fwd+bwd", length)]
        assert tcn.speedup_vs_baseline > 0 and tcn.memory_vs_baseline > 0 and tcn.speedup_vs_eager == 1.0
        assert by_key[("tcnca", "compile", "fwd+bwd", length)].speedup_vs_eager > 0
        assert by_key[("tcnca", "eager", "forward", length)].peak_mib > 0
    assert by_key[("tcn", "onnxruntime", "forward", 32)].peak_mib is None  # ORT allocates outside torch
    assert by_key[("tcn", "onnxruntime", "forward", 32)].speedup_vs_eager > 0
    assert by_key[("tcnca", "executorch", "forward", 32)].speedup_vs_baseline == 1.0  # tcnca is the smoke's preset baseline
    assert by_key[("tcnca", "eager", "forward", 32)].impl == "gated_attention=reference, tcn=channels_last"
    fitted = {(s.subject, s.runtime, s.pass_): s for s in result.slopes}
    assert math.isfinite(fitted[("tcn", "eager", "forward")].slope)
    assert fitted[("tcn", "executorch", "forward")].slope is None  # one length only


def test_every_measured_seqmix_row_is_set_against_the_roofline(smoke):
    _, result, _ = smoke
    cpu = result.machine["cpu"]
    assert cpu.matmul_gflops > 0 and cpu.bandwidth_gbs > 0 and cpu.threads == torch.get_num_threads()
    for row in result.rows:
        if row.status != "measured" or row.kind == "peer":  # a peer's algorithm states no cost
            assert row.vs_minimum is None and row.minimum_ms is None, row
            continue
        assert row.flops > 0 and row.bytes > 0, row
        assert row.minimum_ms == pytest.approx(max(row.flops / cpu.matmul_gflops, row.bytes / cpu.bandwidth_gbs) / 1e6)
        assert row.vs_minimum == pytest.approx(row.time_ms / row.minimum_ms) and row.bound in ("compute", "memory")
    # The exported graph runs the path eager does here, so the same cost; the backward triples the FLOPs.
    by_key = {(r.subject, r.runtime, r.pass_, r.length): r for r in result.rows}
    assert by_key[("tcn", "onnxruntime", "forward", 32)].flops == by_key[("tcn", "eager", "forward", 32)].flops
    assert by_key[("tcn", "eager", "fwd+bwd", 32)].flops == 3 * by_key[("tcn", "eager", "forward", 32)].flops


def test_results_files_and_plots_are_written(smoke):
    spec, result, paths = smoke
    names = {path.name for path in paths}
    assert names == {"results.json", "results.csv", "report.md", "time_vs_length.png", "memory_vs_length.png",
                     "throughput_by_runtime.png"}
    out = Path(spec.out_dir)
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert len(data["rows"]) == len(_cells(spec)) and data["spec"]["mixers"] == ["tcn", "softmax_attention"]
    with (out / "results.csv").open(encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(data["rows"]) and list(table[0]) == list(bench.CSV_FIELDS)
    for name in ("time_vs_length.png", "memory_vs_length.png", "throughput_by_runtime.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text(encoding="utf-8")
    for heading in ("### Time (ms), forward", "### Peak memory (MiB)", "### Speed-up vs `softmax_attention`",
                    "### Speed-up vs eager", "### Not measured"):
        assert heading in report
    assert "Times: median (fastest–slowest run) in ms" in report
    tcn = next(r for r in result.rows if (r.subject, r.runtime, r.pass_, r.length) == ("tcn", "eager", "forward", 32))
    assert f"| tcn | 32 | {bench_report.time_range(tcn)}, {bench_report._number(tcn.vs_minimum, '× min')} |" in report
    assert "### Roofline" in report and result.machine["cpu"].describe() in report
    assert data["roofline"]["cpu"]["matmul_gflops"] == result.machine["cpu"].matmul_gflops
    assert float(table[0]["vs_minimum"]) > 0
    assert table[0]["time_low_ms"] and table[0]["time_high_ms"]


def test_peers_are_compared_or_skipped_with_an_install_hint(smoke):
    _, result, _ = smoke
    assert {p.peer for p in result.peers} == {"pytorch_tcn.TCN", "torch.nn.MultiheadAttention"}  # for tcn, softmax_attention
    assert {p.runtime for p in result.peers} == {"eager", "cuda"}
    eager = [p for p in result.peers if p.runtime == "eager"]
    assert all(p.seqmix_speedup > 0 and p.memory_ratio > 0 for p in eager if p.peer == "torch.nn.MultiheadAttention")
    tcn_peer = [p for p in eager if p.peer == "pytorch_tcn.TCN"]
    if bench.peer_unavailable(PEERS["pytorch_tcn.TCN"]) is None:
        assert all(p.seqmix_speedup > 0 and p.reason is None for p in tcn_peer)
    else:
        assert all(p.seqmix_speedup is None and "pip install pytorch-tcn" in p.reason for p in tcn_peer)


def test_a_missing_peer_package_is_reported_with_pip_install(monkeypatch):
    missing = dataclasses.replace(PEERS["pytorch_tcn.TCN"], module="seqmix_no_such_module")
    monkeypatch.setitem(PEERS, "pytorch_tcn.TCN", missing)
    spec = compose_bench_spec([*EAGER_ONLY, "bench.mixers=[tcn]", "bench.lengths=[32]", "bench.peers=true"])
    rows = [r for r in run_grid(spec).rows if r.kind == "peer"]
    assert len(rows) == 2 and all(r.status == "skipped" and "pip install pytorch-tcn" in r.reason for r in rows)


@pytest.mark.parametrize("name", sorted(PEERS))
def test_peer_adapter_maps_x_like_its_seqmix_mixer(name):
    peer = PEERS[name]
    pytest.importorskip(peer.module, reason=f"peer package {peer.package} is not installed: pip install {peer.package}")
    mixer = seqmix.build_mixer(peer.against, 16)
    module = peer.build(mixer)
    x = torch.randn(2, 40, 16, requires_grad=True)
    y = module(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_time_and_memory_budgets_skip_cells_with_reasons():
    spec = compose_bench_spec([*EAGER_ONLY, "bench.mixers=[tcn,softmax_attention/math]", "bench.passes=[forward]",
                               "bench.max_seconds_per_run=1e-9", "bench.memory_budget_gb=1e-9"])
    rows = {(r.subject, r.length): r for r in run_grid(spec).rows}
    assert rows[("tcn", 32)].status == "measured" and "stopped" in rows[("tcn", 32)].note
    assert rows[("tcn", 64)].status == "skipped" and "bench.max_seconds_per_run" in rows[("tcn", 64)].reason
    for length in (32, 64):  # the longer length names the shorter one's reason
        assert "bench.memory_budget_gb" in rows[("softmax_attention/math", length)].reason


def test_a_mixer_listed_by_its_paths_is_the_baseline_and_claim_side_through_its_default_path(tmp_path):
    claim = ("{title: t, source: s, metric: speed, figure: 1, subject: tcn, baseline: softmax_attention, pass: forward, "
             "length: 32}")
    spec = compose_bench_spec([*EAGER_ONLY, "bench.mixers=[tcn,'softmax_attention/*']", "bench.passes=[forward]",
                               "bench.lengths=[32]", "bench.baseline.mixer=softmax_attention",
                               f"+bench.claims.c={claim}", f"bench.out_dir={tmp_path}"])
    assert spec.grid_label("softmax_attention") == "softmax_attention/sdpa" and spec.grid_label("tcn") == "tcn"
    result = run_grid(spec)
    rows = {r.subject: r for r in result.rows}
    sdpa, tcn = rows["softmax_attention/sdpa"], rows["tcn"]
    assert sdpa.speedup_vs_baseline == 1.0 and rows["softmax_attention/math"].speedup_vs_baseline != 1.0
    assert tcn.speedup_vs_baseline == pytest.approx(sdpa.time_ms / tcn.time_ms)
    (outcome,) = result.outcomes
    assert outcome.verdict != "MISSING" and outcome.ours == pytest.approx(sdpa.time_ms / tcn.time_ms)
    write_grid_results(result, spec.out_dir)
    report = (tmp_path / "report.md").read_text()
    assert "Speed-up vs `softmax_attention/sdpa`" in report

    spec = compose_bench_spec([*EAGER_ONLY, "bench.mixers=[tcn]", "bench.passes=[forward]", "bench.lengths=[32]",
                               f"bench.out_dir={tmp_path}"])
    write_grid_results(run_grid(spec), spec.out_dir)
    assert "None: `softmax_attention` (bench.baseline.mixer) is not among this grid's subjects." in (tmp_path / "report.md").read_text()


def test_a_cell_larger_than_the_machine_is_skipped_before_it_is_built(monkeypatch, tmp_path):
    """bench.width=1e8 filled the machine's memory until the system killed the process (the spec's
    check built the mixer for real), and L=1e11 tried to allocate terabytes."""
    from seqmix.export.bench import run as bench_run

    spec = compose_bench_spec([*EAGER_ONLY, "bench.mixers=[tcn]", "bench.passes=[forward]", "bench.width=100000000"])
    with pytest.raises(SeqmixError, match=r"none of the grid's 2 cells can run here \(needs at least [\d.,]+ GiB .*more than the cpu's"):
        run_grid(spec)
    # A machine of 1 MiB: the longer length no longer fits, and says so; the shorter one is measured.
    monkeypatch.setattr(bench_run, "device_memory_bytes", lambda device: 2**20)
    rows = run_grid(compose_bench_spec([*EAGER_ONLY, "bench.mixers=[tcn]", "bench.passes=[forward]",
                                        "bench.lengths=[32,100000]"])).rows
    assert [row.status for row in rows] == ["measured", "skipped"]
    assert "needs at least 0.0 GiB (parameters, input and output) at B=1, L=100000, more than the cpu's 0.0 GiB" in rows[1].reason


def test_total_budget_and_failures_are_reported(monkeypatch):
    spec = compose_bench_spec([*EAGER_ONLY, "bench.mixers=[tcn]", "bench.max_total_seconds=1e-9"])
    assert all("bench.max_total_seconds" in r.reason for r in run_grid(spec).rows)

    def broken(subject, width):
        raise RuntimeError("boom")

    monkeypatch.setattr(bench_run, "build_subject", broken)
    result = run_grid(compose_bench_spec([*EAGER_ONLY, "bench.mixers=[tcn]", "bench.passes=[forward]"]))
    first, second = result.rows
    assert first.status == "failed" and first.reason == "RuntimeError: boom" and result.failed
    assert second.status == "skipped" and second.reason == "not measured at L=32, failed: RuntimeError: boom"


# The operator sweep (conf/bench/operators.yaml) on a tiny grid: every compute path of three mixers.
OPERATORS_TINY = ["bench=operators", "bench.lengths=[64,128]", "bench.width=16", "bench.repeats=1", "bench.warmup=0",
                  "bench.progress=false"]
SWEPT = ("ema", "tcn", "softmax_attention")


def test_cpu_peak_counts_the_output_and_temporaries():
    x = torch.randn(2, 256, 16)
    out_bytes = x.numel() * 4
    # exp(x) is a temporary still alive when the product is allocated: the peak holds both.
    assert peak_memory_bytes(lambda: torch.exp(x) * 2, torch.device("cpu")) >= 2 * out_bytes
    assert peak_memory_bytes(lambda: None, torch.device("cpu")) == 0


@pytest.fixture(scope="module")
def operators():
    """conf/bench/operators.yaml for every path of ema, tcn and softmax_attention at L = 64, 128,
    with a memory budget no attention score matrix fits in."""
    spec = compose_bench_spec([*OPERATORS_TINY, f"bench.mixers=[{','.join(f'{n}/*' for n in SWEPT)}]",
                               "bench.memory_budget_gb=1e-9"])
    return spec, run_grid(spec)


def test_operator_sweep_measures_every_compute_path_with_a_finite_slope(operators):
    spec, result = operators
    cells = {(r.subject, r.pass_, r.length): r for r in result.rows}
    paths = [f"{n}/{impl}" for n in SWEPT for impl in seqmix.mixer_class(n).impls]
    assert [s.label for s in spec.mixers] == paths and spec.runtimes == ("eager",)
    assert set(cells) == {(p, pass_, n) for p in paths for pass_ in PASSES for n in (64, 128)}
    for (path, _, _), row in cells.items():
        if path == "softmax_attention/math":
            continue
        name, impl = path.split("/")
        if impl not in runnable_impls(name):  # native code without a C++ compiler: a row with the reason
            assert row.status == "skipped" and "C++ compiler" in row.reason, row
            continue
        assert row.status == "measured", row
        assert row.time_ms > 0 and row.tokens_per_s > 0 and row.runs == 1
        assert 0 < row.time_low_ms <= row.time_ms <= row.time_high_ms
    # The EMA allocates its (B, L, D) float32 output at least.
    assert cells[("ema/chunked", "forward", 128)].peak_mib * 2**20 >= 128 * 16 * 4
    fitted = {(s.subject, s.pass_): s for s in result.slopes}
    assert set(fitted) == {(p, pass_) for p in paths for pass_ in PASSES}
    runnable = [p for p in paths if p.split("/")[1] in runnable_impls(p.split("/")[0])]
    assert all(s.slope is not None and math.isfinite(s.slope) for (p, _), s in fitted.items()
               if p != "softmax_attention/math" and p in runnable)


def test_operator_sweep_skips_over_budget_score_matrices_with_the_reason(operators):
    _, result = operators
    for row in result.rows:
        if row.subject == "softmax_attention/math":
            assert row.time_ms is None and "estimated attention scores" in row.reason and "bench.memory_budget_gb" in row.reason
        elif row.subject == "softmax_attention/sdpa":  # the fused kernel holds no score matrix
            assert row.status == "measured"
    math_slopes = [s for s in result.slopes if s.subject == "softmax_attention/math"]
    assert math_slopes and all(s.slope is None and s.reason for s in math_slopes)


def test_operator_targets_are_judged_from_the_sweep(operators):
    _, result = operators
    outcomes = {o.name: o for o in result.outcomes}
    assert set(outcomes) == set(compose_bench_spec(["bench=operators"]).claims)
    speedup = outcomes["chunked_ema_speedup"]
    assert speedup.verdict == "MISSING" and "L=4096" in speedup.reason and "not in the grid" in speedup.reason
    for name in ("ema_slope_forward", "ema_slope_backward", "tcn_slope_forward", "tcn_slope_backward"):
        fit = next(s for s in result.slopes if (s.subject, s.pass_) == (outcomes[name].claim.subject, outcomes[name].claim.pass_))
        assert outcomes[name].ours == fit.slope and outcomes[name].verdict == ("PASS" if fit.slope <= 1.15 else "MISS")
    assert outcomes["cema_slope_forward"].verdict == "MISSING" and "not in the grid" in outcomes["cema_slope_forward"].reason
    report = bench_report.format_grid_report(result)
    assert "### Claims and targets (judged on eager)" in report and "| chunked EMA vs FFT EMA, forward |" in report


def test_operator_sweep_over_budget_time_skips_the_longer_lengths():
    spec = compose_bench_spec([*OPERATORS_TINY, "bench.mixers=[tcn/*]", "bench.max_seconds_per_run=1e-9"])
    rows = run_grid(spec).rows
    for impl, pass_ in [(impl, pass_) for impl in seqmix.mixer_class("tcn").impls for pass_ in PASSES]:
        first, second = [r for r in rows if r.subject == f"tcn/{impl}" and r.pass_ == pass_]
        assert first.length == 64 and first.time_ms > 0 and "stopped" in first.note
        assert second.length == 128 and second.time_ms is None and "bench.max_seconds_per_run" in second.reason


def test_operator_sweep_command_line_writes_json_csv_and_report(tmp_path):
    command = [*SEQMIX, "bench", *OPERATORS_TINY, "bench.mixers=[ema/*,softmax_attention/*]", "bench.memory_budget_gb=1e-9",
               f"bench.out_dir={tmp_path}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "estimated attention scores" in done.stdout and "Times: median (fastest–slowest run) in ms" in done.stdout
    assert "### Claims and targets" in done.stdout
    # Measured ÷ minimum beside every time, and the machine's rates it divides by.
    assert "× min |" in done.stdout and "GFLOP/s" in done.stdout and "GB/s" in done.stdout
    data = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert all(row["vs_minimum"] > 0 for row in data["rows"] if row["status"] == "measured")
    paths = len(seqmix.mixer_class("ema").impls) + len(seqmix.mixer_class("softmax_attention").impls)
    assert len(data["rows"]) == paths * len(PASSES) * 2 and len(data["claims"]) == 9
    csv_lines = (tmp_path / "results.csv").read_text(encoding="utf-8").splitlines()
    assert csv_lines[0].startswith("kind,subject,runtime,pass,length") and len(csv_lines) == 1 + len(data["rows"])
    assert "time_ms,time_low_ms,time_high_ms" in csv_lines[0]
    measured = [row for row in data["rows"] if row["status"] == "measured"]
    assert measured and all(row["time_low_ms"] <= row["time_ms"] <= row["time_high_ms"] for row in measured)
    assert {p.name for p in tmp_path.iterdir()} == {"results.json", "results.csv", "report.md"}


def test_wildcards_name_every_registered_mixer_and_path():
    every = compose_bench_spec(["bench=operators"])
    assert [s.label for s in every.mixers] == [f"{n}/{i}" for n in seqmix.list_mixers() for i in seqmix.mixer_class(n).impls]
    defaults = compose_bench_spec([*EAGER_ONLY, "bench.mixers=['*']"])
    assert [s.label for s in defaults.mixers] == seqmix.list_mixers() and all(s.impl is None for s in defaults.mixers)


def test_every_runtime_says_what_it_is_and_what_it_needs():
    from seqmix.export.latency import DEPLOYED_RUNTIMES

    assert set(DEPLOYED_RUNTIMES) <= set(bench.RUNTIMES)
    for name, runtime in bench.RUNTIMES.items():
        assert runtime.name == name and runtime.summary and runtime.device in ("cpu", "cuda")
        reference = bench.RUNTIMES[runtime.reference]
        assert reference.device == runtime.device or (name, reference.name) == ("cuda", "eager")
        assert not (runtime.trains and runtime.exported) and bool(runtime.requires) == bool(runtime.install)
        reason = bench.runtime_unavailable(name)
        assert reason is None or "pip install" in reason or "no CUDA device" in reason
    with pytest.raises(SeqmixError, match=r"bench.claim_runtime='tflite'.*'onnxruntime_tensorrt'"):
        bench.require_runtime("tflite", "bench.claim_runtime")


def _tiny_claims(*overrides: str) -> list[str]:
    """Overrides running conf/bench/paper_claims.yaml's claims at L = 64 or 128 with tiny models."""
    full = compose_bench_spec(["bench=paper_claims"])
    assert {c.length for c in full.claims.values()} == {4096, 16384, 131072}
    tiny = ["bench=paper_claims", "bench.width=16", "bench.repeats=1", "bench.warmup=0", "bench.progress=false",
            "bench.preset_overrides=['model.d_model=16','model.depth=1','model.vocab_size=32']"]
    tiny += [f"bench.claims.{name}.length={128 if claim.length > 4096 else 64}" for name, claim in full.claims.items()]
    return tiny + list(overrides)


def test_claims_table_from_a_tiny_grid(tmp_path):
    full = compose_bench_spec(["bench=paper_claims"])
    spec = compose_bench_spec(_tiny_claims(f"bench.out_dir={tmp_path}"))
    result = run_claims(spec)
    paths = write_claims(result, spec.out_dir)
    assert [p.name for p in paths] == ["claims.md", "claims.json"]
    assert [o.name for o in result.outcomes] == list(full.claims)
    for outcome in result.outcomes:
        assert outcome.ours > 0 and outcome.verdict == ("—" if outcome.claim.figure is None else outcome.verdict)
        assert outcome.verdict in ("PASS", "MISS", "—")
    table = (tmp_path / "claims.md").read_text(encoding="utf-8")
    for figure in ("5.5×", "0.13×", "1.37×", "7.07×"):
        assert figure in table
    assert table.count("| MISS |") + table.count("| PASS |") == sum(c.figure is not None for c in full.claims.values())
    data = json.loads((tmp_path / "claims.json").read_text(encoding="utf-8"))
    assert len(data["claims"]) == len(full.claims) and all(m["time_ms"] > 0 for m in data["measurements"])
    assert all(m["time_low_ms"] <= m["time_ms"] <= m["time_high_ms"] and m["runs"] == 1 for m in data["measurements"])
    assert "| time ms (fastest–slowest) |" in table


def test_claim_sides_are_timed_interleaved_and_summarised_per_side(monkeypatch):
    sides = []
    timed = bench_run.time_once

    def record_side(run, sync):
        sides.append(run)
        return timed(run, sync)

    monkeypatch.setattr(bench_run, "time_once", record_side)
    others = [name for name in compose_bench_spec(["bench=paper_claims"]).claims if name != "mega_chunk_speed"]
    spec = compose_bench_spec(_tiny_claims("bench.repeats=3", *[f"~bench.claims.{name}" for name in others]))
    subject, baseline = run_claims(spec).measurements
    first, second = sides[0], sides[1]
    assert first is not second and sides == [first, second] * 3
    for side in (subject, baseline):
        assert side.runs == 3 and side.time_low_ms <= side.time_ms <= side.time_high_ms


def test_a_claim_whose_side_cannot_run_is_missing(monkeypatch):
    build = bench_run.build_subject

    def build_but_not_the_transformer(subject, width):
        if subject.label == "transformer":
            raise RuntimeError("boom")
        return build(subject, width)

    monkeypatch.setattr(bench_run, "build_subject", build_but_not_the_transformer)
    others = [name for name in compose_bench_spec(["bench=paper_claims"]).claims if name != "mega_chunk_speed"]
    spec = compose_bench_spec(_tiny_claims(*[f"~bench.claims.{name}" for name in others]))
    result = run_claims(spec)
    (outcome,) = result.outcomes
    assert outcome.verdict == "MISSING" and outcome.reason == "transformer failed: RuntimeError: boom" and result.failed


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["bench.runtimes=[gpu]"], ["bench.runtimes='gpu'", "onnxruntime"]),
        # A list where a name goes was a TypeError (unhashable) from the lookup in the runtime table.
        (["bench.runtimes=[[eager]]"], ["bench.runtimes=['eager']", "onnxruntime"]),
        (["bench.plot_runtime=[eager]"], ["bench.plot_runtime=['eager']", "onnxruntime"]),
        # Lengths were sorted before they were checked: a name among them was a TypeError.
        (["bench.lengths=[a,3]"], ["lengths='a'", "integer >= 1"]),
        (["bench.lengths=[64,32,64]"], ["bench.lengths lists 64 twice"]),
        # A flag took any value: plots=no drew the plots, peers=off timed the peers.
        (["bench.plots=no"], ["bench: plots='no' is not valid; expected True or False"]),
        (["bench.peers=1.5"], ["bench: peers=1.5 is not valid"]),
        (["bench.strict=maybe"], ["bench: strict='maybe' is not valid"]),
        (["bench.runtimes=[eager,onnxruntime,eager]"], ["bench.runtimes lists 'eager' twice"]),
        (["bench.passes=[forward,forward]"], ["bench.passes lists 'forward' twice"]),
        # A name where a list goes was read one character at a time (mixer='e').
        (["bench.mixers=ema"], ["bench.mixers='ema' is not valid; expected a list"]),
        (["bench.lengths=64"], ["bench.lengths=64 is not valid; expected a list"]),
        (["bench=lowering", "bench.lowering.runs=runs/a"], ["bench.lowering.runs='runs/a' is not valid; expected a list"]),
        (["bench.mixers=[emma]"], ["mixer='emma'", "softmax_attention"]),
        (["bench.mixers=[ema/nope]"], ["impl of 'ema'", "chunked"]),
        (["bench.presets=[nope]"], ["bench.presets='nope'", "megalodon"]),
        (["bench.passes=[backward]"], ["bench.passes='backward'", "fwd+bwd"]),
        (["+bench.colour=red"], ["unknown field 'colour'", "runtimes"]),
        (["bench=paper_claims", "bench.claims.tcnca_forward.subject=nope"], ["bench.claims.tcnca_forward.subject='nope'", "tcnca"]),
        (["bench=operators", "bench.claims.chunked_ema_speedup.baseline=ema/fast"],
         ["bench.claims.chunked_ema_speedup.baseline='ema/fast'", "ema/fft"]),
        (["bench=operators", "bench.claims.ema_slope_forward.metric=pace"], ["bench.claims.ema_slope_forward.metric='pace'", "slope"]),
        (["bench=operators", "bench.claims.tcn_slope_forward.length=64"], ["bench.claims.tcn_slope_forward", "'figure'"]),
        (["bench=operators", "bench.claim_runtime=cuda"], ["bench.claim_runtime='cuda'", "['eager']"]),
        (["bench=paper_claims", "bench.claims.tcnca_forward.metric=slope", "~bench.claims.tcnca_forward.baseline",
          "~bench.claims.tcnca_forward.length"], ["bench.claims.tcnca_forward.metric='slope'", "bench.mode=grid"]),
        (["bench.mixers=['*/fast']"], ["impl of 'cema'", "chunked"]),
        (["bench.baseline.mixer=softmax"], ["bench.baseline.mixer='softmax'", "softmax_attention"]),
        (["bench=smoke", "bench.plot_length=7"], ["bench.plot_length=7", "[32, 64]"]),
        (["bench.baseline.mixer=mega"], ["bench.baseline.mixer='mega'", "'tcn'"]),
        (["bench.baseline.preset=tcn"], ["bench.baseline.preset='tcn'", "'tcnca'"]),
    ],
)
def test_config_errors_name_the_field_and_the_valid_choices(overrides, expected):
    with pytest.raises(SeqmixError) as caught:
        compose_bench_spec(overrides)
    for text in expected:
        assert text in str(caught.value)


def test_command_line_writes_the_results(tmp_path):
    command = [*SEQMIX, "bench", *EAGER_ONLY, "bench.lengths=[32]", f"bench.out_dir={tmp_path}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "### Time (ms), forward" in done.stdout and f"wrote {tmp_path / 'results.csv'}" in done.stdout
    # Hydra writes nothing of its own (no .hydra/, no log file) beside the results.
    assert {p.name for p in tmp_path.iterdir()} == {"results.json", "results.csv", "report.md", "time_vs_length.png",
                                                    "memory_vs_length.png", "throughput_by_runtime.png"}
    # The command keeps freed memory (seqmix.allocator) and the results say so.
    if platform.libc_ver()[0] == "glibc" and user_settings() is None:
        allocator = json.loads((tmp_path / "results.json").read_text())["environment"]["allocator"]
        assert allocator.startswith("glibc malloc keeping freed memory") and allocator in (tmp_path / "report.md").read_text()


def test_a_grid_none_of_whose_runtimes_can_run_here_is_refused_naming_each_reason(monkeypatch):
    monkeypatch.setattr(bench_run, "runtime_unavailable", lambda name: f"{name} is missing here")
    spec = compose_bench_spec([*EAGER_ONLY, "bench.runtimes=[eager,onnxruntime]", "bench.lengths=[32]"])
    with pytest.raises(SeqmixError, match=re.escape("bench.runtimes=['eager', 'onnxruntime']: none of them can run here "
                                                    "(eager: eager is missing here; onnxruntime: onnxruntime is missing here)")):
        run_grid(spec)


def test_a_grid_none_of_whose_cells_can_run_is_refused_naming_why():
    spec = compose_bench_spec([*EAGER_ONLY, "bench.runtimes=[onnxruntime]", "bench.passes=[fwd+bwd]", "bench.lengths=[32]"])
    with pytest.raises(SeqmixError, match=re.escape(f"bench: none of the grid's {len(plan_grid(spec))} cells can run here "
                                                    "(onnxruntime runs inference graphs only; fwd+bwd is measured on eager")):
        run_grid(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU grid runs where a CUDA device is")
def test_the_gpu_grid_without_a_gpu_exits_2_naming_why_and_writes_nothing(tmp_path):
    """It wrote a report of skipped rows and exited 0."""
    command = [*SEQMIX, "bench", "bench=gpu", f"bench.out_dir={tmp_path / 'gpu'}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "none of them can run here (cuda: no CUDA device" in done.stderr
    assert not (tmp_path / "gpu").exists()


@pytest.mark.parametrize("overrides, named", [
    (["bench.mixers=[ema]", "+bench.mixer_options.ema.order=0"], "bench: ema cannot be built with its options: ema: order=0"),
    (["bench.mixers=[]", "bench.presets=[mega]", "bench.preset_overrides=['model.depth=0']"],
     "bench: mega cannot be built with its options: model: depth=0"),
])
def test_options_that_make_a_subject_unbuildable_are_refused_before_the_grid_runs(overrides, named, tmp_path):
    """Found before any measurement, naming the subject, rather than as skipped rows in the report."""
    with pytest.raises(SeqmixError, match=re.escape(named)):
        compose_bench_spec([*EAGER_ONLY, *overrides, f"bench.out_dir={tmp_path / 'bench'}"])
    assert not (tmp_path / "bench").exists()


def test_fwd_bwd_backpropagates_a_whole_gradient_made_once_as_a_loss_would():
    """The fwd+bwd pass hands backward the gradient of output.sum() as a contiguous tensor of ones,
    the same one on every call: output.sum()'s own is one value broadcast (strides 0), which a
    kernel reading the gradient at its strides would take without touching memory. The gradients
    it leaves are output.sum()'s."""
    torch.manual_seed(0)
    module = torch.nn.Linear(8, 8)
    x = torch.randn(2, 5, 8)
    seen = []

    def call(inputs):
        output = module(inputs)
        output.register_hook(lambda grad: seen.append(grad))
        return output

    run, clear = pass_callables(call, module, (x,), "fwd+bwd")
    run()
    weight_grad = module.weight.grad.clone()
    run()
    assert len(seen) == 2 and seen[0] is seen[1]
    assert seen[0].shape == (2, 5, 8) and seen[0].is_contiguous() and 0 not in seen[0].stride()
    assert torch.equal(seen[0], torch.ones(2, 5, 8))
    module.zero_grad(set_to_none=True)
    module(x).sum().backward()
    torch.testing.assert_close(weight_grad, module.weight.grad)
    clear()
    assert module.weight.grad is None
