"""Command-line faces of the pipeline: up, mllp, send, ingest, workers, twins, dead letters."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fhirtwin import bus
from fhirtwin.infra import Endpoints, InfraError, read_state, resolve_endpoints

out = Console()
err = Console(stderr=True)

worker_app = typer.Typer(
    help="Run one worker of the pipeline (a cluster runs many).", no_args_is_help=True
)
twin_app = typer.Typer(help="Read twins from the store.", no_args_is_help=True)
dl_app = typer.Typer(help="Inspect and replay dead letters.", no_args_is_help=True)

KafkaOpt = Annotated[
    str | None,
    typer.Option(
        "--kafka",
        help="Kafka bootstrap HOST:PORT (default: the running `fhirtwin up`, or $FHIRTWIN_KAFKA)",
    ),
]
RedisOpt = Annotated[
    str | None,
    typer.Option(
        "--redis", help="Redis URL (default: the running `fhirtwin up`, or $FHIRTWIN_REDIS)"
    ),
]

GROUPS = {
    **{
        f"normalize-{kind}": (f"fhirtwin-normalize-{kind}", [bus.RAW_TOPICS[kind]])
        for kind in ("hl7v2", "ccda", "csv", "fhir", "notes")  # the normalizers `fhirtwin up` runs
    },
    "assemble": ("fhirtwin-assemble", [bus.RESOURCES]),
    "snapshot": ("fhirtwin-snapshot", [bus.TWIN_EVENTS]),
    "audit": ("fhirtwin-audit-sequencer", [bus.AUDIT]),
    "results": ("fhirtwin-results", [bus.RESULTS]),
}


def _endpoints(kafka: str | None, redis_url: str | None) -> Endpoints:
    try:
        return resolve_endpoints(kafka, redis_url)
    except InfraError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def _kafka_only(kafka: str | None) -> str:
    """Commands that need only Kafka: --kafka, $FHIRTWIN_KAFKA, or the running `fhirtwin up`."""
    import os

    bootstrap = kafka or os.environ.get("FHIRTWIN_KAFKA") or (read_state() or {}).get("kafka")
    if not bootstrap:
        err.print("[red]no Kafka: start `fhirtwin up` first, or pass --kafka HOST:PORT[/red]")
        raise typer.Exit(2)
    return str(bootstrap)


def _logging() -> None:
    from fhirtwin.logs import configure

    configure()  # $FHIRTWIN_LOG_FORMAT=json: one JSON object per line, no PHI (fhirtwin/logs.py)


def run_worker(
    make: Callable[[Endpoints], Any],
    kafka: str | None,
    redis_url: str | None,
    metrics_port: int = 0,
) -> None:
    """What every `fhirtwin worker …` does: JSON logs, find the servers, expose metrics,
    stop cleanly on SIGTERM/SIGINT, and run the worker ``make`` builds."""
    import os

    from fhirtwin.metrics import serve, watch_worker
    from fhirtwin.worker import install_stop_signals

    _logging()
    ep = _endpoints(kafka, redis_url)
    serve(metrics_port)
    stop = threading.Event()
    install_stop_signals(stop)
    worker = make(ep)  # /health, /ready and consumer lag (fhirtwin/metrics.py)
    watch_worker(
        worker, ep.redis, stop, lag=bool(metrics_port or os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    )
    worker.run(stop)


def _iso(ms: int | str) -> str:
    return (
        datetime.fromtimestamp(int(ms) / 1000, UTC)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z")
    )


def register(app: typer.Typer) -> None:
    app.add_typer(worker_app, name="worker")
    app.add_typer(twin_app, name="twin")
    app.add_typer(dl_app, name="deadletter")
    app.command()(up)
    app.command()(mllp)
    app.command()(send)
    app.command()(ingest)
    app.command()(rebuild)
    app.command()(status)


# -- up ---------------------------------------------------------------------------------


def up(
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
    mllp_port: Annotated[int, typer.Option(help="MLLP listener port")] = 2575,
    mllp_host: Annotated[
        str, typer.Option(help="MLLP listen address (0.0.0.0 for a network)")
    ] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="health and metrics port")] = 8080,
    partitions: Annotated[int, typer.Option(help="partitions of each topic it creates")] = 4,
    normalize_workers: Annotated[int, typer.Option(help="normalize processes for hl7v2")] = 1,
    validate: Annotated[bool, typer.Option(help="validate every resource against FHIR R4")] = True,
    mappings: Annotated[
        Path | None, typer.Option(help="mappings folder (default: the shipped one)")
    ] = None,
    batch_wait_ms: Annotated[
        float | None,
        typer.Option(help="the MLLP listener's --batch-wait-ms (default: the listener's, 5)"),
    ] = None,
) -> None:
    """Start everything on this machine: Kafka, Redis, MLLP listener, workers, health/metrics."""
    from fhirtwin.up import Supervisor, UpConfig

    if (state := read_state()) is not None:
        err.print(
            f"[red]fhirtwin up is already running (pid {state.get('pid')}); stop it first[/red]"
        )
        raise typer.Exit(2)
    sup = Supervisor(
        UpConfig(
            kafka=kafka,
            redis=redis_url,
            mllp_host=mllp_host,
            mllp_port=mllp_port,
            http_port=http_port,
            partitions=partitions,
            normalize_workers=normalize_workers,
            validate=validate,
            mappings=str(mappings) if mappings else None,
            batch_wait_ms=batch_wait_ms,
        )
    )
    import signal

    def on_signal(signum: int, frame: object) -> None:
        sup.stop_event.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        info = sup.start()
    except InfraError as exc:
        err.print(f"[red]{exc}[/red]")
        sup.stop()
        raise typer.Exit(2) from None
    kafka_kind = "embedded Tansu" if info["kafka_embedded"] else "external"
    redis_kind = "started here" if info["redis_started"] else "existing server"
    out.print("[bold]fhirtwin up[/bold]")
    out.print(f"  Kafka      {info['kafka']}  ({kafka_kind})")
    out.print(f"  Redis      {info['redis']}  ({redis_kind})")
    out.print(f"  MLLP       {info['mllp']}")
    out.print(f"  health     {info['http']}/health   metrics {info['http']}/metrics")
    if sup.dev_token:  # docs/auth.md; `fhirtwin token` prints a fresh one
        out.print(f"  token      {sup.dev_token}", highlight=False, soft_wrap=True)
    out.print(f"  workers    {', '.join(c.name for c in sup.children)}")
    out.print("Ctrl-C stops everything.", style="dim")
    try:
        sup.supervise()
    finally:
        out.print("stopping…", style="dim")
        sup.stop()
        out.print("stopped.")


# -- parts run alone --------------------------------------------------------------------


def mllp(
    kafka: KafkaOpt = None,
    host: Annotated[str, typer.Option(help="listen address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="listen port")] = 2575,
    max_frame: Annotated[int, typer.Option(help="largest message in bytes")] = 1024 * 1024,
    idle_timeout: Annotated[
        float, typer.Option(help="close connections idle this many seconds")
    ] = 300.0,
    max_connections: Annotated[int, typer.Option(help="connections served at once")] = 1000,
    batch_wait_ms: Annotated[
        float,
        typer.Option(
            help="ms a message may wait to share a Kafka write when several connections "
            "send at once (0: never); a lone sender is never held"
        ),
    ] = 5.0,
    metrics_port: Annotated[int, typer.Option(help="serve /metrics on this port (0: off)")] = 0,
) -> None:
    """The MLLP listener alone: ACK each HL7 v2 message once Kafka has it."""
    from fhirtwin.metrics import serve, set_ready
    from fhirtwin.mllp import Limits, MLLPServer
    from fhirtwin.worker import install_stop_signals

    _logging()
    bootstrap = _kafka_only(kafka)
    serve(metrics_port)
    stop = threading.Event()
    install_stop_signals(stop)
    limits = Limits(
        max_frame_bytes=max_frame,
        idle_timeout=idle_timeout,
        max_connections=max_connections,
        batch_wait=max(0.0, batch_wait_ms) / 1000,
    )
    server = MLLPServer(bootstrap, host=host, port=port, limits=limits)

    def ready(p: int) -> None:
        set_ready()  # /ready on --metrics-port
        err.print(f"MLLP listening on {host}:{p}")

    server.run(stop, ready=ready)


def worker_normalize(
    source: Annotated[
        str, typer.Option(help=f"source kind: {', '.join(bus.SOURCE_KINDS)}")
    ] = "hl7v2",
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
    validate: Annotated[
        bool, typer.Option(help="validate resources (FHIR R4) before publishing")
    ] = True,
    mappings: Annotated[Path | None, typer.Option(help="mappings folder")] = None,
    metrics_port: Annotated[int, typer.Option(help="serve /metrics on this port (0: off)")] = 0,
) -> None:
    """A normalize worker: raw records → FHIR resources (or dead letters)."""
    from fhirtwin.normalize import NormalizeWorker

    if source not in bus.RAW_TOPICS:
        err.print(f"[red]unknown source {source!r}; one of {', '.join(bus.SOURCE_KINDS)}[/red]")
        raise typer.Exit(2)
    run_worker(
        lambda ep: NormalizeWorker(
            ep.kafka, ep.redis, source, validate=validate, mappings=mappings
        ),
        kafka,
        redis_url,
        metrics_port,
    )


def worker_assemble(
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
    metrics_port: Annotated[int, typer.Option(help="serve /metrics on this port (0: off)")] = 0,
) -> None:
    """The twin assembler: fhir.resources → Redis twins (commit after the write)."""
    from fhirtwin.assemble import AssembleWorker

    run_worker(lambda ep: AssembleWorker(ep.kafka, ep.redis), kafka, redis_url, metrics_port)


worker_app.command("normalize")(worker_normalize)
worker_app.command("assemble")(worker_assemble)


# -- feeding data in --------------------------------------------------------------------


def send(
    paths: Annotated[list[Path], typer.Argument(help="HL7 v2 files (batches are split)")],
    host: Annotated[str, typer.Option(help="MLLP host")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="MLLP port")] = 2575,
    wait: Annotated[float, typer.Option(help="keep trying to connect this many seconds")] = 0.0,
) -> None:
    """Send HL7 v2 messages over MLLP and print each acknowledgement code."""
    import socket

    from fhirtwin.ingest import records_of
    from fhirtwin.mllp import ack_code
    from fhirtwin.mllp import send as mllp_send

    messages: list[tuple[str, bytes]] = []
    for p in paths:
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in files:
            for i, rec in enumerate(records_of(f, "hl7v2")):
                messages.append((f"{f.name}#{i + 1}", rec.value))
    deadline = time.monotonic() + wait
    while True:  # a listener that is still starting refuses connections for a moment
        try:
            socket.create_connection((host, port), 1).close()
            break
        except OSError:
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
    try:
        acks = mllp_send(host, port, [m for _, m in messages])
    except OSError as exc:
        err.print(f"[red]cannot reach MLLP {host}:{port}: {exc}; is `fhirtwin up` running?[/red]")
        raise typer.Exit(2) from None
    bad = 0
    for (name, _), ack in zip(messages, acks, strict=False):
        code = ack_code(ack)
        bad += code != "AA"
        out.print(f"{code}  {name}")
    if bad or len(acks) < len(messages):
        raise typer.Exit(1)


def ingest(
    paths: Annotated[list[str], typer.Argument(help="files or folders")],
    source: Annotated[
        str, typer.Option("--from", help=f"source kind: {', '.join(bus.SOURCE_KINDS)}")
    ] = "hl7v2",
    kafka: KafkaOpt = None,
    patient: Annotated[
        str | None,
        typer.Option(
            "--patient",
            help="notes: whom plain-text notes are about (Patient/<id> or system|value)",
        ),
    ] = None,
) -> None:
    """Put files on the raw topic of their kind (original bytes, with a progress bar)."""
    from fhirtwin.ingest import ingest as do_ingest

    bootstrap = _kafka_only(kafka)
    source = "notes" if source == "note" else source
    extra = [("fhirtwin-patient", patient.encode())] if patient else []
    if source not in bus.RAW_TOPICS:
        err.print(
            f"[red]unknown source kind {source!r}; one of {', '.join(bus.SOURCE_KINDS)}[/red]"
        )
        raise typer.Exit(2)
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        err.print(f"[red]not found: {', '.join(missing)}[/red]")
        raise typer.Exit(2)
    with Progress(
        TextColumn("ingest"),
        BarColumn(),
        TextColumn("{task.completed} records"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as bar:
        task = bar.add_task("ingest", total=None)
        counts = do_ingest(
            bootstrap, source, paths, progress=lambda n: bar.advance(task, n), headers=extra
        )
    out.print(
        f"ingested {counts['records']} records ({counts['bytes']:,} bytes) from {counts['files']} "
        f"files into {bus.RAW_TOPICS[source]}"
    )


# -- state ------------------------------------------------------------------------------


def status(
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
    wait: Annotated[
        bool, typer.Option(help="wait until every consumer group has caught up")
    ] = False,
    timeout: Annotated[float, typer.Option(help="give up waiting after this many seconds")] = 120.0,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Where the servers are, consumer lag, twins and dead letters."""
    from fhirtwin.redisconn import connect
    from fhirtwin.twin import TwinStore

    ep = _endpoints(kafka, redis_url)
    deadline = time.monotonic() + timeout
    while True:
        lags = {name: bus.group_lag(ep.kafka, g, topics) for name, (g, topics) in GROUPS.items()}
        if not wait or not any(lags.values()):
            break
        if time.monotonic() > deadline:
            err.print(f"[red]still behind after {timeout:.0f} s: {lags}[/red]")
            raise typer.Exit(1)
        time.sleep(0.3)
    store = TwinStore(connect(ep.redis))
    dead = sum(1 for _ in bus.read_topic(ep.kafka, bus.DEADLETTER, timeout=3))
    info = {
        "kafka": ep.kafka,
        "redis": ep.redis,
        "lag": lags,
        "twins": len(store.twins()),
        "deadletters": dead,
    }
    if json_out:
        sys.stdout.write(orjson.dumps(info).decode() + "\n")
        return
    out.print(f"Kafka {ep.kafka}   Redis {ep.redis}")
    out.print("lag: " + ", ".join(f"{k} {v}" for k, v in lags.items()))
    out.print(f"twins: {info['twins']}   dead letters: {dead}")


def rebuild(
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask before emptying Redis")] = False,
) -> None:
    """Empty the twin store and replay fhir.resources into it (Kafka is the source of truth)."""
    from fhirtwin.assemble import rebuild as do_rebuild

    ep = _endpoints(kafka, redis_url)
    if not yes:
        typer.confirm(f"Delete every twin in {ep.redis} and rebuild them from Kafka?", abort=True)
    t0 = time.perf_counter()
    res = do_rebuild(ep.kafka, ep.redis)
    out.print(
        f"rebuilt {res['twins']} twins from {res['events']} events in {time.perf_counter() - t0:.1f} s "
        f"(deleted {res['deleted_keys']} keys first)"
    )


# -- twins ------------------------------------------------------------------------------


@twin_app.command("list")
def twin_list(
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="JSON: one object per twin")] = False,
) -> None:
    """Every twin with its identifiers and resource counts."""
    from fhirtwin.redisconn import connect
    from fhirtwin.twin import TwinStore

    ep = _endpoints(kafka, redis_url)
    store = TwinStore(connect(ep.redis))
    rows: list[dict[str, Any]] = []
    for twin in store.twins():
        counts = store.counts(twin)
        rows.append(
            {
                "twin": twin,
                "identifiers": store.identifiers(twin),
                "resources": counts,
                "total": sum(counts.values()),
            }
        )
    if json_out:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    table = Table(title=f"{len(rows)} twins")
    table.add_column("twin", no_wrap=True)
    table.add_column("identifiers")
    table.add_column("resources", justify="right")
    table.add_column("by type")
    for row in rows:
        table.add_row(
            row["twin"],
            "\n".join(row["identifiers"]),
            str(row["total"]),
            ", ".join(f"{k} {v}" for k, v in row["resources"].items()),
        )
    out.print(table)


@twin_app.command("show")
def twin_show(
    key: Annotated[
        str, typer.Argument(help="twin id or patient identifier (system|value, or an MRN)")
    ],
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="a FHIR Bundle (collection) of the twin's resources")
    ] = False,
    as_of: Annotated[
        str | None, typer.Option(help="the twin as known at this ISO date-time")
    ] = None,
) -> None:
    """A twin: resources by type, timeline and derived state (or its FHIR resources as JSON)."""
    from fhirtwin.redisconn import connect
    from fhirtwin.twin import TwinStore, fhir_time_ms

    ep = _endpoints(kafka, redis_url)
    store = TwinStore(connect(ep.redis))
    twin = store.resolve(key)
    if twin is None:
        err.print(
            f"[red]no twin for {key!r}: give a twin id, system|value, or an identifier value[/red]"
        )
        raise typer.Exit(1)
    offsets: dict[str, int] = store.offsets(twin)
    if as_of:
        ms = fhir_time_ms(as_of)
        if ms is None:
            err.print(
                f"[red]--as-of {as_of!r} is not an ISO date-time (e.g. 2026-11-25T10:00:00Z)[/red]"
            )
            raise typer.Exit(2)
        snap = store.as_of(twin, ms)
        resources, offsets = snap["resources"], snap["offsets"]
    else:
        resources = store.resources(twin)
    if json_out:
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "collection",
            "meta": {"tag": [{"system": "https://fhirtwin.dev/twin", "code": twin}]},
            "entry": [
                {"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r} for r in resources
            ],
        }
        if as_of:
            bundle["timestamp"] = as_of
        sys.stdout.write(orjson.dumps(bundle, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    by_type: dict[str, int] = {}
    for r in resources:
        by_type[r["resourceType"]] = by_type.get(r["resourceType"], 0) + 1
    out.print(f"[bold]twin {twin}[/bold]" + (f"  as of {as_of}" if as_of else ""))
    out.print("identifiers: " + ", ".join(store.identifiers(twin)))
    out.print("resources:   " + ", ".join(f"{k} {v}" for k, v in sorted(by_type.items())))
    out.print("from:        " + ", ".join(f"{k}@{v}" for k, v in sorted(offsets.items())))
    state = store.state(twin)
    cur = {f"{r['resourceType']}/{r['id']}": r for r in resources}
    for name in ("problems", "medications", "allergies"):
        out.print(
            f"[bold]{name}[/bold]: "
            + ("; ".join(_label(cur.get(ref), ref) for ref in state[name]) or "none")
        )
    for name in ("vitals", "labs"):
        items = state[name]
        out.print(
            f"[bold]latest {name}[/bold]: "
            + ("; ".join(_label(cur.get(ref), ref) for ref in items.values()) or "none")
        )
    table = Table(title="timeline")
    table.add_column("clinical time")
    table.add_column("resource")
    for ms, ref in store.timeline(twin)[-30:]:
        table.add_row(_iso(ms), _label(cur.get(ref), ref))
    out.print(table)
    for source, rec in sorted(store.merged_from(twin).items()):
        out.print(
            f"merged in:   twin {source} at {_iso(rec['at'])} ("
            + ", ".join(rec.get("identifiers") or ["no identifiers"])
            + f"): `fhirtwin twin unmerge {source} --reason ...` gives it back"
        )
    for link in store.links(twin)[:10]:
        out.print(f"identity: {orjson.dumps(link).decode()}", style="dim")


@twin_app.command("unmerge")
def twin_unmerge(
    key: Annotated[
        str,
        typer.Argument(
            help="the twin merged away (its id), or an identifier it held (system|value, or an MRN)"
        ),
    ],
    reason: Annotated[str, typer.Option(help="why the merge was wrong (kept in the log)")],
    by: Annotated[
        str, typer.Option(help="who asks (kept in the log; default: the user name)")
    ] = "",
    wait: Annotated[
        float, typer.Option(help="seconds to wait for the assembler to do it (0: don't wait)")
    ] = 30.0,
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
) -> None:
    """Undo a merge that was wrong: the twin merged away comes back with its own data.

    The request goes through fhir.resources like every change to a twin (so `fhirtwin
    rebuild` replays it); the assembler gives back what came from the merged twin, its
    identifiers find it again, and both twins' subscribers are told (twin.events)."""
    import getpass
    import time

    from fhirtwin.assemble import find_unmerge, request_unmerge
    from fhirtwin.redisconn import connect
    from fhirtwin.twin import TwinStore, UnmergeError

    ep = _endpoints(kafka, redis_url)
    store = TwinStore(connect(ep.redis))
    try:
        req = find_unmerge(store, key)
    except UnmergeError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    try:
        request_unmerge(
            ep.kafka,
            store,
            req,
            reason=reason,
            by=by or getpass.getuser(),
            now_ms=int(time.time() * 1000),
        )
    except RuntimeError as exc:  # Kafka did not acknowledge it
        err.print(f"[red]{exc}: nothing was asked; is Kafka up? try again[/red]")
        raise typer.Exit(2) from None
    out.print(
        f"unmerge of twin {req.source} out of twin {req.target} (merged {_iso(req.merged_at)}) "
        "is on fhir.resources"
    )
    deadline = time.monotonic() + wait
    while wait > 0 and time.monotonic() < deadline:
        if store.r.sismember("ft:twins", req.source):  # the unmerge's last step
            counts = store.counts(req.source)
            out.print(
                f"done: twin {req.source} holds {sum(counts.values())} resources again "
                f"({', '.join(f'{k} {v}' for k, v in counts.items())}); identifiers: "
                + ", ".join(store.identifiers(req.source))
            )
            return
        time.sleep(0.2)
    if wait > 0:
        err.print(
            f"[yellow]not done after {wait:g} s: is the assembler running? "
            "(`fhirtwin twin show` tells when it is)[/yellow]"
        )
        raise typer.Exit(3)


def _label(res: dict[str, Any] | None, ref: str) -> str:
    if res is None:
        return ref
    for key in ("code", "medicationCodeableConcept", "type", "vaccineCode"):
        concept = res.get(key)
        if isinstance(concept, list):
            concept = concept[0] if concept else None
        if isinstance(concept, dict):
            text = concept.get("text") or next(
                (
                    c.get("display") or c.get("code")
                    for c in concept.get("coding", ())
                    if isinstance(c, dict)
                ),
                None,
            )
            if text:
                value = ""
                q = res.get("valueQuantity")
                if isinstance(q, dict) and "value" in q:
                    value = f" = {q['value']} {q.get('unit', '')}".rstrip()
                elif "valueString" in res:
                    value = f" = {res['valueString'][:40]}"
                return f"{res['resourceType']} {text}{value}"
    return ref


# -- dead letters -----------------------------------------------------------------------


@dl_app.command("list")
def dl_list(
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    open_only: Annotated[bool, typer.Option("--open", help="only those not replayed yet")] = False,
) -> None:
    """Every dead letter: id, when, stage, reason."""
    from fhirtwin.deadletter import corrections, list_deadletters, replayed_ids

    ep = _endpoints(kafka, redis_url)
    done, fixed = replayed_ids(ep.redis), corrections(ep.redis)
    letters = [d for d in list_deadletters(ep.kafka) if not (open_only and d.id in done)]
    if json_out:
        data = [d.as_dict(d.id in done, fixed.get(d.id)) for d in letters]
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    table = Table(title=f"{len(letters)} dead letters")
    for col in ("id", "at", "stage", "source", "replayed", "reason"):
        table.add_column(col)
    for d in letters:
        state = "corrected" if d.id in fixed else "yes" if d.id in done else ""
        table.add_row(d.id, _iso(d.at_ms), d.stage, d.source, state, d.reason[:160])
    out.print(table)


@dl_app.command("show")
def dl_show(
    dl_id: Annotated[str, typer.Argument(help="dead letter id (partition:offset)")],
    kafka: KafkaOpt = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="write only the original bytes to stdout")
    ] = False,
) -> None:
    """One dead letter: the error in full and the original bytes."""
    from fhirtwin.deadletter import list_deadletters

    bootstrap = _kafka_only(kafka)
    found = next((d for d in list_deadletters(bootstrap) if d.id == dl_id), None)
    if found is None:
        err.print(f"[red]no dead letter {dl_id!r}; `fhirtwin deadletter list` shows the ids[/red]")
        raise typer.Exit(1)
    from fhirtwin.crypto import CryptoError

    try:
        original = found.original
    except CryptoError as exc:
        err.print(f"[red]the original bytes cannot be read: {exc}[/red]")
        raise typer.Exit(1) from None
    if raw:
        sys.stdout.buffer.write(original)
        return
    sys.stdout.write(orjson.dumps(found.as_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.write("--- original bytes ---\n")
    sys.stdout.write(original.decode("utf-8", "replace").replace("\r", "\n") + "\n")


@dl_app.command("replay")
def dl_replay(
    ids: Annotated[
        list[str] | None, typer.Argument(help="dead letter ids (default: with --all)")
    ] = None,
    all_open: Annotated[
        bool, typer.Option("--all", help="every dead letter not replayed yet")
    ] = False,
    stage: Annotated[str | None, typer.Option(help="only dead letters of this stage")] = None,
    corrected: Annotated[
        Path | None,
        typer.Option(
            "--with",
            help="replay this corrected copy of the one dead letter named instead of its "
            "original (- reads stdin); the original stays in the dead letters",
        ),
    ] = None,
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
) -> None:
    """Put dead letters back on their raw topic (after a mapping fix) to convert them again.

    When the input itself is wrong (an ADT without its PID), `show ID --raw > m.hl7`, edit
    it, and `replay ID --with m.hl7`."""
    from fhirtwin.deadletter import list_deadletters, replay, replay_corrected, replayed_ids

    ep = _endpoints(kafka, redis_url)
    letters = list_deadletters(ep.kafka)
    if corrected is not None:
        if all_open or stage or not ids or len(ids) != 1:
            err.print("[red]--with replaces one dead letter: name exactly one id[/red]")
            raise typer.Exit(2)
        found = next((d for d in letters if d.id == ids[0]), None)
        if found is None:
            err.print(f"[red]no dead letter {ids[0]!r}[/red]")
            raise typer.Exit(1)
        try:
            data = sys.stdin.buffer.read() if str(corrected) == "-" else corrected.read_bytes()
        except OSError as exc:
            err.print(f"[red]cannot read the corrected copy {corrected}: {exc.strerror}[/red]")
            raise typer.Exit(1) from None
        try:
            replay_corrected(ep.kafka, ep.redis, found, data)
        except ValueError as exc:
            err.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from None
        out.print(f"replayed a corrected copy of {found.id} ({len(data)} bytes)")
        return
    if ids:
        wanted = set(ids)
        chosen = [d for d in letters if d.id in wanted]
        unknown = wanted - {d.id for d in chosen}
        if unknown:
            err.print(f"[red]no dead letter {', '.join(sorted(unknown))}[/red]")
            raise typer.Exit(1)
    elif all_open:
        done = replayed_ids(ep.redis)
        chosen = [d for d in letters if d.id not in done]
    else:
        err.print("[red]name dead letter ids, or pass --all[/red]")
        raise typer.Exit(2)
    if stage:
        chosen = [d for d in chosen if d.stage == stage]
    n = replay(ep.kafka, ep.redis, chosen)
    out.print(f"replayed {n} dead letters")
