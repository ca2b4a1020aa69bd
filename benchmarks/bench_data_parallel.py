#!/usr/bin/env python
"""Data-parallel throughput against device count.

Each device count runs in a fresh process (the CPU host-device count is an XLA flag fixed at
backend start): a forced N-device CPU mesh here, or the first N GPUs on a GPU machine. Prints
samples/s of the deterministic train step and the ratio against the named baseline, the same
step on 1 device, measured in the same invocation.

    python benchmarks/bench_data_parallel.py                        # conformer, 1/2/4 devices
    python benchmarks/bench_data_parallel.py --arch tiny --devices 1 2 4 8 --steps 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = """
import json, math, sys, time
sys.path.insert(0, {repo!r})
from detjax.cli import configure_process
env = configure_process(None, {devices})
import jax, jax.numpy as jnp, numpy as np
from detjax.models import get_model
from detjax.tasks import make_synthetic_ecg
from detjax.train import TrainConfig, create_train_state, make_mesh, make_optimizer, make_train_step, pos_weights
from jax.sharding import NamedSharding, PartitionSpec as P
x, y = make_synthetic_ecg({batch}, length={length}, seed=0)
config = TrainConfig(task="synthetic", arch={arch!r}, init="mixed", epochs=1, batch_size={batch})
model = get_model({arch!r}, num_classes=12, init_mode="mixed")
tx = make_optimizer(config, 1)
mesh = make_mesh({devices})
state = create_train_state(model, tx, x[:1], 0)
if mesh is not None:
    state = jax.device_put(state, NamedSharding(mesh, P()))
step = make_train_step(model, tx, config, pos_weights(y), mesh=mesh)
batch = {{"x": jnp.asarray(x), "y": jnp.asarray(y)}}
t0 = time.perf_counter(); state, _ = step(state, batch); jax.block_until_ready(state); first = time.perf_counter() - t0
times = []
for _ in range({steps}):
    t0 = time.perf_counter(); state, _ = step(state, batch); jax.block_until_ready(state); times.append(time.perf_counter() - t0)
med = float(np.median(times))
print(json.dumps({{"devices": {devices}, "platform": jax.devices()[0].platform, "first_step_s": first,
                  "median_step_s": med, "samples_per_s": {batch} / med}}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="conformer")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=32, help="global batch (divisible by every device count)")
    parser.add_argument("--length", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if any(args.batch % n for n in args.devices):
        parser.error(f"--batch {args.batch} must be divisible by every device count {args.devices}")
    rows = []
    for n in args.devices:
        code = WORKER.format(repo=str(REPO), devices=n, batch=args.batch, length=args.length, arch=args.arch,
                             steps=args.steps)
        proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = rows[0]["samples_per_s"] if rows[0]["devices"] == 1 else None
    print(f"{args.arch}, global batch {args.batch}, length {args.length}, median of {args.steps} steps; "
          f"baseline = the same step on 1 device ({rows[0]['platform']})")
    print(f"{'devices':>7} {'first step s':>12} {'median step s':>13} {'samples/s':>10} {'vs 1 device':>11}")
    for r in rows:
        ratio = f"{r['samples_per_s'] / base:.2f}" if base else "-"
        print(f"{r['devices']:>7} {r['first_step_s']:>12.2f} {r['median_step_s']:>13.3f} "
              f"{r['samples_per_s']:>10.1f} {ratio:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
