"""Data folders and the content-keyed ``.npz`` cache, shared by the dataset loaders.

Data folder. :func:`resolve_data_dir` takes the folder from the ``data_dir`` argument, else
from the loader's environment variable, else the vendored copy, and says which it was:
``{"kind": "argument" | "environment" | "vendored", "variable": ...}``. A run records that
kind with the content digest of what was read; the absolute path is recorded only as a hint,
since it differs between machines while the content digest does not.

Cache. Arrays built from input files are stored under ``cache_dir`` (default
``$DETJAX_CACHE_DIR``, else ``~/.cache/detjax``) with these guarantees:

* content key: :func:`content_key` is a SHA-256 over the loader's settings and the
  ``(name, sha256 of bytes)`` of every input file, so any changed byte or setting selects
  another file;
* atomic write: :func:`write_cache` writes a temporary file in the same folder, fsyncs it
  and moves it into place with ``os.replace``; a crash leaves the old file or none, never a
  partial one, and a failed write (full disk, read-only folder) only warns;
* verified read: :func:`read_cache` returns arrays only from a file holding the expected
  key whose arrays hash to the :func:`fingerprint` stored with them; anything else warns
  and counts as a miss (the loader rebuilds the file). :func:`check_cached_signals` then
  holds cached signals to the checks of a fresh read, naming the first bad record.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from detjax.data import _download
from detjax.determinism import ENV_CACHE_DIR, cache_root  # the one per-user cache folder

__all__ = ["ENV_CACHE_DIR", "resolve_data_dir", "require_file", "default_cache_dir", "cache_root", "wfdb_files",
           "content_key", "fingerprint", "read_cache", "write_cache", "load_or_build", "check_cached_signals"]


def resolve_data_dir(data_dir: str | os.PathLike[str] | None, *, what: str, hint: str, env: str | None = None,
                     vendored: Path | None = None) -> tuple[Path, dict[str, str]]:
    """``(folder, {"kind", "variable"?})``: ``data_dir``, else ``$env``, else ``vendored``.

    The folder is absolute and must exist (``FileNotFoundError`` naming it, then ``hint``);
    with none of the three ``ValueError`` says how to give one.
    """
    if data_dir is not None:
        kind: dict[str, str] = {"kind": "argument"}
    elif env and os.environ.get(env):
        data_dir, kind = os.environ[env], {"kind": "environment", "variable": env}
    elif vendored is not None:
        data_dir, kind = vendored, {"kind": "vendored"}
    else:
        raise ValueError(f"no {what} data folder given: pass data_dir (--data-dir on the command line) or set "
                         f"the environment variable {env}. {hint}")
    path = Path(data_dir).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(2, f"{what} data folder not found. {hint}", str(path))
    return path, kind


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file; otherwise ``FileNotFoundError`` ("``what`` not found", ``path``)."""
    if not path.is_file():
        raise FileNotFoundError(2, f"{what} not found", str(path))
    return path


def default_cache_dir() -> Path:
    """``$DETJAX_CACHE_DIR`` if set, else ``~/.cache/detjax``."""
    return cache_root(None)


def wfdb_files(record: Path, signal_ext: str) -> list[Path]:
    """The WFDB record ``record``'s header (``<record>.hea``) plus the signal files its signal
    lines name, sorted; the files a content key must cover. Tolerant on purpose: an unreadable
    header, or one naming a file outside its folder, lists ``<record><signal_ext>`` instead (the
    reader reports the real problem)."""
    header, fallback = record.with_name(record.name + ".hea"), record.name + signal_ext
    try:
        lines = [ln for ln in header.read_text(errors="replace").splitlines()
                 if ln.strip() and not ln.lstrip().startswith("#")]
        names = sorted({lines[1 + i].split()[0] for i in range(int(lines[0].split()[1]))})
        if not names or any(PurePosixPath(n).name != n or "\\" in n for n in names):
            raise ValueError(names)
    except (OSError, IndexError, ValueError):
        names = [fallback]
    return [header, *(header.parent / name for name in names)]


def content_key(spec: Mapping[str, Any], files: Iterable[tuple[str, Path]]) -> str:
    """SHA-256 of the JSON of ``spec`` plus ``"files": [[name, sha256 of the file's bytes], ...]``."""
    listed = [[name, _download.file_sha256(path)] for name, path in files]
    return hashlib.sha256(json.dumps({**spec, "files": listed}, separators=(",", ":")).encode()).hexdigest()


def fingerprint(arrays: Mapping[str, Any]) -> str:
    """SHA-256 of named arrays (names, dtypes, shapes and values; see :mod:`detjax.hashing`)."""
    from detjax.hashing import tree_sha256

    return tree_sha256({str(k): np.asarray(v) for k, v in arrays.items()})


def read_cache(path: Path, key: str, names: Sequence[str], what: str) -> tuple[dict[str, np.ndarray], str] | None:
    """``(arrays, digest)`` of a verified cache file, else ``None``.

    ``None`` without a warning when the file is absent; with a ``RuntimeWarning`` naming
    ``what`` and the file when it is unreadable (truncated, bad CRC), lacks one of ``names``,
    holds another key, or its arrays do not hash to the stored digest.
    """
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in (*names, "key", "digest")}
        if str(arrays.pop("key")) != key:
            raise ValueError("content key differs from its file name")
        digest = str(arrays.pop("digest"))
        if fingerprint(arrays) != digest:
            raise ValueError("array digest does not match")
        return arrays, digest
    except Exception as exc:  # truncated zip, bad CRC, missing member, wrong digest...
        warnings.warn(f"{what} cache file {path} is corrupt ({type(exc).__name__}: {exc}); rebuilding it",
                      RuntimeWarning, stacklevel=3)
        return None


def write_cache(path: Path, key: str, arrays: Mapping[str, np.ndarray], digest: str,
                what: str = "dataset") -> bool:
    """Store ``arrays`` with ``key`` and their ``digest`` atomically
    (:func:`~detjax.data._download.atomic_file`). ``False``, with a warning, when the disk
    refuses (``OSError``); an interrupt propagates. No temporary file is left either way."""
    try:
        with _download.atomic_file(path, suffix=".tmp") as handle:
            np.savez(handle, key=np.array(key), digest=np.array(digest), **arrays)
        return True
    except OSError as exc:  # a full disk or read-only cache must not stop the load
        warnings.warn(f"could not write {what} cache {path}: {exc}", RuntimeWarning, stacklevel=3)
        return False


def load_or_build(path: Path, key: str, names: Sequence[str], build: Callable[[], dict[str, np.ndarray]], *,
                  use_cache: bool, what: str) -> tuple[dict[str, np.ndarray], str, bool]:
    """``(arrays, digest, from_cache)``: the verified cache file, else ``build()``, hashed once
    and written when ``use_cache``. The digest is computed exactly once either way."""
    cached = read_cache(path, key, names, what) if use_cache else None
    if cached is not None:
        return cached[0], cached[1], True
    arrays = build()
    digest = fingerprint(arrays)
    if use_cache:
        write_cache(path, key, arrays, digest, what)
    return arrays, digest, False


def check_cached_signals(x: np.ndarray, *, shape: tuple[int, ...], names: Sequence[str], path: Path,
                         what: str) -> None:
    """Checks signals loaded from a cache as strictly as freshly read records: the exact
    shape, float32 and finite values. A ``ValueError`` names the first bad record and the
    cache file (a checksummed cache can still hold what an older or patched loader wrote)."""
    fix = "delete the file and it is rebuilt from the records"
    if x.dtype != np.float32 or tuple(x.shape) != tuple(shape):
        raise ValueError(f"{what} cache file {path}: signals of shape {tuple(x.shape)} {x.dtype}, expected "
                         f"{tuple(shape)} float32; {fix}")
    for start in range(0, x.shape[0], 1024):  # in chunks: no full-size boolean copy
        bad = ~np.isfinite(x[start:start + 1024].reshape(min(1024, x.shape[0] - start), -1))
        rows = np.flatnonzero(bad.any(axis=1))
        if rows.size:
            i = start + int(rows[0])
            raise ValueError(f"{what} cache file {path}: record {names[i]} holds {int(bad[rows[0]].sum())} "
                             f"non-finite values (NaN or inf), which a fresh read refuses; {fix}")
