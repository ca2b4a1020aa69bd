"""K-fold cross-validation over a dataset's own folds, and the ``cv.json`` summary.

PTB-XL (``strat_fold``) and CinC 2017 (the vendored class-stratified ``folds.csv``) both
come in ten folds numbered 1..10. ``--cv K`` groups them into K contiguous blocks,

.. math:: \\mathrm{block}(f) = \\lfloor (f - 1)\\,K / 10 \\rfloor, \\qquad f = 1..10,

so K = 10 is one fold per block, K = 5 is ``{1,2}, {3,4}, ...`` and K = 3 is
``{1..4}, {5..7}, {8..10}``. Split ``b`` (0-based) tests on block ``b``, validates on the
highest fold of the previous block (cyclically; split K-1 of K = 10 is the official
test 10 / val 9) and trains on every other fold. Within a split the three roles are
disjoint sets of folds, and folds partition the records, so no record is in two roles;
over the K splits every record is tested exactly once, which is what makes the pooled
out-of-fold predictions a prediction for every record.

Each split is a normal run (its own directory, manifest and hashes), configured through the
task data option ``fold_split = {"train": [...], "val": [...], "test": [...]}``.
``cv.json`` (:func:`summarise`) holds the per-split metrics, the mean and sample sd of
the headline metric, and the headline metric of the pooled out-of-fold test predictions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["N_FOLDS", "ROLES", "fold_blocks", "cv_splits", "check_split", "split_config", "summarise", "run_cv",
           "PREDICTIONS_FILE"]

N_FOLDS = 10
ROLES = ("train", "val", "test")
#: Per-split test predictions written next to result.json by the CV drivers.
PREDICTIONS_FILE = "test_predictions.npz"


def fold_blocks(k: int, n_folds: int = N_FOLDS) -> list[tuple[int, ...]]:
    """The K contiguous blocks of folds ``1..n_folds``: ``block(f) = floor((f-1) K / n_folds)``."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= k <= n_folds:
        raise ValueError(f"--cv K needs 2 <= K <= {n_folds} (the datasets have {n_folds} folds), got {k!r}")
    blocks: list[list[int]] = [[] for _ in range(k)]
    for f in range(1, n_folds + 1):
        blocks[(f - 1) * k // n_folds].append(f)
    return [tuple(b) for b in blocks]


def cv_splits(k: int, n_folds: int = N_FOLDS) -> list[dict[str, tuple[int, ...]]]:
    """The K splits: test = block b, val = the highest fold of block b-1 (cyclic), train = the rest.

    Needs at least 3 folds left outside the test block (so K >= 2 always qualifies with 10 folds).
    """
    blocks = fold_blocks(k, n_folds)
    out = []
    for b, test in enumerate(blocks):
        val = (max(blocks[(b - 1) % k]),)
        train = tuple(f for f in range(1, n_folds + 1) if f not in test and f not in val)
        out.append(check_split({"train": train, "val": val, "test": test}, n_folds))
    return out


def check_split(split: Mapping[str, Sequence[int]], n_folds: int = N_FOLDS) -> dict[str, tuple[int, ...]]:
    """``split`` as ``{"train", "val", "test"}`` tuples of fold numbers, checked: exactly those
    keys, each non-empty, folds in ``1..n_folds`` and no fold in two roles (``ValueError``)."""
    if not isinstance(split, Mapping) or set(split) != set(ROLES):
        raise ValueError(f"fold_split must map exactly {list(ROLES)} to fold lists, got {split!r}")
    out: dict[str, tuple[int, ...]] = {}
    for role in ROLES:
        folds = split[role]
        if isinstance(folds, (int, np.integer)):
            folds = (folds,)
        try:
            folds = tuple(int(f) for f in folds)
        except (TypeError, ValueError):
            raise ValueError(f"fold_split[{role!r}] must be a list of fold numbers, got {split[role]!r}") from None
        if not folds or any(not 1 <= f <= n_folds for f in folds) or len(set(folds)) != len(folds):
            raise ValueError(f"fold_split[{role!r}] must be distinct folds in 1..{n_folds}, got {list(folds)}")
        out[role] = folds
    for a in range(3):
        for b in range(a + 1, 3):
            common = set(out[ROLES[a]]) & set(out[ROLES[b]])
            if common:
                raise ValueError(f"fold_split: fold(s) {sorted(common)} are both {ROLES[a]} and {ROLES[b]}")
    return out


def _stats(values: Sequence[float]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    mean = float(np.mean(vals))
    sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return mean, sd


def summarise(folds: Sequence[Mapping[str, Any]], *, headline: str, pooled: Mapping[str, Any] | None,
              extra_metrics: Sequence[str] = (), meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``cv.json`` object.

    ``folds``: per split ``{"split", "folds", "run_dir", <metrics>}``. ``mean``/``sd`` (sample
    sd, ddof 1) of ``headline`` and each of ``extra_metrics`` over the splits; ``pooled``: the
    task evaluator's metrics on the concatenated out-of-fold test predictions.
    """
    mean, sd = _stats([f.get(headline) for f in folds])
    out: dict[str, Any] = {**dict(meta or {}), "k": len(folds), "headline": headline, "folds": list(folds),
                           "mean": mean, "sd": sd}
    for m in extra_metrics:
        m_mean, m_sd = _stats([f.get(m) for f in folds])
        out[f"{m}_mean"], out[f"{m}_sd"] = m_mean, m_sd
    out["pooled"] = dict(pooled) if pooled is not None else None
    out[f"pooled_{headline}"] = None if pooled is None else pooled.get(headline)
    return out


def split_config(config, fold_split: Mapping[str, Sequence[int]]):
    """``config`` with ``data["fold_split"]`` set (and the 3-rotation ``cv_fold`` dropped)."""
    import dataclasses

    data = {k: v for k, v in dict(config.data).items() if k != "cv_fold"}
    data["fold_split"] = {role: list(folds) for role, folds in check_split(fold_split).items()}
    return dataclasses.replace(config, data=data)


def _fold_entry(b: int, fold_split, run_dir, result: Mapping[str, Any], metrics: Sequence[str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"split": b, "folds": {k: list(v) for k, v in fold_split.items()},
                             "run_dir": str(run_dir)}
    for m in ("test_score", *metrics, "per_class_auc", "best_epoch", "best_val_score", "config_hash",
              "final_sha256"):
        if m in result:
            entry[m] = result[m]
    floor = result.get("floor") or {}
    for m in metrics:
        if m in floor:
            entry[f"floor_{m}"] = floor[m]
    return entry


def run_cv(config, k: int, out, *, headline: str = "macro_auc", extra_metrics: Sequence[str] = (),
           environment: dict | None = None, progress: bool = True, devices: int | None = 1,
           log=print) -> dict[str, Any]:
    """Runs the K splits of ``config`` (each ``out/fold-<b>``, a normal run directory, resumed
    when unfinished and reused when finished), saves each split's test predictions
    (:data:`PREDICTIONS_FILE`: ``scores``, ``y``), and writes ``out/cv.json``
    (:func:`summarise`, with the pooled out-of-fold metrics from the task's evaluator)."""
    from pathlib import Path

    from detjax import manifest as manifest_lib
    from detjax import tasks
    from detjax.train import train_and_evaluate

    out = Path(out).absolute()
    splits = cv_splits(k)
    configs = [split_config(config, s) for s in splits]
    out.mkdir(parents=True, exist_ok=True)
    entries, pooled_y, pooled_s = [], [], []
    evaluate = None
    for b, (fold_split, cfg) in enumerate(zip(splits, configs)):
        run_dir = out / f"fold-{b}"
        pred_path = run_dir / PREDICTIONS_FILE
        finished = manifest_lib.finished_result(run_dir)
        if finished is not None and finished.get("config_hash") != cfg.hash():
            raise ValueError(f"{run_dir} holds a run of another config ({finished.get('config_hash')}); "
                             "choose another --out")
        data = tasks.load_task(cfg)
        evaluate = data.evaluate
        if finished is None or not pred_path.exists():
            if finished is not None:
                raise ValueError(f"{run_dir} is finished but has no {PREDICTIONS_FILE} (not a CV run?); "
                                 "choose another --out")
            log(f"split {b + 1}/{k}: test folds {list(fold_split['test'])}, val {list(fold_split['val'])}, "
                f"train {list(fold_split['train'])}: {data.train_x.shape[0]} / {data.val_x.shape[0]} / "
                f"{data.test_x.shape[0]} records")
            inner = data.post_evaluate

            def post(predict, test_scores, _inner=inner, _path=pred_path, _y=data.test_y):
                np.savez(_path, scores=np.asarray(test_scores), y=np.asarray(_y))
                return _inner(predict, test_scores) if _inner is not None else {}

            data.post_evaluate = post
            result = train_and_evaluate(cfg, data, run_dir, resume=True, environment=environment,
                                        progress=progress, devices=devices)
        else:
            result = finished
        with np.load(pred_path) as stored:
            pooled_s.append(stored["scores"])
            pooled_y.append(stored["y"])
        entries.append(_fold_entry(b, fold_split, run_dir, result, (headline, *extra_metrics)))
        log(f"split {b + 1}/{k}: {headline} {result.get(headline)}")
    pooled = dict(evaluate(np.concatenate(pooled_y), np.concatenate(pooled_s)))
    pooled.pop("score", None)
    summary = summarise(entries, headline=headline, pooled=pooled, extra_metrics=extra_metrics,
                        meta={"task": config.task, "base_config": config.to_dict(),
                              "grouping": f"block(f) = floor((f-1)*{k}/{N_FOLDS}); val = highest fold of the "
                                          "previous block"})
    summary = manifest_lib.strict_json(summary)
    manifest_lib.write_json_atomic(out / "cv.json", summary)
    return summary


def cv_main(config, args, *, headline: str = "macro_auc", extra_metrics: Sequence[str] = ()) -> int:
    """``--cv K`` of ``experiments/ptbxl.py`` / ``cinc2017.py``: checks, :func:`run_cv`, a summary
    printout; one ``error:`` line and status 2 for bad input."""
    import sys
    from pathlib import Path

    from detjax.cli import default_out, one_line

    try:
        cv_splits(args.cv)  # K in range, before any data is loaded
        if getattr(args, "cv_fold", 0):
            raise ValueError("--cv K replaces the 3-rotation --cv-fold; give one of them")
        out = Path(args.out) if args.out else default_out(f"{config.task}-cv{args.cv}")
        summary = run_cv(config, args.cv, out, headline=headline, extra_metrics=extra_metrics,
                         environment=args.environment, progress=not args.no_progress, devices=args.devices)
    except (ValueError, FileNotFoundError, OSError, FloatingPointError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"\n{'split':<6} {'test folds':<16} {headline:>10}" + "".join(f" {m:>13}" for m in extra_metrics)
          + f" {'floor':>8}")
    for f in summary["folds"]:
        print(f"{f['split']:<6} {str(f['folds']['test']):<16} {fmt(f.get(headline)):>10}"
              + "".join(f" {fmt(f.get(m)):>13}" for m in extra_metrics) + f" {fmt(f.get('floor_' + headline)):>8}")
    print(f"{headline} mean {fmt(summary['mean'])} sd {fmt(summary['sd'])}; pooled out-of-fold "
          f"{fmt(summary['pooled_' + headline])}")
    print(f"cv.json: {out.absolute() / 'cv.json'}")
    return 0
