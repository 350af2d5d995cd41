"""`fhirtwin erase` and `fhirtwin keys …`: erasure and the keys of encryption at rest.

See ``docs/security.md`` and ``fhirtwin/crypto.py``.
"""

from __future__ import annotations

import base64
import secrets
import sys
from typing import Annotated

import orjson
import typer
from rich.console import Console

from fhirtwin.cli_pipeline import KafkaOpt, RedisOpt, _endpoints

__all__ = ["register"]

out = Console(stderr=True)
keys_app = typer.Typer(
    help="Keys of encryption at rest: make a KEK, re-wrap after rotation, expire raw keys.",
    no_args_is_help=True,
)


def erase(
    patient: Annotated[
        str,
        typer.Argument(help="Patient id (Patient/<id> or <id>), an identifier, or a twin id"),
    ],
    reason: Annotated[str, typer.Option(help="why (recorded in the audit log)")] = "",
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Erase a patient: destroy the twin's data key, delete it from Redis, leave a tombstone,
    tell every subscriber, audit it. Irreversible."""
    import getpass

    from fhirtwin.erasure import NotFound, erase_patient, find_twin
    from fhirtwin.redisconn import connect
    from fhirtwin.twin import TwinStore

    ep = _endpoints(kafka, redis_url)
    store = TwinStore(connect(ep.redis))
    try:
        twin = find_twin(store, patient)
        if not yes:
            typer.confirm(f"Erase twin {twin} ({patient}) for good?", abort=True)
        done = erase_patient(
            store, patient, bootstrap=ep.kafka, who=f"cli:{getpass.getuser()}", reason=reason
        )
    except NotFound as exc:
        out.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    except RuntimeError as exc:
        out.print(f"[red]error:[/red] {exc}; nothing was erased, try again")
        raise typer.Exit(1) from None
    if json_out:
        sys.stdout.write(orjson.dumps(done.as_dict()).decode() + "\n")
        return
    out.print(
        f"erased twin {done.twin}"
        + (f" (+ merged {', '.join(done.twins[1:])})" if len(done.twins) > 1 else "")
        + f": {done.data_keys_destroyed} data key(s) destroyed, {done.keys_deleted} Redis "
        "key(s) deleted, tombstone written, subscribers notified"
    )


@keys_app.command("new-kek")
def new_kek() -> None:
    """Print a new random key-encryption key (base64) for FHIRTWIN_KEK / a Secret."""
    sys.stdout.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")


@keys_app.command("rotate")
def rotate() -> None:
    """Re-wrap every data key with the current KEK. Run with the new key in FHIRTWIN_KEK
    (or FHIRTWIN_KEK_FILE) and the old one in FHIRTWIN_KEK_PREVIOUS; afterwards the old KEK
    is no longer needed."""
    from fhirtwin.crypto import CryptoError, default_keyring

    try:
        n = default_keyring().rewrap_all()
    except CryptoError as exc:
        out.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    out.print(f"re-wrapped {n} key(s) with the current key-encryption key")


@keys_app.command("expire")
def expire(
    days: Annotated[
        int | None,
        typer.Option(
            help="destroy raw-record keys older than this (default FHIRTWIN_RAW_KEY_DAYS)"
        ),
    ] = None,
) -> None:
    """Destroy the epoch keys of raw records older than the raw retention."""
    from fhirtwin.crypto import default_keyring

    ring = default_keyring()
    if days is not None:
        ring.epoch_days = days
    gone = ring.expire_epochs()
    out.print(f"destroyed {len(gone)} epoch key(s)" + (f": {', '.join(gone)}" if gone else ""))


def register(app: typer.Typer) -> None:
    app.command("erase")(erase)
    app.add_typer(keys_app, name="keys")
