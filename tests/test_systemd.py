"""The systemd units and the readiness notification."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from migrated import systemd
from migrated.cli import build_parser

UNITS = Path(__file__).resolve().parent.parent / "systemd"


def unit(name: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def expand(command: str, env: dict[str, str]) -> list[str]:
    """systemd's ${VAR} (one word) and $VAR (split into words) expansion."""
    command = re.sub(r"\$\{(\w+)\}", lambda m: shlex.quote(env[m.group(1)]), command)
    return [w for part in shlex.split(command) for w in ([part] if not part.startswith("$") else env[part[1:]].split())]


def test_receive_unit_is_notify_and_its_command_parses():
    u = unit("migrated-receive.service")
    assert u["Type"] == ["notify"]
    env = dict(e.split("=", 1) for e in u["Environment"])
    argv = expand(u["ExecStart"][0], env)
    assert argv[0].endswith("/migrated")
    args = build_parser().parse_args(argv[1:])
    assert args.command == "receive" and args.listen == "0.0.0.0:7700" and args.log_format == "json"
    # systemd waits longer than the receiver's default shutdown grace
    assert int(u["TimeoutStopSec"][0]) > args.shutdown_grace


def test_send_unit_command_parses():
    u = unit("migrated-send@.service")
    env = {"MIGRATED_SOURCE": "pid:42", "MIGRATED_TO": "h:7700", "MIGRATED_SEND_ARGS": "--max-bandwidth 100M"}
    argv = expand(u["ExecStart"][0].replace("%i", "vm1"), env)
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.source, args.name, args.max_bandwidth, args.json) == (
        "send",
        "pid:42",
        "vm1",
        100 << 20,
        True,
    )


def test_every_hardening_line_says_what_it_costs():
    for name in ("migrated-receive.service", "migrated-send@.service"):
        text = (UNITS / name).read_text()
        for key in ("DynamicUser", "ProtectSystem", "NoNewPrivileges", "MemoryDenyWriteExecute", "AmbientCapabilities"):
            for m in re.finditer(rf"^{key}=", text, re.M):
                before = text[: m.start()].rstrip("\n").splitlines()
                comment = [line for line in before[-3:] if line.startswith("#")]
                assert any("Cost" in line for line in comment), f"{name}: {key} has no cost comment"


@pytest.mark.parametrize("name", ["migrated-receive.service", "migrated-send@.service"])
def test_systemd_analyze_verify(tmp_path, name):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine; the unit parse tests above still ran")
    exe = shutil.which("migrated") or str(Path(sys.executable).with_name("migrated"))
    text = (UNITS / name).read_text().replace("/usr/local/bin/migrated", exe)
    target = tmp_path / name.replace("@", "@test")
    target.write_text(text)
    r = subprocess.run([analyze, "verify", str(target)], capture_output=True, text=True)
    problems = [line for line in r.stderr.splitlines() if target.name in line or "Unknown" in line]
    assert r.returncode == 0 and not problems, r.stderr


def test_notify_without_systemd_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_receiver_tells_systemd_it_is_ready(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(20)
        env = {**os.environ, "NOTIFY_SOCKET": path}
        proc = subprocess.Popen(
            [sys.executable, "-m", "migrated", "receive", "--listen", "127.0.0.1:0", "--dir", str(tmp_path / "i")],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert sock.recv(1024).startswith(b"READY=1")
            proc.terminate()
            assert sock.recv(1024) == b"STOPPING=1"
            assert proc.wait(timeout=20) == 0
        finally:
            proc.kill()
