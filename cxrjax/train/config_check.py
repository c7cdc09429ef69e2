"""A training config checked before anything is created: every value a run cannot train
with (an unknown choice, a count below one, a learning rate below zero, a fraction out
of [0, 1]) is named in one error, instead of a traceback from deep inside the run or a
run that trains on silently wrong."""

from __future__ import annotations

from cxrjax.config import FIELDS_ARE_LISTED
from cxrjax.errors import InputError
from cxrjax.findings import FINDINGS


class ConfigError(InputError):
    """A config value no run can train with."""


def _choices() -> dict[str, tuple]:
    # Each list lives beside the code that takes the choice.
    from cxrjax.models.classifier import DTYPES, HEADS
    from cxrjax.models.densenet import ARCHS, REMAT_MODES
    from cxrjax.train.losses import LOSSES
    from cxrjax.train.optim import OPTIMIZERS, SCHEDULES

    return {
        "data.normalization": ("imagenet", "dataset"),
        "loss.name": LOSSES,
        "optim.name": OPTIMIZERS,
        "optim.schedule": SCHEDULES,
        "model.arch": tuple(ARCHS),
        "model.head": HEADS,
        "model.dtype": tuple(DTYPES),
        "model.remat": (*REMAT_MODES, True, False),  # bools: configs from before the modes
        "model.in_channels": (1, 3),
        "wandb.mode": ("offline", "online", "disabled"),
    }


# field: (lowest allowed, what it means)
_AT_LEAST = {
    "epochs": 1,
    "global_batch_size": 1,
    "log_every_steps": 1,
    "max_steps_per_epoch": 0,
    "early_stopping_patience": 0,
    "data.image_size": 1,
    "data.workers": 0,
    "data.oversample_factor": 1,
    "optim.grad_accum_steps": 1,
    "optim.plateau_patience": 0,
    "checkpoint.keep": 1,
    "checkpoint.every_steps": 0,
    "eval.batch_size": 0,
    "eval.bootstrap": 0,
    "ensemble.members": 1,
    "optim.min_lr": 0.0,
    "optim.weight_decay": 0.0,
    "optim.momentum": 0.0,
    "optim.warmup_epochs": 0.0,
    "loss.l2": 0.0,
    "loss.focal_gamma": 0.0,
    "data.rotation_deg": 0.0,
    "data.shift": 0.0,
    "data.zoom": 0.0,
    "data.shear_deg": 0.0,
}
_ABOVE_ZERO = ("optim.learning_rate", "optim.eps", "optim.decay_rate", "optim.plateau_factor")
_FRACTIONS = (
    "data.keep_no_finding",
    "data.oversample_rare_below",
    "loss.smooth",
    "loss.focal_alpha",
    "model.dropout",
    "optim.b1",
    "optim.b2",
    "optim.plateau_factor",
)


def _get(config, field: str):
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def check(config) -> None:
    """Raise ConfigError naming every bad field (`--config.FIELD=VALUE` to fix)."""
    problems = []
    for field, allowed in _choices().items():
        value = _get(config, field)
        if value not in allowed or (isinstance(value, bool) and field != "model.remat"):
            shown = ", ".join(str(a) for a in allowed if not isinstance(a, bool))
            problems.append(f"{field}={value!r} is not one of {shown}")
    for field, low in _AT_LEAST.items():
        if _get(config, field) < low:
            problems.append(f"{field}={_get(config, field)!r} is below {low}")
    for field in _ABOVE_ZERO:
        if not _get(config, field) > 0:
            problems.append(f"{field}={_get(config, field)!r} must be above 0")
    for field in _FRACTIONS:
        if not 0 <= _get(config, field) <= 1:
            problems.append(f"{field}={_get(config, field)!r} is not in [0, 1]")
    if config.model.num_classes != len(FINDINGS):
        problems.append(
            f"model.num_classes={config.model.num_classes!r}: the model predicts the {len(FINDINGS)} findings"
        )
    if not config.data.prepared:
        problems.append("data.prepared is empty: give --config.data.prepared=FOLDER (the output of `cxrjax prepare`)")
    if problems:
        raise ConfigError(f"config: {'; '.join(problems)} ({FIELDS_ARE_LISTED})")
