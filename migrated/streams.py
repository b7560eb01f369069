"""trio stream helpers both daemons use: receiving into a reused buffer, and
the last-gasp ERROR a failing side sends before it closes."""

from __future__ import annotations

import trio

from migrated.tlsstream import TLSStream

LAST_GASP_SECONDS = 2.0


async def receive_into(stream: trio.abc.Stream, view: memoryview) -> int:
    """Receive at most ``len(view)`` bytes into ``view``; 0 at the end of
    the stream. A TCP stream receives in place (no new buffer per call);
    a TLS stream decrypts into it; other streams (in memory) copy from
    ``receive_some``."""
    if isinstance(stream, trio.SocketStream):
        try:
            return await stream.socket.recv_into(view)
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket error: {exc}") from exc
    if isinstance(stream, TLSStream):  # decrypts straight into ``view``, as much as has arrived
        return await stream.receive_into(view)
    data = await stream.receive_some(len(view))
    view[: len(data)] = data
    return len(data)


def sends_exactly(stream: trio.abc.Stream) -> bool:
    """Whether ``send_some`` on ``stream`` always tells what went, even when
    cancelled (a TCP stream: one send(2) at a time)."""
    return isinstance(stream, trio.SocketStream)


async def send_some(stream: trio.abc.Stream, view: memoryview) -> int:
    """Send the front of ``view``; returns how many bytes went. On a TCP
    stream this is one send(2), which a cancellation either precedes (nothing
    sent) or does not interrupt, so the caller always knows where the stream
    is. Other streams (TLS, in memory) send it all with ``send_all``, and a
    cancellation leaves the amount sent unknown."""
    if sends_exactly(stream):
        try:
            return await stream.socket.send(view)  # type: ignore[attr-defined]
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket error: {exc}") from exc
    await stream.send_all(view)
    return len(view)


async def send_last_gasp(stream: trio.abc.Stream, data: bytes) -> None:
    """Tell the peer why this side is failing (``data`` is an ERROR record,
    from ``Connection.farewell``), best effort: shielded from cancellation,
    bounded in time, and silent when the connection is already gone."""
    with trio.CancelScope(shield=True), trio.move_on_after(LAST_GASP_SECONDS):
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
            pass
