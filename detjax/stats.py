"""Statistics of seed studies (built on ``scipy.stats``).

Each arm of a study is a vector of one metric over seeds (e.g. macro AUC of n runs). The
functions are small and pure; :func:`compare_arms` bundles the paper's two-arm tests.

A statistic that is undefined for its input raises ``ValueError`` naming why (too few seeds,
arms without variance, all values tied) instead of returning ``inf``, ``NaN`` or a
placeholder degree of freedom; :func:`compare_arms` turns such a test into ``None`` plus the
reason. Conventions (they reproduce the statistics printed in arXiv 2603.28040 from its
published per-seed AUCs, see ``tests/test_stats.py``):

* Welch's t: two-sided, Welch–Satterthwaite df.
* Levene: Brown–Forsythe form (deviations from the median).
* Mann–Whitney U: two-sided; ``"auto"`` is exact when an arm has at most 8 values and there
  are no ties, otherwise the normal approximation with tie and continuity corrections.
* Cohen's d: difference of means over the pooled sample sd (not Hedges' g).
* TOST: Welch standard error; df either Welch–Satterthwaite (``df="welch"``) or
  :math:`n_a + n_b - 2` (``df="pooled"``, the paper's choice).
* Friedman: arms are ``seed -> value`` mappings, paired by seed key, never by position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as _st

__all__ = [
    "summary",
    "welch_t",
    "levene",
    "mann_whitney",
    "cohens_d",
    "sd_ratio",
    "tost_equivalence",
    "friedman",
    "per_class_table",
    "compare_arms",
    "TOST_DF",
    "MW_METHODS",
]

#: Degrees of freedom of the TOST t-tests: Welch–Satterthwaite, or n_a + n_b - 2.
TOST_DF = ("welch", "pooled")
MW_METHODS = ("auto", "exact", "asymptotic")
#: Tolerance, in units of the data's magnitude, below which rounding noise counts as zero spread.
_ROUNDING = 64 * np.finfo(np.float64).eps


def _vector(x, name: str, min_n: int = 2, test: str = "") -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size < min_n:
        what = f"{test} needs" if test else f"{name} needs"
        raise ValueError(f"{what} at least {min_n} values per arm, got {a.size} in {name}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf: {a.tolist()}")
    return a


def _constant(a: np.ndarray) -> bool:
    """All values identical (exactly: equal floats have exactly zero sample variance)."""
    return bool(np.ptp(a) == 0)


def summary(x) -> dict[str, float | int | None]:
    """``n``, mean, sample sd (ddof=1; ``None`` for a single value), min, max and range of a
    metric over seeds."""
    a = _vector(x, "summary input", 1)
    return {"n": int(a.size), "mean": float(a.mean()), "sd": float(a.std(ddof=1)) if a.size > 1 else None,
            "min": float(a.min()), "max": float(a.max()), "range": float(a.max() - a.min())}


def welch_t(a, b) -> dict[str, float]:
    r"""Welch's two-sample t-test (unequal variances), two-sided:
    :math:`t = (\bar a - \bar b)/\sqrt{s_a^2/n_a + s_b^2/n_b}`, Welch–Satterthwaite
    :math:`\nu = (v_a + v_b)^2 / (v_a^2/(n_a-1) + v_b^2/(n_b-1))` with :math:`v = s^2/n`.

    Needs at least 3 values per arm (with 2 the variance estimate has one degree of freedom
    and the test is meaningless) and refuses two zero-variance arms (t and ν undefined).
    """
    x, y = _vector(a, "a", 3, "Welch's t-test"), _vector(b, "b", 3, "Welch's t-test")
    if _constant(x) and _constant(y):
        raise ValueError("Welch's t-test is undefined: both arms have zero variance "
                         f"(every value of a is {float(x[0])!r}, every value of b is {float(y[0])!r})")
    res = _st.ttest_ind(x, y, equal_var=False)
    return {"t": float(res.statistic), "p": float(res.pvalue), "df": float(res.df)}


def levene(a, b) -> dict[str, float]:
    r"""Levene's test for equal variances, Brown–Forsythe form (centre = median): a one-way
    ANOVA on :math:`z_{ij} = |x_{ij} - \tilde x_i|`,
    :math:`W = \frac{N-k}{k-1}\,\frac{\sum_i n_i(\bar z_i - \bar z)^2}{\sum_{ij}(z_{ij} - \bar z_i)^2}`.

    Needs at least 3 values per arm: with 2 the two deviations from the median are equal,
    the denominator is rounding noise and W explodes (a fake p of about 1e-28). For the same
    reason it refuses arms whose deviations are all equal up to rounding (e.g. zero-variance
    arms): W is then 0/0.
    """
    x, y = _vector(a, "a", 3, "Levene's test"), _vector(b, "b", 3, "Levene's test")
    flat = []
    for v in (x, y):
        z = np.abs(v - np.median(v))
        flat.append(np.ptp(z) <= _ROUNDING * max(float(np.max(np.abs(v))), np.finfo(np.float64).tiny))
    if all(flat):
        raise ValueError("Levene's test is undefined: in every arm the absolute deviations from the median "
                         "are equal (up to rounding), e.g. zero-variance arms, so W = 0/0")
    res = _st.levene(x, y, center="median")
    return {"W": float(res.statistic), "p": float(res.pvalue), "center": "median"}


def mann_whitney(a, b, method: str = "auto") -> dict[str, Any]:
    r"""Mann–Whitney U test, two-sided; :math:`U = \#\{(i,j): a_i > b_j\} + \tfrac12\#\{a_i = b_j\}`.

    ``method``: ``"exact"`` (the exact null distribution of U; refused with ties, which it
    cannot account for), ``"asymptotic"`` (normal approximation with tie correction and
    continuity correction), ``"auto"`` (exact when an arm has at most 8 values and there are
    no ties, else asymptotic; the rule is spelled out here so it does not depend on the scipy
    version). The method used is returned. All values tied: refused (U carries no information).
    """
    if method not in MW_METHODS:
        raise ValueError(f"unknown Mann–Whitney method {method!r}; expected one of {MW_METHODS}")
    x, y = _vector(a, "a", 2, "the Mann–Whitney test"), _vector(b, "b", 2, "the Mann–Whitney test")
    both = np.concatenate([x, y])
    if _constant(both):
        raise ValueError(f"the Mann–Whitney test is undefined: all values of both arms are tied ({float(both[0])!r})")
    ties = np.unique(both).size < both.size
    if method == "auto":
        method = "exact" if min(x.size, y.size) <= 8 and not ties else "asymptotic"
    elif method == "exact" and ties:
        raise ValueError("the exact Mann–Whitney p assumes no ties; the values have ties, use 'asymptotic'")
    res = _st.mannwhitneyu(x, y, alternative="two-sided", method=method, use_continuity=True)
    return {"U": float(res.statistic), "p": float(res.pvalue), "method": method,
            **({"continuity_correction": True} if method == "asymptotic" else {})}


def cohens_d(a, b) -> float:
    r"""Cohen's d with the pooled sample sd:
    :math:`d = (\bar a - \bar b) / \sqrt{((n_a-1)s_a^2 + (n_b-1)s_b^2)/(n_a+n_b-2)}`
    (not Hedges' small-sample correction). Refuses two zero-variance arms (d = x/0)."""
    x, y = _vector(a, "a", 2, "Cohen's d"), _vector(b, "b", 2, "Cohen's d")
    if _constant(x) and _constant(y):
        raise ValueError("Cohen's d is undefined: both arms have zero variance (pooled sd = 0)")
    pooled = np.sqrt(((x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1)) / (x.size + y.size - 2))
    return float((x.mean() - y.mean()) / pooled)


def sd_ratio(a, b) -> float:
    r""":math:`s_b / s_a`, the baseline's sample sd over the arm's (the paper's "Kaiming sd /
    structured sd"). Refuses a zero-variance arm ``a``."""
    x, y = _vector(a, "a", 2, "the sd ratio"), _vector(b, "b", 2, "the sd ratio")
    if _constant(x):
        raise ValueError("the sd ratio sd(b)/sd(a) is undefined: arm a has zero variance "
                         f"(every value {float(x[0])!r})")
    return float(y.std(ddof=1) / x.std(ddof=1))


def tost_equivalence(a, b, delta: float = 0.015, alpha: float = 0.05, df: str = "welch") -> dict[str, Any]:
    r"""Two one-sided t-tests for equivalence within ``±delta`` (the paper: δ = 0.015 AUC).

    :math:`H_0: |\mu_a - \mu_b| \ge \delta`. With the Welch standard error
    :math:`se = \sqrt{s_a^2/n_a + s_b^2/n_b}` and :math:`D = \bar a - \bar b`:
    lower test :math:`t_l = (D + \delta)/se`, :math:`p_l = P(T_\nu > t_l)`; upper test
    :math:`t_u = (D - \delta)/se`, :math:`p_u = P(T_\nu < t_u)`;
    :math:`p = \max(p_l, p_u)`, equivalent when :math:`p < \alpha`.

    ``df="welch"``: ν is the Welch–Satterthwaite df. ``df="pooled"``: ν = nₐ + n_b − 2 (the
    df of the pooled-variance test, kept with the Welch se); this is what the paper used
    (p = 0.0004 on its Conformer arms, where Welch df gives 0.0006). The df used is returned.
    Needs at least 3 values per arm; refuses two zero-variance arms (se = 0).
    """
    if not delta > 0:
        raise ValueError(f"delta must be positive, got {delta}")
    if df not in TOST_DF:
        raise ValueError(f"unknown TOST df {df!r}; expected one of {TOST_DF}")
    x, y = _vector(a, "a", 3, "TOST"), _vector(b, "b", 3, "TOST")
    if _constant(x) and _constant(y):
        raise ValueError("TOST is undefined: both arms have zero variance (standard error 0)")
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = float(np.sqrt(va + vb))
    nu = float((va + vb) ** 2 / (va ** 2 / (x.size - 1) + vb ** 2 / (y.size - 1))) if df == "welch" \
        else float(x.size + y.size - 2)
    diff = float(x.mean() - y.mean())
    lower = float(_st.t.sf((diff + delta) / se, nu))
    upper = float(_st.t.cdf((diff - delta) / se, nu))
    p = max(lower, upper)
    return {"delta": float(delta), "df_method": df, "df": nu, "se": se, "p_lower": lower, "p_upper": upper,
            "p": p, "alpha": float(alpha), "equivalent": p < alpha}


def friedman(arms: Mapping[str, Mapping[Any, float]], *, mismatch: str = "refuse") -> dict[str, Any]:
    r"""Friedman's test across three or more arms, paired by seed.

    Each arm maps seed -> value; rows are paired by seed key, never by position. With ranks
    :math:`r_{ij}` of arm j within seed i (mid-ranks for ties), n seeds and k arms,
    :math:`\chi^2 = \frac{12}{nk(k+1)}\sum_j R_j^2 - 3n(k+1)` (divided by the tie correction),
    p from :math:`\chi^2_{k-1}`.

    ``mismatch``: arms whose seed sets differ are refused (``"refuse"``) or reduced to the
    seeds common to all arms (``"intersect"``); the seeds used and those dropped per arm are
    returned. Needs at least 2 common seeds; refuses data tied within every seed.
    """
    if mismatch not in ("refuse", "intersect"):
        raise ValueError(f"unknown mismatch policy {mismatch!r}; expected 'refuse' or 'intersect'")
    if len(arms) < 3:
        raise ValueError(f"Friedman's test needs at least 3 arms, got {len(arms)}: {list(arms)}")
    for name, values in arms.items():
        if not isinstance(values, Mapping):
            raise ValueError(f"arm {name!r} is a {type(values).__name__}, not a mapping seed -> value: "
                             "Friedman's test pairs arms by seed key, never by position")
    first = next(iter(arms.values()))
    common = [s for s in first if all(s in v for v in arms.values())]
    shared = set(common)
    dropped = {name: [s for s in v if s not in shared] for name, v in arms.items()}
    dropped = {name: seeds for name, seeds in dropped.items() if seeds}
    if dropped and mismatch == "refuse":
        raise ValueError(f"arms have different seeds (seeds not in every arm: {dropped}); "
                         "pass mismatch='intersect' to use the common seeds")
    if len(common) < 2:
        raise ValueError(f"Friedman's test needs at least 2 seeds common to all arms, got {common}")
    m = np.stack([_vector([arms[name][s] for s in common], f"arm {name!r}") for name in arms], axis=1)
    if all(_constant(row) for row in m):
        raise ValueError("Friedman's test is undefined: the arms are tied within every seed")
    res = _st.friedmanchisquare(*m.T)
    return {"chi2": float(res.statistic), "p": float(res.pvalue), "n_seeds": len(common), "seeds": common,
            "dropped": dropped}


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


def compare_arms(a, b, *, delta: float = 0.015, tost_df: str = "welch") -> dict[str, Any]:
    """The paper's two-arm comparison of arm ``a`` against baseline ``b``: summaries, Welch t,
    Levene, Mann–Whitney U, Cohen's d, sd ratio sd(b)/sd(a), TOST (margin ``delta``, df
    ``tost_df``).

    Never raises on the data: a statistic that is undefined for them is ``None`` and
    ``not_computed`` maps its name to the reason (e.g. fewer than 3 seeds, zero variance).
    """
    if tost_df not in TOST_DF:
        raise ValueError(f"unknown TOST df {tost_df!r}; expected one of {TOST_DF}")
    if not delta > 0:
        raise ValueError(f"delta must be positive, got {delta}")
    tests = {"a": lambda: summary(a), "b": lambda: summary(b), "welch_t": lambda: welch_t(a, b),
             "levene": lambda: levene(a, b), "mann_whitney": lambda: mann_whitney(a, b),
             "cohens_d": lambda: cohens_d(a, b), "sd_ratio": lambda: sd_ratio(a, b),
             "tost": lambda: tost_equivalence(a, b, delta=delta, df=tost_df)}
    out: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    for name, fn in tests.items():
        try:
            out[name] = fn()
        except ValueError as exc:
            out[name], reasons[name] = None, str(exc)
    if reasons:
        out["not_computed"] = reasons
    return out
