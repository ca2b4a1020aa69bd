"""Structured orthogonal initialisers (docs/method.md §2–§3), as pure numpy math and Flax initialisers.

Four n×n bases (row ``i``, column ``j``, 0-based), each in a ``reference`` form that
reproduces the published matrices and an exactly ``orthonormal`` form:

- DCT-II:      ``D[i,j] = c_i cos(pi i (2j+1) / (2n))``, ``c_0 = sqrt(1/n)``, ``c_i = sqrt(2/n)``.
- Hadamard:    reference ``H[i,j] = (-1)^popcount(i & j) / sqrt(n)`` (the top-left n×n block of
               the natural-order Sylvester matrix, NOT orthogonal unless n is a power of two);
               orthonormal ``hartley(m) ⊗ sylvester(2^a)`` for ``n = m 2^a``, m odd.
- Hartley:     ``H[i,j] = (cos t + sin t) / sqrt(n)``, ``t = 2 pi i j / n``.
- Sinusoidal:  ``S[i,j] = sqrt(2/n) sin(pi (i+1)(2j+1) / (2n))``; the orthonormal form (DST-II)
               uses ``sqrt(1/n)`` on the last row, the reference form does not.

A basis is mapped onto a weight in PyTorch order (dense ``(out, in)``, conv ``(out, in, k)``,
``(out, in, kh, kw)``), rescaled to std ``1/sqrt(3 fan_in)``, multiplied by an optional fixup
``scale``, transposed to the Flax layout and cast to float32 once.

Bit reproducibility: every value is a composition of IEEE-754 basic operations (``+ - * /``,
``sqrt``, integer arithmetic and gathers) plus :func:`math.fsum` (a correctly rounded sum,
independent of summation order). No libm/SVML trigonometry (its last bit differs between
CPUs), no BLAS, no LAPACK. Cosines of the rational angles ``pi p/q`` are evaluated by exact
integer range reduction to ``[-pi/4, pi/4]`` and a fixed Taylor polynomial in Horner form.
So the same call returns the same bytes on every platform.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import math
import operator
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BASES", "VARIANTS", "STAGES", "INITS", "KEYED_INITS", "MIXED_INITS", "MIXED_SCHEDULE", "FIXUP_SCALE",
    "released_mixed_basis",
    "dct", "hadamard", "hartley", "sinusoidal", "basis", "clear_basis_cache",
    "dense_kernel", "dense_kernel_per_row", "conv1d_kernel", "qkv_kernel", "conv2d_kernel",
    "fan_in_of", "structured", "kernel_init", "bias_init", "kaiming_uniform", "he_normal",
    "Structured", "KaimingUniform", "HeNormal", "UniformBias", "Zeros", "EtfHead",
    "simplex_etf", "etf_head_init", "describe", "format_assignment", "init_description",
    "Assignment", "init_variables", "PendingDraw",
]

BASES = ("dct", "hadamard", "hartley", "sinusoidal")
VARIANTS = ("reference", "orthonormal")
STAGES = ("stem", "stage0", "stage1", "stage2", "stage3", "transformer", "head")
# "mixed": the per-stage schedule the paper describes (MIXED_SCHEDULE, by explicit stage).
# "mixed_as_released": what the released code computes (released_mixed_basis, by module name).
MIXED_INITS = ("mixed", "mixed_as_released")
KEYED_INITS = ("kaiming", "he_normal")  # the inits that draw from the seed's key
INITS = MIXED_INITS + BASES + KEYED_INITS
# Read-only view: the schedule is part of the method, callers must not be able to edit it.
MIXED_SCHEDULE: Mapping[str, str] = types.MappingProxyType({
    "stem": "dct", "stage0": "dct", "stage1": "hadamard", "stage2": "hartley",
    "stage3": "dct", "transformer": "dct", "head": "dct",
})
FIXUP_SCALE = 0.01  # multiplier of the last 1x1 conv of the CNN residual blocks (fixup)
# The released code's "mixed" rule: the first of these substrings found in a module's name
# picks the basis of that stage; a name with none of them gets DCT.
_RELEASED_STAGE_TESTS = (("stage3", "layer3", "dct"), ("stage2", "layer2", "hartley"),
                         ("stage1", "layer1", "hadamard"), ("stage0", "layer0", "dct"))

_EPS_GLOBAL = 1e-8  # added to the sample std in the global (1-D) rescaling
_ZERO_STD = 1e-10  # per-filter (2-D) rescaling: a filter with a smaller std stays zero
_CACHE_MAX_N = 4096  # bases larger than this (128 MiB) are built but not memoised


# ----------------------------------------------------------------------------- exact helpers
def _fsum(values: np.ndarray) -> float:
    """Correctly rounded sum of all entries (order independent, hence platform independent)."""
    # A memoryview of a contiguous float64 array yields Python floats fast (no .tolist()).
    return math.fsum(memoryview(np.ascontiguousarray(values, dtype=np.float64).ravel()))


def _row_fsums(values: np.ndarray) -> np.ndarray:
    """Correctly rounded sum of each row of a 2-D float64 array."""
    rows = np.ascontiguousarray(values, dtype=np.float64)
    return np.array([math.fsum(memoryview(row)) for row in rows], dtype=np.float64)


# Taylor coefficients (-1)^k / (2k)! and (-1)^k / (2k+1)!; on |y| <= pi/4 the first omitted
# terms are below 1e-19, far under half an ulp.
_COS_COEFS = tuple((-1) ** k / math.factorial(2 * k) for k in range(10))
_SIN_COEFS = tuple((-1) ** k / math.factorial(2 * k + 1) for k in range(9))


def _horner(coefs: Sequence[float], z: np.ndarray) -> np.ndarray:
    acc = np.full_like(z, coefs[-1])
    for c in reversed(coefs[:-1]):
        acc = acc * z + c  # separate ufuncs: no FMA contraction, fixed rounding
    return acc


def _cos_sin_pi_table(den: int) -> tuple[np.ndarray, np.ndarray]:
    """``cos(pi r / den)`` and ``sin(pi r / den)`` for ``r = 0 .. 2 den - 1``.

    The angle is reduced exactly in integers to ``y + q pi/2`` with ``|y| <= pi/4``
    (``q = round(2r/den)``, ``y = pi (2r - q den) / (2 den)``), then ``cos y`` and ``sin y``
    come from fixed polynomials. Exact zeros and ones come out exactly (cos(pi/2) == 0).
    """
    r = np.arange(2 * den, dtype=np.int64)
    q = (4 * r + den) // (2 * den)
    res = 2 * r - q * den  # in [-den/2, den/2)
    y = (res.astype(np.float64) * math.pi) / (2.0 * den)
    z = y * y
    c = _horner(_COS_COEFS, z)
    s = y * _horner(_SIN_COEFS, z)
    # At |y| = pi/4 use the correctly rounded sqrt(1/2) for both, so that e.g. the Hartley
    # cas(3 pi/4) = cos + sin is exactly 0 (the two polynomials may differ in the last bit).
    octant = np.abs(2 * res) == den
    c = np.where(octant, math.sqrt(0.5), c)
    s = np.where(octant, np.where(res > 0, math.sqrt(0.5), -math.sqrt(0.5)), s)
    quadrant = q % 4
    cos = np.choose(quadrant, [c, -s, -c, s])
    sin = np.choose(quadrant, [s, c, -s, -c])
    return cos + 0.0, sin + 0.0  # + 0.0 turns -0.0 into +0.0 (hashes see signed zeros)


# ----------------------------------------------------------------------------- validation
def _check_n(n: Any, name: str) -> int:
    try:
        value = operator.index(n)
    except TypeError:
        raise ValueError(f"basis {name!r}: size n must be a positive int, got {n!r}") from None
    if isinstance(n, bool) or value < 1:
        raise ValueError(f"basis {name!r}: size n must be a positive int, got {n!r}")
    return value


def _check_name(name: Any, context: str = "") -> str:
    if name not in BASES:
        raise ValueError(f"unknown basis {name!r}{context}; expected one of {BASES}")
    return name


def _check_variant(variant: Any, name: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(
            f"basis {name!r}: unknown variant {variant!r}; expected one of {VARIANTS}")
    return variant


def _check_scale(scale: Any, who: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise ValueError(f"{who}: scale must be a real number, got {scale!r}")
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"{who}: scale must be finite, got {scale!r}")
    return value


def _check_dims(dims: Sequence[Any], what: str, who: str) -> tuple[int, ...]:
    """Every dimension a positive int, else ValueError naming the initialiser and shape."""
    out = []
    for d in dims:
        try:
            value = operator.index(d)
        except TypeError:
            raise ValueError(f"{who}: {what} {tuple(dims)!r} must hold positive ints") from None
        if isinstance(d, bool) or value < 1:
            raise ValueError(f"{who}: {what} {tuple(dims)!r} must hold positive ints "
                             "(zero-size dimensions cannot carry a basis)")
        out.append(value)
    return tuple(out)


def _check_shape(shape: Any, who: str, ranks: Sequence[int]) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"{who}: shape must be a tuple of ints, got {shape!r}") from None
    if len(dims) not in ranks:
        raise ValueError(f"{who}: unsupported kernel shape {dims!r} (rank {len(dims)}); "
                         f"expected rank in {tuple(ranks)}")
    return _check_dims(dims, "shape", who)


def _check_dtype(dtype: Any, shape: Any, who: str) -> np.dtype:
    """float32, or float64 when jax_enable_x64 is on; anything else raises ValueError."""
    try:
        dt = np.dtype(jnp.dtype(dtype))
    except TypeError:
        raise ValueError(f"{who}: unsupported dtype {dtype!r} for shape {shape!r}") from None
    if dt == np.float32:
        return dt
    if dt == np.float64:
        if jax.config.read("jax_enable_x64"):
            return dt
        raise ValueError(f"{who}: dtype float64 for shape {shape!r} needs "
                         "jax.config.update('jax_enable_x64', True)")
    raise ValueError(f"{who}: unsupported dtype {dt.name} for shape {shape!r}; "
                     "structured and baseline inits produce float32 (or float64 with x64)")


# ----------------------------------------------------------------------------- the four bases
def _build_dct(n: int, variant: str) -> np.ndarray:
    cos, _ = _cos_sin_pi_table(2 * n)
    i = np.arange(n, dtype=np.int64)[:, None]
    j = np.arange(n, dtype=np.int64)[None, :]
    coef = np.full((n, 1), math.sqrt(2.0 / n))
    coef[0, 0] = math.sqrt(1.0 / n)
    return coef * cos[(i * (2 * j + 1)) % (4 * n)]


def _sylvester_signs(n: int) -> np.ndarray:
    """``(-1)^popcount(i & j)``: entry (i, j) of every Sylvester matrix of order > max(i, j)."""
    i = np.arange(n, dtype=np.uint64)[:, None]
    j = np.arange(n, dtype=np.uint64)[None, :]
    parity = (np.bitwise_count(i & j) & 1).astype(np.float64)
    return 1.0 - 2.0 * parity


def _build_hadamard(n: int, variant: str) -> np.ndarray:
    if variant == "reference" or n & (n - 1) == 0:
        return _sylvester_signs(n) / math.sqrt(n)
    # n = m 2^a with m odd: hartley(m) ⊗ sylvester(2^a), row r = q 2^a + p, column c = t 2^a + s.
    a = (n & -n).bit_length() - 1
    m = n >> a
    cos, sin = _cos_sin_pi_table(m)
    cas = cos + sin
    idx = np.arange(n, dtype=np.int64)
    q, p = idx >> a, idx & ((1 << a) - 1)
    cas_qt = cas[(2 * q[:, None] * q[None, :]) % (2 * m)]
    signs = _sylvester_signs(1 << a)[p[:, None], p[None, :]]
    return cas_qt * signs / math.sqrt(n)


def _build_hartley(n: int, variant: str) -> np.ndarray:
    cos, sin = _cos_sin_pi_table(n)
    i = np.arange(n, dtype=np.int64)[:, None]
    j = np.arange(n, dtype=np.int64)[None, :]
    return (cos + sin)[(2 * ((i * j) % n)) % (2 * n)] / math.sqrt(n)


def _build_sinusoidal(n: int, variant: str) -> np.ndarray:
    _, sin = _cos_sin_pi_table(2 * n)
    i = np.arange(n, dtype=np.int64)[:, None]
    j = np.arange(n, dtype=np.int64)[None, :]
    coef = np.full((n, 1), math.sqrt(2.0 / n))
    if variant == "orthonormal":
        coef[-1, 0] = math.sqrt(1.0 / n)  # DST-II: last row × 1/sqrt(2)
    return coef * sin[((i + 1) * (2 * j + 1)) % (4 * n)]


_BUILDERS: Mapping[str, Callable[[int, str], np.ndarray]] = types.MappingProxyType({
    "dct": _build_dct, "hadamard": _build_hadamard,
    "hartley": _build_hartley, "sinusoidal": _build_sinusoidal,
})
_SAME_IN_BOTH_VARIANTS = ("dct", "hartley")


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    view = a.view()  # a view of a read-only base cannot be made writeable again
    view.flags.writeable = False
    return view


@functools.lru_cache(maxsize=32)
def _cached_basis(name: str, n: int, variant: str) -> np.ndarray:
    return _read_only(_BUILDERS[name](n, variant))


def clear_basis_cache() -> None:
    """Empty the memo of built bases (e.g. to time cold builds)."""
    _cached_basis.cache_clear()


def basis(name: str, n: int, variant: str = "reference") -> np.ndarray:
    """The ``n×n`` float64 basis ``name`` (one of :data:`BASES`) in the given variant.

    ``variant="reference"`` (default) reproduces the published matrices (docs/method.md §2);
    ``variant="orthonormal"`` is exactly orthonormal for every n. Results are memoised by
    ``(name, n, variant)`` and returned READ-ONLY; use ``.copy()`` to get a writable array.
    """
    _check_name(name)
    n = _check_n(n, name)
    variant = _check_variant(variant, name)
    if name in _SAME_IN_BOTH_VARIANTS:
        variant = "reference"
    if n > _CACHE_MAX_N:
        return _read_only(_BUILDERS[name](n, variant))
    return _cached_basis(name, n, variant)


def dct(n: int, variant: str = "reference") -> np.ndarray:
    """Orthonormal DCT-II: ``D[i,j] = c_i cos(pi i (2j+1)/(2n))``, ``c_0 = sqrt(1/n)``,
    ``c_i = sqrt(2/n)`` (i > 0). Both variants are this matrix. Read-only float64 ``(n, n)``."""
    return basis("dct", n, variant)


def hadamard(n: int, variant: str = "reference") -> np.ndarray:
    """Natural-order Sylvester–Hadamard basis, read-only float64 ``(n, n)``.

    reference: ``H[i,j] = (-1)^popcount(i & j) / sqrt(n)``, i.e. the top-left n×n block of the
    Sylvester matrix ``[[H, H], [H, -H]]`` of the next power of two, divided by sqrt(n). It is
    orthonormal only when n is a power of two (n = 12: max |H H^T - I| = 1/3).

    orthonormal: for ``n = m 2^a`` with m odd, ``hartley(m) ⊗ sylvester(2^a)/sqrt(2^a)``
    (Kronecker product), i.e. ``B[q 2^a + p, t 2^a + s] = cas(2 pi q t/m) (-1)^popcount(p & s)
    / sqrt(n)``. Equal to the reference for powers of two and to :func:`hartley` for odd n.
    Unlike a block-diagonal direct sum it has no zero entries, so a truncated row is never zero.
    """
    return basis("hadamard", n, variant)


def hartley(n: int, variant: str = "reference") -> np.ndarray:
    """Discrete Hartley basis ``(cos t + sin t)/sqrt(n)``, ``t = 2 pi i j/n``; orthonormal for
    every n, so both variants are this matrix. Read-only float64 ``(n, n)``."""
    return basis("hartley", n, variant)


def sinusoidal(n: int, variant: str = "reference") -> np.ndarray:
    """DST-II-like basis ``S[i,j] = sqrt(2/n) sin(pi (i+1)(2j+1)/(2n))``, read-only float64.

    reference: as published, every row scaled by sqrt(2/n), so the last row has norm sqrt(2).
    orthonormal: the orthonormal DST-II, last row scaled by sqrt(1/n) instead.
    """
    return basis("sinusoidal", n, variant)


# ----------------------------------------------------------------------------- mapping rules
def _truncated_rows(name: str, rows: int, cols: int, variant: str) -> np.ndarray:
    """``B[:rows, :cols]`` of the ``N×N`` basis with ``N = max(rows, cols)`` (float64 copy)."""
    return np.array(basis(name, max(rows, cols), variant)[:rows, :cols], dtype=np.float64)


def _rescale_global(w: np.ndarray, fan_in: int, who: str) -> np.ndarray:
    """``(w - mean) / (std_ddof1 + 1e-8) / sqrt(3 fan_in)`` over the whole tensor."""
    if w.size < 2:
        raise ValueError(f"{who}: the global rescaling needs a sample std (ddof=1) and so at "
                         f"least 2 weights; got PyTorch-order shape {w.shape}")
    centred = w - _fsum(w) / w.size
    std = math.sqrt(_fsum(centred * centred) / (w.size - 1))
    return centred / (std + _EPS_GLOBAL) * (1.0 / math.sqrt(3.0 * fan_in))


def _rescale_per_filter(w: np.ndarray, fan_in: int) -> np.ndarray:
    """Each filter (row of ``w.reshape(out, -1)``) centred, scaled to population std
    ``1/sqrt(3 fan_in)``; a filter with std < 1e-10 becomes exactly zero."""
    flat = w.reshape(w.shape[0], -1)
    centred = flat - (_row_fsums(flat) / flat.shape[1])[:, None]
    std = np.sqrt(_row_fsums(centred * centred) / flat.shape[1])
    dead = std < _ZERO_STD
    safe = np.where(dead, 1.0, std)
    out = centred / safe[:, None] * (1.0 / math.sqrt(3.0 * fan_in))
    out[dead] = 0.0
    return out.reshape(w.shape)


def _dense64(name: str, in_f: int, out_f: int, variant: str, scale: float,
             per_row: bool, who: str) -> np.ndarray:
    w = _truncated_rows(name, out_f, in_f, variant)  # (out, in)
    w = _rescale_per_filter(w, in_f) if per_row else _rescale_global(w, in_f, who)
    return np.ascontiguousarray((w * scale).T)  # Flax (in, out)


def _conv1d64(name: str, k: int, in_ch: int, out_ch: int, variant: str, scale: float,
              per_filter: bool, who: str) -> np.ndarray:
    fan_in = in_ch * k
    # Row-major reshape: flat index c*k + t -> (channel c, tap t), channel outer.
    w = _truncated_rows(name, out_ch, fan_in, variant).reshape(out_ch, in_ch, k)
    w = _rescale_per_filter(w, fan_in) if per_filter else _rescale_global(w, fan_in, who)
    return np.ascontiguousarray((w * scale).transpose(2, 1, 0))  # (out,in,k) -> (k,in,out)


def _conv2d64(name: str, kh: int, kw: int, in_ch: int, out_ch: int, variant: str,
              scale: float) -> np.ndarray:
    n_pat, n_chan = kh * kw, min(in_ch, out_ch)
    f = np.arange(out_ch) % (n_chan * n_pat)  # cyclic repeat when too few were generated
    chan_idx, pat_idx = f // n_pat, f % n_pat
    bh, bw = basis(name, kh, variant), basis(name, kw, variant)
    pattern = bh[pat_idx // kw][:, :, None] * bw[pat_idx % kw][:, None, :]  # (out, kh, kw)
    chan = basis(name, in_ch, variant)[chan_idx]  # (out, in)
    w = chan[:, :, None, None] * pattern[:, None, :, :]  # (out, in, kh, kw)
    w = _rescale_per_filter(w, in_ch * kh * kw)
    return np.ascontiguousarray((w * scale).transpose(2, 3, 1, 0))  # (kh, kw, in, out)


def _prepare(name: Any, dims: Sequence[Any], variant: Any, scale: Any, who: str):
    _check_name(name, f" for shape {tuple(dims)!r}")
    dims = _check_dims(dims, "shape", f"{who}({name!r})")
    return dims, _check_variant(variant, name), _check_scale(scale, who)


def dense_kernel(name: str, in_features: int, out_features: int, *,
                 variant: str = "reference", scale: float = 1.0) -> np.ndarray:
    """1-D-rule Dense kernel, float32 Flax layout ``(in, out)``.

    ``N = max(out, in)``; ``W = B[:out, :in]`` (PyTorch ``(out, in)``); then the whole tensor
    ``W <- (W - mean W) / (std_ddof1 W + 1e-8) / sqrt(3 in) * scale``; transposed.
    """
    (in_f, out_f), variant, scale = _prepare(name, (in_features, out_features), variant, scale,
                                             "dense_kernel")
    return _dense64(name, in_f, out_f, variant, scale, False, "dense_kernel").astype(np.float32)


def dense_kernel_per_row(name: str, in_features: int, out_features: int, *,
                         variant: str = "reference", scale: float = 1.0) -> np.ndarray:
    """2-D-rule Dense kernel (ResNet head), float32 ``(in, out)``: ``W = B[:out, :in]`` with
    ``N = max(out, in)``, each row (output unit) centred and scaled to population std
    ``1/sqrt(3 in)`` (rows with std < 1e-10 become zero), times ``scale``."""
    (in_f, out_f), variant, scale = _prepare(name, (in_features, out_features), variant, scale,
                                             "dense_kernel_per_row")
    return _dense64(name, in_f, out_f, variant, scale, True, "dense_kernel_per_row").astype(
        np.float32)


def conv1d_kernel(name: str, k: int, in_ch: int, out_ch: int, *, variant: str = "reference",
                  scale: float = 1.0, per_filter: bool = False) -> np.ndarray:
    """1-D conv kernel, float32 Flax layout ``(k, in, out)``.

    ``fan_in = in k``, ``N = max(out, fan_in)``; filter ``o`` is row ``o`` of the N×N basis
    truncated to ``fan_in`` entries, entry ``c k + t`` going to channel ``c``, tap ``t``
    (PyTorch ``(out, in, k)``). Rescaling as in :func:`dense_kernel` (or per filter with
    ``per_filter=True``), times ``scale``. Depthwise conv: ``in_ch=1`` (fan_in = k).
    """
    (k, in_ch, out_ch), variant, scale = _prepare(name, (k, in_ch, out_ch), variant, scale,
                                                  "conv1d_kernel")
    return _conv1d64(name, k, in_ch, out_ch, variant, scale, bool(per_filter),
                     "conv1d_kernel").astype(np.float32)


def qkv_kernel(name: str, channels: int, *, variant: str = "reference",
               scale: float = 1.0) -> np.ndarray:
    """Fused q/k/v projection as a 1×1 conv ``C -> 3C`` (so ``N = 3C``): Flax ``(1, C, 3C)``.
    The same numbers as ``dense_kernel(name, C, 3C)[None]``."""
    return conv1d_kernel(name, 1, channels, 3 * channels, variant=variant, scale=scale)


def conv2d_kernel(name: str, kh: int, kw: int, in_ch: int, out_ch: int, *,
                  variant: str = "reference", scale: float = 1.0) -> np.ndarray:
    """Separable 2-D conv kernel, float32 Flax layout ``(kh, kw, in, out)``.

    Spatial patterns ``P_(a kw + b)[u, v] = Bkh[a, u] Bkw[b, v]``; channel vectors: the first
    ``min(in, out)`` rows of the in×in basis; filter ``f = ci (kh kw) + p`` is
    ``chan_ci ⊗ P_p`` (channel-major), taken cyclically when fewer than ``out`` exist. Each
    filter is centred and scaled to population std ``1/sqrt(3 in kh kw)``; one with std
    < 1e-10 (DCT's DC⊗DC) becomes all zeros. Times ``scale``.
    """
    (kh, kw, in_ch, out_ch), variant, scale = _prepare(name, (kh, kw, in_ch, out_ch), variant,
                                                       scale, "conv2d_kernel")
    return _conv2d64(name, kh, kw, in_ch, out_ch, variant, scale).astype(np.float32)


def fan_in_of(shape: Sequence[int]) -> int:
    """Fan-in of a Flax kernel shape: ``prod(shape[:-1])`` (receptive field × in channels)."""
    dims = _check_shape(shape, "fan_in_of", (2, 3, 4))
    return math.prod(dims[:-1])


# ----------------------------------------------------------------------------- Flax initialisers
@dataclasses.dataclass(frozen=True)
class Structured:
    """Deterministic structured kernel initialiser ``(key, shape, dtype) -> Array``.

    The key is ignored. The rule follows ``len(shape)``: 2 → dense ``(in, out)``, 3 → 1-D conv
    ``(k, in, out)``, 4 → separable 2-D conv ``(kh, kw, in, out)``. ``per_filter=None`` picks
    the method's default (global rescaling for dense/1-D, per filter for 2-D); ``True`` gives the
    per-row/per-filter rescaling for dense and 1-D too (ResNet head); ``False`` on a 4-D shape
    is an error. ``stage`` is only recorded (see :func:`describe`).
    """

    name: str
    variant: str = "reference"
    scale: float = 1.0
    stage: str | None = None
    per_filter: bool | None = None

    def __post_init__(self):
        _check_name(self.name)
        _check_variant(self.variant, self.name)
        object.__setattr__(self, "scale", _check_scale(self.scale, f"structured({self.name!r})"))
        if self.stage is not None and self.stage not in STAGES:
            raise ValueError(f"structured({self.name!r}): unknown stage {self.stage!r}; "
                             f"expected one of {STAGES}")
        if self.per_filter not in (None, True, False):
            raise ValueError(f"structured({self.name!r}): per_filter must be None, True or "
                             f"False, got {self.per_filter!r}")

    @property
    def description(self) -> str:
        parts = [f"{self.name}/{self.variant}"]
        if self.stage is not None:
            parts.append(f"stage={self.stage}")
        if self.scale != 1.0:
            parts.append(f"scale={self.scale:g}")
        if self.per_filter is not None:
            parts.append("per-filter" if self.per_filter else "global")
        return " ".join(parts)

    def build(self, shape: Sequence[int]) -> np.ndarray:
        """The float64 kernel in Flax layout (before the single cast)."""
        who = f"structured({self.name!r})"
        dims = _check_shape(shape, who, (2, 3, 4))
        if len(dims) == 2:
            return _dense64(self.name, dims[0], dims[1], self.variant, self.scale,
                            bool(self.per_filter), f"{who} shape {dims}")
        if len(dims) == 3:
            return _conv1d64(self.name, dims[0], dims[1], dims[2], self.variant, self.scale,
                             bool(self.per_filter), f"{who} shape {dims}")
        if self.per_filter is False:
            raise ValueError(f"{who}: the separable 2-D rule for shape {dims} is defined with "
                             "per-filter rescaling only (per_filter=False)")
        return _conv2d64(self.name, *dims, self.variant, self.scale)

    def __call__(self, key: Any, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        del key  # deterministic by construction
        dt = _check_dtype(dtype, tuple(shape) if hasattr(shape, "__iter__") else shape,
                          f"structured({self.name!r})")
        return jnp.asarray(self.build(shape).astype(dt))


def structured(name: str, *, variant: str = "reference", scale: float = 1.0,
               stage: str | None = None, per_filter: bool | None = None) -> Structured:
    """Flax kernel initialiser from basis ``name``.

    Example: ``nn.Conv(40, (5,), kernel_init=structured("dct"))``.
    """
    return Structured(name, variant, scale, stage, per_filter)


def _require_key(key: Any, who: str, shape: Any) -> None:
    if key is None:
        raise ValueError(f"{who}: a PRNG key is required (got None) for shape {shape!r}")


# ----------------------------------------------------------------------------- keyed draws
# Each keyed draw (Kaiming, He-normal, PyTorch's bias) runs as one small jitted program per
# (initialiser, shape, dtype): the same fused kernels inside a model's jitted init and on its
# own, so the bits do not depend on where it runs, and :func:`init_variables` can move the
# draws out of the model's init program (whose compile time grows with every inlined draw).
_PENDING_DRAWS: contextvars.ContextVar[list | None] = contextvars.ContextVar("detjax_pending_draws",
                                                                              default=None)


@functools.lru_cache(maxsize=None)
def _draw_program(init: Any, dims: tuple[int, ...], dtype: np.dtype) -> Callable[[jax.Array], jax.Array]:
    return jax.jit(lambda key: init.sample(key, dims, dtype))


class PendingDraw(flax.struct.PyTreeNode, nn.meta.AxisMetadata):
    """A keyed parameter inside :func:`init_variables`: zeros stand in while the model's init
    is traced; entry ``index`` of the recorded draws replaces it afterwards."""

    placeholder: jax.Array
    index: int = flax.struct.field(pytree_node=False)

    def unbox(self) -> jax.Array:
        return self.placeholder

    def replace_boxed(self, val: jax.Array) -> "PendingDraw":
        return self.replace(placeholder=val)

    def add_axis(self, index: int, params: dict[Any, Any]) -> "PendingDraw":
        return self

    def remove_axis(self, index: int, params: dict[Any, Any]) -> "PendingDraw":
        return self


def _keyed_draw(init: Any, key: Any, dims: tuple[int, ...], dtype: np.dtype) -> Any:
    """``init.sample(key, dims, dtype)`` as its own jitted program; inside :func:`init_variables`
    (concrete key) the draw is recorded and a :class:`PendingDraw` returned instead."""
    pending = _PENDING_DRAWS.get()
    if pending is None or isinstance(key, jax.core.Tracer):
        return _draw_program(init, dims, dtype)(key)
    pending.append((init, key, dims, dtype))
    return PendingDraw(jnp.zeros(dims, dtype), len(pending) - 1)


def _module_init(model: Any) -> Callable:
    # A model with a field named ``init`` shadows the ``Module.init`` method.
    return model.init if callable(getattr(model, "init", None)) else functools.partial(nn.Module.init, model)


@functools.lru_cache(maxsize=16)
def _jitted_init(model: Any, static_kwargs: tuple) -> Callable:
    # Cached by the model's value: every seed (and every call) runs the same compiled program.
    return jax.jit(lambda rngs, *args: _module_init(model)(rngs, *args, **dict(static_kwargs)))


def init_variables(model: Any, rngs: Any, *args: Any, defer_keyed_draws: bool = False, **kwargs: Any) -> Any:
    """``jax.jit(model.init)(rngs, *args, **kwargs)``; with ``defer_keyed_draws``, the same bits
    without compiling one random draw per parameter tensor into the init program.

    Plain: ``rngs`` are arguments of the jitted init, which is cached by the model's value and
    ``kwargs`` (lists become tuples), so every seed runs one compiled program.
    Deferred: the init is traced under :func:`jax.ensure_compile_time_eval`, so Flax derives
    every parameter's key from the concrete ``rngs`` on the host (one ``fold_in`` each); a
    keyed initialiser records ``(key, shape)`` and returns a :class:`PendingDraw`; what is left
    to compile is the deterministic part (structured kernels, zeros, BatchNorm statistics; the
    forward pass is dead code). The recorded draws then run one small jitted program per
    distinct (initialiser, shape, dtype), the very programs a jitted ``model.init`` inlines, so
    the values are the same bits, and later seeds reuse them. It pays when many tensors share
    a shape (the Conformer: 262 draws, 33 programs); with structured initialisers there is
    nothing to defer and the host-side trace only costs time. ``rngs`` must be concrete then.
    """
    if not defer_keyed_draws:
        static = tuple((name, tuple(v) if isinstance(v, list) else v) for name, v in sorted(kwargs.items()))
        return _jitted_init(model, static)(rngs, *args)
    init_fn = _module_init(model)
    pending: list = []
    token = _PENDING_DRAWS.set(pending)
    try:
        def traced_init(*traced):
            with jax.ensure_compile_time_eval():
                return init_fn(rngs, *traced, **kwargs)

        variables = jax.jit(traced_init)(*args)
    finally:
        _PENDING_DRAWS.reset(token)
    drawn = [_draw_program(init, dims, dtype)(key) for init, key, dims, dtype in pending]
    return jax.tree_util.tree_map(lambda leaf: drawn[leaf.index] if isinstance(leaf, PendingDraw) else leaf,
                                  variables, is_leaf=lambda leaf: isinstance(leaf, PendingDraw))


@dataclasses.dataclass(frozen=True)
class KaimingUniform:
    """PyTorch's default weight init, ``kaiming_uniform_(a)``: ``U(±bound)`` with
    ``bound = sqrt(3) gain / sqrt(fan_in)``, ``gain = sqrt(2 / (1 + a^2))``; ``a = sqrt(5)``
    gives ``bound = 1/sqrt(fan_in)``. ``fan_in = prod(shape[:-1])``. Uses the key."""

    a: float = math.sqrt(5.0)
    stage: str | None = None

    @property
    def description(self) -> str:
        a = "sqrt5" if self.a == math.sqrt(5.0) else f"{self.a:g}"
        return f"kaiming_uniform(a={a})" + (f" stage={self.stage}" if self.stage else "")

    def bound(self, shape: Sequence[int]) -> float:
        gain = math.sqrt(2.0 / (1.0 + self.a * self.a))
        return math.sqrt(3.0) * gain / math.sqrt(fan_in_of(shape))

    def __call__(self, key: Any, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        dims = _check_shape(shape, "kaiming_uniform", (2, 3, 4))
        dt = _check_dtype(dtype, dims, "kaiming_uniform")
        _require_key(key, "kaiming_uniform", dims)
        return _keyed_draw(self, key, dims, dt)

    def sample(self, key: jax.Array, dims: tuple[int, ...], dtype: np.dtype) -> jax.Array:
        b = self.bound(dims)
        return jax.random.uniform(key, dims, dtype, minval=-b, maxval=b)


@dataclasses.dataclass(frozen=True)
class HeNormal:
    """He-normal (ResNet baseline): ``N(0, 2/fan_in)``, NOT truncated,
    ``fan_in = prod(shape[:-1])``. Uses the key."""

    stage: str | None = None

    @property
    def description(self) -> str:
        return "he_normal(fan_in, gain=sqrt2)" + (f" stage={self.stage}" if self.stage else "")

    def __call__(self, key: Any, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        dims = _check_shape(shape, "he_normal", (2, 3, 4))
        dt = _check_dtype(dtype, dims, "he_normal")
        _require_key(key, "he_normal", dims)
        return _keyed_draw(self, key, dims, dt)

    def sample(self, key: jax.Array, dims: tuple[int, ...], dtype: np.dtype) -> jax.Array:
        std = math.sqrt(2.0 / fan_in_of(dims))
        return jax.random.normal(key, dims, dtype) * jnp.asarray(std, dtype)


@dataclasses.dataclass(frozen=True)
class UniformBias:
    """PyTorch's default bias init ``U(±1/sqrt(fan_in))`` (fan_in of the layer's weight)."""

    fan_in: int

    @property
    def description(self) -> str:
        return f"uniform(±1/sqrt({self.fan_in}))"

    def __call__(self, key: Any, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        dims = _check_dims(tuple(shape), "shape", "bias_init('kaiming')")
        dt = _check_dtype(dtype, dims, "bias_init('kaiming')")
        _require_key(key, "bias_init('kaiming')", dims)
        return _keyed_draw(self, key, dims, dt)

    def sample(self, key: jax.Array, dims: tuple[int, ...], dtype: np.dtype) -> jax.Array:
        b = 1.0 / math.sqrt(self.fan_in)
        return jax.random.uniform(key, dims, dtype, minval=-b, maxval=b)


@dataclasses.dataclass(frozen=True)
class Zeros:
    """All-zero initialiser (biases of structured and He-normal layers)."""

    @property
    def description(self) -> str:
        return "zeros"

    def __call__(self, key: Any, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        dims = tuple(shape)
        return jnp.zeros(dims, _check_dtype(dtype, dims, "zeros"))


def kaiming_uniform(a: float = math.sqrt(5.0)) -> KaimingUniform:
    """PyTorch-default weight init ``kaiming_uniform_(a=sqrt(5))`` as a seeded Flax initialiser."""
    return KaimingUniform(a)


def he_normal() -> HeNormal:
    """He-normal (fan_in, gain sqrt 2, not truncated) as a seeded Flax initialiser."""
    return HeNormal()


def released_mixed_basis(module_name: str | None) -> str:
    """The basis the released code's "mixed" mode gives the module called ``module_name``.

    The released code tests the module's (PyTorch) name for the substrings ``stage3`` or
    ``layer3``, then ``stage2``/``layer2``, ``stage1``/``layer1``, ``stage0``/``layer0``, and
    maps the first hit s to the basis of stage s (0 DCT, 1 Hadamard, 2 Hartley, 3 DCT); no hit
    (or ``None``) gives DCT. Consequences: the Conformer's modules (``stages.N...``,
    ``conformer_blocks...``) never match, so its released "mixed" weights are all DCT; the
    Baseline's 1-based ``stage1``/``stage2``/``stage3`` get Hadamard/Hartley/DCT; ResNet-18's
    ``layer1``/``layer2`` get Hadamard/Hartley and ``layer3``/``layer4`` DCT.
    """
    name = module_name or ""
    for first, second, basis_name in _RELEASED_STAGE_TESTS:
        if first in name or second in name:
            return basis_name
    return "dct"


def kernel_init(init: str, stage: str, *, scale: float = 1.0, variant: str = "reference",
                per_filter: bool | None = None, released_name: str | None = None):
    """THE kernel initialiser models use, chosen by ``init`` and the layer's explicit ``stage``.

    ``init``: ``"mixed"`` (basis ``MIXED_SCHEDULE[stage]``), ``"mixed_as_released"`` (basis
    ``released_mixed_basis(released_name)``, where ``released_name`` is the layer's module
    name in the released PyTorch code; ``None`` means a name that matches no stage), a basis
    name, ``"kaiming"`` (PyTorch default, ignores ``scale``) or ``"he_normal"`` (ignores
    ``scale``). ``scale`` is the fixup multiplier (:data:`FIXUP_SCALE`).
    """
    if stage not in STAGES:
        raise ValueError(f"kernel_init({init!r}): unknown stage {stage!r}; "
                         f"expected one of {STAGES}")
    if init == "mixed":
        return Structured(MIXED_SCHEDULE[stage], variant, scale, stage, per_filter)
    if init == "mixed_as_released":
        return Structured(released_mixed_basis(released_name), variant, scale, stage, per_filter)
    if init in BASES:
        return Structured(init, variant, scale, stage, per_filter)
    if init == "kaiming":
        return KaimingUniform(stage=stage)
    if init == "he_normal":
        return HeNormal(stage=stage)
    raise ValueError(f"unknown init {init!r} (stage {stage!r}); expected one of {INITS}")


def bias_init(init: str, fan_in: int):
    """Bias initialiser: ``U(±1/sqrt(fan_in))`` for ``"kaiming"``, zeros for every other init
    (structured bases, both mixed schedules, ``"he_normal"``)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r} (bias, fan_in {fan_in!r}); "
                         f"expected one of {INITS}")
    (fan_in,) = _check_dims((fan_in,), "fan_in", f"bias_init({init!r})")
    return UniformBias(fan_in) if init == "kaiming" else Zeros()


# ----------------------------------------------------------------------------- simplex ETF head
def simplex_etf(num_vertices: int = 13, dim: int = 14) -> np.ndarray:
    """Closed-form simplex equiangular tight frame, float64 ``(num_vertices, dim)``.

    With ``K = num_vertices``, the Helmert vectors ``h_m = (1,..,1, -m, 0,..)/sqrt(m(m+1))``
    (m ones, m = 1..K-1) are an orthonormal basis of the sum-zero subspace of R^K. Vertex k is
    ``sqrt(K/(K-1)) (e_k - 1/K)`` in that basis, i.e. ``V[k, m-1] = sqrt(K/((K-1) m (m+1)))``
    times 1 (k < m), -m (k = m) or 0 (k > m); columns ``K-1 ..`` are zero padding. Rows are unit
    vectors with pairwise cosine ``-1/(K-1)``. No SVD: the same bytes everywhere.
    """
    (k_, d_) = _check_dims((num_vertices, dim), "(num_vertices, dim)", "simplex_etf")
    if k_ < 2 or d_ < k_ - 1:
        raise ValueError(f"simplex_etf: need num_vertices >= 2 and dim >= num_vertices - 1, "
                         f"got (num_vertices, dim) = {(num_vertices, dim)!r}")
    k = np.arange(k_)[:, None]
    m = np.arange(1, k_)[None, :]
    coef = np.sqrt(k_ / ((k_ - 1) * (m * (m + 1)).astype(np.float64)))
    helmert = np.where(k < m, coef, np.where(k == m, -m * coef, 0.0))
    out = np.zeros((k_, d_))
    out[:, : k_ - 1] = helmert
    return out


@dataclasses.dataclass(frozen=True)
class EtfHead:
    """Kernel init of head ``k``'s ``Dense(dim -> 1)``: ``(dim, 1)`` = ETF vertex ``k``."""

    k: int
    num_vertices: int = 13
    dim: int = 14

    def __post_init__(self):
        simplex_etf(self.num_vertices, self.dim)  # validates the frame size
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or not (
                0 <= self.k < self.num_vertices):
            raise ValueError(f"etf_head_init: vertex k={self.k!r} out of range "
                             f"[0, {self.num_vertices})")

    @property
    def description(self) -> str:
        return f"simplex_etf(vertex={self.k}, {self.num_vertices}x{self.dim})"

    def __call__(self, key: Any, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        del key
        dims = tuple(shape)
        if dims != (self.dim, 1):
            raise ValueError(f"etf_head_init(k={self.k}): kernel shape {dims!r} must be "
                             f"({self.dim}, 1)")
        dt = _check_dtype(dtype, dims, f"etf_head_init(k={self.k})")
        vertex = simplex_etf(self.num_vertices, self.dim)[self.k]
        return jnp.asarray(vertex[:, None].astype(dt))


def etf_head_init(k: int, num_vertices: int = 13, dim: int = 14) -> EtfHead:
    """Flax kernel init for head ``k``'s ``Dense(dim -> 1)`` (``(dim, 1)`` = vertex ``k``)."""
    return EtfHead(k, num_vertices, dim)


# ----------------------------------------------------------------------------- describe
class Assignment(NamedTuple):
    """One kernel of a model: module path, Flax kernel shape, initialiser description."""

    path: str
    shape: tuple[int, ...]
    init: str


def init_description(fn: Any) -> str:
    """Human-readable description of a kernel initialiser (detjax, jax/flax, or other)."""
    desc = getattr(fn, "description", None)
    if isinstance(desc, str):
        return desc
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    if name.startswith("variance_scaling."):  # jax's lecun/he/glorot closures
        try:
            nl = inspect.getclosurevars(fn).nonlocals
            return (f"variance_scaling(scale={nl['scale']:g}, mode={nl['mode']}, "
                    f"distribution={nl['distribution']})")
        except (KeyError, TypeError, ValueError):
            pass
    return name


def describe(model: Any, *args: Any, **kwargs: Any) -> list[Assignment]:
    """Which initialiser each kernel of ``model`` receives, without allocating parameters.

    Runs ``jax.eval_shape(model.init, jax.random.key(0), *args, **kwargs)`` (``nn.Module.init``
    if a field named ``init`` shadows the method) under
    :func:`flax.linen.intercept_methods`; after each call of a module that has a
    ``kernel_init`` attribute and a ``"kernel"`` parameter, records its path, kernel shape and
    :func:`init_description` of its ``kernel_init``, in call order (shared modules once).
    """
    rows: list[Assignment] = []
    seen: set[tuple[str, ...]] = set()

    def interceptor(next_fun, a, kw, context):
        out = next_fun(*a, **kw)
        module = context.module
        init = getattr(module, "kernel_init", None)
        scope = getattr(module, "scope", None)
        if init is None or scope is None:
            return out
        path = tuple(scope.path)
        if path not in seen and module.has_variable("params", "kernel"):
            seen.add(path)
            shape = tuple(int(d) for d in module.get_variable("params", "kernel").shape)
            rows.append(Assignment("/".join(path) or "/", shape, init_description(init)))
        return out

    with nn.intercept_methods(interceptor):
        jax.eval_shape(_module_init(model), jax.random.key(0), *args, **kwargs)
    return rows


def format_assignment(rows: Sequence[Sequence[Any]]) -> str:
    """Text table (layer | kernel shape | init) of :func:`describe`'s rows."""
    header = ("layer", "kernel shape", "init")
    body = [(str(r[0]), "x".join(str(d) for d in r[1]), str(r[2])) for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(3)]
    fmt = lambda line: "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, body)])
