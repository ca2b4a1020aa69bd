"""``python -m detjax``: run a config, verify a run, print the environment.

* ``python -m detjax run CONFIG.json --out DIR``: train a config (a JSON file holding a
  ``TrainConfig`` dict, or a run's ``manifest.json``) under the deterministic configuration.
  ``--resume`` continues ``DIR``; on a finished run it changes nothing and prints its result.
* ``python -m detjax verify RUN_DIR``: first re-hashes what ``RUN_DIR`` stores (the final
  checkpoint's state and best weights against their sidecar, ``manifest.json``,
  ``result.json`` and ``events.jsonl``), then re-runs the recorded config in a fresh process
  (its progress bar passes through) and compares the final state's SHA-256. The re-run
  compiles afresh (``--compile-cache none``), so it also re-derives the compiled programs
  rather than reading them back from a cache.
* ``python -m detjax env``: print the environment fingerprint as JSON.

Exit status of ``verify``: 0 identical; 1 the re-run differs (the first differing leaf is
named); 2 nothing could be verified (bad arguments, not a run directory, an unfinished run,
a multi-seed member, or the re-run failed); 3 the stored files are corrupt or disagree with
each other (each mismatch is named; nothing is re-run). ``run`` and ``env`` exit 2 on bad
input, always with one ``error:`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

EXIT_IDENTICAL, EXIT_DIFFERENT, EXIT_ERROR, EXIT_CORRUPT = 0, 1, 2, 3


def _read_config_file(path: Path) -> dict:
    """The config dict of a JSON config file or a run's manifest.json (no JAX involved)."""
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file {path} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"config file {path} must hold a JSON object (a TrainConfig dict or a manifest)")
    config = obj["config"] if "config" in obj and "config_hash" in obj else obj
    if not isinstance(config, dict):
        raise ValueError(f"config file {path}: the config must be a JSON object")
    return config


def _load_config_file(path: Path):
    from detjax.train import TrainConfig

    return TrainConfig.from_dict(_read_config_file(path))


def cmd_run(args) -> int:
    from detjax.cli import configure_process, validate_common

    validate_common(args)  # everything that needs no JAX, before the process is configured
    # TrainConfig and the run directory need JAX imported, not started: still before configure.
    config = _load_config_file(Path(args.config))
    from detjax.cli import check_run_dir

    finished = check_run_dir(args.out, config.hash(), args.resume)
    if finished is not None:
        print(f"run {Path(args.out).absolute()} is already complete; nothing was changed")
        print(json.dumps({**{k: finished[k] for k in ("final_sha256", "final_md5", "init_sha256", "run_dir")},
                          "already_complete": True}))
        return 0
    environment = configure_process(args.cpu_threads, args.devices, arch=config.arch, cpu_kernels=args.cpu_kernels,
                                    allocator=args.allocator, compile_cache=args.compile_cache)
    from detjax import tasks
    from detjax.train import make_mesh, train_and_evaluate

    make_mesh(args.devices)
    data = tasks.load_task(config)
    result = train_and_evaluate(config, data, args.out, resume=args.resume, environment=environment,
                                progress=not args.no_progress, devices=args.devices,
                                allow_device_change=args.allow_device_change)
    print(json.dumps({k: result[k] for k in ("final_sha256", "final_md5", "init_sha256", "run_dir")}))
    return 0


# ------------------------------------------------------------------------ verify


class StoredFilesError(Exception):
    """The stored files of a run are corrupt or disagree with each other."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def _restore_final(run_dir: Path, manifest: dict, config):
    """``(state_dict, best, sidecar)`` of the final checkpoint of ``run_dir``, verified against
    its sidecar; :class:`StoredFilesError` naming the checkpoint otherwise."""
    from detjax.checkpoint import CheckpointError
    from detjax.train import restore_final_checkpoint

    try:
        return restore_final_checkpoint(run_dir, manifest, config)[1:]
    except CheckpointError as exc:
        raise StoredFilesError([str(exc)]) from None


def check_stored_files(run_dir: Path, manifest: dict):
    """Re-hashes what a finished run stores; returns ``(config, final state dict)``.

    Checks, each failure naming its file: the config hashes to ``config_hash``; the final
    checkpoint restores and its ``state`` and ``best`` hash to the sidecar's digests; the
    state's digest is ``manifest.json``'s ``final_digests``; the best weights' digest and epoch
    are ``result.json``'s; ``result.json`` equals the manifest's ``metrics``; ``events.jsonl``
    (when present) records the same final digest. Raises :class:`StoredFilesError`.
    """
    from detjax import hashing, manifest as manifest_lib
    from detjax.train import TrainConfig, weights_sha256

    problems: list[str] = []
    manifest_path = run_dir / "manifest.json"
    try:
        config = TrainConfig.from_dict(manifest["config"])
    except (TypeError, ValueError) as exc:
        raise StoredFilesError([f"{manifest_path}: its config is not a valid TrainConfig ({exc})"]) from None
    if config.hash() != manifest.get("config_hash"):
        raise StoredFilesError([f"{manifest_path}: the config hashes to {config.hash()}, not to the recorded "
                                f"config_hash {manifest.get('config_hash')}"])
    metrics = manifest.get("metrics") or {}
    final_sha = (manifest.get("final_digests") or {}).get("sha256")

    result_path = run_dir / "result.json"
    try:
        result = json.loads(result_path.read_text())
    except FileNotFoundError:
        problems.append(f"{result_path} is missing")
        result = None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        problems.append(f"{result_path} is not valid JSON ({exc})")
        result = None
    if result is not None and json.dumps(result, sort_keys=True) != json.dumps(metrics, sort_keys=True):
        keys = sorted(k for k in set(result) | set(metrics) if result.get(k) != metrics.get(k))
        problems.append(f"{result_path} disagrees with {manifest_path}'s metrics (keys {keys[:5]})")
    if metrics.get("final_sha256") != final_sha:
        problems.append(f"{manifest_path}: metrics.final_sha256 {metrics.get('final_sha256')} differs from "
                        f"final_digests.sha256 {final_sha}")

    events_path = run_dir / manifest_lib.EVENTS_FILE
    if events_path.exists():
        lines = events_path.read_bytes().splitlines()
        for number, line in enumerate(lines, 1):
            try:
                json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                problems.append(f"{events_path}: line {number} is not valid JSON")
                break
        finished = [e for e in manifest_lib.read_events(run_dir) if e.get("event") == "finished"]
        if finished and finished[-1].get("final_sha256") != final_sha:
            problems.append(f"{events_path}: the finished event records final sha256 "
                            f"{finished[-1].get('final_sha256')}, {manifest_path} {final_sha}")

    state, best, sidecar = _restore_final(run_dir, manifest, config)
    where = run_dir / "checkpoints" / str(config.epochs)
    stored_sha = hashing.tree_sha256(state)
    if stored_sha != final_sha:
        problems.append(f"{where / 'state'} holds a final state with sha256 {stored_sha}, but {manifest_path} "
                        f"records {final_sha}")
    best_sha = weights_sha256(best)
    for source, record in (("result.json", result), ("manifest.json", metrics)):
        if record is None:
            continue
        if record.get("best_params_sha256") != best_sha:
            problems.append(f"{where / 'best'} holds best weights with sha256 {best_sha}, but {run_dir / source} "
                            f"records {record.get('best_params_sha256')}")
        elif record.get("best_epoch") != int(best["epoch"]):
            problems.append(f"{where / 'best'} is from epoch {int(best['epoch'])}, but {run_dir / source} "
                            f"records best_epoch {record.get('best_epoch')}")
    if problems:
        raise StoredFilesError(problems)
    return config, state


def _rerun_final_state(out: Path):
    from detjax.manifest import read_manifest
    from detjax.train import TrainConfig

    manifest = read_manifest(out)
    return _restore_final(out, manifest, TrainConfig.from_dict(manifest["config"]))[0]


class _VerifyStop(Exception):
    """Ends ``verify`` early with exit status ``code`` (its ``error:`` line already printed)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _check_verify_args(args) -> Path:
    """Validates ``verify``'s arguments before any work; the absolute run directory.
    Raises :class:`~detjax.cli.UsageError`."""
    from detjax.cli import UsageError, check_out_dir

    run_dir = Path(args.run_dir).absolute()
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a folder (give a run directory)")
    if args.out:
        check_out_dir(args.out)
        out_path = Path(args.out).absolute()
        if out_path.exists() and any(out_path.iterdir()):
            raise UsageError(f"--out {out_path} is not empty; the re-run needs a new or empty folder")
    return run_dir  # a missing manifest.json: read_manifest's FileNotFoundError names it


def _verifiable_manifest(run_dir: Path) -> dict:
    """The manifest of ``run_dir`` when it is a finished solo run; :class:`_VerifyStop` otherwise
    (corrupt manifest: exit 3; unfinished run or multi-seed member: exit 2)."""
    from detjax.manifest import read_manifest

    try:
        manifest = read_manifest(run_dir)
    except ValueError as exc:
        print(f"error: stored files corrupt: {exc}", file=sys.stderr)
        raise _VerifyStop(EXIT_CORRUPT) from None
    if manifest.get("status") != "finished":
        print(f"error: {run_dir} holds an unfinished run (status {manifest.get('status')!r}); "
              "finish it with --resume before verifying", file=sys.stderr)
        raise _VerifyStop(EXIT_ERROR)
    execution = manifest.get("execution") or {}
    if execution.get("mode") in ("vmap", "map", "unroll"):
        # A member of a multi-seed program may sum in another order than a solo run
        # (docs/seed_studies.md), so a solo re-run need not reproduce its bits.
        print(f"error: {run_dir} is a member of a {execution['mode']} group of seeds {execution.get('seeds')}; "
              "its bits are the group's, not necessarily a solo run's. Re-train the group with "
              "detjax.multiseed.train_seeds(config, data, seeds, mode=...) and compare the hashes, or train "
              "studies with --mode sequential, whose members verify as solo runs", file=sys.stderr)
        raise _VerifyStop(EXIT_ERROR)
    return manifest


def _verify_stored_files(run_dir: Path, manifest: dict):
    """Step 1, what is stored: :func:`check_stored_files`, reported; ``(config, stored state)``.
    :class:`_VerifyStop` (exit 3, each mismatch listed) when the files are corrupt."""
    print(f"checking the stored files of {run_dir} ...", flush=True)
    try:
        config, stored_state = check_stored_files(run_dir, manifest)
    except StoredFilesError as exc:
        for problem in exc.problems:
            print(f"corrupt: {' '.join(problem.split())}", file=sys.stderr)
        print(f"error: stored files corrupt: {len(exc.problems)} mismatch(es) in {run_dir} (listed above); "
              "nothing was re-run", file=sys.stderr)
        raise _VerifyStop(EXIT_CORRUPT) from None
    expected = manifest["final_digests"]["sha256"]
    print(f"stored files intact: final checkpoint, best weights, manifest.json and result.json agree "
          f"(final sha256 {expected[:16]}...)", flush=True)
    return config, stored_state


def _rerun_placement(manifest: dict) -> list[str]:
    """The ``--cpu-threads`` / ``--devices`` flags that repeat the recorded thread and device
    counts (for the re-run and the environment check)."""
    recorded_threads = manifest["environment"].get("determinism", {}).get("cpu_threads")
    placement = ["--cpu-threads", str(recorded_threads)] if recorded_threads else []
    recorded_devices = manifest.get("mesh", {}).get("devices", 1)
    if recorded_devices > 1:
        placement += ["--devices", str(recorded_devices)]
    # Runs recorded before CPU kernel options existed, or with none applied, used XLA's own.
    kernels = manifest["environment"].get("determinism", {}).get("cpu_kernel_flags")
    placement += ["--cpu-kernels", "fast" if kernels else "default"]
    return placement


def _rerun_config(args, run_dir: Path, manifest: dict, config, config_path: Path, out: Path,
                  placement: list[str]) -> dict:
    """``python -m detjax run`` of ``config_path`` into ``out`` in a fresh process; its result
    line. Its stderr (progress bar, any error) passes through; :class:`_VerifyStop` (exit 2)
    when it fails."""
    # Compiled afresh: a program read back from a cache would not be re-derived.
    cmd = [sys.executable, "-m", "detjax", "run", str(config_path), "--out", str(out), *placement,
           "--compile-cache", "none"]
    if args.no_progress:
        cmd.append("--no-progress")
    print(f"re-running {run_dir.name} (config {manifest['config_hash'][:12]}, {config.epochs} epochs) in a "
          "fresh process ...", flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        print(f"error: the re-run failed (exit status {proc.returncode}; its message is above)", file=sys.stderr)
        raise _VerifyStop(EXIT_ERROR)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _environment_differences(manifest: dict, placement: list[str]) -> list[str]:
    """The fingerprint keys in which ``python -m detjax env`` (same placement) differs from
    the recorded environment."""
    arch = ["--arch", manifest["config"]["arch"]] if manifest.get("config", {}).get("arch") else []
    env_now = json.loads(subprocess.run([sys.executable, "-m", "detjax", "env", *placement, *arch],
                                        stdout=subprocess.PIPE, text=True).stdout)
    # The compile cache is left out: the re-run compiles afresh on purpose (a cached program
    # gives a fresh compile's bits).
    return sorted(k for k in set(env_now) | set(manifest["environment"])
                  if k != "compile_cache" and env_now.get(k) != manifest["environment"].get(k))


def _rerun_and_compare(args, run_dir: Path, manifest: dict, config, stored_state) -> dict:
    """Step 2, what is reproducible: the recorded config re-run in a fresh process (in
    ``--out`` or a temporary folder); the report comparing its final state with the stored one."""
    expected = manifest["final_digests"]["sha256"]
    placement = _rerun_placement(manifest)
    with tempfile.TemporaryDirectory(prefix="detjax-verify-") as tmp:
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps(manifest["config"]))
        out = Path(args.out).absolute() if args.out else Path(tmp) / "rerun"
        rerun = _rerun_config(args, run_dir, manifest, config, config_path, out, placement)
        report = {"run_dir": str(run_dir), "expected_final_sha256": expected,
                  "rerun_final_sha256": rerun["final_sha256"],
                  "identical": rerun["final_sha256"] == expected,
                  "stored_files": "intact"}
        if not report["identical"]:
            from detjax import hashing

            report["first_difference"] = hashing.first_difference(stored_state, _rerun_final_state(out))
        report["environment_differences"] = _environment_differences(manifest, placement)
    return report


def cmd_verify(args) -> int:
    """``verify``: checks the stored files, then re-runs the recorded config and compares the
    final hashes (exit statuses in the module docstring)."""
    run_dir = _check_verify_args(args)
    try:
        manifest = _verifiable_manifest(run_dir)
        config, stored_state = _verify_stored_files(run_dir, manifest)
        report = _rerun_and_compare(args, run_dir, manifest, config, stored_state)
    except _VerifyStop as stop:
        return stop.code
    print(json.dumps(report, indent=2))
    if report["identical"]:
        print("identical")
        return EXIT_IDENTICAL
    print(f"DIFFERENT: first differing leaf {report['first_difference']}")
    return EXIT_DIFFERENT


def cmd_env(args) -> int:
    from detjax.cli import check_compile_cache, configure_process

    check_compile_cache(args.compile_cache)
    print(json.dumps(configure_process(args.cpu_threads, args.devices, arch=args.arch, cpu_kernels=args.cpu_kernels,
                                       allocator=args.allocator, compile_cache=args.compile_cache),
                     indent=2, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from detjax.cli import (DEFAULT_DEVICES, add_compile_cache_flag, add_cpu_kernels_flag, add_device_flags,
                            positive_int, subcommand_parser)

    parser, sub = subcommand_parser("python -m detjax", __doc__)
    run = sub.add_parser("run", help="train a config file under the deterministic configuration")
    run.add_argument("config", help="JSON file with a TrainConfig dict or a run's manifest.json")
    run.add_argument("--out", required=True, help="run directory to create (or resume)")
    run.add_argument("--resume", action="store_true", help="continue a run directory's last checkpoint")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--cpu-threads", type=positive_int, default=None, help="pin the CPU backend to N threads")
    add_device_flags(run)
    add_cpu_kernels_flag(run)
    add_compile_cache_flag(run)
    run.set_defaults(fn=cmd_run)
    verify = sub.add_parser(
        "verify", help="check a run's stored files, then re-run its config and compare final hashes",
        description="Exit status: 0 identical, 1 the re-run differs, 2 nothing could be verified, "
                    "3 the stored files are corrupt.")
    verify.add_argument("run_dir")
    verify.add_argument("--out", default=None, help="keep the re-run here (default: a temporary directory)")
    verify.add_argument("--no-progress", action="store_true", help="no progress bar for the re-run")
    verify.set_defaults(fn=cmd_verify)
    env = sub.add_parser("env", help="print the environment fingerprint")
    env.add_argument("--cpu-threads", type=positive_int, default=None)
    env.add_argument("--devices", type=positive_int, default=DEFAULT_DEVICES)
    env.add_argument("--arch", default=None, help="the model whose CPU kernel options apply (--cpu-kernels)")
    add_cpu_kernels_flag(env)
    add_compile_cache_flag(env)
    env.set_defaults(fn=cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, OSError, RuntimeError, FloatingPointError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
