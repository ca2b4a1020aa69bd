"""ECG Conformer and baseline CNN: structure, deterministic layers, inits, gradients, export.

Compile time dominates on CPU, so each full model is compiled at most twice (init, and one
loss-and-gradient function whose auxiliary outputs also carry logits, sown losses and
intermediates), with LLVM optimisation off (it does not change what is tested).
"""

from __future__ import annotations

import hashlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

import detjax.initializers as di
from detjax.models import ARCHS, ECGBaselineCNN, ECGConformer, count_params, get_model
from detjax.models import layers as L
from detjax.models.baseline import ResBlock
from detjax.models.conformer import BottleneckBlock, ConvModule
from detjax.models.export import from_torch_state_dict, to_torch_state_dict, torch_layout

FAST = {"xla_backend_optimization_level": 0}
B, T = 2, 1000


def _compile(fn, *args):
    """(jaxpr text, compiled fn) with one trace and one fast compile."""
    traced = jax.jit(fn).trace(*args)
    return str(traced.jaxpr), traced.lower().compile(FAST)


def _x(seed=1, t=T, leads=12):
    return jax.random.normal(jax.random.key(seed), (B, t, leads), jnp.float32)


def _init_params(model, x, **kwargs):
    """Structured init without the forward pass: only 'params' (and 'batch_stats') are
    outputs, so XLA drops the forward computation."""
    fn = lambda k, x: model.init(k, x, mutable=["params", "batch_stats"], **kwargs)  # noqa: E731
    return _compile(fn, jax.random.key(0), x)[1](jax.random.key(0), x)


def _rows(model, leads=12):
    return {row.path: row for row in di.describe(model, jnp.zeros((1, T, leads), jnp.float32))}


# ------------------------------------------------------------------------ layers
def test_conv_output_lengths_follow_pytorch_padding():
    chain = [1000]
    for _ in range(5):
        chain.append(L.conv_output_length(chain[-1], 5, 2))
    assert chain == [1000, 500, 250, 125, 63, 32]
    assert L.conv_output_length(500, 3, 2, 1) == 250  # the stem pools
    with pytest.raises(ValueError, match="odd"):
        L.torch_padding(4)


def _torch_bins_loop(in_len, out_len):
    """PyTorch's definition with float floor/ceil, written independently of the code."""
    return [(math.floor(i * in_len / out_len), math.ceil((i + 1) * in_len / out_len)) for i in range(out_len)]


@pytest.mark.parametrize("in_len,out_len", [(250, 125), (125, 63), (10, 3), (7, 5), (5, 7), (63, 1)])
def test_adaptive_avg_pool_matches_pytorch_bins(in_len, out_len):
    bins = _torch_bins_loop(in_len, out_len)
    assert L.adaptive_avg_pool_bins(in_len, out_len) == bins
    x = np.random.default_rng(in_len * 1000 + out_len).normal(size=(2, in_len, 3)).astype(np.float32)
    expected = np.stack([x[:, s:e].mean(axis=1) for s, e in bins], axis=1)
    got = np.asarray(L.adaptive_avg_pool1d(jnp.asarray(x), out_len))
    assert got.shape == (2, out_len, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_adaptive_avg_pool_overlapping_bins_125_to_63():
    bins = L.adaptive_avg_pool_bins(125, 63)
    assert bins[0] == (0, 2) and bins[31] == (61, 64) and bins[32] == (63, 66) and bins[62] == (123, 125)
    a = L.adaptive_avg_pool_matrix(125, 63)
    assert a.dtype == np.float32 and a.shape == (63, 125)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=1e-6)
    assert a[31, 63] == a[32, 63] == np.float32(1 / 3)  # sample 63 is in two bins
    assert L.adaptive_avg_pool_bins(250, 125)[7] == (14, 16)  # 250 -> 125: disjoint pairs
    with pytest.raises(ValueError, match="positive"):
        L.adaptive_avg_pool_bins(0, 3)


def test_adaptive_avg_pool_gradient_is_transposed_matmul():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 125, 4)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(2, 63, 4)), jnp.float32)
    f = lambda x: jnp.sum(w * L.adaptive_avg_pool1d(x, 63))  # noqa: E731
    g = jax.jit(jax.grad(f))(x)
    a = L.adaptive_avg_pool_matrix(125, 63).astype(np.float64)
    np.testing.assert_allclose(np.asarray(g), np.einsum("ol,boc->blc", a, np.asarray(w, np.float64)), rtol=1e-5, atol=1e-6)
    assert "scatter" not in str(jax.make_jaxpr(jax.grad(f))(x))


def _reduce_window_max(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 1), (1, 2, 1), [(0, 0), (1, 1), (0, 0)])


def _pool_and_grads(x, w):
    """(ours, reduce_window) values and input gradients of sum(w * pool(x))."""
    ours = lambda x: jnp.sum(w * L.max_pool1d(x, 3, 2, 1))  # noqa: E731
    theirs = lambda x: jnp.sum(w * _reduce_window_max(x))  # noqa: E731
    return L.max_pool1d(x, 3, 2, 1), _reduce_window_max(x), jax.grad(ours)(x), jax.grad(theirs)(x)


_pool_and_grads_jit = jax.jit(_pool_and_grads)


@pytest.mark.parametrize("length", [500, 9, 8])
def test_max_pool_matches_reduce_window_values_and_gradient(length):
    rng = np.random.default_rng(length)
    x = jnp.asarray(rng.normal(size=(2, length, 5)), jnp.float32)
    out_len = (length + 2 - 3) // 2 + 1
    w = jnp.asarray(rng.normal(size=(2, out_len, 5)), jnp.float32)
    y, ref, g, g_ref = _pool_and_grads_jit(x, w)
    assert y.shape == ref.shape == (2, out_len, 5)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(g), np.asarray(g_ref))
    ours = jax.grad(lambda x: jnp.sum(w * L.max_pool1d(x, 3, 2, 1)))
    jaxpr = str(jax.make_jaxpr(ours)(x))
    assert "select_and_scatter" not in jaxpr and "scatter" not in jaxpr and "reduce_window" not in jaxpr


def test_max_pool_ties_send_gradient_to_first_maximum():
    # PyTorch and select_and_scatter give a tied window's gradient to its first maximum.
    x = jnp.asarray([[[1.0], [1.0], [1.0], [2.0], [2.0], [0.0], [3.0], [3.0]]])
    _, _, g, g_ref = _pool_and_grads_jit(x, jnp.ones((1, 4, 1)))
    np.testing.assert_array_equal(np.asarray(g)[0, :, 0], [1, 0, 0, 2, 0, 0, 1, 0])
    np.testing.assert_array_equal(np.asarray(g), np.asarray(g_ref))


def test_avg_pool_counts_padded_zeros():
    x = np.arange(1, 8, dtype=np.float32).reshape(1, 7, 1)  # 1..7
    pool = jax.jit(lambda x: L.avg_pool1d(x, 3, 2, 1))
    y = np.asarray(pool(jnp.asarray(x)))[0, :, 0]
    # windows over [0,1,2,...,7,0]: (0+1+2)/3, (2+3+4)/3, (4+5+6)/3, (6+7+0)/3
    np.testing.assert_allclose(y, [1.0, 3.0, 5.0, 13 / 3], rtol=1e-7)
    x = np.random.default_rng(3).normal(size=(2, 500, 4)).astype(np.float32)
    xp = np.pad(x, ((0, 0), (1, 1), (0, 0)))
    expected = np.stack([xp[:, 2 * t : 2 * t + 3].sum(axis=1) / 3 for t in range(250)], axis=1)
    np.testing.assert_allclose(np.asarray(pool(jnp.asarray(x))), expected, rtol=1e-6, atol=1e-7)


def test_gelu_is_exact_and_layer_norm_uses_torch_eps():
    x = np.linspace(-4, 4, 101).astype(np.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(L.gelu)(jnp.asarray(x))), 0.5 * x * (1 + erf(x / np.sqrt(2))), rtol=1e-6, atol=1e-7)
    # variance ~1e-6, comparable to eps: the eps value shows in the output
    x = (np.random.default_rng(0).normal(size=(3, 8)) * 1e-3).astype(np.float32)
    ln = nn.LayerNorm(epsilon=L.LN_EPSILON, use_fast_variance=False)
    y = jax.jit(ln.apply)(ln.init(jax.random.key(0), x), x)
    x64 = x.astype(np.float64)
    mu, var = x64.mean(-1, keepdims=True), x64.var(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(y), (x64 - mu) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)


def test_batch_norm_follows_pytorch():
    bn = L.BatchNorm()
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(4, 10, 6)).astype(np.float32)
    variables = bn.init(jax.random.key(0), x, use_running_average=False)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(6))  # init: no update
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(6))
    y, new = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    x64 = x.astype(np.float64).reshape(-1, 6)
    mean, var = x64.mean(0), x64.var(0)  # biased, for normalising
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 6), (x64 - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(new["batch_stats"]["var"], 0.9 + 0.1 * x64.var(0, ddof=1), rtol=1e-5)
    y_eval = bn.apply({"params": variables["params"], **new}, x, use_running_average=True)
    rm, rv = (np.asarray(new["batch_stats"][k], np.float64) for k in ("mean", "var"))
    np.testing.assert_allclose(np.asarray(y_eval), (x - rm) / np.sqrt(rv + 1e-5), rtol=1e-4, atol=1e-5)


def test_kaiming_uses_each_layer_fan_in_and_the_seed():
    # ConvModule: depthwise k5 (fan_in 5), pointwise 1x1 160->160 (fan_in 160)
    init = jax.jit(ConvModule(init_mode="kaiming").init)
    x = jnp.zeros((1, 8, 160))
    p, p_again, q = (init(jax.random.key(s), x)["params"] for s in (3, 3, 4))
    for name, fan_in in (("dw", 5), ("pw", 160)):
        bound = 1 / math.sqrt(fan_in)
        for leaf in ("kernel", "bias"):
            v = np.abs(np.asarray(p[name][leaf]))
            assert v.max() <= bound and v.max() > 0.8 * bound, (name, leaf)
        np.testing.assert_array_equal(p[name]["kernel"], p_again[name]["kernel"])  # seeded
        assert not np.array_equal(p[name]["kernel"], q[name]["kernel"])
    w = np.asarray(p["pw"]["kernel"])
    np.testing.assert_allclose(w.std(), 1 / math.sqrt(3 * 160), rtol=0.05)  # U(-a, a): std a/sqrt 3
    # the fixup scale does not apply to Kaiming (the PyTorch baseline has none)
    structured = jax.jit(ConvModule(init_mode="dct", fixup=0.01).init)(jax.random.key(3), x)["params"]
    np.testing.assert_array_equal(structured["pw"]["kernel"], di.conv1d_kernel("dct", 1, 160, 160, scale=0.01))
    assert not np.any(structured["pw"]["bias"])


# ------------------------------------------------------------------ parameter counts
def _abstract(model, leads=12):
    """Shapes of (logits, all collections incl. intermediates) of a forward pass at init."""
    x = jax.ShapeDtypeStruct((B, T, leads), jnp.float32)
    return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, mutable=True), x)


@pytest.fixture(scope="module")
def conformer_abstract():
    return _abstract(ECGConformer())


@pytest.fixture(scope="module")
def baseline_abstract():
    return _abstract(ECGBaselineCNN())


def test_conformer_parameter_counts(conformer_abstract):
    params = conformer_abstract[1]["params"]
    assert count_params(params) == 1_827_634
    blocks = [f"stages_{s}_{b}" for s, d in enumerate((3, 4, 23)) for b in range(d)]
    assert all(count_params(params[k]) == 21_360 for k in blocks)
    assert all(count_params(params[f"blocks_{i}"]) == 337_120 for i in range(3))
    conv_module = params["blocks_0"]["conv"]
    assert count_params(conv_module) == 320 + 960 + 25_760  # own LayerNorm, depthwise, pointwise
    assert count_params([params[f"stem_{i}"] for i in (0, 2, 4)]) == 42_640
    assert count_params(params["down"]) == 128_160
    assert count_params(params["bottleneck"]) == 4_494
    heads = [params[f"heads_{k}"] for k in range(12)]
    assert [h["kernel"].shape for h in heads] == [(14, 1)] * 12 and count_params(heads) == 180
    assert "heads_12" not in params
    assert set(conformer_abstract[1]) == {"params", "losses", "intermediates"}  # no batch_stats


def test_baseline_parameter_counts(baseline_abstract):
    variables = baseline_abstract[1]
    params = variables["params"]
    assert count_params(params) == 1_653_772
    assert count_params(variables["batch_stats"]) == 2 * (64 + 3 * 64 + 5 * 128 + 4 * 256)
    assert count_params(params["stem"]) == 3_904 + 128
    assert [count_params(params[f"stages_0_{i}"]) for i in range(3)] == [20_672] * 3
    assert count_params(params["stages_1_0"]) == 41_344  # transition conv 64->128 + BN
    assert [count_params(params[f"stages_1_{i}"]) for i in range(1, 5)] == [82_304] * 4
    assert count_params(params["stages_2_0"]) == 164_608
    assert [count_params(params[f"stages_2_{i}"]) for i in range(1, 4)] == [328_448] * 3
    assert count_params(params["head_1"]) == 65_664 and count_params(params["head_4"]) == 1_548


def test_intermediate_lengths(conformer_abstract, baseline_abstract):
    common = {"stem_conv": 500, "stem_pool": 250, "stage0": 250, "stage1": 125, "stage2": 63}
    for (out, variables), expected, width in (
        (conformer_abstract, {**common, "stage3": 32, "transformer": 32}, 320),
        (baseline_abstract, common, 512),
    ):
        assert out.shape == (B, 12)
        inter = variables["intermediates"]
        assert {k: v[0].shape[1] for k, v in inter.items() if k in expected} == expected
        assert inter["pooled"][0].shape == (B, width)


def test_bad_input_and_init_raise():
    with pytest.raises(ValueError, match=r"\(B, T, 12\).*\(2, 12, 1000\)"):
        _shapes_apply(ECGConformer(), (2, 12, 1000))
    with pytest.raises(ValueError, match="'xavier'"):
        _shapes_apply(ECGBaselineCNN(init_mode="xavier"), (2, 1000, 12))
    with pytest.raises(ValueError, match="'vgg'"):
        get_model("vgg")


def _shapes_apply(model, shape):
    return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))


def test_registry():
    assert {"conformer", "baseline"} <= set(ARCHS)
    m = get_model("conformer", init="dct", variant="orthonormal")
    assert isinstance(m, ECGConformer) and m.init_mode == "dct" and m.variant == "orthonormal"
    assert callable(m.init)  # the Flax method is not shadowed by the attribute
    b = get_model("baseline", num_classes=5, init="kaiming", feature_dropout=0.1)
    assert isinstance(b, ECGBaselineCNN) and (b.num_classes, b.init_mode, b.feature_dropout) == (5, "kaiming", 0.1)
    with pytest.raises(ValueError, match="not both"):
        get_model("conformer", init="dct", init_mode="dct")
    if "resnet18" not in ARCHS:
        with pytest.raises(ValueError, match="resnet18"):
            get_model("resnet18")


# ------------------------------------------------------------------------- inits
def _basis_stage(path):
    if path.startswith(("stem", "stages_0")):
        return "dct", "stem" if path.startswith("stem") else "stage0"
    if path.startswith("stages_1"):
        return "hadamard", "stage1"
    if path.startswith("stages_2"):
        return "hartley", "stage2"
    if path.startswith("down"):
        return "dct", "stage3"
    if path.startswith("blocks"):
        return "dct", "transformer"
    return "dct", "head"


FIXUP_PATHS = ("conv3",)  # as released: the bottleneck blocks' last 1x1 conv only


def test_conformer_stage_assignment_is_explicit_per_layer():
    rows = _rows(ECGConformer())
    assert len(rows) == 3 + 30 * 3 + 1 + 3 * 8 + 1 + 12
    for path, row in rows.items():
        if path.startswith("heads_"):
            assert row.init == f"simplex_etf(vertex={int(path[6:])}, 13x14)", path
            continue
        basis, stage = _basis_stage(path)
        scale = " scale=0.01" if path.endswith(FIXUP_PATHS) else ""
        assert row.init == f"{basis}/reference stage={stage}{scale}", path
    # the wider (not released) reading of the fixup rule, other sizes, a variant
    wide = _rows(ECGConformer(num_classes=5, in_leads=6, transformer_fixup=True, init_mode="dct",
                              variant="orthonormal"), leads=6)
    assert wide["blocks_1/attn/proj"].init == "dct/orthonormal stage=transformer scale=0.01"
    assert wide["blocks_2/conv/pw"].init == "dct/orthonormal stage=transformer scale=0.01"
    assert wide["stages_1_0/conv3"].init == "dct/orthonormal stage=stage1 scale=0.01"
    assert wide["stem_0"].shape == (5, 6, 40) and wide["bottleneck"].shape == (320, 7)
    assert [wide[f"heads_{k}"].init for k in range(5)] == [f"simplex_etf(vertex={k}, 6x7)" for k in range(5)]
    assert "heads_5" not in wide
    kaiming = _rows(ECGConformer(init_mode="kaiming"))  # heads too: PyTorch default, not ETF
    assert len(kaiming) == len(rows) and all(r.init.startswith("kaiming_uniform(a=sqrt5)") for r in kaiming.values())


def test_baseline_stage_assignment():
    rows = _rows(ECGBaselineCNN())
    expected = {"stem/conv": "dct/reference stage=stem", "stages_0_2/conv": "dct/reference stage=stage0",
                "stages_1_0/conv": "hadamard/reference stage=stage1", "stages_1_4/conv": "hadamard/reference stage=stage1",
                "stages_2_0/conv": "hartley/reference stage=stage2", "stages_2_3/conv": "hartley/reference stage=stage2",
                "head_1": "dct/reference stage=head", "head_4": "dct/reference stage=head"}
    assert {k: rows[k].init for k in expected} == expected
    assert len(rows) == 1 + 3 + 5 + 4 + 2
    assert not any("scale" in r.init for r in rows.values())  # no 1x1 conv, no fixup


def test_mixed_as_released_assignment():
    # The released rule matches module names: the Conformer's never match (all DCT) ...
    conformer = _rows(ECGConformer(init_mode="mixed_as_released"))
    dct = _rows(ECGConformer(init_mode="dct"))
    assert {k: r.init.split("/")[0] for k, r in conformer.items()} == {k: r.init.split("/")[0] for k, r in dct.items()}
    # ... the Baseline's 1-based stage1/stage2/stage3 give Hadamard/Hartley/DCT at 64/128/256
    # channels; stem, the down-sampling convs ("down1", "down2") and the head are DCT.
    rows = _rows(ECGBaselineCNN(init_mode="mixed_as_released"))
    basis = {k: r.init.split("/")[0] for k, r in rows.items()}
    assert basis == {"stem/conv": "dct", **{f"stages_0_{b}/conv": "hadamard" for b in range(3)},
                     "stages_1_0/conv": "dct", **{f"stages_1_{b}/conv": "hartley" for b in range(1, 5)},
                     "stages_2_0/conv": "dct", **{f"stages_2_{b}/conv": "dct" for b in range(1, 4)},
                     "head_1": "dct", "head_4": "dct"}


@pytest.mark.parametrize("name,basis", [
    ("stem.0", "dct"), (None, "dct"), ("stages.1.0.conv1", "dct"), ("conformer_blocks.0.attn.qkv", "dct"),
    ("stage1.0.conv", "hadamard"), ("down1.0", "dct"), ("stage2.3.conv", "hartley"), ("stage3.0.conv", "dct"),
    ("layer1.0.conv1", "hadamard"), ("layer2.0.shortcut", "hartley"), ("layer3.1.conv2", "dct"),
    ("layer4.0.conv1", "dct"), ("stage0_x", "dct"),
])
def test_released_mixed_basis_rule(name, basis):
    assert di.released_mixed_basis(name) == basis


@pytest.fixture(scope="module")
def conformer_mixed():
    return _init_params(ECGConformer(), _x())["params"]


def test_conformer_mixed_init_values(conformer_mixed):
    p = conformer_mixed
    c1 = lambda name, *a, **kw: di.conv1d_kernel(name, *a, variant="reference", **kw)  # noqa: E731
    expected = {
        ("stem_0",): c1("dct", 5, 12, 40),
        ("stem_4",): c1("dct", 5, 40, 160),
        ("stages_0_2", "conv2"): c1("dct", 5, 40, 40),
        ("stages_1_0", "conv1"): c1("hadamard", 1, 160, 40),
        ("stages_1_3", "conv2"): c1("hadamard", 5, 40, 40),
        ("stages_1_0", "conv3"): c1("hadamard", 1, 40, 160, scale=0.01),
        ("stages_2_0", "conv2"): c1("hartley", 5, 40, 40),
        ("stages_2_22", "conv3"): c1("hartley", 1, 40, 160, scale=0.01),
        ("down",): c1("dct", 5, 160, 160),
        ("blocks_0", "attn", "qkv"): di.qkv_kernel("dct", 160),
        ("blocks_2", "attn", "proj"): c1("dct", 1, 160, 160),
        ("blocks_1", "conv", "dw"): c1("dct", 5, 1, 160),
        ("blocks_1", "conv", "pw"): c1("dct", 1, 160, 160),
        ("blocks_0", "ffn1", "fc1"): di.dense_kernel("dct", 160, 320, variant="reference"),
        ("blocks_2", "ffn2", "fc2"): di.dense_kernel("dct", 320, 160, variant="reference"),
        ("bottleneck",): di.dense_kernel("dct", 320, 14, variant="reference"),
    }
    for path, kernel in expected.items():
        node = p
        for part in path:
            node = node[part]
        np.testing.assert_array_equal(np.asarray(node["kernel"]), kernel, err_msg=str(path))
    etf = di.simplex_etf(13, 14).astype(np.float32)
    for k in range(12):
        np.testing.assert_array_equal(np.asarray(p[f"heads_{k}"]["kernel"])[:, 0], etf[k])
    # every bias 0, every LayerNorm scale 1
    for path, leaf in jax.tree_util.tree_flatten_with_path(p)[0]:
        name = path[-1].key
        if name == "bias":
            assert not np.any(np.asarray(leaf)), path
        elif name == "scale":
            assert np.all(np.asarray(leaf) == 1), path
    # mixed really differs between stages: the hadamard and hartley kernels are not DCT
    assert not np.array_equal(np.asarray(p["stages_1_3"]["conv2"]["kernel"]), c1("dct", 5, 40, 40))
    assert not np.array_equal(np.asarray(p["stages_2_0"]["conv2"]["kernel"]), c1("dct", 5, 40, 40))


# ---------------------------------------------------------------- forward + gradient
def _loss_fn(model, train):
    def loss(params, extra, x, key):
        variables = {"params": params, **extra}
        logits, state = model.apply(variables, x, train=train, rngs={"dropout": key},
                                    mutable=["losses", "intermediates", "batch_stats"])
        aux = sum((jnp.mean(v) for v in jax.tree.leaves(state.get("losses", {}))), jnp.float32(0))
        y = (jnp.arange(12)[None, :] % 2).astype(jnp.float32)
        bce = jnp.mean(jnp.maximum(logits, 0) - logits * y + jnp.log1p(jnp.exp(-jnp.abs(logits))))
        return bce + aux, (logits, state)
    return jax.value_and_grad(loss, has_aux=True)


def _check_gradient_step(params, grads, jaxpr):
    leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert all(np.all(np.isfinite(g)) for _, g in leaves)
    dead = [jax.tree_util.keystr(p) for p, g in leaves if not np.any(np.asarray(g))]
    assert not dead, f"parameters with zero gradient: {dead[:5]}"
    new = jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params))]
    assert all(changed) and all(np.all(np.isfinite(a)) for a in jax.tree.leaves(new))
    # deterministic backward: no scatters, no select_and_scatter, no reduce_window anywhere
    assert "scatter" not in jaxpr and "reduce_window" not in jaxpr


def test_conformer_forward_gradient_and_aux_loss(conformer_mixed):
    params, x = conformer_mixed, _x()
    jaxpr, step = _compile(_loss_fn(ECGConformer(), train=True), params, {}, x, jax.random.key(0))
    (loss, (logits, state)), grads = step(params, {}, x, jax.random.key(0))
    assert logits.shape == (B, 12) and np.all(np.isfinite(logits)) and np.isfinite(loss)
    inter = state["intermediates"]
    assert [inter[k][0].shape for k in ("stem_conv", "stem_pool", "stage0", "stage1", "stage2", "stage3")] == [
        (B, 500, 40), (B, 250, 160), (B, 250, 160), (B, 125, 160), (B, 63, 160), (B, 32, 160)]
    # head, recomputed independently from the sown transformer output
    z = np.asarray(inter["transformer"][0], np.float64)
    pooled = np.concatenate([z.mean(1), z.max(1)], axis=-1)
    np.testing.assert_allclose(np.asarray(inter["pooled"][0]), pooled, rtol=1e-5, atol=1e-6)
    pre = pooled @ np.asarray(params["bottleneck"]["kernel"], np.float64) + np.asarray(params["bottleneck"]["bias"])
    h = 0.5 * pre * (1 + erf(pre / np.sqrt(2)))
    np.testing.assert_allclose(np.asarray(inter["hidden"][0]), h, rtol=1e-4, atol=1e-6)
    heads = np.stack([np.asarray(params[f"heads_{k}"]["kernel"])[:, 0] for k in range(12)], axis=1)
    np.testing.assert_allclose(np.asarray(logits), h @ heads, rtol=1e-4, atol=1e-6)
    aux = np.asarray(state["losses"]["bottleneck_l2"][0])  # per sample
    assert aux.shape == (B,) and np.all(aux > 0)
    np.testing.assert_allclose(aux, 0.01 * np.mean(h[:, 12:] ** 2, axis=-1), rtol=1e-4)
    assert list(state["losses"]) == ["bottleneck_l2"]
    _check_gradient_step(params, grads, jaxpr)


def test_baseline_train_step_dropout_and_batch_stats():
    model, x = ECGBaselineCNN(), _x()
    variables = _init_params(model, x)
    params, stats = variables["params"], {"batch_stats": variables["batch_stats"]}
    jaxpr, step = _compile(_loss_fn(model, train=True), params, stats, x, jax.random.key(0))
    key = jax.random.key(42)
    (loss, (logits, state)), grads = step(params, stats, x, jax.random.fold_in(key, 7))
    assert logits.shape == (B, 12) and np.all(np.isfinite(logits)) and np.isfinite(loss)
    assert [state["intermediates"][k][0].shape[1] for k in ("stem_conv", "stem_pool", "stage0", "stage1", "stage2")] == [
        500, 250, 250, 125, 63]
    _check_gradient_step(params, grads, jaxpr)
    # running statistics moved (PyTorch momentum 0.1) and stayed finite
    mean0 = np.asarray(state["batch_stats"]["stem"]["bn"]["mean"])
    assert np.all(np.isfinite(mean0)) and np.any(mean0 != 0)
    # dropout is keyed: the same step key repeats bit for bit, another step differs
    (_, (same, _)), _ = step(params, stats, x, jax.random.fold_in(key, 7))
    (_, (other, _)), _ = step(params, stats, x, jax.random.fold_in(key, 8))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(logits))
    assert not np.array_equal(np.asarray(other), np.asarray(logits))


def test_residual_blocks_in_isolation():
    # Bottleneck with stride 2: skip = adaptive average pool, output = LN(GELU(branch + skip))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 125, 160)), jnp.float32)
    blk = BottleneckBlock(stage="stage2", stride=2)
    params = jax.tree.map(np.asarray, _init_params(blk, x)["params"])
    params["conv3"]["kernel"] = np.zeros_like(params["conv3"]["kernel"])  # branch = bias = 0
    y = np.asarray(jax.jit(blk.apply)({"params": params}, x), np.float64)
    skip = np.einsum("ol,blc->boc", L.adaptive_avg_pool_matrix(125, 63).astype(np.float64), np.asarray(x, np.float64))
    g = 0.5 * skip * (1 + erf(skip / np.sqrt(2)))
    ln = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)
    assert y.shape == (2, 63, 160)
    np.testing.assert_allclose(y, ln, rtol=1e-4, atol=1e-4)
    # baseline residual block: x + ReLU(BN(conv x)); BN in eval mode with fresh statistics
    r = ResBlock(stage="stage0")
    xr = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 64)), jnp.float32)
    vr = _init_params(r, xr, train=False)
    yr = np.asarray(jax.jit(lambda v, x: r.apply(v, x, train=False))(vr, xr))
    conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1,), [(2, 2)], dimension_numbers=("NWC", "WIO", "NWC"), precision="highest"))(xr, vr["params"]["conv"]["kernel"])
    np.testing.assert_allclose(yr, np.asarray(xr) + np.maximum(np.asarray(conv) / np.sqrt(1 + 1e-5), 0), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- export
CONFORMER_HEAD = [
    ("stem.0.weight", (40, 12, 5)), ("stem.0.bias", (40,)), ("stem.2.weight", (40, 40, 5)),
    ("stem.2.bias", (40,)), ("stem.4.weight", (160, 40, 5)), ("stem.4.bias", (160,)),
    ("stages.0.0.conv1.weight", (40, 160, 1)), ("stages.0.0.conv1.bias", (40,)),
    ("stages.0.0.conv2.weight", (40, 40, 5)), ("stages.0.0.conv2.bias", (40,)),
    ("stages.0.0.conv3.weight", (160, 40, 1)), ("stages.0.0.conv3.bias", (160,)),
    ("stages.0.0.norm.weight", (160,)), ("stages.0.0.norm.bias", (160,)),
    ("stages.0.1.conv1.weight", (40, 160, 1)),
]
CONFORMER_TRANSFORMER = [
    ("down.weight", (160, 160, 5)), ("down.bias", (160,)),
    ("blocks.0.ffn1.norm.weight", (160,)), ("blocks.0.ffn1.norm.bias", (160,)),
    ("blocks.0.ffn1.fc1.weight", (320, 160)), ("blocks.0.ffn1.fc1.bias", (320,)),
    ("blocks.0.ffn1.fc2.weight", (160, 320)), ("blocks.0.ffn1.fc2.bias", (160,)),
    ("blocks.0.attn.norm.weight", (160,)), ("blocks.0.attn.norm.bias", (160,)),
    ("blocks.0.attn.qkv.weight", (480, 160, 1)), ("blocks.0.attn.qkv.bias", (480,)),
    ("blocks.0.attn.proj.weight", (160, 160, 1)), ("blocks.0.attn.proj.bias", (160,)),
    ("blocks.0.conv.norm.weight", (160,)), ("blocks.0.conv.norm.bias", (160,)),
    ("blocks.0.conv.dw.weight", (160, 1, 5)), ("blocks.0.conv.dw.bias", (160,)),
    ("blocks.0.conv.pw.weight", (160, 160, 1)), ("blocks.0.conv.pw.bias", (160,)),
    ("blocks.0.ffn2.norm.weight", (160,)), ("blocks.0.ffn2.norm.bias", (160,)),
    ("blocks.0.ffn2.fc1.weight", (320, 160)), ("blocks.0.ffn2.fc1.bias", (320,)),
    ("blocks.0.ffn2.fc2.weight", (160, 320)), ("blocks.0.ffn2.fc2.bias", (160,)),
    ("blocks.0.norm.weight", (160,)), ("blocks.0.norm.bias", (160,)),
    ("blocks.1.ffn1.norm.weight", (160,)),
]
CONFORMER_TAIL = [
    ("blocks.2.norm.weight", (160,)), ("blocks.2.norm.bias", (160,)),
    ("bottleneck.weight", (14, 320)), ("bottleneck.bias", (14,)),
    *[(f"heads.{k}.{p}", (1, 14) if p == "weight" else (1,)) for k in range(12) for p in ("weight", "bias")],
]


def _shape_list(sd):
    return [(k, v.shape) for k, v in sd.items()]


def test_export_conformer_names_shapes_order(conformer_mixed):
    sd = to_torch_state_dict("conformer", {"params": conformer_mixed})
    items = _shape_list(sd)
    assert len(items) == 6 + 30 * 8 + 2 + 3 * 26 + 2 + 24 == 352
    assert items[: len(CONFORMER_HEAD)] == CONFORMER_HEAD
    i = [k for k, _ in items].index("down.weight")
    assert i == 6 + 30 * 8
    assert items[i : i + len(CONFORMER_TRANSFORMER)] == CONFORMER_TRANSFORMER
    assert items[-len(CONFORMER_TAIL):] == CONFORMER_TAIL
    assert [k for k, _ in items] == torch_layout("conformer")
    assert sum(v.size for v in sd.values()) == 1_827_634
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in sd.values())
    # layouts: conv (k, in, out) -> (out, in, k), dense (in, out) -> (out, in)
    k = np.asarray(conformer_mixed["stem_0"]["kernel"])
    assert sd["stem.0.weight"][7, 3, 1] == k[1, 3, 7]
    np.testing.assert_array_equal(sd["blocks.1.ffn1.fc1.weight"], np.asarray(conformer_mixed["blocks_1"]["ffn1"]["fc1"]["kernel"]).T)
    np.testing.assert_array_equal(sd["heads.4.weight"][0], di.simplex_etf(13, 14)[4].astype(np.float32))
    # params alone give the same dict; round trip back to Flax is exact
    assert _shape_list(to_torch_state_dict("conformer", conformer_mixed)) == items
    back = from_torch_state_dict("conformer", sd)["params"]
    assert jax.tree.structure(back) == jax.tree.structure(jax.tree.map(np.asarray, conformer_mixed))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(conformer_mixed)))
    # usable for the PyTorch-order hash: raw bytes in this order
    from detjax.hashing import ordered_digests
    raw = hashlib.md5(b"".join(v.tobytes() for v in sd.values())).hexdigest()
    assert ordered_digests(sd, headers=False)["md5"] == raw


def _zeros(abstract):
    variables = abstract[1]
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), {k: variables[k] for k in ("params", "batch_stats")})


def test_export_baseline_names_shapes_order(baseline_abstract):
    variables = _zeros(baseline_abstract)
    sd = to_torch_state_dict("baseline", variables)
    items = _shape_list(sd)
    bn = lambda p, c: [(f"{p}.bn.{n}", (c,)) for n in ("weight", "bias", "running_mean", "running_var")]  # noqa: E731
    assert items[:12] == [("stem.conv.weight", (64, 12, 5)), ("stem.conv.bias", (64,)), *bn("stem", 64),
                          ("stages.0.0.conv.weight", (64, 64, 5)), ("stages.0.0.conv.bias", (64,)), *bn("stages.0.0", 64)]
    names = [k for k, _ in items]
    assert sd["stages.1.0.conv.weight"].shape == (128, 64, 5) and sd["stages.2.0.conv.weight"].shape == (256, 128, 5)
    assert names.index("stages.1.0.conv.weight") == names.index("stages.0.2.bn.running_var") + 1
    assert items[-8:] == [*bn("stages.2.3", 256), ("head.1.weight", (128, 512)), ("head.1.bias", (128,)),
                          ("head.4.weight", (12, 128)), ("head.4.bias", (12,))]
    assert len(items) == 13 * 6 + 4 and names == torch_layout("baseline")
    assert sum(v.size for v in sd.values()) == 1_653_772 + 3_840
    # optional num_batches_tracked, int64 scalar right after running_var, as in PyTorch
    sd_n = to_torch_state_dict("baseline", variables["params"], variables["batch_stats"], num_batches_tracked=5)
    keys = list(sd_n)
    assert len(keys) == len(items) + 13 and keys[6] == "stem.bn.num_batches_tracked"
    assert sd_n["stem.bn.num_batches_tracked"].dtype == np.int64 and sd_n["stem.bn.num_batches_tracked"] == 5
    back = from_torch_state_dict("baseline", sd_n)
    assert sorted(back) == ["batch_stats", "params"]
    assert count_params(back["params"]) == 1_653_772 and count_params(back["batch_stats"]) == 3_840


def test_export_rejects_mismatched_variables(baseline_abstract):
    variables = _zeros(baseline_abstract)
    with pytest.raises(ValueError, match="batch_stats/stem/bn/mean"):
        to_torch_state_dict("baseline", variables["params"])  # statistics missing
    extra = {"params": {**variables["params"], "spare": {"kernel": np.zeros(3)}}, "batch_stats": variables["batch_stats"]}
    with pytest.raises(ValueError, match="params/spare/kernel"):
        to_torch_state_dict("baseline", extra)
    with pytest.raises(ValueError, match="'lstm'"):
        to_torch_state_dict("lstm", variables)
    sd = to_torch_state_dict("baseline", variables)
    del sd["head.1.bias"]
    with pytest.raises(ValueError, match="head.1.bias"):
        from_torch_state_dict("baseline", sd)


def test_export_resnet18_follows_torchvision_order():
    resnet = pytest.importorskip("detjax.models.resnet")
    model = resnet.ResNet18(num_classes=2, in_channels=1)
    x = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), dict(variables))
    sd = to_torch_state_dict("resnet18", variables, num_batches_tracked=0)
    assert len(sd) == 122  # torchvision's resnet18().state_dict() has 122 entries
    sd = to_torch_state_dict("resnet18", variables)
    items = _shape_list(sd)
    assert len(items) == 102 and [k for k, _ in items] == torch_layout("resnet18", 2)
    bn = lambda p, c: [(f"{p}.{n}", (c,)) for n in ("weight", "bias", "running_mean", "running_var")]  # noqa: E731
    assert items[:11] == [("conv1.weight", (64, 1, 3, 3)), *bn("bn1", 64), ("layer1.0.conv1.weight", (64, 64, 3, 3)),
                          *bn("layer1.0.bn1", 64), ("layer1.0.conv2.weight", (64, 64, 3, 3))]
    names = [k for k, _ in items]
    i = names.index("layer2.0.downsample.0.weight")
    assert names[i - 5 : i + 6] == ["layer2.0.conv2.weight", *[n for n, _ in bn("layer2.0.bn2", 128)],
                                    "layer2.0.downsample.0.weight", *[n for n, _ in bn("layer2.0.downsample.1", 128)],
                                    "layer2.1.conv1.weight"]
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert "layer1.0.downsample.0.weight" not in sd
    assert items[-2:] == [("fc.weight", (2, 512)), ("fc.bias", (2,))]
    assert sum(v.size for v in sd.values()) == 11_168_706 + 2 * 4_800
    k = np.asarray(variables["params"]["layer3_1"]["conv2"]["kernel"])
    assert sd["layer3.1.conv2.weight"][5, 7, 0, 2] == k[0, 2, 7, 5]
    back = from_torch_state_dict("resnet18", sd)
    flat_back = dict(jax.tree_util.tree_flatten_with_path(back)[0])
    flat_orig = dict(jax.tree_util.tree_flatten_with_path(variables)[0])
    assert flat_back.keys() == flat_orig.keys()
    assert all(np.array_equal(flat_back[p], flat_orig[p]) for p in flat_orig)
