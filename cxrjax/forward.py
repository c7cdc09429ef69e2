"""The one inference path: the inference-mode forward pass and the batch padding that
every prediction goes through (validation and the final test inside training,
`cxrjax evaluate`, `predict`, `gradcam`).

Batches are padded to one fixed size, so each model compiles once per batch shape, and
every process runs the same number of batches (each one is a collective over the
mesh); padded rows carry the key -1 and are dropped after gathering.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import numpy as np

from cxrjax.data.normalize import to_model_input
from cxrjax.findings import FINDINGS
from cxrjax.mesh import DeviceBatches, to_host

if TYPE_CHECKING:
    from cxrjax.data.pipeline import ShardedRecords


def forward(model, mean, std, variables, images) -> dict:
    """{"logits", "probs"} [B, 14] for uint8 images [B, H, W, 1] in inference mode; mean
    and std are per channel."""
    x = to_model_input(images, mean, std, model.dtype)
    logits = model.apply(variables, x, train=False)
    return {"probs": jax.nn.sigmoid(logits), "logits": logits}


# The one jitted inference function: the trainer's validation and test passes, `cxrjax
# evaluate`, `predict`, `gradcam` and the benchmark's inference row all run it (callers
# look it up here at call time, so a test can watch every use). One compile per model
# and batch shape.
predict_batch = jax.jit(forward, static_argnums=0)


def pad_rows(a, size: int, fill=0) -> np.ndarray:
    """`a` with its batch axis padded to `size` rows of `fill`."""
    a = np.asarray(a)
    if len(a) > size:
        raise ValueError(f"batch of {len(a)} exceeds the batch size {size}")
    padded = np.full((size, *a.shape[1:]), fill, a.dtype)
    padded[: len(a)] = a
    return padded


def record_batches(loader, size: int, count: int, image_size: int):
    """Exactly `count` batches of `size` rows from an evaluation loader: its batches
    padded, then batches of padding only once this process's records run out."""
    empty = {
        "image": np.zeros((0, image_size, image_size, 1), np.uint8),
        "key": np.zeros(0, np.int32),
        "labels": np.zeros((0, len(FINDINGS)), np.float32),
    }
    it = iter(loader)
    for _ in range(count):
        batch = next(it, None) or empty
        yield {
            name: pad_rows(np.asarray(batch[name], like.dtype), size, -1 if name == "key" else 0)
            for name, like in empty.items()
        }


def predict_records(
    source: ShardedRecords,
    predict,
    *,
    mesh,
    batch_size: int,
    image_size: int,
    seed: int = 0,
    local: bool = False,
    after_batch=None,
) -> dict:
    """{"key", "labels", and `predict`'s outputs} over every record of `source`, in record
    order; the labels are the records' own (CRC-checked), not the index's.

    `batch_size` is per process. `predict(images)` maps a padded uint8 batch to [batch, ...]
    outputs: a global batch over `mesh`, sent ahead by `DeviceBatches`, or, when `local`,
    this process's numpy batch. Every
    process reads a contiguous range of at most ceil(n / P) records; `local` reads all
    of them in this process alone. `after_batch()`, when given, runs as each batch's
    outputs reach the host: the pass's bar and the trainer's stop check, which may raise to
    end the pass there.
    """
    from cxrjax.data.pipeline import make_loader  # grain: only where records are read (bench images lack it)

    index, count = (0, 1) if local else (jax.process_index(), jax.process_count())
    loader = make_loader(
        source,
        batch_size=batch_size,
        image_size=image_size,
        seed=seed,
        train=False,
        process_index=index,
        process_count=count,
    )
    steps = math.ceil(math.ceil(len(source) / count) / batch_size)
    batches = record_batches(loader, batch_size, steps, image_size)
    if not local:  # keys and labels travel as global arrays too, so they line up with the outputs
        batches = DeviceBatches(batches, mesh)
    gathered = []

    def collect(outputs):
        gathered.append(to_host(outputs))
        if after_batch is not None:
            after_batch()

    running = None
    for batch in batches:
        # Each batch's outputs come to the host once the next batch is queued behind it.
        done, running = running, {"key": batch["key"], "labels": batch["labels"], **predict(batch["image"])}
        if done is not None:
            collect(done)
    if running is not None:
        collect(running)
    if not gathered:
        raise ValueError(f"{source.part_dir}: the part holds no records to predict")
    merged = {name: np.concatenate([g[name] for g in gathered]) for name in gathered[0]}
    valid = merged["key"] >= 0
    order = np.argsort(merged["key"][valid], kind="stable")
    return {name: values[valid][order] for name, values in merged.items()}
