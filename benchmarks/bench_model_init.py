#!/usr/bin/env python
"""Seconds to a model's initial variables: ``jax.jit(model.init)`` (what
:func:`detjax.train.create_train_state` runs) against un-jitted ``model.init`` (op by op), each
in a fresh process without a compilation cache, with the hash of the variables.

    python benchmarks/bench_model_init.py                      # every row below
    python benchmarks/bench_model_init.py conformer:kaiming     # one model:init

Rows: ``conformer:mixed``, ``conformer:kaiming``, ``baseline:mixed``, ``baseline:kaiming``,
``resnet18:dct``, ``resnet18:he_normal`` (width 64, 28×28×1). Prints one line per row:
``init <arch> <init> jit <s> eager <s> same-bits <yes|no>``. Pinned to 2 threads.
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
    from detjax import hashing
    from detjax.models import get_model

    image = arch == "resnet18"
    model = get_model(arch, num_classes=12, init=init, **({"in_channels": 1} if image else {}))
    x = np.zeros((1, 28, 28, 1) if image else (1, 1000, 12), np.float32)
    params_key, dropout_key, _ = jax.random.split(jax.random.key(0), 3)

    def init_fn(pk, dk, x):
        return model.init({"params": pk, "dropout": dk}, x, train=False, mutable=["params", "batch_stats"])

    start = time.perf_counter()
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
        for mode in ("jit", "eager"):
            out = subprocess.run([sys.executable, __file__, "--worker", arch, init, mode], check=True,
                                 stdout=subprocess.PIPE, text=True).stdout
            res[mode] = json.loads(out.strip().splitlines()[-1])
        same = "yes" if res["jit"]["sha256"] == res["eager"]["sha256"] else "no"
        print(f"init {arch} {init} jit {res['jit']['seconds']:.1f} eager {res['eager']['seconds']:.1f} "
              f"same-bits {same}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
