"""A resumed run logs again every step after the checkpoint it restored, so the rows the
interrupted run wrote past that step are dropped first: metrics.jsonl and the CSVs then
hold each step once (launch/run_cost.py times epochs from them). wandb keeps its own."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from cxrjax.workdir import METRICS_LOG


def drop_rows_after(workdir: Path, step: int, validation_pending: bool = False) -> int:
    """Drop the rows logged after `step` (and its val row too when its validation runs
    again); returns how many rows were dropped."""

    def keep(row_step: int, kind: str) -> bool:
        return row_step < step or (row_step == step and not (validation_pending and kind == "val"))

    workdir = Path(workdir)
    dropped = 0
    path = workdir / METRICS_LOG
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
                wanted = keep(int(row["step"]), row["kind"])
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill: drop it
                wanted = False
            if wanted:
                kept.append(line)
        dropped = len(lines) - len(kept)
        if dropped:
            _replace(path, "".join(kept))
    for table in sorted(workdir.glob("metrics_*.csv")):
        kind = table.stem.removeprefix("metrics_")
        with open(table, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or "step" not in rows[0]:
            continue
        column = rows[0].index("step")
        body = [r for r in rows[1:] if len(r) == len(rows[0]) and _int(r[column]) is not None]
        body = [r for r in body if keep(_int(r[column]), kind)]
        if len(body) != len(rows) - 1:
            out = io.StringIO()
            csv.writer(out).writerows([rows[0], *body])
            _replace(table, out.getvalue())
    return dropped


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)
