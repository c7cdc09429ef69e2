"""The training loop around the pure jitted step: data, state, checkpoints, validation,
schedules, early stopping, signals and the final test evaluation.

The loop never waits for the device inside an epoch except every `log_every_steps`,
and then it reads the metrics of the step before, which are already computed.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from cxrjax.auc import roc_auc
from cxrjax.data.normalize import measure_mean_std, stats_for
from cxrjax.data.pipeline import Balance, ShardedRecords, make_loader, training_table
from cxrjax.data.prepare import PreparedDataError, read_manifest
from cxrjax.findings import FINDINGS
from cxrjax.forward import predict_batch, predict_records
from cxrjax.mesh import make_mesh, per_process_batch, replicated, to_global
from cxrjax.models import build_model
from cxrjax.models.weights import load_weights, merge_pretrained
from cxrjax.train import checkpoint, losses, metrics_resume, optim, resume
from cxrjax.train.distributed import maybe_initialize
from cxrjax.train.monitor import MetricsLog
from cxrjax.train.progress import EpochProgress, PassBar, before_compile
from cxrjax.train.state import TrainState
from cxrjax.train.step import make_steps
from cxrjax.workdir import (
    BEST_WEIGHTS,
    CHECKPOINTS,
    CONFIG_HISTORY,
    augment_ranges,
    input_stats,
    save_statistics,
    saved_statistics,
)

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class EvaluationStopped(Exception):
    """A stop request arrived during an evaluation pass, which was abandoned."""


class _StopFlag:
    """SIGTERM/SIGINT ask for a checkpoint and a clean exit at a step boundary.

    One process: a Python handler sets a flag, read after every step. Several processes:
    jax.distributed's preemption service owns SIGTERM (its handler replaces any other)
    and brings every process to the same step (`reached_preemption_sync_point`, asked
    after every step); SIGINT sets the flag, which the processes compare at log steps
    (a collective, so never in between, or one process would wait for the others).
    Enter it after `jax.distributed.initialize`.
    """

    def __init__(self):
        self.signal = None
        self.reason = ""
        self.checkpoint_wanted = False  # SIGUSR1: a checkpoint now, training goes on
        self._multi = jax.process_count() > 1
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        self._previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._handle_checkpoint)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def _handle_checkpoint(self, signum, frame):
        self.checkpoint_wanted = True

    def checkpoint_requested(self, log_step: bool) -> bool:
        """Whether SIGUSR1 (a spot rebalance recommendation) asked for a checkpoint; several
        processes compare at log steps, so all save the same step."""
        wanted = self.checkpoint_wanted
        if self._multi:
            if not log_step:
                return False
            wanted = bool(multihost_utils.process_allgather(np.int32(wanted)).max())
        self.checkpoint_wanted = False
        return wanted

    def __exit__(self, *exc):
        self.release()

    def release(self) -> None:
        """Give the signals their previous handlers back (once training has no steps left)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def during_evaluation(self) -> bool:
        """Whether to abandon an evaluation pass now, so a spot notice's two minutes hold at
        1024 px. One process only: a cluster's processes would have to agree, and jax's
        preemption service answers only at training steps."""
        return not self._multi and self.signal is not None

    def requested(self, step: int, log_step: bool) -> bool:
        """Whether to stop after `step`; every process gets the same answer."""
        if not self._multi:
            self.reason = f"{self.signal} received" if self.signal else ""
        elif multihost_utils.reached_preemption_sync_point(step):
            self.reason = "SIGTERM (preemption notice) reached a process"
        elif log_step and multihost_utils.process_allgather(np.int32(self.signal is not None)).max():
            self.reason = f"{self.signal} received" if self.signal else "a signal reached another process"
        return bool(self.reason)


def _normalization(config, workdir: Path, train_src) -> tuple[tuple, tuple]:
    channels = config.model.in_channels
    # Measured once, reused on resume so the inputs never shift.
    if config.data.normalization == "dataset" and saved_statistics(workdir) is None:
        mean, std = measure_mean_std(train_src, config.data.image_size, seed=config.seed)
        if jax.process_index() == 0:
            save_statistics(workdir, mean, std)
        return stats_for("dataset", channels, mean, std)
    return input_stats(config, workdir, channels)


def _check_finite(values: dict, step: int, workdir: Path) -> None:
    """A checkpoint is written only after this passes for its step: the step's loss and
    gradient norm (before its update) and every parameter and BatchNorm statistic after it."""
    bad = [f"{k} = {values[k]}" for k in ("loss", "grad_norm") if not np.isfinite(values[k])]
    if values["nonfinite_state"]:
        bad.append(f"{int(values['nonfinite_state'])} non-finite parameters or BatchNorm statistics")
    if bad:
        raise TrainingDiverged(f"training diverged at step {step}: {', '.join(bad)}. {_kept(workdir)}")


def _kept(workdir: Path) -> str:
    return f"The last good checkpoint in {workdir / CHECKPOINTS} is kept (nothing after the divergence was saved)."


def _host(metrics) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def predict(state, eval_step, source, config, mesh, image_size: int, should_stop=None):
    """(keys, probs, logits, labels) over every record of `source`, in record order; the
    labels are the records' own (CRC-checked), not the index's. Raises EvaluationStopped
    when `should_stop()` says so after a batch."""
    global_batch = config.eval.batch_size or config.global_batch_size
    local_batch = per_process_batch(global_batch, mesh)
    bar = PassBar(len(source), local_batch, f"{Path(source.part_dir).name} pass")

    def after_batch():
        bar.update()
        if should_stop is not None and should_stop():
            raise EvaluationStopped

    before_compile("evaluation step", f"{image_size} px, global batch {global_batch}")
    try:
        out = predict_records(
            source,
            lambda images: eval_step(state, to_global({"image": images}, mesh)),
            mesh=mesh,
            batch_size=local_batch,
            image_size=image_size,
            seed=config.seed,
            after_batch=after_batch,
        )
    finally:
        bar.close()
    probs, logits = np.asarray(out["probs"], np.float64), np.asarray(out["logits"], np.float32)
    return out["key"], probs, logits, np.asarray(out["labels"], np.float32)


def validate(state, eval_step, source, loss_fn, config, mesh, workdir: Path, should_stop=None) -> dict:
    _, probs, logits, labels = predict(state, eval_step, source, config, mesh, config.data.image_size, should_stop)
    if not np.isfinite(logits).all():
        raise TrainingDiverged(
            f"validation outputs are not finite at step {int(state.step)} although training was. {_kept(workdir)}"
        )
    result = {"val_loss": float(loss_fn(jnp.asarray(logits), jnp.asarray(labels)))}
    aucs = {f: roc_auc(labels[:, j], probs[:, j]) for j, f in enumerate(FINDINGS)}
    defined = [v for v in aucs.values() if v is not None]
    result["val_mean_auc"] = float(np.mean(defined)) if defined else float("nan")
    result.update({f"val_auc_{f}": (v if v is not None else float("nan")) for f, v in aucs.items()})
    return result


def _config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


def _initial_state(config, model, tx, mesh):
    """(state, sharding): a fresh train state made by one jit straight into its
    replicated sharding. Every process computes the same values from the seed; a
    device_put of host values onto a multi-process sharding would instead compare
    them across processes leaf by leaf."""
    size = config.data.image_size
    dummy = jnp.zeros((1, size, size, config.model.in_channels), jnp.float32)
    variables = jax.jit(lambda k: model.init(k, dummy, train=False))(jax.random.PRNGKey(config.seed))
    if config.model.init_from:
        loaded_cfg, loaded = load_weights(config.model.init_from)
        variables, report = merge_pretrained(variables, loaded, loaded_cfg, config.model)
        if jax.process_index() == 0:
            logger.info(
                f"init_from {config.model.init_from}: {len(report['loaded'])} tensors loaded, "
                f"fresh: {sorted({'/'.join(p.split('/')[:3]) for p in report['fresh']}) or 'none'}"
            )
    variables = jax.device_get(variables)  # numpy: the same on every process
    create = functools.partial(TrainState.create, tx=tx, seed=config.seed)
    sharding = jax.tree.map(lambda _: replicated(mesh), jax.eval_shape(create, variables))
    return jax.jit(create, out_shardings=sharding)(variables), sharding


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def train(config, workdir: str | Path) -> dict:
    """Train (or resume) in `workdir`. Returns {"stopped", "step"} when a signal stopped
    it; else the summary of the best checkpoint (exported to best_weights), holding, when
    `config.eval.test`, its "predictions" of the test and val parts (`_finish`).
    """
    maybe_initialize(config.distributed)
    # From here on a SIGTERM during start-up (compiling, restoring) also ends cleanly;
    # released before the final evaluation, which has no step boundary to stop at.
    with _StopFlag() as stop:
        return _train(config, Path(workdir).absolute(), stop)


def _train(config, workdir: Path, stop: _StopFlag) -> dict:
    config = resume.absolute_paths(config)
    changed = resume.changes(config, workdir)  # refused changes stop here, before anything is written
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        resume.record(workdir, config, changed)
        if changed:
            logger.info(f"resuming with {resume.describe(changed)} (recorded in {workdir / CONFIG_HISTORY})")
    prepared = Path(config.data.prepared)
    manifest = read_manifest(prepared)
    mesh = make_mesh()
    size = config.data.image_size

    balance = Balance(config.data.keep_no_finding, config.data.oversample_rare_below, config.data.oversample_factor)
    train_table = training_table(prepared / "train", balance, config.seed)
    train_src = ShardedRecords(prepared / "train", train_table)
    val_src = ShardedRecords(prepared / "val")
    if len(val_src) == 0:
        raise PreparedDataError(
            f"{prepared / 'val'} holds no images, but validation picks the best checkpoint and "
            "the thresholds; prepare again with another --seed or --val-fraction, or more images"
        )
    if config.epochs < 1:
        raise ValueError(f"epochs is {config.epochs}; train at least one epoch")
    global_batch = config.global_batch_size
    local_batch = per_process_batch(global_batch, mesh)
    steps_per_epoch = len(train_src) // global_batch
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise ValueError(f"training part has {len(train_src)} images, fewer than one global batch of {global_batch}")
    total_steps = steps_per_epoch * config.epochs

    loader = make_loader(
        train_src,
        batch_size=local_batch,
        image_size=size,
        seed=config.seed,
        train=True,
        augment=augment_ranges(config.data) if config.data.augment else None,
        workers=config.data.workers,
        steps_per_epoch=steps_per_epoch,  # the loop's epochs are the loader's passes
    )
    data_iter = iter(loader)
    mean, std = _normalization(config, workdir, train_src)

    model = build_model(config.model)
    train_labels = train_table[list(FINDINGS)].to_numpy(np.float64)
    loss_fn = losses.make_loss(config.loss, train_labels.mean(0), train_labels.sum(0), len(train_labels))
    schedule = optim.make_schedule(config.optim, steps_per_epoch, total_steps)
    tx = optim.make_optimizer(config.optim, schedule)
    state, state_sharding = _initial_state(config, model, tx, mesh)
    train_step, _ = make_steps(model, loss_fn, mesh, state_sharding, mean=mean, std=std, l2=config.loss.l2)

    def eval_step(state, batch):  # the one jitted forward of every prediction (cxrjax.forward)
        return predict_batch(model, mean, std, state.variables, batch["image"])

    plateau = optim.Plateau(
        config.optim.plateau_factor, config.optim.plateau_patience, config.optim.min_lr, config.optim.learning_rate
    )
    early = optim.EarlyStopping(config.early_stopping_patience)
    manager = checkpoint.make_manager(workdir / CHECKPOINTS, config.checkpoint.keep)
    meta = {"plateau": {}, "early": {}}
    restored = checkpoint.restore_latest(manager, _abstract(state), data_iter)  # damaged steps: the one before
    if restored is not None:
        state, meta = restored
        if jax.process_index() == 0:
            logger.info(f"resumed from step {int(state.step)} in {workdir / CHECKPOINTS}")
    if jax.process_index() == 0:  # the rows past the restored step are logged again
        metrics_resume.drop_rows_after(workdir, int(state.step), bool(meta.get("validation_pending")))
    for key, value in meta["plateau"].items():
        setattr(plateau, key, value)
    for key, value in meta["early"].items():
        setattr(early, key, value)

    log = MetricsLog(workdir, config.wandb, _config_dict(config), workdir.name)

    def save(step, metrics=None, validation_pending=False):
        meta = {"plateau": vars(plateau), "early": vars(early), "validation_pending": validation_pending}
        checkpoint.save(manager, step, state, data_iter, meta, metrics)

    def end_epoch(epoch):
        """Validate the epoch that ended at `step` and checkpoint it with its metrics."""
        nonlocal state
        val = validate(state, eval_step, val_src, loss_fn, config, mesh, workdir, should_stop=stop.during_evaluation)
        if config.optim.schedule == "plateau":
            scale = np.float32(plateau.update(val["val_loss"]))
            state = state.replace(lr_scale=jax.device_put(scale, replicated(mesh)))
        early.update(val["val_mean_auc"], step)
        val.update(epoch=epoch + 1, lr_scale=plateau.scale)
        log.write(step, "val", val)
        if manager.latest_step() == step:  # saved without metrics when a stop cut this validation short
            manager.wait_until_finished()
            manager.delete(step)
        save(step, {"val_mean_auc": val["val_mean_auc"]})
        if jax.process_index() == 0:
            logger.info(f"epoch {epoch + 1}: val loss {val['val_loss']:.4f}, val mean AUC {val['val_mean_auc']:.4f}")
            if early.stopped:
                logger.info(f"early stopping: no better val mean AUC for {early.patience} epochs")

    def log_train(row_step, values):
        _check_finite(values, row_step, workdir)
        values["lr"] = float(schedule(row_step // config.optim.grad_accum_steps)) * plateau.scale
        log.write(row_step, "train", values)

    def stop_in_validation():
        """A stop during validation: the epoch's training is kept, its validation runs first on resume."""
        stop.reason = f"{stop.signal} received during validation"
        if manager.latest_step() != step:
            save(step, validation_pending=True)

    step = int(state.step)
    # A signal during start-up: stop before the first step; the last checkpoint stands.
    stopped = stop.requested(step, log_step=True)
    try:
        if meta.get("validation_pending") and not stopped:
            try:
                end_epoch(step // steps_per_epoch - 1)
            except EvaluationStopped:
                stop_in_validation()
                stopped = True
        while step < total_steps and not stopped and not early.stopped:
            epoch = step // steps_per_epoch
            progress = EpochProgress(epoch, config.epochs, steps_per_epoch, step, config.log_every_steps, global_batch)
            while True:
                batch = to_global(next(data_iter), mesh)
                before_compile("training step", f"{size} px, global batch {global_batch}")
                state, metrics = train_step(state, batch)
                step += 1
                # Means over the window up to the step before (computed by now, so reading
                # them does not stall the device queue), every log_every_steps.
                values = progress.step_done(step, metrics)
                if values is not None:
                    log_train(step - 1, values)
                if stop.requested(step, log_step=step % config.log_every_steps == 0):
                    _check_finite(_host(metrics), step, workdir)
                    # At an epoch's last step its validation has not run: the resumed run runs it first.
                    save(step, validation_pending=step % steps_per_epoch == 0)
                    stopped = True
                    break
                if step % steps_per_epoch == 0:
                    break
                asked = stop.checkpoint_requested(log_step=step % config.log_every_steps == 0)
                if asked or (config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0):
                    _check_finite(_host(metrics), step, workdir)
                    save(step)
                    if asked and jax.process_index() == 0:
                        logger.info(
                            f"SIGUSR1 (rebalance recommendation): checkpoint saved at step {step}; training goes on"
                        )
            if stopped:
                progress.close()
                break
            _check_finite(_host(metrics), step, workdir)
            log_train(step, progress.end(metrics))  # every epoch logs its training metrics
            try:
                end_epoch(epoch)
            except EvaluationStopped:
                stop_in_validation()
                stopped = True
    finally:
        manager.wait_until_finished()
        log.close()
    if stopped:
        if manager.latest_step() != step:  # stopped during start-up: keep that state too
            save(step)
            manager.wait_until_finished()
        if jax.process_index() == 0 or stop.signal:
            logger.info(f"{stop.reason}: checkpoint saved at step {step}; rerun the same command to resume")
        manager.close()
        return {"stopped": stop.reason, "step": step}

    if jax.process_count() > 1:
        stop.release()  # the processes could not agree on a stop mid-pass: signals act as usual
    try:
        summary = _finish(config, workdir, manager, state, eval_step, mesh, prepared, manifest, stop)
    except EvaluationStopped:
        logger.info(
            f"{stop.signal} received during the final evaluation: every checkpoint is saved; "
            "rerun the same command to evaluate again"
        )
        return {"stopped": f"{stop.signal} received during the final evaluation", "step": step}
    finally:
        manager.close()
    return summary


def _finish(config, workdir, manager, state, eval_step, mesh, prepared, manifest, stop) -> dict:
    """Restore the best checkpoint (by val mean AUC), export its weights, and predict the
    test and val parts with it (every process takes part; each gets all predictions). A
    stop during the predictions raises EvaluationStopped."""
    best = manager.best_step()
    state = checkpoint.restore_state(workdir / CHECKPOINTS, best, _abstract(state))
    weights_dir = workdir / BEST_WEIGHTS
    if jax.process_index() == 0:
        checkpoint.export_weights(weights_dir, jax.device_get(state.variables), config.model)
    summary = {
        "best_step": int(best),
        "weights": str(weights_dir),
        "split": manifest["split"],
        "image_size": config.data.image_size,
    }
    if config.eval.test:
        predictions = {}
        for part in ("test", "val"):
            source = ShardedRecords(prepared / part)
            keys, probs, _, labels = predict(
                state, eval_step, source, config, mesh, config.data.image_size, stop.during_evaluation
            )
            # Ids and labels as the records hold them (each read checks the id against the index).
            predictions[part] = (source.image_ids[keys], probs, labels)
        summary["predictions"] = predictions
    return summary
