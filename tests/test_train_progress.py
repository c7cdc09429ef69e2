"""The trainer's progress: bars that count finished steps, metrics averaged over their log
window, a training row every epoch, bars for evaluation passes, a line before compiles.
No trainer runs here: the loop's pieces are driven directly."""

import logging

import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.train import progress as progress_module
from cxrjax.train.progress import EpochProgress, MetricWindow, PassBar, before_compile


def _metrics(loss, nonfinite=0.0):
    return {"loss": jnp.float32(loss), "grad_norm": jnp.float32(2 * loss), "nonfinite_state": jnp.float32(nonfinite)}


def test_window_means_and_the_worst_nonfinite_count():
    window = MetricWindow()
    for loss, bad in ((1.0, 0), (2.0, 3), (6.0, 0)):
        window.add(_metrics(loss, bad))
    values = window.take()
    assert values["loss"] == pytest.approx(3.0) and values["grad_norm"] == pytest.approx(6.0)
    assert values["nonfinite_state"] == 3 and values["steps_in_window"] == 3
    assert window.take() is None  # reset


def _run_epoch(progress, losses, start=0):
    rows = []
    for i, loss in enumerate(losses, start + 1):
        values = progress.step_done(i, _metrics(loss))
        if values is not None:
            rows.append((i - 1, values))
    return rows


def test_rows_are_window_means_read_one_step_late_and_every_epoch_logs(monkeypatch):
    """Issue 21: single steps were logged, and with log_every_steps (50) above the 30 steps
    of an epoch no training loss was logged at all."""
    reads = []
    real_get = progress_module.jax.device_get
    monkeypatch.setattr(progress_module.jax, "device_get", lambda x: reads.append(1) or real_get(x))
    losses = [float(v) for v in range(1, 9)]  # 8 steps per epoch
    p = EpochProgress(0, 1, 8, 0, 3, global_batch=4)
    rows = _run_epoch(p, losses)
    # Log steps 3 and 6 read steps 1-2 and 3-5 (one step late); 8 is the epoch's end.
    assert [(s, r["steps_in_window"], r["loss"]) for s, r in rows] == [(2, 2, 1.5), (5, 3, 4.0)]
    assert len(reads) == 2  # no host read between log points
    last = p.end(_metrics(losses[-1]))
    assert last["steps_in_window"] == 3 and last["loss"] == pytest.approx(np.mean([6, 7, 8]))
    assert rows[0][1]["images_per_s"] > 0

    long = EpochProgress(0, 1, 8, 0, 50, global_batch=4)
    assert _run_epoch(long, losses) == []
    row = long.end(_metrics(losses[-1]))
    assert row["steps_in_window"] == 8 and row["loss"] == pytest.approx(np.mean(losses))


def test_the_bar_counts_finished_steps_and_ends_only_when_the_epoch_has():
    """Issue 21: the bar read 30/30 at 6.29 step/s while the device still had the epoch queued."""
    finished = set()
    p = EpochProgress(0, 2, 5, 0, 100, global_batch=2)
    p.ready = lambda array: float(array) in finished
    for i in range(1, 6):
        p.step_done(i, _metrics(float(i)))
    assert p.finished == 0  # dispatched, none finished
    finished.update({1.0, 2.0})
    p._count_finished()  # as at the next step
    assert p.finished == 2
    p.end(_metrics(5.0))  # the loop waited for step 5
    assert p.finished == 5


def test_a_resumed_epoch_starts_its_bar_where_it_stopped():
    p = EpochProgress(1, 3, 5, 7, 100, global_batch=2)
    assert p.end_step == 10 and p.finished == 2 and p.desc == "epoch 2/3"
    rows = _run_epoch(p, [1.0, 2.0, 3.0], start=7)
    assert rows == [] and p.end(_metrics(3.0))["steps_in_window"] == 3


def test_pass_bar_has_one_tick_per_batch():
    bar = PassBar(records=17, batch_per_process=4, desc="val pass")
    assert bar.bar.total == 5
    bar.close()


def test_a_line_before_each_first_compile(caplog):
    progress_module._announced.discard("test step")
    with caplog.at_level(logging.INFO, logger="cxrjax.train.progress"):
        before_compile("test step", "32 px")
        before_compile("test step", "32 px")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("compiling the test step (32 px): the first call waits for XLA")
