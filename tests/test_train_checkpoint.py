"""Checkpoints are checked before they are restored: a flipped byte, a truncated or a
deleted file in the newest step moves that step aside with a warning and resumes from
the step before; with no good step left the error is one line. In-process, on a small
state (no training)."""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.train import checkpoint


class _Iterator:
    """The part of a grain iterator a checkpoint saves and restores."""

    def __init__(self, position: int = 0):
        self.position = position

    def get_state(self) -> bytes:
        return json.dumps({"position": self.position}).encode()

    def set_state(self, state: bytes) -> None:
        self.position = json.loads(state)["position"]

    def start_prefetch(self) -> None:
        pass


def _state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32), "step": jnp.asarray(step)}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _saved(tmp_path, steps=(2, 4), sums=True):
    manager = checkpoint.make_manager(tmp_path / "checkpoints", keep=3)
    for step in steps:
        checkpoint.save(manager, step, _state(step), _Iterator(step * 10), {"step": step})
    manager.wait_until_finished()
    if not sums:
        for step in steps:
            (tmp_path / "checkpoints" / str(step) / checkpoint.SUMS).unlink()
    return manager


def _largest(step_dir):
    return max(
        (p for p in step_dir.rglob("*") if p.is_file() and p.name != checkpoint.SUMS), key=lambda p: p.stat().st_size
    )


def _restore(manager):
    iterator = _Iterator()
    restored = checkpoint.restore_latest(manager, _abstract(_state(0)), iterator)
    return restored, iterator


def test_every_committed_step_has_its_checksums_and_restores_as_saved(tmp_path):
    manager = _saved(tmp_path)
    for step in (2, 4):
        assert checkpoint.verify(tmp_path / "checkpoints" / str(step)) is None
        assert (tmp_path / "checkpoints" / str(step) / checkpoint.SUMS).is_file()
    (state, meta), iterator = _restore(manager)
    assert int(state["step"]) == 4 and meta == {"step": 4} and iterator.position == 40
    np.testing.assert_array_equal(state["w"], _state(4)["w"])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_flip, _truncate, lambda p: p.unlink()], ids=["flipped", "truncated", "deleted"])
def test_a_damaged_newest_step_falls_back_to_the_step_before(tmp_path, damage, caplog):
    manager = _saved(tmp_path)
    damaged = _largest(tmp_path / "checkpoints" / "4")
    damage(damaged)
    with caplog.at_level(logging.WARNING, logger="cxrjax"):
        (state, meta), iterator = _restore(manager)
    assert int(state["step"]) == 2 and meta == {"step": 2} and iterator.position == 20
    np.testing.assert_array_equal(state["w"], _state(2)["w"])
    (warning,) = [
        r.getMessage() for r in caplog.records if r.name.startswith("cxrjax") and r.levelno == logging.WARNING
    ]
    assert (
        warning.startswith("checkpoint step 4 is damaged: ")
        and str(damaged.relative_to(tmp_path / "checkpoints" / "4")) in warning
    )
    assert manager.all_steps() == [2] and not (tmp_path / "checkpoints" / "4").exists()
    (aside,) = (tmp_path / checkpoint.DAMAGED).iterdir()
    assert aside.name.startswith("4-")
    # Training goes on from step 2 and may save step 4 again.
    checkpoint.save(manager, 4, _state(4), _Iterator(40), {"step": 4})
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 4]


def test_no_good_step_is_one_line(tmp_path):
    manager = _saved(tmp_path)
    for step in (2, 4):
        _flip(_largest(tmp_path / "checkpoints" / str(step)))
    with pytest.raises(checkpoint.CheckpointError) as e:
        _restore(manager)
    message = str(e.value)
    assert "\n" not in message and "no checkpoint can be restored" in message
    assert "step 4: " in message and "step 2: " in message


def test_an_unverified_step_that_cannot_be_read_falls_back_without_a_traceback(tmp_path):
    manager = _saved(tmp_path, sums=False)  # e.g. written by an older cxrjax
    (tmp_path / "checkpoints" / "4" / "data" / "process_0-of-1.json").write_text("{")
    (state, _), iterator = _restore(manager)
    assert int(state["step"]) == 2 and iterator.position == 20


def test_the_best_step_is_checked_before_the_final_evaluation(tmp_path):
    _saved(tmp_path)
    _flip(_largest(tmp_path / "checkpoints" / "4"))
    with pytest.raises(checkpoint.CheckpointError, match="4: checkpoint damaged: .* differs"):
        checkpoint.restore_state(tmp_path / "checkpoints", 4, {"state": _abstract(_state(0))})
