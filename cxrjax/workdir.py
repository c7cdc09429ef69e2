"""The training folder contract: what `cxrjax train` writes into its workdir, and how
training (on resume) and inference (later) read it back. Nothing else spells these names.
Importing it is cheap: its heavy imports wait for the functions that need them.

    WORKDIR/config.json         the run's full config (image size, normalization, augmentation), as first trained
    WORKDIR/config_history.jsonl  what each resume changed of the fields that may change (cxrjax.train.resume)
    WORKDIR/.lock               held (fcntl) by the run using the workdir (cxrjax.lock)
    WORKDIR/normalization.json  the measured mean/std, when the run used dataset normalization
    WORKDIR/checkpoints/        orbax checkpoints; the best by val mean AUC is exported to
    WORKDIR/best_weights/       the weights artifact (`cxrjax.models.weights`) of the best step
    WORKDIR/metrics.jsonl       training and validation metrics, one JSON line each
    WORKDIR/test/               the final test evaluation, laid out as every evaluation folder
                                (`cxrjax evaluate --out`): predictions.csv, metrics.json, report.md,
                                run.json (the run described for the leaderboard) and figures
    WORKDIR/done.json           the run's summary, written last: the run is finished
    WORKDIR/member_<i>/         one such folder per member of an ensemble run, and
    WORKDIR/ensemble_predictions.csv  their test predictions averaged
    WORKDIR/wandb_run_id        the wandb run the workdir logs to, so a resumed run continues it
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from cxrjax.errors import InputError
from cxrjax.jsonfile import read_json

if TYPE_CHECKING:
    import ml_collections

    from cxrjax.data.augment import AugmentConfig

RUN_CONFIG = "config.json"
CONFIG_HISTORY = "config_history.jsonl"
LOCK = ".lock"
NORMALIZATION = "normalization.json"
CHECKPOINTS = "checkpoints"
BEST_WEIGHTS = "best_weights"
METRICS_LOG = "metrics.jsonl"
TEST_DIR = "test"
# An evaluation folder's files (WORKDIR/test/ or `cxrjax evaluate --out`).
PREDICTIONS = "predictions.csv"
METRICS = "metrics.json"
REPORT = "report.md"
RUN_INFO = "run.json"
DONE = "done.json"
MEMBER_PREFIX = "member_"
ENSEMBLE_PREDICTIONS = "ensemble_predictions.csv"
WANDB_RUN_ID = "wandb_run_id"


class WorkdirError(InputError):
    """A training folder file that cannot be read as training wrote it."""


def member_dir(workdir: Path, index: int) -> Path:
    return Path(workdir) / f"{MEMBER_PREFIX}{index}"


def is_run(path: Path) -> bool:
    """Whether `path` is a training workdir (it holds the run's config)."""
    return (Path(path) / RUN_CONFIG).is_file()


def _read_json(path: Path) -> dict:
    return read_json(path, WorkdirError)


def write_run_config(workdir: Path, config) -> None:
    (workdir / RUN_CONFIG).write_text(json.dumps(json.loads(config.to_json_best_effort()), indent=1))


def read_run_config(workdir: Path) -> ml_collections.ConfigDict:
    import ml_collections

    return ml_collections.ConfigDict(_read_json(Path(workdir) / RUN_CONFIG))


def saved_statistics(workdir: Path) -> dict | None:
    """The dataset mean/std measured on the run's training part, or None before it is measured."""
    path = Path(workdir) / NORMALIZATION
    return _read_json(path) if path.is_file() else None


def save_statistics(workdir: Path, mean, std) -> None:
    stats = {"mean": mean, "std": std, "measured_on": "train"}
    (Path(workdir) / NORMALIZATION).write_text(json.dumps(stats))


def input_stats(run: ml_collections.ConfigDict | None, workdir: Path | None, channels: int):
    """Per-channel (mean, std) the run's model takes its inputs with; ImageNet's
    without a run (e.g. imported weights)."""
    from cxrjax.data.normalize import stats_for

    kind = run.data.normalization if run is not None else "imagenet"
    if kind != "dataset":
        return stats_for(kind, channels)
    stats = saved_statistics(workdir)
    if stats is None:
        raise WorkdirError(
            f"{Path(workdir) / NORMALIZATION} not found: the run used dataset normalization, whose "
            "statistics were measured on its training part and are needed to preprocess alike"
        )
    return stats_for("dataset", channels, stats["mean"], stats["std"])


def augment_ranges(data: ml_collections.ConfigDict) -> AugmentConfig:
    """The run's augmentation ranges (`config.data`), whether or not it trained with them."""
    from cxrjax.data.augment import AugmentConfig

    return AugmentConfig(data.rotation_deg, data.shift, data.zoom, data.shear_deg, data.horizontal_flip)


def read_done(workdir: Path) -> dict | None:
    """A finished run's summary, or None while it is not finished."""
    path = Path(workdir) / DONE
    return _read_json(path) if path.exists() else None


def write_done(workdir: Path, summary: dict) -> None:
    (Path(workdir) / DONE).write_text(json.dumps(summary, indent=1))


def _split_test_images(manifest: dict, prepared: Path | None) -> int | None:
    """Images the split put in its test part before any was skipped (missing or unreadable),
    i.e. its full test list; None when the skipped list cannot be read."""
    test = manifest.get("parts", {}).get("test", {}).get("images")
    skipped = manifest.get("skipped", {"count": 0, "images": []})
    listed = skipped.get("images", [])
    if test is None:
        return None
    if not skipped.get("count"):
        return int(test)
    if isinstance(listed, list):
        return int(test) + sum(1 for s in listed if s.get("part") == "test")
    path = Path(prepared) / "skipped.csv" if prepared else None
    if path is None or not path.is_file():
        return None
    import pandas as pd

    return int(test) + int((pd.read_csv(path)["part"] == "test").sum())


def run_info(config, manifest: dict, workdir: Path, evaluation: str = "test", prepared: Path | None = None) -> dict:
    """How the leaderboard describes the run (`run.json` of its test evaluation).
    `evaluation` tells two evaluations of one run apart (e.g. "test, tta 4")."""
    if manifest.get("synthetic"):  # never ranked against published NIH results
        family = "synthetic"
    else:
        family = "official" if manifest["split"] == "official" else "random"
    backbone = config.model.arch + (" + CBAM" if config.model.cbam else "")
    return {
        "name": Path(workdir).name,
        "split_family": family,
        "split": manifest["split"],
        "px": config.data.image_size,
        "backbone": backbone,
        "evaluation": evaluation,
        "test_images_full": _split_test_images(manifest, prepared or config.data.get("prepared")),
        "smoke": config.model.arch == "tiny",  # a pipeline check, never ranked
    }
