"""Per-finding and overall classification metrics, with patient-level bootstrap CIs.

Point estimates come from scikit-learn. Only the bootstrap AUC is hand-written (see
`weighted_auc`): it is sklearn's ROC AUC with integer sample weights, computed for a
whole batch of resamples at once from one sort, because calling `roc_auc_score` 1,000 x
15 times on 22k-image test sets takes minutes. Undefined values (a finding with no
positives, a ratio with a zero denominator) are `None`, never a number.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    classification_report,
    confusion_matrix,
    f1_score,
    hamming_loss,
    roc_curve,
)

from cxrjax.auc import defined, roc_auc
from cxrjax.findings import FINDINGS

CONFIDENCE = 0.95
# Bootstrap chunks hold about this many weights at once (bounded memory on 22k x 14).
_CHUNK_ELEMENTS = 4_000_000


def micro_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    return roc_auc(labels.ravel(), probs.ravel())


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


# ---------------------------------------------------------------------------- bootstrap


class _SortedScores:
    """One sort of (score, label) reused by every resample; ties grouped for midranks."""

    def __init__(self, y: np.ndarray, p: np.ndarray):
        self.order = np.argsort(p, kind="stable")
        s = p[self.order]
        self.y = y[self.order].astype(np.float64)
        self.starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])

    def auc(self, weights: np.ndarray) -> np.ndarray:
        """Weighted ROC AUC for each row of `weights` [B, N] (NaN where a class is empty).

        AUC = P(score_pos > score_neg) + P(tie) / 2 over weighted pairs, exactly what
        sklearn's trapezoidal ROC AUC gives with `sample_weight` (tested against it).
        """
        w = weights[:, self.order]
        pos = np.add.reduceat(w * self.y, self.starts, axis=1)
        neg = np.add.reduceat(w * (1.0 - self.y), self.starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg
        num = np.sum(pos * (below + 0.5 * neg), axis=1)
        den = pos.sum(1) * neg.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / den, np.nan)


def weighted_auc(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of `p` against 0/1 `y` under each row of sample weights [B, N]."""
    return _SortedScores(np.asarray(y), np.asarray(p, np.float64)).auc(np.atleast_2d(weights))


def patient_weights(patient_ids: np.ndarray, n: int, seed: int, chunk: int):
    """Yield [b, N] image weights: how often each image's patient was drawn when
    resampling patients with replacement (images of one patient move together)."""
    patients, inverse = np.unique(patient_ids, return_inverse=True)
    rng = np.random.default_rng(seed)
    uniform = np.full(len(patients), 1.0 / len(patients))
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        counts = rng.multinomial(len(patients), uniform, size=b).astype(np.float64)
        yield counts[:, inverse]


def bootstrap_aucs(
    labels: np.ndarray, probs: np.ndarray, patient_ids: np.ndarray, n: int, seed: int
) -> dict[str, np.ndarray]:
    """AUC replicates from `n` patient resamples: per finding [n, 14], macro [n], micro [n].

    Macro is the mean over the findings whose AUC is defined on the full set; a
    replicate where one of those has a single class gives NaN and is dropped from the CI.
    """
    count, k = labels.shape
    sorted_cols = [_SortedScores(labels[:, j], probs[:, j]) for j in range(k)]
    sorted_micro = _SortedScores(labels.ravel(), probs.ravel())
    ok = np.array([defined(labels[:, j]) for j in range(k)])
    per = np.full((n, k), np.nan)
    micro = np.full(n, np.nan)
    chunk = max(1, _CHUNK_ELEMENTS // (count * k))
    row = 0
    for w in patient_weights(patient_ids, n, seed, chunk):
        b = len(w)
        for j in np.flatnonzero(ok):
            per[row : row + b, j] = sorted_cols[j].auc(w)
        micro[row : row + b] = sorted_micro.auc(np.repeat(w, k, axis=1))
        row += b
    macro = per[:, ok].mean(1) if ok.any() else np.full(n, np.nan)
    return {"per_finding": per, "macro": macro, "micro": micro}


def percentile_ci(replicates: np.ndarray) -> list[float] | None:
    valid = replicates[np.isfinite(replicates)]
    if len(valid) == 0:
        return None
    alpha = (1 - CONFIDENCE) / 2 * 100
    lo, hi = np.percentile(valid, [alpha, 100 - alpha])
    return [float(lo), float(hi)]


# ----------------------------------------------------------------------- thresholds


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float | None:
    """The score maximising sensitivity + specificity - 1 (highest such score on ties)."""
    if not defined(y):
        return None
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    # Index 0 is sklearn's artificial `inf` threshold (nothing positive): skip it.
    i = 1 + int(np.argmax((tpr - fpr)[1:]))
    return float(thr[i])


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float) -> float | None:
    """The highest score whose `p >= score` rule reaches sensitivity `target` on (y, p)."""
    if not defined(y):
        return None
    _, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    i = int(np.argmax(tpr >= target - 1e-12))
    return float(thr[max(i, 1)])


def operating_point(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """Counts and rates of the rule `p >= threshold`."""
    pred = (p >= threshold).astype(np.int8)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    f1 = f1_score(y, pred, zero_division=np.nan)
    return {
        "threshold": float(threshold),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": None if np.isnan(f1) else float(f1),
    }


def pooled_rates(points: list[dict]) -> dict:
    """Macro (mean of defined per-finding rates) and micro (pooled counts) summaries."""
    rates = ("sensitivity", "specificity", "ppv", "npv", "f1")
    macro = {}
    for r in rates:
        values = [pt[r] for pt in points if pt[r] is not None]
        macro[r] = float(np.mean(values)) if values else None
    tp, fp, tn, fn = (sum(pt[c] for pt in points) for c in ("tp", "fp", "tn", "fn"))
    micro = {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }
    return {"macro": macro, "micro": micro}


def multilabel_summary(labels: np.ndarray, probs: np.ndarray, thresholds: list) -> dict:
    """Hamming loss and sklearn's classification report for per-finding thresholds;
    findings without a threshold (None) are left out and listed."""
    keep = [j for j, t in enumerate(thresholds) if t is not None]
    if not keep:
        return {"findings": [], "hamming_loss": None, "report": None, "report_text": ""}
    t = np.array([thresholds[j] for j in keep])
    y = labels[:, keep]
    pred = (probs[:, keep] >= t).astype(np.int8)
    names = [FINDINGS[j] for j in keep]
    kwargs = dict(target_names=names, labels=list(range(len(keep))), zero_division=np.nan)
    report = classification_report(y, pred, output_dict=True, **kwargs)
    return {
        "findings": names,
        "hamming_loss": float(hamming_loss(y, pred)),
        "report": _json_safe(report),
        "report_text": classification_report(y, pred, digits=3, **kwargs),
    }


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float | np.floating):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
