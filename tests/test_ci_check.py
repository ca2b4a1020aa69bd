"""`python -m detjax.ci gpu-check` runs on CPU too (small model, few steps)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_passes_on_cpu_and_reports_the_control(tmp_path):
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "detjax.ci", "gpu-check", "--arch", "tiny", "--steps", "3", "--batch-size", "8",
         "--length", "128", "--cpu-threads", "1", "--json", str(report_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600,
        env={k: v for k, v in os.environ.items()  # fresh compiles, no shared cache
             if not k.startswith("JAX_PERSISTENT_CACHE") and k != "JAX_COMPILATION_CACHE_DIR"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PASS" in proc.stdout
    report = json.loads(report_path.read_text())
    assert report["backend"]["platform"] == "cpu"
    runs = report["deterministic_runs"]
    assert len(runs) == 2 and runs[0]["sha256"] == runs[1]["sha256"] and len(runs[0]["sha256"]) == 64
    assert runs[0]["deterministic"] is True and report["control_runs"][0]["deterministic"] is False
    assert "--xla_gpu_deterministic_ops=true" in runs[0]["xla_flags"]
    assert "--xla_gpu_deterministic_ops=true" not in (report["control_runs"][0]["xla_flags"] or [])
    assert isinstance(report["control_identical"], bool)
