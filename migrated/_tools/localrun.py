"""Run the daemons and the sparse writer as local child processes on
loopback: shared by ``make demo``, the benchmarks and the tests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "migrated"]


class ReceiverProcess:
    """`migrated receive` on 127.0.0.1 port 0, JSON logs to a file it polls
    (for the port it got and for events)."""

    def __init__(self, directory: Path, log: Path, *args: str):
        self.dir = Path(directory)
        self.log = Path(log)
        self.proc = subprocess.Popen(
            [*CLI, "receive", "--listen", "127.0.0.1:0", "--dir", str(self.dir), "--log-format", "json", *args],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "w"),
        )
        self.port = int(self.wait_for("listen")["addresses"][0].rsplit(":", 1)[1])
        self.address = f"127.0.0.1:{self.port}"

    def events(self) -> list[dict]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def wait_for(self, event: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events():
                if e.get("event") == event:
                    return e
            if self.proc.poll() is not None:
                raise RuntimeError(f"receiver exited {self.proc.returncode}: {self.log.read_text()}")
            time.sleep(0.02)
        raise TimeoutError(f"no {event!r} in the receiver log {self.log}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class WriterProcess:
    """The sparse writer (``python -m migrated._tools.workload``), ready when built."""

    def __init__(self, path: Path, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "migrated._tools.workload", str(path), *args], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None  # stdout=PIPE
        if self.proc.stdout.readline().strip() != "ready":
            self.kill()
            raise RuntimeError("the writer did not start")
        self.pid = self.proc.pid

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
