"""Prediction CSVs: one row per image, an id column and one probability column per finding.

The id column is `Image Index` or `image_id`; probability columns are named after the
finding with or without a `prob_` prefix (any spelling `cxrjax.findings.canonical`
knows), in any order. Every cell is parsed as data (pandas, `dtype=str`, then
`float`), never evaluated. cxrjax writes the `Image Index, prob_<finding>...` form.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrjax.errors import InputError
from cxrjax.findings import FINDINGS, canonical

ID_COLUMNS = ("Image Index", "image_id")
PROB_PREFIX = "prob_"


class PredictionsError(InputError):
    """A predictions file that cannot be evaluated as it is."""


@dataclass(frozen=True)
class Predictions:
    image_ids: np.ndarray  # [N] str
    probs: np.ndarray  # [N, 14] float64, FINDINGS order
    source: str


def _finding_of(column: str) -> str | None:
    name = column[len(PROB_PREFIX) :] if column.startswith(PROB_PREFIX) else column
    try:
        return canonical(name)
    except ValueError:
        return None


def _column_map(columns: list[str], path: Path) -> tuple[str, dict[str, str]]:
    ids = [c for c in columns if c in ID_COLUMNS]
    if len(ids) != 1:
        raise PredictionsError(
            f"{path}: need exactly one image id column ({' or '.join(ID_COLUMNS)}), "
            f"found {ids or 'none'} among {columns}"
        )
    found: dict[str, str] = {}
    unknown = []
    for column in columns:
        if column == ids[0]:
            continue
        finding = _finding_of(column)
        if finding is None:
            unknown.append(column)
        elif finding in found:
            raise PredictionsError(f"{path}: columns {found[finding]!r} and {column!r} are both {finding}")
        else:
            found[finding] = column
    if unknown:
        raise PredictionsError(
            f"{path}: unknown column(s) {unknown}; expected {ids[0]!r} and one probability "
            f"column per finding, named like 'prob_Atelectasis' or 'Atelectasis'"
        )
    missing = [f for f in FINDINGS if f not in found]
    if missing:
        raise PredictionsError(f"{path}: no probability column for {missing}")
    return ids[0], found


def read_predictions(path: str | Path) -> Predictions:
    """Parse and check a predictions CSV; errors name the file line and column."""
    path = Path(path)
    if not path.exists():
        raise PredictionsError(f"{path}: predictions file not found")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise PredictionsError(f"{path}: not a readable CSV: {e}") from e
    raw.columns = [str(c).strip() for c in raw.columns]
    id_column, columns = _column_map(list(raw.columns), path)
    if raw.empty:
        raise PredictionsError(f"{path}: no prediction rows")

    ids = raw[id_column].str.strip()
    empty = ids == ""
    if empty.any():
        raise PredictionsError(f"{path}: line {int(np.flatnonzero(empty)[0]) + 2}: empty image id")
    dup = ids.duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise PredictionsError(f"{path}: line {i + 2}: image {ids.iloc[i]!r} predicted twice")

    probs = np.empty((len(raw), len(FINDINGS)), np.float64)
    for j, finding in enumerate(FINDINGS):
        column = columns[finding]
        values = pd.to_numeric(raw[column].str.strip(), errors="coerce").to_numpy(np.float64)
        # Line numbers are 1-based file lines; the header is line 1.
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            i = int(bad[0])
            raise PredictionsError(
                f"{path}: line {i + 2} ({ids.iloc[i]}), column {column!r}: "
                f"{raw[column].iloc[i]!r} is not a finite number"
            )
        bad = np.flatnonzero((values < 0) | (values > 1))
        if len(bad):
            i = int(bad[0])
            raise PredictionsError(
                f"{path}: line {i + 2} ({ids.iloc[i]}), column {column!r}: probability {values[i]} is outside [0, 1]"
            )
        probs[:, j] = values
    return Predictions(ids.to_numpy(dtype=object), probs, str(path))


def write_predictions(path: str | Path, image_ids, probs: np.ndarray) -> Path:
    """Write the canonical form (`Image Index, prob_<finding>` in FINDINGS order)."""
    probs = np.asarray(probs, np.float64)
    if probs.shape != (len(image_ids), len(FINDINGS)):
        raise PredictionsError(f"probabilities must be [{len(image_ids)}, {len(FINDINGS)}], got {probs.shape}")
    table = pd.DataFrame(probs, columns=[PROB_PREFIX + f for f in FINDINGS])
    table.insert(0, ID_COLUMNS[0], list(image_ids))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # repr-exact floats so a round trip reproduces AUCs bit for bit.
    table.to_csv(path, index=False, float_format=None)
    return path
