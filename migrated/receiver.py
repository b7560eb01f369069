"""The receiving daemon: accepts migrations and commits verified images.

trio owns the sockets, timers and task lifetimes here; the protocol and
page application are in ``protocol.Connection`` and the image directory in
``store``. Each connection is one migration, handled by ``Receiver.handle``
on any ``trio.abc.Stream`` (TCP today, TLS later, memory streams in tests).
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from functools import partial

import structlog
import trio

from migrated.errors import (
    Busy,
    DigestMismatch,
    Forbidden,
    IdleTimeout,
    LimitReached,
    MigrationError,
    PeerError,
    PeerGone,
    PeerTimeout,
    TlsSetupError,
    first_migration_error,
)
from migrated.log import MAX_PEER_TEXT, clip
from migrated.protocol import (
    CAP_VERIFIED,
    CAP_XBZRLE,
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
    negotiate,
)
from migrated.records import Applier
from migrated.store import ImageStore, Staging, storage_error
from migrated.streams import receive_into, send_last_gasp
from migrated.tls import Allow, identities
from migrated.tlsstream import TLSStream
from migrated.units import ms

log = structlog.get_logger("migrated.receiver")

RECEIVE_CHUNK = 4 << 20
HANDSHAKE_CHUNK = 16 << 10  # the buffers of a connection until its HELLO is accepted
RATE_WINDOW = 60.0  # seconds over which --min-rate is measured
READ_AHEAD_CHUNKS = 2  # received chunks waiting while one is applied
RING_BUFFERS = READ_AHEAD_CHUNKS + 3  # + the one applied, the one being received, a spare
# apply in a worker thread above this much buffered data: a hand-off to a
# thread costs about 110 us of CPU here, as much as applying 0.5-1 MiB; below
# that the chunk is applied in place (the extension still drops the GIL)
THREAD_THRESHOLD = 1 << 20


@dataclass
class ReceiverConfig:
    directory: str
    xbzrle: bool = True
    idle_timeout: float = 60.0
    shutdown_grace: float = 30.0
    # hold each image being received in memory, written to the directory at the commit
    stage_in_memory: bool = False
    handshake_timeout: float = 10.0  # from accepting a connection to its HELLO accepted
    send_timeout: float = 30.0  # for the sender to take each thing sent to it (an ACK, COMMITTED)
    max_connections: int = 64  # connections open at once; more are refused with ``limit``
    max_migrations: int = 8  # migrations past their HELLO at once; more are refused with ``limit``
    min_rate: int = 1024  # bytes a second a sender sends at least, over each RATE_WINDOW (0: no bound)
    max_image_size: int | None = None  # bytes of one image, at most (None: what the disk has beyond the reserve)
    reserve: float = 0.05  # the share of the directory's filesystem no image may take
    tls: ssl.SSLContext | None = None  # TLS on every connection (tls.server_context)
    tls_allow: tuple[Allow, ...] = ()  # who may migrate which names (empty: every client the CA signed)


class Receiver:
    """The receiving daemon: serves listeners, runs each connection as one
    migration (``handle``, on any trio Stream) into the image store, and shuts
    down in two phases (stop accepting, then a grace for running
    migrations). A bad peer fails only its own migration."""

    def __init__(self, config: ReceiverConfig):
        self.config = config
        self.store = ImageStore(config.directory, config.max_image_size, config.reserve)
        self.busy: set[str] = set()
        self.connections = 0  # open now
        self.completed = 0
        self.failed = 0
        self.stopping = False
        self._accepting: trio.CancelScope | None = None
        self._migrations: trio.Nursery | None = None

    async def serve(self, listeners, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve migrations on ``listeners`` until ``shutdown()``, holding the
        image directory's lock (StoreError if another receiver holds it)."""
        self.store.lock()
        try:
            await self._serve(listeners, task_status)
        finally:
            self.store.unlock()

    async def _serve(self, listeners, task_status) -> None:
        removed = self.store.clean_stale()
        if removed:
            log.info("remove_stale_staging", entries=removed)
        async with trio.open_nursery() as migrations:
            self._migrations = migrations
            with trio.CancelScope() as accepting:
                self._accepting = accepting
                async with trio.open_nursery() as accept:
                    await accept.start(
                        partial(trio.serve_listeners, self._on_connection, listeners, handler_nursery=migrations)
                    )
                    log.info(
                        "listen",
                        addresses=[_name(lst, "getsockname") for lst in listeners],
                        directory=str(self.store.root),
                        xbzrle=self.config.xbzrle,
                    )
                    task_status.started()
            log.info("stop_accepting", running=sorted(self.busy))

    def shutdown(self) -> None:
        """Stop accepting; give running migrations ``shutdown_grace`` seconds."""
        self.stopping = True
        if self._accepting is not None:
            self._accepting.cancel()
        if self._migrations is not None:
            self._migrations.cancel_scope.deadline = trio.current_time() + self.config.shutdown_grace

    def tidy_soon(self, staging: Staging) -> None:
        """Tidy a committed image in the background, once its name is free
        again (see ``Staging.tidy``)."""
        if self._migrations is not None:
            self._migrations.start_soon(self._tidy, staging)

    async def _tidy(self, staging: Staging) -> None:
        try:
            await trio.to_thread.run_sync(staging.tidy)
        except OSError as exc:  # the image is committed: tidying is best effort
            log.warning("tidy_image", error=str(exc))

    async def _on_connection(self, stream: trio.abc.Stream) -> None:
        _keepalive(stream)
        peer = _name(stream, "getpeername")
        if self.config.tls is not None:  # the handshake is the session's first step
            stream = TLSStream(stream, self.config.tls, server_side=True)
        await self.handle(stream, peer)

    async def handle(self, stream: trio.abc.Stream, peer: str) -> None:
        """One migration on ``stream``, from handshake to commit or failure.
        Never raises except Cancelled: a bad peer fails only its migration."""
        structlog.contextvars.bind_contextvars(peer=peer)
        conn = Connection(Role.RECEIVER)
        session = _Session(self, stream, conn)
        self.connections += 1
        try:
            await self._handle(stream, session)
        finally:
            self.connections -= 1  # once its stream is closed
            structlog.contextvars.unbind_contextvars("peer", "migration")

    async def _handle(self, stream: trio.abc.Stream, session: _Session) -> None:
        async with stream:
            try:
                if self.connections > self.config.max_connections:
                    raise LimitReached(
                        f"the receiver has {self.config.max_connections} connections open, its --max-connections"
                    )
                await session.run()
            except trio.Cancelled:
                self.failed += 1
                log.warning("abort_migration", reason="receiver shutting down")
                await session.fail(Failure("shutdown", "the receiver is shutting down"))
                raise
            except (MigrationError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.failed += 1
                if not isinstance(exc, MigrationError):
                    exc = PeerGone(f"connection lost: {exc or type(exc).__name__}")
                log.error("fail_migration", code=exc.code, error=str(exc), **session.progress())
                # a peer that hung up or reported its own failure is not told again
                told = isinstance(exc, (PeerGone, PeerError, PlainClient))
                await session.fail(None if told else Failure(exc.code, str(exc)))
            except Exception as exc:  # a bug: fail this migration, keep serving
                self.failed += 1
                log.exception("fail_migration", code="internal", error=repr(exc))
                await session.fail(Failure("internal", f"receiver internal error: {exc!r}"))
            except BaseExceptionGroup as group:  # several failures at once, some cancellations
                _, errors = group.split(trio.Cancelled)
                if errors is None:
                    raise
                self.failed += 1
                log.error("fail_migration", code="internal", error=repr(errors))
                await session.fail(Failure("internal", f"receiver internal error: {errors!r}"))
            finally:
                session.release()


class _Session:
    """State of one incoming migration (kept out of Receiver so that each
    connection's state has one owner)."""

    def __init__(self, receiver: Receiver, stream: trio.abc.Stream, conn: Connection):
        self.receiver = receiver
        self.config = receiver.config
        self.stream = stream
        self.conn = conn
        self.name: str | None = None
        self.client: list[str] = []  # what a TLS client's certificate names
        self.staging: Staging | None = None
        self.applier: Applier | None = None  # the staging's, kept for its counters
        self.passes = 0
        self.started = trio.current_time()
        # the staging's files change shape or have their pages hashed under
        # ``files``, and are synced under ``syncing`` (taken after ``files``
        # when both are needed): a digest need not wait for a flush
        self.files = trio.Lock()
        self.syncing = trio.Lock()
        self.flushed = (0, 0.0, 0.0)  # the last write-back: pages hashed and flushed, milliseconds, of them hashing
        self.ended_pass = -1  # the last pass whose END_OF_PASS arrived
        self.written_back = -1  # the last pass a write-back covered
        self.writing_back = False
        self.completing = False  # COMPLETE arrived: the sender sends nothing more until COMMITTED

    def progress(self) -> dict:
        applied = {
            k: getattr(self.applier, k, 0) for k in ("zero_pages", "normal_pages", "xbzrle_pages", "xbzrle_bytes")
        }
        return {"received_bytes": self.conn.received_bytes, "passes": self.passes, **applied}

    async def send(self, event) -> None:
        """Send ``event``; a sender that does not take it within
        ``send_timeout`` (its receive window full: it reads nothing) fails
        the migration rather than hold it."""
        data = self.conn.send(event)
        with trio.move_on_after(self.config.send_timeout) as scope:
            await self.stream.send_all(data)
        if scope.cancelled_caught:
            raise PeerTimeout(f"the sender did not take what was sent to it within {self.config.send_timeout:g} s")

    async def read_stream(self, chunks: trio.MemorySendChannel) -> None:
        """Receive from the sender while earlier chunks are being applied;
        the channel's small bound keeps memory bounded (backpressure).

        Data lands in a ring of buffers, so receiving allocates nothing. A
        buffer is reused only once the protocol object has let go of it: it
        holds the latest chunk until the next one arrives, the channel holds
        up to READ_AHEAD_CHUNKS and one more is being received.
        """
        # the channel is not closed on an error: the applying side must see
        # the error (through the nursery), not an end of data
        # small until the HELLO is accepted: an idle or hostile connection
        # costs kilobytes; the ring is made once a migration is under way
        ring = [memoryview(bytearray(HANDSHAKE_CHUNK)) for _ in range(RING_BUFFERS)]
        turn = 0
        window_start, window_bytes = trio.current_time(), 0
        while True:
            if len(ring[0]) < RECEIVE_CHUNK and self.name is not None:
                ring = [memoryview(bytearray(RECEIVE_CHUNK)) for _ in range(RING_BUFFERS)]
            buf = ring[turn % RING_BUFFERS]
            turn += 1
            with trio.move_on_after(self.config.idle_timeout) as idle:
                try:
                    n = await receive_into(self.stream, buf)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise PeerGone(f"connection lost: {exc.__cause__ or exc}") from None
            if idle.cancelled_caught:
                if self.completing:  # the sender waits for COMMITTED: the commit may take long
                    continue
                raise IdleTimeout(f"no data from the sender for {self.config.idle_timeout:g} s")
            window_bytes += n
            now = trio.current_time()
            if now - window_start >= RATE_WINDOW:  # a sender that trickles holds its slot and reservation
                if window_bytes < self.config.min_rate * (now - window_start) and not self.completing:
                    raise PeerTimeout(
                        f"the sender sent {window_bytes} bytes in {now - window_start:.0f} s, less than the "
                        f"receiver's --min-rate of {self.config.min_rate} bytes a second"
                    )
                window_start, window_bytes = now, 0
            await chunks.send(buf[:n])
            if not n:
                return

    async def next_event(self, chunks: trio.MemoryReceiveChannel):
        conn = self.conn
        while True:
            try:
                if conn.buffered >= THREAD_THRESHOLD:
                    event = await trio.to_thread.run_sync(conn.next_event)
                else:
                    event = conn.next_event()
            except OSError as exc:  # writing pages to a block file
                raise storage_error(exc, f"cannot write pages of image {self.name!r}") from None
            if event is not NEED_DATA:
                return event
            data = await chunks.receive()
            if not data:
                raise PeerGone("the sender closed the connection before the image was complete")
            conn.receive_data(data)

    async def run(self) -> None:
        send_chunks, chunks = trio.open_memory_channel(READ_AHEAD_CHUNKS)
        with first_migration_error():
            async with trio.open_nursery() as background:
                with trio.move_on_after(self.config.handshake_timeout) as handshake:
                    await self.tls_handshake()
                    background.start_soon(self.read_stream, send_chunks)
                    hello = await self.next_event(chunks)
                if handshake.cancelled_caught:
                    raise PeerTimeout(f"no HELLO from the sender within {self.config.handshake_timeout:g} s")
                assert isinstance(hello, Hello)  # the state table admits nothing else first
                self.hello(hello)
                caps = negotiate(
                    hello.capabilities, (CAP_VERIFIED, CAP_XBZRLE) if self.config.xbzrle else (CAP_VERIFIED,)
                )
                await self.send(Welcome(caps))
                log.info(
                    "accept_migration",
                    source=clip(hello.source, MAX_PEER_TEXT),
                    client=clip(self.client[0], MAX_PEER_TEXT) if self.client else None,
                    page_size=hello.page_size,
                    capabilities=list(caps),
                )
                await self.receive_passes(background, chunks)
                background.cancel_scope.cancel()

    async def receive_passes(self, background: trio.Nursery, chunks) -> None:
        staging = self.staging
        assert staging is not None  # hello() made it
        while True:
            event = await self.next_event(chunks)
            if isinstance(event, BlockList):
                async with self.files, self.syncing:
                    await trio.to_thread.run_sync(staging.set_blocks, event.blocks)
                    self.conn.set_page_sink(staging.applier)
                log.info("set_blocks", blocks=len(event.blocks), bytes=sum(b.length for b in event.blocks))
            elif isinstance(event, EndOfPass):
                self.passes += 1
                self.ended_pass = event.pass_number
                staging.end_of_fresh_blocks()
                await self.send(Ack(event.pass_number, self.conn.received_bytes, *self.flushed))
                log.info("apply_pass", **{"pass": event.pass_number}, **self.progress())
                if not self.writing_back:
                    self.writing_back = True
                    background.start_soon(self.write_back)
            elif isinstance(event, Complete):
                self.completing = True
                arrived = trio.current_time()
                await self.commit(event.digest, event.source_info, arrived)
                return

    async def write_back(self) -> None:
        """Hash and write to disk the pages applied so far while the next
        pass arrives, again as long as more passes ended meanwhile, so that
        the commit (inside the sender's downtime) has only the final pass's
        pages to hash and sync."""
        try:
            while self.staging is not None and self.written_back < self.ended_pass:
                through = self.ended_pass
                started = trio.current_time()
                async with self.files:
                    if self.staging is None:
                        return
                    pages = await trio.to_thread.run_sync(self.staging.rehash)
                hashed = trio.current_time()
                async with self.syncing:
                    if self.staging is None:
                        return
                    await trio.to_thread.run_sync(self.staging.flush)
                self.flushed = (pages, ms(trio.current_time() - started), ms(hashed - started))
                self.written_back = through
                log.debug("write_back", through_pass=through, pages=pages, flush_ms=self.flushed[1])
        finally:
            self.writing_back = False

    async def tls_handshake(self) -> None:
        """On a TLS connection, the handshake (the client's certificate
        verified against the CA): before a byte of the protocol is read."""
        if not isinstance(self.stream, TLSStream):
            return
        raw = self.stream.transport_stream
        sock = getattr(raw, "socket", None)
        if sock is not None:  # a sender speaking in the clear is told so in the clear
            try:
                first = await sock.recv(1, socket.MSG_PEEK)
            except OSError as exc:
                raise PeerGone(f"connection lost: {exc.strerror or exc}") from None
            if first and first[0] != TLS_HANDSHAKE:
                why = "this receiver requires TLS: give the sender --tls-ca, --tls-cert and --tls-key"
                await send_last_gasp(raw, self.conn.farewell(Failure("tls", why)))
                raise PlainClient(f"the sender spoke in the clear; {why}")
        try:
            await self.stream.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TlsSetupError(f"TLS handshake with the sender failed: {exc.__cause__ or exc}") from None
        self.client = identities(self.stream.getpeercert())

    def hello(self, hello: Hello) -> None:
        name = hello.name
        structlog.contextvars.bind_contextvars(migration=name)
        allow = self.config.tls_allow
        if allow and not any(a.admits(self.client, name) for a in allow):
            who = clip(self.client[0], MAX_PEER_TEXT) if self.client else "without a certificate"
            raise Forbidden(f"client {who!r} is not allowed to migrate image {name!r} (--tls-allow)")
        if name in self.receiver.busy:
            raise Busy(f"a migration to image {name!r} is already in progress on this receiver")
        if len(self.receiver.busy) >= self.config.max_migrations:
            raise LimitReached(
                f"the receiver runs {len(self.receiver.busy)} migrations, its --max-migrations; retry later"
            )
        self.staging = self.receiver.store.begin(
            name, hello.page_size, hello.source, memory=self.config.stage_in_memory
        )
        self.applier = self.staging.applier
        self.name = name
        self.receiver.busy.add(name)

    async def commit(self, digest: str, source_info: dict | None, arrived: float) -> None:
        """Verify and commit; the log line splits the time (part of the
        sender's downtime, up to VERIFIED where negotiated) into waiting for
        a write-back's hashing, the digest, the durable sync and the swap."""
        staging = self.staging
        assert staging is not None  # hello() made it
        async with self.files:  # a write-back's hashing finishes first; its flush may go on
            started = trio.current_time()
            held = await trio.to_thread.run_sync(staging.digest)
            verified = trio.current_time()
            if held != digest:
                raise DigestMismatch(
                    f"image digest mismatch: the sender sent {digest[:16]}…, the receiver holds {held[:16]}…; "
                    "nothing was committed"
                )
            if CAP_VERIFIED in self.conn.capabilities:
                await self.send(Verified(digest))
            # from here on the image is being committed (a thread that cannot be
            # stopped): neither a shutdown's grace running out nor anything
            # else may turn it into a reported failure; COMMITTED goes out
            with trio.CancelScope(shield=True):
                async with self.syncing:
                    synced = trio.current_time()
                    path = await trio.to_thread.run_sync(staging.commit, digest, source_info)
                self.staging = None
                self.receiver.completed += 1
                timings = {
                    "wait": ms(started - arrived),
                    "digest": ms(verified - started),
                    "flush_wait": ms(synced - verified),
                    "sync": ms(staging.sync_seconds),
                    "swap": ms(staging.swap_seconds),
                }
                try:
                    await self.send(Committed(digest, str(path), timings))
                except (PeerTimeout, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    # committed all the same: the sender will say it did not hear so
                    log.warning("send_committed", error=str(exc) or type(exc).__name__)
        log.info(
            "commit_image",
            path=str(path),
            digest=digest,
            seconds=round(trio.current_time() - self.started, 3),
            **{f"{k}_ms": v for k, v in timings.items()},
            **self.progress(),
        )
        self.receiver.tidy_soon(staging)

    async def fail(self, failure: Failure | None) -> None:
        """Tell the sender (best effort) and drop the staging image."""
        try:
            if failure is not None:
                await send_last_gasp(self.stream, self.conn.farewell(failure))
        finally:
            self.release()

    def release(self) -> None:
        if self.staging is not None:
            self.staging.discard()
            self.staging = None
            log.info("remove_staging")
        if self.name is not None:
            self.receiver.busy.discard(self.name)
            self.name = None


TLS_HANDSHAKE = 0x16  # the first byte of a TLS ClientHello


class PlainClient(TlsSetupError):
    """A sender that spoke in the clear to a TLS receiver (told so already)."""


KEEPALIVE_IDLE = 15  # seconds of silence before TCP probes a peer
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 4
USER_TIMEOUT_MS = 60_000  # data sent and not acknowledged this long: the peer is gone


def _keepalive(stream) -> None:
    """TCP keepalive and TCP_USER_TIMEOUT on an accepted socket, so that a
    peer that vanished (a host gone, a cable pulled) is found out rather
    than waited for."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    except (OSError, AttributeError):  # not TCP, or an option this platform lacks
        pass


def _name(sock_owner, which: str) -> str:
    """``host:port`` of a listener's or stream's socket (``which`` is
    getsockname or getpeername); streams without a socket (in memory, in
    tests) are named by their type."""
    sock = getattr(sock_owner, "socket", None)
    if sock is None:
        return type(sock_owner).__name__
    try:
        host, port = getattr(sock, which)()[:2]
    except OSError:
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
