"""The pipeline on real Tansu (Kafka) and real Redis: ingest → normalize → assemble → twin."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import orjson
import redis
from typer.testing import CliRunner

from fhirtwin import bus
from fhirtwin.assemble import rebuild
from fhirtwin.cli import app
from fhirtwin.conversion import convert_hl7v2
from fhirtwin.deadletter import list_deadletters, replay
from fhirtwin.hl7v2 import split_batch
from fhirtwin.ingest import hl7v2_patient_key, ingest
from fhirtwin.normalize import NormalizeWorker
from fhirtwin.twin import TwinStore
from tests.pipeline import drain, events, produce, records, two_patients_and_a_merge, wait_for

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "hl7v2"
RAW = bus.RAW_TOPICS["hl7v2"]


def store_of(url: str) -> TwinStore:
    return TwinStore(redis.Redis.from_url(url))


def test_examples_become_twins(kafka: str, redis_url: str) -> None:
    counts = ingest(kafka, "hl7v2", [str(EXAMPLES)])
    messages = [m for p in sorted(EXAMPLES.glob("*.hl7")) for m in split_batch(p.read_bytes())]
    assert counts["records"] == len(messages)
    # the raw topic holds the original bytes, unaltered
    assert sorted(r.value for r in records(kafka, RAW)) == sorted(messages)

    normalized, assembled = drain(kafka, redis_url, validate=True)
    assert normalized == len(messages)
    assert assembled == len(messages)  # one event per message
    assert records(kafka, bus.DEADLETTER) == []
    store = store_of(redis_url)
    twin = store.resolve("MRN448812")
    assert twin is not None
    assert store.resolve("urn:oid:2.16.840.1.113883.3.9001.1|MRN448812") == twin
    other = store.resolve("MRN550021")
    assert other is not None and other != twin
    assert sorted(store.twins()) == sorted([twin, other])

    # every resource of every message of that patient is in the twin, at its newest version
    held = {f"{r['resourceType']}/{r['id']}" for r in store.resources(twin)}
    for msg in messages:
        if hl7v2_patient_key(msg) != b"MRN448812":
            continue
        for entry in convert_hl7v2(msg).bundle["entry"]:
            res = entry["resource"]
            assert f"{res['resourceType']}/{res['id']}" in held
    # the A03 (discharge) came after the A01 (admit): the encounter is finished
    encounters = [r for r in store.resources(twin) if r["resourceType"] == "Encounter"]
    assert "finished" in {e["status"] for e in encounters}
    state = store.state(twin)
    assert state["problems"] and state["allergies"]
    assert any(code.startswith("http://loinc.org|") for code in state["labs"])
    assert store.timeline(twin)  # clinical events in time order
    # twin events tell subscribers what changed
    changed = {ref for e in events(kafka) if e["twin"] == twin for ref in e["changed"]}
    assert changed == held

    runner = CliRunner()
    common = ["--kafka", kafka, "--redis", redis_url]
    listed = runner.invoke(app, ["twin", "list", "--json", *common])
    assert listed.exit_code == 0, listed.output
    rows = {row["twin"]: row for row in orjson.loads(listed.stdout)}
    assert rows[twin]["identifiers"] == ["urn:oid:2.16.840.1.113883.3.9001.1|MRN448812"]
    assert rows[twin]["total"] == len(held)
    shown = runner.invoke(app, ["twin", "show", "MRN448812", "--json", *common])
    assert shown.exit_code == 0, shown.output
    bundle = orjson.loads(shown.stdout)
    assert bundle["resourceType"] == "Bundle"
    assert {e["fullUrl"] for e in bundle["entry"]} == held
    assert all(e["resource"]["meta"]["versionId"] for e in bundle["entry"])
    text = runner.invoke(app, ["twin", "show", "MRN448812", *common])
    assert text.exit_code == 0 and "problems" in text.stdout and "timeline" in text.stdout
    missing = runner.invoke(app, ["twin", "show", "NOPE", *common])
    assert missing.exit_code == 1


def test_bad_input_goes_to_dead_letters_and_replays_after_a_fix(
    kafka: str, redis_url: str, tmp_path: Path
) -> None:
    good = (EXAMPLES / "adt-a01-admit.hl7").read_bytes()
    not_hl7 = b"this is not an HL7 message\r"
    bad_date = good.replace(b"|19580214|", b"|19580230|").replace(b"ADT0001", b"BAD0001")
    unknown = (
        b"MSH|^~\\&|LAB|NORTHGEN|FHIRTWIN|TWINHUB|20261103091500||ZZZ^Z99|ZZZ0001|P|2.5.1\r"
        b"PID|1||MRN777^^^NORTHGEN^MR||Doe^Jane||19700101|F\r"
    )
    produce(kafka, RAW, [not_hl7, unknown, good])
    normalized, _ = drain(kafka, redis_url, validate=True)
    assert normalized == 3  # the worker went on past the bad ones

    letters = {dl.stage: dl for dl in list_deadletters(kafka)}
    assert set(letters) == {"parse", "map"}
    assert letters["parse"].record.value == not_hl7  # the original bytes, unaltered
    assert "MSH" in letters["parse"].reason
    assert letters["map"].record.value == unknown
    assert "ZZZ^Z99" in letters["map"].reason and "MSH-9" in letters["map"].reason
    assert letters["map"].error["control_id"] == "ZZZ0001"
    store = store_of(redis_url)
    assert store.resolve("MRN448812") is not None
    assert store.resolve("MRN777") is None
    del bad_date  # (the converter drops a bad date with a report; it is not a dead letter)

    # The engineer adds the missing rule, restarts the worker with it, and replays.
    rules = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", rules)
    (rules / "hl7v2" / "messages" / "ZZZ_Z99.yaml").write_text("extends: _ADT_EVENT\n")
    assert replay(kafka, redis_url, [letters["map"]]) == 1
    drain(kafka, redis_url, validate=True, mappings=rules)
    twin = store.resolve("MRN777")
    assert twin is not None and "Patient" in store.counts(twin)
    # nothing new was dead-lettered by the replay
    assert len(list_deadletters(kafka)) == 2
    replayed = [r for r in records(kafka, RAW) if r.header("fhirtwin-replay-of")]
    assert [r.value for r in replayed] == [unknown]

    runner = CliRunner()
    listed = runner.invoke(
        app, ["deadletter", "list", "--json", "--kafka", kafka, "--redis", redis_url]
    )
    data = {d["stage"]: d for d in orjson.loads(listed.stdout)}
    assert data["map"]["replayed"] is True and data["parse"]["replayed"] is False


def test_a_message_the_sender_got_wrong_replays_as_a_corrected_copy(
    kafka: str, redis_url: str, tmp_path: Path
) -> None:
    """No rule can give an ADT its missing PID: the engineer takes the original out of
    the dead letter, adds the PID, and replays that copy in its place."""
    broken = (
        b"MSH|^~\\&|EPICADT|NORTHGEN|FHIRTWIN|TWINHUB|20261103091500-0500||ADT^A01^ADT_A01|"
        b"NOPID02|P|2.5.1\rEVN|A01|20261103091500-0500\rPV1|1|I|4W^412^B\r"
    )
    produce(kafka, RAW, [broken])
    drain(kafka, redis_url)
    (dl,) = [d for d in list_deadletters(kafka) if d.error.get("control_id") == "NOPID02"]
    assert dl.stage == "map" and "has no PID segment" in dl.reason

    runner = CliRunner()
    endpoints = ["--kafka", kafka, "--redis", redis_url]
    shown = runner.invoke(app, ["deadletter", "show", dl.id, "--raw", "--kafka", kafka])
    assert shown.stdout_bytes == broken
    fixed = shown.stdout_bytes.replace(
        b"PV1|", b"PID|1||MRN779^^^NORTHGEN^MR||Doe^Jo||19700101|F\rPV1|"
    )
    (tmp_path / "fixed.hl7").write_bytes(fixed)
    wrong = runner.invoke(
        app, ["deadletter", "replay", "--all", "--with", str(tmp_path / "fixed.hl7"), *endpoints]
    )
    assert wrong.exit_code == 2 and "name exactly one id" in wrong.stderr
    missing = runner.invoke(
        app, ["deadletter", "replay", dl.id, "--with", str(tmp_path / "nope.hl7"), *endpoints]
    )
    assert missing.exit_code == 1 and "cannot read the corrected copy" in missing.stderr

    done = runner.invoke(
        app, ["deadletter", "replay", dl.id, "--with", str(tmp_path / "fixed.hl7"), *endpoints]
    )
    assert done.exit_code == 0, done.output
    assert f"replayed a corrected copy of {dl.id}" in done.stdout
    drain(kafka, redis_url)
    twin = store_of(redis_url).resolve("MRN779")
    assert twin is not None and "Encounter" in store_of(redis_url).counts(twin)
    copies = [r for r in records(kafka, RAW) if r.header("fhirtwin-corrected-of") == dl.id]
    assert [r.value for r in copies] == [fixed]
    assert [r.header("fhirtwin-replay-of") for r in copies] == [dl.id]
    assert [r.key for r in copies] == [hl7v2_patient_key(fixed)]  # now it has a patient
    listed = runner.invoke(app, ["deadletter", "list", "--json", *endpoints])
    (mine,) = [d for d in orjson.loads(listed.stdout) if d["id"] == dl.id]
    assert mine["replayed"] is True and mine["corrected"]["bytes"] == len(fixed)
    # the dead letter still holds the original, and the copy made no new one
    assert [d.record.value for d in list_deadletters(kafka) if d.id == dl.id] == [broken]
    assert len([d for d in list_deadletters(kafka) if d.error.get("control_id") == "NOPID02"]) == 1


def test_merge_moves_the_twin_and_tells_subscribers(kafka: str, redis_url: str) -> None:
    merge_two_patients(kafka, redis_url)


def test_an_older_interface_merges_with_adt_a34(kafka: str, redis_url: str) -> None:
    merge_two_patients(kafka, redis_url, event=b"A34^ADT_A30")


def test_an_identifier_change_a46_keeps_the_twin(kafka: str, redis_url: str) -> None:
    a01 = (EXAMPLES / "adt-a01-admit.hl7").read_bytes()
    a46 = (
        b"MSH|^~\\&|EPICADT|NORTHGEN|FHIRTWIN|TWINHUB|20261110100000-0500||ADT^A46^ADT_A30|"
        b"CHG0001|P|2.3\r"
        b"EVN|A46|20261110100000-0500\r"
        b"PID|1||MRN777001^^^NORTHGEN&2.16.840.1.113883.3.9001.1&ISO^MR||Okafor^Adaeze\r"
        b"MRG|MRN448812^^^NORTHGEN&2.16.840.1.113883.3.9001.1&ISO^MR\r"
    )
    produce(kafka, RAW, [a01])
    drain(kafka, redis_url)
    produce(kafka, RAW, [a46])
    drain(kafka, redis_url)
    store = store_of(redis_url)
    twin = store.resolve("MRN448812")
    assert twin and store.twins() == [twin] and store.resolve("MRN777001") == twin
    assert any(link.get("rule") == "identifier-change" for link in store.links(twin))


def merge_two_patients(
    kafka: str, redis_url: str, event: bytes = b"A40^ADT_A39"
) -> tuple[str, str]:
    """Two admitted patients, then an ADT merge (A40 unless told) that merges the second
    into the first; (survivor, merged) twin ids."""
    a01, other, a40 = two_patients_and_a_merge(event)
    produce(kafka, RAW, [a01, other])
    drain(kafka, redis_url)
    store = store_of(redis_url)
    survivor, merged = store.resolve("MRN448812"), store.resolve("MRN999001")
    assert survivor and merged and survivor != merged

    produce(kafka, RAW, [a40])
    drain(kafka, redis_url)
    assert store.twins() == [survivor]
    assert store.resolve("MRN999001") == survivor
    assert store.resolve(merged) == survivor
    patients = [r for r in store.resources(survivor) if r["resourceType"] == "Patient"]
    assert len(patients) == 2
    merges = [e for e in events(kafka) if e["type"] == "merge"]
    assert merges and merges[0]["merged"] == merged and merges[0]["into"] == survivor
    # the identity log holds the merge once: the decision, what it merged, and its record
    logged = [link for link in store.links(survivor) if link.get("rule") == "merge"]
    assert len(logged) == 1, logged
    assert logged[0]["merged"] == merged and logged[0]["into"] == survivor
    assert logged[0]["source"]["control_id"] == "MRG0001" and logged[0]["record"]
    return survivor, merged


def test_an_operator_undoes_a_wrong_merge(kafka: str, redis_url: str) -> None:
    survivor, merged = merge_two_patients(kafka, redis_url)
    store = store_of(redis_url)
    runner = CliRunner()
    endpoints = ["--kafka", kafka, "--redis", redis_url]
    shown = runner.invoke(app, ["twin", "show", "MRN448812", *endpoints])
    assert f"merged in:   twin {merged}" in shown.stdout
    # an identifier the survivor always had is not a merge to undo: a clear refusal
    wrong = runner.invoke(app, ["twin", "unmerge", "MRN448812", "--reason", "x", *endpoints])
    assert wrong.exit_code == 1 and merged in wrong.stderr and "no twin merged" in wrong.stderr

    asked = runner.invoke(
        app,
        ["twin", "unmerge", "MRN999001", "--reason", "two people", "--by", "hd", "--wait", "0"],
        env={"FHIRTWIN_KAFKA": kafka, "FHIRTWIN_REDIS": redis_url},
    )
    assert asked.exit_code == 0, asked.output
    assert store.twins() == [survivor]  # nothing happens before the assembler runs
    drain(kafka, redis_url)
    assert sorted(store.twins()) == sorted([survivor, merged])
    assert store.resolve("MRN999001") == merged and store.resolve("MRN448812") == survivor
    for twin, mrn in ((survivor, "MRN448812"), (merged, "MRN999001")):
        patients = [r for r in store.resources(twin) if r["resourceType"] == "Patient"]
        assert [p["identifier"][0]["value"] for p in patients] == [mrn]
        assert "link" not in patients[0] and patients[0].get("active") is not False
        assert "Encounter" in store.counts(twin)
    # both twins' subscribers are told, and the identity logs say who asked and why
    told = [e for e in events(kafka) if e["type"] == "unmerge"]
    assert sorted(e["twin"] for e in told) == sorted([survivor, merged])
    assert all(e["restored"] == merged and e["from"] == survivor for e in told)
    log = [entry for entry in store.links(merged) if entry.get("unmerged") == merged]
    assert log and log[0]["reason"] == "two people" and log[0]["by"] == "hd"
    # a rebuild from fhir.resources replays the merge and the unmerge: the same twins
    before = {tuple(store.identifiers(t)): store.digest(t) for t in store.twins()}
    rebuild(kafka, redis_url)
    assert {tuple(store.identifiers(t)): store.digest(t) for t in store.twins()} == before


def test_rebuild_from_kafka_gives_the_same_twins(kafka: str, redis_url: str) -> None:
    from tests.synth import feed

    produce(kafka, RAW, feed(120, patients=15))
    drain(kafka, redis_url)
    store = store_of(redis_url)
    before = {tuple(store.identifiers(t)): store.digest(t) for t in store.twins()}
    assert len(before) == 15
    result = rebuild(kafka, redis_url)
    assert result["twins"] == 15
    after = {tuple(store.identifiers(t)): store.digest(t) for t in store.twins()}
    assert after == before


def test_two_normalize_workers_split_the_partitions(kafka: str, redis_url: str) -> None:
    from tests.synth import feed

    stop = threading.Event()
    workers = [NormalizeWorker(kafka, redis_url, validate=False) for _ in range(2)]
    threads = [threading.Thread(target=w.run, args=(stop,)) for w in workers]
    for t in threads:
        t.start()
    try:
        wait_for(
            lambda: (
                sorted(workers[0].stream.assigned + workers[1].stream.assigned) == [0, 1, 2, 3]
                and all(w.stream.assigned for w in workers)
            ),
            what="both workers to get partitions",
        )
        messages = feed(200, patients=40)
        p = bus.producer(kafka)
        for value in messages:
            p.produce(RAW, value, hl7v2_patient_key(value))
        p.flush(30)
        wait_for(
            lambda: workers[0].stream.processed + workers[1].stream.processed == 200,
            what="200 messages normalized",
        )
        split = [list(w.stream.assigned) for w in workers]
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert set(split[0]).isdisjoint(split[1]) and sorted(split[0] + split[1]) == [0, 1, 2, 3]
    assert workers[0].stream.processed > 0 and workers[1].stream.processed > 0
