"""A live process as a migration source, read through /proc.

Blocks are the process's private writable mappings (heap, stack, anonymous
memory, writable private file mappings such as .data/.bss). Nothing keeps a
copy of them: the pages the sender asks for are read batch by batch into a
buffer it reuses (``gather``), with ``process_vm_readv`` in runs of up to
1024 ranges, falling back to ``pread`` on ``/proc/PID/mem`` for ranges it
cannot read. Anonymous pages that ``/proc/PID/pagemap`` reports neither
present nor swapped are zero and are not read. So the sender's memory is its
cache and a few batch buffers, whatever the size of the process.

Dirty tracking: userfaultfd write-protect (``uffd``) or soft-dirty bits,
where the kernel has them (found by probes, never assumed), say which pages
were written since the last pass, and only those are read and sent;
otherwise every present page is read through a buffer and hashed, and the
scan finds what changed. The final pass, with the process frozen, asks the
tracker once more (or scans every present page), so the committed image is
exact either way.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import mmap
import os
import queue
import re
from array import array
from dataclasses import dataclass

import structlog

from migrated import _core, pages
from migrated.errors import ProcessGone, SourceError
from migrated.freeze import Freezer, permission_message
from migrated.records import MAX_BLOCK_ID_LENGTH, BlockInfo
from migrated.source import Block, Source
from migrated.uffd import RangeChanged, UffdTracker, UffdUnavailable

log = structlog.get_logger("migrated.procmem")

PAGE = mmap.PAGESIZE
PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_SOFT_DIRTY = 1 << 55
IOV_MAX = 1024
SCAN_CHUNK_PAGES = 1024  # pages a hash scan reads at once (4 MiB of 4 KiB pages), per scanning thread
SKIPPED_NAMES = {"[vvar]", "[vvar_vclock]", "[vsyscall]", "[vdso]", "[uprobes]"}
_MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ([r-][w-][x-][ps]) ([0-9a-f]+) (\S+) (\d+)\s*(.*)$")


_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = [
    ctypes.c_int,
    ctypes.c_void_p,  # struct iovec *, built by _core.gather_iovecs
    ctypes.c_ulong,
    ctypes.c_void_p,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


def _iov(address: int) -> ctypes.c_void_p:
    return ctypes.c_void_p(address)


@dataclass(frozen=True, slots=True)
class Mapping:
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str
    dev: int = 0  # the device of a file mapping, as st_dev

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def anonymous(self) -> bool:
        return self.inode == 0 and (not self.path or self.path.startswith("["))

    @property
    def block_id(self) -> str:
        if self.path in ("[heap]", "[stack]"):
            return self.path
        # a block id is at most MAX_BLOCK_ID_LENGTH bytes: cut the UTF-8, not the characters
        raw = f"{self.start:x}:{self.path or 'anon'}".encode()[:MAX_BLOCK_ID_LENGTH]
        return raw.decode(errors="ignore")


def block_ids(chosen: list[Mapping]) -> list[str]:
    """The block id of each mapping, unique: the heap or stack split in two
    VMAs (a part registered for tracking does not merge with its growth)
    gives its first part the plain name and the others their address."""
    ids, seen = [], set()
    for m in chosen:
        bid = m.block_id
        if bid in seen:
            bid = f"{m.start:x}:{m.path}"
        seen.add(bid)
        ids.append(bid)
    return ids


def parse_maps(text: str) -> list[Mapping]:
    out = []
    for line in text.splitlines():
        m = _MAPS_LINE.match(line)
        if m:
            start, end, perms, off, dev, inode, path = m.groups()
            major, _, minor = dev.partition(":")
            device = os.makedev(int(major, 16), int(minor or "0", 16))
            out.append(Mapping(int(start, 16), int(end, 16), perms, int(off, 16), int(inode), path.strip(), device))
    return out


def select_mappings(maps: list[Mapping]) -> tuple[list[Mapping], list[dict]]:
    """The mappings to migrate, and the others with the reason each is left out."""
    chosen, left_out = [], []
    for m in maps:
        why = None
        if m.path in SKIPPED_NAMES:
            why = "kernel page"
        elif m.path.startswith("/dev/") and not m.path.startswith(("/dev/zero", "/dev/shm/")):
            why = "device memory"
        elif m.perms[3] == "s":
            why = "shared mapping"
        elif m.perms[1] != "w":
            why = "read-only mapping"
        if why:
            left_out.append({"start": m.start, "length": m.length, "perms": m.perms, "path": m.path, "reason": why})
        else:
            chosen.append(m)
    return chosen, left_out


def read_maps(pid: int) -> list[Mapping]:
    try:
        with open(f"/proc/{pid}/maps") as fh:
            text = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(f"process {pid} exited during the migration") from None
    maps = parse_maps(text)
    if not maps:
        raise ProcessGone(f"process {pid} exited during the migration (no mappings left)")
    return maps


def soft_dirty_supported() -> tuple[bool, str]:
    """Probe the kernel: clear our own soft-dirty bits, write a page of ours,
    and see whether pagemap marks it."""
    m = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m[0] = 1
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("4")
        except OSError as exc:
            return False, f"cannot write /proc/self/clear_refs: {exc.strerror}"
        m[0] = 2
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            (entry,) = array("Q", os.pread(fd, 8, addr // PAGE * 8))
        finally:
            os.close(fd)
        if entry & PM_SOFT_DIRTY:
            return True, "the kernel marks written pages soft-dirty"
        return False, "this kernel has no soft-dirty page tracking (CONFIG_MEM_SOFT_DIRTY is unset)"
    finally:
        m.close()


class ProcessSource(Source):
    """A live process as a source: one block per private writable mapping
    (the rest is left out, each with its reason, in ``info()``). Each pass
    reads the present pages into a private buffer per block with
    process_vm_readv (or /proc/PID/mem), and the sender scans those buffers;
    soft-dirty bits narrow the reads where the kernel has them. The final pass
    reads every present page with the process frozen (``Freezer``), and
    ``after`` says what becomes of it once the image is committed."""

    def __init__(self, pid: int, tracking: str = "auto", after: str = "stop", page_size: int = 4096):
        if page_size != PAGE:
            raise SourceError(f"a process source uses the machine's page size ({PAGE}), not {page_size}")
        if ctypes.sizeof(ctypes.c_void_p) != 8:
            raise SourceError("a process source needs a 64-bit system")
        self.pid = pid
        self.throttle_pid = pid
        self.requested_tracking = tracking
        self.after = after
        self.page_size = page_size
        self.description = f"pid:{pid}"
        self.tracking = "scan"
        self.freezer = Freezer(pid)
        self.frozen = False
        self.freeze_method = ""
        self.left_out: list[dict] = []
        self.unreadable_pages = 0
        self._mem = -1
        self._pagemap = -1
        self.tracker: UffdTracker | None = None  # with tracking "uffd"
        # per block id, as of the last refresh:
        self._maps: dict[str, Mapping] = {}  # its mapping
        self._tracked: dict[
            str, tuple[int, int]
        ] = {}  # (start, length) registered with the tracker; (0, -1): cannot be
        self._present: dict[str, array] = {}  # its pages present or swapped out
        self._zero: dict[str, array] = {}  # pages known to be zero (not read)
        self._dirty: dict[str, array] = {}  # pages written since the last refresh, where the kernel says
        self._rearmed: dict[str, array] = {}  # pages ``rearm`` found written since the last refresh
        # blocks whose writes since the last refresh are unknown (registered
        # just now, or a rearm found the range changed): hash-scanned next
        self._lost: set[str] = set()
        self._chunks: queue.SimpleQueue[bytearray] = queue.SimpleQueue()  # hash-scan buffers, one per thread

    # -- set-up ----------------------------------------------------------

    def open(self) -> None:
        if not os.path.exists(f"/proc/{self.pid}"):
            raise SourceError(f"no process with pid {self.pid}")
        try:
            self._mem = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            self._pagemap = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except PermissionError:
            raise SourceError(permission_message(self.pid, "read the memory of")) from None
        except FileNotFoundError:
            raise SourceError(f"no process with pid {self.pid}") from None
        self.tracking, why = self._choose_tracking()
        log.info(
            "choose_dirty_tracking", pid=self.pid, tracking=self.tracking, reason=why, requested=self.requested_tracking
        )

    def _choose_tracking(self) -> tuple[str, str]:
        """soft-dirty where the kernel has it, then userfaultfd, then the hash
        scan (``auto``); an explicit choice that cannot be had is an error."""
        requested = self.requested_tracking
        if requested == "scan":
            return "scan", "asked for"
        soft, soft_why = soft_dirty_supported()
        if requested == "soft-dirty" and not soft:
            raise SourceError(f"--dirty-tracking soft-dirty: {soft_why}; use --dirty-tracking scan (or auto)")
        if soft and requested != "uffd":
            return "soft-dirty", soft_why
        try:
            self.tracker = UffdTracker.attach(self.pid)
        except UffdUnavailable as exc:
            if requested == "uffd":
                raise SourceError(f"--dirty-tracking uffd: {exc}; use --dirty-tracking scan (or auto)") from None
            return "scan", f"{soft_why}; and no userfaultfd tracking: {exc}"
        return "uffd", f"{soft_why}; userfaultfd write-protect tracks the process's writes exactly"

    # -- each pass -------------------------------------------------------

    def refresh(self) -> list[Block]:
        """The blocks (with no views: ``gather`` reads their pages), and for
        each what was written since the last refresh where the kernel says."""
        maps = read_maps(self.pid)
        chosen, left_out = select_mappings(maps)
        if left_out != self.left_out:
            self._log_left_out(left_out)
        soft = self.tracking == "soft-dirty" and not self.frozen
        ids = block_ids(chosen)
        # a new mapping is registered before its pages are looked at: a write
        # in between is then either seen present or reported by the tracker
        tracked = {bid: self.tracker is not None and self._track(m, bid) for m, bid in zip(chosen, ids, strict=True)}
        entries: dict[str, array] = {}
        present: dict[str, array] = {}
        for m, bid in zip(chosen, ids, strict=True):
            if tracked[bid]:
                assert self.tracker is not None
                present[bid] = self.tracker.present(m.start, m.length)
            else:
                entries[bid] = self._pagemap_of(m)
                present[bid] = pages.select_pages(entries[bid], PM_PRESENT | PM_SWAPPED)
        if soft:
            self._clear_soft_dirty()
        blocks = []
        for m, bid in zip(chosen, ids, strict=True):
            old = self._maps.get(bid)
            known = old is not None and (old.start, old.length) == (m.start, m.length) and bid not in self._lost
            written = None
            if known and tracked[bid]:
                assert self.tracker is not None
                try:
                    written = self.tracker.written(m.start, m.length)
                except RangeChanged as exc:  # moved or remapped since read_maps: read whole
                    log.info("lose_track", pid=self.pid, block=bid, reason=str(exc))
                    self._tracked.pop(bid, None)  # registered again at the next refresh
            if written is not None:
                dirty, zero = self._with_cleared(m, bid, written, present[bid])
            elif known and soft:
                dirty, zero = self._with_cleared(m, bid, pages.select_pages(entries[bid], PM_SOFT_DIRTY), present[bid])
            else:  # read whole, or hash-scanned: the scan finds what changed
                dirty = None
                zero = self._absent(m, present[bid])
            if dirty is None:
                self._dirty.pop(bid, None)
            else:
                self._dirty[bid] = dirty
            if written is not None and len(written) and m.anonymous:
                # a page first written after the present scan is present too: its drop must be seen
                present[bid] = pages.merge_pages(present[bid], written)
            self._zero[bid], self._present[bid], self._maps[bid] = zero, present[bid], m
            info = {"start": m.start, "perms": m.perms, "path": m.path, "offset": m.offset}
            blocks.append(Block(BlockInfo(bid, m.length, self.page_size, info), None))
        for gone in set(self._maps) - set(ids):
            for held in (self._maps, self._present, self._zero, self._dirty, self._tracked):
                held.pop(gone, None)
        self._rearmed.clear()  # what the last pass found is in this refresh's
        self._lost.clear()
        return blocks

    @staticmethod
    def _absent(m: Mapping, present: array) -> array:
        """The pages known to be zero: anonymous pages neither present nor
        swapped (an absent page of a file mapping still holds the file's bytes)."""
        if not m.anonymous:
            return array("Q")
        return pages.difference_pages(pages.page_range(0, m.length // PAGE), present)

    def _log_left_out(self, left_out: list[dict]) -> None:
        new = [item for item in left_out if item not in self.left_out]
        reasons: dict[str, int] = {}
        for item in new:
            reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
        log.info(
            "leave_out_mappings",
            pid=self.pid,
            by_reason=reasons,
            kernel_and_device=[i["path"] for i in new if i["reason"] in ("kernel page", "device memory")],
        )
        self.left_out = left_out

    def _track(self, m: Mapping, bid: str) -> bool:
        """Whether the tracker has mapping ``m`` (registering it when it is
        new, moved or resized; it is then read whole). A range it cannot have
        falls back to the hash scan, with the reason logged once."""
        assert self.tracker is not None
        known = self._tracked.get(bid)
        if known == (m.start, m.length):
            return True
        if known == (0, -1):
            return False
        try:
            self.tracker.register(m.start, m.length)
        except RangeChanged:  # remapped while being registered: scanned this pass, registered at the next
            self._tracked.pop(bid, None)
            return False
        except UffdUnavailable as exc:
            log.info("track_by_scan", pid=self.pid, block=bid, reason=str(exc))
            self._tracked[bid] = (0, -1)
            return False
        self._tracked[bid] = (m.start, m.length)
        self._lost.add(bid)  # writes before the registration are unknown: read whole this pass
        return True

    def _with_cleared(self, m: Mapping, bid: str, written: array, present: array) -> tuple[array, array]:
        """For a block whose writes the kernel reports: (pages to send, pages
        of those now zero). They are the pages written since the last pass,
        and the ones that went from present to absent (a kernel before the
        July 2026 fixes does not report a huge page dropped by MADV_DONTNEED
        as written: this counts every such drop as a change)."""
        if not m.anonymous:  # an absent page of a file mapping still holds the file's bytes
            return written, array("Q")
        before = self._present.get(bid, present)
        rearmed = self._rearmed.pop(bid, None)
        if rearmed is not None:  # present at their read, after the last refresh
            before = pages.merge_pages(before, rearmed)
        cleared = pages.difference_pages(before, present)
        if not len(cleared):
            return written, cleared
        return pages.merge_pages(written, cleared), pages.difference_pages(cleared, written)

    def changed(self, block: Block, hashes, first: int = 0, end: int = -1):
        """The written pages where the kernel says (no hashing: the sender's
        encoder updates the hashes of what it sends); otherwise a hash scan
        of every page, read through a buffer of SCAN_CHUNK_PAGES."""
        end = len(hashes) if end < 0 else end
        dirty = self._dirty.get(block.info.id)
        if dirty is not None:
            return dirty[bisect.bisect_left(dirty, first) : bisect.bisect_left(dirty, end)]
        try:
            chunk = self._chunks.get_nowait()
        except queue.Empty:
            chunk = bytearray(SCAN_CHUNK_PAGES * PAGE)
        try:
            found = array("Q")
            for a in range(first, end, SCAN_CHUNK_PAGES):
                b = min(a + SCAN_CHUNK_PAGES, end)
                with self.gather(block, pages.page_range(a, b), chunk) as view:
                    found.extend(pages.scan(view, hashes, PAGE, a, b, base=a))
            return found
        finally:
            self._chunks.put(chunk)

    def rearms(self, block: Block) -> bool:
        bid = block.info.id
        m = self._maps.get(bid)
        return (
            not self.frozen
            and m is not None
            and bid not in self._lost
            and self._tracked.get(bid) == (m.start, m.length)
        )

    def rearm(self, block: Block, first: int, end: int) -> array:
        """The pages written since the last refresh or rearm in pages
        ``first`` to ``end``, write-protected again; each is now present, so
        it leaves the known-zero pages (``gather`` reads it) and joins those
        whose drop the next refresh looks for."""
        assert self.tracker is not None
        bid = block.info.id
        m = self._maps[bid]
        try:
            written = self.tracker.written(m.start + first * PAGE, (end - first) * PAGE, origin=m.start)
        except RangeChanged as exc:  # moved or remapped meanwhile: the next pass reads it whole
            log.info("lose_track", pid=self.pid, block=bid, reason=str(exc))
            self._lost.add(bid)
            self._tracked.pop(bid, None)
            return array("Q")
        if len(written) and m.anonymous:
            zero = self._zero[bid]
            lo, hi = bisect.bisect_left(zero, first), bisect.bisect_left(zero, end)
            if lo < hi:
                zero[lo:hi] = pages.difference_pages(zero[lo:hi], written)
            self._rearmed.setdefault(bid, array("Q")).extend(written)  # ascending: spans come in order
        return written

    def gather(self, block: Block, wanted, into) -> memoryview:
        """Read the pages ``wanted`` of ``block`` into ``into``, in order;
        pages known to be zero are zero-filled, not read."""
        m = self._maps[block.info.id]
        local, remote = _core.gather_iovecs(into, wanted, self._zero[block.info.id], m.start, PAGE)
        self._readv(local, remote)
        return memoryview(into)[: len(wanted) * PAGE]

    def _pagemap_of(self, m: Mapping) -> array:
        n = m.length // PAGE
        try:
            data = os.pread(self._pagemap, 8 * n, m.start // PAGE * 8)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise ProcessGone(f"process {self.pid} exited during the migration") from None
            raise SourceError(f"cannot read the pagemap of process {self.pid}: {exc.strerror}") from None
        entries = array("Q")
        entries.frombytes(data[: len(data) // 8 * 8])
        if len(entries) < n:  # the mapping shrank meanwhile: treat the rest as absent
            entries.frombytes(bytes(8 * (n - len(entries))))
        return entries

    def _clear_soft_dirty(self) -> None:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as fh:
                fh.write("4")
        except FileNotFoundError:
            raise ProcessGone(f"process {self.pid} exited during the migration") from None

    def _readv(self, local: array, remote: array) -> None:
        """Read the remote ranges into the local ones (struct iovec arrays)."""
        lp, rp = local.buffer_info()[0], remote.buffer_info()[0]
        nranges = len(local) // 2
        for b in range(0, nranges, IOV_MAX):
            k = min(IOV_MAX, nranges - b)
            total = sum(local[2 * b + 1 : 2 * (b + k) : 2])
            got = _libc.process_vm_readv(self.pid, _iov(lp + 16 * b), k, _iov(rp + 16 * b), k, 0)
            if got == total:
                continue
            if got < 0:
                e = ctypes.get_errno()
                if e == errno.ESRCH:
                    raise ProcessGone(f"process {self.pid} exited during the migration")
                if e == errno.EPERM:
                    raise SourceError(permission_message(self.pid, "read the memory of"))
                got = 0  # EFAULT and friends: the first range failed; fall back below
            # fall back to /proc/PID/mem from where process_vm_readv stopped
            done = 0
            for j in range(b, b + k):
                length = local[2 * j + 1]
                if done + length > got:
                    skip = max(0, got - done)
                    self._pread(local[2 * j] + skip, remote[2 * j] + skip, length - skip)
                done += length

    def _pread(self, to: int, at: int, length: int) -> None:
        """Read ``length`` bytes at address ``at`` of the process to our
        address ``to`` through /proc/PID/mem; a page that cannot be read is
        left zero and counted."""
        view = memoryview((ctypes.c_char * length).from_address(to)).cast("B")
        try:
            n = os.preadv(self._mem, [view], at)
            if n == length:
                return
            view, at, to, length = view[n:], at + n, to + n, length - n
        except OSError:
            pass
        for p in range(0, length, PAGE):  # page by page: only what failed as a range
            try:
                if os.preadv(self._mem, [view[p : p + PAGE]], at + p) == PAGE:
                    continue
            except OSError as exc:
                if exc.errno == errno.ESRCH or not os.path.exists(f"/proc/{self.pid}"):
                    raise ProcessGone(f"process {self.pid} exited during the migration") from None
            ctypes.memset(to + p, 0, PAGE)
            self.unreadable_pages += 1

    # -- final pass --------------------------------------------------------

    @property
    def runs_before_durable(self) -> bool:  # type: ignore[override]
        return self.after == "resume"

    def freeze(self) -> None:
        self.freeze_method = self.freezer.freeze()
        self.frozen = True

    def thaw(self, succeeded: bool) -> None:
        after = self.after if succeeded else "resume"
        self.freezer.release(after)
        self.frozen = False

    def info(self) -> dict:
        return {
            "pid": self.pid,
            "dirty_tracking": self.tracking,
            "freeze": self.freeze_method,
            "after": self.after,
            "unreadable_pages": self.unreadable_pages,
            "left_out": self.left_out,
        }

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()  # unregisters and unprotects everything: the target is as it was
            self.tracker = None
        for held in (self._maps, self._present, self._zero, self._dirty, self._tracked, self._rearmed):
            held.clear()
        for fd in (self._mem, self._pagemap):
            if fd >= 0:
                os.close(fd)
        self._mem = self._pagemap = -1
