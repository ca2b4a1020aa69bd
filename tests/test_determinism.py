"""Tests for detjax.determinism. The JAX backend is process-global, so every configure()
scenario runs in a fresh interpreter; flag probes share one cache for the session."""

import importlib.metadata
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import pytest

from detjax import determinism

REPO = pathlib.Path(__file__).resolve().parents[1]
UNKNOWN = "--xla_this_flag_does_not_exist=true"
KNOWN_CPU = "--xla_cpu_multi_thread_eigen=false"
needs_affinity = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity"
)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("detjax_cache")


def run_python(code: str, cache_dir, xla_flags: str | None = None) -> dict:
    """Run ``code`` in a fresh interpreter; it must print one JSON document last."""
    env = dict(os.environ, PYTHONPATH=str(REPO), DETJAX_CACHE_DIR=str(cache_dir))
    env.pop("XLA_FLAGS", None)
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_configure_sets_flags_and_jax_settings_and_returns_fingerprint(cache_dir):
    out = run_python(
        """
        import json
        from detjax import determinism
        fp = determinism.configure(extra_xla_flags=["%s"])
        import jax, jax.numpy as jnp
        hlo = jax.jit(jnp.dot).lower(jnp.ones((2, 2)), jnp.ones((2, 2))).as_text()
        print(json.dumps({"fp": fp, "hlo_highest": "HIGHEST" in hlo,
                          "x64": jax.config.jax_enable_x64}))
        """ % UNKNOWN,
        cache_dir,
    )
    fp = out["fp"]
    applied = fp["determinism"]["xla_flags_applied"]
    skipped = [s["flag"] for s in fp["determinism"]["xla_flags_skipped"]]
    # every deterministic flag is either applied (and in effect) or reported as skipped
    assert sorted(applied + skipped) == sorted([*determinism.DETERMINISTIC_XLA_FLAGS, UNKNOWN])
    assert skipped[-1] == UNKNOWN and UNKNOWN not in fp["xla_flags"]
    assert all(flag in fp["xla_flags"] for flag in applied)
    # this jaxlib (0.10) knows all four deterministic flags
    assert set(applied) == set(determinism.DETERMINISTIC_XLA_FLAGS)
    assert fp["jax_config"]["jax_default_matmul_precision"] == "highest"
    assert fp["jax_config"]["jax_default_prng_impl"] == "threefry2x32"
    assert fp["jax_config"]["jax_threefry_partitionable"] is True
    assert fp["jax_config"]["jax_enable_x64"] is False and out["x64"] is False
    assert out["hlo_highest"]  # the precision reaches the compiled dot
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy"):
        assert fp["packages"][name] == importlib.metadata.version(name)
    assert fp["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert fp["backend"]["device_count"] >= 1 and fp["backend"]["device_kinds"]
    assert fp["backend"]["platform"] in ("cpu", "gpu", "cuda", "rocm", "tpu")
    assert fp["cpu"]["allowed_cores"] == sorted(os.sched_getaffinity(0))
    assert fp["cpu"]["count"] == os.cpu_count()
    hostname = socket.gethostname()
    if len(hostname) >= 6:
        assert hostname not in json.dumps(fp)


def test_refuses_when_backend_started_with_other_flags(cache_dir):
    out = run_python(
        """
        import json, jax
        jax.devices()  # backend starts without the deterministic flags
        from detjax import determinism
        try:
            determinism.configure()
            print(json.dumps({"raised": None}))
        except RuntimeError as err:
            print(json.dumps({"raised": str(err)}))
        """,
        cache_dir,
    )
    message = out["raised"]
    assert message is not None
    assert "must run before the JAX backend starts" in message
    assert "--xla_gpu_deterministic_ops: in effect None, wanted 'true'" in message
    assert "fresh process" in message


def test_second_call_is_idempotent_but_other_settings_are_refused(cache_dir):
    out = run_python(
        """
        import json, os
        from detjax import determinism
        first = determinism.configure(cpu_threads=1)
        import jax.numpy as jnp
        jnp.ones(3).block_until_ready()  # real work in between
        second = determinism.configure(cpu_threads=1)
        try:
            determinism.configure(extra_xla_flags=["--xla_cpu_enable_fast_math=false"])
            refused = None
        except RuntimeError as err:
            refused = str(err)
        print(json.dumps({"first": first, "second": second, "refused": refused,
                          "env": os.environ["XLA_FLAGS"]}))
        """,
        cache_dir,
    )
    assert out["first"] == out["second"]
    assert out["env"].split().count(KNOWN_CPU) == 1  # no duplicate entries
    assert "--xla_cpu_enable_fast_math: in effect None, wanted 'false'" in out["refused"]


def test_existing_xla_flags_are_kept_and_conflicting_ones_overridden(cache_dir):
    out = run_python(
        """
        import json
        from detjax import determinism
        print(json.dumps(determinism.configure()))
        """,
        cache_dir,
        xla_flags="--xla_gpu_deterministic_ops=false --xla_cpu_enable_fast_math=false",
    )
    flags = out["xla_flags"]
    assert "--xla_cpu_enable_fast_math=false" in flags
    assert "--xla_gpu_deterministic_ops=false" not in flags
    assert flags.count("--xla_gpu_deterministic_ops=true") == 1


def test_not_deterministic_leaves_xla_defaults(cache_dir):
    out = run_python(
        """
        import json
        from detjax import determinism
        print(json.dumps(determinism.configure(deterministic=False)))
        """,
        cache_dir,
    )
    assert out["xla_flags"] == [] and out["determinism"]["deterministic"] is False
    assert out["jax_config"]["jax_default_matmul_precision"] == "highest"


@needs_affinity
def test_pin_to_core_zero_and_single_thread(cache_dir):
    out = run_python(
        """
        import json, os
        from detjax import determinism
        fp = determinism.configure(cpu_cores=[0], cpu_threads=1)
        print(json.dumps({"fp": fp, "affinity": sorted(os.sched_getaffinity(0))}))
        """,
        cache_dir,
    )
    assert out["affinity"] == [0]
    assert out["fp"]["cpu"]["allowed_cores"] == [0]
    assert out["fp"]["determinism"]["cpu_cores"] == [0]
    assert KNOWN_CPU in out["fp"]["xla_flags"]


def test_probe_tells_unknown_from_known_flags_and_caches(cache_dir, monkeypatch):
    bad_value = "--xla_gpu_autotune_level=abc"
    flags = [UNKNOWN, KNOWN_CPU, bad_value]
    result = determinism.probe_xla_flags(flags, cache_dir=cache_dir)
    assert result[KNOWN_CPU].accepted
    assert not result[UNKNOWN].accepted and "unknown" in result[UNKNOWN].detail
    assert not result[bad_value].accepted and "abc" in result[bad_value].detail
    cached = list(pathlib.Path(cache_dir).glob("xla_flags-jaxlib*.json"))
    assert len(cached) == 1 and UNKNOWN in json.loads(cached[0].read_text())

    def no_subprocess(tokens):
        raise AssertionError(f"probed again: {tokens}")

    monkeypatch.setattr(determinism, "_run_probe", no_subprocess)
    assert determinism.probe_xla_flags(flags, cache_dir=cache_dir) == result


def test_probe_and_configure_reject_bad_arguments_before_touching_anything():
    with pytest.raises(ValueError, match="xla_foo"):
        determinism.probe_xla_flags(["xla_foo=1"])
    for kwargs, pattern in [
        ({"cpu_threads": 0}, "cpu_threads"),
        ({"cpu_threads": 10_000}, "cpu_threads=10000"),
        ({"cpu_cores": []}, "cpu_cores"),
        ({"cpu_cores": [-1]}, "cpu_cores"),
        ({"cpu_cores": [0], "cpu_threads": 2}, "disagrees"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            determinism.configure(**kwargs)


# ----------------------------------------------------------------------------- fail closed on GPUs
def test_gpu_guard_refuses_without_either_deterministic_flag():
    guard = determinism.require_deterministic_gpu_flags
    for platform in ("gpu", "cuda", "rocm"):
        with pytest.raises(determinism.NondeterministicGPUError, match="refusing to run"):
            guard(platform, ["--xla_gpu_autotune_level=0"])
        with pytest.raises(determinism.NondeterministicGPUError):
            guard(platform, ["--xla_gpu_deterministic_ops=false"])  # present but off
        guard(platform, ["--xla_gpu_deterministic_ops=true"])
        guard(platform, ["--xla_gpu_exclude_nondeterministic_ops=true"])
    guard("cpu", [])  # nothing is required off GPUs
    guard("tpu", [])


FAKE_GPU = """
    import json, os
    from detjax import determinism
    real_probe = determinism.probe_xla_flags
    REJECT = {reject!r}

    def probe(flags, **kw):  # this jaxlib "does not know" the REJECT flags
        out = real_probe([f for f in flags if f not in REJECT], **kw)
        out.update({{f: determinism.FlagProbe(False, "unknown to XLA (faked)") for f in flags if f in REJECT}})
        return out

    determinism.probe_xla_flags = probe
    determinism._platform_and_count = lambda: ("gpu", {devices})  # the real backend is the CPU
    os.environ.pop("NCCL_NVLS_ENABLE", None)
    try:
        fp = determinism.configure(deterministic={deterministic})
        print(json.dumps({{"raised": None, "nccl_set": fp["determinism"]["nccl_env_set"],
                          "nvls": os.environ.get("NCCL_NVLS_ENABLE"), "skipped": fp["determinism"]["xla_flags_skipped"]}}))
    except determinism.NondeterministicGPUError as err:
        print(json.dumps({{"raised": str(err)}}))
"""


def test_configure_fails_closed_on_a_faked_gpu_without_the_flags(cache_dir):
    both = list(determinism.FAIL_CLOSED_GPU_FLAGS)
    out = run_python(FAKE_GPU.format(reject=both, devices=1, deterministic=True), cache_dir)
    assert out["raised"] and "refusing to run on the 'gpu' backend" in out["raised"]
    assert "unknown to XLA (faked)" in out["raised"]
    # one of the two is enough
    out = run_python(FAKE_GPU.format(reject=both[:1], devices=1, deterministic=True), cache_dir)
    assert out["raised"] is None and [s["flag"] for s in out["skipped"]] == both[:1]
    # a knowing negative control is not refused
    out = run_python(FAKE_GPU.format(reject=both, devices=1, deterministic=False), cache_dir)
    assert out["raised"] is None


def test_several_gpus_disable_nccl_nvls_and_record_it(cache_dir):
    out = run_python(FAKE_GPU.format(reject=[], devices=2, deterministic=True), cache_dir)
    assert out["nvls"] == "0"
    assert out["nccl_set"] == {"NCCL_NVLS_ENABLE": {"value": "0", "previous": None}}
    out = run_python(FAKE_GPU.format(reject=[], devices=1, deterministic=True), cache_dir)
    assert out["nvls"] is None and out["nccl_set"] == {}


def test_fingerprint_records_gpu_nccl_and_compile_cache_fields(cache_dir):
    code = """
        import json
        from detjax import determinism
        print(json.dumps(determinism.configure()))
        """
    env_cache = dict(os.environ)
    try:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir / "xla-cache")
        os.environ.pop("JAX_ENABLE_COMPILATION_CACHE", None)
        with_cache = run_python(code, cache_dir)
        os.environ.pop("JAX_COMPILATION_CACHE_DIR")
        os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
        without = run_python(code, cache_dir)
    finally:
        os.environ.clear()
        os.environ.update(env_cache)
    assert with_cache["compile_cache"]["state"] == "enabled"
    assert str(cache_dir) not in json.dumps(with_cache["compile_cache"])  # no paths (may name a user)
    assert without["compile_cache"]["state"] == "disabled"
    backend = without["backend"]
    assert backend["platform"] == "cpu" and backend["gpu"] is None and backend["nccl"] is None
    assert backend["process_count"] == 1 and backend["local_device_count"] >= 1
    assert isinstance(without["gpu_packages"], dict)
    assert without["determinism"]["nccl_env_set"] == {}


def test_cpu_kernel_flags_per_model():
    from detjax import determinism

    assert determinism.cpu_kernel_flags("resnet18") == determinism.CPU_KERNEL_FLAGS["resnet18"]
    assert determinism.cpu_kernel_flags("resnet18", "default") == ()
    assert determinism.cpu_kernel_flags(None) == () and determinism.cpu_kernel_flags("no-such-arch") == ()
    with pytest.raises(ValueError, match="unknown cpu kernels 'turbo'"):
        determinism.cpu_kernel_flags("resnet18", "turbo")


@pytest.mark.parametrize("kernels", ["fast", "default"])
def test_cpu_kernels_are_applied_and_recorded(kernels):
    """``python -m detjax env --arch resnet18 --cpu-kernels K``: the fingerprint records the
    model's kernel options (fast) or none (default), and XLA_FLAGS carries them."""
    import json
    import subprocess
    import sys

    from conftest import cli_env
    from detjax import determinism

    out = subprocess.run([sys.executable, "-m", "detjax", "env", "--arch", "resnet18", "--cpu-kernels", kernels],
                         capture_output=True, text=True, env=cli_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    recorded = json.loads(out.stdout)["determinism"]
    wanted = list(determinism.cpu_kernel_flags("resnet18", kernels))
    assert recorded["cpu_kernel_flags"] == [f for f in wanted if f in recorded["xla_flags_applied"]]
    assert set(recorded["cpu_kernel_flags"]) <= set(recorded["xla_flags_applied"])
    if kernels == "default":
        assert recorded["cpu_kernel_flags"] == []


def test_verify_reruns_with_the_recorded_cpu_kernels():
    from detjax.__main__ import _rerun_placement

    def manifest(flags):
        return {"environment": {"determinism": {"cpu_threads": 2, "cpu_kernel_flags": flags}}, "mesh": {"devices": 1}}

    assert _rerun_placement(manifest(["--xla_cpu_experimental_ynn_fusion_type=dot"]))[-2:] == ["--cpu-kernels", "fast"]
    assert _rerun_placement(manifest([]))[-2:] == ["--cpu-kernels", "default"]
    old = {"environment": {"determinism": {"cpu_threads": 2}}, "mesh": {"devices": 1}}  # recorded before the option
    assert _rerun_placement(old) == ["--cpu-threads", "2", "--cpu-kernels", "default"]


def test_the_fingerprint_names_the_host_allocator(monkeypatch):
    """A preloaded allocator and its settings change the speed, never the bits: the manifest
    says which ran (file names only, no folders)."""
    monkeypatch.setenv("LD_PRELOAD", "/opt/lib/libjemalloc.so.2:/x/libother.so")
    monkeypatch.setenv("MALLOC_CONF", "dirty_decay_ms:-1,retain:true")
    monkeypatch.setenv("MALLOC_TOP_PAD_", "1048576")
    monkeypatch.setenv("MALLOCATOR", "not an allocator setting")
    info = determinism.host_allocator_info()
    assert info["ld_preload"] == ["libjemalloc.so.2", "libother.so"]
    assert info["settings"] == {"MALLOC_CONF": "dirty_decay_ms:-1,retain:true", "MALLOC_TOP_PAD_": "1048576"}
    assert info["libc"] is None or info["libc"].startswith("glibc")
    monkeypatch.delenv("LD_PRELOAD")
    assert determinism.host_allocator_info()["ld_preload"] == []


def test_use_compile_cache_follows_the_choice_and_records_who_chose(tmp_path):
    """auto -> a per-user folder per CPU type (size-limited), unless JAX's own variables are
    set; none -> off; anything else -> that folder. The fingerprint never names the folder."""
    code = f"""
        import json, os
        import jax
        from detjax import determinism as d
        for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE"):
            os.environ.pop(name, None)
        def now(source):
            return {{"source": source, "dir": jax.config.jax_compilation_cache_dir,
                    "max": jax.config.jax_compilation_cache_max_size, "info": d._compile_cache_info(),
                    "xla_caches": jax.config.jax_persistent_cache_enable_xla_caches}}
        out = {{"default": now(d.use_compile_cache("auto")), "expected": str(d.default_compile_cache_dir()),
               "key": d.cpu_type_key()}}
        out["folder"] = now(d.use_compile_cache({str(tmp_path / "mine")!r}))
        out["none"] = now(d.use_compile_cache("none"))
        os.environ["JAX_COMPILATION_CACHE_DIR"] = {str(tmp_path / "from-env")!r}
        out["environment"] = d.use_compile_cache("auto")
        print(json.dumps(out))
        """
    out = run_python(code, tmp_path / "root")
    default = out["default"]
    assert default["source"] == "default" and default["dir"] == out["expected"]
    assert out["expected"].startswith(str(tmp_path / "root" / "xla")) and out["expected"].endswith(out["key"])
    assert len(out["key"]) == 16 and (tmp_path / "root" / "xla").is_dir()
    assert default["max"] == determinism.DEFAULT_COMPILE_CACHE_BYTES and default["xla_caches"] == "none"
    assert default["info"]["state"] == "enabled" and default["info"]["chosen_by"] == "default"
    assert str(tmp_path) not in json.dumps(default["info"])
    assert out["folder"]["dir"] == str(tmp_path / "mine") and (tmp_path / "mine").is_dir()
    assert out["folder"]["info"]["chosen_by"] == "folder"
    assert out["none"]["info"]["state"] == "disabled" and out["none"]["info"]["chosen_by"] == "none"
    assert out["environment"] == "environment"


def test_cpu_type_key_is_stable_and_hex():
    key = determinism.cpu_type_key()
    assert key == determinism.cpu_type_key() and len(key) == 16 and int(key, 16) >= 0
