"""The XBZRLE work's load generator, as a child process for tests and the
benchmark: a 16 MiB zeroed buffer in which one byte every KiB is
incremented in an endless loop.

``start()`` compiles ``loadgen.c`` (package data beside this module) with
the system C compiler (once, cached by the source's hash) and runs it; without a compiler, or with
``python=True``, it runs an equivalent Python loop instead and says why.
Either way the child prints the addresses of its buffer and of its loop
counter, which are read back through ``/proc/PID/mem``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import structlog

log = structlog.get_logger("migrated.loadgen")

SIZE = 16 << 20
STRIDE = 1024
SOURCE = Path(str(resources.files(__package__) / "loadgen.c"))

PYTHON_LOADGEN = f"""
import ctypes, mmap, sys
buf = mmap.mmap(-1, {SIZE}, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
loops = ctypes.c_uint64(0)
print(f"ready buf={{base:#x}} size={SIZE} counter={{ctypes.addressof(loops):#x}}", flush=True)
while True:
    for i in range(0, {SIZE}, {STRIDE}):
        buf[i] = (buf[i] + 1) & 255
    loops.value += 1
"""


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build() -> tuple[Path | None, str]:
    """The compiled load generator, or None and the reason there is none."""
    cc = compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc or clang) on PATH: using the Python load generator"
    if not SOURCE.exists():
        return None, f"{SOURCE} is not installed with this copy of migrated: using the Python load generator"
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    exe = Path(tempfile.gettempdir()) / f"migrated-loadgen-{digest}"
    if not exe.exists():
        tmp = exe.with_suffix(f".{os.getpid()}")
        r = subprocess.run([cc, "-O2", "-o", str(tmp), str(SOURCE)], capture_output=True, text=True)
        if r.returncode != 0:
            return None, f"{cc} failed to build the load generator ({r.stderr.strip()[:200]}): using the Python one"
        os.replace(tmp, exe)
    return exe, f"C load generator built with {cc} -O2"


class LoadGen:
    def __init__(self, python: bool = False):
        exe, self.reason = (None, "the Python load generator was asked for") if python else build()
        self.kind = "c" if exe else "python"
        cmd = [str(exe)] if exe else [sys.executable, "-c", PYTHON_LOADGEN]
        if not exe:
            log.info("use_python_loadgen", reason=self.reason)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None  # stdout=PIPE
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "ready":
            self.kill()
            raise RuntimeError("the load generator did not start")
        fields = dict(f.split("=") for f in line[1:])
        self.pid = self.proc.pid
        self.buf = int(fields["buf"], 16)
        self.size = int(fields["size"])
        self.counter = int(fields["counter"], 16)

    def read(self, addr: int, n: int) -> bytes:
        with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as fh:
            fh.seek(addr)
            return fh.read(n)

    def buffer(self) -> bytes:
        return self.read(self.buf, self.size)

    def loops(self) -> int:
        return int.from_bytes(self.read(self.counter, 8), sys.byteorder)

    def loops_per_second(self, seconds: float) -> float:
        a, t0 = self.loops(), time.perf_counter()
        time.sleep(seconds)
        return (self.loops() - a) / (time.perf_counter() - t0)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def start(python: bool = False) -> LoadGen:
    return LoadGen(python)


def describe() -> str:
    """Which load generator runs here, and why."""
    return build()[1]
