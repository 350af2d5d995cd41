"""Prometheus metrics, liveness and readiness shared by every fhirtwin process.

`fhirtwin up` runs its parts as separate processes and sets ``PROMETHEUS_MULTIPROC_DIR``;
each process then writes its samples there and the health endpoint of `up` aggregates
them. A part started alone (one per pod in a cluster) serves, with ``--metrics-port``:

- ``/metrics``: its own samples (Prometheus text format);
- ``/health``: liveness. 200 while the process's main loop keeps beating (``beat()``);
  503 when it has not beaten for ``$FHIRTWIN_LIVENESS_SECONDS`` (default 300, the same as
  Kafka's ``max.poll.interval.ms``): a stuck worker gets restarted;
- ``/ready``: readiness. 200 once the part said it is ready (``set_ready``) and every
  check added with ``add_ready_check`` passes (e.g. Redis answers); else 503 with the
  failing checks named.

The address is ``$FHIRTWIN_METRICS_ADDR`` (default 127.0.0.1; a pod sets 0.0.0.0).
No body says anything about the data the process handles.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = [
    "ACKS",
    "CONSUMER_LAG",
    "CONVERSION_ERRORS",
    "DEADLETTERS",
    "LATENCY",
    "MESSAGES_IN",
    "MESSAGES_OUT",
    "MLLP_CONNECTIONS",
    "SNAPSHOT_DECISIONS",
    "TWIN_UPDATES",
    "add_ready_check",
    "beat",
    "count",
    "flush",
    "health",
    "observe_batch",
    "readiness",
    "render",
    "serve",
    "set_ready",
    "watch_lag",
    "watch_worker",
]

log = logging.getLogger("fhirtwin.metrics")

MESSAGES_IN = Counter("fhirtwin_messages_in_total", "Records consumed or received", ["topic"])
MESSAGES_OUT = Counter("fhirtwin_messages_out_total", "Records produced", ["topic"])
CONVERSION_ERRORS = Counter(
    "fhirtwin_conversion_errors_total", "Inputs that could not be converted", ["stage", "reason"]
)
LOSSES = Counter(
    "fhirtwin_conversion_losses_total",
    "Entries of the conversions' loss reports: what was not carried over, or was assumed",
    ["kind", "what"],
)
DEADLETTERS = Counter("fhirtwin_deadletters_total", "Records sent to twin.deadletter", ["stage"])
ACKS = Counter("fhirtwin_mllp_acks_total", "MLLP acknowledgements sent", ["code"])
MLLP_CONNECTIONS = Gauge(
    "fhirtwin_mllp_connections", "Open MLLP connections", multiprocess_mode="livesum"
)
TWIN_UPDATES = Counter("fhirtwin_twin_updates_total", "Resource versions that became current")
SNAPSHOT_DECISIONS = Counter(
    "fhirtwin_snapshot_decisions_total",
    "Request-level consent decisions of the snapshot publisher (one per twin and subscriber)",
    ["decision", "allowed"],
)
CONSUMER_LAG = Gauge(
    "fhirtwin_consumer_lag",
    "Records of a topic that a consumer group has not committed yet (all partitions)",
    ["group"],
    multiprocess_mode="livemax",
)
LATENCY = Histogram(
    "fhirtwin_stage_seconds",
    "Time spent per record in a stage",
    ["stage"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


def observe_batch(stage: str, seconds: float, records: int) -> None:
    """A batch handler's time in ``fhirtwin_stage_seconds``: each record's share of it,
    observed ``records`` times (one write per value, not per record: with
    ``PROMETHEUS_MULTIPROC_DIR`` every write goes to a memory-mapped file)."""
    if records <= 0:
        return
    share = seconds / records
    hist = LATENCY.labels(stage)
    try:  # prometheus_client 0.2x: Histogram.observe is _sum.inc + one bucket's inc(1)
        buckets, bounds, total = hist._buckets, hist._upper_bounds, hist._sum
    except AttributeError:  # pragma: no cover - another client version: the public way
        for _ in range(records):
            hist.observe(share)
        return
    total.inc(share * records)
    for i, bound in enumerate(bounds):
        if share <= bound:
            buckets[i].inc(records)
            break


def count(metric: Any, labels: tuple[str, ...], n: int, tally: dict[Any, int]) -> None:
    """Add ``n`` to ``metric{labels}`` in ``tally``; ``flush`` writes the sums (one write
    per label set and batch instead of one per record)."""
    key = (metric, labels)
    tally[key] = tally.get(key, 0) + n


def flush(tally: dict[Any, int]) -> None:
    """Write what ``count`` summed, and empty ``tally``."""
    for (metric, labels), n in tally.items():
        if n:
            (metric.labels(*labels) if labels else metric).inc(n)
    tally.clear()


def render() -> bytes:
    """Metrics of every process of this `fhirtwin up` (or of this process alone)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()


# -- liveness and readiness -------------------------------------------------------------

_lock = threading.Lock()
_last_beat: float | None = None
_ready = False
_checks: dict[str, Callable[[], bool]] = {}


def beat() -> None:
    """The process's main loop is turning (call it once per iteration; it is cheap)."""
    global _last_beat
    _last_beat = time.monotonic()


def set_ready(ready: bool = True) -> None:
    global _ready
    _ready = ready


def add_ready_check(name: str, check: Callable[[], bool]) -> None:
    """A check /ready runs (with its own short timeout); it returns False or raises on failure."""
    with _lock:
        _checks[name] = check


def _liveness_limit() -> float:
    try:
        return float(os.environ.get("FHIRTWIN_LIVENESS_SECONDS", "300"))
    except ValueError:
        return 300.0


def health() -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) for /health: alive unless the main loop stopped beating."""
    if _last_beat is None:
        return 200, {"status": "ok", "loop": "starting"}
    idle = time.monotonic() - _last_beat
    if idle > _liveness_limit():
        return 503, {"status": "stuck", "seconds_since_beat": round(idle, 1)}
    return 200, {"status": "ok", "seconds_since_beat": round(idle, 3)}


def readiness() -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) for /ready."""
    failed: list[str] = []
    if not _ready:
        failed.append("starting")
    with _lock:
        checks = dict(_checks)
    for name, check in checks.items():
        try:
            ok = bool(check())
        except Exception:
            ok = False
        if not ok:
            failed.append(name)
    if failed:
        return 503, {"status": "not ready", "failed": failed}
    return 200, {"status": "ready"}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, render(), "text/plain; version=0.0.4; charset=utf-8")
        elif path in ("/health", "/healthz", "/livez"):
            code, body = health()
            self._send(code, orjson.dumps(body), "application/json")
        elif path in ("/ready", "/readyz"):
            code, body = readiness()
            self._send(code, orjson.dumps(body), "application/json")
        else:
            self._send(404, b'{"status":"not found"}', "application/json")

    def _send(self, code: int, body: bytes, media_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: quiet
        return


_server: ThreadingHTTPServer | None = None


def serve(port: int, addr: str | None = None) -> ThreadingHTTPServer | None:
    """Serve /metrics, /health and /ready on addr:port in a daemon thread (port 0: off).

    ``addr`` defaults to ``$FHIRTWIN_METRICS_ADDR``, else 127.0.0.1.
    """
    global _server
    if not port:
        return None
    host = addr or os.environ.get("FHIRTWIN_METRICS_ADDR") or "127.0.0.1"
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="fhirtwin-metrics", daemon=True).start()
    _server = server
    return server


def watch_lag(
    bootstrap: str,
    group: str,
    topics: Sequence[str],
    stop: threading.Event,
    every: float | None = None,
) -> threading.Thread:
    """Keep ``fhirtwin_consumer_lag{group}`` current, every ``every`` seconds (default
    ``$FHIRTWIN_LAG_INTERVAL`` or 15), in a daemon thread until ``stop`` is set."""
    from fhirtwin import bus

    if every is None:
        try:
            every = float(os.environ.get("FHIRTWIN_LAG_INTERVAL", "15"))
        except ValueError:
            every = 15.0
    gauge = CONSUMER_LAG.labels(group)

    def loop() -> None:
        while True:
            with contextlib.suppress(Exception):  # a slow broker: try again next time
                gauge.set(bus.group_lag(bootstrap, group, list(topics)))
            if stop.wait(every):
                return

    thread = threading.Thread(target=loop, name="fhirtwin-lag", daemon=True)
    thread.start()
    return thread


def watch_worker(worker: Any, redis_url: str | None, stop: threading.Event, *, lag: bool) -> None:
    """What `fhirtwin worker …` adds around a worker: /ready checks Redis, and (``lag``)
    its consumer group's lag is kept in ``fhirtwin_consumer_lag``. Liveness comes from the
    worker loop's ``beat()``."""
    if redis_url:
        from fhirtwin.redisconn import connect

        client = connect(redis_url, socket_timeout=2, socket_connect_timeout=2)
        add_ready_check("redis", client.ping)
    stream = getattr(worker, "stream", None)
    if lag and stream is not None:
        watch_lag(stream.bootstrap, stream.group, stream.topics, stop)
    set_ready()
