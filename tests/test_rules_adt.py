"""ADT / BAR / DFT rules: what an integration engineer checks in the FHIR output.

The expected values come from the HL7 v2-to-FHIR IG mapping tables (segments
PID, PD1, NK1, PV1, PV2, AL1, DG1, PR1, IN1, MRG, EVN; data types CX, XPN, XAD,
XTN, PL, XCN) and the FHIR R4 element definitions; the sample messages are
synthetic (tests/fixtures/hl7v2/adt/).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from bundles import by_ref as _resolve
from bundles import one as _one
from bundles import resources as _all

from fhirtwin.conversion import convert_hl7v2

FIXTURES = Path(__file__).parent / "fixtures" / "hl7v2" / "adt"
PHYS = "http://terminology.hl7.org/CodeSystem/location-physical-type"


def _convert(name: str) -> Any:
    return convert_hl7v2((FIXTURES / name).read_bytes(), validate=True)


def _msg(*segments: str) -> Any:
    return convert_hl7v2(("\r".join(segments) + "\r").encode(), validate=True)


def _lineage(res: dict[str, Any]) -> str:
    (ext,) = [e for e in res["extension"] if e["url"].endswith("/source-segment")]
    return str(ext["valueString"])


def _codes(concept: dict[str, Any]) -> set[tuple[str | None, str]]:
    return {(c.get("system"), c["code"]) for c in concept.get("coding", [])}


def _references(node: Any) -> list[dict[str, str]]:
    if isinstance(node, dict):
        out = [node] if set(node) >= {"reference"} and isinstance(node["reference"], str) else []
        for v in node.values():
            out.extend(_references(v))
        return out
    if isinstance(node, list):
        return [r for v in node for r in _references(v)]
    return []


MSH = "MSH|^~\\&|ADTSYS|CITYHOSP|RCVAPP|RCVFAC|20240305081500+0100||{type}|C1|P|2.5.1"
ALL = sorted(p.name for p in FIXTURES.glob("*.hl7"))


# ---------------------------------------------------------------- every sample


@pytest.mark.parametrize("name", ALL)
def test_sample_is_valid_r4_and_every_segment_is_mapped(name: str) -> None:
    conv = _convert(name)
    assert conv.report["validation"] == []
    assert conv.report["unmapped_segments"] == []
    assert conv.report["errors"] == []


@pytest.mark.parametrize("name", ALL)
def test_every_reference_points_into_the_bundle(name: str) -> None:
    conv = _convert(name)
    for e in conv.bundle["entry"]:
        for ref in _references(e["resource"]):
            _resolve(conv, ref)


# ---------------------------------------------------------------- A01: PID, PD1, NK1


def test_pid_identifiers_name_and_demographics() -> None:
    pat = _one(_convert("adt_a01_admit.hl7"), "Patient")
    mrn = pat["identifier"][0]
    assert mrn["value"] == "MRN4711"
    assert _codes(mrn["type"]) == {("http://terminology.hl7.org/CodeSystem/v2-0203", "MR")}
    assert pat["name"][0] == {"family": "Okafor", "given": ["Adaeze", "N"], "prefix": ["Ms."]}
    assert pat["birthDate"] == "1980-02-15"
    assert pat["gender"] == "female"
    # PID-16 via the IG's MaritalStatus concept map → v3 MaritalStatus.
    assert _codes(pat["maritalStatus"]) == {
        ("http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "M")
    }
    # PID-30 "N" with no PID-29 → deceasedBoolean false.
    assert pat["deceasedBoolean"] is False
    # XAD: line from XAD-1 and XAD-2, XAD-7 H → use home.
    addr = pat["address"][0]
    assert addr["line"] == ["12 Elm Street", "Apt 4"]
    assert (addr["city"], addr["state"], addr["postalCode"], addr["use"]) == (
        "Springfield",
        "IL",
        "62701",
        "home",
    )


def test_xtn_value_follows_the_ig_number_format() -> None:
    pat = _one(_convert("adt_a01_admit.hl7"), "Patient")
    home, email, work = pat["telecom"]
    # IG XTN[ContactPoint]: "+" XTN-5 " " XTN-6 " " XTN-7 (and " X" XTN-8).
    assert (home["system"], home["use"], home["value"]) == ("phone", "home", "+1 217 5550101")
    assert (email["system"], email["value"]) == ("email", "ada@example.org")
    assert (work["system"], work["use"], work["value"]) == ("phone", "work", "217 5550199 X12")
    assert {
        "url": "http://hl7.org/fhir/StructureDefinition/contactpoint-extension",
        "valueString": "12",
    } in work["extension"]


def test_pd1_primary_facility_and_provider_are_general_practitioners() -> None:
    conv = _convert("adt_a01_admit.hl7")
    gps = [_resolve(conv, r) for r in _one(conv, "Patient")["generalPractitioner"]]
    assert [g["resourceType"] for g in gps] == ["Organization", "Practitioner"]
    assert gps[0]["name"] == "City Family Practice"
    assert gps[1]["name"][0]["family"] == "Grant"


def test_nk1_is_a_related_person_and_a_patient_contact() -> None:
    conv = _convert("adt_a01_admit.hl7")
    pat = _one(conv, "Patient")
    rp = _one(conv, "RelatedPerson")
    assert _resolve(conv, rp["patient"]) is pat
    assert rp["name"][0] == {"family": "Okafor", "given": ["Chidi"]}
    # NK1-3 SPO via the IG's Relationship map → v3 RoleCode SPS.
    assert ("http://terminology.hl7.org/CodeSystem/v3-RoleCode", "SPS") in _codes(
        rp["relationship"][0]
    )
    contact = pat["contact"][0]
    assert contact["name"]["family"] == "Okafor"
    assert contact["telecom"][0]["value"] == "217 5550102"
    assert contact["address"]["city"] == "Springfield"


# ---------------------------------------------------------------- A01: PV1, PV2


def test_pv1_encounter_class_status_period_and_visit_number() -> None:
    conv = _convert("adt_a01_admit.hl7")
    enc = _one(conv, "Encounter")
    assert enc["class"] == {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
        "code": "IMP",
    }
    assert enc["status"] == "in-progress"
    assert enc["period"] == {"start": "2024-03-05T08:00:00+01:00"}
    assert enc["identifier"][0]["value"] == "V1001"
    assert ("http://terminology.hl7.org/CodeSystem/v2-0203", "VN") in _codes(
        enc["identifier"][0]["type"]
    )
    assert _resolve(conv, enc["subject"]) is _one(conv, "Patient")
    assert enc["reasonCode"][0]["coding"][0]["code"] == "CHEST"


def test_pv1_location_is_the_bed_with_its_parents() -> None:
    conv = _convert("adt_a01_admit.hl7")
    loc = _one(conv, "Encounter")["location"][0]
    assert loc["status"] == "active"
    chain = []
    node = _resolve(conv, loc["location"])
    while True:
        chain.append((node["name"], node["physicalType"]["coding"][0]["code"]))
        if "partOf" not in node:
            break
        node = _resolve(conv, node["partOf"])
    # PL: bed B1 ⊂ room R301 ⊂ point of care WARD3 ⊂ floor 3 ⊂ building MAIN ⊂ facility.
    assert chain == [
        ("B1", "bd"),
        ("R301", "ro"),
        ("WARD3", "wa"),
        ("3", "lvl"),
        ("MAIN", "bu"),
        ("CITYHOSP", "si"),
    ]
    assert all(n["physicalType"]["coding"][0]["system"] == PHYS for n in _all(conv, "Location"))


def test_pv1_doctors_are_typed_participants() -> None:
    conv = _convert("adt_a01_admit.hl7")
    parts = {
        p["type"][0]["coding"][0]["code"]: _resolve(conv, p["individual"])
        for p in _one(conv, "Encounter")["participant"]
    }
    assert parts["ATND"]["identifier"][0]["value"] == "DOC1"
    assert parts["ATND"]["name"][0] == {"family": "Attending", "given": ["Alice"], "prefix": ["Dr"]}
    assert parts["REF"]["name"][0]["family"] == "Referrer"


# ---------------------------------------------------------------- A01: OBX, AL1, DG1, PR1, IN1, EVN


def test_obx_is_an_observation_of_the_patient() -> None:
    conv = _convert("adt_a01_admit.hl7")
    obs = _one(conv, "Observation")
    assert obs["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "8302-2",
        "display": "Body height",
    }
    assert obs["valueQuantity"]["value"] == 170
    assert obs["valueQuantity"]["code"] == "cm"
    assert _resolve(conv, obs["subject"]) is _one(conv, "Patient")


def test_al1_allergy() -> None:
    conv = _convert("adt_a01_admit.hl7")
    al = _one(conv, "AllergyIntolerance")
    assert _resolve(conv, al["patient"]) is _one(conv, "Patient")
    assert al["category"] == ["medication"]  # AL1-2 DA
    assert al["type"] == "allergy"
    assert al["criticality"] == "high"  # AL1-4 SV
    assert al["code"]["coding"][0]["code"] == "70618"
    assert al["reaction"][0]["manifestation"] == [{"text": "Hives"}, {"text": "Wheezing"}]
    assert al["onsetDateTime"] == "2010-01-01"
    assert _codes(al["clinicalStatus"]) == {
        ("http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "active")
    }


def test_dg1_condition_is_an_encounter_diagnosis() -> None:
    conv = _convert("adt_a01_admit.hl7")
    cond = _one(conv, "Condition")
    assert _codes(cond["code"]) == {("http://hl7.org/fhir/sid/icd-10", "I20.9")}
    assert _resolve(conv, cond["subject"]) is _one(conv, "Patient")
    assert _resolve(conv, cond["asserter"])["identifier"][0]["value"] == "DOC1"
    dx = _one(conv, "Encounter")["diagnosis"][0]
    assert _resolve(conv, dx["condition"]) is cond
    assert _codes(dx["use"]) == {("http://terminology.hl7.org/CodeSystem/diagnosis-role", "AD")}
    assert dx["rank"] == 1


def test_pr1_procedure() -> None:
    conv = _convert("adt_a01_admit.hl7")
    proc = _one(conv, "Procedure")
    assert _codes(proc["code"]) == {("http://www.ama-assn.org/go/cpt", "93000")}
    assert proc["performedDateTime"] == "2024-03-05T08:30:00+01:00"
    surgeon = proc["performer"][0]
    assert surgeon["function"]["coding"][0]["code"] == "304292004"  # IG: PR1-11 surgeon
    assert _resolve(conv, surgeon["actor"])["name"][0]["family"] == "Surgeon"
    assert proc["status"] == "unknown"  # IG: unknown unless the context says more


def test_in1_coverage_payor_and_self_subscriber() -> None:
    conv = _convert("adt_a01_admit.hl7")
    cov = _one(conv, "Coverage")
    pat = _one(conv, "Patient")
    assert _resolve(conv, cov["beneficiary"]) is pat
    assert _resolve(conv, cov["subscriber"]) is pat  # IN1-17 SEL
    payor = _resolve(conv, cov["payor"][0])
    assert payor["name"] == "Acme Health Insurance"
    assert payor["address"][0]["city"] == "Hartford"
    assert cov["period"] == {"start": "2024-01-01", "end": "2024-12-31"}
    assert cov["identifier"][0]["value"] == "PLAN7"
    # Self is the Patient: no RelatedPerson for the insured (only the NK1 spouse).
    assert [r["name"][0]["given"] for r in _all(conv, "RelatedPerson")] == [["Chidi"]]


def test_in1_other_subscriber_is_a_related_person() -> None:
    conv = _msg(
        MSH.format(type="ADT^A01^ADT_A01"),
        "PID|1||M1^^^H^MR||Doe^Jan",
        "PV1|1|O",
        "IN1|1|P1|INS^^^NAIC|Payer Inc" + "|" * 12 + "Doe^Jon|SPO^Spouse^HL70063|19790101",
    )
    cov = _one(conv, "Coverage")
    sub = _resolve(conv, cov["subscriber"])
    assert sub["resourceType"] == "RelatedPerson"
    assert sub["name"][0] == {"family": "Doe", "given": ["Jon"]}
    assert sub["birthDate"] == "1979-01-01"
    assert _resolve(conv, sub["patient"]) is _one(conv, "Patient")


def test_evn_provenance_of_the_event() -> None:
    conv = _convert("adt_a01_admit.hl7")
    prov = next(p for p in _all(conv, "Provenance") if p.get("occurredDateTime"))
    assert prov["recorded"] == "2024-03-05T08:14:00+01:00"  # EVN-2
    assert prov["occurredDateTime"] == "2024-03-05T08:00:00+01:00"  # EVN-6
    assert _resolve(conv, prov["target"][0])["resourceType"] == "MessageHeader"
    assert _resolve(conv, prov["agent"][0]["who"])["name"][0]["family"] == "Nurse"  # EVN-5
    assert _codes(prov["activity"]) == {("http://terminology.hl7.org/CodeSystem/v2-0003", "A01")}


def test_msh_message_header() -> None:
    conv = _convert("adt_a01_admit.hl7")
    mh = _one(conv, "MessageHeader")
    assert mh["eventCoding"]["code"] == "A01"
    assert mh["source"]["name"] == "ADTSYS"
    sender = _resolve(conv, mh["sender"])
    # IG HD[Organization]: HD-1 and the ISO OID of HD-2 as identifiers.
    assert {"value": "CITYHOSP"} in sender["identifier"]
    assert any(
        i["value"] == "urn:oid:2.16.840.1.113883.19.5" and i["system"] == "urn:ietf:rfc:3986"
        for i in sender["identifier"]
    )


# ---------------------------------------------------------------- trigger events


def test_a03_discharge_finishes_the_encounter() -> None:
    conv = _convert("adt_a03_discharge.hl7")
    enc = _one(conv, "Encounter")
    assert enc["status"] == "finished"
    assert enc["period"] == {
        "start": "2024-03-05T08:00:00+01:00",
        "end": "2024-03-08T11:30:00+01:00",
    }
    assert ("http://terminology.hl7.org/CodeSystem/v2-0112", "01") in _codes(
        enc["hospitalization"]["dischargeDisposition"]
    )


def test_a03_without_discharge_time_is_still_finished() -> None:
    conv = _msg(MSH.format(type="ADT^A03^ADT_A03"), "PID|1||M1^^^H^MR||Doe^Jan", "PV1|1|I")
    assert _one(conv, "Encounter")["status"] == "finished"


def test_a11_cancel_admit_cancels_the_encounter() -> None:
    assert _one(_convert("adt_a11_cancel_admit.hl7"), "Encounter")["status"] == "cancelled"


def test_a05_preadmit_is_planned_with_planned_location() -> None:
    conv = _convert("adt_a05_preadmit.hl7")
    enc = _one(conv, "Encounter")
    assert enc["status"] == "planned"
    assert enc["class"]["code"] == "PRENC"  # PV1-2 P
    assert enc["location"][0]["status"] == "planned"  # IG: PV1-2 P → planned
    planned_start = {
        "url": "http://hl7.org/fhir/5.0/StructureDefinition/extension-Encounter.plannedStartDate",
        "valueDateTime": "2024-03-10T08:00:00+01:00",
    }
    assert planned_start in enc["extension"]


def test_a08_update_keeps_the_status_of_the_patient_class() -> None:
    conv = _msg(MSH.format(type="ADT^A08^ADT_A01"), "PID|1||M1^^^H^MR||Doe^Jan", "PV1|1|E")
    enc = _one(conv, "Encounter")
    assert enc["status"] == "in-progress"
    assert enc["class"]["code"] == "EMER"


def test_a40_merge_links_the_two_patient_records() -> None:
    conv = _convert("adt_a40_merge.hl7")
    pats = {p["identifier"][0]["value"]: p for p in _all(conv, "Patient")}
    survivor, old = pats["MRN4711"], pats["MRN0815"]
    assert survivor["link"] == [
        {"type": "replaces", "other": {"reference": f"Patient/{old['id']}"}}
    ]
    assert old["link"] == [
        {"type": "replaced-by", "other": {"reference": f"Patient/{survivor['id']}"}}
    ]
    assert old["active"] is False


def test_a06_mrg_prior_account() -> None:
    conv = _msg(
        MSH.format(type="ADT^A06^ADT_A06"),
        "PID|1||M1^^^H^MR||Doe^Jan|||||||||||||NEWACC^^^H^AN",
        "MRG|M1^^^H^MR||OLDACC^^^H^AN",
        "PV1|1|I",
    )
    accounts = {a["identifier"][0]["value"]: a for a in _all(conv, "Account")}
    assert accounts["NEWACC"]["status"] == "active"  # IG PID[Account]
    assert accounts["OLDACC"]["status"] == "unknown"  # IG MRG[Account]
    pat = _one(conv, "Patient")
    assert all(_resolve(conv, a["subject"][0]) is pat for a in accounts.values())


# ---------------------------------------------------------------- BAR / DFT


def test_dft_p03_charge_item() -> None:
    conv = _convert("dft_p03_charge.hl7")
    ci = _one(conv, "ChargeItem")
    assert ci["status"] == "billable"  # FT1-6 CG
    assert _codes(ci["code"]) == {("http://www.ama-assn.org/go/cpt", "93000")}
    assert ci["quantity"] == {"value": 1}
    assert ci["priceOverride"] == {"value": 125.5, "currency": "USD"}
    assert ci["occurrencePeriod"] == {"start": "2024-03-05"}
    assert _resolve(conv, ci["subject"]) is _one(conv, "Patient")
    assert _resolve(conv, ci["context"]) is _one(conv, "Encounter")
    assert _resolve(conv, ci["account"][0])["identifier"][0]["value"] == "ACC555"
    assert _resolve(conv, ci["performer"][0]["actor"])["identifier"][0]["value"] == "DOC1"


def test_bar_p02_purged_account_is_inactive() -> None:
    acc = _one(_convert("bar_p02_purge.hl7"), "Account")
    assert acc["identifier"][0]["value"] == "ACC555"
    assert acc["status"] == "inactive"


def test_bar_p01_account_is_active() -> None:
    conv = _msg(
        MSH.format(type="BAR^P01^BAR_P01"),
        "EVN|P01|20240305",
        "PID|1||M1^^^H^MR||Doe^Jan|||||||||||||ACC1^^^H^AN",
        "PV1|1|O",
    )
    assert conv.report["validation"] == []
    assert _one(conv, "Account")["status"] == "active"


# ---------------------------------------------------------------- edge cases


def test_nk1_without_name_or_organization_adds_no_empty_contact() -> None:
    conv = _msg(
        MSH.format(type="ADT^A01^ADT_A01"),
        "PID|1||M1^^^H^MR||Doe^Jan",
        "NK1|1" + "|" * 11 + "NK9^^^H",
        "PV1|1|I",
    )
    assert "contact" not in _one(conv, "Patient")
    rp = _one(conv, "RelatedPerson")  # still the associated party, by its NK1-12 identifier
    assert rp["identifier"][0]["value"] == "NK9"


def test_nk1_employer_is_only_a_patient_contact() -> None:
    # IG: NK1-3 EMR (employer) → Patient.contact, not a RelatedPerson.
    conv = _msg(
        MSH.format(type="ADT^A01^ADT_A01"),
        "PID|1||M1^^^H^MR||Doe^Jan",
        "NK1|1|Boss^Bob|EMR^Employer^HL70063",
        "PV1|1|I",
    )
    assert _all(conv, "RelatedPerson") == []
    assert _one(conv, "Patient")["contact"][0]["name"]["family"] == "Boss"


def test_rol_primary_care_provider_is_general_practitioner() -> None:
    conv = _msg(
        MSH.format(type="ADT^A01^ADT_A01"),
        "PID|1||M1^^^H^MR||Doe^Jan",
        "ROL|1|AD|PP^Primary Care Provider^HL70443|GP7^Family^Fay",
        "PV1|1|I",
        "ROL|2|AD|AT^Attending^HL70443|AT9^Ward^Walt",
    )
    roles = {r["code"][0]["coding"][0]["code"]: r for r in _all(conv, "PractitionerRole")}
    gp = _one(conv, "Patient")["generalPractitioner"]
    assert [_resolve(conv, g) for g in gp] == [
        roles["446050000"]
    ]  # IG ProviderRole map: PP → SNOMED PCP
    assert _resolve(conv, roles["446050000"]["practitioner"])["name"][0]["family"] == "Family"
    # The ROL after PV1 is a participant of the encounter.
    parts = [
        _resolve(conv, p["individual"]) for p in _one(conv, "Encounter").get("participant", [])
    ]
    assert any(
        p["resourceType"] == "PractitionerRole"
        and _resolve(conv, p["practitioner"])["name"][0]["family"] == "Ward"
        for p in parts
    )


def test_pl_without_bed_points_at_the_room() -> None:
    conv = _msg(
        MSH.format(type="ADT^A02^ADT_A02"),
        "PID|1||M1^^^H^MR||Doe^Jan",
        "PV1|1|I|ICU^12^^CITYHOSP^^^^^Intensive care 12",
    )
    room = _resolve(conv, _one(conv, "Encounter")["location"][0]["location"])
    assert (room["name"], room["physicalType"]["coding"][0]["code"]) == ("12", "ro")
    assert room["description"] == "Intensive care 12"  # PL-9 on the most granular Location only
    ward = _resolve(conv, room["partOf"])
    assert (ward["name"], ward["physicalType"]["coding"][0]["code"]) == ("ICU", "wa")
    assert "description" not in ward
    assert _resolve(conv, ward["partOf"])["name"] == "CITYHOSP"


def test_iam_allergy_reported_by_a_relative_with_a_reaction() -> None:
    conv = _msg(
        MSH.format(type="ADT^A60^ADT_A60"),
        "PID|1||M1^^^H^MR||Doe^Jan",
        "IAM|1|FA^Food allergy^HL70127|91935009^Allergy to peanut^SCT|SV^Severe^HL70128|Hives||AL-77^^2.16.840.1.113883.19^ISO"
        "||||20200101||20240301101500+0100|Doe^Mary|MTH^Mother^HL70063||C^Confirmed^HL70438",
        "IAR|39579001^Anaphylaxis^SCT|SV^Severe^HL70128",
        "NTE|1||Carries an epinephrine pen",
    )
    al = _one(conv, "AllergyIntolerance")
    assert al["identifier"][0] == {"value": "AL-77", "system": "urn:oid:2.16.840.1.113883.19"}
    assert (al["category"], al["type"], al["criticality"]) == (["food"], "allergy", "high")
    assert al["onsetDateTime"] == "2020-01-01"
    assert al["recordedDate"] == "2024-03-01T10:15:00+01:00"
    reporter = _resolve(conv, al["recorder"])
    assert reporter["resourceType"] == "RelatedPerson"
    assert reporter["name"][0]["given"] == ["Mary"]
    assert ("http://terminology.hl7.org/CodeSystem/v3-RoleCode", "MTH") in _codes(
        reporter["relationship"][0]
    )
    assert al["reaction"][0]["manifestation"] == [{"text": "Hives"}]
    anaphylaxis = al["reaction"][1]
    assert _codes(anaphylaxis["manifestation"][0]) == {("http://snomed.info/sct", "39579001")}
    assert anaphylaxis["severity"] == "severe"
    assert al["note"] == [{"text": "Carries an epinephrine pen"}]
    assert conv.report["validation"] == []


def test_pid_race_and_ethnicity_use_us_core_cdc_codes() -> None:
    pid = (
        "PID|1||M1^^^H^MR||Doe^Jan||19700101|M||2106-3^White^HL70005"
        + "|" * 12
        + "H^Hispanic or Latino^HL70189"
    )
    pat = _one(_msg(MSH.format(type="ADT^A28^ADT_A05"), pid, "PV1|1|N"), "Patient")
    ext = {e["url"].rsplit("-", 1)[-1]: e for e in pat["extension"] if "us-core" in e["url"]}
    cdc = "urn:oid:2.16.840.1.113883.6.238"
    assert {
        "url": "ombCategory",
        "valueCoding": {"system": cdc, "code": "2106-3", "display": "White"},
    } in ext["race"]["extension"]
    assert {"url": "text", "valueString": "White"} in ext["race"]["extension"]
    omb = next(x for x in ext["ethnicity"]["extension"] if x["url"] == "ombCategory")
    assert (omb["valueCoding"]["system"], omb["valueCoding"]["code"]) == (cdc, "2135-2")


# ---------------------------------------------------------------- conformance round


def test_pid13_cell_phone_without_use_code_is_home_and_pid40_cell_is_mobile() -> None:
    # IG PID[Patient]: PID-13 use "home" / PID-14 use "work" when XTN-2 is not valued;
    # XTN-2 wins when sent. PID-40 has no segment-level use: XTN-3 CP → mobile.
    pid = (
        "PID|1||M1^^^H^MR||Doe^Jan"
        + "|" * 8
        + "5551001^^CP~5551002^WPN^CP|5551003^^CP~5551004^PRN^PH"
        + "|" * 26
        + "5551005^^CP"
    )
    pat = _one(_msg(MSH.format(type="ADT^A04^ADT_A01"), pid, "PV1|1|O"), "Patient")
    uses = {t["value"]: (t["system"], t.get("use")) for t in pat["telecom"]}
    assert uses == {
        "5551001": ("phone", "home"),
        "5551002": ("phone", "work"),
        "5551003": ("phone", "work"),
        "5551004": ("phone", "home"),
        "5551005": ("phone", "mobile"),
    }


def test_pid15_language_is_bcp47() -> None:
    # FHIR R4 communication.language is bound to BCP-47: ISO 639-2 (table 0296)
    # codes become their two-letter ISO 639-1 subtag, B and T forms alike.
    pid = "PID|1||M1^^^H^MR||Doe^Jan" + "|" * 10 + "ara^Arabic^HL70296^GER^German^HL70296"
    pat = _one(_msg(MSH.format(type="ADT^A04^ADT_A01"), pid, "PV1|1|O"), "Patient")
    (comm,) = pat["communication"]
    assert _codes(comm["language"]) == {("urn:ietf:bcp:47", "ar"), ("urn:ietf:bcp:47", "de")}
    nk1 = "NK1|1|Doe^Jon|SPO^Spouse^HL70063" + "|" * 17 + "fre"
    rp = _one(
        _msg(MSH.format(type="ADT^A04^ADT_A01"), "PID|1||M1^^^H^MR||Doe^Jan", nk1, "PV1|1|O"),
        "RelatedPerson",
    )
    assert _codes(rp["communication"][0]["language"]) == {("urn:ietf:bcp:47", "fr")}


def test_xpn15_called_by_joins_a_usual_name_else_is_a_nickname() -> None:
    # IG XPN[HumanName] XPN.15: a given name of the same HumanName when its use is
    # "usual" (XPN-7 D), otherwise a second HumanName with use nickname.
    pid = "PID|1||M1^^^H^MR||Everyman^Adam^A^^^^D^^^^^^^^Ad~Everyman^Adam^^^^^L^^^^^^^^Eve"
    pat = _one(_msg(MSH.format(type="ADT^A04^ADT_A01"), pid, "PV1|1|O"), "Patient")
    assert pat["name"] == [
        {"family": "Everyman", "given": ["Adam", "A", "Ad"], "use": "usual"},
        {"family": "Everyman", "given": ["Adam"], "use": "official"},
        {"given": ["Eve"], "use": "nickname"},
    ]


def test_race_omb_code_gets_the_cdc_system_whatever_cwe3_says() -> None:
    pid = "PID|1||M1^^^H^MR||Doe^Jan||19700101|M||2106-3^WHITE^HL7000"
    pat = _one(_msg(MSH.format(type="ADT^A28^ADT_A05"), pid, "PV1|1|N"), "Patient")
    race = next(e for e in pat["extension"] if e["url"].endswith("us-core-race"))
    omb = next(x for x in race["extension"] if x["url"] == "ombCategory")
    assert (omb["valueCoding"]["system"], omb["valueCoding"]["code"]) == (
        "urn:oid:2.16.840.1.113883.6.238",
        "2106-3",
    )


def test_in1_plan_type_relationship_and_policy_number() -> None:
    in1 = (
        "IN1|1|P1|INS^^^NAIC|Payer Inc"
        + "|" * 11
        + "HMO^health maintenance organization policy|Doe^Jon|SPO^Spouse"
        + "|" * 19
        + "POL-42"
    )
    conv = _msg(MSH.format(type="ADT^A01^ADT_A01"), "PID|1||M1^^^H^MR||Doe^Jan", "PV1|1|O", in1)
    cov = _one(conv, "Coverage")
    # IN1-15 through the IG's PlanId map → v3 ActCode, R4's preferred Coverage.type system.
    assert _codes(cov["type"]) == {("http://terminology.hl7.org/CodeSystem/v3-ActCode", "HMO")}
    # IN1-17: the IG's v3 RoleCode plus R4's bound subscriber-relationship code.
    assert _codes(cov["relationship"]) == {
        ("http://terminology.hl7.org/CodeSystem/v3-RoleCode", "SPS"),
        ("http://terminology.hl7.org/CodeSystem/subscriber-relationship", "spouse"),
    }
    assert [i["value"] for i in cov["identifier"]] == ["P1", "POL-42"]  # IN1-2, IN1-36
    assert conv.report["validation"] == []


def test_parent_procedure_and_parent_diagnosis_are_references_by_identifier() -> None:
    # IG PR1-25 → partOf(Procedure.identifier); DG1-22 → condition-dueTo(Condition).
    # No stub resource is written (its PUT would overwrite the real parent).
    conv = _msg(
        MSH.format(type="ADT^A01^ADT_A01"),
        "PID|1||M1^^^H^MR||Doe^Jan",
        "PV1|1|I",
        "DG1|1||I21^AMI^I10" + "|" * 17 + "DX2|A|DX1",
        "PR1|1||93000^ECG^C4||20240305083000+0100" + "|" * 14 + "PR2" + "|" * 6 + "PR1",
    )
    proc = _one(conv, "Procedure")
    assert proc["partOf"] == [{"identifier": {"value": "PR1"}, "type": "Procedure"}]
    cond = _one(conv, "Condition")
    due = next(
        e
        for e in cond["extension"]
        if e["url"] == "http://hl7.org/fhir/StructureDefinition/condition-dueTo"
    )
    assert due["valueReference"] == {"identifier": {"value": "DX1"}, "type": "Condition"}
    assert conv.report["validation"] == []


def test_al1_icdo_coding_system_uri() -> None:
    conv = _msg(
        MSH.format(type="ADT^A01^ADT_A01"),
        "PID|1||M1^^^H^MR||Doe^Jan",
        "PV1|1|I",
        "AL1|1|DA|P^PENICILLIN^ICDO",
    )
    al = _one(conv, "AllergyIntolerance")
    assert _codes(al["code"]) == {("http://terminology.hl7.org/CodeSystem/icd-o-3", "P")}


def test_the_same_allergy_and_insured_in_two_visit_groups_are_one_resource() -> None:
    # BAR^P01 with two VISIT groups repeating the same AL1 and IN1: one allergy
    # (same patient, allergen, reaction) and one insured spouse (IN1-16..19, 43),
    # not two copies of each; both Coverages point at that one RelatedPerson.
    al1 = "AL1|1|DA|P^PENICILLIN^ICDO|SV|HIVES|20200101"
    in1a = (
        "IN1|1|P1|INS^^^NAIC|Payer Inc"
        + "|" * 12
        + "Doe^Jon|SPO^Spouse|19790101|1 Main St^^Town^ST^12345"
    )
    in1b = (
        "IN1|2|P2|INS^^^NAIC|Payer Inc"
        + "|" * 12
        + "Doe^Jon|SPO^Spouse|19790101|1 Main St^^Town^ST^12345"
    )
    conv = _msg(
        MSH.format(type="BAR^P01^BAR_P01"),
        "EVN|P01|20240305081500+0100",
        "PID|1||M1^^^H^MR||Doe^Jan",
        "PV1|1|I|||||||||||||||||V1^^^H^VN",
        al1,
        in1a,
        "PV1|2|O|||||||||||||||||V2^^^H^VN",
        al1,
        in1b,
    )
    (al,) = _all(conv, "AllergyIntolerance")
    rp = _one(conv, "RelatedPerson")
    assert rp["name"] == [{"family": "Doe", "given": ["Jon"]}]
    # the lineage names both segments each one came from (1-based segment positions)
    assert _lineage(al) == "AL1[5],AL1[8]"
    assert _lineage(rp) == "IN1[6],IN1[9]"
    covs = _all(conv, "Coverage")
    assert sorted(i["value"] for c in covs for i in c["identifier"]) == ["P1", "P2"]
    assert all(_resolve(conv, c["subscriber"]) is rp for c in covs)
    assert conv.report["validation"] == []


def test_a_different_reaction_is_a_different_allergy() -> None:
    conv = _msg(
        MSH.format(type="ADT^A08^ADT_A01"),
        "PID|1||M1^^^H^MR||Doe^Jan",
        "PV1|1|I",
        "AL1|1|DA|P^PENICILLIN^ICDO|SV|HIVES",
        "AL1|2|DA|P^PENICILLIN^ICDO|MI|RASH",
    )
    assert len(_all(conv, "AllergyIntolerance")) == 2


def test_xtn_without_a_number_keeps_its_equipment_type() -> None:
    # IG XTN[ContactPoint]: each component maps on its own, none is required, so an XTN
    # with only XTN-3 ("^^CP": a cell phone, number not sent) is a ContactPoint with a
    # system and no value (FHIR R4 cpt-2 asks for a system when there is a value, not
    # the reverse). An XTN with no component at all still makes nothing.
    nk1 = "NK1|1|Doe^Ann|MTH^Mother^HL70063||5551234^PRN^PH~^^CP~^WPN^Internet~"
    conv = _msg(MSH.format(type="ADT^A04^ADT_A01"), "PID|1||M1^^^H^MR||Doe^Jan", nk1)
    telecom = _one(conv, "RelatedPerson")["telecom"]
    assert {"system": "phone", "use": "mobile"} in telecom
    assert {"system": "email", "use": "work"} in [
        {k: v for k, v in t.items() if k != "extension"} for t in telecom
    ]
    assert {"system": "phone", "use": "home", "value": "5551234"} in telecom
    assert len(telecom) == 3
