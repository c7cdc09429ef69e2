"""`evaluate_predictions`, the evaluate/ensemble CLI, and the golden CheXNet reproduction."""

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxrjax.cli import build_parser, main
from cxrjax.eval.evaluate import evaluate_predictions
from cxrjax.eval.labels import read_labels
from cxrjax.eval.metrics import youden_threshold
from cxrjax.eval.predictions import PredictionsError, read_predictions, write_predictions
from cxrjax.findings import FINDINGS

NIH = Path(os.environ.get("CXRJAX_NIH_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "nih"))
HERNIA = FINDINGS.index("Hernia")


def _synthetic(seed, patients, first_patient=1):
    """NIH-named images (1-3 per patient), labels and informative probabilities; no
    Hernia positives, so its AUC is undefined."""
    rng = np.random.default_rng(seed)
    ids, pids = [], []
    for p in range(first_patient, first_patient + patients):
        for k in range(rng.integers(1, 4)):
            ids.append(f"{p:08d}_{k:03d}.png")
            pids.append(p)
    n = len(ids)
    labels = (rng.random((n, 14)) < 0.25).astype(np.int8)
    labels[:, HERNIA] = 0
    probs = 1 / (1 + np.exp(-(rng.normal(size=(n, 14)) + 1.5 * labels - 1.2)))
    return np.array(ids, dtype=object), np.array(pids), labels, probs


def _split_file(path, ids, labels):
    path.write_text("\n".join(f"{i} " + " ".join(map(str, r)) for i, r in zip(ids, labels)))
    return path


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    ids, pids, labels, probs = _synthetic(0, 150)
    vids, _, vlabels, vprobs = _synthetic(1, 60, first_patient=1000)
    vlabels[:3, HERNIA] = 1  # validation has Hernia positives, test has none
    labels_obj = read_labels(_split_file(tmp / "test_list.txt", ids, labels))
    val_obj = read_labels(_split_file(tmp / "val_list.txt", vids, vlabels))
    run = {"name": "tiny", "split_family": "random", "split": "synthetic", "px": 64}
    m = evaluate_predictions(
        ids, probs, labels_obj, None, tmp / "out", (vids, vprobs, val_obj), n_bootstrap=200, seed=3, run=run
    )
    return tmp / "out", m, (ids, pids, labels, probs), (vids, vlabels, vprobs)


def test_aucs_match_sklearn_and_undefined_is_null(evaluated):
    out, m, (ids, _, labels, probs), _ = evaluated
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["auc"]["Hernia"] is None and on_disk["findings"]["Hernia"]["auc_ci"] is None
    expect = [roc_auc_score(labels[:, j], probs[:, j]) for j in range(13)]
    assert [on_disk["auc"][f] for f in FINDINGS[:13]] == pytest.approx(expect, abs=1e-12)
    assert on_disk["mean_auc"] == pytest.approx(np.mean(expect), abs=1e-12)
    assert on_disk["n_findings_in_mean"] == 13
    assert any("Hernia: no positives" in n and "excluded from mean_auc" in n for n in m["notes"])
    assert on_disk["micro_auc"] == pytest.approx(roc_auc_score(labels.ravel(), probs.ravel()))
    assert on_disk["std_auc"] == pytest.approx(np.std(expect, ddof=1))
    lo, hi = on_disk["mean_auc_ci"]
    assert lo < on_disk["mean_auc"] < hi
    assert on_disk["n_patients"] == 150 and on_disk["n_images"] == len(ids)


def test_thresholds_come_from_validation(evaluated):
    out, m, (_, _, labels, probs), (_, vlabels, vprobs) = evaluated
    assert m["thresholds"]["chosen_on"] == "validation" and m["thresholds"]["warning"] is None
    for j in (0, 5, HERNIA):
        t = youden_threshold(vlabels[:, j], vprobs[:, j])
        pt = m["findings"][FINDINGS[j]]["operating_points"]["youden"]
        assert pt["threshold"] == t
        assert pt["tp"] == int(((probs[:, j] >= t) & (labels[:, j] == 1)).sum())
    hernia = m["findings"]["Hernia"]["operating_points"]["youden"]
    assert hernia["sensitivity"] is None and hernia["specificity"] is not None
    pt = m["findings"]["Mass"]["operating_points"]["target_sensitivity"]
    vj = FINDINGS.index("Mass")
    val_sens = ((vprobs[:, vj] >= pt["threshold"]) & (vlabels[:, vj] == 1)).sum() / vlabels[:, vj].sum()
    assert val_sens >= 0.9


def test_outputs_written(evaluated):
    out, m, (ids, _, _, probs), _ = evaluated
    for name in (
        "predictions.csv",
        "metrics.json",
        "report.md",
        "roc_curves.csv",
        "run.json",
        "roc_curves.png",
        "score_histograms.png",
        "auc_vs_baselines.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert (out / "roc_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = read_predictions(out / "predictions.csv")
    assert np.array_equal(back.probs, probs) and list(back.image_ids) == list(ids)
    report = (out / "report.md").read_text()
    assert "| Hernia | 0 | 0.0000 | n/a | n/a |" in report
    assert "chosen on the **validation** images" in report and "Warning" not in report
    assert json.loads((out / "run.json").read_text())["split_family"] == "random"


def test_no_validation_warns_and_compare_runs_delong(tmp_path):
    ids, _, labels, probs = _synthetic(4, 80)
    table = pd.DataFrame({"image_id": ids, **{f: labels[:, j] for j, f in enumerate(FINDINGS)}})
    other = np.clip(probs + np.random.default_rng(5).normal(0, 0.2, probs.shape), 0, 1)
    shuffled = np.random.default_rng(6).permutation(len(ids))
    m = evaluate_predictions(
        ids, probs, table, None, tmp_path, n_bootstrap=20, compare=(ids[shuffled], other[shuffled], "other.csv")
    )
    assert m["thresholds"]["chosen_on"] == "test"
    assert "chosen on the test images" in (tmp_path / "report.md").read_text()
    c = m["comparison"]["findings"]
    assert c["Hernia"] is None
    assert c["Mass"]["auc_b"] == pytest.approx(roc_auc_score(labels[:, 4], other[:, 4]))
    assert "p (DeLong)" in (tmp_path / "report.md").read_text()
    with pytest.raises(PredictionsError, match="needs the same images"):
        evaluate_predictions(
            ids, probs, table, None, tmp_path, n_bootstrap=5, compare=(ids[1:], other[1:], "other.csv")
        )


def test_library_input_checks(tmp_path):
    ids, _, labels, probs = _synthetic(7, 20)
    table = pd.DataFrame({"image_id": ids, **{f: labels[:, j] for j, f in enumerate(FINDINGS)}})
    bad = probs.copy()
    bad[2, 3] = np.nan
    with pytest.raises(PredictionsError, match=f"image '{ids[2]}', finding Infiltration"):
        evaluate_predictions(ids, bad, table, None, tmp_path, n_bootstrap=5)
    with pytest.raises(PredictionsError, match=r"must be \[.*, 14\]"):
        evaluate_predictions(ids, probs[:, :13], table, None, tmp_path, n_bootstrap=5)
    with pytest.raises(PredictionsError, match="also test images"):
        evaluate_predictions(ids, probs, table, None, tmp_path, (ids[:5], probs[:5]), n_bootstrap=5)


# ------------------------------------------------------------------------------- CLI


@pytest.fixture()
def cli_files(tmp_path):
    ids, _, labels, probs = _synthetic(8, 60)
    split = _split_file(tmp_path / "test_list.txt", ids, labels)
    preds = write_predictions(tmp_path / "preds.csv", ids, probs)
    return tmp_path, split, preds, ids, probs


def test_cli_evaluate(cli_files, capsys):
    tmp, split, preds, ids, probs = cli_files
    vids, _, vlabels, vprobs = _synthetic(9, 30, first_patient=500)
    val_split = _split_file(tmp / "val_list.txt", vids, vlabels)
    write_predictions(tmp / "val.csv", vids, vprobs)
    write_predictions(tmp / "other.csv", ids, probs**2)
    (tmp / "run.json").write_text(json.dumps({"name": "cli", "split_family": "random"}))
    rc = main(
        [
            "evaluate",
            "--predictions",
            str(preds),
            "--labels",
            str(split),
            "--out",
            str(tmp / "out"),
            "--bootstrap",
            "10",
            "--seed",
            "4",
            "--val-predictions",
            str(tmp / "val.csv"),
            "--val-labels",
            str(val_split),
            "--compare",
            str(tmp / "other.csv"),
            "--run-info",
            str(tmp / "run.json"),
            "--target-sensitivity",
            "0.8",
        ]
    )
    assert rc == 0
    assert "mean AUC" in capsys.readouterr().out
    m = json.loads((tmp / "out" / "metrics.json").read_text())
    assert m["bootstrap"]["n"] == 10 and m["bootstrap"]["seed"] == 4
    assert m["inputs"]["val_labels"] == str(val_split)
    assert m["thresholds"]["chosen_on"] == "validation"
    assert m["thresholds"]["target_sensitivity"] == 0.8
    assert m["comparison"]["findings"]["Mass"]["difference"] == pytest.approx(0.0, abs=1e-12)
    assert m["run"]["name"] == "cli"


def test_cli_evaluate_describes_the_run_for_the_leaderboard(cli_files, capsys):
    """--name/--split-family/... write run.json, so the output goes straight to the leaderboard."""
    tmp, split, preds, ids, probs = cli_files
    base = ["evaluate", "--predictions", str(preds), "--labels", str(split), "--bootstrap", "5"]
    assert (
        main(
            [
                *base,
                "--out",
                str(tmp / "out"),
                "--name",
                "mine",
                "--split-family",
                "random",
                "--split",
                "chexnet",
                "--px",
                "224",
                "--backbone",
                "DenseNet-121",
            ]
        )
        == 0
    )
    run = json.loads((tmp / "out" / "run.json").read_text())
    assert run == {
        "name": "mine",
        "split_family": "random",
        "split": "chexnet",
        "px": 224,
        "backbone": "DenseNet-121",
        "evaluation": "",
        "replicate_group": "",
        "test_images_full": None,  # the chexnet split's 22,433 is known to the leaderboard
        "smoke": False,
    }
    assert main(["leaderboard", str(tmp / "out"), "--out", str(tmp / "board")]) == 0
    board = (tmp / "board" / "leaderboard.csv").read_text()
    assert "mine" in board and "CheXNet" in board  # ranked beside the random-split baselines
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp / "o2"), "--name", "half"])  # a name alone is not a run
    assert "--name and --split-family describe a run together" in capsys.readouterr().err


def test_every_cli_argument_has_help():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [
        f"{name} {a.option_strings or a.dest}"
        for name, sub in commands.items()
        for a in sub._actions
        if not isinstance(a, argparse._HelpAction) and not a.help
    ]
    assert missing == []


def test_cli_reports_bad_input_as_one_line(cli_files, capsys):
    tmp, split, preds, ids, probs = cli_files
    write_predictions(tmp / "part.csv", ids[:-1], probs[:-1])
    rc = main(["evaluate", "--predictions", str(tmp / "part.csv"), "--labels", str(split), "--out", str(tmp / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "have no prediction" in err and ids[-1] in err
    text = preds.read_text().replace("Image Index,", "Image Index,notes,", 1)
    lines = text.splitlines()
    (tmp / "extra.csv").write_text("\n".join([lines[0]] + [lines[1].replace(",", ",x,", 1)]))
    assert (
        main(["evaluate", "--predictions", str(tmp / "extra.csv"), "--labels", str(split), "--out", str(tmp / "o")])
        == 2
    )
    assert "unknown column(s) ['notes']" in capsys.readouterr().err


def test_cli_ensemble_averages_by_image_id(cli_files):
    tmp, _, preds, ids, probs = cli_files
    order = np.random.default_rng(9).permutation(len(ids))
    other = np.clip(probs[order] * 0.5, 0, 1)
    write_predictions(tmp / "b.csv", ids[order], other)
    assert main(["ensemble", str(preds), str(tmp / "b.csv"), "--out", str(tmp / "e.csv")]) == 0
    e = read_predictions(tmp / "e.csv")
    assert list(e.image_ids) == list(ids)
    assert np.allclose(e.probs, (probs + probs * 0.5) / 2, atol=1e-15)
    write_predictions(tmp / "c.csv", ids[1:], probs[1:])
    assert main(["ensemble", str(preds), str(tmp / "c.csv"), "--out", str(tmp / "f.csv")]) == 2
    assert not (tmp / "f.csv").exists()


# ---------------------------------------------------------------------------- golden


@pytest.mark.skipif(not (NIH / "reference").exists(), reason=f"real NIH files not at {NIH}")
def test_golden_chexnet_reproduction(tmp_path):
    """The CheXNet reproduction's published per-disease AUCs, from its own predictions."""
    preds = NIH / "reference" / "chexnet_repro_preds.csv"
    rc = main(
        [
            "evaluate",
            "--predictions",
            str(preds),
            "--labels",
            str(NIH / "Data_Entry_2017_v2020.csv.gz"),
            "--out",
            str(tmp_path),
            "--bootstrap",
            "10",
        ]
    )
    assert rc == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    published = pd.read_csv(NIH / "reference" / "chexnet_repro_aucs.csv")
    assert len(published) == 14
    for name, auc in zip(published["label"], published["auc"]):
        assert m["auc"][name] == pytest.approx(auc, abs=1e-4), name
    assert m["mean_auc"] == pytest.approx(0.8383, abs=5e-5)
    assert m["n_images"] == 22433


@pytest.mark.skipif(not (NIH / "chexnet_split").exists(), reason=f"real NIH files not at {NIH}")
def test_chexnet_test_list_labels_cover_the_reference_predictions():
    """The labelled split is read by name and covers exactly the reference test images;
    its older label revision differs from v2020 in at most 181 rows (NIH README)."""
    preds = read_predictions(NIH / "reference" / "chexnet_repro_preds.csv")
    from cxrjax.eval.labels import align_labels

    split_labels, pids = align_labels(preds.image_ids, read_labels(NIH / "chexnet_split" / "test_list.txt"), "ref")
    v2020, _ = align_labels(preds.image_ids, read_labels(NIH / "Data_Entry_2017_v2020.csv.gz"), "ref")
    differing = int((split_labels != v2020).any(1).sum())
    assert 0 < differing <= 181
    assert pids[0] == int(preds.image_ids[0][:8])
