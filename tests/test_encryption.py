"""Encryption at rest and erasure (fhirtwin/crypto.py, fhirtwin/erasure.py; docs/security.md).

The end-to-end tests ingest a synthetic patient with a family name, MRN and birth date that
appear nowhere else, through the real pipeline (Kafka, Redis), then look for those strings
in what an attacker with a copy of the storage would have: every Redis value (``DUMP``),
an RDB file, every Kafka record of every topic. Then the patient is erased and an RDB saved
before the erasure is loaded into a fresh Redis: nothing of the patient opens.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from fhirtwin import bus, crypto
from fhirtwin.assemble import rebuild
from fhirtwin.crypto import (
    CryptoError,
    ErasedError,
    FileKeyStore,
    KeyRing,
    default_keyring,
    open_event,
)
from fhirtwin.erasure import NotFound, erase_patient
from fhirtwin.infra import EmbeddedRedis, _wait_port, free_port
from fhirtwin.ingest import ingest
from fhirtwin.twin import TwinStore
from tests.pipeline import drain, records

FAMILY, GIVEN, MRN, DOB = "Quarrendell", "Ottoline", "MRNQ7734291", "19471103"
SECRETS = [FAMILY.encode(), MRN.encode(), DOB.encode(), b"1947-11-03"]


def _adt(control: str, trigger: str = "A01", when: str = "20261125081500") -> bytes:
    segs = [
        f"MSH|^~\\&|EPIC|NORTHGATE|FHIRTWIN|NORTHGATE|{when}||ADT^{trigger}^ADT_{trigger}|{control}|P|2.5.1",
        f"EVN|{trigger}|{when}",
        f"PID|1||{MRN}^^^NORTHGATE^MR||{FAMILY}^{GIVEN}^J||{DOB}|F|||12 Elm Row^^Leeds^^LS1 4AB",
        f"PV1|1|I|W3^301^A||||1234^Okafor^Ada|||MED||||||||V{control}|||||||||||||||||||||||||{when}",
        "OBX|1|NM|8867-4^Heart rate^LN||72|/min|||||F",
    ]
    return "\r".join(segs).encode() + b"\r"


def _ring(tmp: Path, kek: bytes | None = None, **kw: Any) -> KeyRing:
    return KeyRing(kek or secrets.token_bytes(32), FileKeyStore(tmp / "keys"), **kw)


# -- the key ring, without servers --------------------------------------------------------


def test_sealed_values_are_bound_to_their_twin_and_place(tmp_path: Path) -> None:
    ring = _ring(tmp_path)
    blob = ring.seal("t1", b'{"family":"Quarrendell"}', b"t1|Patient/p|h1")
    assert FAMILY.encode() not in blob
    assert ring.open("t1", blob, b"t1|Patient/p|h1") == b'{"family":"Quarrendell"}'
    with pytest.raises(CryptoError, match="does not open"):
        ring.open("t1", blob, b"t1|Patient/q|h1")  # moved to another resource
    ring.seal("t2", b"x", b"t2")
    with pytest.raises(CryptoError):
        ring.open("t2", blob, b"t1|Patient/p|h1")  # moved to another twin
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(CryptoError):
        ring.open("t1", tampered, b"t1|Patient/p|h1")


def test_two_processes_agree_on_a_new_twins_key(tmp_path: Path) -> None:
    kek = secrets.token_bytes(32)
    a, b = _ring(tmp_path, kek), _ring(tmp_path, kek)
    blob = a.seal("new-twin", b"hello", b"aad")
    assert b.open("new-twin", blob, b"aad") == b"hello"
    assert a.blind("urn:mrn|123") == b.blind("urn:mrn|123") != a.blind("urn:mrn|124")


def _key_files(tmp: Path) -> list[Path]:
    return [p for p in (tmp / "keys" / "twin").rglob("*") if p.is_file()]


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_new_keys_of_a_deferred_block_reach_the_disk_together_at_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kek = secrets.token_bytes(32)
    ring = _ring(tmp_path, kek)
    synced: list[set[Path]] = []
    make_durable = crypto._make_durable
    monkeypatch.setattr(
        crypto,
        "_make_durable",
        lambda root, paths: (synced.append(set(paths)), make_durable(root, paths)),
    )
    with ring.deferred():
        blobs = {f"t{i}": ring.seal(f"t{i}", b"data", b"aad") for i in range(5)}
        with ring.deferred():  # nested: only the outer block syncs
            blobs["t5"] = ring.seal("t5", b"data", b"aad")
        assert synced == []
        files = _key_files(tmp_path)
        assert len(files) == 6 and {_mode(f) for f in files} == {0o400}  # not synced yet
    assert synced == [set(files)]  # one sync for the six
    assert {_mode(f) for f in files} == {0o600}
    other = _ring(tmp_path, kek)  # another process opens them all
    assert all(other.open(t, b, b"aad") == b"data" for t, b in blobs.items())
    assert len(synced) == 1  # synced keys are not synced again by their readers


def test_a_key_read_before_its_maker_synced_it_is_synced_by_the_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kek = secrets.token_bytes(32)
    maker, reader = _ring(tmp_path, kek), _ring(tmp_path, kek)
    with maker.deferred():
        blob = maker.seal("t1", b"data", b"aad")
        (key,) = _key_files(tmp_path)
        assert _mode(key) == 0o400
        # another worker met the same new patient: it must not seal with a key that a
        # crash could still take, so it syncs the key before using it
        assert reader.open("t1", blob, b"aad") == b"data"
        assert _mode(key) == 0o600
        assert reader.seal("t1", b"more", b"aad")


def test_deferred_keys_are_synced_file_by_file_where_syncfs_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ring = _ring(tmp_path)
    monkeypatch.setattr(crypto, "_syncfs", lambda fd: False)  # not Linux
    fsynced: list[int] = []
    fsync = crypto.os.fsync
    monkeypatch.setattr(crypto.os, "fsync", lambda fd: (fsynced.append(fd), fsync(fd)))
    with ring.deferred():
        ring.seal("aa1", b"x", b"a")
        ring.seal("aa2", b"x", b"a")  # the same directory (twin/aa/)
        ring.seal("bb1", b"x", b"a")
        assert fsynced == []
    assert len(fsynced) == 3 + 2  # each file, then each directory once
    assert {_mode(f) for f in _key_files(tmp_path)} == {0o600}


def test_a_key_file_cut_short_by_a_crash_before_its_sync_is_replaced(tmp_path: Path) -> None:
    kek = secrets.token_bytes(32)
    ring = _ring(tmp_path, kek)
    with ring.deferred():
        ring.seal("t1", b"data", b"aad")
    (key,) = _key_files(tmp_path)
    # what a crash between the link and the sync can leave: the name, not the bytes
    key.chmod(0o600)
    key.write_bytes(b"")
    key.chmod(0o400)
    fresh = _ring(tmp_path, kek)  # the restarted worker
    blob = fresh.seal("t1", b"after", b"aad")
    assert fresh.open("t1", blob, b"aad") == b"after"
    assert len(key.read_bytes()) == 66 and _mode(key) == 0o600
    # a synced key that does not unwrap is never thrown away: data may depend on it
    key.write_bytes(b"")
    with pytest.raises(CryptoError):
        _ring(tmp_path, kek).open("t1", blob, b"aad")
    assert key.exists()


def test_other_threads_keep_synced_keys_while_one_defers(tmp_path: Path) -> None:
    ring = _ring(tmp_path)
    with ring.deferred():
        ring.seal("mine", b"x", b"a")
        t = threading.Thread(target=ring.seal, args=("theirs", b"x", b"a"))
        t.start()
        t.join()
        modes = {f.name: _mode(f) for f in _key_files(tmp_path)}
        assert modes == {"mine": 0o400, "theirs": 0o600}


def test_a_key_never_synced_can_still_be_erased(tmp_path: Path) -> None:
    kek = secrets.token_bytes(32)
    ring = _ring(tmp_path, kek)
    with ring.deferred():
        ring.seal("t1", b"data", b"aad")
        assert ring.erase("t1")
    assert _key_files(tmp_path) == []
    with pytest.raises(ErasedError):
        _ring(tmp_path, kek).seal("t1", b"more", b"aad")


def test_erasing_a_key_makes_every_copy_unreadable_and_refuses_new_data(tmp_path: Path) -> None:
    kek = secrets.token_bytes(32)
    ring = _ring(tmp_path, kek)
    blob = ring.seal("t1", b"data", b"aad")
    assert ring.erase("t1")
    fresh = _ring(tmp_path, kek)  # another process, with nothing cached
    for r in (ring, fresh):
        with pytest.raises(ErasedError):
            r.open("t1", blob, b"aad")
        with pytest.raises(ErasedError):
            r.seal("t1", b"more", b"aad")
    key_files = [p for p in (tmp_path / "keys" / "twin").rglob("*") if p.is_file()]
    assert key_files == []  # the key file is gone, not just forgotten


def test_kek_rotation_rewraps_every_key(tmp_path: Path) -> None:
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    blob = _ring(tmp_path, old).seal("t1", b"data", b"aad")
    with pytest.raises(CryptoError, match="does not have"):
        _ring(tmp_path, new).open("t1", blob, b"aad")
    assert _ring(tmp_path, new, previous=[old]).rewrap_all() >= 2  # the twin's and the index
    assert _ring(tmp_path, new).open("t1", blob, b"aad") == b"data"  # old KEK not needed


def test_raw_records_expire_with_their_epoch_key(tmp_path: Path) -> None:
    ring = _ring(tmp_path, epoch_days=7)
    now = datetime.now(UTC)
    old = ring.seal_raw(b"MSH|old", now=now - timedelta(days=9))
    new = ring.seal_raw(b"MSH|new", now=now)
    assert b"MSH" not in old and ring.open_raw(old) == b"MSH|old"
    assert ring.open_raw(b"MSH|clear") == b"MSH|clear"  # a site's own clear producer
    gone = ring.expire_epochs(now=now)
    assert gone == [f"epoch:{KeyRing.epoch_of(now - timedelta(days=9))}"]
    with pytest.raises(ErasedError, match="expired"):
        ring.open_raw(old)
    assert ring.open_raw(new) == b"MSH|new"


def test_a_key_missing_from_the_store_is_not_taken_for_an_erasure(tmp_path: Path) -> None:
    """Another process's key store (a misconfigured pod) must fail loudly, never drop data
    as if the patient had been erased."""
    kek = secrets.token_bytes(32)
    blob = _ring(tmp_path / "a", kek).seal("t1", b"data", b"aad")
    with pytest.raises(CryptoError, match="same FHIRTWIN_KEYSTORE") as info:
        _ring(tmp_path / "b", kek).open("t1", blob, b"aad")
    assert not isinstance(info.value, ErasedError)


def test_a_cluster_process_refuses_to_make_its_own_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    from fhirtwin.crypto import load_kek

    monkeypatch.setenv("FHIRTWIN_REQUIRE_KEYS", "1")
    monkeypatch.delenv("FHIRTWIN_KEK", raising=False)
    monkeypatch.delenv("FHIRTWIN_KEK_FILE", raising=False)
    with pytest.raises(CryptoError, match="FHIRTWIN_KEK or FHIRTWIN_KEK_FILE"):
        load_kek()


def test_processes_starting_at_once_on_a_fresh_home_share_one_kek(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fhirtwin up` starts every worker at the same moment on a new FHIRTWIN_HOME: none may
    crash on the KEK another one is creating, nor read it half written, and all must end up
    with the same key (else each would wrap data keys the others cannot open). Making a key
    is slowed down here so that the starts overlap every time."""
    import time

    from fhirtwin import crypto

    monkeypatch.setenv("FHIRTWIN_HOME", str(tmp_path))
    monkeypatch.delenv("FHIRTWIN_KEK", raising=False)
    monkeypatch.delenv("FHIRTWIN_KEK_FILE", raising=False)
    real = crypto.secrets.token_bytes

    def slow(n: int) -> bytes:
        time.sleep(0.3)
        return real(n)

    monkeypatch.setattr(crypto.secrets, "token_bytes", slow)
    got: list[bytes] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            got.append(crypto.load_kek()[0])
        except BaseException as exc:  # what a worker would die of
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.05)  # each one starts while the first is still making its key
    for t in threads:
        t.join(10)
    assert errors == [] and len(got) == 4
    assert len(set(got)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kek"]  # no temporary file left
    assert (tmp_path / "kek").stat().st_mode & 0o777 == 0o600


def test_a_kek_of_the_wrong_size_is_refused_with_a_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fhirtwin.crypto import load_kek

    monkeypatch.setenv("FHIRTWIN_KEK", base64.b64encode(b"short").decode())
    with pytest.raises(CryptoError, match=r"32 bytes.*fhirtwin keys new-kek"):
        load_kek()


# -- end to end: Redis and Kafka hold no PHI in clear; erasure survives a restored RDB ------


def _redis_values(client: Any) -> list[bytes]:
    """Every key name and the DUMP of every value."""
    out = []
    for key in client.scan_iter(count=1000):
        out += [key, client.dump(key) or b""]
    return out


def _kafka_bytes(bootstrap: str) -> list[bytes]:
    out = []
    topics = [*bus.ALL_TOPICS]
    for topic in topics:
        for rec in bus.read_topic(bootstrap, topic, timeout=3):
            out += [rec.key or b"", rec.value, *(v for _, v in rec.headers)]
    return out


def _leaks(blobs: list[bytes]) -> list[str]:
    return sorted({s.decode() for s in SECRETS for b in blobs if s in b})


def _save_rdb(client: Any, dest: Path) -> Path:
    client.config_set("rdbcompression", "no")  # so plaintext would show as it is
    client.save()
    src = Path(client.config_get("dir")["dir"]) / client.config_get("dbfilename")["dbfilename"]
    shutil.copy(src, dest)
    return dest


def _redis_from_rdb(rdb: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    workdir.mkdir()
    shutil.copy(rdb, workdir / "dump.rdb")
    port = free_port()
    proc = subprocess.Popen(
        [
            EmbeddedRedis.find_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(workdir),
            "--dbfilename",
            "dump.rdb",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_port("127.0.0.1", port, proc, "Redis from the old RDB")
    return proc, f"redis://127.0.0.1:{port}/0"


def test_no_phi_in_clear_in_redis_or_kafka_and_erasure_outlives_backups(
    kafka: str, redis_url: str, tmp_path: Path
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / f"{FAMILY.lower()}-{MRN}.hl7").write_bytes(_adt("Q1"))  # PHI in the file name too
    ingest(kafka, "hl7v2", [str(src)])
    drain(kafka, redis_url)
    client: Any = redis.Redis.from_url(redis_url)
    store = TwinStore(client)

    # The twin is whole, read through the store …
    twin = store.resolve(MRN)
    assert twin is not None
    patient = next(r for r in store.resources(twin) if r["resourceType"] == "Patient")
    assert patient["name"][0]["family"] == FAMILY and patient["birthDate"] == "1947-11-03"
    assert any(i.endswith(f"|{MRN}") for i in store.identifiers(twin))
    # … but neither Redis (keys, DUMPs, an RDB file) nor Kafka holds those values in clear.
    assert _leaks(_redis_values(client)) == []
    old_rdb = _save_rdb(client, tmp_path / "before-erasure.rdb")
    assert _leaks([old_rdb.read_bytes()]) == []
    assert _leaks(_kafka_bytes(kafka)) == []
    # (the same check does find them in clear where they are: the raw record, opened)
    raw = records(kafka, bus.RAW_TOPICS["hl7v2"])
    assert _leaks([r.value for r in raw]) == sorted([DOB, FAMILY, MRN])

    # Erase: the twin and its lookups go, subscribers are told, the audit records it.
    done = erase_patient(store, MRN, bootstrap=kafka, who="test", reason="GDPR art. 17")
    assert done.twin == twin and done.data_keys_destroyed == 1 and done.patient == patient["id"]
    assert store.resolve(MRN) is None and twin not in store.twins()
    assert store.holders(f"Patient/{patient['id']}") == []
    with pytest.raises(NotFound):
        erase_patient(store, MRN, bootstrap=kafka, who="test")
    erase_events = [
        orjson.loads(r.value)
        for r in records(kafka, bus.TWIN_EVENTS)
        if orjson.loads(r.value).get("type") == "erase"
    ]
    assert erase_events and erase_events[0]["twin"] == twin
    audit = [orjson.loads(r.value) for r in records(kafka, bus.AUDIT)]
    erasures = [a for a in audit if any(s["code"] == "erase" for s in a.get("subtype", []))]
    assert len(erasures) == 1 and erasures[0]["action"] == "D"
    assert erasures[0]["entity"][0]["what"]["reference"] == f"Patient/{patient['id']}"
    assert _leaks([orjson.dumps(a) for a in audit]) == []

    # Nothing of the patient comes back: not by a replay of the same message …
    (src / "again.hl7").write_bytes(_adt("Q2", "A08", "20261125090000"))
    ingest(kafka, "hl7v2", [str(src / "again.hl7")])
    drain(kafka, redis_url)
    assert store.resolve(MRN) is None and twin not in store.twins()
    # … not by a rebuild of Redis from fhir.resources (its events no longer open) …
    rebuild(kafka, redis_url)
    assert store.resolve(MRN) is None
    sealed = [r for r in records(kafka, bus.RESOURCES, sealed=True) if r.key == twin.encode()]
    assert sealed
    for rec in sealed:
        with pytest.raises(ErasedError):
            open_event(default_keyring(), twin, rec.value)
    # … and not from the RDB saved before the erasure, loaded into a fresh Redis.
    proc, url = _redis_from_rdb(old_rdb, tmp_path / "restored")
    try:
        restored = TwinStore(redis.Redis.from_url(url))
        assert restored.resolve(MRN) == twin  # the old lookups are there …
        assert restored.r.hlen(f"{restored.base(twin)}:cur") > 0  # … and the ciphertext …
        with pytest.raises(ErasedError):
            restored.resources(twin)  # … but nothing opens
        with pytest.raises(ErasedError):
            restored.identifiers(twin)
    finally:
        proc.terminate()
        proc.wait(10)


def test_erasure_takes_merged_twins_and_shared_lookups_with_it(
    kafka: str, redis_url: str, tmp_path: Path
) -> None:
    """A second MRN merged into the patient (A40) is erased with it; another patient stays."""
    other = _adt("O1").replace(MRN.encode(), b"MRNOTHER01").replace(FAMILY.encode(), b"Bystander")
    merged = _adt("M1").replace(MRN.encode(), b"MRNQ0000002")
    a40 = (
        _adt("M2", "A40", "20261125100000")
        .replace(b"OBX|1|NM|8867-4^Heart rate^LN||72|/min|||||F\r", b"")
        .replace(b"PV1|", b"MRG|MRNQ0000002^^^NORTHGATE^MR\rPV1|", 1)
    )
    for i, m in enumerate((other, _adt("Q1"), merged, a40)):
        (tmp_path / f"{i}.hl7").write_bytes(m)
    for i in range(4):
        ingest(kafka, "hl7v2", [str(tmp_path / f"{i}.hl7")])
        drain(kafka, redis_url)
    store = TwinStore(redis.Redis.from_url(redis_url))
    twin = store.resolve(MRN)
    assert twin is not None and store.resolve("MRNQ0000002") == twin  # merged
    bystander = store.resolve("MRNOTHER01")
    assert bystander and bystander != twin
    done = erase_patient(store, twin, bootstrap=kafka, who="test")
    assert len(done.twins) == 2 and done.data_keys_destroyed == 2
    assert store.resolve(MRN) is None and store.resolve("MRNQ0000002") is None
    assert store.resolve("MRNOTHER01") == bystander
    assert any(r["resourceType"] == "Patient" for r in store.resources(bystander))


@contextlib.contextmanager
def _publisher(kafka: str, redis_url: str) -> Iterator[None]:
    """The snapshot publisher, running in a thread for the duration of the block."""
    from fhirtwin.snapshot import SnapshotPublisher

    stop = threading.Event()
    thread = threading.Thread(target=SnapshotPublisher(kafka, redis_url).run, args=(stop,))
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)


def _care(**kw: Any) -> Any:
    """The "care" subscriber: treatment, default permit."""
    from fhirtwin.subscribers import make_subscriber

    return make_subscriber(
        "care",
        actor=["urn:oid:1.2.3.4|sim-care"],
        purpose=["TREAT"],
        scope="patient-privacy",
        default="permit",
        **kw,
    )


def test_erasure_tells_every_subscriber_that_had_the_patient(
    kafka: str, redis_url: str, tmp_path: Path
) -> None:
    """A subscriber that received the patient gets a withdrawal notice ``reason: erased``
    under the key it knows (the pseudonym, when de-identified); its pseudonym is forgotten."""
    from fhirtwin.snapshot import SNAPSHOT_GROUP
    from fhirtwin.subscribers import Registry, topic_for
    from tests.pipeline import wait_for

    (tmp_path / "a.hl7").write_bytes(_adt("Q1"))
    ingest(kafka, "hl7v2", [str(tmp_path / "a.hl7")])
    drain(kafka, redis_url)
    store = TwinStore(redis.Redis.from_url(redis_url))
    twin = store.resolve(MRN)
    assert twin
    reg = Registry.connect(redis_url)
    reg.put(_care())
    bus.ensure_topics(kafka, [topic_for("care")])
    with _publisher(kafka, redis_url):
        # the publisher only acts on change events: touch the twin so care gets a snapshot
        (tmp_path / "b.hl7").write_bytes(_adt("Q3", "A08", "20261125083000"))
        ingest(kafka, "hl7v2", [str(tmp_path / "b.hl7")])
        drain(kafka, redis_url)
        wait_for(lambda: reg.access("care", [twin]).get(twin) is True, what="care's snapshot")
        erase_patient(store, MRN, bootstrap=kafka, who="test", reason="asked")
        wait_for(
            lambda: (
                bus.group_lag(kafka, SNAPSHOT_GROUP, [bus.TWIN_EVENTS]) == 0
                and reg.access("care", [twin]).get(twin) is False
            ),
            what="the erasure notice",
        )
    notices = [
        orjson.loads(r.value)
        for r in records(kafka, topic_for("care"))
        if r.header("fhirtwin-kind") == "withdrawal"
    ]
    assert [n["reason"] for n in notices] == ["erased"]
    assert notices[0]["patient"] == twin  # care is not de-identified: it knows the twin id
    assert reg.r.get(f"{reg.key('care')}:pseudo:{twin}") is None


def test_snapshots_are_sealed_for_a_subscriber_with_an_encryption_key(
    kafka: str, redis_url: str, tmp_path: Path
) -> None:
    """With an encryption key registered, the subscriber's topic holds JWEs: nothing of the
    patient is in clear anywhere in Kafka, and the subscriber's private key opens them."""
    from joserfc.jwk import ECKey

    from fhirtwin.snapshot import SNAPSHOT_GROUP
    from fhirtwin.subscribers import (
        Registry,
        SubscriberError,
        make_subscriber,
        open_snapshot,
        topic_for,
    )
    from tests.pipeline import wait_for

    private = ECKey.generate_key("P-256")
    public = private.as_dict(private=False)
    with pytest.raises(SubscriberError, match="private key"):
        make_subscriber(
            "x", actor=["urn:oid:1.2|x"], purpose=["TREAT"], scope="patient-privacy",
            encryption_key=private.as_dict(private=True),
        )  # fmt: skip
    reg = Registry.connect(redis_url)
    reg.put(_care(encryption_key=public))
    bus.ensure_topics(kafka, [topic_for("care")])
    (tmp_path / "a.hl7").write_bytes(_adt("Q1"))
    ingest(kafka, "hl7v2", [str(tmp_path / "a.hl7")])
    drain(kafka, redis_url)
    twin = TwinStore(redis.Redis.from_url(redis_url)).resolve(MRN)
    with _publisher(kafka, redis_url):
        wait_for(
            lambda: (
                bus.group_lag(kafka, SNAPSHOT_GROUP, [bus.TWIN_EVENTS]) == 0
                and reg.access("care", [twin]).get(twin) is True
            ),
            what="care's snapshot",
        )
    [snap] = [
        r
        for r in bus.read_topic(kafka, topic_for("care"), timeout=3)
        if r.header("fhirtwin-kind") == "snapshot"
    ]
    assert snap.header("fhirtwin-encryption") == "jwe" and snap.value.count(b".") == 4
    everything = _kafka_bytes(kafka) + [
        b
        for r in bus.read_topic(kafka, topic_for("care"), timeout=3)
        for b in (r.key or b"", r.value)
    ]
    assert _leaks(everything) == []
    bundle = orjson.loads(open_snapshot(snap.value, private.as_dict(private=True)))
    assert bundle["resourceType"] == "Bundle"
    names = [
        e["resource"]["name"][0]["family"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Patient"
    ]
    assert names == [FAMILY]
