"""The pure training step; `make_train_step` jits it over the mesh."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from cxrjax.data.normalize import to_model_input
from cxrjax.mesh import batch_sharded, replicated
from cxrjax.models import l2_penalty
from cxrjax.train.state import TrainState


def train_step(state: TrainState, batch: dict, *, model, loss_fn, mean, std, l2: float):
    """One optimizer step. Returns the new state and this step's metrics (on device)."""
    key = jax.random.fold_in(state.key, state.step)
    images = to_model_input(batch["image"], mean, std, model.dtype)

    def objective(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": key},
        )
        data_loss = loss_fn(logits, batch["labels"])
        penalty = l2 * l2_penalty(params) if l2 else jnp.zeros((), jnp.float32)
        # A model without BatchNorm has no batch statistics to update.
        return data_loss + penalty, (data_loss, updates.get("batch_stats", state.batch_stats))

    (total, (data_loss, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: u * state.lr_scale, updates)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    metrics = {
        "loss": data_loss,
        "total_loss": total,
        "grad_norm": _norm(grads),
        "param_norm": _norm(params),
        "nonfinite_state": _count_nonfinite((params, batch_stats)),
    }
    return new_state, metrics


def _norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _count_nonfinite(tree) -> jax.Array:
    """NaN or infinite entries among the new parameters and BatchNorm statistics."""
    return sum(jnp.sum(~jnp.isfinite(x)) for x in jax.tree.leaves(tree)).astype(jnp.float32)


def make_train_step(model, loss_fn, mesh, state, *, mean, std, l2: float):
    """jit the step: batch sharded over `data`, the state kept in the shardings of `state`
    (a state, or its `state_shapes`), the old state's buffers donated. Inference has one
    jitted function, `cxrjax.forward.predict_batch`."""
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(
        functools.partial(train_step, model=model, loss_fn=loss_fn, mean=mean, std=std, l2=l2),
        in_shardings=(state_sharding, batch_sharded(mesh)),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=0,
    )
