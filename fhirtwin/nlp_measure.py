"""Measurements and medication sigs written in clinical free text, by rules kept as data.

Two rule files in the NLP rules directory drive everything here:

* ``measurements.yaml`` - vital signs and simple measurements ("BP 120/80 mmHg", "T 101.2",
  "O2 sat 97% on room air", "height 5 feet 10 inches"): labels, unit spellings (UCUM),
  plausible ranges, LOINC codes. :func:`find_measurements` is a generic extractor built from
  them: it knows no vital sign by name.
* ``sig.yaml`` - medication dose / route / frequency / as-needed words ("25 mg p.o. b.i.d.
  p.r.n."): :func:`parse_sig` reads them after a medication mention.

:func:`load_rules` compiles both once per directory (cached by resolved path); a broken file
raises :class:`MeasureRulesError` naming the file, the rule and the fault.

Values are kept in the unit written (98.6 F stays ``[degF]``, 180 lbs stays ``[lb_av]``); the
only arithmetic is summing a compound value ("5 feet 10 inches" = 70 ``[in_i]``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fhirtwin import yamlfile

__all__ = [
    "MeasureRulesError",
    "Measurement",
    "Rules",
    "Sig",
    "find_measurements",
    "load_rules",
    "parse_sig",
]

MEASUREMENTS_FILE = "measurements.yaml"
SIG_FILE = "sig.yaml"


class MeasureRulesError(Exception):
    """A rules file is missing or wrong; the message names the file, the rule and the fault."""


@dataclass(frozen=True)
class Measurement:
    """One measurement found in text.

    ``start``/``end`` are character offsets of ``text`` (label, value and unit). For a panel
    (blood pressure) ``components`` hold the parts, each with the offsets of its own number,
    and ``value`` repeats the first component's value.
    """

    kind: str
    loinc: str
    display: str
    value: float
    unit: str
    start: int
    end: int
    components: tuple[Measurement, ...] = ()
    text: str = ""


@dataclass(frozen=True)
class Sig:
    """Dose, route, frequency and as-needed read after a medication mention.

    ``route`` is (SNOMED CT code, display); ``frequency`` is a FHIR ``Timing.repeat`` dict;
    ``text`` the sig words and ``end`` the offset just after them.
    """

    dose_value: float | None
    dose_unit: str | None
    route: tuple[str, str] | None
    frequency: dict[str, Any] | None
    as_needed: bool
    text: str
    end: int


# --------------------------------------------------------------------------- compiled rules


@dataclass(frozen=True)
class _Unit:
    code: str
    lo: float
    hi: float


@dataclass(frozen=True)
class _Component:
    kind: str
    loinc: str
    display: str
    lo: float
    hi: float


@dataclass(frozen=True)
class _Compound:
    code: str
    lo: float
    hi: float
    factors: tuple[float, ...]


@dataclass(frozen=True)
class _MRule:
    index: int
    kind: str
    loinc: str
    display: str
    ratio: bool
    descending: bool
    components: tuple[_Component, ...]
    units: tuple[_Unit, ...]
    compounds: tuple[_Compound, ...]
    default: _Unit | None
    infer: tuple[_Unit, ...]
    bare: str  # "" (never), "any", "with_unit"


@dataclass(frozen=True)
class _FreqRule:
    patterns: tuple[re.Pattern[str], ...]
    repeat: Mapping[str, Any]


@dataclass(frozen=True)
class Rules:
    """Compiled measurement and sig rules (build with :func:`load_rules`)."""

    path: Path
    master: re.Pattern[str]
    mrules: tuple[_MRule, ...]
    verifiers: Mapping[str, re.Pattern[str]]
    reject_after: re.Pattern[str]
    context_header: re.Pattern[str]
    context_stop: re.Pattern[str]
    context_max: int
    neighbor_gap: int
    sig_token: re.Pattern[str]
    sig_window: int
    sig_units: tuple[str, ...]
    sig_routes: tuple[tuple[str, str], ...]
    sig_freqs: tuple[_FreqRule, ...]
    sig_numbers: Mapping[str, float]
    period_units: tuple[tuple[re.Pattern[str], str], ...]


# --------------------------------------------------------------------------- loading helpers

_NAMED_GROUP = re.compile(r"\(\?P<[A-Za-z_][A-Za-z0-9_]*>")
_LOINC = re.compile(r"^\d{1,7}-\d$")


class _Ctx:
    """Where we are in a rules file, for error messages."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, what: str) -> MeasureRulesError:
        return MeasureRulesError(f"{self.path}: {where}: {what}")

    def regex(self, where: str, pattern: object, flags: int = re.IGNORECASE) -> str:
        """A pattern that compiles on its own, with named groups made plain groups."""
        if not isinstance(pattern, str) or not pattern:
            raise self.fail(where, f"expected a non-empty regex string, got {pattern!r}")
        if "(?P=" in pattern:
            raise self.fail(where, f"named back-references are not allowed: {pattern!r}")
        try:
            re.compile(pattern, flags)
        except re.error as exc:
            raise self.fail(where, f"bad regex {pattern!r}: {exc}") from None
        return pattern

    def mapping(self, where: str, value: object) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(where, f"expected a mapping, got {type(value).__name__}")
        return value

    def seq(self, where: str, value: object, *, empty: bool = False) -> Sequence[Any]:
        if not isinstance(value, list) or (not empty and not value):
            raise self.fail(where, f"expected a non-empty list, got {value!r}")
        return value

    def string(self, where: str, value: object) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"expected a non-empty string, got {value!r}")
        return value

    def keys(self, where: str, m: Mapping[str, Any], allowed: set[str], required: set[str]) -> None:
        unknown = sorted(set(m) - allowed)
        if unknown:
            raise self.fail(where, f"unknown key(s) {unknown} (allowed: {sorted(allowed)})")
        missing = sorted(required - set(m))
        if missing:
            raise self.fail(where, f"missing key(s) {missing}")

    def range(self, where: str, value: object) -> tuple[float, float]:
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            or not value[0] < value[1]
        ):
            raise self.fail(
                where, f"range must be [low, high] numbers with low < high, got {value!r}"
            )
        return float(value[0]), float(value[1])


def _read_yaml(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise MeasureRulesError(f"{path}: rules file not found")
    try:
        data = yamlfile.load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise MeasureRulesError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise MeasureRulesError(f"{path}: top level must be a mapping")
    if data.get("version") != 1:
        raise MeasureRulesError(f"{path}: version must be 1, got {data.get('version')!r}")
    return data


_INLINE_FLAGS = re.compile(r"\(\?([aiLmsux]*)(?:-([imsx]*))?(:|\))")


def _lower_pattern(pattern: str) -> str:
    """``pattern`` made to match lower-cased text: letters lower-cased except in escapes and
    group names, and the ``i`` flag dropped from inline flag groups."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if pattern.startswith(("(?P<", "(?P="), i):
            j = pattern.index(">" if pattern[i + 3] == "<" else ")", i)
            out.append(pattern[i : j + 1])
            i = j + 1
            continue
        m = _INLINE_FLAGS.match(pattern, i)
        if m:
            add, rem = m.group(1).replace("i", ""), (m.group(2) or "").replace("i", "")
            if m.group(3) == ":" or add or rem:
                out.append(f"(?{add}{'-' + rem if rem else ''}{m.group(3)}")
            i = m.end()
            continue
        out.append(c.lower())
        i += 1
    return "".join(out)


def _lower_text(text: str) -> str:
    """``text`` lower-cased, keeping every offset (a character whose lower case is longer
    than one character is left as it is)."""
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)


def _plain(pattern: str) -> str:
    return _NAMED_GROUP.sub("(?:", pattern)


def _alt(patterns: Sequence[str]) -> str:
    return "(?:" + "|".join(f"(?:{_plain(p)})" for p in patterns) + ")"


# --------------------------------------------------------------------------- measurements

_RULE_KEYS = {
    "kind", "loinc", "display", "labels", "value", "components", "descending", "units",
    "compound_units", "neutral_units", "default_unit", "infer_unit", "suffix_labels", "bare",
}  # fmt: skip


def _unit_list(
    ctx: _Ctx, where: str, raw: object, *, need_range: bool
) -> list[tuple[_Unit, list[str]]]:
    out: list[tuple[_Unit, list[str]]] = []
    for k, u in enumerate(ctx.seq(where, raw)):
        w = f"{where}[{k}]"
        um = ctx.mapping(w, u)
        ctx.keys(
            w,
            um,
            {"code", "spellings", "range"},
            {"code", "spellings"} | ({"range"} if need_range else set()),
        )
        code = ctx.string(f"{w}.code", um["code"])
        lo, hi = (
            ctx.range(f"{w}.range", um["range"]) if "range" in um else (float("-inf"), float("inf"))
        )
        spellings = [
            ctx.regex(f"{w}.spellings[{j}]", s)
            for j, s in enumerate(ctx.seq(f"{w}.spellings", um["spellings"]))
        ]
        out.append((_Unit(code, lo, hi), spellings))
    return out


def _compile_measurements(path: Path) -> dict[str, Any]:
    ctx = _Ctx(path)
    data = _read_yaml(path)
    ctx.keys(
        "top level",
        data,
        {"version", "fragments", "context", "neighbor_gap", "rules"},
        {"rules", "fragments"},
    )
    frags = ctx.mapping("fragments", data["fragments"])
    ctx.keys("fragments", frags, {"connector", "number", "ratio_number", "value_end", "reject_after"},
             {"connector", "number", "ratio_number", "value_end", "reject_after"})  # fmt: skip
    f = {k: ctx.regex(f"fragments.{k}", v) for k, v in frags.items()}
    connector, number, ratio_number = (
        _plain(f["connector"]),
        _plain(f["number"]),
        _plain(f["ratio_number"]),
    )
    value_end = _plain(f["value_end"])

    context = ctx.mapping("context", data.get("context", {}))
    ctx.keys("context", context, {"header", "max_chars", "stop"}, {"header", "max_chars", "stop"})
    max_chars = context["max_chars"]
    if not isinstance(max_chars, int) or max_chars <= 0:
        raise ctx.fail("context.max_chars", f"expected a positive integer, got {max_chars!r}")
    gap = data.get("neighbor_gap", 30)
    if not isinstance(gap, int) or gap < 0:
        raise ctx.fail("neighbor_gap", f"expected a non-negative integer, got {gap!r}")

    labeled: list[str] = []
    numeric: list[str] = []  # suffix-labelled values, then (``bare_values``) bare ones
    bare_values: list[str] = []
    verifiers: dict[str, re.Pattern[str]] = {}
    mrules: list[_MRule] = []
    seen_kinds: set[str] = set()
    for i, raw in enumerate(ctx.seq("rules", data["rules"])):
        name = raw.get("kind") if isinstance(raw, Mapping) else None
        where = f"rule {i} ({name})" if isinstance(name, str) else f"rule {i}"
        r = ctx.mapping(where, raw)
        ctx.keys(where, r, _RULE_KEYS, {"kind", "loinc", "display", "labels"})
        kind = ctx.string(f"{where}.kind", r["kind"])
        loinc = str(r["loinc"])
        if not _LOINC.match(loinc):
            raise ctx.fail(f"{where}.loinc", f"not a LOINC code: {loinc!r}")
        display = ctx.string(f"{where}.display", r["display"])
        seen_kinds.add(kind)

        # labels: plain ones, and those that only count next to another measurement
        plain_labels: list[str] = []
        neighbor_labels: list[str] = []
        for j, lab in enumerate(ctx.seq(f"{where}.labels", r["labels"])):
            lw = f"{where}.labels[{j}]"
            if isinstance(lab, str):
                plain_labels.append(ctx.regex(lw, lab))
                continue
            lm = ctx.mapping(lw, lab)
            ctx.keys(lw, lm, {"pattern", "case_sensitive", "needs_neighbor"}, {"pattern"})
            pat = _plain(ctx.regex(lw, lm["pattern"], 0 if lm.get("case_sensitive") else re.I))
            if lm.get("case_sensitive"):
                pat = f"(?-i:{pat})"
            (neighbor_labels if lm.get("needs_neighbor") else plain_labels).append(pat)

        value_kind = r.get("value", "number")
        if value_kind not in ("number", "ratio"):
            raise ctx.fail(f"{where}.value", f"must be 'number' or 'ratio', got {value_kind!r}")
        ratio = value_kind == "ratio"
        components: list[_Component] = []
        if ratio:
            comps = ctx.seq(f"{where}.components", r.get("components"))
            if len(comps) != 2:
                raise ctx.fail(f"{where}.components", "a ratio value needs exactly two components")
            for k, c in enumerate(comps):
                cw = f"{where}.components[{k}]"
                cm = ctx.mapping(cw, c)
                ctx.keys(
                    cw,
                    cm,
                    {"kind", "loinc", "display", "range"},
                    {"kind", "loinc", "display", "range"},
                )
                if not _LOINC.match(str(cm["loinc"])):
                    raise ctx.fail(f"{cw}.loinc", f"not a LOINC code: {cm['loinc']!r}")
                lo, hi = ctx.range(f"{cw}.range", cm["range"])
                components.append(
                    _Component(
                        ctx.string(f"{cw}.kind", cm["kind"]),
                        str(cm["loinc"]),
                        ctx.string(f"{cw}.display", cm["display"]),
                        lo,
                        hi,
                    )
                )
        elif "components" in r:
            raise ctx.fail(f"{where}.components", "components need `value: ratio`")

        units = (
            _unit_list(ctx, f"{where}.units", r["units"], need_range=not ratio)
            if "units" in r
            else []
        )
        compounds: list[tuple[_Compound, list[tuple[list[str], bool]]]] = []
        for k, cu in enumerate(
            ctx.seq(f"{where}.compound_units", r.get("compound_units", []), empty=True)
        ):
            cw = f"{where}.compound_units[{k}]"
            cm = ctx.mapping(cw, cu)
            ctx.keys(cw, cm, {"code", "range", "parts"}, {"code", "range", "parts"})
            parts: list[tuple[list[str], bool]] = []
            factors: list[float] = []
            for j, p in enumerate(ctx.seq(f"{cw}.parts", cm["parts"])):
                pw = f"{cw}.parts[{j}]"
                pm = ctx.mapping(pw, p)
                ctx.keys(pw, pm, {"spellings", "factor", "optional"}, {"spellings", "factor"})
                if not isinstance(pm["factor"], int | float) or isinstance(pm["factor"], bool):
                    raise ctx.fail(f"{pw}.factor", f"expected a number, got {pm['factor']!r}")
                if j == 0 and pm.get("optional"):
                    raise ctx.fail(pw, "the first part cannot be optional")
                sp = [
                    ctx.regex(f"{pw}.spellings[{n}]", s)
                    for n, s in enumerate(ctx.seq(f"{pw}.spellings", pm["spellings"]))
                ]
                parts.append((sp, bool(pm.get("optional"))))
                factors.append(float(pm["factor"]))
            lo, hi = ctx.range(f"{cw}.range", cm["range"])
            compounds.append(
                (_Compound(ctx.string(f"{cw}.code", cm["code"]), lo, hi, tuple(factors)), parts)
            )
        neutral = [
            ctx.regex(f"{where}.neutral_units[{j}]", s)
            for j, s in enumerate(
                ctx.seq(f"{where}.neutral_units", r.get("neutral_units", []), empty=True)
            )
        ]

        default: _Unit | None = None
        if "default_unit" in r:
            code = ctx.string(f"{where}.default_unit", r["default_unit"])
            match = [u for u, _ in units if u.code == code]
            if not match:
                raise ctx.fail(f"{where}.default_unit", f"{code!r} is not one of the rule's units")
            default = match[0]
        infer: list[_Unit] = []
        for k, inf in enumerate(
            ctx.seq(f"{where}.infer_unit", r.get("infer_unit", []), empty=True)
        ):
            iw = f"{where}.infer_unit[{k}]"
            im = ctx.mapping(iw, inf)
            ctx.keys(iw, im, {"code", "range"}, {"code", "range"})
            lo, hi = ctx.range(f"{iw}.range", im["range"])
            infer.append(_Unit(ctx.string(f"{iw}.code", im["code"]), lo, hi))
        if default and infer:
            raise ctx.fail(where, "give default_unit or infer_unit, not both")
        if ratio and not default:
            raise ctx.fail(where, "a ratio value needs a default_unit")
        if not units and not compounds:
            raise ctx.fail(where, "needs `units` or `compound_units`")
        suffixes = [
            ctx.regex(f"{where}.suffix_labels[{j}]", s)
            for j, s in enumerate(
                ctx.seq(f"{where}.suffix_labels", r.get("suffix_labels", []), empty=True)
            )
        ]
        bare = {False: "", True: "any", "with_unit": "with_unit"}.get(r.get("bare", False))
        if bare is None:
            raise ctx.fail(f"{where}.bare", f"expected true, false or with_unit, got {r['bare']!r}")
        descending = r.get("descending", False)
        if not isinstance(descending, bool) or (descending and not ratio):
            raise ctx.fail(f"{where}.descending", "must be a boolean, and only for ratio values")

        mrules.append(
            _MRule(i, kind, loinc, display, ratio, descending, tuple(components),
                   tuple(u for u, _ in units), tuple(c for c, _ in compounds), default, tuple(infer), bare)
        )  # fmt: skip

        value = functools.partial(
            _value_pattern,
            index=i,
            units=[sp for _, sp in units],
            neutral=neutral,
            ratio=ratio,
            compounds=[parts for _, parts in compounds],
            frags=(number, ratio_number, value_end),
        )

        # Each alternative ends in an empty marker group naming it (``m.lastgroup``), so that
        # it starts with its label (or digit) and the regex engine skips it fast.
        for alt, labels in (("L", plain_labels), ("N", neighbor_labels)):
            if not labels:
                continue
            labeled.append(
                f"{_alt(labels)}(?![A-Za-z])(?P<{alt}{i}_l>){connector}{value(alt)}(?P<{alt}{i}>)"
            )
            if any(lab.startswith("(?-i:") for lab in labels):
                verifiers[f"{alt}{i}"] = re.compile(_alt(labels), re.IGNORECASE)
        if suffixes:
            numeric.append(f"{value('S')}{_alt(suffixes)}(?P<S{i}>)")
        if bare:
            bare_values.append(f"{value('B', bare == 'with_unit')}(?P<B{i}>)")
    if not mrules:
        raise ctx.fail("rules", "no rules")
    # Matched against lower-cased text without IGNORECASE: much faster; case-sensitive labels
    # are checked against the original text afterwards (``verifiers``).
    numeric += bare_values
    combined = "(?<![A-Za-z0-9])(?:" + "|".join(labeled)
    if numeric:
        combined += "|(?=\\d)(?<![\\w./-])(?:" + "|".join(numeric) + ")"
    combined += ")"
    try:
        master = re.compile(_lower_pattern(combined))
    except (re.error, AssertionError, OverflowError, RecursionError) as exc:
        raise ctx.fail("rules", f"the combined pattern does not compile: {exc}") from None
    return {
        "master": master,
        "mrules": tuple(mrules),
        "verifiers": verifiers,
        "reject_after": re.compile(_lower_pattern(_plain(f["reject_after"]))),
        "context_header": re.compile(
            _lower_pattern(ctx.regex("context.header", context["header"]))
        ),
        "context_stop": re.compile(ctx.regex("context.stop", context["stop"], 0)),
        "context_max": max_chars,
        "neighbor_gap": gap,
    }


def _value_pattern(
    prefix: str,
    unit_required: bool = False,
    *,
    index: int,
    units: list[list[str]],
    neutral: list[str],
    ratio: bool,
    compounds: list[list[tuple[list[str], bool]]],
    frags: tuple[str, str, str],
) -> str:
    """The value (+unit) pattern of rule ``index``, its groups named ``{prefix}{index}_...``."""
    number, ratio_number, value_end = frags
    g = f"{prefix}{index}_"
    unit_alts = [f"(?P<{g}u{k}>{_alt(sp)})" for k, sp in enumerate(units)]
    if neutral and not unit_required:
        unit_alts.append(f"(?P<{g}n>{_alt(neutral)})")
    # a written unit ends the value; without one, the value must not run on (value_end)
    unit = f"\\s*(?:{'|'.join(unit_alts)})(?![A-Za-z])"
    if not unit_required:
        unit = f"(?:{unit}|{value_end})" if unit_alts else value_end
    if ratio:
        return f"(?P<{g}v>{ratio_number})\\s*/\\s*(?P<{g}w>{ratio_number}){unit}"
    alts = []
    for k, parts in enumerate(compounds):
        seq = ""
        for j, (sp, optional) in enumerate(parts):
            piece = f"(?P<{g}c{k}p{j}>{number})\\s*{_alt(sp)}(?![A-Za-z])"
            if j:
                piece = f"\\s*(?:and\\s+)?{piece}"
            seq += f"(?:{piece})?" if optional else piece
        alts.append(f"(?P<{g}c{k}>{seq}{value_end})")
    alts.append(f"(?P<{g}v>{number}){unit}")
    return "(?:" + "|".join(alts) + ")"


# --------------------------------------------------------------------------- sig

_TEMPLATE = re.compile(r"^\$(n|m|unit)$")
_PERIOD_UNITS = ("s", "min", "h", "d", "wk", "mo", "a")


def _compile_sig(path: Path) -> dict[str, Any]:
    ctx = _Ctx(path)
    data = _read_yaml(path)
    allowed = {
        "version",
        "window",
        "numbers",
        "units",
        "routes",
        "period_units",
        "frequencies",
        "as_needed",
        "skip",
    }
    ctx.keys("top level", data, allowed, allowed - {"version"})
    window = data["window"]
    if not isinstance(window, int) or window <= 0:
        raise ctx.fail("window", f"expected a positive integer, got {window!r}")
    numbers: dict[str, float] = {}
    for word, v in ctx.mapping("numbers", data["numbers"]).items():
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise ctx.fail(f"numbers.{word}", f"expected a number, got {v!r}")
        numbers[str(word).lower()] = float(v)
    number_words = "|".join(
        re.escape(w).replace(r"\ ", r"\s+") for w in sorted(numbers, key=len, reverse=True)
    )
    num = rf"(?:\d+(?:\.\d+)?|\.\d+|{number_words})" if number_words else r"(?:\d+(?:\.\d+)?|\.\d+)"

    unit_codes: list[str] = []
    unit_spellings: list[str] = []
    for k, u in enumerate(ctx.seq("units", data["units"])):
        w = f"units[{k}] ({u.get('code') if isinstance(u, Mapping) else '?'})"
        um = ctx.mapping(w, u)
        ctx.keys(w, um, {"code", "spellings"}, {"code", "spellings"})
        unit_codes.append(ctx.string(f"{w}.code", um["code"]))
        sp = [
            ctx.regex(f"{w}.spellings[{j}]", s)
            for j, s in enumerate(ctx.seq(f"{w}.spellings", um["spellings"]))
        ]
        unit_spellings.append(_alt(sp))

    def units(prefix: str) -> str:
        """Any unit, each in a group named ``{prefix}{k}`` (k = its index in ``units``)."""
        return "(?:" + "|".join(f"(?P<{prefix}{k}>{a})" for k, a in enumerate(unit_spellings)) + ")"

    routes: list[tuple[str, str]] = []
    route_alts: list[str] = []
    for k, r in enumerate(ctx.seq("routes", data["routes"])):
        w = f"routes[{k}] ({r.get('display') if isinstance(r, Mapping) else '?'})"
        rm = ctx.mapping(w, r)
        ctx.keys(w, rm, {"code", "display", "spellings"}, {"code", "display", "spellings"})
        code = str(rm["code"])
        if not re.fullmatch(r"\d{6,18}", code):
            raise ctx.fail(f"{w}.code", f"not a SNOMED CT identifier: {code!r}")
        routes.append((code, ctx.string(f"{w}.display", rm["display"])))
        sp = [
            ctx.regex(f"{w}.spellings[{j}]", s)
            for j, s in enumerate(ctx.seq(f"{w}.spellings", rm["spellings"]))
        ]
        route_alts.append(f"(?P<r{k}>{_alt(sp)})")

    period_units: list[tuple[re.Pattern[str], str]] = []
    for code, spellings in ctx.mapping("period_units", data["period_units"]).items():
        if code not in _PERIOD_UNITS:
            raise ctx.fail(f"period_units.{code}", f"not a FHIR Timing periodUnit {_PERIOD_UNITS}")
        for j, s in enumerate(ctx.seq(f"period_units.{code}", spellings)):
            period_units.append((re.compile(ctx.regex(f"period_units.{code}[{j}]", s), re.I), code))

    freqs: list[_FreqRule] = []
    freq_alts: list[str] = []
    for k, fr in enumerate(ctx.seq("frequencies", data["frequencies"])):
        w = f"frequencies[{k}]"
        fm = ctx.mapping(w, fr)
        ctx.keys(w, fm, {"spellings", "repeat"}, {"spellings", "repeat"})
        sp = [
            ctx.regex(f"{w}.spellings[{j}]", s)
            for j, s in enumerate(ctx.seq(f"{w}.spellings", fm["spellings"]))
        ]
        repeat = dict(ctx.mapping(f"{w}.repeat", fm["repeat"]))
        if not repeat:
            raise ctx.fail(f"{w}.repeat", "is empty")
        pats = tuple(re.compile(s, re.IGNORECASE) for s in sp)
        for key, v in repeat.items():
            if key not in (
                "frequency",
                "frequencyMax",
                "period",
                "periodMax",
                "periodUnit",
                "when",
            ):
                raise ctx.fail(f"{w}.repeat.{key}", "not a Timing.repeat element this parser fills")
            if isinstance(v, str) and v.startswith("$"):
                t = _TEMPLATE.match(v)
                if not t:
                    raise ctx.fail(
                        f"{w}.repeat.{key}", f"unknown placeholder {v!r} (use $n, $m or $unit)"
                    )
                for j, p in enumerate(pats):
                    if t.group(1) not in p.groupindex:
                        raise ctx.fail(
                            f"{w}.spellings[{j}]",
                            f"has no (?P<{t.group(1)}>...) group for {key}: {v}",
                        )
            elif key == "when":
                if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                    raise ctx.fail(
                        f"{w}.repeat.when", f"expected a list of EventTiming codes, got {v!r}"
                    )
            elif key == "periodUnit":
                if v not in _PERIOD_UNITS:
                    raise ctx.fail(f"{w}.repeat.periodUnit", f"not a FHIR periodUnit: {v!r}")
            elif not isinstance(v, int | float) or isinstance(v, bool):
                raise ctx.fail(
                    f"{w}.repeat.{key}", f"expected a number or a placeholder, got {v!r}"
                )
        freqs.append(_FreqRule(pats, repeat))
        freq_alts.append(f"(?P<f{k}>{_alt(sp)})")

    prn = [
        ctx.regex(f"as_needed[{j}]", s)
        for j, s in enumerate(ctx.seq("as_needed", data["as_needed"]))
    ]
    skip = [ctx.regex(f"skip[{j}]", s) for j, s in enumerate(ctx.seq("skip", data["skip"]))]

    end = r"(?![A-Za-z0-9])"
    tokens = [
        # a numbered list item ("2.  Metformin") starts another medication
        r"(?P<item>\d{1,2}[.)]\s+(?=[A-Za-z]))",
        # a combination strength ("70/30", "800 mg/160 mg"): no single dose
        rf"(?P<combo>\d+(?:\.\d+)?\s*(?:{units('cu')})?\s*/\s*\d+(?:\.\d+)?(?:\s*{units('cv')})?){end}",
        # a range ("1-2 tablets"): no single dose, but the unit
        rf"(?P<range>{num}\s*(?:-|to)\s*{num}(?:\s*{units('ru')})?){end}",
        *(f"(?:{a}){end}" for a in freq_alts),
        rf"(?P<dose>(?P<dv>{num})(?:\s*-?\s*{units('du')})?){end}",
        f"(?P<prn>{_alt(prn)}){end}",
        *(f"(?:{a}){end}" for a in route_alts),
        rf"(?P<form>{units('fu')}){end}",
        f"(?P<skip>{_alt(skip)}){end}",
        r"(?P<sep>,|;|\band\b|\.|\(|\)|-)",
    ]
    try:
        token = re.compile("|".join(tokens), re.IGNORECASE)
    except re.error as exc:
        raise ctx.fail(
            "units/routes/frequencies", f"the combined pattern does not compile: {exc}"
        ) from None
    return {
        "sig_token": token,
        "sig_window": window,
        "sig_units": tuple(unit_codes),
        "sig_routes": tuple(routes),
        "sig_freqs": tuple(freqs),
        "sig_numbers": numbers,
        "period_units": tuple(period_units),
    }


@functools.cache
def _load(resolved: Path) -> Rules:
    m = _compile_measurements(resolved / MEASUREMENTS_FILE)
    s = _compile_sig(resolved / SIG_FILE)
    return Rules(path=resolved, **m, **s)


def load_rules(nlp_dir: Path) -> Rules:
    """Compile ``measurements.yaml`` and ``sig.yaml`` from ``nlp_dir``; cached by resolved path."""
    return _load(Path(nlp_dir).resolve())


# --------------------------------------------------------------------------- extraction


def _number(s: str) -> float:
    """ "98.6" -> 98.6; "189-1/2" and "42 1/4" -> whole + fraction."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(?:[-\s]+(\d)/(\d))?", s.strip())
    if not m:
        raise ValueError(s)
    v = float(m.group(1))
    if m.group(2):
        v += int(m.group(2)) / int(m.group(3))
    return v


def _contexts(text: str, low: str, rules: Rules) -> list[tuple[int, int]]:
    """Vital-signs contexts: header (matched in lower case) to the next section (as written)."""
    out = []
    for h in rules.context_header.finditer(low):
        end = min(len(text), h.end() + rules.context_max)
        stop = rules.context_stop.search(text, h.end(), end)
        out.append((h.start(), stop.start() if stop else end))
    return out


def _in(pos: int, spans: list[tuple[int, int]]) -> bool:
    return any(a <= pos < b for a, b in spans)


def _measure(m: re.Match[str], alt: str, rule: _MRule, text: str) -> Measurement | None:
    g = f"{alt}{rule.index}_"
    start, end = m.span()
    whole = text[start:end]
    if rule.ratio:
        out = []
        for comp, grp in zip(rule.components, ("v", "w"), strict=True):
            v = float(m.group(g + grp))
            if not comp.lo <= v <= comp.hi:
                return None
            s, e = m.span(g + grp)
            out.append(Measurement(comp.kind, comp.loinc, comp.display, v, "", s, e, (), text[s:e]))
        if rule.descending and not out[0].value > out[1].value:
            return None
        unit = next((u.code for k, u in enumerate(rule.units) if m.group(f"{g}u{k}")), None)
        code = unit or (rule.default.code if rule.default else "")
        comps = tuple(
            Measurement(c.kind, c.loinc, c.display, c.value, code, c.start, c.end, (), c.text)
            for c in out
        )
        return Measurement(
            rule.kind, rule.loinc, rule.display, comps[0].value, code, start, end, comps, whole
        )
    for k, compound in enumerate(rule.compounds):
        if m.group(f"{g}c{k}") is None:
            continue
        total = 0.0
        for j, factor in enumerate(compound.factors):
            part = m.group(f"{g}c{k}p{j}")
            if part is not None:
                total += _number(part) * factor
        if not compound.lo <= total <= compound.hi:
            return None
        return Measurement(
            rule.kind, rule.loinc, rule.display, total, compound.code, start, end, (), whole
        )
    value = _number(m.group(g + "v"))
    written = next((u for k, u in enumerate(rule.units) if m.group(f"{g}u{k}")), None)
    if written is None:
        if rule.default is not None:
            written = rule.default
        else:
            written = next((u for u in rule.infer if u.lo <= value <= u.hi), None)
            if written is None:
                return None
    if not written.lo <= value <= written.hi:
        return None
    return Measurement(
        rule.kind, rule.loinc, rule.display, value, written.code, start, end, (), whole
    )


def find_measurements(text: str, rules: Rules) -> list[Measurement]:
    """Every measurement the rules find in ``text``: non-overlapping, in text order.

    Values outside the rule's plausible range, values running on into a date, a range or a
    dose unit, bare numbers without a label (outside a vital-signs context, for rules that
    allow it) and single-letter labels ("T", "P", "R") standing alone are all dropped.
    """
    found: list[tuple[Measurement, bool]] = []  # (measurement, needs a neighbour)
    contexts: list[tuple[int, int]] | None = None
    master, mrules, reject_after = rules.master, rules.mrules, rules.reject_after
    low = _lower_text(text)
    pos = 0
    n = len(text)
    while pos < n:
        m = master.search(low, pos)
        if m is None:
            break
        name = m.lastgroup or ""
        alt, rule = name[0], mrules[int(name[1:])]
        ok = reject_after.match(low, m.end()) is None
        verify = rules.verifiers.get(name)
        if ok and verify is not None:
            ok = verify.fullmatch(text, m.start(), m.start(name + "_l")) is not None
        if ok and alt == "B":
            if rule.bare == "with_unit":
                g = f"B{rule.index}_"
                ok = any(m.group(f"{g}u{k}") for k in range(len(rule.units))) or any(
                    m.group(f"{g}c{k}") for k in range(len(rule.compounds))
                )
            if contexts is None:
                contexts = _contexts(text, low, rules)
            ok = ok and _in(m.start(), contexts)
        meas = _measure(m, alt, rule, text) if ok else None
        if meas is None:
            pos = m.start() + 1
            continue
        found.append((meas, alt == "N"))
        pos = m.end()
    if not any(need for _, need in found):
        return [meas for meas, _ in found]
    if contexts is None:
        contexts = _contexts(text, low, rules)
    gap = rules.neighbor_gap
    out = []
    for i, (meas, need) in enumerate(found):
        if need and not _in(meas.start, contexts):
            near = any(
                j != i and (0 <= meas.start - o.end <= gap or 0 <= o.start - meas.end <= gap)
                for j, (o, _) in enumerate(found)
            )
            if not near:
                continue
        out.append(meas)
    return out


# --------------------------------------------------------------------------- sig


def _to_number(s: str, rules: Rules) -> float:
    s = re.sub(r"\s+", " ", s.strip().lower())
    if s in rules.sig_numbers:
        return rules.sig_numbers[s]
    return float(s)


def _period_unit(s: str, rules: Rules) -> str | None:
    for spelling, code in rules.period_units:
        if spelling.fullmatch(s):
            return code
    return None


def _repeat(rule: _FreqRule, text: str, pos: int, rules: Rules) -> dict[str, Any] | None:
    for p in rule.patterns:
        fm = p.match(text, pos)
        if fm is None:
            continue
        out: dict[str, Any] = {}
        for key, v in rule.repeat.items():
            if isinstance(v, str) and v.startswith("$"):
                got = fm.group(v[1:])
                if got is None:
                    continue
                if v == "$unit":
                    unit = _period_unit(got, rules)
                    if unit is None:
                        return None
                    out[key] = unit
                else:
                    num = _to_number(got, rules)
                    out[key] = int(num) if num.is_integer() else num
            elif key == "when":
                out[key] = list(v)
            else:
                out[key] = v
        return out
    return None


def _merge(into: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    if into is None:
        return dict(new)
    for key, v in new.items():
        if key == "when":
            into["when"] = [*into.get("when", []), *(w for w in v if w not in into.get("when", []))]
        else:
            into.setdefault(key, v)
    return into


def parse_sig(text: str, start: int, rules: Rules) -> Sig | None:
    """The sig written from ``start`` (just after a medication mention), or None if none is.

    Reads known sig words only: stops at an unknown word, a sentence end, a comma or "and"
    not followed by sig words, a numbered list item, or past the rules' window.
    """
    token = rules.sig_token
    limit = start + rules.sig_window
    n = len(text)
    pos = start
    first: int | None = None
    last_end = start
    dose_value: float | None = None
    dose_unit: str | None = None
    route: tuple[str, str] | None = None
    freq: dict[str, Any] | None = None
    prn = False
    evidence = False
    while pos < n:
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n or pos >= limit:
            break
        m = token.match(text, pos)
        if m is None:
            break
        kind = m.lastgroup or ""
        if kind in ("item",):
            break
        if kind == "sep":
            sep = m.group(0)
            if sep == ";":
                break
            nxt = pos + len(sep)
            while nxt < n and text[nxt].isspace():
                nxt += 1
            if sep == "." and (nxt >= n or text[nxt].isupper() or text[nxt] == ","):
                break
            ahead = token.match(text, nxt) if nxt < n else None
            if sep in (",", "and") and (
                ahead is None or (ahead.lastgroup or "") in ("sep", "item")
            ):
                break
            pos = m.end()
            continue
        if kind.startswith("f") and kind[1:].isdigit():
            rep = _repeat(rules.sig_freqs[int(kind[1:])], text, pos, rules)
            if rep is None:
                break
            freq = _merge(freq, rep)
            evidence = True
        elif kind.startswith("r") and kind[1:].isdigit():
            if route is None:
                route = rules.sig_routes[int(kind[1:])]
            evidence = True
        elif kind == "prn":
            prn = evidence = True
        elif kind in ("dose", "range", "combo"):
            prefixes = {"dose": ("du",), "range": ("ru",), "combo": ("cu", "cv")}[kind]
            unit = next(
                (
                    code
                    for p in prefixes
                    for k, code in enumerate(rules.sig_units)
                    if m.group(f"{p}{k}") is not None
                ),
                None,
            )
            if kind == "dose" and (dose_value is None or (dose_unit is None and unit is not None)):
                # the first dose; a later one only if it brings the unit the first lacked
                dose_value = _to_number(m.group("dv"), rules)
                dose_unit = unit
            elif kind != "dose" and dose_value is None and dose_unit is None:
                dose_unit = unit
            evidence = True
        if kind != "skip":
            # the sig words run from the first to the last word that is not merely skipped
            if first is None:
                first = pos
            last_end = m.end()
        pos = m.end()
    if not evidence or first is None:
        return None
    return Sig(dose_value, dose_unit, route, freq, prn, text[first:last_end], last_end)
