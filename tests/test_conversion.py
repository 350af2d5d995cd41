"""The converter's promises, checked on the shipped examples: deterministic ids, lineage,
loss report, sender profiles, and clear errors."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from fhirtwin import bus
from fhirtwin.conversion import (
    ConversionError,
    HL7ParseError,
    convert_hl7v2,
    convert_hl7v2_batch,
    validation_summary,
)
from fhirtwin.normalize import SourceError, convert_record
from fhirtwin.rules import MappingError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "hl7v2"


def _by_type(bundle: dict, rtype: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def test_same_message_twice_gives_identical_bundles() -> None:
    data = (EXAMPLES / "adt-a01-admit.hl7").read_bytes()
    assert convert_hl7v2(data).bundle == convert_hl7v2(data).bundle


def test_same_patient_and_visit_in_two_messages_get_the_same_ids() -> None:
    admit = convert_hl7v2((EXAMPLES / "adt-a01-admit.hl7").read_bytes()).bundle
    discharge = convert_hl7v2((EXAMPLES / "adt-a03-discharge.hl7").read_bytes()).bundle
    assert _by_type(admit, "Patient")[0]["id"] == _by_type(discharge, "Patient")[0]["id"]
    assert _by_type(admit, "Encounter")[0]["id"] == _by_type(discharge, "Encounter")[0]["id"]
    # …but the two messages' headers are distinct resources.
    assert (
        _by_type(admit, "MessageHeader")[0]["id"] != _by_type(discharge, "MessageHeader")[0]["id"]
    )


def test_patient_demographics_from_pid() -> None:
    bundle = convert_hl7v2((EXAMPLES / "adt-a01-admit.hl7").read_bytes(), validate=True).bundle
    pat = _by_type(bundle, "Patient")[0]
    mrn = next(i for i in pat["identifier"] if i["value"] == "MRN448812")
    assert mrn["system"] == "urn:oid:2.16.840.1.113883.3.9001.1"
    assert mrn["type"]["coding"][0]["code"] == "MR"
    assert pat["name"][0]["family"] == "Okafor"
    assert pat["name"][0]["given"] == ["Adaeze", "N"]
    assert pat["birthDate"] == "1958-02-14"
    assert pat["gender"] == "female"
    assert pat["address"][0]["city"] == "Springfield"
    assert pat["address"][0]["postalCode"] == "62704"
    emails = [t for t in pat["telecom"] if t.get("system") == "email"]
    assert emails and emails[0]["value"] == "adaeze.okafor@example.org"


def test_discharge_finishes_the_encounter_with_its_period() -> None:
    conv = convert_hl7v2((EXAMPLES / "adt-a03-discharge.hl7").read_bytes(), validate=True)
    enc = _by_type(conv.bundle, "Encounter")[0]
    assert enc["status"] == "finished"
    assert enc["period"] == {
        "start": "2026-11-03T09:00:00-05:00",
        "end": "2026-11-06T14:00:00-05:00",
    }
    assert enc["class"]["code"] == "IMP"
    assert conv.report["validation"] == []


def test_every_resource_says_where_it_came_from() -> None:
    bundle = convert_hl7v2((EXAMPLES / "adt-a01-admit.hl7").read_bytes()).bundle
    # One Provenance per message says which message every resource came from (the IG's
    # EVN Provenance, about the event, is another one).
    provs = [
        p
        for p in _by_type(bundle, "Provenance")
        if p.get("entity", [{}])[0].get("what", {}).get("identifier", {}).get("value") == "ADT0001"
    ]
    assert len(provs) == 1
    targets = {t["reference"] for t in provs[0]["target"]}
    for e in bundle["entry"]:
        res = e["resource"]
        if res["resourceType"] == "Provenance":
            continue
        assert f"{res['resourceType']}/{res['id']}" in targets
        assert res["meta"]["source"].endswith(":ADT0001")
    pat = _by_type(bundle, "Patient")[0]
    lineage = [x["valueString"] for x in pat["extension"] if x["url"].endswith("source-segment")]
    # PID made the Patient; NK1 added a contact to it (IG NK1[Patient]).
    assert lineage == ["PID[3],NK1[4]"]


def test_loss_report_names_what_no_rule_used() -> None:
    msg = (
        (EXAMPLES / "adt-a03-discharge.hl7")
        .read_bytes()
        .replace(b"EVN|A03|", b"ZPX|private|site data\rEVN|A03|")
        # PID-38 (production class code): no rule maps it.
        .replace(b"19580214|F", b"19580214|F" + b"|" * 30 + b"XX")
    )
    conv = convert_hl7v2(msg)
    rep = conv.report
    # The Z-segment is kept (default policy) on the MessageHeader, not lost.
    header = _by_type(conv.bundle, "MessageHeader")[0]
    assert any(x.get("valueString") == "ZPX|private|site data" for x in header["extension"])
    # A present field that no rule reads is reported by field…
    assert {"segment": "PID", "index": 4, "field": "PID-38"} in rep["unmapped_fields"]
    # …but not the set id, which the rules read on purpose (ignore: [1]).
    assert not any(u["field"] == "PID-1" for u in rep["unmapped_fields"])


def test_time_without_offset_uses_msh7_and_says_so() -> None:
    msg = (
        (EXAMPLES / "adt-a03-discharge.hl7")
        .read_bytes()
        .replace(b"20261106140000-0500", b"20261106140000")
    )
    conv = convert_hl7v2(msg)
    enc = _by_type(conv.bundle, "Encounter")[0]
    assert enc["period"]["end"] == "2026-11-06T14:00:00-05:00"
    assert any(a["field"] == "PV1-45" and "MSH-7" in a["what"] for a in conv.report["assumptions"])


_BARE_ADT = b"MSH|^~\\&|LAB|NORTH|FT|FT|{ts}||ADT^A08|T1|P|2.5\rPID|1||77^^^H^MR||Doe^Jo\r"


@pytest.mark.parametrize(
    ("msh7", "recorded", "timestamp", "said"),
    [
        # no offset and no rule of its own reading MSH-7: the UTC guess is reported
        ("20250301123000", "2025-03-01T12:30:00+00:00", True, "no UTC offset in '20250301123000'"),
        ("20250301123000+0100", "2025-03-01T12:30:00+01:00", True, None),
        # less than a time of day: an instant still needs one, and the report says so
        ("20250301", "2025-03-01T00:00:00+00:00", False, "'20250301' has no time of day"),
        ("202503", "2025-03-01T00:00:00+00:00", False, "'202503' has no time of day"),
        ("2025", "2025-01-01T00:00:00+00:00", False, "'2025' has no time of day"),
        # the day starts in the message's own offset when it gives one
        ("20250301-0500", "2025-03-01T00:00:00-05:00", False, "(offset: the message's offset"),
    ],
)
def test_message_time_of_any_precision_gives_a_valid_provenance_and_says_what_it_assumed(
    msh7: str, recorded: str, timestamp: bool, said: str | None
) -> None:
    conv = convert_hl7v2(_BARE_ADT.replace(b"{ts}", msh7.encode()), validate=True)
    assert conv.report["validation"] == []
    (prov,) = _by_type(conv.bundle, "Provenance")
    assert prov["recorded"] == recorded
    assert ("timestamp" in conv.bundle) is timestamp
    about_msh7 = [a["what"] for a in conv.report["assumptions"] if a["field"] == "MSH-7"]
    if said is None:
        assert about_msh7 == []
    else:
        assert len(about_msh7) == 1 and said in about_msh7[0], about_msh7


_SFT = b"SFT|Acme^L|{version}|EHR|B42||20240102\r"


@pytest.mark.parametrize("version", [b"8.1", b"", b'""'])
def test_software_install_date_goes_only_on_a_named_version(version: bytes) -> None:
    """SFT-6 (install date) extends Device.version, whose value (SFT-2) is required."""
    msg = _BARE_ADT.replace(b"{ts}", b"20250301123000+0100").replace(
        b"\rPID|", b"\r" + _SFT.replace(b"{version}", version) + b"PID|"
    )
    conv = convert_hl7v2(msg, validate=True)
    assert conv.report["validation"] == []
    (device,) = [d for d in _by_type(conv.bundle, "Device") if d.get("modelNumber") == "B42"]
    unmapped = {u["field"] for u in conv.report["unmapped_fields"]}
    if version == b"8.1":
        (ver,) = device["version"]
        assert ver["value"] == "8.1"
        assert ver["extension"][0]["valueDateTime"] == "2024-01-02"
        assert "SFT-6" not in unmapped
    else:
        assert "version" not in device
        assert "SFT-6" in unmapped  # not placed, and the loss report says so


@pytest.mark.parametrize(
    ("pid25", "kept"), [(b"2", 2), (b"2147483647", 2147483647), (b"2147483648", None)]
)
def test_integers_beyond_fhirs_32_bits_are_dropped_and_reported(
    pid25: bytes, kept: int | None
) -> None:
    pid = b"PID|1||77^^^H^MR||Doe^Jo|||||||||||||||||||Y|" + pid25 + b"\r"
    msg = _BARE_ADT.replace(b"{ts}", b"20250301123000+0100").replace(
        b"PID|1||77^^^H^MR||Doe^Jo\r", pid
    )
    conv = convert_hl7v2(msg, validate=True)
    assert conv.report["validation"] == []
    (patient,) = _by_type(conv.bundle, "Patient")
    assert patient.get("multipleBirthInteger") == kept
    errors = [e for e in conv.report["errors"] if e["field"] == "PID-25"]
    if kept is None:
        assert len(errors) == 1 and "outside FHIR's integer range" in errors[0]["error"]
        assert errors[0]["action"] == "dropped"
    else:
        assert errors == []


def test_explicit_null_counts_as_absent_in_rule_conditions() -> None:
    """PID-24 (multiple birth indicator) is read only when PID-25 (birth order) is absent;
    PID-25 sent as HL7's null '""' holds no order, so the indicator is kept."""
    pid = b'PID|1||77^^^H^MR||Doe^Jo|||||||||||||||||||Y|""\r'
    msg = _BARE_ADT.replace(b"{ts}", b"20250301123000+0100").replace(
        b"PID|1||77^^^H^MR||Doe^Jo\r", pid
    )
    (patient,) = _by_type(convert_hl7v2(msg, validate=True).bundle, "Patient")
    assert patient["multipleBirthBoolean"] is True
    assert "multipleBirthInteger" not in patient


_RAS_BAD_TIMES = (
    b"RXA|0|1|20261104080000-0500|20261104080500-0500|",
    b"RXA|0|1|2026XX|2026YY|",
)


def test_an_element_emptied_by_a_dropped_value_names_that_value_not_the_rules(
    tmp_path: Path,
) -> None:
    """Without a fallback on its lines, RXA-3 and RXA-4 that cannot be read leave
    MedicationAdministration.effective[x] (1..1) empty: the message is rejected, and what to
    fix is the message's RXA-3, not a rule, with or without validation."""
    rules = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", rules)
    seg = rules / "hl7v2" / "segments" / "RXA-MedicationAdministration.yaml"
    seg.write_text(seg.read_text().replace(", else_absent: true", ""))
    bad = (EXAMPLES / "ras-o17-administration.hl7").read_bytes().replace(*_RAS_BAD_TIMES)
    for validate in (False, True):
        with pytest.raises(ConversionError) as exc:
            convert_hl7v2(bad, validate=validate, mappings=rules)
        err = exc.value.to_dict()
        assert err["segment"] == "ORC" and err["segment_index"] == 4  # what made it
        assert err["error"].startswith(
            "ORC made a MedicationAdministration without effective[x], which FHIR R4 "
            "requires: it comes from RXA-3, whose value was dropped: '2026XX' is not a v2 "
            "date/time"
        )
        assert err["hint"].startswith("fix that value in the message")
    # the pipeline's dead letter says the same
    rec = bus.Record("ehr.hl7v2", 0, 7, 0, None, bad, (("fhirtwin-source-kind", b"hl7v2"),))
    with pytest.raises(SourceError) as info:
        convert_record("hl7v2", rec, validate=True, mappings=rules)
    assert info.value.stage == "map"
    assert "from RXA-3, whose value was dropped" in info.value.reason


def test_a_validation_summary_names_the_first_dropped_value() -> None:
    problem = {"path": "entry[3].resource.code", "source": "OBX[5]", "error": "Field required"}
    dropped = {"field": "OBX-3", "error": "'' is not a code"}
    said = validation_summary({"validation": [problem], "errors": [dropped]})
    assert said.startswith(
        "1 FHIR validation problem(s), first: entry[3].resource.code (OBX[5]): Field required"
    )
    assert "1 value(s) of the message were dropped as invalid, first OBX-3" in said
    assert "fix the message" in said


def test_administration_times_that_cannot_be_read_are_marked_absent() -> None:
    """effective[x] has no string form: RXA-3 / RXA-4 that cannot be read become
    data-absent-reason 'error' on effectivePeriod.start / end (else_absent), so the
    administration stays, valid, and the loss report says what was done."""
    bad = (EXAMPLES / "ras-o17-administration.hl7").read_bytes().replace(*_RAS_BAD_TIMES)
    conv = convert_hl7v2(bad, validate=True)
    assert conv.report["validation"] == []
    first = _by_type(conv.bundle, "MedicationAdministration")[0]
    absent = {
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                "valueCode": "error",
            }
        ]
    }
    assert first["effectivePeriod"] == {"_start": absent, "_end": absent}
    actions = {e["field"]: e["action"] for e in conv.report["errors"]}
    assert actions == {
        "RXA-3": "marked absent (data-absent-reason 'error') at effectivePeriod.start",
        "RXA-4": "marked absent (data-absent-reason 'error') at effectivePeriod.end",
    }


def test_a_unit_code_with_a_line_break_is_one_code() -> None:
    """A code may hold single inner spaces only: '\\.br\\' (a line break) inside one is
    read as a space rather than making a Quantity.code no FHIR code matches."""
    msg = (ROOT / "tests" / "fixtures" / "hl7v2" / "pharmacy" / "rde_o11.hl7").read_bytes()
    assert b"|mg^milligram^UCUM|" in msg
    conv = convert_hl7v2(
        msg.replace(b"|mg^milligram^UCUM|", b"|m\\.br\\g^milligram^UCUM|", 1), validate=True
    )
    assert conv.report["validation"] == []
    flat = str(conv.bundle)
    assert "'code': 'm g'" in flat


def test_an_immunization_time_that_cannot_be_read_is_kept_as_text() -> None:
    """Immunization.occurrence[x] (1..1) may be a string: an unreadable RXA-3 is kept there
    (the rule's else_text), so the message stays valid and nothing is lost."""
    msg = (EXAMPLES / "vxu-v04-flu.hl7").read_bytes()
    bad = msg.replace(b"RXA|0|1|20261020101000-0500|", b"RXA|0|1|2026XX|")
    assert bad != msg
    conv = convert_hl7v2(bad, validate=True)
    assert conv.report["validation"] == []
    (imm,) = _by_type(conv.bundle, "Immunization")
    assert imm["occurrenceString"] == "2026XX" and "occurrenceDateTime" not in imm
    (err,) = [e for e in conv.report["errors"] if e["field"] == "RXA-3"]
    assert err["action"] == "kept as text in occurrenceString"
    (good,) = _by_type(convert_hl7v2(msg, validate=True).bundle, "Immunization")
    assert good["occurrenceDateTime"] == "2026-10-20T10:10:00-05:00"


def test_else_text_needs_a_single_primitive(tmp_path: Path) -> None:
    rules = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", rules)
    seg = rules / "hl7v2" / "segments" / "RXA-Immunization.yaml"
    seg.write_text(
        seg.read_text().replace(
            "to: vaccineCode, type: CWE}", "to: vaccineCode, type: CWE, else_text: note}"
        )
    )
    with pytest.raises(MappingError) as exc:
        convert_hl7v2((EXAMPLES / "vxu-v04-flu.hl7").read_bytes(), mappings=rules)
    assert "RXA-Immunization.yaml" in str(exc.value) and "else_text" in str(exc.value)


def test_a_validation_problem_with_nothing_dropped_points_at_the_rules() -> None:
    report = {
        "validation": [{"path": "entry[2].resource.status", "error": "bad", "source": "PV1[3]"}],
        "errors": [],
    }
    said = validation_summary(report)
    assert said.startswith("1 FHIR validation problem(s), first: entry[2].resource.status (PV1[3])")
    assert said.endswith("fix the mapping rule that makes that element")


def test_invalid_date_is_dropped_and_reported_with_its_field() -> None:
    msg = (EXAMPLES / "adt-a03-discharge.hl7").read_bytes().replace(b"19580214", b"19580230")
    conv = convert_hl7v2(msg, validate=True)
    pat = _by_type(conv.bundle, "Patient")[0]
    assert "birthDate" not in pat
    err = conv.report["errors"][0]
    assert err["field"] == "PID-7"
    # …and where: the segment, its position and the byte it starts at in the input.
    assert (err["segment"], err["segment_index"]) == ("PID", 3)
    assert err["byte_offset"] == msg.index(b"PID|")
    assert "19580230" in err["error"] and err["hint"]
    assert conv.report["validation"] == []


def _rules_with(tmp_path: Path, files: dict[str, str]) -> Path:
    """A private copy of mappings/ with some files added or replaced (path → text)."""
    rules = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", rules)
    for rel, text in files.items():
        (rules / rel).write_text(text)
    return rules


def _zxb_rules(tmp_path: Path, resource: str, lines: str) -> Path:
    """Rules for a made-up ZXB^Z01 message: MSH, then ZXB → one ``resource`` (id: message)
    with the given rule lines."""
    return _rules_with(
        tmp_path,
        {
            f"hl7v2/segments/ZXB-{resource}.yaml": (
                f"segment: ZXB\nresource: {resource}\nid: message\nfields:\n{lines}"
            ),
            "hl7v2/messages/ZXB_Z01.yaml": (
                "segments:\n  - {segment: MSH, rule: MSH-MessageHeader, as: header}\n"
                f"  - {{segment: ZXB, rule: ZXB-{resource}}}\n"
            ),
        },
    )


def _profile(tmp_path: Path, text: str) -> Path:
    return _rules_with(
        tmp_path, {"senders/northgen.yaml": "match: {application: EPICADT}\n" + text}
    )


def test_sender_profile_can_reject_invalid_values(tmp_path: Path) -> None:
    rules = _profile(
        tmp_path,
        "invalid_values: reject\ntimezone: America/Chicago\n"
        "identifier_systems: {NORTHGEN: 'http://northgen.example.org/sid/mrn'}\n",
    )
    msg = (EXAMPLES / "adt-a03-discharge.hl7").read_bytes().replace(b"19580214", b"19580230")
    with pytest.raises(ConversionError) as exc:
        convert_hl7v2(msg, mappings=rules)
    assert exc.value.field == "PID-7"
    assert "19580230" in str(exc.value)
    assert "segment 3 (PID)" in str(exc.value) and exc.value.to_dict()["byte_offset"] > 0


def test_sender_profile_timezone_applies_when_message_has_none(tmp_path: Path) -> None:
    rules = _profile(tmp_path, "timezone: Europe/Berlin\n")
    msg = (EXAMPLES / "adt-a03-discharge.hl7").read_bytes()
    msg = msg.replace(b"20261106143000-0500", b"20260706143000")  # MSH-7 without offset
    msg = msg.replace(b"20261106140000-0500", b"20260706140000")
    conv = convert_hl7v2(msg, mappings=rules)
    enc = _by_type(conv.bundle, "Encounter")[0]
    assert enc["period"]["end"] == "2026-07-06T14:00:00+02:00"  # Berlin summer time
    assert conv.report["message"]["profile"] == "northgen"
    # a message time of a day only: Provenance.recorded is that day's first instant in Berlin
    day = msg.replace(b"20260706143000", b"20260706", 1)
    provs = _by_type(convert_hl7v2(day, mappings=rules, validate=True).bundle, "Provenance")
    (message_prov,) = [p for p in provs if p["activity"]["coding"][0]["code"] == "CREATE"]
    assert message_prov["recorded"] == "2026-07-06T00:00:00+02:00"


def test_unknown_message_type_says_which_file_to_add() -> None:
    msg = (EXAMPLES / "adt-a03-discharge.hl7").read_bytes().replace(b"ADT^A03^ADT_A03", b"QRY^Q99")
    with pytest.raises(ConversionError) as exc:
        convert_hl7v2(msg)
    assert "messages/QRY_Q99.yaml" in str(exc.value)
    assert exc.value.field == "MSH-9"


@pytest.mark.parametrize(
    ("msh9", "said"),
    [
        (b"ADT", "MSH-9 is 'ADT^': it names no trigger event"),
        (b"^A03", "MSH-9 is '^A03': it names no message code"),
        (b"adt^a03", "upper case (tables 0076, 0003): send ADT^A03"),
    ],
)
def test_a_message_type_the_sender_got_wrong_says_what_to_send(msh9: bytes, said: str) -> None:
    msg = (EXAMPLES / "adt-a03-discharge.hl7").read_bytes().replace(b"ADT^A03^ADT_A03", msh9)
    with pytest.raises(ConversionError) as exc:
        convert_hl7v2(msg)
    assert said in str(exc.value)
    assert "messages/" not in str(exc.value)  # not a rules file to add
    assert exc.value.field == "MSH-9"


def test_garbage_is_a_parse_error_with_a_hint() -> None:
    with pytest.raises(HL7ParseError) as exc:
        convert_hl7v2(b"PID|1||123\r")
    d = exc.value.to_dict()
    assert d["field"] == "MSH-1" and d["byte_offset"] == 0 and "MSH" in d["hint"]


def test_batch_file_yields_every_message() -> None:
    results = convert_hl7v2_batch((EXAMPLES / "batch-adt.hl7").read_bytes())
    assert [r.bundle["identifier"]["value"] for r in results] == ["ADT0003", "ADT0004"]


def test_batch_with_a_bad_message_reports_it_and_converts_the_rest() -> None:
    data = (EXAMPLES / "batch-adt.hl7").read_bytes().replace(b"ADT^A04^ADT_A01", b"XYZ^Z01")
    results = convert_hl7v2_batch(data)
    assert not isinstance(results[0], Exception)
    assert isinstance(results[1], ConversionError)


def test_sender_profile_zsegment_policies(tmp_path: Path) -> None:
    msg = (
        (EXAMPLES / "adt-a03-discharge.hl7")
        .read_bytes()
        .replace(b"EVN|A03|", b"ZPX|private\rEVN|A03|")
    )
    conv = convert_hl7v2(msg, mappings=_profile(tmp_path / "i", "zsegments: ignore\n"))
    assert {
        "segment": "ZPX",
        "index": 2,
        "reason": "Z-segment ignored by sender profile",
    } in conv.report["unmapped_segments"]
    with pytest.raises(ConversionError) as exc:
        convert_hl7v2(msg, mappings=_profile(tmp_path / "r", "zsegments: reject\n"))
    assert exc.value.field == "ZPX"


def test_sender_profile_identifier_systems_and_local_codes(tmp_path: Path) -> None:
    rules = _profile(
        tmp_path,
        "identifier_systems: {SSA: 'http://hl7.org/fhir/sid/us-ssn'}\n"
        "code_maps: {AdministrativeSex: {X: {code: other, display: Other}}}\n",
    )
    msg = (EXAMPLES / "adt-a01-admit.hl7").read_bytes()
    msg = msg.replace(b"^SSA&2.16.840.1.113883.4.1&ISO^SS", b"^SSA^SS").replace(b"|F||", b"|X||")
    conv = convert_hl7v2(msg, mappings=rules)
    pat = _by_type(conv.bundle, "Patient")[0]
    ssn = next(i for i in pat["identifier"] if i["value"] == "987-65-4321")
    assert ssn["system"] == "http://hl7.org/fhir/sid/us-ssn"
    assert pat["gender"] == "other"
    assert all(c["code"] != "X" for c in conv.report["untranslated_codes"])


def test_sender_profile_forces_a_charset_over_msh18(tmp_path: Path) -> None:
    rules = _profile(tmp_path, "charset: 8859/1\ntrust_msh18: false\n")
    msg = (
        (EXAMPLES / "adt-a03-discharge.hl7")
        .read_bytes()
        .replace(b"Okafor^Adaeze", "Okafor^Adaëze".encode("latin-1"))
    )
    conv = convert_hl7v2(msg, mappings=rules)
    assert _by_type(conv.bundle, "Patient")[0]["name"][0]["given"][0] == "Adaëze"
    # Without the profile the same bytes are not UTF-8: read as windows-1252, with a note.
    conv = convert_hl7v2(msg)
    assert _by_type(conv.bundle, "Patient")[0]["name"][0]["given"][0] == "Adaëze"
    assert any("windows-1252" in n for n in conv.report["notes"])


def test_two_results_sharing_an_identifier_are_both_kept_and_reported() -> None:
    # A sender reusing OBX-21 for two different results must not lose the second one.
    msg = (EXAMPLES / "oru-r01-cmp.hl7").read_bytes()
    lines = msg.split(b"\r")
    for i, line in enumerate(lines):
        if line.startswith((b"OBX|1|", b"OBX|2|")):
            lines[i] = line + b"|||||||OBXID-1^LABSYS"
    conv = convert_hl7v2(b"\r".join(lines), validate=True)
    values = sorted(
        o["valueQuantity"]["value"]
        for o in _by_type(conv.bundle, "Observation")
        if "valueQuantity" in o
    )
    assert values == [1.4, 4.1, 182]
    assert any("same identifier" in a["what"] for a in conv.report["assumptions"])
    assert conv.report["validation"] == []


def test_rule_options_if_empty_and_optional_into(tmp_path: Path) -> None:
    rules = _rules_with(
        tmp_path,
        {
            "hl7v2/segments/ZXA-Observation.yaml": (
                "segment: ZXA\nresource: Observation\nid: message\nfields:\n"
                "  - {to: status, value: final}\n"
                "  - {field: 1, to: code.text}\n"
                "  - {field: 2, to: code.text, if_empty: true}\n"
                "  - {field: 3, to: valueString}\n"
            ),
            "hl7v2/messages/ZXA_Z01.yaml": (
                "segments:\n"
                "  - {segment: MSH, rule: MSH-MessageHeader, as: header}\n"
                "  - {segment: ZXA, rule: ZXA-Observation}\n"
                "  - {segment: ZXA, rule: ZXA-Observation, into: report, optional: true}\n"
                "  - {segment: ZXA, rule: ZXA-Observation, into: order}\n"
            ),
        },
    )
    head = b"MSH|^~\\&|APP|FAC|||20260101120000+0000||ZXA^Z01|Z1|P|2.5\r"

    def obs(line: bytes) -> tuple[dict, dict]:
        conv = convert_hl7v2(head + line + b"\r", mappings=rules)
        return _by_type(conv.bundle, "Observation")[0], conv.report

    first, report = obs(b"ZXA|first|second|v")
    assert first["code"]["text"] == "first"  # if_empty: the second line did not overwrite it
    second, _ = obs(b"ZXA||second|v")
    assert second["code"]["text"] == "second"  # …but fills it when the first left it empty
    reasons = [u["reason"] for u in report["unmapped_segments"]]
    assert any("no order before it" in r for r in reasons)  # a plain into: is reported
    assert not any("report" in r for r in reasons)  # an optional one is not


def test_pharmacy_administration_becomes_medication_administration() -> None:
    conv = convert_hl7v2((EXAMPLES / "ras-o17-administration.hl7").read_bytes(), validate=True)
    assert conv.report["validation"] == []
    given, refused = _by_type(conv.bundle, "MedicationAdministration")
    assert given["status"] == "completed"
    assert given["medicationCodeableConcept"]["coding"][0] == {
        "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
        "code": "310798",
        "display": "Furosemide 40 MG Oral Tablet",
    }
    assert given["effectivePeriod"] == {
        "start": "2026-11-04T08:00:00-05:00",
        "end": "2026-11-04T08:05:00-05:00",
    }
    assert given["dosage"]["dose"]["value"] == 40
    assert given["dosage"]["dose"]["code"] == "mg"
    assert given["dosage"]["route"]["coding"][0]["code"] == "PO"
    assert given["note"][0]["text"] == "Given with breakfast."
    assert refused["status"] == "not-done"
    pat = _by_type(conv.bundle, "Patient")[0]
    assert given["subject"]["reference"] == f"Patient/{pat['id']}"


def test_an_allergy_resent_in_a_later_message_keeps_its_id() -> None:
    # AL1 carries no identifier: the id comes from patient + substance (id: keys), so an
    # update (here a new severity) replaces the allergy in the twin instead of adding one.
    admit = (EXAMPLES / "adt-a01-admit.hl7").read_bytes()
    update = admit.replace(b"ADT^A01^ADT_A01|ADT0001", b"ADT^A08^ADT_A01|ADT0009").replace(
        b"|SV|Hives", b"|MO|Hives"
    )
    first = _by_type(convert_hl7v2(admit).bundle, "AllergyIntolerance")[0]
    again = _by_type(convert_hl7v2(update, validate=True).bundle, "AllergyIntolerance")[0]
    assert first["id"] == again["id"]
    assert first["criticality"] == "high"  # SV (severe), IG AllergySeverity map
    assert "criticality" not in again  # MO (moderate) has no criticality in that map


def test_a_rule_that_breaks_on_a_message_gives_a_conversion_error(tmp_path: Path) -> None:
    # Two lines writing a text and then an object under it: a rule bug, not a message bug.
    rules = _zxb_rules(
        tmp_path,
        "Observation",
        "  - {to: status, value: final}\n  - {field: 1, to: code}\n  - {field: 2, to: code.text}\n",
    )
    msg = b"MSH|^~\\&|APP|FAC|||20260101120000+0000||ZXB^Z01|Z2|P|2.5\rZXB|a|b\r"
    with pytest.raises(ConversionError) as exc:
        convert_hl7v2(msg, mappings=rules)
    err = exc.value.to_dict()
    assert err["segment"] == "ZXB" and err["segment_index"] == 2
    assert "ZXB-Observation" in err["error"] and err["hint"]


def test_rule_options_unless_has_and_unique(tmp_path: Path) -> None:
    plac = "{type: {coding: [{code: PLAC}]}}"
    rules = _zxb_rules(
        tmp_path,
        "Observation",
        "  - {to: status, value: final}\n"
        "  - {to: code.text, value: test}\n"
        f"  - {{field: 1, to: 'identifier[]', type: EI, with: {plac}}}\n"
        f"  - {{field: 2, to: 'identifier[]', type: EI, with: {plac}, "
        "unless_has: {path: identifier.type.coding.code, value: PLAC}}\n"
        "  - {field: 3, to: 'note[].text', rep: all}\n"
        "  - {field: 4, to: 'note[].text', rep: all, unique: true}\n",
    )
    head = b"MSH|^~\\&|APP|FAC|||20260101120000+0000||ZXB^Z01|Z1|P|2.5\r"

    def order(line: bytes) -> dict:
        conv = convert_hl7v2(head + line + b"\r", mappings=rules)
        return _by_type(conv.bundle, "Observation")[0]

    first = order(b"ZXB|P1|P2|a|a~b")
    assert [i["value"] for i in first["identifier"]] == ["P1"]  # P2 skipped: a PLAC is there
    assert [n["text"] for n in first["note"]] == ["a", "b"]  # unique: the second 'a' is dropped
    second = order(b"ZXB||P2")
    assert [i["value"] for i in second["identifier"]] == ["P2"]  # no PLAC yet: filled


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("extends: _ADT_EVENT\nsegments:\n", None),  # an empty list: nothing of its own
        ("extends: _ADT_EVENT\nsegments: {segment: MRG}\n", "expected a list of entries"),
        ("extends: _ADT_EVENT\nsegments:\n  - MRG\n", "segments[0]: each entry needs"),
        ("- just a list\n", "expected a mapping"),
        (  # PyYAML alone would keep the second and silently drop PID
            "extends: _ADT_EVENT\nrequires: {PID: the patient}\nsegments:\n"
            "requires: {MRG: the record}\n",
            "found the key 'requires' a second time (first on line 2)",
        ),
    ],
)
def test_a_malformed_message_rule_file_says_where(
    tmp_path: Path, text: str, says: str | None
) -> None:
    """An engineer editing a rule file gets the file and the entry, not a TypeError."""
    from fhirtwin.rules import MappingError, load_rules

    rules = _rules_with(tmp_path, {"hl7v2/messages/ADT_A34.yaml": text})
    if says is None:
        assert load_rules(rules).messages["ADT_A34"].entries
        return
    with pytest.raises(MappingError, match=r"ADT_A34\.yaml") as err:
        load_rules(rules)
    assert says in str(err.value)


def _without(sample: str, *names: bytes) -> bytes:
    """A shipped sample with every segment of the given names left out."""
    data = (EXAMPLES / sample).read_bytes()
    lines = data.replace(b"\r\n", b"\r").split(b"\r")
    return b"\r".join(x for x in lines if x[:3] not in names)


@pytest.mark.parametrize(
    ("sample", "sent"),
    [("adt-a01-admit.hl7", "ADT^A01"), ("vxu-v04-flu.hl7", "VXU^V04")],
)
def test_a_message_without_the_patient_its_type_requires_is_rejected(
    sample: str, sent: str
) -> None:
    # ADT and VXU name their patient in PID (HL7 v2 message structures): without it the
    # allergy, diagnosis or vaccination would belong to no one, so nothing is made.
    with pytest.raises(ConversionError) as exc:
        convert_hl7v2(_without(sample, b"PID"))
    err = exc.value.to_dict()
    assert err["field"] == "PID"
    assert f"this {sent} message has no PID segment" in err["error"]
    assert "include it" in err["hint"] and "'requires'" in err["hint"]


def test_a_merge_without_mrg_is_rejected_not_taken_as_an_update() -> None:
    msg = _without("adt-a01-admit.hl7", b"NK1", b"AL1", b"DG1").replace(
        b"ADT^A01^ADT_A01", b"ADT^A40^ADT_A39"
    )
    convert_hl7v2(msg.replace(b"\rPV1", b"\rMRG|MRN1^^^NORTHGEN^MR\rPV1"), validate=True)
    with pytest.raises(ConversionError, match="no MRG segment"):
        convert_hl7v2(msg)


def test_results_without_a_patient_convert_only_where_fhir_allows() -> None:
    # ORU's patient group is optional in HL7 v2 (results on an environmental specimen), and
    # an Observation's subject is optional in FHIR: OBX alone converts.
    alone = _without("oru-r01-cmp.hl7", b"PID", b"PV1", b"ORC", b"OBR")
    conv = convert_hl7v2(alone, validate=True)
    assert conv.ok, conv.report["validation"]
    observations = _by_type(conv.bundle, "Observation")
    assert len(observations) == 4 and not any("subject" in o for o in observations)
    # but the order's ServiceRequest must have a subject: the whole message is rejected
    # at the first segment that needs the patient, not turned into an order for no one
    with pytest.raises(ConversionError) as exc:
        convert_hl7v2(_without("oru-r01-cmp.hl7", b"PID"))
    err = exc.value.to_dict()
    assert (err["segment"], err["segment_index"]) == ("ORC", 3)
    assert err["error"] == (
        "ORC made a ServiceRequest without subject, which FHIR R4 requires: it refers to the "
        "patient made from PID, and the message has no PID"
    )
    assert err["hint"] == "have the sender include PID, then replay the message"


def test_a_resource_that_needs_the_patient_before_any_pid_is_rejected() -> None:
    # ORU's patient group is optional, but a Condition must have a subject: a DG1 with no
    # PID before it cannot become one. Where the PID is, the error says.
    head, pid, dg1 = (
        b"MSH|^~\\&|APP|FAC|||20260101120000+0000||ORU^R01^ORU_R01|R1|P|2.5\r",
        b"PID|1||MRN1^^^FAC^MR||Doe^Jo\r",
        b"DG1|1||I10^Hypertension^I10\r",
    )
    good = convert_hl7v2(head + pid + dg1, validate=True)
    assert good.ok and _by_type(good.bundle, "Condition")[0]["subject"]["reference"]

    with pytest.raises(ConversionError) as exc:
        convert_hl7v2(head + dg1)
    err = exc.value.to_dict()
    assert (err["segment"], err["segment_index"], err["byte_offset"]) == ("DG1", 2, len(head))
    assert err["error"] == (
        "DG1 made a Condition without subject, which FHIR R4 requires: it refers to the "
        "patient made from PID, and the message has no PID"
    )

    with pytest.raises(ConversionError) as exc:
        convert_hl7v2(head + dg1 + pid)
    assert "PID comes after it (segment 3)" in str(exc.value)
    assert "send PID before the segments that refer to it" in exc.value.hint


def test_a_reference_filled_by_a_later_segment_is_not_missing() -> None:
    # REF^I12 sends RF1 before PID; the referral's subject comes from the PID after it.
    msg = (
        b"MSH|^~\\&|APP|FAC|||20260101120000+0000||REF^I12^REF_I12|F1|P|2.5\r"
        b"RF1|P^Pending^HL70283|||||REF1\r"
        b"PID|1||MRN1^^^FAC^MR||Doe^Jo\r"
    )
    conv = convert_hl7v2(msg, validate=True)
    assert conv.ok, conv.report["validation"]
    (referral,) = _by_type(conv.bundle, "ServiceRequest")
    (patient,) = _by_type(conv.bundle, "Patient")
    assert referral["subject"] == {"reference": f"Patient/{patient['id']}"}


@pytest.mark.parametrize(
    "text",
    [
        "extends: _ADT_EVENT\nrequires: [MRG]\nsegments:\n",
        "extends: _ADT_EVENT\nrequires: {mrg: the record}\nsegments:\n",
        "extends: _ADT_EVENT\nrequires: {MRG: ''}\nsegments:\n",
    ],
)
def test_a_malformed_requires_says_what_to_write(tmp_path: Path, text: str) -> None:
    from fhirtwin.rules import load_rules

    rules = _rules_with(tmp_path, {"hl7v2/messages/ADT_A34.yaml": text})
    with pytest.raises(MappingError, match=r"ADT_A34\.yaml requires: .*'PID: the patient"):
        load_rules(rules)


def test_requires_is_inherited_and_extended() -> None:
    from fhirtwin.rules import load_rules

    messages = load_rules(None).messages
    assert dict(messages["ADT_A40"].requires) == {
        "PID": "the patient the message is about",
        "MRG": "the patient record merged into this one",
    }
    assert dict(messages["BAR_P01"].requires) == {"PID": "the patient the message is about"}
    assert dict(messages["RDS_O13"].requires) == {
        "ORC": "the order the message is about",
        "RXD": "the dispense the message is about",
    }
    assert not messages["ORU_R01"].requires  # HL7 v2: ORU's patient group is optional


@pytest.mark.parametrize(
    ("sample", "cut", "says"),
    [
        ("siu-s12-booking.hl7", b"SCH", "this SIU^S12 message has no SCH segment (the appointment"),
        ("ras-o17-administration.hl7", b"RXA", "this RAS^O17 message has no RXA segment"),
    ],
)
def test_a_message_without_what_it_is_about_is_rejected_not_listed_unmapped(
    sample: str, cut: bytes, says: str
) -> None:
    # Without SCH, the AIL and AIP of the appointment used to be listed as unmapped and
    # the message taken as converted, with the appointment gone.
    with pytest.raises(ConversionError, match=re.escape(says)):
        convert_hl7v2(_without(sample, cut))


_VACCINE = b"150^Influenza, injectable, quadrivalent, preservative free^CVX"


@pytest.mark.parametrize(
    ("change", "why", "hint"),
    [
        (
            lambda m: m.replace(_VACCINE, b""),
            "ORC made an Immunization without vaccineCode, which FHIR R4 requires: it comes "
            "from RXA-5 (segment 4), which the message left empty",
            "have the sender fill RXA-5, then replay the message",
        ),
        (
            lambda m: m.replace(_VACCINE, b'""'),  # HL7's null: no vaccine either
            "it comes from RXA-5 (segment 4), which the message left empty",
            "have the sender fill RXA-5",
        ),
        (
            lambda m: _without("vxu-v04-flu.hl7", b"RXA"),
            "ORC made an Immunization without status, which FHIR R4 requires: it comes from "
            "RXA, and no RXA came with this ORC",
            "send RXA in the ORC's group",
        ),
    ],
)
def test_an_order_without_what_its_group_must_give_names_the_segment_and_field(
    change: Any, why: str, hint: str
) -> None:
    # With validation off too: an Immunization without a vaccine must not reach the twin.
    msg = change((EXAMPLES / "vxu-v04-flu.hl7").read_bytes())
    for validate in (False, True):
        with pytest.raises(ConversionError) as exc:
            convert_hl7v2(msg, validate=validate)
        err = exc.value.to_dict()
        assert (err["segment"], err["segment_index"]) == ("ORC", 3)
        assert why in err["error"] and err["hint"].startswith(hint)


def test_a_required_element_no_rule_fills_is_a_rules_error(tmp_path: Path) -> None:
    rules = _zxb_rules(
        tmp_path,
        "ServiceRequest",
        "  - {to: status, value: active}\n  - {field: 1, to: intent, type: code}\n",
    )
    msg = b"MSH|^~\\&|APP|FAC|||20260101120000+0000||ZXB^Z01|Z3|P|2.5\rZXB|order\r"
    with pytest.raises(ConversionError) as exc:
        convert_hl7v2(msg, mappings=rules)
    assert str(exc.value).startswith(
        "ZXB made a ServiceRequest without subject, which FHIR R4 requires: no rule of "
        "messages/ZXB_Z01.yaml gives it"
    )
    assert exc.value.hint == "add a line that fills ServiceRequest.subject to the rules of ZXB"
