"""A TLS stream for bulk transfer: ``ssl.SSLObject`` over memory BIOs on a
trio socket stream, reading and writing as much as is there at once.

``trio.SSLStream`` moves one TLS record (16 KiB at most) per trip through
its Python machinery: on this machine pass 0 over it ran at 0.18 of plain
TCP. Here a receive takes everything the socket holds (up to 1 MiB) into
the incoming BIO and decrypts record after record straight into the
caller's buffer, and a send encrypts the whole batch in one call; the
per-record cost is one call into OpenSSL.

Sends and receives may run in two tasks at once (the sender's reader and
writer do): TLS 1.3 can make a read produce bytes to write (a key update),
so every write to the socket goes through one lock.
"""

from __future__ import annotations

import ssl

import trio

RECEIVE_SIZE = 1 << 20  # bytes asked of the socket per receive


class TLSStream(trio.abc.HalfCloseableStream):
    """TLS over ``transport`` (a ``trio.SocketStream``, or any stream). Call
    ``do_handshake`` first; errors of the peer or of TLS are
    ``trio.BrokenResourceError`` with the ``ssl.SSLError`` as its cause, as
    trio's own streams raise them."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        context: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
    ):
        self.transport_stream = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._send_lock = trio.Lock()
        self._eof = False
        self._broken = False  # a send was cancelled with its records taken from TLS: the stream is torn
        self._error: trio.BrokenResourceError | None = None  # a TLS error met after data: raised on the next call

    @property
    def socket(self):  # what getpeername and keepalive look for, as on a SocketStream
        return getattr(self.transport_stream, "socket", None)

    def getpeercert(self) -> dict | None:
        return self._tls.getpeercert()

    async def _flush(self) -> None:
        """Send what TLS has written to the outgoing BIO."""
        async with self._send_lock:
            while self._outgoing.pending:
                await self.transport_stream.send_all(self._outgoing.read())

    async def _fill(self) -> bool:
        """Move what the socket has into the incoming BIO; False at its end."""
        data = await self.transport_stream.receive_some(RECEIVE_SIZE)
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    async def do_handshake(self) -> None:
        try:
            while not self._handshake_step():
                await self._flush()
                if not await self._fill():
                    raise trio.BrokenResourceError("the peer closed the connection during the TLS handshake")
        except ssl.SSLError as exc:
            await self._flush_quietly()  # the alert that says why, where it can still go
            raise trio.BrokenResourceError(str(exc)) from exc
        await self._flush()

    def _handshake_step(self) -> bool:
        """One try at the handshake: True once it is done, False when it
        needs more from the peer."""
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def send_all(self, data) -> None:
        """Encrypt ``data`` and send it. A cancellation part way leaves the
        stream broken (as trio.SSLStream's): the records taken from TLS
        cannot be taken back, so what follows could not be decrypted."""
        if self._broken:
            raise trio.BrokenResourceError("a send on this TLS stream was cancelled part way")
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        try:
            await self._flush()
        except BaseException:
            self._broken = True
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def receive_into(self, view: memoryview) -> int:
        """Decrypt into ``view`` what has arrived (at least one byte, waiting
        for it if need be); 0 at the end of the stream."""
        if self._broken:
            raise trio.BrokenResourceError("a send on this TLS stream was cancelled part way")
        if self._error is not None:
            raise self._error
        n = 0
        while True:
            try:
                while n < len(view):
                    got = int(self._tls.read(len(view) - n, view[n:]))  # with a buffer: a count
                    if not got:  # 0, not SSLWantReadError: the peer's close_notify
                        self._eof = True
                        return n
                    n += got
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:  # close_notify, where read raises it
                self._eof = True
                return n
            except ssl.SSLError as exc:
                # OpenSSL's error queue holds the reason once: keep it for the next call
                self._error = trio.BrokenResourceError(str(exc))
                self._error.__cause__ = exc
                if n:
                    return n
                raise self._error from exc
            # what has been decrypted is returned at once: neither a writer
            # holding the socket nor a cancellation may keep or lose it
            if n or self._eof:
                return n
            if self._outgoing.pending and not self._send_lock.locked():
                # what a read made TLS write (a key update); a failure here is the
                # writer's to report: the read goes on to what the peer sent
                await self._flush_quietly()
            if not await self._fill():
                self._eof = True

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        buf = bytearray(max_bytes or RECEIVE_SIZE)
        n = await self.receive_into(memoryview(buf))
        return bytes(buf[:n])

    async def send_eof(self) -> None:
        try:
            self._tls.unwrap()
        except ssl.SSLError:
            pass
        await self._flush_quietly()

    async def aclose(self) -> None:
        """Say close_notify where it can go at once (so the peer reads an end
        of stream, not an error), then close the socket."""
        try:
            if not (self._broken or self._send_lock.locked()):
                try:
                    self._tls.unwrap()
                except ssl.SSLError:  # SSLWantReadError: the peer's close_notify is not awaited
                    pass
                with trio.move_on_after(0.5) as scope:
                    scope.shield = True
                    await self._flush_quietly()
        finally:
            await self.transport_stream.aclose()
