"""Dead letters: what could not be converted, kept with its original bytes, and replay.

A dead letter is a record of ``twin.deadletter``: the original bytes and headers of the
input, plus ``fhirtwin-dl-stage`` (mllp, parse, map, validate, identity, assemble,
internal), ``fhirtwin-dl-reason`` (what and where, and what to do), ``fhirtwin-dl-error``
(the same as JSON) and ``fhirtwin-dl-source`` (the record or connection it came from).
Its id is ``<partition>:<offset>``.

Replay puts the original bytes and headers back on the raw topic they came from, with
``fhirtwin-replay-of: <id>``, after the engineer fixed the mapping. Replayed ids are
remembered in Redis (``ft:dl:replayed``) so `list` shows what is still open.

When the input itself is at fault (an ADT without its PID) and the sender cannot send it
again, the engineer may replay a **corrected copy** instead (``replay ID --with FILE``):
it goes to the same raw topic, sealed like any raw record, with ``fhirtwin-replay-of``
and ``fhirtwin-corrected-of: <id>``; the dead letter keeps the original, untouched, and
``ft:dl:corrected`` remembers when, how long and the SHA-256 of what replaced it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import orjson

from fhirtwin import bus
from fhirtwin.redisconn import connect

__all__ = ["DeadLetter", "corrections", "list_deadletters", "replay", "replay_corrected"]

REPLAYED = "ft:dl:replayed"
CORRECTED = "ft:dl:corrected"  # dead letter id → JSON {at_ms, bytes, sha256} of its copy


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    record: bus.Record

    @property
    def stage(self) -> str:
        return self.record.header("fhirtwin-dl-stage")

    @property
    def reason(self) -> str:
        return self._opened("fhirtwin-dl-reason")

    def _opened(self, name: str, default: str = "") -> str:
        """A header that is stored sealed (fhirtwin/crypto.py SEALED_HEADERS), opened."""
        from fhirtwin.crypto import CryptoError, default_keyring, is_sealed_raw

        raw = next((v for k, v in self.record.headers if k == name), None)
        if raw is None:
            return default
        if is_sealed_raw(raw):
            try:
                raw = default_keyring().open_raw(raw)
            except CryptoError as exc:
                return f"(unreadable: {exc})"
        return raw.decode("utf-8", "replace")

    @property
    def source(self) -> str:
        return self.record.header("fhirtwin-dl-source")

    @property
    def kind(self) -> str:
        return self.record.header("fhirtwin-source-kind", "hl7v2")

    @property
    def at_ms(self) -> int:
        v = self.record.header("fhirtwin-dl-at")
        return int(v) if v.isdigit() else self.record.timestamp_ms

    @property
    def error(self) -> dict[str, Any]:
        try:
            data = orjson.loads(self._opened("fhirtwin-dl-error", "{}"))
        except orjson.JSONDecodeError:
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def topic(self) -> str:
        """The topic to replay into: the one the record was consumed from."""
        head = self.source.split("/", 1)[0]
        if "." in head:  # a topic: ehr.<kind>, twin.results, fhir.resources
            return head
        return bus.RAW_TOPICS.get(self.kind, bus.RAW_TOPICS["hl7v2"])  # e.g. mllp/<peer>

    @property
    def original(self) -> bytes:
        """The original bytes in clear: raw records and fhir.resources events are stored
        sealed (fhirtwin/crypto.py); an expired or erased key gives CryptoError."""
        from fhirtwin.crypto import default_keyring, is_sealed_raw, open_event

        value = self.record.value
        if is_sealed_raw(value):
            return default_keyring().open_raw(value)
        if self.topic == bus.RESOURCES and self.record.key:
            return open_event(default_keyring(), self.record.key.decode(), value)
        return value

    def as_dict(
        self, replayed: bool = False, corrected: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "at_ms": self.at_ms,
            "stage": self.stage,
            "kind": self.kind,
            "source": self.source,
            "reason": self.reason,
            "error": self.error,
            "replay_of": self.record.header("fhirtwin-replay-of") or None,
            "replayed": replayed,
            "corrected": corrected,  # replayed as a corrected copy: when, bytes, SHA-256
            "bytes": len(self.record.value),
        }


def list_deadletters(bootstrap: str) -> list[DeadLetter]:
    return [
        DeadLetter(f"{rec.partition}:{rec.offset}", rec)
        for rec in bus.read_topic(bootstrap, bus.DEADLETTER)
    ]


def replayed_ids(redis_url: str) -> set[str]:
    client: Any = connect(redis_url)
    return {x.decode() for x in client.smembers(REPLAYED)}


def replay(bootstrap: str, redis_url: str, letters: list[DeadLetter]) -> int:
    """Put each dead letter's original bytes back on its raw topic; returns how many."""
    if not letters:
        return 0
    _produce(bootstrap, [(dl, dl.record.value, []) for dl in letters])
    connect(redis_url).sadd(REPLAYED, *[dl.id for dl in letters])
    return len(letters)


def replay_corrected(bootstrap: str, redis_url: str, dl: DeadLetter, corrected: bytes) -> None:
    """Put a corrected copy of one dead letter's input on its raw topic instead of the
    original, which stays in the dead letters as it was. ValueError when there is nothing
    to correct: an empty copy, or a dead letter that is not raw input (a twin event)."""
    from fhirtwin.crypto import default_keyring, is_sealed_raw

    if dl.topic not in bus.RAW_TOPICS.values():
        raise ValueError(
            f"dead letter {dl.id} came from {dl.topic}, not from an input topic: only input "
            "can be replaced by a corrected copy; replay it as it is"
        )
    if not corrected.strip():
        raise ValueError("the corrected copy is empty")
    sealed = is_sealed_raw(dl.record.value)
    value = default_keyring().seal_raw(corrected) if sealed else corrected
    key = dl.record.key
    if dl.kind == "hl7v2":
        # keyed by the patient of the copy, as the MLLP listener keys it (the original,
        # without its PID, had no patient to keep in order with)
        from fhirtwin.ingest import hl7v2_patient_key

        if (patient := hl7v2_patient_key(corrected)) is not None:
            blind = default_keyring().blind(patient.decode("utf-8", "replace")).encode()
            key = blind if sealed else patient
    _produce(bootstrap, [(dl, value, [("fhirtwin-corrected-of", dl.id.encode())])], key)
    note = {
        "at_ms": int(time.time() * 1000),
        "bytes": len(corrected),
        "sha256": hashlib.sha256(corrected).hexdigest(),
    }
    r = connect(redis_url)
    r.hset(CORRECTED, dl.id, orjson.dumps(note))
    r.sadd(REPLAYED, dl.id)


def corrections(redis_url: str) -> dict[str, dict[str, Any]]:
    """Dead letter id → what replaced it (when, how many bytes, SHA-256)."""
    client: Any = connect(redis_url)
    return {k.decode(): orjson.loads(v) for k, v in client.hgetall(CORRECTED).items()}


def _produce(
    bootstrap: str,
    items: list[tuple[DeadLetter, bytes, list[tuple[str, bytes]]]],
    key: bytes | None = None,
) -> None:
    """Each (dead letter, value, extra headers) onto the dead letter's raw topic, with its
    input headers (not the dead letter's own) and ``fhirtwin-replay-of``, keyed as the
    dead letter (or by ``key``); waits for Kafka."""
    producer: Any = bus.producer(bootstrap)
    failures: list[str] = []

    def delivered(err: object, msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    for dl, value, extra in items:
        drop = ("fhirtwin-replay-of", "fhirtwin-corrected-of")
        headers = [
            h for h in dl.record.headers if not h[0].startswith("fhirtwin-dl-") and h[0] not in drop
        ]
        headers += [("fhirtwin-replay-of", dl.id.encode()), *extra]
        producer.produce(
            dl.topic, value, key or dl.record.key, headers=headers, on_delivery=delivered
        )
    left = producer.flush(30)
    if left or failures:
        raise RuntimeError(
            f"Kafka did not acknowledge the replay ({'; '.join(failures[:3]) or 'timeout'})"
        )
