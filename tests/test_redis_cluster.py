"""fhirtwin on a real Redis Cluster: three masters on loopback, the real pipeline against it.

The cluster is three ``redis-server`` (or valkey-server) processes with
``--cluster-enabled yes``, each given a third of the 16384 slots (CLUSTER ADDSLOTSRANGE) and
joined with CLUSTER MEET. Skipped (visibly) only when no server binary runs in cluster mode.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fhirtwin import bus
from fhirtwin.assemble import rebuild
from fhirtwin.audit import CLUSTER_NODES, CLUSTER_SIZE, NODES, SIZE, RedisNodeStore
from fhirtwin.erasure import erase_patient
from fhirtwin.infra import EmbeddedRedis, InfraError, free_port
from fhirtwin.ingest import ingest
from fhirtwin.merkle import MerkleLog, leaf_hash
from fhirtwin.merkle import root as merkle_root
from fhirtwin.mpi import Resolver
from fhirtwin.redisconn import cluster_url, connect, is_cluster, mget, multi
from fhirtwin.subscribers import Registry, make_subscriber
from fhirtwin.twin import TWIN_SUFFIXES, TwinStore
from tests.pipeline import drain, produce, records

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "hl7v2"
RAW = bus.RAW_TOPICS["hl7v2"]
SLOTS = 16384


class LocalCluster:
    """Three cluster-enabled servers on free loopback ports, in temp dirs; no replicas."""

    def __init__(self, binary: str, masters: int = 3) -> None:
        self.binary = binary
        self.ports = [free_port() for _ in range(masters)]
        self.bus_ports = [free_port() for _ in range(masters)]  # not port + 10000
        self.procs: list[subprocess.Popen[bytes]] = []
        self.dirs: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0?cluster=yes"

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def start(self) -> LocalCluster:
        for port, bus_port in zip(self.ports, self.bus_ports, strict=True):
            workdir = tempfile.mkdtemp(prefix="fhirtwin-cluster-")
            self.dirs.append(workdir)
            proc = subprocess.Popen(
                [
                    self.binary,
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    str(bus_port),
                    "--cluster-config-file",
                    f"{workdir}/nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    workdir,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            self.procs.append(proc)
        for port, proc in zip(self.ports, self.procs, strict=True):
            self._wait_ping(port, proc)
        # a third of the slots each, then one MEET per other node
        per = SLOTS // len(self.ports)
        for i, port in enumerate(self.ports):
            lo, hi = i * per, (SLOTS - 1 if i == len(self.ports) - 1 else (i + 1) * per - 1)
            self.node(port).execute_command("CLUSTER ADDSLOTSRANGE", lo, hi)
        first = self.node(self.ports[0])
        for port, bus_port in zip(self.ports[1:], self.bus_ports[1:], strict=True):
            first.execute_command("CLUSTER MEET", "127.0.0.1", port, bus_port)
        self._wait_ok()
        return self

    def _wait_ping(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")
                raise InfraError(f"{self.binary} exited in cluster mode: {err[-500:]}")
            try:
                if self.node(port).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise InfraError(f"{self.binary} did not answer on port {port}")

    def _wait_ok(self) -> None:
        """Every node: cluster_state:ok and the same three masters covering all slots."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            infos = [self.node(p).cluster("info") for p in self.ports]
            slots = [self.node(p).cluster("slots") for p in self.ports]
            if all(i["cluster_state"] == "ok" for i in infos) and all(
                len(s) == len(self.ports) for s in slots
            ):
                return
            time.sleep(0.1)
        raise AssertionError(f"the cluster did not reach cluster_state:ok: {infos}")

    def flush(self) -> None:
        for port in self.ports:
            self.node(port).flushall()

    def keys_by_node(self) -> list[set[bytes]]:
        return [set(self.node(p).scan_iter(count=1000)) for p in self.ports]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(8)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stderr:
                proc.stderr.close()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def _cluster() -> Iterator[LocalCluster]:
    try:
        binary = EmbeddedRedis.find_binary()
    except InfraError as exc:
        pytest.skip(f"no redis-server/valkey-server to run a Redis Cluster: {exc}")
    cluster = LocalCluster(binary)
    try:
        cluster.start()
    except InfraError as exc:
        cluster.stop()
        pytest.skip(f"{binary} does not run in cluster mode here: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(_cluster: LocalCluster) -> LocalCluster:
    """The module's cluster, emptied for this test."""
    _cluster.flush()
    return _cluster


def _on_nodes(cluster: LocalCluster, pred: Any) -> list[int]:
    """How many keys matching ``pred`` each node holds."""
    return [sum(1 for k in keys if pred(k)) for keys in cluster.keys_by_node()]


# -- the factory ---------------------------------------------------------------------------


def test_connect_chooses_the_client_from_the_url_and_the_environment(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = f"redis://127.0.0.1:{cluster.ports[1]}/0"
    monkeypatch.delenv("FHIRTWIN_REDIS_CLUSTER", raising=False)
    assert not is_cluster(connect(plain))
    assert is_cluster(connect(cluster.url))
    assert cluster_url(cluster.url) == (f"redis://127.0.0.1:{cluster.ports[0]}/0", True)
    # what the Helm chart sets (configmap.yaml: FHIRTWIN_REDIS_CLUSTER from redis.cluster.enabled)
    monkeypatch.setenv("FHIRTWIN_REDIS_CLUSTER", "true")
    client = connect(plain)
    assert is_cluster(client)
    assert {n.port for n in client.get_primaries()} == set(cluster.ports)
    assert not is_cluster(connect(plain + "?cluster=false"))  # the URL wins
    assert not is_cluster(connect(plain, use_env=False))  # the key store's URL alone decides
    monkeypatch.setenv("FHIRTWIN_REDIS_CLUSTER", "false")
    assert not is_cluster(connect(plain))
    # no node answers: a ConnectionError, as for a single server
    with pytest.raises(redis.ConnectionError):
        connect(f"redis://127.0.0.1:{free_port()}/0?cluster=1")
    with pytest.raises(redis.ConnectionError, match="db"):
        connect(f"redis://127.0.0.1:{cluster.ports[0]}/3?cluster=1")

    # an ACL user (what a component gets: +@all -@dangerous suffices for a cluster client,
    # whose CLUSTER SLOTS and COMMAND are not dangerous), its password in the URL or beside it
    for port in cluster.ports:
        cluster.node(port).acl_setuser(
            "ft-assemble", enabled=True, passwords=["+s3cret"], keys=["ft:*"],
            commands=["+@all", "-@dangerous"], reset=True,
        )  # fmt: skip
    user = f"redis://ft-assemble:s3cret@127.0.0.1:{cluster.ports[2]}/0?cluster=yes"
    assert connect(user).set("ft:acl", 1) and connect(user).get("ft:acl") == b"1"
    monkeypatch.setenv("FHIRTWIN_REDIS_PASSWORD", "s3cret")
    assert connect(f"redis://ft-assemble@127.0.0.1:{cluster.ports[1]}/0?cluster=yes").get("ft:acl")
    with pytest.raises(redis.RedisError):
        connect(f"redis://ft-assemble:wrong@127.0.0.1:{cluster.ports[1]}/0?cluster=yes").get("x")
    with pytest.raises(redis.RedisError):  # the key store does not take the data's password
        connect(f"redis://ft-assemble@127.0.0.1:{cluster.ports[1]}/0?cluster=1", use_env=False)


def test_multi_key_helpers_span_slots(cluster: LocalCluster) -> None:
    client = connect(cluster.url)
    keys = [f"ft:id:{i}" for i in range(40)]
    slots = {client.keyslot(k) for k in keys}
    assert len(slots) > 10
    # what the plain commands do on a cluster: refused
    with pytest.raises(redis.RedisClusterException):
        client.mget(keys)
    from fhirtwin.redisconn import mset

    mset(client, {k: k.upper() for k in keys})
    assert mget(client, [*keys, "ft:id:none"]) == [k.upper().encode() for k in keys] + [None]
    assert min(_on_nodes(cluster, lambda k: k.startswith(b"ft:id:"))) > 0  # on every master
    pipe = multi(client)
    pipe.set("ft:sub:x", 1)
    pipe.sadd("ft:sub:_ids", "x")
    assert pipe.execute() == [True, 1]


def test_merge_and_unmerge_on_a_redis_cluster(cluster: LocalCluster) -> None:
    """The unmerge's staging keys and swap script share the twin's slot; the index writes
    (identifiers, the reference index) span slots."""
    from tests.test_unmerge import GONE, KEEP, merged_by_mistake, refs

    store = TwinStore(connect(cluster.url))
    keep_before, _ = merged_by_mistake(store)
    assert store.resolve("M2") == KEEP
    store.unmerge(GONE, KEEP, known_ms=40, reason={})
    assert sorted(store.twins()) == sorted([KEEP, GONE])
    assert store.digest(KEEP) == keep_before
    assert "Condition/c2" in refs(store.resources(GONE))
    assert store.resolve("M2") == GONE and store.holders("Condition/c2") == [GONE]


# -- the pipeline --------------------------------------------------------------------------


def test_the_pipeline_runs_on_a_redis_cluster(kafka: str, cluster: LocalCluster) -> None:
    url = cluster.url
    messages = ingest(kafka, "hl7v2", [str(EXAMPLES)])["records"]
    normalized, assembled = drain(kafka, url, validate=True)
    assert normalized == assembled == messages
    assert records(kafka, bus.DEADLETTER) == []

    store = TwinStore(connect(url))
    assert is_cluster(store.r)
    twin = store.resolve("MRN448812")
    assert twin is not None
    assert store.resolve("urn:oid:2.16.840.1.113883.3.9001.1|MRN448812") == twin
    other = store.resolve("MRN550021")
    assert other is not None and other != twin
    assert sorted(store.twins()) == sorted([twin, other])
    assert store.identifiers(twin) == ["urn:oid:2.16.840.1.113883.3.9001.1|MRN448812"]
    resources = store.resources(twin)
    types = {r["resourceType"] for r in resources}
    assert {"Patient", "Encounter", "Observation"} <= types
    assert "finished" in {r["status"] for r in resources if r["resourceType"] == "Encounter"}
    assert store.state(twin)["problems"] and store.timeline(twin)
    # one twin's keys are in one slot (one node); the data as a whole is spread
    slots = {store.r.keyslot(f"{store.base(twin)}:{s}") for s in TWIN_SUFFIXES}
    assert len(slots) == 1
    assert sum(1 for n in _on_nodes(cluster, lambda k: k.startswith(b"ft:")) if n) >= 2

    # the API's view stamp (a script over five keys of the twin)
    from fhirtwin.api import FhirApi

    registry = Registry(connect(url))
    api = FhirApi(store, registry, audit=lambda _events: None)
    stamps = api.stamps([twin, other, twin])
    assert stamps[0] == stamps[2] != stamps[1] and len(stamps[0]) == 40

    # a subscriber registered, its per-twin state kept, forgotten, removed
    sub = make_subscriber(
        "care", actor=["urn:oid:1.2.3.4|sim-care"], purpose=["TREAT"], scope="patient-privacy"
    )
    registry.put(sub)
    assert registry.get("care") == sub and [s.id for s in registry.all()] == ["care"]
    pseudo = registry.pseudonym("care", twin)
    assert registry.pseudonym("care", twin) == pseudo
    assert set(registry.resource_ids("care", twin, ["Patient/a", "Patient/b"])) == {
        "Patient/a",
        "Patient/b",
    }
    registry.set_access([("care", twin, True), ("care", other, False)])
    assert registry.access("care", [twin, other]) == {twin: True, other: False}
    registry.pseudonym("care", other)
    registry.forget_twin(other)
    assert registry.access("care", [other]) == {other: False}
    assert registry.remove("care") is True
    assert registry.get("care") is None and registry.all() == []
    assert _on_nodes(cluster, lambda k: k.startswith(b"ft:sub:")) == [0, 0, 0]
    assert registry.remove("care") is False

    # MPI merge (A40): the MPI's writes and reads of ft:id:* cross slots
    a01 = (EXAMPLES / "adt-a01-admit.hl7").read_bytes()
    dup = a01.replace(b"MRN448812", b"MRN999001").replace(b"ADT0001", b"ADT0901")
    produce(kafka, RAW, [dup])
    drain(kafka, url)
    merged = store.resolve("MRN999001")
    assert merged is not None and merged not in (twin, other)
    a40 = (
        b"MSH|^~\\&|EPICADT|NORTHGEN|FHIRTWIN|TWINHUB|20261110100000-0500||ADT^A40^ADT_A39|"
        b"MRG0001|P|2.5.1\r"
        b"EVN|A40|20261110100000-0500\r"
        b"PID|1||MRN448812^^^NORTHGEN&2.16.840.1.113883.3.9001.1&ISO^MR||Okafor^Adaeze\r"
        b"MRG|MRN999001^^^NORTHGEN&2.16.840.1.113883.3.9001.1&ISO^MR\r"
    )
    produce(kafka, RAW, [a40])
    drain(kafka, url)
    assert sorted(store.twins()) == sorted([twin, other])
    assert store.resolve("MRN999001") == twin and store.resolve(merged) == twin
    assert len([r for r in store.resources(twin) if r["resourceType"] == "Patient"]) == 2
    assert any(link.get("rule") == "merge" for link in store.links(twin))

    # flush + rebuild from fhir.resources: the same twins
    before = {t: store.digest(t) for t in store.twins()}
    assert store.flush() > 0
    assert _on_nodes(cluster, lambda k: k.startswith((b"ft:{", b"ft:id:", b"ft:ref:"))) == [
        0,
        0,
        0,
    ]
    assert store.twins() == []
    result = rebuild(kafka, url, flush=True)
    assert result["twins"] == 2
    assert {t: store.digest(t) for t in store.twins()} == before

    # erasure: every key of the twin (and of the one merged into it) on every node goes
    erased = erase_patient(store, "MRN448812", bootstrap=kafka, who="test", reason="test")
    assert erased.twin == twin and set(erased.twins) == {twin, merged}
    assert erased.keys_deleted > 0 and erased.data_keys_destroyed == 2
    assert store.twins() == [other]
    assert store.resolve("MRN448812") is None
    for t in (twin, merged):
        left = _on_nodes(cluster, lambda k, t=t: k.startswith(f"ft:{{{t}}}".encode()))
        assert sum(left) == 1  # only the tombstone ft:{T}:erased
        assert store.r.exists(f"{store.base(t)}:erased") == 1
    resolver = Resolver(connect(url))
    identity = resolver.resolve(
        [{"resourceType": "Patient", "id": "p", "identifier": []}],
        ["urn:oid:2.16.840.1.113883.3.9001.1|MRN448812"],
    )
    assert identity is not None and identity.rule == "erased"
    # a replayed message of the erased patient starts no new twin
    produce(kafka, RAW, [a01])
    drain(kafka, url)
    assert store.twins() == [other]
    # and a rebuild does not bring it back
    assert rebuild(kafka, url)["twins"] == 1
    assert store.twins() == [other] and store.digest(other) == before[other]


# -- the other stores: audit tree, key store, auth, dead letters ---------------------------------


def test_audit_tree_keystore_and_clients_on_a_redis_cluster(cluster: LocalCluster) -> None:
    client = connect(cluster.url)
    # the audit tree's commit script: its two keys share a hash tag on a cluster
    store = RedisNodeStore(client)
    assert (store.nodes_key, store.size_key) == (CLUSTER_NODES, CLUSTER_SIZE)
    assert client.keyslot(CLUSTER_NODES) == client.keyslot(CLUSTER_SIZE)
    assert (NODES, SIZE) == ("ft:audit:nodes", "ft:audit:size")  # a single server: as before
    with pytest.raises(redis.RedisClusterException, match="slot"):  # why the tag is needed
        client.eval("return redis.call('GET', KEYS[2])", 2, NODES, SIZE)
    entries = [f"event {i}".encode() for i in range(13)]
    log = MerkleLog(store)
    log.extend(entries[:5])
    log.extend(entries[5:])
    assert store.size() == 13
    assert MerkleLog(RedisNodeStore(connect(cluster.url))).root() == merkle_root(
        leaf_hash(e) for e in entries
    )

    # the key store (its own URL decides: here a cluster too)
    from fhirtwin.crypto import RedisKeyStore

    keys = RedisKeyStore(cluster.url)
    assert is_cluster(keys.r)
    for i in range(6):
        keys.put_new(f"twin:t{i}", f"k{i}".encode())
    assert sorted(keys.names("twin:")) == [f"twin:t{i}" for i in range(6)]
    assert keys.destroy("twin:t3") is True
    assert keys.erased("twin:t3") and keys.get("twin:t3") is None
    assert keys.destroy("twin:t3") is False

    # API clients (auth): record + index written and removed together
    from joserfc.jwk import ECKey

    from fhirtwin.auth import Authority

    authority = Authority(client, token_url="http://127.0.0.1:1/auth/token")
    public = dict(ECKey.generate_key("P-384", auto_kid=True).as_dict(private=False))
    for name in ("app-a", "app-b", "app-c"):
        authority.register_client(name, {"keys": [public]}, ["system/*.rs"], None)
    assert [c["client_id"] for c in authority.clients()] == ["app-a", "app-b", "app-c"]
    assert authority.remove_client("app-b") is True
    assert authority.remove_client("app-b") is False
    assert [c["client_id"] for c in authority.clients()] == ["app-a", "app-c"]

    # dead-letter bookkeeping
    from fhirtwin.deadletter import REPLAYED, replayed_ids

    client.sadd(REPLAYED, "0:1", "2:3")
    assert replayed_ids(cluster.url) == {"0:1", "2:3"}
