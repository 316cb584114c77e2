"""The built-in tasks: deterministic batches, documented shapes, validated options, correct labels."""
from __future__ import annotations

import hashlib
import inspect
import platform
import re
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from seqmix.configs import CONF_DIR, compose_config
from seqmix.errors import SeqmixError
from seqmix.tasks import IGNORE, TASKS, build_task, list_tasks
from seqmix.tasks import byte_lm as byte_lm_module
from seqmix.tasks.byte_lm import ByteLM
from seqmix.tasks.listops import ListOps, encode, evaluate, parse, render, tokenize
from seqmix.tasks.masked_segment import MASK, MaskedSegment
from seqmix.tasks.mqar import MQAR
from seqmix.tasks.selective_copying import SelectiveCopying
from seqmix.training.records import build_task as build_task_from_config

from conftest import task_test_options

SMALL = {
    "byte_lm": dict(seq_len=64, max_bytes=20_000),
    "mqar": dict(vocab_size=64, seq_len=64, num_pairs=8),
    "listops": dict(min_length=8, max_length=64),
    "selective_copying": dict(seq_len=64, num_tokens_to_copy=8),
    "masked_segment": dict(seq_len=256, max_bytes=20_000),
}
CORPUS_TASKS = ("byte_lm", "masked_segment")
TASK_CONFIGS = sorted((CONF_DIR / "task").glob("*.yaml"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("seqmix-cache")


def _options(name: str, cache_dir: Path, **extra) -> dict:
    corpus = {"cache_dir": str(cache_dir)} if name in CORPUS_TASKS else {}
    return {**SMALL[name], **corpus, **extra}


@pytest.fixture(scope="module")
def tasks(cache_dir):
    return {name: build_task(name, **_options(name, cache_dir)) for name in SMALL}


def _runs(mask: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool tensor."""
    text = "".join("1" if m else "0" for m in mask.tolist())
    return [len(run) for run in re.findall("1+", text)]


# ---------------------------------------------------------------- registry and shared contract


def test_registry_names_and_classes():
    assert list_tasks() == sorted(["byte_lm", "mqar", "listops", "selective_copying", "masked_segment", "text", "classify"])
    for name, cls in TASKS.items():
        assert cls.name == name
        assert cls.head in ("causal_lm", "masked_lm", "classification")
        assert cls.metric in ("bits_per_byte", "accuracy")
    assert TASKS["masked_segment"].causal is False and TASKS["byte_lm"].causal is True


def test_unknown_task_lists_the_valid_names():
    with pytest.raises(SeqmixError, match="task='nope'") as error:
        build_task("nope")
    for name in TASKS:
        assert name in str(error.value)


def test_unknown_option_names_it_and_the_accepted_ones():
    with pytest.raises(SeqmixError, match="num_keys") as error:
        build_task("mqar", num_keys=4)
    assert "num_pairs" in str(error.value) and "power_a" in str(error.value)


@pytest.mark.parametrize("name", list(SMALL))
def test_build_task_builds_each_registered_task(name, tasks):
    task = tasks[name]
    assert type(task) is TASKS[name]
    assert task.seq_len == SMALL[name].get("seq_len", SMALL[name].get("max_length"))


@pytest.mark.parametrize("name", list(SMALL))
def test_a_batch_larger_than_the_machine_is_refused_before_it_is_allocated(name, tasks):
    """batch_size=10**12 was torch's allocator error, from every task."""
    with pytest.raises(SeqmixError, match=rf"{name}: a batch of batch_size=1000000000000 rows of seq_len=\d+ tokens needs "
                                          r"at least [\d,.]+ GiB, more than this machine's"):
        tasks[name].batch("train", 0, 10**12)


@pytest.mark.parametrize("split", ["train", "valid"])
@pytest.mark.parametrize("name", list(SMALL))
def test_batches_are_pure_functions_of_split_and_index(name, split, tasks):
    task = tasks[name]
    first = task.batch(split, 3, 4)
    task.batch(split, 7, 4)  # other requests in between must not change batch 3
    again = task.batch(split, 3, 4)
    other = task.batch(split, 4, 4)
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.targets, again.targets)
    assert not torch.equal(first.inputs, other.inputs)
    if first.padding_mask is not None:
        assert torch.equal(first.padding_mask, again.padding_mask)
    if split == "train":
        assert not torch.equal(first.inputs, task.batch("valid", 3, 4).inputs)


@pytest.mark.parametrize("name", ["mqar", "listops", "selective_copying"])
def test_seed_changes_the_batches(name):
    a = build_task(name, **SMALL[name], seed=1).batch("train", 0, 4)
    b = build_task(name, **SMALL[name], seed=2).batch("train", 0, 4)
    assert not torch.equal(a.inputs, b.inputs)


@pytest.mark.parametrize("split", ["train", "valid"])
@pytest.mark.parametrize("name", list(SMALL))
def test_batch_shapes_dtypes_and_ranges(name, split, tasks):
    task = tasks[name]
    batch = task.batch(split, 0, 5)
    assert batch.inputs.shape == (5, task.seq_len) and batch.inputs.dtype == torch.long
    assert 0 <= int(batch.inputs.min()) and int(batch.inputs.max()) < task.vocab_size
    if task.head == "classification":
        assert batch.targets.shape == (5,) and batch.targets.dtype == torch.long
        assert ((batch.targets >= 0) & (batch.targets < task.num_classes)).all()
        assert batch.padding_mask.shape == (5, task.seq_len) and batch.padding_mask.dtype == torch.bool
    else:
        assert batch.targets.shape == (5, task.seq_len) and batch.targets.dtype == torch.long
        valid = batch.targets != IGNORE
        assert valid.any(dim=1).all()
        assert ((batch.targets[valid] >= 0) & (batch.targets[valid] < task.vocab_size)).all()
        assert batch.padding_mask is None


@pytest.mark.parametrize("name", list(SMALL))
def test_bad_requests_raise(name, tasks):
    task = tasks[name]
    with pytest.raises(SeqmixError, match="split='test'"):
        task.batch("test", 0, 2)
    with pytest.raises(SeqmixError, match="batch_size=0"):
        task.batch("train", 0, 0)
    with pytest.raises(SeqmixError, match="index=-1"):
        task.batch("train", -1, 2)


BAD_OPTIONS = [
    ("byte_lm", {"seq_len": 0}, "seq_len=0"),
    ("byte_lm", {"seed": -1}, "seed=-1"),
    ("byte_lm", {"max_bytes": 0}, "max_bytes=0"),
    ("byte_lm", {"cache_dir": 3}, "cache_dir=3"),
    ("byte_lm", {"max_bytes": 100, "seq_len": 256}, "max_bytes=100"),
    ("mqar", {"vocab_size": True}, "vocab_size=True"),
    ("mqar", {"num_pairs": 17, "seq_len": 64}, "num_pairs=17"),
    ("mqar", {"num_pairs": 8, "vocab_size": 16}, "num_pairs=8"),
    ("mqar", {"power_a": 0.0}, "power_a=0.0"),
    ("listops", {"max_depth": 1}, "max_depth=1"),
    ("listops", {"max_args": 1}, "max_args=1"),
    ("listops", {"min_length": 50, "max_length": 40}, "max_length=40"),
    ("listops", {"seq_len": 100}, "seq_len=100"),
    ("listops", {"min_length": 200, "max_depth": 3}, "min_length=200"),
    ("selective_copying", {"num_tokens": 0}, "num_tokens=0"),
    ("selective_copying", {"num_tokens_to_copy": 128}, "num_tokens_to_copy=128"),
    ("masked_segment", {"mask_fraction": 1.5}, "mask_fraction=1.5"),
    ("masked_segment", {"mask_fraction": 0.001}, "mask_fraction=0.001"),
    ("masked_segment", {"mean_span": 0.5}, "mean_span=0.5"),
    ("masked_segment", {"max_bytes": 100}, "max_bytes=100"),
]


@pytest.mark.parametrize("name, options, message", BAD_OPTIONS, ids=[m for _, _, m in BAD_OPTIONS])
def test_bad_options_name_the_field(name, options, message, cache_dir):
    corpus = {"cache_dir": str(cache_dir)} if name in CORPUS_TASKS and "cache_dir" not in options else {}
    with pytest.raises(SeqmixError, match=re.escape(message)):
        build_task(name, **corpus, **options)


def test_every_task_has_a_config():
    assert sorted(p.stem for p in TASK_CONFIGS) == list_tasks()


@pytest.mark.parametrize("path", TASK_CONFIGS, ids=[p.name for p in TASK_CONFIGS])
def test_config_composes_to_every_option_with_its_code_default_and_builds(path, tmp_path):
    assert path.read_text().startswith("# ")
    config = compose_config([f"task={path.stem}"]).task
    cls = TASKS[path.stem]
    assert config.task == path.stem
    parameters = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}
    assert {k: v for k, v in config.items() if k != "task"} == parameters
    # Corpus tasks get a test cache instead of writing into the user's home.
    task = build_task_from_config({**config, **task_test_options(config, tmp_path)})
    assert type(task) is cls
    assert task.batch("train", 0, 2).inputs.shape == (2, task.seq_len)


# ---------------------------------------------------------------- byte_lm


def test_byte_lm_splits_by_file_deterministically(tasks):
    files = tasks["byte_lm"].corpus.files
    train, valid = set(files["train"]), set(files["valid"])
    assert train and valid and not train & valid
    root = Path(sysconfig.get_paths()["stdlib"])
    expected = {p.relative_to(root).as_posix() for p in root.rglob("*.py")
                if "site-packages" not in p.relative_to(root).parts}
    assert train | valid == expected
    for relative in expected:
        in_valid = int(hashlib.sha1(relative.encode()).hexdigest(), 16) % 20 == 0
        assert (relative in valid) == in_valid
    assert 0.02 < len(valid) / len(expected) < 0.1
    assert files["train"] == sorted(files["train"])


@pytest.mark.parametrize("split", ["train", "valid"])
def test_byte_lm_targets_are_inputs_shifted_by_one(split, tasks):
    task = tasks["byte_lm"]
    batch = task.batch(split, 2, 6)
    assert torch.equal(batch.targets[:, :-1], batch.inputs[:, 1:])
    corpus = bytes(task.corpus.data[split].tolist())
    for inputs, targets in zip(batch.inputs, batch.targets):
        assert bytes(inputs.tolist() + targets[-1:].tolist()) in corpus


def test_byte_lm_valid_windows_tile_the_split_and_wrap(tasks):
    task = tasks["byte_lm"]
    data, length = task.corpus.data["valid"], task.seq_len
    windows = (data.numel() - 1) // length
    batch_size = 7
    for index in (0, 1, windows // batch_size + 1):  # the last one wraps around the split
        batch = task.batch("valid", index, batch_size)
        for row in range(batch_size):
            w = (index * batch_size + row) % windows
            assert torch.equal(batch.inputs[row], data[w * length:(w + 1) * length].long())
            assert torch.equal(batch.targets[row], data[w * length + 1:(w + 1) * length + 1].long())


def test_byte_lm_corpus_is_python_source(tasks):
    corpus = tasks["byte_lm"].corpus
    text = bytes(corpus.data["train"].tolist())
    assert b"def " in text and b"import " in text
    first = (corpus.root / corpus.files["train"][0]).read_bytes()
    assert text.startswith(first[: len(text)])


def test_byte_lm_cache_is_written_then_reused_and_unreadable_files_skipped(tmp_path, monkeypatch, tasks):
    corpus = tasks["byte_lm"].corpus  # for the file list; the test builds its own cache below
    skipped = corpus.files["valid"][0]
    reads = []

    def flaky_reader(path: Path) -> bytes:
        reads.append(path)
        if path == corpus.root / skipped:
            raise PermissionError("unreadable")
        return path.read_bytes()

    monkeypatch.setattr(byte_lm_module, "read_source", flaky_reader)
    cache = tmp_path / "cache"
    first = ByteLM(seq_len=32, cache_dir=cache, max_bytes=4096)
    assert len(reads) == len(corpus.files["train"]) + len(corpus.files["valid"])
    names = sorted(p.name for p in cache.iterdir())
    pattern = rf"byte_lm-{re.escape(platform.python_version())}-[0-9a-f]+-(train|valid)\.npy"
    assert len(names) == 2 and all(re.fullmatch(pattern, n) for n in names)  # no temp files left behind
    # The cache holds the whole split, less the unreadable file; max_bytes only caps what is loaded.
    kept = [r for r in corpus.files["valid"] if r != skipped]
    full = np.load(first.corpus.cache_paths["valid"])
    assert full.size == sum((corpus.root / r).stat().st_size for r in kept) + len(kept) - 1
    assert first.corpus.data["valid"].numel() == 4096

    def forbidden(path: Path) -> bytes:
        raise AssertionError(f"{path} was read although the cache exists")

    monkeypatch.setattr(byte_lm_module, "read_source", forbidden)
    second = ByteLM(seq_len=32, cache_dir=cache, max_bytes=4096)
    assert torch.equal(first.corpus.data["train"], second.corpus.data["train"])
    assert torch.equal(first.batch("train", 5, 3).inputs, second.batch("train", 5, 3).inputs)


# ---------------------------------------------------------------- mqar


def _check_mqar_rows(task: MQAR, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    pairs, half = task.num_pairs, task.vocab_size // 2
    for row_inputs, row_targets in zip(inputs.tolist(), targets.tolist()):
        keys, values = row_inputs[0:2 * pairs:2], row_inputs[1:2 * pairs:2]
        assert all(1 <= k < half for k in keys) and len(set(keys)) == pairs
        assert all(half <= v < task.vocab_size for v in values) and len(set(values)) == pairs
        paired = dict(zip(keys, values))
        queries = [t for t, target in enumerate(row_targets) if target != IGNORE]
        assert len(queries) == pairs
        assert all(t >= 2 * pairs and (t - 2 * pairs) % 2 == 0 for t in queries)
        assert sorted(row_inputs[t] for t in queries) == sorted(keys)  # every key queried exactly once
        for t in queries:
            assert row_targets[t] == paired[row_inputs[t]]
        fillers = [row_inputs[t] for t in range(2 * pairs, task.seq_len) if t not in queries]
        assert fillers == [0] * len(fillers)


def test_mqar_small_case_by_hand():
    task = MQAR(vocab_size=16, seq_len=20, num_pairs=4)
    batch = task.batch("train", 0, 64)
    _check_mqar_rows(task, batch.inputs, batch.targets)
    # Keys cover the whole lower half (1..7) and values the upper half (8..15) over many rows.
    assert set(batch.inputs[:, 0:8:2].flatten().tolist()) == set(range(1, 8))
    assert set(batch.inputs[:, 1:8:2].flatten().tolist()) == set(range(8, 16))


def test_mqar_default_sizes(tasks):
    for task, split in ((MQAR(), "valid"), (tasks["mqar"], "train")):
        batch = task.batch(split, 1, 8)
        _check_mqar_rows(task, batch.inputs, batch.targets)


def test_mqar_query_slots_follow_the_power_law():
    def mean_slot(power_a: float) -> float:
        task = MQAR(vocab_size=256, seq_len=256, num_pairs=16, power_a=power_a)
        queries = (task.batch("train", 0, 256).targets != IGNORE).nonzero()[:, 1]
        return float(((queries - 32) // 2).float().mean())

    # 112 slots: a = 1 is uniform (mean about 55.5); a = 0.01 piles queries into the early slots.
    assert 50 < mean_slot(1.0) < 61
    assert mean_slot(0.01) < 35


# ---------------------------------------------------------------- listops


@pytest.mark.parametrize("text, value", [
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[SM 3 8 ]", 1),
    ("[MED 1 5 3 ]", 3),
    ("[MED 4 1 3 8 ]", 3),  # even count: the lower median
    ("[MIN [MAX 1 2 ] [SM 5 6 ] 7 ]", 1),
    ("[SM [MED 9 9 0 ] [MAX 3 [MIN 8 6 ] ] 5 ]", 0),
    ("[MAX [MED [SM 9 9 9 ] 2 4 ] [MIN 3 3 ] ]", 4),
    ("7", 7),
])
def test_listops_evaluates_hand_written_expressions(text, value):
    tokens = encode(text)
    assert render(tokens) == text
    tree = parse(tokens)
    assert tokenize(tree) == tokens
    assert evaluate(tree) == value


@pytest.mark.parametrize("text", ["[MAX 1 ]", "[MAX 1 2", "1 2", "]", "[SM 1 2 ] ]"])
def test_listops_rejects_malformed_expressions(text):
    with pytest.raises(SeqmixError):
        parse(encode(text))


def test_listops_generated_sequences_are_valid(tasks):
    task: ListOps = tasks["listops"]
    batch = task.batch("train", 1, 64)
    assert torch.equal(batch.padding_mask, batch.inputs == 0)
    lengths = (~batch.padding_mask).sum(dim=1)
    assert ((lengths >= task.min_length) & (lengths <= task.max_length)).all()
    for row, length, target in zip(batch.inputs, lengths.tolist(), batch.targets.tolist()):
        assert (row[length:] == 0).all() and (row[:length] != 0).all()  # right-padded
        tree = parse(row)
        assert evaluate(tree) == target and tokenize(tree) == row[:length].tolist()
        depth = max(np.cumsum([1 if 11 <= t <= 14 else -1 if t == 15 else 0 for t in row[:length].tolist()]))
        assert depth <= task.max_depth - 1
        stack = [tree]
        while stack:
            node = stack.pop()
            if not isinstance(node, int):
                assert 2 <= len(node[1]) <= task.max_args
                stack.extend(node[1])


def test_listops_default_generation_is_fast_and_labels_vary():
    task = ListOps()
    assert task.seq_len == 256
    best = min(_timed(lambda: task.batch("train", i, 32)) for i in range(3))
    assert best < 0.1
    labels = task.batch("train", 9, 256).targets
    assert len(set(labels.tolist())) >= 8


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------- selective copying


def test_selective_copying_targets_are_the_data_tokens_in_order():
    task = SelectiveCopying(num_tokens=6, num_tokens_to_copy=5, seq_len=24)
    assert task.vocab_size == 8
    delimiter = 24 - 5 - 1
    batch = task.batch("train", 0, 32)
    for inputs, targets in zip(batch.inputs.tolist(), batch.targets.tolist()):
        data = [t for t in inputs[:delimiter] if t != 0]
        assert len(data) == 5 and all(2 <= t < 8 for t in data)
        assert inputs[delimiter] == 1 and inputs[delimiter + 1:] == [0] * 5
        assert targets[delimiter:delimiter + 5] == data
        assert targets[:delimiter] == [IGNORE] * delimiter and targets[delimiter + 5:] == [IGNORE]


def test_selective_copying_positions_vary():
    batch = SelectiveCopying().batch("valid", 0, 16)
    assert len({tuple((row[:239] != 0).nonzero().flatten().tolist()) for row in batch.inputs}) == 16


# ---------------------------------------------------------------- masked segment


@pytest.mark.parametrize("split", ["train", "valid"])
def test_masked_segment_masks_exact_spans_of_the_original_bytes(split, tasks):
    task: MaskedSegment = tasks["masked_segment"]
    length, batch_size, index = task.seq_len, 8, 1
    batch = task.batch(split, index, batch_size)
    masked = batch.targets != IGNORE
    assert torch.equal(masked, batch.inputs == MASK)
    assert (masked.sum(dim=1) == round(task.mask_fraction * length)).all()
    original = torch.where(masked, batch.targets, batch.inputs)
    data = task.corpus.data[split]
    if split == "valid":
        windows = data.numel() // length
        for row in range(batch_size):
            w = (index * batch_size + row) % windows
            assert torch.equal(original[row], data[w * length:(w + 1) * length].long())
    else:
        corpus = bytes(data.tolist())
        assert all(bytes(row.tolist()) in corpus for row in original)


def test_masked_segment_span_lengths(tasks):
    task = tasks["masked_segment"]
    rows = torch.cat([task.batch("train", i, 32).targets != IGNORE for i in range(4)])
    runs = [run for row in rows for run in _runs(row)]
    # Trimming the last span of each row pulls the mean a little below mean_span.
    assert 0.7 * task.mean_span < sum(runs) / len(runs) < 1.2 * task.mean_span


@pytest.mark.parametrize("mask_fraction, mean_span", [(0.15, 1), (0.9, 8), (0.5, 100)])
def test_masked_segment_extreme_settings_keep_the_exact_count(mask_fraction, mean_span, cache_dir):
    task = MaskedSegment(seq_len=64, mask_fraction=mask_fraction, mean_span=mean_span, cache_dir=cache_dir,
                         max_bytes=20_000)
    masked = task.batch("train", 0, 64).inputs == MASK
    assert (masked.sum(dim=1) == round(mask_fraction * 64)).all()
    if mean_span == 1:
        assert all(set(_runs(row)) == {1} for row in masked)
    if mean_span == 100:
        # The first span covers all 32 positions with probability 0.99^31 ≈ 0.73: about 1.4 runs per row.
        assert sum(len(_runs(row)) for row in masked) / len(masked) < 1.7


def test_a_seed_is_one_torch_tells_apart_and_every_such_seed_generates():
    """A seed above 2**24 overflowed manual_seed inside generator_for (ValueError: Overflow when
    unpacking long long), and one above 2**32 would have repeated a smaller one: torch keeps 32 bits."""
    from seqmix.tasks.base import generator_for

    tasks = [MQAR(vocab_size=64, seq_len=32, num_pairs=4, seed=seed) for seed in (1, 2**31 + 1)]
    first, second = (task.batch("train", 0, 2).inputs for task in tasks)
    assert first.shape == second.shape and not torch.equal(first, second)
    assert torch.equal(generator_for(7, "train", 3).get_state(), generator_for(7, "train", 3).get_state())
    for seed in (2**32, 2**40):
        with pytest.raises(SeqmixError, match=rf"mqar: seed={seed} is not valid; expected an integer from 0 to 2\*\*32 - 1"):
            MQAR(vocab_size=64, seq_len=32, num_pairs=4, seed=seed)


def test_no_training_batch_has_a_validation_batchs_seed_past_a_million_steps():
    """generator_for's arithmetic seed gave train's batch 1,000,033 valid's batch 0: from that step on,
    a generated task trained on its own evaluation batches. Earlier batches keep their seeds."""
    from seqmix.tasks.base import INDEX_SPAN, SPLITS, generator_for

    def seed(split, index):
        return generator_for(7, split, index).initial_seed()

    assert seed("train", 5) == (7 * 1_000_003 * INDEX_SPAN + 5)  # as every earlier version seeded it
    valid = {seed(split, index) for split in SPLITS if split != "train" for index in range(4)}
    trained = {seed("train", index) for start in (0, INDEX_SPAN - 2, 2 * INDEX_SPAN - 2, 10**9) for index in range(start, start + 4)}
    assert not valid & trained and len(trained) == 16


def test_task_options_that_cannot_make_data_are_refused_before_the_run_folder_is_written(tmp_path, capsys):
    """power_a=160 overflowed the MQAR slot weights (a traceback from torch.multinomial at the first
    batch), and a ListOps length window no tree fits failed at the first step, after run.json was written."""
    from seqmix.cli import main
    from seqmix.tasks import TASKS

    assert TASKS["mqar"](vocab_size=64, seq_len=256, num_pairs=4, power_a=160).batch("train", 0, 2).inputs.shape == (2, 256)
    with pytest.raises(SeqmixError, match=r"power_a=1000000.0 leaves 1 of the 124 query slots .* fewer than num_pairs=4"):
        TASKS["mqar"](vocab_size=64, seq_len=256, num_pairs=4, power_a=1e6)
    out = tmp_path / "run"
    assert main(["train", "model=mega", "model.depth=1", "model.d_model=16", "task=listops", "task.min_length=1000",
                 "task.max_length=1000", "train.max_steps=2", "train.progress=false", f"train.out_dir={out}"]) == 2
    assert "no tree with 1000..1000 tokens" in capsys.readouterr().err and not out.exists()
