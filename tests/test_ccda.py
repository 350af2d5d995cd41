"""C-CDA → FHIR R4 (fhirtwin.ccda, rules in mappings/ccda/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fhirtwin import ccda
from fhirtwin.bus import Record
from fhirtwin.cli import app
from fhirtwin.normalize import SourceError
from fhirtwin.validation import validate_bundle

FIXTURE = Path(__file__).parent / "fixtures" / "ccda" / "small-ccd.xml"


def _resources(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


@pytest.fixture(scope="module")
def bundle() -> dict[str, Any]:
    return ccda.convert(FIXTURE.read_bytes(), source=FIXTURE.name, validate=True)


def test_document_becomes_valid_batch_bundle_with_composition_first(bundle: dict) -> None:
    assert bundle["type"] == "batch"
    assert validate_bundle(bundle) == []
    first = bundle["entry"][0]["resource"]
    assert first["resourceType"] == "Composition"
    assert first["title"] == "Test CCD"
    assert first["date"] == "2024-03-01T10:30:00-05:00"
    titles = [s["title"] for s in first["section"]]
    assert titles == ["PROBLEMS", "ALLERGIES", "VITAL SIGNS", "MEDICATIONS", "IMMUNIZATIONS"]
    problems = first["section"][0]
    conditions = {f"Condition/{c['id']}" for c in _resources(bundle, "Condition")}
    assert {e["reference"] for e in problems["entry"]} == conditions
    assert problems["text"]["div"].startswith('<div xmlns="http://www.w3.org/1999/xhtml">')
    assert '<li id="prob1">Essential hypertension</li>' in problems["text"]["div"]
    for entry in bundle["entry"]:
        res = entry["resource"]
        assert entry["request"] == {"method": "PUT", "url": f"{res['resourceType']}/{res['id']}"}


def test_patient_header(bundle: dict) -> None:
    (patient,) = _resources(bundle, "Patient")
    assert {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "999-00-1234"} in patient[
        "identifier"
    ]
    assert {"system": "urn:oid:2.16.840.1.113883.19.5", "value": "MRN-7"} in patient["identifier"]
    assert patient["name"] == [{"use": "usual", "family": "Tester", "given": ["Ada", "Q"]}]
    assert patient["gender"] == "female"
    assert patient["birthDate"] == "1970-02-15"
    assert patient["telecom"] == [{"system": "phone", "value": "+1(555)555-0100", "use": "mobile"}]
    assert patient["communication"][0]["language"]["coding"][0]["code"] == "en"
    race = next(e for e in patient["extension"] if e["url"].endswith("us-core-race"))
    assert {"url": "ombCategory", "valueCoding": {
        "system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3", "display": "White"}
    } in race["extension"]  # fmt: skip
    ethnicity = next(e for e in patient["extension"] if e["url"].endswith("us-core-ethnicity"))
    omb = ethnicity["extension"][0]["valueCoding"]
    assert omb["code"] == "ASKU" and omb["system"].endswith("v3-NullFlavor")
    (guardian,) = _resources(bundle, "RelatedPerson")
    assert guardian["patient"] == {"reference": f"Patient/{patient['id']}"}
    assert patient["link"] == [{"other": {"reference": f"RelatedPerson/{guardian['id']}"},
                                "type": "seealso"}]  # fmt: skip


def test_problem_with_translation_and_narrative_text(bundle: dict) -> None:
    htn = next(
        c for c in _resources(bundle, "Condition") if c["code"]["coding"][0]["code"] == "59621000"
    )
    assert htn["code"]["coding"][1] == {
        "system": "http://hl7.org/fhir/sid/icd-10-cm",
        "code": "I10",
        "display": "Essential (primary) hypertension",
    }
    assert htn["code"]["text"] == "Essential hypertension"  # from the narrative reference
    assert htn["clinicalStatus"]["coding"][0]["code"] == "active"
    assert htn["verificationStatus"]["coding"][0]["code"] == "confirmed"
    assert htn["onsetDateTime"] == "2020-01-01"
    assert htn["category"][0]["coding"][0]["code"] == "problem-list-item"


def test_negated_problem_is_refuted(bundle: dict) -> None:
    asthma = next(
        c for c in _resources(bundle, "Condition") if c["code"]["coding"][0]["code"] == "195967001"
    )
    assert asthma["verificationStatus"]["coding"][0]["code"] == "refuted"
    assert "clinicalStatus" not in asthma


def test_no_known_allergies(bundle: dict) -> None:
    (allergy,) = _resources(bundle, "AllergyIntolerance")
    assert allergy["code"]["coding"][0]["code"] == "716186003"
    assert allergy["verificationStatus"]["coding"][0]["code"] == "confirmed"


def test_blood_pressure_has_components_and_members(bundle: dict) -> None:
    obs = _resources(bundle, "Observation")
    (bp,) = [o for o in obs if o["code"]["coding"][0]["code"] == "85354-9"]
    values = {c["code"]["coding"][0]["code"]: c["valueQuantity"]["value"] for c in bp["component"]}
    assert values == {"8480-6": 132, "8462-4": 88}
    assert bp["effectiveDateTime"] == "2024-03-01T10:15:00-05:00"
    members = {o["id"] for o in obs if o["code"]["coding"][0]["code"] in ("8480-6", "8462-4")}
    assert {m["reference"].split("/")[1] for m in bp["hasMember"]} == members
    systolic = next(o for o in obs if o["code"]["coding"][0]["code"] == "8480-6")
    assert systolic["valueQuantity"] == {
        "value": 132,
        "unit": "mm[Hg]",
        "system": "http://unitsofmeasure.org",
        "code": "mm[Hg]",
    }
    assert systolic["interpretation"][0]["coding"][0]["code"] == "H"


def test_medication_with_period_and_timing(bundle: dict) -> None:
    (statement,) = _resources(bundle, "MedicationStatement")
    (med,) = _resources(bundle, "Medication")
    assert statement["status"] == "active"
    assert statement["medicationReference"] == {"reference": f"Medication/{med['id']}"}
    assert med["code"]["coding"][0]["system"] == "http://www.nlm.nih.gov/research/umls/rxnorm"
    # an IVL_TS with a low alone is "taking since", not a point in time
    assert statement["effectivePeriod"] == {"start": "2023-01-01"}
    dosage = statement["dosage"][0]
    assert dosage["timing"]["repeat"]["period"] == 24
    assert dosage["timing"]["repeat"]["periodUnit"] == "h"
    assert dosage["route"]["coding"][0]["code"] == "C38288"


def test_refused_immunization_is_not_done(bundle: dict) -> None:
    (imm,) = _resources(bundle, "Immunization")
    assert imm["status"] == "not-done"
    assert imm["statusReason"]["coding"][0]["code"] == "PATOBJ"
    assert imm["vaccineCode"]["coding"][0] == {
        "system": "http://hl7.org/fhir/sid/cvx",
        "code": "88",
        "display": "Influenza virus vaccine",
    }


def test_original_document_is_kept_in_document_reference(bundle: dict) -> None:
    docref = next(d for d in _resources(bundle, "DocumentReference") if d.get("masterIdentifier"))
    assert docref["masterIdentifier"] == {
        "system": "urn:oid:2.16.840.1.113883.19.5.99999.1",
        "value": "DOC-42",
    }
    import base64

    assert base64.b64decode(docref["content"][0]["attachment"]["data"]) == FIXTURE.read_bytes()


def test_ids_are_stable_across_documents() -> None:
    """The same problem in next month's document updates the same resource."""
    data = FIXTURE.read_bytes()
    later = data.replace(b'extension="DOC-42"', b'extension="DOC-43"')
    ids_a = {e["resource"]["id"] for e in ccda.convert(data)["entry"]}
    ids_b = {e["resource"]["id"] for e in ccda.convert(later)["entry"]}
    shared = ids_a & ids_b
    conds = {c["id"] for c in _resources(ccda.convert(data), "Condition")}
    assert conds <= shared
    assert ids_a != ids_b  # the Composition and DocumentReference are the new document's


def test_bad_timestamp_is_left_out_and_reported() -> None:
    data = FIXTURE.read_bytes().replace(b'<low value="20200101"/>', b'<low value="202013"/>')
    warnings: list[dict[str, Any]] = []
    out = ccda.convert(data, validate=True, warnings=warnings)
    assert out["entry"]
    assert len(warnings) == 1
    w = warnings[0]
    assert "202013" in w["warning"] and w["line"] > 1
    assert w["xpath"].startswith("/ClinicalDocument/component/structuredBody/component[1]")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b'<raceCode code="2106-3"', b'<raceCode code=" "'),  # a code of blanks
        (b'<telecom value="tel:+1(555)555-0101"', b'<telecom value="  "'),  # a blank telecom
    ],
)
def test_blank_codes_and_telecoms_are_absent_not_invalid(old: bytes, new: bytes) -> None:
    data = FIXTURE.read_bytes()
    assert data.count(old) == 1
    out = ccda.convert(data.replace(old, new), validate=True)  # raises if R4 rejects it
    flat = json.dumps(out)
    assert '"code": " "' not in flat and '"value": "  "' not in flat


@pytest.mark.parametrize("number", [b"nan", b"inf", b"1e999", b"132 mmHg"])
def test_a_quantity_no_fhir_decimal_holds_is_left_out_and_reported(number: bytes) -> None:
    """Like an unreadable timestamp: the systolic value is left out with its line and
    XPath, and the rest of the document (the Observation itself included) converts."""
    data = FIXTURE.read_bytes().replace(
        b'value="132" unit="mm[Hg]"', b'value="%s" unit="mm[Hg]"' % number
    )
    warnings: list[dict[str, Any]] = []
    out = ccda.convert(data, source="doc.xml", validate=True, warnings=warnings)
    (said,) = warnings
    assert said["warning"] == (
        f"bad quantity value {number.decode()!r} left out: not a decimal number"
    )
    assert said["line"] == 144 and said["xpath"].endswith("/observation/value")
    (systolic,) = [o for o in _resources(out, "Observation") if "8480-6" in json.dumps(o["code"])]
    assert "valueQuantity" not in systolic


def test_a_required_value_left_out_names_the_document_not_the_rules() -> None:
    """The document's effectiveTime is Composition.date (1..1): unreadable, it is left out,
    and the document is refused (with validation or without: the Composition is the
    document), naming the document's value, with its line and XPath."""
    data = FIXTURE.read_bytes().replace(
        b'<effectiveTime value="20240301103000-0500"/>', b'<effectiveTime value="20240230"/>'
    )
    for validate in (True, False):
        with pytest.raises(ccda.CcdaError) as info:
            ccda.convert(data, source="doc.xml", validate=validate)
        msg = str(info.value)
        assert msg.startswith("doc.xml:3 (/ClinicalDocument): Composition/")
        assert "has no date, which FHIR R4 requires" in msg
        assert "line 11, /ClinicalDocument/effectiveTime" in msg and "'20240230'" in msg
        assert "fix the document" in msg


@pytest.mark.parametrize(
    ("cut", "rtype", "missing"),
    [
        # a vital sign whose code is gone (and with it the panel, which needs both)
        (b'<code code="8480-6" codeSystem="2.16.840.1.113883.6.1" displayName="Systolic blood '
         b'pressure"/>', "Observation", "code"),
        # a medication whose product names nothing
        (b'<manufacturedMaterial><code code="314076" codeSystem="2.16.840.1.113883.6.88" '
         b'displayName="lisinopril 10 MG Oral Tablet"/></manufacturedMaterial>',
         "MedicationStatement", "medication[x]"),
    ],
)  # fmt: skip
def test_an_entry_without_what_fhir_requires_is_left_out_and_reported(
    cut: bytes, rtype: str, missing: str
) -> None:
    """Like an unreadable value, an entry that cannot make a valid resource costs that
    entry, not the document: left out, with its line and XPath, and nothing refers to it."""
    data = FIXTURE.read_bytes()
    assert data.count(cut) == 1
    whole = ccda.convert(data, validate=True)
    warnings: list[dict[str, Any]] = []
    for validate in (False, True):
        warnings.clear()
        out = ccda.convert(data.replace(cut, b""), validate=validate, warnings=warnings)
        assert validate_bundle(out) == []
        assert len(_resources(out, rtype)) < len(_resources(whole, rtype))
        said = [w for w in warnings if f"{rtype} left out" in w["warning"]]
        assert len(said) == 1, warnings
        assert said[0]["warning"] == (
            f"{rtype} left out: it has no {missing}, which FHIR R4 requires; add it to this "
            "entry of the document"
        )
        assert said[0]["line"] > 11 and "/entry" in said[0]["xpath"]
        kept = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in out["entry"]}
        refs = {v for v in _references(out) if v.split("/")[0] == rtype}
        assert refs <= kept  # no reference to what was left out


def _references(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        own = [obj["reference"]] if isinstance(obj.get("reference"), str) else []
        return own + [r for v in obj.values() for r in _references(v)]
    if isinstance(obj, list):
        return [r for v in obj for r in _references(v)]
    return []


def test_a_problem_without_a_coded_value_keeps_its_text() -> None:
    # Condition.code falls back to the entry's text: a CodeableConcept's text, never a
    # bare string (which the models reject and which, with validation off, was kept).
    data = FIXTURE.read_bytes()
    value = data[data.index(b'<value xsi:type="CD" code="195967001"') :]
    value = value[: value.index(b"/>") + 2]
    out = ccda.convert(
        data.replace(value, b"<text>Asthma, as the patient put it</text>"), validate=True
    )
    texts = [c["code"] for c in _resources(out, "Condition") if "coding" not in c["code"]]
    assert texts == [{"text": "Asthma, as the patient put it"}]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'aaa'>]><ClinicalDocument/>", "DOCTYPE"),
        (
            b'<!DOCTYPE x SYSTEM "http://example.org/evil.dtd"><ClinicalDocument/>',
            "DOCTYPE",
        ),
        (b"<ClinicalDocument xmlns='urn:hl7-org:v3'><id>", "not well-formed XML"),
        (b"<Bundle xmlns='http://hl7.org/fhir'/>", "not ClinicalDocument"),
    ],
)
def test_bad_input_gets_a_clear_error(data: bytes, expected: str) -> None:
    with pytest.raises(ccda.CcdaError) as info:
        ccda.convert(data, source="bad.xml")
    assert expected in str(info.value)
    assert str(info.value).startswith("bad.xml")


def test_oversized_document_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ccda, "MAX_BYTES", 1000)
    with pytest.raises(ccda.CcdaError, match="over the 1,000-byte limit"):
        ccda.convert(FIXTURE.read_bytes())


def test_undeclared_prefixes_are_declared_with_a_warning() -> None:
    data = FIXTURE.read_bytes().replace(
        b' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"', b""
    )
    warnings: list[dict[str, Any]] = []
    out = ccda.convert(data, validate=True, warnings=warnings)
    assert _resources(out, "Condition")
    assert any("xsi" in w["warning"] for w in warnings)


def test_rules_errors_name_file_and_rule(tmp_path: Path) -> None:
    import shutil

    root = Path(__file__).resolve().parents[1] / "mappings"
    shutil.copytree(root / "ccda", tmp_path / "ccda")
    bad = tmp_path / "ccda" / "rules" / "zz-bad.yaml"
    bad.write_text(
        "rules:\n  - name: broken\n    resource: Observation\n    template: 1.2.3\n"
        "    elements:\n      code: {make: no-such-rule, path: code}\n"
    )
    with pytest.raises(ccda.RulesError, match=r"zz-bad\.yaml: rule 'broken'.*no-such-rule"):
        ccda.load_rules(tmp_path)


def test_cli_writes_one_bundle_per_document(tmp_path: Path) -> None:
    second = tmp_path / "in" / "second.ccda"
    second.parent.mkdir()
    second.write_bytes(FIXTURE.read_bytes().replace(b"DOC-42", b"DOC-2"))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["convert", "--from", "ccda", str(FIXTURE), str(second.parent), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["second.json", "small-ccd.json"]
    bundle = json.loads((out / "small-ccd.json").read_bytes())
    assert validate_bundle(bundle) == []
    assert "2 document(s) converted, 0 failed" in result.output


def test_cli_reports_a_bad_document_and_goes_on(tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_bytes(b"<ClinicalDocument xmlns='urn:hl7-org:v3'><oops></ClinicalDocument>")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["convert", "--from", "ccda", str(bad), str(FIXTURE), "--out", str(out)]
    )
    assert result.exit_code == 1
    assert "bad.xml:1" in result.output and "not well-formed XML" in result.output
    assert (out / "small-ccd.json").exists()


def _record(value: bytes) -> Record:
    return Record("ehr.ccda", 0, 7, 0, None, value, (("fhirtwin-filename", b"doc.xml"),))


def test_pipeline_plugin_converts_a_document() -> None:
    (unit,) = ccda.convert_record(_record(FIXTURE.read_bytes()), True, None)
    types = {r["resourceType"] for r in unit.resources}
    assert {"Patient", "Composition", "Condition", "Observation"} <= types
    assert unit.control_id == "DOC-42"
    assert unit.event_ms == 1709307000000  # 2024-03-01T10:30:00-05:00


def test_pipeline_plugin_raises_source_error_with_location() -> None:
    with pytest.raises(SourceError) as info:
        ccda.convert_record(_record(b"<ClinicalDocument xmlns='urn:hl7-org:v3'><x>"), True, None)
    assert info.value.stage == "parse"
    assert info.value.error["file"] == "doc.xml"
    assert "line" in info.value.error


_NO_PATIENT = b"""<ClinicalDocument xmlns="urn:hl7-org:v3">
  <id root="2.16.840.1.113883.19.5" extension="stub-7"/>
  <code code="34133-9" codeSystem="2.16.840.1.113883.6.1"/>
  <component><structuredBody><component><section>
    <code code="11450-4" codeSystem="2.16.840.1.113883.6.1"/>
    <entry><act classCode="ACT" moodCode="EVN">
      <templateId root="2.16.840.1.113883.10.20.22.4.3"/>
      <id root="c1b1b7a0-0000-4000-8000-0000000000a1"/>
      <code code="CONC" codeSystem="2.16.840.1.113883.5.6"/>
      <statusCode code="active"/>
      <entryRelationship typeCode="SUBJ"><observation classCode="OBS" moodCode="EVN">
        <templateId root="2.16.840.1.113883.10.20.22.4.4"/>
        <id root="c1b1b7a0-0000-4000-8000-0000000000a2"/>
        <code code="55607006" codeSystem="2.16.840.1.113883.6.96"/>
        <statusCode code="completed"/>
        <value xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="CD"
               code="38341003" codeSystem="2.16.840.1.113883.6.96" displayName="Hypertension"/>
      </observation></entryRelationship>
    </act></entry>
  </section></component></structuredBody></component>
</ClinicalDocument>"""


def test_document_without_patient_converts_about_a_placeholder_that_says_so() -> None:
    """The IG's example stubs name no patient and no time: their content still converts,
    R4B-valid, about one Patient per document that identifies nobody and is tagged so,
    and the conversion says what it assumed."""
    warnings: list[dict[str, Any]] = []
    out = ccda.convert(_NO_PATIENT, source="stub.xml", validate=True, warnings=warnings)
    (patient,) = _resources(out, "Patient")
    assert patient["meta"]["tag"] == [ccda.UNIDENTIFIED]
    assert set(patient) == {"resourceType", "id", "meta"}  # no identity is invented
    (condition,) = _resources(out, "Condition")
    assert condition["subject"] == {"reference": f"Patient/{patient['id']}"}
    assert condition["code"]["coding"][0]["code"] == "38341003"
    (comp,) = _resources(out, "Composition")
    assert comp["subject"] == {"reference": f"Patient/{patient['id']}"}
    assert "date" not in comp
    assert comp["_date"]["extension"][0]["valueCode"] == "unknown"
    (note,) = [w for w in warnings if "recordTarget" in w["warning"]]
    assert patient["id"] in note["warning"] and note["xpath"] == "/ClinicalDocument"
    # the same document twice: the same placeholder; another document: another one
    again = ccda.convert(_NO_PATIENT, source="stub.xml")
    assert _resources(again, "Patient")[0]["id"] == patient["id"]
    other = ccda.convert(_NO_PATIENT.replace(b"stub-7", b"stub-8"), source="stub.xml")
    assert _resources(other, "Patient")[0]["id"] != patient["id"]


def test_cli_converts_a_document_without_patient_and_warns(tmp_path: Path) -> None:
    stub = tmp_path / "stub.xml"
    stub.write_bytes(_NO_PATIENT)
    result = CliRunner().invoke(
        app, ["convert", "--from", "ccda", str(stub), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert "no recordTarget/patientRole" in result.output
    assert "1 document(s) converted, 0 failed" in result.output
    assert validate_bundle(json.loads((tmp_path / "out" / "stub.json").read_bytes())) == []


def test_pipeline_refuses_a_document_without_patient() -> None:
    """A twin is a patient: the pipeline dead-letters (never attributes) such a document."""
    with pytest.raises(SourceError) as info:
        ccda.convert_record(_record(_NO_PATIENT), True, None)
    assert info.value.stage == "map"
    assert "no recordTarget/patientRole" in info.value.reason
    assert "doc.xml" in info.value.reason
    assert info.value.error["error"] == "no patient"


# -- the corpus -------------------------------------------------------------------------


def _corpus_documents(corpus: Path) -> list[Path]:
    docs = sorted((corpus / "microsoft-fhir-converter/data/SampleData/Ccda").glob("*.ccda"))
    docs += [
        p
        for p in sorted((corpus / "hl7-c-cda-examples").rglob("*"))
        if p.suffix.lower() == ".xml" and ccda.is_document(p)  # CCD 1 is "CCD.XML"
    ]
    return docs


def test_corpus_documents_convert_to_valid_bundles(corpus: Path) -> None:
    """Every document of the corpus converts, R4B-valid, with exactly one Patient; the
    guide's stubs without a recordTarget (and only they) get the placeholder."""
    docs = _corpus_documents(corpus)
    examples = [p for p in docs if "hl7-c-cda-examples" in p.parts]
    assert len(docs) >= 47 and len(examples) >= 30
    failures, placeholders, missing = [], [], []
    for path in docs:
        data = path.read_bytes()
        try:
            bundle = ccda.convert(data, source=path.name, validate=True)
        except ccda.CcdaError as exc:
            failures.append(f"{path.name}: {exc}")
            continue
        (patient,) = _resources(bundle, "Patient")
        if ccda.UNIDENTIFIED in patient.get("meta", {}).get("tag", ()):
            placeholders.append(path.name)
        if b"recordTarget" not in data:
            missing.append(path.name)
    assert failures == []
    assert sorted(placeholders) == sorted(missing)


def test_every_resource_has_its_own_id(bundle: dict) -> None:
    """A resource made while another is being made (a panel's members) never shares
    its id: the twin store would keep only one of them."""
    keys = [(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle["entry"]]
    assert len(keys) == len(set(keys))


def test_corpus_bundles_have_unique_ids(corpus: Path) -> None:
    for path in _corpus_documents(corpus):
        out = ccda.convert(path.read_bytes(), source=path.name)
        keys = [(e["resource"]["resourceType"], e["resource"]["id"]) for e in out["entry"]]
        assert len(keys) == len(set(keys)), path.name


_SUPPLY_ORDER = b"""<ClinicalDocument xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <id root="2.16.840.1.113883.19.5" extension="supply-order"/>
  <code code="34133-9" codeSystem="2.16.840.1.113883.6.1"/>
  <title>Summary</title>
  <effectiveTime value="20240301103000-0500"/>
  <recordTarget><patientRole><id root="2.16.840.1.113883.19.5" extension="p1"/></patientRole></recordTarget>
  <component><structuredBody><component><section>
    <code code="10160-0" codeSystem="2.16.840.1.113883.6.1"/>
    <entry><substanceAdministration classCode="SBADM" moodCode="EVN">
      <templateId root="2.16.840.1.113883.10.20.22.4.16"/>
      <id root="c1b1b7a0-0000-4000-8000-000000000001"/>
      <statusCode code="active"/>
      <consumable><manufacturedProduct><templateId root="2.16.840.1.113883.10.20.22.4.23"/>
        <manufacturedMaterial><code code="573621" codeSystem="2.16.840.1.113883.6.88"/></manufacturedMaterial>
      </manufacturedProduct></consumable>
      <entryRelationship typeCode="REFR"><supply classCode="SPLY" moodCode="INT">
        <templateId root="2.16.840.1.113883.10.20.22.4.17"/>
        <id nullFlavor="NI"/>
        <statusCode code="completed"/>
        <repeatNumber value="3"/>
        <quantity value="75"/>
      </supply></entryRelationship>
    </substanceAdministration></entry>
    <entry><act classCode="ACT" moodCode="INT">
      <templateId root="2.16.840.1.113883.10.20.22.4.39"/>
      <id root="c1b1b7a0-0000-4000-8000-000000000002"/>
      <code code="410606002" codeSystem="2.16.840.1.113883.6.96"/>
      <statusCode code="active"/>
      <priorityCode code="A" codeSystem="2.16.840.1.113883.5.7"/>
    </act></entry>
  </section></component></structuredBody></component>
</ClinicalDocument>"""


def test_supply_order_of_a_taken_medication_is_its_request() -> None:
    """A Medication Supply Order (4.17) inside a medication that was taken is the order the
    supply came from: a MedicationRequest (intent order) the statement is basedOn;
    repeatNumber counts the first fill, numberOfRepeatsAllowed does not."""
    out = ccda.convert(_SUPPLY_ORDER, validate=True)
    (statement,) = _resources(out, "MedicationStatement")
    (request,) = _resources(out, "MedicationRequest")
    (med,) = _resources(out, "Medication")
    assert statement["basedOn"] == [{"reference": f"MedicationRequest/{request['id']}"}]
    assert request["intent"] == "order" and request["status"] == "completed"
    assert request["medicationReference"] == {"reference": f"Medication/{med['id']}"}
    assert request["dispenseRequest"]["numberOfRepeatsAllowed"] == 2
    assert request["dispenseRequest"]["quantity"] == {"value": 75}


def test_act_priority_maps_to_request_priority() -> None:
    (req,) = _resources(ccda.convert(_SUPPLY_ORDER), "ServiceRequest")
    assert req["priority"] == "asap"  # v3 ActPriority A (ASAP), not urgent
