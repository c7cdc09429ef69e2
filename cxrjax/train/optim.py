"""Optimizers and learning-rate schedules through optax, plus the two epoch-level
controllers (reduce-on-plateau, early stopping) that decide on validation results.

Reduce-on-plateau acts on validation loss once per epoch, as Keras does, so it lives
on the host and reaches the step as a scale of the update (for Adam, AdamW and SGD a
scaled update is exactly a scaled learning rate).
"""

from __future__ import annotations

import dataclasses

import optax

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "exponential", "cosine", "plateau")


def make_schedule(cfg, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the optimizer's update count.

    With gradient accumulation an update happens every `grad_accum_steps` steps, and
    optax.MultiSteps counts updates, so epochs are measured in updates here.
    """
    lr = cfg.learning_rate
    updates_per_epoch = max(steps_per_epoch // cfg.grad_accum_steps, 1)
    total_updates = total_steps // cfg.grad_accum_steps
    if cfg.schedule in ("constant", "plateau"):
        return optax.constant_schedule(lr)
    if cfg.schedule == "exponential":  # per epoch, staircase, as in the Keras guides
        return optax.exponential_decay(lr, updates_per_epoch, cfg.decay_rate, staircase=True)
    if cfg.schedule == "cosine":
        warmup = int(cfg.warmup_epochs * updates_per_epoch)
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(total_updates, warmup + 1))
    raise ValueError(f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")


def make_optimizer(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
    if cfg.name == "adam":
        opt = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "sgd":
        opt = optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
    else:
        raise ValueError(f"unknown optimizer {cfg.name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if cfg.grad_accum_steps > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=cfg.grad_accum_steps)
    return opt


@dataclasses.dataclass
class Plateau:
    """Keras ReduceLROnPlateau on a minimized metric (Fisher: 0.5, patience 3, min 1e-6):
    an epoch improves when it beats the best by more than Keras's default min_delta."""

    factor: float
    patience: int
    min_lr: float
    base_lr: float
    scale: float = 1.0
    best: float = float("inf")
    wait: int = 0
    min_delta: float = 1e-4

    def update(self, value: float) -> float:
        """Record an epoch's value; returns the learning-rate scale for the next epoch."""
        if value < self.best - self.min_delta:
            self.best, self.wait = value, 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.scale = max(self.scale * self.factor, self.min_lr / self.base_lr)
                self.wait = 0
        return self.scale


@dataclasses.dataclass
class EarlyStopping:
    """Stop after `patience` epochs without improvement of a maximized metric (0: never).

    Its fields go into every checkpoint, so a resumed run stops where the first would have.
    """

    patience: int
    best: float = float("-inf")
    best_step: int = -1
    wait: int = 0

    def update(self, value: float, step: int) -> bool:
        """Record an epoch's value; True when training should stop."""
        if value > self.best:
            self.best, self.best_step, self.wait = value, step, 0
        else:
            self.wait += 1
        return self.stopped

    @property
    def stopped(self) -> bool:
        return self.patience > 0 and self.wait >= self.patience
