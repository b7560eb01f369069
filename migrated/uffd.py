"""Exact dirty tracking of another process: userfaultfd write-protect and
PAGEMAP_SCAN (Linux 6.7+, x86-64), for when the kernel has no soft-dirty bits.

A userfaultfd works on the memory of the process that creates it, so one is
created inside the target: ``UffdTracker.attach`` seizes the target's main
thread with ptrace, runs one injected ``userfaultfd(UFFD_USER_MODE_ONLY |
O_CLOEXEC)`` on a ``syscall`` instruction of its vDSO, copies the descriptor
out with ``pidfd_getfd``, closes it in the target with a second injected
syscall, restores every register and detaches (the target stops for well
under a millisecond). The tracker then enables asynchronous write-protect
(``UFFD_FEATURE_WP_ASYNC``: the kernel resolves write faults itself, no
handler thread) and registers the ranges to track. Each ``written`` call is
one ``PAGEMAP_SCAN`` ioctl on ``/proc/PID/pagemap`` that returns the pages
written since the last call and write-protects them again, atomically.

Closing the tracker's descriptor unregisters every range and drops the
write protection: the target is left exactly as it was. Facts and costs
behind this: shared/dirty-tracking.md in the project's reference material.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import signal
from array import array

import structlog

from migrated import _core
from migrated.errors import ProcessGone, SourceError
from migrated.freeze import PTRACE_DETACH, PTRACE_INTERRUPT, PTRACE_SEIZE, WALL, ptrace

log = structlog.get_logger("migrated.uffd")

PAGE = os.sysconf("SC_PAGESIZE")

# ptrace (x86-64)
PTRACE_GETREGS, PTRACE_SETREGS, PTRACE_SINGLESTEP = 12, 13, 9  # the others are freeze's
SYS_CLOSE, SYS_USERFAULTFD, SYS_PIDFD_GETFD = 3, 323, 438
O_CLOEXEC = 0o2000000
UFFD_USER_MODE_ONLY = 1

# userfaultfd
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_REGISTER_MODE_WP = 2
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15

# PAGEMAP_SCAN (newer than the system's kernel headers)
PAGEMAP_SCAN = 0xC0606610
PM_SCAN_WP_MATCHING = 1
PM_SCAN_CHECK_WPASYNC = 2
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
# Page regions per PAGEMAP_SCAN call. At most 512, the kernel's own buffer
# for one walk (PMD_SIZE / PAGE_SIZE): with more, this kernel (6.18) lost
# writes under a process writing at full speed. The churning-process test
# (tests/churn.c, random writes, XBZRLE on) committed pages older than the
# frozen process in 1 of 50 runs at 600 and 3-6% of runs at 1024, and in
# none of 320 runs at 16, 256 or 512, with rearm or without it; the digest
# cannot see it (the sender never knew the page changed).
SCAN_REGIONS = 512


class UffdUnavailable(SourceError):
    """Tracking by userfaultfd cannot be used for this process; the message
    says why (the sender falls back to the hash scan)."""


class RangeChanged(SourceError):
    """A range scanned for writes is no longer all registered: the process
    moved or remapped memory there since (mremap, munmap and mmap over it).
    What was written there is unknown; the caller reads it whole."""


class _Regs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_ulonglong)
        for name in (
            "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ss "
            "fs_base gs_base ds es fs gs"
        ).split()
    ]


class _ScanArg(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_ulonglong)
        for name in (
            "size flags start end walk_end vec vec_len max_pages category_inverted category_mask "
            "category_anyof_mask return_mask"
        ).split()
    ]


class _Region(ctypes.Structure):
    _fields_ = [("start", ctypes.c_ulonglong), ("end", ctypes.c_ulonglong), ("categories", ctypes.c_ulonglong)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def _ioctl(fd: int, request: int, arg: ctypes.Structure | ctypes.Array) -> int:
    rc = _libc.ioctl(fd, request, ctypes.addressof(arg))
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return rc


def probe() -> tuple[bool, str]:
    """Whether this machine can track another process by userfaultfd, and
    why not: the architecture, the kernel's PAGEMAP_SCAN and async
    write-protect, checked on a userfaultfd of our own."""
    if platform.machine() != "x86_64":
        return False, f"userfaultfd tracking injects an x86-64 syscall; this machine is {platform.machine()}"
    fd = _libc.syscall(SYS_USERFAULTFD, O_CLOEXEC | UFFD_USER_MODE_ONLY)
    if fd < 0:
        e = ctypes.get_errno()
        return False, f"userfaultfd() is refused here: {os.strerror(e)}"
    try:
        _enable_async_wp(fd)
    except UffdUnavailable as exc:
        return False, str(exc)
    finally:
        os.close(fd)
    return True, "userfaultfd with asynchronous write-protect and PAGEMAP_SCAN"


def _enable_async_wp(fd: int, shared: bool = False) -> None:
    features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED
    if shared:
        features |= UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    api = (ctypes.c_ulonglong * 3)(UFFD_API, features, 0)
    try:
        _ioctl(fd, UFFDIO_API, api)
    except OSError as exc:
        what = "asynchronous userfaultfd write-protect" + (" of shared memory" if shared else "")
        raise UffdUnavailable(f"the kernel has no {what} (UFFDIO_API: {exc.strerror})") from None


class UffdTracker:
    """Tracks the pages one process writes, in the ranges registered with it."""

    def __init__(self, pid: int, fd: int):
        self.pid = pid
        self.fd = fd  # our copy of the target's userfaultfd
        self._pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self._regions = (_Region * SCAN_REGIONS)()
        self._region_words = (
            memoryview(self._regions).cast("B").cast("Q")
        )  # the same, as (start, end, categories) words
        self.ranges: dict[int, int] = {}  # start -> length, registered

    # -- set-up -----------------------------------------------------------

    @classmethod
    def attach(cls, pid: int, *, shared: bool = False) -> UffdTracker:
        """A userfaultfd made inside ``pid``, ours alone, with asynchronous
        write-protect on (``shared``: of shared memory too, tmpfs and
        hugetlbfs). Raises UffdUnavailable (saying why) when it cannot be
        had; the target is left as it was either way."""
        ok, why = probe()
        if not ok:
            raise UffdUnavailable(why)
        fd = _inject_userfaultfd(pid)
        try:
            _enable_async_wp(fd, shared)
            tracker = cls(pid, fd)
        except BaseException:
            os.close(fd)
            raise
        log.info("attach_uffd", pid=pid)
        return tracker

    def register(self, start: int, length: int) -> None:
        """Track writes to ``[start, start + length)`` (page-aligned) from
        now on. Raises UffdUnavailable when the range cannot be (another
        userfaultfd has it: EBUSY; a kind of memory that cannot be
        write-protected: EINVAL)."""
        reg = (ctypes.c_ulonglong * 4)(start, length, UFFDIO_REGISTER_MODE_WP, 0)
        try:
            _ioctl(self.fd, UFFDIO_REGISTER, reg)
        except OSError as exc:
            why = "another userfaultfd already has it" if exc.errno == errno.EBUSY else exc.strerror
            raise UffdUnavailable(
                f"cannot track writes to {start:#x}+{length:#x} of process {self.pid}: {why}"
            ) from None
        self.ranges[start] = length
        self.written(start, length)  # arms the write protection; what it reports is sent whole anyway

    def forget(self, start: int) -> None:
        """A range that went away (unmapped): stop scanning it."""
        self.ranges.pop(start, None)

    # -- each pass ----------------------------------------------------------

    def written(self, start: int, length: int, origin: int | None = None) -> array:
        """The pages of ``[start, start + length)`` written since the last
        call (page numbers from ``origin``, by default ``start``),
        write-protected again in the same step, so that no write falls
        between the report and the protection."""
        flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
        return self._scan(start, length, PAGE_IS_WRITTEN, flags, origin=start if origin is None else origin)

    def present(self, start: int, length: int) -> array:
        """The pages of ``[start, start + length)`` present or swapped out
        (page numbers from ``start``): what reading the pagemap entries would
        say, in ranges, so about a tenth of the time for a large mapping."""
        return self._scan(start, length, PAGE_IS_PRESENT | PAGE_IS_SWAPPED, 0, anyof=True, origin=start)

    def _scan(self, start: int, length: int, categories: int, flags: int, *, anyof: bool = False, origin: int) -> array:
        out = array("Q")
        arg = _ScanArg(
            size=ctypes.sizeof(_ScanArg),
            flags=flags,
            start=start,
            end=start + length,
            vec=ctypes.addressof(self._regions),
            vec_len=SCAN_REGIONS,
            category_mask=0 if anyof else categories,
            category_anyof_mask=categories if anyof else 0,
            return_mask=categories,
        )
        while arg.start < arg.end:
            try:
                n = _ioctl(self._pagemap, PAGEMAP_SCAN, arg)
            except OSError as exc:
                if exc.errno == errno.ESRCH:
                    raise ProcessGone(f"process {self.pid} exited during the migration") from None
                if exc.errno == errno.EPERM and flags & PM_SCAN_CHECK_WPASYNC:
                    raise RangeChanged(f"the memory at {start:#x}+{length:#x} of process {self.pid} changed") from None
                raise SourceError(f"PAGEMAP_SCAN of process {self.pid} failed: {exc.strerror}") from None
            # this kernel may report a walk_end short of the last region it
            # returned: going on from walk_end (so that what the walk did not
            # finish is scanned, and write-protected, again) returns those
            # pages a second time, which region_pages skips
            _core.region_pages(out, self._region_words, n, origin, PAGE)
            if arg.walk_end <= arg.start:
                break
            arg.start = arg.walk_end
        return out

    def close(self) -> None:
        """Unregister everything and drop the write protection (closing our
        descriptor does both; the target holds none)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._pagemap >= 0:
            os.close(self._pagemap)
            self._pagemap = -1
        self.ranges.clear()


# -- the injection ---------------------------------------------------------------


def _wait_stop(pid: int) -> int:
    """Wait for ``pid``'s next ptrace stop; its signal (SIGTRAP after a step)."""
    while True:
        try:
            _, status = os.waitpid(pid, WALL)
        except ChildProcessError:
            raise UffdUnavailable(f"process {pid} is gone") from None
        if os.WIFSTOPPED(status):
            return os.WSTOPSIG(status)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            raise UffdUnavailable(f"process {pid} exited while a syscall was injected")


def _syscall_address(pid: int) -> int:
    """The address of a ``syscall`` instruction (0F 05) in the target's vDSO."""
    with open(f"/proc/{pid}/maps") as fh:
        for line in fh:
            if line.rstrip().endswith("[vdso]"):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
                    mem.seek(lo)
                    code = mem.read(hi - lo)
                at = code.find(b"\x0f\x05")
                if at >= 0:
                    return lo + at
    raise UffdUnavailable(f"process {pid} has no vDSO with a syscall instruction to run one on")


def _step(pid: int) -> int:
    ptrace(PTRACE_SINGLESTEP, pid)
    return _wait_stop(pid)


def _run_syscall(pid: int, at: int, saved: _Regs, pending: list[int], number: int, *args: int) -> int:
    """Run one syscall in the stopped ``pid`` at ``at``; its return value.
    A signal that arrives meanwhile goes to ``pending``, to be delivered at
    the detach."""
    regs = _Regs.from_buffer_copy(saved)
    regs.rip, regs.rax, regs.orig_rax = at, number, 2**64 - 1
    for name, value in zip(("rdi", "rsi", "rdx"), args, strict=False):
        setattr(regs, name, value)
    ptrace(PTRACE_SETREGS, pid, ctypes.addressof(regs))
    while (sig := _step(pid)) != signal.SIGTRAP:
        pending.append(sig)
    ptrace(PTRACE_GETREGS, pid, ctypes.addressof(regs))
    rax = regs.rax
    return rax - 2**64 if rax >= 2**63 else rax


def _inject_userfaultfd(pid: int) -> int:
    """userfaultfd() run inside ``pid``, its descriptor copied to us and
    closed there; every register restored. Raises UffdUnavailable."""
    try:
        at = _syscall_address(pid)
        ptrace(PTRACE_SEIZE, pid)
    except PermissionError:
        raise UffdUnavailable(f"not allowed to trace process {pid} (ptrace refused)") from None
    except (FileNotFoundError, ProcessLookupError):
        raise UffdUnavailable(f"no process with pid {pid}") from None
    except OSError as exc:
        raise UffdUnavailable(f"cannot trace process {pid}: {exc.strerror}") from None
    saved = _Regs()
    pending: list[int] = []  # signals that arrived while the target was ours
    have_saved = restored = False
    try:
        ptrace(PTRACE_INTERRUPT, pid)
        if (sig := _wait_stop(pid)) != signal.SIGTRAP:
            pending.append(sig)
        ptrace(PTRACE_GETREGS, pid, ctypes.addressof(saved))
        have_saved = True
        remote = _run_syscall(pid, at, saved, pending, SYS_USERFAULTFD, O_CLOEXEC | UFFD_USER_MODE_ONLY)
        if remote < 0:
            raise UffdUnavailable(f"userfaultfd() refused inside process {pid}: {os.strerror(-remote)}")
        try:
            pidfd = os.pidfd_open(pid)
            try:
                local = _libc.syscall(SYS_PIDFD_GETFD, pidfd, remote, 0)
                err = ctypes.get_errno()
            finally:
                os.close(pidfd)
        finally:
            _run_syscall(pid, at, saved, pending, SYS_CLOSE, remote)
        if local < 0:
            raise UffdUnavailable(f"pidfd_getfd() of process {pid}'s userfaultfd failed: {os.strerror(err)}")
        ptrace(PTRACE_SETREGS, pid, ctypes.addressof(saved))
        restored = True
        return int(local)
    finally:
        if have_saved and not restored:
            try:
                ptrace(PTRACE_SETREGS, pid, ctypes.addressof(saved))
            except OSError:
                pass
        try:
            ptrace(PTRACE_DETACH, pid, pending[0] if pending else 0)
        except OSError:
            pass
