"""Flat CSV → FHIR: the synthea profile on the corpus, bad rows, the generic lab-results
profile, and the pipeline plug-in."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fhirtwin import bus, csvsource
from fhirtwin.cli import app
from fhirtwin.normalize import Converted, SourceError
from fhirtwin.validation import validate_bundle

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "csv"
SYNTHEA = "https://github.com/synthetichealth/synthea"


def _corpus_csv(corpus: Path) -> Path:
    path = corpus / "synthea-csv-fhir-10pt" / "output" / "csv"
    if not path.is_dir():
        pytest.skip(f"corpus lacks {path}")
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _convert(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["convert", "--from", "csv", *args])
    return result.exit_code, result.output


def test_corpus_one_valid_bundle_per_patient(corpus: Path, tmp_path: Path) -> None:
    src = _corpus_csv(corpus)
    code, output = _convert(["--profile", "synthea", str(src), "--out", str(tmp_path)])
    assert code == 0, output
    patients = _rows(src / "patients.csv")
    written = sorted(p.stem for p in tmp_path.glob("*.json") if p.stem != csvsource.SHARED)
    assert written == sorted(p["Id"] for p in patients)
    counts: dict[str, int] = {}
    for f in tmp_path.glob("*.json"):
        bundle = json.loads(f.read_bytes())
        assert validate_bundle(bundle) == [], f.name
        for e in bundle["entry"]:
            res = e["resource"]
            counts[res["resourceType"]] = counts.get(res["resourceType"], 0) + 1
            if f.stem != csvsource.SHARED:
                subject = res.get("subject") or res.get("patient") or res.get("beneficiary")
                if res["resourceType"] == "Patient":
                    assert res["id"] == f.stem
                elif subject is not None:
                    assert subject["reference"] == f"Patient/{f.stem}"
    assert counts["Patient"] == len(patients)
    assert counts["Encounter"] == len(_rows(src / "encounters.csv"))
    assert counts["Condition"] == len(_rows(src / "conditions.csv"))
    assert counts["Observation"] == len(_rows(src / "observations.csv"))
    # ids: Synthea's Id column where there is one, so they equal the FHIR export's
    one = json.loads((tmp_path / f"{patients[0]['Id']}.json").read_bytes())
    enc_ids = {
        e["resource"]["id"] for e in one["entry"] if e["resource"]["resourceType"] == "Encounter"
    }
    assert enc_ids == {
        r["Id"] for r in _rows(src / "encounters.csv") if r["PATIENT"] == patients[0]["Id"]
    }


def test_bad_rows_reported_with_file_line_column(tmp_path: Path) -> None:
    code, output = _convert(
        ["--profile", "synthea", str(FIXTURES / "synthea-small"), "--out", str(tmp_path)]
    )
    assert code == 1  # bad rows make the exit code 1; the good rows are still written
    flat = " ".join(output.split())
    for where in (
        "patients.csv:3, column BIRTHDATE: '1975-13-40' is not a valid date",
        "encounters.csv:3, column ENCOUNTERCLASS: no mapping for 'spaceship'",
        "conditions.csv:3, column CODE: required column is empty",
        "observations.csv:3, column VALUE: 'heavy' is not a valid decimal",
        "observations.csv:5, column CODE: 4 fields where the header has 9",
    ):
        assert where in flat, output
    assert "5 bad row(s)" in flat
    bundle = json.loads((tmp_path / "11111111-1111-4111-8111-111111111111.json").read_bytes())
    types = sorted(e["resource"]["resourceType"] for e in bundle["entry"])
    assert types == ["Condition", "Encounter", "Observation", "Observation", "Patient"]
    assert validate_bundle(bundle) == []
    assert not (tmp_path / "22222222-2222-4222-8222-222222222222.json").exists()


def test_bad_row_errors_carry_location() -> None:
    profile = csvsource.load_profile("synthea")
    table = next(t for t in profile.tables if t.name == "conditions")
    results = list(csvsource.iter_table(FIXTURES / "synthea-small" / "conditions.csv", table))
    assert [line for line, _ in results] == [2, 3]
    good, bad = results[0][1], results[1][1]
    assert isinstance(good, csvsource.RowResult)
    assert good.resources[0]["clinicalStatus"]["coding"][0]["code"] == "active"
    assert good.identifiers == (f"{SYNTHEA}|11111111-1111-4111-8111-111111111111",)
    assert isinstance(bad, csvsource.RowError)
    assert bad.to_dict() == {
        "error": "map",
        "file": "conditions.csv",
        "line": 3,
        "column": "CODE",
        "reason": "required column is empty",
    }


@pytest.mark.parametrize(
    ("dispenses", "kept"),
    [("3", 3), ("0", 0), ("-3", None), ("2147483647", 2147483647), ("2147483648", None)],
)
def test_whole_numbers_outside_their_fhir_type_are_bad_rows(
    dispenses: str, kept: int | None
) -> None:
    """DISPENSES → MedicationRequest.dispenseRequest.numberOfRepeatsAllowed, an unsignedInt
    (0 to 2^31 - 1): a value FHIR cannot hold is a bad row naming the column, not an
    invalid resource."""
    profile = csvsource.load_profile("synthea")
    table = next(t for t in profile.tables if t.name == "medications")
    row = dict.fromkeys(table.columns, "")
    row.update(START="2020-01-01", PATIENT="p1", CODE="860975", DESCRIPTION="metformin")
    row["DISPENSES"] = dispenses
    if kept is None:
        with pytest.raises(csvsource.RowError) as err:
            csvsource.convert_row(table, row)
        assert err.value.column == "DISPENSES" and "unsignedInt" in str(err.value)
        return
    (req,) = csvsource.convert_row(table, row).resources
    assert req["dispenseRequest"]["numberOfRepeatsAllowed"] == kept
    bundle = csvsource.bundle_of("p1", [req])
    assert validate_bundle(bundle) == []


@pytest.mark.parametrize(
    ("table_name", "blank", "column"),
    [("claims", "PROVIDERID", "PROVIDERID"), ("imaging_studies", "SERIES_UID", "SERIES_UID")],
)
def test_a_column_fhir_cannot_do_without_is_required(
    table_name: str, blank: str, column: str
) -> None:
    """Claim.provider and ImagingStudy.series.uid are 1..1: the synthea profile lists
    their columns as required, so an empty one is a bad row, with validation off too."""
    profile = csvsource.load_profile("synthea")
    table = next(t for t in profile.tables if t.name == table_name)
    row = {c: f"v-{c}" for c in table.columns}
    row.update(SERVICEDATE="2020-01-01", DATE="2020-01-01T10:00:00Z", BODYSITE_CODE="1")
    row.update(MODALITY_CODE="DX", SOP_CODE="1.2", PROCEDURE_CODE="2", INSTANCE_UID="1.2.3")
    row.update(SERIES_UID="1.2.4", STATUS1="BILLED", DIAGNOSIS1="3")
    assert all(validate_bundle(csvsource.bundle_of("p", [r])) == [] for r in (
        csvsource.convert_row(table, row).resources
    ))  # fmt: skip
    row[blank] = ""
    with pytest.raises(csvsource.RowError) as err:
        csvsource.convert_row(table, row)
    assert (err.value.column, err.value.reason) == (column, "required column is empty")


def test_a_row_whose_resource_fhir_would_reject_names_the_empty_column(tmp_path: Path) -> None:
    """Where a profile forgot to require a column, the resource's required elements (from
    the R4B models) still make an empty one a bad row naming the column."""
    (tmp_path / "labs.yaml").write_text(
        "file: labs.csv\ncolumns: [ID, CODE, VALUE]\nrequired: [ID]\n"
        "resource: Observation\nid: $ID\nelements:\n  status: final\n"
        "  code: {text: $CODE}\n"
        "  valueString: $VALUE\n"
    )
    (table,) = csvsource.load_profile(tmp_path).tables
    (obs,) = csvsource.convert_row(table, {"ID": "1", "CODE": "2345-7", "VALUE": "x"}).resources
    assert obs["code"] == {"text": "2345-7"}
    with pytest.raises(csvsource.RowError) as err:
        csvsource.convert_row(table, {"ID": "1", "CODE": "", "VALUE": "x"})
    assert err.value.column == "CODE"
    assert err.value.reason == (
        "the Observation would have no code, which FHIR R4 requires: column CODE is empty"
    )


def test_a_device_without_a_description_has_no_name_not_an_empty_one() -> None:
    profile = csvsource.load_profile("synthea")
    table = next(t for t in profile.tables if t.name == "devices")
    row = dict.fromkeys(table.columns, "")
    row.update(START="2020-01-01T10:00:00Z", PATIENT="p1", CODE="72506001")
    (device,) = csvsource.convert_row(table, row).resources
    assert "deviceName" not in device
    assert validate_bundle(csvsource.bundle_of("p1", [device])) == []


def test_lab_results_profile_converts_its_example(tmp_path: Path) -> None:
    example = ROOT / "mappings" / "csv" / "lab-results"
    code, output = _convert(["--profile", "lab-results", str(example), "--out", str(tmp_path)])
    assert code == 0, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MRN001.json", "MRN002.json"]
    bundle = json.loads((tmp_path / "MRN002.json").read_bytes())
    assert validate_bundle(bundle) == []
    obs = [e["resource"] for e in bundle["entry"]]
    assert [o["code"]["coding"][0]["code"] for o in obs] == ["2160-0", "5778-6"]
    assert obs[0]["status"] == "preliminary"
    assert obs[0]["valueQuantity"] == {
        "value": 1.1,
        "unit": "mg/dL",
        "system": "http://unitsofmeasure.org",
        "code": "mg/dL",
    }
    assert obs[0]["effectiveDateTime"] == "2024-03-02T09:30:00Z"
    assert obs[1]["valueString"] == "Yellow" and obs[1]["status"] == "final"
    assert obs[1]["subject"]["identifier"]["value"] == "MRN002"


def _record(filename: str, header: bytes, line: bytes, position: int = 2) -> bus.Record:
    headers = (
        ("fhirtwin-source-kind", b"csv"),
        ("fhirtwin-filename", filename.encode()),
        ("fhirtwin-position", str(position).encode()),
        ("fhirtwin-csv-header", header),
    )
    return bus.Record("ehr.csv", 0, 7, 1_700_000_000_000, None, line, headers)


def test_plugin_convert_record_returns_resources_and_patient_identifiers() -> None:
    lines = (FIXTURES / "synthea-small" / "conditions.csv").read_bytes().splitlines()
    out = csvsource.convert_record(_record("conditions.csv", lines[0], lines[1]), True, None)
    assert len(out) == 1 and isinstance(out[0], Converted)
    conv = out[0]
    (res,) = conv.resources
    assert res["resourceType"] == "Condition"
    assert res["subject"] == {"reference": "Patient/11111111-1111-4111-8111-111111111111"}
    assert conv.control_id == "conditions.csv:2"
    assert conv.event_ms == 1577836800000  # 2020-01-01
    idents = getattr(conv, "patient_identifiers", None)
    if idents is None:
        pytest.skip("fhirtwin.normalize.Converted has no patient_identifiers field yet")
    assert tuple(idents) == (f"{SYNTHEA}|11111111-1111-4111-8111-111111111111",)


def test_plugin_bad_row_raises_source_error_with_location() -> None:
    lines = (FIXTURES / "synthea-small" / "conditions.csv").read_bytes().splitlines()
    with pytest.raises(SourceError) as info:
        csvsource.convert_record(_record("conditions.csv", lines[0], lines[2], 3), True, None)
    assert info.value.stage == "map"
    assert info.value.error["file"] == "conditions.csv"
    assert info.value.error["line"] == 3
    assert info.value.error["column"] == "CODE"


def test_plugin_unknown_file_is_a_source_error() -> None:
    with pytest.raises(SourceError) as info:
        csvsource.convert_record(_record("mystery.csv", b"a,b", b"1,2"), True, None)
    assert info.value.error["error"] == "no-table"


def test_plugin_through_normalize_dispatch() -> None:
    from fhirtwin.normalize import convert_record

    header = b"mrn,loinc,test_name,value,unit,taken_at"
    rec = _record("lab-results.csv", header, b"M9,2345-7,Glucose,101,mg/dL,2024-01-02T03:04:05Z")
    (conv,) = convert_record("csv", rec, validate=True)
    assert conv.resources[0]["valueQuantity"]["value"] == 101


def test_a_profile_key_given_twice_is_an_error_naming_both_lines(tmp_path: Path) -> None:
    (tmp_path / "labs.yaml").write_text(
        "file: labs.csv\ncolumns: [ID]\nrequired: [ID]\nresource: Observation\nid: $ID\n"
        "elements:\n  status: final\n  status: preliminary\n"
    )
    with pytest.raises(csvsource.ProfileError) as err:
        csvsource.load_profile(tmp_path)
    said = str(err.value)
    assert "labs.yaml" in said and "found the key 'status' a second time (first on line 7)" in said
    assert "line 8" in said
