"""Every exception migrated raises on purpose, and the codes they carry.

The tree says whose fault a failure is:

    MigrationError                  root; ``code`` goes to the peer in ERROR
    ├── LocalError                  this side failed (source, disk, freeze, our own misuse)
    ├── RemoteError                 the peer sent invalid data, vanished, or reported a failure
    ├── NetworkError                the connection between the two failed
    └── MigrationCancelled          an operator or a signal stopped it

Protocol errors follow h11: ``ProtocolError`` is their root (and a
``ValueError``); the protocol's own checks raise ``LocalProtocolError`` (we
were asked to do something the protocol forbids), and the one place that
reads the peer's bytes, ``Connection.next_event``, turns that into a
``RemoteProtocolError`` (the peer did it). Codec and record errors come from
parsing bytes, so they are ``ValueError``s too.

``CODES`` is the table of codes, one line each; docs/format.md mirrors it and
a test keeps the two equal.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

#: code -> what it means; every code an ERROR record or a summary can carry
CODES: dict[str, str] = {
    "bad-delta": "an XBZRLE delta breaks the format",
    "bad-record": "a page record or block list is invalid (flags, block, offset, length, name)",
    "busy": "the receiver is already receiving an image of that name",
    "cancelled": "the migration was cancelled (a signal to the sender)",
    "digest-mismatch": "the image the receiver holds is not the one the sender sent; nothing was committed",
    "disconnected": "the peer closed the connection or it broke",
    "forbidden": "the client's certificate is not allowed to migrate an image of that name (--tls-allow)",
    "freeze": "the source process could not be frozen for the final pass",
    "idle-timeout": "the peer sent nothing for longer than the idle timeout",
    "internal": "a bug in migrated (the message has the detail)",
    "limit": "a limit of the receiver was reached (connections, migrations at once); retry later or raise it",
    "network": "connecting, sending or waiting for the receiver failed",
    "no-space": "the receiver's image directory is out of space or quota",
    "process-exited": "the source process exited during the migration",
    "protocol": "a control message is malformed or arrives in the wrong state",
    "shutdown": "the receiver is shutting down",
    "tls": "TLS could not be set up: a certificate, key or CA file, or the handshake with the peer",
    "timeout": "the peer did not finish its handshake, or did not read what was sent to it, in time",
    "source": "the source cannot be read (missing, no permission, shrank while read)",
    "store": "the receiver cannot write its image directory",
    "version": "the peer speaks another protocol version",
}


class MigrationError(Exception):
    """Root of every error migrated raises on purpose."""

    #: short machine-readable reason, sent to the peer in an ERROR message
    code = "internal"


class LocalError(MigrationError):
    """This side failed: source, disk, configuration, permissions."""


class RemoteError(MigrationError):
    """The peer sent invalid data or reported a failure."""

    code = "protocol"


class NetworkError(MigrationError):
    """The connection failed: connect, send, or no answer in time."""

    code = "network"


class MigrationCancelled(MigrationError):
    code = "cancelled"


# -- the sender's source --------------------------------------------------------


class SourceError(LocalError):
    """The source cannot be read."""

    code = "source"


class SourceFault(SourceError):
    """Memory the sender was reading went away under it (a mapped source
    file truncated mid-pass)."""


class ProcessGone(LocalError):
    code = "process-exited"


class FreezeError(LocalError):
    code = "freeze"


# -- the receiver's store ---------------------------------------------------------


class StoreError(LocalError):
    code = "store"


class NoSpace(StoreError):
    code = "no-space"


class Busy(LocalError):
    code = "busy"


class Forbidden(LocalError):
    """An authenticated client that is not allowed this image name."""

    code = "forbidden"


class TlsSetupError(LocalError):
    """A certificate, key or CA file that cannot be used, or a failed handshake."""

    code = "tls"


class LimitReached(LocalError):
    """A resource bound of the receiver (``--max-connections``, ``--max-migrations``)."""

    code = "limit"


class PeerTimeout(NetworkError):
    """The peer did not finish its handshake, or read nothing, in time."""

    code = "timeout"


class DigestMismatch(LocalError):
    code = "digest-mismatch"


# -- the wire ---------------------------------------------------------------------


class ProtocolError(MigrationError, ValueError):
    """Root of protocol errors: a control message is malformed or arrives in
    the wrong state."""

    code = "protocol"


class LocalProtocolError(ProtocolError, LocalError):
    """This side asked the protocol for something it forbids."""


class RemoteProtocolError(ProtocolError, RemoteError):
    """The peer broke the protocol."""


class VersionError(RemoteProtocolError):
    code = "version"


class DecodeError(RemoteError, ValueError):
    """An XBZRLE delta violates the format; ``offset`` is where, in the delta."""

    code = "bad-delta"

    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.offset = offset


class RecordError(RemoteError, ValueError):
    """A page record or block list is invalid; ``offset`` is the record's
    stream offset (0 when not known)."""

    code = "bad-record"

    def __init__(self, message: str, offset: int = 0):
        super().__init__(message)
        self.offset = offset


class PeerGone(RemoteError):
    code = "disconnected"


class IdleTimeout(RemoteError):
    code = "idle-timeout"


class PeerError(RemoteError):
    """The peer reported an error; its code and message are carried verbatim."""

    def __init__(self, message: str, code: str = "protocol"):
        super().__init__(message)
        self.code = code


def error_side(exc: BaseException, here: str, there: str) -> str:
    """Whose fault a failure is, for the operator's one-line reason:
    ``here`` (this side's name), ``there`` (the peer's) or ``network``."""
    if isinstance(exc, NetworkError):
        return "network"
    if isinstance(exc, RemoteError):
        return there
    return here


@contextlib.contextmanager
def first_migration_error() -> Iterator[None]:
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


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            yield from _leaves(e)
    else:
        yield exc
