"""Readers of predictions, labels and run descriptions; output-path safety."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from cxrjax.data.metadata import MetadataError
from cxrjax.eval.labels import Labels, align_labels, as_labels, read_labels
from cxrjax.eval.paths import UnsafePathError, safe_child
from cxrjax.eval.predictions import PredictionsError, read_predictions, write_predictions
from cxrjax.eval.runinfo import RunInfoError, parse_run_info, read_run_info
from cxrjax.findings import FINDINGS

IDS = ["00000001_000.png", "00000001_001.png", "00000002_000.png"]


def _write_csv(path, columns, rows):
    path.write_text(",".join(columns) + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


def _probs(n=3):
    return np.linspace(0.01, 0.99, n * 14).reshape(n, 14)


def test_round_trip_keeps_exact_floats(tmp_path):
    probs = np.random.default_rng(0).random((3, 14))
    p = read_predictions(write_predictions(tmp_path / "p.csv", IDS, probs))
    assert list(p.image_ids) == IDS
    assert np.array_equal(p.probs, probs)


def test_columns_are_mapped_by_name_in_any_order_with_or_without_prefix(tmp_path):
    probs = _probs()
    order = list(reversed(range(14)))
    names = [("prob_" if j % 2 else "") + FINDINGS[j] for j in order]
    names[order.index(3)] = "Infiltrate"  # an alias spelling seen in NIH files
    rows = [[IDS[i], *probs[i, order]] for i in range(3)]
    p = read_predictions(_write_csv(tmp_path / "p.csv", ["image_id", *names], rows))
    assert np.array_equal(p.probs, probs)


def test_unknown_column_is_named(tmp_path):
    cols = ["Image Index", *("prob_" + f for f in FINDINGS), "prob_Fracture"]
    rows = [[i, *([0.5] * 15)] for i in IDS]
    with pytest.raises(PredictionsError, match=r"unknown column\(s\) \['prob_Fracture'\]"):
        read_predictions(_write_csv(tmp_path / "p.csv", cols, rows))


def test_missing_finding_and_duplicate_finding_columns(tmp_path):
    cols = ["Image Index", *("prob_" + f for f in FINDINGS[:-1])]
    with pytest.raises(PredictionsError, match="no probability column for \\['Hernia'\\]"):
        read_predictions(_write_csv(tmp_path / "a.csv", cols, [[IDS[0], *([0.5] * 13)]]))
    cols = ["Image Index", *("prob_" + f for f in FINDINGS), "Mass"]
    with pytest.raises(PredictionsError, match="'prob_Mass' and 'Mass' are both Mass"):
        read_predictions(_write_csv(tmp_path / "b.csv", cols, [[IDS[0], *([0.5] * 15)]]))


def test_id_column_must_be_exactly_one(tmp_path):
    cols = ["Image Index", "image_id", *FINDINGS]
    with pytest.raises(PredictionsError, match="exactly one image id column"):
        read_predictions(_write_csv(tmp_path / "p.csv", cols, [[IDS[0], IDS[0], *([0.5] * 14)]]))


@pytest.mark.parametrize(
    "value, message",
    [
        ("nan", "'nan' is not a finite number"),
        ("", "'' is not a finite number"),
        ("abc", "'abc' is not a finite number"),
        ("1.5", "probability 1.5 is outside"),
        ("-0.1", "probability -0.1 is outside"),
        ("__import__('os')", "is not a finite number"),
    ],
)
def test_bad_probability_names_line_and_column(tmp_path, value, message):
    rows = [[i, *([0.5] * 14)] for i in IDS]
    rows[1][1 + FINDINGS.index("Edema")] = value
    path = _write_csv(tmp_path / "p.csv", ["Image Index", *("prob_" + f for f in FINDINGS)], rows)
    with pytest.raises(PredictionsError) as e:
        read_predictions(path)
    assert f"line 3 ({IDS[1]}), column 'prob_Edema'" in str(e.value)
    assert message in str(e.value)


def test_duplicate_and_empty_ids(tmp_path):
    cols = ["Image Index", *FINDINGS]
    with pytest.raises(PredictionsError, match="line 3: image '00000001_000.png' predicted twice"):
        read_predictions(_write_csv(tmp_path / "a.csv", cols, [[IDS[0], *([0.5] * 14)]] * 2))
    with pytest.raises(PredictionsError, match="line 2: empty image id"):
        read_predictions(_write_csv(tmp_path / "b.csv", cols, [["", *([0.5] * 14)]]))
    with pytest.raises(PredictionsError, match="no prediction rows"):
        read_predictions(_write_csv(tmp_path / "c.csv", cols, []))
    with pytest.raises(PredictionsError, match="not found"):
        read_predictions(tmp_path / "missing.csv")


# ---------------------------------------------------------------------------- labels


def _split_file(path, rows):
    path.write_text("\n".join(f"{i} " + " ".join(map(str, lab)) for i, lab in rows))
    return path


def test_labelled_split_maps_columns_and_derives_patients(tmp_path):
    lab = np.zeros((3, 14), int)
    lab[0, FINDINGS.index("Hernia")] = 1
    lab[2, FINDINGS.index("Cardiomegaly")] = 1
    labels = read_labels(_split_file(tmp_path / "test_list.txt", zip(IDS, lab)))
    assert labels.exhaustive
    assert labels.table["patient_id"].tolist() == [1, 1, 2]
    assert labels.table.loc[0, "Hernia"] == 1 and labels.table.loc[2, "Cardiomegaly"] == 1


def test_metadata_labels_are_not_exhaustive(tmp_path):
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
        "00000001_000.png,Cardiomegaly|Infiltrate,0,1,58,M,PA\n"
        "00000002_000.png,No Finding,0,2,40,F,AP\n"
    )
    labels = read_labels(path)
    assert not labels.exhaustive
    y, pid = align_labels(np.array(["00000002_000.png", "00000001_000.png"]), labels, "p.csv")
    assert pid.tolist() == [2, 1]
    assert y[1, FINDINGS.index("Infiltration")] == 1 and y[0].sum() == 0


def test_metadata_with_byte_order_mark_is_recognised(tmp_path):
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_text(
        "\ufeffImage Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
        "View Position\n00000001_000.png,Hernia,0,1,58,M,PA\n",
        encoding="utf-8",
    )
    labels = read_labels(path)
    assert not labels.exhaustive and labels.table.loc[0, "Hernia"] == 1


def test_predicted_but_unlabelled_image_is_an_error(tmp_path):
    labels = read_labels(_split_file(tmp_path / "l.txt", [(i, [0] * 14) for i in IDS]))
    with pytest.raises(MetadataError, match=r"1 predicted image\(s\) have no labels.*00000009_000"):
        align_labels(np.array([*IDS, "00000009_000.png"]), labels, "p.csv")


def test_split_images_without_prediction_is_an_error(tmp_path):
    labels = read_labels(_split_file(tmp_path / "l.txt", [(i, [0] * 14) for i in IDS]))
    with pytest.raises(MetadataError, match=r"1 image\(s\) of the labelled split .* no prediction"):
        align_labels(np.array(IDS[:2]), labels, "p.csv")
    # The same subset is fine against non-exhaustive labels (a metadata file).
    y, _ = align_labels(np.array(IDS[:2]), Labels(labels.table, "m", False), "p.csv")
    assert y.shape == (2, 14)


def test_split_list_with_non_nih_names_cannot_give_patients(tmp_path):
    with pytest.raises(MetadataError, match="not an NIH file name"):
        read_labels(_split_file(tmp_path / "l.txt", [("../../x.png", [0] * 14)]))


def test_bare_table_accepted_and_checked():
    table = pd.DataFrame({"image_id": IDS, **{f: [0, 1, 0] for f in FINDINGS}})
    assert as_labels(table).table["patient_id"].tolist() == [1, 1, 2]
    with pytest.raises(MetadataError, match="lacks column"):
        as_labels(table.drop(columns="Mass"))


# ------------------------------------------------------------------------ run info


def test_run_info_schema(tmp_path):
    info = parse_run_info({"name": "a", "split_family": "official", "px": 224, "extra": 1}, "x")
    assert info.px == 224 and info.split == ""
    with pytest.raises(RunInfoError, match="'split_family' is None; set it to 'official'"):
        parse_run_info({"name": "a"}, "x")
    with pytest.raises(RunInfoError, match="'split_family' is 'chexnet'"):
        parse_run_info({"name": "a", "split_family": "chexnet"}, "x")
    with pytest.raises(RunInfoError, match="'px' must be a positive integer"):
        parse_run_info({"name": "a", "split_family": "random", "px": "224"}, "x")
    with pytest.raises(RunInfoError, match="'name' must be a non-empty string"):
        parse_run_info({"split_family": "random"}, "x")
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(RunInfoError, match="not valid JSON"):
        read_run_info(tmp_path / "run.json")
    (tmp_path / "run.json").write_text(json.dumps({"name": "b", "split_family": "random"}))
    assert read_run_info(tmp_path / "run.json").name == "b"


# ---------------------------------------------------------------------- safe_child


@pytest.mark.parametrize("name", ["../../x.png", "a/../../b", "/etc/passwd", "", "..", ".", "a\\..\\b", "x\x00y"])
def test_safe_child_refuses_escapes(tmp_path, name):
    with pytest.raises(UnsafePathError):
        safe_child(tmp_path / "out", name)


def test_safe_child_allows_plain_and_nested_names(tmp_path):
    assert safe_child(tmp_path, "00000001_000.png") == (tmp_path / "00000001_000.png").resolve()
    assert safe_child(tmp_path, "cams/a.png") == (tmp_path / "cams" / "a.png").resolve()


def test_safe_child_refuses_symlink_out(tmp_path):
    (tmp_path / "out").mkdir()
    os.symlink(tmp_path, tmp_path / "out" / "link")
    with pytest.raises(UnsafePathError, match="escapes"):
        safe_child(tmp_path / "out", "link/x.png")
