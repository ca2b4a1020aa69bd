"""Data-parallel training on a forced 4-device CPU mesh.

Every scenario runs in a fresh interpreter: the host device count is an XLA flag that must be
set before the backend starts (detjax's CLIs do it for ``--devices N``).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"task": "synthetic",
          "data": {"n_train": 100, "n_val": 32, "n_test": 32, "length": 128, "leads": 12, "num_classes": 4, "seed": 3},
          "arch": "tiny", "init": "mixed", "epochs": 2, "batch_size": 16, "eval_every": 1}


def _python(code: str) -> dict:
    """Runs ``code`` with 4 forced CPU devices; it must print one JSON line last."""
    prelude = textwrap.dedent("""
        import json, sys
        sys.path.insert(0, %r)
        from detjax.cli import configure_process
        configure_process(1, 4)
        import jax, numpy as np
        from detjax import tasks
        from detjax.train import TrainConfig, train_and_evaluate, make_mesh, shard_batch
        config = TrainConfig.from_dict(%r)
    """) % (str(REPO), CONFIG)
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cli_run(out, *extra):
    config_path = out.parent / "config.json"
    config_path.write_text(json.dumps(CONFIG))
    proc = subprocess.run([sys.executable, "-m", "detjax", "run", str(config_path), "--out", str(out),
                           "--no-progress", "--cpu-threads", "1", *extra], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dp")
    return {name: (base / name, _cli_run(base / name, *extra)) for name, extra in
            [("one", ()), ("four_a", ("--devices", "4")), ("four_b", ("--devices", "4"))]}


def test_sharded_training_is_identical_across_fresh_processes(runs):
    assert runs["four_a"][1]["final_sha256"] == runs["four_b"][1]["final_sha256"]


def test_four_devices_do_not_equal_one_device_bit_for_bit(runs):
    # Documented in docs/scaling.md: same global batches and math, but the gradient mean is
    # summed in another order across devices, so the last bits differ (same init).
    assert runs["one"][1]["init_sha256"] == runs["four_a"][1]["init_sha256"]
    assert runs["one"][1]["final_sha256"] != runs["four_a"][1]["final_sha256"]


def test_manifest_records_the_mesh(runs):
    mesh = json.loads((runs["four_a"][0] / "manifest.json").read_text())["mesh"]
    assert mesh == {"axis": "data", "devices": 4, "device_ids": [0, 1, 2, 3], "platform": "cpu",
                    "device_kind": "cpu"}
    assert json.loads((runs["one"][0] / "manifest.json").read_text())["mesh"]["devices"] == 1


def test_per_device_batch_shapes():
    out = _python("""
        mesh = make_mesh(4)
        full = shard_batch({"x": np.zeros((16, 128, 12), np.float32), "y": np.zeros((16, 4), np.float32)}, mesh)
        part = shard_batch({"x": np.zeros((10, 128, 12), np.float32)}, mesh)
        print(json.dumps({
            "devices": len(jax.devices()),
            "full": sorted({tuple(s.data.shape) for s in full["x"].addressable_shards}),
            "full_y": sorted({tuple(s.data.shape) for s in full["y"].addressable_shards}),
            "n_full_shards": len(full["x"].addressable_shards),
            "partial": sorted({tuple(s.data.shape) for s in part["x"].addressable_shards}),
        }))
    """)
    assert out["devices"] == 4 and out["n_full_shards"] == 4
    assert out["full"] == [[4, 128, 12]] and out["full_y"] == [[4, 4]]
    assert out["partial"] == [[10, 128, 12]]  # 10 is not divisible by 4: replicated, same global batch


def test_resume_on_the_same_count_and_refusal_on_another(runs, tmp_path):
    reference = runs["four_a"][1]["final_sha256"]
    out = _python(f"""
        from detjax.checkpoint import CheckpointMismatchError
        data = tasks.load_task(config)
        kw = dict(progress=False, environment={{}})
        train_and_evaluate(config, data, {str(tmp_path / 'r')!r}, devices=4, stop_after_epoch=0, **kw)
        try:
            train_and_evaluate(config, data, {str(tmp_path / 'r')!r}, devices=1, **kw)
            refused = None
        except CheckpointMismatchError as exc:
            refused = str(exc)
        same = train_and_evaluate(config, data, {str(tmp_path / 'r')!r}, devices=4, **kw)
        train_and_evaluate(config, data, {str(tmp_path / 'x')!r}, devices=4, stop_after_epoch=0, **kw)
        forced = train_and_evaluate(config, data, {str(tmp_path / 'x')!r}, devices=2,
                                    allow_device_change=True, **kw)
        print(json.dumps({{"refused": refused, "same": same["final_sha256"], "forced": forced["final_sha256"]}}))
    """)
    assert out["refused"] and "4 device(s)" in out["refused"] and "allow_device_change" in out["refused"]
    assert out["same"] == reference
    assert out["forced"] not in (reference, None)


def test_too_many_devices_is_a_clear_error():
    out = _python("""
        try:
            make_mesh(8)
            message = None
        except ValueError as exc:
            message = str(exc)
        print(json.dumps({"message": message}))
    """)
    assert "asked for 8 devices but 4 cpu device(s) are visible" in out["message"]


def test_experiment_scripts_take_devices_flags():
    import importlib.util

    for name in ("ptbxl", "medmnist"):
        spec = importlib.util.spec_from_file_location(f"exp_{name}", REPO / "experiments" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        args = module.build_parser().parse_args(["--devices", "4", "--allow-device-change"])
        assert args.devices == 4 and args.allow_device_change is True
        assert module.build_parser().parse_args([]).devices == 1  # one default everywhere: 1 device
