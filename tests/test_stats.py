"""detjax.stats against direct formulas."""

import math

import numpy as np
import pytest
from scipy import stats as st

from detjax import stats

A = np.array([0.951, 0.958, 0.962, 0.955, 0.960, 0.957, 0.949, 0.963])
B = np.array([0.940, 0.955, 0.948, 0.962, 0.931, 0.950, 0.957, 0.944])


def test_welch_t_matches_the_formula():
    va, vb = A.var(ddof=1) / A.size, B.var(ddof=1) / B.size
    t = (A.mean() - B.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (A.size - 1) + vb ** 2 / (B.size - 1))
    p = 2 * st.t.sf(abs(t), df)
    out = stats.welch_t(A, B)
    assert out["t"] == pytest.approx(t, rel=1e-12) and out["df"] == pytest.approx(df, rel=1e-12)
    assert out["p"] == pytest.approx(p, rel=1e-9)


def test_levene_is_brown_forsythe_anova_on_median_deviations():
    za, zb = np.abs(A - np.median(A)), np.abs(B - np.median(B))
    z = np.concatenate([za, zb])
    n, k = z.size, 2
    between = A.size * (za.mean() - z.mean()) ** 2 + B.size * (zb.mean() - z.mean()) ** 2
    within = ((za - za.mean()) ** 2).sum() + ((zb - zb.mean()) ** 2).sum()
    w = (n - k) / (k - 1) * between / within
    assert stats.levene(A, B)["W"] == pytest.approx(w, rel=1e-12)


def test_mann_whitney_u_counts_pairs():
    u = sum((x > y) + 0.5 * (x == y) for x in A for y in B)
    out = stats.mann_whitney(A, B)
    assert out["U"] == u and 0 < out["p"] < 1


def test_cohens_d_hand_example():
    assert stats.cohens_d([1, 2, 3], [2, 3, 4]) == pytest.approx(-1.0)
    assert stats.cohens_d([1, 1], [1, 1]) == 0.0


def test_tost_equivalence():
    rng = np.random.default_rng(0)
    x = 0.95 + 0.003 * rng.standard_normal(30)
    same = stats.tost_equivalence(x, x + 0.001)
    assert same["equivalent"] and same["p"] == max(same["p_lower"], same["p_upper"])
    far = stats.tost_equivalence(x, x + 0.05)
    assert not far["equivalent"] and far["p"] > 0.5
    # The lower one-sided test by hand: H1 mean(a) - mean(b) > -delta.
    a, b = x, x + 0.001
    se = math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    t_lower = (a.mean() - b.mean() + 0.015) / se
    df = stats.welch_t(a, b)["df"]
    assert same["p_lower"] == pytest.approx(st.t.sf(t_lower, df), rel=1e-8)
    with pytest.raises(ValueError, match="delta"):
        stats.tost_equivalence(a, b, delta=0)


def test_friedman_matches_the_rank_formula_without_ties():
    arms = {"dct": [0.95, 0.96, 0.94, 0.97, 0.95], "hadamard": [0.94, 0.95, 0.95, 0.96, 0.93],
            "hartley": [0.96, 0.97, 0.96, 0.98, 0.96]}
    m = np.array(list(arms.values())).T  # seeds × arms
    ranks = np.apply_along_axis(st.rankdata, 1, m)
    n, k = m.shape
    chi2 = 12 / (n * k * (k + 1)) * (ranks.sum(axis=0) ** 2).sum() - 3 * n * (k + 1)
    out = stats.friedman(arms)
    assert out["chi2"] == pytest.approx(chi2) and out["n_seeds"] == 5
    assert out["p"] == pytest.approx(st.chi2.sf(chi2, k - 1))
    with pytest.raises(ValueError, match="at least 3 arms"):
        stats.friedman({"a": [1, 2], "b": [1, 2]})
    with pytest.raises(ValueError, match="paired"):
        stats.friedman({"a": [1, 2, 3], "b": [1, 2], "c": [1, 2, 3]})


def test_per_class_table_skips_undefined_aucs():
    m = np.array([[0.9, np.nan], [0.8, 0.5], [1.0, np.nan]])
    table = stats.per_class_table(m, ["SR", "TRIGU"])
    assert table["SR"]["mean"] == pytest.approx(0.9) and table["SR"]["range"] == pytest.approx(0.2)
    assert table["TRIGU"]["n"] == 1 and table["TRIGU"]["min"] == 0.5
    with pytest.raises(ValueError, match=r"\(n_seeds, 3\)"):
        stats.per_class_table(m, ["a", "b", "c"])


def test_compare_arms_and_bad_input():
    out = stats.compare_arms(A, B)
    assert set(out) == {"a", "b", "welch_t", "levene", "mann_whitney", "cohens_d", "tost"}
    assert out["a"]["n"] == 8 and out["a"]["sd"] == pytest.approx(A.std(ddof=1))
    with pytest.raises(ValueError, match="NaN"):
        stats.welch_t([0.9, float("nan")], B)
    with pytest.raises(ValueError, match="at least 2"):
        stats.welch_t([0.9], B)
