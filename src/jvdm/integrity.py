"""A checksum per checkpoint, so that a damaged checkpoint is detected instead of restored.

orbax writes a step to a temporary directory and renames it when the save commits, so a save that
was interrupted never looks finished; but it does not checksum the array data, so a bit flipped on
disk, a truncated file or a deleted chunk can restore as wrong numbers, or fail deep inside
tensorstore. After each save has finished, ``<step>/jvdm_checksum.json`` records the sha256 and
size of every file of the step; it is written atomically (temporary file, fsync, ``os.replace``),
so it exists only once every file it names was complete.

A step directory is then *verified* (its files match), *unverified* (no checksum file: written by
an older jvdm, or killed between orbax's commit and the checksum) or *corrupt*
(:class:`CorruptCheckpointError`). Only the standard library is used: :mod:`jvdm.evaluate` checks
checkpoints without the trainer.
"""

from __future__ import annotations

import hashlib
import json
import os

from jvdm.errors import JvdmUserError

__all__ = ["CHECKSUM_FILE", "CorruptCheckpointError", "check_step", "write_checksum"]

CHECKSUM_FILE = "jvdm_checksum.json"
_FORMAT = 1


class CorruptCheckpointError(JvdmUserError):
    """A checkpoint whose files do not match its checksum, or that cannot be read."""


def _files(step_dir: str) -> list[str]:
    """Every file under ``step_dir`` but the checksum itself, as sorted relative paths."""
    out = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != CHECKSUM_FILE and not rel.startswith(CHECKSUM_FILE + "."):
                out.append(rel)
    return sorted(out)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksum(step_dir: str) -> str:
    """Writes ``step_dir/jvdm_checksum.json`` for the files now in ``step_dir``; returns it."""
    files = {}
    for rel in _files(step_dir):
        path = os.path.join(step_dir, rel)
        files[rel] = {"sha256": _sha256(path), "size": os.path.getsize(path)}
    path = os.path.join(step_dir, CHECKSUM_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"format": _FORMAT, "algorithm": "sha256", "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: the checksum is either absent or complete
    return path


def check_step(step_dir: str) -> bool:
    """Checks a step directory against its checksum.

    Returns:
      ``True`` if every recorded file is present with its recorded size and sha256; ``False`` if
      the step has no checksum file (unverified).

    Raises:
      CorruptCheckpointError: a file is missing, has another size or content, or the checksum
        file itself is unreadable; the message names the step directory and the files.
    """
    path = os.path.join(step_dir, CHECKSUM_FILE)
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(f"{step_dir}: unreadable {CHECKSUM_FILE} ({err})") from None
    bad = []
    for rel, want in sorted(files.items()):
        file = os.path.join(step_dir, rel)
        if not os.path.isfile(file):
            bad.append(f"{rel} missing")
        elif os.path.getsize(file) != want.get("size"):
            bad.append(f"{rel} has {os.path.getsize(file)} bytes, expected {want.get('size')}")
        elif _sha256(file) != want.get("sha256"):
            bad.append(f"{rel} has another sha256 than when it was saved")
    if bad:
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CorruptCheckpointError(
            f"checkpoint {step_dir} is corrupt: " + "; ".join(bad[:3]) + more
        )
    return True
