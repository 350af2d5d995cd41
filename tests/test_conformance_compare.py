"""Tests of bench/_compare.py (by-meaning Bundle comparison) on small hand-made bundles."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from tests.bench_module import load_bench

C = load_bench("_compare")
EX = C.EXAMPLE_PREFIX


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    """A batch Bundle holding the given resources."""
    return {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{r.get('id', n)}",
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r.get('id', n)}"},
            }
            for n, r in enumerate(resources)
        ],
    }


def patient() -> dict[str, Any]:
    """A Patient with identifiers, name, address, telecom and race."""
    return {
        "resourceType": "Patient",
        "id": "p1",
        "identifier": [
            {
                "value": "MRN1",
                "system": "urn:oid:1.2.3",
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}
                    ]
                },
            },
            {"value": "123-45-6789", "system": "http://hl7.org/fhir/sid/us-ssn"},
        ],
        "name": [{"family": "Everyman", "given": ["Adam", "A"], "use": "official"}],
        "birthDate": "1988-08-18",
        "gender": "male",
        "address": [
            {
                "line": ["1000 Hospital Lane"],
                "city": "Ann Arbor ",
                "state": "MI",
                "postalCode": "99999",
                "country": "USA",
            }
        ],
        "telecom": [{"system": "phone", "value": "555-1234", "use": "home"}],
        "extension": [
            {
                "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
                "extension": [
                    {
                        "url": "ombCategory",
                        "valueCoding": {
                            "system": "urn:oid:2.16.840.1.113883.6.238",
                            "code": "2106-3",
                        },
                    }
                ],
            }
        ],
        "meta": {"lastUpdated": "2020-01-01T00:00:00Z"},
        "text": {"status": "generated", "div": "<div/>"},
    }


def observation(oid: str, code: str, value: float, unit: str) -> dict[str, Any]:
    """A lab Observation."""
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "valueQuantity": {"value": value, "unit": unit},
        "effectiveDateTime": "2011-01-04T04:04:28+05:30",
        "referenceRange": [{"text": "4.3 to 6.2"}],
        "subject": {"reference": "Patient/p1"},
    }


def expected_bundle() -> dict[str, Any]:
    """Patient + two Observations + artefacts."""
    return bundle(
        patient(),
        observation("o1", "26453-1", 4.41, "10*6/uL"),
        observation("o2", "718-7", 12.5, "g/mL"),
        {"resourceType": "Location", "id": "l1", "name": "Ward 1"},
        {"resourceType": "Provenance", "id": "pv1"},
    )


def test_identical_bundles_score_100() -> None:
    """Comparing a bundle with itself agrees on every compared field."""
    exp = expected_bundle()
    res = C.compare_bundles(exp, copy.deepcopy(exp))
    assert res.compared > 0
    assert res.agreed == res.compared
    assert res.score == 100.0
    assert res.extra == 0


def test_changed_birthdate_loses_exactly_that_field() -> None:
    """Only Patient.birthDate disagrees when it is changed."""
    exp = expected_bundle()
    act = copy.deepcopy(exp)
    act["entry"][0]["resource"]["birthDate"] = "1988-08-19"
    base = C.compare_bundles(exp, exp)
    res = C.compare_bundles(exp, act)
    assert res.compared == base.compared
    assert res.agreed == base.agreed - 1
    assert [o.path for o in res.disagreements()] == ["Patient.birthDate"]


def test_missing_observation_loses_count_and_its_fields() -> None:
    """A missing Observation costs the count field plus each of its fields."""
    exp = expected_bundle()
    act = copy.deepcopy(exp)
    del act["entry"][2]
    res = C.compare_bundles(exp, act)
    paths = sorted(o.path for o in res.disagreements())
    assert "count:Observation" in paths
    obs_fields = [p for p in paths if p.startswith("Observation.")]
    # code, valueQuantity.value, valueQuantity.unit, effectiveDateTime, referenceRange.text,
    # status
    assert len(obs_fields) == 6
    assert len(paths) == 7
    assert res.compared == C.compare_bundles(exp, exp).compared


def test_extra_resources_are_not_penalised() -> None:
    """Additional resources and fields in actual only show up as extra."""
    exp = expected_bundle()
    act = copy.deepcopy(exp)
    act["entry"].append({"resource": observation("o3", "777-3", 250, "10*3/uL")})
    act["entry"].append({"resource": {"resourceType": "Organization", "id": "x"}})
    act["entry"][0]["resource"]["maritalStatus"] = {"coding": [{"code": "M"}]}
    res = C.compare_bundles(exp, act)
    disagreements = [o.path for o in res.disagreements()]
    assert disagreements == ["count:Observation"]  # counts differ: 2 expected vs 3 actual
    assert res.extra > 0
    assert res.extra_resources["Observation"] == 1
    act["entry"].pop(-2)  # drop the added Observation: no more disagreement
    assert C.compare_bundles(exp, act).score == 100.0


def test_ids_references_and_ordering_do_not_matter() -> None:
    """Reordering entries and list elements and renaming ids keeps the score at 100%."""
    exp = expected_bundle()
    act = copy.deepcopy(exp)
    act["entry"].reverse()
    for n, entry in enumerate(act["entry"]):
        entry["fullUrl"] = f"urn:uuid:new-{n}"
        entry.pop("request")
        entry["resource"]["id"] = f"new-{n}"
        if "subject" in entry["resource"]:
            entry["resource"]["subject"] = {"reference": "urn:uuid:new-4"}
    pat = next(e["resource"] for e in act["entry"] if e["resource"]["resourceType"] == "Patient")
    pat["identifier"].reverse()
    pat["name"][0]["given"].reverse()
    pat.pop("meta")
    pat.pop("text")
    res = C.compare_bundles(exp, act)
    assert res.score == 100.0


def test_observations_paired_by_meaning_not_position() -> None:
    """Swapped Observations pair up by code/value, so nothing disagrees."""
    exp = bundle(observation("o1", "A", 1, "u"), observation("o2", "B", 2, "u"))
    act = bundle(observation("x", "B", 2, "u"), observation("y", "A", 1, "u"))
    assert C.compare_bundles(exp, act).score == 100.0


def test_group_elements_compared_component_by_component() -> None:
    """A changed city loses only address.city; an unmatched telecom loses its components."""
    act_pat = patient()
    act_pat["address"][0]["city"] = "Detroit"
    act_pat["telecom"] = []
    res = C.compare_bundles(bundle(patient()), bundle(act_pat))
    assert sorted(o.path for o in res.disagreements()) == [
        "Patient.address.city",
        "Patient.telecom.system",
        "Patient.telecom.use",
        "Patient.telecom.value",
    ]


def test_deliberate_identifier_system_is_excluded_not_agreed() -> None:
    """An invented identifier system is reported as excluded; value and type still count."""
    exp_pat = patient()
    exp_pat["identifier"][0]["system"] = EX + "Identifier/test"
    act_pat = patient()
    act_pat["identifier"][0]["system"] = "urn:oid:9.9.9"
    res = C.compare_bundles(bundle(exp_pat), bundle(act_pat))
    excluded = [o for o in res.outcomes if o.status == "excluded"]
    assert [(o.path, o.rule) for o in excluded] == [("Patient.identifier.system", "D1")]
    assert res.score == 100.0
    with_system = C.compare_bundles(bundle(patient()), bundle(patient()))
    assert res.compared == with_system.compared - 1
    assert res.agreed == with_system.agreed - 1


def test_deliberate_coding_system_matches_code_only() -> None:
    """An invented coding system is excluded; the code must still be equal."""
    exp = observation("o1", "1554-5", 182, "mg/dl")
    exp["code"]["coding"][0]["system"] = EX + "CodeSystem/POST-12H"
    same_code = observation("o1", "1554-5", 182, "mg/dl")
    other_code = observation("o1", "9999-9", 182, "mg/dl")
    good = C.compare_bundles(bundle(exp), bundle(same_code))
    bad = C.compare_bundles(bundle(exp), bundle(other_code))
    assert good.excluded_by_rule() == {"D2": 1}
    assert good.score == 100.0
    assert "Observation.code" in [o.path for o in bad.disagreements()]


def test_deliberate_value_and_whole_resource_rules() -> None:
    """ServiceRequest intent filler-order and PDA Observations are excluded, never agreed."""
    sr = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "filler-order",
        "code": {"coding": [{"system": "http://loinc.org", "code": "15545"}]},
    }
    pda = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": EX + "CodeSystem/observation-code", "code": "autopsy"}]},
        "valueCodeableConcept": {"coding": [{"code": "Y"}]},
    }
    exp = bundle(sr, pda)
    act = bundle(dict(sr, intent="order"))
    res = C.compare_bundles(exp, act)
    assert res.score == 100.0
    rules = res.excluded_by_rule()
    assert rules["D3"] == 1
    assert rules["D4"] == 3  # status, code, valueCodeableConcept of the whole Observation
    assert "count:Observation" not in [o.path for o in res.outcomes]


def test_failed_conversion_counts_every_expected_field_as_disagreeing() -> None:
    """An empty actual bundle agrees on nothing but compares as many fields."""
    exp = expected_bundle()
    res = C.compare_bundles(exp, {"resourceType": "Bundle", "entry": []})
    assert res.agreed == 0
    assert res.compared == C.compare_bundles(exp, exp).compared


def test_medication_reference_resolved_within_bundle() -> None:
    """medicationReference -> Medication.code equals an inline medicationCodeableConcept."""
    code = {"coding": [{"system": "http://hl7.org/fhir/sid/ndc", "code": "0182-1061-05"}]}
    exp = bundle(
        {"resourceType": "Medication", "id": "m1", "code": code},
        {
            "resourceType": "MedicationRequest",
            "id": "r1",
            "status": "active",
            "intent": "order",
            "medicationReference": {"reference": "Medication/m1"},
        },
    )
    act = bundle(
        {"resourceType": "Medication", "id": "zz", "code": code},
        {
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": code,
        },
    )
    assert C.compare_bundles(exp, act).score == 100.0


@pytest.mark.parametrize(
    ("expected", "actual", "agree"),
    [
        ("1988-08-18T14:41:00+05:30", "1988-08-18T11:26:00+02:15", True),
        ("2022-01-01T12:30:09Z", "2022-01-01T12:30:09+00:00", True),
        ("2022-01-01T12:30:09Z", "2022-01-01T12:30:10Z", False),
        ("2019-11-22", "2019-11-22T10:00:00+01:00", True),
        ("2019-11-22T10:00:00+01:00", "2019-11-22", False),
        ("2019-11", "2019-11-22", True),
        ("2019-11-22", "2019-11", False),
        ("2019-03-11T10:16:11", "2019-03-11T10:16:11Z", False),
        ("2019-03-11T10:16:11.500+00:00", "2019-03-11T10:16:11.5Z", True),
    ],
)
def test_datetime_normalisation(expected: str, actual: str, agree: bool) -> None:
    """Instants compare in UTC; a date-only expected value accepts a more precise actual."""
    e, a = C.When.parse(expected), C.When.parse(actual)
    assert e is not None and a is not None
    assert C.when_matches(e, a) is agree


def test_numbers_compare_numerically_and_systems_ignore_trailing_slash() -> None:
    """150 equals 150.0 and 'http://loinc.org/' equals 'http://loinc.org'."""
    exp = observation("o1", "X", 150, "lb")
    act = observation("o1", "X", 150.0, "lb")
    act["code"]["coding"][0]["system"] = "http://loinc.org/"
    assert C.compare_bundles(bundle(exp), bundle(act)).score == 100.0


def test_script_reads_pairs_and_skips_non_json(tmp_path: Path) -> None:
    """The script scores .json pairs, skips XML ones with a message, and honours --min-score."""
    conformance = load_bench("conformance")
    (tmp_path / "m.hl7").write_bytes(b"MSH|^~\\&|A\r")
    (tmp_path / "e.json").write_text(
        '{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient",'
        '"gender":"male"}}]}',
        encoding="utf-8",
    )
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "kind,input,expected_output,produced_by,root_template_or_label\n"
        "hl7v2,m.hl7,e.json,x,ADT_A01\n"
        "hl7v2,m.hl7,e.xml,x,MDM_T02\n"
        "ccda,m.hl7,e.json,x,CCD\n",
        encoding="utf-8",
    )
    out = tmp_path / "out.json"
    args = [
        "--pairs",
        str(pairs),
        "--root",
        str(tmp_path),
        "--json",
        str(out),
        "--against-expected",
        "--kind",
        "hl7v2",
        "--min-score",
        "100",
    ]
    assert conformance.main(args) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["overall"]["pairs_total"] == 1
    assert data["overall"]["score"] == 100.0
    assert len(data["skipped"]) == 1 and "e.xml" in data["skipped"][0]


_MSG_OTHER_PARTY = (
    b"MSH|^~\\&|A|F|||20260101120000+0000||ADT^A01|X1|P|2.8\r"
    b"PID|1||P1||EVERYMAN^ADAM^A||19800101|M|||||||||||||MOM1\r"
    b"NK1|1|Child^Kid|EMC^Emergency^ACR|||||||||K1\r"
    b"IN2|1||||||Jack^ADAM\r"
)


def test_d33_name_of_another_party_and_d36_d38_merged_mother() -> None:
    rp = {
        "resourceType": "RelatedPerson",
        "identifier": [{"value": "MOM1"}, {"value": "K1"}],
        "name": [{"family": "Child", "given": ["Kid"]}],
        "relationship": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0131", "code": "C"}]},
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "MTH"}
                ]
            },
        ],
    }
    pat = {
        "resourceType": "Patient",
        "name": [{"family": "EVERYMAN", "given": ["ADAM"]}, {"family": "Jack", "given": ["ADAM"]}],
    }
    exp = bundle(pat, rp)
    our_pat = {"resourceType": "Patient", "name": [{"family": "EVERYMAN", "given": ["ADAM"]}]}
    mother = {"resourceType": "RelatedPerson", "identifier": [{"value": "MOM1"}]}
    child = {"resourceType": "RelatedPerson", "identifier": [{"value": "K1"}]}
    # Two RelatedPersons where the oracle merged them into one: D37 excuses that count
    act = bundle(our_pat, mother, child)
    res = C.compare_bundles(exp, act, source=_MSG_OTHER_PARTY, kind="hl7v2")
    by_rule = res.excluded_by_rule()
    assert by_rule["D33"] == 2  # Jack, ADAM: IN2-7, not the patient's own name
    assert by_rule["D36"] == 1 and by_rule["D38"] == 1 and by_rule["D37"] == 1
    # ... but only a count short by exactly the merged person (short_by): none, or
    # three, is compared as usual
    for people in ((), (mother, child, {"resourceType": "RelatedPerson"})):
        res = C.compare_bundles(exp, bundle(our_pat, *people), source=_MSG_OTHER_PARTY)
        assert "D37" not in res.excluded_by_rule()
        (count,) = [o for o in res.outcomes if o.path == "count:RelatedPerson"]
        assert count.status == "disagree"
    # EVERYMAN is the patient's own name: still compared (and agreeing)
    assert not any(o.expected == "EVERYMAN" and o.status != "agree" for o in res.outcomes)


def _seg(name: str, fields: dict[int, str]) -> bytes:
    """One HL7 v2 segment with the given fields (1-based) valued, the others empty."""
    top = max(fields)
    return ("|".join([name] + [fields.get(n, "") for n in range(1, top + 1)]) + "\r").encode()


_MSH = b"MSH|^~\\&|A|F|||20260101120000+0000||ADT^A01|X1|P|2.8\r"


def _excluded(exp: dict[str, Any], act: dict[str, Any], msg: bytes) -> dict[str, int]:
    return C.compare_bundles(exp, act, source=msg, kind="hl7v2").excluded_by_rule()


def test_d41_language_code_in_upper_case_only_when_sent_so() -> None:
    msg = _MSH + _seg("PID", {3: "P1", 5: "DOE^JANE", 15: "EN^ENGLISH^HL70296"})

    def pat(code: str, system: str) -> dict[str, Any]:
        concept = {"coding": [{"system": system, "code": code}]}
        return {"resourceType": "Patient", "communication": [{"language": concept}]}

    ours = bundle(pat("en", "urn:ietf:bcp:47"))
    assert _excluded(bundle(pat("EN", EX + "CodeSystem/HL70296")), ours, msg)["D41"] == 1
    # the IG's own BCP-47 coding, or another code than PID-15's, is compared
    assert "D41" not in _excluded(bundle(pat("EN", "urn:ietf:bcp:47")), ours, msg)
    assert "D41" not in _excluded(bundle(pat("FR", EX + "CodeSystem/HL70296")), ours, msg)


def test_d42_d43_local_race_and_ethnicity_codes_in_omb_category() -> None:
    msg = _MSH + _seg("PID", {3: "P1", 10: "U", 22: "A^White - British"})

    def pat(url: str, coding: dict[str, Any]) -> dict[str, Any]:
        sub = [{"url": "ombCategory", "valueCoding": coding}]
        return {"resourceType": "Patient", "extension": [{"url": url, "extension": sub}]}

    core = "http://hl7.org/fhir/us/core/StructureDefinition/"
    ours = bundle({"resourceType": "Patient"})
    got = _excluded(bundle(pat(core + "us-core-race", {"code": "U"})), ours, msg)
    assert got["D42"] == 1
    got = _excluded(bundle(pat(core + "us-core-ethnicity", {"code": "A"})), ours, msg)
    assert got["D43"] == 1
    # an OMB category (even without a system), or a code PID-10 does not hold, is compared
    assert not _excluded(bundle(pat(core + "us-core-race", {"code": "2106-3"})), ours, msg)
    assert not _excluded(bundle(pat(core + "us-core-race", {"code": "X"})), ours, msg)


def test_d44_prescription_number_typed_prn_in_an_invented_system() -> None:
    msg = _MSH + _seg("RXE", {2: "123^Drug^NDC", 15: "PN15"})

    def mr(value: str, system: str) -> dict[str, Any]:
        ident = {"value": value, "type": {"coding": [{"system": system, "code": "PRN"}]}}
        return {"resourceType": "MedicationRequest", "identifier": [ident]}

    ours = bundle({"resourceType": "MedicationRequest", "identifier": [{"value": "PN15"}]})
    invented = EX + "CodeSystem/identifier-type-code"
    assert _excluded(bundle(mr("PN15", invented)), ours, msg)["D44"] == 1
    # table 0203's own PRN (provider number), or another identifier, is compared
    v2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
    assert "D44" not in _excluded(bundle(mr("PN15", v2_0203)), ours, msg)
    assert "D44" not in _excluded(bundle(mr("OTHER", invented)), ours, msg)


def test_d45_appointment_without_the_sch_participants() -> None:
    msg = _MSH + _seg("SCH", {1: "1", 12: "99^Smith^Adam"})
    patient_only = {"resourceType": "Appointment", "participant": [{"status": "accepted"}]}
    ours = bundle({"resourceType": "Appointment", "participant": [{}, {}]})
    assert _excluded(bundle(patient_only), ours, msg)["D45"] == 1
    # the oracle lists a placer contact: the count is compared
    placer = {"type": [{"coding": [{"code": "placer contact"}]}], "status": "accepted"}
    with_placer = {"resourceType": "Appointment", "participant": [{}, placer]}
    assert "D45" not in _excluded(bundle(with_placer), ours, msg)
    # no SCH-12/16/20 sent: nothing to leave out
    assert "D45" not in _excluded(bundle(patient_only), ours, _MSH + _seg("SCH", {1: "1"}))


def test_d46_d47_encounter_period_from_pv2_planned_dates() -> None:
    msg = (
        _MSH
        + _seg("PID", {3: "P1"})
        + _seg("PV1", {2: "I", 44: "20150208113419+0110"})
        + _seg("PV2", {8: "20150208113419+0110", 9: "20150209113419+0110"})
    )

    def enc(start: str, end: str) -> dict[str, Any]:
        return {"resourceType": "Encounter", "period": {"start": start, "end": end}}

    ours = bundle({"resourceType": "Encounter", "period": {"start": "2015-02-08T11:34:19+01:10"}})
    # PV2-9 written as period.end (same instant, another offset): excluded; period.start is
    # PV1-44 as well as PV2-8, so it is compared (and agrees)
    got = _excluded(
        bundle(enc("2015-02-08T15:54:19+05:30", "2015-02-09T15:54:19+05:30")), ours, msg
    )
    assert got.get("D47") == 1 and "D46" not in got
    # a date that is not PV2-9 is compared
    got = _excluded(
        bundle(enc("2015-02-08T15:54:19+05:30", "2015-02-10T15:54:19+05:30")), ours, msg
    )
    assert "D47" not in got


def test_d39_count_excused_only_when_short_by_the_ed_obx() -> None:
    msg = (
        b"MSH|^~\\&|A|F|||20260101120000+0000||ORU^R01|X1|P|2.8\r"
        + _seg("OBR", {1: "1", 4: "1^Panel^L"})
        + _seg("OBX", {1: "1", 2: "NM", 3: "2^A^L", 5: "1"})
        + _seg("OBX", {1: "2", 2: "ED", 3: "3^Doc^L", 5: "^AP^PDF^Base64^AAAA"})
    )
    report = {"resourceType": "DiagnosticReport", "presentedForm": [{"data": "AAAA"}]}
    obs = {"resourceType": "Observation", "code": {"coding": [{"code": "2"}]}}
    exp = bundle(report, obs)

    def count_status(*ours: dict[str, Any]) -> str:
        res = C.compare_bundles(exp, bundle(*ours), source=msg, kind="hl7v2")
        (count,) = [o for o in res.outcomes if o.path == "count:Observation"]
        return count.status

    assert count_status(obs, dict(obs)) == "excluded"  # one more: the ED OBX
    assert count_status(obs) == "agree"  # same count: nothing to excuse
    assert count_status(obs, dict(obs), dict(obs)) == "disagree"
