"""Erasure ("right to be forgotten") of one patient's twin, by crypto-shredding.

Steps, in this order (each idempotent, so an interrupted erasure is finished by running it
again; ``docs/security.md`` explains the choices):

1. **Tombstones.** ``ft:{T}:erased`` (the apply script refuses a twin that has one) for the
   twin and every twin merged into it, and ``ft:erased:id:<blind>`` → T for each of its
   identifiers, so a replayed or late message that names the patient resolves to the erased
   twin and is dropped by the normalize worker instead of starting a new twin.
2. **Redis.** Every other key of those twins (current resources, history, timeline, state,
   identifiers, identity decisions), their lookup keys (``ft:id``/``ft:idv``/``ft:demo``)
   and their entries in the reference index and the twin list.
3. **Data key.** The twins' data keys are destroyed in the key store (a tombstone stays
   there too). From then on nothing sealed with them opens: not a Redis RDB file or replica
   made before the erasure, not the twin's events on ``fhir.resources`` (a rebuild skips
   them). The key store's own backups must expire within the erasure deadline
   (docs/security.md).
4. **Subscribers** are told: a twin event ``{"type": "erase"}`` on ``twin.events`` makes
   the snapshot publisher send each subscriber that had the patient a withdrawal notice with
   ``reason: "erased"`` (the subscriber must delete its copy) and forget the subscriber's
   pseudonyms of the twin.
5. **Audit.** An AuditEvent (DICOM 110110 Patient Record, action D) names the twin, the
   patient's resource id, who asked and why — never the patient's data.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from prometheus_client import Counter

from fhirtwin.crypto import CryptoError
from fhirtwin.mpi import MPIConfig, demographic_key
from fhirtwin.twin import TWIN_SUFFIXES, TwinStore

__all__ = ["ERASED_DROPPED", "ERASURES", "Erasure", "erase", "erasure_audit"]

ERASURES = Counter("fhirtwin_erasures_total", "Patients erased (twins crypto-shredded)")
ERASED_DROPPED = Counter(
    "fhirtwin_erased_dropped_total",
    "Records not applied because they name an erased patient",
    ["stage"],
)

DCM = "http://dicom.nema.org/resources/ontology/DCM"
ACTION_SYSTEM = "http://hl7.org/fhir/restful-interaction"
TWIN_SYSTEM = "urn:fhirtwin:twin"


@dataclass
class Erasure:
    twin: str
    patient: str | None  # the Patient resource id, for the audit and the answer
    twins: list[str] = field(default_factory=list)  # the twin and those merged into it
    identifiers: int = 0
    keys_deleted: int = 0
    data_keys_destroyed: int = 0
    already: bool = False  # it had been erased before (this run finished or repeated it)

    def as_dict(self) -> dict[str, Any]:
        return {
            "twin": self.twin,
            "patient": self.patient,
            "twins": self.twins,
            "identifiers": self.identifiers,
            "redis_keys_deleted": self.keys_deleted,
            "data_keys_destroyed": self.data_keys_destroyed,
            "already_erased": self.already,
        }


def _merged_into(store: TwinStore, twin: str) -> list[str]:
    """The twin and, recursively, every twin that was merged into it."""
    out, todo = [], [twin]
    while todo:
        t = todo.pop()
        if t in out:
            continue
        out.append(t)
        try:
            links = store.links(t)
        except CryptoError:  # a half-erased twin's links no longer open
            links = []
        # newest first: a twin merged in and later given back (unmerge) is another patient
        last: dict[str, bool] = {}
        for lk in links:
            if lk.get("into") == t and isinstance(lk.get("merged"), str):
                last.setdefault(lk["merged"], True)
            elif lk.get("from") == t and isinstance(lk.get("unmerged"), str):
                last.setdefault(lk["unmerged"], False)
        todo += [other for other, merged in last.items() if merged]
    return out


def erase(
    store: TwinStore,
    twin: str,
    *,
    events: Callable[[str, dict[str, Any]], None] | None = None,
    now: datetime | None = None,
) -> Erasure:
    """Erase the twin (see the module docstring). ``events(twin, body)`` publishes the twin
    event that tells the subscribers (``twin.events``); it must raise if not acknowledged."""
    r = store.r
    now = now or datetime.now(UTC)
    now_ms = int(now.timestamp() * 1000)
    already = bool(r.exists(f"{store.base(twin)}:erased")) or store.keys.erased(twin)
    twins = _merged_into(store, twin)
    result = Erasure(twin=twin, patient=None, twins=twins, already=already)
    cfg = MPIConfig.load()
    idents: list[str] = []
    demo: list[str] = []
    refs: list[str] = []
    for t in twins:
        try:
            idents += store.identifiers(t)
            resources = store.resources(t)
        except CryptoError:  # its key is already gone: nothing more to learn
            resources = []
        refs += [str(ref.decode()) for ref in r.hkeys(f"{store.base(t)}:cur")]
        for res in resources:
            if res.get("resourceType") == "Patient":
                result.patient = result.patient or str(res.get("id"))
                if dk := demographic_key(res, cfg):
                    demo.append(dk)
    result.identifiers = len(set(idents))

    # 1. tombstones
    pipe = r.pipeline(transaction=False)
    for t in twins:
        pipe.set(f"{store.base(t)}:erased", now_ms)
    blind = store.keys.blind
    for ident in idents:
        pipe.set(f"ft:erased:id:{blind(ident)}", twin)
    pipe.execute()

    # 2. Redis: the twins' keys (but the tombstones), lookups, reference index, twin list
    doomed: list[bytes | str] = []
    for t in twins:
        doomed += [f"{store.base(t)}:{suffix}" for suffix in TWIN_SUFFIXES]
    for ident in idents:
        for key in (store.id_key(ident), store.value_key(ident.rsplit("|", 1)[-1])):
            if r.get(key) in {t.encode() for t in twins}:
                doomed.append(key)
    for dk in demo:
        key = f"ft:demo:{blind(dk)}"
        if r.get(key) in {t.encode() for t in twins}:
            doomed.append(key)
    # keys of several slots: one UNLINK on a single server, one per slot on a cluster
    result.keys_deleted = int(r.unlink(*doomed)) if doomed else 0
    pipe = r.pipeline(transaction=False)
    for ref in set(refs):
        pipe.srem(f"ft:ref:{ref}", *twins)
    pipe.srem("ft:twins", *twins)
    pipe.execute()

    # 3. crypto-shredding
    for t in twins:
        if store.keys.erase(t):
            result.data_keys_destroyed += 1

    # 4. subscribers
    if events is not None:
        events(twin, {"twin": twin, "type": "erase", "erased": twins, "at": now_ms})
    ERASURES.inc()
    return result


def erasure_audit(
    result: Erasure,
    *,
    who: str,
    reason: str,
    now: datetime,
    purposes: Sequence[str] = (),
) -> dict[str, Any]:
    """The AuditEvent of an erasure, written before it is carried out (no patient data: the
    twins and the Patient resource id)."""
    what: dict[str, Any] = {"identifier": {"system": TWIN_SYSTEM, "value": result.twin}}
    if result.patient:
        what["reference"] = f"Patient/{result.patient}"
    details = [{"type": "twins", "valueString": ",".join(result.twins)}]
    if reason:
        details.append({"type": "reason", "valueString": reason})
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(uuid.uuid4()),
        "type": {"system": DCM, "code": "110110", "display": "Patient Record"},
        "subtype": [{"system": "urn:fhirtwin:audit", "code": "erase", "display": "Erasure"}],
        "action": "D",
        "recorded": now.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "outcome": "0",
        "agent": [
            {
                "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source"}]},
                "who": {"display": who},
                "requestor": True,
                **(
                    {"purposeOfUse": [{"coding": [{"code": p}]} for p in purposes]}
                    if purposes
                    else {}
                ),
            }
        ],
        "source": {"site": "fhirtwin", "observer": {"display": "fhirtwin erasure"}},
        "entity": [
            {
                "what": what,
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "1",
                    "display": "Person",
                },
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "1",
                    "display": "Patient",
                },
                "detail": details,
            }
        ],
    }
    if reason:
        event["outcomeDesc"] = reason
    return event


def dumps(event: dict[str, Any]) -> bytes:
    return orjson.dumps(event, option=orjson.OPT_SORT_KEYS)


class NotFound(LookupError):
    """No live twin answers to that key (never known, or already erased)."""


def find_twin(store: TwinStore, key: str) -> str:
    """A twin id, an identifier (``system|value`` or bare value) or a Patient resource id."""
    for ref in (key if key.startswith("Patient/") else f"Patient/{key}",):
        holders = store.holders(ref)
        if holders:
            return holders[0]
    twin = store.resolve(key)
    if twin is None or not store.r.sismember("ft:twins", twin):
        raise NotFound(
            f"no patient twin answers to {key!r} (a twin id, an identifier or a Patient id); "
            "it may have been erased already"
        )
    return twin


def kafka_sinks(
    bootstrap: str,
) -> tuple[Callable[[dict[str, Any]], None], Callable[[str, dict[str, Any]], None]]:
    """(audit, twin event) publishers that return only once Kafka acknowledged."""
    from fhirtwin import bus

    producer: Any = bus.producer(bootstrap)

    def send(topic: str, key: str, body: dict[str, Any]) -> None:
        bus.send_acked(producer, [(topic, dumps(body), key.encode(), ())])  # NotAcknowledged

    def audit(event: dict[str, Any]) -> None:
        send(bus.AUDIT, event["entity"][0]["what"]["identifier"]["value"], event)

    def events(twin: str, body: dict[str, Any]) -> None:
        send(bus.TWIN_EVENTS, twin, body)

    return audit, events


def erase_patient(
    store: TwinStore,
    key: str,
    *,
    bootstrap: str,
    who: str,
    reason: str = "",
    now: datetime | None = None,
) -> Erasure:
    """Find the patient's twin, audit the erasure (acknowledged first: no unrecorded
    erasure), erase it, and tell the subscribers. NotFound when there is no such patient."""
    now = now or datetime.now(UTC)
    twin = find_twin(store, key)
    audit, events = kafka_sinks(bootstrap)
    plan = Erasure(twin=twin, patient=None, twins=_merged_into(store, twin))
    for res in store.resources(twin):
        if res.get("resourceType") == "Patient":
            plan.patient = str(res["id"])
            break
    audit(erasure_audit(plan, who=who, reason=reason, now=now))
    return erase(store, twin, events=events, now=now)
