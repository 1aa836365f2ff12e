"""Locating a standard dataset's source files (``--from``, or a download) and verifying them.

``--from PATH`` may be one archive (for a dataset of one file), or a folder holding the published
files under their published names, or what unpacking them gives (``cifar-10-batches-bin/``,
``train_32x32/``, ``train-images-idx3-ubyte``, ...). Archives are checked against their published
size and SHA-256; unpacked files cannot be, so they, like a mismatch, need ``--skip-checksum``,
which turns the error into a warning. Without ``--from``, the files are downloaded into
``<data_dir>/downloads`` (from ``$JVDM_DATA_MIRROR/<file name>`` when that is set).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from jvdm.datasets import download
from jvdm.datasets.catalog import RemoteFile, Spec
from jvdm.datasets.errors import ArchiveError, DatasetError

__all__ = ["MIRROR_ENV", "locate"]

MIRROR_ENV = "JVDM_DATA_MIRROR"


def _offline_hint(name: str, remote: RemoteFile) -> str:
    return (
        f"fetch {remote.name} (from {remote.url}) on a machine with network and run "
        f"`jvdm data prepare {name} --from DIR` with DIR holding it"
    )


def _find(name: str, spec: Spec, remote: RemoteFile, source: Path) -> tuple[Path, bool]:
    """``(path, is_archive)`` of ``remote`` in ``--from source``."""
    files = spec.all_files()
    if source.is_file():
        if source.name == remote.name or len(files) == 1:
            return source, True
        raise DatasetError(
            f"--from {source}: {name} needs {len(files)} files ({', '.join(f.name for f in files)})"
            "; pass the folder that holds them"
        )
    if not source.is_dir():
        raise DatasetError(f"--from {source}: no such file or folder")
    if (source / remote.name).is_file():
        return source / remote.name, True
    if (source / remote.extracted).exists():
        return source / remote.extracted, False
    if source.name == remote.extracted:
        return source, False
    raise ArchiveError(
        f"--from {source} holds neither {remote.name} nor its unpacked {remote.extracted}; "
        f"download {remote.url} into it"
    )


def _download(name: str, spec: Spec, remote: RemoteFile, data_dir: Path) -> Path:
    mirror = os.environ.get(MIRROR_ENV)
    if not spec.downloadable and not mirror:
        raise DatasetError(
            f"{name}'s files ({', '.join(f.name for f in spec.all_files())}) need a login at "
            f"image-net.org: download them there and run `jvdm data prepare {name} --from DIR` "
            "with DIR holding them"
        )
    url = f"{mirror.rstrip('/')}/{remote.name}" if mirror else remote.url
    return download.fetch(remote, data_dir / "downloads", url=url, hint=_offline_hint(name, remote))


def locate(
    name: str,
    spec: Spec,
    data_dir: Path,
    *,
    source: Path | None,
    skip_checksum: bool,
    warn: Callable[[str], None],
) -> tuple[dict[str, Path], bool]:
    """``({published file name: path}, all_verified)`` for every source file of ``spec``.

    Raises:
      ArchiveError: a file that is missing, or differs from the published one (without
        ``skip_checksum``); a downloaded file that differs is deleted.
      DownloadError: a download that failed.
    """
    paths, all_verified = {}, True
    for remote in spec.all_files():
        if source is None:
            path, is_archive = _download(name, spec, remote, data_dir), True
        else:
            path, is_archive = _find(name, spec, remote, Path(source))
        if is_archive:
            problem = download.mismatch(path, remote)
        else:
            problem = (
                f"{path} is unpacked, so it cannot be checked against the published sha256 of "
                f"{remote.name}"
            )
        if problem:
            all_verified = False
            if not skip_checksum:
                if source is None:
                    path.unlink()  # A bad download must not be reused by the next attempt.
                raise ArchiveError(
                    f"{problem}; download {remote.url} again, or pass --skip-checksum to use "
                    "it anyway (a repacked or synthetic archive)"
                )
            warn(f"{problem}; used unverified (--skip-checksum)")
        paths[remote.name] = path
    return paths, all_verified
