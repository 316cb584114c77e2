"""Gather finished runs (a sweep's jobs, or any set of run directories) into rows of one table
(``seqmix.tables.records_table`` draws it; ``seqmix.tables.write_csv`` writes it as CSV)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

from seqmix.errors import first_few, json_kind, not_a_file
from seqmix.jsontext import parse_json

METRIC_COLUMNS = ("bits_per_byte", "bits_per_token", "accuracy", "loss")


MAX_RECORD_BYTES = 16 * 2**20
"""The largest run.json read: a run's record is a few kilobytes; anything far larger is not one."""


class GatheredRuns(NamedTuple):
    """``collect_runs``' result: the rows, and one line per run or metrics line left out, naming the file and why."""

    rows: list[dict]
    problems: list[str]


def collect_runs(root: str | os.PathLike) -> GatheredRuns:
    """One row per run directory below ``root`` (any directory holding run.json and metrics.jsonl).

    Each row: the run's path, model and task presets, parameters, steps done, and the last
    validation metrics. The files can be anyone's (a shared sweep folder, runs copied from
    elsewhere) and a run killed while writing leaves a line unfinished, so nothing in them is
    trusted: a run.json that is not a regular file holding a JSON object leaves its run out, a
    metrics line that is not a metric record ({"split": ..., "step": ...}) is left out, and each
    is told in ``problems``; a field of the wrong type shows as an empty cell ("?" for a preset),
    and is told there too.
    Lines are read one at a time, so a long metrics.jsonl costs no memory.
    """
    rows, problems = [], []
    for record_path in sorted(Path(root).rglob("run.json")):
        run_dir = record_path.parent
        metrics_path = run_dir / "metrics.jsonl"
        if not metrics_path.exists():
            continue
        try:
            record = _read_record(record_path)
            train, valid, left_out = _last_metrics(metrics_path)
        except (OSError, ValueError) as error:
            problems.append(f"left out {run_dir}: {error}")
            continue
        if left_out:
            problems.append(f"{metrics_path}: left out {left_out}")
        wrong = _wrong_fields(record)
        if wrong:
            problems.append(f"{record_path}: {first_few(wrong)}; shown as empty cells")
        model = _mapping(record.get("model"))
        preset = _mapping(record.get("preset"))
        layers = model.get("layers")
        row = {
            "run": str(run_dir),
            "model": _text(preset.get("model")) or "?",
            "task": _text(preset.get("task")) or "?",
            "d_model": _integer(model.get("d_model")),
            "layers": _integer(model.get("depth")) or (len(layers) if isinstance(layers, list) else None),
            "steps": train["step"] if train else 0,
            "tokens_per_s": _rounded(train.get("tokens_per_s")) if train else None,
        }
        for column in METRIC_COLUMNS:
            if valid and _number(valid.get(column)) is not None:
                row[f"valid_{column}"] = valid[column]
        rows.append(row)
    return GatheredRuns(rows, problems)


RECORD_FIELDS = {("model",): dict, ("preset",): dict, ("preset", "model"): str, ("preset", "task"): str,
                 ("model", "d_model"): int, ("model", "depth"): int, ("model", "layers"): list}
"""The run.json fields a row shows, and the type each must have."""


def _wrong_fields(record: dict) -> list[str]:
    """The RECORD_FIELDS present in ``record`` with another type, each as "<field> is <what it is>"."""
    wrong = []
    for path, kind in RECORD_FIELDS.items():
        value, parent = record, None
        for key in path:
            parent, value = value, value.get(key) if isinstance(value, dict) else None
        if isinstance(parent, dict) and path[-1] in parent and value is not None:
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                wrong.append(f"{'.'.join(path)} is {json_kind(value)}, not {json_kind(kind())}")
    return wrong


def _read_record(path: Path) -> dict:
    """run.json as a dict; a ValueError says why it is not a run's record."""
    if not path.is_file():
        raise ValueError(f"run.json {not_a_file(path)}")
    if path.stat().st_size > MAX_RECORD_BYTES:
        raise ValueError(f"run.json holds {path.stat().st_size:,} bytes, more than a run's record ({MAX_RECORD_BYTES:,} at most)")
    try:
        record = parse_json(path.read_bytes().decode("utf-8"))
    except ValueError as error:
        raise ValueError(f"run.json is not UTF-8 JSON ({error})") from None
    if not isinstance(record, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(record), "a number")
        raise ValueError(f"run.json holds {kind}, not a JSON object")
    return record


def _last_metrics(path: Path) -> tuple[dict | None, dict | None, str]:
    """The last train and validation records of metrics.jsonl, and what was left out ('' for nothing)."""
    if not path.is_file():
        raise ValueError(f"metrics.jsonl {not_a_file(path)}")
    last = {"train": None, "valid": None}
    bad, first_bad, unfinished, number = 0, 0, False, 0
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if not line.endswith(b"\n"):
                unfinished = True  # the run stopped while it wrote this line
                continue
            entry = metric_row(line)
            if entry is None or not isinstance(entry.get("split"), str):
                bad, first_bad = bad + 1, first_bad or number
            elif entry["split"] in last:
                last[entry["split"]] = entry
    told = []
    if bad:
        told.append(f"{bad} line(s) that are not metric records (line {first_bad} the first)")
    if unfinished:
        told.append(f"its unfinished last line {number} (the run stopped while writing it)")
    return last["train"], last["valid"], " and ".join(told)


def metric_row(line: str | bytes) -> dict | None:
    """One metrics.jsonl row, a JSON object with an integer step; None for any other line (one torn
    by a run killed while writing it, or one seqmix did not write)."""
    try:
        row = parse_json(line)
    except ValueError:  # UnicodeDecodeError included
        return None
    return row if isinstance(row, dict) and _integer(row.get("step")) is not None else None


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def _integer(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _rounded(value) -> int | None:
    number = _number(value)
    return round(number) if number is not None and math.isfinite(number) else None
