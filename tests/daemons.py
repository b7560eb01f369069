"""Helpers that start real components for the end-to-end tests: an
in-process receiver on 127.0.0.1 port 0, writer processes, image files."""

from __future__ import annotations

import os
import random
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import trio

from migrated._tools.localrun import ReceiverProcess, WriterProcess
from migrated.errors import PeerError
from migrated.protocol import PREAMBLE, Connection, Hello, Role
from migrated.receiver import Receiver, ReceiverConfig
from migrated.sender import SendConfig, Sender
from migrated.source import FileSource


def receiver_process(tmp: Path, *args: str) -> ReceiverProcess:
    """`migrated receive` as a child process: images in ``tmp/images``, its log
    a new file in ``tmp`` (a test may start several in turn)."""
    return ReceiverProcess(tmp / "images", tmp / f"receiver-{time.monotonic_ns()}.log", *args)


def make_image(path: Path, size: int, *, zero_fraction: float = 0.0, seed: int = 1, marker: bytes = b"") -> bytes:
    """A file of ``size`` bytes: random pages, the first ``zero_fraction`` of
    them zero; ``marker`` is written in the middle of page 7."""
    rng = random.Random(seed)
    zero = int(size * zero_fraction) // 4096 * 4096
    data = bytearray(zero) + rng.randbytes(size - zero)
    if marker:
        data[7 * 4096 + 100 : 7 * 4096 + 100 + len(marker)] = marker
    path.write_bytes(data)
    return bytes(data)


@contextmanager
def writer(path: Path, *args: str):
    """The sparse writer (migrated._tools.workload) as a child process, ready when yielded."""
    w = WriterProcess(path, *args)
    try:
        yield w
    finally:
        w.kill()


def state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


class SnapshotSource(FileSource):
    """A file source that also keeps a copy of the file as it was frozen."""

    frozen: bytes | None = None

    def freeze(self) -> None:
        super().freeze()
        self.frozen = self.path.read_bytes()


@asynccontextmanager
async def running_receiver(directory: Path, **options):
    """An in-process receiver; yields it with ``.port`` set."""
    receiver = Receiver(ReceiverConfig(str(directory), **options))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver.serve, listeners)
        receiver.port = listeners[0].socket.getsockname()[1]
        yield receiver
        nursery.cancel_scope.cancel()


async def failure_seen(receiver: Receiver, timeout: float = 10) -> None:
    """Wait until the receiver has failed a migration (and so dropped its
    staging copy): a sender may return before the receiver has done so."""
    with trio.fail_after(timeout):
        while receiver.failed == 0:
            await trio.sleep(0.01)


async def migrate(port: int, source, **config) -> dict:
    """One migration through an in-process sender; returns its summary."""
    return (await migrate_with(port, source, **config))[1]


async def migrate_with(port: int, source, **config) -> tuple[Sender, dict]:
    """``migrate``, also returning the sender (for its state afterwards)."""
    config.setdefault("name", "img")
    with trio.fail_after(120):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            sender = Sender(source, SendConfig(**config))
            source.open()
            try:
                return sender, await sender.run(stream)
            finally:
                source.close()


def image_bytes(directory: Path, name: str) -> bytes:
    """The committed image of a one-block (file) migration."""
    import json

    manifest = json.loads((directory / name / "manifest.json").read_text())
    (block,) = manifest["blocks"]
    return (directory / name / block["file"]).read_bytes()


def staging_left(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if ".staging-" in n]


class MemoryListener(trio.abc.Listener):
    """A listener whose connections are in-memory stream pairs: a real
    Receiver.serve over it needs no socket, and runs on trio's autojump
    clock (timeouts of minutes pass at once)."""

    def __init__(self) -> None:
        self._send, self._accepted = trio.open_memory_channel(8)

    async def connect(self) -> trio.abc.Stream:
        """The client's end of a new connection."""
        import trio.testing

        client, server = trio.testing.memory_stream_pair()
        await self._send.send(server)
        return client

    async def accept(self) -> trio.abc.Stream:
        return await self._accepted.receive()

    async def aclose(self) -> None:
        await self._accepted.aclose()


async def read_to_end(stream: trio.abc.Stream) -> bytes:
    out = b""
    while data := await stream.receive_some(1 << 16):
        out += data
    return out


def raw_hello(name: str = "h", page_size: int = 4096) -> bytes:
    """A HELLO as a hostile peer writes it: framed without the sender's checks."""
    return PREAMBLE + Connection.frame(Hello(name, page_size))


def error_of(answer: bytes) -> dict:
    """The ERROR a receiver answered with (its code and message)."""
    conn = Connection(Role.SENDER)
    conn.receive_data(answer)
    with pytest.raises(PeerError) as info:
        while True:
            conn.next_event()
    return {"code": info.value.code, "message": str(info.value)}
