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

import datetime as _dt
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

import detjax

__all__ = ["canonical_json", "json_sha256", "write_json_atomic", "replace_record", "append_event",
           "read_events", "read_manifest", "finished_result", "new_manifest", "EVENTS_FILE"]

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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _create_temp(directory: Path, name: str) -> tuple[int, Path]:
    """A new, exclusive temporary file next to ``name``, created with mode ``0o666 & ~umask``
    (``tempfile.mkstemp`` would make it 0600, and ``os.replace`` keeps the temp file's mode)."""
    for _ in range(100):
        tmp = directory / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file for {name} in {directory}")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Writes ``obj`` as indented JSON to ``path`` via a temporary file and ``os.replace``.

    The file gets the process umask's permissions (``0o666 & ~umask``, typically 0644).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=_default)  # insertion order: per-class tables stay in label order
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def replace_record(path: str | Path, obj: Any, *, run_dir: str | Path | None = None) -> None:
    """Writes the record file ``path`` atomically, keeping what it replaces.

    When ``path`` exists with other content, that content (parsed JSON, or the raw text if
    it does not parse) and its SHA-256 are first appended to ``events.jsonl`` of ``run_dir``
    (default: the file's folder) as a ``superseded`` event.
    """
    path = Path(path)
    if path.exists():
        old = path.read_bytes()
        new = (json.dumps(obj, indent=2, default=_default) + "\n").encode()
        if old != new:
            try:
                content: Any = json.loads(old)
            except ValueError:
                content = old.decode(errors="replace")
            append_event(run_dir if run_dir is not None else path.parent, "superseded", file=path.name,
                         sha256=hashlib.sha256(old).hexdigest(), content=content)
    write_json_atomic(path, obj)


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
