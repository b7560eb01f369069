"""The receiver's deadlines, on trio's autojump clock over memory streams:
the real Receiver with its default timeouts, no socket, no waiting."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from daemons import MemoryListener, error_of, raw_hello, read_to_end, staging_left

from migrated.receiver import Receiver, ReceiverConfig


async def test_idle_sender_times_out(tmp_path, autojump_clock):
    """A sender that goes quiet after its HELLO is failed after the default
    idle timeout (60 s, on trio's autojump clock over memory streams)."""
    images = tmp_path / "images"
    rx = Receiver(ReceiverConfig(str(images)))
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rx.handle, server, "memory")
        await client.send_all(raw_hello("idle"))
        sent = trio.current_time()
        with trio.fail_after(3600):
            answer = await read_to_end(client)
        waited = trio.current_time() - sent
    assert rx.config.idle_timeout == 60.0 and waited == pytest.approx(60.0, abs=0.5)
    err = error_of(answer)
    assert err["code"] == "idle-timeout" and "60 s" in err["message"]
    assert staging_left(images) == [] and "idle" not in rx.busy


async def test_shutdown_aborts_stalled_migrations_after_the_grace(tmp_path, autojump_clock):
    """On shutdown the receiver stops accepting, then gives a migration that
    makes no progress the default grace (30 s, less than the idle timeout)
    before it aborts it, on trio's autojump clock over memory streams."""
    images = tmp_path / "images"
    rx = Receiver(ReceiverConfig(str(images)))
    listener = MemoryListener()
    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            await nursery.start(rx.serve, [listener])
            stream = await listener.connect()
            await stream.send_all(raw_hello("stall"))
            while "stall" not in rx.busy:
                await trio.sleep(0.01)
            rx.shutdown()
            asked = trio.current_time()
            answer = await read_to_end(stream)
            aborted = trio.current_time() - asked
        # serve() returned: the nursery exited
    assert rx.config.shutdown_grace == 30.0 and aborted == pytest.approx(30.0, abs=0.5)
    assert error_of(answer)["code"] == "shutdown"
    assert staging_left(images) == [] and rx.stopping
