"""The longest sequence each model preset trains at, batch 1, within a memory budget, with and without recomputation.

    python tools/measure_max_length.py [--budget-gib 8] [--presets mega transformer] [--modes none block]
                                       [--measure-up-to 16384] [--verify-length 32768]
                                       [--check-lengths 1024 4096] [--out tools/perf]

writes ``max_length.md`` and ``max_length.json`` to ``--out``.

What one training step at length L needs (B = 1, float32, each preset at its shipped size):
the parameters, AdamW's two moment buffers and the token ids, which live through the step, plus the
peak of one forward and backward measured the way the claims benchmark measures it
(``seqmix.export.bench.measure``: the model in train mode, the gradient of ``output.sum()``
backpropagated as a whole tensor, gradients set to None first; the peak counts the activations
kept for the backward, the temporaries, the output, its gradient and the new gradients). L fits
when that total is at most the budget.

How the peak is counted without allocating it: the model is built and run under torch's
``FakeTensorMode``, whose CPU tensors have shapes and dtypes but no memory and whose operators
compute nothing (they run on the meta device underneath), and the pass runs under ``AllocationTracker``,
which adds the bytes of every new tensor storage an operator returns and subtracts them when Python
frees that storage. So every tensor the pass creates is counted when torch would allocate it and
released when torch would free it. What it cannot see: memory an operator's kernel allocates and
frees inside itself (workspaces). ``--check-lengths`` runs the same pass on the CPU under the
benchmark's profiler, which sees those too, and the report gives the two side by side.

How the longest L is found: doubling from 1024, then bisection to a multiple of 1024, on the total
above. Fake tensors still cost Python time per operator, and the chunked recurrences run a few
operators per chunk, so tracking a pass of L in the hundreds of thousands takes many minutes. So
the tracked peak is measured at every probe up to ``--measure-up-to``, and beyond it taken from
the line through the tracked peaks at ``--measure-up-to``/2 and ``--measure-up-to``: every
activation of these models is a fixed number of (L, ·) tensors, so at multiples of the chunk the
peak is affine in L. The tool checks that law before using it: the tracked peak at
``--measure-up-to``/4 must lie on the line (else it refuses to extrapolate and says so), and one
more tracked pass at ``--verify-length`` is compared with the line's value; both residuals are in
the report.

A preset refuses lengths beyond what its positions allow (gpt2's learned positions stop at its
``max_len``): the search stops there and the report says so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import weakref
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

import seqmix
from seqmix.configs import compose_config, config_groups
from seqmix.errors import SeqmixError, writable_dir_argument
from seqmix.export.bench.measure import pass_callables, peak_memory_bytes

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
MIB = 2**20
START_LENGTH = 1024
# Lengths are probed in multiples of this, a multiple of every shipped chunk size (128) and
# receptive field, where the peak is affine in L.
UNIT = 1024
# The tracked peak at measure_up_to / 4 may differ from the line through the next two by this fraction.
AFFINE_TOLERANCE = 1e-3
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, one float per parameter each


class AllocationTracker(TorchDispatchMode):
    """Bytes of the tensor storages alive, from when an operator creates one to when Python frees it, and their peak.

    An output that aliases an input (a view, an in-place or ``out=`` result), as the operator's
    schema declares, is no new storage; a storage is counted once however many tensors view it.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted = WeakIdKeyDictionary()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            # A fake tensor has no value. The mixers read one only to ask whether their input is
            # all finite (to take the fast path); real inputs are, so answer that.
            if args[0].dtype == torch.bool:
                return True
            raise SeqmixError(f"measure_max_length: {func} reads a {args[0].dtype} value, which a fake tensor does not have")
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for tensor, returned in zip(outputs, func._schema.returns):
            if returned.alias_info is None:
                for leaf in tree_flatten(tensor)[0]:
                    if isinstance(leaf, Tensor):
                        self._count(leaf.untyped_storage())
        return out

    def _count(self, storage) -> None:
        if storage in self._counted:
            return
        nbytes = storage.nbytes()
        self._counted[storage] = nbytes
        weakref.finalize(storage, self._free, nbytes)
        self.live += nbytes
        self.peak = max(self.peak, self.live)


class FakeModel:
    """A model built under its own ``FakeTensorMode``: no parameter or activation holds memory."""

    def __init__(self, preset: str, recompute: str, overrides: tuple[str, ...] = ()):
        self.mode = FakeTensorMode()
        with self.mode:
            self.model = preset_model(preset, recompute, overrides)


def preset_model(preset: str, recompute: str, overrides: tuple[str, ...] = ()):
    """The shipped ``preset`` with ``model.recompute=recompute`` (and Hydra ``overrides``), seeded."""
    config = compose_config([f"model={preset}", f"model.recompute={recompute}", *overrides]).model
    torch.manual_seed(0)
    return seqmix.instantiate_model(config)


def _pass(model, length: int):
    tokens = torch.zeros(1, length, dtype=torch.long)
    return pass_callables(model, model, (tokens,), "fwd+bwd")


def tracked_peak_bytes(fake: FakeModel, length: int) -> int:
    """Peak bytes of one forward and backward of the fake model on L = ``length`` token ids (B = 1),
    counted by ``AllocationTracker``."""
    with fake.mode:
        run, clear = _pass(fake.model, length)
        clear()
        tracker = AllocationTracker()
        with tracker:
            run()
        clear()
    return tracker.peak


def profiled_peak_bytes(model, length: int) -> int:
    """The same pass on the CPU, measured by the claims benchmark's ``peak_memory_bytes`` (the profiler)."""
    run, clear = _pass(model, length)
    clear()
    peak = peak_memory_bytes(run, torch.device("cpu"))
    clear()
    return peak


def resident_bytes(model, length: int) -> int:
    """What lives through a whole training step besides the pass: parameters, AdamW's moments, token ids."""
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    return parameters * (1 + ADAMW_STATES) + length * torch.tensor([], dtype=torch.long).element_size()


def longest_length(needs: Callable[[int], int | None], budget: int) -> tuple[int | None, list[dict], str]:
    """The longest multiple of ``UNIT`` with ``needs(L) <= budget``: doubling from ``START_LENGTH``, then bisection.

    ``needs(L)`` is None where the model refuses L. Returns (L, every probe as {length, bytes}, why the
    search stopped: ``budget`` or ``refused``); L is None when even the start does not fit.
    """
    probes: list[dict] = []

    def fits(length: int) -> bool | None:
        need = needs(length)
        probes.append({"length": length, "bytes": need})
        return None if need is None else need <= budget

    low, length = None, START_LENGTH
    while (ok := fits(length)):
        low, length = length, 2 * length
    high, refused = length, ok is None
    while low is not None and high - low > UNIT:
        middle = (low + high) // 2 // UNIT * UNIT
        ok = fits(middle)
        if ok:
            low = middle
        else:
            # Why the length one unit above the answer fails: the last failing probe's reason.
            high, refused = middle, ok is None
    return low, probes, "refused" if refused else "budget"


class NotAffine(Exception):
    """The tracked peak is not affine in L where the line would be read off: extrapolating would be a guess."""


class PeakModel:
    """The tracked pass peak of one model at any L: measured up to ``measure_up_to``, the checked line beyond."""

    def __init__(self, fake: FakeModel, measure_up_to: int):
        self.fake = fake
        self.measure_up_to = measure_up_to
        self.measured: dict[int, int] = {}
        self.line: tuple[float, float] | None = None
        self.affine_residual: float | None = None

    def tracked(self, length: int) -> int:
        if length not in self.measured:
            self.measured[length] = tracked_peak_bytes(self.fake, length)
        return self.measured[length]

    def _fit(self) -> tuple[float, float]:
        """(slope, intercept) through the tracked peaks at measure_up_to / 2 and measure_up_to, after
        checking that the one at measure_up_to / 4 lies on it."""
        if self.line is None:
            top = self.measure_up_to
            quarter, half, full = (self.tracked(top // 4), self.tracked(top // 2), self.tracked(top))
            slope = (full - half) / (top - top // 2)
            intercept = full - slope * top
            self.affine_residual = abs(slope * (top // 4) + intercept - quarter) / quarter
            if self.affine_residual > AFFINE_TOLERANCE:
                raise NotAffine(
                    f"the tracked peak at {top // 4} is {self.affine_residual:.1e} off the line through {top // 2} and "
                    f"{top}; raise --measure-up-to"
                )
            self.line = (slope, intercept)
        return self.line

    def __call__(self, length: int) -> tuple[int, bool]:
        """(peak bytes at ``length``, whether they were measured rather than read off the line)."""
        if length <= self.measure_up_to:
            return self.tracked(length), True
        slope, intercept = self._fit()
        return int(slope * length + intercept), False


def measure(preset: str, recompute: str, budget: int, measure_up_to: int, verify_length: int | None,
            check_lengths: list[int]) -> dict:
    """One row: the longest L of ``preset`` with ``recompute`` in ``budget`` bytes, how it was found, and the checks."""
    fake = FakeModel(preset, recompute)
    peak = PeakModel(fake, measure_up_to)
    refusal: list[str] = []
    measured_lengths: list[int] = []

    def needs(length: int) -> int | None:
        try:
            pass_bytes, measured = peak(length)
        except SeqmixError as error:
            refusal.append(str(error))
            return None
        if measured:
            measured_lengths.append(length)
        return pass_bytes + resident_bytes(fake.model, length)

    started = time.perf_counter()
    try:
        length, probes, stopped = longest_length(needs, budget)
    except NotAffine as error:
        # The longest measured length that fits is still a measurement, a lower bound.
        fitting = [n for n in measured_lengths if peak.tracked(n) + resident_bytes(fake.model, n) <= budget]
        length, probes, stopped = max(fitting, default=None), [], "not affine"
        refusal.append(str(error))
    verification = None
    if peak.line is not None and verify_length:
        predicted, _ = peak(verify_length)
        tracked = peak.tracked(verify_length)
        verification = {"length": verify_length, "tracked_mib": tracked / MIB, "line_mib": predicted / MIB,
                        "relative_error": (predicted - tracked) / tracked}
    seconds = time.perf_counter() - started
    checks = []
    for check_length in check_lengths:
        if length is None or check_length > length:
            continue  # past what the model takes (gpt2's learned positions) or fits
        tracked = peak.tracked(check_length)
        profiled = profiled_peak_bytes(preset_model(preset, recompute), check_length)
        checks.append({"length": check_length, "tracked_mib": tracked / MIB, "profiled_mib": profiled / MIB,
                       "tracked_over_profiled": tracked / profiled if profiled else None})
    return {
        "preset": preset, "recompute": recompute, "max_length": length, "stopped_by": stopped,
        "refusal": refusal[-1] if stopped != "budget" and refusal else None,
        "resident_mib": resident_bytes(fake.model, 0) / MIB,
        "answer_measured": length is not None and length <= measure_up_to,
        "mib_per_1024_tokens": None if peak.line is None else peak.line[0] * UNIT / MIB,
        "affine_residual": peak.affine_residual, "verification": verification,
        "probes": [{**probe, "measured": probe["length"] in measured_lengths} for probe in probes],
        "checks": checks, "search_seconds": seconds,
    }


def environment() -> dict:
    return {
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def format_report(report: dict) -> str:
    """The Markdown of ``report`` (what ``main`` writes as JSON)."""
    rows, env, budget_gib = report["rows"], report["environment"], report["budget_gib"]
    modes = list(dict.fromkeys(row["recompute"] for row in rows))
    presets = list(dict.fromkeys(row["preset"] for row in rows))
    by_key = {(row["preset"], row["recompute"]): row for row in rows}

    def cell(row: dict) -> str:
        if row["max_length"] is None:
            return f"< {START_LENGTH:,}"
        note = {"refused": " (refused beyond)", "not affine": " (at least; see below)"}.get(row["stopped_by"], "")
        note = note or ("" if row["answer_measured"] else " ¹")
        return f"{row['max_length']:,}{note}"

    lines = [
        f"## Longest training length in {budget_gib:g} GiB, batch 1",
        "",
        f"Generated by `{report['command']}` (torch {env['torch']}, {env['date']}; load average "
        f"{', '.join(f'{x:.2f}' for x in env['load_average'])} at the end, which changes none of these counts).",
        "",
        f"Each preset at its shipped size, float32. A length fits when the parameters, AdamW's two moments and the "
        f"token ids, plus the peak of one forward and backward (the claims benchmark's pass: activations kept for "
        f"backward, temporaries, output, its gradient, new gradients), total at most {budget_gib:g} GiB. The peak is counted under "
        f"torch's FakeTensorMode, every tensor storage the pass creates from its allocation to its release, so "
        f"nothing is allocated. Lengths found by doubling from {START_LENGTH:,}, then bisection to a multiple of {UNIT:,}.",
        "",
        "| preset | " + " | ".join(f"recompute={mode}" for mode in modes) + " | MiB per 1,024 tokens (" + ", ".join(modes) + ") |",
        "|---|" + "---:|" * (len(modes) + 1),
    ]
    for preset in presets:
        slopes = ", ".join("—" if by_key[(preset, mode)]["mib_per_1024_tokens"] is None
                           else f"{by_key[(preset, mode)]['mib_per_1024_tokens']:.1f}" for mode in modes)
        lines.append(f"| `{preset}` | " + " | ".join(cell(by_key[(preset, mode)]) for mode in modes) + f" | {slopes} |")
    lines += [
        "",
        f"¹ Beyond {report['measure_up_to']:,} tokens the peak is read off the line through the tracked peaks at "
        f"{report['measure_up_to'] // 2:,} and {report['measure_up_to']:,} (the activations are a fixed number of (L, ·) "
        "tensors). The line is checked before use, and against one more tracked pass:",
        "",
        f"| preset | recompute | off the line at {report['measure_up_to'] // 4:,} | L checked | tracked MiB | line MiB | line error |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        check = row["verification"]
        if row["affine_residual"] is None or check is None:
            continue
        lines.append(
            f"| `{row['preset']}` | {row['recompute']} | {row['affine_residual']:.1e} | {check['length']:,} | "
            f"{check['tracked_mib']:.1f} | {check['line_mib']:.1f} | {check['relative_error']:+.1e} |"
        )
    refusals = {row["preset"]: row["refusal"] for row in rows if row["refusal"]}
    if refusals:
        lines += ["", "Stopped before the budget:"]
        lines += [f"- `{preset}`: {message}" for preset, message in refusals.items()]
    checks = [(row, check) for row in rows for check in row["checks"]]
    if checks:
        lines += [
            "", "### The tracked peak against the benchmark's profiler", "",
            "The same pass on the CPU: the tracked peak (fake tensors, what the search used) beside the peak the "
            "claims benchmark's profiler records (every allocation, kernel workspaces included).",
            "", "| preset | recompute | L | tracked MiB | profiled MiB | tracked / profiled |", "|---|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| `{row['preset']}` | {row['recompute']} | {check['length']:,} | {check['tracked_mib']:.1f} | "
            f"{check['profiled_mib']:.1f} | {check['tracked_over_profiled']:.4f} |"
            for row, check in checks
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-gib", type=float, default=8.0)
    parser.add_argument("--presets", nargs="+", default=config_groups()["model"])
    parser.add_argument("--modes", nargs="+", default=["none", "block"])
    parser.add_argument("--measure-up-to", type=int, default=16384, help="longest L whose peak is tracked in the search")
    parser.add_argument("--verify-length", type=int, default=32768, help="one more tracked L to check the line against")
    parser.add_argument("--check-lengths", nargs="*", type=int, default=[1024, 4096], help="L profiled on the CPU")
    parser.add_argument("--out", type=writable_dir_argument, default=ROOT / "tools" / "perf")
    args = parser.parse_args(argv)
    if args.measure_up_to % (4 * UNIT):
        parser.error(f"--measure-up-to must be a multiple of {4 * UNIT}")
    torch.set_num_threads(1)
    words = sys.argv[1:] if argv is None else argv
    command = " ".join(["python tools/measure_max_length.py", *words])
    rows = []
    for preset in args.presets:
        for mode in args.modes:
            rows.append(measure(preset, mode, int(args.budget_gib * GIB), args.measure_up_to, args.verify_length, args.check_lengths))
            row = rows[-1]
            print(f"{preset} recompute={mode}: {row['max_length']} ({row['stopped_by']}, {row['search_seconds']:.0f} s)", flush=True)
    report = {"command": command, "budget_gib": args.budget_gib, "measure_up_to": args.measure_up_to,
              "environment": environment(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "max_length.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "max_length.md").write_text(format_report(report))
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
