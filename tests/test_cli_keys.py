"""`fhirtwin erase` and `fhirtwin keys …` as a user runs them (typer's CliRunner, real
Kafka and Redis for the erasure)."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

import orjson
import pytest
import redis
from typer.testing import CliRunner

from fhirtwin.cli import app
from fhirtwin.crypto import FileKeyStore, KeyRing, reset_default_keyring
from fhirtwin.ingest import ingest
from fhirtwin.twin import TwinStore
from tests.pipeline import drain

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "hl7v2"


def test_new_kek_prints_a_key_and_nothing_else() -> None:
    out = CliRunner().invoke(app, ["keys", "new-kek"])
    assert out.exit_code == 0
    assert len(base64.b64decode(out.stdout.strip())) == 32


def test_rotate_rewraps_with_the_new_kek(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    store = tmp_path / "keys"
    blob = KeyRing(old, FileKeyStore(store)).seal("t1", b"data", b"aad")
    monkeypatch.setenv("FHIRTWIN_KEYSTORE", f"file://{store}")
    monkeypatch.delenv("FHIRTWIN_KEK_FILE", raising=False)
    monkeypatch.setenv("FHIRTWIN_KEK", base64.b64encode(new).decode())
    monkeypatch.setenv("FHIRTWIN_KEK_PREVIOUS", base64.b64encode(old).decode())
    reset_default_keyring()
    try:
        out = CliRunner().invoke(app, ["keys", "rotate"])
        assert out.exit_code == 0, out.output
        assert "re-wrapped 2 key(s)" in out.output  # the twin's and the blind-index key
    finally:
        reset_default_keyring()
    assert KeyRing(new, FileKeyStore(store)).open("t1", blob, b"aad") == b"data"


def test_rotate_without_the_old_kek_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "keys"
    KeyRing(secrets.token_bytes(32), FileKeyStore(store)).seal("t1", b"data", b"aad")
    monkeypatch.setenv("FHIRTWIN_KEYSTORE", f"file://{store}")
    monkeypatch.delenv("FHIRTWIN_KEK_FILE", raising=False)
    monkeypatch.delenv("FHIRTWIN_KEK_PREVIOUS", raising=False)
    monkeypatch.setenv("FHIRTWIN_KEK", base64.b64encode(secrets.token_bytes(32)).decode())
    reset_default_keyring()
    try:
        out = CliRunner().invoke(app, ["keys", "rotate"])
    finally:
        reset_default_keyring()
    assert out.exit_code == 1
    assert "FHIRTWIN_KEK_PREVIOUS" in out.output


def test_erase_from_the_command_line(kafka: str, redis_url: str) -> None:
    ingest(kafka, "hl7v2", [str(EXAMPLES)])
    drain(kafka, redis_url)
    store = TwinStore(redis.Redis.from_url(redis_url))
    twin = store.resolve("MRN448812")
    assert twin and store.resolve("MRN550021")
    common = ["--kafka", kafka, "--redis", redis_url]
    out = CliRunner().invoke(
        app, ["erase", "MRN448812", "--reason", "art. 17", "--yes", "--json", *common]
    )
    assert out.exit_code == 0, out.output
    done = orjson.loads(out.stdout)
    assert done["twin"] == twin and done["data_keys_destroyed"] == 1
    assert store.resolve("MRN448812") is None and store.resolve("MRN550021")
    again = CliRunner().invoke(app, ["erase", "MRN448812", "--yes", *common])
    assert again.exit_code == 1 and "no patient twin answers to 'MRN448812'" in again.output
