"""What a training run holds before its first step: data, model, state (restored from
the newest good checkpoint when there is one), the jitted step and inference, the
checkpoint manager, the schedules and the metrics log."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cxrjax import forward
from cxrjax.data.normalize import measure_mean_std, stats_for
from cxrjax.data.pipeline import Balance, ShardedRecords, make_loader, training_table
from cxrjax.data.prepare import PreparedDataError, read_manifest
from cxrjax.findings import FINDINGS
from cxrjax.mesh import DeviceBatches, make_mesh, per_process_batch
from cxrjax.models import build_model
from cxrjax.models.weights import load_weights, merge_pretrained
from cxrjax.train import checkpoint, losses, metrics_resume, optim, resume
from cxrjax.train.monitor import MetricsLog
from cxrjax.train.signals import StopFlag
from cxrjax.train.state import initial_state
from cxrjax.train.step import make_train_step
from cxrjax.workdir import CHECKPOINTS, CONFIG_HISTORY, augment_ranges, input_stats, save_statistics, saved_statistics

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """What the loop reads and updates between steps."""

    config: Any
    workdir: Path
    stop: StopFlag
    mesh: Any
    steps_per_epoch: int
    batches: DeviceBatches
    val_src: ShardedRecords
    loss_fn: Any
    schedule: Any
    train_step: Any
    infer: Any  # (state, images) -> {"probs", "logits"}: forward.predict_batch with this run's model
    manager: Any
    plateau: optim.Plateau
    early: optim.EarlyStopping
    log: MetricsLog

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs


def setup(config, workdir: Path, stop: StopFlag) -> tuple:
    """(run, state, checkpoint meta): data, model and state, restored from the newest
    good checkpoint when there is one."""
    config = _recorded(config, workdir)
    mesh = make_mesh()
    train_table, train_src, val_src, steps_per_epoch = _training_data(config, mesh)
    mean, std = _normalization(config, workdir, train_src)
    model = build_model(config.model)
    labels = train_table[list(FINDINGS)].to_numpy(np.float64)
    loss_fn = losses.make_loss(config.loss, labels.mean(0), labels.sum(0), len(labels))
    schedule = optim.make_schedule(config.optim, steps_per_epoch, steps_per_epoch * config.epochs)
    tx = optim.make_optimizer(config.optim, schedule)
    state = initial_state(
        model,
        tx,
        mesh,
        image_size=config.data.image_size,
        channels=config.model.in_channels,
        seed=config.seed,
        pretrained=_pretrained(config),
    )
    manager = checkpoint.make_manager(workdir / CHECKPOINTS, config.checkpoint.keep)
    plateau = optim.Plateau(
        config.optim.plateau_factor, config.optim.plateau_patience, config.optim.min_lr, config.optim.learning_rate
    )
    early = optim.EarlyStopping(config.early_stopping_patience)
    host_batches = iter(_train_loader(config, train_src, mesh, steps_per_epoch))
    state, meta = _restore(manager, state, host_batches, workdir, plateau, early)
    run = Run(
        config,
        workdir,
        stop,
        mesh,
        steps_per_epoch,
        DeviceBatches(host_batches, mesh),
        val_src,
        loss_fn,
        schedule,
        make_train_step(model, loss_fn, mesh, state, mean=mean, std=std, l2=config.loss.l2),
        lambda state, images: forward.predict_batch(model, mean, std, state.variables, images),
        manager,
        plateau,
        early,
        MetricsLog(workdir, config.wandb, resume.config_dict(config), workdir.name),
    )
    return run, state, meta


def _recorded(config, workdir: Path):
    """The config with absolute paths, checked against the workdir's and recorded in it."""
    config = resume.absolute_paths(config)
    changed = resume.changes(config, workdir)  # refused changes stop here, before anything is written
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        resume.record(workdir, config, changed)
        if changed:
            logger.info(f"resuming with {resume.describe(changed)} (recorded in {workdir / CONFIG_HISTORY})")
    return config


def _training_data(config, mesh) -> tuple:
    """(train table, train source, val source, steps per epoch), checked."""
    prepared = Path(config.data.prepared)
    read_manifest(prepared)  # a part that is no prepared dataset fails here, in one line
    balance = Balance(config.data.keep_no_finding, config.data.oversample_rare_below, config.data.oversample_factor)
    train_table = training_table(prepared / "train", balance, config.seed)
    train_src, val_src = ShardedRecords(prepared / "train", train_table), ShardedRecords(prepared / "val")
    if len(val_src) == 0:
        raise PreparedDataError(
            f"{prepared / 'val'} holds no images, but validation picks the best checkpoint and "
            "the thresholds; prepare again with another --seed or --val-fraction, or more images"
        )
    if config.epochs < 1:
        raise ValueError(f"epochs is {config.epochs}; train at least one epoch")
    global_batch = config.global_batch_size
    per_process_batch(global_batch, mesh)  # the global batch splits over the devices
    steps_per_epoch = len(train_src) // global_batch
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise ValueError(f"training part has {len(train_src)} images, fewer than one global batch of {global_batch}")
    return train_table, train_src, val_src, steps_per_epoch


def _train_loader(config, train_src, mesh, steps_per_epoch: int):
    return make_loader(
        train_src,
        batch_size=per_process_batch(config.global_batch_size, mesh),
        image_size=config.data.image_size,
        seed=config.seed,
        train=True,
        augment=augment_ranges(config.data) if config.data.augment else None,
        workers=config.data.workers,
        steps_per_epoch=steps_per_epoch,  # the loop's epochs are the loader's passes
    )


def _normalization(config, workdir: Path, train_src) -> tuple[tuple, tuple]:
    channels = config.model.in_channels
    # Measured once, reused on resume so the inputs never shift.
    if config.data.normalization == "dataset" and saved_statistics(workdir) is None:
        mean, std = measure_mean_std(train_src, config.data.image_size, seed=config.seed)
        if jax.process_index() == 0:
            save_statistics(workdir, mean, std)
        return stats_for("dataset", channels, mean, std)
    return input_stats(config, workdir, channels)


def _pretrained(config):
    """The `initial_state` hook merging `config.model.init_from`'s weights, or None."""
    if not config.model.init_from:
        return None

    def merge(variables):
        loaded_cfg, loaded = load_weights(config.model.init_from)
        variables, report = merge_pretrained(variables, loaded, loaded_cfg, config.model)
        if jax.process_index() == 0:
            fresh = sorted({"/".join(p.split("/")[:3]) for p in report["fresh"]}) or "none"
            logger.info(f"init_from {config.model.init_from}: {len(report['loaded'])} tensors loaded, fresh: {fresh}")
        return variables

    return merge


def _restore(manager, state, host_batches, workdir: Path, plateau, early) -> tuple:
    """(state, meta) of the newest good checkpoint (damaged steps: the one before), with the
    data iterator, the plateau and the early stopping put back; else the fresh state."""
    meta = {"plateau": {}, "early": {}}
    restored = checkpoint.restore_latest(manager, abstract(state), host_batches)
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
    return state, meta


def abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
