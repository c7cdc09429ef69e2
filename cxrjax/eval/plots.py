"""PNG figures for reports and the leaderboard.

Uses matplotlib's object API (`Figure` renders through Agg without pyplot), so no
global backend is switched and nothing needs a display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from cxrjax.findings import FINDINGS
from cxrjax.tables import number

_GRID = (4, 4)
_LOG_FLOOR = 1e-5  # 14 panels, two left empty
_OUTCOME_COLOURS = {"TP": "tab:green", "FN": "tab:orange", "TN": "tab:blue", "FP": "tab:red"}


def _panels(title: str, size=(16, 14)):
    # Fixed margins: constrained layout would double the drawing time of 14 panels.
    fig = Figure(figsize=size)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.05, top=0.94, hspace=0.4, wspace=0.3)
    axes = fig.subplots(*_GRID).ravel()
    for ax in axes[len(FINDINGS) :]:
        ax.set_axis_off()
    fig.suptitle(title)
    return fig, axes


def roc_grid(curves: dict, aucs: dict, points: dict, path: Path, title: str) -> Path:
    """One ROC panel per finding; `curves[f]` is (fpr, tpr) or None when undefined and
    `points[f]` an optional (fpr, tpr) operating point to mark."""
    fig, axes = _panels(title)
    for ax, name in zip(axes, FINDINGS):
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        if curves.get(name) is None:
            ax.text(0.5, 0.5, "AUC undefined\n(one class only)", ha="center", va="center")
        else:
            fpr, tpr = curves[name]
            ax.plot(fpr, tpr, lw=1.5)
            if points.get(name) is not None:
                ax.plot(*points[name], "o", color="tab:red", ms=5, label="Youden threshold")
        ax.set_title(f"{name}  AUC {number(aucs.get(name))}", fontsize=10)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity")
    fig.savefig(path, dpi=90)
    return path


def score_histograms(labels: np.ndarray, probs: np.ndarray, thresholds: list, path: Path, title: str) -> Path:
    """Score distributions per finding: positives upward, negatives downward (each as a
    share of its class), bars coloured TP/FN/TN/FP by the finding's threshold."""
    fig, axes = _panels(title)
    for j, (ax, name) in enumerate(zip(axes, FINDINGS)):
        y, p, t = labels[:, j] == 1, probs[:, j], thresholds[j]
        # Log-spaced bins: most scores of rare findings sit near 0. The threshold is a
        # bin edge, so every bar lies wholly on one side of it.
        low = max(_LOG_FLOOR, min(float(p.min()), t if t else 1.0) / 2)
        edges = np.geomspace(low, 1, 41)
        if t is not None and low < t < 1:
            edges = np.unique(np.r_[edges, t])
        p = np.clip(p, low, 1)  # exact zeros land in the first bar
        cut = t if t is not None else np.inf
        groups = {
            "TP": (p[y & (p >= cut)], 1, y.sum()),
            "FN": (p[y & (p < cut)], 1, y.sum()),
            "TN": (p[~y & (p < cut)], -1, (~y).sum()),
            "FP": (p[~y & (p >= cut)], -1, (~y).sum()),
        }
        for outcome, (values, sign, total) in groups.items():
            if len(values):
                counts, _ = np.histogram(values, edges)
                ax.stairs(
                    sign * counts / total, edges, fill=True, alpha=0.8, color=_OUTCOME_COLOURS[outcome], label=outcome
                )
        if t is not None:
            ax.axvline(t, color="k", lw=1)
        ax.axhline(0, color="0.3", lw=0.6)
        ax.set_title(f"{name}  (threshold {number(t)})", fontsize=10)
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set(xlim=(low, 1), xlabel="predicted probability (log scale)", ylabel="share of class")
    handles = [axes[0].fill_between([], [], color=c, label=k) for k, c in _OUTCOME_COLOURS.items()]
    fig.legend(handles=handles, loc="lower right", fontsize=12)
    fig.savefig(path, dpi=90)
    return path


def _auc_floor(entries: list[tuple[str, dict, bool]]) -> float:
    """The y-axis start for these entries: 0.5 (chance), or lower to show every value."""
    values = [v for _, aucs, _ in entries for v in aucs.values() if v is not None and np.isfinite(v)]
    return min([0.5, *(v - 0.02 for v in values)])


def _draw_aucs(ax, entries: list[tuple[str, dict, bool]], title: str, low: float | None = None) -> None:
    x = np.arange(len(FINDINGS))
    runs = [e for e in entries if e[2]]
    width = 0.8 / max(len(runs), 1)
    for i, (label, aucs, _) in enumerate(runs):
        heights = [np.nan if aucs.get(f) is None else aucs[f] for f in FINDINGS]
        ax.bar(x - 0.4 + width * (i + 0.5), heights, width, label=label, alpha=0.85)
    markers = "os^vD<>ph*Xd"
    for i, (label, aucs, _) in enumerate(e for e in entries if not e[2]):
        values = [np.nan if aucs.get(f) is None else aucs[f] for f in FINDINGS]
        ax.plot(x, values, markers[i % len(markers)], ms=6, mfc="none", label=label)
    ax.set_xticks(x, [f.replace("_", " ") for f in FINDINGS], rotation=35, ha="right")
    ax.set(ylabel="ROC AUC", ylim=(_auc_floor(entries) if low is None else low, 1.0), title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncols=3)


def auc_chart(entries: list[tuple[str, dict, bool]], path: Path, title: str) -> Path:
    """Per-finding AUC of several entries (label, {finding: auc or None}, is_run): runs
    as bars, published baselines as markers, so a run reads against the references."""
    return auc_panels([(title, entries)], path)


def auc_panels(panels: list[tuple[str, list]], path: Path) -> Path:
    """One `auc_chart`-style panel per (title, entries), stacked vertically, all on one
    y-axis range so bar heights compare across panels."""
    fig = Figure(figsize=(15, 6 * len(panels)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(panels), 1))
    low = min(_auc_floor(entries) for _, entries in panels)
    for ax, (title, entries) in zip(axes, panels):
        _draw_aucs(ax, entries, title, low)
    fig.savefig(path, dpi=90)
    return path


MIN_BIN_IMAGES = 10  # a bin's positive rate from fewer images is drawn hollow, off the line


def reliability_points(bins: dict):
    """(mean score, positive rate, count, line) over the non-empty bins; `line` is the
    rate where the bin has MIN_BIN_IMAGES or more and NaN elsewhere, also between bins
    that an empty bin separates, so the curve never jumps 0 <-> 1 through few images."""
    count = np.asarray(bins["count"], np.float64)
    keep = count > 0
    x = np.asarray(bins["mean_score"], np.float64)[keep]
    y = np.asarray(bins["positive_rate"], np.float64)[keep]
    line = np.where(count[keep] >= MIN_BIN_IMAGES, y, np.nan)
    index = np.flatnonzero(keep)
    gaps = np.flatnonzero(np.diff(index) > 1)  # an empty bin between two kept ones
    x_out, y_out, c_out, line_out = (np.insert(a, gaps + 1, np.nan) for a in (x, y, count[keep], line))
    return x_out, y_out, np.nan_to_num(c_out, nan=0), line_out


def reliability_grid(calibration: dict, path: Path, title: str) -> Path:
    """One reliability diagram per finding: observed positive rate against mean score per
    bin (marker area: share of images), raw scores and, when fit, Platt-scaled ones."""
    fig, axes = _panels(title)
    for ax, name in zip(axes, FINDINGS):
        entry = calibration["findings"][name]
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        parts = [("raw", entry["raw"], "tab:blue")]
        if entry["platt"] is not None:
            parts.append(("Platt (fit on val)", entry["platt"], "tab:orange"))
        for label, scores, colour in parts:
            x, y, c, line = reliability_points(scores["bins"])
            total = max(1, c.sum())
            ax.plot(x, line, "-", color=colour, lw=1, label=f"{label} ECE {scores['ece']:.3f}")
            small = c < MIN_BIN_IMAGES
            ax.scatter(x[~small], y[~small], s=4 + 200 * c[~small] / total, color=colour)
            ax.scatter(x[small], y[small], s=12, facecolors="none", edgecolors=colour, lw=0.8)
        ax.set_title(f"{name}  Brier {entry['raw']['brier']:.3f}", fontsize=10)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="mean score in bin", ylabel="positive rate")
        ax.legend(fontsize=7, loc="upper left")
    fig.savefig(path, dpi=90)
    return path


def subgroup_chart(subgroups: dict, path: Path, title: str) -> Path:
    """Mean AUC with its CI per group, one panel per attribute (sex, view, age)."""
    attributes = subgroups["attributes"]
    fig = Figure(figsize=(5 * len(attributes), 4.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(attributes)))
    for ax, (attr, d) in zip(axes, attributes.items()):
        names = list(d["groups"])
        for i, g in enumerate(names):
            grp = d["groups"][g]
            if grp["mean_auc"] is None:
                ax.text(i, 0.55, "n/a", ha="center")
                continue
            # The CI drawn as its own segment: a small group's percentile CI need not
            # contain the point estimate, which error bars cannot show.
            if grp["mean_auc_ci"]:
                ax.vlines(i, *grp["mean_auc_ci"], color="tab:blue", lw=1.5)
                ax.hlines(grp["mean_auc_ci"], i - 0.08, i + 0.08, color="tab:blue", lw=1.5)
            small = grp.get("small", False)  # too few positives/negatives: in no gap
            ax.plot(i, grp["mean_auc"], "o", color="tab:blue", mfc="white" if small else "tab:blue")
            ax.annotate(
                f"n={grp['n_images']}\n{grp['n_findings_in_mean']} findings" + ("\nsmall: in no gap" if small else ""),
                (i, 0.52),
                ha="center",
                fontsize=7,
            )
        ax.set_xticks(range(len(names)), names)
        ax.set(xlim=(-0.5, len(names) - 0.5), ylim=(0.5, 1.0), ylabel="mean AUC", title=attr)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=90)
    return path
