"""``scripts/gpu_validate.sh`` (the one-call GPU proof) in its CPU dry run: every step runs with
tiny settings, writes its log and the summary, and the last line is the verdict."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert summary["canary"]["deterministic"]["distinct"] == 1
    ptbxl = summary["ptbxl"]
    assert ptbxl["identical"] is True and ptbxl["killed"] is True and ptbxl["resumed_from_step"] == [1], ptbxl
    assert len({ptbxl[k]["final_sha256"] for k in "abc"}) == 1
    bench = summary["bench_train_step"][0]
    assert bench["model"] == "baseline" and bench["ptbxl_85_epochs_extrapolated_s"] > 0
    assert bench["deterministic_over_default"] > 0
    assert summary["vmap_vs_solo"]["rows"][0]["k"] == 2
    assert (out / "fingerprint.json").exists() and (out / "flag-probe.json").exists()
    assert "PTB-XL runs + kill/resume identical" in last
