"""The twin assembler: events of ``fhir.resources`` → idempotent writes to the Redis twin.

Offsets are committed only after the Redis write (the stream runtime does that). For each
event that changed something, a twin event goes to ``twin.events`` (keyed by twin id) for
the snapshot publisher: ``{"twin", "type": "update"|"merge"|"unmerge", "changed": [...],
"record", "at", "source"}`` (``source``: the raw record and control id that caused it). A
merge says which twin was merged into which, so no subscriber sees a silent move; an
unmerge (``request_unmerge``: an operator found a merge wrong) sends one event for each
of the two twins, each naming the other.

`rebuild` replays ``fhir.resources`` from the beginning into an empty Redis with the same
code path, so the result is the same twin (same content hashes).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import orjson

from fhirtwin import bus
from fhirtwin.crypto import CryptoError, ErasedError, open_event, seal_event
from fhirtwin.erasure import ERASED_DROPPED
from fhirtwin.metrics import TWIN_UPDATES, observe_batch
from fhirtwin.redisconn import connect
from fhirtwin.twin import AppliedEvent, TwinStore, UnmergeError, UnmergeNotFound, Write
from fhirtwin.worker import Out, StreamWorker, dead_letter

__all__ = [
    "AssembleWorker",
    "UnmergeRequest",
    "apply_event",
    "apply_events",
    "find_unmerge",
    "rebuild",
    "request_unmerge",
]

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


def _write(event: dict[str, Any], rec: bus.Record) -> Write:
    """What applying an event writes; KeyError/TypeError for an event that is not one."""
    twin = event["twin"]
    resources = event.get("resources") or []
    for res in resources:  # a resource without type or id is not ours: refuse it here
        if not (isinstance(res["resourceType"], str) and isinstance(res["id"], str)):
            raise TypeError("resourceType and id must be strings")
    # Keep every decision that changed identity (a new twin, a new identifier linked, a
    # merge, a conflict); a plain match of known identifiers is not worth a record per event.
    decision = event.get("identity") or {}
    new_ids = set(decision.get("linked", ())) - set(decision.get("matched", ()))
    link = None
    if (
        decision.get("rule") not in (None, "identifier", "no-patient", "deletion")
        or decision.get("conflicts")
        or new_ids
    ):
        link = {
            **decision,
            "record": rec.ref,
            "source": event.get("source"),
            "at": rec.timestamp_ms,
        }
    return Write(
        twin,
        resources,
        event_ms=int(event.get("event_ms") or rec.timestamp_ms),
        known_ms=rec.timestamp_ms,
        src=rec.ref,
        identifiers=event.get("identifiers") or (),
        shared=twin.startswith("_"),
        deleted=event.get("deleted") or (),
        link=link,
    )


def apply_events(store: TwinStore, recs: list[bus.Record]) -> list[list[Out]]:
    """Apply ``fhir.resources`` records, in order; per record, the twin events it causes.

    The events go to ``TwinStore.apply_many`` together (a few Redis round trips per batch,
    not per event); a merge is done, alone, between the events before and after it. A
    record that is not a fhirtwin event becomes a dead letter; an erased twin's record is
    dropped.
    """
    outs: list[list[Out]] = [[] for _ in recs]
    batch: list[tuple[int, dict[str, Any], Write]] = []

    def flush() -> None:
        if not batch:
            return
        applied: list[AppliedEvent | Exception]
        try:
            applied = list(store.apply_many([w for _, _, w in batch]))
        except (KeyError, TypeError, ValueError):
            # An event that read well but failed in the store: one by one (the events
            # before it are applied again, which changes nothing), to refuse it alone.
            applied = []
            for _, _, w in batch:
                try:
                    applied += store.apply_many([w])
                except (KeyError, TypeError, ValueError) as exc:
                    applied.append(exc)
        updates = 0
        for (i, event, _), got in zip(batch, applied, strict=True):
            if isinstance(got, Exception):
                outs[i].append(_not_an_event(recs[i], got))
            elif got.changed:
                updates += len(got.changed)
                outs[i].append(
                    _twin_event(
                        got.twin,
                        {"type": "update", "changed": got.changed},
                        recs[i],
                        event.get("source"),
                    )
                )
        if updates:
            TWIN_UPDATES.inc(updates)  # one write per batch (a memory-mapped file under up)
        batch.clear()

    for i, rec in enumerate(recs):
        try:
            event = read_event(store, rec)
            write = _write(event, rec)
        except ErasedError:
            ERASED_DROPPED.labels("assemble").inc()
            continue
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, CryptoError) as exc:
            outs[i].append(_not_an_event(rec, exc))
            continue
        if unmerge := event.get("unmerge"):
            flush()  # what came before the unmerge is applied before it
            try:
                changed, restored = store.unmerge(
                    str(unmerge),
                    write.twin,
                    known_ms=rec.timestamp_ms,
                    reason=event.get("identity") or {},
                    src=rec.ref,
                )
            except UnmergeError as exc:
                outs[i].append(
                    dead_letter(rec, stage="assemble", reason=f"unmerge not done: {exc}")
                )
                continue
            # Told even when a redelivery finds nothing left to do: the first run may have
            # stopped before its twin events were sent, and the subscribers must learn it.
            body = {"type": "unmerge", "restored": unmerge, "from": write.twin}
            outs[i].append(_twin_event(write.twin, {**body, "changed": changed}, rec))
            outs[i].append(_twin_event(str(unmerge), {**body, "changed": restored}, rec))
            continue
        merge_from = event.get("merge_from")
        if merge_from and merge_from != write.twin:
            flush()  # what came before the merge is applied before it
            # The merge's entry in both identity logs is the decision itself (with the record
            # and source that made it), so the event does not log it a second time.
            decision = {**(event.get("identity") or {}), "record": rec.ref}
            if event.get("source"):
                decision["source"] = event["source"]
            moved = store.merge(
                merge_from, write.twin, known_ms=rec.timestamp_ms, reason=decision, src=rec.ref
            )
            write = replace(write, link=None)
            outs[i].append(
                _twin_event(
                    write.twin,
                    {"type": "merge", "merged": merge_from, "into": write.twin, "changed": moved},
                    rec,
                )
            )
        batch.append((i, event, write))
    flush()
    return outs


@dataclass(frozen=True)
class UnmergeRequest:
    """An unmerge found by ``find_unmerge``: give ``source`` back out of ``target``."""

    source: str
    target: str
    identifiers: list[str]
    merged_at: int


def find_unmerge(store: TwinStore, key: str) -> UnmergeRequest:
    """The merge to undo for ``key``: the id of a twin merged away, an identifier that twin
    held (``system|value`` or a bare value), or ``Patient/<id>`` of its Patient resource
    (which the survivor holds since the merge). UnmergeError says why none fits."""
    if key.startswith("Patient/"):
        holders = store.holders(key)
        patient = store.resource(holders[0], key) if holders else None
        if patient is None:
            raise UnmergeNotFound(f"{key}: no twin holds that Patient")
        for ident in patient.get("identifier") or ():
            value = ident.get("value") if isinstance(ident, dict) else None
            if not value:
                continue
            try:
                return find_unmerge(store, f"{ident.get('system', '')}|{value}".lstrip("|"))
            except UnmergeError:
                continue
        raise UnmergeError(
            f"{key} (twin {holders[0]}) was not merged in from another twin: nothing to undo"
        )
    twin = store.resolve(key)
    if twin is None:
        raise UnmergeNotFound(f"no twin for {key!r}: give a twin id or a patient identifier")
    merged = store.merged_from(twin)
    if key in merged:
        found = [key]
    else:
        found = [
            s
            for s, rec in merged.items()
            if any(i == key or i.rsplit("|", 1)[-1] == key for i in rec.get("identifiers", ()))
        ]
    if not found:
        if key != twin and store.meta(key).get("merged_into"):
            raise UnmergeError(
                f"twin {key} was merged into {store.meta(key)['merged_into']}, which was itself "
                f"merged into {twin}: unmerge that one first"
            )
        have = ", ".join(sorted(merged)) or "none"
        raise UnmergeError(
            f"{key!r} names twin {twin}, and no twin merged into it held {key!r} "
            f"(twins merged into {twin} that can be given back: {have}); "
            "`fhirtwin twin show` lists each with its identifiers"
        )
    if len(found) > 1:
        raise UnmergeError(
            f"{key!r} was held by several twins merged into {twin} ({', '.join(found)}): "
            "give the twin id"
        )
    rec = merged[found[0]]
    return UnmergeRequest(found[0], twin, list(rec.get("identifiers", ())), int(rec["at"]))


def request_unmerge(
    bootstrap: str, store: TwinStore, req: UnmergeRequest, *, reason: str, by: str, now_ms: int
) -> None:
    """Put the unmerge on ``fhir.resources`` (keyed by the surviving twin, so it takes its
    place among that twin's events; a rebuild replays it), acknowledged by Kafka. The
    assembler carries it out (``TwinStore.unmerge``)."""
    event = {
        "v": 1,
        "twin": req.target,
        "event_ms": now_ms,
        "source": {"kind": "operator", "record": "", "control_id": "", "received_ms": now_ms},
        "identity": {"rule": "unmerge", "twin": req.target, "reason": reason, "by": by},
        "identifiers": [],
        "merge_from": None,
        "unmerge": req.source,
        "resources": [],
    }
    value = seal_event(store.keys, req.target, orjson.dumps(event))
    headers = [("fhirtwin-source-kind", b"operator")]
    bus.send_acked(bus.producer(bootstrap), [(bus.RESOURCES, value, req.target.encode(), headers)])


def apply_event(store: TwinStore, rec: bus.Record) -> list[Out]:
    """Apply one ``fhir.resources`` record to the store; the twin events it causes."""
    return apply_events(store, [rec])[0]


def _not_an_event(rec: bus.Record, exc: Exception) -> Out:
    return dead_letter(
        rec,
        stage="assemble",
        reason=f"not a fhirtwin event ({type(exc).__name__}: {exc}); "
        "only normalize workers should write to fhir.resources",
    )


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
        t0 = time.perf_counter()
        out = apply_events(self.store, recs)
        observe_batch("assemble", time.perf_counter() - t0, len(recs))
        return out


def rebuild(bootstrap: str, redis_url: str, *, flush: bool = True) -> dict[str, int]:
    """Replay ``fhir.resources`` from its first offset into Redis (emptied first)."""
    store = TwinStore(connect(redis_url))
    deleted = store.flush() if flush else 0
    n = 0
    chunk: list[bus.Record] = []

    def apply_chunk() -> int:
        applied = 0
        # an erased twin's events no longer open: skipped (no output, no dead letter)
        for rec, outs in zip(chunk, apply_events(store, chunk), strict=True):
            if any(o.topic == bus.DEADLETTER for o in outs):
                log.warning("skipping %s: not a fhirtwin event", rec.ref)
            else:
                applied += 1
        chunk.clear()
        return applied

    for rec in bus.read_topic(bootstrap, bus.RESOURCES):
        chunk.append(rec)
        if len(chunk) >= 500:
            n += apply_chunk()
    n += apply_chunk()
    return {"deleted_keys": deleted, "events": n, "twins": len(store.twins())}
