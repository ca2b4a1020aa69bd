"""`python -m detjax.ci gpu-check` runs on CPU too (small model, few steps), and cannot pass for
the wrong reason: no compile cache, the required platform, a canary, a control with power.
The full report of a passing tiny check is asserted on the GPU script's dry run
(tests/test_gpu_validate.py), which runs that check anyway."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from detjax import ci

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "tiny", "--steps", "3", "--batch-size", "8", "--length", "128", "--cpu-threads", "1",
        "--canary-size", "65536", "--canary-repeats", "3"]


def _gpu_check(*args, tmp_path):
    # The session's compile cache variables (tests/conftest.py) stay set on purpose: the
    # workers must drop them themselves.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "shared-cache"))
    return subprocess.run([sys.executable, "-m", "detjax.ci", "gpu-check", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)


def test_require_platform_gpu_fails_clearly_on_cpu(tmp_path):
    report_path = tmp_path / "report.json"
    proc = _gpu_check(*TINY, "--runs", "2", "--require-platform", "gpu", "--report", str(report_path),
                      tmp_path=tmp_path)
    assert proc.returncode == ci.EXIT_WRONG_PLATFORM, proc.stdout + proc.stderr
    assert "--require-platform gpu" in proc.stderr and "'cpu', not a GPU" in proc.stderr
    report = json.loads(report_path.read_text())
    assert report["passed"] is False and "not a GPU" in report["error"]


def test_worker_env_turns_every_compile_cache_off():
    env = ci.worker_env({"JAX_COMPILATION_CACHE_DIR": "/x", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                         "JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES": "all", "XLA_FLAGS": "--foo", "PATH": "/bin",
                         "JAX_ENABLE_COMPILATION_CACHE": "true"})
    assert env == {"PATH": "/bin", "JAX_ENABLE_COMPILATION_CACHE": "false"}


def _fake_run(sha, canary_hashes, deterministic=True, platform="gpu", cache="disabled"):
    return {"sha256": sha, "platform": platform, "compile_cache": cache, "train_seconds_incl_compile": 1.0,
            "xla_flags": ["--xla_gpu_deterministic_ops=true"] if deterministic else [], "loss": 0.5,
            "canary": {"hashes": canary_hashes, "distinct": len(set(canary_hashes))}, "fingerprint": {}}


def _check_with(monkeypatch, tmp_path, det_runs, control_runs, *extra):
    runs = {True: iter(det_runs), False: iter(control_runs)}
    monkeypatch.setattr(ci, "_spawn", lambda args, arch, deterministic: next(runs[deterministic]))
    report = tmp_path / "r.json"
    code = ci.main(["gpu-check", "--runs", str(len(det_runs)), "--control-runs", str(len(control_runs)),
                    "--report", str(report), *extra])
    return code, json.loads(report.read_text())


def test_control_with_power_and_a_differing_canary_fail_or_pass_correctly(monkeypatch, tmp_path):
    good = [_fake_run("a", ["c"] * 3) for _ in range(3)]
    # the control's canary differs within a worker: the flags are shown to matter
    code, report = _check_with(monkeypatch, tmp_path, good,
                               [_fake_run("a", ["c", "d", "c"], False), _fake_run("a", ["c"] * 3, False)])
    assert code == 0 and report["control_differs"]["conformer"] == {
        "state": False, "canary": True, "any": True, "control_equals_deterministic": True}
    assert report["control_verdict"].startswith("control differs (conformer: canary)")
    # the control's states differ
    code, report = _check_with(monkeypatch, tmp_path, good, [_fake_run("x", ["c"] * 3, False),
                                                             _fake_run("y", ["c"] * 3, False)])
    assert code == 0 and report["control_differs"]["conformer"]["state"] is True
    # same states but a deterministic worker's canary differs: FAIL
    bad_canary = good[:2] + [_fake_run("a", ["c", "e", "c"])]
    code, report = _check_with(monkeypatch, tmp_path, bad_canary, [])
    assert code == 1 and report["identical"] is True and report["canary_identical"] is False
    # workers that disagree across processes on the canary: FAIL
    code, report = _check_with(monkeypatch, tmp_path, good[:2] + [_fake_run("a", ["z"] * 3)], [])
    assert code == 1
    # a state that differs: FAIL
    code, report = _check_with(monkeypatch, tmp_path, good[:2] + [_fake_run("b", ["c"] * 3)], [])
    assert code == 1 and report["identical"] is False
    # a worker with a compile cache: FAIL even though everything agrees
    code, report = _check_with(monkeypatch, tmp_path, good[:2] + [_fake_run("a", ["c"] * 3, cache="enabled")], [])
    assert code == 1 and report["compile_cache"].startswith("ENABLED")


def test_runs_below_two_are_refused():
    assert ci.main(["gpu-check", "--runs", "1"]) == 2


@pytest.mark.slow
def test_gpu_check_covers_the_image_model(tmp_path):
    # ResNet-18 takes the one other input path (images; the ECG models share the tiny model's)
    report_path = tmp_path / "report.json"
    proc = _gpu_check("--arch", "resnet18", "--steps", "2", "--batch-size", "4", "--length", "128",
                      "--width", "8", "--cpu-threads", "1", "--canary-size", "4096", "--canary-repeats", "2",
                      "--runs", "2", "--control-runs", "0", "--report", str(report_path), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert set(report["hashes"]) == {"resnet18"} and report["passed"] is True
    assert report["control_differs"] is None and report["control_verdict"] == "no control run"
