"""End-to-end benchmarks over loopback, as ratios to ceilings measured in
the same run, and the XBZRLE experiment on a live process.

- ``run_e2e``: pass-0 throughput of a 1 GiB image (40% zero pages, 60%
  random) through ``migrated send``/``migrated receive`` subprocesses,
  against a plain socket copy of the same file between the same kind of
  processes; and the wire bytes of a pass in which 4096 pages have 4 bytes
  changed each.
- ``run_scaling``: a writer of 256 MiB and 1 GiB (more with ``sizes``)
  writing 4 bytes into 1% of its pages every 100 ms, migrated as a process
  by pid and as a file image in /dev/shm with it as the paused writer, each
  with userfaultfd tracking and with the hash scan: passes, convergence,
  downtime and its parts, wire bytes per byte of memory, the cost of
  finding dirty pages per pass, sender CPU and private memory, and the
  writer's CPU per round of writes against the same writer alone.
- ``run_experiment``: the original XBZRLE test workload (16 MiB, one byte in
  every KiB incremented in an endless loop) migrated by pid at several
  bandwidths with and without XBZRLE, and the load generator's slowdown
  while it is being migrated.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from migrated._tools.localrun import CLI, ReceiverProcess

MiB = 1 << 20
E2E_TARGET = 0.9  # pass 0 over a socket copy that writes nothing
FILE_TARGET = 0.8  # pass 0 over the same copy written to a file (which allocates page cache, as the receiver does)
MIN_REPEAT = 5  # runs of the end-to-end part: the median of each run's ratios to its own ceilings is kept
WIRE_TARGET = 32


def _make_file(path: Path, size: int, zero_fraction: float) -> None:
    rng = random.Random(7)
    zero = int(size * zero_fraction) // 4096 * 4096
    with open(path, "wb") as fh:
        # interleave zero and random 1 MiB chunks so neither sits in one place
        left_zero, left_rand = zero, size - zero
        while left_zero or left_rand:
            if left_rand and (not left_zero or rng.random() >= zero_fraction):
                n = min(left_rand, MiB)
                fh.write(rng.randbytes(n))
                left_rand -= n
            else:
                n = min(left_zero, MiB)
                fh.write(bytes(n))
                left_zero -= n


_SINK = r"""
import os, socket, sys
out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if len(sys.argv) > 1 else -1
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
buf = bytearray(1 << 20)
view = memoryview(buf)
total = 0
while n := conn.recv_into(buf):
    if out >= 0:
        os.write(out, view[:n])
    total += n
conn.sendall(b"k")
print(total, flush=True)
if out >= 0:
    os.close(out)
    os.unlink(sys.argv[1])
"""


def socket_copy_seconds(path: Path, to_file: Path | None = None) -> float:
    """A plain copy of the file over loopback TCP to another process, which
    discards it (``to_file`` None) or writes it to a file: sendfile on one
    side, recv_into (and write) on the other."""
    args = [str(to_file)] if to_file else []
    sink = subprocess.Popen([sys.executable, "-c", _SINK, *args], stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None  # stdout=PIPE
    port = int(sink.stdout.readline())
    with socket.create_connection(("127.0.0.1", port)) as sock, open(path, "rb") as fh:
        t0 = time.perf_counter()
        sock.sendfile(fh)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)
        seconds = time.perf_counter() - t0
    assert int(sink.stdout.readline()) == path.stat().st_size
    sink.wait()
    return seconds


def _remove_image(link: Path) -> None:
    """Remove a committed image: the name is a symlink to its version."""
    if link.is_symlink():
        shutil.rmtree(link.resolve(), ignore_errors=True)
        link.unlink()


def migrate_cli(receiver: ReceiverProcess, source: str, name: str, *args: str, timeout: float = 600) -> dict:
    r = subprocess.run(
        [*CLI, "send", "--source", source, "--to", receiver.address, "--name", name, "--json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if r.returncode not in (0, 1):
        raise RuntimeError(f"migrated send exited {r.returncode}: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def wire_bytes_per_sparse_page() -> dict:
    """Wire bytes of a pass in which 4096 pages have 4 bytes changed each."""
    import trio

    from migrated.receiver import Receiver, ReceiverConfig
    from migrated.records import BlockInfo
    from migrated.sender import SendConfig, Sender
    from migrated.source import Block, Source

    class Sparse(Source):
        description = "memory:sparse"

        def __init__(self):
            self.buf = bytearray(random.Random(3).randbytes(16 * MiB))
            self.calls = 0

        def refresh(self):
            self.calls += 1
            if self.calls == 2:  # after pass 0: 4 bytes in each of the 4096 pages
                for pos in range(0, len(self.buf), 1024):
                    self.buf[pos] = (self.buf[pos] + 1) & 0xFF
            return [Block(BlockInfo("ram", len(self.buf), 4096), self.buf)]

    async def main():
        with tempfile.TemporaryDirectory() as tmp:
            rx = Receiver(ReceiverConfig(tmp))
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            async with trio.open_nursery() as nursery:
                await nursery.start(rx.serve, listeners)
                stream = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
                async with stream:
                    summary = await Sender(Sparse(), SendConfig("wire", downtime_limit=0, max_iterations=2)).run(stream)
                nursery.cancel_scope.cancel()
        return summary

    from migrated import log

    log.configure("json", "warning")
    summary = trio.run(main)
    p1 = summary["passes"][1]
    return {"pages": p1["pages"], "wire_bytes": p1["wire_bytes"], "bytes_per_page": p1["wire_bytes"] / p1["pages"]}


def run_e2e(size_mib: int = 1024, repeat: int = MIN_REPEAT, progress=None) -> dict:
    note = progress or (lambda msg: None)
    with tempfile.TemporaryDirectory(prefix="migrated-bench-") as tmpdir:
        tmp = Path(tmpdir)
        src = tmp / "image.img"
        note(f"e2e: building a {size_mib} MiB image (40% zero pages, 60% random)")
        _make_file(src, size_mib * MiB, 0.4)
        size = src.stat().st_size
        # the ceilings run right before each migration, as the core's
        # memcmp does: the machine's drift between them does not count
        runs = []
        summary: dict = {}
        receiver = ReceiverProcess(tmp / "images", tmp / "receiver.log")
        try:
            for i in range(repeat):
                copy = socket_copy_seconds(src)
                file_copy = socket_copy_seconds(src, tmp / "copy.out")
                summary = migrate_cli(receiver, f"file:{src}", f"e2e{i}", "--downtime-limit", "10s")
                _remove_image(receiver.dir / f"e2e{i}")
                runs.append(
                    {"socket_copy_s": copy, "file_copy_s": file_copy, "pass0_s": summary["passes"][0]["seconds"]}
                )
                note(
                    f"e2e: run {i + 1}: socket copy {size / copy / 1e6:.0f} MB/s, to a file "
                    f"{size / file_copy / 1e6:.0f} MB/s, migrated pass 0 {size / runs[-1]['pass0_s'] / 1e6:.0f} MB/s"
                )
        finally:
            receiver.stop()
        wire = wire_bytes_per_sparse_page()
        note(f"e2e: {wire['bytes_per_page']:.1f} wire bytes per sparse page")
    med = statistics.median
    return {
        "image_bytes": size,
        "socket_copy_mbps": med(size / r["socket_copy_s"] for r in runs) / 1e6,
        "pass0_mbps": med(size / r["pass0_s"] for r in runs) / 1e6,
        # each migration against the ceilings run right before it: the
        # machine's drift between runs does not count
        "ratio": med(r["socket_copy_s"] / r["pass0_s"] for r in runs),
        "file_copy_mbps": med(size / r["file_copy_s"] for r in runs) / 1e6,
        "file_ratio": med(r["file_copy_s"] / r["pass0_s"] for r in runs),
        "pair_ratios": [round(r["socket_copy_s"] / r["pass0_s"], 3) for r in runs],
        "target": E2E_TARGET,
        "file_target": FILE_TARGET,
        "pass0_wire_bytes": summary["passes"][0]["wire_bytes"],
        "zero_pages": summary["ram"]["zero_pages"],
        "sparse_pass": wire,
        "wire_target": WIRE_TARGET,
        "runs": runs,
    }


def format_e2e(r: dict) -> str:
    w = r["sparse_pass"]
    flag = "" if r["ratio"] >= r["target"] else "  BELOW TARGET"
    fflag = "" if r["file_ratio"] >= r["file_target"] else "  BELOW TARGET"
    wflag = "" if w["bytes_per_page"] <= r["wire_target"] else "  ABOVE TARGET"
    return "\n".join(
        [
            f"end to end over loopback: {r['image_bytes'] >> 20} MiB image, 40% zero pages "
            f"(medians of {len(r['runs'])} runs, each against its own ceilings)",
            f"  socket copy (sendfile -> recv_into)  {r['socket_copy_mbps']:8.0f} MB/s",
            f"  socket copy written to a file        {r['file_copy_mbps']:8.0f} MB/s",
            f"  migrated pass 0                      {r['pass0_mbps']:8.0f} MB/s  "
            f"x copy {r['ratio']:.2f} (target {r['target']}){flag}, "
            f"x copy to a file {r['file_ratio']:.2f} (target {r['file_target']}){fflag}",
            f"  each run x copy: {', '.join(f'{x:.2f}' for x in r['pair_ratios'])}",
            f"  sparse pass: {w['pages']} pages, {w['wire_bytes']} wire bytes, "
            f"{w['bytes_per_page']:.1f} B/page (target <= {r['wire_target']}){wflag}",
        ]
    )


TLS_TARGET = 0.6  # pass 0 over TLS against the same over plain TCP


def _tls_files(tmp: Path) -> dict[str, str] | None:
    """A CA and two leaves (the receiver for 127.0.0.1, a sender), made with
    trustme (a test dependency; None without it)."""
    try:
        import trustme
    except ImportError:
        return None
    ca = trustme.CA()
    files = {"ca": tmp / "ca.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    for name, leaf in (("receiver", ca.issue_cert("127.0.0.1")), ("sender", ca.issue_cert("sender.bench"))):
        files[name], files[f"{name}-key"] = tmp / f"{name}.pem", tmp / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(files[name]))
        leaf.private_key_pem.write_to_path(str(files[f"{name}-key"]))
    return {k: str(v) for k, v in files.items()}


def run_tls(size_mib: int = 1024, repeat: int = 3, progress=None) -> dict:
    """Pass 0 of the same image over mutual TLS and over plain TCP, in pairs
    (plain right before TLS); the median of each pair's ratio."""
    note = progress or (lambda msg: None)
    with tempfile.TemporaryDirectory(prefix="migrated-bench-") as tmpdir:
        tmp = Path(tmpdir)
        files = _tls_files(tmp)
        if files is None:
            return {"skipped": "trustme is not installed (pip install trustme) to make test certificates"}
        src = tmp / "image.img"
        _make_file(src, size_mib * MiB, 0.4)
        server = ("--tls-cert", files["receiver"], "--tls-key", files["receiver-key"], "--tls-ca", files["ca"])
        client = ("--tls-cert", files["sender"], "--tls-key", files["sender-key"], "--tls-ca", files["ca"])
        plain_rx = ReceiverProcess(tmp / "plain", tmp / "plain.log")
        tls_rx = ReceiverProcess(tmp / "tls", tmp / "tls.log", *server)
        runs = []
        try:
            for i in range(repeat):
                plain = migrate_cli(plain_rx, f"file:{src}", f"p{i}", "--downtime-limit", "10s")
                _remove_image(plain_rx.dir / f"p{i}")
                secure = migrate_cli(tls_rx, f"file:{src}", f"t{i}", "--downtime-limit", "10s", *client)
                _remove_image(tls_rx.dir / f"t{i}")
                if secure["receiver_authenticated"] != "tls":
                    raise RuntimeError(f"the TLS run was not authenticated by TLS: {secure['receiver_authenticated']}")
                p0, t0 = plain["passes"][0]["seconds"], secure["passes"][0]["seconds"]
                runs.append({"plain_s": p0, "tls_s": t0})
                mb = src.stat().st_size / 1e6
                note(f"tls: run {i + 1}: pass 0 plain {mb / p0:.0f} MB/s, TLS {mb / t0:.0f} MB/s")
        finally:
            plain_rx.stop()
            tls_rx.stop()
        size = src.stat().st_size
    med = statistics.median
    return {
        "image_bytes": size,
        "plain_mbps": med(size / r["plain_s"] for r in runs) / 1e6,
        "tls_mbps": med(size / r["tls_s"] for r in runs) / 1e6,
        "ratio": med(r["plain_s"] / r["tls_s"] for r in runs),
        "pair_ratios": [round(r["plain_s"] / r["tls_s"], 3) for r in runs],
        "target": TLS_TARGET,
        "runs": runs,
    }


def format_tls(r: dict) -> str:
    if "skipped" in r:
        return f"TLS: skipped: {r['skipped']}"
    flag = "" if r["ratio"] >= r["target"] else "  BELOW TARGET"
    return "\n".join(
        [
            f"mutual TLS 1.3 over loopback: {r['image_bytes'] >> 20} MiB image, pass 0 (medians of "
            f"{len(r['runs'])} pairs, plain right before TLS)",
            f"  plain TCP  {r['plain_mbps']:8.0f} MB/s",
            f"  TLS        {r['tls_mbps']:8.0f} MB/s  x plain {r['ratio']:.2f} (target {r['target']}){flag}",
            f"  each pair x plain: {', '.join(f'{x:.2f}' for x in r['pair_ratios'])}",
        ]
    )


SCALING_SIZES_MIB = (256, 1024)
TRACKING_COST_TARGET = 20  # the scan's cost per pass over uffd's, at least
DOWNTIME_CRIU_MS = {256: 130, 1024: 409}  # CRIU 4.2's stop-and-copy freeze of the same process here
PRIVATE_TARGET_MIB = 256  # the sender's private memory over its cache, at most
SHM = Path("/dev/shm")
ALONE_SECONDS = 2.0  # the writer's cost per round of writes, measured before each migration


def run_scaling(sizes=SCALING_SIZES_MIB, trackings=("uffd", "scan"), kinds=("process", "file"), progress=None) -> dict:
    """Migrate the memory writer (migrated._tools.memwriter) through the CLI,
    once per kind, size and tracking; each run is fresh, the image removed.
    ``process``: its anonymous memory by pid. ``file``: a file in /dev/shm it
    maps shared, with it as the --pause-pid writer (uffd: its mappings are
    tracked)."""
    from migrated._tools import memwriter

    note = progress or (lambda msg: None)
    rows = []
    skipped = []
    if "file" in kinds and not (SHM.is_dir() and os.access(SHM, os.W_OK)):
        skipped.append(f"file images: {SHM} is not a writable directory here")
        kinds = tuple(k for k in kinds if k != "file")
    with tempfile.TemporaryDirectory(prefix="migrated-bench-") as tmpdir:
        tmp = Path(tmpdir)
        receiver = ReceiverProcess(tmp / "images", tmp / "receiver.log")
        try:
            for kind in kinds:
                for size_mib in sizes:
                    for tracking in trackings:
                        image = SHM / f"migrated-bench-{os.getpid()}.img" if kind == "file" else None
                        child = memwriter.start(size_mib * MiB, str(image) if image else None)
                        try:
                            row = _scaling_run(receiver, child, kind, image, size_mib, tracking, tmp)
                        finally:
                            child.kill()
                            if image:
                                image.unlink(missing_ok=True)
                        _remove_image(receiver.dir / row["name"])
                        rows.append(row)
                        note(
                            f"scaling: {kind} {size_mib} MiB {tracking}: {row['passes']} passes, "
                            f"converged {row['converged']}, downtime {row['downtime_ms']} ms, "
                            f"writer x{row['writer_cpu_ratio']:.2f} CPU per round"
                        )
        finally:
            receiver.stop()
    return {
        "rows": rows,
        "skipped": skipped,
        "tracking_cost_target": TRACKING_COST_TARGET,
        "criu_ms": DOWNTIME_CRIU_MS,
    }


def _scaling_run(receiver: ReceiverProcess, child, kind: str, image, size_mib: int, tracking: str, tmp: Path) -> dict:
    name = f"scale-{kind}{size_mib}{tracking}"
    source = ["--source", f"file:{image}", "--pause-pid", str(child.pid)] if image else ["--source", f"pid:{child.pid}"]
    args = [*source, "--to", receiver.address, "--name", name, "--json", "--dirty-tracking", tracking]
    if not image:
        args += ["--after", "resume"]
    rounds0, cpu0 = child.cpu()
    time.sleep(ALONE_SECONDS)
    rounds1, cpu1 = child.cpu()
    with open(tmp / "send.out", "w+") as out, open(tmp / "send.err", "w") as err:
        sender = subprocess.Popen([*CLI, "send", *args], stdout=out, stderr=err)
        _, status, usage = os.wait4(sender.pid, 0)
        out.seek(0)
        text = out.read()
    rounds2, cpu2 = child.cpu()
    if os.waitstatus_to_exitcode(status) not in (0, 1) or not text:
        raise RuntimeError(f"migrated send exited {os.waitstatus_to_exitcode(status)}: see {tmp / 'send.err'}")
    s = json.loads(text)
    passes = s["passes"]
    # between pre-copy passes: finding the dirty pages, and rearming them while the pass ran
    scans = [p["scan_ms"] + (p["rearm_ms"] or 0) for p in passes[1:-1] if p["scan_ms"] is not None]
    alone = (cpu1 - cpu0) / max(1, rounds1 - rounds0)
    during = (cpu2 - cpu1) / max(1, rounds2 - rounds1)
    return {
        "name": name,
        "kind": kind,
        "size_mib": size_mib,
        "tracking": s["dirty_tracking"],
        "status": s["status"],
        "passes": len(passes),
        "converged": s["converged"],
        "total_s": s["total_time_ms"] / 1000,
        "downtime_ms": s["downtime_ms"],
        "downtime_breakdown": s["downtime_breakdown"],
        "wire_per_byte": s["ram"]["transferred_bytes"] / (size_mib * MiB),
        "tracking_ms_per_pass": statistics.median(scans) if scans else None,
        "sender_cpu_s": usage.ru_utime + usage.ru_stime,
        "sender_peak_mib": s["sender_peak_rss_bytes"] / MiB,
        "sender_private_mib": s["sender_peak_private_bytes"] / MiB,
        "cache_mib": s["xbzrle"]["cache_size"] / MiB,
        # the writer's CPU per round of writes while migrated, over alone
        # (write-protect faults and the scan's competition for the cores)
        "writer_ms_per_round": [round(alone * 1000, 3), round(during * 1000, 3)],
        "writer_cpu_ratio": during / alone if alone > 0 else float("nan"),
    }


def format_scaling(r: dict) -> str:
    lines = [
        "the memory writer (4 bytes into 1% of its pages every 100 ms): a process migrated by pid (--after resume),",
        "and a file in /dev/shm it maps shared, with it as the --pause-pid writer",
        f"{'kind':<7} {'size':>6} {'tracking':<8} {'passes':>6} {'conv':>5} {'total s':>8} {'downtime ms':>11} "
        f"{'wire/size':>9} {'find dirty ms/pass':>18} {'CPU s':>6} {'private MiB':>11} {'writer CPU/round':>16}",
    ]
    by = {(row["kind"], row["size_mib"], row["tracking"]): row for row in r["rows"]}
    for row in r["rows"]:
        t = row["tracking_ms_per_pass"]
        lines.append(
            f"{row['kind']:<7} {row['size_mib']:>4}Mi {row['tracking']:<8} {row['passes']:>6} "
            f"{str(row['converged']):>5} {row['total_s']:>8.1f} {row['downtime_ms']:>11.0f} "
            f"{row['wire_per_byte']:>9.2f} {t if t is not None else float('nan'):>18.1f} "
            f"{row['sender_cpu_s']:>6.1f} {row['sender_private_mib']:>11.0f} {row['writer_cpu_ratio']:>15.2f}x"
        )
    for (kind, size, tracking), row in by.items():
        criu = r["criu_ms"].get(size)
        if kind == "process" and tracking == "uffd" and criu:
            flag = "" if row["downtime_ms"] < criu else "  ABOVE TARGET"
            lines.append(
                f"  process {size} MiB uffd downtime {row['downtime_ms']:.0f} ms vs CRIU stop-and-copy {criu} ms{flag}"
            )
        scan = by.get((kind, size, "scan"))
        if tracking == "uffd" and scan and row["tracking_ms_per_pass"] and scan["tracking_ms_per_pass"]:
            ratio = scan["tracking_ms_per_pass"] / row["tracking_ms_per_pass"]
            flag = "" if ratio >= r["tracking_cost_target"] else "  BELOW TARGET"
            target = r["tracking_cost_target"]
            lines.append(
                f"  {kind} {size} MiB finding dirty pages: scan / uffd = {ratio:.0f}x (target >= {target}){flag}"
            )
    worst = max(r["rows"], key=lambda row: row["sender_private_mib"] - row["cache_mib"], default=None)
    if worst is not None:
        over = worst["sender_private_mib"] - worst["cache_mib"]
        flag = "" if over <= PRIVATE_TARGET_MIB else "  ABOVE TARGET"
        lines.append(
            f"  sender private memory: at most {over:.0f} MiB over its cache ({worst['kind']} "
            f"{worst['size_mib']} MiB {worst['tracking']}; target <= {PRIVATE_TARGET_MIB}){flag}"
        )
    for row in r["rows"]:
        parts = ", ".join(f"{k.removesuffix('_ms')} {v:.0f}" for k, v in row["downtime_breakdown"].items())
        lines.append(f"  {row['kind']} {row['size_mib']} MiB {row['tracking']} downtime parts (ms): {parts}")
    lines.extend(f"  skipped {why}" for why in r.get("skipped", ()))
    return "\n".join(lines)


def run_experiment(progress=None, bandwidths=("2M", "8M", "32M", "unlimited"), max_iterations: int = 3) -> dict:
    """The XBZRLE experiment on a live process (see migrated._tools.loadgen)."""
    from migrated._tools import loadgen

    note = progress or (lambda msg: None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="migrated-exp-") as tmpdir:
        tmp = Path(tmpdir)
        receiver = ReceiverProcess(tmp / "images", tmp / "receiver.log")
        try:
            for bw in bandwidths:
                for xbzrle in (True, False):
                    gen = loadgen.start()
                    try:
                        args = ["--downtime-limit", "300ms", "--max-iterations", str(max_iterations), "--after", "kill"]
                        if bw != "unlimited":
                            args += ["--max-bandwidth", bw]
                        if not xbzrle:
                            args.append("--no-xbzrle")
                        s = migrate_cli(receiver, f"pid:{gen.pid}", f"exp-{bw}-{int(xbzrle)}", *args)
                    finally:
                        gen.kill()
                    row = {
                        "bandwidth": bw,
                        "xbzrle": xbzrle,
                        "status": s["status"],
                        "converged": s["converged"],
                        "passes": s["iterations"],
                        "wire_bytes": s["ram"]["transferred_bytes"],
                        "total_ms": s["total_time_ms"],
                        "downtime_ms": s["downtime_ms"],
                    }
                    rows.append(row)
                    note(f"experiment {bw} xbzrle={xbzrle}: {row}")
                    _remove_image(receiver.dir / f"exp-{bw}-{int(xbzrle)}")
            slowdown = loadgen_slowdown(receiver)
        finally:
            receiver.stop()
    return {"loadgen": loadgen.describe(), "max_iterations": max_iterations, "rows": rows, "slowdown": slowdown}


def loadgen_slowdown(receiver: ReceiverProcess, seconds: float = 2.0) -> dict:
    """Loops per second of the load generator alone, then while migrated
    reads and scans it (XBZRLE on, 8M cap, passes forced to keep going)."""
    from migrated._tools import loadgen

    gen = loadgen.start()
    try:
        alone = gen.loops_per_second(seconds)
        proc = subprocess.Popen(
            [
                *CLI,
                "send",
                "--source",
                f"pid:{gen.pid}",
                "--to",
                receiver.address,
                "--name",
                "slowdown",
                "--max-bandwidth",
                "8M",
                "--downtime-limit",
                "0ms",
                "--max-iterations",
                "1000",
                "--after",
                "resume",
                "--json",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(3.0)  # past pass 0: measure during the dirty passes
        during = gen.loops_per_second(seconds)
        proc.send_signal(2)
        proc.wait(timeout=60)
    finally:
        gen.kill()
    return {"alone_loops_per_s": alone, "during_loops_per_s": during, "slowdown": 1 - during / alone}


def format_experiment(r: dict) -> str:
    lines = [
        f"XBZRLE experiment: {r['loadgen']}, by pid, downtime limit 300 ms, at most {r['max_iterations']} passes",
        f"  {'bandwidth':<10} {'xbzrle':<6} {'converged':<9} {'passes':>6} {'wire MiB':>9} {'total s':>8} "
        f"{'downtime ms':>11}",
    ]
    for row in r["rows"]:
        lines.append(
            f"  {row['bandwidth']:<10} {'on' if row['xbzrle'] else 'off':<6} {str(row['converged']):<9} "
            f"{row['passes']:>6} {row['wire_bytes'] / MiB:>9.1f} {row['total_ms'] / 1000:>8.2f} "
            f"{row['downtime_ms'] if row['downtime_ms'] is not None else '-':>11}"
        )
    s = r["slowdown"]
    lines.append(
        f"  load generator: {s['alone_loops_per_s']:.0f} loops/s alone, {s['during_loops_per_s']:.0f} during a "
        f"migration ({s['slowdown']:+.1%} slower)"
    )
    return "\n".join(lines)
