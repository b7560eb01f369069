"""Structure-aware fuzz targets for everything a peer's bytes reach.

Each target takes the fuzzer's bytes and reads its choices from them
(``Draw``): which records, flags, block ids, and numbers that are mostly
edge values (0, 1, page size +- 1, 2^16, 2^31, 2^32, 2^63, 2^64 - k), so the
framing stays valid and the checks deep in the parsers are reached. A
target passes when every failure is one of migrated's own errors (what a
peer may cause: ``MigrationError``); anything else (an IndexError, an
OverflowError, a crash or, in the sanitizer build, a bad memory access) is
a bug. The same functions replay the corpus in ``tests/test_fuzz.py`` and
run under atheris in ``tests/fuzz_run.py`` (``make fuzz``).
"""

from __future__ import annotations

import json
import struct

from migrated import xbzrle
from migrated.errors import MigrationError
from migrated.protocol import (
    NEED_DATA,
    PREAMBLE,
    BlockList,
    Connection,
    EndOfPass,
    Hello,
    Role,
    Welcome,
)
from migrated.records import Applier, BlockTarget, Flag, parse_record

PAGE_SIZES = (4096, 512, 1024, 16384, 4095, 0, 1 << 20)
MAX_HELD = 8 << 20  # the harness holds declared blocks in memory up to this much in all


def _edges(page: int) -> list[int]:
    out = [0, 1, 2, 3, 7, 8, 255, 256, page - 1, page, page + 1, 2 * page, 1 << 16, (1 << 16) - 1]
    out += [(1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 32) + page, (1 << 63) - 1, 1 << 63]
    out += [(1 << 64) - 1, (1 << 64) - page, (1 << 64) - 2 * page, (1 << 64) - 9]
    return [v for v in out if v >= 0]


class Draw:
    """Choices read from the fuzzer's bytes, deterministic for one input;
    past the end every byte is 1 (so a short input is a small, valid case)."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 1
        self.pos += 1
        return self.data[self.pos - 1]

    def int(self, nbytes: int) -> int:
        return int.from_bytes(bytes(self.byte() for _ in range(nbytes)), "big")

    def below(self, n: int) -> int:
        return self.int(2) % n if n > 0 else 0

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def bytes(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out + bytes(n - len(out))

    def number(self, page: int, limit: int = 1 << 64) -> int:
        """Mostly an edge value, sometimes small, sometimes anything."""
        kind = self.byte() % 8
        if kind < 5:
            v = self.choice(_edges(page))
        elif kind < 7:
            v = self.int(2)
        else:
            v = self.int(8)
        return v % limit

    def rarely(self) -> bool:
        """True one time in 16: where a choice breaks the framing, so that
        most inputs stay valid long enough to reach the deep checks."""
        return self.byte() % 16 == 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _allowed(fn, *args):
    """Run ``fn``: migrated's own errors are what a peer may cause."""
    try:
        return fn(*args)
    except MigrationError:
        return None


# ---------------------------------------------------------------------------
# XBZRLE decoder
# ---------------------------------------------------------------------------


def _uleb(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _delta(d: Draw, page: int) -> bytes:
    """An XBZRLE delta: runs that mostly fit the page, now and then an edge
    length (ULEB128 of 1-3 bytes, past the page, 0 where only the first zrun
    may be), a broken ULEB128 or trailing bytes."""
    delta = bytearray()
    for _ in range(d.below(8)):
        if d.rarely():
            zrun, nzrun = d.number(page, 1 << 21), d.number(page, 1 << 21)
        else:
            zrun, nzrun = d.below(page // 4), 1 + d.below(64)
        delta += d.bytes(d.below(4)) if d.rarely() else _uleb(zrun)
        delta += _uleb(nzrun) + d.bytes(min(nzrun, page + 8))
    if d.rarely():
        delta += d.bytes(d.below(64))
    return bytes(delta)


def xbzrle_target(data: bytes) -> None:
    """Deltas (``_delta``) applied to a page."""
    d = Draw(data)
    page = d.choice((4096, 512, 16384, 1024))
    old = bytes(d.bytes(64)) * (page // 64)
    delta = _delta(d, page)
    out = _allowed(xbzrle.decode, bytes(delta), old)
    if out is not None:
        assert len(out) == page, (len(out), page)
    target = bytearray(old)
    _allowed(xbzrle.decode_into, bytes(delta), target)
    assert len(target) == page


# ---------------------------------------------------------------------------
# the receiver's stream: handshake, block list, page records, end of pass
# ---------------------------------------------------------------------------


def _block_id(d: Draw, ids: list[bytes]) -> bytes:
    if ids and not d.rarely():
        return d.choice(ids)
    return d.bytes(d.choice((0, 1, 3, 255, 256)))  # unknown, empty, longest, too long


def _mem_size(d: Draw, page: int) -> tuple[bytes, list[tuple[bytes, int]]]:
    blocks = []
    body = bytearray()
    real = d.choice((1, 1, 2, 3))
    count = d.choice((0, 65536, 65537, (1 << 32) - 1, real + 1)) if d.rarely() else real
    for i in range(min(count, 4)):
        bid = d.choice((b"", b"x" * 255, "é".encode(), b"\xff")) if d.rarely() else (b"ram", b"b%d" % i)[i > 0]
        # mostly a block the harness can hold, a page or so off a multiple; else an edge value
        length = d.below(64) * page + d.choice((0, 0, 1, page - 1, 4096)) if d.byte() % 3 else d.number(page)
        psize = d.choice(PAGE_SIZES) if d.rarely() else page
        info = (
            d.choice((b"[]", b"[" * 2000 + b"]" * 2000, b"{", b'"s"', b'{"start":1e999}'))
            if d.rarely()
            else d.choice((b"", b"{}", b'{"start":4096}'))
        )
        infolen = d.number(page, 1 << 16) if d.rarely() else len(info)
        body += (
            bytes([len(bid) & 0xFF]) + bid + struct.pack(">QIH", length % (1 << 64), psize & 0xFFFFFFFF, infolen) + info
        )
        blocks.append((bid, length))
    return struct.pack(">QI", Flag.MEM_SIZE, count & 0xFFFFFFFF) + bytes(body), blocks


def _page_record(d: Draw, page: int, ids: list[bytes], lengths: dict[bytes, int]) -> bytes:
    if d.rarely():
        kind = d.choice((Flag.PAGE | Flag.ZERO, Flag.XBZRLE | Flag.ZERO, 0x100, 0, Flag.EOS | Flag.PAGE))
    else:
        kind = d.choice((Flag.PAGE, Flag.ZERO, Flag.XBZRLE, Flag.XBZRLE))
    cont = d.byte() % 3 == 0
    bid = _block_id(d, ids)
    length = lengths.get(bid, 1 << 20)
    pages = max(1, -(-length // page)) if page else 1
    if d.rarely():
        offset = d.number(page)
    elif d.byte() % 4 == 0:
        offset = (pages - 1) * page  # the last page
    else:
        offset = d.below(pages) * page
    header = struct.pack(">Q", ((offset & ~0x1FF) | kind | (Flag.CONTINUE if cont else 0)) & ((1 << 64) - 1))
    out = bytearray(header)
    if not cont:
        out += bytes([len(bid) & 0xFF]) + bid[:255]
    if kind & Flag.XBZRLE:
        delta = _delta(d, page)
        xlen = d.number(page, 1 << 16) if d.rarely() else min(len(delta), 0xFFFF)
        out += bytes([d.choice((0, 2, 255)) if d.rarely() else 1]) + struct.pack(">H", xlen) + delta
    elif kind & Flag.ZERO:
        out += bytes([d.byte()])
    else:
        out += d.bytes(d.below(page + 2) if d.rarely() else page)
    return bytes(out)


def _control(d: Draw, kind: int, payload: bytes) -> bytes:
    length = len(payload) if d.byte() % 6 else d.number(4096, 1 << 32)
    return struct.pack(">QBI", Flag.CONTROL, kind & 0xFF, length) + payload


def _json_value(d: Draw, depth: int = 0):
    k = d.byte() % 9
    if k == 0 or depth > 3:
        return d.choice((0, 1, -1, 2**63, 2**64, -(2**63), 1e308, 0.5, None, True))
    if k == 1:
        return d.bytes(d.below(8)).decode("latin-1")
    if k == 2:
        return [_json_value(d, depth + 1) for _ in range(d.below(3))]
    if k == 3:
        return {d.choice(("pass", "digest", "code", "x")): _json_value(d, depth + 1) for _ in range(d.below(3))}
    return d.choice((0, 4096, "a" * 64, [], {}, "xbzrle", ["xbzrle", "verified"]))


def stream_target(data: bytes) -> None:
    """A sender's stream to the receiver's protocol object and applier, cut
    into chunks at drawn places: preamble, HELLO, block lists and page
    records with edge offsets, lengths and ids, end of pass, controls."""
    d = Draw(data)
    page = d.choice(PAGE_SIZES) if d.rarely() else d.choice((4096, 4096, 512, 16384))
    conn = Connection(Role.RECEIVER)
    xbzrle_on = bool(d.byte() % 2)
    wire = bytearray(d.bytes(16) if d.rarely() else PREAMBLE)
    name = d.bytes(d.below(140)).decode("latin-1") if d.rarely() else "vm"
    if not d.rarely():
        wire += Connection.frame(Hello(name, page, ("xbzrle", "verified"), "fuzz"))
    else:
        wire += _control(d, 1, json.dumps({"version": 1, "page_size": _json_value(d), "name": name}).encode())
    ids: list[bytes] = []
    lengths: dict[bytes, int] = {}
    if not d.rarely():  # mostly the block list first, as a sender sends it
        record, blocks = _mem_size(d, page)
        wire += record
        ids, lengths = [b for b, _ in blocks], dict(blocks)
    for _ in range(d.below(24)):
        if d.left <= 0:
            break
        step = d.byte() % 24
        if step == 0:
            record, blocks = _mem_size(d, page)
            wire += record
            ids = [b for b, _ in blocks]
            lengths = dict(blocks)
        elif step == 1:
            wire += struct.pack(">QI", Flag.EOS, d.number(page, 1 << 32))
        elif step == 2:
            wire += _control(d, d.choice((4, 6, 3, 0, 255)), json.dumps(_json_value(d)).encode())
        else:
            wire += _page_record(d, page, ids, lengths)
    _feed(conn, xbzrle_on, bytes(wire), d)


def _feed(conn: Connection, xbzrle_on: bool, wire: bytes, d: Draw) -> Applier | None:
    """Feed ``wire`` as the receiver does (store.Staging's part in memory);
    returns the applier, for its counts."""
    held: list[bytearray] = []
    sizes: list[int] = []
    applier: Applier | None = None
    pos = 0
    try:
        while pos < len(wire):
            n = max(1, d.choice((len(wire), 1, 7, 4096, 4104, 65536)))
            conn.receive_data(wire[pos : pos + n])
            pos += n
            while (event := conn.next_event()) is not NEED_DATA:
                if isinstance(event, Hello):  # the receiver answers before the stream goes on
                    applier = Applier(event.page_size)
                    applier.allow_xbzrle = xbzrle_on
                    conn.send(Welcome(("xbzrle", "verified") if xbzrle_on else ("verified",)))
                elif isinstance(event, BlockList):
                    assert applier is not None  # the state table admits no block list before HELLO
                    total = sum(b.length for b in event.blocks)
                    if total > MAX_HELD or any(b.page_size != applier.page_size for b in event.blocks):
                        return applier  # refused or reserved on disk by the store: not this harness's part
                    applier.release()
                    held = [bytearray(-(-b.length // b.page_size) * b.page_size) for b in event.blocks]
                    sizes = [len(h) for h in held]
                    marks = [bytearray(len(h) // b.page_size) for h, b in zip(held, event.blocks, strict=True)]
                    applier.set_blocks(
                        [
                            BlockTarget(b.id_bytes, h, False, -1, m)
                            for b, h, m in zip(event.blocks, held, marks, strict=True)
                        ]
                    )
                    conn.set_page_sink(applier)
                elif isinstance(event, EndOfPass) and applier is not None:
                    applier.clear_fresh()
    except MigrationError:
        pass
    finally:
        if applier is not None:
            applier.release()
    assert [len(h) for h in held] == sizes  # nothing grew or shrank the blocks
    return applier


# ---------------------------------------------------------------------------
# the block-list and control parsers on their own, every prefix
# ---------------------------------------------------------------------------


def records_target(data: bytes) -> None:
    """MEM_SIZE and CONTROL records with edge numbers, parsed whole and at
    every cut: a prefix is incomplete (None) or fails as the whole does."""
    d = Draw(data)
    page = d.choice((4096, 512, 16384))
    if d.byte() % 2:
        record, _ = _mem_size(d, page)
    else:
        record = _control(d, d.below(9), json.dumps(_json_value(d)).encode() if d.byte() % 3 else d.bytes(32))
    whole = _allowed(parse_record, record, 0)
    cuts = sorted({d.below(len(record) + 1) for _ in range(6)} | {len(record) - 1, 12, 8})
    for cut in cuts:
        if 0 <= cut < len(record):
            part = _allowed(parse_record, record[:cut], 0)
            assert part is None or whole is None or part.size <= cut, (cut, part)


def control_target(data: bytes) -> None:
    """Control messages in the sender's direction and the receiver's, after
    a valid handshake: WELCOME, ACK, COMMITTED, VERIFIED, ERROR, COMPLETE
    with fields of every JSON type and edge numbers."""
    d = Draw(data)
    role = Role.SENDER if d.byte() % 2 else Role.RECEIVER
    conn = Connection(role)
    wire = bytearray(PREAMBLE)
    if role is Role.SENDER:
        conn.send(Hello("vm", 4096, ("xbzrle", "verified"), "fuzz"))
    else:
        wire += Connection.frame(Hello("vm", 4096, ("xbzrle", "verified"), "fuzz"))
    for _ in range(d.below(6)):
        fields = {
            k: _json_value(d)
            for k in d.choice(
                (
                    ("capabilities",),
                    ("pass", "received_bytes", "flushed_pages", "flush_ms", "hash_ms"),
                    ("digest", "path", "timings"),
                    ("code", "message"),
                    ("digest", "source_info"),
                )
            )
        }
        wire += _control(d, d.choice((2, 3, 5, 7, 6, 4, 1)), json.dumps(fields).encode())
    conn.receive_data(bytes(wire))
    try:
        while conn.next_event() is not NEED_DATA:
            pass
    except MigrationError:
        pass


TARGETS = {
    "xbzrle": xbzrle_target,
    "stream": stream_target,
    "records": records_target,
    "control": control_target,
}


def replay(paths) -> int:
    """Run every input file under ``paths`` (files or directories) through
    the target its directory is named for; returns how many ran. An input
    that fails raises, naming the file."""
    from pathlib import Path

    ran = 0
    for top in map(Path, paths):
        for f in sorted(top.rglob("*") if top.is_dir() else [top]):
            if f.is_file() and f.parent.name in TARGETS:
                try:
                    TARGETS[f.parent.name](f.read_bytes())
                except Exception as exc:
                    raise AssertionError(f"{f}: {exc!r}") from exc
                ran += 1
    return ran


def random_run(count: int, seed: int = 0) -> None:
    """``count`` random inputs through every target."""
    import random

    rng = random.Random(seed)
    for fn in TARGETS.values():
        for _ in range(count):
            fn(rng.randbytes(rng.randrange(1200)))


if __name__ == "__main__":  # python tests/fuzz_targets.py DIR...: replay, then random inputs (make fuzz)
    import sys

    from migrated import _core

    print(f"extension: {_core.__file__}")
    print(f"replayed {replay(sys.argv[1:])} inputs without a failure")
    random_run(20_000)
    print(f"ran {20_000 * len(TARGETS)} random inputs without a failure")
