"""ADT merge events besides A40: A18, A30, A34, A35, A36 and A39 (messages/ADT_A*.yaml).

What the HL7 v2 standard (chapter 3, "merging patient/person information") says each one
carries, and what it must become: the PID segment names the surviving patient, MRG the
records merged into it. A patient merge yields the prior Patient (MRG-1/2/4, rule
MRG-Patient) ``replaced-by`` the PID Patient, which ``replaces`` it — the link
``fhirtwin.mpi.split_patients`` detects a merge from; a merged account (MRG-3) yields the
prior Account (IG: MRG[Account]). A35 merges accounts only: no prior Patient. The sample
messages are synthetic (tests/fixtures/hl7v2/adt/SOURCES.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bundles import assert_references_resolve
from bundles import by_ref as _resolve
from bundles import resources as _all

from fhirtwin.conversion import convert_hl7v2
from fhirtwin.mpi import MPIConfig, linking_identifiers, split_patients

FIXTURES = Path(__file__).parent / "fixtures" / "hl7v2" / "adt"


@dataclass(frozen=True)
class Case:
    file: str
    rules: str  # the messages/ file that must be chosen (CODE_EVENT, not the structure)
    prior_ids: tuple[str, ...]  # the prior Patient's identifiers, in order; () = no prior Patient
    prior_account: str | None  # MRG-3 → the prior Account
    unmapped_mrg: frozenset[str] = frozenset()  # MRG fields the rule does not read (reported)


CASES = [
    Case("adt_a18_merge.hl7", "ADT_A18", ("MRN0815", "ALT0815"), "ACC0815"),
    Case("adt_a30_merge_person.hl7", "ADT_A30", ("E0815",), None),
    Case("adt_a34_merge_patient_id.hl7", "ADT_A34", ("MRN0815",), None),
    Case("adt_a35_merge_account.hl7", "ADT_A35", (), "ACC0815", frozenset({"MRG-1"})),
    Case("adt_a36_merge_patient_account.hl7", "ADT_A36", ("MRN0815",), "ACC0815"),
    Case("adt_a39_merge_person.hl7", "ADT_A39", ("MRN0815", "E0815"), None),
]
PATIENT_MERGES = [c for c in CASES if c.prior_ids]
ACCOUNT_MERGES = [c for c in CASES if c.prior_account]
MSH = "MSH|^~\\&|ADTSYS|CITYHOSP|RCVAPP|RCVFAC|20240306100000+0100||{type}|M1|P|{version}"
PID = "PID|1|E4711^^^ENTERPRISE^PI|MRN4711^^^CITYHOSP^MR||Okafor^Adaeze||19800215|F"


def _convert(name: str) -> Any:
    return convert_hl7v2((FIXTURES / name).read_bytes(), validate=True)


def _msg(*segments: str) -> Any:
    return convert_hl7v2(("\r".join(segments) + "\r").encode(), validate=True)


def _values(res: dict[str, Any]) -> tuple[str, ...]:
    return tuple(i["value"] for i in res.get("identifier", ()))


def _lineage(res: dict[str, Any]) -> str:
    (ext,) = [e for e in res["extension"] if e["url"].endswith("/source-segment")]
    return str(ext["valueString"])


def _unmapped(conv: Any, segment: str) -> set[str]:
    return {f["field"] for f in conv.report["unmapped_fields"] if f["segment"] == segment}


def _ids(cases: list[Case]) -> list[str]:
    return [c.rules for c in cases]


# ---------------------------------------------------------------- every event


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_merge_event_has_its_own_rules_and_valid_output(case: Case) -> None:
    conv = _convert(case.file)
    assert conv.report["message"]["rules"] == f"messages/{case.rules}.yaml"
    assert conv.report["validation"] == []
    assert conv.report["errors"] == []
    assert conv.report["unmapped_segments"] == []
    assert_references_resolve(conv)


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_loss_report_lists_exactly_the_mrg_fields_the_rule_leaves(case: Case) -> None:
    # Every MRG field the rule maps is read; one it does not map is reported, never dropped.
    assert _unmapped(_convert(case.file), "MRG") == case.unmapped_mrg


# ---------------------------------------------------------------- patient merges


@pytest.mark.parametrize("case", PATIENT_MERGES, ids=_ids(PATIENT_MERGES))
def test_merge_links_the_prior_patient_to_the_pid_patient(case: Case) -> None:
    conv = _convert(case.file)
    subjects, priors = split_patients(_all(conv, "Patient"))
    assert len(subjects) == 1 and len(priors) == 1
    (survivor,), (old,) = subjects, priors
    assert _values(survivor)[0] == "MRN4711"
    assert _values(old) == case.prior_ids
    assert _lineage(old).startswith("MRG[")
    assert old["link"] == [
        {"type": "replaced-by", "other": {"reference": f"Patient/{survivor['id']}"}}
    ]
    assert survivor["link"] == [
        {"type": "replaces", "other": {"reference": f"Patient/{old['id']}"}}
    ]
    assert old["active"] is False
    assert old["id"] != survivor["id"]


@pytest.mark.parametrize("case", PATIENT_MERGES, ids=_ids(PATIENT_MERGES))
def test_prior_identifiers_are_ones_the_identity_service_links(case: Case) -> None:
    # mpi.Resolver merges the twins the prior Patient's linking identifiers point at.
    (old,) = split_patients(_all(_convert(case.file), "Patient"))[1]
    linked = linking_identifiers(old, MPIConfig.load())
    assert [k.split("|", 1)[1] for k in linked] == list(case.prior_ids)


def test_a18_prior_alternate_patient_id_mirrors_pid4() -> None:
    conv = _convert("adt_a18_merge.hl7")
    (survivor,), (old,) = split_patients(_all(conv, "Patient"))
    assert _values(survivor) == ("MRN4711", "ALT4711")  # PID-3, PID-4
    assert _values(old) == ("MRN0815", "ALT0815")  # MRG-1, MRG-2
    assert old["identifier"][1]["system"] == survivor["identifier"][1]["system"]


def test_a36_prior_patient_name() -> None:
    (old,) = split_patients(_all(_convert("adt_a36_merge_patient_account.hl7"), "Patient"))[1]
    assert old["name"] == [{"family": "Okafor", "given": ["Ada"]}]  # MRG-7


@pytest.mark.parametrize(
    ("event", "version", "mrg", "prior"),
    [
        ("ADT^A30", "2.3", "MRG||||E0815^^^ENTERPRISE^PI", ("E0815",)),
        ("ADT^A30^ADT_A30", "2.5", "MRG|MRN0815^^^CITYHOSP^MR", ("MRN0815",)),
        ("ADT^A39^ADT_A39", "2.4", "MRG||||E0815^^^ENTERPRISE^PI", ("E0815",)),
        ("ADT^A39^ADT_A39", "2.5", "MRG|MRN0815^^^CITYHOSP^MR", ("MRN0815",)),
        ("ADT^A18", "2.3", "MRG||ALT0815^^^CITYLAB^PI", ("ALT0815",)),
        ("ADT^A18", "2.3", "MRG||||E0815^^^ENTERPRISE^PI", ("E0815",)),
    ],
)
def test_one_prior_identifier_is_enough_for_a_prior_patient(
    event: str, version: str, mrg: str, prior: tuple[str, ...]
) -> None:
    conv = _msg(MSH.format(type=event, version=version), PID, mrg)
    assert conv.report["validation"] == []
    subjects, priors = split_patients(_all(conv, "Patient"))
    assert [_values(p) for p in priors] == [prior]
    assert subjects[0]["link"] == [
        {"type": "replaces", "other": {"reference": f"Patient/{priors[0]['id']}"}}
    ]
    assert _unmapped(conv, "MRG") == set()


# ---------------------------------------------------------------- account merges


@pytest.mark.parametrize("case", ACCOUNT_MERGES, ids=_ids(ACCOUNT_MERGES))
def test_mrg3_is_the_prior_account_of_the_pid_patient(case: Case) -> None:
    conv = _convert(case.file)
    accounts = {_values(a)[0]: a for a in _all(conv, "Account")}
    assert set(accounts) == {"ACC4711", str(case.prior_account)}
    assert accounts["ACC4711"]["status"] == "active"  # IG PID[Account]
    prior = accounts[str(case.prior_account)]
    assert prior["status"] == "unknown"  # IG MRG[Account]
    subjects, _ = split_patients(_all(conv, "Patient"))
    assert _resolve(conv, prior["subject"][0]) is subjects[0]


def test_a34_changes_the_patient_id_only_so_mrg3_is_no_prior_account() -> None:
    conv = _msg(
        MSH.format(type="ADT^A34^ADT_A30", version="2.3.1"),
        PID + "||||||||||ACC4711^^^CITYHOSP^AN",
        "MRG|MRN0815^^^CITYHOSP^MR||ACC4711^^^CITYHOSP^AN",
    )
    assert [_values(a) for a in _all(conv, "Account")] == [("ACC4711",)]  # PID-18 only
    assert len(split_patients(_all(conv, "Patient"))[1]) == 1
    assert _unmapped(conv, "MRG") == {"MRG-3"}  # reported, not dropped


def test_a35_merges_accounts_not_patients() -> None:
    conv = _convert("adt_a35_merge_account.hl7")
    subjects, priors = split_patients(_all(conv, "Patient"))
    assert len(subjects) == 1 and priors == []
    assert "link" not in subjects[0]
    # MRG-1 repeats PID-3 (the same patient): reported, not made into a Patient
    assert _unmapped(conv, "MRG") == {"MRG-1"}


# ---------------------------------------------------------------- other events of these structures


@pytest.mark.parametrize(
    ("event", "mrg"),
    [
        # A42 merges visits: MRG-1 repeats the patient's identifier, MRG-5 the prior visit
        ("ADT^A42^ADT_A39", "MRG|MRN4711^^^CITYHOSP^MR||||V0815^^^CITYHOSP^VN"),
        # A48 changes the alternate patient ID
        ("ADT^A48^ADT_A30", "MRG|MRN4711^^^CITYHOSP^MR|ALT0815^^^CITYLAB^PI"),
    ],
)
def test_an_event_found_by_its_structure_is_not_taken_for_a_merge(event: str, mrg: str) -> None:
    # ADT_A39.yaml / ADT_A30.yaml are also the files of their message structure.
    conv = _msg(MSH.format(type=event, version="2.5"), PID, mrg, "PV1|1|I")
    assert conv.report["validation"] == []
    subjects, priors = split_patients(_all(conv, "Patient"))
    assert len(subjects) == 1 and priors == [] and "link" not in subjects[0]
    assert [_values(a) for a in _all(conv, "Account")] == []
    expected = {f"MRG-{n}" for n, v in enumerate(mrg.split("|")) if n and v}
    assert _unmapped(conv, "MRG") == expected  # reported, not dropped


# ---------------------------------------------------------------- identifier and account changes


def test_a46_changes_the_patient_id_as_a47_does() -> None:
    # Found by its own file, not the structure's: the old MRN is the prior Patient, so the
    # identity service keeps the twin (identifier-change) instead of opening a new one.
    conv = _msg(MSH.format(type="ADT^A46^ADT_A30", version="2.3"), PID, "MRG|MRN0815^^^CITYHOSP^MR")
    assert conv.report["message"]["rules"] == "messages/ADT_A46.yaml"
    assert conv.report["validation"] == []
    subjects, priors = split_patients(_all(conv, "Patient"))
    assert [_values(p) for p in priors] == [("MRN0815",)]
    assert priors[0]["link"][0]["other"]["reference"] == f"Patient/{subjects[0]['id']}"
    assert _unmapped(conv, "MRG") == set()


def test_a49_changes_the_account_number() -> None:
    conv = _msg(
        MSH.format(type="ADT^A49^ADT_A30", version="2.3"),
        PID + "||||||||||ACC4711^^^CITYHOSP^AN",
        "MRG|MRN4711^^^CITYHOSP^MR||ACC0815^^^CITYHOSP^AN",
    )
    assert conv.report["message"]["rules"] == "messages/ADT_A49.yaml"
    accounts = {_values(a)[0]: a["status"] for a in _all(conv, "Account")}
    assert accounts == {"ACC4711": "active", "ACC0815": "unknown"}
    assert split_patients(_all(conv, "Patient"))[1] == []  # the same patient
    assert _unmapped(conv, "MRG") == {"MRG-1"}
