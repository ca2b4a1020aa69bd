"""Models of detjax and their registry.

``get_model(arch, **kwargs)`` builds a model by name; ``ARCHS`` lists the names available.

* ``"conformer"`` → :class:`~detjax.models.conformer.ECGConformer` (1,827,634 parameters)
* ``"baseline"`` → :class:`~detjax.models.baseline.ECGBaselineCNN` (1,653,772 parameters)
* ``"resnet18"`` → ``detjax.models.resnet.ResNet18`` (MedMNIST), imported lazily and listed
  only when that module exists.
* ``"tiny"`` → ``detjax.models.tiny.TinyECG``, a small ECG-shaped model for tests and smoke runs.

PyTorch-layout export: :func:`detjax.models.export.to_torch_state_dict`.

All models map ``(B, ..., C)`` channel-last input to logits ``(B, num_classes)`` and take
every kernel/bias initialiser from :mod:`detjax.initializers` by explicit stage.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from typing import Any

import jax
import numpy as np

from detjax.models.baseline import ECGBaselineCNN
from detjax.models.conformer import ECGConformer

# name -> (module, class). Modules are imported on first use.
_REGISTRY: dict[str, tuple[str, str]] = {
    "conformer": ("detjax.models.conformer", "ECGConformer"),
    "baseline": ("detjax.models.baseline", "ECGBaselineCNN"),
    # small ECG-shaped model for tests, smoke runs and the CPU bitwise check
    "tiny": ("detjax.models.tiny", "TinyECG"),
    # --- resnet18 (MedMNIST): provided by detjax/models/resnet.py, written separately. ---
    # Imported lazily so this package works while that module is absent.
    "resnet18": ("detjax.models.resnet", "ResNet18"),
}


def _available(arch: str) -> bool:
    module = _REGISTRY[arch][0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


ARCHS: tuple[str, ...] = tuple(a for a in _REGISTRY if _available(a))

# ResNet18 is reachable as an attribute (lazily) but not star-exported: it may be absent.
__all__ = ["ARCHS", "get_model", "inits_for", "count_params", "ECGConformer", "ECGBaselineCNN"]


def get_model(arch: str, **kwargs: Any):
    """The model ``arch`` (one of :data:`ARCHS`) constructed with ``kwargs``.

    Example: ``model = get_model("conformer", init="dct", variant="orthonormal")``.

    ``init=`` is accepted as the public name of the initialisation (as in the paper and the
    run configs) and passed as the model field ``init_mode``: a Flax field named ``init``
    would shadow ``Module.init``. Raises ``ValueError`` naming ``arch`` if it is unknown
    or its module is missing.
    """
    if arch not in _REGISTRY:
        raise ValueError(f"unknown model arch {arch!r}; available: {ARCHS}")
    module_name, class_name = _REGISTRY[arch]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:  # a genuine import error inside the module
            raise
        raise ValueError(f"model arch {arch!r} needs {module_name}, which is not installed") from err
    cls = getattr(module, class_name)
    if "init" in kwargs and "init" not in _field_names(cls):
        if "init_mode" in kwargs:
            raise ValueError(f"get_model({arch!r}): give init or init_mode, not both")
        kwargs["init_mode"] = kwargs.pop("init")
    return cls(**kwargs)


def inits_for(arch: str) -> tuple[str, ...]:
    """The initialisation names model ``arch`` accepts (see :data:`detjax.initializers.INITS`)."""
    import detjax.initializers as di
    from detjax.models import layers

    if arch not in _REGISTRY:
        raise ValueError(f"unknown model arch {arch!r}; available: {ARCHS}")
    if arch == "resnet18":
        return di.MIXED_INITS + tuple(di.BASES) + ("he_normal",)
    if arch == "tiny":
        return tuple(di.INITS)
    return layers.ECG_INIT_MODES


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def count_params(tree: Any) -> int:
    """Total number of elements over the leaves of ``tree`` (e.g. ``variables["params"]``).

    Works on arrays and on ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape`` output).
    """
    return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree)))


def __getattr__(name: str):  # PEP 562: ``from detjax.models import ResNet18`` imports lazily
    if name == "ResNet18":
        return getattr(importlib.import_module("detjax.models.resnet"), "ResNet18")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
