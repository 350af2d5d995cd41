"""Prometheus metrics shared by every fhirtwin process.

`fhirtwin up` runs its parts as separate processes and sets ``PROMETHEUS_MULTIPROC_DIR``;
each process then writes its samples there and the health endpoint of `up` aggregates
them. A part started alone exposes its own metrics with ``--metrics-port``.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

__all__ = [
    "ACKS",
    "CONVERSION_ERRORS",
    "DEADLETTERS",
    "LATENCY",
    "MESSAGES_IN",
    "MESSAGES_OUT",
    "MLLP_CONNECTIONS",
    "TWIN_UPDATES",
    "render",
    "serve",
]

MESSAGES_IN = Counter("fhirtwin_messages_in_total", "Records consumed or received", ["topic"])
MESSAGES_OUT = Counter("fhirtwin_messages_out_total", "Records produced", ["topic"])
CONVERSION_ERRORS = Counter(
    "fhirtwin_conversion_errors_total", "Inputs that could not be converted", ["stage", "reason"]
)
DEADLETTERS = Counter("fhirtwin_deadletters_total", "Records sent to twin.deadletter", ["stage"])
ACKS = Counter("fhirtwin_mllp_acks_total", "MLLP acknowledgements sent", ["code"])
MLLP_CONNECTIONS = Gauge(
    "fhirtwin_mllp_connections", "Open MLLP connections", multiprocess_mode="livesum"
)
TWIN_UPDATES = Counter("fhirtwin_twin_updates_total", "Resource versions that became current")
LATENCY = Histogram(
    "fhirtwin_stage_seconds",
    "Time spent per record in a stage",
    ["stage"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


def render() -> bytes:
    """Metrics of every process of this `fhirtwin up` (or of this process alone)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()


def serve(port: int) -> None:
    """Expose this process's metrics on 127.0.0.1:port/metrics (0: do nothing)."""
    if port:
        start_http_server(port, addr="127.0.0.1")
