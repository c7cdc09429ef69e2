"""What the backward pass keeps: the residuals `jax.grad` saves from a training forward.

Counted from shapes alone (`jax.eval_shape` of `jax.vjp`), so DenseNet121 at 1024 px is
measured in seconds on any machine, with nothing compiled or allocated. This is the
activation memory that remat controls; XLA's compiled figures add the parameters,
optimizer state, gradients and its own scheduling on top.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def saved_activation_bytes_per_image(model, image_size: int) -> int:
    """Bytes per image of the residuals kept for the gradient of a training-mode forward
    (BatchNorm on batch statistics, dropout active) with respect to the parameters.

    Taken as the difference between batch 2 and batch 1, which removes what does not
    grow with the batch (parameters kept by a rematerialized layer, for example).
    """
    image = (image_size, image_size, model.in_channels)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image)), train=False))

    def residual_bytes(batch: int) -> int:
        def pullback(variables, x):
            def forward(params):
                logits, updates = model.apply(
                    {**variables, "params": params},
                    x,
                    train=True,
                    mutable=["batch_stats"],
                    rngs={"dropout": jax.random.key(0)},
                )
                return jnp.sum(logits), updates

            return jax.vjp(forward, variables["params"], has_aux=True)[1]

        x = jax.ShapeDtypeStruct((batch, *image), model.dtype)
        residuals = jax.tree.leaves(jax.eval_shape(pullback, variables, x))
        return sum(int(r.size) * r.dtype.itemsize for r in residuals)

    return residual_bytes(2) - residual_bytes(1)
