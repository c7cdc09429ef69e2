"""A synthetic dataset in the exact layout of the NIH download, for the demo and tests.

Finding frequencies follow ChestX-ray14 (floored so a small test part still has
positives of every finding), findings co-occur through a shared latent per patient
and correlated pairs, and each finding draws its own mark on the image (a textured
patch at a finding-specific place) so a model can learn it. A share of images is
stored as RGBA and as 16-bit, as in the real release and its mirrors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from cxrjax.findings import FINDINGS, NO_FINDING

# Per-image prevalence in Data_Entry_2017_v2020 (112,120 images).
NIH_PREVALENCE = {
    "Atelectasis": 0.1031,
    "Cardiomegaly": 0.0248,
    "Effusion": 0.1188,
    "Infiltration": 0.1774,
    "Mass": 0.0516,
    "Nodule": 0.0565,
    "Pneumonia": 0.0128,
    "Pneumothorax": 0.0473,
    "Consolidation": 0.0416,
    "Edema": 0.0205,
    "Emphysema": 0.0224,
    "Fibrosis": 0.0150,
    "Pleural_Thickening": 0.0302,
    "Hernia": 0.0020,
}
# Pairs that co-occur in the real labels.
CORRELATED = [
    ("Effusion", "Atelectasis"),
    ("Effusion", "Infiltration"),
    ("Edema", "Effusion"),
    ("Consolidation", "Pneumonia"),
    ("Mass", "Nodule"),
    ("Atelectasis", "Infiltration"),
    ("Pneumothorax", "Emphysema"),
    ("Fibrosis", "Pleural_Thickening"),
]
VIEWS = ("PA", "AP")
RGBA_SHARE = 0.06
UINT16_SHARE = 0.03
# Written beside the metadata: results on this data are marked synthetic downstream.
MARKER = "cxrjax_synthetic.json"


@dataclass(frozen=True)
class SynthSummary:
    out: Path
    images: int
    patients: int
    prevalence: dict[str, float]

    def __str__(self) -> str:
        return f"wrote {self.images} images of {self.patients} patients to {self.out}"


def _latent_correlation() -> np.ndarray:
    k = len(FINDINGS)
    corr = np.eye(k)
    for a, b in CORRELATED:
        i, j = FINDINGS.index(a), FINDINGS.index(b)
        corr[i, j] = corr[j, i] = 0.45
    return corr


def _sample_labels(rng, n_patients, images_per_patient, min_prevalence):
    prevalence = np.array([max(NIH_PREVALENCE[f], min_prevalence) for f in FINDINGS])
    # Imported here: scipy.stats takes a second, and the trainer imports this module
    # (through prepare) without making data.
    from scipy.stats import norm

    threshold = norm.ppf(1 - prevalence)
    chol = np.linalg.cholesky(_latent_correlation())
    rows = []
    for patient in range(n_patients):
        # A patient's images share half their latent: follow-ups repeat findings.
        shared = chol @ rng.standard_normal(len(FINDINGS))
        for follow_up in range(images_per_patient[patient]):
            own = chol @ rng.standard_normal(len(FINDINGS))
            z = np.sqrt(0.5) * shared + np.sqrt(0.5) * own
            rows.append((patient + 1, follow_up, (z > threshold).astype(np.int8)))
    return rows


def _patient_metadata(rng, images_per_patient) -> tuple[list[str], list[list[int]]]:
    """One sex per patient and an age per follow-up that starts at 18-85 and grows by
    0-2 years from one follow-up to the next, as a real patient's would."""
    sexes, ages = [], []
    for count in images_per_patient:
        sexes.append("MF"[int(rng.integers(2))])
        start = int(rng.integers(18, 86))
        ages.append((start + np.cumsum(np.r_[0, rng.integers(0, 3, count - 1)])).tolist())
    return sexes, ages


def _finding_places(size: int) -> list[tuple[int, int]]:
    # A 4x4 grid inside the lung area; the 14 findings take 14 of its 16 cells.
    cells = [(r, c) for r in range(4) for c in range(4)][:14]
    step = size / 5
    return [(int(step * (c + 1)), int(step * (r + 1))) for r, c in cells]


def _draw(rng, labels, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # Dark background, two brighter lung-shaped ellipses, a mediastinum, noise.
    image = 40 + 25 * rng.random()
    for cx in (0.32, 0.68):
        image = image + 70 * (((xx - cx) / 0.17) ** 2 + ((yy - 0.5) / 0.33) ** 2 < 1)
    image = image + 30 * (np.abs(xx - 0.5) < 0.06)
    image = image + rng.normal(0, 8, (size, size))
    radius = max(2, size // 14)
    for k, (x, y) in enumerate(_finding_places(size)):
        if not labels[k]:
            continue
        x += int(rng.integers(-radius // 2, radius // 2 + 1))
        y += int(rng.integers(-radius // 2, radius // 2 + 1))
        patch = ((xx * size - x) ** 2 + (yy * size - y) ** 2) < radius**2
        # Each finding gets its own stripe orientation inside its patch.
        angle = np.pi * k / len(FINDINGS)
        stripes = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * size * 0.8)
        image = image + patch * (60 + 40 * stripes)
    return np.clip(image, 0, 255).astype(np.uint8)


def _store(path: Path, gray: np.ndarray, mode: str) -> None:
    if mode == "rgba":
        bgra = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
        data = bgra
    elif mode == "uint16":
        data = gray.astype(np.uint16) * 257  # exact inverse of the 16→8 bit mapping
    else:
        data = gray
    if not cv2.imwrite(str(path), data):
        raise OSError(f"could not write {path}")


def write_synthetic_nih(
    out: str | Path,
    num_patients: int = 400,
    image_size: int = 128,
    seed: int = 0,
    min_prevalence: float = 0.05,
    images_per_archive: int = 500,
) -> SynthSummary:
    """Write images_XXX/images/*.png, Data_Entry_2017.csv, train_val_list.txt, test_list.txt."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_patient = 1 + rng.poisson(2.0, num_patients)
    rows = _sample_labels(rng, num_patients, per_patient, min_prevalence)
    # Own stream: metadata does not shift the label and image draws.
    sexes, ages = _patient_metadata(np.random.default_rng([seed, 1]), per_patient)

    records = []
    for n, (patient, follow_up, labels) in enumerate(rows):
        image_id = f"{patient:08d}_{follow_up:03d}.png"
        folder = out / f"images_{n // images_per_archive + 1:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        u = rng.random()
        mode = "rgba" if u < RGBA_SHARE else "uint16" if u < RGBA_SHARE + UINT16_SHARE else "gray"
        _store(folder / image_id, _draw(rng, labels, image_size), mode)
        names = [f for f, y in zip(FINDINGS, labels) if y]
        records.append(
            {
                "Image Index": image_id,
                "Finding Labels": "|".join(names) if names else NO_FINDING,
                "Follow-up #": follow_up,
                "Patient ID": patient,
                "Patient Age": ages[patient - 1][follow_up],
                "Patient Gender": sexes[patient - 1],
                "View Position": VIEWS[int(rng.random() < 0.4)],
                "OriginalImage[Width": image_size,
                "Height]": image_size,
                "OriginalImagePixelSpacing[x": 0.143,
                "y]": 0.143,
            }
        )
    table = pd.DataFrame(records)
    table.to_csv(out / "Data_Entry_2017.csv", index=False)

    # NIH's own lists are patient-wise with about 23% of images in test.
    test_patients = set(rng.permutation(num_patients)[: int(round(0.2 * num_patients))] + 1)
    is_test = table["Patient ID"].isin(test_patients)
    (out / "train_val_list.txt").write_text("\n".join(table["Image Index"][~is_test]))
    (out / "test_list.txt").write_text("\n".join(table["Image Index"][is_test]))
    labels = np.stack([r[2] for r in rows])
    settings = {"num_patients": num_patients, "image_size": image_size, "seed": seed, "min_prevalence": min_prevalence}
    (out / MARKER).write_text(json.dumps({"generator": "cxrjax synth", **settings}, indent=1))
    return SynthSummary(
        out=out,
        images=len(table),
        patients=num_patients,
        prevalence={f: float(p) for f, p in zip(FINDINGS, labels.mean(0))},
    )
