"""The dependency pins agree: pyproject admits both jax lines, the locks pin one each, and the GPU
lock is the Python 3.12 lock plus the CUDA wheels of the same jax."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (REPO / name).read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)$", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_pyproject_admits_jax_010_and_011():
    text = (REPO / "pyproject.toml").read_text()
    assert '"jax>=0.10,<0.12"' in text and '"jaxlib>=0.10,<0.12"' in text


def test_locks_pin_one_jax_each_and_the_same_rest():
    py311, py312 = _pins("requirements.lock"), _pins("requirements-py312.lock")
    assert py311["jax"] == py311["jaxlib"] and py311["jax"].startswith("0.10.")
    assert py312["jax"] == py312["jaxlib"] == "0.11.2"
    assert {k: v for k, v in py311.items() if k not in ("jax", "jaxlib")} == \
        {k: v for k, v in py312.items() if k not in ("jax", "jaxlib")}


def test_gpu_lock_adds_pinned_cuda_wheels_of_the_same_jax():
    text = (REPO / "requirements-gpu.lock").read_text()
    assert "-r requirements-py312.lock" in text
    gpu = _pins("requirements-gpu.lock")
    jax = _pins("requirements-py312.lock")["jax"]
    assert gpu["jax-cuda13-plugin"] == gpu["jax-cuda13-pjrt"] == jax
    nvidia = [k for k in gpu if k.startswith("nvidia-")]
    assert {"nvidia-cublas", "nvidia-cudnn-cu13", "nvidia-nccl-cu13", "nvidia-cuda-runtime"} <= set(nvidia)
    workflow = (REPO / ".github/workflows/gpu-determinism.yml").read_text()
    assert "requirements-gpu.lock" in workflow and "JAX_PLATFORMS: cuda" in workflow
    assert "--require-platform gpu" in workflow and "resnet18" in workflow and "baseline" in workflow
