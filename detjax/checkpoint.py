"""Orbax checkpoints whose content is verified on restore.

Each checkpoint step (the number of finished epochs) is one orbax ``Composite`` with
three items, written together and committed atomically by orbax (a ``kill -9`` during a
save leaves a temporary directory that orbax never restores from):

* ``state``: the full :class:`detjax.train.TrainState` as a state dict (``StandardSave``);
* ``best``: the best-validation weights so far, so that a resumed run selects the same
  epoch as an uninterrupted one;
* ``detjax``: a JSON sidecar with the SHA-256 of ``state`` and ``best`` (of the *arrays*:
  orbax's own files hold timestamps, so file hashes would differ between identical runs),
  the config hash, the device count and the metric history.

:meth:`Checkpointer.restore_latest` reads the sidecar first, refuses a checkpoint written
under another config hash or device count, restores the arrays into the structure of a
freshly built state, hashes what it restored and refuses any mismatch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from detjax import hashing

__all__ = ["Checkpointer", "CheckpointError", "CheckpointMismatchError", "CheckpointCorruptError"]

SIDECAR_VERSION = 1


class CheckpointError(ValueError):
    """Base class of checkpoint refusals."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint belongs to another run (config hash or device count differ)."""


class CheckpointCorruptError(CheckpointError):
    """The checkpoint cannot be read, or its arrays do not hash to the recorded digest."""


class Checkpointer:
    """Saves and restores verified training checkpoints under ``directory``.

    Args:
      directory: where orbax keeps one sub-directory per step.
      config_hash: the SHA-256 of the run's config; stored with every checkpoint and
        required to match on restore.
      device_count: devices the run trains on; a checkpoint from another count is refused
        unless ``allow_device_change`` is set (the reduction order, and so the bits, differ).
      max_to_keep: how many recent checkpoints orbax keeps.
    """

    def __init__(self, directory: str | Path, *, config_hash: str, device_count: int = 1,
                 max_to_keep: int = 2, allow_device_change: bool = False):
        self.directory = Path(directory).absolute()
        self.config_hash = config_hash
        self.device_count = int(device_count)
        self.allow_device_change = allow_device_change
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    @property
    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: dict, best: dict, extra: dict[str, Any]) -> dict[str, Any]:
        """Writes ``state`` (a state dict) and ``best`` at ``step``; returns the sidecar."""
        sidecar = {
            "version": SIDECAR_VERSION,
            "step": int(step),
            "config_hash": self.config_hash,
            "device_count": self.device_count,
            "state_sha256": hashing.tree_sha256(state),
            "best_sha256": hashing.tree_sha256(best),
            **extra,
        }
        self._manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            best=ocp.args.StandardSave(best),
            detjax=ocp.args.JsonSave(sidecar)), force=True)
        self._manager.wait_until_finished()
        return sidecar

    def read_sidecar(self, step: int) -> dict[str, Any]:
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(detjax=ocp.args.JsonRestore()))
            sidecar = restored["detjax"]
        except Exception as exc:  # orbax raises many types for unreadable directories
            raise CheckpointCorruptError(
                f"checkpoint {self.directory / str(step)} has no readable detjax sidecar: {exc}") from exc
        if not isinstance(sidecar, dict) or "state_sha256" not in sidecar:
            raise CheckpointCorruptError(f"checkpoint {self.directory / str(step)}: sidecar is malformed")
        return sidecar

    def check_compatible(self, sidecar: dict[str, Any], step: int) -> None:
        where = self.directory / str(step)
        if sidecar.get("config_hash") != self.config_hash:
            raise CheckpointMismatchError(
                f"checkpoint {where} was written by a run with config hash "
                f"{sidecar.get('config_hash')}, but this run's config hash is {self.config_hash}; "
                "resume only with the exact config that wrote it (see its manifest.json), "
                "or start a new run directory")
        count = sidecar.get("device_count", 1)
        if count != self.device_count and not self.allow_device_change:
            raise CheckpointMismatchError(
                f"checkpoint {where} was written on {count} device(s) and this run uses "
                f"{self.device_count}; the gradient reduction order differs, so the result would "
                "not be bit-identical. Pass allow_device_change=True (--allow-device-change) "
                "to resume anyway")

    def restore(self, step: int, state_target: dict, best_target: dict) -> tuple[dict, dict, dict]:
        """Restores ``step`` into the structures of the targets, verifying every hash."""
        sidecar = self.read_sidecar(step)
        self.check_compatible(sidecar, step)
        where = self.directory / str(step)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(state_target),
                best=ocp.args.StandardRestore(best_target)))
        except Exception as exc:
            raise CheckpointCorruptError(f"checkpoint {where} could not be restored: {exc}") from exc
        for item, tree in (("state", restored["state"]), ("best", restored["best"])):
            try:
                actual = hashing.tree_sha256(tree)
            except Exception as exc:
                raise CheckpointCorruptError(f"checkpoint {where}: {item} cannot be hashed: {exc}") from exc
            if actual != sidecar[f"{item}_sha256"]:
                raise CheckpointCorruptError(
                    f"checkpoint {where}: the restored {item} hashes to {actual}, but the sidecar "
                    f"recorded {sidecar[f'{item}_sha256']}; the checkpoint is corrupt")
        return restored["state"], restored["best"], sidecar

    def restore_latest(self, state_target: dict, best_target: dict) -> tuple[dict, dict, dict] | None:
        """Restores the newest checkpoint, or returns ``None`` when there is none."""
        step = self.latest_step()
        if step is None:
            return None
        return self.restore(step, state_target, best_target)

    def close(self) -> None:
        self._manager.close()


logging.getLogger("absl").setLevel(logging.WARNING)
