"""Weight import against independent references, without downloading anything.

Full size: a live `keras.applications.DenseNet121(weights=None)` (KERAS_BACKEND=jax) with
randomized weights and BatchNorm statistics, saved in both Keras formats; a
torchvision-layout state dict built from the same weights; a torch.nn.functional
re-run of torchvision's DenseNet forward. Everything else uses the tiny arch.

Keras 3 no longer writes legacy h5 through `model.save_weights` (it requires
`.weights.h5`), so the published notop layout is written here with h5py
(`write_published_h5`) and checked by letting Keras itself load it; Keras' own
legacy writer (`keras.src.legacy.saving.legacy_h5_format`) is exercised as well.
"""

import os

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported anywhere in this process

import json
import re

import cv2
import h5py
import jax
import numpy as np
import pytest

from cxrjax.cli import main as cli_main
from cxrjax.models import build_model, default_model_config
from cxrjax.models.densenet import keras_layer_names
from cxrjax.models.import_weights import import_weights, map_layers, read_layers, template_variables
from cxrjax.models.torch_state_dict import read_torch_state_dict
from cxrjax.models.weights import load_weights

TOL = 1e-4
KERAS_NOTOP_PARAMS = 7_037_504
# keras-applications named the stem `conv1/conv`, `conv1/bn`; the published h5 keeps that.
PUBLISHED_NAMES = {"conv1_conv": "conv1/conv", "conv1_bn": "conv1/bn"}
# Keras' numpy conversion of its variables warns under numpy 2; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
KERAS_VARIABLE_ORDER = ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance")


def model_cfg(**overrides):
    cfg = default_model_config()
    cfg.update(overrides)
    return cfg


def write_published_h5(path, layers, weightless=("input_1", "zero_padding2d_1", "conv1/relu", "pool1")):
    """The layout of densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5: root attr
    `layer_names` (weightless layers listed too), one group per layer with attr
    `weight_names` = ['<layer>/<var>:0', ...], datasets at `<layer>/<layer>/<var>:0`."""
    with h5py.File(path, "w") as f:
        names = [PUBLISHED_NAMES.get(n, n) for n in layers] + list(weightless)
        f.attrs["layer_names"] = np.array([n.encode() for n in names])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.1.3"
        for name in weightless:
            f.create_group(name).attrs["weight_names"] = np.array([], dtype="S1")
        for name, tensors in layers.items():
            published = PUBLISHED_NAMES.get(name, name)
            group = f.require_group(published)
            weight_names = [f"{published}/{v}:0" for v in KERAS_VARIABLE_ORDER if v in tensors]
            group.attrs["weight_names"] = np.array([w.encode() for w in weight_names])
            for w in weight_names:
                group.create_dataset(w, data=tensors[w.split("/")[-1][:-2]])


# ---------------------------------------------------------------- full size, vs Keras


@pytest.fixture(scope="module")
def keras_ref():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip(f"keras was already imported with backend {keras.backend.backend()}")
    base = keras.applications.DenseNet121(weights=None, include_top=False)
    pooled = keras.layers.GlobalAveragePooling2D()(base.output)
    logits = keras.layers.Dense(14, name="chexnet_logits")(pooled)
    full = keras.Model(base.input, [base.output, logits])
    rng = np.random.default_rng(0)
    for layer in full.layers:
        values = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            c = values[0].shape  # gamma, beta, moving mean, moving variance
            values = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c), rng.normal(0, 0.2, c), rng.uniform(0.5, 2.0, c)]
        elif values:  # He-scaled kernels keep activations O(1) through 121 layers
            fan_in = np.prod(values[0].shape[:-1])
            values = [rng.normal(0, np.sqrt(2 / fan_in), values[0].shape)] + [
                rng.normal(0, 0.1, v.shape) for v in values[1:]
            ]
        layer.set_weights([v.astype(np.float32) for v in values])
    x = rng.normal(size=(2, 67, 83, 3)).astype(np.float32)  # odd, non-square
    fmap, logits = full.predict(x, verbose=0)
    layers = {
        layer.name: {v.path.split("/")[-1]: np.asarray(v.numpy()) for v in layer.weights}
        for layer in full.layers
        if layer.weights
    }
    return {"keras": keras, "base": base, "full": full, "x": x, "fmap": fmap, "logits": logits, "layers": layers}


_apply = {}


def features_and_logits(variables, x):
    """One jitted DenseNet121+chexnet apply shared by all parity checks (compiled once)."""
    if "f" not in _apply:
        model = build_model(model_cfg())
        _apply["f"] = jax.jit(lambda v, x: model.apply(v, x, method="features_and_logits"))
    return _apply["f"](variables, x)


def assert_parity(variables, ref, with_head=True):
    fmap, logits = features_and_logits(variables, ref["x"])
    diff_f = float(np.abs(np.asarray(fmap) - ref["fmap"]).max())
    print(f"max |flax - keras|: feature map {diff_f:.2e} (max |value| {np.abs(ref['fmap']).max():.1f})")
    assert diff_f <= TOL, f"feature map differs from Keras by {diff_f}"
    assert float(np.abs(ref["fmap"]).max()) > 1  # non-trivial activations
    if with_head:
        diff_l = float(np.abs(np.asarray(logits) - ref["logits"]).max())
        print(f"max |flax - keras|: logits {diff_l:.2e}")
        assert diff_l <= TOL, f"logits differ from Keras by {diff_l}"


@pytest.mark.slow
def test_parameter_count_and_layer_order_match_keras(keras_ref):
    base = keras_ref["base"]
    assert base.count_params() == KERAS_NOTOP_PARAMS
    shapes = template_variables(model_cfg())
    backbone = jax.tree.leaves(shapes["params"]["backbone"]) + jax.tree.leaves(shapes["batch_stats"])
    assert sum(int(np.prod(a.shape)) for a in backbone) == KERAS_NOTOP_PARAMS
    assert keras_layer_names((6, 12, 24, 16)) == [layer.name for layer in base.layers if layer.weights]


@pytest.mark.slow
def test_published_legacy_h5_notop(keras_ref, tmp_path):
    base = keras_ref["base"]
    notop = {n: t for n, t in keras_ref["layers"].items() if n != "chexnet_logits"}
    path = tmp_path / "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"
    write_published_h5(path, notop)
    with h5py.File(path) as f:  # the published paths
        assert f["conv1/conv/conv1/conv/kernel:0"].shape == (7, 7, 3, 64)
        assert "conv2_block1_0_bn/conv2_block1_0_bn/moving_variance:0" in f
    # The file is a real legacy Keras weights file: Keras loads it into a DenseNet121.
    original = base.get_weights()
    try:
        base.set_weights([np.zeros_like(w) for w in original])
        base.load_weights(str(path))
        for got, want in zip(base.get_weights(), original, strict=True):
            np.testing.assert_array_equal(got, want)
    finally:
        base.set_weights(original)

    report = import_weights(path, tmp_path / "weights", model_cfg())
    assert report["format"] == "keras-legacy-h5"
    assert len(report["loaded"]) == 604  # 120 conv kernels + 121 BN x 4
    assert sorted(report["fresh"]) == ["params/classifier/logits/bias", "params/classifier/logits/kernel"]
    cfg, variables = load_weights(tmp_path / "weights")
    assert cfg.arch == "densenet121" and cfg.head == "chexnet"
    assert_parity(variables, keras_ref, with_head=False)


@pytest.mark.slow
def test_keras_legacy_writer_with_dense_head(keras_ref, tmp_path):
    from keras.src.legacy.saving import legacy_h5_format

    path = tmp_path / "full.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, keras_ref["full"])
    fmt, layers = read_layers(path, model_cfg())
    assert fmt == "keras-legacy-h5"
    variables, report = map_layers(layers, model_cfg(), template_variables(model_cfg()))
    assert report["fresh"] == [] and len(report["loaded"]) == 606
    assert_parity(variables, keras_ref)


@pytest.mark.slow
def test_keras3_weights_h5(keras_ref, tmp_path):
    path = tmp_path / "full.weights.h5"
    keras_ref["full"].save_weights(str(path))
    report = import_weights(path, tmp_path / "weights", model_cfg())
    assert report["format"] == "keras3-weights-h5" and report["fresh"] == []
    _, variables = load_weights(tmp_path / "weights")
    assert_parity(variables, keras_ref)


# ---------------------------------------------------------------- torchvision layout


def torchvision_state_dict(layers, blocks=(6, 12, 24, 16)):
    """Keras-named tensors -> a CheXNet-reproduction checkpoint: torchvision keys with the
    old `norm.1` spelling, DataParallel's `module.` prefix, `densenet121.` attribute, a
    Sequential(Linear, Sigmoid) classifier and a {'state_dict': ...} wrapper."""
    torch = pytest.importorskip("torch")
    sd = {}

    def conv(key, name):
        sd[key + ".weight"] = torch.from_numpy(layers[name]["kernel"].transpose(3, 2, 0, 1).copy())

    def bn(key, name):
        t = layers[name]
        for tk, kk in [
            ("weight", "gamma"),
            ("bias", "beta"),
            ("running_mean", "moving_mean"),
            ("running_var", "moving_variance"),
        ]:
            sd[f"{key}.{tk}"] = torch.from_numpy(t[kk].copy())
        sd[f"{key}.num_batches_tracked"] = torch.tensor(1000)

    conv("features.conv0", "conv1_conv")
    bn("features.norm0", "conv1_bn")
    for b, n in enumerate(blocks, start=1):
        for i in range(1, n + 1):
            key, name = f"features.denseblock{b}.denselayer{i}", f"conv{b + 1}_block{i}"
            bn(f"{key}.norm.1", f"{name}_0_bn")
            conv(f"{key}.conv.1", f"{name}_1_conv")
            bn(f"{key}.norm.2", f"{name}_1_bn")
            conv(f"{key}.conv.2", f"{name}_2_conv")
        if b < len(blocks):
            bn(f"features.transition{b}.norm", f"pool{b + 1}_bn")
            conv(f"features.transition{b}.conv", f"pool{b + 1}_conv")
    bn("features.norm5", "bn")
    if "chexnet_logits" in layers:
        sd["classifier.0.weight"] = torch.from_numpy(layers["chexnet_logits"]["kernel"].T.copy())
        sd["classifier.0.bias"] = torch.from_numpy(layers["chexnet_logits"]["bias"].copy())
    return {"epoch": 7, "arch": "densenet121", "state_dict": {f"module.densenet121.{k}": v for k, v in sd.items()}}


def torchvision_forward(sd, x_nhwc, blocks=(6, 12, 24, 16)):
    """torchvision's DenseNet forward (new-style keys) in torch.nn.functional, BN eps 1e-5."""
    import torch
    import torch.nn.functional as F

    def bn(key, x):
        return F.batch_norm(
            x,
            sd[f"{key}.running_mean"],
            sd[f"{key}.running_var"],
            sd[f"{key}.weight"],
            sd[f"{key}.bias"],
            training=False,
            eps=1e-5,
        )

    x = torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())
    x = F.relu(bn("features.norm0", F.conv2d(x, sd["features.conv0.weight"], stride=2, padding=3)))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    for b, n in enumerate(blocks, start=1):
        features = [x]
        for i in range(1, n + 1):
            key = f"features.denseblock{b}.denselayer{i}"
            h = F.conv2d(F.relu(bn(f"{key}.norm1", torch.cat(features, 1))), sd[f"{key}.conv1.weight"])
            features.append(F.conv2d(F.relu(bn(f"{key}.norm2", h)), sd[f"{key}.conv2.weight"], padding=1))
        x = torch.cat(features, 1)
        if b < len(blocks):
            key = f"features.transition{b}"
            x = F.avg_pool2d(F.conv2d(F.relu(bn(f"{key}.norm", x)), sd[f"{key}.conv.weight"]), 2)
    x = F.relu(bn("features.norm5", x))
    logits = F.linear(x.mean(dim=(2, 3)), sd["classifier.weight"], sd["classifier.bias"])
    return x.numpy().transpose(0, 2, 3, 1), logits.numpy()


@pytest.mark.slow
def test_torchvision_state_dict(keras_ref, tmp_path):
    torch = pytest.importorskip("torch")
    checkpoint = torchvision_state_dict(keras_ref["layers"])
    path = tmp_path / "model.pth.tar"
    torch.save(checkpoint, path)
    report = import_weights(path, tmp_path / "weights", model_cfg())
    assert report["format"] == "torchvision-state-dict" and report["fresh"] == []
    _, variables = load_weights(tmp_path / "weights")
    assert_parity(variables, keras_ref)  # same weights as the Keras model

    # Against torch's own ops (eps 1e-5 where cxrjax keeps Keras' 1.001e-5).
    new_style = {
        re.sub(r"\.(norm|conv)\.([12])\.", r".\1\2.", k.removeprefix("module.densenet121.")).replace(
            "classifier.0.", "classifier."
        ): v
        for k, v in checkpoint["state_dict"].items()
    }
    fmap_t, logits_t = torchvision_forward(new_style, keras_ref["x"])
    fmap, logits = features_and_logits(variables, keras_ref["x"])
    diff_f, diff_l = (float(np.abs(np.asarray(a) - b).max()) for a, b in ((fmap, fmap_t), (logits, logits_t)))
    print(f"max |flax - torch ops|: feature map {diff_f:.2e}, logits {diff_l:.2e}")
    assert diff_f <= TOL and diff_l <= TOL


class _WritesMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _torch_unless_ci():
    """torch, or a skip; under CI (CI=true, where .ci/run installs torch) a missing torch
    fails, so the pickle-safety test can never be skipped there unnoticed."""
    if os.environ.get("CI"):
        import torch

        return torch
    return pytest.importorskip("torch")


def test_code_running_pickle_is_refused_and_never_runs(tmp_path):
    torch = _torch_unless_ci()
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"features.conv0.weight": _WritesMarker(marker)}}, path)
    with pytest.raises(ValueError, match=r"refused.*GLOBAL io.open.*could run arbitrary code"):
        read_torch_state_dict(path)
    assert not marker.exists()
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: not a readable torch checkpoint"):
        read_torch_state_dict(tmp_path / "junk.pth")
    # Control: an unrestricted unpickle of the same file does run the payload.
    torch.load(path, weights_only=False)["state_dict"]["features.conv0.weight"].close()
    assert marker.exists()


# ---------------------------------------------------------------- tiny: checks and errors

TINY_BLOCKS = (2, 2, 2, 2)


def tiny_keras_layers(seed=0, in_channels=3):
    """Random Keras-named tensors for the tiny arch (shapes from the flax template)."""
    shapes = template_variables(model_cfg(arch="tiny", in_channels=in_channels))
    rng = np.random.default_rng(seed)
    layers = {}
    for name in keras_layer_names(TINY_BLOCKS):
        nested = re.fullmatch(r"(conv\d+_block\d+|pool\d+)_(.+)", name)  # e.g. conv2_block1 / 0_bn
        path = [nested[1], nested[2]] if nested else [name]
        params = shapes["params"]["backbone"]
        for key in path:
            params = params[key]
        if "kernel" in params:
            k = params["kernel"].shape
            layers[name] = {"kernel": rng.normal(0, np.sqrt(2 / np.prod(k[:-1])), k).astype(np.float32)}
        else:
            c = params["scale"].shape
            layers[name] = {
                "gamma": rng.uniform(0.5, 1.5, c).astype(np.float32),
                "beta": rng.normal(0, 0.2, c).astype(np.float32),
                "moving_mean": rng.normal(0, 0.2, c).astype(np.float32),
                "moving_variance": rng.uniform(0.5, 2.0, c).astype(np.float32),
            }
    return layers


def test_cli_imports_published_h5_and_reports_fresh_parts(tmp_path, capsys):
    layers = tiny_keras_layers()
    write_published_h5(tmp_path / "tiny.h5", layers)
    rc = cli_main(
        [
            "import-weights",
            "--source",
            str(tmp_path / "tiny.h5"),
            "--out",
            str(tmp_path / "w"),
            "--arch",
            "tiny",
            "--cbam",
            "--head",
            "fisher",
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "keras-legacy-h5"
    assert {p.split("/")[1] for p in report["fresh"]} == {"attention", "classifier"}
    cfg, variables = load_weights(tmp_path / "w")
    assert (cfg.arch, cfg.cbam, cfg.head) == ("tiny", True, "fisher")
    backbone = variables["params"]["backbone"]
    np.testing.assert_array_equal(backbone["conv1_conv"]["kernel"], layers["conv1_conv"]["kernel"])
    np.testing.assert_array_equal(backbone["conv3_block2"]["2_conv"]["kernel"], layers["conv3_block2_2_conv"]["kernel"])
    np.testing.assert_array_equal(
        variables["batch_stats"]["backbone"]["pool4"]["bn"]["var"], layers["pool4_bn"]["moving_variance"]
    )
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(variables))


def test_cli_reports_a_bad_source_in_one_line(tmp_path, capsys):
    rc = cli_main(["import-weights", "--source", str(tmp_path / "nope.h5"), "--out", str(tmp_path / "w")])
    assert rc == 2
    assert "nope.h5 does not exist" in capsys.readouterr().err


def test_files_that_are_no_weights_say_what_they_are_not_and_are_named(tmp_path, capsys):
    """Before: any non-HDF5 file went to the torch reader ("needs PyTorch" without torch),
    and a truncated .h5 gave h5py's message without the file name."""
    write_published_h5(tmp_path / "tiny.h5", tiny_keras_layers())
    data = (tmp_path / "tiny.h5").read_bytes()
    cases = {
        "text.h5": (b"just some text, not weights", "neither an HDF5 file (Keras .h5, .weights.h5) nor a torch"),
        "cut.h5": (data[: len(data) // 2], "a damaged or truncated HDF5 file"),
        "head.h5": (data[:6], "neither an HDF5 file"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        rc = cli_main(
            ["import-weights", "--source", str(tmp_path / name), "--out", str(tmp_path / "w"), "--arch", "tiny"]
        )
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert f"{tmp_path / name}: {message}" in err, err


def test_every_bad_tensor_is_named():
    layers = tiny_keras_layers()
    del layers["conv3_block1_1_bn"]
    layers["conv2_block1_2_conv"]["kernel"] = layers["conv2_block1_2_conv"]["kernel"][..., :4]
    layers["pool2_conv"]["kernel"] = layers["pool2_conv"]["kernel"].astype(np.int32)
    layers["bn"]["moving_variance"][0] = np.nan
    layers["conv1_conv"]["bias"] = np.zeros(16, np.float32)
    del layers["conv4_block2_0_bn"]["beta"]
    cfg = model_cfg(arch="tiny")
    with pytest.raises(ValueError) as err:
        map_layers(layers, cfg, template_variables(cfg))
    message = str(err.value)
    for expected in [
        "conv3_block1_1_bn: missing layer",
        "conv2_block1_2_conv/kernel: shape [3, 3, 32, 4], the model expects [3, 3, 32, 8]",
        "pool2_conv/kernel: dtype int32",
        "bn/moving_variance: contains NaN",
        "conv1_conv/bias: unexpected",
        "conv4_block2_0_bn/beta: missing",
    ]:
        assert expected in message


def test_extra_layers_need_backbone_only():
    cfg = model_cfg(arch="tiny")
    layers = tiny_keras_layers()
    layers["predictions"] = {"kernel": np.zeros((32, 1000), np.float32), "bias": np.zeros(1000, np.float32)}
    with pytest.raises(ValueError, match="unexpected layer.*predictions.*--backbone-only"):
        map_layers(layers, cfg, template_variables(cfg))
    _, report = map_layers(layers, cfg, template_variables(cfg), backbone_only=True)
    assert report["dropped"] == ["predictions/bias", "predictions/kernel"]
    fisher = model_cfg(arch="tiny", head="fisher")
    layers["predictions"] = {"kernel": np.zeros((32, 14), np.float32), "bias": np.zeros(14, np.float32)}
    with pytest.raises(ValueError, match="chexnet head"):  # a 14-way Dense has no place in Fisher's head
        map_layers(layers, fisher, template_variables(fisher))


def write_keras3_h5(path, layers, names, prefix="layers"):
    """Keras 3 `.weights.h5` layout: layers/<class>[_k]/vars/<i>, attr `name` on vars."""
    counts = {}
    with h5py.File(path, "w") as f:
        for name in names:
            kind = "conv2d" if name.endswith("conv") else "batch_normalization"
            k = counts.get(kind, 0)
            counts[kind] = k + 1
            group = f.create_group(f"{prefix}/{kind}{'' if k == 0 else f'_{k}'}/vars")
            group.attrs["name"] = name
            order = ("kernel",) if kind == "conv2d" else ("gamma", "beta", "moving_mean", "moving_variance")
            for i, var in enumerate(order):
                group.create_dataset(str(i), data=layers[name][var])
        f.create_group("layers/activation/vars").attrs["name"] = "conv1_relu"


def test_keras3_layer_order_is_checked_against_stored_names(tmp_path):
    cfg = model_cfg(arch="tiny")
    layers = tiny_keras_layers()
    names = keras_layer_names(TINY_BLOCKS)
    write_keras3_h5(tmp_path / "ok.weights.h5", layers, names)
    fmt, read = read_layers(tmp_path / "ok.weights.h5", cfg)
    assert fmt == "keras3-weights-h5" and sorted(read) == sorted(layers)
    np.testing.assert_array_equal(read["conv5_block2_1_bn"]["moving_mean"], layers["conv5_block2_1_bn"]["moving_mean"])
    swapped = list(names)
    i, j = swapped.index("conv2_block1_1_conv"), swapped.index("conv2_block1_2_conv")
    swapped[i], swapped[j] = swapped[j], swapped[i]
    # A DenseNet nested in an outer model with a Dense head beside it.
    write_keras3_h5(tmp_path / "nested.weights.h5", layers, names, prefix="layers/functional/layers")
    with h5py.File(tmp_path / "nested.weights.h5", "a") as f:
        head = f.create_group("layers/dense/vars")
        head.attrs["name"] = "chexnet_logits"
        head["0"], head["1"] = np.ones((32, 14), np.float32), np.zeros(14, np.float32)
    _, read = read_layers(tmp_path / "nested.weights.h5", cfg)
    np.testing.assert_array_equal(read["chexnet_logits"]["kernel"], np.ones((32, 14)))
    variables, report = map_layers(read, cfg, template_variables(cfg))
    assert report["fresh"] == [] and variables["params"]["classifier"]["logits"]["kernel"].sum() == 32 * 14
    write_keras3_h5(tmp_path / "swapped.weights.h5", layers, swapped)
    with pytest.raises(ValueError, match="'conv2_block1_2_conv' in the file but is 'conv2_block1_1_conv' by position"):
        read_layers(tmp_path / "swapped.weights.h5", cfg)


def test_gray_stem_gives_the_rgb_model_on_imagenet_normalized_gray_images():
    """Issue 21: summing the stem made `--in-channels 1` normalize with the averaged ImageNet
    statistics, 0.066 away in logits from the RGB model. Folded, the stem output equals the
    RGB model's everywhere but the 3-pixel zero-padding border."""
    from cxrjax.data.normalize import IMAGENET_MEAN, IMAGENET_STD, stats_for, to_model_input
    from cxrjax.models.weights import gray_stem

    layers = tiny_keras_layers()
    rgb_cfg, gray_cfg = model_cfg(arch="tiny"), model_cfg(arch="tiny", in_channels=1)
    rgb_vars, _ = map_layers(layers, rgb_cfg, template_variables(rgb_cfg))
    gray_vars, report = map_layers(layers, gray_cfg, template_variables(gray_cfg))
    assert report["converted"] == [
        "conv1_conv/kernel: 3-channel stem folded to 1 channel (per-channel ImageNet 1/std in the kernel, "
        "the means in conv1_bn's moving mean)"
    ]
    assert gray_vars["params"]["backbone"]["conv1_conv"]["kernel"].shape == (7, 7, 1, 16)
    gray_vars["params"]["classifier"] = rgb_vars["params"]["classifier"]  # same fresh head for both
    rng = np.random.default_rng(3)
    image = cv2.GaussianBlur(rng.integers(0, 256, (2, 64, 56)).astype(np.float32), (0, 0), 2)
    image = np.clip(image * 3 - 250, 0, 255).astype(np.uint8)[..., None]  # real contrast, 0..255
    x_rgb = to_model_input(image, IMAGENET_MEAN, IMAGENET_STD)
    x_gray = to_model_input(image, *stats_for("imagenet", 1))

    def stem_and_logits(cfg, variables, x):
        logits, state = jax.jit(
            lambda v, x: build_model(cfg).apply(v, x, capture_intermediates=True, mutable=["intermediates"])
        )(variables, x)
        return state["intermediates"]["backbone"]["conv1_bn"]["__call__"][0], logits

    rgb_stem, rgb_logits = stem_and_logits(rgb_cfg, rgb_vars, x_rgb)
    gray_stem_out, gray_logits = stem_and_logits(gray_cfg, gray_vars, x_gray)
    # Stem output [2, 32, 28, 16]: input pixels 3+ away from the edge are exact.
    inner = (slice(None), slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(gray_stem_out[inner], rgb_stem[inner], rtol=1e-5, atol=2e-5)
    summed = jax.tree.map(np.copy, gray_vars)
    summed["params"]["backbone"]["conv1_conv"]["kernel"] = gray_stem(layers["conv1_conv"]["kernel"])
    summed["batch_stats"]["backbone"]["conv1_bn"] = rgb_vars["batch_stats"]["backbone"]["conv1_bn"]
    _, summed_logits = stem_and_logits(gray_cfg, summed, x_gray)
    folded_gap = float(np.abs(gray_logits - rgb_logits).max())
    summed_gap = float(np.abs(summed_logits - rgb_logits).max())
    assert folded_gap < summed_gap / 5, (folded_gap, summed_gap)  # only the border is left


def test_torch_layout_errors_name_the_key(tmp_path):
    torch = pytest.importorskip("torch")
    checkpoint = torchvision_state_dict(tiny_keras_layers(), blocks=TINY_BLOCKS)
    sd = checkpoint["state_dict"]
    sd["module.densenet121.features.denseblock1.denselayer1.extra.weight"] = torch.zeros(3)
    torch.save(checkpoint, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="unexpected tensor.*denselayer1.extra.weight"):
        read_torch_state_dict(tmp_path / "extra.pth")
    del sd["module.densenet121.features.denseblock1.denselayer1.extra.weight"]
    sd["module.densenet121.features.norm5.running_var"] = sd["module.densenet121.features.norm5.running_var"][:5]
    torch.save(checkpoint, tmp_path / "short.pth")
    cfg = model_cfg(arch="tiny", head="chexnet")
    _, layers = read_layers(tmp_path / "short.pth", cfg)
    with pytest.raises(ValueError, match=r"bn/moving_variance: shape \[5\], the model expects \[32\]"):
        map_layers(layers, cfg, template_variables(cfg), backbone_only=True)


def test_missing_torch_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    (tmp_path / "w.pth").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install 'cxrjax\[torch\]'"):
        read_torch_state_dict(tmp_path / "w.pth")
