"""Train N ensemble members from one command, each in its own workdir, and average
their test predictions."""

from __future__ import annotations

import json
from pathlib import Path

from cxrjax.train.loop import train


def member_configs(config) -> list:
    """One config per member: seed + i, plus that member's ';'-separated overrides."""
    n = config.ensemble.members
    overrides = [o for o in config.ensemble.overrides.split(";")] if config.ensemble.overrides else []
    if overrides and len(overrides) != n:
        raise ValueError(f"ensemble.overrides has {len(overrides)} entries for {n} members")
    members = []
    for i in range(n):
        member = config.copy_and_resolve_references()
        member.seed = config.seed + i
        member.ensemble.members = 1
        member.ensemble.overrides = ""
        for assignment in (overrides[i].split(",") if overrides and overrides[i] else []):
            field, _, value = assignment.partition("=")
            node = member
            *parents, leaf = field.strip().split(".")
            for name in parents:
                node = node[name]
            # Parse through the field's own type: "1e-3" becomes a float for a float field.
            node[leaf] = type(node[leaf])(json.loads(value)) if not isinstance(node[leaf], str) else value
        members.append(member)
    return members


def train_members(config, workdir: str | Path) -> dict:
    workdir = Path(workdir)
    if config.ensemble.members <= 1:
        return train(config, workdir)
    from cxrjax.eval.ensemble import ensemble_files

    summaries = []
    for i, member in enumerate(member_configs(config)):
        summaries.append(train(member, workdir / f"member_{i}"))
        if "stopped" in summaries[-1]:  # a signal: the rerun resumes this member, then the rest
            return {"members": summaries, "stopped": summaries[-1]["stopped"]}
    preds = [workdir / f"member_{i}" / "test" / "predictions.csv" for i in range(len(summaries))]
    if all(p.exists() for p in preds):
        ensemble_files(preds, workdir / "ensemble_predictions.csv")
    return {"members": summaries, "ensemble_predictions": str(workdir / "ensemble_predictions.csv")}
