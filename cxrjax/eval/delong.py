"""DeLong's test for two correlated ROC AUCs measured on the same images.

Hand-written because neither scikit-learn nor scipy has it. This is the fast
midrank form of Sun & Xu (2014, IEEE SPL 21:1389), O(N log N), which gives exactly
the structural components of DeLong, DeLong & Clarke-Pearson (1988). Like the original
it treats images as independent; repeat images of one patient make its p-values
somewhat optimistic (the patient bootstrap CIs in metrics.json do not have that issue).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm, rankdata


def _components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs [k] and the DeLong structural components V10 [k, m] and V01 [k, n]."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    tx = rankdata(pos, axis=1)
    ty = rankdata(neg, axis=1)
    tz = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    aucs = (tz[:, :m].sum(1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n  # per positive: share of negatives it outranks
    v01 = 1.0 - (tz[:, m:] - ty) / m  # per negative: share of positives outranking it
    return aucs, v10, v01


def delong_covariance(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs [k] and their DeLong covariance [k, k] for k score vectors `scores` [k, N]."""
    y = np.asarray(y).astype(int)
    scores = np.atleast_2d(np.asarray(scores, np.float64))
    m, n = int(y.sum()), int((1 - y).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least 2 positives and 2 negatives, got {m} and {n}")
    aucs, v10, v01 = _components(y, scores)
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong_test(y: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> dict:
    """Two-sided test of AUC(a) == AUC(b) on the same labelled images."""
    aucs, cov = delong_covariance(y, np.stack([scores_a, scores_b]))
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = float(aucs[0] - aucs[1])
    if var <= 0 and diff == 0:  # identical rankings: no evidence of a difference
        z, p = 0.0, 1.0
    elif var <= 0:  # a difference with zero estimated variance: the test is undefined
        z, p = None, None
    else:
        z = diff / np.sqrt(var)
        p = float(2 * norm.sf(abs(z)))
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "difference": diff,
        "se": float(np.sqrt(max(var, 0.0))),
        "z": None if z is None else float(z),
        "p_value": p,
    }
