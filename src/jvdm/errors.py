"""The one base class for errors that are the caller's fault.

Every error that a user can fix — a config typo, a wrong image shape, an unknown or unprepared
dataset, a corrupt archive or checkpoint, a work directory in use — derives from `JvdmUserError`.
It is a `ValueError`, so ``except ValueError`` in users' scripts keeps working. The ``jvdm`` command
turns exactly this class into one line on stderr and exit status 2; anything else is a bug in jvdm
and shows its traceback.
"""

__all__ = ["JvdmUserError"]


class JvdmUserError(ValueError):
    """A mistake of the caller, explained in one line that says what to do."""
