"""The snapshot publisher: twin change events → consent-checked snapshots per subscriber.

For each twin event (``twin.events``) and each subscriber concerned, the twin's current
Consents are compiled for the subscriber's registered request (``consent.prepare``); the
request-level decision says whether the subscriber may receive this patient at all, then
each resource of the types it wants is decided on its own. What is permitted goes out as a
FHIR Bundle (type ``collection``) on ``twin.snapshots.<subscriber>``, keyed by twin id (or
by the subscriber's pseudonym of the twin when the profile is ``safe-harbor``). A
subscriber that loses access gets a withdrawal notice instead. Every decision and every
disclosure becomes an AuditEvent (IHE BALP shapes) on ``twin.audit``.

Formats, choices and their reasons: ``docs/snapshots.md``.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from fhirtwin import bus
from fhirtwin.consent import INDETERMINATE, ConsentError, Decision, Policy, prepare
from fhirtwin.crypto import default_keyring, seal_event
from fhirtwin.metrics import SNAPSHOT_DECISIONS
from fhirtwin.redisconn import connect
from fhirtwin.subscribers import Registry, Subscriber, seal_for
from fhirtwin.twin import TwinStore
from fhirtwin.worker import Out, StreamWorker, dead_letter

__all__ = [
    "AUDIT_TOPIC",
    "SNAPSHOT_GROUP",
    "ConsentPutError",
    "SnapshotPublisher",
    "consent_event",
    "find_twin",
    "safe_harbor",
    "strip_dangling",
]

log = logging.getLogger("fhirtwin.snapshot")

AUDIT_TOPIC = bus.AUDIT
SNAPSHOT_GROUP = "fhirtwin-snapshot"

DCM = "http://dicom.nema.org/resources/ontology/DCM"
ACTREASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
AUTHZ_SUBTYPE = "https://profiles.ihe.net/ITI/BALP/CodeSystem/AuthZsubType"
ISO21089 = "http://terminology.hl7.org/CodeSystem/iso-21089-lifecycle"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition"
TWIN_SYSTEM = "urn:fhirtwin:twin"
PSEUDONYM_SYSTEM = "urn:fhirtwin:pseudonym"
STATE_TAG = {"system": "urn:fhirtwin", "code": "derived-state"}
AGE_OVER_89 = "https://fhirtwin.dev/fhir/StructureDefinition/age-over-89"


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ref(res: Mapping[str, Any]) -> str:
    return f"{res.get('resourceType')}/{res.get('id')}"


# -- consent put ----------------------------------------------------------------------


class ConsentPutError(ValueError):
    """A Consent that cannot be filed in a twin; the message says why."""


def find_twin(store: TwinStore, consent: Mapping[str, Any]) -> str:
    """The twin of the patient a Consent names: ``Patient/<id>`` held by one twin, or an
    identifier resolved by the MPI index."""
    patient = consent.get("patient")
    if not isinstance(patient, Mapping):
        raise ConsentPutError("Consent.patient is missing: whose consent is it?")
    ref = patient.get("reference")
    if isinstance(ref, str) and ref:
        ref = ref.split("/_history/")[0]
        if not re.match(r"^Patient/[A-Za-z0-9.-]{1,64}$", ref):
            raise ConsentPutError(
                f"Consent.patient.reference {ref!r}: expected Patient/<id> (never fetched)"
            )
        twins = store.twins()
        pipe = store.r.pipeline(transaction=False)
        for t in twins:
            pipe.hexists(f"{store.base(t)}:cur", ref)
        found = [t for t, has in zip(twins, pipe.execute(), strict=True) if has]
        if len(found) > 1:
            raise ConsentPutError(f"{ref} is held by several twins: {', '.join(found)}")
        if found:
            return found[0]
        raise ConsentPutError(f"no twin holds {ref}")
    ident = patient.get("identifier")
    if isinstance(ident, Mapping) and ident.get("value"):
        key = f"{ident['system']}|{ident['value']}" if ident.get("system") else ident["value"]
        twin = store.resolve(str(key))
        if twin is None:
            raise ConsentPutError(f"no twin has the identifier {key}")
        return twin
    raise ConsentPutError("Consent.patient has neither reference nor identifier")


def consent_event(twin: str, consent: dict[str, Any], *, now_ms: int, record: str) -> bytes:
    """The ``fhir.resources`` value (normalize's envelope, sealed with the twin's key like
    every event there) that files a Consent in a twin.

    ``event_ms`` is the time of the put, so a later put (a withdrawal) is the newer version.
    ``identity`` is empty: filing a consent is not an identity decision.
    """
    event = {
        "v": 1,
        "twin": twin,
        "event_ms": now_ms,
        "source": {
            "kind": "fhir",
            "record": record,
            "control_id": str(consent.get("id", "")),
            "received_ms": now_ms,
        },
        "identity": {},
        "identifiers": [],
        "merge_from": None,
        "resources": [consent],
    }
    return seal_event(default_keyring(), twin, orjson.dumps(event))


# -- snapshot content -------------------------------------------------------------------


def _target(ref: str) -> str | None:
    """``Type/id`` of a relative or ``urn:uuid:`` reference; None for others."""
    ref = ref.split("/_history/")[0]
    if ref.startswith("urn:uuid:"):
        return "urn:uuid:" + ref[9:]
    if re.match(r"^[A-Z][A-Za-z]+/[A-Za-z0-9.-]{1,64}$", ref):
        return ref
    return None


def _prune(value: Any, keep: Any) -> Any:
    """``value`` without the Reference dicts for which ``keep(ref)`` is false, and without
    dicts and lists left empty by that; returns ``_GONE`` for a removed value.

    Copy on write: a dict or list with nothing removed under it is returned as it is, so
    only the path down to a removed reference is rebuilt (most of a resource is not).
    """
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str) and not keep(ref):
            return _GONE
        changed: dict[str, Any] | None = None
        for k, v in value.items():
            if isinstance(v, (dict, list)):
                nv = _prune(v, keep)
                if nv is not v:
                    if changed is None:
                        changed = {}
                    changed[k] = nv
        if changed is None:
            return value
        out = {}
        for k, v in value.items():
            nv = changed.get(k, v)
            if nv is not _GONE:
                out[k] = nv
        return out or _GONE  # value was not empty: something was removed
    if isinstance(value, list):
        new = [_prune(v, keep) if isinstance(v, (dict, list)) else v for v in value]
        if all(a is b for a, b in zip(new, value, strict=True)):
            return value
        items = [x for x in new if x is not _GONE]
        return items or _GONE
    return value


_GONE: Any = object()

# A string ``reference`` member as orjson writes it (compact, no spaces). A quote inside a
# JSON string is escaped, so the contents of other strings never match: every dict with a
# string ``reference``, at any depth, gives exactly one match. (The string is written as
# runs of plain characters between escapes, not one alternation per character: 4x faster.)
_REFERENCE_JSON = re.compile(rb'"reference":"([^"\\]*(?:\\.[^"\\]*)*)"')


def _references(resource: Mapping[str, Any]) -> list[str] | None:
    """Every string ``reference`` in a resource, found in its JSON bytes (one fast C pass
    instead of a Python walk); None when the resource is not plain JSON data."""
    try:
        data = orjson.dumps(resource)
    except TypeError:  # orjson.JSONEncodeError: e.g. a non-string key
        return None
    return [
        orjson.loads(b'"' + m + b'"') if b"\\" in m else m.decode()
        for m in _REFERENCE_JSON.findall(data)
    ]


def strip_dangling(resources: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Remove every reference to a resource that is not in ``resources`` (withheld data
    leaves no trace); contained (``#id``) and absolute references are kept.

    Most resources have no dangling reference: they are found by reading their references
    off their JSON (:func:`_references`) and returned as they are, not copied. Only the
    others are pruned, and they share their unchanged parts with the input: treat the
    result as read-only.
    """
    held = {_ref(r) for r in resources} | {f"urn:uuid:{r.get('id')}" for r in resources}
    verdicts: dict[str, bool] = {}  # a twin's resources share many references

    def keep(ref: str) -> bool:
        ok = verdicts.get(ref)
        if ok is None:
            if ref.startswith("#"):
                ok = True
            else:
                t = _target(ref)
                ok = t is None or t in held
            verdicts[ref] = ok
        return ok

    out = []
    for r in resources:
        refs = _references(r)
        if refs is not None and all(keep(ref) for ref in refs):
            out.append(r)  # nothing dangles
            continue
        # Something dangles (or a match is one _prune would not look at: that costs time only)
        pruned = _prune(r, keep)
        out.append(pruned if pruned is not _GONE else {"resourceType": r["resourceType"]})
    return out


def state_resource(
    state: Mapping[str, Any], refs: Mapping[str, str], *, deidentified: bool
) -> dict[str, Any] | None:
    """The twin's derived state as a Parameters resource, restricted to the resources of
    the snapshot (``refs``: twin reference → reference as sent).

    Sets (problems, medications, allergies) become parts ``item`` with a valueReference;
    latest-by-code maps (vitals, labs) parts ``latest`` with ``code`` (valueCoding, or
    valueString for a text-only code, left out when de-identified) and ``resource``. Empty
    categories are left out (no counts, nothing about what was withheld)."""
    params: list[dict[str, Any]] = []
    for name, value in state.items():
        parts: list[dict[str, Any]] = []
        if isinstance(value, list):
            parts = [
                {"name": "item", "valueReference": {"reference": refs[r]}}
                for r in value
                if r in refs
            ]
        elif isinstance(value, dict):
            for code, r in value.items():
                if r not in refs:
                    continue
                system, _, c = code.partition("|")
                if system == "text":
                    if deidentified:
                        continue
                    coded: dict[str, Any] = {"name": "code", "valueString": c}
                else:
                    coded = {"name": "code", "valueCoding": {"system": system, "code": c}}
                ref = {"name": "resource", "valueReference": {"reference": refs[r]}}
                parts.append({"name": "latest", "part": [coded, ref]})
        if parts:
            params.append({"name": name, "part": parts})
    if not params:
        return None
    return {
        "resourceType": "Parameters",
        "id": "state",
        "meta": {"tag": [STATE_TAG]},
        "parameter": params,
    }


# -- Safe Harbor (45 CFR 164.514(b)(2)) ------------------------------------------------

# Resources about other people (relatives, clinicians) or devices and message plumbing:
# never in a de-identified snapshot.
DEID_DROP_TYPES = frozenset(
    {
        "RelatedPerson",
        "Practitioner",
        "PractitionerRole",
        "Person",
        "Device",
        "MessageHeader",
        "Provenance",
        "AuditEvent",
        "Consent",
        "Binary",
    }
)
# Keys removed wherever they appear: identifiers, contact data, narrative and free text,
# extensions (they carry anything: birth place, mother's maiden name, source fields).
_DROP_KEYS = frozenset(
    {
        "identifier",
        "telecom",
        "photo",
        "contact",
        "link",
        "text",
        "div",
        "note",
        "comment",
        "comments",
        "description",
        "extension",
        "modifierExtension",
        "patientInstruction",
        "conclusion",
        "presentedForm",
        "content",
        "url",
        "fullUrl",
        "signature",
        "serialNumber",
        "udiCarrier",
        "lotNumber",
        "alias",
        "qualification",
        "summary",
        "title",
        "data",
        "hash",
        "valueAttachment",
        "valueUri",
        "valueUrl",
        "valueIdentifier",
        "valueBase64Binary",
        "valueHumanName",
        "valueAddress",
        "valueContactPoint",
        "name",  # person names (Patient); Organization/Location names are not about the patient
    }
)
_KEEP_NAME_TYPES = frozenset({"Organization", "Location", "HealthcareService"})
_DATE = re.compile(
    r"^(\d{4})-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01])(T[0-9:.]+(Z|[+-]\d{2}:\d{2})?)?)?$"
)
_URL = re.compile(r"^(https?|ftp|mailto|tel|file)://?", re.IGNORECASE)
# ZIP3 areas of 20,000 people or fewer (HHS guidance, 2000 census): reported as 000.
_SMALL_ZIP3 = frozenset(
    [
        "036",
        "059",
        "063",
        "102",
        "203",
        "556",
        "692",
        "790",
        "821",
        "823",
        "830",
        "831",
        "878",
        "879",
        "884",
        "890",
        "893",
    ]
)
_AGE_UNITS = frozenset({"a", "yr", "year", "years", "y"})


def _zip3(code: Any) -> str | None:
    if not isinstance(code, str):
        return None
    m = re.match(r"^(\d{3})\d{2}(-\d{4})?$", code.strip())
    if not m:
        return None  # not a US ZIP: dropped
    return "000" if m.group(1) in _SMALL_ZIP3 else m.group(1)


def _address(addr: Any) -> Any:
    if not isinstance(addr, dict):
        return _GONE
    out = {k: addr[k] for k in ("state", "country", "use", "type") if isinstance(addr.get(k), str)}
    z = _zip3(addr.get("postalCode"))
    if z:
        out["postalCode"] = z
    return out or _GONE


def _age(q: dict[str, Any]) -> dict[str, Any]:
    unit = str(q.get("code") or q.get("unit") or "").lower()
    value = q.get("value")
    if unit in _AGE_UNITS and isinstance(value, (int, float)) and value > 89:
        return {**q, "value": 90, "comparator": ">="}
    return q


# What the scrubber does with a member, by its key (see _member_kind); computed once per
# distinct key and snapshot instead of a set lookup and two ``endswith`` per member.
_RECURSE, _DROP, _NAME, _DISPLAY, _ADDRESS, _META = range(6)
_REFERENCE_ONLY_KEYS = frozenset({"identifier", "display", "type"})


def _member_kind(k: str) -> int:
    if k == "name":  # in _DROP_KEYS, but kept for _KEEP_NAME_TYPES
        return _NAME
    if k in _DROP_KEYS or k.endswith("String") or k.endswith("Markdown"):
        return _DROP
    if k == "display":
        return _DISPLAY
    if k == "address":
        return _ADDRESS
    if k == "meta":
        return _META
    return _RECURSE


def _scrub_string(value: str, key: str) -> Any:
    """Dates become their year; URLs go (except as a code system or profile).

    The length and character tests are necessary conditions of the two patterns, so that
    the regexes run only on the few strings that can match.
    """
    if len(value) >= 7 and value[4] == "-":
        m = _DATE.match(value)
        if m:
            return m.group(1)  # dates: the year only
    if ":/" in value and key not in ("system", "profile") and _URL.match(value):
        return _GONE
    return value


# orjson options for the scrubber's memo keys: values that merely serialize like JSON
# (datetimes, subclasses, dataclasses) raise instead, and are scrubbed without the memo.
_MEMO_JSON = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATACLASS
)


class _Scrubber:
    """De-identifies the resources of one snapshot; see :func:`safe_harbor`."""

    def __init__(self, ids: Mapping[str, str]) -> None:
        self.ids = ids
        self.kinds: dict[str, int] = {}  # member key → _member_kind
        self.targets: dict[str, str | None] = {}  # reference → new reference (None: drop)
        # (resource type, member key, member JSON) → the member scrubbed; see resource()
        self.memo: dict[tuple[str, str, bytes], Any] = {}

    def resource(self, res: dict[str, Any], rtype: str) -> Any:
        """A resource (without its id) de-identified, or ``_GONE``.

        The resources of one patient repeat many of their members (the same category,
        class, status, code, serviceProvider... in every Encounter): each complex member
        is scrubbed once per snapshot, keyed by its JSON, which orjson writes far faster
        than a scrub walks it. Equal JSON is an equal value, so the result is the same;
        the resources returned share those members: treat them as read-only.
        """
        return self._dict(res, "", rtype, memo=True)

    def _member(self, value: Any, key: str, rtype: str) -> Any:
        try:
            mk = (rtype, key, orjson.dumps(value, option=_MEMO_JSON))
        except TypeError:  # not plain JSON data
            return self.scrub(value, key, rtype)
        done = self.memo.get(mk)
        if done is None:  # scrub() never returns None for a dict or a list
            done = self.memo[mk] = self.scrub(value, key, rtype)
        return done

    def reference(self, value: dict[str, Any]) -> Any:
        ref = value["reference"]
        if ref.startswith("#"):
            return {"reference": ref}
        new = self.targets.get(ref, _GONE)
        if new is _GONE:  # a snapshot's resources share many references: look up once
            t = _target(ref)
            new = self.targets[ref] = self.ids.get(t) if t else None
        if not new:
            return _GONE  # absolute URL or unknown target: nothing to say
        out = {"reference": new}
        if isinstance(value.get("type"), str):
            out["type"] = value["type"]
        return out

    def scrub(self, value: Any, key: str, rtype: str) -> Any:
        """``value`` (found under ``key`` in a resource of type ``rtype``) de-identified:
        a new value, or ``_GONE``. Dicts and lists left empty go too."""
        if isinstance(value, str):
            return _scrub_string(value, key)
        if isinstance(value, dict):
            return self._dict(value, key, rtype)
        if isinstance(value, list):
            return self._list(value, key, rtype)
        return value

    def _list(self, value: list[Any], key: str, rtype: str) -> Any:
        items = []
        for v in value:  # scrub(), inlined: lists of codings and references are many
            if isinstance(v, str):
                v = _scrub_string(v, key)
            elif isinstance(v, dict):
                v = self._dict(v, key, rtype)
            elif isinstance(v, list):
                v = self._list(v, key, rtype)
            if v is not _GONE:
                items.append(v)
        return items or _GONE

    def _dict(self, value: dict[str, Any], key: str, rtype: str, *, memo: bool = False) -> Any:
        if isinstance(value.get("reference"), str):
            return self.reference(value)
        if (
            len(value) <= 3
            and ("identifier" in value or "display" in value)
            and value.keys() <= _REFERENCE_ONLY_KEYS
        ):
            return _GONE  # a Reference by identifier or name only: nothing is left of it
        if key != "" and "resourceType" in value:  # contained resource
            rtype = str(value["resourceType"])
        if key == "value" or key.endswith("Quantity") or key.endswith("Age"):
            value = _age(value)
        coding = "code" in value and "system" in value
        kinds = self.kinds
        out: dict[str, Any] = {}
        for k, v in value.items():
            kind = kinds.get(k)
            if kind is None:
                kind = kinds[k] = _member_kind(k)
            if kind != _RECURSE:
                if (
                    kind == _DROP
                    or (kind == _NAME and rtype not in _KEEP_NAME_TYPES)
                    or (kind == _DISPLAY and not coding)  # Coding.display is the code's
                ):
                    continue
                if kind == _ADDRESS:
                    items = v if isinstance(v, list) else [v]
                    kept = [a for a in (_address(x) for x in items) if a is not _GONE]
                    if kept:
                        out[k] = kept if isinstance(v, list) else kept[0]
                    continue
                if kind == _META and isinstance(v, dict):
                    meta = {m: v[m] for m in ("security", "tag", "profile") if m in v}
                    if meta:
                        out[k] = meta
                    continue
            # scrub(), inlined; most strings cannot be a date or a URL (see _scrub_string)
            if isinstance(v, str):
                if (len(v) >= 7 and v[4] == "-") or ":/" in v:
                    v = _scrub_string(v, k)
            elif memo and isinstance(v, (dict, list)):
                v = self._member(v, k, rtype)
            elif isinstance(v, dict):
                v = self._dict(v, k, rtype)
            elif isinstance(v, list):
                v = self._list(v, k, rtype)
            if v is not _GONE:
                out[k] = v
        return out or _GONE


def safe_harbor(
    resources: Sequence[dict[str, Any]],
    *,
    pseudonym: str,
    ids: Mapping[str, str],
    now: datetime,
) -> list[dict[str, Any]]:
    """De-identify one snapshot's resources (Safe Harbor, 45 CFR 164.514(b)(2)).

    ``ids`` maps ``Type/id`` (and ``urn:uuid:id``) of every resource to keep to its random
    replacement ``Type/newid``; references are rewritten with it, others removed. The
    Patient's identifiers become one pseudonym identifier. See docs/snapshots.md.
    """
    keep = [r for r in resources if r.get("resourceType") not in DEID_DROP_TYPES]
    sent = {ids[_ref(r)] for r in keep if _ref(r) in ids}
    scrub = _Scrubber({k: v for k, v in ids.items() if v in sent})
    out: list[dict[str, Any]] = []
    for res in keep:
        rtype = str(res.get("resourceType"))
        new_ref = ids.get(_ref(res))
        if not new_ref:
            continue
        clean = scrub.resource({k: v for k, v in res.items() if k != "id"}, rtype)
        if clean is _GONE:
            clean = {"resourceType": rtype}
        clean["id"] = new_ref.split("/", 1)[1]
        if rtype == "Patient":
            clean.pop("birthDate", None)
            clean.pop("deceasedDateTime", None)
            birth = res.get("birthDate")
            year = int(birth[:4]) if isinstance(birth, str) and birth[:4].isdigit() else None
            if year is not None and now.year - year > 89:
                clean["extension"] = [{"url": AGE_OVER_89, "valueBoolean": True}]
            elif year is not None:
                clean["birthDate"] = str(year)
            dead = res.get("deceasedDateTime")
            if isinstance(dead, str) and dead[:4].isdigit() and not (year and now.year - year > 89):
                clean["deceasedDateTime"] = dead[:4]
            clean["identifier"] = [{"system": PSEUDONYM_SYSTEM, "value": pseudonym}]
        out.append(clean)
    return out


# -- audit ------------------------------------------------------------------------------


def _coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    c = {"system": system, "code": code}
    if display:
        c["display"] = display
    return c


def _purposes(sub: Subscriber) -> list[dict[str, Any]]:
    return [{"coding": [_coding(ACTREASON, p.rpartition("|")[2])]} for p in sub.purpose]


def _recipient(sub: Subscriber) -> dict[str, Any]:
    who: dict[str, Any] = {"display": sub.id}
    first = sub.actor[0]
    if "|" in first:
        system, _, value = first.partition("|")
        who["identifier"] = {"system": system, "value": value}
    else:
        who["reference"] = first
    return {
        "type": {"coding": [_coding(DCM, "110152", "Destination Role ID")]},
        "who": who,
        "name": sub.id,
        "altId": ",".join(sub.actor),
        "requestor": True,
        "purposeOfUse": _purposes(sub),
    }


def _patient_entity(
    twin: str, patient_id: str | None, details: list[dict[str, str]]
) -> dict[str, Any]:
    what: dict[str, Any] = {"identifier": {"system": TWIN_SYSTEM, "value": twin}}
    if patient_id:
        what["reference"] = f"Patient/{patient_id}"
    ent: dict[str, Any] = {
        "what": what,
        "type": _coding(ENTITY_TYPE, "1", "Person"),
        "role": _coding(OBJECT_ROLE, "1", "Patient"),
    }
    if details:
        ent["detail"] = details
    return ent


def _consent_entities(d: Decision) -> list[dict[str, Any]]:
    """One entity per consent considered: its result, and the provisions that decided."""
    paths: dict[str, list[str]] = {}
    for row in d.deciding:
        paths.setdefault(row["consent"], []).append(row["path"])
    out = []
    for row in d.consents:
        details = [{"type": "result", "valueString": row["result"]}]
        if row.get("reason"):
            details.append({"type": "reason", "valueString": row["reason"]})
        details += [{"type": "provision", "valueString": p} for p in paths.pop(row["consent"], [])]
        out.append(
            {
                "what": {"reference": row["consent"]},
                "type": _coding("http://hl7.org/fhir/resource-types", "Consent", "Consent"),
                "role": _coding(OBJECT_ROLE, "4", "Domain Resource"),
                "detail": details,
            }
        )
    for ref, ps in sorted(paths.items()):
        out.append(
            {
                "what": {"reference": ref},
                "type": _coding("http://hl7.org/fhir/resource-types", "Consent", "Consent"),
                "detail": [{"type": "provision", "valueString": p} for p in ps],
            }
        )
    return out


_SOURCE = {
    "site": "fhirtwin",
    "observer": {"display": "fhirtwin snapshot publisher"},
    "type": [_coding(SOURCE_TYPE, "4", "Application Server")],
}


def audit_decision(
    sub: Subscriber,
    twin: str,
    patient_id: str | None,
    d: Decision,
    *,
    now: datetime,
    level: str,
    resources: Sequence[str] = (),
    notice: str | None = None,
) -> dict[str, Any]:
    """BALP AuthZ-Consent: a consent decision (request level, or for a group of resources)."""
    details = [
        {"type": "subscriber", "valueString": sub.id},
        {"type": "scope", "valueString": sub.scope},
        {"type": "level", "valueString": level},
        {"type": "decision", "valueString": d.decision},
        {"type": "allowed", "valueString": "true" if d.allowed else "false"},
    ]
    if notice:
        details.append({"type": "withdrawal-notice", "valueString": notice})
    desc = f"{d.decision}; {'disclose' if d.allowed else 'withhold'}"
    if d.reasons:
        desc += "; " + "; ".join(d.reasons)
    entities = [_patient_entity(twin, patient_id, details), *_consent_entities(d)]
    for ref in resources:
        entities.append(
            {
                "what": {"reference": ref},
                "type": _coding(ENTITY_TYPE, "2", "System Object"),
                "role": _coding(OBJECT_ROLE, "4", "Domain Resource"),
            }
        )
    return {
        "resourceType": "AuditEvent",
        "id": str(uuid.uuid4()),
        "meta": {"profile": [f"{BALP}/IHE.BasicAudit.AuthZconsent"]},
        "type": _coding(DCM, "110113", "Security Alert"),
        "subtype": [
            _coding(
                AUTHZ_SUBTYPE, "AuthZ-Consent", "Authorization Decision using Roles and Consent"
            )
        ],
        "action": "E",
        "recorded": _iso(now),
        "outcome": "0" if d.allowed else "8",
        "outcomeDesc": desc,
        "purposeOfEvent": _purposes(sub),
        "agent": [
            _recipient(sub),
            {
                "type": {"coding": [_coding(DCM, "110150", "Application")]},
                "who": {"display": "fhirtwin consent engine"},
                "requestor": False,
            },
        ],
        "source": _SOURCE,
        "entity": entities,
    }


def audit_disclosure(
    sub: Subscriber,
    twin: str,
    patient_id: str | None,
    d: Decision,
    *,
    now: datetime,
    snapshot_id: str,
    disclosed: Sequence[tuple[str, str]],
    key: str,
) -> dict[str, Any]:
    """BALP PrivacyDisclosure (source side): DICOM 110106 Export + ISO 21089 ``disclose``.

    ``disclosed``: (twin reference, reference as sent) of every resource in the snapshot.
    """
    details = [
        {"type": "subscriber", "valueString": sub.id},
        {"type": "topic", "valueString": sub.topic},
        {"type": "key", "valueString": key},
        {"type": "deidentify", "valueString": sub.deidentify},
    ]
    entities = [_patient_entity(twin, patient_id, details)]
    entities.append(
        {
            "what": {"reference": f"Bundle/{snapshot_id}"},
            "type": _coding(ENTITY_TYPE, "2", "System Object"),
            "role": _coding(OBJECT_ROLE, "20", "Job"),
        }
    )
    for real, sent in disclosed:
        ent: dict[str, Any] = {
            "what": {"reference": real},
            "type": _coding(ENTITY_TYPE, "2", "System Object"),
            "role": _coding(OBJECT_ROLE, "4", "Domain Resource"),
        }
        if sent != real:
            ent["detail"] = [{"type": "sent-as", "valueString": sent}]
        entities.append(ent)
    entities += _consent_entities(d)
    return {
        "resourceType": "AuditEvent",
        "id": str(uuid.uuid4()),
        "meta": {"profile": [f"{BALP}/IHE.BasicAudit.PrivacyDisclosure.Source"]},
        "type": _coding(DCM, "110106", "Export"),
        "subtype": [_coding(ISO21089, "disclose", "Disclose Record Lifecycle Event")],
        "action": "R",
        "recorded": _iso(now),
        "outcome": "0",
        "purposeOfEvent": _purposes(sub),
        "agent": [
            {
                "type": {"coding": [_coding(DCM, "110153", "Source Role ID")]},
                "who": {"display": "fhirtwin"},
                "requestor": False,
            },
            _recipient(sub),
        ],
        "source": _SOURCE,
        "entity": entities,
    }


def _audit_out(event: dict[str, Any], twin: str) -> Out:
    return Out(AUDIT_TOPIC, orjson.dumps(event, option=orjson.OPT_SORT_KEYS), twin.encode())


@dataclass(frozen=True)
class BuiltSnapshot:
    """A snapshot Bundle and, for the disclosure record, what was sent under which name."""

    bundle: dict[str, Any]
    refs: list[str]  # twin references of the resources sent
    sent: list[str]  # the same resources as the subscriber sees them (pseudonymous ids)
    id: str


def build_snapshot(
    permitted: list[dict[str, Any]],
    state: Mapping[str, Any],
    *,
    deidentify: bool,
    key: str,
    new_ids: Callable[[list[str]], Mapping[str, str]],
    now: datetime,
) -> BuiltSnapshot:
    """The Bundle of the permitted resources plus derived state, with no reference to what
    was withheld; de-identified (Safe Harbor, ``new_ids`` giving each twin reference its
    random id) when asked. Pure: the publisher and bench/snapshot.py both call it."""
    if deidentify:
        permitted = [r for r in permitted if r.get("resourceType") not in DEID_DROP_TYPES]
    kept = strip_dangling(permitted)
    refs = [_ref(r) for r in kept]
    sent = refs
    if deidentify:
        rids = new_ids(refs)
        ids: dict[str, str] = {}
        for r in kept:
            new = f"{r['resourceType']}/{rids[_ref(r)]}"
            ids[_ref(r)] = new
            ids[f"urn:uuid:{r['id']}"] = new
        kept = safe_harbor(kept, pseudonym=key, ids=ids, now=now)
        sent = [ids[r] for r in refs]
    st = state_resource(state, dict(zip(refs, sent, strict=True)), deidentified=deidentify)
    snapshot_id = str(uuid.uuid4())
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": snapshot_id,
        "identifier": {"system": "urn:fhirtwin:snapshot", "value": snapshot_id},
        "type": "collection",
        "entry": [{"fullUrl": _ref(r), "resource": r} for r in kept],
    }
    if not deidentify:
        bundle["timestamp"] = _iso(now)
    if st is not None:
        bundle["entry"].append({"fullUrl": _ref(st), "resource": st})
    return BuiltSnapshot(bundle, refs, sent, snapshot_id)


# -- the publisher ----------------------------------------------------------------------


@dataclass
class _Work:
    twins: dict[str, bool] = field(default_factory=dict)  # twin → every subscriber?
    changed: dict[str, set[str]] = field(default_factory=dict)  # twin → changed types
    merged: list[str] = field(default_factory=list)
    erased: list[str] = field(default_factory=list)


class SnapshotPublisher:
    """Consumer group ``fhirtwin-snapshot`` on ``twin.events``."""

    def __init__(
        self,
        bootstrap: str,
        redis_url: str,
        *,
        group: str = SNAPSHOT_GROUP,
        clock: Any = None,
    ) -> None:
        client = connect(redis_url)
        self.bootstrap = bootstrap
        self.store = TwinStore(client)
        self.registry = Registry(client)
        self.clock = clock or (lambda: datetime.now(UTC))
        self.staged: dict[tuple[str, str], bool] = {}
        self.forget: set[str] = set()  # erased twins: drop subscriber state after the batch
        self.stream = StreamWorker(
            bootstrap,
            group,
            [bus.TWIN_EVENTS],
            self.handle,
            batch=200,
            after_batch=self._commit_access,
        )
        self._topics: set[str] = set()

    def run(self, stop: threading.Event, idle_exit: float | None = None) -> int:
        bus.ensure_topics(self.bootstrap, [AUDIT_TOPIC])
        self._ensure([s.topic for s in self._subscribers()])
        return self.stream.run(stop, idle_exit=idle_exit)

    def _subscribers(self) -> list[Subscriber]:
        """Subscribers that take snapshots (an ``api_only`` one reads through the API)."""
        return [s for s in self.registry.all() if not s.extra.get("api_only")]

    def _ensure(self, topics: Iterable[str]) -> None:
        new = [t for t in topics if t not in self._topics]
        if new:
            bus.ensure_topics(self.bootstrap, new)
            self._topics.update(new)

    def _commit_access(self) -> None:
        """After the batch's snapshots and notices are acknowledged: remember who has access."""
        if self.staged:
            self.registry.set_access((s, t, ok) for (s, t), ok in self.staged.items())
            self.staged.clear()
        for twin in self.forget:
            self.registry.forget_twin(twin)
        self.forget.clear()

    def _had_access(self, sub: str, twin: str) -> bool:
        if (sub, twin) in self.staged:
            return self.staged[(sub, twin)]
        return bool(self.registry.access(sub, [twin]).get(twin))

    # -- handling ------------------------------------------------------------------------

    def handle(self, recs: list[bus.Record]) -> list[list[Out]]:
        before = dict(self.staged)
        try:
            return self._handle(recs)
        except BaseException:  # the outputs are dropped: so is what they would have done
            self.staged = before
            raise

    def _handle(self, recs: list[bus.Record]) -> list[list[Out]]:
        work = _Work()
        outs: list[list[Out]] = [[] for _ in recs]
        for i, rec in enumerate(recs):
            try:
                ev = orjson.loads(rec.value)
                twin = ev["twin"]
                changed = [str(c) for c in ev.get("changed") or []]
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                outs[i].append(
                    dead_letter(rec, stage="snapshot", reason=f"not a twin event: {exc}")
                )
                continue
            if not isinstance(twin, str) or twin.startswith("_"):
                continue
            if ev.get("type") == "erase":
                erased = ev.get("erased") or [twin]
                work.erased += [t for t in erased if isinstance(t, str)]
                continue
            types = {c.split("/", 1)[0] for c in changed}
            # a merge or unmerge changes whose data the twin holds: every subscriber decides
            everyone = ev.get("type") in ("merge", "unmerge") or bool(
                types & {"Consent", "Patient"}
            )
            work.twins[twin] = work.twins.get(twin, False) or everyone
            work.changed.setdefault(twin, set()).update(types)
            if ev.get("type") == "merge" and isinstance(ev.get("merged"), str):
                work.merged.append(ev["merged"])
        if not recs:
            return outs
        subs = self._subscribers()
        self._ensure(s.topic for s in subs)
        now = self.clock()
        produced: list[Out] = []
        for gone in work.merged:
            for sub in subs:
                if self._had_access(sub.id, gone):
                    produced += self._notice(sub, gone, None, None, now, reason="merged")
        for gone in work.erased:  # the subscriber must delete what it holds of the patient
            work.twins.pop(gone, None)
            for sub in subs:
                if self._had_access(sub.id, gone):
                    produced += self._notice(sub, gone, None, None, now, reason="erased")
            self.forget.add(gone)
        for twin, everyone in work.twins.items():
            concerned = [s for s in subs if everyone or any(s.wants(t) for t in work.changed[twin])]
            if concerned:
                produced += self.evaluate(twin, concerned, now)
        outs[-1].extend(produced)
        return outs

    def _key(self, sub: Subscriber, twin: str) -> str:
        return self.registry.pseudonym(sub.id, twin) if sub.deidentify != "none" else twin

    def _notice(
        self,
        sub: Subscriber,
        twin: str,
        patient_id: str | None,
        d: Decision | None,
        now: datetime,
        *,
        reason: str,
    ) -> list[Out]:
        key = self._key(sub, twin)
        notice = {
            "type": "withdrawal",
            "id": str(uuid.uuid4()),
            "subscriber": sub.id,
            "patient": key,
            "at": _iso(now),
            "reason": reason,
        }
        self.staged[(sub.id, twin)] = False
        value, sealed = seal_for(sub, orjson.dumps(notice, option=orjson.OPT_SORT_KEYS))
        out = [
            Out(
                sub.topic,
                value,
                key.encode(),
                [
                    ("fhirtwin-kind", b"withdrawal"),
                    ("fhirtwin-notice", notice["id"].encode()),
                    *sealed,
                ],
            )
        ]
        if d is None:  # a merge moved the patient away, or erasure: record the notice itself
            d = Decision("NOT_APPLICABLE", False, reasons=(f"twin {reason}",))
            out.append(
                _audit_out(
                    audit_decision(
                        sub, twin, patient_id, d, now=now, level="request", notice=notice["id"]
                    ),
                    twin,
                )
            )
        return out

    def evaluate(self, twin: str, subs: Sequence[Subscriber], now: datetime) -> list[Out]:
        """Decide and publish one twin for the given subscribers; the records to produce."""
        resources = self.store.resources(twin)
        if not resources:
            return []
        consents = [r for r in resources if r.get("resourceType") == "Consent"]
        patient_id = next(
            (str(r["id"]) for r in resources if r.get("resourceType") == "Patient"), None
        )
        state: dict[str, Any] | None = None
        out: list[Out] = []
        for sub in subs:
            policy: Policy | None
            try:
                policy = prepare(consents, sub.request(), now=now, known=resources)
                req = policy.decide()
            except ConsentError as exc:  # a consent the engine cannot read: fail closed
                policy = None
                req = Decision(INDETERMINATE, False, reasons=(f"{exc.where}: {exc.message}",))
            SNAPSHOT_DECISIONS.labels(req.decision, "true" if req.allowed else "false").inc()
            if not req.allowed:
                notice: list[Out] = []
                if self._had_access(sub.id, twin):
                    notice = self._notice(sub, twin, patient_id, req, now, reason="access-ended")
                else:
                    self.staged[(sub.id, twin)] = False
                notice_id = dict(notice[0].headers)["fhirtwin-notice"].decode() if notice else None
                out.append(
                    _audit_out(
                        audit_decision(
                            sub, twin, patient_id, req, now=now, level="request", notice=notice_id
                        ),
                        twin,
                    )
                )
                out += notice
                continue
            assert policy is not None
            out.append(
                _audit_out(
                    audit_decision(sub, twin, patient_id, req, now=now, level="request"), twin
                )
            )
            wanted = [r for r in resources if sub.wants(str(r.get("resourceType")))]
            groups: dict[str, tuple[Decision, list[str]]] = {}
            permitted: list[dict[str, Any]] = []
            for r in wanted:
                d = policy.decide(r)
                if d.allowed:
                    permitted.append(r)
                gk = orjson.dumps(
                    [d.decision, d.allowed, list(d.deciding), list(d.consents)],
                    option=orjson.OPT_SORT_KEYS,
                ).decode()
                groups.setdefault(gk, (d, []))[1].append(_ref(r))
            for d, refs in groups.values():
                out.append(
                    _audit_out(
                        audit_decision(
                            sub, twin, patient_id, d, now=now, level="resource", resources=refs
                        ),
                        twin,
                    )
                )
            if state is None:
                state = self.store.state(twin)
            out += self._snapshot(sub, twin, patient_id, req, permitted, state, now)
        return out

    def _snapshot(
        self,
        sub: Subscriber,
        twin: str,
        patient_id: str | None,
        req: Decision,
        permitted: list[dict[str, Any]],
        state: Mapping[str, Any],
        now: datetime,
    ) -> list[Out]:
        deid = sub.deidentify == "safe-harbor"
        key = self.registry.pseudonym(sub.id, twin) if deid else twin
        built = build_snapshot(
            permitted,
            state,
            deidentify=deid,
            key=key,
            new_ids=lambda refs: self.registry.resource_ids(sub.id, twin, refs),
            now=now,
        )
        bundle, refs, sent, snapshot_id = built.bundle, built.refs, built.sent, built.id
        self.staged[(sub.id, twin)] = True
        disclosure = audit_disclosure(
            sub,
            twin,
            patient_id,
            req,
            now=now,
            snapshot_id=snapshot_id,
            disclosed=list(zip(refs, sent, strict=True)),
            key=key,
        )
        value, sealed = seal_for(sub, orjson.dumps(bundle, option=orjson.OPT_SORT_KEYS))
        return [
            Out(
                sub.topic,
                value,
                key.encode(),
                [
                    ("fhirtwin-kind", b"snapshot"),
                    ("fhirtwin-snapshot", snapshot_id.encode()),
                    *sealed,
                ],
            ),
            _audit_out(disclosure, twin),
        ]
