"""benchmarks/bench_vs_torch.py: its PyTorch models are detjax's models, and it runs end to end.

Skipped where PyTorch is not installed (``pip install -e ".[bench]"``). The architecture
checks run in this process at batch 2 (parameter counts, state-dict names and shapes,
float32 eval- and train-mode logits, loss and BatchNorm statistics; the float64 gradient
check of ``--check`` is left to the benchmark itself, it compiles the backward pass); the
command line runs once in a fresh process with one timed step.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_vs_torch.py"
sys.path.insert(0, str(SCRIPT.parent))
import bench_vs_torch as bench  # noqa: E402

EXPECTED_PARAMS = {"conformer": 1_827_634, "baseline": 1_653_772, "resnet18": 11_168_706}


@pytest.mark.parametrize("arch", bench.MODELS)
def test_torch_model_is_detjax_model(arch):
    result = bench.check_model(arch, batch=2, grads=False)  # raises AssertionError on a mismatch
    assert result["params_torch"] == result["params_detjax"] == EXPECTED_PARAMS[arch]
    assert result["eval_logits_max_abs_diff"] < 1e-3
    assert result["train_logits_max_abs_diff"] < 1e-4
    assert result["loss_abs_diff"] < 1e-4


def test_mismatched_state_dict_fails_loudly():
    spec = bench.make_spec("baseline", 2)
    model = bench.build_torch_model(spec)
    state = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    bench.load_detjax_weights(model, state)  # its own weights load
    missing = dict(state)
    missing.pop("head.4.bias")
    with pytest.raises(AssertionError, match="head.4.bias"):
        bench.load_detjax_weights(model, missing)
    reshaped = dict(state)
    reshaped["head.4.weight"] = reshaped["head.4.weight"][:, :-1]
    with pytest.raises(AssertionError, match="shapes differ"):
        bench.load_detjax_weights(model, reshaped)


def test_command_line_runs_and_prints_parsable_lines(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "1", "--rounds", "1", "--models", "baseline", "--batch", "8",
         "--warmup", "1", "--threads", "1", "--no-check", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("| model | detjax samples/s | torch samples/s | speedup |") for line in lines)
    row = next(line for line in lines if line.startswith("| baseline |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 9 and cells[7] == "yes"  # one round: its final state hash is the only one
    speedup = [float(m.group(1)) for m in map(re.compile(r"^speedup baseline (\S+)$").match, lines) if m]
    compile_s = [float(m.group(1)) for m in map(re.compile(r"^compile baseline (\S+)$").match, lines) if m]
    assert len(speedup) == 1 and speedup[0] > 0
    assert len(compile_s) == 1 and compile_s[0] > 0
    data = json.loads(out.read_text())
    (result,) = data["results"]
    assert result["model"] == "baseline" and result["params"] == EXPECTED_PARAMS["baseline"]
    assert result["speedup"] == pytest.approx(speedup[0], rel=1e-2)
    torch_run = result["rounds"]["torch"][0]
    assert torch_run["deterministic"] and torch_run["threads"] == 1
    assert data["meta"]["threads"] == 1 and data["meta"]["batch"] == 8


def test_without_torch_it_says_how_to_install():
    code = ("import runpy, sys; sys.modules['torch'] = None; "  # torch not importable
            f"sys.argv = [{str(SCRIPT)!r}, '--models', 'baseline']; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert 'pip install -e ".[bench]"' in proc.stderr
