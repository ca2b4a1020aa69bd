"""Export model variables to PyTorch ``state_dict`` names, layouts and order, and back.

:func:`to_torch_state_dict` returns an ``OrderedDict[name, np.ndarray]`` that a PyTorch
module with the same structure would produce with ``model.state_dict()`` (converted to
numpy): registration order, PyTorch layouts, ``.weight`` / ``.bias`` names. It is also the
input :func:`detjax.hashing.ordered_digests` expects for a hash in PyTorch order.
:func:`from_torch_state_dict` is the inverse (Flax variables from such a state dict).

Layouts: conv kernel Flax ``(k, in/groups, out)`` → ``(out, in/groups, k)``; dense kernel
``(in, out)`` → ``(out, in)``; 2-D conv kernel ``(kh, kw, in, out)`` → ``(out, in, kh,
kw)``; LayerNorm ``scale``/``bias`` → ``weight``/``bias``; BatchNorm ``scale``, ``bias``
and statistics ``mean``, ``var`` → ``weight``, ``bias``, ``running_mean``, ``running_var``
(our BatchNorm keeps PyTorch's unbiased running variance, so the numbers mean the same).
As in PyTorch, a BatchNorm's buffers follow its parameters. ``num_batches_tracked`` (an
int64 buffer PyTorch uses only when ``momentum=None``) is not tracked by Flax; it is
omitted unless ``num_batches_tracked=`` gives a value, and PyTorch's ``load_state_dict``
accepts a state dict without it (BatchNorm fills it in with 0).

Two namings (``naming=``):

``"detjax"`` (default): the Flax module ``name_i_j`` is PyTorch's ``name.i.j``, in the
order of the Flax modules.

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
  ``layerS.B.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}``, ``fc``.

``"reference"``: the exact parameter names and registration order of the modules released
with arXiv 2603.28040, so that the released code's ``model.load_state_dict`` accepts the
state dict and a digest over its parameters in this order is comparable with one computed
there. Same layouts and shapes as ``"detjax"``; only names and (for the Conformer) order
differ:

* ``ECGRepNetConformer(base_ch=40, etf_init=True)``: ``stem.{0,2,4}``;
  ``stages.s.b.{conv1,conv2,conv3}`` and the block's LayerNorm ``stages.s.b.ln.ln``;
  then the transformer blocks ``conformer_blocks.i.{ff1_norm, ff1.0, ff1.2, attn_norm,
  attn.qkv, attn.out_proj, conv_norm, conv.0 (depthwise), conv.2 (pointwise), ff2_norm,
  ff2.0, ff2.2, final_norm}``; then the stage-3 down-sampling conv
  ``conformer_downsample.0`` (registered AFTER the transformer blocks in the released
  module, although it runs before them); ``bn_linear`` (the bottleneck); ``heads.k``.
* ``BaselineCNN()``: ``stem.0`` (conv), ``stem.1`` (BN); residual blocks
  ``stage{s+1}.b.{conv,bn}`` (1-based stage names, ``b`` counted without the transition);
  the transition convs ``down1.{0,1}`` (64→128) and ``down2.{0,1}`` (128→256), each
  registered before its stage; ``head.1``, ``head.4``.
* ``ResNet18MedMNIST(num_classes, n_channels)``: torchvision's names except that the
  shortcut is ``layerS.B.shortcut.{0,1}`` (conv, BN).

Flax ↔ reference, for the record (Flax path → reference name): Conformer
``stages_s_b/norm`` → ``stages.s.b.ln.ln``, ``down`` → ``conformer_downsample.0``,
``blocks_i/ffn1/{norm,fc1,fc2}`` → ``conformer_blocks.i.{ff1_norm,ff1.0,ff1.2}``,
``blocks_i/attn/{norm,qkv,proj}`` → ``conformer_blocks.i.{attn_norm,attn.qkv,
attn.out_proj}``, ``blocks_i/conv/{norm,dw,pw}`` → ``conformer_blocks.i.{conv_norm,conv.0,
conv.2}``, ``blocks_i/norm`` → ``conformer_blocks.i.final_norm``, ``bottleneck`` →
``bn_linear``; Baseline ``stem/{conv,bn}`` → ``stem.{0,1}``, ``stages_s_0`` of a widening
stage → ``down{s}.{0,1}``, other ``stages_s_i`` → ``stage{s+1}.{i - t}`` (``t`` = 1 after a
transition, else 0), ``head_1``/``head_4`` → ``head.1``/``head.4``; ResNet-18
``downsample_{0,1}`` → ``shortcut.{0,1}``.
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

__all__ = ["to_torch_state_dict", "from_torch_state_dict", "torch_layout", "EXPORT_ARCHS", "NAMINGS"]

NAMINGS = ("detjax", "reference")

# A layout entry: (Flax module path, kind, PyTorch module prefix); kind is "conv",
# "conv2d", "dense", "ln" or "bn".
Layout = list[tuple[tuple[str, ...], str, str]]
# has(Flax module path, PyTorch prefix): whether an optional module exists.
Has = Callable[[tuple[str, ...], str], bool]


def _torch_prefix(path: tuple[str, ...]) -> str:
    """``("stages_0_1", "conv1")`` → ``"stages.0.1.conv1"``."""
    return ".".join(re.sub(r"_(\d+)", r".\1", part) for part in path)


def _entry(path: tuple[str, ...], kind: str, prefix: str | None = None) -> tuple[tuple[str, ...], str, str]:
    return path, kind, _torch_prefix(path) if prefix is None else prefix


# Conformer block sub-modules in registration order: (Flax sub-path, kind, reference name).
_CONFORMER_BLOCK = (
    (("ffn1", "norm"), "ln", "ff1_norm"), (("ffn1", "fc1"), "dense", "ff1.0"),
    (("ffn1", "fc2"), "dense", "ff1.2"),
    (("attn", "norm"), "ln", "attn_norm"), (("attn", "qkv"), "conv", "attn.qkv"),
    (("attn", "proj"), "conv", "attn.out_proj"),
    (("conv", "norm"), "ln", "conv_norm"), (("conv", "dw"), "conv", "conv.0"),
    (("conv", "pw"), "conv", "conv.2"),
    (("ffn2", "norm"), "ln", "ff2_norm"), (("ffn2", "fc1"), "dense", "ff2.0"),
    (("ffn2", "fc2"), "dense", "ff2.2"),
    (("norm",), "ln", "final_norm"),
)  # fmt: skip


def _conformer_layout(has: Has, reference: bool) -> Layout:
    out: Layout = [_entry(("stem_0",), "conv"), _entry(("stem_2",), "conv"), _entry(("stem_4",), "conv")]
    for s, depth in enumerate(_conformer.STAGE_DEPTHS):
        for b in range(depth):
            block = f"stages_{s}_{b}"
            p = f"stages.{s}.{b}"
            out += [_entry((block, "conv1"), "conv"), _entry((block, "conv2"), "conv"),
                    _entry((block, "conv3"), "conv"),
                    _entry((block, "norm"), "ln", f"{p}.ln.ln" if reference else None)]
    down = _entry(("down",), "conv", "conformer_downsample.0" if reference else None)
    if not reference:
        out.append(down)
    for i in range(_conformer.NUM_TRANSFORMER_BLOCKS):
        for sub, kind, ref_name in _CONFORMER_BLOCK:
            out.append(_entry((f"blocks_{i}",) + sub, kind, f"conformer_blocks.{i}.{ref_name}" if reference else None))
    if reference:  # the released module registers the down-sampling conv after the blocks
        out.append(down)
    out.append(_entry(("bottleneck",), "dense", "bn_linear" if reference else None))
    k = 0
    while has((f"heads_{k}",), f"heads.{k}"):  # one head per class
        out.append(_entry((f"heads_{k}",), "dense"))
        k += 1
    return out


def _baseline_layout(has: Has, reference: bool) -> Layout:
    del has  # no optional modules
    out: Layout = [_entry(("stem", "conv"), "conv", "stem.0" if reference else None),
                   _entry(("stem", "bn"), "bn", "stem.1" if reference else None)]
    in_width = _baseline.STEM_WIDTH
    for s, (width, depth) in enumerate(zip(_baseline.STAGE_WIDTHS, _baseline.STAGE_DEPTHS)):
        transition = int(width != in_width)  # the stride-2 transition conv is stages_s_0
        for i in range(depth + transition):
            block = f"stages_{s}_{i}"
            if not reference:
                conv, bn = None, None
            elif i < transition:
                conv, bn = f"down{s}.0", f"down{s}.1"
            else:
                conv, bn = f"stage{s + 1}.{i - transition}.conv", f"stage{s + 1}.{i - transition}.bn"
            out += [_entry((block, "conv"), "conv", conv), _entry((block, "bn"), "bn", bn)]
        in_width = width
    out += [_entry(("head_1",), "dense"), _entry(("head_4",), "dense")]
    return out


def _resnet18_layout(has: Has, reference: bool) -> Layout:
    """torchvision order: conv1, bn1, layer1..4 (conv1, bn1, conv2, bn2, shortcut), fc."""
    out: Layout = [_entry(("conv1",), "conv2d"), _entry(("bn1",), "bn")]
    shortcut = "shortcut" if reference else "downsample"
    for s in range(1, 5):
        for b in range(2):
            block = f"layer{s}_{b}"
            out += [_entry((block, "conv1"), "conv2d"), _entry((block, "bn1"), "bn"),
                    _entry((block, "conv2"), "conv2d"), _entry((block, "bn2"), "bn")]
            conv = _entry((block, "downsample_0"), "conv2d", f"layer{s}.{b}.{shortcut}.0")
            if has(conv[0], conv[2]):  # only where the shape changes
                out += [conv, _entry((block, "downsample_1"), "bn", f"layer{s}.{b}.{shortcut}.1")]
    out.append(_entry(("fc",), "dense"))
    return out


# One layout per exportable arch (a new model adds its layout here).
_LAYOUTS = {"conformer": _conformer_layout, "baseline": _baseline_layout, "resnet18": _resnet18_layout}
EXPORT_ARCHS = tuple(_LAYOUTS)

# Per kind: (torch suffix, Flax collection, Flax leaf name), parameters before buffers.
_ENTRIES = {
    "conv": (("weight", "params", "kernel"), ("bias", "params", "bias")),
    "conv2d": (("weight", "params", "kernel"),),  # bias-free (ResNet-18)
    "dense": (("weight", "params", "kernel"), ("bias", "params", "bias")),
    "ln": (("weight", "params", "scale"), ("bias", "params", "bias")),
    "bn": (("weight", "params", "scale"), ("bias", "params", "bias"),
           ("running_mean", "batch_stats", "mean"), ("running_var", "batch_stats", "var")),
}

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


def _check_naming(naming: Any) -> bool:
    """``True`` for the reference naming; ``ValueError`` for an unknown one."""
    if not isinstance(naming, str) or naming not in NAMINGS:
        raise ValueError(f"unknown PyTorch naming {naming!r}; expected one of {NAMINGS} "
                         "('detjax': Flax module names; 'reference': the released modules' names)")
    return naming == "reference"


def _layout(arch: str, has: Has, naming: str) -> Layout:
    """The layout of ``arch`` under ``naming``; ``has(module_path, prefix)`` says whether an
    optional module exists (the Conformer's ``heads_k``, ResNet-18's shortcut convs)."""
    reference = _check_naming(naming)
    if arch not in _LAYOUTS:
        raise ValueError(f"no PyTorch export for model arch {arch!r}; supported: {EXPORT_ARCHS}")
    return _LAYOUTS[arch](has, reference)


def _entries(layout: Layout) -> Iterator[tuple[str, str, tuple[str, ...], str, str]]:
    """``(torch name, collection, flax leaf path, kind, leaf)`` in PyTorch order."""
    for path, kind, prefix in layout:
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


def torch_layout(arch: str, num_classes: int = 12, *, naming: str = "detjax", buffers: bool = True) -> list[str]:
    """The PyTorch ``state_dict`` names of ``arch`` in order (without ``num_batches_tracked``).

    ``naming``: ``"detjax"`` or ``"reference"`` (see the module docstring). With
    ``buffers=False`` the BatchNorm ``running_mean``/``running_var`` are left out: the list
    is then the order of the module's ``named_parameters()``, the order a parameter digest
    of the released code uses. ``num_classes`` is the Conformer's number of heads. For
    ``"resnet18"`` the shortcut convs of ``layer2.0``, ``layer3.0`` and ``layer4.0`` are
    included (those of the standard 64/128/256/512 network).
    """
    optional = {f"heads_{k}" for k in range(num_classes)} | {f"layer{s}_0" for s in (2, 3, 4)}
    has = lambda path, prefix: path[0] in optional  # noqa: E731
    return [name for name, collection, *_ in _entries(_layout(arch, has, naming))
            if buffers or collection == "params"]


def to_torch_state_dict(
    arch: str,
    variables: Mapping[str, Any],
    batch_stats: Mapping[str, Any] | None = None,
    *,
    naming: str = "detjax",
    num_batches_tracked: int | None = None,
) -> collections.OrderedDict[str, np.ndarray]:
    """Variables of model ``arch`` as a PyTorch-style ordered state dict of numpy arrays.

    Args:
      arch: ``"conformer"``, ``"baseline"`` or ``"resnet18"``.
      variables: either the full variables ``{"params": ..., "batch_stats": ...}`` or the
        ``params`` tree alone.
      batch_stats: the ``"batch_stats"`` tree (baseline, ResNet-18), if not inside
        ``variables``.
      naming: ``"detjax"`` (default; Flax module names with ``_i`` → ``.i``) or
        ``"reference"`` (the released PyTorch modules' names and registration order:
        ``ECGRepNetConformer``, ``BaselineCNN``, ``ResNet18MedMNIST``; see the module
        docstring). Anything else raises ``ValueError``.
      num_batches_tracked: if given, each BatchNorm also gets a
        ``num_batches_tracked`` int64 scalar with this value, after ``running_var``, as
        in PyTorch; by default it is omitted (``load_state_dict`` accepts that).

    Returns:
      ``OrderedDict`` name → C-contiguous float32 array in PyTorch layout, in PyTorch
      registration order, each BatchNorm's ``running_mean``/``running_var`` right after its
      ``weight``/``bias``. Every leaf of ``params`` (and ``batch_stats``) appears exactly
      once; a missing or unexpected leaf raises ``ValueError`` naming it.
    """
    _check_naming(naming)
    params, batch_stats = _split_variables(variables, batch_stats)
    flat = _flatten(params, "params")
    if batch_stats is not None:
        flat.update(_flatten(batch_stats, "batch_stats"))
    layout = _layout(arch, lambda path, prefix: ("params",) + path + ("kernel",) in flat, naming)
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


def _state_dict_layout(arch: str, state_dict: Mapping[str, Any], naming: str) -> Layout:
    has = lambda path, prefix: prefix + ".weight" in state_dict  # noqa: E731
    return _layout(arch, has, naming)


def _naming_hint(arch: str, state_dict: Mapping[str, Any], naming: str) -> str:
    """A hint naming the other naming when it explains every entry of the state dict."""
    present = {n for n in state_dict if not n.endswith(".num_batches_tracked")}
    for other in NAMINGS:
        if other != naming:
            names = {name for name, *_ in _entries(_state_dict_layout(arch, state_dict, other))}
            if names == present:
                return f" (its names are those of naming={other!r}; pass naming={other!r})"
    return ""


def from_torch_state_dict(arch: str, state_dict: Mapping[str, Any], *, naming: str = "detjax") -> dict[str, Any]:
    """Flax variables ``{"params": ..., ["batch_stats": ...]}`` from a PyTorch-style state dict.

    The inverse of :func:`to_torch_state_dict` with the same ``naming`` (``"detjax"`` or
    ``"reference"``, the released modules' names; ``num_batches_tracked`` entries are
    ignored). ``state_dict`` may be the released module's own ``model.state_dict()``
    with ``naming="reference"``. Values may be numpy arrays or anything ``np.asarray``
    accepts (e.g. CPU torch tensors); they are cast to float32.
    Raises ``ValueError`` naming missing or unexpected entries (and the naming that would
    fit, if the other one does).
    """
    _check_naming(naming)
    names = [n for n in state_dict if not n.endswith(".num_batches_tracked")]
    variables: dict[str, Any] = {}
    used = set()
    for name, collection, path, kind, leaf in _entries(_state_dict_layout(arch, state_dict, naming)):
        if name not in state_dict:
            raise ValueError(f"{arch}: state dict entry {name!r} is missing (naming={naming!r})"
                             + _naming_hint(arch, state_dict, naming))
        used.add(name)
        node = variables.setdefault(collection, {})
        for part in path[:-1]:
            node = node.setdefault(part, {})
        value = np.asarray(state_dict[name], dtype=np.float32)
        node[path[-1]] = np.ascontiguousarray(_from_torch_layout(kind, leaf, value))
    extra = sorted(set(names) - used)
    if extra:
        raise ValueError(f"{arch}: unexpected state dict entries {extra[:5]}"
                         + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
                         + f" (naming={naming!r})" + _naming_hint(arch, state_dict, naming))
    return variables
