"""What one benchmark run measures: ``BenchSpec``, composed from ``conf/bench/*.yaml`` and checked
field by field, the paper claims and targets it judges (``Claim``), and the cells it plans.

Three modes share the spec: ``grid`` times every subject × runtime × pass × L (``run.run_grid``)
and judges its ``claims`` from those rows (targets such as conf/bench/operators.yaml's slopes);
``claims`` measures each claim's two sides with their timed runs interleaved (``run.run_claims``);
``lowering`` measures what lowering buys whole models, presets or trained runs (``run.run_lowering``).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from seqmix import SeqmixError
from seqmix.configs import compose_config, config_groups
from seqmix.contract import PASSES
from seqmix.errors import choice_error, first_few, require_bool, require_choice, require_int, require_writable_dir
from seqmix.registry import list_mixers, mixer_class

from .peers import PEER_RUNTIMES, PEERS, peer_unavailable
from .runtimes import COMPILE_BACKENDS, RUNTIMES
from .subjects import Subject, build_subject, check_subject, expand_mixers, parse_mixer, parse_preset

MODES = ("grid", "claims", "lowering")
# speed: baseline time / subject time, at least the figure; memory: subject peak / baseline peak,
# at most the figure; slope: the subject's log-log slope of time against L, at most the figure.
METRICS = ("speed", "memory", "slope")
# The runtimes of the claims mode; the grid judges its claims on any runtime it runs.
CLAIM_RUNTIMES = PEER_RUNTIMES
# The lowering mode compares eager with ONNX Runtime always, and with compiled training when "compile" is listed.
LOWERING_RUNTIMES = ("eager", "onnxruntime", "compile")
ROOT_CONFIG = "bench_root"


@dataclass(frozen=True)
class Claim:
    """One figure to reproduce: a paper's claim, or a target of seqmix's own.

    Attributes:
        title: what is claimed, in words.
        source: the paper, its table and setting, or where the target comes from.
        metric: ``speed`` (baseline time / subject time, PASS when at least ``figure``),
            ``memory`` (subject peak / baseline peak, PASS when at most ``figure``) or ``slope``
            (the subject's log-log slope of time against L, PASS when at most ``figure``; grid only).
        figure: the claimed figure, or None for a context row with no figure to meet.
        subject: the faster / smaller side: a label in ``claim_subjects`` (claims mode) or a
            subject of the grid (grid mode).
        baseline: the side it is compared with; None for ``slope``.
        pass_: ``forward`` or ``fwd+bwd``.
        length: L; None for ``slope`` (fitted over every L the grid measured).
    """

    title: str
    source: str
    metric: str
    figure: float | None
    subject: str
    baseline: str | None
    pass_: str
    length: int | None


@dataclass(frozen=True)
class LoweringSpec:
    """What the lowering mode measures besides ``bench.presets``.

    Attributes:
        runs: trained run directories, each measured as saved, on its own task.
        task: the task preset (``conf/task/<task>.yaml``) the presets are built for and scored on;
            ``task.*`` entries of ``bench.preset_overrides`` adjust it.
        far: the far position P of the streaming-step comparison (against position 64), tokens.
    """

    runs: tuple[str, ...] = ()
    task: str = "byte_lm"
    far: int = 8192

    @classmethod
    def from_config(cls, raw) -> LoweringSpec:
        """The ``bench.lowering`` block checked: its keys, the task preset, the far position."""
        known = [f.name for f in fields(cls)]
        if not isinstance(raw, Mapping) or set(raw) - set(known):
            extra = sorted(set(raw) - set(known)) if isinstance(raw, Mapping) else raw
            raise SeqmixError(f"bench.lowering: {extra!r} is not valid; expected the keys {known}")
        runs = raw.get("runs") or ()
        if not isinstance(runs, (list, tuple)):
            raise SeqmixError(f"bench.lowering.runs={runs!r} is not valid; expected a list of run directories, "
                              f"e.g. bench.lowering.runs=[{runs}]")
        spec = cls(tuple(runs), raw.get("task", cls.task), raw.get("far", cls.far))
        tasks = config_groups().get("task", [])
        require_choice("bench.lowering.task", spec.task, tasks)
        require_int("bench", "lowering.far", spec.far, 1, "the far position of the step comparison")
        return spec


LIST_FIELDS = ("mixers", "presets", "preset_overrides", "runtimes", "passes", "lengths")
"""The fields of ``BenchSpec`` that hold lists."""


@dataclass(frozen=True)
class BenchSpec:
    """A benchmark run, as ``conf/bench/*.yaml`` describes it (``BenchSpec.from_config``).

    Attributes:
        mode: ``grid`` (``run.run_grid``), ``claims`` (``run.run_claims``) or ``lowering``
            (``run.run_lowering``).
        mixers: mixer subjects, ``name`` or ``name/impl``; ``*`` and ``name/*`` expanded
            (``subjects.expand_mixers``).
        mixer_options: {mixer name: keyword options} for every subject of that mixer (and its peer).
        presets: model presets (``conf/model/``).
        preset_overrides: Hydra overrides applied to every preset subject, after its own.
        runtimes: from ``runtimes.RUNTIMES`` (lowering mode: ``LOWERING_RUNTIMES``, eager and
            onnxruntime among them).
        passes: from ``PASSES``.
        lengths: sequence lengths L, measured in increasing order (lowering mode: one L, of the
            parallel-graph timings).
        batch: B.
        width: D of the mixers and peers.
        repeats: timed runs per cell (the median is reported); warmup: untimed runs before them.
        max_seconds_per_run: a run longer than this skips the longer L of its subject, runtime and pass.
        max_setup_seconds: a setup (compile, export) longer than this does too.
        max_total_seconds: once the grid has run this long, the remaining cells are skipped; None: no limit.
        memory_budget_gb: skip a cell whose estimated attention scores exceed this (GiB).
        max_length: {runtime: longest L}, e.g. ExecuTorch lowers every chunk unrolled.
        compile_backend: the torch.compile backend of ``compile`` and ``cuda_compile``.
        baseline: {"mixer": label, "preset": label} the speed-up ratios divide by.
        peers: also run the installed peer packages (``PEERS``) beside their seqmix mixers.
        plots: write the PNG plots; plot_runtime: runtime of the time and memory plots;
            plot_length: L of the throughput bars (None: the longest L measured on every runtime).
        out_dir: where results go.
        strict: exit status 1 when a cell failed (or a claim could not be measured).
        progress: show a progress bar.
        claim_runtime: the runtime the claims are measured on (claims mode: ``eager`` or
            ``cuda``) or judged on (grid mode: one of ``runtimes``).
        claim_subjects: {label: Subject} the claims compare (claims mode).
        claims: {name: Claim}: papers' figures or seqmix's targets.
        lowering: the lowering mode's trained runs, task and far position (``LoweringSpec``).
    """

    mode: str = "grid"
    mixers: tuple[Subject, ...] = ()
    mixer_options: Mapping = field(default_factory=dict)
    presets: tuple[Subject, ...] = ()
    preset_overrides: tuple[str, ...] = ()
    runtimes: tuple[str, ...] = ("eager",)
    passes: tuple[str, ...] = PASSES
    lengths: tuple[int, ...] = (1024,)
    batch: int = 1
    width: int = 256
    repeats: int = 5
    warmup: int = 2
    max_seconds_per_run: float = 20.0
    max_setup_seconds: float = 300.0
    max_total_seconds: float | None = None
    memory_budget_gb: float = 4.0
    max_length: Mapping = field(default_factory=dict)
    compile_backend: str = "inductor"
    baseline: Mapping = field(default_factory=dict)
    peers: bool = False
    plots: bool = True
    plot_runtime: str = "eager"
    plot_length: int | None = None
    out_dir: str = "bench_results/grid"
    strict: bool = False
    progress: bool = True
    claim_runtime: str = "eager"
    claim_subjects: Mapping = field(default_factory=dict)
    claims: Mapping = field(default_factory=dict)
    lowering: LoweringSpec = field(default_factory=LoweringSpec)

    @classmethod
    def from_config(cls, config: DictConfig | Mapping) -> BenchSpec:
        """Validate a ``bench`` config (``conf/bench/*.yaml``) and build the spec; errors name the field."""
        raw = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SeqmixError(f"bench: unknown field {unknown[0]!r}; valid fields are {sorted(known)}")
        # A name where a list goes would be read one character at a time (mixers=ema as 'e', 'm', 'a').
        for name in LIST_FIELDS:
            value = raw.get(name)
            if value is not None and not isinstance(value, (list, tuple)):
                raise SeqmixError(f"bench.{name}={value!r} is not valid; expected a list, e.g. bench.{name}=[{value}]")
        options = raw.get("mixer_options") or {}
        if not isinstance(options, Mapping) or not all(isinstance(v, Mapping) for v in options.values()):
            raise SeqmixError(f"bench.mixer_options={options!r} is not valid; expected {{mixer name: {{option: value}}}}")
        for name in options:
            mixer_class(name)
        overrides = tuple(raw.get("preset_overrides") or ())
        values = dict(raw)
        values["mixers"] = tuple(
            parse_mixer(name, options.get(str(name).partition("/")[0], {}), "bench.mixers")
            for entry in raw.get("mixers") or ()
            for name in expand_mixers(entry)
        )
        values["presets"] = tuple(parse_preset(name, overrides, "bench.presets") for name in raw.get("presets") or ())
        values["preset_overrides"] = overrides
        values["mixer_options"] = options
        values["runtimes"] = tuple(raw.get("runtimes") or ())
        values["passes"] = tuple(raw.get("passes") or ())
        values["lengths"] = tuple(raw.get("lengths") or ())
        values["max_length"] = dict(raw.get("max_length") or {})
        values["baseline"] = dict(raw.get("baseline") or {})
        values["claim_subjects"] = {
            label: _parse_claim_subject(label, entry, overrides, options)
            for label, entry in (raw.get("claim_subjects") or {}).items()
        }
        values["claims"] = {name: _parse_claim(name, entry) for name, entry in (raw.get("claims") or {}).items()}
        values["lowering"] = LoweringSpec.from_config(raw.get("lowering") or {})
        return cls(**values)

    def __post_init__(self):
        require_choice("bench.mode", self.mode, MODES)
        require_writable_dir("bench.out_dir", self.out_dir)
        check_out_dir(self.mode, self.out_dir)
        for runtime in self.runtimes:
            require_choice("bench.runtimes", runtime, RUNTIMES)
        for pass_ in self.passes:
            require_choice("bench.passes", pass_, PASSES)
        for runtime, length in self.max_length.items():
            require_choice("bench.max_length", runtime, RUNTIMES)
            require_int("bench", f"max_length.{runtime}", length, 1, "longest L on that runtime")
        for length in self.lengths:
            require_int("bench", "lengths", length, 1, "sequence length L")
        for name in ("runtimes", "passes", "lengths"):
            values = list(getattr(self, name))
            twice = next((value for index, value in enumerate(values) if value in values[:index]), None)
            if twice is not None:
                raise SeqmixError(f"bench.{name} lists {twice!r} twice; each would be measured and reported twice")
        object.__setattr__(self, "lengths", tuple(sorted(self.lengths)))  # measured in increasing order
        # "no" or 0 read as true: plots were drawn and peers timed.
        for name in ("peers", "plots", "strict", "progress"):
            require_bool("bench", name, getattr(self, name))
        require_int("bench", "batch", self.batch, 1, "B")
        require_int("bench", "width", self.width, 1, "D of the mixers")
        require_int("bench", "repeats", self.repeats, 1, "timed runs")
        require_int("bench", "warmup", self.warmup, 0, "untimed runs")
        for name in ("max_seconds_per_run", "max_setup_seconds", "memory_budget_gb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise SeqmixError(f"bench.{name}={value!r} is not valid; expected a positive number")
        total = self.max_total_seconds
        if total is not None and (isinstance(total, bool) or not isinstance(total, (int, float)) or not total > 0):
            raise SeqmixError(f"bench.max_total_seconds={total!r} is not valid; expected a positive number or null")
        require_choice("bench.compile_backend", self.compile_backend, COMPILE_BACKENDS)
        require_choice("bench.plot_runtime", self.plot_runtime, RUNTIMES)
        if self.plot_length is not None:
            require_int("bench", "plot_length", self.plot_length, 1, "L of the throughput bars, or null")
            if self.plot_length not in self.lengths:
                raise SeqmixError(f"bench.plot_length={self.plot_length} is not valid; the throughput bars show one "
                                  f"of bench.lengths={list(self.lengths)}, or null for the longest measured everywhere")
        if set(self.baseline) - {"mixer", "preset"}:
            raise SeqmixError(f"bench.baseline={dict(self.baseline)!r} is not valid; expected the keys 'mixer' and 'preset'")
        labels = [s.label for s in (*self.mixers, *self.presets)]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise SeqmixError(f"bench: subject {duplicates[0]!r} is listed twice in bench.mixers / bench.presets")
        # bench.mixer_options and bench.preset_overrides are the user's: a subject they make unbuildable
        # is refused now, naming it, rather than reported as skipped rows once the grid has run.
        task = self.lowering.task if self.mode == "lowering" else None
        for subject in (*self.mixers, *self.presets):
            try:
                check_subject(subject, self.width, task)
            except SeqmixError as error:
                raise SeqmixError(f"bench: {subject.label} cannot be built with its options: {error}") from None
        if self.mode == "grid":
            if not labels:
                raise SeqmixError("bench: the grid has no subject; list some in bench.mixers or bench.presets")
            for name in ("runtimes", "passes", "lengths"):
                if not getattr(self, name):
                    raise SeqmixError(f"bench.{name} is empty; give at least one")
            if self.claims and self.claim_runtime not in self.runtimes:
                raise SeqmixError(f"bench.claim_runtime={self.claim_runtime!r} is not valid; the grid judges its "
                                  f"claims on one of its runtimes, {sorted(self.runtimes)}")
            sides = [s.label for s in self.grid_subjects()]
            for kind, label in self.baseline.items():
                if label is not None and not _names_a_subject(label, kind):
                    listed = [s.label for s in self.grid_subjects() if (s.kind == "preset") == (kind == "preset")]
                    raise choice_error(f"bench.baseline.{kind}", label, listed)
        elif self.mode == "lowering":
            if not self.presets and not self.lowering.runs:
                raise SeqmixError("bench.mode=lowering needs bench.presets=[<preset>,...] or bench.lowering.runs=[<run dir>,...]")
            if len(self.lengths) != 1:
                raise SeqmixError(f"bench.lengths={list(self.lengths)} is not valid in bench.mode=lowering; "
                                  "expected one L, the length of the parallel-graph timings")
            if not {"eager", "onnxruntime"} <= set(self.runtimes) <= set(LOWERING_RUNTIMES):
                raise SeqmixError(f"bench.runtimes={list(self.runtimes)} is not valid in bench.mode=lowering; expected "
                                  f"eager and onnxruntime, and compile to time compiled training: a subset of {list(LOWERING_RUNTIMES)}")
            if self.claims:
                raise SeqmixError(f"bench.claims ({sorted(self.claims)}) are judged in bench.mode=grid or claims, not lowering")
        else:
            if not self.claims:
                raise SeqmixError("bench.mode=claims needs bench.claims; see conf/bench/paper_claims.yaml")
            require_choice("bench.claim_runtime", self.claim_runtime, CLAIM_RUNTIMES)
            sides = list(self.claim_subjects)
        for name, claim in self.claims.items():
            if claim.metric == "slope" and self.mode == "claims":
                raise SeqmixError(f"bench.claims.{name}.metric='slope' is judged in bench.mode=grid only, "
                                  "which measures the subject at every L; the claims mode times one L per pair")
            for side in ("subject", "baseline"):
                label = getattr(claim, side)
                if label is None or label in sides:
                    continue
                if self.mode == "claims" or not _names_a_subject(label):
                    raise choice_error(f"bench.claims.{name}.{side}", label, sides)

    def grid_label(self, label: str | None) -> str | None:
        """The grid subject ``label`` stands for: itself, or, for a mixer the grid lists only by its
        paths (``bench.mixers=[ema/*]``), its default path (``ema`` -> ``ema/chunked``)."""
        labels = {s.label for s in self.grid_subjects()}
        if label is None or label in labels or "/" in label or label not in list_mixers():
            return label
        default = f"{label}/{mixer_class(label).default_impl}"
        return default if default in labels else label

    def grid_subjects(self) -> list[Subject]:
        """The mixers, the presets and, with ``peers``, one peer subject per seqmix mixer it mirrors."""
        subjects = [*self.mixers, *self.presets]
        if self.peers:
            for peer in PEERS.values():
                for mixer in self.mixers:
                    if mixer.name == peer.against:
                        label = peer.name if mixer.impl is None else f"{peer.name} (vs {mixer.label})"
                        subjects.append(Subject(label, "peer", peer.name, options=mixer.options, against=mixer.label))
        return subjects


def _parse_claim_subject(label: str, entry, overrides: Sequence[str], options: Mapping) -> Subject:
    where = f"bench.claim_subjects.{label}"
    if not isinstance(entry, Mapping) or ("mixer" in entry) == ("preset" in entry):
        raise SeqmixError(
            f"{where}={entry!r} is not valid; expected {{mixer: name, impl: ..., options: {{...}}}} "
            "or {preset: name, overrides: [...]}"
        )
    if "preset" in entry:
        extra = sorted(set(entry) - {"preset", "overrides"})
        if extra:
            raise SeqmixError(f"{where}: unknown key {extra[0]!r} for a preset; valid keys are ['overrides', 'preset']")
        subject = parse_preset(entry["preset"], [*(entry.get("overrides") or ()), *overrides], f"{where}.preset")
    else:
        extra = sorted(set(entry) - {"mixer", "impl", "options"})
        if extra:
            raise SeqmixError(f"{where}: unknown key {extra[0]!r} for a mixer; valid keys are ['impl', 'mixer', 'options']")
        name = entry["mixer"] + (f"/{entry['impl']}" if entry.get("impl") else "")
        merged = {**options.get(entry["mixer"], {}), **(entry.get("options") or {})}
        subject = parse_mixer(name, merged, f"{where}.mixer")
    return Subject(label, subject.kind, subject.name, subject.impl, subject.options, subject.overrides)


def _names_a_subject(label: str, kind: str | None = None) -> bool:
    """Whether ``label`` names something a grid could time (a mixer ``name`` or ``name/impl``, a
    preset, a peer), so a grid's claim on a subject left out of ``bench.mixers`` is MISSING, not
    an error (``bench=operators bench.mixers=[ema/*]`` keeps the operators' targets). ``kind``
    ``mixer`` or ``preset`` (a baseline's) narrows it: mixers and peers, or presets."""
    name, _, impl = label.partition("/")
    if name in list_mixers():
        return kind != "preset" and (not impl or impl in mixer_class(name).impls)
    if label in PEERS:
        return kind != "preset"
    return kind != "mixer" and label in config_groups().get("model", [])


def _parse_claim(name: str, entry) -> Claim:
    where = f"bench.claims.{name}"
    common = {"title", "source", "metric", "figure", "subject", "pass"}
    metric = entry.get("metric") if isinstance(entry, Mapping) else None
    if isinstance(entry, Mapping) and metric not in METRICS:
        raise choice_error(f"{where}.metric", metric, METRICS)
    keys = common if metric == "slope" else common | {"baseline", "length"}
    if not isinstance(entry, Mapping) or set(entry) != keys:
        got = sorted(entry) if isinstance(entry, Mapping) else entry
        raise SeqmixError(f"{where}={got!r} is not valid; expected the keys {sorted(keys)}")
    require_choice(f"{where}.pass", entry["pass"], PASSES)
    if metric != "slope":
        require_int(where, "length", entry["length"], 1, "sequence length L")
    figure = entry["figure"]
    if figure is not None and (isinstance(figure, bool) or not isinstance(figure, (int, float)) or figure <= 0):
        raise SeqmixError(f"{where}.figure={figure!r} is not valid; expected a positive number or null")
    return Claim(
        entry["title"], entry["source"], metric, None if figure is None else float(figure),
        entry["subject"], entry.get("baseline"), entry["pass"], entry.get("length"),
    )


@dataclass(frozen=True)
class Cell:
    """One grid cell: a subject on a runtime, for one pass at one length."""

    subject: Subject
    runtime: str
    pass_: str
    length: int


def plan_grid(spec: BenchSpec) -> list[Cell]:
    """Every cell the grid reports, in measuring order.

    Runtime by runtime in ``spec.runtimes`` order, so when ``max_total_seconds`` runs out every
    subject has the first runtimes measured; L innermost, so budgets can skip the longer L.
    Peers get the runtimes of ``PEER_RUNTIMES`` that ``spec.runtimes`` lists.
    """
    subjects = spec.grid_subjects()
    cells = []
    for runtime in spec.runtimes:
        for subject in subjects:
            if subject.kind == "peer" and runtime not in PEER_RUNTIMES:
                continue
            for pass_ in spec.passes:
                cells.extend(Cell(subject, runtime, pass_, length) for length in spec.lengths)
    return cells


def plan_claims(spec: BenchSpec) -> list[tuple[Subject, Subject, str, int]]:
    """The (subject, baseline, pass, L) pairs the claims need, each measured once."""
    pairs = []
    for claim in spec.claims.values():
        pair = (spec.claim_subjects[claim.subject], spec.claim_subjects[claim.baseline], claim.pass_, claim.length)
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def check_spec(spec: BenchSpec) -> int:
    """Build every subject once (its config, options and overrides must be valid); time nothing.

    Returns how many cells (grid), pairs (claims) or models (lowering) the spec would measure.
    """
    if spec.mode == "lowering":
        subjects = spec.presets
        planned = len(spec.presets) + len(spec.lowering.runs)
    elif spec.mode == "claims":
        subjects = {s.label: s for pair in plan_claims(spec) for s in pair[:2]}.values()
        planned = len(plan_claims(spec))
    else:
        subjects = [s for s in spec.grid_subjects() if s.kind != "peer" or peer_unavailable(PEERS[s.name]) is None]
        planned = len(plan_grid(spec))
    for subject in subjects:
        build_subject(subject, spec.width)
    return planned


OUTPUT_FILES = {
    "grid": ("results.json", "results.csv", "report.md", "time_vs_length.png", "memory_vs_length.png",
             "throughput_by_runtime.png"),
    "claims": ("claims.json", "claims.md"),
    "lowering": ("lowering.json", "lowering.md"),
}
"""The files each mode writes into bench.out_dir; the first, a JSON record of the run, marks them as the bench's."""


def check_out_dir(mode: str, out_dir: str | Path) -> None:
    """Raise before anything is measured unless every file ``mode`` writes into ``out_dir`` is absent
    or an earlier bench's: its record (``OUTPUT_FILES[mode][0]``) is a regular file holding a JSON
    object with ``spec`` of that mode and ``environment``. The bench replaced a user's results.csv
    and report.md (and any other file of those names) without a word."""
    from seqmix.jsontext import parse_json

    out = Path(out_dir)
    names = OUTPUT_FILES[mode]
    present = [name for name in names if os.path.lexists(out / name)]
    if not present:
        return
    record = out / names[0]
    try:
        data = parse_json(record.read_text(encoding="utf-8")) if record.is_file() and not record.is_symlink() else None
    except (OSError, UnicodeDecodeError, ValueError):
        data = None
    ours = (isinstance(data, dict) and isinstance(data.get("spec"), dict) and data["spec"].get("mode") == mode
            and "environment" in data)
    odd = [name for name in present if (out / name).is_symlink() or not (out / name).is_file()]
    if not ours or odd:
        raise SeqmixError(
            f"bench.out_dir={str(out_dir)!r} holds {first_few(odd or present)}, which this bench would replace, and "
            f"{'they are not regular files' if odd else f'{names[0]} there is no record of an earlier seqmix bench'}; "
            "refusing to write over them: choose a new or empty bench.out_dir"
        )


def spec_dict(spec: BenchSpec) -> dict:
    """The spec as plain JSON data (subjects by label; claims with their fields)."""
    data = asdict(spec)
    data["mixers"] = [s.label for s in spec.mixers]
    data["presets"] = [s.label for s in spec.presets]
    return data


def compose_bench_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The composed config for Hydra command-line ``overrides``, e.g. ["bench=smoke", "bench.peers=true"].

    The root config (registered here, not a file, so ``conf/`` keeps one root per command) holds
    the ``bench`` group of ``conf/bench/`` with ``default`` selected.
    """
    ConfigStore.instance().store(name=ROOT_CONFIG, node={"defaults": [{"bench": "default"}, "_self_"]})
    return compose_config(overrides, config_name=ROOT_CONFIG)


def compose_bench_spec(overrides: Sequence[str] = ()) -> BenchSpec:
    """The checked spec for Hydra command-line ``overrides`` (``compose_bench_config``, then ``BenchSpec.from_config``)."""
    return BenchSpec.from_config(compose_bench_config(overrides).bench)
