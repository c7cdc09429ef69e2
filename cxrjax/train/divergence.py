"""What counts as a diverged run: a checkpoint is written only after its step checks out."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxrjax.workdir import CHECKPOINTS


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def check_finite(values: dict, step: int, workdir: Path) -> None:
    """A checkpoint is written only after this passes for its step: the step's loss and
    gradient norm (before its update) and every parameter and BatchNorm statistic after it."""
    bad = [f"{k} = {values[k]}" for k in ("loss", "grad_norm") if not np.isfinite(values[k])]
    if values["nonfinite_state"]:
        bad.append(f"{int(values['nonfinite_state'])} non-finite parameters or BatchNorm statistics")
    if bad:
        raise TrainingDiverged(f"training diverged at step {step}: {', '.join(bad)}. {kept(workdir)}")


def kept(workdir: Path) -> str:
    return f"The last good checkpoint in {workdir / CHECKPOINTS} is kept (nothing after the divergence was saved)."
