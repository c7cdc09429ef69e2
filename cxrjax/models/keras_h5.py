"""Read Keras DenseNet weight files with h5py, as data only (never through keras or pickle).

Both readers return {keras layer name: {variable: array}} with Keras variable names
(kernel, bias, gamma, beta, moving_mean, moving_variance) and Keras layouts (HWIO
kernels, [in, out] dense kernels).

Legacy h5 (the published `densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5`):
root attribute `layer_names`; one group per layer with attribute `weight_names`; each
weight a dataset at `<layer>/<weight name>`, e.g. `conv1/conv/conv1/conv/kernel:0` (the
published files still use keras-applications' old `conv1/conv`, `conv1/bn` names, read
here as `conv1_conv`, `conv1_bn`). Full-model files keep the same under `model_weights`.

Keras 3 `.weights.h5` (`model.save_weights('x.weights.h5')`): `layers/<class>[_k]/vars/<i>`
where `conv2d_7` is the model's 8th Conv2D layer, so layers are keyed by order. Keras
>= 3.10 also stores the layer's own name as attribute `name` of `vars`; when present it
must agree with the name the order implies.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from cxrjax.models.errors import WeightsError

LayerTensors = dict[str, dict[str, np.ndarray]]

# Keras 3 saves a layer's variables in `layer.weights`-creation order.
KERAS3_VARIABLES = {
    "conv2d": ("kernel", "bias"),
    "batch_normalization": ("gamma", "beta", "moving_mean", "moving_variance"),
    "dense": ("kernel", "bias"),
}


def _strings(attrs, name: str) -> list[str]:
    """A string-list attribute, joining Keras' chunks (`name0`, `name1`, ...) if split."""
    if name in attrs:
        values = list(attrs[name])
    else:
        values, chunk = [], 0
        while f"{name}{chunk}" in attrs:
            values += list(attrs[f"{name}{chunk}"])
            chunk += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _dataset(group: h5py.Group, key: str, where: str) -> np.ndarray:
    item = group.get(key)
    if not isinstance(item, h5py.Dataset):
        raise WeightsError(f"{where}: expected a dataset at {key!r}, found {type(item).__name__}")
    if item.dtype.kind not in "fiu":
        raise WeightsError(f"{where}/{key}: dtype {item.dtype} is not numeric")
    return np.asarray(item[()])


def is_legacy_h5(f: h5py.File) -> bool:
    return "layer_names" in f.attrs or "layer_names0" in f.attrs or "model_weights" in f


def read_legacy_h5(path: str | Path) -> LayerTensors:
    layers: LayerTensors = {}
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f and not _strings(f.attrs, "layer_names") else f
        names = _strings(root.attrs, "layer_names")
        if not names:
            raise WeightsError(f"{path}: no `layer_names` attribute; not a legacy Keras h5 file")
        for layer_name in names:
            group = root.get(layer_name)
            if not isinstance(group, h5py.Group):
                raise WeightsError(f"{path}: layer {layer_name!r} is listed but has no group")
            tensors = {}
            for weight_name in _strings(group.attrs, "weight_names"):
                variable = weight_name.split("/")[-1].split(":")[0]
                tensors[variable] = _dataset(group, weight_name, f"{path}:{layer_name}")
            if tensors:
                layers[layer_name.replace("/", "_")] = tensors
    return layers


def _keras3_layers_group(f: h5py.File, path) -> h5py.Group:
    """The `layers` group holding the DenseNet's Conv2D layers (top level, or the one
    nested model that has them when the DenseNet was wrapped in another model)."""
    found = []

    def visit(name, item):
        if isinstance(item, h5py.Group) and name.split("/")[-1] == "layers" and "conv2d" in item:
            found.append(name)

    f.visititems(visit)
    if len(found) != 1:
        raise WeightsError(
            f"{path}: expected one `layers` group with Conv2D layers, found {len(found)}"
            f" ({', '.join(found) or 'none'}); not a Keras 3 DenseNet weights file?"
        )
    return f[found[0]]


def _order(key: str) -> tuple[str, int]:
    match = re.fullmatch(r"(.+?)(?:_(\d+))?", key)
    return match.group(1), int(match.group(2) or 0)


def read_keras3_weights_h5(path: str | Path, backbone_layers: Sequence[str]) -> LayerTensors:
    """Read a Keras 3 `.weights.h5`; `backbone_layers` is the Keras layer order
    (`densenet.keras_layer_names`) that names the k-th Conv2D / BatchNormalization."""
    by_kind: dict[str, list[str]] = {"conv2d": [], "batch_normalization": []}
    for name in backbone_layers:
        by_kind["batch_normalization" if name.endswith("bn") else "conv2d"].append(name)
    layers: LayerTensors = {}
    with h5py.File(path, "r") as f:
        group = _keras3_layers_group(f, path)
        found: dict[str, list[tuple[int, str]]] = {}
        for key in group:
            kind, index = _order(key)
            vars_group = group[key].get("vars")
            if not isinstance(vars_group, h5py.Group) or len(vars_group) == 0:
                continue  # layers without weights (activations, pooling, padding, input)
            found.setdefault(kind, []).append((index, key))
        unknown = sorted(set(found) - set(KERAS3_VARIABLES))
        if unknown:
            raise WeightsError(f"{path}: unexpected weight-carrying layer type(s) {', '.join(unknown)}")
        for kind, entries in found.items():
            entries.sort()
            expected = by_kind.get(kind)
            if expected is not None and len(entries) != len(expected):
                raise WeightsError(f"{path}: {len(entries)} {kind} layers, the model has {len(expected)}")
            for position, (_, key) in enumerate(entries):
                vars_group = group[key]["vars"]
                stored_name = vars_group.attrs.get("name")
                stored_name = stored_name.decode() if isinstance(stored_name, bytes) else stored_name
                name = expected[position] if expected is not None else (stored_name or key)
                if stored_name is not None and stored_name != name:
                    raise WeightsError(
                        f"{path}: layers/{key} is named {stored_name!r} in the file but is "
                        f"{name!r} by position; not a Keras DenseNet of this arch?"
                    )
                layers[name] = _keras3_vars(vars_group, kind, f"{path}:layers/{key}/vars")
        # Weights outside that group: a head around a nested DenseNet. Named by their
        # stored name; the mapping decides whether they fit (and reports them if not).
        inside = group.name.rstrip("/") + "/"
        outside = []
        f.visititems(
            lambda name, item: (
                outside.append("/" + name)
                if isinstance(item, h5py.Group)
                and name.split("/")[-1] == "vars"
                and len(item)
                and not ("/" + name).startswith(inside)
                else None
            )
        )
        for name in outside:
            vars_group = f[name]
            key = name.split("/")[-2] if name.count("/") > 1 else "model"
            stored = vars_group.attrs.get("name", key)
            stored = stored.decode() if isinstance(stored, bytes) else str(stored)
            layers[stored] = _keras3_vars(vars_group, _order(key)[0], f"{path}:{name}")
    return layers


def _keras3_vars(vars_group: h5py.Group, kind: str, where: str) -> dict[str, np.ndarray]:
    names = KERAS3_VARIABLES.get(kind, ())
    if len(vars_group) > len(names) and kind in KERAS3_VARIABLES:
        raise WeightsError(f"{where}: {len(vars_group)} variables, a {kind} layer has at most {len(names)}")
    return {
        (names[i] if i < len(names) else str(i)): _dataset(vars_group, str(i), where) for i in range(len(vars_group))
    }
