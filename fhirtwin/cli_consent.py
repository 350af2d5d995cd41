"""``fhirtwin consent decide``: the consent engine from the command line, no servers needed.

Input errors (unreadable or non-JSON files, a file that is not a Consent, a bad ``--now`` or
request) exit with code 2 and name the file and the JSON path, so a consent author can fix
the consent rather than guess.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console

from fhirtwin.consent import ConsentError, RequestError, parse_request, prepare

err = Console(stderr=True)

consent_app = typer.Typer(
    help="Evaluate FHIR R4 Consents (see docs/consent.md).", no_args_is_help=True
)


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]{message}[/red]", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(2)


def _load(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _fail(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise _fail(f"{path}: not JSON: {exc}") from None


def _resources(path: Path, doc: Any) -> list[tuple[str, dict[str, Any]]]:
    """(JSON path, resource) for a resource file or every entry of a Bundle file."""
    if not isinstance(doc, dict) or not isinstance(doc.get("resourceType"), str):
        raise _fail(f"{path}: $: not a FHIR resource (no resourceType)")
    if doc["resourceType"] != "Bundle":
        return [("$", doc)]
    out = []
    for i, e in enumerate(doc.get("entry") or []):
        res = e.get("resource") if isinstance(e, dict) else None
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            raise _fail(f"{path}: $.entry[{i}].resource: not a FHIR resource")
        out.append((f"$.entry[{i}].resource", res))
    return out


def _loc(base: str, loc: tuple[Any, ...]) -> str:
    out = base
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _check_consent(path: Path, where: str, res: dict[str, Any]) -> None:
    """A Consent that FHIR R4 would accept (structure and types; fhir.resources' R4B model)."""
    if res.get("resourceType") != "Consent":
        raise _fail(
            f"{path}: {where}.resourceType: expected Consent, found {res.get('resourceType')}"
        )
    from fhir.resources.R4B.consent import Consent
    from pydantic import ValidationError

    try:
        Consent.model_validate(res)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise _fail(
            f"{path}: {_loc(where, tuple(first['loc']))}: {first['msg']}"
            + (f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else "")
        ) from None


def _parse_now(value: str) -> datetime:
    try:
        now = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _fail(f"--now: not an ISO 8601 date-time: {value!r}") from None
    return now if now.tzinfo else now.replace(tzinfo=UTC)


def _parse_request_arg(value: str) -> tuple[str, Any]:
    text = value.strip()
    if text.startswith("{"):
        try:
            return "--request (inline JSON)", orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise _fail(f"--request (inline JSON): not JSON: {exc}") from None
    path = Path(value)
    return str(path), _load(path)


@consent_app.command("decide")
def decide_cmd(
    consent: Annotated[
        list[Path],
        typer.Option("--consent", help="Consent resource (or Bundle of them); repeat for more."),
    ],
    request: Annotated[
        str, typer.Option("--request", help="Request JSON: a file, or the JSON itself.")
    ],
    now: Annotated[
        str, typer.Option("--now", help="Evaluation instant, ISO 8601 (UTC when no zone).")
    ],
    known: Annotated[
        list[Path] | None,
        typer.Option("--known", help="Resources consents may reference (never fetched)."),
    ] = None,
    resource: Annotated[
        list[Path] | None,
        typer.Option("--resource", help="Resource (or Bundle) to decide one by one."),
    ] = None,
) -> None:
    """Decide a request against a patient's consents; prints the decision as JSON."""
    when = _parse_now(now)
    source, req_doc = _parse_request_arg(request)
    try:
        req = parse_request(req_doc)
    except RequestError as exc:
        raise _fail(f"{source}: {exc}") from None
    consents: list[dict[str, Any]] = []
    origin: dict[str, str] = {}
    for path in consent:
        for where, res in _resources(path, _load(path)):
            _check_consent(path, where, res)
            consents.append(res)
            origin[f"Consent/{res.get('id', '')}"] = f"{path} {where}"
    known_res = [r for p in known or [] for _, r in _resources(p, _load(p))]
    targets = [r for p in resource or [] for _, r in _resources(p, _load(p))]
    try:
        policy = prepare(consents, req, now=when, known=known_res)
    except ConsentError as exc:
        ref = exc.where.split(" ")[0].split("/_history/")[0]
        place = origin.get(ref, ref)
        inner = exc.where.split(" ", 1)[1] if " " in exc.where else ""
        raise _fail(f"{place}{'.' + inner if inner else ''}: {exc.message}") from None
    out = policy.decide().to_json()
    if targets:
        out["resources"] = [
            {
                "resourceType": r.get("resourceType"),
                "id": r.get("id"),
                "decision": policy.decide(r).decision,
            }
            for r in targets
        ]
    sys.stdout.buffer.write(orjson.dumps(out, option=orjson.OPT_INDENT_2) + b"\n")


def register(app: typer.Typer) -> None:
    """Add ``fhirtwin consent …`` to the main application."""
    app.add_typer(consent_app, name="consent")
