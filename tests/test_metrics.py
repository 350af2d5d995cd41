"""Metrics, health endpoints and JSON logs (fhirtwin/metrics.py, fhirtwin/logs.py).

The last test starts `fhirtwin up`, scrapes /metrics, feeds it a little (two good HL7 v2
messages over MLLP, two broken ones through `fhirtwin ingest`), scrapes again and checks
that the counters the runbook relies on moved.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fhirtwin import logs, metrics
from fhirtwin.conversion import convert_hl7v2
from fhirtwin.infra import free_port
from fhirtwin.mllp import ack_code, send

ROOT = Path(__file__).resolve().parent.parent


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(
    snap: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return sum(
        v
        for (n, lab), v in snap.items()
        if n == name and all(dict(lab).get(k) == val for k, val in labels.items())
    )


# -- /health, /ready, /metrics on --metrics-port -------------------------------------------


def test_worker_port_serves_health_ready_and_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setattr(metrics, "_ready", False)
    monkeypatch.setattr(metrics, "_last_beat", None)
    monkeypatch.setattr(metrics, "_checks", {})
    server = metrics.serve(port)
    assert server is not None
    base = f"http://127.0.0.1:{port}"
    try:
        assert httpx.get(f"{base}/health").status_code == 200  # alive while starting
        r = httpx.get(f"{base}/ready")
        assert r.status_code == 503 and r.json()["failed"] == ["starting"]
        metrics.set_ready()
        assert httpx.get(f"{base}/ready").status_code == 200
        metrics.add_ready_check("redis", lambda: False)
        assert httpx.get(f"{base}/ready").json() == {"status": "not ready", "failed": ["redis"]}
        metrics.add_ready_check("redis", lambda: True)
        assert httpx.get(f"{base}/ready").status_code == 200

        metrics.beat()
        assert httpx.get(f"{base}/health").status_code == 200
        monkeypatch.setenv("FHIRTWIN_LIVENESS_SECONDS", "0.05")
        time.sleep(0.1)  # the loop stopped turning: liveness fails, Kubernetes restarts it
        r = httpx.get(f"{base}/health")
        assert r.status_code == 503 and r.json()["status"] == "stuck"
        metrics.beat()
        assert httpx.get(f"{base}/health").status_code == 200

        metrics.MESSAGES_IN.labels("test.topic").inc(3)
        body = httpx.get(f"{base}/metrics").text
        assert total(samples(body), "fhirtwin_messages_in_total", topic="test.topic") >= 3
        assert httpx.get(f"{base}/nope").status_code == 404
    finally:
        server.shutdown()


# -- JSON logs without PHI --------------------------------------------------------------


def test_json_logs_are_json_and_carry_no_message_content() -> None:
    fmt = logs.JsonFormatter()
    pid = "PID|1||MRN448812^^^HOSP^MR||DOE^JANE||19800101|F"
    rec = logging.LogRecord("fhirtwin.x", logging.WARNING, __file__, 1, "bad: %s", (pid,), None)
    line = orjson.loads(fmt.format(rec))
    assert line["level"] == "WARNING" and line["logger"] == "fhirtwin.x"
    assert "DOE" not in line["msg"] and "MRN448812" not in line["msg"]
    try:
        raise ValueError(f"input_value='DOE^JANE' in {pid}")
    except ValueError:
        rec = logging.LogRecord(
            "fhirtwin.y", logging.ERROR, __file__, 2, "failed", (), sys.exc_info()
        )
    text = fmt.format(rec)
    line = orjson.loads(text)
    assert line["exc_type"] == "ValueError" and line["exc_where"]
    assert "DOE" not in text and "MRN448812" not in text
    fhir = '{"resourceType": "Patient", "name": [{"family": "Doe"}]}'
    assert "Doe" not in logs.scrub(f"resource {fhir}")
    assert len(logs.scrub("x" * 5000)) < 600


def test_log_format_is_chosen_by_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    try:
        monkeypatch.setenv("FHIRTWIN_LOG_FORMAT", "json")
        logs.configure()
        logs.configure()  # idempotent: one handler
        assert sum(getattr(h, "_fhirtwin", False) for h in root.handlers) == 1
        logging.getLogger("fhirtwin.t").info("hello %d", 1)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert orjson.loads(err)["msg"] == "hello 1"
    finally:
        root.handlers[:] = before[0]
        root.setLevel(before[1])


# -- fhirtwin up: the counters move -------------------------------------------------------


def test_fhirtwin_up_metrics_move_after_a_short_ingest(tmp_path: Path) -> None:
    mllp_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "FHIRTWIN_HOME": str(tmp_path),
        "PYTHONUNBUFFERED": "1",
        "FHIRTWIN_LAG_INTERVAL": "1",
    }
    env.pop("FHIRTWIN_KAFKA", None)
    env.pop("FHIRTWIN_REDIS", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cli = [sys.executable, "-m", "fhirtwin.cli"]
    up = subprocess.Popen(
        [*cli, "up", "--mllp-port", str(mllp_port), "--http-port", str(http_port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{http_port}/metrics"

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return samples(httpx.get(url, timeout=5).text)

    def wait(cond: object, what: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if cond():  # type: ignore[operator]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}")

    try:
        wait(lambda: httpx.get(url.replace("/metrics", "/health"), timeout=2).status_code == 200,
             "fhirtwin up to be healthy")  # fmt: skip
        subprocess.run(
            [*cli, "subscriber", "add", "care", "--actor", "urn:example:org|lab",
             "--purpose", "TREAT", "--scope", "patient-privacy", "--default", "permit"],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        before = scrape()
        good = [
            (ROOT / "examples/hl7v2/adt-a01-admit.hl7").read_bytes(),
            (ROOT / "examples/hl7v2/oru-r01-cmp.hl7").read_bytes(),
        ]
        deadline = time.monotonic() + 30
        while True:
            try:
                acks = send("127.0.0.1", mllp_port, good)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        assert [ack_code(a) for a in acks] == ["AA", "AA"]
        subprocess.run(
            [*cli, "ingest", "--from", "hl7v2", str(ROOT / "examples/bad")],
            env=env, check=True, capture_output=True,
        )  # fmt: skip

        def moved() -> bool:
            now = scrape()
            return (
                total(now, "fhirtwin_twin_updates_total") > total(before, "fhirtwin_twin_updates_total")
                and total(now, "fhirtwin_deadletters_total") >= total(before, "fhirtwin_deadletters_total") + 2
                and total(now, "fhirtwin_snapshot_decisions_total") > total(before, "fhirtwin_snapshot_decisions_total")
            )  # fmt: skip

        wait(moved, "twin updates, dead letters and snapshot decisions to move")
        after = scrape()

        def grew(name: str, by: float = 1, **labels: str) -> None:
            b, a = total(before, name, **labels), total(after, name, **labels)
            assert a >= b + by, f"{name}{labels}: {b} → {a}"

        grew("fhirtwin_mllp_acks_total", 2, code="AA")
        grew("fhirtwin_messages_in_total", 4, topic="ehr.hl7v2")  # 2 over MLLP + 2 ingested
        grew("fhirtwin_messages_out_total", 2, topic="ehr.hl7v2")  # written by the listener
        grew("fhirtwin_messages_out_total", 2, topic="fhir.resources")
        grew("fhirtwin_messages_out_total", 2, topic="twin.deadletter")
        grew("fhirtwin_messages_in_total", 2, topic="fhir.resources")
        grew("fhirtwin_deadletters_total", 2)
        grew("fhirtwin_conversion_errors_total", 2)
        grew("fhirtwin_twin_updates_total", 10)
        # the loss reports of the two good messages, counted
        for what in ("unmapped_fields", "assumptions"):
            n = sum(len(convert_hl7v2(m).report[what]) for m in good)
            assert n > 0, what
            grew("fhirtwin_conversion_losses_total", n, kind="hl7v2", what=what)
        grew("fhirtwin_snapshot_decisions_total", 1, allowed="true")
        grew("fhirtwin_stage_seconds_count", 2, stage="normalize-hl7v2")
        grew("fhirtwin_stage_seconds_count", 2, stage="assemble")
        grew("fhirtwin_stage_seconds_count", 2, stage="mllp-ack")
        assert ("fhirtwin_mllp_connections", ()) in after
        # consumer lag: one gauge per group, back to 0 once the pipeline has caught up
        wait(
            lambda: (lag := {dict(k[1]).get("group"): v for k, v in scrape().items()
                             if k[0] == "fhirtwin_consumer_lag"})
            and lag.get("fhirtwin-assemble") == 0 and "fhirtwin-normalize-hl7v2" in lag,
            "consumer lag gauges",
        )  # fmt: skip
    finally:
        up.send_signal(signal.SIGINT)
        output, _ = up.communicate(timeout=60)
    assert up.returncode == 0, output.decode()


def test_a_batch_observed_at_once_equals_each_record_observed() -> None:
    """observe_batch writes a batch's per-record share once (count, sum, bucket), as if
    each record had been observed alone; count/flush sum counters per batch."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    reg = CollectorRegistry()
    buckets = metrics.LATENCY._upper_bounds[:-1]
    one = Histogram("one_s", "x", ["stage"], buckets=buckets, registry=reg)
    many = Histogram("many_s", "x", ["stage"], buckets=buckets, registry=reg)
    for seconds, records in ((0.0123, 7), (0.5, 3), (40.0, 2), (0.0, 4)):
        for _ in range(records):
            one.labels("s").observe(seconds / records)
    orig = metrics.LATENCY
    try:
        metrics.LATENCY = many
        for seconds, records in ((0.0123, 7), (0.5, 3), (40.0, 2), (0.0, 4), (1.0, 0)):
            metrics.observe_batch("s", seconds, records)
    finally:
        metrics.LATENCY = orig

    def samples(name: str) -> dict[tuple[str, str], float]:
        fam = next(f for f in reg.collect() if f.name == name)
        return {
            (s.name.removeprefix(name), s.labels.get("le", "")): s.value
            for s in fam.samples
            if not s.name.endswith("_created")
        }

    got, want = samples("many_s"), samples("one_s")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k]), k
    assert want[("_count", "")] == 16

    c = Counter("c_total", "x", ["k"], registry=reg)
    tally: dict = {}
    metrics.count(c, ("a",), 2, tally)
    metrics.count(c, ("a",), 3, tally)
    metrics.count(c, ("b",), 1, tally)
    assert reg.get_sample_value("c_total", {"k": "a"}) is None
    metrics.flush(tally)
    assert not tally
    assert reg.get_sample_value("c_total", {"k": "a"}) == 5
    assert reg.get_sample_value("c_total", {"k": "b"}) == 1
