"""Metrics against scikit-learn, brute force and hand-computed values."""

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import (
    f1_score,
    hamming_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from cxrjax.auc import roc_auc
from cxrjax.eval.delong import delong_covariance, delong_test
from cxrjax.eval.metrics import (
    bootstrap_aucs,
    multilabel_summary,
    operating_point,
    patient_weights,
    percentile_ci,
    pooled_rates,
    threshold_for_sensitivity,
    weighted_auc,
    youden_threshold,
)
from cxrjax.findings import FINDINGS


def _scores(rng, n, separation=1.0, ties=True):
    y = (rng.random(n) < 0.3).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(size=n) + separation * y - 1)))
    return y, (np.round(p, 2) if ties else p)


def test_weighted_auc_equals_sklearn_with_sample_weights_and_with_replication():
    rng = np.random.default_rng(0)
    y, p = _scores(rng, 400)  # rounding makes many ties
    w = rng.integers(0, 4, size=(5, 400)).astype(float)
    got = weighted_auc(y, p, w)
    for row, value in zip(w, got):
        assert value == pytest.approx(roc_auc_score(y, p, sample_weight=row), abs=1e-12)
        rep = row.astype(int)
        assert value == pytest.approx(roc_auc_score(np.repeat(y, rep), np.repeat(p, rep)), abs=1e-12)


def test_weighted_auc_is_nan_when_a_class_has_no_weight():
    y = np.array([1, 1, 0, 0])
    p = np.array([0.9, 0.2, 0.4, 0.1])
    got = weighted_auc(y, p, np.array([[1, 1, 0, 0], [1, 0, 1, 1]], float))
    assert np.isnan(got[0])
    assert got[1] == 1.0


def test_patient_weights_move_all_images_of_a_patient_together():
    patients = np.array([7, 7, 7, 3, 3, 9, 11, 11])
    for w in patient_weights(patients, n=50, seed=1, chunk=16):
        for pid in np.unique(patients):
            cols = w[:, patients == pid]
            assert (cols == cols[:, :1]).all()
        per_patient = [w[:, np.flatnonzero(patients == pid)[0]] for pid in np.unique(patients)]
        assert np.allclose(np.sum(per_patient, axis=0), 4)  # 4 patients drawn per resample


def test_bootstrap_replicates_are_sklearn_aucs_of_patient_resamples():
    rng = np.random.default_rng(2)
    n = 300
    patients = np.sort(rng.integers(0, 90, n))
    labels = (rng.random((n, 14)) < 0.25).astype(np.int8)
    probs = np.clip(labels * 0.3 + rng.random((n, 14)) * 0.7, 0, 1)
    reps = bootstrap_aucs(labels, probs, patients, n=7, seed=5)
    weights = np.concatenate(list(patient_weights(patients, 7, 5, chunk=7)))
    for b in range(7):
        keep = weights[b] > 0
        expect = [roc_auc_score(labels[keep, j], probs[keep, j], sample_weight=weights[b, keep]) for j in range(14)]
        assert reps["per_finding"][b] == pytest.approx(expect, abs=1e-12)
        assert reps["macro"][b] == pytest.approx(np.mean(expect), abs=1e-12)
        micro = roc_auc_score(labels.ravel(), probs.ravel(), sample_weight=np.repeat(weights[b], 14))
        assert reps["micro"][b] == pytest.approx(micro, abs=1e-12)


def test_bootstrap_skips_findings_without_both_classes():
    rng = np.random.default_rng(3)
    labels = (rng.random((120, 14)) < 0.3).astype(np.int8)
    labels[:, FINDINGS.index("Hernia")] = 0
    probs = rng.random((120, 14))
    reps = bootstrap_aucs(labels, probs, np.arange(120) // 2, n=20, seed=0)
    assert np.isnan(reps["per_finding"][:, 13]).all()
    assert np.isfinite(reps["macro"]).all()  # the mean is over the 13 defined findings


def test_percentile_ci_drops_undefined_replicates():
    assert percentile_ci(np.array([np.nan, np.nan])) is None
    lo, hi = percentile_ci(np.r_[np.linspace(0, 1, 1001), np.nan])
    assert (lo, hi) == pytest.approx((0.025, 0.975))


def test_roc_auc_is_none_not_a_number_for_one_class():
    assert roc_auc(np.zeros(5, int), np.linspace(0, 1, 5)) is None
    assert roc_auc(np.ones(5, int), np.linspace(0, 1, 5)) is None


def _rates(y, p, t):
    pred = p >= t
    sens = (pred & (y == 1)).sum() / (y == 1).sum()
    spec = (~pred & (y == 0)).sum() / (y == 0).sum()
    return sens, spec


def test_youden_threshold_maximises_j_by_brute_force():
    rng = np.random.default_rng(4)
    for _ in range(5):
        y, p = _scores(rng, 200)
        t = youden_threshold(y, p)
        best = max(sum(_rates(y, p, c)) - 1 for c in np.unique(p))
        assert sum(_rates(y, p, t)) - 1 == pytest.approx(best, abs=1e-12)
    assert youden_threshold(np.zeros(4, int), np.arange(4.0)) is None


@pytest.mark.parametrize("target", [0.5, 0.9, 1.0])
def test_threshold_for_sensitivity_is_highest_reaching_target(target):
    rng = np.random.default_rng(5)
    y, p = _scores(rng, 300)
    t = threshold_for_sensitivity(y, p, target)
    reaching = [c for c in np.unique(p) if _rates(y, p, c)[0] >= target]
    assert t == max(reaching)


def test_operating_point_matches_sklearn():
    rng = np.random.default_rng(6)
    y, p = _scores(rng, 250, ties=False)
    pt = operating_point(y, p, 0.4)
    pred = (p >= 0.4).astype(int)
    assert pt["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert pt["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert pt["ppv"] == pytest.approx(precision_score(y, pred))
    assert pt["npv"] == pytest.approx(precision_score(y, pred, pos_label=0))
    assert pt["f1"] == pytest.approx(f1_score(y, pred))
    assert pt["tp"] + pt["fp"] + pt["tn"] + pt["fn"] == 250


def test_operating_point_undefined_ratios_are_none():
    pt = operating_point(np.array([0, 0, 1]), np.array([0.1, 0.2, 0.3]), 0.9)
    assert pt["ppv"] is None  # nothing predicted positive
    assert pt["sensitivity"] == 0.0 and pt["f1"] == 0.0
    pt = operating_point(np.array([0, 0, 0]), np.array([0.1, 0.2, 0.3]), 0.9)
    assert pt["sensitivity"] is None and pt["f1"] is None


def test_pooled_rates_macro_and_micro_by_hand():
    a = {
        "tp": 8,
        "fp": 2,
        "tn": 85,
        "fn": 5,
        "sensitivity": 8 / 13,
        "specificity": 85 / 87,
        "ppv": 0.8,
        "npv": 85 / 90,
        "f1": 16 / 23,
    }
    b = {
        "tp": 0,
        "fp": 0,
        "tn": 99,
        "fn": 1,
        "sensitivity": 0.0,
        "specificity": 1.0,
        "ppv": None,
        "npv": 0.99,
        "f1": 0.0,
    }
    r = pooled_rates([a, b])
    assert r["macro"]["ppv"] == 0.8  # undefined entries are left out, not counted as 0
    assert r["macro"]["sensitivity"] == pytest.approx((8 / 13) / 2)
    assert r["micro"]["sensitivity"] == pytest.approx(8 / 14)
    assert r["micro"]["ppv"] == pytest.approx(8 / 10)
    assert r["micro"]["f1"] == pytest.approx(16 / (16 + 2 + 6))


def test_multilabel_summary_hamming_and_report_match_sklearn():
    rng = np.random.default_rng(7)
    labels = (rng.random((80, 14)) < 0.3).astype(np.int8)
    probs = rng.random((80, 14))
    thresholds = [0.5] * 13 + [None]
    s = multilabel_summary(labels, probs, thresholds)
    pred = (probs[:, :13] >= 0.5).astype(int)
    assert s["findings"] == list(FINDINGS[:13])
    assert s["hamming_loss"] == pytest.approx(hamming_loss(labels[:, :13], pred))
    assert s["report"]["Mass"]["recall"] == pytest.approx(recall_score(labels[:, 4], pred[:, 4]))


# ------------------------------------------------------------------------------ DeLong


def test_delong_hand_computed_example():
    # By hand: V10_a = [1, 1, .5], V01_a = [2/3, 1]; V10_b = [1, .5, .5], V01_b = [1/3, 1].
    # S10 = [[1/12, 1/24], [1/24, 1/12]], S01 = [[1/18, 1/9], [1/9, 2/9]] (sample covs);
    # cov = S10/3 + S01/2; var(diff) = 1/18 + 5/36 - 2 * 5/72 = 1/18; z = (1/6)/sqrt(1/18).
    y = np.array([1, 1, 1, 0, 0])
    a = np.array([0.9, 0.6, 0.4, 0.5, 0.2])
    b = np.array([0.8, 0.3, 0.55, 0.6, 0.1])
    aucs, cov = delong_covariance(y, np.stack([a, b]))
    assert aucs == pytest.approx([5 / 6, 2 / 3])
    assert cov == pytest.approx(np.array([[1 / 18, 5 / 72], [5 / 72, 5 / 36]]))
    r = delong_test(y, a, b)
    assert r["z"] == pytest.approx(1 / np.sqrt(2))
    assert r["p_value"] == pytest.approx(2 * norm.sf(1 / np.sqrt(2)))


def _delong_by_definition(y, a, b):
    """O(m n) DeLong 1988 from the pairwise kernel psi, for checking the fast form."""

    def comps(s):
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        return psi.mean(1), psi.mean(0)

    (va10, va01), (vb10, vb01) = comps(a), comps(b)
    m, n = len(va10), len(va01)
    s10 = np.cov(np.stack([va10, vb10]))
    s01 = np.cov(np.stack([va01, vb01]))
    return s10 / m + s01 / n


def test_delong_fast_form_matches_definition_with_ties():
    rng = np.random.default_rng(8)
    y, a = _scores(rng, 150)
    b = np.round(np.clip(a + rng.normal(0, 0.1, 150), 0, 1), 2)
    _, cov = delong_covariance(y, np.stack([a, b]))
    assert cov == pytest.approx(_delong_by_definition(y, a, b), rel=1e-10)


def test_delong_standard_error_agrees_with_paired_bootstrap():
    rng = np.random.default_rng(9)
    n = 400
    y = (rng.random(n) < 0.35).astype(int)
    shared = rng.normal(size=n)
    a = shared + 1.0 * y + rng.normal(0, 0.6, n)
    b = shared + 0.4 * y + rng.normal(0, 0.6, n)
    r = delong_test(y, a, b)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    diffs = []
    for _ in range(1000):  # stratified: DeLong's variance holds class sizes fixed
        idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        diffs.append(roc_auc_score(y[idx], a[idx]) - roc_auc_score(y[idx], b[idx]))
    assert r["auc_a"] == pytest.approx(roc_auc_score(y, a))
    assert r["se"] == pytest.approx(np.std(diffs, ddof=1), rel=0.12)
    assert r["p_value"] < 0.05  # a is better by construction


def test_delong_identical_scores_give_no_difference():
    rng = np.random.default_rng(10)
    y, a = _scores(rng, 60)
    r = delong_test(y, a, a.copy())
    assert r["difference"] == 0 and r["p_value"] == 1.0


def test_delong_needs_two_of_each_class():
    with pytest.raises(ValueError, match="at least 2 positives"):
        delong_test(np.array([1, 0, 0]), np.array([0.5, 0.2, 0.1]), np.array([0.4, 0.3, 0.2]))


def test_delong_difference_with_zero_variance_is_undefined_not_significant():
    y = np.array([1, 1, 0, 0])
    r = delong_test(y, np.array([0.9, 0.8, 0.2, 0.1]), np.full(4, 0.5))
    assert r["difference"] == 0.5 and r["z"] is None and r["p_value"] is None
