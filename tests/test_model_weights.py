"""The weights artifact (orbax + JSON config) and starting a model from it (`init_from`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.models import build_model, default_model_config
from cxrjax.models.weights import load_weights, merge_pretrained, save_weights

X = jnp.zeros((1, 32, 32, 3), jnp.float32)


def tiny(**overrides):
    cfg = default_model_config()
    cfg.update(arch="tiny", **overrides)
    return cfg


def init(cfg, seed=0):
    """Random variables of the model's structure; tracing only (a real init compiles)."""
    x = jnp.zeros(X.shape[:3] + (cfg.in_channels,))
    shapes = jax.eval_shape(lambda: build_model(cfg).init(jax.random.key(0), x))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)


def test_roundtrip_keeps_config_and_every_tensor(tmp_path):
    cfg = tiny(cbam=True, head="fisher")
    variables = init(cfg)
    save_weights(tmp_path / "w", variables, cfg)
    loaded_cfg, loaded = load_weights(tmp_path / "w")
    assert loaded_cfg.to_dict() == cfg.to_dict()
    assert jax.tree.structure(loaded) == jax.tree.structure(jax.tree.map(np.asarray, variables))
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(loaded), strict=True):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileExistsError):
        save_weights(tmp_path / "w", variables, cfg)
    with pytest.raises(FileNotFoundError, match="not a weights directory"):
        load_weights(tmp_path)


def test_merge_takes_shared_parts_and_reports_fresh_ones():
    src_cfg = tiny()  # chexnet head, no CBAM
    src = jax.tree.map(np.asarray, init(src_cfg, seed=1))
    dst_cfg = tiny(cbam=True, head="fisher")
    merged, report = merge_pretrained(init(dst_cfg, seed=2), src, src_cfg, dst_cfg)
    for part in ("params", "batch_stats"):
        got, want = jax.tree.leaves(merged[part]["backbone"]), jax.tree.leaves(src[part]["backbone"])
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    assert {p.split("/")[1] for p in report["fresh"]} == {"attention", "classifier"}
    assert sorted(report["ignored"]) == ["params/classifier/logits/bias", "params/classifier/logits/kernel"]
    same, report = merge_pretrained(init(src_cfg, seed=2), src, src_cfg, src_cfg)
    assert report["fresh"] == [] and report["ignored"] == []
    np.testing.assert_array_equal(
        same["params"]["classifier"]["logits"]["kernel"], src["params"]["classifier"]["logits"]["kernel"]
    )


def test_merge_into_gray_model_sums_the_stem():
    src_cfg, gray_cfg = tiny(), tiny(in_channels=1)
    src = jax.tree.map(np.asarray, init(src_cfg, seed=1))
    merged, report = merge_pretrained(init(gray_cfg), src, src_cfg, gray_cfg)
    assert report["converted"] == ["params/backbone/conv1_conv/kernel: 3-channel stem summed over input channels"]
    np.testing.assert_allclose(
        merged["params"]["backbone"]["conv1_conv"]["kernel"],
        src["params"]["backbone"]["conv1_conv"]["kernel"].sum(axis=2, keepdims=True),
    )


def test_merge_errors_name_the_problem():
    cfg = tiny()
    src = jax.tree.map(np.asarray, init(cfg))
    with pytest.raises(ValueError, match="weights are tiny, the model is densenet121"):
        merge_pretrained(src, src, cfg, default_model_config())
    bad = jax.tree.map(lambda a: a, src)
    bad["params"]["backbone"]["pool3"]["conv"]["kernel"] = np.zeros((1, 1, 32, 15), np.float32)
    with pytest.raises(ValueError, match=r"params/backbone/pool3/conv/kernel is float32\[1, 1, 32, 15\]"):
        merge_pretrained(src, bad, cfg, cfg)
    del bad["batch_stats"]["backbone"]["bn"]
    with pytest.raises(ValueError, match="lack.*batch_stats/backbone/bn/mean"):
        merge_pretrained(src, {**bad, "params": src["params"]}, cfg, cfg)
