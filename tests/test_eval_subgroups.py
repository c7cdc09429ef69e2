"""Subgroup AUCs equal scikit-learn's on the filtered rows; one-class groups are n/a with
a reason; gaps and their CIs; labels without metadata say so."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxrjax.eval.evaluate import evaluate_predictions
from cxrjax.eval.report import _subgroup_section, write_report
from cxrjax.eval.subgroups import subgroup_metrics
from cxrjax.findings import FINDINGS

HERNIA = FINDINGS.index("Hernia")
NIH = Path(os.environ.get("CXRJAX_NIH_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "nih"))


def _table(seed=0, patients=120):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(1, patients + 1):
        sex, age = "MF"[p % 2], int(rng.integers(5, 95))
        for k in range(int(rng.integers(1, 4))):
            rows.append(
                {
                    "image_id": f"{p:08d}_{k:03d}.png",
                    "patient_id": p,
                    "sex": sex,
                    "age": age + k,
                    "view": ("PA", "AP")[int(rng.random() < 0.4)],
                }
            )
    meta = pd.DataFrame(rows)
    labels = (rng.random((len(meta), len(FINDINGS))) < 0.3).astype(np.int8)
    labels[:, HERNIA] = 0
    labels[meta["sex"].to_numpy() == "F", HERNIA] = rng.random(int((meta["sex"] == "F").sum())) < 0.3
    # Women's scores carry more signal than men's: a real gap to find.
    signal = np.where(meta["sex"].to_numpy()[:, None] == "F", 2.0, 0.5)
    probs = 1 / (1 + np.exp(-(rng.normal(size=labels.shape) + signal * labels - 1)))
    return meta, labels, probs


def test_subgroup_aucs_equal_sklearn_on_the_filtered_rows():
    meta, labels, probs = _table()
    sub = subgroup_metrics(labels, probs, meta["patient_id"].to_numpy(), meta, 200, 0)
    assert sub["available"]
    masks = {"F": meta["sex"] == "F", "PA": meta["view"] == "PA", "[60,80)": (meta["age"] >= 60) & (meta["age"] < 80)}
    for attr, group in (("sex", "F"), ("view", "PA"), ("age", "[60,80)")):
        g = sub["attributes"][attr]["groups"][group]
        m = masks[group].to_numpy()
        assert g["n_images"] == m.sum()
        assert g["n_patients"] == meta["patient_id"][m].nunique()
        for j, f in enumerate(FINDINGS):
            if labels[m, j].min() == labels[m, j].max():
                continue
            assert g["findings"][f]["auc"] == pytest.approx(roc_auc_score(labels[m, j], probs[m, j]), abs=1e-12)
            assert g["findings"][f]["n_positive"] == labels[m, j].sum()
    # Men have no Hernia positives: n/a with the reason, and the mean says 13 findings.
    men = sub["attributes"]["sex"]["groups"]["M"]
    assert men["findings"]["Hernia"]["auc"] is None and men["findings"]["Hernia"]["auc_ci"] is None
    assert men["findings"]["Hernia"]["reason"].startswith("no positives among the group's")
    assert men["n_findings_in_mean"] == 13
    assert sub["attributes"]["sex"]["finding_gaps"]["Hernia"] is None


def test_gap_is_the_difference_of_groups_with_a_ci_that_excludes_zero_for_a_real_gap():
    meta, labels, probs = _table()
    sub = subgroup_metrics(labels, probs, meta["patient_id"].to_numpy(), meta, 300, 1)
    sex = sub["attributes"]["sex"]
    gap = sex["mean_auc_gap"]
    assert (gap["high"], gap["low"], gap["n_findings"]) == ("F", "M", 13)  # Hernia: only F has positives
    f_aucs = [sex["groups"]["F"]["findings"][f]["auc"] for f in FINDINGS if f != "Hernia"]
    m_aucs = [sex["groups"]["M"]["findings"][f]["auc"] for f in FINDINGS if f != "Hernia"]
    assert gap["gap"] == pytest.approx(np.mean(f_aucs) - np.mean(m_aucs), abs=1e-12)
    assert 0 < gap["ci"][0] < gap["gap"] < gap["ci"][1]
    effusion = sex["finding_gaps"]["Effusion"]
    groups = sex["groups"]
    assert effusion["gap"] == pytest.approx(
        groups["F"]["findings"]["Effusion"]["auc"] - groups["M"]["findings"]["Effusion"]["auc"]
    )
    assert sub["worst_gap"]["attribute"] in ("sex", "view", "age")
    assert sub["worst_gap"]["gap"] == max(d["mean_auc_gap"]["gap"] for d in sub["attributes"].values())
    # An empty age bin is n/a, not an error.
    assert sub["attributes"]["age"]["groups"]["[0,20)"]["n_images"] >= 0


def test_evaluate_writes_subgroups_from_label_metadata_and_explains_without(tmp_path):
    meta, labels, probs = _table(patients=60)
    table = meta.assign(**{f: labels[:, j] for j, f in enumerate(FINDINGS)})
    m = evaluate_predictions(meta["image_id"], probs, table, out_dir=tmp_path / "a", n_bootstrap=20)
    assert m["subgroups"]["available"] and "subgroups.png" in m["figures"]
    report = (tmp_path / "a" / "report.md").read_text()
    assert "## Subgroups" in report and "### sex" in report and "Hernia, M: no positives" in report
    assert report.index("Operating point: Youden") < report.index("Operating point: threshold 0.5")
    # Labels without metadata (a split list, an old index.csv): said, not skipped silently.
    m["subgroups"] = subgroup_metrics(labels, probs, meta["patient_id"], None, 20, 0)
    assert not m["subgroups"]["available"] and "no sex/age/view" in m["subgroups"]["reason"]
    write_report(tmp_path / "b.md", m, {})
    assert "Not computed: the labels carry no sex/age/view" in (tmp_path / "b.md").read_text()


@pytest.mark.skipif(not (NIH / "reference").exists(), reason=f"real NIH files not at {NIH}")
def test_real_chexnet_reproduction_subgroups_and_calibration():
    """The reproduction's 22,433 predictions with the v2020 labels: group sizes, AUCs equal
    to sklearn on the filtered rows, and ECE equal to a pandas binning of the same rows."""
    from cxrjax.eval.calibration import calibration
    from cxrjax.eval.labels import align_labels, align_metadata, read_labels
    from cxrjax.eval.predictions import read_predictions

    preds = read_predictions(NIH / "reference" / "chexnet_repro_preds.csv")
    table = read_labels(NIH / "Data_Entry_2017_v2020.csv.gz")
    labels, pids = align_labels(preds.image_ids, table, "ref")
    meta = align_metadata(preds.image_ids, table)
    sub = subgroup_metrics(labels, preds.probs, pids, meta, 10, 0)
    sex = sub["attributes"]["sex"]["groups"]
    assert (sex["M"]["n_images"], sex["F"]["n_images"]) == (12631, 9802)
    assert sub["attributes"]["view"]["n_unassigned"] == 0
    ap = (meta["view"] == "AP").to_numpy()
    j = FINDINGS.index("Cardiomegaly")
    got = sub["attributes"]["view"]["groups"]["AP"]["findings"]["Cardiomegaly"]["auc"]
    assert got == pytest.approx(roc_auc_score(labels[ap, j], preds.probs[ap, j]), abs=1e-12)
    old = sub["attributes"]["age"]["groups"]["[80,inf)"]
    assert old["findings"]["Pneumonia"]["auc"] is None and old["n_findings_in_mean"] == 12
    # 75 images: the gap is highest minus lowest over the findings both groups have enough
    # of, never negative (the groups were once ranked on other findings than the gap's).
    few = subgroup_metrics(labels[:75], preds.probs[:75], pids[:75], meta.iloc[:75].reset_index(drop=True), 10, 0)
    gaps = [d["mean_auc_gap"] for d in few["attributes"].values() if d["mean_auc_gap"]]
    assert gaps and all(g["gap"] >= 0 for g in gaps)

    cal = calibration(labels, preds.probs)
    j = FINDINGS.index("Atelectasis")
    frame = pd.DataFrame({"p": preds.probs[:, j], "y": labels[:, j]})
    frame["bin"] = pd.cut(frame["p"], np.linspace(0, 1, 16), right=False, labels=False).fillna(14)
    per_bin = frame.groupby("bin").agg(n=("p", "size"), p=("p", "mean"), y=("y", "mean"))
    want = float((per_bin["n"] / len(frame) * (per_bin["p"] - per_bin["y"]).abs()).sum())
    assert cal["findings"]["Atelectasis"]["raw"]["ece"] == pytest.approx(want, abs=1e-12)
    assert cal["uncalibrated"] == []  # plain BCE at the natural prevalence: close to calibrated


def test_subgroup_chart_draws_a_ci_that_misses_its_point(tmp_path):
    """A small group's percentile CI can lie wholly above its point estimate (seen on a
    25-image test part); the figure must still be drawn."""
    from cxrjax.eval.plots import subgroup_chart

    meta, labels, probs = _table(patients=40)
    sub = subgroup_metrics(labels, probs, meta["patient_id"].to_numpy(), meta, 20, 0)
    men = sub["attributes"]["sex"]["groups"]["M"]
    men["mean_auc_ci"] = [men["mean_auc"] + 0.01, men["mean_auc"] + 0.05]
    assert subgroup_chart(sub, tmp_path / "s.png", "t").read_bytes()[:4] == b"\x89PNG"


def test_near_empty_groups_are_shown_marked_and_never_the_headline():
    """Issue 21: a [80,inf) group of 2 images (AUC 0.000 or 1.000) led the report."""
    meta, labels, probs = _table(seed=3)
    meta["age"] = meta["age"].clip(upper=79)
    old = meta.index[:2]  # two images aged 85: one positive and one negative of every finding
    meta.loc[old, "age"] = 85
    labels[old[0]], labels[old[1]] = 1, 0
    probs[old[0]], probs[old[1]] = 0.01, 0.99  # AUC 0.000 in that group
    sub = subgroup_metrics(labels, probs, meta["patient_id"].to_numpy(), meta, 50, 0)
    assert sub["min_group_size"] == {"positives": 10, "negatives": 10}
    age = sub["attributes"]["age"]
    tiny = age["groups"]["[80,inf)"]
    assert tiny["n_images"] == 2 and tiny["small"] and tiny["mean_auc"] == 0.0  # shown
    assert tiny["findings"]["Mass"]["small"] and tiny["findings"]["Mass"]["auc"] == 0.0
    assert age["mean_auc_gap"] is None or "[80,inf)" not in (age["mean_auc_gap"]["high"], age["mean_auc_gap"]["low"])
    assert all(g is None or "[80,inf)" not in (g["high"], g["low"]) for g in age["finding_gaps"].values())
    worst = sub["worst_gap"]
    assert worst is not None and "[80,inf)" not in (worst["high"], worst["low"])
    assert worst["gap"] < 0.5  # the 0.000 group would have given a gap near 0.6
    text = "\n".join(_subgroup_section(sub))
    assert "| [80,inf) (small) | 2 |" in text and "0.000* (1)" in text
    assert "at least 10 positives and 10 negatives" in text


def test_a_smoke_sized_test_set_has_no_subgroup_headline():
    meta, labels, probs = _table(seed=1, patients=4)
    sub = subgroup_metrics(labels, probs, meta["patient_id"].to_numpy(), meta, 20, 0)
    assert sub["worst_gap"] is None
    assert all(d["mean_auc_gap"] is None for d in sub["attributes"].values())
    assert all(g["small"] for d in sub["attributes"].values() for g in d["groups"].values())
