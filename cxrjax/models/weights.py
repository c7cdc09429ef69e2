"""The weights artifact: a directory with the model config (JSON) and its variables (orbax).

`cxrjax import-weights` writes it, the trainer starts from it (`model.init_from`), and
Grad-CAM / prediction read it. Layout::

    <dir>/model_config.json   the model config (see `default_model_config`)
    <dir>/variables/          orbax checkpoint of {'params', 'batch_stats'}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cxrjax.jsonfile import read_json
from cxrjax.models.classifier import default_model_config
from cxrjax.models.errors import WeightsError

CONFIG_FILE = "model_config.json"
VARIABLES_DIR = "variables"
# Top-level modules of ChestXrayClassifier, in the order they run.
PARTS = ("backbone", "attention", "classifier")
STEM_KERNEL = ("backbone", "conv1_conv", "kernel")


def save_weights(path: str | Path, variables: Mapping[str, Any], model_cfg) -> Path:
    path = Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose a new weights directory")
    path.mkdir(parents=True)
    cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    host = jax.tree.map(np.asarray, dict(variables))
    # Host values written by the calling process alone: orbax's default barriers would
    # wait forever for the other processes of a multi-process run.
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    with ocp.StandardCheckpointer(multiprocessing_options=alone) as checkpointer:
        checkpointer.save(path / VARIABLES_DIR, host)
    return path


def load_weights(path: str | Path, target: Any = None) -> tuple[ml_collections.ConfigDict, dict]:
    """(model config, variables). `target` (arrays or ShapeDtypeStructs with shardings)
    restores straight onto devices; without it the variables come back as numpy."""
    path = Path(path).absolute()
    config_file = path / CONFIG_FILE
    if not config_file.is_file() or not (path / VARIABLES_DIR).is_dir():
        raise FileNotFoundError(f"{path} is not a weights directory: expected {CONFIG_FILE} and {VARIABLES_DIR}/")
    cfg = default_model_config()
    stored = read_json(config_file, WeightsError)
    unknown = sorted(set(stored) - set(cfg))
    if unknown:
        raise WeightsError(f"{config_file}: unknown model config field(s) {', '.join(unknown)}")
    cfg.update(stored)
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(path / VARIABLES_DIR, target)
    if target is None:
        variables = jax.tree.map(np.asarray, variables)
    return cfg, variables


def gray_stem_for_imagenet(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 3-channel stem kernel (HWIO) of an ImageNet-normalized model, for a 1-channel
    model normalized with the averaged statistics (`stats_for("imagenet", 1)`): (kernel
    [H, W, 1, O], shift [O] to add to the stem BatchNorm's moving mean).

    The RGB model sees (g - m_c) / s_c in channel c of a gray image g, the gray model
    (g - m) / s. Folding each channel's 1/s_c into the kernel (K' = s * sum_c K_c / s_c)
    makes the g terms equal; what is left is the constant sum_c K_c (m_c - m) / s_c per
    output channel, which the BatchNorm's mean absorbs. So the stem output is the RGB
    model's exactly, except within the 3-pixel zero padding: the RGB model pads each
    channel at its own mean, which no single gray value can match (see docs/training.md).
    """
    from cxrjax.data.normalize import IMAGENET_MEAN, IMAGENET_STD, stats_for

    (gray_mean,), (gray_std,) = stats_for("imagenet", 1)
    k = np.asarray(kernel, np.float64)
    mean, std = np.asarray(IMAGENET_MEAN)[None, None, :, None], np.asarray(IMAGENET_STD)[None, None, :, None]
    folded = gray_std * (k / std).sum(axis=2, keepdims=True)
    shift = (k * (mean - gray_mean) / std).sum(axis=(0, 1, 2))
    return folded.astype(np.asarray(kernel).dtype), shift


def gray_stem(kernel: np.ndarray) -> np.ndarray:
    """A 3-channel stem kernel (HWIO) for 1-channel input: the sum over input channels.

    A gray image replicated to 3 channels through the 3-channel kernel gives exactly the
    1-channel image through the summed kernel (convolution is linear in the channels).
    """
    return np.asarray(kernel).sum(axis=2, keepdims=True)


def flat_paths(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    """{(collection, module, ..., leaf name): leaf} for a variables dict."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(dict(tree))[0]:
        flat[tuple(k.key for k in path)] = leaf
    return flat


def _unflat(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


def _part(path: tuple[str, ...]) -> str:
    return path[1]  # (collection, part, ...)


def merge_pretrained(
    fresh: Mapping[str, Any], loaded: Mapping[str, Any], loaded_cfg, model_cfg
) -> tuple[dict, dict[str, list[str]]]:
    """Start a model from a weights artifact: take every part the two configs share.

    The backbone is always taken (same arch required); CBAM when both have it; the head
    when both use the same head type and class count. Everything else keeps its fresh
    initialization. Every taken tensor must match by path, shape and dtype. A 3-channel
    stem loaded into a 1-channel model is summed over its input channels (`gray_stem`).

    Returns (variables, report) where report lists '/'-joined paths under 'loaded',
    'fresh' (initialized here) and 'ignored' (in the artifact but not used), plus
    'converted' notes.
    """
    if loaded_cfg.arch != model_cfg.arch:
        raise WeightsError(f"weights are {loaded_cfg.arch}, the model is {model_cfg.arch}")
    take = {"backbone"}
    if loaded_cfg.cbam and model_cfg.cbam:
        take.add("attention")
    if loaded_cfg.head == model_cfg.head and loaded_cfg.num_classes == model_cfg.num_classes:
        take.add("classifier")
    fresh_flat, loaded_flat = flat_paths(fresh), flat_paths(loaded)
    merged = dict(fresh_flat)
    report: dict[str, list[str]] = {"loaded": [], "fresh": [], "ignored": [], "converted": []}
    for path, value in loaded_flat.items():
        name = "/".join(path)
        if _part(path) not in take:
            report["ignored"].append(name)
            continue
        if path not in fresh_flat:
            raise WeightsError(f"weights tensor {name} has no place in the model")
        want = fresh_flat[path]
        value = np.asarray(value)
        if path[1:] == STEM_KERNEL and value.shape[2] == 3 and want.shape[2] == 1:
            value = gray_stem(value)
            report["converted"].append(f"{name}: 3-channel stem summed over input channels")
        if value.shape != want.shape or value.dtype != want.dtype:
            raise WeightsError(
                f"weights tensor {name} is {value.dtype}{list(value.shape)}, "
                f"the model expects {want.dtype}{list(want.shape)}"
            )
        merged[path] = value
        report["loaded"].append(name)
    missing = [p for p in fresh_flat if _part(p) in take and p not in loaded_flat]
    if missing:
        raise WeightsError("weights lack tensor(s) the model needs: " + ", ".join("/".join(p) for p in missing))
    report["fresh"] = ["/".join(p) for p in fresh_flat if _part(p) not in take]
    return _unflat(merged), report
