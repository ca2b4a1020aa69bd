"""Many seeds in one compiled program (detjax.multiseed) against the same seeds trained alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detjax import multiseed, tasks
from detjax.train import TrainConfig, train_and_evaluate

SEEDS = [3, 7]
SMALL_DATA = {"n_train": 32, "n_val": 24, "n_test": 24, "length": 64, "leads": 3, "num_classes": 4, "seed": 1}


def small_config(**overrides):
    base = dict(task="synthetic", data=SMALL_DATA, arch="tiny", init="kaiming", order="seeded", epochs=2,
                batch_size=16, eval_every=1)
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def data():
    return tasks.load_task(small_config())


@pytest.fixture(scope="module")
def solo(data, tmp_path_factory):
    """Each seed trained alone by the ordinary trainer (the reference)."""
    root = tmp_path_factory.mktemp("solo")
    return {s: train_and_evaluate(multiseed.member_config(small_config(), s), data, root / f"s{s}", progress=False)
            for s in SEEDS}


def _strip(result):
    return {k: result[k] for k in ("final_sha256", "init_sha256", "test_score", "best_epoch", "best_val_score",
                                   "per_class_auc", "config_hash")}


def test_unrolled_members_equal_the_solo_runs_bit_for_bit(data, solo, tmp_path):
    results = multiseed.train_seeds(small_config(), data, SEEDS, tmp_path / "group", mode="unroll", progress=False)
    for result in results:
        assert _strip(result) == _strip(solo[result["seed"]])
        assert result["execution"]["mode"] == "unroll"
        assert (tmp_path / "group" / f"seed-{result['seed']}" / "manifest.json").exists()


def test_vmapped_members_are_deterministic_resumable_and_close_to_solo(data, solo, tmp_path, capsys):
    config = small_config()
    first = multiseed.train_seeds(config, data, SEEDS, tmp_path / "a", mode="vmap", progress=False)
    stopped = multiseed.train_seeds(config, data, SEEDS, tmp_path / "b", mode="vmap", progress=False,
                                    stop_after_epoch=0)
    assert all("stopped_after_epoch" in r for r in stopped)
    resumed = multiseed.train_seeds(config, data, SEEDS, tmp_path / "b", mode="vmap", progress=False)
    for a, b in zip(first, resumed):
        assert _strip(a) == _strip(b)  # run to run, and across an interruption: identical bits
    # The vmapped init is each seed's solo init (and Kaiming members differ from each other).
    assert first[0]["init_sha256"] != first[1]["init_sha256"]
    for result in first:
        alone = solo[result["seed"]]
        assert result["init_sha256"] == alone["init_sha256"]
        # Batched arithmetic may sum in another order than one member's (documented); the
        # training itself is the same, so the losses agree to float32 rounding.
        losses = [h["train_loss"] for h in result["history"]]
        assert losses[0] == pytest.approx(_solo_losses(alone)[0], rel=1e-5)
        assert losses == pytest.approx(_solo_losses(alone), rel=1e-3)
    # `python -m detjax verify` would re-run it alone and report a false mismatch: it refuses.
    import argparse

    from detjax.__main__ import cmd_verify

    assert cmd_verify(argparse.Namespace(run_dir=str(tmp_path / "a" / "seed-3"), out=None)) == 2
    assert "member of a vmap group of seeds [3, 7]" in capsys.readouterr().err


def _solo_losses(result):
    import json
    from pathlib import Path

    history = json.loads((Path(result["run_dir"]) / "manifest.json").read_text())["history"]
    return [h["train_loss"] for h in history]


def test_seeded_augment_in_vmap_is_the_tasks_augment_at_each_seed():
    seeds = [2, 13, 1337]
    configs = [TrainConfig(task="medmnist", data={"flag": "breastmnist", "limit": 6}, arch="resnet18", loss="ce",
                           optimizer="sgd", augment=True, seed=s) for s in seeds]
    datas = [tasks.load_task(c) for c in configs]
    x = jnp.asarray(datas[0].train_x)
    index = jnp.arange(x.shape[0], dtype=jnp.int32)
    batched = jax.vmap(datas[0].seeded_augment, in_axes=(None, None, None, 0))(
        x, index, jnp.int32(4), jnp.asarray(np.array(seeds, np.uint32)))
    for j, d in enumerate(datas):
        assert np.array_equal(np.asarray(batched[j]), np.asarray(d.augment(x, index, jnp.int32(4))))
    assert not np.array_equal(np.asarray(batched[0]), np.asarray(batched[1]))


@pytest.mark.parametrize("seeds, mode, message", [
    ([3, 3], "vmap", "distinct"),
    ([], "vmap", "at least one"),
    ([3], "pmap", "unknown multi-seed mode"),
    ([-1], "vmap", r"\[0, 2\*\*32\)"),
])
def test_bad_arguments_are_named(data, tmp_path, seeds, mode, message):
    with pytest.raises(ValueError, match=message):
        multiseed.train_seeds(small_config(), data, seeds, tmp_path, mode=mode, progress=False)


def test_augmenting_config_needs_a_seeded_augmentation(data, tmp_path):
    with pytest.raises(ValueError, match="seeded augmentation"):
        multiseed.train_seeds(small_config(augment=True), data, [1], tmp_path, progress=False)


def test_member_directories_follow_the_run_directory_rules(data, tmp_path):
    """A member directory holding another config is refused before any training, and a member
    finished before its group ran keeps its record byte for byte."""
    from detjax.train import RunDirectoryError

    other = tmp_path / "other"
    train_and_evaluate(small_config(epochs=1), data, other, progress=False)
    with pytest.raises(RunDirectoryError, match="config hash"):
        multiseed.train_seeds(small_config(), data, SEEDS, tmp_path / "g1", mode="map", progress=False,
                              member_dirs=[other, tmp_path / "fresh"])
    assert not (tmp_path / "fresh").exists() and not (tmp_path / "g1").exists()

    done = tmp_path / "done"
    alone = train_and_evaluate(multiseed.member_config(small_config(), SEEDS[0]), data, done, progress=False)
    before = {p.name: p.read_bytes() for p in done.iterdir() if p.is_file()}
    results = multiseed.train_seeds(small_config(), data, SEEDS, tmp_path / "g2", mode="map", progress=False,
                                    member_dirs=[done, tmp_path / "new"])
    assert results[0]["final_sha256"] == alone["final_sha256"]
    assert {p.name: p.read_bytes() for p in done.iterdir() if p.is_file()} == before
    assert (tmp_path / "new" / "result.json").exists()
    with pytest.raises(RunDirectoryError, match="finished run"):  # without resume: never overwritten
        multiseed.train_seeds(small_config(), data, SEEDS, tmp_path / "g3", mode="map", progress=False,
                              member_dirs=[tmp_path / "x", tmp_path / "new"], resume=False)
