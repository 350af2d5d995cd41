"""Check FHIR output against the R4 models (fhir.resources' R4B package).

R4B models accept R4 JSON unchanged; R5-only elements are rejected, which is
what we want from an R4 converter. Value-set bindings are not checked by the
models (see docs/architecture.md).

Each resource first goes to ``fhirtwin.fastcheck``, which walks the JSON with tables
read from the same models and answers either "the models accept it" (then that is
the verdict) or "not sure". Only the second kind, and every invalid resource, is
built with the models, which also give the messages. ``FHIRTWIN_VALIDATOR=models``
(or ``set_fast(False)``) sends every resource to the models.

On the models' path, validating a resource costs far more than converting it, and a
live feed sends the same Organization, Location, Practitioner or Device again and
again. So the outcome of each resource's validation is kept in a bounded LRU
cache keyed by the resource's exact JSON bytes (orjson, key order kept: the order
of the problems can depend on it). A resource that differs in any byte is a
different key and is validated again. Resources that are not plain JSON data
(dates, Decimals, bytes, NaN, ``None`` anywhere…) are never cached.

Two values differ in every message although the resource does not: ``meta.source``
(the message's control id) and the lineage extension (the segment's position). Both
are replaced by a stand-in before the key is made and the resource is validated,
but only where that cannot change the verdict: ``meta.source`` is a FHIR ``uri``,
which the models accept for any text (pattern ``\\S*``, searched), and a lineage
list like ``PID[2],PV1[3]`` is always a valid ``string``. Their errors would carry
neither value, so the stand-in's verdict is the original's, path for path.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from typing import Any

import orjson
from pydantic import ValidationError

from fhirtwin import fastcheck
from fhirtwin.mapping import LINEAGE_EXTENSION

__all__ = [
    "cache_info",
    "clear_cache",
    "set_cache_size",
    "set_fast",
    "validate_bundle",
    "validate_resource",
]

# A problem relative to the resource: (path suffix, message); the caller adds the prefix.
_Problems = tuple[tuple[str, str], ...]

DEFAULT_CACHE_SIZE = 4096
# Non-JSON values are refused by orjson with these (dates, str/int/dict subclasses…).
_KEY_OPTIONS = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATACLASS
)
_MAX_KEY_BYTES = 256 * 1024
_SOURCE_STANDIN = "urn:fhirtwin:validation-cache"
_LINEAGE_STANDIN = {"url": LINEAGE_EXTENSION, "valueString": "SEG[0]"}
_LINEAGE_TAGS = re.compile(r"[A-Z][A-Z0-9]{2}\[[0-9]+\](?:,[A-Z][A-Z0-9]{2}\[[0-9]+\])*\Z")

# FHIRTWIN_VALIDATOR=models: every resource through the models, no fastcheck first
_fast = os.environ.get("FHIRTWIN_VALIDATOR", "fast").strip().lower() != "models"
_models: dict[str, Any] = {}
_cache: OrderedDict[bytes, _Problems] = OrderedDict()
_cache_size = DEFAULT_CACHE_SIZE
_stats = {"hits": 0, "misses": 0}
_lock = threading.Lock()


def _model(resource_type: str) -> Any:
    model = _models.get(resource_type)
    if model is None:
        from fhir.resources.R4B import get_fhir_model_class

        model = _models[resource_type] = get_fhir_model_class(resource_type)
    return model


def _check(resource: dict[str, Any]) -> _Problems:
    """The models' verdict on one resource, paths relative to it (fastcheck first: when it
    says the models accept the resource, they do)."""
    if _fast and fastcheck.accepts(resource):
        return ()
    return _check_models(resource)


def _check_models(resource: dict[str, Any]) -> _Problems:
    rt = resource.get("resourceType", "")
    try:
        model = _model(rt)
    except (KeyError, ValueError):
        return ((".resourceType", f"{rt!r} is not an R4 resource type"),)
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        out = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"] if x != "__root__")
            out.append((f".{loc}" if loc else "", err["msg"]))
        return tuple(out)
    except (AttributeError, TypeError, ValueError) as exc:
        # a model validator that trips over a value of the wrong type (a number where a
        # url belongs raises AttributeError in fhir_core): invalid, not a crash
        return (("", f"the R4 models could not read this resource: {type(exc).__name__}: {exc}"),)
    return ()


def _template(res: dict[str, Any]) -> dict[str, Any]:
    """The resource with meta.source and its lineage tags replaced by stand-ins, where the
    values are ones the models accept whatever they say (see the module docstring)."""
    out = res
    meta = res.get("meta")
    if type(meta) is dict and type(meta.get("source")) is str:
        out = dict(res)
        out["meta"] = {**meta, "source": _SOURCE_STANDIN}
    exts = res.get("extension")
    if type(exts) is list:
        for i, ext in enumerate(exts):
            if type(ext) is dict and len(ext) == 2 and ext.get("url") == LINEAGE_EXTENSION:
                tags = ext.get("valueString")
                if type(tags) is str and _LINEAGE_TAGS.match(tags):
                    if out is res:
                        out = dict(res)
                    new = list(exts)
                    new[i] = _LINEAGE_STANDIN
                    out["extension"] = new
                break
    return out


def _key(resource: dict[str, Any], trusted: bool) -> bytes | None:
    """The cache key of a resource, or None when it must not be cached."""
    try:
        key = orjson.dumps(resource, option=_KEY_OPTIONS)
    except TypeError:
        return None
    # orjson writes NaN and ±inf as null; a null also hides a None placeholder.
    if b"null" in key or len(key) > _MAX_KEY_BYTES:
        return None
    # orjson also writes enums and UUIDs as plain JSON: for data that did not come
    # from the converter, cache only what reads back as the very same value.
    if not trusted and orjson.loads(key) != resource:
        return None
    return key


def _cached_check(resource: dict[str, Any], trusted: bool) -> _Problems:
    if _fast and fastcheck.accepts(resource):
        return ()  # cheaper than the cache key
    if _cache_size <= 0:
        return _check_models(resource)
    template = _template(resource)
    key = _key(template, trusted)
    if key is None:
        return _check_models(resource)
    with _lock:
        got = _cache.get(key)
        if got is not None:
            _cache.move_to_end(key)
            _stats["hits"] += 1
            return got
    got = _check_models(template)
    with _lock:
        _stats["misses"] += 1
        _cache[key] = got
        while len(_cache) > _cache_size:
            _cache.popitem(last=False)
    return got


def _as_dicts(problems: _Problems, path: str) -> list[dict[str, str]]:
    return [{"path": path + suffix, "error": msg} for suffix, msg in problems]


def validate_resource(resource: dict[str, Any], path: str = "") -> list[dict[str, str]]:
    """Problems with one resource, each with its JSON path; [] when it is valid."""
    return _as_dicts(_cached_check(resource, False), path)


def validate_bundle(bundle: dict[str, Any]) -> list[dict[str, str]]:
    """Problems in a Bundle: each entry's resource, then the Bundle shell."""
    return _validate_bundle(bundle, False)


def validate_converted(bundle: dict[str, Any]) -> list[dict[str, str]]:
    """validate_bundle for the converter's own output, which is plain JSON by construction
    (so the cache key needs no read-back check)."""
    return _validate_bundle(bundle, True)


def _validate_bundle(bundle: dict[str, Any], trusted: bool) -> list[dict[str, str]]:
    problems: list[dict[str, str]] = []
    for i, entry in enumerate(bundle.get("entry", [])):
        res = entry.get("resource", {})
        found = _cached_check(res, trusted)
        if not found:
            continue
        lineage = next(
            (
                e.get("valueString")
                for e in res.get("extension", [])
                if "source-segment" in e.get("url", "")
            ),
            None,
        )
        for p in _as_dicts(found, f"entry[{i}].resource"):
            if lineage:
                p["source"] = lineage
            problems.append(p)
    # The shell (id, timestamp) differs in every message: not worth a cache entry.
    shell = {k: v for k, v in bundle.items() if k != "entry"}
    problems.extend(_as_dicts(_check(shell), "Bundle"))
    return problems


def cache_info() -> dict[str, int]:
    """Hits, misses, current and maximum size of the validation cache."""
    with _lock:
        return {**_stats, "size": len(_cache), "maxsize": _cache_size}


def clear_cache() -> None:
    """Forget every cached verdict (and the hit/miss counts)."""
    with _lock:
        _cache.clear()
        _stats["hits"] = _stats["misses"] = 0


def set_cache_size(maxsize: int) -> None:
    """Bound the cache to ``maxsize`` resources; 0 turns it off."""
    global _cache_size
    with _lock:
        _cache_size = max(0, int(maxsize))
        while len(_cache) > _cache_size:
            _cache.popitem(last=False)


def set_fast(on: bool) -> bool:
    """Whether fastcheck answers first (the default; ``FHIRTWIN_VALIDATOR=models`` turns it
    off at start): it only ever says "the models accept this", never the opposite.
    Returns the previous setting."""
    global _fast
    before, _fast = _fast, bool(on)
    return before
