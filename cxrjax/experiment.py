"""A training run end to end: train (or resume), then score the best checkpoint on the
test part. `cxrjax train`, `cxrjax demo` and each ensemble member go through
`train_and_test`; it is the one place that joins training (`cxrjax.train`) and
evaluation (`cxrjax.eval`), which never import each other.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import jax

from cxrjax import lock
from cxrjax.data.pipeline import labels_table
from cxrjax.data.prepare import read_manifest
from cxrjax.eval.ensemble import ensemble_files
from cxrjax.eval.predictions import write_predictions
from cxrjax.train import config_check, resume
from cxrjax.train.distributed import maybe_initialize
from cxrjax.train.ensemble import member_configs
from cxrjax.train.loop import train
from cxrjax.workdir import (
    DONE,
    ENSEMBLE_PREDICTIONS,
    LOCK,
    PREDICTIONS,
    TEST_DIR,
    member_dir,
    read_done,
    run_info,
    write_done,
)

logger = logging.getLogger(__name__)


def train_and_test(config, workdir: str | Path) -> dict:
    """Train (or resume) in `workdir`, then evaluate the best checkpoint's test predictions
    into WORKDIR/test; returns the summary also written to done.json, which marks the run
    finished. A finished workdir returns its summary without training."""
    config_check.check(config)  # before the workdir is created
    maybe_initialize(config.distributed)  # before anything asks jax which process this is
    config = resume.absolute_paths(config)
    workdir = Path(workdir).absolute()
    # Process 0 holds the workdir for the run; the others of a cluster run share it.
    held = lock.hold(workdir, LOCK, "workdir") if jax.process_index() == 0 else contextlib.nullcontext()
    with held:
        return _train_and_test(config, workdir)


def _train_and_test(config, workdir: Path) -> dict:
    changed = resume.changes(config, workdir)  # before anything is written
    done = read_done(workdir)
    if done is not None:
        resume.finished(changed, workdir)
        if jax.process_index() == 0:
            logger.info(f"{workdir / DONE} exists: already trained (delete it to run the final evaluation again)")
        return done
    summary = train(config, workdir)
    if "stopped" in summary:
        return summary
    predictions = summary.pop("predictions", None)
    if jax.process_index() == 0:
        if predictions is not None:
            summary["test_mean_auc"] = _evaluate_test(config, workdir, **predictions)
        write_done(workdir, summary)
    return summary


def _evaluate_test(config, workdir: Path, test, val) -> float | None:
    """Write the test predictions and their evaluation (thresholds chosen on val)."""
    # Imported here: evaluation brings scikit-learn, scipy and matplotlib (seconds), which
    # a run stopped before its test pass never needs.
    from cxrjax.eval.evaluate import evaluate_predictions

    (ids, probs, labels), (val_ids, val_probs, val_labels) = test, val
    out = workdir / TEST_DIR
    out.mkdir(exist_ok=True)
    write_predictions(out / PREDICTIONS, ids, probs)
    metrics = evaluate_predictions(
        ids,
        probs,
        labels_table(ids, labels, Path(config.data.prepared) / "test"),
        out_dir=out,
        val=(val_ids, val_probs, labels_table(val_ids, val_labels, Path(config.data.prepared) / "val")),
        n_bootstrap=config.eval.bootstrap,
        seed=config.seed,
        run=run_info(config, read_manifest(Path(config.data.prepared)), workdir),
    )
    return metrics["mean_auc"]


def train_members(config, workdir: str | Path) -> dict:
    """`train_and_test` once, or per member of an ensemble (`config.ensemble`) with the
    members' test predictions averaged."""
    workdir = Path(workdir)
    config_check.check(config)
    if config.ensemble.members <= 1:
        return train_and_test(config, workdir)
    members = member_configs(config)
    for member in members:  # every member's, before the first trains
        config_check.check(member)
    summaries = []
    for i, member in enumerate(members):
        summaries.append(train_and_test(member, member_dir(workdir, i)))
        if "stopped" in summaries[-1]:  # a signal: the rerun resumes this member, then the rest
            return {"members": summaries, "stopped": summaries[-1]["stopped"]}
    preds = [member_dir(workdir, i) / TEST_DIR / PREDICTIONS for i in range(len(summaries))]
    if all(p.exists() for p in preds):
        ensemble_files(preds, workdir / ENSEMBLE_PREDICTIONS)
    return {"members": summaries, "ensemble_predictions": str(workdir / ENSEMBLE_PREDICTIONS)}
