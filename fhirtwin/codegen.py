"""Turn compiled rules into straight-line Python functions.

The engine first compiles each rule line into a small closure (the leaf value
conversions stay closures). Calling one closure per rule line, most of which
find their component absent, made the per-message overhead dominate; so for
every datatype and segment rule this module writes one Python function whose
body checks each component or field inline and stores plain text directly,
calling a closure only when there is a value to convert. Behaviour is the
same as running the closures in order; only the dispatch is unrolled.

Each generated function keeps its source (``fn.__source__``) so that a rule
author can see what a rule file became.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = [
    "FieldStep",
    "FunctionWriter",
    "Leaf",
    "datatype_function",
    "predicate",
    "segment_function",
]

_SIMPLE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_NESTED_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)\Z")
_SIMPLE_APPEND = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\[\]\Z")
_ELEMENT_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\[(\d*|-1)\]\.([A-Za-z_][A-Za-z0-9_]*)\Z")
_NONEMPTY = 'v is not None and v != "" and v != {} and v != []'


@dataclass(slots=True)
class Leaf:
    """One rule line, as the writer needs it."""

    to: str | None
    setter: Callable[..., None] | None  # for paths the writer does not inline
    with_: dict[str, Any] | None
    comp: int | None = None
    width: int | None = None
    sub: int | None = None
    plain_text: bool = False  # string type, no map/format: store the component as is
    value: Callable[..., Any] | None = None  # (components, state, location) → value
    when: dict[str, Any] | None = None
    call: Callable[..., None] | None = None  # a whole-line closure (cases)
    const: Any = None
    has_const: bool = False
    inline: bool = True  # False: always store through `setter` (e.g. if_empty)
    # Direct calls, skipping the generic value closure (set by the engine when it can):
    prim: Callable[..., Any] | None = None  # conv([[text]], state, location) of a primitive
    dt: Callable[..., Any] | None = None  # a datatype function (components, state, location)
    dt_mode: str = ""  # "whole" (the components as they are), "width" (a slice), "sub"


@dataclass
class FunctionWriter:
    """Collects lines and the objects they refer to, then builds the function."""

    name: str
    args: str
    lines: list[str] = field(default_factory=list)
    namespace: dict[str, Any] = field(default_factory=dict)

    def ref(self, obj: Any, prefix: str) -> str:
        name = f"{prefix}{len(self.namespace)}"
        self.namespace[name] = obj
        return name

    def emit(self, indent: int, text: str) -> None:
        self.lines.append("    " * indent + text)

    def store(self, indent: int, leaf: Leaf, target: str, value: str = "v") -> None:
        """Put ``value`` at the leaf's path in ``target``, inline where the path is simple."""
        to = leaf.to or ""
        if not leaf.inline:
            self.emit(indent, f"{self.ref(leaf.setter, 'S')}({target}, {value})")
            return
        if leaf.with_ is None and _SIMPLE_KEY.match(to):
            self.emit(indent, f"{target}[{to!r}] = {value}")
            return
        m = _NESTED_KEY.match(to)
        if leaf.with_ is None and m:
            outer, inner = m.group(1), m.group(2)
            self.emit(indent, f"_d = {target}.get({outer!r})")
            self.emit(indent, "if _d is None:")
            self.emit(indent + 1, f"_d = {target}[{outer!r}] = {{}}")
            self.emit(indent, f"_d[{inner!r}] = {value}")
            return
        m = _SIMPLE_APPEND.match(to)
        if leaf.with_ is None and m:
            key = m.group(1)
            self.emit(indent, f"_l = {target}.get({key!r})")
            self.emit(indent, "if _l is None:")
            self.emit(indent + 1, f"{target}[{key!r}] = [{value}]")
            self.emit(indent, "else:")
            self.emit(indent + 1, f"_l.append({value})")
            return
        m = _ELEMENT_KEY.match(to)
        if leaf.with_ is None and m:
            # 'a[].b' appends {b: value}; 'a[0].b' / 'a[-1].b' set b on the first / last
            # element (made if the list is empty), as compile_path's set_in_element does.
            key, idx, inner = m.group(1), m.group(2), m.group(3)
            self.emit(indent, f"_l = {target}.get({key!r})")
            self.emit(indent, "if _l is None:")
            self.emit(indent + 1, f"{target}[{key!r}] = [{{{inner!r}: {value}}}]")
            if idx == "":
                self.emit(indent, "else:")
                self.emit(indent + 1, f"_l.append({{{inner!r}: {value}}})")
                return
            pos = "-1" if idx == "-1" else "0" if idx == "0" else f"min({int(idx)}, len(_l) - 1)"
            self.emit(indent, "elif _l:")
            self.emit(indent + 1, f"_l[{pos}][{inner!r}] = {value}")
            self.emit(indent, "else:")
            self.emit(indent + 1, f"_l.append({{{inner!r}: {value}}})")
            return
        setter = self.ref(leaf.setter, "S")
        self.emit(indent, f"{setter}({target}, {value})")

    def build(self) -> Callable[..., Any]:
        src = f"def {self.name}({self.args}):\n" + "\n".join(self.lines or ["    pass"]) + "\n"
        code = compile(src, f"<rules:{self.name}>", "exec")
        exec(code, self.namespace)
        fn = self.namespace[self.name]
        fn.__source__ = src
        return fn


def when_source(w: FunctionWriter, when: dict[str, Any], scope: str) -> str:
    """A `when:` condition as a Python expression (scope: 'comps' in datatypes, 'seg' in segments)."""
    if "all" in when or "any" in when:
        joiner, parts = (" and ", when["all"]) if "all" in when else (" or ", when["any"])
        return "(" + joiner.join(f"({when_source(w, p, scope)})" for p in parts) + ")"
    comp = int(when.get("comp", 1))
    if "msh" in when:
        val = f"st.msg.msh.value({int(when['msh'])}, 0, {comp})"
    elif "field" in when:
        # In a datatype, a field condition reads the segment being converted.
        holder = "seg" if scope == "seg" else "st.seg"
        val = f"{holder}.value({int(when['field'])}, 0, {comp})"
    elif scope == "comps":
        ci = comp - 1
        val = f"(comps[{ci}][0] if n > {ci} and comps[{ci}] else '')"
    else:
        raise ValueError("a segment rule's `when` needs `field` or `msh`")
    if "in" in when:
        return f"{val} in {w.ref(frozenset(str(x) for x in when['in']), 'K')}"
    if "not_in" in when:
        return f"{val} not in {w.ref(frozenset(str(x) for x in when['not_in']), 'K')}"
    if "equals" in when:
        return f"{val} == {str(when['equals'])!r}"
    # present: holds a value; HL7's explicit null '""' ("delete this value") holds none
    if "present" in when:
        return f"{val} {'not in' if when['present'] else 'in'} ('', '\"\"')"
    if "longer" in when:
        return f"len({val}) > {int(when['longer'])}"
    return f"{val} not in ('', '\"\"')"


def predicate(when: dict[str, Any], scope: str) -> Callable[[Any, Any], bool]:
    """A `when:` condition as a function of (segment or components, state)."""
    w = FunctionWriter("when", "seg, st" if scope == "seg" else "comps, st")
    expr = when_source(w, when, scope)
    if scope == "comps":
        w.emit(1, "n = len(comps)")
    w.emit(1, f"return {expr}")
    return w.build()


def _is_plain_json(v: Any) -> bool:
    if v is None or type(v) in (str, int, float, bool):
        return True
    if type(v) is list:
        return all(_is_plain_json(x) for x in v)
    if type(v) is dict:
        return all(type(k) is str and _is_plain_json(x) for k, x in v.items())
    return False


def literal_source(value: Any) -> str | None:
    """Python source that evaluates to a fresh copy of a JSON value (the value as
    ``orjson.loads(orjson.dumps(value))`` gives it), or None if there is none.

    Evaluating a literal builds new dicts and lists each time, which is several times
    faster than an orjson round trip for the small constants of rule files."""
    try:
        norm = orjson.loads(orjson.dumps(value))
    except (TypeError, ValueError):
        return None
    if not _is_plain_json(norm):
        return None
    src = repr(norm)
    return src if len(src) < 20_000 else None


def copier(value: Any) -> Callable[[], Any]:
    """A function returning a fresh deep copy of a constant (what an orjson round trip
    gives), for constants that rules store and later code mutates."""
    src = literal_source(value)
    if src is None:
        blob = orjson.dumps(value)
        return lambda: orjson.loads(blob)
    fn: Callable[[], Any] = eval(compile(f"lambda: {src}", "<rules:const>", "eval"))
    return fn


def const_source(w: FunctionWriter, value: Any) -> str:
    """A constant: inline if immutable, else a fresh copy each time (results are mutated)."""
    if isinstance(value, str | int | float | bool):
        return repr(value)
    src = literal_source(value)
    if src is not None:
        return f"({src})"
    return f"{w.ref(orjson.loads, 'J')}({w.ref(orjson.dumps(value), 'K')})"


def _ident(name: str) -> str:
    return re.sub(r"\W", "_", name)


def _emit_text(w: FunctionWriter, ind: int, comps: str, ci: int, si: int, have_c: bool) -> int:
    """Emit code binding `t` to the text of component ci+1 (sub-component si+1) when it is
    there and not HL7's null; returns the indent at which `t` may be used."""
    if not have_c:
        w.emit(ind, f"if len({comps}) > {ci}:")
        ind += 1
        w.emit(ind, f"c = {comps}[{ci}]")
    w.emit(ind, f"if len(c) > {si}:")
    w.emit(ind + 1, f"t = c[{si}]")
    w.emit(ind + 1, "if t and t != '\"\"':")
    return ind + 2


def _emit_value(
    w: FunctionWriter, ind: int, leaf: Leaf, comps: str, loc: str, target: str, have_c: bool
) -> None:
    """Compute the leaf's value from `comps` (the variable `c` holds comps[comp-1] when
    `have_c`) and store it: a direct call where the engine gave one, else the closure."""
    ci = (leaf.comp or 1) - 1
    if leaf.prim is not None and not leaf.width:
        ind = _emit_text(w, ind, comps, ci, (leaf.sub or 1) - 1, have_c)
        where = f"{loc} + '.{ci + 1}'" if leaf.comp else loc
        w.emit(ind, f"v = {w.ref(leaf.prim, 'P')}([[t]], st, {where})")
        w.emit(ind, f"if {_NONEMPTY}:")
        w.store(ind + 1, leaf, target)
        return
    if leaf.dt is not None and leaf.dt_mode == "sub":
        if not have_c:
            w.emit(ind, f"if len({comps}) > {ci}:")
            ind += 1
            w.emit(ind, f"c = {comps}[{ci}]")
        call = f"{w.ref(leaf.dt, 'D')}([[s] for s in c], st, {loc} + '.{ci + 1}')"
    elif leaf.dt is not None and leaf.dt_mode == "width":
        call = f"{w.ref(leaf.dt, 'D')}({comps}[{ci}:{ci + (leaf.width or 1)}], st, {loc})"
    elif leaf.dt is not None:
        call = f"{w.ref(leaf.dt, 'D')}({comps}, st, {loc})"
    else:
        call = f"{w.ref(leaf.value, 'V')}({comps}, st, {loc})"
    w.emit(ind, f"v = {call}")
    w.emit(ind, f"if {_NONEMPTY}:")
    w.store(ind + 1, leaf, target)


def datatype_function(
    name: str,
    leaves: list[Leaf],
    finish: Callable[[dict[str, Any], Any, str], Any] | None,
    required: tuple[str, ...] = (),
    unwrap: bool = False,
) -> Callable[..., Any]:
    """fn(components, state, location) → value; ``finish`` (if any) handles required/creates.

    ``required`` (top-level keys that must hold a value, else the result is None) and
    ``unwrap`` (a lone ``value`` key is returned as the value itself) are checked inline,
    in that order, before ``finish``."""
    w = FunctionWriter(f"dt_{_ident(name)}", "comps, st, loc")
    w.emit(1, "out = {}")
    w.emit(1, "n = len(comps)")
    for leaf in leaves:
        if leaf.call is not None:
            w.emit(1, f"{w.ref(leaf.call, 'P')}(comps, out, st, loc)")
            continue
        cond = when_source(w, leaf.when, "comps") if leaf.when else None
        if leaf.has_const:
            ind = 1
            if cond:
                w.emit(1, f"if {cond}:")
                ind = 2
            w.store(ind, leaf, "out", const_source(w, leaf.const))
            continue
        if leaf.comp is None:
            ind = 1
            if cond:
                w.emit(1, f"if {cond}:")
                ind = 2
            _emit_value(w, ind, leaf, "comps", "loc", "out", have_c=False)
            continue
        c0 = leaf.comp - 1
        if leaf.plain_text and cond is None and not leaf.width:
            w.store(_emit_text(w, 1, "comps", c0, (leaf.sub or 1) - 1, False), leaf, "out", "t")
            continue
        c1 = c0 + (leaf.width or 1)
        w.emit(1, f"if n > {c0}:")
        if c1 - c0 == 1:
            w.emit(2, f"c = comps[{c0}]")
            w.emit(2, "if c[0] or len(c) > 1:")
        else:
            # Unrolled `any(...)` over the slice (no generator per call).
            tests = [f"(comps[{c0}] and (comps[{c0}][0] or len(comps[{c0}]) > 1))"]
            tests += [
                f"(n > {i} and comps[{i}] and (comps[{i}][0] or len(comps[{i}]) > 1))"
                for i in range(c0 + 1, c1)
            ]
            w.emit(2, f"if {' or '.join(tests)}:")
        ind = 3
        if cond:
            w.emit(3, f"if {cond}:")
            ind = 4
        _emit_value(w, ind, leaf, "comps", "loc", "out", have_c=c1 - c0 == 1)
    w.emit(1, "if not out:")
    w.emit(2, "return None")
    for key in required:
        w.emit(1, f"v = out.get({key!r})")
        w.emit(1, 'if v is None or v == "" or v == {} or v == []:')
        w.emit(2, "return None")
    if unwrap:
        w.emit(1, "if 'value' in out and len(out) == 1:")
        w.emit(2, "return out['value']")
    if finish is None:
        w.emit(1, "return out")
    else:
        w.emit(1, f"return {w.ref(finish, 'F')}(out, st, loc)")
    return w.build()


@dataclass(slots=True)
class FieldStep:
    """A segment rule line that reads field ``n`` of the segment."""

    n: int
    leaf: Leaf
    loc: str
    footprint: frozenset[int] | None
    all_reps: bool


def segment_function(
    name: str,
    steps: list[FieldStep | Callable[..., None]],
    mark: Callable[..., None],
    split: Callable[..., Any] | None = None,
) -> Callable[..., None]:
    """fn(segment, target, state): every rule line of one segment rule, unrolled.

    ``mark(usage, footprint, all_reps)`` merges a second read of a field into the usage
    record ``[footprint, all_reps]`` the loss report reads; the first read of a field
    (the common case) stores that record inline, as ``seg.field`` is inlined to a
    lookup in the segment's cache of split fields and, given ``split``
    (``hl7v2.split_field``), to splitting the raw field into that cache (fields 1 and 2,
    which MSH treats specially, still go through ``seg.field``)."""
    w = FunctionWriter(f"seg_{_ident(name)}", "seg, target, st")
    mk = w.ref(mark, "M")
    sp = w.ref(split, "X") if split is not None else ""
    w.emit(1, "f = seg.fields")
    w.emit(1, "nf = len(f)")
    if any(isinstance(s, FieldStep) for s in steps):
        w.emit(1, "used = st.used")
        w.emit(1, "idx = seg.index")
        w.emit(1, "cache = seg._cache")
    for step in steps:
        if not isinstance(step, FieldStep):
            w.emit(1, f"{w.ref(step, 'P')}(seg, target, st)")
            continue
        leaf, n = step.leaf, step.n
        cond = when_source(w, leaf.when, "seg") if leaf.when else None
        fp = w.ref(step.footprint, "K")
        w.emit(1, f"if nf > {n}:")
        w.emit(2, f"raw = f[{n}]")
        test = "raw and raw != '\"\"'"
        if cond:
            test += f" and {cond}"
        w.emit(2, f"if {test}:")
        w.emit(3, f"u = used.get((idx, {n}))")
        w.emit(3, "if u is None:")
        w.emit(4, f"used[(idx, {n})] = [{fp}, {step.all_reps}]")
        w.emit(3, "else:")
        w.emit(4, f"{mk}(u, {fp}, {step.all_reps})")
        w.emit(3, f"tree = cache.get({n})")
        w.emit(3, "if tree is None:")
        if split is not None and n > 2:
            w.emit(4, f"tree = cache[{n}] = {sp}(raw, seg.encoding, seg.charset)")
        else:
            w.emit(4, f"tree = seg.field({n})")
        loc = step.loc
        if leaf.plain_text and leaf.comp is not None and not leaf.width:
            # A text component (or the whole field as text): no conversion needed.
            reps = "tree" if step.all_reps else "tree[:1]"
            w.emit(3, f"for rep in {reps}:")
            ind = _emit_text(w, 4, "rep", leaf.comp - 1, (leaf.sub or 1) - 1, False)
            w.store(ind, leaf, "target", "t")
            continue
        if step.all_reps:
            w.emit(3, "for r, rep in enumerate(tree):")
            w.emit(4, f"lc = {loc!r} if r == 0 else f'{loc}({{r + 1}})'")
            _emit_value(w, 4, leaf, "rep", "lc", "target", have_c=False)
        else:
            w.emit(3, "rep = tree[0]")
            _emit_value(w, 3, leaf, "rep", repr(loc), "target", have_c=False)
    return w.build()
