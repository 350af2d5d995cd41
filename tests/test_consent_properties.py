"""Properties of the consent engine over random consents (hypothesis): the order of consents
does not matter, a DENY is only lifted by removing a consent that denied, and adding a deny
provision never releases more."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhirtwin.consent import DENY, PERMIT, decide
from tests.test_consent import (
    ACT,
    COND,
    CONF,
    ENC,
    NOW,
    ORG_RES,
    REQ,
    SCOPE,
    by_id,
    by_ref,
    classes,
    labels,
    loinc,
    obs,
    purposes,
)

ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"

ELEMENTS: dict[str, st.SearchStrategy[Any]] = {
    "actor": st.lists(
        st.sampled_from(
            [
                by_id("urn:oid:1.2.3", "sim-care"),
                by_id("urn:oid:1.2.3", "someone-else"),
                by_ref("Organization/o1"),
                by_ref("Organization/unknown"),
            ]
        ),
        min_size=1,
        max_size=2,
    ),
    "purpose": st.lists(
        st.sampled_from(["TREAT", "ETREAT", "HOPERAT", "NOSUCH"]), min_size=1, max_size=2
    ).map(lambda cs: purposes(*cs)),
    "action": st.sampled_from(["access", "correct", "disclose"]).map(
        lambda a: [{"coding": [{"system": ACTION, "code": a}]}]
    ),
    "class": st.lists(st.sampled_from(["Observation", "Condition"]), min_size=1, max_size=2).map(
        lambda ts: classes(*ts)
    ),
    "code": st.sampled_from(["1111-1", "2222-2"]).map(loinc),
    "securityLabel": st.lists(
        st.sampled_from([(CONF, "N"), (CONF, "R"), (ACT, "PSY"), ("urn:x", "Q")]),
        min_size=1,
        max_size=2,
    ).map(lambda ls: labels(*ls)),
    "dataPeriod": st.sampled_from(
        [{"start": "2022-01-01", "end": "2022-12-31"}, {"start": "2023-01-01"}]
    ),
    "data": st.sampled_from(
        [
            [{"meaning": "instance", "reference": {"reference": "Observation/o1"}}],
            [{"meaning": "dependents", "reference": {"reference": "Encounter/e1"}}],
            [{"meaning": "related", "reference": {"reference": "Encounter/e1"}}],
            [{"meaning": "authoredby", "reference": {"reference": "Practitioner/p1"}}],
        ]
    ),
    "period": st.sampled_from([{"start": "2025-01-01"}, {"end": "2025-06-01"}]),
}


@st.composite
def provision(draw: st.DrawFn, depth: int = 0, root: bool = False) -> dict[str, Any]:
    p: dict[str, Any] = {}
    kinds = ["permit", "deny", None] if root else ["permit", "deny"]
    kind = draw(st.sampled_from(kinds))
    if kind:
        p["type"] = kind
    names = draw(st.lists(st.sampled_from(sorted(ELEMENTS)), max_size=2, unique=True))
    for name in names:
        if root and name == "period":
            continue
        p[name] = draw(ELEMENTS[name])
    if depth < 3:
        children = draw(st.lists(provision(depth + 1), max_size=2 if depth < 2 else 1))
        if children:
            p["provision"] = children
    return p


@st.composite
def consent(draw: st.DrawFn, cid: str) -> dict[str, Any]:
    c: dict[str, Any] = {
        "resourceType": "Consent",
        "id": cid,
        "status": draw(st.sampled_from(["active", "active", "active", "inactive"])),
        "scope": {
            "coding": [
                {"system": SCOPE, "code": draw(st.sampled_from(["patient-privacy", "research"]))}
            ]
        },
        "provision": draw(provision(root=True)),
    }
    if draw(st.booleans()):
        c["provision"]["period"] = draw(ELEMENTS["period"])
    return c


consent_sets = st.integers(min_value=0, max_value=4).flatmap(
    lambda n: st.tuples(*[consent(f"c{i}") for i in range(n)]).map(list)
)
requests = st.fixed_dictionaries(
    {
        "purpose": st.sampled_from([["TREAT"], ["ETREAT"], ["HOPERAT"]]),
        "class": st.sampled_from([None, ["Observation"]]),
    }
).map(lambda ch: {**REQ, **{k: v for k, v in ch.items() if v is not None}})

RESOURCES: list[dict[str, Any] | None] = [
    None,
    obs("o1", sec=((CONF, "R"),), code="1111-1", encounter={"reference": "Encounter/e1"}),
    obs("o2", sec=((ACT, "PSY"),), code="2222-2", when="2023-04-01"),
    obs("o3", when=None, performer=[{"reference": "Practitioner/p1"}]),
    COND,
    ORG_RES,
]
KNOWN = [ORG_RES, ENC]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _all_decisions(consents: list[dict[str, Any]], request: dict[str, Any]) -> list[Any]:
    return [decide(consents, request, now=NOW, resource=r, known=KNOWN) for r in RESOURCES]


@SETTINGS
@given(consent_sets, requests, st.randoms(use_true_random=False))
def test_order_does_not_matter(
    consents: list[dict[str, Any]], request: dict[str, Any], rnd: Any
) -> None:
    shuffled = list(consents)
    rnd.shuffle(shuffled)
    a = [d.to_json() for d in _all_decisions(consents, request)]
    b = [d.to_json() for d in _all_decisions(shuffled, request)]
    assert a == b


@SETTINGS
@given(consent_sets, requests)
def test_removing_a_consent_never_turns_deny_into_permit(
    consents: list[dict[str, Any]], request: dict[str, Any]
) -> None:
    """Only removing a consent that itself denied can lift a DENY (deny-overrides); removing
    any other consent leaves it DENY. (Consents here are distinct, not versions of one.)"""
    for r in RESOURCES:
        full = decide(consents, request, now=NOW, resource=r, known=KNOWN)
        if full.decision != DENY:
            continue
        denying = {d["consent"] for d in full.deciding}
        for i, c in enumerate(consents):
            rest = consents[:i] + consents[i + 1 :]
            after = decide(rest, request, now=NOW, resource=r, known=KNOWN)
            if f"Consent/{c['id']}" not in denying:
                assert after.decision == DENY
            if len(denying) > 1:
                assert after.decision == DENY
            if after.decision == PERMIT:
                assert f"Consent/{c['id']}" in denying


def _nodes(p: dict[str, Any], out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out.append(p)
    for child in p.get("provision", []):
        _nodes(child, out)
    return out


@SETTINGS
@given(consent_sets, requests, st.data())
def test_adding_a_deny_provision_never_releases_more(
    consents: list[dict[str, Any]], request: dict[str, Any], data: st.DataObject
) -> None:
    if not consents:
        return
    before = _all_decisions(consents, request)
    changed = copy.deepcopy(consents)
    target = data.draw(st.sampled_from(changed))
    node = data.draw(st.sampled_from(_nodes(target["provision"], [])))
    new = data.draw(provision(depth=3))
    new["type"] = "deny"
    node.setdefault("provision", []).append(new)
    after = _all_decisions(changed, request)
    for r, b, a in zip(RESOURCES, before, after, strict=True):
        if a.decision == PERMIT:
            assert b.decision == PERMIT, (r, b.to_json(), a.to_json())
        if a.allowed:
            assert b.allowed, (r, b.to_json(), a.to_json())
