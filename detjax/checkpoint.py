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
freshly built state, hashes what it restored and refuses any mismatch. When the newest
checkpoint is refused as corrupt, the message names the newest earlier checkpoint that
verifies and how to resume from it. Orbax's own error text (TensorStore specs spanning
dozens of lines) is cut to its first line, and the orbax manager is closed on every path
(explicitly, on errors, and at interpreter exit), so no background-thread noise follows.

``DETJAX_TEST_KILL_AT`` is a test hook (:func:`kill_point`): ``checkpoint:N`` makes the
process SIGKILL itself while checkpoint ``N`` is being written (all items written to
orbax's temporary directory, not yet committed); :mod:`detjax.train` adds ``step:N`` and
``final-record``.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import signal
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable

import orbax.checkpoint as ocp

from detjax import hashing

__all__ = ["Checkpointer", "CheckpointError", "CheckpointMismatchError", "CheckpointCorruptError",
           "kill_point", "KILL_ENV"]

SIDECAR_VERSION = 1
KILL_ENV = "DETJAX_TEST_KILL_AT"


def kill_point(name: str, n: int | None = None) -> None:
    """Test hook: SIGKILL this process when ``$DETJAX_TEST_KILL_AT`` is ``name`` (or ``name:n``).

    Used by the fault tests to stop a run at a named point exactly; unset, it does nothing.
    """
    wanted = os.environ.get(KILL_ENV)
    if wanted and wanted == (name if n is None else f"{name}:{n}"):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _short(exc: BaseException) -> str:
    """The first line of an orbax/TensorStore error (its full text embeds multi-line specs)."""
    text = str(exc).split(" See full TensorStore details")[0].strip()
    first = text.splitlines()[0].strip() if text else ""
    if len(first) > 240:
        first = first[:240] + " ..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _is_echo_of_failed_read(unraisable: Any) -> bool:
    """An orbax read coroutine (or its asyncio callback) that failed with the error already
    reported as one ``error:`` line: collecting it would print that error again, in full."""
    name = getattr(getattr(unraisable.object, "cr_code", None), "co_name", "")
    message = str(unraisable.exc_value)
    return (name == "_read_array_index_and_device_put" or message.startswith("Encountered error while reading")
            or message == "Event loop is closed")


def _silence_late_echoes() -> None:
    """When a read fails, TensorStore threads finish the remaining reads and call back into
    orbax's event loop, which is closed by then; Python prints each ``RuntimeError('Event loop
    is closed')`` through ``sys.excepthook`` (or, for collected coroutines, the unraisable hook),
    while the read is failing, after the refusal was printed, or at exit. Installed before the
    first restore, these exact echoes are dropped process-wide; every other error still
    reaches the previous hooks."""
    if getattr(sys.excepthook, "_detjax_filter", False):
        return
    previous_except, previous_unraisable = sys.excepthook, sys.unraisablehook

    def excepthook(kind, value, tb):
        if not (kind is RuntimeError and str(value) == "Event loop is closed"):
            previous_except(kind, value, tb)

    def unraisablehook(unraisable):
        if not _is_echo_of_failed_read(unraisable):
            previous_unraisable(unraisable)

    excepthook._detjax_filter = True
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
    logging.getLogger("asyncio").addFilter(_drop_unretrieved_read_errors)


def _drop_unretrieved_read_errors(record: logging.LogRecord) -> bool:
    """asyncio's "Future exception was never retrieved" for a TensorStore read that failed (the
    failure is already the refusal's one line); any other asyncio message passes."""
    message = record.getMessage()
    echo = message.startswith(("Future exception was never retrieved", "Task exception was never retrieved"))
    return not (echo and ("tensorstore_spec" in message or "error while reading" in message))


def _collect_quietly() -> None:
    """Collects the coroutines a failed orbax read leaves un-awaited, without printing their
    errors again (their first line is already in the refusal). Called after the ``except``
    block, so the exception no longer keeps their frames alive; other unraisable errors still
    reach the previous hook."""
    _silence_late_echoes()
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_echo_of_failed_read(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            gc.collect()
    finally:
        sys.unraisablehook = previous


_OPEN: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()


@atexit.register
def _close_open_checkpointers() -> None:
    for checkpointer in list(_OPEN):
        try:
            checkpointer.close()
        except Exception:  # exiting anyway; the error, if any, was reported where it happened
            pass


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
      read_only: only read (``verify``): the folder must exist and nothing is created.
    """

    def __init__(self, directory: str | Path, *, config_hash: str, device_count: int = 1,
                 max_to_keep: int = 2, allow_device_change: bool = False, read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.config_hash = config_hash
        self.device_count = int(device_count)
        self.allow_device_change = allow_device_change
        if read_only and not self.directory.is_dir():
            raise CheckpointCorruptError(f"checkpoint folder {self.directory} does not exist")
        # read_only: nothing is created and nothing deleted (orbax's own read_only option
        # logs warnings on every open, so it is expressed through these two options).
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep, enable_async_checkpointing=False,
            create=not read_only)
        self._closed = False
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        _OPEN.add(self)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

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
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), best=ocp.args.StandardSave(best),
                                  detjax=ocp.args.JsonSave(sidecar))
        if os.environ.get(KILL_ENV) == f"checkpoint:{int(step)}":
            self._save_then_die(int(step), args)
        self._manager.save(int(step), args=args, force=True)
        self._manager.wait_until_finished()
        return sidecar

    def _save_then_die(self, step: int, args) -> None:
        """Test hook: write checkpoint ``step`` into orbax's temporary directory, then SIGKILL
        before orbax commits it (renames it to its final name)."""
        from orbax.checkpoint._src.path import atomicity

        original = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize(path_self, *a, **kw):
            final = Path(str(path_self.get_final()))
            if final.name == str(step) and final.parent == self.directory:
                kill_point("checkpoint", step)
            return await original(path_self, *a, **kw)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize
        try:
            self._manager.save(step, args=args, force=True)
            self._manager.wait_until_finished()
        finally:
            atomicity.AtomicRenameTemporaryPath.finalize = original
        kill_point("checkpoint", step)  # should not be reached: orbax committed without a rename

    def _restore_items(self, step: int, describe: Callable[[str], str], **items: Any) -> dict[str, Any]:
        """The ``items`` of checkpoint ``step``; a failed read becomes :class:`CheckpointCorruptError`
        with ``describe(reason)``."""
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as exc:  # orbax raises many types for unreadable directories
            failure = _short(exc)
        _collect_quietly()  # outside the except block: its frames can now be collected
        raise CheckpointCorruptError(describe(failure))

    def read_sidecar(self, step: int) -> dict[str, Any]:
        _silence_late_echoes()  # a failing read's echoes can arrive while it is still failing
        where = self.directory / str(step)
        sidecar = self._restore_items(
            step, lambda why: f"checkpoint {where} has no readable detjax sidecar ({where / 'detjax'}: {why})",
            detjax=ocp.args.JsonRestore()).get("detjax")
        if not isinstance(sidecar, dict) or "state_sha256" not in sidecar:
            raise CheckpointCorruptError(f"checkpoint {where}: sidecar is malformed")
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
        restored = self._restore_items(step, lambda why: f"checkpoint {where} could not be restored ({why})",
                                       state=ocp.args.StandardRestore(state_target),
                                       best=ocp.args.StandardRestore(best_target))
        for item, tree in (("state", restored["state"]), ("best", restored["best"])):
            try:
                actual = hashing.tree_sha256(tree)
            except Exception as exc:
                raise CheckpointCorruptError(f"checkpoint {where / item} cannot be hashed ({_short(exc)})") from None
            if actual != sidecar.get(f"{item}_sha256"):
                raise CheckpointCorruptError(
                    f"checkpoint {where / item}: the restored arrays hash to {actual}, but the sidecar "
                    f"{where / 'detjax'} recorded {sidecar.get(f'{item}_sha256')}; the checkpoint is corrupt")
        return restored["state"], restored["best"], sidecar

    def restore_latest(self, state_target: dict, best_target: dict) -> tuple[dict, dict, dict] | None:
        """Restores the newest checkpoint, or returns ``None`` when there is none.

        A refused checkpoint closes the manager and raises; a corrupt one's message names the
        newest earlier checkpoint that verifies and how to resume from it.
        """
        step = self.latest_step()
        if step is None:
            return None
        try:
            return self.restore(step, state_target, best_target)
        except CheckpointMismatchError:
            self.close()
            raise
        except CheckpointCorruptError as exc:
            message = f"{exc}. {self._way_forward(step, state_target, best_target)}"
            self.close()
            raise CheckpointCorruptError(message) from None

    def newest_intact(self, before: int, state_target: dict, best_target: dict) -> int | None:
        """The newest step below ``before`` whose checkpoint restores and verifies, or ``None``."""
        for step in sorted((s for s in self.steps if s < before), reverse=True):
            try:
                self.restore(step, state_target, best_target)
            except CheckpointError:
                continue
            return step
        return None

    def _way_forward(self, step: int, state_target: dict, best_target: dict) -> str:
        corrupt = self.directory / str(step)
        earlier = self.newest_intact(step, state_target, best_target)
        if earlier is None:
            return ("No earlier checkpoint is intact, so this run cannot be resumed; nothing was changed. "
                    "Start it again in a new run directory (another --out)")
        aside = self.directory.parent / f"corrupt-checkpoint-{step}"
        return (f"The earlier checkpoint {self.directory / str(earlier)} (after epoch {earlier}) is intact; "
                f"nothing was changed. To continue from it, move the corrupt one aside "
                f"(mv {corrupt} {aside}) and resume again (--resume)")

    def close(self) -> None:
        """Waits for pending writes and stops orbax's background threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        self._manager.close()


logging.getLogger("absl").setLevel(logging.WARNING)
