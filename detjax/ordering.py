"""Golden-ratio batch order with exact integer keys (docs/method.md §5).

The golden order gives every training sample a key in ``[0, 1)``, adds ``e * g`` at epoch
``e`` (modulo 1) and sorts. With ``g = (sqrt(5) - 1) / 2``:

* ECG (content keys):   ``h_i = frac(S_i * g)``, ``S_i = sum |x_i|`` over the normalised
  signal; epoch key ``frac(h_i + e * g)``.
* MedMNIST (index keys): ``frac(i * phi + e * phi^2)``. Because ``phi = 1 + g`` and
  ``phi^2 = 2 + g`` this equals ``frac((i + e) * g)``.

**Exact keys.** A key ``u`` in ``[0, 1)`` is stored as the 64-bit fixed-point integer
``K = floor(u * 2^64)``, split into two ``uint32`` words ``(hi, lo)`` because JAX runs with
x64 disabled. Let ``G = floor(g * 2^64) = 0x9E3779B97F4A7C15`` (odd;
``0 < g - G / 2^64 < 2^-64``). Then

* index keys   ``K_i = (i * G) mod 2^64``: multiplication by an odd constant is a bijection
  of ``Z / 2^64``, so the keys of distinct ``i < 2^64`` never collide (at any ``n``, in
  particular 10^7); ``|K_i / 2^64 - frac(i * g)| < i * 2^-64`` (mod 1);
* content keys ``K_i = floor(2^64 * frac(S_i * g))`` computed with integer arithmetic from the
  *exact* real sum ``S_i`` of the float32 magnitudes (no float rounding anywhere; ``g`` is
  carried to 192 bits, error ``< S_i * 2^-128`` units of the last key bit);
* epoch shift  ``C_e = (e * G) mod 2^64`` and epoch key ``(K_i + C_e) mod 2^64``, a wrapping
  64-bit add (done as two ``uint32`` words with a carry inside ``jit``).

**Sort.** ``lax.sort`` on ``(hi, lo)`` with ``is_stable=True`` carrying ``iota`` along, so
equal keys (identical signal content) are ordered by sample index, deterministically, and
the result is always a permutation of ``0..n-1``.

**Rotation.** Adding ``C`` modulo ``2^64`` maps the keys ``>= 2^64 - C`` to the bottom
and keeps the relative order inside both parts (tie groups move as a whole and keep their
index order), so with ``r = #{i : K_i < 2^64 - C_e}`` the epoch-``e`` order is the epoch-0
order rotated left by ``r``: ``order_e = roll(order_0, -r)``. Every epoch is a rotation of
one fixed order, as docs/method.md §5 states. :func:`golden_schedule` / :func:`scheduled_order`
use it: sort once, then each epoch costs one ``O(n)`` count and a roll instead of a sort.

**Difference from the original.** The reference code sorts float32 keys with an unstable
argsort. float32 has 24 significant bits, so content keys of distinct samples collide beyond
a few thousand samples (birthday bound on ~2^24 values) and golden index keys by 10^7; the
order of colliding (and of truly equal) keys is whatever the sort implementation leaves. Here
keys are exact 64-bit integers, the sort is stable and ties are broken by index, so the order
is a pure function of the data and the epoch. It coincides with the exact real-number order of
the method's keys wherever those keys are more than a few ``(i + e) * 2^-64`` apart, which
for index keys holds at any realistic ``n`` (the smallest gap of the golden sequence at ``N``
points is of order ``1/N``); it therefore differs from the original's float32 order only where
float32 rounding made the original ambiguous or wrong.

The seeded alternative, :func:`seeded_order`, is ``jax.random.permutation`` under the key
``fold_in(key(seed), epoch)``: every (seed, epoch) pair has its own key. The released code
instead keys epoch e of seed s by the integer ``s + e``, so two seeds share most of their
permutations (seeds 2 and 3 share 84 of 85 epochs: seed 3's epoch e is seed 2's epoch e+1),
which narrows the spread a seed study measures. :func:`seeded_order` offers that key scheme
as ``keys="seed_plus_epoch"`` (the trainer's ``order="seeded_as_released"``) so the
release's spread can be reproduced; the permutations themselves are JAX's, not PyTorch's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "GOLDEN_64",
    "GoldenKeys",
    "GoldenSchedule",
    "batches",
    "PAD",
    "epoch_batches",
    "epoch_order",
    "epoch_shift",
    "exact_abs_sums",
    "golden_content_keys",
    "golden_index_keys",
    "golden_schedule",
    "make_order_fn",
    "num_batches",
    "scheduled_order",
    "seeded_order",
    "SEED_KEYS",
    "ORDERS",
]

_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1


def _golden_fixed_point(bits: int) -> int:
    """``floor(g * 2^bits)`` for ``g = (sqrt 5 - 1) / 2``, exactly (integer square root)."""
    return (math.isqrt(5 << (2 * bits)) - (1 << bits)) >> 1


#: ``floor(g * 2^64)``; odd, so ``i -> i * GOLDEN_64 mod 2^64`` is a bijection.
GOLDEN_64 = _golden_fixed_point(64)
_G_HI, _G_LO = GOLDEN_64 >> 32, GOLDEN_64 & _MASK32
# g to 192 bits for content keys: error S * 2^-192 is far below the key's 2^-64 resolution.
_G_BITS = 192
_GOLDEN_WIDE = _golden_fixed_point(_G_BITS)
# A float32 magnitude is M * 2^(E' - 150) with M < 2^24 and E' = max(E, 1) (E: biased
# exponent), so 2^149 * |x| = M * 2^(E' - 1) is an integer.
_F32_SCALE_BITS = 149
# Exact float64 accumulation of 24-bit mantissas needs count * 2^24 < 2^53.
_MAX_VALUES_PER_SAMPLE = 1 << 29


class GoldenKeys(NamedTuple):
    """64-bit fixed-point keys ``K = hi * 2^32 + lo`` (``K / 2^64`` is the key in [0, 1)).

    A pytree of two ``uint32`` arrays of shape ``(n,)``; host (numpy) when built by
    :func:`golden_index_keys` / :func:`golden_content_keys`, device after ``jax.device_put``.
    """

    hi: np.ndarray | jax.Array
    lo: np.ndarray | jax.Array

    @property
    def size(self) -> int:
        """Number of samples ``n``."""
        return int(self.hi.shape[0])

    @classmethod
    def from_uint64(cls, keys) -> GoldenKeys:
        """Split a 1-D ``uint64`` numpy array ``K`` into ``(K >> 32, K & (2^32 - 1))``."""
        keys = np.asarray(keys)
        if keys.dtype != np.uint64 or keys.ndim != 1:
            raise ValueError(
                f"keys must be a 1-D uint64 array, got dtype {keys.dtype} shape {keys.shape}"
            )
        return cls(
            hi=(keys >> np.uint64(32)).astype(np.uint32),
            lo=(keys & np.uint64(_MASK32)).astype(np.uint32),
        )

    def to_uint64(self) -> np.ndarray:
        """The keys as one host ``uint64`` array ``hi * 2^32 + lo``."""
        hi = np.asarray(self.hi).astype(np.uint64)
        lo = np.asarray(self.lo).astype(np.uint64)
        return (hi << np.uint64(32)) | lo


def golden_index_keys(n: int) -> GoldenKeys:
    """Index keys ``K_i = (i * G) mod 2^64``, ``G = floor(g * 2^64)``, for ``i < n``.

    ``K_i / 2^64`` approximates ``frac(i * phi) = frac(i * g)`` to within ``i * 2^-64``.
    ``G`` is odd, hence invertible modulo ``2^64``: ``i * G = j * G (mod 2^64)`` implies
    ``i = j (mod 2^64)``, so keys are collision-free for every ``n < 2^31`` (the int32
    index limit).
    """
    n = _check_size(n, "n")
    keys = np.arange(n, dtype=np.uint64) * np.uint64(GOLDEN_64)  # wraps modulo 2^64
    return GoldenKeys.from_uint64(keys)


def _check_size(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {type(n).__name__} {n!r}")
    n = int(n)
    if not 0 <= n < 2**31:
        raise ValueError(f"{name} must be in [0, 2^31), got {n}")
    return n


def exact_abs_sums(signals) -> list[int]:
    """Exact ``2^149 * S_i`` with ``S_i = sum |x_i|`` for float32 ``signals`` of shape ``(N, ...)``.

    Every float32 magnitude is ``M * 2^(E' - 150)`` (``M < 2^24``), so ``2^149 * S_i`` is an
    integer. Mantissas are summed per (sample, exponent) bucket with ``np.bincount``: the
    partial sums are integers below ``2^53`` and therefore exact in float64 whatever the
    summation order; buckets are then combined with Python integers. The result does not
    depend on numpy's reduction order, SIMD width or version.
    """
    flat = _as_float32_samples(signals)
    n, per_sample = flat.shape
    if per_sample >= _MAX_VALUES_PER_SAMPLE:
        raise ValueError(
            f"signals has {per_sample} values per sample; at most {_MAX_VALUES_PER_SAMPLE - 1} "
            "are supported for exact sums"
        )
    rows_per_chunk = max(1, (1 << 22) // max(per_sample, 1))
    sums: list[int] = []
    for start in range(0, n, rows_per_chunk):
        block = np.ascontiguousarray(flat[start : start + rows_per_chunk])
        sums.extend(_exact_block_sums(block, start))
    return sums


def _as_float32_samples(signals) -> np.ndarray:
    arr = np.asarray(signals)
    if arr.dtype != np.float32:
        raise ValueError(
            f"signals must be float32 (the normalised signals the model sees), got {arr.dtype}"
        )
    if arr.ndim < 2:
        raise ValueError(
            f"signals must have shape (N, ...) with at least one axis per sample, got {arr.shape}"
        )
    return arr.reshape(arr.shape[0], -1)


def _exact_block_sums(block: np.ndarray, first_index: int) -> list[int]:
    bits = block.view(np.uint32) & np.uint32(0x7FFFFFFF)  # drop the sign: |x|
    exponent = bits >> np.uint32(23)
    bad_rows = np.flatnonzero((exponent == 255).any(axis=1))
    if bad_rows.size:
        raise ValueError(
            f"signals[{first_index + int(bad_rows[0])}] contains NaN or inf; "
            "golden content keys need finite signals"
        )
    mantissa = (bits & np.uint32(0x7FFFFF)) | ((exponent > 0).astype(np.uint32) << np.uint32(23))
    exponent = np.maximum(exponent, np.uint32(1)).astype(np.int64)  # subnormals share E' = 1
    rows = block.shape[0]
    bucket = (np.arange(rows, dtype=np.int64)[:, None] * 256 + exponent).ravel()
    totals = np.bincount(
        bucket, weights=mantissa.ravel().astype(np.float64), minlength=rows * 256
    ).reshape(rows, 256)
    out = []
    for row in totals:
        nonzero = np.flatnonzero(row)
        out.append(sum(int(row[e]) << (int(e) - 1) for e in nonzero))
    return out


def golden_content_keys(signals) -> GoldenKeys:
    """Content keys ``K_i = floor(2^64 * frac(S_i * g))``, ``S_i = sum |x_i|`` (exact).

    ``signals``: float32 array ``(N, ...)`` of the *normalised* signals (e.g. ``(N, 1000, 12)``).
    ``S_i`` is the exact real sum (:func:`exact_abs_sums`) and the product with ``g`` is
    evaluated with ``g`` to 192 bits in integer arithmetic, so the key is exact up to an error
    ``< S_i * 2^-128`` of one unit in its last place and independent of platform and numpy
    version. Samples with equal ``S_i`` (e.g. identical signals) get equal keys;
    :func:`epoch_order` orders them by index.
    """
    sums = exact_abs_sums(signals)
    shift = _F32_SCALE_BITS + _G_BITS - 64
    keys = np.array([((s * _GOLDEN_WIDE) >> shift) & _MASK64 for s in sums], dtype=np.uint64)
    return GoldenKeys.from_uint64(keys)


def epoch_shift(epoch: int) -> int:
    """Host value of the epoch shift ``C_e = (e * G) mod 2^64`` (``C_e / 2^64 ~ frac(e * g)``)."""
    return (_check_u32(epoch, "epoch") * GOLDEN_64) & _MASK64


def _u32_scalar(value, name: str):
    """A concrete int checked into ``[0, 2^32)`` as ``np.uint32``; an integer scalar array
    (possibly traced) passes through and is taken modulo ``2^32`` inside ``jit``."""
    if isinstance(value, (jax.Array, np.ndarray)):
        if value.shape != () or not jnp.issubdtype(value.dtype, jnp.integer):
            raise ValueError(
                f"{name} must be an integer scalar, got dtype {value.dtype} shape {value.shape}"
            )
        return value
    return np.uint32(_check_u32(value, name))


def _check_u32(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if not 0 <= value < 2**32:
        raise ValueError(f"{name} must be in [0, 2^32), got {value}")
    return value


def _mul_wide_u32(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Full 64-bit product of uint32 values as ``(high word, low word)``, via 16-bit limbs."""
    m16 = jnp.uint32(0xFFFF)
    s16 = jnp.uint32(16)
    a0, a1 = a & m16, a >> s16
    b0, b1 = b & m16, b >> s16
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1  # each < 2^32
    mid = (p00 >> s16) + (p01 & m16) + (p10 & m16)  # < 3 * 2^16: no overflow
    lo = (p00 & m16) | ((mid & m16) << s16)
    hi = p11 + (p01 >> s16) + (p10 >> s16) + (mid >> s16)
    return hi, lo


def _shift_words(epoch: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(e * G) mod 2^64`` as uint32 words: ``e * G_lo`` (64-bit) plus ``(e * G_hi) << 32``."""
    carry_hi, lo = _mul_wide_u32(epoch, jnp.uint32(_G_LO))
    return carry_hi + epoch * jnp.uint32(_G_HI), lo


@jax.jit
def _epoch_order_jit(keys: GoldenKeys, epoch: jax.Array) -> jax.Array:
    epoch = jnp.asarray(epoch).astype(jnp.uint32)
    shift_hi, shift_lo = _shift_words(epoch)
    lo = keys.lo + shift_lo
    carry = (lo < shift_lo).astype(jnp.uint32)  # wrapped iff the sum is below an addend
    hi = keys.hi + shift_hi + carry
    index = lax.iota(jnp.int32, keys.hi.shape[0])
    *_, order = lax.sort((hi, lo, index), num_keys=2, is_stable=True)
    return order


def epoch_order(keys: GoldenKeys, epoch) -> jax.Array:
    """Golden order at ``epoch``: ``argsort((K + C_e) mod 2^64)``, stable (ties by index).

    Args:
      keys: :class:`GoldenKeys` with ``uint32`` words of shape ``(n,)``, host or device.
      epoch: non-negative int, or a traced integer scalar (then taken modulo ``2^32``).

    Returns:
      ``int32`` array ``(n,)``, a permutation of ``0..n-1``; sample ``order[j]`` is the
      ``j``-th of the epoch. Jit-compiled (one compilation per ``n``); callable under ``jit``.
    """
    hi, lo = keys
    for name, word in (("keys.hi", hi), ("keys.lo", lo)):
        if word.dtype != jnp.uint32 or word.ndim != 1:
            raise ValueError(
                f"{name} must be a 1-D uint32 array, got dtype {word.dtype} shape {word.shape}"
            )
    if hi.shape != lo.shape:
        raise ValueError(f"keys.hi shape {hi.shape} != keys.lo shape {lo.shape}")
    if hi.shape[0] >= 2**31:
        raise ValueError(f"at most 2^31 - 1 samples are supported, got {hi.shape[0]}")
    return _epoch_order_jit(GoldenKeys(hi, lo), _u32_scalar(epoch, "epoch"))


class GoldenSchedule(NamedTuple):
    """The epoch-0 golden order and the keys in that order (built by :func:`golden_schedule`)."""

    order: jax.Array  # int32 (n,): epoch_order(keys, 0)
    hi: jax.Array  # uint32 (n,): keys.hi[order], non-decreasing with lo
    lo: jax.Array  # uint32 (n,): keys.lo[order]


def golden_schedule(keys: GoldenKeys) -> GoldenSchedule:
    """Sort once: the epoch-0 order and the sorted keys, on the device.

    :func:`scheduled_order` then yields every epoch's order by the rotation property in
    ``O(n)`` without sorting; it equals :func:`epoch_order` bit for bit.
    """
    order = epoch_order(keys, 0)
    hi, lo = jax.device_put((keys.hi, keys.lo))
    return GoldenSchedule(order, hi[order], lo[order])


@jax.jit
def _scheduled_order_jit(schedule: GoldenSchedule, epoch: jax.Array) -> jax.Array:
    epoch = jnp.asarray(epoch).astype(jnp.uint32)
    shift_hi, shift_lo = _shift_words(epoch)
    # threshold T = (2^64 - C) mod 2^64 = two's complement of C, in words
    t_lo = ~shift_lo + jnp.uint32(1)
    t_hi = ~shift_hi + (t_lo == 0).astype(jnp.uint32)
    below = (schedule.hi < t_hi) | ((schedule.hi == t_hi) & (schedule.lo < t_lo))
    r = jnp.sum(below, dtype=jnp.int32)  # keys that do not wrap come last after the shift
    return jnp.roll(schedule.order, -r)


def scheduled_order(schedule: GoldenSchedule, epoch) -> jax.Array:
    """Golden order at ``epoch`` from a :class:`GoldenSchedule`, without a sort.

    With ``T = (2^64 - C_e) mod 2^64`` and ``r = #{i : K_i < T}``, returns
    ``roll(order_0, -r)`` (see the rotation property in the module docstring); equal to
    ``epoch_order(keys, epoch)``. ``epoch`` as in :func:`epoch_order`. Jit-compiled.
    """
    return _scheduled_order_jit(schedule, _u32_scalar(epoch, "epoch"))


SEED_KEYS = ("independent", "seed_plus_epoch")


@partial(jax.jit, static_argnums=0)
def _seeded_order_jit(n: int, seed: jax.Array, epoch: jax.Array) -> jax.Array:
    key = jax.random.fold_in(jax.random.key(seed), epoch)
    return jax.random.permutation(key, n)


@partial(jax.jit, static_argnums=0)
def _seed_plus_epoch_order_jit(n: int, seed: jax.Array, epoch: jax.Array) -> jax.Array:
    return jax.random.permutation(jax.random.key(seed + epoch), n)  # uint32: wraps mod 2^32


def seeded_order(n: int, seed, epoch, *, keys: str = "independent") -> jax.Array:
    """Seeded alternative to the golden order: a fresh, reproducible permutation per epoch.

    ``keys="independent"`` (default): ``jax.random.permutation(fold_in(key(seed), epoch), n)``,
    a key of its own for every (seed, epoch). ``keys="seed_plus_epoch"``: the released code's
    scheme, ``permutation(key((seed + epoch) mod 2^32), n)``, so seed ``s`` at epoch ``e``
    equals seed ``s + d`` at epoch ``e - d``.

    The bits depend on the PRNG implementation and ``jax_threefry_partitionable``, which
    :func:`detjax.determinism.configure` pins. ``seed`` and ``epoch`` are non-negative ints
    below 2^32 (or traced integer scalars). Returns ``int32`` ``(n,)``.
    """
    n = _check_size(n, "n")
    if keys not in SEED_KEYS:
        raise ValueError(f"seeded_order: keys must be one of {SEED_KEYS}, got {keys!r}")
    fn = _seeded_order_jit if keys == "independent" else _seed_plus_epoch_order_jit
    return fn(n, _u32_scalar(seed, "seed"), _u32_scalar(epoch, "epoch"))


def num_batches(n: int, batch_size: int) -> int:
    """``ceil(n / batch_size)``: full batches plus the kept (padded) last partial batch."""
    n = _check_size(n, "n")
    batch_size = _check_batch_size(batch_size)
    return -(-n // batch_size)


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return int(batch_size)


def epoch_batches(order: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """Cut ``order`` into ``(full, rest)``; the last partial batch is kept, never dropped.

    ``full`` has shape ``(n // batch_size, batch_size)`` (static, so a ``lax.scan`` over it
    compiles once) and ``rest`` the remaining ``n % batch_size`` indices, in order:
    ``concatenate([full.ravel(), rest]) == order``. Works on traced arrays.
    """
    batch_size = _check_batch_size(batch_size)
    if order.ndim != 1:
        raise ValueError(f"order must be 1-D, got shape {order.shape}")
    n_full = order.shape[0] // batch_size
    cut = n_full * batch_size
    return order[:cut].reshape(n_full, batch_size), order[cut:]


PAD = -1  # the index that marks a padding slot in a batch


def batches(order, batch_size: int) -> list[np.ndarray]:
    """``order`` cut into consecutive batches of ``min(batch_size, n)`` indices, the last one
    filled up with :data:`PAD`: every batch of an epoch has one shape (one compiled step).

    ``order`` is ``int[..., n]``, the samples on the last axis (``[k, n]``: k members' orders,
    cut alike). The last partial batch is kept, never dropped: its real indices come first
    and the train step masks the :data:`PAD` slots (:func:`detjax.train.gather_batch`), so
    the samples and the math are those of the unpadded batch. Returns
    ``num_batches(n, batch_size)`` host ``int32`` arrays.
    """
    order = np.asarray(order, np.int32)
    if order.ndim == 0:
        raise ValueError("order must have a samples axis, got a scalar")
    n = order.shape[-1]
    size = max(min(_check_batch_size(batch_size), n), 1)
    out = []
    for start in range(0, n, size):
        chunk = order[..., start:start + size]
        missing = size - chunk.shape[-1]
        if missing:
            chunk = np.concatenate([chunk, np.full(chunk.shape[:-1] + (missing,), PAD, np.int32)], axis=-1)
        out.append(chunk)
    return out


ORDERS = ("golden", "seeded", "seeded_as_released")


def make_order_fn(
    kind: str, keys_or_n: GoldenKeys | int, *, seed: int | None = None
) -> Callable[[int], jax.Array]:
    """An ``epoch -> order`` function for the trainer.

    Args:
      kind: ``"golden"`` (``keys_or_n`` is :class:`GoldenKeys`, or ``n`` for index keys),
        ``"seeded"`` (independent keys per seed and epoch) or ``"seeded_as_released"`` (keys
        ``seed + epoch``, see :func:`seeded_order`); for both seeded kinds ``keys_or_n`` is
        ``n`` or keys whose size gives ``n``, and ``seed`` is required.
    For ``"golden"`` the keys are sorted once (:func:`golden_schedule`) and each epoch is a
    rotation of that order (:func:`scheduled_order`), equal to :func:`epoch_order`.
    """
    if kind == "golden":
        keys = keys_or_n if isinstance(keys_or_n, GoldenKeys) else golden_index_keys(keys_or_n)
        return partial(scheduled_order, golden_schedule(keys))
    if kind in ("seeded", "seeded_as_released"):
        if seed is None:
            raise ValueError(f"kind={kind!r} needs a seed")
        n = keys_or_n.size if isinstance(keys_or_n, GoldenKeys) else _check_size(keys_or_n, "n")
        keys = "independent" if kind == "seeded" else "seed_plus_epoch"
        return partial(seeded_order, n, seed, keys=keys)
    raise ValueError(f"kind must be one of {ORDERS}, got {kind!r}")
