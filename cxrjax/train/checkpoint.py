"""Checkpoints through orbax: train state, grain iterator position and loop metadata
in one step directory; the last k are kept, plus the best by validation mean AUC.

Each committed step gets a checksum file (every file's size and sha256), written once
orbax has finished it, and checked before the step is restored: a damaged newest step
is moved to WORKDIR/damaged_checkpoints/ with a warning and the previous step is used.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import grain.python as grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from cxrjax.data.prepare import sha256_of
from cxrjax.errors import InputError
from cxrjax.jsonfile import read_json
from cxrjax.models.weights import save_weights

logger = logging.getLogger(__name__)

BEST_METRIC = "val_mean_auc"
SUMS = "cxrjax_sha256.json"  # in each step directory, beside orbax's files
DAMAGED = "damaged_checkpoints"  # beside checkpoints/: steps that failed their check


class CheckpointError(InputError):
    """No checkpoint of the run can be restored (each one found is damaged)."""


def _files(step_dir: Path) -> list[str]:
    return sorted(
        str(p.relative_to(step_dir))
        for p in step_dir.rglob("*")
        if p.is_file() and p.name not in (SUMS, f".{SUMS}.tmp")
    )


def write_sums(directory: Path, steps) -> None:
    """The checksum file of each committed step that lacks one (process 0 only)."""
    if jax.process_index() != 0:
        return
    for step in steps:
        step_dir = Path(directory) / str(step)
        if (step_dir / SUMS).exists():
            continue
        try:
            sums = {name: [(step_dir / name).stat().st_size, sha256_of(step_dir / name)] for name in _files(step_dir)}
            tmp = step_dir / f".{SUMS}.tmp"
            tmp.write_text(json.dumps(sums))
            os.replace(tmp, step_dir / SUMS)
        except FileNotFoundError:  # deleted meanwhile by the keep-k policy
            continue


def verify(step_dir: Path) -> str | None:
    """What is wrong with a step's files (missing, resized, changed), or None when they
    are as written. A step without a checksum file (an older cxrjax, or a kill between
    commit and checksum) is not checked here."""
    step_dir = Path(step_dir)
    if not (step_dir / SUMS).exists():
        return None
    try:
        sums = read_json(step_dir / SUMS, CheckpointError)
    except CheckpointError as e:
        return f"its checksum file {SUMS} is unreadable ({e})"
    for name, (size, digest) in sums.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{name} is {actual} bytes, was {size} when saved"
        if sha256_of(path) != digest:
            return f"{name} differs from what was saved (sha256)"
    return None


class _Manager(ocp.CheckpointManager):
    """Writes the checksums of finished steps whenever it waits for its saves (orbax
    waits for the previous save at each save, and at close)."""

    def wait_until_finished(self):
        super().wait_until_finished()
        write_sums(self.directory, self.all_steps())


class _FrozenIterator:
    """The iterator position at save time; orbax may write it after training moved on."""

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


def _best_metric(metrics) -> float:
    value = metrics.get(BEST_METRIC)
    return float("-inf") if value is None or math.isnan(value) else float(value)


def make_manager(directory: str | Path, keep: int) -> ocp.CheckpointManager:
    """Keeps the latest `keep` steps and the best epoch-end step.

    `best_fn` must be set for orbax to store the metrics at all and for `best_step`
    to rank by them; without it `best_step` is simply the latest step. Mid-epoch
    checkpoints carry no metrics and age out through LatestN like the others.
    """
    policy = policies.AnyPreservationPolicy(
        [
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        best_fn=_best_metric,
        best_mode="max",
        enable_async_checkpointing=True,
        create=True,
        cleanup_tmp_directories=True,  # a save cut short by SIGKILL leaves one behind
    )
    return _Manager(
        Path(directory).absolute(),
        item_names=("state", "data", "meta"),
        options=options,
    )


def save(manager, step: int, state, data_iterator, meta: dict, metrics: dict | None = None) -> None:
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.PyGrainCheckpointSave(_FrozenIterator(data_iterator.get_state())),
            meta=ocp.args.JsonSave(meta),
        ),
        metrics=metrics,
        force=True,
    )


def restore(manager, step: int, abstract_state, data_iterator):
    """(state, meta); the iterator is repositioned in place."""
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.PyGrainCheckpointRestore(data_iterator),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return restored.state, restored.meta


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _move_aside(manager, step: int) -> Path:
    directory = Path(manager.directory)
    aside = directory.parent / DAMAGED / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
        aside.parent.mkdir(exist_ok=True)
        shutil.move(directory / str(step), aside)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"cxrjax: checkpoint {step} moved aside")
    manager.reload()
    return aside


def restore_latest(manager, abstract_state, data_iterator):
    """(state, meta) of the newest step whose files check out, or None without steps.
    A damaged step (checksum mismatch, or unverified and unreadable) is moved aside with
    a warning; a checked step that fails to restore is a bug and raises as it is."""
    directory = Path(manager.directory)
    problems = []
    for step in sorted(manager.all_steps(), reverse=True):
        step_dir = directory / str(step)
        bad = verify(step_dir)
        if bad is None:
            try:
                return restore(manager, step, abstract_state, data_iterator)
            except Exception as e:  # noqa: BLE001 (any read error of an unchecked step)
                if (step_dir / SUMS).exists():
                    raise
                bad = f"it has no checksum and cannot be read ({_first_line(e)})"
        aside = _move_aside(manager, step)
        problems.append(f"step {step}: {bad}")
        logger.warning(f"checkpoint step {step} is damaged: {bad}; moved to {aside}; trying the step before")
    if problems:
        raise CheckpointError(
            f"{directory}: no checkpoint can be restored ({'; '.join(problems)}; moved to "
            f"{directory.parent / DAMAGED}); rerun to train from the start, or restore the files"
        )
    return None


def restore_state(directory: str | Path, step: int, abstract_state):
    """Only the train state of one step (for evaluation from a checkpoint), checked first."""
    bad = verify(Path(directory) / str(step))
    if bad is not None:
        raise CheckpointError(f"{Path(directory) / str(step)}: checkpoint damaged: {bad}")
    with ocp.CheckpointManager(Path(directory).absolute(), item_names=("state",)) as manager:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state


def export_weights(path: str | Path, variables, model_cfg) -> None:
    """The weights artifact of the best checkpoint; an earlier export (a previous best,
    or one cut short) is replaced."""
    shutil.rmtree(Path(path).absolute(), ignore_errors=True)
    save_weights(path, variables, model_cfg)
