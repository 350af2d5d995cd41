"""Clinical notes → coded FHIR R4, with every fact linked to the words it came from.

Input (``fhirtwin convert --from note`` and the ``ehr.notes`` pipeline source):

* a FHIR DocumentReference or Binary with text content (base64, as Synthea and the
  SMART Bulk sample carry notes), alone, in a Bundle or as Bulk NDJSON lines;
* an HL7 v2 message whose OBX segments carry text (TX, FT, ST, or ED with text);
* a C-CDA document: its narrative sections listed in ``nlp/sections.yaml``;
* a plain text file. Its patient comes from ``--patient`` or from a header block at
  the top (``Patient: Patient/123`` or ``Patient-Identifier: system|value``, and
  optionally ``Date:``, ``Encounter:``, ``Title:``), ended by a blank line.

Output per note (one batch Bundle from ``convert``; one pipeline unit): the note's
DocumentReference (made here, with the text, when the input was not one), then
Condition, FamilyMemberHistory, MedicationStatement, AllergyIntolerance, Procedure and
vital-sign Observations, and one Provenance naming the note and the rules version.
A concept mentioned several times with the same assertion is one resource that lists
every mention. Each resource carries the ``note-source`` extension per mention:
the DocumentReference, the character offsets (Unicode code points into the decoded
text), the section and the words. Hypothetical mentions are never asserted.
"""

from __future__ import annotations

import base64
import hashlib
import re
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from fhirtwin import bus

__all__ = [
    "NOTE_SOURCE_URL",
    "Note",
    "NoteError",
    "convert",
    "convert_paths",
    "convert_record",
    "note_resources",
    "read_notes",
]

NOTE_SOURCE_URL = "https://fhirtwin.dev/fhir/StructureDefinition/note-source"
NLP_TAG = {
    "system": "https://fhirtwin.dev/fhir/CodeSystem/tags",
    "code": "nlp",
    "display": "Derived from free text by fhirtwin's note NLP",
}
_NS = uuid.UUID("7d3f5d3c-1c39-4a43-8f0e-8a0b6b0a4e21")  # fhirtwin note resource ids
_HEADER = re.compile(r"(Patient|Patient-Identifier|Date|Encounter|Title)\s*:\s*(.*)\Z", re.I)
_TEXT_TYPES = ("text/plain", "text/markdown", "text/x-markdown", "text/html")
_V2_TEXT = {"TX", "FT", "ST"}
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"


class NoteError(ValueError):
    """A note that cannot be read: what, where, and what to do."""

    def __init__(self, what: str, where: str = "", hint: str = "") -> None:
        self.what, self.where, self.hint = what, where, hint
        super().__init__("; ".join(p for p in (what, f"at {where}" if where else "", hint) if p))

    def to_dict(self) -> dict[str, str]:
        return {"what": self.what, "where": self.where, "hint": self.hint}


@dataclass
class Note:
    """One text to read and whom it is about."""

    text: str
    document: dict[str, Any]  # the DocumentReference the offsets point into
    subject: dict[str, Any]  # a FHIR Reference to the patient
    patient_identifiers: tuple[str, ...]
    date: str | None = None
    encounter: str | None = None  # "Encounter/<id>"
    carry: list[dict[str, Any]] = field(default_factory=list)  # e.g. the v2 Patient


# -- reading ------------------------------------------------------------------------


def _b64text(data: str, where: str) -> str:
    try:
        raw = base64.b64decode(data, validate=False)
    except (ValueError, TypeError) as exc:
        raise NoteError("attachment data is not base64", where, "re-export the note") from exc
    return raw.decode("utf-8", errors="replace")


def _html_text(html: str) -> str:
    from lxml import html as lhtml

    try:
        return str(lhtml.fromstring(html).text_content())
    except Exception:  # an empty or broken fragment: read it as it is
        return re.sub(r"<[^>]+>", " ", html)


def _attachment_text(att: dict[str, Any], where: str) -> str | None:
    ctype = str(att.get("contentType") or "text/plain").split(";")[0].strip().lower()
    if ctype not in _TEXT_TYPES or not isinstance(att.get("data"), str):
        return None
    text = _b64text(att["data"], where + ".data")
    return _html_text(text) if ctype == "text/html" else text


def _patient_from_ref(ref: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    from fhirtwin.fhirsource import patient_ref_key

    pid = ref.split("/", 2)[1] if ref.startswith("Patient/") else ref
    return {"reference": f"Patient/{pid}"}, (patient_ref_key(pid),)


def _patient_arg(value: str, where: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    value = value.strip()
    if value.startswith("Patient/") and len(value) > 8:
        return _patient_from_ref(value)
    if "|" in value:
        system, _, ident = value.partition("|")
        if system and ident:
            return {"identifier": {"system": system, "value": ident}}, (f"{system}|{ident}",)
    raise NoteError(
        f"cannot tell the patient from {value!r}",
        where,
        "write Patient/<id> or <identifier system>|<value>",
    )


def _from_docref(res: dict[str, Any], where: str, patient: str | None) -> Iterator[Note]:
    subject = res.get("subject")
    ref = subject.get("reference") if isinstance(subject, dict) else None
    if isinstance(ref, str) and ref.startswith("Patient/"):
        subj, idents = _patient_from_ref(ref)
    elif patient:
        subj, idents = _patient_arg(patient, where)
    else:
        raise NoteError(
            "the DocumentReference names no patient", where + ".subject", "give --patient"
        )
    encounter = None
    ctx = res.get("context")
    if isinstance(ctx, dict):
        encs = ctx.get("encounter") or []
        if encs and isinstance(encs[0], dict):
            encounter = encs[0].get("reference")
    for i, content in enumerate(res.get("content") or ()):
        att = content.get("attachment") if isinstance(content, dict) else None
        if not isinstance(att, dict):
            continue
        text = _attachment_text(att, f"{where}.content[{i}].attachment")
        if text is None:
            continue
        yield Note(text, res, subj, idents, res.get("date"), encounter)
        return  # one text per DocumentReference: the first readable attachment


def _made_docref(
    text: str,
    subj: dict[str, Any],
    *,
    seed: str,
    date: str | None = None,
    title: str | None = None,
    encounter: str | None = None,
    type_: dict[str, Any] | None = None,
) -> dict[str, Any]:
    raw = text.encode("utf-8")
    doc: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": str(uuid.uuid5(_NS, "doc|" + seed + "|" + hashlib.sha256(raw).hexdigest())),
        "status": "current",
        "type": type_ or {"text": title or "Clinical note"},
        "subject": subj,
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "data": base64.b64encode(raw).decode("ascii"),
                    "size": len(raw),
                    "hash": base64.b64encode(hashlib.sha1(raw).digest()).decode("ascii"),
                    **({"title": title} if title else {}),
                }
            }
        ],
    }
    if date and "T" in date:  # DocumentReference.date is an instant: a day alone is not
        doc["date"] = date
    if encounter:
        doc["context"] = {"encounter": [{"reference": encounter}]}
    return doc


def _from_json(obj: Any, where: str, patient: str | None, seed: str) -> Iterator[Note]:
    if not isinstance(obj, dict):
        raise NoteError("expected a FHIR resource (a JSON object)", where or "$")
    rt = obj.get("resourceType")
    if rt == "DocumentReference":
        yield from _from_docref(obj, where or "DocumentReference", patient)
    elif rt == "Binary":
        if not patient:
            ctx = obj.get("securityContext")
            ref = ctx.get("reference") if isinstance(ctx, dict) else None
            if not (isinstance(ref, str) and ref.startswith("Patient/")):
                raise NoteError("a Binary names no patient", where or "Binary", "give --patient")
            patient = ref
        text = _attachment_text(obj, where or "Binary")
        if text is None:
            raise NoteError("the Binary holds no text", where or "Binary.contentType")
        subj, idents = _patient_arg(patient, where)
        bid = obj.get("id") or seed
        doc = _made_docref(text, subj, seed=f"binary|{bid}")
        doc["content"][0]["attachment"]["url"] = f"Binary/{bid}"
        yield Note(text, doc, subj, idents)
    elif rt == "Bundle":
        from fhirtwin.fhirsource import normalise_bundle

        norm = normalise_bundle(obj, validate=False, seed=seed)
        for unit in norm.units:
            if unit.resource.get("resourceType") == "DocumentReference":
                yield from _from_docref(unit.resource, unit.path, patient)
    else:
        raise NoteError(
            f"a {rt or 'JSON object'} holds no note",
            where or "$.resourceType",
            "send a DocumentReference, Binary, Bundle, HL7 v2 message, C-CDA or text",
        )


def _from_hl7v2(data: bytes, name: str) -> Iterator[Note]:
    from fhirtwin.conversion import ConversionError, HL7ParseError, convert_hl7v2
    from fhirtwin.hl7v2 import parse

    try:
        msg = parse(data)
        conv = convert_hl7v2(data)
    except (HL7ParseError, ConversionError) as exc:
        raise NoteError(str(exc), name) from exc
    lines: list[str] = []
    for seg in msg.segments_named("OBX"):
        vtype = seg.value(2)
        if vtype in _V2_TEXT:
            tree = seg.field(5)
            reps = tree if isinstance(tree, list) else [tree]
            for rep in reps:
                lines.append(_flatten(rep))
        elif vtype == "ED" and seg.value(5, comp=3).upper() in ("TEXT", "PLAIN"):
            if seg.value(5, comp=4).upper() == "BASE64":
                lines.append(_b64text(seg.value(5, comp=5), f"{name} OBX-5.5"))
            else:
                lines.append(seg.value(5, comp=5))
    text = "\n".join(x for x in lines if x)
    if not text.strip():
        return
    resources = [e["resource"] for e in conv.bundle.get("entry", ())]
    patients = [r for r in resources if r.get("resourceType") == "Patient"]
    if not patients:
        raise NoteError("the message names no patient", f"{name} PID", "add a PID segment")
    subj = {"reference": f"Patient/{patients[0]['id']}"}
    date = None
    encounter = None
    for r in resources:
        if r.get("resourceType") == "DocumentReference":
            date = date or r.get("date")
        if r.get("resourceType") == "Encounter" and encounter is None:
            encounter = f"Encounter/{r['id']}"
    doc = _made_docref(
        text, subj, seed=f"v2|{msg.control_id}", date=date, encounter=encounter, title=None
    )
    doc["type"] = {"text": "Clinical note from HL7 v2 " + msg.message_code + " OBX text"}
    yield Note(text, doc, subj, (), date, encounter, carry=[patients[0]])


def _flatten(node: Any) -> str:
    if isinstance(node, str):
        return node
    if isinstance(node, (list, tuple)):
        return "^".join(_flatten(n) for n in node)
    return str(node)


def _from_ccda(data: bytes, name: str, sections: frozenset[str]) -> Iterator[Note]:
    from lxml import etree

    from fhirtwin import ccda

    try:
        bundle = ccda.convert(data, source=name)
    except ccda.CcdaError as exc:
        raise NoteError(str(exc), name) from exc
    resources = [e["resource"] for e in bundle.get("entry", ())]
    patients = [r for r in resources if r.get("resourceType") == "Patient"]
    if not patients:
        return
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
    root = etree.fromstring(data, parser)
    ns = {"v3": "urn:hl7-org:v3"}
    parts: list[str] = []
    for sec in root.iterfind(".//v3:section", ns):
        code = sec.find("v3:code", ns)
        if code is None or code.get("code") not in sections:
            continue
        title = sec.findtext("v3:title", default="", namespaces=ns).strip()
        body = sec.find("v3:text", ns)
        words = " ".join("".join(body.itertext()).split()) if body is not None else ""
        if words:
            parts.append(f"{(title or code.get('displayName') or 'SECTION').upper()}:\n{words}")
    if not parts:
        return
    text = "\n\n".join(parts)
    subj = {"reference": f"Patient/{patients[0]['id']}"}
    comp: dict[str, Any] = next(
        (r for r in resources if r.get("resourceType") == "Composition"), {}
    )
    date = comp.get("date")
    doc = _made_docref(text, subj, seed=f"ccda|{name}|{comp.get('id')}", date=date)
    doc["type"] = {"text": "Narrative sections of " + str(comp.get("title") or "a C-CDA document")}
    yield Note(text, doc, subj, (), date, carry=[patients[0]])


def _from_text(data: bytes, name: str, patient: str | None) -> Iterator[Note]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NoteError(
            f"not UTF-8 (byte {exc.start})", name, "save the note as UTF-8 text"
        ) from exc
    text = text.removeprefix("\ufeff")
    headers: dict[str, str] = {}
    lines = text.split("\n")
    i = 0
    while i < len(lines) and (m := _HEADER.match(lines[i].strip())):
        headers[m[1].lower()] = m[2].strip()
        i += 1
    if headers and i < len(lines) and not lines[i].strip():
        text = "\n".join(lines[i + 1 :])
    elif headers:
        raise NoteError(
            "the header block must end with a blank line",
            f"{name} line {i + 1}",
            "put an empty line between the headers and the note",
        )
    who = patient or headers.get("patient") or headers.get("patient-identifier")
    if not who:
        raise NoteError(
            "no patient for this note",
            name,
            "give --patient Patient/<id> (or system|value), or start the file with a "
            "'Patient: Patient/<id>' line and a blank line",
        )
    subj, idents = _patient_arg(who, f"{name} Patient header")
    date = headers.get("date")
    if date:
        from fhirtwin.twin import fhir_time_ms

        if fhir_time_ms(date) is None:
            raise NoteError(
                f"Date {date!r} is not a FHIR date",
                f"{name} line 1-{i}",
                "write e.g. 2024-05-01 or 2024-05-01T10:00:00Z",
            )
    enc = headers.get("encounter")
    if enc and not enc.startswith("Encounter/"):
        enc = f"Encounter/{enc}"
    doc = _made_docref(
        text, subj, seed=f"text|{who}", date=date, title=headers.get("title"), encounter=enc
    )
    yield Note(text, doc, subj, idents, date, enc)


def read_notes(
    data: bytes, name: str = "<note>", *, patient: str | None = None, nlp_dir: Path | None = None
) -> list[Note]:
    """Every note in one input (see the module docstring for the forms taken)."""
    head = data.lstrip()[:512]
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    if head.startswith(b"{"):
        lines = [ln for ln in data.splitlines() if ln.strip()]
        objs: list[tuple[Any, str]] = []
        try:
            objs = [(orjson.loads(data), "")]
        except orjson.JSONDecodeError:
            for n, ln in enumerate(lines, 1):
                try:
                    objs.append((orjson.loads(ln), f"line {n}"))
                except orjson.JSONDecodeError as exc:
                    raise NoteError(
                        f"not JSON ({exc})", f"{name} line {n}", "fix or remove that line"
                    ) from exc
        out: list[Note] = []
        for obj, where in objs:
            out += _from_json(obj, where, patient, seed=name)
        return out
    if head.startswith(b"MSH"):
        return list(_from_hl7v2(data, name))
    if head.startswith(b"<"):
        from fhirtwin.nlp import pipeline

        return list(_from_ccda(data, name, pipeline(nlp_dir).rules.ccda_sections))
    return list(_from_text(data, name, patient))


# -- FHIR out -----------------------------------------------------------------------


def _cc(concept: Any, text: str) -> dict[str, Any]:
    return {"coding": concept.codings(), "text": text}


def _source_ext(doc_ref: str, m: Any) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [
        {"url": "document", "valueReference": {"reference": doc_ref}},
        {"url": "start", "valueInteger": m.start},
        {"url": "end", "valueInteger": m.end},
        {"url": "text", "valueString": m.text},
    ]
    section = getattr(m, "section", None)
    if section is not None:
        parts.append({"url": "section", "valueString": section.category})
    return {"url": NOTE_SOURCE_URL, "extension": parts}


def _code(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    c = {"system": system, "code": code}
    if display:
        c["display"] = display
    return {"coding": [c]}


_CLIN = "http://terminology.hl7.org/CodeSystem/condition-clinical"
_VER = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
_AI_CLIN = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
_AI_VER = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"


def _dosage(sig: Any) -> dict[str, Any] | None:
    if sig is None:
        return None
    d: dict[str, Any] = {"text": sig.text}
    if sig.route:
        d["route"] = _code(SNOMED, sig.route[0], sig.route[1])
    if sig.frequency:
        d["timing"] = {"repeat": dict(sig.frequency)}
    if sig.as_needed:
        d["asNeededBoolean"] = True
    if sig.dose_value is not None:
        q: dict[str, Any] = {"value": sig.dose_value}
        if sig.dose_unit:
            q.update(unit=sig.dose_unit, system=UCUM, code=sig.dose_unit)
        d["doseAndRate"] = [{"doseQuantity": q}]
    return d


def _quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def note_resources(
    note: Note, analysis: Any, rules: Any, *, rules_version: str = ""
) -> list[dict[str, Any]]:
    """The note's DocumentReference, the resources its words assert, and a Provenance."""
    doc = note.document
    doc_id = str(doc["id"])
    doc_ref = f"DocumentReference/{doc_id}"
    meta = {"tag": [NLP_TAG]}
    subj = note.subject
    enc = {"reference": note.encounter} if note.encounter else None
    day = note.date
    # One resource per concept and assertion, listing every mention of it.
    made: dict[tuple[str, ...], dict[str, Any]] = {}
    said: dict[tuple[str, ...], list[Any]] = {}

    def first(key: tuple[str, ...], m: Any) -> bool:
        """Note mention ``m`` under ``key``; True when its resource is still to be made."""
        said.setdefault(key, []).append(m)
        return key not in made

    key: tuple[str, ...]
    for m in analysis.mentions:
        c = m.concept
        if m.hypothetical:
            continue
        if c.category in ("condition", "finding"):
            if m.family:
                if m.negated:
                    continue  # "no family history of X": FamilyMemberHistory cannot say so
                rel = rules.family_relations.get(m.relative or "", rules.default_relation)
                key = ("FamilyMemberHistory", rel[0], c.id)
                if first(key, m):
                    r: dict[str, Any] = {
                        "resourceType": "FamilyMemberHistory",
                        "status": "completed",
                        "patient": subj,
                        "relationship": _code(
                            "http://terminology.hl7.org/CodeSystem/v3-RoleCode", *rel
                        ),
                        "condition": [{"code": _cc(c, m.text)}],
                    }
                    if day:
                        r["date"] = day
                    made[key] = r
                continue
            if m.negated:
                ver = "refuted"
            elif m.uncertain:
                ver = "provisional"
            else:
                ver = "confirmed"
            when = "historical" if m.historical else "current"
            clin = rules.clinical_status.get(c.category, {}).get(when, "active")
            key = ("Condition", c.id, ver, clin)
            if first(key, m):
                r = {"resourceType": "Condition"}
                if ver != "refuted":
                    r["clinicalStatus"] = _code(_CLIN, clin)
                r["verificationStatus"] = _code(_VER, ver)
                r["category"] = [
                    _code(
                        "http://terminology.hl7.org/CodeSystem/condition-category",
                        "encounter-diagnosis" if enc else "problem-list-item",
                    )
                ]
                r["code"] = _cc(c, m.text)
                r["subject"] = subj
                if enc:
                    r["encounter"] = enc
                if day:
                    r["recordedDate"] = day
                r["evidence"] = [{"detail": [{"reference": doc_ref}]}]
                made[key] = r
        elif c.category in ("medication", "allergen"):
            if m.family:
                continue
            if m.allergy or c.category == "allergen":
                ver = "refuted" if m.negated else "unconfirmed" if m.uncertain else "confirmed"
                key = ("AllergyIntolerance", c.id, ver)
                if first(key, m):
                    r = {
                        "resourceType": "AllergyIntolerance",
                        # ait-1: a clinical status unless entered in error
                        "clinicalStatus": _code(
                            _AI_CLIN, "inactive" if ver == "refuted" else "active"
                        ),
                        "verificationStatus": _code(_AI_VER, ver),
                        "code": _cc(c, m.text),
                        "patient": subj,
                    }
                    if c.category == "medication":
                        r["category"] = ["medication"]
                    if enc:
                        r["encounter"] = enc
                    if day:
                        r["recordedDate"] = day
                    made[key] = r
                continue
            if m.negated:
                status = rules.medication_status.get("negated", "not-taken")
            elif m.planned:
                status = rules.medication_status.get("planned", "intended")
            elif m.historical:
                status = rules.medication_status.get("historical", "completed")
            else:
                status = rules.medication_status.get("current", "active")
            key = ("MedicationStatement", c.id, status, m.sig.text if m.sig is not None else "")
            if first(key, m):
                r = {
                    "resourceType": "MedicationStatement",
                    "status": status,
                    "medicationCodeableConcept": _cc(c, m.text),
                    "subject": subj,
                }
                if enc:
                    r["context"] = enc
                if day:
                    r["dateAsserted"] = day
                r["derivedFrom"] = [{"reference": doc_ref}]
                if (dose := _dosage(m.sig)) is not None:
                    r["dosage"] = [dose]
                made[key] = r
        elif c.category == "procedure":
            if m.family or m.negated or m.uncertain or m.planned:
                # "no evidence of pneumonia on chest x-ray" negates the finding, not the
                # x-ray; a possible or planned procedure is not a fact either
                continue
            key = ("Procedure", c.id, "completed")
            if first(key, m):
                r = {
                    "resourceType": "Procedure",
                    "status": "completed",
                    "code": _cc(c, m.text),
                    "subject": subj,
                }
                if enc:
                    r["encounter"] = enc
                made[key] = r

    out: list[dict[str, Any]] = []
    for key, res in made.items():
        res["id"] = str(uuid.uuid5(_NS, doc_id + "|" + "|".join(key)))
        res["meta"] = meta
        res["extension"] = [_source_ext(doc_ref, m) for m in said[key]]
        out.append(_ordered(res))
    for ms in analysis.measurements:
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "id": str(uuid.uuid5(_NS, f"{doc_id}|Observation|{ms.loinc}|{ms.start}")),
            "meta": meta,
            "extension": [_source_ext(doc_ref, ms)],
            "status": "final",
            "category": [
                _code(
                    "http://terminology.hl7.org/CodeSystem/observation-category",
                    *rules.observation_categories.get(ms.kind, ("vital-signs", "Vital Signs")),
                )
            ],
            "code": {
                "coding": [{"system": "http://loinc.org", "code": ms.loinc, "display": ms.display}],
                "text": ms.text,
            },
            "subject": subj,
        }
        if enc:
            obs["encounter"] = enc
        if day:
            obs["effectiveDateTime"] = day
        if ms.components:
            obs["component"] = [
                {
                    "code": {
                        "coding": [
                            {"system": "http://loinc.org", "code": p.loinc, "display": p.display}
                        ]
                    },
                    "valueQuantity": _quantity(p.value, p.unit),
                }
                for p in ms.components
            ]
        else:
            obs["valueQuantity"] = _quantity(ms.value, ms.unit)
        obs["derivedFrom"] = [{"reference": doc_ref}]
        out.append(obs)

    resources = [*note.carry, doc, *out]
    if out:
        recorded = day if day and "T" in day else None
        prov: dict[str, Any] = {
            "resourceType": "Provenance",
            "id": str(uuid.uuid5(_NS, f"{doc_id}|Provenance|{rules_version}")),
            "meta": meta,
            "target": [{"reference": f"{r['resourceType']}/{r['id']}"} for r in out],
            "recorded": recorded or datetime.now(UTC).isoformat(timespec="seconds"),
            "policy": [f"urn:fhirtwin:nlp-rules:{rules_version}"] if rules_version else [],
            "activity": {"text": "clinical note NLP (medspaCy rules)"},
            "agent": [
                {
                    "type": _code(
                        "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                        "assembler",
                        "Assembler",
                    ),
                    "who": {"display": "fhirtwin note NLP"},
                }
            ],
            "entity": [{"role": "source", "what": {"reference": doc_ref}}],
        }
        if not prov["policy"]:
            del prov["policy"]
        resources.append(prov)
    return resources


_ORDER = (
    "resourceType",
    "id",
    "meta",
    "extension",
    "status",
    "clinicalStatus",
    "verificationStatus",
    "category",
)


def _ordered(res: dict[str, Any]) -> dict[str, Any]:
    head = {k: res[k] for k in _ORDER if k in res}
    return head | {k: v for k, v in res.items() if k not in head}


def rules_version(nlp_dir: Path) -> str:
    """sha256 (12 hex) over every rules file: which rules made a resource."""
    h = hashlib.sha256()
    for p in sorted(nlp_dir.rglob("*")):
        if p.is_file() and p.suffix in (".yaml", ".yml", ".json", ".txt", ".tsv"):
            h.update(p.relative_to(nlp_dir).as_posix().encode())
            h.update(p.read_bytes())
    return "sha256:" + h.hexdigest()[:12]


_versions: dict[Path, str] = {}


def convert(
    data: bytes,
    *,
    source: str = "<note>",
    patient: str | None = None,
    validate: bool = False,
    nlp_dir: Path | None = None,
) -> list[tuple[Note, list[dict[str, Any]]]]:
    """Every note in ``data`` → (note, its resources). Raises NoteError."""
    from fhirtwin.nlp import pipeline

    pipe = pipeline(nlp_dir)
    version = _versions.get(pipe.nlp_dir) or _versions.setdefault(
        pipe.nlp_dir, rules_version(pipe.nlp_dir)
    )
    notes = read_notes(data, source, patient=patient, nlp_dir=nlp_dir)
    out = []
    for note, analysis in zip(notes, pipe.analyse_many(n.text for n in notes), strict=True):
        resources = note_resources(note, analysis, pipe.rules, rules_version=version)
        if validate:
            from fhirtwin.validation import validate_resource

            for i, r in enumerate(resources):
                problems = validate_resource(r)
                if problems:
                    raise NoteError(
                        f"FHIR R4 problem in {r['resourceType']}/{r.get('id')}: {problems[0]}",
                        f"{source} resource {i}",
                        "fix the rule in nlp/ that made it",
                    )
        out.append((note, resources))
    return out


def _bundle(resources: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            ({"fullUrl": f"urn:uuid:{r['id']}"} if _is_uuid(r["id"]) else {})
            | {
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for r in resources
        ],
    }


def _is_uuid(s: str) -> bool:
    try:
        uuid.UUID(s)
    except ValueError:
        return False
    return True


# -- pipeline and CLI ---------------------------------------------------------------


def convert_record(rec: bus.Record, validate: bool, mappings: Path | None) -> list[Any]:
    """One record on ``ehr.notes`` → one unit per note; raises SourceError."""
    from fhirtwin.normalize import Converted, SourceError
    from fhirtwin.twin import fhir_time_ms

    name = rec.header("fhirtwin-filename") or f"{rec.topic}/{rec.partition}/{rec.offset}"
    patient = rec.header("fhirtwin-patient") or None
    # set when a normalizer of another source forwarded the note: the identifiers the
    # MPI linked to the patient there, so the facts join that twin whatever the scope
    linked: tuple[str, ...] = ()
    if raw := rec.header("fhirtwin-patient-identifiers"):
        try:
            linked = tuple(str(i) for i in orjson.loads(raw))
        except orjson.JSONDecodeError:
            linked = ()
    try:
        converted = convert(rec.value, source=name, patient=patient, validate=validate)
    except NoteError as exc:
        stage = "validate" if "FHIR R4 problem" in exc.what else "parse"
        raise SourceError(stage, str(exc), exc.to_dict()) from exc
    units = []
    for note, resources in converted:
        units.append(
            Converted(
                resources,
                fhir_time_ms(note.date) if note.date else None,
                str(note.document["id"]),
                patient_identifiers=tuple(dict.fromkeys((*note.patient_identifiers, *linked))),
            )
        )
    return units


def convert_paths(
    inputs: list[str],
    out: Path | None,
    *,
    validate: bool,
    profile: str | None,
    console: Any,
    patient: str | None = None,
) -> int:
    """``fhirtwin convert --from note FILE... [--patient P] --out DIR``: a Bundle per note."""
    from fhirtwin.ingest import source_files

    files: list[tuple[str, bytes]] = []
    for p in inputs:
        if p == "-":
            files.append(("<stdin>", sys.stdin.buffer.read()))
        else:
            for f in source_files([p], "notes"):
                files.append((str(f), f.read_bytes()))
    failures = written = 0
    counts: dict[str, int] = {}
    for name, data in files:
        try:
            converted = convert(data, source=name, patient=patient, validate=validate)
        except NoteError as exc:
            failures += 1
            console.print(f"{name}: {exc}", style="red", markup=False)
            continue
        for note, resources in converted:
            for r in resources:
                counts[r["resourceType"]] = counts.get(r["resourceType"], 0) + 1
            bundle = orjson.dumps(_bundle(resources), option=orjson.OPT_INDENT_2)
            if out is None:
                sys.stdout.buffer.write(bundle + b"\n")
            else:
                out.mkdir(parents=True, exist_ok=True)
                stem = Path(name).stem if name != "<stdin>" else "stdin"
                (out / f"{stem}-{note.document['id'][:8]}.json").write_bytes(bundle)
            written += 1
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    console.print(
        f"{written} note(s) → FHIR ({summary or 'nothing'}); {failures} file(s) failed",
        markup=False,
        highlight=False,
    )
    return 1 if failures else 0
