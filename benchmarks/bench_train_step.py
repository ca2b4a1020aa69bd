#!/usr/bin/env python
"""Train-step throughput: deterministic configuration vs XLA's default flags.

For each model (ECG Conformer and baseline CNN on PTB-XL-shaped batches of 12 × 1000; ResNet-18
on 28×28), two fresh processes time the same jitted train step: one after
``detjax.determinism.configure()`` (the named baseline is the other one: XLA's default
flags, ``deterministic=False``). Prints samples/s, the ratio deterministic/default, the FLOPs
per step from XLA's cost analysis, and the achieved fraction of the device's float32 peak
(``--peak-tflops``; known defaults for H100/H200, none for CPUs).

    python benchmarks/bench_train_step.py                          # all three models, batch 128
    python benchmarks/bench_train_step.py --models conformer --steps 50
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Dense float32 (non-tensor-core) peaks, TFLOP/s, from the vendors' data sheets.
FP32_PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": 67.0, "NVIDIA H100": 67.0, "NVIDIA H200": 67.0}

SHAPES = {"conformer": ((1000, 12), 12), "baseline": ((1000, 12), 12), "resnet18": ((28, 28, 1), 2)}

WORKER = """
import json, sys, time
sys.path.insert(0, {repo!r})
from detjax import determinism
env = determinism.configure(deterministic={deterministic})
import jax, jax.numpy as jnp, numpy as np
from detjax.models import get_model
from detjax.train import TrainConfig, create_train_state, make_optimizer, make_train_step
arch, batch, shape, classes = {arch!r}, {batch}, {shape}, {classes}
rng = np.random.default_rng(0)
x = rng.standard_normal((batch,) + shape).astype(np.float32)
image = arch == "resnet18"
y = rng.integers(0, classes, (batch, 1)).astype(np.int32) if image else (rng.random((batch, classes)) < 0.2).astype(np.float32)
config = TrainConfig(task="synthetic", arch=arch, init="dct" if image else "mixed", epochs=1, batch_size=batch,
                     optimizer="sgd" if image else "adam", loss="ce" if image else "bce")
kwargs = {{"in_channels": 1}} if image else {{}}
model = get_model(arch, num_classes=classes, init_mode=config.init, **kwargs)
tx = make_optimizer(config, 1)
state = create_train_state(model, tx, x[:1], 0)
step = make_train_step(model, tx, config)
b = {{"x": jnp.asarray(x), "y": jnp.asarray(y)}}
flops = step.lower(state, b).compile().cost_analysis()
flops = flops[0] if isinstance(flops, list) else flops
flops = float(flops.get("flops", float("nan"))) if flops else float("nan")
t0 = time.perf_counter(); state, _ = step(state, b); jax.block_until_ready(state); first = time.perf_counter() - t0
times = []
for _ in range({steps}):
    t0 = time.perf_counter(); state, _ = step(state, b); jax.block_until_ready(state); times.append(time.perf_counter() - t0)
med = float(np.median(times))
print(json.dumps({{"device_kind": jax.devices()[0].device_kind, "first_step_s": first, "median_step_s": med,
                  "samples_per_s": batch / med, "flops_per_step": flops}}))
"""


def measure(arch: str, deterministic: bool, batch: int, steps: int) -> dict:
    shape, classes = SHAPES[arch]
    code = WORKER.format(repo=str(REPO), deterministic=deterministic, arch=arch, batch=batch, shape=shape,
                         classes=classes, steps=steps)
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device float32 peak (default: known GPUs)")
    args = parser.parse_args()
    print(f"batch {args.batch}, median of {args.steps} steps after one compile step; "
          "baseline = the same step under XLA's default flags, in a fresh process")
    header = (f"{'model':<10} {'device':<22} {'default s/step':>14} {'determ. s/step':>14} {'determ./default':>15} "
              f"{'samples/s':>10} {'GFLOP/step':>10} {'% fp32 peak':>11}")
    print(header)
    for arch in args.models:
        default = measure(arch, False, args.batch, args.steps)
        det = measure(arch, True, args.batch, args.steps)
        peak = args.peak_tflops or FP32_PEAK_TFLOPS.get(det["device_kind"])
        achieved = det["flops_per_step"] / det["median_step_s"] / 1e12
        frac = f"{100 * achieved / peak:.1f}" if peak else "n/a"
        print(f"{arch:<10} {det['device_kind'][:22]:<22} {default['median_step_s']:>14.3f} "
              f"{det['median_step_s']:>14.3f} {det['median_step_s'] / default['median_step_s']:>15.2f} "
              f"{det['samples_per_s']:>10.1f} {det['flops_per_step'] / 1e9:>10.1f} {frac:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
