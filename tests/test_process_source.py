"""Migrating live processes by pid: real children, read through /proc."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from array import array
from pathlib import Path

import pytest
import trio
from daemons import failure_seen, migrate, running_receiver, state
from structlog.testing import capture_logs

from migrated import _core, uffd
from migrated._tools import loadgen, memwriter
from migrated._tools.localrun import CLI
from migrated.errors import MigrationError, SourceError, first_migration_error
from migrated.pages import cleared_pages, difference_pages, select_pages
from migrated.procmem import (
    PM_PRESENT,
    PM_SOFT_DIRTY,
    PM_SWAPPED,
    ProcessSource,
    parse_maps,
    select_mappings,
    soft_dirty_supported,
)

MiB = 1 << 20
PAGE = 4096

# A child that owns an anonymous private mapping A (pattern 0xA1) and keeps
# writing to a 4 MiB work buffer; on SIGUSR1 it maps B (pattern 0xB2) and
# unmaps A. It prints the addresses of A (at start) and B (after SIGUSR1).
CHILD = textwrap.dedent(
    """
    import ctypes, mmap, signal, sys
    P = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    def addr(m): return ctypes.addressof(ctypes.c_char.from_buffer(m))
    a = mmap.mmap(-1, 3 * 4096 * 16, flags=P); a.write(b"\\xa1" * len(a))
    work = mmap.mmap(-1, 4 << 20, flags=P)
    maps = {"a": a}
    def swap(signum, frame):
        b = mmap.mmap(-1, 5 * 4096 * 16, flags=P); b.write(b"\\xb2" * len(b))
        maps["b"] = b
        print(f"b={addr(b):x}", flush=True)
        maps.pop("a").close()
    signal.signal(signal.SIGUSR1, swap)
    print(f"ready a={addr(a):x} work={addr(work):x}", flush=True)
    i = 0
    while True:
        i = (i + 4097) % len(work)
        work[i] = (work[i] + 1) & 255
    """
)


class Child:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        assert line[0] == "ready", line
        f = dict(x.split("=") for x in line[1:])
        self.pid = self.proc.pid
        self.a = int(f["a"], 16)

    def read(self, addr: int, n: int) -> bytes:
        with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as fh:
            fh.seek(addr)
            return fh.read(n)

    def kill(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def child():
    c = Child()
    yield c
    c.kill()


def manifest(images: Path, name: str) -> dict:
    return json.loads((images / name / "manifest.json").read_text())


@pytest.mark.parametrize("tracking", ["scan", "uffd"])
async def test_image_equals_the_frozen_process_block_by_block(tmp_path, child, tracking):
    images = tmp_path / "images"
    fds = sorted(os.listdir(f"/proc/{child.pid}/fd"))
    async with running_receiver(images) as rx:
        source = ProcessSource(child.pid, after="stop", tracking=tracking)
        summary = await migrate(
            rx.port,
            source,
            name="proc",
            max_bandwidth=64 * MiB,
            downtime_limit=0.002,
            max_iterations=3,
            stop_at_floor=False,
        )
    assert summary["status"] == "completed" and summary["verified"]
    assert summary["iterations"] == 4  # pass 0, two dirty passes, the final pass
    assert summary["passes"][1]["pages"] > 0  # the work buffer really was being written
    assert state(child.pid) == "T"  # --after stop: left stopped, memory now lives at the destination
    m = manifest(images, "proc")
    assert m["source_info"]["dirty_tracking"] == summary["dirty_tracking"] == tracking
    assert sorted(os.listdir(f"/proc/{child.pid}/fd")) == fds  # no descriptor of ours left in it
    assert m["source_info"]["freeze"] == "ptrace"
    assert any(b["id"] == "[heap]" for b in m["blocks"])
    reasons = {item["reason"] for item in m["source_info"]["left_out"]}
    assert "read-only mapping" in reasons
    for block in m["blocks"]:
        image = (images / "proc" / block["file"]).read_bytes()
        assert len(image) == block["length"]
        assert image == child.read(block["info"]["start"], block["length"]), block["id"]


class _SwappingSource(ProcessSource):
    """Has the child map B and unmap A right after pass 0 (before the sender
    looks at the mappings again), and waits until it has."""

    refreshes = 0
    b = None

    def __init__(self, child, **kw):
        super().__init__(child.pid, **kw)
        self.child = child

    def refresh(self):
        self.refreshes += 1
        if self.refreshes == 2:
            os.kill(self.child.pid, signal.SIGUSR1)
            self.b = int(self.child.proc.stdout.readline().strip().split("=")[1], 16)
        return super().refresh()


@pytest.mark.parametrize("tracking", ["scan", "uffd"])
async def test_mappings_created_and_removed_mid_migration(tmp_path, child, tracking):
    images = tmp_path / "images"
    async with running_receiver(images) as rx:
        source = _SwappingSource(child, after="resume", tracking=tracking)
        summary = await migrate(
            rx.port,
            source,
            name="maps",
            max_bandwidth=64 * MiB,
            downtime_limit=0.001,
            max_iterations=4,
            stop_at_floor=False,
        )
    assert summary["status"] == "completed" and source.refreshes >= 3
    blocks = manifest(images, "maps")["blocks"]

    def bytes_at(addr: int, n: int) -> bytes | None:
        """The image's bytes at a child address (the kernel may have merged
        a mapping with its neighbour into one block)."""
        for blk in blocks:
            if blk["info"]["start"] <= addr and addr + n <= blk["info"]["start"] + blk["length"]:
                with open(images / "maps" / blk["file"], "rb") as fh:
                    fh.seek(addr - blk["info"]["start"])
                    return fh.read(n)
        return None

    assert bytes_at(source.b, 5 * 4096 * 16) == b"\xb2" * (5 * 4096 * 16), "the new mapping must be in the image"
    assert bytes_at(child.a, 3 * 4096 * 16) != b"\xa1" * (3 * 4096 * 16), "the unmapped one must be gone"
    assert state(child.pid) != "T"  # --after resume


async def test_child_exiting_mid_migration_fails_cleanly(tmp_path, child):
    images = tmp_path / "images"
    from migrated.sender import SendConfig, Sender

    async with running_receiver(images) as rx:
        source = ProcessSource(child.pid)
        source.open()
        sender = Sender(source, SendConfig("gone", max_bandwidth=64 * MiB, downtime_limit=0.001, stop_at_floor=False))
        stream = await trio.open_tcp_stream("127.0.0.1", rx.port)
        with trio.fail_after(60), pytest.raises(MigrationError) as info, first_migration_error():
            async with trio.open_nursery() as nursery:

                async def kill_after_pass0():
                    while not sender.passes:
                        await trio.sleep(0.005)
                    child.kill()

                nursery.start_soon(kill_after_pass0)
                await sender.run(stream)
        source.close()
        await failure_seen(rx)
    assert info.value.code == "process-exited"
    assert "exited during the migration" in str(info.value)
    assert not (images / "gone").exists()
    assert [n for n in os.listdir(images) if "staging" in n] == []


class _FailsWhenFrozen(ProcessSource):
    def refresh(self):
        if self.frozen:
            raise SourceError("injected failure after the freeze")
        return super().refresh()


async def test_failure_after_the_freeze_resumes_the_process(tmp_path, child):
    images = tmp_path / "images"
    async with running_receiver(images) as rx:
        with pytest.raises(SourceError, match="injected"):
            await migrate(rx.port, _FailsWhenFrozen(child.pid, after="stop"), name="inj")
    assert state(child.pid) in ("R", "S")  # running again, not stopped or traced
    before = child.read(child.a, 16)
    assert before == b"\xa1" * 16
    assert not (images / "inj").exists()


async def test_after_kill(tmp_path, child):
    images = tmp_path / "images"
    async with running_receiver(images) as rx:
        summary = await migrate(rx.port, ProcessSource(child.pid, after="kill"), name="k")
    assert summary["status"] == "completed"
    assert child.proc.wait(timeout=10) == -signal.SIGKILL


def test_no_such_process_and_bad_tracking(tmp_path):
    with pytest.raises(SourceError, match="no process with pid"):
        ProcessSource(999999999).open()
    supported, why = soft_dirty_supported()
    c = Child()
    try:
        src = ProcessSource(c.pid, tracking="soft-dirty")
        if supported:
            src.open()
            assert src.tracking == "soft-dirty"
        else:
            with pytest.raises(SourceError, match="soft-dirty.*use --dirty-tracking scan"):
                src.open()
        src.close()
        auto = ProcessSource(c.pid)
        auto.open()
        assert auto.tracking == ("soft-dirty" if supported else "uffd" if uffd.probe()[0] else "scan")
        auto.close()
    finally:
        c.kill()


def test_auto_falls_back_to_the_scan_when_userfaultfd_is_refused(monkeypatch):
    """Where userfaultfd tracking cannot be had (here: the injection is
    refused as ptrace would refuse it), auto takes the hash scan and says
    why; an explicit uffd is an error that names the way out."""
    from migrated import procmem

    def refused(pid):
        raise uffd.UffdUnavailable(f"not allowed to trace process {pid} (ptrace refused)")

    monkeypatch.setattr(procmem.UffdTracker, "attach", refused)
    monkeypatch.setattr(procmem, "soft_dirty_supported", lambda: (False, "no soft-dirty"))
    c = Child()
    try:
        with capture_logs() as logs:
            auto = ProcessSource(c.pid)
            auto.open()
            auto.close()
        assert auto.tracking == "scan"
        (choice,) = [e for e in logs if e["event"] == "choose_dirty_tracking"]
        assert choice["tracking"] == "scan" and "ptrace refused" in choice["reason"]
        with pytest.raises(SourceError, match="--dirty-tracking uffd: not allowed.*use --dirty-tracking scan"):
            ProcessSource(c.pid, tracking="uffd").open()
    finally:
        c.kill()


async def test_a_block_the_target_tracks_itself_falls_back_to_the_scan(tmp_path, child, monkeypatch):
    """A range the tracker cannot register (another userfaultfd has it) is
    read whole each pass and hash-scanned; the others stay tracked, and the
    image is still the frozen process."""
    from migrated import procmem

    register = procmem.UffdTracker.register

    def busy_for_a(self, start, length):
        if start == child.a:
            raise uffd.UffdUnavailable(f"cannot track writes to {start:#x}: another userfaultfd already has it")
        register(self, start, length)

    monkeypatch.setattr(procmem.UffdTracker, "register", busy_for_a)
    images = tmp_path / "images"
    with capture_logs() as logs:
        async with running_receiver(images) as rx:
            source = ProcessSource(child.pid, after="resume", tracking="uffd")
            summary = await migrate(
                rx.port,
                source,
                name="mixed",
                max_bandwidth=64 * MiB,
                downtime_limit=0.002,
                max_iterations=3,
                stop_at_floor=False,
            )
    assert summary["status"] == "completed" and summary["dirty_tracking"] == "uffd"
    fell_back = [e for e in logs if e["event"] == "track_by_scan"]
    assert len(fell_back) == 1 and "another userfaultfd" in fell_back[0]["reason"]
    for block in manifest(images, "mixed")["blocks"]:
        if block["info"]["start"] == child.a:
            assert (images / "mixed" / block["file"]).read_bytes() == b"\xa1" * block["length"]


def test_this_kernel_reports_its_soft_dirty_support_with_a_reason():
    supported, why = soft_dirty_supported()
    assert isinstance(supported, bool) and why
    if not supported:
        assert "CONFIG_MEM_SOFT_DIRTY" in why or "clear_refs" in why


def test_gather_iovecs_merges_runs_and_zero_fills_known_zero_pages():
    into = bytearray(b"\xaa" * 6 * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(into))
    remote = 0x7F0000000000
    wanted = array("Q", [3, 4, 5, 9, 10, 20])  # read into places 0..5, in order
    local, far = _core.gather_iovecs(into, wanted, array("Q", [4, 11, 20]), remote, PAGE)
    # page 4 and 20 are known zero: not read, zero-filled; 3 | 5 and 9-10 are runs
    assert list(far) == [remote + 3 * PAGE, PAGE, remote + 5 * PAGE, PAGE, remote + 9 * PAGE, 2 * PAGE]
    assert list(local) == [base, PAGE, base + 2 * PAGE, PAGE, base + 3 * PAGE, 2 * PAGE]
    assert into[PAGE : 2 * PAGE] == bytes(PAGE) and into[5 * PAGE :] == bytes(PAGE)
    assert into[:PAGE] == b"\xaa" * PAGE and into[2 * PAGE : 5 * PAGE] == b"\xaa" * 3 * PAGE
    with pytest.raises(ValueError, match="too small"):
        _core.gather_iovecs(bytearray(5 * PAGE), wanted, array("Q"), remote, PAGE)


def test_region_pages_from_a_recorded_pagemap_scan_answer():
    base = 0x7F0000000000
    regions = array("Q", [base + PAGE, base + 3 * PAGE, 8, base + 9 * PAGE, base + 10 * PAGE, 8, 0, 0, 0])
    out = _core.region_pages(array("Q", [0]), regions, 2, base, PAGE)
    assert list(out) == [0, 1, 2, 9]  # appended
    assert list(_core.region_pages(array("Q"), regions, 0, base, PAGE)) == []
    with pytest.raises(ValueError, match="more regions"):
        _core.region_pages(array("Q"), regions, 4, base, PAGE)
    with pytest.raises(ValueError, match="outside"):
        _core.region_pages(array("Q"), regions, 2, base + 2 * PAGE, PAGE)
    backwards = array("Q", [base + 3 * PAGE, base + PAGE, 8])
    with pytest.raises(ValueError, match="outside"):
        _core.region_pages(array("Q"), backwards, 1, base, PAGE)
    # a scan restarted inside what it returned: the repeats are skipped
    again = array("Q", [base + 2 * PAGE, base + 5 * PAGE, 8, base + 4 * PAGE, base + 7 * PAGE, 8])
    assert list(_core.region_pages(array("Q", [1, 2, 3]), again, 2, base, PAGE)) == [1, 2, 3, 4, 5, 6]
    for odd in ([base + 4095, base + 4097, 8], [base, base + 100, 8]):  # not page-aligned: refused, not overrun
        with pytest.raises(ValueError, match="page-aligned"):
            _core.region_pages(array("Q"), array("Q", odd), 1, base, PAGE)
    with pytest.raises(ValueError, match="base must be page-aligned"):
        _core.region_pages(array("Q"), regions, 1, base + 1, PAGE)


def test_known_zero_pages_from_recorded_pagemap_entries():
    # pages neither present nor swapped are zero; pages going absent are changes
    entries = array("Q", [PM_PRESENT, 0, PM_SWAPPED, PM_PRESENT | PM_SOFT_DIRTY, 0, PM_PRESENT | 0x1234])
    assert list(select_pages(entries, PM_PRESENT | PM_SWAPPED, False)) == [1, 4]
    now = array("Q", [0, 0, PM_SWAPPED, 0, PM_PRESENT, PM_PRESENT])
    assert list(cleared_pages(entries, now, PM_PRESENT | PM_SWAPPED)) == [0, 3]
    assert list(difference_pages(array("Q", [0, 3, 7]), array("Q", [1, 3, 8]))) == [0, 7]


RECORDED_MAPS = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1234 /usr/bin/prog
55d0c0c00000-55d0c0c01000 rw-p 00001000 08:01 1234 /usr/bin/prog
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000100000 rw-s 00000000 00:05 77 /dev/shm/shared
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
7f0000300000-7f0000301000 ---p 00000000 00:00 0
7f0000400000-7f0000401000 rw-s 00000000 00:06 88 /dev/fb0
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
7ffd00100000-7ffd00104000 r--p 00000000 00:00 0 [vvar]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]
"""


def test_mapping_selection_from_recorded_maps():
    chosen, left_out = select_mappings(parse_maps(RECORDED_MAPS))
    assert [m.block_id for m in chosen] == [
        "55d0c0c00000:/usr/bin/prog",
        "[heap]",
        "7f0000200000:anon",
        "[stack]",
    ]
    reasons = {o["path"] or f"{o['start']:x}": o["reason"] for o in left_out}
    assert reasons["/usr/bin/prog"] == "read-only mapping"
    assert reasons["/dev/shm/shared"] == "shared mapping"
    assert reasons["/dev/fb0"] == "device memory"
    assert reasons["[vvar]"] == "kernel page" and reasons["[vsyscall]"] == "kernel page"
    assert reasons["7f0000300000"] == "read-only mapping"  # PROT_NONE guard
    assert chosen[0].anonymous is False and chosen[1].anonymous is True


# -- the original experiment through the CLI ----------------------------------


def send(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "send", *args], capture_output=True, text=True, timeout=180)


@pytest.mark.slow
@pytest.mark.parametrize("python", [False, True], ids=["c-loadgen", "python-loadgen"])
def test_experiment_converges_with_xbzrle(receiver, python):
    gen = loadgen.start(python=python)
    try:
        # the variant named is the one that runs: a missing C source or
        # compiler must fail the c-loadgen case, not fall back quietly
        assert gen.kind == ("python" if python else "c"), gen.reason
        r = send(
            "--source",
            f"pid:{gen.pid}",
            "--to",
            receiver.address,
            "--name",
            "exp",
            "--max-bandwidth",
            "8M",
            "--downtime-limit",
            "300ms",
            "--json",
        )
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)
        assert s["converged"] and s["downtime_ms"] is not None
        assert state(gen.pid) == "T"
        m = manifest(receiver.dir, "exp")
        block = next(b for b in m["blocks"] if b["info"]["start"] <= gen.buf < b["info"]["start"] + b["length"])
        image = (receiver.dir / "exp" / block["file"]).read_bytes()
        off = gen.buf - block["info"]["start"]
        assert image[off : off + gen.size] == gen.buffer()  # the stopped process's buffer, byte for byte
    finally:
        gen.kill()


@pytest.mark.slow
def test_experiment_does_not_converge_without_xbzrle(receiver):
    gen = loadgen.start()
    try:
        r = send(
            "--source",
            f"pid:{gen.pid}",
            "--to",
            receiver.address,
            "--name",
            "exp",
            "--max-bandwidth",
            "8M",
            "--downtime-limit",
            "300ms",
            "--max-iterations",
            "2",
            "--no-xbzrle",
            "--after",
            "kill",
            "--json",
        )
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)
        assert not s["converged"] and s["iterations"] == 3
        assert s["downtime_ms"] > 300
    finally:
        gen.kill()


def test_python_loadgen_when_there_is_no_compiler(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CC", raising=False)
    exe, reason = loadgen.build()
    assert exe is None and "no C compiler" in reason
    gen = loadgen.LoadGen()
    try:
        assert gen.kind == "python"
        assert gen.loops_per_second(0.3) > 0
        buf = gen.buffer()
        assert len(buf) == 16 * MiB and any(buf[::1024])
    finally:
        gen.kill()


def _nobody_can_run_migrated() -> str | None:
    if os.geteuid() != 0:
        return "the test needs root to start a root-owned child and drop to nobody"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    r = subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--",
            sys.executable,
            "-c",
            "import migrated._core",
        ],
        capture_output=True,
    )
    if r.returncode != 0:
        return "user nobody cannot run this Python or import migrated from this checkout"
    return None


def test_permission_denied_as_nobody(receiver, child):
    reason = _nobody_can_run_migrated()
    if reason:
        pytest.skip(reason)
    r = subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--",
            *CLI,
            "send",
            "--source",
            f"pid:{child.pid}",
            "--to",
            receiver.address,
            "--name",
            "denied",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "failed (sender)" in last and "permission denied" in last
    assert "belongs to uid 0" in last and ("root" in last or "CAP_SYS_PTRACE" in last)
    assert state(child.pid) in ("R", "S")


def test_sigstop_fallback_when_ptrace_is_refused(child, monkeypatch):
    from migrated import freeze

    def refuse(request, tid, data=0):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(freeze, "ptrace", refuse)
    f = freeze.Freezer(child.pid)
    assert f.freeze() == "sigstop"
    assert state(child.pid) == "T"
    f.release("resume")
    deadline = __import__("time").monotonic() + 5
    while state(child.pid) == "T" and __import__("time").monotonic() < deadline:
        pass
    assert state(child.pid) in ("R", "S")


def test_ptrace_freeze_is_a_tracing_stop_and_after_stop_leaves_it_stopped(child):
    from migrated import freeze

    f = freeze.Freezer(child.pid)
    assert f.freeze() == "ptrace"
    assert state(child.pid) == "t"  # tracing stop: the parent sees nothing
    f.release("stop")
    assert state(child.pid) == "T"  # release waits for the group stop
    os.kill(child.pid, signal.SIGCONT)


class _ShortReads:
    """process_vm_readv that reads only the first range of each call, as it
    does when a later range cannot be read: the rest must come through
    /proc/PID/mem."""

    def __init__(self, real):
        self.real = real
        self.short = 0

    def process_vm_readv(self, pid, local, k, remote, k2, flags):
        got = self.real.process_vm_readv(pid, local, 1, remote, 1, flags)
        if k > 1:
            self.short += 1
        return got


async def test_pread_fallback_reads_what_process_vm_readv_cannot(tmp_path, child, monkeypatch):
    from migrated import procmem

    fake = _ShortReads(procmem._libc)
    monkeypatch.setattr(procmem, "_libc", fake)
    images = tmp_path / "images"
    async with running_receiver(images) as rx:
        summary = await migrate(rx.port, ProcessSource(child.pid, after="stop"), name="fallback", max_iterations=1)
    assert summary["status"] == "completed" and fake.short > 0
    for block in manifest(images, "fallback")["blocks"]:
        image = (images / "fallback" / block["file"]).read_bytes()
        assert image == child.read(block["info"]["start"], block["length"]), block["id"]


def test_a_heap_in_two_mappings_is_two_blocks():
    """The heap (or stack) split in two VMAs, as a tracked part and its growth
    are: two blocks, the first with the plain name, ids unique."""
    from migrated.procmem import block_ids

    maps = parse_maps(
        "555555554000-555555560000 rw-p 00000000 00:00 0    [heap]\n"
        "555555560000-555555580000 rw-p 00000000 00:00 0    [heap]\n"
        "7ffff7dd0000-7ffff7dd4000 rw-p 00000000 00:00 0\n"
    )
    assert block_ids(maps) == ["[heap]", "555555560000:[heap]", "7ffff7dd0000:anon"]


@pytest.mark.slow
@pytest.mark.parametrize("tracking", ["uffd", "scan"])
def test_sender_memory_stays_bounded_for_a_process_larger_than_its_cache(receiver, tracking):
    """The sender reads a 384 MiB process through batch buffers: its peak
    resident memory stays near its 16 MiB cache, not near the process's size."""
    size = 384 * MiB
    child = memwriter.start(size)
    try:
        args = ["--source", f"pid:{child.pid}", "--to", receiver.address, "--name", "big", "--json"]
        args += ["--cache-size", "16MiB", "--dirty-tracking", tracking, "--after", "resume"]
        sender = subprocess.Popen([*CLI, "send", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = sender.communicate(timeout=300)
        assert sender.returncode == 0, err
        summary = json.loads(out)
        assert summary["status"] == "completed" and summary["source_info"]["dirty_tracking"] == tracking
        peak = summary["sender_peak_rss_bytes"]
        assert peak < 16 * MiB + 128 * MiB, f"sender peak RSS {peak / MiB:.0f} MiB for a {size // MiB} MiB process"
        assert 0 < summary["sender_peak_private_bytes"] <= peak
        assert state(child.pid) in ("R", "S")  # resumed
    finally:
        child.kill()
        child.wait()


async def _stale_pages_after_migrating_churn(tmp_path, churn_exe, tracking: str, thp: int, mode: str) -> dict:
    """Migrate tests/churn.c (``mode``: its bits 1, 2, 4 drop, grow, remap)
    with the process stopped after; the pages of each block that differ
    from the stopped process."""
    proc = subprocess.Popen([str(churn_exe), str(thp), mode], stdout=subprocess.PIPE, text=True)  # noqa: ASYNC220 -- the child, started once
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        images = tmp_path / "images"
        async with running_receiver(images) as rx:
            source = ProcessSource(proc.pid, after="stop", tracking=tracking)
            s = await migrate(
                rx.port,
                source,
                name="churn",
                downtime_limit=1e-6,
                max_iterations=4,
                stop_at_floor=False,
                max_bandwidth=200 * MiB,
            )
        assert s["status"] == "completed" and s["dirty_tracking"] == tracking
        assert state(proc.pid) == "T"
        bad = {}
        for block in manifest(images, "churn")["blocks"]:
            image = (images / "churn" / block["file"]).read_bytes()
            with open(f"/proc/{proc.pid}/mem", "rb", buffering=0) as mem:  # noqa: ASYNC230 -- it is stopped
                mem.seek(block["info"]["start"])
                live = mem.read(block["length"])
            if image != live:
                bad[block["id"]] = sum(image[i : i + PAGE] != live[i : i + PAGE] for i in range(0, len(image), PAGE))
        shutil.rmtree(images)
        return bad
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("thp", [0, 1], ids=["small-pages", "huge-pages"])
@pytest.mark.parametrize("tracking", ["uffd", "scan"])
async def test_a_churning_process_is_committed_exactly_as_it_stopped(tmp_path, churn_exe, tracking, thp):
    """Random writes (many first touches), runs of pages dropped and a
    mapping grown, moved and remapped in place, all the time: the image equals the stopped
    process page for page (a review found pages committed as zeros when a
    PAGEMAP_SCAN call returned regions twice)."""
    bad = await _stale_pages_after_migrating_churn(tmp_path, churn_exe, tracking, thp, "7")
    assert not bad, f"pages differing from the stopped process, per block: {bad}"


async def test_a_process_writing_at_full_speed_loses_no_write_in_many_migrations(tmp_path, churn_exe):
    """Random writes as fast as the process can (churn mode 0), migrated
    again and again: with more than 512 regions a PAGEMAP_SCAN call, this
    kernel lost a write in 3-6% of such migrations (uffd.SCAN_REGIONS)."""
    for run in range(12):
        bad = await _stale_pages_after_migrating_churn(tmp_path, churn_exe, "uffd", 0, "0")
        assert not bad, f"run {run}: pages older than the stopped process, per block: {bad}"


def test_the_memory_writer_writes_a_shared_file_and_reports_its_cpu_per_round(tmp_path):
    """The benchmarks' writer in its file mode: the file it maps shared gets
    its writes, and SIGUSR1 reports the rounds and the CPU they took."""
    image = tmp_path / "image"
    child = memwriter.start(4 * MiB, str(image))
    try:
        first = child.cpu()
        time.sleep(0.35)
        rounds, seconds = child.cpu()
        assert image.stat().st_size == 4 * MiB
        assert rounds >= first[0] + 2 and seconds > first[1]
        data = image.read_bytes()
        # page 0 is written in round 0, so its 4 bytes hold a round number
        assert data[:8] == (0).to_bytes(8, "little") and data[(1 << 20) : (1 << 20) + 8] == (1 << 20).to_bytes(
            8, "little"
        )
        assert int.from_bytes(data[64:68], "little") % 100 == 0
    finally:
        child.kill()
