"""Tests of detjax.initializers against independent constructions (docs/method.md §2–§3)."""

import hashlib
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

import detjax.initializers as di

ORTHO_TOL = 1e-13


def sha256(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(a)).tobytes()).hexdigest()


# Independent constructions: plain loops over the published formulas, angles reduced exactly
# with integers before calling math.cos / math.sin (so the reference itself is accurate).
def dct_loops(n):
    out = np.empty((n, n))
    for i in range(n):
        c = math.sqrt((1.0 if i == 0 else 2.0) / n)
        for j in range(n):
            out[i, j] = c * math.cos(math.pi * ((i * (2 * j + 1)) % (4 * n)) / (2 * n))
    return out


def hartley_loops(n):
    out = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            t = 2 * math.pi * ((i * j) % n) / n
            out[i, j] = (math.cos(t) + math.sin(t)) / math.sqrt(n)
    return out


def sinusoidal_loops(n, last_row_scale=1.0):
    out = np.empty((n, n))
    for i in range(n):
        c = math.sqrt(2.0 / n) * (last_row_scale if i == n - 1 else 1.0)
        for j in range(n):
            out[i, j] = c * math.sin(math.pi * (((i + 1) * (2 * j + 1)) % (4 * n)) / (2 * n))
    return out


def sylvester_doubling(n):
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h[:n, :n] / np.sqrt(n)


SIZES = [1, 2, 3, 4, 5, 7, 8, 12, 13, 40, 64, 100]


# ----------------------------------------------------------------------------- bases
@pytest.mark.parametrize("n", SIZES)
def test_dct_matches_scipy_dct2_ortho(n):
    ref = scipy.fft.dct(np.eye(n), type=2, norm="ortho", axis=0)
    np.testing.assert_allclose(di.dct(n), ref, rtol=0, atol=1e-15)
    np.testing.assert_allclose(di.dct(n), dct_loops(n), rtol=0, atol=1e-15)
    assert np.array_equal(di.dct(n, "orthonormal"), di.dct(n))


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 64, 256])
def test_hadamard_power_of_two_is_scipy_sylvester(n):
    expected = scipy.linalg.hadamard(n) / np.sqrt(n)
    assert np.array_equal(di.hadamard(n), expected)
    assert np.array_equal(di.hadamard(n, "orthonormal"), expected)


@pytest.mark.parametrize("n", [3, 5, 6, 12, 40, 100, 160])
def test_hadamard_reference_is_top_left_block_of_next_sylvester(n):
    assert np.array_equal(di.hadamard(n), sylvester_doubling(n))


def test_hadamard_reference_is_not_orthogonal_for_n12():
    h = di.hadamard(12)
    err = np.abs(h @ h.T - np.eye(12)).max()
    assert err == pytest.approx(1.0 / 3.0, abs=1e-15)  # published matrix: far from orthogonal
    # rows 0 and 8 of H16 truncated to 12 entries: (8 pluses - 4 minuses) / 12 = 1/3
    assert (h @ h.T)[0, 8] == pytest.approx(1.0 / 3.0, abs=1e-15)
    np.testing.assert_allclose(np.diag(h @ h.T), 1.0, atol=1e-15)  # rows still unit norm


@pytest.mark.parametrize("n", [3, 5, 6, 12, 40, 160, 200, 480])
def test_hadamard_orthonormal_is_hartley_kron_sylvester(n):
    a = (n & -n).bit_length() - 1
    m = n >> a
    expected = np.kron(hartley_loops(m), scipy.linalg.hadamard(1 << a) / np.sqrt(1 << a))
    np.testing.assert_allclose(di.hadamard(n, "orthonormal"), expected, rtol=0, atol=1e-15)
    if a == 0:
        assert np.array_equal(di.hadamard(n, "orthonormal"), di.hartley(n))


@pytest.mark.parametrize("n", SIZES)
def test_hartley_matches_formula(n):
    np.testing.assert_allclose(di.hartley(n), hartley_loops(n), rtol=0, atol=1e-15)
    assert np.array_equal(di.hartley(n, "orthonormal"), di.hartley(n))


@pytest.mark.parametrize("n", SIZES)
def test_sinusoidal_reference_and_orthonormal(n):
    np.testing.assert_allclose(di.sinusoidal(n), sinusoidal_loops(n), rtol=0, atol=1e-15)
    ortho = di.sinusoidal(n, "orthonormal")
    np.testing.assert_allclose(ortho, sinusoidal_loops(n, 1 / math.sqrt(2)), rtol=0, atol=1e-15)
    ref = scipy.fft.dst(np.eye(n), type=2, norm="ortho", axis=0)
    np.testing.assert_allclose(ortho, ref, rtol=0, atol=1e-15)
    # only the last row differs between the variants
    assert np.array_equal(ortho[:-1], di.sinusoidal(n)[:-1])


def test_reference_sinusoidal_last_row_norm_is_sqrt2():
    for n in (2, 12, 64):
        s = di.sinusoidal(n)
        assert np.linalg.norm(s[-1]) == pytest.approx(math.sqrt(2), abs=1e-14)
        np.testing.assert_allclose(np.linalg.norm(s[:-1], axis=1), 1.0, atol=1e-14)


def test_exact_special_values():
    # exact integer range reduction: cos(pi/2) is exactly +0.0, cos(pi/4) exactly sqrt(1/2)
    d3 = di.dct(3)
    assert d3[1, 1] == 0.0 and not np.signbit(d3[1, 1])
    assert di.dct(2)[1, 0] == math.sqrt(0.5) and di.dct(2)[1, 1] == -math.sqrt(0.5)
    assert di.hartley(8)[3, 1] == 0.0  # cas(3 pi/4) = 0 exactly
    assert di.hartley(4)[1, 3] == -0.5  # cas(3 pi/2)/2
    for name in di.BASES:
        for v in di.VARIANTS:
            assert not np.signbit(di.basis(name, 24, v)[di.basis(name, 24, v) == 0]).any()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(min_value=1, max_value=300))
def test_orthonormal_variants_are_orthonormal(n):
    for name in di.BASES:
        b = di.basis(name, n, "orthonormal")
        assert b.shape == (n, n) and b.dtype == np.float64
        assert np.abs(b @ b.T - np.eye(n)).max() < ORTHO_TOL, name
        assert np.abs(b.T @ b - np.eye(n)).max() < ORTHO_TOL, name


def test_basis_cache_returns_read_only_shared_arrays():
    di.clear_basis_cache()
    a = di.basis("hartley", 33)
    b = di.hartley(33, "orthonormal")  # same matrix, same cache entry
    assert np.shares_memory(a, b)
    with pytest.raises(ValueError):
        a[0, 0] = 5.0
    with pytest.raises(ValueError):
        a.flags.writeable = True
    c = a.copy()
    c[0, 0] = 5.0
    assert di.basis("hartley", 33)[0, 0] == 1 / math.sqrt(33)


# ----------------------------------------------------------------------------- mapping rules
def rescale_global_np(w, fan_in):
    c = w - w.mean()
    return c / (c.std(ddof=1) + 1e-8) / np.sqrt(3 * fan_in)


def rescale_per_filter_np(w, fan_in):
    flat = w.reshape(w.shape[0], -1)
    c = flat - flat.mean(axis=1, keepdims=True)
    std = c.std(axis=1, keepdims=True)
    out = np.where(std < 1e-10, 0.0, c / np.where(std < 1e-10, 1, std) / np.sqrt(3 * fan_in))
    return out.reshape(w.shape)


@pytest.mark.parametrize("name", di.BASES)
@pytest.mark.parametrize("k,cin,cout", [(5, 12, 40), (5, 40, 160), (1, 160, 40), (5, 1, 16)])
def test_conv1d_against_hand_built_torch_order(name, k, cin, cout):
    fan_in = cin * k
    b = di.basis(name, max(cout, fan_in))
    torch = np.empty((cout, cin, k))
    for o in range(cout):
        for c in range(cin):
            for t in range(k):
                torch[o, c, t] = b[o, c * k + t]  # channel outer, tap inner
    expected = rescale_global_np(torch, fan_in).transpose(2, 1, 0)  # Flax (k, in, out)
    got = di.conv1d_kernel(name, k, cin, cout)
    assert got.dtype == np.float32 and got.shape == (k, cin, cout)
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-9)
    flax_init = di.structured(name)(None, (k, cin, cout))
    assert np.asarray(flax_init).tobytes() == got.tobytes()


@pytest.mark.parametrize("name", di.BASES)
def test_dense_against_hand_built(name):
    for fin, fout in [(320, 14), (160, 320), (40, 40)]:
        b = di.basis(name, max(fin, fout))
        expected = rescale_global_np(b[:fout, :fin], fin).T
        got = di.dense_kernel(name, fin, fout)
        assert got.shape == (fin, fout) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-9)
        per_row = rescale_per_filter_np(b[:fout, :fin], fin).T
        np.testing.assert_allclose(di.dense_kernel_per_row(name, fin, fout), per_row,
                                   rtol=2e-6, atol=1e-9)
        assert np.asarray(di.structured(name, per_filter=True)(None, (fin, fout))).tobytes() \
            == di.dense_kernel_per_row(name, fin, fout).tobytes()


@pytest.mark.parametrize("name", di.BASES)
@pytest.mark.parametrize("kh,kw,cin,cout", [(3, 3, 3, 64), (3, 3, 8, 16), (1, 1, 64, 128),
                                            (3, 2, 4, 200)])
def test_conv2d_against_hand_built(name, kh, kw, cin, cout):
    bh, bw, bc = di.basis(name, kh), di.basis(name, kw), di.basis(name, cin)
    gen = []
    for ci in range(min(cin, cout)):  # channel-vector major
        for a in range(kh):  # kh outer
            for b in range(kw):  # kw inner
                gen.append(np.einsum("c,u,v->cuv", bc[ci], bh[a], bw[b]))
    torch = np.stack([gen[f % len(gen)] for f in range(cout)])  # cyclic repeat
    expected = rescale_per_filter_np(torch, cin * kh * kw).transpose(2, 3, 1, 0)
    got = di.conv2d_kernel(name, kh, kw, cin, cout)
    assert got.shape == (kh, kw, cin, cout) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-8)
    assert np.asarray(di.structured(name)(None, (kh, kw, cin, cout))).tobytes() == got.tobytes()


@pytest.mark.parametrize("name", di.BASES)
@pytest.mark.parametrize("variant", di.VARIANTS)
@pytest.mark.parametrize("shape", [(5, 12, 40), (5, 40, 40), (1, 160, 480), (5, 1, 160),
                                   (320, 14), (160, 320)])
def test_global_rescaling_std_and_mean(name, variant, shape):
    w = np.asarray(di.structured(name, variant=variant)(None, shape), dtype=np.float64)
    target = 1 / math.sqrt(3 * math.prod(shape[:-1]))
    assert w.std(ddof=1) == pytest.approx(target, rel=1e-6)
    assert abs(w.mean()) < 1e-7 * target


@pytest.mark.parametrize("name", di.BASES)
def test_per_filter_rescaling_std_and_mean(name):
    w = np.asarray(di.structured(name)(None, (3, 3, 16, 64)), dtype=np.float64)
    filters = w.transpose(3, 2, 0, 1).reshape(64, -1)
    std = filters.std(axis=1)
    alive = std > 0
    target = 1 / math.sqrt(3 * 16 * 9)
    np.testing.assert_allclose(std[alive], target, rtol=1e-6)
    np.testing.assert_allclose(filters.mean(axis=1), 0.0, atol=1e-7 * target)
    assert alive.sum() >= 63
    # per_filter=True on the 1-D rule: same rows, each filter rescaled on its own
    w1 = np.asarray(di.structured(name, per_filter=True)(None, (5, 12, 40)), np.float64)
    f1 = w1.transpose(2, 1, 0).reshape(40, -1)
    std1 = f1.std(axis=1)
    np.testing.assert_allclose(std1[1:], 1 / math.sqrt(180), rtol=1e-6)
    # row 0 is constant (DC) for dct/hadamard/hartley, so that filter becomes exactly zero
    assert std1[0] == (0.0 if name != "sinusoidal" else pytest.approx(1 / math.sqrt(180)))


def test_dct_dc_x_dc_filter_is_all_zeros():
    w = di.conv2d_kernel("dct", 3, 3, 16, 64)
    assert np.array_equal(w[..., 0], np.zeros((3, 3, 16), np.float32))
    assert not np.signbit(w[..., 0]).any()
    assert (np.abs(w[..., 1:]).max(axis=(0, 1, 2)) > 0).all()  # only that one
    # cyclic repeat: 2 channel vectors x 9 patterns = 18 filters, filter 18 = filter 0
    w2 = di.conv2d_kernel("dct", 3, 3, 2, 40)
    assert np.array_equal(w2[..., 18], w2[..., 0]) and np.array_equal(w2[..., 19], w2[..., 1])


def test_fixup_scale_multiplies_exactly():
    shape = (1, 40, 160)
    base = di.structured("hadamard")
    full64 = base.build(shape)
    got = np.asarray(di.structured("hadamard", scale=di.FIXUP_SCALE)(None, shape))
    assert got.tobytes() == (full64 * 0.01).astype(np.float32).tobytes()
    half = np.asarray(di.structured("hadamard", scale=0.5)(None, shape))
    assert half.tobytes() == (np.asarray(base(None, shape)) * np.float32(0.5)).tobytes()
    assert np.asarray(di.structured("dct", scale=0.0)(None, shape)).max() == 0.0


def test_key_is_ignored():
    shape = (5, 40, 40)
    init = di.structured("hartley")
    a = np.asarray(init(jax.random.key(0), shape))
    b = np.asarray(init(jax.random.key(123), shape))
    c = np.asarray(init(None, shape))
    assert a.tobytes() == b.tobytes() == c.tobytes()


def test_qkv_and_depthwise_rules():
    c = 160
    qkv = di.qkv_kernel("dct", c)
    assert qkv.shape == (1, c, 3 * c)
    assert qkv.tobytes() == di.dense_kernel("dct", c, 3 * c)[None].tobytes()  # N = 3C
    dw = di.conv1d_kernel("dct", 5, 1, c)  # depthwise: fan_in = k
    assert dw.shape == (5, 1, c)
    assert np.asarray(dw, np.float64).std(ddof=1) == pytest.approx(1 / math.sqrt(15), rel=1e-6)


def test_orthonormal_hadamard_has_no_dead_rows_or_columns_on_conformer_shapes():
    # A block-diagonal direct sum would leave e.g. 224 of the 480 qkv outputs all-zero.
    for shape in [(5, 12, 40), (5, 40, 40), (1, 160, 40), (1, 40, 160), (5, 160, 160),
                  (160, 320), (320, 160), (1, 160, 480), (5, 1, 160), (320, 14)]:
        fan_in, out = math.prod(shape[:-1]), shape[-1]
        b = di.hadamard(max(out, fan_in), "orthonormal")[:out, :fan_in]
        assert (np.abs(b) > 0).any(axis=1).all() and (np.abs(b) > 0).any(axis=0).all(), shape


def test_float64_build_with_x64():
    with jax.enable_x64(True):
        w = di.structured("dct")(None, (5, 12, 40), jnp.float64)
        assert w.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(w), di.structured("dct").build((5, 12, 40)))


# ----------------------------------------------------------------------------- golden bytes
# These digests pin the exact bytes on every platform (pure IEEE arithmetic + math.fsum, no
# libm trigonometry, no BLAS). If one changes, the init of every structured model changes.
GOLDEN_DCT_5_12_40 = "a4361022f6d6757d03dd369507d1ec07afec9135bb8bbafa4eefd0408a61292e"
GOLDEN_MIXED_STAGE1_FIXUP_1_40_160 = (
    "9bc08f5fb3526a38ca182e24430afb34a006683629af960050a4ae3ba53d2017")


def test_golden_sha256():
    assert sha256(di.structured("dct")(None, (5, 12, 40))) == GOLDEN_DCT_5_12_40
    mixed = di.kernel_init("mixed", "stage1", scale=di.FIXUP_SCALE)(None, (1, 40, 160))
    assert sha256(mixed) == GOLDEN_MIXED_STAGE1_FIXUP_1_40_160


# ----------------------------------------------------------------------------- schedule
def test_mixed_schedule_and_kernel_init():
    assert dict(di.MIXED_SCHEDULE) == {
        "stem": "dct", "stage0": "dct", "stage1": "hadamard", "stage2": "hartley",
        "stage3": "dct", "transformer": "dct", "head": "dct"}
    for stage in di.STAGES:
        init = di.kernel_init("mixed", stage, scale=0.01, variant="orthonormal")
        assert init == di.Structured(di.MIXED_SCHEDULE[stage], "orthonormal", 0.01, stage)
    with pytest.raises(TypeError):
        di.MIXED_SCHEDULE["stage1"] = "dct"  # the schedule is read-only
    assert di.kernel_init("hartley", "stem").name == "hartley"
    assert isinstance(di.kernel_init("kaiming", "stage1", scale=0.01), di.KaimingUniform)
    assert isinstance(di.kernel_init("he_normal", "stage1"), di.HeNormal)


def test_initialisers_are_hashable_and_readable():
    a = di.kernel_init("mixed", "stage2")
    assert hash(a) == hash(di.structured("hartley", stage="stage2")) and a == di.structured(
        "hartley", stage="stage2")
    assert "hartley" in repr(a) and "stage2" in repr(a)
    assert a.description == "hartley/reference stage=stage2"
    assert di.structured("dct", scale=0.01).description == "dct/reference scale=0.01"


class Toy(nn.Module):
    scheme: str = "mixed"

    @nn.compact
    def __call__(self, x):
        ki = di.kernel_init
        x = nn.Conv(8, (5,), kernel_init=ki(self.scheme, "stem"), name="stem")(x)
        x = nn.Conv(16, (3,), kernel_init=ki(self.scheme, "stage1", scale=di.FIXUP_SCALE),
                    name="block")(x)
        x = nn.Dense(14, kernel_init=ki(self.scheme, "head"), name="bottleneck")(x.mean(1))
        return nn.Dense(1, kernel_init=di.etf_head_init(3), name="head_3")(x)


def test_describe_toy_model_two_stages():
    rows = di.describe(Toy(), jnp.zeros((2, 20, 3)))
    assert rows == [
        ("stem", (5, 3, 8), "dct/reference stage=stem"),
        ("block", (3, 8, 16), "hadamard/reference stage=stage1 scale=0.01"),
        ("bottleneck", (16, 14), "dct/reference stage=head"),
        ("head_3", (14, 1), "simplex_etf(vertex=3, 13x14)"),
    ]
    table = di.format_assignment(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "kernel", "shape", "init"]
    assert lines[3].split() == ["block", "3x8x16", "hadamard/reference", "stage=stage1",
                                "scale=0.01"]
    # the params the model really gets are the ones described
    params = Toy().init(jax.random.key(0), jnp.zeros((2, 20, 3)))["params"]
    assert np.asarray(params["block"]["kernel"]).tobytes() == np.asarray(
        di.structured("hadamard", scale=0.01)(None, (3, 8, 16))).tobytes()
    kaiming_rows = di.describe(Toy("kaiming"), jnp.zeros((2, 20, 3)))
    assert kaiming_rows[0].init == "kaiming_uniform(a=sqrt5) stage=stem"


class ShadowedInit(nn.Module):
    init: str = "mixed"  # like ECGConformer(init=...): shadows Module.init

    @nn.compact
    def __call__(self, x):
        return nn.Conv(4, (3,), kernel_init=di.kernel_init(self.init, "stage2"))(x)


def test_describe_model_with_init_field():
    rows = di.describe(ShadowedInit(), jnp.zeros((1, 8, 2)))
    assert rows == [("Conv_0", (3, 2, 4), "hartley/reference stage=stage2")]


def test_describe_reports_flax_default_init():
    rows = di.describe(nn.Dense(3), jnp.zeros((1, 4)))
    assert rows == [("/", (4, 3), "variance_scaling(scale=1, mode=fan_in, "
                                  "distribution=truncated_normal)")]


# ----------------------------------------------------------------------------- ETF head
def test_simplex_etf():
    v = di.simplex_etf(13, 14)
    assert v.shape == (13, 14) and v.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-15)
    gram = v @ v.T
    off = gram[~np.eye(13, dtype=bool)]
    np.testing.assert_allclose(off, -1 / 12, atol=1e-15)
    assert np.array_equal(v[:, 12:], np.zeros((13, 2)))  # padding: exactly zero
    np.testing.assert_allclose(v.sum(axis=0), 0.0, atol=1e-15)  # centred simplex
    # Helmert closed form: vertex 0 = sqrt(13/12) (1/sqrt(1*2), 1/sqrt(2*3), ...)
    np.testing.assert_allclose(v[0, :12], [math.sqrt(13 / 12 / (m * (m + 1))) for m in
                                           range(1, 13)], rtol=1e-15)


def test_etf_head_init():
    v = di.simplex_etf()
    for k in range(12):
        w = di.etf_head_init(k)(None, (14, 1))
        assert w.shape == (14, 1) and w.dtype == jnp.float32
        assert np.asarray(w).tobytes() == v[k, :, None].astype(np.float32).tobytes()
    with pytest.raises(ValueError, match=r"\(14, 2\)"):
        di.etf_head_init(0)(None, (14, 2))
    with pytest.raises(ValueError, match="k=13"):
        di.etf_head_init(13)
    with pytest.raises(ValueError, match="dim"):
        di.simplex_etf(13, 11)


# ----------------------------------------------------------------------------- Kaiming
def test_fan_in_of():
    assert di.fan_in_of((5, 12, 40)) == 60
    assert di.fan_in_of((3, 3, 64, 128)) == 576
    assert di.fan_in_of((320, 14)) == 320
    assert di.fan_in_of((5, 1, 160)) == 5


def test_kaiming_uniform_bounds_std_and_key():
    shape = (5, 64, 128)
    init = di.kernel_init("kaiming", "stage0")
    bound = 1 / math.sqrt(320)
    assert init.bound(shape) == pytest.approx(bound, rel=1e-15)
    w = np.asarray(init(jax.random.key(7), shape), np.float64)
    assert w.shape == shape and np.abs(w).max() <= bound
    assert np.abs(w).max() > 0.99 * bound
    assert w.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    same = np.asarray(init(jax.random.key(7), shape), np.float64)
    other = np.asarray(init(jax.random.key(8), shape), np.float64)
    assert np.array_equal(w, same) and not np.array_equal(w, other)
    with pytest.raises(ValueError, match="PRNG key"):
        init(None, shape)


def test_kaiming_bias_and_structured_bias():
    b = np.asarray(di.bias_init("kaiming", 60)(jax.random.key(1), (4000,)), np.float64)
    assert np.abs(b).max() <= 1 / math.sqrt(60) and np.abs(b).max() > 0.99 / math.sqrt(60)
    assert b.std() == pytest.approx(1 / math.sqrt(180), rel=0.05)
    for init in ("mixed", "dct", "hadamard", "he_normal"):
        z = di.bias_init(init, 60)(jax.random.key(1), (40,))
        assert np.array_equal(np.asarray(z), np.zeros(40, np.float32))


def test_he_normal_std_and_not_truncated():
    shape = (3, 3, 64, 128)
    w = np.asarray(di.kernel_init("he_normal", "stage0")(jax.random.key(3), shape), np.float64)
    std = math.sqrt(2 / 576)
    assert w.std() == pytest.approx(std, rel=0.02)
    assert abs(w.mean()) < 0.02 * std
    # a normal has ~4.6% beyond 2 sigma; a (jax-style) truncated normal has none
    assert np.mean(np.abs(w) > 2 * std) == pytest.approx(0.0455, abs=0.005)


# ----------------------------------------------------------------------------- errors
def test_unknown_basis_variant_stage_init():
    with pytest.raises(ValueError, match="'dst'"):
        di.basis("dst", 8)
    with pytest.raises(ValueError, match=r"'dst'.*\(5, 12, 40\)"):
        di.conv1d_kernel("dst", 5, 12, 40)
    with pytest.raises(ValueError, match="'dst'"):
        di.structured("dst")
    with pytest.raises(ValueError, match="'orthogonal'"):
        di.dct(8, variant="orthogonal")
    with pytest.raises(ValueError, match="'stage9'"):
        di.kernel_init("mixed", "stage9")
    with pytest.raises(ValueError, match="'xavier'.*'stem'"):
        di.kernel_init("xavier", "stem")
    with pytest.raises(ValueError, match="'xavier'"):
        di.bias_init("xavier", 10)
    with pytest.raises(ValueError, match="0"):
        di.dct(0)


@pytest.mark.parametrize("shape", [(5, 0, 40), (40,), (2, 3, 4, 5, 6), (0, 4)])
def test_impossible_shapes(shape):
    with pytest.raises(ValueError, match=r"'dct'.*" + re.escape(str(shape))):
        di.structured("dct")(None, shape)
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        di.kernel_init("kaiming", "stem")(jax.random.key(0), shape)


def test_single_weight_cannot_be_globally_rescaled():
    with pytest.raises(ValueError, match=r"\(1, 1\)"):
        di.structured("dct")(None, (1, 1))
    with pytest.raises(ValueError, match="per_filter=False"):
        di.structured("dct", per_filter=False)(None, (3, 3, 4, 4))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bfloat16, jnp.float16, jnp.float64, "bool"])
def test_bad_dtypes(dtype):
    name = jnp.dtype(dtype).name
    for init in (di.structured("dct"), di.kaiming_uniform(), di.he_normal(), di.etf_head_init(0)):
        shape = (14, 1) if isinstance(init, di.EtfHead) else (5, 12, 40)
        pattern = r"x64" if name == "float64" else name
        with pytest.raises(ValueError, match=pattern) as exc:
            init(jax.random.key(0), shape, dtype)
        assert str(shape) in str(exc.value)


# ----------------------------------------------------------------------------- keyed draws apart
@pytest.mark.parametrize("init", ["kaiming", "he_normal"])
def test_keyed_draw_is_the_same_bits_eager_and_inside_jit(init):
    kernel = di.kernel_init(init, "stage0")
    bias = di.bias_init("kaiming", 60)
    key = jax.random.key(11)
    assert sha256(kernel(key, (5, 12, 64))) == sha256(jax.jit(lambda k: kernel(k, (5, 12, 64)))(key))
    assert sha256(bias(key, (64,))) == sha256(jax.jit(lambda k: bias(k, (64,)))(key))


class _TwoStageModel(nn.Module):
    """Keyed kernels and biases in repeated shapes (what makes the deferral pay), plus a
    LayerNorm and a structured head, so both kinds of parameter pass through init_variables."""

    init_mode: str = "kaiming"

    @nn.compact
    def __call__(self, x, train=False):
        for i in range(4):
            x = x + nn.gelu(nn.Dense(8, kernel_init=di.kernel_init(self.init_mode, "stage0"),
                                     bias_init=di.bias_init(self.init_mode, 8), name=f"block{i}")(x))
        x = nn.LayerNorm()(x)
        return nn.Dense(3, kernel_init=di.kernel_init("dct", "head"), name="head")(x)


@pytest.mark.parametrize("init", ["kaiming", "he_normal"])
def test_init_variables_with_keyed_draws_apart_is_bit_identical(init):
    model = _TwoStageModel(init)
    x = jnp.ones((2, 8), jnp.float32)
    for seed in (0, 1):
        rngs = {"params": jax.random.key(seed)}
        plain = di.init_variables(model, rngs, x, train=False)
        apart = di.init_variables(model, rngs, x, defer_keyed_draws=True, train=False)
        assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(apart)
        for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(apart)):
            assert a.dtype == b.dtype and sha256(a) == sha256(b)
        # the placeholders were all replaced: the keyed kernels are not zero
        assert np.abs(np.asarray(apart["params"]["block3"]["kernel"])).min() > 0
    assert sha256(apart["params"]["block0"]["kernel"]) != sha256(apart["params"]["block1"]["kernel"])
    assert not di._PENDING_DRAWS.get()  # the recording context is closed again


def test_init_variables_apart_under_a_trace_falls_back_to_inline_draws():
    model = _TwoStageModel("kaiming")
    x = jnp.ones((2, 8), jnp.float32)
    # traced keys cannot be drawn on the host: the keyed initialisers draw inline instead
    inline = jax.jit(lambda k: di.init_variables(model, {"params": k}, x, defer_keyed_draws=True, train=False))
    plain = di.init_variables(model, {"params": jax.random.key(4)}, x, train=False)
    got = inline(jax.random.key(4))
    assert all(sha256(a) == sha256(b) for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(got)))
