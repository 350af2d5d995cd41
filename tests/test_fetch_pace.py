"""Fetch pacing: the workers of the embedded default fetch each partition at most every
100 ms (Tansu lists a partition's stored batches on each fetch that finds records); a site
on Apache Kafka keeps librdkafka's defaults. The last test runs a paced consumer group
against a real Tansu and counts the fetch requests librdkafka reports."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from fhirtwin import bus
from fhirtwin.infra import EmbeddedKafka
from fhirtwin.up import EMBEDDED_FETCH_PACE_MS, Supervisor, UpConfig


def test_no_pace_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FHIRTWIN_FETCH_PACE_MS", raising=False)
    assert bus.fetch_pace_ms() == 0
    assert bus.paced(0) == {}
    monkeypatch.setenv("FHIRTWIN_FETCH_PACE_MS", "250")
    assert bus.fetch_pace_ms() == 250
    assert bus.paced(250) == {"queued.min.messages": 1, "fetch.queue.backoff.ms": 250}


def test_a_bad_pace_says_what_to_give(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIRTWIN_FETCH_PACE_MS", "fast")
    with pytest.raises(ValueError, match=r"FHIRTWIN_FETCH_PACE_MS='fast'.*whole number of ms"):
        bus.fetch_pace_ms()


def test_up_paces_its_workers_only_on_the_embedded_broker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FHIRTWIN_FETCH_PACE_MS", raising=False)
    external = Supervisor(UpConfig(kafka="kafka.example:9092", redis="redis://x"))
    assert "FHIRTWIN_FETCH_PACE_MS" not in external.child_env()
    embedded = Supervisor(UpConfig())
    embedded.kafka = EmbeddedKafka()  # not started: child_env only asks whether there is one
    assert embedded.child_env()["FHIRTWIN_FETCH_PACE_MS"] == str(EMBEDDED_FETCH_PACE_MS)
    monkeypatch.setenv("FHIRTWIN_FETCH_PACE_MS", "0")  # the operator's choice wins
    assert embedded.child_env()["FHIRTWIN_FETCH_PACE_MS"] == "0"


def _fetches(bootstrap: str, pace_ms: int, seconds: float) -> tuple[int, int, int]:
    """(fetch requests sent, records produced, records consumed) while a producer writes
    one record every 5 ms and a consumer follows with ``pace_ms``."""
    topic = f"pace.{uuid.uuid4().hex[:8]}"
    bus.ensure_topics(bootstrap, [topic], partitions=1)
    fetches = [0]

    def stats(js: str) -> None:
        for broker in json.loads(js).get("brokers", {}).values():
            if broker.get("nodeid", -1) >= 0:
                fetches[0] = broker["req"].get("Fetch", 0)

    cons = bus.consumer(
        bootstrap, f"g-{topic}", pace_ms=pace_ms, stats_cb=stats, **{"statistics.interval.ms": 500}
    )
    cons.subscribe([topic])
    prod = bus.producer(bootstrap, linger_ms=0)
    stop = threading.Event()
    produced = [0]

    def produce() -> None:
        while not stop.is_set():
            prod.produce(topic, b"x" * 100)
            prod.poll(0)
            produced[0] += 1
            time.sleep(0.005)
        prod.flush(10)

    consumed = 0
    deadline = time.monotonic() + 30
    while not cons.assignment() and time.monotonic() < deadline:
        cons.poll(0.1)
    thread = threading.Thread(target=produce)
    thread.start()
    start = None
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for m in cons.consume(100, 0.02):
            if m.error() is None:
                consumed += 1
        if start is None:
            start = fetches[0]
    stop.set()
    thread.join()
    t = time.monotonic() + 5
    while consumed < produced[0] and time.monotonic() < t:
        consumed += sum(m.error() is None for m in cons.consume(100, 0.1))
    cons.poll(0.6)  # one more statistics report
    n = fetches[0] - (start or 0)
    cons.close()
    return n, produced[0], consumed


def test_a_paced_consumer_fetches_less_and_still_gets_everything() -> None:
    with EmbeddedKafka() as kafka:
        eager, made, got = _fetches(kafka.bootstrap, 0, 4.0)
        assert got == made
        paced, made, got = _fetches(kafka.bootstrap, 200, 4.0)
        assert got == made, "a paced consumer lost records"
    # ~200 records/s: an eager consumer fetches about once per record, a paced one about
    # five times a second
    assert paced * 3 < eager, (paced, eager)
    assert paced <= 4.0 * 1000 / 200 * 2, paced


def test_up_passes_the_batch_wait_to_its_mllp_listener() -> None:
    """`fhirtwin up --batch-wait-ms` reaches the listener's own option (which parses it);
    without it the listener keeps its default."""
    import typer.main

    from fhirtwin.cli import app

    def mllp_args(cfg: UpConfig) -> list[str]:
        (child,) = [c for c in Supervisor(cfg).plan() if c.name == "mllp"]
        return child.argv[child.argv.index("mllp") + 1 :]

    assert "--batch-wait-ms" not in mllp_args(UpConfig())
    args = mllp_args(UpConfig(batch_wait_ms=15))
    assert args[args.index("--batch-wait-ms") + 1] == "15"
    command = typer.main.get_command(app).commands["mllp"]  # type: ignore[attr-defined]
    ctx = command.make_context("mllp", list(args))
    assert ctx.params["batch_wait_ms"] == 15.0
