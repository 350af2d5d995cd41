"""The FHIR REST API on real Tansu and Redis: twins built by the pipeline from the HL7 v2
examples, served by uvicorn, read with httpx and fhirpy; consent, audit and error shapes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
import redis
from fastapi import FastAPI

from fhirtwin import bus
from fhirtwin.api import MAX_COUNT, kafka_audit, router
from fhirtwin.auth import ASSERTION_TYPE, Authority
from fhirtwin.auth import router as auth_router
from fhirtwin.infra import EmbeddedKafka, EmbeddedRedis, free_port
from fhirtwin.principal import AuthError, Principal
from fhirtwin.snapshot import consent_event
from fhirtwin.subscribers import Registry, make_subscriber
from fhirtwin.twin import TwinStore
from tests.pipeline import drain, ingest_examples, produce, records
from tests.serving import serve

SCOPES = "http://terminology.hl7.org/CodeSystem/consentscope"
LOINC = "http://loinc.org"

# Patient A (MRN448812) consents to care, except Immunizations; patient B (MRN550021) has
# no consent, and the care subscriber's default is deny: B is invisible to it.
CONSENT_A = {
    "resourceType": "Consent",
    "id": "consent-a",
    "status": "active",
    "scope": {"coding": [{"system": SCOPES, "code": "patient-privacy"}]},
    "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
    "patient": {
        "identifier": {"system": "urn:oid:2.16.840.1.113883.3.9001.1", "value": "MRN448812"}
    },
    "dateTime": "2026-01-01",
    "policyRule": {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]
    },
    "provision": {
        "type": "permit",
        "provision": [
            {
                "type": "deny",
                "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Immunization"}],
            }
        ],
    },
}


def authenticate(header: str | None) -> Principal:
    """``Bearer test:<client>:<subscriber or ->:<scopes, comma-separated>``."""
    if not header:
        raise AuthError(401, "invalid_token", "an Authorization: Bearer token is required")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.startswith("test:"):
        raise AuthError(401, "invalid_token", "expected a test token")
    if token == "test:boom":
        raise RuntimeError("secret internals /etc/passwd")
    _, client, sub, scopes = token.split(":", 3)
    return Principal(client, frozenset(scopes.split(",")), None if sub == "-" else sub)


def bearer(client: str, sub: str = "care", scopes: str = "system/*.rs") -> dict[str, str]:
    return {"Authorization": f"Bearer test:{client}:{sub}:{scopes}"}


@dataclass
class Env:
    kafka: str
    redis_url: str
    base: str
    a: str  # Patient id of A
    b: str  # Patient id of B
    twin_a: str
    twin_b: str
    store: TwinStore

    def audits(self, client: str) -> list[dict[str, Any]]:
        out = []
        for rec in records(self.kafka, bus.AUDIT):
            ev = orjson.loads(rec.value)
            if client in rec.value.decode():
                out.append(ev)
        return out


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with EmbeddedKafka() as k, EmbeddedRedis(prefer_existing=False) as r:
        ex = ingest_examples(k.bootstrap, r.url)
        client, store, twin_a, twin_b = ex.client, ex.store, ex.twin_a, ex.twin_b
        produce(
            k.bootstrap,
            bus.RESOURCES,
            [consent_event(twin_a, CONSENT_A, now_ms=int(time.time() * 1000), record="test")],
            key=twin_a.encode(),
        )
        drain(k.bootstrap, r.url)

        registry = Registry(client)
        registry.put(
            make_subscriber(
                "care",
                actor=["urn:oid:1.2.3.4|sim-care"],
                purpose=["TREAT"],
                scope="patient-privacy",
                default="deny",
            )
        )
        registry.put(
            make_subscriber(
                "open",
                actor=["urn:oid:1.2.3.5|sim-ops"],
                purpose=["TREAT"],
                scope="patient-privacy",
                default="permit",
            )
        )
        port = free_port()
        # real SMART tokens too (test_real_token_end_to_end); test: tokens stay for the rest
        authority = Authority(client, token_url=f"http://127.0.0.1:{port}/auth/token")

        def either(header: str | None) -> Principal:
            if header and header.partition(" ")[2].startswith("test:"):
                return authenticate(header)
            return authority.verify_bearer(header)

        app = FastAPI()
        app.include_router(auth_router(authority))
        app.include_router(
            router(store, registry, authenticate=either, audit=kafka_audit(k.bootstrap))
        )
        stop_server = serve(app, port)
        try:
            yield Env(
                k.bootstrap,
                r.url,
                f"http://127.0.0.1:{port}/fhir",
                ex.a,
                ex.b,
                twin_a,
                twin_b,
                store,
            )
        finally:
            stop_server()


def get(
    env: Env, path: str, headers: dict[str, str] | None = None, **params: Any
) -> httpx.Response:
    return httpx.get(f"{env.base}/{path}", headers=headers or {}, params=params, timeout=30)


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle.get("entry", [])
        if e.get("search", {}).get("mode", "match") == mode
    ]


# -- httpx --------------------------------------------------------------------------------


def test_metadata_tells_the_truth(env: Env) -> None:
    r = get(env, "metadata")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
    cs = r.json()
    assert cs["resourceType"] == "CapabilityStatement" and cs["fhirVersion"] == "4.0.1"
    rest = cs["rest"][0]
    by_type = {x["type"]: x for x in rest["resource"]}
    obs = by_type["Observation"]
    assert {i["code"] for i in obs["interaction"]} == {
        "read",
        "vread",
        "history-instance",
        "search-type",
    }
    names = {p["name"] for p in obs["searchParam"]}
    assert {"patient", "subject", "code", "date", "category", "status", "_lastUpdated"} <= names
    assert by_type["Patient"]["operation"][0]["name"] == "everything"
    assert "create" not in r.text and "total" not in names


def test_read_vread_history(env: Env) -> None:
    h = bearer("reader")
    r = get(env, f"Patient/{env.a}", h)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
    patient = r.json()
    assert patient["id"] == env.a and patient["meta"]["versionId"]
    assert r.headers["etag"] == f'W/"{patient["meta"]["versionId"]}"'
    hist = get(env, f"Patient/{env.a}/_history", h).json()
    assert hist["type"] == "history" and hist["entry"]
    vid = hist["entry"][0]["resource"]["meta"]["versionId"]
    v = get(env, f"Patient/{env.a}/_history/{vid}", h)
    assert v.status_code == 200 and v.json()["meta"]["versionId"] == vid
    assert get(env, f"Patient/{env.a}/_history/nope", h).status_code == 404
    audits = env.audits("reader")
    reads = [e for e in audits if e["type"]["code"] == "rest"]
    assert reads and reads[0]["meta"]["profile"][0].endswith("IHE.BasicAudit.PatientRead")
    assert reads[0]["outcome"] == "0" and reads[0]["subtype"][0]["code"] == "read"
    assert any(e["type"]["code"] == "110113" for e in audits)  # the consent decision
    # a vread discloses that version only; a vread of a version that is not there, nothing
    vreads = [e for e in reads if e["subtype"][0]["code"] == "vread"]
    shown = [
        [x["what"]["reference"] for x in e["entity"] if x.get("role", {}).get("code") == "4"]
        for e in vreads
    ]
    assert sorted(shown) == [[], [f"Patient/{env.a}/_history/{vid}"]]


def test_search_parameters_and_paging(env: Env) -> None:
    h = bearer("searcher")
    all_obs = get(env, "Observation", h, patient=env.a).json()
    assert all_obs["type"] == "searchset" and "total" not in all_obs
    assert len(ids(all_obs)) == 4
    one = get(env, "Observation", h, patient=f"Patient/{env.a}", code=f"{LOINC}|2160-0").json()
    assert len(ids(one)) == 1
    assert len(ids(get(env, "Observation", h, code="2160-0,2345-7").json())) == 2
    assert ids(get(env, "Observation", h, code="http://other|2160-0").json()) == []
    dated = get(env, "Observation", h, patient=env.a, date="ge2026-11-04").json()
    assert len(ids(dated)) == 3  # one Observation has no clinical time
    assert ids(get(env, "Observation", h, date="lt2026-11-04").json()) == []
    assert len(ids(get(env, "Observation", h, date="2026-11-04").json())) == 3
    assert len(ids(get(env, "Observation", h, date="gt2026-11").json())) == 0
    assert len(ids(get(env, "Observation", h, date="le2026-11").json())) == 3
    assert ids(get(env, "Observation", h, _lastUpdated="lt2000-01-01").json()) == []
    assert len(ids(get(env, "Observation", h, _lastUpdated="gt2000-01-01").json())) == 4
    assert len(ids(get(env, "Observation", h, status="final").json())) >= 1
    assert len(ids(get(env, "Condition", h, patient=env.a).json())) == 1
    assert len(ids(get(env, "Patient", h, identifier="MRN448812").json())) == 1
    # paging: next links walk every match exactly once; no total
    seen: list[str] = []
    page = get(env, "Observation", h, patient=env.a, _count=3).json()
    pages = 0
    while True:
        pages += 1
        assert "total" not in page
        seen += ids(page)
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        if not nxt:
            break
        page = httpx.get(nxt[0], headers=h, timeout=30).json()
    assert pages == 2 and sorted(seen) == sorted(ids(all_obs))
    # _sort, _include
    by_date = get(env, "Observation", h, patient=env.a, _sort="-date").json()
    assert len(ids(by_date)) == 4
    inc = get(env, "Observation", h, patient=env.a, _include="Observation:patient").json()
    assert ids(inc, "include") == [f"Patient/{env.a}"]
    queries = [e for e in env.audits("searcher") if e["type"]["code"] == "rest"]
    assert queries[0]["meta"]["profile"][0].endswith("IHE.BasicAudit.PatientQuery")
    assert any(ent.get("role", {}).get("code") == "24" for ent in queries[0]["entity"])


def test_everything(env: Env) -> None:
    h = bearer("everything")
    r = get(env, f"Patient/{env.a}/$everything", h)
    assert r.status_code == 200
    b = r.json()
    refs = ids(b)
    assert refs[0] == f"Patient/{env.a}" and any(x.startswith("Observation/") for x in refs)
    assert not any(x.startswith(("Immunization/", "Consent/", "MessageHeader/")) for x in refs)
    typed = get(env, f"Patient/{env.a}/$everything", h, _type="Condition,Patient").json()
    assert {x.split("/")[0] for x in ids(typed)} == {"Condition", "Patient"}
    assert ids(get(env, f"Patient/{env.a}/$everything", h, _since="2999-01-01").json()) == []
    paged = get(env, f"Patient/{env.a}/$everything", h, _count=5).json()
    assert len(ids(paged)) == 5 and any(lk["relation"] == "next" for lk in paged["link"])


# -- fhirpy -------------------------------------------------------------------------------


def test_fhirpy_client(env: Env) -> None:
    fhirpy = pytest.importorskip("fhirpy", reason="fhirpy (the project's FHIR client) missing")
    from fhirpy.base.exceptions import ResourceNotFound

    client = fhirpy.SyncFHIRClient(env.base, authorization="Bearer test:fhirpy:care:system/*.rs")
    obs = client.resources("Observation").search(patient=env.a, code=f"{LOINC}|2160-0").fetch()
    assert len(obs) == 1 and obs[0]["code"]["coding"][0]["code"] == "2160-0"
    everything = client.resources("Observation").search(patient=env.a).limit(1).fetch_all()
    assert len(everything) == 4  # four pages followed through next links
    patient = client.reference("Patient", env.a).to_resource()
    assert patient["id"] == env.a
    dated = client.resources("Observation").search(date__ge="2026-11-04").fetch()
    assert len(dated) == 3
    bundle = client.execute(f"Patient/{env.a}/$everything", method="get")
    assert bundle["resourceType"] == "Bundle" and bundle["entry"]
    with pytest.raises(ResourceNotFound):
        client.reference("Patient", env.b).to_resource()
    assert client.resources("Observation").search(patient=env.b).fetch() == []


# -- security -----------------------------------------------------------------------------


def test_client_of_a_cannot_see_b(env: Env) -> None:
    h = bearer("spy")
    denied = get(env, f"Patient/{env.b}", h)
    missing = get(env, "Patient/does-not-exist", h)
    assert denied.status_code == missing.status_code == 404
    assert denied.headers["content-type"] == missing.headers["content-type"]
    assert denied.text.replace(env.b, "X") == missing.text.replace("does-not-exist", "X")
    assert set(denied.headers) == set(missing.headers)
    enc_b = next(
        x["id"] for x in env.store.resources(env.twin_b) if x["resourceType"] == "Encounter"
    )
    assert get(env, f"Encounter/{enc_b}", h).status_code == 404
    for params in ({"patient": env.b}, {}):
        b = get(env, "Encounter", h, **params).json()
        assert enc_b not in orjson.dumps(b).decode() and "total" not in b
    assert get(env, f"Patient/{env.b}/$everything", h).status_code == 404
    assert get(env, f"Patient/{env.b}/_history", h).status_code == 404
    # A's Immunization is withheld by A's consent: missing, and no reference to it remains
    imm = next(
        x["id"] for x in env.store.resources(env.twin_a) if x["resourceType"] == "Immunization"
    )
    assert get(env, f"Immunization/{imm}", h).status_code == 404
    assert ids(get(env, "Immunization", h).json()) == []
    ev = get(env, f"Patient/{env.a}/$everything", h, _count=500).text
    assert imm not in ev and env.b not in ev
    # the audit shows the denials
    audits = env.audits("spy")
    refused = [e for e in audits if e["type"]["code"] == "rest" and e["outcome"] == "4"]
    twins = {
        ent["what"]["identifier"]["value"]
        for e in refused
        for ent in e["entity"]
        if ent.get("what", {}).get("identifier")
    }
    assert env.twin_b in twins and env.twin_a in twins  # B denied; A's Immunization withheld
    decisions = [e for e in audits if e["type"]["code"] == "110113" and e["outcome"] == "8"]
    assert any(e["entity"][0]["what"]["identifier"]["value"] == env.twin_b for e in decisions)
    # a subscriber whose default is permit does see B
    assert get(env, f"Patient/{env.b}", bearer("ops", "open")).status_code == 200


def test_auth_scopes_and_errors(env: Env) -> None:
    r = get(env, f"Patient/{env.a}")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["resourceType"] == "OperationOutcome"
    narrow = bearer("narrow", scopes="system/Observation.rs")
    assert get(env, f"Patient/{env.a}", narrow).status_code == 403
    assert get(env, "Observation", narrow, patient=env.a).status_code == 200
    v1 = bearer("v1", scopes="system/Patient.read")
    assert get(env, f"Patient/{env.a}", v1).status_code == 200
    nosub = bearer("nosub", sub="-")
    assert get(env, f"Patient/{env.a}", nosub).status_code == 404
    assert ids(get(env, "Observation", nosub).json()) == []
    h = bearer("errors")
    capped = get(env, "Observation", h, _count=100000).json()
    assert f"_count={MAX_COUNT}" in capped["link"][0]["url"]
    for path, params in [
        ("Observation", {"date": "yesterday"}),
        ("Observation", {"flavour": "x"}),
        ("Observation", {"_count": "-1"}),
        ("Observation", {"_sort": "colour"}),
        ("Observation", {"code:text": "x"}),
    ]:
        bad = get(env, path, h, **params)
        assert bad.status_code == 400, (path, params)
        assert bad.json()["resourceType"] == "OperationOutcome"
    for path in ("Starship", "Starship/1", "Patient/x/y/z/w"):
        nf = get(env, path, h)
        assert nf.status_code == 404 and nf.json()["resourceType"] == "OperationOutcome"
    post = httpx.post(f"{env.base}/Patient", headers=h, json={"resourceType": "Patient"})
    assert post.status_code == 405 and post.json()["resourceType"] == "OperationOutcome"
    boom = get(env, f"Patient/{env.a}", {"Authorization": "Bearer test:boom"})
    assert boom.status_code == 500 and boom.json()["resourceType"] == "OperationOutcome"
    assert "Traceback" not in boom.text and "passwd" not in boom.text


def test_real_token_end_to_end(env: Env) -> None:
    """A registered client signs a client assertion (ES384), gets an access token from
    /auth/token, and reads with fhirpy as the subscriber it is registered for."""
    import secrets

    from fhirpy import SyncFHIRClient
    from joserfc import jwt
    from joserfc.jwk import ECKey

    key = ECKey.generate_key("P-384", auto_kid=True)
    public = dict(key.as_dict(private=False))
    authority = Authority(
        redis.Redis.from_url(env.redis_url), token_url=env.base.replace("/fhir", "/auth/token")
    )
    authority.register_client("e2e-app", {"keys": [public]}, ["system/*.rs"], "care")
    now = int(time.time())
    assertion = jwt.encode(
        {"alg": "ES384", "typ": "JWT", "kid": key.kid},
        {
            "iss": "e2e-app",
            "sub": "e2e-app",
            "aud": authority.token_url,
            "exp": now + 120,
            "jti": secrets.token_urlsafe(12),
        },
        key,
        algorithms=["ES384"],
    )
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion,
        "scope": "system/Patient.rs system/Observation.rs",
    }
    answer = httpx.post(authority.token_url, data=form, timeout=30)
    assert answer.status_code == 200, answer.text
    token = answer.json()["access_token"]
    assert set(answer.json()["scope"].split()) == {"system/Patient.rs", "system/Observation.rs"}
    # the same assertion again: a replayed jti is refused
    again = httpx.post(authority.token_url, data=form, timeout=30)
    assert again.status_code == 401 and again.json()["error"] == "invalid_client"

    fhir = SyncFHIRClient(env.base, authorization=f"Bearer {token}")
    patient = fhir.reference("Patient", env.a).to_resource()
    assert patient["id"] == env.a
    obs = fhir.resources("Observation").search(patient=env.a).fetch_all()
    assert obs and all(o["subject"]["reference"] == f"Patient/{env.a}" for o in obs)
    # B has no consent and "care" denies by default: as if B did not exist
    assert fhir.resources("Observation").search(patient=env.b).fetch_all() == []
    # the scopes granted are the limit: Immunization was not asked for
    r = httpx.get(
        f"{env.base}/Immunization",
        params={"patient": env.a},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    # a garbage token is a 401 OperationOutcome with a Bearer challenge
    r = httpx.get(f"{env.base}/Patient/{env.a}", headers={"Authorization": "Bearer x.y.z"})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")


def test_audit_names_only_what_the_page_sent(env: Env) -> None:
    """A search or $everything page audits the resources sent on that page (and the
    included Patient), not everything that matched."""
    client = "pager-client"
    h = bearer(client, "open")
    r = get(env, "Observation", h, patient=env.a, _count=2, _include="Observation:patient")
    assert r.status_code == 200
    sent = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in r.json()["entry"]}
    assert len([s for s in sent if s.startswith("Observation/")]) == 2
    assert f"Patient/{env.a}" in sent
    r = get(env, f"Patient/{env.a}/$everything", h, _count=3)
    assert r.status_code == 200 and len(r.json()["entry"]) == 3
    page = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in r.json()["entry"]}

    def disclosed(ev: dict[str, Any]) -> set[str]:
        return {
            e["what"]["reference"]
            for e in ev.get("entity", [])
            if e.get("role", {}).get("code") == "4"
        }

    queries = [
        ev
        for ev in env.audits(client)
        if any("PatientQuery" in str(p) for p in ev.get("meta", {}).get("profile", []))
        or "PatientQuery" in orjson.dumps(ev).decode()
    ]
    shown = [disclosed(ev) for ev in queries if disclosed(ev)]
    assert sent in shown and page in shown
    assert all(len(d) <= 3 for d in shown)
