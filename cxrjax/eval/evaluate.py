"""Evaluate per-image probabilities against labels: metrics.json, report.md, figures.

`evaluate_predictions` is the one entry point: `cxrjax evaluate` calls it through
`cxrjax.eval.evaluate_files` (a predictions CSV, or a model's predictions of a prepared
part) and the trainer on a checkpoint's outputs. Thresholds (Youden, target sensitivity) are
chosen on a validation part when one is given; without one they are chosen on the
test images themselves, which flatters them, and the report says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from cxrjax.auc import roc_auc
from cxrjax.eval.adjudicated import adjudicated_metrics
from cxrjax.eval.baselines import load_baselines
from cxrjax.eval.calibration import calibration
from cxrjax.eval.delong import delong_test
from cxrjax.eval.labels import Labels, align_labels, align_metadata, as_labels
from cxrjax.eval.metrics import (
    bootstrap_aucs,
    micro_auc,
    multilabel_summary,
    operating_point,
    percentile_ci,
    pooled_rates,
    threshold_for_sensitivity,
    youden_threshold,
)
from cxrjax.eval.paths import safe_child
from cxrjax.eval.plots import auc_chart, reliability_grid, roc_grid, score_histograms, subgroup_chart
from cxrjax.eval.predictions import PredictionsError, write_predictions
from cxrjax.eval.report import write_report
from cxrjax.eval.runinfo import RunInfo, parse_run_info, read_run_info
from cxrjax.eval.subgroups import subgroup_metrics
from cxrjax.findings import FINDINGS
from cxrjax.workdir import METRICS, PREDICTIONS, REPORT, RUN_INFO

SCHEMA_VERSION = 1
THRESHOLD_WARNING = (
    "No validation predictions were given, so the Youden and target-sensitivity "
    "thresholds were chosen on the test images they are evaluated on: those operating "
    "points are optimistic. Pass validation predictions to choose them fairly."
)


def _check_probs(image_ids, probs, source: str) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray([str(i) for i in image_ids], dtype=object)
    probs = np.asarray(probs, np.float64)
    if probs.shape != (len(ids), len(FINDINGS)):
        raise PredictionsError(
            f"{source}: probabilities must be [{len(ids)}, {len(FINDINGS)}] (images x "
            f"findings in FINDINGS order), got {list(probs.shape)}"
        )
    if len(ids) == 0:
        raise PredictionsError(f"{source}: no predictions")
    bad = np.argwhere(~np.isfinite(probs) | (probs < 0) | (probs > 1))
    if len(bad):
        i, j = bad[0]
        raise PredictionsError(
            f"{source}: image {ids[i]!r}, finding {FINDINGS[j]}: probability {probs[i, j]} is not in [0, 1]"
        )
    dup = pd.Index(ids).duplicated()
    if dup.any():
        raise PredictionsError(f"{source}: image {ids[dup][0]!r} predicted twice")
    return ids, probs


def _choose_thresholds(labels, probs, target: float) -> dict[str, list]:
    k = len(FINDINGS)
    return {
        "at_0.5": [0.5] * k,
        "youden": [youden_threshold(labels[:, j], probs[:, j]) for j in range(k)],
        "target_sensitivity": [threshold_for_sensitivity(labels[:, j], probs[:, j], target) for j in range(k)],
    }


def _resolve_run(run, out_dir: Path) -> RunInfo | None:
    if isinstance(run, RunInfo):
        return run
    if isinstance(run, dict):
        return parse_run_info(run, "run description")
    if run is not None:
        return read_run_info(run)
    existing = out_dir / RUN_INFO
    return read_run_info(existing) if existing.exists() else None


def _comparison(labels, probs, ids, compare, source) -> dict:
    other_ids, other_probs, name = compare
    other_ids, other_probs = _check_probs(other_ids, other_probs, name)
    mine, theirs = pd.Index(ids), pd.Index(other_ids)
    if len(mine) != len(theirs) or len(mine.difference(theirs)):
        only_a = mine.difference(theirs)[:3].tolist()
        only_b = theirs.difference(mine)[:3].tolist()
        raise PredictionsError(
            f"{name}: a DeLong comparison needs the same images as {source}; only in "
            f"{source}: {only_a}, only in {name}: {only_b}"
        )
    other_probs = other_probs[theirs.get_indexer(mine)]
    per = {}
    for j, f in enumerate(FINDINGS):
        y = labels[:, j]
        ok = min(int(y.sum()), int((1 - y).sum())) >= 2
        per[f] = delong_test(y, probs[:, j], other_probs[:, j]) if ok else None
    return {
        "other": name,
        "method": "DeLong (fast midrank form, Sun & Xu 2014), two-sided, images treated as independent",
        "findings": per,
    }


def _validation_thresholds(val, labels_obj, test_ids, test_patients, target, sources):
    """Thresholds chosen on the validation part, after checking it is not the test part."""
    val_source = sources.get("val_predictions", "validation predictions")
    val_labels_obj = as_labels(val[2]) if len(val) > 2 else labels_obj
    val_ids, val_probs = _check_probs(val[0], val[1], val_source)
    overlap = pd.Index(val_ids).intersection(pd.Index(test_ids))
    if len(overlap):
        raise PredictionsError(
            f"{val_source}: {len(overlap)} image(s) are also test images (e.g. "
            f"{overlap[0]!r}); thresholds must be chosen on other images"
        )
    # The validation part only picks thresholds, so it need not cover a whole split list.
    val_labels, val_patients = align_labels(
        val_ids, Labels(val_labels_obj.table, val_labels_obj.source, False), val_source
    )
    notes = []
    shared = np.intersect1d(val_patients, test_patients)
    if len(shared):
        notes.append(
            f"{len(shared)} patient(s) have images in both the validation and the "
            "test predictions; thresholds may be optimistic."
        )
    thresholds = _choose_thresholds(val_labels, val_probs, target)
    for op in ("youden", "target_sensitivity"):
        for f, t in zip(FINDINGS, thresholds[op]):
            if t is None:
                notes.append(f"{f}: the validation part has a single class, so no {op} threshold could be chosen.")
    return thresholds, notes, (val_labels, val_probs)


def _per_finding(labels, probs, thresholds, notes):
    """Per-finding AUC, prevalence and operating points; ROC curves and Youden points
    for the figures. Appends a note for each finding whose AUC is undefined."""
    findings, curves, points = {}, {}, {}
    for j, f in enumerate(FINDINGS):
        y, p = labels[:, j], probs[:, j]
        auc = roc_auc(y, p)
        ops = {op: None if t[j] is None else operating_point(y, p, t[j]) for op, t in thresholds.items()}
        findings[f] = {
            "auc": auc,
            "n_positive": int(y.sum()),
            "n_negative": int(len(y) - y.sum()),
            "prevalence": float(y.mean()),
            "operating_points": ops,
        }
        curves[f] = None
        if auc is None:
            which = "positives" if y.sum() == 0 else "negatives"
            notes.append(
                f"{f}: no {which} among the evaluated images, so its AUC is undefined and it is excluded from mean_auc."
            )
            continue
        fpr, tpr, _ = roc_curve(y, p)
        curves[f] = (fpr, tpr)
        youden = ops["youden"]
        if youden is not None and youden["specificity"] is not None:
            points[f] = (1 - youden["specificity"], youden["sensitivity"])
    return findings, curves, points


def evaluate_predictions(
    image_ids,
    probs,
    labels_table: Labels | pd.DataFrame,
    patient_ids=None,
    out_dir: str | Path = ".",
    val=None,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    target_sensitivity: float = 0.9,
    compare=None,
    run=None,
    sources: dict | None = None,
    adjudicated=None,
) -> dict:
    """Score `probs` [N, 14] (FINDINGS order) for `image_ids`; write outputs to `out_dir`.

    labels_table: `read_labels(...)` output, or a table with image_id, the 14 finding
      columns and optionally patient_id (such as `read_metadata` output).
    patient_ids: [N] bootstrap units; default: the labels' patient_id.
    val: optional (image_ids, probs) or (image_ids, probs, labels) of the validation part,
      used only to choose thresholds; labels default to `labels_table`.
    compare: optional (image_ids, probs, name) of another run on the same images, for a
      per-finding DeLong test.
    run: a RunInfo, dict, or path to run.json; default: `out_dir/run.json` if present.
    adjudicated: optional `read_adjudicated(...)` labels, scored on the images they cover.
    Returns the metrics dict also written to `out_dir/metrics.json`.
    """
    if not 0 < target_sensitivity <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    if n_bootstrap < 1:
        raise ValueError(f"bootstrap sample count must be >= 1, got {n_bootstrap}")
    sources = dict(sources or {})
    source = sources.get("predictions", "predictions")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels_obj = as_labels(labels_table)
    ids, probs = _check_probs(image_ids, probs, source)
    labels, label_patients = align_labels(ids, labels_obj, source)
    if patient_ids is None:
        patient_ids = label_patients
    patient_ids = np.asarray(patient_ids)
    if patient_ids.shape != (len(ids),):
        raise ValueError(f"patient_ids must have one entry per image ({len(ids)})")
    run_info = _resolve_run(run, out_dir)

    if val is None:
        thresholds = _choose_thresholds(labels, probs, target_sensitivity)
        chosen_on, notes, val_scored = "test", [], None
    else:
        thresholds, notes, val_scored = _validation_thresholds(
            val, labels_obj, ids, patient_ids, target_sensitivity, sources
        )
        chosen_on = "validation"
    findings, curves, points = _per_finding(labels, probs, thresholds, notes)
    defined_aucs = [findings[f]["auc"] for f in FINDINGS if findings[f]["auc"] is not None]
    reps = bootstrap_aucs(labels, probs, patient_ids, n_bootstrap, seed)
    for j, f in enumerate(FINDINGS):
        has_auc = findings[f]["auc"] is not None
        findings[f]["auc_ci"] = percentile_ci(reps["per_finding"][:, j]) if has_auc else None

    overall_ops = {}
    for op in thresholds:
        pts = [findings[f]["operating_points"][op] for f in FINDINGS]
        pts = [pt for pt in pts if pt is not None]
        overall_ops[op] = pooled_rates(pts) if pts else None
    multilabel = {op: multilabel_summary(labels, probs, t) for op, t in thresholds.items()}

    metrics = {
        "schema_version": SCHEMA_VERSION,
        "run": run_info.to_json() if run_info else None,
        "inputs": sources,
        "n_images": int(len(ids)),
        "n_patients": int(len(np.unique(patient_ids))),
        "auc": {f: findings[f]["auc"] for f in FINDINGS},
        "mean_auc": float(np.mean(defined_aucs)) if defined_aucs else None,
        "mean_auc_ci": percentile_ci(reps["macro"]),
        "std_auc": float(np.std(defined_aucs, ddof=1)) if len(defined_aucs) > 1 else None,
        "n_findings_in_mean": len(defined_aucs),
        "micro_auc": micro_auc(labels, probs),
        "micro_auc_ci": percentile_ci(reps["micro"]),
        "bootstrap": {
            "unit": "patient",
            "n": int(n_bootstrap),
            "seed": int(seed),
            "confidence": 0.95,
            "method": "percentile",
            "valid_mean_auc_replicates": int(np.isfinite(reps["macro"]).sum()),
        },
        "thresholds": {
            "chosen_on": chosen_on,
            "warning": THRESHOLD_WARNING if chosen_on == "test" else None,
            "target_sensitivity": float(target_sensitivity),
            "values": {op: dict(zip(FINDINGS, t)) for op, t in thresholds.items()},
        },
        "findings": findings,
        "overall": overall_ops,
        "hamming_loss": {op: m["hamming_loss"] for op, m in multilabel.items()},
        "classification_report": {op: m["report"] for op, m in multilabel.items()},
        "notes": notes,
    }
    if compare is not None:
        metrics["comparison"] = _comparison(labels, probs, ids, compare, source)
    metrics["calibration"] = calibration(labels, probs, val_scored)
    metrics["subgroups"] = subgroup_metrics(
        labels, probs, patient_ids, align_metadata(ids, labels_obj), n_bootstrap, seed
    )
    if adjudicated is not None:
        metrics["adjudicated"] = adjudicated_metrics(ids, probs, adjudicated, source, n_bootstrap, seed)

    write_predictions(safe_child(out_dir, PREDICTIONS), ids, probs)
    _write_curves(safe_child(out_dir, "roc_curves.csv"), curves)
    if run_info is not None:
        safe_child(out_dir, RUN_INFO).write_text(json.dumps(run_info.to_json(), indent=2) + "\n")
    figures = _write_figures(out_dir, metrics, labels, probs, thresholds, curves, points, run_info)
    metrics["figures"] = figures
    safe_child(out_dir, METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    write_report(safe_child(out_dir, REPORT), metrics, {op: m["report_text"] for op, m in multilabel.items()})
    return metrics


def _write_curves(path: Path, curves: dict) -> None:
    rows = [pd.DataFrame({"finding": f, "fpr": c[0], "tpr": c[1]}) for f, c in curves.items() if c is not None]
    table = pd.concat(rows) if rows else pd.DataFrame(columns=["finding", "fpr", "tpr"])
    table.to_csv(path, index=False)


def _write_figures(out_dir, metrics, labels, probs, thresholds, curves, points, run_info):
    where = metrics["thresholds"]["chosen_on"]
    roc_grid(
        curves,
        metrics["auc"],
        points,
        safe_child(out_dir, "roc_curves.png"),
        f"ROC per finding ({metrics['n_images']} images); dot: Youden threshold chosen on {where}",
    )
    score_histograms(
        labels,
        probs,
        thresholds["youden"],
        safe_child(out_dir, "score_histograms.png"),
        f"Scores by true label (positives up, negatives down); line: Youden threshold chosen on {where}",
    )
    label = run_info.name if run_info else "this run"
    entries = [(label, metrics["auc"], True)]
    if run_info is not None and run_info.split_family == "synthetic":
        title = "Per-finding AUC on synthetic data (no published baseline applies)"
    elif run_info is not None:
        table = load_baselines()
        for _, row in table[table["split_family"] == run_info.split_family].iterrows():
            entries.append((f"{row['work']} [{row['tag']}]", {f: row[f] for f in FINDINGS}, False))
        title = f"Per-finding AUC vs published baselines on {run_info.split_family} splits"
    else:
        title = (
            "Per-finding AUC (split family unknown: no baselines shown, they would not be comparable; give run.json)"
        )
    auc_chart(entries, safe_child(out_dir, "auc_vs_baselines.png"), title)
    figures = ["roc_curves.png", "score_histograms.png", "auc_vs_baselines.png"]
    reliability_grid(
        metrics["calibration"],
        safe_child(out_dir, "reliability.png"),
        f"Reliability per finding ({metrics['n_images']} images, "
        f"{metrics['calibration']['n_bins']} equal-width bins); diagonal: calibrated",
    )
    figures.append("reliability.png")
    if metrics["subgroups"]["available"]:
        subgroup_chart(
            metrics["subgroups"],
            safe_child(out_dir, "subgroups.png"),
            "Mean AUC by subgroup (patient-bootstrap 95% CI)",
        )
        figures.append("subgroups.png")
    return figures
