"""Does the model work equally well for everyone? AUC by sex, view position and age.

Every subgroup and every gap is scored under the same patient resamples (one
`patient_weights` stream for all of them), so the CI of a gap between two groups
accounts for patients who appear in both (a patient's follow-ups can change view or
age bin). A finding with one class only in a group is `None` with a reason; a group's
mean AUC says over how many findings it was taken.

A near-empty group's AUC is noise (two images give 0.000 or 1.000), so gaps and the
headline use a finding's AUC in a group only when the group holds at least
MIN_POSITIVES positives and MIN_NEGATIVES negatives of it. Smaller ones are still
reported, marked `small`, and never enter a gap.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxrjax.auc import roc_auc
from cxrjax.eval.metrics import patient_weights, percentile_ci, weighted_auc
from cxrjax.findings import FINDINGS

AGE_EDGES = (0, 20, 40, 60, 80)
MIN_POSITIVES = 10  # per finding and group, for its AUC to enter a gap
MIN_NEGATIVES = 10
# Bounded memory: about this many image weights per bootstrap chunk.
_CHUNK_ELEMENTS = 4_000_000


def _age_groups(age: pd.Series) -> dict[str, np.ndarray]:
    a = age.to_numpy(np.float64)
    groups = {}
    for lo, hi in zip(AGE_EDGES, (*AGE_EDGES[1:], np.inf)):
        name = f"[{lo},{'inf' if hi == np.inf else int(hi)})"
        groups[name] = (a >= lo) & (a < hi)
    return groups


def group_masks(meta: pd.DataFrame) -> dict[str, dict[str, np.ndarray]]:
    """Attribute -> group name -> boolean mask over the images, from sex, view and age."""
    sex, view = meta["sex"].astype(str).to_numpy(), meta["view"].astype(str).to_numpy()
    return {
        "sex": {"M": sex == "M", "F": sex == "F"},
        "view": {"PA": view == "PA", "AP": view == "AP"},
        "age": _age_groups(meta["age"]),
    }


def _undefined_reason(y: np.ndarray) -> str:
    which = "positives" if y.sum() == 0 else "negatives"
    return f"no {which} among the group's {len(y)} images"


def _point_aucs(labels, probs, masks) -> dict:
    """scikit-learn's AUC per (attribute, group, finding); None where one class only."""
    return {
        (attr, g, j): roc_auc(labels[mask, j], probs[mask, j])
        for attr, groups in masks.items()
        for g, mask in groups.items()
        for j in range(len(FINDINGS))
    }


def _replicates(labels, probs, patient_ids, masks, points, n, seed) -> dict:
    """AUC replicates [n] per (attribute, group, finding) where the point AUC is defined."""
    wanted = {key: np.full(n, np.nan) for key, auc in points.items() if auc is not None}
    chunk = max(1, _CHUNK_ELEMENTS // max(1, len(labels)))
    row = 0
    for w in patient_weights(patient_ids, n, seed, chunk):
        b = len(w)
        for (attr, g, j), out in wanted.items():
            mask = masks[attr][g]
            out[row : row + b] = weighted_auc(labels[mask, j], probs[mask, j], w[:, mask])
        row += b
    return wanted


def _group(labels, patient_ids, mask, points, reps, attr, g) -> dict:
    findings, defined = {}, []
    for j, f in enumerate(FINDINGS):
        y = labels[mask, j]
        auc = points[(attr, g, j)]
        n_pos = int(y.sum())
        findings[f] = {
            "auc": auc,
            "auc_ci": percentile_ci(reps[(attr, g, j)]) if auc is not None else None,
            "n_positive": n_pos,
            "n_negative": int(len(y) - n_pos),
            "small": auc is not None and (n_pos < MIN_POSITIVES or len(y) - n_pos < MIN_NEGATIVES),
            "reason": None if auc is not None else _undefined_reason(y),
        }
        if auc is not None:
            defined.append(j)
    mean_reps = np.mean([reps[(attr, g, j)] for j in defined], axis=0) if defined else None
    return {
        "n_images": int(mask.sum()),
        "n_patients": int(len(np.unique(patient_ids[mask]))),
        "mean_auc": float(np.mean([findings[FINDINGS[j]]["auc"] for j in defined])) if defined else None,
        "mean_auc_ci": percentile_ci(mean_reps) if defined else None,
        "n_findings_in_mean": len(defined),
        # No finding large enough for a gap: shown, marked, never in a gap.
        "small": not any(_sized(findings[f]) for f in FINDINGS),
        "findings": findings,
    }


def _sized(entry: dict) -> bool:
    """A finding's AUC in a group is large enough to enter a gap."""
    return entry["auc"] is not None and not entry["small"]


def _gap(scores: dict[str, float], reps_of) -> dict | None:
    """Highest minus lowest group (by point estimate) with the bootstrap CI of that
    difference; None when fewer than two groups have a value."""
    if len(scores) < 2:
        return None
    high, low = max(scores, key=scores.get), min(scores, key=scores.get)
    return {
        "high": high,
        "low": low,
        "gap": scores[high] - scores[low],
        "ci": percentile_ci(reps_of(high) - reps_of(low)),
    }


def _attribute(labels, patient_ids, groups, points, reps, attr) -> dict:
    out = {"groups": {g: _group(labels, patient_ids, m, points, reps, attr, g) for g, m in groups.items()}}
    assigned = np.any(list(groups.values()), axis=0)
    out["n_unassigned"] = int((~assigned).sum())
    gaps = {}
    for j, f in enumerate(FINDINGS):
        scores = {g: d["findings"][f]["auc"] for g, d in out["groups"].items() if _sized(d["findings"][f])}
        gaps[f] = _gap(scores, lambda g, j=j: reps[(attr, g, j)])
    out["finding_gaps"] = gaps
    # The mean-AUC gap compares like with like: for each pair of groups, over the findings
    # large enough in both; the attribute's gap is the pair that differs most.
    sized = {
        g: [j for j, f in enumerate(FINDINGS) if _sized(d["findings"][f])]
        for g, d in out["groups"].items()
        if not d["small"]
    }
    gap = None
    names = list(sized)
    for a_i, a in enumerate(names):
        for b in names[a_i + 1 :]:
            common = [j for j in sized[a] if j in sized[b]]
            if not common:
                continue
            point = {
                g: float(np.mean([out["groups"][g]["findings"][FINDINGS[j]]["auc"] for j in common])) for g in (a, b)
            }
            high, low = (a, b) if point[a] >= point[b] else (b, a)
            if gap is not None and point[high] - point[low] <= gap["gap"]:
                continue

            def mean_of(g, common=common):
                return np.mean([reps[(attr, g, j)] for j in common], axis=0)

            gap = {
                "high": high,
                "low": low,
                "gap": point[high] - point[low],
                "ci": percentile_ci(mean_of(high) - mean_of(low)),
                "n_findings": len(common),
            }
    out["mean_auc_gap"] = gap
    return out


def subgroup_metrics(labels, probs, patient_ids, meta: pd.DataFrame | None, n_bootstrap: int, seed: int) -> dict:
    """metrics.json's `subgroups`: per attribute, per group AUCs with CIs and the gaps."""
    if meta is None:
        return {
            "available": False,
            "reason": "the labels carry no sex/age/view metadata (a split list or an "
            "index.csv from before they were recorded); pass the Data_Entry file as --labels",
        }
    masks = group_masks(meta)
    points = _point_aucs(labels, probs, masks)
    reps = _replicates(labels, probs, np.asarray(patient_ids), masks, points, n_bootstrap, seed)
    attributes = {a: _attribute(labels, np.asarray(patient_ids), g, points, reps, a) for a, g in masks.items()}
    gaps = [(a, d["mean_auc_gap"]) for a, d in attributes.items() if d["mean_auc_gap"]]
    worst = max(gaps, key=lambda x: x[1]["gap"]) if gaps else None
    return {
        "available": True,
        "age_bins": "[0,20), [20,40), [40,60), [60,80), [80,inf) years",
        "gap": "highest minus lowest group of the attribute (by point estimate); the mean-AUC "
        "gap: the pair of groups that differs most over the findings large enough in both",
        "min_group_size": {"positives": MIN_POSITIVES, "negatives": MIN_NEGATIVES},
        "attributes": attributes,
        "worst_gap": None if worst is None else {"attribute": worst[0], **worst[1]},
    }
