"""The twin store on a real Redis server: idempotence, ordering, history, state, merges."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import redis

import fhirtwin.twin as twin_module
from fhirtwin.mapping import LINEAGE_EXTENSION
from fhirtwin.twin import (
    LINEAGE_URL,
    TwinStore,
    Write,
    clinical_time_ms,
    content_hash,
    content_view,
    fhir_time_ms,
    state_op,
)

T1, T2 = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"


@pytest.fixture
def store(redis_url: str) -> TwinStore:
    return TwinStore(redis.Redis.from_url(redis_url))


def patient(family: str = "Okafor") -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": "p1",
        "identifier": [{"system": "urn:mrn", "value": "M1"}],
        "name": [{"family": family}],
    }


def condition(status: str, rid: str = "c1", onset: str = "2026-01-05") -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": rid,
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": status,
                }
            ]
        },
        "code": {"text": "Asthma"},
        "onsetDateTime": onset,
    }


def glucose(rid: str, value: float, when: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "category": [{"coding": [{"code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": "mg/dL"},
    }


def test_redelivery_changes_nothing(store: TwinStore) -> None:
    first = store.apply(T1, [patient(), condition("active")], event_ms=1000, known_ms=5000)
    assert sorted(first.changed) == ["Condition/c1", "Patient/p1"]
    before = store.digest(T1)
    again = store.apply(T1, [patient(), condition("active")], event_ms=1000, known_ms=9000)
    assert again.changed == []
    assert store.digest(T1) == before
    assert len(store.history(T1, "Patient/p1")) == 1


def sent_by(res: dict[str, Any], control_id: str, segment: str) -> dict[str, Any]:
    """The resource as a converter sends it: with the message and segment it came from."""
    return {
        **res,
        "meta": {"source": f"urn:hl7v2:APP@FAC:{control_id}"},
        "extension": [
            {"url": "https://example.org/other", "valueString": "kept"},
            {"url": LINEAGE_URL, "valueString": segment},
        ],
    }


def test_the_lineage_url_is_the_converters() -> None:
    assert LINEAGE_URL == LINEAGE_EXTENSION


def _now(store: TwinStore, twin: str) -> list[dict[str, Any]]:
    return store.as_of(twin, 10**15)["resources"]


def test_the_same_content_sent_again_is_no_new_version(store: TwinStore) -> None:
    """A Patient (or a Practitioner, a Location) that message after message repeats unchanged
    keeps one version and the lineage of the message that first sent it; a change of content
    is a new version; and the repeat's later event time still keeps an older, different
    version that arrives late from overtaking it, in the current twin, in history and as_of."""
    first = store.apply(T1, [sent_by(patient(), "C1", "PID[2]")], event_ms=1000, known_ms=10)
    assert first.changed == ["Patient/p1"]
    again = store.apply(T1, [sent_by(patient(), "C3", "PID[3]")], event_ms=3000, known_ms=30)
    assert again.changed == []
    (only,) = store.history(T1, "Patient/p1")
    assert only["meta"]["source"].endswith(":C1")  # where this content was first said
    current = store.resource(T1, "Patient/p1")
    assert current is not None and current == only
    assert current["meta"]["lastUpdated"] == "1970-01-01T00:00:00.010Z"  # current since then

    late = store.apply(T1, [sent_by(patient("Old"), "C2", "PID[2]")], event_ms=2000, known_ms=40)
    assert late.changed == []  # sent at 2000, before the repeat at 3000
    current = store.resource(T1, "Patient/p1")
    assert current is not None and current["name"][0]["family"] == "Okafor"
    assert _now(store, T1) == [current]
    assert [v["name"][0]["family"] for v in store.history(T1, "Patient/p1")] == ["Okafor", "Old"]
    # what was known at 35 ms: the repeat (30 ms) but not yet the late version (40 ms)
    assert store.as_of(T1, 35)["resources"] == [current]

    changed = store.apply(T1, [sent_by(patient("New"), "C4", "PID[2]")], event_ms=4000, known_ms=50)
    assert changed.changed == ["Patient/p1"]
    # back to the first content, later still: current again, with its first body
    back = store.apply(T1, [sent_by(patient(), "C5", "PID[9]")], event_ms=5000, known_ms=60)
    assert back.changed == ["Patient/p1"]
    current = store.resource(T1, "Patient/p1")
    assert current is not None and current["meta"]["source"].endswith(":C1")
    assert current["meta"]["lastUpdated"] == "1970-01-01T00:00:00.060Z"
    assert _now(store, T1) == [current]
    families = [v["name"][0]["family"] for v in store.history(T1, "Patient/p1")]
    assert families == ["Okafor", "New", "Old"]
    then = store.as_of(T1, 55)["resources"]
    assert [r["name"][0]["family"] for r in then] == ["New"]

    # a merge keeps all of it: T1 into T2 gives T2 the same current resource and history
    store.merge(T1, T2, known_ms=70, reason={"rule": "test"})
    assert store.resource(T2, "Patient/p1") == current
    assert [v["name"][0]["family"] for v in store.history(T2, "Patient/p1")] == families


def test_the_content_view_leaves_out_only_where_a_resource_came_from() -> None:
    res = sent_by({**patient(), "meta": {"profile": ["x"]}}, "C9", "PID[1]")
    res["meta"] = {**res["meta"], "profile": ["x"], "versionId": "1"}
    view = content_view(res)
    assert view["meta"] == {"profile": ["x"]}
    assert view["extension"] == [{"url": "https://example.org/other", "valueString": "kept"}]
    assert content_hash(sent_by(patient(), "C1", "PID[1]")) == content_hash(
        sent_by(patient(), "C2", "PID[7]")
    )
    plain = {**patient(), "meta": {"source": "urn:x"}, "extension": [res["extension"][1]]}
    assert content_hash(plain) == content_hash(patient())
    assert content_hash(patient("Other")) != content_hash(patient())


def test_older_version_never_overwrites_newer(store: TwinStore) -> None:
    store.apply(T1, [patient("New")], event_ms=2000, known_ms=10)
    late = store.apply(T1, [patient("Old")], event_ms=1000, known_ms=20)
    assert late.changed == []
    current = store.resource(T1, "Patient/p1")
    assert current is not None
    assert current["name"][0]["family"] == "New"
    # both versions are kept, newest (by event time) first
    assert [v["name"][0]["family"] for v in store.history(T1, "Patient/p1")] == ["New", "Old"]


def test_delivery_order_does_not_matter(store: TwinStore) -> None:
    events = [
        ([patient("A"), condition("active")], 1000),
        ([patient("B"), condition("resolved")], 2000),
        ([glucose("o1", 99, "2026-01-01T08:00:00Z")], 1500),
        ([glucose("o2", 140, "2026-01-02T08:00:00Z")], 1200),
    ]
    for res, evt in events:
        store.apply(T1, copy.deepcopy(res), event_ms=evt, known_ms=evt)
    for res, evt in reversed(events):
        store.apply(T2, copy.deepcopy(res), event_ms=evt, known_ms=evt)
    assert store.digest(T1) == store.digest(T2)
    assert store.state(T1)["problems"] == []  # the newest Condition version is resolved


def test_derived_state_follows_current_versions(store: TwinStore) -> None:
    store.apply(T1, [condition("active")], event_ms=1, known_ms=1)
    assert store.state(T1)["problems"] == ["Condition/c1"]
    store.apply(T1, [glucose("o1", 99, "2026-01-01T08:00:00Z")], event_ms=2, known_ms=2)
    store.apply(T1, [glucose("o2", 140, "2026-01-03T08:00:00Z")], event_ms=3, known_ms=3)
    # a result that arrives later but was taken earlier does not become "latest"
    store.apply(T1, [glucose("o3", 80, "2025-12-01T08:00:00Z")], event_ms=4, known_ms=4)
    assert store.state(T1)["labs"] == {"http://loinc.org|2345-7": "Observation/o2"}
    store.apply(T1, [condition("resolved")], event_ms=5, known_ms=5)
    assert store.state(T1)["problems"] == []
    # the timeline is in clinical order, not arrival order
    refs = [ref for _, ref in store.timeline(T1)]
    assert refs == ["Observation/o3", "Observation/o1", "Observation/o2", "Condition/c1"]


def test_as_of_reads_what_was_known_then(store: TwinStore) -> None:
    store.apply(T1, [patient("First")], event_ms=1000, known_ms=100, src="fhir.resources/0/7")
    store.apply(T1, [patient("Second")], event_ms=2000, known_ms=200, src="fhir.resources/0/9")
    then = store.as_of(T1, 150)
    assert [r["name"][0]["family"] for r in then["resources"]] == ["First"]
    assert then["offsets"] == {"fhir.resources/0": 7}
    now = store.as_of(T1, 250)
    assert [r["name"][0]["family"] for r in now["resources"]] == ["Second"]
    assert store.offsets(T1) == {"fhir.resources/0": 9}


def test_merge_moves_everything_and_forwards(store: TwinStore) -> None:
    store.apply(T1, [patient()], event_ms=1, known_ms=1, identifiers=["urn:mrn|M1"])
    other = {**patient(), "id": "p2", "identifier": [{"system": "urn:mrn", "value": "M2"}]}
    store.apply(
        T2, [other, condition("active")], event_ms=2, known_ms=2, identifiers=["urn:mrn|M2"]
    )
    store.merge(T2, T1, known_ms=3, reason={"rule": "merge"})
    assert store.twins() == [T1]
    assert store.counts(T1) == {"Condition": 1, "Patient": 2}
    assert store.identifiers(T1) == ["urn:mrn|M1", "urn:mrn|M2"]
    assert store.resolve("M2") == T1
    assert store.resolve(T2) == T1  # the old id forwards
    # an event for the merged twin that was still in flight lands in the survivor
    late = store.apply(T2, [glucose("o9", 101, "2026-02-01")], event_ms=4, known_ms=4)
    assert late.twin == T1
    assert "Observation" in store.counts(T1)
    assert any(link.get("merged") == T2 for link in store.links(T1))


def test_merge_order_independent(store: TwinStore) -> None:
    """Merge first, then the merged twin's own events (as in a rebuild): same twin."""
    other = {**patient(), "id": "p2"}
    store.apply(T1, [patient()], event_ms=1, known_ms=1)
    store.apply(T2, [other], event_ms=2, known_ms=2)
    store.merge(T2, T1, known_ms=3, reason={})
    clean = store.digest(T1)
    store.flush()
    store.apply(T1, [patient()], event_ms=1, known_ms=1)
    store.merge(T2, T1, known_ms=3, reason={})
    store.apply(T2, [other], event_ms=2, known_ms=2)
    assert store.digest(T1) == clean


def test_helpers() -> None:
    assert fhir_time_ms("2026") == fhir_time_ms("2026-01-01T00:00:00Z")
    assert fhir_time_ms("2026-01-01T01:00:00+01:00") == fhir_time_ms("2026-01-01")
    assert fhir_time_ms("not a date") is None
    assert clinical_time_ms(glucose("o", 1, "2026-03-01")) == fhir_time_ms("2026-03-01")
    assert state_op(condition("inactive")) == "set:problems:-"
    assert state_op(glucose("o", 1, "2026")) == "latest:labs:+:http://loinc.org|2345-7"
    with_meta = {**patient(), "meta": {"versionId": "x", "lastUpdated": "2026-01-01T00:00:00Z"}}
    assert content_hash(with_meta) == content_hash(patient())


# -- deletions (a source's DELETE: docs/sources-fhir.md) -------------------------------------


def test_a_deletion_takes_the_resource_out_of_the_twin_but_not_out_of_its_past(
    store: TwinStore,
) -> None:
    store.apply(
        T1,
        [patient(), condition("active"), glucose("g1", 99, "2026-01-06")],
        event_ms=1000,
        known_ms=10,
    )
    assert store.state(T1)["problems"] == ["Condition/c1"] and store.state(T1)["labs"]
    gone = store.apply(
        T1, [], event_ms=2000, known_ms=20, deleted=["Condition/c1", "Observation/g1"]
    )
    assert sorted(gone.changed) == ["Condition/c1", "Observation/g1"]
    assert store.resource(T1, "Condition/c1") is None
    assert [r["resourceType"] for r in store.resources(T1)] == ["Patient"]
    assert store.state(T1)["problems"] == [] and store.state(T1)["labs"] == {}
    assert [ref for _, ref in store.timeline(T1)] == []
    # its history stays, and the twin as known before the deletion still has it
    assert len(store.history(T1, "Condition/c1")) == 1
    then = {f"{r['resourceType']}/{r['id']}" for r in store.as_of(T1, 15)["resources"]}
    now = {f"{r['resourceType']}/{r['id']}" for r in store.as_of(T1, 25)["resources"]}
    assert "Condition/c1" in then and "Condition/c1" not in now
    # redelivery and replay change nothing
    before = store.digest(T1)
    again = store.apply(T1, [], event_ms=2000, known_ms=30, deleted=["Condition/c1"])
    assert again.changed == [] and store.digest(T1) == before


def test_event_time_decides_between_a_deletion_and_a_version(store: TwinStore) -> None:
    store.apply(T1, [condition("active")], event_ms=1000, known_ms=10)
    store.apply(T1, [], event_ms=2000, known_ms=20, deleted=["Condition/c1"])
    # an older version arriving late does not bring it back …
    late = store.apply(T1, [condition("resolved")], event_ms=1500, known_ms=30)
    assert late.changed == [] and store.resource(T1, "Condition/c1") is None
    # … a newer one does, and a deletion that arrives after it but is older changes nothing
    back = store.apply(T1, [condition("active", onset="2026-02-01")], event_ms=3000, known_ms=40)
    assert back.changed == ["Condition/c1"] and store.state(T1)["problems"] == ["Condition/c1"]
    stale = store.apply(T1, [], event_ms=2500, known_ms=50, deleted=["Condition/c1"])
    assert stale.changed == [] and store.resource(T1, "Condition/c1") is not None
    # a deletion and a version of the same event time: the deletion wins
    store.apply(T1, [], event_ms=3000, known_ms=60, deleted=["Condition/c1"])
    assert store.resource(T1, "Condition/c1") is None


def test_a_merge_carries_deletions_along(store: TwinStore) -> None:
    store.apply(T2, [condition("active")], event_ms=1000, known_ms=10)
    store.apply(T2, [], event_ms=2000, known_ms=20, deleted=["Condition/c1"])
    store.apply(T1, [patient()], event_ms=1000, known_ms=10)
    store.merge(T2, T1, known_ms=30, reason={"rule": "merge"})
    assert store.resource(T1, "Condition/c1") is None
    assert len(store.history(T1, "Condition/c1")) == 1
    # a late copy of the old version still does not resurrect it in the survivor
    store.apply(T1, [condition("active")], event_ms=1000, known_ms=40)
    assert store.resource(T1, "Condition/c1") is None


def _writes() -> list[Write]:
    """A feed for two twins: new resources, a newer and an older version, a redelivery, a
    deletion, identifiers, identity decisions, and events that reach T2 after it was
    merged into T1 (so the store must forward them)."""
    other = {**patient(), "id": "p2", "identifier": [{"system": "urn:mrn", "value": "M2"}]}
    return [
        Write(
            T1,
            [patient(), condition("active")],
            1000,
            10,
            "r/0/1",
            ["urn:mrn|M1"],
            link={"rule": "new", "twin": T1},
        ),
        Write(T2, [other], 1100, 11, "r/1/1", ["urn:mrn|M2"], link={"rule": "new", "twin": T2}),
        Write(T1, [glucose("g1", 99, "2026-01-06")], 1200, 12, "r/0/2"),
        Write(T1, [patient("Newer")], 3000, 13, "r/0/3"),
        Write(T1, [patient("Older")], 900, 14, "r/0/4"),
        Write(T2, [glucose("g2", 120, "2026-01-07")], 1300, 15, "r/1/2"),
        Write(T1, [glucose("g1", 99, "2026-01-06")], 1200, 16, "r/0/2"),  # redelivered
        Write(T1, [], 2000, 17, "r/0/5", deleted=["Condition/c1"]),
        Write(T2, [glucose("g3", 130, "2026-01-08")], 1400, 18, "r/1/3"),
        Write(
            T2,
            [condition("active", "c2")],
            1500,
            19,
            "r/1/4",
            ["urn:mrn|M2b"],
            link={"rule": "identifier", "twin": T2, "linked": ["urn:mrn|M2b"]},
        ),
    ]


def _one_by_one(store: TwinStore, writes: list[Write]) -> list[Any]:
    out = []
    for w in writes:
        got = store.apply(
            w.twin,
            w.resources,
            event_ms=w.event_ms,
            known_ms=w.known_ms,
            src=w.src,
            identifiers=w.identifiers,
            shared=w.shared,
            deleted=w.deleted,
        )
        if w.link is not None:
            store.record_link(got.twin, w.link)
        out.append(got)
    return out


def _everything(store: TwinStore) -> dict[str, Any]:
    return {
        t: (
            store.digest(t),
            store.counts(t),
            store.identifiers(t),
            store.links(t),
            [ref for _, ref in store.timeline(t)],
        )
        for t in store.twins()
    }


def _index_keys(store: TwinStore) -> dict[str, Any]:
    """Everything the index writes outside the twins: the list of twins, who holds each
    resource, and the lookups of identifiers and bare values."""
    out: dict[str, Any] = {"ft:twins": sorted(store.r.smembers("ft:twins"))}
    for pattern in ("ft:ref:*", "ft:id:*", "ft:idv:*"):
        for key in store.r.scan_iter(match=pattern):
            kind = store.r.type(key)
            out[key.decode()] = (
                sorted(store.r.smembers(key)) if kind == b"set" else store.r.get(key)
            )
    return out


@pytest.mark.parametrize("chunk", [2_000, 3], ids=["one script run", "runs of 3 operations"])
def test_apply_many_is_apply_one_after_another(
    store: TwinStore, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The assembler's batched path gives what one apply per event gives: the same
    answers, twins, identifiers, index keys and identity records — including events for a
    twin that was merged meanwhile, which are forwarded in order. The batch's index writes
    go in script runs of ``chunk`` operations: split anywhere, the result is the same."""
    monkeypatch.setattr(twin_module, "_INDEX_CHUNK", chunk)
    writes = _writes()
    results = {}
    for how in ("one by one", "batched"):
        store.flush()
        first, rest = writes[:6], writes[6:]
        if how == "one by one":
            got = _one_by_one(store, first)
        else:
            got = store.apply_many(first)
        store.merge(T2, T1, known_ms=50, reason={"rule": "merge"})
        got += _one_by_one(store, rest) if how == "one by one" else store.apply_many(rest)
        results[how] = (got, _everything(store), _index_keys(store))
    assert results["batched"] == results["one by one"]
    answers, twins, index = results["batched"]
    assert index["ft:twins"] == [T1.encode()]
    assert index[f"ft:id:{store.keys.blind('urn:mrn|M2b')}"] == T1.encode()
    assert list(twins) == [T1]  # T2 was merged: its later events landed in T1
    assert [a.twin for a in answers[6:]] == [T1] * 4
    assert answers[6].changed == [] and answers[4].changed == []  # redelivery, older version
    assert "Condition/c2" in answers[9].changed
    assert store.resolve("M2b") == T1


def _held_refs(store: TwinStore) -> dict[str, list[bytes]]:
    """``ft:ref:<ref>`` as the twins' own keys say it should be: every twin that holds, or
    once held, each resource (its ``ver`` hash, deletions left out)."""
    out: dict[str, list[bytes]] = {}
    for t in store.twins():
        for ref, order in store.r.hgetall(f"{store.base(t)}:ver").items():
            if not order[15:47].startswith(twin_module.DELETED_MARK.encode()):
                out.setdefault(f"ft:ref:{ref.decode()}", []).append(t.encode())
    return {k: sorted(v) for k, v in out.items()}


def test_the_index_is_written_in_the_same_step_as_the_twin(store: TwinStore) -> None:
    """On a single server the apply script writes the list of twins and who holds each
    resource itself: an assembler killed right after the script ran (before anything else
    it sends) leaves them complete, and a redelivery that changes nothing adds nothing.
    After a merge and a deletion, the index still names exactly the holders."""
    first = _writes()[:3]
    for w in first:  # the script alone, as a kill -9 after it would leave Redis
        prepared = store._prepare(w.resources)
        index = store._index_mode(w.shared)
        args = store._args(w.twin, prepared, w.event_ms, w.known_ms, w.src, index=index)
        store._apply(keys=[store.base(w.twin)], args=args)
    index = _index_keys(store)
    assert index["ft:twins"] == sorted([T1.encode(), T2.encode()])
    assert {k: v for k, v in index.items() if k.startswith("ft:ref:")} == _held_refs(store)
    assert index["ft:ref:Observation/g1"] == [T1.encode()]
    store.r.delete("ft:twins", *store.r.keys("ft:ref:*"))
    store.apply_many(first)  # redelivered: nothing changes, so nothing is indexed again
    assert not store.r.exists("ft:twins") and not store.r.keys("ft:ref:*")
    store.flush()
    store.apply_many(_writes()[:6])
    store.merge(T2, T1, known_ms=50, reason={"rule": "merge"})
    store.apply_many(_writes()[6:])
    index = _index_keys(store)
    assert index["ft:twins"] == [T1.encode()]
    # a twin merged away may stay named (readers follow merged_into); the survivor is there
    for key, holders in _held_refs(store).items():
        assert set(holders) <= set(index[key]), key


def test_apply_many_survives_redis_forgetting_the_script(store: TwinStore) -> None:
    """After a Redis restart the script cache is empty (NOSCRIPT): the batch still applies."""
    store.r.script_flush()
    got = store.apply_many(_writes()[:3])
    assert [a.twin for a in got] == [T1, T2, T1]
    assert store.counts(T1) == {"Condition": 1, "Observation": 1, "Patient": 1}


def _count_seals(store: TwinStore, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The additional data of every value the store seals from now on (one per body)."""
    sealed: list[bytes] = []
    real = store.keys.seal

    def seal(twin: str, data: bytes, aad: bytes) -> bytes:
        sealed.append(aad)
        return real(twin, data, aad)

    monkeypatch.setattr(store.keys, "seal", seal)
    return sealed


def test_a_version_the_twin_holds_is_not_sent_again(
    store: TwinStore, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message that sends a clinician, a location or the patient again costs no sealing
    and no bytes to Redis for them; the twin ends up as a store that sent everything
    makes it."""
    first = Write(T1, [patient(), condition("active")], 1000, 10, "r/0/1")
    again = Write(
        T1, [patient(), condition("active"), glucose("g1", 99, "2026-01-06")], 2000, 20, "r/0/2"
    )
    store.apply_many([first])
    sealed = _count_seals(store, monkeypatch)
    store.apply_many([again])
    assert [a.split(b"|")[1] for a in sealed] == [b"Observation/g1"]
    mine = _everything(store)
    history = store.history(T1, "Patient/p1")

    fresh = TwinStore(redis.Redis.from_url(redis_url))  # remembers nothing: sends every body
    fresh.flush()
    fresh.apply_many([first])
    fresh.apply(T1, again.resources, event_ms=2000, known_ms=20, src="r/0/2")
    assert _everything(fresh) == mine
    assert fresh.history(T1, "Patient/p1") == history


@pytest.mark.parametrize("how", ["batched", "one at a time"])
def test_a_twin_that_lost_what_was_left_out_gets_every_body_again(
    store: TwinStore, redis_url: str, how: str
) -> None:
    """The store remembers what a twin held; after Redis was flushed (or an unmerge rebuilt
    the twin) that memory is wrong. The apply script notices before writing anything, and
    the events are applied again with every body, in order: the twins are those of a store
    that never left anything out."""
    writes = _writes()
    store.apply_many(writes[:4])
    store.flush()
    later = writes[4:]
    got = store.apply_many(later) if how == "batched" else _one_by_one(store, later)
    twins = _everything(store)
    assert not list(store.r.scan_iter(match="ft:*:need"))

    fresh = TwinStore(redis.Redis.from_url(redis_url))
    fresh.flush()
    assert _one_by_one(fresh, later) == got
    assert _everything(fresh) == twins
    assert (store.resource(T1, "Patient/p1") or {})["name"] == [{"family": "Older"}]


def test_a_marker_left_by_a_stopped_assembler_does_not_block_the_twin(store: TwinStore) -> None:
    """An assembler that stopped between a 'need' and applying the event again left the
    twin's :need marker: the next batch applies and clears it."""
    store.apply_many([Write(T1, [patient()], 1000, 10, "r/0/1")])
    store.r.set(f"ft:{{{T1}}}:need", "1")
    got = store.apply_many([Write(T1, [patient("Newer")], 2000, 20, "r/0/2")])
    assert got[0].changed == ["Patient/p1"]
    assert (store.resource(T1, "Patient/p1") or {})["name"] == [{"family": "Newer"}]
    assert not store.r.exists(f"ft:{{{T1}}}:need")
