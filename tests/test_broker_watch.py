"""`fhirtwin up` watches the embedded broker: Tansu in memory keeps every record and lists a
partition's stored batches on each fetch, so it costs more the longer a feed runs. When its
CPU or memory passes a limit, up says so on stderr and on /health, and says what to do.
Real processes stand in for the broker here: a busy loop and a sleeper."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from fhirtwin.infra import proc_usage
from fhirtwin.up import BrokerWatch, Supervisor, UpConfig


def _process(code: str) -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", code])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def busy() -> Iterator[int]:
    yield from _process("while True: pass")


@pytest.fixture
def idle() -> Iterator[int]:
    yield from _process("import time; time.sleep(60)")


def test_usage_is_read_from_proc(busy: int) -> None:
    time.sleep(0.5)
    got = proc_usage(busy)
    assert got is not None
    cpu, rss = got
    assert cpu > 0.1  # it has been spinning for half a second
    assert 1 << 20 < rss < 1 << 30  # a Python interpreter: some MiB


def test_a_busy_broker_is_reported_with_what_to_do(busy: int) -> None:
    watch = BrokerWatch(busy, cores=0.2, window=1.0)
    assert watch.sample() == ""  # one sample says nothing about a rate
    time.sleep(1.5)
    warning = watch.sample()
    assert "cores over the last" in warning
    assert "--kafka HOST:PORT" in warning and "Apache Kafka" in warning
    assert watch.warning == warning


def test_a_quiet_broker_is_not_reported_until_its_memory_passes_the_limit(idle: int) -> None:
    watch = BrokerWatch(idle, cores=0.2, window=1.0)
    watch.sample()
    time.sleep(1.5)
    assert watch.sample() == ""
    watch.rss = 1 << 20  # a limit its interpreter already passes
    assert "GiB in memory" in watch.sample()
    assert "cores" not in watch.warning


def test_a_broker_that_is_gone_reports_nothing() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    watch = BrokerWatch(proc.pid, rss=0)
    assert watch.sample() == "" and watch.warning == ""


def test_up_shows_the_warning_on_health_and_prints_it(
    idle: int, kafka: str, redis_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    sup = Supervisor(UpConfig(kafka=kafka, redis=redis_url))
    sup.bootstrap, sup.redis_url = kafka, redis_url
    assert "warnings" not in sup.health()
    sup.broker_watch = BrokerWatch(idle, rss=1 << 20)
    runner = threading.Thread(target=sup.supervise)
    runner.start()
    try:
        deadline = time.monotonic() + 20
        # the loop samples every 5 s: wait for a second sample, which must not print again
        while len(sup.broker_watch.samples) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        health = sup.health()
    finally:
        sup.stop_event.set()
        runner.join(10)
    assert health["status"] == "ok"  # it works, only slower: not a failure
    assert health["warnings"] == [sup.broker_watch.warning]
    err = capfd.readouterr().err
    assert "fhirtwin up: warning: the embedded Kafka (Tansu, in memory) holds" in err
    assert err.count("fhirtwin up: warning:") == 1  # said once, not at every sample
