"""Consent-checked snapshots on real Tansu and Redis, and Safe Harbor de-identification."""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from typer.testing import CliRunner

from fhirtwin import bus
from fhirtwin.cli import app
from fhirtwin.cli_subscribers import register
from fhirtwin.conversion import convert_hl7v2
from fhirtwin.hl7v2 import split_batch
from fhirtwin.snapshot import (
    AGE_OVER_89,
    AUDIT_TOPIC,
    SNAPSHOT_GROUP,
    SnapshotPublisher,
    safe_harbor,
)
from fhirtwin.snapshot import strip_dangling as strip
from fhirtwin.subscribers import Registry, Subscriber, make_subscriber, topic_for
from fhirtwin.twin import TwinStore
from tests.pipeline import (
    drain,
    ingest_examples,
    produce,
    records,
    two_patients_and_a_merge,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "hl7v2"
ACTREASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
SCOPES = "http://terminology.hl7.org/CodeSystem/consentscope"
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.9001.1"

register(app)


def _consent(cid: str, scope: str, provision: dict[str, Any], patient: dict[str, Any]) -> dict:
    return {
        "resourceType": "Consent",
        "id": cid,
        "status": "active",
        "scope": {"coding": [{"system": SCOPES, "code": scope}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": patient,
        "dateTime": "2026-01-01",
        "policyRule": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}
            ]
        },
        "provision": provision,
    }


CARE_CONSENT = _consent(
    "consent-care",
    "patient-privacy",
    {
        "type": "permit",
        "provision": [
            {
                "type": "deny",
                "actor": [
                    {
                        "role": {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                    "code": "IRCP",
                                }
                            ]
                        },
                        "reference": {
                            "identifier": {"system": "urn:oid:1.2.3.4", "value": "sim-care"}
                        },
                    }
                ],
                "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}],
            }
        ],
    },
    {"identifier": {"system": MRN_SYSTEM, "value": "MRN448812"}},
)


def _research_consent(patient_id: str, status: str = "active") -> dict[str, Any]:
    c = _consent(
        "consent-research",
        "research",
        {"type": "permit", "purpose": [{"system": ACTREASON, "code": "HRESCH"}]},
        {"reference": f"Patient/{patient_id}"},
    )
    c["status"] = status
    if status != "active":
        c["dateTime"] = "2026-06-01"
    return c


def _topic(bootstrap: str, sub: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(kind header, key, JSON) of every record on a subscriber's topic, in offset order."""
    recs = sorted(records(bootstrap, topic_for(sub)), key=lambda r: (r.partition, r.offset))
    return [
        (r.header("fhirtwin-kind"), (r.key or b"").decode(), orjson.loads(r.value)) for r in recs
    ]


def _new(
    before: list[tuple[str, str, dict[str, Any]]], after: list[tuple[str, str, dict[str, Any]]]
) -> list[tuple[str, str, dict[str, Any]]]:
    """The records of ``after`` that ``before`` did not have. Not ``after[len(before):]``:
    ``_topic`` orders by partition, so a new record of a lower partition sorts among the
    old ones (twin ids are random, so which partition a patient lands in varies by run)."""
    seen = {orjson.dumps(body) for _, _, body in before}
    return [r for r in after if orjson.dumps(r[2]) not in seen]


def _walk(value: Any, key: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield k, v
            yield from _walk(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v, key)
    else:
        yield key, value


def _references(bundle: dict[str, Any]) -> set[str]:
    return {v for k, v in _walk(bundle) if k == "reference" and isinstance(v, str)}


def _audits(bootstrap: str) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in records(bootstrap, AUDIT_TOPIC)]


def _detail(event: dict[str, Any], name: str) -> str | None:
    for d in event["entity"][0].get("detail", []):
        if d["type"] == name:
            return str(d["valueString"])
    return None


def _lagging(bootstrap: str) -> bool:
    return bus.group_lag(bootstrap, SNAPSHOT_GROUP, [bus.TWIN_EVENTS]) != 0


# -- Safe Harbor checks -----------------------------------------------------------------

_FULL_DATE = re.compile(r"\d{4}-\d{2}")
_URLISH = re.compile(r"^(https?|ftp|mailto|tel)://?", re.I)


def _phi_of(patient: dict[str, Any]) -> set[str]:
    """The identifying strings a Patient carries: names, identifiers, telecom, address."""
    out: set[str] = set()
    for n in patient.get("name", []):
        out.update(n.get("given", []))
        if n.get("family"):
            out.add(n["family"])
    out.update(i["value"] for i in patient.get("identifier", []) if i.get("value"))
    out.update(t["value"] for t in patient.get("telecom", []) if t.get("value"))
    for a in patient.get("address", []):
        out.update(a.get("line", []))
        if a.get("city"):
            out.add(a["city"])
        if a.get("postalCode"):
            out.add(a["postalCode"])
    if patient.get("birthDate"):
        out.add(patient["birthDate"])
    # (short digit strings such as ZIP codes also occur inside other numbers: postalCode
    # itself is checked field by field)
    return {s for s in out if len(s) > 2 and not (s.isdigit() and len(s) < 6)}


def assert_safe_harbor(resources: list[dict[str, Any]], phi: set[str], pseudonym: str) -> None:
    text = orjson.dumps(resources).decode()
    for s in phi:
        assert s not in text, f"{s!r} left in a de-identified snapshot"
    for res in resources:
        rtype = res["resourceType"]
        assert rtype not in ("Practitioner", "RelatedPerson", "PractitionerRole", "Device")
        for k, v in _walk(res):
            assert k not in ("telecom", "photo", "contact", "text", "note", "div"), (rtype, k)
            assert not k.endswith("String"), (rtype, k)
            if k == "identifier":
                assert rtype == "Patient" and v == [
                    {"system": "urn:fhirtwin:pseudonym", "value": pseudonym}
                ]
            if k == "name" and rtype not in ("Organization", "Location"):
                raise AssertionError(f"{rtype}.name kept")
            if k in ("line", "city", "district"):
                raise AssertionError(f"{rtype} address {k} kept")
            if isinstance(v, str):
                assert not _FULL_DATE.match(v), (rtype, k, v)
                if k not in ("system", "profile") and v != AGE_OVER_89:
                    assert not _URLISH.match(v), (rtype, k, v)
            if k == "postalCode":
                assert re.fullmatch(r"\d{3}", v)
            if k == "reference":
                assert v.startswith("#") or v.split("/")[0] in {
                    r["resourceType"] for r in resources
                }


def _deid(resources: list[dict[str, Any]], pseudonym: str) -> list[dict[str, Any]]:
    kept = strip(resources)
    ids: dict[str, str] = {}
    for r in kept:
        new = f"{r['resourceType']}/{uuid.uuid4()}"
        ids[f"{r['resourceType']}/{r['id']}"] = new
        ids[f"urn:uuid:{r['id']}"] = new
    return safe_harbor(kept, pseudonym=pseudonym, ids=ids, now=datetime.now(UTC))


def test_safe_harbor_on_the_examples() -> None:
    by_ref: dict[str, dict[str, Any]] = {}
    for p in sorted(EXAMPLES.glob("*.hl7")):
        for m in split_batch(p.read_bytes()):
            for e in convert_hl7v2(m).bundle["entry"]:
                r = e["resource"]
                by_ref.setdefault(f"{r['resourceType']}/{r['id']}", r)
    patients = [r for r in by_ref.values() if r["resourceType"] == "Patient"]
    phi = set().union(*(_phi_of(p) for p in patients)) | {"Lindqvist", "Larch"}
    # relatives and clinicians named in the messages
    for r in by_ref.values():
        if r["resourceType"] in ("RelatedPerson", "Practitioner"):
            for n in r.get("name", []):
                phi.update(s for s in [n.get("family", ""), *n.get("given", [])] if len(s) > 2)
    one = [r for r in by_ref.values() if r["resourceType"] != "Patient" or r is patients[0]]
    out = _deid(one, "p-123")
    assert_safe_harbor(out, phi, "p-123")
    patient = next(r for r in out if r["resourceType"] == "Patient")
    assert patient["birthDate"] == "1958" and patient["address"] == [
        {"state": "IL", "country": "USA", "use": "home", "postalCode": "627"}
    ]
    assert patient["gender"] == "female"
    obs = [r for r in out if r["resourceType"] == "Observation"]
    assert obs and all("valueQuantity" in o or "code" in o for o in obs)
    assert any(o.get("valueQuantity", {}).get("value") == 182 for o in obs)  # coded data kept


def test_safe_harbor_ages_and_small_zip3() -> None:
    patient = {
        "resourceType": "Patient",
        "id": "p",
        "birthDate": "1920-03-04",
        "address": [{"line": ["1 Main St"], "city": "Tiny", "state": "WY", "postalCode": "82301"}],
    }
    obs = {
        "resourceType": "Observation",
        "id": "o",
        "subject": {"reference": "Patient/p", "display": "Old Person"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "30525-0"}], "text": "Age"},
        "valueQuantity": {"value": 104, "unit": "a", "system": "http://unitsofmeasure.org"},
        "effectiveDateTime": "2026-11-03T09:00:00-05:00",
        "performer": [{"reference": "https://example.org/fhir/Practitioner/9"}],
    }
    out = _deid([patient, obs], "p-9")
    p, o = out
    assert "birthDate" not in p and p["extension"][0]["valueBoolean"] is True
    assert p["address"] == [{"state": "WY", "postalCode": "000"}]
    assert o["valueQuantity"]["value"] == 90 and o["valueQuantity"]["comparator"] == ">="
    assert o["effectiveDateTime"] == "2026" and "performer" not in o
    assert o["subject"] == {"reference": f"Patient/{p['id']}"} and "text" not in o["code"]


def test_safe_harbor_on_corpus_patients(corpus: Path) -> None:
    bundles = sorted((corpus / "synthea-csv-fhir-10pt" / "output" / "fhir").glob("*_*_*.json"))
    assert bundles
    for path in bundles:
        doc = orjson.loads(path.read_bytes())
        resources = [e["resource"] for e in doc["entry"]]
        patient = next(r for r in resources if r["resourceType"] == "Patient")
        phi = _phi_of(patient)
        assert_safe_harbor(_deid(resources, "ps"), phi, "ps")
    bulk = corpus / "smart-sample-bulk-fhir-10-patients"
    everything: list[dict[str, Any]] = []
    for f in sorted(bulk.glob("*.ndjson")):
        if f.name != "log.ndjson":
            everything += [orjson.loads(line) for line in f.read_bytes().splitlines() if line]
    patients = [r for r in everything if r["resourceType"] == "Patient"]
    assert len(patients) >= 10
    dumped = [(r, orjson.dumps(r).decode()) for r in everything if r["resourceType"] != "Patient"]
    for patient in patients:
        ref = f"Patient/{patient['id']}"
        mine = [patient] + [r for r, text in dumped if ref in text]
        assert_safe_harbor(_deid(mine, "pb"), _phi_of(patient), "pb")


# -- registry ------------------------------------------------------------------------------


def test_registry_rules() -> None:
    research = make_subscriber(
        "r1", actor=["urn:oid:9|lab"], purpose=["HRESCH"], scope="research", default=None
    )
    assert research.deidentify == "safe-harbor" and research.default == "deny"
    with pytest.raises(ValueError, match="research"):
        make_subscriber(
            "r2", actor=["urn:oid:9|lab"], purpose=["HRESCH"], scope="research", default="permit"
        )
    with pytest.raises(ValueError, match="break-glass"):
        make_subscriber("b", actor=["urn:oid:9|x"], purpose=["BTG"], scope="patient-privacy")
    with pytest.raises(ValueError, match="research purpose"):
        make_subscriber("c", actor=["urn:oid:9|x"], purpose=["HRESCH"], scope="patient-privacy")
    with pytest.raises(ValueError, match="system\\|value"):
        make_subscriber("c", actor=["sim-care"], purpose=["TREAT"], scope="patient-privacy")
    with pytest.raises(ValueError, match="ActReason"):
        make_subscriber("c", actor=["a|b"], purpose=["NOPE"], scope="patient-privacy")


# -- end to end ------------------------------------------------------------------------------


def _add_care(runner: CliRunner, common: list[str]) -> None:
    """Subscriber "care": TREAT, patient-privacy, permit by default (the CLI)."""
    care = runner.invoke(
        app,
        [
            "subscriber",
            "add",
            "care",
            "--actor",
            "urn:oid:1.2.3.4|sim-care",
            "--purpose",
            "TREAT",
            "--scope",
            "patient-privacy",
            "--default",
            "permit",
            *common,
        ],
    )
    assert care.exit_code == 0, care.output


def test_snapshots_follow_consent_and_withdrawal(
    kafka: str, redis_url: str, tmp_path: Path
) -> None:
    runner = CliRunner()
    common = ["--kafka", kafka, "--redis", redis_url]
    ex = ingest_examples(kafka, redis_url)
    store, twin, other, patient_id = ex.store, ex.twin_a, ex.twin_b, ex.a

    # subscribers: care (TREAT, default permit) and research (HRESCH); BTG is refused
    _add_care(runner, common)
    res = runner.invoke(
        app,
        [
            "subscriber",
            "add",
            "research",
            "--actor",
            "urn:oid:1.2.3.9|sim-research",
            "--purpose",
            "HRESCH",
            "--scope",
            "research",
            *common,
        ],
    )
    assert res.exit_code == 0, res.output
    btg = runner.invoke(
        app,
        [
            "subscriber",
            "add",
            "glass",
            "--actor",
            "urn:oid:1.2.3.5|g",
            "--purpose",
            "BTG",
            "--scope",
            "patient-privacy",
            *common,
        ],
    )
    assert btg.exit_code == 2 and "break-glass" in btg.output
    # one stored around the CLI (an older registry, a hand edit): the engine still refuses
    Registry.connect(redis_url).put(
        Subscriber(
            "glass",
            ("urn:oid:1.2.3.5|g",),
            ("BTG",),
            "patient-privacy",
            default="permit",
            topic=topic_for("glass"),
        )
    )
    listed = runner.invoke(app, ["subscriber", "list", "--json", *common])
    assert [s["id"] for s in orjson.loads(listed.stdout)] == ["care", "glass", "research"]
    assert orjson.loads(listed.stdout)[2]["deidentify"] == "safe-harbor"

    # consents: deny Observations to the care organisation; permit research
    files = []
    for name, doc in [("care", CARE_CONSENT), ("research", _research_consent(patient_id))]:
        f = tmp_path / f"{name}.json"
        f.write_bytes(orjson.dumps(doc))
        files.append(f)
        put = runner.invoke(app, ["consent", "put", str(f), *common])
        assert put.exit_code == 0, put.output
        assert orjson.loads(put.stdout)["twin"] == twin
    nobody = tmp_path / "nobody.json"
    nobody.write_bytes(orjson.dumps({**CARE_CONSENT, "patient": {"reference": "Patient/nope"}}))
    missing = runner.invoke(app, ["consent", "put", str(nobody), *common])
    assert missing.exit_code == 1 and "no twin holds Patient/nope" in missing.output
    drain(kafka, redis_url)
    assert {r["id"] for r in store.resources(twin) if r["resourceType"] == "Consent"} == {
        "consent-care",
        "consent-research",
    }

    stop = threading.Event()
    publisher = SnapshotPublisher(kafka, redis_url)
    thread = threading.Thread(target=publisher.run, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: not _lagging(kafka), what="the snapshot publisher")
        phase1 = {s: _topic(kafka, s) for s in ("care", "research", "glass")}
        pseudonym = Registry.connect(redis_url).pseudonym("research", twin)

        # care: everything but Observations, for both patients; no trace of them
        care_last = {key: body for kind, key, body in phase1["care"] if kind == "snapshot"}
        assert set(care_last) == {twin, other}
        mine = care_last[twin]
        types = {e["resource"]["resourceType"] for e in mine["entry"]}
        assert "Observation" not in types
        assert {"Patient", "Encounter", "Condition", "DiagnosticReport", "Parameters"} <= types
        assert not types & {"Consent", "MessageHeader", "Provenance", "Device"}
        assert not any(r.startswith("Observation/") for r in _references(mine))
        assert "total" not in mine
        state = next(
            e["resource"] for e in mine["entry"] if e["resource"]["resourceType"] == "Parameters"
        )
        assert "labs" not in {p["name"] for p in state["parameter"]}  # labs are Observations
        held = {e["fullUrl"] for e in mine["entry"]}
        assert _references(mine) <= held | {r for r in _references(mine) if r.startswith("#")}
        # the other patient has no consent: NOT_APPLICABLE, which care's default permits
        assert {"Patient", "Encounter"} <= {
            e["resource"]["resourceType"] for e in care_last[other]["entry"]
        }

        # research: only the consenting patient, keyed by pseudonym, de-identified
        assert {key for _, key, _ in phase1["research"]} == {pseudonym}
        assert all(kind == "snapshot" for kind, _, _ in phase1["research"])
        rbundle = phase1["research"][-1][2]
        rtypes = {e["resource"]["resourceType"] for e in rbundle["entry"]}
        assert "Observation" in rtypes and "Patient" in rtypes
        assert not rtypes & {"Practitioner", "RelatedPerson", "Consent"}
        source = store.resources(twin)
        phi = _phi_of(next(r for r in source if r["resourceType"] == "Patient")) | {
            twin,
            patient_id,
        }
        assert_safe_harbor(
            [
                e["resource"]
                for e in rbundle["entry"]
                if e["resource"]["resourceType"] != "Parameters"
            ],
            phi,
            pseudonym,
        )
        assert twin not in orjson.dumps(rbundle).decode()
        assert phase1["glass"] == []

        # withdrawal of the research consent, and new data for the patient
        withdrawn = tmp_path / "withdrawn.json"
        withdrawn.write_bytes(orjson.dumps(_research_consent(patient_id, "inactive")))
        put = runner.invoke(app, ["consent", "put", str(withdrawn), *common])
        assert put.exit_code == 0, put.output
        oru = (EXAMPLES / "oru-r01-cmp.hl7").read_bytes()
        produce(
            kafka,
            bus.RAW_TOPICS["hl7v2"],
            [oru.replace(b"|182|", b"|190|").replace(b"LAB7731|P", b"LAB7799|P")],
        )
        drain(kafka, redis_url)
        wait_for(lambda: not _lagging(kafka), what="the snapshot publisher")
        phase2 = {s: _topic(kafka, s) for s in ("care", "research", "glass")}
    finally:
        stop.set()
        thread.join(30)

    new_research = _new(phase1["research"], phase2["research"])
    assert new_research, "no withdrawal notice"
    assert [kind for kind, _, _ in new_research] == ["withdrawal"]
    notice = new_research[0][2]
    assert notice["patient"] == pseudonym and notice["type"] == "withdrawal"
    assert new_research[0][1] == pseudonym
    new_care = [b for kind, key, b in _new(phase1["care"], phase2["care"]) if key == twin]
    assert new_care, "care got no snapshot after the new result"
    assert "Observation" not in {e["resource"]["resourceType"] for e in new_care[-1]["entry"]}
    assert phase2["glass"] == []

    # the audit log: every decision, before and after, and every disclosure
    audits = _audits(kafka)
    assert all(a["resourceType"] == "AuditEvent" for a in audits)
    authz = [a for a in audits if a["type"]["code"] == "110113"]
    disclosures = [a for a in audits if a["type"]["code"] == "110106"]
    assert all(a["subtype"][0]["code"] == "AuthZ-Consent" for a in authz)
    assert all(a["subtype"][0]["code"] == "disclose" for a in disclosures)
    for sub in ("care", "research"):
        sent = {b["id"] for kind, _, b in phase2[sub] if kind == "snapshot"}
        logged = {
            e["what"]["reference"].split("/", 1)[1]
            for a in disclosures
            if _detail(a, "subscriber") == sub
            for e in a["entity"]
            if e["what"].get("reference", "").startswith("Bundle/")
        }
        assert sent == logged

    def request_level(sub: str, t: str) -> list[dict[str, Any]]:
        return [
            a
            for a in authz
            if _detail(a, "subscriber") == sub
            and _detail(a, "level") == "request"
            and a["entity"][0]["what"]["identifier"]["value"] == t
        ]

    research_decisions = [_detail(a, "decision") for a in request_level("research", twin)]
    assert "PERMIT" in research_decisions and research_decisions[-1] == "NOT_APPLICABLE"
    # the decision that ended access names the notice sent; later ones send none
    noticed = [a for a in request_level("research", twin) if _detail(a, "withdrawal-notice")]
    assert len(noticed) == 1
    last = noticed[0]
    assert _detail(last, "withdrawal-notice") == notice["id"] and last["outcome"] == "8"
    assert _detail(last, "decision") == "NOT_APPLICABLE"
    consent_rows = {e["what"]["reference"]: e for e in last["entity"][1:]}
    row = next(e for ref, e in consent_rows.items() if ref.startswith("Consent/consent-research"))
    assert {"type": "result", "valueString": "NOT_APPLICABLE"} in row["detail"]
    first_permit = next(
        a for a in request_level("research", twin) if _detail(a, "decision") == "PERMIT"
    )
    assert any(
        e["what"]["reference"].startswith("Consent/consent-research")
        and {"type": "provision", "valueString": "provision"} in e["detail"]
        for e in first_permit["entity"][1:]
    )
    # NOT_APPLICABLE decisions are audited too (the other patient has no research consent)
    assert {_detail(a, "decision") for a in request_level("research", other)} == {"NOT_APPLICABLE"}
    # the care subscriber's per-resource denials name the provision that denied
    denied = [
        a
        for a in authz
        if _detail(a, "subscriber") == "care"
        and _detail(a, "level") == "resource"
        and _detail(a, "decision") == "DENY"
    ]
    assert denied
    refs = {
        e["what"]["reference"] for a in denied for e in a["entity"] if e["what"].get("reference")
    }
    assert any(r.startswith("Observation/") for r in refs)
    assert any(
        {"type": "provision", "valueString": "provision.provision[0]"} in e.get("detail", [])
        for a in denied
        for e in a["entity"]
    )
    # break-glass: refused by the engine, audited, nothing sent
    glass = request_level("glass", twin)
    assert glass and all("break-glass" in a["outcomeDesc"] for a in glass)
    assert all(a["outcome"] == "8" for a in glass)

    removed = runner.invoke(app, ["subscriber", "remove", "glass", *common])
    assert removed.exit_code == 0, removed.output
    again = runner.invoke(app, ["subscriber", "remove", "glass", *common])
    assert again.exit_code == 1
    listed = runner.invoke(app, ["subscriber", "list", "--json", *common])
    assert [s["id"] for s in orjson.loads(listed.stdout)] == ["care", "research"]


def test_a_merge_and_its_undoing_reach_the_subscribers(kafka: str, redis_url: str) -> None:
    """A subscriber holding two patients' snapshots: the merge withdraws the merged one and
    re-sends the survivor with both patients' data; the unmerge sends both apart again."""
    runner = CliRunner()
    common = ["--kafka", kafka, "--redis", redis_url]
    _add_care(runner, common)
    a01, other, a40 = two_patients_and_a_merge()
    store = TwinStore(redis.Redis.from_url(redis_url))

    def patients_in(bundle: dict[str, Any]) -> list[str]:
        """The MRNs of the bundle's Patients."""
        return sorted(
            i["value"]
            for e in bundle["entry"]
            if e["resource"]["resourceType"] == "Patient"
            for i in e["resource"].get("identifier", [])
            if i["value"].startswith("MRN")
        )

    def sent_since(
        seen: list[tuple[str, str, dict[str, Any]]], kind: str, key: str
    ) -> list[dict[str, Any]]:
        return [b for k, kk, b in _new(seen, _topic(kafka, "care")) if k == kind and kk == key]

    stop = threading.Event()
    publisher = SnapshotPublisher(kafka, redis_url)
    thread = threading.Thread(target=publisher.run, args=(stop,))
    thread.start()
    try:
        produce(kafka, bus.RAW_TOPICS["hl7v2"], [a01, other])
        drain(kafka, redis_url)
        keep, gone = store.resolve("MRN448812"), store.resolve("MRN999001")
        assert keep and gone and keep != gone
        wait_for(lambda: len(_topic(kafka, "care")) >= 2, what="the first snapshots")
        wait_for(lambda: not _lagging(kafka), what="the snapshot publisher")
        seen = _topic(kafka, "care")

        produce(kafka, bus.RAW_TOPICS["hl7v2"], [a40])
        drain(kafka, redis_url)
        wait_for(lambda: not _lagging(kafka), what="the snapshot publisher")
        wait_for(
            lambda: sent_since(seen, "snapshot", keep) and sent_since(seen, "withdrawal", gone),
            what="the survivor's snapshot and the merged twin's withdrawal",
        )
        notices = sent_since(seen, "withdrawal", gone)
        assert [body["reason"] for body in notices] == ["merged"]
        assert sent_since(seen, "withdrawal", keep) == []
        merged_snap = sent_since(seen, "snapshot", keep)
        assert patients_in(merged_snap[-1]) == ["MRN448812", "MRN999001"]
        seen = _topic(kafka, "care")

        asked = runner.invoke(
            app, ["twin", "unmerge", gone, "--reason", "two people", "--wait", "0", *common]
        )
        assert asked.exit_code == 0, asked.output
        drain(kafka, redis_url)
        wait_for(lambda: not _lagging(kafka), what="the snapshot publisher")
        wait_for(
            lambda: sent_since(seen, "snapshot", keep) and sent_since(seen, "snapshot", gone),
            what="both twins' snapshots",
        )
        assert patients_in(sent_since(seen, "snapshot", keep)[-1]) == ["MRN448812"]
        assert patients_in(sent_since(seen, "snapshot", gone)[-1]) == ["MRN999001"]
    finally:
        stop.set()
        thread.join(30)
