"""The configs of N ensemble members trained from one command (`cxrjax.experiment`
trains each in its own workdir and averages their test predictions)."""

from __future__ import annotations

import json


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
        for assignment in overrides[i].split(",") if overrides and overrides[i] else []:
            field, _, value = assignment.partition("=")
            node = member
            *parents, leaf = field.strip().split(".")
            for name in parents:
                node = node[name]
            # Parse through the field's own type: "1e-3" becomes a float for a float field.
            node[leaf] = type(node[leaf])(json.loads(value)) if not isinstance(node[leaf], str) else value
        members.append(member)
    return members
