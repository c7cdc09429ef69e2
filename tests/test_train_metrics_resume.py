"""A resume drops the metric rows the interrupted run wrote past its checkpoint, so
metrics.jsonl and the CSVs hold each step once; written and read as the trainer does
(`MetricsLog`), no training."""

from __future__ import annotations

import csv
import json

import ml_collections

from cxrjax.train.metrics_resume import drop_rows_after
from cxrjax.train.monitor import MetricsLog
from cxrjax.workdir import METRICS_LOG


def _log(workdir, rows):
    log = MetricsLog(workdir, ml_collections.ConfigDict({"mode": "disabled"}), {}, "run")
    for step, kind in rows:
        log.write(
            step, kind, {"loss": float(step)} if kind == "train" else {"val_loss": float(step), "epoch": step // 4}
        )
    log.close()


def _steps(workdir):
    jsonl = [(r["step"], r["kind"]) for r in map(json.loads, (workdir / METRICS_LOG).read_text().splitlines())]
    tables = {}
    for kind in ("train", "val"):
        with open(workdir / f"metrics_{kind}.csv", newline="") as f:
            tables[kind] = [int(r["step"]) for r in csv.DictReader(f)]
    return jsonl, tables


def test_a_resume_keeps_each_step_once(tmp_path):
    # Killed at step 7 after a checkpoint at step 4: rows up to 7 were written.
    first = [(1, "train"), (3, "train"), (4, "val"), (5, "train"), (7, "train")]
    _log(tmp_path, first)
    assert drop_rows_after(tmp_path, 4) == 2
    # The resumed run logs steps 5.. again, as an uninterrupted run would.
    _log(tmp_path, [(5, "train"), (7, "train"), (8, "val")])
    jsonl, tables = _steps(tmp_path)
    assert jsonl == [(1, "train"), (3, "train"), (4, "val"), (5, "train"), (7, "train"), (8, "val")]
    assert tables == {"train": [1, 3, 5, 7], "val": [4, 8]}


def test_a_pending_validation_drops_its_own_row_and_a_line_cut_short(tmp_path):
    _log(tmp_path, [(3, "train"), (4, "val")])
    with open(tmp_path / METRICS_LOG, "a") as f:
        f.write('{"step": 5, "kind": "tr')  # killed mid-line
    drop_rows_after(tmp_path, 4, validation_pending=True)  # step 4's validation runs again
    jsonl, tables = _steps(tmp_path)
    assert jsonl == [(3, "train")] and tables == {"train": [3], "val": []}
