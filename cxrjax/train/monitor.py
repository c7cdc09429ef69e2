"""Where metrics go: metrics.jsonl and metrics_<kind>.csv in the workdir, wandb (offline unless configured),
and a tqdm bar with images/s. Only process 0 writes."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import jax

from cxrjax.workdir import METRICS_LOG, WANDB_RUN_ID


class MetricsLog:
    def __init__(self, workdir: Path, wandb_cfg, config_dict: dict, run_name: str):
        self.active = jax.process_index() == 0
        self.jsonl = workdir / METRICS_LOG
        self.workdir = workdir
        self._columns: dict[str, list[str]] = {}  # per kind: the CSV's header, read or written once
        self._run = None
        if self.active and wandb_cfg.mode != "disabled":
            import wandb

            # Online only when the user asks; the key comes from wandb's own login or env.
            self._run = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity or None,
                name=run_name,
                dir=str(workdir),
                mode=wandb_cfg.mode,
                config=config_dict,
                resume="allow",
                id=_wandb_id(workdir),
            )

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.active:
            return
        # Wall-clock time last: launch/run_cost.py measures epoch durations from it.
        row = {"step": step, "kind": kind, **values, "time": round(time.time(), 3)}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float, str)) or v is None}
        path = self.workdir / f"metrics_{kind}.csv"  # one file per kind: fixed columns
        new = not path.exists()
        if kind not in self._columns:
            # A resumed run keeps the file's own header, so a column added by a newer cxrjax
            # (or one a row lacks) can never shift the values under the wrong names.
            self._columns[kind] = list(scalars) if new else _header(path)
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._columns[kind], extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(scalars)
        if self._run is not None:
            self._run.log({f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()


def _header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def _wandb_id(workdir: Path) -> str:
    """One wandb run per workdir, so a resumed training continues its run."""
    path = workdir / WANDB_RUN_ID
    if not path.exists():
        path.write_text(os.urandom(6).hex())
    return path.read_text().strip()
