"""Patient identity on a real Redis: which twin a message's patient belongs to, and why."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis

from fhirtwin.mpi import MPIConfig, Resolver, linking_identifiers

MR = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}
SS = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "SS"}]}


def patient(*mrns: str, ssn: str | None = None, prior_of: str | None = None, **extra: Any) -> dict:
    idents: list[dict[str, Any]] = [{"system": "urn:mrn", "value": m, "type": MR} for m in mrns]
    if ssn:
        idents.append({"system": "urn:ssn", "value": ssn, "type": SS})
    res: dict[str, Any] = {"resourceType": "Patient", "id": mrns[0], "identifier": idents, **extra}
    if prior_of:
        res["link"] = [{"type": "replaced-by", "other": {"reference": f"Patient/{prior_of}"}}]
    return res


@pytest.fixture
def resolver(redis_url: str) -> Resolver:
    return Resolver(redis.Redis.from_url(redis_url), MPIConfig.load())


def test_new_patient_gets_a_random_twin_and_keeps_it(resolver: Resolver) -> None:
    first = resolver.resolve([patient("A1")])
    assert first is not None and first.rule == "new"
    assert uuid.UUID(first.twin).version == 4  # random, never derived from the MRN
    again = resolver.resolve([patient("A1")])
    assert again is not None and (again.twin, again.rule) == (first.twin, "identifier")
    assert again.matched == ["urn:mrn|A1"]


def test_shared_numbers_do_not_link_people(resolver: Resolver) -> None:
    a = resolver.resolve([patient("A1", ssn="123")])
    b = resolver.resolve([patient("B1", ssn="123")])
    assert a is not None and b is not None and a.twin != b.twin
    assert linking_identifiers(patient("A1", ssn="123"), MPIConfig.load()) == ["urn:mrn|A1"]


def test_conflicting_identifiers_are_recorded_not_linked(resolver: Resolver) -> None:
    a = resolver.resolve([patient("A1")])
    b = resolver.resolve([patient("B1")])
    assert a is not None and b is not None
    both = resolver.resolve([patient("A1", "B1")])
    assert both is not None and both.twin == a.twin
    assert both.conflicts == {"urn:mrn|B1": b.twin}
    assert resolver.resolve([patient("B1")]).twin == b.twin  # type: ignore[union-attr]


def test_identifier_change_keeps_the_twin(resolver: Resolver) -> None:
    old = resolver.resolve([patient("A1")])
    assert old is not None
    changed = resolver.resolve([patient("A2"), patient("A1", prior_of="A2")])
    assert changed is not None and changed.twin == old.twin
    assert changed.rule == "identifier-change" and changed.merge_from is None
    assert resolver.resolve([patient("A2")]).twin == old.twin  # type: ignore[union-attr]


def test_merge_names_the_twin_to_merge(resolver: Resolver) -> None:
    keep = resolver.resolve([patient("A1")])
    gone = resolver.resolve([patient("B1")])
    assert keep is not None and gone is not None
    merge = resolver.resolve([patient("A1"), patient("B1", prior_of="A1")])
    assert merge is not None
    assert (merge.twin, merge.rule, merge.merge_from) == (keep.twin, "merge", gone.twin)
    assert resolver.resolve([patient("B1")]).twin == keep.twin  # type: ignore[union-attr]


def test_demographic_match_only_when_enabled(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    demo = {
        "name": [{"family": "Okafor", "given": ["Adaeze"]}],
        "birthDate": "1958-02-14",
        "gender": "female",
    }
    off = Resolver(client, MPIConfig.load())
    a = off.resolve([patient("A1", **demo)])
    b = off.resolve([patient("X9", **demo)])
    assert a is not None and b is not None and a.twin != b.twin
    on = Resolver(client, MPIConfig(demographic=True))
    c = on.resolve([patient("C1", **demo)])
    d = on.resolve([patient("D1", **demo)])
    assert c is not None and d is not None
    assert d.twin == c.twin and d.rule == "demographic"


def test_no_patient_no_identity(resolver: Resolver) -> None:
    assert resolver.resolve([{"resourceType": "Organization", "id": "o"}]) is None


def test_a_record_without_a_patient_links_by_the_identifiers_it_names(resolver: Resolver) -> None:
    first = resolver.resolve([patient("A1")])
    assert first is not None
    obs = {"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/A1"}}
    same = resolver.resolve([obs], ["urn:mrn|A1"])
    assert same is not None and same.twin == first.twin
    new = resolver.resolve([obs], ["urn:mrn|Z9"])
    assert new is not None and new.twin != first.twin and new.rule == "new"
    assert resolver.resolve([patient("Z9")]).twin == new.twin  # type: ignore[union-attr]


def _feed() -> list[tuple[list[dict[str, Any]], list[str]]]:
    obs = {"resourceType": "Observation", "id": "o1"}
    return [
        ([patient("A1")], []),  # new
        ([patient("A1")], []),  # known
        ([patient("B1")], []),  # new
        ([patient("A1", "B1")], []),  # conflict
        ([obs], ["urn:mrn|Z9"]),  # new, named by a record without a Patient
        ([patient("Z9", "Z8")], []),  # known, and a new identifier linked
        ([patient("Z8")], []),  # found by the identifier just linked
        ([patient("A2"), patient("A1", prior_of="A2")], []),  # identifier change
        ([patient("A2"), patient("B1", prior_of="A2")], []),  # merge
        ([patient("B1")], []),  # now the survivor's
        ([patient("E1")], []),  # erased
    ]


def _decisions(resolver: Resolver, batched: bool) -> list[tuple[Any, ...]]:
    resolver.r.flushdb()
    erased = str(uuid.uuid4())
    resolver.r.set(f"ft:erased:id:{resolver.keys.blind('urn:mrn|E1')}", erased)
    resolver.r.config_resetstat()
    feed = _feed()
    if batched:
        resolver.prefetch(feed)
    got = [resolver.resolve(resources, idents) for resources, idents in feed]
    resolver.forget()
    labels: dict[str, str] = {erased: "erased"}

    def label(twin: str | None) -> str | None:
        return None if twin is None else labels.setdefault(twin, f"T{len(labels)}")

    mgets = int(resolver.r.info("commandstats").get("cmdstat_mget", {}).get("calls", 0))
    return [
        (
            label(i.twin),
            i.rule,
            i.identifiers,
            i.matched,
            label(i.merge_from),
            {k: label(v) for k, v in i.conflicts.items()},
        )
        for i in got
        if i is not None
    ] + [("MGET calls", mgets)]


def test_a_prefetched_batch_resolves_as_one_record_at_a_time(resolver: Resolver) -> None:
    """The normalize worker reads a batch's identities at once (``prefetch``); what it then
    decides record by record, including what earlier records of the batch created,
    linked or merged, is what resolving each record alone decides — with one MGET."""
    alone, batched = _decisions(resolver, False), _decisions(resolver, True)
    assert alone[:-1] == batched[:-1]
    assert [d[1] for d in batched[:-1]] == [
        "new",
        "identifier",
        "new",
        "identifier",
        "new",
        "identifier",
        "identifier",
        "identifier-change",
        "merge",
        "identifier",
        "erased",
    ]
    assert batched[8][4] == batched[2][0]  # B1's twin is merged into A's
    assert batched[9][0] == batched[0][0]
    assert alone[-1] == ("MGET calls", 11) and batched[-1] == ("MGET calls", 1)
