#!/usr/bin/env python
"""Seconds to a model's initial variables three ways: ``jax.jit(model.init)`` (``jit``),
un-jitted ``model.init`` (``eager``, op by op) and ``di.init_variables(...,
defer_keyed_draws=True)`` (``apart``: keyed draws as one small program per shape, outside the
init program), each in a fresh process without a compilation cache, with the hash of the
variables. :func:`detjax.train.create_train_state` runs ``apart`` for a keyed init of a model
that sets ``draw_keyed_apart`` (the Conformer) and ``jit`` otherwise.

    python benchmarks/bench_model_init.py                      # every row below
    python benchmarks/bench_model_init.py conformer:kaiming     # one model:init

Rows: ``conformer:mixed``, ``conformer:kaiming``, ``baseline:mixed``, ``baseline:kaiming``,
``resnet18:dct``, ``resnet18:he_normal`` (width 64, 28×28×1). Prints one line per row:
``init <arch> <init> jit <s> eager <s> apart <s> same-bits <yes|no>`` (yes: all three hashes
agree). Pinned to 2 threads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

ROWS = ("conformer:mixed", "conformer:kaiming", "baseline:mixed", "baseline:kaiming", "resnet18:dct",
        "resnet18:he_normal")


def _worker(arch: str, init: str, mode: str) -> dict:
    from detjax import determinism

    determinism.configure(cpu_threads=2)
    import jax
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)
    import detjax.initializers as di
    from detjax import hashing
    from detjax.models import get_model

    image = arch == "resnet18"
    model = get_model(arch, num_classes=12, init=init, **({"in_channels": 1} if image else {}))
    x = np.zeros((1, 28, 28, 1) if image else (1, 1000, 12), np.float32)
    params_key, dropout_key, _ = jax.random.split(jax.random.key(0), 3)

    def init_fn(pk, dk, x):
        return model.init({"params": pk, "dropout": dk}, x, train=False, mutable=["params", "batch_stats"])

    start = time.perf_counter()
    if mode == "apart":
        variables = di.init_variables(model, {"params": params_key, "dropout": dropout_key}, x,
                                      defer_keyed_draws=True, train=False, mutable=["params", "batch_stats"])
    else:
        variables = (jax.jit(init_fn) if mode == "jit" else init_fn)(params_key, dropout_key, x)
    jax.block_until_ready(variables)
    return {"seconds": time.perf_counter() - start, "sha256": hashing.tree_sha256(variables)}


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:
        print(json.dumps(_worker(*argv[1:4])))
        return 0
    for row in argv or ROWS:
        arch, init = row.split(":")
        res = {}
        for mode in ("jit", "eager", "apart"):
            out = subprocess.run([sys.executable, __file__, "--worker", arch, init, mode], check=True,
                                 stdout=subprocess.PIPE, text=True).stdout
            res[mode] = json.loads(out.strip().splitlines()[-1])
        same = "yes" if len({r["sha256"] for r in res.values()}) == 1 else (
            "no (" + ", ".join(f"{m} {r['sha256'][:8]}" for m, r in res.items()) + ")")
        print(f"init {arch} {init} " + " ".join(f"{m} {r['seconds']:.1f}" for m, r in res.items())
              + f" same-bits {same}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
