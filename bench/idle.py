"""What an idle `fhirtwin up` costs: the cores each of its processes uses with no feed.

Usage (from the project root):
    .venv/bin/python bench/idle.py [--settle 20] [--seconds 20] [--json OUT]

Starts ``fhirtwin up`` as a user does (the installed command, embedded Tansu, a Redis of its
own, free ports, a temporary ``$FHIRTWIN_HOME``), waits until ``/health`` says ok and then
``--settle`` seconds more (the consumer groups join), then reads utime+stime of every
process of the tree (from /proc) over ``--seconds``. Prints one row per process and the
total; writes JSON. Nothing is sent: this is the floor every deployment of the embedded
default pays, and the part of the pipeline's budget that idle consumers take. About a
minute.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from fhirtwin.infra import free_port, proc_usage  # noqa: E402

DEFAULT_JSON = BENCH_DIR / "results" / "idle.json"


def tree(root: int) -> dict[int, str]:
    """pid → command line of ``root`` and every descendant (Tansu runs in its own session,
    but it is still a child of ``fhirtwin up``)."""
    parent: dict[int, int] = {}
    cmd: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd[int(entry.name)] = (entry / "cmdline").read_text().replace("\0", " ").strip()
        except OSError:
            continue
        parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out = {root: cmd.get(root, "")}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parent.items():
            if ppid in out and pid not in out:
                out[pid] = cmd.get(pid, "")
                grew = True
    return out


def name_of(cmd: str) -> str:
    if "tansu" in cmd:
        return "tansu"
    if "redis-server" in cmd or "valkey-server" in cmd:
        return "redis"
    if " up " in f"{cmd} " and "fhirtwin" in cmd:
        return "fhirtwin up (supervisor, HTTP)"
    if "fhirtwin.cli" in cmd:
        words = [w for w in cmd.split("fhirtwin.cli", 1)[1].split() if w != "--source"]
        return " ".join(words[:1] if words[:1] == ["mllp"] else words[:3])
    return cmd[:40]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settle", type=float, default=20.0, help="s after /health says ok")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured window, s")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args()

    exe = Path(sys.executable).with_name("fhirtwin")
    http, mllp = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="fhirtwin-idle-") as home:
        env = {**os.environ, "FHIRTWIN_HOME": home}
        cmd = [str(exe), "up", "--mllp-port", str(mllp), "--http-port", str(http)]
        up = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                if up.poll() is not None:
                    sys.exit(f"fhirtwin up exited ({up.returncode}): {up.stderr.read()[-2000:]}")
                try:
                    if httpx.get(f"http://127.0.0.1:{http}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    sys.exit("fhirtwin up: /health did not say ok within 120 s")
                time.sleep(0.5)
            time.sleep(args.settle)
            procs = tree(up.pid)
            before = {pid: proc_usage(pid) for pid in procs}
            time.sleep(args.seconds)
            rows: list[dict[str, Any]] = []
            for pid, cmdline in procs.items():
                a, b = before[pid], proc_usage(pid)
                if a is None or b is None:
                    continue
                rows.append(
                    {
                        "process": name_of(cmdline),
                        "pid": pid,
                        "cores": (b[0] - a[0]) / args.seconds,
                        "rss_mib": b[1] / 2**20,
                    }
                )
        finally:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()
    rows.sort(key=lambda r: -r["cores"])
    total = sum(r["cores"] for r in rows)
    print(f"idle `fhirtwin up`, {args.seconds:.0f} s after {args.settle:.0f} s of settling")
    print(f"{'process':34s} {'cores':>7s} {'RSS MiB':>8s}")
    for r in rows:
        print(f"{r['process']:34s} {r['cores']:7.3f} {r['rss_mib']:8.0f}")
    print(f"{'total':34s} {total:7.3f}")
    out = {"settle_s": args.settle, "seconds": args.seconds, "total_cores": total, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
