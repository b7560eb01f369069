"""Exceptions of migrated, saying whose fault a failure is.

``MigrationError`` is the root. ``LocalError`` is our own side failing (a
source we cannot read, a disk we cannot write); ``RemoteError`` is the peer
sending something wrong or reporting a failure. Codec and record errors are
remote errors and also ``ValueError``s, since they come from parsing bytes.
"""
from __future__ import annotations

import contextlib


class MigrationError(Exception):
    """Root of every error migrated raises on purpose."""

    #: short machine-readable reason, sent to the peer in an ERROR message
    code = "error"


class LocalError(MigrationError):
    """This side failed: source, disk, configuration, permissions."""

    code = "local"


class SourceFault(LocalError):
    """Memory the sender was reading went away under it (a mapped source
    file truncated mid-pass)."""

    code = "source"


class RemoteError(MigrationError):
    """The peer sent invalid data or reported a failure."""

    code = "protocol"


class DecodeError(RemoteError, ValueError):
    """An XBZRLE delta violates the format; ``offset`` is where, in the delta."""

    code = "bad-delta"

    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.offset = offset


class RecordError(RemoteError, ValueError):
    """A page record is invalid; ``offset`` is the record's stream offset."""

    code = "bad-record"

    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.offset = offset


class ProtocolError(RemoteError, ValueError):
    """A control message is malformed or arrives in the wrong state."""

    code = "protocol"


class PeerError(RemoteError):
    """The peer reported an error; its message is carried verbatim."""

    def __init__(self, message: str, code: str = "peer"):
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def first_migration_error():
    """Re-raise a nursery's ExceptionGroup as the failure inside it: the first
    MigrationError, else its exception when all are of one kind (one task
    failing cancels its siblings; the failure is what matters, not the group)."""
    try:
        yield
    except BaseExceptionGroup as group:
        match, _ = group.split(MigrationError)
        if match is not None:
            raise next(_leaves(match)) from None
        leaves = list(_leaves(group))
        # siblings cancelled because one task failed: the failure, not the Cancelled
        errors = [e for e in leaves if isinstance(e, Exception)] or leaves
        if all(type(e) is type(errors[0]) for e in errors):
            raise errors[0] from None
        raise


def _leaves(exc):
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            yield from _leaves(e)
    else:
        yield exc
