"""Cross-dataset AF transfer between CinC 2017 and PTB-XL: harmonisation and evaluation.

Train on one dataset's training folds, select on its validation fold, and score the other
dataset's test records zero-shot. Both datasets are brought to one input format first:

* **lead**: CinC 2017's single AliveCor lead (held like lead I: left hand to right hand) and
  PTB-XL's lead I, as ``(n, 1000, 1)``;
* **rate and window**: 100 Hz and 10 s. PTB-XL's ``records100`` are 10 s at 100 Hz already;
  CinC records are resampled 300 -> 100 Hz (:func:`detjax.data.cinc2017.resample`) and cut
  to their centred 10 s (shorter records zero-padded), exactly as the ``cinc2017`` task does;
* **units**: millivolts in both (WFDB physical units; AliveCor gain 1000/mV);
* **baseline** (:func:`remove_baseline`, the same on every dataset): ``"highpass"`` (default)
  is mean removal then a zero-phase 2nd-order Butterworth high-pass at 0.5 Hz
  (``scipy.signal.sosfiltfilt``, float64, even extension of 3 s at the edges), which removes
  the DC offset *and* slow wander; ``"mean"`` removes only each
  window's mean, :math:`x_t - \\frac1T\\sum_s x_s`; ``"none"`` keeps the raw offset, so a
  model may learn one device's offset (measured in docs/transfer.md);
* **normalisation**: one scalar mean and population sd over the *source's training* windows
  after baseline removal (:func:`detjax.data.splits.train_statistics`, float64 sums), applied
  as ``(x - float32 mu) / float32 sigma`` to the source's splits and to the target alike.
  Nothing is computed on the target.

Labels: AF = CinC class ``A`` = PTB-XL rhythm statement ``AFIB`` (any likelihood); every
other record is negative (CinC ``N``, ``O``; PTB-XL everything else, including atrial
flutter ``AFLT``). CinC's noisy class ``~`` ("too noisy to classify") is not a rhythm
label: by default (``cinc_noisy="exclude"``) those records are left out of training,
validation and the transfer test; ``"negative"`` keeps them as non-AF.

Folds: PTB-XL train = ``strat_fold`` 1-8 restricted to records with a rhythm label (as the
``ptbxl`` task), val 9, test 10; CinC train = folds 1-8, val 9, test 10 of the vendored
fold file (a ``fold_split`` may replace these, see :mod:`detjax.cv`).

Evaluation (:func:`transfer_report`): target AUC of the AF score with a percentile
bootstrap 95 % CI (``n_boot`` resamples of the target records with a fixed numpy PCG64
seed; a resample lacking a class is redrawn), and the target F1 at the threshold that
maximises F1 on the *source's* validation split (also the F1 at 0.5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detjax.data import splits as S
from detjax.data.cache import fingerprint

__all__ = ["DATASETS", "BASELINES", "NOISY", "DEFAULT_BASELINE", "HIGHPASS_HZ", "remove_baseline",
           "ptbxl_af", "cinc_af", "harmonise", "af_evaluate", "bootstrap_auc_ci",
           "best_f1_threshold", "f1_at", "transfer_report", "all_records_report", "prepare_transfer"]

DATASETS = ("cinc2017", "ptbxl")
BASELINES = ("highpass", "mean", "none")
NOISY = ("exclude", "negative")
DEFAULT_BASELINE = "highpass"
HIGHPASS_HZ = 0.5
RATE = 100
LENGTH = 1000
_CHUNK = 256


def remove_baseline(x: np.ndarray, method: str = DEFAULT_BASELINE, fs: float = RATE) -> np.ndarray:
    """Baseline removal along time of ``x (n, T, L)`` (float32 out), the same for every dataset.

    ``"highpass"``: the window's mean removed, then ``sosfiltfilt(butter(2, 0.5 Hz, highpass), x,
    padtype="even", padlen=3 s)`` in float64 (zero phase; the even extension keeps the edge
    transients below 2 % of a 10 Hz component, the default odd one leaves ~10 % a second in);
    ``"mean"``: :math:`x_t - \\bar x`; ``"none"``: ``x`` unchanged.
    """
    if method not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {method!r}")
    x = np.asarray(x)
    if method == "none":
        return x.astype(np.float32, copy=False)
    if method == "mean":
        return (x.astype(np.float64) - x.astype(np.float64).mean(axis=1, keepdims=True)).astype(np.float32)
    from scipy.signal import butter, sosfiltfilt

    sos = butter(2, HIGHPASS_HZ, btype="highpass", fs=fs, output="sos")
    padlen = min(int(3 * fs), x.shape[1] - 1)
    out = np.empty(x.shape, np.float32)
    for start in range(0, x.shape[0], _CHUNK):
        chunk = x[start:start + _CHUNK].astype(np.float64)
        chunk = chunk - chunk.mean(axis=1, keepdims=True)
        out[start:start + _CHUNK] = sosfiltfilt(sos, chunk, axis=1, padtype="even", padlen=padlen)
    return out


def _millivolts(x: np.ndarray, norm: Mapping[str, float]) -> np.ndarray:
    """Normalised windows mapped back as they were formed: ``x * float32(std) + float32(mean)``
    in float64, then float32."""
    return (x.astype(np.float64) * float(np.float32(norm["std"])) + float(np.float32(norm["mean"]))).astype(np.float32)


def ptbxl_af(data_dir: str | Path | None = None, *, fold_split: Mapping[str, Sequence[int]] | None = None,
             ) -> dict[str, Any]:
    """PTB-XL lead I in mV with the AF target, split by ``strat_fold``.

    Returns ``{"x_<split>" (n, 1000, 1) float32 mV, "y_<split>" (n, 1) float32 AF, "id_<split>"
    ecg_id, "source": loader source}`` for ``train`` (folds 1-8 with a rhythm label), ``val`` (9)
    and ``test`` (10), or the folds of ``fold_split``.
    """
    from detjax.data import ptbxl

    data = ptbxl.load_ptbxl(data_dir, leads=["I"])
    splits = ptbxl.split(data, fold_split=fold_split)
    af = ptbxl.RHYTHM_LABELS.index("AFIB")
    out: dict[str, Any] = {"source": data.source, "folds": {k: list(v) for k, v in splits.folds.items()}}
    for name, subset in splits.items():
        out[f"x_{name}"] = subset.x
        out[f"y_{name}"] = subset.y[:, af:af + 1].astype(np.float32)
        out[f"id_{name}"] = subset.ecg_id.astype(str)
    return out


def cinc_af(data_dir: str | Path | None, *, noisy: str = "exclude",
            fold_split: Mapping[str, Sequence[int]] | None = None, folds: str | None = None) -> dict[str, Any]:
    """CinC 2017 in mV (10 s at 100 Hz, as the ``cinc2017`` task) with the AF target.

    The loader returns windows normalised with its own train statistics; they are mapped back
    to mV exactly as they were formed, :math:`x = x' \\cdot \\sigma_{32} + \\mu_{32}` (float64,
    then float32: within one float32 rounding of the loader's windows). ``noisy``: ``"exclude"``
    drops class ``~``, ``"negative"`` keeps it as non-AF. ``folds``: a folds CSV other than the
    vendored one (tests).
    """
    from detjax.data import cinc2017

    if noisy not in NOISY:
        raise ValueError(f"cinc_noisy must be one of {NOISY}, got {noisy!r}")
    d = cinc2017.load_cinc2017(data_dir, fold_split=fold_split, folds=folds)
    a, tilde = cinc2017.CLASSES.index("A"), cinc2017.CLASSES.index("~")
    out: dict[str, Any] = {"source": d["source"], "folds": d["folds"]}
    for name in S.SPLITS:
        keep = np.ones(d[f"y_{name}"].shape[0], bool) if noisy == "negative" else d[f"y_{name}"] != tilde
        out[f"x_{name}"] = _millivolts(d[f"x_{name}"][keep], d["norm"])
        out[f"y_{name}"] = (d[f"y_{name}"][keep] == a).astype(np.float32)[:, None]
        out[f"id_{name}"] = d[f"record_{name}"][keep]
    return out


def _load(dataset: str, *, cinc_dir, ptbxl_dir, noisy: str, fold_split=None, cinc_folds=None) -> dict[str, Any]:
    if dataset == "ptbxl":
        return ptbxl_af(ptbxl_dir, fold_split=fold_split)
    if dataset == "cinc2017":
        return cinc_af(cinc_dir, noisy=noisy, fold_split=fold_split, folds=cinc_folds)
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def harmonise(source: Mapping[str, np.ndarray], target_x: np.ndarray, baseline: str = DEFAULT_BASELINE,
              ) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, float]]:
    """Baseline removal on everything, then the source-train scalar normalisation on everything.

    Returns ``({"x_train", "x_val", "x_test"}, target_x, stats)``, all float32.
    """
    cleaned = {k: remove_baseline(source[k], baseline) for k in ("x_train", "x_val", "x_test")}
    stats = S.train_statistics(cleaned["x_train"])
    out = {k: S.normalise(v, stats) for k, v in cleaned.items()}
    return out, S.normalise(remove_baseline(target_x, baseline), stats), stats


def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).reshape(-1)
    if not 0 < y.sum() < y.size:
        return None
    return float(roc_auc_score(y, np.asarray(s).reshape(-1)))


def f1_at(y: np.ndarray, s: np.ndarray, threshold: float) -> float:
    """F1 of ``s >= threshold`` against binary ``y``: :math:`2TP / (2TP + FP + FN)` (0 if undefined)."""
    y = np.asarray(y).reshape(-1) > 0.5
    p = np.asarray(s).reshape(-1) >= threshold
    tp = int(np.sum(y & p))
    denom = 2 * tp + int(np.sum(~y & p)) + int(np.sum(y & ~p))
    return 2.0 * tp / denom if denom else 0.0


def best_f1_threshold(y: np.ndarray, s: np.ndarray) -> float:
    """The score threshold (one of the scores) maximising F1 on ``(y, s)``; the lowest such one
    on ties; 0.5 when ``y`` has no positive."""
    y = np.asarray(y).reshape(-1) > 0.5
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    if not y.any():
        return 0.5
    order = np.argsort(-s, kind="stable")
    ys, ss = y[order], s[order]
    tp = np.cumsum(ys)
    fp = np.cumsum(~ys)
    f1 = 2 * tp / (2 * tp + fp + (y.sum() - tp))
    last_of_value = np.r_[ss[1:] != ss[:-1], True]  # thresholds are distinct score values
    f1 = np.where(last_of_value, f1, -1.0)
    return float(ss[int(np.argmax(f1))])


def bootstrap_auc_ci(y: np.ndarray, s: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                     level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap CI of the ROC AUC: resample records with replacement (numpy PCG64
    ``seed``), redraw a resample that lacks a class, take the ``(1±level)/2`` quantiles."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).reshape(-1)
    s = np.asarray(s).reshape(-1)
    if not 0 < y.sum() < y.size:
        return None
    rng = np.random.Generator(np.random.PCG64(seed))
    aucs = []
    while len(aucs) < n_boot:
        idx = rng.integers(0, y.size, y.size)
        if 0 < y[idx].sum() < y.size:
            aucs.append(roc_auc_score(y[idx], s[idx]))
    lo, hi = np.quantile(np.asarray(aucs), [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def af_evaluate(y_true: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """The ``af_transfer`` task's evaluator: ``score`` = ``macro_auc`` = ``af_auc`` (ROC AUC of
    the AF score), ``per_class_auc {"AF"}``, ``af_f1`` at 0.5 and the AF prevalence."""
    y = np.asarray(y_true).reshape(-1)
    s = np.asarray(scores).reshape(-1)
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf; the model diverged")
    auc = _auc(y, s)
    value = float("nan") if auc is None else auc
    return {"score": value, "macro_auc": value, "af_auc": auc, "per_class_auc": {"AF": auc},
            "af_f1": f1_at(y, s, 0.5), "n": int(y.size), "n_af": int(y.sum())}


def _target_metrics(target_y, target_scores, threshold: float, n_boot: int, seed: int) -> dict[str, Any]:
    return {"target_af_auc": _auc(target_y, target_scores), "target_af_f1": f1_at(target_y, target_scores, threshold),
            "n_target": int(np.asarray(target_y).size), "n_target_af": int(np.asarray(target_y).sum()),
            "ci95": bootstrap_auc_ci(target_y, target_scores, n_boot=n_boot, seed=seed)}


def all_records_report(target_y: np.ndarray, target_scores: np.ndarray, threshold: float, *,
                       n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The target AUC (with bootstrap CI) and F1 over every target record, not only its test fold."""
    return {**_target_metrics(target_y, target_scores, threshold, n_boot, seed),
            "note": "every target record of folds 1-10 (PTB-XL folds 1-8: those with a rhythm label, as in its "
                    "training split); none was used in training or selection"}


def transfer_report(*, source: str, target: str, target_y: np.ndarray, target_scores: np.ndarray,
                    val_y: np.ndarray, val_scores: np.ndarray, n_boot: int = 1000, seed: int = 0,
                    ) -> dict[str, Any]:
    """``{"source", "target", "target_af_auc", "target_af_f1", "n_target", "n_target_af", "ci95",
    "threshold", "target_af_f1_at_0.5", "bootstrap"}`` (see the module docstring)."""
    threshold = best_f1_threshold(val_y, val_scores)
    return {
        "source": source,
        "target": target,
        **_target_metrics(target_y, target_scores, threshold, n_boot, seed),
        "threshold": threshold,
        "threshold_rule": "maximises F1 on the source's validation split",
        "target_af_f1_at_0.5": f1_at(target_y, target_scores, 0.5),
        "bootstrap": {"n": n_boot, "seed": seed, "method": "percentile, records resampled, numpy PCG64"},
    }


_LOADER_KEYS = ("data_dir", "data_source", "content_sha256", "fingerprint", "windows_fingerprint")


def prepare_transfer(*, source: str, target: str, cinc_dir: str | None = None, ptbxl_dir: str | None = None,
                     baseline: str = DEFAULT_BASELINE, cinc_noisy: str = "exclude", limit: int | None = None,
                     fold_split: Mapping[str, Sequence[int]] | None = None,
                     cinc_folds: str | None = None) -> dict[str, Any]:
    """Everything the ``af_transfer`` task needs: the harmonised source splits (``limit``: the
    first records of each source split, cut after the normalisation statistics were computed
    on the full training split, :func:`detjax.data.splits.first_records`), the harmonised
    target records, the statistics and provenance. ``fold_split`` applies to the source only
    (the target is always tested on its test fold 10)."""
    if source not in DATASETS or target not in DATASETS:
        raise ValueError(f"source and target must be among {DATASETS}, got {source!r}, {target!r}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if cinc_noisy not in NOISY:
        raise ValueError(f"cinc_noisy must be one of {NOISY}, got {cinc_noisy!r}")
    limit = S.check_limit(limit)
    src = _load(source, cinc_dir=cinc_dir, ptbxl_dir=ptbxl_dir, noisy=cinc_noisy, fold_split=fold_split,
                cinc_folds=cinc_folds)
    tgt = _load(target, cinc_dir=cinc_dir, ptbxl_dir=ptbxl_dir, noisy=cinc_noisy, cinc_folds=cinc_folds)
    xs, target_x, stats = harmonise(src, tgt["x_test"], baseline)
    out: dict[str, Any] = S.first_records({**xs, **{f"{k}_{name}": src[f"{k}_{name}"] for k in ("y", "id")
                                                    for name in S.SPLITS}}, limit)
    out.update(target_x=target_x, target_y=tgt["y_test"], target_id=tgt["id_test"])
    # Every target record (its folds 1-10): none is used for training or selection, so all of
    # them are zero-shot test records too; more positives than the test fold alone.
    out["target_all_x"] = np.concatenate([target_x] + [S.normalise(remove_baseline(tgt[f"x_{r}"], baseline), stats)
                                                       for r in ("train", "val")])
    out["target_all_y"] = np.concatenate([tgt["y_test"], tgt["y_train"], tgt["y_val"]])
    out["info"] = {
        "source": source, "target": target, "baseline": baseline,
        "highpass_hz": HIGHPASS_HZ if baseline == "highpass" else None,
        "cinc_noisy": cinc_noisy, "lead": "CinC single lead <-> PTB-XL lead I", "sampling_rate": RATE,
        "window_length": LENGTH, "units": "mV", "norm": stats, "limit": limit,
        "folds": src["folds"],
        "n": {name: int(out[f"y_{name}"].shape[0]) for name in S.SPLITS},
        "n_af": {name: int(out[f"y_{name}"].sum()) for name in S.SPLITS},
        "target_n": int(tgt["y_test"].shape[0]), "target_n_af": int(tgt["y_test"].sum()),
        "target_folds": tgt["folds"]["test"],
        "target_fingerprint": fingerprint({"x": target_x, "y": tgt["y_test"], "id": tgt["id_test"]}),
        **{f"{role}_loader": {k: d["source"][k] for k in _LOADER_KEYS if k in d["source"]}
           for role, d in (("source", src), ("target", tgt))},
    }
    return out
