"""CBAM (Woo et al. 2018) on the final feature map, as used by Fisher (2025).

Channel attention: global average and global max pooling through one shared MLP
(C -> C/2 -> C, ReLU between), summed, sigmoid, multiplied in. Then spatial attention:
channel-wise mean and max, concatenated, 7x7 conv to one map, sigmoid, multiplied in.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class CBAM(nn.Module):
    dtype: Any = jnp.float32
    reduction: int = 2
    spatial_kernel: int = 7

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        hidden = nn.Dense(channels // self.reduction, dtype=self.dtype, name="mlp_hidden")
        out = nn.Dense(channels, dtype=self.dtype, name="mlp_out")

        def mlp(v):
            return out(nn.relu(hidden(v)))

        avg = jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(x.dtype)
        mx = jnp.max(x, axis=(1, 2))
        channel_gate = nn.sigmoid(mlp(avg) + mlp(mx))
        x = x * channel_gate[:, None, None, :].astype(x.dtype)

        pooled = jnp.concatenate(
            [
                jnp.mean(x, axis=-1, keepdims=True, dtype=jnp.float32).astype(x.dtype),
                jnp.max(x, axis=-1, keepdims=True),
            ],
            axis=-1,
        )
        k = self.spatial_kernel
        spatial_gate = nn.Conv(
            1,
            (k, k),
            padding=((k // 2, k // 2),) * 2,
            use_bias=False,
            dtype=self.dtype,
            name="spatial_conv",
        )(pooled)
        return x * nn.sigmoid(spatial_gate).astype(x.dtype)
