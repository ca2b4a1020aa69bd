"""Tests for detjax.ordering: exact golden keys, stable epoch order, rotation, batching."""

import math
from decimal import Decimal, getcontext
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detjax import ordering
from detjax.ordering import GoldenKeys

TWO64 = 1 << 64
# Sizes drawn by the property tests: a fixed set keeps the number of jit compilations small.
SIZES = (1, 2, 3, 5, 64, 127, 1000)
PROPERTY = settings(max_examples=40, deadline=None)


def _golden_fraction(digits: int = 100) -> Fraction:
    """g = (sqrt 5 - 1) / 2 to ``digits`` decimal digits, independent of the module's isqrt."""
    getcontext().prec = digits + 10
    return (Fraction(Decimal(5).sqrt()) - 1) / 2


G_EXACT = _golden_fraction()
G64 = math.floor(G_EXACT * TWO64)


def reference_order(keys_u64: np.ndarray, epoch: int) -> np.ndarray:
    """Pure-numpy reference: stable argsort of ``(K + e * G) mod 2^64`` (uint64 wraps)."""
    shift = np.uint64((epoch * G64) % TWO64)
    return np.lexsort((np.arange(keys_u64.size), keys_u64 + shift)).astype(np.int32)


@st.composite
def uint64_keys(draw):
    """Random uint64 keys, often with ties (drawn from a small pool) and extreme values."""
    n = draw(st.sampled_from(SIZES))
    pool_size = draw(st.sampled_from([1, 2, 3, 10, None]))
    if pool_size is None:
        elements = st.integers(0, TWO64 - 1)
    else:
        pool = draw(st.lists(st.integers(0, TWO64 - 1), min_size=pool_size, max_size=pool_size))
        pool += [0, TWO64 - 1]
        elements = st.sampled_from(pool)
    return np.array(draw(st.lists(elements, min_size=n, max_size=n)), dtype=np.uint64)


epochs = st.one_of(st.integers(0, 100), st.integers(0, 2**32 - 1))


# --------------------------------------------------------------------------- constants
def test_golden_constant_is_floor_of_g_times_2_64_and_odd():
    assert ordering.GOLDEN_64 == G64 == 0x9E3779B97F4A7C15
    assert ordering.GOLDEN_64 % 2 == 1
    assert 0 < G_EXACT - Fraction(G64, TWO64) < Fraction(1, TWO64)


# --------------------------------------------------------------------------- index keys
def test_index_keys_are_i_times_g_mod_2_64():
    n = 5000
    keys = ordering.golden_index_keys(n)
    assert keys.hi.dtype == keys.lo.dtype == np.uint32 and keys.size == n
    expected = [(i * G64) % TWO64 for i in range(n)]
    assert keys.to_uint64().tolist() == expected
    # and they approximate frac(i * phi) to within i * 2^-64
    phi = 1 + G_EXACT
    for i in (1, 2, 1000, 4999):
        assert abs(Fraction(expected[i], TWO64) - (i * phi) % 1) < Fraction(i + 1, TWO64)


def _has_duplicates(values: np.ndarray) -> bool:
    ordered = np.sort(values)
    return bool((ordered[1:] == ordered[:-1]).any())


def test_index_keys_collision_free_at_ten_million_unlike_float32():
    n = 10**7
    keys = ordering.golden_index_keys(n).to_uint64()
    assert not _has_duplicates(keys)
    # bijection: multiplying by G^-1 mod 2^64 recovers every index
    inverse = np.uint64(pow(G64, -1, TWO64))
    np.testing.assert_array_equal(keys * inverse, np.arange(n, dtype=np.uint64))
    # negative control: float32 frac(i * phi), even computed in float64 first, collides
    assert _has_duplicates(np.mod(np.arange(n) * float(1 + G_EXACT), 1.0).astype(np.float32))


def test_content_keys_collision_free_where_float32_keys_collide():
    """float32 frac(S * g) collides beyond a few thousand distinct sums (birthday bound)."""
    n = 10**5
    signals = np.random.default_rng(4).uniform(0, 100, (n, 3)).astype(np.float32)
    distinct_sums = len(set(ordering.exact_abs_sums(signals)))
    assert distinct_sums > n - 1000  # a few exact sums coincide (float32 grid)
    keys = ordering.golden_content_keys(signals).to_uint64()
    assert np.unique(keys).size == distinct_sums  # equal keys exactly where sums are equal
    s64 = np.abs(signals.astype(np.float64)).sum(axis=1)
    f32 = np.mod(s64 * float(G_EXACT), 1.0).astype(np.float32)
    assert np.unique(f32).size < distinct_sums - 100


def test_index_order_equals_exact_real_order_of_method_keys():
    """The order is argsort of frac(i * phi + e * phi^2) computed with exact rationals."""
    n = 1500
    keys = ordering.golden_index_keys(n)
    phi = 1 + G_EXACT
    for epoch in (0, 1, 7, 1234):
        exact = [(i * phi + epoch * phi * phi) % 1 for i in range(n)]
        expected = sorted(range(n), key=exact.__getitem__)
        np.testing.assert_array_equal(np.asarray(ordering.epoch_order(keys, epoch)), expected)


# --------------------------------------------------------------------------- epoch order
@PROPERTY
@given(keys=uint64_keys(), epoch=epochs)
def test_epoch_order_matches_numpy_reference_and_is_a_permutation(keys, epoch):
    order = ordering.epoch_order(GoldenKeys.from_uint64(keys), epoch)
    assert order.dtype == jnp.int32 and order.shape == keys.shape
    np.testing.assert_array_equal(np.sort(np.asarray(order)), np.arange(keys.size))
    np.testing.assert_array_equal(np.asarray(order), reference_order(keys, epoch))


@PROPERTY
@given(keys=uint64_keys(), epoch=epochs)
def test_each_epoch_is_a_rotation_of_epoch_zero(keys, epoch):
    """Sorted order of (K + C) mod 2^64 = sorted order of K rotated left by #{K < 2^64 - C}."""
    golden = GoldenKeys.from_uint64(keys)
    shift = (epoch * G64) % TWO64
    r = int(np.count_nonzero(keys < np.uint64(TWO64 - shift))) if shift else keys.size
    np.testing.assert_array_equal(
        np.asarray(ordering.epoch_order(golden, epoch)),
        np.roll(np.asarray(ordering.epoch_order(golden, 0)), -r),
    )


@settings(max_examples=25, deadline=None)
@given(keys=uint64_keys(), epochs=st.lists(epochs, min_size=1, max_size=4))
def test_scheduled_order_equals_epoch_order(keys, epochs):
    """Sort once + rotate (the trainer's path) gives the sorted order bit for bit."""
    golden = GoldenKeys.from_uint64(keys)
    schedule = ordering.golden_schedule(golden)
    for epoch in [0, *epochs]:
        np.testing.assert_array_equal(
            ordering.scheduled_order(schedule, epoch), ordering.epoch_order(golden, epoch)
        )


def test_ties_are_broken_by_index_in_every_epoch():
    keys = np.array([5, 3, 5, 3, 5, TWO64 - 1, 3], dtype=np.uint64)
    golden = GoldenKeys.from_uint64(keys)
    np.testing.assert_array_equal(ordering.epoch_order(golden, 0), [1, 3, 6, 0, 2, 4, 5])
    for epoch in (1, 2, 3, 99):
        order = np.asarray(ordering.epoch_order(golden, epoch)).tolist()
        for value in (3, 5):
            tied = [i for i in order if keys[i] == value]
            assert tied == sorted(tied)
            first = order.index(tied[0])
            assert order[first : first + len(tied)] == tied  # contiguous
    same = GoldenKeys.from_uint64(np.full(9, 12345, dtype=np.uint64))
    np.testing.assert_array_equal(ordering.epoch_order(same, 17), np.arange(9))


def test_epoch_shift_and_carry_at_the_wrap():
    # lo word wraps and carries into hi: keys just below 2^32 and 2^64
    keys = np.array([2**32 - 1, TWO64 - 1, 0, 2**63], dtype=np.uint64)
    for epoch in (1, 2, 2**32 - 1):
        assert ordering.epoch_shift(epoch) == (epoch * G64) % TWO64
        np.testing.assert_array_equal(
            ordering.epoch_order(GoldenKeys.from_uint64(keys), epoch), reference_order(keys, epoch)
        )


@settings(max_examples=200, deadline=None)
@given(a=st.integers(0, 2**32 - 1), b=st.integers(0, 2**32 - 1))
def test_wide_multiply_matches_python_integers(a, b):
    hi, lo = ordering._mul_wide_u32(jnp.uint32(a), jnp.uint32(b))
    assert (int(hi) << 32) | int(lo) == a * b


def test_epoch_may_be_traced_under_jit_and_vmap():
    keys = jax.device_put(ordering.golden_index_keys(300))
    jitted = jax.jit(ordering.epoch_order)
    for epoch in (0, 3, 1000):
        expected = np.asarray(ordering.epoch_order(keys, epoch))
        np.testing.assert_array_equal(jitted(keys, jnp.int32(epoch)), expected)
    stacked = jax.vmap(lambda e: ordering.epoch_order(keys, e))(jnp.arange(4))
    for epoch in range(4):
        np.testing.assert_array_equal(stacked[epoch], ordering.epoch_order(keys, epoch))


def test_epoch_order_rejects_bad_inputs():
    keys = ordering.golden_index_keys(4)
    for bad in (-1, 2**32, 1.5, True, jnp.float32(1.0), jnp.arange(2)):
        with pytest.raises(ValueError, match="epoch"):
            ordering.epoch_order(keys, bad)
    with pytest.raises(ValueError, match="keys.hi"):
        ordering.epoch_order(GoldenKeys(keys.hi.astype(np.int32), keys.lo), 0)
    with pytest.raises(ValueError, match="shape"):
        ordering.epoch_order(GoldenKeys(keys.hi, keys.lo[:3]), 0)
    with pytest.raises(ValueError, match="uint64"):
        GoldenKeys.from_uint64(np.arange(3))
    with pytest.raises(ValueError, match="n must"):
        ordering.golden_index_keys(-1)


# --------------------------------------------------------------------------- content keys
def _reference_content_key(signal: np.ndarray) -> int:
    """floor(2^64 * frac(S * g)) with S = sum |x| as an exact rational."""
    s = sum(Fraction(float(v)) for v in np.abs(signal.astype(np.float64)).ravel())
    return math.floor(((s * G_EXACT) % 1) * TWO64)


def test_content_keys_match_exact_definition():
    rng = np.random.default_rng(0)
    signals = rng.standard_normal((6, 50, 3)).astype(np.float32)
    signals[1] *= np.float32(1e-30)  # tiny values
    signals[2, :5] = np.float32(1e-45)  # subnormals
    signals[3] *= np.float32(1e6)  # large
    signals[4] = 0.0  # S = 0 -> key 0
    signals[5, ::2] = -signals[5, ::2]
    keys = ordering.golden_content_keys(signals).to_uint64().tolist()
    assert keys == [_reference_content_key(x) for x in signals]
    assert keys[4] == 0


def test_exact_abs_sums_agree_with_correctly_rounded_fsum():
    rng = np.random.default_rng(1)
    signals = (rng.standard_normal((4, 1000, 12)) * 10.0 ** rng.integers(-8, 8, (4, 1, 12)))
    signals = signals.astype(np.float32)
    for s, x in zip(ordering.exact_abs_sums(signals), signals):
        assert float(Fraction(s, 2**149)) == math.fsum(np.abs(x.astype(np.float64)).ravel())


def test_content_keys_do_not_depend_on_chunking():
    rng = np.random.default_rng(2)
    signals = rng.standard_normal((5, 2**20 + 1)).astype(np.float32)  # 3 rows per chunk
    together = ordering.golden_content_keys(signals).to_uint64()
    one_by_one = [ordering.golden_content_keys(x[None]).to_uint64()[0] for x in signals]
    np.testing.assert_array_equal(together, one_by_one)


def test_equal_content_is_tied_and_ordered_by_index():
    rng = np.random.default_rng(3)
    signals = rng.standard_normal((10, 100, 2)).astype(np.float32)
    signals[7] = signals[3]  # identical signal
    signals[5] = -signals[3][::-1]  # same magnitudes, other order: same S
    keys = ordering.golden_content_keys(signals)
    u = keys.to_uint64()
    assert u[3] == u[5] == u[7] and np.unique(u).size == 8
    for epoch in (0, 1, 5):
        order = np.asarray(ordering.epoch_order(keys, epoch)).tolist()
        at = order.index(3)
        assert order[at : at + 3] == [3, 5, 7]


def test_content_keys_reject_bad_signals():
    with pytest.raises(ValueError, match="float32"):
        ordering.golden_content_keys(np.zeros((2, 10)))
    with pytest.raises(ValueError, match="shape"):
        ordering.golden_content_keys(np.zeros(10, np.float32))
    bad = np.zeros((4, 10), np.float32)
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match=r"signals\[2\]"):
        ordering.golden_content_keys(bad)
    bad[2, 3], bad[3, 0] = 0.0, -np.inf
    with pytest.raises(ValueError, match=r"signals\[3\]"):
        ordering.golden_content_keys(bad)


# --------------------------------------------------------------------------- seeded order
def test_seeded_order_is_reproducible_and_fresh_per_epoch():
    n = 1000
    orders = [np.asarray(ordering.seeded_order(n, 42, e)) for e in range(4)]
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(n))
    assert all(not np.array_equal(a, b) for i, a in enumerate(orders) for b in orders[i + 1 :])
    np.testing.assert_array_equal(ordering.seeded_order(n, 42, 2), orders[2])
    direct = jax.random.permutation(jax.random.fold_in(jax.random.key(42), 2), n)
    np.testing.assert_array_equal(orders[2], direct)
    assert not np.array_equal(ordering.seeded_order(n, 43, 2), orders[2])
    with pytest.raises(ValueError, match="seed"):
        ordering.seeded_order(n, -1, 0)


def test_seed_plus_epoch_keys_share_permutations_across_seeds():
    # The released scheme keys (seed s, epoch e) by s + e: seeds 2 and 3 share 84 of 85 epochs.
    n, epochs = 300, 85
    two = [np.asarray(ordering.seeded_order(n, 2, e, keys="seed_plus_epoch")) for e in range(epochs)]
    three = [np.asarray(ordering.seeded_order(n, 3, e, keys="seed_plus_epoch")) for e in range(epochs)]
    shared = sum(any(np.array_equal(a, b) for b in two) for a in three)
    assert shared == 84
    np.testing.assert_array_equal(three[0], two[1])
    np.testing.assert_array_equal(two[5], jax.random.permutation(jax.random.key(7), n))
    np.testing.assert_array_equal(np.sort(two[5]), np.arange(n))
    # the default keys share nothing
    indep = [np.asarray(ordering.seeded_order(n, 3, e)) for e in range(4)]
    assert not any(np.array_equal(a, b) for a in indep for b in two[:6])
    with pytest.raises(ValueError, match="keys"):
        ordering.seeded_order(n, 2, 0, keys="torch")


# --------------------------------------------------------------------------- batching
@PROPERTY
@given(n=st.integers(0, 700), batch_size=st.integers(1, 200))
def test_batches_keep_the_last_partial_batch_padded_to_one_shape(n, batch_size):
    order = np.arange(n, dtype=np.int32)[::-1]
    parts = ordering.batches(order, batch_size)
    assert len(parts) == ordering.num_batches(n, batch_size) == math.ceil(n / batch_size)
    assert {p.shape for p in parts} <= {(min(batch_size, n),)}  # one shape: one compiled step
    joined = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    real = joined[joined != ordering.PAD]
    np.testing.assert_array_equal(real, order)  # every sample once, in order, none dropped
    assert np.all(joined[real.size:] == ordering.PAD)  # the padding is at the end
    full, rest = ordering.epoch_batches(order, batch_size)
    assert full.shape == (n // batch_size, batch_size) and rest.shape == (n % batch_size,)
    np.testing.assert_array_equal(np.concatenate([full.ravel(), rest]), order)


def test_batches_of_a_device_order_of_stacked_orders_and_under_jit():
    order = ordering.epoch_order(ordering.golden_index_keys(300), 2)
    parts = ordering.batches(order, 128)
    assert [p.shape for p in parts] == [(128,)] * 3 and parts[-1].dtype == np.int32
    np.testing.assert_array_equal(np.concatenate(parts)[:300], order)
    assert np.all(parts[-1][44:] == ordering.PAD)
    full, rest = jax.jit(ordering.epoch_batches, static_argnums=1)(order, 128)
    np.testing.assert_array_equal(full, np.asarray(order)[:256].reshape(2, 128))
    np.testing.assert_array_equal(rest, np.asarray(order)[256:])
    assert ordering.batches(order, 100)[-1].tolist() == np.asarray(order)[200:].tolist()  # exact multiple
    assert len(ordering.batches(order, 100)) == 3
    assert [b.tolist() for b in ordering.batches(np.arange(3), 8)] == [[0, 1, 2]]  # n < batch: no padding
    stacked = ordering.batches(np.stack([np.arange(5), np.arange(5)[::-1]]), 2)  # k members, cut alike
    assert [b.shape for b in stacked] == [(2, 2)] * 3
    assert stacked[-1].tolist() == [[4, ordering.PAD], [0, ordering.PAD]]


def test_batching_rejects_bad_batch_size():
    for bad in (0, -3, 2.0):
        with pytest.raises(ValueError, match="batch_size"):
            ordering.num_batches(10, bad)
        with pytest.raises(ValueError, match="batch_size"):
            ordering.batches(np.arange(4), bad)
    with pytest.raises(ValueError, match="samples axis"):
        ordering.batches(np.int32(3), 2)


# --------------------------------------------------------------------------- order functions
def test_make_order_fn():
    n = 257
    golden_n = ordering.make_order_fn("golden", n)
    keys = ordering.golden_index_keys(n)
    golden_keys = ordering.make_order_fn("golden", keys)
    seeded = ordering.make_order_fn("seeded", keys, seed=7)
    for epoch in (0, 4):
        expected = np.asarray(ordering.epoch_order(keys, epoch))
        np.testing.assert_array_equal(golden_n(epoch), expected)
        np.testing.assert_array_equal(golden_keys(epoch), expected)
        np.testing.assert_array_equal(seeded(epoch), ordering.seeded_order(n, 7, epoch))
    released = ordering.make_order_fn("seeded_as_released", n, seed=7)
    np.testing.assert_array_equal(released(3), ordering.seeded_order(n, 7, 3, keys="seed_plus_epoch"))
    with pytest.raises(ValueError, match="seed"):
        ordering.make_order_fn("seeded", n)
    with pytest.raises(ValueError, match="seed"):
        ordering.make_order_fn("seeded_as_released", n)
    with pytest.raises(ValueError, match="kind"):
        ordering.make_order_fn("shuffle", n)
