"""Helpers for pipeline tests: run workers in threads until the topics are drained."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import redis

from fhirtwin import bus
from fhirtwin.assemble import AssembleWorker
from fhirtwin.crypto import default_keyring, open_event, open_raw_headers
from fhirtwin.ingest import ingest
from fhirtwin.normalize import NormalizeWorker
from fhirtwin.twin import TwinStore


def produce(bootstrap: str, topic: str, values: list[bytes], *, key: bytes | None = None) -> None:
    p: Any = bus.producer(bootstrap, linger_ms=5)
    for v in values:
        while True:
            try:
                p.produce(topic, v, key, headers=[("fhirtwin-source-kind", b"hl7v2")])
                break
            except BufferError:
                p.poll(0.05)
    assert p.flush(30) == 0


def drain(
    bootstrap: str,
    redis_url: str,
    *,
    validate: bool = False,
    mappings: Path | None = None,
    idle: float = 2.0,
    kinds: Sequence[str] = ("hl7v2",),
) -> tuple[int, int]:
    """Run a normalize worker per source kind, in order, each until idle, and an assembler
    beside them until it has caught up; (records normalized, records assembled)."""
    stop = threading.Event()
    assembler = AssembleWorker(bootstrap, redis_url)
    thread = threading.Thread(target=assembler.run, args=(stop,))
    thread.start()
    try:
        n = 0
        for kind in kinds:
            worker = NormalizeWorker(
                bootstrap, redis_url, kind, validate=validate, mappings=mappings
            )
            n += worker.run(threading.Event(), idle_exit=idle)
        wait_for(
            lambda: bus.group_lag(bootstrap, "fhirtwin-assemble", [bus.RESOURCES]) == 0,
            timeout=120,
            what="the assembler to catch up",
        )
    finally:
        stop.set()
        thread.join(30)
    return n, assembler.stream.processed


EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "hl7v2"


@dataclasses.dataclass
class ExampleTwins:
    """The shipped HL7 v2 examples, through the pipeline: patient A (MRN448812) and B
    (MRN550021), their twins and their Patient ids."""

    client: Any  # redis.Redis
    store: TwinStore
    twin_a: str
    twin_b: str
    a: str
    b: str


def ingest_examples(bootstrap: str, redis_url: str) -> ExampleTwins:
    """Create the topics, ingest ``examples/hl7v2`` and drain it into the twin store."""
    bus.ensure_topics(bootstrap, partitions=4)
    ingest(bootstrap, "hl7v2", [str(EXAMPLES)])
    drain(bootstrap, redis_url)
    client = redis.Redis.from_url(redis_url)
    store = TwinStore(client)
    twin_a, twin_b = store.resolve("MRN448812"), store.resolve("MRN550021")
    assert twin_a and twin_b

    def pid(twin: str) -> str:
        return next(x["id"] for x in store.resources(twin) if x["resourceType"] == "Patient")

    return ExampleTwins(client, store, twin_a, twin_b, pid(twin_a), pid(twin_b))


def opened(rec: bus.Record) -> bus.Record:
    """The record as its producer meant it: fhirtwin seals raw records (epoch key) and
    ``fhir.resources`` events (the twin's key) before they reach Kafka (fhirtwin/crypto.py)."""
    keys = default_keyring()
    if rec.topic == bus.RESOURCES:
        value = open_event(keys, (rec.key or b"").decode(), rec.value)
    else:
        value = keys.open_raw(rec.value)
    return dataclasses.replace(rec, value=value, headers=open_raw_headers(keys, rec.headers))


def records(bootstrap: str, topic: str, *, sealed: bool = False) -> list[bus.Record]:
    """Every record of the topic, opened (``sealed=True``: as stored in Kafka)."""
    recs = list(bus.read_topic(bootstrap, topic, timeout=5))
    return recs if sealed else [opened(r) for r in recs]


def read_topic(bootstrap: str, topic: str, **kw: Any) -> list[bus.Record]:
    """``bus.read_topic``, opened."""
    return [opened(r) for r in bus.read_topic(bootstrap, topic, **kw)]


def blind(value: str) -> bytes:
    """The blind index fhirtwin keys a patient's raw records by (and looks identifiers up by)."""
    return default_keyring().blind(value).encode()


def events(bootstrap: str) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in records(bootstrap, bus.TWIN_EVENTS)]


def wait_for(cond: Any, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def two_patients_and_a_merge(event: bytes = b"A40^ADT_A39") -> tuple[bytes, bytes, bytes]:
    """The shipped admission of MRN448812, the same admission for another patient
    (MRN999001), and an ADT merge (A40 unless told) that says MRN999001 is MRN448812."""
    a01 = (EXAMPLES / "adt-a01-admit.hl7").read_bytes()
    other = a01.replace(b"MRN448812", b"MRN999001").replace(b"ADT0001", b"ADT0901")
    merge = (
        b"MSH|^~\\&|EPICADT|NORTHGEN|FHIRTWIN|TWINHUB|20261110100000-0500||ADT^%s|"
        b"MRG0001|P|2.5.1\r"
        b"EVN|%s|20261110100000-0500\r"
        b"PID|1||MRN448812^^^NORTHGEN&2.16.840.1.113883.3.9001.1&ISO^MR||Okafor^Adaeze\r"
        b"MRG|MRN999001^^^NORTHGEN&2.16.840.1.113883.3.9001.1&ISO^MR\r"
    ) % (event, event[:3])
    return a01, other, merge
