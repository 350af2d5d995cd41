"""The assembler's batch handler on a real Redis: one bad record in a batch costs that
record alone (a dead letter); the events around it are applied, in order."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from fhirtwin import bus
from fhirtwin.assemble import AssembleWorker
from fhirtwin.crypto import default_keyring, seal_event
from fhirtwin.twin import Write

T1, T2 = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"


def record(offset: int, twin: str, event: dict[str, Any] | None, raw: bytes = b"") -> bus.Record:
    value = seal_event(default_keyring(), twin, orjson.dumps(event)) if event else raw
    return bus.Record(bus.RESOURCES, 0, offset, 1_000 + offset, twin.encode(), value, ())


def event(twin: str, *resources: dict[str, Any], at: int = 500) -> dict[str, Any]:
    return {
        "v": 1,
        "twin": twin,
        "event_ms": at,
        "identity": {"rule": "identifier"},
        "identifiers": [],
        "merge_from": None,
        "resources": list(resources),
        "source": {"kind": "hl7v2", "control_id": "X"},
    }


def obs(rid: str, value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "code": {"text": "glucose"},
        "valueQuantity": {"value": value},
    }


def test_a_bad_record_in_a_batch_is_dead_lettered_alone(redis_url: str) -> None:
    worker = AssembleWorker("127.0.0.1:1", redis_url)  # handle() needs no broker
    recs = [
        record(0, T1, event(T1, obs("o1", 1))),
        record(1, T1, None, raw=b"not sealed, not ours"),
        record(2, T2, event(T2, obs("o2", 2))),
        record(3, T2, event(T2, {"resourceType": "Observation", "status": "final"})),  # no id
        record(4, T1, event(T1, obs("o1", 3), at=600)),  # a newer version of o1
    ]
    outs = worker.handle(recs)
    topics = [[o.topic for o in per] for per in outs]
    assert topics == [
        [bus.TWIN_EVENTS],
        [bus.DEADLETTER],
        [bus.TWIN_EVENTS],
        [bus.DEADLETTER],
        [bus.TWIN_EVENTS],
    ]
    assert dict(outs[3][0].headers)["fhirtwin-dl-stage"] == b"assemble"
    assert outs[3][0].value == recs[3].value  # the original bytes
    store = worker.store
    assert sorted(store.twins()) == [T1, T2]
    current = store.resource(T1, "Observation/o1")
    assert current is not None and current["valueQuantity"]["value"] == 3
    assert [len(store.history(T1, "Observation/o1"))] == [2]
    assert orjson.loads(outs[4][0].value)["changed"] == ["Observation/o1"]


def test_an_event_the_store_refuses_is_dead_lettered_alone(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If applying one event of a batch fails in the store (TypeError, ValueError, …), the
    batch is applied again one event at a time, and only that event is refused."""
    worker = AssembleWorker("127.0.0.1:1", redis_url)
    store = worker.store
    real = store.apply_many

    def refuse_o_bad(writes: list[Write]) -> list[Any]:
        if any(r["id"] == "bad" for w in writes for r in w.resources):
            raise TypeError("the store cannot take this one")
        return real(writes)

    monkeypatch.setattr(store, "apply_many", refuse_o_bad)
    recs = [
        record(0, T1, event(T1, obs("o1", 1))),
        record(1, T2, event(T2, obs("bad", 2))),
        record(2, T2, event(T2, obs("o2", 3))),
    ]
    outs = worker.handle(recs)
    assert [[o.topic for o in per] for per in outs] == [
        [bus.TWIN_EVENTS],
        [bus.DEADLETTER],
        [bus.TWIN_EVENTS],
    ]
    assert outs[1][0].value == recs[1].value  # the original bytes
    assert store.resource(T1, "Observation/o1") is not None
    assert store.resource(T2, "Observation/o2") is not None
    assert store.resource(T2, "Observation/bad") is None
