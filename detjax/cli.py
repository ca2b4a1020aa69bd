"""Shared pieces of the experiment command lines (``experiments/*.py``, ``python -m detjax``).

Every command line validates all of its arguments before any heavy work (data loading,
compiling, training): numbers through the argparse types below (:func:`positive_int`, ...),
paths through :func:`check_out_dir` / :func:`check_data_dir`, the run directory through
:func:`check_run_dir`. A bad value is one ``error:`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence


class UsageError(ValueError):
    """A bad command-line value (reported as one ``error:`` line, exit status 2)."""


def _int_arg(text: str, kind: str) -> int:
    """``int(text)``, or :class:`argparse.ArgumentTypeError` expecting a ``kind`` integer."""
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _int_arg(text, "positive")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _int_arg(text, "non-negative")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def seed_int(text: str) -> int:
    """argparse type: a seed, 0 <= seed < 2**32."""
    value = nonnegative_int(text)
    if value >= 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be below 2**32, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def subcommand_parser(prog: str, description: str | None) -> tuple[argparse.ArgumentParser, Any]:
    """``(parser, subparsers)``: a parser for ``prog`` whose ``description`` keeps its line
    breaks, and its required sub-commands (the chosen one in ``args.command``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser, parser.add_subparsers(dest="command", required=True)


def error_exit(message: str, code: int = 2):
    """Prints ``error: message`` (one line) to stderr and exits with ``code``."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def one_line(message: Any) -> str:
    """``message`` on one line (newlines and runs of spaces collapsed)."""
    return " ".join(str(message).split())


def check_data_dir(path: str | os.PathLike[str] | None, flag: str = "--data-dir") -> None:
    """Raises :class:`UsageError` unless ``path`` (when given) is an existing folder."""
    if path is None:
        return
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"{flag} {path}: no such folder")
    if not p.is_dir():
        raise UsageError(f"{flag} {path} is not a folder")


def check_out_dir(path: str | os.PathLike[str] | None, flag: str = "--out") -> None:
    """Raises :class:`UsageError` unless ``path`` is (or can be created as) a writable folder.

    Probes the folder, or its nearest existing parent, by creating and removing a temporary
    file there, so permissions, read-only file systems and ACLs all count.
    """
    if path is None:
        return
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path} exists and is not a folder")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag} {path}: {probe} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {path} is not writable ({probe}: {exc.strerror or exc})") from None


def check_resume_target(out: str | os.PathLike[str] | None, resume: bool) -> None:
    """With ``resume``: :class:`UsageError` unless ``out`` is given and holds a run (a
    ``manifest.json``), so a misspelt ``--out`` never starts a fresh run silently."""
    if not resume:
        return
    if out is None:
        raise UsageError("--resume needs --out, the run directory to continue")
    path = Path(out).expanduser().absolute()
    if not (path / "manifest.json").is_file():
        what = "does not exist" if not path.exists() else "holds no detjax run (no manifest.json)"
        raise UsageError(f"--resume: {path} {what}; check the path, or leave out --resume to start a new run there")


def check_run_dir(out: str | os.PathLike[str] | None, config_hash: str, resume: bool) -> dict | None:
    """Checks the run directory before any data is loaded.

    * ``resume`` without ``out``, or ``out`` holding no run: :class:`UsageError`.
    * ``out`` holding another config's run, or (without ``resume``) any run or other files:
      :class:`detjax.train.RunDirectoryError` (nothing is overwritten).
    * ``resume`` of a finished run of this config: returns its stored result (the caller
      reports it and changes nothing); otherwise ``None``.
    """
    from detjax import manifest as manifest_lib
    from detjax.train import _check_run_dir

    check_resume_target(out, resume)
    if out is None:
        return None
    out = Path(out).expanduser().absolute()
    _check_run_dir(out, config_hash, resume)
    return manifest_lib.finished_result(out) if resume else None


def print_complete(out: str | os.PathLike[str], result: dict[str, Any], *, stream=sys.stdout) -> None:
    """What ``--resume`` of a finished run prints: that it is complete, its result and hashes."""
    print(f"run {Path(out).absolute()} is already complete; nothing was changed. Its recorded result:",
          file=stream)
    print_result(result, stream=stream)


def add_common_flags(parser: argparse.ArgumentParser, *, inits: Sequence[str], default_init: str,
                     default_epochs: int, epochs_note: str,
                     data_dir_help: str = "dataset directory (default: the vendored sample)") -> None:
    parser.add_argument("--init", choices=list(inits), default=default_init,
                        help=f"weight initialisation (default: {default_init})")
    parser.add_argument("--variant", choices=["reference", "orthonormal"], default="reference",
                        help="basis form: the paper's exact matrices or exactly orthonormal ones")
    parser.add_argument("--order", choices=["golden", "seeded", "seeded_as_released"], default="golden",
                        help="batch order: golden-ratio schedule, a seeded shuffle per epoch with its own key "
                             "per (seed, epoch), or the released code's keys seed+epoch (seeds then share "
                             "most epochs' permutations)")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed for Kaiming init, dropout and seeded order")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help=f"training epochs (default: {default_epochs}; {epochs_note})")
    parser.add_argument("--data-dir", default=None, help=data_dir_help)
    parser.add_argument("--out", default=None, help="run directory (default: runs/<experiment>-<timestamp>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--limit", type=positive_int, default=None, help="use only the first N records of each split")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--cpu-threads", type=positive_int, default=None,
                        help="pin the CPU backend to N threads (CPU bits depend on the thread count)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_print_config_flag(parser)
    add_device_flags(parser)
    add_cpu_kernels_flag(parser)
    add_compile_cache_flag(parser)
    parser.set_defaults(default_epochs=default_epochs, epochs_note=epochs_note)  # for parse_to_config


#: One default for every entry point (experiments, ``python -m detjax run``, studies).
DEFAULT_DEVICES = 1


def add_print_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and its hash as JSON and exit without training")


def print_config(configs, *, stream=sys.stdout) -> int:
    """``--print-config``: ``{"config", "config_hash"}`` as JSON for one config, or a list of
    those (each with the extra keys given, e.g. ``arm`` and ``seed``) for ``(config, extra)``
    pairs. Returns the exit status 0."""
    import json

    if isinstance(configs, list):
        out = [{**extra, "config": c.to_dict(), "config_hash": c.hash()} for c, extra in configs]
    else:
        out = {"config": configs.to_dict(), "config_hash": configs.hash()}
    print(json.dumps(out, indent=2, sort_keys=True), file=stream)
    return 0


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=positive_int, default=DEFAULT_DEVICES,
                        help=f"data-parallel device count (default {DEFAULT_DEVICES} on every entry point: the "
                             "bits depend on N, so a run does not change with the machine it lands on). On "
                             "CPU, N host devices are created for N > 1; the manifest records N")
    parser.add_argument("--allow-device-change", action="store_true",
                        help="with --resume: continue a checkpoint written on another device count "
                             "(the result is then not bit-identical to either)")


def add_compile_cache_flag(parser: argparse.ArgumentParser, note: str = "") -> None:
    parser.add_argument("--compile-cache", default="auto", metavar="auto|none|DIR",
                        help="persistent XLA compilation cache: auto (default) follows JAX_COMPILATION_CACHE_DIR "
                             "/ JAX_ENABLE_COMPILATION_CACHE when set, else a per-user folder per CPU type "
                             "(~/.cache/detjax/xla/..., $DETJAX_CACHE_DIR moves it; 2 GiB at most); none; or a "
                             "folder. Same bits either way: a stored program is the one a fresh compile gives"
                             + note)


def check_compile_cache(value: str) -> None:
    """``--compile-cache``: a word of ``determinism.COMPILE_CACHE_CHOICES`` or a usable folder."""
    from detjax.determinism import COMPILE_CACHE_CHOICES  # no JAX import: safe before configure

    if value not in COMPILE_CACHE_CHOICES:
        check_out_dir(value, "--compile-cache")


def configure_process(cpu_threads: int | None, devices: int | None, *, arch: str | None = None,
                      cpu_kernels: str = "fast", allocator: str = "system", compile_cache: str = "auto") -> dict:
    """``determinism.configure`` plus, for ``devices > 1``, that many CPU host devices (the flag
    only concerns the host platform, so it is harmless on GPU machines), model ``arch``'s
    CPU kernel options (``--cpu-kernels``, :func:`detjax.determinism.cpu_kernel_flags`) and the
    compilation cache (``--compile-cache``, :func:`detjax.determinism.use_compile_cache`).
    ``allocator="jemalloc"`` first restarts the process under jemalloc (:func:`use_jemalloc`)."""
    from detjax import determinism

    if allocator == "jemalloc":
        use_jemalloc()

    determinism.use_compile_cache(compile_cache)
    extra = [f"--xla_force_host_platform_device_count={devices}"] if devices and devices > 1 else []
    return determinism.configure(cpu_threads=cpu_threads, extra_xla_flags=extra,
                                 cpu_kernels=determinism.cpu_kernel_flags(arch, cpu_kernels))


ALLOCATORS = ("system", "jemalloc")
ENV_JEMALLOC = "DETJAX_JEMALLOC"  # the jemalloc library to preload (a path or a file name)
#: jemalloc keeps the pages it got (XLA's per-step buffers then never fault in again).
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true"


def use_jemalloc() -> None:
    """Restart this command under jemalloc, unless it already runs under it.

    ``os.execve`` of the same interpreter and arguments with ``LD_PRELOAD`` set to
    ``$DETJAX_JEMALLOC`` (else the ``libjemalloc`` the dynamic linker finds) and
    ``MALLOC_CONF=`` :data:`JEMALLOC_CONF`. Where the memory comes from never changes a bit;
    the fingerprint records the preload (``environment.host_allocator``). Raises
    :class:`UsageError` naming the remedy when no jemalloc is found.
    """
    import ctypes.util

    from detjax.determinism import host_allocator_info  # no JAX import: safe before configure

    preloaded = os.environ.get("LD_PRELOAD", "")
    library = os.environ.get(ENV_JEMALLOC) or ctypes.util.find_library("jemalloc")
    if not library:
        raise UsageError(f"--allocator jemalloc: no jemalloc library found; install it (apt install libjemalloc2, "
                         f"conda install jemalloc) or set {ENV_JEMALLOC}=/path/to/libjemalloc.so.2")
    if os.sep in library and not os.path.isfile(library):
        raise UsageError(f"--allocator jemalloc: {ENV_JEMALLOC}={library} is not a file")
    name = os.path.basename(library)
    if name in host_allocator_info()["ld_preload"]:
        # Restarted (or preloaded by the caller): check the dynamic linker really loaded it.
        try:
            mapped = name in Path("/proc/self/maps").read_text()
        except OSError:
            mapped = True  # no /proc to ask: trust LD_PRELOAD
        if not mapped:
            raise UsageError(f"--allocator jemalloc: LD_PRELOAD names {name}, but the dynamic linker did not load it")
        return
    env = dict(os.environ, LD_PRELOAD=" ".join(x for x in (library, preloaded) if x))
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def add_cpu_kernels_flag(parser: argparse.ArgumentParser) -> None:
    """``--cpu-kernels`` and ``--allocator``: the CPU speed options (the manifest records both)."""
    from detjax.determinism import CPU_KERNELS  # no JAX import: safe before configure

    parser.add_argument("--cpu-kernels", choices=CPU_KERNELS, default=CPU_KERNELS[0],
                        help="fast (default): the XLA CPU options measured fastest for the model "
                             "(docs/RESULTS.md); default: XLA's own. Each is bit-reproducible; their bits "
                             "differ, and the manifest records which was used. No effect on GPUs")
    parser.add_argument("--allocator", choices=ALLOCATORS, default="system",
                        help="jemalloc: restart under jemalloc keeping its pages (needs the library; "
                             f"${ENV_JEMALLOC} names it): same bits, the Conformer's CPU step about 1.45x faster. "
                             "system (default): the C library's malloc")


def validate_common(args: argparse.Namespace) -> None:
    """The path checks of :func:`add_common_flags`' flags (the numbers are checked by argparse);
    also serves ``python -m detjax run``, which has no ``--data-dir``."""
    check_data_dir(getattr(args, "data_dir", None))
    check_out_dir(args.out if args.out is not None else "runs")  # the default run directory goes there
    check_resume_target(args.out, args.resume)
    check_compile_cache(args.compile_cache)
    if args.allow_device_change and not args.resume:
        raise UsageError("--allow-device-change only applies with --resume")


def parse_to_config(parser: argparse.ArgumentParser, argv, config_of: Callable[[argparse.Namespace, int], Any], *,
                    validate: Callable[[argparse.Namespace, Any], None] | None = None):
    """The shared start of every experiment CLI (its parser built with :func:`add_common_flags`).

    Parses and validates ``argv``: argparse types, :func:`validate_common`, the recipe's own
    checks (``config_of(args, 1)``, then ``validate(args, that_config)``); each ``ValueError``
    is one ``error:`` line and exit status 2. Then configures the process for bit-identical
    work (before any JAX computation; ``args.environment`` holds the environment fingerprint),
    resolves the epoch count (announcing the default when it applies) and builds
    ``config_of(args, epochs)``. ``--print-config`` prints it and exits 0 here, before any data
    is loaded. Returns ``(args, config)``.
    """
    args = parser.parse_args(argv)
    try:
        validate_common(args)
        config = config_of(args, 1)
        args.arch = config.arch  # the model picks its CPU kernel options (--cpu-kernels)
        if validate is not None:
            validate(args, config)
    except (ValueError, OSError) as exc:
        error_exit(str(exc))
    try:
        args.environment = configure_process(args.cpu_threads, args.devices, arch=args.arch,
                                             cpu_kernels=args.cpu_kernels, allocator=args.allocator,
                                             compile_cache=args.compile_cache)
    except UsageError as exc:
        error_exit(str(exc))
    epochs = args.epochs
    if epochs is None:
        epochs = args.default_epochs
        if not args.print_config:  # --print-config prints JSON alone
            print(f"epochs: {epochs} by default ({args.epochs_note})", flush=True)
    config = config_of(args, epochs)
    if args.print_config:
        raise SystemExit(print_config(config))
    return args, config


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
        if any(auc is None for auc in per_class.values()):
            print("n/a: the test split has no positive (or no negative) record of that class, so its AUC "
                  "is undefined; the macro AUC averages the other classes", file=stream)
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
        finished = check_run_dir(args.out, config.hash(), args.resume)
        if finished is not None:
            print_complete(args.out, finished)
            return 0
        from detjax.train import make_mesh

        make_mesh(args.devices)  # a device count the machine lacks fails here, before the data load
        data = tasks.load_task(config)
        out = Path(args.out) if args.out else default_out(config.task.replace(":", "-"))
        print(f"task {config.task}: {data.train_x.shape[0]} train / {data.val_x.shape[0]} val / "
              f"{data.test_x.shape[0]} test samples; config hash {config.hash()[:16]}", flush=True)
        result = train_and_evaluate(config, data, out, resume=args.resume, environment=args.environment,
                                    progress=not args.no_progress, augment=augment, devices=args.devices,
                                    allow_device_change=args.allow_device_change)
    except (ValueError, FileNotFoundError, OSError, FloatingPointError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    print_result(result)
    return 0
