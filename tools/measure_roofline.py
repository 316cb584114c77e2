"""Set the chunked and native EMA and CEMA (and gated attention and the TCN) against the machine's roofline, on 1 and 2 threads.

    python tools/measure_roofline.py [--threads 1 2] [--out tools/perf] [--allocator-rounds 3] [--before COMMIT] [bench overrides ...]

Runs the benchmark grid of conf/bench/roofline.yaml (``seqmix bench bench=roofline``: D = 256,
B = 1, L = 4096 and 16384, forward and forward+backward, eager) once per thread count, in this one
process, the thread counts alternating. Each run measures the machine's float32 matmul rate and
memory bandwidth on its threads first (``seqmix.export.bench.roofline``), so every row's
measured ÷ minimum divides by rates taken minutes earlier on the same threads. Writes
roofline.md (the table, the rates, the load average before and after) and roofline.json
(everything, rows and rates as the bench records them). Extra arguments are bench overrides,
e.g. ``bench.lengths=[4096] bench.repeats=3``.

It also times, per thread count, what torch's kernels take for the parts of the chunked EMA and
CEMA forward that no rewrite in PyTorch avoids (their batched products and block transposes,
``kernel_floor``), and what they take for the kernels every eager TCN forward runs (its
convolutions, activations and sums, ``tcn_kernel_floor``), and sets each floor beside the minimum
and the measured times.

The process keeps freed memory (``seqmix.allocator``, as the ``seqmix`` command does). Each
operator's forward at the grid's longest length is also timed in fresh child processes with
glibc's malloc as it comes and with freed memory kept, the children alternating (defaults, kept,
defaults, ...), on one thread: how much of each figure the allocator's page faults would add
(``--allocator-rounds`` children each; 0 skips it).

``--before COMMIT`` adds a before/after table for the EMA, CEMA and TCN: each one's default path as
that commit wrote it (the chunked EMA and CEMA, the TCN's ``conv``) against today's faster paths
(``BEFORE_AND_AFTER``); the mixers as that commit wrote them (recurrence.py, ema.py, cema.py and
tcn.py read with ``git show`` into temporary modules, nothing checked out) beside today's, with the
same weights and inputs, their calls alternating (before, after, before, ...) so that both see the
same load, on the grid's lengths, passes and thread counts. It reports each one's median (fastest–slowest), measured ÷
minimum against the rates measured on those threads, before ÷ after, and the largest difference
between their outputs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import types
from pathlib import Path

import torch

import seqmix
from seqmix.allocator import keep_freed_memory
from seqmix.errors import SeqmixError, writable_dir_argument
from seqmix.export.bench import compose_bench_spec, run_grid
from seqmix.export.bench.measure import environment, pass_callables
from seqmix.export.bench.report import claims_table, time_range
from seqmix.export.bench.roofline import measure_machine
from seqmix.operators import recurrence
from seqmix.tables import markdown_table
from seqmix.timing import summarize, time_once

ROOT = Path(__file__).resolve().parent.parent


def _load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


BEFORE_FILES = {"recurrence": "mixers/operators/recurrence.py", "ema": "mixers/operators/ema.py", "cema": "mixers/operators/cema.py",
                "tcn": "mixers/operators/tcn.py"}
COMPARED = ("ema", "cema")
"""The mixers on the recurrence engine: the kernel floor breaks down their chunked forward, and
``--before`` loads them on that commit's recurrence.py."""
BEFORE_AND_AFTER = {"ema": ("chunked", ("chunked", "native")), "cema": ("chunked", ("chunked", "native")),
                    "tcn": ("conv", ("channels_last", "native"))}
"""Per mixer: its default path at the earlier commit, and today's paths set against it."""


def _module_from_git(commit: str, name: str, path: str, replacements: dict[str, str], names: dict) -> types.ModuleType:
    """``path`` as of ``commit``, run as a fresh module ``before_<name>`` (in sys.modules, as dataclasses need)."""
    text = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    for old, new in replacements.items():
        if old not in text:
            raise SystemExit(f"--before {commit}: {path} has no {old.strip()!r} to replace; this tool reads the layout of commit 96f3bc2")
        text = text.replace(old, new)
    module = types.ModuleType(f"before_{name}")
    module.__dict__.update(names)
    sys.modules[module.__name__] = module
    exec(compile(text, f"{commit[:8]}:{path}", "exec"), module.__dict__)
    return module


def before_classes(commit: str) -> dict[str, type]:
    """The EMA and CEMA classes (on that commit's recurrence engine) and the TCN's as ``commit``
    wrote them, left out of the registry."""
    recurrence = _module_from_git(commit, "recurrence", BEFORE_FILES["recurrence"], {}, {})
    classes = {}
    for name in BEFORE_AND_AFTER:
        engine = {"from seqmix.operators import recurrence\n": ""} if name in COMPARED else {}
        module = _module_from_git(commit, name, BEFORE_FILES[name], {**engine, f'@register_mixer("{name}")\n': ""},
                                  {"recurrence": recurrence} if name in COMPARED else {})
        classes[name] = getattr(module, name.upper())
    return classes


def compare_before(before: dict[str, type], spec, threads: int) -> tuple[object, list[dict]]:
    """Time each mixer of BEFORE_AND_AFTER before (its default path then) and after (each of today's paths
    beside it) on every length and pass of ``spec``, calls alternating; -> (rates, rows)."""
    rates = measure_machine("cpu")
    rows = []
    for name, impl in [(name, impl) for name, (_, impls) in BEFORE_AND_AFTER.items() for impl in impls]:
        torch.manual_seed(0)
        after = seqmix.build_mixer(name, spec.width, impl=impl)
        try:
            after(torch.zeros(1, 1, spec.width))
        except SeqmixError as error:  # a path this machine cannot run (native code without a compiler)
            print(f"before/after: {name}/{impl} not compared: {error}", file=sys.stderr)
            continue
        old = before[name](spec.width, impl=BEFORE_AND_AFTER[name][0])
        old.load_state_dict(after.state_dict())
        for length in spec.lengths:
            x = torch.randn(spec.batch, length, spec.width)
            with torch.no_grad():
                difference = float((old.eval()(x) - after.eval()(x)).abs().max())
            for pass_ in spec.passes:
                runs = {label: pass_callables(module, module, (x,), pass_)[0] for label, module in (("before", old), ("after", after))}
                times = {label: [] for label in runs}
                for index in range(spec.warmup + spec.repeats):
                    for label, run in runs.items():
                        seconds = time_once(run)
                        if index >= spec.warmup:
                            times[label].append(seconds)
                timings = {label: summarize(values) for label, values in times.items()}
                minimum = rates.minimum_ms(after.cost(spec.batch, length, pass_))
                ratios = [b / a for b, a in zip(times["before"], times["after"])]
                rows.append({"mixer": f"{name}/{impl}", "pass": pass_, "length": length, "threads": threads, "minimum_ms": minimum,
                             "before": timings["before"].as_dict(), "after": timings["after"].as_dict(),
                             "before_vs_minimum": timings["before"].median_ms / minimum, "after_vs_minimum": timings["after"].median_ms / minimum,
                             "speedup_median": statistics.median(ratios), "speedup_low": min(ratios), "speedup_high": max(ratios),
                             "max_abs_difference": difference, "load": _load()})
    return rates, rows


ALLOCATOR_CHILD = """
import json, sys, torch
from seqmix.allocator import keep_freed_memory
from seqmix.export.bench.subjects import build_subject, parse_mixer
from seqmix.timing import summarize, time_once
keep, subjects, length, width, warmup, repeats = json.loads(sys.argv[1])
policy = keep_freed_memory() if keep else "glibc defaults"
torch.set_num_threads(1)
times = {}
for label, options in subjects:
    mixer = build_subject(parse_mixer(label, options, "bench.mixers"), width).eval()
    x = torch.randn(1, length, width)
    with torch.no_grad():
        for _ in range(warmup):
            mixer(x)
        times[label] = summarize([time_once(lambda: mixer(x)) for _ in range(repeats)]).median_ms
print(json.dumps({"policy": policy, "times": times}))
"""


def allocator_effect(spec, rounds: int, measured: set[str]) -> dict:
    """Each mixer the grid ``measured`` (labels), its forward at the longest length, one thread, in fresh
    processes: glibc's malloc as it comes against freed memory kept, ``rounds`` children each, alternating.
    Returns {"policy", "rounds", "rows": [...]}."""
    chosen = [subject for subject in spec.mixers if subject.label in measured]
    labels = [subject.label for subject in chosen]
    subjects = [[subject.label, dict(subject.options)] for subject in chosen]
    arguments = [max(spec.lengths), spec.width, spec.warmup, spec.repeats]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_") and key != "GLIBC_TUNABLES"}
    runs = {False: [], True: []}
    for _ in range(rounds):
        for keep in (False, True):
            child = subprocess.run([sys.executable, "-c", ALLOCATOR_CHILD, json.dumps([keep, subjects, *arguments])],
                                   capture_output=True, text=True, env=environment, check=True)
            runs[keep].append(json.loads(child.stdout.strip().splitlines()[-1]))
    rows = []
    for label in labels:
        default = [run["times"][label] for run in runs[False]]
        kept = [run["times"][label] for run in runs[True]]
        rows.append({"subject": label, "length": arguments[0], "default_ms": statistics.median(default),
                     "default_range": [min(default), max(default)], "kept_ms": statistics.median(kept),
                     "kept_range": [min(kept), max(kept)], "ratio": statistics.median(default) / statistics.median(kept)})
    return {"policy": runs[True][0]["policy"], "rounds": rounds, "rows": rows}


def allocator_lines(effect: dict) -> list[str]:
    body = [[row["subject"], str(row["length"]), f"{row['default_ms']:.3g} ({row['default_range'][0]:.3g}–{row['default_range'][1]:.3g})",
             f"{row['kept_ms']:.3g} ({row['kept_range'][0]:.3g}–{row['kept_range'][1]:.3g})", f"{row['ratio']:.2f}×"]
            for row in effect["rows"]]
    return [
        "## The allocator's share",
        "",
        f"The forward pass, one thread, each side the median over {effect['rounds']} fresh processes (fastest–slowest of "
        "their medians), the processes alternating: glibc's malloc as it comes, against freed memory kept "
        f"({effect['policy']}; `seqmix.allocator`, which the rows above and the `seqmix` command use).",
        "",
        markdown_table(["subject", "L", "glibc defaults ms", "freed memory kept ms", "defaults ÷ kept"], body),
        "",
    ]


def _median_ms(call, spec) -> float:
    """Median ms of ``spec.repeats`` calls of ``call`` after ``spec.warmup``."""
    for _ in range(spec.warmup):
        call()
    return summarize([time_once(call) for _ in range(spec.repeats)]).median_ms


def kernel_floor(spec, rates, grid_rows, threads: int) -> list[dict]:
    """What torch's CPU kernels take for the parts of the chunked forward, and forward + backward, that no
    rewrite in PyTorch avoids, per compared mixer and length of ``spec``, with contiguous operands
    (M = B·nC chunk rows, K = N, or 2N for a complex state):

    - the forward's two batched products, (D, M, C) @ (D, C, K) and (D, M, K + C) @ (D, K + C, C);
    - the backward's four, their adjoints: the mix's gradient (D, K + C, M) @ (D, M, C), the stacked
      inputs' (D, M, C) @ (D, C, K + C), the feed's (D, C, M) @ (D, M, K) and the inputs' share of
      the carry (D, M, K) @ (D, K, C);
    - the transposes of the (C, D) chunk blocks of a (B, L, D) tensor in and of one out (the faster of
      one copy of the whole tensor and the path's copies in cache-sized slabs): x in and y out
      forward, y's gradient in and x's out backward.

    Forward floor = its products + one pair of transposes; forward + backward floor = all six products
    + two pairs. Each row sets them beside the pass's minimum and the grid's measured time."""
    measured = {(row.subject, row.pass_, row.length): row.time_ms for row in grid_rows if row.status == "measured"}
    rows = []
    for name in COMPARED:
        mixer = seqmix.build_mixer(name, spec.width, impl="chunked")
        width, size = mixer.d_model, mixer.chunk_size
        states = mixer.order * (2 if mixer.complex_state else 1)
        for length in spec.lengths:
            chunk_rows = spec.batch * -(-length // size)
            inputs, feed = torch.randn(width, chunk_rows, size), torch.randn(width, size, states)
            stacked, mix = torch.randn(width, chunk_rows, states + size), torch.randn(width, states + size, size)
            fed, y = torch.empty(width, chunk_rows, states), torch.empty(width, chunk_rows, size)
            stacked_t, inputs_t = torch.randn(width, states + size, chunk_rows), torch.randn(width, size, chunk_rows)
            mix_t, feed_t = torch.randn(width, size, states + size), torch.randn(width, states, size)
            grad_mix, grad_feed = torch.empty(width, states + size, size), torch.empty(width, size, states)
            grad_stacked, grad_inputs = torch.empty(width, chunk_rows, states + size), torch.empty(width, chunk_rows, size)
            sequence, blocks = torch.randn(chunk_rows, size, width), torch.empty(chunk_rows, width, size)

            def products():
                torch.bmm(inputs, feed, out=fed)
                torch.bmm(stacked, mix, out=y)

            def backward_products():
                torch.bmm(stacked_t, y, out=grad_mix)
                torch.bmm(y, mix_t, out=grad_stacked)
                torch.bmm(inputs_t, fed, out=grad_feed)
                torch.bmm(fed, feed_t, out=grad_inputs)

            def whole_transposes():
                blocks.copy_(sequence.transpose(1, 2))
                sequence.copy_(blocks.transpose(1, 2))

            def slab_transposes():
                recurrence.copy_in_slabs(blocks, sequence.transpose(1, 2))
                recurrence.copy_in_slabs(sequence, blocks.transpose(1, 2))

            products_ms, backward_ms, whole_ms, slabs_ms, copy_ms = (
                _median_ms(call, spec) for call in (products, backward_products, whole_transposes, slab_transposes, sequence.clone))
            transposes_ms = min(whole_ms, slabs_ms)
            row = {"mixer": f"{name}/chunked", "length": length, "threads": threads, "products_ms": products_ms,
                   "products_gflops": 2 * width * chunk_rows * size * (2 * states + size) / products_ms / 1e6,
                   "backward_products_ms": backward_ms,
                   "backward_products_gflops": 2 * 2 * width * chunk_rows * size * (2 * states + size) / backward_ms / 1e6,
                   "transposes_ms": transposes_ms, "copy_ms": copy_ms}
            for pass_, key, floor in (("forward", "", products_ms + transposes_ms),
                                      ("fwd+bwd", "fwd_bwd_", products_ms + backward_ms + 2 * transposes_ms)):
                minimum = rates.minimum_ms(mixer.cost(spec.batch, length, pass_))
                time_ms = measured.get((f"{name}/chunked", pass_, length))
                row.update({f"{key}minimum_ms": minimum, f"{key}floor_ms": floor, f"{key}floor_vs_minimum": floor / minimum,
                            f"{key}measured_ms": time_ms, f"{key}measured_vs_minimum": None if time_ms is None else time_ms / minimum})
            rows.append(row)
    return rows


def tcn_kernel_floor(spec, rates, grid_rows, threads: int) -> list[dict]:
    """What torch's CPU kernels take for the kernels every eager TCN forward runs, per length of
    ``spec`` (the default TCN at D = ``spec.width``): per layer its depthwise convolution (the faster
    of ``conv1d`` on channel-major rows and ``conv2d`` on channels-last (B, T, D) rows, on the layer's
    input with its window already in front), its activation and its residual sum, then the output's
    SiLU(h + ω ⊙ x). Their sum is the floor with these kernels, were the copies that lay out each
    layer's input free; each row sets it beside the minimum and the grid's measured times of the
    TCN's paths."""
    measured = {(row.subject, row.length): row.time_ms for row in grid_rows if row.pass_ == "forward" and row.status == "measured"}
    tcn = seqmix.build_mixer("tcn", spec.width)
    rows = []
    for length in spec.lengths:
        convolutions_ms = 0.0
        for conv, window in zip(tcn.convs, tcn.windows):
            channel_major = torch.randn(spec.batch, spec.width, window + length)
            time_major = torch.randn(spec.batch, window + length, spec.width).transpose(1, 2).unsqueeze(2)
            weight, bias, dilation = conv.weight.detach(), conv.bias.detach(), conv.dilation[0]
            with torch.no_grad():
                convolutions_ms += min(
                    _median_ms(lambda: torch.nn.functional.conv1d(channel_major, weight, bias, dilation=dilation, groups=spec.width), spec),
                    _median_ms(lambda: torch.nn.functional.conv2d(time_major, weight.unsqueeze(2), bias, dilation=(1, dilation),
                                                                   groups=spec.width), spec))
        # Into a preallocated tensor, as an in-place path runs them: no allocation is timed.
        h, out, result = (torch.randn(spec.batch, length, spec.width) for _ in range(3))
        silu_ms = _median_ms(lambda: torch.ops.aten.silu.out(h, out=result), spec)
        add_ms = _median_ms(lambda: torch.add(h, out, out=result), spec)
        activations = tcn.depth - 1 if tcn.activation != "none" else 0
        floor = convolutions_ms + activations * silu_ms + (tcn.depth + 1) * add_ms + silu_ms
        minimum = rates.minimum_ms(tcn.cost(spec.batch, length, "forward"))
        paths = {(subject.partition("/")[2] or tcn.impl): time_ms for (subject, n), time_ms in measured.items()
                 if n == length and subject.partition("/")[0] == "tcn"}
        rows.append({"length": length, "threads": threads, "minimum_ms": minimum, "convolutions_ms": convolutions_ms,
                     "silu_ms": silu_ms, "add_ms": add_ms, "floor_ms": floor, "floor_vs_minimum": floor / minimum,
                     "measured_ms": paths})
    return rows


def tcn_floor_lines(floors: list[tuple[object, list[dict]]]) -> list[str]:
    """The TCN's kernel-floor section of roofline.md."""
    body = []
    for _, rows in floors:
        for row in rows:
            measured = ", ".join(f"{impl} {ms:.3g} ({ms / row['minimum_ms']:.1f}×)" for impl, ms in row["measured_ms"].items()) or "—"
            body.append([str(row["length"]), str(row["threads"]), f"{row['minimum_ms']:.3g}", f"{row['convolutions_ms']:.3g}",
                         f"{row['silu_ms']:.3g}", f"{row['add_ms']:.3g}", f"{row['floor_ms']:.3g}", f"{row['floor_vs_minimum']:.1f}×",
                         measured])
    return [
        "## What torch's kernels allow the TCN forward",
        "",
        "The kernels every eager forward of the default TCN runs, each timed alone (medians in ms): the depth-many "
        "depthwise convolutions (each the faster of the channel-major and the channels-last kernel), and one SiLU "
        "and one sum of two (B, L, D) tensors into a tensor allocated beforehand, times the activations and "
        "residual sums of the layers and the output's SiLU(h + ω ⊙ x) (its three-operand sum counted as a sum of "
        "two). Floor = all of them: what a path "
        "would take were the copies that lay out each layer's input free; a floor above 3× the minimum puts the 3× "
        "target out of reach of these kernels: only a kernel that fuses a layer's convolution, activation and sum "
        "could reach it, as the `native` path does (one pass of C++ per layer, outside these kernels). Measured: the "
        "grid's forward rows of the TCN's paths.",
        "",
        markdown_table(["L", "threads", "minimum ms", "convolutions ms", "SiLU ms", "sum ms", "floor ms", "floor ÷ minimum",
                        "measured ms (÷ minimum)"], body),
        "",
    ]


def floor_lines(floors: list[tuple[object, list[dict]]]) -> list[str]:
    """The kernel-floor section of roofline.md: the chunked forward's table, then its forward + backward's."""
    def measured(row: dict, key: str) -> str:
        time_ms = row[f"{key}measured_ms"]
        return "—" if time_ms is None else f"{time_ms:.3g} ({row[f'{key}measured_vs_minimum']:.1f}×)"

    forward, both = [], []
    for _, rows in floors:
        for row in rows:
            cell = [row["mixer"], str(row["length"]), str(row["threads"])]
            forward.append(cell + [f"{row['minimum_ms']:.3g}", f"{row['products_ms']:.3g} ({row['products_gflops']:.0f} GFLOP/s)",
                                   f"{row['transposes_ms']:.3g}", f"{row['copy_ms']:.3g}", f"{row['floor_ms']:.3g}",
                                   f"{row['floor_vs_minimum']:.1f}×", measured(row, "")])
            both.append(cell + [f"{row['fwd_bwd_minimum_ms']:.3g}", f"{row['products_ms']:.3g}",
                                f"{row['backward_products_ms']:.3g} ({row['backward_products_gflops']:.0f} GFLOP/s)",
                                f"{2 * row['transposes_ms']:.3g}", f"{row['fwd_bwd_floor_ms']:.3g}",
                                f"{row['fwd_bwd_floor_vs_minimum']:.1f}×", measured(row, "fwd_bwd_")])
    return [
        "## What torch's kernels allow the chunked forward",
        "",
        "The parts of the chunked EMA and CEMA forward that no rewrite in PyTorch avoids, timed alone with the same "
        "kernels (medians in ms): the two batched products at the path's shapes with contiguous operands (and the rate "
        "they reach, against the matmul rate above), and the transposes of the (C, D) chunk blocks of x in and of y out "
        "(the faster of one copy of the whole tensor and copies in cache-sized slabs, as the path makes them), "
        "beside one plain copy of the same (B, L, D) tensor. Floor = products + transposes: what the path would take if "
        "everything else (the carry, the SiLU, allocation) were free; a floor above 2× the minimum puts the 2× target "
        "out of reach of these kernels. Measured: the grid's forward row.",
        "",
        markdown_table(["mixer", "L", "threads", "minimum ms", "products ms", "transposes ms", "plain copy ms", "floor ms",
                        "floor ÷ minimum", "measured ms (÷ minimum)"], forward),
        "",
        "### And its forward + backward",
        "",
        "The same floor for a training step: the forward's products, the backward's four (the adjoints of the "
        "forward's two: the gradients of the mix, of the stacked states and inputs, of the feed, and the inputs' "
        "share through the carry; contiguous operands; their rate beside them), and two pairs of transposes (x in "
        "and y out forward, y's gradient in and x's out backward). Minimum: the forward + backward pass's. Measured: "
        "the grid's fwd+bwd row.",
        "",
        markdown_table(["mixer", "L", "threads", "minimum ms", "forward products ms", "backward products ms",
                        "transposes ms", "floor ms", "floor ÷ minimum", "measured ms (÷ minimum)"], both),
        "",
    ]


def _timing_cell(timing: dict) -> str:
    return f"{timing['median_ms']:.3g} ({timing['low_ms']:.3g}–{timing['high_ms']:.3g})"


def before_after_lines(commit: str, compared: list[tuple[object, list[dict]]]) -> list[str]:
    """The before/after section of roofline.md."""
    body = []
    for _, rows in compared:
        for row in rows:
            body.append([row["mixer"], row["pass"], str(row["length"]), str(row["threads"]), f"{row['minimum_ms']:.3g}",
                         _timing_cell(row["before"]), f"{row['before_vs_minimum']:.1f}×", _timing_cell(row["after"]),
                         f"{row['after_vs_minimum']:.1f}×",
                         f"{row['speedup_median']:.2f}× ({row['speedup_low']:.2f}–{row['speedup_high']:.2f})",
                         f"{row['max_abs_difference']:.1e}", f"{row['load'][0]}"])
    lines = [
        f"## Before and after: the EMA, CEMA and TCN against their default paths at commit {commit[:10]}",
        "",
        f"Each mixer's default path as commit {commit[:10]} wrote it (read from git into temporary modules: the chunked "
        "EMA and CEMA, the TCN's conv) against today's faster paths (the mixer column names today's), same weights and "
        "inputs, their calls alternating so that both see the same load; the rates each minimum divides by were measured "
        "just before on the same threads. Times: median (fastest–slowest) in ms; before ÷ after: median (range) of the "
        "ratios of calls made side by side; difference: the largest |before − after| of a forward output; load: "
        "the one-minute load average after the row.",
        "",
    ]
    lines += [f"- {rates.describe()}" for rates, _ in compared]
    lines += ["", markdown_table(["mixer", "pass", "L", "threads", "minimum ms", "before ms", "before ÷ minimum", "after ms",
                                  "after ÷ minimum", "before ÷ after", "difference", "load"], body), ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts, in order")
    parser.add_argument("--out", type=writable_dir_argument, default=ROOT / "tools" / "perf", help="where roofline.md and roofline.json go")
    parser.add_argument("--allocator-rounds", type=int, default=3, metavar="N",
                        help="fresh processes per allocator setting for the allocator's share (0: skip it)")
    parser.add_argument("--before", metavar="COMMIT", help="also time the EMA, CEMA and TCN as this commit wrote them (their default paths), side by side")
    args, overrides = parser.parse_known_args(argv)
    if min(args.threads) < 1 or args.allocator_rounds < 0:
        parser.error(f"--threads {args.threads} and --allocator-rounds {args.allocator_rounds} are not valid: "
                     "expected thread counts >= 1 and rounds >= 0")
    if args.before and subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{args.before}^{{commit}}"], cwd=ROOT,
                                      capture_output=True).returncode:
        parser.error(f"--before {args.before!r} is not valid: no such commit in {ROOT}")
    allocator = keep_freed_memory()
    spec = compose_bench_spec(["bench=roofline", "bench.progress=false", *overrides])
    command = " ".join(["python tools/measure_roofline.py", *sys.argv[1:]] if argv is None else ["python tools/measure_roofline.py", *argv])
    before = before_classes(args.before) if args.before else None
    load_before = _load()
    results, compared, floors, tcn_floors = {}, [], [], []
    for threads in args.threads:
        torch.set_num_threads(threads)
        if before is not None:
            compared.append(compare_before(before, spec, threads))
        results[threads] = run_grid(spec)
        rates = results[threads].machine["cpu"]
        floors.append((rates, kernel_floor(spec, rates, results[threads].rows, threads)))
        tcn_floors.append((rates, tcn_kernel_floor(spec, rates, results[threads].rows, threads)))
    measured = {row.subject for result in results.values() for row in result.rows if row.status == "measured"}
    effect = allocator_effect(spec, args.allocator_rounds, measured) if args.allocator_rounds > 0 else None
    load_after = _load()

    # One line per cell and thread count, the thread counts of a cell side by side.
    body = []
    for index, first in enumerate(results[args.threads[0]].rows):
        for threads, result in results.items():
            row = result.rows[index]
            cell = [row.subject, row.pass_, str(row.length), str(threads)]
            if row.status != "measured":
                body.append(cell + [f"{row.status}: {row.reason}", "", "", ""])
            else:
                body.append(cell + [time_range(row), f"{row.minimum_ms:.3g}", row.bound, f"{row.vs_minimum:.1f}×"])
    machine = environment({})
    lines = [
        "# Roofline: measured ÷ minimum time",
        "",
        f"Generated by `{command}` (conf/bench/roofline.yaml, the thread counts one after the other in one process).",
        f"torch {torch.__version__}, Python {platform.python_version()}, {machine['processor']} ({machine['cpu_capability']} kernels), "
        f"{os.cpu_count()} cores, {allocator}. Load average (1, 5, 15 min) before: {load_before}, after: {load_after}.",
        "",
        "Minimum = max(FLOPs / matmul rate, bytes / bandwidth): the algorithm's minimum work (`Mixer.cost`, "
        "counting described in export/README.md) over the rates measured at the start of each run, each the fastest "
        "of its timed calls. Times: median (fastest–slowest) of the timed runs, in ms.",
        "",
    ]
    for result in results.values():
        lines += [f"- {rates.describe()}" for rates in result.machine.values()]
    lines += ["", markdown_table(["subject", "pass", "L", "threads", "measured ms", "minimum ms", "bound", "measured ÷ minimum"], body), ""]
    for threads, result in results.items():
        if result.outcomes:
            lines += [f"## Targets judged from the rows, {threads} thread{'s' if threads > 1 else ''}", "",
                      *claims_table(result.outcomes), ""]
    lines += floor_lines(floors)
    lines += tcn_floor_lines(tcn_floors)
    if effect is not None:
        lines += allocator_lines(effect)
    if compared:
        lines += before_after_lines(args.before, compared)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "roofline.md").write_text("\n".join(lines), encoding="utf-8")
    data = {"command": command, "torch": torch.__version__, "load_average_before": load_before, "load_average_after": load_after,
            "spec": {"mixers": [s.label for s in spec.mixers], "lengths": list(spec.lengths), "passes": list(spec.passes),
                     "width": spec.width, "batch": spec.batch, "repeats": spec.repeats, "warmup": spec.warmup},
            "runs": [{"threads": threads, "machine": {device: rates.to_dict() for device, rates in result.machine.items()},
                      "rows": [row.to_dict() for row in result.rows]} for threads, result in results.items()]}
    data["kernel_floor"] = [row for _, rows in floors for row in rows]
    data["tcn_kernel_floor"] = [row for _, rows in tcn_floors for row in rows]
    data["allocator"] = {"in_use": allocator, **(effect or {})}
    if compared:
        data["before_after"] = {"commit": args.before, "runs": [{"machine": rates.to_dict(), "rows": rows} for rates, rows in compared]}
    (args.out / "roofline.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"wrote {args.out / 'roofline.md'} and {args.out / 'roofline.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
