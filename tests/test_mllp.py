"""The MLLP listener against a real broker (Tansu): ACK only after the durable write.

The server runs in a thread with its own event loop (``MLLPServer.run``), the way the CLI
runs it; clients are plain sockets or ``mllp.send``. Socket timeouts only bound how long a
broken test may hang: no assertion depends on how fast anything is.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from prometheus_client import REGISTRY

from fhirtwin import bus, hl7v2, mllp
from fhirtwin.infra import free_port
from tests.pipeline import blind, read_topic

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "hl7v2"
HOST = "127.0.0.1"


def _examples() -> list[bytes]:
    out: list[bytes] = []
    for path in sorted(EXAMPLES.glob("*.hl7")):
        out += hl7v2.split_batch(path.read_bytes())
    return out


def _adt(control_id: str, mrn: str = "MRN1", extra: bytes = b"") -> bytes:
    return (
        f"MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20260101120000||ADT^A08^ADT_A01|"
        f"{control_id}|P|2.5.1\rEVN|A08|20260101120000\rPID|1||{mrn}^^^HOSP^MR||Doe^Jane\r"
    ).encode() + extra


Started = Callable[..., int]


@pytest.fixture
def serve() -> Iterator[Started]:
    """Start MLLP servers in threads (``serve(bootstrap, limits)`` → port); stop them after."""
    running: list[tuple[threading.Event, threading.Thread]] = []

    def start(bootstrap: str, limits: mllp.Limits = mllp.Limits()) -> int:  # noqa: B008
        server = mllp.MLLPServer(bootstrap, HOST, 0, limits)
        stop, ready, port = threading.Event(), threading.Event(), [0]

        def on_ready(p: int) -> None:
            port[0] = p
            ready.set()

        thread = threading.Thread(target=server.run, args=(stop, on_ready), daemon=True)
        thread.start()
        running.append((stop, thread))
        assert ready.wait(20), "the MLLP server did not start"
        return port[0]

    yield start
    for stop, _ in running:
        stop.set()
    for _, thread in running:
        thread.join(30)
        assert not thread.is_alive(), "the MLLP server did not stop"


def _msh(ack: bytes) -> hl7v2.Segment:
    return hl7v2.parse(ack).segments[0]


def _seg(ack: bytes, name: str) -> hl7v2.Segment:
    segs = hl7v2.parse(ack).segments_named(name)
    assert segs, f"no {name} in {ack!r}"
    return segs[0]


def _msa2(ack: bytes) -> str:
    return _seg(ack, "MSA").value(2)


def _recv_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (timeout = test failure)."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def _acks_in(data: bytes) -> list[bytes]:
    return [part.split(b"\x1c")[0] for part in data.split(b"\x0b")[1:]]


def _read_ack(sock: socket.socket) -> bytes:
    data = b""
    while b"\x1c" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    return _acks_in(data)[0]


def _counter(name: str, code: str) -> float:
    return REGISTRY.get_sample_value(name, {"code": code}) or 0.0


# -- valid messages ----------------------------------------------------------------------


def test_valid_messages_get_aa_after_the_original_bytes_are_in_kafka(
    kafka: str, serve: Started
) -> None:
    port = serve(kafka)
    messages = _examples()
    before = _counter("fhirtwin_mllp_acks_total", "AA")
    acks = mllp.send(HOST, port, messages)

    assert [mllp.ack_code(a) for a in acks] == ["AA"] * len(messages)
    assert _counter("fhirtwin_mllp_acks_total", "AA") - before == len(messages)
    records = {r.value: r for r in read_topic(kafka, bus.RAW_TOPICS["hl7v2"])}
    assert set(records) == set(messages)  # byte-identical, nothing more, nothing less
    for message, ack in zip(messages, acks, strict=True):
        orig = hl7v2.parse(message)
        rec = records[message]
        assert rec.header("fhirtwin-source-kind") == "hl7v2"
        assert rec.header("fhirtwin-control-id") == orig.control_id
        assert rec.header("fhirtwin-peer").startswith("127.0.0.1:")
        assert int(rec.header("fhirtwin-received-at")) > 1_600_000_000_000
        pid = orig.segments_named("PID")
        expected_key = blind(pid[0].value(3)) if pid and pid[0].value(3) else None
        assert rec.key == expected_key
        # A proper ACK: apps/facilities swapped, version and processing id copied.
        a, o = _msh(ack), orig.msh
        assert (a.raw(3), a.raw(4), a.raw(5), a.raw(6)) == (o.raw(5), o.raw(6), o.raw(3), o.raw(4))
        assert a.value(9, 0, 1) == "ACK" and a.value(9, 0, 2) == orig.trigger_event
        assert a.raw(11) == o.raw(11) and a.raw(12) == o.raw(12)
        assert a.value(10) and a.value(10) != orig.control_id
        assert len(a.value(7)) >= 14
        assert _msa2(ack) == orig.control_id
    assert any(r.key == blind("MRN448812") for r in records.values())


def test_ack_uses_the_encoding_characters_of_the_message(kafka: str, serve: Started) -> None:
    port = serve(kafka)
    message = b"MSH#:*$@#SA#SF#RA#RF#20260101##ADT:A04#C42#P#2.4\rPID#1##M7:::H:MR##Roe:Ann\r"
    [ack] = mllp.send(HOST, port, [message])
    assert ack.startswith(b"MSH#:*$@#RA#RF#SA#SF#")
    assert b"#ACK:A04:ACK#" in ack and b"#P#2.4" in ack
    assert b"\rMSA#AA#C42\r" in ack
    assert mllp.ack_code(ack) == "AA"
    [rec] = read_topic(kafka, bus.RAW_TOPICS["hl7v2"])
    assert rec.value == message


# -- rejected messages -------------------------------------------------------------------


def test_not_hl7_gets_ar_and_is_dead_lettered(kafka: str, serve: Started) -> None:
    port = serve(kafka)
    junk = [b"hello, world", b"PID|1||MRN1\rPV1|1|I\r", b""]
    acks = mllp.send(HOST, port, junk)
    assert [mllp.ack_code(a) for a in acks] == ["AR", "AR", "AR"]
    for ack, says in zip(acks, ["MSH", "MSH", "empty"], strict=True):
        err = _seg(ack, "ERR")
        assert err.value(3) == "100" and err.value(3, 0, 3) == "HL70357"
        assert err.value(4) == "E"
        assert says in err.value(8)
    dead = list(read_topic(kafka, bus.DEADLETTER))
    assert sorted(r.value for r in dead) == sorted(junk)
    assert {r.header("fhirtwin-dl-stage") for r in dead} == {"mllp"}
    assert all(r.header("fhirtwin-dl-source").startswith("mllp/127.0.0.1:") for r in dead)
    assert list(read_topic(kafka, bus.RAW_TOPICS["hl7v2"])) == []


def test_malformed_message_gets_ae_with_err_and_is_dead_lettered(
    kafka: str, serve: Started
) -> None:
    port = serve(kafka)
    bad_charset = (
        b"MSH|^~\\&|LAB|FAC|TWIN|HUB|20260101||ORU^R01^ORU_R01|BAD1|P|2.5.1||||||UNICODE UTF-8\r"
        b"PID|1||MRN9^^^H^MR||M\xfcller^Hans\r"  # latin-1 ü in a message declaring UTF-8
    )
    no_msh2 = b"MSH||LAB|FAC|TWIN|HUB|20260101||ADT^A01|BAD2|P|2.5\rPID|1||X\r"
    acks = mllp.send(HOST, port, [bad_charset, no_msh2, _adt("GOOD1")])
    assert [mllp.ack_code(a) for a in acks] == ["AE", "AE", "AA"]

    err = _seg(acks[0], "ERR")
    assert err.raw(2) == "MSH^1^18"  # ERL: segment, sequence, field
    assert err.value(3) == "102" and err.value(3, 0, 2) == "Data type error"
    assert err.value(4) == "E"
    assert "MSH-18" in err.value(8) and "character set" in err.value(8)
    assert _msa2(acks[0]) == "BAD1"
    assert _msh(acks[0]).raw(3) == "TWIN"  # still addressed back to the sender

    err2 = _seg(acks[1], "ERR")
    assert err2.raw(2) == "MSH^1^2" and err2.value(3) == "101"
    # The user message quotes '^~\&' and must arrive intact through HL7 escaping.
    assert "'^~\\&'" in err2.value(8)
    assert _msa2(acks[1]) == "BAD2"

    dead = {r.value: r for r in read_topic(kafka, bus.DEADLETTER)}
    assert set(dead) == {bad_charset, no_msh2}
    rec = dead[bad_charset]
    assert rec.header("fhirtwin-dl-stage") == "mllp"
    assert rec.header("fhirtwin-control-id") == "BAD1"
    error = orjson.loads(rec.header("fhirtwin-dl-error"))
    assert error["field"] == "MSH-18" and error["hl7_error_code"] == 102
    assert "parse error" in rec.header("fhirtwin-dl-reason")
    [good] = read_topic(kafka, bus.RAW_TOPICS["hl7v2"])
    assert good.value == _adt("GOOD1")


# -- framing and limits ------------------------------------------------------------------


def test_oversized_frame_gets_ar_and_the_connection_keeps_working(
    kafka: str, serve: Started
) -> None:
    port = serve(kafka, mllp.Limits(max_frame_bytes=4000))
    small_big = _adt("BIG1", extra=b"NTE|1||" + b"x" * 6000 + b"\r")  # one read, too big
    huge = _adt("BIG2", extra=b"NTE|1||" + b"y" * 700_000 + b"\r")  # spans many reads
    acks = mllp.send(HOST, port, [small_big, _adt("OK1"), huge, _adt("OK2")])
    assert [mllp.ack_code(a) for a in acks] == ["AR", "AA", "AR", "AA"]
    for ack, size in ((acks[0], len(small_big)), (acks[2], len(huge))):
        text = _seg(ack, "ERR").value(8)
        assert str(size) in text and "4000" in text and "NOT stored" in text
    assert [_msa2(a) for a in acks] == ["BIG1", "OK1", "BIG2", "OK2"]
    stored = [r.value for r in read_topic(kafka, bus.RAW_TOPICS["hl7v2"])]
    assert sorted(stored) == sorted([_adt("OK1"), _adt("OK2")])


def test_garbage_outside_frames_is_skipped_and_split_frames_are_joined(
    kafka: str, serve: Started
) -> None:
    port = serve(kafka)
    one, two, three = _adt("G1"), _adt("G2"), _adt("G3")
    with socket.create_connection((HOST, port), 10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"\r\n garbage \x00\x01" + b"\x0b" + one + b"\x1c\r" + b"\n\n")
        sock.sendall(b"\x0b" + b"abandoned frame without end")  # a new VT restarts the frame
        sock.sendall(b"\x0b" + two + b"\x1c\r")
        frame = b"\x0b" + three + b"\x1c\r"
        for i in range(0, len(frame), 7):  # one frame in many small writes
            sock.sendall(frame[i : i + 7])
        sock.shutdown(socket.SHUT_WR)  # half-close: the server answers, then closes
        acks = _acks_in(_recv_until_closed(sock))
    assert [mllp.ack_code(a) for a in acks] == ["AA", "AA", "AA"]
    assert [_msa2(a) for a in acks] == ["G1", "G2", "G3"]
    stored = sorted(r.value for r in read_topic(kafka, bus.RAW_TOPICS["hl7v2"]))
    assert stored == sorted([one, two, three])


def test_too_much_garbage_closes_the_connection_but_not_the_server(
    kafka: str, serve: Started
) -> None:
    port = serve(kafka, mllp.Limits(max_garbage_bytes=1000))
    with socket.create_connection((HOST, port), 10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n" + b"x" * 5000)
        assert _recv_until_closed(sock) == b""
    assert [mllp.ack_code(a) for a in mllp.send(HOST, port, [_adt("AFTER")])] == ["AA"]


def test_pipelined_client_gets_acks_in_order(kafka: str, serve: Started) -> None:
    port = serve(kafka)
    # Different patients land on different partitions, so deliveries complete out of order.
    messages = [_adt(f"P{i:03d}", mrn=f"MRN{i % 13}") for i in range(120)]
    acks = mllp.send(HOST, port, messages, window=8)
    assert [_msa2(a) for a in acks] == [f"P{i:03d}" for i in range(120)]
    assert {mllp.ack_code(a) for a in acks} == {"AA"}
    # Everything at once (the client reads ACKs only at the end) also works.
    acks = mllp.send(HOST, port, messages[:50], window=50)
    assert [_msa2(a) for a in acks] == [f"P{i:03d}" for i in range(50)]


def test_idle_connection_is_closed(kafka: str, serve: Started) -> None:
    port = serve(kafka, mllp.Limits(idle_timeout=0.3))
    with socket.create_connection((HOST, port), 10) as sock:
        sock.sendall(b"\x0b" + _adt("IDLE1") + b"\x1c\r")
        acks = _acks_in(_recv_until_closed(sock))  # the ACK, then the close
    assert [_msa2(a) for a in acks] == ["IDLE1"]
    with socket.create_connection((HOST, port), 10) as sock:
        assert _recv_until_closed(sock) == b""


def _concurrent_clients(
    port: int, batches: dict[int, list[bytes]], window: int
) -> dict[int, list[str]]:
    """Each batch sent over a connection of its own, all at once: the ACK codes per batch."""
    results: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            acks = mllp.send(HOST, port, batches[n], window=window)
            results[n] = [mllp.ack_code(a) for a in acks]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    return results


def test_twenty_concurrent_connections(kafka: str, serve: Started) -> None:
    port = serve(kafka)
    batches = {n: [_adt(f"C{n}-{i}", mrn=f"M{n}") for i in range(10)] for n in range(20)}
    assert _concurrent_clients(port, batches, window=3) == {n: ["AA"] * 10 for n in range(20)}
    records = list(read_topic(kafka, bus.RAW_TOPICS["hl7v2"]))
    assert len(records) == 200
    # One patient, one partition: all of a connection's messages share a key here.
    for n in range(20):
        assert len({r.partition for r in records if r.key == blind(f"M{n}")}) == 1


def test_a_lone_sender_is_never_held_for_a_shared_write(kafka: str, serve: Started) -> None:
    # A hold far longer than the client's timeout: were a lone sender's message held for
    # others to share its Kafka write, the client would time out instead of getting AAs.
    port = serve(kafka, mllp.Limits(batch_wait=60.0))
    messages = [_adt(f"L{i:02d}") for i in range(20)]
    acks = mllp.send(HOST, port, messages, window=1, timeout=10)
    assert [_msa2(a) for a in acks] == [f"L{i:02d}" for i in range(20)]
    assert {mllp.ack_code(a) for a in acks} == {"AA"}


def test_senders_that_share_writes_keep_each_connections_order(kafka: str, serve: Started) -> None:
    port = serve(kafka, mllp.Limits(batch_wait=0.05))
    batches = {n: [_adt(f"S{n}-{i:02d}", mrn=f"SH{n}") for i in range(40)] for n in range(4)}
    assert _concurrent_clients(port, batches, window=8) == {n: ["AA"] * 40 for n in range(4)}
    records = list(read_topic(kafka, bus.RAW_TOPICS["hl7v2"]))
    assert len(records) == 160
    for n in range(4):  # one patient per connection: one partition, in the order sent
        mine = [r for r in records if r.key == blind(f"SH{n}")]
        assert len({r.partition for r in mine}) == 1
        got = [hl7v2.parse(r.value).control_id for r in sorted(mine, key=lambda r: r.offset)]
        assert got == [f"S{n}-{i:02d}" for i in range(40)]


def test_connection_limit(kafka: str, serve: Started) -> None:
    port = serve(kafka, mllp.Limits(max_connections=2))
    a = socket.create_connection((HOST, port), 10)
    b = socket.create_connection((HOST, port), 10)
    try:
        # Once a and b are registered (an ACK proves it), a third connection is refused.
        for i, sock in enumerate((a, b)):
            sock.sendall(b"\x0b" + _adt(f"L{i}") + b"\x1c\r")
            assert _msa2(_read_ack(sock)) == f"L{i}"
        with socket.create_connection((HOST, port), 10) as c:
            c.sendall(b"\x0b" + _adt("L3") + b"\x1c\r")
            with contextlib.suppress(ConnectionResetError):  # aborted: also a refusal
                assert _recv_until_closed(c) == b""
        a.sendall(b"\x0b" + _adt("L4") + b"\x1c\r")
        assert _msa2(_read_ack(a)) == "L4"
    finally:
        a.close()
        b.close()


def test_client_that_vanishes_mid_frame_does_not_hurt_the_server(
    kafka: str, serve: Started
) -> None:
    port = serve(kafka)
    for _ in range(3):
        sock = socket.create_connection((HOST, port), 10)
        sock.sendall(b"\x0b" + _adt("HALF")[:30])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # RST
    assert mllp.ack_code(mllp.send(HOST, port, [_adt("STILL")])[0]) == "AA"


# -- Kafka failures ----------------------------------------------------------------------


def test_unreachable_kafka_means_ae_never_aa(serve: Started) -> None:
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    port = serve(closed, mllp.Limits(kafka_timeout=1.0))
    acks = mllp.send(HOST, port, [_adt("K1"), _adt("K2"), b"not hl7"], window=3, timeout=30)
    assert [mllp.ack_code(a) for a in acks] == ["AE", "AE", "AE"]
    assert [_msa2(a) for a in acks[:2]] == ["K1", "K2"]
    for ack in acks:
        errs = hl7v2.parse(ack).segments_named("ERR")
        last = errs[-1]
        assert last.value(3) == "207"
        assert "NOT stored" in last.value(8) and "resend" in last.value(8)


def test_broker_stopped_while_serving_means_ae(serve: Started) -> None:
    from fhirtwin.infra import EmbeddedKafka

    with EmbeddedKafka() as k:
        bus.ensure_topics(k.bootstrap, [bus.RAW_TOPICS["hl7v2"], bus.DEADLETTER], partitions=1)
        port = serve(k.bootstrap, mllp.Limits(kafka_timeout=1.5))
        assert mllp.ack_code(mllp.send(HOST, port, [_adt("UP")])[0]) == "AA"
        k.stop()
        acks = mllp.send(HOST, port, [_adt("DOWN1"), _adt("DOWN2")], window=2, timeout=30)
    assert [mllp.ack_code(a) for a in acks] == ["AE", "AE"]
    assert all("NOT stored" in _seg(a, "ERR").value(8) for a in acks)


# -- pure helpers ------------------------------------------------------------------------


BROKEN = [
    b"",
    b"   \r\n",
    b"hello",
    b"PID|1||X\r",
    b"MSH",
    b"MSHA^~\\&|x\r",
    b"MSH||A|B\r",
    b"MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5|||||NOPE-CHARSET\rPID|1\r",
    b"MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5|||||UNICODE UTF-8\rPID|1||\xff\xfe\r",
    b"\xef\xbb\xbfMSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\nPID|1||M\\S\\1^^^H\n",
    b"\r\nMSH|^~\\&|A\r\nPID|1||K1~K2\r\n",
    b"MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\rNTE|1\rcontinued line\rPID|1||Z9\r",
]


def test_inspect_accepts_and_rejects_exactly_what_parse_does() -> None:
    """The listener reads only MSH and PID-3 (fast); it must agree with the full tokenizer."""
    messages = _examples() + BROKEN
    root = Path(os.environ.get("FHIRTWIN_CORPUS") or ROOT.parent / "shared" / "corpus")
    if root.is_dir():  # the corpus is optional here: examples and BROKEN are the core
        for path in sorted(root.rglob("*.hl7")):
            messages += hl7v2.split_batch(path.read_bytes())
    for data in messages:
        try:
            full = hl7v2.parse(data)
        except hl7v2.HL7ParseError as exc:
            with pytest.raises(hl7v2.HL7ParseError) as got:
                mllp.inspect(data)
            assert got.value.to_dict() == exc.to_dict()
            continue
        head = mllp.inspect(data)
        pid = full.segments_named("PID")
        key = pid[0].value(3).encode() if pid and pid[0].value(3) else None
        assert head.msh == full.msh.fields
        assert (head.encoding, head.charset) == (full.encoding, full.charset)
        assert (head.control_id, head.key) == (full.control_id, key)


def test_build_ack_without_msh_and_ack_code() -> None:
    ack = mllp.build_ack(
        "AR", None, errors=[mllp.ErrorDetail(100, "a|b^c~d\\e&f\rg", "MSH", 1, None)]
    )
    assert mllp.ack_code(ack) == "AR"
    err = _seg(ack, "ERR")
    assert err.value(8) == "a|b^c~d\\e&f\ng" or err.value(8) == "a|b^c~d\\e&f\rg"
    assert err.raw(2) == "MSH^1"
    with pytest.raises(ValueError):
        mllp.ack_code(b"MSH|^~\\&|A\rPID|1\r")


def test_the_listener_beats_for_its_liveness_probe(
    kafka: str, serve: Started, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/health on --metrics-port fails when the listener's event loop stalls: it beats."""
    import time

    from fhirtwin import metrics

    monkeypatch.setattr(metrics, "_last_beat", None)
    serve(kafka)
    deadline = time.monotonic() + 10
    while metrics._last_beat is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metrics._last_beat is not None
