"""What a rerun into an existing workdir may change.

A workdir's config.json records what its run was trained with. A rerun with a config
that differs in a field defining the model, the data or the results is refused, before
anything in the workdir is written; the fields in `MAY_CHANGE` (how long to train,
logging and checkpoint cadence, where the processes meet) may differ, and each change is
appended to WORKDIR/config_history.jsonl instead of rewriting config.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cxrjax.errors import InputError
from cxrjax.jsonfile import parse_json
from cxrjax.workdir import CONFIG_HISTORY, DONE, RUN_CONFIG, read_run_config, write_run_config

# Field paths, or prefixes ending in ".", that a resumed run may change (docs/training.md).
MAY_CHANGE = (
    "epochs",
    "early_stopping_patience",
    "log_every_steps",
    "checkpoint.",
    "eval.batch_size",
    "eval.test",
    "model.remat",
    "model.remat_policy",
    "wandb.",
    "distributed.",
    "ensemble.",
)
# Paths the run reads; compared, and recorded, resolved (cxrjax.train.resume.absolute_paths).
PATHS = ("data.prepared", "model.init_from")


class ConfigMismatchError(InputError):
    """A rerun into a workdir asks for a config its run was not trained with."""


def flat(tree: dict, prefix: str = "") -> dict:
    """{'data.image_size': 224, ...} of a nested config dict."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def absolute_paths(config):
    """A copy of `config` with its input paths resolved (symlinks, relative parts), so the
    same data named another way resumes, and the record names what was read."""
    config = config.copy_and_resolve_references()
    for field in PATHS:
        section, name = field.split(".")
        value = config[section][name]
        if value:
            config[section][name] = str(Path(value).resolve())
    return config


def finished(changed: dict, workdir: Path) -> None:
    """A finished run (done.json) is returned as it is; a longer training asked of it is
    refused with how to get it, rather than silently ignored."""
    old, new = changed.get("epochs", (0, 0))
    if new > old:
        longer = {"epochs": (old, new)}
        raise ConfigMismatchError(
            f"{Path(workdir) / DONE}: this run is finished; {describe(longer)} would train on, which a finished "
            f"run does not do: delete {Path(workdir) / DONE} to train on from its last checkpoint (the final test "
            "evaluation then runs again), or start a new run with another --workdir"
        )


def config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


def may_change(field: str, recorded: dict) -> bool:
    """Whether `field` may differ on resume; epochs may not under a cosine schedule,
    which decays over the total number of steps."""
    if field == "epochs" and recorded.get("optim.schedule") == "cosine":
        return False
    return any(field == f or (f.endswith(".") and field.startswith(f)) for f in MAY_CHANGE)


def recorded_config(workdir: Path) -> dict | None:
    """The run's effective config, flat: config.json with the history's changes applied;
    None for a workdir no run has started in."""
    if not (Path(workdir) / RUN_CONFIG).is_file():
        return None
    recorded = flat(read_run_config(workdir).to_dict())
    for entry in read_history(workdir):
        recorded.update({field: new for field, (_, new) in entry["changes"].items()})
    return recorded


def read_history(workdir: Path) -> list[dict]:
    path = Path(workdir) / CONFIG_HISTORY
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        rows.append(parse_json(line, f"{path}, line {n}", ConfigMismatchError))
    return rows


def _process_index() -> int:
    import jax

    return jax.process_index()


def _normalized(field: str, value):
    """Paths compared by what they name: a relative path or a symlink to the same folder is the same."""
    if field in PATHS and isinstance(value, str) and value:
        return str(Path(value).resolve())
    return value


def _same(field: str, old, new) -> bool:
    old, new = _normalized(field, old), _normalized(field, new)
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool):
        return float(old) == float(new)
    return old == new


def changes(config, workdir: Path) -> dict:
    """{field: (old, new)} of the fields that may change and did; raises
    ConfigMismatchError naming every field that may not. A field the record lacks (an
    older cxrjax) is not compared."""
    recorded = recorded_config(workdir)
    if recorded is None:
        return {}
    wanted = flat(config_dict(config))
    if _process_index() > 0:  # the record names process 0's folders; each node may keep its own copy
        wanted = {k: v for k, v in wanted.items() if k not in PATHS}
    diff = {k: (recorded[k], v) for k, v in wanted.items() if k in recorded and not _same(k, recorded[k], v)}
    refused = {k: d for k, d in diff.items() if not may_change(k, recorded)}
    if refused:
        raise ConfigMismatchError(
            f"{Path(workdir) / RUN_CONFIG}: this run was trained with another config ({describe(refused)}); these fields "
            "define the model, the data or the results and cannot change on resume: rerun with the recorded "
            "values, or start a new run with another --workdir"
        )
    return {k: d for k, d in diff.items() if k not in refused}


def record(workdir: Path, config, changed: dict) -> None:
    """Write config.json for a new run, or append a resume's changes to the history."""
    workdir = Path(workdir)
    if not (workdir / RUN_CONFIG).is_file():
        write_run_config(workdir, config)
        return
    if changed:
        entry = {"time": round(time.time(), 3), "changes": {k: list(d) for k, d in changed.items()}}
        with open(workdir / CONFIG_HISTORY, "a") as f:
            f.write(json.dumps(entry) + "\n")


def describe(changed: dict) -> str:
    return ", ".join(f"{k} {json.dumps(old)} -> {json.dumps(new)}" for k, (old, new) in changed.items())
