#!/usr/bin/env python
"""Why a scan over the Conformer's repeated blocks was slow, and what it would buy (docs/RESULTS.md §3).

Stage 2 of the ECG Conformer is 22 identical stride-1 bottleneck blocks at ``(128, 63, 160)``.
This times the gradient of ``sum(out**2)`` through those 22 blocks (their own parameters, as
separate trees or stacked for the scan), one fresh process per variant::

    python benchmarks/bench_scan_blocks.py unrolled-flax   # detjax as it is: the model's BottleneckBlock, unrolled
    python benchmarks/bench_scan_blocks.py scan-flax       # the same block under jax.lax.scan
    python benchmarks/bench_scan_blocks.py unrolled-mm     # the block with its convs written as matmuls, unrolled
    python benchmarks/bench_scan_blocks.py scan-mm         # ... under jax.lax.scan
    python benchmarks/bench_scan_blocks.py scan-lax        # 1x1 convs as matmuls, the k=5 conv as lax.conv, scanned

Prints the XLA compile time, the first run, the median of the later runs, the temporaries
(``memory_analysis``) and the loss (the variants agree to float32 rounding, not bitwise).
2 threads, deterministic configuration, no compilation cache.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detjax import determinism

determinism.configure(cpu_threads=2)
import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_compilation_cache", False)
from detjax.models import layers as L
from detjax.models.conformer import BottleneckBlock

VARIANTS = ("unrolled-flax", "scan-flax", "unrolled-mm", "scan-mm", "scan-lax")
BLOCKS, RUNS = 22, 5


def pointwise(h, p):
    """A 1x1 conv as a matmul over channels."""
    return jnp.einsum("btc,co->bto", h, p["kernel"][0], precision=L.PRECISION) + p["bias"]


def conv_k5(h, p, as_matmul):
    """The k=5, stride-1, pad-2 conv: im2col + one matmul, or lax.conv_general_dilated."""
    if not as_matmul:
        return jax.lax.conv_general_dilated(h, p["kernel"], (1,), [(2, 2)], precision=L.PRECISION,
                                            dimension_numbers=("NWC", "WIO", "NWC")) + p["bias"]
    t = h.shape[1]
    padded = jnp.pad(h, ((0, 0), (2, 2), (0, 0)))
    patches = jnp.stack([padded[:, i:i + t] for i in range(5)], axis=2)  # (B, T, 5, C)
    return jnp.einsum("btkc,kco->bto", patches, p["kernel"], precision=L.PRECISION) + p["bias"]


def layer_norm(h, p):
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    return (h - mu) * jax.lax.rsqrt(var + L.LN_EPSILON) * p["scale"] + p["bias"]


def functional_block(h, p, as_matmul):
    """BottleneckBlock's math on its parameter tree, convs written by hand."""
    a = L.gelu(pointwise(h, p["conv1"]))
    a = L.gelu(conv_k5(a, p["conv2"], as_matmul))
    a = pointwise(a, p["conv3"])
    return layer_norm(L.gelu(a + h), p["norm"])


def main(variant: str) -> None:
    if variant not in VARIANTS:
        raise SystemExit(f"variant must be one of {VARIANTS}, got {variant!r}")
    block = BottleneckBlock(stage="stage2", init_mode="dct")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((128, 63, 160), dtype=np.float32))
    base = block.init(jax.random.key(0), x)["params"]
    trees = [jax.tree.map(lambda a, i=i: a * (1 + 0.01 * i), base) for i in range(BLOCKS)]
    kind, body = variant.split("-")
    if body == "flax":
        apply = lambda h, p: block.apply({"params": p}, h)  # noqa: E731
    else:
        apply = lambda h, p: functional_block(h, p, as_matmul=body == "mm")  # noqa: E731

    if kind == "unrolled":
        def loss(params, h):
            for p in params:
                h = apply(h, p)
            return jnp.sum(h ** 2)
        params = trees
    else:
        def loss(params, h):
            h, _ = jax.lax.scan(lambda c, p: (apply(c, p), None), h, params)
            return jnp.sum(h ** 2)
        params = jax.tree.map(lambda *a: jnp.stack(a), *trees)

    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, x).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        value, _ = jax.block_until_ready(compiled(params, x))
        times.append(time.perf_counter() - t0)
    temp_mb = compiled.memory_analysis().temp_size_in_bytes / 1e6
    print(f"{variant:14s} compile {compile_s:5.2f} s  first run {times[0]:5.3f} s  "
          f"later runs {np.median(times[1:]):5.3f} s  temporaries {temp_mb:7.1f} MB  loss {float(value):.6g}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
