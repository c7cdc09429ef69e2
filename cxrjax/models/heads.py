"""Classification heads on the (pooled) feature map. Both return float32 logits.

The heads compute in float32 whatever the backbone's compute dtype: they are a few
small matmuls, and float32 logits keep the loss and the sigmoid well conditioned.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxrjax.findings import NUM_FINDINGS


def global_average_pool(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=(1, 2), dtype=jnp.float32)


class ChexnetHead(nn.Module):
    """CheXNet (Rajpurkar et al. 2017): GAP -> Dense(14)."""

    num_classes: int = NUM_FINDINGS

    @nn.compact
    def __call__(self, fmap: jax.Array, train: bool = False) -> jax.Array:
        return nn.Dense(self.num_classes, name="logits")(global_average_pool(fmap))


class FisherHead(nn.Module):
    """Fisher (2025): GAP -> Dense 128 ReLU -> Dropout -> Dense 64 ReLU -> Dropout -> Dense 14.

    The paper's L2 on the Dense kernels is a loss term; see `l2_penalty`.
    """

    num_classes: int = NUM_FINDINGS
    dropout: float = 0.3

    @nn.compact
    def __call__(self, fmap: jax.Array, train: bool = False) -> jax.Array:
        x = global_average_pool(fmap)
        x = nn.relu(nn.Dense(128, name="dense1")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.relu(nn.Dense(64, name="dense2")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="logits")(x)


def head_kernel_paths(params: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Paths (below params) of the head's Dense kernels, the tensors `l2_penalty` covers."""
    head = params["classifier"]
    return [("classifier", name, "kernel") for name in sorted(head) if "kernel" in head[name]]


def l2_penalty(params: Mapping[str, Any]) -> jax.Array:
    """Sum of squares of the head's Dense kernels (biases excluded).

    Keras `kernel_regularizer=l2(lam)` adds `lam * sum(w**2)`: the trainer multiplies
    this by its coefficient.
    """
    total = jnp.zeros((), jnp.float32)
    for top, name, leaf in head_kernel_paths(params):
        total = total + jnp.sum(jnp.square(params[top][name][leaf].astype(jnp.float32)))
    return total
