"""The sending side: iterative pre-copy of a source over a trio Stream.

Pass 0 sends every page. Each later pass sends the pages that changed since
they were last sent, XBZRLE-encoded against the LRU cache where that pays.
After every pass the sender finds the pages dirty now, estimates how long
sending them would take at the measured bandwidth, and when that fits in the
downtime limit (or the iteration budget is spent) it freezes the source,
sends the rest, and asks the receiver to verify and commit.

Scanning and encoding run in worker threads (the extension releases the
GIL); a bounded channel (ENCODED_AHEAD batches) keeps the socket writer busy
while the next batch is encoded, into a small ring of reused buffers.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

import structlog
import trio

from migrated import records
from migrated.cache import PageCache
from migrated.errors import (
    MigrationCancelled,
    MigrationError,
    NetworkError,
    RemoteError,
    RemoteProtocolError,
    TlsSetupError,
    error_side,
    first_migration_error,
)
from migrated.pages import image_digest, merge_pages, page_range
from migrated.policy import DowntimeEstimate, PassReport, ThrottlePolicy, TokenBucket, XbzrlePolicy
from migrated.protocol import (
    CAP_VERIFIED,
    CAP_XBZRLE,
    CAPABILITIES,
    NEED_DATA,
    Ack,
    BlockList,
    Committed,
    Complete,
    Connection,
    EndOfPass,
    Failure,
    Hello,
    Role,
    Verified,
    Welcome,
)
from migrated.records import BatchStats, BlockInfo, encode_batch
from migrated.report import Status, private_rss, summary
from migrated.source import Block, Source
from migrated.streams import send_last_gasp, send_some, sends_exactly
from migrated.throttle import Throttle
from migrated.tls import is_loopback
from migrated.tlsstream import TLSStream
from migrated.units import ms

log = structlog.get_logger("migrated.sender")

BATCH_PAGES = 1024  # pages per encode call (4 MiB of 4 KiB pages)
ENCODED_AHEAD = 1  # encoded batches waiting for the socket
SCAN_THREADS = max(1, min(4, len(os.sched_getaffinity(0))))  # threads scanning one block
SCAN_PART_PAGES = 8192  # pages a scanning thread is given at least (32 MiB of 4 KiB pages)
WRITE_SLICE = 256 << 10  # bytes per socket write when rate-limited


@dataclass
class SendConfig:
    name: str
    cache_size: int = 64 << 20
    max_bandwidth: int | None = None  # bytes per second
    downtime_limit: float = 0.3  # seconds
    max_iterations: int = 30
    xbzrle: bool = True
    page_size: int = 4096
    timeout: float = 60.0  # for each answer from the receiver
    commit_timeout: float = 600.0  # for COMMITTED (the receiver fsyncs the image)
    # stop iterating once finding the dirty pages alone takes longer than the
    # downtime limit (tests that force passes with a tiny limit turn it off)
    stop_at_floor: bool = True
    # auto-converge: hold a source that dirties too fast stopped for a
    # growing share of the time (SIGSTOP/SIGCONT), up to max_throttle
    auto_converge: bool = False
    max_throttle: float = 0.99


@dataclass
class _Tracked:
    """The sender's knowledge of one block: its cache key space and the hash
    of every page as last sent."""

    index: int
    info: BlockInfo
    hashes: array


class _Layout:
    """The blocks as last sent in a block list, with what the sender keeps
    per block. ``follow`` says what changed; it sends nothing itself."""

    def __init__(self) -> None:
        self.tracked: dict[str, _Tracked] = {}
        self.order: list[str] = []  # the digest follows the block list's order
        self._next_index = 0

    def _new_index(self) -> int:
        self._next_index += 1
        return self._next_index

    def follow(self, blocks: list[Block]) -> tuple[bool, set[str]]:
        """Track new, resized and removed blocks. Returns whether the block
        list changed, and the ids of blocks to send whole."""
        whole = set()
        order = [b.info.id for b in blocks]
        changed = order != self.order
        self.order = order
        for b in blocks:
            t = self.tracked.get(b.info.id)
            if t is None or t.info.length != b.info.length:
                # sent whole in the next pass (which fills in the hashes); a new
                # cache key space keeps stale cached copies from being delta bases
                self.tracked[b.info.id] = _Tracked(self._new_index(), b.info, array("Q", bytes(8 * b.info.pages)))
                whole.add(b.info.id)
                changed = True
            elif t.info.info != b.info.info:
                t.info = b.info
                changed = True
        for gone in set(self.tracked) - set(order):
            del self.tracked[gone]
            changed = True
        return changed, whole


class _Writer:
    """The sender's half of the stream: writes in slices when rate-limited,
    counts what went, and keeps where a write stands, so that a failure can
    complete the record it cut short before the last-gasp ERROR (a record
    half sent would swallow the ERROR)."""

    def __init__(self, stream: trio.abc.Stream, page_size: int, bucket: TokenBucket | None):
        self.stream = stream
        self.page_size = page_size
        self.bucket = bucket
        self.transferred = 0
        self._exact = sends_exactly(stream)
        self._writing: memoryview | None = None  # the write in progress, whole
        self._page_records = False  # whether it is a batch from encode_batch
        self._unsent: memoryview | None = None  # what is left of it
        self._torn = False  # a write the stream cannot account for was interrupted

    async def write(self, data, *, page_records: bool = False) -> None:
        mv = memoryview(data)
        self._writing, self._page_records = mv, page_records
        step = WRITE_SLICE if self.bucket else len(mv) or 1
        for i in range(0, len(mv), step):
            self._unsent = mv[i:]
            piece = mv[i : i + step]
            if self.bucket:
                await trio.sleep(self.bucket.take(len(piece), trio.current_time()))
            self._torn = not self._exact  # until the slice is written
            while piece:
                try:
                    n = await send_some(self.stream, piece)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    why = exc.__cause__ or exc
                    raise NetworkError(f"connection to the receiver lost while sending: {why}") from None
                piece, self._unsent = piece[n:], self._unsent[n:]
                self.transferred += n
            self._torn = False
        self._unsent = None

    async def last_gasp(self, farewell: bytes) -> None:
        """Send ``farewell`` (an ERROR), after the rest of the record a
        failure cut short. Nothing at all when a stream that cannot say how
        much went was interrupted mid-write: the receiver could not parse it."""
        if self._torn:
            return
        rest = b""
        if self._unsent is not None and self._writing is not None:
            at = len(self._writing) - len(self._unsent)
            end = len(self._writing)
            if self._page_records:  # just the record cut short, not the rest of the batch
                end = records.record_end(self._writing, at, self.page_size)
            rest = bytes(self._writing[at:end])
        await send_last_gasp(self.stream, rest + farewell)


class Sender:
    """Pre-copies one source to one receiver over a trio Stream: the pass
    loop and the wire. What to encode, when to stop iterating and how fast
    to write are asked of the policy objects (``xbzrle``, ``estimate``, the
    token bucket); the block layout is tracked by ``layout``; the summary is
    ``report.summary`` of this object. ``run`` once per Sender."""

    def __init__(self, source: Source, config: SendConfig):
        self.source = source
        self.config = config
        self.cache = PageCache(config.cache_size if config.xbzrle else 0, config.page_size)
        self.conn = Connection(Role.SENDER)
        self.status = Status.SETUP
        self.xbzrle = XbzrlePolicy(negotiated=False)
        self.estimate = DowntimeEstimate(config.page_size, config.max_bandwidth)
        self.throttle_policy = ThrottlePolicy(config.auto_converge, config.max_throttle)
        self.throttle: Throttle | None = None  # made once there is something to throttle
        self.layout = _Layout()
        self.passes: list[PassReport] = []
        self.private_peak = 0  # the largest private (anonymous) memory seen at the end of a pass
        self.scan_seconds: list[float] = []  # finding the pages dirty after each pass (the final one's included)
        self.rearm_seconds: list[float] = []  # rearming spans during each pass (Source.rearm), in all
        self.expected_downtime = 0.0
        self.downtime: float | None = None
        self.converged = False
        self.stop_reason = ""  # why the pre-copy passes ended: converged, iterations, floor
        self.digest: str | None = None
        self.error: dict | None = None
        self.started = trio.current_time()
        self.setup_seconds = 0.0
        self.finished: float | None = None
        self.dirty_rate = 0.0
        self.remaining_pages = 0  # dirty pages not yet sent, as of the last scan
        self.wire: _Writer | None = None  # made by run(), on its stream
        self._acks: dict[int, float] = {}
        self._verified: Verified | None = None
        self.released_at: float | None = None  # when the frozen source was released (None: not frozen yet)
        self.downtime_breakdown: dict[str, float] = {}
        self._ack_arrived = trio.Event()
        self._committed: Committed | None = None
        self.receiver_auth = "none"  # set from the stream (receiver_auth)
        # encode buffers, reused: a fresh 4 MiB allocation per batch would
        # fault in new memory every time (one being encoded, ENCODED_AHEAD
        # waiting, one being sent)
        capacity = records.encode_capacity(BATCH_PAGES, records.MAX_BLOCK_ID_LENGTH, config.page_size)
        self._buffers = [bytearray(capacity) for _ in range(ENCODED_AHEAD + 2)]
        # and the one a source without views reads each batch into
        self._gathered = bytearray(BATCH_PAGES * config.page_size)

    @staticmethod
    def now() -> float:
        return trio.current_time()

    @property
    def transferred(self) -> int:
        """Bytes written to the receiver."""
        return self.wire.transferred if self.wire is not None else 0

    @property
    def totals(self) -> BatchStats:
        return sum((r.stats for r in self.passes), BatchStats())

    @property
    def verified(self) -> bool:
        """The receiver committed the image and confirmed the digest sent,
        and it is known who said so (``receiver_auth``)."""
        return self.confirmed and self.receiver_auth != "none"

    @property
    def confirmed(self) -> bool:
        """The receiver said it committed the image whose digest was sent."""
        return self._committed is not None and self._committed.digest == self.digest

    @property
    def committed_path(self) -> str:
        return self._committed.path if self._committed is not None and self.confirmed else ""

    def fail(self, exc: MigrationError) -> dict:
        """Record the failure for the summary; returns its ``error`` entry."""
        self.status = Status.CANCELLED if isinstance(exc, MigrationCancelled) else Status.FAILED
        self.error = {"side": error_side(exc, "sender", "receiver"), "code": exc.code, "message": str(exc)}
        return self.error

    # -- wire ------------------------------------------------------------

    async def _send(self, data, *, page_records: bool = False) -> None:
        assert self.wire is not None  # run() made it
        await self.wire.write(data, page_records=page_records)

    async def _receive(self, stream: trio.abc.Stream) -> None:
        """Read what the receiver sent into the protocol object."""
        refused = isinstance(stream, TLSStream) and self.status is Status.SETUP
        try:
            data = await stream.receive_some(1 << 16)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if refused:
                raise _refused_certificate(exc.__cause__ or exc) from None
            if isinstance(exc.__cause__, ssl.SSLError):
                raise NetworkError(f"the receiver ended the TLS connection: {exc.__cause__}") from None
            raise NetworkError(f"connection to the receiver lost: {exc.__cause__ or exc}") from None
        if not data:
            raise _refused_certificate("closed") if refused else NetworkError("the receiver closed the connection")
        self.conn.receive_data(data)

    async def _read_peer(self, stream: trio.abc.Stream) -> None:
        """Reads the receiver's answers for the whole migration."""
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                await self._receive(stream)
                continue
            if isinstance(event, Ack):
                self._acks[event.pass_number] = trio.current_time()
                # the flush is out of the downtime where the source is released at VERIFIED
                early = self.source.runs_before_durable and CAP_VERIFIED in self.conn.capabilities
                self.estimate.receiver_flushed(event.flushed_pages, event.hash_ms if early else event.flush_ms)
            elif isinstance(event, Verified):
                self._verified = event
            elif isinstance(event, Committed):
                self._committed = event
            self._ack_arrived.set()
            self._ack_arrived = trio.Event()
            if self._committed is not None:
                return

    async def _until(self, done) -> None:
        """Wait until ``done()`` holds after an answer from the receiver."""
        while not done():
            await self._ack_arrived.wait()

    # -- migration -------------------------------------------------------

    async def run(self, stream: trio.abc.Stream) -> dict:
        """Migrate over ``stream``; returns the summary. Raises MigrationError
        (the receiver is told why, unless it said so itself); on cancellation
        the receiver is told too, and the status is cancelled."""
        structlog.contextvars.bind_contextvars(migration=self.config.name)
        self.receiver_auth = receiver_auth(stream)
        bucket = TokenBucket(self.config.max_bandwidth, trio.current_time()) if self.config.max_bandwidth else None
        self.wire = wire = _Writer(stream, self.config.page_size, bucket)
        try:
            with first_migration_error():
                async with trio.open_nursery() as nursery:
                    await self._handshake(stream)
                    nursery.start_soon(self._read_peer, stream)
                    await self._migrate(stream)
                    nursery.cancel_scope.cancel()
            self.status = Status.COMPLETED
            log.info(
                "finish_migration",
                status=str(self.status),
                converged=self.converged,
                passes=len(self.passes),
                downtime_ms=ms(self.downtime),
                transferred_bytes=self.transferred,
            )
        except MigrationError as exc:
            error = self.fail(exc)
            if not isinstance(exc, RemoteError):
                await wire.last_gasp(self.conn.farewell(Failure(exc.code, str(exc))))
            log.error("fail_migration", status=str(self.status), **error, passes=len(self.passes))
            raise
        except trio.Cancelled:
            self.fail(MigrationCancelled("cancelled; the source was resumed"))
            await wire.last_gasp(self.conn.farewell(Failure("cancelled", "the sender was cancelled")))
            raise
        finally:
            self.finished = trio.current_time()
        return summary(self)

    async def _handshake(self, stream: trio.abc.Stream) -> None:
        caps = CAPABILITIES if self.config.xbzrle else (CAP_VERIFIED,)
        hello = Hello(self.config.name, self.config.page_size, caps, self.source.description)
        await self._send(self.conn.send(hello))
        with answer_within("handshake answer", self.config.timeout):
            while (event := self.conn.next_event()) is NEED_DATA:
                await self._receive(stream)
        assert isinstance(event, Welcome)  # the state table admits nothing else
        self.xbzrle = XbzrlePolicy(negotiated=CAP_XBZRLE in event.capabilities)
        if not self.xbzrle.negotiated:
            self.cache.resize(0)
        self.setup_seconds = trio.current_time() - self.started
        self.status = Status.ACTIVE
        log.info(
            "start_migration",
            source=self.source.description,
            tracking=self.source.tracking,
            xbzrle=self.xbzrle.negotiated,
            xbzrle_offered=self.config.xbzrle,
            cache_size=self.config.cache_size,
            max_bandwidth=self.config.max_bandwidth,
            downtime_limit_ms=round(self.config.downtime_limit * 1000),
        )

    async def _migrate(self, stream: trio.abc.Stream) -> None:
        pid = self.source.throttle_pid
        if self.config.auto_converge and pid is None:
            log.warning("cannot_throttle", reason="the source has no process to slow down (a file needs --pause-pid)")
        with first_migration_error():
            async with trio.open_nursery() as nursery:
                if self.config.auto_converge and pid is not None:
                    self.throttle = Throttle(pid)
                    nursery.start_soon(self.throttle.run)
                pass_no, plan = await self._precopy(stream)
                nursery.cancel_scope.cancel()  # the source runs at full speed again before it is frozen
        await self._final_pass(stream, pass_no, plan)

    async def _precopy(self, stream: trio.abc.Stream):
        """The live passes; returns the final pass's number and what it starts from."""
        cfg = self.config
        plan = await self._plan(stream, first=True)
        pass_no = 0
        while True:
            rearm_added_before = self.source.rearm_added
            report = await self._send_pass(stream, pass_no, plan)
            t_scan = trio.current_time()
            plan = await self._plan(stream, first=False)
            self.estimate.scan_seconds = trio.current_time() - t_scan
            self.scan_seconds.append(self.estimate.scan_seconds)
            dirty = self.remaining_pages = sum(len(p) for _, _, p in plan)
            self.dirty_rate = dirty / max(report.seconds + self.estimate.scan_seconds, 1e-6)
            self.expected_downtime = self.estimate.seconds(dirty, report)
            log.info(
                "send_pass",
                **{"pass": pass_no},
                pages=report.pages,
                wire_bytes=report.wire_bytes,
                zero_pages=report.stats.zero_pages,
                normal_pages=report.stats.normal_pages,
                xbzrle_pages=report.stats.xbzrle_pages,
                xbzrle_bytes=report.stats.xbzrle_bytes,
                cache_miss=report.stats.cache_miss,
                overflow=report.stats.overflow,
                xbzrle=report.xbzrle,
                seconds=round(report.seconds, 4),
                mbps=round(report.wire_bytes / max(report.seconds, 1e-9) / 1e6, 2),
                dirty_pages=dirty,
                dirty_pages_rate=round(self.dirty_rate),
                expected_downtime_ms=ms(self.expected_downtime),
                throttle=round(self.throttle_policy.level, 2),
            )
            pass_no += 1
            # after pass 0 alone the estimate knows only a sequential pass's
            # cost; a dirty pass is measured before the freeze is trusted to it
            # (the final pass's scattered pages went at about half that rate)
            if self.expected_downtime <= cfg.downtime_limit and (dirty == 0 or report.number >= 1):
                self.converged = True
                self.stop_reason = "converged"
                break
            self.stop_reason = "iterations"
            if pass_no >= cfg.max_iterations:
                log.warning("stop_iterating", passes=pass_no, expected_downtime_ms=ms(self.expected_downtime))
                break
            if cfg.stop_at_floor and report.number >= 1 and self.estimate.scan_seconds > cfg.downtime_limit:
                # the final pass repeats this scan with the source frozen: no
                # number of passes can bring the downtime under the limit
                self.stop_reason = "floor"
                log.warning(
                    "stop_iterating",
                    passes=pass_no,
                    reason="finding the dirty pages alone takes longer than the downtime limit",
                    scan_ms=ms(self.estimate.scan_seconds),
                    downtime_limit_ms=ms(cfg.downtime_limit),
                    expected_downtime_ms=ms(self.expected_downtime),
                    hint="track the writer's dirty pages (--dirty-tracking uffd for a process) or raise the limit",
                )
                break
            # pages written before the pass reached them went in it too (rearmed):
            # the next pass will find about as many again
            rearmed = self.source.rearm_added - rearm_added_before
            level = self.throttle_policy.judge(report.pages, dirty + rearmed) if self.throttle is not None else None
            if level is not None and self.throttle is not None:
                self.throttle.set(level)
                log.info("raise_throttle", **{"pass": pass_no}, throttle=round(level, 2), sent=report.pages)
            change = self.xbzrle.judge(report, pass_no)
            if change is not None and change.enabled:
                log.info("enable_xbzrle", **{"pass": pass_no})
            elif change is not None:
                log.info(
                    "disable_xbzrle",
                    passes=change.passes,
                    cache_miss_rate=change.cache_miss_rate,
                    overflow_rate=change.overflow_rate,
                )
        return pass_no, plan

    async def _plan(self, stream: trio.abc.Stream, *, first: bool, extra=None):
        """Refresh the source and list, per block, the pages to send."""
        blocks = await trio.to_thread.run_sync(self.source.refresh)
        changed, whole = self.layout.follow(blocks)
        if changed:
            await self._send(self.conn.send(BlockList(tuple(b.info for b in blocks))))
            if self.passes:
                log.info("change_blocks", blocks=len(blocks), whole=sorted(whole))
        plan = []
        for block in blocks:
            t = self.layout.tracked[block.info.id]
            if first or block.info.id in whole:
                pages = page_range(0, block.info.pages)  # sent whole: nothing to merge
            else:
                pages = await self._changed(block, t.hashes)
                if extra and block.info.id in extra:
                    pages = merge_pages(extra[block.info.id], pages)
            plan.append((t, block, pages))
        return plan

    async def _changed(self, block: Block, hashes) -> array:
        """The block's changed pages, scanned in up to SCAN_THREADS parts at
        once: one core cannot read memory as fast as two (1 GiB: 90 ms on
        one, 50 ms on two), and the last scan is part of the downtime."""
        npages = block.info.pages
        parts = max(1, min(SCAN_THREADS, npages // SCAN_PART_PAGES))
        if parts == 1:
            return await trio.to_thread.run_sync(self.source.changed, block, hashes)
        found: list = [None] * parts
        bounds = [npages * i // parts for i in range(parts + 1)]

        async def part(i: int) -> None:
            found[i] = await trio.to_thread.run_sync(self.source.changed, block, hashes, bounds[i], bounds[i + 1])

        with first_migration_error():
            async with trio.open_nursery() as nursery:
                for i in range(parts):
                    nursery.start_soon(part, i)
        pages = found[0]
        for more in found[1:]:
            pages.extend(more)  # ascending, like one scan's
        return pages

    async def _send_pass(self, stream, pass_no: int, plan, *, final: bool = False) -> PassReport:
        first = pass_no == 0
        xbzrle = self.xbzrle.on(pass_no)
        seed = first and xbzrle and sum(t.info.length for t, _, _ in plan) <= self.cache.capacity
        if first:
            self.xbzrle.start(seeded=seed)
        start = trio.current_time()
        sent_before = self.transferred
        rearmed_before = self.source.rearm_seconds
        stats = BatchStats()
        send_ch, recv_ch = trio.open_memory_channel(ENCODED_AHEAD)

        async def produce():
            nonlocal stats
            turn = 0
            async with send_ch:
                for t, block, pages in plan:
                    for batch, span in _batches(pages, block.info.pages, rearm=not final and self.source.rearms(block)):
                        while batch is not None:
                            # one buffer is being encoded, ENCODED_AHEAD wait
                            # in the channel and one is being sent: the next
                            # in the ring is free
                            into = self._buffers[turn % len(self._buffers)]
                            data, counts, batch = await trio.to_thread.run_sync(
                                _encode,
                                self.source,
                                self._gathered,
                                self.cache,
                                t.index,
                                t.info.id_bytes,
                                block,
                                batch,
                                span,
                                xbzrle,
                                first,
                                seed,
                                t.hashes,
                                into,
                            )
                            span = None  # what did not fit in one batch is encoded next
                            stats += counts
                            if data is not None:  # else ``into`` is still free
                                turn += 1
                                await send_ch.send(data)

        with first_migration_error():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                async with recv_ch:
                    async for data in recv_ch:
                        await self._send(data, page_records=True)
        await self._send(self.conn.send(EndOfPass(pass_no)))
        wire_bytes = self.transferred - sent_before
        if final:
            seconds = trio.current_time() - start
        else:
            with answer_within(f"acknowledgement of pass {pass_no}", self.config.timeout):
                await self._until(lambda: pass_no in self._acks)
            seconds = self._acks[pass_no] - start
            self.estimate.measured_pass(wire_bytes, seconds)
        report = PassReport(pass_no, wire_bytes, seconds, xbzrle, stats, 0.0 if final else self.throttle_policy.level)
        self.rearm_seconds.append(self.source.rearm_seconds - rearmed_before)
        self.passes.append(report)
        self.private_peak = max(self.private_peak, private_rss())
        return report

    async def _final_pass(self, stream, pass_no: int, pending) -> None:
        """Freeze the source, send what is left, have the receiver commit.
        A source that may run again before the image is durable is released
        at VERIFIED (where the receiver says it), otherwise at COMMITTED;
        the downtime up to then is split in ``downtime_breakdown``."""
        frozen_at = trio.current_time()
        frozen = False
        parts: dict[str, float] = {}
        try:
            self.source.freeze()  # in this thread: ptrace ties a tracee to one thread
            frozen = True
            scan_start = trio.current_time()
            parts["freeze_ms"] = ms(scan_start - frozen_at)
            extra = {t.info.id: pages for t, _, pages in pending}
            plan = await self._plan(stream, first=False, extra=extra)
            send_start = trio.current_time()
            parts["scan_ms"] = ms(send_start - scan_start)
            self.scan_seconds.append(send_start - scan_start)
            report = await self._send_pass(stream, pass_no, plan, final=True)
            self.digest = image_digest((t.info.id, t.info.length, t.hashes) for t, _, _ in plan)
            await self._send(self.conn.send(Complete(self.digest, self.source.info())))
            commit_start = trio.current_time()
            parts["send_ms"] = ms(commit_start - send_start)
            log.info(
                "send_final_pass",
                **{"pass": pass_no},
                pages=report.pages,
                wire_bytes=report.wire_bytes,
                xbzrle_pages=report.stats.xbzrle_pages,
                scan_ms=parts["scan_ms"],
                send_ms=parts["send_ms"],
                digest=self.digest,
            )
            early = self.source.runs_before_durable
            at_verified = False
            with answer_within("commit confirmation", self.config.commit_timeout):
                await self._until(lambda: self._committed is not None or (early and self._verified is not None))
                at_verified = self._committed is None
                if at_verified:  # verified: the source may run while the receiver syncs
                    assert self._verified is not None
                    self._check_digest(self._verified.digest)
                    self.released_at = trio.current_time()
                    self.source.thaw(True)
                    log.info("release_source", at="verified", downtime_ms=ms(self.released_at - frozen_at))
                    await self._until(lambda: self._committed is not None)
            assert self._committed is not None
            self._check_digest(self._committed.digest)
            if self.released_at is None:
                self.released_at = trio.current_time()
                self.source.thaw(True)  # only here: a cancellation after COMMITTED arrived still resumes the source
            parts.update(
                _receiver_parts(self.released_at - commit_start, self._committed.timings, at_verified=at_verified)
            )
        finally:
            if self.released_at is None:  # failed or cancelled: the source runs again
                self.released_at = trio.current_time()
                if frozen:
                    self.source.thaw(False)  # synchronous: a cancellation cannot skip it
            self.downtime = self.released_at - frozen_at
            self.downtime_breakdown = parts

    def _check_digest(self, digest: str) -> None:
        assert self.digest is not None
        if digest != self.digest:
            raise RemoteProtocolError(f"receiver confirmed digest {digest[:16]}…, the sender sent {self.digest[:16]}…")


def _refused_certificate(how) -> TlsSetupError:
    """TLS 1.3: a receiver that refuses this sender's certificate ends the
    connection after the handshake, and its reason does not reach the sender."""
    return TlsSetupError(
        "the receiver ended the TLS connection before answering: it did not accept this sender's certificate "
        f"(none given, signed by another CA, or expired; the receiver's log says which): {how}"
    )


def receiver_auth(stream: trio.abc.Stream) -> str:
    """Who vouches for the receiver's answers: ``tls`` (its certificate
    verified), ``loopback`` (this machine), ``in-process`` (a stream with no
    socket), or ``none`` (a plain TCP peer elsewhere: its word is not
    authenticated)."""
    if isinstance(stream, TLSStream):
        return "tls"
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "in-process"
    try:
        host = sock.getpeername()[0]
    except OSError:
        return "none"
    return "loopback" if is_loopback(host) else "none"


def _receiver_parts(inside: float, timings: dict[str, float] | None, *, at_verified: bool) -> dict[str, float]:
    """The receiver's share of the downtime, ``inside`` seconds from COMPLETE
    sent to the release: its own timings, and the rest (applying the records
    still in flight, and the network) as ``receiver_apply_ms``. Released at
    VERIFIED, the sync and swap came after the downtime: they are summed as
    ``commit_after_release_ms``."""
    timings = timings or {}
    before = ("wait", "digest") if at_verified else ("wait", "digest", "flush_wait", "sync", "swap")
    parts = {f"receiver_{k}_ms": timings[k] for k in before if k in timings}
    parts["receiver_apply_ms"] = ms(max(0.0, inside - sum(parts.values()) / 1000))
    if at_verified:
        parts["commit_after_release_ms"] = ms(sum(timings.get(k, 0.0) for k in ("flush_wait", "sync", "swap")) / 1000)
    return parts


@contextlib.contextmanager
def answer_within(what: str, seconds: float) -> Iterator[None]:
    """A deadline for an answer from the receiver: past it, a NetworkError
    that says what was awaited."""
    with trio.move_on_after(seconds) as scope:
        yield
    if scope.cancelled_caught:
        raise NetworkError(f"no {what} from the receiver within {seconds:g} s")


def _batches(pages: array, npages: int, *, rearm: bool) -> Iterator[tuple[array, tuple[int, int] | None]]:
    """The pass's pages of a block in batches of up to BATCH_PAGES, each with
    the span of the block to rearm just before it is read (``rearm``): the
    spans follow each other from page 0 to the block's end, so a write made
    anywhere in the block before the pass reached it joins this pass (a block
    with nothing listed is still rearmed, as one span)."""
    if not rearm:
        for i in range(0, len(pages), BATCH_PAGES):
            yield pages[i : i + BATCH_PAGES], None
        return
    start = 0
    for i in range(0, len(pages), BATCH_PAGES):
        batch = pages[i : i + BATCH_PAGES]
        end = batch[-1] + 1 if i + BATCH_PAGES < len(pages) else npages
        yield batch, (start, end)
        start = end
    if start < npages:
        yield array("Q"), (start, npages)


def _encode(source, gathered, cache, index, bid, block, pages, span, xbzrle, first, seed, hashes, into):
    """Encode a batch from the block's view, or from ``gathered`` (one buffer:
    one batch is encoded at a time) after the source read the pages into it.
    With ``span``, the source's writes there since the refresh join the batch
    first (``Source.rearm``). Returns the records (None: no page), their
    counts, and the pages that did not fit in this batch (None: none)."""
    if span is not None:
        t0 = time.perf_counter()
        found = source.rearm(block, *span)
        source.rearm_seconds += time.perf_counter() - t0
        if len(found):
            listed = len(pages)
            pages = merge_pages(pages, found)
            source.rearm_added += len(pages) - listed
    rest = None
    if len(pages) > BATCH_PAGES:
        pages, rest = pages[:BATCH_PAGES], pages[BATCH_PAGES:]
    if not len(pages):
        return None, BatchStats(), rest
    view, npages = block.view, -1
    if view is None:
        view, npages = source.gather(block, pages, gathered), block.info.pages
    data, counts = encode_batch(
        cache,
        index,
        bid,
        view,
        pages,
        xbzrle=xbzrle,
        first_pass=first,
        seed_cache=seed,
        hashes=hashes,
        into=into,
        gathered_pages=npages,
    )
    return data, counts, rest
