"""Checkpoints through orbax: train state, grain iterator position and loop metadata
in one step directory; the last k are kept, plus the best by validation mean AUC."""

from __future__ import annotations

import math
from pathlib import Path

import grain.python as grain
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

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
    policy = policies.AnyPreservationPolicy(
        [policies.LatestN(n=keep), policies.BestN(get_metric_fn=_best_metric, n=1)]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=True, create=True
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
