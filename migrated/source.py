"""Where the sender's pages come from.

A source names its blocks and gives a readable buffer for each (a file's
mapping), or reads the pages asked for into the sender's buffer, batch by
batch (``gather``: a process, whose memory the sender never copies whole).
The sender scans and encodes from those buffers. ``refresh()`` runs at the
start of every pass (in a worker thread): it follows size and layout changes
and finds what was written since the last pass where the source can tell. ``freeze()``
stops whatever writes the memory for the final pass; ``thaw()`` always runs
after it, whatever happened.
"""

from __future__ import annotations

import bisect
import mmap
import os
import signal
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from migrated.errors import ProcessGone, SourceError
from migrated.pages import page_count, scan
from migrated.records import BlockInfo

if TYPE_CHECKING:
    from migrated.filetrack import WriterTracker

log = structlog.get_logger("migrated.source")


@dataclass
class Block:
    """One block of a source as of the last refresh."""

    info: BlockInfo
    view: Any  # a readable buffer of info.length bytes (mmap, bytes, memoryview); None: read by gather()


class Source:
    """Base class: a source with no writer to stop and hash-scan dirty tracking."""

    description = ""
    tracking = "scan"
    #: whether the source may run again once the receiver has verified the
    #: image, before it is durable (a stop or kill after the commit must wait)
    runs_before_durable = True
    #: the process that writes the source, which auto-converge may slow down
    throttle_pid: int | None = None
    #: seconds spent in ``rearm`` so far (the sender reports it per pass),
    #: and the pages it added to the passes' lists
    rearm_seconds = 0.0
    rearm_added = 0

    def open(self) -> None:
        pass

    def refresh(self) -> list[Block]:
        raise NotImplementedError

    def changed(self, block: Block, hashes, first: int = 0, end: int = -1):
        """Pages of ``block`` that differ from ``hashes`` (updated in place),
        among pages ``first`` to ``end`` (-1: the last); the sender scans
        parts of a large block in parallel."""
        return scan(block.view, hashes, block.info.page_size, first, end)

    def gather(self, block: Block, pages, into) -> memoryview:
        """For a block without a view: read ``pages`` (ascending) into
        ``into``, page i of the list at byte i * page size; returns the part
        of ``into`` filled. Called from one worker thread at a time."""
        raise NotImplementedError(f"{type(self).__name__} gives every block a view")

    def rearms(self, block: Block) -> bool:
        """Whether ``rearm`` works for ``block`` this pass (its writes are tracked)."""
        return False

    def rearm(self, block: Block, first: int, end: int) -> array:
        """Pages ``first`` to ``end`` of ``block`` written since the last
        refresh (or since the last rearm of them), which the caller is about
        to read, with their tracking started again. A pass calls it for each
        span of the block just before reading that span, so that a page
        written before the pass reached it goes in this pass, once, and only
        writes after its read count for the next (KVM's clear-before-send).
        Only where ``rearms(block)``."""
        raise NotImplementedError(f"{type(self).__name__} does not track writes")

    def freeze(self) -> None:
        pass

    def thaw(self, succeeded: bool) -> None:
        pass

    def info(self) -> dict:
        """Extra facts for the manifest and summary."""
        return {}

    def close(self) -> None:
        pass


class FileSource(Source):
    """A file, mapped shared and read-only, so a writer's changes show up in
    place. ``pause_pid`` is the writer, stopped with SIGSTOP for the final
    pass; where the file is shared memory, its writes through its mappings
    are tracked (``migrated.filetrack``) instead of hashing the file each pass."""

    def __init__(self, path: str, page_size: int = 4096, pause_pid: int | None = None, tracking: str = "auto"):
        self.path = Path(path)
        self.page_size = page_size
        self.description = f"file:{path}"
        self.pauser = SignalPauser(pause_pid) if pause_pid else None
        self.pause_pid = pause_pid
        self.throttle_pid = pause_pid
        self.requested_tracking = tracking
        self.tracking = "scan"
        self.writer: WriterTracker | None = None  # with tracking "uffd"
        self._dirty: array | None = None  # the pages the writer wrote since the last refresh (None: scan)
        self._lost = False  # a rearm lost track of the writes: the next pass scans
        self._fd = -1
        self._map: mmap.mmap | bytes | None = None
        self._size = -1

    def open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SourceError(f"source file {self.path} does not exist") from None
        except PermissionError:
            raise SourceError(f"no permission to read source file {self.path}") from None
        except OSError as exc:
            raise SourceError(f"cannot open source file {self.path}: {exc.strerror}") from None
        if not os.path.isfile(self.path):
            raise SourceError(f"source {self.path} is not a regular file")
        if self.pauser:
            self.pauser.check()
        self.tracking, why = self._choose_tracking()
        log.info("choose_dirty_tracking", path=str(self.path), tracking=self.tracking, reason=why)

    def _choose_tracking(self) -> tuple[str, str]:
        """userfaultfd tracking of the writer's mappings where the file is
        shared memory and its writer is known (``auto``); else the scan. An
        explicit uffd that cannot be had is an error."""
        requested = self.requested_tracking
        if requested == "scan":
            return "scan", "asked for"
        if requested not in ("auto", "uffd"):
            raise SourceError(f"--dirty-tracking {requested} applies to a pid source; use auto, uffd or scan")
        if self.pause_pid is None:
            if requested == "uffd":
                raise SourceError("--dirty-tracking uffd on a file needs its writer: --pause-pid PID")
            return "scan", "no --pause-pid: the writer is not known"
        from migrated.filetrack import WriterTracker
        from migrated.uffd import PAGE, UffdUnavailable

        if self.page_size != PAGE:
            if requested == "uffd":
                raise SourceError(
                    f"--dirty-tracking uffd tracks pages of {PAGE} bytes, not --page-size {self.page_size}"
                )
            return "scan", f"the writer's writes are tracked in pages of {PAGE} bytes, not {self.page_size}"
        try:
            self.writer = WriterTracker.start(self.pause_pid, self._fd)
        except UffdUnavailable as exc:
            if requested == "uffd":
                raise SourceError(f"--dirty-tracking uffd: {exc}; use --dirty-tracking scan (or auto)") from None
            return "scan", str(exc)
        return "uffd", "userfaultfd write-protect tracks the writer's writes through its mappings of the file"

    def refresh(self) -> list[Block]:
        size = os.fstat(self._fd).st_size
        self._dirty = self._tracked_writes(size) if self.writer is not None else None
        if size != self._size:
            if self._size >= 0:
                log.info("resize_source", path=str(self.path), old=self._size, new=size)
            if isinstance(self._map, mmap.mmap):
                self._map.close()
            self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ) if size else b""
            self._size = size
        return [Block(BlockInfo("ram", size, self.page_size), self._map)]

    def _tracked_writes(self, size: int) -> array | None:
        """The pages the writer wrote since the last refresh, or None when
        this pass scans: the file was resized, or the writer's mappings of it
        changed or do not cover it (the writes from now on are the next
        pass's either way). A writer that cannot be tracked any more leaves
        the scan for good."""
        from migrated.uffd import RangeChanged, UffdUnavailable

        assert self.writer is not None
        lost, self._lost = self._lost, False
        try:
            followed = self.writer.follow(size)
            written = self.writer.written(0, page_count(size, self.page_size))
        except RangeChanged as exc:  # remapped meanwhile: this pass scans
            log.info("lose_track", path=str(self.path), reason=str(exc))
            return None
        except UffdUnavailable as exc:
            log.warning("track_by_scan", path=str(self.path), reason=str(exc))
            self.writer.close()
            self.writer, self.tracking = None, "scan"
            return None
        return written if followed and size == self._size and not lost else None

    def changed(self, block: Block, hashes, first: int = 0, end: int = -1):
        """The pages the writer wrote, where it is tracked; the hash scan otherwise."""
        if self._dirty is None:
            return super().changed(block, hashes, first, end)
        end = len(hashes) if end < 0 else end
        return self._dirty[bisect.bisect_left(self._dirty, first) : bisect.bisect_left(self._dirty, end)]

    def rearms(self, block: Block) -> bool:
        # even in a pass that scans: a tracked write taken just before its page is read is in that read
        return self.writer is not None

    def rearm(self, block: Block, first: int, end: int) -> array:
        from migrated.uffd import RangeChanged

        assert self.writer is not None
        try:
            return self.writer.written(first, end)
        except RangeChanged as exc:  # the writer remapped the file meanwhile: the next pass scans
            log.info("lose_track", path=str(self.path), reason=str(exc))
            self._lost = True
            return array("Q")

    def info(self) -> dict:
        return {"dirty_tracking": self.tracking}

    def freeze(self) -> None:
        if self.pauser:
            self.pauser.stop()

    def thaw(self, succeeded: bool) -> None:
        if self.pauser:
            self.pauser.resume()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()  # the writer is left as it was
            self.writer = None
        if isinstance(self._map, mmap.mmap):
            self._map.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def process_state(pid: int, tid: int | None = None) -> str | None:
    """The state letter (R, S, T, t, Z...) of a process, or of one of its
    threads, from /proc; None if it is gone."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    try:
        with open(path, "rb") as fh:
            stat = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    end = stat.rindex(b")")
    return stat[end + 2 : end + 3].decode()


class SignalPauser:
    """Stops a process with SIGSTOP, confirms the stop, resumes it with SIGCONT.
    ``role`` names the process in messages (``--pause-pid``, ``process``)."""

    def __init__(self, pid: int, role: str = "--pause-pid"):
        self.pid = pid
        self.role = role
        self.stopped = False

    def check(self) -> None:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            raise SourceError(f"no process with pid {self.pid} ({self.role})") from None
        except PermissionError:
            raise SourceError(
                f"not allowed to signal pid {self.pid} ({self.role}): it belongs to another user; "
                "run the sender as that user or as root"
            ) from None

    def stop(self, timeout: float = 2.0) -> None:
        self.check()
        os.kill(self.pid, signal.SIGSTOP)
        self.stopped = True
        deadline = time.monotonic() + timeout
        while (state := process_state(self.pid)) not in ("T", "t"):
            if state in (None, "Z", "X"):
                raise ProcessGone(f"process {self.pid} exited while being stopped")
            if time.monotonic() > deadline:
                self.resume()  # undo our stop before giving up
                raise SourceError(f"process {self.pid} did not stop within {timeout:g} s (state {state})")
            time.sleep(0.001)
        log.info("stop_process", pid=self.pid, role=self.role)

    def resume(self) -> None:
        if self.stopped:
            self.stopped = False
            try:
                os.kill(self.pid, signal.SIGCONT)
                log.info("resume_process", pid=self.pid, role=self.role)
            except ProcessLookupError:
                pass
