"""What `cxrjax evaluate` does with the files it is given: read a predictions CSV with its
labels, or predict a prepared part with a trained model, then `evaluate_predictions`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from cxrjax.errors import InputError

logger = logging.getLogger(__name__)


def evaluate_files(
    out: Path,
    *,
    predictions: Path | None = None,
    checkpoint: Path | None = None,
    labels: Sequence[Path] = (),
    data: Path | None = None,
    part: str = "test",
    tta: int = 1,
    batch_size: int = 32,
    val_predictions: Path | None = None,
    val_labels: Path | None = None,
    compare: Path | None = None,
    run_info: Path | dict | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    target_sensitivity: float = 0.9,
) -> dict:
    """Evaluate `predictions` (a CSV) or `checkpoint` (a training workdir or weights
    directory, predicting the prepared `part` of `data`) into `out`; returns the metrics.

    `labels`: at most one NIH label file and one radiologist-adjudicated file (told apart by
    their columns); with a checkpoint the part's own labels are the default. The adjudicated
    file alone scores a predictions CSV on the images it covers, with its NIH labels.
    """
    from cxrjax.eval.adjudicated import is_adjudicated, overlap, read_adjudicated
    from cxrjax.eval.evaluate import evaluate_predictions
    from cxrjax.eval.labels import read_labels
    from cxrjax.eval.predictions import read_predictions

    if (predictions is None) == (checkpoint is None):
        raise ValueError("evaluate_files: give predictions or checkpoint, one of them")
    adjudicated_files = [f for f in labels if is_adjudicated(f)]
    label_files = [f for f in labels if f not in adjudicated_files]
    if len(adjudicated_files) > 1 or len(label_files) > 1:
        raise InputError(
            "--labels: at most one NIH label file and one adjudicated file "
            f"(adjudicated: {', '.join(map(str, adjudicated_files)) or 'none'}; "
            f"other: {', '.join(map(str, label_files)) or 'none'})"
        )
    adjudicated = read_adjudicated(adjudicated_files[0]) if adjudicated_files else None
    label_file = label_files[0] if label_files else None
    val = None
    if checkpoint is not None:
        from cxrjax.eval.inference import predict_for_evaluation

        r = predict_for_evaluation(
            checkpoint,
            data,
            part,
            labels=label_file,
            val_predictions=val_predictions,
            val_labels=val_labels,
            tta=tta,
            batch_size=batch_size,
        )
        image_ids, probs, table, sources, val = r["ids"], r["probs"], r["labels"], r["sources"], r["val"]
        run_info = run_info or r["run"]
    else:
        if label_file is None and adjudicated is None:
            raise InputError("--labels is required with --predictions")
        preds = read_predictions(predictions)
        image_ids, probs = preds.image_ids, preds.probs
        if label_file is None:  # only the adjudicated file: its images, its NIH labels
            covered = overlap(image_ids, adjudicated, str(predictions))
            logger.info(
                f"scoring the {int(covered.sum())} of {len(covered)} predicted images that {adjudicated.source} labels"
            )
            image_ids, probs = image_ids[covered], probs[covered]
            table, label_file = adjudicated.text_mined(), adjudicated.source
        else:
            table = read_labels(label_file)
        sources = {"predictions": str(predictions), "labels": str(label_file)}
        if len(image_ids) < len(preds.image_ids):
            sources["scored"] = (
                f"only the {len(image_ids)} of {len(preds.image_ids)} predicted images the adjudicated file labels"
            )
        if val_predictions:
            v = read_predictions(val_predictions)
            val = (v.image_ids, v.probs, read_labels(val_labels) if val_labels else table)
            sources["val_predictions"] = str(val_predictions)
            sources["val_labels"] = str(val_labels or label_file)
    if compare:
        c = read_predictions(compare)
        compare = (c.image_ids, c.probs, str(compare))
    return evaluate_predictions(
        image_ids,
        probs,
        table,
        None,
        out,
        val,
        n_bootstrap=n_bootstrap,
        seed=seed,
        target_sensitivity=target_sensitivity,
        compare=compare,
        run=run_info,
        sources=sources,
        adjudicated=adjudicated,
    )
