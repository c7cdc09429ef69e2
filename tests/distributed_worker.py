"""One process of a multi-process run of the jitted train step (tests/test_distributed.py).

Started with CXRJAX_COORDINATOR / CXRJAX_NUM_PROCESSES / CXRJAX_PROCESS_ID and
JAX_NUM_CPU_DEVICES in the environment, it joins the cluster through
cxrjax.train.distributed, feeds its share of fixed global batches and, on process 0,
writes the resulting parameters and batch statistics to OUT (an .npz file).

    python tests/distributed_worker.py OUT
"""

from __future__ import annotations

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cxrjax.config import base_config
from cxrjax.data.normalize import stats_for
from cxrjax.mesh import make_mesh, per_process_batch, to_global
from cxrjax.train import losses
from cxrjax.train.distributed import maybe_initialize
from cxrjax.train.state import TrainState, initial_state
from cxrjax.train.step import make_train_step

SIZE, GLOBAL_BATCH, STEPS = 16, 16, 3


class SmallNet(nn.Module):
    """BatchNorm (global statistics under sharding) and dropout (the step's RNG)."""

    dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), strides=(2, 2))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.Dropout(0.5, deterministic=not train)(x.reshape(x.shape[0], -1))
        return nn.Dense(14)(x)


def global_batches():
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        yield {
            "image": rng.integers(0, 256, (GLOBAL_BATCH, SIZE, SIZE, 1), dtype=np.uint8),
            "labels": (rng.random((GLOBAL_BATCH, 14)) < 0.3).astype(np.float32),
        }


def train(mesh) -> TrainState:
    """STEPS SGD steps over `mesh`; this process feeds its contiguous share of each global batch."""
    model, tx = SmallNet(), optax.sgd(0.1, momentum=0.9)
    state = initial_state(model, tx, mesh, image_size=SIZE, channels=3, seed=0)  # the trainer's initialiser
    mean, std = stats_for("imagenet", 3)
    train_step = make_train_step(model, losses.bce, mesh, state, mean=mean, std=std, l2=0.0)
    local = per_process_batch(GLOBAL_BATCH, mesh)
    start = jax.process_index() * local
    for batch in global_batches():
        state, _ = train_step(state, to_global({k: v[start : start + local] for k, v in batch.items()}, mesh))
    return state


def main(out: str) -> None:
    if not maybe_initialize(base_config().distributed):
        raise SystemExit("no cluster described: set CXRJAX_COORDINATOR, CXRJAX_NUM_PROCESSES, CXRJAX_PROCESS_ID")
    state = train(make_mesh())
    host = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(host)}
        np.savez(out, **flat)


if __name__ == "__main__":
    main(sys.argv[1])
