"""DenseNet backbone laid out exactly like `keras.applications.DenseNet121/169/201`.

Module names follow Keras layer names so that weights map by name: the Keras name of a
layer is its flax path below the backbone joined with "_" (`conv2_block1` / `1_conv` is
Keras `conv2_block1_1_conv`; `pool2` / `bn` is `pool2_bn`; the stem is `conv1_conv`,
`conv1_bn`; the last norm is `bn`).

Padding is explicit where Keras pads explicitly (ZeroPadding2D 3 before the 7x7 stride-2
stem conv and 1 before the 3x3 stride-2 max pool): flax "SAME" pads asymmetrically for
stride 2 and would shift every feature map by one pixel relative to Keras.

A dense layer takes the *list* of feature maps produced so far and concatenates them
itself. Under remat this makes the layer a memory-efficient DenseNet layer (Pleiss et
al. 2017): only the thin per-layer outputs are kept for the backward pass and the
concat + BN + ReLU + convs are recomputed, instead of one growing concat per layer.

`remat` (one of REMAT_MODES) says which parts are recomputed in the backward pass:
- "none": nothing; every BatchNorm keeps two float32 tensors, every ReLU its output.
- "dense_layers": each dense layer, as above.
- "all": also the stem, each transition and the final norm, each taking the block's
  list of maps and concatenating inside, so the backward pass keeps only the input
  image, each block's input and each layer's `growth_rate`-channel output, all in the
  compute dtype: the memory-efficient DenseNet's floor (`saved_activation_floor`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Keras BatchNormalization(epsilon=1.001e-5, momentum=0.99); flax uses the same
# momentum convention (new = momentum * old + (1 - momentum) * batch).
BN_EPSILON = 1.001e-5
BN_MOMENTUM = 0.99


@dataclasses.dataclass(frozen=True)
class DenseNetSpec:
    block_config: tuple[int, ...]
    growth_rate: int
    init_features: int


# `tiny` keeps the exact structure at a size that runs in milliseconds, for tests.
ARCHS: dict[str, DenseNetSpec] = {
    "densenet121": DenseNetSpec((6, 12, 24, 16), 32, 64),
    "densenet169": DenseNetSpec((6, 12, 32, 32), 32, 64),
    "densenet201": DenseNetSpec((6, 12, 48, 32), 32, 64),
    "tiny": DenseNetSpec((2, 2, 2, 2), 8, 16),
}


def arch_spec(arch: str) -> DenseNetSpec:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    return ARCHS[arch]


REMAT_MODES = ("none", "dense_layers", "all")


def remat_mode(value: str | bool) -> str:
    """`model.remat` as one of REMAT_MODES. Run configs written before the modes existed
    hold a bool: True meant per-layer remat, False none."""
    if isinstance(value, bool):
        return "dense_layers" if value else "none"
    if value not in REMAT_MODES:
        raise ValueError(f"unknown remat {value!r}; expected one of {', '.join(REMAT_MODES)}")
    return value


def maybe_remat(target, enabled: bool, policy_name: str):
    """`target` (a Module class, or a function taking a module first) rematerialized when
    `enabled`. A lifted function keeps the names of the layers it creates."""
    return nn.remat(target, policy=remat_policy(policy_name)) if enabled else target


def remat_policy(name: str) -> Callable[..., bool]:
    """The `jax.checkpoint_policies` entry called `name`."""
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None or name.startswith("_"):
        options = [p for p in dir(jax.checkpoint_policies) if not p.startswith("_")]
        raise ValueError(f"unknown remat_policy {name!r}; expected one of {', '.join(options)}")
    return policy


def _batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
    # Statistics and scale/bias stay float32 (param_dtype); flax reduces in float32.
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _conv(features: int, kernel: int, dtype: Any, name: str, strides: int = 1, padding="VALID"):
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=padding,
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class DenseLayer(nn.Module):
    """Keras `conv_block`: BN-ReLU-1x1 conv (4k) - BN-ReLU-3x3 conv (k); returns the k new maps."""

    growth_rate: int
    train: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
        x = jnp.concatenate(features, axis=-1) if len(features) > 1 else features[0]
        x = nn.relu(_batch_norm(self.train, self.dtype, "0_bn")(x))
        x = _conv(4 * self.growth_rate, 1, self.dtype, "1_conv")(x)
        x = nn.relu(_batch_norm(self.train, self.dtype, "1_bn")(x))
        return _conv(self.growth_rate, 3, self.dtype, "2_conv", padding=((1, 1), (1, 1)))(x)


class Transition(nn.Module):
    """Keras `transition_block`: BN-ReLU-1x1 conv halving channels, 2x2 average pool.

    Takes the block's list of maps, so that under remat the concatenation is recomputed
    rather than kept."""

    train: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
        x = jnp.concatenate(features, axis=-1)
        x = nn.relu(_batch_norm(self.train, self.dtype, "bn")(x))
        x = _conv(int(x.shape[-1] * 0.5), 1, self.dtype, "conv")(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class DenseNet(nn.Module):
    """Keras DenseNet without top, ending in `bn` + ReLU; returns the NHWC feature map."""

    block_config: tuple[int, ...]
    growth_rate: int
    init_features: int
    dtype: Any = jnp.float32
    remat: str = "none"  # one of REMAT_MODES
    remat_policy: str = "nothing_saveable"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        mode = remat_mode(self.remat)
        everything = mode == "all"
        layer_cls = maybe_remat(DenseLayer, mode != "none", self.remat_policy)
        transition_cls = maybe_remat(Transition, everything, self.remat_policy)

        def stem(module, x):
            x = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
            x = _conv(self.init_features, 7, self.dtype, "conv1_conv", strides=2)(x)
            x = nn.relu(_batch_norm(train, self.dtype, "conv1_bn")(x))
            x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")

        def final_norm(module, features):
            x = jnp.concatenate(features, axis=-1)
            return nn.relu(_batch_norm(train, self.dtype, "bn")(x))

        # Cast before the stem so that remat keeps the image in the compute dtype.
        x = maybe_remat(stem, everything, self.remat_policy)(self, x.astype(self.dtype))
        last = len(self.block_config) - 1
        for b, num_layers in enumerate(self.block_config):
            features = [x]
            for i in range(num_layers):
                name = f"conv{b + 2}_block{i + 1}"
                layer = layer_cls(self.growth_rate, train, dtype=self.dtype, name=name)
                features.append(layer(features))
            if b != last:
                x = transition_cls(train, dtype=self.dtype, name=f"pool{b + 2}")(features)
        return maybe_remat(final_norm, everything, self.remat_policy)(self, features)


def saved_activation_floor(spec: DenseNetSpec, image_size: int, in_channels: int, itemsize: int) -> int:
    """Bytes per image that a memory-efficient DenseNet must keep for the backward pass
    (Pleiss et al. 2017): the input image, each block's input and each layer's output,
    and the final feature map the head and attention start from, at `itemsize` bytes.
    What `remat="all"` should reach; everything else can be recomputed."""
    side = -(-(image_size + 6 - 7 + 1) // 2)  # stem conv: pad 3, 7x7 stride 2
    side = (side + 2 - 3) // 2 + 1  # max pool: pad 1, 3x3 stride 2
    channels, elements = spec.init_features, image_size * image_size * in_channels
    last = len(spec.block_config) - 1
    for b, num_layers in enumerate(spec.block_config):
        channels += num_layers * spec.growth_rate
        elements += side * side * channels
        if b != last:
            channels, side = channels // 2, side // 2
    elements += side * side * channels  # the final feature map
    return elements * itemsize


def keras_layer_names(block_config: Sequence[int]) -> list[str]:
    """Names of the weight-carrying layers of the Keras DenseNet, in `model.layers` order.

    Keras 3 `.weights.h5` files key layers by this order (`conv2d_7` is the 8th Conv2D).
    """
    names = ["conv1_conv", "conv1_bn"]
    last = len(block_config) - 1
    for b, num_layers in enumerate(block_config):
        for i in range(num_layers):
            prefix = f"conv{b + 2}_block{i + 1}"
            names += [f"{prefix}_0_bn", f"{prefix}_1_conv", f"{prefix}_1_bn", f"{prefix}_2_conv"]
        if b != last:
            names += [f"pool{b + 2}_bn", f"pool{b + 2}_conv"]
    return names + ["bn"]
