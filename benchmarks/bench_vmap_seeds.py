#!/usr/bin/env python
"""k seeds in one compiled program (vmap / unroll / lax.map) against k sequential solo steps.

Baseline, measured in the same process: the ordinary jitted train step run once per member,
one member after the other (what k separate runs do). Each mode then advances all k members by
one step in one call of :func:`detjax.multiseed.make_members_step`. Printed: seconds per round
(k member-steps), samples/s, the throughput ratio against the baseline (> 1: faster), and
whether each member's state after the timed rounds equals the sequential baseline's bits.

    python benchmarks/bench_vmap_seeds.py                                  # tiny ECG model, k = 1 2 4 8
    python benchmarks/bench_vmap_seeds.py --arch conformer --k 1 2 4 --rounds 2
    python benchmarks/bench_vmap_seeds.py --arch resnet18 --width 16 --k 2 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["tiny", "conformer", "resnet18"], default="tiny")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8], help="members per program")
    parser.add_argument("--modes", nargs="+", default=["vmap", "unroll", "map"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--length", type=int, default=1000, help="ECG length (tiny/conformer)")
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 width")
    parser.add_argument("--init", default="kaiming")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--cpu-threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()

    from detjax.cli import configure_process

    env = configure_process(args.cpu_threads, None)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from detjax import hashing, multiseed
    from detjax.models import get_model
    from detjax.tasks import make_synthetic_ecg
    from detjax.train import TrainConfig, _state_dict, create_train_state, make_optimizer, make_train_step, pos_weights

    if args.arch == "resnet18":
        rng = np.random.Generator(np.random.PCG64(0))
        x = rng.standard_normal((args.batch, 28, 28, 1)).astype(np.float32)
        y = rng.integers(0, 2, args.batch).astype(np.int32)
        init = "he_normal" if args.init == "kaiming" else args.init
        model = get_model("resnet18", num_classes=2, in_channels=1, init_mode=init, width=args.width)
        config = TrainConfig(task="synthetic", arch="resnet18", init=init, optimizer="sgd", learning_rate=0.1,
                             loss="ce", weight_decay=5e-4, batch_size=args.batch)
        weight = None
    else:
        x, y = make_synthetic_ecg(args.batch, length=args.length, seed=0)
        model = get_model(args.arch, num_classes=12, init_mode=args.init)
        config = TrainConfig(task="synthetic", arch=args.arch, init=args.init, batch_size=args.batch)
        weight = pos_weights(y)
    tx = make_optimizer(config, 10)
    idx = np.arange(args.batch, dtype=np.int32)
    train_x, train_y = jax.device_put(x), jax.device_put(y)
    batch = {"x": train_x, "y": train_y, "index": jnp.asarray(idx)}
    solo_step = make_train_step(model, tx, config, weight)
    print(f"# {args.arch} batch {args.batch} on {jax.devices()[0].device_kind} "
          f"({jax.devices()[0].platform}), jax {jax.__version__}", flush=True)

    def timed(run, state):
        state = run(state)  # warm-up round (compiles)
        jax.block_until_ready(state)
        times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            state = run(state)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
        return float(np.median(times)), state

    rows = []
    for k in args.k:
        seeds = list(range(1, k + 1))

        def sequential(states):
            return [solo_step(s, batch)[0] for s in states]

        base_s, base_states = timed(sequential, [create_train_state(model, tx, x[:1], s) for s in seeds])
        base_digests = [hashing.tree_sha256(_state_dict(s)) for s in base_states]
        row = {"k": k, "baseline": "sequential", "sequential_s": base_s, "sequential_samples_per_s": k * args.batch / base_s}
        for mode in args.modes:
            step = multiseed.make_members_step(model, tx, config, weight, None, mode)
            idx_k = jnp.asarray(np.stack([idx] * k))
            seeds_dev = jnp.asarray(np.asarray(seeds, np.uint32))
            states = multiseed.init_member_states(model, tx, x[:1], seeds)
            mode_s, states = timed(lambda st: step(st, idx_k, seeds_dev, train_x, train_y)[0], states)
            same = [hashing.tree_sha256(multiseed.member_slice(_state_dict(states), j)) == base_digests[j]
                    for j in range(k)]
            row.update({f"{mode}_s": mode_s, f"{mode}_ratio": base_s / mode_s, f"{mode}_bit_identical": all(same)})
        rows.append(row)
        cells = "  ".join(f"{m}: {row[f'{m}_s']:.3f}s x{row[f'{m}_ratio']:.2f} "
                          f"{'identical' if row[f'{m}_bit_identical'] else 'differs'}" for m in args.modes)
        print(f"k={k:<3d} sequential: {base_s:.3f}s ({row['sequential_samples_per_s']:.0f} samples/s)  {cells}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "batch": args.batch, "environment": env,
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
