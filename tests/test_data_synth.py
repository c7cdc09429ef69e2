"""The synthetic dataset has the NIH download's layout and file kinds, and label
frequencies close to the real release."""

import numpy as np
import pandas as pd
import pytest

from cxrjax.cli import main
from cxrjax.data.metadata import label_matrix, read_metadata
from cxrjax.data.splits import make_split
from cxrjax.data.synth import NIH_PREVALENCE, write_synthetic_nih
from cxrjax.findings import FINDINGS, NO_FINDING

PNG_COLOUR_TYPES = {0: "gray", 6: "rgba"}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(out), "--patients", "40", "--image-size", "32", "--seed", "5"]) == 0
    return out


def _png_kinds(folder):
    kinds = {}
    for path in folder.glob("images_*/images/*.png"):
        head = path.read_bytes()[:26]
        kinds[path.name] = (head[24], head[25])  # bit depth, colour type
    return kinds


def test_layout_is_the_nih_download(small):
    assert (small / "Data_Entry_2017.csv").exists()
    table = read_metadata(small / "Data_Entry_2017.csv")
    files = sorted(p.name for p in small.glob("images_*/images/*.png"))
    assert sorted(table["image_id"]) == files
    assert {p.parent.parent.name for p in small.glob("images_*/images/*.png")} == {"images_001"}
    train_val = (small / "train_val_list.txt").read_text().split("\n")
    test = (small / "test_list.txt").read_text().split("\n")
    assert sorted(train_val + test) == files
    assert not (small / "test_list.txt").read_text().endswith("\n")  # as NIH's lists
    # The same split code as for the real lists accepts them: patient-wise.
    part = make_split(table, "official", nih_dir=small, seed=0)
    assert set(table["image_id"][part == "test"]) == set(test)
    assert table.groupby("patient_id").size().max() > 1
    assert table["patient_id"].nunique() == 40


def test_images_are_gray_rgba_and_16_bit_like_the_release_and_its_mirrors(tmp_path):
    write_synthetic_nih(tmp_path, num_patients=300, image_size=8, seed=1)
    kinds = pd.Series(_png_kinds(tmp_path))
    share = kinds.value_counts(normalize=True)
    assert abs(share[(8, 6)] - 0.06) < 0.03  # RGBA
    assert abs(share[(16, 0)] - 0.03) < 0.02  # 16-bit gray
    assert abs(share[(8, 0)] - 0.91) < 0.04


def test_label_frequencies_and_co_occurrence_follow_the_release(tmp_path):
    summary = write_synthetic_nih(tmp_path, num_patients=1500, image_size=8, seed=0, min_prevalence=0.0)
    table = read_metadata(tmp_path / "Data_Entry_2017.csv")
    y = label_matrix(table)
    n = len(table)
    assert n == summary.images and n > 4000
    assert np.allclose(y.mean(0), [summary.prevalence[f] for f in FINDINGS])
    for j, name in enumerate(FINDINGS):
        p = NIH_PREVALENCE[name]
        # Four standard errors, tripled variance for the images of one patient sharing labels.
        assert abs(y[:, j].mean() - p) < 4 * np.sqrt(3 * p * (1 - p) / n), name
    # 53.8% of the real images are No Finding (60,361 of 112,120).
    assert abs(table["no_finding"].mean() - 0.538) < 0.03
    raw = pd.read_csv(tmp_path / "Data_Entry_2017.csv")
    assert (raw["Finding Labels"] == NO_FINDING).sum() == table["no_finding"].sum()
    eff, atel = FINDINGS.index("Effusion"), FINDINGS.index("Atelectasis")
    assert y[y[:, eff] == 1, atel].mean() > 2 * y[:, atel].mean()


def test_default_floor_gives_every_finding_test_positives(tmp_path):
    summary = write_synthetic_nih(tmp_path, num_patients=300, image_size=8, seed=2)
    assert min(summary.prevalence.values()) > 0.03


def test_a_patient_keeps_one_sex_and_ages_plausibly_across_follow_ups(tmp_path):
    write_synthetic_nih(tmp_path, num_patients=200, image_size=8, seed=3)
    table = read_metadata(tmp_path / "Data_Entry_2017.csv").sort_values(["patient_id", "follow_up"])
    assert (table.groupby("patient_id")["sex"].nunique() == 1).all()
    steps = table.groupby("patient_id")["age"].diff().dropna()
    assert steps.between(0, 2).all() and (steps > 0).any()
    assert table["age"].between(18, 85 + 2 * table["follow_up"].max()).all()
    assert set(table["sex"]) == {"M", "F"}
