"""Clinical notes → coded FHIR: what a user checks in the output, from each input form."""

from __future__ import annotations

import base64
import csv
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from fhirtwin import bus, notes
from fhirtwin.cli import app
from fhirtwin.ingest import ingest
from fhirtwin.normalize import SourceError
from fhirtwin.twin import TwinStore
from fhirtwin.validation import validate_resource
from tests.pipeline import drain, records

FIXTURES = Path(__file__).parent / "fixtures"
NOTE = FIXTURES / "notes" / "clinic-note.txt"
MDM = FIXTURES / "hl7v2" / "results" / "mdm_t02.hl7"


def _doc_text(doc: dict[str, Any]) -> str:
    return base64.b64decode(doc["content"][0]["attachment"]["data"]).decode("utf-8")


def _sources(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for ext in res.get("extension", ()):
        if ext["url"] == notes.NOTE_SOURCE_URL:
            out.append(
                {e["url"]: next(v for k, v in e.items() if k != "url") for e in ext["extension"]}
            )
    return out


def _one(data: bytes, **kw: Any) -> tuple[notes.Note, list[dict[str, Any]]]:
    (pair,) = notes.convert(data, validate=True, **kw)
    return pair


def _codes(res: dict[str, Any], key: str = "code") -> set[str]:
    return {c["code"] for c in res[key]["coding"]}


def _find(resources: list[dict[str, Any]], rtype: str, words: str) -> list[dict[str, Any]]:
    """Resources of ``rtype`` one of whose mentions is ``words`` (case-insensitive)."""
    return [
        r
        for r in resources
        if r["resourceType"] == rtype
        and any(s["text"].lower() == words.lower() for s in _sources(r))
    ]


@pytest.fixture(scope="module")
def clinic() -> tuple[notes.Note, list[dict[str, Any]]]:
    return _one(NOTE.read_bytes(), source=NOTE.name)


def test_every_fact_points_at_its_words(clinic: tuple[notes.Note, list[dict[str, Any]]]) -> None:
    note, resources = clinic
    doc = next(r for r in resources if r["resourceType"] == "DocumentReference")
    text = _doc_text(doc)
    assert text == note.text and text.startswith("CHIEF COMPLAINT")
    derived = [r for r in resources if _sources(r)]
    assert len(derived) >= 8
    for r in derived:
        for s in _sources(r):
            assert s["document"] == {"reference": f"DocumentReference/{doc['id']}"}
            assert text[s["start"] : s["end"]] == s["text"], r["resourceType"]
    prov = next(r for r in resources if r["resourceType"] == "Provenance")
    assert {t["reference"] for t in prov["target"]} == {
        f"{r['resourceType']}/{r['id']}" for r in derived
    }
    assert prov["entity"] == [
        {"role": "source", "what": {"reference": f"DocumentReference/{doc['id']}"}}
    ]
    for r in resources:
        assert validate_resource(r) == [], r["resourceType"]


def test_assertions_become_statuses(clinic: tuple[notes.Note, list[dict[str, Any]]]) -> None:
    _, resources = clinic
    (htn,) = _find(resources, "Condition", "hypertension")
    assert len(_sources(htn)) >= 3  # chief complaint, HPI, assessment: one resource
    assert htn["verificationStatus"]["coding"][0]["code"] == "confirmed"
    assert htn["clinicalStatus"]["coding"][0]["code"] == "active"
    assert htn["subject"] == {"reference": "Patient/pat-note-1"}
    assert htn["recordedDate"] == "2024-05-02T09:30:00Z"

    (pain,) = _find(resources, "Condition", "chest pain")
    assert pain["verificationStatus"]["coding"][0]["code"] == "refuted"
    assert "clinicalStatus" not in pain
    (pna,) = _find(resources, "Condition", "pneumonia")
    assert pna["verificationStatus"]["coding"][0]["code"] == "refuted"
    # hypothetical: "return if he develops a fever" asserts nothing
    assert _find(resources, "Condition", "fever") == []

    # family history section: the mother's cancer is hers, not the patient's
    (fmh,) = [r for r in resources if r["resourceType"] == "FamilyMemberHistory"]
    assert fmh["relationship"]["coding"][0]["code"] == "MTH"
    assert fmh["condition"][0]["code"]["text"].lower() == "breast cancer"
    assert _find(resources, "Condition", "breast cancer") == []

    (proc,) = _find(resources, "Procedure", "appendectomy")
    assert proc["status"] == "completed"


def test_medications_allergies_and_vitals(clinic: tuple[notes.Note, list[dict[str, Any]]]) -> None:
    _, resources = clinic
    (met,) = _find(resources, "MedicationStatement", "metformin")
    assert met["status"] == "active"
    assert any(c["system"].endswith("rxnorm") for c in met["medicationCodeableConcept"]["coding"])
    dose = met["dosage"][0]
    assert dose["doseAndRate"][0]["doseQuantity"]["value"] == 500
    assert dose["doseAndRate"][0]["doseQuantity"]["code"] == "mg"
    assert dose["route"]["coding"][0]["code"] == "26643006"  # oral
    assert dose["timing"]["repeat"]["frequency"] == 2

    (pen,) = _find(resources, "AllergyIntolerance", "penicillin")
    assert pen["verificationStatus"]["coding"][0]["code"] == "confirmed"
    assert pen["category"] == ["medication"]
    assert _find(resources, "MedicationStatement", "penicillin") == []

    obs = {
        r["code"]["coding"][0]["code"]: r for r in resources if r["resourceType"] == "Observation"
    }
    bp = obs["85354-9"]
    comps = {c["code"]["coding"][0]["code"]: c["valueQuantity"] for c in bp["component"]}
    assert comps["8480-6"]["value"] == 142 and comps["8462-4"]["value"] == 88
    assert comps["8480-6"]["code"] == "mm[Hg]"
    assert obs["8867-4"]["valueQuantity"]["value"] == 76
    assert obs["8310-5"]["valueQuantity"]["code"] == "[degF]"
    assert obs["29463-7"]["valueQuantity"] == {
        "value": 92,
        "unit": "kg",
        "system": "http://unitsofmeasure.org",
        "code": "kg",
    }
    assert obs["8867-4"]["effectiveDateTime"] == "2024-05-02T09:30:00Z"


def test_same_note_same_ids(clinic: tuple[notes.Note, list[dict[str, Any]]]) -> None:
    _, resources = clinic
    _, again = _one(NOTE.read_bytes(), source=NOTE.name)
    assert [(r["resourceType"], r["id"]) for r in again] == [
        (r["resourceType"], r["id"]) for r in resources
    ]
    assert again == resources


# -- other input forms ----------------------------------------------------------------


def _docref(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "id": "note-9",
        "status": "current",
        "subject": {"reference": "Patient/p9"},
        "date": "2023-03-01T12:00:00Z",
        "context": {"encounter": [{"reference": "Encounter/e9"}]},
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "data": base64.b64encode(text.encode()).decode(),
                }
            }
        ],
        **extra,
    }


def test_document_reference_is_read_and_referenced() -> None:
    doc = _docref("Assessment: community acquired pneumonia. Denies chest pain.")
    note, resources = _one(json.dumps(doc).encode())
    assert note.patient_identifiers == ("urn:fhirtwin:fhir-ref|default/Patient/p9",)
    (pna,) = [
        r
        for r in resources
        if r["resourceType"] == "Condition" and not _find([r], "Condition", "chest pain")
    ]
    assert pna["evidence"][0]["detail"] == [{"reference": "DocumentReference/note-9"}]
    assert pna["encounter"] == {"reference": "Encounter/e9"}
    assert pna["category"][0]["coding"][0]["code"] == "encounter-diagnosis"
    assert resources[0] == doc  # the note itself goes along unchanged


def test_bundle_and_ndjson_hold_many_notes() -> None:
    a = _docref("History of asthma.")
    b = _docref("Patient has hypertension.", id="note-10")
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": a}, {"resource": b}],
    }
    assert len(notes.convert(json.dumps(bundle).encode())) == 2
    ndjson = (json.dumps(a) + "\n" + json.dumps(b) + "\n").encode()
    assert [n.document["id"] for n, _ in notes.convert(ndjson)] == ["note-9", "note-10"]


def test_hl7v2_obx_text_is_a_note() -> None:
    note, resources = _one(MDM.read_bytes(), source=MDM.name)
    assert note.text == "Patient admitted with pneumonia."
    assert resources[0]["resourceType"] == "Patient"  # so the MPI links it by PID-3
    (pna,) = _find(resources, "Condition", "pneumonia")
    assert pna["subject"] == {"reference": f"Patient/{resources[0]['id']}"}


def test_plain_text_needs_a_patient() -> None:
    with pytest.raises(notes.NoteError, match="no patient for this note"):
        notes.convert(b"Denies chest pain.", source="n.txt")
    with pytest.raises(notes.NoteError, match="blank line"):
        notes.convert(b"Patient: Patient/1\nDenies chest pain.", source="n.txt")
    (pair,) = notes.convert(b"Denies chest pain.", source="n.txt", patient="urn:mrn|42")
    assert pair[0].subject == {"identifier": {"system": "urn:mrn", "value": "42"}}
    assert pair[0].patient_identifiers == ("urn:mrn|42",)


def test_non_text_json_is_refused_clearly() -> None:
    with pytest.raises(notes.NoteError, match=r"a Observation holds no note"):
        notes.convert(b'{"resourceType": "Observation"}')
    with pytest.raises(notes.NoteError, match=r"line 2"):
        notes.convert(b'{"resourceType": "Binary"}\n{oops\n')


def test_cli_convert_from_note(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["convert", "--from", "note", str(NOTE), "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    (out,) = tmp_path.glob("clinic-note-*.json")
    bundle = json.loads(out.read_bytes())
    assert bundle["type"] == "batch"
    types = {e["resource"]["resourceType"] for e in bundle["entry"]}
    assert {"DocumentReference", "Condition", "Observation", "Provenance"} <= types
    bad = tmp_path / "bad.txt"
    bad.write_text("no header here")
    result = CliRunner().invoke(
        app, ["convert", "--from", "note", str(bad), "--out", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "no patient for this note" in " ".join(result.output.split())


# -- the pipeline ---------------------------------------------------------------------


def test_ingested_notes_join_the_patients_twin(kafka: str, redis_url: str, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(NOTE.read_bytes())
    (tmp_path / "bad.txt").write_text("Denies chest pain.")  # no patient: a dead letter
    counts = ingest(kafka, "notes", [str(tmp_path)])
    assert counts["records"] == 2
    n, _ = drain(kafka, redis_url, validate=True, kinds=["notes"])
    assert n == 2
    dead = records(kafka, bus.DEADLETTER)
    assert len(dead) == 1
    assert dead[0].value == b"Denies chest pain."  # the original bytes
    assert "no patient for this note" in (dead[0].header("fhirtwin-dl-reason") or "")
    assert dead[0].header("fhirtwin-dl-stage") == "parse"
    store = TwinStore(redis.Redis.from_url(redis_url))
    twin = store.resolve("urn:fhirtwin:fhir-ref|default/Patient/pat-note-1")
    assert twin is not None
    held = store.resources(twin)
    types = {r["resourceType"] for r in held}
    assert {"DocumentReference", "Condition", "FamilyMemberHistory", "Provenance"} <= types


def test_pipeline_plugin_reports_where() -> None:
    rec = bus.Record(
        "ehr.notes", 0, 3, 0, None, b"Denies fever.", [("fhirtwin-filename", b"x.txt")]
    )
    with pytest.raises(SourceError) as info:
        notes.convert_record(rec, True, None)
    assert info.value.stage == "parse"
    assert info.value.error["where"] == "x.txt"
    rec = bus.Record(
        "ehr.notes",
        0,
        4,
        0,
        None,
        b"Denies fever.",
        [("fhirtwin-filename", b"x.txt"), ("fhirtwin-patient", b"Patient/7")],
    )
    (unit,) = notes.convert_record(rec, True, None)
    assert unit.patient_identifiers == ("urn:fhirtwin:fhir-ref|default/Patient/7",)


# -- the corpus -----------------------------------------------------------------------


@pytest.mark.corpus
def test_mtsamples_notes_all_process(corpus: Path) -> None:
    """500 MTSamples dictations: every one converts, every resource is R4B-valid and
    every offset slices back to the words it names."""
    csv.field_size_limit(sys.maxsize)
    path = corpus / "mtsamples-clinspacy" / "data" / "mtsamples.csv"
    with path.open(newline="", encoding="utf-8") as fh:
        texts = [row["transcription"] for row in csv.DictReader(fh) if row["transcription"].strip()]
    texts = texts[:500]
    found = 0  # notes with at least one coded fact
    for i, text in enumerate(texts):
        (pair,) = notes.convert(
            text.encode(), source=f"mtsamples[{i}]", patient="Patient/mt", validate=True
        )
        _, resources = pair
        body = _doc_text(resources[0])
        for r in resources:
            for s in _sources(r):
                assert body[s["start"] : s["end"]] == s["text"], (i, r["resourceType"])
        found += any(_sources(r) for r in resources)
    assert found >= 0.9 * len(texts)  # nearly every dictation states some coded fact


@pytest.mark.corpus
def test_synthea_and_smart_document_references(corpus: Path) -> None:
    """Every note in the SMART Bulk sample and the Synthea bundles converts, R4B-valid,
    linked to its patient, offsets pointing at the words."""
    smart = corpus / "smart-sample-bulk-fhir-10-patients" / "DocumentReference.000.ndjson"
    paths = [
        smart,
        *sorted((corpus / "synthea-csv-fhir-10pt" / "output" / "fhir").glob("*.json"))[:3],
    ]
    total = 0
    for path in paths:
        for note, resources in notes.convert(path.read_bytes(), source=path.name, validate=True):
            total += 1
            assert note.patient_identifiers and note.subject["reference"].startswith("Patient/")
            for r in resources:
                for s in _sources(r):
                    assert note.text[s["start"] : s["end"]] == s["text"]
    assert total >= 1215


@pytest.mark.corpus
def test_ccda_narrative_sections_are_read(corpus: Path) -> None:
    """The free-text sections of the Microsoft C-CDA samples (HPI, assessment, hospital
    course …) are read under their titles; the document's Patient goes along."""
    folder = corpus / "microsoft-fhir-converter" / "data" / "SampleData" / "Ccda"
    seen = 0
    for path in sorted(folder.glob("*.ccda")):
        for note, resources in notes.convert(path.read_bytes(), source=path.name, validate=True):
            seen += 1
            assert resources[0]["resourceType"] == "Patient"
            assert note.subject == {"reference": f"Patient/{resources[0]['id']}"}
            assert note.text.split("\n", 1)[0].endswith(":")  # a section title first
            for r in resources:
                for s in _sources(r):
                    assert note.text[s["start"] : s["end"]] == s["text"]
    assert seen >= 5


def test_plans_are_intentions_not_facts() -> None:
    text = b"PLAN: Start warfarin 5 mg daily. Schedule colonoscopy.\n"
    ((_, resources),) = notes.convert(text, source="plan.txt", patient="Patient/1", validate=True)
    (war,) = _find(resources, "MedicationStatement", "warfarin")
    assert war["status"] == "intended"
    assert [r for r in resources if r["resourceType"] == "Procedure"] == []


def test_notes_inside_other_sources_reach_the_nlp_worker(
    kafka: str, redis_url: str, tmp_path: Path
) -> None:
    """A Bulk NDJSON DocumentReference and an HL7 v2 MDM with OBX text are forwarded by
    their normalizers to ehr.notes; the facts in them join the same patient's twin."""
    patient = {"resourceType": "Patient", "id": "p9", "name": [{"family": "Nine"}]}
    doc = _docref("Assessment: pneumonia.")
    (tmp_path / "Patient.ndjson").write_text(json.dumps(patient) + "\n")
    (tmp_path / "DocumentReference.ndjson").write_text(json.dumps(doc) + "\n")
    ingest(kafka, "fhir", [str(tmp_path)])
    ingest(kafka, "hl7v2", [str(MDM)])
    drain(kafka, redis_url, validate=True, kinds=["fhir", "hl7v2", "notes"])
    assert records(kafka, bus.DEADLETTER) == []
    forwarded = records(kafka, bus.RAW_TOPICS["notes"])
    assert len(forwarded) == 2
    assert {r.header("fhirtwin-derived-from").split("/")[0] for r in forwarded} == {
        "ehr.fhir",
        "ehr.hl7v2",
    }
    store = TwinStore(redis.Redis.from_url(redis_url))
    twins = list(store.twins())
    assert len(twins) == 2  # the Bulk patient and the MDM patient, nothing more
    for twin in twins:
        held = store.resources(twin)
        pna = [
            r
            for r in held
            if r["resourceType"] == "Condition" and _find([r], "Condition", "pneumonia")
        ]
        assert len(pna) == 1, [r["resourceType"] for r in held]
        assert sum(r["resourceType"] == "Patient" for r in held) == 1


def test_pain_scores_are_surveys_not_vital_signs() -> None:
    ((_, resources),) = notes.convert(
        b"Pain 7/10. BP 120/80.", source="p.txt", patient="Patient/1", validate=True
    )
    cats = {
        r["code"]["coding"][0]["code"]: r["category"][0]["coding"][0]["code"]
        for r in resources
        if r["resourceType"] == "Observation"
    }
    assert cats == {"72514-3": "survey", "85354-9": "vital-signs"}


@pytest.mark.parametrize(
    ("message", "carries"),
    [
        (b"MSH|^~\\&|A|B\rOBX|1|TX|11492-6^Hx^LN||Denies fever.\r", True),
        (b"MSH|^~\\&|A|B\nOBX|1|FT|11492-6^Hx^LN||Denies fever.\n", True),
        (b"MSH|^~\\&|A|B\rOBX|1|NM|8310-5^Temp^LN||37.2\r", False),
        # |TX| elsewhere than an OBX's value type is not text to read
        (b"MSH|^~\\&|A|B\rPID|1||7^^^H||Doe^TX|\rOBX|1|NM|8310-5||37.2\r", False),
        (b"MSH|^~\\&|A|B\rNTE|1||OBX|1|TX|\r", False),
    ],
)
def test_which_hl7v2_messages_go_to_the_notes_reader(message: bytes, carries: bool) -> None:
    from fhirtwin.normalize import _carries_text

    assert _carries_text("hl7v2", message) is carries
