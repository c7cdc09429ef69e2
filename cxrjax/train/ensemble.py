"""The configs of N ensemble members trained from one command (`cxrjax.experiment`
trains each in its own workdir and averages their test predictions)."""

from __future__ import annotations

import difflib
import json

from cxrjax.train.config_check import ConfigError
from cxrjax.train.resume import config_dict, flat


def member_configs(config) -> list:
    """One config per member: seed + i, plus that member's ';'-separated overrides."""
    n = config.ensemble.members
    overrides = [o for o in config.ensemble.overrides.split(";")] if config.ensemble.overrides else []
    if overrides and len(overrides) != n:
        raise ConfigError(f"ensemble.overrides has {len(overrides)} ';'-separated entries for {n} members")
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
            try:
                for name in parents:
                    node = node[name]
                node[leaf]
            except (KeyError, TypeError, AttributeError):
                close = difflib.get_close_matches(field.strip(), list(flat(config_dict(config))), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    f"ensemble.overrides, member {i}: {assignment!r}: no field {field.strip()!r}{hint}"
                ) from None
            # Parse through the field's own type: "1e-3" becomes a float for a float field.
            try:
                node[leaf] = type(node[leaf])(json.loads(value)) if not isinstance(node[leaf], str) else value
            except (ValueError, TypeError):
                kind = type(node[leaf]).__name__
                raise ConfigError(
                    f"ensemble.overrides, member {i}: {assignment!r}: {value!r} is not a {kind}"
                ) from None
        members.append(member)
    return members
