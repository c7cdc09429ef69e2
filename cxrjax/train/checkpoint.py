"""Checkpoints through orbax: train state, grain iterator position and loop metadata
in one step directory; the last k are kept, plus the best by validation mean AUC."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import grain.python as grain
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from cxrjax.models.weights import save_weights

BEST_METRIC = "val_mean_auc"


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
    return ocp.CheckpointManager(
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


def restore_state(directory: str | Path, step: int, abstract_state):
    """Only the train state of one step (for evaluation from a checkpoint)."""
    with ocp.CheckpointManager(Path(directory).absolute(), item_names=("state",)) as manager:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state


def export_weights(path: str | Path, variables, model_cfg) -> None:
    """The weights artifact of the best checkpoint; an earlier export (a previous best,
    or one cut short) is replaced."""
    shutil.rmtree(Path(path).absolute(), ignore_errors=True)
    save_weights(path, variables, model_cfg)
