"""Patient-wise splits on the real NIH lists and a seeded random split; leakage checks
and the training-part imbalance options."""

import functools

import numpy as np
import pandas as pd
import pytest

from cxrjax.data.metadata import MetadataError, find_metadata, label_matrix, read_metadata
from cxrjax.data.splits import (
    CHEXNET_FILE_ORDER,
    LeakageError,
    check_no_leakage,
    keep_no_finding_fraction,
    make_split,
    oversample_repeats,
    read_image_list,
    read_labelled_split,
)
from cxrjax.findings import FINDINGS


@functools.cache
def _real(nih_dir):
    return read_metadata(find_metadata(nih_dir))


@functools.cache
def _official(nih_dir, seed):
    return make_split(_real(nih_dir), "official", nih_dir=nih_dir, val_fraction=0.1, seed=seed)


@pytest.fixture
def table(nih_dir):
    return _real(nih_dir)


def _patients(table, part, name):
    return set(table["patient_id"][part == name])


def _assert_leak_free(table, part):
    names = sorted(set(part) - {""})
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not _patients(table, part, a) & _patients(table, part, b), (a, b)


def _small_table(labels, patients):
    """A metadata-like table: one row per label vector, patient ids as given."""
    labels = np.asarray(labels, np.int8)
    table = pd.DataFrame(
        {
            "image_id": [f"{p:08d}_{i:03d}.png" for i, p in enumerate(patients)],
            "patient_id": patients,
            "no_finding": labels.sum(1) == 0,
        }
    )
    for j, name in enumerate(FINDINGS):
        table[name] = labels[:, j]
    return table


def test_official_split_counts_and_no_shared_patient(nih_dir, table):
    part = _official(nih_dir, 0)
    counts = part.value_counts()
    assert counts["train"] + counts["val"] == 86_524 and counts["test"] == 25_596
    assert (part != "").all()
    _assert_leak_free(table, part)
    # Independent of the code under test: the raw lists share no patient.
    train_val = set(read_image_list(nih_dir / "train_val_list.txt"))
    test = set(read_image_list(nih_dir / "test_list.txt"))
    patient = dict(zip(table["image_id"], table["patient_id"]))
    assert not {patient[i] for i in train_val} & {patient[i] for i in test}
    assert set(table["image_id"][part == "test"]) == test


def test_official_val_carve_out_is_seeded_patient_wise_and_stratified(nih_dir, table):
    a = _official(nih_dir, 0)
    b = make_split(table, "official", nih_dir=nih_dir, val_fraction=0.1, seed=0)
    c = _official(nih_dir, 1)
    assert a.equals(b)
    assert not a.equals(c) and (a == "test").equals(c == "test")
    train_val = a != "test"
    assert abs((a == "val").sum() / train_val.sum() - 0.1) < 0.002
    y = label_matrix(table)
    overall = y[train_val.to_numpy()].mean(0)
    val = y[(a == "val").to_numpy()].mean(0)
    assert np.allclose(val, overall, rtol=0.1, atol=0.002), dict(zip(FINDINGS, val - overall))


def test_chexnet_lists_are_read_by_name_and_leak_checked(nih_dir, table):
    part = make_split(table, "chexnet", nih_dir=nih_dir)
    assert part.value_counts().to_dict() == {"train": 78_468, "test": 22_433, "val": 11_219}
    _assert_leak_free(table, part)
    # The lists carry the 2017 labels: 181 images differ from v2020 (shared README).
    # A column mapped to the wrong finding would make thousands differ.
    by_id = table.set_index("image_id")
    differ = 0
    for name in ("train", "val", "test"):
        listed = read_labelled_split(nih_dir / "chexnet_split" / f"{name}_list.txt")
        assert set(listed["image_id"]) == set(table["image_id"][part == name])
        y = by_id.loc[listed["image_id"], list(FINDINGS)].to_numpy()
        differ += (listed[list(FINDINGS)].to_numpy() != y).any(1).sum()
    assert differ == 181


def test_random_split_fractions_leakage_and_prevalence(table):
    part = make_split(table, "random", fractions=(0.9, 0.05, 0.05), seed=0)
    assert part.equals(make_split(table, "random", fractions=(0.9, 0.05, 0.05), seed=0))
    _assert_leak_free(table, part)
    share = part.value_counts(normalize=True)
    assert abs(share["train"] - 0.9) < 0.005 and abs(share["val"] - 0.05) < 0.005
    y = label_matrix(table)
    overall = y.mean(0)
    for name in ("train", "val", "test"):
        got = y[(part == name).to_numpy()].mean(0)
        assert np.allclose(got, overall, rtol=0.1, atol=0.001), (name, dict(zip(FINDINGS, got - overall)))


def test_leak_is_an_error_naming_the_patient():
    table = _small_table(np.zeros((4, 14)), [1, 1, 2, 7])
    check_no_leakage(table, pd.Series(["train", "train", "test", "test"]))
    with pytest.raises(LeakageError, match=r"1 patient\(s\).*patient 7 in test, train"):
        check_no_leakage(table.iloc[[0, 2, 3, 3]].reset_index(drop=True), pd.Series(["train", "test", "test", "train"]))


def test_split_lists_with_unknown_or_twice_listed_images_are_refused(tmp_path):
    table = _small_table(np.zeros((3, 14)), [1, 2, 3])
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n00000002_001.png")
    (tmp_path / "test_list.txt").write_text("00000002_001.png")
    with pytest.raises(MetadataError, match="image 00000002_001.png is in both the train and test lists"):
        make_split(table, "official", nih_dir=tmp_path)
    (tmp_path / "test_list.txt").write_text("00000009_000.png")
    with pytest.raises(MetadataError, match=r"1 image\(s\) of the test list are not in the metadata.*00000009_000"):
        make_split(table, "official", nih_dir=tmp_path)
    (tmp_path / "test_list.txt").write_text("00000003_002.png\n00000003_002.png")
    with pytest.raises(MetadataError, match="test_list.txt: image '00000003_002.png' listed twice"):
        make_split(table, "official", nih_dir=tmp_path)
    (tmp_path / "bad.txt").write_text("00000001_000.png 0 1\n")
    with pytest.raises(MetadataError, match="bad.txt: line 1: expected an image name and 14 labels, got 3"):
        read_labelled_split(tmp_path / "bad.txt")


def test_keep_no_finding_fraction_drops_only_no_finding_rows():
    rng = np.random.default_rng(0)
    labels = (rng.random((4000, 14)) < 0.05) * (rng.random((4000, 1)) < 0.5)
    table = _small_table(labels, list(range(1, 4001)))
    kept = keep_no_finding_fraction(table, 0.2, seed=3)
    assert kept.equals(keep_no_finding_fraction(table, 0.2, seed=3))
    assert not kept.index.equals(keep_no_finding_fraction(table, 0.2, seed=4).index)
    with_finding = ~table["no_finding"]
    assert with_finding[kept.index].sum() == with_finding.sum()  # every finding row kept
    share = kept["no_finding"].sum() / table["no_finding"].sum()
    assert abs(share - 0.2) < 0.03
    with pytest.raises(ValueError, match=r"keep fraction must be in \(0, 1\]"):
        keep_no_finding_fraction(table, 0.0, seed=0)


def test_oversampling_repeats_rows_with_a_rare_finding():
    labels = np.zeros((10, 14), np.int8)
    labels[:6, 0] = 1  # Atelectasis: prevalence 0.6
    labels[6, 13] = 1  # Hernia: 0.1
    labels[7, [0, 6]] = 1  # Atelectasis and Pneumonia (0.1)
    table = _small_table(labels, list(range(1, 11)))
    repeats = oversample_repeats(table, rare_below=0.2, factor=3)
    assert repeats.tolist() == [1, 1, 1, 1, 1, 1, 3, 3, 1, 1]


def test_each_chexnet_label_column_is_the_finding_it_is_named_after(nih_dir, table):
    """`CHEXNET_FILE_ORDER` names the files' columns: each named column agrees best with the
    v2020 label of that very finding (a shifted or swapped order names some column wrong)."""
    listed = read_labelled_split(nih_dir / "chexnet_split" / "test_list.txt")
    truth = table.set_index("image_id").loc[listed["image_id"], list(FINDINGS)].to_numpy()
    named = listed[list(CHEXNET_FILE_ORDER)].to_numpy()
    agreement = (named[:, :, None] == truth[:, None, :]).mean(0)  # [named column, finding]
    best = [FINDINGS[j] for j in agreement.argmax(1)]
    assert best == list(CHEXNET_FILE_ORDER)
