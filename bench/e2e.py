"""End to end: HL7 v2 over MLLP → Kafka → normalize → assemble → Redis twin, measured.

Usage (from the project root):
    .venv/bin/python bench/e2e.py [--duration 60] [--latency-duration 40] [--rate R]
        [--normalize-workers 1[,2]] [--partitions N] [--batch-wait-ms MS]
        [--validate | --no-validate] [--connections 4]
        [--window 16] [--in-flight 3000] [--patients 2000] [--json OUT] [--profile N]

The pipeline runs as `fhirtwin up` runs it: ``fhirtwin.up.Supervisor`` starts embedded Tansu
and the child processes ``python -m fhirtwin.cli mllp | worker normalize | worker assemble``
(one process each, on free ports, state file in a temporary ``$FHIRTWIN_HOME``, the
children's logs in ``bench/results/e2e-<config>.log``). Redis is a private server on a free
port (never a developer's 6379). This process is the MLLP client and watches ``twin.events``.
Without ``--validate``/``--no-validate`` both settings run, each on a fresh pipeline.

Per configuration:

1. **warm-up**: a few hundred messages on one connection; wait until every one is visible
   (proves that both consumer groups are assigned; Tansu's join takes ~3 s).
2. **throughput, closed loop**: ``--connections`` connections, each pipelining up to
   ``--window`` un-ACKed messages, and at most ``--in-flight`` messages sent but not yet
   visible in total (so a fast MLLP stage cannot pile up an unbounded backlog in front
   of normalize). Sustained msg/s = messages whose twin event arrived inside the
   ``--duration`` window (after 5 s of ramp-up) ÷ window. ACK rate alongside.
3. **latency, open loop** at a fixed offered rate (``--rate``, default 70 % of the
   sustained rate just measured): messages are scheduled at t0 + i/rate; latency counts
   from the *scheduled* time (no coordinated omission). Send → ACK, and send → twin event
   seen here (the assembler publishes it after the Redis write, so this is an upper bound
   of "visible in Redis"). The first 3 s are not counted.
4. **check**: after a drain, every AA-acknowledged message must have a twin event
   (distinct ``source.control_id`` re-read from ``twin.events``); dead letters counted.

RSS (VmRSS) and CPU time (utime+stime) of every process are sampled from /proc each second;
machine-wide CPU from /proc/stat, so that load from other jobs shows ("other").

Before the pipelines: **twin update cost** in-process against a private Redis: 2,000 small
twins of 10 resources and 4 twins of 10,000 (Observations with distinct ids), then N applies
(``TwinStore.apply``) of a one-Observation (+ Provenance) event, alternating small/large,
median per apply; Redis commands and server time per apply from INFO commandstats. And
**stage cost**: NormalizeWorker.handle and AssembleWorker.handle in this process on the same
synthetic feed (µs/message): what one core can do per stage, without Kafka.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import importlib.util
import io
import math
import os
import platform
import pstats
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

import orjson  # noqa: E402
import redis  # noqa: E402
from confluent_kafka import Consumer, TopicPartition  # noqa: E402

from bench._scratch import private_home  # noqa: E402
from fhirtwin import bus, heap  # noqa: E402
from fhirtwin.infra import EmbeddedRedis, free_port  # noqa: E402
from fhirtwin.mllp import ack_code  # noqa: E402

DEFAULT_JSON = BENCH_DIR / "results" / "e2e.json"
GOAL_RATE = 1500.0
GOAL_ACK_P99_MS = 50.0
GOAL_VISIBLE_P99_MS = 500.0
GOAL_UPDATE_RATIO = 0.9
RAMP_S = 5.0  # closed loop: not counted
LEAD_IN_S = 3.0  # open loop: not counted
SERIES_S = 5  # seconds per row of the time series in the JSON
_TICKS = os.sysconf("SC_CLK_TCK")


def _load_synth() -> Any:
    """tests/synth.py, imported by path (the bench does not put tests/ on sys.path)."""
    path = PROJECT_ROOT / "tests" / "synth.py"
    spec = importlib.util.spec_from_file_location("fhirtwin_bench_synth", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


synth = _load_synth()


# --------------------------------------------------------------------------- /proc


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2 :].split()
    return int(rest[11]) + int(rest[12])  # utime + stime (fields 14 and 15)


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat", "rb") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    return total - idle, total


class Sampler(threading.Thread):
    """Every second: VmRSS of each process (max kept). CPU on demand via ``snapshot``."""

    def __init__(
        self, pids: dict[str, int], counts: Callable[[], dict[str, int]] | None = None
    ) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.counts = counts
        self.t0 = time.monotonic()
        self.series: list[dict[str, Any]] = []  # every SERIES_S s: msg/s and cores
        self.max_rss: dict[str, int] = {}
        self.last_rss: dict[str, int] = {}
        self.stop = threading.Event()
        self.sample()

    def sample(self) -> None:
        for name, pid in self.pids.items():
            kib = rss_kib(pid)
            if kib is not None:
                self.last_rss[name] = kib
                self.max_rss[name] = max(self.max_rss.get(name, 0), kib)

    def run(self) -> None:
        tick = 0
        prev = self.snapshot()
        prev_counts = self.counts() if self.counts else {}
        while not self.stop.wait(1.0):
            self.sample()
            tick += 1
            if tick % SERIES_S == 0:
                snap = self.snapshot()
                counts = self.counts() if self.counts else {}
                row: dict[str, Any] = {"t": round(snap["t"] - self.t0, 1)}
                row.update(
                    {k: round((v - prev_counts.get(k, 0)) / SERIES_S) for k, v in counts.items()}
                )
                row["cores"] = Sampler.cpu_between(prev, snap)
                self.series.append(row)
                prev, prev_counts = snap, counts

    def snapshot(self) -> dict[str, Any]:
        return {
            "t": time.monotonic(),
            "procs": {n: cpu_ticks(p) for n, p in self.pids.items()},
            "machine": machine_ticks(),
        }

    @staticmethod
    def cpu_between(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
        """Cores used (1.0 = one core busy) by each process, ours in total, others, machine."""
        dt = max(b["t"] - a["t"], 1e-9)
        out: dict[str, float] = {}
        ours = 0.0
        for name, t0 in a["procs"].items():
            t1 = b["procs"].get(name)
            if t0 is None or t1 is None:
                continue
            cores = (t1 - t0) / _TICKS / dt
            out[name] = round(cores, 2)
            ours += cores
        busy = (b["machine"][0] - a["machine"][0]) / _TICKS / dt
        out["ours"] = round(ours, 2)
        out["machine"] = round(busy, 2)
        out["other"] = round(max(0.0, busy - ours), 2)
        return out


# --------------------------------------------------------------------------- helpers


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100.0 * len(s)) - 1))
    return s[k]


def stats_ms(values_s: list[float]) -> dict[str, float | int | None]:
    ms = [v * 1000.0 for v in values_s]
    return {
        "n": len(ms),
        "p50": pct(ms, 50),
        "p90": pct(ms, 90),
        "p99": pct(ms, 99),
        "max": max(ms) if ms else None,
    }


def fmt(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "—"
    return f"{x:,.{digits}f}"


@contextlib.contextmanager
def fds_to(path: Path) -> Iterator[None]:
    """Point fds 1 and 2 at ``path`` meanwhile, so that child processes inherit the log."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


# --------------------------------------------------------------------------- the client side


class Tracker:
    """Send time, ACK and first twin event of every control id (one per message)."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}  # control id → reference time (scheduled, or sent)
        self.sent_at: dict[str, float] = {}  # control id → when the bytes actually went
        self.acks: dict[str, tuple[str, float]] = {}
        self.visible: dict[str, float] = {}
        self.n_sent = 0
        self.n_visible = 0
        self.n_acked_bad = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()
        # Senders held by the in-flight cap wait here; the watcher and the ACK readers
        # notify it when messages leave flight (rather than senders polling every 0.5 ms:
        # thousands of wakeups a second on the two cores the pipeline is measured on).
        self.room = threading.Condition(threading.Lock())

    def in_flight(self) -> int:
        return self.n_sent - self.n_visible - self.n_acked_bad

    def freed(self) -> None:
        """Messages left flight: wake the senders waiting for room."""
        with self.room:
            self.room.notify_all()

    def wait_room(self, cap: int, until: float) -> bool:
        """Block while ``cap`` messages are in flight; False once ``until`` (monotonic)
        passes first."""
        while self.in_flight() >= cap:
            left = until - time.monotonic()
            if left <= 0:
                return False
            with self.room:
                if self.in_flight() >= cap:
                    self.room.wait(min(left, 0.05))
        return True


def _msa2(ack: bytes) -> str:
    i = ack.find(b"\rMSA|")
    if i < 0:
        return ""
    parts = ack[i + 1 :].split(b"\r", 1)[0].split(b"|")
    return parts[2].decode("latin-1") if len(parts) > 2 else ""


class Connection:
    """One MLLP connection: a sender (the caller's thread) and an ACK-reader thread."""

    def __init__(self, host: str, port: int, window: int, tracker: Tracker) -> None:
        self.sock = socket.create_connection((host, port), 10)
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.slots = threading.Semaphore(window)
        self.fifo: deque[str] = deque()
        self.tracker = tracker
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def send(self, cid: str, frame: bytes, t_ref: float | None = None) -> None:
        self.slots.acquire()
        tr = self.tracker
        now = time.monotonic()
        tr.sent[cid] = now if t_ref is None else t_ref
        tr.sent_at[cid] = now
        with tr.lock:
            tr.n_sent += 1
        self.fifo.append(cid)
        self.sock.sendall(frame)

    def _read(self) -> None:
        buf = bytearray()
        tr = self.tracker
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
                while True:
                    i = buf.find(b"\x0b")
                    j = buf.find(b"\x1c", i + 1) if i >= 0 else -1
                    if j < 0:
                        break
                    frame = bytes(buf[i + 1 : j])
                    del buf[: j + 2 if buf[j + 1 : j + 2] == b"\r" else j + 1]
                    now = time.monotonic()
                    cid = self.fifo.popleft()
                    code = ack_code(frame)
                    if _msa2(frame) != cid:
                        tr.errors.append(f"ACK for {_msa2(frame)!r} where {cid!r} was expected")
                    tr.acks[cid] = (code, now)
                    if code != "AA":
                        with tr.lock:
                            tr.n_acked_bad += 1
                        tr.freed()
                    self.slots.release()
        except OSError:
            return

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        self.reader.join(10)
        self.sock.close()


class Watcher(threading.Thread):
    """Consumes ``twin.events`` from the current end; first event per control id → visible."""

    def __init__(self, bootstrap: str, tracker: Tracker) -> None:
        super().__init__(daemon=True)
        self.tracker = tracker
        self.stop = threading.Event()
        self.events = 0
        self.c: Any = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": "bench-e2e-watch",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
                "log_level": 3,
            }
        )
        parts = bus.partitions_of(bootstrap, bus.TWIN_EVENTS)
        tps = []
        for p in parts:
            # Explicit offsets (not OFFSET_END, which resolves lazily and could skip the
            # first events). Tansu's watermark can be short: starting early is harmless.
            _lo, hi = self.c.get_watermark_offsets(TopicPartition(bus.TWIN_EVENTS, p), 10)
            tps.append(TopicPartition(bus.TWIN_EVENTS, p, max(hi - 1, 0)))
        self.c.assign(tps)

    def run(self) -> None:
        tr = self.tracker
        marker = b'"control_id":"'
        try:
            while not self.stop.is_set():
                msgs = self.c.consume(2000, 0.05)
                now = time.monotonic()
                seen = tr.n_visible
                for m in msgs:
                    if m.error():
                        continue
                    self.events += 1
                    v = m.value() or b""
                    i = v.find(marker)
                    if i < 0:
                        continue  # a merge event: no source
                    i += len(marker)
                    cid = v[i : v.find(b'"', i)].decode()
                    if cid in tr.sent and cid not in tr.visible:
                        tr.visible[cid] = now
                        tr.n_visible += 1
                if tr.n_visible != seen:
                    tr.freed()
        finally:
            self.c.close()


class Feed:
    """Synthetic messages on demand: message i of tests/synth.py, MLLP-framed."""

    def __init__(self, patients: int) -> None:
        self.tmpl = synth.templates()
        self.patients = patients
        self.next = 0
        self.lock = threading.Lock()

    def take(self) -> tuple[str, bytes]:
        with self.lock:
            i = self.next
            self.next += 1
        msg = synth.message(i, self.patients, self.tmpl)
        return f"SYN{i:07d}", b"\x0b" + msg + b"\x1c\r"


def run_senders(
    host: str,
    port: int,
    feed: Feed,
    tracker: Tracker,
    *,
    connections: int,
    window: int,
    until: float,
    rate: float | None = None,
    in_flight: int | None = None,
    count: int | None = None,
) -> dict[str, Any]:
    """Send until ``until`` (monotonic) or ``count`` messages; closed or open loop."""
    conns = [Connection(host, port, window, tracker) for _ in range(connections)]
    t0 = time.monotonic()
    seq = iter(range(10**12))
    seq_lock = threading.Lock()
    lag: list[float] = []
    sent = [0]

    def worker(conn: Connection) -> None:
        while True:
            with seq_lock:
                j = next(seq)
            if count is not None and j >= count:
                return
            t_ref = None
            if rate is not None:
                t_ref = t0 + j / rate
                if t_ref >= until:
                    return
                delay = t_ref - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            else:
                if time.monotonic() >= until:
                    return
                if in_flight is not None and not tracker.wait_room(in_flight, until):
                    return
            cid, frame = feed.take()
            conn.send(cid, frame, t_ref)
            if t_ref is not None:
                lag.append(time.monotonic() - t_ref)
            sent[0] += 1

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t_end = time.monotonic()
    # wait for the outstanding ACKs (bounded)
    deadline = time.monotonic() + 30
    while any(c.fifo for c in conns) and time.monotonic() < deadline:
        time.sleep(0.01)
    for c in conns:
        c.close()
    return {
        "sent": sent[0],
        "seconds": t_end - t0,
        "sender_lag_p99_ms": (pct(lag, 99) or 0.0) * 1000 if lag else None,
    }


def wait_visible(tracker: Tracker, cids: list[str], timeout: float) -> tuple[int, float]:
    """Wait until every AA-acknowledged id of ``cids`` is visible; (missing, seconds waited)."""
    t0 = time.monotonic()
    want = [c for c in cids if tracker.acks.get(c, ("", 0))[0] == "AA"]
    while True:
        missing = sum(1 for c in want if c not in tracker.visible)
        if not missing or time.monotonic() - t0 > timeout:
            return missing, time.monotonic() - t0
        time.sleep(0.1)


# --------------------------------------------------------------------------- one pipeline run


@dataclass
class RunResult:
    normalize_workers: int
    validate: bool
    startup_s: float = 0.0
    warmup: dict[str, Any] = field(default_factory=dict)
    throughput: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    check: dict[str, Any] = field(default_factory=dict)
    rss_max_mib: dict[str, float] = field(default_factory=dict)
    rss_end_mib: dict[str, float] = field(default_factory=dict)
    cpu_throughput: dict[str, float] = field(default_factory=dict)
    cpu_latency: dict[str, float] = field(default_factory=dict)
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)
    series: list[dict[str, Any]] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    log: str = ""
    goals: list[dict[str, Any]] = field(default_factory=list)


def run_pipeline(
    args: argparse.Namespace, workers: int, validate: bool, scratch: Path
) -> RunResult:
    from fhirtwin.up import Supervisor, UpConfig

    res = RunResult(workers, validate, load_before=list(os.getloadavg()))
    tag = f"nw{workers}-{'validate' if validate else 'novalidate'}"
    log_path = args.json.parent / f"e2e-{tag}.log"
    log_path.write_bytes(b"")
    res.log = str(log_path)
    print(f"\n== pipeline: {workers} normalize worker(s), validation {'on' if validate else 'off'}")
    home = tempfile.mkdtemp(prefix="home-", dir=scratch)
    os.environ["FHIRTWIN_HOME"] = home  # the supervisor's state file; never ~/.fhirtwin
    t_start = time.monotonic()
    rserver = EmbeddedRedis(prefer_existing=False).start()
    mllp_port = free_port()
    sup = Supervisor(
        UpConfig(
            redis=rserver.url,
            mllp_port=mllp_port,
            http_port=free_port(),
            normalize_workers=workers,
            validate=validate,
            **({"partitions": args.partitions} if args.partitions else {}),
            batch_wait_ms=args.batch_wait_ms,
        )
    )
    sampler: Sampler | None = None
    watcher: Watcher | None = None
    try:
        with fds_to(log_path):
            sup.start()
        assert sup.kafka is not None and sup.kafka.proc is not None and rserver.proc is not None
        pids = {c.name: c.proc.pid for c in sup.children if c.proc is not None}
        pids["tansu"] = sup.kafka.proc.pid
        pids["redis"] = rserver.proc.pid
        pids["bench (client)"] = os.getpid()
        tracker = Tracker()
        sampler = Sampler(
            pids,
            lambda: {
                "sent_per_s": tracker.n_sent,
                "acked_per_s": len(tracker.acks),
                "visible_per_s": tracker.n_visible,
            },
        )
        sampler.start()
        _wait_port("127.0.0.1", mllp_port, 30)
        watcher = Watcher(sup.bootstrap, tracker)
        watcher.start()
        feed = Feed(args.patients)
        res.startup_s = round(time.monotonic() - t_start, 2)

        # 1. warm-up: until the whole pipeline answers (groups assigned, rules compiled)
        t0 = time.monotonic()
        run_senders(
            "127.0.0.1",
            mllp_port,
            feed,
            tracker,
            connections=1,
            window=16,
            until=t0 + 120,
            count=args.warmup_messages,
        )
        ids = list(tracker.sent)
        missing, _ = wait_visible(tracker, ids, 90)
        res.warmup = {
            "messages": len(ids),
            "seconds_until_all_visible": round(time.monotonic() - t0, 2),
            "missing": missing,
        }
        print(
            f"warm-up: {len(ids)} messages visible after {res.warmup['seconds_until_all_visible']} s"
            + (f" ({missing} MISSING)" if missing else "")
        )
        _check_alive(sup)

        # 2. throughput, closed loop
        before_ids = set(tracker.sent)
        t0 = time.monotonic()
        w0, w1 = t0 + RAMP_S, t0 + RAMP_S + args.duration
        res.phases["throughput_start"] = round(t0 - sampler.t0, 1)
        snap0: dict[str, Any] = {}

        def mark() -> None:
            snap0.update(sampler.snapshot())  # type: ignore[union-attr]

        timer = threading.Timer(RAMP_S, mark)
        timer.start()
        info = run_senders(
            "127.0.0.1",
            mllp_port,
            feed,
            tracker,
            connections=args.connections,
            window=args.window,
            until=w1,
            in_flight=args.in_flight,
        )
        snap1 = sampler.snapshot()
        timer.join()
        phase_ids = [c for c in tracker.sent if c not in before_ids]
        vis_in = sum(1 for c in phase_ids if w0 <= tracker.visible.get(c, -1.0) < w1)
        ack_in = sum(1 for c in phase_ids if w0 <= tracker.acks.get(c, ("", -1.0))[1] < w1)
        sent_in = sum(1 for c in phase_ids if w0 <= tracker.sent_at[c] < w1)
        missing, waited = wait_visible(tracker, phase_ids, 180)
        res.cpu_throughput = Sampler.cpu_between(snap0, snap1) if snap0 else {}
        res.throughput = {
            "window_s": args.duration,
            "ramp_s": RAMP_S,
            "connections": args.connections,
            "window_per_connection": args.window,
            "in_flight_cap": args.in_flight,
            "sent": info["sent"],
            "sustained_msgs_per_s": vis_in / args.duration,
            "ack_msgs_per_s": ack_in / args.duration,
            "sent_msgs_per_s": sent_in / args.duration,
            "drain_s": round(waited, 2),
            "not_visible_after_drain": missing,
        }
        print(
            f"throughput (closed loop, {args.duration:.0f} s): sustained "
            f"{res.throughput['sustained_msgs_per_s']:,.0f} msg/s visible, "
            f"{res.throughput['ack_msgs_per_s']:,.0f} msg/s ACKed; cores {res.cpu_throughput}"
        )
        _check_alive(sup)

        # 3. latency, open loop at a fixed rate
        rate = args.rate or max(10.0, 0.7 * res.throughput["sustained_msgs_per_s"])
        before_ids = set(tracker.sent)
        t0 = time.monotonic()
        c0, c1 = t0 + LEAD_IN_S, t0 + LEAD_IN_S + args.latency_duration
        res.phases["latency_start"] = round(t0 - sampler.t0, 1)
        snapl: dict[str, Any] = {}
        timer = threading.Timer(LEAD_IN_S, lambda: snapl.update(sampler.snapshot()))  # type: ignore[union-attr]
        timer.start()
        info = run_senders(
            "127.0.0.1",
            mllp_port,
            feed,
            tracker,
            connections=args.connections,
            window=max(args.window, 256),
            until=c1,
            rate=rate,
        )
        snapl1 = sampler.snapshot()
        timer.join()
        phase_ids = [c for c in tracker.sent if c not in before_ids]
        missing, waited = wait_visible(tracker, phase_ids, 120)
        counted = [c for c in phase_ids if c0 <= tracker.sent[c] < c1]
        ack_lat = [tracker.acks[c][1] - tracker.sent[c] for c in counted if c in tracker.acks]
        vis_lat = [tracker.visible[c] - tracker.sent[c] for c in counted if c in tracker.visible]
        res.cpu_latency = Sampler.cpu_between(snapl, snapl1) if snapl else {}
        buckets: list[dict[str, Any]] = []
        for b0 in range(0, int(args.latency_duration), SERIES_S):
            ids_b = [c for c in counted if c0 + b0 <= tracker.sent[c] < c0 + b0 + SERIES_S]
            lat_b = [tracker.visible[c] - tracker.sent[c] for c in ids_b if c in tracker.visible]
            buckets.append({"from_s": b0, **stats_ms(lat_b)})
        res.latency = {
            "offered_msgs_per_s": rate,
            "rate_source": "--rate" if args.rate else "70 % of the sustained rate",
            "window_s": args.latency_duration,
            "lead_in_s": LEAD_IN_S,
            "sent": info["sent"],
            "counted": len(counted),
            "sender_lag_p99_ms": info["sender_lag_p99_ms"],
            "ack_ms": stats_ms(ack_lat),
            "visible_ms": stats_ms(vis_lat),
            "not_acked": len(counted) - len(ack_lat),
            "not_visible_after_drain": missing,
            "drain_s": round(waited, 2),
            "visible_ms_by_send_time": buckets,
        }
        print(
            f"latency (open loop at {rate:,.0f} msg/s): ACK p50 {fmt(res.latency['ack_ms']['p50'], 1)}"
            f" p99 {fmt(res.latency['ack_ms']['p99'], 1)} ms; visible p50 "
            f"{fmt(res.latency['visible_ms']['p50'], 0)} p99 {fmt(res.latency['visible_ms']['p99'], 0)} ms"
        )
        print(
            "  visible p50 by send time (5 s buckets, ms): "
            + " ".join(fmt(b["p50"]) for b in buckets)
        )
        _check_alive(sup)

        # 4. check: every AA-acknowledged message has a twin event; dead letters
        watcher.stop.set()
        watcher.join(5)
        aa = {c for c, (code, _t) in tracker.acks.items() if code == "AA"}
        seen: set[str] = set()
        n_events = 0
        for rec in bus.read_topic(sup.bootstrap, bus.TWIN_EVENTS, timeout=10):
            n_events += 1
            ev = orjson.loads(rec.value)
            cid = (ev.get("source") or {}).get("control_id")
            if cid:
                seen.add(cid)
        dl = sum(bus.end_offsets(sup.bootstrap, bus.DEADLETTER).values())
        res.check = {
            "sent": tracker.n_sent,
            "acked_AA": len(aa),
            "acked_other": tracker.n_acked_bad,
            "not_acked": tracker.n_sent - len(tracker.acks),
            "twin_events": n_events,
            "distinct_control_ids_in_twin_events": len(seen),
            "AA_without_twin_event": len(aa - seen),
            "deadletters": dl,
            "ack_order_errors": len(tracker.errors),
            "all_acked_visible": not (aa - seen),
        }
        print(
            f"check: {len(aa):,} AA, {len(seen):,} distinct control ids in twin.events, "
            f"{len(aa - seen)} AA without twin event, {dl} dead letters"
        )
        sampler.sample()
        res.rss_max_mib = {n: round(k / 1024, 1) for n, k in sampler.max_rss.items()}
        res.rss_end_mib = {n: round(k / 1024, 1) for n, k in sampler.last_rss.items()}
        res.load_after = list(os.getloadavg())
        res.series = sampler.series
        res.goals = goals_of(res)
        return res
    finally:
        if watcher is not None and watcher.is_alive():
            watcher.stop.set()
            watcher.join(5)
        if sampler is not None:
            sampler.stop.set()
        with fds_to(log_path):
            sup.stop()
        rserver.stop()
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # set by Supervisor.start


def _wait_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the MLLP listener did not open {host}:{port} within {timeout} s")


def _check_alive(sup: Any) -> None:
    dead = [f"{c.name} (exit {c.proc.returncode})" for c in sup.children if not c.alive]
    if dead:
        raise RuntimeError(f"pipeline process(es) died: {', '.join(dead)}; see the log")


def goals_of(res: RunResult) -> list[dict[str, Any]]:
    out = []
    rate = res.throughput.get("sustained_msgs_per_s")
    ack99 = res.latency.get("ack_ms", {}).get("p99")
    vis99 = res.latency.get("visible_ms", {}).get("p99")
    for what, value, ok in (
        (f"sustained ≥ {GOAL_RATE:,.0f} msg/s", rate, rate is not None and rate >= GOAL_RATE),
        (
            f"p99 send→ACK < {GOAL_ACK_P99_MS:.0f} ms",
            ack99,
            ack99 is not None and ack99 < GOAL_ACK_P99_MS,
        ),
        (
            f"p99 send→visible < {GOAL_VISIBLE_P99_MS:.0f} ms",
            vis99,
            vis99 is not None and vis99 < GOAL_VISIBLE_P99_MS,
        ),
        ("every AA-acknowledged message visible", None, bool(res.check.get("all_acked_visible"))),
    ):
        out.append({"goal": what, "value": value, "pass": ok})
    return out


# --------------------------------------------------------------------------- update cost


def _sample_resources() -> tuple[dict[str, Any], dict[str, Any]]:
    """A real Observation and Provenance: the converter's output for the shipped ORU example."""
    from fhirtwin.conversion import convert_hl7v2

    for msg in synth.templates():
        if b"|ORU^" in msg:
            conv = convert_hl7v2(msg, validate=False)
            res = [e["resource"] for e in conv.bundle["entry"]]
            obs = next(r for r in res if r["resourceType"] == "Observation")
            prov = next(r for r in res if r["resourceType"] == "Provenance")
            return obs, prov
    raise RuntimeError("no ORU example in examples/hl7v2")


T0 = datetime(2026, 11, 1)


def _obs(base: dict[str, Any], rid: str, i: int) -> dict[str, Any]:
    o = copy.deepcopy(base)
    o["id"] = rid
    o["code"]["coding"][0]["code"] = f"{10000 + i % 40}-{i % 10}"  # 40 distinct lab codes
    o["valueQuantity"]["value"] = 60 + (i * 7) % 200
    o["effectiveDateTime"] = (T0 + timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M:%S-05:00")
    return o


def _prov(base: dict[str, Any], rid: str, target: str) -> dict[str, Any]:
    p = copy.deepcopy(base)
    p["id"] = rid
    p["target"] = [{"reference": target}]
    return p


def _commandstats(r: Any) -> dict[str, dict[str, float]]:
    info = r.info("commandstats")
    return {k.removeprefix("cmdstat_"): v for k, v in info.items()}


def update_cost(n: int, small: int, large: int, large_twins: int) -> dict[str, Any]:
    from fhirtwin.twin import TwinStore

    print(f"\n== twin update cost: {n} applies into twins of {small} vs {large:,} resources")
    obs, prov = _sample_resources()
    with EmbeddedRedis(prefer_existing=False) as server:
        r = redis.Redis.from_url(server.url)
        store = TwinStore(r)
        t0 = time.monotonic()
        # n + 200 small twins (each gets one timed update, so it stays at ~size), a few large.
        smalls = [f"bench-small-{k}" for k in range(n + 200)]
        for k, twin in enumerate(smalls):
            res = [_obs(obs, f"s{k}-{i}", i) for i in range(small)]
            store.apply(twin, res, event_ms=1, known_ms=1, src=f"fhir.resources/0/{k}")
        larges = [f"bench-large-{k}" for k in range(large_twins)]
        for k, twin in enumerate(larges):
            for start in range(0, large, 100):
                res = [_obs(obs, f"l{k}-{i}", i) for i in range(start, min(large, start + 100))]
                store.apply(twin, res, event_ms=1, known_ms=1, src=f"fhir.resources/1/{start}")
        build_s = time.monotonic() - t0

        def event(twin: str, k: int) -> list[dict[str, Any]]:
            o = _obs(obs, f"{twin}-upd-{k}", 100000 + k)
            return [o, _prov(prov, f"{twin}-prov-{k}", f"Observation/{o['id']}")]

        def one(twin: str, k: int) -> float:
            resources = event(twin, k)  # built outside the timed call
            t = time.perf_counter()
            store.apply(
                twin,
                resources,
                event_ms=2_000_000_000_000 + k,
                known_ms=2_000_000_000_000 + k,
                src=f"fhir.resources/2/{k}",
                identifiers=[f"urn:bench|{twin}"],
            )
            return time.perf_counter() - t

        for k in range(50):  # warm the script cache and the connection
            one(smalls[n + 100 + k], k)
            one(larges[k % large_twins], 10**6 + k)
        t_small: list[float] = []
        t_large: list[float] = []
        for k in range(n):
            if k % 2:
                t_small.append(one(smalls[k], k))
                t_large.append(one(larges[k % large_twins], k))
            else:
                t_large.append(one(larges[k % large_twins], k))
                t_small.append(one(smalls[k], k))

        def per_apply(twins: list[str], base: int, m: int = 100) -> dict[str, Any]:
            r.config_resetstat()
            for k in range(m):
                one(twins[k % len(twins)], base + k)
            st = _commandstats(r)
            st.pop("config|resetstat", None)
            st.pop("config", None)
            calls = {c: int(v["calls"]) / m for c, v in st.items()}
            evalsha = st.get("evalsha", {})
            return {
                "commands_per_apply": round(sum(calls.values()), 2),
                "by_command": {c: round(v, 2) for c, v in sorted(calls.items())},
                "script_server_us_per_apply": round(float(evalsha.get("usec_per_call", 0.0)), 1),
            }

        cmd_small = per_apply(smalls[n : n + 100], 3 * 10**6)
        cmd_large = per_apply(larges, 4 * 10**6)
        sizes = {
            "small_cur_after": int(r.hlen(f"{store.base(smalls[0])}:cur")),
            "large_cur_after": int(r.hlen(f"{store.base(larges[0])}:cur")),
        }
        mem = int(r.info("memory")["used_memory"])
    med_s, med_l = statistics.median(t_small), statistics.median(t_large)
    out = {
        "n": n,
        "small_size": small,
        "large_size": large,
        "large_twins": large_twins,
        "build_s": round(build_s, 1),
        "redis_used_memory_mib": round(mem / 2**20, 1),
        "small_us": {
            "p50": med_s * 1e6,
            "p90": pct(t_small, 90) * 1e6,
            "p99": pct(t_small, 99) * 1e6,
        },
        "large_us": {
            "p50": med_l * 1e6,
            "p90": pct(t_large, 90) * 1e6,
            "p99": pct(t_large, 99) * 1e6,
        },
        "ratio_small_over_large": med_s / med_l,
        "redis_small": cmd_small,
        "redis_large": cmd_large,
        **sizes,
    }
    print(
        f"apply: small {med_s * 1e6:,.0f} µs, large {med_l * 1e6:,.0f} µs (medians), ratio "
        f"{out['ratio_small_over_large']:.3f}; Redis commands/apply {cmd_small['commands_per_apply']}"
        f" vs {cmd_large['commands_per_apply']}, script time {cmd_small['script_server_us_per_apply']}"
        f" vs {cmd_large['script_server_us_per_apply']} µs"
    )
    return out


# --------------------------------------------------------------------------- stage cost


def _stage_run(
    norm: Any, asm: Any, batch: list[bus.Record], cpu: list[float] | None = None
) -> tuple[float, float, int, int]:
    """One batch through NormalizeWorker.handle, then AssembleWorker.handle: (seconds
    normalizing, seconds assembling, events, dead letters). ``cpu`` gets this process's
    CPU seconds in each handler added (the wall time also holds the waits for Redis)."""
    t, c = time.perf_counter(), time.process_time()
    outs = norm.handle(batch)
    t_norm = time.perf_counter() - t
    c_norm = time.process_time() - c
    events = [  # keyed by twin, as normalize writes them (the key opens the event)
        bus.Record("fhir.resources", 0, k, batch[k].timestamp_ms, o.key, o.value, ())
        for k, per in enumerate(outs)
        for o in per
        if o.topic == bus.RESOURCES
    ]
    t, c = time.perf_counter(), time.process_time()
    asm_outs = asm.handle(events)
    t_asm = time.perf_counter() - t
    if cpu is not None:
        cpu[0] += c_norm
        cpu[1] += time.process_time() - c
    # an assembler that dead-letters is fast: count it, so that cannot pass unseen
    dead = len(batch) - len(events)
    dead += sum(o.topic == bus.DEADLETTER for per in asm_outs for o in per)
    return t_norm, t_asm, len(events), dead


def _redis_cpu(r: Any) -> float:
    """CPU seconds the Redis server process has used. Not the sum of INFO commandstats: a
    script's time there already holds the commands it ran, which are listed again."""
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def stage_cost(n: int, patients: int, profile: int) -> dict[str, Any]:
    """µs per message of each worker's handler, in this process, with no Kafka; and what
    those messages cost the Redis server (its process's CPU, memory growth).

    Two figures per setting: the first message of each of ``patients`` patients (the MPI
    creates the twin and the key store makes, fsyncs and wraps its data key), then ``n``
    messages for patients already known, which is what the pipeline's feed is after its
    first seconds (every patient gets ~25 messages in a 60 s run)."""
    from fhirtwin.assemble import AssembleWorker
    from fhirtwin.normalize import NormalizeWorker

    print(f"\n== stage cost in-process ({patients} new patients, then {n} messages for them)")
    tmpl = synth.templates()
    out: dict[str, Any] = {"messages": n, "patients": patients}
    with EmbeddedRedis(prefer_existing=False) as server:
        for validate in (False, True):
            r = redis.Redis.from_url(server.url)
            r.flushall()
            norm = NormalizeWorker("127.0.0.1:1", server.url, validate=validate)
            asm = AssembleWorker("127.0.0.1:1", server.url)
            base = 10**6 * (2 if validate else 1)
            warm = min(200, patients)
            recs = [
                bus.Record(
                    "ehr.hl7v2",
                    0,
                    i,
                    1_790_000_000_000 + i,
                    None,
                    synth.message(base + i, patients, tmpl),
                    (("fhirtwin-source-kind", b"hl7v2"),),
                )
                for i in range(patients + n)
            ]

            _stage_run(norm, asm, recs[:warm])  # rules compiled, scripts loaded
            heap.settle()  # as the workers do once warm (fhirtwin.worker)
            new_norm, new_asm, new_events, new_dead = 0.0, 0.0, 0, 0
            for k in range(warm, patients, 500):
                a, b, c, d = _stage_run(norm, asm, recs[k : min(k + 500, patients)])
                new_norm, new_asm, new_events, new_dead = (
                    new_norm + a,
                    new_asm + b,
                    new_events + c,
                    new_dead + d,
                )
            cpu0 = _redis_cpu(r)
            mem0 = int(r.info("memory")["used_memory"])
            prof = cProfile.Profile() if profile else None
            if prof:
                prof.enable()
            t_norm, t_asm, n_events, dead = 0.0, 0.0, 0, 0
            cpu = [0.0, 0.0]
            for k in range(patients, patients + n, 500):  # the workers' largest batch
                a, b, c, d = _stage_run(norm, asm, recs[k : k + 500], cpu)
                t_norm, t_asm, n_events, dead = t_norm + a, t_asm + b, n_events + c, dead + d
            if prof:
                prof.disable()
            # what the same messages cost Redis: the server process's CPU, and the memory
            # the twins grew by
            redis_us = (_redis_cpu(r) - cpu0) / n * 1e6
            redis_kib = (int(r.info("memory")["used_memory"]) - mem0) / n / 1024
            key = "validate" if validate else "no_validate"
            n_new = patients - warm
            out[key] = {
                "normalize_us_per_msg": t_norm / n * 1e6,
                "normalize_msgs_per_s_one_core": n / t_norm,
                "assemble_us_per_msg": t_asm / max(n_events, 1) * 1e6,
                "assemble_msgs_per_s_one_core": n_events / t_asm if t_asm else None,
                "normalize_cpu_us_per_msg": cpu[0] / n * 1e6,
                "assemble_cpu_us_per_msg": cpu[1] / max(n_events, 1) * 1e6,
                "deadlettered": dead + new_dead,
                "new_patient_normalize_us_per_msg": new_norm / max(n_new, 1) * 1e6,
                "new_patient_assemble_us_per_msg": new_asm / max(new_events, 1) * 1e6,
                "redis_server_us_per_msg": redis_us,
                "redis_memory_kib_per_msg": redis_kib,
            }
            print(
                f"validation {'on ' if validate else 'off'}: normalize {t_norm / n * 1e6:,.0f} µs/msg "
                f"({n / t_norm:,.0f} msg/s on one core; CPU "
                f"{out[key]['normalize_cpu_us_per_msg']:,.0f}), assemble "
                f"{out[key]['assemble_us_per_msg']:,.0f} µs/msg (CPU "
                f"{out[key]['assemble_cpu_us_per_msg']:,.0f}); a new patient's first message: "
                f"normalize {out[key]['new_patient_normalize_us_per_msg']:,.0f}, assemble "
                f"{out[key]['new_patient_assemble_us_per_msg']:,.0f} µs; "
                f"{dead + new_dead} dead letters; Redis {redis_us:,.0f} µs and "
                f"{redis_kib:,.1f} KiB per message"
            )
            if prof:
                buf = io.StringIO()
                st = pstats.Stats(prof, stream=buf).strip_dirs()
                st.sort_stats("tottime").print_stats(profile)
                text = buf.getvalue()
                out[key]["profile_tottime"] = text
                print(text)
    return out


# --------------------------------------------------------------------------- report


def print_report(
    runs: list[RunResult], upd: dict[str, Any] | None, stages: dict[str, Any] | None
) -> None:
    print("\n" + "=" * 100)
    head = (
        f"{'workers':>7} {'validate':>8} | {'sustained':>9} {'ACK/s':>7} | {'offered':>7} "
        f"{'ACK p50':>7} {'p99':>6} | {'vis p50':>7} {'p99':>6} | {'AA':>7} {'no event':>8} {'DL':>4}"
    )
    print(head)
    print("-" * len(head))
    for r in runs:
        t, lat, c = r.throughput, r.latency, r.check
        print(
            f"{r.normalize_workers:>7} {'on' if r.validate else 'off':>8} | "
            f"{fmt(t.get('sustained_msgs_per_s')):>9} {fmt(t.get('ack_msgs_per_s')):>7} | "
            f"{fmt(lat.get('offered_msgs_per_s')):>7} {fmt(lat.get('ack_ms', {}).get('p50'), 1):>7} "
            f"{fmt(lat.get('ack_ms', {}).get('p99'), 1):>6} | "
            f"{fmt(lat.get('visible_ms', {}).get('p50')):>7} {fmt(lat.get('visible_ms', {}).get('p99')):>6} | "
            f"{c.get('acked_AA', 0):>7,} {c.get('AA_without_twin_event', 0):>8} {c.get('deadletters', 0):>4}"
        )
    print(
        "msg/s; latencies in ms (open loop at 'offered' msg/s); 'no event': AA-acknowledged "
        "messages without a twin event after the drain; DL: dead letters"
    )
    names = sorted({n for r in runs for n in r.rss_max_mib})
    print("\nper process: max RSS MiB / cores used during the throughput window")
    labels = [f"nw{r.normalize_workers} val {'on' if r.validate else 'off'}" for r in runs]
    print(f"{'process':>20} " + " ".join(f"{lab:>18}" for lab in labels))
    for n in names:
        cells = []
        for r in runs:
            rss = r.rss_max_mib.get(n)
            cpu = r.cpu_throughput.get(n)
            cells.append(f"{fmt(rss, 0):>8} / {fmt(cpu, 2):>5}")
        print(f"{n:>20} " + " ".join(f"{c:>18}" for c in cells))
    for key in ("ours", "other", "machine"):
        print(
            f"{'cores: ' + key:>20} "
            + " ".join(f"{fmt(r.cpu_throughput.get(key), 2):>18}" for r in runs)
        )
    if stages:
        print("\nstage cost, one core, in-process (no Kafka):")
        for key, label in (("no_validate", "off"), ("validate", "on")):
            s = stages.get(key)
            if s:
                print(
                    f"  validation {label:>3}: normalize {s['normalize_us_per_msg']:,.0f} µs/msg "
                    f"(≤ {s['normalize_msgs_per_s_one_core']:,.0f} msg/s per worker; CPU "
                    f"{s['normalize_cpu_us_per_msg']:,.0f}), assemble "
                    f"{s['assemble_us_per_msg']:,.0f} µs/msg (CPU "
                    f"{s['assemble_cpu_us_per_msg']:,.0f}); a new patient's first "
                    f"message {s['new_patient_normalize_us_per_msg']:,.0f} + "
                    f"{s['new_patient_assemble_us_per_msg']:,.0f} µs; Redis "
                    f"{s['redis_server_us_per_msg']:,.0f} µs, {s['redis_memory_kib_per_msg']:,.1f} "
                    "KiB per message"
                )
    if upd:
        print(
            f"\ntwin update cost ({upd['n']} applies each, 1 Observation + 1 Provenance): "
            f"size {upd['small_size']}: p50 {upd['small_us']['p50']:,.0f} µs, p99 "
            f"{upd['small_us']['p99']:,.0f}; size {upd['large_size']:,}: p50 "
            f"{upd['large_us']['p50']:,.0f} µs, p99 {upd['large_us']['p99']:,.0f}; ratio "
            f"{upd['ratio_small_over_large']:.3f}"
        )
        print(
            f"  Redis per apply: {upd['redis_small']['commands_per_apply']} vs "
            f"{upd['redis_large']['commands_per_apply']} commands, script "
            f"{upd['redis_small']['script_server_us_per_apply']} vs "
            f"{upd['redis_large']['script_server_us_per_apply']} µs server time"
        )
    for r in runs:
        print(
            f"\ntime series, nw{r.normalize_workers} validation {'on' if r.validate else 'off'} "
            f"(every {SERIES_S} s; throughput phase from t={r.phases.get('throughput_start')}, "
            f"latency phase from t={r.phases.get('latency_start')}):"
        )
        print("  t        " + " ".join(f"{row['t']:>5.0f}" for row in r.series))
        print("  visible/s" + " ".join(f"{row.get('visible_per_s', 0):>5}" for row in r.series))
        for proc in ("tansu", *sorted(n for n in r.rss_max_mib if n.startswith("normalize"))):
            print(
                f"  {proc[:9]:<9}"
                + " ".join(f"{row['cores'].get(proc, 0):>5.2f}" for row in r.series)
            )
        print("  other    " + " ".join(f"{row['cores'].get('other', 0):>5.2f}" for row in r.series))
    print("\ngoals:")
    for r in runs:
        for g in r.goals:
            v = "" if g["value"] is None else f" ({fmt(g['value'], 1)})"
            print(
                f"  {'PASS' if g['pass'] else 'FAIL'}  nw{r.normalize_workers} validation "
                f"{'on ' if r.validate else 'off'}: {g['goal']}{v}"
            )
    if upd:
        ok = upd["ratio_small_over_large"] >= GOAL_UPDATE_RATIO
        print(
            f"  {'PASS' if ok else 'FAIL'}  update-cost ratio (size 10 / size 10,000) ≥ "
            f"{GOAL_UPDATE_RATIO} ({upd['ratio_small_over_large']:.3f})"
        )


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--duration", type=float, default=60.0, help="throughput window, s (default 60)"
    )
    ap.add_argument(
        "--latency-duration",
        type=float,
        default=None,
        help="open-loop latency window, s (default: 40, or --duration if shorter)",
    )
    ap.add_argument(
        "--rate",
        type=float,
        default=None,
        help="offered load of the latency phase, msg/s (default 70%% of sustained)",
    )
    ap.add_argument(
        "--normalize-workers",
        default="1",
        help="normalize processes; a comma list runs each (default 1)",
    )
    ap.add_argument(
        "--partitions",
        type=int,
        default=0,
        help="partitions of each topic `fhirtwin up` creates (default: up's own default)",
    )
    ap.add_argument(
        "--batch-wait-ms",
        type=float,
        default=None,
        help="the MLLP listener's group-commit wait, `fhirtwin up --batch-wait-ms` "
        "(default: the listener's own)",
    )
    ap.add_argument(
        "--validate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="validation on or off (default: run both)",
    )
    ap.add_argument("--connections", type=int, default=4, help="MLLP connections (default 4)")
    ap.add_argument(
        "--window",
        type=int,
        default=16,
        help="un-ACKed messages per connection, closed loop (default 16)",
    )
    ap.add_argument(
        "--in-flight",
        type=int,
        default=3000,
        help="closed loop: most messages sent but not yet visible (default 3000)",
    )
    ap.add_argument("--patients", type=int, default=2000, help="distinct patients (default 2000)")
    ap.add_argument("--warmup-messages", type=int, default=400)
    ap.add_argument("--update-n", type=int, default=2000, help="timed applies per twin size")
    ap.add_argument("--stage-n", type=int, default=1000, help="messages for the stage cost")
    ap.add_argument("--skip-update-cost", action="store_true")
    ap.add_argument("--skip-stage-cost", action="store_true")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="cProfile the normalize handler in the stage-cost step; top N",
    )
    ap.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"JSON output (default {DEFAULT_JSON})"
    )
    args = ap.parse_args(argv)
    if args.latency_duration is None:
        args.latency_duration = min(40.0, args.duration)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    workers = [int(x) for x in str(args.normalize_workers).split(",") if x.strip()]
    validates = [True, False] if args.validate is None else [args.validate]
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

    t_begin = time.monotonic()
    machine = {
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_before": list(os.getloadavg()),
    }
    print(
        f"machine: {machine['cpu_count']} cores ({machine['cpu']}), Python {machine['python']}, "
        f"load average {' '.join(f'{x:.2f}' for x in machine['load_average_before'])}"
    )

    heap.enable()  # the stage cost runs the handlers as fhirtwin's workers run them
    # Every key, KEK and state file the bench makes goes in a temporary FHIRTWIN_HOME (one
    # per pipeline run inside it), removed at the end: never the user's ~/.fhirtwin.
    runs: list[RunResult] = []
    with private_home("fhirtwin-bench-e2e-") as scratch:
        upd = None if args.skip_update_cost else update_cost(args.update_n, 10, 10_000, 4)
        stages = (
            None if args.skip_stage_cost else stage_cost(args.stage_n, args.patients, args.profile)
        )
        if not args.skip_pipeline:
            for w in workers:
                for v in validates:
                    runs.append(run_pipeline(args, w, v, scratch))
    print_report(runs, upd, stages)
    total = time.monotonic() - t_begin
    print(
        f"\ntotal {total:.0f} s; load average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )

    result = {
        "bench": "e2e",
        "when": datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "method": {
            "pipeline": "fhirtwin.up.Supervisor (embedded Tansu, children `python -m fhirtwin.cli "
            "mllp | worker normalize | worker assemble`), private Redis on a free port",
            "load": f"tests/synth.py feed, {args.patients} patients, distinct MSH-10 per message",
            "throughput": f"closed loop, {args.connections} connections x window {args.window}, "
            f"at most {args.in_flight} sent-but-not-visible; messages whose twin event arrived "
            f"within the window after {RAMP_S:.0f} s ramp-up / window",
            "latency": "open loop at a fixed rate, measured from the scheduled send time; "
            "visible = first twin.events record with that source.control_id, consumed here",
            "rss": "VmRSS from /proc/<pid>/status every second, max",
            "cpu": "utime+stime from /proc/<pid>/stat over the throughput window, in cores",
            "update_cost": "TwinStore.apply in-process, private Redis, median per apply, "
            "alternating small/large",
        },
        "runs": [asdict(r) for r in runs],
        "update_cost": upd,
        "stage_cost": stages,
        "total_s": round(total, 1),
    }
    if upd:
        result["update_cost_goal"] = {
            "goal": f"ratio ≥ {GOAL_UPDATE_RATIO}",
            "value": upd["ratio_small_over_large"],
            "pass": upd["ratio_small_over_large"] >= GOAL_UPDATE_RATIO,
        }
    args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(f"wrote {args.json}")
    ok = all(g["pass"] for r in runs for g in r.goals) and (
        upd is None or upd["ratio_small_over_large"] >= GOAL_UPDATE_RATIO
    )
    return 0 if ok else 1


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


if __name__ == "__main__":
    sys.exit(main())
