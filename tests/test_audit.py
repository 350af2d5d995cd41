"""The audit log on real Kafka and Redis: sequencing, signed checkpoints, tamper evidence."""

from __future__ import annotations

import threading
from pathlib import Path

import orjson
import pytest
import redis
from typer.testing import CliRunner

from fhirtwin import bus
from fhirtwin.audit import AuditSequencer, checkpoints, rebuild_tree, verify
from fhirtwin.cli import app
from fhirtwin.merkle import (
    leaf_hash,
    parse_verifier_key,
    verify_checkpoint,
    verify_consistency,
    verify_inclusion,
)
from tests.pipeline import produce


def event(i: int, subscriber: str, twin: str, purpose: str) -> bytes:
    ev = {
        "resourceType": "AuditEvent",
        "id": f"ae-{i}",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110106"},
        "recorded": f"2026-11-25T10:{i // 60:02d}:{i % 60:02d}Z",
        "outcome": "0",
        "purposeOfEvent": [{"coding": [{"code": purpose}]}],
        "agent": [{"requestor": True, "name": subscriber, "who": {"display": subscriber}}],
        "entity": [{"what": {"identifier": {"system": "urn:fhirtwin:twin", "value": twin}}}],
    }
    return orjson.dumps(ev, option=orjson.OPT_SORT_KEYS)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FHIRTWIN_HOME", str(tmp_path))
    monkeypatch.delenv("FHIRTWIN_AUDIT_SIGNER", raising=False)
    monkeypatch.delenv("FHIRTWIN_AUDIT_VERIFIER", raising=False)
    return tmp_path


def sequence(kafka: str, redis_url: str) -> AuditSequencer:
    seq = AuditSequencer(kafka, redis_url)
    seq.run(threading.Event(), idle_exit=1.5)
    return seq


def test_log_verifies_and_names_tampering(kafka: str, redis_url: str, home: Path) -> None:
    assert bus.partitions_of(kafka, bus.AUDIT) == [0]  # one total order
    entries = [event(i, "care" if i % 2 else "research", f"T{i % 3}", "TREAT") for i in range(40)]
    produce(kafka, bus.AUDIT, entries[:25])
    seq = sequence(kafka, redis_url)
    produce(kafka, bus.AUDIT, entries[25:])
    sequence(kafka, redis_url)
    assert seq.log.size == 40  # read from Redis: both runs appended to one tree
    notes = checkpoints(redis_url)
    assert len(notes) >= 2
    vkey = (home / "audit-verifier.key").read_text().strip()
    name, public = parse_verifier_key(vkey)
    assert verify_checkpoint(notes[-1], name, public).size == 40
    assert verify(kafka, redis_url).ok

    runner = CliRunner()
    common = ["--kafka", kafka, "--redis", redis_url]
    ok = runner.invoke(app, ["audit", "verify", *common])
    assert ok.exit_code == 0 and "OK: 40 entries" in ok.stdout
    export = home / "audit.ndjson"
    assert runner.invoke(app, ["audit", "export", str(export), "--kafka", kafka]).exit_code == 0
    lines = export.read_bytes().split(b"\n")[:-1]
    assert lines == entries

    def tampered(new_lines: list[bytes]) -> str:
        path = home / "tampered.ndjson"
        path.write_bytes(b"".join(line + b"\n" for line in new_lines))
        res = runner.invoke(app, ["audit", "verify", "--entries", str(path), *common])
        assert res.exit_code == 1
        return res.stderr

    flipped = [*lines]
    flipped[17] = flipped[17].replace(b"care", b"cure")
    assert "#17" in tampered(flipped)
    assert "#9" in tampered(lines[:9] + lines[10:])  # deleted
    swapped = [*lines]
    swapped[30], swapped[31] = swapped[31], swapped[30]
    assert "#30" in tampered(swapped)

    # Proofs an auditor checks offline against the signed checkpoints.
    first, last = (verify_checkpoint(n, name, public) for n in (notes[0], notes[-1]))
    got = runner.invoke(
        app, ["audit", "proof", "--index", "17", "--since-size", str(first.size), *common]
    )
    assert got.exit_code == 0, got.output
    p = orjson.loads(got.stdout)
    assert bytes.fromhex(p["root"]) == last.root
    inclusion = [bytes.fromhex(h) for h in p["inclusion"]]
    assert verify_inclusion(leaf_hash(entries[17]), 17, 40, inclusion, last.root)
    assert not verify_inclusion(leaf_hash(entries[18]), 17, 40, inclusion, last.root)
    consistency = [bytes.fromhex(h) for h in p["consistency"]]
    assert verify_consistency(first.size, 40, first.root, last.root, consistency)

    # Redis lost everything: the checkpoints are on Kafka, and the tree rebuilt from
    # Kafka gives the roots that were signed.
    assert len(list(bus.read_topic(kafka, bus.AUDIT_CHECKPOINTS))) == len(notes)
    redis.Redis.from_url(redis_url).delete(
        "ft:audit:nodes", "ft:audit:size", "ft:audit:checkpoints"
    )
    assert rebuild_tree(kafka, redis_url) == 40
    assert verify(kafka, redis_url).ok


def test_redelivery_appends_nothing_twice(kafka: str, redis_url: str, home: Path) -> None:
    produce(kafka, bus.AUDIT, [event(i, "care", "T1", "TREAT") for i in range(10)])
    seq = sequence(kafka, redis_url)
    recs = list(bus.read_topic(kafka, bus.AUDIT))
    seq.append(recs)  # as after a crash between the Redis write and the offset commit
    assert seq.log.size == 10
    assert verify(kafka, redis_url).ok


def test_query_by_subscriber_patient_and_purpose(kafka: str, redis_url: str, home: Path) -> None:
    produce(
        kafka,
        bus.AUDIT,
        [
            event(0, "care", "T1", "TREAT"),
            event(1, "research", "T1", "HRESCH"),
            event(2, "care", "T2", "TREAT"),
        ],
    )
    runner = CliRunner()
    common = ["--kafka", kafka, "--redis", redis_url, "--json"]

    def query(*args: str) -> list[str]:
        res = runner.invoke(app, ["audit", "query", *args, *common])
        assert res.exit_code == 0, res.output
        return [row["event"]["id"] for row in orjson.loads(res.stdout)]

    assert query("--subscriber", "care") == ["ae-0", "ae-2"]
    assert query("--patient", "T1") == ["ae-0", "ae-1"]
    assert query("--purpose", "HRESCH") == ["ae-1"]
    assert query("--since", "2026-11-25T10:00:01Z") == ["ae-1", "ae-2"]
