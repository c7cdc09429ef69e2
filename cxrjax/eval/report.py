"""Markdown report of one evaluation, written from its metrics dict (n/a for undefined)."""

from __future__ import annotations

from pathlib import Path

from cxrjax.findings import FINDINGS
from cxrjax.summaries import plural
from cxrjax.tables import NA, fmt, fmt_ci, md_cell, number, section, signed, table_lines

# Chosen thresholds first; the fixed 0.5 cut last (it assumes calibrated scores).
OP_TITLES = {
    "youden": "Youden-optimal threshold",
    "target_sensitivity": "target-sensitivity threshold",
    "at_0.5": "threshold 0.5",
}


def write_report(path: Path, m: dict, report_texts: dict[str, str]) -> Path:
    boot = m["bootstrap"]
    th = m["thresholds"]
    out = ["# Evaluation report", ""]
    if m.get("run"):
        r = m["run"]
        out += [
            f"Run **{md_cell(r['name'])}**: split family `{r['split_family']}`, split "
            f"{md_cell(r['split'] or 'n/a')}, {r['px'] or 'n/a'} px, backbone "
            f"{md_cell(r['backbone'] or 'n/a')}.",
            "",
        ]
    for key, value in m["inputs"].items():
        out.append(f"- {key}: `{value}`")
    out += [
        f"- {m['n_images']} images of {m['n_patients']} patients",
        "",
        "## Summary",
        "",
        f"- mean AUC (macro, over {plural(m['n_findings_in_mean'], 'finding')}): "
        f"**{fmt(m['mean_auc'], 4)}** 95% CI {fmt_ci(m['mean_auc_ci'])}; "
        f"std across findings {fmt(m['std_auc'])}",
        f"- micro AUC (all image-finding pairs pooled): {fmt(m['micro_auc'], 4)} 95% CI {fmt_ci(m['micro_auc_ci'])}",
        f"- CIs: {boot['method']} bootstrap over **patients** ({boot['n']} resamples, seed {boot['seed']})",
        f"- thresholds (Youden, target sensitivity {th['target_sensitivity']:g}) chosen on "
        f"the **{th['chosen_on']}** images",
        "",
    ]
    if th["chosen_on"] == "test":
        out += [f"> **Warning:** {th['warning']}", ""]
    if m["notes"]:
        out += ["## Notes", ""] + [f"- {n}" for n in m["notes"]] + [""]

    out += ["## Per finding", ""]
    rows = []
    for f in FINDINGS:
        d = m["findings"][f]
        rows.append([f, str(d["n_positive"]), fmt(d["prevalence"], 4), fmt(d["auc"], 4), fmt_ci(d["auc_ci"])])
    out += table_lines(["finding", "positives", "prevalence", "AUC", "95% CI"], rows) + [""]

    for op, title in OP_TITLES.items():
        out += [f"### Operating point: {title}", ""]
        if op == "at_0.5" and "calibration" in m:
            out += _uncalibrated_warning(m["calibration"])
        rows = []
        for f in FINDINGS:
            pt = m["findings"][f]["operating_points"][op]
            if pt is None:
                rows.append([f] + [NA] * 8)
                continue
            rows.append(
                [f, fmt(pt["threshold"], 4)]
                + [fmt(pt[k]) for k in ("sensitivity", "specificity", "ppv", "npv", "f1")]
                + [f"{pt['tp']}/{pt['fp']}", f"{pt['tn']}/{pt['fn']}"]
            )
        overall = m["overall"][op]
        if overall:
            for kind in ("macro", "micro"):
                o = overall[kind]
                rows.append(
                    [f"*{kind} average*", ""]
                    + [fmt(o[k]) for k in ("sensitivity", "specificity", "ppv", "npv", "f1")]
                    + ["", ""]
                )
        header = ["finding", "threshold", "sensitivity", "specificity", "PPV", "NPV", "F1", "TP/FP", "TN/FN"]
        out += table_lines(header, rows)
        out += ["", f"Hamming loss: {fmt(m['hamming_loss'][op], 4)}", ""]
        if report_texts.get(op):
            out += [
                "<details><summary>scikit-learn classification report</summary>",
                "",
                "```",
                report_texts[op].rstrip(),
                "```",
                "",
                "</details>",
                "",
            ]

    if "comparison" in m:
        c = m["comparison"]
        out += section("Comparison with another run", f"Other predictions: `{c['other']}`. Test: {c['method']}.")
        rows = []
        for f in FINDINGS:
            d = c["findings"][f]
            if d is None:
                rows.append([f, *[NA] * 4])
            else:
                rows.append(
                    [
                        f,
                        fmt(d["auc_a"], 4),
                        fmt(d["auc_b"], 4),
                        signed(d["difference"], 4),
                        number(d["p_value"], ".3g"),
                    ]
                )
        out += table_lines(["finding", "AUC (this)", "AUC (other)", "difference", "p (DeLong)"], rows)
        out.append("")

    if "calibration" in m:
        out += _calibration_section(m["calibration"])
    if "subgroups" in m:
        out += _subgroup_section(m["subgroups"])
    if "adjudicated" in m:
        out += _adjudicated_section(m["adjudicated"])
    out += ["## Figures", ""]
    out += [f"![{name}]({name})" for name in m.get("figures", [])]
    out.append("")
    path.write_text("\n".join(out))
    return path


def _uncalibrated_warning(cal: dict) -> list[str]:
    bad = cal["uncalibrated"]
    if not bad:
        return [
            f"All findings have ECE <= {cal['uncalibrated_above_ece']:g}: the scores are "
            "close enough to probabilities for a 0.5 cut to mean what it says.",
            "",
        ]
    return [
        f"> **The scores are uncalibrated** for {len(bad)} of {len(FINDINGS)} findings "
        f"(ECE > {cal['uncalibrated_above_ece']:g}: {', '.join(bad)}), so a fixed 0.5 "
        "threshold means little for them; use the thresholds above (see Calibration).",
        "",
    ]


def _calibration_section(cal: dict) -> list[str]:
    scaled = cal["scaling"] is not None
    out = section(
        "Calibration",
        f"Expected calibration error (ECE, {cal['n_bins']} {cal['binning']}; bins weighted "
        f"by their share of images) and Brier score. Mean ECE {fmt(cal['mean_ece'], 4)}, "
        f"mean Brier {fmt(cal['mean_brier'], 4)}.",
        f"Beside the raw scores: {cal['scaling']}, applied to these images."
        if scaled
        else "No validation predictions, so no scaling was fit.",
    )
    rows = []
    for f in FINDINGS:
        d = cal["findings"][f]
        row = [f, fmt(d["raw"]["ece"], 4), fmt(d["raw"]["brier"], 4)]
        if scaled:
            p = d["platt"]
            row += [NA, NA] if p is None else [fmt(p["ece"], 4), fmt(p["brier"], 4)]
        rows.append(row)
    header = ["finding", "ECE", "Brier"] + (["ECE (Platt)", "Brier (Platt)"] if scaled else [])
    return out + table_lines(header, rows) + [""]


def _subgroup_section(sub: dict) -> list[str]:
    out = ["## Subgroups", ""]
    if not sub["available"]:
        return out + [f"Not computed: {sub['reason']}.", ""]
    size = sub.get("min_group_size", {"positives": 0, "negatives": 0})
    out += [
        f"By sex, view position and age ({sub['age_bins']}). Gap: {sub['gap']}. CIs: "
        "patient bootstrap, the same resamples for every group. A finding's AUC enters a gap "
        f"only where its group holds at least {size['positives']} positives and "
        f"{size['negatives']} negatives of it; smaller ones are marked * and a group with "
        "no such finding is marked (small).",
        "",
    ]
    w = sub["worst_gap"]
    if not w:
        out += ["Largest mean-AUC gap: n/a (no attribute has two groups large enough).", ""]
    if w:
        out += [
            f"Largest mean-AUC gap: **{w['attribute']}** {w['high']} − {w['low']} = "
            f"{signed(w['gap'], 4)} 95% CI {fmt_ci(w['ci'])} (over {plural(w['n_findings'], 'finding')}).",
            "",
        ]
    for attr, d in sub["attributes"].items():
        groups = d["groups"]
        out += [f"### {attr}", ""]
        rows = [
            [
                g + (" (small)" if x.get("small") else ""),
                str(x["n_images"]),
                str(x["n_patients"]),
                fmt(x["mean_auc"], 4),
                fmt_ci(x["mean_auc_ci"]),
                str(x["n_findings_in_mean"]),
            ]
            for g, x in groups.items()
        ]
        out += table_lines(["group", "images", "patients", "mean AUC", "95% CI", "findings in mean"], rows)
        gap = d["mean_auc_gap"]
        out += [
            "",
            "Mean-AUC gap: n/a (fewer than two groups large enough)."
            if gap is None
            else f"Mean-AUC gap {gap['high']} − {gap['low']}: {signed(gap['gap'], 4)} 95% CI "
            f"{fmt_ci(gap['ci'])} (over {plural(gap['n_findings'], 'finding')}).",
        ]
        if d["n_unassigned"]:
            out.append(f"{d['n_unassigned']} image(s) fall in none of these groups.")
        out.append("")
        rows, reasons = [], []
        for f in FINDINGS:
            row = [f]
            for g, x in groups.items():
                e = x["findings"][f]
                row.append(f"{fmt(e['auc'])}{'*' if e.get('small') else ''} ({e['n_positive']})")
                if e["reason"]:
                    reasons.append(f"{f}, {g}: {e['reason']}")
            gp = d["finding_gaps"][f]
            row.append(NA if gp is None else f"{signed(gp['gap'])} {fmt_ci(gp['ci'])}")
            rows.append(row)
        out += table_lines(["finding", *(f"{g} AUC (positives)" for g in groups), "gap (high − low)"], rows)
        out.append("")
        if reasons:
            out += ["n/a: " + "; ".join(reasons) + ".", ""]
    return out


def _adjudicated_section(adj: dict) -> list[str]:
    out = section(
        "Radiologist-adjudicated labels",
        f"Labels: `{md_cell(adj['labels'])}` (Majkowska et al., Radiology 2019). Scored "
        f"on the {adj['n_scored']} images that both the predictions and the file cover; "
        f"{adj['n_left_out']} of {adj['n_predictions']} predictions were left out. "
        f"Text-mined labels: {adj['text_mined_source']}.",
        "Mapping of model outputs: "
        + "; ".join(f"{k} ← {v if v else 'none (n/a)'}" for k, v in adj["mapping"].items())
        + ".",
    )
    sets = adj["sets"]
    header = ["finding"]
    for name, s in sets.items():
        header += [f"{name} adjudicated ({s['n_images']} img)", f"{name} text-mined"]
    rows = []
    for f in adj["mapping"]:
        row = [f]
        for s in sets.values():
            for kind in ("adjudicated", "text_mined"):
                e = s[kind][f]
                row.append(NA if e["auc"] is None else f"{fmt(e['auc'])} {fmt_ci(e['auc_ci'])} ({e['n_positive']}+)")
        rows.append(row)
    out += table_lines(header, rows) + [""]
    reasons = {
        f"{f}: {e['reason']}"
        for s in sets.values()
        for k in ("adjudicated", "text_mined")
        for f, e in s[k].items()
        if e["reason"]
    }
    if reasons:
        out += ["n/a: " + "; ".join(sorted(reasons)) + ".", ""]
    return out
