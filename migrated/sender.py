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

import os
from array import array
from dataclasses import dataclass, field

import structlog
import trio

from migrated import records
from migrated.pages import image_digest, merge_pages, page_range
from migrated.cache import PageCache
from migrated.errors import (
    MigrationCancelled,
    MigrationError,
    NetworkError,
    RemoteError,
    RemoteProtocolError,
    error_side,
    first_migration_error,
)
from migrated.protocol import (
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
    Welcome,
)
from migrated.records import BatchStats, encode_batch
from migrated.source import Block, Source

log = structlog.get_logger("migrated.sender")

BATCH_PAGES = 1024  # pages per encode call (4 MiB of 4 KiB pages)
ENCODED_AHEAD = 1  # encoded batches waiting for the socket
SCAN_THREADS = max(1, min(4, len(os.sched_getaffinity(0))))  # threads scanning one block
SCAN_PART_PAGES = 8192  # pages a scanning thread is given at least (32 MiB of 4 KiB pages)
WRITE_SLICE = 256 << 10  # bytes per socket write when rate-limited
MIN_MEASURE_BYTES = 1 << 20  # a pass smaller than this does not update the bandwidth
MIN_FLUSH_PAGES = 256  # a receiver flush of fewer pages does not update its cost per page
MISS_RATE_OFF = 0.9
OVERFLOW_RATE_OFF = 0.5
MIN_JUDGED_LOOKUPS = 64
MAX_OFF_PASSES = 8


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


class TokenBucket:
    """Caps bytes per second; a burst of up to ``burst`` bytes passes at once."""

    def __init__(self, rate: float, burst: float | None = None):
        self.rate = rate
        self.burst = burst if burst is not None else max(64 << 10, rate / 20)
        self.tokens = self.burst
        self.stamp = trio.current_time()

    async def take(self, n: int) -> None:
        now = trio.current_time()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        if self.tokens < 0:
            await trio.sleep(-self.tokens / self.rate)


@dataclass
class _Tracked:
    """The sender's knowledge of one block: its cache key space and the hash
    of every page as last sent."""

    index: int
    info: records.BlockInfo
    hashes: array


@dataclass
class PassReport:
    number: int
    wire_bytes: int = 0
    seconds: float = 0.0
    xbzrle: bool = True
    stats: BatchStats = field(default_factory=BatchStats)

    @property
    def pages(self) -> int:
        return self.stats.pages


class Sender:
    def __init__(self, source: Source, config: SendConfig):
        self.source = source
        self.config = config
        self.cache = PageCache(config.cache_size if config.xbzrle else 0, config.page_size)
        self.conn = Connection(Role.SENDER, config.page_size)
        self.status = "setup"
        self.xbzrle = False  # negotiated
        self.tracked: dict[str, _Tracked] = {}
        self._order: list[str] = []  # block ids as last sent in a block list
        self._next_index = 0
        self.blocks: list[Block] = []
        self.passes: list[PassReport] = []
        self.totals = BatchStats()
        self.transferred = 0
        self.bandwidth: float | None = None
        self.scan_seconds = 0.0
        self.commit_page_seconds = 0.0  # the receiver's cost to hash and flush a page, from its ACKs
        self.expected_downtime = 0.0
        self.downtime: float | None = None
        self.converged = False
        self.digest: str | None = None
        self.verified = False
        self.committed_path = ""
        self.error: dict | None = None
        self.started = trio.current_time()
        self.setup_seconds = 0.0
        self.finished: float | None = None
        self.dirty_rate = 0.0
        self.remaining_pages = 0  # dirty pages not yet sent, as of the last scan
        self._bucket = TokenBucket(config.max_bandwidth) if config.max_bandwidth else None
        self._acks: dict[int, float] = {}
        self._ack_arrived = trio.Event()
        self._committed: Committed | None = None
        self._xbzrle_off_until = -1
        self._off_backoff = 1
        self._cache_cold = True
        # encode buffers, reused: a fresh 4 MiB allocation per batch would
        # fault in new memory every time (one being encoded, ENCODED_AHEAD
        # waiting, one being sent)
        capacity = records.encode_capacity(BATCH_PAGES, 255, config.page_size)
        self._buffers = [bytearray(capacity) for _ in range(ENCODED_AHEAD + 2)]

    # -- wire ------------------------------------------------------------

    async def _write(self, stream: trio.abc.Stream, data) -> None:
        mv = memoryview(data)
        step = WRITE_SLICE if self._bucket else len(mv) or 1
        for i in range(0, len(mv), step):
            piece = mv[i : i + step]
            if self._bucket:
                await self._bucket.take(len(piece))
            try:
                await stream.send_all(piece)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise NetworkError(f"connection to the receiver lost while sending: {exc.__cause__ or exc}") from None
            self.transferred += len(piece)

    async def _receive(self, stream: trio.abc.Stream) -> None:
        """Read what the receiver sent into the protocol object."""
        try:
            data = await stream.receive_some(1 << 16)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise NetworkError(f"connection to the receiver lost: {exc.__cause__ or exc}") from None
        if not data:
            raise NetworkError("the receiver closed the connection")
        self.conn.receive_data(data)

    async def _read_peer(self, stream: trio.abc.Stream, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Reads the receiver's answers for the whole migration."""
        task_status.started()
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                await self._receive(stream)
                continue
            if isinstance(event, Ack):
                self._acks[event.pass_number] = trio.current_time()
                if event.flushed_pages >= MIN_FLUSH_PAGES:
                    self.commit_page_seconds = event.flush_ms / 1000 / event.flushed_pages
                self._ack_arrived.set()
                self._ack_arrived = trio.Event()
            elif isinstance(event, Committed):
                self._committed = event
                self._ack_arrived.set()
                return

    async def _wait(self, done, what: str, timeout: float) -> None:
        with trio.move_on_after(timeout) as scope:
            while not done():
                await self._ack_arrived.wait()
        if scope.cancelled_caught:
            raise NetworkError(f"no {what} from the receiver within {timeout:g} s")

    # -- migration -------------------------------------------------------

    async def run(self, stream: trio.abc.Stream) -> dict:
        """Migrate over ``stream``; returns the summary. Raises MigrationError."""
        structlog.contextvars.bind_contextvars(migration=self.config.name)
        try:
            with first_migration_error():
                async with trio.open_nursery() as nursery:
                    await self._handshake(stream)
                    nursery.start_soon(self._read_peer, stream)
                    await self._migrate(stream)
                    nursery.cancel_scope.cancel()
            self.status = "completed"
            log.info("finish_migration", status=self.status, converged=self.converged, passes=len(self.passes),
                     downtime_ms=round(self.downtime * 1000, 1), transferred_bytes=self.transferred)
        except MigrationError as exc:
            self.status = "cancelled" if isinstance(exc, MigrationCancelled) else "failed"
            self.error = {"side": error_side(exc, "sender", "receiver"), "code": exc.code, "message": str(exc)}
            if not isinstance(exc, RemoteError):  # tell the receiver why, best effort
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await stream.send_all(self.conn.frame(Failure(exc.code, str(exc))))
                    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
                        pass
            log.error("fail_migration", status=self.status, **self.error, passes=len(self.passes))
            raise
        finally:
            self.finished = trio.current_time()
        return self.summary()

    async def _handshake(self, stream: trio.abc.Stream) -> None:
        caps = CAPABILITIES if self.config.xbzrle else ()
        hello = Hello(self.config.name, self.config.page_size, caps, self.source.description)
        await self._write(stream, self.conn.send(hello))
        with trio.move_on_after(self.config.timeout) as scope:
            while (event := self.conn.next_event()) is NEED_DATA:
                await self._receive(stream)
        if scope.cancelled_caught:
            raise NetworkError(f"no handshake answer from the receiver within {self.config.timeout:g} s")
        assert isinstance(event, Welcome)
        self.xbzrle = CAP_XBZRLE in event.capabilities
        if not self.xbzrle:
            self.cache.resize(0)
        self.setup_seconds = trio.current_time() - self.started
        self.status = "active"
        log.info(
            "start_migration",
            source=self.source.description,
            tracking=self.source.tracking,
            xbzrle=self.xbzrle,
            xbzrle_offered=self.config.xbzrle,
            cache_size=self.config.cache_size,
            max_bandwidth=self.config.max_bandwidth,
            downtime_limit_ms=round(self.config.downtime_limit * 1000),
        )

    async def _migrate(self, stream: trio.abc.Stream) -> None:
        cfg = self.config
        plan = await self._plan(first=True, stream=stream)
        pass_no = 0
        while True:
            report = await self._send_pass(stream, pass_no, plan, first=(pass_no == 0))
            t_scan = trio.current_time()
            plan = await self._plan(first=False, stream=stream)
            self.scan_seconds = trio.current_time() - t_scan
            dirty = self.remaining_pages = sum(len(p) for _, _, p in plan)
            self.dirty_rate = dirty / max(report.seconds + self.scan_seconds, 1e-6)
            self.expected_downtime = self._estimate(dirty, report)
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
                expected_downtime_ms=round(self.expected_downtime * 1000, 1),
            )
            pass_no += 1
            if self.expected_downtime <= cfg.downtime_limit:
                self.converged = True
                break
            if pass_no >= cfg.max_iterations:
                log.warning("stop_iterating", passes=pass_no, expected_downtime_ms=round(self.expected_downtime * 1000))
                break
            self._judge_xbzrle(report, pass_no)
        await self._final_pass(stream, pass_no, plan)

    def _estimate(self, dirty_pages: int, last: PassReport) -> float:
        """Seconds from freezing to COMMITTED: a rescan, sending what is
        dirty, and the receiver hashing and flushing those pages as it
        reported doing between passes (its few fixed fsyncs are not known)."""
        if last.pages and last.number > 0:
            per_page = last.wire_bytes / last.pages
        else:
            per_page = self.config.page_size + 8  # nothing to go by but raw pages
        bandwidth = self.bandwidth or float(self.config.max_bandwidth or 1 << 30)
        return self.scan_seconds + dirty_pages * (per_page / bandwidth + self.commit_page_seconds)

    def _judge_xbzrle(self, report: PassReport, next_pass: int) -> None:
        """Switch XBZRLE off for a while when the last pass says it does not pay."""
        if not self.xbzrle:
            return
        if not report.xbzrle:
            if next_pass >= self._xbzrle_off_until:
                log.info("enable_xbzrle", **{"pass": next_pass})
                self._cache_cold = True
            return
        s = report.stats
        if report.number == 0:
            return  # the first pass does not use the cache
        if self._cache_cold or s.cache_lookups < MIN_JUDGED_LOOKUPS:
            self._cache_cold = False
            return
        miss_rate = s.cache_miss / s.cache_lookups
        hits = s.cache_lookups - s.cache_miss
        overflow_rate = s.overflow / hits if hits else 0.0
        if miss_rate > MISS_RATE_OFF or overflow_rate > OVERFLOW_RATE_OFF:
            self._xbzrle_off_until = next_pass + self._off_backoff
            log.info(
                "disable_xbzrle",
                passes=self._off_backoff,
                cache_miss_rate=round(miss_rate, 3),
                overflow_rate=round(overflow_rate, 3),
            )
            self._off_backoff = min(self._off_backoff * 2, MAX_OFF_PASSES)
        else:
            self._off_backoff = 1

    def _xbzrle_on(self, pass_no: int) -> bool:
        return self.xbzrle and pass_no >= self._xbzrle_off_until

    async def _plan(self, *, first: bool, stream: trio.abc.Stream, extra=None):
        """Refresh the source and list, per block, the pages to send."""
        blocks = await trio.to_thread.run_sync(self.source.refresh)
        changed_layout = await self._follow_layout(blocks, stream)
        plan = []
        for block in blocks:
            t = self.tracked[block.info.id]
            if first or block.info.id in changed_layout:
                pages = page_range(0, block.info.pages)  # sent whole: nothing to merge
            else:
                pages = await self._changed(block, t.hashes)
                if extra and block.info.id in extra:
                    pages = merge_pages(extra[block.info.id], pages)
            plan.append((t, block, pages))
        self.blocks = blocks
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

    async def _follow_layout(self, blocks: list[Block], stream) -> set[str]:
        """Track new, resized and removed blocks; send a new block list if
        anything changed. Returns the ids of blocks to send whole."""
        whole = set()
        order = [b.info.id for b in blocks]
        changed = order != self._order  # the digest follows the block list's order
        self._order = order
        seen = set()
        for b in blocks:
            seen.add(b.info.id)
            t = self.tracked.get(b.info.id)
            if t is None:
                self.tracked[b.info.id] = _Tracked(self._take_index(), b.info, array("Q", bytes(8 * b.info.pages)))
                whole.add(b.info.id)
                changed = True
            elif t.info.length != b.info.length:
                # sent whole in the next pass (which fills in the hashes); a new
                # cache key space keeps stale cached copies from being delta bases
                t.index = self._take_index()
                t.info = b.info
                t.hashes = array("Q", bytes(8 * b.info.pages))
                whole.add(b.info.id)
                changed = True
            elif t.info.info != b.info.info:
                t.info = b.info
                changed = True
        for gone in set(self.tracked) - seen:
            del self.tracked[gone]
            changed = True
        if changed:
            await self._write(stream, self.conn.send(BlockList(tuple(b.info for b in blocks))))
            if self.passes:
                log.info("change_blocks", blocks=len(blocks), whole=sorted(whole))
        return whole if self.passes else set()

    def _take_index(self) -> int:
        self._next_index += 1
        return self._next_index

    async def _send_pass(self, stream, pass_no: int, plan, *, first: bool, final: bool = False) -> PassReport:
        xbzrle = self._xbzrle_on(pass_no)
        report = PassReport(pass_no, xbzrle=xbzrle)
        total_bytes = sum(t.info.length for t, _, _ in plan)
        seed = first and xbzrle and total_bytes <= self.cache.capacity
        if first:
            self._cache_cold = not seed
        start = trio.current_time()
        sent_before = self.transferred
        send_ch, recv_ch = trio.open_memory_channel(ENCODED_AHEAD)

        async def produce():
            turn = 0
            async with send_ch:
                for t, block, pages in plan:
                    bid = t.info.id_bytes
                    for i in range(0, len(pages), BATCH_PAGES):
                        # one buffer is being encoded, ENCODED_AHEAD wait in
                        # the channel and one is being sent: the next in the
                        # ring is free
                        into = self._buffers[turn % len(self._buffers)]
                        turn += 1
                        data, stats = await trio.to_thread.run_sync(
                            _encode,
                            self.cache,
                            t.index,
                            bid,
                            block.view,
                            pages[i : i + BATCH_PAGES],
                            xbzrle,
                            first,
                            seed,
                            t.hashes,
                            into,
                        )
                        report.stats += stats
                        await send_ch.send(data)

        with first_migration_error():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                async with recv_ch:
                    async for data in recv_ch:
                        await self._write(stream, data)
        await self._write(stream, self.conn.send(EndOfPass(pass_no)))
        report.wire_bytes = self.transferred - sent_before
        if not final:
            await self._wait(lambda: pass_no in self._acks, f"acknowledgement of pass {pass_no}", self.config.timeout)
            report.seconds = self._acks[pass_no] - start
            if report.wire_bytes >= MIN_MEASURE_BYTES:
                self.bandwidth = report.wire_bytes / max(report.seconds, 1e-6)
        else:
            report.seconds = trio.current_time() - start
        self.passes.append(report)
        self.totals += report.stats
        return report

    async def _final_pass(self, stream, pass_no: int, pending) -> None:
        """Freeze the source, send what is left, have the receiver commit."""
        frozen_at = trio.current_time()
        frozen = False
        try:
            self.source.freeze()  # in this thread: ptrace ties a tracee to one thread
            frozen = True
            extra = {t.info.id: pages for t, _, pages in pending}
            scan_start = trio.current_time()
            plan = await self._plan(first=False, stream=stream, extra=extra)
            scan_seconds = trio.current_time() - scan_start
            report = await self._send_pass(stream, pass_no, plan, first=False, final=True)
            self.digest = image_digest((t.info.id, t.info.length, t.hashes) for t, _, _ in plan)
            await self._write(stream, self.conn.send(Complete(self.digest, self.source.info())))
            log.info(
                "send_final_pass",
                **{"pass": pass_no},
                pages=report.pages,
                wire_bytes=report.wire_bytes,
                xbzrle_pages=report.stats.xbzrle_pages,
                scan_ms=round(scan_seconds * 1000, 1),
                send_ms=round(report.seconds * 1000, 1),
                digest=self.digest,
            )
            await self._wait(lambda: self._committed is not None, "commit confirmation", self.config.commit_timeout)
            if self._committed.digest != self.digest:
                raise RemoteProtocolError(
                    f"receiver confirmed digest {self._committed.digest[:16]}…, the sender sent {self.digest[:16]}…"
                )
            self.verified = True
            self.committed_path = self._committed.path
            self.downtime = trio.current_time() - frozen_at
        finally:
            if self.downtime is None:
                self.downtime = trio.current_time() - frozen_at
            with trio.CancelScope(shield=True):
                self.source.thaw(self.verified and frozen)

    # -- results ---------------------------------------------------------

    def summary(self) -> dict:
        t = self.totals
        end = self.finished if self.finished is not None else trio.current_time()
        total = sum(b.info.length for b in self.blocks)
        remaining = 0 if self.status == "completed" else self.remaining_pages * self.config.page_size
        seconds = max(end - self.started, 1e-9)
        summary = {
            "status": self.status,
            "converged": self.converged,
            "iterations": len(self.passes),
            "total_time_ms": round((end - self.started) * 1000, 1),
            "setup_time_ms": round(self.setup_seconds * 1000, 1),
            "downtime_ms": round(self.downtime * 1000, 1) if self.downtime is not None else None,
            "expected_downtime_ms": round(self.expected_downtime * 1000, 1),
            "ram": {
                "total_bytes": total,
                "transferred_bytes": self.transferred,
                "remaining_bytes": remaining,
                "zero_pages": t.zero_pages,
                "normal_pages": t.normal_pages,
                "normal_bytes": t.normal_bytes,
                "dirty_pages_rate": round(self.dirty_rate, 1),
                "mbps": round(self.transferred * 8 / seconds / 1e6, 2),
            },
            "xbzrle": {
                "enabled": self.xbzrle,
                "negotiated": self.xbzrle,
                "offered": self.config.xbzrle,
                "cache_size": self.config.cache_size if self.xbzrle else 0,
                "bytes": t.xbzrle_bytes,
                "pages": t.xbzrle_pages,
                "cache_miss": t.cache_miss,
                "cache_miss_rate": round(t.cache_miss / t.cache_lookups, 4) if t.cache_lookups else 0.0,
                "encoding_rate": round(t.xbzrle_pages * self.config.page_size / t.xbzrle_bytes, 2)
                if t.xbzrle_bytes
                else 0.0,
                "overflow": t.overflow,
                "passes_off": sum(1 for r in self.passes if self.xbzrle and not r.xbzrle),
            },
            "passes": [
                {
                    "pass": r.number,
                    "pages": r.pages,
                    "wire_bytes": r.wire_bytes,
                    "seconds": round(r.seconds, 4),
                    "xbzrle": r.xbzrle,
                    "xbzrle_pages": r.stats.xbzrle_pages,
                }
                for r in self.passes
            ],
            "digest": self.digest,
            "verified": self.verified,
            "image": self.committed_path,
            "source": self.source.description,
            "dirty_tracking": self.source.tracking,
            "source_info": self.source.info(),
        }
        if self.error:
            summary["error"] = self.error
        return summary


def _encode(cache, index, bid, view, pages, xbzrle, first, seed, hashes, into):
    return encode_batch(
        cache, index, bid, view, pages, xbzrle=xbzrle, first_pass=first, seed_cache=seed, hashes=hashes, into=into
    )


def format_summary(s: dict) -> str:
    """The human summary printed by ``migrated send``."""
    from migrated.units import format_size

    ram, xb = s["ram"], s["xbzrle"]
    lines = [
        f"status:             {s['status']}" + (" (digest verified by the receiver)" if s["verified"] else ""),
        f"converged:          {'yes' if s['converged'] else 'no'} after {s['iterations']} passes",
        f"total time:         {s['total_time_ms'] / 1000:.2f} s (setup {s['setup_time_ms']:.0f} ms)",
        f"downtime:           {s['downtime_ms'] if s['downtime_ms'] is not None else '-'} ms from freeze to commit "
        f"(estimated at {s['expected_downtime_ms']} ms)",
        f"image:              {format_size(ram['total_bytes'])} from {s['source']}",
        f"transferred:        {format_size(ram['transferred_bytes'])} at {ram['mbps']} Mbit/s",
        f"pages:              {ram['normal_pages']} raw, {ram['zero_pages']} zero, {xb['pages']} xbzrle",
    ]
    if xb["enabled"]:
        lines.append(
            f"xbzrle:             {format_size(xb['bytes'])} of deltas, encoding rate {xb['encoding_rate']}, "
            f"cache miss rate {xb['cache_miss_rate']:.1%}, {xb['overflow']} overflows, off for {xb['passes_off']} passes"
        )
    else:
        why = "disabled on the sender" if not xb["offered"] else "negotiated off by the receiver"
        lines.append(f"xbzrle:             off ({why})")
    if s.get("image"):
        lines.append(f"committed at:       {s['image']}")
    if s.get("error"):
        e = s["error"]
        lines.append(f"error:              {e['side']}: {e['code']}: {e['message']}")
    return "\n".join(lines)

