"""``python -m detjax.ci gpu-check``: the bitwise determinism check a CI job runs.

For every ``--arch`` (ECG Conformer, baseline CNN, ResNet-18, or the tiny test model),
``--runs`` fresh processes (default 3) train the same model for ``--steps`` steps under the
deterministic configuration (:func:`detjax.determinism.configure`) on synthetic data
(ECG-shaped 12 x ``--length`` for the ECG models, 28 x 28 x 1 images for ResNet-18), and
the SHA-256 of the full training state (params, optimizer state, step, key) is compared.

It is built so that it cannot pass for the wrong reason:

* **No compile cache.** Every worker starts with ``JAX_ENABLE_COMPILATION_CACHE=false`` and
  without ``JAX_COMPILATION_CACHE_DIR`` / ``JAX_PERSISTENT_CACHE_*`` / ``XLA_FLAGS``, so
  each process compiles afresh (a cached executable would make the runs agree trivially);
  each worker confirms it in its own fingerprint and the report says
  ``"compile_cache": "disabled"``.
* **The right platform.** ``--require-platform gpu`` exits 3 with a clear message when the
  backend is not a GPU (a CUDA plugin that fails to load makes JAX fall back to CPU).
* **A canary with power.** Each worker also runs a colliding scatter-add and segment_sum
  (4M float32 values of widely varying magnitude into a few slots) ``--canary-repeats``
  times and hashes every result. Under the deterministic flags all hashes, within and
  across workers, must be one. The negative control (``--control-runs`` processes with
  XLA's default flags) reports whether its canary or its training state differ; when
  neither does, the report says plainly "control has no demonstrated power" (expected on
  CPU, where XLA is deterministic anyway; on a GPU atomics usually make the canary differ).

``--report FILE`` writes the JSON report (``identical``, ``platform``, ``compile_cache``,
``canary``, ``control_differs``, ``hashes``, ``fingerprint``, ...).

Exit code 0 only when every deterministic run and canary agree (and the platform is the
required one); 1 when they differ; 2 on errors; 3 when the platform is not the required one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from detjax.determinism import GPU_PLATFORMS  # no JAX import at module load
from detjax.manifest import write_json_atomic

ARCHS = ("conformer", "baseline", "resnet18", "tiny")
NO_POWER = "control has no demonstrated power"
EXIT_WRONG_PLATFORM = 3


def worker_env(base: dict | None = None) -> dict:
    """The environment of a worker: every compile cache off, XLA's default flags."""
    env = dict(os.environ if base is None else base)
    for key in list(env):
        if key == "XLA_FLAGS" or key == "JAX_COMPILATION_CACHE_DIR" or key.startswith("JAX_PERSISTENT_CACHE_"):
            env.pop(key)
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    return env


def _canary(repeats: int, size: int) -> dict:
    """Colliding scatter-add and segment_sum, ``repeats`` executions each, every result hashed."""
    import hashlib

    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(1234))
    # Magnitudes over 12 decades: the float32 sum depends on the order of the additions.
    values = (rng.standard_normal(size) * 10.0 ** rng.uniform(-6, 6, size)).astype(np.float32)
    slots = 7
    ids = rng.integers(0, slots, size).astype(np.int32)
    values_d, ids_d = jax.device_put(values), jax.device_put(ids)
    scatter = jax.jit(lambda v, i: jnp.zeros(slots, jnp.float32).at[i].add(v))
    segment = jax.jit(lambda v, i: jax.ops.segment_sum(v, i, num_segments=slots))
    hashes = []
    for _ in range(repeats):
        h = hashlib.sha256()
        for fn in (scatter, segment):
            h.update(np.asarray(jax.device_get(fn(values_d, ids_d))).tobytes())
        hashes.append(h.hexdigest())
    return {"hashes": hashes, "distinct": len(set(hashes)), "size": size, "slots": slots}


def _synthetic(arch: str, n: int, length: int):
    import numpy as np

    if arch == "resnet18":
        rng = np.random.Generator(np.random.PCG64(0))
        x = rng.standard_normal((n, 28, 28, 1)).astype(np.float32)
        y = rng.integers(0, 2, n).astype(np.int32)
        return x, y, None
    from detjax.tasks import make_synthetic_ecg
    from detjax.train import pos_weights

    x, y = make_synthetic_ecg(n, length=length, leads=12, num_classes=12, seed=0)
    return x, y, pos_weights(y)


def _train_steps(args) -> dict:
    """One process: configure, canary, train ``args.steps`` steps; returns the digest record."""
    from detjax import determinism

    env = determinism.configure(deterministic=args.deterministic == 1, cpu_threads=args.cpu_threads)
    import math

    import jax

    from detjax import hashing, ordering
    from detjax.models import get_model
    from detjax.train import TrainConfig, create_train_state, gather_batch, make_optimizer, make_train_step

    canary = _canary(args.canary_repeats, args.canary_size) if args.canary_repeats > 0 else None
    n = args.batch_size * args.steps
    x, y, weight = _synthetic(args.arch, n, args.length)
    image = args.arch == "resnet18"
    init = args.init or ("dct" if image else "mixed")
    if image:
        config = TrainConfig(task="synthetic", arch=args.arch, init=init, epochs=1, batch_size=args.batch_size,
                             optimizer="sgd", learning_rate=0.1, loss="ce", weight_decay=5e-4)
        model = get_model(args.arch, num_classes=2, in_channels=1, init_mode=init, width=args.width)
        keys = n
    else:
        config = TrainConfig(task="synthetic", arch=args.arch, init=init, epochs=1, batch_size=args.batch_size)
        model = get_model(args.arch, num_classes=12, init_mode=init)
        keys = ordering.golden_content_keys(x)
    tx = make_optimizer(config, math.ceil(n / args.batch_size))
    state = create_train_state(model, tx, x[:1], seed=0)
    step = make_train_step(model, tx, config, weight)
    order = ordering.make_order_fn("golden", keys)(0)
    xd, yd = jax.device_put(x), jax.device_put(y)
    t0 = time.perf_counter()
    metrics = None
    for idx in ordering.batches(order, args.batch_size):
        state, metrics = step(state, gather_batch(idx, xd, yd))
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t0
    digests = hashing.tree_digests(jax.device_get(state))
    return {"sha256": digests["sha256"], "md5": digests["md5"], "loss": float(metrics["loss"]),
            "train_seconds_incl_compile": seconds, "platform": env["backend"]["platform"],
            "backend": env["backend"], "compile_cache": env["compile_cache"]["state"],
            "xla_flags": env.get("xla_flags"), "deterministic": args.deterministic == 1,
            "canary": canary, "fingerprint": env}


def _spawn(args, arch: str, deterministic: bool) -> dict:
    cmd = [sys.executable, "-m", "detjax.ci", "_train", "--steps", str(args.steps), "--arch", arch,
           "--batch-size", str(args.batch_size), "--length", str(args.length), "--width", str(args.width),
           "--canary-repeats", str(args.canary_repeats), "--canary-size", str(args.canary_size),
           "--deterministic", "1" if deterministic else "0"]
    if args.init:
        cmd += ["--init", args.init]
    if args.cpu_threads:
        cmd += ["--cpu-threads", str(args.cpu_threads)]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env(),
                              timeout=args.worker_timeout)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"training process ({arch}) exceeded {args.worker_timeout} s") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"training process ({arch}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class WrongPlatform(RuntimeError):
    pass


def _require(platform: str, required: str) -> None:
    if required == "any":
        return
    ok = platform in GPU_PLATFORMS if required == "gpu" else platform == required
    if not ok:
        raise WrongPlatform(
            f"--require-platform {required}: the JAX backend in the worker processes is {platform!r}, not a "
            f"{'GPU' if required == 'gpu' else required}. "
            + ("JAX falls back to CPU silently when the CUDA plugin (jax-cuda*-plugin / jax-cuda*-pjrt) is "
               "missing or fails to load; run `python -c \"import jax; print(jax.devices())\"` with "
               "JAX_PLATFORMS=cuda to see why." if required == "gpu" else ""))


def _canary_summary(runs: list[dict]) -> dict:
    records = [r["canary"] for r in runs if r.get("canary")]
    if not records:
        return {"ran": False}
    within = [c["distinct"] for c in records]
    across = len({c["hashes"][0] for c in records})
    return {"ran": True, "distinct_within_workers": within, "distinct_across_workers": across,
            "all_identical": max(within) == 1 and across == 1, "first_hash": records[0]["hashes"][0]}


def _partial(args, arch: str, runs: list[dict], control: list[dict]) -> None:
    """After every worker: what is known so far (a killed check still leaves its evidence)."""
    if args.report:
        write_json_atomic(args.report, {
            "check": "detjax bitwise determinism", "partial": True, "passed": None, "arch": arch,
            "platform": runs[0]["platform"] if runs else None,
            "hashes": {arch: {"deterministic": [r["sha256"] for r in runs],
                              "control": [r["sha256"] for r in control]}},
            "canary": {arch: {"deterministic": _canary_summary(runs),
                              "control": _canary_summary(control)}}})


def check_arch(args, arch: str) -> dict:
    runs = []
    for i in range(args.runs):
        runs.append(_spawn(args, arch, True))
        if i == 0:
            _require(runs[0]["platform"], args.require_platform)
        _partial(args, arch, runs, [])
    hashes = [r["sha256"] for r in runs]
    identical = len(set(hashes)) == 1
    canary = _canary_summary(runs)
    out = {"arch": arch, "runs": args.runs, "identical": identical, "platform": runs[0]["platform"],
           "hashes": {"deterministic": hashes}, "canary": {"deterministic": canary},
           "compile_cache": sorted({r["compile_cache"] for r in runs}),
           "train_seconds_incl_compile": [r["train_seconds_incl_compile"] for r in runs],
           "xla_flags": runs[0]["xla_flags"], "loss": runs[0]["loss"], "fingerprint": runs[0]["fingerprint"]}
    if args.control_runs > 0:
        control = []
        for _ in range(args.control_runs):
            control.append(_spawn(args, arch, False))
            _partial(args, arch, runs, control)
        c_hashes = [r["sha256"] for r in control]
        c_canary = _canary_summary(control)
        out["hashes"]["control"] = c_hashes
        out["canary"]["control"] = c_canary
        out["compile_cache"] = sorted(set(out["compile_cache"]) | {r["compile_cache"] for r in control})
        state_differs = len(set(c_hashes)) > 1
        canary_differs = bool(c_canary.get("ran")) and not c_canary["all_identical"]
        out["control_differs"] = {"state": state_differs, "canary": canary_differs,
                                  "any": state_differs or canary_differs,
                                  "control_equals_deterministic": c_hashes[0] == hashes[0]}
        out["control_xla_flags"] = control[0]["xla_flags"]
    else:
        out["control_differs"] = None
    return out


def gpu_check(args) -> int:
    archs = list(dict.fromkeys(args.arch))
    t0 = time.perf_counter()
    try:
        results = [check_arch(args, arch) for arch in archs]
    except WrongPlatform as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        if args.report:
            write_json_atomic(args.report, {"check": "detjax bitwise determinism", "identical": None, "passed": False,
                                            "error": str(exc), "required_platform": args.require_platform})
        return EXIT_WRONG_PLATFORM
    identical = all(r["identical"] for r in results)
    canary_ok = all(r["canary"]["deterministic"].get("all_identical", True) for r in results)
    caches = sorted({c for r in results for c in r["compile_cache"]})
    compile_cache = "disabled" if caches == ["disabled"] else "ENABLED in some worker: " + ",".join(caches)
    controls = [r["control_differs"] for r in results if r["control_differs"] is not None]
    if not controls:
        control_verdict = "no control run"
    elif any(c["any"] for c in controls):
        which = [f"{r['arch']}: " + ", ".join(k for k in ("state", "canary") if r["control_differs"][k])
                 for r in results if r["control_differs"] and r["control_differs"]["any"]]
        control_verdict = ("control differs (" + "; ".join(which) + "): the deterministic configuration is what "
                           "makes the runs agree")
    else:
        control_verdict = (f"{NO_POWER}: the default-flags control gave identical states and canaries too, so "
                           "this platform did not show that the flags matter")
    passed = identical and canary_ok and compile_cache == "disabled"
    platform = results[0]["platform"]
    report = {
        "check": "detjax bitwise determinism",
        "passed": passed,
        "identical": identical,
        "platform": platform,
        "required_platform": args.require_platform,
        "compile_cache": compile_cache,
        "canary": {r["arch"]: r["canary"] for r in results},
        "canary_identical": canary_ok,
        "control_differs": ({r["arch"]: r["control_differs"] for r in results} if controls else None),
        "control_verdict": control_verdict,
        "hashes": {r["arch"]: r["hashes"] for r in results},
        "archs": {r["arch"]: {k: v for k, v in r.items() if k != "fingerprint"} for r in results},
        "settings": {"runs": args.runs, "control_runs": args.control_runs, "steps": args.steps,
                     "batch_size": args.batch_size, "length": args.length, "width": args.width,
                     "init": args.init, "canary_repeats": args.canary_repeats, "canary_size": args.canary_size,
                     "cpu_threads": args.cpu_threads},
        "wall_seconds": time.perf_counter() - t0,
        "fingerprint": results[0]["fingerprint"],
    }
    if args.report:
        write_json_atomic(args.report, report)
    summary = {k: report[k] for k in ("passed", "identical", "platform", "compile_cache", "canary_identical",
                                      "control_verdict", "hashes")}
    print(json.dumps(summary, indent=2))
    for r in results:
        h = r["hashes"]["deterministic"]
        print(f"{'PASS' if r['identical'] and r['canary']['deterministic'].get('all_identical', True) else 'FAIL'}: "
              f"{r['arch']}: {len(h)} deterministic runs on {platform} "
              f"{'agree' if r['identical'] else 'DIFFER'} ({', '.join(x[:16] for x in h)}); canary "
              f"{'identical' if r['canary']['deterministic'].get('all_identical', True) else 'DIFFERS'}")
    print(f"compile cache: {compile_cache}")
    print(f"negative control: {control_verdict}")
    if not passed:
        print("FAIL: " + ("deterministic runs differ" if not identical else
                          "canary differs" if not canary_ok else "a compile cache was in use"))
    return 0 if passed else 1


def canary(args) -> int:
    """This process alone: configure (deterministic or XLA defaults), run the canary, report."""
    from detjax import determinism

    env = determinism.configure(deterministic=args.deterministic == 1, cpu_threads=args.cpu_threads)
    result = _canary(args.repeats, args.size)
    report = {"deterministic": args.deterministic == 1, "platform": env["backend"]["platform"],
              "device_kinds": env["backend"]["device_kinds"], "compile_cache": env["compile_cache"]["state"],
              "xla_flags": env["xla_flags"], **result}
    if args.report:
        write_json_atomic(args.report, report)
    print(json.dumps(report, indent=2))
    print(f"canary ({'deterministic flags' if report['deterministic'] else 'XLA defaults'}) on "
          f"{report['platform']}: {result['distinct']} distinct hash(es) in {args.repeats} executions")
    return 0 if result["distinct"] == 1 or args.deterministic == 0 else 1


def main(argv: list[str] | None = None) -> int:
    from detjax.cli import subcommand_parser

    parser, sub = subcommand_parser("python -m detjax.ci", __doc__)
    c = sub.add_parser("canary", help="only the colliding scatter-add canary, in this process")
    c.add_argument("--deterministic", type=int, choices=[0, 1], default=1)
    c.add_argument("--repeats", type=int, default=10)
    c.add_argument("--size", type=int, default=1 << 22)
    c.add_argument("--cpu-threads", type=int, default=None)
    c.add_argument("--report", default=None)
    for name in ("gpu-check", "_train"):
        p = sub.add_parser(name, help="bitwise check across fresh processes" if name == "gpu-check" else argparse.SUPPRESS)
        p.add_argument("--steps", type=int, default=20, help="train steps per process (default 20)")
        if name == "gpu-check":
            p.add_argument("--arch", nargs="+", choices=ARCHS, default=["conformer"],
                           help="models to check, each in its own processes (default: conformer)")
        else:
            p.add_argument("--arch", choices=ARCHS, default="conformer")
        p.add_argument("--init", default=None, help="initialisation (default: mixed for ECG models, dct for resnet18)")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--length", type=int, default=1000, help="samples per ECG lead (default 1000)")
        p.add_argument("--width", type=int, default=64, help="ResNet-18 width (default 64)")
        p.add_argument("--cpu-threads", type=int, default=None)
        p.add_argument("--canary-repeats", type=int, default=5,
                       help="executions of the colliding scatter-add canary per worker (0: none)")
        p.add_argument("--canary-size", type=int, default=1 << 22, help="values scattered by the canary")
        if name == "gpu-check":
            p.add_argument("--runs", type=int, default=3, help="deterministic fresh processes per model (default 3)")
            p.add_argument("--control-runs", type=int, default=2,
                           help="default-flags control processes per model (default 2; 0: none)")
            p.add_argument("--no-negative-control", dest="control_runs", action="store_const", const=0,
                           help="same as --control-runs 0")
            p.add_argument("--require-platform", choices=["any", "gpu", "cpu"], default="any",
                           help="exit 3 unless the workers' JAX backend is this platform")
            p.add_argument("--worker-timeout", type=float, default=1800, help="seconds per worker process")
            p.add_argument("--report", "--json", dest="report", default=None, help="write the JSON report here")
        else:
            p.add_argument("--deterministic", type=int, choices=[0, 1], default=1)
    args = parser.parse_args(argv)
    try:
        if args.command == "_train":
            print(json.dumps(_train_steps(args)))
            return 0
        if args.command == "canary":
            return canary(args)
        if args.runs < 2:
            raise ValueError("--runs must be at least 2 (the check compares fresh processes)")
        return gpu_check(args)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
