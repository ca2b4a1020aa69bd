"""Time to build every structured kernel of the ECG Conformer (docs/method.md §7).

Builds all 119 weight kernels of the 1,827,634-parameter ECG Conformer (shapes enumerated
from docs/method.md §7, Flax layouts, with their explicit stages and fixup scales) with each
structured basis and with "mixed", and compares against jax's own
``jax.nn.initializers.orthogonal()`` on the same shapes (jitted per shape, block_until_ready).

Reported per init: the first call (structured: empty basis cache, after a one-time warm-up of
JAX's host-to-device transfer for each shape; orthogonal: includes the XLA compilation of every
distinct shape) and the median of ``--repeats`` later calls, plus the
ratio structured / orthogonal of the medians. The 12 ETF head kernels (14, 1) are timed as a
separate row.

Usage: cd /work/main && PYTHONPATH=. python benchmarks/bench_init.py [--repeats 7]
       [--variant reference|orthonormal]
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import jax
import numpy as np

import detjax.initializers as di

C, D = 160, 40  # Conformer width, bottleneck width
BLOCKS = {"stage0": 3, "stage1": 4, "stage2": 23}


def conformer_kernels() -> list[tuple[str, str, tuple[int, ...], float]]:
    """(layer, stage, Flax kernel shape, fixup scale) for every weight kernel but the ETF heads."""
    out = [("stem.conv0", "stem", (5, 12, D), 1.0), ("stem.conv1", "stem", (5, D, D), 1.0),
           ("stem.conv2", "stem", (5, D, C), 1.0)]
    for stage, n in BLOCKS.items():
        for b in range(n):
            out += [(f"{stage}.{b}.reduce", stage, (1, C, D), 1.0),
                    (f"{stage}.{b}.conv", stage, (5, D, D), 1.0),
                    (f"{stage}.{b}.expand", stage, (1, D, C), di.FIXUP_SCALE)]
    out.append(("down", "stage3", (5, C, C), 1.0))
    for b in range(3):
        p = f"conformer.{b}"
        out += [(f"{p}.ffn1.up", "transformer", (C, 2 * C), 1.0),
                (f"{p}.ffn1.down", "transformer", (2 * C, C), 1.0),
                (f"{p}.mhsa.qkv", "transformer", (1, C, 3 * C), 1.0),
                (f"{p}.mhsa.out", "transformer", (1, C, C), 1.0),
                (f"{p}.conv.depthwise", "transformer", (5, 1, C), 1.0),
                (f"{p}.conv.pointwise", "transformer", (1, C, C), 1.0),
                (f"{p}.ffn2.up", "transformer", (C, 2 * C), 1.0),
                (f"{p}.ffn2.down", "transformer", (2 * C, C), 1.0)]
    out.append(("head.bottleneck", "head", (2 * C, 14), 1.0))
    return out


def parameter_count(kernels) -> int:
    """Kernels + biases + LayerNorms + 12 ETF heads; must be 1,827,634."""
    weights = sum(math.prod(s) + s[-1] for _, _, s, _ in kernels)
    layer_norms = 30 * 2 * C + 3 * 5 * 2 * C
    return weights + layer_norms + 12 * (14 + 1)


def time_structured(init: str, kernels, variant: str) -> float:
    start = time.perf_counter()
    for _, stage, shape, scale in kernels:
        di.kernel_init(init, stage, scale=scale, variant=variant)(None, shape).block_until_ready()
    return time.perf_counter() - start


def time_etf() -> float:
    start = time.perf_counter()
    for k in range(12):
        di.etf_head_init(k)(None, (14, 1)).block_until_ready()
    return time.perf_counter() - start


def time_orthogonal(fns, kernels, keys) -> float:
    start = time.perf_counter()
    for (_, _, shape, _), key in zip(kernels, keys):
        fns[shape](key).block_until_ready()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--variant", choices=di.VARIANTS, default="reference")
    args = parser.parse_args(argv)
    kernels = conformer_kernels()
    n_params = parameter_count(kernels)
    assert n_params == 1_827_634, n_params

    orth = jax.nn.initializers.orthogonal()
    fns = {s: jax.jit(lambda k, s=s: orth(k, s)) for s in {s for _, _, s, _ in kernels}}
    keys = [jax.random.fold_in(jax.random.key(0), i) for i in range(len(kernels))]
    jax.block_until_ready(keys)
    rows = {}
    first = time_orthogonal(fns, kernels, keys)  # compiles every distinct shape
    rows["jax orthogonal (jit)"] = (first, statistics.median(
        time_orthogonal(fns, kernels, keys) for _ in range(args.repeats)))
    # One-time JAX host->device transfer set-up is not part of building a basis: pay it first.
    for shape in fns:
        jax.numpy.asarray(np.zeros(shape, np.float32)).block_until_ready()
    for init in (*di.BASES, "mixed"):
        di.clear_basis_cache()
        first = time_structured(init, kernels, args.variant)
        rows[f"{init} ({args.variant})"] = (first, statistics.median(
            time_structured(init, kernels, args.variant) for _ in range(args.repeats)))
    etf = (time_etf(), statistics.median(time_etf() for _ in range(args.repeats)))

    base = rows["jax orthogonal (jit)"][1]
    print(f"ECG Conformer: {len(kernels)} kernels ({sum(math.prod(s) for _, _, s, _ in kernels):,} "
          f"weights; model {n_params:,} params), {len(fns)} distinct shapes; "
          f"median of {args.repeats}; baseline = jax.nn.initializers.orthogonal() jitted")
    print(f"platform: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, numpy {np.__version__}")
    print(f"| {'init':<26} | {'first call (s)':>14} | {'median (ms)':>11} "
          f"| {'ratio vs orthogonal':>19} |")
    print(f"|{'-' * 28}|{'-' * 16}|{'-' * 13}|{'-' * 21}|")
    for name, (f, m) in rows.items():
        print(f"| {name:<26} | {f:>14.3f} | {m * 1e3:>11.1f} | {m / base:>19.2f} |")
    print(f"| {'simplex ETF, 12 heads':<26} | {etf[0]:>14.3f} | {etf[1] * 1e3:>11.1f} "
          f"| {'-':>19} |")


if __name__ == "__main__":
    main()
