"""Find a trained model and the preprocessing it was trained with, for inference.

`--weights` / `--checkpoint` name either

* a training workdir (what `cxrjax train` writes): its `best_weights/` are the
  variables of the best checkpoint by validation mean AUC, exported when training
  finished; its `config.json` gives the image size and normalization, and
  `normalization.json` the measured statistics when the run used dataset normalization;
* a weights directory (`model_config.json` + `variables/`). Inside a workdir
  (`WORKDIR/best_weights`) it takes that run's settings; on its own (e.g. from
  `cxrjax import-weights`) it uses ImageNet normalization and the given image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ml_collections

from cxrjax.data.augment import AugmentConfig
from cxrjax.errors import InputError
from cxrjax.models.weights import CONFIG_FILE, VARIABLES_DIR, load_weights
from cxrjax.workdir import (
    BEST_WEIGHTS,
    CHECKPOINTS,
    MEMBER_PREFIX,
    RUN_CONFIG,
    augment_ranges,
    input_stats,
    is_run,
    read_run_config,
)

DEFAULT_IMAGE_SIZE = 224  # CheXNet's input size, for weights without a run


class InferenceError(InputError):
    """A model, image or dataset that inference cannot use as it is."""


@dataclass(frozen=True)
class TrainedModel:
    model_config: ml_collections.ConfigDict
    variables: dict  # numpy {'params', 'batch_stats'}
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: AugmentConfig  # the run's augmentation ranges, for test-time augmentation
    weights_dir: Path
    run_config: ml_collections.ConfigDict | None  # the run's config.json, when known
    workdir: Path | None

    def describe(self) -> str:
        norm = "dataset" if self.run_config and self.run_config.data.normalization == "dataset" else "imagenet"
        return f"{self.weights_dir} ({self.model_config.arch}, {self.image_size}px, {norm} normalization)"


def _is_weights_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / VARIABLES_DIR).is_dir()


def locate(path: str | Path) -> tuple[Path, Path | None]:
    """(weights dir, training workdir or None) for a weights dir or a training workdir."""
    path = Path(path).absolute()
    if not path.exists():
        raise InferenceError(f"{path}: weights not found (no such directory)")
    if _is_weights_dir(path):
        parent = path.parent
        in_run = path.name == BEST_WEIGHTS and is_run(parent)
        return path, parent if in_run else None
    if is_run(path):
        weights = path / BEST_WEIGHTS
        if not _is_weights_dir(weights):
            state = (
                "its checkpoints/ hold a run that has not finished; resume it with "
                "`cxrjax train` (the best checkpoint is exported when training ends)"
                if (path / CHECKPOINTS).is_dir()
                else "it has no checkpoints either"
            )
            raise InferenceError(f"{path}: training workdir without {BEST_WEIGHTS}/: {state}")
        return weights, path
    if any(path.glob(f"{MEMBER_PREFIX}*/{RUN_CONFIG}")):
        raise InferenceError(f"{path}: an ensemble workdir; name one {MEMBER_PREFIX}<i> folder")
    raise InferenceError(
        f"{path}: not a weights directory ({CONFIG_FILE} + {VARIABLES_DIR}/) nor a training "
        f"workdir ({RUN_CONFIG} + {BEST_WEIGHTS}/)"
    )


def load_trained(path: str | Path, image_size: int | None = None) -> TrainedModel:
    """The model at `path` with its preprocessing. `image_size` is for weights without a
    run (default 224); a run's own size is used otherwise, and a different one refused."""
    weights_dir, workdir = locate(path)
    run = read_run_config(workdir) if workdir is not None else None
    model_cfg, variables = load_weights(weights_dir)
    if run is not None:
        trained_at = int(run.data.image_size)
        if image_size not in (None, trained_at):
            raise InferenceError(
                f"{workdir}: the model was trained at {trained_at}px; inference at "
                f"{image_size}px would not preprocess as in training"
            )
        image_size = trained_at
    image_size = int(image_size or DEFAULT_IMAGE_SIZE)
    if image_size < 1:
        raise InferenceError(f"image size must be positive, got {image_size}")
    mean, std = input_stats(run, workdir, model_cfg.in_channels)
    augment = augment_ranges(run.data) if run is not None else AugmentConfig()
    return TrainedModel(model_cfg, variables, image_size, mean, std, augment, weights_dir, run, workdir)
