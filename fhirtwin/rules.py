"""Load the HL7 v2 → FHIR rule files of ``mappings/`` into plain rule objects.

The files are data an integration engineer edits; this module only reads and
checks them, with errors that name the file and key. ``fhirtwin.mapping``
compiles the rules into the functions that run on the hot path. The file
format is documented in ``docs/mappings.md``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from fhirtwin import yamlfile

__all__ = [
    "CodeMap",
    "DatatypeRule",
    "FieldRule",
    "MappingError",
    "MessageEntry",
    "MessageRule",
    "RuleSet",
    "SegmentRule",
    "SenderProfile",
    "default_mappings_dir",
    "load_rules",
]


class MappingError(ValueError):
    """A rule file is wrong: says which file, which key, and what to do."""


_SEGMENT_NAME = re.compile(r"[A-Z][A-Z0-9]{2}")

FIELD_KEYS = frozenset(
    {
        "field", "comp", "sub", "width", "to", "type", "map", "system", "rep", "when",
        "value", "default", "ref", "link", "switch", "cases", "with", "note", "required",
        "unmapped", "format", "msh", "if_empty", "unless_has", "unique", "else_text",
        "else_absent",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class FieldRule:
    """One line of a segment or datatype rule: where a value comes from and where it goes."""

    source: str
    to: str | None = None
    field: int | None = None
    comp: int | None = None
    sub: int | None = None
    width: int | None = None
    type: str = "string"
    map: str | None = None
    system: str | None = None
    rep: str | None = None
    when: dict[str, Any] | None = None
    value: Any = None
    default: Any = None
    ref: str | None = None
    link: str | None = None
    switch: int | None = None
    cases: dict[str, FieldRule] | None = None
    with_: dict[str, Any] | None = None
    unmapped: str = "keep"
    format: str | None = None
    msh: int | None = None
    if_empty: bool = False
    # {path: a.b.c, value: X}: skip the line when the target already holds X at that path
    unless_has: tuple[str, str] | None = None
    unique: bool = False  # an appending line adds no element equal to one already there
    # a path for the text of a value that its type cannot read (a choice's string form,
    # Immunization.occurrenceString beside occurrenceDateTime): kept there, and reported
    else_text: str | None = None
    # a value its type cannot read marks the element absent instead: the data-absent-reason
    # extension (code 'error') on the primitive (Period.start → Period._start)
    else_absent: bool = False


@dataclass(frozen=True, slots=True)
class DatatypeRule:
    """A v2 datatype → FHIR datatype (or, with ``creates``, a resource and a Reference to it)."""

    name: str
    fhir: str
    components: tuple[FieldRule, ...]
    source: str
    required: tuple[str, ...] = ()
    creates: str | None = None
    id: str | dict[str, Any] = "identifier"


@dataclass(frozen=True, slots=True)
class SegmentRule:
    """A segment → elements of one resource."""

    name: str
    segment: str
    resource: str | None
    fields: tuple[FieldRule, ...]
    source: str
    id: str | dict[str, Any] = "identifier"
    # Fields that carry nothing for FHIR (set ids, the IG's "no target" rows): read on
    # purpose, so the loss report does not list them in every message.
    ignore: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class MessageEntry:
    """Which rule a segment of the message runs, and how its resource joins the others."""

    segment: str
    rule: str
    as_: str | None = None
    into: tuple[str, ...] = ()
    when: dict[str, Any] | None = None
    optional: bool = False  # with into: no target is fine (the field report still counts)


@dataclass(frozen=True, slots=True)
class MessageRule:
    name: str
    entries: tuple[MessageEntry, ...]
    source: str
    bundle: str = "batch"
    # segments a message of this type cannot do without → what each stands for
    # ("PID": "the patient the message is about"); one missing rejects the message
    requires: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class CodeMap:
    """An HL7 table (or local code list) → FHIR codes, like a ConceptMap group."""

    name: str
    source_system: str | None
    target_system: str | None
    map: dict[str, dict[str, str]]
    source: str

    def lookup(self, code: str) -> dict[str, str] | None:
        hit = self.map.get(code)
        if hit is None:
            hit = self.map.get(code.upper())
        return hit


@dataclass(frozen=True, slots=True)
class SenderProfile:
    """What we know about one sending system (chosen by MSH-3 / MSH-4)."""

    name: str
    source: str
    match_application: tuple[str, ...] = ()
    match_facility: tuple[str, ...] = ()
    timezone: str | None = None
    charset: str | None = None
    trust_msh18: bool = True
    zsegments: str = "keep"
    identifier_systems: dict[str, str] = field(default_factory=dict)
    system_base: str = "urn:fhirtwin:id:"
    code_maps: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    invalid_values: str = "drop"

    def matches(self, application: str, facility: str) -> bool:
        if not self.match_application and not self.match_facility:
            return False
        app_ok = not self.match_application or application in self.match_application
        fac_ok = not self.match_facility or facility in self.match_facility
        return app_ok and fac_ok


@dataclass(slots=True)
class RuleSet:
    """Every rule file of one mappings folder."""

    root: Path
    datatypes: dict[str, DatatypeRule]
    segments: dict[str, SegmentRule]
    messages: dict[str, MessageRule]
    codes: dict[str, CodeMap]
    senders: dict[str, SenderProfile]

    def sender_for(self, application: str, facility: str) -> SenderProfile:
        for profile in self.senders.values():
            if profile.name != "default" and profile.matches(application, facility):
                return profile
        return self.senders["default"]


def default_mappings_dir() -> Path:
    """``$FHIRTWIN_MAPPINGS``, else the ``mappings/`` folder shipped with the package."""
    env = os.environ.get("FHIRTWIN_MAPPINGS")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for candidate in (here / "mappings", here.parent / "mappings"):
        if candidate.is_dir():
            return candidate
    raise MappingError(
        "no mappings folder found: set FHIRTWIN_MAPPINGS to the folder that holds hl7v2/"
    )


def _read(path: Path) -> Any:
    try:
        with path.open("rb") as fh:
            return yamlfile.load(fh)
    except yaml.YAMLError as exc:
        raise MappingError(f"{path}: not valid YAML: {exc}") from None


def _field_rule(raw: Any, where: str) -> FieldRule:
    if not isinstance(raw, dict):
        raise MappingError(
            f"{where}: each rule must be a mapping like {{field: 3, to: identifier[]}}"
        )
    unknown = set(raw) - FIELD_KEYS
    if unknown:
        raise MappingError(
            f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(FIELD_KEYS)}"
        )
    cases = None
    if "cases" in raw:
        if "switch" not in raw:
            raise MappingError(f"{where}: 'cases' needs 'switch' (the field whose value chooses)")
        cases = {}
        for key, case in raw["cases"].items():
            merged = {k: v for k, v in raw.items() if k not in ("switch", "cases")}
            merged.update(case or {})
            for k in [k for k, v in merged.items() if v is None]:
                del merged[k]
            cases[str(key)] = _field_rule(merged, f"{where} case {key}")
    to = raw.get("to")
    if to is None and "link" not in raw and cases is None:
        raise MappingError(f"{where}: a rule needs 'to' (the FHIR element it fills)")
    sources = {"field", "comp", "default", "type", "format", "msh", "value", "ref", "link"}
    if cases is None and not sources & set(raw):
        raise MappingError(
            f"{where}: say where the value comes from: 'field', 'comp', 'value' or 'ref'"
        )
    rep = raw.get("rep")
    if rep not in (None, "first", "all"):
        raise MappingError(f"{where}: rep must be 'first' or 'all', not {rep!r}")
    return FieldRule(
        source=where,
        to=to,
        field=raw.get("field"),
        comp=raw.get("comp"),
        sub=raw.get("sub"),
        width=raw.get("width"),
        type=str(raw.get("type", "string")),
        map=raw.get("map"),
        system=raw.get("system"),
        rep=rep,
        when=raw.get("when"),
        value=raw.get("value"),
        default=raw.get("default"),
        ref=raw.get("ref"),
        link=raw.get("link"),
        switch=raw.get("switch"),
        cases=cases,
        with_=raw.get("with"),
        unmapped=str(raw.get("unmapped", "keep")),
        format=raw.get("format"),
        msh=raw.get("msh"),
        if_empty=bool(raw.get("if_empty", False)),
        unless_has=_unless_has(raw.get("unless_has"), where),
        unique=bool(raw.get("unique", False)),
        else_text=raw.get("else_text"),
        else_absent=bool(raw.get("else_absent", False)),
    )


def _unless_has(raw: Any, where: str) -> tuple[str, str] | None:
    """`unless_has: {path: identifier.type.coding.code, value: PLAC}` → (path, value)."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"path", "value"}:
        raise MappingError(f"{where}: unless_has needs exactly `path` and `value`")
    return str(raw["path"]), str(raw["value"])


def _id_mode(raw: Any, where: str) -> str | dict[str, Any]:
    """`id:` is identifier | content | message, or {keys: [paths], identifier: true|false}."""
    if isinstance(raw, str) and raw in ("identifier", "content", "message"):
        return raw
    if isinstance(raw, dict) and isinstance(raw.get("keys"), list) and raw["keys"]:
        if set(raw) - {"keys", "identifier"}:
            raise MappingError(f"{where}: id: takes only 'keys' and 'identifier'")
        return {
            "keys": [str(k) for k in raw["keys"]],
            "identifier": bool(raw.get("identifier", True)),
        }
    raise MappingError(
        f"{where}: id must be identifier, content, message or {{keys: [path, ...]}}, not {raw!r}"
    )


def _load_datatype(path: Path) -> DatatypeRule:
    raw = _read(path)
    where = str(path)
    for key in ("datatype", "fhir", "components"):
        if key not in raw:
            raise MappingError(f"{where}: missing '{key}'")
    comps = tuple(
        _field_rule(c, f"{where} components[{i}]") for i, c in enumerate(raw["components"])
    )
    return DatatypeRule(
        name=path.stem,
        fhir=raw["fhir"],
        components=comps,
        source=where,
        required=tuple(raw.get("required", ())),
        creates=raw.get("creates"),
        id=_id_mode(raw.get("id", "identifier"), where),
    )


def _load_segment(path: Path) -> SegmentRule:
    raw = _read(path)
    where = str(path)
    if "segment" not in raw:
        raise MappingError(f"{where}: missing 'segment' (the v2 segment this file reads)")
    fields = tuple(
        _field_rule(f, f"{where} fields[{i}]") for i, f in enumerate(raw.get("fields", []))
    )
    ignore = raw.get("ignore", []) or []
    if not isinstance(ignore, list) or not all(isinstance(n, int) for n in ignore):
        raise MappingError(f"{where}: ignore must be a list of field numbers, e.g. [1]")
    return SegmentRule(
        name=path.stem,
        segment=raw["segment"],
        resource=raw.get("resource"),
        fields=fields,
        source=where,
        id=_id_mode(raw.get("id", "identifier"), where),
        ignore=tuple(ignore),
    )


def _load_message(path: Path, raw_all: dict[str, Any], seen: tuple[str, ...] = ()) -> MessageRule:
    raw = raw_all[path.stem]
    where = str(path)
    if not isinstance(raw, dict):
        raise MappingError(f"{where}: expected a mapping with 'extends' and/or 'segments'")
    entries: list[MessageEntry] = []
    requires: dict[str, str] = {}
    base = raw.get("extends")
    if base:
        if base not in raw_all:
            raise MappingError(f"{where}: extends {base!r}, but there is no messages/{base}.yaml")
        if base in seen:
            raise MappingError(f"{where}: 'extends' loops through {' → '.join(seen)}")
        parent = _load_message(path.with_name(base + ".yaml"), raw_all, (*seen, path.stem))
        entries.extend(parent.entries)
        requires.update(parent.requires)
    own = raw.get("requires") or {}
    if not isinstance(own, dict) or not all(
        isinstance(k, str) and _SEGMENT_NAME.fullmatch(k) and isinstance(v, str) and v.strip()
        for k, v in own.items()
    ):
        raise MappingError(
            f"{where} requires: expected segment names, each with what it stands for, "
            "e.g. 'PID: the patient the message is about'"
        )
    requires.update(own)
    listed = raw.get("segments") or []  # "segments:" with nothing under it: none of its own
    if not isinstance(listed, list):
        raise MappingError(f"{where} segments: expected a list of entries, one per '- {{…}}'")
    for i, e in enumerate(listed):
        w = f"{where} segments[{i}]"
        if not isinstance(e, dict) or "segment" not in e or "rule" not in e:
            raise MappingError(f"{w}: each entry needs 'segment' and 'rule'")
        into = e.get("into") or ()
        if isinstance(into, str):
            into = (into,)
        entries.append(
            MessageEntry(
                segment=e["segment"],
                rule=e["rule"],
                as_=e.get("as"),
                into=tuple(into),
                when=e.get("when"),
                optional=bool(e.get("optional", False)),
            )
        )
    drop = set(raw.get("drop", ()))
    if drop:
        entries = [e for e in entries if e.rule not in drop and e.segment not in drop]
    return MessageRule(
        path.stem, tuple(entries), where, raw.get("bundle", "batch"), tuple(requires.items())
    )


def _load_codes(path: Path) -> CodeMap:
    raw = _read(path)
    where = str(path)
    if "map" not in raw:
        raise MappingError(f"{where}: missing 'map' (source code → target code)")
    target = raw.get("target")
    out: dict[str, dict[str, str]] = {}
    for code, val in (raw["map"] or {}).items():
        if isinstance(val, str):
            entry = {"code": val}
        elif isinstance(val, dict):
            entry = {k: str(v) for k, v in val.items()}
        else:
            raise MappingError(
                f"{where}: map[{code!r}] must be a code or {{code, display, system}}"
            )
        if target and "system" not in entry:
            entry["system"] = target
        out[str(code)] = entry
    return CodeMap(path.stem, raw.get("source"), target, out, where)


def _load_sender(path: Path) -> SenderProfile:
    raw = _read(path) or {}
    where = str(path)
    match = raw.get("match", {}) or {}

    def _tuple(v: Any) -> tuple[str, ...]:
        if v is None:
            return ()
        return (v,) if isinstance(v, str) else tuple(str(x) for x in v)

    zpolicy = raw.get("zsegments", "keep")
    if zpolicy not in ("keep", "ignore", "reject"):
        raise MappingError(f"{where}: zsegments must be keep, ignore or reject")
    invalid = raw.get("invalid_values", "drop")
    if invalid not in ("drop", "reject"):
        raise MappingError(f"{where}: invalid_values must be drop or reject")
    code_maps = {}
    for name, table in (raw.get("code_maps") or {}).items():
        code_maps[name] = {
            str(k): ({"code": v} if isinstance(v, str) else {a: str(b) for a, b in v.items()})
            for k, v in table.items()
        }
    return SenderProfile(
        name=path.stem,
        source=where,
        match_application=_tuple(match.get("application")),
        match_facility=_tuple(match.get("facility")),
        timezone=raw.get("timezone"),
        charset=raw.get("charset"),
        trust_msh18=bool(raw.get("trust_msh18", True)),
        zsegments=zpolicy,
        identifier_systems={
            str(k): str(v) for k, v in (raw.get("identifier_systems") or {}).items()
        },
        system_base=raw.get("system_base", "urn:fhirtwin:id:"),
        code_maps=code_maps,
        invalid_values=invalid,
    )


@lru_cache(maxsize=8)
def load_rules(root: Path | None = None) -> RuleSet:
    """Read every rule file under ``root`` (default: ``default_mappings_dir()``)."""
    root = Path(root) if root else default_mappings_dir()
    v2 = root / "hl7v2"
    if not v2.is_dir():
        raise MappingError(f"{root}: no hl7v2/ folder of rules here")

    def _files(sub: str) -> list[Path]:
        return sorted((v2 / sub).glob("*.yaml"))

    datatypes = {p.stem: _load_datatype(p) for p in _files("datatypes")}
    segments = {p.stem: _load_segment(p) for p in _files("segments")}
    raw_messages = {p.stem: _read(p) or {} for p in _files("messages")}
    messages = {
        name: _load_message(v2 / "messages" / f"{name}.yaml", raw_messages)
        for name in raw_messages
        if not name.startswith("_")
    }
    codes = {p.stem: _load_codes(p) for p in _files("codes")}
    senders_dir = root / "senders"
    senders = {p.stem: _load_sender(p) for p in sorted(senders_dir.glob("*.yaml"))}
    if "default" not in senders:
        raise MappingError(f"{senders_dir}: a default.yaml sender profile is required")
    for msg in messages.values():
        for e in msg.entries:
            if e.rule not in segments:
                raise MappingError(
                    f"{msg.source}: rule {e.rule!r} has no file segments/{e.rule}.yaml"
                )
    return RuleSet(root, datatypes, segments, messages, codes, senders)
