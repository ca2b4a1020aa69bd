"""Evaluation metrics (built on scikit-learn).

Macro ROC-AUC follows the protocol of docs/method.md §8: the mean of per-class ROC-AUCs over
the classes that have both positives and negatives in ``y_true``; the others are reported
as ``None`` and left out of the mean.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

__all__ = ["per_class_auc", "macro_auc", "multilabel_auc_report"]


def per_class_auc(y_true: np.ndarray, scores: np.ndarray) -> list[float | None]:
    """ROC-AUC of each column; ``None`` where the column lacks positives or negatives."""
    y_true, scores = np.asarray(y_true), np.asarray(scores)
    if y_true.shape != scores.shape or y_true.ndim != 2:
        raise ValueError(f"y_true {y_true.shape} and scores {scores.shape} must be equal (N, C) shapes")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or inf; the model diverged")
    out: list[float | None] = []
    for c in range(y_true.shape[1]):
        positives = int(y_true[:, c].sum())
        if 0 < positives < y_true.shape[0]:
            out.append(float(roc_auc_score(y_true[:, c], scores[:, c])))
        else:
            out.append(None)
    return out


def macro_auc(per_class: list[float | None]) -> float:
    """Mean of the defined per-class AUCs (NaN when none is defined)."""
    defined = [a for a in per_class if a is not None]
    return float(np.mean(defined)) if defined else float("nan")


def multilabel_auc_report(y_true: np.ndarray, scores: np.ndarray, labels) -> dict:
    """``{"score", "macro_auc", "per_class_auc": {label: auc|None}}`` for a multi-label task."""
    per = per_class_auc(y_true, scores)
    macro = macro_auc(per)
    return {"score": macro, "macro_auc": macro,
            "per_class_auc": {str(name): auc for name, auc in zip(labels, per)}}
