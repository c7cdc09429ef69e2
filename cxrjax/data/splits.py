"""Patient-wise train/val/test splits of the NIH table, and training-part imbalance options.

Every split goes through `check_no_leakage`: an X-ray of one patient in train and
another in test inflates AUC, so a shared patient is an error, never a warning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrjax.data.metadata import MetadataError, label_matrix
from cxrjax.errors import InputError
from cxrjax.findings import FINDINGS

PARTS = ("train", "val", "test")
# The CheXNet split files (`image_name l1 ... l14`) give their 14 labels in FINDINGS' order,
# the CheXNet convention FINDINGS follows: their columns take these names, and are used by name.
CHEXNET_FILE_ORDER = FINDINGS


class LeakageError(InputError):
    """A patient appears in more than one part of a split."""


def check_no_leakage(table: pd.DataFrame, part: pd.Series) -> None:
    """Raise if any patient has images in two parts."""
    patients = table["patient_id"].to_numpy()
    parts_per_patient = pd.Series(part.to_numpy()).groupby(patients).nunique()
    leaked = parts_per_patient.index[parts_per_patient > 1]
    if len(leaked):
        shown = "; ".join(
            f"patient {p} in {', '.join(sorted(set(part.to_numpy()[patients == p])))}" for p in leaked[:10]
        )
        raise LeakageError(f"{len(leaked)} patient(s) appear in more than one split part ({shown})")


def read_image_list(path: str | Path) -> list[str]:
    """One image name per line (the NIH files have no final newline)."""
    path = Path(path)
    if not path.exists():
        raise MetadataError(f"{path}: split list not found")
    # utf-8-sig: a byte-order mark from a spreadsheet export is not part of the first name.
    names = [line.split()[0] for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if len(set(names)) != len(names):
        dup = pd.Series(names)[pd.Series(names).duplicated()].iloc[0]
        raise MetadataError(f"{path}: image {dup!r} listed twice")
    return names


def read_labelled_split(path: str | Path) -> pd.DataFrame:
    """A CheXNet-style list: `image_name` then 14 0/1 labels, as a table keyed by image_id."""
    path = Path(path)
    if not path.exists():
        raise MetadataError(f"{path}: split list not found")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 1 + len(CHEXNET_FILE_ORDER):
            raise MetadataError(
                f"{path}: line {lineno}: expected an image name and "
                f"{len(CHEXNET_FILE_ORDER)} labels, got {len(fields)} fields"
            )
        if any(v not in ("0", "1") for v in fields[1:]):
            raise MetadataError(f"{path}: line {lineno}: labels must be 0 or 1: {fields[1:]}")
        rows.append([fields[0], *map(int, fields[1:])])
    if not rows:
        raise MetadataError(f"{path}: no image rows (empty split list)")
    table = pd.DataFrame(rows, columns=["image_id", *CHEXNET_FILE_ORDER])
    if table["image_id"].duplicated().any():
        dup = table["image_id"][table["image_id"].duplicated()].iloc[0]
        raise MetadataError(f"{path}: image {dup!r} listed twice")
    return table[["image_id", *FINDINGS]]


def _assign(table: pd.DataFrame, lists: dict[str, list[str]], source: str) -> pd.Series:
    part = pd.Series(np.full(len(table), "", dtype=object), index=table.index)
    index = pd.Series(table.index, index=table["image_id"].to_numpy())
    for name, images in lists.items():
        unknown = [i for i in images if i not in index.index]
        if unknown:
            raise MetadataError(
                f"{source}: {len(unknown)} image(s) of the {name} list are not in the metadata (e.g. {unknown[0]!r})"
            )
        taken = part.loc[index[images].to_numpy()]
        if (taken != "").any():
            row = taken[taken != ""].index[0]
            raise MetadataError(
                f"{source}: image {table['image_id'][row]} is in both the {taken[row]} and {name} lists"
            )
        part.loc[index[images].to_numpy()] = name
    return part


def stratified_patient_split(table: pd.DataFrame, fractions: dict[str, float], seed: int) -> pd.Series:
    """Seeded patient-wise split with finding frequencies matched across parts.

    Hand-written because scikit-learn's StratifiedGroupKFold is single-label and
    fold-based; this is a greedy iterative stratification (Sechidis et al. 2011)
    over patients, with the rarest finding placed first.
    """
    if abs(sum(fractions.values()) - 1) > 1e-6 or min(fractions.values()) < 0:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {fractions}")
    names = list(fractions)
    frac = np.array([fractions[n] for n in names])
    labels = label_matrix(table).astype(np.int64)
    patients, inverse = np.unique(table["patient_id"].to_numpy(), return_inverse=True)
    per_patient = np.zeros((len(patients), labels.shape[1]), np.int64)
    np.add.at(per_patient, inverse, labels)
    images = np.bincount(inverse, minlength=len(patients))

    totals = per_patient.sum(0)
    need = frac[:, None] * totals[None, :]  # wanted positives per part and finding
    need_images = frac * len(table)
    rng = np.random.default_rng(seed)
    has = per_patient > 0
    rarity = np.where(has, totals[None, :], np.iinfo(np.int64).max).min(1)
    order = np.lexsort((rng.random(len(patients)), rarity))
    assigned = np.empty(len(patients), np.int64)
    for p in order:
        if has[p].any():
            # Sechidis: decide on the patient's rarest finding, the hardest to balance.
            rarest = np.flatnonzero(has[p])[np.argmin(totals[has[p]])]
            score = need[:, rarest]
        else:
            score = need_images.copy()
        score = np.where(need_images > 0, score, -np.inf)  # full parts take nobody more
        best = np.flatnonzero(score == score.max())
        part = best[np.argmax(need_images[best])]
        assigned[p] = part
        need[part] -= per_patient[p]
        need_images[part] -= images[p]
    return pd.Series(np.array(names, dtype=object)[assigned[inverse]], index=table.index)


def official_split(table: pd.DataFrame, nih_dir: str | Path, val_fraction: float, seed: int) -> pd.Series:
    """NIH's train_val/test lists, with a seeded patient-wise val carve-out of train_val."""
    nih_dir = Path(nih_dir)
    lists = {
        "train": read_image_list(nih_dir / "train_val_list.txt"),
        "test": read_image_list(nih_dir / "test_list.txt"),
    }
    part = _assign(table, lists, str(nih_dir))
    trainval = part == "train"
    carve = stratified_patient_split(table[trainval], {"train": 1 - val_fraction, "val": val_fraction}, seed)
    part.loc[carve.index] = carve
    return part


def chexnet_split(table: pd.DataFrame, split_dir: str | Path) -> pd.Series:
    """The random patient-wise split used by public CheXNet reproductions."""
    split_dir = Path(split_dir)
    lists = {name: read_labelled_split(split_dir / f"{name}_list.txt")["image_id"].tolist() for name in PARTS}
    return _assign(table, lists, str(split_dir))


def make_split(
    table: pd.DataFrame,
    kind: str,
    *,
    nih_dir: str | Path | None = None,
    chexnet_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
    seed: int = 0,
) -> pd.Series:
    """One part name ('train'/'val'/'test', or '' for unused) per row, leakage-checked."""
    if kind == "official":
        part = official_split(table, nih_dir, val_fraction, seed)
    elif kind == "chexnet":
        part = chexnet_split(table, chexnet_dir or Path(nih_dir) / "chexnet_split")
    elif kind == "random":
        part = stratified_patient_split(table, dict(zip(PARTS, fractions)), seed)
    else:
        raise ValueError(f"unknown split {kind!r}; choose official, chexnet or random")
    used = part != ""
    check_no_leakage(table[used], part[used])
    return part


def keep_no_finding_fraction(table: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Drop a seeded (1 - fraction) of the No Finding rows (use on the training part only)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"no-finding keep fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    drop = table["no_finding"].to_numpy() & (rng.random(len(table)) >= fraction)
    return table[~drop]


def oversample_repeats(table: pd.DataFrame, rare_below: float, factor: int) -> np.ndarray:
    """How many times to repeat each row: `factor` for rows with a finding rarer than
    `rare_below` (a prevalence in this table), else 1."""
    labels = label_matrix(table)
    prevalence = labels.mean(0)
    rare = prevalence < rare_below
    has_rare = (labels[:, rare] > 0).any(1)
    return np.where(has_rare, factor, 1).astype(np.int64)
