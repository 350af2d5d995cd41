"""The HL7 v2 → FHIR mapping engine.

It knows no message type, segment or datatype by name: everything comes from
the rule files (``fhirtwin.rules``). Each rule file is compiled once, when the
rules load, into a generated Python function (``fhirtwin.codegen``) that calls
small closures for the values it converts; converting a message is a walk over
its segments calling those functions. Everything here is pure: a message and
rules in, a Bundle and a loss report out.
"""

from __future__ import annotations

import binascii
import hashlib
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote

import orjson

from fhirtwin import codegen
from fhirtwin import datatypes as dt
from fhirtwin.hl7v2 import Message, Segment, split_field
from fhirtwin.rules import (
    CodeMap,
    DatatypeRule,
    FieldRule,
    MappingError,
    MessageRule,
    RuleSet,
    SegmentRule,
    SenderProfile,
)

__all__ = ["LINEAGE_EXTENSION", "ZSEGMENT_EXTENSION", "ConversionError", "Engine"]

EXT_BASE = "https://fhirtwin.dev/fhir/StructureDefinition/"
LINEAGE_EXTENSION = EXT_BASE + "source-segment"
ZSEGMENT_EXTENSION = EXT_BASE + "v2-zsegment"
_ID_NAMESPACE = uuid.UUID("7b2c7e0e-2f7e-5d3a-9a53-6d8f3b0f7a11")

Comps = list[list[str]]
ValueFn = Callable[[Comps, "_State", str], Any]
Setter = Callable[[dict[str, Any], Any], None]


class ConversionError(ValueError):
    """A message that the rules cannot turn into FHIR (reject policy, unknown type)."""

    def __init__(
        self,
        what: str,
        *,
        hint: str,
        field: str | None = None,
        control_id: str = "",
        segment: str | None = None,
        segment_index: int | None = None,
        byte_offset: int | None = None,
    ):
        self.what, self.hint, self.field, self.control_id = what, hint, field, control_id
        self.segment, self.segment_index, self.byte_offset = segment, segment_index, byte_offset
        parts = [
            field,
            f"message {control_id}" if control_id else "",
            f"segment {segment_index} ({segment})" if segment_index else "",
            f"byte {byte_offset}" if byte_offset is not None else "",
        ]
        where = ", ".join(x for x in parts if x)
        super().__init__(f"{what}{f' [{where}]' if where else ''}: {hint}")

    def to_dict(self) -> dict[str, Any]:
        """The error as JSON-ready data (dead letters, ACK ERR segments, reports)."""
        return {
            "error": self.what,
            "hint": self.hint,
            "field": self.field,
            "control_id": self.control_id,
            "segment": self.segment,
            "segment_index": self.segment_index,
            "byte_offset": self.byte_offset,
        }


PRIMITIVES = frozenset(
    {
        "string", "code", "id", "uri", "url", "markdown", "date", "dateTime", "instant", "time",
        "decimal", "integer", "positiveInt", "unsignedInt", "boolean", "base64Binary",
        "system", "codesystem", "coding", "code-coding", "code-concept", "text-concept",
    }
)  # fmt: skip
# Builtins that read several components of their own (not just the first).
_MULTI_COMPONENT = frozenset({"system", "coding"})


@dataclass(slots=True)
class _Report:
    unmapped_segments: list[dict[str, Any]] = field(default_factory=list)
    unmapped_fields: list[dict[str, Any]] = field(default_factory=list)
    untranslated_codes: list[dict[str, Any]] = field(default_factory=list)
    assumptions: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class _State:
    msg: Message
    rules: RuleSet
    profile: SenderProfile
    default_offset: str | None
    offset_origin: str
    report: _Report
    message_key: str
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    slots: dict[str, dict[str, Any]] = field(default_factory=dict)
    seg_slots: dict[int, list[str]] = field(default_factory=dict)
    # (segment index, field) → [component numbers read (None = all), every repetition read]
    used: dict[tuple[int, int], list[Any]] = field(default_factory=dict)
    seg: Segment | None = None
    param_system: str | None = None
    param_map: CodeMap | None = None
    created: dict[tuple[str, tuple[tuple[str, ...], ...], str | None, int], Any] = field(
        default_factory=dict
    )

    def offset_assumed(self, loc: str, text: str) -> None:
        """A time sent without a UTC offset took the message's default one: say which."""
        self.report.assumptions.append(
            {"field": loc, "what": f"no UTC offset in {text!r}: used {self.offset_origin}"}
        )

    def error(self, loc: str, what: str, hint: str) -> None:
        seg = self.seg
        where: dict[str, Any] = {}
        if seg is not None:
            where = {
                "segment": seg.name,
                "segment_index": seg.index + 1,
                "byte_offset": self.msg.byte_offset(seg.offset),
            }
        if self.profile.invalid_values == "reject":
            raise ConversionError(
                what, hint=hint, field=loc, control_id=self.msg.control_id, **where
            )
        self.report.errors.append(
            {"field": loc, **where, "error": what, "hint": hint, "action": "dropped"}
        )

    def add_resource(self, res: dict[str, Any]) -> dict[str, Any]:
        key = f"{res['resourceType']}/{res['id']}"
        existing = self.resources.get(key)
        if existing is not None:
            return existing
        self.resources[key] = res
        return res


def _ref(res: dict[str, Any]) -> dict[str, str]:
    return {"reference": f"{res['resourceType']}/{res['id']}"}


def _empty(v: Any) -> bool:
    return v is None or v == "" or v == {} or v == []


# --------------------------------------------------------------------- paths


_PATH_PART = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(\[(-1|\d*)\])?\Z")


def compile_path(path: str, with_: dict[str, Any] | None = None, where: str = "") -> Setter:
    """'a.b[].c' → a function that puts a value there.

    ``a[]`` appends, ``a[0]`` is the first element and ``a[-1]`` the last (the one an
    earlier rule just appended); both are created when the list is empty.
    """
    steps: list[tuple[str, str | None]] = []
    for part in path.split("."):
        m = _PATH_PART.match(part)
        if not m:
            raise MappingError(f"{where}: {path!r} is not a path like 'name[].given[]'")
        idx = None if m.group(2) is None else m.group(3)
        steps.append((m.group(1), idx))
    *head, (last, last_idx) = steps
    extra = dict(with_) if with_ else None
    copy_extra = codegen.copier(extra) if extra else None
    # `with:` fills the element that the path's last '[]' before the leaf appends.
    with_at = max((i for i, (_, idx) in enumerate(head) if idx == ""), default=-1)

    if not head and last_idx is None:

        def set_key(target: dict[str, Any], value: Any) -> None:
            target[last] = value

        return set_key
    if not head and last_idx == "" and extra is None:

        def append_key(target: dict[str, Any], value: Any) -> None:
            lst = target.get(last)
            if lst is None:
                lst = target[last] = []
            if isinstance(value, list):
                lst.extend(value)
            else:
                lst.append(value)

        return append_key

    if len(head) == 1 and last_idx is None:
        # 'a.b', 'a[].b', 'a[0].b', 'a[-1].b': the most common shapes, unrolled.
        ((hname, hidx),) = head
        new_first = copy_extra if with_at == 0 else None
        if hidx is None:

            def set_in_object(target: dict[str, Any], value: Any) -> None:
                obj = target.get(hname)
                if obj is None:
                    obj = target[hname] = {}
                obj[last] = value

            return set_in_object
        pos = None if hidx == "" else int(hidx)

        def set_in_element(target: dict[str, Any], value: Any) -> None:
            lst = target.setdefault(hname, [])
            if pos is None or not lst:
                obj: dict[str, Any] = new_first() if new_first is not None else {}
                lst.append(obj)
            else:
                # [0] the first element, [-1] the last one appended (made if none).
                obj = lst[min(pos, len(lst) - 1)]
            obj[last] = value

        return set_in_element

    def setter(target: dict[str, Any], value: Any) -> None:
        obj = target
        for i, (name, idx) in enumerate(head):
            if idx is None:
                nxt = obj.get(name)
                if nxt is None:
                    nxt = obj[name] = {}
                obj = nxt
            else:
                lst = obj.setdefault(name, [])
                if idx == "" or not lst:
                    new: dict[str, Any] = {}
                    if copy_extra is not None and i == with_at:
                        new.update(copy_extra())
                    lst.append(new)
                    obj = new
                else:
                    # [0] the first element, [-1] the last one appended (made if none).
                    obj = lst[min(int(idx), len(lst) - 1)]
        if last_idx is None:
            obj[last] = value
        elif last_idx == "":
            lst = obj.setdefault(last, [])
            if copy_extra is not None and isinstance(value, dict):
                value = {**copy_extra(), **value}
            if isinstance(value, list):
                lst.extend(value)
            else:
                lst.append(value)
        else:
            lst = obj.setdefault(last, [])
            i = int(last_idx)
            if i < 0:
                if lst:
                    lst[-1] = value
                else:
                    lst.append(value)
                return
            while len(lst) <= i:
                lst.append(None)
            lst[i] = value

    return setter


def _checked_conversion(convert: Callable[[str], Any], hint: str) -> ValueFn:
    """A primitive whose text goes through a converter; a bad value is dropped and reported."""

    def conv(comps: Comps, st: _State, loc: str) -> Any:
        t = comps[0][0].strip() if comps and comps[0] else ""
        if not t or t == '""':
            return None
        try:
            return convert(t)
        except ValueError as exc:
            st.error(loc, str(exc), hint)
            return None

    return conv


_CHECKED: dict[str, tuple[Callable[[str], Any], str]] = {
    "date": (dt.to_date, "send the date as YYYYMMDD"),
    "time": (dt.to_time, "send the time as HHMM[SS]"),
    "boolean": (dt.to_boolean, "send Y or N"),
}


def _only_if_empty(setter: Setter, path: str) -> Setter:
    """`if_empty: true`: a later line fills the element only when nothing did before."""

    def put(target: dict[str, Any], value: Any) -> None:
        if _empty(_path_get(target, path)):
            setter(target, value)

    return put


def _unless_has(setter: Setter, path: str, value: str) -> Setter:
    """`unless_has`: store only when the target holds no `value` at `path` (lists flattened),
    e.g. OBR-2 typed PLAC only when ORC-2 gave no placer number (IG: IF ORC-2 NOT VALUED)."""
    parts = path.split(".")

    def holds(obj: Any, i: int) -> bool:
        if isinstance(obj, list):
            return any(holds(o, i) for o in obj)
        if i == len(parts):
            return obj == value
        return isinstance(obj, dict) and holds(obj.get(parts[i]), i + 1)

    def put(target: dict[str, Any], v: Any) -> None:
        if not holds(target, 0):
            setter(target, v)

    return put


def _as_code(text: str) -> str:
    """Text as a FHIR code, which holds single inner spaces only: ends stripped, runs of
    whitespace (a decoded \\.br\\ is a line break) made one space."""
    return " ".join(text.split())


class _AsText(str):
    """The text of a value its type could not read, on its way to the fallback of an
    ``else_text`` or ``else_absent`` line."""

    __slots__ = ()


_ABSENT_ERROR = {
    "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
    "valueCode": "error",
}


def _fallback_path(rule: FieldRule) -> str | None:
    """Where a value the line's type cannot read goes instead: ``else_text``'s path, or for
    ``else_absent`` the extension list of the primitive (``a.b`` → ``a._b.extension[]``)."""
    if rule.else_text:
        return rule.else_text
    if rule.else_absent and rule.to:
        head, _, last = rule.to.rpartition(".")
        return f"{head + '.' if head else ''}_{last}.extension[]"
    return None


def _text_if_unread(prim: ValueFn, action: str) -> ValueFn:
    """`else_text` / `else_absent`: a value the rule's type cannot read (its error just
    reported) comes back as its text, which ``_or_fallback`` stores at the fallback path; the
    report's error says ``action`` instead of 'dropped'."""

    def conv(comps: Comps, st: _State, loc: str) -> Any:
        errors = st.report.errors
        before = len(errors)
        v = prim(comps, st, loc)
        if v is None and len(errors) > before and comps and comps[0] and comps[0][0]:
            errors[-1]["action"] = action
            return _AsText(comps[0][0].strip())
        return v

    return conv


def _or_fallback(setter: Setter, fallback: Setter, const: dict[str, Any] | None) -> Setter:
    """Store a read value as the line says; an unread one's text (or ``const``, a fresh copy
    each time) at the fallback path."""

    def put(target: dict[str, Any], v: Any) -> None:
        if type(v) is _AsText:
            fallback(target, dict(const) if const is not None else str(v))
        else:
            setter(target, v)

    return put


def _unique(setter: Setter, path: str) -> Setter:
    """`unique: true` on an appending line (`a[]`): an element equal to one already in the
    list is not added again (the same insured's telecom from a second IN2)."""
    list_path = path.split("[]", 1)[0] + "[]"

    def put(target: dict[str, Any], v: Any) -> None:
        scratch: dict[str, Any] = {}
        setter(scratch, v)
        new = _path_get(scratch, list_path)
        have = _path_get(target, list_path)
        if isinstance(new, list) and isinstance(have, list) and new and new[0] in have:
            return
        setter(target, v)

    return put


def _const_fn(value: Any) -> Callable[[], Any]:
    """A constant of a rule: itself if immutable, else a fresh deep copy on each call."""
    if isinstance(value, dict | list):
        return codegen.copier(value)
    return lambda: value


_PATH_NAMES: dict[str, tuple[str, ...]] = {}


def _path_names(path: str) -> tuple[str, ...]:
    names = _PATH_NAMES.get(path)
    if names is None:
        names = _PATH_NAMES[path] = tuple(p.split("[", 1)[0] for p in path.split("."))
    return names


def _path_get(target: dict[str, Any], path: str) -> Any:
    obj: Any = target
    for name in _PATH_NAMES.get(path) or _path_names(path):
        if isinstance(obj, list):
            obj = obj[0] if obj else None
        if not isinstance(obj, dict):
            return None
        obj = obj.get(name)
    return obj


# ------------------------------------------------------------------- engine


class Engine:
    """Compiled rules; ``convert`` turns one parsed message into a Bundle and a loss report."""

    def __init__(self, rules: RuleSet) -> None:
        self.rules = rules
        self._datatypes: dict[str, ValueFn] = {}
        self._footprints: dict[str, frozenset[int] | None] = {}
        self._segments: dict[str, _CompiledSegment] = {}
        self._plans: dict[str, dict[str, list[tuple[Any, Any]]]] = {}
        for name in rules.segments:
            self._segments[name] = self._compile_segment(rules.segments[name])

    # -- compile ------------------------------------------------------------

    def _datatype(self, name: str, where: str) -> ValueFn:
        fn = self._datatypes.get(name)
        if fn is None:
            rule = self.rules.datatypes.get(name)
            if rule is None:
                raise MappingError(
                    f"{where}: type {name!r} is neither a FHIR primitive nor a file "
                    f"datatypes/{name}.yaml"
                )
            self._datatypes[name] = _pending  # recursion guard
            fn = self._compile_datatype(rule)
            self._datatypes[name] = fn
        return fn

    def _footprint(self, rule: FieldRule) -> frozenset[int] | None:
        """Which components of a repetition a rule reads (None: all of them)."""
        if rule.cases:
            comps: set[int] = set()
            for case in rule.cases.values():
                fp = self._footprint(case)
                if fp is None:
                    return None
                comps |= fp
            return frozenset(comps)
        if rule.format is not None:
            return frozenset(int(x) for x in _PLACEHOLDER.findall(rule.format))
        if rule.comp is not None:
            return frozenset(range(rule.comp, rule.comp + (rule.width or 1)))
        if rule.type in PRIMITIVES:
            return None if rule.type in _MULTI_COMPONENT else frozenset({1})
        dtrule = self.rules.datatypes.get(rule.type)
        if dtrule is None:
            return None
        if rule.type in self._footprints:
            return self._footprints[rule.type]
        self._footprints[rule.type] = None
        out: set[int] = set()
        for c in dtrule.components:
            fp = self._footprint(c)
            if fp is None and c.comp is None and c.field is None and c.value is None:
                out = set()
                self._footprints[rule.type] = None
                return None
            if fp is not None:
                out |= fp
        result = frozenset(out)
        self._footprints[rule.type] = result
        return result

    def _compile_value(self, rule: FieldRule) -> ValueFn:
        """A function (components, state, location) → FHIR value for one rule."""
        typ = rule.type
        comp, sub, width = rule.comp, rule.sub, rule.width
        where = rule.source
        if rule.format is not None:
            return _compile_format(rule.format)
        if typ in PRIMITIVES:
            conv = self._primitive(rule)
            if typ in _MULTI_COMPONENT:
                if comp is None:
                    return conv
                if width:
                    c0, c1 = comp - 1, comp - 1 + width
                    return lambda comps, st, loc: conv(comps[c0:c1], st, loc)
                ci = comp - 1
                return lambda comps, st, loc: conv(
                    [[s] for s in comps[ci]] if ci < len(comps) else [], st, loc
                )
            ci = (comp or 1) - 1
            si = (sub or 1) - 1

            def prim(comps: Comps, st: _State, loc: str) -> Any:
                if ci >= len(comps):
                    return None
                c = comps[ci]
                if si >= len(c):
                    return None
                text = c[si]
                if not text or text == '""':
                    return None
                return conv([[text]], st, f"{loc}.{ci + 1}" if comp else loc)

            return prim
        fn = self._datatype(typ, where)
        if rule.system or rule.map:
            fn = _with_params(fn, rule.system, self._code_map(rule))
        if comp is None:
            return lambda comps, st, loc: fn(comps, st, loc)
        if width:
            c0, c1 = comp - 1, comp - 1 + width
            return lambda comps, st, loc: fn(comps[c0:c1], st, loc)
        ci = comp - 1
        return lambda comps, st, loc: (
            fn([[s] for s in comps[ci]], st, f"{loc}.{ci + 1}") if ci < len(comps) else None
        )

    def _primitive(self, rule: FieldRule) -> ValueFn:
        typ = rule.type
        cmap = self._code_map(rule)
        system = rule.system
        keep_unmapped = rule.unmapped != "drop"

        def text_of(comps: Comps) -> str:
            if not comps or not comps[0]:
                return ""
            t = comps[0][0]
            return "" if t == '""' else t

        if typ == "base64Binary":

            def conv_b64(comps: Comps, st: _State, loc: str) -> Any:
                t = "".join(text_of(comps).split())
                if not t:
                    return None
                try:
                    binascii.a2b_base64(t, strict_mode=True)
                except (binascii.Error, ValueError):
                    st.error(loc, f"{t[:40]!r} is not base64 data", "send the data base64-encoded")
                    return None
                return t

            return conv_b64
        if typ in ("string", "markdown", "id", "uri", "url"):
            strip = typ != "string" and typ != "markdown"

            def conv_str(comps: Comps, st: _State, loc: str) -> Any:
                t = text_of(comps)
                if strip:
                    t = t.strip()
                return t or None

            return conv_str
        if typ == "code":

            def conv_code(comps: Comps, st: _State, loc: str) -> Any:
                t = _as_code(text_of(comps))
                if not t:
                    return None
                if cmap is not None:
                    hit = _translate(cmap, t, st, loc)
                    if hit is None:
                        return t if keep_unmapped and rule.unmapped == "keep-code" else None
                    return hit["code"]
                return t

            return conv_code
        if typ in ("code-coding", "code-concept", "text-concept"):
            concept = typ != "code-coding"

            def conv_coding(comps: Comps, st: _State, loc: str) -> Any:
                t = text_of(comps).strip()
                if not t:
                    return None
                if typ == "text-concept":
                    return {"text": t}
                t = _as_code(t)
                coding: dict[str, Any] | None
                if cmap is not None:
                    hit = _translate(cmap, t, st, loc)
                    if hit is None:
                        if not keep_unmapped:
                            return None
                        coding = {"code": t}
                        if cmap.source_system:
                            coding["system"] = cmap.source_system
                    else:
                        coding = dict(hit)
                else:
                    coding = {"code": t}
                    if system:
                        coding["system"] = system
                return {"coding": [coding]} if concept else coding

            return conv_coding
        if typ == "coding":
            return self._coding_builtin(rule, cmap)
        if typ == "system":
            return _system_builtin
        if typ == "codesystem":
            return lambda comps, st, loc: _codesystem(text_of(comps).strip(), st)
        if typ in _CHECKED:
            return _checked_conversion(*_CHECKED[typ])
        if typ in ("dateTime", "instant"):
            to = dt.to_instant if typ == "instant" else dt.to_datetime

            def conv_dt(comps: Comps, st: _State, loc: str) -> Any:
                t = text_of(comps).strip()
                if not t:
                    return None
                try:
                    value, used_default = to(t, st.default_offset)
                except ValueError as exc:
                    st.error(loc, str(exc), "send YYYYMMDDHHMMSS with a UTC offset (+ZZZZ)")
                    return None
                if used_default:
                    st.offset_assumed(loc, t)
                return value

            return conv_dt
        if typ in ("decimal", "integer", "positiveInt", "unsignedInt"):
            num = dt.to_decimal if typ == "decimal" else dt.to_integer
            positive = typ == "positiveInt"

            def conv_num(comps: Comps, st: _State, loc: str) -> Any:
                t = text_of(comps).strip()
                if not t:
                    return None
                try:
                    v = num(t)
                except ValueError as exc:
                    st.error(loc, str(exc), f"send a {typ} here")
                    return None
                if (positive and v < 1) or (typ == "unsignedInt" and v < 0):
                    st.error(loc, f"{t!r} must be {'> 0' if positive else '>= 0'}", "fix the value")
                    return None
                if typ != "decimal" and not _INT_MIN <= v <= _INT_MAX:
                    st.error(
                        loc,
                        f"{t!r} is outside FHIR's integer range (32 bits: "
                        f"{_INT_MIN:,} to {_INT_MAX:,})",
                        "fix the value",
                    )
                    return None
                return v

            return conv_num
        raise MappingError(f"{rule.source}: unknown primitive type {typ!r}")

    def _code_map(self, rule: FieldRule) -> CodeMap | None:
        if not rule.map:
            return None
        cmap = self.rules.codes.get(rule.map)
        if cmap is None:
            raise MappingError(f"{rule.source}: map {rule.map!r} has no file codes/{rule.map}.yaml")
        return cmap

    def _coding_builtin(self, rule: FieldRule, cmap: CodeMap | None) -> ValueFn:
        """(code, display, coding system name) → Coding; the system name via codes/coding-systems."""
        own_system, own_map = rule.system, cmap

        def conv(comps: Comps, st: _State, loc: str) -> Any:
            default_system = own_system or st.param_system
            cmap = own_map or st.param_map
            code = _as_code(comps[0][0]) if comps and comps[0] else ""
            if not code or code == '""':
                return None
            display = comps[1][0] if len(comps) > 1 and comps[1] else ""
            sysname = comps[2][0].strip() if len(comps) > 2 and comps[2] else ""
            coding: dict[str, Any] = {}
            if sysname:
                uri = _codesystem(sysname, st)
                if uri:
                    coding["system"] = uri
            elif default_system:
                coding["system"] = default_system
            coding["code"] = code
            if display:
                coding["display"] = display
            if cmap is not None and (
                not sysname or coding.get("system") in (cmap.source_system, cmap.target_system)
            ):
                hit = _translate(cmap, code, st, loc)
                if hit is not None:
                    out = dict(hit)
                    if display and "display" not in out:
                        out["display"] = display
                    return out
            return coding

        return conv

    def _compile_datatype(self, rule: DatatypeRule) -> ValueFn:
        leaves = [self._leaf(c, datatype=True) for c in rule.components]
        required = rule.required
        creates = rule.creates
        id_mode = rule.id
        unwrap = rule.fhir in PRIMITIVES
        # Required paths that are plain keys (the usual case) are checked in the generated
        # function, and so is unwrapping; `finish` is left for the rest and for `creates`.
        required_keys = tuple(r for r in required if _PATH_PART.match(r) and "[" not in r)
        required_paths = tuple(r for r in required if r not in required_keys)

        def finish(out: dict[str, Any], st: _State, loc: str) -> Any:
            for r in required_paths:
                if _empty(_path_get(out, r)):
                    return None
            if unwrap and "value" in out and len(out) == 1:
                return out["value"]
            if creates:
                res = {"resourceType": creates, **out}
                rid = _make_id(res, id_mode, st, f"{loc}:{creates}")
                res = st.add_resource({"resourceType": creates, "id": rid, **out})
                return _ref(res)
            return out

        inline = not required_paths and not creates
        fn = codegen.datatype_function(
            rule.name,
            leaves,
            None if inline else finish,
            required=required_keys,
            unwrap=unwrap and inline,
        )
        if not creates:
            return fn
        name = rule.name

        def create_once(comps: Comps, st: _State, loc: str) -> Any:
            # The same person, place or organization is often written several times in
            # one message; build its resource once and reuse the reference.
            key = (name, tuple(map(tuple, comps)), st.param_system, id(st.param_map))
            ref = st.created.get(key)
            if ref is None:
                ref = st.created[key] = fn(comps, st, loc)
            return ref.copy() if ref is not None else None

        return create_once

    def _leaf(self, rule: FieldRule, datatype: bool) -> codegen.Leaf:
        """What the code generator needs to know of one rule line."""
        setter = compile_path(rule.to, rule.with_, rule.source) if rule.to else None
        if setter is not None and rule.if_empty:
            setter = _only_if_empty(setter, rule.to or "")
        if setter is not None and rule.unless_has:
            setter = _unless_has(setter, *rule.unless_has)
        if setter is not None and rule.unique:
            setter = _unique(setter, rule.to or "")
        fallback = _fallback_path(rule)
        if setter is not None and fallback:
            alt = compile_path(fallback, None, rule.source)
            setter = _or_fallback(setter, alt, _ABSENT_ERROR if rule.else_absent else None)
        leaf = codegen.Leaf(
            to=rule.to,
            setter=setter,
            with_=rule.with_,
            when=rule.when,
            inline=not (rule.if_empty or rule.unless_has or rule.unique or fallback),
        )
        if rule.when:
            _compile_when(rule.when, rule.source)  # checks the condition's shape
        if rule.value is not None:
            leaf.const, leaf.has_const = rule.value, True
            return leaf
        if rule.cases:
            leaf.call = self._compile_rule(rule) if datatype else None
            return leaf
        leaf.comp, leaf.width, leaf.sub = rule.comp, rule.width, rule.sub
        leaf.plain_text = (
            rule.type == "string" and not rule.map and rule.format is None and not rule.width
        )
        leaf.value = self._compile_value(rule)
        if fallback and (
            rule.format is not None
            or rule.type not in PRIMITIVES
            or rule.type in _MULTI_COMPONENT
            or rule.width
        ):
            raise MappingError(
                f"{rule.source}: else_text / else_absent handle a single value its type "
                f"cannot read; give the line a primitive type (dateTime, decimal, …), not "
                f"{rule.type!r}"
            )
        if rule.format is None:
            if rule.type in PRIMITIVES:
                if rule.type not in _MULTI_COMPONENT and not rule.width:
                    leaf.prim = self._primitive(rule)
                    if fallback:
                        what = (
                            f"marked absent (data-absent-reason 'error') at {rule.to}"
                            if rule.else_absent
                            else f"kept as text in {fallback}"
                        )
                        leaf.prim = _text_if_unread(leaf.prim, what)
                elif rule.type in _MULTI_COMPONENT and rule.width and rule.comp is not None:
                    # The builtin reads its slice of components directly (no wrapper).
                    leaf.dt = self._primitive(rule)
                    leaf.dt_mode = "width"
            else:
                fn = self._datatype(rule.type, rule.source)
                if fn is not _pending:
                    if rule.system or rule.map:
                        fn = _with_params(fn, rule.system, self._code_map(rule))
                    leaf.dt = fn
                    leaf.dt_mode = (
                        "whole" if rule.comp is None else "width" if rule.width else "sub"
                    )
        return leaf

    def _compile_rule(
        self, rule: FieldRule
    ) -> Callable[[Comps, dict[str, Any], _State, str], None]:
        """A datatype component rule → fn(components, target, state, location)."""
        setter = compile_path(rule.to, rule.with_, rule.source) if rule.to else None
        cond = _compile_when(rule.when, rule.source)
        if rule.value is not None:
            const = _const_fn(rule.value)

            def put_const(comps: Comps, target: dict[str, Any], st: _State, loc: str) -> None:
                if cond is None or cond(comps, st):
                    assert setter is not None
                    setter(target, const())

            return put_const
        if rule.cases:
            cases = {k: self._compile_rule(v) for k, v in rule.cases.items()}
            sw = (rule.switch or 1) - 1

            def put_case(comps: Comps, target: dict[str, Any], st: _State, loc: str) -> None:
                key = comps[sw][0] if sw < len(comps) and comps[sw] else ""
                fn = cases.get(key)
                if fn is not None:
                    fn(comps, target, st, loc)

            return put_case
        value = self._compile_value(rule)
        assert setter is not None
        if rule.comp is not None and rule.format is None:
            # Most components of a datatype are absent in a given message: check
            # presence before calling anything (the hot path of the engine).
            c0 = rule.comp - 1
            c1 = c0 + (rule.width or 1)
            if rule.type == "string" and not rule.width and cond is None and not rule.map:
                si = (rule.sub or 1) - 1

                def put_text(comps: Comps, target: dict[str, Any], st: _State, loc: str) -> None:
                    if c0 < len(comps):
                        c = comps[c0]
                        if si < len(c):
                            t = c[si]
                            if t and t != '""':
                                setter(target, t)

                return put_text

            def put_comp(comps: Comps, target: dict[str, Any], st: _State, loc: str) -> None:
                if c0 >= len(comps):
                    return
                for c in comps[c0:c1]:
                    if c and (c[0] or len(c) > 1):
                        break
                else:
                    return
                if cond is not None and not cond(comps, st):
                    return
                v = value(comps, st, loc)
                if v is not None and v != "" and v != {} and v != []:
                    setter(target, v)

            return put_comp

        def put(comps: Comps, target: dict[str, Any], st: _State, loc: str) -> None:
            if cond is not None and not cond(comps, st):
                return
            v = value(comps, st, loc)
            if v is not None and v != "" and v != {} and v != []:
                setter(target, v)

        return put

    def _compile_segment(self, rule: SegmentRule) -> _CompiledSegment:
        steps: list[codegen.FieldStep | Callable[[Segment, dict[str, Any], _State], None]] = []
        links: list[Callable[[dict[str, Any], _State], None]] = []
        defaults: list[tuple[str, Setter, Any, Callable[[], Any]]] = []
        for fr in rule.fields:
            if fr.link:
                links.append(self._compile_link(fr))
            elif fr.ref:
                steps.append(self._compile_ref(fr))
            elif fr.default is not None and fr.field is None and fr.msh is None:
                assert fr.to is not None
                defaults.append(
                    (
                        fr.to,
                        compile_path(fr.to, fr.with_, fr.source),
                        fr.default,
                        _const_fn(fr.default),
                    )
                )
            else:
                if fr.field is not None and fr.msh is None and not fr.cases:
                    assert fr.to is not None
                    steps.append(
                        codegen.FieldStep(
                            n=fr.field,
                            leaf=self._leaf(fr, datatype=False),
                            loc=f"{rule.segment}-{fr.field}",
                            footprint=self._footprint(fr),
                            all_reps=fr.rep == "all" or (fr.rep is None and fr.to.endswith("[]")),
                        )
                    )
                else:
                    steps.append(self._compile_field(fr, rule.segment))
                if fr.default is not None and fr.to:
                    defaults.append(
                        (
                            fr.to,
                            compile_path(fr.to, None, fr.source),
                            fr.default,
                            _const_fn(fr.default),
                        )
                    )
        run = codegen.segment_function(rule.name, steps, _merge_mark, split_field)
        return _CompiledSegment(rule, run, links, defaults)

    def _compile_ref(self, fr: FieldRule) -> Callable[[Segment, dict[str, Any], _State], None]:
        assert fr.to is not None and fr.ref is not None
        setter = compile_path(fr.to, fr.with_, fr.source)
        slot = fr.ref
        cond = _compile_when(fr.when, fr.source)

        def put_ref(seg: Segment, target: dict[str, Any], st: _State) -> None:
            res = st.slots.get(slot)
            if res is not None and res is not target and (cond is None or cond(seg, st)):
                setter(target, _ref(res))

        return put_ref

    def _compile_link(self, fr: FieldRule) -> Callable[[dict[str, Any], _State], None]:
        assert fr.to is not None and fr.link is not None
        setter = compile_path(fr.to, fr.with_, fr.source)
        slot = fr.link

        def put_link(res: dict[str, Any], st: _State) -> None:
            owner = st.slots.get(slot)
            if owner is not None and owner is not res:
                setter(owner, _ref(res))

        return put_link

    def _compile_field(
        self, fr: FieldRule, segname: str
    ) -> Callable[[Segment, dict[str, Any], _State], None]:
        cond = _compile_when(fr.when, fr.source)
        if fr.msh is not None:
            # A value read from the message header, e.g. the trigger event (MSH-9.2).
            mn = fr.msh
            msh_body = self._compile_field_value(replace(fr, field=mn, msh=None))
            msh_fp = self._footprint(fr)

            def put_msh(seg: Segment, target: dict[str, Any], st: _State) -> None:
                m = st.msg.msh
                if not m.has(mn) or (cond is not None and not cond(seg, st)):
                    return
                _mark(st, 0, mn, msh_fp, False)
                msh_body(m, target, st, f"MSH-{mn}")

            return put_msh
        if fr.field is None:
            # A constant for the resource (value:) with an optional condition.
            assert fr.to is not None
            setter = compile_path(fr.to, fr.with_, fr.source)
            const = _const_fn(fr.value)

            def put_const(seg: Segment, target: dict[str, Any], st: _State) -> None:
                if cond is None or cond(seg, st):
                    setter(target, const())

            return put_const
        n = fr.field
        loc_base = f"{segname}-{n}"
        footprint = self._footprint(fr)
        all_reps = fr.rep == "all" or (
            fr.rep is None and fr.to is not None and fr.to.endswith("[]")
        )
        if fr.cases:
            sw = fr.switch or 1
            cases = {k: self._compile_field_value(v) for k, v in fr.cases.items()}

            def put_switch(seg: Segment, target: dict[str, Any], st: _State) -> None:
                if not seg.has(n) or (cond is not None and not cond(seg, st)):
                    return
                key = seg.value(sw)
                fn = cases.get(key)
                if fn is None:
                    return  # left unmapped: the loss report names the field
                _mark(st, seg.index, n, footprint, all_reps)
                _mark(st, seg.index, sw, _FIRST_COMPONENT, False)  # the switch was read too
                fn(seg, target, st, loc_base)

            return put_switch
        body = self._compile_field_value(fr)

        def put_field(seg: Segment, target: dict[str, Any], st: _State) -> None:
            if not seg.has(n) or (cond is not None and not cond(seg, st)):
                return
            _mark(st, seg.index, n, footprint, all_reps)
            body(seg, target, st, loc_base)

        return put_field

    def _compile_field_value(
        self, fr: FieldRule
    ) -> Callable[[Segment, dict[str, Any], _State, str], None]:
        assert fr.field is not None and fr.to is not None
        n = fr.field
        setter = compile_path(fr.to, fr.with_, fr.source)
        value = self._compile_value(fr)
        all_reps = fr.rep == "all" or (fr.rep is None and fr.to.endswith("[]"))

        def body(seg: Segment, target: dict[str, Any], st: _State, loc: str) -> None:
            tree = seg.field(n)
            if all_reps:
                for i, rep in enumerate(tree):
                    v = value(rep, st, loc if i == 0 else f"{loc}({i + 1})")
                    if not _empty(v):
                        setter(target, v)
            else:
                v = value(tree[0], st, loc)
                if not _empty(v):
                    setter(target, v)

        return body

    # -- run ------------------------------------------------------------------

    def message_rule(self, msg: Message) -> MessageRule:
        """The messages/ file for this message: CODE_EVENT, then MSH-9.3, then CODE."""
        code, event, structure = msg.message_code, msg.trigger_event, msg.structure
        candidates = [f"{code}_{event}", structure, code]
        for name in candidates:
            if name and name in self.rules.messages:
                return self.rules.messages[name]
        sent = f"{code}^{event}" + (f"^{structure}" if structure else "")
        if not code or not event:
            what = (
                f"MSH-9 is {sent!r}: it names no {'message code' if not code else 'trigger event'}"
            )
            hint = "send MSH-9 as CODE^EVENT (MSH-9.1 and MSH-9.2), e.g. ADT^A01"
        elif any(n and n.upper() in self.rules.messages for n in candidates):
            what = f"no rules for message type {sent}"
            hint = (
                f"HL7 message codes and trigger events are upper case (tables 0076, 0003): "
                f"send {sent.upper()}"
            )
        else:
            what = f"no rules for message type {sent}"
            hint = (
                f"add mappings/hl7v2/messages/{code}_{event}.yaml (it may 'extends' a similar "
                "one) with a sample message and its expected output"
            )
        raise ConversionError(what, hint=hint, field="MSH-9", control_id=msg.control_id)

    def convert(self, msg: Message, profile: SenderProfile | None = None) -> tuple[dict, dict]:
        """One parsed message → (FHIR Bundle, loss report)."""
        rules = self.rules
        msh = msg.msh
        app, fac = msh.value(3), msh.value(4)
        if profile is None:
            profile = rules.sender_for(app, fac)
        mrule = self.message_rule(msg)
        offset, origin = _default_offset(msg, profile)
        sender = f"{app}@{fac}" if fac else app
        st = _State(
            msg=msg,
            rules=rules,
            profile=profile,
            default_offset=offset,
            offset_origin=origin,
            report=_Report(),
            message_key=f"{sender}|{msg.control_id}",
        )
        if mrule.requires:
            self._check_requires(msg, mrule)
        by_segment = self._plan(mrule)
        zsegs: list[Segment] = []
        for seg in msg.segments:
            entries = by_segment.get(seg.name)
            if not entries:
                if seg.name[0] == "Z":
                    zsegs.append(seg)
                elif seg.name not in ("MSH",):
                    st.report.unmapped_segments.append(
                        {
                            "segment": seg.name,
                            "index": seg.index + 1,
                            "reason": f"no rule in messages/{mrule.name}.yaml",
                        }
                    )
                continue
            st.seg = seg
            assigned: list[str] = []
            for e, when in entries:
                if when is not None and not when(seg, st):
                    continue
                try:
                    self._run_entry(e, seg, st, assigned)
                except (ConversionError, MappingError):
                    raise
                except Exception as exc:
                    # A rule that does not fit this message (e.g. two rules writing a text
                    # and an object to one path) must cost one message, not the worker.
                    raise ConversionError(
                        f"rule {e.rule} failed on this segment: {type(exc).__name__}: {exc}",
                        hint=f"check mappings/hl7v2/segments/{e.rule}.yaml against this "
                        "message; if the rule is right, report it with the message",
                        field=seg.name,
                        control_id=msg.control_id,
                        segment=seg.name,
                        segment_index=seg.index + 1,
                        byte_offset=msg.byte_offset(seg.offset),
                    ) from exc
            st.seg_slots[seg.index] = assigned
        # Read by the engine itself: delimiters, time, type, control id, version.
        for n in (1, 2, 7, 9, 10, 12):
            _mark(st, 0, n, None, True)
        self._zsegments(zsegs, st)
        self._check_complete(mrule, st)
        bundle = self._bundle(msg, mrule, st, sender)
        report = self._report(msg, mrule, st, sender)
        return bundle, report

    def _check_requires(self, msg: Message, mrule: MessageRule) -> None:
        """A message without a segment its type cannot do without (an ADT without PID) is
        rejected whole: what it would make belongs to no one, or to the wrong twin."""
        names = {s.name for s in msg.segments}
        for name, means in mrule.requires:
            if name not in names:
                sent = f"{msg.message_code}^{msg.trigger_event}"
                raise ConversionError(
                    f"this {sent} message has no {name} segment ({means})",
                    hint=f"every {sent} needs {name} (messages/{mrule.name}.yaml 'requires', "
                    "as the HL7 v2 message structure has it): have the sender include it, "
                    "then replay the message",
                    field=name,
                    control_id=msg.control_id,
                )

    def _check_complete(self, mrule: MessageRule, st: _State) -> None:
        """Every resource the rules made has what FHIR R4 requires of its type (by the R4B
        models: ``Immunization.vaccineCode``, ``Condition.subject``, a ``status``, one
        ``occurrence[x]``), else the message is rejected with the segment and field that
        should have given it. Validation would reject such a resource too, but only says
        what is missing; and with validation off it would reach the twin, or, missing its
        patient, no twin at all. A presence check per resource (``first_missing``)."""
        from fhirtwin.fastcheck import first_missing  # pydantic: not before it is needed

        if missing := first_missing(st.resources.values()):
            self._incomplete(mrule, st, *missing)

    def _sources(
        self, mrule: MessageRule, rtype: str, keys: frozenset[str]
    ) -> list[tuple[str, FieldRule]]:
        """(segment, rule line) of this message type that can write one of ``keys`` on a
        resource of type ``rtype``."""
        made = {e.as_: self._segments[e.rule].rule.resource for e in mrule.entries if e.as_}
        out: list[tuple[str, FieldRule]] = []
        for e in mrule.entries:
            rule = self._segments[e.rule].rule
            if (rule.resource if not e.into else made.get(e.into[0])) != rtype:
                continue
            lines = [c for fr in rule.fields for c in (fr, *(fr.cases or {}).values())]
            for fr in lines:
                if fr.to and fr.to.split(".")[0].removesuffix("[]") in keys:
                    out.append((e.segment, fr))
        return out

    def _incomplete(
        self, mrule: MessageRule, st: _State, res: dict[str, Any], label: str, keys: frozenset
    ) -> None:
        msg = st.msg
        # "ORC[3],RXA[4]": the segments that made it (a resource a datatype made, with no
        # lineage of its own, is put on the MSH)
        tags = _LINEAGE_TAG.findall(_lineage_of(res))
        seg = msg.segments[int(tags[0][1]) - 1] if tags else msg.segments[0]
        joined: dict[str, str] = {}  # segment name → "segment N" of the first that joined
        for name, n in tags:
            joined.setdefault(name, f"segment {n}")
        rtype = res["resourceType"]
        article = "an" if rtype[0] in "AEIOU" else "a"
        sources = self._sources(mrule, rtype, keys)
        fields = {f"{name}-{fr.field}" for name, fr in sources if fr.field}
        dropped = next(
            (
                d
                for d in st.report.errors
                if str(d.get("field", "")).split(".")[0] in fields
                and (d.get("segment"), str(d.get("segment_index"))) in tags
            ),
            None,
        )
        refs = [fr.ref for _, fr in sources if fr.ref]
        empty = [(f"{n}-{fr.field}", joined[n]) for n, fr in sources if fr.field and n in joined]
        absent = [name for name, fr in sources if fr.field and name not in joined]
        if dropped is not None:
            why = f"it comes from {dropped['field']}, whose value was dropped: {dropped['error']}"
            hint = "fix that value in the message (or the sender profile), then replay it"
        elif refs:
            slot = refs[0]
            makers = list(dict.fromkeys(e.segment for e in mrule.entries if e.as_ == slot))
            maker = " or ".join(makers) or slot
            later = next((s for s in msg.segments[seg.index + 1 :] if s.name in makers), None)
            why = f"it refers to the {slot} made from {maker}, and "
            if not makers:
                why += f"messages/{mrule.name}.yaml makes no {slot!r}"
                hint = f"add a segment entry with 'as: {slot}' to messages/{mrule.name}.yaml"
            elif later is not None:
                why += f"{later.name} comes after it (segment {later.index + 1})"
                hint = (
                    f"send {later.name} before the segments that refer to it, in the order "
                    "of the HL7 v2 message structure, then replay the message"
                )
            else:
                why += f"the message has no {maker}"
                hint = f"have the sender include {maker}, then replay the message"
        elif empty:
            said = " or ".join(dict.fromkeys(f"{f} ({where})" for f, where in empty))
            why = f"it comes from {said}, which the message left empty"
            hint = f"have the sender fill {empty[0][0]}, then replay the message"
        elif absent:
            names = " or ".join(dict.fromkeys(absent))
            elsewhere = [s for s in msg.segments if s.name in absent]
            why = f"it comes from {names}, and no {names} came with this {seg.name}"
            if elsewhere:
                other = elsewhere[0]
                why += f" (the {other.name} at segment {other.index + 1} is not in its group)"
            hint = (
                f"send {names} in the {seg.name}'s group, as the HL7 v2 message structure has "
                "it, then replay the message"
            )
        else:
            why = f"no rule of messages/{mrule.name}.yaml gives it"
            hint = f"add a line that fills {rtype}.{label} to the rules of {seg.name}"
        raise ConversionError(
            f"{seg.name} made {article} {rtype} without {label}, which FHIR R4 requires: {why}",
            hint=hint,
            field=seg.name,
            control_id=msg.control_id,
            segment=seg.name,
            segment_index=seg.index + 1,
            byte_offset=msg.byte_offset(seg.offset),
        )

    def _plan(self, mrule: MessageRule) -> dict[str, list[tuple[Any, Any]]]:
        """Entries of a message rule by segment name, with their conditions compiled (cached)."""
        plan = self._plans.get(mrule.name)
        if plan is None:
            plan = {}
            for e in mrule.entries:
                when = _predicate(e.when, mrule.source) if e.when is not None else None
                plan.setdefault(e.segment, []).append((e, when))
            self._plans[mrule.name] = plan
        return plan

    def _run_entry(self, e: Any, seg: Segment, st: _State, assigned: list[str]) -> None:
        comp = self._segments[e.rule]
        if e.into:
            target = self._into_target(e.into, seg, st)
            if target is None:
                if e.optional:
                    return
                st.report.unmapped_segments.append(
                    {
                        "segment": seg.name,
                        "index": seg.index + 1,
                        "reason": f"rule {e.rule}: no {' or '.join(e.into)} before it to add to",
                    }
                )
                return
            comp.apply(seg, target, st)
            _lineage(target, seg)
            slot = next((s for s in e.into if st.slots.get(s) is target), None)
            if slot:
                assigned.append(slot)
            return
        if comp.rule.resource is None:
            raise MappingError(
                f"{comp.rule.source}: no 'resource', so a message must use it with 'into'"
            )
        res: dict[str, Any] = {"resourceType": comp.rule.resource}
        comp.apply(seg, res, st)
        scope = f"{seg.index}:{e.rule}"
        res["id"] = _make_id(res, comp.rule.id, st, scope)
        res = {"resourceType": res.pop("resourceType"), "id": res.pop("id"), **res}
        same = st.resources.get(f"{res['resourceType']}/{res['id']}")
        if same is not None and _content(same) != _content(res):
            # Another segment of this message made a different resource with the same
            # business identifier (a sender reusing OBX-21, two visits sharing a number):
            # keep both, the second under a position-based id, and say so.
            first = _lineage_of(same)
            res["id"] = _make_id(res, "message", st, scope)
            st.report.assumptions.append(
                {
                    "field": f"{seg.name}[{seg.index + 1}]",
                    "what": f"same identifier as the {res['resourceType']} from {first} but "
                    "different content: kept as a separate resource with an id from its "
                    "position in the message",
                }
            )
        # the segment joins the lineage of the resource it made, or of the equal one an
        # earlier segment made (the same insured in two IN1: one RelatedPerson, both named)
        res = st.add_resource(res)
        _lineage(res, seg)
        if e.as_:
            st.slots[e.as_] = res
            assigned.append(e.as_)
        for link in comp.links:
            link(res, st)

    def _into_target(self, into: tuple[str, ...], seg: Segment, st: _State) -> dict | None:
        if len(into) == 1:
            return st.slots.get(into[0])
        # Nearest: the slot set by the closest segment before this one (skipping its own kind).
        for i in range(seg.index - 1, -1, -1):
            prev = st.msg.segments[i]
            if prev.name == seg.name:
                continue
            got = st.seg_slots.get(i)
            if got:
                for s in into:
                    if s in got:
                        return st.slots.get(s)
                return None
        return None

    def _zsegments(self, zsegs: list[Segment], st: _State) -> None:
        if not zsegs:
            return
        policy = st.profile.zsegments
        if policy == "reject":
            z = zsegs[0]
            raise ConversionError(
                f"Z-segment {z.name} (segment {z.index + 1}) is not accepted from this sender",
                hint="the sender profile says zsegments: reject; set keep or ignore to accept it",
                field=z.name,
                control_id=st.msg.control_id,
                segment=z.name,
                segment_index=z.index + 1,
                byte_offset=st.msg.byte_offset(z.offset),
            )
        header = st.slots.get("header")
        for z in zsegs:
            if policy == "keep" and header is not None:
                header.setdefault("extension", []).append(
                    {"url": ZSEGMENT_EXTENSION, "valueString": z.encoding.field.join(z.fields)}
                )
                for n in range(1, len(z.fields)):
                    _mark(st, z.index, n, None, True)
            else:
                st.report.unmapped_segments.append(
                    {
                        "segment": z.name,
                        "index": z.index + 1,
                        "reason": "Z-segment ignored by sender profile"
                        if policy == "ignore"
                        else "Z-segment: no MessageHeader to keep it on",
                    }
                )

    def _bundle(self, msg: Message, mrule: MessageRule, st: _State, sender: str) -> dict:
        entries = []
        resources = list(st.resources.values())
        source = _source_uri(msg, sender)
        for res in resources:
            res.setdefault("meta", {})["source"] = source
        ts = msh_time(msg, st)
        prov = _provenance(msg, resources, st, sender, ts)
        if prov is not None:
            resources.append(prov)
        for res in resources:
            rid = f"{res['resourceType']}/{res['id']}"
            entries.append(
                {
                    "fullUrl": f"urn:uuid:{res['id']}",
                    "resource": res,
                    "request": {"method": "PUT", "url": rid},
                }
            )
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "id": _uuid(f"Bundle|{st.message_key}"),
            "type": mrule.bundle,
        }
        if ts and "T" in ts:
            bundle["timestamp"] = ts
        if msg.control_id:
            bundle["identifier"] = {
                "system": "urn:fhirtwin:hl7v2:control-id",
                "value": msg.control_id,
            }
        bundle["entry"] = entries
        return bundle

    def _report(self, msg: Message, mrule: MessageRule, st: _State, sender: str) -> dict:
        rep = st.report
        unmapped = rep.unmapped_fields
        skip = {u["index"] for u in rep.unmapped_segments}
        used = st.used
        for seg in msg.segments:
            index = seg.index
            if index + 1 in skip:
                continue
            name, fields, cache = seg.name, seg.fields, seg._cache
            for n in range(3 if name == "MSH" else 1, len(fields)):
                raw = fields[n]
                if not raw or raw == '""':
                    continue
                usage = used.get((index, n))
                if usage is None:
                    unmapped.append({"segment": name, "index": index + 1, "field": f"{name}-{n}"})
                    continue
                comps, all_reps = usage
                if comps is None and all_reps:
                    continue  # every component of every repetition was read
                tree = cache.get(n) or seg.field(n)
                if not all_reps and len(tree) > 1:
                    extra = sum(1 for r in tree[1:] if any(any(s) for s in (c for c in r)))
                    if extra:
                        unmapped.append(
                            {
                                "segment": name,
                                "index": index + 1,
                                "field": f"{name}-{n}",
                                "repetitions": extra,
                            }
                        )
                if comps is None:
                    continue
                if not all_reps:
                    r = tree[0]
                    if len(r) == 1 and 1 in comps:
                        continue  # the common case: one component, and it was read
                missing = None
                for r in tree if all_reps else (tree[0],):
                    if len(r) == 1 and 1 in comps:
                        continue  # one component, and it was read
                    gaps = _GAPS.get((comps, len(r)))
                    if gaps is None:
                        gaps = _gaps(comps, len(r))
                    for ci in gaps:
                        c = r[ci - 1]
                        # c is never empty: c[0] first, any() only for sub-components.
                        if c[0] or (len(c) > 1 and any(c)):
                            if missing is None:
                                missing = set()
                            missing.add(ci)
                if missing:
                    for ci in sorted(missing):
                        unmapped.append(
                            {"segment": name, "index": index + 1, "field": f"{name}-{n}.{ci}"}
                        )
        counts: dict[str, int] = {}
        for res in st.resources.values():
            counts[res["resourceType"]] = counts.get(res["resourceType"], 0) + 1
        return {
            "message": {
                "control_id": msg.control_id,
                "type": msg.msh.raw(9),
                "version": msg.version,
                "sender": sender,
                "profile": st.profile.name,
                "rules": f"messages/{mrule.name}.yaml",
            },
            "resources": counts,
            "unmapped_segments": rep.unmapped_segments,
            "unmapped_fields": unmapped,
            "untranslated_codes": rep.untranslated_codes,
            "assumptions": rep.assumptions,
            "errors": rep.errors,
            "notes": list(msg.notes),
        }


_pending: ValueFn = lambda comps, st, loc: None  # noqa: E731
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1  # FHIR integer, positiveInt, unsignedInt
_V2_DATE = re.compile(r"(\d{4}(?:\d{2}){0,2})([+-]\d{4})?$")  # DT precision, optional offset
_GAPS: dict[tuple[frozenset[int], int], tuple[int, ...]] = {}


def _gaps(comps: frozenset[int], length: int) -> tuple[int, ...]:
    """The component numbers 1..length that a rule's footprint does not read (memoized:
    footprints are per rule line, lengths small)."""
    got = tuple(ci for ci in range(1, length + 1) if ci not in comps)
    if len(_GAPS) >= 4096:
        _GAPS.clear()
    _GAPS[(comps, length)] = got
    return got


_FIRST_COMPONENT = frozenset({1})
_PLACEHOLDER = re.compile(r"\{(\d+)\}")
_EMPTY_PARENS = re.compile(r"\(\s*\)")
_SPACES = re.compile(r"\s+")


def _compile_format(fmt: str) -> ValueFn:
    """'({6}) {7}' → the components put in; empty ones leave no stray punctuation."""
    wanted = [int(x) for x in _PLACEHOLDER.findall(fmt)]

    def conv(comps: Comps, st: _State, loc: str) -> Any:
        vals = {}
        for n in wanted:
            c = comps[n - 1] if n - 1 < len(comps) else None
            v = c[0].strip() if c else ""
            vals[n] = "" if v == '""' else v
        if not any(vals.values()):
            return None
        out = _PLACEHOLDER.sub(lambda m: vals[int(m.group(1))], fmt)
        out = _SPACES.sub(" ", _EMPTY_PARENS.sub("", out)).strip(" ,-/")
        return out or None

    return conv


def _with_params(fn: ValueFn, system: str | None, cmap: CodeMap | None) -> ValueFn:
    """Hand a rule's default system / code map down to the datatype it calls."""

    def call(comps: Comps, st: _State, loc: str) -> Any:
        old = st.param_system, st.param_map
        st.param_system, st.param_map = system, cmap
        try:
            return fn(comps, st, loc)
        finally:
            st.param_system, st.param_map = old

    return call


@dataclass(slots=True)
class _CompiledSegment:
    rule: SegmentRule
    run: Callable[[Segment, dict[str, Any], _State], None]
    links: list[Callable[[dict[str, Any], _State], None]]
    defaults: list[tuple[str, Setter, Any, Callable[[], Any]]]

    def apply(self, seg: Segment, target: dict[str, Any], st: _State) -> None:
        self.run(seg, target, st)
        for n in self.rule.ignore:
            if seg.has(n):
                _mark(st, seg.index, n, None, True)
        for path, setter, value, fresh in self.defaults:
            if _empty(_path_get(target, path)):
                setter(target, fresh())
                st.report.assumptions.append(
                    {
                        "field": f"{seg.name}[{seg.index + 1}]",
                        "what": f"{path} defaulted to {value!r}",
                    }
                )


def _mark(st: _State, idx: int, n: int, comps: frozenset[int] | None, all_reps: bool) -> None:
    key = (idx, n)
    cur = st.used.get(key)
    if cur is None:
        st.used[key] = [comps, all_reps]
        return
    _merge_mark(cur, comps, all_reps)


def _merge_mark(cur: list[Any], comps: frozenset[int] | None, all_reps: bool) -> None:
    """A field read again: the loss report counts the union of what the reads used."""
    if cur[0] is not None:
        cur[0] = None if comps is None else cur[0] | comps
    cur[1] = cur[1] or all_reps


def _translate(cmap: CodeMap, code: str, st: _State, loc: str) -> dict[str, str] | None:
    local = st.profile.code_maps.get(cmap.name)
    if local:
        hit = local.get(code)
        if hit is not None:
            return {"system": cmap.target_system, **hit} if cmap.target_system else hit
    hit = cmap.lookup(code)
    if hit is None:
        st.report.untranslated_codes.append({"field": loc, "code": code, "map": cmap.name})
    return hit


def _codesystem(name: str, st: _State) -> str | None:
    """A v2 coding system name (table 0396: LN, SCT, HL70001 …) → FHIR system URI."""
    if not name:
        return None
    table = st.rules.codes.get("coding-systems")
    if table is not None:
        hit = table.lookup(name)
        if hit is not None:
            return hit["code"]
    up = name.upper()
    if up.startswith("HL7") and up[3:].isdigit():
        return f"http://terminology.hl7.org/CodeSystem/v2-{up[3:].zfill(4)}"
    if up.startswith("99") or up.startswith("L"):
        pass
    if _OID.match(name):
        return f"urn:oid:{name}"
    uri = st.profile.identifier_systems.get(name)
    if uri:
        return uri
    st.report.assumptions.append(
        {
            "field": "coding system",
            "what": f"coding system {name!r} has no URI in "
            f"codes/coding-systems.yaml or the sender profile: used {st.profile.system_base}"
            f"{_quote_name(name)}",
        }
    )
    return st.profile.system_base + _quote_name(name)


_QUOTED: dict[str, str] = {}


def _quote_name(name: str) -> str:
    """quote(name, safe=''), memoized: the same local system names recur in every message."""
    got = _QUOTED.get(name)
    if got is None:
        if len(_QUOTED) >= 4096:
            _QUOTED.clear()
        got = _QUOTED[name] = quote(name, safe="")
    return got


_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+\Z")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")


def _system_builtin(comps: Comps, st: _State, loc: str) -> Any:
    """HD (namespace id, universal id, universal id type) → a system URI."""
    ns = comps[0][0].strip() if comps and comps[0] else ""
    uid = comps[1][0].strip() if len(comps) > 1 and comps[1] else ""
    utype = comps[2][0].strip().upper() if len(comps) > 2 and comps[2] else ""
    systems = st.profile.identifier_systems
    for key in (ns, uid):
        if key and key in systems:
            return systems[key]
    if uid:
        if utype in ("ISO", "") and _OID.match(uid):
            return f"urn:oid:{uid}"
        if utype in ("UUID", "GUID", "") and _UUID.match(uid):
            return f"urn:uuid:{uid.lower()}"
        if utype in ("URI", "URL") or "://" in uid:
            return uid
    if ns and _OID.match(ns):
        return f"urn:oid:{ns}"
    name = ns or uid
    if not name:
        return None
    uri = st.profile.system_base + _quote_name(name)
    st.report.assumptions.append(
        {
            "field": loc,
            "what": f"assigning authority {name!r} has no URI in sender profile "
            f"{st.profile.name!r} (identifier_systems): used {uri}",
        }
    )
    return uri


def _compile_when(when: dict[str, Any] | None, where: str) -> Callable[[Any, _State], bool] | None:
    """`when:` → a predicate over a segment (or a component list inside a datatype)."""
    if not when:
        return None
    return _predicate(when, where)


_PREDICATES: dict[str, Callable[[Any, _State], bool]] = {}


def _predicate(when: dict[str, Any], where: str = "") -> Callable[[Any, _State], bool]:
    key = repr(when)
    fn = _PREDICATES.get(key)
    if fn is None:
        scope = "seg" if _mentions(when, ("field", "msh")) else "comps"
        if scope == "comps" and not _mentions(when, ("comp",)):
            raise MappingError(
                f"{where}: 'when' needs 'field', 'msh' or 'comp' (or all/any of them)"
            )
        try:
            fn = _PREDICATES[key] = codegen.predicate(when, scope)
        except (ValueError, TypeError, KeyError) as exc:
            raise MappingError(f"{where}: 'when' {when!r} is not a condition: {exc}") from None
    return fn


def _mentions(when: dict[str, Any], keys: tuple[str, ...]) -> bool:
    if any(k in when for k in keys):
        return True
    return any(_mentions(p, keys) for p in when.get("all", when.get("any", ())))


_NS_BYTES = _ID_NAMESPACE.bytes


_UUIDS: dict[str, str] = {}
_UUIDS_MAX = 8192


def _uuid(key: str) -> str:
    """uuid.uuid5(_ID_NAMESPACE, key), without building UUID objects (hot path).

    Memoized: the same place, person or code comes back in message after message. The
    memo is emptied when full (a bound, not an LRU: a hit is all that matters here)."""
    got = _UUIDS.get(key)
    if got is not None:
        return got
    if len(_UUIDS) >= _UUIDS_MAX:
        _UUIDS.clear()
    got = _UUIDS[key] = _uuid5(key)
    return got


def _uuid5(key: str) -> str:
    d = bytearray(hashlib.sha1(_NS_BYTES + key.encode()).digest()[:16])
    d[6] = (d[6] & 0x0F) | 0x50
    d[8] = (d[8] & 0x3F) | 0x80
    h = d.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _make_id(res: dict[str, Any], mode: str | dict[str, Any], st: _State, scope: str) -> str:
    """Deterministic id: from the business identifier, chosen fields, the content, or the
    message position (the fallback when the others give nothing)."""
    rt = res["resourceType"]
    by_identifier = mode == "identifier" or (isinstance(mode, dict) and mode["identifier"])
    if by_identifier:
        for ident in res.get("identifier") or ():
            if isinstance(ident, dict) and ident.get("value"):
                return _uuid(f"{rt}|{ident.get('system', '')}|{ident['value']}")
    if isinstance(mode, dict):
        # e.g. an allergy is the same allergy for the same patient and substance,
        # in whichever message it is sent again.
        parts = [_path_get(res, p) for p in mode["keys"]]
        if any(not _empty(p) for p in parts):
            return _uuid(rt + "|keys|" + orjson.dumps(parts, option=orjson.OPT_SORT_KEYS).decode())
    elif mode == "content":
        return _uuid(rt + "|" + orjson.dumps(res, option=orjson.OPT_SORT_KEYS).decode())
    return _uuid(f"{rt}|{st.message_key}|{scope}")


def _content(res: dict[str, Any]) -> dict[str, Any]:
    """A resource without its lineage, to tell a repeat from a different resource."""
    out = dict(res)
    exts = [x for x in res.get("extension", ()) if x.get("url") != LINEAGE_EXTENSION]
    if exts:
        out["extension"] = exts
    else:
        out.pop("extension", None)
    return out


_LINEAGE_TAG = re.compile(r"([A-Z][A-Z0-9]{2})\[(\d+)\]")


def _lineage_of(res: dict[str, Any]) -> str:
    for ext in res.get("extension", ()):
        if ext.get("url") == LINEAGE_EXTENSION:
            return str(ext.get("valueString"))
    return "an earlier segment"


def _lineage(res: dict[str, Any], seg: Segment) -> None:
    tag = f"{seg.name}[{seg.index + 1}]"
    exts = res.setdefault("extension", [])
    for ext in exts:
        if ext.get("url") == LINEAGE_EXTENSION:
            if tag not in ext["valueString"].split(","):
                ext["valueString"] += "," + tag
            return
    exts.append({"url": LINEAGE_EXTENSION, "valueString": tag})


def _default_offset(msg: Message, profile: SenderProfile) -> tuple[str | None, str]:
    """The offset for times sent without one: MSH-7's, else the profile's zone, else UTC."""
    m = re.search(r"([+-]\d{4})$", msg.msh.value(7).strip())
    if m:
        tz = m.group(1)
        return f"{tz[:3]}:{tz[3:]}", f"the message's offset {tz} (MSH-7)"
    if profile.timezone:
        return (
            f"tz:{profile.timezone}",
            f"time zone {profile.timezone} (sender profile {profile.name})",
        )
    return "+00:00", (
        f"UTC: no offset in MSH-7 and sender profile {profile.name!r} sets no timezone"
    )


def msh_time(msg: Message, st: _State) -> str | None:
    """MSH-7 as a FHIR dateTime (the Bundle's timestamp and Provenance.recorded): once per
    message, so an unreadable time is one error and an assumed offset one assumption."""
    t = msg.msh.value(7).strip()
    if not t:
        return None
    try:
        value, used_default = dt.to_datetime(t, st.default_offset)
    except ValueError as exc:
        st.error("MSH-7", str(exc), "send MSH-7 as YYYYMMDDHHMMSS+ZZZZ")
        return None
    if used_default and not any(a.get("field") == "MSH-7" for a in st.report.assumptions):
        st.offset_assumed("MSH-7", t)  # unless a rule that maps MSH-7 (EVN's) did already
    return value


def _source_uri(msg: Message, sender: str) -> str:
    return f"urn:hl7v2:{quote(sender, safe='@')}:{quote(msg.control_id, safe='')}"


def _provenance(
    msg: Message, resources: list[dict], st: _State, sender: str, ts: str | None
) -> dict | None:
    """The message's Provenance; ``ts`` is MSH-7 as ``msh_time`` read it."""
    if not resources:
        return None
    recorded = ts
    if recorded and "T" not in recorded:
        # An instant needs a time of day: a message time of day, month or year precision
        # (YYYYMMDD, YYYYMM, YYYY) stands for its first instant, in the offset any other time
        # of the message without one gets (its own, the sender profile's zone, else UTC),
        # and the report says so.
        m = _V2_DATE.match(msg.msh.value(7).strip())
        first = (m.group(1) + "0101")[:8] + "000000" + (m.group(2) or "") if m else ""
        try:
            recorded = dt.to_datetime(first, st.default_offset)[0]
        except ValueError:  # not a v2 date after all: the date msh_time read, in UTC
            recorded = (recorded + "-01-01")[:10] + "T00:00:00+00:00"
        st.report.assumptions.append(
            {
                "field": "MSH-7",
                "what": f"message time {msg.msh.value(7).strip()!r} has no time of day: "
                f"Provenance.recorded set to its first instant, {recorded} "
                f"(offset: {st.offset_origin})",
            }
        )
    prov: dict[str, Any] = {
        "resourceType": "Provenance",
        "id": _uuid(f"Provenance|{st.message_key}"),
        "target": [_ref(r) for r in resources],
    }
    if recorded:
        prov["recorded"] = recorded
    else:
        prov["recorded"] = "1970-01-01T00:00:00+00:00"
        st.report.assumptions.append(
            {"field": "MSH-7", "what": "no message time: Provenance.recorded set to the epoch"}
        )
    prov["activity"] = {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                "code": "CREATE",
                "display": "create",
            }
        ]
    }
    prov["agent"] = [
        {
            "type": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                        "code": "author",
                        "display": "Author",
                    }
                ]
            },
            "who": {"display": sender or "unknown sender"},
        },
        {
            "type": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                        "code": "assembler",
                        "display": "Assembler",
                    }
                ]
            },
            "who": {"display": "fhirtwin HL7 v2 converter"},
        },
    ]
    prov["entity"] = [
        {
            "role": "source",
            "what": {
                "identifier": {
                    "system": "urn:fhirtwin:hl7v2:control-id",
                    "value": msg.control_id or "-",
                },
                "display": f"HL7 v2 {msg.msh.raw(9)} message {msg.control_id} from {sender}",
            },
        }
    ]
    return prov
