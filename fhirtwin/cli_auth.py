"""``fhirtwin token`` and ``fhirtwin client add|list|remove`` (see docs/auth.md).

``fhirtwin token`` prints a fresh access token of the development client that the embedded
default of ``fhirtwin up`` registers: on stdout, the token alone, so that
``curl -H "Authorization: Bearer $(fhirtwin token)" …`` works. It finds the running
``fhirtwin up`` as the other commands do (``--redis``, ``$FHIRTWIN_REDIS``, else the state
file ``~/.fhirtwin/up.json``) and uses the keys ``fhirtwin up`` keeps in ``~/.fhirtwin/auth``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

from fhirtwin.cli_pipeline import RedisOpt
from fhirtwin.infra import read_state

out = Console()
err = Console(stderr=True)

client_app = typer.Typer(
    help="Register the backend services that may call the FHIR API (SMART Backend Services).",
    no_args_is_help=True,
)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]{message}[/red]", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _redis(redis_url: str | None) -> Any:
    import redis

    from fhirtwin.redisconn import connect

    url = redis_url or os.environ.get("FHIRTWIN_REDIS") or (read_state() or {}).get("redis")
    if not url:
        raise _fail("no Redis: start `fhirtwin up` first, or pass --redis redis://HOST:PORT")
    client = connect(str(url), socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise _fail(f"Redis at {url} does not answer: {exc}") from None
    return client


def _registry(redis_url: str | None) -> Any:
    from fhirtwin.auth import Authority

    # client records need no token URL and no server key
    return Authority(_redis(redis_url), token_url="")


def _split(values: list[str] | None) -> list[str]:
    return [p for v in values or [] for p in v.replace(",", " ").split()]


def register(app: typer.Typer) -> None:
    app.add_typer(client_app, name="client")
    app.command("token")(token)


# -- token --------------------------------------------------------------------------------


def token(
    scope: Annotated[
        list[str] | None,
        typer.Option(
            "--scope",
            help="scope(s) to ask for; repeatable or space-separated (default: system/*.rs)",
        ),
    ] = None,
    redis_url: RedisOpt = None,
    token_url: Annotated[
        str | None,
        typer.Option(help="the server's token URL (default: that of the running `fhirtwin up`)"),
    ] = None,
) -> None:
    """Print a fresh bearer token of the development client of the running `fhirtwin up`."""
    from fhirtwin.auth import DEV_CLIENT_ID, TOKEN_URL_KEY, Authority, default_key_dir
    from fhirtwin.principal import AuthError

    client = _redis(redis_url)
    if token_url is None:
        stored = client.get(TOKEN_URL_KEY)
        token_url = stored.decode() if stored else None
    if token_url is None and (state := read_state()) and state.get("http"):
        token_url = f"{state['http']}/auth/token"
    if not token_url:
        raise _fail("no token URL: is `fhirtwin up` running? (or pass --token-url)")
    key_dir = default_key_dir()
    authority = Authority(client, token_url=token_url, key_dir=key_dir)
    if authority.client(DEV_CLIENT_ID) is None or not (key_dir / "dev-client.jwk").is_file():
        raise _fail(
            "no development client here: `fhirtwin token` serves the embedded default of "
            "`fhirtwin up` (started without --redis/--kafka); register clients of your own "
            "with `fhirtwin client add`"
        )
    scopes = _split(scope) or ["system/*.rs"]
    try:
        access = authority.dev_token(scopes)
    except AuthError as exc:
        raise _fail(f"{exc.code}: {exc.message}") from None
    sys.stdout.write(access + "\n")


# -- client -------------------------------------------------------------------------------


def _read_jwks(jwks: str) -> dict[str, Any]:
    text = jwks.strip()
    if not text.startswith("{"):
        try:
            text = Path(jwks).read_text(encoding="utf-8")
        except OSError as exc:
            raise _fail(f"--jwks {jwks}: cannot read it ({exc.strerror})") from None
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise _fail(f"--jwks: not JSON ({exc})") from None
    if isinstance(data, dict) and "keys" not in data and "kty" in data:
        data = {"keys": [data]}  # one bare JWK is accepted too
    if not isinstance(data, dict):
        raise _fail('--jwks: expected a JSON object {"keys": [...]}')
    return data


@client_app.command("add")
def client_add(
    client_id: Annotated[str, typer.Argument(metavar="ID", help="client id (the JWT iss/sub).")],
    jwks: Annotated[
        str,
        typer.Option("--jwks", help="the client's public JWKS: a file, or the JSON inline."),
    ],
    scope: Annotated[
        list[str],
        typer.Option(
            "--scope",
            help="scope it may be granted (system/*.rs, system/Observation.rs, "
            "fhirtwin/admin, fhirtwin/audit); repeatable",
        ),
    ],
    subscriber: Annotated[
        str | None,
        typer.Option("--subscriber", help="the registered subscriber it reads as."),
    ] = None,
    redis_url: RedisOpt = None,
) -> None:
    """Register (or replace) a backend-service client with its JWKS, scopes and subscriber."""
    from fhirtwin.auth import ClientError

    registry = _registry(redis_url)
    try:
        registry.register_client(client_id, _read_jwks(jwks), _split(scope), subscriber)
    except ClientError as exc:
        raise _fail(str(exc)) from None
    rec = registry.client(client_id)
    kids = ", ".join(k["kid"] for k in rec["jwks"]["keys"])
    out.print(
        f"client {client_id}: scopes {' '.join(rec['scopes'])}; "
        f"reads as {subscriber or '(no subscriber: no patient data)'}; keys {kids}",
        highlight=False,
    )


@client_app.command("list")
def client_list(
    redis_url: RedisOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Every registered client: id, scopes, subscriber, key ids."""
    rows = _registry(redis_url).clients()
    if json_out:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    table = Table(title=f"{len(rows)} clients")
    for col in ("client", "scopes", "subscriber", "keys"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["client_id"],
            " ".join(r["scopes"]),
            r.get("subscriber") or "",
            ", ".join(f"{k['kid']} ({k['kty']})" for k in r["jwks"]["keys"]),
        )
    out.print(table)


@client_app.command("remove")
def client_remove(
    client_id: Annotated[str, typer.Argument(metavar="ID", help="client id")],
    redis_url: RedisOpt = None,
) -> None:
    """Forget a client: its tokens stop working at once."""
    if not _registry(redis_url).remove_client(client_id):
        raise _fail(f"no client {client_id!r}", code=1)
    out.print(f"removed client {client_id}")
