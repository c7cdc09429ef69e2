"""A training workdir as `cxrjax train` leaves it (config.json, best_weights/, and
normalization.json for dataset statistics), holding a tiny model with random weights,
for the inference tests. Training itself is tested elsewhere and is too slow here."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.config import base_config, smoke
from cxrjax.models import build_model, default_model_config
from cxrjax.models.weights import save_weights
from cxrjax.workdir import BEST_WEIGHTS, NORMALIZATION, RUN_CONFIG


def tiny_variables(model_cfg, image_size: int, seed: int = 0) -> dict:
    """Random variables of the model's structure (tracing only: a real init compiles),
    scaled like a fan-in initialization, with non-trivial BatchNorm statistics."""
    x = jnp.zeros((1, image_size, image_size, model_cfg.in_channels))
    shapes = jax.eval_shape(lambda: build_model(model_cfg).init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            value = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            value = rng.normal(0, 0.1, shape)
        return value.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def write_run(
    workdir: Path,
    image_size: int,
    *,
    prepared: str = "",
    dataset_stats: tuple | None = None,
    seed: int = 0,
    **model_fields,
) -> tuple:
    """(model config, variables) of a tiny model saved as `workdir`'s best weights."""
    model_cfg = default_model_config()
    model_cfg.update(arch="tiny", **model_fields)
    variables = tiny_variables(model_cfg, image_size, seed)
    config = smoke(base_config(), image_size)
    config.model = model_cfg
    config.data.prepared = prepared
    workdir.mkdir(parents=True)
    if dataset_stats is not None:
        config.data.normalization = "dataset"
        mean, std = dataset_stats
        (workdir / NORMALIZATION).write_text(json.dumps({"mean": mean, "std": std, "measured_on": "train"}))
    (workdir / RUN_CONFIG).write_text(config.to_json_best_effort())
    save_weights(workdir / BEST_WEIGHTS, variables, model_cfg)
    return model_cfg, variables
