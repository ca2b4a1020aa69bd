"""``limit`` means one thing for every dataset task: the first N records of each split, cut
after the split and after the normalisation statistics of the whole training split, so a
limited task's arrays are the first rows of the unlimited task's, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from test_data_cinc2017 import make_tree

from detjax import tasks
from detjax.train import TrainConfig

SPLITS = ("train", "val", "test")


def _task(task: str, data: dict, **kwargs):
    base = {"ptbxl": dict(arch="tiny", loss="weighted_bce"),
            "cinc2017": dict(arch="tiny", model={"in_leads": 1}, loss="ce"),
            "medmnist": dict(arch="resnet18", loss="ce")}[task]
    return tasks.load_task(TrainConfig(task=task, data=data, epochs=1, **{**base, **kwargs}))


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("DETJAX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "limit-cache"))


@pytest.fixture(scope="module")
def cinc_tree(tmp_path_factory):
    root = make_tree(tmp_path_factory.mktemp("limit-cinc") / "training2017")
    return {"data_dir": str(root), "folds": str(root.parent / "folds.csv")}


@pytest.mark.parametrize("task", ["ptbxl", "cinc2017", "medmnist"])
def test_limit_is_a_prefix_of_the_unlimited_task(task, request):
    data = {"ptbxl": {}, "medmnist": {"flag": "breastmnist"}}.get(task)
    if data is None:
        data = request.getfixturevalue("cinc_tree")
    full = _task(task, data)
    small = _task(task, {**data, "limit": 3})
    assert small.info["limit"] == 3 and full.info["limit"] is None
    assert small.info["n"] == {name: 3 for name in SPLITS}
    for name in SPLITS:
        for part in ("x", "y"):
            cut, whole = getattr(small, f"{name}_{part}"), getattr(full, f"{name}_{part}")
            assert cut.shape[0] == 3 and cut.tobytes() == whole[:3].tobytes(), (name, part)
    if "norm" in full.info:  # the ECG tasks: statistics of the whole training split either way
        assert small.info["norm"] == full.info["norm"]
    np.testing.assert_array_equal(small.fingerprint()["shapes"]["train_x"], [3, *full.train_x.shape[1:]])


@pytest.mark.parametrize("limit", [0, -1, True, 2.5])
def test_a_bad_limit_is_refused_by_every_task(limit, cinc_tree):
    for task, data in (("ptbxl", {}), ("cinc2017", cinc_tree), ("medmnist", {"flag": "breastmnist"})):
        with pytest.raises(ValueError, match="limit must be a positive"):
            _task(task, {**data, "limit": limit})
