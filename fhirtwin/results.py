"""The results back-channel: subscribers' results → validated, tagged, joined to the twin.

A subscriber (a simulation service) publishes what it computed from a snapshot on
``twin.results``: key = the snapshot key it received (the twin id, or its pseudonym of
the twin when it is de-identified), headers ``fhirtwin-subscriber`` and
``fhirtwin-snapshot`` (the Bundle id the result was computed from), value = one FHIR
resource or a Bundle of them (JSON).

The results worker (group ``fhirtwin-results``) checks who sent it and about whom (never
guessing: a key the subscriber was not given is a dead letter), validates every resource
(R4 models), rewrites references from what the subscriber saw to the twin's real ids,
gives each resource a deterministic id, tags it with the subscriber, adds a Provenance
naming the subscriber and the snapshot, and publishes ONE event on ``fhir.resources``
(normalize's envelope, ``source.kind`` ``results``) keyed by twin id. The assembler then
joins the results to the twin like everything else: versioned, rebuildable.

Formats, choices and their reasons: ``docs/snapshots.md`` ("Results back-channel").
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from fhirtwin import bus
from fhirtwin.crypto import ErasedError, seal_event
from fhirtwin.redisconn import connect, mget
from fhirtwin.subscribers import Registry, Subscriber
from fhirtwin.twin import TwinStore
from fhirtwin.validation import validate_bundle, validate_resource
from fhirtwin.worker import Out, StreamWorker, dead_letter

__all__ = [
    "ALLOWED_TYPES",
    "RESULTS_GROUP",
    "RESULTS_TOPIC",
    "SUBSCRIBER_TAG",
    "ResultError",
    "ResultsWorker",
    "result_id",
]

log = logging.getLogger("fhirtwin.results")

RESULTS_TOPIC = bus.RESULTS
RESULTS_GROUP = "fhirtwin-results"
H_SUBSCRIBER = "fhirtwin-subscriber"
H_SNAPSHOT = "fhirtwin-snapshot"
SUBSCRIBER_TAG = "https://fhirtwin.dev/subscriber"
SNAPSHOT_SYSTEM = "urn:fhirtwin:snapshot"
PSEUDONYM_SYSTEM = "urn:fhirtwin:pseudonym"
SOURCE_PREFIX = "urn:fhirtwin:subscriber:"
ACTREASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
# Fixed namespace of the deterministic ids (uuid5): uuid5(NAMESPACE_URL, "https://fhirtwin.dev/results")
ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://fhirtwin.dev/results")

# What a simulation service may return (ours): predictions, computed or simulated
# observations (trajectories: one Observation per time point, or one with components),
# alerts, suggested plans and goals, assessments, and a report as a document. Never
# Patient, Condition, orders, Consent or Provenance: those are the record's, not a model's.
ALLOWED_TYPES = frozenset(
    {
        "RiskAssessment",
        "Observation",
        "DetectedIssue",
        "CarePlan",
        "Goal",
        "ClinicalImpression",
        "DocumentReference",
    }
)
BUNDLE_TYPES = frozenset({"collection", "batch", "transaction"})
MAX_RESOURCES = 1000
# The element naming the patient, per type (all Reference(Patient | …)).
_PATIENT_ELEMENT = {
    "RiskAssessment": "subject",
    "Observation": "subject",
    "DetectedIssue": "patient",
    "CarePlan": "subject",
    "Goal": "subject",
    "ClinicalImpression": "subject",
    "DocumentReference": "subject",
}
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_REL = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9.-]{1,64})$")


class ResultError(ValueError):
    """A result record that cannot be joined to a twin: why, and details (JSON-ready)."""

    def __init__(self, reason: str, error: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason, self.error = reason, error or {}


def _iso(ms: int) -> str:
    dt = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def result_id(sub_id: str, twin: str, rtype: str, their_id: str) -> str:
    """The id a result resource gets in the twin: the same for every resend."""
    return str(uuid.uuid5(ID_NAMESPACE, f"{sub_id}\n{twin}\n{rtype}/{their_id}"))


@dataclass
class _Item:
    """One resource of a result, as sent, with where it was and what it will be."""

    resource: dict[str, Any]
    path: str  # JSON path of the resource in the record
    full_url: str | None = None
    new_id: str = ""
    aliases: list[str] = field(default_factory=list)  # how other resources may refer to it


def parse_result(value: bytes) -> list[_Item]:
    """The resources of a result record (one resource or a Bundle), checked for shape,
    type and FHIR validity; :class:`ResultError` with the problems and their paths."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise ResultError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("resourceType"), str):
        raise ResultError("not a FHIR resource: $.resourceType is missing")
    items: list[_Item] = []
    if doc["resourceType"] == "Bundle":
        if doc.get("type") not in BUNDLE_TYPES:
            raise ResultError(
                f"$.type: a result Bundle must be of type {', '.join(sorted(BUNDLE_TYPES))}, "
                f"not {doc.get('type')!r}"
            )
        entries = doc.get("entry") or []
        if not isinstance(entries, list) or not entries:
            raise ResultError("$.entry: an empty result Bundle")
        for i, e in enumerate(entries):
            res = e.get("resource") if isinstance(e, dict) else None
            if not isinstance(res, dict):
                raise ResultError(f"$.entry[{i}].resource is missing")
            fu = e.get("fullUrl")
            items.append(_Item(res, f"$.entry[{i}].resource", fu if isinstance(fu, str) else None))
        problems = [{**p, "path": "$." + p["path"]} for p in validate_bundle(doc)]
    else:
        items.append(_Item(doc, "$"))
        problems = validate_resource(doc, "$")
    if len(items) > MAX_RESOURCES:
        raise ResultError(f"{len(items)} resources in one result: at most {MAX_RESOURCES}")
    for it in items:
        rtype = it.resource.get("resourceType")
        if rtype not in ALLOWED_TYPES:
            raise ResultError(
                f"{it.path}.resourceType: {rtype!r} is not accepted as a result "
                f"(accepted: {', '.join(sorted(ALLOWED_TYPES))})"
            )
    if problems:
        first = problems[0]
        raise ResultError(
            f"{len(problems)} FHIR validation problem(s), first: {first['path']}: {first['error']}",
            {"problems": problems[:50]},
        )
    return items


def _walk_refs(value: Any, path: str, visit: Any) -> Any:
    """Rebuild ``value`` with every Reference dict replaced by ``visit(ref, path)``."""
    if isinstance(value, dict):
        if "reference" in value or (
            isinstance(value.get("identifier"), dict)
            and set(value) <= {"identifier", "display", "type"}
        ):
            return visit(value, path)
        return {k: _walk_refs(v, f"{path}.{k}", visit) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk_refs(v, f"{path}[{i}]", visit) for i, v in enumerate(value)]
    return value


class ResultsWorker:
    """Consumer group ``fhirtwin-results`` on ``twin.results``."""

    def __init__(
        self, bootstrap: str, redis_url: str, *, group: str = RESULTS_GROUP, batch: int = 100
    ) -> None:
        client = connect(redis_url)
        self.bootstrap = bootstrap
        self.r: Any = client
        self.store = TwinStore(client)
        self.registry = Registry(client)
        self.stream = StreamWorker(bootstrap, group, [RESULTS_TOPIC], self.handle, batch=batch)

    def run(self, stop: threading.Event, idle_exit: float | None = None) -> int:
        bus.ensure_topics(self.bootstrap, [RESULTS_TOPIC])
        return self.stream.run(stop, idle_exit=idle_exit)

    def handle(self, recs: list[bus.Record]) -> list[list[Out]]:
        outs: list[list[Out]] = []
        for rec in recs:
            try:
                outs.append([self.handle_one(rec)])
            except ResultError as exc:
                error = {**exc.error}
                for h in (H_SUBSCRIBER, H_SNAPSHOT):
                    if rec.header(h):
                        error.setdefault(h.removeprefix("fhirtwin-"), rec.header(h))
                outs.append([dead_letter(rec, stage="results", reason=exc.reason, error=error)])
        return outs

    # -- one record ----------------------------------------------------------------------

    def handle_one(self, rec: bus.Record) -> Out:
        sub_id = rec.header(H_SUBSCRIBER)
        snapshot = rec.header(H_SNAPSHOT)
        key = (rec.key or b"").decode("utf-8", "replace")
        if not sub_id:
            raise ResultError(f"no {H_SUBSCRIBER} header: whose result is it?")
        sub = self.registry.get(sub_id)
        if sub is None:
            raise ResultError(f"subscriber {sub_id!r} is not registered")
        if not _UUID.match(snapshot):
            raise ResultError(
                f"{H_SNAPSHOT} header {snapshot!r}: expected the id of the snapshot Bundle "
                "the result was computed from"
            )
        twin = self.locate(sub, key)
        items = parse_result(rec.value)
        resources = self.join(sub, twin, key, items)
        prov = self.provenance(sub, twin, snapshot, resources)
        digest = hashlib.sha256(
            orjson.dumps([*resources, prov], option=orjson.OPT_SORT_KEYS)
        ).hexdigest()[:32]
        first_ms = self._first_seen(sub.id, digest, rec.timestamp_ms)
        prov["recorded"] = _iso(first_ms)
        event = {
            "v": 1,
            "twin": twin,
            "event_ms": first_ms,
            "source": {
                "kind": "results",
                "record": rec.ref,
                "control_id": snapshot,
                "received_ms": rec.timestamp_ms,
                "subscriber": sub.id,
                "snapshot": snapshot,
                **({"replay_of": r} if (r := rec.header("fhirtwin-replay-of")) else {}),
            },
            "identity": {},
            "identifiers": [],
            "merge_from": None,
            "resources": [*resources, prov],
        }
        headers = [
            ("fhirtwin-source-kind", b"results"),
            ("fhirtwin-source-record", rec.ref.encode()),
            (H_SUBSCRIBER, sub.id.encode()),
        ]
        try:
            sealed = seal_event(self.store.keys, twin, orjson.dumps(event))
        except ErasedError:
            raise ResultError(f"key {rec.key!r}: that patient was erased; result refused") from None
        return Out(bus.RESOURCES, sealed, twin.encode(), headers)

    def locate(self, sub: Subscriber, key: str) -> str:
        """The twin behind a snapshot key the subscriber was given, or ResultError."""
        if not key:
            raise ResultError(
                "no record key: it must be the key of the snapshot (twin or pseudonym)"
            )
        if sub.deidentify == "none":
            twin: str | None = key
        else:
            twin = self._unpseudonym(sub.id, key)
        access = self.registry.access(sub.id, [twin]).get(twin) if twin else None
        if twin is None or access is None:
            raise ResultError(
                f"key {key!r} was never disclosed to subscriber {sub.id!r}: "
                "no snapshot of that patient was sent to it"
            )
        if not access:
            raise ResultError(
                f"subscriber {sub.id!r} has no access to key {key!r} now (the last evaluation "
                "did not disclose it: consent withdrawn, denied or merged); results refused"
            )
        return twin

    def _unpseudonym(self, sub_id: str, pseudonym: str) -> str | None:
        """Pseudonym → twin, through a reverse index kept beside the Registry's pseudonyms
        (``ft:sub:<id>:twinof``), filled from them on a miss; never creates a pseudonym."""
        index = f"{Registry.key(sub_id)}:twinof"
        got = self.r.hget(index, pseudonym)
        if got is not None:
            return str(got.decode())
        prefix = f"{Registry.key(sub_id)}:pseudo:"
        keys = list(self.r.scan_iter(match=f"{prefix}*", count=1000))
        if not keys:
            return None
        values = mget(self.r, keys)  # one key per twin: several slots on a cluster
        found = {
            v.decode(): k.decode()[len(prefix) :] for k, v in zip(keys, values, strict=True) if v
        }
        if found:
            self.r.hset(index, mapping=found)
        return found.get(pseudonym)

    def join(
        self, sub: Subscriber, twin: str, key: str, items: Sequence[_Item]
    ) -> list[dict[str, Any]]:
        """The results as they go into the twin: ids, references, tag, meta.source."""
        current = self.store.resources(twin)
        patients = [f"Patient/{r['id']}" for r in current if r.get("resourceType") == "Patient"]
        if not patients:
            raise ResultError(f"twin of key {key!r} has no Patient to join results to")
        deid = sub.deidentify != "none"
        # what the subscriber may call a twin resource → its real reference
        if deid:
            rids = self.r.hgetall(f"{Registry.key(sub.id)}:rid:{twin}")
            seen = {}
            for real, rid in rids.items():
                rtype = real.decode().split("/", 1)[0]
                seen[f"{rtype}/{rid.decode()}"] = real.decode()
        else:
            seen = {
                f"{r['resourceType']}/{r['id']}": f"{r['resourceType']}/{r['id']}" for r in current
            }
        # the result's own resources (they may refer to each other)
        own: dict[str, str] = {}
        for it in items:
            res = it.resource
            rtype = str(res["resourceType"])
            their = res.get("id") or it.full_url
            if not their:
                their = (
                    "sha256:"
                    + hashlib.sha256(orjson.dumps(res, option=orjson.OPT_SORT_KEYS)).hexdigest()
                )
            it.new_id = result_id(sub.id, twin, rtype, str(their))
            new_ref = f"{rtype}/{it.new_id}"
            if res.get("id"):
                it.aliases += [f"{rtype}/{res['id']}", f"urn:uuid:{res['id']}"]
            if it.full_url:
                it.aliases.append(it.full_url)
            for a in it.aliases:
                if a in own and own[a] != new_ref:
                    raise ResultError(f"{it.path}: {a} names two resources of the result")
                own[a] = new_ref
        primary = patients[0]

        def visit(ref: dict[str, Any], path: str) -> dict[str, Any]:
            target = ref.get("reference")
            if not isinstance(target, str):
                ident = ref.get("identifier") or {}
                if ident.get("system") == PSEUDONYM_SYSTEM or (
                    not deid and ident.get("system") == "urn:fhirtwin:twin"
                ):
                    if ident.get("value") != key:
                        raise ResultError(
                            f"{path}: identifier {ident.get('value')!r} is not the patient of key {key!r}"
                        )
                    return {"reference": primary}
                return ref  # a reference by some other identifier: kept as sent
            if target.startswith("#"):
                return ref
            bare = target.split("/_history/")[0]
            if bare in own:
                return {**ref, "reference": own[bare]}
            if bare in seen:
                return {**ref, "reference": seen[bare]}
            if _REL.match(bare) or bare.startswith("urn:uuid:"):
                raise ResultError(
                    f"{path}.reference: {target!r} names nothing disclosed to subscriber "
                    f"{sub.id!r} for key {key!r} nor a resource of the result",
                    {"path": f"{path}.reference"},
                )
            return ref  # absolute: outside fhirtwin, kept as sent

        out: list[dict[str, Any]] = []
        for it in items:
            res = _walk_refs(it.resource, it.path, visit)
            rtype = res["resourceType"]
            res["id"] = it.new_id
            element = _PATIENT_ELEMENT[rtype]
            subject = res.get(element)
            if subject is None:
                res[element] = {"reference": primary}
            else:
                sref = str(subject.get("reference", "")).split("/_history/")[0]
                if sref not in patients:
                    raise ResultError(
                        f"{it.path}.{element}: {subject.get('reference')!r} is not the patient "
                        f"of key {key!r}",
                        {"path": f"{it.path}.{element}"},
                    )
                res[element] = {**subject, "reference": sref}
            res["meta"] = _meta(res.get("meta"), sub.id)
            out.append(res)
        return out

    def provenance(
        self,
        sub: Subscriber,
        twin: str,
        snapshot: str,
        resources: Sequence[Mapping[str, Any]],
    ) -> dict[str, Any]:
        """Provenance of one result record (``recorded`` is set by the caller)."""
        targets = sorted(f"{r['resourceType']}/{r['id']}" for r in resources)
        pid = result_id(sub.id, twin, "Provenance", f"{snapshot}\n" + "\n".join(targets))
        who: dict[str, Any] = {"type": "Device", "display": f"fhirtwin subscriber {sub.id}"}
        ident = next((a for a in sub.actor if "|" in a), None)
        if ident:
            system, _, value = ident.partition("|")
            who["identifier"] = {"system": system, "value": value}
        agent: dict[str, Any] = {
            "type": {"coding": [{"system": PARTICIPANT, "code": "author", "display": "Author"}]},
            "who": who,
        }
        prov: dict[str, Any] = {
            "resourceType": "Provenance",
            "id": pid,
            "meta": _meta(None, sub.id),
            "target": [{"reference": t} for t in targets],
            "recorded": "",
            "activity": {"coding": [{"system": DATA_OPERATION, "code": "CREATE"}]},
            "reason": [
                {"coding": [{"system": ACTREASON, "code": p.rpartition("|")[2]}]}
                for p in sub.purpose
            ],
            "agent": [agent],
            "entity": [
                {
                    "role": "source",
                    "what": {
                        "type": "Bundle",
                        "identifier": {"system": SNAPSHOT_SYSTEM, "value": snapshot},
                        "display": f"snapshot sent to {sub.id}",
                    },
                }
            ],
        }
        return prov

    def _first_seen(self, sub_id: str, digest: str, ms: int) -> int:
        """When fhirtwin first received this exact result (content digest): a resend gets
        the same time, hence the same Provenance and the same event."""
        field_ = f"{Registry.key(sub_id)}:results"
        self.r.hsetnx(field_, digest, ms)
        got = self.r.hget(field_, digest)
        return int(got) if got is not None else ms


def _meta(meta: Any, sub_id: str) -> dict[str, Any]:
    """meta with the subscriber tag (and only ours), meta.source; no store fields."""
    m = dict(meta) if isinstance(meta, dict) else {}
    m.pop("versionId", None)
    m.pop("lastUpdated", None)
    tags = [
        t
        for t in m.get("tag") or []
        if not (isinstance(t, dict) and t.get("system") == SUBSCRIBER_TAG)
    ]
    tags.append({"system": SUBSCRIBER_TAG, "code": sub_id})
    m["tag"] = tags
    m["source"] = f"{SOURCE_PREFIX}{sub_id}"
    return m
