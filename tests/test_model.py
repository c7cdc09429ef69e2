"""The classifier on the tiny DenseNet: shapes, precision, heads, CBAM, remat, Grad-CAM access.

Numbers are checked against plain numpy re-computations from the parameters.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from cxrjax.models import build_model, default_model_config, head_kernel_paths, l2_penalty
from cxrjax.models.cbam import CBAM
from cxrjax.models.densenet import REMAT_MODES, arch_spec, remat_mode, saved_activation_floor
from cxrjax.models.memory import saved_activation_bytes_per_image


def tiny_cfg(**overrides):
    cfg = default_model_config()
    cfg.arch = "tiny"
    cfg.update(overrides)
    return cfg


X = jax.random.normal(jax.random.key(1), (2, 32, 32, 3), jnp.float32)
DROPOUT_KEY = jax.random.key(3)

# Compiling is the cost here (each jitted tiny-DenseNet function takes ~1-3 s on CPU;
# eager flax compiles op by op and is slower still), so tests share cached results.


@functools.cache
def _variables(cbam: bool, head: str):
    """Random variables with init-like scales, from shapes only (a jitted init would
    compile for seconds). They do not depend on dtype or remat."""
    model = build_model(tiny_cfg(cbam=cbam, head=head))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), X))
    rng = np.random.default_rng(0)

    def fill(path, s):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        return rng.normal(0, 0.1, s.shape).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(fill, shapes)


def init(cfg):
    """(model, variables, x) for a tiny config."""
    return build_model(cfg), _variables(bool(cfg.cbam), cfg.head), X


def apply(model, variables, x, **kwargs):
    return jax.jit(lambda v, x: model.apply(v, x, **kwargs))(variables, x)


@functools.cache
def _eval(cbam: bool, head: str):
    """(feature map, logits) in eval mode, float32."""
    model, variables, x = init(tiny_cfg(cbam=cbam, head=head))
    return apply(model, variables, x, method="features_and_logits")


def train_loss(remat: str = "none"):
    """A training loss of the CBAM + Fisher model (dropout active) and its variables."""
    model, variables, x = init(tiny_cfg(cbam=True, head="fisher", remat=remat))

    def loss(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": DROPOUT_KEY},
        )
        return jnp.sum(logits * jnp.arange(14.0)), (logits, updates)

    return loss, variables


@functools.cache
def _grads(remat: str):
    loss, variables = train_loss(remat)
    return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])


def leaves_with_paths(tree):
    return [("/".join(k.key for k in p), v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_default_config_fields():
    cfg = default_model_config()
    assert cfg.to_dict() == {
        "arch": "densenet121",
        "cbam": False,
        "head": "chexnet",
        "num_classes": 14,
        "dropout": 0.3,
        "dtype": "float32",
        "remat": "none",
        "remat_policy": "nothing_saveable",
        "in_channels": 3,
        "init_from": "",
    }


def test_tiny_forward_backward_shapes_and_batch_stats_update():
    _, variables, _ = init(tiny_cfg(cbam=True, head="fisher"))
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["params"]) == {"backbone", "attention", "classifier"}
    grads, (logits, updates) = _grads("none")
    assert logits.shape == (2, 14) and logits.dtype == jnp.float32
    assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    for part in ("backbone", "attention", "classifier"):
        assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads[part])), part
    old, new = variables["batch_stats"]["backbone"]["bn"], updates["batch_stats"]["backbone"]["bn"]
    assert not np.allclose(old["mean"], new["mean"])  # train mode updates running stats


def test_non_square_input():
    model, variables, _ = init(tiny_cfg())
    logits = apply(model, variables, jnp.ones((1, 67, 41, 3)))
    assert logits.shape == (1, 14)
    assert np.isfinite(logits).all()


def test_wrong_channel_count_is_named():
    model = build_model(tiny_cfg(in_channels=1))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 32, 32, 1))))
    assert variables["params"]["backbone"]["conv1_conv"]["kernel"].shape == (7, 7, 1, 16)
    with pytest.raises(ValueError, match="1 channel"):
        jax.eval_shape(lambda: model.apply(variables, jnp.ones((1, 32, 32, 3))))


def test_bfloat16_compute_keeps_float32_params_stats_and_logits():
    model16, variables, x = init(tiny_cfg(dtype="bfloat16", cbam=True, head="fisher"))
    assert all(v.dtype == jnp.float32 for _, v in leaves_with_paths(variables))
    (fmap, logits16), updates = apply(
        model16,
        variables,
        x,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": DROPOUT_KEY},
        method="features_and_logits",
    )
    assert fmap.dtype == jnp.bfloat16
    assert logits16.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for _, v in leaves_with_paths(updates))
    _, (logits32, _) = _grads("none")  # the same training forward in float32
    np.testing.assert_allclose(logits16, logits32, atol=0.15)  # bf16 rounding only


def test_features_and_logits_match_call_and_split_for_gradcam():
    model, variables, x = init(tiny_cfg(cbam=True, head="fisher"))
    fmap, logits = _eval(True, "fisher")
    assert fmap.shape == (2, 1, 1, 32)
    np.testing.assert_allclose(logits, apply(model, variables, x), rtol=1e-6)
    out, vjp = jax.vjp(lambda f: model.apply(variables, f, method="classify"), fmap)
    np.testing.assert_allclose(out, logits, rtol=1e-5, atol=1e-6)
    (grad_fmap,) = vjp(jnp.eye(14)[None, 0].repeat(2, 0))
    assert grad_fmap.shape == fmap.shape


def test_chexnet_head_is_gap_then_dense():
    _, variables, _ = init(tiny_cfg())
    fmap, logits = _eval(False, "chexnet")
    dense = variables["params"]["classifier"]["logits"]
    expected = np.asarray(fmap).mean(axis=(1, 2)) @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_fisher_head_layers_dropout_and_l2():
    model, variables, x = init(tiny_cfg(cbam=True, head="fisher"))
    head = variables["params"]["classifier"]
    assert head["dense1"]["kernel"].shape == (32, 128)
    assert head["dense2"]["kernel"].shape == (128, 64)
    assert head["logits"]["kernel"].shape == (64, 14)
    fmap, logits = _eval(True, "fisher")
    h = np.asarray(fmap).mean(axis=(1, 2))
    for name in ("dense1", "dense2"):
        h = np.maximum(h @ np.asarray(head[name]["kernel"]) + np.asarray(head[name]["bias"]), 0)
    expected = h @ np.asarray(head["logits"]["kernel"]) + np.asarray(head["logits"]["bias"])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)

    _, (train_logits, _) = _grads("none")  # dropout key DROPOUT_KEY
    other, _ = apply(model, variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(4)})
    assert not np.allclose(train_logits, other)  # dropout is active in training

    kernels = [np.asarray(head[n]["kernel"], np.float64) for n in ("dense1", "dense2", "logits")]
    assert head_kernel_paths(variables["params"]) == [
        ("classifier", "dense1", "kernel"),
        ("classifier", "dense2", "kernel"),
        ("classifier", "logits", "kernel"),
    ]
    np.testing.assert_allclose(l2_penalty(variables["params"]), sum((k**2).sum() for k in kernels), rtol=1e-5)


def test_cbam_matches_numpy():
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 8), jnp.float32)
    module = CBAM()
    params = jax.jit(module.init)(jax.random.key(1), x)["params"]
    assert params["mlp_hidden"]["kernel"].shape == (8, 4)  # C -> C/2 -> C
    assert params["spatial_conv"]["kernel"].shape == (7, 7, 2, 1)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xn = np.asarray(x, np.float64)
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731

    def mlp(v):
        h = np.maximum(v @ p["mlp_hidden"]["kernel"] + p["mlp_hidden"]["bias"], 0)
        return h @ p["mlp_out"]["kernel"] + p["mlp_out"]["bias"]

    gate = sigmoid(mlp(xn.mean(axis=(1, 2))) + mlp(xn.max(axis=(1, 2))))
    y = xn * gate[:, None, None, :]
    pooled = np.concatenate([y.mean(-1, keepdims=True), y.max(-1, keepdims=True)], -1)
    padded = np.pad(pooled, ((0, 0), (3, 3), (3, 3), (0, 0)))
    kernel = p["spatial_conv"]["kernel"][..., 0]
    conv = np.zeros(y.shape[:3])
    for i in range(7):
        for j in range(7):
            conv += (padded[:, i : i + 5, j : j + 6, :] * kernel[i, j]).sum(-1)
    expected = y * sigmoid(conv)[..., None]
    np.testing.assert_allclose(jax.jit(module.apply)({"params": params}, x), expected, rtol=1e-5, atol=1e-6)


def _saved_residual_bytes(fn, arg, capsys) -> tuple[int, str]:
    capsys.readouterr()
    print_saved_residuals(fn, arg)
    report = capsys.readouterr().out
    total = 0
    for dtype, dims in re.findall(r"^(\w+)\[([\d,]*)\]", report, flags=re.M):
        size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        total += size * (1 if dtype == "bool" else int(re.sub(r"\D", "", dtype)) // 8)
    return total, report


def test_remat_cuts_saved_activations_with_identical_gradients(capsys):
    reports = {}
    for remat in REMAT_MODES:
        loss, variables = train_loss(remat)
        reports[remat] = _saved_residual_bytes(lambda p, loss=loss: loss(p)[0], variables["params"], capsys)
    (plain_bytes, plain_report), (layer_bytes, layer_report) = reports["none"], reports["dense_layers"]
    all_bytes, all_report = reports["all"]
    # Without remat the dense layers' BN/ReLU/conv outputs are kept for the backward
    # pass; per layer none are (only their thin inputs), and the total drops (measured
    # 755 kB -> 464 kB at this size, the rest being stem, transitions, CBAM and head).
    assert plain_report.count("DenseLayer") >= 16  # 8 layers x 2 ReLU outputs (at least)
    assert "DenseLayer" not in layer_report
    assert layer_bytes < 0.65 * plain_bytes, (layer_bytes, plain_bytes)
    # "all" also recomputes the stem, transitions, final norm and CBAM: no BatchNorm or
    # ReLU output and no float32 feature map is kept anywhere in the backbone.
    for kept in ("Transition", "CBAM", "batch_norm", "relu", "max_pool"):
        assert kept not in all_report, (kept, all_report)
    assert all_bytes < 0.5 * layer_bytes, (all_bytes, layer_bytes)

    # Same math, different XLA fusion: equal up to float32 round-off. Gradients of biases
    # feeding a train-mode BatchNorm nearly cancel, so round-off is judged against the
    # largest gradient (measured differences: <= 3e-6 against a largest gradient of ~11).
    plain_grads, (plain_logits, plain_updates) = _grads("none")
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(plain_grads))
    for remat in ("dense_layers", "all"):
        grads, (logits, updates) = _grads(remat)
        np.testing.assert_allclose(logits, plain_logits, rtol=1e-6, atol=1e-6, err_msg=remat)
        for (path, a), (_, b) in zip(leaves_with_paths(plain_grads), leaves_with_paths(grads), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * scale, err_msg=f"{remat} {path}")
        plain_stats, stats = leaves_with_paths(plain_updates), leaves_with_paths(updates)
        assert [p for p, _ in plain_stats] == [p for p, _ in stats]
        for (path, a), (_, b) in zip(plain_stats, stats, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=f"{remat} {path}")


def test_remat_all_reaches_the_memory_efficient_floor_on_densenet121():
    """Saved activations per image at 128 px, bfloat16, CBAM: "all" stays within 1.5x of
    the analytic floor (measured: exactly the floor, and 66.0 MiB at 1024 px), while
    per-layer remat is ~10x over it, so a regression in any part shows here."""
    spec = arch_spec("densenet121")
    floor = saved_activation_floor(spec, 128, 3, itemsize=2)
    measured = {}
    for remat in ("dense_layers", "all"):
        model = build_model(tiny_cfg(arch="densenet121", cbam=True, dtype="bfloat16", remat=remat))
        measured[remat] = saved_activation_bytes_per_image(model, 128)
    assert measured["all"] <= 1.5 * floor, (measured, floor)
    assert measured["dense_layers"] > 5 * floor, (measured, floor)


def test_saved_activation_floor_by_hand():
    # DenseNet121 at 1024 px: image 1024*1024*3; blocks at 256, 128, 64, 32 px with
    # 64+6*32, 128+12*32, 256+24*32, 512+16*32 channels; final map 1024 channels at 32 px.
    elements = 1024 * 1024 * 3 + 256**2 * 256 + 128**2 * 512 + 64**2 * 1024 + 32**2 * 1024 + 32**2 * 1024
    assert saved_activation_floor(arch_spec("densenet121"), 1024, 3, itemsize=2) == 2 * elements == 66 * 2**20


def test_remat_modes_and_legacy_bools():
    assert [remat_mode(v) for v in (*REMAT_MODES, True, False)] == [*REMAT_MODES, "dense_layers", "none"]
    # Remat changes no variable name or shape: Keras weights and checkpoints load in every mode.
    layouts = set()
    for remat in REMAT_MODES:
        model = build_model(tiny_cfg(cbam=True, remat=remat))
        shapes = jax.eval_shape(lambda model=model: model.init(jax.random.key(0), X))
        layouts.add(
            tuple((jax.tree_util.keystr(p), s.shape) for p, s in jax.tree_util.tree_flatten_with_path(shapes)[0])
        )
    assert len(layouts) == 1
    with pytest.raises(ValueError, match="remat 'some'; expected one of none, dense_layers, all"):
        build_model(tiny_cfg(remat="some"))


def test_unknown_remat_policy_and_arch_are_named():
    with pytest.raises(ValueError, match="remat_policy 'everything_forgotten'"):
        build_model(tiny_cfg(remat="all", remat_policy="everything_forgotten"))
    with pytest.raises(ValueError, match="arch 'densenet122'"):
        build_model(tiny_cfg(arch="densenet122"))


@pytest.mark.parametrize(
    "arch,keras_notop_params",
    # keras.applications.DenseNet*(include_top=False).count_params(); 121 is also
    # checked against a live Keras model in test_import_weights.py.
    [("densenet121", 7_037_504), ("densenet169", 12_642_880), ("densenet201", 18_321_984)],
)
def test_backbone_parameter_count_equals_keras(arch, keras_notop_params):
    model = build_model(tiny_cfg(arch=arch))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    backbone = list(jax.tree.leaves(shapes["params"]["backbone"])) + jax.tree.leaves(shapes["batch_stats"])
    assert sum(int(np.prod(s.shape)) for s in backbone) == keras_notop_params
