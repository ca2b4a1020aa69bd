"""Recipes (detjax.recipes): one config per task, the same from every entry point."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from detjax import recipes
from detjax.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_each_recipe_states_its_tasks_protocol(tmp_path):
    ptbxl = recipes.ptbxl(init="mixed", epochs=20)
    assert (ptbxl.task, ptbxl.arch, ptbxl.optimizer, ptbxl.learning_rate, ptbxl.loss, ptbxl.eval_every) == (
        "ptbxl", "conformer", "adam", 1e-3, "weighted_bce", 10)
    assert dict(ptbxl.data) == {"data_dir": None, "leads": None, "cv_fold": 0, "limit": None}
    assert dict(ptbxl.model) == {"in_leads": 12}
    assert dict(recipes.ptbxl(leads="limb").model) == {"in_leads": 6}
    assert recipes.ptbxl(leads="I, II,V1").data["leads"] == ["I", "II", "V1"]
    assert dict(recipes.ptbxl(transformer_fixup=True).model) == {"in_leads": 12, "transformer_fixup": True}
    cinc = recipes.cinc2017(data_dir=tmp_path)
    assert (cinc.loss, dict(cinc.model), cinc.data["data_dir"]) == ("ce", {"in_leads": 1}, str(tmp_path))
    image = recipes.medmnist(flag="BreastMNIST", init="kaiming", width=16)
    assert (image.arch, image.init, image.optimizer, image.weight_decay, image.augment) == (
        "resnet18", "he_normal", "sgd", 5e-4, True)
    assert dict(image.model) == {"in_channels": 1, "width": 16} and image.data["flag"] == "breastmnist"
    assert recipes.synthetic(data_seed=3).data["seed"] == 3


def test_cinc2017_folder_from_the_environment_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("DETJAX_CINC2017_DIR", str(tmp_path))
    assert recipes.cinc2017().data["data_dir"] == str(tmp_path)
    monkeypatch.delenv("DETJAX_CINC2017_DIR")
    with pytest.raises(ValueError, match="DETJAX_CINC2017_DIR"):
        recipes.cinc2017()


@pytest.mark.parametrize("task, arguments, message", [
    ("imagenet", {}, "unknown task"),
    ("ptbxl", {"width": 16}, "takes no argument"),
    ("medmnist", {}, "name the set"),
    ("ptbxl:x", {}, "no ':' suffix"),
    ("ptbxl", {"leads": "limbs"}, "unknown lead"),
    ("ptbxl", {"arch": "baseline", "transformer_fixup": True}, "conformer only"),
    ("ptbxl", {"init": "he_normal"}, "takes init"),
    ("medmnist:breastmnist", {"init": "dct", "order": "shuffled"}, "order"),
])
def test_bad_recipe_arguments_are_named(task, arguments, message):
    with pytest.raises(ValueError, match=message):
        recipes.get_config(task, **arguments)


@pytest.mark.parametrize("kwargs, message", [
    (dict(task="imagenet"), "unknown task"), (dict(arch="vit"), "unknown arch"),
    (dict(init="orthogonal"), "takes init"), (dict(arch="resnet18", task="medmnist", init="kaiming"), "takes init"),
])
def test_train_config_checks_names_from_one_list(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def _printed(*argv):
    done = subprocess.run([sys.executable, *argv, "--print-config"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
def test_experiment_and_study_give_the_same_config_hash():
    """The same recipe from experiments/ptbxl.py and from seed_study.py: one config, one hash
    (limb leads included: 6-lead data, a 6-lead model)."""
    solo = _printed("experiments/ptbxl.py", "--init", "dct", "--leads", "limb", "--order", "seeded",
                    "--seed", "3", "--epochs", "4")
    members = _printed("experiments/seed_study.py", "--task", "ptbxl", "--arms", "dct,kaiming", "--seeds", "2",
                       "--epochs", "4", "--leads", "limb")
    member = next(m for m in members if (m["arm"], m["seed"]) == ("dct", 3))
    assert member["config_hash"] == solo["config_hash"] and member["config"] == solo["config"]
    assert solo["config"]["model"] == {"in_leads": 6}
    assert {(m["arm"], m["seed"]) for m in members} == {("dct", 2), ("dct", 3), ("kaiming", 2), ("kaiming", 3)}
    image = _printed("experiments/medmnist.py", "--init", "kaiming", "--order", "seeded", "--seed", "2",
                     "--epochs", "2")
    study = _printed("experiments/seed_study.py", "--task", "medmnist:breastmnist", "--arms", "kaiming",
                     "--seed-list", "2", "--epochs", "2", "--eval-every", "1")
    assert study[0]["config_hash"] == image["config_hash"]
    assert recipes.medmnist(flag="breastmnist", init="kaiming", order="seeded", seed=2, epochs=2).hash() == \
        image["config_hash"]
