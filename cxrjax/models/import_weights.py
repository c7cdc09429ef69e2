"""`cxrjax import-weights`: Keras (legacy h5, Keras 3 .weights.h5) or torchvision DenseNet
weights -> a cxrjax weights artifact.

Readers turn each format into {keras layer name: {keras variable: array}}; this module
maps those onto the flax variables by name (a backbone module's Keras name is its flax
path joined with "_"), checking every tensor's name, shape, dtype and finiteness first.
Anything missing, unexpected or mis-shaped is an error naming the tensor. Parts the
source lacks (CBAM, a head) keep a fresh initialization and are reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.models.classifier import build_model
from cxrjax.models.densenet import arch_spec, keras_layer_names
from cxrjax.models.errors import WeightsError
from cxrjax.models.keras_h5 import LayerTensors, is_legacy_h5, read_keras3_weights_h5, read_legacy_h5
from cxrjax.models.weights import flat_paths, gray_stem_for_imagenet, save_weights

BN_VARIABLES = {  # flax (collection, name) <- keras variable
    ("params", "scale"): "gamma",
    ("params", "bias"): "beta",
    ("batch_stats", "mean"): "moving_mean",
    ("batch_stats", "var"): "moving_variance",
}
CONV_VARIABLES = {("params", "kernel"): "kernel"}
DENSE_VARIABLES = {("params", "kernel"): "kernel", ("params", "bias"): "bias"}
INIT_SIZE = 64  # smallest convenient input for shape inference; DenseNet needs >= 32 px
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
TORCH_SIGNATURES = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive, or a legacy pickle (protocol >= 2)


def read_layers(source: str | Path, model_cfg) -> tuple[str, LayerTensors]:
    """(format name, tensors by Keras layer name) for any supported weights file."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"weights file {source} does not exist")
    with open(source, "rb") as f:
        head = f.read(8)
    if h5py.is_hdf5(source) or head == HDF5_SIGNATURE:
        try:
            with h5py.File(source, "r") as f:
                legacy = is_legacy_h5(f)
            if legacy:
                return "keras-legacy-h5", read_legacy_h5(source)
            order = keras_layer_names(arch_spec(model_cfg.arch).block_config)
            return "keras3-weights-h5", read_keras3_weights_h5(source, order)
        except OSError as e:  # h5py's messages name no file
            raise WeightsError(f"{source}: a damaged or truncated HDF5 file ({e})") from None
    if not head.startswith(TORCH_SIGNATURES):
        raise WeightsError(
            f"{source}: neither an HDF5 file (Keras .h5, .weights.h5) nor a torch checkpoint "
            f"(zip or pickle); it starts with {head!r}"
        )
    from cxrjax.models.torch_state_dict import read_torch_state_dict

    return "torchvision-state-dict", read_torch_state_dict(source)


def _top(model, fmap):
    """Everything after the backbone: CBAM (if any) and the head."""
    return model.classify(model.attention(fmap) if model.cbam else fmap)


def template_variables(model_cfg, seed: int = 0) -> dict:
    """Variables to import into: backbone leaves as shapes only (the import fills every
    one of them), CBAM and head freshly initialized. Only the top is initialized for real
    because compiling a full DenseNet init takes many seconds on CPU."""
    model = build_model(model_cfg)
    key = jax.random.key(seed)
    x = jnp.zeros((1, INIT_SIZE, INIT_SIZE, model_cfg.in_channels), jnp.float32)
    shapes = jax.eval_shape(lambda k: model.init(k, x, train=False), key)
    channels = shapes["params"]["backbone"]["bn"]["scale"].shape[0]
    fmap = jnp.zeros((1, 2, 2, channels), jnp.float32)
    top = jax.jit(lambda k: model.init(k, fmap, method=_top))(key)
    template = {c: dict(tree) for c, tree in shapes.items()}
    template["params"].update(top["params"])
    return template


def _modules(tree: Mapping[str, Any], path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Mapping]:
    """Flax modules (paths to dicts of arrays) under a params tree."""
    if all(not isinstance(v, Mapping) for v in tree.values()):
        return {path: tree}
    found = {}
    for key, value in tree.items():
        found.update(_modules(value, path + (key,)))
    return found


def _check(name: str, array: np.ndarray, shape: tuple[int, ...], problems: list[str]):
    array = np.asarray(array)
    if array.dtype.kind != "f":
        problems.append(f"{name}: dtype {array.dtype}, expected floating point")
    elif array.shape != tuple(shape):
        problems.append(f"{name}: shape {list(array.shape)}, the model expects {list(shape)}")
    elif not np.all(np.isfinite(array)):
        problems.append(f"{name}: contains NaN or infinite values")
    else:
        return array.astype(np.float32)
    return None


def _set(variables: dict, collection: str, path: tuple[str, ...], value) -> None:
    node = variables[collection]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def map_layers(
    layers: LayerTensors, model_cfg, template: Mapping[str, Any], backbone_only: bool = False
) -> tuple[dict, dict[str, list[str]]]:
    """Fill `template` (from `template_variables`) with the source tensors; (variables, report)."""
    variables = jax.tree.map(
        lambda a: a if isinstance(a, jax.ShapeDtypeStruct) else np.asarray(a),
        {k: dict(v) for k, v in template.items()},
    )
    layers = {name: dict(tensors) for name, tensors in layers.items()}
    report: dict[str, list[str]] = {"loaded": [], "fresh": [], "dropped": [], "converted": []}
    problems: list[str] = []

    targets = flat_paths(variables)
    stem_shift = []  # the stem BatchNorm mean's shift when the stem is folded to 1 channel

    def take(layer_name: str, flax_path: tuple[str, ...], mapping) -> None:
        tensors = layers.pop(layer_name)
        for (collection, leaf), variable in mapping.items():
            name = f"{layer_name}/{variable}"
            if variable not in tensors:
                problems.append(f"{name}: missing")
                continue
            want = targets[(collection,) + flax_path + (leaf,)]
            value = tensors.pop(variable)
            if flax_path == ("backbone", "conv1_conv") and np.shape(value)[2:3] == (3,) and want.shape[2] == 1:
                # The source was trained on ImageNet-normalized RGB; the gray model takes
                # the averaged statistics: fold each channel's mean and 1/std into the stem.
                value, shift = gray_stem_for_imagenet(value)
                stem_shift.append(shift)
                report["converted"].append(
                    f"{name}: 3-channel stem folded to 1 channel (per-channel ImageNet 1/std in the "
                    "kernel, the means in conv1_bn's moving mean)"
                )
            value = _check(name, value, want.shape, problems)
            if value is not None:
                _set(variables, collection, flax_path + (leaf,), value)
                report["loaded"].append("/".join((collection,) + flax_path + (leaf,)))
        problems.extend(f"{layer_name}/{extra}: unexpected" for extra in tensors)

    for path, module in _modules(variables["params"]["backbone"]).items():
        layer_name = "_".join(path)
        if layer_name not in layers:
            problems.append(f"{layer_name}: missing layer")
            continue
        mapping = BN_VARIABLES if "scale" in module else CONV_VARIABLES
        take(layer_name, ("backbone",) + path, mapping)
    bn_mean = variables["batch_stats"]["backbone"].get("conv1_bn", {}).get("mean")
    if stem_shift and isinstance(bn_mean, np.ndarray) and bn_mean.shape == stem_shift[0].shape:
        variables["batch_stats"]["backbone"]["conv1_bn"]["mean"] = (bn_mean + stem_shift[0]).astype(bn_mean.dtype)

    if backbone_only:
        report["dropped"] = sorted(f"{n}/{v}" for n, t in layers.items() for v in t)
        layers.clear()
    elif layers:
        want = targets.get(("params", "classifier", "logits", "kernel"))
        only = next(iter(layers.values()))
        fits = (
            len(layers) == 1
            and model_cfg.head == "chexnet"
            and set(only) == {"kernel", "bias"}
            and want is not None
            and np.shape(only["kernel"]) == want.shape
        )
        if fits:
            take(next(iter(layers)), ("classifier", "logits"), DENSE_VARIABLES)
        else:
            found = ", ".join(
                f"{n} ({', '.join(f'{v}{list(np.shape(a))}' for v, a in t.items())})" for n, t in sorted(layers.items())
            )
            problems.append(
                f"unexpected layer(s) {found}: besides the backbone only one Dense layer with "
                f"kernel {list(want.shape) if want is not None else '?'} can be imported, onto the "
                "chexnet head; use --backbone-only to drop them"
            )
    if problems:
        raise WeightsError("cannot import weights:\n  " + "\n  ".join(problems))
    loaded = set(report["loaded"])
    unfilled = [p for p, v in targets.items() if isinstance(v, jax.ShapeDtypeStruct) and "/".join(p) not in loaded]
    if unfilled:  # every backbone tensor is either loaded or reported missing above
        raise AssertionError(f"tensors neither imported nor initialized: {unfilled}")
    report["fresh"] = ["/".join(p) for p in targets if "/".join(p) not in loaded]
    return variables, report


def import_weights(source: str | Path, out: str | Path, model_cfg, backbone_only: bool = False) -> dict:
    """Read `source`, map it onto the model `model_cfg` describes, write the artifact `out`."""
    fmt, layers = read_layers(source, model_cfg)
    variables, report = map_layers(layers, model_cfg, template_variables(model_cfg), backbone_only)
    save_weights(out, variables, model_cfg)
    return {"source": str(source), "format": fmt, "out": str(out), **report}
