"""End-to-end migrations with an in-process sender and receiver over real
loopback TCP, and writer processes changing the image while it moves."""

from __future__ import annotations

import errno
import json
import os
import random
import struct
import time
from array import array
from pathlib import Path

import pytest
import trio
from daemons import (
    SnapshotSource,
    error_of,
    failure_seen,
    image_bytes,
    make_image,
    migrate,
    migrate_with,
    raw_hello,
    read_to_end,
    running_receiver,
    staging_left,
    state,
    writer,
)
from structlog.testing import capture_logs

from migrated.errors import MigrationError, PeerError, SourceError
from migrated.pages import image_digest, page_hashes
from migrated.protocol import (
    NEED_DATA,
    PREAMBLE,
    Ack,
    BlockList,
    Committed,
    Complete,
    Connection,
    EndOfPass,
    Hello,
    Role,
    Verified,
    Welcome,
)
from migrated.records import Applier, BlockInfo
from migrated.report import summary
from migrated.sender import SendConfig, Sender
from migrated.source import Block, FileSource, Source

MiB = 1 << 20


async def test_changing_image_commits_exactly_the_frozen_content(tmp_path):
    src = tmp_path / "src.img"
    make_image(src, 64 * MiB, zero_fraction=0.25)
    images = tmp_path / "images"
    with (
        trio.fail_after(60),
        writer(src, "--offset", str(16 * MiB), "--length", str(32 * MiB), "--stride", "2048") as w,
    ):
        source = SnapshotSource(str(src), pause_pid=w.pid)
        async with running_receiver(images) as rx:
            summary = await migrate(rx.port, source, name="vm1", max_bandwidth=256 * MiB, downtime_limit=0.03)
        assert state(w.pid) != "T", "the writer must be resumed"
    assert summary["status"] == "completed" and summary["verified"]
    assert image_bytes(images, "vm1") == source.frozen
    assert summary["xbzrle"]["pages"] > 0
    later = summary["ram"]["transferred_bytes"] - 64 * MiB
    # every pass after the first carried deltas: far less than whole pages
    assert summary["iterations"] >= 3  # pass 0, at least one dirty pass, the final pass
    assert later < 0.25 * summary["xbzrle"]["pages"] * 4096
    assert summary["ram"]["zero_pages"] == 4096  # the first 16 MiB, which the writer leaves alone
    manifest = (images / "vm1" / "manifest.json").read_text()
    assert summary["digest"] in manifest and '"source": "file:' in manifest
    assert staging_left(images) == []


async def test_downtime_estimate_includes_the_receivers_flush(tmp_path):
    """The receiver reports in each ACK what hashing and flushing written
    pages cost it; the sender's estimate of the downtime adds that cost for
    the pages the final pass would send."""
    from migrated.policy import PassReport
    from migrated.records import BatchStats

    src = tmp_path / "src.img"
    make_image(src, 16 * MiB)
    images = tmp_path / "images"
    with trio.fail_after(60), writer(src, "--stride", "2048") as w:
        async with running_receiver(images) as rx:
            # passes enough for a write-back to finish and be reported
            sender, summary = await migrate_with(
                rx.port,
                SnapshotSource(str(src), pause_pid=w.pid),
                name="est",
                downtime_limit=0.001,
                max_iterations=8,
                stop_at_floor=False,
            )
    assert summary["status"] == "completed" and summary["iterations"] == 9
    estimate = sender.estimate
    assert 0 < estimate.commit_page_seconds < 0.01
    last = PassReport(1, wire_bytes=1000, seconds=0.1, stats=BatchStats(xbzrle_pages=100))
    estimate.scan_seconds, estimate.bandwidth = 0.002, 1e6
    assert estimate.seconds(100, last) == pytest.approx(0.002 + 100 * (10 / 1e6 + estimate.commit_page_seconds))


async def test_zero_pages_go_as_one_byte_records(tmp_path):
    src = tmp_path / "src.img"
    data = make_image(src, 8 * MiB, zero_fraction=0.4)
    images = tmp_path / "images"
    async with running_receiver(images) as rx:
        summary = await migrate(rx.port, FileSource(str(src)), name="z")
    assert image_bytes(images, "z") == data
    assert summary["ram"]["zero_pages"] == int(0.4 * 8 * MiB) // 4096
    assert summary["ram"]["transferred_bytes"] < 0.62 * 8 * MiB


async def test_receiver_without_xbzrle_negotiates_raw_only(tmp_path):
    src = tmp_path / "src.img"
    make_image(src, 4 * MiB)
    images = tmp_path / "images"
    with trio.fail_after(60), writer(src, "--stride", "1024") as w:
        source = SnapshotSource(str(src), pause_pid=w.pid)
        async with running_receiver(images, xbzrle=False) as rx:
            summary = await migrate(rx.port, source, name="raw")
    assert summary["status"] == "completed"
    assert summary["xbzrle"]["offered"] and not summary["xbzrle"]["negotiated"]
    assert summary["xbzrle"]["pages"] == 0 and summary["xbzrle"]["cache_size"] == 0
    assert image_bytes(images, "raw") == source.frozen


@pytest.mark.slow
@pytest.mark.parametrize("xbzrle", [True, False])
async def test_sparse_writer_converges_only_with_xbzrle(tmp_path, xbzrle):
    """The XBZRLE experiment on a file: 16 MiB, 4 bytes of every page
    changing continuously, 8 MiB/s."""
    src = tmp_path / "src.img"
    src.write_bytes(bytes(16 * MiB))
    images = tmp_path / "images"
    with trio.fail_after(60), writer(src, "--stride", "1024") as w:
        source = SnapshotSource(str(src), pause_pid=w.pid)
        async with running_receiver(images) as rx:
            summary = await migrate(
                rx.port,
                source,
                name="seed",
                max_bandwidth=8 * MiB,
                downtime_limit=0.3,
                max_iterations=2,
                xbzrle=xbzrle,
            )
    assert summary["status"] == "completed"
    assert image_bytes(images, "seed") == source.frozen
    if xbzrle:
        assert summary["converged"]
        assert summary["xbzrle"]["pages"] >= 4096
    else:
        assert not summary["converged"]
        assert summary["iterations"] == 3  # 2 passes, then the forced final pass
        assert summary["downtime_ms"] > 300


async def test_thrashing_cache_switches_xbzrle_off(tmp_path):
    src = tmp_path / "src.img"
    make_image(src, 8 * MiB)
    images = tmp_path / "images"
    with trio.fail_after(60), writer(src, "--stride", "4096") as w:
        source = SnapshotSource(str(src), pause_pid=w.pid)
        async with running_receiver(images) as rx:
            summary = await migrate(
                rx.port,
                source,
                name="thrash",
                cache_size=256 << 10,
                max_bandwidth=64 * MiB,
                downtime_limit=0.001,
                max_iterations=5,
                stop_at_floor=False,
            )
    assert summary["status"] == "completed"
    assert summary["xbzrle"]["passes_off"] >= 1
    assert summary["xbzrle"]["cache_miss_rate"] > 0.9
    assert image_bytes(images, "thrash") == source.frozen


class _GrowingSource(FileSource):
    """Grows its file by 3 pages and a bit before the second pass."""

    refreshes = 0

    def refresh(self):
        self.refreshes += 1
        if self.refreshes == 2:
            with open(self.path, "ab") as fh:
                fh.write(b"\x5a" * (3 * 4096 + 100))
        return super().refresh()


async def test_source_that_grows_between_passes(tmp_path):
    src = tmp_path / "src.img"
    make_image(src, 1 * MiB + 10)
    images = tmp_path / "images"
    async with running_receiver(images) as rx:
        summary = await migrate(rx.port, _GrowingSource(str(src)), name="grow", downtime_limit=0)
    assert summary["status"] == "completed"
    assert image_bytes(images, "grow") == src.read_bytes()
    assert summary["ram"]["total_bytes"] == 1 * MiB + 10 + 3 * 4096 + 100


async def test_a_large_block_is_scanned_in_parallel_parts(tmp_path, monkeypatch):
    """The sender scans a large block in parts at once: the pages found and
    the hashes kept are those of one scan; a fault in a part is the
    source's error."""
    from array import array

    from migrated import sender as sender_module
    from migrated.errors import SourceFault
    from migrated.sender import SCAN_PART_PAGES, SendConfig, Sender

    monkeypatch.setattr(sender_module, "SCAN_THREADS", 3)
    npages = 3 * SCAN_PART_PAGES
    src = tmp_path / "src.img"
    make_image(src, npages * 4096)
    source = FileSource(str(src))
    source.open()
    try:
        (block,) = source.refresh()
        sender = Sender(source, SendConfig("scan"))
        hashes = page_hashes(block.view)
        changes = [0, 5, SCAN_PART_PAGES - 1, SCAN_PART_PAGES, 2 * SCAN_PART_PAGES + 7, npages - 1]
        data = bytearray(src.read_bytes())
        for p in changes:
            data[p * 4096 + 100 : p * 4096 + 103] = b"\xff\x00\xee"
        with open(src, "r+b") as fh:  # noqa: ASYNC230 -- a test writing a 64 MiB file in place, once
            fh.write(data)
        assert list(await sender._changed(block, hashes)) == changes
        assert hashes == page_hashes(block.view)
        os.truncate(src, 10 * 4096)
        with pytest.raises(SourceFault, match="shrank"):
            await sender._changed(block, array("Q", bytes(8 * npages)))
    finally:
        source.close()


async def test_empty_image(tmp_path):
    src = tmp_path / "src.img"
    src.write_bytes(b"")
    images = tmp_path / "images"
    async with running_receiver(images) as rx:
        summary = await migrate(rx.port, FileSource(str(src)), name="empty")
    assert summary["status"] == "completed" and image_bytes(images, "empty") == b""


async def _proxy(listen_port_ready, target_port, corrupt_marker: bytes, *, task_status=trio.TASK_STATUS_IGNORED):
    """A TCP proxy that flips one byte of the first occurrence of a marker
    in the sender's stream."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handle(client):
        upstream = await trio.open_tcp_stream("127.0.0.1", target_port)
        done = False
        tail = b""

        async def forward():
            nonlocal done, tail
            while data := await client.receive_some(1 << 16):
                if not done:
                    window = tail + data
                    at = window.find(corrupt_marker)
                    if at >= 0:
                        at -= len(tail)
                        data = bytearray(data)
                        # the marker may start in the previous chunk: flip its last byte
                        pos = at + len(corrupt_marker) - 1
                        data[pos] ^= 0xFF
                        done = True
                    tail = window[-len(corrupt_marker) :]
                await upstream.send_all(data)

        async def backward():
            while data := await upstream.receive_some(1 << 16):
                await client.send_all(data)

        async with trio.open_nursery() as n:
            n.start_soon(forward)
            n.start_soon(backward)

    await trio.serve_listeners(handle, listeners)


@pytest.mark.parametrize("staging", ["on-disk", "in-memory"])
async def test_corrupted_page_in_flight_is_caught_by_the_digest(tmp_path, nursery, staging):
    images = tmp_path / "images"
    good = tmp_path / "good.img"
    good_data = make_image(good, 2 * MiB, seed=5)
    bad = tmp_path / "bad.img"
    make_image(bad, 2 * MiB, seed=6, marker=b"CORRUPT-ME-IN-FLIGHT")
    with trio.fail_after(8):
        await _corrupted(images, good, good_data, bad, nursery, staging == "in-memory")


async def _corrupted(images, good, good_data, bad, nursery, in_memory):
    async with running_receiver(images, stage_in_memory=in_memory) as rx:
        assert rx.config.stage_in_memory == in_memory
        await migrate(rx.port, FileSource(str(good)), name="vm")
        port = await nursery.start(_proxy, None, rx.port, b"CORRUPT-ME-IN-FLIGHT")
        with pytest.raises(PeerError) as info:
            await migrate(port, FileSource(str(bad)), name="vm")
        assert info.value.code == "digest-mismatch"
        assert "nothing was committed" in str(info.value)
        assert image_bytes(images, "vm") == good_data  # the previous image, byte for byte
        assert staging_left(images) == []
        # and the receiver keeps serving
        await migrate(rx.port, FileSource(str(good)), name="vm2")
        assert rx.failed == 1 and rx.completed == 2


async def _raw_client(port: int, payload: bytes) -> bytes:
    """Send raw bytes, return everything the receiver answers until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(payload)
        with trio.fail_after(10):
            return await read_to_end(stream)


async def test_hostile_records_fail_the_migration_not_the_daemon(tmp_path):
    images = tmp_path / "images"
    async with running_receiver(images) as rx:
        garbage = struct.pack(">Q", 0x1000 | 0x08) + b"\x03ram" + bytes(100)  # PAGE before any block list
        answer = await _raw_client(rx.port, raw_hello() + garbage)
        assert answer.startswith(PREAMBLE)
        err = error_of(answer)
        assert err["code"] == "bad-record" and "stream offset" in err["message"]
        answer = await _raw_client(rx.port, b"GET / HTTP/1.1\r\n\r\n")
        assert error_of(answer)["code"] == "protocol"
        answer = await _raw_client(rx.port, raw_hello(page_size=3000))
        assert "page size 3000" in error_of(answer)["message"]
        answer = await _raw_client(rx.port, raw_hello(name="../etc"))
        assert "not valid" in error_of(answer)["message"]
        assert staging_left(images) == []
        src = tmp_path / "src.img"
        data = make_image(src, 1 * MiB)
        await migrate(rx.port, FileSource(str(src)), name="after")
        assert image_bytes(images, "after") == data


async def test_other_protocol_version_is_refused_by_both_sides(tmp_path):
    images = tmp_path / "images"
    async with running_receiver(images) as rx:
        answer = await _raw_client(rx.port, b"MIGRATED" + struct.pack(">I", 99))
        assert answer.startswith(PREAMBLE)
        err = error_of(answer)
        assert err["code"] == "version" and "version 99" in err["message"]

    # a receiver from the future: the sender names the version mismatch
    async def future_receiver(stream):
        await stream.send_all(b"MIGRATED" + struct.pack(">I", 7))
        await stream.receive_some(1 << 16)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    src = tmp_path / "src.img"
    make_image(src, 64 << 10)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, future_receiver, listeners)
        with pytest.raises(MigrationError, match="version 7"):
            await migrate(listeners[0].socket.getsockname()[1], FileSource(str(src)))
        nursery.cancel_scope.cancel()


async def test_concurrent_migrations_and_a_busy_name(tmp_path):
    images = tmp_path / "images"
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    da, db = make_image(a, 8 * MiB, seed=1), make_image(b, 8 * MiB, seed=2)
    results = {}
    async with running_receiver(images) as rx:

        async def run(name, path, key):
            try:
                results[key] = await migrate(rx.port, FileSource(str(path)), name=name, max_bandwidth=16 * MiB)
            except MigrationError as exc:
                results[key] = exc

        async with trio.open_nursery() as n:
            n.start_soon(run, "a", a, "a")
            n.start_soon(run, "b", b, "b")
            await trio.sleep(0.2)
            n.start_soon(run, "a", b, "a-again")
    assert results["a"]["status"] == "completed" and results["b"]["status"] == "completed"
    assert isinstance(results["a-again"], PeerError) and results["a-again"].code == "busy"
    assert image_bytes(images, "a") == da and image_bytes(images, "b") == db


async def test_a_new_commit_replaces_the_previous_version(tmp_path):
    """Committing a name again swaps the symlink, then removes the version
    it replaced (after COMMITTED: deleting files is no part of the downtime)."""
    images = tmp_path / "images"
    src = tmp_path / "src.img"
    make_image(src, 4 * MiB)
    async with running_receiver(images) as rx:
        await migrate(rx.port, FileSource(str(src)), name="again")
        first = os.readlink(images / "again")
        data = make_image(src, 4 * MiB, seed=5)
        await migrate(rx.port, FileSource(str(src)), name="again")
        second = os.readlink(images / "again")
        assert second != first and image_bytes(images, "again") == data
        with trio.fail_after(10):
            while (images / first).exists():
                await trio.sleep(0.01)
        assert sorted(n for n in os.listdir(images) if n.startswith(".again.")) == [second]


async def test_dropped_sender_keeps_the_previous_image(tmp_path):
    images = tmp_path / "images"
    src = tmp_path / "src.img"
    data = make_image(src, 4 * MiB)
    async with running_receiver(images) as rx:
        await migrate(rx.port, FileSource(str(src)), name="keep")
        # a sender that sends half an image and vanishes
        from migrated.sender import SendConfig, Sender

        make_image(src, 4 * MiB, seed=9)
        source = FileSource(str(src))
        source.open()
        stream = await trio.open_tcp_stream("127.0.0.1", rx.port)
        with trio.move_on_after(0.3):
            await Sender(source, SendConfig("keep", max_bandwidth=4 * MiB)).run(stream)
        await stream.aclose()
        source.close()
        await failure_seen(rx)
        assert image_bytes(images, "keep") == data
        assert staging_left(images) == []


async def test_a_failed_page_write_fails_the_migration_and_keeps_the_image(tmp_path, monkeypatch):
    """The receiver cannot write a block file (here: its descriptor is made
    read-only): the sender reports the receiver's store error, the previous
    image stays, and the receiver keeps serving."""
    from migrated.store import Staging

    images = tmp_path / "images"
    src = tmp_path / "src.img"
    data = make_image(src, 4 * MiB)
    async with running_receiver(images) as rx:
        await migrate(rx.port, FileSource(str(src)), name="w")
        make_image(src, 4 * MiB, seed=3)
        original = Staging.set_blocks
        opened = []

        def read_only_blocks(self, blocks):
            targets = original(self, blocks)
            opened.extend(os.open(f"/proc/self/fd/{t.fd}", os.O_RDONLY) for t in targets)
            targets = [t._replace(fd=ro) for t, ro in zip(targets, opened[-len(targets) :], strict=False)]
            self.applier.set_blocks(targets)
            return targets

        monkeypatch.setattr(Staging, "set_blocks", read_only_blocks)
        with pytest.raises(PeerError) as err:
            await migrate(rx.port, FileSource(str(src)), name="w")
        assert err.value.code == "store"
        assert "cannot write pages of image 'w'" in str(err.value) and "Bad file descriptor" in str(err.value)
        assert image_bytes(images, "w") == data
        assert staging_left(images) == []
        monkeypatch.undo()
        await migrate(rx.port, FileSource(str(src)), name="w")
        assert image_bytes(images, "w") == src.read_bytes()
    for fd in opened:
        os.close(fd)


async def test_source_file_truncated_mid_pass_fails_cleanly(tmp_path):
    """The source file shrinks between the sender mapping it and reading it
    in the final pass (a SIGBUS without the guard): the sender fails with a
    source error that says so, the paused writer runs again, the previous
    image stays."""

    class Truncated(FileSource):
        frozen = False

        def freeze(self):
            super().freeze()
            self.frozen = True

        def refresh(self):
            blocks = super().refresh()
            if self.frozen:  # mapped at full size, then cut before the scan
                os.truncate(self.path, 1 * MiB)
            return blocks

    images = tmp_path / "images"
    src = tmp_path / "src.img"
    data = make_image(src, 4 * MiB)
    async with running_receiver(images) as rx:
        await migrate(rx.port, FileSource(str(src)), name="cut")
        # the writer keeps to the part that survives the cut
        with trio.fail_after(60), writer(src, "--length", str(MiB), "--stride", "4096") as w:
            source = Truncated(str(src), pause_pid=w.pid)
            with pytest.raises(MigrationError) as err:
                await migrate(rx.port, source, name="cut")
            assert source.frozen and state(w.pid) in "RS"
        assert err.value.code == "source"
        assert f"byte {1 * MiB} of a {4 * MiB}-byte block is gone" in str(err.value)
        await failure_seen(rx)
        assert image_bytes(images, "cut") == data
        assert staging_left(images) == []


def test_receiver_digest_matches_an_independent_computation(tmp_path):
    """The digest the receiver checks is blake2b over per-page hashes in
    block order; recompute it from the file to pin the definition."""
    data = os.urandom(3 * 4096 + 5)
    d1 = image_digest([("ram", len(data), page_hashes(data))])
    d2 = image_digest([("ram", len(data), page_hashes(data + bytes(4091)))])
    assert d1 == d2  # the last page is zero-padded
    assert image_digest([("ram2", len(data), page_hashes(data))]) != d1


@pytest.mark.parametrize("length", [64 * 4096, 64 * 4096 - 1000])
def test_staging_digest_follows_every_written_page(tmp_path, length):
    """The receiver keeps each page's hash as read back from its file,
    hashing again only pages written since (so the commit does not reread
    the image): whole pages through the file, fills and deltas through the
    mapping, rounds of hashing in between, a block that shrinks and grows;
    the digest always equals hashing every byte of the files."""
    import random

    from migrated.cache import PageCache
    from migrated.pages import page_range, scan
    from migrated.records import BlockInfo, encode_batch
    from migrated.store import ImageStore

    rng = random.Random(length)
    staging = ImageStore(tmp_path / "images").begin("marks", 4096)
    src = bytearray(rng.randbytes(length))
    src[8 * 4096 : 16 * 4096] = bytes(8 * 4096)
    sent = page_hashes(bytes(len(src)))
    cache = PageCache(1 << 20)
    applier = staging.applier
    applier.allow_xbzrle = True  # as a connection that negotiated it sets

    def send(first: bool) -> None:
        pages = page_range(0, len(sent)) if first else scan(src, sent, 4096)
        data, _ = encode_batch(cache, 1, b"ram", src, pages, first_pass=first, hashes=sent)
        assert applier.apply(data) == (len(data), 0)

    def check() -> None:
        f = staging.blocks["ram"]
        assert f.path.read_bytes()[: f.info.length] == src
        assert staging.digest() == image_digest([("ram", len(src), page_hashes(bytes(src)))])

    try:
        staging.set_blocks([BlockInfo("ram", len(src), 4096)])
        send(first=True)
        staging.end_of_fresh_blocks()
        staging.rehash()  # a round of hashing between passes
        for round_ in range(3):
            for _ in range(40):
                src[rng.randrange(len(src))] = rng.randrange(256)
            src[(20 + round_) * 4096 : (21 + round_) * 4096] = bytes([round_ + 1]) * 4096  # a fill
            send(first=False)
            if round_ == 1:
                staging.rehash()
                staging.flush()
        check()
        for new_length in (length - 5000, length + 3 * 4096 + 7):  # the block shrinks, then grows
            del src[new_length:]
            src.extend(rng.randbytes(new_length - len(src)))
            staging.set_blocks([BlockInfo("ram", new_length, 4096)])
            sent = page_hashes(bytes(len(src)))  # a resized block is sent whole
            send(first=True)
            check()
    finally:
        staging.discard()


async def test_stale_staging_from_a_crash_is_removed_at_start(tmp_path):
    images = tmp_path / "images"
    src = tmp_path / "src.img"
    data = make_image(src, 1 * MiB)
    async with running_receiver(images) as rx:
        await migrate(rx.port, FileSource(str(src)), name="kept")
    # what a crash can leave: a staging dir, an orphan version, a half-made link
    (images / ".kept.staging-deadbeef").mkdir()
    (images / ".kept.staging-deadbeef" / "b1.mem").write_bytes(b"x" * 100)
    (images / ".lost.v123").mkdir()
    (images / ".kept.link-tmp").symlink_to(".lost.v123")
    async with running_receiver(images):
        pass
    assert sorted(p.name for p in images.iterdir() if not p.is_symlink() or p.name == "kept") == sorted(
        ["kept", os.readlink(images / "kept"), ".lock"]
    )
    assert image_bytes(images, "kept") == data


async def test_a_directory_in_the_way_is_not_overwritten(tmp_path):
    images = tmp_path / "images"
    (images / "mine").mkdir(parents=True)
    (images / "mine" / "precious").write_text("keep me")
    src = tmp_path / "src.img"
    make_image(src, 64 << 10)
    async with running_receiver(images) as rx:
        with pytest.raises(PeerError, match="not an image committed by migrated"):
            await migrate(rx.port, FileSource(str(src)), name="mine")
    assert (images / "mine" / "precious").read_text() == "keep me"


def _scripted_receiver(at_complete, *, together: bool = False):
    """A receiver that speaks the protocol until COMPLETE, then answers
    ``at_complete`` (an event, or a tuple of events sent in one write with
    ``together``) or, with None, drops the connection without a word (as a
    receiver killed during the final pass would)."""

    async def serve(stream):
        conn = Connection(Role.RECEIVER)
        async with stream:
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    data = await stream.receive_some(1 << 20)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(ev, Hello):
                    await stream.send_all(conn.send(Welcome(("xbzrle", "verified"))))
                elif isinstance(ev, BlockList):
                    sink = Applier(4096)
                    sink.set_blocks([(b.id.encode(), bytearray(b.pages * 4096)) for b in ev.blocks])
                    conn.set_page_sink(sink)
                elif isinstance(ev, EndOfPass):
                    await stream.send_all(conn.send(Ack(ev.pass_number)))
                elif isinstance(ev, Complete):
                    if at_complete is None:
                        return
                    answers = at_complete if isinstance(at_complete, tuple) else (at_complete,)
                    if together:
                        await stream.send_all(b"".join(conn.send(a) for a in answers))
                    else:
                        for a in answers:
                            await stream.send_all(conn.send(a))

    return serve


async def test_a_confirmation_of_another_digest_fails_and_resumes_the_writer(tmp_path, nursery):
    src = tmp_path / "src.img"
    make_image(src, 4 * MiB)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(trio.serve_listeners, _scripted_receiver(Committed("0" * 64, "/nowhere/img")), listeners)
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(60), writer(src, "--stride", "4096") as w:
        source = SnapshotSource(str(src), pause_pid=w.pid)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        sender = Sender(source, SendConfig("other"))
        source.open()
        try:
            with pytest.raises(MigrationError, match="receiver confirmed digest 0000") as info:
                await sender.run(stream)
        finally:
            source.close()
        assert source.frozen is not None and state(w.pid) != "T", "stopped for the final pass, running again"
    assert info.value.code == "protocol"
    s = summary(sender)
    assert s["status"] == "failed" and not s["verified"] and s["image"] == ""
    assert s["error"]["side"] == "receiver"


async def test_receiver_lost_during_the_final_pass_resumes_the_writer(tmp_path, nursery):
    src = tmp_path / "src.img"
    make_image(src, 4 * MiB)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(trio.serve_listeners, _scripted_receiver(None), listeners)
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(60), writer(src, "--stride", "4096") as w:
        source = SnapshotSource(str(src), pause_pid=w.pid)
        with pytest.raises(MigrationError) as info:
            await migrate(port, source, name="lost")
        assert source.frozen is not None, "the writer was stopped for the final pass"
        assert state(w.pid) != "T", "and it is running again"
    assert info.value.code == "network" and "receiver" in str(info.value)


class _HeldToTheCommit(SnapshotSource):
    """A file source whose writer must stay stopped until the image is durable."""

    runs_before_durable = False


@pytest.mark.parametrize("released", ["at-verified", "at-committed"])
async def test_a_source_that_may_run_again_is_released_before_the_sync(tmp_path, monkeypatch, released):
    """A file's writer runs again once the receiver has verified the image
    (the sync and swap are out of the downtime); a source that must not run
    before the image is durable is released at COMMITTED. The receiver's
    commit sees which."""
    from migrated.store import Staging

    images = tmp_path / "images"
    src = tmp_path / "src.img"
    make_image(src, 4 * MiB)
    seen = []
    original = Staging.commit

    def commit(self, digest, source_info=None):
        seen.append(state(w.pid))
        return original(self, digest, source_info)

    monkeypatch.setattr(Staging, "commit", commit)
    kind = SnapshotSource if released == "at-verified" else _HeldToTheCommit
    async with running_receiver(images) as rx:
        with writer(src, "--stride", "4096") as w:
            source = kind(str(src), pause_pid=w.pid)
            s = await migrate(rx.port, source, name="rel")
            assert state(w.pid) != "T"
    assert s["status"] == "completed" and s["verified"] and source.frozen is not None
    assert image_bytes(images, "rel") == source.frozen
    parts = s["downtime_breakdown"]
    assert {"freeze_ms", "scan_ms", "send_ms", "receiver_digest_ms", "receiver_apply_ms"} <= set(parts)
    if released == "at-verified":
        assert seen[0] != "T", "the writer ran again before the receiver synced the image"
        assert "commit_after_release_ms" in parts and "receiver_sync_ms" not in parts
    else:
        assert seen[0] == "T", "the writer stayed stopped until the image was durable"
        assert "receiver_sync_ms" in parts and "commit_after_release_ms" not in parts
    inside = sum(v for k, v in parts.items() if k != "commit_after_release_ms")
    assert inside == pytest.approx(s["downtime_ms"], abs=2.0)


async def test_a_sync_failing_after_verified_fails_the_migration_and_keeps_the_image(tmp_path, monkeypatch):
    """The disk fills while the receiver makes a verified image durable: the
    writer (released at VERIFIED) keeps running, the sender reports the
    receiver's no-space error, and the previous image stays."""
    from migrated.errors import NoSpace
    from migrated.store import Staging

    images = tmp_path / "images"
    src = tmp_path / "src.img"
    data = make_image(src, 4 * MiB)
    async with running_receiver(images) as rx:
        await migrate(rx.port, FileSource(str(src)), name="full")
        make_image(src, 4 * MiB, seed=5)

        def full(self, digest, source_info=None):
            raise NoSpace("cannot write the manifest: not enough space (No space left on device)")

        monkeypatch.setattr(Staging, "commit", full)
        with writer(src, "--stride", "4096") as w:
            source = SnapshotSource(str(src), pause_pid=w.pid)
            with pytest.raises(PeerError) as err:
                await migrate(rx.port, source, name="full")
            assert source.frozen is not None and state(w.pid) != "T"
        await failure_seen(rx)
    assert err.value.code == "no-space"
    assert image_bytes(images, "full") == data
    assert staging_left(images) == []


async def test_a_scan_longer_than_the_limit_stops_iterating_after_the_first_dirty_pass(tmp_path):
    """The final pass repeats the scan with the source frozen: when the scan
    alone takes longer than the limit, more passes cannot help."""
    src = tmp_path / "src.img"
    make_image(src, 4 * MiB)
    async with running_receiver(tmp_path / "images") as rx:
        s = await migrate(rx.port, FileSource(str(src)), name="floor", downtime_limit=1e-6, max_iterations=30)
        assert s["stop_reason"] == "floor" and not s["converged"] and s["iterations"] == 3  # 0, 1 and the final
        s = await migrate(
            rx.port, FileSource(str(src)), name="floor", downtime_limit=1e-6, max_iterations=4, stop_at_floor=False
        )
        assert s["stop_reason"] == "iterations" and s["iterations"] == 5
    assert image_bytes(tmp_path / "images", "floor") == src.read_bytes()


@pytest.fixture
def shm_image():
    """A file in shared memory (/dev/shm), removed afterwards."""
    path = Path("/dev/shm") / f"migrated-test-{os.getpid()}-{time.monotonic_ns()}.img"
    yield path
    path.unlink(missing_ok=True)


async def test_a_shared_memory_file_is_tracked_through_its_writer(tmp_path, shm_image, monkeypatch):
    """A /dev/shm image with a --pause-pid writer: the writer's mapping is
    tracked by userfaultfd, later passes hash nothing, and the image is
    what the writer left when it was stopped."""
    from migrated import source as source_module

    scans = []
    real_scan = source_module.scan
    monkeypatch.setattr(source_module, "scan", lambda *a: scans.append(a[3:]) or real_scan(*a))
    make_image(shm_image, 8 * MiB)
    images = tmp_path / "images"
    async with running_receiver(images) as rx:
        with writer(shm_image, "--stride", "4096", "--pause", "0.02") as w:
            source = SnapshotSource(str(shm_image), pause_pid=w.pid)
            s = await migrate(
                rx.port,
                source,
                name="shm",
                max_bandwidth=32 * MiB,
                downtime_limit=0.001,
                max_iterations=4,
                stop_at_floor=False,
            )
            assert state(w.pid) != "T"
            assert uffd_left(w.pid) == []
    assert source.tracking == "uffd" and s["source_info"]["dirty_tracking"] == "uffd"
    assert s["iterations"] == 5 and sum(p["pages"] for p in s["passes"][1:]) > 0  # the writer's writes were found
    assert scans == [], "no pass hashed the file"
    assert image_bytes(images, "shm") == source.frozen


async def test_a_file_on_disk_is_scanned_and_an_explicit_uffd_there_is_an_error(tmp_path, shm_image):
    src = tmp_path / "src.img"  # not shared memory
    make_image(src, 1 * MiB)
    with writer(src, "--stride", "4096", "--pause", "0.05") as w:
        source = FileSource(str(src), pause_pid=w.pid)
        with capture_logs() as logs:
            source.open()
        source.close()
        assert source.tracking == "scan"
        assert any("not shared memory" in e.get("reason", "") for e in logs if e["event"] == "choose_dirty_tracking")
        with pytest.raises(SourceError, match="--dirty-tracking uffd: the file is not shared memory"):
            FileSource(str(src), pause_pid=w.pid, tracking="uffd").open()
    make_image(shm_image, 1 * MiB)
    with pytest.raises(SourceError, match="needs its writer: --pause-pid"):
        FileSource(str(shm_image), tracking="uffd").open()


def uffd_left(pid: int) -> list[str]:
    """The userfaultfd descriptors in ``pid``'s table."""
    fds = Path(f"/proc/{pid}/fd")
    return [fd.name for fd in fds.iterdir() if "userfaultfd" in os.readlink(fd)]


async def test_verified_and_committed_in_one_read_count_the_sync_in_the_downtime(tmp_path, nursery, monkeypatch):
    """VERIFIED and COMMITTED arriving together: the source is released at
    COMMITTED, so the receiver's sync is inside the downtime, not after it."""
    from migrated.pages import image_digest as digest_of

    src = tmp_path / "src.img"
    make_image(src, 1 * MiB)
    expected = digest_of([("ram", 1 * MiB, page_hashes(src.read_bytes()))])
    timings = {"wait": 0.0, "digest": 1.0, "flush_wait": 0.0, "sync": 500.0, "swap": 1.0}
    answers = (Verified(expected), Committed(expected, "/x", timings))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(trio.serve_listeners, _scripted_receiver(answers, together=True), listeners)
    port = listeners[0].socket.getsockname()[1]
    s = await migrate(port, FileSource(str(src)), name="both")
    assert s["status"] == "completed"
    parts = s["downtime_breakdown"]
    assert parts["receiver_sync_ms"] == 500.0 and "commit_after_release_ms" not in parts


class _RearmingSource(SnapshotSource):
    """A file source whose writer is "tracked": each rearm of a span writes
    new bytes into most of its pages first and reports them, so a pass's
    batches overflow and are split."""

    rearmed = 0

    def rearms(self, block):
        return True

    def rearm(self, block, first, end):
        rng = random.Random(first * 7 + end + self.rearmed)
        self.rearmed += 1
        pages = array("Q", [p for p in range(first, end) if rng.random() < 0.6])
        with open(self.path, "r+b") as fh:
            for p in pages:
                fh.seek(p * 4096 + rng.randrange(4000))
                fh.write(rng.randbytes(64))
        return pages


async def test_pages_a_rearm_adds_are_sent_whole_and_in_order_even_beyond_a_batch(tmp_path):
    """A rearm that finds more pages than a batch holds: the batch is split,
    every page goes once per pass, and the image equals the frozen file."""
    path = tmp_path / "src.img"
    make_image(path, 16 * MiB)
    images = tmp_path / "images"
    async with running_receiver(images) as rx:
        source = _RearmingSource(str(path))
        s = await migrate(rx.port, source, downtime_limit=1e-6, max_iterations=3, stop_at_floor=False)
    assert s["status"] == "completed"
    assert source.rearmed > 4, "every pass but the final one rearmed its spans"
    later = [p for p in s["passes"][1:-1]]
    assert later and all(p["pages"] > 1024 for p in later), "the rearmed pages went, more than one batch of them"
    assert image_bytes(images, "img") == source.frozen


class _ManyBlocks(Source):
    """Many one-page blocks in memory; before the second pass every third
    one changes (once: a batch lost then is never sent again), so a batch
    with a page to send comes between two tracked spans that find nothing
    (and frame no records)."""

    def __init__(self, n: int):
        self.data = [bytearray(random.Random(i).randbytes(4096)) for i in range(n)]
        self.refreshes = 0
        self.frozen: list[bytes] | None = None

    def refresh(self):
        self.refreshes += 1
        if self.refreshes == 2:
            for i in range(0, len(self.data), 3):
                self.data[i][100] = (self.data[i][100] + 1) & 255
        return [Block(BlockInfo(f"b{i:03}", 4096, 4096), memoryview(d)) for i, d in enumerate(self.data)]

    def rearms(self, block):
        return True

    def rearm(self, block, first, end):
        return array("Q")

    def freeze(self):
        self.frozen = [bytes(d) for d in self.data]


async def test_batches_that_frame_nothing_do_not_let_the_encoder_overrun_the_send(tmp_path, monkeypatch):
    """A batch with nothing to send leaves its buffer free: reusing the ring
    by turns regardless let the encoder overwrite a batch still being sent (a
    corrupt stream; found by the churning-process test)."""
    from migrated import sender

    write = sender._Writer.write

    async def slow_write(self, data, **kw):  # a slow link: each batch waits before it goes
        if kw.get("page_records"):
            await trio.sleep(0.002)
        await write(self, data, **kw)

    monkeypatch.setattr(sender._Writer, "write", slow_write)
    images = tmp_path / "images"
    source = _ManyBlocks(96)
    async with running_receiver(images) as rx:
        s = await migrate(rx.port, source, downtime_limit=1e-6, max_iterations=3, stop_at_floor=False)
    assert s["status"] == "completed", s.get("error")
    assert [p["pages"] for p in s["passes"][1:]] == [32, 0, 0]
    blocks = {b["id"]: b["file"] for b in json.loads((images / "img" / "manifest.json").read_text())["blocks"]}
    assert source.frozen is not None
    for i, want in enumerate(source.frozen):
        assert (images / "img" / blocks[f"b{i:03}"]).read_bytes() == want, f"block {i}"


class _PeekingAtTheStaging(SnapshotSource):
    """Reads the receiver's staging files on disk when it is frozen (the
    final pass): with the image held in memory, nothing is there yet."""

    images: Path
    on_disk: bytes = b""

    def freeze(self):
        super().freeze()
        (staging,) = self.images.glob(".img.staging-*")
        self.on_disk = b"".join(f.read_bytes() for f in sorted(staging.glob("*.mem")))


async def test_an_image_staged_in_memory_reaches_the_disk_only_at_the_commit(tmp_path):
    """--stage-in-memory: the passes go to memfds, the block files hold the
    reserved space only, and the commit writes the verified image to them."""
    path = tmp_path / "src.img"
    make_image(path, 8 * MiB, seed=3)
    images = tmp_path / "images"
    async with running_receiver(images, stage_in_memory=True) as rx:
        with writer(path, "--stride", "4096", "--pause", "0.02") as w:
            source = _PeekingAtTheStaging(str(path), pause_pid=w.pid, tracking="scan")
            source.images = images
            s = await migrate(
                rx.port, source, downtime_limit=1e-6, max_iterations=3, stop_at_floor=False, max_bandwidth=32 * MiB
            )
    assert s["status"] == "completed" and s["iterations"] == 4
    assert len(source.on_disk) == 8 * MiB and source.on_disk == bytes(8 * MiB), "nothing written to disk before"
    assert image_bytes(images, "img") == source.frozen
    assert staging_left(images) == []


async def test_a_commit_longer_than_the_idle_timeout_is_reported_committed(tmp_path, monkeypatch):
    """The sender sends nothing while the receiver commits (with the image in
    memory, writing it all): the idle timeout no longer runs out meanwhile
    and turns a committed image into a reported failure."""
    from migrated.store import Staging

    commit = Staging.commit

    def slow_commit(self, *args):
        time.sleep(0.8)  # in the commit's worker thread
        return commit(self, *args)

    monkeypatch.setattr(Staging, "commit", slow_commit)
    path = tmp_path / "src.img"
    data = make_image(path, 2 * MiB)
    images = tmp_path / "images"
    async with running_receiver(images, stage_in_memory=True, idle_timeout=0.2) as rx:
        s = await migrate(rx.port, FileSource(str(path)))
        assert rx.completed == 1 and rx.failed == 0
    assert s["status"] == "completed"
    assert image_bytes(images, "img") == data


async def test_a_block_that_cannot_be_reserved_leaves_no_descriptor_behind(tmp_path, monkeypatch):
    """A full disk (or memory) when a block is reserved: the migration fails
    with no-space, and the receiver holds no descriptor of the staging's
    files (a deleted file held open keeps its space taken)."""
    from migrated import store

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "posix_fallocate", full)
    path = tmp_path / "src.img"
    make_image(path, 1 * MiB)
    images = tmp_path / "images"
    async with running_receiver(images, stage_in_memory=True) as rx:
        with pytest.raises(PeerError) as info:
            await migrate(rx.port, FileSource(str(path)))
        await failure_seen(rx)
    assert info.value.code == "no-space"
    held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if _readable_link(fd)]
    assert not [h for h in held if ".staging-" in h or "memfd:migrated" in h], held


def _readable_link(fd: str) -> bool:
    try:
        os.readlink(f"/proc/self/fd/{fd}")
        return True
    except OSError:
        return False


async def test_an_image_that_does_not_fit_in_memory_is_refused_before_any_page(tmp_path, monkeypatch):
    """--stage-in-memory with less memory available than the image needs: a
    clear no-space error naming memory, before anything is allocated."""
    from migrated import store

    monkeypatch.setattr(store, "memory_available", lambda: 1 * MiB)
    path = tmp_path / "src.img"
    make_image(path, 4 * MiB)
    images = tmp_path / "images"
    async with running_receiver(images, stage_in_memory=True) as rx:
        with pytest.raises(PeerError) as info:
            await migrate(rx.port, FileSource(str(path)))
        await failure_seen(rx)
    assert info.value.code == "no-space" and "in memory" in str(info.value) and "available" in str(info.value)
    assert staging_left(images) == []


def test_memory_available_reads_meminfo():
    from migrated.store import memory_available

    available = memory_available()
    assert available is not None and available > 0


async def test_eight_concurrent_migrations_to_one_receiver_all_verify(tmp_path):
    images = tmp_path / "images"
    sources = {f"vm{i}": tmp_path / f"{i}.img" for i in range(8)}
    data = {name: make_image(path, 2 * MiB, seed=i) for i, (name, path) in enumerate(sources.items())}
    results: dict = {}
    async with running_receiver(images) as rx:

        async def run(name):
            results[name] = await migrate(rx.port, FileSource(str(sources[name])), name=name, max_bandwidth=8 * MiB)

        async with trio.open_nursery() as n:
            for name in sources:
                n.start_soon(run, name)
        await trio.sleep(0.05)
        assert rx.busy == set() and rx.completed == 8
    for name in sources:
        assert results[name]["status"] == "completed" and results[name]["verified"], name
        assert image_bytes(images, name) == data[name]
    assert staging_left(images) == []
