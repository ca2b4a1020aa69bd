"""Export ECG model variables to PyTorch ``state_dict`` names, layouts and order.

:func:`to_torch_state_dict` returns an ``OrderedDict[name, np.ndarray]`` that a PyTorch
module with the same structure would produce with ``model.state_dict()`` (converted to
numpy): registration order, PyTorch layouts, ``.weight`` / ``.bias`` names. It is also the
input :func:`detjax.hashing.ordered_digests` expects for a hash in PyTorch order.

Layouts: conv kernel Flax ``(k, in/groups, out)`` → ``(out, in/groups, k)``; dense kernel
``(in, out)`` → ``(out, in)``; LayerNorm ``scale``/``bias`` → ``weight``/``bias``;
BatchNorm ``scale``, ``bias`` and statistics ``mean``, ``var`` → ``weight``, ``bias``,
``running_mean``, ``running_var`` (our BatchNorm keeps PyTorch's unbiased running
variance, so the numbers mean the same). ``num_batches_tracked`` (an int64 buffer PyTorch
uses only when ``momentum=None``) is not tracked by Flax; it is omitted unless
``num_batches_tracked=`` gives a value, and PyTorch's ``load_state_dict`` accepts a
state dict without it.

Names (the Flax module ``name_i_j`` is PyTorch's ``name.i.j``):

* Conformer: ``stem.{0,2,4}`` (Sequential of Conv, GELU, ...), ``stages.s.b.{conv1,conv2,
  conv3,norm}``, ``down``, ``blocks.i.{ffn1.{norm,fc1,fc2}, attn.{norm,qkv,proj},
  conv.{norm,dw,pw}, ffn2.{...}, norm}``, ``bottleneck``, ``heads.k`` — 1×1 convs
  (``conv1``, ``conv3``, ``qkv``, ``proj``, ``pw``) are ``Conv1d`` weights ``(out, in, 1)``,
  the FFN layers and heads are ``Linear`` weights ``(out, in)``; ``heads.k.weight`` is
  ``(1, K+2)``.
* Baseline: ``stem.{conv,bn}``, ``stages.s.i.{conv,bn}`` (``stages.1.0`` and
  ``stages.2.0`` are the stride-2 transition convs, the rest residual blocks),
  ``head.1`` and ``head.4`` (``Sequential(Dropout, Linear, ReLU, Dropout, Linear)``).
* ResNet-18: torchvision's names and order, ``conv1``, ``bn1``,
  ``layerS.B.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}``, ``fc``; 2-D kernels
  ``(kh, kw, in, out)`` → ``(out, in, kh, kw)``, no conv biases.

:func:`from_torch_state_dict` is the inverse (Flax variables from such a state dict).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from detjax.models import baseline as _baseline
from detjax.models import conformer as _conformer

__all__ = ["to_torch_state_dict", "from_torch_state_dict", "torch_layout", "EXPORT_ARCHS"]

# A layout entry: (Flax module path, kind); kind is "conv", "dense", "ln" or "bn".
Layout = list[tuple[tuple[str, ...], str]]


def _conformer_layout(has: Callable[[tuple[str, ...]], bool]) -> Layout:
    out: Layout = [(("stem_0",), "conv"), (("stem_2",), "conv"), (("stem_4",), "conv")]
    for s, depth in enumerate(_conformer.STAGE_DEPTHS):
        for b in range(depth):
            block = f"stages_{s}_{b}"
            out += [((block, "conv1"), "conv"), ((block, "conv2"), "conv"),
                    ((block, "conv3"), "conv"), ((block, "norm"), "ln")]
    out.append((("down",), "conv"))
    for i in range(_conformer.NUM_TRANSFORMER_BLOCKS):
        block = f"blocks_{i}"
        ffn = lambda name: [((block, name, "norm"), "ln"), ((block, name, "fc1"), "dense"),  # noqa: E731
                            ((block, name, "fc2"), "dense")]
        out += ffn("ffn1")
        out += [((block, "attn", "norm"), "ln"), ((block, "attn", "qkv"), "conv"),
                ((block, "attn", "proj"), "conv")]
        out += [((block, "conv", "norm"), "ln"), ((block, "conv", "dw"), "conv"),
                ((block, "conv", "pw"), "conv")]
        out += ffn("ffn2")
        out.append(((block, "norm"), "ln"))
    out.append((("bottleneck",), "dense"))
    k = 0
    while has((f"heads_{k}",)):  # one head per class
        out.append(((f"heads_{k}",), "dense"))
        k += 1
    return out


def _baseline_layout(has: Callable[[tuple[str, ...]], bool]) -> Layout:
    del has  # no optional modules
    out: Layout = [(("stem", "conv"), "conv"), (("stem", "bn"), "bn")]
    in_width = _baseline.STEM_WIDTH
    for s, (width, depth) in enumerate(zip(_baseline.STAGE_WIDTHS, _baseline.STAGE_DEPTHS)):
        count = depth + (width != in_width)  # + the transition conv
        for i in range(count):
            out += [((f"stages_{s}_{i}", "conv"), "conv"), ((f"stages_{s}_{i}", "bn"), "bn")]
        in_width = width
    out += [(("head_1",), "dense"), (("head_4",), "dense")]
    return out


def _resnet18_layout(has: Callable[[tuple[str, ...]], bool]) -> Layout:
    """torchvision order: conv1, bn1, layer1..4 (conv1, bn1, conv2, bn2, downsample.{0,1}), fc."""
    out: Layout = [(("conv1",), "conv2d"), (("bn1",), "bn")]
    for s in range(1, 5):
        for b in range(2):
            block = f"layer{s}_{b}"
            out += [((block, "conv1"), "conv2d"), ((block, "bn1"), "bn"),
                    ((block, "conv2"), "conv2d"), ((block, "bn2"), "bn")]
            if has((block, "downsample_0")):  # only where the shape changes
                out += [((block, "downsample_0"), "conv2d"), ((block, "downsample_1"), "bn")]
    out.append((("fc",), "dense"))
    return out


# One layout per exportable arch (a new model adds its layout here).
_LAYOUTS = {"conformer": _conformer_layout, "baseline": _baseline_layout, "resnet18": _resnet18_layout}
EXPORT_ARCHS = tuple(_LAYOUTS)

# Per kind: (torch suffix, Flax collection, Flax leaf name).
_ENTRIES = {
    "conv": (("weight", "params", "kernel"), ("bias", "params", "bias")),
    "conv2d": (("weight", "params", "kernel"),),  # bias-free (ResNet-18)
    "dense": (("weight", "params", "kernel"), ("bias", "params", "bias")),
    "ln": (("weight", "params", "scale"), ("bias", "params", "bias")),
    "bn": (("weight", "params", "scale"), ("bias", "params", "bias"),
           ("running_mean", "batch_stats", "mean"), ("running_var", "batch_stats", "var")),
}


def _torch_prefix(path: tuple[str, ...]) -> str:
    """``("stages_0_1", "conv1")`` → ``"stages.0.1.conv1"``."""
    return ".".join(re.sub(r"_(\d+)", r".\1", part) for part in path)


# Flax kernel axes -> PyTorch weight axes, per kind.
_TO_TORCH_AXES = {
    "conv": (2, 1, 0),  # (k, in, out) -> (out, in, k)
    "conv2d": (3, 2, 0, 1),  # (kh, kw, in, out) -> (out, in, kh, kw)
    "dense": (1, 0),  # (in, out) -> (out, in)
}


def _to_torch_layout(kind: str, leaf: str, value: np.ndarray) -> np.ndarray:
    return np.transpose(value, _TO_TORCH_AXES[kind]) if leaf == "kernel" else value


def _from_torch_layout(kind: str, leaf: str, value: np.ndarray) -> np.ndarray:
    return np.transpose(value, np.argsort(_TO_TORCH_AXES[kind])) if leaf == "kernel" else value


def _layout(arch: str, has: Callable[[tuple[str, ...]], bool]) -> Layout:
    """The layout of ``arch``; ``has(module_path)`` says whether an optional module exists
    (the Conformer's ``heads_k``, ResNet-18's shortcut convs)."""
    if arch not in _LAYOUTS:
        raise ValueError(f"no PyTorch export for model arch {arch!r}; supported: {EXPORT_ARCHS}")
    return _LAYOUTS[arch](has)


def _entries(layout: Layout) -> Iterator[tuple[str, str, tuple[str, ...], str, str]]:
    """``(torch name, collection, flax leaf path, kind, leaf)`` in PyTorch order."""
    for path, kind in layout:
        prefix = _torch_prefix(path)
        for suffix, collection, leaf in _ENTRIES[kind]:
            yield f"{prefix}.{suffix}", collection, path + (leaf,), kind, leaf


def _flatten(tree: Any, collection: str) -> dict[tuple[str, ...], np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        (collection,) + tuple(str(getattr(k, "key", k)) for k in path): np.asarray(jax.device_get(v))
        for path, v in leaves
    }


def _split_variables(variables: Mapping[str, Any], batch_stats: Any) -> tuple[Any, Any]:
    if not isinstance(variables, Mapping):
        raise ValueError(f"expected a mapping of variables or params, got {type(variables).__name__}")
    if "params" in variables:  # full variables {"params": ..., "batch_stats": ...}
        params = variables["params"]
        if batch_stats is None:
            batch_stats = variables.get("batch_stats")
    else:
        params = variables
    return params, batch_stats


def torch_layout(arch: str, num_classes: int = 12) -> list[str]:
    """The PyTorch ``state_dict`` names of ``arch`` in order (without ``num_batches_tracked``).

    For ``"resnet18"`` the shortcut convs of ``layer2.0``, ``layer3.0`` and ``layer4.0`` are
    included (those of the standard 64/128/256/512 network).
    """
    optional = {f"heads_{k}" for k in range(num_classes)} | {f"layer{s}_0" for s in (2, 3, 4)}
    has = lambda path: path[0] in optional  # noqa: E731
    return [name for name, *_ in _entries(_layout(arch, has))]


def to_torch_state_dict(
    arch: str,
    variables: Mapping[str, Any],
    batch_stats: Mapping[str, Any] | None = None,
    *,
    num_batches_tracked: int | None = None,
) -> collections.OrderedDict[str, np.ndarray]:
    """Variables of model ``arch`` as a PyTorch-style ordered state dict of numpy arrays.

    Args:
      arch: ``"conformer"``, ``"baseline"`` or ``"resnet18"``.
      variables: either the full variables ``{"params": ..., "batch_stats": ...}`` or the
        ``params`` tree alone.
      batch_stats: the ``"batch_stats"`` tree (baseline), if not inside ``variables``.
      num_batches_tracked: if given, each BatchNorm also gets a
        ``num_batches_tracked`` int64 scalar with this value, after ``running_var``, as
        in PyTorch; by default it is omitted.

    Returns:
      ``OrderedDict`` name → C-contiguous float32 array in PyTorch layout, in PyTorch
      registration order. Every leaf of ``params`` (and ``batch_stats``) appears exactly
      once; a missing or unexpected leaf raises ``ValueError`` naming it.
    """
    params, batch_stats = _split_variables(variables, batch_stats)
    flat = _flatten(params, "params")
    if batch_stats is not None:
        flat.update(_flatten(batch_stats, "batch_stats"))
    layout = _layout(arch, lambda path: ("params",) + path + ("kernel",) in flat)
    out: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    used = set()
    for name, collection, path, kind, leaf in _entries(layout):
        key = (collection,) + path
        if key not in flat:
            raise ValueError(f"{arch}: variable {'/'.join(key)} (for {name}) is missing")
        used.add(key)
        out[name] = np.ascontiguousarray(_to_torch_layout(kind, leaf, flat[key]))
        if kind == "bn" and leaf == "var" and num_batches_tracked is not None:
            out[name.rsplit(".", 1)[0] + ".num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
    extra = sorted("/".join(k) for k in set(flat) - used)
    if extra:
        raise ValueError(f"{arch}: variables not in the PyTorch layout: {extra[:5]}"
                         + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
    return out


def from_torch_state_dict(arch: str, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Flax variables ``{"params": ..., ["batch_stats": ...]}`` from a PyTorch-style state dict.

    The inverse of :func:`to_torch_state_dict` (``num_batches_tracked`` entries are ignored).
    Values may be numpy arrays or anything ``np.asarray`` accepts (e.g. CPU torch tensors);
    they are cast to float32.
    Raises ``ValueError`` naming missing or unexpected entries.
    """
    names = [n for n in state_dict if not n.endswith(".num_batches_tracked")]
    variables: dict[str, Any] = {}
    used = set()
    has = lambda path: _torch_prefix(path) + ".weight" in state_dict  # noqa: E731
    for name, collection, path, kind, leaf in _entries(_layout(arch, has)):
        if name not in state_dict:
            raise ValueError(f"{arch}: state dict entry {name!r} is missing")
        used.add(name)
        node = variables.setdefault(collection, {})
        for part in path[:-1]:
            node = node.setdefault(part, {})
        value = np.asarray(state_dict[name], dtype=np.float32)
        node[path[-1]] = np.ascontiguousarray(_from_torch_layout(kind, leaf, value))
    extra = sorted(set(names) - used)
    if extra:
        raise ValueError(f"{arch}: unexpected state dict entries {extra[:5]}"
                         + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
    return variables
