"""Canonical, platform-independent hashes of pytrees.

The proof that two trainings produced the same model is that their states serialise to
the same bytes. :func:`canonical_bytes` defines those bytes once:

    MAGIC
    for each leaf, in ascending order of its key path string:
        "<path>\\t<dtype>\\t<shape>\\t<nbytes>\\n"   (UTF-8 header)
        <the leaf's values, C order, little-endian>

* key paths are joined with ``/`` (``params/stage0_block0/conv1/kernel``), so the order
  does not depend on dict insertion order or on the container type;
* dtype (numpy ``dtype.str`` in little-endian form, e.g. ``<f4``) and shape are in the
  header, so a reshape or a cast changes the digest even when the raw bytes do not;
* typed PRNG keys are hashed through their raw ``uint32`` key data.

:func:`ordered_digests` serialises named arrays in an order and layout the caller gives
(for example PyTorch's ``state_dict`` order and ``(out, in, k)`` layout), optionally
without headers, which is how the original release computed its MD5 (``b"".join`` of the
raw parameter bytes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

MAGIC = b"detjax-canonical-v1\n"

__all__ = [
    "MAGIC",
    "canonical_bytes",
    "tree_digests",
    "tree_sha256",
    "tree_md5",
    "leaf_digests",
    "ordered_digests",
    "flatten_with_paths",
    "first_difference",
]


def _key_to_str(entry: Any) -> str:
    """One key-path entry as text: dict keys, attribute names and indices alike."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _to_numpy(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    array = np.asarray(jax.device_get(leaf))
    if array.dtype == object:
        raise ValueError(f"cannot hash a leaf of dtype object (value {leaf!r})")
    little = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    # astype, not ascontiguousarray: the latter turns 0-d arrays into shape (1,).
    return array.astype(little, order="C", copy=False)


def flatten_with_paths(tree: Any) -> list[tuple[str, np.ndarray]]:
    """``[(path, array)]`` for every leaf of ``tree``, sorted by path.

    Raises ``ValueError`` when two leaves map to the same path string (which would make
    the serialisation ambiguous).
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    items = [("/".join(_key_to_str(k) for k in path), _to_numpy(leaf)) for path, leaf in leaves]
    items.sort(key=lambda item: item[0])
    for (a, _), (b, _) in zip(items, items[1:]):
        if a == b:
            raise ValueError(f"two leaves share the key path {a!r}; cannot hash unambiguously")
    return items


def _header(path: str, array: np.ndarray) -> bytes:
    return f"{path}\t{array.dtype.str}\t{tuple(array.shape)}\t{array.nbytes}\n".encode()


def _chunks(named: Iterable[tuple[str, np.ndarray]], headers: bool) -> Iterator[bytes]:
    if headers:
        yield MAGIC
    for path, array in named:
        if headers:
            yield _header(path, array)
        yield array.tobytes(order="C")


def _digest(chunks: Iterable[bytes]) -> dict[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    for chunk in chunks:
        sha.update(chunk)
        md5.update(chunk)
    return {"sha256": sha.hexdigest(), "md5": md5.hexdigest()}


def canonical_bytes(tree: Any) -> bytes:
    """The canonical serialisation of ``tree`` (see the module docstring)."""
    return b"".join(_chunks(flatten_with_paths(tree), headers=True))


def tree_digests(tree: Any) -> dict[str, str]:
    """``{"sha256": ..., "md5": ...}`` of :func:`canonical_bytes` (streamed, not materialised)."""
    return _digest(_chunks(flatten_with_paths(tree), headers=True))


def tree_sha256(tree: Any) -> str:
    """SHA-256 hex digest of :func:`canonical_bytes`."""
    return tree_digests(tree)["sha256"]


def tree_md5(tree: Any) -> str:
    """MD5 hex digest of :func:`canonical_bytes` (for comparison with the paper's MD5s)."""
    return tree_digests(tree)["md5"]


def leaf_digests(tree: Any) -> dict[str, str]:
    """SHA-256 of every leaf (header included), keyed by path: finds *which* leaf differs."""
    return {
        path: hashlib.sha256(_header(path, a) + a.tobytes(order="C")).hexdigest()
        for path, a in flatten_with_paths(tree)
    }


def ordered_digests(
    named_arrays: Mapping[str, Any] | Iterable[tuple[str, Any]], *, headers: bool = True
) -> dict[str, str]:
    """Digests of arrays in the order given, each in the layout given.

    With ``headers=False`` the digest covers only the concatenated little-endian values,
    i.e. ``md5(b"".join(t.numpy().tobytes() for t in model.state_dict().values()))`` of
    the equivalent PyTorch module when ``named_arrays`` is in ``state_dict`` order and layout.
    """
    items = named_arrays.items() if isinstance(named_arrays, Mapping) else named_arrays
    named = [(str(name), _to_numpy(value)) for name, value in items]
    return _digest(_chunks(named, headers=headers))


def first_difference(a: Any, b: Any) -> dict[str, Any] | None:
    """The first leaf (in canonical order) where two trees differ, or ``None`` if identical.

    Returns ``{"path", "reason", ...}`` where reason is ``"missing"`` (the path exists in
    only one tree), ``"dtype"``, ``"shape"`` or ``"values"`` (with the number of differing
    elements, the first differing flat index and the largest absolute difference).
    """
    left, right = dict(flatten_with_paths(a)), dict(flatten_with_paths(b))
    for path in sorted(set(left) | set(right)):
        if path not in left or path not in right:
            return {"path": path, "reason": "missing", "in": "b" if path in right else "a"}
        x, y = left[path], right[path]
        if x.dtype != y.dtype:
            return {"path": path, "reason": "dtype", "a": x.dtype.str, "b": y.dtype.str}
        if x.shape != y.shape:
            return {"path": path, "reason": "shape", "a": list(x.shape), "b": list(y.shape)}
        if x.tobytes() != y.tobytes():
            xf, yf = x.reshape(-1), y.reshape(-1)
            differs = xf.view(np.uint8).reshape(xf.size, -1) != yf.view(np.uint8).reshape(yf.size, -1)
            flat = np.flatnonzero(differs.any(axis=1))
            diff = None
            if np.issubdtype(x.dtype, np.number):
                diff = float(np.max(np.abs(xf.astype(np.float64) - yf.astype(np.float64))))
            return {
                "path": path,
                "reason": "values",
                "n_different": int(flat.size),
                "first_index": int(flat[0]),
                "max_abs_diff": diff,
            }
    return None
