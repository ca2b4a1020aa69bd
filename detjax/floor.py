"""A classical, non-deep floor for every task: hand-made features + logistic regression.

A short deep run that has not learned yet looks like a number, not like a failure. The
floor puts a cheap classical model, trained on the *same* training split and scored with
the *same* evaluator on the *same* test split, beside every deep result (``result.json``
``"floor"``), so a reader sees at a glance whether the network beat it.

Features of an ECG window ``x (T, L)`` at ``fs`` Hz, per lead (then concatenated):

* **spectrum**: with :math:`X = |\\mathrm{rfft}(x - \\bar x)|^2` and :math:`B` bands with
  log-spaced edges from 0.5 Hz to ``fs/2``, the relative band powers
  :math:`\\log\\big((\\sum_{f \\in b} X_f + \\epsilon) / (\\sum_f X_f + \\epsilon)\\big)` and the log
  total power :math:`\\log(\\frac1T\\sum_t (x_t - \\bar x)^2 + \\epsilon)`;
* **autocorrelation** (rhythm regularity: a regular rhythm has a tall ACF peak at the RR
  interval, AF has none): :math:`r_k = \\sum_t \\tilde x_t \\tilde x_{t+k} / \\sum_t \\tilde x_t^2`
  (via a zero-padded FFT) sampled at lags 0.1 s, 0.15 s, ..., 2 s, plus
  :math:`\\max_{0.3 s \\le k \\le 2 s} r_k`, the lag of that maximum (s) and the height of the
  second-largest local maximum relative to the first;
* **amplitude**: log std of the first difference and the 1/99 % quantile span.

Images (``x (H, W, C)``) use their pixels, flattened.

Classifier: ``StandardScaler`` then ``LogisticRegression(C, lbfgs)``: one binary model per
label for multi-label tasks (a label without both classes in training scores a constant
0.5), one multinomial model for single-label tasks. All of it is deterministic (no random
state is drawn) and takes seconds on a CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["ecg_features", "image_features", "features", "fit_predict", "floor_report", "FLOOR_C", "MODELS"]

#: Inverse L2 strength of the logistic regression (features are standardised first).
FLOOR_C = 0.1
N_BANDS = 16
EPS = 1e-8


def _band_edges(fs: float, n_bands: int = N_BANDS) -> np.ndarray:
    return np.geomspace(0.5, fs / 2.0, n_bands + 1)


def ecg_features(x: np.ndarray, fs: float = 100.0, *, chunk: int = 512) -> np.ndarray:
    """Spectral, autocorrelation and amplitude features of ECG windows ``x (n, T, L)`` -> ``(n, F·L)``
    float64 (see the module docstring for the formulas); ``F = N_BANDS + 1 + 39 + 3 + 2``."""
    x = np.asarray(x)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3:
        raise ValueError(f"ECG windows must be (n, T, leads), got shape {x.shape}")
    n, t, leads = x.shape
    freqs = np.fft.rfftfreq(t, d=1.0 / fs)
    edges = _band_edges(fs)
    band_of = np.digitize(freqs, edges) - 1  # -1 below 0.5 Hz, N_BANDS at/above fs/2 (merged into last)
    band_of = np.where(band_of == N_BANDS, N_BANDS - 1, band_of)
    lags = np.round(np.arange(0.1, 2.0 + 1e-9, 0.05) * fs).astype(int)
    lags = lags[lags < t]
    lo, hi = int(round(0.3 * fs)), min(int(round(2.0 * fs)), t - 1)
    out = []
    for start in range(0, n, chunk):
        xc = x[start:start + chunk].astype(np.float64)
        xc = xc - xc.mean(axis=1, keepdims=True)
        power = np.abs(np.fft.rfft(xc, axis=1)) ** 2  # (c, F, L)
        total = power.sum(axis=1)  # (c, L)
        bands = np.stack([power[:, band_of == b].sum(axis=1) for b in range(N_BANDS)], axis=1)
        rel = np.log((bands + EPS) / (total[:, None] + EPS))
        logvar = np.log(np.mean(xc ** 2, axis=1) + EPS)[:, None]
        spec = np.fft.rfft(xc, n=2 * t, axis=1)
        acf = np.fft.irfft(np.abs(spec) ** 2, n=2 * t, axis=1)[:, :t]
        acf = acf / (acf[:, :1] + EPS)
        sampled = acf[:, lags]
        window = acf[:, lo:hi + 1]
        peak = window.max(axis=1)[:, None]
        peak_lag = (lo + window.argmax(axis=1))[:, None] / fs
        interior = (window[:, 1:-1] > window[:, :-2]) & (window[:, 1:-1] >= window[:, 2:])
        maxima = np.where(interior, window[:, 1:-1], -np.inf)
        top2 = -np.sort(-maxima, axis=1)[:, :2]
        top2 = np.where(np.isfinite(top2), top2, 0.0)
        second = (top2[:, 1:2] / (np.abs(top2[:, 0:1]) + EPS))
        diff_std = np.log(np.std(np.diff(xc, axis=1), axis=1) + EPS)[:, None]
        q = np.quantile(xc, [0.01, 0.99], axis=1)
        span = np.log(q[1] - q[0] + EPS)[:, None]
        feats = np.concatenate([rel, logvar, sampled, peak, peak_lag, second, diff_std, span], axis=1)  # (c, F, L)
        out.append(feats.reshape(feats.shape[0], -1))
    return np.concatenate(out, axis=0) if out else np.zeros((0, 0))


def image_features(x: np.ndarray) -> np.ndarray:
    """Pixels of images ``x (n, H, W, C)`` flattened to ``(n, H·W·C)`` float64."""
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)


def features(x: np.ndarray, kind: str, fs: float = 100.0) -> np.ndarray:
    """:func:`ecg_features` (``kind="ecg"``) or :func:`image_features` (``kind="image"``)."""
    if kind == "ecg":
        return ecg_features(x, fs)
    if kind == "image":
        return image_features(x)
    raise ValueError(f"unknown floor feature kind {kind!r}; expected 'ecg' or 'image'")


MODELS = ("logreg", "hgb")


def _pipeline(c: float, model: str = "logreg"):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if model == "hgb":  # slower (tens of seconds on 2,048 CinC windows), a few points of AUC better
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, early_stopping=False,
                                              random_state=0)
    if model != "logreg":
        raise ValueError(f"unknown floor model {model!r}; expected one of {MODELS}")
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))


def fit_predict(f_train: np.ndarray, y_train: np.ndarray, f_eval: list[np.ndarray], *, multilabel: bool,
                num_classes: int, c: float = FLOOR_C, model: str = "logreg") -> list[np.ndarray]:
    """Fits the floor on ``(f_train, y_train)`` and returns scores ``(n, num_classes)`` for each
    array of ``f_eval``: per-label sigmoid probabilities (``multilabel``) or class probabilities.
    ``model``: ``"logreg"`` (default) or ``"hgb"`` (histogram gradient boosting, fixed seed)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    outs = [np.full((f.shape[0], num_classes), 0.5 if multilabel else 1.0 / num_classes) for f in f_eval]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if multilabel:
            y = np.asarray(y_train)
            for j in range(num_classes):
                if 0 < y[:, j].sum() < y.shape[0]:
                    fitted = _pipeline(c, model).fit(f_train, y[:, j].astype(int))
                    for o, f in zip(outs, f_eval):
                        o[:, j] = fitted.predict_proba(f)[:, 1]
        else:
            y = np.asarray(y_train).reshape(-1).astype(int)
            present = np.unique(y)
            if present.size >= 2:
                fitted = _pipeline(c, model).fit(f_train, y)
                for o, f in zip(outs, f_eval):
                    o[:] = 0.0
                    o[:, fitted.classes_] = fitted.predict_proba(f)
    return outs


def floor_report(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 evaluate: Callable[[np.ndarray, np.ndarray], Mapping[str, Any]], *, kind: str, multilabel: bool,
                 num_classes: int, fs: float = 100.0, extra_eval: Mapping[str, np.ndarray] | None = None,
                 model: str = "logreg") -> dict[str, Any]:
    """The floor's test metrics, with the task's own evaluator: ``{"model", "features",
    "n_features", <evaluate's entries except "score">, "test_score", "wall_time_s"}``.

    ``extra_eval`` maps names to further inputs to score (returned under ``"scores"``, not
    written to ``result.json`` by the callers). Never raises for a degenerate split: the
    reason is returned as ``{"error": ...}`` instead, so a floor cannot break a deep run.
    """
    t0 = time.perf_counter()
    try:
        f_train = features(train_x, kind, fs)
        f_test = features(test_x, kind, fs)
        extra = {k: features(v, kind, fs) for k, v in (extra_eval or {}).items()}
        scores = fit_predict(f_train, train_y, [f_test, *extra.values()], multilabel=multilabel,
                             num_classes=num_classes, model=model)
        test = dict(evaluate(test_y, scores[0]))
    except (ValueError, np.linalg.LinAlgError) as exc:
        return {"model": model, "error": " ".join(str(exc).split())}
    name = (f"standardise + logistic regression (C={FLOOR_C}, lbfgs)" if model == "logreg"
            else "histogram gradient boosting (200 trees, lr 0.05, random_state 0)")
    out = {"model": name,
           "features": "spectral + autocorrelation + amplitude" if kind == "ecg" else "pixels",
           "n_features": int(f_train.shape[1]),
           **{k: v for k, v in test.items() if k not in ("score", "confusion")},
           "test_score": test.get("score"), "wall_time_s": time.perf_counter() - t0}
    if extra:
        out["scores"] = dict(zip(extra, scores[1:]))
    return out
