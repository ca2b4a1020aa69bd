"""Tasks: turn a :class:`~detjax.train.TrainConfig` into :class:`~detjax.train.TaskData`.

A config names its task (``config.task``) and the task's data options (``config.data``),
so a run can be re-created from its manifest alone (``python -m detjax verify``).

* ``synthetic``: ECG-shaped signals generated from a seed with numpy's PCG64 (identical on
  every platform), labels tied to the signal content so the task is learnable. Used by the
  tests, the CPU/GPU bitwise check and full-size timing runs (e.g. 17,418 × 1000 × 12).
* ``ptbxl``: PTB-XL rhythm classification (:mod:`detjax.data.ptbxl`).
* ``medmnist``: MedMNIST 2-D sets (:mod:`detjax.data.medmnist`).
* ``cinc2017``: PhysioNet/CinC 2017 single-lead AF classification, 4 classes N/A/O/~
  (:mod:`detjax.data.cinc2017`); use ``arch="conformer", model={"in_leads": 1}, loss="ce"``.
* ``af_transfer``: binary AF on one dataset's harmonised lead-I windows (CinC 2017 or
  PTB-XL), evaluated after training on the other dataset's test records
  (:mod:`detjax.transfer`); use ``model={"in_leads": 1}``, a BCE loss.

``ptbxl`` and ``cinc2017`` accept ``fold_split`` (``{"train", "val", "test"}``
fold lists, :mod:`detjax.cv`) for K-fold CV. Every task but ``synthetic`` adds a classical
floor (:mod:`detjax.floor`) to ``result.json`` under ``"floor"``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from detjax import metrics, ordering
from detjax.train import TaskData, TrainConfig

__all__ = ["make_synthetic_ecg", "load_task", "TASKS"]


def make_synthetic_ecg(n: int, *, length: int = 1000, leads: int = 12, num_classes: int = 12,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: ``x (n, length, leads)`` float32, ``y (n, num_classes)`` float32 in {0, 1}.

    Each sample is white noise plus, for every positive class c, a sinusoid of frequency
    ``2 + c`` cycles per window on a class-specific lead, so a model can learn the labels.
    Class c is positive with probability ``0.5 / (1 + c)`` (rare classes, as in PTB-XL).
    """
    if n < 1 or length < 8 or leads < 1 or num_classes < 1:
        raise ValueError(f"invalid synthetic shape n={n}, length={length}, leads={leads}, classes={num_classes}")
    rng = np.random.Generator(np.random.PCG64(seed))
    prevalence = 0.5 / (1.0 + np.arange(num_classes))
    y = (rng.random((n, num_classes)) < prevalence).astype(np.float32)
    t = np.arange(length, dtype=np.float64) / length
    x = rng.standard_normal((n, length, leads)) * 0.5
    for c in range(num_classes):
        wave = np.sin(2 * np.pi * (2 + c) * t)
        x[:, :, c % leads] += y[:, c:c + 1] * wave[None, :]
    return x.astype(np.float32), y


def _multilabel_evaluator(labels) -> Callable[[np.ndarray, np.ndarray], dict]:
    return lambda y_true, scores: metrics.multilabel_auc_report(y_true, scores, labels)


def _floor_hook(data_x, data_y, test_x, test_y, evaluate, *, kind: str, multilabel: bool, num_classes: int):
    """``TaskData.post_evaluate`` adding ``{"floor": floor_report(...)}`` (train split -> test split)."""

    def post_evaluate(predict, test_scores):
        from detjax import floor

        return {"floor": floor.floor_report(data_x, data_y, test_x, test_y, evaluate, kind=kind,
                                            multilabel=multilabel, num_classes=num_classes)}

    return post_evaluate


def _from_splits(arrays, *, labels, evaluate, info, floor: dict | None = None, content_order: bool = True,
                 **extra) -> TaskData:
    """:class:`TaskData` from ``arrays["x_train"], ["y_train"], ["x_val"], …``. ``floor``: the
    classical floor's ``kind`` and ``multilabel`` (trained on the train split, scored on the
    test split, :func:`_floor_hook`); ``content_order``: golden order keyed by the training
    signals' content (:func:`detjax.ordering.golden_content_keys`), else by index."""
    labels = tuple(labels)
    if floor is not None:
        extra["post_evaluate"] = _floor_hook(arrays["x_train"], arrays["y_train"], arrays["x_test"],
                                             arrays["y_test"], evaluate, num_classes=len(labels), **floor)
    return TaskData(
        train_x=arrays["x_train"], train_y=arrays["y_train"], val_x=arrays["x_val"], val_y=arrays["y_val"],
        test_x=arrays["x_test"], test_y=arrays["y_test"], labels=labels, evaluate=evaluate,
        order_keys=ordering.golden_content_keys(arrays["x_train"]) if content_order else None, info=info, **extra)


def _check_options(task: str, opts: Mapping[str, Any], known: set[str], required: tuple[str, ...] = ()) -> None:
    """A ``ValueError`` naming ``task``'s unknown or missing data options and the known ones."""
    unknown, missing = sorted(set(opts) - known), [k for k in required if k not in opts]
    if unknown:
        raise ValueError(f"unknown {task} data options {unknown}; known: {sorted(known)}")
    if missing:
        raise ValueError(f"{task} data options must include {missing}; known: {sorted(known)}")


def _synthetic(config: TrainConfig) -> TaskData:
    opts = {"n_train": 256, "n_val": 64, "n_test": 64, "length": 1000, "leads": 12, "num_classes": 12,
            "seed": 0, **dict(config.data)}
    _check_options("synthetic", opts, {"n_train", "n_val", "n_test", "length", "leads", "num_classes", "seed"})
    n_total = opts["n_train"] + opts["n_val"] + opts["n_test"]
    x, y = make_synthetic_ecg(n_total, length=opts["length"], leads=opts["leads"],
                              num_classes=opts["num_classes"], seed=opts["seed"])
    a, b = opts["n_train"], opts["n_train"] + opts["n_val"]
    labels = tuple(f"class{c}" for c in range(opts["num_classes"]))
    return TaskData(train_x=x[:a], train_y=y[:a], val_x=x[a:b], val_y=y[a:b], test_x=x[b:], test_y=y[b:],
                    labels=labels, evaluate=_multilabel_evaluator(labels),
                    order_keys=ordering.golden_content_keys(x[:a]),
                    info={"source": "synthetic", **opts})


def _ptbxl(config: TrainConfig) -> TaskData:
    from detjax.data import ptbxl

    opts = dict(config.data)
    prepared = ptbxl.prepare_ptbxl(**opts)
    labels = tuple(prepared["labels"])
    info = {k: v for k, v in prepared.items()
            if k in ("lead_names", "sampling_rate", "cv_fold", "n", "counts", "norm", "source", "limit")}
    if "fold_split" in opts:
        info["folds"] = prepared["folds"]
    return _from_splits(prepared, labels=labels, evaluate=_multilabel_evaluator(labels), info=info,
                        floor={"kind": "ecg", "multilabel": True})


def _medmnist(config: TrainConfig) -> TaskData:
    from detjax.data import augment as augment_lib
    from detjax.data import medmnist as mm

    opts = dict(config.data)
    _check_options("medmnist", opts, {"flag", "data_dir", "size", "limit"}, required=("flag",))
    ds = mm.load_medmnist(opts["flag"], opts.get("data_dir"), size=opts.get("size", 28), limit=opts.get("limit"))
    task = ds.task
    multilabel = task == "multi-label, binary-class"
    if multilabel != (config.loss != "ce"):
        raise ValueError(f"{ds.flag} is a {task!r} task: use loss={'bce' if multilabel else 'ce'}, not {config.loss!r}")
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"x_{split}"] = mm.preprocess(getattr(ds, f"{split}_images"))
        labels = getattr(ds, f"{split}_labels")
        arrays[f"y_{split}"] = labels.astype(np.float32) if multilabel else labels.astype(np.int32)
    class_names = tuple(ds.info.labels)

    def evaluate(y_true, scores):
        out = mm.evaluate(y_true, scores, task)
        # Selection on the validation split maximises AUC, the evaluator's headline metric.
        return {"score": out["auc"], **out}

    seed = config.seed

    def augment(x, index, epoch):
        return augment_lib.augment_batch(x, index, epoch, seed)

    return _from_splits(
        arrays, labels=class_names, evaluate=evaluate, content_order=False, augment=augment,
        seeded_augment=augment_lib.augment_batch, floor={"kind": "image", "multilabel": multilabel},
        info={"source": "medmnist", "flag": ds.flag, "size": ds.size, "task": task, "path": str(ds.path),
              "data_source": dict(ds.data_source), "md5": ds.md5, "content_sha256": ds.sha256,
              "n": {k[2:]: int(v.shape[0]) for k, v in arrays.items() if k.startswith("x_")},
              "limit": opts.get("limit")})


def _cinc2017(config: TrainConfig) -> TaskData:
    from detjax.data import cinc2017

    opts = dict(config.data)
    _check_options("cinc2017", opts, {"data_dir", "window_seconds", "sampling_rate", "reference", "cv_fold", "folds",
                                      "limit", "fold_split"})
    if config.loss != "ce":
        raise ValueError(f"cinc2017 is a single-label 4-class task (N, A, O, ~): use loss='ce', not {config.loss!r}")
    # data_dir None: $DETJAX_CINC2017_DIR, else a ValueError naming both (no vendored copy).
    prepared = cinc2017.load_cinc2017(opts.pop("data_dir", None), **opts)
    info = {k: prepared[k] for k in ("sampling_rate", "window_seconds", "window_length", "cv_fold", "folds", "n",
                                     "counts", "padded", "norm", "source", "limit")}
    return _from_splits(prepared, labels=prepared["labels"], evaluate=cinc2017.evaluate, info=info,
                        floor={"kind": "ecg", "multilabel": False})


def _af_transfer(config: TrainConfig) -> TaskData:
    from detjax import transfer

    opts = dict(config.data)
    _check_options("af_transfer", opts, {"source", "target", "cinc_dir", "ptbxl_dir", "baseline", "cinc_noisy",
                                         "limit", "fold_split", "cinc_folds"}, required=("source", "target"))
    if config.loss not in ("weighted_bce", "bce"):
        raise ValueError(f"af_transfer is a binary AF task with one sigmoid output: use loss='weighted_bce' "
                         f"or 'bce', not {config.loss!r}")
    p = transfer.prepare_transfer(**opts)
    info = p["info"]

    def post_evaluate(predict, test_scores):
        from detjax import floor

        report = transfer.transfer_report(source=info["source"], target=info["target"], target_y=p["target_y"],
                                          target_scores=predict(p["target_x"])[:, 0], val_y=p["y_val"],
                                          val_scores=predict(p["x_val"])[:, 0])
        report["all_target_records"] = transfer.all_records_report(
            p["target_all_y"], predict(p["target_all_x"])[:, 0], report["threshold"])
        base = floor.floor_report(p["x_train"], p["y_train"], p["x_test"], p["y_test"], transfer.af_evaluate,
                                  kind="ecg", multilabel=True, num_classes=1,
                                  extra_eval={"target": p["target_x"], "val": p["x_val"], "all": p["target_all_x"]})
        scores = base.pop("scores", None)
        if scores is not None:
            base["transfer"] = transfer.transfer_report(
                source=info["source"], target=info["target"], target_y=p["target_y"],
                target_scores=scores["target"][:, 0], val_y=p["y_val"], val_scores=scores["val"][:, 0])
            base["transfer"]["all_target_records"] = transfer.all_records_report(
                p["target_all_y"], scores["all"][:, 0], base["transfer"]["threshold"])
        return {"transfer": report, "floor": base}

    return _from_splits(p, labels=("AF",), evaluate=transfer.af_evaluate, info=info, post_evaluate=post_evaluate)


TASKS: dict[str, Callable[[TrainConfig], TaskData]] = {
    "synthetic": _synthetic,
    "ptbxl": _ptbxl,
    "medmnist": _medmnist,
    "cinc2017": _cinc2017,
    "af_transfer": _af_transfer,
}


def load_task(config: TrainConfig) -> TaskData:
    """The :class:`TaskData` for ``config.task`` with ``config.data`` options."""
    try:
        loader = TASKS[config.task]
    except KeyError:
        raise ValueError(f"unknown task {config.task!r}; known tasks: {sorted(TASKS)}") from None
    return loader(config)
