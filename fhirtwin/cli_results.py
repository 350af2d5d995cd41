"""``fhirtwin results send`` and ``fhirtwin worker results`` (see docs/snapshots.md).

``register(app)`` adds the ``results`` group to the main application and ``results`` to
the ``worker`` group (fhirtwin.cli_pipeline). It is idempotent.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console

from fhirtwin.cli_pipeline import KafkaOpt, RedisOpt, _kafka_only

err = Console(stderr=True)

results_app = typer.Typer(
    help="Publish a subscriber's results (FHIR) on twin.results.", no_args_is_help=True
)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]{message}[/red]", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


@results_app.command("send")
def results_send(
    files: Annotated[
        list[Path], typer.Argument(metavar="FILE...", help="FHIR resources or Bundles (JSON).")
    ],
    subscriber: Annotated[str, typer.Option("--subscriber", help="The subscriber's id.")],
    key: Annotated[
        str,
        typer.Option(
            "--key", help="The key of the snapshot the result is about (twin id or pseudonym)."
        ),
    ],
    snapshot: Annotated[
        str,
        typer.Option("--snapshot", help="The id of the snapshot Bundle it was computed from."),
    ],
    check: Annotated[
        bool,
        typer.Option(
            "--check/--no-check", help="Validate locally first (the worker validates anyway)."
        ),
    ] = True,
    kafka: KafkaOpt = None,
) -> None:
    """Publish result files on twin.results; prints {"file", "record"} per file."""
    from fhirtwin import bus
    from fhirtwin.results import H_SNAPSHOT, H_SUBSCRIBER, RESULTS_TOPIC, ResultError, parse_result

    values: list[tuple[Path, bytes]] = []
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as exc:
            raise _fail(f"cannot read {f}: {exc.strerror}") from None
        if check:
            try:
                parse_result(data)
            except ResultError as exc:
                problems = exc.error.get("problems") or []
                detail = "".join(f"\n  {p['path']}: {p['error']}" for p in problems[:20])
                raise _fail(f"{f}: {exc.reason}{detail}", 1) from None
        values.append((f, data))
    bootstrap = _kafka_only(kafka)
    bus.ensure_topics(bootstrap, [RESULTS_TOPIC])
    sent: dict[int, str] = {}
    failed: list[str] = []

    def delivered(index: int) -> Any:
        def report(e: Any, msg: Any) -> None:
            if e is not None:
                failed.append(e.str())
            else:
                sent[index] = f"{msg.topic()}/{msg.partition()}/{msg.offset()}"

        return report

    producer: Any = bus.producer(bootstrap)
    headers = [(H_SUBSCRIBER, subscriber.encode()), (H_SNAPSHOT, snapshot.encode())]
    for i, (_, data) in enumerate(values):
        producer.produce(
            RESULTS_TOPIC,
            value=data,
            key=key.encode(),
            headers=headers,
            on_delivery=delivered(i),
        )
    if producer.flush(30) or failed:
        raise _fail(f"Kafka did not acknowledge the results: {'; '.join(failed)}", 1)
    for i, (f, _) in enumerate(values):
        sys.stdout.buffer.write(orjson.dumps({"file": str(f), "record": sent.get(i)}) + b"\n")


def worker_results(
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
    metrics_port: Annotated[int, typer.Option(help="serve /metrics on this port (0: off)")] = 0,
) -> None:
    """The results worker: twin.results → validated, tagged results on fhir.resources."""
    from fhirtwin.cli_pipeline import run_worker
    from fhirtwin.results import ResultsWorker

    run_worker(lambda ep: ResultsWorker(ep.kafka, ep.redis), kafka, redis_url, metrics_port)


def register(app: typer.Typer) -> None:
    """Add ``results send`` and ``worker results`` (idempotent)."""
    from fhirtwin.cli_pipeline import worker_app

    if not any(g.name == "results" for g in app.registered_groups):
        app.add_typer(results_app, name="results")
    if not any(c.name == "results" for c in worker_app.registered_commands):
        worker_app.command("results")(worker_results)
