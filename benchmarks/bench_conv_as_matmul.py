#!/usr/bin/env python
"""One-off lever check for docs/RESULTS.md §3: every ``groups=1`` conv1d of an ECG model as an
im2col matmul (same parameters, same names) against XLA's convolution, one process each.

    python benchmarks/bench_conv_as_matmul.py conformer xla     # XLA convolution (detjax as it is)
    python benchmarks/bench_conv_as_matmul.py conformer mm      # im2col matmul
    python benchmarks/bench_conv_as_matmul.py conformer mm --xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=268435456 \
        python benchmarks/bench_conv_as_matmul.py conformer xla   # glibc malloc kept warm

Prints the first-step time, samples/s (median of 5 steps, batch 128, 2 threads) and the final
state's hash.
"""
import os
import sys
import time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detjax import determinism
determinism.configure(cpu_threads=2, extra_xla_flags=sys.argv[3:] )
import jax, numpy as np, jax.numpy as jnp, flax.linen as nn
jax.config.update("jax_enable_compilation_cache", False)
import detjax.initializers as di
from detjax.models import layers as L

class MatmulConv1D(nn.Module):
    features: int; kernel_size: int; stride: int; pad: int; kernel_init: object; bias_init: object
    @nn.compact
    def __call__(self, x):
        k, cin = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (k, cin, self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        if k == 1 and self.stride == 1:
            return jnp.einsum("btc,cf->btf", x, kernel[0], precision=L.PRECISION) + bias
        out_len = L.conv_output_length(x.shape[1], k, self.stride, self.pad)
        xp = jnp.pad(x, ((0, 0), (self.pad, self.pad), (0, 0)))
        limit = self.stride * (out_len - 1) + 1
        taps = [jax.lax.slice_in_dim(xp, j, j + limit, self.stride, axis=1) for j in range(k)]
        patches = jnp.concatenate(taps, axis=-1)
        return jnp.einsum("btc,cf->btf", patches, kernel.reshape(k * cin, self.features), precision=L.PRECISION) + bias

orig = L.conv1d
def conv1d(x, features, kernel_size, *, stage, init_mode, variant, name, stride=1, groups=1, scale=1.0, released_name=None):
    if groups != 1:
        return orig(x, features, kernel_size, stage=stage, init_mode=init_mode, variant=variant, name=name, stride=stride, groups=groups, scale=scale, released_name=released_name)
    return MatmulConv1D(features, kernel_size, stride, L.torch_padding(kernel_size),
                        di.kernel_init(init_mode, stage, scale=scale, variant=variant, released_name=released_name),
                        di.bias_init(init_mode, x.shape[-1] * kernel_size), name=name)(x)
if sys.argv[2] == "mm":
    L.conv1d = conv1d
from detjax.models import get_model
from detjax import hashing
from detjax.train import TrainConfig, create_train_state, make_optimizer, make_gather_step, pos_weights, _state_dict
arch = sys.argv[1]
x = np.random.default_rng(0).standard_normal((256, 1000, 12)).astype(np.float32)
y = (np.random.default_rng(1).random((256, 12)) < .2).astype(np.float32)
cfg = TrainConfig(task="ptbxl", arch=arch, init="mixed", epochs=2, batch_size=128)
model = get_model(arch, num_classes=12, init_mode="mixed")
tx = make_optimizer(cfg, 2)
st = create_train_state(model, tx, x[:1], 0)
print("init", hashing.tree_sha256(_state_dict(st))[:12])
step = make_gather_step(model, tx, cfg, pos_weights(y))
xd, yd = jax.device_put(x), jax.device_put(y)
idx = jnp.arange(128, dtype=jnp.int32)
t = time.perf_counter(); c = step.lower(st, idx, xd, yd).compile(); st, m = c(st, idx, xd, yd); jax.block_until_ready(st); print("first step", round(time.perf_counter() - t, 1))
ts = []
for i in range(5):
    t = time.perf_counter(); st, m = c(st, (idx + 128 * (i % 2)) % 256, xd, yd); jax.block_until_ready(st); ts.append(time.perf_counter() - t)
print(arch, sys.argv[2], sys.argv[3:], "samples/s", round(128 / np.median(ts), 1), "loss", float(m["loss"]), "state", hashing.tree_sha256(_state_dict(st))[:12])
