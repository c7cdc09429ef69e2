"""One-line summaries of what a command did, for people (the CLI prints them; the dicts
themselves are in done.json, demo.json and the manifest)."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 overlay', '2 overlays'."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def _auc(value) -> str:
    return "undefined" if value is None else f"{value:.4f}"


def train_summary(summary: dict) -> str:
    """What `cxrjax train` ended with: stopped, one run's result, or an ensemble's."""
    if "stopped" in summary:
        where = f" at step {summary['step']}" if "step" in summary else ""
        return f"stopped{where}: {summary['stopped']}; rerun the same command to resume"
    if "members" in summary:
        members = "; ".join(train_summary(m) for m in summary["members"])
        return f"ensemble of {plural(len(summary['members']), 'member')}: {members}; averaged test predictions: {summary['ensemble_predictions']}"
    # done.json of an older run may lack the fields added since: say what it has
    text = f"best step {summary.get('best_step')}"
    setting = []
    if "image_size" in summary:
        setting.append(f"{summary['image_size']} px")
    if "split" in summary:
        setting.append(f"{summary['split']} split")
    if setting:
        text += f" ({', '.join(setting)})"
    if "test_mean_auc" in summary:
        text += f", test mean AUC {_auc(summary['test_mean_auc'])}"
    return text + (f"; weights: {summary['weights']}" if "weights" in summary else "")


def part_counts(parts: dict) -> str:
    """'train 1314, val 150, test 400 images' from a manifest's parts."""
    return ", ".join(f"{name} {v['images']}" for name, v in parts.items()) + " images"
