"""Are the scores probabilities? Expected calibration error, Brier score, reliability
bins, and Platt scaling fit on validation predictions.

ECE is hand-written, not `sklearn.calibration.calibration_curve`: that puts a score
on an inner bin edge into the lower bin (bins (a, b]), drops empty bins and returns no
bin counts, while ECE here is defined on bins [a, b) of [0, 1] (a score of exactly 1.0
in the last one) weighted by their share of images. Brier score and the Platt fit
(a logistic regression on the score's logit) come from scikit-learn.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss

from cxrjax.findings import FINDINGS

N_BINS = 15
# A finding whose ECE exceeds this is called uncalibrated in the report: its scores are
# off by more than 5 percentage points on average, so a fixed 0.5 cut means little.
UNCALIBRATED_ECE = 0.05
_LOGIT_CLIP = 1e-7


def bin_index(p: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Equal-width bin of each score: [k/n, (k+1)/n), with 1.0 in the last bin."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)


def reliability_bins(y: np.ndarray, p: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Per bin: image count, mean score and observed positive rate (None when empty)."""
    idx = bin_index(np.asarray(p, np.float64), n_bins)
    count = np.bincount(idx, minlength=n_bins)
    score_sum = np.bincount(idx, weights=p, minlength=n_bins)
    pos_sum = np.bincount(idx, weights=y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_score, rate = score_sum / count, pos_sum / count
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "count": count.astype(int).tolist(),
        "mean_score": [None if c == 0 else float(v) for c, v in zip(count, mean_score)],
        "positive_rate": [None if c == 0 else float(v) for c, v in zip(count, rate)],
    }


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = N_BINS) -> float:
    """sum over bins of (share of images) x |mean score - positive rate|."""
    bins = reliability_bins(y, p, n_bins)
    total = sum(bins["count"])
    return float(
        sum(c / total * abs(s - r) for c, s, r in zip(bins["count"], bins["mean_score"], bins["positive_rate"]) if c)
    )


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _LOGIT_CLIP, 1 - _LOGIT_CLIP)
    return np.log(p / (1 - p))


def fit_platt(y: np.ndarray, p: np.ndarray) -> tuple[float, float] | None:
    """(a, b) of sigmoid(a * logit(p) + b) fit by maximum likelihood, unpenalised; None
    when the validation part has a single class (nothing to fit)."""
    if not 0 < int(np.sum(y)) < len(y):
        return None
    model = LogisticRegression(C=np.inf, max_iter=1000).fit(_logit(p)[:, None], y)
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def apply_platt(p: np.ndarray, ab: tuple[float, float]) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(ab[0] * _logit(p) + ab[1])))


def _scores(y, p) -> dict:
    return {
        "ece": expected_calibration_error(y, p),
        "brier": float(brier_score_loss(y, p)),
        "bins": reliability_bins(y, p),
    }


def calibration(labels: np.ndarray, probs: np.ndarray, val=None) -> dict:
    """Per finding ECE, Brier and reliability bins of the raw scores; with `val` =
    (labels, probs) of the validation part, also of Platt-scaled scores (fit on val,
    applied to these)."""
    out = {
        "n_bins": N_BINS,
        "binning": "equal width on [0, 1], bins [a, b), 1.0 in the last",
        "uncalibrated_above_ece": UNCALIBRATED_ECE,
        "scaling": "Platt (logistic regression on logit(score)), fit on validation" if val is not None else None,
        "findings": {},
    }
    for j, f in enumerate(FINDINGS):
        y, p = labels[:, j], probs[:, j]
        entry = {"raw": _scores(y, p), "platt": None, "platt_params": None}
        if val is not None:
            ab = fit_platt(val[0][:, j], val[1][:, j])
            if ab is not None:
                entry["platt_params"] = {"a": ab[0], "b": ab[1]}
                entry["platt"] = _scores(y, apply_platt(p, ab))
        out["findings"][f] = entry
    raw = [out["findings"][f]["raw"] for f in FINDINGS]
    out["mean_ece"] = float(np.mean([r["ece"] for r in raw]))
    out["mean_brier"] = float(np.mean([r["brier"] for r in raw]))
    out["uncalibrated"] = [f for f, r in zip(FINDINGS, raw) if r["ece"] > UNCALIBRATED_ECE]
    return out
