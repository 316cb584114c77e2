"""Gather finished runs (a sweep's jobs, or any set of run directories) into rows of one table
(``seqmix.tables.records_table`` draws it; ``write_csv`` writes it as CSV)."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

METRIC_COLUMNS = ("bits_per_byte", "bits_per_token", "accuracy", "loss")


def collect_runs(root: str | os.PathLike) -> list[dict]:
    """One row per run directory below ``root`` (any directory holding run.json and metrics.jsonl).

    Each row: the run's path, model and task presets, parameters, steps done, and the last
    validation metrics.
    """
    rows = []
    for record_path in sorted(Path(root).rglob("run.json")):
        run_dir = record_path.parent
        metrics_path = run_dir / "metrics.jsonl"
        if not metrics_path.is_file():
            continue
        record = json.loads(record_path.read_text())
        metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        valid = [m for m in metrics if m["split"] == "valid"]
        train = [m for m in metrics if m["split"] == "train"]
        model = record.get("model", {})
        row = {
            "run": str(run_dir),
            "model": record.get("preset", {}).get("model") or "?",
            "task": record.get("preset", {}).get("task") or "?",
            "d_model": model.get("d_model"),
            "layers": model.get("depth") or len(model.get("layers", [])),
            "steps": train[-1]["step"] if train else 0,
            "tokens_per_s": round(train[-1].get("tokens_per_s", 0.0)) if train else None,
        }
        for column in METRIC_COLUMNS:
            if valid and column in valid[-1]:
                row[f"valid_{column}"] = valid[-1][column]
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: str | os.PathLike) -> None:
    """The rows as CSV."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
