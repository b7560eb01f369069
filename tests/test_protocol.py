"""The protocol state machine without sockets: two Connections fed each
other's bytes, whole, one byte at a time, and with garbage."""

from __future__ import annotations

import struct

import pytest

from migrated.cache import PageCache
from migrated.errors import (
    LocalProtocolError,
    PeerError,
    ProtocolError,
    RecordError,
    RemoteProtocolError,
    VersionError,
    error_side,
)
from migrated.pages import page_range
from migrated.protocol import (
    NEED_DATA,
    PREAMBLE,
    Ack,
    BlockList,
    Committed,
    Complete,
    Connection,
    EndOfPass,
    Failure,
    Hello,
    Role,
    State,
    Verified,
    Welcome,
    negotiate,
)
from migrated.records import Applier, BlockInfo, encode_batch


def memory_sink(*blocks: tuple[bytes, bytearray]) -> Applier:
    """A page sink over plain memory: the protocol needs no file or mapping."""
    sink = Applier(4096)
    sink.set_blocks(list(blocks))
    return sink


def events(conn: Connection, data: bytes, step: int | None = None) -> list:
    """Feed ``data`` (in pieces of ``step``) and collect every event."""
    out = []
    step = step or len(data) or 1
    for i in range(0, len(data), step):
        conn.receive_data(data[i : i + step])
        while (ev := conn.next_event()) is not NEED_DATA:
            out.append(ev)
    return out


def test_golden_bytes():
    assert PREAMBLE == b"MIGRATED\x00\x00\x00\x01"
    s = Connection(Role.SENDER)
    hello = s.send(Hello("vm1", 4096, ("xbzrle",), "file:/x"))
    body = b'{"version":1,"page_size":4096,"capabilities":["xbzrle"],"name":"vm1","source":"file:/x"}'
    assert hello == PREAMBLE + struct.pack(">QBI", 0x80, 1, len(body)) + body
    r = Connection(Role.RECEIVER)
    assert r.send(Welcome(("xbzrle",))) == PREAMBLE + struct.pack(">QBI", 0x80, 2, 27) + b'{"capabilities":["xbzrle"]}'
    s.state = State.RUNNING
    assert s.send(EndOfPass(3)) == bytes.fromhex("0000000000000010 00000003")
    assert s.send(BlockList((BlockInfo("ram", 8192, 4096),))) == bytes.fromhex(
        "0000000000000004 00000001 03 72616d 0000000000002000 00001000 0000"
    )


def _migration_bytes(block: bytearray, passes: int = 2):
    """Sender-side bytes of a whole migration of ``block``, plus the expected digest."""
    from migrated.pages import image_digest

    s = Connection(Role.SENDER)
    out = s.send(Hello("vm", 4096))
    s.receive_data(Connection(Role.RECEIVER).send(Welcome(("xbzrle",))))
    assert isinstance(s.next_event(), Welcome)
    info = BlockInfo("ram", len(block), 4096)
    out += s.send(BlockList((info,)))
    cache = PageCache(1 << 20)
    hashes = __import__("array").array("Q", bytes(8 * info.pages))
    for p in range(passes):
        data, _ = encode_batch(cache, 1, b"ram", block, page_range(0, info.pages), first_pass=(p == 0), hashes=hashes)
        out += data + s.send(EndOfPass(p))
        block[p * 100] ^= 0x5A  # a change for the next pass
    digest = image_digest([("ram", len(block), hashes)])
    out += s.send(Complete(digest))
    return out, digest


@pytest.mark.parametrize("step", [None, 1, 7, 4105])
def test_receiver_applies_a_whole_migration_in_any_chunking(step):
    block = bytearray(__import__("os").urandom(5 * 4096))
    wire, digest = _migration_bytes(block)
    r = Connection(Role.RECEIVER)
    target = bytearray(5 * 4096)
    sink = memory_sink((b"ram", target))
    got = []
    for i in range(0, len(wire), step or len(wire)):
        r.receive_data(wire[i : i + (step or len(wire))])
        while (ev := r.next_event()) is not NEED_DATA:
            got.append(ev)
            if isinstance(ev, Hello):
                r.send(Welcome(negotiate(ev.capabilities, ("xbzrle",))))
            elif isinstance(ev, BlockList):
                r.set_page_sink(sink)
    kinds = [type(e).__name__ for e in got]
    assert kinds == ["Hello", "BlockList", "EndOfPass", "EndOfPass", "Complete"]
    assert got[-1].digest == digest
    # pass 1 went as XBZRLE and sent the page as it was before the pass-1 change
    assert sink.xbzrle_pages == 1 and sink.position == len(wire)  # it kept count of the stream
    expected = bytearray(block)
    expected[100] ^= 0x5A
    assert target == expected
    assert r.send(Ack(1)) and r.send(Committed(digest))
    assert r.state is State.DONE


def test_sender_side_events():
    s = Connection(Role.SENDER)
    s.send(Hello("vm", 4096))
    r = Connection(Role.RECEIVER)
    wire = r.send(Welcome(())) + r.frame(Ack(0, 123))
    got = events(s, wire, step=1)
    assert got == [Welcome(()), Ack(0, 123)]
    s.send(Complete("d"))
    assert events(s, r.frame(Ack(1)) + r.frame(Committed("d", "/x"))) == [Ack(1), Committed("d", "/x")]
    assert s.state is State.DONE


def test_verified_only_with_its_capability_and_committed_timings_checked():
    from migrated.records import Control, frame_control

    def completing(caps):
        s = Connection(Role.SENDER)
        s.send(Hello("vm", 4096))
        events(s, Connection(Role.RECEIVER).send(Welcome(caps)))
        s.send(Complete("d"))
        return s

    r = Connection(Role.RECEIVER)
    r.send(Welcome(("verified",)))
    wire = r.frame(Verified("d")) + r.frame(Committed("d", "/x", {"digest": 1.5, "sync": 20.0}))
    assert events(completing(("verified",)), wire) == [
        Verified("d"),
        Committed("d", "/x", {"digest": 1.5, "sync": 20.0}),
    ]
    # a receiver must not send VERIFIED to a sender that did not ask for it, nor say it early
    with pytest.raises(RemoteProtocolError, match="without the verified capability"):
        events(completing(()), r.frame(Verified("d")))
    with pytest.raises(LocalProtocolError, match="not negotiated"):
        Connection(Role.RECEIVER).send(Verified("d"))
    s = Connection(Role.SENDER)
    s.send(Hello("vm", 4096))
    events(s, Connection(Role.RECEIVER).send(Welcome(("verified",))))
    with pytest.raises(RemoteProtocolError, match="Verified from the receiver is not allowed in state RUNNING"):
        events(s, r.frame(Verified("d")))
    for hostile in ([1], {"sync": -1}, {"sync": float("nan")}, {"x" * 40: 1}, {str(i): 1 for i in range(17)}):
        bad = frame_control(Control.COMMITTED, {"digest": "d", "timings": hostile})
        with pytest.raises(RemoteProtocolError, match="timings|NaN is not JSON"):
            events(completing(()), bad)


def test_ack_reports_the_receivers_flush_and_older_acks_still_parse():
    from migrated.records import Control, frame_control

    def sender_after_pass_0():
        s = Connection(Role.SENDER)
        s.send(Hello("vm", 4096))
        events(s, Connection(Role.RECEIVER).send(Welcome(())))
        return s

    r = Connection(Role.RECEIVER)
    r.send(Welcome(()))
    assert events(sender_after_pass_0(), r.frame(Ack(2, 10, 4096, 12.5))) == [Ack(2, 10, 4096, 12.5)]
    # an ACK without the flush fields (a receiver from before them)
    old = frame_control(Control.ACK, {"pass": 0, "received_bytes": 7})
    assert events(sender_after_pass_0(), old) == [Ack(0, 7, 0, 0.0)]
    bad = frame_control(Control.ACK, {"pass": 0, "received_bytes": 7, "flush_ms": "soon"})
    with pytest.raises(RemoteProtocolError, match="'flush_ms' must be int or float"):
        events(sender_after_pass_0(), bad)
    for huge in ({"flush_ms": 10**400}, {"flush_ms": 5, "hash_ms": 10**400}):  # float() overflows: still the peer's
        bad = frame_control(Control.ACK, {"pass": 0, "received_bytes": 7, **huge})
        with pytest.raises(RemoteProtocolError, match="malformed ACK"):
            events(sender_after_pass_0(), bad)
    for hostile in ({"flushed_pages": -1}, {"received_bytes": 1 << 64}, {"flush_ms": -5.0}, {"flush_ms": 1e308}):
        bad = frame_control(Control.ACK, {"pass": 0, "received_bytes": 7, **hostile})
        with pytest.raises(RemoteProtocolError, match="non-negative and finite"):
            events(sender_after_pass_0(), bad)


def test_out_of_order_events_are_refused_both_ways():
    # our own misuse is our fault: the operator's reason must not blame the peer
    for event in (Complete("x"), EndOfPass(0)):
        with pytest.raises(LocalProtocolError, match="not allowed in state HANDSHAKE") as info:
            Connection(Role.SENDER).send(event)
        assert not isinstance(info.value, RemoteProtocolError)
        assert error_side(info.value, "sender", "receiver") == "sender"
    r = Connection(Role.RECEIVER)
    wire = PREAMBLE + Connection.frame(Complete("x"))
    with pytest.raises(RemoteProtocolError, match="Complete from the sender is not allowed") as info:
        events(r, wire)
    assert not isinstance(info.value, LocalProtocolError)
    assert error_side(info.value, "receiver", "sender") == "sender"


def test_a_page_size_the_codec_cannot_serve_is_refused_both_ways():
    with pytest.raises(LocalProtocolError, match="page size 1000"):
        Connection(Role.SENDER).send(Hello("vm", 1000))
    for hostile in (1 << 20, 1 << 70, -4096, 0):  # 2^70 does not fit a C integer: still the peer's fault
        wire = PREAMBLE + Connection.frame(Hello("vm", hostile))
        with pytest.raises(RemoteProtocolError, match=f"^page size {hostile} is not supported"):
            events(Connection(Role.RECEIVER), wire)


def test_preamble_checks():
    with pytest.raises(RemoteProtocolError, match="bad magic"):
        events(Connection(Role.RECEIVER), b"GET / HTTP/1.1\r\n")
    with pytest.raises(RemoteProtocolError, match="bad magic"):
        events(Connection(Role.RECEIVER), b"X")  # caught at the first byte
    with pytest.raises(VersionError, match="version 2"):
        events(Connection(Role.RECEIVER), b"MIGRATED\x00\x00\x00\x02")
    assert events(Connection(Role.RECEIVER), b"MIGRATED\x00\x00") == []  # incomplete: wait


def test_error_from_the_peer_is_raised_with_its_code():
    s = Connection(Role.SENDER)
    s.send(Hello("vm", 4096))
    wire = Connection(Role.RECEIVER).farewell(Failure("busy", "name in use"))
    with pytest.raises(PeerError, match="name in use") as info:
        events(s, wire)
    assert info.value.code == "busy" and s.state is State.FAILED


def test_malformed_control_messages():
    r = Connection(Role.RECEIVER)
    bad = PREAMBLE + struct.pack(">QBI", 0x80, 1, 2) + b"[]"
    with pytest.raises(RemoteProtocolError, match="not a JSON object"):
        events(r, bad)
    r = Connection(Role.RECEIVER)
    bad = PREAMBLE + struct.pack(">QBI", 0x80, 1, 9) + b'{"x": 1}x'
    with pytest.raises(RemoteProtocolError, match="not JSON"):
        events(r, bad)
    r = Connection(Role.RECEIVER)
    bad = PREAMBLE + struct.pack(">QBI", 0x80, 1, 200 << 20)
    with pytest.raises(RemoteProtocolError, match="declares"):  # refused before buffering the body
        events(r, bad)
    r = Connection(Role.RECEIVER)
    bad = PREAMBLE + struct.pack(">QBI", 0x80, 1, 2) + b"{}"
    with pytest.raises(RemoteProtocolError, match="malformed HELLO"):
        events(r, bad)


def test_xbzrle_records_refused_unless_negotiated():
    block = bytearray(__import__("os").urandom(4096))
    wire, _ = _migration_bytes(block)
    r = Connection(Role.RECEIVER)
    r.receive_data(wire)
    with pytest.raises(RecordError, match="not negotiated"):
        while (ev := r.next_event()) is not NEED_DATA:
            if isinstance(ev, Hello):
                r.send(Welcome(()))  # receiver allows raw only
            elif isinstance(ev, BlockList):
                r.set_page_sink(memory_sink((b"ram", bytearray(4096))))


def test_negotiation():
    assert negotiate(("xbzrle",), ("xbzrle",)) == ("xbzrle",)
    assert negotiate(("xbzrle",), ()) == ()
    assert negotiate((), ("xbzrle",)) == ()
    assert negotiate(("xbzrle", "future"), ("xbzrle", "future")) == ("xbzrle",)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 64))
def test_hostile_bytes_after_the_handshake_only_raise_migration_errors(garbage, step):
    """Whatever follows a valid HELLO and block list, the receiver either
    waits for more, yields events, or raises one of our errors."""
    head = Connection(Role.SENDER).send(Hello("vm", 4096)) + Connection.frame(
        BlockList((BlockInfo("ram", 8192, 4096),))
    )
    r = Connection(Role.RECEIVER)
    target = bytearray(8192)
    guard = bytearray(8192)
    try:
        for i in range(0, len(head + garbage), step):
            r.receive_data((head + garbage)[i : i + step])
            while (ev := r.next_event()) is not NEED_DATA:
                if isinstance(ev, Hello):
                    r.send(Welcome(("xbzrle",)))
                elif isinstance(ev, BlockList):
                    r.set_page_sink(memory_sink((b"ram", target)))
    except (ProtocolError, RecordError, PeerError):
        pass  # any other exception, MigrationError or not, fails the test
    assert guard == bytearray(8192)
