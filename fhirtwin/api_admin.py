"""Administration over HTTP: subscribers, API clients, Consent writes, the audit log, dead
letters. Served by ``fhirtwin up`` beside the read-only FHIR API (``fhirtwin.api``).

Scopes (``fhirtwin.auth.require_scope``; both are refused to any client that reads as a
subscriber, whatever its token says):

* ``fhirtwin/admin``: ``/admin/subscribers``, ``/admin/clients``, ``/admin/deadletters``
  (plain JSON), and ``POST /fhir/Consent``, ``PUT /fhir/Consent/{id}``, ``GET
  /fhir/Consent/{id}`` (FHIR). A Consent is policy about a patient's data, so writing one
  is an administrative act, not a data permission: a subscriber client must never be able
  to write the consents its own reads are decided by, which ``system/Consent.cu`` (a SMART
  scope a subscriber client may hold) would not exclude.
* ``fhirtwin/audit``: ``GET /fhir/AuditEvent``, ``GET /fhir/AuditEvent/{id}``,
  ``GET /fhir/Patient/{id}/$disclosures`` (FHIR), ``/admin/audit/disclosures`` and
  ``/admin/audit/verify`` (plain JSON).

Consents enter the system exactly as ``fhirtwin consent put`` files them: checked against
the R4 Consent model and the consent engine, then published on ``fhir.resources`` (the
envelope of :func:`fhirtwin.snapshot.consent_event`), where the assembler files them in the
patient's twin and the snapshot publisher re-evaluates that twin for every subscriber. The
answer waits until the assembler has filed that version (then 201/200 with the stored
resource), or says 202 if it has not within ``file_timeout``.

Every Consent write and every read of the audit log is itself audited on ``twin.audit``
before it is answered (the CLI has no remote caller to name; the API does). Errors are
OperationOutcomes (``fhirtwin.api``'s style), never a stack trace. Details: ``docs/api.md``,
"Administration".
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, ValidationError

from fhirtwin import bus
from fhirtwin.api import (
    FHIR_JSON,
    ApiError,
    AuditSink,
    _check_value,
    _count,
    _date_match,
    _entry,
    _FhirRoute,
    _offset,
    _page_bundle,
    _token_match,
    audit_access,
    capability_statement,
    fhir_base,
    fhir_response,
)
from fhirtwin.auth import ADMIN_SCOPE, AUDIT_SCOPE, Authority, ClientError, require_scope
from fhirtwin.consent import ConsentError, prepare
from fhirtwin.principal import Principal
from fhirtwin.snapshot import BALP, ConsentPutError, consent_event, find_twin
from fhirtwin.subscribers import Registry, SubscriberError, make_subscriber
from fhirtwin.twin import TwinStore, content_hash, fhir_time_ms

__all__ = ["AUDIT_SEARCH_PARAMS", "admin_capabilities", "router"]

JSON = "application/json"
LOG_INDEX_URL = "urn:fhirtwin:audit-log-index"
_FHIR_ID = r"^[A-Za-z0-9\-.]{1,64}$"
# FHIR AuditEvent search parameters served (name → (type, description)).
AUDIT_SEARCH_PARAMS: dict[str, tuple[str, str]] = {
    "_id": ("token", "logical id of the AuditEvent"),
    "patient": ("reference", "Patient/<id> or <id>; also a twin id, system|value or MRN"),
    "date": ("date", "recorded (prefixes eq ne gt lt ge le sa eb)"),
    "agent": (
        "reference",
        "an agent: who.reference, who.identifier (system|value or value), name or altId "
        "(API client id, subscriber id)",
    ),
    "subtype": ("token", "subtype: system|code or code (read, search-type, disclose …)"),
    "type": ("token", "type: system|code or code (rest, 110106, 110113 …)"),
    "outcome": ("token", "0 success, 4 minor failure (refused), 8 serious failure"),
}
_AUDIT_CONTROL = frozenset({"_count", "_offset", "_sort", "_format", "_pretty", "_total"})
# API interactions that disclose data (a PatientRead / PatientQuery with outcome 0).
_API_DISCLOSING = frozenset({"read", "vread", "history-instance", "search-type", "operation"})


# The request body of Consent create/update: any JSON object (checked by the handlers, so
# that errors name FHIR paths).
ConsentBody = Annotated[dict[str, Any], Body(media_type=FHIR_JSON)]


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body), status_code=status, media_type=JSON, headers=dict(headers or {})
    )


class _Invalid(ApiError):
    """A request body that is wrong at a JSON path (``$.provision.type``)."""

    def __init__(self, status: int, path: str, message: str) -> None:
        super().__init__(status, "invalid" if status == 400 else "processing", message)
        self.path = path

    def response(self, rtype: str = "Consent") -> Response:
        expression = rtype + self.path[1:] if self.path.startswith("$") else self.path
        issue = {
            "severity": "error",
            "code": self.code,
            "diagnostics": f"{self.path}: {self.message}",
            "expression": [expression],
        }
        return fhir_response({"resourceType": "OperationOutcome", "issue": [issue]}, self.status)


def _loc(loc: Iterable[Any]) -> str:
    out = "$"
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


# -- request bodies (plain JSON) -----------------------------------------------------------


class SubscriberIn(BaseModel):
    """A subscriber registration: the options of ``fhirtwin subscriber add``."""

    model_config = ConfigDict(extra="forbid")
    actor: list[str]
    purpose: list[str]
    scope: str
    types: list[str] | None = None
    default: str | None = None
    deidentify: str | None = None
    # public JWK: the subscriber's topic then carries JWEs only it can open (docs/snapshots.md)
    encryption_key: dict[str, Any] | None = None


class NewSubscriber(SubscriberIn):
    id: str


class ClientIn(BaseModel):
    """An API client registration: the options of ``fhirtwin client add``."""

    model_config = ConfigDict(extra="forbid")
    jwks: dict[str, Any]
    scopes: list[str]
    subscriber: str | None = None


class NewClient(ClientIn):
    client_id: str


class CorrectedIn(BaseModel):
    """A corrected copy of one dead letter's input, to replay instead of its original."""

    model_config = ConfigDict(extra="forbid")
    corrected_base64: str


class ReplayIn(BaseModel):
    """Dead letters to replay: ``ids``, or ``all`` (those not replayed yet), ``stage``."""

    model_config = ConfigDict(extra="forbid")
    ids: list[str] | None = None
    all: bool = False
    stage: str | None = None


# -- audit log reading ---------------------------------------------------------------------


def _events(bootstrap: str) -> list[tuple[int, dict[str, Any]]]:
    """(log index, AuditEvent) of the whole log, in log order."""
    from fhirtwin.audit import entries

    out = []
    for i, raw in enumerate(entries(bootstrap)):
        try:
            ev = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue  # not ours to judge here: `audit verify` reports altered bytes
        if isinstance(ev, dict):
            ev.setdefault("id", f"log-{i}")
            out.append((i, ev))
    return out


def _patients(ev: Mapping[str, Any]) -> set[str]:
    """Twin ids and ``Patient/<id>`` references an event names (as ``fhirtwin audit``)."""
    out: set[str] = set()
    for ent in ev.get("entity") or ():
        what = ent.get("what") or {} if isinstance(ent, dict) else {}
        ident = what.get("identifier") or {}
        if isinstance(ident, dict) and ident.get("value"):
            out.add(str(ident["value"]))
        ref = str(what.get("reference", ""))
        if ref.startswith("Patient/"):
            out.add(ref)
    return out


def _agent_keys(ev: Mapping[str, Any]) -> set[str]:
    keys: set[str] = set()
    for agent in ev.get("agent") or ():
        if not isinstance(agent, dict):
            continue
        who = agent.get("who") or {}
        for k in ("reference", "display"):
            if who.get(k):
                keys.add(str(who[k]))
        ident = who.get("identifier") or {}
        if ident.get("value"):
            keys.add(str(ident["value"]))
            if ident.get("system"):
                keys.add(f"{ident['system']}|{ident['value']}")
        for k in ("name", "altId"):
            if agent.get(k):
                keys.add(str(agent[k]))
    return keys


def _who(ev: Mapping[str, Any]) -> list[str]:
    return [
        a.get("name") or (a.get("who") or {}).get("display", "")
        for a in ev.get("agent") or ()
        if isinstance(a, dict) and a.get("requestor")
    ]


def _purposes(ev: Mapping[str, Any]) -> list[str]:
    return sorted(
        {c.get("code", "") for p in ev.get("purposeOfEvent") or () for c in p.get("coding") or ()}
    )


def _disclosure(ev: Mapping[str, Any]) -> dict[str, Any] | None:
    """The report row of a disclosure: a snapshot (DICOM 110106, as ``fhirtwin audit
    report``) or an API read/search that disclosed something (PatientRead/PatientQuery)."""
    code = (ev.get("type") or {}).get("code")
    subtypes = {c.get("code") for c in ev.get("subtype") or () if isinstance(c, dict)}
    if code == "110106":
        via = "snapshot"
    elif code == "rest" and ev.get("outcome") == "0" and subtypes & _API_DISCLOSING:
        via = "api"
    else:
        return None
    refs = [str((e.get("what") or {}).get("reference", "")) for e in ev.get("entity") or ()]
    roles = [(e.get("role") or {}).get("code") for e in ev.get("entity") or ()]
    sent = [
        r
        for r, role in zip(refs, roles, strict=True)
        if role == "4" and not r.startswith("Consent/")
    ]
    if via == "api" and not sent:
        return None
    return {
        "recorded": ev.get("recorded"),
        "recipient": ", ".join(_who(ev)),
        "purpose": _purposes(ev),
        "consents": sorted({r for r in refs if r.startswith("Consent/")}),
        "resources": sent,
        "via": via,
    }


# -- the CapabilityStatement ---------------------------------------------------------------


def admin_capabilities(statement: dict[str, Any]) -> None:
    """Add what this router serves to ``fhirtwin.api.capability_statement``'s answer."""
    rest = statement["rest"][0]
    by_type = {r["type"]: r for r in rest["resource"]}
    no = {"conditionalRead": "not-supported", "conditionalDelete": "not-supported"}
    rest["resource"].append(
        {
            "type": "Consent",
            "documentation": (
                "fhirtwin/admin scope. create/update file the Consent in the twin of the "
                "patient it names (Consent.patient: Patient/<id> or an identifier) through the "
                "pipeline, as `fhirtwin consent put`; read serves the current version."
            ),
            "interaction": [{"code": c} for c in ("read", "vread", "create", "update")],
            "versioning": "versioned",
            "readHistory": False,
            "updateCreate": True,
            "conditionalCreate": False,
            "conditionalUpdate": False,
            **no,
        }
    )
    rest["resource"].append(
        {
            "type": "AuditEvent",
            "documentation": "fhirtwin/audit scope; the audit log (twin.audit), in log order",
            "interaction": [{"code": c} for c in ("read", "search-type")],
            "versioning": "no-version",
            "readHistory": False,
            "updateCreate": False,
            "conditionalCreate": False,
            "conditionalUpdate": False,
            **no,
            "searchParam": [
                {"name": n, "type": t, "documentation": d}
                for n, (t, d) in sorted(AUDIT_SEARCH_PARAMS.items())
            ],
        }
    )
    if "Patient" in by_type:
        by_type["Patient"].setdefault("operation", []).append(
            {
                "name": "disclosures",
                "definition": "urn:fhirtwin:OperationDefinition/Patient-disclosures",
                "documentation": (
                    "GET only, fhirtwin/audit scope: the accounting of disclosures of the "
                    "patient (snapshot and API disclosures) as a searchset of AuditEvents"
                ),
            }
        )
    rest["documentation"] += (
        " Writes: Consent create/update only (fhirtwin/admin). The audit log: AuditEvent "
        "read/search and Patient/$disclosures (fhirtwin/audit). Plain-JSON administration "
        "under /admin (docs/api.md, Administration)."
    )
    rest["security"]["description"] += "; fhirtwin/admin and fhirtwin/audit for administration"
    statement["implementation"]["description"] = (
        "fhirtwin: consent-checked FHIR R4 API over the twins, with Consent writes and the "
        "audit log for administrators"
    )


# -- the router ----------------------------------------------------------------------------


def router(
    store: TwinStore,
    registry: Registry,
    authority: Authority,
    *,
    authenticate: Callable[[str | None], Principal],
    audit: AuditSink,
    bootstrap: str,
    redis_url: str,
    base_url: str | None = None,
    clock: Callable[[], datetime] | None = None,
    file_timeout: float = 15.0,
) -> APIRouter:
    """``/admin/…`` and the administrative FHIR interactions. Include it before
    ``fhirtwin.api.router`` (whose catch-all answers other writes 405): its
    ``/fhir/metadata`` tells what both serve."""
    now_of = clock or (lambda: datetime.now(UTC))
    r = APIRouter(route_class=_FhirRoute)
    producer: Any = bus.producer(bootstrap)

    def base_of(request: Request) -> str:
        return fhir_base(request, base_url)

    def admin(request: Request) -> Principal:
        principal = authenticate(request.headers.get("authorization"))
        require_scope(principal, ADMIN_SCOPE)
        return principal

    def auditor(request: Request) -> Principal:
        principal = authenticate(request.headers.get("authorization"))
        require_scope(principal, AUDIT_SCOPE)
        return principal

    def query_of(request: Request) -> str:
        q = request.url.query
        return request.url.path + (f"?{q}" if q else "")

    def audit_read(
        principal: Principal, request: Request, interaction: str, twins: Sequence[str] = ()
    ) -> None:
        """Audit a read of the audit log (BALP Query, PatientQuery when about a patient)."""
        now = now_of()
        events = []
        targets: list[str | None] = [*twins] or [None]
        for twin in targets:
            ev = audit_access(
                principal,
                None,
                twin,
                None,
                interaction=interaction,
                query=query_of(request),
                disclosed=[],
                allowed=True,
                now=now,
            )
            if twin is None:
                ev["meta"]["profile"] = [f"{BALP}/IHE.BasicAudit.Query"]
            events.append((twin or principal.client_id, ev))
        audit(events)

    # -- /fhir/metadata: the API's statement plus what this router adds ------------------

    @r.get("/fhir/metadata", include_in_schema=False)  # (fhirtwin.api's is in the schema)
    def metadata_with_admin(request: Request) -> Response:
        return fhir_response(capability_statement(base_of(request), now_of(), admin=True))

    # -- subscribers -----------------------------------------------------------------------

    @r.get("/admin/subscribers", tags=["admin"])
    def list_subscribers(request: Request) -> Response:
        admin(request)
        return _json([s.to_json() for s in registry.all()])

    @r.get("/admin/subscribers/{sub_id}", tags=["admin"])
    def read_subscriber(request: Request, sub_id: str) -> Response:
        admin(request)
        sub = registry.get(sub_id)
        if sub is None:
            raise ApiError(404, "not-found", f"no subscriber {sub_id!r}")
        return _json(sub.to_json())

    def put_subscriber(sub_id: str, body: SubscriberIn, *, create_only: bool) -> Response:
        try:
            sub = make_subscriber(
                sub_id,
                actor=body.actor,
                purpose=body.purpose,
                scope=body.scope,
                types=body.types,
                default=body.default,
                deidentify=body.deidentify,
                encryption_key=body.encryption_key,
            )
        except SubscriberError as exc:
            raise ApiError(400, "invalid", str(exc)) from None
        current = registry.get(sub.id)
        if current is not None and create_only:
            raise ApiError(409, "duplicate", f"subscriber {sub.id} exists; PUT it to replace it")
        if current is not None and current.extra:
            sub = replace(sub, extra=dict(current.extra))  # e.g. api_only stays
        try:
            bus.ensure_topics(bootstrap, [sub.topic])
        except Exception as exc:
            raise ApiError(
                503, "transient", f"Kafka: cannot create topic {sub.topic}: {exc}"
            ) from None
        registry.put(sub)
        status = 200 if current is not None else 201
        return _json(sub.to_json(), status, {"Location": f"/admin/subscribers/{sub.id}"})

    @r.post("/admin/subscribers", tags=["admin"])
    def create_subscriber(request: Request, body: NewSubscriber) -> Response:
        admin(request)
        fields = body.model_dump(exclude={"id"})
        return put_subscriber(body.id, SubscriberIn(**fields), create_only=True)

    @r.put("/admin/subscribers/{sub_id}", tags=["admin"])
    def update_subscriber(request: Request, sub_id: str, body: SubscriberIn) -> Response:
        admin(request)
        return put_subscriber(sub_id, body, create_only=False)

    @r.delete("/admin/subscribers/{sub_id}", tags=["admin"])
    def delete_subscriber(request: Request, sub_id: str) -> Response:
        admin(request)
        if not registry.remove(sub_id):
            raise ApiError(404, "not-found", f"no subscriber {sub_id!r}")
        return Response(status_code=204)

    # -- API clients -----------------------------------------------------------------------

    @r.get("/admin/clients", tags=["admin"])
    def list_clients(request: Request) -> Response:
        admin(request)
        return _json(authority.clients())

    @r.get("/admin/clients/{client_id}", tags=["admin"])
    def read_client(request: Request, client_id: str) -> Response:
        admin(request)
        record = authority.client(client_id)
        if record is None:
            raise ApiError(404, "not-found", f"no client {client_id!r}")
        return _json(record)

    def put_client(client_id: str, body: ClientIn, *, create_only: bool) -> Response:
        current = authority.client(client_id)
        if current is not None and create_only:
            raise ApiError(409, "duplicate", f"client {client_id} exists; PUT it to replace it")
        jwks = body.jwks
        if "keys" not in jwks and "kty" in jwks:  # a single bare JWK, as the CLI takes
            jwks = {"keys": [jwks]}
        try:
            authority.register_client(client_id, jwks, body.scopes, body.subscriber)
        except ClientError as exc:
            raise ApiError(400, "invalid", str(exc)) from None
        record = authority.client(client_id)
        status = 200 if current is not None else 201
        return _json(record, status, {"Location": f"/admin/clients/{client_id}"})

    @r.post("/admin/clients", tags=["admin"])
    def create_client(request: Request, body: NewClient) -> Response:
        admin(request)
        fields = body.model_dump(exclude={"client_id"})
        return put_client(body.client_id, ClientIn(**fields), create_only=True)

    @r.put("/admin/clients/{client_id}", tags=["admin"])
    def update_client(request: Request, client_id: str, body: ClientIn) -> Response:
        admin(request)
        return put_client(client_id, body, create_only=False)

    @r.delete("/admin/clients/{client_id}", tags=["admin"])
    def delete_client(request: Request, client_id: str) -> Response:
        admin(request)
        if not authority.remove_client(client_id):
            raise ApiError(404, "not-found", f"no client {client_id!r}")
        return Response(status_code=204)

    # -- Consent (FHIR) --------------------------------------------------------------------

    def check_consent(doc: Any) -> dict[str, Any]:
        """The R4 model and the engine's own checks (as ``fhirtwin consent put``)."""
        if not isinstance(doc, dict):
            raise _Invalid(400, "$", "expected a JSON object (a FHIR Consent resource)")
        if doc.get("resourceType") != "Consent":
            raise _Invalid(
                400,
                "$.resourceType",
                f"expected Consent, found {doc.get('resourceType')!r}",
            )
        from fhir.resources.R4B.consent import Consent

        try:
            Consent.model_validate(doc)
        except ValidationError as exc:
            first = exc.errors()[0]
            more = exc.error_count() - 1
            raise _Invalid(
                400,
                _loc(first["loc"]),
                first["msg"] + (f" (and {more} more)" if more else ""),
            ) from None
        except (ValueError, TypeError) as exc:  # the model's own validators, outside pydantic
            raise _Invalid(400, "$", f"not a valid R4 Consent: {exc}") from None
        now = now_of()
        for scope in ("patient-privacy", "research"):  # can the engine read it?
            purpose = "HRESCH" if scope == "research" else "TREAT"
            request = {"actor": ["urn:fhirtwin:check|x"], "purpose": [purpose], "scope": scope}
            try:
                prepare([doc], request, now=now)
            except ConsentError as exc:
                inner = exc.where.split(" ", 1)[1] if " " in exc.where else ""
                path = "$" + (f".{inner}" if inner and not inner.startswith("[") else inner)
                raise _Invalid(422, path, exc.message) from None
        return doc

    def file_consent(
        request: Request, principal: Principal, doc: dict[str, Any], *, update: bool
    ) -> Response:
        rid = str(doc["id"])
        ref = f"Consent/{rid}"
        meta = doc.get("meta")
        if isinstance(meta, dict):  # versionId and lastUpdated are the store's to set
            kept = {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
            doc = {**doc, "meta": kept} if kept else {k: v for k, v in doc.items() if k != "meta"}
        try:
            twin = find_twin(store, doc)
        except ConsentPutError as exc:
            raise _Invalid(422, "$.patient", str(exc)) from None
        held = [t for t in store.holders(ref) if not t.startswith("_")]
        if held and twin not in held:
            raise _Invalid(
                422, "$.patient", f"{ref} belongs to another patient's twin; it cannot move"
            )
        current = store.resource(twin, ref) if held else None
        if_match = request.headers.get("if-match")
        if if_match is not None and update:
            have = f'W/"{(current or {}).get("meta", {}).get("versionId", "")}"'
            if current is None or if_match.strip() not in (have, have[2:]):
                raise ApiError(
                    412, "conflict", f"If-Match {if_match}: {ref} is at {have if current else '—'}"
                )
        interaction = "update" if update else "create"
        event = audit_access(
            principal,
            None,
            twin,
            None,
            interaction=interaction,
            query=None,
            disclosed=[ref],
            allowed=True,
            now=now_of(),
        )
        event["meta"]["profile"] = [
            f"{BALP}/IHE.BasicAudit.Patient{'Update' if current else 'Create'}"
        ]
        event["action"] = "U" if current else "C"
        audit([(twin, event)])  # before the write, as reads are audited before the answer
        value = consent_event(
            twin,
            doc,
            now_ms=int(time.time() * 1000),
            record=f"api:consent-{interaction}:{principal.client_id}",
        )
        source = [("fhirtwin-source-kind", b"fhir"), ("fhirtwin-source-record", b"api")]
        try:
            bus.send_acked(producer, [(bus.RESOURCES, value, twin.encode(), source)], timeout=30)
        except bus.NotAcknowledged as exc:
            raise ApiError(
                503, "transient", f"Kafka did not acknowledge the Consent: {exc}"
            ) from None
        # Wait until the assembler has filed this content as the current version.
        digest = content_hash(doc)
        deadline = time.monotonic() + file_timeout
        stored = store.resource(twin, ref)
        while stored is None or content_hash(stored) != digest:
            if time.monotonic() > deadline:
                location = f"{base_of(request)}/{ref}"
                body = {
                    "resourceType": "OperationOutcome",
                    "issue": [
                        {
                            "severity": "information",
                            "code": "informational",
                            "diagnostics": (
                                f"{ref} was accepted (Kafka has it) but the assembler has not "
                                f"filed it in twin {twin} within {file_timeout:g} s; it will "
                                "be filed when the assembler runs"
                            ),
                        }
                    ],
                }
                return fhir_response(body, 202, {"Location": location})
            time.sleep(0.05)
            stored = store.resource(twin, ref)
        vid = stored["meta"]["versionId"]
        headers = {
            "Location": f"{base_of(request)}/{ref}/_history/{vid}",
            "ETag": f'W/"{vid}"',
        }
        last = stored["meta"].get("lastUpdated")
        if last:
            headers["Last-Modified"] = _http_date(last)
        return fhir_response(stored, 200 if current else 201, headers)

    @r.post("/fhir/Consent", tags=["fhir-admin"])
    def create_consent(request: Request, body: ConsentBody) -> Response:
        principal = admin(request)
        try:
            doc = check_consent(body)
            doc = {**doc, "id": str(uuid.uuid4())}  # create: the server assigns the id
            return file_consent(request, principal, doc, update=False)
        except _Invalid as exc:
            return exc.response()

    @r.put("/fhir/Consent/{rid}", tags=["fhir-admin"])
    def update_consent(request: Request, rid: str, body: ConsentBody) -> Response:
        principal = admin(request)
        try:
            if not re.match(_FHIR_ID, rid):
                raise _Invalid(400, "$.id", f"{rid!r} is not a FHIR id ([A-Za-z0-9-.]{{1,64}})")
            doc = check_consent(body)
            if doc.get("id") != rid:
                raise _Invalid(
                    400,
                    "$.id",
                    f"must be the id in the URL ({rid!r}), found {doc.get('id')!r}",
                )
            return file_consent(request, principal, doc, update=True)
        except _Invalid as exc:
            return exc.response()

    @r.get("/fhir/Consent/{rid}", tags=["fhir-admin"])
    def read_consent(request: Request, rid: str) -> Response:
        admin(request)
        for twin in store.holders(f"Consent/{rid}"):
            res = store.resource(twin, f"Consent/{rid}")
            if res is not None:
                vid = res.get("meta", {}).get("versionId")
                return fhir_response(res, headers={"ETag": f'W/"{vid}"'} if vid else {})
        raise ApiError(404, "not-found", f"Consent/{rid} is not known to this server")

    @r.get("/fhir/Consent/{rid}/_history/{vid}", tags=["fhir-admin"])
    def vread_consent(request: Request, rid: str, vid: str) -> Response:
        admin(request)
        for twin in store.holders(f"Consent/{rid}"):
            for res in store.history(twin, f"Consent/{rid}"):
                if res.get("meta", {}).get("versionId") == vid:
                    return fhir_response(res, headers={"ETag": f'W/"{vid}"'})
        raise ApiError(
            404, "not-found", f"Consent/{rid}/_history/{vid} is not known to this server"
        )

    # -- the audit log (FHIR) --------------------------------------------------------------

    def patient_keys(value: str) -> tuple[set[str], list[str]]:
        """What an event must name for ``patient=value``: (keys, twins)."""
        keys: set[str] = set()
        twins: list[str] = []
        for v in (x.strip() for x in value.split(",")):
            if not v:
                continue
            pid = v[8:] if v.startswith("Patient/") else v
            held = [t for t in store.holders(f"Patient/{pid}") if not t.startswith("_")]
            if not held and not v.startswith("Patient/"):
                twin = store.resolve(v)
                held = [twin] if twin else []
            keys |= {f"Patient/{pid}", *held}
            twins += held
        return keys, sorted(set(twins))

    def search_events(
        params: list[tuple[str, str]],
    ) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
        filters: list[tuple[str, str]] = []
        wanted: list[set[str]] = []
        twins: list[str] = []
        for name, value in params:
            if name in _AUDIT_CONTROL:
                continue
            if name not in AUDIT_SEARCH_PARAMS:
                raise ApiError(
                    400,
                    "not-supported",
                    f"unknown search parameter {name!r} for AuditEvent; supported: "
                    + ", ".join(sorted(AUDIT_SEARCH_PARAMS)),
                )
            if name == "date":
                _check_value("date", name, value)
            if name == "patient":
                keys, found = patient_keys(value)
                wanted.append(keys)
                twins += found
            else:
                filters.append((name, value))
        sort = [v for k, v in params if k == "_sort"]
        for s in sort:
            if s not in ("date", "-date"):
                raise ApiError(
                    400, "not-supported", f"_sort={s!r}: AuditEvent sorts by date or -date"
                )
        out = []
        for i, ev in _events(bootstrap):
            if any(not (_patients(ev) & keys) for keys in wanted):
                continue
            if all(_audit_match(ev, n, v) for n, v in filters):
                out.append((i, ev))
        if sort and sort[-1] == "-date":
            out.reverse()  # the log's order is the order of recording
        return out, sorted(set(twins))

    def page(request: Request, path: str, found: list[tuple[int, dict[str, Any]]]) -> Response:
        params = list(request.query_params.multi_items())
        single = dict(params)
        count, offset = _count(single), _offset(single)
        base = base_of(request)
        entries = []
        for i, ev in found[offset : offset + count]:
            e = _entry(base, ev, "match")
            e["extension"] = [{"url": LOG_INDEX_URL, "valueInteger": i}]
            entries.append(e)
        bundle = _page_bundle(
            base,
            path,
            params,
            entries,
            count=count,
            offset=offset,
            more=offset + count < len(found),
            now=now_of(),
        )
        return fhir_response(bundle)

    @r.get("/fhir/AuditEvent", tags=["fhir-audit"])
    def search_audit(request: Request) -> Response:
        principal = auditor(request)
        params = list(request.query_params.multi_items())
        single = dict(params)
        _count(single)  # a bad _count or _offset is a 400 before anything is read
        _offset(single)
        found, twins = search_events(params)
        audit_read(principal, request, "search-type", twins)
        return page(request, "AuditEvent", found)

    @r.get("/fhir/AuditEvent/{eid}", tags=["fhir-audit"])
    def read_audit(request: Request, eid: str) -> Response:
        principal = auditor(request)
        for _i, ev in _events(bootstrap):
            if ev.get("id") == eid:
                twins = sorted(p for p in _patients(ev) if not p.startswith("Patient/"))
                audit_read(principal, request, "read", twins)
                return fhir_response(ev)
        audit_read(principal, request, "read")
        raise ApiError(404, "not-found", f"AuditEvent/{eid} is not known to this server")

    def disclosures(keys: set[str]) -> list[tuple[int, dict[str, Any], dict[str, Any]]]:
        rows = []
        for i, ev in _events(bootstrap):
            if not (_patients(ev) & keys):
                continue
            row = _disclosure(ev)
            if row is not None:
                rows.append((i, ev, row))
        return rows

    @r.get("/fhir/Patient/{pid}/$disclosures", tags=["fhir-audit"])
    def patient_disclosures(request: Request, pid: str) -> Response:
        principal = auditor(request)
        unknown = set(request.query_params) - {"_count", "_offset", "_format", "_pretty"}
        if unknown:
            raise ApiError(
                400, "not-supported", f"$disclosures: unsupported parameter(s) {sorted(unknown)}"
            )
        single = dict(request.query_params)
        _count(single)
        _offset(single)
        twins = [t for t in store.holders(f"Patient/{pid}") if not t.startswith("_")]
        rows = disclosures({f"Patient/{pid}", *twins})
        audit_read(principal, request, "operation", twins)
        return page(request, f"Patient/{pid}/$disclosures", [(i, ev) for i, ev, _ in rows])

    # -- the audit log (plain JSON) --------------------------------------------------------

    @r.get("/admin/audit/disclosures", tags=["admin-audit"])
    def disclosures_report(request: Request, patient: str) -> Response:
        """The accounting of disclosures of ``fhirtwin audit report --patient``."""
        principal = auditor(request)
        keys, twins = patient_keys(patient)
        twin = twins[0] if len(twins) == 1 else (store.resolve(patient) or patient)
        rows = [row for _i, _ev, row in disclosures(keys | {twin})]
        audit_read(principal, request, "operation", twins)
        return _json({"patient": twin, "disclosures": rows})

    @r.get("/admin/audit/verify", tags=["admin-audit"])
    def verify_log(request: Request) -> Response:
        """``fhirtwin audit verify``: the log recomputed against every signed checkpoint."""
        from fhirtwin.audit import verify

        principal = auditor(request)
        audit_read(principal, request, "operation")
        try:
            res = verify(bootstrap, redis_url)
        except FileNotFoundError as exc:
            raise ApiError(503, "not-supported", str(exc)) from None
        return _json(
            {
                "ok": res.ok,
                "reason": res.reason,
                "entries": res.entries,
                "signed": res.checkpoint.size if res.checkpoint else 0,
                "root": base64.b64encode(res.checkpoint.root).decode() if res.checkpoint else None,
                "unsigned": res.unsigned,
                "first_bad_index": res.first_bad_index,
                "bad_range": list(res.bad_range) if res.bad_range else None,
            }
        )

    # -- dead letters ----------------------------------------------------------------------

    @r.get("/admin/deadletters", tags=["admin"])
    def list_deadletters(request: Request) -> Response:
        from fhirtwin.deadletter import corrections, list_deadletters, replayed_ids

        admin(request)
        params = dict(request.query_params)
        unknown = set(params) - {"stage", "open", "_count", "_offset"}
        if unknown:
            raise ApiError(400, "not-supported", f"unknown parameter(s) {sorted(unknown)}")
        count, offset = _count(params), _offset(params)
        open_only = params.get("open", "false").lower()
        if open_only not in ("true", "false"):
            raise ApiError(400, "invalid", f"open={params['open']!r}: expected true or false")
        done = replayed_ids(redis_url)
        letters = [
            d
            for d in list_deadletters(bootstrap)
            if not (open_only == "true" and d.id in done)
            and (not params.get("stage") or d.stage == params["stage"])
        ]
        chosen = letters[offset : offset + count]
        path = request.url.path
        kept = [
            (k, v) for k, v in request.query_params.multi_items() if k not in ("_count", "_offset")
        ]
        links = [{"relation": "self", "url": _url(path, kept, count, offset)}]
        if offset + count < len(letters):
            links.append({"relation": "next", "url": _url(path, kept, count, offset + count)})
        fixed = corrections(redis_url)
        entries = [d.as_dict(d.id in done, fixed.get(d.id)) for d in chosen]
        return _json({"link": links, "entry": entries})

    def letter(dl_id: str) -> Any:
        from fhirtwin.deadletter import list_deadletters

        found = next((d for d in list_deadletters(bootstrap) if d.id == dl_id), None)
        if found is None:
            raise ApiError(404, "not-found", f"no dead letter {dl_id!r} (ids are partition:offset)")
        return found

    @r.get("/admin/deadletters/{dl_id}", tags=["admin"])
    def read_deadletter(request: Request, dl_id: str) -> Response:
        from fhirtwin.deadletter import corrections, replayed_ids

        admin(request)
        dl = letter(dl_id)
        body = dl.as_dict(dl.id in replayed_ids(redis_url), corrections(redis_url).get(dl.id))
        from fhirtwin.crypto import CryptoError

        try:
            original: bytes | None = dl.original  # in clear (raw records are stored sealed)
        except CryptoError as exc:  # its key expired or was erased: the bytes are gone
            original, body["original_error"] = None, f"the original cannot be opened: {exc}"
        body["original"] = original.decode("utf-8", "replace") if original is not None else None
        body["original_base64"] = base64.b64encode(original).decode() if original else None
        return _json(body)

    def do_replay(letters: list[Any]) -> Response:
        from fhirtwin.deadletter import replay

        try:
            n = replay(bootstrap, redis_url, letters)
        except RuntimeError as exc:
            raise ApiError(503, "transient", str(exc)) from None
        return _json({"replayed": n, "ids": [d.id for d in letters]})

    @r.post("/admin/deadletters/{dl_id}/replay", tags=["admin"])
    def replay_one(request: Request, dl_id: str) -> Response:
        admin(request)
        return do_replay([letter(dl_id)])

    @r.post("/admin/deadletters/{dl_id}/replay-corrected", tags=["admin"])
    def replay_corrected(request: Request, dl_id: str, body: CorrectedIn) -> Response:
        """``fhirtwin deadletter replay ID --with FILE``: a corrected copy of the input
        (base64) goes to its raw topic instead of the original, which stays as it was."""
        from fhirtwin.deadletter import replay_corrected

        admin(request)
        dl = letter(dl_id)
        try:
            data = base64.b64decode(body.corrected_base64, validate=True)
        except (ValueError, binascii.Error):
            raise ApiError(400, "invalid", "corrected_base64 is not base64") from None
        try:
            replay_corrected(bootstrap, redis_url, dl, data)
        except ValueError as exc:
            raise ApiError(400, "invalid", str(exc)) from None
        except RuntimeError as exc:
            raise ApiError(503, "transient", str(exc)) from None
        return _json({"replayed": 1, "ids": [dl.id], "corrected_bytes": len(data)})

    @r.post("/admin/deadletters/replay", tags=["admin"])
    def replay_many(request: Request, body: ReplayIn) -> Response:
        """``fhirtwin deadletter replay ID… | --all [--stage S]``."""
        from fhirtwin.deadletter import list_deadletters, replayed_ids

        admin(request)
        letters = list_deadletters(bootstrap)
        if body.ids:
            wanted = set(body.ids)
            chosen = [d for d in letters if d.id in wanted]
            missing = wanted - {d.id for d in chosen}
            if missing:
                raise ApiError(404, "not-found", f"no dead letter {', '.join(sorted(missing))}")
        elif body.all:
            done = replayed_ids(redis_url)
            chosen = [d for d in letters if d.id not in done]
        else:
            raise ApiError(400, "invalid", 'name dead letters ("ids": […]) or send "all": true')
        if body.stage:
            chosen = [d for d in chosen if d.stage == body.stage]
        return do_replay(chosen)

    return r


def _audit_match(ev: Mapping[str, Any], name: str, value: str) -> bool:
    if name == "_id":
        return str(ev.get("id")) in {v.strip() for v in value.split(",")}
    if name == "date":
        return _date_match(fhir_time_ms(ev.get("recorded")), value)
    if name == "agent":
        keys = _agent_keys(ev)
        return any(v.strip() in keys for v in value.split(","))
    if name == "subtype":
        return _token_match(ev.get("subtype"), value)
    if name == "type":
        return _token_match(ev.get("type"), value)
    if name == "outcome":
        return _token_match(ev.get("outcome"), value)
    return False


def _url(path: str, params: list[tuple[str, str]], count: int, offset: int) -> str:
    from urllib.parse import urlencode

    return f"{path}?{urlencode([*params, ('_count', str(count)), ('_offset', str(offset))])}"


def _http_date(instant: str) -> str:
    from email.utils import format_datetime

    ms = fhir_time_ms(instant)
    if ms is None:
        return instant
    return format_datetime(datetime.fromtimestamp(ms / 1000, UTC), usegmt=True)
