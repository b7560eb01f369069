"""Exact dirty tracking of a shared-memory file through its writer.

When a file source's image is shared memory (tmpfs, ``/dev/shm``, a memfd,
hugetlbfs: as QEMU's memory-backend-file usually is) and its writer is
known (``--pause-pid``), the writer's shared mappings of the file are
tracked with userfaultfd write-protect inside the writer (``migrated.uffd``),
so each pass reads only the pages it wrote instead of hashing the whole
file. Only writes the writer makes through those mappings are seen: a file
also written with write(2), or by another process, needs the hash scan
(``--dirty-tracking scan``).
"""

from __future__ import annotations

import ctypes
import os
from array import array

import structlog

from migrated import pages
from migrated.procmem import Mapping, read_maps
from migrated.uffd import PAGE, UffdTracker, UffdUnavailable

log = structlog.get_logger("migrated.filetrack")

SHARED_MEMORY = {0x01021994: "tmpfs", 0x958458F6: "hugetlbfs"}  # statfs f_type

_libc = ctypes.CDLL(None, use_errno=True)


def shared_memory_kind(fd: int) -> str | None:
    """``tmpfs`` or ``hugetlbfs`` when the open file ``fd`` is shared memory, else None."""
    buf = (ctypes.c_long * 32)()  # struct statfs; f_type is its first field
    if _libc.fstatfs(fd, buf) != 0:
        return None
    return SHARED_MEMORY.get(buf[0] & 0xFFFFFFFF)


class WriterTracker:
    """The writes process ``pid`` makes to one shared-memory file through
    its shared writable mappings of it, as page numbers of the file."""

    def __init__(self, pid: int, st: os.stat_result, tracker: UffdTracker):
        self.pid = pid
        self.st = st
        self.tracker = tracker
        self.mappings: list[Mapping] = []

    @classmethod
    def start(cls, pid: int, fd: int) -> WriterTracker:
        """Track the writer's mappings of the file open as ``fd``. Raises
        UffdUnavailable, saying why, when that cannot be."""
        kind = shared_memory_kind(fd)
        if kind is None:
            raise UffdUnavailable("the file is not shared memory (tmpfs, /dev/shm, memfd or hugetlbfs)")
        st = os.fstat(fd)
        if not cls._mappings_of(pid, st):
            raise UffdUnavailable(f"process {pid} (--pause-pid) has no shared writable mapping of the file")
        self = cls(pid, st, UffdTracker.attach(pid, shared=True))
        try:
            self.follow(st.st_size)
        except BaseException:
            self.close()
            raise
        return self

    @staticmethod
    def _mappings_of(pid: int, st: os.stat_result) -> list[Mapping]:
        return [
            m
            for m in read_maps(pid)
            if m.inode == st.st_ino
            and m.dev == st.st_dev
            and m.perms[1] == "w"
            and m.perms[3] == "s"
            and m.offset <= m.start  # page numbers of the file counted from an address (always, in practice)
        ]

    def follow(self, size: int) -> bool:
        """Follow the writer's mappings of the file (registering new ones).
        Returns whether they are the ones tracked since the last call and
        cover the file's ``size`` bytes; if not, this pass needs a scan
        (the writes to a new mapping before it was registered are unknown),
        and uncovered pages need one every pass."""
        now = self._mappings_of(self.pid, self.st)
        known = {(m.start, m.length, m.offset) for m in self.mappings}
        same = known == {(m.start, m.length, m.offset) for m in now}
        for m in now:
            if (m.start, m.length, m.offset) not in known:
                self.tracker.register(m.start, m.length)
        gone = {m.start for m in self.mappings} - {m.start for m in now}
        for start in gone:
            self.tracker.forget(start)
        self.mappings = now
        return same and self._covers(size)

    def _covers(self, size: int) -> bool:
        end = 0
        for m in sorted(self.mappings, key=lambda m: m.offset):
            if m.offset > end:
                return False
            end = max(end, m.offset + m.length)
        return end >= size

    def written(self, first: int, end: int) -> array:
        """The file's pages ``first`` to ``end`` the writer wrote since they
        were last asked for, ascending."""
        out = array("Q")
        for m in self.mappings:
            # page numbers of the file: counted from where page 0 would be mapped
            lo = max(m.offset, first * PAGE)
            hi = min(m.offset + m.length, end * PAGE)
            if lo < hi:
                origin = m.start - m.offset
                out = pages.merge_pages(out, self.tracker.written(origin + lo, hi - lo, origin=origin))
        return out

    def close(self) -> None:
        self.tracker.close()
