"""Reading the members of tar, tar.gz and zip archives, gzip files and extracted folders alike.

Every failure of the underlying library (a truncated archive, a bad CRC, a file that is no archive
at all) becomes one :class:`ArchiveError` naming the file, so a corrupt download never surfaces as
a traceback from ``tarfile`` half way through a prepare.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from jvdm.datasets.errors import ArchiveError

__all__ = ["iter_members", "read_file", "read_members"]

# What the standard library raises on a damaged archive or compressed stream.
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile, OSError)


@contextlib.contextmanager
def _as_archive_error(path: Path, hint: str) -> Iterator[None]:
    try:
        yield
    except ArchiveError:
        raise
    except _CORRUPT as err:
        what = type(err).__name__
        raise ArchiveError(
            f"{path} is truncated or not a valid archive ({what}: {err}); {hint}"
        ) from err


def _iter_dir(root: Path) -> Iterator[tuple[str, bytes]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            yield path.relative_to(root).as_posix(), path.read_bytes()


def _iter_tar(path: Path) -> Iterator[tuple[str, bytes]]:
    # Stream mode ("r|*"): one sequential pass, no index of all members in memory (the ImageNet
    # train tarballs hold 1.28M files); gzip is detected from the content.
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if member.isfile():
                f = tar.extractfile(member)
                assert f is not None
                yield member.name, f.read()


def _iter_zip(path: Path) -> Iterator[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.is_dir():
                yield info.filename, zf.read(info)  # raises BadZipFile on a CRC mismatch


def iter_members(path: Path, *, hint: str = "") -> Iterator[tuple[str, bytes]]:
    """``(relative name, content)`` of every regular file in an archive or a folder, in order.

    Raises:
      ArchiveError: the file is truncated, damaged, or not a tar/zip archive.
    """
    path = Path(path)
    with _as_archive_error(path, hint):
        if path.is_dir():
            yield from _iter_dir(path)
        elif zipfile.is_zipfile(path):
            yield from _iter_zip(path)
        else:
            yield from _iter_tar(path)


def read_members(path: Path, wanted: list[str], *, hint: str = "") -> dict[str, bytes]:
    """The members of ``path`` whose base names are in ``wanted``, keyed by base name.

    Raises:
      ArchiveError: a wanted member is missing, present twice, or the archive is damaged.
    """
    found: dict[str, bytes] = {}
    for name, content in iter_members(path, hint=hint):
        base = name.rsplit("/", 1)[-1]
        if base in wanted:
            if base in found:
                raise ArchiveError(f"{path} holds {base} twice; {hint}")
            found[base] = content
    missing = [w for w in wanted if w not in found]
    if missing:
        raise ArchiveError(f"{path} lacks {', '.join(missing)}; {hint}")
    return found


def read_file(path: Path, *, hint: str = "") -> bytes:
    """The content of a file, gunzipped if its name ends in ``.gz``."""
    path = Path(path)
    with _as_archive_error(path, hint):
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
