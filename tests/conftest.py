import contextlib
import functools
import os
import signal
import sys

import pytest

# Make the tests' helper modules importable however pytest is started.
sys.path.insert(0, os.path.dirname(__file__))


SEQMIX = [sys.executable, "-m", "seqmix"]
"""The ``seqmix`` command, run by the interpreter running the tests (``python -m seqmix``)."""

FUZZ_EXAMPLES_VARIABLE = "SEQMIX_FUZZ_EXAMPLES"
FUZZ_EXAMPLES_DEFAULT = 2000


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")
    parser.addoption(
        "--fuzz",
        action="store_true",
        default=False,
        help=f"fuzz for long: property tests draw {FUZZ_EXAMPLES_VARIABLE} (default {FUZZ_EXAMPLES_DEFAULT}) random, "
        "not derandomized, examples each, and tests marked fuzz run",
    )


def pytest_configure(config):
    """Hypothesis profiles: reproducible by default, long and random when fuzzing.

    By default every property test is derandomized (the same examples on every run and machine,
    so CI is reproducible) and keeps its own small example count. ``--fuzz`` or the environment
    variable SEQMIX_FUZZ_EXAMPLES=<n> switches to fresh random examples, n per test; a failure
    prints the blob that replays it with ``@reproduce_failure``.
    """
    from hypothesis import settings

    # Nothing at run time comes from outside: Hugging Face libraries read local files and caches only.
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[variable] = "1"

    from seqmix.threads import apply_thread_policy

    # `make test` runs one pytest-xdist worker per core: each worker is single-threaded, so none waits
    # on a core another holds. Run alone, the suite takes the seqmix command's policy.
    apply_thread_policy(workers=int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")))

    config.addinivalue_line("markers", "fuzz: long fuzzing; run with --fuzz or SEQMIX_FUZZ_EXAMPLES=<n>")
    if config.getoption("--fuzz") and FUZZ_EXAMPLES_VARIABLE not in os.environ:
        # The test modules read the count from the environment when they are imported.
        os.environ[FUZZ_EXAMPLES_VARIABLE] = str(FUZZ_EXAMPLES_DEFAULT)
    settings.register_profile("seqmix", deadline=None, derandomize=True, database=None, print_blob=True)
    settings.register_profile("seqmix-fuzz", deadline=None, print_blob=True)
    settings.load_profile("seqmix-fuzz" if fuzzing() else "seqmix")


def cgroup_cpu_quota() -> float | None:
    """A container's CPU quota in CPUs (cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``); None when there is none or it cannot be read."""
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())
        period = int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity set, capped by a container's CPU quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, int(quota))
    return max(1, cpus)


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per usable CPU (PYTEST_XDIST_AUTO_NUM_WORKERS still wins).

    pytest-xdist's own ``auto`` counts physical cores through psutil, so a 2-CPU machine whose CPUs
    are two hyperthreads of one core would get one worker and run the suite serially.
    """
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", "").strip():
        return None
    return usable_cpus()


def pytest_report_header(config):
    """The machine the suite's time depends on: usable CPUs, their model, the vector kernels torch picked."""
    import torch

    from seqmix.export.bench.measure import cpu_name

    return [f"seqmix suite: {usable_cpus()} usable CPUs, {cpu_name()}, torch kernels {torch.backends.cpu.get_cpu_capability()}"]


def fuzzing() -> bool:
    """True when long fuzzing was asked for (``--fuzz`` or SEQMIX_FUZZ_EXAMPLES)."""
    return FUZZ_EXAMPLES_VARIABLE in os.environ


def examples(default: int) -> int:
    """How many examples a property test draws: ``default`` normally, SEQMIX_FUZZ_EXAMPLES when fuzzing."""
    return int(os.environ[FUZZ_EXAMPLES_VARIABLE]) if fuzzing() else default


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    import torch
    from mixer_cases import native_unavailable

    share_module_fixtures(items)
    # Grouped tests first: pytest-xdist hands out work in collection order, and a long group handed
    # out last would leave one worker running it alone at the end.
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)

    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_fuzz = pytest.mark.skip(reason=f"long fuzzing: run with --fuzz or {FUZZ_EXAMPLES_VARIABLE}=<n>")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    no_compiler = native_unavailable()
    skip_compiling = pytest.mark.skip(reason=f"builds C++ (impl='native' or Inductor): {no_compiler}")
    for item in items:
        if no_compiler and _compiles_cpp(item):
            item.add_marker(skip_compiling)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if item.get_closest_marker("fuzz") is not None and not fuzzing():
            item.add_marker(skip_fuzz)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def _compiles_cpp(item) -> bool:
    """Whether a test needs a C++ compiler: it builds seqmix's native code (marked ``native``, or
    parametrized with the path ``"native"``) or compiles with Inductor (xdist group ``inductor``)."""
    group = item.get_closest_marker("xdist_group")
    if item.get_closest_marker("native") is not None or (group is not None and "inductor" in group.args):
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    values = [part for value in params.values() for part in (value if isinstance(value, tuple) else (value,))]
    return any(isinstance(value, str) and (value == "native" or value.endswith("/native")) for value in values)


def share_module_fixtures(items) -> None:
    """Keep the tests that use a module-scoped fixture on one pytest-xdist worker (``--dist loadgroup``).

    Such a fixture is built once per worker that runs one of its tests: spread over two workers, an
    export or a training run behind it is paid twice. The tests of ``exported_presets`` share one
    group too: its exports are shared between workers under a lock, and a worker waiting on the
    lock for the other's export would sit idle. A test with an ``xdist_group`` of its own keeps it.
    """
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        definitions = getattr(item, "_fixtureinfo", None)
        if definitions is None:
            continue
        if "exported_presets" in definitions.name2fixturedefs:
            item.add_marker(pytest.mark.xdist_group("exported_presets"))
        elif any(defs[-1].scope == "module" for defs in definitions.name2fixturedefs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def onnx_runner():
    """export/run_onnx.py loaded from its file, as a script on a machine without seqmix would run it."""
    import importlib.util

    import seqmix.export

    spec = importlib.util.spec_from_file_location("run_onnx", os.path.join(os.path.dirname(seqmix.export.__file__), "run_onnx.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def fails_after(seconds: int, what: str):
    """Raise TimeoutError in the block after ``seconds``: a regression that blocks (a FIFO read) or
    grinds (hashing a sparse terabyte) fails its test instead of hanging the suite. Main thread only."""
    def expired(signum, frame):
        raise TimeoutError(f"{what} took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def write_text_corpus(directory, documents: int = 40) -> str:
    """A directory of ``documents`` small generated text files (a user's corpus); returns its path."""
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(documents):
        words = " ".join(f"w{(index * 7 + k) % 97}" for k in range(60 + index))
        (directory / f"doc{index:03d}.txt").write_text(f"Document {index}.\n{words}\n")
    return str(directory)


KEYWORD_LABELS = {"zebra": "animal", "piano": "music", "tulip": "plant"}
"""The generated classification rows' keywords and the label each decides."""


def labelled_rows(count: int = 120, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` (text, label) rows: a few filler words around one keyword, which alone decides the label."""
    import random

    rng = random.Random(seed)
    fillers = ["the", "a", "small", "report", "about", "one", "item", "seen", "today", "near", "old", "road"]
    rows = []
    for index in range(count):
        keyword = rng.choice(sorted(KEYWORD_LABELS))
        words = rng.choices(fillers, k=rng.randint(3, 8))
        words.insert(rng.randint(0, len(words)), keyword)
        rows.append((f"{index}: " + " ".join(words), KEYWORD_LABELS[keyword]))
    return rows


def write_labelled_csv(path, rows: list[tuple[str, str]]) -> str:
    """``rows`` as a CSV with the columns id, text and label (a user's classification data); returns its path."""
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text", "label"])
        writer.writerows((index, text, label) for index, (text, label) in enumerate(rows))
    return str(path)


def task_test_options(config, tmp_path) -> dict:
    """Options that keep a task config's data small and out of the user's cache (and give ``text`` a corpus,
    ``classify`` a labelled CSV)."""
    options = {}
    if "cache_dir" in config:
        options["cache_dir"] = str(tmp_path / "cache")
    if "max_bytes" in config:
        options["max_bytes"] = 20_000
    if "label_column" in config:
        options["path"] = write_labelled_csv(tmp_path / "labelled.csv", labelled_rows())
    elif "path" in config:
        options["path"] = write_text_corpus(tmp_path / "corpus")
    return options


@functools.cache
def _composed(overrides: tuple[str, ...]):
    from seqmix.configs import compose_config

    return compose_config(list(overrides))


def composed_config(overrides=()):
    """``seqmix.configs.compose_config(overrides)``, composed once per test process (Hydra takes a
    third of a second a call, and the tests ask for the same presets again and again); a copy."""
    import copy

    return copy.deepcopy(_composed(tuple(overrides)))


def preset_model(*overrides: str):
    """The model of ``composed_config(overrides)``, seeded."""
    import torch

    import seqmix

    torch.manual_seed(0)
    return seqmix.instantiate_model(composed_config(overrides).model)


@functools.cache
def causal_presets() -> tuple[str, ...]:
    """The model presets whose models are causal (they have a decoder graph and ``step``)."""
    from seqmix.configs import config_groups

    return tuple(preset for preset in config_groups()["model"] if tiny_preset(preset).causal)


def tiny_preset(preset: str, *overrides: str):
    """A model preset at a tiny size, seeded: D = 32 and its layer pattern once (one layer; three for
    the three-layer hybrid, which so exercises every path across layers of different kinds).

    Tracing and lowering time grows with the number of layers, and exports dominate the suite's time.
    """
    depth = "model.depth=3" if preset == "hybrid_tcn_attention" else "model.depth=1"
    return preset_model(f"model={preset}", "model.d_model=32", depth, *overrides)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A 1-step run of ``seqmix train``'s library path (tiny Mega, two layers, MQAR); copy it before changing it."""
    return library_run(tmp_path_factory.mktemp("finished") / "run", "model.depth=2", "task.vocab_size=64")


def library_config(out_dir, *overrides: str):
    """The root config of ``library_run``: tiny Mega on MQAR into ``out_dir``, ``overrides`` last."""
    from seqmix.configs import compose_config

    return compose_config([
        "model=mega", "model.d_model=16", "task=mqar", "task.seq_len=64", "task.num_pairs=4", "train.batch_size=2",
        "train.max_steps=1", "train.eval_batches=1", "train.progress=false", "train.device=cpu", f"train.out_dir={out_dir}",
        *overrides,
    ])


def library_train(out_dir, *overrides: str):
    """(experiment, RunResult) of a run of ``seqmix train``'s library path on ``library_config``
    (with ``train.resume=true`` among ``overrides``, a run continued)."""
    from seqmix.training.experiment import build_experiment
    from seqmix.training.loop import train

    experiment = build_experiment(library_config(out_dir, *overrides))
    return experiment, train(experiment.model, experiment.task, experiment.train,
                             {"model": experiment.model_config, "task": experiment.task_config})


def library_run(out_dir, *overrides: str):
    """``out_dir`` after ``library_train``."""
    library_train(out_dir, *overrides)
    return out_dir


@pytest.fixture(scope="session")
def exported_presets(tmp_path_factory):
    """Each tiny preset exported to ONNX (verified parallel and step graphs) once per test run.

    The exports are shared by every xdist worker: the first worker to ask for a preset exports it,
    under a lock, into the run's shared temporary directory, and the others read it there. So the
    tests that use them can run on any worker, and the workers split the exports between them.
    Tests must not change these directories (copy one first).

    Returns a function preset -> (model, export.onnx_export.OnnxExport).
    """
    import fcntl
    import json

    from seqmix.export.graphs import use_exportable_paths
    from seqmix.export.manifest import write_manifest
    from seqmix.export.onnx_export import OnnxExport, export_onnx

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "exported_presets"
    shared.mkdir(exist_ok=True)
    cache = {}

    def get(preset: str):
        if preset not in cache:
            model = tiny_preset(preset).eval()
            directory = shared / preset
            with open(shared / f".{preset}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (directory / "manifest.json").is_file():
                    result = export_onnx(model, directory)
                    write_manifest(directory, result.manifest)
            use_exportable_paths(model)  # what export_onnx does to the model it exports
            manifest = json.loads((directory / "manifest.json").read_text())
            step = directory / manifest["step"]["file"] if "step" in manifest else None
            cache[preset] = (model, OnnxExport(manifest, directory / manifest["parallel"]["file"], step))
        return cache[preset]

    return get
