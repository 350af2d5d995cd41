"""Orders, results, documents, referrals and problems: ORU, ORM, OML, OUL, MDM, REF, PPR.

Each test converts a small synthetic message from tests/fixtures/hl7v2/results/
and checks what an integration engineer would check against the HL7 v2-to-FHIR
IG (or, for segments the IG does not map, the v2 segment definition).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bundles import assert_references_resolve, by_ref, one, resources

from fhirtwin.conversion import convert_hl7v2

FIXTURES = Path(__file__).parent / "fixtures" / "hl7v2" / "results"

UCUM = "http://unitsofmeasure.org"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def convert(name: str):
    conv = convert_hl7v2((FIXTURES / name).read_bytes(), validate=True)
    assert conv.report["validation"] == [], conv.report["validation"]
    return conv


def obs_by_loinc(conv, code: str) -> dict:
    for o in resources(conv, "Observation"):
        if any(c.get("code") == code for c in o["code"].get("coding", [])):
            return o
    raise AssertionError(f"no Observation with code {code}")


def codes(concept: dict) -> set[tuple[str | None, str]]:
    return {(c.get("system"), c["code"]) for c in concept.get("coding", [])}


def type_code(ident: dict) -> str:
    return ident["type"]["coding"][0]["code"]


# --------------------------------------------------------------------- ORU^R01


def test_oru_numeric_result_quantity_range_interpretation_status():
    conv = convert("oru_r01_chem.hl7")
    glucose = obs_by_loinc(conv, "2345-7")
    assert glucose["valueQuantity"] == {
        "value": 95,
        "unit": "milligrams per deciliter",
        "code": "mg/dL",
        "system": UCUM,
    }
    assert glucose["status"] == "final"
    assert glucose["referenceRange"] == [{"text": "70-99"}]
    assert codes(glucose["interpretation"][0]) == {
        ("http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "N")
    }
    assert glucose["effectiveDateTime"] == "2024-01-05T07:00:00-05:00"
    patient = one(conv, "Patient")
    assert glucose["subject"] == {"reference": f"Patient/{patient['id']}"}
    assert by_ref(conv, glucose["encounter"])["resourceType"] == "Encounter"
    # OBX-23 performing organization
    orgs = [by_ref(conv, p) for p in glucose["performer"]]
    assert [o.get("name") for o in orgs if o["resourceType"] == "Organization"] == ["GOODLAB"]
    # the NTE right after the OBX is that Observation's note
    assert glucose["note"] == [{"text": "Fasting specimen"}]


def test_oru_structured_numeric_variants():
    conv = convert("oru_r01_chem.hl7")
    creat = obs_by_loinc(conv, "2160-0")  # SN "<^0.5"
    assert creat["valueQuantity"]["comparator"] == "<"
    assert creat["valueQuantity"]["value"] == 0.5
    assert creat["valueQuantity"]["code"] == "mg/dL"
    titer = obs_by_loinc(conv, "5130-0")  # SN "^1^:^128" → Ratio
    assert titer["valueRatio"]["numerator"]["value"] == 1
    assert titer["valueRatio"]["denominator"]["value"] == 128
    assert "valueQuantity" not in titer
    rng = obs_by_loinc(conv, "1234-5")  # SN "^10^-^20" → Range, units on both ends
    assert rng["valueRange"]["low"] == {
        "value": 10,
        "unit": "mg/dL",
        "code": "mg/dL",
        "system": UCUM,
    }
    assert rng["valueRange"]["high"]["value"] == 20
    assert "valueQuantity" not in rng


def test_oru_string_coded_and_cancelled_results():
    conv = convert("oru_r01_chem.hl7")
    assert obs_by_loinc(conv, "8251-1")["valueString"] == "Specimen slightly hemolyzed"
    bact = obs_by_loinc(conv, "600-7")
    assert codes(bact["valueCodeableConcept"]) == {("http://snomed.info/sct", "3092008")}
    assert bact["status"] == "preliminary"
    sodium = obs_by_loinc(conv, "2951-2")  # OBX-11 X: no value, cancelled
    assert sodium["status"] == "cancelled"
    assert not any(k.startswith("value") for k in sodium)
    alt = sodium["_status"]["extension"][0]
    assert alt["url"] == "http://hl7.org/fhir/StructureDefinition/alternate-codes"
    assert codes(alt["valueCodeableConcept"]) == {
        ("http://terminology.hl7.org/CodeSystem/v2-0085", "X")
    }


def test_oru_diagnostic_report_links_results_order_and_specimen():
    conv = convert("oru_r01_chem.hl7")
    report = one(conv, "DiagnosticReport")
    assert report["status"] == "final"  # OBR-25 F
    assert codes(report["code"]) == {("http://loinc.org", "24323-8")}
    assert codes(report["category"][0]) == {("http://terminology.hl7.org/CodeSystem/v2-0074", "CH")}
    assert report["effectiveDateTime"] == "2024-01-05T07:00:00-05:00"  # OBR-7
    assert report["issued"] == "2024-01-05T08:25:00-05:00"  # OBR-22
    assert {type_code(i): i["value"] for i in report["identifier"]} == {
        "PLAC": "PLC1001",
        "FILL": "FIL2002",
    }
    # result[] lists every OBX of the group, in message order
    results = [by_ref(conv, r) for r in report["result"]]
    assert [o["code"]["coding"][0]["code"] for o in results] == [
        "2345-7",
        "2160-0",
        "5130-0",
        "1234-5",
        "8251-1",
        "600-7",
        "2951-2",
    ]
    order = by_ref(conv, report["basedOn"][0])
    assert order["resourceType"] == "ServiceRequest"
    assert order["status"] == "completed"  # ORC-5 CM
    assert order["intent"] == "order"
    assert by_ref(conv, order["requester"])["resourceType"] == "Practitioner"
    # IG ORU_R01: the OBR makes a Specimen (OBR[Specimen]: OBR-7 → collection time), the SPM another
    from_obr, specimen = (by_ref(conv, r) for r in report["specimen"])
    assert from_obr["collection"] == {"collectedDateTime": "2024-01-05T07:00:00-05:00"}
    assert specimen["resourceType"] == "Specimen"
    assert codes(specimen["type"]) == {("http://terminology.hl7.org/CodeSystem/v2-0487", "BLD")}
    assert specimen["identifier"][0]["value"] == "SPC01"
    assert type_code(specimen["identifier"][0]) == "PGN"
    assert specimen["collection"]["collectedDateTime"] == "2024-01-05T07:00:00-05:00"
    assert specimen["receivedTime"] == "2024-01-05T07:30:00-05:00"
    assert_references_resolve(conv)
    assert conv.report["unmapped_segments"] == []


def test_oru_without_orc_each_obr_is_its_own_report():
    conv = convert("oru_r01_no_orc.hl7")
    reports = resources(conv, "DiagnosticReport")
    assert len(reports) == 2
    assert resources(conv, "ServiceRequest") == []  # IG: OBR[ServiceRequest] only if ORC
    first, second = reports
    assert [by_ref(conv, r)["code"]["coding"][0]["code"] for r in first["result"]] == [
        "6690-2",
        "718-7",
    ]
    assert [by_ref(conv, r)["code"]["coding"][0]["code"] for r in second["result"]] == ["2345-7"]
    assert first["status"] == "preliminary" and second["status"] == "final"
    glucose = obs_by_loinc(conv, "2345-7")
    assert codes(glucose["interpretation"][0]) == {
        ("http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "HH")
    }
    assert glucose["note"] == [{"text": "Critical value called to Dr Smith"}]
    assert conv.report["unmapped_segments"] == []
    assert_references_resolve(conv)


def test_oru_value_types_pick_value_x():
    conv = convert("oru_r01_valuetypes.hl7")
    assert obs_by_loinc(conv, "8665-2")["valueDateTime"] == "2023-12-15"  # DT
    assert obs_by_loinc(conv, "74728-7")["valueTime"] == "08:30:00"  # TM
    path = obs_by_loinc(conv, "19139-5")  # TX, OBX-11 C
    assert path["valueString"] == "Benign tissue. No malignancy seen."
    assert path["status"] == "corrected"
    # SN with separator "+" has no FHIR numeric form: IG → valueString
    assert obs_by_loinc(conv, "5130-0")["valueString"] == "5 +"
    # ED: R4 Observation has no valueAttachment → the IG's R5 backport extension
    pdf = obs_by_loinc(conv, "18842-5")
    ext = [
        e
        for e in pdf.get("extension", [])
        if e["url"].endswith("extension-Observation.valueAttachment")
    ]
    assert ext == [
        {
            "url": "http://hl7.org/fhir/5.0/StructureDefinition/extension-Observation.valueAttachment",
            "valueAttachment": {"contentType": "application/pdf", "data": "JVBERi0xLjQK"},
        }
    ]
    abo = obs_by_loinc(conv, "883-9")  # CE, OBX-16 responsible observer, OBX-23 org
    assert abo["valueCodeableConcept"]["coding"][0]["code"] == "A"
    performers = [by_ref(conv, p) for p in abo["performer"]]
    role = next(p for p in performers if p["resourceType"] == "PractitionerRole")
    assert by_ref(conv, role["practitioner"])["name"][0]["family"] == "Quincy"
    assert codes(role["code"][0]) == {
        ("http://terminology.hl7.org/CodeSystem/practitioner-role", "responsibleObserver")
    }
    assert any(p.get("name") == "GOODLAB" for p in performers)


def test_oru_specimen_from_obr_and_spm_with_parents():
    conv = convert("oru_r01_specimen.hl7")
    report = one(conv, "DiagnosticReport")
    from_obr, from_spm = (by_ref(conv, r) for r in report["specimen"])
    # OBR carries specimen data (OBR-9/10/14/15/39): IG OBR[Specimen], OBR-8 empty → collectedDateTime
    assert from_obr["collection"]["collectedDateTime"] == "2024-01-14T07:00:00+00:00"  # OBR-7
    assert from_obr["collection"]["quantity"] == {
        "value": 20,
        "unit": "milliliter",
    }  # OBR-9 CQ: unit only
    assert by_ref(conv, from_obr["collection"]["collector"])["name"][0]["family"] == "Collector"
    assert from_obr["receivedTime"] == "2024-01-14T07:30:00+00:00"  # OBR-14
    assert codes(from_obr["type"]) == {
        ("http://terminology.hl7.org/CodeSystem/v2-0070", "UR")
    }  # OBR-15.1
    assert from_obr["note"] == [{"text": "Midstream, clean catch"}]  # OBR-39
    assert "identifier" not in from_obr  # OBR-2 → accessionIdentifier only if known to be one (IG)
    # SPM-2 EIP: placer → PGN, filler → FGN; SPM-32 shipment id → SHIP (IG SPM[Specimen])
    assert {type_code(i): i["value"] for i in from_spm["identifier"]} == {
        "PGN": "SPM77",
        "FGN": "SPMF77",
        "SHIP": "SHIP-9",
    }
    # SPM-3: each parent id is a Specimen of its own (IG parent(Specimen.identifier))
    parents = [by_ref(conv, p) for p in from_spm["parent"]]
    assert [(type_code(p["identifier"][0]), p["identifier"][0]["value"]) for p in parents] == [
        ("PGN", "PAR1"),
        ("PGN", "PAR2"),
    ]
    assert len(resources(conv, "Specimen")) == 4
    assert conv.report["unmapped_segments"] == []
    assert_references_resolve(conv)


def test_oru_interpretation_placeholder_system_and_note_author():
    conv = convert("oru_r01_specimen.hl7")
    obs = obs_by_loinc(conv, "630-4")
    # OBX-8 "H^High^HL7nnnn": the v2 placeholder for "this field's HL7 table" → table 0078, translated
    v3 = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
    assert [codes(i) for i in obs["interpretation"]] == [{(v3, "H")}, {(v3, "A")}]
    # NTE-5 entered by and NTE-6 entered date/time join the note of NTE-3 (IG NTE[Observation])
    (note,) = obs["note"]
    assert note["text"] == "Greater than 100,000 CFU/mL"
    assert note["time"] == "2024-01-15T08:55:00+00:00"
    assert by_ref(conv, note["authorReference"])["name"][0]["family"] == "Micro"


# ---------------------------------------------------------------------- OUL^R22


def test_oul_specimen_first_then_report_then_order():
    conv = convert("oul_r22.hl7")
    first, second = resources(conv, "DiagnosticReport")
    # SPM comes before its OBR: each report lists its own specimen
    assert codes(by_ref(conv, first["specimen"][0])["type"]) == {
        ("http://snomed.info/sct", "119297000")
    }
    assert codes(by_ref(conv, second["specimen"][0])["type"]) == {
        ("http://snomed.info/sct", "122575003")
    }
    assert len(first["specimen"]) == len(second["specimen"]) == 1
    # Each OBR is an order (OBR[ServiceRequest]); the ORC that follows the first OBR adds to
    # it, and the first report is basedOn it; the second group has no ORC
    order, order2 = resources(conv, "ServiceRequest")
    assert first["basedOn"] == [{"reference": f"ServiceRequest/{order['id']}"}]
    assert "basedOn" not in second
    assert order["status"] == "completed"  # ORC-5 CM
    assert order2["status"] == "unknown"  # no ORC: nothing says more
    # an NTE after OBX + PRT is still the Observation's note
    glucose = by_ref(conv, first["result"][0])
    assert glucose["note"] == [{"text": "Repeat advised"}]
    assert by_ref(conv, second["result"][0])["valueString"] == "Negative"
    assert conv.report["unmapped_segments"] == []
    assert_references_resolve(conv)


# ------------------------------------------------------------- orders (ORM/OML)


def test_oml_order_gathers_orc_tq1_obr_nte_dg1_obx_spm():
    conv = convert("oml_o21.hl7")
    order = one(conv, "ServiceRequest")
    assert order["status"] == "active"  # ORC-1 NW
    assert order["intent"] == "order"
    assert [i["value"] for i in order["identifier"]] == ["ORD900"]
    assert type_code(order["identifier"][0]) == "PLAC"
    assert order["requisition"]["value"] == "GRP900"
    assert codes(order["code"]) == {("http://loinc.org", "24331-1")}
    assert order["priority"] == "stat"  # TQ1-9 S
    assert order["occurrenceTiming"]["repeat"]["boundsPeriod"] == {
        "start": "2024-01-08T13:00:00+00:00",
        "end": "2024-01-08T14:00:00+00:00",
    }
    assert order["note"] == [{"text": "Patient fasting since midnight"}]
    assert by_ref(conv, order["requester"])["name"][0]["family"] == "House"
    assert codes(order["locationCode"][0]) == {
        ("http://terminology.hl7.org/CodeSystem/v3-RoleCode", "HOSP")
    }
    condition = by_ref(conv, order["reasonReference"][0])
    assert codes(condition["code"]) == {("http://hl7.org/fhir/sid/icd-10", "E78.5")}
    weight = by_ref(conv, order["supportingInfo"][0])
    assert weight["valueQuantity"] == {
        "value": 82,
        "unit": "kilogram",
        "code": "kg",
        "system": UCUM,
    }
    specimen = by_ref(conv, order["specimen"][0])
    assert codes(specimen["type"]) == {("http://snomed.info/sct", "122555007")}
    assert order["subject"] == {"reference": f"Patient/{one(conv, 'Patient')['id']}"}
    assert conv.report["unmapped_segments"] == []
    assert_references_resolve(conv)


def test_orm_cancel_status_and_old_style_timing():
    conv = convert("orm_o01.hl7")
    order = one(conv, "ServiceRequest")
    assert order["status"] == "revoked"  # ORC-5 CA (order status) → revoked
    assert {type_code(i): i["value"] for i in order["identifier"]} == {
        "PLAC": "ORD555",
        "FILL": "FIL555",
    }
    # ORC-7 TQ: quantity 1, start time, priority R
    assert order["quantityQuantity"] == {"value": 1}
    assert (
        order["occurrenceTiming"]["repeat"]["boundsPeriod"]["start"] == "2024-01-10T09:00:00+00:00"
    )
    assert order["priority"] == "routine"
    assert codes(order["code"]) == {("http://www.ama-assn.org/go/cpt", "71045")}
    assert codes(order["reasonCode"][0]) == {("http://hl7.org/fhir/sid/icd-10", "R51")}
    assert "authoredOn" not in order  # ORC-9 only for NW (IG)


def test_omg_v28_placer_group_eip_alternate_placer_number_and_no_specimen_for_imaging():
    conv = convert("omg_o19_v28.hl7")
    order = one(conv, "ServiceRequest")
    # ORC-4 is an EIP from v2.7: its placer EI (EIP-1) is the requisition
    assert order["requisition"]["value"] == "GRP910"
    assert type_code(order["requisition"]) == "PGN"
    # OBR-53 alternate placer order number: type PLAC is assigned (IG), not CX-5 "MR"
    alt = next(i for i in order["identifier"] if i["value"] == "ALT910")
    assert codes(alt["type"]) == {(V2_0203, "PLAC")}
    assert order["authoredOn"] == "2024-01-16T07:55:00+00:00"  # ORC-9, ORC-1 NW
    # TQ1-5 relative time in minutes → offset; TQ1-6 service duration, no TQ1-7/8 → boundsDuration
    assert order["occurrenceTiming"]["repeat"] == {
        "period": 6,
        "periodUnit": "h",
        "offset": 30,
        "boundsDuration": {"value": 45, "unit": "min"},
    }
    # a CT order has no specimen data in its OBR (only OBR-7): no Specimen
    assert resources(conv, "Specimen") == []
    assert conv.report["unmapped_segments"] == []


# ------------------------------------------------------------------ MDM^T01/T02


def test_mdm_t02_document_reference_from_txa_and_obx():
    conv = convert("mdm_t02.hl7")
    doc = one(conv, "DocumentReference")
    assert doc["status"] == "current"  # TXA-19 AV
    assert doc["docStatus"] == "final"  # TXA-17 AU (authenticated)
    assert codes(doc["type"]) == {("http://terminology.hl7.org/CodeSystem/v2-0270", "DS")}
    assert doc["masterIdentifier"]["value"] == "DOC-0001"
    assert doc["identifier"] == [{"value": "DS_0001.txt"}]
    assert doc["date"] == "2024-01-10T15:00:00-05:00"
    assert doc["description"] == "Discharge summary for inpatient stay"
    assert by_ref(conv, doc["author"][0])["name"][0]["family"] == "Welby"
    assert doc["subject"] == {"reference": f"Patient/{one(conv, 'Patient')['id']}"}
    # the ED OBX is the attachment, its subtype a MIME type
    assert doc["content"] == [
        {
            "attachment": {
                "contentType": "application/pdf",
                "data": "JVBERi0xLjQKJcfsj6IK",
                "title": "Discharge summary PDF",
            }
        }
    ]
    related = [by_ref(conv, r) for r in doc["context"]["related"]]
    assert [r["resourceType"] for r in related] == ["ServiceRequest", "Observation"]
    assert related[1]["valueString"] == "Patient admitted with pneumonia."
    assert by_ref(conv, doc["context"]["encounter"][0])["resourceType"] == "Encounter"
    assert_references_resolve(conv)


def test_mdm_t01_notification_without_content():
    conv = convert("mdm_t01.hl7")
    doc = one(conv, "DocumentReference")
    assert doc["docStatus"] == "preliminary"  # TXA-17 IP
    # TXA-19 OB: status stays current, the v2 code rides along (IG)
    assert doc["status"] == "current"
    alt = doc["_status"]["extension"][0]["valueCodeableConcept"]
    assert codes(alt) == {("http://terminology.hl7.org/CodeSystem/v2-0275", "OB")}
    # content is required: no OBX, no TXA-3 → data-absent-reason, reported as an assumption
    assert doc["content"][0]["attachment"]["extension"][0]["valueCode"] == "unknown"
    assert any("content[0].attachment" in a["what"] for a in conv.report["assumptions"])
    assert resources(conv, "Observation") == []


# ----------------------------------------------------------------- PPR^PC1/PC3


def test_ppr_problem_add_is_an_active_problem_list_condition_with_goal():
    conv = convert("ppr_pc1.hl7")
    cond = one(conv, "Condition")
    assert codes(cond["clinicalStatus"]) == {
        ("http://terminology.hl7.org/CodeSystem/condition-clinical", "active")
    }
    assert codes(cond["category"][0]) == {
        ("http://terminology.hl7.org/CodeSystem/condition-category", "problem-list-item")
    }
    assert codes(cond["code"]) == {("http://hl7.org/fhir/sid/icd-10", "E11.9")}
    assert cond["onsetDateTime"] == "2022-06-15"  # PRB-16
    assert cond["recordedDate"] == "2023-01-01"  # PRB-7
    assert cond["note"] == [{"text": "Diagnosed at outside clinic."}]
    goal = one(conv, "Goal")
    assert goal["lifecycleStatus"] == "active"
    assert goal["addresses"] == [{"reference": f"Condition/{cond['id']}"}]
    assert goal["target"] == [{"dueDate": "2024-07-01"}]


def test_ppr_problem_delete_is_entered_in_error_on_the_same_condition():
    added = one(convert("ppr_pc1.hl7"), "Condition")
    deleted = one(convert("ppr_pc3.hl7"), "Condition")
    assert deleted["id"] == added["id"]  # same PRB-4 problem instance → same resource
    assert codes(deleted["verificationStatus"]) == {
        ("http://terminology.hl7.org/CodeSystem/condition-ver-status", "entered-in-error")
    }
    assert "clinicalStatus" not in deleted  # FHIR con-5


# --------------------------------------------------------------------- REF^I12


def test_ref_referral_service_request_with_providers_and_reasons():
    conv = convert("ref_i12.hl7")
    referral = one(conv, "ServiceRequest")
    assert referral["status"] == "active"  # RF1-1 P (pending)
    assert referral["priority"] == "routine"
    assert ("http://snomed.info/sct", "3457005") in codes(referral["category"][0])
    assert referral["occurrencePeriod"] == {"start": "2024-01-12", "end": "2024-04-12"}
    # RF1 comes before PID, yet the referral's subject is the patient
    assert referral["subject"] == {"reference": f"Patient/{one(conv, 'Patient')['id']}"}
    assert by_ref(conv, referral["requester"])["name"][0]["family"] == "Welby"  # PRD RP
    assert [by_ref(conv, p)["name"][0]["family"] for p in referral["performer"]] == [
        "Heart"
    ]  # PRD RT
    assert codes(by_ref(conv, referral["reasonReference"][0])["code"]) == {
        ("http://hl7.org/fhir/sid/icd-10", "I48.91")
    }
    hr = by_ref(conv, referral["supportingInfo"][0])
    assert hr["valueQuantity"]["value"] == 132
    assert hr["note"] == [{"text": "Irregularly irregular rhythm"}]
    assert one(conv, "DiagnosticReport")["result"] == [{"reference": f"Observation/{hr['id']}"}]
    assert conv.report["unmapped_segments"] == []
    assert_references_resolve(conv)


def test_ref_cancel_revokes_the_referral():
    conv = convert("ref_i14.hl7")
    referral = one(conv, "ServiceRequest")
    # REF^I14 cancels the referral: revoked, even though RF1-1 still says P (pending)
    assert referral["status"] == "revoked"
    assert referral["authoredOn"] == "2024-01-11"  # RF1-9 process date
    # same RF1-6 referral id as the REF^I12 that made it → the same resource
    assert referral["id"] == one(convert("ref_i12.hl7"), "ServiceRequest")["id"]


# ------------------------------------------------------------ corpus messages


_CORPUS_MESSAGES = [
    "microsoft-fhir-converter/data/SampleData/Hl7v2/" + n
    for n in (
        "ORU-R01-01.hl7",
        "ORU-R01-RMGEAD.hl7",
        "LAB-ORU-1.hl7",
        "LAB-ORU-2.hl7",
        "LAB-ORM-1.hl7",
        "ORM-O01-02.hl7",
        "ORM-O01-03.hl7",
        "OML-O21-01.hl7",
        "OML-O21-02.hl7",
        "OML-O21-03.hl7",
        "MDHHS-OML-O21-2.hl7",
        "OMG-O19-01.hl7",
        "OUL-R22-02.hl7",
        "OUL-R23-01.hl7",
        "OUL-R23-02.hl7",
        "OUL-R24-02.hl7",
        "MDM-T01-01.hl7",
        "MDM-T01-02.hl7",
        "MDM-T02-02.hl7",
        "MDM-T02-03.hl7",
        "MDM-T05-01.hl7",
        "MDM-T06-01.hl7",
        "MDM-T06-02.hl7",
        "MDM-T09-01.hl7",
        "MDM-T10-01.hl7",
        "MDM-T10-02.hl7",
        "REF-I12-02.hl7",
        "REF-I14-01.hl7",
        "REF-I14-02.hl7",
        "PC1-Problem-Add-v2.3.1.hl7",
        "PC1-Problem-Update-v2.3.1.hl7",
        "PC1-Problem-Delete-v2.3.1.hl7",
    )
] + [
    "linuxforhealth-hl7v2-fhir-converter/src/test/resources/ORU-multiline-short.hl7",
    "linuxforhealth-hl7v2-fhir-converter/src/test/resources/ORU-multiline-short-mixed.hl7",
]


@pytest.mark.parametrize("rel", _CORPUS_MESSAGES)
def test_corpus_message_is_valid_r4(rel, corpus):
    path = corpus / rel
    assert path.exists(), f"{rel} is missing from the corpus at {corpus}"
    conv = convert_hl7v2(path.read_bytes(), validate=True)
    assert conv.report["validation"] == []
    assert_references_resolve(conv)
