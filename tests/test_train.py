"""Training engine: pure pieces, the train step, run directories and checkpoints (in process)."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detjax import hashing, tasks
from detjax.checkpoint import CheckpointCorruptError, CheckpointMismatchError
from detjax.models.tiny import TinyECG
from detjax.train import (
    RunDirectoryError,
    TrainConfig,
    cosine_per_epoch,
    create_train_state,
    make_optimizer,
    make_train_step,
    pos_weights,
    protocol_eval_epochs,
    train_and_evaluate,
    weighted_bce_with_logits,
)

SMALL_DATA = {"n_train": 40, "n_val": 24, "n_test": 24, "length": 64, "leads": 3, "num_classes": 4, "seed": 1}


def small_config(**overrides):
    base = dict(task="synthetic", data=SMALL_DATA, arch="tiny", init="mixed", epochs=3, batch_size=16,
                eval_every=1)
    base.update(overrides)
    return TrainConfig(**base)


def test_weighted_bce_matches_direct_formula():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 3)).astype(np.float32) * 30
    z[0, 0] = 200.0  # clamped to 50
    y = (rng.random((5, 3)) < 0.4).astype(np.float32)
    w = np.array([1.0, 2.0, 0.5], np.float32)
    zc = np.clip(z.astype(np.float64), -50, 50)
    log_sig, log_one_minus_sig = -np.logaddexp(0, -zc), -np.logaddexp(0, zc)
    expected = -np.mean(w * y * log_sig + (1 - y) * log_one_minus_sig)
    got = float(weighted_bce_with_logits(jnp.asarray(z), jnp.asarray(y), jnp.asarray(w)))
    assert got == pytest.approx(expected, rel=1e-5)


def test_pos_weights_formula():
    y = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32)
    np.testing.assert_allclose(pos_weights(y), np.sqrt([4 / 3, 4 / 1, 4 / 1]).astype(np.float32))


def test_cosine_schedule_is_constant_within_an_epoch_and_matches_pytorch():
    schedule = cosine_per_epoch(1e-3, total_epochs=85, steps_per_epoch=7)
    values = np.array([float(schedule(t)) for t in range(0, 85 * 7)])
    per_epoch = values.reshape(85, 7)
    assert np.all(per_epoch == per_epoch[:, :1])
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * e / 85)) for e in range(85)]
    np.testing.assert_allclose(per_epoch[:, 0], np.float32(expected))
    assert float(schedule(10_000)) == per_epoch[-1, 0]  # stays at the last epoch's value


def test_protocol_eval_epochs():
    assert protocol_eval_epochs(85) == [0, 10, 20, 30, 40, 50, 60, 70, 80, 84]
    assert protocol_eval_epochs(3, 1) == [0, 1, 2]
    assert protocol_eval_epochs(1) == [0]


def test_config_hash_is_stable_and_sensitive():
    a, b = small_config(), small_config()
    assert a.hash() == b.hash() and len(a.hash()) == 64
    assert small_config(seed=1).hash() != a.hash()
    assert small_config(order="seeded").hash() != a.hash()
    assert TrainConfig.from_dict(a.to_dict()) == a
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"epochs": 1, "nonsense": 2})
    with pytest.raises(ValueError, match="order"):
        small_config(order="shuffled")


def _setup(config):
    data = tasks.load_task(config)
    model = TinyECG(num_classes=len(data.labels), init_mode=config.init)
    tx = make_optimizer(config, math.ceil(data.train_x.shape[0] / config.batch_size))
    state = create_train_state(model, tx, data.train_x[:1], config.seed)
    step = make_train_step(model, tx, config, pos_weights(data.train_y))
    batch = {"x": jnp.asarray(data.train_x[:16]), "y": jnp.asarray(data.train_y[:16])}
    return state, step, batch


def test_train_step_is_pure_and_changes_params():
    config = small_config()
    state, step, batch = _setup(config)
    before = hashing.tree_sha256(state.params)
    # The step donates its input state, so feed it copies.
    s1, m1 = step(jax.tree_util.tree_map(jnp.copy, state), batch)
    s2, m2 = step(jax.tree_util.tree_map(jnp.copy, state), batch)
    assert hashing.tree_sha256(s1) == hashing.tree_sha256(s2)
    assert float(m1["loss"]) == float(m2["loss"]) and np.isfinite(float(m1["loss"]))
    assert hashing.tree_sha256(s1.params) != before
    assert int(s1.step) == 1 and int(s1.position) == 1
    assert float(m1["aux_loss"]) > 0  # the sown auxiliary loss reaches the objective


def test_structured_init_ignores_seed_and_kaiming_uses_it():
    c0, c1 = small_config(seed=0), small_config(seed=1)
    s0, _, _ = _setup(c0)
    s1, _, _ = _setup(c1)
    assert hashing.tree_sha256(s0.params) == hashing.tree_sha256(s1.params)
    k0, _, _ = _setup(small_config(init="kaiming", seed=0))
    k1, _, _ = _setup(small_config(init="kaiming", seed=1))
    assert hashing.tree_sha256(k0.params) != hashing.tree_sha256(k1.params)


def _run(config, workdir, **kwargs):
    return train_and_evaluate(config, tasks.load_task(config), workdir, progress=False,
                              environment={"test": True}, **kwargs)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run") / "a"
    result = _run(small_config(), workdir)
    return workdir, result


def test_run_directory_contents(finished_run):
    workdir, result = finished_run
    for name in ("manifest.json", "result.json", "training_curve.png", "checkpoints"):
        assert (workdir / name).exists(), name
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["config_hash"] == small_config().hash()
    assert manifest["final_digests"]["sha256"] == result["final_sha256"]
    assert manifest["data_fingerprint"]["sha256"] == tasks.load_task(small_config()).fingerprint()["sha256"]
    assert [h["epoch"] for h in manifest["history"]] == [0, 1, 2]
    # the per-layer initialiser assignment (basis, stage, fixup) is part of the record
    assignment = manifest["init_assignment"]
    assert assignment and {"layer", "shape", "init"} <= set(assignment[0])
    assert all(isinstance(row["init"], str) and row["init"] for row in assignment)
    for key in ("macro_auc", "per_class_auc", "init_sha256", "final_sha256", "init_md5", "final_md5", "n_params"):
        assert key in result
    assert result["init_sha256"] != result["final_sha256"]
    assert 0.0 <= result["macro_auc"] <= 1.0


def test_same_config_same_process_same_hash(finished_run, tmp_path):
    _, first = finished_run
    again = _run(small_config(), tmp_path / "b")
    assert again["final_sha256"] == first["final_sha256"]
    assert again["init_sha256"] == first["init_sha256"]


def test_negative_controls_change_the_hash(finished_run, tmp_path):
    _, first = finished_run
    seeded = _run(small_config(order="seeded"), tmp_path / "seeded")
    other_init = _run(small_config(init="hadamard"), tmp_path / "hadamard")
    assert seeded["init_sha256"] == first["init_sha256"]  # same init, other batch order
    assert seeded["final_sha256"] != first["final_sha256"]
    assert other_init["init_sha256"] != first["init_sha256"]
    assert other_init["final_sha256"] != first["final_sha256"]


def test_resume_equals_uninterrupted(finished_run, tmp_path):
    _, first = finished_run
    workdir = tmp_path / "interrupted"
    _run(small_config(), workdir, stop_after_epoch=0)
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert manifest["status"] == "running"
    resumed = _run(small_config(), workdir, resume=True)
    assert resumed["final_sha256"] == first["final_sha256"]
    assert resumed["best_epoch"] == first["best_epoch"]
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert manifest["resumed_from"][0]["step"] == 1


def test_existing_run_directory_is_never_overwritten(finished_run, tmp_path):
    workdir, _ = finished_run
    before = (workdir / "manifest.json").read_bytes()
    with pytest.raises(RunDirectoryError, match="already holds a finished run"):
        _run(small_config(), workdir, resume=False)
    with pytest.raises(RunDirectoryError, match="config hash"):
        _run(small_config(seed=5), workdir)
    assert (workdir / "manifest.json").read_bytes() == before
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match="not empty"):
        _run(small_config(), stray, resume=False)
    assert (stray / "notes.txt").read_text() == "mine"


def test_checkpoint_of_another_config_is_refused(finished_run, tmp_path):
    workdir, _ = finished_run
    other = tmp_path / "other"
    shutil.copytree(workdir / "checkpoints", other / "checkpoints")
    with pytest.raises(CheckpointMismatchError, match="config hash"):
        _run(small_config(seed=3), other, resume=True)


def _corrupt_data_files(checkpoint_dir):
    data_files = sorted(p for p in checkpoint_dir.rglob("*") if p.is_file() and p.parent.name == "d"
                        and "state" in p.parts)
    assert data_files, "no orbax data files found"
    # Invert the second half of every array data file (a flipped byte in a region orbax does
    # not read would be harmless, and undetectable by design).
    for target in data_files:
        raw = bytearray(target.read_bytes())
        for i in range(len(raw) // 2, len(raw)):
            raw[i] ^= 0xFF
        target.write_bytes(bytes(raw))


def test_corrupted_checkpoint_is_refused(finished_run, tmp_path):
    workdir, _ = finished_run
    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken)
    step_dir = max((p for p in (broken / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    _corrupt_data_files(step_dir)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["status"] = "running"  # as if killed after its last checkpoint (a finished run is never restored)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    manifest_before = (broken / "manifest.json").read_bytes()
    with pytest.raises(CheckpointCorruptError, match="checkpoint"):
        _run(small_config(), broken, resume=True)
    assert (broken / "manifest.json").read_bytes() == manifest_before  # a refusal changes nothing


def test_augmentation_follows_the_configs_seed_not_the_datas():
    """A seed study loads the data once (for seed 0) and trains every seed on it: each run must
    still draw its augmentation from its own config.seed."""
    import dataclasses

    from detjax.train import task_augmentation

    def seeded_augment(x, index, epoch, seed):  # a visible, seed-dependent change of the input
        return x + 0.01 * jnp.asarray(seed, jnp.float32)

    base = tasks.load_task(small_config())
    loaded_for_seed0 = dataclasses.replace(base, seeded_augment=seeded_augment,
                                           augment=lambda x, i, e: seeded_augment(x, i, e, 0))
    x, index = jnp.zeros((2, 3)), jnp.arange(2)
    augment = task_augmentation(small_config(seed=5, augment=True), loaded_for_seed0)
    assert np.array_equal(np.asarray(augment(x, index, 0)), np.full((2, 3), np.float32(0.01) * 5))
    # Without a seeded form the task's own augmentation is used; with neither, a clear error.
    only_fixed = dataclasses.replace(loaded_for_seed0, seeded_augment=None)
    assert task_augmentation(small_config(seed=5), only_fixed) is only_fixed.augment
    with pytest.raises(ValueError, match="defines no augmentation"):
        task_augmentation(small_config(augment=True), base)


def test_a_run_whose_validation_never_improves_keeps_its_initial_weights_as_best(tmp_path):
    """The best record starts as a host copy of the initial weights: the train step donates
    the state's buffers, so a record pointing at them would be deleted by the first step."""
    import dataclasses

    config = small_config(epochs=2)
    data = tasks.load_task(config)
    real = data.evaluate
    never = dataclasses.replace(data, evaluate=lambda y, s: {**real(y, s), "score": -math.inf})
    result = train_and_evaluate(config, never, tmp_path / "run", progress=False, environment={"test": True})
    assert result["best_epoch"] == -1
    assert result["final_sha256"] != result["init_sha256"]  # it trained; the test used the initial weights


def test_the_epoch_loop_reads_nothing_back_from_the_device_per_batch(tmp_path, monkeypatch):
    """No implicit scalar read of a device array (``int(state.position)``, ``float(loss)``: each
    one waits for the device) per batch: the steps are dispatched back to back; counters
    and losses are fetched explicitly, once per epoch. (A transfer guard would not see these on
    the CPU, where device memory is host memory, so the scalar conversions are counted.)"""
    from jax._src.array import ArrayImpl

    from detjax import train

    config = small_config(epochs=2, batch_size=8)
    data = tasks.load_task(config)
    run = train.prepare_run(config, data, environment={})
    step = train.make_gather_step(run.model, run.tx, config, run.pos_weight)
    saved = []
    ex = train._solo_executor(config, data, step, train.make_predict(run.model, config), None,
                              lambda epoch, state, best, histories: saved.append(epoch))
    ex = train.Executor(members=1, batches=ex.batches, step=ex.step, update_best=ex.update_best, save=ex.save,
                        scores=lambda variables, x: np.zeros((1, x.shape[0], len(data.labels)), np.float32))

    class Bar:
        def update(self, n): pass
        def set_postfix(self, **kw): pass

    reads = []
    for name in ("__int__", "__float__", "__index__", "__bool__"):
        original = getattr(ArrayImpl, name)
        monkeypatch.setattr(ArrayImpl, name, lambda self, _o=original, _n=name: reads.append(_n) or _o(self))
    history = []
    state, best, stopped = train.run_epochs(ex, config, data, jax.device_put(run.init_state),
                                            train.initial_best(run.init_state), [history], bar=Bar())
    monkeypatch.undo()
    # the learning rate of the history is read once per epoch; nothing per batch
    assert len(reads) <= config.epochs, reads
    assert not stopped and saved == [0, 1] and [r["epoch"] for r in history] == [0, 1]
    assert int(jax.device_get(state.step)) == 2 * math.ceil(data.train_x.shape[0] / 8)


# ------------------------------------------------------- the padded last batch (one program)
def _padded_vs_unpadded(arch, n_real=5, size=8, **model_kw):
    """One train step on ``n_real`` samples, (a) as they are and (b) padded to ``size`` with
    garbage rows (c) padded with sample 0 (:func:`gather_batch`)."""
    from detjax.models import get_model
    from detjax.ordering import PAD
    from detjax.train import gather_batch, make_step_fn

    # SGD: the step is linear in the gradient (Adam's first step is about lr * sign(g), which
    # rounding flips for gradients near 0)
    config = small_config(arch=arch, init="kaiming", optimizer="sgd", learning_rate=0.1, momentum=0.0)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n_real, 64, 3)).astype(np.float32)
    y = (rng.random((n_real, 4)) < 0.5).astype(np.float32)
    model = get_model(arch, num_classes=4, init="kaiming", **model_kw)
    tx = make_optimizer(config, 1)
    step = jax.jit(make_step_fn(model, tx, config, pos_weights(y)))
    state = create_train_state(model, tx, x[:1], 0)
    plain = step(jax.tree_util.tree_map(jnp.copy, state), {"x": x, "y": y})
    idx = np.array(list(range(n_real)) + [PAD] * (size - n_real), np.int32)
    sample0 = step(jax.tree_util.tree_map(jnp.copy, state), gather_batch(jnp.asarray(idx), x, y))
    garbage = gather_batch(idx, x, y)
    garbage["x"] = garbage["x"].copy()
    garbage["x"][n_real:] = 1e3 * rng.standard_normal(garbage["x"][n_real:].shape)
    garbage["y"] = garbage["y"].copy()
    garbage["y"][n_real:] = 1.0 - garbage["y"][n_real:]
    return plain, sample0, step(jax.tree_util.tree_map(jnp.copy, state), garbage)


@pytest.mark.parametrize("arch, model_kw", [("baseline", {"in_leads": 3, "feature_dropout": 0.0,
                                                          "hidden_dropout": 0.0}),
                                            ("tiny", {"dropout": 0.0})])
def test_a_padded_batch_trains_exactly_as_the_unpadded_one(arch, model_kw):
    """The losses, the gradient step and BatchNorm's statistics of a padded batch are those of
    its real samples (to float32 rounding: the sums run over another shape), and what the
    padding slots hold changes no bit."""
    (plain, plain_m), (padded, padded_m), (garbage, garbage_m) = _padded_vs_unpadded(arch, **model_kw)
    for key in ("loss", "data_loss", "aux_loss", "grad_norm"):
        np.testing.assert_allclose(float(padded_m[key]), float(plain_m[key]), rtol=2e-6)
    for a, b in zip(jax.tree.leaves((padded.params, padded.batch_stats)), jax.tree.leaves((plain.params, plain.batch_stats))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    if arch == "baseline":  # the running statistics moved, by the real samples' statistics
        assert not np.array_equal(jax.tree.leaves(padded.batch_stats)[0], np.zeros_like(jax.tree.leaves(padded.batch_stats)[0]))
    assert hashing.tree_sha256(padded) == hashing.tree_sha256(garbage)
    assert {k: float(v) for k, v in padded_m.items()} == {k: float(v) for k, v in garbage_m.items()}


def test_every_batch_of_an_epoch_runs_one_compiled_step(tmp_path, monkeypatch):
    """40 training samples in batches of 16: 16, 16 and 8 + 8 padding slots, one program."""
    from detjax import train

    steps = []
    original = train.make_gather_step
    monkeypatch.setattr(train, "make_gather_step", lambda *a, **k: steps.append(original(*a, **k)) or steps[-1])
    train_and_evaluate(small_config(epochs=2), tasks.load_task(small_config()), tmp_path / "run", progress=False)
    assert len(steps) == 1 and steps[0]._cache_size() == 1


def test_a_scalar_sown_loss_is_refused():
    from detjax.train import sown_losses

    with pytest.raises(ValueError, match="sow it per sample"):
        sown_losses({"losses": {"l2": (jnp.float32(1.0),)}}, jnp.ones(4, bool))
