"""Rank evaluated runs against published baselines, one group per split family.

Each run folder holds `metrics.json` (from `evaluate_predictions`) and a run description
(`run.json`, see `cxrjax.eval.runinfo`). A run is ranked only against baselines and
runs of its own split family; the `unstated` baselines (split not stated) are listed
apart and never ranked. A run's identity is what its run.json declares, never its
folder: each evaluation is its own entry, and only runs that declare one
`replicate_group` form one entry (per-finding AUCs averaged, "± runs" the std of their
mean AUC). A run scored on fewer images than its split's full test list, or by a smoke
model, is listed in its own "not ranked" table, never among published full-test results.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrjax.errors import InputError
from cxrjax.eval.baselines import load_baselines
from cxrjax.eval.paths import safe_child
from cxrjax.eval.plots import auc_panels
from cxrjax.eval.runinfo import SPLIT_FAMILIES, RunInfo, RunInfoError, parse_run_info, read_run_info
from cxrjax.findings import FINDINGS
from cxrjax.jsonfile import read_json
from cxrjax.tables import NA, fmt, fmt_ci, md_cell, section, signed, table_lines, undefined
from cxrjax.workdir import METRICS, RUN_INFO

SHORT = dict(
    zip(
        FINDINGS,
        ("Atel", "Card", "Effu", "Infi", "Mass", "Nodu", "Pneu", "PTX", "Cons", "Edem", "Emph", "Fibr", "PT", "Hern"),
    )
)
# Runs' families, then the baselines whose split is not stated.
FAMILIES = (*SPLIT_FAMILIES, "unstated")
FAMILY_TITLES = {
    "official": "Official NIH split (train_val_list / test_list)",
    "random": "Random patient-wise splits (CheXNet style)",
    "synthetic": "Synthetic data (a pipeline check: no published result applies)",
    "unstated": "Split not stated (as cited by Fisher 2025) - not ranked",
}
FOOTNOTES = {
    "official": "Mean-only official-split results (not in the table): Xiao et al. 2023, "
    "ViT-B/16 with in-domain pretraining, 224 px: 0.830; an independent DenseNet-121 "
    "224 px reproduction: 0.807.",
}


class LeaderboardError(InputError):
    """A run folder that cannot be placed on the leaderboard."""


@dataclass(frozen=True)
class RunResult:
    info: RunInfo
    auc: dict  # finding -> float | None
    mean_auc: float | None
    folder: str
    worst_gap: dict | None = None  # metrics.json subgroups.worst_gap
    adjudicated: dict | None = None  # metrics.json adjudicated (overall part and size)
    n_images: int | None = None  # test images scored
    n_patients: int | None = None
    mean_ci: tuple | None = None  # 95% CI of the mean AUC

    @property
    def is_smoke(self) -> bool:
        return self.info.smoke or self.info.backbone.lower().startswith("tiny")

    def not_ranked_because(self) -> str:
        """Why this run cannot be ranked among published full-test results ('' if it can)."""
        if self.info.split_family == "synthetic":
            return ""  # ranked only among synthetic runs, where no published result applies
        if self.is_smoke:
            return "smoke/tiny model"
        full = self.info.full_test_images()
        if self.n_images is None:
            return "test images scored not recorded in metrics.json"
        if full is None:
            return (
                f"{self.n_images} test images; the split's full test list size is unknown (run.json test_images_full)"
            )
        if self.n_images < full:
            return f"{self.n_images:,} of the split's {full:,} test images"
        return ""


def _optional_sections(metrics: dict, metrics_path: Path) -> tuple[dict | None, dict | None]:
    """The worst subgroup gap and the overall adjudicated-label results, when present."""
    gap = (metrics.get("subgroups") or {}).get("worst_gap")
    if gap is not None and not (isinstance(gap, dict) and isinstance(gap.get("gap"), int | float)):
        raise LeaderboardError(f"{metrics_path}: subgroups.worst_gap is {gap!r}, not a gap")
    adj = metrics.get("adjudicated")
    if adj is not None:
        try:
            adj = {
                "n_scored": int(adj["n_scored"]),
                "overall": {k: v["auc"] for k, v in adj["sets"]["overall"]["adjudicated"].items()},
                "text_mined": {k: v["auc"] for k, v in adj["sets"]["overall"]["text_mined"].items()},
            }
        except (KeyError, TypeError, ValueError) as e:
            raise LeaderboardError(f"{metrics_path}: malformed 'adjudicated' entry ({e!r})") from e
    return gap, adj


def read_run(run_dir: str | Path) -> RunResult:
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS
    metrics = read_json(
        metrics_path, LeaderboardError, missing=f"{run_dir}: no {METRICS} (run `cxrjax evaluate` first)"
    )
    if (run_dir / RUN_INFO).exists():
        info = read_run_info(run_dir / RUN_INFO)
    elif isinstance(metrics.get("run"), dict):
        info = parse_run_info(metrics["run"], f"{metrics_path} ['run']")
    else:
        raise RunInfoError(
            f"{run_dir}: no {RUN_INFO} and no 'run' entry in {METRICS}, so its split "
            "family is unknown; write run.json with at least "
            '{"name": "...", "split_family": "official" or "random"}'
        )
    auc = metrics.get("auc")
    if not isinstance(auc, dict) or sorted(auc) != sorted(FINDINGS):
        raise LeaderboardError(f"{metrics_path}: 'auc' must map each of the 14 findings to a number or null")
    for f, v in auc.items():
        if v is not None and not (isinstance(v, int | float) and 0 <= v <= 1):
            raise LeaderboardError(f"{metrics_path}: auc of {f} is {v!r}, not in [0, 1] or null")
    mean = metrics.get("mean_auc")
    if mean is not None and not isinstance(mean, int | float):
        raise LeaderboardError(f"{metrics_path}: mean_auc is {mean!r}")
    counts = []
    for key in ("n_images", "n_patients"):
        v = metrics.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise LeaderboardError(f"{metrics_path}: {key} is {v!r}, not a count")
        counts.append(v)
    ci = metrics.get("mean_auc_ci")
    if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(isinstance(c, int | float) for c in ci)):
        raise LeaderboardError(f"{metrics_path}: mean_auc_ci is {ci!r}, not [low, high]")
    return RunResult(
        info, auc, mean, str(run_dir), *_optional_sections(metrics, metrics_path), *counts, tuple(ci) if ci else None
    )


def _label(info: RunInfo) -> str:
    return info.name + (f" ({info.evaluation})" if info.evaluation else "")


def _run_entries(runs: list[RunResult]) -> pd.DataFrame:
    """One entry per run folder, except runs declaring one replicate_group: one entry."""
    groups: dict[tuple, list[RunResult]] = {}
    for i, r in enumerate(runs):
        key = ("replicates", r.info.replicate_group) if r.info.replicate_group else ("run", i)
        groups.setdefault(key, []).append(r)
    rows = []
    for key, group in groups.items():
        first = group[0].info
        same = ("split_family", "split", "px", "backbone", "evaluation")
        for r in group[1:]:
            differ = [f for f in same if getattr(r.info, f) != getattr(first, f)]
            if differ:
                raise LeaderboardError(
                    f"replicate group {key[1]!r}: {group[0].folder} and {r.folder} differ in "
                    f"{', '.join(differ)}; replicates share split, resolution, backbone and evaluation"
                )
        reasons = [r.not_ranked_because() for r in group]
        n_images = [r.n_images for r in group]
        row = {
            "entry": f"{key[1]}" + (f" ({first.evaluation})" if first.evaluation else "")
            if key[0] == "replicates"
            else _label(first),
            "kind": "run",
            "n_runs": len(group),
            "tag": "",
            "year": "",
            "split_family": first.split_family,
            "split": first.split,
            "px": "" if first.px is None else str(first.px),
            "backbone": first.backbone,
            "test_images": np.nan if None in n_images else float(min(n_images)),
            "test_patients": np.nan
            if any(r.n_patients is None for r in group)
            else float(min(r.n_patients for r in group)),
            "not_ranked": "; ".join(dict.fromkeys(x for x in reasons if x)),
            "provenance": "; ".join(r.folder for r in group),
        }
        for f in FINDINGS:
            values = [r.auc[f] for r in group if r.auc[f] is not None]
            row[f] = float(np.mean(values)) if values else np.nan
        means = [r.mean_auc for r in group if r.mean_auc is not None]
        row["mean"] = float(np.mean(means)) if means else np.nan
        ci = group[0].mean_ci if len(group) == 1 else None  # one evaluation's bootstrap CI
        row["mean_ci_low"], row["mean_ci_high"] = ci if ci else (np.nan, np.nan)
        row["std_runs"] = float(np.std(means, ddof=1)) if len(means) > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def leaderboard_table(runs: list[RunResult], baselines: pd.DataFrame) -> pd.DataFrame:
    """All entries with family, rank within family (blank for `unstated` and for runs not
    comparable with published full-test results: see `not_ranked`), std over findings."""
    base = baselines.rename(columns={"work": "entry"}).assign(
        kind="baseline", n_runs=0, std_runs=np.nan, test_patients=np.nan, mean_ci_low=np.nan, mean_ci_high=np.nan
    )
    base["not_ranked"] = np.where(base["split_family"] == "unstated", "split not stated", "")
    base["px"] = base["px"].astype(str)
    base["year"] = base["year"].astype(str)
    table = pd.concat([_run_entries(runs), base], ignore_index=True)
    table["std_findings"] = table[list(FINDINGS)].std(axis=1, ddof=1)
    table["family_order"] = table["split_family"].map(FAMILIES.index)
    table["unranked"] = table["not_ranked"] != ""
    table = table.sort_values(["family_order", "unranked", "mean"], ascending=[True, True, False], kind="stable")
    ranked = ~table["unranked"]
    table["rank"] = ""
    table.loc[ranked, "rank"] = (
        table[ranked].groupby("split_family")["mean"].rank(ascending=False, method="min").astype(int).astype(str)
    )
    columns = [
        "split_family",
        "rank",
        "entry",
        "kind",
        "n_runs",
        "tag",
        "year",
        "split",
        "px",
        "backbone",
        "test_images",
        "test_patients",
        *FINDINGS,
        "mean",
        "mean_ci_low",
        "mean_ci_high",
        "std_findings",
        "std_runs",
        "not_ranked",
        "provenance",
    ]
    return table[columns].reset_index(drop=True)


def deltas(table: pd.DataFrame) -> pd.DataFrame:
    """Per-finding (and mean) AUC of each ranked run minus each baseline of its split
    family (a run not comparable with the published results gets none)."""
    rows = []
    for _, run in table[(table["kind"] == "run") & (table["not_ranked"] == "")].iterrows():
        same = table[(table["kind"] == "baseline") & (table["split_family"] == run["split_family"])]
        for _, b in same.iterrows():
            row = {"run": run["entry"], "baseline": b["entry"], "split_family": run["split_family"], "tag": b["tag"]}
            for c in (*FINDINGS, "mean"):
                row[c] = run[c] - b[c]
            rows.append(row)
    return pd.DataFrame(rows, columns=["run", "baseline", "split_family", "tag", *FINDINGS, "mean"])


def _cell(v) -> str:
    return NA if undefined(v) else fmt(float(v))


def _beyond_auc_sections(runs: list[RunResult]) -> list[str]:
    """Subgroup gaps and adjudicated-label AUCs of the runs that carry them."""
    out = []
    gaps = [r for r in runs if r.worst_gap]
    if gaps:
        out += section(
            "Largest subgroup gap (mean AUC, highest minus lowest group)",
            "Published baselines report no subgroup results, so they have no row here.",
        )
        header = ["entry", "split family", "attribute", "groups", "gap", "95% CI", "findings", "folder"]
        rows = [
            [
                f"**{md_cell(_label(r.info))}**",
                r.info.split_family,
                md_cell(r.worst_gap.get("attribute")),
                f"{md_cell(r.worst_gap.get('high'))} − {md_cell(r.worst_gap.get('low'))}",
                signed(r.worst_gap["gap"]),
                fmt_ci(r.worst_gap.get("ci")),
                str(r.worst_gap.get("n_findings", NA)),
                md_cell(r.folder),
            ]
            for r in gaps
        ]
        out += table_lines(header, rows) + [""]
    adj = [r for r in runs if r.adjudicated]
    if adj:
        names = list(adj[0].adjudicated["overall"])
        out += section(
            "Radiologist-adjudicated labels (Majkowska et al. 2019)",
            "AUC against the radiologists' labels (in parentheses: NIH's text-mined labels on "
            "the same images) over each run's images that the file covers. Published baselines "
            "report none.",
        )
        rows = [
            [
                f"**{md_cell(_label(r.info))}**",
                r.info.split_family,
                str(r.adjudicated["n_scored"]),
                *(
                    f"{_cell(r.adjudicated['overall'].get(n))} ({_cell(r.adjudicated['text_mined'].get(n))})"
                    for n in names
                ),
                md_cell(r.folder),
            ]
            for r in adj
        ]
        out += table_lines(["entry", "split family", "images", *names, "folder"], rows) + [""]
    return out


def _count(v) -> str:
    return NA if undefined(v) or v == "" else f"{int(v):,}"


def _ci(r) -> str:
    return "" if undefined(r["mean_ci_low"]) else fmt_ci((r["mean_ci_low"], r["mean_ci_high"]))


HEADER = ["entry", "kind", "tag", "px", "backbone", "test images", "mean", "95% CI", "std", "± runs"]


def _table_rows(rows: pd.DataFrame, first: str) -> list[str]:
    """Markdown rows; `first` names the first column: 'rank' or 'not ranked because'."""
    header = [first, *HEADER, *(SHORT[f] for f in FINDINGS)]
    body = []
    for _, r in rows.iterrows():
        name = md_cell(r["entry"])
        if r["kind"] == "run":
            name = f"**{name}**" + (f" ({r['n_runs']} replicates)" if r["n_runs"] > 1 else "")
        cells = [
            r["rank"] if first == "rank" else md_cell(r["not_ranked"]),
            name,
            r["kind"],
            r["tag"],
            md_cell(r["px"]),
            md_cell(r["backbone"]),
            _count(r["test_images"]),
            _cell(r["mean"]),
            _ci(r),
            _cell(r["std_findings"]),
            _cell(r["std_runs"]),
            *(_cell(r[f]) for f in FINDINGS),
        ]
        body.append([str(c) for c in cells])
    return table_lines(header, body)


def _markdown(table: pd.DataFrame, delta: pd.DataFrame, runs: list[RunResult] = ()) -> str:
    out = [
        "# cxrjax leaderboard",
        "",
        "Per-finding ROC AUC. A run is ranked only against entries of its own split "
        "family: results on different splits are not comparable. A run scored on fewer "
        "images than its split's full test list (NIH's official test list: 25,596), or by "
        'a smoke/tiny model, is listed under "not ranked", never among the published '
        "full-test results. `test images`: images scored; `95% CI`: patient-bootstrap CI "
        "of the run's mean AUC; `std`: the sample std across the findings; `± runs`: the "
        "std of mean AUC across runs that declare one replicate_group. Baseline tags: "
        "verified (from a public file of that work), as-cited (as printed in the Fisher "
        "2025 write-up), secondary (third-party compilation, cells unchecked).",
        "",
    ]
    for family in FAMILIES:
        rows = table[table["split_family"] == family]
        if rows.empty:
            continue
        out += [f"## {FAMILY_TITLES[family]}", ""]
        if family == "unstated":
            out += _table_rows(rows, "rank")
        else:
            out += _table_rows(rows[rows["not_ranked"] == ""], "rank")
            unranked = rows[rows["not_ranked"] != ""]
            if not unranked.empty:
                out += [
                    "",
                    "### Not ranked: not comparable with the published full-test results",
                    "",
                    *_table_rows(unranked, "not ranked because"),
                ]
        out.append("")
        if family in FOOTNOTES:
            out += [FOOTNOTES[family], ""]
        for _, r in rows[rows["kind"] == "run"].iterrows():
            if np.isnan([r[f] for f in FINDINGS]).any():
                out += [
                    f"{md_cell(r['entry'])}: n/a marks a finding whose AUC is undefined "
                    "(one class only in its test set); its mean leaves it out.",
                    "",
                ]
    if not delta.empty:
        out += ["## Per-finding difference to each baseline (ranked runs minus baseline)", ""]
        dheader = ["baseline", "tag", "mean", *(SHORT[f] for f in FINDINGS)]
        for run, group in delta.groupby("run", sort=False):
            rows = [
                [md_cell(d["baseline"]), d["tag"], signed(d["mean"]), *(signed(d[f]) for f in FINDINGS)]
                for _, d in group.iterrows()
            ]
            out += section(f"{md_cell(run)} ({group['split_family'].iloc[0]} split family)", level=3)
            out += table_lines(dheader, rows) + [""]
    out += _beyond_auc_sections(list(runs))
    out += ["![per-finding AUC](leaderboard.png)", ""]
    return "\n".join(out)


def write_leaderboard(run_dirs, out_dir: str | Path, baselines: pd.DataFrame | None = None) -> dict:
    """Write leaderboard.md, leaderboard.csv, leaderboard_deltas.csv and leaderboard.png."""
    if not run_dirs:
        raise LeaderboardError("no run folders given")
    runs = [read_run(d) for d in run_dirs]
    table = leaderboard_table(runs, load_baselines() if baselines is None else baselines)
    delta = deltas(table)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "md": safe_child(out_dir, "leaderboard.md"),
        "csv": safe_child(out_dir, "leaderboard.csv"),
        "deltas": safe_child(out_dir, "leaderboard_deltas.csv"),
        "png": safe_child(out_dir, "leaderboard.png"),
    }
    table.to_csv(paths["csv"], index=False)
    delta.to_csv(paths["deltas"], index=False)
    paths["md"].write_text(_markdown(table, delta, runs))
    panels = []
    for family in FAMILIES:
        rows = table[table["split_family"] == family]
        if (rows["kind"] == "run").any():
            entries = [
                (
                    r["entry"]
                    + (f" [{r['tag']}]" if r["tag"] else "")
                    + (f" [not ranked: {r['not_ranked']}]" if r["kind"] == "run" and r["not_ranked"] else ""),
                    {f: None if np.isnan(r[f]) else r[f] for f in FINDINGS},
                    r["kind"] == "run",
                )
                for _, r in rows.iterrows()
            ]
            panels.append((FAMILY_TITLES[family], entries))
    auc_panels(panels, paths["png"])
    return paths
