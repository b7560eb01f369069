"""What a peer can make the receiver spend is bounded: connections and
migrations at once, the time to a HELLO, the time a sender may leave an
answer untaken, and the memory of a connection that never says HELLO."""

from __future__ import annotations

import socket
import time

import trio
import trio.testing
from daemons import MemoryListener, error_of, raw_hello, read_to_end, receiver_process, running_receiver

from migrated.protocol import PREAMBLE
from migrated.receiver import Receiver, ReceiverConfig

MiB = 1 << 20


async def _answer(stream: trio.abc.Stream, payload: bytes = b"") -> bytes:
    async with stream:
        if payload:
            await stream.send_all(payload)
        return await read_to_end(stream)


async def test_a_connection_without_hello_is_closed_at_the_handshake_deadline(tmp_path, autojump_clock):
    listener = MemoryListener()
    rx = Receiver(ReceiverConfig(str(tmp_path), handshake_timeout=10))
    async with trio.open_nursery() as nursery:
        await nursery.start(rx.serve, [listener])
        stream = await listener.connect()
        started = trio.current_time()
        answer = await _answer(stream, PREAMBLE)  # the preamble, then nothing
        waited = trio.current_time() - started
        nursery.cancel_scope.cancel()
    err = error_of(answer)
    assert err["code"] == "timeout" and "no HELLO" in err["message"]
    assert 10 <= waited < 13
    assert rx.failed == 1


async def test_connections_beyond_max_connections_are_refused_with_limit(tmp_path):
    async with running_receiver(tmp_path / "images", max_connections=2) as rx:
        held = [await trio.open_tcp_stream("127.0.0.1", rx.port) for _ in range(2)]
        await trio.sleep(0.2)  # both accepted
        with trio.fail_after(10):
            answer = await _answer(await trio.open_tcp_stream("127.0.0.1", rx.port))
        err = error_of(answer)
        assert err["code"] == "limit" and "--max-connections" in err["message"]
        for s in held:
            await s.aclose()
        await trio.sleep(0.2)
        # once they are gone, a new one is served (its bad HELLO answered as such)
        with trio.fail_after(10):
            answer = await _answer(await trio.open_tcp_stream("127.0.0.1", rx.port), raw_hello(name="../x"))
        assert error_of(answer)["code"] == "bad-record"


async def test_migrations_beyond_max_migrations_are_refused_with_limit(tmp_path):
    async with running_receiver(tmp_path / "images", max_migrations=1) as rx:
        first = await trio.open_tcp_stream("127.0.0.1", rx.port)
        await first.send_all(raw_hello(name="one"))  # accepted, then silent
        await trio.sleep(0.3)
        assert rx.busy == {"one"}
        with trio.fail_after(10):
            answer = await _answer(await trio.open_tcp_stream("127.0.0.1", rx.port), raw_hello(name="two"))
        err = error_of(answer)
        assert err["code"] == "limit" and "--max-migrations" in err["message"]
        await first.aclose()


class _DeafStream(trio.abc.Stream):
    """A peer that sends a HELLO and then neither sends nor reads: every
    send to it waits forever."""

    def __init__(self, data: bytes):
        self.data = data
        self.sends = 0

    async def send_all(self, data) -> None:
        self.sends += 1
        await trio.sleep_forever()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.sleep_forever()

    async def receive_some(self, max_bytes=None) -> bytes:
        if self.data:
            out, self.data = self.data[: max_bytes or len(self.data)], self.data[max_bytes or len(self.data) :]
            return out
        await trio.sleep_forever()
        return b""

    async def aclose(self) -> None:
        pass


async def test_a_sender_that_takes_no_answer_fails_at_the_send_deadline(tmp_path, autojump_clock):
    rx = Receiver(ReceiverConfig(str(tmp_path), send_timeout=30))
    stream = _DeafStream(raw_hello(name="deaf"))
    started = trio.current_time()
    await rx.handle(stream, "deaf-peer")
    waited = trio.current_time() - started
    assert rx.failed == 1 and rx.busy == set()
    assert stream.sends == 2  # the WELCOME, then the last gasp ERROR
    assert 30 <= waited < 40  # the deadline, then a bounded last gasp
    assert list(tmp_path.iterdir()) == []  # no staging left


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_two_hundred_idle_connections_cost_the_receiver_under_100_mib(tmp_path):
    """Before, every accepted connection allocated its 20 MiB of receive
    buffers at once (500 idle sockets: 10 GB)."""
    rx = receiver_process(tmp_path, "--max-connections", "300", "--handshake-timeout", "120s")
    socks = []
    try:
        before = _rss(rx.proc.pid)
        for _ in range(200):
            socks.append(socket.create_connection(("127.0.0.1", rx.port)))
        time.sleep(1.5)  # all accepted and waiting for a HELLO
        grown = _rss(rx.proc.pid) - before
        assert grown < 100 * MiB, f"200 idle connections grew the receiver by {grown / MiB:.0f} MiB"
        assert rx.proc.poll() is None
    finally:
        for s in socks:
            s.close()
        rx.stop()


async def test_a_terabyte_block_list_is_refused_before_any_reservation(tmp_path):
    """263 bytes on the wire used to make a receiver reserve what they declared."""
    from daemons import staging_left

    from migrated.records import BlockInfo, frame_mem_size

    images = tmp_path / "images"
    async with running_receiver(images) as rx:
        stream = await trio.open_tcp_stream("127.0.0.1", rx.port)
        with trio.fail_after(10):
            answer = await _answer(stream, raw_hello(name="huge") + frame_mem_size([BlockInfo("ram", 1 << 40, 4096)]))
        await trio.sleep(0.1)
    err = error_of(answer)
    assert err["code"] == "no-space" and "in reserve" in err["message"]
    assert staging_left(images) == []  # nothing reserved, nothing left


async def test_a_sender_that_trickles_below_min_rate_is_failed(tmp_path, monkeypatch):
    """A byte at a time never trips the idle timeout, but held a migration
    slot and its reservation for ever (review); now --min-rate (measured
    over 1 s here instead of 60)."""
    from migrated import receiver
    from migrated.records import BlockInfo, frame_mem_size

    monkeypatch.setattr(receiver, "RATE_WINDOW", 1.0)
    images = tmp_path / "images"
    async with running_receiver(images, min_rate=1024) as rx:
        stream = await trio.open_tcp_stream("127.0.0.1", rx.port)
        await stream.send_all(raw_hello(name="slow") + frame_mem_size([BlockInfo("ram", 1 << 20, 4096)]))
        started = trio.current_time()
        with trio.fail_after(20):
            while not rx.failed:
                await stream.send_all(b"\x00")  # a page record, one byte at a time
                await trio.sleep(0.2)
        waited = trio.current_time() - started
        with trio.fail_after(10):
            answer = await read_to_end(stream)
    assert 1 <= waited <= 5
    err = error_of(answer)
    assert err["code"] == "timeout" and "--min-rate of 1024" in err["message"]
    assert rx.busy == set() and not any(".staging-" in p.name for p in images.iterdir())
