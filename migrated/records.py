"""Page records: the RAM_SAVE_FLAG-style stream (layout in docs/format.md).

Page records (ZERO, PAGE, XBZRLE) are framed and applied in batches by the
extension. The other records (MEM_SIZE block list, EOS end of pass, CONTROL
messages) are rare and are framed and parsed here in Python.

Every record starts with a big-endian u64: a page-aligned offset in the
high bits and flags in the low 9 bits (QEMU's flag values).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, fields
from enum import IntEnum, IntFlag
from typing import Any, NamedTuple

from migrated import _core
from migrated.errors import LocalProtocolError, RecordError

__all__ = [
    "AT_CONTROL",
    "NEED_DATA",
    "Applier",
    "BatchStats",
    "BlockInfo",
    "BlockTarget",
    "Control",
    "Flag",
    "encode_batch",
    "encode_capacity",
    "frame_control",
    "frame_eos",
    "frame_mem_size",
    "parse_record",
    "record_end",
]


class Flag(IntFlag):
    """Record flags (QEMU's RAM_SAVE_FLAG values), as the extension defines them."""

    ZERO = _core.FLAG_ZERO
    MEM_SIZE = _core.FLAG_MEM_SIZE
    PAGE = _core.FLAG_PAGE
    EOS = _core.FLAG_EOS
    CONTINUE = _core.FLAG_CONTINUE
    XBZRLE = _core.FLAG_XBZRLE
    CONTROL = _core.FLAG_CONTROL


FLAG_MASK = _core.FLAG_MASK
ENCODING_XBZRLE = _core.ENCODING_XBZRLE
MAX_BLOCK_ID_LENGTH = _core.MAX_BLOCK_ID_LENGTH  # a block id is 1 to this many bytes
MAX_CONTROL_PAYLOAD = 1 << 20
MAX_BLOCKS = 65536
MAX_BLOCK_INFO = 4096
MAX_INFO_KEYS = 16  # a block's info is flat: what it costs in memory stays near its size on the wire
_SCALARS = (str, int, float, bool, type(None))
MAX_BLOCK_LIST = 16 << 20  # bytes of one MEM_SIZE record (65536 blocks of a 200-byte id and info fit in it)

_HEADER = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_CONTROL = struct.Struct(">QBI")
_BLOCK = struct.Struct(">QIH")


class Control(IntEnum):
    """Types of CONTROL records (both directions)."""

    HELLO = 1  # sender: version, page size, capabilities, name
    WELCOME = 2  # receiver: accepted capabilities
    ACK = 3  # receiver: a pass was applied
    COMPLETE = 4  # sender: all pages sent, digest of the image
    COMMITTED = 5  # receiver: image committed, digest verified
    ERROR = 6  # either side: code and message, then the connection closes
    VERIFIED = 7  # receiver: image complete, digest matched; committing (capability "verified")


# ---------------------------------------------------------------------------
# Page records, in batches (extension)
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchStats:
    """Counters of one or more encoded batches (field order = _core.BATCH_COUNTERS)."""

    zero_pages: int = 0
    normal_pages: int = 0
    normal_bytes: int = 0
    xbzrle_pages: int = 0
    xbzrle_bytes: int = 0
    cache_lookups: int = 0
    cache_miss: int = 0
    overflow: int = 0
    unchanged: int = 0
    record_bytes: int = 0

    def __add__(self, other: BatchStats) -> BatchStats:
        return BatchStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def pages(self) -> int:
        """Pages for which a record was written."""
        return self.zero_pages + self.normal_pages + self.xbzrle_pages


assert tuple(f.name for f in fields(BatchStats)) == _core.BATCH_COUNTERS


def encode_batch(
    cache: _core.PageCache,
    block_index: int,
    block_id: bytes,
    block,
    pages,
    *,
    xbzrle: bool = True,
    first_pass: bool = False,
    seed_cache: bool = True,
    hashes=None,
    into=None,
    gathered_pages: int = -1,
) -> tuple[bytearray | memoryview, BatchStats]:
    """Frame the records for ``pages`` (an ``array('Q')``) of one block.

    Each page is copied to a private snapshot first; the record, the cache
    and ``hashes[page]`` (when given) all use that snapshot. A page all of one
    byte goes as ZERO; with ``xbzrle`` a cache hit goes as XBZRLE (PAGE on
    overflow, nothing at all when unchanged) and a miss as PAGE, cached. In a
    ``first_pass`` the cache is not consulted, and is filled only with
    ``seed_cache``. With ``xbzrle`` off pages go raw and leave the cache.
    The records go to a new bytearray, or into ``into`` (a buffer of at least
    ``encode_capacity`` bytes), returning a view of the part used.
    With ``gathered_pages`` (the block's page count), ``block`` holds just
    these pages, in order, as ``Source.gather`` reads them.
    """
    options = 0
    if xbzrle:
        options |= _core.OPTION_XBZRLE
        if not first_pass:
            options |= _core.OPTION_LOOKUP | _core.OPTION_INSERT
        elif seed_cache:
            options |= _core.OPTION_INSERT
    data, counters = _core.encode_batch(
        cache, block_index, block_id, block, pages, options, hashes, into, gathered_pages
    )
    return data, BatchStats(*counters)


#: the receiver's record applier (a ``protocol.PageSink``); its stop reasons
Applier = _core.Applier
NEED_DATA = _core.NEED_DATA  # the rest of the data is an incomplete record (or nothing)
AT_CONTROL = _core.CONTROL  # the next record is not a page record
encode_capacity = _core.encode_capacity


def record_end(buf, at: int, page_size: int) -> int:
    """Where the page record holding byte ``at`` of ``buf`` ends (``at`` itself
    when a record starts there), for ``buf`` framed by ``encode_batch``. It
    walks the headers from the start: for a sender completing a record cut
    short before its last-gasp ERROR, not for a hot path."""
    mv = memoryview(buf)
    pos = 0
    while pos < at:
        (header,) = _HEADER.unpack_from(mv, pos)
        flags = header & FLAG_MASK
        pos += 8
        if not flags & Flag.CONTINUE:
            pos += 1 + mv[pos]
        if flags & Flag.ZERO:
            pos += 1
        elif flags & Flag.PAGE:
            pos += page_size
        elif flags & Flag.XBZRLE:
            pos += 3 + ((mv[pos + 1] << 8) | mv[pos + 2])
        else:
            return len(mv)  # not page records: all of it
    return pos


class BlockTarget(NamedTuple):
    """Where the applier writes one block (``Applier.set_blocks`` takes these)."""

    id: bytes
    buffer: Any  # writable buffer of the block, a whole number of pages
    fresh: bool = False  # known to be all zeros: zero fills are skipped, whole pages go by fd
    fd: int = -1  # the file ``buffer`` maps, for pwritev; -1 for none
    marks: bytearray | None = None  # one byte per page, set for every page written


# ---------------------------------------------------------------------------
# Block list, end of pass, control messages
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """One block of an image: its id, byte length and page size.

    ``info`` is free-form JSON metadata that ends up in the manifest (for a
    process source: start address, permissions, backing path).
    """

    id: str
    length: int
    page_size: int
    info: dict = field(default_factory=dict, compare=False)

    @property
    def id_bytes(self) -> bytes:
        return self.id.encode()

    @property
    def pages(self) -> int:
        return _core.page_count(self.length, self.page_size)


def frame_mem_size(blocks: list[BlockInfo]) -> bytes:
    """MEM_SIZE: u32 count, then per block u8 id length, id, u64 length,
    u32 page size, u16 info length, info (JSON)."""
    parts = [_HEADER.pack(Flag.MEM_SIZE), _U32.pack(len(blocks))]
    for b in blocks:
        bid = b.id_bytes
        info = json.dumps(b.info, separators=(",", ":")).encode() if b.info else b""
        if not 1 <= len(bid) <= MAX_BLOCK_ID_LENGTH:
            raise ValueError(f"block id {b.id!r} must be 1 to {MAX_BLOCK_ID_LENGTH} bytes")
        if len(info) > MAX_BLOCK_INFO:
            raise ValueError(f"block info of {b.id!r} is too large")
        parts += [bytes([len(bid)]), bid, _BLOCK.pack(b.length, b.page_size, len(info)), info]
    return b"".join(parts)


def _no_constant(name: str):
    """JSON has no NaN or Infinity (Python's parser takes them; others, and
    the manifest's readers, do not)."""
    raise ValueError(f"{name} is not JSON")


def frame_eos(pass_number: int) -> bytes:
    """EOS: u32 pass number."""
    return _HEADER.pack(Flag.EOS) + _U32.pack(pass_number)


def frame_control(kind: Control, payload: dict) -> bytes:
    """CONTROL: u8 type, u32 length, JSON payload."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    if len(body) > MAX_CONTROL_PAYLOAD:
        raise ValueError("control payload too large")
    return _CONTROL.pack(Flag.CONTROL, kind, len(body)) + body


@dataclass(frozen=True, slots=True)
class ParsedRecord:
    """A non-page record parsed from the front of a buffer."""

    flag: Flag
    size: int  # bytes it occupies in the stream
    blocks: list[BlockInfo] | None = None
    pass_number: int | None = None
    control: Control | None = None
    payload: dict | None = None


def parse_record(buf, offset: int, resume: dict | None = None) -> ParsedRecord | None:
    """Parse the non-page record at the front of ``buf``.

    ``offset`` is its stream offset, for error messages. Returns None when
    ``buf`` does not yet hold the whole record. Declared lengths are checked
    against their limits before anything is buffered. ``resume`` (a dict the
    caller keeps between calls) lets a block list arriving in many pieces be
    parsed once: each call goes on from the last whole block.
    """
    mv = memoryview(buf)
    if len(mv) < 8:
        return None
    (header,) = _HEADER.unpack_from(mv)
    flags = header & FLAG_MASK
    if header & ~FLAG_MASK:
        raise RecordError(f"record at stream offset {offset}: non-page record with an offset", offset)
    if flags == Flag.EOS:
        if len(mv) < 12:
            return None
        return ParsedRecord(Flag.EOS, 12, pass_number=_U32.unpack_from(mv, 8)[0])
    if flags == Flag.CONTROL:
        if len(mv) < _CONTROL.size:
            return None
        _, kind, length = _CONTROL.unpack_from(mv)
        if length > MAX_CONTROL_PAYLOAD:
            raise LocalProtocolError(f"control record at stream offset {offset} declares {length} bytes")
        try:
            kind = Control(kind)
        except ValueError:
            raise LocalProtocolError(f"unknown control record type {kind} at stream offset {offset}") from None
        end = _CONTROL.size + length
        if len(mv) < end:
            return None
        try:
            payload = json.loads(bytes(mv[_CONTROL.size : end]), parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
            why = "nested too deeply" if isinstance(exc, RecursionError) else f"not JSON: {exc}"
            raise LocalProtocolError(f"control record at stream offset {offset} is {why}") from None
        if not isinstance(payload, dict):
            raise LocalProtocolError(f"control record at stream offset {offset} is not a JSON object")
        return ParsedRecord(Flag.CONTROL, end, control=kind, payload=payload)
    if flags == Flag.MEM_SIZE:
        return _parse_mem_size(mv, offset, {} if resume is None else resume)
    raise RecordError(f"record at stream offset {offset}: unexpected flags {flags:#x}", offset)


def _parse_mem_size(mv: memoryview, offset: int, resume: dict) -> ParsedRecord | None:
    if len(mv) < 12:
        return None
    (count,) = _U32.unpack_from(mv, 8)
    if count > MAX_BLOCKS:
        raise RecordError(f"block list at stream offset {offset} declares {count} blocks", offset)
    if resume.get("offset") != offset:  # a new block list
        resume.clear()
        resume.update(offset=offset, pos=12, blocks=[])
    pos, blocks = resume["pos"], resume["blocks"]
    if len(mv) > MAX_BLOCK_LIST and len(blocks) < count:
        raise RecordError(f"block list at stream offset {offset} is larger than {MAX_BLOCK_LIST} bytes", offset)
    for _ in range(count - len(blocks)):
        resume["pos"] = pos
        if len(mv) < pos + 1:
            return None
        idlen = mv[pos]
        if idlen == 0:
            raise RecordError(f"block list at stream offset {offset}: empty block id", offset)
        if len(mv) < pos + 1 + idlen + _BLOCK.size:
            return None
        raw_id = bytes(mv[pos + 1 : pos + 1 + idlen])
        length, page_size, infolen = _BLOCK.unpack_from(mv, pos + 1 + idlen)
        if infolen > MAX_BLOCK_INFO:
            raise RecordError(f"block list at stream offset {offset}: block info too large", offset)
        pos += 1 + idlen + _BLOCK.size
        if pos + infolen > MAX_BLOCK_LIST:
            raise RecordError(f"block list at stream offset {offset} is larger than {MAX_BLOCK_LIST} bytes", offset)
        if len(mv) < pos + infolen:
            return None
        try:
            bid = raw_id.decode()
            info = json.loads(bytes(mv[pos : pos + infolen]), parse_constant=_no_constant) if infolen else {}
        except (ValueError, RecursionError):
            raise RecordError(f"block list at stream offset {offset}: block id or info is not valid", offset) from None
        if not isinstance(info, dict):
            raise RecordError(f"block list at stream offset {offset}: block info is not a JSON object", offset)
        if len(info) > MAX_INFO_KEYS or not all(isinstance(v, _SCALARS) for v in info.values()):
            raise RecordError(
                f"block list at stream offset {offset}: block info must be a flat JSON object of at most "
                f"{MAX_INFO_KEYS} strings, numbers, booleans or nulls",
                offset,
            )
        _check_block(bid, length, page_size, offset)
        pos += infolen
        blocks.append(BlockInfo(bid, length, page_size, info))
    resume.clear()
    return ParsedRecord(Flag.MEM_SIZE, pos, blocks=blocks)


def _check_block(bid: str, length: int, page_size: int, offset: int) -> None:
    """A block's numbers as the peer declared them, before anything uses
    them: a page size the codec serves, and no more pages than a cache key
    can number (which also keeps every byte offset below 2^63)."""
    try:
        _core.check_page_size(page_size)
    except ValueError as exc:
        raise RecordError(f"block list at stream offset {offset}: block {bid!r}: {exc}", offset) from None
    if -(-length // page_size) > _core.KEY_PAGE_LIMIT:  # not page_count(): a u64 may not fit a Py_ssize_t
        raise RecordError(
            f"block list at stream offset {offset}: block {bid!r} declares {length} bytes, "
            f"more than {_core.KEY_PAGE_LIMIT} pages",
            offset,
        )
