"""Configure a process for bit-identical work, and fingerprint its environment.

:func:`configure` must run before the JAX backend starts (before the first array, jit call
or ``jax.devices()``), because XLA reads ``XLA_FLAGS`` once, when the backend is created,
and the CPU client sizes its thread pool from the cores the process may use at that moment.
It sets:

* ``XLA_FLAGS``: ``--xla_gpu_deterministic_ops=true`` (no atomics-based reductions or
  scatters), ``--xla_gpu_exclude_nondeterministic_ops=true`` (no non-deterministic
  algorithms), ``--xla_gpu_autotune_level=0`` (autotuning off: algorithm choice fixed instead
  of picked by run-dependent timings) and
  ``--xla_gpu_enable_scatter_determinism_expander=true``. An unknown flag aborts the process
  inside XLA, so each flag is first tried in a subprocess against the installed jaxlib
  (:func:`probe_xla_flags`, cached per jaxlib version); unknown ones are skipped and listed
  in the fingerprint. The GPU flags are harmless on CPU (XLA parses them everywhere).
* ``jax_default_matmul_precision = "highest"`` (no TF32 / bf16 passes),
  ``jax_default_prng_impl = "threefry2x32"``, ``jax_threefry_partitionable = True`` and
  ``jax_enable_x64 = False``, all explicit so environment variables cannot change them.
* On CPU, optionally, an affinity pin (``cpu_cores``) and a thread count (``cpu_threads``):
  XLA's CPU client sizes its intra-op pool from the allowed cores, and Eigen may split a
  contraction by the number of threads, so CPU results can depend on the core count. This
  jaxlib has no XLA flag for the intra-op thread count, so ``cpu_threads=N`` is realised by
  pinning to N cores; ``cpu_threads=1`` also sets ``--xla_cpu_multi_thread_eigen=false``.

Fail closed on GPUs: when the backend turns out to be a GPU and neither
``--xla_gpu_deterministic_ops`` nor ``--xla_gpu_exclude_nondeterministic_ops`` could be
applied (an XLA that no longer knows them), :func:`configure` raises instead of running a
silently non-deterministic program. With more than one GPU it sets ``NCCL_NVLS_ENABLE=0``
(NVLink SHARP all-reduce is not deterministic on Hopper) unless already ``0``, before any
collective has run, and records it.

It returns :func:`environment_fingerprint`, a JSON-serialisable dict for every manifest: versions
(including the CUDA plugin/PJRT wheels and nvidia-* libraries), backend, device (SM count,
driver version, MIG state where obtainable; ``None`` on CPU), NCCL version and ``NCCL_*``
settings, whether a persistent compilation cache is in use, flags and JAX settings.

:func:`use_compile_cache` turns on JAX's persistent compilation cache (the command lines'
``--compile-cache``, default a per-user folder per CPU type): a stored executable gives the
bits a fresh compile gives, so later runs skip most of the compile time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "host_allocator_info",
    "DETERMINISTIC_XLA_FLAGS",
    "FAIL_CLOSED_GPU_FLAGS",
    "FlagProbe",
    "NondeterministicGPUError",
    "JAX_SETTINGS",
    "SINGLE_THREAD_CPU_FLAGS",
    "CPU_KERNEL_FLAGS",
    "CPU_KERNELS",
    "backend_initialized",
    "cpu_kernel_flags",
    "COMPILE_CACHE_CHOICES",
    "DEFAULT_COMPILE_CACHE_BYTES",
    "cache_root",
    "configure",
    "cpu_type_key",
    "default_compile_cache_dir",
    "environment_fingerprint",
    "probe_xla_flags",
    "use_compile_cache",
]

#: XLA flags that make GPU work bit-reproducible (set where the installed XLA knows them).
DETERMINISTIC_XLA_FLAGS = (
    "--xla_gpu_deterministic_ops=true",
    "--xla_gpu_exclude_nondeterministic_ops=true",
    "--xla_gpu_autotune_level=0",
    "--xla_gpu_enable_scatter_determinism_expander=true",
)
#: On a GPU, at least one of these must be in effect or :func:`configure` refuses to proceed.
FAIL_CLOSED_GPU_FLAGS = (
    "--xla_gpu_deterministic_ops=true",
    "--xla_gpu_exclude_nondeterministic_ops=true",
)
#: Platforms :func:`configure` treats as GPUs.
GPU_PLATFORMS = ("gpu", "cuda", "rocm")
#: Extra flags for ``cpu_threads=1``: single-threaded Eigen contractions and convolutions.
SINGLE_THREAD_CPU_FLAGS = ("--xla_cpu_multi_thread_eigen=false",)
#: XLA CPU options that make a model's train step faster on CPUs, chosen per architecture
#: by ``benchmarks/bench_vs_torch.py`` (docs/RESULTS.md §3; only options that paid are here).
#: They change which kernels XLA emits and so the bits (each choice is bit-reproducible in
#: itself); :func:`configure` records them, ``verify`` re-runs with the recorded choice. They
#: only concern the CPU backend: a GPU run's kernels are unchanged.
CPU_KERNEL_FLAGS: dict[str, tuple[str, ...]] = {
    "resnet18": ("--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",),
}
#: ``"fast"``: :data:`CPU_KERNEL_FLAGS` of the model; ``"default"``: XLA's own choice.
CPU_KERNELS = ("fast", "default")
#: JAX configuration pinned by :func:`configure`.
JAX_SETTINGS = {
    "jax_default_matmul_precision": "highest",
    "jax_default_prng_impl": "threefry2x32",
    "jax_threefry_partitionable": True,
    "jax_enable_x64": False,
}
_REPORTED_CONFIG = (*JAX_SETTINGS, "jax_platforms", "jax_numpy_dtype_promotion")
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy")
_PLUGIN_PREFIXES = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm")
_GPU_LIB_PREFIXES = ("nvidia-", "nvidia_")
_PROBE_CODE = "import jax; jax.devices()"
_PROBE_TIMEOUT_S = 300

# What the last successful configure() applied; reported by environment_fingerprint().
# Process-global by nature, like XLA_FLAGS itself.
_applied: dict | None = None


class NondeterministicGPUError(RuntimeError):
    """A GPU backend without any of :data:`FAIL_CLOSED_GPU_FLAGS` in effect."""


class FlagProbe(NamedTuple):
    """Outcome of trying one ``XLA_FLAGS`` entry against the installed XLA."""

    accepted: bool
    detail: str


# ----------------------------------------------------------------------------- flags
def _flag_name(token: str) -> str:
    return token.lstrip("-").split("=", 1)[0]


def _parse_flags(text: str) -> list[str]:
    return shlex.split(text or "")


def _merge_flags(current: list[str], wanted: list[str]) -> list[str]:
    """``current`` without entries named in ``wanted``, then ``wanted`` (last one wins in XLA)."""
    names = {_flag_name(t) for t in wanted}
    return [t for t in current if _flag_name(t) not in names] + list(wanted)


def _flag_values(tokens: list[str]) -> dict[str, str]:
    values = {}
    for t in tokens:
        name, _, value = t.lstrip("-").partition("=")
        values[name] = value or "true"
    return values


ENV_CACHE_DIR = "DETJAX_CACHE_DIR"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """detjax's per-user cache folder (flag probes, compiled programs, decoded data):
    ``cache_dir``, else ``$DETJAX_CACHE_DIR``, else ``~/.cache/detjax`` (``~`` expanded)."""
    base = cache_dir if cache_dir is not None else os.environ.get(ENV_CACHE_DIR)
    return Path(base).expanduser() if base else Path.home() / ".cache" / "detjax"


def _cache_path(cache_dir: str | os.PathLike | None) -> Path:
    base = cache_root(cache_dir)
    plugins = sorted(
        f"{d.metadata['Name']}=={d.version}"
        for d in importlib.metadata.distributions()
        if (d.metadata["Name"] or "").lower().startswith(_PLUGIN_PREFIXES)
    )
    ident = json.dumps([sys.executable, plugins, os.environ.get("JAX_PLATFORMS", "")])
    tag = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return base / f"xla_flags-jaxlib{_version('jaxlib')}-{tag}.json"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return {k: FlagProbe(bool(v["accepted"]), str(v["detail"])) for k, v in data.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # missing or corrupt: probe again


def _write_cache(path: Path, results: dict[str, FlagProbe]) -> None:
    from detjax.manifest import atomic_file

    try:
        with atomic_file(path, suffix=".tmp") as f:  # concurrent writers never leave a torn file
            f.write(json.dumps({k: v._asdict() for k, v in sorted(results.items())}, indent=1).encode())
    except OSError:
        pass  # an unwritable cache only costs a re-probe next time


def _run_probe(tokens: list[str]) -> tuple[int, str]:
    env = dict(os.environ, XLA_FLAGS=" ".join(tokens), XLA_PYTHON_CLIENT_PREALLOCATE="false")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE_CODE], env=env, capture_output=True, text=True,
            timeout=_PROBE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"probing XLA_FLAGS={' '.join(tokens)!r} timed out") from err
    return proc.returncode, proc.stdout + proc.stderr


def _rejected(output: str, tokens: list[str]) -> dict[str, FlagProbe]:
    """Entries XLA's fatal message names: unknown names (all listed) or a value it can't parse."""
    out = {}
    for line in output.splitlines():
        message = line.split("] ", 1)[-1].strip()
        if "Unknown flag" in message and ":" in message:
            named = set(message.split(":", 1)[1].split())
            reason = f"unknown to XLA in jaxlib {_version('jaxlib')}"
            out.update({t: FlagProbe(False, reason) for t in tokens if t in named})
        elif message.startswith("Couldn't interpret value"):
            name = message.rstrip(".").rsplit(" ", 1)[-1]
            out.update({t: FlagProbe(False, message) for t in tokens if _flag_name(t) == name})
    return out


def _probe_uncached(tokens: list[str]) -> dict[str, FlagProbe]:
    """Try ``tokens`` together; drop the entries XLA names as bad and retry the rest.

    Costs one subprocess when all are known and one more per round of rejections.
    """
    results: dict[str, FlagProbe] = {}
    remaining = list(tokens)
    while remaining:
        code, output = _run_probe(remaining)
        if code == 0:
            results.update({t: FlagProbe(True, "accepted") for t in remaining})
            break
        rejected = _rejected(output, remaining)
        if not rejected:
            if len(remaining) == 1 and "parse_flags_from_env" in output:
                results[remaining[0]] = FlagProbe(False, "rejected by XLA's flag parser")
                break
            if len(remaining) > 1:  # unattributed failure: fall back to one at a time
                for t in remaining:
                    results.update(_probe_uncached([t]))
                break
            raise RuntimeError(
                f"could not probe XLA_FLAGS={remaining[0]!r}: `{sys.executable} -c "
                f"{_PROBE_CODE!r}` exited with {code} for another reason:\n{output[-2000:]}"
            )
        results.update(rejected)
        remaining = [t for t in remaining if t not in rejected]
    return results


def probe_xla_flags(
    flags: Iterable[str], *, cache_dir: str | os.PathLike | None = None
) -> dict[str, FlagProbe]:
    """Whether the installed XLA accepts each ``XLA_FLAGS`` entry, without risking this process.

    Uncached entries are tried in a fresh interpreter (``import jax; jax.devices()`` with only
    those ``XLA_FLAGS``): XLA aborts on an unknown name or a bad value and names the culprits,
    which are marked rejected before the rest are tried again (one subprocess, ~1-3 s, when
    all are known). Results
    are cached in ``$DETJAX_CACHE_DIR`` (default ``~/.cache/detjax``) in a file keyed by the
    jaxlib version, the Python executable and installed GPU plugins.
    """
    flags = list(dict.fromkeys(flags))
    for t in flags:
        if not t.startswith("--") or " " in t:
            raise ValueError(f"XLA flag must look like '--name=value', got {t!r}")
    path = _cache_path(cache_dir)
    cache = _read_cache(path)
    todo = [t for t in flags if t not in cache]
    if todo:
        cache.update(_probe_uncached(todo))
        _write_cache(path, cache)
    return {t: cache[t] for t in flags}


# ----------------------------------------------------------------------------- backend
def backend_initialized() -> bool:
    """Whether JAX has created its backends (after which XLA_FLAGS no longer apply)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # no public equivalent in jax 0.10

    initialized = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(initialized() if initialized else xla_bridge._backends)


def _allowed_cores() -> list[int] | None:
    if not hasattr(os, "sched_getaffinity"):
        return None
    return sorted(os.sched_getaffinity(0))


def _target_cores(cpu_cores, cpu_threads) -> list[int] | None:
    if cpu_threads is not None:
        if isinstance(cpu_threads, bool) or not isinstance(cpu_threads, int) or cpu_threads < 1:
            raise ValueError(f"cpu_threads must be a positive int, got {cpu_threads!r}")
    if cpu_cores is None and cpu_threads is None:
        return None
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError(
            f"cpu_cores={cpu_cores!r} / cpu_threads={cpu_threads!r} need os.sched_setaffinity, "
            f"which {platform.system()} does not provide"
        )
    if cpu_cores is not None:
        cores = sorted(set(cpu_cores))
        bad = [c for c in cores if isinstance(c, bool) or not isinstance(c, int) or c < 0]
        if not cores or bad:
            raise ValueError(
                f"cpu_cores must be a non-empty set of core ids >= 0, got {cpu_cores!r}"
            )
        if cpu_threads is not None and cpu_threads != len(cores):
            raise ValueError(
                f"cpu_threads={cpu_threads} disagrees with {len(cores)} cpu_cores {cores}"
            )
        return cores
    allowed = _allowed_cores()
    if cpu_threads > len(allowed):
        raise ValueError(
            f"cpu_threads={cpu_threads} but the process may only use {len(allowed)} cores {allowed}"
        )
    return allowed[:cpu_threads]


def _refuse(reason: str) -> RuntimeError:
    return RuntimeError(
        "detjax.determinism.configure() must run before the JAX backend starts, and the "
        f"backend is already initialised with other settings: {reason}. Call configure() "
        "first thing in the program (before any jax array, jit call or jax.devices()), or "
        "run the work in a fresh process."
    )


def cpu_kernel_flags(arch: str | None, kernels: str = "fast") -> tuple[str, ...]:
    """The XLA flags of ``kernels`` (one of :data:`CPU_KERNELS`) for model ``arch``: its
    :data:`CPU_KERNEL_FLAGS` for ``"fast"`` (none for a model without any), none for
    ``"default"`` or an unknown ``arch``."""
    if kernels not in CPU_KERNELS:
        raise ValueError(f"unknown cpu kernels {kernels!r}; expected one of {CPU_KERNELS}")
    return CPU_KERNEL_FLAGS.get(arch or "", ()) if kernels == "fast" else ()


# ----------------------------------------------------------------------------- configure
def configure(
    *,
    cpu_threads: int | None = None,
    cpu_cores: Iterable[int] | None = None,
    deterministic: bool = True,
    extra_xla_flags: Iterable[str] = (),
    cpu_kernels: Iterable[str] = (),
    check_flags: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> dict:
    """Configure this process for bit-identical work and return its environment fingerprint.

    Args:
      cpu_threads: pin to this many cores (the first of ``cpu_cores`` or of the currently
        allowed cores); ``1`` also makes Eigen single-threaded. ``None``: unchanged.
      cpu_cores: core ids for ``os.sched_setaffinity``. ``None``: unchanged.
      deterministic: set :data:`DETERMINISTIC_XLA_FLAGS`. ``False`` leaves XLA's defaults
        (for negative controls); JAX settings are pinned either way.
      extra_xla_flags: more ``--name=value`` entries for ``XLA_FLAGS``.
      cpu_kernels: the model's CPU kernel options (:func:`cpu_kernel_flags`); set like
        ``extra_xla_flags`` and recorded apart as ``cpu_kernel_flags``.
      check_flags: probe flags against the installed XLA (:func:`probe_xla_flags`) and skip
        unknown ones. ``False`` sets them unchecked (an unknown one then aborts the process).
      cache_dir: probe cache directory (default ``$DETJAX_CACHE_DIR`` or ``~/.cache/detjax``).

    Returns:
      :func:`environment_fingerprint`, which includes what was applied and skipped. This
      starts the backend, so later calls can only confirm the same settings.

    Raises:
      RuntimeError: the backend is already initialised and ``XLA_FLAGS`` or the CPU
        affinity in effect differ from what this call would set. A repeated call with the
        same settings is fine.
      ValueError: bad ``cpu_cores``/``cpu_threads``/flags.
    """
    global _applied
    cores = _target_cores(cpu_cores, cpu_threads)
    cpu_kernels = list(cpu_kernels)
    wanted = _wanted_flags(deterministic, cpu_threads, [*extra_xla_flags, *cpu_kernels])
    applied, skipped = _probe_flags(wanted, check_flags, cache_dir)
    _set_or_confirm_process(applied, cores)
    nccl = _start_backend(deterministic, skipped)
    _applied = {
        "deterministic": bool(deterministic),
        "xla_flags_applied": applied,
        "xla_flags_skipped": skipped,
        "flags_probed": bool(check_flags),
        "cpu_threads": cpu_threads,
        "cpu_cores": cores,
        "cpu_kernel_flags": [flag for flag in cpu_kernels if flag in applied],
        "jax_settings": dict(JAX_SETTINGS),
        "nccl_env_set": nccl,
    }
    return environment_fingerprint()


def _wanted_flags(deterministic: bool, cpu_threads: int | None, extra_xla_flags: Iterable[str]) -> list[str]:
    """The ``XLA_FLAGS`` entries :func:`configure` wants, in order, without repeats."""
    wanted = list(DETERMINISTIC_XLA_FLAGS) if deterministic else []
    if cpu_threads == 1:
        wanted += SINGLE_THREAD_CPU_FLAGS
    return list(dict.fromkeys([*wanted, *extra_xla_flags]))


def _probe_flags(wanted: list[str], check_flags: bool,
                 cache_dir: str | os.PathLike | None) -> tuple[list[str], list[dict]]:
    """``(applied, skipped)``: the ``wanted`` flags the installed XLA accepts, and the others
    as ``{"flag", "reason"}`` (all accepted, unprobed, when ``check_flags`` is false)."""
    if check_flags:
        probes = probe_xla_flags(wanted, cache_dir=cache_dir)
    else:
        probes = {t: FlagProbe(True, "not probed (check_flags=False)") for t in wanted}
    applied = [t for t in wanted if probes[t].accepted]
    skipped = [{"flag": t, "reason": probes[t].detail} for t in wanted if not probes[t].accepted]
    return applied, skipped


def _set_or_confirm_process(applied: list[str], cores: list[int] | None) -> None:
    """Before the backend starts: merges ``applied`` into ``XLA_FLAGS`` and pins the process
    to ``cores``. After: only confirms both are already in effect (:func:`_refuse` otherwise)."""
    current = _parse_flags(os.environ.get("XLA_FLAGS", ""))
    if backend_initialized():
        in_effect = _flag_values(current)
        differ = {
            name: (in_effect.get(name), value)
            for name, value in _flag_values(applied).items()
            if in_effect.get(name) != value
        }
        if differ:
            detail = ", ".join(
                f"--{k}: in effect {have!r}, wanted {want!r}" for k, (have, want) in differ.items()
            )
            raise _refuse(f"XLA_FLAGS differ ({detail})")
        if cores is not None and _allowed_cores() != cores:
            raise _refuse(f"allowed cores are {_allowed_cores()}, wanted {cores}")
    else:
        os.environ["XLA_FLAGS"] = " ".join(_merge_flags(current, applied))
        if cores is not None:
            try:
                os.sched_setaffinity(0, cores)
            except OSError as err:
                raise ValueError(f"cannot pin the process to cpu_cores {cores}: {err}") from err


def _start_backend(deterministic: bool, skipped: list[dict]) -> dict:
    """Pins :data:`JAX_SETTINGS`, starts the backend, fails closed on a GPU without
    deterministic kernels and pins NCCL; returns what :func:`_pin_nccl` set."""
    import jax

    for name, value in JAX_SETTINGS.items():
        jax.config.update(name, value)
    platform_name, n_devices = _platform_and_count()  # starts the backend
    if deterministic:
        require_deterministic_gpu_flags(platform_name, _parse_flags(os.environ.get("XLA_FLAGS", "")),
                                        skipped)
    return _pin_nccl(platform_name, n_devices)


def _platform_and_count() -> tuple[str, int]:
    """The default backend's platform and global device count (starts the backend)."""
    import jax

    return jax.default_backend(), len(jax.devices())


def require_deterministic_gpu_flags(platform_name: str, in_effect: Iterable[str],
                                    skipped: Iterable[dict] = ()) -> None:
    """Fail closed: raise :class:`NondeterministicGPUError` on a GPU platform when neither
    ``--xla_gpu_deterministic_ops=true`` nor ``--xla_gpu_exclude_nondeterministic_ops=true``
    is among the ``XLA_FLAGS`` entries ``in_effect``. Nothing is checked on other platforms."""
    if platform_name not in GPU_PLATFORMS:
        return
    values = _flag_values(list(in_effect))
    if any(values.get(_flag_name(f)) == "true" for f in FAIL_CLOSED_GPU_FLAGS):
        return
    reasons = "; ".join(f"{s['flag']}: {s['reason']}" for s in skipped
                        if _flag_name(s["flag"]) in {_flag_name(f) for f in FAIL_CLOSED_GPU_FLAGS})
    raise NondeterministicGPUError(
        f"refusing to run on the {platform_name!r} backend without deterministic GPU kernels: "
        f"neither {FAIL_CLOSED_GPU_FLAGS[0]} nor {FAIL_CLOSED_GPU_FLAGS[1]} is in effect"
        + (f" ({reasons})" if reasons else "")
        + ". This jaxlib's XLA does not accept them, so its scatters and reductions may use "
          "atomics and results would not be bit-reproducible. Install a jaxlib whose XLA knows "
          "one of these flags (see requirements-gpu.lock), or pass deterministic=False to run "
          "knowingly without the guarantee.")


def _pin_nccl(platform_name: str, n_devices: int) -> dict:
    """With more than one GPU, ``NCCL_NVLS_ENABLE=0`` (set before any collective runs:
    XLA creates NCCL communicators lazily, at the first collective). Returns what was set."""
    if platform_name not in GPU_PLATFORMS or n_devices < 2:
        return {}
    previous = os.environ.get("NCCL_NVLS_ENABLE")
    if previous == "0":
        return {}
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    return {"NCCL_NVLS_ENABLE": {"value": "0", "previous": previous}}


# ----------------------------------------------------------------------------- fingerprint
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _cuda_versions() -> dict | None:
    """CUDA runtime/driver and library versions from the CUDA plugin, where present."""
    try:
        from jax._src.lib import cuda_versions
    except ImportError:
        return None
    if cuda_versions is None:
        return None
    out = {}
    for name in sorted(dir(cuda_versions)):
        if name.endswith(("_get_version", "_build_version")):
            try:
                out[name] = getattr(cuda_versions, name)()
            except Exception:  # a library missing at runtime is itself worth recording
                out[name] = None
    return out


def _backend_info() -> dict:
    import jax

    devices = jax.devices()
    info = {
        "platform": jax.default_backend(),
        "platform_version": devices[0].client.platform_version,
        "device_count": len(devices),
        "device_kinds": sorted({d.device_kind for d in devices}),
    }
    capability = getattr(devices[0], "compute_capability", None)
    if capability is not None:
        info["compute_capability"] = str(capability)
    info["process_count"] = jax.process_count()
    info["local_device_count"] = jax.local_device_count()
    if info["platform"] in GPU_PLATFORMS:
        info["cuda"] = _cuda_versions()
        info["gpu"] = _gpu_info(devices)
        info["nccl"] = _nccl_info()
    else:
        info["gpu"] = None
        info["nccl"] = None
    return info


def _nvidia_smi(query: str) -> list[list[str]] | None:
    try:
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return [[c.strip() for c in line.split(",")] for line in proc.stdout.strip().splitlines() if line.strip()]


def _gpu_info(devices) -> dict:
    """SM count (``core_count``), driver version and MIG state of the GPUs, where obtainable."""
    import jax

    local = jax.local_devices()
    info: dict = {
        "sm_count": sorted({getattr(d, "core_count", None) for d in local}, key=str),
        "driver_version": None,
        "mig_mode": None,
        "cuda_visible_devices_mig": "MIG-" in os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    }
    rows = _nvidia_smi("driver_version,mig.mode.current,name,memory.total")
    if rows:
        info["driver_version"] = sorted({r[0] for r in rows})
        info["mig_mode"] = sorted({r[1] for r in rows if len(r) > 1})
        info["nvidia_smi_names"] = sorted({r[2] for r in rows if len(r) > 2})
        info["memory_total_mib"] = sorted({r[3] for r in rows if len(r) > 3})
    return info


def _nccl_version() -> str | None:
    """``ncclGetVersion`` of the NCCL library the process can load (the nvidia-nccl wheel's first)."""
    import ctypes

    candidates = []
    try:
        import nvidia.nccl  # type: ignore[import-not-found]  # the nvidia-nccl-cuXX wheel
        for base in getattr(nvidia.nccl, "__path__", []):
            candidates += sorted(str(p) for p in Path(base).glob("lib/libnccl.so*"))
    except ImportError:
        pass
    candidates.append("libnccl.so.2")
    for name in candidates:
        try:
            lib = ctypes.CDLL(name)
            version = ctypes.c_int(0)
            if lib.ncclGetVersion(ctypes.byref(version)) != 0:
                continue
        except (OSError, AttributeError):
            continue
        code = version.value
        major, rest = (code // 10000, code % 10000) if code >= 10000 else (code // 1000, code % 1000)
        return f"{major}.{rest // 100}.{rest % 100}"
    return None


def _nccl_info() -> dict:
    return {"version": _nccl_version(),
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")}}


# ---------------------------------------------------------------------- compile cache

#: ``--compile-cache`` words (anything else names a folder): see :func:`use_compile_cache`.
COMPILE_CACHE_CHOICES = ("auto", "none")
#: The default cache folder is kept under this size (least recently used executables go first).
DEFAULT_COMPILE_CACHE_BYTES = 2 * 1024 ** 3
_JAX_CACHE_ENV = ("JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE")

# How use_compile_cache() set the cache in this process; reported by environment_fingerprint().
_compile_cache_source: str | None = None


def cpu_type_key() -> str:
    """The first 16 hex digits of ``sha256(machine, CPU model, CPU feature flags)``.

    XLA compiles CPU code for the host's instruction set, and JAX's cache key does not
    include it: an executable stored on one CPU type may not run on another, or may not give
    a fresh compile's bits there. The default cache folder is therefore one per CPU type."""
    fields = [platform.machine(), _cpu_model() or ""]
    try:
        with open("/proc/cpuinfo") as f:
            features = next((line for line in f if line.lower().startswith(("flags", "features"))), "")
    except OSError:
        features = ""
    fields.append(" ".join(sorted(features.partition(":")[2].split())) or platform.processor())
    return hashlib.sha256("\n".join(fields).encode()).hexdigest()[:16]


def default_compile_cache_dir() -> Path:
    """``<cache_root()>/xla/<machine>-<cpu_type_key()>``."""
    return cache_root() / "xla" / f"{platform.machine()}-{cpu_type_key()}"


def use_compile_cache(choice: str | os.PathLike = "auto") -> str:
    """Turn JAX's persistent compilation cache on or off for this process; returns how.

    A stored executable is what a fresh compile of the same program gives (JAX's key covers
    the program, compile options, XLA flags and jaxlib version; the default folder adds the CPU
    type), so the bits do not change: only the compile time goes. ``choice``:

    * ``"auto"``: JAX's own variables (``JAX_COMPILATION_CACHE_DIR``,
      ``JAX_ENABLE_COMPILATION_CACHE``) when either is set (returns ``"environment"``), else
      :func:`default_compile_cache_dir`, kept under :data:`DEFAULT_COMPILE_CACHE_BYTES` where
      the ``filelock`` package is installed (``"default"``; ``"unavailable"`` and no cache
      when that folder cannot be created);
    * ``"none"``: no cache, every program compiled afresh (``"none"``);
    * any other value: that folder, created if missing, not size-limited (``"folder"``).

    Where it turns the cache on, XLA's own GPU kernel and autotune caches stay off, so a compile
    sees the same options with or without the cache. Call it before the first compile (JAX
    opens its cache once). The fingerprint records the returned word
    (``compile_cache.chosen_by``), never the path.
    """
    import jax

    global _compile_cache_source
    choice = os.fspath(choice)
    if choice == "none":
        source, folder = "none", None
    elif choice == "auto" and any(name in os.environ for name in _JAX_CACHE_ENV):
        source, folder = "environment", None
    elif choice == "auto":
        source, folder = "default", default_compile_cache_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            source, folder = "unavailable", None  # a read-only home: run without, as before
    else:
        source, folder = "folder", Path(choice)
        folder.mkdir(parents=True, exist_ok=True)
    if source in ("none", "unavailable"):
        jax.config.update("jax_enable_compilation_cache", False)
    elif folder is not None:
        if source == "default" and importlib.util.find_spec("filelock") is not None:
            jax.config.update("jax_compilation_cache_max_size", DEFAULT_COMPILE_CACHE_BYTES)
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", str(folder.absolute()))
        # Whole executables only: XLA's own GPU kernel and autotune caches, which JAX turns on
        # with its cache, would make a compile's options differ from an uncached compile's.
        jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
    _compile_cache_source = source
    return source


def _compile_cache_info() -> dict:
    """Whether JAX's persistent compilation cache is on in this process, and who chose it
    (:func:`use_compile_cache`; ``None`` if not called). No path: it may name a user."""
    import jax

    enabled = bool(getattr(jax.config, "jax_enable_compilation_cache", True))
    directory = getattr(jax.config, "jax_compilation_cache_dir", None)
    used = enabled and bool(directory)
    return {"state": "enabled" if used else "disabled", "jax_enable_compilation_cache": enabled,
            "cache_dir_set": bool(directory), "chosen_by": _compile_cache_source,
            "env": sorted(k for k in os.environ if k in _JAX_CACHE_ENV or k.startswith("JAX_PERSISTENT_CACHE_"))}


def environment_fingerprint() -> dict:
    """Versions, backend, device, flags, JAX settings and CPU affinity of this process.

    JSON-serialisable; deliberately without hostname or user. Starts the JAX backend if it
    has not started (call :func:`configure` first). ``determinism`` is what :func:`configure`
    applied in this process, or ``None``.
    """
    import jax

    cores = _allowed_cores()
    return {
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
        },
        "packages": {name: _version(name) for name in _PACKAGES},
        "gpu_packages": _gpu_packages(),
        "os": {"system": platform.system(), "release": platform.release(),
               "machine": platform.machine()},
        "cpu": {"model": _cpu_model(), "count": os.cpu_count(), "allowed_cores": cores},
        "backend": _backend_info(),
        "xla_flags": _parse_flags(os.environ.get("XLA_FLAGS", "")),
        "jax_config": {name: _jsonable(getattr(jax.config, name, None))
                       for name in _REPORTED_CONFIG},
        "compile_cache": _compile_cache_info(),
        "host_allocator": host_allocator_info(),
        "determinism": json.loads(json.dumps(_applied)) if _applied is not None else None,
    }


def host_allocator_info() -> dict:
    """The C library and any allocator preloaded into this process (``LD_PRELOAD`` entries by
    file name; ``MALLOC_*`` variables such as jemalloc's ``MALLOC_CONF`` and glibc's, and
    ``GLIBC_TUNABLES``). The allocator never changes a computed bit, but it changes the CPU
    speed a lot (docs/RESULTS.md §3: jemalloc that keeps its pages makes the Conformer's step
    about 1.45× faster), so the manifest says which ran."""
    libc = platform.libc_ver()
    preload = [os.path.basename(entry) for entry in os.environ.get("LD_PRELOAD", "").replace(":", " ").split()]
    settings = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"}
    return {"libc": " ".join(x for x in libc if x) or None, "ld_preload": preload, "settings": settings}


def _gpu_packages() -> dict[str, str]:
    """Installed CUDA/ROCm plugin and PJRT wheels and nvidia-* libraries (name -> version)."""
    out = {}
    for d in importlib.metadata.distributions():
        name = (d.metadata["Name"] or "").lower()
        if name.startswith(_PLUGIN_PREFIXES + _GPU_LIB_PREFIXES):
            out[name.replace("_", "-")] = d.version
    return dict(sorted(out.items()))


def _jsonable(value):
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
