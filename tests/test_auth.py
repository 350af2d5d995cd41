"""SMART Backend Services (fhirtwin.auth, fhirtwin.cli_auth) against a real Redis."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from typer.testing import CliRunner

from fhirtwin import auth
from fhirtwin.auth import ASSERTION_TYPE, Authority, ClientError, require_scope
from fhirtwin.principal import AuthError, Principal

TOKEN_URL = "http://127.0.0.1:8080/auth/token"


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def authority(r: redis.Redis, tmp_path: Path) -> Authority:
    return Authority(r, token_url=TOKEN_URL, key_dir=tmp_path / "keys")


def _keys() -> tuple[RSAKey, ECKey]:
    rsa = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}, private=True)
    ec = ECKey.generate_key("P-384", parameters={"kid": "ec-1"}, private=True)
    return rsa, ec


@pytest.fixture(scope="module")
def keys() -> tuple[RSAKey, ECKey]:
    return _keys()


def _jwks(*ks: RSAKey | ECKey) -> dict[str, Any]:
    return {"keys": [dict(k.as_dict(private=False)) for k in ks]}


@pytest.fixture
def client(authority: Authority, keys: tuple[RSAKey, ECKey]) -> str:
    authority.register_client(
        "sim-ops", _jwks(*keys), ["system/*.rs", "fhirtwin/admin", "fhirtwin/audit"], None
    )
    return "sim-ops"


def _claims(client_id: str = "sim-ops", **over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": client_id,
        "sub": client_id,
        "aud": TOKEN_URL,
        "exp": now + 240,
        "jti": str(uuid.uuid4()),
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def _assertion(
    key: RSAKey | ECKey, alg: str, claims: dict[str, Any], kid: str | None = None
) -> str:
    header = {"alg": alg, "typ": "JWT", "kid": kid or key.kid}
    return jwt.encode(header, claims, key, algorithms=[alg])


def _form(assertion: str, scope: str = "system/*.rs") -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion,
        "scope": scope,
    }


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _refused(authority: Authority, form: dict[str, str], code: str = "invalid_client") -> str:
    with pytest.raises(AuthError) as info:
        authority.issue(form)
    assert info.value.code == code, info.value.message
    assert info.value.status == (401 if code == "invalid_client" else 400)
    return info.value.message


# -- happy paths ----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_token_for_rs384_and_es384(
    authority: Authority, client: str, keys: tuple[RSAKey, ECKey], alg: str
) -> None:
    key = keys[0] if alg == "RS384" else keys[1]
    answer = authority.issue(_form(_assertion(key, alg, _claims()), "system/Observation.rs"))
    assert answer["token_type"] == "bearer"
    assert answer["expires_in"] == 300
    assert answer["scope"] == "system/Observation.rs"
    principal = authority.verify_bearer(f"Bearer {answer['access_token']}")
    assert principal == Principal("sim-ops", frozenset({"system/Observation.rs"}), None)


def test_scopes_granted_are_requested_within_registered(
    authority: Authority, client: str, keys: tuple[RSAKey, ECKey]
) -> None:
    ec = keys[1]
    answer = authority.issue(
        _form(
            _assertion(ec, "ES384", _claims()),
            "system/Patient.r system/*.rs system/*.cruds fhirtwin/audit patient/*.rs",
        )
    )
    assert answer["scope"] == "fhirtwin/audit system/*.rs"
    msg = _refused(
        authority, _form(_assertion(ec, "ES384", _claims()), "system/*.cud"), "invalid_scope"
    )
    assert "system/*.cud" in msg


def test_grant_scopes() -> None:
    g = auth.grant_scopes
    assert g(["system/*.rs"], ["system/Observation.rs"]) == ["system/Observation.rs"]
    assert g(["system/*.cruds"], ["system/*.rs"]) == ["system/*.rs"]
    assert g(["system/Patient.r", "system/*.s"], ["system/*.rs"]) == [
        "system/*.s",
        "system/Patient.r",
    ]
    assert g(["system/Patient.rs"], ["system/Observation.rs"]) == []
    assert g(["system/*.c"], ["system/*.rs"]) == []
    assert g(["fhirtwin/admin", "patient/*.rs"], ["fhirtwin/admin", "system/*.rs"]) == [
        "fhirtwin/admin"
    ]


# -- the rejections of the issue ------------------------------------------------------------


def test_wrong_aud(authority: Authority, client: str, keys: tuple[RSAKey, ECKey]) -> None:
    for aud in (TOKEN_URL + "/", "http://127.0.0.1:8080/fhir", "https://elsewhere/auth/token"):
        msg = _refused(authority, _form(_assertion(keys[1], "ES384", _claims(aud=aud))))
        assert "aud" in msg


def test_expired(authority: Authority, client: str, keys: tuple[RSAKey, ECKey]) -> None:
    claims = _claims(exp=int(time.time()) - 30)
    msg = _refused(authority, _form(_assertion(keys[0], "RS384", claims)))
    assert "exp" in msg.lower() or "expired" in msg.lower()


def test_exp_too_far_ahead(authority: Authority, client: str, keys: tuple[RSAKey, ECKey]) -> None:
    claims = _claims(exp=int(time.time()) + 3600)
    assert "5 minutes" in _refused(authority, _form(_assertion(keys[1], "ES384", claims)))
    # exactly five minutes ahead is fine
    authority.issue(_form(_assertion(keys[1], "ES384", _claims(exp=int(time.time()) + 300))))


def test_missing_exp_and_jti(authority: Authority, client: str, keys: tuple[RSAKey, ECKey]) -> None:
    for claims in (_claims(exp=None), _claims(jti=None)):
        _refused(authority, _form(_assertion(keys[1], "ES384", claims)))


def test_unknown_kid(authority: Authority, client: str, keys: tuple[RSAKey, ECKey]) -> None:
    stranger = ECKey.generate_key("P-384", parameters={"kid": "not-registered"}, private=True)
    msg = _refused(authority, _form(_assertion(stranger, "ES384", _claims())))
    assert "not-registered" in msg
    # a registered kid on a key that is not the client's: the signature does not verify
    msg = _refused(authority, _form(_assertion(stranger, "ES384", _claims(), kid="ec-1")))
    assert "signature" in msg


def test_no_kid(authority: Authority, client: str, keys: tuple[RSAKey, ECKey]) -> None:
    header = _b64(orjson.dumps({"alg": "ES384", "typ": "JWT"}))
    signed = _assertion(keys[1], "ES384", _claims())
    forged = ".".join([header, *signed.split(".")[1:]])
    assert "kid" in _refused(authority, _form(forged))


def test_alg_none(authority: Authority, client: str, keys: tuple[RSAKey, ECKey]) -> None:
    for alg in ("none", "None", "NONE"):
        header = _b64(orjson.dumps({"alg": alg, "typ": "JWT", "kid": "ec-1"}))
        token = f"{header}.{_b64(orjson.dumps(_claims()))}."
        assert repr(alg) in _refused(authority, _form(token))


def test_hs256_signed_with_the_public_key(
    authority: Authority, client: str, keys: tuple[RSAKey, ECKey]
) -> None:
    """The algorithm-confusion attack: HMAC keyed with the (public) key a server holds."""
    rsa = keys[0]
    secrets_tried = [
        rsa.as_pem(private=False),
        orjson.dumps(rsa.as_dict(private=False)),
        rsa.as_dict(private=False)["n"].encode(),
    ]
    for kid in ("rsa-1", "ec-1"):
        for secret in secrets_tried:
            header = _b64(orjson.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}))
            body = _b64(orjson.dumps(_claims()))
            sig = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
            assert "'HS256'" in _refused(authority, _form(f"{header}.{body}.{_b64(sig)}"))


def test_alg_must_fit_the_key(
    authority: Authority, client: str, keys: tuple[RSAKey, ECKey]
) -> None:
    # RS256 (not SMART's) and ES384 header on the RSA key's kid
    _refused(authority, _form(_assertion(keys[0], "RS256", _claims())))
    forged = ".".join(
        [
            _b64(orjson.dumps({"alg": "ES384", "typ": "JWT", "kid": "rsa-1"})),
            *_assertion(keys[1], "ES384", _claims()).split(".")[1:],
        ]
    )
    assert "does not fit" in _refused(authority, _form(forged))


def test_replayed_jti(
    authority: Authority, client: str, keys: tuple[RSAKey, ECKey], r: redis.Redis
) -> None:
    claims = _claims()
    first = _assertion(keys[1], "ES384", claims)
    authority.issue(_form(first))
    assert "replay" in _refused(authority, _form(first))
    # the same jti in a freshly signed assertion is still a replay
    assert "replay" in _refused(authority, _form(_assertion(keys[0], "RS384", claims)))
    # the memory of it lasts until the assertion's exp, not forever
    (seen,) = list(r.scan_iter(match="ft:auth:jti:sim-ops:*"))
    assert 0 < r.ttl(seen) <= 241


def test_iss_sub_and_unknown_client(
    authority: Authority, client: str, keys: tuple[RSAKey, ECKey]
) -> None:
    assert "unknown client" in _refused(
        authority, _form(_assertion(keys[1], "ES384", _claims("other")))
    )
    _refused(authority, _form(_assertion(keys[1], "ES384", _claims(sub="someone-else"))))
    _refused(authority, _form(_assertion(keys[1], "ES384", _claims(sub=None))))


def test_bad_requests(authority: Authority, client: str, keys: tuple[RSAKey, ECKey]) -> None:
    good = _form(_assertion(keys[1], "ES384", _claims()))
    _refused(authority, {**good, "grant_type": "password"}, "unsupported_grant_type")
    _refused(authority, {**good, "client_assertion_type": "x"}, "invalid_request")
    _refused(authority, {**good, "scope": ""}, "invalid_scope")
    _refused(authority, _form("not-a-jwt"))
    _refused(authority, _form("a.b.c"))


# -- subscribers, admin and audit -----------------------------------------------------------


def _subscriber(r: redis.Redis, sub_id: str = "care") -> str:
    from fhirtwin.subscribers import Registry, make_subscriber

    Registry(r).put(
        make_subscriber(
            sub_id, actor=["urn:oid:1.2.3|sim-care"], purpose=["TREAT"], scope="patient-privacy"
        )
    )
    return sub_id


def test_subscriber_clients_get_no_admin_or_audit(
    authority: Authority, keys: tuple[RSAKey, ECKey], r: redis.Redis
) -> None:
    with pytest.raises(ClientError, match="no subscriber 'care'"):
        authority.register_client("care-app", _jwks(keys[1]), ["system/*.rs"], "care")
    _subscriber(r)
    for privileged in ("fhirtwin/admin", "fhirtwin/audit"):
        with pytest.raises(ClientError, match=privileged):
            authority.register_client(
                "care-app", _jwks(keys[1]), ["system/*.rs", privileged], "care"
            )
    authority.register_client("care-app", _jwks(keys[1]), ["system/*.rs"], "care")
    answer = authority.issue(
        _form(
            _assertion(keys[1], "ES384", _claims("care-app")),
            "system/*.rs fhirtwin/admin fhirtwin/audit",
        )
    )
    assert answer["scope"] == "system/*.rs"
    p = authority.verify_bearer(f"Bearer {answer['access_token']}")
    assert p == Principal("care-app", frozenset({"system/*.rs"}), "care")
    require_scope(p, "system/Observation.rs")
    for privileged in ("fhirtwin/admin", "fhirtwin/audit"):
        with pytest.raises(AuthError) as info:
            require_scope(p, privileged)
        assert info.value.status == 403
        # even were a token to carry it
        with pytest.raises(AuthError):
            require_scope(Principal("care-app", frozenset({privileged}), "care"), privileged)
    require_scope(Principal("ops", frozenset({"fhirtwin/admin"})), "fhirtwin/admin")


@pytest.mark.filterwarnings("ignore:Key size should be:UserWarning")
def test_registration_checks(authority: Authority, keys: tuple[RSAKey, ECKey]) -> None:
    rsa, ec = keys
    cases: list[tuple[dict[str, Any], list[str], str]] = [
        ({"keys": []}, ["system/*.rs"], "at least one key"),
        ({"keys": [rsa.as_dict(private=True)]}, ["system/*.rs"], "private"),
        ({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}, ["system/*.rs"], "private"),
        ({"keys": [{k: v for k, v in ec.as_dict().items() if k != "kid"}]}, ["system/*.rs"], "kid"),
        (_jwks(ECKey.generate_key("P-256", parameters={"kid": "p256"})), ["system/*.rs"], "P-384"),
        (_jwks(RSAKey.generate_key(1024, parameters={"kid": "small"})), ["system/*.rs"], "2048"),
        (_jwks(ec), ["user/*.rs"], "user/"),
        (_jwks(ec), [], "at least one scope"),
    ]
    for jwks, scopes, words in cases:
        with pytest.raises(ClientError, match=words):
            authority.register_client("c1", jwks, scopes, None)
    with pytest.raises(ClientError, match="client id"):
        authority.register_client("bad id", _jwks(ec), ["system/*.rs"], None)


# -- access tokens --------------------------------------------------------------------------


def test_verify_bearer_refusals(
    authority: Authority, client: str, keys: tuple[RSAKey, ECKey], r: redis.Redis, tmp_path: Path
) -> None:
    def refused(value: str | None) -> str:
        with pytest.raises(AuthError) as info:
            authority.verify_bearer(value)
        assert info.value.status == 401
        assert info.value.code == "invalid_token"
        return info.value.message

    refused(None)
    refused("")
    refused("Bearer")
    refused("Bearer garbage")
    refused("Bearer a.b.c")
    good = authority.issue(_form(_assertion(keys[1], "ES384", _claims())))["access_token"]
    refused(f"Basic {good}")
    assert authority.verify_bearer(f"bearer {good}").client_id == "sim-ops"
    # the client assertion itself is not an access token
    refused(f"Bearer {_assertion(keys[1], 'ES384', _claims())}")
    # another issuer sharing the key (same key dir), and another key with the same issuer
    other_issuer = Authority(r, token_url="http://other:8080/auth/token", key_dir=tmp_path / "keys")
    other_token = other_issuer.dev_token()
    refused(f"Bearer {other_token}")
    other_key = Authority(r, token_url=TOKEN_URL, key_dir=tmp_path / "elsewhere")
    assert "signature" in refused(f"Bearer {other_key.dev_token()}").lower()
    # a token whose signature was tampered with
    head, body, sig = good.split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(body + "=="))
    claims["scope"] = "fhirtwin/admin system/*.cruds"
    refused(f"Bearer {head}.{_b64(orjson.dumps(claims))}.{sig}")
    # a removed client's tokens stop working
    assert authority.remove_client("sim-ops")
    assert "no longer registered" in refused(f"Bearer {good}")


def test_expired_access_token(
    authority: Authority, client: str, keys: tuple[RSAKey, ECKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    form = _form(_assertion(keys[1], "ES384", _claims()))
    real = time.time
    monkeypatch.setattr(auth.time, "time", lambda: real() - 301)  # issued 301 s ago
    old = authority._access_token(authority.client("sim-ops") or {}, ["system/*.rs"])
    monkeypatch.setattr(auth.time, "time", real)
    with pytest.raises(AuthError) as info:
        authority.verify_bearer(f"Bearer {old}")
    assert info.value.status == 401
    assert "expired" in info.value.message.lower()
    authority.issue(form)


def test_keys_kept_with_0600(authority: Authority, tmp_path: Path) -> None:
    token = authority.dev_token()
    for name in ("signing-key.jwk", "dev-client.jwk"):
        mode = stat.S_IMODE(os.stat(tmp_path / "keys" / name).st_mode)
        assert mode == 0o600, (name, oct(mode))
    # a second authority on the same key dir (a restart) accepts the first one's tokens
    again = Authority(authority.r, token_url=TOKEN_URL, key_dir=tmp_path / "keys")
    assert again.verify_bearer(f"Bearer {token}").client_id == auth.DEV_READER_ID


def test_keys_in_redis_are_shared(r: redis.Redis) -> None:
    a = Authority(r, token_url=TOKEN_URL)
    b = Authority(r, token_url=TOKEN_URL)
    token = a.dev_token(["fhirtwin/admin"])
    p = b.verify_bearer(f"Bearer {token}")
    assert p.scopes == frozenset({"fhirtwin/admin"})


# -- HTTP -----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_http_token_endpoint_and_smart_configuration(
    authority: Authority, client: str, keys: tuple[RSAKey, ECKey]
) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    app.include_router(auth.router(authority))
    http = TestClient(app)
    conf = http.get("/fhir/.well-known/smart-configuration").json()
    assert conf["token_endpoint"] == TOKEN_URL
    assert conf["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert "client-confidential-asymmetric" in conf["capabilities"]
    assert http.get("/auth/jwks").json()["keys"][0]["alg"] == "ES256"

    ok = http.post("/auth/token", data=_form(_assertion(keys[0], "RS384", _claims())))
    assert ok.status_code == 200, ok.text
    assert ok.headers["cache-control"] == "no-store"
    assert authority.verify_bearer(f"Bearer {ok.json()['access_token']}").client_id == "sim-ops"

    bad = http.post(
        "/auth/token", data=_form(_assertion(keys[1], "ES384", _claims(aud="http://x/")))
    )
    assert bad.status_code == 401
    assert bad.json()["error"] == "invalid_client"
    assert "aud" in bad.json()["error_description"]
    as_json = http.post("/auth/token", json=_form(_assertion(keys[1], "ES384", _claims())))
    assert as_json.status_code == 400
    assert as_json.json()["error"] == "invalid_request"
    twice = http.post(
        "/auth/token",
        content="grant_type=client_credentials&grant_type=client_credentials",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert twice.status_code == 400
    assert "twice" in twice.json()["error_description"]


# -- the command line -----------------------------------------------------------------------


def _cli(args: list[str]) -> Any:
    from fhirtwin.cli import app

    return CliRunner().invoke(app, args)


def test_fhirtwin_token_prints_only_the_token(
    redis_url: str, r: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FHIRTWIN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FHIRTWIN_REDIS", raising=False)
    # what `fhirtwin up` (embedded default) does at start
    server = Authority(r, token_url=TOKEN_URL, key_dir=auth.default_key_dir())
    server.ensure_dev_client()

    res = _cli(["token", "--redis", redis_url])
    assert res.exit_code == 0, res.output
    assert res.stdout.count("\n") == 1 and res.stdout.count(".") == 2
    p = server.verify_bearer(f"Bearer {res.stdout.strip()}")
    # the embedded default's first token reads twins, as the "dev" subscriber
    assert p == Principal(auth.DEV_READER_ID, frozenset({"system/*.rs"}), auth.DEV_SUBSCRIBER)

    res = _cli(["token", "--redis", redis_url, "--scope", "system/Observation.rs fhirtwin/audit"])
    assert res.exit_code == 0, res.output
    p = server.verify_bearer(f"Bearer {res.stdout.strip()}")
    assert p.scopes == frozenset({"system/Observation.rs", "fhirtwin/audit"})

    # found through the state file of a running `fhirtwin up`, as other commands find it
    from fhirtwin.infra import write_state

    write_state({"pid": os.getpid(), "redis": redis_url, "http": "http://127.0.0.1:8080"})
    res = _cli(["token"])
    assert res.exit_code == 0, res.output
    assert server.verify_bearer(f"Bearer {res.stdout.strip()}").client_id == auth.DEV_READER_ID

    res = _cli(["token", "--scope", "system/*.cud"])
    assert res.exit_code == 2
    assert res.stdout == ""
    assert "invalid_scope" in res.stderr


def test_fhirtwin_token_without_dev_client(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FHIRTWIN_HOME", str(tmp_path / "home"))
    res = _cli(["token", "--redis", redis_url, "--token-url", TOKEN_URL])
    assert res.exit_code == 2
    assert res.stdout == ""
    assert "development client" in res.stderr


def test_fhirtwin_client_add_list_remove(
    redis_url: str, r: redis.Redis, tmp_path: Path, keys: tuple[RSAKey, ECKey]
) -> None:
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_bytes(orjson.dumps(_jwks(keys[0])))
    res = _cli(
        ["client", "add", "ops", "--jwks", str(jwks_file), "--scope", "system/*.rs",
         "--scope", "fhirtwin/admin", "--redis", redis_url]
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    _subscriber(r)
    inline = orjson.dumps(keys[1].as_dict(private=False)).decode()  # a bare JWK
    res = _cli(
        ["client", "add", "care-app", "--jwks", inline, "--scope", "system/Observation.rs",
         "--subscriber", "care", "--redis", redis_url]
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    res = _cli(
        ["client", "add", "bad", "--jwks", inline, "--scope", "fhirtwin/audit",
         "--subscriber", "care", "--redis", redis_url]
    )  # fmt: skip
    assert res.exit_code == 2 and "fhirtwin/audit" in res.stderr
    res = _cli(["client", "list", "--json", "--redis", redis_url])
    assert res.exit_code == 0, res.output
    rows = {row["client_id"]: row for row in orjson.loads(res.stdout)}
    assert set(rows) == {"ops", "care-app"}
    assert rows["care-app"]["subscriber"] == "care"
    assert rows["ops"]["scopes"] == ["fhirtwin/admin", "system/*.rs"]
    # the registered client can get a token
    authority = Authority(r, token_url=TOKEN_URL)
    answer = authority.issue(
        _form(_assertion(keys[1], "ES384", _claims("care-app")), "system/*.rs")
    )
    assert answer["scope"] == "system/Observation.rs"
    res = _cli(["client", "remove", "ops", "--redis", redis_url])
    assert res.exit_code == 0
    res = _cli(["client", "remove", "ops", "--redis", redis_url])
    assert res.exit_code == 1
