"""Published per-finding AUCs (package data `baselines.csv`) grouped by split family.

Transcribed by finding NAME from the project's baselines note (whose second table has
a different column order). Split families:

- `official`: NIH's train_val_list/test_list.
- `random`: a patient-wise random split (CheXNet's own, or the CheXNet reproduction
  split). Fisher 2025's own run is here: its write-up states a random patient-wise
  90/5/5 split.
- `unstated`: the other rows as cited by Fisher 2025, whose split is not stated. They
  are shown in their own group and never ranked against a run.

Tags: `verified` (read from or recomputed with a public file of that work), `as-cited`
(exactly as printed in the Fisher 2025 write-up), `secondary` (third-party
compilation; mean agrees with the paper, cells unchecked).

`test_images` is the size of the test list a row was scored on, where known (NIH's
official test list: 25,596; the CheXNet reproduction split: 22,433).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pandas as pd

from cxrjax.findings import FINDINGS

FAMILIES = ("official", "random", "unstated")
TAGS = ("verified", "as-cited", "secondary")
COLUMNS = (
    "work",
    "year",
    "split_family",
    "split",
    "px",
    "backbone",
    "tag",
    "provenance",
    "test_images",
    *FINDINGS,
    "mean",
)


def load_baselines(path: str | Path | None = None) -> pd.DataFrame:
    """The baselines table; `path` overrides the packaged file (same columns)."""
    source = Path(path) if path else resources.files("cxrjax.eval") / "baselines.csv"
    with source.open() as f:
        table = pd.read_csv(f, keep_default_na=False, na_values={c: [""] for c in (*FINDINGS, "test_images")})
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{source}: baselines table lacks column(s) {missing}")
    bad = table[~table["split_family"].isin(FAMILIES) | ~table["tag"].isin(TAGS)]
    if len(bad):
        raise ValueError(f"{source}: unknown split_family or tag in row {bad.iloc[0]['work']!r}")
    return table[list(COLUMNS)]
