"""Shared pieces of the experiment command lines (``experiments/*.py``)."""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path
from typing import Any, Sequence


def add_common_flags(parser: argparse.ArgumentParser, *, inits: Sequence[str], default_init: str,
                     default_epochs: int, epochs_note: str,
                     data_dir_help: str = "dataset directory (default: the vendored sample)") -> None:
    parser.add_argument("--init", choices=list(inits), default=default_init,
                        help=f"weight initialisation (default: {default_init})")
    parser.add_argument("--variant", choices=["reference", "orthonormal"], default="reference",
                        help="basis form: the paper's exact matrices or exactly orthonormal ones")
    parser.add_argument("--order", choices=["golden", "seeded"], default="golden",
                        help="batch order: golden-ratio schedule or a seeded shuffle per epoch")
    parser.add_argument("--seed", type=int, default=0, help="seed for Kaiming init, dropout and seeded order")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs (default: {default_epochs}; {epochs_note})")
    parser.add_argument("--data-dir", default=None, help=data_dir_help)
    parser.add_argument("--out", default=None, help="run directory (default: runs/<experiment>-<timestamp>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N records of each split")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="pin the CPU backend to N threads (CPU bits depend on the thread count)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_flags(parser)


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=None,
                        help="data-parallel device count (default: all visible). On CPU, N host "
                             "devices are created for N > 1. The bits depend on N; the manifest records it")
    parser.add_argument("--allow-device-change", action="store_true",
                        help="with --resume: continue a checkpoint written on another device count "
                             "(the result is then not bit-identical to either)")


def configure_process(cpu_threads: int | None, devices: int | None) -> dict:
    """``determinism.configure`` plus, for ``devices > 1``, that many CPU host devices (the flag
    only concerns the host platform, so it is harmless on GPU machines)."""
    from detjax import determinism

    extra = [f"--xla_force_host_platform_device_count={devices}"] if devices and devices > 1 else []
    return determinism.configure(cpu_threads=cpu_threads, extra_xla_flags=extra)


def parse_and_configure(parser: argparse.ArgumentParser, argv, *, default_epochs: int, epochs_note: str):
    """Parses ``argv``, configures the process for bit-identical work FIRST (before any JAX
    computation), and resolves the epoch count (announcing the default when it applies).

    Returns ``(args, epochs)``; ``args.environment`` holds the environment fingerprint.
    """
    args = parser.parse_args(argv)
    args.environment = configure_process(args.cpu_threads, args.devices)
    epochs = args.epochs
    if epochs is None:
        epochs = default_epochs
        print(f"epochs: {epochs} by default ({epochs_note})", flush=True)
    return args, epochs


def default_out(name: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-{stamp}"


def print_result(result: dict[str, Any], *, stream=sys.stdout) -> None:
    """The per-class table, the headline metric, the hashes and the run directory."""
    per_class = result.get("per_class_auc") or {}
    if per_class:
        print(f"\n{'class':<10} {'test AUC':>9}", file=stream)
        for name, auc in per_class.items():
            print(f"{name:<10} {'n/a' if auc is None else f'{auc:.4f}':>9}", file=stream)
    for key in ("macro_auc", "auc", "acc"):
        if key in result:
            print(f"{key:<10} {result[key]:.4f}" if result[key] is not None else f"{key:<10} n/a", file=stream)
    print(f"best validation epoch {result['best_epoch']} (score {result['best_val_score']:.4f})", file=stream)
    print(f"parameters    {result['n_params']:,}", file=stream)
    print(f"init  sha256  {result['init_sha256']}  md5 {result['init_md5']}", file=stream)
    print(f"final sha256  {result['final_sha256']}  md5 {result['final_md5']}", file=stream)
    print(f"run directory {result['run_dir']}  ({result['wall_time_s']:.0f} s)", file=stream)


def run_experiment(config, args, *, augment=None) -> int:
    """Loads the task, trains, prints; clear one-line errors for bad input."""
    from detjax import tasks
    from detjax.train import train_and_evaluate

    try:
        data = tasks.load_task(config)
        out = Path(args.out) if args.out else default_out(config.task.replace(":", "-"))
        print(f"task {config.task}: {data.train_x.shape[0]} train / {data.val_x.shape[0]} val / "
              f"{data.test_x.shape[0]} test samples; config hash {config.hash()[:16]}", flush=True)
        result = train_and_evaluate(config, data, out, resume=args.resume, environment=args.environment,
                                    progress=not args.no_progress, augment=augment, devices=args.devices,
                                    allow_device_change=args.allow_device_change)
    except (ValueError, FileNotFoundError, OSError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_result(result)
    return 0
