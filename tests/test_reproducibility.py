"""Bit-identity across fresh processes and `python -m detjax verify` (kill -9 and resume: test_faults.py).

Every run here is a separate interpreter pinned to one CPU thread (CPU results depend on
the thread count), exactly as a user would run it.
"""

import json

from conftest import cli_env, detjax_cli, detjax_train, result_line

CONFIG = {
    "task": "synthetic",
    "data": {"n_train": 192, "n_val": 32, "n_test": 32, "length": 256, "leads": 12, "num_classes": 4, "seed": 3},
    "arch": "tiny",
    "init": "mixed",
    "epochs": 4,
    "batch_size": 16,
    "eval_every": 2,
}
# No shared compilation cache: each process compiles for itself (also for the conftest.py
# fixtures config_path and reference_run, which train this module's CONFIG).
FRESH_COMPILE = True


def _env():
    return cli_env(fresh_compile=True)


def _cli(*args, check=True):
    proc = detjax_cli(*args, env=_env(), timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"detjax {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def _train(config_path, out, *extra):
    return result_line(detjax_train(config_path, out, *extra, env=_env(), timeout=600))


def test_fresh_processes_give_identical_final_hashes_with_and_without_the_compile_cache(
        config_path, reference_run, tmp_path):
    """The reference run compiled without any cache; the second compiles afresh into the
    CLI's default per-user cache (empty), the third reads every program back from it."""
    _, first = reference_run
    env = {k: v for k, v in _env().items() if k != "JAX_ENABLE_COMPILATION_CACHE"}
    env.update(DETJAX_CACHE_DIR=str(tmp_path / "user-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    runs = []
    for name in ("cold-cache", "warm-cache"):
        runs.append(result_line(detjax_train(config_path, tmp_path / name, env=env, timeout=600)))
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert manifest["environment"]["compile_cache"]["chosen_by"] == "default"
        stored = sorted(p.name for p in (tmp_path / "user-cache" / "xla").rglob("*-cache"))
        if name == "cold-cache":
            entries = stored
            assert entries, "the default cache stored no program"
    assert stored == entries  # the warm run compiled nothing new: every program came from the cache
    for run in runs:
        assert run["final_sha256"] == first["final_sha256"]
        assert run["init_sha256"] == first["init_sha256"]


def test_manifest_records_the_environment(reference_run):
    out, _ = reference_run
    manifest = json.loads((out / "manifest.json").read_text())
    env = manifest["environment"]
    for key in ("jax", "jaxlib", "backend"):
        assert key in json.dumps(env), key
    assert manifest["data_fingerprint"]["sha256"]


def test_verify_reports_identical(reference_run, tmp_path):
    out, _ = reference_run
    proc = _cli("verify", str(out), "--out", str(tmp_path / "rerun"))
    assert proc.stdout.strip().splitlines()[-1] == "identical"
    rerun = json.loads((tmp_path / "rerun" / "manifest.json").read_text())
    assert rerun["environment"]["compile_cache"]["chosen_by"] == "none"  # re-derived, not read back


def test_verify_refuses_a_manifest_that_disagrees_with_the_stored_state(copy_of):
    # Stored files are checked before anything is re-run (exit 3); a re-run that differs
    # exits 1 (tests/test_faults.py).
    tampered = copy_of("tampered")
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["final_digests"]["sha256"] = "0" * 64
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    proc = _cli("verify", str(tampered), check=False)
    assert proc.returncode == 3
    assert "stored files corrupt" in proc.stderr and "manifest.json" in proc.stderr
    assert "re-running" not in proc.stdout


def test_verify_refuses_a_non_run_directory(tmp_path):
    proc = _cli("verify", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert "manifest.json does not exist" in proc.stderr
