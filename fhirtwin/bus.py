"""Kafka plumbing: topic names, producers and consumers with the settings the pipeline needs.

The client is confluent-kafka (librdkafka). kafka-python, the other maintained client,
was measured here against the same broker: 1.1k vs 4.7k acknowledged single produces/s
and 7.5k vs 88k pipelined produces/s (4 KB messages); the MLLP goals need the latter.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

__all__ = [
    "AUDIT",
    "AUDIT_CHECKPOINTS",
    "DEADLETTER",
    "RAW_TOPICS",
    "RESOURCES",
    "RESULTS",
    "SOURCE_KINDS",
    "TWIN_EVENTS",
    "NotAcknowledged",
    "Record",
    "consumer",
    "ensure_topics",
    "group_lag",
    "header",
    "producer",
    "read_topic",
    "send_acked",
]

SOURCE_KINDS = ("hl7v2", "ccda", "csv", "fhir", "notes")
RAW_TOPICS = {kind: f"ehr.{kind}" for kind in SOURCE_KINDS}
RESOURCES = "fhir.resources"
DEADLETTER = "twin.deadletter"
TWIN_EVENTS = "twin.events"
AUDIT = "twin.audit"  # one partition: the audit log has one total order (fhirtwin/audit.py)
AUDIT_CHECKPOINTS = "twin.audit.checkpoints"  # the signed checkpoints, published
RESULTS = "twin.results"  # twin services' results coming back (fhirtwin/results.py)
ALL_TOPICS = (
    *RAW_TOPICS.values(),
    RESOURCES,
    DEADLETTER,
    TWIN_EVENTS,
    AUDIT,
    AUDIT_CHECKPOINTS,
    RESULTS,
)
SINGLE_PARTITION = {AUDIT, AUDIT_CHECKPOINTS}

log = logging.getLogger("fhirtwin.kafka")


def _site_conf() -> dict[str, str]:
    """librdkafka settings from the environment, for every client: FHIRTWIN_KAFKA_CONF_<KEY>,
    KEY with dots as underscores (FHIRTWIN_KAFKA_CONF_SECURITY_PROTOCOL=SASL_SSL,
    …_SASL_MECHANISM, …_SASL_USERNAME, …_SASL_PASSWORD, …_SSL_CA_LOCATION). The Helm chart
    fills them from its values and Kubernetes Secrets (docs/deploy.md)."""
    prefix = "FHIRTWIN_KAFKA_CONF_"
    return {
        k[len(prefix) :].lower().replace("_", "."): v
        for k, v in os.environ.items()
        if k.startswith(prefix) and v
    }


# librdkafka: errors only (it reports broker restarts as warnings); plus the site's SASL/TLS
_QUIET: dict[str, Any] = {"log_level": 3, **_site_conf()}


def _logger() -> logging.Logger:
    return logging.getLogger("fhirtwin.librdkafka")


class NotAcknowledged(RuntimeError):
    """Kafka did not acknowledge every record of a send_acked call."""


def send_acked(
    prod: Any,
    records: Sequence[tuple[str, bytes, bytes | None, Sequence[tuple[str, bytes]]]],
    *,
    timeout: float = 15,
) -> None:
    """Produce (topic, value, key, headers) records and return only once every one is
    acknowledged (acks=all); NotAcknowledged otherwise. For writes that must be durable
    before an answer is given: an audit record, an erasure notice, a Consent."""
    errors: list[str] = []

    def done(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    topics = sorted({topic for topic, _, _, _ in records})
    for topic, value, key, headers in records:
        prod.produce(topic, value, key, headers=list(headers), on_delivery=done)
    if prod.flush(timeout) != 0 or errors:
        raise NotAcknowledged(
            f"{', '.join(topics)}: not acknowledged ({'; '.join(errors[:3]) or 'timeout'})"
        )


def producer(bootstrap: str, *, linger_ms: float = 1, **extra: Any) -> Any:
    """A producer whose delivery reports mean 'on every in-sync replica' (acks=all)."""
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "linger.ms": linger_ms,
        "compression.type": "none",
        "message.max.bytes": 16 * 1024 * 1024,
        "queue.buffering.max.kbytes": 256 * 1024,
        "logger": _logger(),
        **_QUIET,
    }
    conf.update(extra)
    return Producer(conf)


def fetch_pace_ms() -> int:
    """$FHIRTWIN_FETCH_PACE_MS: the least time between two fetches of one partition by a
    stream worker (0: as often as records come, librdkafka's default)."""
    raw = os.environ.get("FHIRTWIN_FETCH_PACE_MS") or "0"
    try:
        return max(0, int(raw))
    except ValueError:
        raise ValueError(f"FHIRTWIN_FETCH_PACE_MS={raw!r}: give a whole number of ms") from None


def paced(pace_ms: int) -> dict[str, Any]:
    """Consumer settings that fetch a partition at most once per ``pace_ms`` while records
    wait in the client's queue: librdkafka stops fetching once one record is queued and looks
    again ``pace_ms`` later. The embedded broker (Tansu, ``memory://``) lists every batch a
    partition holds on each fetch that finds new records, so fetching as each record lands
    costs it more the longer it runs; pacing bounds the fetches. Each stage then adds up to
    ``pace_ms`` of latency. Apache Kafka indexes its logs and needs none (the default 0)."""
    if pace_ms <= 0:
        return {}
    return {"queued.min.messages": 1, "fetch.queue.backoff.ms": pace_ms}


def consumer(bootstrap: str, group: str, *, pace_ms: int = 0, **extra: Any) -> Any:
    """A consumer-group member that commits by hand (after the durable write) from the start;
    ``pace_ms``: see ``paced``."""
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        # Tansu's group join and rebalance take ~3 s; keep failure detection short too.
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1000,
        "max.poll.interval.ms": 300000,
        "fetch.wait.max.ms": 50,
        **paced(pace_ms),
        "logger": _logger(),
        **_QUIET,
    }
    conf.update(extra)
    return Consumer(conf)


def _replication() -> int:
    """$FHIRTWIN_KAFKA_REPLICATION_FACTOR (default 1: the embedded broker; a cluster sets 3)."""
    return int(os.environ.get("FHIRTWIN_KAFKA_REPLICATION_FACTOR") or 1)


def ensure_topics(bootstrap: str, topics: Sequence[str] = ALL_TOPICS, partitions: int = 4) -> None:
    """Create the topics that do not exist yet (idempotent)."""
    admin = _admin(bootstrap)
    existing = set(admin.list_topics(timeout=10).topics)
    new = [
        NewTopic(t, 1 if t in SINGLE_PARTITION else partitions, _replication())
        for t in topics
        if t not in existing
    ]
    if not new:
        return
    for topic, fut in admin.create_topics(new, operation_timeout=10).items():
        try:
            fut.result()
        except KafkaException as exc:
            err = exc.args[0]
            if err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"cannot create Kafka topic {topic}: {err.str()}") from exc


def delete_topics(bootstrap: str, topics: Sequence[str]) -> None:
    admin = _admin(bootstrap)
    for fut in admin.delete_topics(list(topics), operation_timeout=10).values():
        with contextlib.suppress(KafkaException):
            fut.result()


def header(msg: Any, name: str, default: str = "") -> str:
    for key, value in msg.headers() or ():
        if key == name and value is not None:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return default


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]

    @classmethod
    def of(cls, msg: Any) -> Record:
        _, ts = msg.timestamp()
        return cls(
            msg.topic(),
            msg.partition(),
            msg.offset(),
            int(ts),
            msg.key(),
            msg.value() or b"",
            tuple((k, v or b"") for k, v in (msg.headers() or ())),
        )

    def header(self, name: str, default: str = "") -> str:
        for key, value in self.headers:
            if key == name:
                return value.decode("utf-8", "replace")
        return default

    @property
    def ref(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


def _reader(bootstrap: str) -> Any:
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": "fhirtwin-reader",
        "enable.auto.commit": False,
        "logger": _logger(),
        **_QUIET,
    }
    return Consumer(conf)


def _admin(bootstrap: str) -> Any:
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": _logger(), **_QUIET}
    return AdminClient(conf)


def partitions_of(bootstrap: str, topic: str) -> list[int]:
    admin = _admin(bootstrap)
    meta = admin.list_topics(topic, timeout=10).topics.get(topic)
    if meta is None or meta.error is not None:
        return []
    return sorted(meta.partitions)


def end_offsets(bootstrap: str, topic: str, timeout: float = 10.0) -> dict[int, int]:
    """The true end offset (last offset + 1) of each non-empty partition.

    Tansu 0.6 reports a high watermark of *base offset of the last batch + 1*, which is
    short by the size of that batch when it holds several records. So read the last
    batch (it starts at high watermark - 1) and take the greatest offset in it; with
    Apache Kafka that is the high watermark itself.
    """
    c = _reader(bootstrap)
    try:
        ends: dict[int, int] = {}
        for p in partitions_of(bootstrap, topic):
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            if hi > lo:
                ends[p] = hi
        if not ends:
            return {}
        c.assign([TopicPartition(topic, p, hi - 1) for p, hi in ends.items()])
        pending = set(ends)
        deadline = time.monotonic() + timeout
        quiet_until = None
        while time.monotonic() < deadline:
            msgs = c.consume(10000, 0.05)
            for msg in msgs:
                if msg.error():
                    continue
                p = msg.partition()
                ends[p] = max(ends[p], msg.offset() + 1)
                pending.discard(p)
            if msgs:
                quiet_until = None
            elif not pending:
                # every partition answered; one more quiet poll to drain the last batches
                if quiet_until is None:
                    quiet_until = time.monotonic() + 0.1
                elif time.monotonic() > quiet_until:
                    break
        return ends
    finally:
        c.close()


def read_topic(bootstrap: str, topic: str, timeout: float = 10.0) -> Iterator[Record]:
    """Every record of a topic from the beginning up to its end as of now (no group)."""
    c = _reader(bootstrap)
    try:
        ends = end_offsets(bootstrap, topic, timeout)
        if not ends:
            return
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            for msg in c.consume(1000, 0.5):
                if msg.error():
                    continue
                p = msg.partition()
                if p in ends and msg.offset() < ends[p]:
                    yield Record.of(msg)
                    deadline = time.monotonic() + timeout
                if p in ends and msg.offset() >= ends[p] - 1:
                    del ends[p]
    finally:
        c.close()


def group_lag(bootstrap: str, group: str, topics: Sequence[str]) -> int:
    """Records of ``topics`` that ``group`` has not committed yet (all partitions)."""
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "logger": _logger(),
        **_QUIET,
    }
    c: Any = Consumer(conf)
    try:
        lag = 0
        tps = [TopicPartition(t, p) for t in topics for p in partitions_of(bootstrap, t)]
        if not tps:
            return 0
        ends = {t: end_offsets(bootstrap, t) for t in topics}
        for tp in c.committed(tps, timeout=10):
            hi = ends[tp.topic].get(tp.partition, 0)
            done = tp.offset if tp.offset >= 0 else 0
            lag += max(0, hi - done)
        return lag
    finally:
        c.close()
