"""The consent engine against every rule of ../shared/CONSENT.md, one table row per case, plus
the 12 official R4 Consent examples and the ``fhirtwin consent decide`` command."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from fhirtwin.consent import (
    DENY,
    INDETERMINATE,
    NOT_APPLICABLE,
    PERMIT,
    ConsentError,
    RequestError,
    decide,
    prepare,
    terminology,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
ORG = "urn:oid:1.2.3|sim-care"
APP = "urn:oid:1.2.4|app-7"
AR = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
CONF = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
TYPES = "http://hl7.org/fhir/resource-types"
LOINC = "http://loinc.org"
REQ: dict[str, Any] = {"actor": [ORG, APP], "purpose": ["TREAT"], "scope": "patient-privacy"}


def consent(provision: dict[str, Any] | None, **kw: Any) -> dict[str, Any]:
    c: dict[str, Any] = {
        "resourceType": "Consent",
        "id": "c1",
        "status": "active",
        "scope": {"coding": [{"system": SCOPE, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
        "patient": {"reference": "Patient/p1"},
    }
    if provision is not None:
        c["provision"] = provision
    c.update(kw)
    return {k: v for k, v in c.items() if v is not None}


def prov(type_: str | None = None, *children: dict[str, Any], **kw: Any) -> dict[str, Any]:
    p: dict[str, Any] = {"type": type_} if type_ else {}
    p.update(kw)
    if children:
        p["provision"] = list(children)
    return p


def by_id(system: str, value: str) -> dict[str, Any]:
    return {"reference": {"identifier": {"system": system, "value": value}}}


def by_ref(ref: str) -> dict[str, Any]:
    return {"reference": {"reference": ref}}


def purposes(*codes: str, system: str = AR) -> list[dict[str, str]]:
    return [{"system": system, "code": c} for c in codes]


def labels(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"system": s, "code": c} for s, c in pairs]


def classes(*types: str) -> list[dict[str, str]]:
    return [{"system": TYPES, "code": t} for t in types]


def loinc(code: str) -> list[dict[str, Any]]:
    return [{"coding": [{"system": LOINC, "code": code}]}]


def obs(
    id_: str = "o1",
    *,
    sec: tuple[tuple[str, str], ...] = (),
    code: str = "1234-5",
    when: str | None = "2022-03-04T10:00:00Z",
    **extra: Any,
) -> dict[str, Any]:
    r: dict[str, Any] = {
        "resourceType": "Observation",
        "id": id_,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": "Patient/p1"},
    }
    if sec:
        r["meta"] = {"security": labels(*sec)}
    if when:
        r["effectiveDateTime"] = when
    r.update(extra)
    return r


COND = {"resourceType": "Condition", "id": "cd1", "subject": {"reference": "Patient/p1"}}
ORG_RES = {
    "resourceType": "Organization",
    "id": "o1",
    "identifier": [
        {"system": "urn:oid:9.9", "value": "x"},
        {"system": "urn:oid:1.2.3", "value": "sim-care"},
    ],
}
OTHER_ORG = {
    "resourceType": "Organization",
    "id": "o2",
    "identifier": [{"system": "urn:oid:9.9", "value": "y"}],
}
ENC = {
    "resourceType": "Encounter",
    "id": "e1",
    "status": "finished",
    "serviceProvider": {"reference": "Organization/o1"},
}

PERMIT_ALL = prov("permit")
DENY_ALL = prov("deny")

# (id, consents, request changes, resource, known, expected)
Case = tuple[str, list[dict[str, Any]], dict[str, Any], dict[str, Any] | None, list[Any], str]

CASES: list[Case] = [
    # -- rule 1: status ----------------------------------------------------------------
    ("status-active", [consent(PERMIT_ALL)], {}, None, [], PERMIT),
    *[
        (f"status-{s}", [consent(PERMIT_ALL, status=s)], {}, None, [], NOT_APPLICABLE)
        for s in ("draft", "proposed", "rejected", "inactive", "entered-in-error")
    ],
    ("status-deny-inactive", [consent(DENY_ALL, status="inactive")], {}, None, [], NOT_APPLICABLE),
    # -- rule 1: root period -----------------------------------------------------------
    (
        "period-in",
        [consent(prov("permit", period={"start": "2025-01-01", "end": "2027-01-01"}))],
        {},
        None,
        [],
        PERMIT,
    ),
    (
        "period-ended",
        [consent(prov("permit", period={"start": "2020-01-01", "end": "2025-12-31"}))],
        {},
        None,
        [],
        NOT_APPLICABLE,
    ),
    (
        "period-not-started",
        [consent(prov("permit", period={"start": "2026-02-01"}))],
        {},
        None,
        [],
        NOT_APPLICABLE,
    ),
    (
        "period-end-day-inclusive",
        [consent(prov("permit", period={"end": "2026-01-01"}))],
        {},
        None,
        [],
        PERMIT,
    ),
    (
        "period-deny-ended",
        [consent(prov("deny", period={"end": "2025-01-01"}))],
        {},
        None,
        [],
        NOT_APPLICABLE,
    ),
    # -- rule 1: scope -----------------------------------------------------------------
    (
        "scope-mismatch",
        [consent(PERMIT_ALL, scope={"coding": [{"system": SCOPE, "code": "research"}]})],
        {},
        None,
        [],
        NOT_APPLICABLE,
    ),
    (
        "scope-treatment-consent",
        [consent(DENY_ALL, scope={"coding": [{"system": SCOPE, "code": "treatment"}]})],
        {},
        None,
        [],
        NOT_APPLICABLE,
    ),
    (
        "scope-from-category",
        [
            consent(
                PERMIT_ALL,
                scope=None,
                category=[
                    {"coding": [{"system": SCOPE, "code": "patient-privacy"}]},
                    {"coding": [{"system": LOINC, "code": "59284-0"}]},
                ],
            )
        ],
        {},
        None,
        [],
        PERMIT,
    ),
    (
        "scope-research-match",
        [consent(PERMIT_ALL, scope={"coding": [{"system": SCOPE, "code": "research"}]})],
        {"scope": "research", "purpose": ["CLINTRCH"]},
        None,
        [],
        PERMIT,
    ),
    (
        "scope-unknown-permit-fails-closed",
        [consent(PERMIT_ALL, scope=None)],
        {},
        None,
        [],
        NOT_APPLICABLE,
    ),
    ("scope-unknown-deny-applies", [consent(DENY_ALL, scope=None)], {}, None, [], DENY),
    # -- rule 1: root purpose ----------------------------------------------------------
    (
        "root-purpose-subsumes",
        [consent(prov("permit", purpose=purposes("TREAT")))],
        {"purpose": ["ETREAT"]},
        None,
        [],
        PERMIT,
    ),
    (
        "root-purpose-narrower",
        [consent(prov("permit", purpose=purposes("ETREAT")))],
        {},
        None,
        [],
        NOT_APPLICABLE,
    ),
    (
        "root-purpose-other",
        [consent(prov("deny", purpose=purposes("HMARKT")))],
        {},
        None,
        [],
        NOT_APPLICABLE,
    ),
    (
        "root-purpose-research",
        [
            consent(
                prov("permit", purpose=purposes("HRESCH")),
                scope={"coding": [{"system": SCOPE, "code": "research"}]},
            )
        ],
        {"scope": "research", "purpose": ["CLINTRCH"]},
        None,
        [],
        PERMIT,
    ),
    # -- rule 2: nested provisions, depth 1 to 3 ---------------------------------------
    (
        "depth1-permit-under-deny",
        [consent(prov("deny", prov("permit", actor=[by_id("urn:oid:1.2.3", "sim-care")])))],
        {},
        None,
        [],
        PERMIT,
    ),
    (
        "depth1-no-match-keeps-root",
        [consent(prov("deny", prov("permit", actor=[by_id("urn:oid:1.2.3", "other")])))],
        {},
        None,
        [],
        DENY,
    ),
    (
        "depth2-exception-to-exception",
        [
            consent(
                prov(
                    "permit",
                    prov(
                        "deny",
                        prov("permit", code=loinc("1111-1")),
                        **{"class": classes("Observation")},
                    ),
                )
            )
        ],
        {},
        obs(code="1111-1"),
        [],
        PERMIT,
    ),
    (
        "depth2-exception-applies",
        [
            consent(
                prov(
                    "permit",
                    prov(
                        "deny",
                        prov("permit", code=loinc("1111-1")),
                        **{"class": classes("Observation")},
                    ),
                )
            )
        ],
        {},
        obs(code="2222-2"),
        [],
        DENY,
    ),
    (
        "depth2-outside-exception",
        [
            consent(
                prov(
                    "permit",
                    prov(
                        "deny",
                        prov("permit", code=loinc("1111-1")),
                        **{"class": classes("Observation")},
                    ),
                )
            )
        ],
        {},
        COND,
        [],
        PERMIT,
    ),
    (
        "depth3-deepest-wins",
        [
            consent(
                prov(
                    "permit",
                    prov(
                        "deny",
                        prov(
                            "permit",
                            prov("deny", securityLabel=labels((CONF, "R"))),
                            code=loinc("1111-1"),
                        ),
                        **{"class": classes("Observation")},
                    ),
                )
            )
        ],
        {},
        obs(code="1111-1", sec=((CONF, "R"),)),
        [],
        DENY,
    ),
    (
        "depth3-not-matching-leaf",
        [
            consent(
                prov(
                    "permit",
                    prov(
                        "deny",
                        prov(
                            "permit",
                            prov("deny", securityLabel=labels((CONF, "R"))),
                            code=loinc("1111-1"),
                        ),
                        **{"class": classes("Observation")},
                    ),
                )
            )
        ],
        {},
        obs(code="1111-1", sec=((CONF, "N"),)),
        [],
        PERMIT,
    ),
    (
        "siblings-deny-overrides-within-consent",
        [
            consent(
                prov(
                    "deny",
                    prov("permit", **{"class": classes("Observation")}),
                    prov("deny", code=loinc("1111-1")),
                )
            )
        ],
        {},
        obs(code="1111-1"),
        [],
        DENY,
    ),
    # -- rule 2: actor -----------------------------------------------------------------
    (
        "actor-by-identifier-second",
        [consent(prov("deny", prov("permit", actor=[by_id("urn:oid:1.2.4", "app-7")])))],
        {},
        None,
        [],
        PERMIT,
    ),
    (
        "actor-any-of-several",
        [
            consent(
                prov(
                    "deny",
                    prov(
                        "permit",
                        actor=[by_id("urn:x", "nobody"), by_id("urn:oid:1.2.3", "sim-care")],
                    ),
                )
            )
        ],
        {},
        None,
        [],
        PERMIT,
    ),
    (
        "actor-by-reference-known",
        [consent(prov("deny", prov("permit", actor=[by_ref("Organization/o1")])))],
        {},
        None,
        [ORG_RES],
        PERMIT,
    ),
    (
        "actor-by-reference-other-org",
        [consent(prov("deny", prov("permit", actor=[by_ref("Organization/o2")])))],
        {},
        None,
        [ORG_RES, OTHER_ORG],
        DENY,
    ),
    (
        "actor-by-literal-reference",
        [consent(prov("deny", prov("permit", actor=[by_ref("Organization/o9")])))],
        {"actor": [ORG, "Organization/o9"]},
        None,
        [],
        PERMIT,
    ),
    (
        "actor-contained",
        [
            consent(
                prov("deny", prov("permit", actor=[by_ref("#org")])),
                contained=[{**ORG_RES, "id": "org"}],
            )
        ],
        {},
        None,
        [],
        PERMIT,
    ),
    (
        "actor-deny-other-actor",
        [consent(prov("permit", prov("deny", actor=[by_ref("Organization/o2")])))],
        {},
        None,
        [ORG_RES, OTHER_ORG],
        PERMIT,
    ),
    # -- rule 5: unresolvable actor ----------------------------------------------------
    (
        "unresolvable-actor-permit-no-match",
        [consent(prov("deny", prov("permit", actor=[by_ref("Organization/unknown")])))],
        {},
        None,
        [],
        DENY,
    ),
    (
        "unresolvable-actor-deny-matches",
        [consent(prov("permit", prov("deny", actor=[by_ref("Organization/unknown")])))],
        {},
        None,
        [],
        DENY,
    ),
    (
        "unresolvable-url-never-fetched",
        [
            consent(
                prov(
                    "permit", prov("deny", actor=[by_ref("http://169.254.169.254/Organization/x")])
                )
            )
        ],
        {},
        None,
        [],
        DENY,
    ),
    (
        "unresolvable-root-permit",
        [consent(prov("permit", actor=[by_ref("Organization/unknown")]))],
        {},
        None,
        [],
        NOT_APPLICABLE,
    ),
    # -- action ------------------------------------------------------------------------
    (
        "action-deny-correct-only",
        [
            consent(
                prov(
                    "permit",
                    prov(
                        "deny",
                        action=[
                            {
                                "coding": [
                                    {
                                        "system": "http://terminology.hl7.org/CodeSystem/consentaction",
                                        "code": "correct",
                                    }
                                ]
                            }
                        ],
                    ),
                )
            )
        ],
        {},
        None,
        [],
        PERMIT,
    ),
    (
        "action-deny-disclose",
        [
            consent(
                prov(
                    "permit",
                    prov(
                        "deny",
                        action=[
                            {
                                "coding": [
                                    {
                                        "system": "http://terminology.hl7.org/CodeSystem/consentaction",
                                        "code": "disclose",
                                    }
                                ]
                            }
                        ],
                    ),
                )
            )
        ],
        {},
        None,
        [],
        DENY,
    ),
    # -- rule 3: purpose subsumption ---------------------------------------------------
    (
        "purpose-general-covers-specific",
        [consent(prov("deny", prov("permit", purpose=purposes("TREAT"))))],
        {"purpose": ["ETREAT"]},
        None,
        [],
        PERMIT,
    ),
    (
        "purpose-specific-not-general",
        [consent(prov("deny", prov("permit", purpose=purposes("ETREAT"))))],
        {},
        None,
        [],
        DENY,
    ),
    (
        "purpose-deny-general",
        [consent(prov("permit", prov("deny", purpose=purposes("TREAT"))))],
        {"purpose": ["ERTREAT"]},
        None,
        [],
        DENY,
    ),
    (
        "purpose-deny-specific",
        [consent(prov("permit", prov("deny", purpose=purposes("ETREAT"))))],
        {},
        None,
        [],
        PERMIT,
    ),
    (
        "purpose-unknown-system-permit",
        [consent(prov("deny", prov("permit", purpose=purposes("TREAT", system="urn:x"))))],
        {},
        None,
        [],
        DENY,
    ),
    (
        "purpose-unknown-code-deny",
        [consent(prov("permit", prov("deny", purpose=purposes("NOSUCH"))))],
        {},
        None,
        [],
        DENY,
    ),
    (
        "purpose-research-tree",
        [
            consent(
                prov("deny", prov("permit", purpose=purposes("HRESCH"))),
                scope={"coding": [{"system": SCOPE, "code": "research"}]},
            )
        ],
        {"scope": "research", "purpose": ["CLINTRCH"]},
        None,
        [],
        PERMIT,
    ),
    # -- rule 4: confidentiality high-water mark ---------------------------------------
    *[
        (
            f"conf-permit-N-data-{lv}",
            [consent(prov("deny", prov("permit", securityLabel=labels((CONF, "N")))))],
            {},
            obs(sec=((CONF, lv),) if lv else ()),
            [],
            exp,
        )
        for lv, exp in (
            ("U", PERMIT),
            ("L", PERMIT),
            ("N", PERMIT),
            ("R", DENY),
            ("V", DENY),
            ("", PERMIT),
        )
    ],
    *[
        (
            f"conf-deny-R-data-{lv}",
            [consent(prov("permit", prov("deny", securityLabel=labels((CONF, "R")))))],
            {},
            obs(sec=((CONF, lv),) if lv else ()),
            [],
            exp,
        )
        for lv, exp in (("L", PERMIT), ("N", PERMIT), ("R", DENY), ("V", DENY), ("", PERMIT))
    ],
    (
        "conf-highest-label-counts",
        [consent(prov("permit", prov("deny", securityLabel=labels((CONF, "R")))))],
        {},
        obs(sec=((CONF, "N"), (CONF, "V"))),
        [],
        DENY,
    ),
    # -- rule 4: sensitivity labels (exact) --------------------------------------------
    (
        "sens-deny-PSY-match",
        [consent(prov("permit", prov("deny", securityLabel=labels((ACT, "PSY")))))],
        {},
        obs(sec=((ACT, "PSY"),)),
        [],
        DENY,
    ),
    (
        "sens-deny-PSY-other",
        [consent(prov("permit", prov("deny", securityLabel=labels((ACT, "PSY")))))],
        {},
        obs(sec=((ACT, "HIV"),)),
        [],
        PERMIT,
    ),
    (
        "sens-permit-needs-all-labels",
        [consent(prov("deny", prov("permit", securityLabel=labels((CONF, "R"), (ACT, "ETH")))))],
        {},
        obs(sec=((CONF, "R"),)),
        [],
        DENY,
    ),
    (
        "sens-permit-all-labels",
        [consent(prov("deny", prov("permit", securityLabel=labels((CONF, "R"), (ACT, "ETH")))))],
        {},
        obs(sec=((CONF, "R"), (ACT, "ETH"))),
        [],
        PERMIT,
    ),
    (
        "sens-unknown-system-deny",
        [consent(prov("permit", prov("deny", securityLabel=labels(("urn:x", "PSY")))))],
        {},
        obs(),
        [],
        DENY,
    ),
    # -- rule 2: class, code -----------------------------------------------------------
    (
        "class-deny-match",
        [consent(prov("permit", prov("deny", **{"class": classes("Observation")})))],
        {},
        obs(),
        [],
        DENY,
    ),
    (
        "class-deny-other",
        [consent(prov("permit", prov("deny", **{"class": classes("Observation", "Procedure")})))],
        {},
        COND,
        [],
        PERMIT,
    ),
    (
        "class-mime",
        [
            consent(
                prov(
                    "deny",
                    prov(
                        "permit",
                        **{"class": [{"system": "urn:ietf:bcp:13", "code": "application/pdf"}]},
                    ),
                )
            )
        ],
        {},
        {
            "resourceType": "DocumentReference",
            "id": "d1",
            "content": [{"attachment": {"contentType": "application/pdf"}}],
        },
        [],
        PERMIT,
    ),
    (
        "code-deny-match",
        [consent(prov("permit", prov("deny", code=loinc("1111-1"))))],
        {},
        obs(code="1111-1"),
        [],
        DENY,
    ),
    (
        "code-deny-other",
        [consent(prov("permit", prov("deny", code=loinc("1111-1"))))],
        {},
        obs(code="2222-2"),
        [],
        PERMIT,
    ),
    # -- rule 2: dataPeriod ------------------------------------------------------------
    (
        "dataperiod-deny-in",
        [
            consent(
                prov(
                    "permit", prov("deny", dataPeriod={"start": "2022-01-01", "end": "2022-12-31"})
                )
            )
        ],
        {},
        obs(when="2022-05-01"),
        [],
        DENY,
    ),
    (
        "dataperiod-deny-out",
        [
            consent(
                prov(
                    "permit", prov("deny", dataPeriod={"start": "2022-01-01", "end": "2022-12-31"})
                )
            )
        ],
        {},
        obs(when="2023-05-01"),
        [],
        PERMIT,
    ),
    (
        "dataperiod-deny-no-time",
        [consent(prov("permit", prov("deny", dataPeriod={"start": "2022-01-01"})))],
        {},
        obs(when=None),
        [],
        DENY,
    ),
    (
        "dataperiod-permit-no-time",
        [consent(prov("deny", prov("permit", dataPeriod={"start": "2022-01-01"})))],
        {},
        obs(when=None),
        [],
        DENY,
    ),
    # -- rule 2: data ------------------------------------------------------------------
    (
        "data-instance",
        [
            consent(
                prov(
                    "permit",
                    prov(
                        "deny",
                        data=[
                            {"meaning": "instance", "reference": {"reference": "Observation/o1"}}
                        ],
                    ),
                )
            )
        ],
        {},
        obs("o1"),
        [],
        DENY,
    ),
    (
        "data-instance-other",
        [
            consent(
                prov(
                    "permit",
                    prov(
                        "deny",
                        data=[
                            {"meaning": "instance", "reference": {"reference": "Observation/o1"}}
                        ],
                    ),
                )
            )
        ],
        {},
        obs("o2"),
        [],
        PERMIT,
    ),
    (
        "data-dependents",
        [
            consent(
                prov(
                    "permit",
                    prov(
                        "deny",
                        data=[
                            {"meaning": "dependents", "reference": {"reference": "Encounter/e1"}}
                        ],
                    ),
                )
            )
        ],
        {},
        obs(encounter={"reference": "Encounter/e1"}),
        [],
        DENY,
    ),
    (
        "data-dependents-other",
        [
            consent(
                prov(
                    "permit",
                    prov(
                        "deny",
                        data=[
                            {"meaning": "dependents", "reference": {"reference": "Encounter/e1"}}
                        ],
                    ),
                )
            )
        ],
        {},
        obs(encounter={"reference": "Encounter/e2"}),
        [],
        PERMIT,
    ),
    (
        "data-related-known",
        [
            consent(
                prov(
                    "permit",
                    prov(
                        "deny",
                        data=[{"meaning": "related", "reference": {"reference": "Encounter/e1"}}],
                    ),
                )
            )
        ],
        {},
        ORG_RES,
        [ENC],
        DENY,
    ),
    (
        "data-related-known-other",
        [
            consent(
                prov(
                    "permit",
                    prov(
                        "deny",
                        data=[{"meaning": "related", "reference": {"reference": "Encounter/e1"}}],
                    ),
                )
            )
        ],
        {},
        OTHER_ORG,
        [ENC],
        PERMIT,
    ),
    (
        "data-related-unknown-fails-closed",
        [
            consent(
                prov(
                    "permit",
                    prov(
                        "deny",
                        data=[{"meaning": "related", "reference": {"reference": "Encounter/e1"}}],
                    ),
                )
            )
        ],
        {},
        OTHER_ORG,
        [],
        DENY,
    ),
    (
        "data-authoredby",
        [
            consent(
                prov(
                    "permit",
                    prov(
                        "deny",
                        data=[
                            {"meaning": "authoredby", "reference": {"reference": "Practitioner/p1"}}
                        ],
                    ),
                )
            )
        ],
        {},
        obs(performer=[{"reference": "Practitioner/p1"}]),
        [],
        DENY,
    ),
    (
        "data-authoredby-other",
        [
            consent(
                prov(
                    "permit",
                    prov(
                        "deny",
                        data=[
                            {"meaning": "authoredby", "reference": {"reference": "Practitioner/p1"}}
                        ],
                    ),
                )
            )
        ],
        {},
        obs(performer=[{"reference": "Practitioner/p2"}]),
        [],
        PERMIT,
    ),
    # -- rule 2: nested period ---------------------------------------------------------
    (
        "nested-period-expired",
        [consent(prov("deny", prov("permit", period={"end": "2025-01-01"})))],
        {},
        None,
        [],
        DENY,
    ),
    # -- rule 6: deny-overrides across consents ----------------------------------------
    (
        "combine-permit-deny",
        [consent(PERMIT_ALL, id="a"), consent(DENY_ALL, id="b")],
        {},
        None,
        [],
        DENY,
    ),
    (
        "combine-permit-na",
        [consent(PERMIT_ALL, id="a"), consent(DENY_ALL, id="b", status="draft")],
        {},
        None,
        [],
        PERMIT,
    ),
    (
        "combine-permit-indeterminate",
        [consent(PERMIT_ALL, id="a"), consent(prov(), id="b")],
        {},
        None,
        [],
        PERMIT,
    ),
    (
        "combine-indeterminate-na",
        [consent(prov(), id="a"), consent(DENY_ALL, id="b", status="draft")],
        {},
        None,
        [],
        INDETERMINATE,
    ),
    ("combine-none", [], {}, None, [], NOT_APPLICABLE),
    # -- rule 1 / 7: superseded versions and withdrawal --------------------------------
    (
        "superseded-same-id-newer-deny",
        [consent(PERMIT_ALL, dateTime="2024-01-01"), consent(DENY_ALL, dateTime="2025-01-01")],
        {},
        None,
        [],
        DENY,
    ),
    (
        "superseded-same-id-newer-permit",
        [consent(DENY_ALL, dateTime="2024-01-01"), consent(PERMIT_ALL, dateTime="2025-01-01")],
        {},
        None,
        [],
        PERMIT,
    ),
    (
        "superseded-by-versionId",
        [consent(DENY_ALL, meta={"versionId": "1"}), consent(PERMIT_ALL, meta={"versionId": "2"})],
        {},
        None,
        [],
        PERMIT,
    ),
    (
        "superseded-business-identifier",
        [
            consent(
                PERMIT_ALL,
                id="a",
                dateTime="2024-01-01",
                identifier=[{"system": "urn:c", "value": "1"}],
            ),
            consent(
                DENY_ALL,
                id="b",
                dateTime="2025-01-01",
                identifier=[{"system": "urn:c", "value": "1"}],
            ),
        ],
        {},
        None,
        [],
        DENY,
    ),
    (
        "withdrawal-inactive-version",
        [
            consent(PERMIT_ALL, dateTime="2024-01-01"),
            consent(PERMIT_ALL, dateTime="2025-06-01", status="inactive"),
        ],
        {},
        None,
        [],
        NOT_APPLICABLE,
    ),
    (
        "withdrawal-after-now-not-yet",
        [
            consent(PERMIT_ALL, dateTime="2024-01-01"),
            consent(PERMIT_ALL, dateTime="2026-06-01", status="inactive"),
        ],
        {},
        None,
        [],
        PERMIT,
    ),
    # -- rule 5: missing root type -----------------------------------------------------
    ("missing-root-type", [consent(prov(None, prov("permit")))], {}, None, [], INDETERMINATE),
    (
        "missing-root-type-resource",
        [consent(prov(None, prov("permit")))],
        {},
        obs(),
        [],
        INDETERMINATE,
    ),
    (
        "missing-root-type-out-of-period",
        [consent(prov(None, period={"end": "2020-01-01"}))],
        {},
        None,
        [],
        NOT_APPLICABLE,
    ),
    ("missing-provision", [consent(None)], {}, None, [], INDETERMINATE),
    # -- rule 8: break-glass -----------------------------------------------------------
    ("btg-simulation-rejected", [consent(PERMIT_ALL)], {"purpose": ["BTG"]}, None, [], DENY),
    (
        "btg-simulation-rejected-resource",
        [consent(PERMIT_ALL)],
        {"purpose": ["BTG"]},
        obs(),
        [],
        DENY,
    ),
    (
        "btg-not-simulation",
        [consent(prov("deny", prov("permit", purpose=purposes("ETREAT"))))],
        {"purpose": ["BTG"], "simulation": False},
        None,
        [],
        PERMIT,
    ),
    # -- request level, with request class ---------------------------------------------
    (
        "request-class-denied",
        [consent(prov("permit", prov("deny", **{"class": classes("Observation")})))],
        {"class": ["Observation"]},
        None,
        [],
        DENY,
    ),
    (
        "request-class-other",
        [consent(prov("permit", prov("deny", **{"class": classes("Observation")})))],
        {"class": ["Condition"]},
        None,
        [],
        PERMIT,
    ),
    (
        "request-class-partial",
        [consent(prov("permit", prov("deny", **{"class": classes("Observation")})))],
        {"class": ["Condition", "Observation"]},
        None,
        [],
        PERMIT,
    ),
    (
        "request-deny-with-release",
        [consent(prov("deny", prov("permit", code=loinc("1111-1"))))],
        {},
        None,
        [],
        PERMIT,
    ),
]


@pytest.mark.parametrize(
    ("consents", "change", "resource", "known", "expected"),
    [pytest.param(c, ch, r, k, e, id=i) for i, c, ch, r, k, e in CASES],
)
def test_rule_table(
    consents: list[dict[str, Any]],
    change: dict[str, Any],
    resource: dict[str, Any] | None,
    known: list[Any],
    expected: str,
) -> None:
    d = decide(consents, {**REQ, **change}, now=NOW, resource=resource, known=known)
    assert d.decision == expected, d.to_json()
    if expected in (DENY, INDETERMINATE):
        assert d.allowed is False
    if expected == PERMIT:
        assert d.allowed is True
    if expected in (PERMIT, DENY) and change.get("purpose") != ["BTG"]:
        assert d.deciding, "a PERMIT or DENY names the consents and provisions that decided it"
        assert all(x["decision"] == expected for x in d.deciding)


def test_deciding_paths_and_obligations() -> None:
    c = consent(
        prov(
            "permit",
            prov("deny", **{"class": classes("Observation")}),
            prov("deny", code=loinc("9")),
        ),
        id="cx",
    )
    d = decide([c], REQ, now=NOW)
    assert d.decision == PERMIT
    assert d.deciding == ({"consent": "Consent/cx", "path": "provision", "decision": PERMIT},)
    withheld = [o for o in d.obligations if o["action"] == "withhold"]
    assert [o["path"] for o in withheld] == ["provision.provision[0]", "provision.provision[1]"]
    assert withheld[0]["where"] == [{"class": ["Observation"]}]
    per = decide([c], REQ, now=NOW, resource={**COND, "code": {"coding": loinc("9")[0]["coding"]}})
    assert per.deciding == (
        {"consent": "Consent/cx", "path": "provision.provision[1]", "decision": DENY},
    )


def test_deny_with_partial_release_restricts() -> None:
    d = decide([consent(prov("deny", prov("permit", code=loinc("1111-1"))))], REQ, now=NOW)
    assert d.decision == PERMIT
    assert {o["action"] for o in d.obligations} == {"restrict", "release"}


def test_not_applicable_default() -> None:
    assert decide([], {**REQ, "default": "permit"}, now=NOW).allowed is True
    assert decide([], REQ, now=NOW).allowed is False
    research = {**REQ, "scope": "research", "purpose": ["HRESCH"], "default": "permit"}
    assert decide([], research, now=NOW).allowed is False, "research is always opt-in"


def test_research_permit_is_deidentified() -> None:
    c = consent(PERMIT_ALL, scope={"coding": [{"system": SCOPE, "code": "research"}]})
    d = decide([c], {**REQ, "scope": "research", "purpose": ["HRESCH"]}, now=NOW)
    assert {"action": "deidentify", "profile": "safe-harbor"} in d.obligations


def test_superseded_versions_are_reported() -> None:
    old = consent(PERMIT_ALL, meta={"versionId": "1"})
    new = consent(DENY_ALL, meta={"versionId": "2"})
    d = decide([new, old], REQ, now=NOW)
    rows = {r["consent"]: r["result"] for r in d.consents}
    assert rows == {"Consent/c1/_history/1": "SUPERSEDED", "Consent/c1/_history/2": DENY}


def test_emergency_root_purpose_is_applicability() -> None:
    """A consent whose root purpose is ETREAT does not apply to a TREAT request (rule 1)."""
    c = consent(prov(None, prov("deny"), purpose=purposes("ETREAT")))
    assert decide([c], REQ, now=NOW).decision == NOT_APPLICABLE
    assert decide([c], {**REQ, "purpose": ["ETREAT"]}, now=NOW).decision == INDETERMINATE


def test_purpose_hierarchy_data() -> None:
    t = terminology()
    assert t.subsumes("TREAT", "ETREAT") and not t.subsumes("ETREAT", "TREAT")
    assert t.subsumes("TREAT", "BTG") and t.subsumes("HRESCH", "CLINTRCH")
    assert t.is_research("CLINTRCH") and not t.is_research("TREAT")
    assert t.subsumes("NOSUCH", "TREAT") is None
    assert list(t.conf_order) == ["U", "L", "M", "N", "R", "V"]


@pytest.mark.parametrize(
    "bad",
    [
        {"actor": [ORG], "purpose": ["TREAT"]},
        {**REQ, "scope": "care"},
        {**REQ, "purpose": ["CLINTRCH"]},
        {**REQ, "scope": "research"},
        {**REQ, "colour": "blue"},
        {**REQ, "action": ["steal"]},
        {**REQ, "purpose": ["urn:x|TREAT"]},
    ],
)
def test_bad_requests(bad: dict[str, Any]) -> None:
    with pytest.raises(RequestError):
        decide([], bad, now=NOW)


def test_bad_consents() -> None:
    with pytest.raises(ConsentError, match=r"provision\.provision\[0\]"):
        decide([consent(prov("permit", prov("maybe")))], REQ, now=NOW)
    with pytest.raises(ConsentError):
        decide([{"resourceType": "Patient", "id": "x"}], REQ, now=NOW)


def test_policy_decides_many() -> None:
    c = consent(prov("permit", prov("deny", securityLabel=labels((ACT, "PSY")))))
    policy = prepare([c], REQ, now=NOW)
    out = [
        policy.decide(obs(str(i), sec=((ACT, "PSY"),) if i % 2 else ())).decision for i in range(10)
    ]
    assert out == [PERMIT, DENY] * 5


# -- the 12 official R4 examples -----------------------------------------------------------

R4_EXPECTED = {
    # no root type, in force at NOW: never PERMIT
    "consent-example-Emergency": INDETERMINATE,
    "consent-example-Out": INDETERMINATE,
    "consent-example-grantor": INDETERMINATE,
    "consent-example-notAuthor": INDETERMINATE,
    "consent-example-notThem": INDETERMINATE,
    "consent-example-notThis": INDETERMINATE,
    "consent-example-pkb": INDETERMINATE,
    # no root type, expired
    "consent-example-basic": NOT_APPLICABLE,
    "consent-example-notTime": NOT_APPLICABLE,
    "consent-example-signature": NOT_APPLICABLE,
    "consent-example-smartonfhir": NOT_APPLICABLE,
    # the one with a root type: deny, for an actor we cannot resolve (fail closed)
    "consent-example-notOrg": DENY,
}
# ETREAT: the Emergency example's root purpose must cover the request for it to apply.
R4_REQUEST = {"actor": [ORG], "purpose": ["ETREAT"], "scope": "patient-privacy"}


def _r4_examples(corpus: Path) -> dict[str, dict[str, Any]]:
    files = sorted((corpus / "fhir-r4-examples" / "package").glob("Consent-*.json"))
    return {json.loads(f.read_bytes())["id"]: json.loads(f.read_bytes()) for f in files}


@pytest.mark.corpus
def test_r4_examples_parse_and_decide(corpus: Path) -> None:
    from fhir.resources.R4B.consent import Consent

    examples = _r4_examples(corpus)
    assert len(examples) == 12
    untyped = [k for k, c in examples.items() if "type" not in c.get("provision", {})]
    assert len(untyped) == 11
    for cid, c in examples.items():
        Consent.model_validate(c)
        d = decide([c], R4_REQUEST, now=NOW)
        assert d.decision == R4_EXPECTED[cid], (cid, d.to_json())
        for resource in (None, obs(), COND):
            assert decide([c], R4_REQUEST, now=NOW, resource=resource).decision != PERMIT
    # together: deny-overrides; and at a time when all were in force, still never PERMIT
    assert decide(list(examples.values()), R4_REQUEST, now=NOW).decision == DENY
    then = datetime(2016, 6, 23, 7, 10, tzinfo=UTC)
    for cid, c in examples.items():
        d = decide([c], R4_REQUEST, now=then)
        assert d.decision != PERMIT, cid
        if cid != "consent-example-notOrg" and cid in untyped and "period" in c["provision"]:
            assert d.decision in (INDETERMINATE, NOT_APPLICABLE), cid


@pytest.mark.corpus
def test_r4_examples_through_cli(corpus: Path, tmp_path: Path) -> None:
    files = sorted((corpus / "fhir-r4-examples" / "package").glob("Consent-*.json"))
    args = ["consent", "decide", "--request", json.dumps(R4_REQUEST), "--now", NOW.isoformat()]
    for f in files:
        args += ["--consent", str(f)]
    r = _cli(args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["decision"] == DENY


# -- the command line ----------------------------------------------------------------------


def _cli(args: list[str]) -> Any:
    from fhirtwin.cli_consent import register

    app = typer.Typer()
    register(app)

    @app.callback()
    def _main() -> None:
        """Test app."""

    return CliRunner().invoke(app, args)


def _write(path: Path, doc: Any) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


def test_cli_decide_with_resources(tmp_path: Path) -> None:
    c = _write(
        tmp_path / "c.json",
        consent(prov("permit", prov("deny", securityLabel=labels((ACT, "PSY")))), id="cc"),
    )
    req = _write(tmp_path / "req.json", REQ)
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": obs("o1", sec=((ACT, "PSY"),))}, {"resource": obs("o2")}],
    }
    res = _write(tmp_path / "b.json", bundle)
    known = _write(tmp_path / "k.json", ORG_RES)
    r = _cli(
        [
            "consent",
            "decide",
            "--consent",
            c,
            "--request",
            req,
            "--now",
            "2026-01-01T00:00:00Z",
            "--resource",
            res,
            "--known",
            known,
        ]
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["decision"] == PERMIT
    assert out["deciding"] == [{"consent": "Consent/cc", "path": "provision", "decision": PERMIT}]
    assert out["obligations"][0]["action"] == "withhold"
    assert out["resources"] == [
        {"resourceType": "Observation", "id": "o1", "decision": DENY},
        {"resourceType": "Observation", "id": "o2", "decision": PERMIT},
    ]
    inline = _cli(
        ["consent", "decide", "--consent", c, "--request", json.dumps(REQ), "--now", "2026-01-01"]
    )
    assert inline.exit_code == 0, inline.output
    assert json.loads(inline.stdout)["decision"] == PERMIT


def test_cli_bad_input(tmp_path: Path) -> None:
    good = _write(tmp_path / "c.json", consent(PERMIT_ALL))
    req = json.dumps(REQ)
    base = ["consent", "decide", "--request", req, "--now", "2026-01-01T00:00:00Z"]

    r = _cli([*base, "--consent", _write(tmp_path / "p.json", COND)])
    assert r.exit_code == 2 and "p.json" in r.output and "$.resourceType" in r.output

    (tmp_path / "broken.json").write_text("{nope")
    r = _cli([*base, "--consent", str(tmp_path / "broken.json")])
    assert r.exit_code == 2 and "broken.json" in r.output and "not JSON" in r.output

    r = _cli([*base, "--consent", str(tmp_path / "missing.json")])
    assert r.exit_code == 2 and "missing.json" in r.output

    r = _cli(["consent", "decide", "--consent", good, "--request", req, "--now", "yesterday"])
    assert r.exit_code == 2 and "--now" in r.output

    r = _cli(
        ["consent", "decide", "--consent", good, "--request", '{"actor": []', "--now", "2026-01-01"]
    )
    assert r.exit_code == 2 and "--request" in r.output

    r = _cli(
        [
            "consent",
            "decide",
            "--consent",
            good,
            "--request",
            json.dumps({**REQ, "scope": "x"}),
            "--now",
            "2026-01-01",
        ]
    )
    assert r.exit_code == 2 and "scope" in r.output

    bad_status = _write(tmp_path / "s.json", consent({"period": 3}, status=5))
    r = _cli([*base, "--consent", bad_status])
    assert r.exit_code == 2 and "s.json" in r.output and "$." in r.output

    bad_type = _write(tmp_path / "t.json", consent(prov("permit", prov("maybe")), id="tt"))
    r = _cli([*base, "--consent", bad_type])
    assert r.exit_code == 2 and "t.json" in r.output and "provision.provision[0]" in r.output
