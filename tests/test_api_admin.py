"""Administration over HTTP (fhirtwin/api_admin.py) on real Tansu and Redis: the app that
`fhirtwin up` and `fhirtwin api` serve (``cli_api.build_app``), uvicorn, real SMART Backend
Services tokens, httpx. Scopes, subscribers and clients, Consent writes that really take
effect on the next read, the audit log (search, disclosures, verification), dead letters."""

from __future__ import annotations

import base64
import hashlib
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from joserfc import jwt
from joserfc.jwk import ECKey

from fhirtwin import bus
from fhirtwin.assemble import AssembleWorker
from fhirtwin.audit import AuditSequencer
from fhirtwin.auth import ASSERTION_TYPE, Authority
from fhirtwin.cli_api import build_app
from fhirtwin.deadletter import list_deadletters
from fhirtwin.infra import EmbeddedKafka, EmbeddedRedis, free_port
from fhirtwin.normalize import NormalizeWorker
from fhirtwin.subscribers import Registry, make_subscriber
from fhirtwin.twin import TwinStore
from tests.pipeline import ingest_examples, produce, wait_for
from tests.serving import serve

ROOT = Path(__file__).resolve().parent.parent
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.9001.1"
SCOPES = "http://terminology.hl7.org/CodeSystem/consentscope"
ADMIN, AUDIT = "fhirtwin/admin", "fhirtwin/audit"
# A message type no rule converts: a dead letter at stage "map", until the rule is added.
UNKNOWN = (
    b"MSH|^~\\&|LAB|NORTHGEN|FHIRTWIN|TWINHUB|20261103091500||ZZZ^Z99|ZZZ0001|P|2.5.1\r"
    b"PID|1||MRN777^^^NORTHGEN^MR||Doe^Jane||19700101|F\r"
)


def deny_consent(mrn: str, actor_value: str) -> dict[str, Any]:
    """Patient ``mrn`` permits care, except to the app ``urn:oid:1.2.3.5|<actor_value>``."""
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": SCOPES, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"identifier": {"system": MRN_SYSTEM, "value": mrn}},
        "dateTime": "2026-01-01",
        "provision": {
            "type": "permit",
            "provision": [
                {
                    "type": "deny",
                    "actor": [
                        {
                            "role": {
                                "coding": [
                                    {
                                        "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                        "code": "IRCP",
                                    }
                                ]
                            },
                            "reference": {
                                "identifier": {"system": "urn:oid:1.2.3.5", "value": actor_value}
                            },
                        }
                    ],
                }
            ],
        },
    }


@dataclass
class Client:
    """A registered API client and the private key it signs its assertions with."""

    client_id: str
    key: ECKey
    token_url: str

    def token(self, scope: str) -> str:
        now = int(time.time())
        assertion = jwt.encode(
            {"alg": "ES384", "typ": "JWT", "kid": self.key.kid},
            {
                "iss": self.client_id,
                "sub": self.client_id,
                "aud": self.token_url,
                "exp": now + 120,
                "jti": secrets.token_urlsafe(12),
            },
            self.key,
            algorithms=["ES384"],
        )
        r = httpx.post(
            self.token_url,
            data={
                "grant_type": "client_credentials",
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion,
                "scope": scope,
            },
            timeout=30,
        )
        assert r.status_code == 200, r.text
        return str(r.json()["access_token"])


def new_key() -> tuple[ECKey, dict[str, Any]]:
    key = ECKey.generate_key("P-384", auto_kid=True)
    return key, {"keys": [dict(key.as_dict(private=False))]}


@dataclass
class Env:
    kafka: str
    redis_url: str
    root: str  # http://127.0.0.1:port
    store: TwinStore
    a: str  # Patient id of MRN448812
    b: str  # Patient id of MRN550021
    twin_a: str
    twin_b: str
    authority: Authority
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"{self.root}/fhir"

    def h(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}"}

    def client(self, client_id: str, jwks_key: ECKey) -> Client:
        return Client(client_id, jwks_key, self.authority.token_url)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    home = tmp_path_factory.mktemp("fhirtwin-home")
    with (
        pytest.MonkeyPatch.context() as mp,
        EmbeddedKafka() as k,
        EmbeddedRedis(prefer_existing=False) as r,
    ):
        mp.setenv("FHIRTWIN_HOME", str(home))  # the audit log's dev signing keys go here
        for name in ("FHIRTWIN_AUDIT_SIGNER", "FHIRTWIN_AUDIT_VERIFIER"):
            mp.delenv(name, raising=False)
        ex = ingest_examples(k.bootstrap, r.url)
        client, store = ex.client, ex.store
        registry = Registry(client)
        for sub_id, value in (("ops", "sim-ops"), ("ops2", "sim-ops2")):
            registry.put(
                make_subscriber(
                    sub_id,
                    actor=[f"urn:oid:1.2.3.5|{value}"],
                    purpose=["TREAT"],
                    scope="patient-privacy",
                    default="permit",
                )
            )
        port = free_port()
        authority = Authority(client, token_url=f"http://127.0.0.1:{port}/auth/token")
        app = build_app(authority, k.bootstrap, r.url, live=lambda: {"status": "ok"})
        stop_server = serve(app, port)
        # the assembler runs throughout, as under `fhirtwin up`: Consent writes wait for it
        stop = threading.Event()
        worker = AssembleWorker(k.bootstrap, r.url)
        assembler = threading.Thread(target=worker.run, args=(stop,))
        assembler.start()
        wait_for(lambda: bool(worker.stream.assigned), 60, "the assembler to join its group")
        e = Env(
            k.bootstrap,
            r.url,
            f"http://127.0.0.1:{port}",
            store,
            ex.a,
            ex.b,
            ex.twin_a,
            ex.twin_b,
            authority,
        )
        # the operator's clients: as `fhirtwin up` makes them (no subscriber) …
        e.tokens["admin+audit"] = authority.dev_token([ADMIN, AUDIT])
        e.tokens["admin"] = authority.dev_token([ADMIN])
        e.tokens["audit"] = authority.dev_token([AUDIT])
        # … and a subscriber client, registered through the API itself
        key, jwks = new_key()
        r_ = httpx.post(
            f"{e.root}/admin/clients",
            json={
                "client_id": "ops-app",
                "jwks": jwks,
                "scopes": ["system/*.rs"],
                "subscriber": "ops",
            },
            headers=e.h("admin"),
            timeout=30,
        )
        assert r_.status_code == 201, r_.text
        e.tokens["ops"] = e.client("ops-app", key).token("system/*.rs")
        key2, jwks2 = new_key()
        authority.register_client("ops2-app", jwks2, ["system/*.rs"], "ops2")
        e.tokens["ops2"] = e.client("ops2-app", key2).token("system/*.rs")
        try:
            yield e
        finally:
            stop.set()
            assembler.join(30)
            stop_server()


def call(env: Env, method: str, path: str, who: str | None, **kw: Any) -> httpx.Response:
    headers = env.h(who) if who else {}
    headers |= kw.pop("headers", {})
    return httpx.request(method, f"{env.root}{path}", headers=headers, timeout=60, **kw)


def diagnostics(r: httpx.Response) -> str:
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    return str(body["issue"][0]["diagnostics"])


# Every route of fhirtwin/api_admin.py: (method, path, JSON body).
SUB_BODY = {"actor": ["urn:oid:9.9|x"], "purpose": ["TREAT"], "scope": "patient-privacy"}
ADMIN_CALLS: list[tuple[str, str, Any]] = [
    ("GET", "/admin/subscribers", None),
    ("POST", "/admin/subscribers", {"id": "evil", **SUB_BODY}),
    ("GET", "/admin/subscribers/ops", None),
    ("PUT", "/admin/subscribers/ops", SUB_BODY),
    ("DELETE", "/admin/subscribers/ops", None),
    ("GET", "/admin/clients", None),
    ("POST", "/admin/clients", {"client_id": "evil", "jwks": {}, "scopes": ["fhirtwin/admin"]}),
    ("GET", "/admin/clients/ops-app", None),
    ("PUT", "/admin/clients/ops-app", {"jwks": {}, "scopes": ["fhirtwin/admin"]}),
    ("DELETE", "/admin/clients/ops-app", None),
    ("POST", "/fhir/Consent", deny_consent("MRN550021", "sim-ops2")),
    ("PUT", "/fhir/Consent/x", {**deny_consent("MRN550021", "sim-ops2"), "id": "x"}),
    ("GET", "/fhir/Consent/x", None),
    ("GET", "/fhir/Consent/x/_history/1", None),
    ("GET", "/admin/deadletters", None),
    ("GET", "/admin/deadletters/0:0", None),
    ("POST", "/admin/deadletters/0:0/replay", None),
    ("POST", "/admin/deadletters/0:0/replay-corrected", {"corrected_base64": "TVNI"}),
    ("POST", "/admin/deadletters/replay", {"all": True}),
]
AUDIT_CALLS: list[tuple[str, str, Any]] = [
    ("GET", "/fhir/AuditEvent", None),
    ("GET", "/fhir/AuditEvent/x", None),
    ("GET", "/fhir/Patient/x/$disclosures", None),
    ("GET", "/admin/audit/disclosures?patient=MRN448812", None),
    ("GET", "/admin/audit/verify", None),
]


def test_every_route_is_covered(env: Env) -> None:
    """The lists above name every administrative route the app serves (a new one must be
    added to them, and so to the refusal tests below)."""
    spec = httpx.get(f"{env.root}/openapi.json", timeout=30).json()
    values = {
        "{sub_id}": "ops",
        "{client_id}": "ops-app",
        "{rid}": "x",
        "{vid}": "1",
        "{dl_id}": "0:0",
        "{eid}": "x",
        "{pid}": "x",
    }
    served = set()
    for path, ops in spec["paths"].items():
        if path.startswith(("/admin", "/fhir/Consent", "/fhir/AuditEvent")) or path.endswith(
            "$disclosures"
        ):
            for name, value in values.items():
                path = path.replace(name, value)
            served |= {(m.upper(), path) for m in ops}
    listed = {(m, p.split("?")[0]) for m, p, _ in ADMIN_CALLS + AUDIT_CALLS}
    assert served == listed


def test_subscriber_token_is_refused_everywhere(env: Env) -> None:
    """A token that reads as a subscriber gets 403 on every admin and audit route, and
    nothing changed; no token at all is 401."""
    before = sorted(s.id for s in Registry(redis.Redis.from_url(env.redis_url)).all())
    for method, path, body in ADMIN_CALLS + AUDIT_CALLS:
        r = call(env, method, path, "ops", json=body)
        assert r.status_code == 403, (method, path, r.status_code, r.text)
        assert "subscriber" in diagnostics(r), (method, path)
        anon = call(env, method, path, None, json=body)
        assert anon.status_code == 401, (method, path, anon.status_code)
        assert anon.headers["www-authenticate"].startswith("Bearer")
    after = sorted(s.id for s in Registry(redis.Redis.from_url(env.redis_url)).all())
    assert before == after and env.authority.client("ops-app") is not None
    assert env.authority.client("evil") is None


def test_admin_scope_cannot_read_the_audit_and_audit_scope_cannot_administer(env: Env) -> None:
    for method, path, body in AUDIT_CALLS:
        r = call(env, method, path, "admin", json=body)
        assert r.status_code == 403 and AUDIT in diagnostics(r), (path, r.text)
    for method, path, _body in ADMIN_CALLS:
        if method == "GET":  # reads only: nothing may change here
            r = call(env, method, path, "audit")
            assert r.status_code == 403 and ADMIN in diagnostics(r), (path, r.text)
    assert call(env, "GET", "/admin/subscribers", "admin").status_code == 200
    assert call(env, "GET", "/fhir/AuditEvent?_count=1", "audit").status_code == 200


def test_metadata_tells_about_administration(env: Env) -> None:
    cs = call(env, "GET", "/fhir/metadata", None).json()
    by_type = {x["type"]: x for x in cs["rest"][0]["resource"]}
    assert {i["code"] for i in by_type["Consent"]["interaction"]} >= {"create", "update"}
    assert {i["code"] for i in by_type["AuditEvent"]["interaction"]} == {"read", "search-type"}
    names = {p["name"] for p in by_type["AuditEvent"]["searchParam"]}
    assert {"patient", "date", "agent", "subtype"} <= names
    ops = {o["name"] for o in by_type["Patient"]["operation"]}
    assert ops == {"everything", "disclosures"}
    # the catch-all still refuses other writes
    r = call(env, "POST", "/fhir/Observation", "admin", json={"resourceType": "Observation"})
    assert r.status_code == 405


def test_subscribers_and_clients(env: Env) -> None:
    body = {"id": "sim-new", **SUB_BODY, "types": ["Observation"]}
    r = call(env, "POST", "/admin/subscribers", "admin", json=body)
    assert r.status_code == 201 and r.json()["topic"] == "twin.snapshots.sim-new"
    assert r.headers["location"] == "/admin/subscribers/sim-new"
    assert bus.partitions_of(env.kafka, "twin.snapshots.sim-new")  # its topic was made
    again = call(env, "POST", "/admin/subscribers", "admin", json=body)
    assert again.status_code == 409
    ids = [s["id"] for s in call(env, "GET", "/admin/subscribers", "admin").json()]
    assert "sim-new" in ids and "ops" in ids
    # the same validation as `fhirtwin subscriber add`
    bad = call(
        env, "PUT", "/admin/subscribers/sim-new", "admin", json={**SUB_BODY, "purpose": ["NOPE"]}
    )
    assert bad.status_code == 400 and "--purpose 'NOPE'" in diagnostics(bad)
    research = {**SUB_BODY, "scope": "research", "purpose": ["HRESCH"], "default": "permit"}
    bad = call(env, "PUT", "/admin/subscribers/sim-new", "admin", json=research)
    assert bad.status_code == 400 and "research" in diagnostics(bad)
    typo = call(env, "PUT", "/admin/subscribers/sim-new", "admin", json={**SUB_BODY, "purpse": 1})
    assert typo.status_code == 400 and "purpse" in diagnostics(typo)
    put = call(
        env, "PUT", "/admin/subscribers/sim-new", "admin", json={**SUB_BODY, "default": "permit"}
    )
    assert put.status_code == 200 and put.json()["default"] == "permit"
    assert call(env, "GET", "/admin/subscribers/sim-new", "admin").json()["default"] == "permit"
    assert call(env, "DELETE", "/admin/subscribers/sim-new", "admin").status_code == 204
    assert call(env, "GET", "/admin/subscribers/sim-new", "admin").status_code == 404
    assert call(env, "DELETE", "/admin/subscribers/sim-new", "admin").status_code == 404

    # API clients: register, get a token with it, read; remove it and the token is dead
    key, jwks = new_key()
    r = call(
        env,
        "PUT",
        "/admin/clients/ops-reader",
        "admin",
        json={"jwks": jwks, "scopes": ["system/Patient.rs"], "subscriber": "ops"},
    )
    assert r.status_code == 201 and r.json()["subscriber"] == "ops"
    token = env.client("ops-reader", key).token("system/Patient.rs")
    h = {"Authorization": f"Bearer {token}"}
    assert call(env, "GET", f"/fhir/Patient/{env.a}", None, headers=h).status_code == 200
    listed = [c["client_id"] for c in call(env, "GET", "/admin/clients", "admin").json()]
    assert "ops-reader" in listed
    got = call(env, "GET", "/admin/clients/ops-reader", "admin").json()
    assert got["jwks"] == jwks and "d" not in got["jwks"]["keys"][0]
    # a subscriber client may not hold admin scopes; private keys are refused
    bad = call(
        env,
        "PUT",
        "/admin/clients/ops-reader",
        "admin",
        json={"jwks": jwks, "scopes": [ADMIN], "subscriber": "ops"},
    )
    assert bad.status_code == 400 and "not for a client that reads as subscriber" in diagnostics(
        bad
    )
    private = {"keys": [dict(key.as_dict(private=True))]}
    bad = call(
        env,
        "POST",
        "/admin/clients",
        "admin",
        json={"client_id": "leaky", "jwks": private, "scopes": ["system/*.rs"]},
    )
    assert bad.status_code == 400 and "private" in diagnostics(bad)
    assert call(env, "DELETE", "/admin/clients/ops-reader", "admin").status_code == 204
    dead = call(env, "GET", f"/fhir/Patient/{env.a}", None, headers=h)
    assert dead.status_code == 401


def test_consent_written_through_the_api_takes_effect(env: Env) -> None:
    """ops may read patient B (default permit, no consent); B's new Consent denies sim-ops:
    ops's next read is the 404 of a missing patient, ops2's is still 200. Withdrawn (a new
    version, inactive), ops reads B again."""
    read = f"/fhir/Patient/{env.b}"
    assert call(env, "GET", read, "ops").status_code == 200
    missing = call(env, "GET", "/fhir/Patient/no-such-patient", "ops")

    r = call(
        env,
        "POST",
        "/fhir/Consent",
        "admin",
        content=orjson.dumps({**deny_consent("MRN550021", "sim-ops"), "id": "client-chosen"}),
        headers={"Content-Type": "application/fhir+json"},
    )
    assert r.status_code == 201, r.text
    stored = r.json()
    cid, vid = stored["id"], stored["meta"]["versionId"]
    assert cid != "client-chosen"  # create: the server assigns the id
    assert r.headers["etag"] == f'W/"{vid}"'
    assert r.headers["location"] == f"{env.base}/Consent/{cid}/_history/{vid}"
    assert stored["provision"]["provision"][0]["type"] == "deny"
    # it is in B's twin, where the consent engine and the snapshot publisher read it
    assert env.store.resource(env.twin_b, f"Consent/{cid}") is not None

    denied = call(env, "GET", read, "ops")
    assert denied.status_code == 404
    assert denied.json()["issue"][0]["code"] == missing.json()["issue"][0]["code"]
    assert call(env, "GET", read, "ops2").status_code == 200
    obs = call(env, "GET", f"/fhir/Observation?patient={env.b}", "ops").json()
    assert obs.get("entry", []) == []

    got = call(env, "GET", r.headers["location"].removeprefix(env.root), "admin")
    assert got.status_code == 200 and got.json()["id"] == cid
    assert call(env, "GET", f"/fhir/Consent/{cid}", "admin").json()["meta"]["versionId"] == vid

    # update: withdraw it (If-Match on the version read); a stale If-Match is refused
    withdrawn = {**stored, "status": "inactive"}
    stale = call(
        env,
        "PUT",
        f"/fhir/Consent/{cid}",
        "admin",
        json=withdrawn,
        headers={"If-Match": 'W/"0000"'},
    )
    assert stale.status_code == 412
    u = call(
        env,
        "PUT",
        f"/fhir/Consent/{cid}",
        "admin",
        json=withdrawn,
        headers={"If-Match": f'W/"{vid}"'},
    )
    assert u.status_code == 200, u.text
    assert u.json()["status"] == "inactive" and u.json()["meta"]["versionId"] != vid
    assert call(env, "GET", read, "ops").status_code == 200

    # both writes are in the audit log, naming the client and the Consent
    events = audit_log(env)
    writes = [
        ev
        for ev in events
        if ev.get("subtype", [{}])[0].get("code") in ("create", "update")
        and any(e.get("what", {}).get("reference") == f"Consent/{cid}" for e in ev["entity"])
    ]
    assert [ev["action"] for ev in writes] == ["C", "U"]
    assert all(ev["agent"][0]["altId"] == "fhirtwin-dev" for ev in writes)


def test_malformed_consents_name_the_path(env: Env) -> None:
    good = deny_consent("MRN550021", "sim-ops2")

    def post(doc: Any) -> httpx.Response:
        return call(env, "POST", "/fhir/Consent", "admin", json=doc)

    bad_date = {
        **good,
        "provision": {
            "type": "permit",
            "provision": [{"type": "deny", "period": {"start": "yesterday"}}],
        },
    }
    r = post(bad_date)
    assert r.status_code == 400
    assert diagnostics(r).startswith("$.provision.provision[0].period.start:")
    assert r.json()["issue"][0]["expression"] == ["Consent.provision.provision[0].period.start"]
    r = post({**good, "status": 12})
    assert r.status_code == 400 and diagnostics(r).startswith("$.status:")
    r = post({k: v for k, v in good.items() if k != "scope"})
    assert r.status_code == 400 and diagnostics(r).startswith("$.scope:")
    r = post({**good, "resourceType": "Observation"})
    assert r.status_code == 400 and diagnostics(r).startswith("$.resourceType:")
    # valid R4, but not something the consent engine can decide: 422
    r = post({**good, "provision": {"type": "maybe"}})
    assert r.status_code == 422 and diagnostics(r).startswith("$.provision:")
    r = post({**good, "patient": {"identifier": {"system": MRN_SYSTEM, "value": "MRN-NOBODY"}}})
    assert r.status_code == 422 and diagnostics(r).startswith("$.patient:")
    # not JSON, not an object
    r = call(
        env,
        "POST",
        "/fhir/Consent",
        "admin",
        content=b"{nope",
        headers={"Content-Type": "application/fhir+json"},
    )
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    r = call(env, "POST", "/fhir/Consent", "admin", json=[1, 2])
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    # update: the id in the body is the id in the URL
    r = call(env, "PUT", "/fhir/Consent/abc", "admin", json={**good, "id": "xyz"})
    assert r.status_code == 400 and diagnostics(r).startswith("$.id:")
    assert "Traceback" not in r.text
    # none of these reached the twin
    assert not [
        x
        for x in env.store.resources(env.twin_b)
        if x["resourceType"] == "Consent"
        and x.get("status") == "active"
        and x["provision"].get("type") == "maybe"
    ]


def audit_log(env: Env) -> list[dict[str, Any]]:
    return [orjson.loads(rec.value) for rec in bus.read_topic(env.kafka, bus.AUDIT)]


def test_auditevent_search_finds_the_read_just_made(env: Env) -> None:
    r = call(env, "GET", f"/fhir/Patient/{env.a}", "ops2")
    assert r.status_code == 200
    today = time.strftime("%Y-%m-%d", time.gmtime())
    params = {"patient": env.a, "agent": "ops2-app", "subtype": "read", "date": f"ge{today}"}
    s = call(env, "GET", "/fhir/AuditEvent", "audit", params=params)
    assert s.status_code == 200 and s.headers["content-type"].startswith("application/fhir+json")
    bundle = s.json()
    assert bundle["type"] == "searchset" and "total" not in bundle
    events = [e["resource"] for e in bundle["entry"]]
    reads = [ev for ev in events if ev["meta"]["profile"][0].endswith("IHE.BasicAudit.PatientRead")]
    assert reads, events
    assert any(
        ent.get("what", {}).get("reference") == f"Patient/{env.a}" for ent in reads[-1]["entity"]
    )
    assert all(e["extension"][0]["url"] == "urn:fhirtwin:audit-log-index" for e in bundle["entry"])
    # the filters filter: another agent, another day, another subtype find none of it
    for other in ({"agent": "nobody"}, {"date": "lt2000-01-01"}, {"subtype": "search-type"}):
        found = call(env, "GET", "/fhir/AuditEvent", "audit", params={**params, **other}).json()
        assert not [e for e in found.get("entry", []) if e["resource"]["id"] == reads[-1]["id"]], (
            other
        )
    # read by id
    one = call(env, "GET", f"/fhir/AuditEvent/{reads[-1]['id']}", "audit")
    assert one.status_code == 200 and one.json() == reads[-1]
    assert call(env, "GET", "/fhir/AuditEvent/nope", "audit").status_code == 404
    # paging: next links walk every match once
    walked: list[str] = []
    page = call(
        env, "GET", "/fhir/AuditEvent", "audit", params={"patient": env.a, "_count": 2}
    ).json()
    while True:
        walked += [e["resource"]["id"] for e in page["entry"]]
        nxt = [lk["url"] for lk in page["link"] if lk["relation"] == "next"]
        if not nxt:
            break
        page = httpx.get(nxt[0], headers=env.h("audit"), timeout=60).json()
    assert len(walked) == len(set(walked)) >= 3
    # bad parameters are 400s, not ignored
    for bad in ({"entity": "x"}, {"date": "yesterday"}, {"_count": "x"}, {"_sort": "agent"}):
        r = call(env, "GET", "/fhir/AuditEvent", "audit", params=bad)
        assert r.status_code == 400, bad
    # reading the audit log is itself audited: the auditor's searches are in it
    mine = call(
        env,
        "GET",
        "/fhir/AuditEvent",
        "audit",
        params={"agent": "fhirtwin-dev", "subtype": "search-type"},
    ).json()
    queries = [base64_query(ev["resource"]) for ev in mine["entry"]]
    assert any(q.startswith("/fhir/AuditEvent?patient=") for q in queries), queries


def base64_query(ev: dict[str, Any]) -> str:
    import base64

    for ent in ev.get("entity", []):
        if "query" in ent:
            return base64.b64decode(ent["query"]).decode()
    return ""


def test_accounting_of_disclosures(env: Env) -> None:
    r = call(env, "GET", f"/fhir/Observation?patient={env.a}", "ops2")
    assert r.status_code == 200 and r.json()["entry"]
    sent = {f"Observation/{e['resource']['id']}" for e in r.json()["entry"]}
    report = call(env, "GET", "/admin/audit/disclosures", "audit", params={"patient": "MRN448812"})
    assert report.status_code == 200
    body = report.json()
    assert body["patient"] == env.twin_a
    api_rows = [
        row for row in body["disclosures"] if row["via"] == "api" and row["recipient"] == "ops2"
    ]
    assert any(set(row["resources"]) == sent for row in api_rows), api_rows
    assert all(
        not ref.startswith("Consent/") for row in body["disclosures"] for ref in row["resources"]
    )
    # B's disclosures are not A's
    other = call(
        env, "GET", "/admin/audit/disclosures", "audit", params={"patient": "MRN550021"}
    ).json()
    assert not any(set(row["resources"]) == sent for row in other["disclosures"])
    # the FHIR operation: the same disclosures as AuditEvents
    op = call(env, "GET", f"/fhir/Patient/{env.a}/$disclosures", "audit")
    assert op.status_code == 200 and op.json()["type"] == "searchset"
    assert len(op.json()["entry"]) == len(body["disclosures"])
    # a refused read is no disclosure: a client whose subscriber denies by default
    before = len(body["disclosures"])
    sub = {"actor": ["urn:oid:1.2.3.9|closed"], "purpose": ["TREAT"], "scope": "patient-privacy"}
    assert call(env, "PUT", "/admin/subscribers/closed", "admin", json=sub).status_code == 201
    key, jwks = new_key()
    reg = {"jwks": jwks, "scopes": ["system/*.rs"], "subscriber": "closed"}
    assert call(env, "PUT", "/admin/clients/closed-app", "admin", json=reg).status_code == 201
    h = {"Authorization": f"Bearer {env.client('closed-app', key).token('system/*.rs')}"}
    assert call(env, "GET", f"/fhir/Patient/{env.a}", None, headers=h).status_code == 404
    again = call(
        env, "GET", "/admin/audit/disclosures", "audit", params={"patient": "MRN448812"}
    ).json()
    assert len(again["disclosures"]) == before
    assert call(env, "GET", "/admin/audit/disclosures", "audit").status_code == 400


def test_audit_log_verification(env: Env) -> None:
    # the sequencer of `fhirtwin up` (its keys under $FHIRTWIN_HOME), until it is idle
    AuditSequencer(env.kafka, env.redis_url).run(threading.Event(), idle_exit=3)
    r = call(env, "GET", "/admin/audit/verify", "audit")
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["ok"] is True, result
    assert result["entries"] >= result["signed"] > 10 and result["first_bad_index"] is None


def test_deadletter_list_and_replay(env: Env, tmp_path: Path) -> None:
    produce(env.kafka, bus.RAW_TOPICS["hl7v2"], [UNKNOWN])
    NormalizeWorker(env.kafka, env.redis_url, "hl7v2", validate=False).run(
        threading.Event(), idle_exit=3
    )
    listing = call(env, "GET", "/admin/deadletters", "admin", params={"stage": "map"})
    assert listing.status_code == 200
    letters = [d for d in listing.json()["entry"] if "ZZZ^Z99" in d["reason"]]
    assert len(letters) == 1 and letters[0]["replayed"] is False
    dl_id = letters[0]["id"]
    one = call(env, "GET", f"/admin/deadletters/{dl_id}", "admin").json()
    assert one["original"].encode() == UNKNOWN and "MSH-9" in one["reason"]
    paged = call(env, "GET", "/admin/deadletters", "admin", params={"_count": 1}).json()
    assert len(paged["entry"]) == 1
    assert call(env, "GET", "/admin/deadletters/9:999999", "admin").status_code == 404
    assert call(env, "POST", "/admin/deadletters/replay", "admin", json={}).status_code == 400
    assert env.store.resolve("MRN777") is None

    # the engineer adds the rule and restarts the worker with it; the API replays
    rules = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", rules)
    (rules / "hl7v2" / "messages" / "ZZZ_Z99.yaml").write_text("extends: _ADT_EVENT\n")
    r = call(env, "POST", f"/admin/deadletters/{dl_id}/replay", "admin")
    assert r.status_code == 200 and r.json() == {"replayed": 1, "ids": [dl_id]}
    NormalizeWorker(env.kafka, env.redis_url, "hl7v2", validate=False, mappings=rules).run(
        threading.Event(), idle_exit=3
    )
    wait_for(lambda: env.store.resolve("MRN777") is not None, 60, "the replayed message's twin")
    twin = env.store.resolve("MRN777")
    assert twin is not None and "Patient" in env.store.counts(twin)
    assert [d.id for d in list_deadletters(env.kafka) if "ZZZ^Z99" in d.reason] == [dl_id]
    after = call(env, "GET", "/admin/deadletters", "admin", params={"stage": "map"}).json()
    assert [d["replayed"] for d in after["entry"] if d["id"] == dl_id] == [True]
    open_ = call(env, "GET", "/admin/deadletters", "admin", params={"open": "true"}).json()
    assert dl_id not in [d["id"] for d in open_["entry"]]
    # replay all: nothing open is left of stage map
    r = call(env, "POST", "/admin/deadletters/replay", "admin", json={"all": True, "stage": "map"})
    assert r.status_code == 200 and r.json()["replayed"] == 0


def test_a_dead_letter_replays_as_a_corrected_copy(env: Env) -> None:
    """An ADT without its PID cannot be fixed by a rule: the engineer sends a corrected
    copy (with the PID) in its place; the original stays in the dead letters."""
    head = b"MSH|^~\\&|EPICADT|NORTHGEN|FHIRTWIN|TWINHUB|20261103091500-0500||ADT^A01^ADT_A01|"
    rest = b"EVN|A01|20261103091500-0500\rPV1|1|I|4W^412^B\r"
    broken = head + b"NOPID01|P|2.5.1\r" + rest
    fixed = broken.replace(b"PV1|", b"PID|1||MRN778^^^NORTHGEN^MR||Doe^Jane||19700101|F\rPV1|")
    produce(env.kafka, bus.RAW_TOPICS["hl7v2"], [broken])
    NormalizeWorker(env.kafka, env.redis_url, "hl7v2", validate=False).run(
        threading.Event(), idle_exit=3
    )
    (dl,) = [d for d in list_deadletters(env.kafka) if d.error.get("control_id") == "NOPID01"]
    assert dl.stage == "map" and "this ADT^A01 message has no PID segment" in dl.reason
    path = f"/admin/deadletters/{dl.id}/replay-corrected"
    bad = call(env, "POST", path, "admin", json={"corrected_base64": "not base64!"})
    assert bad.status_code == 400 and "base64" in diagnostics(bad)
    empty = call(env, "POST", path, "admin", json={"corrected_base64": ""})
    assert empty.status_code == 400 and "empty" in diagnostics(empty)

    body = {"corrected_base64": base64.b64encode(fixed).decode()}
    r = call(env, "POST", path, "admin", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {"replayed": 1, "ids": [dl.id], "corrected_bytes": len(fixed)}
    NormalizeWorker(env.kafka, env.redis_url, "hl7v2", validate=False).run(
        threading.Event(), idle_exit=3
    )
    wait_for(lambda: env.store.resolve("MRN778") is not None, 60, "the corrected copy's twin")
    one = call(env, "GET", f"/admin/deadletters/{dl.id}", "admin").json()
    assert one["original"].encode() == broken  # the original stays as it was
    assert one["replayed"] is True
    assert one["corrected"]["sha256"] == hashlib.sha256(fixed).hexdigest()
    assert one["corrected"]["bytes"] == len(fixed)
    # no new dead letter: the copy converted
    assert [
        d.id for d in list_deadletters(env.kafka) if d.error.get("control_id") == "NOPID01"
    ] == [dl.id]


# -- schemathesis: no 5xx on generated requests (last: it writes and deletes at random) ------

STRING: dict[str, Any] = {"type": "string"}
QUERIES = {
    "/fhir/AuditEvent": "patient date agent subtype type outcome _id _count _offset _sort",
    "/fhir/Patient/{pid}/$disclosures": "_count _offset",
    "/admin/deadletters": "stage open _count _offset",
}


def admin_schema(openapi: dict[str, Any]) -> dict[str, Any]:
    """The administrative part of the served schema, with the query parameters the routes
    read from the request (they are not declared) and any extra ones."""
    import copy

    spec = copy.deepcopy(openapi)
    paths = {}
    for path, item in spec["paths"].items():
        if not (
            path.startswith(("/admin", "/fhir/Consent", "/fhir/AuditEvent"))
            or path.endswith("$disclosures")
        ):
            continue
        for op in item.values():
            params = op.setdefault("parameters", [])
            params += [
                {"name": n, "in": "query", "required": False, "schema": STRING}
                for n in QUERIES.get(path, "").split()
            ]
            if op.get("requestBody") is None and path in QUERIES:
                params.append(
                    {
                        "name": "extra",
                        "in": "query",
                        "required": False,
                        "style": "form",
                        "explode": True,
                        "schema": {"type": "object", "additionalProperties": STRING},
                    }
                )
        paths[path] = item
    spec["paths"] = paths
    return spec


FUZZ = [
    ("GET", "/admin/subscribers"),
    ("POST", "/admin/subscribers"),
    ("GET", "/admin/subscribers/{sub_id}"),
    ("PUT", "/admin/subscribers/{sub_id}"),
    ("DELETE", "/admin/subscribers/{sub_id}"),
    ("GET", "/admin/clients"),
    ("POST", "/admin/clients"),
    ("GET", "/admin/clients/{client_id}"),
    ("PUT", "/admin/clients/{client_id}"),
    ("DELETE", "/admin/clients/{client_id}"),
    ("POST", "/fhir/Consent"),
    ("PUT", "/fhir/Consent/{rid}"),
    ("GET", "/fhir/Consent/{rid}"),
    ("GET", "/fhir/Consent/{rid}/_history/{vid}"),
    ("GET", "/fhir/AuditEvent"),
    ("GET", "/fhir/AuditEvent/{eid}"),
    ("GET", "/fhir/Patient/{pid}/$disclosures"),
    ("GET", "/admin/audit/disclosures"),
    ("GET", "/admin/audit/verify"),
    ("GET", "/admin/deadletters"),
    ("GET", "/admin/deadletters/{dl_id}"),
    ("POST", "/admin/deadletters/{dl_id}/replay"),
    ("POST", "/admin/deadletters/{dl_id}/replay-corrected"),
    ("POST", "/admin/deadletters/replay"),
]


@pytest.mark.parametrize(("method", "path"), FUZZ, ids=[f"{m} {p}" for m, p in FUZZ])
def test_no_server_error(env: Env, method: str, path: str) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    spec = httpx.get(f"{env.root}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(admin_schema(spec))
    operation = schema[path][method]
    headers = {"Authorization": f"Bearer {env.authority.dev_token([ADMIN, AUDIT])}"}
    slow = path.startswith(("/fhir/AuditEvent", "/admin/audit", "/admin/deadletters")) or (
        "$disclosures" in path
    )

    @settings(
        max_examples=8 if slow else 25,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    @given(case=operation.as_strategy())
    def run(case: Any) -> None:
        case.call_and_validate(
            base_url=env.root, headers=headers, checks=[not_a_server_error], timeout=60
        )

    run()


def test_fuzz_covers_every_route() -> None:
    templates = {(m, p) for m, p in FUZZ}
    assert len(templates) == len(ADMIN_CALLS) + len(AUDIT_CALLS)
