"""The whole training state as one pytree (what the step transforms and orbax saves), and
the one way to make it."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from cxrjax.mesh import replicated


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


def _variables_fn(model, image_size: int, channels: int):
    dummy = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
    return lambda key: model.init(key, dummy, train=False)


def _sharded(tree, mesh):
    return jax.tree.map(lambda _: replicated(mesh), tree)


def state_shapes(model, tx, mesh, *, image_size: int, channels: int, seed: int = 0) -> TrainState:
    """The state's ShapeDtypeStructs with its replicated shardings, without computing it:
    for lowering on compile-only devices, and for restoring a checkpoint into."""
    init = _variables_fn(model, image_size, channels)
    shapes = jax.eval_shape(lambda key: TrainState.create(init(key), tx, seed), jax.random.PRNGKey(seed))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, _sharded(shapes, mesh))


def initial_state(model, tx, mesh, *, image_size: int, channels: int, seed: int = 0, pretrained=None) -> TrainState:
    """A fresh state made by one jit straight into its replicated sharding: the one
    initialiser of the trainer, the benchmark and the tests. `pretrained(variables)`, when
    given, returns the variables with loaded weights merged in (on the host).

    Every process computes the same values from the seed; a device_put of host values onto
    a multi-process sharding would instead compare them across processes leaf by leaf."""
    variables = jax.jit(_variables_fn(model, image_size, channels))(jax.random.PRNGKey(seed))
    if pretrained is not None:
        variables = pretrained(variables)
    variables = jax.device_get(variables)  # numpy: the same on every process
    create = lambda v: TrainState.create(v, tx, seed)  # noqa: E731
    return jax.jit(create, out_shardings=_sharded(jax.eval_shape(create, variables), mesh))(variables)
