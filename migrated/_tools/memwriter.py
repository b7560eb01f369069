"""A live process for tests and benchmarks of migration at scale: SIZE bytes
of memory, every page different, of which it writes 4 bytes into 1% every
100 ms (a different 1% each time, so every page is written once every 10 s).

    python -m migrated._tools.memwriter SIZE [--file PATH]

The memory is anonymous, or with ``--file`` a file it creates at SIZE and
maps shared (a file image in /dev/shm, as a VM's memory backend is). It
prints ``ready`` on stdout once its memory is filled. On SIGUSR1 it prints
``rounds CPU-SECONDS``: the rounds of writes so far and the CPU time its
thread spent in them (the kernel's share included: a write-protect fault
counts, a stop does not), so a benchmark can tell how much a migration slows
the writes down.
"""

from __future__ import annotations

import argparse
import mmap
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m migrated._tools.memwriter", description=__doc__.split("\n\n")[0])
    p.add_argument("size", type=int)
    p.add_argument("--file", help="create this file at SIZE and map it shared (default: anonymous memory)")
    a = p.parse_args(argv)
    size = a.size
    if a.file:
        fd = os.open(a.file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        os.close(fd)
    else:
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    seed = os.urandom(1 << 20)
    for off in range(0, size, 1 << 20):
        m[off : off + (1 << 20)] = seed
        m[off : off + 8] = off.to_bytes(8, "little")
    n = 0
    busy = 0.0

    def report(signum, frame) -> None:
        print(f"{n} {busy:.6f}", flush=True)

    signal.signal(signal.SIGUSR1, report)
    print("ready", flush=True)
    while True:
        t0 = time.thread_time()
        for off in range(n % 100 * 4096, size, 100 * 4096):
            m[off + 64 : off + 68] = n.to_bytes(4, "little")
        busy += time.thread_time() - t0
        n += 1
        time.sleep(0.1)


@dataclass
class Writer:
    """The writer as a child process."""

    proc: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> tuple[int, float]:
        """(rounds so far, CPU seconds spent in them)."""
        assert self.proc.stdout is not None  # stdout=PIPE
        self.proc.send_signal(signal.SIGUSR1)
        rounds, seconds = self.proc.stdout.readline().split()
        return int(rounds), float(seconds)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def wait(self) -> int:
        return self.proc.wait()


def start(size: int, file: str | None = None) -> Writer:
    """The writer as a child process, once it is ready."""
    extra = ["--file", file] if file else []
    child = subprocess.Popen([sys.executable, "-m", __name__, str(size), *extra], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None  # stdout=PIPE
    if child.stdout.readline().strip() != "ready":
        child.kill()
        child.wait()
        raise RuntimeError(f"the memory writer of {size} bytes did not start")
    return Writer(child)


if __name__ == "__main__":
    sys.exit(main())
