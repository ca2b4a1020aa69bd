"""``python -m detjax``: run a config, verify a run, print the environment.

* ``python -m detjax run CONFIG.json --out DIR``: train a config (a JSON file holding a
  ``TrainConfig`` dict, or a run's ``manifest.json``) under the deterministic configuration.
* ``python -m detjax verify RUN_DIR``: re-run the config recorded in ``RUN_DIR`` in a fresh
  process and report ``identical`` or the first differing leaf of the final state.
* ``python -m detjax env``: print the environment fingerprint as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _load_config_file(path: Path):
    from detjax.train import TrainConfig

    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    obj = json.loads(path.read_text())
    return TrainConfig.from_dict(obj["config"] if "config" in obj and "config_hash" in obj else obj)


def cmd_run(args) -> int:
    from detjax.cli import configure_process

    environment = configure_process(args.cpu_threads, args.devices)
    from detjax import tasks
    from detjax.train import train_and_evaluate

    config = _load_config_file(Path(args.config))
    data = tasks.load_task(config)
    result = train_and_evaluate(config, data, args.out, resume=args.resume, environment=environment,
                                progress=not args.no_progress, devices=args.devices or 1,
                                allow_device_change=args.allow_device_change)
    print(json.dumps({k: result[k] for k in ("final_sha256", "final_md5", "init_sha256", "run_dir")}))
    return 0


def _restore_final_state(run_dir: Path, config):
    """The final TrainState (as a state dict) of a finished run directory."""
    from detjax import tasks
    from detjax.checkpoint import Checkpointer
    from detjax.models import get_model
    from detjax.train import _state_dict, create_train_state, initial_best, make_optimizer
    import math

    data = tasks.load_task(config)
    model = get_model(config.arch, num_classes=len(data.labels), init_mode=config.init,
                      variant=config.variant, **dict(config.model))
    tx = make_optimizer(config, math.ceil(data.train_x.shape[0] / config.batch_size))
    state = create_train_state(model, tx, data.train_x[:1], config.seed)
    best = initial_best(state)
    ckpt = Checkpointer(run_dir / "checkpoints", config_hash=config.hash(), allow_device_change=True)  # read-only use
    restored = ckpt.restore(config.epochs, _state_dict(state), best)
    ckpt.close()
    return restored[0]


def cmd_verify(args) -> int:
    from detjax.manifest import read_manifest

    run_dir = Path(args.run_dir).absolute()
    manifest = read_manifest(run_dir)
    if manifest.get("status") != "finished":
        print(f"error: {run_dir} holds an unfinished run (status {manifest.get('status')!r}); "
              "finish it with --resume before verifying", file=sys.stderr)
        return 2
    execution = manifest.get("execution") or {}
    if execution.get("mode") in ("vmap", "map", "unroll"):
        # A member of a multi-seed program may sum in another order than a solo run
        # (docs/seed_studies.md), so a solo re-run need not reproduce its bits.
        print(f"error: {run_dir} is a member of a {execution['mode']} group of seeds {execution.get('seeds')}; "
              "its bits are the group's, not necessarily a solo run's. Re-train the group with "
              "detjax.multiseed.train_seeds(config, data, seeds, mode=...) and compare the hashes, or train "
              "studies with --mode sequential, whose members verify as solo runs", file=sys.stderr)
        return 2
    expected = manifest["final_digests"]["sha256"]
    recorded_threads = manifest["environment"].get("determinism", {}).get("cpu_threads")
    with tempfile.TemporaryDirectory(prefix="detjax-verify-") as tmp:
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps(manifest["config"]))
        out = Path(args.out).absolute() if args.out else Path(tmp) / "rerun"
        # The re-run and the environment check use the recorded thread and device counts.
        placement = ["--cpu-threads", str(recorded_threads)] if recorded_threads else []
        recorded_devices = manifest.get("mesh", {}).get("devices", 1)
        if recorded_devices > 1:
            placement += ["--devices", str(recorded_devices)]
        cmd = [sys.executable, "-m", "detjax", "run", str(config_path), "--out", str(out), "--no-progress",
               *placement]
        print(f"re-running {run_dir.name} (config {manifest['config_hash'][:12]}) in a fresh process ...",
              flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
        if proc.returncode != 0:
            print("error: the re-run failed", file=sys.stderr)
            return 2
        rerun = json.loads(proc.stdout.strip().splitlines()[-1])
        report = {"run_dir": str(run_dir), "expected_final_sha256": expected,
                  "rerun_final_sha256": rerun["final_sha256"],
                  "identical": rerun["final_sha256"] == expected}
        if not report["identical"]:
            from detjax import hashing
            from detjax.train import TrainConfig

            config = TrainConfig.from_dict(manifest["config"])
            report["first_difference"] = hashing.first_difference(
                _restore_final_state(run_dir, config), _restore_final_state(out, config))
        env_now = json.loads(subprocess.run([sys.executable, "-m", "detjax", "env", *placement],
                                            stdout=subprocess.PIPE, text=True).stdout)
        changed = sorted(k for k in set(env_now) | set(manifest["environment"])
                         if env_now.get(k) != manifest["environment"].get(k))
        report["environment_differences"] = changed
    print(json.dumps(report, indent=2))
    if report["identical"]:
        print("identical")
    elif report["first_difference"] is None:
        print("DIFFERENT: the re-run equals the stored final checkpoint, but not the digest recorded "
              "in manifest.json (the manifest was edited or written by another detjax version)")
    else:
        print(f"DIFFERENT: first differing leaf {report['first_difference']}")
    return 0 if report["identical"] else 1


def cmd_env(args) -> int:
    from detjax.cli import configure_process

    print(json.dumps(configure_process(args.cpu_threads, args.devices), indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detjax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train a config file under the deterministic configuration")
    run.add_argument("config", help="JSON file with a TrainConfig dict or a run's manifest.json")
    run.add_argument("--out", required=True, help="run directory to create (or resume)")
    run.add_argument("--resume", action="store_true", help="continue a run directory's last checkpoint")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--cpu-threads", type=int, default=None, help="pin the CPU backend to N threads")
    from detjax.cli import add_device_flags

    add_device_flags(run)
    run.set_defaults(fn=cmd_run)
    verify = sub.add_parser("verify", help="re-run a run directory's config and compare final hashes")
    verify.add_argument("run_dir")
    verify.add_argument("--out", default=None, help="keep the re-run here (default: a temporary directory)")
    verify.set_defaults(fn=cmd_verify)
    env = sub.add_parser("env", help="print the environment fingerprint")
    env.add_argument("--cpu-threads", type=int, default=None)
    env.add_argument("--devices", type=int, default=None)
    env.set_defaults(fn=cmd_env)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
