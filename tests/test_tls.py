"""Mutual TLS and per-image authorisation, with certificates made at test
time (trustme), over loopback TCP: in-process daemons for the matrix of
good and bad certificates, and the CLI for the options and start-up rules."""

from __future__ import annotations

import datetime
import json
import ssl
import subprocess

import pytest
import trio
import trustme
from daemons import make_image, running_receiver
from structlog.testing import capture_logs

from migrated._tools.localrun import CLI, ReceiverProcess
from migrated.cli import _migrate
from migrated.errors import MigrationError, PeerError, TlsSetupError
from migrated.sender import SendConfig, Sender
from migrated.source import FileSource
from migrated.tls import Allow, TlsFiles, client_context, identities, server_context

MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, the receiver's certificate (127.0.0.1 and dest.example), a
    sender's (two DNS names and a common name), a sender's from another CA,
    an expired one, and a receiver's for another host only."""
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    leaves = {
        "receiver": ca.issue_cert("127.0.0.1", "dest.example"),
        "sender": ca.issue_cert("sender.example", "sender2.example", common_name="sender-cn"),
        "intruder": other.issue_cert("sender.example"),
        "expired": ca.issue_cert("sender.example", not_before=past, not_after=past + datetime.timedelta(days=1)),
        "elsewhere": ca.issue_cert("dest.example"),
    }
    paths = {"ca": d / "ca.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    for name, leaf in leaves.items():
        cert, key = d / f"{name}.pem", d / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        paths[name] = cert
        paths[f"{name}-key"] = key
    return {k: str(v) for k, v in paths.items()}


def receiver_tls(pki, leaf: str = "receiver", ca: bool = True) -> ssl.SSLContext:
    return server_context(TlsFiles(pki[leaf], pki[f"{leaf}-key"], pki["ca"] if ca else None))


def sender_tls(pki, leaf: str | None = "sender") -> ssl.SSLContext:
    if leaf is None:
        return client_context(TlsFiles(ca=pki["ca"]))
    return client_context(TlsFiles(pki[leaf], pki[f"{leaf}-key"], pki["ca"]))


async def send(port: int, src, name: str, tls, hostname: str | None = None) -> tuple[Sender, dict | None]:
    sender = Sender(FileSource(str(src)), SendConfig(name=name, timeout=10))
    source = sender.source
    try:
        with trio.fail_after(30):
            await _migrate(sender, source, ("127.0.0.1", port), f"127.0.0.1:{port}", tls, hostname)
    except MigrationError as exc:
        exc.sender = sender  # type: ignore[attr-defined]  # for what it did before failing
        raise
    finally:
        source.close()
    from migrated.report import summary

    return sender, summary(sender)


async def test_mutual_tls_migrates_and_verifies(tmp_path, pki):
    src = tmp_path / "src.img"
    data = make_image(src, 1 * MiB)
    images = tmp_path / "images"
    async with running_receiver(images, tls=receiver_tls(pki)) as rx:
        _, s = await send(rx.port, src, "vm1", sender_tls(pki))
    assert s["status"] == "completed" and s["verified"] is True and s["receiver_authenticated"] == "tls"
    block = json.loads((images / "vm1" / "manifest.json").read_text())["blocks"][0]
    assert (images / "vm1" / block["file"]).read_bytes() == data


@pytest.mark.parametrize(
    ("leaf", "says"),
    [
        (None, "did not return a certificate"),
        ("intruder", "unable to get local issuer certificate"),
        ("expired", "certificate has expired"),
    ],
    ids=["no-client-certificate", "another-ca", "expired"],
)
async def test_a_client_certificate_the_receiver_cannot_verify_is_refused(tmp_path, pki, leaf, says):
    """The receiver says why in its log; TLS 1.3 does not carry it to the
    sender, which says what it knows: the receiver refused its certificate."""
    src = tmp_path / "src.img"
    make_image(src, 256 << 10)
    images = tmp_path / "images"
    with capture_logs() as logs:
        async with running_receiver(images, tls=receiver_tls(pki)) as rx:
            with pytest.raises(TlsSetupError, match="did not accept this sender's certificate") as info:
                await send(rx.port, src, "vm1", sender_tls(pki, leaf))
            await _until(lambda: rx.failed == 1)
    assert info.value.sender.passes == []
    (failed,) = [e for e in logs if e["event"] == "fail_migration" and e.get("code") == "tls" and "error" in e]
    assert says in failed["error"].lower()
    assert not (images / "vm1").exists()


async def _until(cond, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


async def test_an_authenticated_client_is_admitted_only_for_the_names_it_is_allowed(tmp_path, pki):
    src = tmp_path / "src.img"
    make_image(src, 256 << 10)
    images = tmp_path / "images"
    allow = (Allow.parse("sender.example:vm-*"), Allow.parse("sender2.example:db-1"))
    async with running_receiver(images, tls=receiver_tls(pki), tls_allow=allow) as rx:
        for name in ("vm-1", "db-1"):
            _, s = await send(rx.port, src, name, sender_tls(pki))
            assert s["verified"], name
        with pytest.raises(PeerError) as info:
            await send(rx.port, src, "db-2", sender_tls(pki))
        assert info.value.code == "forbidden" and "'db-2'" in str(info.value)
    assert not (images / "db-2").exists() and (images / "vm-1").is_symlink()


async def test_a_subject_not_in_the_allow_list_is_forbidden_before_any_page_moves(tmp_path, pki):
    src = tmp_path / "src.img"
    make_image(src, 256 << 10)
    async with running_receiver(tmp_path / "images", tls=receiver_tls(pki), tls_allow=(Allow("other"),)) as rx:
        with pytest.raises(PeerError) as info:
            await send(rx.port, src, "vm1", sender_tls(pki))
    assert info.value.code == "forbidden" and "'sender.example'" in str(info.value) and "--tls-allow" in str(info.value)
    assert info.value.sender.passes == [] and info.value.sender.transferred < 4096  # no page moved


async def test_the_receiver_certificate_must_match_the_host_or_tls_hostname(tmp_path, pki):
    src = tmp_path / "src.img"
    make_image(src, 256 << 10)
    async with running_receiver(tmp_path / "images", tls=receiver_tls(pki, "elsewhere")) as rx:
        with pytest.raises(TlsSetupError, match="(?i)hostname mismatch|doesn't match|certificate verify failed"):
            await send(rx.port, src, "vm1", sender_tls(pki))
        _, s = await send(rx.port, src, "vm1", sender_tls(pki), hostname="dest.example")
    assert s["verified"] and s["receiver_authenticated"] == "tls"


async def test_a_plain_sender_to_a_tls_receiver_is_told_in_the_clear(tmp_path, pki):
    src = tmp_path / "src.img"
    make_image(src, 256 << 10)
    async with running_receiver(tmp_path / "images", tls=receiver_tls(pki)) as rx:
        with trio.fail_after(10), pytest.raises(PeerError) as info:
            await send(rx.port, src, "vm1", None)
    assert info.value.code == "tls" and "requires TLS" in str(info.value)


def test_a_peer_speaking_tls_where_the_preamble_belongs_is_named():
    from migrated.protocol import Connection, Role

    conn = Connection(Role.SENDER)
    conn.receive_data(bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]))  # a TLS alert
    with pytest.raises(MigrationError, match="speaks TLS"):
        conn.next_event()


async def test_a_tls_sender_to_a_plain_receiver_fails_fast_with_a_hint(tmp_path, pki):
    src = tmp_path / "src.img"
    make_image(src, 256 << 10)
    async with running_receiver(tmp_path / "images") as rx:
        with trio.fail_after(10), pytest.raises(TlsSetupError, match="without TLS"):
            await send(rx.port, src, "vm1", sender_tls(pki))


def test_allow_entries_and_certificate_identities():
    assert Allow.parse("sender.example") == Allow("sender.example", "*")
    assert Allow.parse("sender.example:vm-*") == Allow("sender.example", "vm-*")
    assert Allow.parse("spiffe://example.org/sender:vm-?") == Allow("spiffe://example.org/sender", "vm-?")
    assert Allow.parse("spiffe://example.org/sender") == Allow("spiffe://example.org/sender", "*")
    assert Allow.parse("https://ci.example:8443/runner") == Allow("https://ci.example:8443/runner", "*")
    assert Allow.parse("urn:uuid:6e8b:*") == Allow("urn:uuid:6e8b", "*")
    for bad in ("", ":vm", "host:"):
        with pytest.raises(ValueError, match="use SUBJECT or SUBJECT:NAME-GLOB"):
            Allow.parse(bad)
    cert = {
        "subject": ((("organizationName", "o"),), (("commonName", "cn1"),)),
        "subjectAltName": (("DNS", "a.example"), ("URI", "spiffe://x/y"), ("IP Address", "10.0.0.1")),
    }
    ids = identities(cert)
    assert ids == ["a.example", "spiffe://x/y"]  # with names, the CN is not read (RFC 6125)
    assert identities({"subject": cert["subject"]}) == ["cn1"]
    assert Allow("spiffe://x/y", "vm*").admits(ids, "vm1") and not Allow("spiffe://x/y", "vm*").admits(ids, "db")
    assert not Allow("10.0.0.1").admits(ids, "vm1") and identities(None) == []


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_off_loopback_the_receiver_needs_mutual_tls_or_insecure(tmp_path, pki):
    r = _cli("receive", "--listen", "0.0.0.0:0", "--dir", str(tmp_path / "a"))
    assert r.returncode == 2 and "needs mutual TLS" in r.stderr
    r = _cli("receive", "--listen", "127.0.0.1:0", "--dir", str(tmp_path / "a"), "--tls-allow", "x")
    assert r.returncode == 2 and "--tls-allow needs --tls-ca" in r.stderr
    r = _cli("send", "--source", "file:/x", "--to", "127.0.0.1:1", "--name", "n", "--tls-hostname", "h")
    assert r.returncode == 2 and "--tls-hostname needs TLS" in r.stderr
    r = _cli("receive", "--dir", str(tmp_path / "a"), "--tls-cert", pki["receiver"], "--tls-key", "/nonexistent")
    assert r.returncode == 2 and "cannot load the TLS files" in r.stderr


def test_an_insecure_receiver_off_loopback_starts_and_warns(tmp_path):
    proc = subprocess.Popen(
        [*CLI, "receive", "--listen", "0.0.0.0:0", "--dir", str(tmp_path / "a"), "--insecure", "--log-format", "json"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = json.loads(proc.stderr.readline())
        assert first["event"] == "listen_insecure" and first["level"] == "warning"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_mutual_tls_through_the_cli(tmp_path, pki):
    """`migrated receive` and `migrated send` as subprocesses, with an allow-list."""
    src = tmp_path / "src.img"
    data = make_image(src, 1 * MiB)
    rx = ReceiverProcess(
        tmp_path / "images",
        tmp_path / "rx.log",
        *("--tls-cert", pki["receiver"], "--tls-key", pki["receiver-key"], "--tls-ca", pki["ca"]),
        *("--tls-allow", "sender.example:vm*"),
    )
    try:
        tls = ("--tls-cert", pki["sender"], "--tls-key", pki["sender-key"], "--tls-ca", pki["ca"])
        ok = _cli("send", "--source", f"file:{src}", "--to", rx.address, "--name", "vm1", "--json", *tls)
        assert ok.returncode == 0, ok.stderr
        s = json.loads(ok.stdout)
        assert s["verified"] and s["receiver_authenticated"] == "tls"
        bad = _cli("send", "--source", f"file:{src}", "--to", rx.address, "--name", "db1", *tls)
        assert bad.returncode == 1 and "forbidden" in bad.stderr
        plain = _cli("send", "--source", f"file:{src}", "--to", rx.address, "--name", "vm2")
        assert plain.returncode == 1 and "requires TLS" in plain.stderr
    finally:
        rx.stop()
    block = json.loads((tmp_path / "images" / "vm1" / "manifest.json").read_text())["blocks"][0]
    assert (tmp_path / "images" / "vm1" / block["file"]).read_bytes() == data


async def _tls_pair(pki):
    from migrated.tlsstream import TLSStream

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    raw_client = await trio.open_tcp_stream("127.0.0.1", port)
    raw_server = await listeners[0].accept()
    client = TLSStream(raw_client, sender_tls(pki, None), server_hostname="127.0.0.1")
    server = TLSStream(raw_server, receiver_tls(pki, ca=False), server_side=True)
    async with trio.open_nursery() as n:
        n.start_soon(client.do_handshake)
        n.start_soon(server.do_handshake)
    return client, server


async def test_an_answer_is_read_while_another_task_is_stuck_sending(pki):
    """The sender reads ACKs while it writes pages: a read must not wait
    behind a writer blocked on a full socket, nor lose what it decrypted
    when its deadline cancels it (found by review)."""
    client, server = await _tls_pair(pki)
    got = []
    async with trio.open_nursery() as n:
        n.start_soon(client.send_all, b"\0" * (64 << 20))  # the peer reads none of it for now
        await trio.sleep(0.5)
        n.start_soon(client.send_all, b"LAST!")  # waits for the socket behind the first
        await server.send_all(b"ACK1")
        with trio.move_on_after(3):
            buf = memoryview(bytearray(100))
            got.append(bytes(buf[: await client.receive_into(buf)]))
        assert got == [b"ACK1"]
        left = (64 << 20) + 5
        buf = memoryview(bytearray(1 << 20))
        while left:
            left -= await server.receive_into(buf)
        n.cancel_scope.cancel()


async def test_a_send_cancelled_part_way_breaks_the_stream(pki):
    """Its records left TLS: what followed would fail the peer's MAC check
    (found by review); the stream says it is broken instead."""
    client, _ = await _tls_pair(pki)
    with trio.move_on_after(0.5):
        await client.send_all(b"\0" * (64 << 20))  # nobody reads: cancelled in the socket
    with pytest.raises(trio.BrokenResourceError, match="cancelled part way"):
        await client.send_all(b"more")


async def test_a_closed_or_half_closed_peer_reads_as_end_of_stream(pki):
    """close_notify is an end of stream, not a wait (send_eof) nor an error
    (aclose), found by review."""
    for close in ("send_eof", "aclose"):
        client, server = await _tls_pair(pki)
        await server.send_all(b"bye")
        await getattr(server, close)()
        buf = memoryview(bytearray(100))
        with trio.fail_after(3):
            got = [bytes(buf[: await client.receive_into(buf)]) for _ in range(2)]
        assert got == [b"bye", b""], close
        await client.aclose()
        await server.aclose()
