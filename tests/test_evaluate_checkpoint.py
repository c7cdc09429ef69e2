"""`cxrjax evaluate --checkpoint`: inference over a prepared part, then the same
evaluation as a predictions CSV; AUCs checked against sklearn on the written files."""

import json
import shutil

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from tiny_run import write_run

from cxrjax.cli import main
from cxrjax.data.pipeline import ShardedRecords
from cxrjax.eval.inference import Predictor, predict_part
from cxrjax.eval.model_source import load_trained, locate
from cxrjax.eval.predictions import read_predictions
from cxrjax.findings import FINDINGS
from cxrjax.models import build_model
from cxrjax.workdir import BEST_WEIGHTS, CHECKPOINTS, RUN_CONFIG

SIZE = 32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalckpt")
    assert main(["synth", "--out", str(tmp / "nih"), "--patients", "40", "--image-size", "64"]) == 0
    assert (
        main(
            [
                "prepare",
                "--nih-dir",
                str(tmp / "nih"),
                "--out",
                str(tmp / "prep"),
                "--image-size",
                str(SIZE),
                "--source-size",
                "0",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    model_cfg, variables = write_run(tmp / "run", SIZE, prepared=str(tmp / "prep"))
    return {"tmp": tmp, "prep": tmp / "prep", "run": tmp / "run", "cfg": model_cfg, "variables": variables}


def test_evaluate_checkpoint_writes_predictions_and_sklearn_aucs(prepared, tmp_path):
    out = tmp_path / "ev"
    assert main(["evaluate", "--checkpoint", str(prepared["run"]), "--out", str(out), "--bootstrap", "20"]) == 0
    preds = read_predictions(out / "predictions.csv")
    index = pd.read_csv(prepared["prep"] / "test" / "index.csv")
    assert list(preds.image_ids) == list(index["image_id"])  # every test record, in index order

    # Probabilities: the model applied directly to each record's image (imagenet stats).
    model = build_model(prepared["cfg"])
    records = ShardedRecords(prepared["prep"] / "test")
    gray = np.stack(
        [cv2.imdecode(np.frombuffer(records[k]["png"], np.uint8), cv2.IMREAD_GRAYSCALE) for k in range(len(records))]
    )
    x = np.repeat(gray[..., None].astype(np.float32) / 255, 3, -1)
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(prepared["variables"], jnp.asarray(x))
    np.testing.assert_allclose(preds.probs, jax.nn.sigmoid(logits), atol=2e-6)

    metrics = json.loads((out / "metrics.json").read_text())
    defined = []
    for j, f in enumerate(FINDINGS):
        y = index[f].to_numpy()
        if 0 < y.sum() < len(y):
            want = roc_auc_score(y, preds.probs[:, j])
            assert metrics["auc"][f] == pytest.approx(want, abs=1e-12), f
            defined.append(want)
        else:
            assert metrics["auc"][f] is None
    assert metrics["n_findings_in_mean"] == len(defined) > 0
    assert metrics["mean_auc"] == pytest.approx(np.mean(defined), abs=1e-12)
    assert metrics["thresholds"]["chosen_on"] == "validation"  # the prepared val part, as in training
    assert metrics["inputs"]["tta"] == "1" and metrics["run"]["px"] == SIZE
    assert (out / "report.md").exists() and json.loads((out / "run.json").read_text())["name"] == "run"

    # The same weights outside their run (ImageNet statistics, the records' 32 px) and
    # labels from the NIH metadata file instead of the index give the same AUCs.
    bare = tmp_path / "weights"
    shutil.copytree(prepared["run"] / BEST_WEIGHTS, bare)
    out2 = tmp_path / "ev2"
    # Radiologist-adjudicated labels for half of the test images, in the Google file's format.
    entry = pd.read_csv(prepared["tmp"] / "nih" / "Data_Entry_2017.csv")
    adjudicated = entry[entry["Image Index"].isin(index["image_id"][::2])].assign(
        **{c: "NO" for c in ("Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass")}, **{"Set Id": "test"}
    )
    adjudicated.loc[adjudicated.index[::3], "Airspace opacity"] = "YES"
    adjudicated.to_csv(tmp_path / "adjudicated.csv", index=False)
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(bare),
                "--data",
                str(prepared["prep"]),
                "--labels",
                str(prepared["tmp"] / "nih" / "Data_Entry_2017.csv"),
                "--out",
                str(out2),
                "--labels",
                str(tmp_path / "adjudicated.csv"),
                "--bootstrap",
                "20",
            ]
        )
        == 0
    )
    again = json.loads((out2 / "metrics.json").read_text())
    assert again["auc"] == metrics["auc"] and again["run"] is None
    # Subgroups from the index's sex/age/view equal those from the metadata file; Platt
    # scaling is fit on the prepared val part.
    assert metrics["subgroups"]["available"] and again["subgroups"] == metrics["subgroups"]
    assert metrics["calibration"]["scaling"] is not None
    adj = again["adjudicated"]
    assert (adj["n_scored"], adj["n_left_out"]) == (len(adjudicated), len(index) - len(adjudicated))
    assert adj["sets"]["test"]["adjudicated"]["Airspace opacity"]["auc"] is not None
    assert locate(prepared["run"] / BEST_WEIGHTS) == (prepared["run"] / BEST_WEIGHTS, prepared["run"])


def test_tta_over_a_prepared_part_is_deterministic(prepared):
    predictor = Predictor(load_trained(prepared["run"]), batch_size=16)
    ids, plain, _ = predict_part(predictor, prepared["prep"] / "val", tta=1)
    ids2, tta, _ = predict_part(predictor, prepared["prep"] / "val", tta=3)
    _, again, _ = predict_part(predictor, prepared["prep"] / "val", tta=3)
    assert list(ids) == list(ids2) and tta.shape == plain.shape == (len(ids), len(FINDINGS))
    np.testing.assert_array_equal(tta, again)
    assert np.abs(tta - plain).max() > 1e-5


def test_bad_checkpoint_inputs_are_named(prepared, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    (unfinished / CHECKPOINTS).mkdir(parents=True)
    (unfinished / RUN_CONFIG).write_text((prepared["run"] / RUN_CONFIG).read_text())
    cases = [
        (["--checkpoint", str(unfinished)], "training workdir without best_weights/"),
        (["--checkpoint", str(tmp_path / "missing")], "missing: weights not found"),
        (["--checkpoint", str(prepared["run"]), "--data", str(tmp_path)], "not a finished `cxrjax prepare` output"),
    ]
    for extra, message in cases:
        assert main(["evaluate", *extra, "--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--predictions", str(tmp_path / "p.csv"), "--out", str(tmp_path / "o")])
    assert "--labels is required with --predictions" in capsys.readouterr().err


def test_records_smaller_than_the_model_are_refused_not_upsampled(prepared, tmp_path, capsys):
    """Issue 25.5: a 64 px model on 32 px records was evaluated on upsampled images."""
    write_run(tmp_path / "run64", 2 * SIZE, prepared=str(prepared["prep"]))
    out = tmp_path / "ev"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run64"), "--out", str(out), "--bootstrap", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "records are 32x32 px, smaller than the model's 64x64 input" in err, err
    assert not (out / "metrics.json").exists()
