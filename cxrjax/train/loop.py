"""The training loop around the pure jitted step: data, state, checkpoints, validation,
schedules, early stopping, signals and the final test evaluation.

The loop never waits for the device inside an epoch except every `log_every_steps`,
and then it reads the metrics of the step before, which are already computed.
"""

from __future__ import annotations

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
from cxrjax.data.pipeline import Balance, ShardedRecords, make_loader, read_index, training_table
from cxrjax.data.prepare import read_manifest
from cxrjax.eval.metrics import roc_auc
from cxrjax.findings import FINDINGS
from cxrjax.models import build_model
from cxrjax.models.weights import load_weights, merge_pretrained, save_weights
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


class _StopFlag:
    """SIGTERM/SIGINT ask for a checkpoint and a clean exit at the next step boundary."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        # Every process must agree, or one would block in the next collective.
        flag = np.int32(self.signal is not None)
        if jax.process_count() > 1:
            flag = multihost_utils.process_allgather(flag).max()
        return bool(flag)


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


def _check_finite(value: float, step: int, workdir: Path) -> None:
    if not np.isfinite(value):
        raise TrainingDiverged(
            f"loss is {value} at step {step}; stopping. The last good checkpoint in "
            f"{workdir / 'checkpoints'} is kept (nothing after the divergence was saved)."
        )


def predict(state, eval_step, source, config, mesh, image_size: int):
    """(keys, probs, logits) over every record of `source`, in record order."""
    global_batch = config.eval.batch_size or config.global_batch_size
    local = per_process_batch(global_batch, mesh)
    loader = make_loader(source, batch_size=local, image_size=image_size, seed=config.seed, train=False)
    # Every process must run the same number of steps: pad with empty batches.
    per_process = -(-len(source) // jax.process_count())
    n_batches = -(-per_process // local)
    it = iter(loader)
    keys, probs, logits = [], [], []
    for _ in range(n_batches):
        batch = next(it, None)
        if batch is None:
            batch = {"image": np.zeros((0, image_size, image_size, 1), np.uint8), "key": np.zeros(0, np.int64)}
        n = len(batch["key"])
        images = np.zeros((local, image_size, image_size, 1), np.uint8)
        images[:n] = batch["image"]
        key = np.full(local, -1, np.int64)
        key[:n] = batch["key"]
        out = eval_step(state, to_global({"image": images}, mesh))
        key_all = multihost_utils.process_allgather(key, tiled=True) if jax.process_count() > 1 else key
        keys.append(key_all)
        gathered = multihost_utils.process_allgather(out, tiled=True) if jax.process_count() > 1 else jax.device_get(out)
        probs.append(np.asarray(gathered["probs"], np.float64))
        logits.append(np.asarray(gathered["logits"], np.float32))
    keys, probs, logits = np.concatenate(keys), np.concatenate(probs), np.concatenate(logits)
    valid = keys >= 0
    order = np.argsort(keys[valid], kind="stable")
    return keys[valid][order], probs[valid][order], logits[valid][order]


def validate(state, eval_step, source, labels, loss_fn, config, mesh) -> dict:
    _, probs, logits = predict(state, eval_step, source, config, mesh, config.data.image_size)
    result = {"val_loss": float(loss_fn(jnp.asarray(logits), jnp.asarray(labels)))}
    aucs = {f: roc_auc(labels[:, j], probs[:, j]) for j, f in enumerate(FINDINGS)}
    defined = [v for v in aucs.values() if v is not None]
    result["val_mean_auc"] = float(np.mean(defined)) if defined else float("nan")
    result.update({f"val_auc_{f}": (v if v is not None else float("nan")) for f, v in aucs.items()})
    return result


def _config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


def train(config, workdir: str | Path) -> dict:
    """Train (or resume) in `workdir`; returns the final summary also written to done.json."""
    maybe_initialize(config.distributed)
    workdir = Path(workdir).absolute()
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
    val_labels = read_index(prepared / "val")[list(FINDINGS)].to_numpy(np.float32)
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
    dummy = jnp.zeros((1, size, size, config.model.in_channels), jnp.float32)
    variables = jax.jit(lambda k: model.init(k, dummy, train=False))(jax.random.PRNGKey(config.seed))
    if config.model.init_from:
        loaded_cfg, loaded = load_weights(config.model.init_from)
        variables, report = merge_pretrained(variables, loaded, loaded_cfg, config.model)
        if jax.process_index() == 0:
            print(f"init_from {config.model.init_from}: {len(report['loaded'])} tensors loaded, "
                  f"fresh: {sorted({'/'.join(p.split('/')[:3]) for p in report['fresh']}) or 'none'}")

    train_labels = train_table[list(FINDINGS)].to_numpy(np.float64)
    loss_fn = losses.make_loss(config.loss, train_labels.mean(0), train_labels.sum(0), len(train_labels))
    schedule = optim.make_schedule(config.optim, steps_per_epoch, total_steps)
    tx = optim.make_optimizer(config.optim, schedule)
    state = TrainState.create(variables, tx, config.seed)
    state_sharding = jax.tree.map(lambda _: replicated(mesh), state)
    state = jax.device_put(state, state_sharding)
    train_step, eval_step = make_steps(model, loss_fn, mesh, state_sharding, mean=mean, std=std, l2=config.loss.l2)

    plateau = optim.Plateau(config.optim.plateau_factor, config.optim.plateau_patience,
                            config.optim.min_lr, config.optim.learning_rate)
    early = optim.EarlyStopping(config.early_stopping_patience)
    manager = checkpoint.make_manager(workdir / "checkpoints", config.checkpoint.keep)
    meta = {"plateau": {}, "early": {}}
    if manager.latest_step() is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state, meta = checkpoint.restore(manager, manager.latest_step(), abstract, data_iter)
        if jax.process_index() == 0:
            print(f"resumed from step {int(state.step)} in {workdir / 'checkpoints'}")
    for key, value in meta["plateau"].items():
        setattr(plateau, key, value)
    for key, value in meta["early"].items():
        setattr(early, key, value)

    log = MetricsLog(workdir, config.wandb, _config_dict(config), workdir.name)

    def save(step, metrics=None):
        meta = {"plateau": vars(plateau), "early": vars(early)}
        checkpoint.save(manager, step, state, data_iter, meta, metrics)

    step = int(state.step)
    stopped = None
    try:
        with _StopFlag() as stop:
            while step < total_steps and stopped is None:
                epoch = step // steps_per_epoch
                bar = tqdm(total=steps_per_epoch, initial=step % steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                           unit="step", disable=jax.process_index() != 0 or None)
                previous, tick = None, time.perf_counter()
                while True:
                    batch = to_global(next(data_iter), mesh)
                    state, metrics = train_step(state, batch)
                    step += 1
                    bar.update(1)
                    if previous is not None and step % config.log_every_steps == 0:
                        values = {k: float(v) for k, v in jax.device_get(previous).items()}
                        _check_finite(values["loss"], step - 1, workdir)
                        now = time.perf_counter()
                        values["images_per_s"] = config.log_every_steps * global_batch / (now - tick)
                        values["lr"] = float(schedule(step - 1)) * plateau.scale
                        tick = now
                        bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_s']:.1f}")
                        log.write(step - 1, "train", values)
                    previous = metrics
                    end_of_epoch = step % steps_per_epoch == 0
                    # Across processes the check is a collective: do it at log steps only.
                    check = jax.process_count() == 1 or step % config.log_every_steps == 0
                    if check and stop.requested():
                        _check_finite(float(metrics["loss"]), step, workdir)
                        save(step)
                        stopped = stop.signal or "signal"
                        break
                    if end_of_epoch:
                        break
                    if config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0:
                        _check_finite(float(metrics["loss"]), step, workdir)
                        save(step)
                bar.close()
                if stopped:
                    break
                _check_finite(float(metrics["loss"]), step, workdir)
                val = validate(state, eval_step, val_src, val_labels, loss_fn, config, mesh)
                if config.optim.schedule == "plateau":
                    state = state.replace(lr_scale=jax.device_put(jnp.float32(plateau.update(val["val_loss"])), replicated(mesh)))
                should_stop = early.update(val["val_mean_auc"], step)
                val.update(epoch=epoch + 1, lr_scale=plateau.scale)
                log.write(step, "val", val)
                if jax.process_index() == 0:
                    print(f"epoch {epoch + 1}: val loss {val['val_loss']:.4f}, val mean AUC {val['val_mean_auc']:.4f}")
                save(step, {"val_mean_auc": val["val_mean_auc"]})
                if should_stop:
                    print(f"early stopping: no better val mean AUC for {early.patience} epochs")
                    break
    finally:
        manager.wait_until_finished()
        log.close()
    if stopped:
        print(f"{stopped} received: checkpoint saved at step {step}; rerun the same command to resume")
        manager.close()
        return {"stopped": stopped, "step": step}

    summary = _finish(config, workdir, manager, state, eval_step, mesh, model, prepared, manifest)
    manager.close()
    return summary


def _finish(config, workdir, manager, state, eval_step, mesh, model, prepared, manifest) -> dict:
    """Restore the best checkpoint, export its weights, predict and score the test part."""
    from cxrjax.eval.evaluate import evaluate_predictions
    from cxrjax.eval.predictions import write_predictions

    best = manager.best_step() if manager.best_step() is not None else manager.latest_step()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    state = checkpoint.restore_state(workdir / "checkpoints", best, abstract)
    weights_dir = workdir / BEST_WEIGHTS
    if jax.process_index() == 0 and not weights_dir.exists():
        save_weights(weights_dir, jax.device_get(state.variables), config.model)
    summary = {"best_step": int(best), "weights": str(weights_dir), "split": manifest["split"],
               "image_size": config.data.image_size}
    if config.eval.test:
        test_index = read_index(prepared / "test")
        keys, probs, _ = predict(state, eval_step, ShardedRecords(prepared / "test"), config, mesh, config.data.image_size)
        val_index = read_index(prepared / "val")
        val_keys, val_probs, _ = predict(state, eval_step, ShardedRecords(prepared / "val"), config, mesh, config.data.image_size)
        if jax.process_index() == 0:
            ids = test_index["image_id"].to_numpy()[keys]
            out = workdir / "test"
            out.mkdir(exist_ok=True)
            write_predictions(out / "predictions.csv", ids, probs)
            metrics = evaluate_predictions(
                ids, probs, test_index, out_dir=out,
                val=(val_index["image_id"].to_numpy()[val_keys], val_probs, val_index),
                n_bootstrap=config.eval.bootstrap, seed=config.seed,
                run=_run_info(config, manifest, workdir),
            )
            summary["test_mean_auc"] = metrics["mean_auc"]
    if jax.process_index() == 0:
        (workdir / DONE).write_text(json.dumps(summary, indent=1))
    return summary


def _run_info(config, manifest, workdir: Path) -> dict:
    family = "official" if manifest["split"] == "official" else "random"
    backbone = config.model.arch + (" + CBAM" if config.model.cbam else "")
    return {"name": workdir.name, "split_family": family, "split": manifest["split"],
            "px": config.data.image_size, "backbone": backbone}
