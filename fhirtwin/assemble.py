"""The twin assembler: events of ``fhir.resources`` → idempotent writes to the Redis twin.

Offsets are committed only after the Redis write (the stream runtime does that). For each
event that changed something, a twin event goes to ``twin.events`` (keyed by twin id) for
the snapshot publisher: ``{"twin", "type": "update"|"merge", "changed": [...], "record",
"at", "source"}`` (``source``: the raw record and control id that caused it). A
merge says which twin was merged into which, so no subscriber sees a silent move.

`rebuild` replays ``fhir.resources`` from the beginning into an empty Redis with the same
code path, so the result is the same twin (same content hashes).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import orjson

from fhirtwin import bus
from fhirtwin.crypto import CryptoError, ErasedError, open_event
from fhirtwin.erasure import ERASED_DROPPED
from fhirtwin.metrics import LATENCY, TWIN_UPDATES
from fhirtwin.redisconn import connect
from fhirtwin.twin import TwinStore
from fhirtwin.worker import Out, StreamWorker, dead_letter

__all__ = ["AssembleWorker", "apply_event", "rebuild"]

log = logging.getLogger("fhirtwin.assemble")


def read_event(store: TwinStore, rec: bus.Record) -> dict[str, Any]:
    """The event of a ``fhir.resources`` record, opened with its twin's key (the record key).

    ErasedError for an erased twin; CryptoError for a value fhirtwin did not seal."""
    twin = (rec.key or b"").decode()
    if not twin:
        raise KeyError("no record key: events on fhir.resources are keyed by their twin id")
    event: dict[str, Any] = orjson.loads(open_event(store.keys, twin, rec.value))
    if event.get("twin") != twin:
        raise KeyError(f"event of twin {event.get('twin')!r} under record key {twin!r}")
    return event


def apply_event(store: TwinStore, rec: bus.Record) -> list[Out]:
    """Apply one ``fhir.resources`` record to the store; the twin events it causes."""
    try:
        event = read_event(store, rec)
    except ErasedError:
        ERASED_DROPPED.labels("assemble").inc()
        return []
    twin = event["twin"]
    outs: list[Out] = []
    decision = event.get("identity") or {}
    merge_from = event.get("merge_from")
    if merge_from and merge_from != twin:
        moved = store.merge(merge_from, twin, known_ms=rec.timestamp_ms, reason=decision)
        outs.append(
            _twin_event(
                twin,
                {"type": "merge", "merged": merge_from, "into": twin, "changed": moved},
                rec,
            )
        )
    applied = store.apply(
        twin,
        event.get("resources") or [],
        event_ms=int(event.get("event_ms") or rec.timestamp_ms),
        known_ms=rec.timestamp_ms,
        src=rec.ref,
        identifiers=event.get("identifiers") or (),
        shared=twin.startswith("_"),
        deleted=event.get("deleted") or (),
    )
    # Keep every decision that changed identity (a new twin, a new identifier linked, a
    # merge, a conflict); a plain match of known identifiers is not worth a record per event.
    new_ids = set(decision.get("linked", ())) - set(decision.get("matched", ()))
    rule = decision.get("rule")
    if (
        rule not in (None, "identifier", "no-patient", "deletion")
        or decision.get("conflicts")
        or new_ids
    ):
        store.record_link(
            applied.twin,
            {**decision, "record": rec.ref, "source": event.get("source"), "at": rec.timestamp_ms},
        )
    if applied.changed:
        TWIN_UPDATES.inc(len(applied.changed))
        outs.append(
            _twin_event(
                applied.twin,
                {"type": "update", "changed": applied.changed},
                rec,
                event.get("source"),
            )
        )
    return outs


def _twin_event(
    twin: str, body: dict[str, Any], rec: bus.Record, source: dict[str, Any] | None = None
) -> Out:
    body = {"twin": twin, **body, "record": rec.ref, "at": rec.timestamp_ms}
    if source:
        body["source"] = source
    return Out(bus.TWIN_EVENTS, orjson.dumps(body), twin.encode())


class AssembleWorker:
    def __init__(self, bootstrap: str, redis_url: str, *, group: str = "fhirtwin-assemble") -> None:
        self.store = TwinStore(connect(redis_url))
        self.stream = StreamWorker(bootstrap, group, [bus.RESOURCES], self.handle, batch=200)

    def run(self, stop: threading.Event, idle_exit: float | None = None) -> int:
        return self.stream.run(stop, idle_exit=idle_exit)

    def handle(self, recs: list[bus.Record]) -> list[list[Out]]:
        out = []
        for rec in recs:
            t0 = time.perf_counter()
            try:
                out.append(apply_event(self.store, rec))
            except (orjson.JSONDecodeError, KeyError, TypeError, CryptoError) as exc:
                out.append(
                    [
                        dead_letter(
                            rec,
                            stage="assemble",
                            reason=f"not a fhirtwin event ({type(exc).__name__}: {exc}); "
                            "only normalize workers should write to fhir.resources",
                        )
                    ]
                )
            LATENCY.labels("assemble").observe(time.perf_counter() - t0)
        return out


def rebuild(bootstrap: str, redis_url: str, *, flush: bool = True) -> dict[str, int]:
    """Replay ``fhir.resources`` from its first offset into Redis (emptied first)."""
    store = TwinStore(connect(redis_url))
    deleted = store.flush() if flush else 0
    n = 0
    for rec in bus.read_topic(bootstrap, bus.RESOURCES):
        try:
            apply_event(store, rec)  # an erased twin's events no longer open: skipped
        except (orjson.JSONDecodeError, KeyError, TypeError, CryptoError):
            log.warning("skipping %s: not a fhirtwin event", rec.ref)
            continue
        n += 1
    return {"deleted_keys": deleted, "events": n, "twins": len(store.twins())}
