"""``POST /fhir/Patient/{id}/$erase`` over HTTP: the app `fhirtwin up` and `fhirtwin api`
serve (``cli_api.build_app``) on real Tansu and Redis, with real SMART tokens (httpx)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import orjson
import pytest

from fhirtwin import bus
from fhirtwin.auth import Authority
from fhirtwin.cli_api import build_app
from fhirtwin.infra import EmbeddedKafka, EmbeddedRedis, free_port
from fhirtwin.subscribers import Registry, make_subscriber
from fhirtwin.twin import TwinStore
from tests.pipeline import ingest_examples, records
from tests.serving import serve
from tests.test_api_admin import Client, new_key


@dataclass
class Env:
    kafka: str
    store: TwinStore
    base: str
    a: str  # Patient id of MRN448812
    b: str  # Patient id of MRN550021
    admin: str  # token: fhirtwin/admin
    reader: str  # token: system/*.rs, reading as subscriber "care"


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with EmbeddedKafka() as k, EmbeddedRedis(prefer_existing=False) as r:
        ex = ingest_examples(k.bootstrap, r.url)
        client, store = ex.client, ex.store
        Registry(client).put(
            make_subscriber(
                "care",
                actor=["urn:oid:1.2.3.4|sim-care"],
                purpose=["TREAT"],
                scope="patient-privacy",
                default="permit",
            )
        )
        port = free_port()
        authority = Authority(client, token_url=f"http://127.0.0.1:{port}/auth/token")
        app = build_app(authority, k.bootstrap, r.url, live=lambda: {"status": "ok"})
        stop_server = serve(app, port)
        key, jwks = new_key()
        authority.register_client("care-app", jwks, ["system/*.rs"], "care")
        reader = Client("care-app", key, authority.token_url).token("system/*.rs")
        try:
            yield Env(
                k.bootstrap,
                store,
                f"http://127.0.0.1:{port}/fhir",
                ex.a,
                ex.b,
                authority.dev_token(["fhirtwin/admin"]),
                reader,
            )
        finally:
            stop_server()


def _post(env: Env, pid: str, token: str, body: object = None) -> httpx.Response:
    return httpx.post(
        f"{env.base}/Patient/{pid}/$erase",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"},
        content=orjson.dumps(body) if body is not None else b"",
        timeout=60,
    )


def _read(env: Env, pid: str) -> httpx.Response:
    return httpx.get(
        f"{env.base}/Patient/{pid}", headers={"Authorization": f"Bearer {env.reader}"}, timeout=30
    )


def test_only_an_admin_token_may_erase(env: Env) -> None:
    r = _post(env, env.a, env.reader)
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    assert _read(env, env.a).status_code == 200  # nothing happened
    r = httpx.post(f"{env.base}/Patient/{env.a}/$erase", timeout=30)  # no token
    assert r.status_code == 401


def test_a_malformed_body_is_refused_before_anything_is_erased(env: Env) -> None:
    r = _post(
        env,
        env.b,
        env.admin,
        {"resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": 7}]},
    )
    assert r.status_code == 400
    assert "parameter[0].valueString" in r.json()["issue"][0]["diagnostics"]
    assert _read(env, env.b).status_code == 200


def test_erase_removes_the_patient_from_the_api_and_audits_it(env: Env) -> None:
    before = _read(env, env.a)
    assert before.status_code == 200
    reason = {
        "resourceType": "Parameters",
        "parameter": [{"name": "reason", "valueString": "art. 17"}],
    }
    r = _post(env, env.a, env.admin, reason)
    assert r.status_code == 200, r.text
    issue = r.json()["issue"][0]
    assert issue["severity"] == "information" and "1 data key(s) destroyed" in issue["diagnostics"]
    # the patient is gone for every client, exactly like a patient never known …
    gone, never = _read(env, env.a), _read(env, "no-such-patient")
    assert gone.status_code == never.status_code == 404
    everything = httpx.get(
        f"{env.base}/Patient/{env.a}/$everything",
        headers={"Authorization": f"Bearer {env.reader}"},
        timeout=30,
    )
    assert everything.status_code == 404
    # … a second erasure finds nothing, the other patient is untouched …
    assert _post(env, env.a, env.admin).status_code == 404
    assert _read(env, env.b).status_code == 200
    # … and the audit log says who erased whom and why.
    audit = [orjson.loads(x.value) for x in records(env.kafka, bus.AUDIT)]
    erasures = [e for e in audit if any(s["code"] == "erase" for s in e.get("subtype", []))]
    assert len(erasures) == 1
    event = erasures[0]
    assert event["entity"][0]["what"]["reference"] == f"Patient/{env.a}"
    assert (
        event["outcomeDesc"] == "art. 17" and event["agent"][0]["who"]["display"] == "fhirtwin-dev"
    )
