"""The deterministic training engine.

* :class:`TrainConfig` is the whole recipe as plain data; its SHA-256
  (:meth:`TrainConfig.hash`) identifies a run.
* :class:`TrainState` is the whole training state as one explicit pytree: params,
  BatchNorm statistics, optimizer state, step, epoch, position in the epoch's batch order
  and the raw PRNG key. Hashing it (``detjax.hashing``) is the proof of identity.
* :func:`make_train_step` returns ``train_step(state, batch) -> (state, metrics)``, a pure
  jitted function; the epoch loop only gathers batches from device-resident arrays in the
  order :mod:`detjax.ordering` computes.
* :func:`train_and_evaluate` runs a config end to end: initial state, golden or seeded
  order, per-epoch cosine schedule, validation at the protocol's epochs, best-validation
  selection, test evaluation, verified orbax checkpoints (resumable bit for bit), a
  ``manifest.json``, a ``result.json`` and a training-curve PNG.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import detjax.initializers as di
from detjax import hashing, manifest as manifest_lib, ordering
from detjax.models.layers import masked_mean

__all__ = [
    "TrainConfig",
    "TrainState",
    "TaskData",
    "RunDirectoryError",
    "weighted_bce_with_logits",
    "softmax_cross_entropy",
    "pos_weights",
    "cosine_per_epoch",
    "make_optimizer",
    "create_train_state",
    "make_step_fn",
    "make_train_step",
    "make_predict_fn",
    "make_predict",
    "make_mesh",
    "shard_batch",
    "predict",
    "protocol_eval_epochs",
    "task_augmentation",
    "Executor",
    "run_epochs",
    "prepare_run",
    "finish_run",
    "make_gather_step",
    "gather_batch",
    "sown_losses",
    "train_and_evaluate",
]


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training recipe. Everything here goes into the config hash.

    Defaults are the PTB-XL protocol of docs/method.md §8 (Adam 1e-3, cosine over 85 epochs
    stepped per epoch, batch 128, class-weighted BCE with logits clamped to ±50).
    """

    task: str = "ptbxl"
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    arch: str = "conformer"
    model: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    init: str = "mixed"
    variant: str = "reference"
    order: str = "golden"
    seed: int = 0
    epochs: int = 85
    schedule_epochs: int | None = None
    batch_size: int = 128
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    loss: str = "weighted_bce"
    logit_clamp: float = 50.0
    eval_every: int = 10
    augment: bool = False
    eval_batch_size: int = 256

    def __post_init__(self):
        checks = [
            (self.order in ordering.ORDERS, f"order must be one of {ordering.ORDERS}, got {self.order!r}"),
            (self.optimizer in ("adam", "sgd"), f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}"),
            (self.loss in ("weighted_bce", "bce", "ce"), f"loss must be weighted_bce, bce or ce, got {self.loss!r}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self._check_names()

    def _check_names(self) -> None:
        """Task, arch and init must name things that exist (one list each: the task loaders,
        the model registry and the initialisers each model accepts)."""
        from detjax import models, tasks

        if self.task not in tasks.TASKS:
            raise ValueError(f"unknown task {self.task!r}; known tasks: {sorted(tasks.TASKS)}")
        if self.arch not in models.ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; known archs: {list(models.ARCHS)}")
        if self.init not in models.inits_for(self.arch):
            raise ValueError(f"arch {self.arch!r} takes init one of {list(models.inits_for(self.arch))}, "
                             f"not {self.init!r}")

    @property
    def cosine_epochs(self) -> int:
        return self.schedule_epochs or self.epochs

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), sort_keys=True))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    def hash(self) -> str:
        """SHA-256 of the canonical JSON of the config (sorted keys, no whitespace)."""
        return manifest_lib.json_sha256(self.to_dict())


@flax.struct.dataclass
class TrainState:
    """The whole training state: everything a resumed run needs to continue bit for bit."""

    params: Any
    batch_stats: Any
    opt_state: Any
    step: jax.Array       # int32: optimizer updates done
    epoch: jax.Array      # int32: epoch in progress (== finished epochs at an epoch boundary)
    position: jax.Array   # int32: batches of the current epoch already consumed
    rng: jax.Array        # uint32[2]: raw threefry key data for dropout/augmentation

    def variables(self) -> dict:
        out = {"params": self.params}
        if self.batch_stats:
            out["batch_stats"] = self.batch_stats
        return out


@dataclasses.dataclass
class TaskData:
    """Arrays of one task, already normalised, plus what evaluation needs.

    ``evaluate(y_true, scores) -> dict`` must return a ``"score"`` entry, the quantity
    maximised by best-validation selection (macro AUC for PTB-XL). ``order_keys`` are the
    golden content keys (``ordering.golden_content_keys``); ``None`` means index keys.
    ``augment(x, index, epoch)`` is the task's deterministic augmentation, applied inside
    the train step when ``config.augment`` is set; ``seeded_augment(x, index, epoch, seed)``
    is the same with the seed as an argument (``augment`` is it at ``config.seed``), so
    :mod:`detjax.multiseed` can give every vmapped member its own seed.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    labels: tuple[str, ...]
    evaluate: Callable[[np.ndarray, np.ndarray], dict]
    order_keys: Any = None
    augment: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None
    info: dict = dataclasses.field(default_factory=dict)
    seeded_augment: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array] | None = None
    #: ``post_evaluate(predict, test_scores) -> dict``, run once after the test evaluation with
    #: ``predict(x) -> scores`` of the best-validation weights; its entries are added to
    #: ``result.json`` (the classical floor, a transfer evaluation on another dataset, ...).
    post_evaluate: Callable[[Callable[[np.ndarray], np.ndarray], np.ndarray], dict] | None = None

    #: the memo of :meth:`fingerprint` (not an argument: ``dataclasses.replace`` starts afresh)
    _fingerprint: dict | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def fingerprint(self) -> dict[str, Any]:
        """SHA-256/MD5 of the arrays actually used, plus their shapes; computed once per
        ``TaskData`` (a study's members share one load; the arrays are not to be mutated)."""
        if self._fingerprint is None:
            arrays = {f"{split}_{part}": getattr(self, f"{split}_{part}")
                      for split in ("train", "val", "test") for part in ("x", "y")}
            self._fingerprint = {**hashing.tree_digests(arrays),
                                 "shapes": {k: list(v.shape) for k, v in sorted(arrays.items())}}
        return dict(self._fingerprint)


class RunDirectoryError(ValueError):
    """The run directory already holds another run (nothing is overwritten)."""


# ---------------------------------------------------------------------- pure pieces


def weighted_bce_with_logits(logits: jax.Array, labels: jax.Array, pos_weight: jax.Array,
                             clamp: float = 50.0, mask: jax.Array | None = None) -> jax.Array:
    r"""Class-weighted binary cross-entropy on clamped logits, averaged over all entries.

    .. math::
        z = \mathrm{clip}(\text{logits}, -c, c), \quad
        \ell = -\frac{1}{BC}\sum_{b,c} \big[w_c\, y_{bc} \log\sigma(z_{bc})
               + (1 - y_{bc}) \log(1 - \sigma(z_{bc}))\big]

    This is PyTorch's ``BCEWithLogitsLoss(pos_weight=w)`` after ``clamp(-c, c)``. With
    ``mask`` (``bool[B]``) the sum and ``B`` run over the real samples only
    (:func:`detjax.models.layers.masked_mean`).
    """
    z = jnp.clip(logits, -clamp, clamp)
    per_entry = pos_weight * labels * jax.nn.log_sigmoid(z) + (1.0 - labels) * jax.nn.log_sigmoid(-z)
    return -masked_mean(per_entry, mask)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    r"""Mean cross-entropy with integer labels: :math:`-\frac1B\sum_b \log\mathrm{softmax}(z_b)_{y_b}`
    (with ``mask``: over the real samples only)."""
    return masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels.reshape(-1)), mask)


def pos_weights(y_train: np.ndarray) -> np.ndarray:
    r"""Per-class positive weights :math:`w_c = \sqrt{N / \max(n_c, 1)}` (docs/method.md §8), float32."""
    y = np.asarray(y_train)
    counts = y.sum(axis=0, dtype=np.float64)
    return np.sqrt(y.shape[0] / np.maximum(counts, 1.0)).astype(np.float32)


def cosine_per_epoch(base_lr: float, total_epochs: int, steps_per_epoch: int) -> optax.Schedule:
    r"""Cosine annealing stepped once per epoch, constant within an epoch.

    .. math:: \eta(t) = \eta_0 \cdot \tfrac12\big(1 + \cos(\pi\, e / E)\big), \quad
              e = \min(\lfloor t / S \rfloor, E - 1)

    (PyTorch's ``CosineAnnealingLR(T_max=E)`` stepped per epoch). The E values are computed
    once in float64 on the host and rounded to float32, so every platform uses the same
    learning rates.
    """
    table = np.array([base_lr * 0.5 * (1.0 + math.cos(math.pi * e / total_epochs))
                      for e in range(total_epochs)], dtype=np.float32)

    def schedule(count):
        epoch = jnp.minimum(count // steps_per_epoch, total_epochs - 1)
        return jnp.asarray(table)[epoch]

    return schedule


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam (ECG) or SGD + momentum + decoupled-from-nothing L2 weight decay (images).

    SGD adds ``weight_decay * params`` to the gradient before momentum, as PyTorch does.
    """
    lr = cosine_per_epoch(config.learning_rate, config.cosine_epochs, steps_per_epoch)
    if config.optimizer == "adam":
        tx = optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)
        if config.weight_decay:
            tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
        return tx
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(lr, momentum=config.momentum))


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, sample_x: np.ndarray,
                       seed: int) -> TrainState:
    """Initial state. Structured initializers ignore the key; Kaiming ones draw from ``seed``."""
    key = jax.random.key(seed)
    params_key, dropout_key, state_key = jax.random.split(key, 3)
    # Only params and batch_stats are made mutable: sown losses/intermediates are then
    # no-ops and XLA can drop most of the forward pass (compiles in a fraction of the time).
    # The init program is the same for every seed (the keys are its arguments, or, for keyed
    # inits, the draws run apart), so a compilation cache serves all members of a seed study.
    defer = getattr(model, "init_mode", None) in di.KEYED_INITS and getattr(model, "draw_keyed_apart", False)
    variables = di.init_variables(model, {"params": params_key, "dropout": dropout_key}, jnp.asarray(sample_x),
                                  defer_keyed_draws=defer, train=False, mutable=["params", "batch_stats"])
    variables = flax.core.unfreeze(variables)
    params = variables.pop("params")
    batch_stats = variables.pop("batch_stats", {})
    return TrainState(
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        step=jnp.int32(0),
        epoch=jnp.int32(0),
        position=jnp.int32(0),
        rng=jax.random.key_data(state_key),
    )


def sown_losses(collections: Mapping[str, Any], mask: jax.Array | None = None) -> jax.Array:
    r"""The sum of the model's auxiliary losses: each value sown into ``"losses"`` is per
    sample (leading batch axis) and counts as its mean over the real samples
    (:func:`detjax.models.layers.masked_mean`), so padding never enters a loss."""
    total = jnp.float32(0.0)
    for path, leaf in jax.tree_util.tree_leaves_with_path(collections.get("losses", {})):
        if leaf.ndim == 0:
            raise ValueError(f"sown loss {jax.tree_util.keystr(path)} is a scalar; sow it per sample "
                             "(leading batch axis), the step averages it over the real samples")
        total = total + masked_mean(leaf, mask)
    return total


def make_step_fn(model: nn.Module, tx: optax.GradientTransformation, config: TrainConfig,
                 pos_weight: np.ndarray | None = None,
                 augment: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None):
    """The pure, un-jitted ``step_fn(state, batch) -> (state, metrics)``.

    ``batch`` is ``{"x", "y"}`` plus ``"index"`` (the samples' dataset indices) when
    ``augment(x, index, epoch)`` is given, and ``"mask"`` (``bool[B]``) when it is padded
    (:func:`gather_batch`): the losses, the metrics and BatchNorm's statistics then count the
    real samples only, so every batch of an epoch runs the same compiled program. Dropout
    draws from ``fold_in(state.rng, state.step)``, so the randomness is a function of the step
    alone. The loss adds every value the model sowed into its ``"losses"`` collection
    (:func:`sown_losses`). :func:`make_train_step` jits it; :mod:`detjax.multiseed` vmaps it.
    """
    weight = None if pos_weight is None else jnp.asarray(pos_weight, jnp.float32)

    def data_loss(logits, y, mask):
        if config.loss == "ce":
            return softmax_cross_entropy(logits, y, mask)
        w = weight if config.loss == "weighted_bce" else jnp.ones(logits.shape[-1], jnp.float32)
        return weighted_bce_with_logits(logits, y, w, config.logit_clamp, mask)

    def loss_fn(params, state: TrainState, x, y, mask, dropout_key):
        variables = {"params": params}
        mutable = ["losses"]
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
            mutable.append("batch_stats")
        logits, updated = model.apply(variables, x, train=True, mask=mask, rngs={"dropout": dropout_key},
                                      mutable=mutable)
        main = data_loss(logits, y, mask)
        aux = sown_losses(updated, mask)
        return main + aux, (main, aux, updated.get("batch_stats", state.batch_stats))

    def step_fn(state: TrainState, batch: Mapping[str, jax.Array]):
        x = batch["x"]
        if augment is not None:
            x = augment(x, batch["index"], state.epoch)
        dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grads, (main, aux, batch_stats) = jax.grad(loss_fn, has_aux=True)(
            state.params, state, x, batch["y"], batch.get("mask"), dropout_key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
            step=state.step + 1,
            position=state.position + 1,
        )
        return new_state, {"loss": main + aux, "data_loss": main, "aux_loss": aux,
                           "grad_norm": optax.tree.norm(grads)}

    return step_fn


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, config: TrainConfig,
                    pos_weight: np.ndarray | None = None,
                    augment: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
                    mesh: Mesh | None = None):
    """``train_step(state, batch) -> (state, metrics)``: :func:`make_step_fn`, jitted (state donated).

    With a 1-D ``mesh`` (axis ``"data"``, see :func:`make_mesh`) the step runs data-parallel
    under XLA's SPMD partitioner: the batch is split along its first axis over the devices,
    the state is replicated, and the gradient (a mean over the global batch) is reduced by
    XLA collectives. The math is the single-device step's; only the placement and so the
    order of the cross-device sums change. A batch whose size the device count does not
    divide runs replicated on every device (the last partial batch of an epoch is padded to
    the batch size, :func:`detjax.ordering.batches`, so it is split like the others).
    """
    step_fn = make_step_fn(model, tx, config, pos_weight, augment)
    if mesh is None:
        return jax.jit(step_fn, donate_argnums=0)
    replicated = NamedSharding(mesh, P())
    split = jax.jit(step_fn, in_shardings=(replicated, NamedSharding(mesh, P(DATA_AXIS))),
                    out_shardings=(replicated, replicated), donate_argnums=0)
    whole = jax.jit(step_fn, in_shardings=(replicated, replicated),
                    out_shardings=(replicated, replicated), donate_argnums=0)

    def train_step(state, batch):
        batch = shard_batch(batch, mesh)
        return (split if batch_is_split(batch, mesh) else whole)(state, batch)

    return train_step


DATA_AXIS = "data"


def make_mesh(devices: int | None = None) -> Mesh | None:
    """A 1-D mesh (axis ``"data"``) over the first ``devices`` devices, or ``None`` for one.

    ``None`` means every visible device. With one device no mesh is used at all, so
    single-device runs are exactly the plain jitted step.
    """
    available = jax.devices()
    n = len(available) if devices is None else int(devices)
    if n < 1 or n > len(available):
        raise ValueError(
            f"asked for {n} devices but {len(available)} {available[0].platform} device(s) are visible; "
            "on CPU, more host devices need --devices before the backend starts "
            "(XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    return None if n == 1 else Mesh(np.array(available[:n]), (DATA_AXIS,))


def mesh_description(mesh: Mesh | None) -> dict[str, Any]:
    """What the manifest records about the placement."""
    devices = [jax.devices()[0]] if mesh is None else list(mesh.devices.flat)
    return {"axis": DATA_AXIS, "devices": len(devices), "device_ids": [d.id for d in devices],
            "platform": devices[0].platform, "device_kind": devices[0].device_kind}


def topology_description(mesh: Mesh | None) -> dict[str, Any]:
    """Processes and devices of the run (``jax.distributed`` multi-process runs have several
    processes). Recorded in the manifest and every checkpoint; a resume on another topology is
    refused (the reduction order over processes and devices decides the bits)."""
    devices = 1 if mesh is None else mesh.size
    processes = jax.process_count()
    return {"processes": processes, "devices": devices, "devices_per_process": devices // processes}


def _check_topology(sidecar: Mapping[str, Any], current: Mapping[str, Any], allow: bool, where: Path) -> None:
    recorded = sidecar.get("topology") or {"processes": 1, "devices": sidecar.get("device_count", 1),
                                           "devices_per_process": sidecar.get("device_count", 1)}
    if dict(recorded) != dict(current) and not allow:
        from detjax.checkpoint import CheckpointMismatchError

        raise CheckpointMismatchError(
            f"checkpoint in {where} was written on {recorded['processes']} process(es) x "
            f"{recorded['devices_per_process']} device(s) and this run uses {current['processes']} x "
            f"{current['devices_per_process']}; the reduction order differs, so the result would not be "
            "bit-identical. Pass allow_device_change=True (--allow-device-change) to resume anyway")


def batch_is_split(batch: Mapping[str, Any], mesh: Mesh) -> bool:
    """Whether ``batch`` is split over the mesh: its size is divisible by the device count."""
    return next(iter(batch.values())).shape[0] % mesh.size == 0


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Places the global ``batch`` on ``mesh``: split along axis 0 when the device count
    divides the batch size, replicated otherwise (the same global batch either way).

    Each device's slice is cut from the host copy with ``jax.make_array_from_callback``, so
    every process only needs the global batch on its host (which it has: every process
    computes the same order from the same data), also when the mesh spans several hosts.
    """
    sharding = NamedSharding(mesh, P(DATA_AXIS) if batch_is_split(batch, mesh) else P())

    def place(value):
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return {k: place(v) for k, v in batch.items()}


def make_predict_fn(model: nn.Module, config: TrainConfig):
    """The un-jitted ``predict_fn(variables, x) -> scores``: sigmoid (BCE losses) or softmax (CE)."""

    def predict_fn(variables, x):
        logits = model.apply(variables, x, train=False)
        return jax.nn.softmax(logits) if config.loss == "ce" else jax.nn.sigmoid(logits)

    return predict_fn


def make_predict(model: nn.Module, config: TrainConfig):
    """``predict_batch(variables, x) -> scores``: :func:`make_predict_fn`, jitted."""
    return jax.jit(make_predict_fn(model, config))


def predict(predict_batch, variables, x: np.ndarray, batch_size: int, *, sample_axis: int = 0) -> np.ndarray:
    """Scores for all of ``x``; the last batch is zero-padded to ``batch_size`` (one compile).

    ``sample_axis`` is the samples' axis in ``predict_batch``'s output (1 for stacked members);
    the output may be a pytree of such arrays (``None`` leaves stay ``None``).
    """
    outputs = []
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start:start + batch_size]
        n = chunk.shape[0]
        if n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
        outputs.append(jax.tree_util.tree_map(lambda a: np.take(np.asarray(a), np.arange(n), axis=sample_axis),
                                              predict_batch(variables, chunk)))
    return jax.tree_util.tree_map(lambda *parts: np.concatenate(parts, axis=sample_axis), *outputs)


def protocol_eval_epochs(epochs: int, every: int = 10) -> list[int]:
    """Epochs (0-based, after training that epoch) at which validation runs: 0, every, 2·every, …
    and always the last one (85 epochs → 0, 10, …, 80, 84)."""
    return sorted(set(range(0, epochs, every)) | {epochs - 1})


# ----------------------------------------------------------------------- the driver


def _state_dict(state: TrainState) -> dict:
    return flax.serialization.to_state_dict(state)


def weights_sha256(state_dict: dict) -> str:
    """SHA-256 of the weights alone (``params`` and ``batch_stats`` of a state dict), without
    the PRNG key, optimiser state and counters that the full-state hash also covers: equal
    across seeds when the initialisation does not depend on the seed (structured bases)."""
    return hashing.tree_sha256({"params": state_dict["params"], "batch_stats": state_dict["batch_stats"]})


def init_assignment(model: nn.Module, sample_x: np.ndarray) -> list[dict[str, Any]]:
    """Which initialiser (basis, stage, fixup scale) every kernel of ``model`` receives, in
    call order, as the manifest records it: ``[{"layer", "shape", "init"}, ...]``."""
    rows = di.describe(model, jnp.asarray(sample_x[:1]))
    return [{"layer": r.path, "shape": list(r.shape), "init": r.init} for r in rows]


def _host_copy(tree):
    return jax.tree_util.tree_map(lambda a: np.array(jax.device_get(a)), tree)


def initial_best(state: TrainState, members: int | None = None) -> dict:
    """The best-validation record before any evaluation (also the checkpoint restore target);
    for ``members`` stacked members, epoch and score have one entry per member.

    Scalars are 0-d arrays, not numpy scalars, which orbax cannot restore into. The weights
    are host copies: the train step donates the state's buffers, so a record that pointed at
    them would be deleted by the first step (and a run whose validation never improves would
    then fail to checkpoint its "best" weights).
    """
    shape = () if members is None else (members,)
    return {"params": _host_copy(state.params), "batch_stats": _host_copy(state.batch_stats),
            "epoch": np.full(shape, -1, np.int32), "score": np.full(shape, -np.inf, np.float32)}


def restore_targets(manifest: Mapping[str, Any], config: TrainConfig):
    """``(model, state_dict, best)``: a fresh initial state and best record of a recorded run
    (the restore targets of its checkpoints), built from the labels and training-set shapes its
    manifest records, so no data is loaded."""
    from detjax.checkpoint import CheckpointCorruptError
    from detjax.models import get_model

    labels = (manifest.get("metrics") or {}).get("labels")
    if not labels:
        raise CheckpointCorruptError("manifest.json: no labels in its metrics")
    model = get_model(config.arch, num_classes=len(labels), init_mode=config.init, variant=config.variant,
                      **dict(config.model))
    shapes = manifest["data_fingerprint"]["shapes"]
    tx = make_optimizer(config, math.ceil(shapes["train_x"][0] / config.batch_size))
    state = create_train_state(model, tx, np.zeros([1, *shapes["train_x"][1:]], np.float32), config.seed)
    return model, _state_dict(state), initial_best(state)


def restore_final_checkpoint(run_dir: str | Path, manifest: Mapping[str, Any], config: TrainConfig):
    """``(model, state_dict, best, sidecar)`` of a finished run's final checkpoint, each tree
    verified against the sidecar's digests (:meth:`detjax.checkpoint.Checkpointer.restore`).
    Raises :class:`~detjax.checkpoint.CheckpointError` naming what is missing or corrupt."""
    from detjax.checkpoint import CheckpointCorruptError, Checkpointer

    run_dir = Path(run_dir)
    model, state_target, best_target = restore_targets(manifest, config)
    with Checkpointer(run_dir / "checkpoints", config_hash=manifest["config_hash"], allow_device_change=True,
                      read_only=True) as ckpt:
        if config.epochs not in ckpt.steps:
            raise CheckpointCorruptError(f"the final checkpoint {run_dir / 'checkpoints' / str(config.epochs)} "
                                         f"is missing (stored steps: {ckpt.steps})")
        return (model, *ckpt.restore(config.epochs, state_target, best_target))


def _make_order_fn(config: TrainConfig, data: TaskData):
    n = data.train_x.shape[0]
    if config.order != "golden":
        order = ordering.make_order_fn(config.order, n, seed=config.seed)
    else:  # golden: content keys when the task has them (ECG), index keys otherwise
        order = ordering.make_order_fn("golden", data.order_keys if data.order_keys is not None else n)
    return lambda epoch: np.asarray(order(epoch))


def gather_batch(idx, train_x, train_y) -> dict[str, Any]:
    """The batch ``{"x", "y", "index", "mask"}`` of the indices ``idx`` (a batch of
    :func:`detjax.ordering.batches`): ``mask`` marks the real samples; a padding slot
    (``ordering.PAD``) holds sample 0, which the masked losses and statistics ignore. Works on
    numpy (host) and jax (inside the jitted step) arrays alike."""
    xp = jnp if isinstance(idx, jax.Array) else np
    mask = idx != ordering.PAD
    index = xp.where(mask, idx, 0)
    return {"x": train_x[index], "y": train_y[index], "index": index, "mask": mask}


def _check_run_dir(workdir: Path, config_hash: str, resume: bool) -> None:
    manifest_path = workdir / "manifest.json"
    if not manifest_path.exists():
        leftovers = [p.name for p in workdir.iterdir()] if workdir.exists() else []
        if leftovers and not resume:
            raise RunDirectoryError(
                f"run directory {workdir} is not empty ({', '.join(sorted(leftovers)[:5])}) and holds "
                "no detjax manifest; choose an empty or new --out")
        return
    previous = json.loads(manifest_path.read_text())
    if previous.get("config_hash") != config_hash:
        raise RunDirectoryError(
            f"run directory {workdir} holds a run with config hash {previous.get('config_hash')}, "
            f"not {config_hash}; nothing was overwritten. Choose another --out")
    if not resume:
        if previous.get("status") == "finished":
            raise RunDirectoryError(
                f"run directory {workdir} already holds a finished run of this config; nothing was "
                "overwritten. `python -m detjax verify` re-checks it, --resume prints its result; "
                "or choose another --out")
        raise RunDirectoryError(
            f"run directory {workdir} already holds an unfinished run of this config; nothing was "
            "overwritten. Pass --resume to continue it, or choose another --out")


def task_augmentation(config: TrainConfig, data: TaskData) -> Callable:
    """``augment(x, index, epoch)`` of ``data`` at ``config.seed``.

    The keys follow the config's seed also when ``data`` was loaded for another seed (a seed
    study loads the data once for all its members): ``seeded_augment`` at ``config.seed``
    when the task has it, else the task's ``augment``.
    """
    if data.seeded_augment is not None:
        seed = config.seed
        return lambda x, index, epoch: data.seeded_augment(x, index, epoch, seed)
    if data.augment is None:
        raise ValueError(f"config.augment is set but task {config.task!r} defines no augmentation")
    return data.augment


# ----------------------------------------------------------------------- the epoch loop


@dataclasses.dataclass(frozen=True)
class Executor:
    """How the ``members`` (k ≥ 1) of one run take their steps; :func:`run_epochs` is the loop.

    A solo run is k = 1 (:func:`train_and_evaluate`); :mod:`detjax.multiseed` stacks k seeds
    in one program. ``batches(epoch)`` lists the epoch's batch indices (host arrays:
    ``[B]``, or ``[k, B]`` for stacked members); ``step(state, indices) -> (state, metrics)``
    takes one step; ``scores(variables, x)`` returns ``[k, N, C]``;
    ``update_best(best, state, improved, epoch, scores)`` gives the members whose validation
    score improved their current weights; ``save(epoch, state, best, histories)``
    checkpoints after ``epoch``.
    """

    members: int
    batches: Callable[[int], list]
    step: Callable
    scores: Callable
    update_best: Callable
    save: Callable


def _counter(value) -> int:
    """A state counter (a scalar, or one per stacked member, all equal) as a host int."""
    return int(np.asarray(jax.device_get(value)).reshape(-1)[0])


def _member_means(losses: list, members: int) -> list[float]:
    """Each member's mean loss over the epoch's steps (NaN for an epoch with no steps)."""
    if not losses:
        return [float("nan")] * members
    per_step = np.asarray(jax.device_get(losses), np.float32).reshape(len(losses), members)
    return [float(np.mean(np.ascontiguousarray(per_step[:, j]))) for j in range(members)]


def _validate(ex: Executor, data: TaskData, config: TrainConfig, state, best: dict,
              records: list[dict], epoch: int) -> dict:
    """Scores every member on the validation split into its record; returns the updated best."""
    scores = ex.scores(state.variables(), data.val_x)
    for j, record in enumerate(records):
        record["val"] = data.evaluate(data.val_y, scores[j])
    previous = np.asarray(best["score"]).reshape(-1)
    improved = [record["val"]["score"] > float(p) for record, p in zip(records, previous)]
    if any(improved):
        best = ex.update_best(best, state, improved, epoch, [r["val"]["score"] for r in records])
    return best


def run_epochs(ex: Executor, config: TrainConfig, data: TaskData, state, best: dict,
               histories: list[list[dict]], *, bar, stop_after_epoch: int | None = None):
    """The one epoch loop of every run; returns ``(state, best, stopped)``.

    Each epoch from ``state.epoch`` on: the steps over the epoch's batch order from
    ``state.position`` on (dispatched asynchronously: the host reads the position once per
    epoch and the losses once at its end), the members' mean train loss (a non-finite one
    stops the run), validation at :func:`protocol_eval_epochs` with best-validation
    selection, then a checkpoint. ``stop_after_epoch`` ends after that epoch (``stopped``).
    """
    from detjax.checkpoint import kill_point

    eval_epochs = set(protocol_eval_epochs(config.epochs, config.eval_every))
    per_epoch = math.ceil(data.train_x.shape[0] / config.batch_size)
    for epoch in range(_counter(state.epoch), config.epochs):
        done = _counter(state.position)
        losses = []
        for i, indices in enumerate(ex.batches(epoch)[done:], start=done):
            state, metrics = ex.step(state, indices)
            kill_point("step", epoch * per_epoch + i + 1)  # test hook (DETJAX_TEST_KILL_AT)
            losses.append(metrics["loss"])
            bar.update(1)
        epoch_losses = _member_means(losses, ex.members)
        bad = [v for v in epoch_losses if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"training loss became {bad[0]} in epoch {epoch}"
                                     + ("" if ex.members == 1 else f" for {len(bad)} of {ex.members} members"))
        state = state.replace(epoch=state.epoch + 1, position=jnp.zeros_like(state.position))
        lr = tx_lr(config, per_epoch, epoch)
        records = [{"epoch": epoch, "train_loss": v, "lr": lr} for v in epoch_losses]
        postfix = {"loss": f"{np.mean(epoch_losses):.4f}"}
        if epoch in eval_epochs:
            best = _validate(ex, data, config, state, best, records, epoch)
            postfix["val"] = f"{np.mean([r['val']['score'] for r in records]):.4f}"
        bar.set_postfix(**postfix)
        for history, record in zip(histories, records):
            history.append(record)
        ex.save(epoch, state, best, histories)
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            return state, best, True
    return state, best, False


# ----------------------------------------------------------------------- run records


def finish_run(run_dir: Path, config: TrainConfig, data: TaskData, run_manifest: dict, test: Mapping[str, Any],
               best: Mapping[str, Any], final_state: Mapping[str, Any], *, history: list[dict], wall: float,
               extra: Mapping[str, Any] | None = None, fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Closes a run (or member) directory and returns its ``result.json`` object.

    The result holds the test metrics, the selection (best epoch and validation score) and the
    hashes: the init digests from the running manifest, the final state's digests, the best
    weights' :func:`weights_sha256`; then ``extra``. Written in order: ``result.json``, the
    finished manifest, the ``finished`` event; ``fields`` go into the manifest and the event
    (e.g. ``execution``).
    """
    from detjax.checkpoint import kill_point

    extra, fields = extra or {}, fields or {}
    final_digests = hashing.tree_digests(final_state)
    result = {
        **{k: v for k, v in test.items() if k != "score"},
        "test_score": test["score"],
        "best_epoch": int(best["epoch"]),
        "best_val_score": float(best["score"]),
        "init_sha256": run_manifest["init_digests"]["sha256"],
        "init_md5": run_manifest["init_digests"]["md5"],
        "init_weights_sha256": run_manifest["init_weights_sha256"],
        "final_sha256": final_digests["sha256"],
        "final_md5": final_digests["md5"],
        "best_params_sha256": weights_sha256(best),
        "n_params": run_manifest["n_params"],
        "labels": list(data.labels),
        "epochs": config.epochs,
        "config_hash": config.hash(),
        "wall_time_s": wall,
        "run_dir": str(run_dir),
        **extra,
    }
    run_manifest.update(status="finished", final_digests=dict(final_digests), history=history,
                        metrics={k: v for k, v in result.items() if k != "history"}, wall_time_s=wall, **fields)
    manifest_lib.replace_record(run_dir / "result.json", result)  # keeps what it replaces
    kill_point("final-record")  # test hook: result.json written, manifest.json not yet
    manifest_lib.replace_record(run_dir / "manifest.json", run_manifest)
    manifest_lib.append_event(run_dir, "finished", final_sha256=final_digests["sha256"], wall_time_s=wall,
                              **fields)
    return result


def start_record(run_dir: Path, run_manifest: dict, *, sidecar: Mapping[str, Any] | None,
                 environment: dict) -> None:
    """Writes the running manifest and the ``started`` (or ``resumed``) event of ``run_dir``.

    A resumed run keeps its first start time and lists every resumption (checkpoint step,
    state hash, environment) under ``resumed_from``.
    """
    previous = run_dir / "manifest.json"
    if sidecar is not None:
        if previous.exists():
            earlier = json.loads(previous.read_text())
            run_manifest["started_utc"] = earlier.get("started_utc", run_manifest["started_utc"])
            run_manifest["resumed_from"] = list(earlier.get("resumed_from", []))
        run_manifest.setdefault("resumed_from", []).append(
            {"step": sidecar["step"], "state_sha256": sidecar["state_sha256"], "environment": environment})
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest_lib.replace_record(previous, run_manifest)
    if sidecar is None:
        manifest_lib.append_event(run_dir, "started", config_hash=run_manifest["config_hash"],
                                  environment=environment)
    else:
        manifest_lib.append_event(run_dir, "resumed", step=sidecar["step"], state_sha256=sidecar["state_sha256"],
                                  environment=environment)


def plot_history(config: TrainConfig, history: list[dict], run_dir: Path) -> None:
    """``training_curve.png`` of a finished run (skipped without the optional matplotlib)."""
    from detjax.plots import plot_training_curve

    plot_training_curve(history, run_dir / "training_curve.png",
                        title=f"{config.task} {config.arch} init={config.init} order={config.order}")


# ----------------------------------------------------------------------- a solo run


def _solo_executor(config: TrainConfig, data: TaskData, train_step, predict_batch, mesh: Mesh | None,
                   checkpoint: Callable) -> Executor:
    """The executor of one run: the batch is gathered on the device that holds the data inside
    the jitted step (one dispatch per step), or cut on the host and sharded over ``mesh``."""
    order_fn = _make_order_fn(config, data)
    if mesh is None:
        train_x, train_y = jax.device_put(data.train_x), jax.device_put(data.train_y)

        def step(state, idx):
            return train_step(state, jnp.asarray(idx, jnp.int32), train_x, train_y)
    else:
        def step(state, idx):
            return train_step(state, gather_batch(np.asarray(idx, np.int32), data.train_x, data.train_y))

    def update_best(best, state, improved, epoch, scores):
        return {"params": _host_copy(state.params), "batch_stats": _host_copy(state.batch_stats),
                "epoch": np.array(epoch, np.int32), "score": np.array(scores[0], np.float32)}

    return Executor(
        members=1, batches=lambda epoch: ordering.batches(order_fn(epoch), config.batch_size), step=step,
        scores=lambda variables, x: predict(predict_batch, variables, x, config.eval_batch_size)[None],
        update_best=update_best, save=checkpoint)


def make_gather_step(model: nn.Module, tx: optax.GradientTransformation, config: TrainConfig,
                     pos_weight: np.ndarray | None = None, augment: Callable | None = None) -> Callable:
    """``step(state, idx, train_x, train_y)``: :func:`make_step_fn` on the batch of ``idx``
    (:func:`gather_batch`: padding slots masked), gathered inside the one jitted program
    (state donated)."""
    step_fn = make_step_fn(model, tx, config, pos_weight, augment)
    return jax.jit(lambda state, idx, x, y: step_fn(state, gather_batch(idx, x, y)), donate_argnums=0)


def train_and_evaluate(config: TrainConfig, data: TaskData, workdir: str | Path, *,
                       model: nn.Module | None = None, resume: bool = True,
                       environment: dict | None = None, progress: bool = True,
                       augment: Callable | None = None, stop_after_epoch: int | None = None,
                       devices: int | None = 1, allow_device_change: bool = False,
                       ) -> dict[str, Any]:
    """Trains ``config`` on ``data`` and writes the run directory ``workdir``.

    Checkpoints are written after every epoch. With ``resume=True`` (default) an existing
    checkpoint of the same config is restored, verified and continued; the final state is
    then bit-identical to an uninterrupted run. ``stop_after_epoch`` ends early (used to
    test interruption) without writing results.

    ``devices`` is the data-parallel device count (``None``: all visible; see
    :func:`make_mesh`). It is not part of the config hash, but it is recorded in the manifest
    and in every checkpoint, and resuming on another count is refused unless
    ``allow_device_change`` is set, because the cross-device reduction order (and so the
    bits) depends on it.

    Returns the result dictionary also written to ``result.json``.
    """
    from detjax.checkpoint import Checkpointer

    t_start = time.perf_counter()
    workdir = Path(workdir).absolute()
    _check_run_dir(workdir, config.hash(), resume)
    finished = manifest_lib.finished_result(workdir)
    if finished is not None:  # a finished run is a record: returned as stored, never rewritten
        return finished
    run = prepare_run(config, data, model=model, environment=environment)
    if augment is None and config.augment:
        augment = task_augmentation(config, data)
    mesh = make_mesh(devices)
    run.manifest["mesh"] = mesh_description(mesh)
    run.manifest["topology"] = topology = topology_description(mesh)
    # Several processes (jax.distributed): checkpoints hold host copies (replicated, the same on
    # every process), which orbax can write from a multi-process run.
    host = _host_copy if topology["processes"] > 1 else (lambda tree: tree)
    checkpointer = Checkpointer(workdir / "checkpoints", config_hash=run.manifest["config_hash"],
                                device_count=1 if mesh is None else mesh.size,
                                allow_device_change=allow_device_change)
    state, best, history = run.init_state, initial_best(run.init_state), []
    # Restore (and verify) BEFORE touching the manifest: a refused checkpoint leaves the
    # run directory exactly as it was.
    restored = checkpointer.restore_latest(host(_state_dict(state)), host(best)) if resume else None
    sidecar = None
    if restored is not None:
        state_dict, best, sidecar = restored
        _check_topology(sidecar, topology, allow_device_change, workdir / "checkpoints")
        state = flax.serialization.from_state_dict(state, state_dict)
        history = list(sidecar.get("history", []))
    start_record(workdir, run.manifest, sidecar=sidecar, environment=run.environment)
    state = jax.device_put(state) if mesh is None else jax.device_put(state, NamedSharding(mesh, P()))

    def checkpoint(epoch, state, best, histories):
        saved = checkpointer.save(epoch + 1, host(_state_dict(state)), host(best),
                                  {"history": histories[0], "topology": topology})
        manifest_lib.append_event(workdir, "checkpoint", step=epoch + 1, state_sha256=saved["state_sha256"],
                                  best_sha256=saved["best_sha256"])

    if mesh is None:
        train_step = make_gather_step(run.model, run.tx, config, run.pos_weight, augment)
    else:
        train_step = make_train_step(run.model, run.tx, config, run.pos_weight, augment, mesh)
    predict_batch = make_predict(run.model, config)
    ex = _solo_executor(config, data, train_step, predict_batch, mesh, checkpoint)
    bar = _progress(total=config.epochs * run.batches_per_epoch, initial=_counter(state.step), enabled=progress,
                    desc=f"{config.arch}/{config.init}")
    with bar, checkpointer:
        state, best, stopped = run_epochs(ex, config, data, state, best, [history], bar=bar,
                                          stop_after_epoch=stop_after_epoch)
    if stopped:
        return {"stopped_after_epoch": _counter(state.epoch) - 1}
    return _finish_solo(run, config, data, state, best, history, predict_batch, workdir,
                        time.perf_counter() - t_start)


def _finish_solo(run: "PreparedRun", config: TrainConfig, data: TaskData, state: TrainState, best: dict,
                 history: list[dict], predict_batch, workdir: Path, elapsed: float) -> dict[str, Any]:
    """Tests the best-validation weights and writes the finished run's records."""
    t_start = time.perf_counter()
    best_variables = {"params": best["params"]}
    if best["batch_stats"]:
        best_variables["batch_stats"] = best["batch_stats"]
    test_scores = predict(predict_batch, best_variables, data.test_x, config.eval_batch_size)
    test = data.evaluate(data.test_y, test_scores)
    extra: dict[str, Any] = {}
    if data.post_evaluate is not None:
        extra = data.post_evaluate(
            lambda x: predict(predict_batch, best_variables, np.asarray(x), config.eval_batch_size), test_scores)
    result = finish_run(workdir, config, data, run.manifest, test, best, _state_dict(state), history=history,
                        wall=elapsed + time.perf_counter() - t_start, extra=extra)
    plot_history(config, history, workdir)
    return result


@dataclasses.dataclass
class PreparedRun:
    """What every run of ``config`` on ``data`` needs before its first step (see :func:`prepare_run`)."""

    model: nn.Module
    tx: optax.GradientTransformation
    pos_weight: np.ndarray | None
    batches_per_epoch: int
    init_state: TrainState
    environment: dict
    manifest: dict


def prepare_run(config: TrainConfig, data: TaskData, *, model: nn.Module | None = None,
                environment: dict | None = None) -> PreparedRun:
    """The model, optimiser, class weights, initial state and its hashes, and the running
    manifest (config, data fingerprint, environment, init hashes and per-layer assignment)."""
    from detjax.models import count_params

    model, environment = model_and_environment(config, data, model, environment)
    batches_per_epoch = math.ceil(data.train_x.shape[0] / config.batch_size)
    tx = make_optimizer(config, batches_per_epoch)
    init_state = create_train_state(model, tx, data.train_x[:1], config.seed)
    init_dict = _state_dict(init_state)
    n_params = count_params(init_state.params)
    run_manifest = new_run_manifest(config, data, environment, init_dict, n_params,
                                    init_assignment(model, data.train_x[:1]))
    return PreparedRun(model=model, tx=tx, batches_per_epoch=batches_per_epoch,
                       pos_weight=pos_weights(data.train_y) if config.loss == "weighted_bce" else None,
                       init_state=init_state, environment=environment, manifest=run_manifest)


def model_and_environment(config: TrainConfig, data: TaskData, model: nn.Module | None,
                          environment: dict | None) -> tuple[nn.Module, dict]:
    """``model`` or the config's model for ``data``'s labels; ``environment`` or this process's
    fingerprint (the defaults of every run driver)."""
    if environment is None:
        from detjax.determinism import environment_fingerprint
        environment = environment_fingerprint()
    if model is None:
        from detjax.models import get_model
        model = get_model(config.arch, num_classes=len(data.labels), init_mode=config.init,
                          variant=config.variant, **dict(config.model))
    return model, environment


def new_run_manifest(config: TrainConfig, data: TaskData, environment: dict, init_dict: dict, n_params: int,
                     assignment: list[dict[str, Any]]) -> dict[str, Any]:
    """The running manifest of one run (or member) from its initial state dict."""
    run_manifest = manifest_lib.new_manifest(
        config=config.to_dict(), config_hash=config.hash(), data_fingerprint=data.fingerprint(),
        environment=environment, init_digests=hashing.tree_digests(init_dict), n_params=n_params,
        data_info=data.info)
    run_manifest["init_weights_sha256"] = weights_sha256(init_dict)
    run_manifest["init_assignment"] = assignment
    return run_manifest


def tx_lr(config: TrainConfig, steps_per_epoch: int, epoch: int) -> float:
    """The learning rate used during ``epoch`` (for the history)."""
    return float(cosine_per_epoch(config.learning_rate, config.cosine_epochs, steps_per_epoch)(
        epoch * steps_per_epoch))


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step",
                dynamic_ncols=True)
