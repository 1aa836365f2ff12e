"""The data directory's layout: where prepared datasets live, and how they get there atomically.

Layout::

  <data_dir>/<name>/<version>/      a prepared dataset: tfds's dataset_info.json, features.json,
                                    <name>-<split>.array_record-*, and jvdm.json (below)
  <data_dir>/downloads/             downloaded source archives, complete ones only (kept)
  <data_dir>/.jvdm-staging/<name>/  datasets being prepared (removed by the next prepare)
  <data_dir>/.jvdm-build-<name>.lock

A dataset is prepared into the staging folder and renamed into ``<name>/<version>`` only when
complete, with its ``jvdm.json`` already inside: a prepare that is killed leaves nothing under
``<name>/`` that a read could take for prepared data, and the next prepare starts afresh.
``jvdm.json`` records the shape, the splits and where the data came from; a user's image folder
is registered by it alone (``"kind": "images"``), so its shape is known without importing tfds.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jvdm.datasets.errors import DatasetNotPreparedError

__all__ = [
    "META_FILE",
    "build_lock",
    "commit",
    "get_data_dir",
    "prepared_dir",
    "read_meta",
    "staging",
    "user_datasets",
]

META_FILE = "jvdm.json"
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def get_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``.

    Read at call time (not at import, as tfds does) so that scripts may set the variable late.
    """
    if data_dir is None:
        data_dir = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return Path(data_dir).expanduser().resolve()


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(p) for p in path.name.split("."))


def prepared_dir(name: str, data_dir: Path) -> Path | None:
    """The newest ``<data_dir>/<name>/<version>`` holding dataset_info.json and array_record files.

    Only folders named like a version count (tfds's own ``*.incomplete*`` folders never do).

    Raises:
      DatasetNotPreparedError: the dataset is prepared, but only in another file format.
    """
    candidates = sorted(
        (
            p.parent
            for p in (data_dir / name).glob("*/dataset_info.json")
            if _VERSION.match(p.parent.name)
        ),
        key=_version_key,
        reverse=True,
    )
    for version_dir in candidates:
        if any(version_dir.glob("*.array_record-*")):
            return version_dir
    if candidates:
        raise DatasetNotPreparedError(
            f"{name} is prepared in {candidates[0]}, but not in array_record format, which jvdm "
            f"needs to read it without TensorFlow. Move that directory away and run "
            f"`jvdm data prepare {name}` (it writes array_record files)."
        )
    return None


def read_meta(version_dir: Path) -> dict[str, Any]:
    """The ``jvdm.json`` of a prepared version, or ``{}`` (data prepared by tfds itself)."""
    path = version_dir / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def user_datasets(data_dir: Path) -> dict[str, dict[str, Any]]:
    """``{name: jvdm.json}`` of the image-folder datasets prepared under ``data_dir``."""
    found = {}
    for meta_path in sorted(data_dir.glob(f"*/*/{META_FILE}")):
        if not _VERSION.match(meta_path.parent.name):
            continue
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") == "images":
            found[meta_path.parent.parent.name] = meta
    return found


@contextlib.contextmanager
def build_lock(data_dir: Path, name: str) -> Iterator[None]:
    """Serialises the preparation of one dataset across processes (released if one is killed)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / f".jvdm-build-{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def staging(data_dir: Path, name: str) -> Iterator[Path]:
    """A fresh folder to prepare ``name`` in; call inside :func:`build_lock`.

    Leftovers of killed prepares of ``name`` are removed first, and the folder is removed on exit
    (whatever was committed out of it with :func:`commit` stays).
    """
    root = data_dir / ".jvdm-staging" / name
    shutil.rmtree(root, ignore_errors=True)
    tmp = root / uuid.uuid4().hex
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(root, ignore_errors=True)


def commit(version_dir: Path, data_dir: Path, name: str, meta: dict[str, Any]) -> Path:
    """Writes ``jvdm.json`` into a complete staged version and renames it into place (atomic)."""
    (version_dir / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    target = data_dir / name / version_dir.name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(version_dir, target)  # Same file system: the staging folder is inside data_dir.
    return target
