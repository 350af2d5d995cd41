"""A source's DELETE through the real pipeline (Tansu, Redis): FHIR Bundle and Bulk NDJSON
``deleted`` lines reach the twin that holds the resource (docs/sources-fhir.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import redis

from fhirtwin import bus
from fhirtwin.deadletter import list_deadletters, replay
from fhirtwin.ingest import ingest
from fhirtwin.twin import TwinStore
from tests.pipeline import drain, events

MRN = {"system": "urn:oid:1.2.3.4.5", "value": "DEL-0001"}


def _patient() -> dict[str, Any]:
    return {"resourceType": "Patient", "id": "pd1", "identifier": [MRN], "name": [{"family": "Ng"}]}


def _obs(oid: str, value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "vital-signs",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": "Patient/pd1"},
        "effectiveDateTime": "2026-11-20T08:00:00Z",
        "valueQuantity": {"value": value, "unit": "/min"},
    }


def _collection(*resources: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "resourceType": "Bundle",
            "type": "collection",
            "timestamp": "2026-11-20T09:00:00Z",
            "entry": [{"resource": r} for r in resources],
        }
    )


def _deleted_line(*refs: str) -> bytes:
    """One line of a Bulk Data ``deleted`` file: a transaction Bundle of DELETE entries."""
    entries = [{"request": {"method": "DELETE", "url": ref}} for ref in refs]
    return orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def _refs(store: TwinStore, twin: str) -> list[str]:
    return [f"{r['resourceType']}/{r['id']}" for r in store.resources(twin)]


def test_a_bulk_deletion_reaches_the_twin_and_a_premature_one_waits(
    kafka: str, redis_url: str, tmp_path: Path
) -> None:
    (tmp_path / "export.json").write_bytes(_collection(_patient(), _obs("o1", 72), _obs("o2", 80)))
    ingest(kafka, "fhir", [str(tmp_path / "export.json")])
    drain(kafka, redis_url, kinds=("fhir",))
    store = TwinStore(redis.Redis.from_url(redis_url))
    twin = store.resolve("DEL-0001")
    assert twin is not None
    assert sorted(_refs(store, twin)) == ["Observation/o1", "Observation/o2", "Patient/pd1"]
    assert store.state(twin)["vitals"]

    # o1 deleted at the source; o3 deleted before this twin ever held it
    (tmp_path / "deleted.ndjson").write_bytes(
        _deleted_line("Observation/o1") + b"\n" + _deleted_line("Observation/o3") + b"\n"
    )
    ingest(kafka, "fhir", [str(tmp_path / "deleted.ndjson")])
    drain(kafka, redis_url, kinds=("fhir",))
    assert sorted(_refs(store, twin)) == ["Observation/o2", "Patient/pd1"]
    assert len(store.history(twin, "Observation/o1")) == 1  # its past stays
    changed = [c for e in events(kafka) for c in e.get("changed", [])]
    assert "Observation/o1" in changed  # subscribers re-evaluate the twin
    [dl] = [d for d in list_deadletters(kafka) if d.stage == "map"]
    assert "Observation/o3" in dl.reason and "replay" in dl.reason

    # o3 arrives late; replaying the waiting deletion now removes it
    (tmp_path / "late.json").write_bytes(_collection(_patient(), _obs("o3", 90)))
    ingest(kafka, "fhir", [str(tmp_path / "late.json")])
    drain(kafka, redis_url, kinds=("fhir",))
    assert "Observation/o3" in _refs(store, twin)
    assert replay(kafka, redis_url, [dl]) == 1
    drain(kafka, redis_url, kinds=("fhir",))
    assert sorted(_refs(store, twin)) == ["Observation/o2", "Patient/pd1"]
    assert len([d for d in list_deadletters(kafka) if d.stage == "map"]) == 1  # no new one
    assert bus.group_lag(kafka, "fhirtwin-assemble", [bus.RESOURCES]) == 0
