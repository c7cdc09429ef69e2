"""Reduce-on-plateau, early stopping and learning-rate schedules on hand-made sequences."""

from __future__ import annotations

import math

import pytest

from cxrjax.config import base_config
from cxrjax.train import optim


def test_plateau_fisher_settings_by_hand():
    """Fisher: factor 0.5, patience 3, min_lr 1e-6, base lr 1e-4 (scale floor 0.01)."""
    plateau = optim.Plateau(factor=0.5, patience=3, min_lr=1e-6, base_lr=1e-4)
    val_loss = [
        1.0,
        0.9,
        0.95,
        0.9,
        0.92,  # 3 epochs without beating 0.9 -> halve
        0.8,  # new best, wait resets
        0.80005,  # within min_delta 1e-4 of the best: no improvement
        0.81,
        0.82,  # third epoch without improvement -> halve again
        0.9,
        0.9,
        0.9,
    ]  # and again
    scales = [plateau.update(v) for v in val_loss]
    assert scales == [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125]
    assert plateau.best == 0.8


def test_plateau_stops_at_min_lr():
    plateau = optim.Plateau(factor=0.1, patience=1, min_lr=1e-6, base_lr=1e-3)
    scales = [plateau.update(1.0) for _ in range(6)]
    # 1e-3 -> 1e-4 -> 1e-5 -> 1e-6 and no lower; the first epoch sets the best.
    assert [s * 1e-3 for s in scales] == pytest.approx([1e-3, 1e-4, 1e-5, 1e-6, 1e-6, 1e-6])


def test_early_stopping_by_hand():
    early = optim.EarlyStopping(patience=2)
    aucs = [0.60, 0.65, 0.64, 0.66, 0.66, 0.65]
    decisions = [early.update(a, step=10 * (i + 1)) for i, a in enumerate(aucs)]
    # 0.64 waits once, 0.66 is a new best at step 40, then 0.66 (not better) and 0.65 -> stop.
    assert decisions == [False, False, False, False, False, True]
    assert (early.best, early.best_step, early.stopped) == (0.66, 40, True)


def test_early_stopping_patience_zero_never_stops():
    early = optim.EarlyStopping(patience=0)
    assert not any(early.update(0.5, step) for step in range(20))


def _optim_cfg(**kw):
    cfg = base_config().optim
    cfg.update(kw)
    return cfg


def test_exponential_schedule_per_epoch_staircase():
    schedule = optim.make_schedule(_optim_cfg(schedule="exponential", learning_rate=1e-3, decay_rate=0.95), 10, 100)
    assert float(schedule(0)) == pytest.approx(1e-3)
    assert float(schedule(9)) == pytest.approx(1e-3)
    assert float(schedule(10)) == pytest.approx(1e-3 * 0.95)
    assert float(schedule(25)) == pytest.approx(1e-3 * 0.95**2)


def test_cosine_schedule_with_one_warmup_epoch():
    schedule = optim.make_schedule(_optim_cfg(schedule="cosine", learning_rate=1e-3, warmup_epochs=1.0), 10, 110)
    assert float(schedule(0)) == pytest.approx(0.0)
    assert float(schedule(5)) == pytest.approx(0.5e-3)  # linear warmup over 10 steps
    assert float(schedule(10)) == pytest.approx(1e-3)
    # Cosine from step 10 to 110: halfway (step 60) is half, a quarter in is (1 + cos(pi/4))/2.
    assert float(schedule(60)) == pytest.approx(0.5e-3)
    assert float(schedule(35)) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-12)


def test_schedules_count_updates_under_gradient_accumulation():
    """With 2 accumulation steps, 10 steps per epoch are 5 optimizer updates."""
    schedule = optim.make_schedule(
        _optim_cfg(schedule="exponential", learning_rate=1e-3, decay_rate=0.5, grad_accum_steps=2), 10, 100
    )
    assert float(schedule(4)) == pytest.approx(1e-3)
    assert float(schedule(5)) == pytest.approx(0.5e-3)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("schedule", "step", "unknown schedule 'step'; choose one of constant, exponential, cosine, plateau"),
        ("name", "lamb", "unknown optimizer 'lamb'; choose one of adam, adamw, sgd"),
    ],
)
def test_unknown_names_list_the_choices(field, value, message):
    cfg = _optim_cfg(**{field: value})
    with pytest.raises(ValueError, match=message):
        optim.make_optimizer(cfg, optim.make_schedule(cfg, 10, 100))
