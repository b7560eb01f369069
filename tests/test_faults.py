"""Fault injection: a relay between a real sender and a real receiver on
loopback drops the connection, stalls it, truncates it or flips a bit, at a
chosen byte of a chosen phase (handshake, pass 0, a dirty pass, the final
pass, between COMPLETE and COMMITTED). After each: both sides end with a
message that names the failure, the previous committed image is
byte-identical (or, once the receiver has the whole image, exactly the new
one), no staging is left, a frozen source runs again, and a retry commits."""

from __future__ import annotations

import random

import pytest
import trio
from daemons import image_bytes, running_receiver, staging_left
from structlog.testing import capture_logs

from migrated.errors import MigrationError
from migrated.records import BlockInfo
from migrated.sender import SendConfig, Sender
from migrated.source import Block, Source

PS = 4096
SIZE = 1 << 20
TIMEOUT = 1.5  # the sender's wait for an answer, the receiver's idle and send timeouts


class Scripted(Source):
    """An image in memory that changes the same way before every pass
    (so every run sends the same stream), and says whether it is frozen."""

    description = "memory:scripted"
    runs_before_durable = False  # released at COMMITTED

    def __init__(self, seed: int):
        self.buf = bytearray(random.Random(seed).randbytes(SIZE))
        self.calls = 0
        self.frozen = False
        self.thawed: bool | None = None

    def refresh(self) -> list[Block]:
        self.calls += 1
        if self.calls > 1 and not self.frozen:  # a few bytes of every fourth page
            for pos in range(self.calls * 8, len(self.buf), 4 * PS):
                self.buf[pos] ^= 0x5A
        return [Block(BlockInfo("ram", len(self.buf), PS), self.buf)]

    def freeze(self) -> None:
        self.frozen = True

    def thaw(self, succeeded: bool) -> None:
        self.frozen = False
        self.thawed = succeeded


class Relay:
    """A TCP relay to the receiver that injects one fault: ``drop`` (close
    both ways), ``stall`` (forward nothing more that way), ``truncate``
    (end that way: the peer reads end of stream) or ``flip`` (one bit), at
    byte ``at`` of the sender's stream (``up``) or the receiver's (``down``)."""

    def __init__(self, target: int, fault: str | None = None, at: int = 0, direction: str = "up"):
        self.target, self.fault, self.at, self.direction = target, fault, at, direction
        self.bytes = {"up": 0, "down": 0}
        self.port = 0

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._handle, listeners, task_status=task_status)

    async def _handle(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.target)
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, server, "up", nursery.cancel_scope)
            nursery.start_soon(self._pump, server, client, "down", nursery.cancel_scope)

    async def _pump(self, src, dst, way: str, both: trio.CancelScope) -> None:
        fault = self.fault if way == self.direction else None
        try:
            while data := await src.receive_some(1 << 16):
                start = self.bytes[way]
                self.bytes[way] += len(data)
                if fault and start <= self.at < start + len(data):
                    k = self.at - start
                    if fault == "flip":
                        data = bytearray(data)
                        data[k] ^= 0x10
                    else:
                        await dst.send_all(data[:k])
                        if fault == "drop":
                            both.cancel()
                        elif fault == "truncate":
                            await dst.send_eof()
                            while await src.receive_some(1 << 16):  # the rest goes nowhere
                                pass
                        else:  # stall
                            await trio.sleep_forever()
                        return
                await dst.send_all(data)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            both.cancel()
            return
        await trio.sleep(0.2)  # the other way's last bytes, then both close
        both.cancel()


def config(name: str) -> SendConfig:
    # never converges (a 0 ms limit): always passes 0 and 1, then the final pass
    return SendConfig(name=name, downtime_limit=0, max_iterations=3, timeout=TIMEOUT, commit_timeout=3 * TIMEOUT)


async def send(port: int, source: Scripted, name: str) -> tuple[Sender, dict | None, BaseException | None]:
    sender = Sender(source, config(name))
    with trio.fail_after(60):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            try:
                return sender, await sender.run(stream), None
            except MigrationError as exc:
                return sender, None, exc


@pytest.fixture(scope="module")
def clean_run():
    """Byte counts of a clean migration through the relay: where the phases are."""

    async def main():
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            async with running_receiver(Path(tmp) / "images") as rx, trio.open_nursery() as nursery:
                relay = Relay(rx.port)
                await nursery.start(relay.serve)
                _, summary, exc = await send(relay.port, Scripted(1), "clean")
                assert exc is None, exc
                await trio.sleep(0.3)
                nursery.cancel_scope.cancel()
        return summary, relay.bytes

    summary, counts = trio.run(main)
    wire = [p["wire_bytes"] for p in summary["passes"]]
    assert len(wire) == 3  # passes 0 and 1, and the final pass
    setup = counts["up"] - sum(wire) - 200  # preamble, HELLO, block list (COMPLETE is < 200 bytes)
    return {
        "handshake": ("up", 20),
        "pass 0": ("up", setup + wire[0] // 2),
        "dirty pass": ("up", setup + wire[0] + wire[1] // 2),
        "final pass": ("up", setup + sum(wire[:2]) + wire[2] // 2),
        "after COMPLETE": ("down", counts["down"] - 60),  # inside COMMITTED
    }


PHASES = ["handshake", "pass 0", "dirty pass", "final pass", "after COMPLETE"]
FAULTS = ["drop", "stall", "truncate", "flip"]


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("fault", FAULTS)
async def test_a_fault_in_any_phase_fails_cleanly_and_loses_nothing(tmp_path, clean_run, fault, phase):
    direction, at = clean_run[phase]
    images = tmp_path / "images"
    previous = Scripted(99)
    limits = {"idle_timeout": TIMEOUT, "send_timeout": TIMEOUT, "handshake_timeout": TIMEOUT}
    async with running_receiver(images, **limits) as rx, trio.open_nursery() as nursery:
        _, summary, exc = await send(rx.port, previous, "vm")
        assert exc is None
        before = image_bytes(images, "vm")
        relay = Relay(rx.port, fault, at, direction)
        await nursery.start(relay.serve)
        source = Scripted(1)
        failed_before = rx.failed
        with capture_logs() as logs:
            sender, summary, exc = await send(relay.port, source, "vm")
            with trio.fail_after(10):  # the receiver's side of it
                while rx.busy or (phase != "after COMPLETE" and rx.failed == failed_before):
                    await trio.sleep(0.02)
        said = [e for e in logs if e["event"] == "fail_migration" and "error" in e]  # the receiver's lines
        after = image_bytes(images, "vm")
        theirs = said[0]["code"] if said else "committed"
        print(f"FAULT {fault} | {phase} | sender {exc.code if exc else 'completed'} | receiver {theirs}")  # with -s
        assert not source.frozen, "the source was left frozen"
        if phase == "after COMPLETE":
            # the receiver had the whole image: it is the new one or the old, never a mix
            assert after in (before, bytes(source.buf))
            if fault == "flip" and exc is None:  # a flipped bit in COMMITTED's JSON can go unnoticed
                assert after == bytes(source.buf)
            else:
                assert exc is not None and str(exc)
        else:
            assert exc is not None, f"{fault} in {phase}: the sender reported success"
            assert str(exc) and exc.code != "internal", exc
            # the receiver, too, failed it and said why
            assert len(said) == 1 and said[0]["code"] != "internal" and said[0]["error"], said
            assert after == before, f"{fault} in {phase}: the previous image changed"
            assert source.thawed in (None, False)  # resumed as failed, where it had been frozen
        assert staging_left(images) == []
        # and a retry straight to the receiver commits
        retry = Scripted(1)
        _, summary, exc = await send(rx.port, retry, "vm")
        assert exc is None and summary["verified"], exc
        assert image_bytes(images, "vm") == bytes(retry.buf)
        nursery.cancel_scope.cancel()
