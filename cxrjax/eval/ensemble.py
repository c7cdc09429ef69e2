"""Average several runs' probabilities per image (a plain mean-of-probabilities ensemble)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cxrjax.eval.predictions import Predictions, PredictionsError, read_predictions, write_predictions


def average_predictions(members: list[Predictions]) -> Predictions:
    """Mean probabilities, aligned by image id (in the first member's order); every member
    must cover exactly the same images."""
    if len(members) < 2:
        raise PredictionsError(f"an ensemble needs at least 2 prediction files, got {len(members)}")
    first = pd.Index(members[0].image_ids)
    total = members[0].probs.copy()
    for m in members[1:]:
        ids = pd.Index(m.image_ids)
        missing, extra = first.difference(ids), ids.difference(first)
        if len(missing) or len(extra):
            raise PredictionsError(
                f"{m.source}: image set differs from {members[0].source}: "
                f"{len(missing)} missing (e.g. {list(missing[:3])}), "
                f"{len(extra)} extra (e.g. {list(extra[:3])})"
            )
        total += m.probs[ids.get_indexer(first)]
    sources = ", ".join(m.source for m in members)
    return Predictions(members[0].image_ids, total / len(members), f"mean of {sources}")


def ensemble_files(paths: list[str | Path], out: str | Path) -> Path:
    averaged = average_predictions([read_predictions(p) for p in paths])
    return write_predictions(out, averaged.image_ids, averaged.probs)
