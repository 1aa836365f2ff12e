"""Errors of the data layer; every one is the user's to fix, so all derive from `JvdmUserError`."""

from jvdm.errors import JvdmUserError

__all__ = ["ArchiveError", "DatasetError", "DatasetNotPreparedError", "DownloadError"]


class DatasetError(JvdmUserError):
    """An unknown dataset name, or a dataset that cannot be prepared as asked."""


class DatasetNotPreparedError(DatasetError):
    """A standard dataset has not been prepared (in array_record format) under the data dir."""


class ArchiveError(DatasetError):
    """A source archive that is not what was expected: checksum, truncation, a missing member."""


class DownloadError(DatasetError):
    """A download that failed (offline, refused, timed out, HTTP error); names ``--from``."""
