"""Tests of detjax.models.resnet.ResNet18: size, init wiring and values, BN, one SGD step.

CPU compile time dominates: each model is initialised once (module fixtures), the train
step is compiled once at a low XLA optimisation level (same semantics, 5× faster to
build), batch 2.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import detjax.initializers as di
from detjax.models import count_params, get_model
from detjax.models.resnet import NUM_PARAMS, ResNet18, param_count

X_SHAPE = (2, 28, 28, 1)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
BLOCKS = [f"layer{s}_{b}" for s in range(1, 5) for b in range(2)]


def _record_inits(fn):
    """Run ``fn()`` (which initialises a model) and record every Conv/Dense's initialisers."""
    inits = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, (nn.Conv, nn.Dense)) and context.method_name == "__call__":
            inits["/".join(module.scope.path)] = (module.kernel_init, module.bias_init)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        out = fn()
    return out, inits


def _init(init_mode):
    model = ResNet18(num_classes=2, in_channels=1, init_mode=init_mode)
    x = jnp.zeros(X_SHAPE, jnp.float32)
    compiled = lambda: jax.jit(model.init).lower(jax.random.key(0), x).compile(compiler_options=FAST_COMPILE)  # noqa: E731
    exe, inits = _record_inits(compiled)
    return model, jax.device_get(exe(jax.random.key(0), x)), inits


@pytest.fixture(scope="module")
def dct():
    return _init("dct")


@pytest.fixture(scope="module")
def mixed():
    return _init("mixed")


def _kernel(variables, path):
    node = variables["params"]
    for key in path.split("/"):
        node = node[key]
    return np.asarray(node["kernel"])


def _filter_std(kernel):
    """Population std of each output filter of a Flax (kh, kw, in, out) kernel."""
    return kernel.astype(np.float64).reshape(-1, kernel.shape[-1]).std(axis=0)


# ----------------------------------------------------------------------------- size
def test_param_count_breastmnist_is_exact():
    model = ResNet18(num_classes=2, in_channels=1, init_mode="he_normal")
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    assert count_params(shapes["params"]) == NUM_PARAMS == 11_168_706
    # BN running statistics are not parameters: mean + var for every BN channel.
    bn_channels = 64 + 2 * 2 * 64 + sum(2 * 2 * w + w for w in (128, 256, 512))
    assert count_params(shapes["batch_stats"]) == 2 * bn_channels == 9600
    # BN scale + bias are: params = convs (no bias) + 2 * BN channels + head.
    convs = sum(
        int(np.prod(leaf.shape))
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes["params"])
        if path[-1].key == "kernel" and len(leaf.shape) == 4
    )
    assert convs + 2 * bn_channels + 512 * 2 + 2 == NUM_PARAMS


def test_reduced_width_scales_every_stage():
    model = ResNet18(num_classes=2, in_channels=1, init_mode="dct", width=16)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    # Widths 16/32/64/128: each 3x3 conv has 1/16 of the weights; BN and head shrink by 4.
    assert count_params(shapes["params"]) == 700_146
    assert shapes["params"]["layer4_1"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert shapes["params"]["conv1"]["kernel"].shape == (3, 3, 1, 16)
    with pytest.raises(ValueError, match="width"):
        ResNet18(num_classes=2, in_channels=1, width=0).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


@pytest.mark.parametrize("in_channels,num_classes,expected", [(3, 10, 11_173_962), (3, 9, None), (1, 14, None)])
def test_param_count_formula(in_channels, num_classes, expected):
    model = ResNet18(num_classes=num_classes, in_channels=in_channels, init_mode="he_normal")
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, in_channels)))
    n = count_params(shapes["params"])
    assert n == param_count(in_channels, num_classes)
    if expected is not None:  # the well-known CIFAR ResNet-18 count
        assert n == expected


def test_shapes_strides_and_names():
    model = ResNet18(num_classes=9, in_channels=3, init_mode="he_normal")
    x = jnp.zeros((1, 28, 28, 3))
    logits, state = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x))
    assert logits.shape == (1, 9) and logits.dtype == jnp.float32
    _, inter = jax.eval_shape(lambda v: model.apply(v, x, mutable=["intermediates"]), state)
    sizes = {k: v[0].shape for k, v in inter["intermediates"].items()}
    assert sizes == {
        "stem": (1, 28, 28, 64), "stage0": (1, 28, 28, 64), "stage1": (1, 14, 14, 128),
        "stage2": (1, 7, 7, 256), "stage3": (1, 4, 4, 512), "pooled": (1, 512),
    }
    params = state["params"]
    assert set(params) == {"conv1", "bn1", "fc", *BLOCKS}
    assert params["conv1"]["kernel"].shape == (3, 3, 3, 64) and "bias" not in params["conv1"]
    for block in BLOCKS:
        has_shortcut = block in ("layer2_0", "layer3_0", "layer4_0")
        assert ("downsample_0" in params[block]) == has_shortcut
    assert params["layer3_0"]["downsample_0"]["kernel"].shape == (1, 1, 128, 256)
    assert params["fc"]["kernel"].shape == (512, 9) and params["fc"]["bias"].shape == (9,)
    # larger MedMNIST+ images work too (global pool)
    assert jax.eval_shape(model.apply, state, jnp.zeros((1, 64, 64, 3))).shape == (1, 9)


def test_bad_input_and_init_rejected():
    model = ResNet18(num_classes=2, in_channels=1, init_mode="he_normal")
    with pytest.raises(ValueError, match=r"\(B, H, W, 1\).*\(1, 28, 28, 3\)"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 3)))
    with pytest.raises(ValueError, match="unknown init 'kaiming'"):
        jax.eval_shape(ResNet18(2, 1, init_mode="kaiming").init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


def test_registry_maps_init_to_init_mode():
    model = get_model("resnet18", num_classes=2, in_channels=1, init="hartley", variant="orthonormal")
    assert isinstance(model, ResNet18) and model.init_mode == "hartley" and model.variant == "orthonormal"


# ----------------------------------------------------------------------------- init wiring
def test_he_normal_wiring_is_torchvision_style():
    model = ResNet18(num_classes=2, in_channels=1, init_mode="he_normal")
    _, inits = _record_inits(lambda: jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(X_SHAPE)))
    assert len(inits) == 1 + 8 * 2 + 3 + 1  # stem, 2 convs per block, 3 shortcuts, head
    for path, (kernel_init, _) in inits.items():
        if path != "fc":
            assert isinstance(kernel_init, di.HeNormal), path  # no fixup: He-normal ignores scale
    fc_kernel, fc_bias = inits["fc"]
    assert isinstance(fc_kernel, di.KaimingUniform) and fc_kernel.a == math.sqrt(5.0)
    assert isinstance(fc_bias, di.UniformBias) and fc_bias.fan_in == 512


def test_structured_wiring_stage_scale_and_head(dct, mixed):
    for (_, _, inits), mode in ((dct, "dct"), (mixed, "mixed")):
        for path, (kernel_init, bias_init) in inits.items():
            assert isinstance(kernel_init, di.Structured), path
            stage = "stem" if path == "conv1" else "head" if path == "fc" else f"stage{int(path[5]) - 1}"
            assert kernel_init.stage == stage, path
            expected_basis = di.MIXED_SCHEDULE[stage] if mode == "mixed" else "dct"
            assert kernel_init.name == expected_basis, path
            assert kernel_init.scale == (0.01 if path.endswith("/conv2") else 1.0), path
            assert kernel_init.per_filter == (True if path == "fc" else None), path
        assert isinstance(inits["fc"][1], di.Zeros)


# ----------------------------------------------------------------------------- init values
def _dct_matrix(n):
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    c = np.where(i == 0, math.sqrt(1 / n), math.sqrt(2 / n))
    return c * np.cos(math.pi * i * (2 * j + 1) / (2 * n))


def test_stem_equals_independent_separable_dct_construction(dct):
    """docs/method.md §3, 2-D rule, built here with np.cos: channel vector [1] (1×1 DCT) ⊗ the 9
    outer products of 3-point DCT rows, repeated cyclically to 64, per-filter rescaled."""
    d3 = _dct_matrix(3)
    patterns = [np.outer(d3[a], d3[b]) for a in range(3) for b in range(3)]
    expected = np.zeros((3, 3, 1, 64))
    for f in range(64):
        w = patterns[f % 9]
        w = w - w.mean()
        if w.std() >= 1e-10:
            expected[:, :, 0, f] = w / w.std() / math.sqrt(3 * 9)
    stem = _kernel(dct[1], "conv1")
    np.testing.assert_allclose(stem, expected, rtol=0, atol=1e-7)
    zero = [f for f in range(64) if not stem[..., f].any()]
    assert zero == [0, 9, 18, 27, 36, 45, 54, 63]  # DC⊗DC, every 9th filter


def test_dc_dc_filter_is_zero_and_others_have_unit_rule_std(dct):
    k = _kernel(dct[1], "layer1_0/conv1")  # 64 -> 64: filter 0 = DC channel ⊗ DC pattern
    assert not k[..., 0].any()
    std = _filter_std(k)[1:]
    np.testing.assert_allclose(std, 1 / math.sqrt(3 * 64 * 9), rtol=1e-5)


def test_fixup_second_conv_std_is_one_hundredth(dct):
    for block in BLOCKS:
        c1, c2 = _kernel(dct[1], f"{block}/conv1"), _kernel(dct[1], f"{block}/conv2")
        fan_in2 = 9 * c2.shape[2]
        std1, std2 = _filter_std(c1), _filter_std(c2)
        live1, live2 = std1 > 0, std2 > 0
        np.testing.assert_allclose(std1[live1], 1 / math.sqrt(3 * 9 * c1.shape[2]), rtol=1e-5)
        np.testing.assert_allclose(std2[live2], 0.01 / math.sqrt(3 * fan_in2), rtol=1e-5)
        # conv2 is the per-filter rule at scale 1, times 0.01
        unscaled = di.conv2d_kernel("dct", 3, 3, c2.shape[2], c2.shape[3])
        np.testing.assert_allclose(c2, 0.01 * unscaled, rtol=1e-6, atol=1e-12)
    # shortcut convs carry no fixup
    sc = _kernel(dct[1], "layer2_0/downsample_0")
    np.testing.assert_allclose(_filter_std(sc)[_filter_std(sc) > 0], 1 / math.sqrt(3 * 64), rtol=1e-5)


def test_dct_head_is_per_row_rule(dct):
    fc = dct[1]["params"]["fc"]
    kernel, bias = np.asarray(fc["kernel"]), np.asarray(fc["bias"])
    assert kernel.shape == (512, 2) and not bias.any()
    assert not kernel[:, 0].any()  # DCT row 0 is constant: centred to zero
    row1 = np.cos(math.pi * (2 * np.arange(512) + 1) / 1024)  # DCT row 1 up to its scale
    expected = (row1 - row1.mean()) / row1.std() / math.sqrt(3 * 512)
    np.testing.assert_allclose(kernel[:, 1], expected, rtol=0, atol=1e-7)


def test_mixed_uses_basis_per_stage_and_differs_from_dct(dct, mixed):
    dv, mv = dct[1], mixed[1]
    same = ["conv1", "layer1_0/conv1", "layer1_1/conv2", "layer4_0/conv1", "layer4_0/downsample_0"]
    for path in same:  # stem, stage0, stage3: DCT in both
        np.testing.assert_array_equal(_kernel(mv, path), _kernel(dv, path))
    np.testing.assert_array_equal(np.asarray(mv["params"]["fc"]["kernel"]), np.asarray(dv["params"]["fc"]["kernel"]))
    for path, basis in [("layer2_0/conv1", "hadamard"), ("layer2_1/conv2", "hadamard"), ("layer3_0/conv1", "hartley")]:
        k = _kernel(mv, path)
        scale = 0.01 if path.endswith("conv2") else 1.0
        np.testing.assert_array_equal(k, di.conv2d_kernel(basis, 3, 3, k.shape[2], k.shape[3], scale=scale))
        assert not np.array_equal(k, _kernel(dv, path))
    sc = _kernel(mv, "layer3_0/downsample_0")
    np.testing.assert_array_equal(sc, di.conv2d_kernel("hartley", 1, 1, 128, 256))
    # BN starts at scale 1, bias 0, mean 0, var 1 in every mode
    bn = mv["params"]["layer2_0"]["bn1"]
    assert (np.asarray(bn["scale"]) == 1).all() and not np.asarray(bn["bias"]).any()
    stats = mv["batch_stats"]["layer2_0"]["bn1"]
    assert not np.asarray(stats["mean"]).any() and (np.asarray(stats["var"]) == 1).all()


# ----------------------------------------------------------------------------- training
def _stem_conv_numpy(x, kernel):
    """3×3 conv, zero padding 1, stride 1, cross-correlation (as XLA/PyTorch)."""
    b, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, h, w, kernel.shape[-1]))
    for u in range(3):
        for v in range(3):
            out += np.einsum("bhwc,co->bhwo", xp[:, u : u + h, v : v + w, :], kernel[u, v])
    return out


def test_one_sgd_step_updates_params_and_batch_stats(dct):
    """One jitted SGD step (momentum .9, weight decay 5e-4 added to the gradient as in
    PyTorch) from the DCT init, plus an eval-mode forward, compiled together once."""
    model, variables, _ = dct
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))

    def step(params, batch_stats, x, y, x_eval):
        def loss_fn(p):
            logits, updates = model.apply(
                {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, _ = tx.update(grads, tx.init(params), params)
        eval_logits = model.apply({"params": params, "batch_stats": batch_stats}, x_eval, train=False)
        return optax.apply_updates(params, updates), new_stats, loss, grads, eval_logits

    rng = np.random.default_rng(0)
    x = rng.normal(size=X_SHAPE).astype(np.float32)
    y = np.array([0, 1], np.int32)
    other = rng.normal(size=(1, *X_SHAPE[1:])).astype(np.float32)
    x_eval = np.concatenate([x, x[:1], other])  # rows 0 and 2 are the same image
    params, stats = variables["params"], variables["batch_stats"]
    args = (params, stats, x, y, x_eval)
    exe = jax.jit(step).lower(*args).compile(compiler_options=FAST_COMPILE)
    new_params, new_stats, loss, grads, eval_logits = jax.device_get(exe(*args))

    assert np.isfinite(loss) and 0.0 < loss < 5.0
    # every parameter leaf moved; first momentum step: p' = p - lr (g + wd p)
    for (path, p), p_new, g in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(new_params), jax.tree_util.tree_leaves(grads)
    ):
        assert not np.array_equal(p, p_new), jax.tree_util.keystr(path)
        np.testing.assert_allclose(p_new, p - 0.1 * (g + 5e-4 * p), rtol=1e-5, atol=1e-9)

    # train-mode forward updated the running statistics with PyTorch's rule:
    # mean' = 0.9·0 + 0.1·μ_B, var' = 0.9·1 + 0.1·σ²_B·n/(n-1), on the stem conv output
    z = _stem_conv_numpy(x.astype(np.float64), _kernel(variables, "conv1").astype(np.float64))
    n = z.shape[0] * z.shape[1] * z.shape[2]
    mu, var = z.reshape(n, -1).mean(0), z.reshape(n, -1).var(0) * n / (n - 1)
    np.testing.assert_allclose(new_stats["bn1"]["mean"], 0.1 * mu, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(new_stats["bn1"]["var"], 0.9 + 0.1 * var, rtol=1e-4, atol=1e-7)
    for block in BLOCKS:
        assert np.asarray(new_stats[block]["bn2"]["mean"]).any(), block

    # eval mode normalises with the running statistics: a sample's logits do not depend
    # on the rest of the batch
    assert eval_logits.shape == (4, 2)
    np.testing.assert_allclose(eval_logits[2], eval_logits[0], rtol=1e-6, atol=1e-7)
    assert not np.allclose(eval_logits[3], eval_logits[1])

    # same inputs, same compiled step: bit-identical results
    again = jax.device_get(exe(*args))
    for a, b in zip(jax.tree_util.tree_leaves(again[:3]), jax.tree_util.tree_leaves((new_params, new_stats, loss))):
        np.testing.assert_array_equal(a, b)


def test_mixed_as_released_follows_the_released_layer_names():
    # The released rule on torchvision names: layer1 Hadamard, layer2 Hartley, layer3 and
    # layer4 DCT (no match for "layer4"), stem and head DCT; the shortcut follows its layer.
    rows = di.describe(ResNet18(num_classes=2, in_channels=1, init_mode="mixed_as_released"),
                       jnp.zeros(X_SHAPE, jnp.float32))
    basis = {r.path: r.init.split("/")[0] for r in rows}
    expected_by_layer = {"layer1": "hadamard", "layer2": "hartley", "layer3": "dct", "layer4": "dct"}
    assert basis.pop("conv1") == "dct" and basis.pop("fc") == "dct"
    assert len(basis) == 8 * 2 + 3
    for path, name in basis.items():
        assert name == expected_by_layer[path[:6]], path
    assert basis["layer2_0/downsample_0"] == "hartley"
