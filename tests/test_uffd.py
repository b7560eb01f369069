"""Exact dirty tracking of another process (migrated.uffd) against a real
child: a userfaultfd injected into it, write-protect, PAGEMAP_SCAN."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from array import array
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from migrated import uffd
from migrated.procmem import ProcessSource
from migrated.source import FileSource

PAGE = os.sysconf("SC_PAGESIZE")
PM_UFFD_WP = 1 << 57
HUGE = 2 << 20

# The child maps NPAGES anonymous pages (2 MiB-aligned, so that huge pages can
# back them), prints their address, then obeys one command a line:
#   w P...     write a byte of each page P     d P N   MADV_DONTNEED N pages at P
#   h          ask for transparent huge pages   u       register its own userfaultfd on them
#   f P N      map new memory over N pages at P (MAP_FIXED; P -1: over the whole mapping)
CHILD = textwrap.dedent(
    """
    import ctypes, mmap, sys
    NPAGES, PAGE, HUGE = int(sys.argv[1]), mmap.PAGESIZE, 2 << 20
    raw = mmap.mmap(-1, NPAGES * PAGE + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = ctypes.addressof(ctypes.c_char.from_buffer(raw))
    off = -start % HUGE
    base = start + off
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    own = None
    print(f"{base:#x}", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "w":
            for p in map(int, args):
                raw[off + p * PAGE] = (raw[off + p * PAGE] + 1) & 255
        elif cmd == "d":
            p, n = map(int, args)
            raw.madvise(mmap.MADV_DONTNEED, off + p * PAGE, n * PAGE)
        elif cmd == "f":  # a new mapping over N pages at P (MAP_FIXED): the tracked range changes
            p, n = map(int, args)
            p, n = (p * PAGE + base - start, n) if p >= 0 else (0, (len(raw)) // PAGE)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long]
            assert libc.mmap(start + p, n * PAGE, 3, 0x32, -1, 0) == start + p
        elif cmd == "h":
            raw.madvise(mmap.MADV_HUGEPAGE, off, NPAGES * PAGE)
        elif cmd == "u":
            own = libc.syscall(323, 0o2000000 | 1)
            api = (ctypes.c_ulonglong * 3)(0xAA, 0, 0)
            assert libc.ioctl(own, 0xC018AA3F, ctypes.addressof(api)) == 0
            reg = (ctypes.c_ulonglong * 4)(base, NPAGES * PAGE, 1, 0)  # MISSING mode
            assert libc.ioctl(own, 0xC020AA00, ctypes.addressof(reg)) == 0, ctypes.get_errno()
        print("ok", flush=True)
    """
)


class Child:
    def __init__(self, npages: int = 2048):
        self.npages = npages
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(npages)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.pid = self.proc.pid
        self.base = int(self.proc.stdout.readline(), 16)
        self.length = npages * PAGE

    def do(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok", f"the child failed {line!r}"

    def write(self, pages) -> None:
        if pages:
            self.do("w " + " ".join(map(str, pages)))

    def fds(self) -> list[str]:
        return sorted(os.listdir(f"/proc/{self.pid}/fd"))

    def pagemap(self) -> array:
        entries = array("Q")
        with open(f"/proc/{self.pid}/pagemap", "rb", buffering=0) as fh:
            fh.seek(self.base // PAGE * 8)
            entries.frombytes(fh.read(8 * self.npages))
        return entries

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def child():
    c = Child()
    yield c
    c.kill()


def test_this_machine_can_track_by_userfaultfd():
    ok, why = uffd.probe()
    assert ok, f"the probe says no on a kernel that has it (Linux 6.7+, x86-64): {why}"


def test_finds_exactly_the_pages_the_child_wrote_pass_after_pass(child):
    before = child.fds()
    tracker = uffd.UffdTracker.attach(child.pid)
    try:
        assert child.fds() == before, "the descriptor made inside the child was closed there"
        tracker.register(child.base, child.length)
        assert list(tracker.written(child.base, child.length)) == []  # armed by register
        rng = random.Random(5)
        for round_ in range(6):
            pages = sorted(rng.sample(range(child.npages), rng.choice([1, 17, 300, child.npages])))
            child.write(pages)
            assert list(tracker.written(child.base, child.length)) == pages, f"round {round_}"
        assert list(tracker.written(child.base, child.length)) == []  # nothing since
        # a part of the range only
        child.write([3, 10, 11, 2000])
        assert list(tracker.written(child.base + 8 * PAGE, 8 * PAGE)) == [2, 3]  # pages 10, 11
        assert list(tracker.written(child.base, child.length)) == [3, 2000]
    finally:
        tracker.close()


def test_a_page_dropped_with_madv_dontneed_counts_as_written(child):
    tracker = uffd.UffdTracker.attach(child.pid)
    try:
        tracker.register(child.base, child.length)
        child.write(range(0, 64))
        tracker.written(child.base, child.length)
        child.do("d 10 4")  # present -> absent: its content changed (to zeros)
        assert list(tracker.written(child.base, child.length)) == [10, 11, 12, 13]
    finally:
        tracker.close()


def test_writes_to_transparent_huge_pages_are_found_at_page_granularity(child):
    child.do("h")
    child.write(range(0, child.npages, 64))  # touch: huge pages where the kernel can
    tracker = uffd.UffdTracker.attach(child.pid)
    try:
        tracker.register(child.base, child.length)
        child.write([1, 513, 1025])
        assert list(tracker.written(child.base, child.length)) == [1, 513, 1025]
    finally:
        tracker.close()


class _Tracked:
    """A ProcessSource tracking the child with uffd, and the block of the child's pages."""

    def __init__(self, child: Child):
        self.child = child
        self.source = ProcessSource(child.pid, tracking="uffd", after="resume")
        self.source.open()
        self.refresh()

    def refresh(self):
        for block in self.source.refresh():
            start = block.info.info["start"]
            if start <= self.child.base < start + block.info.length:
                self.block, self.at = block, (self.child.base - start) // PAGE
        return self.block

    def dirty(self) -> list[int]:
        """The child's pages the source lists as changed since the last refresh."""
        self.refresh()
        hashes = array("Q", bytes(8 * self.block.info.pages))
        return [
            p - self.at for p in self.source.changed(self.block, hashes) if self.at <= p < self.at + self.child.npages
        ]

    def rearm(self, first: int, end: int) -> list[int]:
        return [p - self.at for p in self.source.rearm(self.block, self.at + first, self.at + end)]

    def page(self, p: int) -> bytes:
        into = bytearray(PAGE)
        return bytes(self.source.gather(self.block, array("Q", [self.at + p]), into))


def test_a_page_written_before_the_pass_reads_it_goes_in_that_pass_only(child):
    """Rearming a span just before reading it (KVM's clear-before-send): the
    writes there so far are read now, only later ones count for the next pass."""
    child.write(range(0, 100))
    t = _Tracked(child)
    try:
        assert t.source.rearms(t.block)
        child.write([5, 60, 600])
        assert t.rearm(0, 100) == [5, 60]  # read in this pass
        child.write([7])  # after its span was read
        assert t.dirty() == [7, 600], "600 was not rearmed yet; 5 and 60 were, before their read"
    finally:
        t.source.close()


def test_a_page_first_written_mid_pass_is_read_not_taken_for_zero(child):
    """A page absent at the refresh is known to be zero and not read; once a
    rearm finds it written, it is read, and a later drop of it is still seen."""
    t = _Tracked(child)
    try:
        assert t.page(9) == bytes(PAGE)  # absent: zero-filled
        child.write([9, 11])
        assert t.rearm(8, 12) == [9, 11]
        assert t.page(9)[0] == 1, "a page the rearm found written is read, not zero-filled"
        child.do("d 11 1")  # present at its read, dropped since
        assert t.dirty() == [11], "the drop of a page that became present mid-pass counts as a change"
    finally:
        t.source.close()


def test_memory_remapped_under_a_tracked_range_is_scanned_not_a_failure(child):
    """The process maps new memory over part of a tracked mapping (MAP_FIXED):
    the next refresh cannot know what was written there, says so, and has
    the block hash-scanned instead of failing the migration."""
    child.write(range(0, 100))
    t = _Tracked(child)
    try:
        before = (t.block.info.info["start"], t.block.info.length)
        child.do("f -1 0")  # the same place and size: only the tracker can tell it changed
        with capture_logs() as logs:
            t.refresh()
        assert (t.block.info.info["start"], t.block.info.length) == before
        assert any(e["event"] == "lose_track" for e in logs), "the tracker noticed"
        assert t.source._dirty.get(t.block.info.id) is None, "this pass scans it"
    finally:
        t.source.close()


SHM_WRITER = textwrap.dedent(
    """
    import mmap, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    m = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED)
    print("ready", flush=True)
    for line in sys.stdin:
        for p in map(int, line.split()[1:]):
            m[p * mmap.PAGESIZE] = (m[p * mmap.PAGESIZE] + 1) & 255
        print("ok", flush=True)
    """
)


def test_a_tracked_shared_memory_file_rearms_through_its_writer(tmp_path):
    path = Path("/dev/shm") / f"migrated-test-rearm-{os.getpid()}"
    path.write_bytes(bytes(256 * PAGE))
    writer = subprocess.Popen(
        [sys.executable, "-c", SHM_WRITER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    source = FileSource(str(path), pause_pid=writer.pid)

    def write(*pages):
        writer.stdin.write("w " + " ".join(map(str, pages)) + "\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "ok"

    try:
        assert writer.stdout.readline().strip() == "ready"
        source.open()
        assert source.tracking == "uffd"
        (block,) = source.refresh()
        assert source.rearms(block)
        write(3, 50, 200)
        assert list(source.rearm(block, 0, 100)) == [3, 50]
        write(4)
        (block,) = source.refresh()
        assert list(source.changed(block, array("Q", bytes(8 * 256)))) == [4, 200]
    finally:
        source.close()
        writer.kill()
        writer.wait()
        path.unlink()


def test_a_source_without_tracking_does_not_rearm(child):
    source = ProcessSource(child.pid, tracking="scan", after="resume")
    source.open()
    try:
        assert not any(source.rearms(b) for b in source.refresh())
    finally:
        source.close()


def test_nothing_is_left_in_the_child_after_close(child):
    before = child.fds()
    tracker = uffd.UffdTracker.attach(child.pid)
    tracker.register(child.base, child.length)
    child.write(range(child.npages))  # every page present
    tracker.written(child.base, child.length)
    assert all(e & PM_UFFD_WP for e in child.pagemap()), "write-protected while tracked"
    tracker.close()
    assert not any(e & PM_UFFD_WP for e in child.pagemap()), "no write protection is left"
    assert child.fds() == before
    child.write([0, 1, 2])  # and it runs on
    assert child.proc.poll() is None


def test_a_range_the_child_tracks_itself_is_refused_with_the_reason(child):
    child.write(range(child.npages))  # present: its own MISSING-mode registration then never blocks it
    child.do("u")  # the child registers its own userfaultfd on the range
    tracker = uffd.UffdTracker.attach(child.pid)
    try:
        with pytest.raises(uffd.UffdUnavailable, match="another userfaultfd already has it"):
            tracker.register(child.base, child.length)
        assert tracker.ranges == {}
    finally:
        tracker.close()
    child.write([5])  # the child's own tracking was left alone
    assert child.proc.poll() is None


def test_no_such_process_is_unavailable_not_a_crash():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(uffd.UffdUnavailable, match="no process"):
        uffd.UffdTracker.attach(proc.pid)


@pytest.mark.parametrize("end", ["cancelled", "killed", "failed"])
def test_the_target_is_left_as_it_was_when_the_sender_stops_mid_migration(receiver, child, end):
    """A sender cancelled (SIGINT), killed (SIGKILL) or failing (the
    receiver gone) in the middle of a tracked migration leaves the target
    with no descriptor of ours, no write protection of ours in effect, and
    writing at full speed."""
    import signal
    import time

    from migrated._tools.localrun import CLI

    child.write(range(child.npages))
    before = child.fds()
    args = ["--source", f"pid:{child.pid}", "--to", receiver.address, "--name", "mid", "--json"]
    args += ["--dirty-tracking", "uffd", "--max-bandwidth", "1M", "--after", "resume"]
    sender = subprocess.Popen([*CLI, "send", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not any(e & PM_UFFD_WP for e in child.pagemap()):  # tracked, write-protected ...
            assert time.monotonic() < deadline, "the sender never attached"
            time.sleep(0.01)
        time.sleep(1.0)  # ... and the migration under way, 8 MiB at 1 MB/s
        assert sender.poll() is None
        {"cancelled": lambda: sender.send_signal(signal.SIGINT), "killed": sender.kill, "failed": receiver.kill}[end]()
        sender.communicate(timeout=60)
    finally:
        if sender.poll() is None:
            sender.kill()
    assert sender.returncode != 0
    deadline = time.monotonic() + 10
    while child.fds() != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert child.fds() == before
    t0 = time.perf_counter()
    child.write(range(child.npages))  # every page again: no fault handler stands in the way
    assert child.proc.poll() is None
    assert time.perf_counter() - t0 < 5
    if end != "killed":  # the sender unregistered everything itself
        assert not any(e & PM_UFFD_WP for e in child.pagemap())


def test_more_regions_than_one_scan_returns_come_back_ascending_and_once(child):
    """Scattered pages make more regions than one PAGEMAP_SCAN call returns;
    this kernel may then end a call's walk short of its last region, and the
    next call returns those pages again: each page is listed once, in order."""
    big = Child(8192)
    try:
        tracker = uffd.UffdTracker.attach(big.pid)
        tracker.register(big.base, big.length)
        big.write(range(0, big.npages, 2))
        present = tracker.present(big.base, big.length)
        truth = [i for i, e in enumerate(big.pagemap()) if e & (1 << 63 | 1 << 62)]  # present or swapped
        assert list(present) == truth
        tracker.written(big.base, big.length)
        big.write(range(1, big.npages, 3))  # 2731 regions of one page: three calls
        assert list(tracker.written(big.base, big.length)) == list(range(1, big.npages, 3))
        tracker.close()
    finally:
        big.kill()
