"""Freezing a live process for the final pass, and letting it go after.

``Freezer.freeze()`` seizes every thread with ``PTRACE_SEIZE`` and stops it
with ``PTRACE_INTERRUPT`` (invisible to the process's parent, as CRIU does),
then checks that each thread is in a tracing stop. Where ptrace is refused
it falls back to SIGSTOP and waits for the group stop. ``release(after)``
then detaches: ``resume`` lets it run, ``stop`` leaves it SIGSTOPped
(state T), ``kill`` ends it. If our process dies, the kernel detaches the
tracee by itself, so a seized process is never left frozen by a crash.

All ptrace requests must come from the thread that seized: call these from
one thread (the sender's main thread).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import time

import structlog

from migrated.errors import FreezeError, ProcessGone, SourceError
from migrated.source import SignalPauser, process_state

log = structlog.get_logger("migrated.freeze")

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
WALL = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def ptrace(request: int, tid: int, data: int = 0) -> None:
    """ptrace(request, tid, NULL, data); OSError on failure (the freezer's and the uffd injection's)."""
    if _libc.ptrace(request, tid, None, ctypes.c_void_p(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def threads(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        raise ProcessGone(f"process {pid} exited") from None


def yama_scope() -> int | None:
    try:
        return int(open("/proc/sys/kernel/yama/ptrace_scope").read())
    except (OSError, ValueError):
        return None


def permission_message(pid: int, what: str) -> str:
    """Why we may not trace or read ``pid``, and what to do about it."""
    try:
        owner = os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return f"process {pid} does not exist"
    me = os.geteuid()
    if owner != me and me != 0:
        return (
            f"permission denied to {what} process {pid}: it belongs to uid {owner} and the sender runs as uid {me}; "
            "run the sender as that user, as root, or with CAP_SYS_PTRACE"
        )
    scope = yama_scope()
    if scope and scope >= 1 and me != 0:
        rule = {1: "only a parent may trace", 2: "only CAP_SYS_PTRACE may trace"}.get(scope, "tracing is disabled")
        return (
            f"permission denied to {what} process {pid}: Yama ptrace_scope is {scope} ({rule}); "
            "run the sender as root or with CAP_SYS_PTRACE, or set kernel.yama.ptrace_scope=0"
        )
    return (
        f"permission denied to {what} process {pid}: the kernel refused (it may be non-dumpable or in another "
        "user namespace); run the sender as root or with CAP_SYS_PTRACE"
    )


class Freezer:
    """Stops every thread of a process for the final pass and lets it go
    after: PTRACE_SEIZE and PTRACE_INTERRUPT on each thread (undone by the
    kernel if the sender dies), with SIGSTOP as the fallback when ptrace is
    refused. Never leaves a thread it seized in a tracing stop."""

    def __init__(self, pid: int):
        self.pid = pid
        self.seized: list[int] = []
        self.method: str | None = None
        self.pauser: SignalPauser | None = None

    def freeze(self, timeout: float = 5.0) -> str:
        """Stop every thread; returns the method used (``ptrace`` or ``sigstop``)."""
        try:
            self._seize_all(timeout)
            self.method = "ptrace"
        except PermissionError:
            self._detach_all()
            log.warning("fall_back_to_sigstop", pid=self.pid, reason="ptrace refused")
            self._sigstop(timeout)
            self.method = "sigstop"
        except BaseException:
            self._detach_all()  # never leave threads we did seize in a tracing stop
            raise
        log.info("freeze_process", pid=self.pid, method=self.method, threads=len(self.seized) or None)
        return self.method

    def _seize_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            new = [t for t in threads(self.pid) if t not in self.seized]
            if not new:
                break
            for tid in new:
                try:
                    ptrace(PTRACE_SEIZE, tid)
                except OSError as exc:
                    if exc.errno == errno.ESRCH:
                        continue  # the thread exited meanwhile
                    if exc.errno == errno.EPERM:
                        raise PermissionError(exc.errno, exc.strerror) from None
                    raise FreezeError(f"cannot seize thread {tid} of process {self.pid}: {exc.strerror}") from None
                self.seized.append(tid)
                ptrace(PTRACE_INTERRUPT, tid)
            if time.monotonic() > deadline:
                raise FreezeError(f"process {self.pid} keeps creating threads; could not freeze it")
        waiting = list(self.seized)
        while waiting:  # polled, so a thread stuck in the kernel cannot hang us
            for tid in list(waiting):
                try:
                    pid, _ = os.waitpid(tid, WALL | os.WNOHANG)
                except ChildProcessError:
                    self.seized.remove(tid)  # gone
                    pid = tid
                if pid == tid:
                    waiting.remove(tid)
            if waiting:
                if time.monotonic() > deadline:
                    raise FreezeError(f"threads {waiting} of process {self.pid} did not stop within {timeout:g} s")
                time.sleep(0.0005)
        for tid in self.seized:
            st = process_state(self.pid, tid)
            if st not in ("t", "T", None):
                raise FreezeError(f"thread {tid} of process {self.pid} did not stop (state {st})")
        if process_state(self.pid) in (None, "Z", "X"):
            raise ProcessGone(f"process {self.pid} exited while being frozen")

    def _sigstop(self, timeout: float) -> None:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            raise ProcessGone(f"process {self.pid} exited") from None
        except PermissionError:
            raise FreezeError(permission_message(self.pid, "stop")) from None
        self.pauser = SignalPauser(self.pid, role="process")
        try:
            self.pauser.stop(timeout)
        except SourceError as exc:
            raise FreezeError(str(exc)) from None

    def _detach_all(self) -> None:
        for tid in self.seized:
            try:
                ptrace(PTRACE_DETACH, tid)
            except OSError:
                pass  # exited, or already gone with its process
        self.seized = []

    def release(self, after: str) -> None:
        """``resume``, ``stop`` (leave SIGSTOPped) or ``kill``."""
        if self.method is None:
            return
        try:
            if after == "kill":
                os.kill(self.pid, signal.SIGKILL)
            elif after == "stop":
                # queued now, taken as a group stop as soon as ptrace lets go
                os.kill(self.pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass
        self._detach_all()
        if after == "stop":
            # the queued SIGSTOP takes effect once the threads run again: wait
            # for it, so that "left stopped" is true when we return
            deadline = time.monotonic() + 5
            while process_state(self.pid) not in ("T", None, "Z") and time.monotonic() < deadline:
                time.sleep(0.001)
        if self.method == "sigstop" and after == "resume" and self.pauser is not None:
            self.pauser.resume()
        log.info("release_process", pid=self.pid, after=after)
        self.method = None
