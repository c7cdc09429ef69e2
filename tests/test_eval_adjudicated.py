"""Radiologist-adjudicated labels: detection by columns, the max-mapping, AUCs against
scikit-learn on the images both files cover, bad input, and the real file."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxrjax.cli import main
from cxrjax.data.metadata import MetadataError
from cxrjax.eval.adjudicated import adjudicated_metrics, is_adjudicated, mapped_scores, read_adjudicated
from cxrjax.eval.predictions import write_predictions
from cxrjax.findings import FINDINGS

NIH = Path(os.environ.get("CXRJAX_NIH_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "nih"))
ADJ = ("Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass")


def _files(tmp: Path, patients=80, seed=0):
    """A Data_Entry file for all images, an adjudicated file for two thirds of them (whose
    own text-mined labels differ from the adjudicated ones), predictions for all."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(1, patients + 1):
        for k in range(int(rng.integers(1, 3))):
            labels = [f for f in FINDINGS if rng.random() < 0.2]
            rows.append(
                {
                    "Image Index": f"{p:08d}_{k:03d}.png",
                    "Finding Labels": "|".join(labels) or "No Finding",
                    "Follow-up #": k,
                    "Patient ID": p,
                    "Patient Age": 30 + p % 50 + k,
                    "Patient Gender": "MF"[p % 2],
                    "View Position": ("PA", "AP")[k % 2],
                    "OriginalImage[Width": 1024,
                    "Height]": 1024,
                    "OriginalImagePixelSpacing[x": 0.14,
                    "y]": 0.14,
                }
            )
    entry = pd.DataFrame(rows)
    entry.to_csv(tmp / "Data_Entry_2017.csv", index=False)
    n = len(entry)
    probs = rng.random((n, len(FINDINGS)))
    covered = entry.iloc[: 2 * n // 3].copy()
    m = len(covered)
    for name in ADJ:
        # Random truth: the tests compare with scikit-learn, not with a target AUC.
        covered[name] = np.where(rng.random(m) < 0.3 + 0.4 * rng.random(m), "YES", "NO")
    covered["Set Id"] = np.where(np.arange(m) % 3 == 0, "val", "test")
    covered.to_csv(tmp / "adjudicated.csv", index=False)
    write_predictions(tmp / "preds.csv", entry["Image Index"], probs)
    return entry, covered, probs


def test_mapping_is_the_max_of_the_named_outputs():
    probs = np.zeros((2, len(FINDINGS)))
    probs[0, FINDINGS.index("Nodule")], probs[0, FINDINGS.index("Mass")] = 0.2, 0.7
    probs[1, FINDINGS.index("Pneumonia")], probs[1, FINDINGS.index("Infiltration")] = 0.9, 0.4
    probs[:, FINDINGS.index("Pneumothorax")] = [0.3, 0.6]
    s = mapped_scores(probs)
    assert np.isnan(s[:, 0]).all()  # Fracture: no ChestX-ray14 output
    assert s[:, 1].tolist() == [0.3, 0.6]
    assert s[:, 2].tolist() == [0.0, 0.9]
    assert s[:, 3].tolist() == [0.7, 0.0]


def test_aucs_match_sklearn_on_the_covered_images_per_set(tmp_path):
    entry, covered, probs = _files(tmp_path)
    assert is_adjudicated(tmp_path / "adjudicated.csv") and not is_adjudicated(tmp_path / "Data_Entry_2017.csv")
    adj = read_adjudicated(tmp_path / "adjudicated.csv")
    m = adjudicated_metrics(entry["Image Index"].to_numpy(), probs, adj, "preds", 50, 0)
    assert (m["n_scored"], m["n_left_out"]) == (len(covered), len(entry) - len(covered))
    assert list(m["sets"]) == ["test", "val", "overall"]
    p = probs[: len(covered)]
    for name, s in m["sets"].items():
        rows = np.ones(len(covered), bool) if name == "overall" else (covered["Set Id"] == name).to_numpy()
        assert s["n_images"] == rows.sum()
        y = (covered["Nodule or mass"] == "YES").to_numpy()[rows]
        score = np.maximum(p[rows, FINDINGS.index("Nodule")], p[rows, FINDINGS.index("Mass")])
        assert s["adjudicated"]["Nodule or mass"]["auc"] == pytest.approx(roc_auc_score(y, score), abs=1e-12)
        # Side by side: the file's own text-mined labels, mapped the same way (not the adjudicated ones).
        text = covered["Finding Labels"].str.contains("Pneumothorax").to_numpy()[rows]
        assert s["text_mined"]["Pneumothorax"]["auc"] == pytest.approx(
            roc_auc_score(text, p[rows, FINDINGS.index("Pneumothorax")]), abs=1e-12
        )
        assert s["adjudicated"]["Fracture"]["auc"] is None
        assert s["adjudicated"]["Fracture"]["reason"] == "no ChestX-ray14 output maps to it"


def test_cli_scores_beside_nih_labels_or_alone(tmp_path, capsys):
    entry, covered, _ = _files(tmp_path, patients=50)
    args = ["evaluate", "--predictions", str(tmp_path / "preds.csv"), "--bootstrap", "20"]
    assert (
        main(
            [
                *args,
                "--labels",
                str(tmp_path / "Data_Entry_2017.csv"),
                "--labels",
                str(tmp_path / "adjudicated.csv"),
                "--out",
                str(tmp_path / "both"),
            ]
        )
        == 0
    )
    m = json.loads((tmp_path / "both" / "metrics.json").read_text())
    assert m["n_images"] == len(entry) and m["adjudicated"]["n_scored"] == len(covered)
    report = (tmp_path / "both" / "report.md").read_text()
    assert "## Radiologist-adjudicated labels" in report and "Nodule or mass ← max(Nodule, Mass)" in report
    # Alone, the file's own NIH labels score the images it covers; the rest are left out, said so.
    assert main([*args, "--labels", str(tmp_path / "adjudicated.csv"), "--out", str(tmp_path / "alone")]) == 0
    m = json.loads((tmp_path / "alone" / "metrics.json").read_text())
    assert m["n_images"] == len(covered) and "only the" in m["inputs"]["scored"]
    assert f"scoring the {len(covered)} of {len(entry)}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda t: t.assign(**{"Airspace opacity": ["MAYBE"] + list(t["Airspace opacity"][1:])}),
            "row 2: Airspace opacity 'MAYBE' is not YES or NO",
        ),
        (lambda t: t.drop(columns=["Nodule or mass"]), "missing adjudicated column(s) ['Nodule or mass']"),
        (lambda t: t.assign(**{"Set Id": [""] + list(t["Set Id"][1:])}), "row 2: empty Set Id"),
    ],
)
def test_bad_adjudicated_file_is_a_one_line_error(tmp_path, capsys, damage, message):
    _, covered, _ = _files(tmp_path, patients=10)
    damage(covered).to_csv(tmp_path / "adjudicated.csv", index=False)
    rc = main(
        [
            "evaluate",
            "--predictions",
            str(tmp_path / "preds.csv"),
            "--labels",
            str(tmp_path / "adjudicated.csv"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc != 0 and message in err and "adjudicated.csv" in err and len(err.splitlines()) == 1


def test_no_overlap_is_an_error(tmp_path):
    entry, _, probs = _files(tmp_path, patients=10)
    adj = read_adjudicated(tmp_path / "adjudicated.csv")
    other = [f"{90000000 + i:08d}_000.png" for i in range(len(entry))]
    with pytest.raises(MetadataError, match="none of the .* images in preds is labelled here"):
        adjudicated_metrics(np.array(other, dtype=object), probs, adj, "preds", 10, 0)


@pytest.mark.skipif(not (NIH / "reference").exists(), reason=f"real NIH files not at {NIH}")
def test_real_file_against_the_chexnet_reproduction():
    """The 4,376-image file read whole; the reproduction's predictions cover 935 of them."""
    from cxrjax.eval.predictions import read_predictions

    adj = read_adjudicated(NIH / "google2019_nih-chest-xray-labels.csv.gz")
    assert len(adj.table) == 4376 and set(adj.table["set_id"]) == {"val", "test"}
    assert adj.table["adjudicated:Nodule or mass"].sum() == 605
    preds = read_predictions(NIH / "reference" / "chexnet_repro_preds.csv")
    m = adjudicated_metrics(preds.image_ids, preds.probs, adj, "ref", 10, 0)
    assert (m["n_scored"], m["n_left_out"]) == (935, 22433 - 935)
    assert {k: v["n_images"] for k, v in m["sets"].items()} == {"test": 408, "val": 527, "overall": 935}
    overall = m["sets"]["overall"]
    # Radiologists disagree with the text-mined Pneumothorax label on 59 of these images.
    assert overall["adjudicated"]["Pneumothorax"]["n_positive"] == 46
    assert overall["text_mined"]["Pneumothorax"]["n_positive"] == 57
