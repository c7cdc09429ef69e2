"""The whole training state as one pytree: what the step transforms and orbax saves."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    lr_scale: jax.Array  # reduce-on-plateau's factor, set between epochs
    key: jax.Array  # raw uint32 key; the step's key is fold_in(key, step)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, variables, tx, seed: int) -> TrainState:
        params = variables["params"]
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            lr_scale=jnp.ones((), jnp.float32),
            key=jax.random.PRNGKey(seed),
            tx=tx,
        )

    @property
    def variables(self):
        return {"params": self.params, "batch_stats": self.batch_stats}
