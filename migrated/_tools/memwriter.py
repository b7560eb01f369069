"""A live process for tests and benchmarks of process migration: SIZE bytes
of anonymous memory, every page different, of which it writes 4 bytes into
1% every 100 ms (a different 1% each time, so every page is written once
every 10 s).

    python -m migrated._tools.memwriter SIZE

It prints ``ready`` on stdout once its memory is filled.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time


def main(argv=None) -> int:
    size = int((argv or sys.argv[1:])[0])
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    seed = os.urandom(1 << 20)
    for off in range(0, size, 1 << 20):
        m[off : off + (1 << 20)] = seed
        m[off : off + 8] = off.to_bytes(8, "little")
    print("ready", flush=True)
    n = 0
    while True:
        for off in range(n % 100 * 4096, size, 100 * 4096):
            m[off + 64 : off + 68] = n.to_bytes(4, "little")
        n += 1
        time.sleep(0.1)


def start(size: int) -> subprocess.Popen:
    """The writer as a child process, once it is ready."""
    child = subprocess.Popen([sys.executable, "-m", __name__, str(size)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None  # stdout=PIPE
    if child.stdout.readline().strip() != "ready":
        child.kill()
        raise RuntimeError(f"the memory writer of {size} bytes did not start")
    return child


if __name__ == "__main__":
    sys.exit(main())
