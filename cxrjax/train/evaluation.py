"""A training run's passes over a prepared part, through the one jitted inference
(`cxrjax.forward.predict_batch`): validation at each epoch's end, and the best
checkpoint's predictions of the test and val parts."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax import forward
from cxrjax.auc import roc_auc
from cxrjax.data.pipeline import ShardedRecords
from cxrjax.data.prepare import read_manifest
from cxrjax.findings import FINDINGS
from cxrjax.mesh import per_process_batch
from cxrjax.train import checkpoint
from cxrjax.train.divergence import TrainingDiverged, kept
from cxrjax.train.progress import PassBar, before_compile
from cxrjax.train.setup import Run, abstract
from cxrjax.workdir import BEST_WEIGHTS, CHECKPOINTS


class EvaluationStopped(Exception):
    """A stop request arrived during an evaluation pass, which was abandoned."""


def predict(run: Run, state, source: ShardedRecords):
    """(keys, probs, logits, labels) over every record of `source`, in record order; the
    labels are the records' own (CRC-checked), not the index's. Raises EvaluationStopped
    when a stop request comes during the pass (one process: `StopFlag.during_evaluation`)."""
    config, image_size = run.config, run.config.data.image_size
    global_batch = config.eval.batch_size or config.global_batch_size
    local_batch = per_process_batch(global_batch, run.mesh)
    bar = PassBar(len(source), local_batch, f"{Path(source.part_dir).name} pass")

    def after_batch():
        bar.update()
        if run.stop.during_evaluation():
            raise EvaluationStopped

    before_compile("evaluation step", f"{image_size} px, global batch {global_batch}")
    try:
        out = forward.predict_records(
            source,
            lambda images: run.infer(state, images),
            mesh=run.mesh,
            batch_size=local_batch,
            image_size=image_size,
            seed=config.seed,
            after_batch=after_batch,
        )
    finally:
        bar.close()
    probs, logits = np.asarray(out["probs"], np.float64), np.asarray(out["logits"], np.float32)
    return out["key"], probs, logits, np.asarray(out["labels"], np.float32)


def validate(run: Run, state) -> dict:
    """Loss and per-finding AUCs of `state` on the val part."""
    _, probs, logits, labels = predict(run, state, run.val_src)
    if not np.isfinite(logits).all():
        raise TrainingDiverged(
            f"validation outputs are not finite at step {int(state.step)} although training was. {kept(run.workdir)}"
        )
    result = {"val_loss": float(run.loss_fn(jnp.asarray(logits), jnp.asarray(labels)))}
    aucs = {f: roc_auc(labels[:, j], probs[:, j]) for j, f in enumerate(FINDINGS)}
    defined = [v for v in aucs.values() if v is not None]
    result["val_mean_auc"] = float(np.mean(defined)) if defined else float("nan")
    result.update({f"val_auc_{f}": (v if v is not None else float("nan")) for f, v in aucs.items()})
    return result


def finish(run: Run, state) -> dict:
    """Restore the best checkpoint (by val mean AUC), export its weights, and predict the
    test and val parts with it (every process takes part; each gets all predictions). A
    stop during the predictions raises EvaluationStopped."""
    config, prepared = run.config, Path(run.config.data.prepared)
    best = run.manager.best_step()
    state = checkpoint.restore_state(run.workdir / CHECKPOINTS, best, abstract(state))
    weights_dir = run.workdir / BEST_WEIGHTS
    if jax.process_index() == 0:
        checkpoint.export_weights(weights_dir, jax.device_get(state.variables), config.model)
    summary = {
        "best_step": int(best),
        "weights": str(weights_dir),
        "split": read_manifest(prepared)["split"],
        "image_size": config.data.image_size,
    }
    if config.eval.test:
        predictions = {}
        for part in ("test", "val"):
            source = ShardedRecords(prepared / part)
            keys, probs, _, labels = predict(run, state, source)
            # Ids and labels as the records hold them (each read checks the id against the index).
            predictions[part] = (source.image_ids[keys], probs, labels)
        summary["predictions"] = predictions
    return summary
