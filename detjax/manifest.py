"""Run manifests: the record that makes a result count.

``manifest.json`` holds the config and its hash, the data fingerprint (digests of the
arrays actually used), the environment fingerprint, the init and final digests
(SHA-256, plus MD5 for comparison with the paper), metrics and wall time. It is written
when a run starts (``status: "running"``) and rewritten when it ends (``"finished"``);
every write goes to a temporary file that is then renamed, so a crash never leaves a
half-written manifest.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import detjax

__all__ = ["canonical_json", "json_sha256", "write_json_atomic", "read_manifest", "new_manifest"]

MANIFEST_VERSION = 1


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


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Writes ``obj`` as indented JSON to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
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
