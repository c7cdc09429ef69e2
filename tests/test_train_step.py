"""The jitted train step: sharding over 8 devices changes nothing but the speed,
gradient accumulation equals one big step, the step's RNG comes from the step number,
and the old state's buffers are donated."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from distributed_worker import SmallNet

from cxrjax.data.normalize import stats_for
from cxrjax.mesh import make_mesh, replicated, to_global
from cxrjax.models import build_model, default_model_config
from cxrjax.train import losses, optim
from cxrjax.train.state import initial_state
from cxrjax.train.step import make_train_step

SIZE = 32
MEAN, STD = stats_for("imagenet", 3)


def _batch(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, SIZE, SIZE, 1), dtype=np.uint8),
        "labels": (rng.random((n, 14)) < 0.3).astype(np.float32),
    }


def _tiny(head: str = "fisher"):
    cfg = default_model_config()
    cfg.update(arch="tiny", head=head, dropout=0.3)
    return build_model(cfg)


def _place(model, tx, mesh, seed: int = 0):
    """A fresh state replicated over `mesh` (the trainer's initialiser), and the jitted step for it."""
    state = initial_state(model, tx, mesh, image_size=SIZE, channels=3, seed=seed)
    return state, make_train_step(model, losses.bce, mesh, state, mean=MEAN, std=STD, l2=0.0)


def _run(model, tx, mesh, batches):
    state, train_step = _place(model, tx, mesh)
    for batch in batches:
        state, metrics = train_step(state, to_global(batch, mesh))
    return jax.device_get(state), jax.device_get(metrics)


@pytest.fixture(scope="module")
def eight_vs_one():
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 CPU devices"
    model, tx = _tiny(), optax.sgd(0.1, momentum=0.9)
    batches = [_batch(16, seed) for seed in range(2)]
    eight = _run(model, tx, make_mesh(), batches)
    one = _run(model, tx, make_mesh(jax.devices()[:1]), batches)
    return eight, one


def _assert_trees_close(a, b, atol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_eight_device_step_equals_one_device_step(eight_vs_one):
    """Two SGD steps (momentum 0.9) with BatchNorm and dropout: the batch split over 8 devices gives
    the 1-device result. BatchNorm sees the global batch (XLA all-reduces its mean and
    variance); a per-device BatchNorm over 2 images each would differ at the 1e-1 level."""
    (s8, m8), (s1, m1) = eight_vs_one
    _assert_trees_close(s8.params, s1.params, atol=1e-5)
    _assert_trees_close(s8.batch_stats, s1.batch_stats, atol=1e-5)
    assert float(m8["loss"]) == pytest.approx(float(m1["loss"]), abs=1e-6)
    assert int(s8.step) == int(s1.step) == 2


def test_training_moved_the_parameters(eight_vs_one):
    """Guards the comparison above against a step that changes nothing."""
    (s8, _), _ = eight_vs_one
    model = _tiny()
    fresh = model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False)
    moved = max(
        float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(fresh["params"]))
    )
    assert moved > 1e-3


class _Linear(nn.Module):
    """No BatchNorm and no dropout: a half batch's gradient does not depend on the other half."""

    dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(14)(x.reshape(x.shape[0], -1)[:, ::16])


def test_gradient_accumulation_equals_one_full_batch_step():
    """optim.grad_accum_steps=2 on two half batches = one SGD step on the full batch:
    optax.MultiSteps applies the mean of the two half-batch gradients, and each half's
    loss is a mean, so that is the full batch's gradient. (With BatchNorm in train mode
    each half would be normalized by its own statistics, which changes the gradient.)"""
    cfg = ml_collections.ConfigDict(
        dict(
            name="sgd",
            momentum=0.0,
            nesterov=False,
            learning_rate=0.5,
            schedule="constant",
            grad_accum_steps=2,
        )
    )
    mesh = make_mesh()
    full = _batch(16, seed=7)
    halves = [{k: v[:8] for k, v in full.items()}, {k: v[8:] for k, v in full.items()}]
    accumulated, _ = _run(_Linear(), optim.make_optimizer(cfg, optim.make_schedule(cfg, 10, 100)), mesh, halves)
    cfg.grad_accum_steps = 1
    single, _ = _run(_Linear(), optim.make_optimizer(cfg, optim.make_schedule(cfg, 10, 100)), mesh, [full])
    _assert_trees_close(accumulated.params, single.params, atol=1e-6)
    fresh = _Linear().init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    assert not np.allclose(single.params["Dense_0"]["kernel"], fresh["Dense_0"]["kernel"])


def test_first_accumulated_step_does_not_move_the_parameters():
    cfg = ml_collections.ConfigDict(
        dict(
            name="sgd",
            momentum=0.0,
            nesterov=False,
            learning_rate=0.5,
            schedule="constant",
            grad_accum_steps=2,
        )
    )
    after_one, _ = _run(
        _Linear(), optim.make_optimizer(cfg, optim.make_schedule(cfg, 10, 100)), make_mesh(), [_batch(8)]
    )
    fresh = _Linear().init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    _assert_trees_close(after_one.params, fresh, atol=0)


@pytest.fixture(scope="module")
def small_steps():
    model = SmallNet()
    mesh = make_mesh()
    state, train_step = _place(model, optax.sgd(0.1), mesh)
    return model, mesh, jax.device_get(state), train_step


def test_step_rng_is_folded_from_the_step_number(small_steps):
    """The dropout key is fold_in(state.key, state.step): recomputing the loss with that
    key by hand reproduces the step's loss, and another step number gives another mask."""
    model, mesh, host_state, train_step = small_steps
    batch = _batch(8, seed=3)
    losses_at = {}
    for step in (5, 5, 6):
        state = jax.device_put(host_state.replace(step=jnp.int32(step)), replicated(mesh))
        _, metrics = train_step(state, to_global(batch, mesh))
        losses_at.setdefault(step, []).append(float(metrics["loss"]))
    assert losses_at[5][0] == losses_at[5][1]
    assert losses_at[5][0] != losses_at[6][0]

    x = (batch["image"].astype(np.float32) / 255.0).repeat(3, -1)
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    logits, _ = model.apply(
        host_state.variables,
        x,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.fold_in(host_state.key, 5)},
    )
    assert float(losses.bce(logits, batch["labels"])) == pytest.approx(losses_at[5][0], rel=1e-5)


def test_state_buffers_are_donated(small_steps):
    _, mesh, host_state, train_step = small_steps
    state = jax.device_put(host_state, replicated(mesh))
    new_state, _ = train_step(state, to_global(_batch(8), mesh))
    old, new = jax.tree.leaves(state), jax.tree.leaves(new_state)
    assert all(x.is_deleted() for x in old)
    assert not any(x.is_deleted() for x in new)
