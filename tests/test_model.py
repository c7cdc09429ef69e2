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


def tiny_cfg(**overrides):
    cfg = default_model_config()
    cfg.arch = "tiny"
    cfg.update(overrides)
    return cfg


X = jax.random.normal(jax.random.key(1), (2, 32, 32, 3), jnp.float32)


@functools.cache
def _variables(cbam: bool, head: str):
    # A jitted init compiles in ~2 s; eager init compiles every op separately and takes
    # longer. Variables do not depend on dtype or remat, so tests share these.
    return jax.jit(build_model(tiny_cfg(cbam=cbam, head=head)).init)(jax.random.key(0), X)


def init(cfg):
    """(model, variables, x) for a tiny config; applying eagerly is fast once initialized."""
    return build_model(cfg), _variables(bool(cfg.cbam), cfg.head), X


def apply(model, variables, x, **kwargs):
    # One compile per new shape/dtype beats eager flax, which compiles op by op.
    return jax.jit(lambda v, x: model.apply(v, x, **kwargs))(variables, x)


def leaves_with_paths(tree):
    return [("/".join(k.key for k in p), v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_default_config_fields():
    cfg = default_model_config()
    assert cfg.to_dict() == {
        "arch": "densenet121", "cbam": False, "head": "chexnet", "num_classes": 14,
        "dropout": 0.3, "dtype": "float32", "remat": False, "remat_policy": "nothing_saveable",
        "in_channels": 3, "init_from": "",
    }


def test_tiny_forward_backward_shapes_and_batch_stats_update():
    model, variables, x = init(tiny_cfg(cbam=True, head="fisher"))
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["params"]) == {"backbone", "attention", "classifier"}

    def loss(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
            mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)},
        )
        return jnp.mean(logits**2), (logits, updates)

    grads, (logits, updates) = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    assert logits.shape == (2, 14) and logits.dtype == jnp.float32
    assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads["backbone"]))
    old, new = variables["batch_stats"]["backbone"]["bn"], updates["batch_stats"]["backbone"]["bn"]
    assert not np.allclose(old["mean"], new["mean"])  # train mode updates running stats


def test_non_square_input():
    model, variables, _ = init(tiny_cfg())
    for shape in [(1, 64, 96, 3), (1, 67, 41, 3)]:
        logits = apply(model, variables, jnp.ones(shape))
        assert logits.shape == (1, 14)
        assert np.isfinite(logits).all()


def test_wrong_channel_count_is_named():
    model = build_model(tiny_cfg(in_channels=1))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 32, 32, 1))))
    assert variables["params"]["backbone"]["conv1_conv"]["kernel"].shape == (7, 7, 1, 16)
    with pytest.raises(ValueError, match="1 channel"):
        jax.eval_shape(lambda: model.apply(variables, jnp.ones((1, 32, 32, 3))))


def test_bfloat16_compute_keeps_float32_params_stats_and_logits():
    cfg16 = tiny_cfg(dtype="bfloat16", cbam=True, head="fisher")
    model16, variables, x = init(cfg16)
    assert all(v.dtype == jnp.float32 for _, v in leaves_with_paths(variables))
    logits, updates = apply(model16, variables, x, train=True, mutable=["batch_stats"],
                            rngs={"dropout": jax.random.key(0)})
    assert logits.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for _, v in leaves_with_paths(updates))
    fmap, logits16 = apply(model16, variables, x, method="features_and_logits")
    assert fmap.dtype == jnp.bfloat16 and logits16.dtype == jnp.float32
    logits32 = apply(build_model(tiny_cfg(cbam=True, head="fisher")), variables, x)
    np.testing.assert_allclose(logits16, logits32, atol=0.1)  # same function, bf16 rounding


def test_features_and_logits_match_call_and_split_for_gradcam():
    model, variables, x = init(tiny_cfg(cbam=True, head="fisher"))
    fmap, logits = apply(model, variables, x, method="features_and_logits")
    np.testing.assert_allclose(logits, apply(model, variables, x), rtol=1e-6)
    assert fmap.shape == (2, 1, 1, 32)
    np.testing.assert_allclose(apply(model, variables, x, method="features"), fmap, rtol=1e-6)
    out, vjp = jax.vjp(lambda f: model.apply(variables, f, method="classify"), fmap)
    np.testing.assert_allclose(out, logits, rtol=1e-6)
    (grad_fmap,) = vjp(jnp.eye(14)[None, 0].repeat(2, 0))
    assert grad_fmap.shape == fmap.shape


def test_chexnet_head_is_gap_then_dense():
    model, variables, x = init(tiny_cfg())
    fmap, logits = apply(model, variables, x, method="features_and_logits")
    dense = variables["params"]["classifier"]["logits"]
    expected = np.asarray(fmap).mean(axis=(1, 2)) @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_fisher_head_layers_dropout_and_l2():
    model, variables, x = init(tiny_cfg(cbam=True, head="fisher"))
    head = variables["params"]["classifier"]
    assert head["dense1"]["kernel"].shape == (32, 128)
    assert head["dense2"]["kernel"].shape == (128, 64)
    assert head["logits"]["kernel"].shape == (64, 14)
    fmap, logits = apply(model, variables, x, method="features_and_logits")
    h = np.asarray(fmap).mean(axis=(1, 2))
    for name in ("dense1", "dense2"):
        h = np.maximum(h @ np.asarray(head[name]["kernel"]) + np.asarray(head[name]["bias"]), 0)
    expected = h @ np.asarray(head["logits"]["kernel"]) + np.asarray(head["logits"]["bias"])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)

    @jax.jit
    def train_logits_for(key):
        return model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})[0]

    def train_logits(seed):
        return train_logits_for(jax.random.key(seed))

    assert not np.allclose(train_logits(0), train_logits(1))  # dropout active in training
    np.testing.assert_array_equal(train_logits(0), train_logits(0))

    kernels = [np.asarray(head[n]["kernel"], np.float64) for n in ("dense1", "dense2", "logits")]
    assert head_kernel_paths(variables["params"]) == [
        ("classifier", "dense1", "kernel"), ("classifier", "dense2", "kernel"),
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
            conv += (padded[:, i:i + 5, j:j + 6, :] * kernel[i, j]).sum(-1)
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
    results = {}
    for remat in (False, True):
        model, variables, x = init(tiny_cfg(remat=remat))

        def loss(params):
            logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                    x, train=True, mutable=["batch_stats"])
            return jnp.sum(logits * jnp.arange(14.0))

        nbytes, report = _saved_residual_bytes(loss, variables["params"], capsys)
        results[remat] = (nbytes, report, jax.jit(jax.grad(loss))(variables["params"]))
    plain_bytes, plain_report, plain_grads = results[False]
    remat_bytes, remat_report, remat_grads = results[True]
    # Without remat the dense layers' BN/ReLU/conv outputs are kept for the backward
    # pass; with it none are (only their thin inputs), and the total drops (measured
    # 691 kB -> 400 kB at this size, the rest being stem, transitions and head).
    assert plain_report.count("DenseLayer") >= 16  # 8 layers x 2 ReLU outputs (at least)
    assert "DenseLayer" not in remat_report
    assert remat_bytes < 0.65 * plain_bytes, (remat_bytes, plain_bytes)
    # Same math, different XLA fusion: equal up to float32 round-off. Gradients of biases
    # feeding a train-mode BatchNorm nearly cancel, so round-off is judged against the
    # largest gradient (measured differences: <= 3e-6 against a largest gradient of ~11).
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(plain_grads))
    for (path, a), (_, b) in zip(leaves_with_paths(plain_grads), leaves_with_paths(remat_grads)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * scale, err_msg=path)


def test_unknown_remat_policy_and_arch_are_named():
    with pytest.raises(ValueError, match="remat_policy 'everything_forgotten'"):
        build_model(tiny_cfg(remat=True, remat_policy="everything_forgotten"))
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
