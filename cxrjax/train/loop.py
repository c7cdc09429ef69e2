"""The training loop around the pure jitted step: data, state, checkpoints, validation,
schedules, early stopping, signals and the final test evaluation.

The loop never waits for the device inside an epoch except every `log_every_steps`,
and then it reads the metrics of the step before, which are already computed.
"""

from __future__ import annotations

import functools
import json
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from cxrjax.data.augment import AugmentConfig
from cxrjax.data.normalize import measure_mean_std, stats_for
from cxrjax.data.pipeline import Balance, ShardedRecords, labels_table, make_loader, training_table
from cxrjax.data.prepare import PreparedDataError, read_manifest
from cxrjax.eval.metrics import roc_auc
from cxrjax.findings import FINDINGS
from cxrjax.models import build_model
from cxrjax.models.weights import load_weights, merge_pretrained
from cxrjax.train import checkpoint, losses, optim
from cxrjax.train.distributed import maybe_initialize
from cxrjax.train.mesh import make_mesh, per_process_batch, replicated, to_global
from cxrjax.train.monitor import MetricsLog
from cxrjax.train.state import TrainState
from cxrjax.train.step import make_steps

DONE = "done.json"
BEST_WEIGHTS = "best_weights"


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


def _augment(cfg) -> AugmentConfig | None:
    if not cfg.augment:
        return None
    return AugmentConfig(cfg.rotation_deg, cfg.shift, cfg.zoom, cfg.shear_deg, cfg.horizontal_flip)


def _normalization(config, workdir: Path, train_src) -> tuple[tuple, tuple]:
    channels = config.model.in_channels
    if config.data.normalization != "dataset":
        return stats_for(config.data.normalization, channels)
    path = workdir / "normalization.json"
    if path.exists():  # measured once, reused on resume so the inputs never shift
        stats = json.loads(path.read_text())
    else:
        mean, std = measure_mean_std(train_src, config.data.image_size, seed=config.seed)
        stats = {"mean": mean, "std": std, "measured_on": "train"}
        if jax.process_index() == 0:
            path.write_text(json.dumps(stats))
    return stats_for("dataset", channels, stats["mean"], stats["std"])


def _check_finite(values: dict, step: int, workdir: Path) -> None:
    """A checkpoint is written only after this passes for its step: the step's loss and
    gradient norm (before its update) and every parameter and BatchNorm statistic after it."""
    bad = [f"{k} = {values[k]}" for k in ("loss", "grad_norm") if not np.isfinite(values[k])]
    if values["nonfinite_state"]:
        bad.append(f"{int(values['nonfinite_state'])} non-finite parameters or BatchNorm statistics")
    if bad:
        raise TrainingDiverged(f"training diverged at step {step}: {', '.join(bad)}. {_kept(workdir)}")


def _kept(workdir: Path) -> str:
    return f"The last good checkpoint in {workdir / 'checkpoints'} is kept (nothing after the divergence was saved)."


def _host(metrics) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def predict(state, eval_step, source, config, mesh, image_size: int, should_stop=None):
    """(keys, probs, logits, labels) over every record of `source`, in record order; the
    labels are the records' own (CRC-checked), not the index's. Raises EvaluationStopped
    when `should_stop()` says so after a batch."""
    global_batch = config.eval.batch_size or config.global_batch_size
    local = per_process_batch(global_batch, mesh)
    loader = make_loader(source, batch_size=local, image_size=image_size, seed=config.seed, train=False)
    # Every process must run the same number of steps: pad with empty batches. Each
    # process reads a contiguous range of at most ceil(n / P) records.
    n_batches = -(-(-(-len(source) // jax.process_count())) // local)
    it = iter(loader)
    keys, probs, logits, labels = [], [], [], []
    for _ in range(n_batches):
        batch = next(it, None)
        n = 0 if batch is None else len(batch["key"])
        images = np.zeros((local, image_size, image_size, 1), np.uint8)
        key = np.full(local, -1, np.int32)
        label = np.zeros((local, len(FINDINGS)), np.float32)
        if n:
            images[:n], key[:n], label[:n] = batch["image"], batch["key"], batch["labels"]
        batch = to_global({"image": images, "key": key, "labels": label}, mesh)
        out = eval_step(state, {"image": batch["image"]})
        # Keys and labels travel as global arrays too, so they line up with the outputs by construction.
        gathered = _to_host({"key": batch["key"], "labels": batch["labels"], **out})
        keys.append(gathered["key"])
        probs.append(np.asarray(gathered["probs"], np.float64))
        logits.append(np.asarray(gathered["logits"], np.float32))
        labels.append(np.asarray(gathered["labels"], np.float32))
        if should_stop is not None and should_stop():
            raise EvaluationStopped
    keys, probs, logits, labels = (np.concatenate(a) for a in (keys, probs, logits, labels))
    valid = keys >= 0
    order = np.argsort(keys[valid], kind="stable")
    return keys[valid][order], probs[valid][order], logits[valid][order], labels[valid][order]


def _to_host(tree):
    """Full numpy values of (possibly multi-process) global arrays, on every process."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


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
            print(f"init_from {config.model.init_from}: {len(report['loaded'])} tensors loaded, "
                  f"fresh: {sorted({'/'.join(p.split('/')[:3]) for p in report['fresh']}) or 'none'}")
    variables = jax.device_get(variables)  # numpy: the same on every process
    create = functools.partial(TrainState.create, tx=tx, seed=config.seed)
    sharding = jax.tree.map(lambda _: replicated(mesh), jax.eval_shape(create, variables))
    return jax.jit(create, out_shardings=sharding)(variables), sharding


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def train(config, workdir: str | Path) -> dict:
    """Train (or resume) in `workdir`; returns the final summary also written to done.json.

    A finished workdir (done.json present) returns its summary without training.
    """
    maybe_initialize(config.distributed)
    # From here on a SIGTERM during start-up (compiling, restoring) also ends cleanly;
    # released before the final evaluation, which has no step boundary to stop at.
    with _StopFlag() as stop:
        return _train(config, Path(workdir).absolute(), stop)


def _train(config, workdir: Path, stop: _StopFlag) -> dict:
    if (workdir / DONE).exists():
        if jax.process_index() == 0:
            print(f"{workdir / DONE} exists: already trained (delete it to run the final evaluation again)")
        return json.loads((workdir / DONE).read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(json.dumps(_config_dict(config), indent=1))
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
        train_src, batch_size=local_batch, image_size=size, seed=config.seed, train=True,
        augment=_augment(config.data), workers=config.data.workers,
    )
    data_iter = iter(loader)
    mean, std = _normalization(config, workdir, train_src)

    model = build_model(config.model)
    train_labels = train_table[list(FINDINGS)].to_numpy(np.float64)
    loss_fn = losses.make_loss(config.loss, train_labels.mean(0), train_labels.sum(0), len(train_labels))
    schedule = optim.make_schedule(config.optim, steps_per_epoch, total_steps)
    tx = optim.make_optimizer(config.optim, schedule)
    state, state_sharding = _initial_state(config, model, tx, mesh)
    train_step, eval_step = make_steps(model, loss_fn, mesh, state_sharding, mean=mean, std=std, l2=config.loss.l2)

    plateau = optim.Plateau(config.optim.plateau_factor, config.optim.plateau_patience,
                            config.optim.min_lr, config.optim.learning_rate)
    early = optim.EarlyStopping(config.early_stopping_patience)
    manager = checkpoint.make_manager(workdir / "checkpoints", config.checkpoint.keep)
    meta = {"plateau": {}, "early": {}}
    if manager.latest_step() is not None:
        state, meta = checkpoint.restore(manager, manager.latest_step(), _abstract(state), data_iter)
        if jax.process_index() == 0:
            print(f"resumed from step {int(state.step)} in {workdir / 'checkpoints'}")
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
        val = validate(state, eval_step, val_src, loss_fn, config, mesh, workdir,
                       should_stop=stop.during_evaluation)
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
            print(f"epoch {epoch + 1}: val loss {val['val_loss']:.4f}, val mean AUC {val['val_mean_auc']:.4f}")
            if early.stopped:
                print(f"early stopping: no better val mean AUC for {early.patience} epochs")

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
            bar = tqdm(total=steps_per_epoch, initial=step % steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                       unit="step", disable=jax.process_index() != 0 or None)
            previous, tick = None, time.perf_counter()
            while True:
                batch = to_global(next(data_iter), mesh)
                state, metrics = train_step(state, batch)
                step += 1
                bar.update(1)
                # Log the step before: its metrics are computed by now, so reading them
                # does not stall the device queue.
                if previous is not None and step % config.log_every_steps == 0:
                    values = _host(previous)
                    _check_finite(values, step - 1, workdir)
                    now = time.perf_counter()
                    values["images_per_s"] = config.log_every_steps * global_batch / (now - tick)
                    values["lr"] = float(schedule((step - 1) // config.optim.grad_accum_steps)) * plateau.scale
                    tick = now
                    bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_s']:.1f}")
                    log.write(step - 1, "train", values)
                previous = metrics
                if stop.requested(step, log_step=step % config.log_every_steps == 0):
                    _check_finite(_host(metrics), step, workdir)
                    save(step)
                    stopped = True
                    break
                if step % steps_per_epoch == 0:
                    break
                asked = stop.checkpoint_requested(log_step=step % config.log_every_steps == 0)
                if asked or (config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0):
                    _check_finite(_host(metrics), step, workdir)
                    save(step)
                    if asked and jax.process_index() == 0:
                        print(f"SIGUSR1 (rebalance recommendation): checkpoint saved at step {step}; training goes on")
            bar.close()
            if stopped:
                break
            _check_finite(_host(metrics), step, workdir)
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
            print(f"{stop.reason}: checkpoint saved at step {step}; rerun the same command to resume")
        manager.close()
        return {"stopped": stop.reason, "step": step}

    if jax.process_count() > 1:
        stop.release()  # the processes could not agree on a stop mid-pass: signals act as usual
    try:
        summary = _finish(config, workdir, manager, state, eval_step, mesh, prepared, manifest, stop)
    except EvaluationStopped:
        print(f"{stop.signal} received during the final evaluation: every checkpoint is saved; "
              "rerun the same command to evaluate again")
        return {"stopped": f"{stop.signal} received during the final evaluation", "step": step}
    finally:
        manager.close()
    return summary


def _finish(config, workdir, manager, state, eval_step, mesh, prepared, manifest, stop) -> dict:
    """Restore the best checkpoint (by val mean AUC), export its weights, predict and score the test part."""
    from cxrjax.eval.evaluate import evaluate_predictions
    from cxrjax.eval.predictions import write_predictions

    best = manager.best_step()
    state = checkpoint.restore_state(workdir / "checkpoints", best, _abstract(state))
    weights_dir = workdir / BEST_WEIGHTS
    if jax.process_index() == 0:
        checkpoint.export_weights(weights_dir, jax.device_get(state.variables), config.model)
    summary = {"best_step": int(best), "weights": str(weights_dir), "split": manifest["split"],
               "image_size": config.data.image_size}
    if config.eval.test:
        test_src, val_src = ShardedRecords(prepared / "test"), ShardedRecords(prepared / "val")
        keys, probs, _, labels = predict(state, eval_step, test_src, config, mesh, config.data.image_size,
                                         stop.during_evaluation)
        val_keys, val_probs, _, val_labels = predict(state, eval_step, val_src, config, mesh,
                                                     config.data.image_size, stop.during_evaluation)
        if jax.process_index() == 0:
            # Ids and labels as the records hold them (each read checks the id against the index).
            ids, val_ids = test_src.image_ids[keys], val_src.image_ids[val_keys]
            out = workdir / "test"
            out.mkdir(exist_ok=True)
            write_predictions(out / "predictions.csv", ids, probs)
            metrics = evaluate_predictions(
                ids, probs, labels_table(ids, labels, prepared / "test"), out_dir=out,
                val=(val_ids, val_probs, labels_table(val_ids, val_labels, prepared / "val")),
                n_bootstrap=config.eval.bootstrap, seed=config.seed,
                run=_run_info(config, manifest, workdir),
            )
            summary["test_mean_auc"] = metrics["mean_auc"]
    if jax.process_index() == 0:
        (workdir / DONE).write_text(json.dumps(summary, indent=1))
    return summary


def _run_info(config, manifest, workdir: Path) -> dict:
    if manifest.get("synthetic"):  # never ranked against published NIH results
        family = "synthetic"
    else:
        family = "official" if manifest["split"] == "official" else "random"
    backbone = config.model.arch + (" + CBAM" if config.model.cbam else "")
    return {"name": workdir.name, "split_family": family, "split": manifest["split"],
            "px": config.data.image_size, "backbone": backbone}
