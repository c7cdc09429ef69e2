"""The reference tutorials' augmentation: small rotation, shift, zoom and shear, as one
affine warp. Horizontal flip is optional (off: it moves the heart to the right); a
vertical flip is never done.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    rotation_deg: float = 10.0
    shift: float = 0.05  # fraction of the image side
    zoom: float = 0.1  # scale drawn from [1 - zoom, 1 + zoom]
    shear_deg: float = 5.0
    horizontal_flip: bool = False


def affine_matrix(cfg: AugmentConfig, size: int, rng: np.random.Generator) -> np.ndarray:
    """A 2x3 matrix about the image centre; drawn from `rng` so grain makes it
    deterministic per record and epoch."""
    angle = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
    shear = np.deg2rad(rng.uniform(-cfg.shear_deg, cfg.shear_deg))
    scale = rng.uniform(1 - cfg.zoom, 1 + cfg.zoom)
    tx, ty = rng.uniform(-cfg.shift, cfg.shift, 2) * size
    flip = -1.0 if cfg.horizontal_flip and rng.random() < 0.5 else 1.0
    rotate = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shear_m = np.array([[1.0, np.tan(shear)], [0.0, 1.0]])
    linear = scale * rotate @ shear_m @ np.diag([flip, 1.0])
    centre = np.array([(size - 1) / 2, (size - 1) / 2])
    offset = centre - linear @ centre + np.array([tx, ty])
    return np.hstack([linear, offset[:, None]]).astype(np.float32)


def random_affine(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    size = image.shape[0]
    m = affine_matrix(cfg, size, rng)
    return cv2.warpAffine(
        image, m, (image.shape[1], size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
