"""The streaming runtime: consume a batch, handle it, write durably, then commit.

It knows no clinical format. A handler turns one consumed record into output records;
the loop produces them (acks=all), waits until every one is acknowledged, and only then
commits the consumed offsets. A crash anywhere before the commit means the batch is
consumed again (at least once); the handlers downstream are idempotent.

A handler that raises on one record does not stop the worker: the loop sends that
record to the dead-letter topic with stage ``internal`` and goes on.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from fhirtwin import bus, heap, metrics
from fhirtwin.crypto import default_keyring
from fhirtwin.metrics import DEADLETTERS, MESSAGES_IN, MESSAGES_OUT, beat

__all__ = ["Out", "StreamWorker", "dead_letter", "install_stop_signals", "internal_dead_letter"]

log = logging.getLogger("fhirtwin.worker")

# Failures of the servers, not of a record: never dead-letter for these; stop, restart, redo.
# On a Redis Cluster also a failover in progress (a slot without a master for a moment).
INFRA_ERRORS = (
    OSError,
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
)


@dataclass(slots=True)
class Out:
    topic: str
    value: bytes
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


# How long an idle worker's poll() waits before its loop turns again (stop, liveness).
_IDLE_POLL_S = 0.25

# Commit errors that mean "this member no longer owns these partitions".
_REBALANCED = {
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError._ASSIGNMENT_LOST,
}


def dead_letter(
    rec: bus.Record, *, stage: str, reason: str, error: dict[str, Any] | None = None
) -> Out:
    """The original bytes and headers, plus what went wrong, where, and at which stage."""
    headers = [h for h in rec.headers if not h[0].startswith("fhirtwin-dl-")]
    headers += [
        ("fhirtwin-dl-stage", stage.encode()),
        # what went wrong can quote the record: sealed like it (fhirtwin/crypto.py)
        ("fhirtwin-dl-reason", default_keyring().seal_raw(reason.encode("utf-8", "replace"))),
        ("fhirtwin-dl-error", default_keyring().seal_raw(orjson.dumps(error or {}))),
        ("fhirtwin-dl-source", rec.ref.encode()),
        ("fhirtwin-dl-at", str(int(time.time() * 1000)).encode()),
    ]
    DEADLETTERS.labels(stage).inc()
    return Out(bus.DEADLETTER, rec.value, rec.key, headers)


def internal_dead_letter(rec: bus.Record, exc: BaseException) -> Out:
    """The dead letter of a record a handler failed on with an unexpected exception (a bug,
    not bad input): the original bytes, the exception and where it was raised. Call it
    inside the ``except`` block, where the traceback is at hand."""
    return dead_letter(
        rec,
        stage="internal",
        reason=f"{type(exc).__name__}: {exc}",
        error={"traceback": traceback.format_exc(limit=8)},
    )


def install_stop_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


class StreamWorker:
    """One consumer-group member running ``handle`` over ``topics``."""

    def __init__(
        self,
        bootstrap: str,
        group: str,
        topics: Sequence[str],
        handle: Callable[[list[bus.Record]], list[list[Out]]],
        *,
        batch: int = 500,
        after_batch: Callable[[], None] | None = None,
    ) -> None:
        self.bootstrap, self.group, self.topics = bootstrap, group, list(topics)
        self.handle = handle
        self.batch = batch
        self.after_batch = after_batch
        self.assigned: list[int] = []
        self.processed = 0

    def run(self, stop: threading.Event, *, idle_exit: float | None = None) -> int:
        """Run until ``stop`` is set (or, with ``idle_exit``, until nothing came for that long)."""
        consumer = bus.consumer(self.bootstrap, self.group, pace_ms=bus.fetch_pace_ms())
        producer = bus.producer(self.bootstrap, linger_ms=5)

        def on_assign(c: Any, parts: list[TopicPartition]) -> None:
            self.assigned = sorted(p.partition for p in parts)
            log.info("%s assigned partitions %s", self.group, self.assigned)

        def on_revoke(c: Any, parts: list[TopicPartition]) -> None:
            self.assigned = []

        consumer.subscribe(self.topics, on_assign=on_assign, on_revoke=on_revoke)
        last = time.monotonic()
        failures: list[str] = []
        tally: dict[Any, int] = {}  # messages in, then out: one write per topic and batch
        heap.settle()
        settled = False  # again after the first batch: the rules it needed are compiled

        def delivered(err: KafkaError | None, msg: Any) -> None:
            if err is not None:
                failures.append(f"{msg.topic()}: {err.str()}")

        idle = False
        try:
            while not stop.is_set():
                beat()  # liveness: /health answers 503 if this loop stops turning
                if idle:
                    # Nothing came last time: wait for the first record in poll(), which
                    # returns as soon as one is there, instead of waking 50 times a second
                    # (an idle worker then costs ~0.003 cores, not ~0.006); then take what
                    # its fetch brought along, without waiting.
                    first = consumer.poll(_IDLE_POLL_S)
                    msgs = [] if first is None else [first]
                    if msgs and self.batch > 1:
                        msgs += consumer.consume(self.batch - 1, 0)
                else:
                    # A short wait: consume() blocks until the batch is full or the time is
                    # up, so this bounds the latency a busy stage adds (~20 ms, not 200).
                    msgs = consumer.consume(self.batch, 0.02)
                recs = []
                for m in msgs:
                    err = m.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            log.warning("consume error: %s", err.str())
                        continue
                    recs.append(bus.Record.of(m))
                idle = not recs
                if not recs:
                    if not self.assigned:
                        last = time.monotonic()  # joining the group is not idleness
                    elif idle_exit is not None and time.monotonic() - last > idle_exit:
                        break
                    continue
                last = time.monotonic()
                for rec in recs:
                    metrics.count(MESSAGES_IN, (rec.topic,), 1, tally)
                metrics.flush(tally)  # counted even if handling fails, as before
                outs = self._handle(recs)
                for per_record in outs:
                    for out in per_record:
                        self._produce(producer, out, delivered)
                        metrics.count(MESSAGES_OUT, (out.topic,), 1, tally)
                metrics.flush(tally)
                remaining = producer.flush(30)
                if remaining or failures:
                    raise RuntimeError(
                        f"Kafka did not acknowledge {remaining} records ({'; '.join(failures[:3])});"
                        " not committing, the batch will be consumed again"
                    )
                if self.after_batch is not None:
                    self.after_batch()
                ends: dict[tuple[str, int], int] = {}
                for rec in recs:
                    ends[(rec.topic, rec.partition)] = rec.offset + 1
                try:
                    consumer.commit(
                        offsets=[TopicPartition(t, p, o) for (t, p), o in ends.items()],
                        asynchronous=False,
                    )
                except KafkaException as exc:
                    # The group moved on without us (a rebalance, or a heartbeat starved on
                    # a loaded machine): whoever owns the partitions now consumes this batch
                    # again. Its outputs are already durable and applying them is
                    # idempotent, so this is a duplicate, never a loss. Keep running.
                    if exc.args[0].code() not in _REBALANCED:
                        raise
                    log.warning(
                        "%s: commit refused (%s); the batch will be redelivered",
                        self.group,
                        exc.args[0].str(),
                    )
                    continue
                self.processed += len(recs)
                if not settled:
                    heap.settle()
                    settled = True
        finally:
            producer.flush(10)
            consumer.close()
        return self.processed

    def _handle(self, recs: list[bus.Record]) -> list[list[Out]]:
        try:
            return self.handle(recs)
        except INFRA_ERRORS:
            raise
        except Exception:  # one record is at fault: find it, dead-letter it, keep the rest
            log.exception("batch handler failed; handling records one by one")
        outs: list[list[Out]] = []
        for rec in recs:
            try:
                outs += self.handle([rec])
            except INFRA_ERRORS:
                raise
            except Exception as exc:
                outs.append([internal_dead_letter(rec, exc)])
        return outs

    @staticmethod
    def _produce(producer: Any, out: Out, on_delivery: Callable[..., None]) -> None:
        while True:
            try:
                producer.produce(
                    out.topic,
                    value=out.value,
                    key=out.key,
                    headers=out.headers,
                    on_delivery=on_delivery,
                )
                return
            except BufferError:
                producer.poll(0.05)
