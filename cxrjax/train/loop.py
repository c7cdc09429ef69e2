"""The training loop around the pure jitted step (`step.py`): one flat loop over global
batches, with "is it time" predicates to log, to validate at an epoch's end and to
checkpoint; signals (`signals.py`) stop it at a step boundary; the best checkpoint then
predicts the test part (`evaluation.py`). What the loop holds is set up in `setup.py`.

Inside an epoch the loop does not wait for the device: its batches are on the devices
before their step (`mesh.DeviceBatches`), and metrics are summed on the device and read
only at log steps, one step late (`progress.py`). Each step runs under a transfer guard
that makes this a checked fact: no implicit copy either way, and on a step that is no log
step no copy from the device at all, so a read that would wait raises instead.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import jax
import numpy as np

from cxrjax.mesh import replicated
from cxrjax.train import checkpoint
from cxrjax.train.divergence import check_finite
from cxrjax.train.evaluation import EvaluationStopped, finish, validate
from cxrjax.train.progress import EpochProgress, before_compile
from cxrjax.train.setup import Run, setup
from cxrjax.train.signals import StopFlag

logger = logging.getLogger(__name__)


def itstime(step: int, every: int) -> bool:
    """Whether `step` is a multiple of `every` (never, when `every` is 0): big_vision's
    `u.itstime`."""
    return bool(every) and step % every == 0


def train(config, workdir: str | Path) -> dict:
    """Train (or resume) in `workdir`, after the caller joined the cluster
    (`experiment.train_and_test`). Returns {"stopped", "step"} when a signal stopped it;
    else the summary of the best checkpoint (exported to best_weights), holding, when
    `config.eval.test`, its "predictions" of the test and val parts (`evaluation.finish`)."""
    # From here on a SIGTERM during start-up (compiling, restoring) also ends cleanly;
    # several processes release it before the final evaluation, which has no step to stop at.
    with StopFlag() as stop:
        run, state, meta = setup(config, Path(workdir).absolute(), stop)
        try:
            state, step, stopped = _loop(run, state, meta)
        finally:
            run.manager.wait_until_finished()
            run.log.close()
        try:
            if stopped:
                return _stopped(run, state, step)
            if jax.process_count() > 1:
                stop.release()
            return finish(run, state)
        except EvaluationStopped:
            logger.info(
                f"{stop.signal} received during the final evaluation: every checkpoint is saved; "
                "rerun the same command to evaluate again"
            )
            return {"stopped": f"{stop.signal} received during the final evaluation", "step": step}
        finally:
            run.manager.close()


def _loop(run: Run, state, meta: dict) -> tuple:
    """(state, step, stopped): the steps from the restored one to the last, or to a stop."""
    cfg, first = run.config, int(state.step)
    step = first
    # A signal during start-up: stop before the first step; the last checkpoint stands.
    if run.stop.requested(step, log_step=True):
        return state, step, True
    if meta.get("validation_pending"):  # a stop came before this epoch's validation
        state, stopped = _end_epoch(run, state, step)
        if stopped:
            return state, step, True
    if run.early.stopped:
        return state, step, False
    progress = None
    for step, batch in zip(range(first + 1, run.total_steps + 1), run.batches):
        progress = progress or _epoch_progress(run, step - 1)
        log_step = itstime(step, cfg.log_every_steps)
        before_compile("training step", f"{cfg.data.image_size} px, global batch {cfg.global_batch_size}")
        with _no_waiting(log_step):
            state, metrics = run.train_step(state, batch)
            values = progress.step_done(step, metrics)
        if values is not None:  # the window up to the step before, every log_every_steps
            _log_train(run, step - 1, values)
        if run.stop.requested(step, log_step):
            progress.close()
            # At an epoch's last step its validation has not run: the resumed run runs it first.
            _save(run, state, step, metrics, validation_pending=itstime(step, run.steps_per_epoch))
            return state, step, True
        if itstime(step, run.steps_per_epoch):
            check_finite(_host(metrics), step, run.workdir)
            _log_train(run, step, progress.end(metrics))  # every epoch logs its training metrics
            progress = None
            state, stopped = _end_epoch(run, state, step)
            if stopped or run.early.stopped:
                return state, step, stopped
        elif (asked := run.stop.checkpoint_requested(log_step)) or itstime(step, cfg.checkpoint.every_steps):
            _save(run, state, step, metrics)
            if asked and jax.process_index() == 0:
                logger.info(f"SIGUSR1 (rebalance recommendation): checkpoint saved at step {step}; training goes on")
    return state, step, False


@contextlib.contextmanager
def _no_waiting(log_step: bool):
    """The guard of a step inside an epoch (see the module's docstring)."""
    with (
        jax.transfer_guard_host_to_device("disallow"),
        jax.transfer_guard_device_to_host("disallow" if log_step else "disallow_explicit"),
    ):
        yield


def _epoch_progress(run: Run, done: int) -> EpochProgress:
    cfg = run.config
    epoch = done // run.steps_per_epoch
    return EpochProgress(epoch, cfg.epochs, run.steps_per_epoch, done, cfg.log_every_steps, cfg.global_batch_size)


def _end_epoch(run: Run, state, step: int) -> tuple:
    """Validate the epoch that ended at `step` and checkpoint it with its metrics; returns
    (state, stopped). A stop during validation keeps the epoch's training, and marks its
    validation to run first on resume."""
    try:
        val = validate(run, state)
    except EvaluationStopped:
        run.stop.reason = f"{run.stop.signal} received during validation"
        if run.manager.latest_step() != step:
            _save(run, state, step, validation_pending=True)
        return state, True
    if run.config.optim.schedule == "plateau":
        scale = np.float32(run.plateau.update(val["val_loss"]))
        state = state.replace(lr_scale=jax.device_put(scale, replicated(run.mesh)))
    run.early.update(val["val_mean_auc"], step)
    val.update(epoch=step // run.steps_per_epoch, lr_scale=run.plateau.scale)
    run.log.write(step, "val", val)
    if run.manager.latest_step() == step:  # saved without metrics when a stop cut this validation short
        run.manager.wait_until_finished()
        run.manager.delete(step)
    _save(run, state, step, checkpoint_metrics={"val_mean_auc": val["val_mean_auc"]})
    if jax.process_index() == 0:
        logger.info(f"epoch {val['epoch']}: val loss {val['val_loss']:.4f}, val mean AUC {val['val_mean_auc']:.4f}")
        if run.early.stopped:
            logger.info(f"early stopping: no better val mean AUC for {run.early.patience} epochs")
    return state, False


def _save(run: Run, state, step: int, metrics=None, *, validation_pending=False, checkpoint_metrics=None) -> None:
    """Checkpoint `state` at `step`, once the step's `metrics` (when given) are finite."""
    if metrics is not None:
        check_finite(_host(metrics), step, run.workdir)
    meta = {"plateau": vars(run.plateau), "early": vars(run.early), "validation_pending": validation_pending}
    checkpoint.save(run.manager, step, state, run.batches, meta, checkpoint_metrics)


def _log_train(run: Run, step: int, values: dict) -> None:
    check_finite(values, step, run.workdir)
    values["lr"] = float(run.schedule(step // run.config.optim.grad_accum_steps)) * run.plateau.scale
    run.log.write(step, "train", values)


def _stopped(run: Run, state, step: int) -> dict:
    if run.manager.latest_step() != step:  # stopped during start-up: keep that state too
        _save(run, state, step)
        run.manager.wait_until_finished()
    if jax.process_index() == 0 or run.stop.signal:
        logger.info(f"{run.stop.reason}: checkpoint saved at step {step}; rerun the same command to resume")
    return {"stopped": run.stop.reason, "step": step}


def _host(metrics) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}
