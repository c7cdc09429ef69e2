"""Training losses against values worked out by hand or with plain numpy formulas."""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cxrjax.train import losses


def _logit(p):
    return np.log(p) - np.log1p(-p)


def test_bce_two_by_two_by_hand():
    # p = sigmoid(logit): 0.8, 0.3 / 0.6, 0.9 against labels 1, 0 / 0, 1.
    p = np.array([[0.8, 0.3], [0.6, 0.9]])
    labels = np.array([[1.0, 0.0], [0.0, 1.0]])
    by_hand = -(math.log(0.8) + math.log(0.7) + math.log(0.4) + math.log(0.9)) / 4
    got = float(losses.bce(jnp.asarray(_logit(p), jnp.float32), jnp.asarray(labels)))
    assert got == pytest.approx(by_hand, rel=1e-6)
    assert by_hand == pytest.approx(0.40037, abs=1e-5)


# "AI for Medical Diagnosis" (Coursera), week 1, weighted-loss exercise.
Y_TRUE = np.array([[1, 1, 1], [1, 1, 0], [0, 1, 0], [1, 0, 1]], np.float32)
W_P = np.array([0.25, 0.25, 0.5], np.float32)
W_N = np.array([0.75, 0.75, 0.5], np.float32)


def test_frequency_weights_reproduce_the_exercise():
    # w_pos = frequency of negatives, w_neg = frequency of positives, per class.
    w_pos, w_neg = losses.frequency_weights(Y_TRUE.mean(0))
    np.testing.assert_allclose(w_pos, W_P)
    np.testing.assert_allclose(w_neg, W_N)


@pytest.mark.parametrize("p", [0.7, 0.3])
def test_weighted_bce_matches_the_exercise(p):
    """The exercise's expected value for both predictions is -0.4956203.

    Its loss is sum over classes of -mean over the batch of
    (w_p*y*log(p + eps) + w_n*(1-y)*log(1 - p + eps)) with eps = 1, so every log is
    of a number above 1 and the "loss" comes out negative; the sign convention (a
    leading minus on the weighted log-likelihood) is the same as ours. Our
    weighted_bce averages over the classes as well, so it is 1/3 of the exercise's
    sum: we multiply by the number of classes.
    """
    eps = 1.0
    pred = np.full((4, 3), p, np.float32)
    ours = losses.weighted_bce(
        jnp.log(pred + eps), jnp.log(1 - pred + eps), jnp.asarray(Y_TRUE), jnp.asarray(W_P), jnp.asarray(W_N)
    )
    assert float(ours) * Y_TRUE.shape[1] == pytest.approx(-0.4956203, abs=1e-6)


def test_weighted_bce_from_logits_by_hand():
    """make_loss('weighted_bce') on real probabilities: a positive loss, per-element by hand."""
    p = np.array([[0.9, 0.2, 0.6], [0.4, 0.7, 0.1]])
    y = np.array([[1, 0, 1], [0, 1, 0]], np.float64)
    prevalence = np.array([0.1, 0.5, 0.2])
    cfg = ml_collections.ConfigDict({"name": "weighted_bce"})
    loss_fn = losses.make_loss(cfg, prevalence, prevalence * 10, 10)
    w_pos, w_neg = 1 - prevalence, prevalence
    terms = [
        [w_pos[j] * math.log(p[i, j]) if y[i, j] else w_neg[j] * math.log(1 - p[i, j]) for j in range(3)]
        for i in range(2)
    ]
    by_hand = -sum(map(sum, terms)) / 6
    assert float(loss_fn(jnp.asarray(_logit(p), jnp.float32), jnp.asarray(y))) == pytest.approx(by_hand, rel=1e-5)


def test_balanced_weights_by_hand():
    # N = 4 rows; positives per class 3, 3, 2 -> N/(2*n): pos 4/6, 4/6, 1; neg 4/2, 4/2, 1.
    w_pos, w_neg = losses.balanced_weights(Y_TRUE.sum(0), len(Y_TRUE))
    np.testing.assert_allclose(w_pos, [2 / 3, 2 / 3, 1.0], rtol=1e-6)
    np.testing.assert_allclose(w_neg, [2.0, 2.0, 1.0], rtol=1e-6)


def test_balanced_weights_refuse_a_class_without_positives():
    with pytest.raises(ValueError, match="positives and negatives of every finding"):
        losses.balanced_weights(np.array([3, 0, 2]), 4)


def test_dynamic_bce_by_hand():
    """Fisher's DynamicWeightedBCE_wgt_smooth: the batch's positive ratio r per class is
    pulled toward 0.5, r' = r*(1-s) + 0.5*s, weights 1/r' (positives) and 1/(1-r')
    (negatives), then the mean over batch and classes. Fisher's Keras code adds
    epsilon = 1e-7 to both denominators and clips p to [1e-7, 1-1e-7]; neither
    matters at these values (relative effect ~1e-7).
    """
    s = 0.1
    p = np.array([[0.9, 0.2], [0.6, 0.3], [0.8, 0.4], [0.3, 0.5]])
    y = np.array([[1, 0], [1, 0], [1, 0], [0, 0]], np.float64)  # class 2 has no positives
    # Class 1: r = 3/4 -> r' = 0.75*0.9 + 0.05 = 0.725. Class 2: r = 0 -> r' = 0.05.
    r = np.array([0.725, 0.05])
    total = 0.0
    for i in range(4):
        for j in range(2):
            total += math.log(p[i, j]) / r[j] if y[i, j] else math.log(1 - p[i, j]) / (1 - r[j])
    by_hand = -total / 8
    got = losses.dynamic_bce(jnp.asarray(_logit(p), jnp.float32), jnp.asarray(y), smooth=s)
    assert float(got) == pytest.approx(by_hand, rel=1e-5)
    fisher = _fisher_dynamic_bce(y, p, s)
    assert float(got) == pytest.approx(fisher, rel=1e-5)


def _fisher_dynamic_bce(y_true, y_pred, smoothing, epsilon=1e-7):
    """Fisher's formula with his epsilon and clipping, in numpy."""
    y_pred = np.clip(y_pred, epsilon, 1 - epsilon)
    smoothed = y_true.mean(0) * (1 - smoothing) + 0.5 * smoothing
    pos_w, neg_w = 1 / (smoothed + epsilon), 1 / (1 - smoothed + epsilon)
    return -np.mean(y_true * pos_w * np.log(y_pred) + (1 - y_true) * neg_w * np.log1p(-y_pred))


def test_dynamic_bce_stays_finite_on_an_all_negative_batch():
    got = losses.dynamic_bce(jnp.zeros((4, 3)), jnp.zeros((4, 3)), smooth=0.1)
    # r' = 0.05 everywhere; every term is log(0.5)/0.95.
    assert float(got) == pytest.approx(-math.log(0.5) / 0.95, rel=1e-6)


def test_focal_loss_matches_the_formula():
    """Lin et al. 2017: FL = -alpha_t (1 - p_t)^gamma log(p_t), mean over all elements."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (5, 4))
    y = (rng.random((5, 4)) < 0.4).astype(np.float64)
    gamma, alpha = 2.0, 0.25
    p = 1 / (1 + np.exp(-logits))
    p_t = np.where(y == 1, p, 1 - p)
    alpha_t = np.where(y == 1, alpha, 1 - alpha)
    by_hand = np.mean(-alpha_t * (1 - p_t) ** gamma * np.log(p_t))
    cfg = ml_collections.ConfigDict({"name": "focal", "focal_gamma": gamma, "focal_alpha": alpha})
    got = losses.make_loss(cfg, y.mean(0), y.sum(0), len(y))(jnp.asarray(logits, jnp.float32), jnp.asarray(y))
    assert float(got) == pytest.approx(by_hand, rel=1e-5)


def test_focal_with_gamma_zero_and_even_alpha_is_half_bce():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(0, 2, (6, 3)), jnp.float32)
    y = jnp.asarray(rng.random((6, 3)) < 0.5, jnp.float32)
    assert float(losses.focal(logits, y, gamma=0.0, alpha=0.5)) == pytest.approx(
        0.5 * float(losses.bce(logits, y)), rel=1e-6
    )


def test_bce_is_stable_for_large_logits():
    logits = jnp.array([[80.0, -80.0]])
    assert float(losses.bce(logits, jnp.array([[0.0, 1.0]]))) == pytest.approx(80.0, rel=1e-6)


def test_unknown_loss_names_the_choices():
    with pytest.raises(ValueError, match="unknown loss 'hinge'; choose one of bce, weighted_bce"):
        losses.make_loss(ml_collections.ConfigDict({"name": "hinge"}), np.ones(3) / 2, np.ones(3), 2)
