"""Turn uint8 grayscale batches into model input on the device, inside the jitted step.

ImageNet statistics follow Keras's DenseNet preprocessing ('torch' mode: x/255, then
per-channel mean/std). Dataset statistics are measured on the training part only.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def stats_for(kind: str, channels: int, dataset_mean: float = 0.0, dataset_std: float = 1.0):
    """(mean, std) tuples of length `channels` for 'imagenet' or 'dataset'."""
    if kind == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if channels == 1:  # one channel standing for three identical ones
            mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
        return tuple(mean), tuple(std)
    if kind == "dataset":
        if dataset_std <= 0:
            raise ValueError("dataset std must be positive; measure it on the training part")
        return (dataset_mean,) * channels, (dataset_std,) * channels
    raise ValueError(f"unknown normalization {kind!r}; choose imagenet or dataset")


def to_model_input(images, mean, std, dtype=jnp.float32):
    """uint8 [B, H, W, 1] → normalized [B, H, W, len(mean)] in `dtype`."""
    x = images.astype(jnp.float32) / 255.0
    x = jnp.broadcast_to(x, (*x.shape[:-1], len(mean)))
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.astype(dtype)


def measure_mean_std(source, image_size: int, max_images: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Pixel mean and std (in [0, 1] units) over up to `max_images` training images."""
    from cxrjax.data.pipeline import DecodeAndAugment

    rng = np.random.default_rng(seed)
    keys = rng.permutation(len(source))[:max_images]
    decode = DecodeAndAugment(image_size)
    total = total_sq = count = 0.0
    for key in keys:
        x = decode.random_map(source[int(key)], rng)["image"].astype(np.float64) / 255.0
        total += x.sum()
        total_sq += np.square(x).sum()
        count += x.size
    mean = total / count
    return float(mean), float(np.sqrt(max(total_sq / count - mean**2, 1e-12)))
