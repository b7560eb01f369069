"""A sparse writer for demos, tests and benchmarks: the XBZRLE work's load
generator in Python. It maps a file shared and, sweep after sweep,
increments one byte every STRIDE bytes of a region (a few bytes of many
pages), so a migration always has dirty pages to chase.

    python -m migrated._tools.workload FILE [--offset N] [--length N] [--stride 1024]
                                     [--sweeps N] [--pause SECONDS]

It prints ``ready`` on stdout once mapped, and after ``--sweeps`` sweeps
(0: forever) it stops writing and sleeps until killed, so the final content
is known.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import time


def sweep(buf, offset: int, length: int, stride: int) -> None:
    for pos in range(offset, offset + length, stride):
        buf[pos] = (buf[pos] + 1) & 0xFF


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m migrated._tools.workload", description=__doc__.split("\n\n")[0])
    p.add_argument("file")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--length", type=int, default=0, help="bytes of the region (default: to the end of the file)")
    p.add_argument("--stride", type=int, default=1024)
    p.add_argument("--sweeps", type=int, default=0, help="0: forever")
    p.add_argument("--pause", type=float, default=0.0, help="seconds between sweeps")
    a = p.parse_args(argv)
    fd = os.open(a.file, os.O_RDWR)
    size = os.fstat(fd).st_size
    buf = mmap.mmap(fd, size)
    length = a.length or size - a.offset
    print("ready", flush=True)
    done = 0
    while a.sweeps == 0 or done < a.sweeps:
        sweep(buf, a.offset, length, a.stride)
        done += 1
        if a.pause:
            time.sleep(a.pause)
    print(f"done {done}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
