"""``scripts/gpu_validate.sh`` (the one-call GPU proof) in its CPU dry run: every step runs with
tiny settings, writes its log and the summary, and the last line is the verdict."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from detjax import ci

REPO = Path(__file__).resolve().parents[1]
STEPS = ["wheels", "versions", "nvidia-smi", "flag-probe", "canary", "gpu-check-tiny", "ptbxl", "bench-train-step",
         "vmap-vs-solo"]


@pytest.mark.slow
def test_dry_run_runs_every_step_and_ends_with_a_verdict(tmp_path):
    out = tmp_path / "gpu-out"
    env = dict(os.environ, DETJAX_GPU_DRYRUN="1", OUT=str(out), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "scripts/gpu_validate.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("VERDICT: DRY RUN on cpu (not a GPU proof)"), proc.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == STEPS
    not_ok = {k: v["status"] for k, v in steps.items() if v["status"] not in ("ok", "absent")}
    assert not not_ok, (not_ok, proc.stdout[-3000:])
    for name, step in steps.items():
        if step["status"] == "ok":
            assert (out / f"{name}.log").exists()
    assert summary["dry_run"] is True and summary["platform"] == "cpu"
    check = summary["gpu_check"]["tiny"]
    assert check["passed"] and check["compile_cache"] == "disabled"
    assert check["control_verdict"].startswith("control has no demonstrated power")
    _check_gpu_check_report(json.loads((out / "gpu-check-tiny.json").read_text()))
    check_log = (out / "gpu-check-tiny.log").read_text()
    assert "PASS: tiny: 2 deterministic runs on cpu agree" in check_log
    assert "control has no demonstrated power" in check_log
    assert summary["canary"]["deterministic"]["distinct"] == 1
    ptbxl = summary["ptbxl"]
    assert ptbxl["identical"] is True and ptbxl["killed"] is True and ptbxl["resumed_from_step"] == [1], ptbxl
    assert "b" not in ptbxl and ptbxl["a"]["final_sha256"] == ptbxl["c"]["final_sha256"]  # dry run: no b
    bench = summary["bench_train_step"][0]
    assert bench["model"] == "baseline" and bench["ptbxl_85_epochs_extrapolated_s"] > 0
    assert bench["deterministic_over_default"] > 0
    assert summary["vmap_vs_solo"]["rows"][0]["k"] == 2
    assert (out / "fingerprint.json").exists() and (out / "flag-probe.json").exists()
    assert "PTB-XL runs + kill/resume identical" in last


def _check_gpu_check_report(report):
    """Everything ``detjax.ci gpu-check`` reports, here from the dry run's tiny check
    (2 deterministic runs and one control run in fresh processes, on the CPU)."""
    assert report["passed"] is True and report["identical"] is True and report["platform"] == "cpu"
    assert report["compile_cache"] == "disabled"
    hashes = report["hashes"]["tiny"]
    assert len(hashes["deterministic"]) == 2 and len(set(hashes["deterministic"])) == 1
    assert len(hashes["deterministic"][0]) == 64 and len(hashes["control"]) == 1
    canary = report["canary"]["tiny"]
    assert canary["deterministic"]["all_identical"] is True
    assert canary["deterministic"]["distinct_within_workers"] == [1, 1]  # one per deterministic run
    # On CPU XLA is deterministic anyway: the control cannot show that the flags matter, and says so.
    control = report["control_differs"]["tiny"]
    assert control["state"] is False and control["canary"] is False and control["any"] is False
    assert report["control_verdict"].startswith(ci.NO_POWER)
    arch = report["archs"]["tiny"]
    assert "--xla_gpu_deterministic_ops=true" in arch["xla_flags"]
    assert "--xla_gpu_deterministic_ops=true" not in (arch["control_xla_flags"] or [])
    fingerprint = report["fingerprint"]
    assert fingerprint["compile_cache"]["state"] == "disabled"
    assert fingerprint["backend"]["platform"] == "cpu" and fingerprint["backend"]["gpu"] is None
