"""Markdown report of one evaluation, written from its metrics dict (n/a for undefined)."""

from __future__ import annotations

from pathlib import Path

from cxrjax.findings import FINDINGS

OP_TITLES = {
    "at_0.5": "threshold 0.5",
    "youden": "Youden-optimal threshold",
    "target_sensitivity": "target-sensitivity threshold",
}


def fmt(value, digits: int = 3) -> str:
    """Numbers for tables; None (undefined) is 'n/a', never a number."""
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def fmt_ci(ci) -> str:
    return "n/a" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def md_cell(text: str) -> str:
    """Text from files (run names, paths) must not break a Markdown table row."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def write_report(path: Path, m: dict, report_texts: dict[str, str]) -> Path:
    boot = m["bootstrap"]
    th = m["thresholds"]
    out = ["# Evaluation report", ""]
    if m.get("run"):
        r = m["run"]
        out += [f"Run **{md_cell(r['name'])}**: split family `{r['split_family']}`, split "
                f"{md_cell(r['split'] or 'n/a')}, {r['px'] or 'n/a'} px, backbone "
                f"{md_cell(r['backbone'] or 'n/a')}.", ""]  # fmt: skip
    for key, value in m["inputs"].items():
        out.append(f"- {key}: `{value}`")
    out += [
        f"- {m['n_images']} images of {m['n_patients']} patients",
        "",
        "## Summary",
        "",
        f"- mean AUC (macro, over {m['n_findings_in_mean']} findings): "
        f"**{fmt(m['mean_auc'], 4)}** 95% CI {fmt_ci(m['mean_auc_ci'])}; "
        f"std across findings {fmt(m['std_auc'])}",
        f"- micro AUC (all image-finding pairs pooled): {fmt(m['micro_auc'], 4)} "
        f"95% CI {fmt_ci(m['micro_auc_ci'])}",
        f"- CIs: {boot['method']} bootstrap over **patients** ({boot['n']} resamples, "
        f"seed {boot['seed']})",
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
        rows.append([f, str(d["n_positive"]), fmt(d["prevalence"], 4), fmt(d["auc"], 4),
                     fmt_ci(d["auc_ci"])])  # fmt: skip
    out += _table(["finding", "positives", "prevalence", "AUC", "95% CI"], rows) + [""]

    for op, title in OP_TITLES.items():
        out += [f"### Operating point: {title}", ""]
        rows = []
        for f in FINDINGS:
            pt = m["findings"][f]["operating_points"][op]
            if pt is None:
                rows.append([f] + ["n/a"] * 8)
                continue
            rows.append([f, fmt(pt["threshold"], 4)] + [
                fmt(pt[k]) for k in ("sensitivity", "specificity", "ppv", "npv", "f1")
            ] + [f"{pt['tp']}/{pt['fp']}", f"{pt['tn']}/{pt['fn']}"])  # fmt: skip
        overall = m["overall"][op]
        if overall:
            for kind in ("macro", "micro"):
                o = overall[kind]
                rows.append([f"*{kind} average*", ""] + [
                    fmt(o[k]) for k in ("sensitivity", "specificity", "ppv", "npv", "f1")
                ] + ["", ""])  # fmt: skip
        header = ["finding", "threshold", "sensitivity", "specificity", "PPV", "NPV", "F1",
                  "TP/FP", "TN/FN"]  # fmt: skip
        out += _table(header, rows)
        out += ["", f"Hamming loss: {fmt(m['hamming_loss'][op], 4)}", ""]
        if report_texts.get(op):
            out += ["<details><summary>scikit-learn classification report</summary>", "",
                    "```", report_texts[op].rstrip(), "```", "", "</details>", ""]  # fmt: skip

    if "comparison" in m:
        c = m["comparison"]
        out += ["## Comparison with another run", "",
                f"Other predictions: `{c['other']}`. Test: {c['method']}.", ""]  # fmt: skip
        rows = []
        for f in FINDINGS:
            d = c["findings"][f]
            if d is None:
                rows.append([f, "n/a", "n/a", "n/a", "n/a"])
            else:
                rows.append([f, fmt(d["auc_a"], 4), fmt(d["auc_b"], 4),
                             f"{d['difference']:+.4f}",
                             "n/a" if d["p_value"] is None else f"{d['p_value']:.3g}"])  # fmt: skip
        out += _table(["finding", "AUC (this)", "AUC (other)", "difference", "p (DeLong)"], rows)
        out.append("")

    out += ["## Figures", ""]
    out += [f"![{name}]({name})" for name in m.get("figures", [])]
    out.append("")
    path.write_text("\n".join(out))
    return path
