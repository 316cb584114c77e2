"""What a benchmark run produced, and what is computed from it: the grid's rows, its ratios,
log-log slopes and peer comparisons, the claims' measurements, and every claim judged.

Ratios come from the same run, because a shared machine's speed drifts between runs:
``speedup_vs_eager`` (the time of the same subject, pass and L on the runtime's ``reference``
/ this time), ``speedup_vs_baseline`` (the baseline subject's time at the same runtime, pass and
L / this time; ``baseline.mixer`` for mixers and peers, ``baseline.preset`` for presets),
``memory_vs_baseline`` (this peak / the baseline's), per peer ``seqmix_speedup`` (peer time /
seqmix time) and ``memory_ratio`` (seqmix peak / peer peak), and per claim its metric
(``spec.Claim``). Slopes are least-squares fits of log(time) against log(L); 1 is linear, 2 quadratic.
``vs_minimum`` is the time over the least time the machine allows the subject's algorithm, from
its FLOPs and bytes and the machine's rates measured in the same run (``roofline``).
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from seqmix.contract import Cost
from seqmix.timing import Timing

from .peers import PEERS
from .roofline import MachineRates
from .runtimes import RUNTIMES
from .spec import BenchSpec, Claim, spec_dict


def record(row) -> dict:
    """A result dataclass as a dict for JSON and CSV, its ``pass_`` field named ``pass``."""
    return {"pass" if key == "pass_" else key: value for key, value in asdict(row).items()}


@dataclass
class GridRow:
    """One grid cell's outcome; ``status`` is ``measured``, ``skipped`` or ``failed`` (then ``reason``).

    ``time_ms`` is the median of the timed runs, ``time_low_ms`` and ``time_high_ms`` the fastest
    and the slowest; ``load`` the machine's load average when it exceeded its cores. ``flops`` and
    ``bytes`` are the minimum work of the pass on the paths that ran (``roofline.subject_cost``; None
    for a peer), ``minimum_ms`` the least time the machine allows it and ``bound`` which limit sets
    that time (``compute`` or ``memory``), ``vs_minimum`` = ``time_ms`` / ``minimum_ms``.
    """

    kind: str
    subject: str
    runtime: str
    pass_: str
    length: int
    batch: int
    width: int | None = None
    device: str | None = None
    impl: str | None = None
    time_ms: float | None = None
    time_low_ms: float | None = None
    time_high_ms: float | None = None
    peak_mib: float | None = None
    tokens_per_s: float | None = None
    flops: float | None = None
    bytes: float | None = None
    minimum_ms: float | None = None
    vs_minimum: float | None = None
    bound: str | None = None
    runs: int = 0
    load: float | None = None
    setup_s: float | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_baseline: float | None = None
    memory_vs_baseline: float | None = None
    status: str = "measured"
    reason: str | None = None
    note: str | None = None

    def to_dict(self) -> dict:
        return record(self)


@dataclass
class GridSlope:
    """Log-log slope of time against L for one (subject, runtime, pass); None with a reason when unfit."""

    subject: str
    runtime: str
    pass_: str
    slope: float | None
    lengths: list[int]
    reason: str | None = None

    def to_dict(self) -> dict:
        return record(self)


@dataclass
class PeerComparison:
    """A peer against its seqmix subject at one runtime, pass and L.

    ``seqmix_speedup`` = peer time / seqmix time; ``memory_ratio`` = seqmix peak / peer peak;
    None with a reason when either side was not measured.
    """

    peer: str
    seqmix: str
    runtime: str
    pass_: str
    length: int
    seqmix_speedup: float | None = None
    memory_ratio: float | None = None
    reason: str | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return record(self)


@dataclass
class GridResult:
    """Everything ``run_grid`` produced; ``outcomes`` are its claims judged from its rows, ``machine``
    the rates of each device its rows are set against ({device: MachineRates})."""

    spec: BenchSpec
    environment: dict
    rows: list[GridRow]
    slopes: list[GridSlope]
    peers: list[PeerComparison]
    outcomes: list[ClaimOutcome]
    machine: dict[str, MachineRates] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any(row.status == "failed" for row in self.rows)

    def to_dict(self) -> dict:
        return {
            "spec": spec_dict(self.spec),
            "environment": self.environment,
            "rows": [row.to_dict() for row in self.rows],
            "slopes": [slope.to_dict() for slope in self.slopes],
            "peers": [peer.to_dict() for peer in self.peers],
            "claims": [outcome.to_dict() for outcome in self.outcomes],
            "roofline": {device: rates.to_dict() for device, rates in self.machine.items()},
        }


@dataclass
class Measurement:
    """One subject's side of an interleaved pair: median time (with the fastest and slowest run and
    the load average when the machine was busier than its cores), peak memory, parameter count."""

    subject: str
    pass_: str
    length: int
    time_ms: float | None = None
    time_low_ms: float | None = None
    time_high_ms: float | None = None
    peak_mib: float | None = None
    parameters: int | None = None
    runs: int = 0
    load: float | None = None
    impl: str | None = None
    reason: str | None = None
    note: str | None = None

    def to_dict(self) -> dict:
        return record(self)


@dataclass
class ClaimOutcome:
    """A claim set beside our measurement: ``ours`` is our figure (a ratio or a slope), ``verdict``
    PASS, MISS, — (no figure to meet) or MISSING (then ``reason``)."""

    name: str
    claim: Claim
    ours: float | None
    verdict: str
    reason: str | None = None

    def to_dict(self) -> dict:
        data = asdict(self.claim)
        data["pass"] = data.pop("pass_")
        return {"name": self.name, **data, "ours": self.ours, "verdict": self.verdict, "reason": self.reason}


@dataclass
class ClaimsResult:
    """Everything ``run_claims`` produced."""

    spec: BenchSpec
    environment: dict
    measurements: list[Measurement]
    outcomes: list[ClaimOutcome]

    @property
    def failed(self) -> bool:
        return any(outcome.verdict == "MISSING" for outcome in self.outcomes)

    def to_dict(self) -> dict:
        return {
            "spec": spec_dict(self.spec),
            "environment": self.environment,
            "measurements": [m.to_dict() for m in self.measurements],
            "claims": [outcome.to_dict() for outcome in self.outcomes],
        }


@dataclass
class LoweringResult:
    """Everything ``run_lowering`` produced: per model, its ``lowering.lowering_report`` (ratios of
    medians with their Timings), and the machine's float32 matmul throughput as their context."""

    spec: BenchSpec
    environment: dict
    reports: dict[str, dict]
    matmul: dict

    @property
    def failed(self) -> bool:
        """Never: a model that cannot be measured stops the run with its error instead."""
        return False

    def to_dict(self) -> dict:
        return {"spec": spec_dict(self.spec), "environment": self.environment, "matmul": self.matmul, "reports": self.reports}


def record_timing(row: GridRow | Measurement, timing: Timing) -> None:
    """Copy a Timing into a grid row or a claims measurement."""
    row.time_ms, row.time_low_ms, row.time_high_ms = timing.median_ms, timing.low_ms, timing.high_ms
    row.runs, row.load, row.note = timing.runs, timing.load, timing.note


def add_ratios(rows: Sequence[GridRow], spec: BenchSpec) -> None:
    """Fill speedup_vs_eager, speedup_vs_baseline and memory_vs_baseline of the measured rows."""
    measured = {(r.subject, r.runtime, r.pass_, r.length): r for r in rows if r.status == "measured"}
    for row in measured.values():
        eager = measured.get((row.subject, RUNTIMES[row.runtime].reference, row.pass_, row.length))
        if eager is not None:
            row.speedup_vs_eager = eager.time_ms / row.time_ms
        baseline_label = spec.grid_label(spec.baseline.get("preset" if row.kind == "preset" else "mixer"))
        baseline = measured.get((baseline_label, row.runtime, row.pass_, row.length))
        if baseline is not None:
            row.speedup_vs_baseline = baseline.time_ms / row.time_ms
            if row.peak_mib is not None and baseline.peak_mib:
                row.memory_vs_baseline = row.peak_mib / baseline.peak_mib


def add_roofline(rows: Sequence[GridRow], machine: dict[str, MachineRates]) -> None:
    """Fill minimum_ms, bound and vs_minimum of the measured rows with a cost, from their device's rates
    (none when the minimum is 0: a subject that neither computes nor moves anything)."""
    for row in rows:
        rates = machine.get(RUNTIMES[row.runtime].device)
        if row.status != "measured" or row.flops is None or rates is None:
            continue
        cost = Cost(row.flops, row.bytes)
        row.minimum_ms, row.bound = rates.minimum_ms(cost), rates.bound(cost)
        if row.minimum_ms > 0:
            row.vs_minimum = row.time_ms / row.minimum_ms


def loglog_slope(lengths: Sequence[int], times: Sequence[float]) -> float:
    """Least-squares slope of log(time) against log(L) over at least two distinct lengths."""
    return statistics.linear_regression([math.log(n) for n in lengths], [math.log(t) for t in times]).slope


def fit_grid_slopes(rows: Sequence[GridRow]) -> list[GridSlope]:
    """Log-log slope of time against L per (subject, runtime, pass), in row order."""
    groups: dict[tuple[str, str, str], list[GridRow]] = {}
    for row in rows:
        groups.setdefault((row.subject, row.runtime, row.pass_), []).append(row)
    slopes = []
    for (subject, runtime, pass_), group in groups.items():
        measured = [row for row in group if row.status == "measured"]
        lengths = [row.length for row in measured]
        if len(lengths) < 2:
            slopes.append(GridSlope(subject, runtime, pass_, None, lengths, f"needs 2 measured lengths, has {len(lengths)}"))
        else:
            slope = loglog_slope(lengths, [r.time_ms for r in measured])
            slopes.append(GridSlope(subject, runtime, pass_, slope, lengths))
    return slopes


def compare_peers(rows: Sequence[GridRow], spec: BenchSpec) -> list[PeerComparison]:
    """Each peer row against the seqmix row it mirrors (same runtime, pass and L)."""
    by_key = {(r.subject, r.runtime, r.pass_, r.length): r for r in rows}
    against = {s.label: s for s in spec.grid_subjects() if s.kind == "peer"}
    comparisons = []
    for row in rows:
        if row.kind != "peer":
            continue
        subject = against[row.subject]
        seqmix = by_key.get((subject.against, row.runtime, row.pass_, row.length))
        comparison = PeerComparison(row.subject, subject.against, row.runtime, row.pass_, row.length, note=PEERS[subject.name].note)
        missing = [f"{r.subject}: {r.status} ({r.reason})" for r in (seqmix, row) if r is not None and r.status != "measured"]
        if seqmix is None:
            missing.append(f"{subject.against} was not in the grid")
        if missing:
            comparison.reason = "; ".join(missing)
        else:
            comparison.seqmix_speedup = row.time_ms / seqmix.time_ms
            if row.peak_mib and seqmix.peak_mib is not None:
                comparison.memory_ratio = seqmix.peak_mib / row.peak_mib
        comparisons.append(comparison)
    return comparisons


def verdict(claim: Claim, ours: float) -> str:
    """PASS or MISS of our figure against the claim's (speed: at least it; memory and slope: at
    most it), or ``—`` when the claim gives no figure."""
    if claim.figure is None:
        return "—"
    meets = ours >= claim.figure if claim.metric == "speed" else ours <= claim.figure
    return "PASS" if meets else "MISS"


def judge_claim(name: str, claim: Claim, subject: Measurement, baseline: Measurement) -> ClaimOutcome:
    """Our ratio for a ``speed`` or ``memory`` claim and its ``verdict``; MISSING when a side was
    not measured. speed = baseline time / subject time; memory = subject peak / baseline peak."""
    missing = list(dict.fromkeys(m.reason for m in (subject, baseline) if m.time_ms is None))
    if missing:
        return ClaimOutcome(name, claim, None, "MISSING", "; ".join(missing))
    if claim.metric == "speed":
        ours = baseline.time_ms / subject.time_ms
    else:
        if not baseline.peak_mib:
            return ClaimOutcome(name, claim, None, "MISSING", f"{baseline.subject} allocated no measurable memory")
        ours = subject.peak_mib / baseline.peak_mib
    return ClaimOutcome(name, claim, ours, verdict(claim, ours))


def _grid_side(rows: dict[tuple, GridRow], label: str, runtime: str, claim: Claim) -> Measurement:
    """One side of a claim read off the grid's row at (label, runtime, pass, L)."""
    side = Measurement(label, claim.pass_, claim.length)
    row = rows.get((label, runtime, claim.pass_, claim.length))
    if row is None:
        side.reason = f"{label} {claim.pass_} at L={claim.length} on {runtime} is not in the grid (bench.mixers, bench.lengths)"
    elif row.status != "measured":
        side.reason = f"{label} at L={claim.length} {row.status}: {row.reason}"
    else:
        side.time_ms, side.peak_mib, side.impl = row.time_ms, row.peak_mib, row.impl
    return side


def judge_grid_claims(rows: Sequence[GridRow], slopes: Sequence[GridSlope], spec: BenchSpec) -> list[ClaimOutcome]:
    """Every claim of ``spec`` judged from the grid's rows and slopes on ``spec.claim_runtime``."""
    index = {(r.subject, r.runtime, r.pass_, r.length): r for r in rows}
    fits = {(s.subject, s.runtime, s.pass_): s for s in slopes}
    outcomes = []
    for name, claim in spec.claims.items():
        if claim.metric != "slope":
            sides = [_grid_side(index, spec.grid_label(label), spec.claim_runtime, claim) for label in (claim.subject, claim.baseline)]
            outcomes.append(judge_claim(name, claim, *sides))
            continue
        fit = fits.get((spec.grid_label(claim.subject), spec.claim_runtime, claim.pass_))
        if fit is None:
            missing = f"{claim.subject} {claim.pass_} on {spec.claim_runtime} is not in the grid (bench.mixers, bench.passes)"
            outcomes.append(ClaimOutcome(name, claim, None, "MISSING", missing))
        elif fit.slope is None:
            outcomes.append(ClaimOutcome(name, claim, None, "MISSING", f"{claim.subject}: {fit.reason}"))
        else:
            outcomes.append(ClaimOutcome(name, claim, fit.slope, verdict(claim, fit.slope)))
    return outcomes
