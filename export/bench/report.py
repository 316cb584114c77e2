"""The benchmark's reports: Markdown (``report.md``, ``claims.md``), CSV and JSON, and the plots.

Times are the median of the timed runs with the fastest–slowest run beside them, then measured ÷
minimum (``12× min``: the time over the least the machine allows, ``roofline``); every table is
drawn by ``seqmix.tables.markdown_table``; cells not measured are grouped by reason under
*Not measured*, so a missing runtime is one line, not forty.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path

from seqmix.errors import first_few
from seqmix.tables import markdown_table, write_csv

from .results import ClaimOutcome, ClaimsResult, GridResult, GridRow, LoweringResult, Measurement
from .runtimes import RUNTIMES, TRAINING_RUNTIMES
from .spec import BenchSpec


def busy_line(loads: Sequence[float | None]) -> str | None:
    """A line saying how many of the measurements ran on a machine busier than its cores, or None."""
    busy = [load for load in loads if load is not None]
    if not busy:
        return None
    return (f"machine busy during {len(busy)} of {len(loads)} measurements (load average up to {max(busy):.1f} "
            f"on {os.cpu_count()} cores): their times spread wider than usual")


def _number(value: float | None, unit: str = "") -> str:
    """Three significant digits (no exponent below 10^6), or '—' for None."""
    if value is None:
        return "—"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return text + unit


def _machine_line(env: Mapping, spec: BenchSpec) -> str:
    device = env.get("cuda_device")
    cpu = env.get("processor") or env.get("platform")
    if env.get("cpu_capability"):
        cpu = f"{cpu} ({env['cpu_capability']} kernels)"
    where = f"{cpu}, {env['threads']} torch threads" + (f"; GPU {device} (CUDA {env.get('cuda')})" if device else "")
    runs = f"{spec.repeats} run" + ("s" if spec.repeats != 1 else "")
    allocator = f"; {env['allocator']}" if env.get("allocator") else ""
    return f"torch {env['torch']} on {where}{allocator}. B={spec.batch}, float32, median of {runs} after {spec.warmup} warm-up"


def _is_measured(row: GridRow | None) -> bool:
    return row is not None and row.status == "measured"


def time_range(measured: GridRow | Measurement) -> str:
    """``7.92 (7.8–8.1)``: the median time in ms and the fastest–slowest run; '—' when not timed."""
    if measured.time_ms is None:
        return "—"
    return f"{_number(measured.time_ms)} ({_number(measured.time_low_ms)}–{_number(measured.time_high_ms)})"


def time_and_minimum(row: GridRow) -> str:
    """``7.92 (7.8–8.1), 12× min``: ``time_range`` and measured ÷ minimum, when the subject states its cost."""
    if row.vs_minimum is None:
        return time_range(row)
    return f"{time_range(row)}, {_number(row.vs_minimum, '× min')}"


def roofline_lines(result: GridResult) -> list[str]:
    """The machine's rates and, on the shown runtime, each measured row's minimum work, time and ratio."""
    if not result.machine:
        return []
    lines = ["### Roofline (measured ÷ minimum; minimum = max(FLOPs / matmul rate, bytes / bandwidth))", ""]
    lines += [f"- {rates.describe()}" for rates in result.machine.values()]
    runtime = shown_runtime(result.spec)
    rows = [r for r in result.rows if r.runtime == runtime and r.vs_minimum is not None]
    if rows:
        body = [
            [r.subject, r.pass_, str(r.length), f"{r.flops / 1e9:.3g}", f"{r.bytes / 1e6:.3g}", r.bound, _number(r.minimum_ms),
             time_range(r), _number(r.vs_minimum, "×")]
            for r in rows
        ]
        header = ["subject", "pass", "L", "GFLOP", "MB moved", "bound", "minimum ms", "measured ms", "measured ÷ minimum"]
        lines += ["", f"On {runtime}. FLOPs and bytes are the minimum of each algorithm on the paths that ran (`Mixer.cost`; "
                  "a preset adds the linear layers outside its mixers and counts no embedding or norm, a lower bound).", "",
                  markdown_table(header, body)]
    return lines + [""]


def _cell_text(row: GridRow | None, text: Callable[[GridRow], str]) -> str:
    """``text(row)`` for a measured row (``*`` when a run exceeded the time budget), else skip/FAIL."""
    if row is None:
        return ""
    if row.status != "measured":
        return "skip" if row.status == "skipped" else "FAIL"
    return text(row) + ("*" if row.note else "")


def shown_runtime(spec: BenchSpec) -> str:
    """The runtime of the plots and of the baseline table: ``plot_runtime``, else the first one listed."""
    return spec.plot_runtime if spec.plot_runtime in spec.runtimes else spec.runtimes[0]


def format_grid_report(result: GridResult) -> str:
    """The grid as Markdown: time, memory and speed-up tables, slopes, claims, peers, and what was not measured."""
    spec, rows = result.spec, result.rows
    runtimes = list(spec.runtimes)
    index = {(r.subject, r.runtime, r.pass_, r.length): r for r in rows}
    subjects = list(dict.fromkeys((r.kind, r.subject) for r in rows))
    lines = [
        "## Benchmark grid",
        "",
        _machine_line(result.environment, spec) + f". Mixers and peers at D={spec.width}, presets at their own width. "
        "Times: median (fastest–slowest run) in ms, then measured ÷ minimum (`× min`, see *Roofline*). "
        "`skip`/`FAIL`: see *Not measured*; `*`: a run exceeded the time budget.",
        "",
    ]
    busy = busy_line([r.load for r in rows if r.status == "measured"])
    if busy:
        lines += [f"**{busy}.**", ""]
    for pass_ in spec.passes:
        shown = [r for r in runtimes if pass_ == "forward" or r in TRAINING_RUNTIMES]
        lines += [f"### Time (ms), {pass_}", ""]
        body = [
            [label, str(length)] + [_cell_text(index.get((label, r, pass_, length)), time_and_minimum) for r in shown]
            for _, label in subjects
            for length in spec.lengths
            if any(index.get((label, r, pass_, length)) for r in shown)
        ]
        lines += [markdown_table(["subject", "L", *shown], body), ""]
    lines += roofline_lines(result)
    memory_runtimes = [r for r in runtimes if r in TRAINING_RUNTIMES]
    if memory_runtimes:
        lines += ["### Peak memory (MiB)", ""]
        header = [f"{r} {p}" for r in memory_runtimes for p in spec.passes]
        body = [
            [label, str(length)]
            + [_cell_text(index.get((label, r, p, length)), lambda x: _number(x.peak_mib)) for r in memory_runtimes for p in spec.passes]
            for _, label in subjects
            for length in spec.lengths
        ]
        lines += [markdown_table(["subject", "L", *header], body), ""]
    for kind in ("mixer", "preset"):
        baseline = spec.grid_label(spec.baseline.get(kind))
        measured_kind = [label for k, label in subjects if k == kind or (kind == "mixer" and k == "peer")]
        if not baseline or not measured_kind:
            continue
        runtime = shown_runtime(spec)
        lines += [f"### Speed-up vs `{baseline}` ({runtime}; baseline median time / subject median time)", ""]
        if baseline not in measured_kind:
            lines += [f"None: `{baseline}` (bench.baseline.{kind}) is not among this grid's subjects.", ""]
            continue
        body = [
            [label, pass_]
            + [_cell_text(index.get((label, runtime, pass_, n)), lambda x: _number(x.speedup_vs_baseline, "×")) for n in spec.lengths]
            for label in measured_kind
            for pass_ in spec.passes
        ]
        lines += [markdown_table(["subject", "pass", *[f"L={n}" for n in spec.lengths]], body), ""]
    other = [r for r in runtimes if r != RUNTIMES[r].reference and RUNTIMES[r].reference in runtimes]
    if other:
        lines += ["### Speed-up vs eager (forward; eager median time on the same device / runtime median time; cuda vs CPU eager)", ""]
        body = [
            [label, runtime]
            + [_cell_text(index.get((label, runtime, "forward", n)), lambda x: _number(x.speedup_vs_eager, "×")) for n in spec.lengths]
            for _, label in subjects
            for runtime in other
            if any(_is_measured(index.get((label, runtime, "forward", n))) for n in spec.lengths)
        ]
        lines += [markdown_table(["subject", "runtime", *[f"L={n}" for n in spec.lengths]], body), ""]
    fitted = [s for s in result.slopes if s.slope is not None]
    if fitted:
        lines += ["### Log-log slope of time against L (1 = linear, 2 = quadratic)", ""]
        body = [[s.subject, s.runtime, s.pass_, f"{s.slope:.2f}", ", ".join(map(str, s.lengths))] for s in fitted]
        lines += [markdown_table(["subject", "runtime", "pass", "slope", "over L"], body), ""]
    if result.outcomes:
        lines += [f"### Claims and targets (judged on {spec.claim_runtime})", ""] + claims_table(result.outcomes) + [""]
    if result.peers:
        compared = [p for p in result.peers if p.seqmix_speedup is not None]
        lines += ["### Peers (seqmix speed-up = peer time / seqmix time; memory ratio = seqmix peak / peer peak)", ""]
        body = [
            [p.seqmix, p.peer, p.runtime, p.pass_, str(p.length), _number(p.seqmix_speedup, "×"), _number(p.memory_ratio, "×")]
            for p in compared
        ]
        lines.append(markdown_table(["seqmix", "peer", "runtime", "pass", "L", "seqmix speed-up", "memory ratio"], body))
        lines += [""] + list(dict.fromkeys(f"- {p.peer}: {p.note}" for p in result.peers))
        if len(compared) < len(result.peers):
            lines.append(f"- {len(result.peers) - len(compared)} comparison(s) not made: a side was not measured (see *Not measured*)")
        lines.append("")
    lines += _not_measured(rows)
    return "\n".join(lines).rstrip() + "\n"


def _not_measured(rows: Sequence[GridRow]) -> list[str]:
    """Skipped and failed cells grouped by reason, so a missing runtime is one line, not forty."""
    groups: dict[tuple[str, str], list[GridRow]] = {}
    for row in rows:
        if row.status != "measured":
            groups.setdefault((row.status, row.reason), []).append(row)
    if not groups:
        return []
    body = []
    for (status, reason), group in groups.items():
        cells = sorted({f"{r.subject}/{r.runtime}/{r.pass_}" for r in group})
        lengths = sorted({r.length for r in group})
        where = first_few(cells, 6)
        body.append([status, str(len(group)), f"{where}; L={','.join(map(str, lengths))}", reason])
    return ["### Not measured", "", markdown_table(["status", "cells", "which", "reason"], body), ""]


CSV_FIELDS = tuple("pass" if f.name == "pass_" else f.name for f in fields(GridRow))


def _log_axes(ax, lengths: Sequence[int]) -> None:
    """Log-log axes with the grid's lengths as x ticks and plain numbers (not 10^k) as y ticks."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(lengths))
    ax.set_xticklabels([str(n) for n in lengths])
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.grid(True, which="both", alpha=0.3)


def plot_grid(result: GridResult, out_dir: Path) -> list[Path]:
    """time_vs_length.png, memory_vs_length.png (log-log, one line per subject, on ``shown_runtime``)
    and throughput_by_runtime.png (forward tokens/s per subject, one bar per runtime)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec, rows = result.spec, result.rows
    measured = [r for r in rows if r.status == "measured"]
    kinds = [k for k in ("mixer", "preset") if any(r.kind == k for r in rows)]
    runtime = shown_runtime(spec)
    paths = []
    line_plots = (("time_ms", "time per pass (ms)", "time_vs_length.png"), ("peak_mib", "peak memory (MiB)", "memory_vs_length.png"))
    for metric, ylabel, name in line_plots:
        figure, axes = plt.subplots(len(kinds), len(spec.passes), figsize=(6 * len(spec.passes), 4.2 * len(kinds)), squeeze=False)
        for row_index, kind in enumerate(kinds):
            for col_index, pass_ in enumerate(spec.passes):
                ax = axes[row_index][col_index]
                shown = [r for r in measured if r.runtime == runtime and r.pass_ == pass_ and getattr(r, metric) is not None
                         and (r.kind == kind or (kind == "mixer" and r.kind == "peer"))]
                for label in dict.fromkeys(r.subject for r in shown):
                    line = sorted((r for r in shown if r.subject == label), key=lambda r: r.length)
                    style = "--" if line[0].kind == "peer" else "-"
                    ax.plot([r.length for r in line], [getattr(r, metric) for r in line], style, marker="o", label=label)
                _log_axes(ax, spec.lengths)
                ax.set_title(f"{kind}s, {pass_}, {runtime}")
                ax.set_xlabel("sequence length L")
                ax.set_ylabel(ylabel)
                if shown:
                    ax.legend(fontsize=7)
                else:
                    ax.text(0.5, 0.5, "nothing measured", transform=ax.transAxes, ha="center")
        figure.tight_layout()
        paths.append(out_dir / name)
        figure.savefig(paths[-1], dpi=120)
        plt.close(figure)

    length = _throughput_length(result)
    forward = [r for r in measured if r.pass_ == "forward" and r.length == length]
    labels = list(dict.fromkeys(r.subject for r in forward))
    runtimes = [rt for rt in spec.runtimes if any(r.runtime == rt for r in forward)]
    figure, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.5))
    width = 0.8 / max(1, len(runtimes))
    for offset, runtime in enumerate(runtimes):
        values = {r.subject: r.tokens_per_s for r in forward if r.runtime == runtime}
        xs = [i + offset * width for i, label in enumerate(labels) if label in values]
        ax.bar(xs, [values[label] for label in labels if label in values], width, label=runtime)
    ax.set_xticks([i + width * (len(runtimes) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (forward)")
    ax.set_title(f"Throughput by runtime at L={length}, B={spec.batch}")
    if runtimes:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.text(0.5, 0.5, "nothing measured", transform=ax.transAxes, ha="center")
    figure.tight_layout()
    paths.append(out_dir / "throughput_by_runtime.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)
    return paths


def _throughput_length(result: GridResult) -> int:
    """``plot_length``, else the longest L whose forward was measured on every runtime that measured any."""
    if result.spec.plot_length is not None:
        return result.spec.plot_length
    forward = [r for r in result.rows if r.status == "measured" and r.pass_ == "forward"]
    runtimes = {r.runtime for r in forward}
    complete = [n for n in result.spec.lengths if runtimes and runtimes <= {r.runtime for r in forward if r.length == n}]
    return max(complete or result.spec.lengths)


def write_grid_results(result: GridResult, out_dir: str | Path) -> list[Path]:
    """results.json (everything), results.csv (one line per cell), report.md and, with ``plots``, the PNGs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path, report_path = _write_json(out / "results.json", result.to_dict()), out / "results.csv", out / "report.md"
    write_csv([row.to_dict() for row in result.rows], csv_path, columns=CSV_FIELDS)
    report_path.write_text(format_grid_report(result), encoding="utf-8")
    paths = [json_path, csv_path, report_path]
    if result.spec.plots:
        paths += plot_grid(result, out)
    return paths


def claims_table(outcomes: Sequence[ClaimOutcome]) -> list[str]:
    """The claims beside our figures with their verdicts, and a line saying how each is computed."""
    body = []
    for outcome in outcomes:
        claim = outcome.claim
        unit = "" if claim.metric == "slope" else "×"
        compared = (f"`{claim.subject}`, {claim.pass_}, over L" if claim.metric == "slope" else
                    f"`{claim.subject}` vs `{claim.baseline}`, {claim.pass_}, L={claim.length}")
        body.append([
            claim.title,
            claim.source,
            compared,
            claim.metric,
            _number(claim.figure, unit),
            _number(outcome.ours, unit),
            outcome.verdict + (f" ({outcome.reason})" if outcome.reason else ""),
        ])
    return [
        markdown_table(["claim", "source", "compared here", "metric", "figure", "ours", "verdict"], body),
        "",
        ("speed = baseline median time / subject median time (PASS when at least the figure); memory = subject peak / "
         "baseline peak, slope = log-log slope of time against L (PASS when at most the figure); — : context row, no figure."),
    ]


def format_claims(result: ClaimsResult) -> str:
    """The claims as Markdown: the papers' figures beside ours with PASS/MISS, then the measurements."""
    spec = result.spec
    runtime = "CPU, eager" if spec.claim_runtime == "eager" else f"GPU {result.environment.get('cuda_device')}, eager"
    lines = [
        "## Paper speed claims, measured side by side",
        "",
        _machine_line(result.environment, spec) + f"; {runtime}; the two sides' timed runs interleaved.",
        "",
    ]
    busy = busy_line([m.load for m in result.measurements if m.time_ms is not None])
    if busy:
        lines += [f"**{busy}.**", ""]
    lines += claims_table(result.outcomes) + ["", "### Measurements", ""]
    body = [
        [f"`{m.subject}`", m.pass_, str(m.length), time_range(m), _number(m.peak_mib),
         f"{m.parameters:,}" if m.parameters else "—", m.impl or "", m.reason or m.note or ""]
        for m in result.measurements
    ]
    lines.append(markdown_table(
        ["subject", "pass", "L", "time ms (fastest–slowest)", "peak MiB", "parameters", "compute paths", "note"], body
    ))
    subjects = {m.subject for m in result.measurements}
    lines += ["", "### Subjects", ""]
    for label, subject in spec.claim_subjects.items():
        if label in subjects:
            what = (f"preset `{subject.name}`" + (f" with {', '.join(subject.overrides)}" if subject.overrides else "")
                    if subject.kind == "preset" else
                    f"mixer `{subject.label if subject.impl is None else subject.name}` impl {subject.impl or 'default'}, "
                    f"D={spec.width}" + (f", options {dict(subject.options)}" if subject.options else ""))
            lines.append(f"- `{label}`: {what}")
    return "\n".join(lines).rstrip() + "\n"


def _median_range(timing: dict, digits: int) -> str:
    """``12.3 [11.9–13.0]``: a Timing's (``as_dict``) median and fastest–slowest call, in ms."""
    return f"{timing['median_ms']:.{digits}f} [{timing['low_ms']:.{digits}f}–{timing['high_ms']:.{digits}f}]"


def lowering_table(reports: dict[str, dict]) -> str:
    """One row per preset: the four ratios (of medians) and their inputs, times as median [fastest–slowest]."""
    header = ["preset", "params", "ORT / eager at L", "int8: speed, size, metric change", "step at far / near (eager, ORT)",
              "compile / eager training"]
    body = []
    for name, r in reports.items():
        ort, q = r["onnxruntime_vs_eager"], r["int8_vs_fp32"]
        growth = r.get("step_growth")
        step_cell = "no step graph"
        if growth:
            capped = f", cache ≤ {growth['cache_limit']}" if growth["cache_limit"] else ""
            step_cell = (f"{growth['eager_ratio']:.2f}, {growth.get('onnxruntime_ratio', float('nan')):.2f} "
                         f"({growth['far']} vs {growth['near']}{capped})")
        compiled = r.get("compile_vs_eager_training")
        compile_cell = (f"{compiled['speedup']:.2f}× ({_median_range(compiled['eager'], 0)} → "
                        f"{_median_range(compiled['compiled'], 0)} ms)") if compiled else "not run"
        ort_cell = (f"{ort['speedup']:.2f}× ({_median_range(ort['eager'], 1)} → {_median_range(ort['onnxruntime'], 1)} ms, "
                    f"L={ort['length']})")
        int8_cell = (f"{q['speedup']:.2f}×, {100 * q['size_ratio']:.0f}%, {q['metric_change']:+.4f} "
                     f"{'pts' if q['metric'] == 'accuracy' else 'bits'}")
        body.append([name, f"{r['parameters']:,}", ort_cell, int8_cell, step_cell, compile_cell])
    return markdown_table(header, body, right=range(1, len(header)))


def throughput_line(measured: dict) -> str:
    """``matmul_throughput``'s result as one sentence for the report."""
    rows, inner, columns = measured["shape"]
    return (f"float32 matmul ({rows}×{inner} · {inner}×{columns}, {measured['threads']} threads, {measured['cpu']}): "
            f"PyTorch {measured['torch_gflops']:.0f} GFLOP/s, ONNX Runtime {measured['onnxruntime_gflops']:.0f} GFLOP/s")


def format_lowering(result: LoweringResult) -> str:
    """What lowering buys as Markdown: one row per model, then the machine's matmul throughput."""
    return "\n".join([
        "## What lowering buys",
        "",
        f"torch {result.environment['torch']}, {result.environment['threads']} torch threads; ratios of medians, "
        "times as median [fastest–slowest] in ms.",
        "",
        lowering_table(result.reports),
        "",
        throughput_line(result.matmul),
    ]) + "\n"


def _write_json(path: Path, data: dict) -> Path:
    """``data`` as indented UTF-8 JSON at ``path``."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _write_markdown_and_json(out_dir: str | Path, stem: str, markdown: str, data: dict) -> list[Path]:
    """``<stem>.md`` and ``<stem>.json`` in ``out_dir`` (created), in that order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / f"{stem}.md"
    md_path.write_text(markdown, encoding="utf-8")
    return [md_path, _write_json(out / f"{stem}.json", data)]


def write_lowering(result: LoweringResult, out_dir: str | Path) -> list[Path]:
    """lowering.md (the table) and lowering.json (everything) in ``out_dir``."""
    return _write_markdown_and_json(out_dir, "lowering", format_lowering(result), result.to_dict())


def write_claims(result: ClaimsResult, out_dir: str | Path) -> list[Path]:
    """claims.md (the table) and claims.json (everything) in ``out_dir``."""
    return _write_markdown_and_json(out_dir, "claims", format_claims(result), result.to_dict())


