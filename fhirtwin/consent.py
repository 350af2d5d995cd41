"""The consent engine: FHIR R4 ``Consent`` resources in, PERMIT / DENY / NOT_APPLICABLE /
INDETERMINATE out, as ``../shared/CONSENT.md`` fixes it.

The engine is a pure function of its inputs: no I/O at decision time, no clock (``now`` is an
argument), no network. A reference found in a consent is resolved against the resources passed
as ``known`` and the consent's ``contained`` resources, and nowhere else: a URL is a string to
compare, never an address to fetch (SSRF). The only files it reads are the code systems of
``mappings/consent/``, once per process.

Two steps, because snapshots decide thousands of resources for one (patient, subscriber):

* :func:`prepare` compiles the patient's consents for one request and one ``now``: it drops
  the superseded versions and the consents that do not apply (status, period, scope, root
  purpose), and prunes every provision whose *context* (actor, action, purpose, period) does
  not match the request. What is left is a small tree of *content* tests (class, code,
  security label, data period, data references).
* :meth:`Policy.decide` runs those content tests on one resource (or, without a resource,
  gives the request-level decision and its obligations). It touches only the elements a
  remaining provision tests, each at most once per resource.

:func:`decide` does both in one call. Every choice marked **(ours)** in CONSENT.md, and those
the engine had to add, are documented in ``docs/consent.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from fhirtwin import yamlfile
from fhirtwin.twin import clinical_time_ms

__all__ = [
    "DENY",
    "INDETERMINATE",
    "NOT_APPLICABLE",
    "PERMIT",
    "ConsentError",
    "Decision",
    "Policy",
    "Request",
    "RequestError",
    "Terminology",
    "decide",
    "parse_request",
    "prepare",
    "terminology",
]

PERMIT = "PERMIT"
DENY = "DENY"
NOT_APPLICABLE = "NOT_APPLICABLE"
INDETERMINATE = "INDETERMINATE"

SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"
ACTION_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentaction"
RESOURCE_TYPES_SYSTEM = "http://hl7.org/fhir/resource-types"
MIME_SYSTEM = "urn:ietf:bcp:13"
SCOPES = ("patient-privacy", "research")
ACTIONS = ("collect", "access", "use", "disclose", "correct")
# What a subscriber receiving a snapshot does, in consentaction words (ours): we disclose,
# it accesses and uses. A provision naming any of them is about this flow.
DEFAULT_ACTIONS = ("access", "disclose", "use")

# Elements of a resource that carry "its codes" for provision.code (ours).
_CODE_FIELDS = ("code", "type", "vaccineCode", "medicationCodeableConcept", "category", "class")
# Elements that say who authored a resource, for data.meaning = authoredby (ours).
_AUTHOR_FIELDS = (
    "author",
    "recorder",
    "asserter",
    "requester",
    "performer",
    "enterer",
    "informationSource",
    "sender",
    "attester",
    "source",
)


class ConsentError(ValueError):
    """A consent the engine cannot read; ``where`` is the JSON path of the problem."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.message = message
        self.where = where


class RequestError(ValueError):
    """A request that does not follow the format of ``docs/consent.md``."""


# -- terminology -------------------------------------------------------------------------


@dataclass(frozen=True)
class Terminology:
    """The code systems the engine reasons with (``mappings/consent/``)."""

    actreason_system: str
    parent: Mapping[str, str | None]
    research: frozenset[str]
    break_glass: frozenset[str]
    conf_system: str
    conf_order: Mapping[str, int]
    conf_unlabelled: int
    exact_systems: frozenset[str]

    def ancestors(self, code: str) -> tuple[str, ...]:
        """``code`` and every code it specializes, nearest first; empty when unknown."""
        if code not in self.parent:
            return ()
        out = [code]
        up = self.parent[code]
        while up is not None:
            out.append(up)
            up = self.parent.get(up)
        return tuple(out)

    def subsumes(self, general: str, specific: str) -> bool | None:
        """Does a consent naming ``general`` cover a request for ``specific``?

        None when ``general`` is not a known purpose: the caller fails closed.
        """
        if general not in self.parent:
            return None
        if general == specific:
            return True
        return general in self.ancestors(specific)

    def is_research(self, code: str) -> bool:
        return any(a in self.research for a in self.ancestors(code))

    def is_break_glass(self, code: str) -> bool:
        return any(a in self.break_glass for a in self.ancestors(code)) or code in self.break_glass


def _walk_tree(
    tree: Mapping[str, Any] | None, parent: str | None, out: dict[str, str | None]
) -> None:
    for code, children in (tree or {}).items():
        code = str(code)
        if code in out:
            raise ConsentError(f"ActReason code {code} appears twice", "actreason.yaml")
        out[code] = parent
        if children is not None and not isinstance(children, Mapping):
            raise ConsentError(f"children of {code} must be a mapping", "actreason.yaml")
        _walk_tree(children, code, out)


@functools.cache
def terminology(folder: str | None = None) -> Terminology:
    """Load ``<mappings>/consent/*.yaml`` (default: :func:`fhirtwin.rules.default_mappings_dir`)."""
    if folder is None:
        from fhirtwin.rules import default_mappings_dir

        base = default_mappings_dir() / "consent"
    else:
        base = Path(folder)
    with (base / "actreason.yaml").open("rb") as fh:
        ar = yamlfile.load(fh)
    with (base / "labels.yaml").open("rb") as fh:
        lb = yamlfile.load(fh)
    parent: dict[str, str | None] = {}
    _walk_tree(ar["tree"], None, parent)
    conf = lb["confidentiality"]
    order = {str(c): i for i, c in enumerate(conf["order"])}
    return Terminology(
        actreason_system=str(ar["system"]),
        parent=parent,
        research=frozenset(str(c) for c in ar.get("research", ())),
        break_glass=frozenset(str(c) for c in ar.get("break_glass", ())),
        conf_system=str(conf["system"]),
        conf_order=order,
        conf_unlabelled=order[str(conf["unlabelled"])],
        exact_systems=frozenset(str(s) for s in (lb.get("exact") or {})),
    )


# -- request -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """Who asks, for what (see ``docs/consent.md`` for the JSON form)."""

    actor: frozenset[str]
    purpose: tuple[str, ...]
    scope: str
    classes: frozenset[str] | None = None
    action: frozenset[str] = frozenset(DEFAULT_ACTIONS)
    simulation: bool = True
    default: str = "deny"
    deidentify: str | None = None
    subscriber: str | None = None


_REQUEST_KEYS = {
    "actor",
    "purpose",
    "scope",
    "class",
    "action",
    "simulation",
    "default",
    "deidentify",
    "subscriber",
}


def _strings(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RequestError(f"request.{key} must be a list of non-empty strings")
    return value


def parse_request(data: Mapping[str, Any] | Request, term: Terminology | None = None) -> Request:
    """Check a request object (the JSON of ``docs/consent.md``) and make a :class:`Request`."""
    if isinstance(data, Request):
        return data
    if not isinstance(data, Mapping):
        raise RequestError("the request must be a JSON object")
    term = term or terminology()
    unknown = sorted(set(data) - _REQUEST_KEYS)
    if unknown:
        raise RequestError(f"unknown request key(s): {', '.join(unknown)}")
    for key in ("actor", "purpose", "scope"):
        if key not in data:
            raise RequestError(f"request.{key} is required")
    actor = _strings(data["actor"], "actor") if data["actor"] != [] else []
    purposes = []
    for p in _strings(data["purpose"], "purpose"):
        system, _, code = p.rpartition("|")
        if system and system != term.actreason_system:
            raise RequestError(f"request.purpose {p!r}: not a v3 ActReason code")
        purposes.append(code)
    scope = data["scope"]
    if scope not in SCOPES:
        raise RequestError(f"request.scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    research = [p for p in purposes if term.is_research(p)]
    if scope == "research" and len(research) != len(purposes):
        raise RequestError("request.scope is research but a purpose is not a research purpose")
    if scope != "research" and research:
        raise RequestError(
            f"request.purpose {research[0]} is a research purpose: use scope research"
        )
    classes = None
    if data.get("class") is not None:
        classes = frozenset(_strings(data["class"], "class"))
    action = frozenset(DEFAULT_ACTIONS)
    if data.get("action") is not None:
        action = frozenset(_strings(data["action"], "action"))
        bad = sorted(action - set(ACTIONS))
        if bad:
            raise RequestError(f"request.action {bad[0]!r} is not a consentaction code")
    simulation = data.get("simulation", True)
    if not isinstance(simulation, bool):
        raise RequestError("request.simulation must be true or false")
    default = data.get("default", "deny")
    if default not in ("permit", "deny"):
        raise RequestError("request.default must be permit or deny")
    deid = data.get("deidentify")
    if deid is not None and not isinstance(deid, str):
        raise RequestError("request.deidentify must be a profile name")
    sub = data.get("subscriber")
    if sub is not None and not isinstance(sub, str):
        raise RequestError("request.subscriber must be a string")
    return Request(
        actor=frozenset(actor),
        purpose=tuple(purposes),
        scope=scope,
        classes=classes,
        action=action,
        simulation=simulation,
        default=default,
        deidentify=deid,
        subscriber=sub,
    )


# -- decision ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """The outcome, and what an auditor needs to know about how it came about.

    ``allowed`` applies the subscriber's registered default to NOT_APPLICABLE (never for
    research) and treats INDETERMINATE as deny; the publisher discloses only when it is true.
    """

    decision: str
    allowed: bool
    obligations: tuple[dict[str, Any], ...] = ()
    deciding: tuple[dict[str, str], ...] = ()
    consents: tuple[dict[str, str], ...] = ()
    reasons: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "allowed": self.allowed,
            "obligations": list(self.obligations),
            "deciding": list(self.deciding),
            "consents": list(self.consents),
            "reasons": list(self.reasons),
        }


# -- time --------------------------------------------------------------------------------


def _span(value: Any) -> tuple[int, int] | None:
    """A FHIR date/dateTime/instant as [first ms, first ms after it), UTC; None if unreadable.

    Precision counts: ``2016`` spans the whole year, ``2016-01-01`` the whole day, so a
    period ending ``2016-01-01`` still holds at 23:59 that day.
    """
    if not isinstance(value, str) or len(value) < 4:
        return None
    try:
        if len(value) == 4:
            y = int(value)
            return _ms(datetime(y, 1, 1, tzinfo=UTC)), _ms(datetime(y + 1, 1, 1, tzinfo=UTC))
        if len(value) == 7:
            y, m = int(value[:4]), int(value[5:7])
            nxt = (
                datetime(y + 1, 1, 1, tzinfo=UTC) if m == 12 else datetime(y, m + 1, 1, tzinfo=UTC)
            )
            return _ms(datetime(y, m, 1, tzinfo=UTC)), _ms(nxt)
        if len(value) == 10:
            lo = _ms(datetime(int(value[:4]), int(value[5:7]), int(value[8:10]), tzinfo=UTC))
            return lo, lo + 86_400_000
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    lo = _ms(dt)
    return lo, lo + (1 if dt.microsecond else 1000)


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def _in_period(period: Any, t: int) -> bool | None:
    """Is ``t`` inside a FHIR Period? None when a bound is unreadable."""
    if period is None:
        return True
    if not isinstance(period, Mapping):
        return None
    ok = True
    if period.get("start") is not None:
        s = _span(period["start"])
        if s is None:
            return None
        ok = ok and t >= s[0]
    if period.get("end") is not None:
        e = _span(period["end"])
        if e is None:
            return None
        ok = ok and t < e[1]
    return ok


# -- three-valued logic: True, False, None (cannot tell) --------------------------------


def _any(values: Iterable[bool | None]) -> bool | None:
    unknown = False
    for v in values:
        if v is True:
            return True
        if v is None:
            unknown = True
    return None if unknown else False


def _all(values: Iterable[bool | None]) -> bool | None:
    unknown = False
    for v in values:
        if v is False:
            return False
        if v is None:
            unknown = True
    return None if unknown else True


# -- resources ---------------------------------------------------------------------------


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _codings(concept: Any) -> Iterable[Mapping[str, Any]]:
    """Codings of a Coding or CodeableConcept (or lists of them)."""
    for c in _list(concept):
        if not isinstance(c, Mapping):
            continue
        if "coding" in c:
            yield from (x for x in _list(c["coding"]) if isinstance(x, Mapping))
        elif "code" in c:
            yield c


def _all_references(value: Any, out: set[str]) -> None:
    if isinstance(value, Mapping):
        ref = value.get("reference")
        if isinstance(ref, str):
            out.add(_strip_history(ref))
        for v in value.values():
            if isinstance(v, (Mapping, list)):
                _all_references(v, out)
    elif isinstance(value, list):
        for v in value:
            _all_references(v, out)


def _strip_history(ref: str) -> str:
    i = ref.find("/_history/")
    return ref[:i] if i >= 0 else ref


class _Res:
    """One resource, its features computed on first use and kept for the next provision."""

    __slots__ = ("_authors", "_codes", "_ids", "_labels", "_refs", "_time", "key", "res", "rtype")

    def __init__(self, res: Mapping[str, Any]) -> None:
        self.res = res
        self.rtype: str = str(res.get("resourceType", ""))
        self.key = f"{self.rtype}/{res.get('id', '')}"
        self._labels: frozenset[tuple[str, str]] | None = None
        self._codes: frozenset[tuple[str, str]] | None = None
        self._time: int | bool | None = False
        self._refs: frozenset[str] | None = None
        self._ids: frozenset[str] | None = None
        self._authors: tuple[frozenset[str], bool] | None = None

    def labels(self) -> frozenset[tuple[str, str]]:
        if self._labels is None:
            meta = self.res.get("meta")
            sec = meta.get("security") if isinstance(meta, Mapping) else None
            self._labels = frozenset(
                (str(c.get("system", "")), str(c.get("code", ""))) for c in _codings(sec)
            )
        return self._labels

    def conf_level(self, term: Terminology) -> int:
        levels = [
            term.conf_order[c]
            for s, c in self.labels()
            if s == term.conf_system and c in term.conf_order
        ]
        return max(levels) if levels else term.conf_unlabelled

    def codes(self) -> frozenset[tuple[str, str]]:
        if self._codes is None:
            found = set()
            res = self.res
            for f in _CODE_FIELDS:
                value = res.get(f)
                if value is None:  # most resources have two or three of the six
                    continue
                for c in _codings(value):
                    found.add((str(c.get("system", "")), str(c.get("code", ""))))
            self._codes = frozenset(found)
        return self._codes

    def time(self) -> int | None:
        if self._time is False:
            self._time = clinical_time_ms(self.res)  # type: ignore[arg-type]
        return self._time  # type: ignore[return-value]

    def refs(self) -> frozenset[str]:
        if self._refs is None:
            out: set[str] = set()
            _all_references(self.res, out)
            self._refs = frozenset(out)
        return self._refs

    def identifiers(self) -> frozenset[str]:
        if self._ids is None:
            self._ids = frozenset(
                f"{i.get('system', '')}|{i.get('value', '')}"
                for i in _list(self.res.get("identifier"))
                if isinstance(i, Mapping)
            )
        return self._ids

    def authors(self) -> tuple[frozenset[str], bool]:
        """(literal author references, whether some author could not be read as one)."""
        if self._authors is None:
            refs: set[str] = set()
            opaque = False
            for f in _AUTHOR_FIELDS:
                for v in _list(self.res.get(f)):
                    if not isinstance(v, Mapping):
                        continue
                    inner = v.get("actor") or v.get("party") or v
                    if not isinstance(inner, Mapping):
                        continue
                    r = inner.get("reference")
                    if isinstance(r, str) and "://" not in r and not r.startswith("#"):
                        refs.add(_strip_history(r))
                    elif r is not None or inner.get("identifier") is not None:
                        opaque = True
            self._authors = (frozenset(refs), opaque)
        return self._authors


# -- compiled provisions -----------------------------------------------------------------

_Test = Callable[[_Res], "bool | None"]


@dataclass(eq=False)
class _Node:
    """A provision whose context matched the request: what is left to test is content."""

    type: str  # "permit" | "deny"
    path: str
    tests: tuple[_Test, ...]
    where: dict[str, Any]
    classes: frozenset[str] | None  # resource types named in `class`, when all are such
    opaque: bool  # content that cannot be judged without a resource (besides `class`)
    children: list[_Node] = field(default_factory=list)

    def match(self, res: _Res) -> bool:
        """Fail closed: an undecidable test makes a deny match and a permit not match."""
        for t in self.tests:
            r = t(res)
            if r is False or (r is None and self.type == "permit"):
                return False
        return True


@dataclass
class _Compiled:
    ref: str
    status: str  # "apply", NOT_APPLICABLE or INDETERMINATE
    reason: str
    root: _Node | None = None


def _reference_key(ref: Any, index: Mapping[str, Mapping[str, Any]]) -> str | None:
    """A literal reference as ``Type/id`` when it can be known without fetching it."""
    if not isinstance(ref, str):
        return None
    ref = _strip_history(ref)
    if "://" in ref or ref.startswith("urn:"):
        hit = index.get(ref)
        if hit is None:
            return None
        return f"{hit.get('resourceType')}/{hit.get('id')}"
    if ref.startswith("#"):
        return None
    parts = ref.split("/")
    return ref if len(parts) == 2 and all(parts) else None


class _Compiler:
    def __init__(
        self,
        request: Request,
        now_ms: int,
        known: Mapping[str, Mapping[str, Any]],
        term: Terminology,
    ) -> None:
        self.req = request
        self.now = now_ms
        self.known = known
        self.term = term

    # context elements: decided once per (consent, request, now) ----------------------

    def _actor(self, prov: Mapping[str, Any], contained: Mapping[str, Any]) -> bool | None:
        actors = prov.get("actor")
        if not actors:
            return True
        return _any(self._one_actor(a, contained) for a in _list(actors))

    def _one_actor(self, actor: Any, contained: Mapping[str, Any]) -> bool | None:
        ref = actor.get("reference") if isinstance(actor, Mapping) else None
        if not isinstance(ref, Mapping):
            return None
        ident = ref.get("identifier")
        if isinstance(ident, Mapping) and ident.get("value"):
            if f"{ident.get('system', '')}|{ident['value']}" in self.req.actor:
                return True
            if not ref.get("reference"):
                return False
        literal = ref.get("reference")
        if not isinstance(literal, str):
            return False if isinstance(ident, Mapping) else None
        target: Mapping[str, Any] | None
        if literal.startswith("#"):
            target = contained.get(literal[1:])
        else:
            key = _reference_key(literal, self.known)
            if key is not None and key in self.req.actor:
                return True
            target = self.known.get(key) if key else None
        if target is None:
            return None  # not resolvable locally: fail closed (rule 5)
        ids = {
            f"{i.get('system', '')}|{i.get('value', '')}"
            for i in _list(target.get("identifier"))
            if isinstance(i, Mapping)
        }
        return bool(ids & self.req.actor)

    def _action(self, prov: Mapping[str, Any]) -> bool | None:
        actions = prov.get("action")
        if not actions:
            return True
        results: list[bool | None] = []
        for c in _codings(actions):
            if c.get("system") == ACTION_SYSTEM and c.get("code") in ACTIONS:
                results.append(c.get("code") in self.req.action)
            else:
                results.append(None)
        return _any(results)

    def _purpose(self, prov: Mapping[str, Any], kind: str) -> bool | None:
        """Permits must cover every purpose of the request, denies any one (fail closed)."""
        purposes = prov.get("purpose")
        if not purposes:
            return True
        named: list[str | None] = []
        for c in _codings(purposes):
            ok = c.get("system") == self.term.actreason_system
            named.append(str(c.get("code")) if ok else None)

        def covers(p: str) -> bool | None:
            return _any(None if g is None else self.term.subsumes(g, p) for g in named)

        per = [covers(p) for p in self.req.purpose]
        return _any(per) if kind == "deny" else _all(per)

    def _context(
        self, prov: Mapping[str, Any], kind: str, contained: Mapping[str, Any]
    ) -> bool | None:
        return _all(
            (
                self._actor(prov, contained),
                self._action(prov),
                self._purpose(prov, kind),
                _in_period(prov.get("period"), self.now),
            )
        )

    # content elements: compiled into tests -----------------------------------------

    def _content(
        self, prov: Mapping[str, Any], kind: str, path: str
    ) -> tuple[tuple[_Test, ...], dict[str, Any], frozenset[str] | None, bool]:
        tests: list[_Test] = []
        where: dict[str, Any] = {}
        classes: frozenset[str] | None = None
        opaque = False
        term = self.term

        if prov.get("class"):
            types, mimes, unknown = set(), set(), False
            for c in _codings(prov["class"]):
                sys_, code = c.get("system"), str(c.get("code", ""))
                if sys_ == RESOURCE_TYPES_SYSTEM:
                    types.add(code)
                elif sys_ == MIME_SYSTEM:
                    mimes.add(code.split(";")[0].strip().lower())
                else:
                    unknown = True
            where["class"] = sorted(types | mimes)
            if mimes or unknown:
                opaque = True
            else:
                classes = frozenset(types)
            ft, fm = frozenset(types), frozenset(mimes)

            def t_class(r: _Res, ft=ft, fm=fm, unknown=unknown) -> bool | None:
                if r.rtype in ft:
                    return True
                if fm and _mime_types(r.res) & fm:
                    return True
                return None if unknown else False

            tests.append(t_class)

        if prov.get("code"):
            want, unknown = set(), False
            for c in _codings(prov["code"]):
                if c.get("system") and c.get("code"):
                    want.add((str(c["system"]), str(c["code"])))
                else:
                    unknown = True
            where["code"] = sorted(f"{s}|{c}" for s, c in want)
            opaque = True
            fw = frozenset(want)

            def t_code(r: _Res, fw=fw, unknown=unknown) -> bool | None:
                if r.codes() & fw:
                    return True
                return None if unknown else False

            tests.append(t_code)

        if prov.get("securityLabel"):
            checks: list[Callable[[_Res], bool | None]] = []
            shown = []
            for c in _codings(prov["securityLabel"]):
                sys_, code = str(c.get("system", "")), str(c.get("code", ""))
                shown.append(f"{sys_}|{code}")
                if sys_ == term.conf_system and code in term.conf_order:
                    lv = term.conf_order[code]
                    # high-water mark: a permit on X covers X or lower, a deny X or higher
                    checks.append(_level_test(term, lv, at_most=kind == "permit"))
                elif sys_ in term.exact_systems and code:
                    checks.append(_label_test((sys_, code)))
                else:
                    checks.append(_unknown)
            where["securityLabel"] = shown
            where["labelMatch"] = "at-or-below" if kind == "permit" else "at-or-above"
            opaque = True

            def t_label(r: _Res, checks=tuple(checks)) -> bool | None:
                # R4: with several labels, a resource must carry all of them.
                return _all(ch(r) for ch in checks)

            # One label (the usual case): its check is the test, without the _all() layer.
            tests.append(checks[0] if len(checks) == 1 else t_label)

        if prov.get("dataPeriod") is not None:
            dp = prov["dataPeriod"]
            where["dataPeriod"] = dp
            opaque = True

            def t_period(r: _Res, dp=dp) -> bool | None:
                t = r.time()
                return None if t is None else _in_period(dp, t)

            tests.append(t_period)

        if prov.get("data"):
            entries = []
            for i, d in enumerate(_list(prov["data"])):
                if not isinstance(d, Mapping) or not isinstance(d.get("reference"), Mapping):
                    raise ConsentError("data needs meaning and reference", f"{path}.data[{i}]")
                entries.append(self._data_test(d, f"{path}.data[{i}]"))
            where["data"] = [
                {"meaning": d.get("meaning"), "reference": d["reference"]}
                for d in _list(prov["data"])
            ]
            opaque = True

            def t_data(r: _Res, entries=tuple(entries)) -> bool | None:
                return _any(e(r) for e in entries)

            tests.append(t_data)

        return tuple(tests), where, classes, opaque

    def _data_test(self, d: Mapping[str, Any], where: str) -> _Test:
        meaning = d.get("meaning")
        if meaning not in ("instance", "related", "dependents", "authoredby"):
            raise ConsentError(f"unknown data.meaning {meaning!r}", where)
        ref = d["reference"]
        ident = ref.get("identifier")
        ident_key = (
            f"{ident.get('system', '')}|{ident.get('value', '')}"
            if isinstance(ident, Mapping) and ident.get("value")
            else None
        )
        key = _reference_key(ref.get("reference"), self.known)
        literal = ref.get("reference")
        target = self.known.get(key) if key else None
        target_refs: frozenset[str] | None = None
        if target is not None:
            acc: set[str] = set()
            _all_references(target, acc)
            target_refs = frozenset(acc)

        def instance(r: _Res) -> bool | None:
            if key is not None and r.key == key:
                return True
            if ident_key is not None and ident_key in r.identifiers():
                return True
            return False if key is not None or ident_key is not None else None

        if meaning == "instance":
            return instance
        if meaning == "related":

            def related(r: _Res) -> bool | None:
                if instance(r) is True:
                    return True
                if target_refs is None:
                    return None  # what it refers to is unknown here: fail closed
                return r.key in target_refs

            return related
        if meaning == "dependents":

            def dependents(r: _Res) -> bool | None:
                if instance(r) is True:
                    return True
                refs = r.refs()
                if key is not None and key in refs:
                    return True
                if isinstance(literal, str) and _strip_history(literal) in refs:
                    return True
                return False if key is not None else None

            return dependents

        def authoredby(r: _Res) -> bool | None:
            refs, opaque = r.authors()
            if key is not None and key in refs:
                return True
            return None if opaque or key is None else False

        return authoredby

    # the tree --------------------------------------------------------------------------

    def node(
        self,
        prov: Any,
        path: str,
        inherited: str,
        contained: Mapping[str, Any],
    ) -> _Node | None:
        """Compile one provision and its descendants; None when its context cannot match."""
        if not isinstance(prov, Mapping):
            raise ConsentError("a provision must be an object", path)
        kind = prov.get("type") or inherited
        if kind not in ("permit", "deny"):
            raise ConsentError(f"provision type must be permit or deny, not {kind!r}", path)
        ctx = self._context(prov, kind, contained)
        if ctx is False or (ctx is None and kind == "permit"):
            return None
        tests, where, classes, opaque = self._content(prov, kind, path)
        node = _Node(kind, path, tests, where, classes, opaque)
        for i, child in enumerate(_list(prov.get("provision"))):
            c = self.node(child, f"{path}.provision[{i}]", kind, contained)
            if c is not None:
                node.children.append(c)
        return node

    def consent(self, c: Mapping[str, Any], ref: str) -> _Compiled:
        status = c.get("status")
        if status != "active":
            return _Compiled(ref, NOT_APPLICABLE, f"status {status}")
        root = c.get("provision")
        if root is not None and not isinstance(root, Mapping):
            raise ConsentError("provision must be an object", "provision")
        root = root or {}
        kind = root.get("type")
        # Untyped roots fail closed like a deny: applicable whenever it cannot be excluded.
        as_kind = kind if kind in ("permit", "deny") else "deny"
        period = _in_period(root.get("period"), self.now)
        scope = self._scope(c)
        purpose = self._purpose(root, as_kind)
        for ok, why in (
            (period, "root provision.period does not hold at now"),
            (scope, f"scope is not {self.req.scope}"),
            (purpose, "root purpose does not cover the request's purpose"),
        ):
            if ok is False or (ok is None and as_kind == "permit"):
                return _Compiled(ref, NOT_APPLICABLE, why)
        if kind is None:
            return _Compiled(ref, INDETERMINATE, "root provision has no type")
        contained = {
            str(r.get("id")): r for r in _list(c.get("contained")) if isinstance(r, Mapping)
        }
        node = self.node(root, "provision", kind, contained)
        if node is None:
            return _Compiled(ref, NOT_APPLICABLE, "root provision does not match the request")
        return _Compiled(ref, "apply", "", node)

    def _scope(self, c: Mapping[str, Any]) -> bool | None:
        codes = [x.get("code") for x in _codings(c.get("scope")) if x.get("system") == SCOPE_SYSTEM]
        if not codes:  # R5-style consents carry the scope in category
            codes = [
                x.get("code")
                for x in _codings(c.get("category"))
                if x.get("system") == SCOPE_SYSTEM
            ]
        if not codes:
            return None
        return self.req.scope in codes


def _level_test(term: Terminology, level: int, *, at_most: bool) -> _Test:
    if at_most:
        return lambda r: r.conf_level(term) <= level
    return lambda r: r.conf_level(term) >= level


def _label_test(label: tuple[str, str]) -> _Test:
    return lambda r: label in r.labels()


def _unknown(r: _Res) -> bool | None:
    return None


def _mime_types(res: Mapping[str, Any]) -> frozenset[str]:
    found = set()
    for holder in (res, res.get("content")):
        for h in _list(holder):
            if not isinstance(h, Mapping):
                continue
            for a in (h, h.get("attachment")):
                if isinstance(a, Mapping) and isinstance(a.get("contentType"), str):
                    found.add(a["contentType"].split(";")[0].strip().lower())
    return frozenset(found)


# -- supersession ------------------------------------------------------------------------


def _consent_ref(c: Mapping[str, Any], i: int) -> str:
    rid = c.get("id")
    base = f"Consent/{rid}" if rid else f"Consent/#{i}"
    meta = c.get("meta")
    vid = meta.get("versionId") if isinstance(meta, Mapping) else None
    return f"{base}/_history/{vid}" if vid else base


def _meta(c: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = c.get("meta")
    return meta if isinstance(meta, Mapping) else {}


def _version_key(c: Mapping[str, Any]) -> tuple[int, int, int, str]:
    meta = _meta(c)
    dt = _span(c.get("dateTime"))
    lu = _span(meta.get("lastUpdated"))
    vid = str(meta.get("versionId") or "")
    return (dt[0] if dt else -1, lu[0] if lu else -1, int(vid) if vid.isdigit() else -1, vid)


def _recorded_ms(c: Mapping[str, Any]) -> int | None:
    meta = _meta(c)
    s = _span(meta.get("lastUpdated")) or _span(c.get("dateTime"))
    return s[0] if s else None


def _current_versions(
    consents: Sequence[tuple[str, Mapping[str, Any]]], now: int
) -> tuple[list[tuple[str, Mapping[str, Any]]], list[dict[str, str]]]:
    """Keep the newest version of each consent (same id, or a shared business identifier)."""
    notes: list[dict[str, str]] = []
    live: list[tuple[str, Mapping[str, Any]]] = []
    for ref, c in consents:
        rec = _recorded_ms(c)
        if rec is not None and rec > now:
            notes.append({"consent": ref, "result": "IGNORED", "reason": "recorded after now"})
        else:
            live.append((ref, c))
    parent = list(range(len(live)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, (_, c) in enumerate(live):
        keys = [f"id:{c['id']}"] if c.get("id") else []
        keys += [
            f"ident:{x.get('system', '')}|{x.get('value')}"
            for x in _list(c.get("identifier"))
            if isinstance(x, Mapping) and x.get("value")
        ]
        for k in keys:
            if k in first:
                parent[find(i)] = find(first[k])
            else:
                first[k] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(live)):
        groups.setdefault(find(i), []).append(i)
    kept: list[tuple[str, Mapping[str, Any]]] = []
    for members in groups.values():
        newest = max(_version_key(live[i][1]) for i in members)
        winners = [live[i] for i in members if _version_key(live[i][1]) == newest]
        by = ", ".join(sorted({w[0] for w in winners}))
        for i in members:
            if _version_key(live[i][1]) == newest:
                kept.append(live[i])
            else:
                notes.append({"consent": live[i][0], "result": "SUPERSEDED", "reason": f"by {by}"})
    return kept, notes


# -- the policy --------------------------------------------------------------------------


def _index_known(known: Iterable[Mapping[str, Any]] | None) -> dict[str, Mapping[str, Any]]:
    index: dict[str, Mapping[str, Any]] = {}

    def add(res: Any, full_url: Any = None) -> None:
        if not isinstance(res, Mapping):
            return
        if res.get("resourceType") == "Bundle":
            for e in _list(res.get("entry")):
                if isinstance(e, Mapping):
                    add(e.get("resource"), e.get("fullUrl"))
            return
        if res.get("resourceType") and res.get("id"):
            index[f"{res['resourceType']}/{res['id']}"] = res
        if isinstance(full_url, str):
            index[full_url] = res

    for r in known or ():
        add(r)
    return index


def _now_ms(now: datetime) -> int:
    if not isinstance(now, datetime):
        raise TypeError("now must be a datetime")
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return _ms(now)


@dataclass(frozen=True)
class _Outcome:
    decision: str
    paths: tuple[str, ...] = ()
    obligations: tuple[dict[str, Any], ...] = ()


class Policy:
    """The patient's consents compiled for one request at one instant; decide many times."""

    def __init__(
        self,
        consents: Iterable[Mapping[str, Any]],
        request: Mapping[str, Any] | Request,
        *,
        now: datetime,
        known: Iterable[Mapping[str, Any]] | None = None,
        term: Terminology | None = None,
    ) -> None:
        self.term = term or terminology()
        self.request = parse_request(request, self.term)
        self.now_ms = _now_ms(now)
        listed: list[tuple[str, Mapping[str, Any]]] = []
        for i, c in enumerate(consents):
            if not isinstance(c, Mapping) or c.get("resourceType") != "Consent":
                raise ConsentError(f"consent #{i} is not a Consent resource", "resourceType")
            listed.append((_consent_ref(c, i), c))
        listed.sort(key=lambda rc: rc[0])  # decisions must not depend on input order
        kept, notes = _current_versions(listed, self.now_ms)
        comp = _Compiler(self.request, self.now_ms, _index_known(known), self.term)
        self.compiled: list[_Compiled] = []
        for ref, c in sorted(kept, key=lambda rc: rc[0]):
            try:
                self.compiled.append(comp.consent(c, ref))
            except ConsentError as exc:
                raise ConsentError(exc.message, f"{ref} {exc.where}".strip()) from None
        self.notes = notes
        self.btg = self.request.simulation and any(
            self.term.is_break_glass(p) for p in self.request.purpose
        )

    # per consent ----------------------------------------------------------------------

    def _on_resource(self, node: _Node, r: _Res) -> _Outcome | None:
        if not node.match(r):
            return None
        deny: list[str] = []
        permit: list[str] = []
        for child in node.children:
            out = self._on_resource(child, r)
            if out is None:
                continue
            (deny if out.decision == DENY else permit).extend(out.paths)
        if deny:
            return _Outcome(DENY, tuple(deny))
        if permit:
            return _Outcome(PERMIT, tuple(permit))
        return _Outcome(DENY if node.type == "deny" else PERMIT, (node.path,))

    def _request_match(self, node: _Node) -> str | None:
        """ "full", "partial" (depends on the resource) or None, judged without a resource."""
        if node.opaque:
            return "partial"
        if node.classes is not None:
            asked = self.request.classes
            if asked is None:
                return "partial"
            if asked <= node.classes:
                return "full"
            return "partial" if asked & node.classes else None
        return "full"

    def _obligations(
        self, node: _Node, ref: str, chain: tuple[dict[str, Any], ...]
    ) -> list[dict[str, Any]]:
        """What a provision that applies to part of the data asks of the publisher."""
        chain = (*chain, node.where) if node.where else chain
        out = [
            {
                "action": "withhold" if node.type == "deny" else "release",
                "consent": ref,
                "path": node.path,
                "where": list(chain),
            }
        ]
        for child in node.children:
            out.extend(self._obligations(child, ref, chain))
        return out

    def _on_request(self, node: _Node, ref: str) -> _Outcome:
        full: list[_Outcome] = []
        partial: list[_Node] = []
        for child in node.children:
            m = self._request_match(child)
            if m == "full":
                full.append(self._on_request(child, ref))
            elif m == "partial":
                partial.append(child)
        denies = [o for o in full if o.decision == DENY]
        if denies:  # a full deny child matches every resource: nothing else counts
            return _Outcome(DENY, tuple(p for o in denies for p in o.paths))
        obligations = [ob for child in partial for ob in self._obligations(child, ref, ())]
        permits = [o for o in full if o.decision == PERMIT]
        if permits:
            paths = tuple(p for o in permits for p in o.paths)
            inner = tuple(ob for o in permits for ob in o.obligations)
            return _Outcome(PERMIT, paths, (*inner, *obligations))
        if node.type == "permit":
            return _Outcome(PERMIT, (node.path,), tuple(obligations))
        releases = [ob for ob in obligations if ob["action"] == "release"]
        if releases:  # deny by default, but some data may be released
            restrict = {"action": "restrict", "consent": ref, "path": node.path}
            paths = tuple(ob["path"] for ob in releases)
            return _Outcome(PERMIT, paths, (restrict, *obligations))
        return _Outcome(DENY, (node.path,))

    # the decision ---------------------------------------------------------------------

    def decide(self, resource: Mapping[str, Any] | None = None) -> Decision:
        """The decision for the request (``resource=None``) or for one resource."""
        if self.btg:
            return Decision(
                DENY,
                False,
                reasons=("break-glass (BTG) is not available to simulation subscribers",),
            )
        r = _Res(resource) if resource is not None else None
        per: list[tuple[str, _Outcome]] = []
        rows: list[dict[str, str]] = list(self.notes)
        for comp in self.compiled:
            if comp.status != "apply" or comp.root is None:
                per.append((comp.ref, _Outcome(comp.status)))
                rows.append({"consent": comp.ref, "result": comp.status, "reason": comp.reason})
                continue
            if r is not None:
                out = self._on_resource(comp.root, r) or _Outcome(NOT_APPLICABLE)
            else:
                m = self._request_match(comp.root)
                if m == "full":
                    out = self._on_request(comp.root, comp.ref)
                elif m == "partial":  # the whole consent is about part of the data
                    obs = self._obligations(comp.root, comp.ref, ())
                    if comp.root.type == "permit":
                        restrict = {"action": "restrict", "consent": comp.ref, "path": "provision"}
                        out = _Outcome(PERMIT, ("provision",), (restrict, *obs))
                    else:  # it withholds part of the data and says nothing of the rest
                        out = _Outcome(NOT_APPLICABLE, (), tuple(obs))
                else:
                    out = _Outcome(NOT_APPLICABLE)
            per.append((comp.ref, out))
            rows.append({"consent": comp.ref, "result": out.decision, "reason": ""})
        return self._combine(per, rows)

    def _combine(self, per: list[tuple[str, _Outcome]], rows: list[dict[str, str]]) -> Decision:
        """Deny-overrides across consents (rule 6, ours)."""
        final = NOT_APPLICABLE
        found = {o.decision for _, o in per}
        for level in (DENY, PERMIT, INDETERMINATE):
            if level in found:
                final = level
                break
        deciding: list[dict[str, str]] = []
        for ref, o in per:
            if o.decision != final or final == NOT_APPLICABLE:
                continue
            for p in o.paths or ("provision",):
                deciding.append({"consent": ref, "path": p, "decision": final})
        obligations: list[dict[str, Any]] = []
        if final in (PERMIT, NOT_APPLICABLE):
            # Partial denies of consents that did not decide still bind (rule 6: unioned).
            for _, o in per:
                obligations.extend(o.obligations)
        if final == PERMIT and self.request.scope == "research":
            obligations.append(
                {"action": "deidentify", "profile": self.request.deidentify or "safe-harbor"}
            )
        unique = obligations
        if len(obligations) > 1:  # per resource there is at most one (deidentify)
            seen: set[bytes] = set()
            unique = []
            for ob in sorted(obligations, key=_ob_key):
                k = _ob_key(ob)
                if k not in seen:
                    seen.add(k)
                    unique.append(ob)
        if final == PERMIT:
            allowed = True
        elif final == NOT_APPLICABLE:
            allowed = self.request.default == "permit" and self.request.scope != "research"
        else:
            allowed = False
        return Decision(
            final,
            allowed,
            tuple(unique),
            tuple(sorted(deciding, key=lambda d: (d["consent"], d["path"]))),
            tuple(sorted(rows, key=lambda d: (d["consent"], d["result"]))),
        )


def _ob_key(ob: Mapping[str, Any]) -> bytes:
    return orjson.dumps(ob, option=orjson.OPT_SORT_KEYS, default=str)


def prepare(
    consents: Iterable[Mapping[str, Any]],
    request: Mapping[str, Any] | Request,
    *,
    now: datetime,
    known: Iterable[Mapping[str, Any]] | None = None,
) -> Policy:
    """Compile once per (patient, subscriber, now); then ``policy.decide(resource)``."""
    return Policy(consents, request, now=now, known=known)


def decide(
    consents: Iterable[Mapping[str, Any]],
    request: Mapping[str, Any] | Request,
    *,
    now: datetime,
    resource: Mapping[str, Any] | None = None,
    known: Iterable[Mapping[str, Any]] | None = None,
) -> Decision:
    """One decision: for the request when ``resource`` is None, else for that resource."""
    return Policy(consents, request, now=now, known=known).decide(resource)
