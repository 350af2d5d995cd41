"""End to end over MLLP: the corpus's HL7 v2 messages → ACKs → Kafka → twins in Redis.

Also `fhirtwin up` itself: it starts, answers /health and /metrics, and Ctrl-C stops
every part it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from fhirtwin import bus
from fhirtwin.conversion import convert_hl7v2
from fhirtwin.hl7v2 import split_batch
from fhirtwin.infra import free_port
from fhirtwin.mllp import MLLPServer, ack_code, send
from fhirtwin.twin import TwinStore
from tests.pipeline import drain, records, wait_for

RAW = bus.RAW_TOPICS["hl7v2"]


def corpus_messages(corpus: Path) -> list[bytes]:
    files = sorted(corpus.glob("**/*.hl7"))
    files += sorted((corpus / "hl7-v2-to-fhir/samples/messages").glob("*.txt"))
    return [m for f in files for m in split_batch(f.read_bytes())]


@pytest.mark.corpus
def test_corpus_over_mllp_lands_in_twins(corpus: Path, kafka: str, redis_url: str) -> None:
    messages = corpus_messages(corpus)
    assert len(messages) >= 100
    stop = threading.Event()
    ports: list[int] = []
    server = MLLPServer(kafka, host="127.0.0.1", port=0)
    thread = threading.Thread(target=server.run, args=(stop, ports.append))
    thread.start()
    try:
        wait_for(lambda: bool(ports), 30, "the MLLP listener")
        acks = send("127.0.0.1", ports[0], messages, window=8, timeout=30)
    finally:
        stop.set()
        thread.join(30)
    codes = [ack_code(a) for a in acks]
    assert codes == ["AA"] * len(messages)  # every corpus message is readable HL7 v2

    # ACK means durable: every message is on the raw topic, byte for byte
    raw = records(kafka, RAW)
    assert sorted(r.value for r in raw) == sorted(messages)

    drain(kafka, redis_url, validate=True, idle=3.0)
    assert records(kafka, bus.DEADLETTER) == []
    store = TwinStore(redis.Redis.from_url(redis_url))
    twin_of_record = {}
    for rec in records(kafka, bus.RESOURCES):
        event = orjson.loads(rec.value)
        twin_of_record[event["source"]["record"]] = event["twin"]
    assert len(twin_of_record) == len(messages)  # one event per message
    missing = []
    for rec in raw:
        bundle = convert_hl7v2(rec.value).bundle
        twin = twin_of_record[rec.ref]
        twin = store.resolve(twin) or twin
        held = {f"{r['resourceType']}/{r['id']}" for r in store.resources(twin)}
        for entry in bundle["entry"]:
            res = entry["resource"]
            ref = f"{res['resourceType']}/{res['id']}"
            if ref not in held:
                missing.append(f"{rec.ref}: {ref}")
    assert not missing, f"{len(missing)} resources not in their twin, e.g. {missing[:5]}"
    assert len(store.twins()) > 10


def test_fhirtwin_up_starts_serves_health_and_stops_cleanly(tmp_path: Path) -> None:
    mllp_port, http_port = free_port(), free_port()
    env = {**os.environ, "FHIRTWIN_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("FHIRTWIN_KAFKA", None)
    env.pop("FHIRTWIN_REDIS", None)
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fhirtwin.cli",
            "up",
            "--mllp-port",
            str(mllp_port),
            "--http-port",
            str(http_port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        state = tmp_path / "up.json"
        wait_for(state.exists, 60, "fhirtwin up to write its state file")
        info = orjson.loads(state.read_bytes())
        health: dict[str, object] = {}

        def healthy() -> bool:
            try:
                r = httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=2)
            except httpx.HTTPError:
                return False
            health.update(r.json())
            return r.status_code == 200

        wait_for(healthy, 60, "/health to say ok")
        assert health["status"] == "ok"
        # send one message over MLLP once the listener is up
        msg = (Path(__file__).parent.parent / "examples/hl7v2/adt-a01-admit.hl7").read_bytes()
        deadline = time.monotonic() + 30
        while True:
            try:
                acks = send("127.0.0.1", mllp_port, [msg])
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        assert ack_code(acks[0]) == "AA"
        store = TwinStore(redis.Redis.from_url(info["redis"]))
        wait_for(lambda: store.resolve("MRN448812") is not None, 60, "the twin")
        metrics = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=5).text
        assert 'fhirtwin_mllp_acks_total{code="AA"}' in metrics
        assert "fhirtwin_twin_updates_total" in metrics
        pids = [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-P", str(up.pid)], capture_output=True, text=True
            ).stdout.split()
        ]
        assert len(pids) >= 3  # mllp, assemble, normalize (+ the servers it started)
    finally:
        up.send_signal(signal.SIGINT)
        output, _ = up.communicate(timeout=60)
    assert up.returncode == 0, output.decode()
    assert not state.exists()  # it cleaned up after itself
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
