"""Auto-converge: slowing a source that dirties pages faster than they can
be sent, by stopping it for a share of every THROTTLE_PERIOD with SIGSTOP
and SIGCONT, as QEMU's cpu-throttle sleeps a guest's vCPUs for a share of
every timeslice. How much (``ThrottlePolicy``) is plain policy; this module
owns the signals, the timer and the guarantee that the source runs again.

The source runs at full speed again whenever ``Throttle.run`` ends
(finished, cancelled or failed). If the sender itself dies while the source
is stopped, a small watcher process resumes it: it holds the read end of a
pipe whose write end only the sender has, and when that pipe closes without
the sender saying goodbye first, it sends SIGCONT.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import structlog
import trio

log = structlog.get_logger("migrated.throttle")

THROTTLE_PERIOD = 0.05  # seconds: the source is stopped for ``level`` of each

_WATCHER = r"""
import os, signal, sys
pid = int(sys.argv[1])
try:
    said = sys.stdin.buffer.read(1)
except BaseException:
    said = b""
if said != b"q":  # the sender died (or never said goodbye): let the source run
    try:
        os.kill(pid, signal.SIGCONT)
    except OSError:
        pass
"""


class Throttle:
    """Stops process ``pid`` for ``level`` (0 to 1) of every period while
    ``run`` runs; ``set`` changes the level from the next period."""

    def __init__(self, pid: int):
        self.pid = pid
        self.level = 0.0
        self.stopped_seconds = 0.0  # how long the source was held stopped, in all
        self._changed = trio.Event()

    def set(self, level: float) -> None:
        self.level = max(0.0, min(level, 1.0))
        self._changed.set()

    async def run(self) -> None:
        watcher: trio.Process | None = None
        stopped = False
        try:
            while True:
                if self.level <= 0:
                    await self._changed.wait()
                    self._changed = trio.Event()
                    continue
                if watcher is None:
                    watcher = await self._watch()
                held = self.level * THROTTLE_PERIOD
                if not self._signal(signal.SIGSTOP):
                    return
                stopped = True
                await trio.sleep(held)
                self._signal(signal.SIGCONT)
                stopped = False
                self.stopped_seconds += held
                await trio.sleep(THROTTLE_PERIOD - held)
        finally:
            with trio.CancelScope(shield=True):
                if stopped:
                    self._signal(signal.SIGCONT)
                if watcher is not None:
                    await self._dismiss(watcher)

    def _signal(self, sig: int) -> bool:
        """Send ``sig`` to the source; False once it has exited."""
        try:
            os.kill(self.pid, sig)
            return True
        except ProcessLookupError:
            return False

    async def _watch(self) -> trio.Process:
        watcher = await trio.lowlevel.open_process(
            [sys.executable, "-S", "-c", _WATCHER, str(self.pid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C at the sender's terminal is the sender's to handle
        )
        log.info("throttle_source", pid=self.pid, throttle=round(self.level, 2), watcher=watcher.pid)
        return watcher

    @staticmethod
    async def _dismiss(watcher: trio.Process) -> None:
        """Tell the watcher the source is ours no more, and reap it."""
        assert watcher.stdin is not None  # stdin=PIPE
        try:
            await watcher.stdin.send_all(b"q")
            await watcher.stdin.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        with trio.move_on_after(5):
            await watcher.wait()
        if watcher.returncode is None:
            watcher.kill()
