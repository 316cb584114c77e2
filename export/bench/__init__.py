"""One benchmark engine: what to measure (a spec), running it, and reporting it.

``seqmix bench`` composes a spec from ``conf/bench/*.yaml`` and runs it in one of three modes:

- ``grid``: every subject × runtime × pass × sequence length, with ratios, log-log slopes, peers
  and the spec's claims (targets) judged from the rows. ``bench=default`` is the full CPU grid,
  ``bench=operators`` the operator sweep (every registered mixer and compute path, eager, with
  seqmix's speed and slope targets), ``bench=smoke`` a tiny grid, ``bench=gpu`` a short GPU one.
- ``claims``: the pairs behind the papers' speed claims, their timed runs interleaved
  (``bench=paper_claims``).
- ``lowering``: what ONNX Runtime, int8 and torch.compile buy whole models, presets or trained
  runs (``bench=lowering``).

The modules, in the order a run uses them:

- ``spec``: ``BenchSpec`` (every field), ``Claim``, config composition and validation, the plan.
- ``subjects``: what is timed (mixers, presets, peers), its inputs, its attention memory estimate.
- ``peers``: the peer packages' modules (``PEERS``).
- ``runtimes``: the one runtime catalogue (``RUNTIMES``): what each runtime is, what it needs,
  how a subject is prepared on it. ``export.latency`` names its runtimes from it too.
- ``measure``: how a pass runs, peak memory, the environment; times come from ``seqmix.timing``.
- ``roofline``: the machine's matmul rate and memory bandwidth, measured once per run, and each
  subject's minimum FLOPs and bytes (``Mixer.cost``): measured ÷ minimum beside every time.
- ``run``: ``run_grid``, ``run_claims``, ``run_lowering``, ``run_bench``.
- ``lowering``: the lowering mode's measurements (step cost growth, compiled training, matmul throughput).
- ``results``: the rows and results, ratios, slopes, peer comparisons, claims judged.
- ``report``: Markdown, CSV, JSON and the plots.
"""
from .peers import PEERS, Peer, peer_unavailable
from .report import CSV_FIELDS, format_claims, format_grid_report, write_claims, write_grid_results
from .results import ClaimOutcome, ClaimsResult, GridResult, GridRow, GridSlope, LoweringResult, Measurement, PeerComparison
from .roofline import MachineRates, measure_machine, subject_cost
from .run import BenchRun, run_bench, run_claims, run_grid, run_lowering
from .runtimes import GPU_RUNTIMES, RUNTIMES, TRAINING_RUNTIMES, Runtime, require_runtime, runtime_unavailable
from .spec import BenchSpec, Claim, LoweringSpec, check_spec, compose_bench_config, compose_bench_spec, plan_claims, plan_grid
from .subjects import Subject

__all__ = [
    "BenchRun", "BenchSpec", "CSV_FIELDS", "Claim", "ClaimOutcome", "ClaimsResult", "GPU_RUNTIMES", "GridResult", "GridRow",
    "GridSlope", "LoweringResult", "LoweringSpec", "MachineRates", "Measurement", "PEERS", "Peer", "PeerComparison", "RUNTIMES",
    "Runtime", "Subject", "TRAINING_RUNTIMES", "check_spec", "compose_bench_config", "compose_bench_spec", "format_claims",
    "format_grid_report", "measure_machine", "peer_unavailable", "plan_claims", "plan_grid", "require_runtime", "run_bench",
    "run_claims", "run_grid", "run_lowering", "runtime_unavailable", "subject_cost", "write_claims", "write_grid_results",
]
