"""The training config in one place: the schema (every field and its default), the recipe
variants, and loading a recipe with `--config.FIELD=VALUE` overrides.

A recipe is a Python file in configs/ (shipped as `cxrjax.configs`) whose
`get_config(variant)` starts from `base_config()`, sets what the recipe is about, and
returns `with_variant(c, variant)`. `load_config` finds a recipe by name or path and
applies the overrides of the command line; `apply_overrides` applies the same overrides
to a config already loaded (an ensemble member's, `cxrjax.train.ensemble`). ml_collections
parses each value as its field's type, so every field can be overridden and a field that
does not exist is an error, named with the closest one.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import ml_collections

from cxrjax.errors import InputError

FIELDS_ARE_LISTED = "every field and its default: cxrjax/config.py, described in docs/training.md"
OVERRIDES_HELP = (
    "override any config field with --config.FIELD=VALUE, e.g. --config.epochs=5 "
    f"--config.optim.learning_rate=3e-4; {FIELDS_ARE_LISTED}"
)
RECIPES = "cxrjax.configs"  # configs/ in the checkout (pyproject maps it)


def base_config() -> ml_collections.ConfigDict:
    """Every training field with its default; each recipe starts from this."""
    from cxrjax.models import default_model_config  # here: importing the schema's names needs no flax

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.epochs = 10
    c.global_batch_size = 32  # over all devices of all processes
    c.log_every_steps = 50
    c.max_steps_per_epoch = 0  # 0: one pass over the training part

    c.data = ml_collections.ConfigDict()
    c.data.prepared = ""  # output folder of `cxrjax prepare`
    c.data.image_size = 224
    c.data.workers = 0  # grain decode processes per host (0: in the main process)
    c.data.normalization = "imagenet"  # imagenet | dataset (measured on the training part)
    c.data.augment = True
    c.data.rotation_deg = 10.0
    c.data.shift = 0.05
    c.data.zoom = 0.1
    c.data.shear_deg = 5.0
    c.data.horizontal_flip = False
    c.data.keep_no_finding = 1.0
    c.data.oversample_rare_below = 0.0
    c.data.oversample_factor = 1

    c.model = default_model_config()

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "bce"  # bce | weighted_bce | balanced_bce | dynamic_bce | focal
    c.loss.smooth = 0.1
    c.loss.focal_gamma = 2.0
    c.loss.focal_alpha = 0.25
    c.loss.l2 = 0.0  # on the head's dense kernels

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adam"  # adam | adamw | sgd
    c.optim.learning_rate = 1e-3
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-7  # Keras's Adam epsilon
    c.optim.weight_decay = 1e-4
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.grad_accum_steps = 1
    c.optim.schedule = "plateau"  # constant | exponential | cosine | plateau
    c.optim.decay_rate = 0.95  # exponential, per epoch
    c.optim.warmup_epochs = 1.0  # cosine
    c.optim.plateau_factor = 0.5
    c.optim.plateau_patience = 3
    c.optim.min_lr = 1e-6

    c.early_stopping_patience = 10  # epochs without a better val mean AUC; 0: never stop

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = 3
    c.checkpoint.every_steps = 0  # 0: at the end of each epoch only

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 0  # global; 0: same as training
    c.eval.bootstrap = 1000
    c.eval.test = True  # evaluate the best weights on the test part at the end

    c.wandb = ml_collections.ConfigDict()
    c.wandb.mode = "offline"  # offline | online | disabled
    c.wandb.project = "cxrjax"
    c.wandb.entity = ""

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator = ""  # host:port of process 0
    c.distributed.num_processes = 0
    c.distributed.process_id = -1

    c.ensemble = ml_collections.ConfigDict()
    c.ensemble.members = 1  # >1: train members with seeds seed, seed+1, ...
    # Per member, ';'-separated, each written as on the command line:
    # "--config.optim.learning_rate=1e-3;--config.optim.learning_rate=3e-4 --config.data.zoom=0.2"
    c.ensemble.overrides = ""
    return c


# --------------------------------------------------------------------------- variants

VARIANTS = ("", "smoke")


def smoke(c: ml_collections.ConfigDict, image_size: int = 32) -> ml_collections.ConfigDict:
    """A recipe shrunk to seconds on a CPU: tiny DenseNet, a few steps, no wandb."""
    c.model.arch = "tiny"
    c.data.image_size = image_size
    c.data.workers = 0
    c.global_batch_size = 8
    c.epochs = 2
    c.max_steps_per_epoch = 4
    c.log_every_steps = 2
    c.checkpoint.every_steps = 0
    c.eval.bootstrap = 20
    c.wandb.mode = "disabled"
    return c


def with_variant(c: ml_collections.ConfigDict, variant: str, smoke_fields: dict | None = None):
    """The recipe `c` as `variant` (the part after `:` in `--config FILE.py:variant`) asks:
    '' as it is, 'smoke' shrunk by `smoke` and then given the recipe's own `smoke_fields`
    ({"checkpoint.every_steps": 2}); any other variant is an error naming the ones there are."""
    if variant == "smoke":
        smoke(c)
        for field, value in (smoke_fields or {}).items():
            *parents, leaf = field.split(".")
            node = c
            for name in parents:
                node = node[name]
            node[leaf]  # a KeyError for a field the schema does not have: a typo in the recipe
            node[leaf] = value
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; use {' or '.join(repr(v) for v in VARIANTS)}")
    return c


# --------------------------------------------------------------------------- loading


class OverrideError(InputError):
    """A `--config.FIELD=VALUE` override the config cannot take: no such field, no '=',
    or a value its field's type refuses."""


def recipe_names() -> list[str]:
    return sorted(
        p.name[:-3] for p in resources.files(RECIPES).iterdir() if p.name.endswith(".py") and not p.name.startswith("_")
    )


def resolve(spec: str) -> str:
    """`NAME[:variant]` of a shipped recipe, or `path.py[:variant]`, as a file path with
    the variant kept, for ml_collections' config_flags."""
    path, colon, variant = spec.partition(":")
    if path.endswith(".py") or Path(path).exists():
        return spec
    recipe = resources.files(RECIPES) / f"{path}.py"
    if not recipe.is_file():
        raise ValueError(f"--config {spec}: no recipe {path!r} (shipped: {', '.join(recipe_names())}) and no such file")
    return str(recipe) + colon + variant


def load_config(path: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """A recipe name or a config file (optionally `:variant`) with `--config.a.b=value`
    overrides, parsed by ml_collections so every field is typed and checked. A mistake is
    a SystemExit with one line."""
    from ml_collections import config_flags

    try:
        path = resolve(path)
        return _parse(
            lambda values, argv: config_flags.DEFINE_config_file("config", path, None, values, sys_argv=argv), overrides
        )
    except (ValueError, OverrideError) as e:
        raise SystemExit(f"cxrjax: {e}") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """A copy of `config` with `--config.a.b=value` overrides applied, parsed exactly as
    `load_config` parses the command line's; a mistake is an `OverrideError`."""
    from ml_collections import config_flags

    config = config.copy_and_resolve_references()  # config_flags sets the fields of the dict it is given
    return _parse(
        lambda values, argv: config_flags.DEFINE_config_dict("config", config, None, values, sys_argv=argv), overrides
    )


def _parse(define, overrides: list[str]) -> ml_collections.ConfigDict:
    """The config that `define(flag_values, argv)` declares as the flag `config`, with
    `overrides` parsed from argv by absl."""
    from absl import flags

    for given, after in zip(overrides, [*overrides[1:], None]):
        if given.startswith("--config.") and "=" not in given and after and not after.startswith("-"):
            raise OverrideError(
                f"{given} {after}: write {given}={after} (an override takes its value after '=', not a space)"
            )
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise OverrideError(f"unrecognized arguments: {' '.join(bad)} ({OVERRIDES_HELP})")

    def parse(given: list[str]):
        argv = ["cxrjax", *given]
        values = flags.FlagValues()
        # sys_argv: the overrides are read from here, not from the process's own sys.argv.
        define(values, argv)
        values(argv)
        return values.config

    try:
        return parse(overrides)
    except flags.Error as e:
        raise OverrideError(str(e)) from None
    except (AttributeError, KeyError):  # ml_collections: a field the config does not have
        raise OverrideError(_unknown_fields(overrides, parse([]))) from None


def _unknown_fields(overrides: list[str], config) -> str:
    """Which overrides name no field of `config`, each with the closest field."""
    import difflib

    def flat(node, prefix=""):
        for key, value in node.items():
            if hasattr(value, "items"):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    fields = list(flat(config))
    unknown = []
    for given in overrides:
        name = given.removeprefix("--config.").split("=")[0]
        if name not in fields and name.removeprefix("no") not in fields:  # absl's --config.noFLAG
            close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
            unknown.append(f"{given}: no field {name!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    return "; ".join(unknown or ["an override names no field of the config"]) + f" ({OVERRIDES_HELP})"
