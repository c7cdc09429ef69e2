"""Multi-label losses, computed from logits in float32.

Every loss is a mean over the batch and the 14 findings. The weighted forms use
log-probabilities from `log_sigmoid` (stable for large logits); `weighted_bce` also
takes explicit log-probabilities so it can be checked against worked examples that
use probabilities and an epsilon.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

LOSSES = ("bce", "weighted_bce", "balanced_bce", "dynamic_bce", "focal")


def _log_probs(logits):
    logits = logits.astype(jnp.float32)
    return jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)


def weighted_bce(log_p, log_not_p, labels, w_pos, w_neg):
    """-(w_pos·y·log p + w_neg·(1-y)·log(1-p)), averaged over batch and findings."""
    labels = labels.astype(jnp.float32)
    per = w_pos * labels * log_p + w_neg * (1.0 - labels) * log_not_p
    return -jnp.mean(per)


def bce(logits, labels):
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels))


def frequency_weights(prevalence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AI for Medical Diagnosis weighting: w_pos = freq_neg, w_neg = freq_pos."""
    prevalence = np.asarray(prevalence, np.float32)
    return 1.0 - prevalence, prevalence


def balanced_weights(positives: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 'balanced' rule per finding: w = N / (2 · n_class)."""
    positives = np.asarray(positives, np.float64)
    negatives = total - positives
    if (positives == 0).any() or (negatives == 0).any():
        raise ValueError("balanced weights need positives and negatives of every finding")
    return (total / (2 * positives)).astype(np.float32), (total / (2 * negatives)).astype(np.float32)


def dynamic_bce(logits, labels, smooth: float = 0.1):
    """Fisher's DynamicWeightedBCE_wgt_smooth: weights from this batch's positive ratio,
    pulled toward 0.5 by `smooth` so an all-negative batch cannot divide by zero."""
    ratio = jnp.mean(labels.astype(jnp.float32), axis=0)
    ratio = ratio * (1.0 - smooth) + 0.5 * smooth
    log_p, log_not_p = _log_probs(logits)
    return weighted_bce(log_p, log_not_p, labels, 1.0 / ratio, 1.0 / (1.0 - ratio))


def focal(logits, labels, gamma: float = 2.0, alpha: float = 0.25):
    return jnp.mean(optax.sigmoid_focal_loss(logits.astype(jnp.float32), labels, alpha=alpha, gamma=gamma))


def make_loss(cfg, prevalence: np.ndarray, positives: np.ndarray, total: int):
    """loss(logits, labels) for `cfg.name`; class weights come from the training part."""
    name = cfg.name
    if name == "bce":
        return bce
    if name in ("weighted_bce", "balanced_bce"):
        if name == "weighted_bce":
            w_pos, w_neg = frequency_weights(prevalence)
        else:
            w_pos, w_neg = balanced_weights(positives, total)
        w_pos, w_neg = jnp.asarray(w_pos), jnp.asarray(w_neg)
        return lambda logits, labels: weighted_bce(*_log_probs(logits), labels, w_pos, w_neg)
    if name == "dynamic_bce":
        return lambda logits, labels: dynamic_bce(logits, labels, cfg.smooth)
    if name == "focal":
        return lambda logits, labels: focal(logits, labels, cfg.focal_gamma, cfg.focal_alpha)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
