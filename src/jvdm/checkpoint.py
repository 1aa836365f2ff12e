"""Checkpoints with orbax, and the run's configuration next to them.

A work directory holds ``checkpoints/<step>`` (orbax ``StandardSave`` of the whole training state)
next to ``config.json`` (:mod:`jvdm.run_config`, which also compares a resumed run's config with
the saved one, so that a change of architecture is an error that names the fields). Saves are
asynchronous: ``save`` returns once the arrays are copied off the accelerator and the files are
written in the background; :func:`close` (or ``manager.wait_until_finished()``) waits for them.

Restoring takes an *abstract* target (``jax.ShapeDtypeStruct`` leaves carrying the shardings wanted
now), so a state saved on 4 devices restores onto 1 and vice versa.

Faults lose nothing (see :mod:`jvdm.integrity`): every finished step gets a checksum, which
:func:`restore_latest` verifies, falling back to the newest good step (with a warning naming the
bad one, which it moves out of the way to ``checkpoints_rejected/``). Old steps are deleted only
after a newer one has been saved *and* checksummed, so a save that fails (a full disk) never costs
an older checkpoint: it raises :class:`CheckpointSaveError` instead.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import time
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from jvdm import integrity
from jvdm.errors import JvdmUserError
from jvdm.workdir import CHECKPOINT_DIR

__all__ = [
    "CHECKPOINT_DIR",
    "CheckpointMismatchError",
    "CheckpointSaveError",
    "close",
    "make_manager",
    "poll",
    "restore",
    "restore_latest",
    "save",
]


def _is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` or any exception it wraps (orbax re-raises tensorstore's and the OS's
    errors inside its own) is ENOSPC."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if getattr(err, "errno", 0) == errno.ENOSPC or "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); older ones are untouched."""


class CheckpointMismatchError(JvdmUserError):
    """A checkpoint's arrays do not fit the requested state (another model)."""


class _Manager(ocp.CheckpointManager):
    """orbax's manager plus a checksum per finished step, and ``keep`` applied only to steps that
    are checksummed (orbax itself deletes old steps even when the newer save fails)."""

    def __init__(self, directory: str, *, keep: int, options: ocp.CheckpointManagerOptions):
        super().__init__(directory, options=options)
        self.keep = keep
        self.sealed: set[int] = set()  # steps known good: checksummed, or verified on restore
        self._unsealed: list[int] = []  # saved by this manager; checksum not written yet

    def step_dir(self, step: int) -> str:
        return os.path.join(os.fspath(self.directory), str(step))

    def save(self, step: int, *args, **kwargs) -> bool:
        self.wait_until_finished()  # orbax waits here anyway: seal the previous step first
        try:
            saved = super().save(step, *args, **kwargs)
        except Exception as err:  # the synchronous part of the save failed (a full disk)
            self._unsealed.append(step)
            self._fail(err)
        if saved:
            self._unsealed.append(step)
        return saved

    def wait_until_finished(self) -> None:
        try:
            super().wait_until_finished()
            self.check_for_errors()
            self._seal()  # the checksum file is part of the save: a full disk can fail it too
        except Exception as err:
            self._fail(err)
        self._prune()

    def _remove_failed(self, failed: list[int]) -> None:
        """Frees the space of failed saves: their step directories (written but never checksummed:
        not checkpoints) and every temporary directory of a save (none is in flight now)."""
        try:  # orbax's writer threads may still be closing files of the failed save
            super().wait_until_finished()
        except Exception:
            pass
        root = os.fspath(self.directory)
        for _ in range(50):
            doomed = [self.step_dir(s) for s in failed if os.path.isdir(self.step_dir(s))]
            doomed += glob.glob(os.path.join(root, "*.orbax-checkpoint-tmp*"))
            if not doomed:
                return
            for path in doomed:
                shutil.rmtree(path, ignore_errors=True)
            time.sleep(0.05)

    def _fail(self, err: BaseException) -> None:
        """Cleans up after a failed save and raises :class:`CheckpointSaveError` naming it."""
        failed = [s for s in self._unsealed if s not in self.sealed]
        self._unsealed = []
        if jax.process_index() == 0:
            self._remove_failed(failed)
        kept = sorted(s for s in self.sealed if os.path.isdir(self.step_dir(s)))
        text = " ".join(str(err).split())
        full = _is_disk_full(err)
        reason = "the disk is full (No space left on device)" if full else text[:400]
        raise CheckpointSaveError(
            f"saving checkpoint {', '.join(map(str, failed)) or '?'} in {self.directory} "
            f"failed: {reason}. No older checkpoint was deleted: "
            + (
                f"steps {kept} are intact; rerun to resume from step {kept[-1]}."
                if kept
                else "none had been saved."
            )
        ) from err

    def _seal(self) -> None:
        """Writes the checksums of the finished saves (process 0; the files are shared)."""
        for step in self._unsealed:
            if os.path.isdir(self.step_dir(step)):
                if jax.process_index() == 0:
                    integrity.write_checksum(self.step_dir(step))
                self.sealed.add(step)
        self._unsealed = []

    def poll(self) -> None:
        """Seals a finished asynchronous save without waiting (cheap; call it every step)."""
        if not self._unsealed or self.is_saving_in_progress():
            return
        if jax.process_count() == 1:
            self.wait_until_finished()  # returns at once; raises if the save failed; prunes
        elif jax.process_index() == 0:
            self._seal()  # no pruning here: its deletes synchronise all processes

    def _prune(self) -> None:
        newest = sorted(self.sealed)[-self.keep :]
        if len(newest) < self.keep:
            return
        for step in self.all_steps():
            if step < newest[0]:
                self.delete(step)
                self.sealed.discard(step)


def make_manager(workdir: str, *, keep: int, cleanup_tmp: bool = False) -> _Manager:
    """An orbax manager for ``workdir/checkpoints``, keeping the ``keep`` latest, saving async.

    ``cleanup_tmp`` removes the temporary directories of saves that never finished (a killed run);
    only the process that holds the work directory's lock may ask for it.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None,  # applied by _Manager, after the newer step is checksummed
        enable_async_checkpointing=True,
        create=True,
        cleanup_tmp_directories=cleanup_tmp,
    )
    return _Manager(
        os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR), keep=keep, options=options
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Starts an asynchronous save of ``state`` as checkpoint ``step`` (all processes call it).

    Raises:
      CheckpointSaveError: the *previous* asynchronous save failed (its error surfaces here).
    """
    manager.save(step, args=ocp.args.StandardSave(state), force=True)


def poll(manager: ocp.CheckpointManager) -> None:
    """Checksums a save that finished in the background, without blocking."""
    if isinstance(manager, _Manager):
        manager.poll()


def _key_path(path) -> tuple:
    """A pytree path as plain names and indices (orbax's metadata turns attributes into keys)."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
    return tuple(out)


def _shape_mismatches(manager: ocp.CheckpointManager, step: int, abstract: Any) -> list[str]:
    """Leaves whose saved shape differs from the target's, as readable strings (best effort)."""
    try:
        saved = manager.item_metadata(step)
        saved_shapes = {
            _key_path(path): getattr(meta, "shape", None)
            for path, meta in jax.tree_util.tree_leaves_with_path(saved)
        }
    except Exception:  # metadata is optional: fall back to orbax's own error
        return []
    out = []
    for path, target in jax.tree_util.tree_leaves_with_path(abstract):
        shape = saved_shapes.get(_key_path(path))
        if shape is not None and tuple(shape) != tuple(target.shape):
            out.append(f"{jax.tree_util.keystr(path)}: saved {tuple(shape)}, now {target.shape}")
    return out


def restore(manager: ocp.CheckpointManager, step: int, abstract: Any) -> Any:
    """Restores checkpoint ``step`` into the structure, dtypes and shardings of ``abstract``.

    Args:
      manager: from :func:`make_manager`.
      step: which checkpoint (e.g. ``manager.latest_step()``).
      abstract: a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set (``jax.eval_shape`` of
        the state's constructor); its static metadata is kept in the result.
    """
    # The saved shapes are compared first, from the checkpoint's metadata: a restore that orbax
    # starts and then fails on a shape leaves its other reads' coroutines unfinished (they surface
    # later as "Exception ignored in: <coroutine ...>" in whatever code runs next), and it reads
    # data for nothing. Orbax's own error remains the fallback where the metadata says nothing.
    bad = _shape_mismatches(manager, step, abstract)
    if bad:
        raise CheckpointMismatchError(
            f"checkpoint {step} in {manager.directory} does not fit this config: "
            + "; ".join(bad[:5])
            + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        )
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def _reject(manager: _Manager, step: int, reason: str) -> str:
    """Moves step ``step`` to ``checkpoints_rejected/`` (kept for inspection, never restored)."""
    target = os.path.join(
        os.path.dirname(os.fspath(manager.directory)),
        f"{CHECKPOINT_DIR}_rejected",
        f"{step}-{reason}-{time.strftime('%Y%m%d-%H%M%S')}",
    )
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(manager.step_dir(step), target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jvdm_reject_{step}")
    return target


_UNVERIFIED = object()  # a step without a checksum, told apart from a restored state


def _restore_or_reject(manager: _Manager, step: int, abstract: Any, *, verify: bool, problem: str):
    """The state at ``step``; ``_UNVERIFIED`` if ``verify`` and it has no checksum; ``None`` after
    moving a step that fails its checksum or cannot be restored aside, with a warning that says
    it ``problem``."""
    try:
        if verify and not integrity.check_step(manager.step_dir(step)):
            return _UNVERIFIED
        return restore(manager, step, abstract)
    except CheckpointMismatchError:
        raise
    except Exception as err:  # corrupt: a checksum mismatch, or orbax cannot read it
        moved = _reject(manager, step, "corrupt")
        warnings.warn(
            f"checkpoint {step} in {manager.directory} {problem} "
            f"({' '.join(str(err).split())[:300]}); moved to {moved}"
            + ("; falling back to an older checkpoint" if verify else ""),
            stacklevel=3,
        )
        return None


def restore_latest(manager: _Manager, abstract: Any) -> tuple[int | None, Any]:
    """``(step, state)`` of the newest checkpoint that verifies, or ``(None, None)`` if none.

    A corrupt step (its files do not match its checksum, or it fails to restore) and an
    unverified step newer than a verified one (killed between orbax's commit and the checksum)
    are skipped with a warning naming them, and moved to ``checkpoints_rejected/`` so that the
    resumed run can save those steps again. With no verified step at all (checkpoints of an older
    jvdm), the newest one that restores is used, with a warning.

    Raises:
      CheckpointMismatchError: a checkpoint does not fit ``abstract`` (another model).
    """
    unverified = []
    for step in sorted(manager.all_steps(), reverse=True):
        problem = "is corrupt and was not restored"
        state = _restore_or_reject(manager, step, abstract, verify=True, problem=problem)
        if state is _UNVERIFIED:
            unverified.append(step)
        elif state is not None:
            for newer in unverified:
                moved = _reject(manager, newer, "unverified")
                warnings.warn(
                    f"checkpoint {newer} in {manager.directory} has no {integrity.CHECKSUM_FILE} "
                    "(its run was killed before the save was verified), so it is not trusted; "
                    f"moved to {moved}; resuming from the verified checkpoint {step}",
                    stacklevel=2,
                )
            manager.reload()
            manager.sealed.update(s for s in manager.all_steps() if s <= step)
            return step, state
    for step in unverified:
        problem = "cannot be restored"
        state = _restore_or_reject(manager, step, abstract, verify=False, problem=problem)
        if state is not None:
            warnings.warn(
                f"checkpoint {step} in {manager.directory} has no {integrity.CHECKSUM_FILE} and "
                "no verified checkpoint is older: restoring it unverified",
                stacklevel=2,
            )
            manager.reload()
            return step, state
    manager.reload()
    return None, None


def close(manager: ocp.CheckpointManager) -> None:
    """Waits for pending asynchronous saves (checksumming them), then releases the manager.

    Raises:
      CheckpointSaveError: a pending save failed (the manager is released all the same).
    """
    try:
        manager.wait_until_finished()
    finally:
        manager.close()
