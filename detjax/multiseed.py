"""Many seeds of one recipe trained at once, in ONE compiled program.

A seed study trains the same :class:`~detjax.train.TrainConfig` for seeds ``s_1 … s_k``.
What a seed changes is the Kaiming/He initialisation (structured bases ignore it), the
seeded batch order (``order="seeded"``: a permutation from ``seed + epoch``), the
augmentation keys and dropout. :func:`train_seeds` stacks the k members' states along a
leading axis and runs

    states' = step_k(states, idx[k, B], seeds[k], train_x, train_y)

where ``step_k`` is the single-run step (:func:`detjax.train.make_step_fn`, with the batch
gather and the member's seeded augmentation inside) mapped over the member axis:

* ``mode="vmap"``: ``jax.vmap`` — the members' arithmetic is batched (a batched matmul
  or a grouped convolution instead of k separate ones). Meant for devices that one small
  member does not fill (GPUs); on the 2-core CPU it was slower than sequential steps
  (docs/RESULTS.md). XLA may sum in another order than for one
  member, so a member's bits need not equal the same seed trained alone; they are still
  identical from run to run.
* ``mode="unroll"``: the single-run step written k times into the one program.
* ``mode="map"``: ``jax.lax.map`` — the k members run one after the other in a loop inside the
  one program.

Measured on CPU (docs/seed_studies.md): ``vmap`` and ``map`` members differ from solo runs in
the last bits; ``unroll`` members equal them for the small ECG model but not for ResNet-18.

The initial states are made by the same vmapped/mapped program from the seeds (``jax.random``
is counter based, so the draws do not depend on batching). Each member's result, manifest
(with an ``"execution"`` record naming the mode and the group) and hashes are written to its
own directory, like a single run's. The group checkpoints after every epoch and resumes bit
for bit.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from detjax import manifest as manifest_lib, ordering
from detjax import train as train_lib
from detjax.train import TaskData, TrainConfig, TrainState

__all__ = ["MODES", "member_config", "init_member_states", "make_members_step", "make_members_predict",
           "member_slice", "stack_members", "train_seeds"]

MODES = ("vmap", "map", "unroll")


def member_config(config: TrainConfig, seed: int) -> TrainConfig:
    """The recipe of one member: ``config`` with its ``seed``."""
    return dataclasses.replace(config, seed=int(seed))


def _map_members(fn: Callable, mode: str, in_axes: tuple) -> Callable:
    """``fn`` mapped over the leading (member) axis of the arguments whose ``in_axes`` is 0.

    ``vmap`` batches the arithmetic; ``map`` runs a ``lax.map`` loop whose body is ``fn``
    itself, the per-member computation of a solo run.
    """
    if mode == "vmap":
        return jax.vmap(fn, in_axes=in_axes)
    if mode not in ("map", "unroll"):
        raise ValueError(f"unknown multi-seed mode {mode!r}; expected one of {MODES}")
    per_member = [i for i, axis in enumerate(in_axes) if axis == 0]

    def with_members(args, sliced):
        full = list(args)
        for i, value in zip(per_member, sliced):
            full[i] = value
        return fn(*full)

    def mapped(*args):
        members = tuple(args[i] for i in per_member)
        if mode == "map":
            return jax.lax.map(lambda sliced: with_members(args, sliced), members)
        k = jax.tree_util.tree_leaves(members)[0].shape[0]
        outs = [with_members(args, jax.tree_util.tree_map(lambda a: a[j], members)) for j in range(k)]
        return jax.tree_util.tree_map(lambda *o: jnp.stack(o), *outs)

    return mapped


def init_member_states(model, tx, sample_x: np.ndarray, seeds: Sequence[int]) -> TrainState:
    """Stacked initial states: member ``j`` is :func:`detjax.train.create_train_state` at
    ``seeds[j]``, computed by it, so ``member_slice(states, j)`` equals the solo state byte for
    byte (the init program, or the keyed draws, compile once for all members)."""
    return jax.device_put(stack_members([train_lib.create_train_state(model, tx, sample_x, int(seed))
                                         for seed in seeds]))


def make_members_step(model, tx, config: TrainConfig, pos_weight: np.ndarray | None = None,
                      seeded_augment: Callable | None = None, mode: str = "vmap") -> Callable:
    """``step(states, idx, seeds, train_x, train_y) -> (states, metrics)``, jitted, states donated.

    ``idx`` is ``int32[k, B]``: member j's batch is ``train_x[idx[j]]``
    (:func:`detjax.train.gather_batch`: padding slots masked). With
    ``seeded_augment(x, index, epoch, seed)`` member j's images are augmented with
    ``seeds[j]``, as its solo run (``TaskData.augment`` at ``config.seed``) would be.
    ``train_x``/``train_y`` are shared (not mapped): the data stays on the device once.
    """

    def member_step(state, idx, seed, train_x, train_y):
        augment = None if seeded_augment is None else (lambda x, index, epoch: seeded_augment(x, index, epoch, seed))
        step_fn = train_lib.make_step_fn(model, tx, config, pos_weight, augment)
        return step_fn(state, train_lib.gather_batch(idx, train_x, train_y))

    return jax.jit(_map_members(member_step, mode, (0, 0, 0, None, None)), donate_argnums=0)


def make_members_predict(model, config: TrainConfig, mode: str = "vmap") -> Callable:
    """``predict(variables, x) -> scores[k, B, C]`` for stacked member variables."""

    return jax.jit(_map_members(train_lib.make_predict_fn(model, config), mode, (0, None)))


def _predict_members(predict, variables, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Scores ``[k, N, C]`` (:func:`detjax.train.predict` with the samples on axis 1)."""
    return train_lib.predict(predict, variables, x, batch_size, sample_axis=1)


def member_slice(tree, j: int):
    """Member ``j`` of a stacked pytree, as host numpy arrays."""
    return jax.tree_util.tree_map(lambda a: np.array(jax.device_get(a[j])), tree)


def stack_members(trees: Sequence[Any]):
    """The inverse of :func:`member_slice`: stack member pytrees along a new leading axis."""
    return jax.tree_util.tree_map(lambda *a: np.stack([np.asarray(x) for x in a]), *trees)


def _orders(config: TrainConfig, data: TaskData, seeds: Sequence[int]) -> list[Callable[[int], np.ndarray]]:
    return [train_lib._make_order_fn(member_config(config, s), data) for s in seeds]


def _group_hash(config: TrainConfig, seeds: Sequence[int], mode: str) -> str:
    return manifest_lib.json_sha256({"config": config.to_dict(), "seeds": [int(s) for s in seeds],
                                     "mode": mode, "kind": "detjax.multiseed"})


def _check_seeds(seeds: Sequence[int], mode: str) -> list[int]:
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("train_seeds needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    if any(s < 0 or s >= 2**32 for s in seeds):
        raise ValueError(f"seeds must be in [0, 2**32), got {seeds}")
    if mode not in MODES:
        raise ValueError(f"unknown multi-seed mode {mode!r}; expected one of {MODES}")
    return seeds


def _members_executor(config: TrainConfig, data: TaskData, seeds: list[int], step, predict,
                      checkpoint: Callable) -> train_lib.Executor:
    """The executor of k stacked members: member j's batch is ``train_x[idx[j]]`` in its own
    order, gathered inside the one mapped program."""
    order_fns = _orders(config, data, seeds)
    train_x, train_y = jax.device_put(data.train_x), jax.device_put(data.train_y)
    seeds_dev = jnp.asarray(np.asarray(seeds, np.uint32))

    def batches(epoch):
        orders = np.stack([fn(epoch) for fn in order_fns]).astype(np.int32)  # [k, n]
        return ordering.batches(orders, config.batch_size)

    return train_lib.Executor(
        members=len(seeds), batches=batches,
        step=lambda states, idx: step(states, jnp.asarray(idx), seeds_dev, train_x, train_y),
        scores=lambda variables, x: _predict_members(predict, variables, x, config.eval_batch_size),
        update_best=_update_best, save=checkpoint)


def train_seeds(config: TrainConfig, data: TaskData, seeds: Sequence[int], workdir: str | Path, *,
                mode: str = "vmap", member_dirs: Sequence[str | Path] | None = None, model=None,
                environment: dict | None = None, progress: bool = True, resume: bool = True,
                stop_after_epoch: int | None = None) -> list[dict[str, Any]]:
    """Trains ``config`` for every seed in ``seeds`` at once; returns the members' results.

    ``workdir`` holds the group's checkpoints (one per epoch, verified on restore like a
    single run's); ``member_dirs`` (default ``workdir/seed-<s>``) are the members' run
    directories, under the rules of a single run's: a member directory that holds another
    config, or (without ``resume``) any run, is refused before training; a finished member
    is returned as stored and never rewritten. A member's result has the same keys as
    :func:`detjax.train.train_and_evaluate`'s plus ``"seed"``, ``"execution"`` and
    ``"history"``. ``config.seed`` is ignored (each member uses its own).
    """
    from detjax.checkpoint import Checkpointer

    seeds = _check_seeds(seeds, mode)
    t_start = time.perf_counter()
    workdir = Path(workdir).absolute()
    member_dirs = [workdir / f"seed-{s}" for s in seeds] if member_dirs is None else [Path(d).absolute()
                                                                                     for d in member_dirs]
    if len(member_dirs) != len(seeds):
        raise ValueError(f"{len(member_dirs)} member directories for {len(seeds)} seeds")
    configs = [member_config(config, s) for s in seeds]
    for cfg, member_dir in zip(configs, member_dirs):
        train_lib._check_run_dir(member_dir, cfg.hash(), resume)
    stored = [manifest_lib.finished_result(d) for d in member_dirs]
    if all(r is not None for r in stored):
        return stored
    model, environment = train_lib.model_and_environment(config, data, model, environment)
    if config.augment and data.seeded_augment is None:
        raise ValueError(f"config.augment is set but task {config.task!r} defines no seeded augmentation")
    batches_per_epoch = math.ceil(data.train_x.shape[0] / config.batch_size)
    tx = train_lib.make_optimizer(config, batches_per_epoch)
    weight = train_lib.pos_weights(data.train_y) if config.loss == "weighted_bce" else None
    init_states = init_member_states(model, tx, data.train_x[:1], seeds)
    manifests = _member_manifests(configs, data, environment, init_states, model)
    checkpointer = Checkpointer(workdir / "checkpoints", config_hash=_group_hash(config, seeds, mode))
    best = train_lib.initial_best(init_states, members=len(seeds))
    histories: list[list[dict[str, Any]]] = [[] for _ in seeds]
    states, sidecar = init_states, None
    restored = checkpointer.restore_latest(train_lib._state_dict(init_states), best) if resume else None
    if restored is not None:
        state_dict, best, sidecar = restored
        states = flax.serialization.from_state_dict(init_states, state_dict)
        histories = [list(h) for h in sidecar.get("histories", histories)]
    for member_dir, run_manifest, result in zip(member_dirs, manifests, stored):
        if result is None:
            train_lib.start_record(member_dir, run_manifest, sidecar=sidecar, environment=environment)

    def checkpoint(epoch, states, best, histories):
        checkpointer.save(epoch + 1, train_lib._state_dict(states), best, {"histories": histories})

    ex = _members_executor(config, data, seeds,
                           make_members_step(model, tx, config, weight, data.seeded_augment if config.augment
                                             else None, mode),
                           make_members_predict(model, config, mode), checkpoint)
    bar = train_lib._progress(total=config.epochs * batches_per_epoch, initial=train_lib._counter(states.step),
                              enabled=progress, desc=f"{config.arch}/{config.init} x{len(seeds)} ({mode})")
    with bar, checkpointer:
        states, best, stopped = train_lib.run_epochs(ex, config, data, jax.device_put(states), best, histories,
                                                     bar=bar, stop_after_epoch=stop_after_epoch)
    if stopped:
        return [{"stopped_after_epoch": train_lib._counter(states.epoch) - 1, "seed": s} for s in seeds]
    execution = {"mode": mode, "members": len(seeds), "seeds": seeds, "group_hash": checkpointer.config_hash,
                 "group_dir": str(workdir), "wall_time_s_group": time.perf_counter() - t_start}
    return _finish_members(configs, data, ex, states, best, histories, manifests, member_dirs, stored, execution)


def _member_manifests(configs: Sequence[TrainConfig], data: TaskData, environment: dict, init_states: TrainState,
                      model) -> list[dict[str, Any]]:
    """Each member's running manifest, from its slice of the stacked initial states."""
    from detjax.models import count_params

    init_host = [member_slice(train_lib._state_dict(init_states), j) for j in range(len(configs))]
    n_params = count_params(init_host[0]["params"])
    assignment = train_lib.init_assignment(model, data.train_x[:1])
    return [train_lib.new_run_manifest(cfg, data, environment, host, n_params, assignment)
            for cfg, host in zip(configs, init_host)]


def _finish_members(configs: Sequence[TrainConfig], data: TaskData, ex: train_lib.Executor, states: TrainState,
                    best: dict, histories: list[list[dict]], manifests: list[dict], member_dirs: list[Path],
                    stored: list[dict | None], execution: dict[str, Any]) -> list[dict[str, Any]]:
    """Tests every member's best-validation weights and closes its run directory (a member
    finished before this group ran keeps its stored record)."""
    best_variables = {"params": best["params"]}
    if jax.tree_util.tree_leaves(best["batch_stats"]):
        best_variables["batch_stats"] = best["batch_stats"]
    test_scores = ex.scores(best_variables, data.test_x)
    wall = execution["wall_time_s_group"] / len(configs)
    results = []
    for j, (cfg, run_manifest, member_dir) in enumerate(zip(configs, manifests, member_dirs)):
        if stored[j] is not None:
            results.append(stored[j])
            continue
        best_j = {**member_slice({"params": best["params"], "batch_stats": best["batch_stats"]}, j),
                  "epoch": np.asarray(best["epoch"])[j], "score": np.asarray(best["score"])[j]}
        result = train_lib.finish_run(
            member_dir, cfg, data, run_manifest, data.evaluate(data.test_y, test_scores[j]), best_j,
            member_slice(train_lib._state_dict(states), j), history=histories[j], wall=wall,
            extra={"seed": cfg.seed, "execution": execution, "history": histories[j]},
            fields={"execution": execution})
        results.append(result)
    return results


def _update_best(best: dict, states: TrainState, improved: list[bool], epoch: int, scores: list[float]) -> dict:
    """Members whose validation score improved take the current weights; the others keep theirs."""
    mask = np.asarray(improved)

    def pick(current, previous):
        current, previous = np.asarray(jax.device_get(current)), np.asarray(jax.device_get(previous))
        return np.where(mask.reshape((-1,) + (1,) * (current.ndim - 1)), current, previous)

    return {"params": jax.tree_util.tree_map(pick, states.params, best["params"]),
            "batch_stats": jax.tree_util.tree_map(pick, states.batch_stats, best["batch_stats"]),
            "epoch": np.where(mask, np.int32(epoch), np.asarray(best["epoch"])).astype(np.int32),
            "score": np.where(mask, np.asarray(scores, np.float32), np.asarray(best["score"])).astype(np.float32)}
