"""Statistics of seed studies (built on ``scipy.stats``), as used in METHOD.md §7–8.

Each arm of a study is a vector of one metric over seeds (e.g. macro AUC of n runs). The
functions are small and pure; :func:`compare_arms` bundles the paper's two-arm tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as _st

__all__ = [
    "summary",
    "welch_t",
    "levene",
    "mann_whitney",
    "cohens_d",
    "tost_equivalence",
    "friedman",
    "per_class_table",
    "compare_arms",
]


def _vector(x, name: str, min_n: int = 2) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size < min_n:
        raise ValueError(f"{name} needs at least {min_n} values, got {a.size}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf: {a.tolist()}")
    return a


def summary(x) -> dict[str, float]:
    """``n``, mean, sample sd (ddof=1), min, max and range of a metric over seeds."""
    a = _vector(x, "summary input", 1)
    return {"n": int(a.size), "mean": float(a.mean()), "sd": float(a.std(ddof=1)) if a.size > 1 else float("nan"),
            "min": float(a.min()), "max": float(a.max()), "range": float(a.max() - a.min())}


def welch_t(a, b) -> dict[str, float]:
    r"""Welch's two-sample t-test (unequal variances), two-sided:
    :math:`t = (\bar a - \bar b)/\sqrt{s_a^2/n_a + s_b^2/n_b}` with Welch–Satterthwaite df."""
    res = _st.ttest_ind(_vector(a, "a"), _vector(b, "b"), equal_var=False)
    return {"t": float(res.statistic), "p": float(res.pvalue), "df": float(res.df)}


def levene(a, b) -> dict[str, float]:
    """Levene's test for equal variances (Brown–Forsythe form, centre = median, scipy's default)."""
    res = _st.levene(_vector(a, "a"), _vector(b, "b"))
    return {"W": float(res.statistic), "p": float(res.pvalue)}


def mann_whitney(a, b) -> dict[str, float]:
    """Mann–Whitney U test, two-sided (exact for small samples without ties, as scipy chooses)."""
    res = _st.mannwhitneyu(_vector(a, "a"), _vector(b, "b"), alternative="two-sided")
    return {"U": float(res.statistic), "p": float(res.pvalue)}


def cohens_d(a, b) -> float:
    r"""Cohen's d with the pooled sample sd:
    :math:`d = (\bar a - \bar b) / \sqrt{((n_a-1)s_a^2 + (n_b-1)s_b^2)/(n_a+n_b-2)}`."""
    x, y = _vector(a, "a"), _vector(b, "b")
    pooled = np.sqrt(((x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1)) / (x.size + y.size - 2))
    if pooled == 0:
        return 0.0 if x.mean() == y.mean() else float(np.sign(x.mean() - y.mean()) * np.inf)
    return float((x.mean() - y.mean()) / pooled)


def tost_equivalence(a, b, delta: float = 0.015, alpha: float = 0.05) -> dict[str, float | bool]:
    r"""Two one-sided Welch t-tests for equivalence within ``±delta`` (METHOD.md: δ = 0.015 AUC).

    :math:`H_0: |\mu_a - \mu_b| \ge \delta`. Lower test :math:`H_1: \mu_a - \mu_b > -\delta`,
    upper test :math:`H_1: \mu_a - \mu_b < \delta`; :math:`p = \max(p_\text{lower}, p_\text{upper})`,
    equivalent when :math:`p < \alpha`.
    """
    if not delta > 0:
        raise ValueError(f"delta must be positive, got {delta}")
    x, y = _vector(a, "a"), _vector(b, "b")
    lower = _st.ttest_ind(x + delta, y, equal_var=False, alternative="greater").pvalue
    upper = _st.ttest_ind(x - delta, y, equal_var=False, alternative="less").pvalue
    p = float(max(lower, upper))
    return {"delta": float(delta), "p_lower": float(lower), "p_upper": float(upper), "p": p, "equivalent": p < alpha}


def friedman(arms: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Friedman's test across three or more arms paired by seed (equal-length vectors,
    element i of every arm from seed i)."""
    if len(arms) < 3:
        raise ValueError(f"Friedman's test needs at least 3 arms, got {len(arms)}: {list(arms)}")
    vectors = [_vector(v, f"arm {k!r}") for k, v in arms.items()]
    if len({v.size for v in vectors}) != 1:
        raise ValueError(f"arms must be paired by seed (equal lengths), got { {k: len(v) for k, v in arms.items()} }")
    res = _st.friedmanchisquare(*vectors)
    return {"chi2": float(res.statistic), "p": float(res.pvalue), "n_seeds": int(vectors[0].size)}


def per_class_table(per_class: np.ndarray, labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-class mean, sd, min, max and range over seeds of a ``(n_seeds, n_classes)`` metric
    matrix; NaN entries (a class without positives in a run) are left out of its statistics."""
    m = np.asarray(per_class, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] != len(labels):
        raise ValueError(f"per_class must be (n_seeds, {len(labels)}), got {m.shape}")
    table = {}
    for c, name in enumerate(labels):
        col = m[:, c][np.isfinite(m[:, c])]
        table[str(name)] = summary(col) if col.size else {"n": 0}
    return table


def compare_arms(a, b, *, delta: float = 0.015) -> dict[str, dict]:
    """The paper's two-arm comparison: summaries, Welch t, Levene, Mann–Whitney U, Cohen's d, TOST."""
    return {"a": summary(a), "b": summary(b), "welch_t": welch_t(a, b), "levene": levene(a, b),
            "mann_whitney": mann_whitney(a, b), "cohens_d": cohens_d(a, b),
            "tost": tost_equivalence(a, b, delta=delta)}
