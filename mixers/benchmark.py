"""Speed and memory benchmark of every registered mixer and compute path.

For each mixer, each impl in its class's ``impls``, each pass and each sequence length it measures
on inputs x (B, L, D) float32:

- time: the median of ``repeats`` timed runs after ``warmup`` untimed runs, with the fastest and
  the slowest of them (``seqmix.timing.time_calls``, the device synchronised before each clock
  read). The ``forward`` pass runs the module in
  eval mode under ``torch.no_grad``; the ``fwd+bwd`` pass runs it in train mode and backpropagates
  ``output.sum()`` to x and every parameter, their gradients cleared (set to None) first.
- peak memory over ONE extra run, relative to the memory allocated when the run starts, so the
  inputs and parameters are not counted but the output, the activations saved for backward, the
  temporaries and the new gradients are. On CUDA this is the caching allocator's
  ``max_memory_allocated``. On CPU there is no allocator counter, so the run is profiled with
  ``profile_memory=True`` and the peak is the maximum of the running sum of its allocation events
  (+bytes allocated, −bytes freed, in time order): tensor allocations made by torch during the
  run, relative to its start. Memory that is not a torch tensor (Python objects, library
  workspaces) is not counted.
- tokens/s: B·L divided by the row's median time (forward throughput for ``forward`` rows,
  training-step throughput for ``fwd+bwd`` rows).
- slope: least-squares fit of log(time) against log(L) per (mixer, impl, pass) over the lengths
  measured; 1 is linear, 2 quadratic.

Runs that cannot fit are skipped and reported with a reason, never dropped: a configuration whose
estimated attention score matrices exceed the memory budget, and the longer lengths of a
(mixer, impl, pass) once one of its runs took longer than the time budget.
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from seqmix.contract import Mixer
from seqmix.errors import SeqmixError, require_int
from seqmix.registry import build_mixer, list_mixers, mixer_class
from seqmix.timing import time_calls

PASSES = ("forward", "fwd+bwd")
DTYPE = torch.float32

# (L, L)-sized float32 matrices alive at the peak of the math attention path, measured with the
# CPU profiler at L = 1024 and 2048: scores and softmax weights (plus the causal bool mask) in the
# forward, about one more for the saved activations and their gradients in the backward.
SCORE_COPIES = {"forward": 2.5, "fwd+bwd": 3.5}

SPEEDUP_TARGET = 10.0
SPEEDUP_LENGTH = 4096
SLOPE_TARGET = 1.15
SLOPE_TARGETS = (("ema", "chunked"), ("cema", "chunked"), ("tcn", "conv"), ("gated_attention", "reference"))


def record(row) -> dict:
    """A result dataclass as a dict for JSON and CSV, its ``pass_`` field named ``pass``."""
    return {"pass" if key == "pass_" else key: value for key, value in asdict(row).items()}


@dataclass(frozen=True)
class BenchConfig:
    """What to measure.

    Attributes:
        lengths: sequence lengths L, measured in increasing order.
        batch: B.
        width: D.
        mixers: registered names to measure; None for all of ``list_mixers()``.
        repeats: timed runs per measurement (the median is reported).
        warmup: untimed runs before them.
        device: ``cpu`` or ``cuda``.
        max_seconds_per_run: a (mixer, impl, pass) whose run takes longer skips its longer lengths.
        memory_budget_gb: skip a configuration whose estimated score matrices exceed this (GiB).
    """

    lengths: tuple[int, ...] = (1024, 4096, 16384)
    batch: int = 1
    width: int = 256
    mixers: tuple[str, ...] | None = None
    repeats: int = 5
    warmup: int = 2
    device: str = "cpu"
    max_seconds_per_run: float = 20.0
    memory_budget_gb: float = 4.0

    def __post_init__(self):
        if not self.lengths:
            raise SeqmixError("benchmark: lengths is empty; give at least one sequence length")
        for length in self.lengths:
            require_int("benchmark", "length", length, 1, "sequence length L")
        require_int("benchmark", "batch", self.batch, 1, "B")
        require_int("benchmark", "width", self.width, 1, "D")
        require_int("benchmark", "repeats", self.repeats, 1, "timed runs")
        require_int("benchmark", "warmup", self.warmup, 0, "untimed runs")
        if self.device not in ("cpu", "cuda"):
            raise SeqmixError(f"benchmark: device={self.device!r} is not valid; expected 'cpu' or 'cuda'")
        if not self.max_seconds_per_run > 0:
            raise SeqmixError(f"benchmark: max_seconds_per_run={self.max_seconds_per_run!r} must be positive")
        if not self.memory_budget_gb > 0:
            raise SeqmixError(f"benchmark: memory_budget_gb={self.memory_budget_gb!r} must be positive")
        for name in self.mixers or ():
            mixer_class(name)  # unknown names fail here, listing the registered ones


@dataclass
class Row:
    """One measured (or skipped) cell: a mixer, impl, pass and length.

    ``time_ms`` is the median of the timed runs, ``time_low_ms`` and ``time_high_ms`` the fastest
    and the slowest; ``load`` the machine's load average when it exceeded its cores during the
    runs. ``skipped`` holds the reason when the cell was not measured; ``note`` flags a
    measurement cut short by the time budget.
    """

    mixer: str
    impl: str
    pass_: str
    length: int
    batch: int
    width: int
    time_ms: float | None = None
    time_low_ms: float | None = None
    time_high_ms: float | None = None
    peak_mib: float | None = None
    tokens_per_s: float | None = None
    runs: int = 0
    load: float | None = None
    skipped: str | None = None
    note: str | None = None

    def to_dict(self) -> dict:
        return record(self)


@dataclass
class Slope:
    """Log-log slope of time against L for one (mixer, impl, pass); None with a reason when unfit."""

    mixer: str
    impl: str
    pass_: str
    slope: float | None
    lengths: list[int]
    reason: str | None = None

    def to_dict(self) -> dict:
        return record(self)


@dataclass
class BenchResult:
    """Everything one benchmark produced: the configuration, the cells, the slopes, the target checks."""

    config: BenchConfig
    environment: dict
    rows: list[Row]
    slopes: list[Slope]
    targets: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "environment": self.environment,
            "rows": [row.to_dict() for row in self.rows],
            "slopes": [slope.to_dict() for slope in self.slopes],
            "targets": self.targets,
        }


# --- measuring ------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """The torch device for ``cpu`` or ``cuda``; asking for CUDA without one is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SeqmixError(
            f"benchmark: --device cuda was asked for but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu"
        )
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so the clock reads the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_of_allocations(events: Sequence[tuple[int, int]]) -> int:
    """Peak of the running sum of (time, ±bytes) allocation events, relative to the start (>= 0)."""
    total = peak = 0
    for _, nbytes in sorted(events):
        total += nbytes
        peak = max(peak, total)
    return peak


def peak_memory_bytes(run: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by torch during one call of ``run``, relative to its start.

    CUDA: the caching allocator's peak counter. CPU: the profiler's allocation events.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    # The raw records, not prof.events(): the latter folds allocations made inside an operator
    # into that operator's net total, and keeps as "[memory]" events only those made between
    # operators, which hides the temporaries of every op.
    records = prof.profiler.kineto_results.events()
    return peak_of_allocations([(e.start_ns(), e.nbytes()) for e in records if e.name() == "[memory]"])


def score_matrix_bytes(mixer: Mixer, batch: int, length: int, pass_: str) -> int:
    """Estimated bytes of the attention score matrices alive at once in eager PyTorch; 0 for mixers without them.

    Each mixer counts its own scores (``Mixer.attention_scores``, nested mixers included); they
    are float32 at least, and a pass keeps ``SCORE_COPIES`` of them alive.
    """
    elements = sum(m.attention_scores(batch, length, fused=True) for m in mixer.modules() if isinstance(m, Mixer))
    return int(elements * 4 * SCORE_COPIES[pass_])


def make_run(mixer: Mixer, x: torch.Tensor, pass_: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """The callable one run executes for ``pass_``, and one that clears the gradients it leaves.

    Args:
        mixer: the module, switched to eval (forward) or train (fwd+bwd) mode here.
        x: (B, L, D) input.
    Returns:
        (run, clear): run discards its output, so nothing it allocated outlives it but gradients.
    """
    if pass_ == "forward":
        mixer.eval()

        def forward() -> None:
            with torch.no_grad():
                mixer(x)

        return forward, lambda: None

    mixer.train()
    x_grad = x.detach().clone().requires_grad_(True)

    def clear() -> None:
        mixer.zero_grad(set_to_none=True)
        x_grad.grad = None

    def forward_backward() -> None:
        clear()
        mixer(x_grad).sum().backward()

    return forward_backward, clear


def measure(mixer: Mixer, x: torch.Tensor, pass_: str, config: BenchConfig, device: torch.device) -> dict:
    """Time and peak memory of one pass of ``mixer`` on x (B, L, D).

    Returns the Row fields time_ms, time_low_ms, time_high_ms, peak_mib, tokens_per_s, runs, load
    and note; a run over ``max_seconds_per_run`` stops the repeats there (``time_calls``).
    """
    run, clear = make_run(mixer, x, pass_)
    timing = time_calls(
        run, config.repeats, config.warmup, sync=lambda: synchronize(device), max_seconds=config.max_seconds_per_run
    )
    # Gradients left by the last run would be freed inside the profiled run and offset its peak.
    clear()
    peak = peak_memory_bytes(run, device)
    clear()
    batch, length, _ = x.shape
    return {
        "time_ms": timing.median_ms,
        "time_low_ms": timing.low_ms,
        "time_high_ms": timing.high_ms,
        "peak_mib": peak / 2**20,
        "tokens_per_s": batch * length / (timing.median_ms / 1e3),
        "runs": timing.runs,
        "load": timing.load,
        "note": timing.note,
    }


def run_benchmark(config: BenchConfig, progress: bool = True) -> BenchResult:
    """Measure every (mixer, impl, pass, length) of ``config``; see the module docstring.

    Args:
        config: what to measure.
        progress: show a tqdm bar over the grid (on stderr).
    """
    device = resolve_device(config.device)
    names = list(config.mixers) if config.mixers else list_mixers()
    lengths = sorted(set(config.lengths))
    grid = [(name, impl, pass_) for name in names for impl in mixer_class(name).impls for pass_ in PASSES]
    rows: list[Row] = []
    bar = tqdm(total=len(grid) * len(lengths), disable=not progress, unit="cell", dynamic_ncols=True)
    for name, impl, pass_ in grid:
        # Set once a run of this (mixer, impl, pass) exceeds the time budget: longer L only take longer.
        too_slow: str | None = None
        for length in lengths:
            bar.set_description(f"{name}/{impl} {pass_} L={length}")
            row = Row(name, impl, pass_, length, config.batch, config.width)
            torch.manual_seed(0)
            mixer = build_mixer(name, config.width, impl=impl).to(device=device, dtype=DTYPE)
            estimate = score_matrix_bytes(mixer, config.batch, length, pass_)
            if too_slow is not None:
                row.skipped = too_slow
            elif estimate > config.memory_budget_gb * 2**30:
                row.skipped = (
                    f"estimated score matrices {estimate / 2**30:.1f} GiB > --memory-budget-gb {config.memory_budget_gb:g}"
                )
            else:
                x = torch.randn(config.batch, length, config.width, device=device, dtype=DTYPE)
                for key, value in measure(mixer, x, pass_, config, device).items():
                    setattr(row, key, value)
                if row.note is not None:
                    too_slow = f"L={length} took {row.time_ms / 1e3:.1f} s > --max-seconds-per-run {config.max_seconds_per_run:g}"
            del mixer
            rows.append(row)
            bar.update()
    bar.close()
    slopes = fit_slopes(rows)
    result = BenchResult(config, environment(device), rows, slopes)
    result.targets = target_checks(rows, slopes)
    return result


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; ``platform.processor()`` elsewhere, often
    just the architecture). Speeds depend on it: MKL, PyTorch's CPU BLAS, takes slower code paths
    on non-Intel CPUs than ONNX Runtime's MLAS does."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment(device: torch.device) -> dict:
    """What the numbers depend on besides the code: versions, threads, the device."""
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": cpu_name(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


# --- analysis -------------------------------------------------------------------------------


def fit_slopes(rows: Sequence[Row]) -> list[Slope]:
    """Least-squares slope of log(time) against log(L) per (mixer, impl, pass), in row order."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.mixer, row.impl, row.pass_), []).append(row)
    slopes = []
    for (name, impl, pass_), group in groups.items():
        measured = [row for row in group if row.skipped is None]
        lengths = [row.length for row in measured]
        if len(lengths) < 2:
            slopes.append(Slope(name, impl, pass_, None, lengths, f"needs 2 measured lengths, has {len(lengths)}"))
            continue
        slopes.append(Slope(name, impl, pass_, loglog_slope(lengths, [row.time_ms for row in measured]), lengths))
    return slopes


def loglog_slope(lengths: Sequence[int], times: Sequence[float]) -> float:
    """Least-squares slope of log(time) against log(L) over at least two distinct lengths."""
    return statistics.linear_regression([math.log(n) for n in lengths], [math.log(t) for t in times]).slope


def _find_row(rows: Sequence[Row], name: str, impl: str, pass_: str, length: int) -> Row | None:
    return next((r for r in rows if (r.mixer, r.impl, r.pass_, r.length) == (name, impl, pass_, length)), None)


def target_checks(rows: Sequence[Row], slopes: Sequence[Slope]) -> list[str]:
    """The project's two speed targets, as printable lines computed from the measurements."""
    lines = []
    label = f"chunked EMA vs FFT EMA forward at L={SPEEDUP_LENGTH}"
    cells = {impl: _find_row(rows, "ema", impl, "forward", SPEEDUP_LENGTH) for impl in ("chunked", "fft")}
    missing = []
    for impl, row in cells.items():
        if row is None:
            missing.append(f"ema/{impl} forward L={SPEEDUP_LENGTH} was not in the grid")
        elif row.skipped is not None:
            missing.append(f"ema/{impl} forward L={SPEEDUP_LENGTH} skipped: {row.skipped}")
    if missing:
        lines.append(f"{label}: MISSING ({'; '.join(missing)}) (target ≥ {SPEEDUP_TARGET:g}×)")
    else:
        speedup = cells["fft"].time_ms / cells["chunked"].time_ms
        verdict = "PASS" if speedup >= SPEEDUP_TARGET else "MISS"
        lines.append(f"{label}: {speedup:.1f}× (target ≥ {SPEEDUP_TARGET:g}×) {verdict}")

    items = ", ".join(f"{name}/{impl}" for name, impl in SLOPE_TARGETS)
    lines.append(f"slopes (target ≤ {SLOPE_TARGET}): {items}:")
    for name, impl in SLOPE_TARGETS:
        for pass_ in PASSES:
            fit = next((s for s in slopes if (s.mixer, s.impl, s.pass_) == (name, impl, pass_)), None)
            if fit is None:
                lines.append(f"  {name}/{impl} {pass_}: MISSING (was not in the grid)")
            elif fit.slope is None:
                lines.append(f"  {name}/{impl} {pass_}: MISSING ({fit.reason})")
            else:
                verdict = "PASS" if fit.slope <= SLOPE_TARGET else "MISS"
                lines.append(f"  {name}/{impl} {pass_}: {fit.slope:.2f} {verdict}")
    return lines


# --- reporting ------------------------------------------------------------------------------


def _table(header: Sequence[str], body: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """Fixed-width columns; a row shorter than the header runs its last cell across the rest."""
    widths = [len(h) for h in header]
    for cells in body:
        if len(cells) == len(header):
            widths = [max(w, len(c)) for w, c in zip(widths, cells)]

    def line(cells: Sequence[str]) -> str:
        parts = []
        for i, cell in enumerate(cells):
            if i == len(cells) - 1 and len(cells) < len(header):
                parts.append(cell)
            else:
                parts.append(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]))
        return "  ".join(parts).rstrip()

    return [line(header), line(["-" * w for w in widths])] + [line(cells) for cells in body]


def _milliseconds(value: float) -> str:
    # Three significant digits below 1 ms, so a near-free path does not print as 0.00.
    return f"{value:.2f}" if value >= 1 else f"{value:#.3g}"


def busy_line(loads: Sequence[float | None]) -> str | None:
    """A line saying how many of the measurements ran on a machine busier than its cores, or None."""
    busy = [load for load in loads if load is not None]
    if not busy:
        return None
    return (f"machine busy during {len(busy)} of {len(loads)} measurements (load average up to {max(busy):.1f} "
            f"on {os.cpu_count()} cores): their times spread wider than usual")


def format_report(result: BenchResult) -> str:
    """The results table, the slope table and the target checks, as printable text.

    Times are the median of the timed runs with the fastest–slowest run in parentheses.
    """
    cfg = result.config
    env = result.environment
    lines = [
        f"mixers benchmark: B={cfg.batch} D={cfg.width} float32 on {env['device']} "
        f"({env.get('device_name', env['processor'] or env['platform'])}, {env['threads']} threads, torch {env['torch']}); "
        f"median of {cfg.repeats} runs after {cfg.warmup} warmup",
        "",
    ]
    body = []
    for row in result.rows:
        head = [row.mixer, row.impl, row.pass_, str(row.length)]
        if row.skipped is not None:
            body.append(head + [f"skipped: {row.skipped}"])
        else:
            time_ms = f"{_milliseconds(row.time_ms)} ({_milliseconds(row.time_low_ms)}–{_milliseconds(row.time_high_ms)})"
            cells = [time_ms, f"{row.peak_mib:.1f}", f"{row.tokens_per_s:,.0f}", row.note or ""]
            body.append(head + cells)
    header = ["mixer", "impl", "pass", "L", "time ms (fastest–slowest)", "peak MiB", "tokens/s", "note"]
    lines += _table(header, body, right={3, 4, 5, 6})
    busy = busy_line([row.load for row in result.rows if row.skipped is None])
    lines += [busy, ""] if busy else [""]
    body = []
    for fit in result.slopes:
        value = f"{fit.slope:.2f}" if fit.slope is not None else f"n/a ({fit.reason})"
        body.append([fit.mixer, fit.impl, fit.pass_, value, ", ".join(map(str, fit.lengths))])
    lines += _table(["mixer", "impl", "pass", "slope", "over L"], body, right=set())
    lines.append("")
    lines += result.targets
    return "\n".join(lines)


CSV_FIELDS = ("mixer", "impl", "pass", "length", "batch", "width", "time_ms", "time_low_ms", "time_high_ms", "peak_mib",
              "tokens_per_s", "runs", "load", "skipped", "note")


def write_results(result: BenchResult, out_dir: str | Path) -> list[Path]:
    """Write results.json (everything) and results.csv (one line per cell) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "results.json", out / "results.csv"
    json_path.write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in result.rows:
            writer.writerow(row.to_dict())
    return [json_path, csv_path]
