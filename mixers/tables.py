"""Tables: the one Markdown writer behind every table seqmix prints or writes, and the one CSV writer.

The benchmark reports, the lowering report, ``seqmix gather`` and the search's leaderboard all
call ``markdown_table`` (or ``records_table`` for rows held as dicts), so every table escapes its
cells and aligns its columns the same way. Cells can hold text from files someone else wrote (a
run's records, a study's storage): their control characters, line breaks included, are written as
escapes (``seqmix.terminal``), so that they neither break the table nor act on a terminal.

``write_csv`` writes the CSV files (``seqmix gather csv=``, the search's leaderboard, the benchmark's
results.csv). A spreadsheet reads a cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a
carriage return as a formula, which a run name or an error text from someone else's files must not
become: such a text cell is written with a leading ``'`` (numbers are written as numbers).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from collections.abc import Collection, Mapping, Sequence

from seqmix.terminal import escape_controls


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]], right: Collection[int] = ()) -> str:
    """A GitHub Markdown table, its lines joined by newlines.

    Args:
        header: the column names.
        body: one sequence of cell texts per row, as many as ``header``; a ``|`` in a cell is
            escaped, and so is every control character (``escape_controls``), in the header too.
        right: indices of the columns aligned right (numbers); the others align left.
    """

    def cell(text) -> str:
        return escape_controls(str(text)).replace("|", "\\|")

    rule = "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"
    rows = ["| " + " | ".join(cell(text) for text in cells) + " |" for cells in body]
    return "\n".join(["| " + " | ".join(cell(name) for name in header) + " |", rule, *rows])


def records_table(records: Sequence[Mapping]) -> str:
    """Records (dicts) as a Markdown table: one column per key, in first-seen order across the
    records; floats with 4 decimals, None as an empty cell, a key a record lacks as an empty cell."""
    columns = list(dict.fromkeys(key for record in records for key in record))

    def show(value) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return "" if value is None else str(value)

    return markdown_table(columns, [[show(record.get(column)) for column in columns] for record in records])


# The first characters that make a spreadsheet evaluate a cell as a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value):
    """``value`` as written to CSV: a text that a spreadsheet would evaluate gets a leading ``'``."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def write_csv(rows: Sequence[Mapping], path: str | os.PathLike, columns: Sequence[str] | None = None) -> None:
    """``rows`` (dicts) as a UTF-8 CSV file: a header, then one line per row (``csv_cell`` for each value).

    Args:
        columns: the header; default: every key of the rows, in first-seen order. A key a row
            lacks is an empty cell.
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows({key: csv_cell(value) for key, value in row.items()} for row in rows)
