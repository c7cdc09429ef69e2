"""Read a torchvision-style DenseNet state dict (.pth / .pth.tar) into Keras layer names.

CheXNet reproductions save `{'state_dict': ...}` from `nn.DataParallel` around a module
holding torchvision's DenseNet as `densenet121`, so keys look like
`module.densenet121.features.denseblock1.denselayer1.norm.1.weight` (torchvision < 0.3
spelled `norm1` as `norm.1`) and the classifier is `Sequential(Linear(1024, 14), Sigmoid())`
(`classifier.0.weight`). Both spellings and any common prefix are accepted.

torch is optional and imported only here. Files are read with
`torch.load(weights_only=True)`: a pickle that would construct arbitrary objects (and
so could run code) is refused, never unpickled.

BatchNorm epsilon: torch uses 1e-5, Keras (and cxrjax) 1.001e-5. The imported model
keeps 1.001e-5; the relative change of each normalized activation is about
0.5 * 1e-8 / (running_var + eps), far below float32 round-off for any realistic
running variance (the torch parity test measures the end-to-end effect).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np

from cxrjax.models.errors import WeightsError

LayerTensors = dict[str, dict[str, np.ndarray]]

_OLD_STYLE = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")
_BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
_LAYER = {"norm1": "0_bn", "conv1": "1_conv", "norm2": "1_bn", "conv2": "2_conv"}
CLASSIFIER = "classifier"


def _load(path: Path):
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyTorch, which is optional: pip install 'cxrjax[torch]'") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", str(e), re.S)
        reason = found[1].strip().split(". ")[0] if found else str(e).strip().splitlines()[-1]
        if not reason.startswith("Unsupported global"):
            raise WeightsError(f"{path}: not a readable torch checkpoint ({reason})") from None
        raise WeightsError(
            f"{path}: refused. Its pickle asks for Python objects beyond tensors and plain "
            f"containers ({reason}); unpickling it could run arbitrary code, so it is not "
            "loaded. Re-save just the state dict (torch.save(model.state_dict(), ...)) where "
            "the file is trusted."
        ) from None
    except Exception as e:  # torch raises assorted types (KeyError, RuntimeError, EOFError) for non-checkpoints
        raise WeightsError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None


def _to_numpy(key: str, value) -> np.ndarray:
    import torch

    if not isinstance(value, torch.Tensor):
        raise WeightsError(f"state dict entry {key} is a {type(value).__name__}, not a tensor")
    if value.is_floating_point():
        value = value.detach().to(torch.float32)
    return value.cpu().numpy()


def _keras_name(key: str) -> tuple[str, str] | None:
    """(keras layer, torch parameter) for a torchvision DenseNet key, or None."""
    module, _, param = key.rpartition(".")
    parts = module.split(".")
    if parts == ["features", "conv0"]:
        return "conv1_conv", param
    if parts == ["features", "norm0"]:
        return "conv1_bn", param
    if parts == ["features", "norm5"]:
        return "bn", param
    if len(parts) == 4 and parts[0] == "features":
        block = re.fullmatch(r"denseblock(\d+)", parts[1])
        layer = re.fullmatch(r"denselayer(\d+)", parts[2])
        if block and layer and parts[3] in _LAYER:
            return f"conv{int(block[1]) + 1}_block{layer[1]}_{_LAYER[parts[3]]}", param
    if len(parts) == 3 and parts[0] == "features":
        transition = re.fullmatch(r"transition(\d+)", parts[1])
        if transition and parts[2] in ("norm", "conv"):
            return f"pool{int(transition[1]) + 1}_{'bn' if parts[2] == 'norm' else 'conv'}", param
    if parts in (["classifier"], ["classifier", "0"]):
        return CLASSIFIER, param
    return None


def read_torch_state_dict(path: str | Path) -> LayerTensors:
    path = Path(path)
    state = _load(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{path}: expected a state dict (or {{'state_dict': ...}}), got {type(state).__name__}")
    stems = [k for k in state if k.endswith("features.conv0.weight")]
    if len(stems) != 1:
        raise WeightsError(f"{path}: expected one '*features.conv0.weight' key, found {len(stems)}")
    prefix = stems[0][: -len("features.conv0.weight")]
    layers: LayerTensors = {}
    unexpected = []
    for key, value in state.items():
        if not key.startswith(prefix):
            unexpected.append(key)
            continue
        short = _OLD_STYLE.sub(r"\1\2.", key[len(prefix) :])
        mapped = _keras_name(short)
        if mapped is None:
            unexpected.append(key)
            continue
        layer, param = mapped
        if param == "num_batches_tracked":
            continue  # torch's BN step counter; Keras/flax have no such buffer
        array = _to_numpy(key, value)
        if layer == CLASSIFIER:
            variable = {"weight": "kernel", "bias": "bias"}.get(param)
            array = array.T if param == "weight" else array  # Linear [out, in] -> Dense [in, out]
        elif layer.endswith("_conv"):
            variable = "kernel" if param == "weight" else None
            array = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array  # OIHW -> HWIO
        else:
            variable = _BN.get(param)
        if variable is None:
            unexpected.append(key)
            continue
        layers.setdefault(layer, {})[variable] = array
    if unexpected:
        raise WeightsError(f"{path}: unexpected tensor(s) for a torchvision DenseNet: {', '.join(unexpected)}")
    return layers
