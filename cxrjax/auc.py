"""ROC AUC that is undefined (None), never a number, when a finding has only one class.

A leaf shared by training (the validation AUC that picks the best checkpoint) and
evaluation (the test metrics), so both score with the same function.
"""

from __future__ import annotations

import numpy as np


def defined(y: np.ndarray) -> bool:
    """AUC, Youden's J and sensitivity/specificity pairs need both classes present."""
    return 0 < int(np.sum(y)) < len(y)


def roc_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    # Imported here: scikit-learn (with scipy) takes seconds to import, and a trainer
    # stopped before its first validation never needs it.
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if defined(y) else None
