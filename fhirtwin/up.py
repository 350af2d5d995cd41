"""`fhirtwin up`: every part on one machine, each in its own process, supervised.

Starts (or finds) Kafka and Redis, creates the topics, then runs the MLLP listener, the
normalize workers and the twin assembler as child processes (``fhirtwin mllp``,
``fhirtwin worker normalize``, ``fhirtwin worker assemble``: the same commands a cluster
runs one by one), restarts a child that dies, and serves ``/health``, ``/ready`` and
``/metrics`` over HTTP. Ctrl-C (or SIGTERM) stops the children, then the servers it started.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import redis

from fhirtwin import bus
from fhirtwin.infra import (
    EmbeddedKafka,
    EmbeddedRedis,
    InfraError,
    clear_state,
    proc_usage,
    write_state,
)
from fhirtwin.redisconn import connect

__all__ = ["BrokerWatch", "Child", "Supervisor", "UpConfig"]

log = logging.getLogger("fhirtwin.up")

# Workers' fetch pace against the embedded broker (bus.paced); $FHIRTWIN_FETCH_PACE_MS wins.
EMBEDDED_FETCH_PACE_MS = 100


# When to say that the embedded broker has outgrown its use (BrokerWatch): its CPU over the
# last minute, or its memory. A fresh one uses ~0.12 cores idle (its consumers' empty
# fetches, bench/idle.py) and 0.2-0.3 serving 1,000-1,500 msg/s (bench/e2e.py); it holds
# ~12 KB a message (docs/architecture.md).
BROKER_WARN_CORES = 0.5
BROKER_WARN_RSS = 2 * 2**30
BROKER_WARN_EVERY = 1800.0  # s: how often a standing warning is printed again


@dataclass
class BrokerWatch:
    """The embedded broker's CPU and memory, sampled from /proc. It keeps every record, and
    each fetch lists every batch its partition holds (bench/tansu.py), so it costs more the
    longer a feed runs: when it passes ``cores`` (over ``window`` s) or ``rss`` bytes,
    ``warning`` says so and what to do, and ``fhirtwin up`` prints it and shows it on
    /health."""

    pid: int
    cores: float = BROKER_WARN_CORES
    rss: int = BROKER_WARN_RSS
    window: float = 60.0
    warning: str = ""
    samples: deque[tuple[float, float]] = field(default_factory=deque)

    def sample(self, now: float | None = None) -> str:
        """Read the broker's usage; the warning that holds now ("" if none)."""
        now = time.monotonic() if now is None else now
        got = proc_usage(self.pid)
        if got is None:
            self.warning = ""
            return ""
        cpu, rss = got
        samples = self.samples
        samples.append((now, cpu))
        while len(samples) > 2 and now - samples[1][0] >= self.window:
            samples.popleft()
        span = now - samples[0][0]
        used = (cpu - samples[0][1]) / span if span >= self.window else 0.0
        problems = []
        if used > self.cores:
            problems.append(f"used {used:.2f} cores over the last {span:.0f} s")
        if rss > self.rss:
            problems.append(f"holds {rss / 2**30:.1f} GiB in memory")
        self.warning = (
            (
                f"the embedded Kafka (Tansu, in memory) {' and '.join(problems)}: it keeps "
                "every record and each fetch lists every batch a partition holds, so it "
                "costs more the longer a feed runs. For a lasting feed run Apache Kafka and "
                "start with --kafka HOST:PORT (docs/operations.md)"
            )
            if problems
            else ""
        )
        return self.warning


@dataclass
class UpConfig:
    kafka: str | None = None
    redis: str | None = None
    mllp_host: str = "127.0.0.1"
    mllp_port: int = 2575
    http_port: int = 8080
    partitions: int = 4
    normalize_workers: int = 1
    validate: bool = True
    mappings: str | None = None
    batch_wait_ms: float | None = None  # the MLLP listener's group commit (None: its default)


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: float = 0.0

    def start(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(self.argv, env=env)
        self.started = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Supervisor:
    cfg: UpConfig
    kafka: EmbeddedKafka | None = None
    redis_server: EmbeddedRedis | None = None
    bootstrap: str = ""
    redis_url: str = ""
    children: list[Child] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)
    metrics_dir: str = ""
    http_thread: threading.Thread | None = None
    _http_server: Any = None
    authority: Any = None  # fhirtwin.auth.Authority
    dev_token: str = ""  # the embedded default's development client's bearer token
    broker_watch: BrokerWatch | None = None  # the embedded broker's growth (not --kafka)

    # -- start -------------------------------------------------------------------------

    def start_servers(self) -> None:
        if self.cfg.kafka:
            self.bootstrap = self.cfg.kafka
        else:
            self.kafka = EmbeddedKafka().start()
            self.bootstrap = self.kafka.bootstrap
            if self.kafka.proc is not None:
                self.broker_watch = BrokerWatch(self.kafka.proc.pid)
        if self.cfg.redis:
            self.redis_url = self.cfg.redis
        else:
            self.redis_server = EmbeddedRedis().start()
            self.redis_url = self.redis_server.url
        try:
            connect(self.redis_url, socket_timeout=5).ping()
        except redis.RedisError as exc:
            raise InfraError(f"Redis at {self.redis_url} does not answer: {exc}") from exc
        try:
            bus.ensure_topics(self.bootstrap, partitions=self.cfg.partitions)
        except Exception as exc:
            raise InfraError(f"Kafka at {self.bootstrap}: cannot create topics: {exc}") from exc

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["FHIRTWIN_KAFKA"] = self.bootstrap
        env["FHIRTWIN_REDIS"] = self.redis_url
        env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.kafka is not None:
            # The embedded broker lists every stored batch of a partition on each fetch that
            # finds new records: workers that fetch as each record lands cost it more the
            # longer it runs (bench/tansu.py). Fetch each partition at most every 100 ms.
            env.setdefault("FHIRTWIN_FETCH_PACE_MS", str(EMBEDDED_FETCH_PACE_MS))
        return env

    def plan(self) -> list[Child]:
        py = [sys.executable, "-m", "fhirtwin.cli"]
        validate = [] if self.cfg.validate else ["--no-validate"]
        mappings = ["--mappings", self.cfg.mappings] if self.cfg.mappings else []
        wait = (
            []
            if self.cfg.batch_wait_ms is None
            else ["--batch-wait-ms", str(self.cfg.batch_wait_ms)]
        )
        kids = [
            Child(
                "mllp",
                [
                    *py,
                    "mllp",
                    "--host",
                    self.cfg.mllp_host,
                    "--port",
                    str(self.cfg.mllp_port),
                    *wait,
                ],
            ),
            Child("assemble", [*py, "worker", "assemble"]),
            Child("snapshot", [*py, "worker", "snapshot"]),
            Child("audit", [*py, "worker", "audit"]),
            Child("results", [*py, "worker", "results"]),
        ]
        for i in range(self.cfg.normalize_workers):
            kids.append(
                Child(
                    f"normalize-hl7v2-{i + 1}",
                    [*py, "worker", "normalize", "--source", "hl7v2", *validate, *mappings],
                )
            )
        # one normalizer per export kind, so `fhirtwin ingest --from ccda|csv|fhir|notes` works
        # against `fhirtwin up` as it does for HL7 v2 (idle unless something is ingested)
        for kind in ("ccda", "csv", "fhir", "notes"):
            kids.append(
                Child(
                    f"normalize-{kind}",
                    [*py, "worker", "normalize", "--source", kind, *validate, *mappings],
                )
            )
        return kids

    def start(self) -> dict[str, Any]:
        self.start_servers()
        self.metrics_dir = tempfile.mkdtemp(prefix="fhirtwin-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        self.children = self.plan()
        env = self.child_env()
        for child in self.children:
            child.start(env)
        self.start_http()
        info = {
            "pid": os.getpid(),
            "kafka": self.bootstrap,
            "kafka_embedded": self.kafka is not None,
            "redis": self.redis_url,
            "redis_started": bool(self.redis_server and self.redis_server.started),
            "mllp": f"{self.cfg.mllp_host}:{self.cfg.mllp_port}",
            "http": f"http://127.0.0.1:{self.cfg.http_port}",
            "started_ms": int(time.time() * 1000),
        }
        write_state(info)
        return info

    # -- HTTP --------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        parts = {c.name: ("up" if c.alive else "down") for c in self.children}
        try:
            connect(self.redis_url, socket_timeout=1).ping()
            parts["redis"] = "up"
        except redis.RedisError:
            parts["redis"] = "down"
        parts["kafka"] = "up" if bus.partitions_of(self.bootstrap, bus.RESOURCES) else "down"
        ok = all(v == "up" for v in parts.values())
        out: dict[str, Any] = {"status": "ok" if ok else "degraded", "parts": parts}
        if self.broker_watch is not None and self.broker_watch.warning:
            out["warnings"] = [self.broker_watch.warning]  # still ok: it works, slower
        return out

    def make_authority(self) -> Any:
        """SMART Backend Services (docs/auth.md); the embedded default (no --kafka/--redis)
        keeps its keys beside its state file and gets a development client and token."""
        from fhirtwin.auth import Authority, default_key_dir

        embedded = not (self.cfg.redis or self.cfg.kafka)
        authority = Authority(
            connect(self.redis_url),
            token_url=f"http://127.0.0.1:{self.cfg.http_port}/auth/token",
            key_dir=default_key_dir() if embedded else None,
        )
        if embedded:
            self.dev_token = authority.dev_token()
        return authority

    def start_http(self) -> None:
        import uvicorn

        from fhirtwin.cli_api import build_app  # the app `fhirtwin api` serves too

        self.authority = self.make_authority()
        api = build_app(self.authority, self.bootstrap, self.redis_url, live=self.health)

        config = uvicorn.Config(
            api, host="127.0.0.1", port=self.cfg.http_port, log_level="warning", lifespan="off"
        )
        self._http_server = uvicorn.Server(config)
        self._http_server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.http_thread = threading.Thread(target=self._http_server.run, daemon=True)
        self.http_thread.start()

    # -- run / stop --------------------------------------------------------------------

    def supervise(self) -> None:
        """Restart children that die (with back-off) until asked to stop."""
        env = self.child_env()
        watched, said = 0.0, -BROKER_WARN_EVERY
        while not self.stop_event.wait(0.5):
            now = time.monotonic()
            if self.broker_watch is not None and now - watched >= 5:
                watched = now
                if self.broker_watch.sample(now) and now - said >= BROKER_WARN_EVERY:
                    said = now
                    log.warning("%s", self.broker_watch.warning)
                    print(f"fhirtwin up: warning: {self.broker_watch.warning}", file=sys.stderr)
            for child in self.children:
                if child.alive or child.proc is None:
                    continue
                code = child.proc.returncode
                wait = min(30.0, 0.5 * 2 ** min(child.restarts, 6))
                if time.monotonic() - child.started < wait:
                    continue
                log.warning("%s exited with code %s; restarting", child.name, code)
                print(f"fhirtwin up: {child.name} exited ({code}); restarting", file=sys.stderr)
                child.restarts += 1
                child.start(env)

    def stop(self) -> None:
        self.stop_event.set()
        for child in self.children:
            if child.alive and child.proc is not None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(5)
        if self._http_server is not None:
            self._http_server.should_exit = True
        if self.redis_server is not None:
            self.redis_server.stop()
        if self.kafka is not None:
            self.kafka.stop()
        clear_state()
        if self.metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
