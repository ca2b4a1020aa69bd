"""Run manifests: the record that makes a result count.

``manifest.json`` holds the config and its hash, the data fingerprint (digests of the
arrays actually used), the environment fingerprint, the init and final digests
(SHA-256, plus MD5 for comparison with the paper), metrics and wall time. It is written
when a run starts (``status: "running"``) and rewritten when it ends (``"finished"``);
every write goes to a temporary file that is then renamed, so a crash never leaves a
half-written manifest. Record files are created with the process umask (typically 0644).

``events.jsonl`` is the run directory's append-only history: one JSON object per line
(``started``, ``resumed``, ``checkpoint``, ``finished``, ...), each with a UTC timestamp.
:func:`replace_record` rewrites a record file only after appending the content it replaces
(a ``superseded`` event), so no rewrite loses what was there before. A finished run is never
rewritten at all.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

import detjax

__all__ = ["canonical_json", "json_sha256", "atomic_file", "write_json_atomic", "strict_json", "replace_record",
           "append_event", "read_events", "read_manifest", "finished_result", "new_manifest", "EVENTS_FILE"]

MANIFEST_VERSION = 1
EVENTS_FILE = "events.jsonl"


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the form that is hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)


def json_sha256(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def _default(o: Any):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike[str], *, suffix: str = ".part") -> Iterator[BinaryIO]:
    """A binary file that replaces ``dest`` only when the ``with`` block ends without error.

    It is a temporary file in ``dest``'s folder (created if needed), with the usual
    ``0666 & ~umask`` mode; after the block it is fsynced and moved over ``dest`` with
    ``os.replace``, so ``dest`` holds the old content or the new, never a part. If the block
    raises, the temporary file is removed and the exception propagates.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would survive os.replace
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Writes ``obj`` as indented JSON to ``path`` through :func:`atomic_file`."""
    with atomic_file(path, suffix=".tmp") as f:
        f.write(_json_bytes(obj))


def _json_bytes(obj: Any) -> bytes:
    """The bytes of a record file: indented JSON in insertion order (per-class tables stay in
    label order), one final newline."""
    return (json.dumps(obj, indent=2, default=_default) + "\n").encode()


def strict_json(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as ``None`` and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Mapping):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def append_event(run_dir: str | Path, event: str, **fields: Any) -> dict[str, Any]:
    """Appends one line ``{"event", "utc", **fields}`` to ``run_dir/events.jsonl`` (fsynced).

    The file is only ever appended to (``O_APPEND``); a line cut short by a crash is skipped
    by :func:`read_events`.
    """
    record = {"event": event, "utc": _utc_now(), **fields}
    line = (json.dumps(record, default=_default, allow_nan=True) + "\n").encode()
    path = Path(run_dir) / EVENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return record


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    """The events of ``run_dir`` in order (``[]`` when there is no ``events.jsonl``)."""
    path = Path(run_dir) / EVENTS_FILE
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    return events


def replace_record(path: str | Path, obj: Any) -> None:
    """Writes the record file ``path`` atomically, keeping what it replaces.

    When ``path`` exists with other content, that content (parsed JSON, or the raw text if
    it does not parse) and its SHA-256 are first appended to ``events.jsonl`` of the file's
    folder as a ``superseded`` event.
    """
    path, new = Path(path), _json_bytes(obj)
    if path.exists():
        old = path.read_bytes()
        if old != new:
            try:
                content: Any = json.loads(old)
            except ValueError:
                content = old.decode(errors="replace")
            append_event(path.parent, "superseded", file=path.name,
                         sha256=hashlib.sha256(old).hexdigest(), content=content)
    with atomic_file(path, suffix=".tmp") as f:  # the bytes compared above, serialised once
        f.write(new)


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a detjax run directory")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the manifest is corrupt") from exc
    for key in ("config", "config_hash", "environment"):
        if key not in manifest:
            raise ValueError(f"{path} lacks the key {key!r}; not a detjax manifest")
    return manifest


def finished_result(run_dir: str | Path) -> dict[str, Any] | None:
    """The stored result of the finished run in ``run_dir`` (the manifest's ``metrics``, which
    ``result.json`` repeats), or ``None`` when ``run_dir`` holds no finished run."""
    path = Path(run_dir) / "manifest.json"
    if not path.exists():
        return None
    manifest = read_manifest(run_dir)
    if manifest.get("status") != "finished" or not isinstance(manifest.get("metrics"), dict):
        return None
    return manifest["metrics"]


def new_manifest(*, config: dict, config_hash: str, data_fingerprint: dict, environment: dict,
                 init_digests: dict, n_params: int, data_info: dict | None = None) -> dict[str, Any]:
    return {
        "manifest_version": MANIFEST_VERSION,
        "detjax_version": detjax.__version__,
        "status": "running",
        "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "config_hash": config_hash,
        "data_fingerprint": data_fingerprint,
        "data_info": data_info or {},
        "environment": environment,
        "init_digests": init_digests,
        "n_params": n_params,
    }
