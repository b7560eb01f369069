"""Auto-converge's throttle (migrated.throttle) against real processes: it
stops the source for part of the time, and the source always runs again,
also when the sender is killed while it holds the source stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import trio
from daemons import running_receiver, state

from migrated.procmem import ProcessSource
from migrated.sender import SendConfig, Sender
from migrated.throttle import Throttle

pytestmark = pytest.mark.integration

BUSY = "while True: pass"


@pytest.fixture
def busy():
    child = subprocess.Popen([sys.executable, "-c", BUSY])
    yield child
    child.kill()
    child.wait()


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_a_throttled_process_is_held_stopped_part_of_the_time_and_runs_after(busy):
    throttle = Throttle(busy.pid)
    seen = set()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(throttle.run)
        throttle.set(0.6)
        for _ in range(300):
            seen.add(state(busy.pid))
            await trio.sleep(0.002)
        nursery.cancel_scope.cancel()
    assert "T" in seen, "held stopped at times"
    assert throttle.stopped_seconds > 0
    assert state(busy.pid) != "T", "running again once the throttle ends"
    before = cpu_seconds(busy.pid)
    await trio.sleep(0.3)
    assert cpu_seconds(busy.pid) > before, "and it gets the CPU again"


async def test_a_level_of_zero_never_stops_the_process(busy):
    throttle = Throttle(busy.pid)
    seen = set()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(throttle.run)
        for _ in range(100):
            seen.add(state(busy.pid))
            await trio.sleep(0.002)
        nursery.cancel_scope.cancel()
    assert "T" not in seen and throttle.stopped_seconds == 0


# a sender stand-in: throttles the pid at 99% and says so, until it is killed
SENDER = textwrap.dedent(
    """
    import sys, trio
    from migrated.throttle import Throttle

    async def main():
        t = Throttle(int(sys.argv[1]))
        t.set(0.99)
        async with trio.open_nursery() as n:
            n.start_soon(t.run)
            await trio.sleep(0.3)
            print("throttling", flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
)


def test_the_source_runs_again_when_the_sender_is_killed_while_it_is_stopped(busy):
    sender = subprocess.Popen([sys.executable, "-c", SENDER, str(busy.pid)], stdout=subprocess.PIPE, text=True)
    try:
        assert sender.stdout is not None
        for line in sender.stdout:  # its log lines come first
            if line.strip() == "throttling":
                break
        else:
            raise AssertionError("the stand-in sender ended before throttling")
        deadline = time.monotonic() + 2
        while state(busy.pid) != "T" and time.monotonic() < deadline:  # catch it held stopped (99% of the time)
            time.sleep(0.001)
        sender.kill()
        sender.wait()
        deadline = time.monotonic() + 5
        while state(busy.pid) == "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state(busy.pid) != "T", "the watcher let the source run when the sender died"
    finally:
        sender.kill()
        sender.wait()


async def test_auto_converge_throttles_a_fast_writer_and_leaves_it_running(tmp_path, churn_exe):
    """A process that dirties pages as fast as it can: the sender raises the
    throttle after its first pass, and the process runs freely once done."""
    proc = subprocess.Popen([str(churn_exe), "0", "1"], stdout=subprocess.PIPE, text=True)  # noqa: ASYNC220 -- the child, started once
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        async with running_receiver(tmp_path / "images") as rx:
            source = ProcessSource(proc.pid, after="resume", tracking="uffd")
            with trio.fail_after(120):
                stream = await trio.open_tcp_stream("127.0.0.1", rx.port)
                async with stream:
                    config = SendConfig(
                        name="fast",
                        downtime_limit=1e-6,
                        max_iterations=3,
                        stop_at_floor=False,
                        max_bandwidth=20 << 20,
                        auto_converge=True,
                    )
                    sender = Sender(source, config)
                    source.open()
                    try:
                        s = await sender.run(stream)
                    finally:
                        source.close()
        assert s["status"] == "completed"
        assert s["auto_converge"]["throttle"] >= 0.2 and s["auto_converge"]["stopped_ms"] > 0
        assert [p["throttle"] for p in s["passes"]][-1] == 0.0, "the final pass is the freeze, not the throttle"
        assert any(p["throttle"] > 0 for p in s["passes"])
        await trio.sleep(0.2)  # a stop of ours still pending would show by now
        assert state(proc.pid) in ("R", "S"), "running freely afterwards"
    finally:
        proc.kill()
        proc.wait()
