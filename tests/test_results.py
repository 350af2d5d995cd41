"""The results back-channel on real Tansu and Redis: subscribers' results join the twin."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from fhirtwin import bus
from fhirtwin.assemble import AssembleWorker
from fhirtwin.cli import app
from fhirtwin.cli_results import register
from fhirtwin.results import (
    H_SNAPSHOT,
    H_SUBSCRIBER,
    RESULTS_GROUP,
    RESULTS_TOPIC,
    SUBSCRIBER_TAG,
    ResultError,
    ResultsWorker,
    parse_result,
    result_id,
)
from fhirtwin.snapshot import SNAPSHOT_GROUP, SnapshotPublisher, consent_event
from fhirtwin.subscribers import Registry, make_subscriber, topic_for
from fhirtwin.validation import validate_resource
from tests.pipeline import ingest_examples, records, wait_for

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "hl7v2"
ACTREASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"

register(app)


def _risk(rid: str | None, subject: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "status": "final",
        "prediction": [
            {"outcome": {"text": "readmission within 30 days"}, "probabilityDecimal": 0.17}
        ],
        **extra,
    }
    if rid:
        res["id"] = rid
    if subject is not None:
        res["subject"] = subject
    return res


def _research_consent(patient_id: str) -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "id": "consent-research",
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "research",
                }
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient_id}"},
        "dateTime": "2026-01-01",
        "policyRule": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}
            ]
        },
        "provision": {"type": "permit", "purpose": [{"system": ACTREASON, "code": "HRESCH"}]},
    }


def _snapshots(bootstrap: str, sub: str) -> dict[str, dict[str, Any]]:
    """The last snapshot per key on a subscriber's topic."""
    recs = sorted(records(bootstrap, topic_for(sub)), key=lambda r: (r.partition, r.offset))
    return {
        (r.key or b"").decode(): orjson.loads(r.value)
        for r in recs
        if r.header("fhirtwin-kind") == "snapshot"
    }


def _send(bootstrap: str, sub: str, key: str, snapshot: str, doc: Any) -> None:
    p: Any = bus.producer(bootstrap)
    value = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    headers = [(H_SUBSCRIBER, sub.encode()), (H_SNAPSHOT, snapshot.encode())]
    p.produce(RESULTS_TOPIC, value=value, key=key.encode(), headers=headers)
    assert p.flush(30) == 0


def _caught_up(bootstrap: str) -> bool:
    return (
        bus.group_lag(bootstrap, RESULTS_GROUP, [RESULTS_TOPIC]) == 0
        and bus.group_lag(bootstrap, "fhirtwin-assemble", [bus.RESOURCES]) == 0
    )


def _results_events(bootstrap: str) -> list[dict[str, Any]]:
    evs = [orjson.loads(r.value) for r in records(bootstrap, bus.RESOURCES)]  # opened
    return [e for e in evs if e["source"]["kind"] == "results"]


def _tags(res: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in res["meta"].get("tag", []) if t["system"] == SUBSCRIBER_TAG]


# -- without servers -------------------------------------------------------------------------


def test_parse_result_shapes() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:1", "resource": _risk("a", {"reference": "Patient/p"})},
            {"resource": {"resourceType": "Condition", "id": "c"}},
        ],
    }
    with pytest.raises(ResultError, match=r"\$\.entry\[1\]\.resource\.resourceType"):
        parse_result(orjson.dumps(bundle))
    bundle["entry"] = bundle["entry"][:1]
    assert [i.path for i in parse_result(orjson.dumps(bundle))] == ["$.entry[0].resource"]
    with pytest.raises(ResultError, match="type"):
        parse_result(orjson.dumps({**bundle, "type": "searchset"}))
    bad = _risk("x", {"reference": "Patient/p"})
    del bad["status"]
    with pytest.raises(ResultError) as exc:
        parse_result(orjson.dumps(bad))
    assert exc.value.error["problems"][0]["path"] == "$.status"
    with pytest.raises(ResultError, match="not JSON"):
        parse_result(b"{")
    assert result_id("s", "t", "RiskAssessment", "a") == result_id("s", "t", "RiskAssessment", "a")
    assert result_id("s", "t", "RiskAssessment", "a") != result_id("s2", "t", "RiskAssessment", "a")


# -- end to end ------------------------------------------------------------------------------


def test_results_join_the_twin(kafka: str, redis_url: str, tmp_path: Path) -> None:
    runner = CliRunner()
    ex = ingest_examples(kafka, redis_url)
    store, twin, patient_id = ex.store, ex.twin_a, ex.a  # (ingest_examples checks both twins)

    reg = Registry.connect(redis_url)
    reg.put(
        make_subscriber(
            "care",
            actor=["urn:oid:1.2.3.4|sim-care"],
            purpose=["TREAT"],
            scope="patient-privacy",
            default="permit",
        )
    )
    reg.put(
        make_subscriber(
            "research", actor=["urn:oid:1.2.3.9|sim-research"], purpose=["HRESCH"], scope="research"
        )
    )
    bus.ensure_topics(kafka, [topic_for("care"), topic_for("research"), RESULTS_TOPIC])
    p: Any = bus.producer(kafka)
    consent = consent_event(
        twin, _research_consent(patient_id), now_ms=int(time.time() * 1000), record="test"
    )
    p.produce(bus.RESOURCES, value=consent, key=twin.encode())
    assert p.flush(30) == 0

    stop = threading.Event()
    workers = [
        AssembleWorker(kafka, redis_url),
        SnapshotPublisher(kafka, redis_url),
        ResultsWorker(kafka, redis_url),
    ]
    threads = [threading.Thread(target=w.run, args=(stop,)) for w in workers]
    for t in threads:
        t.start()
    try:
        wait_for(
            lambda: (
                bus.group_lag(kafka, "fhirtwin-assemble", [bus.RESOURCES]) == 0
                and bus.group_lag(kafka, SNAPSHOT_GROUP, [bus.TWIN_EVENTS]) == 0
                and reg.access("research", [twin]).get(twin) is True
            ),
            what="the snapshots",
        )
        pseudonym = reg.pseudonym("research", twin)
        care_snap = _snapshots(kafka, "care")[twin]
        research_snap = _snapshots(kafka, "research")[pseudonym]
        r_patient = next(
            e["resource"]["id"]
            for e in research_snap["entry"]
            if e["resource"]["resourceType"] == "Patient"
        )
        r_obs = next(
            e["resource"]["id"]
            for e in research_snap["entry"]
            if e["resource"]["resourceType"] == "Observation"
        )
        real_obs = next(
            ref.decode()
            for ref, rid in reg.r.hgetall(f"ft:sub:research:rid:{twin}").items()
            if rid.decode() == r_obs
        )

        # care: through the CLI, keyed by twin id, the real Patient reference
        care_file = tmp_path / "care.json"
        care_file.write_bytes(orjson.dumps(_risk("risk-1", {"reference": f"Patient/{patient_id}"})))
        send = [
            "results",
            "send",
            "--subscriber",
            "care",
            "--key",
            twin,
            "--snapshot",
            care_snap["id"],
            str(care_file),
            "--kafka",
            kafka,
        ]
        sent = runner.invoke(app, send)
        assert sent.exit_code == 0, sent.output
        assert orjson.loads(sent.stdout.splitlines()[0])["record"].startswith(RESULTS_TOPIC)
        # research: keyed by its pseudonym, a Bundle naming pseudonymous ids
        research_result = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                {
                    "fullUrl": "urn:uuid:7d8a0a4e-8d55-4c7e-9d3c-0a1b2c3d4e5f",
                    "resource": _risk(
                        "r-1",
                        {"reference": f"Patient/{r_patient}"},
                        basis=[{"reference": f"Observation/{r_obs}"}],
                    ),
                }
            ],
        }
        _send(kafka, "research", pseudonym, research_snap["id"], research_result)
        # keys never disclosed: a random pseudonym, the real twin id, care's other patient
        # for research; an invalid RiskAssessment (no status)
        stray = _risk("x", {"reference": f"Patient/{r_patient}"})
        _send(kafka, "research", str(uuid.uuid4()), research_snap["id"], stray)
        _send(kafka, "research", twin, research_snap["id"], stray)
        invalid = _risk("bad", {"reference": f"Patient/{patient_id}"})
        del invalid["status"]
        _send(kafka, "care", twin, care_snap["id"], invalid)
        wait_for(lambda: _caught_up(kafka), what="the results worker and the assembler")

        held = {f"{r['resourceType']}/{r['id']}": r for r in store.resources(twin)}
        care_ref = f"RiskAssessment/{result_id('care', twin, 'RiskAssessment', 'risk-1')}"
        res_ref = f"RiskAssessment/{result_id('research', twin, 'RiskAssessment', 'r-1')}"
        care_ra, res_ra = held[care_ref], held[res_ref]
        assert care_ra["subject"] == {"reference": f"Patient/{patient_id}"}
        assert res_ra["subject"] == {"reference": f"Patient/{patient_id}"}
        assert res_ra["basis"] == [{"reference": real_obs}] and real_obs in held
        assert _tags(care_ra) == [{"system": SUBSCRIBER_TAG, "code": "care"}]
        assert _tags(res_ra) == [{"system": SUBSCRIBER_TAG, "code": "research"}]
        assert res_ra["meta"]["source"] == "urn:fhirtwin:subscriber:research"
        assert pseudonym not in orjson.dumps(held).decode()
        provs = [r for r in held.values() if r["resourceType"] == "Provenance"]
        by_target = {t["reference"]: p for p in provs for t in p.get("target", [])}
        for ref, sub, actor, snap in [
            (care_ref, "care", "sim-care", care_snap["id"]),
            (res_ref, "research", "sim-research", research_snap["id"]),
        ]:
            prov = by_target[ref]
            who = prov["agent"][0]["who"]
            assert who["identifier"]["value"] == actor and sub in who["display"]
            assert prov["entity"][0]["what"]["identifier"]["value"] == snap
            assert prov["entity"][0]["role"] == "source"
            assert _tags(prov) == [{"system": SUBSCRIBER_TAG, "code": sub}]
            for r in (held[ref], prov):
                body = {k: v for k, v in r.items() if k != "meta"}
                assert validate_resource(body) == []
        assert not any(r.get("id") == "x" or r.get("id") == "bad" for r in held.values())

        dead = [
            r for r in records(kafka, bus.DEADLETTER) if r.header("fhirtwin-dl-stage") == "results"
        ]
        reasons = sorted(r.header("fhirtwin-dl-reason") for r in dead)
        assert len(reasons) == 3, reasons
        assert sum("never disclosed to subscriber 'research'" in x for x in reasons) == 2
        assert any("$.status" in x for x in reasons)
        bad_error = orjson.loads(
            next(r for r in dead if "$.status" in r.header("fhirtwin-dl-reason")).header(
                "fhirtwin-dl-error"
            )
        )
        assert bad_error["problems"][0]["path"] == "$.status"
        assert bad_error["subscriber"] == "care"

        # resending the same results changes nothing: same versions, same twin
        digest = store.digest(twin)
        versions = {ref: held[ref]["meta"]["versionId"] for ref in (care_ref, res_ref)}
        assert len(_results_events(kafka)) == 2
        again = runner.invoke(app, send)
        assert again.exit_code == 0, again.output
        _send(kafka, "research", pseudonym, research_snap["id"], research_result)
        wait_for(lambda: len(_results_events(kafka)) == 4, what="the resent results")
        wait_for(lambda: _caught_up(kafka), what="the results worker and the assembler")
        assert store.digest(twin) == digest
        for ref, version in versions.items():
            assert [h["meta"]["versionId"] for h in store.history(twin, ref)] == [version]
        for prov in provs:
            assert len(store.history(twin, f"Provenance/{prov['id']}")) == 1
    finally:
        stop.set()
        for t in threads:
            t.join(30)
