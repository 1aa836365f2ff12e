"""A run's work directory: its layout (the one home of these names), and guards checked before any
training: writable, big enough, not shared.

Layout: ``config.json`` (:data:`CONFIG_FILE`), ``checkpoints/<step>/`` (:data:`CHECKPOINT_DIR`),
``metrics.jsonl`` (:data:`METRICS_FILE`), ``time_budget.json`` (:data:`BUDGET_FILE`, a budgeted
run's step count) and the lock file ``.lock`` (:data:`LOCK_FILE`). Its small JSON files are written
by :func:`write_json`, atomically.

* :func:`check_writable` creates the directory and writes, syncs and deletes a probe file, so a
  path under a regular file, a read-only file system or a missing permission fails in a second
  with a message, not after the first compile when the first checkpoint is saved.
* :func:`check_free_space` compares the free space with the size of one checkpoint.
* :func:`lock` holds ``workdir/.lock`` with ``fcntl.flock`` for the life of a run: a second trainer
  on the same directory is refused with the holder's PID. The kernel releases the lock when the
  holder dies, however it dies (``kill -9`` included), so a stale lock file never blocks a run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
import warnings
from collections.abc import Iterator

from jvdm.errors import JvdmUserError

__all__ = [
    "BUDGET_FILE",
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "LOCK_FILE",
    "METRICS_FILE",
    "WorkdirError",
    "check_free_space",
    "check_writable",
    "lock",
    "write_json",
]

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
BUDGET_FILE = "time_budget.json"


def write_json(path: str, tree) -> str:
    """Writes ``tree`` as indented, key-sorted JSON to ``path`` atomically (a temporary file, then
    ``os.replace``: a crash never leaves half a file); returns ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(tree, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


class WorkdirError(JvdmUserError):
    """The work directory cannot be used: not writable, too little space, or in use."""


def check_writable(workdir: str) -> None:
    """Creates ``workdir`` if needed and proves that files can be written, synced and removed."""
    probe = os.path.join(workdir, f".write_probe.{os.getpid()}")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"jvdm write probe\n")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise WorkdirError(
            f"the work directory {workdir!r} is not writable ({reason}: "
            f"{err.filename or workdir}); checkpoints, metrics and the config are written there. "
            "Choose another --workdir or fix its permissions"
        ) from err


def check_free_space(workdir: str, checkpoint_bytes: int, *, keep: int) -> None:
    """Raises if one checkpoint of ``checkpoint_bytes`` cannot fit; warns if ``keep + 1`` cannot."""
    free = shutil.disk_usage(workdir).free
    need = int(checkpoint_bytes * 1.1) + (1 << 20)  # metadata, metrics and events
    if free < need:
        raise WorkdirError(
            f"{workdir!r} has {free / 2**20:.1f} MiB free, but one checkpoint of this model takes "
            f"about {need / 2**20:.1f} MiB (error {errno.ENOSPC}, no space left on device); "
            "free some space or choose another --workdir"
        )
    if free < need * (keep + 1):
        warnings.warn(
            f"{workdir!r} has {free / 2**20:.1f} MiB free: fewer than the {keep + 1} checkpoints "
            f"of about {need / 2**20:.1f} MiB each that train.keep_checkpoints={keep} needs "
            "(the checkpoints kept plus the one being written); a save may fail with a full disk",
            stacklevel=2,
        )


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "a process whose PID is not recorded yet"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("time", 0)))
    return f"PID {info['pid']} on host {info.get('host', '?')}, since {since}"


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[str]:
    """Holds the exclusive lock of ``workdir`` (which must exist) while the block runs.

    Raises:
      WorkdirError: another process (or another run in this process) holds it; names its PID.
    """
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirError(
                f"the work directory {workdir!r} is in use by another training run "
                f"({_holder(fd)}; lock file {path}). Two trainers on one directory would "
                "overwrite each other's checkpoints: wait for it, stop it, or use another --workdir"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
