"""Synthea CSV → FHIR (our synthea profile) vs Synthea's own FHIR export of the same run.

Usage (from the project root):
    .venv/bin/python bench/csv_vs_fhir.py CSV_DIR FHIR_DIR [--json OUT] [--show-diffs N]

Both exports come from one Synthea run, so they share the patient, encounter, claim,
care-plan and imaging-study UUIDs. The script converts CSV_DIR, loads the patient Bundles
of FHIR_DIR and prints:

* per patient, per resource type, the count of ours vs theirs;
* Observations reconciled: the CSV has one row per value (a blood-pressure panel is two
  rows), so each of their Observations is flattened into its value and its components'
  values, and both sides are matched on (patient, encounter, code, instant);
* field agreement: resources are paired by id where the ids are equal (Synthea's Id
  column), else by (type, code, encounter, date); on each pair the compared fields are
  code + system, status, dates (as instants; a date-only CSV value against the date of
  theirs in its own time zone), subject / patient / encounter references (by target id)
  and values. A field counts when either side has it; it agrees when both are equal.

Writes bench/results/csv_vs_fhir.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from fhirtwin import csvsource  # noqa: E402

STRICT = False  # --strict: numbers and texts must be equal as written
DEFAULT_JSON = BENCH_DIR / "results" / "csv_vs_fhir.json"
TYPES = [
    "Patient",
    "Encounter",
    "Condition",
    "AllergyIntolerance",
    "Immunization",
    "Procedure",
    "MedicationRequest",
    "CarePlan",
    "Device",
    "ImagingStudy",
    "Claim",
    "ExplanationOfBenefit",
]
Res = dict[str, Any]


# -- value helpers --------------------------------------------------------------------------


def ref_id(ref: Any) -> str | None:
    """A Reference → its target id (urn:uuid:X, Type/X, Type?identifier=sys|X)."""
    if not isinstance(ref, dict) or not isinstance(ref.get("reference"), str):
        return None
    r = ref["reference"]
    if r.startswith("urn:uuid:"):
        return r[9:]
    if "?identifier=" in r:
        return r.rsplit("|", 1)[-1]
    return r.rsplit("/", 1)[-1]


def when(value: Any) -> datetime | str | None:
    """A FHIR date/dateTime → an aware UTC datetime, or the date string when date-only."""
    if not isinstance(value, str):
        return None
    if len(value) <= 10:
        return value
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return dt.astimezone(UTC) if dt.tzinfo else dt.replace(tzinfo=UTC)


def same_time(a: Any, b: Any) -> bool:
    """Equal instants; a date-only value equals any time on that date in the other's zone."""
    if a is None or b is None:
        return a is b
    if len(a) <= 10 or len(b) <= 10:
        return bool(a[:10] == b[:10])
    return when(a) == when(b)


def get(res: Res, path: str) -> Any:
    """Dotted path, with [n] list indexes: 'code.coding[0].code'."""
    cur: Any = res
    for part in path.split("."):
        idx = None
        if part.endswith("]"):
            part, _, n = part[:-1].partition("[")
            idx = int(n)
        cur = cur.get(part) if isinstance(cur, dict) else None
        if idx is not None:
            cur = cur[idx] if isinstance(cur, list) and len(cur) > idx else None
        if cur is None:
            return None
    return cur


def first_coding(res: Res, elem: str) -> dict[str, Any]:
    cc = res.get(elem)
    if isinstance(cc, list):
        cc = cc[-1] if elem == "category" else (cc[0] if cc else None)
    codings = cc.get("coding", []) if isinstance(cc, dict) else []
    return codings[0] if codings else {}


CODE_ELEM = {
    "Encounter": "type",
    "Immunization": "vaccineCode",
    "MedicationRequest": "medicationCodeableConcept",
    "Device": "type",
    "CarePlan": "category",
    "Claim": "type",
    "ExplanationOfBenefit": "type",
}
DATE_PATHS = {
    "Patient": ["birthDate", "deceasedDateTime"],
    "Encounter": ["period.start", "period.end"],
    "Condition": ["onsetDateTime", "abatementDateTime"],
    "AllergyIntolerance": ["recordedDate"],
    "Immunization": ["occurrenceDateTime"],
    "Procedure": ["performedPeriod.start", "performedPeriod.end"],
    "MedicationRequest": ["authoredOn"],
    "CarePlan": ["period.start", "period.end"],
    "Device": [],
    "ImagingStudy": ["started"],
    "Claim": ["billablePeriod.start"],
    "ExplanationOfBenefit": [],
    "Observation": ["effectiveDateTime"],
}
STATUS_PATHS = {
    "Condition": ["clinicalStatus.coding[0].code", "verificationStatus.coding[0].code"],
    "AllergyIntolerance": ["clinicalStatus.coding[0].code"],
}
SUBJECT = {
    "Immunization": "patient",
    "Device": "patient",
    "AllergyIntolerance": "patient",
    "Claim": "patient",
    "ExplanationOfBenefit": "patient",
}


def key_of(res: Res) -> tuple[str, str | None, str | None]:
    rt = res["resourceType"]
    coding = first_coding(res, CODE_ELEM.get(rt, "code"))
    return rt, coding.get("code"), ref_id(res.get("encounter"))


def first_date(res: Res) -> str | None:
    for p in DATE_PATHS.get(res["resourceType"], []):
        if (v := get(res, p)) is not None:
            return str(v)
    return None


def fields_of(res: Res) -> dict[str, Any]:
    """The compared fields of one resource (absent ones are left out)."""
    rt = res["resourceType"]
    out: dict[str, Any] = {}
    if rt == "Patient":
        for p in ("gender", "birthDate", "deceasedDateTime", "name[0].family", "name[0].given[0]"):
            out[p] = get(res, p)
        for p in ("city", "state", "postalCode"):
            out[f"address.{p}"] = get(res, f"address[0].{p}")
        for ident in res.get("identifier", []):
            if ident.get("system") in ("http://hl7.org/fhir/sid/us-ssn",):
                out["identifier.ssn"] = ident.get("value")
    elif rt not in ("Claim", "ExplanationOfBenefit"):
        elem = CODE_ELEM.get(rt, "code")
        coding = first_coding(res, elem)
        out[f"{elem}.code"] = coding.get("code")
        out[f"{elem}.system"] = coding.get("system")
    if rt == "Encounter":
        out["class.code"] = get(res, "class.code")
        out["serviceProvider"] = ref_id(res.get("serviceProvider"))
    if rt == "ImagingStudy":
        for p in ("series[0].uid", "series[0].modality.code", "series[0].bodySite.code"):
            out[p] = get(res, p)
        out["series[0].instance[0].uid"] = get(res, "series[0].instance[0].uid")
    if rt == "ExplanationOfBenefit":
        out["claim"] = ref_id(res.get("claim"))
    if rt != "Patient":
        out["status"] = res.get("status")
    for p in STATUS_PATHS.get(rt, []):
        out[p] = get(res, p)
    for p in DATE_PATHS.get(rt, []):
        out[p] = get(res, p)
    if rt != "Patient":
        subj = SUBJECT.get(rt, "subject")
        out[subj] = ref_id(res.get(subj))
        if rt not in ("Device", "Claim", "ExplanationOfBenefit"):
            out["encounter"] = ref_id(res.get("encounter"))
    return {k: v for k, v in out.items() if v is not None}


def agree(name: str, ours: Any, theirs: Any) -> bool:
    if ours is None or theirs is None:
        return False
    if any(name.endswith(s) for s in ("Date", "DateTime", "start", "end", "On", "started")):
        return same_time(str(ours), str(theirs))
    if isinstance(ours, float | int) and isinstance(theirs, float | int):
        return abs(float(ours) - float(theirs)) <= 1e-9 * max(1.0, abs(float(theirs)))
    return bool(ours == theirs)


# -- pairing --------------------------------------------------------------------------------


def pair(
    ours: list[Res], theirs: list[Res], lost: list[str] | None = None
) -> tuple[list[tuple[Res, Res]], int, int]:
    """Pair resources of one type: equal ids, then (code, encounter, date); unpaired counts."""
    by_id = {r["id"]: r for r in theirs}
    pairs: list[tuple[Res, Res]] = []
    left: list[Res] = []
    used: set[str] = set()
    for r in ours:
        t = by_id.get(r["id"])
        if t is None and r["resourceType"] == "ExplanationOfBenefit":
            claim = ref_id(r.get("claim"))
            t = next((x for x in theirs if ref_id(x.get("claim")) == claim), None)
        if t is not None and t["id"] not in used:
            pairs.append((r, t))
            used.add(t["id"])
        else:
            left.append(r)
    pool: dict[tuple[Any, ...], list[Res]] = defaultdict(list)
    for t in theirs:
        if t["id"] not in used:
            pool[key_of(t)].append(t)
    unpaired = 0
    for r in left:
        cands = pool.get(key_of(r), [])
        d = first_date(r)
        best = next((c for c in cands if same_time(d, first_date(c))), None)
        if best is None:
            unpaired += 1
            if lost is not None:
                lost.append(f"ours {r['resourceType']}/{r['id']} {key_of(r)} {d}")
            continue
        cands.remove(best)
        pairs.append((r, best))
    if lost is not None:
        lost.extend(
            f"theirs {t['resourceType']}/{t['id']} {key_of(t)} {first_date(t)}"
            for v in pool.values()
            for t in v
        )
    return pairs, unpaired, sum(len(v) for v in pool.values())


# -- observations ---------------------------------------------------------------------------


def obs_rows(res: Res) -> list[tuple[tuple[Any, ...], Any, str | None]]:
    """One Observation → (key, value, unit) per value it carries (itself + components)."""
    base = (ref_id(res.get("encounter")), when(res.get("effectiveDateTime")))
    out = []
    for part in [res, *res.get("component", [])]:
        code = first_coding(part, "code").get("code")
        if "valueQuantity" in part:
            q = part["valueQuantity"]
            out.append(((*base, code), q.get("value"), q.get("unit")))
        elif "valueCodeableConcept" in part:
            cc = part["valueCodeableConcept"]
            text = cc.get("text") or (cc.get("coding") or [{}])[0].get("display")
            out.append(((*base, code), text, None))
        elif "valueString" in part:
            out.append(((*base, code), part["valueString"], None))
    return out


def _decimals(value: Any) -> int:
    text = repr(value)
    return len(text.partition(".")[2]) if "." in text and "e" not in text else 0


def same_value(a: Any, b: Any) -> bool:
    """Numbers agree at the CSV's precision (Synthea's CSV exporter rounds values that its
    FHIR exporter does not: 16.3 in the CSV is 16.33 in the FHIR); texts agree ignoring
    case, commas and runs of spaces (its CSV exporter turns commas into spaces)."""
    if isinstance(b, int | float):
        try:
            fa, fb = float(a), float(b)
        except (TypeError, ValueError):
            return False
        if STRICT:
            return abs(fa - fb) <= 1e-9 * max(1.0, abs(fb))
        return abs(fa - fb) <= 0.5 * 10 ** -_decimals(a) + 1e-9 * max(1.0, abs(fb))

    def norm(x: Any) -> str:
        return " ".join(str(x).replace(",", " ").lower().split())

    return norm(a) == norm(b) if not STRICT else str(a) == str(b)


# -- the run --------------------------------------------------------------------------------


def load_theirs(fhir_dir: Path) -> dict[str, list[Res]]:
    """Their patient Bundles → resources per patient id."""
    out: dict[str, list[Res]] = {}
    for f in sorted(fhir_dir.glob("*.json")):
        bundle = json.loads(f.read_bytes())
        resources = [e["resource"] for e in bundle.get("entry", [])]
        meds = {r["id"]: r for r in resources if r["resourceType"] == "Medication"}
        for i, r in enumerate(resources):
            # a MedicationRequest may name its drug through a Medication resource: compare
            # the drug's code, as if it were inline (same meaning)
            target = ref_id(r.get("medicationReference"))
            if target in meds and "code" in meds[target]:
                resources[i] = {**r, "medicationCodeableConcept": meds[target]["code"]}
        patient = next((r for r in resources if r["resourceType"] == "Patient"), None)
        if patient is not None:
            out[patient["id"]] = resources
    return out


def run(csv_dir: Path, fhir_dir: Path, show_diffs: int = 0) -> dict[str, Any]:
    profile = csvsource.load_profile("synthea")
    ours_by_patient, errors, rows = csvsource.convert_dir([str(csv_dir)], profile)
    theirs_by_patient = load_theirs(fhir_dir)
    counts: dict[str, dict[str, list[int]]] = {}
    fields_total: Counter[str] = Counter()
    fields_agree: Counter[str] = Counter()
    unpaired = {"ours": 0, "theirs": 0}
    obs = {"csv_rows": 0, "fhir_values": 0, "matched": 0, "value_agree": 0, "unit_agree": 0}
    diffs: list[str] = []
    unpaired_list: list[str] = []
    csv_only: Counter[str] = Counter()
    for pid in sorted(set(ours_by_patient) | set(theirs_by_patient)):
        if pid == csvsource.SHARED:
            continue
        ours = ours_by_patient.get(pid, [])
        theirs = theirs_by_patient.get(pid, [])
        per: dict[str, list[int]] = {}
        for rt in TYPES:
            mine = [r for r in ours if r["resourceType"] == rt]
            their = [r for r in theirs if r["resourceType"] == rt]
            per[rt] = [len(mine), len(their)]
            lost: list[str] = []
            pairs, u_ours, u_theirs = pair(mine, their, lost)
            unpaired_list.extend(f"{pid} {x}" for x in lost)
            unpaired["ours"] += u_ours
            unpaired["theirs"] += u_theirs
            for a, b in pairs:
                fa, fb = fields_of(a), fields_of(b)
                for name in sorted(set(fa) | set(fb)):
                    label = f"{rt}.{name}"
                    fields_total[label] += 1
                    if agree(name, fa.get(name), fb.get(name)):
                        fields_agree[label] += 1
                    elif len(diffs) < show_diffs:
                        diffs.append(
                            f"{pid} {rt}/{a['id']} {name}: {fa.get(name)!r} vs {fb.get(name)!r}"
                        )
        counts[pid] = per
        # Observations: multiset match of values on (encounter, instant, code)
        mine_rows = [x for r in ours if r["resourceType"] == "Observation" for x in obs_rows(r)]
        their_rows = [x for r in theirs if r["resourceType"] == "Observation" for x in obs_rows(r)]
        obs["csv_rows"] += len(mine_rows)
        obs["fhir_values"] += len(their_rows)
        pool: dict[tuple[Any, ...], list[tuple[Any, str | None]]] = defaultdict(list)
        for k, v, u in their_rows:
            pool[k].append((v, u))
        for k, v, u in mine_rows:
            cands = pool.get(k)
            if not cands:
                csv_only[str(k[2])] += 1
                continue
            hit = next((c for c in cands if same_value(v, c[0])), cands[0])
            cands.remove(hit)
            obs["matched"] += 1
            for name, ok in (("value", same_value(v, hit[0])), ("unit", u == hit[1])):
                fields_total[f"Observation.{name}"] += 1
                if ok:
                    fields_agree[f"Observation.{name}"] += 1
                    obs[f"{name}_agree"] += 1
                elif len(diffs) < show_diffs:
                    diffs.append(f"{pid} Observation {k}: {name} {v!r}/{u!r} vs {hit!r}")
    total, agreed = sum(fields_total.values()), sum(fields_agree.values())
    return {
        "csv_dir": str(csv_dir),
        "fhir_dir": str(fhir_dir),
        "rows_read": rows,
        "bad_rows": [e.to_dict() for e in errors],
        "counts": counts,
        "counts_equal": all(a == b for per in counts.values() for a, b in per.values()),
        "unpaired": unpaired,
        "unpaired_resources": unpaired_list,
        "observations": {**obs, "csv_only_by_code": dict(csv_only.most_common())},
        "fields": {
            k: {"compared": fields_total[k], "agree": fields_agree[k]} for k in sorted(fields_total)
        },
        "fields_compared": total,
        "fields_agree": agreed,
        "score": round(100.0 * agreed / total, 2) if total else 0.0,
        "diffs": diffs,
    }


def print_report(result: dict[str, Any], out: Callable[[str], None] = print) -> None:
    out(f"{'patient':38} " + " ".join(f"{t[:8]:>8}" for t in TYPES))
    for pid, per in result["counts"].items():
        cells = []
        for t in TYPES:
            a, b = per[t]
            cells.append(f"{f'{a}/{b}':>8}" if a == b else f"{f'{a}/{b}!':>8}")
        out(f"{pid:38} " + " ".join(cells))
    out("(ours/theirs; ! = different)")
    o = result["observations"]
    out(
        f"Observations: {o['csv_rows']} CSV values vs {o['fhir_values']} FHIR values "
        f"(Observations flattened with their components); matched {o['matched']}, "
        f"value agrees {o['value_agree']}, unit agrees {o['unit_agree']}"
    )
    if o["csv_only_by_code"]:
        out(
            "  CSV values with no FHIR Observation (by code): "
            + ", ".join(f"{k} {v}" for k, v in o["csv_only_by_code"].items())
        )
    out(
        f"unpaired resources: ours {result['unpaired']['ours']}, "
        f"theirs {result['unpaired']['theirs']}"
    )
    for u in result["unpaired_resources"][:20]:
        out(f"  unpaired {u}")
    worst = sorted(
        ((k, v) for k, v in result["fields"].items() if v["agree"] < v["compared"]),
        key=lambda kv: kv[1]["agree"] - kv[1]["compared"],
    )
    for k, v in worst[:15]:
        out(f"  disagree {k}: {v['compared'] - v['agree']} of {v['compared']}")
    for d in result["diffs"]:
        out(f"  diff {d}")
    out(
        f"field agreement: {result['fields_agree']} / {result['fields_compared']} = "
        f"{result['score']} %  (counts equal: {result['counts_equal']}; "
        f"bad rows: {len(result['bad_rows'])})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv_dir", type=Path)
    ap.add_argument("fhir_dir", type=Path)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument(
        "--strict", action="store_true", help="no allowance for the CSV's rounding and commas"
    )
    ap.add_argument("--show-diffs", type=int, default=0, help="print the first N differences")
    args = ap.parse_args(argv)
    global STRICT
    STRICT = args.strict
    if not (args.csv_dir / "patients.csv").is_file():
        print(f"{args.csv_dir}: no patients.csv here; give Synthea's csv output folder")
        return 2
    if not any(args.fhir_dir.glob("*.json")):
        print(f"{args.fhir_dir}: no FHIR Bundles (*.json) here; give Synthea's fhir output folder")
        return 2
    result = run(args.csv_dir, args.fhir_dir, args.show_diffs)
    print_report(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
