"""Fold splits, train-set normalisation, label counts and ``limit``, shared by the loaders.

Folds. CV rotation ``k`` uses ``(test, val) = CV_FOLDS[k]`` = ``(10, 9), (9, 8), (8, 10)``;
train is every other fold of ``1..10``. ``fold_split`` (``{"train", "val", "test"}`` fold
lists, :mod:`detjax.cv`) replaces the rotation's folds (K-fold CV). A split holds the
records of its folds in the loader's record order.

Normalisation. One scalar mean and standard deviation over every value of the training
split, accumulated in float64::

    mu = sum(x_train) / n,   sigma = sqrt(sum((x_train - mu)^2) / n)   (population, ddof=0)
    x' = (x - float32(mu)) / float32(sigma)                          (float32 arithmetic)

applied to train, validation and test alike.

Limit. ``limit = N`` keeps the first ``N`` records of each split (in split order), cut AFTER
the split and AFTER the normalisation statistics were computed on the whole training split:
a limited run's arrays are bit for bit the first rows of the unlimited run's, with the same
``norm``. ``None`` keeps every record.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

__all__ = ["SPLITS", "N_FOLDS", "CV_FOLDS", "fold_roles", "split_indices", "train_statistics", "normalise",
           "label_counts", "positive_int", "check_limit", "first_records"]

SPLITS = ("train", "val", "test")
N_FOLDS = 10
#: ``(test_fold, val_fold)`` for the three CV rotations; rotation 0 is the official split.
CV_FOLDS: tuple[tuple[int, int], ...] = ((10, 9), (9, 8), (8, 10))
_STAT_CHUNK = 256  # records per float64 chunk; fixed so the sums do not depend on memory

T = TypeVar("T")


def fold_roles(cv_fold: int = 0, fold_split: Mapping[str, Sequence[int]] | None = None,
               n_folds: int = N_FOLDS) -> dict[str, tuple[int, ...]]:
    """``{"train", "val", "test"}`` fold numbers: rotation ``cv_fold`` (0, 1 or 2), or
    ``fold_split`` checked by :func:`detjax.cv.check_split` when given."""
    if isinstance(cv_fold, bool) or cv_fold not in range(len(CV_FOLDS)):
        raise ValueError(f"cv_fold must be 0, 1 or 2, got {cv_fold!r}")
    if fold_split is not None:
        from detjax.cv import check_split

        return check_split(fold_split, n_folds)
    test_fold, val_fold = CV_FOLDS[cv_fold]
    train = tuple(f for f in range(1, n_folds + 1) if f not in (test_fold, val_fold))
    return {"train": train, "val": (val_fold,), "test": (test_fold,)}


def split_indices(fold: np.ndarray, roles: Mapping[str, Sequence[int]], *,
                  train_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``{split: int64 record indices}`` in record order: records whose ``fold`` is one of the
    split's folds; ``train_mask`` further restricts train (e.g. to labelled records)."""
    out = {}
    for name in SPLITS:
        member = np.isin(fold, roles[name])
        if name == "train" and train_mask is not None:
            member &= train_mask
        out[name] = np.flatnonzero(member).astype(np.int64)
    return out


def train_statistics(x: np.ndarray, *, chunked_mean: bool = True) -> dict[str, float | int]:
    """``{"mean", "std", "count"}`` over every value of ``x`` (module docstring), float64.

    The squares are summed in fixed chunks of 256 records. The mean's sum is chunked too,
    or, with ``chunked_mean=False``, one ``np.sum(x, dtype=float64)`` over all values (PTB-XL's
    published statistics were computed so; the last bits differ, so each loader keeps its own).
    ``ValueError`` for an empty split or a non-finite or zero ``sigma``.
    """
    x = np.asarray(x)
    if x.size == 0:
        raise ValueError("cannot normalise: the training split is empty")
    count = int(x.size)
    if chunked_mean:
        total = 0.0
        for start in range(0, x.shape[0], _STAT_CHUNK):
            total += float(np.sum(x[start:start + _STAT_CHUNK], dtype=np.float64))
        mean = total / count
    else:
        mean = float(np.sum(x, dtype=np.float64) / count)
    squares = 0.0
    for start in range(0, x.shape[0], _STAT_CHUNK):
        centred = x[start:start + _STAT_CHUNK].astype(np.float64) - mean
        squares += float(np.sum(centred * centred))
    std = math.sqrt(squares / count)
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(f"cannot normalise: training mean {mean!r}, std {std!r}")
    return {"mean": mean, "std": std, "count": count}


def normalise(x: np.ndarray, stats: Mapping[str, float]) -> np.ndarray:
    """``(x - float32(mean)) / float32(std)`` in float32."""
    return ((x - np.float32(stats["mean"])) / np.float32(stats["std"])).astype(np.float32, copy=False)


def label_counts(y: np.ndarray, labels: Sequence[str]) -> dict[str, int]:
    """Records per label: column sums of multi-hot ``(n, L)`` targets, or occurrences of each
    index in class-index ``(n,)`` targets."""
    y = np.asarray(y)
    totals = y.sum(axis=0) if y.ndim == 2 else np.bincount(y.astype(np.int64), minlength=len(labels))
    return {label: int(round(float(n))) for label, n in zip(labels, totals)}


def positive_int(value: Any, name: str, what: str = "a positive integer") -> int:
    """``value`` as an ``int``; a ``ValueError`` naming ``name`` unless it is an integer ≥ 1
    (a bool is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_limit(limit: Any) -> int | None:
    """``limit`` as an ``int`` (``None`` stays ``None``); ``ValueError`` unless a positive integer."""
    return None if limit is None else positive_int(limit, "limit", "a positive number of records per split")


def first_records(items: Mapping[str, T], limit: int | None) -> dict[str, T]:
    """Every value (an array or sequence over one split's records) cut to its first ``limit``
    rows; all of them for ``None``. Call it after the statistics (module docstring)."""
    limit = check_limit(limit)
    return dict(items) if limit is None else {k: v[:limit] for k, v in items.items()}
