"""Calibration: ECE and Brier against hand-computed values, Platt scaling fit on val."""

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss

from cxrjax.eval.calibration import (
    apply_platt,
    bin_index,
    calibration,
    expected_calibration_error,
    fit_platt,
    reliability_bins,
)
from cxrjax.findings import FINDINGS

# Ten rows worked by hand. Bins of width 1/15: 0.00-0.04 -> bin 0, 0.50-0.52 -> bin 7,
# 0.90 -> bin 13, 0.95 and 1.00 -> bin 14 (1.0 falls in the last bin).
P = np.array([0.00, 0.02, 0.04, 0.50, 0.50, 0.52, 0.90, 0.90, 1.00, 0.95])
Y = np.array([0, 0, 1, 0, 1, 1, 1, 0, 1, 1])
# bin 0: 3 images, mean score 0.02, 1/3 positive -> 0.3 * |0.02 - 1/3| = 0.094
# bin 7: 3 images, mean 0.50667, 2/3 positive  -> 0.3 * 0.16 = 0.048
# bin 13: 2 images, mean 0.90, 1/2 positive    -> 0.2 * 0.40 = 0.080
# bin 14: 2 images, mean 0.975, all positive   -> 0.2 * 0.025 = 0.005
HAND_ECE = 0.094 + 0.048 + 0.080 + 0.005
# (p - y)^2 summed: 0 + .0004 + .9216 + .25 + .25 + .2304 + .01 + .81 + 0 + .0025
HAND_BRIER = 2.4749 / 10


def test_ece_and_brier_match_hand_computed_values():
    assert expected_calibration_error(Y, P) == pytest.approx(HAND_ECE, abs=1e-12)
    assert brier_score_loss(Y, P) == pytest.approx(HAND_BRIER, abs=1e-12)
    bins = reliability_bins(Y, P)
    assert bins["count"] == [3, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 2, 2]
    assert bins["mean_score"][1] is None and bins["positive_rate"][14] == 1.0


def test_bins_are_closed_below_and_one_is_in_the_last():
    assert bin_index(np.array([0.0, 1 / 15, 1 / 15 - 1e-12, 0.999999, 1.0])).tolist() == [0, 1, 0, 14, 14]


def test_platt_fit_on_val_recovers_the_distortion_and_improves_test():
    rng = np.random.default_rng(0)

    def part(n):
        logit = rng.normal(0, 1.5, n)
        y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
        # Overconfident, shifted scores: sigmoid(2 * logit + 1).
        return y, 1 / (1 + np.exp(-(2 * logit + 1)))

    (yv, pv), (yt, pt) = part(20000), part(5000)
    a, b = fit_platt(yv, pv)
    assert a == pytest.approx(0.5, abs=0.03) and b == pytest.approx(-0.5, abs=0.05)
    assert expected_calibration_error(yt, apply_platt(pt, (a, b))) < 0.02 < expected_calibration_error(yt, pt)
    assert fit_platt(np.zeros(5), np.linspace(0, 1, 5)) is None  # a single class: nothing to fit


def test_calibration_flags_uncalibrated_findings():
    k = len(FINDINGS)
    labels = np.tile(Y[:, None], (1, k))
    probs = np.tile(P[:, None], (1, k))
    probs[:, 0] = Y * 0.98 + 0.01  # near perfect: ECE 0.01
    cal = calibration(labels, probs)
    assert cal["findings"][FINDINGS[0]]["raw"]["ece"] == pytest.approx(0.01)
    assert cal["uncalibrated"] == list(FINDINGS[1:])
    assert cal["scaling"] is None and cal["findings"][FINDINGS[1]]["platt"] is None
