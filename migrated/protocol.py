"""The migration protocol, sans-IO: bytes in, events out; events in, bytes out.

Neither trio nor sockets appear here. A ``Connection`` is one end of one
migration: ``send(event)`` returns the bytes to write, ``receive_data(data)``
buffers what the peer wrote, ``next_event()`` returns the next event or
``NEED_DATA``. On the receiving end, page records never surface one by
one: the connection hands them, as bytes, to the ``PageSink`` it was given
(the store's applier, or an applier over plain memory in tests), which
decodes and writes them. The connection itself touches no file, mapping or
socket.

Each direction starts with a 12-byte preamble (``MIGRATED`` and a u32
protocol version), then records (docs/format.md):

    sender                                receiver
    preamble, HELLO            ->
                               <-         preamble, WELCOME (or ERROR)
    MEM_SIZE, page records, EOS(0) ->
                               <-         ACK(0)
    ... more passes, a MEM_SIZE whenever the block list changes ...
    COMPLETE(digest)           ->
                               <-         [VERIFIED(digest)] COMMITTED(digest) (or ERROR)

Either side may send ERROR at any point; the connection is then closed.
Which event may come in which state is the one table ``_TRANSITIONS``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum, auto
from typing import Protocol

from migrated import _core
from migrated.errors import LocalProtocolError, PeerError, ProtocolError, RemoteProtocolError, VersionError
from migrated.records import (
    AT_CONTROL,
    BlockInfo,
    Control,
    Flag,
    frame_control,
    frame_eos,
    frame_mem_size,
    parse_record,
)
from migrated.records import (
    NEED_DATA as NEED_DATA_REASON,
)

MAGIC = b"MIGRATED"
VERSION = 1
_PREAMBLE = struct.Struct(">8sI")
PREAMBLE = _PREAMBLE.pack(MAGIC, VERSION)
# longest page record: header, block id, XBZRLE header, a 16 KiB page
_MAX_PAGE_RECORD = _core.encode_capacity(1, _core.MAX_BLOCK_ID_LENGTH, _core.MAX_PAGE_SIZE)

#: capabilities a sender may offer; raw PAGE and ZERO records are always allowed
CAP_XBZRLE = "xbzrle"
CAP_VERIFIED = "verified"  # the receiver says VERIFIED before it syncs the image
CAPABILITIES = (CAP_XBZRLE, CAP_VERIFIED)


# ---------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """Sender's offer: who it is and what it can do."""

    name: str
    page_size: int
    capabilities: tuple[str, ...] = CAPABILITIES
    source: str = ""
    version: int = VERSION


@dataclass(frozen=True, slots=True)
class Welcome:
    """Receiver's answer: the capabilities both ends will use."""

    capabilities: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BlockList:
    """The image's blocks; a later one replaces the list (blocks grow, shrink, come and go)."""

    blocks: tuple[BlockInfo, ...]


@dataclass(frozen=True, slots=True)
class EndOfPass:
    pass_number: int


@dataclass(frozen=True, slots=True)
class Ack:
    """Receiver has applied everything up to the end of a pass. It also
    reports its last background hash-and-flush of written pages (0 pages:
    none yet), which its commit repeats for the final pass's pages."""

    pass_number: int
    received_bytes: int = 0
    flushed_pages: int = 0
    flush_ms: float = 0.0
    hash_ms: float = 0.0  # the hashing part of flush_ms


@dataclass(frozen=True, slots=True)
class Complete:
    """Sender has sent everything; ``digest`` is the image as sent,
    ``source_info`` facts for the manifest (e.g. mappings left out)."""

    digest: str
    source_info: dict | None = None


@dataclass(frozen=True, slots=True)
class Verified:
    """Receiver holds the complete image and its digest matched; it now
    makes it durable and swaps it in (COMMITTED follows, or ERROR). Only
    with the ``verified`` capability: a sender whose source may run again
    before the image is durable (``--after resume``, a file's writer)
    releases it here, so the sync is not part of the downtime."""

    digest: str


@dataclass(frozen=True, slots=True)
class Committed:
    """Receiver has verified the digest and committed the image;
    ``timings`` splits its part of the downtime (milliseconds: ``wait`` for
    a write-back, ``digest``, ``sync`` of the files, ``swap`` of the name)."""

    digest: str
    path: str = ""
    timings: dict[str, float] | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """ERROR: the side that sends it has failed the migration."""

    code: str
    message: str


class PageSink(Protocol):
    """What a receiving ``Connection`` hands page records to (``records.Applier``
    is one). It consumes complete page records from the front of ``data``
    and stops before an incomplete one or a non-page record."""

    allow_xbzrle: bool  # set by the connection from the negotiated capabilities

    @property
    def position(self) -> int:
        """Stream offset of the next byte it will be given (for error messages)."""
        ...

    def apply(self, data: memoryview) -> tuple[int, int]:
        """Returns (bytes consumed, records.NEED_DATA or records.AT_CONTROL)."""
        ...

    def skip(self, nbytes: int) -> None:
        """``nbytes`` of non-page records went past (keeps ``position``)."""
        ...

    def forget_current(self) -> None:
        """The next page record must name its block (after a non-page record)."""
        ...


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


# ---------------------------------------------------------------------------
# State machine: one table for both roles
# ---------------------------------------------------------------------------


class Role(Enum):
    SENDER = auto()
    RECEIVER = auto()


class State(Enum):
    HANDSHAKE = auto()  # before HELLO/WELCOME
    RUNNING = auto()  # block lists, passes
    COMPLETING = auto()  # COMPLETE sent, waiting for COMMITTED
    DONE = auto()  # COMMITTED
    FAILED = auto()  # ERROR either way


# (state, event type) -> next state, per direction of travel: events the
# sender emits travel SENDER->RECEIVER and vice versa. Both ends run the same
# table, so a sender rejects its own out-of-order send the way the receiver
# would reject it from the wire.
_TRANSITIONS: dict[tuple[Role, State, type], State] = {
    (Role.SENDER, State.HANDSHAKE, Hello): State.HANDSHAKE,
    (Role.RECEIVER, State.HANDSHAKE, Welcome): State.RUNNING,
    (Role.SENDER, State.RUNNING, BlockList): State.RUNNING,
    (Role.SENDER, State.RUNNING, EndOfPass): State.RUNNING,
    (Role.RECEIVER, State.RUNNING, Ack): State.RUNNING,
    (Role.SENDER, State.RUNNING, Complete): State.COMPLETING,
    (Role.RECEIVER, State.COMPLETING, Ack): State.COMPLETING,
    (Role.RECEIVER, State.COMPLETING, Verified): State.COMPLETING,
    (Role.RECEIVER, State.COMPLETING, Committed): State.DONE,
}


def _next_state(origin: Role, state: State, event: object) -> State:
    if isinstance(event, Failure) and state not in (State.DONE, State.FAILED):
        return State.FAILED
    try:
        return _TRANSITIONS[(origin, state, type(event))]
    except KeyError:
        who = "sender" if origin is Role.SENDER else "receiver"
        raise LocalProtocolError(
            f"{type(event).__name__} from the {who} is not allowed in state {state.name}"
        ) from None


def _bad_magic(first: int) -> str:
    if first in (0x15, 0x16):  # a TLS alert or handshake record
        return (
            "peer does not speak the migrated protocol in the clear: it speaks TLS; use TLS on both sides "
            "(--tls-cert, --tls-key, --tls-ca) or on neither"
        )
    return "peer does not speak the migrated protocol (bad magic)"


class Connection:
    """One end of a migration. ``role`` is the side this object speaks for."""

    def __init__(self, role: Role):
        self.role = role
        self.peer_role = Role.RECEIVER if role is Role.SENDER else Role.SENDER
        self.state = State.HANDSHAKE
        self.peer_version: int | None = None
        self.capabilities: tuple[str, ...] = ()
        self.received_bytes = 0  # bytes taken from the peer, preamble included
        self._buf = bytearray()  # unconsumed bytes before _chunk[_pos:]
        self._resume: dict = {}  # how far a block list arriving in pieces was parsed (records.parse_record)
        self._chunk: bytes | bytearray | memoryview | None = None
        self._pos = 0
        self._preamble_sent = False
        self._sink: PageSink | None = None

    # -- sending ---------------------------------------------------------

    def send(self, event) -> bytes:
        """Bytes for ``event``; the first call also returns the preamble.
        Raises ``LocalProtocolError`` for an event the protocol forbids now."""
        if isinstance(event, Hello):
            check_page_size(event.page_size)
        if isinstance(event, Verified) and CAP_VERIFIED not in self.capabilities:
            raise LocalProtocolError("VERIFIED needs the verified capability, which was not negotiated")
        self.state = _next_state(self.role, self.state, event)
        out = self.frame(event)
        if isinstance(event, Welcome):
            self.capabilities = tuple(event.capabilities)
        if not self._preamble_sent:
            self._preamble_sent = True
            out = PREAMBLE + out
        return out

    @staticmethod
    def frame(event) -> bytes:
        """The record for ``event`` (no state change: for a last-gasp ERROR)."""
        match event:
            case Hello():
                return frame_control(
                    Control.HELLO,
                    {
                        "version": event.version,
                        "page_size": event.page_size,
                        "capabilities": list(event.capabilities),
                        "name": event.name,
                        "source": event.source,
                    },
                )
            case Welcome():
                return frame_control(Control.WELCOME, {"capabilities": list(event.capabilities)})
            case BlockList():
                return frame_mem_size(list(event.blocks))
            case EndOfPass():
                return frame_eos(event.pass_number)
            case Ack():
                return frame_control(
                    Control.ACK,
                    {
                        "pass": event.pass_number,
                        "received_bytes": event.received_bytes,
                        "flushed_pages": event.flushed_pages,
                        "flush_ms": event.flush_ms,
                        "hash_ms": event.hash_ms,
                    },
                )
            case Complete():
                return frame_control(Control.COMPLETE, {"digest": event.digest, "source_info": event.source_info or {}})
            case Verified():
                return frame_control(Control.VERIFIED, {"digest": event.digest})
            case Committed():
                fields: dict[str, object] = {"digest": event.digest, "path": event.path}
                if event.timings:
                    fields["timings"] = event.timings
                return frame_control(Control.COMMITTED, fields)
            case Failure():
                return frame_control(Control.ERROR, {"code": event.code, "message": event.message})
        raise TypeError(f"not a protocol event: {event!r}")

    def farewell(self, failure: Failure) -> bytes:
        """The last-gasp ERROR for ``failure``, with the preamble if it was
        not sent yet (a side that fails before its first event). No state
        change: it is sent whatever the state, and the connection then closes."""
        out = self.frame(failure)
        if not self._preamble_sent:
            self._preamble_sent = True
            out = PREAMBLE + out
        return out

    # -- receiving -------------------------------------------------------

    def set_page_sink(self, sink: PageSink) -> None:
        """Receiver: where page records go from now on, once the block list
        just received is in place. The sink is told the stream offset it
        starts at and whether XBZRLE records were negotiated."""
        if self.role is not Role.RECEIVER:
            raise LocalProtocolError("only a receiving connection takes page records")
        behind = self.received_bytes - self.buffered - sink.position
        if behind < 0:
            raise LocalProtocolError("the page sink has seen more of the stream than this connection")
        sink.skip(behind)
        sink.allow_xbzrle = CAP_XBZRLE in self.capabilities
        self._sink = sink

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes from the peer. The latest chunk is kept as it is (not
        copied into the buffer) so page records can be applied from it."""
        self._merge()
        self._chunk = data
        self._pos = 0
        self.received_bytes += len(data)

    def _merge(self) -> None:
        if self._chunk is not None:
            self._buf += memoryview(self._chunk)[self._pos :]
            self._chunk = None

    @property
    def buffered(self) -> int:
        return len(self._buf) + (len(self._chunk) - self._pos if self._chunk is not None else 0)

    def _apply_pages(self) -> int:
        """Apply the page records at the front of the unconsumed stream
        (``_buf`` then ``_chunk[_pos:]``). A record cut by a chunk boundary is
        completed in ``_buf`` with just enough of the next chunk; the rest of
        a chunk is applied where it lies."""
        assert self._sink is not None  # called only once a sink is set
        apply = self._sink.apply
        if self._buf:
            old = len(self._buf)
            if self._chunk is not None:
                take = min(_MAX_PAGE_RECORD, len(self._chunk) - self._pos)
                self._buf += memoryview(self._chunk)[self._pos : self._pos + take]
            with memoryview(self._buf) as mv:
                consumed, reason = apply(mv)
            if self._chunk is None or consumed < old:
                if self._chunk is not None:
                    self._pos += take
                del self._buf[:consumed]
                return reason
            self._pos += consumed - old
            self._buf.clear()
            if reason == AT_CONTROL:
                return reason
        if self._chunk is None:
            return NEED_DATA_REASON
        consumed, reason = apply(memoryview(self._chunk)[self._pos :])
        self._pos += consumed
        if reason != AT_CONTROL:
            self._merge()  # an incomplete record's head waits in the buffer
        return reason

    def next_event(self):
        """The next event from the peer, or NEED_DATA.

        Page records are applied on the way (the receiver's hot path: it
        releases the GIL, so callers run this in a worker thread when much
        is buffered). Raises ``RemoteProtocolError``/``RecordError`` on bad
        input and ``PeerError`` when the peer reports a failure.
        """
        try:
            return self._next_event()
        except LocalProtocolError as exc:
            # the one place a check's LocalProtocolError becomes the peer's fault
            raise RemoteProtocolError(str(exc)) from None

    def _next_event(self):
        if self.peer_version is None:
            self._merge()
            if self._buf and not MAGIC.startswith(bytes(self._buf[: len(MAGIC)])):
                raise LocalProtocolError(_bad_magic(self._buf[0]))
            if len(self._buf) < _PREAMBLE.size:
                return NEED_DATA
            magic, version = _PREAMBLE.unpack_from(self._buf)
            self.peer_version = version
            del self._buf[: _PREAMBLE.size]
            if version != VERSION:
                raise VersionError(f"peer speaks protocol version {version}, this migrated speaks {VERSION}")
        while True:
            if self._sink is not None and self.state is State.RUNNING:
                if self._apply_pages() != AT_CONTROL:
                    return NEED_DATA
            self._merge()
            if not self._buf:
                return NEED_DATA
            stream_offset = self.received_bytes - len(self._buf)
            with memoryview(self._buf) as mv:
                rec = parse_record(mv, stream_offset, self._resume)
            if rec is None:
                return NEED_DATA
            del self._buf[: rec.size]
            if self._sink is not None:
                self._sink.skip(rec.size)
                self._sink.forget_current()
            event = self._event_from(rec)
            self.state = _next_state(self.peer_role, self.state, event)
            if isinstance(event, Welcome):
                self.capabilities = event.capabilities
            if isinstance(event, Failure):
                raise PeerError(event.message, event.code)
            return event

    def _event_from(self, rec):
        if rec.flag == Flag.MEM_SIZE:
            return BlockList(tuple(rec.blocks))
        if rec.flag == Flag.EOS:
            return EndOfPass(rec.pass_number)
        p = rec.payload
        try:
            match rec.control:
                case Control.HELLO:
                    return _hello(p)
                case Control.WELCOME:
                    caps = tuple(_field(p, "capabilities", list))
                    if not set(caps) <= set(CAPABILITIES):
                        raise LocalProtocolError(f"receiver accepted capabilities it was not offered: {caps}")
                    return Welcome(caps)
                case Control.ACK:
                    ack = Ack(
                        _field(p, "pass", int),
                        _field(p, "received_bytes", int),
                        _field(p, "flushed_pages", int, 0),
                        float(_field(p, "flush_ms", (int, float), 0.0)),
                        float(_field(p, "hash_ms", (int, float), 0.0)),
                    )
                    # the sender's downtime estimate divides and multiplies by these
                    counts = (ack.pass_number, ack.received_bytes, ack.flushed_pages)
                    if min(counts) < 0 or max(counts) >= 1 << 63 or not 0.0 <= ack.hash_ms <= ack.flush_ms < 1e12:
                        raise ValueError(
                            "pass, byte and page counts must be non-negative, "
                            "and hash_ms <= flush_ms non-negative and finite"
                        )
                    return ack
                case Control.COMPLETE:
                    info = p.get("source_info") or {}
                    if not isinstance(info, dict):
                        raise ValueError("field 'source_info' must be an object")
                    return Complete(_field(p, "digest", str), info)
                case Control.VERIFIED:
                    if CAP_VERIFIED not in self.capabilities:
                        raise ValueError("VERIFIED without the verified capability")
                    return Verified(_field(p, "digest", str))
                case Control.COMMITTED:
                    return Committed(_field(p, "digest", str), p.get("path", ""), _timings(p.get("timings")))
                case Control.ERROR:
                    return Failure(str(p.get("code", "error"))[:64], str(p.get("message", ""))[:4096])
        except ProtocolError:
            raise  # says what is wrong already
        except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: float() of a huge integer
            raise LocalProtocolError(f"malformed {rec.control.name} message: {exc}") from None
        raise LocalProtocolError(f"unexpected {rec.control.name} message")


_REQUIRED = object()


def _field(payload: dict, key: str, kind, default=_REQUIRED):
    """``payload[key]`` if it is of ``kind``; a field with a default may be
    absent (a peer from before the field was added)."""
    if key not in payload and default is not _REQUIRED:
        return default
    value = payload.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        raise ValueError(f"field {key!r} must be {names}")
    return value


def _hello(p: dict) -> Hello:
    caps = _field(p, "capabilities", list)
    if not all(isinstance(c, str) for c in caps):
        raise ValueError("capabilities must be strings")
    page_size = _field(p, "page_size", int)
    check_page_size(page_size)
    return Hello(
        name=_field(p, "name", str),
        page_size=page_size,
        capabilities=tuple(caps),
        source=str(p.get("source", "")),
        version=_field(p, "version", int),
    )


def check_page_size(page_size: int) -> None:
    """Raise LocalProtocolError unless ``page_size`` is one the codec serves."""
    try:
        _core.check_page_size(page_size)
    except ValueError:
        raise LocalProtocolError(
            f"page size {page_size} is not supported: a power of two from {_core.MIN_PAGE_SIZE} "
            f"to {_core.MAX_PAGE_SIZE} is"
        ) from None


def _timings(value) -> dict[str, float] | None:
    """COMMITTED's optional timings: a few named, finite, non-negative milliseconds."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > 16:
        raise ValueError("field 'timings' must be an object of at most 16 numbers")
    out = {}
    for k, v in value.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v < 1e12 or len(k) > 32:
            raise ValueError("field 'timings' must map short names to non-negative milliseconds")
        out[k] = float(v)
    return out


def negotiate(offered, allowed) -> tuple[str, ...]:
    """Capabilities both ends allow, in the offer's order."""
    return tuple(c for c in offered if c in allowed and c in CAPABILITIES)


__all__ = [
    "Ack",
    "BlockList",
    "CAPABILITIES",
    "CAP_VERIFIED",
    "CAP_XBZRLE",
    "Committed",
    "Complete",
    "Connection",
    "EndOfPass",
    "Failure",
    "Hello",
    "NEED_DATA",
    "PREAMBLE",
    "PageSink",
    "Role",
    "State",
    "VERSION",
    "Verified",
    "Welcome",
    "check_page_size",
    "negotiate",
]
