"""Benchmark the golden epoch order against ``jax.random.permutation`` and numpy.

Times one epoch's order at n = 10^3 ... 10^7:

* ``golden``    :func:`detjax.ordering.epoch_order` on device-resident index keys (jitted:
  64-bit wrapping shift in two uint32 words + stable ``lax.sort``);
* ``rotate``    :func:`detjax.ordering.scheduled_order`, the trainer's path: the same order
  from a :func:`~detjax.ordering.golden_schedule` sorted once (one count + a roll per epoch);
* ``jax_perm``  ``jax.jit(lambda key: jax.random.permutation(key, n))``, the baseline;
* ``numpy``     ``numpy.random.Generator.permutation(n)`` (PCG64, host).

Each timing is the median of repeats after one warm-up call (which includes compilation),
with ``block_until_ready``. Ratios are ``time / time(jax_perm)``.

Usage::

    PYTHONPATH=. python benchmarks/bench_ordering.py [--sizes 1e3 1e4 ...] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

from detjax import determinism


def _time(fn, *, repeats: int, budget_s: float) -> float:
    """Median wall time of ``fn()`` over up to ``repeats`` runs (at least 3, or fewer
    only when the time budget is spent), after one warm-up run."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 3 and time.perf_counter() - start > budget_s:
            break
    return statistics.median(times)


def bench(sizes, *, repeats: int, budget_s: float) -> list[dict]:
    import jax
    import numpy as np

    from detjax import ordering

    rows = []
    for n in sizes:
        keys = ordering.golden_index_keys(n)
        device_keys = ordering.GoldenKeys(*jax.device_put((keys.hi, keys.lo)))
        epochs = iter(range(1, 1 << 30))
        golden = _time(
            lambda: ordering.epoch_order(device_keys, next(epochs)).block_until_ready(),
            repeats=repeats, budget_s=budget_s,
        )
        schedule = ordering.golden_schedule(device_keys)
        rotate = _time(
            lambda: ordering.scheduled_order(schedule, next(epochs)).block_until_ready(),
            repeats=repeats, budget_s=budget_s,
        )
        perm = jax.jit(lambda key, n=n: jax.random.permutation(key, n))
        key = jax.random.key(0)
        jax_perm = _time(lambda: perm(key).block_until_ready(), repeats=repeats, budget_s=budget_s)
        rng = np.random.default_rng(0)
        numpy_perm = _time(lambda: rng.permutation(n), repeats=repeats, budget_s=budget_s)
        rows.append(
            {"n": n, "golden": golden, "rotate": rotate, "jax_perm": jax_perm, "numpy": numpy_perm}
        )
        print(_format_row(rows[-1]), flush=True)
    return rows


def _format_row(r: dict) -> str:
    base = r["jax_perm"]
    times = " ".join(f"{r[k] * 1e3:>11.3f}" for k in _METHODS)
    ratios = " ".join(f"{r[k] / base:>11.3f}" for k in _METHODS if k != "jax_perm")
    return f"{r['n']:>10,d} {times}   {ratios}"


_METHODS = ("golden", "rotate", "jax_perm", "numpy")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e3, 1e4, 1e5, 1e6, 1e7])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds per (method, n) after which repeats stop (min 3)")
    parser.add_argument("--no-configure", action="store_true",
                        help="skip detjax.determinism.configure() (default flags)")
    args = parser.parse_args(argv)

    fingerprint = None if args.no_configure else determinism.configure()
    import jax

    device = jax.devices()[0]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {device.device_kind}, "
          f"allowed cores {len(fingerprint['cpu']['allowed_cores']) if fingerprint else '?'}")
    print("median ms per epoch order; ratios = time / time(jax.random.permutation), the baseline")
    print(f"{'n':>10} " + " ".join(f"{k + ' ms':>11}" for k in _METHODS) + "   "
          + " ".join(f"{k + '/jax':>11}" for k in _METHODS if k != "jax_perm"))
    bench([int(s) for s in args.sizes], repeats=args.repeats, budget_s=args.budget)


if __name__ == "__main__":
    main()
