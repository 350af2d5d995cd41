"""A fast, conservative first look at FHIR R4 JSON, answering "do the R4B models accept it?".

The fhir.resources R4B models are the reference for what is valid FHIR here, but building
them costs several times more than converting an HL7 v2 message (about 5 ms for a message
of 45 resources, against 1.5 ms to convert it). Nearly every resource a converter makes is
valid, so most of that time only confirms what was expected.

``accepts(resource)`` walks the plain JSON instead, with tables read once from the same
model classes:

* every key must be a field's JSON name (its alias), else the answer is "not sure";
* a list where the model has a list (non-empty, no nulls), one value where it has one;
* a complex value is checked against its own model's table (``Reference`` →
  ``Reference``); a contained or Bundle resource against the model its ``resourceType``
  names (which must be a Resource, as the models require);
* a primitive value goes through the very pydantic validator the model uses for that
  field (``TypeAdapter`` of the field's annotation, e.g. ``Annotated[str, Code()]``), its
  verdict remembered per (type, value): codes, systems and units repeat endlessly;
* required fields (``element_required``, satisfied by the value or by its ``_name``
  extension, as the models allow) and choice groups (``value[x]``: at most one, one when
  required) as in ``FHIRAbstractModel``.

It answers True only when the models would accept the resource. Anything it does not
model exactly (a ``null``, an empty object or list, a ``fhir_comments``, a field's Python
name instead of its JSON name, a type of union it does not know) makes it answer False,
which means "not sure": the caller then asks the models themselves, which also give the
messages. So a False costs only time; a True must never be wrong, which
``tests/test_fastcheck.py`` checks against the models on every resource the converters
make from the corpus and on mutations of them.
"""

from __future__ import annotations

import threading
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter

__all__ = ["accepts", "cache_info", "first_missing", "missing_elements", "required_elements"]

# field kinds
_PRIM, _MODEL, _RESOURCE = 1, 2, 3
_MAX_VALUES = 50_000  # remembered verdicts per primitive type, then its memory starts again
_MAX_REMEMBERED_CHARS = 256  # longer text (narratives, base64 attachments): checked each time


@dataclass(slots=True)
class _Field:
    kind: int
    many: bool
    adapter: Any = None  # _PRIM: a pydantic TypeAdapter of the field's annotation
    # _PRIM: the verdicts remembered for that adapter (shared by every field using it):
    # a str value is its own key, any other value is keyed (type, value) so that 1,
    # 1.0 and True stay apart
    seen: dict[Any, bool] = field(default_factory=dict)
    table: Any = None  # _MODEL: the _Table of the value's model


@dataclass(slots=True)
class _Table:
    name: str
    resource_type: str | None  # resources: the value "resourceType" must have
    fields: dict[str, _Field] = field(default_factory=dict)
    # (field alias, alias of its primitive extension or None) that must be present
    required: tuple[tuple[str, str | None], ...] = ()
    # choice groups: (aliases, one of them required)
    choices: tuple[tuple[tuple[str, ...], bool], ...] = ()
    # keys of the model the walk does not model (never in ``fields``: a key missing from
    # ``fields`` already means "not sure"; kept to say which)
    unsure: frozenset[str] = frozenset()
    # set once every part above is filled: a table another thread is still building (or
    # one that refers to it) makes the walk "not sure", never a wrong "accepted"
    ready: bool = False


_tables: dict[type, _Table] = {}
_by_type: dict[str, _Table | None] = {}  # resourceType → its table (None: not a resource)
_adapters: dict[Any, TypeAdapter[Any]] = {}
_seen: dict[int, dict[Any, bool]] = {}  # id(adapter) → the verdicts remembered for it
_lock = threading.RLock()
_stats = {"validated": 0}  # primitive values run through their TypeAdapter


def _unwrap(annotation: Any) -> tuple[Any, bool] | None:
    """(inner type, is a list) of a field's annotation without its ``| None``; None when it
    is a union the walk does not model (``fhir_comments``: ``str | List[str]``)."""
    ann = annotation
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) != 1:
            return None
        ann = args[0]
        origin = typing.get_origin(ann)
    if origin in (list, typing.List):  # noqa: UP006 - the models use typing.List
        (inner,) = typing.get_args(ann)
        if typing.get_origin(inner) in (typing.Union, types.UnionType):
            # List[Optional[X]] (primitive lists and their ``_name`` lists keep nulls as
            # placeholders): checked as a list of X, where a null makes the walk unsure
            args = [a for a in typing.get_args(inner) if a is not type(None)]
            if len(args) != 1:
                return None
            inner = args[0]
        return inner, True
    return ann, False


def _table(klass: type) -> _Table:
    table = _tables.get(klass)
    if table is not None:
        return table
    with _lock:
        table = _tables.get(klass)
        if table is not None:
            return table
        is_resource = bool(getattr(klass, "has_resource_base", lambda: False)())
        table = _Table(klass.__name__, klass.__resource_type__ if is_resource else None)  # type: ignore[attr-defined]
        _tables[klass] = table  # before the fields: models refer to themselves
        unsure: set[str] = set()
        by_name: dict[str, str] = {}
        choices: dict[str, list[str]] = {}
        required_choice: dict[str, bool] = {}
        required: list[tuple[str, str | None]] = []
        for name, info in klass.model_fields.items():  # type: ignore[attr-defined]
            alias = info.alias or name
            by_name[name] = alias
            if name != alias:
                unsure.add(name)  # populate_by_name: the Python name also works there
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if extra.get("one_of_many"):
                group = str(extra["one_of_many"])
                choices.setdefault(group, []).append(alias)
                required_choice[group] = extra.get("one_of_many_required") is True
            shape = _unwrap(info.annotation)
            if shape is None:
                unsure.add(alias)
                continue
            inner, many = shape
            get_klass = getattr(inner, "get_model_klass", None)
            if get_klass is not None:
                target = get_klass()
                if target.__name__ == "Resource":
                    table.fields[alias] = _Field(_RESOURCE, many)
                elif target.__name__ == "Element":
                    unsure.add(alias)
                else:
                    table.fields[alias] = _Field(_MODEL, many, table=_table(target))
            else:
                adapter = _adapters.get(inner)
                if adapter is None:
                    adapter = _adapters[inner] = TypeAdapter(inner)
                seen = _seen.setdefault(id(adapter), {})
                table.fields[alias] = _Field(_PRIM, many, adapter=adapter, seen=seen)
            if info.is_required():
                required.append((alias, None))
        try:
            prim_required = klass.get_required_fields(klass.model_construct())  # type: ignore[attr-defined]
        except Exception:  # a model we cannot read is one we are unsure of
            prim_required = None
        if prim_required is None:  # then no key is modelled: every one is "not sure"
            unsure |= set(table.fields)
            table.fields.clear()
        else:
            for name, ext in prim_required:
                required.append((by_name.get(name, name), by_name.get(ext) if ext else None))
        table.unsure = frozenset(unsure - set(table.fields))  # what a key's absence means
        table.required = tuple(required)
        table.choices = tuple(
            (tuple(aliases), required_choice[group]) for group, aliases in choices.items()
        )
        table.ready = True
        return table


def _resource_table(resource_type: Any) -> _Table | None:
    if type(resource_type) is not str:
        return None
    if resource_type in _by_type:
        return _by_type[resource_type]
    from fhir.resources.R4B import get_fhir_model_class

    try:
        table: _Table | None = _table(get_fhir_model_class(resource_type))
    except (KeyError, ValueError, AttributeError, ImportError):
        table = None
    if table is not None and table.resource_type != resource_type:
        table = None
    if len(_by_type) < 1000:  # the R4 resource types, and a few misspellings
        _by_type[resource_type] = table
    return table


Need = tuple[tuple[str, frozenset[str]], ...]
_needs: dict[Any, Need] = {}  # resourceType → required_elements (the converters' hot path)


def missing_elements(resource: dict[str, Any]) -> list[tuple[str, frozenset[str]]]:
    """The required elements (as ``required_elements`` gives them) that ``resource`` lacks:
    a presence check, which the converters run with validation off."""
    need = _needs.get(resource.get("resourceType"))
    if need is None:
        need = required_elements(str(resource.get("resourceType")))
    keys = resource.keys()
    for item in need:  # nearly always all present: no list built for them
        if keys.isdisjoint(item[1]):
            return [i for i in need if keys.isdisjoint(i[1])]
    return []


def first_missing(
    resources: Iterable[dict[str, Any]],
) -> tuple[dict[str, Any], str, frozenset[str]] | None:
    """The first resource that lacks a required element, with that element's (label,
    keys); None when every one is complete. One call per message for the HL7 v2 engine:
    ~0.2 µs a resource."""
    needs = _needs
    for res in resources:
        need = needs.get(res["resourceType"])
        if need is None:
            need = required_elements(res["resourceType"])
        keys = res.keys()
        for label, any_of in need:
            if keys.isdisjoint(any_of):
                return res, label, any_of
    return None


def required_elements(resource_type: str) -> Need:
    """What a resource of this type must have, as the models say: (label, the JSON keys any
    of which satisfies it) per element: ``("vaccineCode", {"vaccineCode"})``, a primitive
    with its extension ``("status", {"status", "_status"})``, a choice
    ``("occurrence[x]", {"occurrenceDateTime", "_occurrenceDateTime", ...})``. Read from
    the model's fields only (no value validators built), once per type. Empty for a type
    not modelled."""
    need = _needs.get(resource_type)
    if need is None:
        need = _read_required(resource_type)
        if len(_needs) < 1000:  # the R4 resource types, and a few misspellings
            _needs[resource_type] = need
    return need


def _read_required(resource_type: str) -> Need:
    from fhir.resources.R4B import get_fhir_model_class

    try:
        klass = get_fhir_model_class(resource_type)
    except (KeyError, ValueError, AttributeError, ImportError):
        return ()
    out: list[tuple[str, frozenset[str]]] = []
    choices: dict[str, set[str]] = {}
    for name, info in klass.model_fields.items():
        alias = info.alias or name
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("one_of_many") and extra.get("one_of_many_required") is True:
            choices.setdefault(str(extra["one_of_many"]), set()).update((alias, "_" + alias))
        elif info.is_required():
            out.append((alias, frozenset((alias,))))
        elif extra.get("element_required"):
            out.append((alias, frozenset((alias, "_" + alias))))
    out.extend((f"{group}[x]", frozenset(keys)) for group, keys in choices.items())
    return tuple(out)


def _prim(f: _Field, value: Any) -> bool:
    if value is None or value == "" or type(value) in (dict, list):
        return False
    remember = type(value) is not str or len(value) <= _MAX_REMEMBERED_CHARS
    key = value if type(value) is str else (type(value), value)
    seen = f.seen
    if remember:
        hit = seen.get(key)
        if hit is not None:
            return hit
    _stats["validated"] += 1
    try:
        f.adapter.validate_python(value)
        ok = True
    except Exception:  # some validators raise AttributeError on odd types
        ok = False
    if remember:
        if len(seen) >= _MAX_VALUES:
            seen.clear()
        seen[key] = ok
    return ok


def _check(table: _Table, obj: dict[str, Any]) -> bool:
    # _prim, and the walk into nested objects, inlined: this loop runs ~50 times per resource.
    # A single value (most keys) is checked without building a list of one.
    if not obj or not table.ready:
        return False
    fields = table.fields
    for key, value in obj.items():
        f = fields.get(key)
        if f is None:
            if key == "resourceType" and table.resource_type is not None:
                if value != table.resource_type:
                    return False
                continue
            return False
        kind = f.kind
        if not f.many:
            if kind == _PRIM:
                if type(value) is str:
                    hit = f.seen.get(value)  # only short strings are ever remembered
                    if hit is not None:
                        if hit:
                            continue
                        return False
                if not _prim(f, value):
                    return False
            elif type(value) is not dict:
                return False
            elif kind == _MODEL:
                if not _check(f.table, value):
                    return False
            else:
                found = _resource_table(value.get("resourceType"))
                if found is None or not _check(found, value):
                    return False
            continue
        if type(value) is not list or not value:
            return False
        if kind == _PRIM:
            seen = f.seen
            for item in value:
                if type(item) is str:
                    hit = seen.get(item)
                    if hit is not None:
                        if hit:
                            continue
                        return False
                if not _prim(f, item):
                    return False
        elif kind == _MODEL:
            sub = f.table
            for item in value:
                if type(item) is not dict or not _check(sub, item):
                    return False
        else:
            for item in value:
                if type(item) is not dict:
                    return False
                found = _resource_table(item.get("resourceType"))
                if found is None or not _check(found, item):
                    return False
    for alias, ext in table.required:
        # the models take a missing required primitive when its ``_name`` has extensions
        if alias not in obj and (ext is None or "extension" not in obj.get(ext, ())):
            return False
    for aliases, needed in table.choices:
        present = 0
        for alias in aliases:
            if alias in obj:
                present += 1
        if present > 1 or (needed and present == 0):
            return False
    return True


def accepts(resource: Any) -> bool:
    """True when the R4B models accept this resource (JSON); False when they do not or
    when this check is not sure: then ask the models (``fhirtwin.validation``)."""
    if type(resource) is not dict:
        return False
    table = _resource_table(resource.get("resourceType"))
    return table is not None and _check(table, resource)


def cache_info() -> dict[str, int]:
    """How many primitive verdicts are remembered, and how many values were validated."""
    return {"values": sum(map(len, _seen.values())), **_stats}
