"""Page records: golden bytes, batch encode -> apply round trips under a
concurrent writer, chunked feeding, malformed records, and the dirty scan."""

from __future__ import annotations

import mmap
import os
import random
import struct
import threading
import time

import pytest

from migrated import records
from migrated.cache import PageCache, page_key
from migrated.errors import ProtocolError, RecordError
from migrated.pages import hash_marked, page_count, page_hashes, page_numbers, page_range, scan
from migrated.records import Applier, BlockInfo, Control, Flag, encode_batch

PS = 4096


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


# -- golden vectors: a format change breaks these on purpose -------------------


def test_golden_zero_page_and_xbzrle_records():
    block = bytearray(3 * PS)
    block[PS:] = b"\x07" * (2 * PS)  # page 1 and 2 all 0x07, page 0 zeros
    cache = PageCache(16 * PS)
    data, st = encode_batch(cache, 0, b"ram", block, page_numbers([0, 1, 2]))
    assert bytes(data) == (
        be64(0 | 0x02) + b"\x03ram" + b"\x00" + be64(PS | 0x02 | 0x20) + b"\x07" + be64(2 * PS | 0x02 | 0x20) + b"\x07"
    )
    assert st.zero_pages == 3 and st.record_bytes == len(data)

    # page 1 gets a real page; first a miss (PAGE), then a delta (XBZRLE)
    block[PS : 2 * PS] = bytes(range(256)) * 16
    data, st = encode_batch(cache, 0, b"ram", block, page_numbers([1]))
    assert bytes(data[:12]) == be64(PS | 0x08) + b"\x03ram"
    assert len(data) == 8 + 4 + PS
    assert st.normal_pages == 1
    block[PS + 10] = 0xEE
    data, st = encode_batch(cache, 0, b"ram", block, page_numbers([1]))
    assert bytes(data) == be64(PS | 0x40) + b"\x03ram" + b"\x01\x00\x03" + b"\x0a\x01\xee"
    assert st.xbzrle_pages == 1 and st.xbzrle_bytes == 6


def test_golden_non_page_records():
    assert records.frame_eos(7) == be64(0x10) + b"\x00\x00\x00\x07"
    assert records.frame_mem_size([BlockInfo("ram", 12288, 4096)]) == (
        be64(0x04) + b"\x00\x00\x00\x01" + b"\x03ram" + be64(12288) + b"\x00\x00\x10\x00" + b"\x00\x00"
    )
    assert records.frame_control(Control.ACK, {"pass": 1}) == (
        be64(0x80) + b"\x03" + b"\x00\x00\x00\x0a" + b'{"pass":1}'
    )


def test_flag_values_are_qemus():
    assert (Flag.ZERO, Flag.MEM_SIZE, Flag.PAGE, Flag.EOS, Flag.CONTINUE, Flag.XBZRLE) == (
        0x02,
        0x04,
        0x08,
        0x10,
        0x20,
        0x40,
    )


def test_non_page_records_parse_whole_and_byte_by_byte():
    blocks = [BlockInfo("ram", 3 * PS + 5, PS, {"start": "0x1000"}), BlockInfo("b2", PS, PS)]
    stream = (
        records.frame_mem_size(blocks)
        + records.frame_eos(3)
        + records.frame_control(Control.COMPLETE, {"digest": "ab"})
    )
    parsed = []
    pos = 0
    buf = b""
    for i in range(len(stream)):  # one byte at a time
        buf += stream[i : i + 1]
        while (rec := records.parse_record(buf, pos)) is not None:
            parsed.append(rec)
            buf = buf[rec.size :]
            pos += rec.size
    assert buf == b""
    assert parsed[0].blocks == blocks and parsed[0].blocks[0].info == {"start": "0x1000"}
    assert parsed[1].pass_number == 3
    assert parsed[2].control is Control.COMPLETE and parsed[2].payload == {"digest": "ab"}


def test_non_page_record_limits_checked_at_the_header():
    huge = be64(0x80) + b"\x01" + struct.pack(">I", 1 << 30)
    with pytest.raises(ProtocolError, match="declares"):
        records.parse_record(huge, 0)
    with pytest.raises(ProtocolError, match="unknown control"):
        records.parse_record(be64(0x80) + b"\x63" + struct.pack(">I", 0), 0)
    with pytest.raises(RecordError, match="declares"):
        records.parse_record(be64(0x04) + struct.pack(">I", 10**9), 0)
    with pytest.raises(ProtocolError, match="not JSON"):
        records.parse_record(be64(0x80) + b"\x01" + struct.pack(">I", 3) + b"{{{", 0)


# -- round trips -------------------------------------------------------------------


class Receiver:
    def __init__(self, blocks):
        self.targets = {bid: bytearray(len(buf) + (-len(buf)) % PS) for bid, buf in blocks.items()}
        self.applier = Applier(PS)
        self.applier.set_blocks([(bid, t) for bid, t in self.targets.items()])

    def feed(self, data, chunk=None):
        buf = bytearray()
        view = memoryview(data)
        step = chunk or len(view) or 1
        for i in range(0, len(view), step):
            buf += view[i : i + step]
            consumed, reason = self.applier.apply(buf)
            assert reason == records.NEED_DATA
            del buf[:consumed]
        assert not buf


def send_pass(cache, blocks, hashes, first, chunk=None, receiver=None, **kw):
    total = records.BatchStats()
    for index, (bid, buf) in enumerate(blocks.items()):
        if first:
            pages = page_numbers(range(page_count(len(buf), PS)))
        else:
            pages = scan(buf, hashes[bid], PS)
        data, st = encode_batch(cache, index, bid, buf, pages, first_pass=first, hashes=hashes[bid], **kw)
        receiver.feed(data, chunk)
        total += st
    return total


def test_round_trip_with_concurrent_writer():
    """Many mutation rounds while a thread writes; final pass with the writer
    stopped reproduces the source exactly; the cache always equals the receiver."""
    rng = random.Random(11)
    blocks = {b"a": bytearray(rng.randbytes(64 * PS)), b"tail": bytearray(10 * PS + 123)}
    hashes = {bid: page_hashes(bytes(len(b)), PS) for bid, b in blocks.items()}
    cache = PageCache(128 * PS)
    rx = Receiver(blocks)
    stop = threading.Event()

    def writer():
        wr = random.Random(12)
        while not stop.is_set():
            for _ in range(50):
                b = blocks[wr.choice([b"a", b"tail"])]
                i = wr.randrange(len(b))
                b[i] = wr.randrange(256)

    t = threading.Thread(target=writer)
    t.start()
    try:
        send_pass(cache, blocks, hashes, True, receiver=rx)
        xbz = 0
        for _ in range(30):
            time.sleep(0.002)  # let the writer dirty pages between passes
            xbz += send_pass(cache, blocks, hashes, False, receiver=rx).xbzrle_pages
    finally:
        stop.set()
        t.join()
    send_pass(cache, blocks, hashes, False, receiver=rx)
    for bid, buf in blocks.items():
        assert rx.targets[bid][: len(buf)] == buf
    assert xbz > 0
    # the cache holds exactly what the receiver holds
    for index, bid in enumerate(blocks):
        for p in range(page_count(len(blocks[bid]), PS)):
            key = page_key(index, p)
            if key in cache:
                assert cache.get(key) == bytes(rx.targets[bid][p * PS : (p + 1) * PS])


@pytest.mark.parametrize("chunk", [1, 7, 4096, 4105, 100_000])
def test_round_trip_any_chunking(chunk):
    rng = random.Random(chunk)
    src = bytearray(rng.randbytes(12 * PS))
    src[3 * PS : 5 * PS] = bytes(2 * PS)
    blocks = {b"blk": src}
    hashes = {b"blk": page_hashes(bytes(len(src)), PS)}
    cache = PageCache(64 * PS)
    rx = Receiver(blocks)
    send_pass(cache, blocks, hashes, True, chunk=chunk, receiver=rx)
    for rnd in range(3):
        for p in range(0, 12, 2):
            src[p * PS + rnd * 11] ^= 0x5A
        st = send_pass(cache, blocks, hashes, False, chunk=chunk, receiver=rx)
        assert st.xbzrle_pages == 6
    assert rx.targets[b"blk"] == src


def test_xbzrle_off_sends_raw_and_drops_stale_cache_entries():
    src = bytearray(4 * PS)
    src[:] = bytes(range(256)) * 64
    cache = PageCache(16 * PS)
    blocks = {b"b": src}
    hashes = {b"b": page_hashes(bytes(len(src)), PS)}
    rx = Receiver(blocks)
    send_pass(cache, blocks, hashes, True, receiver=rx)
    assert cache.pages == 4  # seeded in the first pass
    src[5] ^= 1
    st = send_pass(cache, blocks, hashes, False, receiver=rx, xbzrle=False)
    assert st.normal_pages == 1 and st.xbzrle_pages == 0 and st.cache_lookups == 0
    assert cache.pages == 3  # the page sent raw left the cache
    src[5] ^= 2
    st = send_pass(cache, blocks, hashes, False, receiver=rx)
    assert st.cache_miss == 1 and st.normal_pages == 1
    assert rx.targets[b"b"] == src


def test_first_pass_without_seeding_leaves_cache_empty():
    src = bytearray(random.Random(1).randbytes(4 * PS))
    cache = PageCache(16 * PS)
    encode_batch(cache, 0, b"b", src, page_numbers(range(4)), first_pass=True, seed_cache=False)
    assert len(cache) == 0


def test_unchanged_page_on_hit_is_skipped():
    src = bytearray(random.Random(1).randbytes(2 * PS))
    cache = PageCache(16 * PS)
    encode_batch(cache, 0, b"b", src, page_numbers([0, 1]), first_pass=True)
    data, st = encode_batch(cache, 0, b"b", src, page_numbers([0, 1]))
    assert data == b"" and st.unchanged == 2


def test_overflow_goes_raw_and_counts():
    src = bytearray(PS)
    src[:] = b"\x01" * PS
    src[0] = 0
    cache = PageCache(16 * PS)
    encode_batch(cache, 0, b"b", src, page_numbers([0]), first_pass=True)
    for i in range(0, PS, 2):
        src[i] ^= 0xFF
    data, st = encode_batch(cache, 0, b"b", src, page_numbers([0]))
    assert st.overflow == 1 and st.normal_pages == 1 and len(data) == 8 + 2 + PS


def test_applies_into_mmap_targets():
    src = bytearray(random.Random(2).randbytes(8 * PS))
    cache = PageCache(0)
    data, _ = encode_batch(cache, 0, b"m", src, page_numbers(range(8)), first_pass=True)
    with mmap.mmap(-1, 8 * PS) as m:
        ap = Applier(PS)
        ap.set_blocks([(b"m", m)])
        assert ap.apply(data) == (len(data), records.NEED_DATA)
        assert m[:] == src
        assert ap.normal_pages == 8 and ap.position == len(data)
        ap.release()


def test_apply_stops_at_control_records():
    src = bytearray(PS)
    data, _ = encode_batch(PageCache(0), 0, b"b", src, page_numbers([0]), first_pass=True)
    stream = bytes(data) + records.frame_eos(0) + bytes(data)
    ap = Applier(PS)
    ap.set_blocks([(b"b", bytearray(PS))])
    consumed, reason = ap.apply(stream)
    assert (consumed, reason) == (len(data), records.AT_CONTROL)


def test_encode_batch_rejects_pages_outside_the_block():
    with pytest.raises(ValueError, match="outside the block"):
        encode_batch(PageCache(0), 0, b"b", bytearray(2 * PS), page_numbers([2]))


# -- malformed records -------------------------------------------------------------


def page_record(offset, flags, body, bid=b"b"):
    hdr = be64(offset | flags)
    return hdr + (b"" if flags & 0x20 else bytes([len(bid)]) + bid) + body


MALFORMED = [
    (page_record(0, 0x08 | 0x01, b"x" * PS), "unknown flag bits"),
    (page_record(0, 0x08 | 0x100, b"x" * PS), "unknown flag bits"),
    (page_record(0, 0x08 | 0x02, b"x" * PS), "invalid combination"),
    (page_record(0, 0x08 | 0x40, b"x" * PS), "invalid combination"),
    (page_record(0, 0x10 | 0x20, b""), "invalid combination"),
    (be64(0x08 | 0x20) + b"x" * PS, "CONTINUE record with no block"),
    (be64(0x08) + b"\x00" + b"x" * PS, "empty block id"),
    (page_record(0, 0x08, b"x" * PS, bid=b"nope"), "unknown block id"),
    (page_record(512, 0x08, b"x" * PS), "not page-aligned"),
    (page_record(2 * PS, 0x08, b"x" * PS), "past the end of the block"),
    (page_record(1 << 60, 0x02, b"\x00"), "past the end of the block"),
    (page_record(0, 0x40, b"\x02\x00\x03\x00\x01\x01"), "unknown XBZRLE encoding"),
    (page_record(0, 0x40, b"\x01\x00\x00"), "XBZRLE length is 0"),
    (page_record(0, 0x40, b"\x01\x10\x01" + b"\x00" * 4097), "larger than a page"),
    (page_record(0, 0x40, b"\x01\x00\x02\x05\x00"), "non-zero run of length 0"),
    (page_record(0, 0x40, b"\x01\x00\x03\x80\x20\x01"), "past the end of the page"),
]


@pytest.mark.parametrize(("bad", "message"), MALFORMED)
def test_malformed_record_rejected_with_stream_offset(bad, message):
    good, _ = encode_batch(PageCache(0), 0, b"b", bytearray(b"\x09" * 2 * PS), page_numbers([0]), first_pass=True)
    target = bytearray(b"\x33" * 2 * PS)
    ap = Applier(PS)
    ap.set_blocks([(b"b", target)])
    if "CONTINUE" in message:
        assert ap.apply(good) == (len(good), records.NEED_DATA)
        ap.forget_current()  # as after a block list: the next record must name its block
        stream = bad
    else:
        stream = bytes(good) + bad
    with pytest.raises(RecordError, match=message) as info:
        ap.apply(stream)
    assert info.value.offset == len(good)
    assert f"stream offset {len(good)}" in str(info.value)
    # the good record was applied; the bad one wrote nothing
    assert target[:PS] == b"\x09" * PS
    assert target[PS:] == b"\x33" * PS


# offsets a peer can send whose "offset + page" wraps around 2^64; each kind
# of page record must be refused before it writes
WRAPPING_OFFSETS = [(1 << 64) - PS, (1 << 64) - 2 * PS, (1 << 63), (1 << 64) - (1 << 20)]
PAGE_BODIES = {
    "zero": (0x02, b"\x41"),
    "page": (0x08, b"\x41" * PS),
    "xbzrle": (0x40, b"\x01\x00\x02\x00\x01\x41"),
}


@pytest.mark.parametrize("kind", sorted(PAGE_BODIES))
@pytest.mark.parametrize("offset", WRAPPING_OFFSETS)
def test_offsets_that_wrap_around_are_past_the_block(kind, offset):
    flags, body = PAGE_BODIES[kind]
    arena = bytearray(b"\x33" * 8 * PS)  # the block is the middle of it: a stray write shows
    block = memoryview(arena)[3 * PS : 5 * PS]
    ap = Applier(PS)
    ap.set_blocks([(b"b", block)])
    with pytest.raises(RecordError, match="past the end of the block"):
        ap.apply(page_record(offset, flags, body))
    assert arena == b"\x33" * 8 * PS


@pytest.mark.parametrize("kind", sorted(PAGE_BODIES))
@pytest.mark.parametrize("length", [0, 1, PS - 1])
def test_a_block_shorter_than_a_page_takes_no_record(kind, length):
    flags, body = PAGE_BODIES[kind]
    ap = Applier(PS)
    target = bytearray(length)
    ap.set_blocks([(b"b", target)])
    for offset in (0, (1 << 64) - PS):
        with pytest.raises(RecordError, match="past the end of the block"):
            ap.apply(page_record(offset, flags, body))
    assert target == bytearray(length)


def test_truncated_record_waits_for_more_data():
    rec = page_record(0, 0x08, b"y" * PS)
    ap = Applier(PS)
    target = bytearray(PS)
    ap.set_blocks([(b"b", target)])
    for cut in (0, 5, 8, 9, 10, 100, len(rec) - 1):
        assert ap.apply(rec[:cut]) == (0, records.NEED_DATA)
    assert target == bytearray(PS)
    assert ap.apply(rec) == (len(rec), records.NEED_DATA)


# -- scan ----------------------------------------------------------------------------


def test_scan_finds_exactly_the_changed_pages():
    rng = random.Random(4)
    buf = bytearray(rng.randbytes(100 * PS + 17))
    hashes = page_hashes(buf, PS)
    assert len(hashes) == 101
    assert list(scan(buf, hashes, PS)) == []
    changed = sorted(rng.sample(range(101), 20))
    for p in changed:
        buf[min(p * PS + rng.randrange(PS), len(buf) - 1)] ^= 0x80
    assert list(scan(buf, hashes, PS)) == changed
    assert list(scan(buf, hashes, PS)) == []  # the array was updated


def test_scan_rejects_short_hash_array():
    with pytest.raises(ValueError, match="hash array"):
        scan(bytearray(4 * PS), page_hashes(bytearray(2 * PS), PS), PS)


def test_fresh_blocks_skip_zero_fills_until_cleared():
    """A fresh (known all-zero) block does not write ZERO records of fill 0,
    so a new image file's zero pages are never faulted in; after
    clear_fresh() they are written again."""
    from migrated.cache import PageCache

    src = bytearray(3 * 4096)
    src[4096:8192] = b"\x07" * 4096  # page 1: fill 7, pages 0 and 2: zero
    data, _ = records.encode_batch(PageCache(0), 0, b"ram", src, page_numbers([0, 1, 2]), xbzrle=False)
    target = bytearray(b"\xee" * (3 * 4096))  # not actually zero: shows which fills were skipped
    a = records.Applier(4096)
    a.set_blocks([(b"ram", target, True)])
    assert a.apply(data) == (len(data), records.NEED_DATA)
    assert target[:4096] == b"\xee" * 4096 and target[4096:8192] == b"\x07" * 4096
    a.clear_fresh()
    a.apply(data)
    assert target == src


# -- fresh file-backed blocks: whole pages go to the file with pwritev ----------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from migrated import xbzrle  # noqa: E402


class FileBlocks:
    """Block files as the receiver's store makes them: sized, mapped shared,
    and open for pwritev."""

    def __init__(self, tmp_path, sizes, fd_flags=os.O_RDWR):
        self.fds, self.maps, self.paths = {}, {}, {}
        for bid, size in sizes.items():
            path = tmp_path / f"{bid.decode()}.mem"
            with open(path, "wb") as fh:
                fh.truncate(size)
            rw = os.open(path, os.O_RDWR)
            self.maps[bid] = mmap.mmap(rw, size)
            os.close(rw)
            self.fds[bid] = os.open(path, fd_flags)
            self.paths[bid] = path

    def entries(self, fresh=True):
        return [(bid, self.maps[bid], fresh, self.fds[bid]) for bid in self.maps]

    def file_bytes(self, bid):
        return self.paths[bid].read_bytes()

    def close(self):
        for m in self.maps.values():
            m.close()
        for fd in self.fds.values():
            os.close(fd)


def feed(applier, data, chunk):
    buf = bytearray()
    view = memoryview(data)
    for i in range(0, len(view), chunk):
        buf += view[i : i + chunk]
        consumed, reason = applier.apply(buf)
        assert reason == records.NEED_DATA
        del buf[:consumed]
    assert not buf


@pytest.mark.parametrize("chunk", [5000, 1 << 20, 64 << 20])
def test_fresh_file_blocks_get_whole_pages_through_the_file(tmp_path, chunk):
    """Pass 0 into new block files: more consecutive pages than one pwritev
    takes, zero pages between them, two blocks; the files hold the source."""
    rng = random.Random(chunk)
    a = bytearray(rng.randbytes(1500 * PS))
    a[100 * PS : 140 * PS] = bytes(40 * PS)  # zero pages break the run of whole pages
    b = bytearray(rng.randbytes(30 * PS))
    files = FileBlocks(tmp_path, {b"a": len(a), b"b": len(b)})
    try:
        ap = Applier(PS)
        ap.set_blocks(files.entries())
        cache = PageCache(0)
        stream = bytearray()
        for index, (bid, src) in enumerate([(b"a", a), (b"b", b)]):
            data, _ = encode_batch(cache, index, bid, src, page_range(0, len(src) // PS), first_pass=True)
            stream += data
        feed(ap, stream, chunk)
        assert ap.normal_pages == 1500 - 40 + 30 and ap.zero_pages == 40
        assert files.file_bytes(b"a") == a and files.file_bytes(b"b") == b
        assert files.maps[b"a"][:] == a  # the mapping sees what went through the file
    finally:
        ap.release()
        files.close()


def frame(bid: bytes, page: int, kind: str, payload: bytes) -> bytes:
    flag = {"page": Flag.PAGE, "zero": Flag.ZERO, "xbzrle": Flag.XBZRLE}[kind]
    return be64(page * PS | flag) + bytes([len(bid)]) + bid + payload


ops = st.lists(
    st.tuples(
        st.sampled_from([b"a", b"b"]),
        st.integers(0, 7),
        st.sampled_from(["page", "page", "zero", "xbzrle"]),
        st.integers(1, 255),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, chunk=st.integers(1, 70000))
def test_file_writes_keep_stream_order(tmp_path_factory, ops, chunk):
    """Any sequence of records (a page sent twice, a delta or a fill right
    after a whole page of the same page still waiting to be written, blocks
    interleaved) leaves the files exactly as applying the records one by one
    to plain memory does."""
    tmp = tmp_path_factory.mktemp("order")
    model = {b"a": bytearray(8 * PS), b"b": bytearray(8 * PS)}
    stream = bytearray()
    for bid, page, kind, seed in ops:
        cur = model[bid][page * PS : (page + 1) * PS]
        if kind == "page":
            new = random.Random(seed).randbytes(PS)
            stream += frame(bid, page, kind, new)
        elif kind == "zero":  # a non-zero fill: a fresh block skips only zero fills
            new = bytes([seed]) * PS
            stream += frame(bid, page, kind, bytes([seed]))
        else:
            new = bytearray(cur)
            new[seed * 13 % PS] ^= seed
            new[seed * 7 % PS] ^= 0x5A
            delta = xbzrle.encode(bytes(cur), bytes(new))
            if delta is None or not delta:
                continue
            stream += frame(bid, page, kind, bytes([records.ENCODING_XBZRLE]) + struct.pack(">H", len(delta)) + delta)
        model[bid][page * PS : (page + 1) * PS] = new
    files = FileBlocks(tmp, {b"a": 8 * PS, b"b": 8 * PS})
    ap = Applier(PS)
    try:
        ap.set_blocks(files.entries())
        feed(ap, stream, chunk)
        assert files.file_bytes(b"a") == model[b"a"] and files.file_bytes(b"b") == model[b"b"]
    finally:
        ap.release()
        files.close()


def test_a_failed_file_write_is_an_os_error_naming_it(tmp_path):
    src = bytearray(random.Random(5).randbytes(4 * PS))
    files = FileBlocks(tmp_path, {b"a": len(src)}, fd_flags=os.O_RDONLY)  # pwritev gets EBADF
    ap = Applier(PS)
    try:
        ap.set_blocks(files.entries())
        data, _ = encode_batch(PageCache(0), 0, b"a", src, page_range(0, 4), first_pass=True)
        with pytest.raises(OSError, match="cannot write pages to the image file: Bad file descriptor"):
            ap.apply(data)
        ap.set_blocks(files.entries(fresh=False))  # not fresh: pages are copied through the mapping
        assert ap.apply(data) == (len(data), records.NEED_DATA)
        assert files.maps[b"a"][:] == src
    finally:
        ap.release()
        files.close()


def test_encode_into_a_given_buffer_matches_a_new_one():
    src = bytearray(random.Random(6).randbytes(64 * PS))
    src[: 8 * PS] = bytes(8 * PS)
    pages = page_range(0, 64)
    expect, st1 = encode_batch(PageCache(0), 0, b"ram", src, pages, first_pass=True)
    into = bytearray(records.encode_capacity(64, 3, PS))
    got, st2 = encode_batch(PageCache(0), 0, b"ram", src, pages, first_pass=True, into=into)
    assert bytes(got) == bytes(expect) and st1 == st2
    with pytest.raises(ValueError, match="smaller than"):
        encode_batch(PageCache(0), 0, b"ram", src, pages, into=bytearray(100))


# -- a mapped source that shrinks while it is read -----------------------------------


def test_reading_a_truncated_mapping_is_a_source_fault_not_a_crash(tmp_path):
    """A file truncated under its mapping: scan and encode fail with
    SourceFault, naming the first byte that is gone; the process lives."""
    from migrated.errors import SourceFault

    path = tmp_path / "src.img"
    path.write_bytes(random.Random(8).randbytes(16 * PS))
    fd = os.open(path, os.O_RDONLY)
    try:
        maps = [mmap.mmap(fd, 16 * PS, mmap.MAP_SHARED, mmap.PROT_READ) for _ in range(2)]
        os.truncate(path, 8 * PS + 100)  # page 8 keeps its first 100 bytes
        with pytest.raises(SourceFault, match=rf"byte {9 * PS} of a {16 * PS}-byte block is gone \(7 page"):
            scan(maps[0], page_hashes(bytes(16 * PS), PS), PS)
        with pytest.raises(SourceFault, match="truncated"):
            encode_batch(PageCache(0), 0, b"ram", maps[1], page_range(0, 16), first_pass=True)
        # pages that still exist read as before
        data, st = encode_batch(PageCache(0), 0, b"ram", maps[1], page_range(0, 8), first_pass=True)
        assert st.normal_pages == 8
        for m in maps:
            m.close()
    finally:
        os.close(fd)


def test_a_sigbus_outside_a_guarded_loop_still_kills(tmp_path):
    """The guard is for the loops that read sources: any other SIGBUS keeps
    its default action."""
    import signal
    import subprocess
    import sys

    code = f"""
import mmap, os
import migrated._core
path = {str(tmp_path / "f")!r}
open(path, "wb").write(bytes(8192))
m = mmap.mmap(os.open(path, os.O_RDONLY), 8192, prot=mmap.PROT_READ)
os.truncate(path, 0)
print(m[5000])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGBUS, r.stderr


def test_hashing_marked_pages_while_they_are_written_misses_nothing():
    """The applier writes pages in one thread while another hashes the
    marked ones, both outside the GIL: once writing stops, one more round
    leaves every page's hash equal to hashing the buffer afresh."""
    npages = 256
    target = bytearray(npages * PS)
    marks = bytearray(npages)
    hashes = page_hashes(bytes(len(target)), PS)
    ap = Applier(PS)
    ap.set_blocks([(b"ram", target, False, None, marks)])
    rng = random.Random(9)
    batches = []
    for _ in range(150):
        src = bytearray(rng.randbytes(npages * PS))
        pages = page_numbers(sorted(rng.sample(range(npages), 128)))
        batches.append(encode_batch(PageCache(0), 0, b"ram", src, pages, xbzrle=False)[0])
    done = threading.Event()
    rounds = 0

    def hasher():
        nonlocal rounds
        while not done.is_set():
            hash_marked(target, marks, hashes, PS)
            rounds += 1

    t = threading.Thread(target=hasher)
    t.start()
    try:
        for data in batches:
            assert ap.apply(data) == (len(data), records.NEED_DATA)
    finally:
        done.set()
        t.join()
    hash_marked(target, marks, hashes, PS)
    assert rounds > 1 and not any(marks)
    assert hashes == page_hashes(target, PS)
    ap.release()


@pytest.mark.parametrize(
    ("length", "page_size", "message"),
    [
        (8192, 0, "page size"),
        (8192, 3000, "page size"),
        (8192, 1 << 20, "page size"),
        ((1 << 64) - 1, 4096, "more than"),
        ((1 << 40) * 4096 + 1, 4096, "more than"),
    ],
)
def test_block_list_numbers_are_checked_as_they_are_parsed(length, page_size, message):
    raw = records.frame_mem_size([BlockInfo("ram", length, page_size)])
    with pytest.raises(RecordError, match=message):
        records.parse_record(raw, 0)


def test_the_largest_block_a_cache_key_can_number_is_accepted():
    length = (1 << 40) * 4096
    (block,) = records.parse_record(records.frame_mem_size([BlockInfo("ram", length, 4096)]), 0).blocks
    assert block.pages == 1 << 40  # page numbers 0 .. 2^40 - 1


def test_record_end_finds_the_end_of_the_record_a_byte_belongs_to():
    """The sender completes the record a failure cut short, no more: every
    byte offset of a batch maps to the end of its record, and the applier
    takes exactly that prefix."""
    rng = random.Random(11)
    src = bytearray(rng.randbytes(24 * PS))
    src[3 * PS : 5 * PS] = bytes(2 * PS)  # zero pages
    cache = PageCache(1 << 20)
    first, _ = encode_batch(cache, 1, b"ram", bytes(src), page_range(0, 24), first_pass=True)
    for p in range(0, 24, 3):
        src[p * PS + 7] ^= 0x55  # deltas for some pages
    src[10 * PS : 11 * PS] = rng.randbytes(PS)  # one that overflows: a raw page
    batch, st = encode_batch(cache, 1, b"ram", bytes(src), page_range(0, 24))
    assert st.xbzrle_pages and st.zero_pages and st.normal_pages
    ends = []
    for at in range(len(batch) + 1):
        end = records.record_end(batch, at, PS)
        assert at <= end <= len(batch)
        ends.append(end)
    boundaries = sorted(set(ends))
    for end in boundaries:  # each is a record boundary: the applier takes that prefix whole
        ap = Applier(PS)
        ap.set_blocks([(b"ram", bytearray(24 * PS))])
        assert ap.apply(bytes(first))[1] == records.NEED_DATA
        assert ap.apply(bytes(batch[:end])) == (end, records.NEED_DATA)
    assert records.record_end(batch, 0, PS) == 0 and boundaries[-1] == len(batch)
    assert len(boundaries) == st.pages + 1


def test_a_staging_applier_refuses_xbzrle_until_the_connection_allows_it(tmp_path):
    from migrated.store import ImageStore

    staging = ImageStore(tmp_path).begin("x", PS)
    try:
        staging.set_blocks([BlockInfo("ram", PS, PS)])
        with pytest.raises(RecordError, match="not negotiated"):
            staging.applier.apply(page_record(0, 0x40, b"\x01\x00\x02\x00\x01\x41"))
    finally:
        staging.discard()
