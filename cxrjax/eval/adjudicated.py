"""Radiologist-adjudicated labels (Majkowska et al., Radiology 2019) for four findings on
4,376 ChestX-ray14 images: the closest thing to ground truth the dataset has.

The file is the NIH metadata format plus `Fracture, Pneumothorax, Airspace opacity,
Nodule or mass` (YES/NO) and `Set Id` (val/test); it is recognised by those columns.
Model outputs map to the adjudicated findings by name (`MAPPING`); a finding with no
ChestX-ray14 output (Fracture) is reported as n/a. The file's own `Finding Labels`
(NIH's text-mined labels) are scored with the same mapping on the same images, so the
two kinds of ground truth read side by side.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrjax.auc import roc_auc
from cxrjax.data.metadata import MetadataError, read_metadata
from cxrjax.eval.labels import METADATA_COLUMNS, Labels
from cxrjax.eval.metrics import bootstrap_aucs, percentile_ci
from cxrjax.findings import FINDINGS

# Adjudicated finding <- ChestX-ray14 outputs whose maximum scores it (empty: none).
MAPPING = {
    "Fracture": (),
    "Pneumothorax": ("Pneumothorax",),
    "Airspace opacity": ("Consolidation", "Pneumonia", "Infiltration"),
    "Nodule or mass": ("Nodule", "Mass"),
}
SET_COLUMN = "Set Id"
VALUES = {"YES": 1, "NO": 0}
# Adjudicated columns are stored under this prefix: "Pneumothorax" is also a text-mined one.
PREFIX = "adjudicated:"


@dataclass(frozen=True)
class AdjudicatedLabels:
    table: pd.DataFrame  # image_id, patient_id, set_id, PREFIX + MAPPING (0/1), *FINDINGS (text-mined), metadata
    source: str

    def text_mined(self) -> Labels:
        """The file's NIH labels as ordinary (non-exhaustive) labels."""
        return Labels(
            self.table[["image_id", "patient_id", *FINDINGS, *METADATA_COLUMNS]], self.source, exhaustive=False
        )


def is_adjudicated(path: str | Path) -> bool:
    """True when the file's header has the adjudicated columns (by name, any order)."""
    path = Path(path)
    if not path.is_file():
        return False
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        header = [c.strip() for c in f.readline().lstrip("\ufeff").rstrip("\r\n").split(",")]
    return sum(c in header for c in MAPPING) >= 2 and SET_COLUMN in header


def read_adjudicated(path: str | Path) -> AdjudicatedLabels:
    """Parse the adjudicated file; a missing column or a value other than YES/NO is a
    one-line error naming the file and row."""
    path = Path(path)
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    raw.columns = [str(c).strip() for c in raw.columns]
    missing = [c for c in (*MAPPING, SET_COLUMN) if c not in raw.columns]
    if missing:
        raise MetadataError(f"{path}: missing adjudicated column(s) {missing}; found {list(raw.columns)}")
    nih = read_metadata(path)  # the NIH columns, checked row by row
    table = nih[["image_id", "patient_id", *FINDINGS, *METADATA_COLUMNS]].copy()
    for column in MAPPING:
        values = raw[column].str.strip().str.upper()
        bad = ~values.isin(list(VALUES))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise MetadataError(f"{path}: row {i + 2}: {column} {raw[column].iloc[i]!r} is not YES or NO")
        table[PREFIX + column] = values.map(VALUES).to_numpy(np.int8)
    sets = raw[SET_COLUMN].str.strip()
    if (sets == "").any():
        i = int(np.flatnonzero((sets == "").to_numpy())[0])
        raise MetadataError(f"{path}: row {i + 2}: empty {SET_COLUMN}")
    table.insert(2, "set_id", sets.to_numpy())
    return AdjudicatedLabels(table, str(path))


def mapped_scores(probs: np.ndarray, findings=FINDINGS) -> np.ndarray:
    """[N, len(MAPPING)] scores (or text-mined 0/1 labels) per adjudicated finding: the
    max over its mapped ChestX-ray14 columns; NaN for a finding with none."""
    out = np.full((len(probs), len(MAPPING)), np.nan)
    for k, names in enumerate(MAPPING.values()):
        if names:
            out[:, k] = np.max(probs[:, [findings.index(n) for n in names]], axis=1)
    return out


def overlap(image_ids, adjudicated: AdjudicatedLabels, source: str) -> np.ndarray:
    """Boolean mask of the predicted images the file labels; no overlap is an error."""
    covered = pd.Index(image_ids).isin(adjudicated.table["image_id"])
    if not covered.any():
        raise MetadataError(
            f"{adjudicated.source}: none of the {len(covered)} images in {source} is labelled "
            f"here (e.g. {image_ids[0]!r}); the file covers {len(adjudicated.table)} NIH images"
        )
    return covered


def _score(truth: np.ndarray, scores: np.ndarray, pids: np.ndarray, n: int, seed: int) -> dict:
    keep = [k for k, names in enumerate(MAPPING.values()) if names]
    reps = bootstrap_aucs(truth[:, keep], scores[:, keep], pids, n, seed)["per_finding"]
    out = {}
    for k, name in enumerate(MAPPING):
        y = truth[:, k]
        entry = {"n_positive": int(y.sum()), "auc": None, "auc_ci": None, "reason": None}
        if not MAPPING[name]:
            entry["reason"] = "no ChestX-ray14 output maps to it"
        else:
            entry["auc"] = roc_auc(y, scores[:, k])
            if entry["auc"] is None:
                entry["reason"] = f"no {'positives' if y.sum() == 0 else 'negatives'} among these images"
            else:
                entry["auc_ci"] = percentile_ci(reps[:, keep.index(k)])
        out[name] = entry
    return out


def _mapping_text(names: tuple[str, ...]) -> str | None:
    if not names:
        return None
    return names[0] if len(names) == 1 else "max(" + ", ".join(names) + ")"


def adjudicated_metrics(
    image_ids, probs, adjudicated: AdjudicatedLabels, source: str, n_bootstrap: int, seed: int
) -> dict:
    """metrics.json's `adjudicated`: AUCs against the radiologists' and the text-mined
    labels, per Set Id and overall, on the images both the predictions and the file cover."""
    covered = overlap(image_ids, adjudicated, source)
    ids = pd.Index(image_ids)[covered]
    rows = adjudicated.table.set_index("image_id").loc[ids]
    scores = mapped_scores(np.asarray(probs)[covered])
    adj = rows[[PREFIX + c for c in MAPPING]].to_numpy(np.int8)
    text = mapped_scores(rows[list(FINDINGS)].to_numpy(np.float64)).astype(np.float64)
    text = np.where(np.isnan(text), 0, text).astype(np.int8)
    pids = rows["patient_id"].to_numpy(np.int64)
    sets = rows["set_id"].to_numpy()
    parts = {}
    for name in [*sorted(np.unique(sets)), "overall"]:
        m = np.ones(len(ids), bool) if name == "overall" else sets == name
        parts[name] = {
            "n_images": int(m.sum()),
            "n_patients": int(len(np.unique(pids[m]))),
            "adjudicated": _score(adj[m], scores[m], pids[m], n_bootstrap, seed),
            "text_mined": _score(text[m], scores[m], pids[m], n_bootstrap, seed),
        }
    return {
        "labels": adjudicated.source,
        "mapping": {k: _mapping_text(v) for k, v in MAPPING.items()},
        "text_mined_source": "the file's own Finding Labels column, mapped the same way",
        "n_predictions": int(len(covered)),
        "n_scored": int(covered.sum()),
        "n_left_out": int((~covered).sum()),
        "sets": parts,
    }
