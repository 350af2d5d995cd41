"""Kill -9 the workers in the middle of 10,000 messages: nothing lost, nothing duplicated.

The workers run as real processes (`fhirtwin worker normalize|assemble`), as in
production. The reference is a clean run of the same feed on another broker and Redis;
twins are compared by patient identifier and content digest (twin ids are random UUIDs,
so they differ between runs by design).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Any

import redis

from fhirtwin import bus
from fhirtwin.assemble import AssembleWorker, rebuild
from fhirtwin.infra import EmbeddedKafka, EmbeddedRedis
from fhirtwin.normalize import NormalizeWorker
from fhirtwin.twin import TwinStore
from tests.pipeline import produce, wait_for
from tests.synth import feed

N, PATIENTS = 10_000, 400
RAW = bus.RAW_TOPICS["hl7v2"]


def worker(kind: str, kafka: str, redis_url: str) -> subprocess.Popen[bytes]:
    args = ["normalize", "--source", "hl7v2", "--no-validate"] if kind == "normalize" else [kind]
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fhirtwin.cli",
            "worker",
            *args,
            "--kafka",
            kafka,
            "--redis",
            redis_url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def end(kafka: str, topic: str) -> int:
    return sum(bus.end_offsets(kafka, topic).values())


def lag(kafka: str, group: str, topic: str) -> int:
    return bus.group_lag(kafka, group, [topic])


def twins_by_identifier(store: TwinStore) -> dict[tuple[str, ...], str]:
    return {tuple(store.identifiers(t)): store.digest(t) for t in store.twins()}


def message_headers(store: TwinStore) -> int:
    return sum(store.counts(t).get("MessageHeader", 0) for t in store.twins())


def clean_run(messages: list[bytes]) -> dict[tuple[str, ...], str]:
    with EmbeddedKafka() as k, EmbeddedRedis(prefer_existing=False) as r:
        bus.ensure_topics(k.bootstrap)
        produce(k.bootstrap, RAW, messages)
        stop = threading.Event()
        assembler = AssembleWorker(k.bootstrap, r.url)
        t = threading.Thread(target=assembler.run, args=(stop,))
        t.start()
        try:
            NormalizeWorker(k.bootstrap, r.url, validate=False).run(threading.Event(), idle_exit=2)
            wait_for(lambda: lag(k.bootstrap, "fhirtwin-assemble", bus.RESOURCES) == 0, 120)
        finally:
            stop.set()
            t.join(30)
        store = TwinStore(redis.Redis.from_url(r.url))
        assert message_headers(store) == len(messages)
        return twins_by_identifier(store)


def test_kill_9_workers_mid_run_loses_and_duplicates_nothing(kafka: str, redis_url: str) -> None:
    messages = feed(N, PATIENTS)
    produce(kafka, RAW, messages)
    procs: dict[str, Any] = {
        "normalize": worker("normalize", kafka, redis_url),
        "assemble": worker("assemble", kafka, redis_url),
    }
    try:
        # kill -9 the normalize worker once a third of the feed is through it…
        wait_for(lambda: end(kafka, bus.RESOURCES) >= N // 3, 300, "a third normalized")
        procs["normalize"].send_signal(signal.SIGKILL)
        procs["normalize"].wait()
        procs["normalize"] = worker("normalize", kafka, redis_url)
        # …and the assembler once two thirds are
        wait_for(lambda: end(kafka, bus.RESOURCES) >= 2 * N // 3, 300, "two thirds normalized")
        procs["assemble"].send_signal(signal.SIGKILL)
        procs["assemble"].wait()
        procs["assemble"] = worker("assemble", kafka, redis_url)
        wait_for(lambda: lag(kafka, "fhirtwin-normalize-hl7v2", RAW) == 0, 300, "normalize")
        wait_for(lambda: lag(kafka, "fhirtwin-assemble", bus.RESOURCES) == 0, 300, "assemble")
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(30)

    store = TwinStore(redis.Redis.from_url(redis_url))
    assert end(kafka, bus.RESOURCES) >= N  # at least once: a killed batch may be redone
    assert list(bus.read_topic(kafka, bus.DEADLETTER, timeout=2)) == []
    assert message_headers(store) == N  # every message made it, once
    faulted = twins_by_identifier(store)
    assert len(faulted) == PATIENTS
    assert faulted == clean_run(messages)

    # Flush Redis and rebuild from Kafka: equal again.
    result = rebuild(kafka, redis_url)
    assert result["twins"] == PATIENTS
    assert twins_by_identifier(store) == faulted
