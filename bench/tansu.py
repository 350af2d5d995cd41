"""Tansu (the embedded broker) under a steady trickle: what a following consumer costs it.

Usage (from the project root):
    .venv/bin/python bench/tansu.py [--seconds 40] [--rate 500] [--json OUT]

One producer writes ``--rate`` records/s of 700 bytes (the e2e feed's size) to a 4-partition
topic, each its own record batch (linger.ms 0, as the MLLP listener writes), for
``--seconds``. Every 5 s the bench samples the cores Tansu used (utime+stime from /proc); at
the end it prints them and the records consumed. Four configurations, each on a fresh Tansu:

* ``no consumer``: produce only;
* ``one consumer``: a consumer group follows the topic with fhirtwin's settings
  (``bus.consumer``: fetch.wait.max.ms 50), as the normalize worker does;
* ``one consumer, fetch.min.bytes 64 KB, fetch.wait.max.ms 100``: a broker asked to wait;
* ``one consumer, paced 100 ms``: librdkafka fetches a partition again only 100 ms after a
  fetch left records in its queue (``bus.paced``: what ``fhirtwin up``'s workers do).

Why: Tansu's ``memory://`` engine stores each record batch as one object, with no index
from offset to batch. Every fetch that finds new records lists all the objects of the
partition (``DynoStore::fetch``), so its cost grows with the batches stored, and a
consumer that fetches as each record lands makes Tansu's CPU climb. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from fhirtwin import bus  # noqa: E402
from fhirtwin.infra import EmbeddedKafka, cpu_seconds  # noqa: E402

DEFAULT_JSON = BENCH_DIR / "results" / "tansu.json"
TOPIC = "bench.trickle"
SAMPLE_S = 5

CONFIGS: list[tuple[str, dict[str, Any] | None]] = [
    ("no consumer", None),
    ("one consumer", {}),
    (
        "one consumer, fetch.min.bytes 64 KB, fetch.wait.max.ms 100",
        {"fetch.min.bytes": 65536, "fetch.wait.max.ms": 100},
    ),
    # what the workers of `fhirtwin up` do on the embedded broker (FHIRTWIN_FETCH_PACE_MS)
    ("one consumer, paced 100 ms (bus.paced)", bus.paced(100)),
]


def run(seconds: int, rate: int, consumer_conf: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Samples every SAMPLE_S seconds: time, records produced and consumed, Tansu cores."""
    with EmbeddedKafka() as k:
        assert k.proc is not None
        bus.ensure_topics(k.bootstrap, [TOPIC], partitions=4)
        prod = bus.producer(k.bootstrap, linger_ms=0)
        stop = threading.Event()
        consumed = [0]

        def follow() -> None:
            c = bus.consumer(k.bootstrap, "bench-tansu", **(consumer_conf or {}))
            c.subscribe([TOPIC])
            while not stop.is_set():
                for m in c.consume(500, 0.02):
                    if m.error() is None:
                        consumed[0] += 1
            c.close()

        reader = None
        if consumer_conf is not None:
            reader = threading.Thread(target=follow, daemon=True)
            reader.start()
        value = b"x" * 700
        samples = []
        produced = 0
        start = time.monotonic()
        last_cpu, last_t = cpu_seconds(k.proc.pid), start
        while (now := time.monotonic()) - start < seconds:
            due = int((now - start) * rate)
            while produced < due:
                prod.produce(TOPIC, value, key=str(produced % 97).encode())
                produced += 1
            prod.poll(0)
            if now - last_t >= SAMPLE_S:
                cpu = cpu_seconds(k.proc.pid)
                samples.append(
                    {
                        "t": round(now - start),
                        "produced": produced,
                        "consumed": consumed[0],
                        "tansu_cores": round((cpu - last_cpu) / (now - last_t), 3),
                    }
                )
                last_cpu, last_t = cpu, now
            time.sleep(0.002)
        prod.flush(10)
        stop.set()
        if reader is not None:
            reader.join(10)
        return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=40)
    ap.add_argument("--rate", type=int, default=500, help="records/s, one batch each")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    load = os.getloadavg()
    print(
        f"Tansu under a trickle: {args.rate} records/s of 700 B, one batch each, 4 partitions, "
        f"{args.seconds} s per configuration; load average {load[0]:.2f}"
    )
    results = []
    for name, conf in CONFIGS:
        samples = run(args.seconds, args.rate, conf)
        results.append({"config": name, "consumer_conf": conf, "samples": samples})
        row = "  ".join(f"{s['tansu_cores']:.2f}" for s in samples)
        print(f"\n{name}\n  t (s)        " + "  ".join(f"{s['t']:4d}" for s in samples))
        print(f"  Tansu cores  {row}")
        print(f"  consumed     {samples[-1]['consumed'] if samples else 0:,} records")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "bench": "tansu",
                "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "rate": args.rate,
                "seconds": args.seconds,
                "load_average": load,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
