"""detjax.stats against direct formulas."""

import json
import math
from decimal import Decimal
from pathlib import Path

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
    # Unequal sizes: the pooled sd weights each variance by its df.
    a, b = np.array([1.0, 2, 4]), np.array([2.0, 3, 3, 5, 6])
    pooled = math.sqrt((2 * a.var(ddof=1) + 4 * b.var(ddof=1)) / 6)
    assert stats.cohens_d(a, b) == pytest.approx((a.mean() - b.mean()) / pooled, rel=1e-12)
    with pytest.raises(ValueError, match="zero variance"):
        stats.cohens_d([1, 1], [1, 1])


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
    # df="pooled": the same Welch standard error, df = n_a + n_b - 2.
    pooled = stats.tost_equivalence(a, b, df="pooled")
    assert (pooled["df_method"], pooled["df"], same["df_method"]) == ("pooled", 58.0, "welch")
    assert pooled["se"] == pytest.approx(se, rel=1e-12) and same["df"] == pytest.approx(df, rel=1e-12)
    assert pooled["p_lower"] == pytest.approx(st.t.sf(t_lower, 58), rel=1e-8)
    with pytest.raises(ValueError, match="unknown TOST df"):
        stats.tost_equivalence(a, b, df="student")


SEEDS = (2, 3, 7, 11, 13)
FRIEDMAN_ARMS = {"dct": [0.95, 0.96, 0.94, 0.97, 0.95], "hadamard": [0.94, 0.95, 0.95, 0.96, 0.93],
                 "hartley": [0.96, 0.97, 0.96, 0.98, 0.96]}


def test_friedman_matches_the_rank_formula_without_ties():
    arms = {name: dict(zip(SEEDS, v)) for name, v in FRIEDMAN_ARMS.items()}
    m = np.array(list(FRIEDMAN_ARMS.values())).T  # seeds × arms
    ranks = np.apply_along_axis(st.rankdata, 1, m)
    n, k = m.shape
    chi2 = 12 / (n * k * (k + 1)) * (ranks.sum(axis=0) ** 2).sum() - 3 * n * (k + 1)
    out = stats.friedman(arms)
    assert out["chi2"] == pytest.approx(chi2) and out["n_seeds"] == 5
    assert out["p"] == pytest.approx(st.chi2.sf(chi2, k - 1))
    assert out["seeds"] == list(SEEDS) and out["dropped"] == {}
    with pytest.raises(ValueError, match="at least 3 arms"):
        stats.friedman({"a": {1: 1.0}, "b": {1: 1.0}})


def test_friedman_pairs_by_seed_key_never_by_position():
    arms = {name: dict(zip(SEEDS, v)) for name, v in FRIEDMAN_ARMS.items()}
    reference = stats.friedman(arms)
    # Another insertion order of one arm's seeds: the same pairs, the same statistic.
    shuffled = {**arms, "hadamard": dict(reversed(list(arms["hadamard"].items())))}
    assert stats.friedman(shuffled)["chi2"] == reference["chi2"]
    # Sequences (pairing by position) are refused.
    with pytest.raises(ValueError, match="pairs arms by seed key"):
        stats.friedman(FRIEDMAN_ARMS)
    # Mismatched seeds: refused by default, or reduced to the common seeds, which are reported.
    extra = {**arms, "dct": {**arms["dct"], 99: 0.5}, "hartley": {k: v for k, v in arms["hartley"].items() if k != 2}}
    with pytest.raises(ValueError, match="different seeds"):
        stats.friedman(extra)
    out = stats.friedman(extra, mismatch="intersect")
    assert out["seeds"] == [3, 7, 11, 13] and out["dropped"] == {"dct": [2, 99], "hadamard": [2]}
    by_hand = stats.friedman({k: {s: v[s] for s in (3, 7, 11, 13)} for k, v in arms.items()})
    assert out["chi2"] == by_hand["chi2"]
    with pytest.raises(ValueError, match="at least 2 seeds common"):
        stats.friedman({"a": {1: 0.9}, "b": {1: 0.8}, "c": {1: 0.7}}, mismatch="intersect")
    with pytest.raises(ValueError, match="tied within every seed"):
        stats.friedman({"a": {1: 0.9, 2: 0.8}, "b": {1: 0.9, 2: 0.8}, "c": {1: 0.9, 2: 0.8}})


def test_per_class_table_skips_undefined_aucs():
    m = np.array([[0.9, np.nan], [0.8, 0.5], [1.0, np.nan]])
    table = stats.per_class_table(m, ["SR", "TRIGU"])
    assert table["SR"]["mean"] == pytest.approx(0.9) and table["SR"]["range"] == pytest.approx(0.2)
    assert table["TRIGU"]["n"] == 1 and table["TRIGU"]["min"] == 0.5
    with pytest.raises(ValueError, match=r"\(n_seeds, 3\)"):
        stats.per_class_table(m, ["a", "b", "c"])


def test_compare_arms_and_bad_input():
    out = stats.compare_arms(A, B)
    assert set(out) == {"a", "b", "welch_t", "levene", "mann_whitney", "cohens_d", "sd_ratio", "tost"}
    assert out["a"]["n"] == 8 and out["a"]["sd"] == pytest.approx(A.std(ddof=1))
    assert out["sd_ratio"] == pytest.approx(B.std(ddof=1) / A.std(ddof=1))
    assert out["tost"]["df_method"] == "welch" and stats.compare_arms(A, B, tost_df="pooled")["tost"]["df"] == 14
    with pytest.raises(ValueError, match="NaN"):
        stats.welch_t([0.9, 0.8, float("nan")], B)
    with pytest.raises(ValueError, match="at least 3"):
        stats.welch_t([0.9], B)
    assert stats.summary([0.9])["sd"] is None  # not NaN: one seed has no sd


@pytest.mark.parametrize("fn", [stats.welch_t, stats.levene, stats.tost_equivalence])
def test_two_seeds_per_arm_are_refused(fn):
    # Brown–Forsythe with n = 2 divides by rounding noise (the deviations from the median are equal).
    with pytest.raises(ValueError, match="at least 3 values per arm, got 2 in a"):
        fn([0.95, 0.96], [0.90, 0.97, 0.93])
    with pytest.raises(ValueError, match="at least 3 values per arm, got 2 in b"):
        fn([0.90, 0.97, 0.93], [0.95, 0.96])


def test_levene_refuses_deviations_equal_up_to_rounding():
    # |x - median| is 0.1 for every value of both arms, up to the last bit: W would be ~1e31.
    with pytest.raises(ValueError, match="deviations from the median are equal"):
        stats.levene([0.1, 0.1, 0.3, 0.3], [0.2, 0.2, 0.6, 0.6])
    with pytest.raises(ValueError, match="deviations from the median are equal"):
        stats.levene([0.9, 0.9, 0.9], [0.8, 0.8, 0.8])
    # One constant arm is fine: the other carries the within-arm spread.
    assert 0 < stats.levene([0.9, 0.9, 0.9], [0.8, 0.85, 0.7])["p"] < 1


@pytest.mark.filterwarnings("ignore:Precision loss occurred")
def test_zero_variance_arms_are_named_not_infinite():
    const_a, const_b = [0.9, 0.9, 0.9], [0.8, 0.8, 0.8]
    for fn in (stats.welch_t, stats.cohens_d, stats.tost_equivalence):
        with pytest.raises(ValueError, match="zero variance"):
            fn(const_a, const_b)
    with pytest.raises(ValueError, match="arm a has zero variance"):
        stats.sd_ratio(const_a, [0.8, 0.85, 0.7])
    assert stats.sd_ratio([0.8, 0.85, 0.7], const_a) == 0.0
    with pytest.raises(ValueError, match="all values of both arms are tied"):
        stats.mann_whitney(const_a, const_a)
    # One constant arm: Welch's df is then n - 1 of the other arm, a real df, not a placeholder.
    assert stats.welch_t(const_a, [0.8, 0.85, 0.7, 0.75])["df"] == pytest.approx(3.0)
    out = stats.compare_arms(const_a, const_b)
    assert out["welch_t"] is None and out["cohens_d"] is None and out["tost"] is None
    assert set(out["not_computed"]) == {"welch_t", "levene", "cohens_d", "sd_ratio", "tost"}
    assert out["mann_whitney"]["p"] > 0  # all of a above all of b: U = 0 is defined
    json.dumps(out, allow_nan=False)


def test_mann_whitney_methods():
    small = stats.mann_whitney([0.91, 0.93, 0.95], [0.90, 0.92, 0.94, 0.96])
    assert small["method"] == "exact"
    assert small["p"] == st.mannwhitneyu([0.91, 0.93, 0.95], [0.90, 0.92, 0.94, 0.96], method="exact").pvalue
    tied = stats.mann_whitney([0.91, 0.93, 0.93], [0.90, 0.93, 0.94])
    assert tied["method"] == "asymptotic" and tied["continuity_correction"] is True
    with pytest.raises(ValueError, match="assumes no ties"):
        stats.mann_whitney([0.91, 0.93, 0.93], [0.90, 0.93, 0.94], method="exact")
    with pytest.raises(ValueError, match="unknown Mann"):
        stats.mann_whitney(A, B, method="permutation")


# ----------------------------------------------------------- the paper's printed statistics

PAPER = json.loads((Path(__file__).parent / "data" / "paper_seed_aucs.json").read_text())


def printed(value: float, as_printed: float) -> bool:
    """``value`` rounded to the decimal places of ``as_printed`` (0.0155: 4, 8e-05: 5) equals it."""
    places = -Decimal(repr(as_printed)).as_tuple().exponent
    return bool(round(value, places) == as_printed)


def _arm(name):
    return list(PAPER["auc"][name].values())


def test_which_variants_reproduce_the_printed_values():
    """Mann–Whitney: only the normal approximation with continuity correction gives both printed
    p values (exact: 3e-05 for the Baseline; no correction: 0.027 and 7e-05). Cohen's d: the pooled
    sd (Hedges' g would print 0.80). TOST: df = n_a + n_b - 2 (Welch df prints 0.0006)."""
    printed_stats = PAPER["paper_statistics"]
    conf = _arm("conformer_mixed"), _arm("conformer_kaiming")
    base = _arm("baseline_dct"), _arm("baseline_kaiming")
    mw_conf, mw_base = printed_stats["conformer_mixed_vs_kaiming"]["mann_whitney_p"], \
        printed_stats["baseline_dct_vs_kaiming"]["mann_whitney_p"]
    for method, cc, ok in [("asymptotic", True, True), ("asymptotic", False, False), ("exact", True, False)]:
        p_conf = st.mannwhitneyu(*conf, method=method, use_continuity=cc).pvalue
        p_base = st.mannwhitneyu(*base, method=method, use_continuity=cc).pvalue
        assert (printed(p_conf, mw_conf) and printed(p_base, mw_base)) is ok, (method, cc)
    assert stats.mann_whitney(*base)["method"] == "asymptotic"  # ties: "auto" is the asymptotic test
    d = stats.cohens_d(*conf)
    assert printed(d, 0.82) and not printed(d * (1 - 3 / (4 * 38 - 1)), 0.82)
    assert printed(stats.tost_equivalence(*conf, df="pooled")["p"], 0.0004)
    assert printed(stats.tost_equivalence(*conf, df="welch")["p"], 0.0006)
