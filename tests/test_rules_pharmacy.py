"""Pharmacy, immunization and scheduling: RDE^O11/O25, RDS^O13, VXU^V04, SIU^S12..S26.

Each test converts a small synthetic message from tests/fixtures/hl7v2/pharmacy/
and checks what an integration engineer would check against the HL7 v2-to-FHIR
IG (RXA/RXR/ORC[Immunization], SCH/AIS/AIG/AIL/AIP[Appointment], RXO/RXR/TQ1
[MedicationRequest]) or, where the IG has no map (RXE, RXD), the v2 field
definitions. Expected codes come from the IG's concept maps and HL7 tables.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bundles import assert_references_resolve, by_ref, one, resources

from fhirtwin.conversion import convert_hl7v2

FIXTURES = Path(__file__).parent / "fixtures" / "hl7v2" / "pharmacy"

UCUM = "http://unitsofmeasure.org"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0443 = "http://terminology.hl7.org/CodeSystem/v2-0443"
V3_ROUTE = "http://terminology.hl7.org/CodeSystem/v3-RouteOfAdministration"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def convert_bytes(data: bytes):
    conv = convert_hl7v2(data, validate=True)
    assert conv.report["validation"] == [], conv.report["validation"]
    assert_references_resolve(conv)
    return conv


def convert(name: str):
    return convert_bytes((FIXTURES / name).read_bytes())


def by_identifier(conv, rtype: str, value: str) -> dict:
    for res in resources(conv, rtype):
        if any(i.get("value") == value for i in res.get("identifier", [])):
            return res
    raise AssertionError(f"no {rtype} with identifier {value}")


def codes(concept: dict) -> set[tuple[str | None, str]]:
    return {(c.get("system"), c["code"]) for c in concept.get("coding", [])}


def unmapped_segments(conv) -> set[str]:
    return {u["segment"] for u in conv.report["unmapped_segments"]}


def unmapped_fields(conv) -> set[str]:
    return {u["field"] for u in conv.report["unmapped_fields"]}


# --------------------------------------------------------------------- VXU^V04


def test_vxu_given_dose_maps_to_a_completed_immunization():
    conv = convert("vxu_v04.hl7")
    imm = by_identifier(conv, "Immunization", "IZ-1001")
    patient = one(conv, "Patient")
    assert imm["patient"] == {"reference": f"Patient/{patient['id']}"}
    assert by_ref(conv, imm["encounter"])["resourceType"] == "Encounter"
    # ORC-2 / ORC-3 → identifiers typed PLAC / FILL (IG ORC[Immunization])
    types = {i["value"]: i["type"]["coding"][0] for i in imm["identifier"]}
    assert types["PL-88"]["system"] == V2_0203 and types["PL-88"]["code"] == "PLAC"
    assert types["IZ-1001"]["code"] == "FILL"
    # RXA-20 CP → completed (CompletionStatus); RXA-5 CVX; RXA-3 occurrence
    assert imm["status"] == "completed"
    assert codes(imm["vaccineCode"]) == {("http://hl7.org/fhir/sid/cvx", "20")}
    assert imm["occurrenceDateTime"] == "2024-03-05T09:45:00-05:00"
    # RXA-6/7 → doseQuantity (one Quantity with UCUM code)
    assert imm["doseQuantity"] == {"value": 0.5, "unit": "milliliter", "code": "mL", "system": UCUM}
    assert imm["lotNumber"] == "LOT123A"
    assert imm["expirationDate"] == "2025-12-31"
    assert by_ref(conv, imm["manufacturer"])["name"] == "Sanofi Pasteur"
    # ORC-9 recorded; RXA-22 absent
    assert imm["recorded"] == "2024-03-05T10:00:00-05:00"
    # RXA-10 administering provider (AP), ORC-12 ordering provider (OP)
    functions = {
        p["function"]["coding"][0]["code"]: by_ref(conv, p["actor"]) for p in imm["performer"]
    }
    assert {p["function"]["coding"][0]["system"] for p in imm["performer"]} == {V2_0443}
    assert functions["AP"]["name"][0]["family"] == "Nurse"
    assert functions["OP"]["name"][0]["family"] == "Welby"
    # RXR-1 IM → v3 IM (RouteOfAdministration map); RXR-2 keeps its table 0163 code
    assert codes(imm["route"]) == {(V3_ROUTE, "IM")}
    assert codes(imm["site"]) == {("http://terminology.hl7.org/CodeSystem/v2-0163", "LA")}
    # RXA-9 "00" (CDC NIP001: new record) → primary source
    assert imm["primarySource"] is True


def test_vxu_refusal_is_not_done_and_999_is_no_amount():
    conv = convert("vxu_v04.hl7")
    imm = by_identifier(conv, "Immunization", "IZ-1002")
    assert imm["status"] == "not-done"  # RXA-20 RE (CompletionStatus)
    assert imm["statusReason"]["coding"][0]["code"] == "00"  # RXA-18
    assert "doseQuantity" not in imm  # 999 = amount unknown (CDC), not 999 units
    assert "RXA-6" in unmapped_fields(conv)


def test_vxu_action_code_d_means_entered_in_error():
    conv = convert("vxu_v04.hl7")
    imm = by_identifier(conv, "Immunization", "IZ-1003")
    # IG: RXA-21 D → entered-in-error, whatever RXA-20 says
    assert imm["status"] == "entered-in-error"
    assert imm["occurrenceDateTime"] == "2023-01-01"
    # RXA-9 01 = historical record: not from the administering provider
    assert imm["primarySource"] is False
    assert imm["reportOrigin"]["coding"][0]["code"] == "01"


def test_vxu_completion_status_defaults_to_completed():
    data = (FIXTURES / "vxu_v04.hl7").read_bytes().replace(b"MVX|||CP|A\r", b"MVX\r")
    conv = convert_bytes(data)
    imm = by_identifier(conv, "Immunization", "IZ-1001")
    assert imm["status"] == "completed"  # IG: RXA-20 empty → completed
    assert any("status" in a["what"] for a in conv.report["assumptions"])


def test_vxu_administered_at_address_without_location():
    # RXA-28 (address) → location (Location.address) when RXA-27 is empty
    data = (FIXTURES / "vxu_v04.hl7").read_bytes()
    data = data.replace(b"|CP|A\r", b"|CP|A|||||||10 Main St^^Springfield^IL^62701\r", 1)
    conv = convert_bytes(data)
    loc = by_ref(conv, by_identifier(conv, "Immunization", "IZ-1001")["location"])
    assert loc["address"]["line"] == ["10 Main St"]
    assert loc["address"]["city"] == "Springfield"


def test_vxu_order_observation_is_part_of_its_immunization():
    conv = convert("vxu_v04.hl7")
    obs = one(conv, "Observation")
    imm = by_identifier(conv, "Immunization", "IZ-1001")
    assert obs["partOf"] == [{"reference": f"Immunization/{imm['id']}"}]
    assert codes(obs["code"]) == {("http://loinc.org", "29768-9")}
    assert unmapped_segments(conv) == set()


def test_vxu_funding_observations_map_to_immunization_elements():
    # IG VXU_V04 (ORDER.OBSERVATION.OBX): funding source and eligibility OBX map to
    # Immunization elements rather than Observations (CDC immunization guide)
    conv = convert("vxu_v04.hl7")
    imm = by_identifier(conv, "Immunization", "IZ-1001")
    # LOINC 64994-7 → programEligibility (table 0064)
    assert [codes(c) for c in imm["programEligibility"]] == [
        {("http://terminology.hl7.org/CodeSystem/v2-0064", "V02")}
    ]
    # LOINC 30963-3 → fundingSource (CDC PHIN VADS value set, OID of 0396 CDCPHINVS)
    assert codes(imm["fundingSource"]) == {("urn:oid:2.16.840.1.114222.4.5.274", "VXC1")}
    loincs = {c for o in resources(conv, "Observation") for c in codes(o["code"])}
    assert not loincs & {("http://loinc.org", "64994-7"), ("http://loinc.org", "30963-3")}
    # the other immunizations of the message got none of it
    assert "fundingSource" not in by_identifier(conv, "Immunization", "IZ-1002")


# ------------------------------------------------------------------ RDE^O11


def order_and_encoded(conv, placer: str) -> tuple[dict, dict]:
    """The order (ORC [+ RXO]) and the pharmacy's encoding of it (RXE), by ORC-2 (both
    carry ORC-2; the order is the one that is not the filler's view)."""
    (order,) = [
        mr
        for mr in resources(conv, "MedicationRequest")
        if mr["intent"] != "filler-order"
        and any(i.get("value") == placer for i in mr.get("identifier", []))
    ]
    encoded = [
        mr
        for mr in resources(conv, "MedicationRequest")
        if mr.get("basedOn") == [{"reference": f"MedicationRequest/{order['id']}"}]
    ]
    assert len(encoded) == 1, f"{len(encoded)} encoded orders based on {placer}"
    return order, encoded[0]


def test_rde_new_order_maps_to_an_order_and_its_encoded_order():
    conv = convert("rde_o11.hl7")
    order, encoded = order_and_encoded(conv, "ORD-9001")
    # no RXO: the ORC is the order; RXE is the pharmacy's view of it (FHIR filler-order)
    assert order["intent"] == "order"
    assert encoded["intent"] == "filler-order"
    for mr in (order, encoded):
        assert mr["status"] == "active"  # ORC-1 NW
        assert mr["subject"]["reference"] == f"Patient/{one(conv, 'Patient')['id']}"
        assert by_ref(conv, mr["encounter"])["resourceType"] == "Encounter"
        assert mr["authoredOn"] == "2024-06-10T08:00:00+02:00"  # ORC-9 (NW)
        assert by_ref(conv, mr["requester"])["name"][0]["family"] == "House"  # ORC-12
        # ORC-29 I → inpatient
        assert mr["category"][0]["coding"][0]["code"] == "inpatient"
    ids = {i["value"]: i for i in order["identifier"]}
    assert ids["ORD-9001"]["type"]["coding"][0]["code"] == "PLAC"
    assert ids["RX-77"]["type"]["coding"][0]["code"] == "FILL"
    assert "RX-0042" not in ids
    enc_ids = {i["value"]: i for i in encoded["identifier"]}
    assert enc_ids["RX-77"]["type"]["coding"][0]["code"] == "FILL"
    assert enc_ids["ORD-9001"]["type"]["coding"][0]["code"] == "PLAC"
    assert enc_ids["RX-0042"]["type"] == {"text": "Prescription number"}  # RXE-15
    assert order["id"] != encoded["id"]
    # RXE-2 give code and RXE-6 dosage form → the Medication; without an RXO the order
    # names no drug of its own and shares it
    assert order["medicationReference"] == encoded["medicationReference"]
    med = by_ref(conv, encoded["medicationReference"])
    assert codes(med["code"]) == {(RXNORM, "197361")}
    assert codes(med["form"]) == {("http://terminology.hl7.org/CodeSystem/v2-0292", "TAB")}


def test_rde_dose_timing_route_and_dispense():
    conv = convert("rde_o11.hl7")
    order, encoded = order_and_encoded(conv, "ORD-9001")
    # the TQ1 after the ORC (RDE_O11 TIMING group) is the order's timing:
    # TQ1-3 BID, TQ1-7/8 bounds, TQ1-9 R → routine
    (timing,) = order["dosageInstruction"]
    assert ("http://terminology.hl7.org/CodeSystem/v3-GTSAbbreviation", "BID") in codes(
        timing["timing"]["code"]
    )
    assert timing["timing"]["repeat"]["boundsPeriod"] == {
        "start": "2024-06-10T09:00:00+02:00",
        "end": "2024-06-17T09:00:00+02:00",
    }
    assert order["priority"] == "routine"
    # the RXE and the RXR after it are the encoded order's
    (dosage,) = encoded["dosageInstruction"]
    (dose,) = dosage["doseAndRate"]
    # RXE-3 give amount + RXE-5 units (no maximum) → doseQuantity
    assert dose["doseQuantity"] == {"value": 5, "unit": "milligram", "code": "mg", "system": UCUM}
    assert "doseRange" not in dose
    # RXR-1 PO → v3 PO (IG RouteOfAdministration map)
    assert codes(dosage["route"]) == {(V3_ROUTE, "PO")}
    # RXE-7 provider's administration instructions
    assert dosage["additionalInstruction"] == [{"text": "Take in the morning"}]
    # RXE-10/11 dispense amount and units, RXE-12 refills
    disp = encoded["dispenseRequest"]
    assert disp["quantity"]["value"] == 14 and disp["quantity"]["code"] == "TAB"
    assert disp["numberOfRepeatsAllowed"] == 2
    assert "dispenseRequest" not in order


def test_rde_discontinued_order_and_dose_range():
    conv = convert("rde_o11.hl7")
    order, encoded = order_and_encoded(conv, "ORD-9002")
    for mr in (order, encoded):
        assert mr["status"] == "stopped"  # ORC-1 DC, no ORC-5
        assert "authoredOn" not in mr  # ORC-9 is the time of the DC, not of the order
    (dose,) = encoded["dosageInstruction"][0]["doseAndRate"]
    # RXE-3 minimum and RXE-4 maximum → doseRange
    assert dose["doseRange"]["low"]["value"] == 200
    assert dose["doseRange"]["high"]["value"] == 400
    assert dose["doseRange"]["high"]["code"] == "mg"
    assert "doseQuantity" not in dose


def test_rde_order_status_wins_over_order_control():
    conv = convert("rde_o11.hl7")
    order, encoded = order_and_encoded(conv, "ORD-9003")
    assert order["status"] == encoded["status"] == "completed"  # ORC-5 CM
    assert codes(by_ref(conv, order["medicationReference"])["code"]) == {(RXNORM, "313782")}
    # no ORC-3: the encoded order still carries ORC-2 (IG ORC[ServiceRequest] ORC-2 →
    # identifier PLAC: it names the order), under an id of its own, not the order's
    assert [(i["value"], i["type"]["coding"][0]["code"]) for i in encoded["identifier"]] == [
        ("ORD-9003", "PLAC")
    ]
    assert encoded["id"] != order["id"]


def test_rde_each_order_has_its_own_medication():
    conv = convert("rde_o11.hl7")
    meds = resources(conv, "Medication")
    mrs = resources(conv, "MedicationRequest")
    assert len(mrs) == 6 and len(meds) == 3
    assert sorted(mr["intent"] for mr in mrs) == ["filler-order"] * 3 + ["order"] * 3
    assert {mr["medicationReference"]["reference"] for mr in mrs} == {
        f"Medication/{m['id']}" for m in meds
    }


def test_rde_requested_order_is_original_order_with_its_own_drug():
    conv = convert("rde_o11_rxo.hl7")
    order, encoded = order_and_encoded(conv, "ORD-9101")
    # IG RXO[MedicationRequest]: intent original-order
    assert order["intent"] == "original-order"
    assert encoded["intent"] == "filler-order"
    # RXO-1/5 → the order's Medication; RXE-2 → the encoded order's (a different drug)
    requested = by_ref(conv, order["medicationReference"])
    encoded_med = by_ref(conv, encoded["medicationReference"])
    assert requested["id"] != encoded_med["id"]
    assert codes(requested["code"]) == {(RXNORM, "310965")}
    assert codes(encoded_med["code"]) == {(RXNORM, "197805")}
    # IG: RXO-2/3/4 → doseRange low/high (type ordered)
    (dosage,) = order["dosageInstruction"]
    (dose,) = dosage["doseAndRate"]
    assert dose["type"]["coding"][0]["code"] == "ordered"
    low = {"value": 200, "unit": "milligram", "code": "mg", "system": UCUM}
    assert dose["doseRange"]["low"] == low
    assert dose["doseRange"]["high"]["value"] == 400
    # IG: RXO-9 → substitution (table 0161), RXO-11/12 dispense quantity, RXO-13 refills
    assert codes(order["substitution"]["allowedCodeableConcept"]) == {
        ("http://terminology.hl7.org/CodeSystem/v2-0161", "N")
    }
    assert order["dispenseRequest"]["quantity"]["value"] == 30
    assert order["dispenseRequest"]["numberOfRepeatsAllowed"] == 1
    # each TQ1 and RXR goes with the segment it follows: the order's before RXE,
    # the encoded order's after it
    assert dosage["timing"]["repeat"]["boundsPeriod"]["start"] == "2024-06-12T09:00:00+02:00"
    (enc_dosage,) = encoded["dosageInstruction"]
    assert enc_dosage["timing"]["repeat"]["boundsPeriod"]["start"] == "2024-06-12T12:00:00+02:00"
    assert codes(enc_dosage["route"]) == codes(dosage["route"]) == {(V3_ROUTE, "PO")}
    (enc_dose,) = enc_dosage["doseAndRate"]
    assert enc_dose["doseQuantity"]["value"] == 1
    assert encoded["dispenseRequest"]["quantity"]["value"] == 20
    # the NTE after the encoded group's RXR → the encoded order's note
    assert encoded["note"] == [{"text": "Patient prefers to take it with milk"}]
    assert "note" not in order
    assert unmapped_segments(conv) == set()


def test_rde_o25_uses_the_same_rules():
    data = (FIXTURES / "rde_o11.hl7").read_bytes().replace(b"RDE^O11^RDE_O11", b"RDE^O25^RDE_O25")
    conv = convert_bytes(data)
    assert conv.report["message"]["rules"] == "messages/RDE_O25.yaml"
    assert len(resources(conv, "MedicationRequest")) == 6


# ------------------------------------------------------------------ RDS^O13


def test_rds_dispense_maps_to_medication_dispense():
    conv = convert("rds_o13.hl7")
    md = one(conv, "MedicationDispense")
    order, encoded = order_and_encoded(conv, "ORD-9001")
    assert md["status"] == "completed"
    assert md["subject"]["reference"] == f"Patient/{one(conv, 'Patient')['id']}"
    # the pharmacy dispenses against its encoded order
    (auth,) = md["authorizingPrescription"]
    assert auth["reference"] == f"MedicationRequest/{encoded['id']}"
    assert auth["identifier"]["value"] == "RX-0042"  # RXD-7 prescription number
    assert md["whenHandedOver"] == "2024-06-11T13:30:00+02:00"  # RXD-3
    assert md["quantity"]["value"] == 14 and md["quantity"]["code"] == "TAB"  # RXD-4/5
    assert md["note"] == [{"text": "Dispensed in blister pack"}]  # RXD-9
    assert by_ref(conv, md["performer"][0]["actor"])["name"][0]["family"] == "Pill"  # RXD-10
    assert md["substitution"]["wasSubstituted"] is False  # RXD-11 N
    # the dispensed product (RXD-2 NDC, lot, expiry) is its own Medication
    med = by_ref(conv, md["medicationReference"])
    assert codes(med["code"]) == {("http://hl7.org/fhir/sid/ndc", "00069152001")}
    assert med["batch"] == {"lotNumber": "B2024-17", "expirationDate": "2026-01-31"}
    assert md["medicationReference"] != encoded["medicationReference"]
    assert order["intent"] == "order"


def test_rds_refers_to_the_same_orders_as_the_rde():
    # ids come from the business identifiers: ORC-2 for the order, ORC-3 for the
    # encoded order, so the dispense message updates what the order message made
    rde = order_and_encoded(convert("rde_o11.hl7"), "ORD-9001")
    rds = order_and_encoded(convert("rds_o13.hl7"), "ORD-9001")
    assert [mr["id"] for mr in rde] == [mr["id"] for mr in rds]


def test_rds_supplementary_code_is_another_coding_of_the_product():
    data = (FIXTURES / "rds_o13.hl7").read_bytes()
    old = b"|B2024-17|20260131"
    assert old in data
    data = data.replace(old, old + b"||||||197361^Amlodipine 5 MG Oral Tablet^RXNORM")
    conv = convert_bytes(data)
    med = by_ref(conv, one(conv, "MedicationDispense")["medicationReference"])
    # RXD-25 supplementary code: the same product in another code system
    assert codes(med["code"]) == {
        ("http://hl7.org/fhir/sid/ndc", "00069152001"),
        (RXNORM, "197361"),
    }


def test_rds_rxr_after_rxd_goes_to_the_dispense():
    conv = convert("rds_o13.hl7")
    md = one(conv, "MedicationDispense")
    _, encoded = order_and_encoded(conv, "ORD-9001")
    # the RXR after RXE (PO) belongs to the encoded order, the one after RXD (SL) to the dispense
    assert codes(encoded["dosageInstruction"][0]["route"]) == {(V3_ROUTE, "PO")}
    assert md["dosageInstruction"][0]["route"]["coding"][0]["code"] == "SL"
    assert unmapped_segments(conv) == set()


# ------------------------------------------------------------------ SIU^S12..


def siu(event: str = "S12", filler_status: str = "Booked"):
    data = (FIXTURES / "siu_s12.hl7").read_bytes()
    data = data.replace(b"SIU^S12^SIU_S12", f"SIU^{event}^SIU_S12".encode())
    data = data.replace(b"||Booked\rTQ1", f"||{filler_status}\rTQ1".encode())
    return convert_bytes(data)


def test_siu_new_booking_maps_to_appointment():
    conv = siu()
    appt = one(conv, "Appointment")
    assert appt["status"] == "booked"  # SCH-25 Booked
    ids = {i["type"]["coding"][0]["code"]: i["value"] for i in appt["identifier"]}
    assert ids == {"PLAC": "APT-100", "FILL": "FIL-200"}  # SCH-1 / SCH-2
    # TQ1-7/8 → start/end (instants)
    assert appt["start"] == "2024-04-15T10:00:00+01:00"
    assert appt["end"] == "2024-04-15T10:30:00+01:00"
    assert appt["minutesDuration"] == 30  # SCH-9, SCH-10 min
    # SCH-7 (table 0276) → reasonCode via the IG's AppointmentReasonCodes map
    assert codes(appt["reasonCode"][0]) == {("http://snomed.info/sct", "866149003")}
    # SCH-8 (table 0277) → appointmentType
    assert codes(appt["appointmentType"]) == {
        ("http://terminology.hl7.org/CodeSystem/v2-0277", "Normal")
    }
    # AIS-3 → serviceType
    assert codes(appt["serviceType"][0]) == {("http://www.ama-assn.org/go/cpt", "99213")}
    # NTE → the IG's R5 Appointment.note backport extension
    notes = [
        e["valueAnnotation"]["text"]
        for e in appt["extension"]
        if e["url"].endswith("Appointment.note")
    ]
    assert notes == ["Please arrive 10 minutes early"]


def test_siu_participants():
    conv = siu()
    appt = one(conv, "Appointment")
    by_type: dict[str, list[dict]] = {}
    for p in appt["participant"]:
        assert p["status"] in {"accepted", "declined", "tentative", "needs-action"}
        assert "actor" in p or "type" in p
        by_type.setdefault(by_ref(conv, p["actor"])["resourceType"], []).append(p)
    # PID → the patient (IG PID[Appointment])
    (pat,) = by_type["Patient"]
    assert pat["actor"]["reference"] == f"Patient/{one(conv, 'Patient')['id']}"
    # AIG → Device (CWE[Device]) with AIG-4 as participant type
    (dev,) = by_type["Device"]
    assert by_ref(conv, dev["actor"])["identifier"][0]["value"] == "EQ-7"
    assert dev["type"][0]["coding"][0]["code"] == "EQP"
    # AIL → Location with AIL-6 start
    (loc,) = by_type["Location"]
    assert loc["period"]["start"] == "2024-04-15T10:00:00+01:00"
    # SCH-16 filler contact and AIP-3 (AIP-12 Pending → tentative)
    aip = [p for p in by_type["Practitioner"] if "period" in p]
    assert len(aip) == 1 and aip[0]["status"] == "tentative"
    assert aip[0]["type"][0]["coding"][0]["code"] == "ATND"
    contact = [p for p in by_type["Practitioner"] if "period" not in p]
    assert contact[0]["type"] == [{"text": "filler contact"}]


@pytest.mark.parametrize(
    ("event", "filler_status", "expected"),
    [
        ("S13", "Booked", "booked"),  # rescheduled: still booked, at the new time
        ("S14", "Booked", "booked"),
        # SCH-25 (IG FillerStatusCodes[Appointment]); the fixture's AIS-10 still says Booked
        ("S15", "Cancelled", "cancelled"),
        ("S15", "", "cancelled"),  # no SCH-25: the event says it
        ("S16", "Dc", "cancelled"),  # Dc has no FHIR code in the IG map: the event decides
        ("S17", "Deleted", "entered-in-error"),
        ("S17", "", "entered-in-error"),
        ("S26", "Noshow", "noshow"),
        ("S12", "Complete", "fulfilled"),  # SCH-25 wins over the event
    ],
)
def test_siu_status(event, filler_status, expected):
    conv = siu(event, filler_status)
    assert conv.report["message"]["rules"] == f"messages/SIU_{event}.yaml"
    assert one(conv, "Appointment")["status"] == expected


def test_siu_untranslatable_filler_status_is_reported():
    conv = siu("S16", "Dc")
    assert {
        "field": "SCH-25.1",
        "code": "Dc",
        "map": "FillerStatusCodes-Appointment",
    } in conv.report["untranslated_codes"]


# ------------------------------------------------------------------ corpus


@pytest.mark.parametrize(
    "name",
    [
        "RDE-O11-01", "RDE-O11-02", "RDE-O25-02", "RDS-O13-01", "RDS-O13-02", "VXU-V04-01", "VXU-V04-02",
        "SIU-S12-02", "SIU-S12_1", "SIU-S13-01", "SIU-S13-02", "SIU-S14-02", "SIU-S15-01", "SIU-S15-02",
        "SIU-S16-02", "SIU-S17-01", "SIU-S17-02", "SIU-S26-02",
    ],
)  # fmt: skip
def test_corpus_messages_convert_cleanly(name, corpus):
    samples = corpus / "microsoft-fhir-converter" / "data" / "SampleData" / "Hl7v2"
    conv = convert_bytes((samples / f"{name}.hl7").read_bytes())
    family = {
        "RDE": "MedicationRequest",
        "RDS": "MedicationDispense",
        "VXU": "Immunization",
        "SIU": "Appointment",
    }
    assert resources(conv, family[name[:3]])
    # every segment the IG (or our rules) maps is mapped; what is left is known
    assert unmapped_segments(conv) <= {"RGS", "PRT", "RXC", "CDO", "BLG", "CTI", "IN2", "TQ1"}
