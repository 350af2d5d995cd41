"""Flat CSV extracts → FHIR R4, driven by a profile of rules in ``mappings/csv/<profile>/``.

A profile is a folder of YAML files, one per table (CSV file). Each file names the
resource(s) a row becomes, how the resource id is made, which column names the patient,
and a template of FHIR elements filled from the row's columns. The Python here knows no
table, column or code system by name (see docs/sources-csv.md for the rule language).

Two entry points:

* ``convert_paths``: ``fhirtwin convert --from csv --profile NAME DIR --out OUT`` streams
  every table of the profile found in DIR and writes one Bundle per patient
  (``<patient id>.json``; rows naming no patient go to ``_shared.json``).
* ``convert_record``: the pipeline plug-in (``fhirtwin.normalize``): one ingested row,
  the header row in the ``fhirtwin-csv-header`` header, the file name in
  ``fhirtwin-filename``, the line in ``fhirtwin-position``.

A bad row (a required column empty, a date or number that does not parse, a code with no
mapping, the wrong number of fields) is reported with file, line and column; the other
rows go on.
"""

from __future__ import annotations

import csv
import io
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import yaml

from fhirtwin import bus, yamlfile

__all__ = [
    "Profile",
    "RowError",
    "Table",
    "convert_paths",
    "convert_record",
    "convert_row",
    "iter_table",
    "load_profile",
]

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = uuid.UUID("5b1e7d8c-6f0e-4f43-9a51-1f2d6c0a7e11")  # fhirtwin CSV row ids
SHARED = "_shared"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_DATE = re.compile(r"\d{4}(-\d{2}(-\d{2})?)?\Z")
_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?\Z")
_DIRECTIVES = {"column", "if", "ref", "join"}


class RowError(Exception):
    """One bad row: where (file, line, column) and why."""

    def __init__(self, reason: str, column: str | None = None, stage: str = "map") -> None:
        super().__init__(reason)
        self.reason, self.column, self.stage = reason, column, stage
        self.file = ""
        self.line = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": self.stage,
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "reason": self.reason,
        }

    def __str__(self) -> str:
        col = f", column {self.column}" if self.column else ""
        return f"{self.file}:{self.line}{col}: {self.reason}"


class ProfileError(Exception):
    """The rules themselves are broken (not the data)."""


# -- profiles -----------------------------------------------------------------------------


@dataclass(slots=True)
class ResourceRule:
    resource: str
    id: Any
    elements: dict[str, Any]
    when: Any = None


@dataclass(slots=True)
class Table:
    name: str
    file: str
    columns: list[str]
    required: list[str]
    patient: dict[str, str] | None
    event_time: str | None
    rules: list[ResourceRule]
    maps: dict[str, dict[str, Any]] = field(default_factory=dict)
    consts: dict[str, Any] = field(default_factory=dict)
    allowed: dict[str, list[str]] = field(default_factory=dict)


@dataclass(slots=True)
class Profile:
    name: str
    path: Path
    tables: list[Table]

    def table_for(self, filename: str, header: list[str]) -> Table | None:
        """The table of a file: by file name, else by the header's columns."""
        for t in self.tables:
            if t.file.lower() == filename.lower():
                return t
        cols = set(header)
        for t in self.tables:
            if t.columns and set(t.columns) == cols:
                return t
        return None


def _yaml(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as fh:
            return yamlfile.load(fh)
    except (OSError, yaml.YAMLError) as exc:
        raise ProfileError(f"{path}: {exc}") from exc


def load_profile(name_or_path: str | Path, mappings: Path | None = None) -> Profile:
    """A profile by name (``mappings/csv/<name>/``) or by folder path."""
    path = Path(name_or_path)
    if not path.is_dir():
        path = (mappings or ROOT / "mappings") / "csv" / str(name_or_path)
    if not path.is_dir():
        raise ProfileError(f"no CSV profile {name_or_path!r} (looked for {path})")
    shared = _yaml(path / "_codes.yaml") if (path / "_codes.yaml").is_file() else {}
    maps: dict[str, dict[str, Any]] = (shared or {}).get("maps", {}) or {}
    consts: dict[str, Any] = (shared or {}).get("constants", {}) or {}
    tables: list[Table] = []
    for f in sorted(path.glob("*.yaml")):
        if f.name.startswith("_"):
            continue
        raw = _yaml(f) or {}
        if "file" not in raw:
            raise ProfileError(f"{f}: needs 'file' (the CSV file name)")
        specs = raw.get("resources") or [raw]
        rules = []
        for s in specs:
            if "resource" not in s or "elements" not in s:
                raise ProfileError(f"{f}: each resource needs 'resource' and 'elements'")
            rules.append(ResourceRule(s["resource"], s.get("id"), s["elements"], s.get("when")))
        patient = raw.get("patient")
        if isinstance(patient, str):
            patient = {"column": patient}
        tables.append(
            Table(
                f.stem,
                raw["file"],
                list(raw.get("columns") or []),
                list(raw.get("required") or []),
                patient,
                raw.get("event_time"),
                rules,
                {**maps, **(raw.get("maps") or {})},
                consts,
                {c: [str(v) for v in vs] for c, vs in (raw.get("allowed") or {}).items()},
            )
        )
    return Profile(path.name, path, tables)


# -- one row --------------------------------------------------------------------------------


# FHIR's whole-number types: 32-bit, and by their names not below 1 or 0
_INT_MAX = 2**31 - 1
_INT_LOW = {"integer": -(2**31), "positiveInt": 1, "unsignedInt": 0}


def _check_type(value: str, typ: str, column: str) -> Any:
    try:
        if typ == "decimal":
            num = float(value)
            if num != num or num in (float("inf"), float("-inf")):
                raise ValueError(value)
            return int(num) if re.fullmatch(r"-?\d+", value.strip()) else num
        if typ in ("integer", "positiveInt", "unsignedInt"):
            whole, least = int(value), _INT_LOW[typ]
            if not least <= whole <= _INT_MAX:
                raise RowError(
                    f"{value!r} is not a valid {typ} ({least:,} to {_INT_MAX:,})", column
                )
            return whole
        if typ == "boolean":
            low = value.strip().lower()
            if low not in ("true", "false", "1", "0", "y", "n", "yes", "no"):
                raise ValueError(value)
            return low in ("true", "1", "y", "yes")
        if typ == "date":
            v = value.strip()[:10]
            if not _DATE.match(v):
                raise ValueError(value)
            if len(v) == 10:
                datetime.fromisoformat(v)
            return v
        if typ in ("dateTime", "instant"):
            v = value.strip()
            if _DATE.match(v):
                if len(v) == 10:
                    datetime.fromisoformat(v)
                return v
            if not _DATETIME.match(v):
                raise ValueError(value)
            v = v.replace(" ", "T", 1)
            datetime.fromisoformat(v.replace("Z", "+00:00"))
            if v.count(":") == 1:
                v = v[:16] + ":00" + v[16:]
            if not (v.endswith("Z") or re.search(r"[+-]\d{2}:?\d{2}\Z", v)):
                v += "Z"  # FHIR requires a zone with a time; the extract's times are UTC
            return v
    except ValueError:
        raise RowError(f"{value!r} is not a valid {typ}", column) from None
    return value


class _Row:
    __slots__ = ("table", "values")

    def __init__(self, table: Table, values: dict[str, str]) -> None:
        self.table, self.values = table, values

    def get(self, column: str) -> str:
        # a column the file lacks reads as empty: the header check (``columns``) is where a
        # profile says which columns a file must have
        return self.values.get(column, "").strip()


def _cond(row: _Row, cond: Any) -> bool:
    if isinstance(cond, str):
        return bool(row.get(cond))
    if isinstance(cond, dict):
        for col, want in cond.items():
            if col == "not":
                if _cond(row, want):
                    return False
                continue
            have = row.get(col)
            if isinstance(want, dict) and set(want) == {"regex"}:
                if not re.fullmatch(str(want["regex"]), have):
                    return False
            elif isinstance(want, list):
                if have not in [str(w) for w in want]:
                    return False
            elif isinstance(want, bool):
                if bool(have) != want:
                    return False
            elif have != str(want):
                return False
        return True
    if isinstance(cond, list):
        return all(_cond(row, c) for c in cond)
    raise ProfileError(f"{row.table.name}: bad condition {cond!r}")


def _template(row: _Row, text: str) -> str | None:
    matches = list(_VAR.finditer(text))
    if not matches:
        return text
    if len(matches) == 1 and matches[0].span() == (0, len(text)):
        return row.get(matches[0].group(1) or matches[0].group(2)) or None
    seen = False

    def sub(m: re.Match[str]) -> str:
        nonlocal seen
        v = row.get(m.group(1) or m.group(2))
        seen = seen or bool(v)
        return v

    out = _VAR.sub(sub, text)
    return " ".join(out.split()) if seen else None


def _map(row: _Row, value: str, spec: dict[str, Any], column: str) -> Any:
    table = spec["map"]
    if isinstance(table, str):
        if table not in row.table.maps:
            raise ProfileError(f"{row.table.name}: no map named {table!r}")
        table = row.table.maps[table]
    if value in table:
        return table[value]
    if value.lower() in table:
        return table[value.lower()]
    if "default" in spec:
        return spec["default"]
    raise RowError(f"no mapping for {value!r} (known: {', '.join(map(str, table))})", column)


def _value(row: _Row, spec: Any) -> Any:
    """A template value → JSON, or None (omitted) when its columns are empty."""
    if isinstance(spec, str):
        return _template(row, spec)
    if isinstance(spec, list):
        items = [v for v in (_value(row, s) for s in spec) if v not in (None, {}, [])]
        return items or None
    if not isinstance(spec, dict):
        return spec
    if "column" in spec:
        col = spec["column"]
        raw = row.get(col)
        if not raw:
            return _value(row, spec["default"]) if "default" in spec else None
        if "map" in spec:
            mapped = _map(row, raw, spec, col)
            return _check_type(str(mapped), spec["type"], col) if "type" in spec else mapped
        return _check_type(raw, spec.get("type", "string"), col)
    if "if" in spec:
        return _value(row, spec.get("then") if _cond(row, spec["if"]) else spec.get("else"))
    if "ref" in spec:
        target = _template(row, spec["id"]) if "id" in spec else None
        if target is None:
            return None
        ref = {"reference": f"{spec['ref']}/{target}"}
        if "display" in spec and (d := _template(row, spec["display"])):
            ref["display"] = d
        return ref
    if "join" in spec:
        parts = [v for v in (_value(row, s) for s in spec["join"]) if v]
        return spec.get("sep", " ").join(map(str, parts)) or None
    out: dict[str, Any] = {}
    for key, sub in spec.items():
        v = _value(row, sub)
        if v not in (None, {}, []):
            out[key] = v
    return out or None


def _resource_id(row: _Row, rule: ResourceRule) -> str:
    spec = rule.id
    if isinstance(spec, str):
        v = _template(row, spec)
        if not v:
            raise RowError("the id column is empty", spec.lstrip("$"))
        return v
    if isinstance(spec, dict) and "uuid5" in spec:
        cols = spec["uuid5"]
        name = "|".join([rule.resource, row.table.name, *(row.get(c) for c in cols)])
        return str(uuid.uuid5(NAMESPACE, name))
    raise ProfileError(f"{row.table.name}: 'id' must be '$COLUMN' or {{uuid5: [columns]}}")


@dataclass(frozen=True, slots=True)
class RowResult:
    resources: list[dict[str, Any]]
    patient: str | None  # the patient key (bundle grouping), e.g. the Synthea patient id
    identifiers: tuple[str, ...]  # system|value naming the patient (for the MPI)
    event_time: str | None


def convert_row(table: Table, values: dict[str, str]) -> RowResult:
    """One row (column → text) → its resources. Raises RowError (without file/line)."""
    row = _Row(table, values)
    for col in table.required:
        if not row.get(col):
            raise RowError("required column is empty", col)
    for col, allowed in table.allowed.items():
        if (have := row.get(col)) and have not in allowed:
            raise RowError(f"{have!r} is not one of {', '.join(allowed)}", col)
    resources = []
    for rule in table.rules:
        if rule.when is not None and not _cond(row, rule.when):
            continue
        body = _value(row, rule.elements) or {}
        res = {"resourceType": rule.resource, "id": _resource_id(row, rule), **body}
        _check_complete(row, rule, res)
        resources.append(res)
    patient = idents = None
    if table.patient:
        patient = row.get(table.patient["column"]) or None
        system = table.patient.get("system")
        if patient and system:
            idents = (f"{system}|{patient}",)
    event = None
    if table.event_time:
        ev = row.get(table.event_time)
        event = _check_type(ev, "dateTime", table.event_time) if ev else None
    return RowResult(resources, patient, idents or (), event)


def _check_complete(row: _Row, rule: ResourceRule, res: dict[str, Any]) -> None:
    """A row whose resource would lack what FHIR R4 requires of its type (read from the
    R4B models: Claim.provider, Observation.code) is a bad row, naming the empty column
    that feeds the element, so that it is caught with validation off too; the profile's
    ``required:`` says the same up front (that check runs first)."""
    from fhirtwin.fastcheck import missing_elements

    for label, keys in missing_elements(res)[:1]:
        cols = [c for k in sorted(keys) if k in rule.elements for c in _columns(rule.elements[k])]
        empty = next((c for c in cols if not row.get(c)), None)
        said = f": column {empty} is empty" if empty else ""
        raise RowError(
            f"the {rule.resource} would have no {label}, which FHIR R4 requires{said}",
            empty or (cols[0] if cols else None),
        )


def _columns(template: Any) -> list[str]:
    """The columns a template reads, in order: $COL, ${COL}, {column: C}."""
    if isinstance(template, str):
        return [a or b for a, b in _VAR.findall(template)]
    if isinstance(template, list):
        return [c for t in template for c in _columns(t)]
    if isinstance(template, dict):
        own = [template["column"]] if isinstance(template.get("column"), str) else []
        return own + [c for k, t in template.items() if k != "column" for c in _columns(t)]
    return []


def _parse_line(header: list[str], fields: list[str]) -> dict[str, str]:
    if len(fields) != len(header):
        col = header[len(fields)] if len(fields) < len(header) else f"(extra field {len(fields)})"
        raise RowError(
            f"{len(fields)} fields where the header has {len(header)}", col, stage="parse"
        )
    return dict(zip(header, fields, strict=True))


def iter_table(path: Path, table: Table) -> Iterator[tuple[int, RowResult | RowError]]:
    """Stream a CSV file: (line, result) per data row; bad rows yield their RowError."""
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            return
        missing = [c for c in table.columns if c not in header]
        if missing:
            exc = RowError(f"header lacks columns {', '.join(missing)}", missing[0], "parse")
            exc.file, exc.line = path.name, 1
            yield 1, exc
            return
        line = reader.line_num
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                exc = RowError(f"CSV syntax: {e}", None, "parse")
                exc.file, exc.line = path.name, reader.line_num
                yield reader.line_num, exc
                line = reader.line_num
                continue
            start, line = line + 1, reader.line_num
            if not fields or fields == [""]:
                continue
            try:
                yield start, convert_row(table, _parse_line(header, fields))
            except RowError as exc:
                exc.file, exc.line = path.name, start
                yield start, exc


# -- bundles and the command line ---------------------------------------------------------


def _entry(res: dict[str, Any]) -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:{res['id']}",
        "resource": res,
        "request": {"method": "PUT", "url": f"{res['resourceType']}/{res['id']}"},
    }


def bundle_of(key: str, resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid5(NAMESPACE, f"bundle|{key}")),
        "type": "batch",
        "entry": [_entry(r) for r in resources],
    }


def _csv_files(inputs: list[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for p in inputs:
        path = Path(p)
        for f in sorted(path.rglob("*.csv")) if path.is_dir() else [path]:
            files.setdefault(f.name.lower(), f)
    return files


def convert_dir(
    inputs: list[str],
    profile: Profile,
    *,
    validate: bool = True,
    no_resource: dict[str, int] | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], list[RowError], dict[str, int]]:
    """Every table of the profile found in ``inputs`` → resources per patient key
    (``_shared`` for rows naming none), the bad rows, and rows read per table.
    ``no_resource``, when given, receives per table the count of good rows whose rules
    made no resource (every ``when`` false, e.g. claims_transactions' transfers)."""
    from fhirtwin.validation import validate_resource

    files = _csv_files(inputs)
    groups: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    errors: list[RowError] = []
    rows: dict[str, int] = {}
    for table in profile.tables:
        path = files.get(table.file.lower())
        if path is None:
            continue
        rows[table.name] = 0
        for line, result in iter_table(path, table):
            if isinstance(result, RowError):
                errors.append(result)
                continue
            rows[table.name] += 1
            if not result.resources:
                if no_resource is not None:
                    no_resource[table.name] = no_resource.get(table.name, 0) + 1
                continue
            if validate:
                problems = [p for r in result.resources for p in validate_resource(r)]
                if problems:
                    first = problems[0]
                    exc = RowError(
                        f"{len(problems)} FHIR validation problem(s), first: "
                        f"{first['path']}: {first['error']}",
                        None,
                        "validate",
                    )
                    exc.file, exc.line = path.name, line
                    errors.append(exc)
                    continue
            group = groups.setdefault(result.patient or SHARED, {})
            for res in result.resources:
                # rows that repeat a resource (e.g. one imaging_studies row per instance of
                # a study) add nothing new at this level: the first one is kept
                group.setdefault((res["resourceType"], res["id"]), res)
    return {k: list(v.values()) for k, v in groups.items()}, errors, rows


def convert_paths(
    inputs: list[str], out: Path | None, *, validate: bool, profile: str | None, console: Any
) -> int:
    """``fhirtwin convert --from csv``: one Bundle per patient; returns the exit code."""
    try:
        prof = load_profile(profile or "synthea")
    except ProfileError as exc:
        console.print(str(exc), style="red", markup=False)
        return 3
    no_resource: dict[str, int] = {}
    groups, errors, rows = convert_dir(inputs, prof, validate=validate, no_resource=no_resource)
    if not rows:
        console.print(f"[red]no CSV file of profile {prof.name!r} in {', '.join(inputs)}[/red]")
        return 2
    for bad in errors[:200]:
        console.print(str(bad), style="yellow", markup=False, highlight=False)
    if len(errors) > 200:
        console.print(f"[yellow]… and {len(errors) - 200} more bad rows[/yellow]")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for key, resources in groups.items():
        data = orjson.dumps(bundle_of(key, resources), option=orjson.OPT_INDENT_2)
        if out is None:
            print(data.decode())
        else:
            (out / f"{key}.json").write_bytes(data)
    patients = sum(1 for k in groups if k != SHARED)
    console.print(
        f"{sum(rows.values())} rows of {len(rows)} tables → {patients} patient Bundle(s)"
        f"{' + _shared.json' if SHARED in groups else ''}; {len(errors)} bad row(s)"
    )
    if no_resource:
        # rows the rules deliberately turn into nothing: said, so that none is lost unseen
        per = ", ".join(f"{t} {n}" for t, n in no_resource.items())
        console.print(f"{sum(no_resource.values())} row(s) made no resource by rule ({per})")
    return 1 if errors else 0


# -- the pipeline plug-in -------------------------------------------------------------------

_profiles: dict[Path, list[Profile]] = {}


def _all_profiles(mappings: Path | None) -> list[Profile]:
    root = (mappings or ROOT / "mappings") / "csv"
    if root not in _profiles:
        dirs = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
        _profiles[root] = [load_profile(d) for d in dirs]
    return _profiles[root]


def convert_record(rec: bus.Record, validate: bool, mappings: Path | None) -> list[Any]:
    """One ingested CSV row → [Converted]; raises SourceError(stage, reason, error)."""
    from fhirtwin.normalize import Converted, SourceError
    from fhirtwin.twin import fhir_time_ms

    filename = rec.header("fhirtwin-filename")
    line = int(rec.header("fhirtwin-position", "0") or 0)
    where = {"file": filename, "line": line}
    try:
        header = next(csv.reader(io.StringIO(rec.header("fhirtwin-csv-header"))), [])
        fields = next(csv.reader(io.StringIO(rec.value.decode("utf-8"))), [])
    except (csv.Error, UnicodeDecodeError) as exc:
        raise SourceError(
            "parse", f"{filename}:{line}: {exc}", {**where, "error": "parse"}
        ) from exc
    header = [h.lstrip("\ufeff") for h in header]
    try:
        profiles = _all_profiles(mappings)
    except ProfileError as exc:
        raise SourceError("map", f"the CSV rules are broken: {exc}", {"error": "rules"}) from exc
    table = next((t for p in profiles if (t := p.table_for(filename, header))), None)
    if table is None:
        raise SourceError(
            "map",
            f"{filename}: no CSV profile has a table for this file or header",
            {**where, "error": "no-table", "header": header[:50]},
        )
    try:
        result = convert_row(table, _parse_line(header, fields))
    except RowError as exc:
        exc.file, exc.line = filename, line
        raise SourceError(exc.stage, str(exc), exc.to_dict()) from exc
    if validate:
        from fhirtwin.validation import validate_resource

        problems = [p for r in result.resources for p in validate_resource(r)]
        if problems:
            raise SourceError(
                "validate",
                f"{filename}:{line}: {len(problems)} FHIR validation problem(s), first: "
                f"{problems[0]}; fix the rule in mappings/csv/, then replay this dead letter",
                {**where, "error": "validate", "problems": problems[:50]},
            )
    if not result.resources:
        return []  # the rules make nothing of this row (e.g. a claims transfer): nothing to send
    control = f"{filename}:{line}"
    event_ms = fhir_time_ms(result.event_time)
    try:
        conv = Converted(
            result.resources, event_ms, control, patient_identifiers=result.identifiers
        )  # type: ignore[call-arg,unused-ignore]
    except TypeError:  # an older Converted without patient_identifiers
        conv = Converted(result.resources, event_ms, control)
    return [conv]
