"""bench/_compare.py and bench/conformance.py on C-CDA sources: new specs, C rules, kinds.

Tiny hand-written Bundles and documents only (no corpus): fast and self-explaining.
"""

from __future__ import annotations

import base64
import gzip
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.bench_module import load_bench

C = load_bench("_compare")


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    """A batch Bundle holding the given resources."""
    return {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"fullUrl": f"urn:uuid:{r.get('id', n)}", "resource": r}
            for n, r in enumerate(resources)
        ],
    }


def cda(*body: str, doc_id: str = '<id root="2.16.840.1.113883.19.5" extension="TT1"/>') -> bytes:
    """A minimal C-CDA document (namespaced, as real ones are) holding the given entries."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<ClinicalDocument xmlns="urn:hl7-org:v3">'
        f"{doc_id}<effectiveTime value='20130815103000-0800'/>"
        "<component><structuredBody><component><section>"
        + "".join(f"<entry>{b}</entry>" for b in body)
        + "</section></component></structuredBody></component></ClinicalDocument>"
    ).encode()


def outcomes(result: Any, status: str) -> list[tuple[str, str | None]]:
    """(path, rule) of the outcomes with this status."""
    return [(o.path, o.rule) for o in result.outcomes if o.status == status]


# ------------------------------------------------------------------------------ kinds


def test_kind_is_sniffed_from_the_source() -> None:
    assert C.sniff_kind(b"MSH|^~\\&|A") == "hl7v2"
    assert C.sniff_kind(None) == "hl7v2"
    assert C.sniff_kind(b"\xef\xbb\xbf  <?xml version='1.0'?><ClinicalDocument/>") == "ccda"
    parsed = C._parse_source(cda(), None)
    assert isinstance(parsed, C.CdaSource)
    assert parsed.root.tag == "ClinicalDocument"  # namespace stripped
    assert parsed.root.find("id").get("extension") == "TT1"


def test_xml_source_never_reaches_the_hl7v2_rules() -> None:
    """Resources that HL7 v2 rules look at (RF1, RXD, SCH, GT1 …) with an XML source."""
    exp = bundle(
        {"resourceType": "ServiceRequest", "code": {"coding": [{"code": "X"}]}},
        {
            "resourceType": "MedicationDispense",
            "medicationCodeableConcept": {"coding": [{"code": "M"}]},
        },
        {
            "resourceType": "Patient",
            "identifier": [{"value": "MRN-1", "system": "urn:oid:1.2.3"}],
            "name": [{"family": "Doe", "given": ["Jan"]}],
        },
        {
            "resourceType": "AllergyIntolerance",
            "code": {"coding": [{"code": "7980"}]},
            "reaction": [{"onset": "2008-02-26"}],
        },
        {"resourceType": "DocumentReference", "docStatus": "preliminary"},
    )
    result = C.compare_bundles(exp, exp, source=cda())
    assert result.excluded == 0  # no D rule fired (D8 would take reaction.onset for HL7 v2)
    assert result.score == 100.0
    # The same bundles scored as HL7 v2 (no message known): D8 excludes reaction.onset.
    as_v2 = C.compare_bundles(exp, exp)
    assert ("AllergyIntolerance.reaction.onset", "D8") in outcomes(as_v2, "excluded")


def test_rule_d19_no_longer_needs_a_parsed_message() -> None:
    """D19 read ctx.source.segments even when there was no message (AttributeError)."""
    exp = bundle(
        {
            "resourceType": "MedicationDispense",
            "medicationCodeableConcept": {"coding": [{"code": "M"}]},
        }
    )
    assert C.compare_bundles(exp, exp).score == 100.0


def test_practitioner_and_co_are_compared_for_ccda_only_by_default() -> None:
    exp = bundle(
        {"resourceType": "Practitioner", "name": [{"family": "Seven", "given": ["Henry"]}]},
        {"resourceType": "Organization", "name": "Good Health Clinic"},
        {"resourceType": "Location", "name": "Urgent Care"},
    )
    empty = bundle()
    assert C.compare_bundles(exp, empty, kind="hl7v2").compared == 0
    ccda = C.compare_bundles(exp, empty, kind="ccda")
    assert ccda.compared == 7 and ccda.agreed == 0  # 3 counts, family, given, 2 names
    assert C.compare_bundles(exp, empty, kind="hl7v2", types=C.SPECS).compared == 7
    assert "Practitioner" not in C.default_types("hl7v2")
    assert set(C.default_types("ccda")) == set(C.SPECS)


# ------------------------------------------------------------------------------ specs


def medication(rid: str, code: str) -> dict[str, Any]:
    """A Medication with one RxNorm code."""
    rxnorm = "http://www.nlm.nih.gov/research/umls/rxnorm"
    return {
        "resourceType": "Medication",
        "id": rid,
        "code": {"coding": [{"system": rxnorm, "code": code}]},
    }


def test_medication_statement_is_compared_by_the_referenced_medication_code() -> None:
    rxnorm = "http://www.nlm.nih.gov/research/umls/rxnorm"
    exp = bundle(
        medication("m1", "573621"),
        {
            "resourceType": "MedicationStatement",
            "id": "s1",
            "status": "active",
            "medicationReference": {"reference": "Medication/m1"},
            "effectivePeriod": {"start": "2012-08-15"},
            "dosage": [{"doseAndRate": [{"doseQuantity": {"value": 2, "unit": "Puffs"}}]}],
        },
    )
    inline = {
        "resourceType": "MedicationStatement",
        "id": "x",
        "status": "active",
        "medicationCodeableConcept": {"coding": [{"system": rxnorm, "code": "573621"}]},
        "effectivePeriod": {"start": "2012-08-15T09:00:00-05:00"},
        "dosage": [{"doseAndRate": [{"doseQuantity": {"value": 2.0, "unit": "Puffs"}}]}],
    }
    act = bundle(medication("other-id", "573621"), inline)
    result = C.compare_bundles(exp, act, kind="ccda")
    assert result.score == 100.0
    paths = {o.path for o in result.outcomes}
    assert {
        "MedicationStatement.medication",
        "MedicationStatement.status",
        "MedicationStatement.effectivePeriod.start",
        "MedicationStatement.dosage.doseAndRate.doseQuantity.value",
    } <= paths
    wrong = dict(inline, medicationCodeableConcept={"coding": [{"system": rxnorm, "code": "1"}]})
    result = C.compare_bundles(exp, bundle(medication("m", "573621"), wrong), kind="ccda")
    assert ("MedicationStatement.medication", None) in outcomes(result, "disagree")


def test_family_member_history_born_and_conditions() -> None:
    sct = "http://snomed.info/sct"

    def fmh(born: dict[str, Any], codes: list[str]) -> dict[str, Any]:
        return {
            "resourceType": "FamilyMemberHistory",
            "status": "completed",
            "relationship": {"coding": [{"code": "FTH"}]},
            **born,
            "condition": [
                {"code": {"coding": [{"system": sct, "code": c}]}, "onsetAge": {"value": 57}}
                for c in codes
            ],
        }

    exp = bundle(fmh({"bornString": "1910"}, ["22298006", "44054006"]))
    act = bundle(fmh({"bornDate": "1910"}, ["44054006", "22298006"]))
    result = C.compare_bundles(exp, act, kind="ccda")
    assert result.score == 100.0
    assert sum(o.path == "FamilyMemberHistory.condition.code" for o in result.outcomes) == 2
    assert any(o.path == "FamilyMemberHistory.born" for o in result.outcomes)


def test_composition_section_codes_are_a_multiset() -> None:
    loinc = "http://loinc.org"

    def comp(*sections: str) -> dict[str, Any]:
        return {
            "resourceType": "Composition",
            "status": "final",
            "type": {"coding": [{"system": loinc, "code": "34133-9"}]},
            "date": "2013-08-15T10:30:00-08:00",
            "title": "Patient Chart Summary",
            "section": [{"code": {"coding": [{"system": loinc, "code": s}]}} for s in sections],
        }

    exp = bundle(comp("48765-2", "10160-0", "11450-4"))
    result = C.compare_bundles(exp, bundle(comp("11450-4", "48765-2")), kind="ccda")
    section = [o for o in result.outcomes if o.path == "Composition.section.code"]
    assert [o.status for o in section].count("agree") == 2
    assert [o.status for o in section].count("disagree") == 1
    assert result.compared == 1 + 4 + 3  # count, type/status/date/title, three sections


# ------------------------------------------------------------------------------ C rules


def immunization(status: str = "completed") -> dict[str, Any]:
    """An Immunization made from substanceAdministration e6f1…, CVX 103, 1998-12-15."""
    return {
        "resourceType": "Immunization",
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": "urn:uuid:e6f1ba43-0000"}],
        "status": status,
        "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "103"}]},
        "occurrenceDateTime": "1998-12-15",
    }


def sbadm(negated: bool, code: str = "103") -> str:
    """An Immunization Activity entry."""
    return (
        f'<substanceAdministration classCode="SBADM" moodCode="EVN" '
        f'negationInd="{str(negated).lower()}"><id root="e6f1ba43-0000"/>'
        '<statusCode code="completed"/><effectiveTime value="19981215"/>'
        "<consumable><manufacturedProduct><manufacturedMaterial>"
        f'<code code="{code}" codeSystem="2.16.840.1.113883.12.292"/>'
        "</manufacturedMaterial></manufacturedProduct></consumable></substanceAdministration>"
    )


def test_c7_completed_status_of_a_negated_immunization_is_excluded() -> None:
    exp = bundle(immunization())
    act = bundle(immunization("not-done"))
    # Two entries share the id (as in the samples): the vaccine code picks the negated one.
    negated = C.compare_bundles(exp, act, source=cda(sbadm(False, "88"), sbadm(True)))
    assert ("Immunization.status", "C7") in outcomes(negated, "excluded")
    assert negated.score == 100.0
    given = C.compare_bundles(exp, act, source=cda(sbadm(True, "88"), sbadm(False)))
    assert ("Immunization.status", None) in outcomes(given, "disagree")
    # 'completed' means something else for a FamilyMemberHistory: never excluded.
    fmh = {
        "resourceType": "FamilyMemberHistory",
        "identifier": [{"value": "urn:uuid:e6f1ba43-0000"}],
        "status": "completed",
    }
    negated_entry = '<observation negationInd="true"><id root="e6f1ba43-0000"/></observation>'
    result = C.compare_bundles(bundle(fmh), bundle(), source=cda(negated_entry))
    assert ("FamilyMemberHistory.status", None) in outcomes(result, "disagree")


def test_c3_document_identifier_root_without_its_extension_is_excluded() -> None:
    comp = {"resourceType": "Composition", "identifier": {"value": "2.16.840.1.113883.19.5"}}
    result = C.compare_bundles(bundle(comp), bundle(), source=cda())
    assert ("Composition.identifier.value", "C3") in outcomes(result, "excluded")
    root_only = cda(doc_id='<id root="2.16.840.1.113883.19.5"/>')
    result = C.compare_bundles(bundle(comp), bundle(), source=root_only)
    assert ("Composition.identifier.value", None) in outcomes(result, "disagree")


def test_c4_uuid_urn_around_an_oid_is_excluded_but_a_real_uuid_is_compared() -> None:
    org = {
        "resourceType": "Organization",
        "name": "Community Health",
        "identifier": [
            {"system": "urn:ietf:rfc:3986", "value": "urn:uuid:2.16.840.1.113883.19.5"},
            {"system": "urn:ietf:rfc:3986", "value": "urn:uuid:c2ee9ee9-ae31-4628-a919-fec1cbb5"},
        ],
    }
    result = C.compare_bundles(bundle(org), bundle(), source=cda())
    assert ("Organization.identifier.value", "C4") in outcomes(result, "excluded")
    assert ("Organization.identifier.value", None) in outcomes(result, "disagree")
    # C rules are C-CDA rules: the same value in an HL7 v2 comparison is compared.
    as_v2 = C.compare_bundles(bundle(org), bundle(), kind="hl7v2", types=C.SPECS)
    assert not outcomes(as_v2, "excluded")


def test_c5_oid_code_system_keeps_the_code_compared() -> None:
    def related(system: str) -> dict[str, Any]:
        return {
            "resourceType": "RelatedPerson",
            "relationship": [{"coding": [{"system": system, "code": "GRFTH"}]}],
        }

    exp = bundle(related("urn:oid:2.16.840.1.113883.5.111"))
    act = bundle(related("http://terminology.hl7.org/CodeSystem/v3-RoleCode"))
    result = C.compare_bundles(exp, act, source=cda())
    assert ("RelatedPerson.relationship.system", "C5") in outcomes(result, "excluded")
    assert ("RelatedPerson.relationship", None) in outcomes(result, "agree")
    wrong = bundle(related("http://terminology.hl7.org/CodeSystem/v3-RoleCode"))
    wrong["entry"][0]["resource"]["relationship"][0]["coding"][0]["code"] = "FTH"
    result = C.compare_bundles(exp, wrong, source=cda())
    assert ("RelatedPerson.relationship", None) in outcomes(result, "disagree")


def test_c6_cpt_encounter_class_is_excluded_act_code_is_compared() -> None:
    def enc(system: str, code: str) -> dict[str, Any]:
        return {"resourceType": "Encounter", "class": {"system": system, "code": code}}

    cpt = C.compare_bundles(
        bundle(enc("http://www.ama-assn.org/go/cpt", "99213")), bundle(), source=cda()
    )
    assert ("Encounter.class", "C6") in outcomes(cpt, "excluded")
    amb = C.compare_bundles(bundle(enc(C.V3_ACT_CODE, "AMB")), bundle(), source=cda())
    assert ("Encounter.class", None) in outcomes(amb, "disagree")


def test_c1_c2_whole_document_reference_run_date_and_gzip_content_type() -> None:
    gz = base64.b64encode(gzip.compress(b"<ClinicalDocument/>")).decode()
    plain = base64.b64encode(b"hello").decode()

    def docref(date: str, data: str) -> dict[str, Any]:
        return {
            "resourceType": "DocumentReference",
            "status": "current",
            "date": date,
            "content": [{"attachment": {"contentType": "text/plain", "data": data}}],
        }

    run_time = C.compare_bundles(bundle(docref("2022-04-22T05:35:40Z", gz)), bundle(), source=cda())
    excluded = outcomes(run_time, "excluded")
    assert ("DocumentReference.date", "C1") in excluded
    assert ("DocumentReference.content.attachment.contentType", "C2") in excluded
    # A date the document holds, and text/plain over plain text, are compared.
    honest = C.compare_bundles(
        bundle(docref("2013-08-15T10:30:00-08:00", plain)), bundle(), source=cda()
    )
    assert not outcomes(honest, "excluded")


def test_c_rules_are_all_ccda_only_and_d_rules_hl7v2_only() -> None:
    for rule in C.DELIBERATE:
        expected = ("ccda",) if rule.rule_id.startswith("C") else ("hl7v2",)
        assert rule.kinds == expected, rule.rule_id


# ------------------------------------------------------------------------------ script


def test_script_scores_each_kind_apart_and_reports_a_missing_ccda_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conformance = load_bench("conformance")
    monkeypatch.setitem(sys.modules, "fhirtwin.ccda", None)  # import raises ImportError
    (tmp_path / "d.ccda").write_bytes(cda())
    (tmp_path / "e.json").write_text(
        json.dumps(bundle({"resourceType": "Patient", "gender": "male"})), encoding="utf-8"
    )
    (tmp_path / "pairs.csv").write_text(
        "kind,input,expected_output,produced_by,root_template_or_label\n"
        "ccda,d.ccda,e.json,x,CCD\n"
        "fhir-to-hl7v2,e.json,m.hl7,x,ObservationBundle\n",
        encoding="utf-8",
    )
    out = tmp_path / "out.json"
    base = ["--pairs", str(tmp_path / "pairs.csv"), "--root", str(tmp_path), "--json", str(out)]
    assert conformance.main([*base, "--kind", "ccda"]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    (pair,) = data["pairs"]
    assert pair["kind"] == "ccda" and "cannot import fhirtwin.ccda" in pair["error"]
    assert data["by_kind"]["ccda"]["overall"]["errors"] == 1
    assert data["by_kind"]["ccda"]["overall"]["compared"] == 2  # count:Patient, gender
    assert {e["rule"] for e in data["by_kind"]["ccda"]["excluded"]} == {
        f"C{n}" for n in range(1, 15)
    }
    # The default run takes every kind it can convert, each reported on its own.
    assert conformance.main([*base, "--against-expected", "--min-score", "100"]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["kinds"] == ["ccda"] and data["by_kind"]["ccda"]["overall"]["score"] == 100.0
