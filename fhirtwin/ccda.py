"""C-CDA documents → FHIR R4: one batch Bundle per document, rules as data.

The rules live in ``mappings/ccda/`` (see docs/sources-ccda.md): ``oids.yaml`` maps code
system and identifier OIDs to FHIR URIs, ``codes.yaml`` holds the value maps, and every
other ``*.yaml`` file holds rules. A rule says which C-CDA template (or which named
participant, e.g. an ``assignedAuthor``) becomes which FHIR resource, and how each FHIR
element is read from the XML, with paths relative to the matched element::

    - name: problem-observation
      template: 2.16.840.1.113883.10.20.22.4.4
      resource: Condition
      elements:
        code: {path: value, as: concept}
        onsetDateTime: {path: effectiveTime/low, as: dateTime}
        subject: {patient: true}

The engine walks every section's entries; each element whose ``templateId`` has a rule
becomes a resource (the first rule whose ``when`` holds). The datatypes' semantics (CD →
CodeableConcept with translations and narrative ``originalText`` references, TS with
every precision and offset, IVL_TS / PIVL_TS, PQ, II, PN, AD, TEL, ED, nullFlavor) are
code here, once; what maps where is data.

Ids are stable: a resource made from an element with an ``id`` gets a uuid5 of the
resource type and that id, so the same problem in next month's CCD updates the same
resource in the twin. Elements without an id get a uuid5 of the document id and the
element's position.

Parsing is hardened: no DTD, no entity expansion, no network, bounded size and depth.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from lxml import etree

from fhirtwin import yamlfile
from fhirtwin.datatypes import to_datetime

__all__ = [
    "MAX_BYTES",
    "UNIDENTIFIED",
    "CcdaError",
    "Rules",
    "convert",
    "convert_paths",
    "convert_record",
    "load_rules",
]

ROOT = Path(__file__).resolve().parent.parent
V3 = "urn:hl7-org:v3"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
SDTC = "urn:hl7-org:sdtc"
XHTML = "http://www.w3.org/1999/xhtml"
PREFIXES = {"": V3, "xsi": XSI, "sdtc": SDTC}
NAMESPACE = uuid.UUID("6f1d3c1e-5b1a-4c8e-9a57-ccda0f41e2b1")
MAX_BYTES = 64 * 1024 * 1024  # the largest document the converter accepts
_NAMESPACE_BYTES = NAMESPACE.bytes
# meta.tag of the Patient made for a document with no recordTarget (see convert)
UNIDENTIFIED = {
    "system": "https://fhirtwin.dev/fhir/CodeSystem/tags",
    "code": "unidentified-patient",
    "display": "Placeholder: the source document names no patient",
}


def uuid5(name: str) -> str:
    """``str(uuid.uuid5(NAMESPACE, name))`` without building a ``uuid.UUID`` object on
    the way (one call per resource and per Bundle)."""
    h = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode()).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x50  # version 5
    h[8] = (h[8] & 0x3F) | 0x80  # RFC 4122 variant
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


_TEMPLATE = f"{{{V3}}}templateId"
_ID = f"{{{V3}}}id"
_XSI_TYPE = f"{{{XSI}}}type"


class CcdaError(ValueError):
    """A document that cannot be converted: what, where (line, XPath) and what to do."""

    def __init__(
        self, reason: str, *, line: int | None = None, xpath: str | None = None, hint: str = ""
    ) -> None:
        self.reason, self.line, self.xpath, self.hint = reason, line, xpath, hint
        self.source = "<document>"
        super().__init__(reason)

    def __str__(self) -> str:
        where = self.source
        if self.line:
            where += f":{self.line}"
        if self.xpath:
            where += f" ({self.xpath})"
        hint = f"; {self.hint}" if self.hint else ""
        return f"{where}: {self.reason}{hint}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.source, "error": self.reason}
        if self.line:
            out["line"] = self.line
        if self.xpath:
            out["xpath"] = self.xpath
        if self.hint:
            out["hint"] = self.hint
        return out


# -- paths -------------------------------------------------------------------------------

_STEP = re.compile(
    r"^(?P<name>\.\.|\.|\*|(?:[A-Za-z]+:)?[A-Za-z][\w.-]*)"
    r"(?P<preds>(?:\[@[\w:]+=(?:'[^']*'|\"[^\"]*\")\])*)"
    r"(?:\{(?P<tmpl>[\d.]+)\})?$"
)
_PRED = re.compile(r"\[@([\w:]+)=(?:'([^']*)'|\"([^\"]*)\")\]")


def _clark(name: str) -> str:
    prefix, _, local = name.rpartition(":")
    if prefix not in PREFIXES:
        raise ValueError(f"unknown namespace prefix {prefix!r} in {name!r}")
    ns = PREFIXES[prefix]
    return f"{{{ns}}}{local}" if ns and (prefix or not local.startswith("@")) else local


def _attr_name(name: str) -> str:
    prefix, _, local = name.rpartition(":")
    if not prefix:
        return local
    if prefix not in PREFIXES:
        raise ValueError(f"unknown namespace prefix {prefix!r} in {name!r}")
    return f"{{{PREFIXES[prefix]}}}{local}"


def has_template(el: Any, root: str) -> bool:
    return any(t.get("root") == root for t in el.iterchildren(_TEMPLATE))


@dataclass(frozen=True, slots=True)
class _Step:
    kind: str  # "child", "parent", "self"
    tag: str | None  # Clark name; None = any element
    preds: tuple[tuple[str, str], ...]
    template: str | None

    def apply(self, el: Any) -> Iterator[Any]:
        if self.kind == "self":
            yield el
            return
        if self.kind == "parent":
            p = el.getparent()
            if p is None:
                return
            if self.preds and any(p.get(a) != v for a, v in self.preds):
                return
            if self.template and not has_template(p, self.template):
                return
            yield p
            return
        it = el.iterchildren(self.tag) if self.tag else el.iterchildren(etree.Element)
        for c in it:
            if self.preds and any(c.get(a) != v for a, v in self.preds):
                continue
            if self.template and not has_template(c, self.template):
                continue
            yield c


@dataclass(frozen=True, slots=True)
class XPath:
    """A path relative to an element: ``step/step/@attr``. A step is a name (``code``,
    ``sdtc:raceCode``), ``*``, ``..`` or ``.``, with optional ``[@attr='v']`` filters
    and an optional ``{template-root}`` filter; the last step may be ``@attr``."""

    text: str
    steps: tuple[_Step, ...]
    attr: str | None
    # element → the elements the steps select, in document order: the steps fused into
    # one closure when the path is compiled (see _select)
    select: Callable[[Any], list[Any]] = field(default=lambda el: [el], compare=False)
    # the tag of a path that is one plain child step (``code``; ``*`` is etree.Element),
    # which the hot closures iterate with lxml directly
    child: Any = None

    def elements(self, el: Any) -> list[Any]:
        return self.select(el)

    def first(self, el: Any) -> Any:
        found = self.select(el)
        return found[0] if found else None

    def strings(self, el: Any) -> list[str]:
        """Attribute values (when the path ends in ``@attr``) or element texts."""
        out = []
        attr, child = self.attr, self.child
        for e in el.iterchildren(child) if child is not None else self.select(el):
            v = e.get(attr) if attr else _text(e)
            if v is not None:
                v = v.strip()
                if v:
                    out.append(v)
        return out


@functools.lru_cache(maxsize=4096)
def compile_path(text: str) -> XPath:
    parts = [p for p in text.strip().split("/") if p]
    attr = None
    if parts and parts[-1].startswith("@"):
        attr = _attr_name(parts.pop()[1:])
    steps = []
    for part in parts:
        m = _STEP.match(part)
        if not m:
            raise ValueError(f"bad path step {part!r} in {text!r}")
        name = m["name"]
        preds = tuple(
            (_attr_name(a), v1 if v1 is not None or v2 is None else v2)
            for a, v1, v2 in _PRED.findall(m["preds"] or "")
        )
        if name == "..":
            steps.append(_Step("parent", None, preds, m["tmpl"]))
        elif name == ".":
            steps.append(_Step("self", None, (), None))
        else:
            tag = None if name == "*" else _clark(name)
            steps.append(_Step("child", tag, preds, m["tmpl"]))
    moves = [s for s in steps if s.kind != "self"]
    child = (moves[0].tag or etree.Element) if len(moves) == 1 and _plain_child(moves[0]) else None
    return XPath(text, tuple(steps), attr, _select(moves), child)


def _plain_child(step: _Step) -> bool:
    return step.kind == "child" and not step.preds and not step.template


def _select(steps: list[_Step]) -> Callable[[Any], list[Any]]:
    """The steps of a path as one function element → list of elements. The common paths
    (one or two plain child steps: ``code``, ``effectiveTime/low``) are lxml's own
    ``iterchildren(tag)`` with no per-step Python in between."""
    if not steps:
        return lambda el: [el]
    if len(steps) == 1 and _plain_child(steps[0]):
        tag = steps[0].tag or etree.Element
        return lambda el: list(el.iterchildren(tag))
    if len(steps) == 2 and _plain_child(steps[0]) and _plain_child(steps[1]):
        tag1, tag2 = steps[0].tag or etree.Element, steps[1].tag or etree.Element
        return lambda el: [g for c in el.iterchildren(tag1) for g in c.iterchildren(tag2)]
    fns = [_step_fn(s) for s in steps]

    def select(el: Any) -> list[Any]:
        current = [el]
        for fn in fns:
            if len(current) == 1:
                current = list(fn(current[0]))
            else:
                current = [n for c in current for n in fn(c)]
            if not current:
                break
        return current

    return select


def _step_fn(step: _Step) -> Callable[[Any], Iterable[Any]]:
    if _plain_child(step):
        tag = step.tag or etree.Element
        return lambda el: el.iterchildren(tag)
    return step.apply


def _text(el: Any) -> str:
    """The element's text, whitespace collapsed."""
    if not len(el):  # a leaf (the usual case): its own text is all there is
        text = el.text
        return " ".join(text.split()) if text else ""
    return " ".join("".join(el.itertext()).split())


# -- rules -------------------------------------------------------------------------------


@dataclass
class Rule:
    name: str
    resource: str
    templates: tuple[str, ...]
    elements: dict[str, Any]
    when: Any = None
    consumes: tuple[str, ...] = ()
    id_path: str = "id"
    id_fallback: str = "position"  # or "content": participants without an id
    merge: bool = False  # same id = same thing, whatever else differs (participants)
    file: str = ""
    # the elements and ``when`` compiled to closures on first use (see _compile)
    fn: Callable[[Doc, Any], Any] | None = field(default=None, repr=False, compare=False)
    when_fn: Callable[[Doc, Any], bool] | None = field(default=None, repr=False, compare=False)


@dataclass
class Rules:
    """Everything in ``mappings/ccda/``: rules by name and by template, OIDs and maps."""

    by_name: dict[str, Rule]
    by_template: dict[str, list[Rule]]
    oids: dict[str, str]
    maps: dict[str, dict[str, Any]]
    document: dict[str, Any]
    root: Path = field(default_factory=Path)


class RulesError(ValueError):
    pass


def _walk_exprs(expr: Any, check: Callable[[Any], None]) -> None:
    check(expr)
    if isinstance(expr, dict):
        for v in expr.values():
            _walk_exprs(v, check)
    elif isinstance(expr, list):
        for v in expr:
            _walk_exprs(v, check)


def load_rules(mappings: Path | None = None) -> Rules:
    """Read and check ``mappings/ccda``; RulesError names the file and rule at fault."""
    root = (mappings or ROOT / "mappings") / "ccda"
    if not root.is_dir():
        raise RulesError(f"{root}: no C-CDA rules folder")

    def load(path: Path) -> Any:
        try:
            return yamlfile.load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise RulesError(f"{path}: {exc}") from exc

    oids_doc = load(root / "oids.yaml") or {}
    codes_doc = load(root / "codes.yaml") or {}
    document = load(root / "document.yaml") or {}
    oids = {str(k): str(v) for k, v in (oids_doc.get("oids") or {}).items()}
    maps = {
        str(k): {str(a): b for a, b in (v or {}).items()}
        for k, v in (codes_doc.get("maps") or {}).items()
    }
    by_name: dict[str, Rule] = {}
    by_template: dict[str, list[Rule]] = {}
    for path in sorted((root / "rules").glob("*.yaml")):
        doc = load(path) or {}
        for raw in doc.get("rules") or []:
            where = f"{path.name}: rule {raw.get('name', '?')!r}"
            if not isinstance(raw, dict) or not raw.get("name") or not raw.get("resource"):
                raise RulesError(f"{where}: a rule needs a name and a resource")
            if raw["name"] in by_name:
                raise RulesError(f"{where}: the name is used twice")
            tmpl = raw.get("template") or ()
            rule = Rule(
                name=str(raw["name"]),
                resource=str(raw["resource"]),
                templates=tuple(str(t) for t in ([tmpl] if isinstance(tmpl, str) else tmpl)),
                elements=raw.get("elements") or {},
                when=raw.get("when"),
                consumes=tuple(str(t) for t in raw.get("consumes") or ()),
                id_path=str(raw.get("id", "id")),
                id_fallback=str(raw.get("id-fallback", "position")),
                merge=bool(raw.get("merge", False)),
                file=path.name,
            )
            by_name[rule.name] = rule
            for t in rule.templates:
                by_template.setdefault(t, []).append(rule)
    rules = Rules(by_name, by_template, oids, maps, document, root)

    def check(expr: Any) -> None:
        if not isinstance(expr, dict):
            return
        try:
            for key in ("path", "each"):
                if isinstance(expr.get(key), str):
                    compile_path(expr[key])
        except ValueError as exc:
            raise RulesError(f"bad path: {exc}") from exc
        if "make" in expr and expr["make"] not in by_name:
            raise RulesError(f"make: no rule named {expr['make']!r}")
        if "map" in expr and expr["map"] not in maps:
            raise RulesError(f"map: no table {expr['map']!r} in codes.yaml")
        if "as" in expr and expr["as"] not in CONVERTERS:
            raise RulesError(f"as: unknown datatype {expr['as']!r}")

    for rule in by_name.values():
        try:
            _walk_exprs(rule.elements, check)
            _walk_exprs(rule.when, check)
        except RulesError as exc:
            raise RulesError(f"{rule.file}: rule {rule.name!r}: {exc}") from exc
    for key in ("composition", "document-reference", "patient"):
        name = document.get(key)
        if name and name not in by_name:
            raise RulesError(f"document.yaml: {key}: no rule named {name!r}")
    return rules


_rules_cache: dict[Path, Rules] = {}


def rules_for(mappings: Path | None = None) -> Rules:
    key = (mappings or ROOT / "mappings").resolve()
    if key not in _rules_cache:
        _rules_cache[key] = load_rules(mappings)
    return _rules_cache[key]


# -- datatypes ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Choice:
    """A value whose FHIR element name depends on its type (``value[x]``)."""

    suffix: str
    value: Any


_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_OID = re.compile(r"^[0-2](\.(0|[1-9]\d*))+$")


class Doc:
    """One document being converted: its rules, narrative index, made resources."""

    def __init__(self, tree: Any, rules: Rules, source: str, data: bytes) -> None:
        self.tree, self.rules, self.source, self.data = tree, rules, source, data
        self.root = tree.getroot()
        self.narrative: dict[str, Any] = {}
        # libxml2 finds them, in document order ("//@ID/.." takes about 40 % of the time
        # of "//*[@ID]", which tests a predicate on every element)
        for el in self.root.xpath("//@ID/.."):
            ident = el.get("ID")
            if ident:
                self.narrative.setdefault(ident, el)
        doc_id = self.root.find(_ID)
        self.key = (
            f"{doc_id.get('root')}|{doc_id.get('extension') or ''}"
            if doc_id is not None and doc_id.get("root")
            else hashlib.sha256(data).hexdigest()
        )
        eff = self.root.find(f"{{{V3}}}effectiveTime")
        m = re.search(r"([+-]\d{4})$", (eff.get("value") or "") if eff is not None else "")
        self.default_offset = f"{m[1][:3]}:{m[1][3:]}" if m else None
        self.made: dict[tuple[str, Any], dict[str, Any]] = {}
        self.order: list[dict[str, Any]] = []
        self.by_id: dict[tuple[str, str], dict[str, Any]] = {}
        self.by_section: dict[Any, list[dict[str, Any]]] = {}
        self.section: Any = None
        self.patient_ref: dict[str, str] | None = None
        self.warnings: list[dict[str, Any]] = []
        self.unreadable = 0  # the first n warnings: values left out as unreadable (_finish)
        self.paths: dict[Any, str] = {}  # element → xpath_of, see Doc.xpath
        self.systems: dict[str, str | None] = {}  # OID → URI, see Doc.system

    def warn(self, el: Any, reason: str) -> None:
        """A value that cannot be read: left out of the output, and reported."""
        line, xpath = self.where(el)
        item = {"line": line, "xpath": xpath, "warning": reason}
        if item not in self.warnings:
            self.warnings.append(item)

    def where(self, el: Any) -> tuple[int | None, str]:
        return getattr(el, "sourceline", None), self.xpath(el)

    def xpath(self, el: Any) -> str:
        return xpath_of(el, self.paths)

    def error(self, el: Any, reason: str, hint: str = "") -> CcdaError:
        line, xpath = self.where(el)
        return CcdaError(reason, line=line, xpath=xpath, hint=hint)

    # - systems and identifiers

    def system(self, oid: str | None) -> str | None:
        """A code system or identifier OID → its FHIR URI (remembered: a document names
        the same few systems over and over)."""
        if not oid:
            return None
        try:
            return self.systems[oid]
        except KeyError:
            uri = self.systems[oid] = self._system(oid.strip())
            return uri

    def _system(self, oid: str) -> str | None:
        mapped = self.rules.oids.get(oid)
        if mapped:
            return mapped
        if _UUID.match(oid):
            return f"urn:uuid:{oid.lower()}"
        if _OID.match(oid):
            return f"urn:oid:{oid}"
        return oid if ":" in oid else None


def xpath_of(el: Any, cache: dict[Any, str] | None = None) -> str:
    """``/ClinicalDocument/component/structuredBody/component[3]/section/entry[2]/…``

    ``cache`` (element → its path) keeps the paths of the ancestors, which the elements
    of one section share."""
    if cache is not None:
        hit = cache.get(el)
        if hit is not None:
            return hit
    parent = el.getparent()
    name = el.tag.rpartition("}")[2]
    if parent is None:
        path = "/" + name
    else:
        same = list(parent.iterchildren(el.tag))
        if len(same) > 1:
            name += f"[{same.index(el) + 1}]"
        path = f"{xpath_of(parent, cache)}/{name}"
    if cache is not None:
        cache[el] = path
    return path


def conv_string(doc: Doc, el: Any) -> str | None:
    if el is None:
        return None
    ref = el.find(f"{{{V3}}}reference")
    text = _text(el)
    if not text and ref is not None:
        return narrative_text(doc, ref.get("value"))
    return text or None


def narrative_text(doc: Doc, value: str | None) -> str | None:
    if not value or not value.startswith("#"):
        return None
    target = doc.narrative.get(value[1:])
    return (_text(target) or None) if target is not None else None


def conv_coding(doc: Doc, el: Any) -> dict[str, Any] | None:
    code = (el.get("code") or "").strip() if el is not None else ""
    if not code:
        return None  # no code, or only blanks: FHIR's code holds no whitespace-only value
    out: dict[str, Any] = {}
    system = doc.system(el.get("codeSystem"))
    if system:
        out["system"] = system
    out["code"] = code
    if el.get("displayName"):
        out["display"] = " ".join(el.get("displayName").split())
    return out


def conv_concept(doc: Doc, el: Any) -> dict[str, Any] | None:
    """CD/CE/CV/CO → CodeableConcept: the code, each translation, originalText (its
    narrative reference resolved). A nullFlavor with nothing else → nothing."""
    if el is None:
        return None
    codings = []
    first = conv_coding(doc, el)
    if first:
        codings.append(first)
    for t in el.iterchildren(f"{{{V3}}}translation"):
        c = conv_coding(doc, t)
        if c and c not in codings:
            codings.append(c)
    text = None
    orig = el.find(f"{{{V3}}}originalText")
    if orig is not None:
        text = conv_string(doc, orig)
    if not codings and not text:
        return None
    out: dict[str, Any] = {}
    if codings:
        out["coding"] = codings
    if text:
        out["text"] = text
    return out


def conv_code(doc: Doc, el: Any) -> str | None:
    """The bare ``@code`` (for value maps and FHIR ``code`` elements)."""
    if el is None:
        return None
    code = el.get("code")
    return code.strip() if code else None


def _ts(doc: Doc, el: Any, attr: str = "value") -> str | None:
    if el is None:
        return None
    value = el.get(attr)
    if not value:
        return None
    try:
        text, _ = to_datetime(value, doc.default_offset)
    except ValueError as exc:
        if "no UTC offset" in str(exc):
            # FHIR needs an offset with a time; with none in the value nor the
            # document's own effectiveTime, the date is what can be said
            text, _ = to_datetime(value.strip()[:8], None)
            return text
        doc.warn(el, f"bad timestamp {value!r} left out: {exc}")
        return None
    return text


def conv_datetime(doc: Doc, el: Any) -> str | None:
    """TS (or an IVL_TS: its value, else low, else center) → dateTime."""
    if el is None:
        return None
    if el.get("value"):
        return _ts(doc, el)
    for part in ("low", "center"):
        sub = el.find(f"{{{V3}}}{part}")
        if sub is not None and sub.get("value"):
            return _ts(doc, sub)
    return None


def conv_date(doc: Doc, el: Any) -> str | None:
    value = conv_datetime(doc, el)
    return value[:10] if value else None


def conv_instant(doc: Doc, el: Any) -> str | None:
    value = conv_datetime(doc, el)
    return value if value and "T" in value else None


def conv_period(doc: Doc, el: Any) -> dict[str, Any] | None:
    if el is None:
        return None
    out = {}
    low, high = el.find(f"{{{V3}}}low"), el.find(f"{{{V3}}}high")
    if low is not None and low.get("value"):
        out["start"] = _ts(doc, low)
    elif el.get("value"):
        out["start"] = _ts(doc, el)
    if high is not None and high.get("value"):
        out["end"] = _ts(doc, high)
    return out or None


def conv_effective(doc: Doc, el: Any) -> Choice | None:
    """IVL_TS/TS → ``DateTime`` for a point in time, ``Period`` for low/high."""
    if el is None:
        return None
    if el.get("value"):
        return Choice("DateTime", _ts(doc, el))
    period = conv_period(doc, el)
    if period:
        return Choice("Period", period)
    center = el.find(f"{{{V3}}}center")
    if center is not None and center.get("value"):
        return Choice("DateTime", _ts(doc, center))
    return None


_UNITS = {
    "s": "s", "min": "min", "h": "h", "d": "d", "wk": "wk", "mo": "mo", "a": "a",
}  # fmt: skip


def conv_timing(doc: Doc, el: Any) -> dict[str, Any] | None:
    """PIVL_TS (a period: every 8 h) / EIVL_TS (an event: before breakfast) → Timing."""
    if el is None:
        return None
    xtype = (el.get(_XSI_TYPE) or "").split(":")[-1]
    if xtype == "PIVL_TS":
        period = el.find(f"{{{V3}}}period")
        if period is None or not period.get("value"):
            return None
        unit = _UNITS.get(period.get("unit") or "")
        if unit is None:
            return None
        repeat: dict[str, Any] = {"period": _number(period.get("value")), "periodUnit": unit}
        if el.get("institutionSpecified") == "true":
            repeat["frequency"] = 1
        return {"repeat": repeat}
    if xtype == "EIVL_TS":
        event = el.find(f"{{{V3}}}event")
        code = event.get("code") if event is not None else None
        return {"repeat": {"when": [code]}} if code else None
    return None


def _number(text: str | None) -> int | float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None  # 'nan', 'inf', '1e999': no FHIR decimal (the callers say so)
    return int(value) if value.is_integer() and "." not in text else value


def conv_quantity(doc: Doc, el: Any) -> dict[str, Any] | None:
    if el is None or el.get("value") is None:
        return None
    value = _number(el.get("value"))
    if value is None:
        # like an unreadable timestamp: left out and reported, the rest of the document
        # converts (an entry that then lacks what FHIR requires is left out in _finish)
        doc.warn(el, f"bad quantity value {el.get('value')!r} left out: not a decimal number")
        return None
    out: dict[str, Any] = {"value": value}
    unit = el.get("unit")
    if unit and unit != "1":
        out.update(unit=unit, system="http://unitsofmeasure.org", code=unit)
    return out


def conv_range(doc: Doc, el: Any) -> dict[str, Any] | None:
    if el is None:
        return None
    out = {}
    for part in ("low", "high"):
        q = conv_quantity(doc, el.find(f"{{{V3}}}{part}"))
        if q:
            out[part] = q
    if not out and el.get("value"):
        q = conv_quantity(doc, el)
        return {"low": q, "high": q} if q else None
    return out or None


def conv_dose(doc: Doc, el: Any) -> dict[str, Any] | None:
    """IVL_PQ dose: its value, else low (a single dose is a Quantity in FHIR)."""
    if el is None:
        return None
    if el.get("value") is not None:
        return conv_quantity(doc, el)
    return conv_quantity(doc, el.find(f"{{{V3}}}low"))


def conv_value(doc: Doc, el: Any) -> Choice | None:
    """An observation's ``value`` by its xsi:type → value[x]."""
    if el is None:
        return None
    xtype = (el.get(_XSI_TYPE) or "").split(":")[-1]
    if xtype == "PQ":
        q = conv_quantity(doc, el)
        return Choice("Quantity", q) if q else None
    if xtype in ("CD", "CE", "CV", "CO", "CS"):
        c = conv_concept(doc, el)
        return Choice("CodeableConcept", c) if c else None
    if xtype in ("ST", "ED", "SC"):
        s = conv_string(doc, el)
        return Choice("String", s) if s else None
    if xtype == "INT":
        n = _number(el.get("value"))
        return Choice("Integer", int(n)) if n is not None else None
    if xtype == "REAL":
        n = _number(el.get("value"))
        return Choice("Quantity", {"value": n}) if n is not None else None
    if xtype == "BL":
        v = el.get("value")
        return Choice("Boolean", v == "true") if v in ("true", "false") else None
    if xtype == "IVL_PQ":
        r = conv_range(doc, el)
        return Choice("Range", r) if r else None
    if xtype in ("TS", "IVL_TS"):
        t = conv_datetime(doc, el)
        return Choice("DateTime", t) if t else None
    if xtype == "RTO_PQ_PQ" or xtype == "RTO":
        num = conv_quantity(doc, el.find(f"{{{V3}}}numerator"))
        den = conv_quantity(doc, el.find(f"{{{V3}}}denominator"))
        return Choice("Ratio", {"numerator": num, "denominator": den}) if num and den else None
    # no xsi:type: a coded value if it has a code, else its text
    c = conv_concept(doc, el)
    if c:
        return Choice("CodeableConcept", c)
    s = conv_string(doc, el)
    return Choice("String", s) if s else None


def conv_identifier(doc: Doc, el: Any) -> dict[str, Any] | None:
    """II → Identifier: root+extension → system+value; a root alone is itself the
    identifier (``urn:ietf:rfc:3986``, ``urn:uuid:``/``urn:oid:``)."""
    if el is None:
        return None
    root, ext = (el.get("root") or "").strip(), (el.get("extension") or "").strip()
    if not root and not ext:
        return None
    if ext:
        out = {"value": ext}
        system = doc.system(root)
        if system:
            out = {"system": system, "value": ext}
        return out
    if _UUID.match(root):
        return {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{root.lower()}"}
    if _OID.match(root):
        return {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:{root}"}
    return {"value": root}


def _map(doc: Doc, table: str, code: str | None) -> Any:
    if code is None:
        return None
    return doc.rules.maps[table].get(code)


def conv_name(doc: Doc, el: Any) -> dict[str, Any] | None:
    if el is None or el.get("nullFlavor"):
        return None
    out: dict[str, Any] = {}
    use = _map(doc, "name-use", (el.get("use") or "").split(" ")[0] or None)
    if use:
        out["use"] = use
    family = [t for f in el.iterchildren(f"{{{V3}}}family") if (t := _text(f))]
    given = [t for g in el.iterchildren(f"{{{V3}}}given") if (t := _text(g))]
    prefix = [t for p in el.iterchildren(f"{{{V3}}}prefix") if (t := _text(p))]
    suffix = [t for s in el.iterchildren(f"{{{V3}}}suffix") if (t := _text(s))]
    if family:
        out["family"] = " ".join(family)
    if given:
        out["given"] = given
    if prefix:
        out["prefix"] = prefix
    if suffix:
        out["suffix"] = suffix
    if not (family or given) and _text(el):
        out["text"] = _text(el)
    return out if len(out) > ("use" in out) else None


def conv_address(doc: Doc, el: Any) -> dict[str, Any] | None:
    if el is None or el.get("nullFlavor"):
        return None
    out: dict[str, Any] = {}
    use = _map(doc, "address-use", (el.get("use") or "").split(" ")[0] or None)
    if use:
        out["use"] = use
    lines = [t for s in el.iterchildren(f"{{{V3}}}streetAddressLine") if (t := _text(s))]
    if lines:
        out["line"] = lines
    for tag, key in (
        ("city", "city"),
        ("county", "district"),
        ("state", "state"),
        ("postalCode", "postalCode"),
        ("country", "country"),
    ):
        sub = el.find(f"{{{V3}}}{tag}")
        if sub is not None and (text := _text(sub)):
            out[key] = text
    period = conv_period(doc, el.find(f"{{{V3}}}useablePeriod"))
    if period:
        out["period"] = period
    if len(out) == ("use" in out) and _text(el):
        out["text"] = _text(el)
    return out if len(out) > ("use" in out) else None


def conv_telecom(doc: Doc, el: Any) -> dict[str, Any] | None:
    if el is None or el.get("nullFlavor"):
        return None
    value = (el.get("value") or "").strip()
    if not value:
        return None
    scheme, _, rest = value.partition(":")
    system = {"tel": "phone", "mailto": "email", "fax": "fax", "http": "url", "https": "url"}
    out: dict[str, Any] = {}
    if scheme.lower() in system and rest:
        out["system"] = system[scheme.lower()]
        out["value"] = value if out["system"] == "url" else rest.strip()
    else:
        out["system"], out["value"] = "other", value
    use = _map(doc, "telecom-use", (el.get("use") or "").split(" ")[0] or None)
    if use:
        out["use"] = use
    return out


def conv_narrative(doc: Doc, el: Any) -> dict[str, Any] | None:
    """A section's ``text`` (CDA narrative block) → a FHIR Narrative (XHTML div)."""
    if el is None or not (_text(el) or len(el)):
        return None
    out = [_DIV_OPEN]
    _narrative_into(el, out)
    xhtml = "".join(out) + "</div>" if len(out) > 1 else _DIV_OPEN[:-1] + "/>"
    return {"status": "generated", "div": xhtml}


_NARRATIVE_TAGS = {
    "paragraph": "p", "content": "span", "list": "ul", "item": "li", "table": "table",
    "thead": "thead", "tbody": "tbody", "tfoot": "tfoot", "tr": "tr", "th": "th",
    "td": "td", "caption": "caption", "colgroup": "colgroup", "col": "col", "br": "br",
    "sub": "sub", "sup": "sup", "footnote": "span", "footnoteRef": "span", "linkHtml": "a",
}  # fmt: skip
_KEEP_ATTRS = {"colspan", "rowspan", "align", "valign", "span", "width"}
_DIV_OPEN = f'<div xmlns="{XHTML}">'
# what libxml2 escapes when it serializes text and attribute values
_TEXT_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"})
_ATTR_ESCAPES = str.maketrans(
    {
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        '"': "&quot;",
        "\n": "&#10;",
        "\r": "&#13;",
        "\t": "&#9;",
    }
)


def _narrative_into(src: Any, out: list[str]) -> None:
    """The content of a CDA narrative element as XHTML markup, appended to ``out``.

    Written as text directly (what ``etree.tostring`` writes for the same XHTML tree,
    byte for byte: empty elements as ``<p/>``, the same escapes), a third faster than
    building the tree and serializing it."""
    if src.text:
        out.append(src.text.translate(_TEXT_ESCAPES))
    for child in src:
        if isinstance(child.tag, str):
            local = child.tag.rpartition("}")[2]
            tag = _NARRATIVE_TAGS.get(local)
            if tag is None:  # renderMultiMedia and unknown markup: keep the text only
                tag = "span"
                out.append("<span")
            else:
                if local == "list" and child.get("listType") == "ordered":
                    tag = "ol"
                out.append("<" + tag)
                for a, v in child.attrib.items():
                    if a == "ID":
                        a = "id"
                    elif a == "styleCode":
                        a = "class"
                    elif not (
                        a in _KEEP_ATTRS
                        or (
                            a == "href"
                            and local == "linkHtml"
                            and not v.lower().startswith("javascript")
                        )
                    ):
                        continue
                    out.append(f' {a}="{v.translate(_ATTR_ESCAPES)}"')
            if tag == "br":
                out.append("/>")
            else:
                start = len(out)
                out.append(">")
                _narrative_into(child, out)
                if len(out) == start + 1:  # nothing inside
                    out[start] = "/>"
                else:
                    out.append(f"</{tag}>")
        # a comment or processing instruction (the parser drops them) leaves its tail
        if child.tail:
            out.append(child.tail.translate(_TEXT_ESCAPES))


def conv_attachment(doc: Doc, el: Any) -> dict[str, Any] | None:
    """ED (e.g. a nonXMLBody's text) → Attachment: inline data or a reference URL."""
    if el is None:
        return None
    out: dict[str, Any] = {"contentType": el.get("mediaType") or "text/plain"}
    ref = el.find(f"{{{V3}}}reference")
    if el.get("representation") == "B64":
        raw = "".join((el.text or "").split())
        try:
            base64.b64decode(raw, validate=True)
        except ValueError as exc:
            raise doc.error(el, "embedded content is not valid base64", "re-export it") from exc
        out["data"] = raw
    elif ref is not None and ref.get("value"):
        out["url"] = ref.get("value")
    elif _text(el):
        out["data"] = base64.b64encode(_text(el).encode()).decode()
    else:
        return None
    return out


def conv_bool(doc: Doc, el: Any) -> bool | None:
    v = el.get("value") if el is not None else None
    return {"true": True, "false": False}.get(v or "")


def conv_integer(doc: Doc, el: Any) -> int | None:
    n = _number(el.get("value")) if el is not None else None
    return int(n) if n is not None else None


def conv_refills(doc: Doc, el: Any) -> int | None:
    """A supply order's ``repeatNumber`` (how many times it may be dispensed, the first
    fill included) → ``numberOfRepeatsAllowed`` (refills: dispenses after the first)."""
    n = conv_integer(doc, el)
    return max(n - 1, 0) if n is not None else None


def conv_id(doc: Doc, el: Any) -> str | None:
    ident = conv_identifier(doc, el)
    return ident["value"] if ident else None


CONVERTERS: dict[str, Callable[[Doc, Any], Any]] = {
    "string": conv_string,
    "code": conv_code,
    "coding": conv_coding,
    "concept": conv_concept,
    "dateTime": conv_datetime,
    "date": conv_date,
    "instant": conv_instant,
    "period": conv_period,
    "effective": conv_effective,
    "timing": conv_timing,
    "quantity": conv_quantity,
    "range": conv_range,
    "dose": conv_dose,
    "value": conv_value,
    "identifier": conv_identifier,
    "name": conv_name,
    "address": conv_address,
    "telecom": conv_telecom,
    "narrative": conv_narrative,
    "attachment": conv_attachment,
    "boolean": conv_bool,
    "integer": conv_integer,
    "idvalue": conv_id,
    "refills": conv_refills,
}


# -- evaluation --------------------------------------------------------------------------


_CONTAINERS = (str, list, dict)


def _empty(v: Any) -> bool:
    """None, "", [] or {} (but not 0 or False)."""
    return v is None or (not v and isinstance(v, _CONTAINERS))


Fn = Callable[["Doc", Any], Any]
_compiled: dict[int, tuple[Any, Any]] = {}  # id(expression) → (expression, closure)


def _cond(doc: Doc, el: Any, cond: Any) -> bool:
    """``{exists: P}``, ``{path: P, in: [...]}``/``eq``, ``{not: C}``, ``{all: []}``,
    ``{any: []}``, ``{template: ROOT}`` (the element itself has that template),
    ``{tag: NAME}`` (the element's own name, e.g. ``procedure`` or ``observation``)."""
    if cond is None:
        return True
    hit = _compiled.get(id(cond))
    if hit is None or hit[0] is not cond:
        hit = _compiled[id(cond)] = (cond, _compile_cond(cond))
    return bool(hit[1](doc, el))


def _true(doc: Doc, el: Any) -> bool:
    return True


def _compile_cond(cond: Any) -> Callable[[Doc, Any], bool]:
    """A condition (see ``_cond``) → a closure ``(doc, el) -> bool``, built once per rule."""
    if cond is None:
        return _true
    if isinstance(cond, list):
        parts = [_compile_cond(c) for c in cond]
        return lambda doc, el: all(p(doc, el) for p in parts)
    if "not" in cond:
        inner = _compile_cond(cond["not"])
        return lambda doc, el: not inner(doc, el)
    if "all" in cond:
        parts = [_compile_cond(c) for c in cond["all"]]
        return lambda doc, el: all(p(doc, el) for p in parts)
    if "any" in cond:
        parts = [_compile_cond(c) for c in cond["any"]]
        return lambda doc, el: any(p(doc, el) for p in parts)
    if "template" in cond:
        root = str(cond["template"])
        return lambda doc, el: has_template(el, root)
    if "tag" in cond:
        tag = cond["tag"]
        return lambda doc, el: bool(el.tag.rpartition("}")[2] == tag)
    if "exists" in cond:
        path = compile_path(cond["exists"])
        if path.attr:
            return lambda doc, el: bool(path.strings(el))
        select = path.select
        return lambda doc, el: bool(select(el))
    path = compile_path(cond["path"])
    if "in" in cond:
        allowed = frozenset(str(x) for x in cond["in"])
        return lambda doc, el: any(v in allowed for v in path.strings(el))
    if "eq" in cond:
        want = str(cond["eq"])
        return lambda doc, el: want in path.strings(el)
    return lambda doc, el: bool(path.strings(el))


def evaluate(doc: Doc, el: Any, expr: Any) -> Any:
    """One rule expression at element ``el`` → a JSON value (None when empty)."""
    hit = _compiled.get(id(expr))
    if hit is None or hit[0] is not expr:
        hit = _compiled[id(expr)] = (expr, _compile(expr))
    return hit[1](doc, el)


def _compile(expr: Any) -> Fn:
    """A rule expression → a closure ``(doc, el) -> JSON value`` (None when empty).

    The rules are read once and applied to every entry of every document, so each
    expression is turned into Python closures once (paths compiled, keys looked up,
    branches chosen) instead of being interpreted again at each element."""
    if isinstance(expr, (str, int, float, bool)) or expr is None:
        return lambda doc, el: expr
    if isinstance(expr, list):
        items = [
            (_compile(item), isinstance(item, dict) and bool(item.get("many") or "each" in item))
            for item in expr
        ]

        def seq(doc: Doc, el: Any) -> Any:
            out: list[Any] = []
            for fn, spread in items:
                v = fn(doc, el)
                if v is None:
                    continue
                if spread and isinstance(v, list):
                    out.extend(x for x in v if not _empty(x))
                elif v or not isinstance(v, _CONTAINERS):
                    out.append(v)
            return out or None

        return seq
    if not isinstance(expr, dict):
        raise TypeError(f"bad expression {expr!r}")
    if "const" in expr:
        const = expr["const"]
        return lambda doc, el: const
    if "if" in expr:
        test = _compile_cond(expr["if"])
        then, other = _compile(expr.get("then")), _compile(expr.get("else"))
        return lambda doc, el: then(doc, el) if test(doc, el) else other(doc, el)
    if "first" in expr:
        options = [_compile(o) for o in expr["first"]]

        def first(doc: Doc, el: Any) -> Any:
            for option in options:
                v = option(doc, el)
                if v is not None and (v or not isinstance(v, _CONTAINERS)):
                    return v
            return None

        return first
    if "ref" in expr:
        target = expr["ref"]

        def ref(doc: Doc, el: Any) -> Any:
            if target == "patient":
                return dict(doc.patient_ref) if doc.patient_ref else None
            if target == "section-entries":
                refs = [
                    {"reference": f"{r['resourceType']}/{r['id']}"}
                    for r in doc.by_section.get(el, [])
                ]
                return refs or None
            raise doc.error(el, f"ref: unknown target {target!r} (patient, section-entries)")

        return ref
    if "each" in expr:
        each = compile_path(expr["each"])
        when = _compile_cond(expr["when"]) if "when" in expr else None
        do = _compile(expr["do"])

        def each_fn(doc: Doc, el: Any) -> Any:
            items = []
            for sub in each.select(el):
                if when is not None and not when(doc, sub):
                    continue
                v = do(doc, sub)
                if v is not None and (v or not isinstance(v, _CONTAINERS)):
                    items.append(v)
            return items or None

        return each_fn
    if "make" in expr:
        name, targets_path, many = (
            expr["make"],
            compile_path(expr.get("path", ".")),
            expr.get("many"),
        )

        def make_fn(doc: Doc, el: Any) -> Any:
            refs = []
            rule = doc.rules.by_name[name]
            for t in targets_path.select(el):
                res = make(doc, rule, t)
                if res is not None:
                    refs.append({"reference": f"{res['resourceType']}/{res['id']}"})
                if not many:
                    break
            return (refs if many else refs[0]) if refs else None

        return make_fn
    if "map" in expr:
        table, map_path = expr["map"], compile_path(expr.get("path", "@code"))
        default = _compile(expr.get("default"))

        def map_fn(doc: Doc, el: Any) -> Any:
            values = doc.rules.maps[table]
            for value in map_path.strings(el):
                hit = values.get(value)
                if hit is not None:
                    return hit
            return default(doc, el)

        return map_fn
    if "join" in expr:
        parts, sep = [_compile(p) for p in expr["join"]], expr.get("sep", " ")

        def join(doc: Doc, el: Any) -> Any:
            got = [p(doc, el) for p in parts]
            return sep.join(str(p) for p in got if not _empty(p)) or None

        return join
    if "path" in expr:
        path, kind, many = compile_path(expr["path"]), expr.get("as"), expr.get("many")
        if kind is None:
            if many:
                return lambda doc, el: path.strings(el) or None

            def string(doc: Doc, el: Any) -> Any:
                values = path.strings(el)
                return values[0] if values else None

            if path.attr and not path.steps:  # an attribute of the element itself
                attr = path.attr

                def own_attr(doc: Doc, el: Any) -> Any:
                    v = el.get(attr)
                    return (v.strip() or None) if v else None

                return own_attr
            return string
        conv, select, child = CONVERTERS[kind], path.select, path.child
        if many:

            def convert_all(doc: Doc, el: Any) -> Any:
                found = el.iterchildren(child) if child is not None else select(el)
                out = [conv(doc, e) for e in found]
                out = [o for o in out if o is not None and (o or not isinstance(o, _CONTAINERS))]
                return out or None

            return convert_all

        def convert_one(doc: Doc, el: Any) -> Any:
            for e in el.iterchildren(child) if child is not None else select(el):
                v = conv(doc, e)
                if v is not None and (v or not isinstance(v, _CONTAINERS)):
                    return v
            return None

        return convert_one
    if "document" in expr:
        what = expr["document"]

        def document(doc: Doc, el: Any) -> Any:
            if what == "data":
                return base64.b64encode(doc.data).decode()
            if what == "hash":
                return base64.b64encode(hashlib.sha1(doc.data).digest()).decode()
            if what == "size":
                return len(doc.data)
            raise doc.error(el, f"document: unknown property {what!r}")

        return document
    # an object template: each key evaluated, empty ones dropped; ``_require`` names
    # keys without which the object means nothing (an extension without its value)
    keys = [
        (key, key[:-3] if key.endswith("[x]") else None, _compile(sub))
        for key, sub in expr.items()
        if key != "_require"
    ]
    required = expr.get("_require")
    needed = [required] if isinstance(required, str) else list(required or ())

    def obj_fn(doc: Doc, el: Any) -> Any:
        obj: dict[str, Any] = {}
        for key, stem, fn in keys:
            v = fn(doc, el)
            if v is None or (not v and isinstance(v, _CONTAINERS)):  # _empty, inlined
                continue
            if stem is not None:
                if isinstance(v, Choice):
                    if not _empty(v.value):
                        obj[stem + v.suffix] = v.value
                    continue
                raise doc.error(el, f"{key}: the expression gives no typed value")
            if isinstance(v, Choice):
                v = v.value
            obj[key] = v
        for key in needed:
            if key not in obj and not any(k.startswith(key) for k in obj if key.endswith("[x]")):
                return None
        return obj or None

    return obj_fn


def _resource_id(doc: Doc, rule: Rule, el: Any) -> str:
    for ident in compile_path(rule.id_path).elements(el):
        root = (ident.get("root") or "").strip()
        if root and not ident.get("nullFlavor"):
            key = f"{rule.resource}|{root}|{(ident.get('extension') or '').strip()}"
            return uuid5(key)
    if rule.id_fallback == "content":  # a participant without an id, met twice
        blob = re.sub(rb"\s+", b" ", etree.tostring(el, method="c14n"))
        digest = hashlib.sha256(blob.replace(b' xmlns="urn:hl7-org:v3"', b"")).hexdigest()
        return uuid5(f"{rule.resource}|{doc.key}|{digest}")
    return uuid5(f"{rule.resource}|{doc.key}|{doc.xpath(el)}")


def make(doc: Doc, rule: Rule, el: Any) -> dict[str, Any] | None:
    """The resource ``rule`` makes from ``el`` (made once per element and type).

    Two elements with the same ``id`` are one resource when they say the same thing
    (a practitioner who authors twice, a problem listed in two sections); when they
    differ (example documents reuse placeholder ids), the second gets an id of its own
    and both are kept."""
    key = (rule.resource, el)
    if key in doc.made:
        return doc.made[key]
    if rule.when is not None and not _rule_when(rule)(doc, el):
        return None
    rid = _resource_id(doc, rule, el)
    res: dict[str, Any] = {"resourceType": rule.resource, "id": rid}
    doc.made[key] = res  # before evaluating: a rule may refer back to itself
    if rule.fn is None:
        rule.fn = _compile(rule.elements)
    body = rule.fn(doc, el) or {}
    # looked up after the body: evaluating it may have made a resource with this id
    other = doc.by_id.get((rule.resource, rid))
    if other is not None and rule.merge:
        for k, v in body.items():
            other.setdefault(k, v)
        doc.made[key] = other
        return other
    if other is not None:
        if {k: v for k, v in other.items() if k != "id"} == {"resourceType": rule.resource, **body}:
            doc.made[key] = other
            return other
        rid = uuid5(f"{rid}|{doc.xpath(el)}")
        res["id"] = rid
    doc.by_id[(rule.resource, rid)] = res
    res.update(body)
    doc.order.append(res)
    return res


def _rule_when(rule: Rule) -> Callable[[Doc, Any], bool]:
    if rule.when_fn is None:
        rule.when_fn = _compile_cond(rule.when)
    return rule.when_fn


def _rule_for(doc: Doc, el: Any) -> Rule | None:
    for t in el.iterchildren(_TEMPLATE):
        for rule in doc.rules.by_template.get(t.get("root") or "", ()):
            if _rule_when(rule)(doc, el):
                return rule
    return None


_SECTION = f"{{{V3}}}section"


def _walk(doc: Doc, entry: Any, blocked: frozenset[str]) -> None:
    """Make the resources of the templated elements below ``entry``, in document order.

    Only an element with a ``templateId`` can match a rule, so the walk visits those (found
    by lxml's own iteration) rather than every element. A rule's ``consumes`` blocks those
    templates anywhere below the element it matched; nested sections are walked on their
    own, so nothing inside one is visited here."""
    below: dict[Any, frozenset[str]] = {}  # element with a rule → what is blocked below it
    last = None
    for t in entry.iter(_TEMPLATE):
        el = t.getparent()
        if el is last or el is entry:
            continue
        last = el
        if el in below:
            continue
        here = blocked
        inside_section = el.tag == _SECTION
        p = el.getparent()
        while not inside_section and p is not None and p is not entry:
            got = below.get(p)
            if got is not None:
                here = got
                break
            if p.tag == _SECTION:
                inside_section = True
            p = p.getparent()
        if inside_section:
            continue
        rule = _rule_for(doc, el)
        if rule is None:
            continue
        roots = {x.get("root") for x in el.iterchildren(_TEMPLATE)}
        if not (roots & here):
            res = make(doc, rule, el)
            if res is not None and doc.section is not None:
                doc.by_section.setdefault(doc.section, []).append(res)
        below[el] = here | frozenset(rule.consumes)


def _sections(el: Any) -> Iterator[Any]:
    for comp in el.iterchildren(f"{{{V3}}}component"):
        for sec in comp.iterchildren(f"{{{V3}}}section"):
            yield sec
            yield from _sections(sec)


_DOCTYPE = re.compile(rb"<!DOCTYPE|<!ENTITY", re.IGNORECASE)


_ROOT_TAG = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?ClinicalDocument\b[^>]*>")


def _declare_namespaces(data: bytes) -> tuple[bytes, list[str]]:
    """Add the declarations a stubbed example leaves out (the HL7 v3 default namespace,
    ``xsi:``, ``sdtc:``) to the root start tag; returns the new bytes and what was added."""
    m = _ROOT_TAG.search(data)
    if not m:
        return data, []
    tag = m.group(0)
    added = []
    extra = b""
    if b"xmlns=" not in tag and tag.startswith(b"<ClinicalDocument"):
        extra += b' xmlns="urn:hl7-org:v3"'
        added.append("the HL7 v3 namespace")
    for prefix, uri in ((b"xsi", XSI.encode()), (b"sdtc", SDTC.encode())):
        if b"xmlns:" + prefix + b"=" not in tag and prefix + b":" in data:
            extra += b" xmlns:" + prefix + b'="' + uri + b'"'
            added.append(f"the {prefix.decode()}: prefix")
    if not extra:
        return data, []
    end = m.end() - (2 if tag.endswith(b"/>") else 1)
    return data[:end] + extra + data[end:], added


def parse(data: bytes, source: str = "<document>", warnings: list[str] | None = None) -> Any:
    """Bytes → lxml tree, refusing DTDs, entities, network access and huge input.

    A document that forgets to declare the HL7 v3 namespace or the ``xsi:``/``sdtc:``
    prefixes (the stubbed examples of the C-CDA guide do) is read with them declared,
    and ``warnings`` says so."""
    if len(data) > MAX_BYTES:
        raise CcdaError(
            f"document of {len(data):,} bytes is over the {MAX_BYTES:,}-byte limit",
            hint="split the export or raise fhirtwin.ccda.MAX_BYTES",
        )
    m = _DOCTYPE.search(data[:65536])
    if m:
        line = data[: m.start()].count(b"\n") + 1
        raise CcdaError(
            "DOCTYPE/ENTITY declarations are refused (no DTDs in C-CDA; entity expansion"
            " is an attack vector)",
            line=line,
            hint="remove the declaration",
        )
    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )
    try:
        root = etree.fromstring(data, parser)
        if root.tag == "ClinicalDocument":
            raise etree.XMLSyntaxError("no namespace", None, 0, 0)  # type: ignore[call-arg]
    except etree.XMLSyntaxError as exc:
        fixed, added = _declare_namespaces(data)
        retried: Any = None
        try:
            retried = etree.fromstring(fixed, parser) if added else None
        except etree.XMLSyntaxError:
            retried = None
        if retried is None:
            at = exc.position[0] if exc.position else None
            raise CcdaError(
                f"not well-formed XML: {exc.msg}", line=at, hint="fix the XML and resend"
            ) from exc
        root = retried
        if warnings is not None:
            warnings.append(f"the document does not declare {' and '.join(added)}: added")
    tree = etree.ElementTree(root)
    if root.tag != f"{{{V3}}}ClinicalDocument":
        raise CcdaError(
            f"the root element is {root.tag!r}, not ClinicalDocument in namespace {V3}",
            line=root.sourceline,
            xpath="/*",
            hint="send a complete C-CDA document",
        )
    return tree


def convert(
    data: bytes,
    *,
    source: str = "<document>",
    validate: bool = False,
    mappings: Path | None = None,
    warnings: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One C-CDA document → one FHIR R4 batch Bundle (PUT entries).

    Values that cannot be read (a malformed timestamp in one entry) are left out and
    appended to ``warnings`` (line, XPath, what) when a list is given: one bad value
    does not cost the rest of the patient's history.

    Raises CcdaError (what, line, XPath, what to do) for input that is not a C-CDA
    document or holds a value that cannot be read; with ``validate``, also for
    output that the R4 models reject (a rule to fix in mappings/ccda/).
    """
    try:
        notes: list[str] = []
        tree = parse(data, source, notes)
        rules = rules_for(mappings)
        doc = Doc(tree, rules, source, data)
        doc.warnings.extend({"warning": n} for n in notes)
        patient_rule = rules.by_name[rules.document["patient"]]
        target = compile_path(rules.document.get("patient-path", "recordTarget/patientRole"))
        pat_el = target.first(doc.root)
        if pat_el is None:
            # A document that names no one (the IG's example stubs): its content still
            # converts, about a placeholder Patient that identifies nobody and says so.
            patient = _unidentified_patient(doc)
            doc.order.append(patient)
            doc.warn(
                doc.root,
                f"the document has no {target.text}: its resources refer to "
                f"Patient/{patient['id']}, a placeholder tagged {UNIDENTIFIED['code']!r} "
                "that identifies nobody; the pipeline does not attribute such a document "
                "to a twin (add the recordTarget and send it again)",
            )
        else:
            # known before the patient is made: its guardians' RelatedPersons point back
            doc.patient_ref = {"reference": f"Patient/{_resource_id(doc, patient_rule, pat_el)}"}
            made = make(doc, patient_rule, pat_el)
            assert made is not None
            patient = made
        doc.patient_ref = {"reference": f"Patient/{patient['id']}"}
        body = doc.root.find(f"{{{V3}}}component/{{{V3}}}structuredBody")
        if body is not None:
            for sec in _sections(body):
                doc.section = sec
                for entry in sec.iterchildren(f"{{{V3}}}entry"):
                    _walk(doc, entry, frozenset())
            doc.section = None
        for key in ("composition", "document-reference"):
            name = rules.document.get(key)
            if name:
                make(doc, rules.by_name[name], doc.root)
    except CcdaError as exc:
        exc.source = source
        raise
    resources = _finish(doc)
    if warnings is not None:
        warnings.extend(doc.warnings)
    bundle = {
        "resourceType": "Bundle",
        "id": uuid5(f"bundle|{doc.key}"),
        "type": "batch",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{r['id']}",
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for r in resources
        ],
    }
    if validate:
        _raise_invalid(bundle, source, doc.warnings[: doc.unreadable])
    return bundle


def _unidentified_patient(doc: Doc) -> dict[str, Any]:
    """The subject of a document without a recordTarget: one per document (its id comes
    from the document's id, else its bytes), identifying nobody, tagged UNIDENTIFIED."""
    return {
        "resourceType": "Patient",
        "id": uuid5(f"Patient|{doc.key}|unidentified"),
        "meta": {"tag": [dict(UNIDENTIFIED)]},
    }


def _raise_invalid(
    bundle: dict[str, Any], source: str, warnings: Sequence[dict[str, Any]] = ()
) -> None:
    """CcdaError for the first resource the R4 models reject (how many problems it has,
    the first one). The Bundle is the converter's own plain JSON, so it is checked with
    ``validate_converted`` (its cache keys need no read-back check). When values of the
    document were left out as unreadable, the first one is named: a required element left
    empty by one is the document's to fix, not a rule's."""
    from fhirtwin.validation import validate_converted

    problems = [p for p in validate_converted(bundle) if p["path"].startswith("entry[")]
    if not problems:
        return
    at = problems[0]["path"]
    i = int(at[len("entry[") : at.index("]")])
    prefix = f"entry[{i}].resource"
    mine = [p for p in problems if p["path"].startswith(prefix)]
    res = bundle["entry"][i]["resource"]
    hint = _left_out_hint(warnings, "fix the rule in mappings/ccda/rules/")
    invalid = CcdaError(
        f"{res['resourceType']}/{res['id']}: {len(mine)} FHIR R4 problem(s), "
        f"first at {at[len(prefix) :]}: {problems[0]['error']}",
        xpath=f"Bundle.entry[{i}]",
        hint=hint,
    )
    invalid.source = source
    raise invalid


def _left_out_hint(warnings: Sequence[dict[str, Any]], otherwise: str) -> str:
    """What to fix when a required element is empty: the first value of the document that
    was left out as unreadable, if any (it may be the missing one), else ``otherwise``."""
    left_out = [w for w in warnings if w.get("xpath")]
    if not left_out:
        return otherwise
    first = left_out[0]
    return (
        f"{len(left_out)} value(s) of the document were left out as unreadable, first "
        f"line {first['line']}, {first['xpath']}: {first['warning']}; if that is the "
        "missing element, fix the document, else the rule in mappings/ccda/rules/"
    )


def _finish(doc: Doc) -> list[dict[str, Any]]:
    """Composition first (as in a FHIR document), then the rest in the order made.
    Resources that ended up with nothing but their id are dropped with the references to
    them; so is one without an element FHIR R4 requires of its type (an Observation whose
    entry has no code, a MedicationStatement whose product names no medication), with a
    warning at its element: like an unreadable value, it costs that entry, not the
    document. Dropping one may empty a required reference of another: checked again."""
    from fhirtwin.fastcheck import missing_elements

    doc.unreadable = len(doc.warnings)
    source = {id(res): el for (_, el), res in doc.made.items()}
    out = [res for res in doc.order if len(res) > 2]
    out.sort(key=lambda r: r["resourceType"] != "Composition")  # checked first, below
    dropped = {f"{r['resourceType']}/{r['id']}" for r in doc.order if len(r) <= 2}
    while True:
        if dropped:
            for res in out:
                _prune_refs(res, dropped)
        incomplete = []
        for res in out:
            missing = [label for label, _ in missing_elements(res)]
            if missing:
                el = source.get(id(res))
                if res["resourceType"] == "Composition":
                    raise _incomplete_document(doc, res, missing, el)
                incomplete.append(res)
                doc.warn(
                    el if el is not None else doc.root,
                    f"{res['resourceType']} left out: it has no {', '.join(missing)}, which "
                    "FHIR R4 requires; add it to this entry of the document",
                )
        if not incomplete:
            break
        gone = {id(r) for r in incomplete}
        out = [r for r in out if id(r) not in gone]
        dropped = {f"{r['resourceType']}/{r['id']}" for r in incomplete}
    return out


def _incomplete_document(doc: Doc, res: dict[str, Any], missing: list[str], el: Any) -> CcdaError:
    """The Composition is the document itself: without what FHIR R4 requires of it (its
    date, title, author), the document is refused, naming the value that was left out as
    unreadable if there was one (the document's to fix), else the header rules."""
    hint = _left_out_hint(
        doc.warnings[: doc.unreadable],
        "fix the document's header, or the rule in mappings/ccda/rules/header.yaml",
    )
    line, xpath = doc.where(el if el is not None else doc.root)
    err = CcdaError(
        f"Composition/{res['id']} has no {', '.join(missing)}, which FHIR R4 requires",
        line=line,
        xpath=xpath,
        hint=hint,
    )
    err.source = doc.source
    return err


def _prune_refs(obj: Any, dropped: set[str]) -> Any:
    if isinstance(obj, dict):
        for k in list(obj):
            v = obj[k]
            if isinstance(v, dict) and v.get("reference") in dropped and len(v) == 1:
                del obj[k]
            elif isinstance(v, list):
                obj[k] = [
                    x
                    for x in v
                    if not (isinstance(x, dict) and x.get("reference") in dropped and len(x) == 1)
                ]
                for x in obj[k]:
                    _prune_refs(x, dropped)
                if not obj[k]:
                    del obj[k]
            else:
                _prune_refs(v, dropped)
    return obj


# -- the command line and the pipeline ----------------------------------------------------


def is_document(path: Path) -> bool:
    """A ClinicalDocument (not a section or entry fragment), judged by its root tag."""
    try:
        with path.open("rb") as f:
            head = f.read(65536)
    except OSError:
        return False
    head = re.sub(rb"<\?.*?\?>|<!--.*?-->", b"", head, flags=re.S).lstrip()
    return bool(re.match(rb"<(?:[A-Za-z_][\w.-]*:)?ClinicalDocument\b", head))


def convert_paths(
    inputs: list[str], out: Path | None, *, validate: bool, profile: str | None, console: Any
) -> int:
    """``fhirtwin convert --from ccda FILE... --out DIR``: one Bundle per document."""
    try:
        rules_for(None)
    except RulesError as exc:
        console.print(f"the C-CDA rules are broken: {exc}", style="red", markup=False)
        return 3
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    done = failed = 0
    sources: list[tuple[str, bytes]] = []
    if "-" in inputs:
        import sys

        sources.append(("<stdin>", sys.stdin.buffer.read(MAX_BYTES + 1)))
    from fhirtwin.ingest import source_files  # the same file walk as `fhirtwin ingest`

    paths = list(source_files([p for p in inputs if p != "-"], "ccda"))
    for name, data in sources:
        done, failed = _one(name, data, out, validate, console, done, failed)
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            console.print(f"[red]{path}: {exc}[/red]")
            failed += 1
            continue
        done, failed = _one(str(path), data, out, validate, console, done, failed)
    console.print(f"{done} document(s) converted, {failed} failed")
    return 1 if failed else 0


def _one(
    name: str, data: bytes, out: Path | None, validate: bool, console: Any, done: int, failed: int
) -> tuple[int, int]:
    warnings: list[dict[str, Any]] = []
    try:
        bundle = convert(data, source=name, validate=validate, warnings=warnings)
    except CcdaError as exc:
        console.print(str(exc), style="red", markup=False, highlight=False, soft_wrap=True)
        return done, failed + 1
    for w in warnings:
        where = f"{name}:{w['line']}" if w.get("line") else name
        xpath = f" ({w['xpath']})" if w.get("xpath") else ""
        console.print(
            f"{where}{xpath}: {w['warning']}", style="yellow", markup=False, soft_wrap=True
        )
    blob = orjson.dumps(bundle, option=orjson.OPT_INDENT_2)
    if out is None:
        print(blob.decode())
    else:
        stem = Path(name).name
        for suffix in (".xml", ".ccda", ".cda"):
            stem = stem.removesuffix(suffix)
        (out / f"{stem or 'stdin'}.json").write_bytes(blob)
    return done + 1, failed


def convert_record(rec: Any, validate: bool, mappings: Path | None) -> list[Any]:
    """One document on ``ehr.ccda`` → [Converted]; raises SourceError(stage, reason, error)."""
    from fhirtwin.normalize import Converted, SourceError
    from fhirtwin.twin import fhir_time_ms

    name = rec.header("fhirtwin-filename") or f"{rec.topic}/{rec.partition}/{rec.offset}"
    try:
        bundle = convert(rec.value, source=name, validate=validate, mappings=mappings)
    except CcdaError as exc:
        stage = "validate" if "FHIR R4 problem" in exc.reason else "parse"
        if exc.xpath and not exc.xpath.startswith("Bundle"):
            stage = "map" if exc.line and "XML" not in exc.reason else stage
        raise SourceError(stage, str(exc), exc.to_dict()) from exc
    except RulesError as exc:
        raise SourceError("map", f"the C-CDA rules are broken: {exc}", {"error": "rules"}) from exc
    resources = [e["resource"] for e in bundle["entry"]]
    if any(UNIDENTIFIED in r.get("meta", {}).get("tag", ()) for r in resources):
        # A twin is a patient: a document naming nobody must not become one (nor join one)
        raise SourceError(
            "map",
            f"{name}: the document has no recordTarget/patientRole, so it names no patient "
            "and cannot join a twin; add the recordTarget and send it again (the original "
            "bytes are kept in this dead letter)",
            {"error": "no patient", "xpath": "/ClinicalDocument/recordTarget"},
        )
    comp = next((r for r in resources if r["resourceType"] == "Composition"), None)
    when = comp.get("date") if comp else None
    control = next(
        (r.get("masterIdentifier", {}).get("value") for r in resources
         if r["resourceType"] == "DocumentReference" and r.get("masterIdentifier")),
        name,
    )  # fmt: skip
    return [Converted(resources, fhir_time_ms(when) if when else None, str(control))]
