"""``POST /fhir/Patient/{id}/$unmerge`` over HTTP: an operator undoes a wrong merge, on real
Tansu and Redis, with real tokens (httpx)."""

from __future__ import annotations

import httpx
import orjson

from fhirtwin import bus
from fhirtwin.auth import DEV_CLIENT_ID, Authority
from fhirtwin.cli_api import build_app
from fhirtwin.infra import EmbeddedKafka, EmbeddedRedis, free_port
from tests.pipeline import drain, ingest_examples, produce
from tests.serving import serve

A40 = (
    b"MSH|^~\\&|EPICADT|NORTHGEN|FHIRTWIN|TWINHUB|20261110100000-0500||ADT^A40^ADT_A39|"
    b"MRG0002|P|2.5.1\r"
    b"EVN|A40|20261110100000-0500\r"
    b"PID|1||MRN448812^^^NORTHGEN&2.16.840.1.113883.3.9001.1&ISO^MR||Okafor^Adaeze\r"
    b"MRG|MRN550021^^^NORTHGEN&2.16.840.1.113883.3.9001.1&ISO^MR\r"
)


def test_an_admin_undoes_a_wrong_merge_over_http() -> None:
    with EmbeddedKafka() as k, EmbeddedRedis(prefer_existing=False) as r:
        ex = ingest_examples(k.bootstrap, r.url)
        store = ex.store
        produce(k.bootstrap, bus.RAW_TOPICS["hl7v2"], [A40])
        drain(k.bootstrap, r.url)
        assert store.twins() == [ex.twin_a] and store.resolve("MRN550021") == ex.twin_a

        port = free_port()
        authority = Authority(ex.client, token_url=f"http://127.0.0.1:{port}/auth/token")
        stop = serve(build_app(authority, k.bootstrap, r.url, live=lambda: {"status": "ok"}), port)
        reader = authority.dev_token(["system/*.rs"])  # reads, may not administer
        admin = authority.dev_token(["fhirtwin/admin"])
        base = f"http://127.0.0.1:{port}/fhir"

        def post(pid: str, token: str, reason: str | None = "two people") -> httpx.Response:
            body = (
                {
                    "resourceType": "Parameters",
                    "parameter": [{"name": "reason", "valueString": reason}],
                }
                if reason is not None
                else None
            )
            return httpx.post(
                f"{base}/Patient/{pid}/$unmerge",
                headers={
                    "Authorization": f"Bearer {token}",
                    "Content-Type": "application/fhir+json",
                },
                content=orjson.dumps(body) if body is not None else b"",
                timeout=60,
            )

        try:
            assert post(ex.b, reader).status_code == 403
            missing = post(ex.b, admin, reason=None)
            assert missing.status_code == 400 and "reason" in missing.text
            assert post("no-such-patient", admin).status_code == 404
            kept = post(ex.a, admin)  # the survivor's own Patient: nothing to undo
            assert kept.status_code == 409 and "not merged in" in kept.text

            done = post(ex.b, admin)
            assert done.status_code == 202, done.text
            outcome = done.json()
            assert outcome["resourceType"] == "OperationOutcome"
            assert orjson.loads(outcome["issue"][0]["details"]["text"])["twin"] == ex.twin_b
            drain(k.bootstrap, r.url)
            assert sorted(store.twins()) == sorted([ex.twin_a, ex.twin_b])
            assert store.resolve("MRN550021") == ex.twin_b
            assert store.holders(f"Patient/{ex.b}") == [ex.twin_b]
            log = [x for x in store.links(ex.twin_b) if x.get("unmerged") == ex.twin_b]
            assert (log[0]["by"], log[0]["reason"]) == (DEV_CLIENT_ID, "two people")
            again = post(ex.b, admin)
            assert again.status_code == 409
        finally:
            stop()
