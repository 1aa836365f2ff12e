"""Downloads with a progress bar, and SHA-256 verification of source files.

One attempt, no retry loop: a machine without network learns so within ``TIMEOUT_S`` (a refused or
unresolvable host at once), with a message that names the file and ``--from``. tfds's own download
manager is never used (offline it retries for minutes).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from jvdm.datasets.catalog import RemoteFile
from jvdm.datasets.errors import DownloadError

__all__ = ["TIMEOUT_S", "fetch", "mismatch", "sha256_file"]

# Seconds a connection, and each read, may wait. Short enough that an offline prepare fails well
# within 10 s; a transfer that stalls this long fails too (rerun it, or fetch the file elsewhere).
TIMEOUT_S = 8.0
_CHUNK = 1 << 20
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError)


def _bar(total: int, desc: str):
    from tqdm import tqdm  # Deferred: only a download draws a bar.

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, leave=False)


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, hex; shows a progress bar for large files."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, _bar(size, f"sha256 {path.name}") as bar:
        bar.disable = size < (256 << 20)
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def mismatch(path: Path, expected: RemoteFile) -> str | None:
    """Why ``path`` is not the published file (its size or SHA-256 differ), or None."""
    size = path.stat().st_size
    if size != expected.size:
        return f"{path} has {size} bytes, the published {expected.name} has {expected.size}"
    digest = sha256_file(path)
    if digest != expected.sha256:
        return f"{path} has sha256 {digest}, the published {expected.name} has {expected.sha256}"
    return None


def fetch(remote: RemoteFile, dest_dir: Path, *, url: str, hint: str) -> Path:
    """Downloads ``url`` to ``dest_dir / remote.name`` (kept for reuse); not verified here.

    The file appears under its name only once complete (it is written as ``NAME.part`` first).

    Raises:
      DownloadError: no connection, a timeout, an HTTP error; the message ends with ``hint``.
    """
    dest = dest_dir / remote.name
    if dest.is_file():
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{remote.name}.part")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or remote.size)
            with _bar(total, remote.name) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except _NETWORK_ERRORS as err:
        part.unlink(missing_ok=True)
        reason = getattr(err, "reason", None) or err
        raise DownloadError(f"could not download {url} ({reason}); {hint}") from err
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest
