"""FHIR Bundles and Bulk NDJSON → validated, reference-normalised FHIR R4, per patient.

Two entry points share one set of rules (see docs/sources-fhir.md):

* ``convert_record`` (the pipeline, kind ``fhir``): one raw record is one NDJSON line
  (→ one unit) or one JSON file holding a Bundle of any type or a single resource
  (→ one unit per patient in it, plus one for resources of no patient).
* ``convert_paths`` (``fhirtwin convert --from fhir PATH... --out DIR``): files and
  folders → one ``<patient id>.json`` batch Bundle per patient (PUT entries, like the
  HL7 v2 converter), ``_shared.json`` for resources of no patient, ``_report.json``.
  NDJSON is streamed; resources are spooled to disk per patient, so memory holds only
  the index of ``Type/id`` keys and identifiers, never a whole file or a whole export.

References: ``urn:uuid:`` / ``urn:oid:`` / absolute fullUrls of the same Bundle become
``Type/id`` (the resource's id when it has one, else the uuid); absolute references with
a known base (the Bundle's own fullUrl base, or ``$FHIRTWIN_FHIR_BASES``) become relative;
relative ones are kept. ``convert`` also resolves conditional references
(``Practitioner?identifier=sys|val``) against the whole input and reports every reference
that does not resolve (file, line, JSON path); nothing is dropped.

Identity: a Bulk NDJSON line names its patient only by reference (``Patient/123``), so
every unit carries the source-scoped key ``urn:fhirtwin:fhir-ref|<scope>/Patient/<id>``
as a patient identifier, and so does the Patient resource itself (besides its own
identifiers, which link by mappings/mpi.yaml). The MPI links both to one twin whichever
arrives first.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote

import orjson

from fhirtwin import bus
from fhirtwin.normalize import Converted, SourceError
from fhirtwin.twin import clinical_time_ms, fhir_time_ms

__all__ = [
    "REF_KEY_SYSTEM",
    "ConvertReport",
    "convert_files",
    "convert_paths",
    "convert_record",
    "normalise_bundle",
    "patient_of",
    "patient_ref_key",
]

REF_KEY_SYSTEM = "urn:fhirtwin:fhir-ref"
SHARED = "_shared"
DELETED = "_deleted"  # convert: the DELETE entries that take effect, as one batch Bundle
STDIN = "<stdin>"  # the file name of standard input in messages and the report
DEFAULT_SCOPE = "default"
_NS = uuid.UUID("6f1c1d3e-3c55-4c38-9a62-2f0c8a1f7e21")  # ids made for entries without one
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}\Z")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
_TYPE = re.compile(r"[A-Z][A-Za-z]+\Z")
# ``Type/id`` or ``Type/id/_history/v``, optionally after a base URL.
_REL = re.compile(
    r"(?:(?P<base>.+)/)?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?\Z"
)
_PATIENT_KEYS = ("patient", "subject", "beneficiary", "individual", "for")
_NO_COMPARTMENT = frozenset({"Group"})  # its members are many patients, not one
_MAX_LISTED = 10_000  # report entries kept per list in _report.json
_MAX_JSON_FILE = 1 << 30


def _bases_from_env() -> tuple[str, ...]:
    raw = os.environ.get("FHIRTWIN_FHIR_BASES", "")
    return tuple(b.rstrip("/") for b in re.split(r"[\s,]+", raw) if b)


def patient_ref_key(patient_id: str, scope: str = DEFAULT_SCOPE) -> str:
    """The source-scoped linking identifier of ``Patient/<patient_id>`` (``system|value``)."""
    return f"{REF_KEY_SYSTEM}|{scope}/Patient/{patient_id}"


# -- references -----------------------------------------------------------------------


def _walk_refs(node: Any, path: str, fn: Callable[[str, str], str | None]) -> None:
    """Call ``fn(reference, json path)`` for every ``reference`` string; a str result
    replaces it."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                new = fn(v, f"{path}.reference")
                if new is not None:
                    node[k] = new
            elif isinstance(v, dict | list):
                _walk_refs(v, f"{path}.{k}", fn)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            if isinstance(v, dict | list):
                _walk_refs(v, f"{path}[{i}]", fn)


def _contained_ids(res: dict[str, Any]) -> set[str]:
    return {
        c["id"]
        for c in res.get("contained") or ()
        if isinstance(c, dict) and isinstance(c.get("id"), str)
    }


def _normalise_refs(
    res: dict[str, Any],
    path: str,
    full_urls: dict[str, str],
    bases: Sequence[str],
    unresolved: list[dict[str, str]],
) -> None:
    """Rewrite one resource's references in place (see the module docstring); references
    that can never resolve (an urn not in the Bundle, an absolute URL of an unknown base,
    a missing contained resource) are appended to ``unresolved``."""
    contained: set[str] | None = None

    def fix(ref: str, where: str) -> str | None:
        nonlocal contained
        if ref.startswith("#"):
            if contained is None:
                contained = _contained_ids(res)
            if ref != "#" and ref[1:] not in contained:
                unresolved.append(
                    {"path": where, "reference": ref, "reason": "no such contained resource"}
                )
            return None
        mapped = full_urls.get(ref)
        if mapped is not None:
            return mapped
        if ref.startswith("urn:"):
            unresolved.append(
                {"path": where, "reference": ref, "reason": "not a fullUrl of this Bundle"}
            )
            return None
        if "://" in ref.split("?", 1)[0]:
            for base in bases:
                if ref.startswith(base) and ref[len(base) : len(base) + 1] == "/":
                    rest = ref[len(base) + 1 :]
                    if _REL.match(rest) or "?" in rest:
                        return rest
            unresolved.append(
                {
                    "path": where,
                    "reference": ref,
                    "reason": "absolute reference to an unknown base (set FHIRTWIN_FHIR_BASES)",
                }
            )
        return None

    _walk_refs(res, path, fix)


def patient_of(res: dict[str, Any]) -> str | None:
    """The id of the patient whose compartment holds ``res`` (after normalisation), or None."""
    rt = res.get("resourceType")
    if rt == "Patient":
        rid = res.get("id")
        return rid if isinstance(rid, str) else None
    if rt in _NO_COMPARTMENT:
        return None
    for key in _PATIENT_KEYS:
        v = res.get(key)
        if isinstance(v, dict):
            ref = v.get("reference")
            if isinstance(ref, str) and ref.startswith("Patient/"):
                return _rel_id(ref)
    found: list[str] = []

    def look(ref: str, where: str) -> None:
        if not found and ref.startswith("Patient/"):
            found.append(_rel_id(ref))

    _walk_refs({k: v for k, v in res.items() if k != "contained"}, "", look)
    return found[0] if found else None


def _rel_id(ref: str) -> str:  # Patient/<id>[/_history/v] → id
    return ref.split("/", 2)[1]


# -- Bundles --------------------------------------------------------------------------


@dataclass
class Unit:
    """One resource ready to go out, with where it came from."""

    resource: dict[str, Any]
    path: str  # JSON path of the resource in its record ("" for a lone resource)
    patient: str | None


@dataclass
class Normalised:
    units: list[Unit] = field(default_factory=list)
    problems: list[dict[str, str]] = field(default_factory=list)  # validation, path + error
    unresolved: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # entries that are not data
    # DELETE entries that take effect: path, url, ref (``Type/id``) and message
    deletions: list[dict[str, str]] = field(default_factory=list)
    # operations fhirtwin cannot carry out (PATCH, conditional DELETE): path, url, message
    unsupported: list[dict[str, str]] = field(default_factory=list)
    scope: str = DEFAULT_SCOPE


def _entry_label(path: str) -> str:
    """``Bundle.entry[3]`` → ``entry[3]`` (how a message names an entry)."""
    return path.removeprefix("Bundle.")


def _entry_index(path: str) -> int:
    """``Bundle.entry[3]…`` → 3 (-1 for a path outside the entries)."""
    m = re.match(r"Bundle\.entry\[(\d+)\]", path)
    return int(m[1]) if m else -1


def _target(url: str) -> str | None:
    """The ``Type/id`` a request URL names (relative or absolute, ``_history`` dropped);
    None for a conditional (``Type?…``), type-level or operation URL."""
    if "?" in url or "$" in url:
        return None
    m = _REL.match(url.rstrip("/"))
    return f"{m['type']}/{m['id']}" if m else None


def _version_ms(entry: dict[str, Any], res: dict[str, Any] | None) -> int | None:
    """When this version was made: ``meta.lastUpdated``, else ``response.lastModified``."""
    meta = res.get("meta") if isinstance(res, dict) else None
    if isinstance(meta, dict) and (ms := fhir_time_ms(meta.get("lastUpdated"))) is not None:
        return ms
    response = entry.get("response")
    return fhir_time_ms(response.get("lastModified")) if isinstance(response, dict) else None


def _entry_id(entry: dict[str, Any], res: dict[str, Any], full: str, seed: str) -> str:
    rid = res.get("id")
    if isinstance(rid, str) and rid:
        return rid
    if full.startswith("urn:uuid:"):
        return full[9:]
    if full.startswith("urn:oid:") and _ID.match(full[8:]):
        return full[8:]
    if (m := _REL.match(full)) and m["type"] == res.get("resourceType"):
        return m["id"]
    req = entry.get("request")
    url = req.get("url") if isinstance(req, dict) else None
    if isinstance(url, str) and (m := _REL.match(url)) and m["type"] == res.get("resourceType"):
        return m["id"]
    # No id anywhere (a transaction POST without fullUrl): stable, so a replay is idempotent.
    return str(uuid.uuid5(_NS, seed))


def normalise_bundle(
    bundle: dict[str, Any],
    *,
    validate: bool,
    bases: Sequence[str] = (),
    seed: str = "",
    scope: str = DEFAULT_SCOPE,
) -> Normalised:
    """A Bundle (any type) or a lone resource → its resources, ids and references
    normalised, each validated and assigned to its patient."""
    from fhirtwin.validation import validate_resource

    out = Normalised(scope=scope)
    configured = tuple(b.rstrip("/") for b in bases)
    deletes: list[tuple[int, dict[str, Any], str, str]] = []  # (index, entry, path, url)
    if bundle.get("resourceType") != "Bundle":
        pairs: list[tuple[dict[str, Any], dict[str, Any], str]] = []
        if bundle.get("resourceType") == "OperationOutcome":
            # e.g. a line of a Bulk export's error file: about the export, not data
            out.skipped.append({"path": "", "reason": "OperationOutcome (an error report)"})
        else:
            pairs.append(({}, bundle, ""))
    else:
        pairs = []
        for i, entry in enumerate(bundle.get("entry") or ()):
            where = f"Bundle.entry[{i}]"
            if not isinstance(entry, dict):
                out.problems.append({"path": where, "error": "an entry must be an object"})
                continue
            res = entry.get("resource")
            request = entry.get("request")
            method = url = ""
            if isinstance(request, dict):
                method = str(request.get("method") or "").upper()
                url = str(request.get("url") or "")
            if method == "DELETE":  # a resource in it, if any, is not data (and is ignored)
                deletes.append((i, entry, where, url))
                continue
            if method in ("GET", "HEAD"):
                out.skipped.append({"path": where, "reason": f"a read ({method} {url})"})
                continue
            if method == "PATCH":
                out.unsupported.append(
                    {
                        "path": where,
                        "method": method,
                        "url": url,
                        "message": f"not supported yet: PATCH {url} at {_entry_label(where)}",
                    }
                )
                continue
            if method == "POST" and "$" in url.split("?", 1)[0]:
                out.skipped.append(
                    {"path": where, "reason": f"an operation call ({method} {url}), not data"}
                )
                continue
            if res is None:
                req = request or entry.get("response") or {}
                out.skipped.append(
                    {"path": where, "reason": f"no resource ({orjson.dumps(req).decode()[:120]})"}
                )
                continue
            if not isinstance(res, dict):
                out.problems.append(
                    {"path": f"{where}.resource", "error": "a resource must be an object"}
                )
                continue
            search = entry.get("search")
            if isinstance(search, dict) and search.get("mode") == "outcome":
                out.skipped.append(
                    {"path": where, "reason": "searchset outcome (OperationOutcome)"}
                )
                continue
            if res.get("resourceType") == "OperationOutcome":
                out.skipped.append(
                    {"path": where, "reason": "OperationOutcome: about the exchange, not data"}
                )
                continue
            pairs.append((entry, res, f"{where}.resource"))
        if validate:
            shell = {k: v for k, v in bundle.items() if k != "entry"}
            out.problems += validate_resource(shell, "Bundle")
    # fullUrl → Type/id for every entry; the bases the Bundle itself uses are known bases.
    full_urls: dict[str, str] = {}
    own_bases: list[str] = []
    for n, (entry, res, _where) in enumerate(pairs):
        rt = res.get("resourceType")
        if not isinstance(rt, str) or not _TYPE.match(rt):
            continue  # validation reports it
        got = entry.get("fullUrl")
        full = got if isinstance(got, str) else ""
        rid = _entry_id(entry, res, full, f"{seed}#{n}")
        if res.get("id") != rid:
            res["id"] = rid
        if full:
            full_urls[full] = f"{rt}/{rid}"
            m = _REL.match(full)
            if m and m["base"] and "://" in m["base"] and m["base"] not in own_bases:
                own_bases.append(m["base"])
    if own_bases and not any(b in configured for b in own_bases):
        out.scope = own_bases[0]  # ids are that server's: scope the patient keys by it
    if bundle.get("resourceType") == "Bundle":
        pairs = _deletions(bundle.get("type") == "history", pairs, deletes, out)
    known = (*configured, *own_bases, *_bases_from_env())
    for _entry, res, where in pairs:
        _normalise_refs(
            res, where or res.get("resourceType", "") or "", full_urls, known, out.unresolved
        )
        if validate:
            found = validate_resource(res, where or str(res.get("resourceType", "")))
            if found:
                out.problems += found
                continue
        elif not isinstance(res.get("resourceType"), str) or not isinstance(res.get("id"), str):
            out.problems.append(
                {"path": where or "", "error": "not a FHIR resource (no resourceType or id)"}
            )
            continue
        out.units.append(Unit(res, where, patient_of(res)))
    return out


def _deletions(
    history: bool,
    pairs: list[tuple[dict[str, Any], dict[str, Any], str]],
    deletes: list[tuple[int, dict[str, Any], str, str]],
    out: Normalised,
) -> list[tuple[dict[str, Any], dict[str, Any], str]]:
    """Decide what the DELETE entries (and, in a history Bundle, the older versions) of
    one Bundle do; the resource entries that stay. Ids are assigned by now.

    * history: each ``Type/id`` keeps only its newest entry (the greatest
      ``meta.lastUpdated`` / ``response.lastModified`` when all have one, else the first:
      a history lists newest first); when that is a DELETE, it is a deletion.
    * any other type (transaction, batch, Bulk ``deleted`` files): a DELETE of a resource
      that the same Bundle also writes does nothing (a transaction applies DELETEs
      first); any other DELETE is a deletion.

    A conditional or type-level DELETE names no resource: unsupported, like PATCH.
    """
    index_of = {where: _entry_index(where) for _, _, where in pairs}

    def deletion(where: str, url: str, ref: str) -> None:
        out.deletions.append(
            {
                "path": where,
                "url": url,
                "ref": ref,
                "message": f"DELETE {url} at {_entry_label(where)}",
            }
        )

    targets: list[tuple[int, dict[str, Any], str, str, str]] = []
    for i, entry, where, url in deletes:
        ref = _target(url) or _target(str(entry.get("fullUrl") or ""))
        if ref is None:
            out.unsupported.append(
                {
                    "path": where,
                    "method": "DELETE",
                    "url": url,
                    "message": f"not supported yet: DELETE {url} at {_entry_label(where)}"
                    " (names no single resource)",
                }
            )
            continue
        targets.append((i, entry, where, url, ref))
    written = {f"{res.get('resourceType')}/{res.get('id')}": where for _, res, where in pairs}
    if not history:
        for _, _, where, url, ref in targets:
            if ref in written:
                out.skipped.append(
                    {
                        "path": where,
                        "reason": f"DELETE {url} undone by {_entry_label(written[ref])} of "
                        "the same Bundle (a transaction applies DELETEs first)",
                    }
                )
            else:
                deletion(where, url, ref)
        return pairs
    # history: the versions of each resource, resource entries and DELETEs alike
    versions: dict[str, list[tuple[int, int | None, str, str | None]]] = {}
    for entry, res, where in pairs:
        ref = f"{res.get('resourceType')}/{res.get('id')}"
        versions.setdefault(ref, []).append((index_of[where], _version_ms(entry, res), where, None))
    for i, entry, where, url, ref in targets:
        versions.setdefault(ref, []).append((i, _version_ms(entry, None), where, url))
    keep: set[str] = set()
    for ref, found in versions.items():
        if all(ms is not None for _, ms, _, _ in found):
            newest = max(found, key=lambda v: (v[1], -v[0]))
        else:
            newest = min(found, key=lambda v: v[0])
        for v in found:
            if v is not newest:
                out.skipped.append(
                    {
                        "path": v[2].removesuffix(".resource"),
                        "reason": f"an older version of {ref} (history: "
                        f"{_entry_label(newest[2].removesuffix('.resource'))} is newer)",
                    }
                )
        if newest[3] is None:
            keep.add(newest[2])
        else:
            deletion(newest[2], newest[3], ref)
    return [p for p in pairs if p[2] in keep]


# -- the pipeline ---------------------------------------------------------------------


def _event_ms(res: dict[str, Any]) -> int | None:
    meta = res.get("meta")
    if isinstance(meta, dict) and (ms := fhir_time_ms(meta.get("lastUpdated"))) is not None:
        return ms
    return clinical_time_ms(res)


def _is_export_log(obj: Any) -> bool:
    """A line of a Bulk export's ``log.ndjson`` (not a resource: nothing to convert)."""
    return (
        isinstance(obj, dict)
        and "resourceType" not in obj
        and "exportId" in obj
        and "eventId" in obj
    )


def _converted(
    resources: list[dict[str, Any]], event_ms: int | None, control: str, idents: Sequence[str]
) -> Converted:
    kw: dict[str, Any] = {}
    if "patient_identifiers" in getattr(Converted, "__dataclass_fields__", {}):
        kw["patient_identifiers"] = tuple(idents)
    return Converted(resources, event_ms, control, **kw)


def convert_record(rec: bus.Record, validate: bool, mappings: Path | None) -> list[Converted]:
    """One raw ``ehr.fhir`` record → units (one per patient); raises SourceError."""
    filename = rec.header("fhirtwin-filename")
    position = rec.header("fhirtwin-position")
    ndjson = filename.lower().endswith(".ndjson") or "ndjson" in rec.header("content-type")
    where = {"file": filename, **({"line": position} if ndjson else {})}
    loc = f"{filename}:{position}" if ndjson else filename or rec.ref
    try:
        obj = orjson.loads(rec.value)
    except orjson.JSONDecodeError as exc:
        raise SourceError(
            "parse", f"{loc}: not JSON: {exc}", {"error": "not JSON", **where, "detail": str(exc)}
        ) from exc
    if _is_export_log(obj):
        return []  # a Bulk export log line: nothing clinical in it
    if not isinstance(obj, dict) or not isinstance(obj.get("resourceType"), str):
        raise SourceError(
            "parse",
            f"{loc}: not a FHIR resource (no resourceType)",
            {"error": "not a FHIR resource", **where, "path": "resourceType"},
        )
    scope = (
        rec.header("fhirtwin-fhir-source")
        or os.environ.get("FHIRTWIN_FHIR_SOURCE")
        or DEFAULT_SCOPE
    )
    is_bundle = obj["resourceType"] == "Bundle"
    control = (
        f"{filename}#{position}"
        if ndjson and not is_bundle
        else str(obj.get("id") or (obj.get("identifier") or {}).get("value") or filename or rec.ref)
    )
    norm = normalise_bundle(obj, validate=validate, seed=control or rec.ref, scope=scope)
    if norm.problems:
        first = norm.problems[0]
        raise SourceError(
            "validate",
            f"{loc}: {len(norm.problems)} FHIR validation problem(s), first: {first['path']}: "
            f"{first['error']}; fix the source or its export, then replay this dead letter",
            {
                "error": "invalid resource",
                **where,
                "problems": norm.problems[:50],
                "control_id": control,
            },
        )
    refused = sorted(norm.unsupported, key=lambda d: _entry_index(d["path"]))
    if refused:
        # The twin store cannot apply a PATCH or a conditional DELETE: applying the rest of
        # the record would keep what the source changed, so the whole record waits as a dead
        # letter, every such entry listed, to be replayed once the store can apply it.
        listed = "; ".join(d["message"] for d in refused[:5])
        more = f" (and {len(refused) - 5} more)" if len(refused) > 5 else ""
        raise SourceError(
            "map",
            f"{loc}: {len(refused)} operation(s) the twin store cannot apply: {listed}{more}; "
            "replay this dead letter once it can",
            {
                "error": "not supported yet",
                **where,
                "control_id": control,
                "count": len(refused),
                "operations": [
                    {k: d[k] for k in ("path", "url", "message")} for d in refused[:1000]
                ],
            },
        )
    groups: dict[str | None, list[dict[str, Any]]] = {}
    for unit in norm.units:
        groups.setdefault(unit.patient, []).append(unit.resource)
    bundle_ms = None
    if is_bundle:
        meta = obj.get("meta")
        bundle_ms = fhir_time_ms(obj.get("timestamp"))
        if bundle_ms is None and isinstance(meta, dict):
            bundle_ms = fhir_time_ms(meta.get("lastUpdated"))
    out = []
    for patient, resources in groups.items():
        ms = bundle_ms
        if ms is None:
            times = [t for r in resources if (t := _event_ms(r)) is not None]
            ms = max(times) if times else None
        idents = [patient_ref_key(patient, norm.scope)] if patient else []
        out.append(_converted(resources, ms, control, idents))
    if norm.deletions:  # applied in the twins that hold them (normalize finds them by id)
        refs = tuple(dict.fromkeys(d["ref"] for d in norm.deletions))
        out.append(Converted([], bundle_ms, control, deleted=refs))
    return out


# -- convert: files → one Bundle per patient ------------------------------------------


@dataclass
class ConvertReport:
    files: int = 0
    read: int = 0  # resources read (lines / entries)
    written: Counter[str] = field(default_factory=Counter)  # resource type → count
    patients: int = 0
    shared: int = 0
    invalid: list[dict[str, Any]] = field(default_factory=list)  # file, line, path, error
    invalid_resources: int = 0
    unresolved: list[dict[str, Any]] = field(default_factory=list)  # file, line, path, reference
    unresolved_count: int = 0
    references: int = 0
    duplicates: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    deletions: list[dict[str, Any]] = field(default_factory=list)  # file, line, path, url, ref
    deletion_entries: int = 0  # DELETE entries read that name one resource
    deleted: int = 0  # DELETE entries written to _deleted.json (not undone by a later copy)
    unsupported: list[dict[str, Any]] = field(default_factory=list)  # file, line, path, message
    unsupported_count: int = 0
    outputs: list[Path] = field(default_factory=list)

    def add(self, name: str, item: dict[str, Any]) -> None:
        items: list[dict[str, Any]] = getattr(self, name)
        if len(items) < _MAX_LISTED:
            items.append(item)

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "resources_read": self.read,
            "resources_written": dict(sorted(self.written.items())),
            "patients": self.patients,
            "shared_resources": self.shared,
            "invalid_resources": self.invalid_resources,
            "invalid": self.invalid,
            "references": self.references,
            "unresolved_references": self.unresolved_count,
            "unresolved": self.unresolved,
            "duplicates_replaced": self.duplicates,
            "skipped": self.skipped,
            "deletion_entries": self.deletion_entries,
            "deleted": self.deleted,
            "deletions": self.deletions,
            "unsupported_count": self.unsupported_count,
            "unsupported": self.unsupported,
        }


def _files(inputs: Sequence[str]) -> Iterator[Path]:
    for p in inputs:
        path = Path(p)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.suffix.lower() in (".json", ".ndjson", ".jsonl"):
                    yield child
        else:
            yield path


class _Spool:
    """Resources per group on disk (one NDJSON file per group, few handles open)."""

    def __init__(self, folder: Path, max_open: int = 128) -> None:
        self.folder = folder
        self.max_open = max_open
        self.handles: OrderedDict[str, IO[bytes]] = OrderedDict()
        self.names: dict[str, Path] = {}

    def path(self, group: str) -> Path:
        p = self.names.get(group)
        if p is None:
            p = self.names[group] = self.folder / f"{len(self.names)}.ndjson"
        return p

    def write(self, group: str, line: bytes) -> None:
        fh = self.handles.get(group)
        if fh is None:
            fh = self.path(group).open("ab")
            self.handles[group] = fh
            if len(self.handles) > self.max_open:
                self.handles.popitem(last=False)[1].close()
        else:
            self.handles.move_to_end(group)
        fh.write(line)

    def close(self) -> None:
        for fh in self.handles.values():
            fh.close()
        self.handles.clear()

    def read(self, group: str) -> Iterator[Any]:
        with self.path(group).open("rb") as fh:
            for line in fh:
                yield orjson.loads(line)


def _identifier_keys(res: dict[str, Any]) -> Iterator[str]:
    rt = res["resourceType"]
    for ident in res.get("identifier") or ():
        if isinstance(ident, dict) and isinstance(ident.get("value"), str):
            system = ident.get("system")
            yield (
                f"{rt}?identifier={system}|{ident['value']}"
                if system
                else f"{rt}?identifier={ident['value']}"
            )


class _Converter:
    def __init__(
        self, out_dir: Path | None, validate: bool, bases: Sequence[str], tmp: Path
    ) -> None:
        self.out_dir = out_dir
        self.validate = validate
        self.bases = tuple(bases) or _bases_from_env()
        self.report = ConvertReport()
        self.spool = _Spool(tmp)
        self.index: dict[str, int] = {}  # Type/id → sequence number of its last version
        self.deleted: dict[str, int] = {}  # Type/id → sequence number of its last DELETE
        self.by_identifier: dict[str, str] = {}  # Type?identifier=sys|val → Type/id
        self.seq = 0
        self.groups: dict[str, int] = {}  # group → resources spooled

    # pass 1: read, normalise, validate, index, spool
    def take(self, obj: Any, file: str, line: int | None) -> None:
        loc: dict[str, Any] = {"file": file, **({"line": line} if line is not None else {})}
        if _is_export_log(obj):
            self.report.add("skipped", {**loc, "reason": "Bulk export log entry"})
            return
        if not isinstance(obj, dict) or not isinstance(obj.get("resourceType"), str):
            self.report.read += 1
            self.report.invalid_resources += 1
            self.report.add(
                "invalid",
                {**loc, "path": "resourceType", "error": "not a FHIR resource (no resourceType)"},
            )
            return
        entries = obj.get("entry") if obj["resourceType"] == "Bundle" else None
        n_in = len(entries) if isinstance(entries, list) else 1
        self.report.read += n_in
        norm = normalise_bundle(
            obj, validate=self.validate, bases=self.bases, seed=f"{file}#{line or 0}"
        )
        bad_paths = {p["path"].split(".resource", 1)[0] for p in norm.problems}
        self.report.invalid_resources += len(bad_paths)
        for p in norm.problems:
            self.report.add("invalid", {**loc, **p})
        for s in norm.skipped:
            self.report.add("skipped", {**loc, **s})
        for u in norm.unresolved:
            self.report.unresolved_count += 1
            self.report.add("unresolved", {**loc, **u})
        for x in norm.unsupported:
            self.report.unsupported_count += 1
            self.report.add("unsupported", {**loc, **x})
        where = f"{loc['file']}:{line}" if line is not None else loc["file"]
        for d in norm.deletions:
            # a later copy of the resource undoes the deletion; an earlier one is dropped
            ref = d["ref"]
            self.seq += 1
            self.report.deletion_entries += 1
            self.report.add("deletions", {**loc, **{k: d[k] for k in ("path", "url", "ref")}})
            self.index.pop(ref, None)
            self.deleted[ref] = self.seq
            rtype, rid = ref.split("/", 1)
            self.groups[DELETED] = self.groups.get(DELETED, 0) + 1
            stub = {"resourceType": rtype, "id": rid}
            self.spool.write(DELETED, orjson.dumps([self.seq, where, d["path"], stub]) + b"\n")
        for unit in norm.units:
            res = unit.resource
            ref = f"{res['resourceType']}/{res['id']}"
            self.seq += 1
            if ref in self.index:
                self.report.duplicates += 1
            self.index[ref] = self.seq
            self.deleted.pop(ref, None)
            for key in _identifier_keys(res):
                self.by_identifier.setdefault(key, ref)
            group = unit.patient or SHARED
            self.groups[group] = self.groups.get(group, 0) + 1
            self.spool.write(group, orjson.dumps([self.seq, where, unit.path, res]) + b"\n")

    def take_line(self, raw: bytes, name: str, n: int) -> None:
        """One NDJSON line (blank lines are skipped by the callers)."""
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            self.report.read += 1
            self.report.invalid_resources += 1
            self.report.add(
                "invalid", {"file": name, "line": n, "path": "", "error": f"not JSON: {exc}"}
            )
            return
        self.take(obj, name, n)

    def take_document(self, data: bytes, name: str) -> None:
        """One JSON document: a Bundle or a single resource."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            self.report.read += 1
            self.report.invalid_resources += 1
            self.report.add("invalid", {"file": name, "path": "", "error": f"not JSON: {exc}"})
            return
        self.take(obj, name, None)

    def _too_large(self, name: str, size: int) -> None:
        self.report.invalid_resources += 1
        self.report.add(
            "invalid",
            {
                "file": name,
                "path": "",
                "error": f"{size} bytes: too large for one JSON document (use NDJSON)",
            },
        )

    def take_file(self, path: Path, progress: Callable[[int], None]) -> None:
        self.report.files += 1
        name = str(path)
        if path.suffix.lower() in (".ndjson", ".jsonl"):
            with path.open("rb") as fh:
                for n, raw in enumerate(fh, 1):
                    progress(len(raw))
                    if raw.strip():
                        self.take_line(raw, name, n)
            return
        size = path.stat().st_size
        if size > _MAX_JSON_FILE:
            self._too_large(name, size)
            progress(size)
            return
        data = path.read_bytes()
        progress(len(data))
        self.take_document(data, name)

    def take_stream(self, fh: IO[bytes], progress: Callable[[int], None]) -> None:
        """Standard input: NDJSON (streamed line by line), a Bundle or a single resource.

        Which one is decided by the first non-blank line: a whole JSON object on one line
        (``{…}``) starts NDJSON (a one-line document is a one-line NDJSON); anything else
        (``{`` alone, a pretty-printed document) is read as one JSON document.
        """
        self.report.files += 1
        lines = iter(fh)  # one iterator: reading on after the first line
        n = 0
        first = b""
        for raw in lines:
            n += 1
            progress(len(raw))
            if raw.strip():
                first = raw
                break
        if not first:
            return  # empty input: nothing to convert
        head = first.strip()
        if head.startswith(b"{") and head.endswith(b"}"):
            self.take_line(first, STDIN, n)
            for raw in lines:
                n += 1
                progress(len(raw))
                if raw.strip():
                    self.take_line(raw, STDIN, n)
            return
        rest = fh.read(_MAX_JSON_FILE + 1 - len(first))
        progress(len(rest))
        data = first + rest
        if len(data) > _MAX_JSON_FILE:
            size = len(data)
            while chunk := fh.read(1 << 20):  # drain, counting, without keeping it
                size += len(chunk)
                progress(len(chunk))
            self._too_large(STDIN, size)
            return
        self.take_document(data, STDIN)

    # pass 2: resolve against the whole input, write one Bundle per group
    def resolve(self, res: dict[str, Any], where: str, path: str) -> None:
        def check(ref: str, at: str) -> str | None:
            self.report.references += 1
            if ref.startswith(("#", "urn:")) or "://" in ref.split("?", 1)[0]:
                return None  # contained / absolute / urn: judged in pass 1
            if "?" in ref:
                got = self.by_identifier.get(unquote(ref))
                if got is None:
                    self._unresolved(
                        where, at, ref, "conditional reference matches no resource of the input"
                    )
                elif got not in self.index:
                    self._unresolved(where, at, ref, f"matches {got}, deleted in the input")
                    return None
                return got
            m = _REL.match(ref)
            if m is None:
                self._unresolved(where, at, ref, "not a FHIR reference")
            elif (key := f"{m['type']}/{m['id']}") not in self.index:
                reason = (
                    "deleted in the input"
                    if key in self.deleted
                    else "no such resource in the input"
                )
                self._unresolved(where, at, ref, reason)
            return None

        _walk_refs(res, path or res["resourceType"], check)

    def _unresolved(self, where: str, path: str, ref: str, reason: str) -> None:
        file, _, line = (
            where.rpartition(":") if where.rpartition(":")[2].isdigit() else (where, "", "")
        )
        self.report.unresolved_count += 1
        item: dict[str, Any] = {"file": file, **({"line": int(line)} if line else {})}
        self.report.add("unresolved", {**item, "path": path, "reference": ref, "reason": reason})

    def write_all(self, sink: Callable[[str, Iterator[bytes]], int]) -> None:
        """Each group's Bundle through ``sink`` (which returns the entries it wrote); a
        group left with no entry (all replaced or deleted later) is not written."""
        self.spool.close()
        order = {SHARED: 1, DELETED: 2}
        for group in sorted(self.groups, key=lambda g: (order.get(g, 0), g)):
            written = sink(group, self._entries(group))
            if group == SHARED:
                self.report.shared = written
            elif group == DELETED:
                self.report.deleted = written
            elif written:
                self.report.patients += 1

    def _entries(self, group: str) -> Iterator[bytes]:
        if group == DELETED:
            for seq, _where, _path, stub in self.spool.read(group):
                ref = f"{stub['resourceType']}/{stub['id']}"
                if self.deleted.get(ref) == seq:  # else a later copy or DELETE replaces it
                    yield orjson.dumps({"request": {"method": "DELETE", "url": ref}})
            return
        for seq, where, path, res in self.spool.read(group):
            ref = f"{res['resourceType']}/{res['id']}"
            if self.index.get(ref) != seq:
                continue  # a later copy (or DELETE) of the same resource replaces this one
            self.resolve(res, where, path)
            self.report.written[res["resourceType"]] += 1
            entry: dict[str, Any] = {}
            if _UUID.match(res["id"]):
                entry["fullUrl"] = f"urn:uuid:{res['id']}"
            entry["resource"] = res
            entry["request"] = {"method": "PUT", "url": ref}
            yield orjson.dumps(entry)


def _bundle_head(group: str) -> bytes:
    bid = str(uuid.uuid5(_NS, f"fhirtwin-fhir-convert|{group}"))
    return b'{"resourceType":"Bundle","id":"' + bid.encode() + b'","type":"batch","entry":[\n'


def _file_name(group: str) -> str:
    return (
        f"{group}.json"
        if _ID.match(group) or group in (SHARED, DELETED)
        else f"{uuid.uuid5(_NS, group)}.json"
    )


def convert_files(
    inputs: Sequence[str],
    out: Path | None,
    *,
    validate: bool = True,
    bases: Sequence[str] = (),
    progress: Callable[[int], None] | None = None,
    stdin: IO[bytes] | None = None,
) -> ConvertReport:
    """Convert files and folders (``-``: standard input, see ``_Converter.take_stream``);
    write ``<patient id>.json`` per patient, ``_shared.json``, ``_deleted.json`` and
    ``_report.json`` to ``out`` (or the Bundles as lines to stdout). The report."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fhirtwin-spool-", dir=out))
    step = progress or (lambda n: None)
    try:
        conv = _Converter(out, validate, bases, tmp)
        for name in inputs:
            if name == "-":
                conv.take_stream(stdin or sys.stdin.buffer, step)
                continue
            for path in _files([name]):
                conv.take_file(path, step)

        def sink(group: str, entries: Iterator[bytes]) -> int:
            first = next(entries, None)
            if first is None:
                return 0  # nothing left in this group: no empty Bundle
            n = 1
            if out is None:
                sys.stdout.buffer.write(_bundle_head(group).rstrip(b"\n") + first)
                for e in entries:
                    sys.stdout.buffer.write(b"," + e)
                    n += 1
                sys.stdout.buffer.write(b"]}\n")
                return n
            target = out / _file_name(group)
            with target.open("wb") as fh:
                fh.write(_bundle_head(group) + first)
                for e in entries:
                    fh.write(b",\n" + e)
                    n += 1
                fh.write(b"\n]}\n")
            conv.report.outputs.append(target)
            return n

        conv.write_all(sink)
        if out is not None:
            (out / "_report.json").write_bytes(
                orjson.dumps(conv.report.to_dict(), option=orjson.OPT_INDENT_2)
            )
        return conv.report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_paths(
    inputs: list[str], out: Path | None, *, validate: bool, profile: str | None, console: Any
) -> int:
    """``fhirtwin convert --from fhir``: the exit code (1 when any input was invalid)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    files = [p for p in inputs if p != "-"]
    # standard input has no size to show progress against
    total = None if "-" in inputs else sum(p.stat().st_size for p in _files(files))
    bar = Progress(
        TextColumn("converting"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=out is None,
    )
    with bar:
        task = bar.add_task("convert", total=total)
        report = convert_files(
            inputs, out, validate=validate, progress=lambda n: bar.advance(task, n)
        )
    for item in report.invalid[:20]:
        line = f":{item['line']}" if "line" in item else ""
        console.print(f"[red]{item['file']}{line}: {item['path']}: {item['error']}[/red]")
    for item in report.unsupported[:20]:
        line = f":{item['line']}" if "line" in item else ""
        console.print(f"{item['file']}{line}: {item['message']}", style="red", markup=False)
    for item in report.unresolved[:10]:
        line = f":{item['line']}" if "line" in item else ""
        console.print(
            f"[yellow]{item['file']}{line}: {item['path']}: unresolved {item['reference']} "
            f"({item['reason']})[/yellow]"
        )
    summary = Console() if out is not None else console
    written = sum(report.written.values())
    summary.print(
        f"{written} of {report.read} resources converted from {report.files} file(s) → "
        f"{report.patients} patient Bundle(s)"
        + (f" and {report.shared} shared resource(s) ({SHARED})" if report.shared else "")
        + (f" in {out}" if out is not None else "")
    )
    table = Table()
    table.add_column("resource type")
    table.add_column("count", justify="right")
    for rt, n in sorted(report.written.items(), key=lambda x: (-x[1], x[0])):
        table.add_row(rt, str(n))
    table.add_row("[bold]all[/bold]", f"[bold]{written}[/bold]")
    summary.print(table)
    summary.print(
        f"references: {report.references - report.unresolved_count} resolved, "
        f"{report.unresolved_count} unresolved (kept"
        + (", listed in _report.json)" if out is not None else ")")
        + (
            f"; {report.duplicates} duplicate resource(s) replaced by a later copy"
            if report.duplicates
            else ""
        )
    )
    if report.deletion_entries:
        summary.print(
            f"deletions: {report.deletion_entries} DELETE entr(ies) read; {report.deleted} "
            f"written as DELETE entries ({DELETED}"
            + (".json)" if out is not None else ")")
            + (
                f", {report.deletion_entries - report.deleted} undone by a later copy"
                if report.deletion_entries > report.deleted
                else ""
            )
            + "; earlier copies of deleted resources left out"
        )
    if report.unsupported_count:
        summary.print(
            f"[red]{report.unsupported_count} operation(s) not supported yet (PATCH, "
            "conditional DELETE): not applied (see above)[/red]"
        )
    if validate:
        summary.print(
            f"FHIR R4 validation: {written} valid, {report.invalid_resources} invalid (left out, see above)"
        )
    elif report.invalid_resources:
        summary.print(f"[red]{report.invalid_resources} unreadable resource(s) (see above)[/red]")
    if profile:
        console.print("[yellow]--profile is for CSV; ignored for FHIR input[/yellow]")
    return 1 if report.invalid_resources or report.unsupported_count else 0
