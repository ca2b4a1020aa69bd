"""`experiments/medmnist.py` and the medmnist task: one epoch on a tiny subset, twice."""

import json

import numpy as np
import pytest

from detjax import tasks
from detjax.train import TrainConfig

# The fixture two_runs (tests/conftest.py) runs SCRIPT with ARGS twice, sharing the session's
# XLA compilation cache with the other runs.
SCRIPT, TWO_RUNS_DIR = "medmnist.py", "medmnist"
ARGS = ["--flag", "breastmnist", "--init", "dct", "--epochs", "1", "--limit", "32", "--batch-size", "16",
        "--cpu-threads", "1", "--no-progress"]


def test_cli_outputs_and_identical_hashes(two_runs):
    (a, _), (b, _) = two_runs
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
    for name in ("result.json", "manifest.json", "training_curve.png", "checkpoints"):
        assert (a / name).exists(), name
    assert ra["n_params"] == 11_168_706
    assert set(ra) >= {"auc", "acc", "init_sha256", "final_sha256", "init_md5", "final_md5", "best_epoch"}
    assert ra["final_sha256"] == rb["final_sha256"] and ra["init_sha256"] == rb["init_sha256"]
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["config"]["augment"] is True and manifest["config"]["optimizer"] == "sgd"
    assert manifest["data_info"]["md5"] == "750601b1f35ba3300ea97c75c52ff8f6"


def test_task_normalises_images_and_keeps_integer_labels():
    config = TrainConfig(task="medmnist", data={"flag": "breastmnist"}, arch="resnet18", loss="ce", augment=True)
    data = tasks.load_task(config)
    assert data.train_x.shape == (546, 28, 28, 1) and data.val_x.shape[0] == 78 and data.test_x.shape[0] == 156
    assert data.train_x.dtype == np.float32 and data.train_x.min() >= -1 and data.train_x.max() <= 1
    assert data.train_y.dtype == np.int32 and data.train_y.shape == (546, 1)
    assert data.labels == ("malignant", "normal, benign")
    assert data.augment is not None and data.order_keys is None
    scores = np.tile([[0.3, 0.7]], (78, 1)).astype(np.float32)
    report = data.evaluate(data.val_y, scores)
    assert report["score"] == report["auc"] and "acc" in report


def test_task_rejects_a_wrong_loss_for_the_task_type():
    config = TrainConfig(task="medmnist", data={"flag": "breastmnist"}, arch="resnet18", loss="bce")
    with pytest.raises(ValueError, match="use loss=ce"):
        tasks.load_task(config)
    with pytest.raises(ValueError, match="flag"):
        tasks.load_task(TrainConfig(task="medmnist", data={}, arch="resnet18", loss="ce"))
