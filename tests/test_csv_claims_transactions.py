"""Synthea's claims_transactions.csv → ChargeItem (CHARGE) and PaymentReconciliation
(PAYMENT, ADJUSTMENT); transfers make no resource. Synthetic rows, the pipeline plug-in,
and every row of the corpus run against Synthea's own FHIR export of it."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fhirtwin import bus, csvsource
from fhirtwin.cli import app
from fhirtwin.validation import validate_bundle, validate_resource

SYNTHEA = "https://github.com/synthetichealth/synthea"
CVX = "http://hl7.org/fhir/sid/cvx"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"
METHOD_EXT = "http://hl7.org/fhir/5.0/StructureDefinition/extension-PaymentReconciliation.method"

HEADER = [
    "ID",
    "CLAIMID",
    "CHARGEID",
    "PATIENTID",
    "TYPE",
    "AMOUNT",
    "METHOD",
    "FROMDATE",
    "TODATE",
    "PLACEOFSERVICE",
    "PROCEDURECODE",
    "MODIFIER1",
    "MODIFIER2",
    "DIAGNOSISREF1",
    "DIAGNOSISREF2",
    "DIAGNOSISREF3",
    "DIAGNOSISREF4",
    "UNITS",
    "DEPARTMENTID",
    "NOTES",
    "UNITAMOUNT",
    "TRANSFEROUTID",
    "TRANSFERTYPE",
    "PAYMENTS",
    "ADJUSTMENTS",
    "TRANSFERS",
    "OUTSTANDING",
    "APPOINTMENTID",
    "LINENOTE",
    "PATIENTINSURANCEID",
    "FEESCHEDULEID",
    "PROVIDERID",
    "SUPERVISINGPROVIDERID",
]
PATIENT = "11111111-1111-4111-8111-111111111111"
CLAIM = "c1a1c1a1-0000-4000-8000-000000000001"
ENCOUNTER = "e0e0e0e0-0000-4000-8000-000000000002"
ORG = "0a0a0a0a-0000-4000-8000-000000000003"
DOCTOR = "d0d0d0d0-0000-4000-8000-000000000004"


def _row(**values: str) -> dict[str, str]:
    """One transaction row as Synthea writes it: a 142.58 urgent-care charge by default."""
    row = dict.fromkeys(HEADER, "")
    row.update(
        ID="aaaaaaaa-0000-4000-8000-000000000010",
        CLAIMID=CLAIM,
        CHARGEID="864",
        PATIENTID=PATIENT,
        TYPE="CHARGE",
        AMOUNT="142.58",
        FROMDATE="2011-11-20T02:05:02Z",
        TODATE="2011-11-20T02:20:02Z",
        PLACEOFSERVICE=ORG,
        PROCEDURECODE="702927004",
        DIAGNOSISREF1="1",
        UNITS="1",
        DEPARTMENTID="5",
        NOTES="Urgent care clinic (environment)",
        UNITAMOUNT="142.58",
        TRANSFERTYPE="1",
        PAYMENTS="0.00",
        ADJUSTMENTS="0.00",
        OUTSTANDING="0.00",
        APPOINTMENTID=ENCOUNTER,
        PATIENTINSURANCEID=PATIENT,
        FEESCHEDULEID="1",
        PROVIDERID=DOCTOR,
        SUPERVISINGPROVIDERID=DOCTOR,
    )
    row.update(values)
    return row


def _payment(method: str, amount: str, **values: str) -> dict[str, str]:
    fields = {
        "ID": f"bbbbbbbb-0000-4000-8000-{len(method):012d}",
        "TYPE": "PAYMENT",
        "AMOUNT": "",
        "METHOD": method,
        "UNITAMOUNT": "0.00",
        "TRANSFERTYPE": "",
        "PAYMENTS": amount,
    }
    return _row(**{**fields, **values})


@pytest.fixture(scope="module")
def table() -> csvsource.Table:
    profile = csvsource.load_profile("synthea")
    return next(t for t in profile.tables if t.name == "claims_transactions")


def _one(table: csvsource.Table, row: dict[str, str]) -> dict[str, Any]:
    result = csvsource.convert_row(table, row)
    (res,) = result.resources
    assert validate_resource(res) == [], res
    assert result.identifiers == (f"{SYNTHEA}|{PATIENT}",)
    assert result.event_time == row["FROMDATE"]
    return res


# -- synthetic rows ---------------------------------------------------------------------------


def test_charge_is_a_billed_charge_item(table: csvsource.Table) -> None:
    item = _one(table, _row())
    assert item == {
        "resourceType": "ChargeItem",
        "id": "aaaaaaaa-0000-4000-8000-000000000010",
        "identifier": [{"system": SYNTHEA, "value": "aaaaaaaa-0000-4000-8000-000000000010"}],
        "status": "billed",
        "code": {
            "coding": [
                {
                    "system": SNOMED,
                    "code": "702927004",
                    "display": "Urgent care clinic (environment)",
                }
            ],
            "text": "Urgent care clinic (environment)",
        },
        "subject": {"reference": f"Patient/{PATIENT}"},
        "context": {"reference": f"Encounter/{ENCOUNTER}"},
        "occurrencePeriod": {"start": "2011-11-20T02:05:02Z", "end": "2011-11-20T02:20:02Z"},
        "performer": [{"actor": {"reference": f"Practitioner/{DOCTOR}"}}],
        "performingOrganization": {"reference": f"Organization/{ORG}"},
        "quantity": {"value": 1},
        "priceOverride": {"value": 142.58, "currency": "USD"},
        "supportingInformation": [{"reference": f"Claim/{CLAIM}"}],
    }


def test_charge_without_stop_time_has_an_open_period_and_keeps_its_line_note(
    table: csvsource.Table,
) -> None:
    # Synthea writes an entry without a stop time as the epoch
    item = _one(table, _row(TODATE="1970-01-01T00:00:00Z", LINENOTE="second dose"))
    assert item["occurrencePeriod"] == {"start": "2011-11-20T02:05:02Z"}
    assert item["note"] == [{"text": "second dose"}]


@pytest.mark.parametrize(
    ("code", "system"),
    [
        ("140", CVX),  # influenza vaccine
        ("43", CVX),
        ("52052004", SNOMED),  # rehabilitation therapy
        ("428211000124100", SNOMED),  # extension concept (partition 10)
        ("261352009", SNOMED),  # face mask (a device)
        ("313782", RXNORM),  # acetaminophen 325 MG oral tablet
        ("1049221", RXNORM),
        ("1191", RXNORM),
        ("857005", None),  # RxNorm, but shaped like a SNOMED CT id: no system
        ("5880005", None),  # SNOMED CT, 7 digits: either
        ("69737-5", LOINC),
        ("ABC", None),
    ],
)
def test_charge_code_system_from_the_code_shape(
    table: csvsource.Table, code: str, system: str | None
) -> None:
    (coding,) = _one(table, _row(PROCEDURECODE=code))["code"]["coding"]
    assert coding.get("system") == system
    assert coding["code"] == code


def test_insurer_payment(table: csvsource.Table) -> None:
    pay = _one(table, _payment("ECHECK", "85.55", OUTSTANDING="57.03"))
    assert pay["resourceType"] == "PaymentReconciliation"
    assert pay["id"] == pay["identifier"][0]["value"]
    assert pay["status"] == "active" and pay["outcome"] == "complete"
    assert pay["created"] == "2011-11-20T02:05:02Z"
    assert pay["paymentDate"] == "2011-11-20"
    assert pay["paymentAmount"] == {"value": 85.55, "currency": "USD"}
    assert pay["paymentIssuer"] == {"display": "the claim's primary insurance"}
    # ECHECK has no code in v2 table 0570: the text says it
    assert pay["extension"] == [{"url": METHOD_EXT, "valueCodeableConcept": {"text": "ECHECK"}}]
    assert pay["detail"] == [
        {
            "type": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/payment-type",
                        "code": "payment",
                    }
                ]
            },
            "request": {"reference": f"Claim/{CLAIM}"},
            "date": "2011-11-20",
            "payee": {"reference": f"Organization/{ORG}"},
            "amount": {"value": 85.55, "currency": "USD"},
        }
    ]


@pytest.mark.parametrize(
    ("method", "code"), [("CASH", "CASH"), ("CHECK", "CHK"), ("CC", "CCA"), ("COPAY", None)]
)
def test_patient_payment_method(table: csvsource.Table, method: str, code: str | None) -> None:
    pay = _one(table, _payment(method, "57.03"))
    assert "paymentIssuer" not in pay  # R4 paymentIssuer is an Organization
    (ext,) = pay["extension"]
    concept = ext["valueCodeableConcept"]
    assert concept["text"] == method
    codes = [c["code"] for c in concept.get("coding", [])]
    assert codes == ([code] if code else [])
    assert pay["paymentAmount"]["value"] == 57.03


def test_adjustment_is_a_zero_payment_with_an_adjustment_detail(table: csvsource.Table) -> None:
    row = _payment("SYSTEM", "", TYPE="ADJUSTMENT", ADJUSTMENTS="-12.50")
    adj = _one(table, row)
    assert adj["paymentAmount"] == {"value": 0, "currency": "USD"}
    (detail,) = adj["detail"]
    assert detail["type"]["coding"][0]["code"] == "adjustment"
    assert detail["amount"] == {"value": -12.5, "currency": "USD"}


@pytest.mark.parametrize("kind", ["TRANSFEROUT", "TRANSFERIN"])
def test_transfers_make_no_resource(table: csvsource.Table, kind: str) -> None:
    row = _row(TYPE=kind, AMOUNT="57.03", TRANSFERS="57.03", TRANSFERTYPE="p")
    result = csvsource.convert_row(table, row)
    assert result.resources == []
    assert result.identifiers == (f"{SYNTHEA}|{PATIENT}",)


@pytest.mark.parametrize(
    ("values", "column", "reason"),
    [
        ({"TYPE": "REFUND"}, "TYPE", "'REFUND' is not one of CHARGE, PAYMENT"),
        ({"AMOUNT": "12,50"}, "AMOUNT", "is not a valid decimal"),
        ({"FROMDATE": ""}, "FROMDATE", "required column is empty"),
        ({"CLAIMID": ""}, "CLAIMID", "required column is empty"),
        ({"TODATE": "yesterday"}, "TODATE", "is not a valid dateTime"),
    ],
)
def test_bad_rows(table: csvsource.Table, values: dict[str, str], column: str, reason: str) -> None:
    with pytest.raises(csvsource.RowError) as info:
        csvsource.convert_row(table, _row(**values))
    assert info.value.column == column
    assert reason in info.value.reason


def test_bad_payment_amount(table: csvsource.Table) -> None:
    with pytest.raises(csvsource.RowError) as info:
        csvsource.convert_row(table, _payment("CASH", "lots"))
    assert info.value.column == "PAYMENTS"


# -- the command line and the pipeline plug-in -----------------------------------------------


def _csv_text(rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, HEADER, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _ledger() -> list[dict[str, str]]:
    """One charge, the insurer's part, the transfer of the rest to the patient, their part."""
    return [
        _row(),
        _payment("ECHECK", "85.55", ID="bbbbbbbb-0000-4000-8000-000000000001", OUTSTANDING="57.03"),
        _row(
            ID="cccccccc-0000-4000-8000-000000000001",
            TYPE="TRANSFEROUT",
            AMOUNT="",
            TRANSFERTYPE="",
            TRANSFERS="57.03",
            OUTSTANDING="57.03",
        ),
        _row(
            ID="cccccccc-0000-4000-8000-000000000002",
            TYPE="TRANSFERIN",
            AMOUNT="57.03",
            TRANSFEROUTID="866",
            TRANSFERTYPE="p",
            TRANSFERS="57.03",
            OUTSTANDING="57.03",
        ),
        _payment("CHECK", "57.03", ID="bbbbbbbb-0000-4000-8000-000000000002"),
    ]


def test_convert_command_writes_the_ledger_and_says_what_made_nothing(tmp_path: Path) -> None:
    src = tmp_path / "csv"
    src.mkdir()
    (src / "claims_transactions.csv").write_text(_csv_text(_ledger()), encoding="utf-8")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["convert", "--from", "csv", "--profile", "synthea", str(src), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "5 rows of 1 tables" in flat
    assert "2 row(s) made no resource by rule (claims_transactions 2)" in flat
    assert sorted(p.name for p in out.iterdir()) == [f"{PATIENT}.json"]
    bundle = json.loads((out / f"{PATIENT}.json").read_bytes())
    assert validate_bundle(bundle) == []
    types = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert types == ["ChargeItem", "PaymentReconciliation", "PaymentReconciliation"]
    paid = sum(e["resource"]["paymentAmount"]["value"] for e in bundle["entry"][1:])
    assert round(paid, 2) == bundle["entry"][0]["resource"]["priceOverride"]["value"]


def _record(row: dict[str, str], position: int) -> bus.Record:
    header, line = _csv_text([row]).splitlines()
    headers = (
        ("fhirtwin-source-kind", b"csv"),
        ("fhirtwin-filename", b"claims_transactions.csv"),
        ("fhirtwin-position", str(position).encode()),
        ("fhirtwin-csv-header", header.encode()),
    )
    return bus.Record("ehr.csv", 0, position, 1_700_000_000_000, None, line.encode(), headers)


def test_pipeline_plugin_one_unit_per_charge_or_payment_none_per_transfer() -> None:
    from fhirtwin.normalize import convert_record

    units = [
        convert_record("csv", _record(row, i + 2), validate=True) for i, row in enumerate(_ledger())
    ]
    assert [len(u) for u in units] == [1, 1, 0, 0, 1]
    charge = units[0][0]
    assert charge.control_id == "claims_transactions.csv:2"
    assert charge.event_ms == 1321754702000  # 2011-11-20T02:05:02Z
    assert [r["resourceType"] for r in charge.resources] == ["ChargeItem"]
    assert tuple(getattr(charge, "patient_identifiers", ())) in ((), (f"{SYNTHEA}|{PATIENT}",))


def test_pipeline_plugin_unknown_type_dead_letters_with_its_column() -> None:
    from fhirtwin.normalize import SourceError, convert_record

    with pytest.raises(SourceError) as info:
        convert_record("csv", _record(_row(TYPE="REFUND"), 7), validate=True)
    assert info.value.error["column"] == "TYPE"
    assert info.value.error["line"] == 7


# -- the corpus: every row, against Synthea's FHIR export of the same run -----------------------


def _corpus_dirs(corpus: Path) -> tuple[Path, Path]:
    base = corpus / "synthea-csv-fhir-10pt" / "output"
    if not (base / "csv" / "claims_transactions.csv").is_file():
        pytest.skip(f"corpus lacks {base / 'csv' / 'claims_transactions.csv'}")
    return base / "csv", base / "fhir"


def test_corpus_every_transaction_row_converts_and_validates(
    corpus: Path, table: csvsource.Table
) -> None:
    csv_dir, fhir_dir = _corpus_dirs(corpus)
    path = csv_dir / "claims_transactions.csv"
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    results = list(csvsource.iter_table(path, table))
    assert len(results) == len(rows) > 1000
    errors = [str(r) for _, r in results if isinstance(r, csvsource.RowError)]
    assert errors == []

    made: Counter[tuple[str, str]] = Counter()
    money: dict[str, Counter[str]] = defaultdict(Counter)
    charges: list[dict[str, Any]] = []
    for row, (_, result) in zip(rows, results, strict=True):
        assert isinstance(result, csvsource.RowResult)
        for res in result.resources:
            assert validate_resource(res) == [], (row["ID"], res)
            assert res["id"] == row["ID"]
            made[row["TYPE"], res["resourceType"]] += 1
            if res["resourceType"] == "ChargeItem":
                charges.append(res)
                money[row["CLAIMID"]]["charged"] += res["priceOverride"]["value"]
            else:
                money[row["CLAIMID"]]["paid"] += res["paymentAmount"]["value"]
        if not result.resources:
            made[row["TYPE"], "-"] += 1
    kinds = Counter(r["TYPE"] for r in rows)
    assert made == {
        ("CHARGE", "ChargeItem"): kinds["CHARGE"],
        ("PAYMENT", "PaymentReconciliation"): kinds["PAYMENT"],
        ("TRANSFEROUT", "-"): kinds["TRANSFEROUT"],
        ("TRANSFERIN", "-"): kinds["TRANSFERIN"],
    }
    # a closed claim: what was charged was paid, by the insurer and the patient together
    assert all(abs(m["charged"] - m["paid"]) < 0.01 for m in money.values())

    # the code systems we infer agree with Synthea's FHIR export of the same claims: each
    # charge's code is an ExplanationOfBenefit item's code there, with its system
    eob_items: dict[tuple[str, str], str] = {}
    for f in fhir_dir.glob("*.json"):
        for entry in json.loads(f.read_bytes()).get("entry", []):
            eob = entry["resource"]
            if eob["resourceType"] != "ExplanationOfBenefit":
                continue
            claim = eob["claim"]["reference"].rsplit(":", 1)[-1].rsplit("/", 1)[-1]
            for item in eob.get("item", []):
                for coding in item["productOrService"].get("coding", []):
                    eob_items[claim, coding["code"]] = coding["system"]
    unsystemed = 0
    for item in charges:
        claim = item["supportingInformation"][0]["reference"].split("/", 1)[1]
        (coding,) = item["code"]["coding"]
        theirs = eob_items[claim, coding["code"]]
        if "system" in coding:
            assert coding["system"] == theirs, coding
        else:
            unsystemed += 1
    assert unsystemed <= len(charges) // 100  # 6-7 digit codes shaped like SNOMED CT ids


def test_corpus_references_resolve_in_the_converted_run(corpus: Path) -> None:
    csv_dir, _ = _corpus_dirs(corpus)
    groups, errors, _ = csvsource.convert_dir([str(csv_dir)], csvsource.load_profile("synthea"))
    assert errors == []
    have = {f"{r['resourceType']}/{r['id']}" for rs in groups.values() for r in rs}
    checked = 0
    for key, resources in groups.items():
        for res in resources:
            if res["resourceType"] not in ("ChargeItem", "PaymentReconciliation"):
                continue
            assert key != csvsource.SHARED
            refs = [
                res.get("subject"),
                res.get("context"),
                res.get("performingOrganization"),
                *(p["actor"] for p in res.get("performer", [])),
                *res.get("supportingInformation", []),
                *(d.get("request") for d in res.get("detail", [])),
                *(d.get("payee") for d in res.get("detail", [])),
            ]
            for ref in refs:
                if ref is not None:
                    assert ref["reference"] in have, (res["id"], ref)
                    checked += 1
    assert checked > 2000
