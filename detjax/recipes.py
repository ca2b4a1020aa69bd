"""Recipes: one plain function per task, from a few named arguments to a validated config.

A recipe is the only place that knows a task's protocol (model, optimiser, learning rate,
loss, evaluation cadence, data options); every entry point builds its
:class:`~detjax.train.TrainConfig` here, so the same recipe gives the same config, and the
same config hash, from ``experiments/*.py``, from a seed study and from ``verify``::

    from detjax import recipes
    config = recipes.get_config("ptbxl", init="mixed", epochs=20)
    config = recipes.ptbxl(leads="limb", init="hartley")      # the same, by function

Data options are written out in full (``None`` where a default applies: the vendored sample
for PTB-XL and MedMNIST), and data folders are made absolute, so that the config alone
re-creates the data. The data a config names are loaded by :func:`detjax.tasks.load_task`;
the manifest's ``data_info`` adds how the loader found its folder (``data_source``: argument,
environment variable or vendored copy) and the digest of what it read (``content_sha256``),
which, unlike the absolute path, identifies the data on every machine.
``limit`` means the same for every task (:mod:`detjax.data.splits`): the first N records of
each split, cut after the split and after the normalisation statistics of the whole training
split, so a limited run's arrays are the first rows of the unlimited run's.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from detjax.train import TrainConfig

__all__ = ["ptbxl", "cinc2017", "medmnist", "synthetic", "af_transfer", "RECIPES", "get_config"]


def _absolute(folder: str | Path | None) -> str | None:
    return None if folder is None else str(Path(folder).expanduser().absolute())


def _cinc_dir(folder: str | Path | None, option: str) -> str:
    """The CinC 2017 folder, absolute: ``folder``, else ``$DETJAX_CINC2017_DIR`` read here (so the
    config records it either way; there is no vendored copy), else a ``ValueError``."""
    from detjax.data.cinc2017 import ENV_DATA_DIR

    folder = folder or os.environ.get(ENV_DATA_DIR)
    if not folder:
        raise ValueError(f"no CinC 2017 data folder: pass {option} DIR or set {ENV_DATA_DIR}=DIR "
                         f"(get the data with `python -m detjax.data.cinc2017 download DEST`)")
    return _absolute(folder)


def _fixup(arch: str, transformer_fixup: bool) -> dict[str, Any]:
    """The Conformer's wider fixup reading, recorded only when asked for (the default is the
    released one and stays out of the config, so existing config hashes stand)."""
    if not transformer_fixup:
        return {}
    if arch != "conformer":
        raise ValueError(f"transformer_fixup applies to the conformer only, not arch {arch!r}")
    return {"transformer_fixup": True}


def ptbxl(*, init: str = "mixed", arch: str = "conformer", seed: int = 0, epochs: int = 85,
          order: str = "golden", variant: str = "reference", leads: str | Sequence[str] | None = None,
          data_dir: str | Path | None = None, cv_fold: int = 0, limit: int | None = None,
          batch_size: int = 128, eval_every: int = 10, transformer_fixup: bool = False) -> TrainConfig:
    """PTB-XL rhythm classification (12 labels): Adam 1e-3, cosine over ``epochs`` stepped per
    epoch, class-weighted BCE with logits clamped to ±50, validation every 10 epochs.

    ``leads``: ``None`` (all 12), a preset (``"limb"``: I, II, III, AVR, AVL, AVF) or a list of
    names; the model's input width follows the resolved leads. ``data_dir=None`` is the
    vendored 500-record sample.
    """
    from detjax.data.ptbxl import LEAD_PRESETS, resolve_leads

    if isinstance(leads, str) and leads.lower() not in LEAD_PRESETS:  # "I,II,V1" or one lead
        leads = [name.strip() for name in leads.split(",") if name.strip()]
    elif isinstance(leads, tuple):
        leads = list(leads)
    in_leads = len(resolve_leads(leads))
    data = {"data_dir": _absolute(data_dir), "leads": leads, "cv_fold": cv_fold, "limit": limit}
    return TrainConfig(task="ptbxl", data=data, arch=arch, model={"in_leads": in_leads, **_fixup(arch, transformer_fixup)},
                       init=init, variant=variant, order=order, seed=seed, epochs=epochs, batch_size=batch_size,
                       optimizer="adam", learning_rate=1e-3, loss="weighted_bce", eval_every=eval_every)


def cinc2017(*, data_dir: str | Path | None = None, init: str = "mixed", arch: str = "conformer", seed: int = 0,
             epochs: int = 85, order: str = "golden", variant: str = "reference", window_seconds: float = 10.0,
             sampling_rate: int = 100, reference: str = "REFERENCE-v3.csv", cv_fold: int = 0,
             limit: int | None = None, batch_size: int = 128, eval_every: int = 10,
             transformer_fixup: bool = False) -> TrainConfig:
    """PhysioNet/CinC 2017 AF classification (N, A, O, ~) from one lead: the single-lead
    Conformer (or baseline), Adam 1e-3, cosine, cross-entropy, validation every 10 epochs.

    ``data_dir``: the folder with the records; ``None`` reads it from ``$DETJAX_CINC2017_DIR``
    here, so the folder is recorded in the config either way (there is no vendored copy).
    """
    data = {"data_dir": _cinc_dir(data_dir, "--data-dir"), "window_seconds": window_seconds,
            "sampling_rate": sampling_rate, "reference": reference, "cv_fold": cv_fold, "limit": limit}
    return TrainConfig(task="cinc2017", data=data, arch=arch, model={"in_leads": 1, **_fixup(arch, transformer_fixup)},
                       init=init, variant=variant, order=order, seed=seed, epochs=epochs, batch_size=batch_size,
                       optimizer="adam", learning_rate=1e-3, loss="ce", eval_every=eval_every)


def medmnist(*, flag: str, init: str = "dct", seed: int = 0, epochs: int = 200,
             order: str = "golden", variant: str = "reference", data_dir: str | Path | None = None,
             size: int = 28, limit: int | None = None, width: int | None = None, batch_size: int = 128,
             eval_every: int = 1, augment: bool = True) -> TrainConfig:
    """A 2-D MedMNIST set with ResNet-18 (28×28): SGD 0.1, momentum 0.9, weight decay 5e-4,
    cosine, crop + flip augmentation, cross-entropy (BCE for multi-label ChestMNIST),
    selection on validation AUC every epoch.

    ``init="kaiming"`` means He-normal here, ResNet-18's seeded baseline (this is the one place
    that maps the name). ``width`` < 64 gives a reduced ResNet for CPU studies.
    """
    from detjax.data.medmnist import dataset_info

    flag = flag.lower()
    info = dataset_info(flag)
    model = {"in_channels": info.n_channels, **({} if width is None else {"width": width})}
    loss = "bce" if info.task == "multi-label, binary-class" else "ce"
    data = {"flag": flag, "data_dir": _absolute(data_dir), "size": size, "limit": limit}
    return TrainConfig(task="medmnist", data=data, arch="resnet18", model=model,
                       init="he_normal" if init == "kaiming" else init, variant=variant, order=order, seed=seed,
                       epochs=epochs, batch_size=batch_size, optimizer="sgd", learning_rate=0.1, momentum=0.9,
                       weight_decay=5e-4, loss=loss, eval_every=eval_every, augment=augment)


def synthetic(*, init: str = "mixed", arch: str = "tiny", seed: int = 0, epochs: int = 3, order: str = "golden",
              variant: str = "reference", n_train: int = 256, n_val: int = 64, n_test: int = 64,
              length: int = 1000, leads: int = 12, num_classes: int = 12, data_seed: int = 0,
              batch_size: int = 32, eval_every: int = 1) -> TrainConfig:
    """ECG-shaped synthetic signals (tests, smoke runs, timing): the tiny model, Adam 1e-3,
    class-weighted BCE, validation every epoch. ``data_seed`` generates the data; ``seed``
    drives the run (init, dropout, seeded order)."""
    data = {"n_train": n_train, "n_val": n_val, "n_test": n_test, "length": length, "leads": leads,
            "num_classes": num_classes, "seed": data_seed}
    return TrainConfig(task="synthetic", data=data, arch=arch, model={}, init=init, variant=variant, order=order,
                       seed=seed, epochs=epochs, batch_size=batch_size, optimizer="adam", learning_rate=1e-3,
                       loss="weighted_bce", eval_every=eval_every)


def af_transfer(*, source: str, target: str, cinc_dir: str | Path | None = None, ptbxl_dir: str | Path | None = None,
                init: str = "mixed", arch: str = "conformer", seed: int = 0, epochs: int = 20, order: str = "golden",
                variant: str = "reference", baseline: str = "highpass", cinc_noisy: str = "exclude",
                limit: int | None = None, batch_size: int = 128, eval_every: int = 1) -> TrainConfig:
    """Binary AF on one dataset's harmonised lead-I windows (``source``: ``"cinc2017"`` or
    ``"ptbxl"``), evaluated zero-shot on the other's test records (:mod:`detjax.transfer`):
    the single-lead model, Adam 1e-3, class-weighted BCE, validation every epoch.

    ``cinc_dir=None`` reads ``$DETJAX_CINC2017_DIR`` here (recorded absolute); ``ptbxl_dir=None``
    is the vendored sample. ``baseline`` is the baseline removal applied to every dataset.
    """
    if source == target:
        raise ValueError(f"source and target name the same dataset ({source}); transfer needs two")
    data = {"source": source, "target": target, "cinc_dir": _cinc_dir(cinc_dir, "--cinc-dir"),
            "ptbxl_dir": _absolute(ptbxl_dir), "baseline": baseline, "cinc_noisy": cinc_noisy, "limit": limit}
    return TrainConfig(task="af_transfer", data=data, arch=arch, model={"in_leads": 1}, init=init, variant=variant,
                       order=order, seed=seed, epochs=epochs, batch_size=batch_size, optimizer="adam",
                       learning_rate=1e-3, loss="weighted_bce", eval_every=eval_every)


RECIPES: dict[str, Callable[..., TrainConfig]] = {
    "ptbxl": ptbxl, "cinc2017": cinc2017, "medmnist": medmnist, "synthetic": synthetic, "af_transfer": af_transfer,
}


def get_config(task: str, **arguments: Any) -> TrainConfig:
    """The config of ``task``'s recipe with ``arguments``; ``"medmnist:<flag>"`` names the set.

    Unknown arguments are refused with the list the recipe takes. Arguments that are
    ``None`` are dropped, so callers can pass optional flags through unchanged.
    """
    task, _, flag = task.partition(":")
    if task not in RECIPES:
        raise ValueError(f"unknown task {task!r}; recipes exist for {sorted(RECIPES)}")
    recipe = RECIPES[task]
    if flag:
        if task != "medmnist":
            raise ValueError(f"task {task!r} takes no ':' suffix (only medmnist:<flag> does)")
        arguments = {"flag": flag, **arguments}
    arguments = {k: v for k, v in arguments.items() if v is not None}
    parameters = inspect.signature(recipe).parameters
    unknown = sorted(set(arguments) - set(parameters))
    if unknown:
        raise ValueError(f"the {task} recipe takes no argument(s) {unknown}; it takes {list(parameters)}")
    missing = [n for n, p in parameters.items() if p.default is inspect.Parameter.empty and n not in arguments]
    if missing:
        hint = " (name the set: medmnist:<flag>, e.g. medmnist:breastmnist)" if missing == ["flag"] else ""
        raise ValueError(f"the {task} recipe needs {missing}{hint}")
    return recipe(**arguments)
