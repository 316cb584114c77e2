"""Running a benchmark: the grid cell by cell, the claims pair by pair, then the report.

``run_grid`` answers "which mixer is fastest for my length, on my runtime". For every cell

    subject × runtime × pass × sequence length L

of ``spec.plan_grid`` it builds the subject fresh (``subjects``), prepares it on the runtime
(``runtimes.prepare``: one untimed setup call, which compiles or exports; its wall time, export
included, is ``setup_s``), then times ``repeats`` runs after ``warmup`` with
``seqmix.timing.time_calls`` (median, fastest, slowest, and the load average when the machine was
busier than its cores), measures the peak memory of one more run on the runtimes whose memory
torch allocates (``measure.peak_mib``), and derives tokens/s = B·L / median time. Ratios, slopes,
peer comparisons and the claims judged from the rows follow (``results``). Before the first cell
the machine's float32 matmul rate and memory bandwidth are measured once per device the grid uses
(``roofline.measure_machine``), and each measured row of a seqmix subject gets the minimum FLOPs and
bytes of its pass on the paths it ran (``roofline.subject_cost``) and measured ÷ minimum time.

Nothing requested is dropped. A cell that is not measured is a row whose ``status`` is
``skipped`` (the runtime or the peer package is missing, the pass does not apply to the runtime,
L is above the runtime's ``max_length``, the estimated attention scores exceed
``memory_budget_gb``, a shorter L of the same subject, runtime and pass ran longer than
``max_seconds_per_run``, set up longer than ``max_setup_seconds`` or was not measured,
``max_total_seconds`` ran out, or seqmix refused the configuration with a ``SeqmixError``) or
``failed`` (any other exception, an exported graph disagreeing with eager included), with the reason.

``run_claims`` measures the pairs behind the claims, their timed runs interleaved so drift hits
both sides alike, each side's Timing built with ``seqmix.timing.time_once`` and ``summarize``.

``run_lowering`` measures what lowering buys each model, a preset or a trained run
(``lowering.lowering_report``), and the machine's matmul throughput beside them.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from seqmix import SeqmixError
from seqmix.model.checkpoint import instantiate_model
from seqmix.registry import build_mixer
from seqmix.tasks.base import Task
from seqmix.timing import device_memory_bytes, summarize, time_calls, time_once
from seqmix.training.checkpoints import load_run
from seqmix.training.experiment import adapt_model_config, build_task

from ..onnx_export import ExportMismatch
from .lowering import as_builtin, lowering_report, matmul_throughput
from .measure import environment, peak_mib
from .peers import PEERS, peer_unavailable
from .report import format_claims, format_grid_report, format_lowering, write_claims, write_grid_results, write_lowering
from .results import (
    ClaimsResult, GridResult, GridRow, LoweringResult, Measurement, add_ratios, add_roofline, compare_peers, fit_grid_slopes, judge_claim,
    judge_grid_claims, record_timing,
)
from .roofline import measure_machine, subject_cost
from .runtimes import RUNTIMES, TRAINING_RUNTIMES, Prepared, prepare, require_runtime, runtime_unavailable
from .spec import BenchSpec, Cell, plan_claims, plan_grid
from .subjects import (Subject, attention_score_bytes, build_subject, example_inputs, least_memory_bytes, lowering_config,
                       subject_width)


def _first_line(error: BaseException) -> str:
    """``Type: first line of the message`` of an exception."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def measure_cell(cell: Cell, spec: BenchSpec, row: GridRow, workdir: Path) -> None:
    """Build, set up and time one cell, filling ``row``; exceptions become a skipped or failed row."""
    try:
        module = build_subject(cell.subject, spec.width)
        row.width = subject_width(cell.subject, module, spec.width)
        if cell.subject.kind == "peer":
            seqmix = build_mixer(PEERS[cell.subject.name].against, spec.width, **cell.subject.options)
            estimate = int(PEERS[cell.subject.name].score_bytes(seqmix, cell.pass_) * spec.batch * cell.length**2)
        else:
            fused = not RUNTIMES[cell.runtime].exported
            estimate = attention_score_bytes(module, spec.batch, cell.length, cell.pass_, fused)
        if estimate > spec.memory_budget_gb * 2**30:
            row.status = "skipped"
            row.reason = f"estimated attention scores {estimate / 2**30:.1f} GiB > bench.memory_budget_gb={spec.memory_budget_gb:g}"
            return
        inputs = example_inputs(cell.subject, module, spec.batch, cell.length, spec.width)
        prepared = prepare(cell.runtime, module, inputs, cell.pass_, spec.compile_backend, workdir)
        row.device, row.impl, row.setup_s = RUNTIMES[cell.runtime].device, prepared.impl, prepared.setup_s
        timing = time_calls(prepared.run, spec.repeats, spec.warmup, sync=prepared.sync, max_seconds=spec.max_seconds_per_run)
        if prepared.torch_memory:
            row.peak_mib = peak_mib(prepared.run, prepared.clear, prepared.device)
        record_timing(row, timing)
        row.tokens_per_s = spec.batch * cell.length / (timing.median_ms / 1e3)
        if cell.subject.kind != "peer":
            # Asked after prepare: the module now runs the paths of this runtime (an export's, say).
            cost = subject_cost(module, spec.batch, cell.length, cell.pass_)
            if cost is not None:
                row.flops, row.bytes = cost.flops, cost.bytes
    except ExportMismatch as error:
        row.status, row.reason = "failed", str(error)
    except SeqmixError as error:
        row.status, row.reason = "skipped", f"seqmix refused it: {error}"
    except Exception as error:  # noqa: BLE001  (any failure of one cell is reported, the grid goes on)
        row.status, row.reason = "failed", _first_line(error)


def memory_refusal(subject: Subject, spec: BenchSpec, length: int, pass_: str, device: str) -> str | None:
    """Why ``subject`` cannot run one ``pass_`` at (spec.batch, length) on ``device``: its least memory
    (``least_memory_bytes``) exceeds the device's. Built, it would fail to allocate, or be killed by
    the system once its pages were touched (bench.width=1e8). None when it may fit."""
    least = least_memory_bytes(subject, spec.width, spec.batch, length, pass_)
    available = device_memory_bytes(device)
    if least <= available:
        return None
    return (f"needs at least {least / 2**30:,.1f} GiB (parameters, input and output) at B={spec.batch}, L={length}, "
            f"more than the {device}'s {available / 2**30:,.1f} GiB")


def _planned_skip(cell: Cell, spec: BenchSpec, unavailable: Mapping[str, str | None]) -> str | None:
    """Why ``cell`` cannot be measured whatever the cells before it did, decided before building
    anything; None when it can."""
    if cell.pass_ == "fwd+bwd" and cell.runtime not in TRAINING_RUNTIMES:
        return f"{cell.runtime} runs inference graphs only; fwd+bwd is measured on {', '.join(TRAINING_RUNTIMES)}"
    if unavailable.get(cell.runtime):
        return unavailable[cell.runtime]
    if cell.subject.kind == "peer" and unavailable.get(cell.subject.name):
        return unavailable[cell.subject.name]
    limit = spec.max_length.get(cell.runtime)
    if limit is not None and cell.length > limit:
        return f"L={cell.length} > bench.max_length.{cell.runtime}={limit}"
    return memory_refusal(cell.subject, spec, cell.length, cell.pass_, RUNTIMES[cell.runtime].device)


def _skip_reason(cell: Cell, spec: BenchSpec, planned: str | None, stopped: Mapping[tuple, str], elapsed: float) -> str | None:
    """Why ``cell`` is not measured: its ``_planned_skip``, a shorter length of its row that stopped
    it, or the time budget spent; None to measure it."""
    if planned is not None:
        return planned
    key = (cell.subject.label, cell.runtime, cell.pass_)
    if key in stopped:
        return stopped[key]
    if spec.max_total_seconds is not None and elapsed > spec.max_total_seconds:
        return f"bench.max_total_seconds={spec.max_total_seconds:g} used up before this cell"
    return None


def _stop_reason(row: GridRow, spec: BenchSpec) -> str | None:
    """Why the longer lengths of this row's subject, runtime and pass are skipped, or None."""
    if row.status == "measured" and row.note is not None:
        return f"L={row.length} ran {row.time_ms / 1e3:.1f} s > bench.max_seconds_per_run={spec.max_seconds_per_run:g}"
    if row.status == "measured" and row.setup_s > spec.max_setup_seconds:
        return (
            f"setup (compile or export) at L={row.length} took {row.setup_s:.0f} s "
            f"> bench.max_setup_seconds={spec.max_setup_seconds:g}"
        )
    if row.status != "measured":
        return f"not measured at L={row.length}, {row.status}: {row.reason}"
    return None


def run_grid(spec: BenchSpec, progress: bool | None = None) -> GridResult:
    """Measure every cell of ``plan_grid(spec)`` and judge the spec's claims from the rows; see the module docstring.

    Args:
        spec: what to measure (``mode`` grid).
        progress: show a tqdm bar over the cells (stderr); None follows ``spec.progress``.
    """
    cells = plan_grid(spec)
    unavailable: dict[str, str | None] = {runtime: runtime_unavailable(runtime) for runtime in spec.runtimes}
    if all(unavailable.values()):
        # A grid of skipped rows measures nothing: refused before any work or file, as claim_runtime is.
        reasons = "; ".join(f"{runtime}: {why}" for runtime, why in unavailable.items())
        raise SeqmixError(f"bench.runtimes={list(spec.runtimes)}: none of them can run here ({reasons})")
    unavailable.update({s.name: peer_unavailable(PEERS[s.name]) for s in spec.grid_subjects() if s.kind == "peer"})
    planned = [_planned_skip(cell, spec, unavailable) for cell in cells]
    if all(planned):
        reasons = "; ".join(dict.fromkeys(planned))
        raise SeqmixError(f"bench: none of the grid's {len(cells)} cells can run here ({reasons})")
    stopped: dict[tuple, str] = {}
    rows: list[GridRow] = []
    devices = dict.fromkeys(RUNTIMES[runtime].device for runtime in spec.runtimes if not unavailable[runtime])
    machine = {device: measure_machine(device) for device in devices}
    start = time.perf_counter()
    show = spec.progress if progress is None else progress
    bar = tqdm(total=len(cells), disable=not show, unit="cell", dynamic_ncols=True)
    with tempfile.TemporaryDirectory(prefix="seqmix-bench-") as scratch:
        for index, cell in enumerate(cells):
            bar.set_description(f"{cell.subject.label} {cell.runtime} {cell.pass_} L={cell.length}")
            row = GridRow(cell.subject.kind, cell.subject.label, cell.runtime, cell.pass_, cell.length, spec.batch)
            reason = _skip_reason(cell, spec, planned[index], stopped, time.perf_counter() - start)
            if reason is not None:
                row.status, row.reason = "skipped", reason
            else:
                workdir = Path(scratch) / str(index)
                workdir.mkdir()
                measure_cell(cell, spec, row, workdir)
                stop = _stop_reason(row, spec)
                if stop is not None:
                    stopped[(cell.subject.label, cell.runtime, cell.pass_)] = stop
            rows.append(row)
            bar.update()
    bar.close()
    torch._dynamo.reset()
    add_ratios(rows, spec)
    add_roofline(rows, machine)
    slopes = fit_grid_slopes(rows)
    runtimes_unavailable = {runtime: unavailable[runtime] for runtime in spec.runtimes if unavailable[runtime]}
    return GridResult(spec, environment(runtimes_unavailable), rows, slopes, compare_peers(rows, spec),
                      judge_grid_claims(rows, slopes, spec), machine)


def measure_pair(subjects: Sequence[Subject], pass_: str, length: int, spec: BenchSpec, workdir: Path) -> list[Measurement]:
    """Time subjects on inputs of the same shape with their timed runs interleaved (a b a b ...).

    Each side gets ``warmup`` untimed runs, then ``repeats`` rounds of one timed run each; a run
    over ``max_seconds_per_run`` ends the rounds. Peak memory is measured per side afterwards. An
    exception leaves every side untimed, with the reason naming the side that raised it.
    """
    results = [Measurement(s.label, pass_, length) for s in subjects]
    current = subjects[0].label
    try:
        prepared: list[Prepared] = []
        for subject, result in zip(subjects, results):
            current = subject.label
            too_big = memory_refusal(subject, spec, length, pass_, RUNTIMES[spec.claim_runtime].device)
            if too_big is not None:
                raise SeqmixError(too_big)
            module = build_subject(subject, spec.width)
            result.parameters = sum(p.numel() for p in module.parameters())
            inputs = example_inputs(subject, module, spec.batch, length, spec.width)
            prepared.append(prepare(spec.claim_runtime, module, inputs, pass_, spec.compile_backend, workdir))
            result.impl = prepared[-1].impl
        for side, result in zip(prepared, results):
            current = result.subject
            for _ in range(spec.warmup):
                side.run()
        times_s: list[list[float]] = [[] for _ in prepared]
        note = None
        for _ in range(spec.repeats):
            for side, timed_s, result in zip(prepared, times_s, results):
                current = result.subject
                timed_s.append(time_once(side.run, side.sync))
            slowest = max(timed_s[-1] for timed_s in times_s)
            if slowest > spec.max_seconds_per_run:
                note = (
                    f"a run took {slowest:.1f} s > bench.max_seconds_per_run={spec.max_seconds_per_run:g}: "
                    f"stopped after {len(times_s[0])} round(s)"
                )
                break
        for side, timed_s, result in zip(prepared, times_s, results):
            current = result.subject
            result.peak_mib = peak_mib(side.run, side.clear, side.device)
            record_timing(result, summarize(timed_s, note))
    except Exception as error:  # noqa: BLE001  (a side that cannot run makes its claims MISSING, the others go on)
        for result in results:
            result.time_ms = result.time_low_ms = result.time_high_ms = result.peak_mib = result.load = result.note = None
            result.runs = 0
            result.reason = f"{current} failed: {_first_line(error)}"
    return results


def run_claims(spec: BenchSpec, progress: bool | None = None) -> ClaimsResult:
    """Measure the pairs behind ``spec.claims`` (``plan_claims``) and judge every claim."""
    require_runtime(spec.claim_runtime, "bench.claim_runtime")
    pairs = plan_claims(spec)
    show = spec.progress if progress is None else progress
    measured: dict[tuple[str, str, str, int], tuple[Measurement, Measurement]] = {}
    with tempfile.TemporaryDirectory(prefix="seqmix-claims-") as scratch:
        for subject, baseline, pass_, length in tqdm(pairs, disable=not show, unit="pair", dynamic_ncols=True):
            sides = measure_pair((subject, baseline), pass_, length, spec, Path(scratch))
            measured[(subject.label, baseline.label, pass_, length)] = (sides[0], sides[1])
    outcomes = [
        judge_claim(name, claim, *measured[(claim.subject, claim.baseline, claim.pass_, claim.length)])
        for name, claim in spec.claims.items()
    ]
    measurements = [m for pair in measured.values() for m in pair]
    return ClaimsResult(spec, environment({}), measurements, outcomes)


def _lowering_models(spec: BenchSpec) -> Iterator[tuple[str, nn.Module, Task]]:
    """(label, model, task) of each trained run, as saved, then of each preset built for ``lowering.task``."""
    for run_dir in spec.lowering.runs:
        model, record = load_run(run_dir)
        yield f"{record['preset']['model']} ({run_dir})", model, build_task(record["task"])
    for subject in spec.presets:
        composed = lowering_config(subject, spec.lowering.task)
        task = build_task(composed.task)
        torch.manual_seed(0)
        yield subject.label, instantiate_model(adapt_model_config(composed.model, task)), task


def run_lowering(spec: BenchSpec, progress: bool | None = None) -> LoweringResult:
    """Measure what lowering buys each model of ``spec`` (exported into ``out_dir/<preset>``) at
    L = ``spec.lengths[0]``, compiled training too when ``compile`` is in ``spec.runtimes``."""
    show = spec.progress if progress is None else progress
    count = len(spec.lowering.runs) + len(spec.presets)
    reports = {}
    for name, model, task in tqdm(_lowering_models(spec), total=count, disable=not show, unit="model", dynamic_ncols=True):
        reports[name] = as_builtin(lowering_report(
            model, task, Path(spec.out_dir) / name.split(" ")[0], length=spec.lengths[0], far=spec.lowering.far,
            compile_training="compile" in spec.runtimes,
        ))
    return LoweringResult(spec, environment({}), reports, as_builtin(matmul_throughput()))


@dataclass
class BenchRun:
    """What one ``run_bench`` did: the printable report, the files written, whether anything failed."""

    report: str
    paths: list[Path]
    failed: bool


def run_bench(spec: BenchSpec) -> BenchRun:
    """Run the grid, the claims or the lowering report of ``spec`` and write their files to ``spec.out_dir``."""
    if spec.mode == "lowering":
        lowering = run_lowering(spec)
        return BenchRun(format_lowering(lowering), write_lowering(lowering, spec.out_dir), lowering.failed)
    if spec.mode == "claims":
        claims = run_claims(spec)
        return BenchRun(format_claims(claims), write_claims(claims, spec.out_dir), claims.failed)
    grid = run_grid(spec)
    return BenchRun(format_grid_report(grid), write_grid_results(grid, spec.out_dir), grid.failed)
