"""Ground truth for evaluation: an NIH metadata file or a labelled CheXNet-style split list.

Both become one table: `image_id, patient_id` and one 0/1 column per finding in
`FINDINGS` order. A split list is *exhaustive*: every image it names must be predicted,
because evaluating a part of a published test split is a different benchmark. A
metadata file covers the whole release, so a predictions file evaluates exactly the
images it contains.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrjax.data.metadata import IMAGE_ID, IMAGE_METADATA, MetadataError, read_metadata
from cxrjax.data.splits import read_labelled_split
from cxrjax.findings import FINDINGS

# Image metadata kept beside the labels when the source has it (for subgroup AUCs).
METADATA_COLUMNS = IMAGE_METADATA


@dataclass(frozen=True)
class Labels:
    table: pd.DataFrame  # image_id, patient_id, *FINDINGS, and METADATA_COLUMNS if known
    source: str
    exhaustive: bool  # True for a split list: all of its images must be predicted


def _first_line(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return f.readline().lstrip("\ufeff")  # a byte-order mark from spreadsheet exports


def patient_from_image_id(image_ids: pd.Series, source: str) -> np.ndarray:
    """NIH file names start with the 8-digit patient id (`00000013_005.png` -> 13); the
    metadata's Patient ID column always equals it, and split lists carry no other."""
    ids = image_ids.astype(str)
    bad = ~ids.str.match(IMAGE_ID)
    if bad.any():
        raise MetadataError(
            f"{source}: image id {ids[bad].iloc[0]!r} is not an NIH file name like "
            "00000001_000.png, so its patient cannot be known"
        )
    return ids.str[:8].astype(np.int64).to_numpy()


def read_labels(path: str | Path) -> Labels:
    """Read a `Data_Entry_2017*.csv[.gz]` (header starts with `Image Index`) or a split list."""
    path = Path(path)
    if not path.exists():
        raise MetadataError(f"{path}: label file not found")
    if _first_line(path).startswith("Image Index"):
        table = read_metadata(path)
        return Labels(table[["image_id", "patient_id", *FINDINGS, *METADATA_COLUMNS]], str(path), exhaustive=False)
    table = read_labelled_split(path)
    table.insert(1, "patient_id", patient_from_image_id(table["image_id"], str(path)))
    return Labels(table, str(path), exhaustive=True)


def as_labels(labels: Labels | pd.DataFrame) -> Labels:
    """Accept a bare table (e.g. `read_metadata` output) as non-exhaustive labels."""
    if isinstance(labels, Labels):
        return labels
    missing = [c for c in ("image_id", *FINDINGS) if c not in labels.columns]
    if missing:
        raise MetadataError(f"label table lacks column(s) {missing}")
    table = labels
    if "patient_id" not in table.columns:
        table = table.assign(patient_id=patient_from_image_id(table["image_id"], "label table"))
    metadata = [c for c in METADATA_COLUMNS if c in table.columns]
    return Labels(table[["image_id", "patient_id", *FINDINGS, *metadata]], "label table", exhaustive=False)


def align_labels(image_ids: np.ndarray, labels: Labels, predictions_source: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels [N, 14] and patient ids [N] in the order of `image_ids`, or raise on any
    image predicted but unlabelled, or (for a split list) labelled but unpredicted."""
    table = labels.table.set_index("image_id")
    ids = pd.Index(image_ids)
    unlabelled = ids.difference(table.index)
    if len(unlabelled):
        raise MetadataError(
            f"{predictions_source}: {len(unlabelled)} predicted image(s) have no labels in "
            f"{labels.source} (e.g. {', '.join(map(repr, unlabelled[:3]))})"
        )
    if labels.exhaustive:
        unpredicted = table.index.difference(ids)
        if len(unpredicted):
            raise MetadataError(
                f"{predictions_source}: {len(unpredicted)} image(s) of the labelled split "
                f"{labels.source} have no prediction (e.g. "
                f"{', '.join(map(repr, unpredicted[:3]))}); a split must be evaluated whole"
            )
    rows = table.loc[ids]
    return rows[list(FINDINGS)].to_numpy(np.int8), rows["patient_id"].to_numpy(np.int64)


def align_metadata(image_ids: np.ndarray, labels: Labels) -> pd.DataFrame | None:
    """sex, age, view of `image_ids` (after `align_labels` checked coverage), or None
    when the label source carries no such columns (split lists, old index files)."""
    if not all(c in labels.table.columns for c in METADATA_COLUMNS):
        return None
    rows = labels.table.set_index("image_id").loc[pd.Index(image_ids), list(METADATA_COLUMNS)]
    return rows.reset_index(drop=True)
