"""`fhirtwin audit …` and `fhirtwin worker audit`: the auditor's face of the audit log."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

from fhirtwin.cli_pipeline import KafkaOpt, RedisOpt, _endpoints, run_worker, worker_app

out = Console()
err = Console(stderr=True)
audit_app = typer.Typer(help="Query and verify the audit log.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
    worker_app.command("audit")(worker_audit)


def worker_audit(
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
    metrics_port: Annotated[int, typer.Option(help="serve /metrics on this port (0: off)")] = 0,
) -> None:
    """The audit sequencer: twin.audit → Merkle tree in Redis + signed checkpoints."""
    from fhirtwin.audit import AuditSequencer

    run_worker(lambda ep: AuditSequencer(ep.kafka, ep.redis), kafka, redis_url, metrics_port)


def _events(kafka: str) -> list[dict[str, Any]]:
    from fhirtwin.audit import entries

    return [orjson.loads(e) for e in entries(kafka)]


def _who(event: dict[str, Any]) -> list[str]:
    names = []
    for agent in event.get("agent", ()):
        if agent.get("requestor"):
            names.append(agent.get("name") or agent.get("who", {}).get("display", ""))
    return names


def _patients(event: dict[str, Any]) -> set[str]:
    out: set[str] = set()
    for ent in event.get("entity", ()):
        what = ent.get("what", {})
        ident = what.get("identifier") or {}
        if ident.get("value"):
            out.add(ident["value"])
        if str(what.get("reference", "")).startswith("Patient/"):
            out.add(what["reference"])
    return out


def _consents(event: dict[str, Any]) -> set[str]:
    return {
        e["what"]["reference"]
        for e in event.get("entity", ())
        if str(e.get("what", {}).get("reference", "")).startswith("Consent/")
    }


def _purposes(event: dict[str, Any]) -> set[str]:
    return {c.get("code", "") for p in event.get("purposeOfEvent", ()) for c in p.get("coding", ())}


def _kind(event: dict[str, Any]) -> str:
    code = event.get("type", {}).get("code", "")
    return {"110106": "disclosure", "110113": "decision"}.get(code, code)


@audit_app.command("query")
def audit_query(
    patient: Annotated[str | None, typer.Option(help="twin id, system|value or MRN")] = None,
    subscriber: Annotated[str | None, typer.Option(help="subscriber id")] = None,
    consent: Annotated[str | None, typer.Option(help="Consent/<id> or <id>")] = None,
    purpose: Annotated[str | None, typer.Option(help="ActReason code, e.g. TREAT")] = None,
    since: Annotated[str | None, typer.Option(help="ISO date-time")] = None,
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="the AuditEvents as JSON")] = False,
) -> None:
    """AuditEvents that match every filter given (who received what, when, why)."""
    from fhirtwin.redisconn import connect
    from fhirtwin.twin import TwinStore, fhir_time_ms

    ep = _endpoints(kafka, redis_url)
    twin = None
    if patient:
        twin = TwinStore(connect(ep.redis)).resolve(patient) or patient
    since_ms = fhir_time_ms(since) if since else None
    if since and since_ms is None:
        err.print(f"[red]--since {since!r} is not an ISO date-time[/red]")
        raise typer.Exit(2)
    want_consent = (
        consent if not consent or consent.startswith("Consent/") else f"Consent/{consent}"
    )
    rows = []
    for i, ev in enumerate(_events(ep.kafka)):
        if twin and twin not in _patients(ev):
            continue
        if subscriber and subscriber not in _who(ev):
            continue
        if want_consent and want_consent not in _consents(ev):
            continue
        if purpose and purpose not in _purposes(ev):
            continue
        if since_ms is not None and (fhir_time_ms(ev.get("recorded")) or 0) < since_ms:
            continue
        rows.append((i, ev))
    if json_out:
        data = [{"index": i, "event": ev} for i, ev in rows]
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    table = Table(title=f"{len(rows)} audit events")
    for col in ("#", "recorded", "kind", "subscriber", "purpose", "outcome", "consents"):
        table.add_column(col)
    for i, ev in rows:
        table.add_row(
            str(i),
            ev.get("recorded", ""),
            _kind(ev),
            ", ".join(_who(ev)),
            ", ".join(sorted(_purposes(ev))),
            ev.get("outcome", ""),
            ", ".join(sorted(_consents(ev))),
        )
    out.print(table)


@audit_app.command("report")
def audit_report(
    patient: Annotated[str, typer.Option(help="twin id, system|value or MRN")],
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
) -> None:
    """Accounting of disclosures for one patient: who received what, when and why."""
    from fhirtwin.redisconn import connect
    from fhirtwin.twin import TwinStore

    ep = _endpoints(kafka, redis_url)
    twin = TwinStore(connect(ep.redis)).resolve(patient) or patient
    rows = []
    for ev in _events(ep.kafka):
        if _kind(ev) != "disclosure" or twin not in _patients(ev):
            continue
        sent = [
            e["what"]["reference"]
            for e in ev.get("entity", ())
            if e.get("role", {}).get("code") == "4"
            and not str(e.get("what", {}).get("reference", "")).startswith("Consent/")
        ]
        rows.append(
            {
                "recorded": ev.get("recorded"),
                "recipient": ", ".join(_who(ev)),
                "purpose": sorted(_purposes(ev)),
                "consents": sorted(_consents(ev)),
                "resources": sent,
            }
        )
    sys.stdout.write(
        orjson.dumps({"patient": twin, "disclosures": rows}, option=orjson.OPT_INDENT_2).decode()
        + "\n"
    )


@audit_app.command("export")
def audit_export(
    path: Annotated[Path, typer.Argument(help="file to write: one AuditEvent per line")],
    kafka: KafkaOpt = None,
) -> None:
    """Write the audit log, in log order, as it is (one canonical JSON entry per line)."""
    from fhirtwin.audit import entries
    from fhirtwin.cli_pipeline import _kafka_only

    data = entries(_kafka_only(kafka))
    path.write_bytes(b"".join(e + b"\n" for e in data))
    out.print(f"wrote {len(data)} entries to {path}")


@audit_app.command("verify")
def audit_verify(
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
    entries_file: Annotated[
        Path | None, typer.Option("--entries", help="verify an exported copy instead of Kafka")
    ] = None,
    verifier_key: Annotated[
        Path | None, typer.Option(help="file with the log's verifier key")
    ] = None,
) -> None:
    """Fail on any altered, missing or reordered entry (checked against signed checkpoints)."""
    from fhirtwin.audit import verify

    ep = _endpoints(kafka, redis_url)
    vkey = verifier_key.read_text().strip() if verifier_key else None
    data = None
    if entries_file is not None:
        data = [line for line in entries_file.read_bytes().split(b"\n") if line]
    res = verify(ep.kafka, ep.redis, verifier_key=vkey, log_entries=data)
    if res.ok:
        size = res.checkpoint.size if res.checkpoint else 0
        out.print(
            f"OK: {res.entries} entries, {size} covered by the newest signed checkpoint"
            + (f", {res.unsigned} not signed yet" if res.unsigned else "")
        )
        return
    where = ""
    if res.first_bad_index is not None:
        where = f"; first bad entry: #{res.first_bad_index}"
    elif res.bad_range is not None:
        where = f"; bad entry between #{res.bad_range[0]} and #{res.bad_range[1] - 1}"
    err.print(f"[red]FAILED: {res.reason}{where}[/red]")
    raise typer.Exit(1)


@audit_app.command("proof")
def audit_proof(
    index: Annotated[int | None, typer.Option(help="inclusion proof of entry #INDEX")] = None,
    since_size: Annotated[
        int | None, typer.Option(help="consistency proof from the tree of this size")
    ] = None,
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
) -> None:
    """Proofs an auditor checks offline against a signed checkpoint (JSON, hex hashes)."""
    from fhirtwin.audit import proof

    if index is None and since_size is None:
        err.print("[red]give --index N and/or --since-size N[/red]")
        raise typer.Exit(2)
    ep = _endpoints(kafka, redis_url)
    try:
        data = proof(ep.redis, index=index, old_size=since_size)
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
