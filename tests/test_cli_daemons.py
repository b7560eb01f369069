"""`migrated receive` and `migrated send` as real subprocesses over loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest
from daemons import image_bytes, make_image, receiver_process, staging_left, state, writer

from migrated._tools import localrun
from migrated._tools.localrun import ReceiverProcess
from migrated.pages import image_digest, page_hashes

MiB = 1 << 20
CLI = localrun.CLI


def send(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "send", *args], capture_output=True, text=True, timeout=timeout)


def start_send(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "send", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_migration_through_the_cli_with_a_paused_writer(tmp_path, receiver):
    src = tmp_path / "src.img"
    initial = make_image(src, 32 * MiB, zero_fraction=0.5)
    with writer(src, "--offset", str(16 * MiB), "--stride", "1024") as w:
        r = send(
            "--source",
            f"file:{src}",
            "--to",
            receiver.address,
            "--name",
            "cli",
            "--pause-pid",
            str(w.pid),
            "--downtime-limit",
            "50ms",
            "--json",
        )
        assert r.returncode == 0, r.stderr
        assert state(w.pid) != "T"  # resumed
    summary = json.loads(r.stdout)
    assert summary["status"] == "completed" and summary["verified"]
    # the summary contract (QEMU's info migrate names)
    assert {
        "status",
        "converged",
        "iterations",
        "total_time_ms",
        "setup_time_ms",
        "downtime_ms",
        "expected_downtime_ms",
        "ram",
        "xbzrle",
        "digest",
        "verified",
    } <= set(summary)
    assert set(summary["ram"]) >= {
        "total_bytes",
        "transferred_bytes",
        "remaining_bytes",
        "zero_pages",
        "normal_pages",
        "normal_bytes",
        "dirty_pages_rate",
        "mbps",
    }
    assert set(summary["xbzrle"]) >= {
        "enabled",
        "cache_size",
        "bytes",
        "pages",
        "cache_miss",
        "cache_miss_rate",
        "encoding_rate",
        "overflow",
        "passes_off",
    }
    assert summary["ram"]["remaining_bytes"] == 0 and summary["ram"]["total_bytes"] == 32 * MiB
    assert summary["ram"]["transferred_bytes"] > 16 * MiB  # at least the random half went raw
    image = image_bytes(receiver.dir, "cli")
    # the digest the sender reported is the image's, computed independently here
    assert image_digest([("ram", len(image), page_hashes(image))]) == summary["digest"]
    # the writer's region differs from the start only at its stride; the rest is untouched
    assert image[: 16 * MiB] == initial[: 16 * MiB]
    changed = {i for i in range(16 * MiB, 32 * MiB, 1024)}
    assert image[16 * MiB + 1 : 16 * MiB + 1024] == initial[16 * MiB + 1 : 16 * MiB + 1024]
    assert any(image[i] != initial[i] for i in changed)
    events = {e["event"] for e in receiver.events()}
    assert {"accept_migration", "apply_pass", "commit_image"} <= events
    line = next(e for e in receiver.events() if e["event"] == "commit_image")
    assert line["migration"] == "cli" and line["peer"].startswith("127.0.0.1:")


def test_human_summary_and_receiver_without_xbzrle(tmp_path):
    rx = receiver_process(tmp_path, "--no-xbzrle")
    try:
        src = tmp_path / "src.img"
        make_image(src, 1 * MiB)
        r = send("--source", f"file:{src}", "--to", rx.address, "--name", "h")
        assert r.returncode == 0, r.stderr
        assert "status:             completed (digest verified by the receiver, loopback)" in r.stdout
        assert "negotiated off by the receiver" in r.stdout
    finally:
        assert rx.stop() == 0  # SIGTERM: a clean exit


@pytest.mark.parametrize(
    ("phase", "event", "count"),
    [
        ("handshake", "accept_migration", 1),
        ("pass 0", "set_blocks", 1),
        ("dirty pass", "apply_pass", 1),
        ("final pass", "apply_pass", 2),  # --max-iterations 2: passes 0 and 1, then the final pass
    ],
)
def test_receiver_killed_in_any_phase_and_restarted_loses_nothing(tmp_path, phase, event, count):
    """SIGKILL of the receiver at a phase of a migration: the sender fails
    with a network error, its writer runs again, the restarted receiver
    removes the staging left behind and still holds the previous image, and
    a retry commits."""
    rx = receiver_process(tmp_path)
    src = tmp_path / "src.img"
    first = make_image(src, 1 * MiB, seed=3)
    assert send("--source", f"file:{src}", "--to", rx.address, "--name", "k").returncode == 0
    make_image(src, 8 * MiB)
    count += sum(1 for e in rx.events() if e.get("event") == event)  # the first migration's
    with writer(src, "--stride", "4096") as w:
        p = start_send(
            *("--source", f"file:{src}", "--to", rx.address, "--name", "k", "--pause-pid", str(w.pid)),
            *("--max-bandwidth", "4M", "--downtime-limit", "1ms", "--timeout", "5s", "--max-iterations", "2"),
        )
        deadline = time.monotonic() + 60
        while sum(1 for e in rx.events() if e.get("event") == event) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        rx.proc.kill()
        rx.proc.wait()
        out, err = p.communicate(timeout=60)
        assert p.returncode == 1, err
        assert err.strip().splitlines()[-1].startswith("migrated: send failed (network):")
        assert state(w.pid) != "T"
    again = ReceiverProcess(rx.dir, tmp_path / "again.log")
    try:
        # the staging made at HELLO: the restart removes it
        assert again.wait_for("remove_stale_staging")["entries"], phase
        assert staging_left(rx.dir) == [] and image_bytes(rx.dir, "k") == first
        assert send("--source", f"file:{src}", "--to", again.address, "--name", "k").returncode == 0
        assert image_bytes(rx.dir, "k") == src.read_bytes()
    finally:
        again.stop()


def test_receiver_killed_between_complete_and_committed_leaves_one_whole_image(tmp_path):
    """SIGKILL right after the sender said COMPLETE (its send_final_pass
    line): the receiver may or may not have committed. Either way the name
    holds one whole image, old or new, the restart leaves no staging, the
    writer runs again, and the sender's exit says whether it knows."""
    rx = receiver_process(tmp_path, "--stage-in-memory")
    src = tmp_path / "src.img"
    first = make_image(src, 1 * MiB, seed=3)
    assert send("--source", f"file:{src}", "--to", rx.address, "--name", "k").returncode == 0
    make_image(src, 32 * MiB, seed=4)
    with writer(src, "--stride", "4096", "--sweeps", "1") as w:
        p = start_send(
            *("--source", f"file:{src}", "--to", rx.address, "--name", "k", "--pause-pid", str(w.pid)),
            *("--log-format", "json", "--timeout", "5s"),
        )
        assert p.stderr is not None
        for line in p.stderr:
            if '"send_final_pass"' in line:
                rx.proc.kill()
                break
        rx.proc.wait()
        out, err = p.communicate(timeout=60)
        assert p.returncode in (0, 1), err
        if p.returncode == 1:
            assert err.strip().splitlines()[-1].startswith("migrated: send failed (network):")
        assert state(w.pid) != "T"
        final = src.read_bytes()  # the writer is done after its one sweep
    again = ReceiverProcess(rx.dir, tmp_path / "again.log")
    try:
        assert staging_left(rx.dir) == []
        assert image_bytes(rx.dir, "k") in (first, final)
    finally:
        again.stop()


def test_sender_killed_mid_migration_keeps_the_previous_image(tmp_path, receiver):
    src = tmp_path / "src.img"
    first = make_image(src, 2 * MiB, seed=1)
    assert send("--source", f"file:{src}", "--to", receiver.address, "--name", "vm").returncode == 0
    make_image(src, 16 * MiB, seed=2)
    p = start_send("--source", f"file:{src}", "--to", receiver.address, "--name", "vm", "--max-bandwidth", "4M")
    deadline = time.monotonic() + 20
    while not staging_left(receiver.dir) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert staging_left(receiver.dir)
    p.kill()
    p.wait()
    receiver.wait_for("remove_staging")
    assert staging_left(receiver.dir) == []
    assert image_bytes(receiver.dir, "vm") == first
    # still serving
    small = tmp_path / "small.img"
    data = make_image(small, 1 * MiB, seed=3)
    assert send("--source", f"file:{small}", "--to", receiver.address, "--name", "vm").returncode == 0
    assert image_bytes(receiver.dir, "vm") == data


def test_sigint_cancels_and_resumes_the_writer(tmp_path, receiver):
    src = tmp_path / "src.img"
    make_image(src, 16 * MiB)
    with writer(src, "--stride", "4096") as w:
        p = start_send(
            "--source",
            f"file:{src}",
            "--to",
            receiver.address,
            "--name",
            "c",
            "--pause-pid",
            str(w.pid),
            "--max-bandwidth",
            "4M",
            "--json",
        )
        receiver.wait_for("set_blocks")
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 3, err
        assert json.loads(out)["status"] == "cancelled"
        assert "cancelled" in err.strip().splitlines()[-1]
        assert state(w.pid) != "T"
    receiver.wait_for("remove_staging")
    assert staging_left(receiver.dir) == []
    # the sender's last gasp reached the receiver: it knows why
    failed = [e for e in receiver.events() if e.get("event") == "fail_migration"]
    assert failed and failed[-1]["code"] == "cancelled"


def test_connection_and_source_errors_exit_1(tmp_path, receiver):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    src = tmp_path / "src.img"
    make_image(src, 64 << 10)
    r = send("--source", f"file:{src}", "--to", f"127.0.0.1:{free}", "--name", "x", "--timeout", "5s")
    assert r.returncode == 1
    assert "failed (network): network: cannot connect to the receiver" in r.stderr
    r = send("--source", f"file:{tmp_path}/missing", "--to", receiver.address, "--name", "x")
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = send("--source", f"file:{src}", "--to", receiver.address, "--name", "x", "--pause-pid", "999999999")
    assert r.returncode == 1 and "no process with pid 999999999" in r.stderr


def test_source_file_truncated_during_a_pass_exits_1_and_says_so(tmp_path, receiver):
    """A file cut short while pass 0 reads it: no crash by SIGBUS, but exit
    1 with the sender's source error; the writer runs, nothing committed."""
    src = tmp_path / "src.img"
    make_image(src, 32 * MiB)
    with writer(src, "--length", str(MiB), "--stride", "4096") as w:
        proc = start_send(
            "--source",
            f"file:{src}",
            "--to",
            receiver.address,
            "--name",
            "cut",
            "--pause-pid",
            str(w.pid),
            "--max-bandwidth",
            "8M",
        )
        try:
            receiver.wait_for("set_blocks")  # mapped at 32 MiB; pass 0 takes about 4 s
            time.sleep(0.5)
            os.truncate(src, MiB)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 1, err
        last = err.strip().splitlines()[-1]
        assert "send failed (sender): source: the source shrank while it was being read" in last
        assert state(w.pid) in "RS"
    receiver.wait_for("remove_staging")
    assert staging_left(receiver.dir) == [] and not (receiver.dir / "cut").exists()


def test_port_in_use_and_unwritable_dir(tmp_path, receiver):
    r = subprocess.run(
        [*CLI, "receive", "--listen", receiver.address, "--dir", str(tmp_path / "d2")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1 and "cannot listen" in r.stderr
    (tmp_path / "file").write_text("x")
    r = subprocess.run(
        [*CLI, "receive", "--listen", "127.0.0.1:0", "--dir", str(tmp_path / "file" / "sub")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1 and "cannot write to image directory" in r.stderr


def test_a_second_receiver_on_the_same_directory_refuses_to_start(tmp_path, receiver):
    """It would delete the first one's staging as stale: it exits 1 naming the first."""
    r = subprocess.run(
        [*CLI, "receive", "--listen", "127.0.0.1:0", "--dir", str(receiver.dir)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1, r.stderr
    assert f"is in use by another receiver (pid {receiver.proc.pid})" in r.stderr
    assert receiver.proc.poll() is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "nope", "--to", "h:1", "--name", "n"], "use file:PATH or pid:PID"),
        (["--source", "file:/x", "--to", "nohost", "--name", "n"], "HOST:PORT"),
        (["--source", "file:/x", "--to", "h:1", "--name", "n", "--cache-size", "lots"], "like 64M"),
        (["--source", "file:/x", "--to", "h:1", "--name", "n", "--downtime-limit", "soon"], "like 300ms"),
        (["--source", "file:/x", "--to", "h:1", "--name", "n", "--max-iterations", "0"], "at least 1"),
        (["--source", "file:/x", "--to", "h:1", "--name", "../n"], "not valid"),
        (["--source", "pid:abc", "--to", "h:1", "--name", "n"], "PID must be a number"),
        (["--to", "h:1", "--name", "n"], "--source"),
    ],
)
def test_usage_errors_exit_2(args, message):
    r = send(*args)
    assert r.returncode == 2
    assert message in r.stderr


def test_help_teaches():
    out = subprocess.run([*CLI, "send", "--help"], capture_output=True, text=True).stdout
    for word in ("--max-bandwidth", "exit status", "--pause-pid", "K/M/G", "examples"):
        assert word in out
    out = subprocess.run([*CLI, "receive", "--help"], capture_output=True, text=True).stdout
    assert "--shutdown-grace" in out and "manifest.json" in out


def test_receiver_out_of_space_fails_clearly_and_keeps_serving(tmp_path):
    """A receiver that may not grow files past 1 MiB (RLIMIT_FSIZE) stands in
    for a full disk: the block file cannot be reserved."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    log = tmp_path / "rx.log"
    proc = subprocess.Popen(
        [*CLI, "receive", "--listen", "127.0.0.1:0", "--dir", str(tmp_path / "images"), "--log-format", "json"],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
        preexec_fn=limit,
    )
    try:
        deadline = time.monotonic() + 20
        while '"listen"' not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        listen = next(json.loads(line) for line in log.read_text().splitlines() if '"listen"' in line)
        address = listen["addresses"][0]
        src = tmp_path / "src.img"
        make_image(src, 4 * MiB)
        r = send("--source", f"file:{src}", "--to", address, "--name", "big")
        assert r.returncode == 1
        last = r.stderr.strip().splitlines()[-1]
        assert "failed (receiver): no-space" in last and "not enough space" in last
        assert staging_left(tmp_path / "images") == []
        small = tmp_path / "small.img"
        make_image(small, 256 << 10)
        assert send("--source", f"file:{small}", "--to", address, "--name", "small").returncode == 0
    finally:
        proc.kill()
        proc.wait()


def test_receiver_sigterm_drains_and_a_second_signal_aborts(tmp_path):
    rx = receiver_process(tmp_path, "--shutdown-grace", "60s")
    try:
        src = tmp_path / "src.img"
        make_image(src, 16 * MiB)
        p = start_send("--source", f"file:{src}", "--to", rx.address, "--name", "slow", "--max-bandwidth", "1M")
        rx.wait_for("set_blocks")
        rx.proc.send_signal(signal.SIGTERM)
        rx.wait_for("stop_accepting")
        time.sleep(0.3)
        assert rx.proc.poll() is None, "a running migration holds the receiver for the grace period"
        rx.proc.send_signal(signal.SIGTERM)
        assert rx.proc.wait(timeout=20) == 0
        out, err = p.communicate(timeout=30)
        assert p.returncode == 1
        assert "failed (receiver): shutdown" in err.strip().splitlines()[-1]
        assert staging_left(rx.dir) == []
    finally:
        rx.kill()


def test_a_closed_stdout_does_not_turn_a_committed_migration_into_a_failure(tmp_path, receiver):
    """`migrated send … | head -c1`: the summary cannot be printed, but the
    image is committed: exit 0, the reason on stderr, no traceback."""
    src = tmp_path / "src.img"
    data = make_image(src, 1 * MiB)
    cmd = [*CLI, "send", "--source", f"file:{src}", "--to", receiver.address, "--name", "piped", "--json"]
    sender = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert sender.stdout is not None
    sender.stdout.close()  # the reader went away before the summary
    _, err = sender.communicate(timeout=120)
    assert sender.returncode == 0, err
    assert "stdout was closed; the summary was not printed (status completed)" in err
    assert "Traceback" not in err
    assert image_bytes(receiver.dir, "piped") == data
