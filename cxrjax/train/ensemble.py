"""The configs of N ensemble members trained from one command (`cxrjax.experiment`
trains each in its own workdir and averages their test predictions)."""

from __future__ import annotations

import shlex

from cxrjax.config import OverrideError, apply_overrides
from cxrjax.train.config_check import ConfigError


def member_overrides(text: str) -> list[list[str]]:
    """`ensemble.overrides` as one list of `--config.FIELD=VALUE` words per member: members
    are separated by ';', and each member's overrides are written as on the command line
    (split like a shell does, so a quoted value may hold a space or a ';')."""
    if not text:
        return []
    words = shlex.shlex(text, posix=True, punctuation_chars=";")
    words.whitespace_split = True
    members: list[list[str]] = [[]]
    for word in words:
        if set(word) == {";"}:
            members += [[] for _ in word]  # ';;' ends two members
        else:
            members[-1].append(word)
    return members


def member_configs(config) -> list:
    """One config per member: seed + i, plus that member's overrides, parsed by the same
    loader as the command line's (`cxrjax.config.apply_overrides`)."""
    n = config.ensemble.members
    try:
        overrides = member_overrides(config.ensemble.overrides)
    except ValueError as e:  # shlex: an unclosed quote
        raise ConfigError(f"ensemble.overrides={config.ensemble.overrides!r}: {e}") from None
    if overrides and len(overrides) != n:
        raise ConfigError(f"ensemble.overrides has {len(overrides)} ';'-separated entries for {n} members")
    members = []
    for i in range(n):
        member = config.copy_and_resolve_references()
        member.seed = config.seed + i
        member.ensemble.members = 1
        member.ensemble.overrides = ""
        if overrides and overrides[i]:
            try:
                member = apply_overrides(member, overrides[i])
            except OverrideError as e:
                raise ConfigError(f"ensemble.overrides, member {i}: {e}") from None
        members.append(member)
    return members
