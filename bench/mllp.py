"""MLLP listener throughput and ACK latency, durable (acks=all) against an embedded Tansu.

Usage (from the project root):
    .venv/bin/python bench/mllp.py [--seconds 10] [--connections 1,8] [--client threads]
                                   [--corpus DIR] [--json OUT] [--profile 25]

What runs where (the machine has 2 cores, so this matters):

* Tansu (``EmbeddedKafka``) is its own process, as in production.
* The MLLP server runs in a **subprocess** (this script with ``--serve``): it must not share a
  GIL with the load generator, or the bench would measure the client.
* The load generator is this process: raw sockets, frames prebuilt, every connection does
  send → wait for the ACK → next (no pipelining), so msg/s at 1 connection is 1 / round trip.
  For several connections ``--client threads`` (default) runs one thread per connection;
  ``asyncio`` runs them on one event loop; ``procs`` spreads them over 2 processes. See
  bench/README.md for which loads the server most.

Messages: every ``*.hl7`` of the corpus (``$FHIRTWIN_CORPUS`` or ../shared/corpus), split with
``split_batch``, else examples/hl7v2/*.hl7. Durability: after the run, the records added to
``ehr.hl7v2`` (high watermarks) must be at least the number of AA answers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import multiprocessing
import os
import platform
import pstats
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from fhirtwin import bus  # noqa: E402
from fhirtwin.hl7v2 import split_batch  # noqa: E402
from fhirtwin.infra import cpu_seconds  # noqa: E402

DEFAULT_JSON = BENCH_DIR / "results" / "mllp.json"
GOAL_ONE = 1000.0
GOAL_EIGHT = 5000.0


# --------------------------------------------------------------------------- input


def default_corpus() -> Path:
    env = os.environ.get("FHIRTWIN_CORPUS")
    if env:
        return Path(env)
    return (PROJECT_ROOT / ".." / "shared" / "corpus").resolve()


def load_messages(root: Path) -> tuple[list[bytes], str]:
    files = sorted(root.rglob("*.hl7")) if root.is_dir() else []
    source = str(root)
    if not files:
        files = sorted((PROJECT_ROOT / "examples" / "hl7v2").glob("*.hl7"))
        source = f"examples/hl7v2 (corpus {root} not found)"
    return [m for f in files for m in split_batch(f.read_bytes())], source


# --------------------------------------------------------------------------- server side


def serve_main(bootstrap: str, profile_out: str | None) -> None:
    """Subprocess entry: run the listener until stdin closes; print its port first."""
    from fhirtwin import heap
    from fhirtwin.mllp import MLLPServer

    heap.enable()  # as `fhirtwin mllp` runs it
    server = MLLPServer(bootstrap, "127.0.0.1", 0)
    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()

    def ready(port: int) -> None:
        print(f"PORT {port}", flush=True)

    if profile_out:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        try:
            server.run(stop, ready)
        finally:
            prof.disable()
            prof.dump_stats(profile_out)
    else:
        server.run(stop, ready)


# --------------------------------------------------------------------------- client side


@dataclass
class Load:
    messages: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    cpu: float = 0.0

    def add(self, other: Load) -> None:
        self.messages += other.messages
        for k, v in other.codes.items():
            self.codes[k] = self.codes.get(k, 0) + v
        self.latencies += other.latencies
        self.cpu += other.cpu


def _code(ack: bytes) -> str:
    i = ack.find(b"\rMSA")
    return ack[i + 5 : i + 7].decode("latin-1") if i >= 0 else "??"


def drive_socket(port: int, frames: list[bytes], offset: int, until: float) -> Load:
    """One connection, send → ACK → next, until the monotonic clock passes ``until``."""
    load = Load()
    lat = load.latencies
    codes: dict[str, int] = {}
    perf = time.perf_counter
    with socket.create_connection(("127.0.0.1", port), 30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send, recv = sock.sendall, sock.recv
        n = len(frames)
        i = offset
        buf = b""
        while True:
            t0 = perf()
            if t0 >= until:
                break
            send(frames[i % n])
            i += 1
            while True:
                j = buf.find(b"\x1c")
                if j >= 0:
                    break
                chunk = recv(65536)
                if not chunk:
                    raise ConnectionError("the server closed the connection")
                buf += chunk
            ack = buf[1:j]
            buf = buf[j + 2 :]
            lat.append(perf() - t0)
            c = _code(ack)
            codes[c] = codes.get(c, 0) + 1
    load.messages = len(lat)
    load.codes = codes
    return load


def run_threads(port: int, frames: list[bytes], conns: int, until: float) -> Load:
    results: list[Load] = [Load() for _ in range(conns)]
    errors: list[BaseException] = []

    def one(k: int) -> None:
        try:
            results[k] = drive_socket(port, frames, k * 17, until)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    total = Load()
    for r in results:
        total.add(r)
    return total


def run_asyncio(port: int, frames: list[bytes], conns: int, until: float) -> Load:
    async def one(k: int) -> Load:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        load = Load()
        perf = time.perf_counter
        n, i = len(frames), k * 17
        try:
            while True:
                t0 = perf()
                if t0 >= until:
                    break
                writer.write(frames[i % n])
                i += 1
                ack = await reader.readuntil(b"\x1c\r")
                load.latencies.append(perf() - t0)
                c = _code(ack[1:-2])
                load.codes[c] = load.codes.get(c, 0) + 1
        finally:
            writer.close()
        load.messages = len(load.latencies)
        return load

    async def main() -> Load:
        total = Load()
        for r in await asyncio.gather(*(one(k) for k in range(conns))):
            total.add(r)
        return total

    return asyncio.run(main())


def _proc_worker(args: tuple[int, list[bytes], int, float, int]) -> Load:
    port, frames, conns, until, base = args
    t0 = sum(os.times()[:2])
    load = run_threads(port, frames[base:] + frames[:base], conns, until)
    load.cpu = sum(os.times()[:2]) - t0
    return load


def run_procs(port: int, frames: list[bytes], conns: int, until: float) -> Load:
    procs = 2
    shares = [conns // procs + (1 if k < conns % procs else 0) for k in range(procs)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(procs) as pool:
        parts = pool.map(
            _proc_worker, [(port, frames, s, until, 7 * k) for k, s in enumerate(shares) if s]
        )
    total = Load()
    for p in parts:
        total.add(p)
    return total


CLIENTS = {"threads": run_threads, "asyncio": run_asyncio, "procs": run_procs}


# --------------------------------------------------------------------------- the bench


@dataclass
class Row:
    connections: int
    client: str
    seconds: float
    messages: int
    msgs_per_s: float
    p50_ms: float
    p99_ms: float
    aa: int
    other_codes: dict[str, int]
    cpu_server: float  # cores busy on average during the phase
    cpu_tansu: float
    cpu_client: float


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def count_records(bootstrap: str, topic: str) -> tuple[int, int]:
    """(records read back from the beginning, sum of high watermarks).

    Reading counts what is really there. The watermarks are reported too, but not trusted:
    Tansu's ListOffsets answered a few offsets *behind* the records already readable after
    concurrent produces (e.g. 32752 with offset 32756 readable), which would fail the
    durability check falsely.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bench-mllp-count",
            "enable.auto.commit": False,
            "fetch.max.bytes": 64 * 1024 * 1024,
        }
    )
    try:
        parts = bus.partitions_of(bootstrap, topic)
        marks = sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts)
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        count, idle = 0, 0
        while idle < 4:  # 2 s without a record: the end
            batch = c.consume(5000, 0.5)
            got = sum(1 for m in batch if m.error() is None)
            count += got
            idle = 0 if got else idle + 1
        return count, marks
    finally:
        c.close()


def phase(
    port: int, frames: list[bytes], conns: int, client: str, seconds: float, pids: dict[str, int]
) -> Row:
    runner = CLIENTS["threads" if conns == 1 and client != "asyncio" else client]
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    me0 = sum(os.times()[:2])
    t0 = time.perf_counter()
    load = runner(port, frames, conns, t0 + seconds)
    wall = time.perf_counter() - t0
    me = sum(os.times()[:2]) - me0 + load.cpu
    cpu = {k: (cpu_seconds(p) - cpu0[k]) / wall for k, p in pids.items()}
    aa = load.codes.get("AA", 0)
    return Row(
        connections=conns,
        client=client if conns > 1 else "threads",
        seconds=round(wall, 2),
        messages=load.messages,
        msgs_per_s=round(load.messages / wall, 1),
        p50_ms=round(percentile(load.latencies, 0.50) * 1000, 3),
        p99_ms=round(percentile(load.latencies, 0.99) * 1000, 3),
        aa=aa,
        other_codes={k: v for k, v in load.codes.items() if k != "AA"},
        cpu_server=round(cpu["server"], 2),
        cpu_tansu=round(cpu["tansu"], 2),
        cpu_client=round(me / wall, 2),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of each phase")
    ap.add_argument("--connections", default="1,8", help="comma-separated phases")
    ap.add_argument("--client", choices=sorted(CLIENTS), default="threads")
    ap.add_argument("--corpus", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--profile", type=int, default=0, help="print the server's top N functions")
    ap.add_argument("--serve", metavar="BOOTSTRAP", help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve_main(args.serve, args.profile_out)
        return 0

    from fhirtwin.infra import EmbeddedKafka

    messages, source = load_messages(args.corpus or default_corpus())
    frames = [b"\x0b" + m + b"\x1c\r" for m in messages]
    phases = [int(x) for x in args.connections.split(",") if x]
    print(
        f"{len(messages)} messages from {source}, "
        f"{statistics.mean(len(m) for m in messages) / 1024:.1f} KB on average"
    )
    profile_out = str(BENCH_DIR / "results" / "mllp-server.prof") if args.profile else None
    rows: list[Row] = []
    with EmbeddedKafka() as kafka:
        assert kafka.proc is not None
        bus.ensure_topics(kafka.bootstrap, partitions=4)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", kafka.bootstrap]
        if profile_out:
            Path(profile_out).parent.mkdir(parents=True, exist_ok=True)
            cmd += ["--profile-out", profile_out]
        server = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=PROJECT_ROOT
        )
        try:
            assert server.stdout is not None and server.stdin is not None
            line = server.stdout.readline().decode()
            if not line.startswith("PORT "):
                raise SystemExit(f"the MLLP server did not start: {line!r}")
            port = int(line.split()[1])
            # warm-up, not timed (its AAs count for the durability check)
            warm = run_threads(port, frames, 2, time.perf_counter() + 1.0).codes.get("AA", 0)
            pids = {"server": server.pid, "tansu": kafka.proc.pid}
            for conns in phases:
                row = phase(port, frames, conns, args.client, args.seconds, pids)
                rows.append(row)
                print(
                    f"  {conns} connection(s): {row.msgs_per_s:,.0f} msg/s, "
                    f"p50 {row.p50_ms} ms, p99 {row.p99_ms} ms",
                    flush=True,
                )
            stored, marks = count_records(kafka.bootstrap, bus.RAW_TOPICS["hl7v2"])
        finally:
            if server.stdin is not None:
                with contextlib.suppress(OSError):
                    server.stdin.close()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    total_aa = sum(r.aa for r in rows) + warm
    durable = stored >= total_aa

    print()
    head = (
        f"{'conns':>5} {'client':>8} {'msg/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'AA':>8} "
        f"{'other':>6} {'cpu srv':>7} {'tansu':>6} {'client':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.connections:>5} {r.client:>8} {r.msgs_per_s:>9,.0f} {r.p50_ms:>8.3f} "
            f"{r.p99_ms:>8.3f} {r.aa:>8} {sum(r.other_codes.values()):>6} "
            f"{r.cpu_server:>7.2f} {r.cpu_tansu:>6.2f} {r.cpu_client:>6.2f}"
        )
    print(
        f"\ndurability: {stored} records read back from ehr.hl7v2 (watermarks say {marks}) "
        f"for {total_aa} AA answers (warm-up included)"
    )
    verdicts: list[tuple[str, bool]] = [("durable (records >= AA)", durable)]
    for r in rows:
        if r.connections == 1:
            verdicts.append((f">= {GOAL_ONE:,.0f} msg/s on 1 connection", r.msgs_per_s >= GOAL_ONE))
        if r.connections == 8:
            verdicts.append(
                (f">= {GOAL_EIGHT:,.0f} msg/s on 8 connections", r.msgs_per_s >= GOAL_EIGHT)
            )
        if r.other_codes:
            verdicts.append((f"only AA at {r.connections} connection(s)", False))
    for what, ok in verdicts:
        print(f"  {'PASS' if ok else 'FAIL'}  {what}")
    passed = all(ok for _, ok in verdicts)
    print("PASS" if passed else "FAIL")

    if profile_out and Path(profile_out).exists():
        out = io.StringIO()
        stats = pstats.Stats(profile_out, stream=out)
        stats.sort_stats("tottime").print_stats(args.profile)
        print("\nserver event-loop thread, by own time:\n" + out.getvalue())

    args.json.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "bench": "mllp",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "setup": {
            "server": "subprocess (bench/mllp.py --serve), asyncio + poll thread, linger.ms 0",
            "broker": "Tansu (EmbeddedKafka), in memory, 4 partitions, acks=all",
            "client": args.client,
            "mode": "per connection: send, wait for the ACK, next",
            "messages": len(messages),
            "source": source,
            "mean_bytes": round(statistics.mean(len(m) for m in messages)),
        },
        "rows": [asdict(r) for r in rows],
        "durability": {"stored": stored, "watermarks": marks, "aa": total_aa, "ok": durable},
        "goals": {"one_connection": GOAL_ONE, "eight_connections": GOAL_EIGHT},
        "verdicts": {what: ok for what, ok in verdicts},
        "pass": passed,
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
