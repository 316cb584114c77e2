"""The roofline: what the machine allows a subject, so every measured time can say how far it is from it.

Once per benchmark run (per device), ``measure_machine`` times two things on the threads the run
uses: a float32 matrix product (its rate in GFLOP/s) and a copy of a buffer larger than the CPU's
caches (its bandwidth in GB/s, counting the bytes read and the bytes written). Each rate is taken
from its fastest call, the most the machine was seen to do; the medians and spreads are recorded
beside it. Together they take well under 2 s.

A subject's minimum time is then max(FLOPs / matmul rate, bytes / bandwidth), its FLOPs and bytes
being the minimum its algorithm needs (``subject_cost``, from ``Mixer.cost``), and the benchmark
reports measured ÷ minimum beside each time: 1 would be the machine's limit.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from seqmix.contract import Cost, Mixer, Stages, linear_stages, parameter_reads
from seqmix.timing import time_calls

from .measure import synchronize

MATMUL_SIZE = {"cpu": 1024, "cuda": 8192}
"""n of the (n, n) @ (n, n) float32 product timed: about 20-60 ms a call on one CPU core."""
COPY_MIB = {"cpu": 64, "cuda": 1024}
"""MiB of the buffer copied: twice the 32 MiB last-level cache of the machines seqmix is measured on."""


@dataclass(frozen=True)
class MachineRates:
    """What one device did on this run's threads.

    Attributes:
        device: ``cpu`` or ``cuda``.
        threads: torch's threads during the measurement.
        matmul_gflops: float32 matrix product rate of the fastest call, GFLOP/s.
        bandwidth_gbs: copy bandwidth of the fastest call, GB/s (bytes read plus bytes written).
        matmul_median_gflops, bandwidth_median_gbs: the same from the median call.
        matmul_size: n of the (n, n) product; copy_mib: the copied buffer's size.
        matmul, copy: the Timings (``seqmix.timing.Timing.as_dict``) they come from.
        load: the one-minute load average after measuring (other work on the machine).
    """

    device: str
    threads: int
    matmul_gflops: float
    bandwidth_gbs: float
    matmul_median_gflops: float
    bandwidth_median_gbs: float
    matmul_size: int
    copy_mib: int
    matmul: dict
    copy: dict
    load: float | None

    def minimum_ms(self, cost: Cost) -> float:
        """max(FLOPs / matmul rate, bytes / bandwidth), in ms: the least time ``cost`` needs here."""
        return max(cost.flops / self.matmul_gflops, cost.bytes / self.bandwidth_gbs) / 1e6

    def bound(self, cost: Cost) -> str:
        """``compute`` or ``memory``: which of the two limits sets ``minimum_ms``."""
        return "compute" if cost.flops / self.matmul_gflops >= cost.bytes / self.bandwidth_gbs else "memory"

    def describe(self) -> str:
        """One line: both rates, fastest and median call, threads and load."""
        load = f", load average {self.load:.1f} on {os.cpu_count()} cores" if self.load is not None else ""
        return (f"{self.device}, {self.threads} thread{'s' if self.threads != 1 else ''}: float32 matmul "
                f"{self.matmul_gflops:.1f} GFLOP/s (median call {self.matmul_median_gflops:.1f}; {self.matmul_size}² product), "
                f"memory {self.bandwidth_gbs:.1f} GB/s (median call {self.bandwidth_median_gbs:.1f}; {self.copy_mib} MiB copy){load}")

    def to_dict(self) -> dict:
        return asdict(self)


def measure_machine(device: str = "cpu", repeats: int = 5, matmul_size: int | None = None, copy_mib: int | None = None) -> MachineRates:
    """Time a float32 (n, n) @ (n, n) product and a copy of ``copy_mib`` MiB on ``device``, on torch's current threads.

    Args:
        device: ``cpu`` or ``cuda``.
        repeats: timed calls of each, after one warm-up call.
        matmul_size, copy_mib: defaults from ``MATMUL_SIZE`` and ``COPY_MIB``.
    """
    where = torch.device(device)
    n = matmul_size or MATMUL_SIZE[where.type]
    mib = copy_mib or COPY_MIB[where.type]
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator).to(where) for _ in range(2))
    source = torch.full((mib * 2**20 // 4,), 1.0, device=where)
    target = torch.empty_like(source)
    sync = (lambda: synchronize(where)) if where.type == "cuda" else None
    product = time_calls(lambda: torch.mm(a, b), repeats=repeats, warmup=1, sync=sync)
    copy = time_calls(lambda: target.copy_(source), repeats=repeats, warmup=1, sync=sync)
    gflop, gigabytes = 2 * n**3 / 1e9, 2 * source.numel() * source.element_size() / 1e9
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    return MachineRates(
        device=where.type, threads=torch.get_num_threads(),
        matmul_gflops=gflop / product.low_ms * 1e3, bandwidth_gbs=gigabytes / copy.low_ms * 1e3,
        matmul_median_gflops=gflop / product.median_ms * 1e3, bandwidth_median_gbs=gigabytes / copy.median_ms * 1e3,
        matmul_size=n, copy_mib=mib, matmul=product.as_dict(), copy=copy.as_dict(), load=load,
    )


def _outermost_mixers(module: nn.Module) -> list[Mixer]:
    """The mixers of ``module`` not inside another mixer (a gated attention's local mixer is its own part)."""
    found: list[Mixer] = []

    def visit(child: nn.Module) -> None:
        if isinstance(child, Mixer):
            found.append(child)
            return
        for grandchild in child.children():
            visit(grandchild)

    visit(module)
    return found


def subject_cost(module: nn.Module, batch: int, length: int, pass_: str) -> Cost | None:
    """The minimum FLOPs and bytes of one pass of a benchmark subject over (B, L), on the paths it now runs.

    A mixer states its own (``Mixer.cost``). A model (a preset) is its mixers' costs plus every
    linear layer outside them (``linear_stages``: the feed-forward layers and the head, each reading
    its input and writing its output once, with their weights); its embeddings, norms and loss are
    not counted, so its minimum is a lower bound. None when a mixer states no cost, or the module
    holds no seqmix mixer (a peer package's module: its algorithm is not seqmix's to state).
    """
    if isinstance(module, Mixer):
        return module.cost(batch, length, pass_)
    mixers = _outermost_mixers(module)
    costs = [mixer.cost(batch, length, pass_) for mixer in mixers]
    if not mixers or any(cost is None for cost in costs):
        return None
    inside = {id(layer) for mixer in mixers for layer in mixer.modules()}
    linears = [layer for layer in module.modules() if isinstance(layer, nn.Linear) and id(layer) not in inside]
    rest = linear_stages(linears, batch * length) + Stages(reads=sum(parameter_reads(layer).reads for layer in linears))
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    total = rest.cost(pass_, torch.finfo(dtype).bits // 8)
    for cost in costs:
        total = total + cost
    return total
