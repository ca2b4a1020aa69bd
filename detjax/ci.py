"""``python -m detjax.ci gpu-check``: the bitwise determinism check a CI job runs.

Two fresh processes train the same model for ``--steps`` steps under the deterministic
configuration (:func:`detjax.determinism.configure`) on ECG-shaped synthetic data, and the
SHA-256 of the full training state (params, optimizer state, step, key) is compared. As a
negative control, two more processes run the same training WITHOUT the deterministic XLA
flags; whether they differ is reported (on CPU, XLA is deterministic anyway, so they
usually agree; on GPU, scatter-add and autotuned kernels can make them differ).

Exit code 0 only when the deterministic hashes agree; 1 when they differ; 2 on errors.
It runs on any backend and reports which one it used, so the ordinary CPU CI can run it
too (use a small ``--steps``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _train_steps(args) -> dict:
    """One process: configure, train ``args.steps`` steps, print the digest as JSON."""
    from detjax import determinism

    env = determinism.configure(deterministic=args.deterministic == 1, cpu_threads=args.cpu_threads)
    import math

    import jax

    from detjax import hashing, ordering
    from detjax.models import get_model
    from detjax.tasks import make_synthetic_ecg
    from detjax.train import TrainConfig, create_train_state, make_optimizer, make_train_step, pos_weights

    n = args.batch_size * args.steps
    x, y = make_synthetic_ecg(n, length=args.length, leads=12, num_classes=12, seed=0)
    config = TrainConfig(task="synthetic", arch=args.arch, init=args.init, epochs=1, batch_size=args.batch_size)
    model = get_model(args.arch, num_classes=12, init_mode=args.init)
    tx = make_optimizer(config, math.ceil(n / args.batch_size))
    state = create_train_state(model, tx, x[:1], seed=0)
    step = make_train_step(model, tx, config, pos_weights(y))
    order = ordering.make_order_fn("golden", ordering.golden_content_keys(x))(0)
    xd, yd = jax.device_put(x), jax.device_put(y)
    t0 = time.perf_counter()
    for b in ordering.batches(order, args.batch_size):
        state, metrics = step(state, {"x": xd[b], "y": yd[b]})
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t0
    digests = hashing.tree_digests(jax.device_get(state))
    return {"sha256": digests["sha256"], "md5": digests["md5"], "loss": float(metrics["loss"]),
            "train_seconds_incl_compile": seconds, "backend": env["backend"],
            "xla_flags": env.get("xla_flags"), "deterministic": args.deterministic == 1}


def _spawn(args, deterministic: bool) -> dict:
    cmd = [sys.executable, "-m", "detjax.ci", "_train", "--steps", str(args.steps), "--arch", args.arch,
           "--init", args.init, "--batch-size", str(args.batch_size), "--length", str(args.length),
           "--deterministic", "1" if deterministic else "0"]
    if args.cpu_threads:
        cmd += ["--cpu-threads", str(args.cpu_threads)]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # each process starts from XLA's defaults
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"training process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gpu_check(args) -> int:
    runs = [_spawn(args, True) for _ in range(2)]
    identical = runs[0]["sha256"] == runs[1]["sha256"]
    report = {"check": "detjax bitwise determinism", "arch": args.arch, "init": args.init, "steps": args.steps,
              "batch_size": args.batch_size, "backend": runs[0]["backend"], "deterministic_runs": runs,
              "deterministic_identical": identical}
    if not args.no_negative_control:
        control = [_spawn(args, False) for _ in range(2)]
        report["control_runs"] = control
        report["control_identical"] = control[0]["sha256"] == control[1]["sha256"]
        report["control_equals_deterministic"] = control[0]["sha256"] == runs[0]["sha256"]
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    platform = report["backend"].get("platform") if isinstance(report["backend"], dict) else report["backend"]
    print(f"{'PASS' if identical else 'FAIL'}: deterministic runs on {platform} "
          f"{'agree' if identical else 'DIFFER'} ({runs[0]['sha256'][:16]} vs {runs[1]['sha256'][:16]})")
    if "control_identical" in report:
        print("negative control (default XLA flags): runs "
              + ("agree" if report["control_identical"] else "differ")
              + ("" if report["control_identical"] else " -- the deterministic configuration is what makes them agree"))
    return 0 if identical else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detjax.ci", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("gpu-check", "_train"):
        p = sub.add_parser(name, help="bitwise check across fresh processes" if name == "gpu-check" else argparse.SUPPRESS)
        p.add_argument("--steps", type=int, default=20, help="train steps per process (default 20)")
        p.add_argument("--arch", default="conformer", help="model (default: the ECG Conformer)")
        p.add_argument("--init", default="mixed")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--length", type=int, default=1000, help="samples per ECG lead (default 1000)")
        p.add_argument("--cpu-threads", type=int, default=None)
        if name == "gpu-check":
            p.add_argument("--no-negative-control", action="store_true", help="skip the default-flags control")
            p.add_argument("--json", default=None, help="also write the report to this file")
        else:
            p.add_argument("--deterministic", type=int, choices=[0, 1], default=1)
    args = parser.parse_args(argv)
    try:
        if args.command == "_train":
            print(json.dumps(_train_steps(args)))
            return 0
        return gpu_check(args)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
