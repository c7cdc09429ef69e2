"""Batched, jitted inference of a trained model over PNG files or a prepared part.

Images leave the host as uint8 [B, S, S, 1], as in training; normalization runs on the
device (`cxrjax.data.normalize`). Batches are padded to one fixed size (a multiple of
the device count) so each command compiles once, and sharded over this host's devices
along the `data` axis of `cxrjax.mesh`; the forward pass and the padding are the
trainer's own (`cxrjax.forward`).

Test-time augmentation (`tta=n`) averages the probabilities of n views: the image
itself and n-1 fixed affine warps (rotation, shift, zoom, shear, and a flip only if the
run trained with flips) drawn from the run's training augmentation ranges. The k-th
warp is the same for every image and every call, so results are reproducible.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np

from cxrjax import forward
from cxrjax.data.augment import AugmentConfig, random_affine
from cxrjax.data.images import refuse_upsampling, to_model_size
from cxrjax.data.prepare import INDEX, MANIFEST
from cxrjax.eval.image_files import collect_pngs, read_gray
from cxrjax.eval.model_source import InferenceError, TrainedModel, load_trained, locate
from cxrjax.findings import FINDINGS
from cxrjax.forward import pad_rows, predict_records
from cxrjax.mesh import batch_sharded, make_mesh, replicated
from cxrjax.models import build_model
from cxrjax.workdir import read_run_config, run_info

TTA_SEED = 0
DEFAULT_BATCH = 32


def tta_views(images: np.ndarray, n: int, augment: AugmentConfig) -> list[np.ndarray]:
    """n views of a uint8 batch [B, S, S, 1], the first being the batch itself."""
    if n < 1:
        raise InferenceError(f"--tta must be at least 1 (1: no augmentation), got {n}")
    views = [images]
    for k in range(1, n):
        # A fresh generator per image with the view's seed: one warp per view.
        warp = [random_affine(img[..., 0], augment, np.random.default_rng((TTA_SEED, k))) for img in images]
        views.append(np.stack(warp)[..., None] if len(warp) else images.copy())
    return views


class Predictor:
    """A TrainedModel placed on this host's devices, with its jitted probability function."""

    def __init__(self, trained: TrainedModel, batch_size: int = DEFAULT_BATCH, devices=None):
        if batch_size < 1:
            raise InferenceError(f"batch size must be positive, got {batch_size}")
        self.trained = trained
        self.model = build_model(trained.model_config)
        self.mesh = make_mesh(jax.local_devices() if devices is None else devices)
        n = self.mesh.devices.size
        self.batch_size = -(-batch_size // n) * n
        self.variables = jax.device_put(trained.variables, replicated(self.mesh))
        stats = (np.asarray(trained.mean, np.float32), np.asarray(trained.std, np.float32))
        self.stats = jax.device_put(stats, replicated(self.mesh))  # per channel

    def put(self, *arrays: np.ndarray) -> list[jax.Array]:
        """Pad each array's batch axis to the fixed batch size and shard it over devices."""
        return [jax.device_put(pad_rows(a, self.batch_size), batch_sharded(self.mesh)) for a in arrays]

    def probs(self, images: np.ndarray, tta: int = 1) -> np.ndarray:
        """float64 [B, 14] for uint8 [B, S, S, 1], averaged over `tta` views."""
        total = np.zeros((len(images), len(FINDINGS)), np.float64)
        for view in tta_views(images, tta, self.trained.augment):
            (x,) = self.put(view)
            p = forward.predict_batch(self.model, *self.stats, self.variables, x)["probs"]
            total += np.asarray(jax.device_get(p), np.float64)[: len(images)]
        return total / tta


def predict_files(predictor: Predictor, files: list[tuple[str, Path]], tta: int = 1, on_batch=None):
    """(ids, probs [N, 14]) for (id, path) pairs. `on_batch(ids, originals, images, probs)`
    sees every batch with the decoded originals (e.g. to draw heatmaps)."""
    size = predictor.trained.image_size
    ids, probs = [], []

    def load(item):
        gray = read_gray(item[1])
        refuse_upsampling(gray.shape[1], gray.shape[0], size, str(item[1]), "the model's input")
        return gray, to_model_size(gray, size)

    with ThreadPoolExecutor(max_workers=4) as pool:  # cv2 decodes outside the GIL
        for start in range(0, len(files), predictor.batch_size):
            chunk = files[start : start + predictor.batch_size]
            loaded = list(pool.map(load, chunk))
            originals = [g for g, _ in loaded]
            images = np.stack([m for _, m in loaded])[..., None]
            p = predictor.probs(images, tta)
            chunk_ids = [i for i, _ in chunk]
            if on_batch is not None:
                on_batch(chunk_ids, originals, images, p)
            ids += chunk_ids
            probs.append(p)
    return np.asarray(ids, dtype=object), np.concatenate(probs)


def predict_part(predictor: Predictor, part_dir: str | Path, tta: int = 1):
    """(ids, probs [N, 14], labels [N, 14]) over every record of a prepared part, in
    index order, read and resized by the training loader (`make_loader`, evaluation
    mode); ids and labels are the records' own."""
    from cxrjax.data.pipeline import ShardedRecords

    source = ShardedRecords(part_dir)
    if len(source) == 0:
        raise InferenceError(f"{part_dir}: the part holds no images")
    out = predict_records(
        source,
        lambda images: {"probs": predictor.probs(images, tta)},
        mesh=predictor.mesh,
        batch_size=predictor.batch_size,
        image_size=predictor.trained.image_size,
        local=True,
    )
    return source.image_ids[out["key"]], out["probs"], out["labels"]


def run_predict(
    weights,
    paths,
    out_csv,
    *,
    heatmaps=None,
    top_k: int = 1,
    tta: int = 1,
    image_size: int | None = None,
    batch_size: int = DEFAULT_BATCH,
) -> dict:
    """`cxrjax predict`: probabilities CSV for PNG files/folders, optional Grad-CAM overlays."""
    from cxrjax.eval.gradcam import HeatmapWriter
    from cxrjax.eval.predictions import write_predictions

    files = collect_pngs(paths)
    trained = load_trained(weights, image_size)
    predictor = Predictor(trained, min(batch_size, len(files)))
    writer = HeatmapWriter(predictor, heatmaps, top_k=top_k) if heatmaps else None
    ids, probs = predict_files(predictor, files, tta, writer)
    write_predictions(out_csv, ids, probs)
    summary = {"images": len(ids), "model": trained.describe(), "predictions": str(out_csv)}
    if writer is not None:
        summary["heatmaps"] = str(writer.write_index())
    return summary


def run_gradcam(
    weights,
    paths,
    out_dir,
    *,
    findings: str | None = None,
    top_k: int = 1,
    image_size: int | None = None,
    batch_size: int = DEFAULT_BATCH,
) -> dict:
    """`cxrjax gradcam`: overlays of chosen findings (or each image's top k) in `out_dir`."""
    from cxrjax.eval.gradcam import HeatmapWriter, finding_indices

    chosen = finding_indices(findings) if findings else None
    files = collect_pngs(paths)
    trained = load_trained(weights, image_size)
    predictor = Predictor(trained, min(batch_size, len(files)))
    writer = HeatmapWriter(predictor, out_dir, chosen, top_k)
    predict_files(predictor, files, 1, writer)
    return {
        "images": len(files),
        "overlays": len(writer.rows),
        "model": trained.describe(),
        "index": str(writer.write_index()),
    }


def predict_for_evaluation(
    checkpoint,
    data=None,
    part: str = "test",
    *,
    labels=None,
    val_predictions=None,
    val_labels=None,
    tta: int = 1,
    batch_size: int = DEFAULT_BATCH,
) -> dict:
    """Predict a prepared part for `evaluate_predictions`: its ids, probs and labels, the
    validation (ids, probs, labels) to choose thresholds on, sources and run description.

    Labels default to the ones stored in the parts' records; `labels` / `val_labels`
    (NIH metadata or labelled split lists) replace them. Validation predictions are `val_predictions` (a
    CSV) when given, else the prepared val part predicted by the same model, as the
    trainer does (none when evaluating the val part itself).
    """
    from cxrjax.data.pipeline import labels_table, read_index
    from cxrjax.data.prepare import read_manifest
    from cxrjax.eval.labels import read_labels

    _, workdir = locate(checkpoint)
    if data is None:
        data = read_run_config(workdir).data.prepared if workdir is not None else ""
        if not data:
            raise InferenceError(f"{checkpoint}: no training run that names its prepared data; pass --data")
    data = Path(data)
    part_dir = data / part
    if not (part_dir / INDEX).is_file() or not (data / MANIFEST).is_file():
        raise InferenceError(f"{data}: not a finished `cxrjax prepare` output ({MANIFEST} and {part}/{INDEX} expected)")
    manifest = read_manifest(data)
    label_table = read_labels(labels) if labels else None  # bad labels fail before inference
    read_index(part_dir)  # and so does a damaged index
    # A run gives its own image size; bare weights take the prepared records' size.
    trained = load_trained(checkpoint, None if workdir is not None else manifest["image_size"])
    if manifest["image_size"] < trained.image_size:
        raise InferenceError(
            f"{data}: records are {manifest['image_size']}x{manifest['image_size']} px, smaller than the "
            f"model's {trained.image_size}x{trained.image_size} input; cxrjax does not upsample (as `prepare` "
            f"refuses to): prepare the data at {trained.image_size} px or more"
        )
    predictor = Predictor(trained, batch_size)
    ids, probs, record_labels = predict_part(predictor, part_dir, tta)
    if label_table is None:
        label_table = labels_table(ids, record_labels, part_dir)
    sources = {
        "checkpoint": str(trained.weights_dir),
        "data": str(part_dir),
        "labels": str(labels or f"{part_dir} (labels stored in the records)"),
        "tta": str(tta),
    }
    skip_val = part == "val" and not val_predictions
    val = (
        None if skip_val else _validation(predictor, data / "val", val_predictions, val_labels or labels, tta, sources)
    )
    # Described for the leaderboard as the trainer does.
    evaluation = part + (f", tta {tta}" if tta > 1 else "")
    run = run_info(trained.run_config, manifest, workdir, evaluation, data) if workdir is not None else None
    return {
        "ids": ids,
        "probs": probs,
        "labels": label_table,
        "val": val,
        "sources": sources,
        "run": run,
        "trained": trained,
    }


def _validation(predictor, val_dir: Path, val_predictions, label_file, tta: int, sources: dict):
    """(ids, probs, labels) of the validation predictions, or None without any."""
    from cxrjax.data.pipeline import labels_table, read_index, record_labels
    from cxrjax.eval.labels import read_labels
    from cxrjax.eval.predictions import read_predictions

    has_part = (val_dir / INDEX).is_file() and len(read_index(val_dir)) > 0
    part_labels = None
    if val_predictions:
        v = read_predictions(val_predictions)
        ids, probs = v.image_ids, v.probs
        sources["val_predictions"] = str(val_predictions)
    elif has_part:
        ids, probs, labels = predict_part(predictor, val_dir, tta)
        part_labels = labels_table(ids, labels, val_dir)
        sources["val_predictions"] = f"{val_dir} (predicted by the same model)"
    else:
        return None
    if label_file is None and not has_part:
        raise InferenceError(f"{val_dir}: no labelled val part; pass --val-labels for --val-predictions")
    sources["val_labels"] = str(label_file or f"{val_dir} (labels stored in the records)")
    if label_file:
        return ids, probs, read_labels(label_file)
    return ids, probs, part_labels if part_labels is not None else labels_table(*record_labels(val_dir), val_dir)
