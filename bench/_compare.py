"""Pure by-meaning comparison of an expected and an actual FHIR R4 Bundle (see docs/conformance.md).

Entry point: ``compare_bundles(expected, actual) -> CompareResult``.  No I/O happens here.

Every leaf value found in the *expected* bundle for a compared path is one compared field; it
agrees when the paired actual resource holds an equal normalised value.  Leaves only present in
the actual bundle are counted as ``extra`` and never penalised.  Fields covered by a DELIBERATE
rule are reported as ``excluded`` and never counted as agreeing.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from fnmatch import fnmatchcase
from typing import Any

EXAMPLE_PREFIX = "http://example.com/v2-to-fhir-converter/"
INVENTED_PREFIX = "http://example.com/"  # RFC 2606 example domain: always a made-up URI
KEY_WEIGHT = 10

# --------------------------------------------------------------------------------------------
# Leaf values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Coding:
    """A (system, code) pair; system None means 'any system accepted'."""

    system: str | None
    code: str

    def __str__(self) -> str:
        """Render as system|code."""
        return f"{self.system}|{self.code}" if self.system else f"*|{self.code}"


@dataclass(frozen=True)
class Text:
    """Text of a CodeableConcept that carries no coding."""

    text: str

    def __str__(self) -> str:
        """Render quoted."""
        return f"text:{self.text!r}"


_DT_RE = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


@dataclass(frozen=True)
class When:
    """A parsed FHIR date/dateTime/instant."""

    raw: str
    date: tuple[int, ...]
    time: tuple[int, ...] | None
    offset: int | None

    def __str__(self) -> str:
        """Render as the original string."""
        return self.raw

    @staticmethod
    def parse(raw: str) -> When | None:
        """Parse a FHIR date/dateTime string; None when it does not look like one."""
        m = _DT_RE.match(raw)
        if not m:
            return None
        y, mo, d, hh, mi, ss, frac, tz = m.groups()
        date = tuple(int(p) for p in (y, mo, d) if p is not None)
        time: tuple[int, ...] | None = None
        if hh is not None:
            parts = [int(hh), int(mi)]
            if ss is not None:
                parts.append(int(ss))
                if frac and int(frac) != 0:
                    parts.append(int((frac + "000000")[:6]))
            time = tuple(parts)
        return When(raw, date, time, _offset_minutes(tz))


def _offset_minutes(tz: str | None) -> int | None:
    """Convert 'Z' / '+hh:mm' to minutes east of UTC."""
    if tz is None:
        return None
    if tz == "Z":
        return 0
    sign = -1 if tz[0] == "-" else 1
    return sign * (int(tz[1:3]) * 60 + int(tz[4:6]))


def _as_datetime(w: When) -> datetime:
    """Naive datetime in UTC when an offset is known, else the local wall clock."""
    assert w.time is not None
    y, mo, d = [*w.date, 1, 1][:3]
    t = list(w.time) + [0] * (4 - len(w.time))
    dt = datetime(y, mo, d, t[0], t[1], t[2], t[3])
    return dt - timedelta(minutes=w.offset) if w.offset is not None else dt


def _truncate(dt: datetime, precision: int) -> datetime:
    """Drop time parts beyond `precision` (2=minutes, 3=seconds, 4=fraction)."""
    if precision <= 2:
        return dt.replace(second=0, microsecond=0)
    if precision == 3:
        return dt.replace(microsecond=0)
    return dt


def when_matches(e: When, a: When) -> bool:
    """True when actual `a` carries the information of expected `e` (docs: 'Dates and times')."""
    if e.time is None:
        n = len(e.date)
        return len(a.date) >= n and a.date[:n] == e.date
    if a.time is None or len(a.time) < len(e.time) or len(a.date) < 3 or len(e.date) < 3:
        return False
    if (e.offset is None) != (a.offset is None):
        return False
    return _truncate(_as_datetime(a), len(e.time)) == _as_datetime(e)


Leaf = str | Decimal | bool | Coding | Text | When


def leaf_matches(e: Leaf, a: Leaf) -> bool:
    """Equality of normalised leaves (Coding with system None matches any system)."""
    if isinstance(e, Coding):
        return isinstance(a, Coding) and e.code == a.code and e.system in (None, a.system)
    if isinstance(e, When):
        return isinstance(a, When) and when_matches(e, a)
    return type(e) is type(a) and e == a


# --------------------------------------------------------------------------------------------
# DELIBERATE differences (documented one by one in docs/conformance.md)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deliberate:
    """A known, IG-backed divergence of the oracle; matching expected fields are excluded."""

    rule_id: str
    resource: str  # resource type or "*"
    path: str  # fnmatch pattern over the path inside the resource; "" = the whole resource
    reason: str
    ig_ref: str
    when: Callable[..., bool]  # predicate on the raw EXPECTED value (resource dict if path "")
    # With context=True, `when(value, ctx)` also sees ctx.resource (the expected resource),
    # ctx.element (the repeating element, e.g. the identifier, the value sits in) and
    # ctx.bundle (the expected Bundle): still only the oracle's side, never our output.
    context: bool = False
    # Source kinds the rule applies to: the D rules read the HL7 v2 IG (and the message),
    # the C rules the C-CDA document; neither fires on the other kind of source.
    kinds: tuple[str, ...] = ("hl7v2",)
    # Only for `count` (count:<Type>) rules: `short_by(ctx)` is how many resources the
    # oracle is short by construction. The rule then applies only when our count exceeds
    # the expected one by exactly that many (any other difference, or none, is compared as
    # usual): it excuses the documented shortfall and nothing else.
    short_by: Callable[[Any], int] | None = None


def _is_example_uri(value: Any) -> bool:
    """True for made-up URIs under http://example.com/ (mostly .../v2-to-fhir-converter/)."""
    return isinstance(value, str) and value.startswith(INVENTED_PREFIX)


def _has_code_system(suffix: str) -> Callable[[Any], bool]:
    """Predicate: resource.code has a coding in EXAMPLE_PREFIX + suffix."""

    def check(resource: Any) -> bool:
        codings = (resource.get("code") or {}).get("coding") or []
        return any(c.get("system") == EXAMPLE_PREFIX + suffix for c in codings)

    return check


KINDS = ("hl7v2", "ccda")


def sniff_kind(source: bytes | None) -> str:
    """'ccda' when the source looks like XML, else 'hl7v2' (also when there is no source)."""
    if not source:
        return "hl7v2"
    head = source[:64].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"\xff\xfe") or head.startswith(b"\xfe\xff"):
        return "ccda"  # UTF-16 byte order mark: only XML comes that way
    return "ccda" if head.startswith(b"<") else "hl7v2"


@dataclass(frozen=True)
class CdaSource:
    """A C-CDA input document: its XML tree (namespaces stripped; None if unreadable) and text."""

    root: Any
    text: str

    def elements(self, tag: str) -> list[Any]:
        """Every element with this local name."""
        return [] if self.root is None else list(self.root.iter(tag))


def _parse_cda(source: bytes) -> CdaSource:
    """Parse a C-CDA document with the standard library; tags lose their namespace."""
    import xml.etree.ElementTree as ET

    text = source.decode("utf-8-sig", errors="replace")
    if "<!ENTITY" in text:  # never expand entities: the rules do without the tree instead
        return CdaSource(None, text)
    try:
        root = ET.fromstring(source)
    except ET.ParseError:
        return CdaSource(None, text)
    for el in root.iter():
        if isinstance(el.tag, str) and "}" in el.tag:
            el.tag = el.tag.rsplit("}", 1)[1]
        for name in [a for a in el.attrib if "}" in a]:
            local = name.rsplit("}", 1)[1]
            if local not in el.attrib:  # xsi:type → type, unless the element has a type
                el.attrib[local] = el.attrib.pop(name)
    return CdaSource(root, text)


def _parse_source(source: bytes | None, kind: str | None = None) -> Any:
    """The input parsed for the rules, or None (no source, or unreadable).

    HL7 v2 (``kind`` 'hl7v2'): a ``fhirtwin.hl7v2.Message``. C-CDA ('ccda'): a ``CdaSource``.
    ``kind`` None is sniffed from the bytes, so XML is never fed to the HL7 v2 tokenizer.
    """
    if not source:
        return None
    kind = kind or sniff_kind(source)
    if kind == "ccda":
        return _parse_cda(source)
    if kind != "hl7v2":
        return None
    try:
        from fhirtwin.hl7v2 import parse

        return parse(source)
    except Exception:  # a message we cannot parse simply gives rules nothing to read
        return None


def _hl7(ctx: Any) -> Any:
    """The parsed HL7 v2 message of the context, or None (unknown, or not an HL7 v2 source)."""
    if getattr(ctx, "kind", "hl7v2") != "hl7v2":
        return None
    msg = getattr(ctx, "source", None)
    return msg if hasattr(msg, "segments") else None


def _cda(ctx: Any) -> CdaSource | None:
    """The parsed C-CDA document of the context, or None."""
    src = getattr(ctx, "source", None)
    return src if getattr(ctx, "kind", None) == "ccda" and isinstance(src, CdaSource) else None


def _source_has(ctx: Any, segment: str, field: int) -> bool:
    """True when some `segment` of the input message has field `field` valued."""
    msg = _hl7(ctx)
    if msg is None:
        return True  # unknown: assume valued, so the rule (which needs it empty) stays off
    return any(s.has(field) for s in msg.segments if s.name == segment)


def _event(ctx: Any) -> str:
    """MSH-9.1 of the input message ('' when unknown)."""
    msg = _hl7(ctx)
    return msg.message_code if msg is not None else ""


def _coding_is(system: str, code: str | None = None) -> Callable[[Any], bool]:
    """Predicate on a raw expected Coding: this system (and code)."""

    def check(coding: Any) -> bool:
        return (
            isinstance(coding, dict)
            and coding.get("system") == system
            and (code is None or coding.get("code") == code)
        )

    return check


def _identifier_values(bundle: Any, rtype: str) -> set[str]:
    """Every identifier value of the expected resources of one type."""
    out: set[str] = set()
    for res in bundle_resources(bundle):
        if res.get("resourceType") == rtype:
            out.update(i.get("value") for i in res.get("identifier") or [] if i.get("value"))
    return out


def _copied_from_in2(value: Any, ctx: Any) -> bool:
    """The identifier element's value sits on both Patient and Coverage (IN2 ids copied)."""
    el = ctx.element if isinstance(ctx.element, dict) else {}
    v = el.get("value")
    return (
        bool(v)
        and v in _identifier_values(ctx.bundle, "Patient")
        and v in _identifier_values(ctx.bundle, "Coverage")
    )


def _segments(ctx: Any, name: str) -> list[Any]:
    """Segments of the input message with this name ([] when the message is unknown)."""
    msg = _hl7(ctx)
    return [s for s in msg.segments if s.name == name] if msg is not None else []


def _element_typed(*codes: str) -> Callable[[Any, Any], bool]:
    """Predicate: the repeating element (an identifier) has a v2-0203 type among codes."""

    def check(value: Any, ctx: Any) -> bool:
        el = ctx.element if isinstance(ctx.element, dict) else {}
        codings = ((el.get("type") or {}).get("coding") or []) if isinstance(el, dict) else []
        return any(c.get("code") in codes for c in codings if isinstance(c, dict))

    return check


def _parent_order_only(res: Any, ctx: Any) -> bool:
    """A ServiceRequest with no code whose identifiers all come from ORC-8 / OBR-29."""
    parents: set[str] = set()
    for name, field_no in (("ORC", 8), ("OBR", 29)):
        for seg in _segments(ctx, name):
            parents.update(v for c in (1, 2) if (v := seg.value(field_no, 0, c)))
    values = [i.get("value") for i in res.get("identifier") or [] if i.get("value")]
    return not res.get("code") and bool(values) and all(v in parents for v in values)


def _strings(obj: Any) -> list[str]:
    """Every string leaf of a JSON value."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _strings(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _strings(v)]
    return []


_PATIENT_SEGMENTS = ("PID", "PD1", "NK1", "MRG", "PV1", "PV2")
_OTHER_PARTY_SEGMENTS = ("GT1", "IN1", "IN2", "IN3", "DB1")


def _from_other_parties(value: Any, ctx: Any) -> bool:
    """The element's text appears in the input only in guarantor/insurance/disability segments.

    Microsoft merges GT1/IN1/IN2/DB1 people and numbers into the Patient; the IG maps none
    of those segments to Patient. Codes and systems are ignored: only the element's own
    words (value, family, given, line, city …) decide.
    """
    msg = _hl7(ctx)
    el = ctx.element if isinstance(ctx.element, dict) else None
    if msg is None or el is None:
        return False
    words = [
        w
        for k, v in el.items()
        if k not in ("type", "system", "use", "period", "assigner")
        for w in _strings(v)
        if len(w) > 2
    ]
    if not words:
        return False
    text = {
        name: "|".join("|".join(seg.fields) for seg in msg.segments if seg.name == name)
        for name in (*_PATIENT_SEGMENTS, *_OTHER_PARTY_SEGMENTS)
    }
    patient = "|".join(text[n] for n in _PATIENT_SEGMENTS)
    others = "|".join(text[n] for n in _OTHER_PARTY_SEGMENTS)
    return all(w in others and w not in patient for w in words)


# Segments whose people are not the patient: guarantor, insured (IN1-IN3), disability
# (DB1) and the consenter of a CON (CON-24, who may be the patient's representative).
_NAME_OTHER_SEGMENTS = ("GT1", "IN1", "IN2", "IN3", "DB1", "CON")
_NAME_PATIENT_SEGMENTS = ("PID", "PD1", "NK1", "MRG")


def _xpn_keys(msg: Any, names: Sequence[str]) -> set[tuple[str, str]]:
    """(family, first given) of every XPN-shaped repetition (XPN-1.1, XPN-2) in the segments."""
    keys: set[tuple[str, str]] = set()
    for seg in msg.segments:
        if seg.name not in names:
            continue
        for n in range(1, seg.field_count() + 1):
            for rep in seg.field(n) or []:
                family = rep[0][0] if rep and rep[0] else ""
                given = rep[1][0] if len(rep) > 1 and rep[1] else ""
                if family:
                    keys.add((family, given))
    return keys


def _name_of_other_party(value: Any, ctx: Any) -> bool:
    """A Patient name whose family and first given name are those of a person named in
    GT1, IN1-IN3, DB1 or CON (e.g. IN2-7 Medicaid case name, CON-24 consenter) and of no
    name in PID, PD1, NK1 or MRG."""
    msg = _hl7(ctx)
    el = ctx.element if isinstance(ctx.element, dict) else None
    if msg is None or el is None or not isinstance(el.get("family"), str):
        return False
    given = el.get("given") or [""]
    key = (el["family"], given[0] if isinstance(given[0], str) else "")
    return key in _xpn_keys(msg, _NAME_OTHER_SEGMENTS) and key not in _xpn_keys(
        msg, _NAME_PATIENT_SEGMENTS
    )


def _codes_of(res: Any) -> set[str]:
    """The codes of a resource's code.coding."""
    return {
        str(c.get("code"))
        for c in pluck(res, "code.coding")
        if isinstance(c, dict) and c.get("code")
    }


def _parent_diagnosis_stub(res: Any, ctx: Any) -> bool:
    """A Condition with no code whose identifier is the DG1-22 (parent diagnosis) of a DG1
    and the DG1-20 (diagnosis identifier) of none."""
    if not isinstance(res, dict) or res.get("code"):
        return False
    dg1 = _segments(ctx, "DG1")
    parents = {seg.value(22, 0, 1) for seg in dg1 if seg.has(22)}
    own = {seg.value(20, 0, 1) for seg in dg1 if seg.has(20)}
    values = {str(i.get("value") or "") for i in res.get("identifier") or [] if isinstance(i, dict)}
    return bool(values) and values <= parents and not values & (own - {""})


def _death_cause_condition(res: Any, ctx: Any) -> bool:
    """A Condition whose code is PDA-1 (death cause) and no DG1-3 / PRB-3 of the message."""
    codes = _codes_of(res)
    if not codes:
        return False
    death = {seg.value(1, r, 1) for seg in _segments(ctx, "PDA") for r in range(4)} - {""}
    diagnosed = {
        seg.value(3, 0, c)
        for name in ("DG1", "PRB")
        for seg in _segments(ctx, name)
        for c in (1, 4)
    } - {""}
    return codes <= death and not codes & diagnosed


_MOTHER_CODES = frozenset({"MTH", "NMTH", "MOTHER"})


def _mother_merged(res: Any, ctx: Any) -> bool:
    """An expected RelatedPerson holding PID-21's identifier (the patient's mother) and the
    name or an identifier of an NK1 whose relationship (NK1-3) is not mother: two people
    merged into one resource."""
    if not isinstance(res, dict) or res.get("resourceType") != "RelatedPerson":
        return False
    mothers = {seg.value(21, r, 1) for seg in _segments(ctx, "PID") for r in range(4)} - {""}
    values = {str(i.get("value")) for i in res.get("identifier") or [] if isinstance(i, dict)}
    if not mothers & values:
        return False
    families = {n.get("family") for n in res.get("name") or [] if isinstance(n, dict)}
    for nk1 in _segments(ctx, "NK1"):
        if {nk1.value(3, 0, 1), nk1.value(3, 0, 4)} & _MOTHER_CODES:
            continue
        nk1_ids = {nk1.value(f, r, 1) for f in (12, 33) for r in range(4)} - {""}
        nk1_families = {nk1.value(f, r, 1) for f in (2, 30) for r in range(4)} - {""}
        if nk1_ids & values or nk1_families & families:
            return True
    return False


def _mother_code_of_merged(value: Any, ctx: Any) -> bool:
    """The MTH relationship coding of such a merged RelatedPerson (see _mother_merged)."""
    return (
        isinstance(value, dict)
        and value.get("code") in _MOTHER_CODES
        and _mother_merged(ctx.resource, ctx)
    )


def _count_with_merged_mother(n: Any, ctx: Any) -> bool:
    """count:RelatedPerson of a Bundle holding a merged RelatedPerson (see _mother_merged)."""
    return any(
        _mother_merged(r, ctx)
        for r in bundle_resources(ctx.bundle)
        if r.get("resourceType") == "RelatedPerson"
    )


def _relationship_of_other_system(value: Any, ctx: Any) -> bool:
    """A v2-0131 'C' coding translated from an NK1-3 code whose CWE-3 names a coding system
    other than HL7 table 0063 (e.g. EMC^...^ACR), when no NK1-7 (contact role) is C."""
    if not isinstance(value, dict) or value.get("system") != (
        "http://terminology.hl7.org/CodeSystem/v2-0131"
    ):
        return False
    nk1s = _segments(ctx, "NK1")
    if any(seg.value(7, r, 1) == value.get("code") for seg in nk1s for r in range(4)):
        return False
    return any(
        seg.value(3, 0, 1) == "EMC"
        and value.get("code") == "C"
        and seg.value(3, 0, 3) not in ("", "HL70063", "0063")
        for seg in nk1s
    )


def _count_with_report_for_document(n: Any, ctx: Any) -> bool:
    """count:Observation of a Bundle in which an ED/RP OBX became a DiagnosticReport with
    presentedForm (D20) instead of an Observation, while the message has such an OBX."""
    if _event(ctx) == "MDM":  # the IG's MDM map makes a DocumentReference of every OBX
        return False
    has_ed = any(seg.value(2) in ("ED", "RP") for seg in _segments(ctx, "OBX"))
    return has_ed and any(
        r.get("resourceType") == "DiagnosticReport" and r.get("presentedForm")
        for r in bundle_resources(ctx.bundle)
    )


def _merged_mothers(ctx: Any) -> int:
    """How many expected RelatedPersons are such merged persons (see _mother_merged)."""
    return sum(
        1
        for r in bundle_resources(ctx.bundle)
        if r.get("resourceType") == "RelatedPerson" and _mother_merged(r, ctx)
    )


def _report_for_document_obx(ctx: Any) -> int:
    """How many OBX of the message are ED/RP (each became a DiagnosticReport, D20/D39)."""
    return sum(1 for seg in _segments(ctx, "OBX") if seg.value(2) in ("ED", "RP"))


# RFC 5646 §2.1.1: language tags are case-insensitive. An ISO 639-1 code (two letters) sent
# in upper case is, as a BCP-47 tag, the same tag as its lower-case form.
_ISO639_1_UPPER = re.compile(r"^[A-Z]{2}$")


def _language_code_uncased(value: Any, ctx: Any) -> bool:
    """A PID-15 language coding kept as sent (an upper-case two-letter ISO 639-1 code) in an
    invented table-0296 system, where the IG translates it to BCP-47 (lower case)."""
    if not isinstance(value, dict) or not _is_example_uri(value.get("system")):
        return False
    code = str(value.get("code") or "")
    if not _ISO639_1_UPPER.match(code):
        return False
    return any(seg.value(15, r, 1) == code for seg in _segments(ctx, "PID") for r in range(4))


# US Core (STU 3-6) ombCategory value sets: the five OMB race categories, the two OMB
# ethnicity categories, and the null flavors UNK / ASKU that US Core 4+ allows there.
_OMB_RACE = frozenset({"1002-5", "2028-9", "2054-5", "2076-8", "2106-3", "UNK", "ASKU"})
_OMB_ETHNICITY = frozenset({"2135-2", "2186-5", "UNK", "ASKU"})


def _omb_category_outside(allowed: frozenset[str], field: int) -> Callable[[Any, Any], bool]:
    """Predicate: a US Core race/ethnicity ombCategory coding with no system and a code
    outside the OMB categories, which is the code of PID-`field` (10 race, 22 ethnic group)
    copied as it was sent."""

    def check(value: Any, ctx: Any) -> bool:
        if not isinstance(value, dict) or value.get("system"):
            return False
        code = str(value.get("code") or "")
        sent = {seg.value(field, r, 1) for seg in _segments(ctx, "PID") for r in range(8)}
        return code not in allowed and code in sent - {""}

    return check


def _prescription_number_typed_prn(value: Any, ctx: Any) -> bool:
    """An identifier type coded PRN in an invented code system, on an identifier whose value
    is the RXE-15 prescription number of the message."""
    if not (
        isinstance(value, dict)
        and value.get("code") == "PRN"
        and _is_example_uri(value.get("system"))
    ):
        return False
    el = ctx.element if isinstance(ctx.element, dict) else {}
    rxe15 = {seg.value(15) for seg in _segments(ctx, "RXE")} - {""}
    return el.get("value") in rxe15


_SCH_PARTICIPANTS = (
    (12, "placer contact"),
    (16, "filler contact"),
    (20, "enterer"),
)


def _sch_participants_left_out(values: Any, ctx: Any) -> bool:
    """An Appointment whose participants include none of those the IG makes from SCH-12
    (placer contact), SCH-16 (filler contact) and SCH-20 (entered by), although the
    message's SCH values at least one of them."""
    sch = _segments(ctx, "SCH")
    if not sch or not any(seg.has(n) for seg in sch for n, _ in _SCH_PARTICIPANTS):
        return False
    res = ctx.resource if isinstance(ctx.resource, dict) else {}
    words = {w for _, w in _SCH_PARTICIPANTS}
    for part in res.get("participant") or []:
        for t in part.get("type") or [] if isinstance(part, dict) else []:
            texts = [t.get("text")] + [c.get("code") for c in t.get("coding") or []]
            if any(str(x or "").lower() in words for x in texts):
                return False
    return True


_V2_TS = re.compile(r"^(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})?(?:\.\d+)?([+-]\d{4})?$")


def _v2_when(ts: str) -> When | None:
    """An HL7 v2 DTM to the minute or second (with or without its offset), parsed as a FHIR
    dateTime; None for other shapes."""
    m = _V2_TS.match(ts)
    if not m:
        return None
    y, mo, d, hh, mi, ss, tz = m.groups()
    text = f"{y}-{mo}-{d}T{hh}:{mi}:{ss or '00'}"
    if tz:
        text += f"{tz[:3]}:{tz[3:]}"
    return When.parse(text)


def _period_from_pv2(planned: int, actual: int) -> Callable[[Any, Any], bool]:
    """Predicate: an Encounter period boundary that is the same instant as PV2-`planned`
    (expected admit / discharge date) of the message and as no PV1-`actual` (admit /
    discharge date)."""

    def check(value: Any, ctx: Any) -> bool:
        exp = When.parse(str(value)) if isinstance(value, str) else None
        if exp is None:
            return False

        def sent(seg_name: str, n: int) -> list[When]:
            out = []
            for seg in _segments(ctx, seg_name):
                w = _v2_when(seg.value(n))
                if w is not None:
                    out.append(w)
            return out

        return any(when_matches(exp, w) for w in sent("PV2", planned)) and not any(
            when_matches(exp, w) for w in sent("PV1", actual)
        )

    return check


def _dose_from_rxo_minimum(value: Any, ctx: Any) -> bool:
    """A doseQuantity whose value is RXO-2 (requested give amount - minimum) of the message
    and the RXE-3 of none."""
    res = ctx.resource if isinstance(ctx.resource, dict) else {}
    values = {
        _norm_num(q.get("value"))
        for q in pluck(res, "dosageInstruction.doseAndRate.doseQuantity")
        if isinstance(q, dict)
    }
    rxo2 = {_norm_num(seg.value(2)) for seg in _segments(ctx, "RXO") if seg.value(2)}
    rxe3 = {_norm_num(seg.value(3)) for seg in _segments(ctx, "RXE") if seg.value(3)}
    return bool(values) and values <= rxo2 and not values & rxe3


def _has_prior_temporary_location(values: Any, ctx: Any) -> bool:
    """The expected Encounter lists a completed temporary location (PV1-43)."""
    res = ctx.resource if isinstance(ctx.resource, dict) else {}
    for loc in res.get("location") or []:
        exts = loc.get("extension") or []
        temporary = any(str(e.get("url", "")).endswith("/temporary-location") for e in exts)
        if temporary and loc.get("status") == "completed":
            return True
    return False


# ---- C-CDA (rules C1-C14) -----------------------------------------------------------------

V3_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
_OID_ARC = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
# Code systems written as urn:oid:<OID> although FHIR R4 (terminologies-systems.html) or HL7
# Terminology (the CodeSystem's identifier) names a canonical URI for that OID.
OID_CODE_SYSTEMS: dict[str, str] = {
    "urn:oid:2.16.840.1.113883.6.1": "http://loinc.org",
    "urn:oid:2.16.840.1.113883.6.96": "http://snomed.info/sct",
    "urn:oid:2.16.840.1.113883.6.88": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "urn:oid:2.16.840.1.113883.6.12": "http://www.ama-assn.org/go/cpt",
    "urn:oid:2.16.840.1.113883.6.90": "http://hl7.org/fhir/sid/icd-10-cm",
    "urn:oid:2.16.840.1.113883.6.103": "http://hl7.org/fhir/sid/icd-9-cm",
    "urn:oid:2.16.840.1.113883.6.101": "http://nucc.org/provider-taxonomy",
    "urn:oid:2.16.840.1.113883.6.259": (
        "https://www.cdc.gov/nhsn/cdaportal/terminology/codesystem/hsloc.html"
    ),
    "urn:oid:2.16.840.1.113883.4.9": "http://fdasis.nlm.nih.gov",
    "urn:oid:2.16.840.1.113883.12.292": "http://hl7.org/fhir/sid/cvx",
    "urn:oid:2.16.840.1.113883.12.112": "http://terminology.hl7.org/CodeSystem/v2-0112",
    "urn:oid:2.16.840.1.113883.5.1": "http://terminology.hl7.org/CodeSystem/v3-AdministrativeGender",
    "urn:oid:2.16.840.1.113883.5.2": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
    "urn:oid:2.16.840.1.113883.5.4": V3_ACT_CODE,
    "urn:oid:2.16.840.1.113883.5.8": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
    "urn:oid:2.16.840.1.113883.5.25": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
    "urn:oid:2.16.840.1.113883.5.83": (
        "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
    ),
    "urn:oid:2.16.840.1.113883.5.110": "http://terminology.hl7.org/CodeSystem/v3-RoleClass",
    "urn:oid:2.16.840.1.113883.5.111": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
    "urn:oid:2.16.840.1.113883.5.1008": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor",
}
_ACT_TAGS = ("act", "encounter", "observation", "procedure", "substanceAdministration", "supply")


def _cda_date_digits(w: When) -> str:
    """The date of a parsed FHIR date as CDA TS digits (YYYY, YYYYMM or YYYYMMDD)."""
    return "".join(f"{p:04d}" if i == 0 else f"{p:02d}" for i, p in enumerate(w.date))


def _date_not_in_document(value: Any, ctx: Any) -> bool:
    """A full date of which neither the day nor the day before or after is in the document."""
    doc = _cda(ctx)
    w = When.parse(value) if isinstance(value, str) else None
    if doc is None or w is None or len(w.date) < 3:
        return False
    try:
        day = datetime(*w.date[:3])
    except ValueError:  # e.g. month 13: not a date the rule can reason about
        return False
    return not any((day + timedelta(days=d)).strftime("%Y%m%d") in doc.text for d in (-1, 0, 1))


def _is_gzip(data: Any) -> bool:
    """True when `data` is base64 of gzip-compressed bytes (magic 1f 8b)."""
    if not isinstance(data, str):
        return False
    try:
        return base64.b64decode(data[:64] + "=" * (-len(data[:64]) % 4))[:2] == b"\x1f\x8b"
    except (binascii.Error, ValueError):
        return False


def _plain_text_over_gzip(value: Any, ctx: Any) -> bool:
    """contentType text/plain on an attachment whose data is gzip."""
    return value == "text/plain" and any(
        isinstance(att, dict) and att.get("contentType") == value and _is_gzip(att.get("data"))
        for att in pluck(ctx.resource, "content.attachment")
    )


def _document_id_root(value: Any, ctx: Any) -> bool:
    """The value is the root of ClinicalDocument/id although that id has an extension."""
    doc = _cda(ctx)
    el = doc.root.find("id") if doc is not None and doc.root is not None else None
    return el is not None and bool(el.get("extension")) and value == el.get("root")


def _uuid_urn_over_oid(value: Any) -> bool:
    """'urn:uuid:' followed by an OID (RFC 4122 UUIDs are 8-4-4-4-12 hex digits)."""
    return (
        isinstance(value, str)
        and value.startswith("urn:uuid:")
        and bool(_OID_ARC.match(value[len("urn:uuid:") :]))
    )


def _oid_with_canonical_uri(value: Any) -> bool:
    """A code system written urn:oid:<OID> for which FHIR names a canonical URI."""
    return isinstance(value, str) and value in OID_CODE_SYSTEMS


def _class_not_act_code(coding: Any) -> bool:
    """An Encounter.class coding from a system other than v3 ActCode (e.g. CPT)."""
    system = coding.get("system") if isinstance(coding, dict) else None
    return bool(system) and system not in (V3_ACT_CODE, "urn:oid:2.16.840.1.113883.5.4")


def _id_matches(el_id: Any, ident: Any) -> bool:
    """A CDA <id> element and a FHIR Identifier name the same thing."""
    if not isinstance(ident, dict):
        return False
    root, ext = el_id.get("root"), el_id.get("extension")
    value, system = ident.get("value"), ident.get("system")
    if not root or not value:
        return False
    if ext:
        return value == ext and (system is None or str(system).endswith(root))
    return value in (root, f"urn:uuid:{root}", f"urn:oid:{root}")


def source_acts(doc: CdaSource | None, res: Any) -> list[Any]:
    """The entries of the document an expected resource was made from.

    Matched by <id> (any identifier), then narrowed by the resource's codes and date, since
    sample documents reuse one id for several entries. [] when nothing is certain.
    """
    if doc is None or doc.root is None or not isinstance(res, dict):
        return []
    idents = res.get("identifier") or []
    acts = [
        el
        for tag in _ACT_TAGS
        for el in doc.elements(tag)
        if any(_id_matches(i, ident) for i in el.findall("id") for ident in idents)
    ]
    codes = {
        c.get("code")
        for path in ("code.coding", "vaccineCode.coding")
        for c in pluck(res, path)
        if isinstance(c, dict) and c.get("code")
    }
    if codes:
        acts = [a for a in acts if any(d.get("code") in codes for d in a.iter())]
    dates = [
        w
        for path in ("occurrenceDateTime", "performedDateTime", "performedPeriod.start")
        for raw in pluck(res, path)
        if isinstance(raw, str) and (w := When.parse(raw)) is not None
    ]
    if dates:
        digits = [_cda_date_digits(w) for w in dates]
        acts = [
            a
            for a in acts
            if any(
                str(t.get("value", "")).startswith(d)
                for t in a.iter()
                if t.tag in ("effectiveTime", "low")
                for d in digits
            )
        ]
    return acts


# Resources whose R4 status has a value for an act that did not happen.
NEGATED_STATUS = {
    "Immunization": "not-done",
    "Procedure": "not-done",
    "MedicationAdministration": "not-done",
    "MedicationStatement": "not-taken",
}


def _negated_in_document(value: Any, ctx: Any) -> bool:
    """status 'completed' for a resource whose source entries all carry negationInd='true'."""
    rtype = (ctx.resource or {}).get("resourceType") if isinstance(ctx.resource, dict) else None
    if value != "completed" or rtype not in NEGATED_STATUS:
        return False
    acts = source_acts(_cda(ctx), ctx.resource)
    return bool(acts) and all(a.get("negationInd") == "true" for a in acts)


def _reaction_without_manifestation(value: Any, ctx: Any) -> bool:
    """A reaction.severity in a reaction that has no manifestation (R4: 1..*)."""
    el = getattr(ctx, "element", None)
    return isinstance(el, dict) and not el.get("manifestation")


def _source_elements_with_id(doc: CdaSource | None, res: Any) -> list[Any]:
    """Every element of the document whose <id> names one of the resource's identifiers."""
    if doc is None or doc.root is None or not isinstance(res, dict):
        return []
    idents = res.get("identifier") or []
    if not idents:
        return []
    return [
        parent
        for parent in doc.root.iter()
        for el_id in parent.findall("id")
        if any(_id_matches(el_id, ident) for ident in idents)
    ]


def _medication_of_wrong_mood(res: Any, ctx: Any) -> bool:
    """A MedicationRequest made from a Medication Dispense (supply, moodCode EVN), or a
    MedicationStatement / MedicationAdministration made from an intended medication
    (substanceAdministration, moodCode INT): every source entry with its id says so."""
    rtype = res.get("resourceType") if isinstance(res, dict) else None
    acts = [a for a in _source_elements_with_id(_cda(ctx), res) if a.tag in _ACT_TAGS]
    if not acts:
        return False
    if rtype == "MedicationRequest":
        return all(a.tag == "supply" and a.get("moodCode") == "EVN" for a in acts)
    if rtype in ("MedicationStatement", "MedicationAdministration"):
        return all(a.tag == "substanceAdministration" and a.get("moodCode") == "INT" for a in acts)
    return False


def _device_from_organizer(res: Any, ctx: Any) -> bool:
    """A Device whose identifiers are the id of an organizer (Medical Equipment Organizer)."""
    if not isinstance(res, dict) or res.get("resourceType") != "Device":
        return False
    found = _source_elements_with_id(_cda(ctx), res)
    return bool(found) and all(e.tag == "organizer" for e in found)


def _supply_id_as_device_id(value: Any, ctx: Any) -> bool:
    """A Device identifier that is the id of a supply act, and of no device (participantRole)."""
    doc = _cda(ctx)
    ident = getattr(ctx, "element", None)
    if doc is None or doc.root is None or not isinstance(ident, dict):
        return False
    named = [p for p in doc.root.iter() for i in p.findall("id") if _id_matches(i, ident)]
    return bool(named) and all(p.tag == "supply" for p in named)


# Codings written outside the element's R4 binding although the bound value set holds the
# concept: (resource, path) -> (canonical system of the binding, source codes it has).
_OUTSIDE_BINDING: dict[tuple[str, str], tuple[str, frozenset[str]]] = {
    ("Condition", "clinicalStatus"): (
        "http://terminology.hl7.org/CodeSystem/condition-clinical",
        frozenset(),  # required binding: any other system is outside it
    ),
    ("FamilyMemberHistory", "sex"): (
        "http://hl7.org/fhir/administrative-gender",
        frozenset({"M", "F", "UN"}),
    ),
    ("Coverage", "relationship"): (
        "http://terminology.hl7.org/CodeSystem/subscriber-relationship",
        frozenset({"SELF"}),
    ),
}


def _outside_binding(coding: Any, ctx: Any) -> bool:
    """A coding of Condition.clinicalStatus, FamilyMemberHistory.sex or Coverage.relationship
    from another system than the one R4 binds the element to (see _OUTSIDE_BINDING)."""
    if not isinstance(coding, dict):
        return False
    for (rtype, _path), (system, codes) in _OUTSIDE_BINDING.items():
        if ctx.rtype != rtype:
            continue
        if coding.get("system") == system:
            return False
        return not codes or coding.get("code") in codes
    return False


CCDA = ("ccda",)
CCDA_RULES: tuple[Deliberate, ...] = (
    Deliberate(
        "C1",
        "DocumentReference",
        "date",
        "DocumentReference.date is the moment Microsoft's test run wrote the resource (R4: "
        "'when the document reference was created'); no date of the document is used, so no "
        "other run or converter can reproduce it.",
        "FHIR R4 DocumentReference.date; the C-CDA's own dates are ClinicalDocument/"
        "effectiveTime (mapped to Composition.date)",
        _date_not_in_document,
        context=True,
        kinds=CCDA,
    ),
    Deliberate(
        "C2",
        "DocumentReference",
        "content.attachment.contentType",
        "contentType 'text/plain' on an attachment whose data is gzip-compressed (bytes "
        "1f 8b); R4 Attachment.contentType is the mime type of the data itself.",
        "FHIR R4 Attachment.contentType ('Identifies the type of the data in the attachment')",
        _plain_text_over_gzip,
        context=True,
        kinds=CCDA,
    ),
    Deliberate(
        "C3",
        "Composition",
        "identifier.value",
        "Composition.identifier.value is the root of ClinicalDocument/id and drops its "
        "extension, so different documents (TT988, TT662) share one identifier; an II with an "
        "extension maps to system urn:oid:<root>, value <extension>.",
        "FHIR R4 Identifier mappings (value = II.extension, or II.root if system indicates "
        "OID or GUID); C-CDA on FHIR CF-header: ClinicalDocument/id -> Composition.identifier",
        _document_id_root,
        context=True,
        kinds=CCDA,
    ),
    Deliberate(
        "C4",
        "*",
        "*identifier.value",
        "An identifier value 'urn:uuid:' + an OID (a root-only <id> whose root is an OID); an "
        "OID is not a UUID (RFC 4122), its URN form is urn:oid:<OID>.",
        "HL7 Terminology NamingSystem 'uri' ('For OIDs and UUIDs, use the URN form "
        "(urn:oid: and urn:uuid:)'); RFC 3001, RFC 4122",
        _uuid_urn_over_oid,
        kinds=CCDA,
    ),
    Deliberate(
        "C5",
        "*",
        "*.system",
        "A code system written urn:oid:<OID> where FHIR names a canonical URI for it "
        "(v3 RoleCode, ActCode, CVX, ICD-9-CM, HSLOC …); R4 says that URI SHALL be used. The "
        "code is still compared (any system accepted).",
        "FHIR R4 terminologies-systems.html ('If a URI is defined here, it SHALL be used in "
        "preference to any other identifying mechanisms'); HL7 Terminology CodeSystem "
        "identifiers",
        _oid_with_canonical_uri,
        kinds=CCDA,
    ),
    Deliberate(
        "C6",
        "Encounter",
        "class",
        "Encounter.class holding the encounter's CPT visit code (99213 …); C-CDA on FHIR "
        "maps only the v3 ActCode code or translation of encounter/code to class (R4 binds "
        "class to ActEncounterCode), a CPT code is the encounter's type.",
        "C-CDA on FHIR CF-encounters (/code -> .class: 'Only the V3 ActCode system'); "
        "FHIR R4 Encounter.class binding v3-ActEncounterCode",
        _class_not_act_code,
        kinds=CCDA,
    ),
    Deliberate(
        "C7",
        "*",
        "status",
        "status 'completed' of an Immunization, Procedure, MedicationAdministration or "
        "MedicationStatement whose entry the document negates (negationInd='true': not "
        "given / not done); R4 has not-done / not-taken, and C-CDA on FHIR maps it so.",
        "C-CDA on FHIR ConceptMap CF-ImmunizationStatus ('Only map to not-done when CDA "
        "negation is present and true'); CDA R2 Procedure.negationInd",
        _negated_in_document,
        context=True,
        kinds=CCDA,
    ),
    Deliberate(
        "C8",
        "AllergyIntolerance",
        "reaction.severity",
        "A reaction made of the allergy-level Severity Observation alone: it has a severity "
        "but no manifestation, and R4 AllergyIntolerance.reaction.manifestation is 1..*.",
        "FHIR R4 AllergyIntolerance.reaction.manifestation (1..*); C-CDA R2.1 Severity "
        "Observation (4.8) on the allergy characterises the allergy, not a reaction",
        _reaction_without_manifestation,
        context=True,
        kinds=CCDA,
    ),
    Deliberate(
        "C9",
        "*",
        "",
        "A medication resource of the wrong kind for its entry's mood: a MedicationRequest "
        "made from a Medication Dispense (supply moodCode EVN, 4.18), or a MedicationStatement"
        " / MedicationAdministration made from an intended medication (moodCode INT).",
        "C-CDA on FHIR ConceptMap CF-MedActivityMood (INT -> MedicationRequest.intent); FHIR "
        "R4 MedicationDispense ('the supply ... has been dispensed'), MedicationAdministration"
        " ('the event of a patient consuming')",
        _medication_of_wrong_mood,
        context=True,
        kinds=CCDA,
    ),
    Deliberate(
        "C10",
        "Device",
        "",
        "A Device made from the Medical Equipment Organizer (4.135), a grouping act whose "
        "code ('Implant') is a category of the devices inside it, not a device.",
        "C-CDA R2.1 Medical Equipment Organizer (4.135) and Product Instance (4.37): the "
        "device is the Product Instance's participantRole",
        _device_from_organizer,
        context=True,
        kinds=CCDA,
    ),
    Deliberate(
        "C11",
        "Device",
        "identifier.value",
        "Device.identifier is the id of the Non-Medicinal Supply Activity (4.50), the act of "
        "supplying it, instead of the Product Instance's own id (4.37 participantRole/id).",
        "C-CDA R2.1 Product Instance (4.37) participantRole/id; FHIR R4 Device.identifier "
        "('instance identifiers assigned to a device')",
        _supply_id_as_device_id,
        context=True,
        kinds=CCDA,
    ),
    *(
        Deliberate(
            rule_id,
            rtype,
            path,
            f"{rtype}.{path} coded {what}, outside the element's R4 binding although the bound "
            "value set holds the concept.",
            ref,
            _outside_binding,
            context=True,
            kinds=CCDA,
        )
        for rule_id, rtype, path, what, ref in (
            (
                "C12",
                "Condition",
                "clinicalStatus",
                "as a SNOMED CT concept",
                "FHIR R4 Condition.clinicalStatus (required binding: condition-clinical)",
            ),
            (
                "C13",
                "FamilyMemberHistory",
                "sex",
                "as the v3 code M/F/UN",
                "FHIR R4 FamilyMemberHistory.sex (extensible binding: AdministrativeGender)",
            ),
            (
                "C14",
                "Coverage",
                "relationship",
                "as the v3 RoleCode SELF",
                "FHIR R4 Coverage.relationship (extensible binding: SubscriberRelationshipCodes)",
            ),
        )
    ),
)


DELIBERATE: tuple[Deliberate, ...] = (
    Deliberate(
        "D1",
        "*",
        "*identifier.system",
        "Identifier.system invented under http://example.com/ "
        "(.../v2-to-fhir-converter/Identifier/<AA>, .../sid/...); the IG maps "
        "CX.4 to assigner(Organization), or to system only for registered authorities, and "
        "ISO OIDs to urn:oid:. Value and type are still compared.",
        "datatypes/HL7 Data Type - FHIR R4_ CX[Identifier] - Sheet1.csv rows CX.4 (lines 9-10); "
        "datatypes/HL7 Data Type - FHIR R4_ HD[uri] - Sheet1.csv rows HD.1/HD.2 (lines 4-7)",
        _is_example_uri,
    ),
    Deliberate(
        "D2",
        "*",
        "*.system",
        "Coding.system invented under http://example.com/ for local / unknown coding systems "
        "(.../v2-to-fhir-converter/CodeSystem/<CWE.3>, .../CodeSystem/additional-identifier); "
        "the IG says the system "
        "URI comes from the vocabulary table, it is not built from CWE.3. The code is still "
        "compared (it must be equal, any system accepted).",
        "datatypes/HL7 Data Type - FHIR R4_ CWE[CodeableConcept] - Sheet1.csv rows CWE.3 and "
        "CWE.6 (lines 6 and 9)",
        _is_example_uri,
    ),
    Deliberate(
        "D3",
        "ServiceRequest",
        "intent",
        "ServiceRequest.intent = 'filler-order' (ORU without ORC, SIU); the IG always assigns "
        "'order' (or 'reflex-order' for OBR-11 = G).",
        "segments/HL7 Segment - FHIR R4_ OBR[ServiceRequest] - OBR.csv lines 4 and 20-22; "
        "segments/HL7 Segment - FHIR R4_ SCH[ServiceRequest] - Sheet1.csv line 10 (SCH-6)",
        lambda v: v == "filler-order",
    ),
    Deliberate(
        "D4",
        "Observation",
        "",
        "Observation synthesised from PDA/ACC with an invented code "
        "(.../CodeSystem/observation-code: death-certificate, autopsy, coroner, "
        "injury-incident); the IG message maps leave ACC and PDA unmapped.",
        "messages/HL7 Message - FHIR R4_ ADT_A01 - Sheet1.csv lines 78 (ACC) and 81 (PDA); "
        "same rows in ADT_A02 line 43, ADT_A05 line 77, ADT_A06 line 71",
        _has_code_system("CodeSystem/observation-code"),
    ),
    Deliberate(
        "D5",
        "Procedure",
        "",
        "Procedure synthesised from PDA with an invented code "
        "(.../CodeSystem/procedure-code: death-certification, autopsy-performed); the IG "
        "message maps leave PDA unmapped.",
        "messages/HL7 Message - FHIR R4_ ADT_A01 - Sheet1.csv line 81 (PDA); ADT_A02 line 43",
        _has_code_system("CodeSystem/procedure-code"),
    ),
    Deliberate(
        "D6",
        "Patient",
        "identifier.type",
        "PID-19 (SSN) typed SB; the IG types it SS in the US (SB only outside it), and the "
        "system us-ssn says this is the US.",
        "segments/HL7 Segment - FHIR R4_ PID[Patient] - PID.csv lines 32-33 (PID-19)",
        _coding_is("http://terminology.hl7.org/CodeSystem/v2-0203", "SB"),
    ),
    Deliberate(
        "D7",
        "Encounter",
        "status",
        "Encounter.status 'in-progress' for a pre-admission (class PRENC, PV1-2 = P); the IG's "
        "PatientClass → EncounterStatus map gives P → planned, and only the ADT_A11 message "
        "map takes the status from the event.",
        "codesystems/HL7 Concept Map_ PatientClass[EncounterStatus] - Sheet1.csv row P; "
        "segments/HL7 Segment - FHIR R4_ PV1[Encounter] - PV1.csv line 6",
        lambda v, ctx: (
            v == "in-progress" and ((ctx.resource or {}).get("class") or {}).get("code") == "PRENC"
        ),
        context=True,
    ),
    Deliberate(
        "D8",
        "AllergyIntolerance",
        "reaction.onset",
        "AL1-6 (identification date) put in reaction.onset; the IG maps it to "
        "AllergyIntolerance.onsetDateTime, which the oracle leaves empty.",
        "segments/HL7 Segment - FHIR R4_ AL1[AllergyIntolerance] - AL1.csv line 29 (AL1-6)",
        lambda v, ctx: not any(k.startswith("onset") for k in (ctx.resource or {})),
        context=True,
    ),
    Deliberate(
        "D9",
        "*",
        "*.system",
        "http://terminology.hl7.org/CodeSystem/icd-o is not an HL7 terminology system; the "
        "IG takes the system from the vocabulary table (ICD-O-3 is .../icd-o-3). The code is "
        "still compared.",
        "datatypes/HL7 Data Type - FHIR R4_ CWE[CodeableConcept] - Sheet1.csv line 6 (CWE.3)",
        lambda v: v == "http://terminology.hl7.org/CodeSystem/icd-o",
    ),
    Deliberate(
        "D10",
        "Coverage",
        "identifier.type",
        "Coverage identifier typed PLN in an invented system for IN1-36; the IG gives IN1-36 "
        "no target and table 0203 has no policy-number code.",
        "segments/HL7 Segment - FHIR R4_ IN1[Coverage] - Sheet1.csv line 42 (IN1-36)",
        _coding_is("http://example.com/CodeSystem/additional-identifier", "PLN"),
    ),
    Deliberate(
        "D11",
        "Patient",
        "identifier.*",
        "Identifiers from IN2 (Medicare/Medicaid numbers) copied onto the Patient and the "
        "Coverage alike; the IG message maps leave IN2 unmapped.",
        "messages/HL7 Message - FHIR R4_ ADT_A01 - Sheet1.csv line 65 (IN2)",
        _copied_from_in2,
        context=True,
    ),
    Deliberate(
        "D12",
        "Coverage",
        "identifier.*",
        "The same IN2 identifiers seen from the Coverage side (also on Patient.identifier); "
        "the IG maps Coverage.identifier from IN1-2 only.",
        "messages/HL7 Message - FHIR R4_ ADT_A01 - Sheet1.csv line 65 (IN2); "
        "segments/HL7 Segment - FHIR R4_ IN1[Coverage] - Sheet1.csv (IN1-2)",
        _copied_from_in2,
        context=True,
    ),
    Deliberate(
        "D13",
        "Procedure",
        "",
        "Procedure stub with an identifier and no code (PR1-25 parent procedure); the IG "
        "maps PR1-25 to partOf, and a stub with the parent's id would overwrite the parent.",
        "segments/HL7 Segment - FHIR R4_ PR1[Procedure] - PR1[Procedure].csv line 36",
        lambda r: bool(r.get("identifier")) and not r.get("code"),
    ),
    Deliberate(
        "D14",
        "Procedure",
        "",
        "Procedure made from FT1-25 (a charge's procedure code: no identifier, no "
        "performed[x]); no IG segment or message map covers FT1.",
        "v2-to-FHIR Map Inventory - Segment.csv (FT1: no map)",
        lambda r: (
            bool(r.get("code"))
            and not r.get("identifier")
            and not any(k.startswith("performed") for k in r)
        ),
    ),
    Deliberate(
        "D15",
        "ServiceRequest",
        "",
        "ServiceRequest made from RF1 in an ADT message; the IG's ADT message maps leave RF1 "
        "unmapped.",
        "messages/HL7 Message - FHIR R4_ ADT_A01 - Sheet1.csv line 74 (RF1)",
        lambda r, ctx: _event(ctx) in ("ADT", "BAR", "DFT") and bool(_segments(ctx, "RF1")),
        context=True,
    ),
    Deliberate(
        "D16",
        "ServiceRequest",
        "",
        "ServiceRequest in SIU when SCH-26 and SCH-27 are empty; the IG creates it only "
        "'IF SCH-26 or SCH-27 VALUED'.",
        "messages/HL7 Message - FHIR R4_ SIU_S12 - Sheet1.csv lines 8 and 29",
        lambda r, ctx: (
            _event(ctx) == "SIU"
            and not _source_has(ctx, "SCH", 26)
            and not _source_has(ctx, "SCH", 27)
        ),
        context=True,
    ),
    Deliberate(
        "D17",
        "ServiceRequest",
        "",
        "ServiceRequest from ORC in VXU; the IG makes it 'only if the system wants to know "
        "about the order', and ORC-2/3/12 are already on the Immunization.",
        "messages/HL7 Message - FHIR R4_ VXU_V04 - Sheet1.csv line 43 (ORC)",
        lambda r, ctx: _event(ctx) == "VXU",
        context=True,
    ),
    Deliberate(
        "D18",
        "Appointment",
        "appointmentType",
        "SCH-7 coded from table 0276 put in appointmentType; the IG maps SCH-7 with 0276 to "
        "reasonCode (appointmentType takes 0277).",
        "segments/HL7 Segment - FHIR R4_ SCH[Appointment] - Sheet1.csv lines 10-11 (SCH-7)",
        _coding_is("http://terminology.hl7.org/CodeSystem/v2-0276"),
    ),
    Deliberate(
        "D19",
        "MedicationDispense",
        "",
        "MedicationDispense made from FT1 (a charge line: medicationCodeableConcept from "
        "FT1-29); FT1 is in no IG map, and a charge is not a dispense.",
        "v2-to-FHIR Map Inventory - Segment.csv (FT1: no map)",
        lambda r, ctx: (
            "medicationCodeableConcept" in r and _hl7(ctx) is not None and not _segments(ctx, "RXD")
        ),
        context=True,
    ),
    Deliberate(
        "D20",
        "DiagnosticReport",
        "",
        "DiagnosticReport made for an ED/RP OBX (presentedForm); the IG maps every OBX of an "
        "order group to an Observation, and leaves ORDER_DOCUMENT to FHIR R5.",
        "messages/HL7 Message - FHIR R4_ ORU_R01 - Sheet1.csv lines 47-51, 67, 71",
        lambda r: bool(r.get("presentedForm")),
    ),
    Deliberate(
        "D21",
        "Specimen",
        "identifier.*",
        "OBR-2/OBR-3 placer/filler order numbers put on the Specimen as PLAC/FILL "
        "identifiers; the IG maps OBR-2 to accessionIdentifier only when it is also the "
        "accession number, and OBR-3 to nothing on the Specimen.",
        "segments/HL7 Segment - FHIR R4_ OBR[Specimen] - Sheet1.csv lines 5-6",
        _element_typed("PLAC", "FILL"),
        context=True,
    ),
    Deliberate(
        "D22",
        "DocumentReference",
        "docStatus",
        "docStatus 'preliminary' for TXA-17 = AU; table 0271 AU is 'authenticated', a "
        "signed, complete document: final.",
        "segments/HL7 Segment - FHIR R4_ TXA[DocumentReference] - Sheet1.csv line 23 (TXA-17)",
        lambda v, ctx: (
            v == "preliminary" and any(s.value(17) == "AU" for s in _segments(ctx, "TXA"))
        ),
        context=True,
    ),
    Deliberate(
        "D23",
        "ServiceRequest",
        "identifier.*",
        "ORC-4 placer group number as a PGN identifier; the IG maps ORC-4 to "
        "ServiceRequest.requisition.",
        "segments/HL7 Segment - FHIR R4_ ORC[ServiceRequest] - ORC.csv lines 16-21 (ORC-4)",
        _element_typed("PGN"),
        context=True,
    ),
    Deliberate(
        "D24",
        "ServiceRequest",
        "",
        "ServiceRequest made for the parent order named in ORC-8 / OBR-29; the IG gives "
        "those only as basedOn.identifier.",
        "segments/HL7 Segment - FHIR R4_ ORC[ServiceRequest] - ORC.csv line 28 (ORC-8); "
        "segments/HL7 Segment - FHIR R4_ OBR[ServiceRequest] - OBR.csv lines 43-47 (OBR-29)",
        _parent_order_only,
        context=True,
    ),
    Deliberate(
        "D25",
        "ServiceRequest",
        "",
        "ServiceRequest in an ORU with no ORC; the IG's ORU map makes it 'IF ORC VALUED'.",
        "messages/HL7 Message - FHIR R4_ ORU_R01 - Sheet1.csv line 55",
        lambda r, ctx: _event(ctx) == "ORU" and not _segments(ctx, "ORC"),
        context=True,
    ),
    Deliberate(
        "D26",
        "Specimen",
        "",
        "Specimen made from OBR in MDM; the IG's MDM map makes only a ServiceRequest of OBR.",
        "messages/HL7 Message - FHIR R4_ MDM_T02 - Sheet1.csv line 26",
        lambda r, ctx: _event(ctx) == "MDM",
        context=True,
    ),
    Deliberate(
        "D27",
        "DiagnosticReport",
        "",
        "DiagnosticReport in an order or document message (MDM, OML, ORM, OMG); the IG's "
        "ORM/OML/MDM maps make none (OMG has no map; OML is the closest).",
        "messages/HL7 Message - FHIR R4_ ORM_O01 - Sheet1.csv line 35; ..._OML_O21 - "
        "Sheet1.csv lines 49-50; ..._MDM_T02 - Sheet1.csv line 26",
        lambda r, ctx: _event(ctx) in ("MDM", "OML", "ORM", "OMG"),
        context=True,
    ),
    Deliberate(
        "D28",
        "DocumentReference",
        "",
        "DocumentReference from TXA in ORU/OUL; the IG's ORU map leaves ORDER_DOCUMENT "
        "unmapped ('will be addressed with FHIR R5'); OUL has no map.",
        "messages/HL7 Message - FHIR R4_ ORU_R01 - Sheet1.csv lines 47-51",
        lambda r, ctx: _event(ctx) in ("ORU", "OUL"),
        context=True,
    ),
    Deliberate(
        "D29",
        "*",
        "*identifier.value",
        "An identifier value holding '&': the oracle left an EI/EIP sub-component unparsed; "
        "the IG takes the entity identifier from the first sub-component.",
        "datatypes/HL7 Data Type - FHIR R4_ EIP[Identifier-PlacerAssignedIdentifier] - "
        "Sheet1.csv line 4",
        lambda v: isinstance(v, str) and "&" in v,
    ),
    Deliberate(
        "D30",
        "Specimen",
        "type",
        "A SNOMED CT code (all digits) labelled with table 0487's system; SPM-4 says SCT, "
        "and the IG takes the system from CWE-3.",
        "segments/HL7 Segment - FHIR R4_ SPM[Specimen] - SPM.csv line 9; CWE[CodeableConcept] "
        "line 6",
        lambda v: (
            isinstance(v, dict)
            and v.get("system") == "http://terminology.hl7.org/CodeSystem/v2-0487"
            and str(v.get("code", "")).isdigit()
        ),
    ),
    Deliberate(
        "D31",
        "Patient",
        "*",
        "A Patient identifier, name, address or telecom whose words appear in the message only "
        "in GT1, IN1, IN2, IN3 or DB1 (guarantor, insured, disability), not in PID/PD1/NK1; "
        "the IG maps none of those segments to the Patient.",
        "messages/HL7 Message - FHIR R4_ ADT_A01 - Sheet1.csv lines 44 (DB1), 62 (GT1), "
        "64-66 (IN1-IN3: Coverage only)",
        _from_other_parties,
        context=True,
    ),
    Deliberate(
        "D32",
        "Encounter",
        "location",
        "Encounter location count when the oracle lists PV1-43 (prior temporary location) as "
        "a completed temporary location; the IG maps PV1-43 to Basic (EncounterHistory), not "
        "to Encounter.location.",
        "segments/HL7 Segment - FHIR R4_ PV1[Encounter] - PV1.csv line 70 (PV1-43)",
        _has_prior_temporary_location,
        context=True,
    ),
    Deliberate(
        "D33",
        "Patient",
        "name.*",
        "A Patient name that is the name of another person in the message: its family and "
        "first given name are those of an XPN in GT1, IN1, IN2, IN3, DB1 or CON (IN2-7 "
        "Medicaid case name, CON-24 consenter) and of no name in PID, PD1, NK1 or MRG; the "
        "IG maps none of those segments to the Patient (MDM maps no CON at all).",
        "messages/HL7 Message - FHIR R4_ ADT_A01 - Sheet1.csv lines 44 (DB1), 62 (GT1), "
        "64-66 (IN1-IN3: Coverage only); messages/HL7 Message - FHIR R4_ MDM_T02 - "
        "Sheet1.csv line 32 (CON: no target)",
        _name_of_other_party,
        context=True,
    ),
    Deliberate(
        "D34",
        "Condition",
        "",
        "Condition stub with an identifier and no code, made for the parent diagnosis named "
        "in DG1-22; the IG maps DG1-22 to the extension condition-dueTo (a reference to the "
        "parent), and a stub with the parent's id would overwrite the parent (as D13).",
        "segments/HL7 Segment - FHIR R4_ DG1[Condition] - Sheet1.csv lines 28-29 (DG1-22)",
        _parent_diagnosis_stub,
        context=True,
    ),
    Deliberate(
        "D35",
        "Condition",
        "",
        "Condition made from PDA-1 (death cause code) when no DG1 or PRB of the message names "
        "that code; the IG message maps leave PDA unmapped (as D4, D5).",
        "messages/HL7 Message - FHIR R4_ ADT_A01 - Sheet1.csv line 81 (PDA); ADT_A02 line 43",
        _death_cause_condition,
        context=True,
    ),
    Deliberate(
        "D36",
        "RelatedPerson",
        "relationship",
        "The mother named by PID-21 merged into the RelatedPerson of an NK1 whose NK1-3 is "
        "not mother (e.g. EMC / CHD: a child as emergency contact): the merged person holds "
        "both identifiers and a MTH relationship. The IG makes PID-21 a RelatedPerson of its "
        "own (CX[RelatedPerson-Mother]), and NK1 another (NK1[RelatedPerson]).",
        "segments/HL7 Segment - FHIR R4_ PID[Patient] - PID.csv line 37 (PID-21); "
        "segments/HL7 Segment - FHIR R4_ NK1[RelatedPerson] - Sheet1.csv line 6 (NK1-3)",
        _mother_code_of_merged,
        context=True,
    ),
    Deliberate(
        "D37",
        "RelatedPerson",
        "count",
        "count:RelatedPerson of a Bundle in which Microsoft merged the PID-21 mother into an "
        "NK1's RelatedPerson (D36): one resource short by construction.",
        "segments/HL7 Segment - FHIR R4_ PID[Patient] - PID.csv line 37 (PID-21)",
        _count_with_merged_mother,
        context=True,
        short_by=_merged_mothers,
    ),
    Deliberate(
        "D38",
        "RelatedPerson",
        "relationship",
        "NK1-3 'EMC' sent with CWE-3 naming another coding system than table 0063 (ACR: "
        "American College of Radiology, table 0396) translated with the 0063 concept map to "
        "v2-0131 'C'; the map is for 0063 codes, and the IG takes the system from CWE-3.",
        "codesystems/HL7 Concept Map_ Relationship - Sheet1.csv line 28 (EMC, HL70063); "
        "datatypes/HL7 Data Type - FHIR R4_ CWE[CodeableConcept] - Sheet1.csv line 6 (CWE.3)",
        _relationship_of_other_system,
        context=True,
    ),
    Deliberate(
        "D39",
        "Observation",
        "count",
        "count:Observation when an ED/RP OBX of the message became a DiagnosticReport with "
        "presentedForm (D20) and no Observation; the IG maps every OBX of an order group to "
        "an Observation, so the oracle is short by construction (not MDM, whose IG map makes "
        "a DocumentReference of every OBX).",
        "messages/HL7 Message - FHIR R4_ ORU_R01 - Sheet1.csv lines 47-51, 67, 71; "
        "..._MDM_T02 - Sheet1.csv line 34",
        _count_with_report_for_document,
        context=True,
        short_by=_report_for_document_obx,
    ),
    Deliberate(
        "D40",
        "MedicationRequest",
        "dosageInstruction.doseAndRate.doseQuantity.*",
        "RXO-2 (Requested Give Amount - Minimum) written as doseQuantity; the IG maps RXO-2 "
        "to doseAndRate.doseRange.low (type 'ordered'), RXO-3 to doseRange.high.",
        "segments/HL7 Segment - FHIR R4_ RXO[MedicationRequest] - Sheet1.csv lines 6-12 "
        "(RXO-2, RXO-4)",
        _dose_from_rxo_minimum,
        context=True,
    ),
    Deliberate(
        "D41",
        "Patient",
        "communication.language",
        "PID-15 language kept as sent, an upper-case ISO 639-1 code (EN) in an invented "
        "table-0296 system; the IG translates PID-15 with the PrimaryLanguage concept map to "
        "BCP-47 (urn:ietf:bcp:47, 'en'). BCP-47 tags are case-insensitive (RFC 5646 "
        "2.1.1), so both name one language; the oracle's coding is not the IG's.",
        "segments/HL7 Segment - FHIR R4_ PID[Patient] - PID.csv line 26 (PID-15, "
        "PrimaryLanguage); codesystems/HL7 Concept Map_ PrimaryLanguage - Sheet1.csv",
        _language_code_uncased,
        context=True,
    ),
    Deliberate(
        "D42",
        "Patient",
        "race",
        "US Core race ombCategory holding the PID-10 code as sent (e.g. 'U', 'C', '1') with "
        "no system; US Core binds ombCategory (required) to the OMB race categories (five CDC "
        "codes, UNK, ASKU), and the IG leaves PID-10 to that local extension.",
        "segments/HL7 Segment - FHIR R4_ PID[Patient] - PID.csv line 16 (PID-10: local "
        "extension); US Core us-core-race ombCategory (required binding, OMB Race Categories)",
        _omb_category_outside(_OMB_RACE, 10),
        context=True,
    ),
    Deliberate(
        "D43",
        "Patient",
        "ethnicity",
        "US Core ethnicity ombCategory holding the PID-22 code as sent (e.g. 'A') with no "
        "system; US Core binds ombCategory (required) to the OMB ethnicity categories "
        "(2135-2, 2186-5, UNK, ASKU), and the IG leaves PID-22 to that local extension.",
        "segments/HL7 Segment - FHIR R4_ PID[Patient] - PID.csv line 38 (PID-22: local "
        "extension); US Core us-core-ethnicity ombCategory (required binding)",
        _omb_category_outside(_OMB_ETHNICITY, 22),
        context=True,
    ),
    Deliberate(
        "D44",
        "MedicationRequest",
        "identifier.type",
        "RXE-15 prescription number typed 'PRN' in an invented code system "
        "(.../CodeSystem/identifier-type-code); the IG types identifiers from table 0203 "
        "only, where PRN is 'Provider number', and has no code for a prescription number "
        "(the IG's RXE map is under construction).",
        "datatypes/HL7 Data Type - FHIR R4_ CX[Identifier] - Sheet1.csv (CX.5 → type, table "
        "0203); v2-to-FHIR Map Inventory - Segment.csv (RXE[MedicationRequest]: under "
        "construction)",
        _prescription_number_typed_prn,
        context=True,
    ),
    Deliberate(
        "D45",
        "Appointment",
        "participant",
        "Appointment participant count when the oracle left out every participant the IG "
        "makes from SCH-12 (placer contact), SCH-16 (filler contact) and SCH-20 (entered "
        "by, type 'enterer') although the SCH values at least one of them.",
        "segments/HL7 Segment - FHIR R4_ SCH[Appointment] - Sheet1.csv lines 16-18 (SCH-12), "
        "22-24 (SCH-16), 28-30 (SCH-20)",
        _sch_participants_left_out,
        context=True,
    ),
    *(
        Deliberate(
            rule_id,
            "Encounter",
            f"period.{end}",
            f"Encounter.period.{end} taken from PV2-{planned} ({what}); the IG maps PV2-"
            f"{planned} to the extension Encounter.{ext}, and period.{end} from PV1-{actual} "
            "only (what happened, not what was planned).",
            f"segments/HL7 Segment - FHIR R4_ PV2[Encounter] - Sheet1.csv lines {lines} "
            f"(PV2-{planned}); segments/HL7 Segment - FHIR R4_ PV1[Encounter] - PV1.csv "
            f"(PV1-{actual})",
            _period_from_pv2(planned, actual),
            context=True,
        )
        for rule_id, end, planned, actual, what, ext, lines in (
            ("D46", "start", 8, 44, "expected admit date/time", "plannedStartDate", "13-14"),
            ("D47", "end", 9, 45, "expected discharge date/time", "plannedEndDate", "15-16"),
        )
    ),
    *CCDA_RULES,
)


def _rule_for(
    rules: Sequence[Deliberate], rtype: str, rel_path: str, value: Any, ctx: Any = None
) -> Deliberate | None:
    """First DELIBERATE rule covering this expected value, if any."""
    kind = getattr(ctx, "kind", "hl7v2")
    for rule in rules:
        if rule.resource not in ("*", rtype) or kind not in rule.kinds:
            continue
        if rule.path == "" and rel_path != "":
            continue
        if rule.path != "" and not fnmatchcase(rel_path, rule.path):
            continue
        if rule.context:
            if ctx is not None and rule.when(value, ctx):
                return rule
        elif rule.when(value):
            return rule
    return None


# --------------------------------------------------------------------------------------------
# Field specifications
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class F:
    """A leaf field: dotted path (lists flattened), value kind, matching-key flag."""

    path: str
    kind: str = "str"  # str | num | bool | dt | uri | concept | coding | count | flag
    key: bool = False
    label: str | None = None  # reported name when it differs from path

    @property
    def name(self) -> str:
        """Reported name of the field."""
        return self.label or self.path


@dataclass(frozen=True)
class G:
    """A repeating group of elements (e.g. identifier); elements are paired, then compared."""

    path: str
    fields: tuple[Spec, ...]

    @property
    def name(self) -> str:
        """Reported name of the group."""
        return self.path


Spec = F | G

IDENTIFIER = G("identifier", (F("value", key=True), F("type", "concept"), F("system", "uri")))
HUMAN_NAME = G("name", (F("family", key=True), F("given", key=True), F("use")))
ADDRESS = G(
    "address",
    (F("line"), F("city"), F("state"), F("postalCode"), F("country"), F("use"), F("type")),
)
TELECOM = G("telecom", (F("value", key=True), F("system"), F("use")))
QTY = ("value", "unit", "code")


def _qty(prefix: str, key: bool = False) -> tuple[F, ...]:
    """value (numeric), unit and code of a Quantity at `prefix`."""
    return tuple(F(f"{prefix}.{p}", "num" if p == "value" else "str", key) for p in QTY)


OBS_VALUES: tuple[F, ...] = (
    *_qty("valueQuantity", key=True),
    F("valueString", key=True),
    F("valueCodeableConcept", "concept", key=True),
    F("valueDateTime", "dt", key=True),
    F("valueTime", key=True),
    F("valueBoolean", "bool", key=True),
    F("valueInteger", "num", key=True),
    F("valuePeriod.start", "dt"),
    F("valuePeriod.end", "dt"),
    F("valueRatio.numerator.value", "num"),
    F("valueRatio.denominator.value", "num"),
    F("valueRange.low.value", "num"),
    F("valueRange.high.value", "num"),
    F("valueSampledData.data"),
)

SPECS: dict[str, tuple[Spec, ...]] = {
    "Patient": (
        IDENTIFIER,
        HUMAN_NAME,
        F("birthDate", "dt"),
        F("gender"),
        ADDRESS,
        TELECOM,
        F("maritalStatus", "concept"),
        F("communication.language", "concept"),
        F("deceasedBoolean", "bool"),
        F("deceasedDateTime", "dt"),
        F("multipleBirthBoolean", "bool"),
        F("multipleBirthInteger", "num"),
        F("_race", "coding", label="race"),
        F("_ethnicity", "coding", label="ethnicity"),
    ),
    "Encounter": (
        F("class", "coding"),
        F("status"),
        F("period.start", "dt"),
        F("period.end", "dt"),
        F("type", "concept"),
        F("location", "count"),
        F("hospitalization.admitSource", "concept"),
        F("hospitalization.dischargeDisposition", "concept"),
        IDENTIFIER,
        F("serviceType", "concept"),
    ),
    "Observation": (
        F("code", "concept", key=True),
        *OBS_VALUES,
        F("interpretation", "concept"),
        F("effectiveDateTime", "dt", key=True),
        F("effectivePeriod.start", "dt", key=True),
        F("effectivePeriod.end", "dt"),
        F("effectiveInstant", "dt"),
        G("referenceRange", (F("low.value", "num"), F("high.value", "num"), F("text"))),
        F("status"),
        F("category", "concept"),
        F("note.text"),
    ),
    "DiagnosticReport": (
        F("code", "concept", key=True),
        F("status"),
        F("effectiveDateTime", "dt"),
        F("effectivePeriod.start", "dt"),
        F("effectivePeriod.end", "dt"),
        F("issued", "dt"),
        F("category", "concept"),
        IDENTIFIER,
    ),
    "ServiceRequest": (
        F("code", "concept", key=True),
        F("status"),
        F("intent"),
        IDENTIFIER,
        F("priority"),
        F("occurrenceDateTime", "dt"),
        F("occurrencePeriod.start", "dt"),
        F("occurrencePeriod.end", "dt"),
        F("authoredOn", "dt"),
    ),
    "Condition": (
        F("code", "concept", key=True),
        F("clinicalStatus", "concept"),
        F("verificationStatus", "concept"),
        F("category", "concept"),
        F("onsetDateTime", "dt"),
        F("onsetString"),
        F("recordedDate", "dt"),
    ),
    "AllergyIntolerance": (
        F("code", "concept", key=True),
        F("type"),
        F("category"),
        F("criticality"),
        F("clinicalStatus", "concept"),
        G("reaction", (F("manifestation", "concept"), F("onset", "dt"), F("severity"))),
        F("onsetDateTime", "dt"),
    ),
    "Procedure": (
        F("code", "concept", key=True),
        F("status"),
        F("performedDateTime", "dt"),
        F("performedPeriod.start", "dt"),
        F("performedPeriod.end", "dt"),
        IDENTIFIER,
    ),
    "Immunization": (
        F("vaccineCode", "concept", key=True),
        F("status"),
        F("occurrenceDateTime", "dt"),
        F("lotNumber"),
        *_qty("doseQuantity"),
    ),
    "MedicationRequest": (
        F("_medication", "concept", key=True, label="medication"),
        F("status"),
        F("intent"),
        F("authoredOn", "dt"),
        IDENTIFIER,
        *_qty("dosageInstruction.doseAndRate.doseQuantity"),
        F("dosageInstruction.doseAndRate.doseRange.low.value", "num"),
        F("dosageInstruction.doseAndRate.doseRange.high.value", "num"),
        *_qty("dispenseRequest.quantity"),
    ),
    "MedicationAdministration": (
        F("_medication", "concept", key=True, label="medication"),
        F("status"),
        F("effectiveDateTime", "dt"),
        F("effectivePeriod.start", "dt"),
        F("effectivePeriod.end", "dt"),
        *_qty("dosage.dose"),
    ),
    "MedicationDispense": (
        F("_medication", "concept", key=True, label="medication"),
        F("status"),
        *_qty("quantity"),
        F("whenPrepared", "dt"),
        F("whenHandedOver", "dt"),
    ),
    "Medication": (F("code", "concept", key=True),),
    "Coverage": (
        IDENTIFIER,
        F("status"),
        F("period.start", "dt"),
        F("period.end", "dt"),
        F("payor", "count"),
        F("type", "concept"),
        F("relationship", "concept"),
        F("subscriberId"),
    ),
    "RelatedPerson": (
        HUMAN_NAME,
        F("relationship", "concept", key=True),
        TELECOM,
        ADDRESS,
        F("gender"),
        F("birthDate", "dt"),
    ),
    "Appointment": (
        F("status"),
        F("start", "dt"),
        F("end", "dt"),
        F("serviceType", "concept"),
        F("appointmentType", "concept"),
        F("participant", "count"),
        IDENTIFIER,
    ),
    "DocumentReference": (
        F("type", "concept", key=True),
        F("status"),
        F("docStatus"),
        F("date", "dt"),
        F("content.attachment.contentType"),
        F("_hasData", "flag", label="content.attachment.data(present)"),
        IDENTIFIER,
        F("masterIdentifier.value", key=True),
    ),
    "Specimen": (
        F("type", "concept", key=True),
        F("collection.collectedDateTime", "dt"),
        F("collection.collectedPeriod.start", "dt"),
        IDENTIFIER,
    ),
    # Types added for the C-CDA oracle. The last five are compared for C-CDA only by
    # default (NOT_COMPARED_FOR_HL7V2 below).
    "MedicationStatement": (
        F("_medication", "concept", key=True, label="medication"),
        F("status"),
        F("effectiveDateTime", "dt"),
        F("effectivePeriod.start", "dt"),
        F("effectivePeriod.end", "dt"),
        IDENTIFIER,
        *_qty("dosage.doseAndRate.doseQuantity"),
    ),
    "FamilyMemberHistory": (
        F("relationship", "concept", key=True),
        F("status"),
        F("sex", "concept"),
        F("_born", "dt", label="born"),
        G(
            "condition",
            (
                F("code", "concept", key=True),
                F("onsetAge.value", "num"),
                F("contributedToDeath", "bool"),
            ),
        ),
        IDENTIFIER,
    ),
    "Composition": (
        F("type", "concept", key=True),
        F("status"),
        F("date", "dt"),
        F("title"),
        F("confidentiality"),
        IDENTIFIER,
        F("event.period.start", "dt"),
        F("event.period.end", "dt"),
        F("section.code", "concept"),
    ),
    "Practitioner": (IDENTIFIER, HUMAN_NAME),
    "Organization": (F("name", key=True), IDENTIFIER),
    "Location": (F("name", key=True), F("type", "concept")),
    "Device": (
        F("type", "concept", key=True),
        IDENTIFIER,
        F("udiCarrier.deviceIdentifier"),
    ),
    "Consent": (
        F("provision.code", "concept", key=True),
        F("status"),
        F("scope", "concept"),
        F("category", "concept"),
        F("dateTime", "dt"),
    ),
}

# Types Microsoft writes for HL7 v2 too (Location per PL component, Organization per
# assigning authority, …) but which the HL7 v2 score has never compared: by default they are
# compared for C-CDA only, so adding them did not move the HL7 v2 figure. Pass
# types=SPECS (bench/conformance.py --all-types) to compare them for HL7 v2 as well.
NOT_COMPARED_FOR_HL7V2: tuple[str, ...] = (
    "Practitioner",
    "Organization",
    "Location",
    "Device",
    "Consent",
)


def default_types(kind: str) -> tuple[str, ...]:
    """The resource types compared by default for this kind of source."""
    if kind == "hl7v2":
        return tuple(t for t in SPECS if t not in NOT_COMPARED_FOR_HL7V2)
    return tuple(SPECS)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """The verdict on one compared (or excluded) expected field."""

    path: str
    status: str  # agree | disagree | excluded
    expected: str
    actual: str | None = None
    where: str = ""
    rule: str | None = None
    key: bool = False


@dataclass
class CompareResult:
    """All outcomes of comparing one expected bundle with one actual bundle."""

    outcomes: list[Outcome] = field(default_factory=list)
    extra: int = 0
    extra_resources: Counter[str] = field(default_factory=Counter)

    def _count(self, status: str) -> int:
        """Number of outcomes with this status."""
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def agreed(self) -> int:
        """Fields that agree."""
        return self._count("agree")

    @property
    def compared(self) -> int:
        """Fields compared (agree + disagree; excluded fields are not compared)."""
        return self._count("agree") + self._count("disagree")

    @property
    def excluded(self) -> int:
        """Fields excluded by DELIBERATE rules."""
        return self._count("excluded")

    @property
    def score(self) -> float | None:
        """Percentage agreed / compared (None when nothing was compared)."""
        return 100.0 * self.agreed / self.compared if self.compared else None

    def disagreements(self) -> list[Outcome]:
        """Outcomes that disagree."""
        return [o for o in self.outcomes if o.status == "disagree"]

    def excluded_by_rule(self) -> Counter[str]:
        """Excluded field counts per DELIBERATE rule id."""
        return Counter(o.rule or "?" for o in self.outcomes if o.status == "excluded")


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ctx:
    """Comparison context: resource type, DELIBERATE rules and locator."""

    rtype: str
    rules: Sequence[Deliberate]
    where: str = ""
    resource: Any = None  # the expected resource being compared
    element: Any = None  # the expected element of a repeating group being compared
    bundle: Any = None  # the expected Bundle
    # The input, parsed: a fhirtwin.hl7v2.Message (kind 'hl7v2') or a CdaSource ('ccda').
    source: Any = None
    kind: str = "hl7v2"  # what kind of source the bundles were converted from


def pluck(obj: Any, path: str) -> list[Any]:
    """Values at a dotted path, flattening lists at every step (FHIRPath-like)."""
    cur = [obj]
    for part in path.split("."):
        nxt: list[Any] = []
        for item in cur:
            if isinstance(item, dict) and part in item:
                value = item[part]
                nxt.extend(value if isinstance(value, list) else [value])
        cur = nxt
    return [v for v in cur if v is not None]


def _norm_uri(value: Any) -> str | None:
    """Strip whitespace and trailing '/' of a URI; None when empty."""
    if not isinstance(value, str):
        return None
    value = value.strip().rstrip("/")
    return value or None


def _norm_str(value: Any) -> str | None:
    """Strip whitespace; None when empty or not a primitive."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float, Decimal)):
        return None
    text = str(value).strip()
    return text or None


def _norm_num(value: Any) -> Decimal | str | None:
    """Decimal for numbers and numeric strings; other strings kept as strings."""
    if isinstance(value, bool):
        return None
    try:
        return Decimal(str(value).strip()).normalize()
    except (InvalidOperation, ValueError):
        return _norm_str(value)


def _norm_dt(value: Any) -> When | str | None:
    """Parsed date/dateTime, or the stripped string when it cannot be parsed."""
    text = _norm_str(value)
    if text is None:
        return None
    return When.parse(text) or text


def _codings(
    raw_codings: Iterable[Any], path: str, ctx: Ctx, expected: bool
) -> tuple[list[Leaf], list[Outcome]]:
    """Coding leaves of raw Coding dicts; invented systems on the expected side are excluded."""
    leaves: list[Leaf] = []
    excluded: list[Outcome] = []
    for coding in raw_codings:
        if not isinstance(coding, dict):
            continue
        code = _norm_str(coding.get("code"))
        if code is None:
            continue
        system = _norm_uri(coding.get("system"))
        whole = _rule_for(ctx.rules, ctx.rtype, _rel(path, ctx), coding, ctx) if expected else None
        if whole is not None:
            excluded.append(
                Outcome(path, "excluded", f"{system}|{code}", where=ctx.where, rule=whole.rule_id)
            )
            continue
        rule = _rule_for(ctx.rules, ctx.rtype, _rel(path, ctx) + ".system", system, ctx)
        if expected and rule is not None:
            excluded.append(
                Outcome(
                    f"{path}.system", "excluded", str(system), where=ctx.where, rule=rule.rule_id
                )
            )
            system = None
        leaves.append(Coding(system, code))
    return leaves, excluded


def _concepts(
    values: list[Any], path: str, ctx: Ctx, expected: bool
) -> tuple[list[Leaf], list[Outcome]]:
    """Coding leaves of CodeableConcepts (text leaf when a concept has no coding)."""
    leaves: list[Leaf] = []
    excluded: list[Outcome] = []
    for cc in values:
        if not isinstance(cc, dict):
            continue
        got, excl = _codings(cc.get("coding") or [], path, ctx, expected)
        excluded.extend(excl)
        if got:
            leaves.extend(got)
        elif excl:
            continue  # its codings were excluded: the text is not a stand-in to compare
        elif (text := _norm_str(cc.get("text"))) is not None:
            leaves.append(Text(text))
    return leaves, excluded


def _rel(path: str, ctx: Ctx) -> str:
    """Path relative to the resource (without the leading type name)."""
    return path[len(ctx.rtype) + 1 :] if path.startswith(ctx.rtype + ".") else path


_SCALAR_NORMALISERS: dict[str, Callable[[Any], Any]] = {
    "str": _norm_str,
    "uri": _norm_uri,
    "num": _norm_num,
    "dt": _norm_dt,
    "bool": lambda v: v if isinstance(v, bool) else None,
    "flag": lambda v: True if v is True else None,
}


def extract(
    obj: Any, spec: F, path: str, ctx: Ctx, expected: bool
) -> tuple[list[Leaf], list[Outcome]]:
    """Normalised leaves of one field, plus excluded outcomes (expected side only)."""
    if obj is None:
        return [], []
    values = pluck(obj, spec.path)
    if spec.kind == "count":
        if not values:
            return [], []
        rule = _rule_for(ctx.rules, ctx.rtype, _rel(path, ctx), values, ctx) if expected else None
        if rule is not None:
            return [], [
                Outcome(path, "excluded", str(len(values)), where=ctx.where, rule=rule.rule_id)
            ]
        return [Decimal(len(values))], []
    if spec.kind == "concept":
        return _concepts(values, path, ctx, expected)
    if spec.kind == "coding":
        return _codings(values, path, ctx, expected)
    normalise = _SCALAR_NORMALISERS[spec.kind]
    leaves: list[Leaf] = []
    excluded: list[Outcome] = []
    for raw in values:
        leaf = normalise(raw)
        if leaf is None:
            continue
        rule = _rule_for(ctx.rules, ctx.rtype, _rel(path, ctx), raw, ctx) if expected else None
        if rule is not None:
            excluded.append(
                Outcome(path, "excluded", str(leaf), where=ctx.where, rule=rule.rule_id)
            )
        else:
            leaves.append(leaf)
    return leaves, excluded


# --------------------------------------------------------------------------------------------
# Comparison of objects
# --------------------------------------------------------------------------------------------


def _show(leaves: Sequence[Leaf]) -> str | None:
    """Display of candidate actual leaves."""
    return " ; ".join(str(v) for v in leaves) if leaves else None


def _compare_field(exp: Any, act: Any, spec: F, ctx: Ctx, prefix: str) -> tuple[list[Outcome], int]:
    """Compare one leaf field as a multiset: each expected leaf needs an unused equal leaf."""
    path = prefix + spec.name
    exp_leaves, outcomes = extract(exp, spec, path, ctx, expected=True)
    act_leaves, _ = extract(act, spec, path, ctx, expected=False)
    used = [False] * len(act_leaves)
    for leaf in exp_leaves:
        hit = next(
            (j for j, a in enumerate(act_leaves) if not used[j] and leaf_matches(leaf, a)), None
        )
        if hit is not None:
            used[hit] = True
        outcomes.append(
            Outcome(
                path,
                "agree" if hit is not None else "disagree",
                str(leaf),
                str(act_leaves[hit]) if hit is not None else _show(act_leaves),
                ctx.where,
                key=spec.key,
            )
        )
    excluded_here = any(o.status == "excluded" and o.path == path for o in outcomes)
    extra = 0 if excluded_here else used.count(False)
    return outcomes, extra


def _similarity(outcomes: Iterable[Outcome]) -> int:
    """Pairing score: agreed fields, key fields weighted."""
    return sum(KEY_WEIGHT if o.key else 1 for o in outcomes if o.status == "agree")


def _pair(n_exp: int, n_act: int, score: Callable[[int, int], int]) -> list[int | None]:
    """Greedy best pairing by score; leftovers paired in order."""
    cands = sorted((-s, i, j) for i in range(n_exp) for j in range(n_act) if (s := score(i, j)) > 0)
    match: list[int | None] = [None] * n_exp
    used: set[int] = set()
    for _, i, j in cands:
        if match[i] is None and j not in used:
            match[i] = j
            used.add(j)
    free = [j for j in range(n_act) if j not in used]
    for i in range(n_exp):
        if match[i] is None and free:
            match[i] = free.pop(0)
    return match


def count_leaves(obj: Any, specs: Sequence[Spec], ctx: Ctx) -> int:
    """Number of (actual-side) leaves an object holds for these specs."""
    total = 0
    for spec in specs:
        if isinstance(spec, G):
            total += sum(count_leaves(e, spec.fields, ctx) for e in pluck(obj, spec.path))
        else:
            total += len(extract(obj, spec, spec.name, ctx, expected=False)[0])
    return total


def _compare_group(exp: Any, act: Any, spec: G, ctx: Ctx, prefix: str) -> tuple[list[Outcome], int]:
    """Pair the elements of a repeating group, then compare each pair field by field."""
    sub = prefix + spec.path + "."
    exps = [e for e in pluck(exp, spec.path) if isinstance(e, dict)]
    acts = [a for a in pluck(act, spec.path) if isinstance(a, dict)] if act is not None else []
    return compare_objects_paired(exps, acts, spec.fields, ctx, sub, element=True)


def compare_object(
    exp: Any, act: Any, specs: Sequence[Spec], ctx: Ctx, prefix: str
) -> tuple[list[Outcome], int]:
    """Compare one expected object with one actual object (or None)."""
    outcomes: list[Outcome] = []
    extra = 0
    for spec in specs:
        if isinstance(spec, G):
            got, more = _compare_group(exp, act, spec, ctx, prefix)
        else:
            got, more = _compare_field(exp, act, spec, ctx, prefix)
        outcomes.extend(got)
        extra += more
    return outcomes, extra


def compare_objects_paired(
    exps: Sequence[Any],
    acts: Sequence[Any],
    specs: Sequence[Spec],
    ctx: Ctx,
    prefix: str,
    where: Callable[[int], str] | None = None,
    element: bool = False,
) -> tuple[list[Outcome], int]:
    """Pair expected and actual objects greedily by agreement, then compare the pairs."""
    cache: dict[tuple[int, int], tuple[list[Outcome], int]] = {}

    def run(i: int, j: int | None) -> tuple[list[Outcome], int]:
        """Compare expected i with actual j (memoised)."""
        c = replace(
            ctx,
            where=ctx.where if where is None else where(i),
            resource=ctx.resource if element else exps[i],
            element=exps[i] if element else None,
        )
        if j is None:
            return compare_object(exps[i], None, specs, c, prefix)
        if (i, j) not in cache:
            cache[(i, j)] = compare_object(exps[i], acts[j], specs, c, prefix)
        return cache[(i, j)]

    match = _pair(len(exps), len(acts), lambda i, j: _similarity(run(i, j)[0]))
    outcomes: list[Outcome] = []
    extra = 0
    for i, j in enumerate(match):
        got, more = run(i, j)
        outcomes.extend(got)
        extra += more
    used = {j for j in match if j is not None}
    extra += sum(count_leaves(a, specs, ctx) for j, a in enumerate(acts) if j not in used)
    return outcomes, extra


# --------------------------------------------------------------------------------------------
# Bundles
# --------------------------------------------------------------------------------------------


def bundle_resources(bundle: Any) -> list[dict[str, Any]]:
    """Resources of a Bundle's entries (entries without a resource are skipped)."""
    if not isinstance(bundle, dict):
        return []
    entries = bundle.get("entry") or []
    return [
        e["resource"]
        for e in entries
        if isinstance(e, dict)
        and isinstance(e.get("resource"), dict)
        and isinstance(e["resource"].get("resourceType"), str)
    ]


def _index(bundle: Any) -> dict[str, dict[str, Any]]:
    """Resources by 'Type/id' and by fullUrl, for resolving references."""
    index: dict[str, dict[str, Any]] = {}
    for entry in (bundle.get("entry") or []) if isinstance(bundle, dict) else []:
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict):
            continue
        if isinstance(entry.get("fullUrl"), str):
            index[entry["fullUrl"]] = res
        if res.get("id") is not None:
            index[f"{res.get('resourceType')}/{res['id']}"] = res
    return index


def _extension_codings(resource: dict[str, Any], url_suffix: str) -> list[Any]:
    """valueCoding of ombCategory/detailed sub-extensions of a US Core race/ethnicity ext."""
    out: list[Any] = []
    for ext in resource.get("extension") or []:
        if isinstance(ext, dict) and str(ext.get("url", "")).endswith(url_suffix):
            for sub in ext.get("extension") or []:
                if isinstance(sub, dict) and sub.get("url") in ("ombCategory", "detailed"):
                    out.append(sub.get("valueCoding"))
    return out


def _has_data(resource: dict[str, Any]) -> bool | None:
    """True when some content.attachment.data is non-empty valid base64."""
    for data in pluck(resource, "content.attachment.data"):
        try:
            if isinstance(data, str) and base64.b64decode(data, validate=True):
                return True
        except (binascii.Error, ValueError):
            continue
    return None


def prepare(resource: dict[str, Any], index: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Shallow copy with synthetic keys: _medication, _race, _ethnicity, _hasData, _born."""
    res = dict(resource)
    rtype = res.get("resourceType")
    if rtype in (
        "MedicationRequest",
        "MedicationAdministration",
        "MedicationDispense",
        "MedicationStatement",
    ):
        concept = res.get("medicationCodeableConcept")
        ref = (res.get("medicationReference") or {}).get("reference")
        if concept is None and isinstance(ref, str) and ref in index:
            concept = index[ref].get("code")
        res["_medication"] = concept
    elif rtype == "Patient":
        res["_race"] = _extension_codings(res, "us-core-race")
        res["_ethnicity"] = _extension_codings(res, "us-core-ethnicity")
    elif rtype == "DocumentReference":
        res["_hasData"] = _has_data(res)
    elif rtype == "FamilyMemberHistory":
        # born[x]: a year such as "1910" is a date whether sent as bornDate or bornString.
        res["_born"] = next(
            (v for k in ("bornDate", "bornString", "bornPeriod") if (v := res.get(k))), None
        )
        if isinstance(res["_born"], dict):
            res["_born"] = res["_born"].get("start")
    return res


def _by_type(bundle: Any) -> dict[str, list[dict[str, Any]]]:
    """Prepared resources of the compared types, grouped by type in bundle order."""
    index = _index(bundle)
    out: dict[str, list[dict[str, Any]]] = {t: [] for t in SPECS}
    for res in bundle_resources(bundle):
        if res["resourceType"] in out:
            out[res["resourceType"]].append(prepare(res, index))
    return out


def _excluded_resource(
    res: dict[str, Any], ctx: Ctx, rule: Deliberate, where: str
) -> list[Outcome]:
    """Every leaf of an expected resource excluded by a whole-resource rule."""
    got, _ = compare_object(res, None, SPECS[ctx.rtype], Ctx(ctx.rtype, (), where), ctx.rtype + ".")
    return [Outcome(o.path, "excluded", o.expected, where=where, rule=rule.rule_id) for o in got]


def _split(
    resources: list[dict[str, Any]],
    rtype: str,
    rules: Sequence[Deliberate],
    bundle: Any = None,
    source: Any = None,
    kind: str = "hl7v2",
) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], Deliberate]]]:
    """Separate resources excluded by a whole-resource DELIBERATE rule."""
    kept: list[dict[str, Any]] = []
    dropped: list[tuple[dict[str, Any], Deliberate]] = []
    for res in resources:
        ctx = Ctx(rtype, rules, resource=res, bundle=bundle, source=source, kind=kind)
        rule = _rule_for(rules, rtype, "", res, ctx)
        if rule is None:
            kept.append(res)
        else:
            dropped.append((res, rule))
    return kept, dropped


def _compare_type(
    rtype: str,
    exps: list[dict[str, Any]],
    acts: list[dict[str, Any]],
    rules: Sequence[Deliberate],
    result: CompareResult,
    expected_bundle: Any = None,
    actual_bundle: Any = None,
    source: Any = None,
    kind: str = "hl7v2",
) -> None:
    """Compare all resources of one type and add the outcomes to `result`."""
    ctx = Ctx(rtype, rules, bundle=expected_bundle, source=source, kind=kind)
    exps, dropped = _split(exps, rtype, rules, expected_bundle, source, kind)
    acts, _ = _split(acts, rtype, rules, actual_bundle, source, kind)
    for n, (res, rule) in enumerate(dropped, 1):
        result.outcomes.extend(_excluded_resource(res, ctx, rule, f"{rtype}(excluded)#{n}"))
    if not exps:
        if acts:
            result.extra_resources[rtype] += len(acts)
            result.extra += sum(count_leaves(a, SPECS[rtype], ctx) for a in acts)
        return
    same = len(exps) == len(acts)
    count_ctx = Ctx(rtype, rules, bundle=expected_bundle, source=source, kind=kind)
    count_rule = next(
        (
            r
            for r in rules
            if r.path == "count"
            and r.resource == rtype
            and kind in r.kinds
            and r.when(len(exps), count_ctx)
            and (r.short_by is None or len(acts) - len(exps) == r.short_by(count_ctx))
        ),
        None,
    )
    result.outcomes.append(
        Outcome(
            f"count:{rtype}",
            "excluded" if count_rule else "agree" if same else "disagree",
            str(len(exps)),
            str(len(acts)),
            rtype,
            key=False,
            rule=count_rule.rule_id if count_rule else None,
        )
    )
    if len(acts) > len(exps):
        result.extra_resources[rtype] += len(acts) - len(exps)
    got, extra = compare_objects_paired(
        exps, acts, SPECS[rtype], ctx, rtype + ".", where=lambda i: f"{rtype}#{i + 1}"
    )
    result.outcomes.extend(got)
    result.extra += extra


def compare_bundles(
    expected: Any,
    actual: Any,
    rules: Sequence[Deliberate] = DELIBERATE,
    source: bytes | None = None,
    kind: str | None = None,
    types: Iterable[str] | None = None,
) -> CompareResult:
    """Compare two Bundles by meaning (see module docstring and docs/conformance.md).

    ``source`` (the input message or document) lets DELIBERATE rules that depend on what
    it holds (e.g. "SCH-26 is empty") decide; they never look at ``actual``. ``kind``
    ('hl7v2' or 'ccda') says what the source is, and so which rules apply; None sniffs it
    from ``source`` (XML is 'ccda'; anything else, or no source at all, is 'hl7v2').
    ``types`` limits the compared resource types (default: ``default_types(kind)``).
    """
    result = CompareResult()
    kind = kind or sniff_kind(source)
    parsed = _parse_source(source, kind)
    exp_by_type = _by_type(expected)
    act_by_type = _by_type(actual)
    compared = set(default_types(kind) if types is None else types)
    for rtype in [t for t in SPECS if t in compared]:
        _compare_type(
            rtype,
            exp_by_type[rtype],
            act_by_type[rtype],
            rules,
            result,
            expected,
            actual,
            parsed,
            kind,
        )
    return result
