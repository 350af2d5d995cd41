"""``fhirtwin subscriber add|list|remove``, ``fhirtwin consent put`` and
``fhirtwin worker snapshot`` (see docs/snapshots.md).

``register(app)`` adds the ``subscriber`` group to the main application, ``put`` to the
existing ``consent`` group (fhirtwin.cli_consent) and ``snapshot`` to the ``worker`` group
(fhirtwin.cli_pipeline). It is idempotent.
"""

from __future__ import annotations

import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

from fhirtwin import bus
from fhirtwin.cli_pipeline import KafkaOpt, RedisOpt, _endpoints

out = Console()
err = Console(stderr=True)

subscriber_app = typer.Typer(
    help="Register the services that receive consent-checked twin snapshots.",
    no_args_is_help=True,
)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]{message}[/red]", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)


# -- subscriber ------------------------------------------------------------------------


@subscriber_app.command("add")
def subscriber_add(
    sub_id: Annotated[str, typer.Argument(metavar="ID", help="Subscriber id (topic suffix).")],
    actor: Annotated[
        list[str],
        typer.Option("--actor", help="Organisation/app identifier system|value; repeatable."),
    ],
    purpose: Annotated[
        list[str], typer.Option("--purpose", help="v3 ActReason purpose of use; repeatable.")
    ],
    scope: Annotated[str, typer.Option("--scope", help="patient-privacy or research.")],
    types: Annotated[
        str | None,
        typer.Option("--types", help="Resource types wanted, comma-separated (default: all)."),
    ] = None,
    default: Annotated[
        str | None,
        typer.Option("--default", help="NOT_APPLICABLE means permit or deny (research: deny)."),
    ] = None,
    deidentify: Annotated[
        str | None,
        typer.Option("--deidentify", help="none or safe-harbor (research: safe-harbor)."),
    ] = None,
    encryption_key: Annotated[
        Path | None,
        typer.Option(
            "--encryption-key",
            help="The subscriber's public JWK (EC P-256/384/521 or X25519): its topic then "
            "carries JWEs only its private key opens.",
        ),
    ] = None,
    replace: Annotated[bool, typer.Option(help="Replace an existing subscriber.")] = False,
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
) -> None:
    """Register a subscriber and create its topic twin.snapshots.<ID>."""
    from fhirtwin.subscribers import Registry, SubscriberError, make_subscriber

    jwk = None
    if encryption_key is not None:
        try:
            jwk = orjson.loads(encryption_key.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise _fail(f"--encryption-key {encryption_key}: {exc}") from None
    try:
        sub = make_subscriber(
            sub_id,
            actor=actor,
            purpose=purpose,
            scope=scope,
            types=[types] if types else None,
            default=default,
            deidentify=deidentify,
            encryption_key=jwk,
        )
    except SubscriberError as exc:
        raise _fail(str(exc)) from None
    if sub.encryption_key is None and sub.deidentify == "none":
        err.print(
            f"[yellow]warning:[/yellow] {sub.topic} will carry identified snapshots in clear; "
            "give --encryption-key to have them sealed for the subscriber (docs/snapshots.md)"
        )
    ep = _endpoints(kafka, redis_url)
    reg = Registry.connect(ep.redis)
    if reg.get(sub.id) is not None and not replace:
        raise _fail(f"subscriber {sub.id} exists; use --replace, or remove it first", 1)
    bus.ensure_topics(ep.kafka, [sub.topic])
    reg.put(sub)
    sys.stdout.buffer.write(orjson.dumps(sub.to_json(), option=orjson.OPT_INDENT_2) + b"\n")


@subscriber_app.command("list")
def subscriber_list(
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
) -> None:
    """The registered subscribers."""
    from fhirtwin.subscribers import Registry

    ep = _endpoints(kafka, redis_url)
    subs = Registry.connect(ep.redis).all()
    if as_json:
        rows = [s.to_json() for s in subs]
        sys.stdout.buffer.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2) + b"\n")
        return
    table = Table("id", "actor", "purpose", "scope", "types", "default", "deidentify", "topic")
    for s in subs:
        table.add_row(
            s.id,
            "\n".join(s.actor),
            ",".join(s.purpose),
            s.scope,
            ",".join(s.types) if s.types is not None else "(all)",
            s.default,
            s.deidentify,
            s.topic,
        )
    out.print(table)


@subscriber_app.command("remove")
def subscriber_remove(
    sub_id: Annotated[str, typer.Argument(metavar="ID")],
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
) -> None:
    """Forget a subscriber, its pseudonyms and access state; its topic is kept."""
    from fhirtwin.subscribers import Registry

    ep = _endpoints(kafka, redis_url)
    if not Registry.connect(ep.redis).remove(sub_id):
        raise _fail(f"no subscriber {sub_id}", 1)
    out.print(f"removed {sub_id} (topic twin.snapshots.{sub_id} kept)")


# -- consent put -----------------------------------------------------------------------


def consent_put(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A Consent resource (JSON).")],
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
) -> None:
    """File a Consent in the twin of the patient it names (a new version if its id exists).

    It is published on fhir.resources like any other resource; the assembler files it and
    the snapshot publisher re-evaluates that twin for every subscriber.
    """
    from fhirtwin.cli_consent import _check_consent, _load
    from fhirtwin.consent import ConsentError, prepare
    from fhirtwin.redisconn import connect
    from fhirtwin.snapshot import ConsentPutError, consent_event, find_twin
    from fhirtwin.twin import TwinStore

    doc = _load(file)
    if not isinstance(doc, dict):
        raise _fail(f"{file}: $: not a FHIR resource")
    _check_consent(file, "$", doc)
    if not doc.get("id"):
        doc["id"] = str(uuid.uuid4())
        err.print(f"{file}: no id, filed as Consent/{doc['id']}")
    now = datetime.now(UTC)
    for scope in ("patient-privacy", "research"):  # will the engine be able to read it?
        purpose = "HRESCH" if scope == "research" else "TREAT"
        request = {"actor": ["urn:fhirtwin:check|x"], "purpose": [purpose], "scope": scope}
        try:
            prepare([doc], request, now=now)
        except ConsentError as exc:
            raise _fail(f"{file}: {exc.where}: {exc.message}") from None
    ep = _endpoints(kafka, redis_url)
    store = TwinStore(connect(ep.redis))
    try:
        twin = find_twin(store, doc)
    except ConsentPutError as exc:
        raise _fail(f"{file}: {exc}", 1) from None
    now_ms = int(time.time() * 1000)
    value = consent_event(twin, doc, now_ms=now_ms, record=f"cli:consent-put:{file.name}")
    sent: list[str] = []
    failed: list[str] = []

    def delivered(e: Any, msg: Any) -> None:
        if e is not None:
            failed.append(e.str())
        else:
            sent.append(f"{msg.topic()}/{msg.partition()}/{msg.offset()}")

    producer: Any = bus.producer(ep.kafka)
    producer.produce(
        bus.RESOURCES,
        value=value,
        key=twin.encode(),
        headers=[("fhirtwin-source-kind", b"fhir"), ("fhirtwin-source-record", b"cli")],
        on_delivery=delivered,
    )
    if producer.flush(30) or failed:
        raise _fail(f"Kafka did not acknowledge the Consent: {'; '.join(failed)}", 1)
    result = {"twin": twin, "consent": f"Consent/{doc['id']}", "record": sent[0]}
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")


# -- worker snapshot -------------------------------------------------------------------


def worker_snapshot(
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
    metrics_port: Annotated[int, typer.Option(help="serve /metrics on this port (0: off)")] = 0,
) -> None:
    """The snapshot publisher: twin.events → consent-checked snapshots, audit on twin.audit."""
    from fhirtwin.cli_pipeline import run_worker
    from fhirtwin.snapshot import SnapshotPublisher

    run_worker(lambda ep: SnapshotPublisher(ep.kafka, ep.redis), kafka, redis_url, metrics_port)


def register(app: typer.Typer) -> None:
    """Add ``subscriber``, ``consent put`` and ``worker snapshot`` (idempotent)."""
    from fhirtwin.cli_consent import consent_app
    from fhirtwin.cli_pipeline import worker_app

    if not any(g.name == "subscriber" for g in app.registered_groups):
        app.add_typer(subscriber_app, name="subscriber")
    if not any(c.name == "put" for c in consent_app.registered_commands):
        consent_app.command("put")(consent_put)
    if not any(c.name == "snapshot" for c in worker_app.registered_commands):
        worker_app.command("snapshot")(worker_snapshot)
