"""Read NIH `Data_Entry_2017*.csv` (any label revision, gzipped or not) into one table.

The table has one row per image, indexed by nothing, with columns:
`image_id, patient_id, follow_up, age, sex, view, no_finding` and one 0/1 column per
finding in `FINDINGS` order. Bad rows fail loudly with the file and row number: a
mislabeled X-ray is worse than a crash.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from cxrjax.errors import InputError
from cxrjax.findings import ALIASES, FINDINGS, NO_FINDING

REQUIRED_COLUMNS = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
)
IMAGE_ID = re.compile(r"^\d{8}_\d{3}\.png$")
BASE_COLUMNS = ["image_id", "patient_id", "follow_up", "age", "sex", "view", "no_finding"]
# Per-image metadata that travels with the labels (index.csv, label tables) for subgroup AUCs.
IMAGE_METADATA = ("sex", "age", "view")


class MetadataError(InputError):
    """A metadata or label file that cannot be trusted as it is."""


def _parse_age(value: str, path: Path, row: int) -> int:
    # The 2017 release spells ages as plain years; some mirrors use "058Y".
    text = str(value).strip()
    match = re.fullmatch(r"(\d+)\s*([YMDW]?)", text)
    if not match:
        raise MetadataError(f"{path}: row {row}: unreadable Patient Age {value!r}")
    years = int(match.group(1))
    unit = match.group(2)
    if unit == "M":
        years //= 12
    elif unit in ("D", "W"):
        years = 0
    return years


def _parse_labels(text: str, path: Path, row: int) -> tuple[np.ndarray, bool]:
    names = [ALIASES.get(n.strip(), n.strip()) for n in str(text).split("|")]
    labels = np.zeros(len(FINDINGS), np.int8)
    if names == [NO_FINDING]:
        return labels, True
    for name in names:
        if name == NO_FINDING:
            raise MetadataError(f"{path}: row {row}: 'No Finding' combined with findings in {text!r}")
        if name not in FINDINGS:
            raise MetadataError(
                f"{path}: row {row}: label {name!r} is not one of the 14 findings "
                f"({', '.join(FINDINGS)}) nor 'No Finding'"
            )
        labels[FINDINGS.index(name)] = 1
    return labels, False


def _integer_column(raw: pd.DataFrame, column: str, path: Path) -> pd.Series:
    text = raw[column].str.strip()
    bad = ~text.str.fullmatch(r"\d+")
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise MetadataError(f"{path}: row {i + 2}: {column} {text.iloc[i]!r} is not a whole number")
    return text.astype(np.int64)


def read_metadata(path: str | Path) -> pd.DataFrame:
    """Parse a Data_Entry CSV; pandas reads `.gz` transparently."""
    path = Path(path)
    if not path.exists():
        raise MetadataError(f"{path}: metadata file not found")
    # dtype=str: every cell is parsed by us, never guessed (ids keep leading zeros).
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:  # also a file holding only a byte-order mark
        raise MetadataError(f"{path}: empty file; expected an NIH Data_Entry CSV with a header row") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise MetadataError(f"{path}: not a readable CSV ({str(e).strip().splitlines()[-1]})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise MetadataError(f"{path}: missing column(s) {missing}; found {list(raw.columns)}")
    n = len(raw)
    if n == 0:
        raise MetadataError(f"{path}: no image rows below the header")
    labels = np.zeros((n, len(FINDINGS)), np.int8)
    no_finding = np.zeros(n, bool)
    ages = np.zeros(n, np.int32)
    # Row numbers in messages are 1-based file lines (the header is line 1).
    for i, (text, age) in enumerate(zip(raw["Finding Labels"], raw["Patient Age"])):
        labels[i], no_finding[i] = _parse_labels(text, path, i + 2)
        ages[i] = _parse_age(age, path, i + 2)

    ids = raw["Image Index"].str.strip()
    bad = ~ids.str.match(IMAGE_ID)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise MetadataError(
            f"{path}: row {i + 2}: image id {ids.iloc[i]!r} is not an NIH file name like 00000001_000.png"
        )
    dup = ids.duplicated(keep="first")
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise MetadataError(f"{path}: row {i + 2}: duplicated image id {ids.iloc[i]!r}")
    patient = _integer_column(raw, "Patient ID", path)
    follow_up = _integer_column(raw, "Follow-up #", path)
    # The file name starts with the patient number; a row where they disagree would
    # put one patient on both sides of a split.
    wrong = ids.str[:8].astype(np.int64) != patient
    if wrong.any():
        i = int(np.flatnonzero(wrong.to_numpy())[0])
        raise MetadataError(
            f"{path}: row {i + 2}: Patient ID {patient.iloc[i]} does not match image id {ids.iloc[i]!r}"
        )
    sex = raw["Patient Gender"].str.strip()
    bad_sex = ~sex.isin(["M", "F"])
    if bad_sex.any():
        i = int(np.flatnonzero(bad_sex.to_numpy())[0])
        raise MetadataError(f"{path}: row {i + 2}: Patient Gender {sex.iloc[i]!r} is not M or F")

    table = pd.DataFrame(
        {
            "image_id": ids.to_numpy(),
            "patient_id": patient.to_numpy(np.int64),
            "follow_up": follow_up.to_numpy(np.int32),
            "age": ages,
            "sex": sex.to_numpy(),
            "view": raw["View Position"].str.strip().to_numpy(),
            "no_finding": no_finding,
        }
    )
    for j, name in enumerate(FINDINGS):
        table[name] = labels[:, j]
    return table


def find_metadata(nih_dir: str | Path) -> Path:
    """The label file of an NIH download: `Data_Entry_2017*.csv[.gz]`, newest revision first."""
    nih_dir = Path(nih_dir)
    candidates = sorted(nih_dir.glob("Data_Entry_2017*.csv*"), reverse=True)
    if not candidates:
        raise MetadataError(f"{nih_dir}: no Data_Entry_2017*.csv(.gz) found")
    return candidates[0]


def label_matrix(table: pd.DataFrame) -> np.ndarray:
    """The [N, 14] 0/1 labels in `FINDINGS` order."""
    return table[list(FINDINGS)].to_numpy(np.int8)
