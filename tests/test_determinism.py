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
