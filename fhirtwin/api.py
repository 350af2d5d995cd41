"""The FHIR R4 REST API over the twins, served by ``fhirtwin up`` under ``/fhir``.

Read-only: ``metadata``, read, vread, ``_history`` of one resource, search per type, and
``Patient/{id}/$everything``. Every answer is ``application/fhir+json``; every error is an
OperationOutcome (never a stack trace).

Consent is applied on every read exactly as the snapshot publisher applies it: an API
client's token names a registered subscriber (``Principal.subscriber``), whose purpose and
scope the consent engine decides for, per twin (request level) and per resource. What a
client may not see is answered as if it did not exist (the same 404 as a missing id, no
``total`` in a searchset, references to withheld resources removed). Each read and search
is audited on ``twin.audit`` before it is answered: the consent decision (BALP
AuthZ-Consent) and the access (BALP PatientRead / PatientQuery). Details: ``docs/api.md``.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from fhirtwin import bus
from fhirtwin.consent import (
    INDETERMINATE,
    NOT_APPLICABLE,
    ConsentError,
    Decision,
    Policy,
    prepare,
)
from fhirtwin.consent import _span as consent_span
from fhirtwin.principal import AuthError, Principal
from fhirtwin.redisconn import is_cluster
from fhirtwin.snapshot import (
    _GONE,
    ACTREASON,
    BALP,
    DCM,
    ENTITY_TYPE,
    OBJECT_ROLE,
    SOURCE_TYPE,
    TWIN_SYSTEM,
    _prune,
    _references,
    _target,
    audit_decision,
)
from fhirtwin.subscribers import Registry, Subscriber
from fhirtwin.twin import TwinStore, clinical_time_ms, fhir_time_ms

__all__ = [
    "DEFAULT_COUNT",
    "FHIR_JSON",
    "MAX_COUNT",
    "AuditSink",
    "FhirApi",
    "ViewCache",
    "allows",
    "fhir_base",
    "kafka_audit",
    "router",
]

log = logging.getLogger("fhirtwin.api")

FHIR_JSON = "application/fhir+json"
DEFAULT_COUNT, MAX_COUNT = 50, 500
FHIR_VERSION = "4.0.1"
AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
CLIENT_SYSTEM = "urn:fhirtwin:client"

# (key of the twin, AuditEvent) → written durably before the answer goes out, or raise.
AuditSink = Callable[[Sequence[tuple[str, dict[str, Any]]]], None]

# -- what is supported -------------------------------------------------------------------

# Where the ``code`` search parameter looks, per type (FHIR R4 search parameter paths).
CODE_FIELD: dict[str, str] = {
    "Observation": "code",
    "Condition": "code",
    "Procedure": "code",
    "DiagnosticReport": "code",
    "AllergyIntolerance": "code",
    "ServiceRequest": "code",
    "MedicationRequest": "medicationCodeableConcept",
    "MedicationAdministration": "medicationCodeableConcept",
    "MedicationDispense": "medicationCodeableConcept",
    "MedicationStatement": "medicationCodeableConcept",
    "Immunization": "vaccineCode",
    "Medication": "code",
    "ChargeItem": "code",
    "FamilyMemberHistory": "relationship",
}
CATEGORY_TYPES = frozenset(
    {
        "Observation",
        "Condition",
        "DiagnosticReport",
        "ServiceRequest",
        "CarePlan",
        "AllergyIntolerance",
        "MedicationRequest",
        "Procedure",
        "DocumentReference",
        "Composition",
        "MedicationStatement",
    }
)
# Types with a ``date`` parameter: those with a clinical time (fhirtwin.twin's timeline).
DATE_TYPES = frozenset(
    {
        "Encounter",
        "Observation",
        "DiagnosticReport",
        "Condition",
        "Procedure",
        "Immunization",
        "MedicationRequest",
        "MedicationAdministration",
        "MedicationDispense",
        "MedicationStatement",
        "AllergyIntolerance",
        "ServiceRequest",
        "Specimen",
        "Appointment",
        "DocumentReference",
        "Composition",
        "CarePlan",
        "Claim",
        "ChargeItem",
        "FamilyMemberHistory",
        "ImagingStudy",
        "EpisodeOfCare",
        "Goal",
    }
)
NO_STATUS = frozenset({"Patient", "Condition", "AllergyIntolerance", "Organization"})
SUPPORTED_TYPES: tuple[str, ...] = tuple(
    sorted(
        {"Patient", "Organization", "Practitioner", "Location", "Coverage", "RelatedPerson"}
        | DATE_TYPES
        | set(CODE_FIELD)
    )
)
CONTROL_PARAMS = frozenset({"_count", "_offset", "_sort", "_include", "_format", "_pretty"})
IGNORED_PARAMS = frozenset({"_format", "_pretty", "_total"})
SORT_KEYS = ("date", "_lastUpdated", "_id")


def search_params(rtype: str) -> dict[str, tuple[str, str]]:
    """Search parameters of a type: name → (FHIR type, description)."""
    p: dict[str, tuple[str, str]] = {
        "_id": ("token", "logical id"),
        "_lastUpdated": ("date", "when fhirtwin learnt this version (meta.lastUpdated)"),
        "identifier": ("token", "business identifier: system|value, value or system|"),
    }
    if rtype == "Patient":
        p["gender"] = ("token", "administrative gender")
        p["birthdate"] = ("date", "date of birth")
        p["name"] = ("string", "any part of a name (starts with, case-insensitive)")
        p["family"] = ("string", "family name (starts with, case-insensitive)")
        p["given"] = ("string", "given name (starts with, case-insensitive)")
    else:
        p["patient"] = ("reference", "the patient: Patient/<id> or <id> (the patient's twin)")
        p["subject"] = ("reference", "the same as patient (Patient/<id>)")
    if rtype in CODE_FIELD:
        p["code"] = ("token", f"{CODE_FIELD[rtype]}: system|code, code or system|")
    if rtype in CATEGORY_TYPES:
        p["category"] = ("token", "category: system|code or code")
    if rtype not in NO_STATUS:
        p["status"] = ("token", "status")
    if rtype in DATE_TYPES:
        p["date"] = ("date", "clinical time (prefixes eq ne gt lt ge le sa eb)")
    return p


# -- errors --------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered as an OperationOutcome."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})


def fhir_response(
    body: Mapping[str, Any], status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(body), status_code=status, media_type=FHIR_JSON, headers=dict(headers or {})
    )


def outcome(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    severity = "error" if status < 500 else "fatal"
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": message}],
    }
    return fhir_response(body, status, headers)


def _not_found(rtype: str, rid: str) -> ApiError:
    # The one answer for missing and withheld alike: nothing in it depends on which.
    return ApiError(404, "not-found", f"{rtype}/{rid} is not known to this server")


class _FhirRoute(APIRoute):
    """Turns every failure of a route into an OperationOutcome (no stack trace leaks)."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        original = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                response: Response = await original(request)
                return response
            except ApiError as exc:
                return outcome(exc.status, exc.code, exc.message, exc.headers)
            except AuthError as exc:
                headers = {}
                if exc.status == 401:
                    headers["WWW-Authenticate"] = f'Bearer error="{exc.code}"'
                code = "login" if exc.status == 401 else "forbidden"
                return outcome(exc.status, code, exc.message, headers)
            except RequestValidationError as exc:
                msgs = "; ".join(
                    f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}"
                    for e in exc.errors()
                )
                return outcome(400, "invalid", f"invalid request: {msgs}")
            except HTTPException as exc:
                return outcome(exc.status_code, "processing", str(exc.detail))
            except Exception:
                incident = uuid.uuid4().hex[:12]
                log.exception("FHIR API error (incident %s) on %s", incident, request.url.path)
                return outcome(
                    500, "exception", f"internal error; the server log has incident {incident}"
                )

        return handler


# -- scopes --------------------------------------------------------------------------------

_SCOPE = re.compile(r"^system/([A-Z][A-Za-z]+|\*)\.([a-z*]+)$")


def _perms(text: str) -> set[str]:
    if text == "read":
        return {"r", "s"}
    if text == "search":
        return {"s"}
    if text == "write":
        return {"c", "u", "d"}
    if text == "*":
        return set("cruds")
    return set(text) if set(text) <= set("cruds") else set()


def allows(principal: Principal, rtype: str, perm: str) -> bool:
    """May the client do ``perm`` (``r`` read, ``s`` search) on type ``rtype``?

    SMART v2 (``system/Observation.rs``, ``system/*.rs``) and v1 (``system/T.read``,
    ``system/*.read``, ``system/T.*``) system scopes; granular v2 scopes (``?category=``)
    are not honoured (they grant nothing here).
    """
    for scope in principal.scopes:
        m = _SCOPE.match(scope)
        if m and m.group(1) in ("*", rtype) and perm in _perms(m.group(2)):
            return True
    return False


def _require(principal: Principal, rtype: str, perm: str) -> None:
    if not allows(principal, rtype, perm):
        what = "read" if perm == "r" else "search"
        raise ApiError(
            403,
            "forbidden",
            f"the client's scopes do not allow {what} on {rtype} "
            f"(needs system/{rtype}.{perm}, system/{rtype}.rs or system/*.rs)",
        )


# -- audit ---------------------------------------------------------------------------------


def kafka_audit(bootstrap: str) -> AuditSink:
    """Audit events → ``twin.audit``, flushed (acknowledged) before the answer is sent."""
    producer: Any = bus.producer(bootstrap)

    def emit(events: Sequence[tuple[str, dict[str, Any]]]) -> None:
        records = [
            (bus.AUDIT, orjson.dumps(event, option=orjson.OPT_SORT_KEYS), key.encode(), ())
            for key, event in events
        ]
        try:
            bus.send_acked(producer, records)
        except bus.NotAcknowledged:
            raise ApiError(
                503, "transient", "the audit log is unavailable; nothing was read"
            ) from None

    return emit


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    c = {"system": system, "code": code}
    if display:
        c["display"] = display
    return c


def audit_access(
    principal: Principal,
    sub: Subscriber | None,
    twin: str | None,
    patient_id: str | None,
    *,
    interaction: str,
    query: str | None,
    disclosed: Sequence[str],
    allowed: bool,
    now: datetime,
    reason: str = "",
) -> dict[str, Any]:
    """BALP PatientRead (read, vread, history) or PatientQuery (search, $everything).

    ``outcome`` is 0 when something was disclosed or nothing was withheld, 4 when the
    client was refused (the client saw a 404 / an empty page)."""
    query_like = interaction in ("search-type", "operation")
    profile = "IHE.BasicAudit.PatientQuery" if query_like else "IHE.BasicAudit.PatientRead"
    purposes = (
        [{"coding": [_coding(ACTREASON, p.rpartition("|")[2])]} for p in sub.purpose] if sub else []
    )
    client: dict[str, Any] = {
        "type": {"coding": [_coding(DCM, "110153", "Source Role ID")]},
        "who": {
            "identifier": {"system": CLIENT_SYSTEM, "value": principal.client_id},
            "display": principal.client_id,
        },
        "name": sub.id if sub else principal.client_id,
        "altId": principal.client_id,
        "requestor": True,
    }
    if purposes:
        client["purposeOfUse"] = purposes
    entities: list[dict[str, Any]] = []
    details = [{"type": "client", "valueString": principal.client_id}]
    if sub:
        details.append({"type": "subscriber", "valueString": sub.id})
    details.append({"type": "allowed", "valueString": "true" if allowed else "false"})
    if reason:
        details.append({"type": "reason", "valueString": reason})
    if twin is not None:
        what: dict[str, Any] = {"identifier": {"system": TWIN_SYSTEM, "value": twin}}
        if patient_id:
            what["reference"] = f"Patient/{patient_id}"
        entities.append(
            {
                "what": what,
                "type": _coding(ENTITY_TYPE, "1", "Person"),
                "role": _coding(OBJECT_ROLE, "1", "Patient"),
                "detail": details,
            }
        )
    if query is not None:
        entities.append(
            {
                "type": _coding(ENTITY_TYPE, "2", "System Object"),
                "role": _coding(OBJECT_ROLE, "24", "Query"),
                "query": base64.b64encode(query.encode()).decode(),
                **({} if twin is not None else {"detail": details}),
            }
        )
    for ref in disclosed:
        entities.append(
            {
                "what": {"reference": ref},
                "type": _coding(ENTITY_TYPE, "2", "System Object"),
                "role": _coding(OBJECT_ROLE, "4", "Domain Resource"),
            }
        )
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(uuid.uuid4()),
        "meta": {"profile": [f"{BALP}/{profile}"]},
        "type": _coding(AUDIT_EVENT_TYPE, "rest", "Restful Operation"),
        "subtype": [_coding(RESTFUL, interaction)],
        "action": "E" if query_like else "R",
        "recorded": _iso(now),
        "outcome": "0" if allowed else "4",
        "agent": [
            client,
            {
                "type": {"coding": [_coding(DCM, "110152", "Destination Role ID")]},
                "who": {"display": "fhirtwin FHIR API"},
                "requestor": False,
            },
        ],
        "source": {
            "site": "fhirtwin",
            "observer": {"display": "fhirtwin FHIR API"},
            "type": [_coding(SOURCE_TYPE, "4", "Application Server")],
        },
        "entity": entities,
    }
    if purposes:
        event["purposeOfEvent"] = purposes
    if reason:
        event["outcomeDesc"] = reason
    return event


# -- consent views -------------------------------------------------------------------------


class View:
    """What one subscriber may see of one twin (at one twin version, in one time window).

    ``permitted`` holds the resources the consent engine permits, *as stored* (type, id
    order). What is served is :meth:`shown`: the resource without references to anything
    outside ``permitted`` — exactly what ``snapshot.strip_dangling(permitted)`` gives for
    it, computed per resource when it is first served (a page strips its own entries, not
    the whole twin) and kept. A View holds no per-request state: the view cache shares it
    between requests, so nothing may modify it or the resources it returns.
    """

    def __init__(
        self,
        twin: str,
        patient_id: str | None,
        decision: Decision,
        policy: Policy | None,
        permitted: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.twin, self.patient_id, self.decision, self.policy = twin, patient_id, decision, policy
        self.permitted: list[dict[str, Any]] = list(permitted)
        self.raw: dict[str, dict[str, Any]] = {_ref(r): r for r in self.permitted}
        held = set(self.raw) | {f"urn:uuid:{r.get('id')}" for r in self.permitted}
        self._held = frozenset(held)
        self.types = frozenset(str(r.get("resourceType")) for r in self.permitted)
        self._verdicts: dict[str, bool] = {}
        self._shown: dict[str, dict[str, Any]] = {}
        self._everything: list[dict[str, Any]] | None = None
        self._last_updated: list[int | None] | None = None
        self.by_ref: Mapping[str, dict[str, Any]] = _ShownByRef(self)

    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    def _keep(self, ref: str) -> bool:
        ok = self._verdicts.get(ref)
        if ok is None:
            if ref.startswith("#"):
                ok = True
            else:
                t = _target(ref)
                ok = t is None or t in self._held
            self._verdicts[ref] = ok
        return ok

    def strip(self, res: dict[str, Any]) -> dict[str, Any]:
        """``res`` without references to resources outside the view (strip_dangling's rule:
        contained ``#id`` and absolute references stay); ``res`` itself if nothing dangles."""
        refs = _references(res)
        if refs is not None and all(self._keep(ref) for ref in refs):
            return res
        pruned = _prune(res, self._keep)
        return pruned if pruned is not _GONE else {"resourceType": res["resourceType"]}

    def shown(self, res: dict[str, Any]) -> dict[str, Any]:
        """The served form of a permitted resource (its current version), stripped once."""
        ref = _ref(res)
        out = self._shown.get(ref)
        if out is None:
            out = self._shown[ref] = self.strip(res)
        return out

    @property
    def resources(self) -> list[dict[str, Any]]:
        """Every visible resource as served (== strip_dangling(permitted)); strips them all."""
        return [self.shown(r) for r in self.permitted]

    def everything_order(self) -> list[dict[str, Any]]:
        """``permitted`` in $everything order (Patient first, then type, id); once per view."""
        if self._everything is None:
            self._everything = sorted(
                self.permitted,
                key=lambda r: (r["resourceType"] != "Patient", r["resourceType"], r["id"]),
            )
        return self._everything

    def last_updated(self) -> list[int | None]:
        """meta.lastUpdated in epoch ms of each resource of :meth:`everything_order`."""
        if self._last_updated is None:
            self._last_updated = [
                fhir_time_ms((r.get("meta") or {}).get("lastUpdated"))
                for r in self.everything_order()
            ]
        return self._last_updated


class _ShownByRef(Mapping[str, dict[str, Any]]):
    """``Type/id`` → the visible resource as served (stripped on first access)."""

    def __init__(self, view: View) -> None:
        self._view = view

    def __getitem__(self, ref: str) -> dict[str, Any]:
        return self._view.shown(self._view.raw[ref])

    def __contains__(self, ref: object) -> bool:
        return ref in self._view.raw

    def __iter__(self) -> Iterator[str]:
        return iter(self._view.raw)

    def __len__(self) -> int:
        return len(self._view.raw)


def _ref(res: Mapping[str, Any]) -> str:
    return f"{res.get('resourceType')}/{res.get('id')}"


# -- the view cache ----------------------------------------------------------------------------

# One round trip tells whether a twin changed: a digest of its ``meta`` hash (``updated``,
# Kafka offsets, ``merged_into``, ``gen``), the sizes of ``cur`` and ``hist``, the erasure
# tombstone, and — unless the twin carries a ``gen`` counter that every write bumps — of
# the order keys in ``ver`` (one per current resource: its event time, content hash and
# knowledge time, so any change of a current version changes it). Only keys and order
# keys are read, never a resource body. It belongs in TwinStore (a ``stamp`` method); it
# is here while twin.py is being changed. KEYS: meta, cur, hist, ver, erased.
_STAMP_LUA = r"""
local meta = redis.call('HGETALL', KEYS[1])
local parts = {table.concat(meta, '\0'), redis.call('HLEN', KEYS[2]),
               redis.call('ZCARD', KEYS[3]), redis.call('EXISTS', KEYS[5])}
if not redis.call('HGET', KEYS[1], 'gen') then
  parts[#parts + 1] = redis.sha1hex(table.concat(redis.call('HVALS', KEYS[4]), '\0'))
end
return redis.sha1hex(table.concat(parts, '|'))
"""

# KEYS of the stamp script: all of one twin (one hash tag, one slot on a Redis Cluster)
_STAMP_KEYS = ("meta", "cur", "hist", "ver", "erased")

_NEVER = 2**62  # "no time bound", in epoch ms


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        return int(raw) if raw else default
    except ValueError:
        log.warning("%s=%r is not a whole number; using %d", name, raw, default)
        return default


# Defaults (docs/api.md, "The view cache"): entries, MiB (estimated), seconds.
VIEW_CACHE_ENTRIES = _env_int("FHIRTWIN_API_VIEW_CACHE_ENTRIES", 512)
VIEW_CACHE_MB = _env_int("FHIRTWIN_API_VIEW_CACHE_MB", 256)
VIEW_CACHE_TTL_S = _env_int("FHIRTWIN_API_VIEW_CACHE_TTL_S", 60)
# A parsed resource takes about 5x its compact JSON in CPython (dicts, str objects):
# measured on the bench twin (552 KB of JSON, 2.8 MB under tracemalloc).
_PY_BYTES_PER_JSON_BYTE = 5


def _epoch_ms(now: datetime) -> int:
    """``now`` in epoch ms, a naive datetime read as UTC (as the consent engine reads it)."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return int(now.timestamp() * 1000)


def _time_window(consents: Iterable[Mapping[str, Any]], now_ms: int) -> tuple[int, int]:
    """[from, until) in epoch ms around ``now_ms`` in which no time-dependent test of the
    consent engine can change its result for these consents.

    The engine compares ``now`` with instants written in the consents (provision periods
    at every depth, ``dateTime`` and ``meta.lastUpdated`` for "recorded after now"), each
    read as a span [first ms, first ms after it) and tested as ``now >= bound``. Every
    string of every consent that reads as a date gives both ends of its span as
    boundaries — more than the engine uses (a data period, a code that looks like a year),
    which can only make a window shorter, never let a decision outlive its validity."""
    lo, hi = -_NEVER, _NEVER

    def visit(value: Any) -> None:
        nonlocal lo, hi
        if isinstance(value, str):
            span = consent_span(value)
            if span is not None:
                for b in span:
                    if b <= now_ms:
                        lo = max(lo, b)
                    else:
                        hi = min(hi, b)
        elif isinstance(value, Mapping):
            for v in value.values():
                visit(v)
        elif isinstance(value, list):
            for v in value:
                visit(v)

    for c in consents:
        visit(c)
    return lo, hi


@dataclass(eq=False)
class _Cached:
    stamp: bytes
    built_ms: int  # the request time it was built for
    valid_from: int  # epoch ms
    valid_until: int  # epoch ms, exclusive
    size: int  # estimated bytes
    view: View


class ViewCache:
    """Per-process LRU of consent-filtered views, bounded by entries and estimated bytes.

    Key: (twin, the subscriber's whole registration). An entry is used only while the
    twin's stamp (see ``_STAMP_LUA``) is unchanged and ``now`` is inside its time window
    (no consent boundary crossed, and at most ``ttl_s`` after it was built).
    """

    def __init__(
        self,
        max_entries: int = VIEW_CACHE_ENTRIES,
        max_bytes: int = VIEW_CACHE_MB << 20,
        ttl_s: int = VIEW_CACHE_TTL_S,
    ) -> None:
        self.max_entries, self.max_bytes, self.ttl_ms = max_entries, max_bytes, ttl_s * 1000
        self._items: OrderedDict[tuple[str, bytes], _Cached] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0 and self.ttl_ms > 0

    def get(self, key: tuple[str, bytes], stamp: bytes, now_ms: int) -> View | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                self.misses += 1
                return None
            if entry.stamp != stamp or not entry.valid_from <= now_ms < entry.valid_until:
                self._drop(key)
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return entry.view

    def put(self, key: tuple[str, bytes], entry: _Cached) -> None:
        if not self.enabled or entry.size > self.max_bytes:
            return
        entry.valid_until = min(entry.valid_until, entry.built_ms + self.ttl_ms)
        with self._lock:
            if key in self._items:
                self._drop(key)
            self._items[key] = entry
            self.bytes += entry.size
            while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
                self._drop(next(iter(self._items)))
                self.evictions += 1

    def _drop(self, key: tuple[str, bytes]) -> None:
        entry = self._items.pop(key)
        self.bytes -= entry.size

    def invalidate(self, twin: str) -> int:
        """Drop every view of ``twin`` (e.g. an erasure in this process); how many."""
        with self._lock:
            keys = [k for k in self._items if k[0] == twin]
            for k in keys:
                self._drop(k)
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._items),
                "bytes": self.bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }


@dataclass
class _Ctx:
    """One request: who asks, for whom, and the audit events it causes."""

    principal: Principal
    sub: Subscriber | None
    now: datetime
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    views: dict[str, View] = field(default_factory=dict)
    # Searches and $everything: the references actually sent on this page. The access
    # events are built at flush and name only these (None: everything found was sent).
    sent: set[str] | None = None
    pending: list[dict[str, Any]] = field(default_factory=list)
    # twin → its stamp, read in one pipeline for the twins a search will look at
    stamps: dict[str, bytes] = field(default_factory=dict)


class FhirApi:
    """The API's logic, independent of HTTP (the router below is a thin layer over it)."""

    def __init__(
        self,
        store: TwinStore,
        registry: Registry,
        *,
        audit: AuditSink,
        clock: Callable[[], datetime] | None = None,
        cache: ViewCache | None = None,
    ) -> None:
        self.store, self.registry, self.audit = store, registry, audit
        self.clock = clock or (lambda: datetime.now(UTC))
        self.cache = cache if cache is not None else ViewCache()
        self._stamp_script = store.r.register_script(_STAMP_LUA)

    def context(self, principal: Principal) -> _Ctx:
        sub = self.registry.get(principal.subscriber) if principal.subscriber else None
        return _Ctx(principal, sub, self.clock())

    # -- views -------------------------------------------------------------------------------

    def stamps(self, twins: Sequence[str]) -> list[bytes]:
        """Each twin's stamp (changes whenever what it holds changes), one round trip."""
        if not twins:
            return []
        keys = [[f"{self.store.base(t)}:{s}" for s in _STAMP_KEYS] for t in twins]
        if is_cluster(self.store.r):  # a cluster pipeline runs no scripts: one call a twin
            return [bytes(self._stamp_script(keys=k)) for k in keys]
        pipe = self.store.r.pipeline(transaction=False)
        for k in keys:
            self._stamp_script(keys=k, client=pipe)
        return [bytes(s) for s in pipe.execute()]

    def prefetch(self, ctx: _Ctx, twins: Sequence[str]) -> None:
        """Read the stamps of the twins a request will look at in one round trip."""
        if not self.cache.enabled:
            return
        todo = [t for t in twins if t not in ctx.views and t not in ctx.stamps]
        for twin, stamp in zip(todo, self.stamps(todo), strict=True):
            ctx.stamps[twin] = stamp

    def view(self, ctx: _Ctx, twin: str) -> View:
        """The twin as this client may see it; its request-level decision is audited.

        Served from the view cache when the twin's stamp, the subscriber's registration
        and the consents' time window all still match; built (and cached) otherwise."""
        if twin in ctx.views:
            return ctx.views[twin]
        sub = ctx.sub
        now_ms = _epoch_ms(ctx.now)
        view: View | None = None
        key: tuple[str, bytes] | None = None
        stamp = b""
        if self.cache.enabled:
            ident = orjson.dumps(sub.to_json(), option=orjson.OPT_SORT_KEYS) if sub else b""
            key = (twin, ident)
            # read before the twin is: a write in between makes the next request rebuild
            stamp = ctx.stamps.pop(twin, b"") or self.stamps([twin])[0]
            view = self.cache.get(key, stamp, now_ms)
        if view is None:
            view, window = self._build_view(ctx, twin)
            if key is not None:
                size = _PY_BYTES_PER_JSON_BYTE * window[2] + 4096
                entry = _Cached(stamp, now_ms, window[0], window[1], size, view)
                self.cache.put(key, entry)
        if sub is not None:
            event = audit_decision(
                sub, twin, view.patient_id, view.decision, now=ctx.now, level="request"
            )
            _tag_client(event, ctx.principal)
            ctx.events.append((twin, event))
        ctx.views[twin] = view
        return view

    def _build_view(self, ctx: _Ctx, twin: str) -> tuple[View, tuple[int, int, int]]:
        """(the view, (valid from, valid until, JSON bytes held)): the twin read, the
        consent engine run over every resource."""
        resources = self.store.resources(twin)
        now_ms = _epoch_ms(ctx.now)
        patient_id = next(
            (str(r["id"]) for r in resources if r.get("resourceType") == "Patient"), None
        )
        sub = ctx.sub
        policy: Policy | None = None
        window = (-_NEVER, _NEVER)
        held = 0
        if sub is None:
            d = Decision(NOT_APPLICABLE, False, reasons=("the client has no subscriber",))
        elif sub.deidentify != "none":
            d = Decision(
                NOT_APPLICABLE,
                False,
                reasons=(
                    f"subscriber {sub.id} is de-identified ({sub.deidentify}): snapshots only",
                ),
            )
        else:
            consents = [r for r in resources if r.get("resourceType") == "Consent"]
            window = _time_window(consents, now_ms)
            try:
                policy = prepare(consents, sub.request(), now=ctx.now, known=resources)
                d = policy.decide()
            except ConsentError as exc:  # a consent the engine cannot read: fail closed
                policy = None
                d = Decision(INDETERMINATE, False, reasons=(f"{exc.where}: {exc.message}",))
            # the policy keeps the twin's resources (its ``known`` index): count them all,
            # from the JSON size of every 16th (serializing the whole twin costs ~2 ms)
            if self.cache.enabled and resources:
                sample = resources[::16]
                held = len(orjson.dumps(sample)) * len(resources) // len(sample)
        permitted: list[dict[str, Any]] = []
        if d.allowed and policy is not None and sub is not None:
            permitted = [
                r
                for r in resources
                if sub.wants(str(r.get("resourceType"))) and policy.decide(r).allowed
            ]
        return View(twin, patient_id, d, policy, permitted), (*window, held)

    def access(
        self,
        ctx: _Ctx,
        view: View | None,
        *,
        interaction: str,
        query: str | None,
        disclosed: Sequence[str],
        allowed: bool,
        reason: str = "",
    ) -> None:
        ctx.pending.append(
            {
                "view": view,
                "interaction": interaction,
                "query": query,
                "disclosed": list(disclosed),
                "allowed": allowed,
                "reason": reason,
            }
        )

    def flush(self, ctx: _Ctx) -> None:
        """Send the request's audit events (Kafka must take them before any data goes)."""
        for p in ctx.pending:
            view = p["view"]
            twin = view.twin if view else None
            disclosed = p["disclosed"]
            if ctx.sent is not None:  # a page: what was sent, not all that matched
                disclosed = [ref for ref in disclosed if ref in ctx.sent]
            event = audit_access(
                ctx.principal,
                ctx.sub,
                twin,
                view.patient_id if view else None,
                interaction=p["interaction"],
                query=p["query"],
                disclosed=disclosed,
                allowed=p["allowed"],
                now=ctx.now,
                reason=p["reason"],
            )
            ctx.events.append((twin or ctx.principal.client_id, event))
        ctx.pending.clear()
        if ctx.events:
            self.audit(ctx.events)
            ctx.events.clear()

    # -- interactions ------------------------------------------------------------------------

    def read(self, ctx: _Ctx, rtype: str, rid: str) -> dict[str, Any]:
        ref = f"{rtype}/{rid}"
        for twin in self._holders(ref):
            view = self.view(ctx, twin)
            res = view.by_ref.get(ref)
            if res is not None:
                self.access(
                    ctx, view, interaction="read", query=None, disclosed=[ref], allowed=True
                )
                return res
            self._withheld(ctx, view, ref, "read")
        if not self._holders(ref):
            self.access(
                ctx,
                None,
                interaction="read",
                query=ref,
                disclosed=[],
                allowed=False,
                reason="no such resource",
            )
        raise _not_found(rtype, rid)

    def _withheld(self, ctx: _Ctx, view: View, ref: str, interaction: str) -> None:
        """Audit a refused read of ``ref`` held by ``view``'s twin."""
        reason = "; ".join(view.decision.reasons) or view.decision.decision
        if view.allowed and view.policy is not None and ctx.sub is not None:
            current = self.store.resource(view.twin, ref)
            if current is not None:
                if not ctx.sub.wants(rtype_of(ref)):
                    reason = f"{rtype_of(ref)} is not among the subscriber's types"
                else:
                    d = view.policy.decide(current)
                    reason = "; ".join(d.reasons) or d.decision
                    event = audit_decision(
                        ctx.sub,
                        view.twin,
                        view.patient_id,
                        d,
                        now=ctx.now,
                        level="resource",
                        resources=[ref],
                    )
                    _tag_client(event, ctx.principal)
                    ctx.events.append((view.twin, event))
        self.access(
            ctx,
            view,
            interaction=interaction,
            query=None,
            disclosed=[],
            allowed=False,
            reason=f"withheld: {reason}",
        )

    def _holders(self, ref: str) -> list[str]:
        return [t for t in self.store.holders(ref) if not t.startswith("_")]

    def history(
        self, ctx: _Ctx, rtype: str, rid: str, vid: str | None = None
    ) -> list[dict[str, Any]]:
        """Permitted versions of one visible resource, newest first; with ``vid`` (vread)
        only that version, and only that one is audited as disclosed."""
        ref = f"{rtype}/{rid}"
        interaction = "vread" if vid is not None else "history-instance"
        for twin in self._holders(ref):
            view = self.view(ctx, twin)
            if ref not in view.by_ref:
                self._withheld(ctx, view, ref, interaction)
                continue
            assert view.policy is not None
            out = []
            for version in self.store.history(twin, ref):
                if vid is not None and version["meta"]["versionId"] != vid:
                    continue
                if view.policy.decide(version).allowed:
                    # what strip_dangling([version, *the other visible resources]) keeps
                    out.append(view.strip(version))
            self.access(
                ctx,
                view,
                interaction=interaction,
                query=None,
                disclosed=[f"{ref}/_history/{v['meta']['versionId']}" for v in out],
                allowed=True,
            )
            return out
        raise _not_found(rtype, rid)

    def search(
        self,
        ctx: _Ctx,
        rtype: str,
        params: list[tuple[str, str]],
        *,
        query: str,
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """(matches of every visible twin; the twins they come from, in order).

        The matches are the resources as stored: serve ``ctx.views[twin].shown(res)``."""
        supported = search_params(rtype)
        filters: list[tuple[str, str]] = []
        patients: list[list[str]] = []
        for name, value in params:
            if name in CONTROL_PARAMS or name in IGNORED_PARAMS:
                continue
            base, _, modifier = name.partition(":")
            if modifier and modifier != "missing":
                raise ApiError(
                    400, "not-supported", f"search modifier :{modifier} is not supported"
                )
            if base not in supported:
                raise ApiError(
                    400,
                    "not-supported",
                    f"unknown search parameter {name!r} for {rtype}; supported: "
                    + ", ".join(sorted(supported)),
                )
            if modifier:
                raise ApiError(
                    400, "not-supported", f"search modifier :{modifier} is not supported"
                )
            if base in ("patient", "subject"):
                ids = []
                for v in value.split(","):
                    v = v.strip()
                    if v.startswith("Patient/"):
                        v = v[8:]
                    elif "/" in v:
                        raise ApiError(
                            400, "invalid", f"{name}={v!r}: only Patient/<id> references"
                        )
                    ids.append(v)
                patients.append(ids)
            else:
                _check_value(supported[base][0], name, value)
                filters.append((base, value))
        # the twins to look at: the named patients' (all AND-ed lists must agree), else all
        candidates: list[str]
        wanted_patients: set[str] | None = None
        if patients:
            sets = [set(p) for p in patients]
            wanted_patients = set.intersection(*sets)
            candidates = sorted(
                {t for pid in wanted_patients for t in self._holders(f"Patient/{pid}")}
            )
        else:
            ids = [v for n, v in filters if n == "_id"]
            if ids:
                refs = {f"{rtype}/{i.strip()}" for i in ids[0].split(",")}
                candidates = sorted({t for ref in refs for t in self._holders(ref)})
            else:
                candidates = [t for t in self.store.twins() if not t.startswith("_")]
        matches: list[dict[str, Any]] = []
        twins_of: list[str] = []
        self.prefetch(ctx, candidates)
        for twin in candidates:
            view = self.view(ctx, twin)
            found: list[dict[str, Any]] = []
            if view.allowed and (
                wanted_patients is None
                or any(f"Patient/{p}" in view.by_ref for p in wanted_patients)
            ):
                # matched as stored (no search parameter reads a reference); the page is
                # served as shown (View.shown), by the caller
                for res in view.permitted:
                    if res.get("resourceType") != rtype:
                        continue
                    if all(_match(res, n, v) for n, v in filters):
                        found.append(res)
            matches += found
            twins_of += [twin] * len(found)
            self.access(
                ctx,
                view,
                interaction="search-type",
                query=query,
                disclosed=[_ref(r) for r in found],
                allowed=view.allowed,
                reason="" if view.allowed else "; ".join(view.decision.reasons),
            )
        if not candidates:
            self.access(
                ctx, None, interaction="search-type", query=query, disclosed=[], allowed=True
            )
        return matches, twins_of

    def everything(
        self, ctx: _Ctx, pid: str, *, since: int | None, types: set[str] | None, query: str
    ) -> list[dict[str, Any]]:
        """Every resource of the patient's visible record, as served."""
        page, _more = self.everything_page(
            ctx, pid, since=since, types=types, query=query, offset=0, count=None
        )
        return page

    def everything_page(
        self,
        ctx: _Ctx,
        pid: str,
        *,
        since: int | None,
        types: set[str] | None,
        query: str,
        offset: int,
        count: int | None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """(one page of the patient's visible record as served, whether more follow).

        Only the page's resources are stripped of dangling references (against the whole
        view, so a reference to a withheld resource is still removed) and audited."""
        ref = f"Patient/{pid}"
        for twin in self._holders(ref):
            view = self.view(ctx, twin)
            if ref not in view.by_ref:
                self._withheld(ctx, view, ref, "operation")
                continue
            order = view.everything_order()
            wanted = {
                t
                for t in view.types
                if (types is None or t in types) and allows(ctx.principal, t, "r")
            }
            out: list[dict[str, Any]]
            if since is None and wanted == view.types:
                out = order  # the common case: no copy
            else:
                lus = view.last_updated() if since is not None else [None] * len(order)
                out = [
                    r
                    for r, lu in zip(order, lus, strict=True)
                    if r["resourceType"] in wanted
                    and (since is None or (lu is not None and lu >= since))
                ]
            end = len(out) if count is None else offset + count
            page = [view.shown(r) for r in out[offset:end]]
            self.access(
                ctx,
                view,
                interaction="operation",
                query=query,
                disclosed=[_ref(r) for r in page],
                allowed=True,
            )
            return page, end < len(out)
        if not self._holders(ref):
            self.access(
                ctx,
                None,
                interaction="operation",
                query=query,
                disclosed=[],
                allowed=False,
                reason="no such patient",
            )
        raise _not_found("Patient", pid)


def _tag_client(event: dict[str, Any], principal: Principal) -> None:
    """Say which API client a consent decision was made for (the subscriber is named)."""
    event["entity"][0].setdefault("detail", []).append(
        {"type": "client", "valueString": principal.client_id}
    )
    event["source"] = {**event["source"], "observer": {"display": "fhirtwin FHIR API"}}


def rtype_of(ref: str) -> str:
    return ref.split("/", 1)[0]


# -- matching ------------------------------------------------------------------------------

_DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")


def _date_range(text: str) -> tuple[int, int] | None:
    """A FHIR date search value (any precision) → [start, end) in epoch ms."""
    start = fhir_time_ms(text)
    if start is None or not re.match(r"^\d{4}(-\d{2}(-\d{2}(T.*)?)?)?$", text):
        return None
    if len(text) == 4:
        end = fhir_time_ms(f"{int(text) + 1:04d}")
    elif len(text) == 7:
        y, m = int(text[:4]), int(text[5:7])
        end = fhir_time_ms(f"{y + (m == 12):04d}-{m % 12 + 1:02d}")
    elif len(text) == 10:
        end = start + 86_400_000
    elif "." in text:
        end = start + 1
    else:  # hh:mm[zone] or hh:mm:ss[zone]
        clock = re.sub(r"(Z|[+-]\d{2}:\d{2})$", "", text.split("T", 1)[1])
        end = start + (60_000 if clock.count(":") < 2 else 1000)
    return (start, end) if end is not None else None


def _split_prefix(value: str) -> tuple[str, str]:
    if len(value) > 2 and value[:2] in _DATE_PREFIXES and value[2].isdigit():
        return value[:2], value[2:]
    return "eq", value


def _check_value(kind: str, name: str, value: str) -> None:
    if kind == "date":
        for v in value.split(","):
            _prefix, text = _split_prefix(v.strip())
            if _date_range(text) is None:
                raise ApiError(
                    400,
                    "invalid",
                    f"{name}={v!r}: expected [eq|ne|gt|lt|ge|le|sa|eb]YYYY[-MM[-DD[Thh:mm:ss[Z]]]]",
                )


def _date_match(t: int | None, value: str) -> bool:
    if t is None:
        return False
    for v in value.split(","):
        prefix, text = _split_prefix(v.strip())
        rng = _date_range(text)
        if rng is None:
            continue
        lo, hi = rng
        ok = {
            "eq": lo <= t < hi,
            "ne": not (lo <= t < hi),
            "gt": t >= hi,
            "sa": t >= hi,
            "lt": t < lo,
            "eb": t < lo,
            "ge": t >= lo,
            "le": t < hi,
        }[prefix]
        if ok:
            return True
    return False


def _tokens(value: Any) -> Iterable[tuple[str | None, str]]:
    """(system, code) pairs of a CodeableConcept, Coding, Identifier, code, or lists of them."""
    if isinstance(value, list):
        for v in value:
            yield from _tokens(v)
    elif isinstance(value, str):
        yield None, value
    elif isinstance(value, dict):
        if "coding" in value:
            yield from _tokens(value["coding"])
        code = value.get("code", value.get("value"))
        if isinstance(code, str):
            yield value.get("system"), code


def _token_match(value: Any, param: str) -> bool:
    pairs = list(_tokens(value))
    for v in param.split(","):
        system, bar, code = v.partition("|")
        for s, c in pairs:
            if not bar:
                if c == system:
                    return True
            elif system == "":
                if s is None and c == code:
                    return True
            elif s == system and (code == "" or c == code):
                return True
    return False


def _names(res: Mapping[str, Any], part: str) -> list[str]:
    out: list[str] = []
    for n in res.get("name") or ():
        if not isinstance(n, dict):
            continue
        if part in ("name", "family") and isinstance(n.get("family"), str):
            out.append(n["family"])
        if part in ("name", "given"):
            out += [g for g in n.get("given") or () if isinstance(g, str)]
        if part == "name" and isinstance(n.get("text"), str):
            out += n["text"].split()
    return out


def _match(res: Mapping[str, Any], name: str, value: str) -> bool:
    rtype = str(res.get("resourceType"))
    if name == "_id":
        return str(res.get("id")) in {v.strip() for v in value.split(",")}
    if name == "_lastUpdated":
        return _date_match(fhir_time_ms((res.get("meta") or {}).get("lastUpdated")), value)
    if name == "date":
        return _date_match(clinical_time_ms(dict(res)), value)
    if name == "birthdate":
        return _date_match(fhir_time_ms(res.get("birthDate")), value)
    if name == "identifier":
        return _token_match(res.get("identifier"), value)
    if name == "code":
        return _token_match(res.get(CODE_FIELD.get(rtype, "code")), value)
    if name == "category":
        return _token_match(res.get("category"), value)
    if name == "status":
        return _token_match(res.get("status"), value)
    if name == "gender":
        return _token_match(res.get("gender"), value)
    if name in ("name", "family", "given"):
        wanted = [v.strip().lower() for v in value.split(",")]
        return any(n.lower().startswith(w) for n in _names(res, name) for w in wanted)
    return False


def _sort(resources: list[dict[str, Any]], twins: list[str], spec: str) -> list[int]:
    """Indices of ``resources`` in ``_sort`` order (default: type, id)."""
    order = list(range(len(resources)))
    order.sort(key=lambda i: (str(resources[i].get("id")), twins[i]))
    keys = [k.strip() for k in spec.split(",") if k.strip()] if spec else []
    for key in reversed(keys):
        desc = key.startswith("-")
        name = key.lstrip("-")
        if name not in SORT_KEYS:
            raise ApiError(
                400, "not-supported", f"_sort={key!r}: supported keys are {', '.join(SORT_KEYS)}"
            )

        def value(i: int, name: str = name) -> int | str | None:
            r = resources[i]
            if name == "_id":
                return str(r.get("id"))
            if name == "_lastUpdated":
                return fhir_time_ms((r.get("meta") or {}).get("lastUpdated"))
            return (
                clinical_time_ms(r)
                if r.get("resourceType") != "Patient"
                else fhir_time_ms(r.get("birthDate"))
            )

        present = [i for i in order if value(i) is not None]
        missing = [i for i in order if value(i) is None]
        present.sort(key=lambda i: value(i) or 0, reverse=desc)  # type: ignore[arg-type,return-value]
        order = present + missing  # no value: last, whatever the direction
    return order


# -- HTTP ----------------------------------------------------------------------------------


_WHOLE = re.compile(r"[0-9]+")
# Beyond any result count (and int() refuses strings of more than 4300 digits).
_WHOLE_CAP = 10**15


def _whole(name: str, raw: str) -> int:
    """A non-negative whole number in ASCII digits (``str.isdigit`` would also pass
    superscripts and circled digits, which ``int`` cannot read); huge values are capped."""
    text = raw.strip()
    if not _WHOLE.fullmatch(text):
        shown = raw if len(raw) <= 40 else raw[:40] + "…"
        raise ApiError(400, "invalid", f"{name}={shown!r}: expected a whole number")
    text = text.lstrip("0") or "0"
    return _WHOLE_CAP if len(text) > 15 else min(int(text), _WHOLE_CAP)


def _count(params: Mapping[str, str]) -> int:
    raw = params.get("_count")
    if raw is None:
        return DEFAULT_COUNT
    return min(_whole("_count", raw), MAX_COUNT)


def _offset(params: Mapping[str, str]) -> int:
    return _whole("_offset", params.get("_offset", "0"))


def _entry(base: str, res: dict[str, Any], mode: str | None = None) -> dict[str, Any]:
    e: dict[str, Any] = {"fullUrl": f"{base}/{_ref(res)}", "resource": res}
    if mode:
        e["search"] = {"mode": mode}
    return e


def _page_bundle(
    base: str,
    path: str,
    params: list[tuple[str, str]],
    entries: list[dict[str, Any]],
    *,
    count: int,
    offset: int,
    more: bool,
    now: datetime,
) -> dict[str, Any]:
    kept = [(k, v) for k, v in params if k not in ("_offset", "_count")]
    self_q = urlencode([*kept, ("_count", str(count)), ("_offset", str(offset))])
    links = [{"relation": "self", "url": f"{base}/{path}?{self_q}"}]
    if more:
        nq = urlencode([*kept, ("_count", str(count)), ("_offset", str(offset + count))])
        links.append({"relation": "next", "url": f"{base}/{path}?{nq}"})
    if offset > 0:
        pq = urlencode([*kept, ("_count", str(count)), ("_offset", str(max(0, offset - count)))])
        links.append({"relation": "previous", "url": f"{base}/{path}?{pq}"})
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": _iso(now)},
        "type": "searchset",
        "link": links,
        "entry": entries,
    }


def capability_statement(base: str, now: datetime, *, admin: bool = False) -> dict[str, Any]:
    """``admin``: also what ``fhirtwin.api_admin``'s router serves (when the app has it)."""
    resources = []
    for rtype in SUPPORTED_TYPES:
        params = search_params(rtype)
        entry: dict[str, Any] = {
            "type": rtype,
            "interaction": [
                {"code": c} for c in ("read", "vread", "history-instance", "search-type")
            ],
            "versioning": "versioned",
            "readHistory": True,
            "updateCreate": False,
            "conditionalCreate": False,
            "conditionalRead": "not-supported",
            "conditionalUpdate": False,
            "conditionalDelete": "not-supported",
            "searchParam": [
                {"name": n, "type": t, "documentation": doc}
                for n, (t, doc) in sorted(params.items())
            ],
        }
        if rtype != "Patient":
            entry["searchInclude"] = [f"{rtype}:patient", f"{rtype}:subject"]
        else:
            entry["operation"] = [
                {
                    "name": "everything",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                    "documentation": "GET only; _since, _type, _count (paged)",
                }
            ]
        resources.append(entry)
    statement: dict[str, Any] = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": _iso(now),
        "publisher": "fhirtwin",
        "kind": "instance",
        "software": {"name": "fhirtwin"},
        "implementation": {
            "description": "fhirtwin: consent-checked, read-only FHIR R4 API over the twins",
            "url": base,
        },
        "fhirVersion": FHIR_VERSION,
        "format": ["json", FHIR_JSON],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    "Read-only. Results are what the client's subscriber may see under the "
                    "patients' consents; withheld data is answered as missing. Searchsets carry "
                    f"no total; _count defaults to {DEFAULT_COUNT} and is capped at {MAX_COUNT}; "
                    "paging by next links. _sort: date, _lastUpdated, _id (- for descending)."
                ),
                "security": {
                    "cors": False,
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                    "code": "SMART-on-FHIR",
                                }
                            ]
                        }
                    ],
                    "description": "SMART Backend Services; system/<Type>.rs scopes",
                },
                "resource": resources,
                "interaction": [],
            }
        ],
    }
    if admin:
        from fhirtwin.api_admin import admin_capabilities

        admin_capabilities(statement)
    return statement


def fhir_base(request: Request, base_url: str | None) -> str:
    """The FHIR base that Location headers and Bundle links use: the configured public base,
    else the one the request came in on."""
    if base_url:
        return base_url.rstrip("/")
    return str(request.base_url).rstrip("/") + "/fhir"


def router(
    store: TwinStore,
    registry: Registry,
    *,
    authenticate: Callable[[str | None], Principal],
    audit: AuditSink,
    base_url: str | None = None,
    clock: Callable[[], datetime] | None = None,
    cache: ViewCache | None = None,
) -> APIRouter:
    """The ``/fhir`` router. ``authenticate(Authorization header)`` gives the Principal or
    raises AuthError; ``audit`` writes AuditEvents durably (see :func:`kafka_audit`);
    ``base_url``: the API's public base (default: from the request); ``cache``: the view
    cache (default: a new one sized by the ``FHIRTWIN_API_VIEW_CACHE_*`` variables)."""
    api = FhirApi(store, registry, audit=audit, clock=clock, cache=cache)
    r = APIRouter(prefix="/fhir", route_class=_FhirRoute)

    def base_of(request: Request) -> str:
        return fhir_base(request, base_url)

    def begin(request: Request) -> _Ctx:
        principal = authenticate(request.headers.get("authorization"))
        return api.context(principal)

    def check_type(rtype: str) -> None:
        if rtype not in SUPPORTED_TYPES:
            raise ApiError(404, "not-supported", f"resource type {rtype!r} is not supported here")

    def query_of(request: Request) -> str:
        q = request.url.query
        return request.url.path + (f"?{q}" if q else "")

    @r.get("/metadata")
    def metadata(request: Request) -> Response:
        return fhir_response(capability_statement(base_of(request), api.clock()))

    @r.get("/Patient/{pid}/$everything")
    def everything(request: Request, pid: str) -> Response:
        ctx = begin(request)
        params = request.query_params
        unknown = set(params) - {"_since", "_type", "_count", "_offset", "_format", "_pretty"}
        if unknown:
            raise ApiError(
                400, "not-supported", f"$everything: unsupported parameter(s) {sorted(unknown)}"
            )
        since = None
        if "_since" in params:
            since = fhir_time_ms(params["_since"])
            if since is None:
                raise ApiError(400, "invalid", f"_since={params['_since']!r}: expected an instant")
        types = None
        if "_type" in params:
            types = {t.strip() for v in params.getlist("_type") for t in v.split(",") if t.strip()}
        count, offset = _count(params), _offset(params)
        ctx.sent = set()
        try:
            page, more = api.everything_page(
                ctx,
                pid,
                since=since,
                types=types,
                query=query_of(request),
                offset=offset,
                count=count,
            )
            ctx.sent = {_ref(x) for x in page}
        finally:
            api.flush(ctx)
        base = base_of(request)
        bundle = _page_bundle(
            base,
            f"Patient/{pid}/$everything",
            list(params.multi_items()),
            [_entry(base, x, "match") for x in page],
            count=count,
            offset=offset,
            more=more,
            now=ctx.now,
        )
        return fhir_response(bundle)

    @r.get("/{rtype}")
    def search(request: Request, rtype: str) -> Response:
        check_type(rtype)
        ctx = begin(request)
        _require(ctx.principal, rtype, "s")
        params = list(request.query_params.multi_items())
        single = dict(params)
        count, offset = _count(single), _offset(single)
        includes = [v for k, v in params if k == "_include"]
        for inc in includes:
            if inc not in (f"{rtype}:patient", f"{rtype}:subject", "*") or rtype == "Patient":
                raise ApiError(
                    400,
                    "not-supported",
                    f"_include={inc!r}: only {rtype}:patient and {rtype}:subject are supported",
                )
        sort_spec = ",".join(v for k, v in params if k == "_sort")
        base = base_of(request)
        ctx.sent = set()
        try:
            found, twins = api.search(ctx, rtype, params, query=query_of(request))
            order = _sort(found, twins, sort_spec)
            chosen = order[offset : offset + count]
            entries = [_entry(base, ctx.views[twins[i]].shown(found[i]), "match") for i in chosen]
            sent = {_ref(found[i]) for i in chosen}
            if includes and allows(ctx.principal, "Patient", "r"):
                seen: set[str] = set()
                for i in chosen:
                    view = ctx.views[twins[i]]
                    pref = f"Patient/{view.patient_id}"
                    if view.patient_id and pref not in seen and pref in view.by_ref:
                        seen.add(pref)
                        entries.append(_entry(base, view.by_ref[pref], "include"))
                        sent.add(pref)
                        for p in ctx.pending:  # the included Patient is disclosed too
                            if p["view"] is view:
                                p["disclosed"].append(pref)
            ctx.sent = sent
        finally:
            api.flush(ctx)
        bundle = _page_bundle(
            base,
            rtype,
            params,
            entries,
            count=count,
            offset=offset,
            more=offset + count < len(found),
            now=ctx.now,
        )
        return fhir_response(bundle)

    def versioned(res: dict[str, Any]) -> dict[str, str]:
        meta = res.get("meta") or {}
        headers = {}
        if meta.get("versionId"):
            headers["ETag"] = f'W/"{meta["versionId"]}"'
        return headers

    @r.get("/{rtype}/{rid}")
    def read(request: Request, rtype: str, rid: str) -> Response:
        check_type(rtype)
        ctx = begin(request)
        _require(ctx.principal, rtype, "r")
        try:
            res = api.read(ctx, rtype, rid)
        finally:
            api.flush(ctx)
        return fhir_response(res, headers=versioned(res))

    @r.get("/{rtype}/{rid}/_history")
    def history(request: Request, rtype: str, rid: str) -> Response:
        check_type(rtype)
        ctx = begin(request)
        _require(ctx.principal, rtype, "r")
        try:
            versions = api.history(ctx, rtype, rid)
        finally:
            api.flush(ctx)
        base = base_of(request)
        entries = []
        for i, v in enumerate(versions):
            vid = v["meta"]["versionId"]
            entries.append(
                {
                    "fullUrl": f"{base}/{rtype}/{rid}/_history/{vid}",
                    "resource": v,
                    "request": {
                        "method": "POST" if i == len(versions) - 1 else "PUT",
                        "url": f"{rtype}/{rid}" if i < len(versions) - 1 else rtype,
                    },
                    "response": {
                        "status": "201" if i == len(versions) - 1 else "200",
                        "lastModified": v["meta"].get("lastUpdated"),
                        "etag": f'W/"{vid}"',
                    },
                }
            )
        bundle = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "history",
            "link": [{"relation": "self", "url": f"{base}/{rtype}/{rid}/_history"}],
            "entry": entries,
        }
        return fhir_response(bundle)

    @r.get("/{rtype}/{rid}/_history/{vid}")
    def vread(request: Request, rtype: str, rid: str, vid: str) -> Response:
        check_type(rtype)
        ctx = begin(request)
        _require(ctx.principal, rtype, "r")
        try:
            versions = api.history(ctx, rtype, rid, vid)
        finally:
            api.flush(ctx)
        for v in versions:
            return fhir_response(v, headers=versioned(v))
        raise ApiError(
            404, "not-found", f"{rtype}/{rid}/_history/{vid} is not known to this server"
        )

    @r.api_route(
        "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
    )
    def fallback(request: Request, path: str) -> Response:
        if request.method != "GET":
            raise ApiError(
                405, "not-supported", f"{request.method} is not supported: this API is read-only"
            )
        raise ApiError(
            404, "not-supported", f"/fhir/{path} is not an interaction this server supports"
        )

    return r
