"""MLLP listener: HL7 v2 over TCP in, the original bytes durably in Kafka, then the ACK.

Why it is built this way:

* **ACK only after the durable write.** A sender deletes a message once it has ``MSA|AA``;
  so AA goes out only when librdkafka's delivery report (acks=all) confirms the write to
  ``ehr.hl7v2``. If the write fails or takes longer than ``Limits.kafka_timeout`` the
  answer is AE with ERR-3 207 "NOT stored, resend" — never AA. A message we cannot read is
  written to ``twin.deadletter`` first and answered AE/AR only once that write is confirmed.
* **The original bytes.** Kafka gets exactly the frame content; conversion happens later
  (normalize), so a mapping bug can always be fixed by replaying the topic.
* **Pipelining.** Frames are parsed as they arrive; each connection keeps a FIFO of
  pending ACKs and writes every ACK whose head-of-line predecessors are done, so ACKs
  leave in order even when a client sends many frames before reading.
* **Group commit when several clients send.** With one client sending (most interface
  engines send one message and wait for its ACK) each message is written to Kafka at
  once. When several connections sent in the last 50 ms, a message may wait up to
  ``Limits.batch_wait`` (5 ms) for the others, and is written with them as soon as every
  one of those connections waits for an ACK of a held message with nothing else
  un-ACKed (it can send no more; a client that pipelines may, so it is not waited for
  beyond ``batch_wait``): fewer, larger record batches cost the
  broker less (the embedded one lists every stored batch on each fetch; bench/README.md),
  for a few ms of ACK latency.
* **asyncio + one poll thread.** confluent-kafka runs delivery callbacks in whichever
  thread calls ``poll()``. One daemon thread polls; callbacks only append to a deque and
  the thread wakes the event loop with *one* ``call_soon_threadsafe`` per batch of reports
  (not one per message), which keeps the self-pipe and GIL traffic low under load.
* **No per-message timers.** One housekeeping task per server enforces the Kafka timeout
  (backstop to librdkafka's ``message.timeout.ms``) and the idle timeout.
* **The listener never dies of a client.** Every per-connection callback catches and logs
  its exceptions and closes only that connection.

The synchronous client (:func:`send`, :func:`ack_code`) is for users, tests and benches.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer

from fhirtwin import bus, heap, hl7v2
from fhirtwin.crypto import KeyRing, default_keyring
from fhirtwin.metrics import (
    ACKS,
    DEADLETTERS,
    LATENCY,
    MESSAGES_IN,
    MESSAGES_OUT,
    MLLP_CONNECTIONS,
    beat,
)

__all__ = [
    "ErrorDetail",
    "Header",
    "Limits",
    "MLLPServer",
    "ack_code",
    "build_ack",
    "inspect",
    "send",
]

log = logging.getLogger("fhirtwin.mllp")

VT = 0x0B
FS = 0x1C
CR = 0x0D
START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\r"

_BOM = b"\xef\xbb\xbf"
_HEAD_KEPT = 4096  # bytes of an oversized frame kept to address its AR (MSH-3..6, MSH-10)
_HL7_TOPIC = bus.RAW_TOPICS["hl7v2"]

# HL7 table 0357 (message error condition codes) that this listener uses.
SEGMENT_SEQUENCE_ERROR = 100
REQUIRED_FIELD_MISSING = 101
DATA_TYPE_ERROR = 102
TABLE_VALUE_NOT_FOUND = 103
APPLICATION_INTERNAL_ERROR = 207
_ERROR_NAMES = {
    SEGMENT_SEQUENCE_ERROR: "Segment sequence error",
    REQUIRED_FIELD_MISSING: "Required field missing",
    DATA_TYPE_ERROR: "Data type error",
    TABLE_VALUE_NOT_FOUND: "Table value not found",
    APPLICATION_INTERNAL_ERROR: "Application internal error",
}


# A Kafka write as MLLPServer.produce takes it: topic, value, key, headers, pending ACK.
_Write = tuple[str, bytes, "bytes | None", "list[tuple[str, str | bytes | None]]", "_Pending"]
_MAX_HELD = 1000  # held writes (group commit) that are released at once, whatever the wait
_SENDER_WINDOW = 0.05  # s: a connection that sent a message this recently is a sender
_SENDERS_EVERY = 0.005  # s: how often the senders are counted


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may cost the listener; every value is per server or per connection."""

    max_frame_bytes: int = 1 << 20  # larger frames are discarded up to their FS and answered AR
    max_garbage_bytes: int = 64 << 10  # bytes outside frames since the last frame; then close
    idle_timeout: float = 300.0  # seconds without a byte (and nothing pending); then close
    max_connections: int = 1000  # further connections are closed at once
    kafka_timeout: float = 10.0  # seconds for Kafka to confirm a write; then AE "resend"
    max_in_flight: int = 512  # un-ACKed messages per connection before we stop reading
    # seconds a message may wait to share a Kafka write when several connections send
    # (0: never; a lone sender is never held)
    batch_wait: float = 0.005


@dataclass(frozen=True, slots=True)
class ErrorDetail:
    """One ERR segment: what went wrong (ERR-8), its table 0357 code (ERR-3) and where (ERR-2)."""

    code: int
    text: str
    segment: str = ""
    sequence: int | None = None
    field: int | None = None
    diagnostic: str = ""


# -- building ACKs ---------------------------------------------------------------------

_control_ids = itertools.count(1)
_ID_PREFIX = format(int(time.time()) & 0xFFFFFFFF, "x")
_ts_cache: list[Any] = [-1, ""]


def _now_dtm() -> str:
    """HL7 DTM of now with milliseconds and UTC offset (the second's prefix is cached)."""
    now = time.time()
    sec = int(now)
    if sec != _ts_cache[0]:
        lt = time.localtime(sec)
        _ts_cache[0] = sec
        _ts_cache[1] = (time.strftime("%Y%m%d%H%M%S", lt), time.strftime("%z", lt))
    prefix, zone = _ts_cache[1]
    return f"{prefix}.{int((now - sec) * 1000):03d}{zone}"


def _err_segment(e: ErrorDetail, enc: hl7v2.Encoding) -> str:
    fs, cs = enc.field, enc.component
    loc = ""
    if e.segment:
        parts = [e.segment, str(e.sequence or 1)]
        if e.field is not None:
            parts.append(str(e.field))
        loc = cs.join(parts)
    code = cs.join((str(e.code), _ERROR_NAMES.get(e.code, ""), "HL70357"))
    # ERR-1 (deprecated) empty, 2 location, 3 code, 4 severity, 5/6 empty, 7 diagnostic, 8 text
    return fs.join(
        (
            "ERR",
            "",
            loc,
            code,
            "E",
            "",
            "",
            hl7v2.escape(e.diagnostic, enc),
            hl7v2.escape(e.text, enc),
        )
    )


def build_ack(
    code: str,
    msh: Sequence[str] | None,
    enc: hl7v2.Encoding = hl7v2.DEFAULT_ENCODING,
    charset: str = "utf-8",
    errors: Sequence[ErrorDetail] = (),
) -> bytes:
    """An HL7 ACK (without MLLP framing) answering a message whose raw MSH fields are ``msh``.

    ``msh[n]`` is MSH-n as sent (still escaped, so it is copied without re-escaping), the
    way :class:`fhirtwin.hl7v2.Segment` numbers fields. Sending and receiving
    application/facility are swapped, MSH-11, MSH-12 and MSH-18 copied, MSA-2 echoes MSH-10.
    Without an MSH (not HL7 at all) those fields stay empty and MSH-12 says 2.5.1.
    """
    f = list(msh) if msh else ["MSH", enc.field, enc.msh2]

    def g(n: int) -> str:
        return f[n] if n < len(f) else ""

    fs, cs = enc.field, enc.component
    trigger = g(9).split(enc.repetition, 1)[0].split(cs)
    mtype = cs.join(("ACK", trigger[1], "ACK")) if len(trigger) > 1 and trigger[1] else "ACK"
    fields = [
        enc.msh2,
        g(5),
        g(6),
        g(3),
        g(4),
        _now_dtm(),
        "",
        mtype,
        f"{_ID_PREFIX}.{next(_control_ids)}",
        g(11) or ("" if msh else "P"),
        g(12) or ("" if msh else "2.5.1"),
    ]
    if g(18):
        fields += ["", "", "", "", "", g(18)]
    lines = ["MSH" + fs + fs.join(fields)]
    msa = ["MSA", code, g(10)]
    if errors and code != "AA":
        # MSA-3 is deprecated since 2.4 but older senders show only it; ERR carries the detail.
        msa.append(hl7v2.escape(errors[0].text[:80], enc))
    lines.append(fs.join(msa))
    lines += [_err_segment(e, enc) for e in errors]
    return ("\r".join(lines) + "\r").encode(charset, errors="replace")


def _lenient_msh(frame: bytes) -> tuple[list[str] | None, hl7v2.Encoding]:
    """MSH fields and delimiters read straight from the bytes, for messages parse() rejects.

    Decoded as latin-1 so that copied fields go back byte for byte; the ACK is then
    encoded as latin-1 too.
    """
    data = frame[3:] if frame.startswith(_BOM) else frame
    data = data.lstrip(b" \t\r\n\x00")
    if not data.startswith(b"MSH") or len(data) < 4:
        return None, hl7v2.DEFAULT_ENCODING
    end = len(data)
    for brk in (b"\r", b"\n"):
        k = data.find(brk)
        if 0 <= k < end:
            end = k
    line = data[:end].decode("latin-1")
    fs = line[3]
    if fs.isalnum() or fs.isspace() or fs in "\x0b\x1c":
        return None, hl7v2.DEFAULT_ENCODING
    parts = line.split(fs)
    chars = "".join(dict.fromkeys(parts[1] if len(parts) > 1 else "")).replace(fs, "")
    if any(c.isalnum() or c.isspace() for c in chars):
        chars = ""
    c = list(chars) + [""] * (5 - len(chars))
    enc = hl7v2.Encoding(fs, c[0] or "^", c[1] or "~", c[2] or "\\", c[3] or "&", c[4])
    return ["MSH", fs, *parts[1:]], enc


def _field_number(name: str | None) -> int | None:
    if name and "-" in name:
        tail = name.rsplit("-", 1)[1]
        if tail.isdigit():
            return int(tail)
    return None


def _detail_of(exc: hl7v2.HL7ParseError) -> ErrorDetail:
    """Map a tokenizer error to an ERR segment: table 0357 code and ERL location."""
    fieldno = _field_number(exc.field)
    if fieldno == 18:
        code = TABLE_VALUE_NOT_FOUND if "not known" in exc.what else DATA_TYPE_ERROR
    elif fieldno == 2 and "missing" in exc.what:
        code = REQUIRED_FIELD_MISSING
    elif fieldno == 1 and "does not start" not in exc.what:
        code = DATA_TYPE_ERROR
    elif exc.segment_index is not None or "does not start" in exc.what:
        code = SEGMENT_SEQUENCE_ERROR
    else:
        code = APPLICATION_INTERNAL_ERROR
    segment = exc.segment or ("MSH" if exc.field and exc.field.startswith("MSH") else "")
    diag = f"byte offset {exc.offset}" if exc.offset is not None else ""
    return ErrorDetail(code, str(exc), segment, 1 if segment else None, fieldno, diag)


def _not_stored(reason: str) -> ErrorDetail:
    return ErrorDetail(
        APPLICATION_INTERNAL_ERROR,
        f"the message was NOT stored ({reason}); resend it",
    )


@dataclass(frozen=True, slots=True)
class Header:
    """What the listener needs from a message: its MSH (raw fields), delimiters and key."""

    msh: list[str]
    encoding: hl7v2.Encoding
    charset: str
    control_id: str
    key: bytes | None


_LEAD = "\x0b\x1c\x00 \t\r\n"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _blind(keys: KeyRing, key: bytes | None) -> bytes | None:
    """A raw record's key (the patient's PID-3, for ordering) as its blind index."""
    return keys.blind(key.decode("utf-8", "replace")).encode() if key else None


def inspect(frame: bytes) -> Header:
    """Read MSH and PID-3 only; raises ``HL7ParseError`` exactly when ``hl7v2.parse`` would.

    Why not ``hl7v2.parse(frame)``: splitting every segment costs ~40 µs for a 4 KB message,
    a third of the listener's per-message CPU, and the listener stores the bytes as they came
    (normalize parses them fully later). ``parse`` fails only in ``decode`` (character set)
    and on the first line (MSH-1/MSH-2, or no MSH); both run here on the whole input, the
    same functions. tests/test_mllp.py checks the equivalence on the corpus and on broken
    messages. The error itself comes from a full ``parse``, so its byte offsets are exact.
    """
    try:
        text, charset, _notes, _bom = hl7v2.decode(frame)
        body = text.lstrip(_LEAD)
        first = _LINE_BREAK.split(body, 1)[0]
        msh = hl7v2.parse(first).segments[0]
    except hl7v2.HL7ParseError:
        msg = hl7v2.parse(frame)  # raises the error with exact offsets (it must raise too)
        return _header_of(msg)
    enc = msh.encoding
    key = None
    marker = "PID" + enc.field
    i = body.find("\r" + marker)
    if i < 0:
        i = body.find("\n" + marker)
    if i >= 0:
        end = len(body)
        for brk in ("\r", "\n"):
            k = body.find(brk, i + 1)
            if 0 <= k < end:
                end = k
        fields = body[i + 1 : end].split(enc.field)
        if len(fields) > 3 and fields[3]:
            pid3 = hl7v2.split_field(fields[3], enc, charset)[0][0][0]
            key = pid3.encode() if pid3 else None
    return Header(msh.fields, enc, charset, msh.value(10), key)


def _header_of(msg: hl7v2.Message) -> Header:
    msh = msg.msh
    key = None
    for seg in msg.segments:
        if seg.name == "PID":
            pid3 = seg.value(3)
            key = pid3.encode() if pid3 else None
            break
    return Header(msh.fields, msg.encoding, msg.charset, msh.value(10), key)


# -- the server ------------------------------------------------------------------------


class _Pending:
    """One received message waiting for its Kafka write; becomes an ACK once ``final``."""

    __slots__ = (
        "charset",
        "code",
        "conn",
        "deadline",
        "enc",
        "errors",
        "failure",
        "final",
        "kafka_error",
        "msh",
        "sink",
    )

    def __init__(
        self,
        conn: _Connection,
        code: str,
        msh: list[str] | None,
        enc: hl7v2.Encoding,
        charset: str,
        errors: Sequence[ErrorDetail],
        deadline: float,
    ) -> None:
        self.conn = conn
        self.code = code
        self.msh = msh
        self.enc = enc
        self.charset = charset
        self.errors = errors
        self.deadline = deadline
        self.final = False
        self.failure: str | None = None
        self.kafka_error: KafkaError | None = None
        self.sink: collections.deque[_Pending] | None = None

    def delivered(self, err: KafkaError | None, msg: Any) -> None:
        """librdkafka's delivery report, in the poll thread: hand over, decide in the loop."""
        self.kafka_error = err
        sink = self.sink
        if sink is not None:
            sink.append(self)

    def ack(self) -> tuple[str, bytes]:
        if self.failure is None:
            code, errors = self.code, self.errors
        else:
            code, errors = "AE", [*self.errors, _not_stored(self.failure)]
        return code, build_ack(code, self.msh, self.enc, self.charset, errors)


class _Connection(asyncio.Protocol):
    """One MLLP client: frames in, messages produced, ACKs out in arrival order."""

    _OUTSIDE, _IN_FRAME, _DISCARD = 0, 1, 2

    def __init__(self, server: MLLPServer) -> None:
        self.server = server
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.peer_b = b"?"
        self.buf = bytearray()
        self.state = self._OUTSIDE
        self.start = 0  # frame start in buf (IN_FRAME)
        self.scan = 0  # where to look for FS next (IN_FRAME)
        self.garbage = 0
        self.discarded = 0
        self.discard_head = b""
        self.pending: collections.deque[_Pending] = collections.deque()
        self.last_rx = time.monotonic()
        self.last_msg = 0.0  # when the last message arrived (time.monotonic)
        self.reading_paused = False
        self.writing_paused = False
        self.closed = False
        self.eof = False
        self.counted = False

    # asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
        self.peer_b = self.peer.encode()
        server = self.server
        if server.closing or len(server.conns) >= self.limits.max_connections:
            log.warning(
                "MLLP: refused connection from %s (%d open, limit %d%s)",
                self.peer,
                len(server.conns),
                self.limits.max_connections,
                ", server stopping" if server.closing else "",
            )
            self.closed = True
            transport.abort()
            return
        server.conns.add(self)
        self.counted = True
        MLLP_CONNECTIONS.inc()
        log.debug("MLLP: connection from %s", self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.counted:
            self.counted = False
            self.server.conns.discard(self)
            MLLP_CONNECTIONS.dec()
        if exc is not None:
            log.info("MLLP: connection from %s lost: %s", self.peer, exc)
        if self.pending:
            log.warning(
                "MLLP: %s went away with %d message(s) not yet acknowledged",
                self.peer,
                len(self.pending),
            )

    def pause_writing(self) -> None:
        # The client does not read its ACKs: stop reading its frames until it catches up.
        self.writing_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._maybe_resume()

    def eof_received(self) -> bool:
        # Half-close: keep the socket open for the ACKs still pending, close once they are sent.
        self.eof = True
        if not self.pending and self.transport is not None:
            self.transport.close()
        return True

    def data_received(self, data: bytes) -> None:
        try:
            self._data(data)
        except Exception:
            log.exception("MLLP: error on the connection from %s; closing it", self.peer)
            self.abort()

    # framing ----------------------------------------------------------------------------

    def _data(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_rx = time.monotonic()
        buf = self.buf
        buf += data
        n = len(buf)
        pos = 0 if self.state != self._IN_FRAME else self.start
        limit = self.limits.max_frame_bytes
        while pos < n:
            state = self.state
            if state == self._OUTSIDE:
                i = buf.find(VT, pos)
                if i < 0:
                    self.garbage += n - pos
                    pos = n
                    break
                self.garbage += i - pos
                pos = self.start = self.scan = i + 1
                self.state = self._IN_FRAME
            elif state == self._IN_FRAME:
                j = buf.find(FS, self.scan)
                end = j if j >= 0 else n
                k = buf.find(VT, self.scan, end)
                if k >= 0:  # a new start block: the frame before it was abandoned
                    self.garbage += k + 1 - self.start
                    pos = self.start = self.scan = k + 1
                    continue
                if j < 0:
                    if n - self.start > limit:
                        self.state = self._DISCARD
                        self.discard_head = bytes(buf[self.start : self.start + _HEAD_KEPT])
                        self.discarded = n - self.start
                        pos = n
                    else:
                        self.scan = n
                        pos = self.start
                    break
                start = self.start
                pos = j + 1
                if pos < n and buf[pos] == CR:
                    pos += 1
                self.state = self._OUTSIDE
                self.garbage = 0
                if j - start > limit:
                    self._oversized(bytes(buf[start : start + _HEAD_KEPT]), j - start)
                else:
                    self._message(bytes(buf[start:j]))
            else:  # discarding an oversized frame up to its end block
                j = buf.find(FS, pos)
                k = buf.find(VT, pos, j if j >= 0 else n)
                if k >= 0:
                    log.warning(
                        "MLLP: %s abandoned an oversized frame after %d bytes",
                        self.peer,
                        self.discarded + k - pos,
                    )
                    self.garbage += self.discarded + k - pos
                    pos = self.start = self.scan = k + 1
                    self.state = self._IN_FRAME
                    continue
                if j < 0:
                    self.discarded += n - pos
                    pos = n
                    break
                self.discarded += j - pos
                pos = j + 1
                if pos < n and buf[pos] == CR:
                    pos += 1
                self.state = self._OUTSIDE
                self.garbage = 0
                self._oversized(self.discard_head, self.discarded)
                self.discard_head = b""
        if pos:
            del buf[:pos]
            if self.state == self._IN_FRAME:
                self.start -= pos
                self.scan -= pos
        if self.garbage > self.limits.max_garbage_bytes:
            log.warning(
                "MLLP: %s sent %d bytes outside MLLP frames (limit %d); closing the connection",
                self.peer,
                self.garbage,
                self.limits.max_garbage_bytes,
            )
            self.close()
            return
        if len(self.pending) >= self.limits.max_in_flight:
            self._pause()

    # messages ---------------------------------------------------------------------------

    def _message(self, frame: bytes) -> None:
        server = self.server
        received = str(int(time.time() * 1000)).encode()
        try:
            head = inspect(frame)
        except hl7v2.HL7ParseError as exc:
            self._reject(frame, exc, received)
            return
        headers: list[tuple[str, str | bytes | None]] = [
            ("fhirtwin-source-kind", b"hl7v2"),
            ("fhirtwin-received-at", received),
            ("fhirtwin-peer", self.peer_b),
            ("fhirtwin-control-id", head.control_id.encode()),
        ]
        entry = _Pending(
            self,
            "AA",
            head.msh,
            head.encoding,
            head.charset,
            (),
            time.monotonic() + server.timeout_backstop,
        )
        self.pending.append(entry)
        keys = server.keys  # sealed with today's epoch key, keyed by a blind index (crypto.py)
        value, key = keys.seal_raw(frame), _blind(keys, head.key)
        now = time.monotonic()
        self.last_msg = now
        if server.holding or server.senders(now) > 1:
            server.hold((_HL7_TOPIC, value, key, headers, entry))
        else:
            server.produce(_HL7_TOPIC, value, key, headers, entry)

    def _reject(self, frame: bytes, exc: hl7v2.HL7ParseError, received: bytes) -> None:
        """AR (not HL7 / no MSH) or AE (an HL7 message we cannot read), after dead-lettering."""
        msh, enc = _lenient_msh(frame)
        if msh is None:
            code = "AR"
            head = frame[:40]
            detail = ErrorDetail(
                SEGMENT_SEQUENCE_ERROR,
                f"not an HL7 v2 message: {exc}",
                "MSH",
                1,
                None,
                f"first bytes {head!r}",
            )
            reason = "not an HL7 v2 message (no MSH segment)"
        else:
            code = "AE"
            detail = _detail_of(exc)
            reason = f"HL7 v2 parse error: {exc.what}"
        control_id = msh[10] if msh is not None and len(msh) > 10 else ""
        log.warning("MLLP: %s from %s (MSH-10 %r): %s", code, self.peer, control_id, exc)
        error: dict[str, Any] = {
            **exc.to_dict(),
            "ack": code,
            "hl7_error_code": detail.code,
            "err_location": [detail.segment, detail.sequence, detail.field],
        }
        now = str(int(time.time() * 1000)).encode()
        headers: list[tuple[str, str | bytes | None]] = [
            ("fhirtwin-source-kind", b"hl7v2"),
            ("fhirtwin-received-at", received),
            ("fhirtwin-peer", self.peer_b),
            ("fhirtwin-control-id", control_id.encode("latin-1", "replace")),
            ("fhirtwin-dl-stage", b"mllp"),
            ("fhirtwin-dl-reason", self.server.keys.seal_raw(reason.encode("utf-8", "replace"))),
            ("fhirtwin-dl-error", self.server.keys.seal_raw(orjson.dumps(error))),
            ("fhirtwin-dl-source", b"mllp/" + self.peer_b),
            ("fhirtwin-dl-at", now),
        ]
        DEADLETTERS.labels("mllp").inc()
        entry = _Pending(
            self,
            code,
            msh,
            enc,
            "latin-1",
            (detail,),
            time.monotonic() + self.server.timeout_backstop,
        )
        self.pending.append(entry)
        self.server.produce(bus.DEADLETTER, self.server.keys.seal_raw(frame), None, headers, entry)

    def _oversized(self, head: bytes, size: int) -> None:
        limit = self.limits.max_frame_bytes
        msh, enc = _lenient_msh(head)
        text = (
            f"the message is {size} bytes, more than the limit of {limit} bytes; it was "
            "discarded and NOT stored (split it, or raise the listener's max frame size)"
        )
        log.warning("MLLP: AR to %s: %s", self.peer, text)
        detail = ErrorDetail(APPLICATION_INTERNAL_ERROR, text, diagnostic=f"frame size {size}")
        entry = _Pending(self, "AR", msh, enc, "latin-1", (detail,), 0.0)
        entry.final = True
        self.pending.append(entry)
        self.flush()

    # ACKs -------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write every ACK at the head of the queue whose Kafka write has been decided."""
        pending = self.pending
        if not pending or not pending[0].final:
            return
        out = []
        acks = self.server.ack_counters
        shift = time.monotonic() + self.server.timeout_backstop  # deadline = received + backstop
        while pending and pending[0].final:
            entry = pending.popleft()
            code, ack = entry.ack()
            out.append(START_BLOCK + ack + END_BLOCK)
            acks[code].inc()
            if entry.deadline:  # 0.0: an oversized frame, answered at once
                self.server.ack_seconds.observe(shift - entry.deadline)
        transport = self.transport
        if transport is not None and not self.closed and not transport.is_closing():
            transport.write(b"".join(out))
            if not pending and (self.server.closing or self.eof):
                transport.close()
        self._maybe_resume()

    def expire(self, now: float) -> None:
        """Answer AE for writes that Kafka has not confirmed in time; close idle connections."""
        pending = self.pending
        if pending and pending[0].deadline <= now:
            for entry in pending:
                if entry.deadline > now:
                    break
                if not entry.final:
                    entry.final = True
                    entry.failure = (
                        f"Kafka did not confirm the write within {self.limits.kafka_timeout:g} s"
                    )
            self.flush()
        if (
            not pending
            and now - self.last_rx > self.limits.idle_timeout
            and self.transport is not None
        ):
            log.info(
                "MLLP: closing %s: idle for more than %g s", self.peer, self.limits.idle_timeout
            )
            self.close()

    def _pause(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def _maybe_resume(self) -> None:
        if (
            self.reading_paused
            and not self.writing_paused
            and not self.server.closing
            and len(self.pending) < self.limits.max_in_flight // 2 + 1
            and self.transport is not None
            and not self.closed
        ):
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class MLLPServer:
    """The MLLP listener. ``await start()`` … ``await stop()``, or ``run(stop_event)``."""

    def __init__(
        self,
        bootstrap: str,
        host: str = "127.0.0.1",
        port: int = 2575,
        limits: Limits = Limits(),  # frozen, so one shared default is safe
        *,
        producer_config: dict[str, Any] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.host = host
        self.port = port
        self.limits = limits
        self.keys = default_keyring()
        self.producer_config = dict(producer_config or {})
        # librdkafka times a write out itself after kafka_timeout; this is only the backstop.
        self.timeout_backstop = limits.kafka_timeout + 1.0
        self.conns: set[_Connection] = set()
        self.closing = False
        self.ack_counters = {code: ACKS.labels(code) for code in ("AA", "AE", "AR")}
        self.ack_seconds = LATENCY.labels("mllp-ack")  # frame received → ACK written
        self._in_hl7 = MESSAGES_IN.labels(_HL7_TOPIC)
        self._out = {t: MESSAGES_OUT.labels(t) for t in (_HL7_TOPIC, bus.DEADLETTER)}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._producer: Producer | None = None
        self._reports: collections.deque[_Pending] = collections.deque()
        self._held: list[_Write] = []
        self._held_from: set[_Connection] = set()  # held, and sending nothing until ACKed
        self._held_timer: asyncio.TimerHandle | None = None
        self._senders = 0  # connections that sent a message in the last _SENDER_WINDOW
        self._senders_at = -1.0
        self._wake_scheduled = False
        self._poll_stop = threading.Event()
        self._poll_thread: threading.Thread | None = None
        self._housekeeper: asyncio.Task[None] | None = None

    # lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the producer and its poll thread, then bind (``self.port`` is the real port)."""
        self._loop = asyncio.get_running_loop()
        timeout_ms = max(1, int(self.limits.kafka_timeout * 1000))
        conf: dict[str, Any] = {
            # linger 0: one connection that waits for each ACK gets ~4k/s instead of ~650/s at
            # linger 1; under load librdkafka still batches what queues up while a request flies.
            # One produce request in flight: the messages that arrive meanwhile go out as one
            # batch. Measured with Tansu, 8 connections: ~8k msg/s against 5-8k with the
            # default (many tiny pipelined requests), and retries cannot reorder a partition.
            "max.in.flight.requests.per.connection": 1,
            "message.timeout.ms": timeout_ms,
            "request.timeout.ms": timeout_ms,
            **self.producer_config,
        }
        self._producer = bus.producer(self.bootstrap, linger_ms=conf.pop("linger.ms", 0), **conf)
        self._poll_stop.clear()
        self._poll_thread = threading.Thread(
            target=self._poll_loop, name="mllp-kafka-poll", daemon=True
        )
        self._poll_thread.start()
        self._server = await self._loop.create_server(
            lambda: _Connection(self), self.host, self.port, backlog=1024, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._housekeeper = asyncio.create_task(self._housekeeping())
        log.info("MLLP: listening on %s:%d, writing to %s", self.host, self.port, self.bootstrap)

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, answer every message already received, flush, release everything."""
        if self._server is None:
            return
        self.closing = True
        self._server.close()
        self.release()
        for conn in list(self.conns):
            conn._pause()
            if not conn.pending:
                conn.close()
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout_backstop)
        while any(c.pending for c in self.conns) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.conns):
            conn.close()
        await asyncio.sleep(0)  # let the transports flush and close
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeper
        self._poll_stop.set()
        if self._poll_thread is not None:
            await asyncio.to_thread(self._poll_thread.join)
        if self._producer is not None:
            left = await asyncio.to_thread(self._producer.flush, 5.0)
            if left:
                log.warning("MLLP: %d Kafka write(s) still unconfirmed at shutdown", left)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)
        self._server = None
        self._producer = None
        self.closing = False
        log.info("MLLP: stopped")

    def run(self, stop: threading.Event, ready: Callable[[int], None] | None = None) -> None:
        """Serve until ``stop`` is set (blocking; for the CLI). ``ready(port)`` once bound."""

        async def main() -> None:
            await self.start()
            heap.settle()
            try:
                if ready is not None:
                    ready(self.port)
                while not stop.is_set():
                    await asyncio.sleep(0.1)
            finally:
                await self.stop()

        asyncio.run(main())

    # Kafka ------------------------------------------------------------------------------

    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        headers: list[tuple[str, str | bytes | None]],
        entry: _Pending,
    ) -> None:
        """Hand one write to librdkafka; a refusal right away becomes an immediate AE."""
        producer = self._producer
        if topic == _HL7_TOPIC:
            self._in_hl7.inc()
        try:
            if producer is None:
                raise KafkaException(KafkaError(KafkaError._DESTROY, "the listener is stopping"))
            entry.sink = self._reports
            producer.produce(topic, value, key, headers=headers, on_delivery=entry.delivered)
        except (BufferError, KafkaException, ValueError, TypeError) as exc:
            entry.sink = None
            entry.final = True
            entry.failure = f"Kafka refused the write: {exc}"
            entry.conn.flush()

    @property
    def holding(self) -> bool:
        """Messages wait for a shared Kafka write."""
        return bool(self._held)

    def senders(self, now: float) -> int:
        """Connections that sent a message in the last 50 ms (counted every 5 ms at most)."""
        if now - self._senders_at > _SENDERS_EVERY:
            self._senders_at = now
            since = now - _SENDER_WINDOW
            self._senders = sum(1 for c in self.conns if c.last_msg >= since)
        return self._senders

    def hold(self, write: _Write) -> None:
        """Keep a write (``produce``'s arguments) back for at most ``Limits.batch_wait``
        (group commit), then ``release`` it with every write held meanwhile, in order."""
        held = self._held
        held.append(write)
        entry = write[-1]
        if len(entry.conn.pending) == 1:  # its sender waits for this ACK: it sends no more
            self._held_from.add(entry.conn)
        wait = self.limits.batch_wait
        if (
            wait <= 0
            or len(self._held_from) >= self._senders  # every recent sender waits for us
            or len(held) >= _MAX_HELD
            or self._loop is None
            or self.closing
        ):
            self.release()
        elif self._held_timer is None:
            self._held_timer = self._loop.call_later(wait, self.release)

    def release(self) -> None:
        """Hand every held write to librdkafka at once (one record batch per partition)."""
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        held, self._held = self._held, []
        self._held_from.clear()
        for write in held:
            self.produce(*write)

    def _poll_loop(self) -> None:
        """Serve delivery reports; wake the loop once per batch of them."""
        producer = self._producer
        assert producer is not None and self._loop is not None
        reports, loop = self._reports, self._loop
        while not self._poll_stop.is_set():
            try:
                producer.poll(0.05)
            except Exception:  # a callback bug must not stop the deliveries of everyone else
                log.exception("MLLP: Kafka poll failed")
            if reports and not self._wake_scheduled:
                self._wake_scheduled = True
                try:
                    loop.call_soon_threadsafe(self._dispatch)
                except RuntimeError:  # the loop is closed: nobody left to answer
                    return

    def _dispatch(self) -> None:
        """In the loop: turn delivery reports into final ACK decisions and write them."""
        self._wake_scheduled = False
        reports = self._reports
        touched: set[_Connection] = set()
        out = self._out
        while reports:
            entry = reports.popleft()
            if entry.final:
                continue  # already answered AE by the timeout backstop
            entry.final = True
            err = entry.kafka_error
            if err is not None:
                entry.failure = f"Kafka: {err.str()}"
            else:
                out[_HL7_TOPIC if entry.code == "AA" else bus.DEADLETTER].inc()
            touched.add(entry.conn)
        for conn in touched:
            try:
                conn.flush()
            except Exception:
                log.exception("MLLP: cannot answer %s; closing the connection", conn.peer)
                conn.abort()

    async def _housekeeping(self) -> None:
        limits = self.limits
        tick = max(0.05, min(1.0, limits.idle_timeout / 4, limits.kafka_timeout / 4))
        while True:
            await asyncio.sleep(tick)
            beat()  # liveness: /health on --metrics-port fails if the event loop stalls
            now = time.monotonic()
            for conn in list(self.conns):
                try:
                    conn.expire(now)
                except Exception:
                    log.exception("MLLP: housekeeping failed for %s", conn.peer)
                    conn.abort()


# -- the synchronous client ------------------------------------------------------------


def send(
    host: str,
    port: int,
    messages: Iterable[bytes],
    *,
    timeout: float = 10.0,
    window: int = 1,
) -> list[bytes]:
    """Send messages over one MLLP connection; the ACK frame contents, in order.

    ``window`` > 1 pipelines: up to that many messages are sent before an ACK is read.
    Raises ``ConnectionError`` if the server closes the connection before every ACK came,
    ``TimeoutError`` if an ACK takes longer than ``timeout``.
    """
    if window < 1:
        raise ValueError("window must be at least 1")
    acks: list[bytes] = []
    with socket.create_connection((host, port), timeout) as sock:
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = _AckReader(sock)
        outstanding = 0
        for message in messages:
            if outstanding >= window:
                acks.append(reader.next(len(acks)))
                outstanding -= 1
            sock.sendall(START_BLOCK + message + END_BLOCK)
            outstanding += 1
        while outstanding:
            acks.append(reader.next(len(acks)))
            outstanding -= 1
    return acks


class _AckReader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def next(self, received: int) -> bytes:
        buf = self.buf
        while True:
            i = buf.find(VT)
            if i >= 0:
                j = buf.find(FS, i + 1)
                if j >= 0:
                    frame = bytes(buf[i + 1 : j])
                    end = j + 2 if buf[j + 1 : j + 2] == b"\r" else j + 1
                    del buf[:end]
                    return frame
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(
                    f"the MLLP server closed the connection after {received} ACK(s)"
                )
            buf += chunk


def ack_code(ack: bytes) -> str:
    """MSA-1 of an ACK (AA, AE, AR, CA, CE, CR); ValueError if it has no MSA segment."""
    text = ack.decode("latin-1")
    if not text.startswith("MSH") or len(text) < 5:
        raise ValueError(f"not an HL7 ACK: {ack[:40]!r}")
    fs, cs = text[3], text[4]
    for line in text.replace("\n", "\r").split("\r"):
        if line.startswith("MSA" + fs):
            return line.split(fs)[1].split(cs)[0]
    raise ValueError(f"the ACK has no MSA segment: {ack[:80]!r}")
