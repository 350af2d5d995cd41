"""Undoing a wrong merge (``TwinStore.unmerge``) on a real Redis server."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis

from fhirtwin.twin import TwinStore, UnmergeError
from tests.test_twin_store import condition, glucose

KEEP, GONE = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"
MERGE_REC, LATE_REC, UNMERGE_REC = (
    "fhir.resources/0/10",
    "fhir.resources/1/5",
    "fhir.resources/0/20",
)


@pytest.fixture
def store(redis_url: str) -> TwinStore:
    return TwinStore(redis.Redis.from_url(redis_url))


def patient(pid: str, mrn: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [{"system": "urn:mrn", "value": mrn}],
        "name": [{"family": "Okafor" if pid == "p1" else "Mensah"}],
        **extra,
    }


def practitioner() -> dict[str, Any]:
    return {"resourceType": "Practitioner", "id": "dr1", "name": [{"family": "Lee"}]}


def problem() -> dict[str, Any]:
    return condition("active", "c2")


def lab(rid: str, when: str) -> dict[str, Any]:
    return glucose(rid, 99, when)


def refs(resources: list[dict[str, Any]]) -> list[str]:
    return sorted(f"{r['resourceType']}/{r['id']}" for r in resources)


def merged_by_mistake(store: TwinStore, keep: str = KEEP, gone: str = GONE) -> tuple[str, str]:
    """Two patients, a merge message that says they are one, and an event for the merged
    one that reaches the store through the forward pointer; (digest of keep, of gone)
    before the merge."""
    store.apply(
        keep,
        [patient("p1", "M1"), practitioner()],
        event_ms=1000,
        known_ms=10,
        src="fhir.resources/0/1",
        identifiers=["urn:mrn|M1"],
    )
    store.apply(
        gone,
        [patient("p2", "M2"), practitioner(), problem(), lab("g1", "2026-01-06")],
        event_ms=1100,
        known_ms=11,
        src="fhir.resources/1/1",
        identifiers=["urn:mrn|M2"],
    )
    before = store.digest(keep), store.digest(gone)
    # what the assembler does with an ADT^A40: the merge, then the message's own resources
    store.merge(gone, keep, known_ms=20, reason={"rule": "merge"}, src=MERGE_REC)
    replaces = {"link": [{"other": {"reference": "Patient/p2"}, "type": "replaces"}]}
    replaced = {
        "active": False,
        "link": [{"other": {"reference": "Patient/p1"}, "type": "replaced-by"}],
    }
    store.apply(
        keep,
        [patient("p1", "M1", **replaces), patient("p2", "M2", **replaced)],
        event_ms=2000,
        known_ms=20,
        src=MERGE_REC,
    )
    late = store.apply(gone, [lab("o9", "2026-02-01")], event_ms=2100, known_ms=30, src=LATE_REC)
    assert late.twin == keep
    return before


def test_unmerge_gives_the_merged_twin_back(store: TwinStore) -> None:
    keep_before, _ = merged_by_mistake(store)
    assert store.twins() == [KEEP] and store.resolve("M2") == KEEP
    assert list(store.merged_from(KEEP)) == [GONE]
    assert store.merged_from(KEEP)[GONE]["identifiers"] == ["urn:mrn|M2"]

    changed, restored = store.unmerge(
        GONE, KEEP, known_ms=40, reason={"rule": "unmerge", "reason": "two people"}, src=UNMERGE_REC
    )
    assert store.twins() == [KEEP, GONE]
    # the survivor is as it was before the merge: its own resources, identifiers and state
    assert refs(store.resources(KEEP)) == ["Patient/p1", "Practitioner/dr1"]
    assert "link" not in store.resource(KEEP, "Patient/p1")  # type: ignore[operator]
    assert store.digest(KEEP) == keep_before
    assert store.identifiers(KEEP) == ["urn:mrn|M1"]
    assert store.state(KEEP)["problems"] == [] and store.state(KEEP)["labs"] == {}
    assert sorted(changed) == [
        "Condition/c2",
        "Observation/g1",
        "Observation/o9",
        "Patient/p1",
        "Patient/p2",
    ]
    # the merged twin is back with what it had, and what was sent for it meanwhile
    assert refs(store.resources(GONE)) == [
        "Condition/c2",
        "Observation/g1",
        "Observation/o9",
        "Patient/p2",
        "Practitioner/dr1",
    ]
    assert sorted(restored) == refs(store.resources(GONE))
    p2 = store.resource(GONE, "Patient/p2")
    assert p2 is not None and "link" not in p2 and "active" not in p2  # not the merge's version
    assert store.state(GONE)["problems"] == ["Condition/c2"]
    assert store.identifiers(GONE) == ["urn:mrn|M2"]
    assert store.resolve("M2") == GONE and store.resolve("urn:mrn|M2") == GONE
    assert store.resolve(GONE) == GONE and store.resolve("M1") == KEEP
    assert store.holders("Condition/c2") == [GONE]
    assert store.holders("Practitioner/dr1") == [KEEP, GONE]
    assert store.merged_from(KEEP) == {}
    # both identity logs say so
    for twin in (KEEP, GONE):
        assert any(
            link.get("unmerged") == GONE and link.get("from") == KEEP for link in store.links(twin)
        )
    # the survivor's past is kept: as known between the merge and the unmerge, it held both
    during = refs(store.as_of(KEEP, 35)["resources"])
    assert "Condition/c2" in during and "Observation/o9" in during
    assert refs(store.as_of(KEEP, 45)["resources"]) == ["Patient/p1", "Practitioner/dr1"]
    assert store.history(KEEP, "Condition/c2") == []
    assert [h.get("link") for h in store.history(KEEP, "Patient/p1")] == [None]
    # later events for the merged patient go to its own twin
    later = store.apply(GONE, [lab("o10", "2026-03-01")], event_ms=3000, known_ms=50)
    assert later.twin == GONE


def test_a_redelivered_unmerge_changes_nothing(store: TwinStore) -> None:
    merged_by_mistake(store)
    store.unmerge(GONE, KEEP, known_ms=40, reason={}, src=UNMERGE_REC)
    digests = store.digest(KEEP), store.digest(GONE)
    assert store.unmerge(GONE, KEEP, known_ms=41, reason={}, src=UNMERGE_REC) == ([], [])
    assert (store.digest(KEEP), store.digest(GONE)) == digests


def test_an_unmerge_that_does_not_fit_is_refused(store: TwinStore) -> None:
    store.apply(KEEP, [patient("p1", "M1")], event_ms=1, known_ms=1)
    store.apply(GONE, [patient("p2", "M2")], event_ms=1, known_ms=1)
    with pytest.raises(UnmergeError, match="not merged into"):
        store.unmerge(GONE, KEEP, known_ms=2, reason={})
    third = "33333333-3333-4333-8333-333333333333"
    store.merge(GONE, KEEP, known_ms=2, reason={})
    store.merge(KEEP, third, known_ms=3, reason={})
    with pytest.raises(UnmergeError, match="itself merged into"):
        store.unmerge(GONE, KEEP, known_ms=4, reason={})


def test_merges_undone_in_reverse_order(store: TwinStore) -> None:
    """GONE merged into KEEP, then KEEP into a third twin: unmerge KEEP, then GONE."""
    third = "33333333-3333-4333-8333-333333333333"
    merged_by_mistake(store)
    store.apply(third, [patient("p3", "M3")], event_ms=1, known_ms=1, src="fhir.resources/2/1")
    store.merge(KEEP, third, known_ms=60, reason={}, src="fhir.resources/2/2")
    assert store.twins() == [third] and store.resolve("M2") == third
    with pytest.raises(UnmergeError, match="itself merged into"):
        store.unmerge(GONE, KEEP, known_ms=70, reason={})
    store.unmerge(KEEP, third, known_ms=70, reason={})
    assert refs(store.resources(third)) == ["Patient/p3"]
    assert "Condition/c2" in refs(store.resources(KEEP))  # KEEP is back as it was, GONE in it
    store.unmerge(GONE, KEEP, known_ms=80, reason={})
    assert store.twins() == sorted([KEEP, GONE, third])
    assert refs(store.resources(KEEP)) == ["Patient/p1", "Practitioner/dr1"]
    assert "Condition/c2" in refs(store.resources(GONE))
    assert store.resolve("M2") == GONE and store.resolve("M1") == KEEP


def test_erasing_the_survivor_spares_the_twin_given_back(store: TwinStore) -> None:
    """An erasure takes every twin merged into the patient's, but not one an unmerge gave
    back: that is another patient."""
    from fhirtwin.erasure import erase

    keep, gone = str(uuid.uuid4()), str(uuid.uuid4())  # an erased twin's key stays erased
    merged_by_mistake(store, keep, gone)
    store.unmerge(gone, keep, known_ms=40, reason={})
    done = erase(store, keep)
    assert done.twins == [keep]
    assert store.twins() == [gone] and store.resolve("M2") == gone
    assert "Condition/c2" in refs(store.resources(gone))


def test_erasing_the_survivor_of_a_merge_takes_the_merged_twin_too(store: TwinStore) -> None:
    from fhirtwin.erasure import erase

    keep, gone = str(uuid.uuid4()), str(uuid.uuid4())
    merged_by_mistake(store, keep, gone)
    assert sorted(erase(store, keep).twins) == sorted([keep, gone])


def test_a_resource_both_sent_at_the_same_time_goes_back_too(store: TwinStore) -> None:
    """The survivor already held the same content at the same event time (one clinician
    in both patients' messages of one minute): it keeps one assertion, and the merged
    twin still gets its own back."""
    keep, gone = str(uuid.uuid4()), str(uuid.uuid4())
    store.apply(
        keep, [patient("p1", "M1"), practitioner()], event_ms=1000, known_ms=10, src="k/0/1"
    )
    store.apply(
        gone, [patient("p2", "M2"), practitioner()], event_ms=1000, known_ms=11, src="k/1/1"
    )
    store.merge(gone, keep, known_ms=20, reason={}, src="k/0/2")
    store.unmerge(gone, keep, known_ms=30, reason={})
    assert refs(store.resources(gone)) == ["Patient/p2", "Practitioner/dr1"]
    assert refs(store.resources(keep)) == ["Patient/p1", "Practitioner/dr1"]


def test_the_same_resource_arriving_through_the_pointer_goes_back_too(store: TwinStore) -> None:
    """The other order (a rebuild can replay it so): the merge comes first, then the merged
    twin's own message, through the forward pointer, with content the survivor holds."""
    keep, gone = str(uuid.uuid4()), str(uuid.uuid4())
    store.apply(
        keep, [patient("p1", "M1"), practitioner()], event_ms=1000, known_ms=10, src="k/0/1"
    )
    store.apply(gone, [patient("p2", "M2")], event_ms=900, known_ms=5, src="k/1/0")
    store.merge(gone, keep, known_ms=20, reason={}, src="k/0/2")
    late = [patient("p2", "M2"), practitioner()]
    store.apply(gone, late, event_ms=1000, known_ms=30, src="k/1/1")
    held = store.r.hlen(f"{store.base(keep)}:vinfo")
    store.apply(gone, late, event_ms=1000, known_ms=31, src="k/1/1")  # redelivered
    assert store.r.hlen(f"{store.base(keep)}:vinfo") == held  # writes nothing
    store.unmerge(gone, keep, known_ms=40, reason={})
    assert refs(store.resources(gone)) == ["Patient/p2", "Practitioner/dr1"]
    assert refs(store.resources(keep)) == ["Patient/p1", "Practitioner/dr1"]
