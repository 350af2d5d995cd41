"""SMART Backend Services authorization: client registry, token endpoint, bearer checks.

A client (a backend service) is registered once with its public JWKS, the scopes it may be
granted and the subscriber it reads as. It asks for an access token by POSTing a JWT client
assertion signed with its private key (RS384 or ES384) to ``/auth/token``
(``client_credentials`` grant, ``private_key_jwt``), as the SMART App Launch IG's Backend
Services profile says. The answer is a short-lived access token signed by this server
(ES256), carrying the client id, the granted scopes and the subscriber; the FHIR API turns
``Authorization: Bearer …`` into a :class:`~fhirtwin.principal.Principal` with
:meth:`Authority.verify_bearer`. All JOSE work is done by ``joserfc``.

Keys (all under ``ft:auth:``; see ``docs/auth.md``):

==============================  ======  ======================================================
key                             type    content
==============================  ======  ======================================================
``ft:auth:clients``             set     registered client ids
``ft:auth:client:<id>``         string  the client record (JSON: jwks, scopes, subscriber)
``ft:auth:jti:<id>:<sha256>``   string  a client assertion's ``jti`` seen; expires at its exp
``ft:auth:signing-key``         string  the server's ES256 private JWK (without ``key_dir``)
``ft:auth:dev-key``             string  the development client's ES384 private JWK (idem)
``ft:auth:token-url``           string  the token URL the last server started with
==============================  ======  ======================================================
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey

from fhirtwin.principal import AuthError, Principal
from fhirtwin.redisconn import mget, multi

__all__ = [
    "ADMIN_SCOPE",
    "ASSERTION_ALGS",
    "ASSERTION_TYPE",
    "AUDIT_SCOPE",
    "DEV_CLIENT_ID",
    "DEV_SCOPES",
    "Authority",
    "ClientError",
    "check_scope",
    "default_key_dir",
    "grant_scopes",
    "parse_jwks",
    "require_scope",
    "router",
]

PREFIX = "ft:auth:"
CLIENTS_KEY = f"{PREFIX}clients"
SIGNING_KEY = f"{PREFIX}signing-key"
DEV_KEY = f"{PREFIX}dev-key"
TOKEN_URL_KEY = f"{PREFIX}token-url"

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGS = ("RS384", "ES384")  # SMART Backend Services: what servers SHALL support
ACCESS_ALG = "ES256"
ADMIN_SCOPE = "fhirtwin/admin"
AUDIT_SCOPE = "fhirtwin/audit"
PRIVILEGED_SCOPES = frozenset({ADMIN_SCOPE, AUDIT_SCOPE})
DEV_CLIENT_ID = "fhirtwin-dev"
DEV_SCOPES = ("system/*.rs", ADMIN_SCOPE, AUDIT_SCOPE)
# The embedded default's reader: a client that reads as the "dev" subscriber (treatment
# purpose, default permit, patients' own consents still apply; no snapshots), so a
# newcomer's first token can read twins. Subscriber clients never get admin/audit scopes,
# so administration uses DEV_CLIENT_ID.
DEV_READER_ID = "fhirtwin-dev-reader"
DEV_SUBSCRIBER = "dev"

MAX_ASSERTION_LIFETIME_S = 300  # exp at most 5 minutes ahead …
CLOCK_SKEW_S = 10  # … give or take a client clock this far ahead
MAX_ASSERTION_BYTES = 16_384
MAX_JTI_CHARS = 255

_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# SMART v2 system scopes (permissions c r u d s, in that order) and fhirtwin's own.
_SYSTEM_SCOPE = re.compile(r"^system/(\*|[A-Z][A-Za-z]+)\.(c?r?u?d?s?)$")
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


def default_key_dir() -> Path:
    """Where the embedded default of ``fhirtwin up`` keeps its private keys: beside its state
    file (``~/.fhirtwin/auth``, or ``$FHIRTWIN_HOME/auth``)."""
    from fhirtwin.infra import state_path

    return state_path().parent / "auth"


class ClientError(ValueError):
    """A client registration that cannot be accepted; the message says why."""


# -- scopes -------------------------------------------------------------------------------


def check_scope(scope: str) -> None:
    """Raise :class:`ClientError` unless ``scope`` is one this server understands."""
    if scope in PRIVILEGED_SCOPES:
        return
    m = _SYSTEM_SCOPE.match(scope)
    if m is None or not m.group(2):
        raise ClientError(
            f"scope {scope!r}: expected system/<Type or *>.<cruds> (e.g. system/*.rs, "
            f"system/Observation.rs), {ADMIN_SCOPE} or {AUDIT_SCOPE}"
        )


def _covers(granted: str, wanted: str) -> bool:
    """Does scope ``granted`` allow everything scope ``wanted`` does?"""
    if granted == wanted:
        return True
    g, w = _SYSTEM_SCOPE.match(granted), _SYSTEM_SCOPE.match(wanted)
    if g is None or w is None or not w.group(2):
        return False
    type_ok = g.group(1) == "*" or g.group(1) == w.group(1)
    return type_ok and set(w.group(2)) <= set(g.group(2))


def _intersect(a: str, b: str) -> str | None:
    """The scope allowing what both ``a`` and ``b`` allow (``system/*.rs`` ∩
    ``system/Observation.r`` = ``system/Observation.r``), or None."""
    if a == b:
        return a
    ma, mb = _SYSTEM_SCOPE.match(a), _SYSTEM_SCOPE.match(b)
    if ma is None or mb is None:
        return None
    ta, tb = ma.group(1), mb.group(1)
    if ta != tb and "*" not in (ta, tb):
        return None
    rtype = tb if ta == "*" else ta
    perms = "".join(c for c in "cruds" if c in ma.group(2) and c in mb.group(2))
    return f"system/{rtype}.{perms}" if perms else None


def grant_scopes(requested: Iterable[str], registered: Iterable[str]) -> list[str]:
    """Requested ∩ registered, scope by scope; what another granted scope covers is dropped."""
    reg = list(registered)
    found = {x for w in requested for g in reg if (x := _intersect(w, g)) is not None}
    return sorted(s for s in found if not any(o != s and _covers(o, s) for o in found))


def require_scope(principal: Principal, scope: str) -> None:
    """For the API: 403 unless the principal holds ``scope``. Admin and audit scopes are never
    honoured for a client that reads as a subscriber, whatever its token says."""
    if scope in PRIVILEGED_SCOPES and principal.subscriber is not None:
        raise AuthError(
            403, "insufficient_scope", f"{scope} is not for clients that read as a subscriber"
        )
    if not any(_covers(s, scope) for s in principal.scopes):
        raise AuthError(403, "insufficient_scope", f"this token does not carry {scope}")


# -- client JWKS --------------------------------------------------------------------------


def parse_jwks(jwks: Mapping[str, Any]) -> dict[str, Any]:
    """Check a client's public JWKS and return it as stored. Every key needs a unique ``kid``,
    must be RSA (≥ 2048 bits, for RS384) or EC P-384 (for ES384), and public."""
    keys = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(keys, list) or not keys:
        raise ClientError('JWKS: expected {"keys": [ … ]} with at least one key')
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for i, key in enumerate(keys):
        if not isinstance(key, dict):
            raise ClientError(f"JWKS key {i}: not a JSON object")
        kid = key.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ClientError(f"JWKS key {i}: a kid is required (assertions name their key)")
        if kid in seen:
            raise ClientError(f"JWKS key {kid!r}: kid used twice")
        seen.add(kid)
        if any(m in key for m in _PRIVATE_MEMBERS):
            raise ClientError(
                f"JWKS key {kid!r}: private or symmetric key material; register public keys only"
            )
        try:
            _public_key(key)
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise ClientError(f"JWKS key {kid!r}: {exc}") from None
        out.append(dict(key))
    return {"keys": out}


def _public_key(jwk: Mapping[str, Any]) -> RSAKey | ECKey:
    kty = jwk.get("kty")
    if kty == "RSA":
        rsa = RSAKey.import_key(dict(jwk))
        if rsa.is_private:
            raise ValueError("private key")
        if rsa.raw_value.key_size < 2048:
            raise ValueError("RSA keys must have at least 2048 bits")
        return rsa
    if kty == "EC":
        ec = ECKey.import_key(dict(jwk))
        if ec.is_private:
            raise ValueError("private key")
        if ec.curve_name != "P-384":
            raise ValueError(f"EC keys must be on P-384 (for ES384), not {ec.curve_name}")
        return ec
    raise ValueError(f"kty {kty!r}: only RSA (RS384) and EC P-384 (ES384) keys")


def _alg_fits(alg: str, key: RSAKey | ECKey) -> bool:
    return (alg == "RS384" and isinstance(key, RSAKey)) or (
        alg == "ES384" and isinstance(key, ECKey)
    )


# -- the authority ------------------------------------------------------------------------


class Authority:
    """The authorization server: clients in Redis, one signing key, tokens it issues.

    ``token_url`` is the exact URL clients must put in their assertions' ``aud``; it is also
    the ``iss`` of the access tokens issued here. Private keys (the server's ES256 signing
    key and the development client's ES384 key) are kept as JWK files with mode 0600 in
    ``key_dir`` when given, else in Redis (so every server sharing that Redis agrees).
    """

    def __init__(
        self,
        redis_client: Any,
        *,
        token_url: str,
        key_dir: Path | None = None,
        token_ttl_s: int = 300,
    ) -> None:
        self.r: Any = redis_client
        self.token_url = token_url
        self.key_dir = key_dir
        self.token_ttl_s = token_ttl_s
        self.issuer = token_url
        self.audience = _audience_for(token_url)
        self._signing_key: ECKey | None = None

    @property
    def _signing(self) -> ECKey:
        """The server's ES256 key, made the first time it is needed, then kept."""
        if self._signing_key is None:
            self._signing_key = self._load_or_create(SIGNING_KEY, "signing-key.jwk", "P-256")
        return self._signing_key

    # -- keys ----------------------------------------------------------------------------

    def _load_or_create(self, redis_key: str, filename: str, curve: str) -> ECKey:
        fresh = ECKey.generate_key(curve, private=True)
        fresh.ensure_kid()
        data = orjson.dumps(fresh.as_dict(private=True))
        if self.key_dir is None:
            self.r.set(redis_key, data, nx=True)  # the first server to start wins
            raw = self.r.get(redis_key)
        else:
            path = self.key_dir / filename
            self.key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            raw = path.read_bytes()
        key = ECKey.import_key(orjson.loads(raw))
        key.ensure_kid()
        return key

    def public_jwks(self) -> dict[str, Any]:
        """The server's public key(s), as served on ``/auth/jwks``."""
        d = dict(self._signing.as_dict(private=False))
        d.update(use="sig", alg=ACCESS_ALG)
        return {"keys": [d]}

    # -- clients -------------------------------------------------------------------------

    @staticmethod
    def client_key(client_id: str) -> str:
        return f"{PREFIX}client:{client_id}"

    def register_client(
        self, client_id: str, jwks: dict[str, Any], scopes: Iterable[str], subscriber: str | None
    ) -> None:
        """Register (or replace) a client. Raises :class:`ClientError` naming what is wrong."""
        if not _CLIENT_ID.match(client_id):
            raise ClientError(
                f"client id {client_id!r}: 1-128 letters, digits, '.', '_', ':' or '-', "
                "starting with a letter or digit"
            )
        allowed = sorted(set(scopes))
        if not allowed:
            raise ClientError("a client needs at least one scope")
        for s in allowed:
            check_scope(s)
        if subscriber is not None:
            privileged = sorted(PRIVILEGED_SCOPES.intersection(allowed))
            if privileged:
                raise ClientError(
                    f"{', '.join(privileged)}: not for a client that reads as subscriber "
                    f"{subscriber!r} (register a separate client without --subscriber)"
                )
            from fhirtwin.subscribers import Registry

            if Registry(self.r).get(subscriber) is None:
                raise ClientError(
                    f"no subscriber {subscriber!r}: register it first (fhirtwin subscriber add)"
                )
        record = {
            "client_id": client_id,
            "jwks": parse_jwks(jwks),
            "scopes": allowed,
            "subscriber": subscriber,
            "created": int(time.time()),
        }
        pipe = multi(self.r)  # a cluster: two writes, each atomic (clients() skips a bare id)
        pipe.set(self.client_key(client_id), orjson.dumps(record, option=orjson.OPT_SORT_KEYS))
        pipe.sadd(CLIENTS_KEY, client_id)
        pipe.execute()

    def client(self, client_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self.client_key(client_id))
        if not raw:
            return None
        record: dict[str, Any] = orjson.loads(raw)
        return record

    def clients(self) -> list[dict[str, Any]]:
        ids = sorted(i.decode() for i in self.r.smembers(CLIENTS_KEY))
        raws = mget(self.r, [self.client_key(i) for i in ids])
        return [orjson.loads(raw) for raw in raws if raw]

    def remove_client(self, client_id: str) -> bool:
        """Forget a client; the access tokens it holds stop working at once."""
        pipe = multi(self.r)
        pipe.delete(self.client_key(client_id))
        pipe.srem(CLIENTS_KEY, client_id)
        deleted, _ = pipe.execute()
        return bool(deleted)

    # -- the token endpoint --------------------------------------------------------------

    def issue(self, form: Mapping[str, str]) -> dict[str, Any]:
        """Answer a token request (the form fields); raise :class:`AuthError` per RFC 6749 §5.2."""
        grant = form.get("grant_type")
        if grant != "client_credentials":
            if not grant:
                raise AuthError(400, "invalid_request", "grant_type is required")
            raise AuthError(
                400, "unsupported_grant_type", f"grant_type {grant!r}: only client_credentials"
            )
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise AuthError(
                400, "invalid_request", f"client_assertion_type must be {ASSERTION_TYPE}"
            )
        assertion = form.get("client_assertion") or ""
        if not assertion:
            raise AuthError(400, "invalid_request", "client_assertion is required")
        requested = (form.get("scope") or "").split()
        if not requested:
            raise AuthError(400, "invalid_scope", "scope is required (e.g. system/*.rs)")
        client, _claims = self._check_assertion(assertion)
        granted = self._grant(client, requested)
        token = self._access_token(client, granted)
        return {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": self.token_ttl_s,
            "scope": " ".join(granted),
        }

    def _check_assertion(self, assertion: str) -> tuple[dict[str, Any], dict[str, Any]]:
        def bad(message: str) -> AuthError:
            return AuthError(401, "invalid_client", message)

        if len(assertion) > MAX_ASSERTION_BYTES:
            raise bad("client_assertion is too long")
        try:
            unverified = jws.extract_compact(assertion.encode("ascii"))
            header: dict[str, Any] = dict(unverified.headers())
            peek = orjson.loads(unverified.payload)
        except (JoseError, ValueError, UnicodeError) as exc:
            raise bad(f"client_assertion is not a signed JWT: {exc}") from None
        alg = header.get("alg")
        if alg not in ASSERTION_ALGS:  # never none, never HS*: a public key is no secret
            raise bad(f"alg {alg!r} is not accepted: sign with {' or '.join(ASSERTION_ALGS)}")
        if not isinstance(peek, dict) or not isinstance(peek.get("iss"), str):
            raise bad("client_assertion: iss (the client id) is required")
        client_id = peek["iss"]
        client = self.client(client_id)
        if client is None:
            raise bad(f"unknown client {client_id!r}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise bad("client_assertion header: kid is required")
        jwk = next((k for k in client["jwks"]["keys"] if k.get("kid") == kid), None)
        if jwk is None:
            raise bad(f"kid {kid!r} is not a key registered for client {client_id!r}")
        key = _public_key(jwk)
        if not _alg_fits(alg, key):
            raise bad(f"alg {alg} does not fit key {kid!r} ({jwk.get('kty')})")
        try:
            token = jwt.decode(assertion, key, algorithms=[alg])
        except JoseError as exc:
            raise bad(f"client_assertion signature does not verify: {exc}") from None
        claims = dict(token.claims)
        now = int(time.time())
        registry = jwt.JWTClaimsRegistry(
            now=now,
            iss={"essential": True, "value": client_id},
            sub={"essential": True, "value": client_id},
            aud={"essential": True, "value": self.token_url},
            exp={"essential": True},
            jti={"essential": True},
        )
        try:
            registry.validate(claims)
        except JoseError as exc:
            raise bad(f"client_assertion: {exc}") from None
        aud = claims["aud"]
        if aud != self.token_url and aud != [self.token_url]:
            raise bad(f"client_assertion: aud must be exactly {self.token_url}")
        exp = claims["exp"]
        if not isinstance(exp, int | float) or exp > now + MAX_ASSERTION_LIFETIME_S + CLOCK_SKEW_S:
            raise bad("client_assertion: exp must be at most 5 minutes from now")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS:
            raise bad(f"client_assertion: jti must be a string of 1-{MAX_JTI_CHARS} characters")
        digest = hashlib.sha256(jti.encode()).hexdigest()
        seen_key = f"{PREFIX}jti:{client_id}:{digest}"
        if not self.r.set(seen_key, b"1", nx=True, exat=max(int(exp), now + 1)):
            raise bad("client_assertion: this jti was used before (replay)")
        return client, claims

    @staticmethod
    def _grant(client: Mapping[str, Any], requested: list[str]) -> list[str]:
        registered: list[str] = client["scopes"]
        privileged_ok = client.get("subscriber") is None
        granted = [
            s
            for s in grant_scopes(requested, registered)
            if privileged_ok or s not in PRIVILEGED_SCOPES
        ]
        if not granted:
            raise AuthError(
                400,
                "invalid_scope",
                f"none of {' '.join(requested)} is allowed for client {client['client_id']!r} "
                f"(registered: {' '.join(registered)})",
            )
        return granted

    def _access_token(self, client: Mapping[str, Any], granted: list[str]) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": client["client_id"],
            "client_id": client["client_id"],
            "scope": " ".join(granted),
            "subscriber": client.get("subscriber"),
            "iat": now,
            "exp": now + self.token_ttl_s,
            "jti": secrets.token_urlsafe(16),
        }
        header = {"alg": ACCESS_ALG, "typ": "at+jwt", "kid": self._signing.kid}
        return jwt.encode(header, claims, self._signing, algorithms=[ACCESS_ALG])

    # -- the resource server's side ------------------------------------------------------

    def verify_bearer(self, authorization: str | None) -> Principal:
        """``Authorization`` header value → :class:`Principal`; 401 for anything wrong."""
        if not authorization:
            raise AuthError(401, "invalid_token", "an Authorization: Bearer token is required")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError(401, "invalid_token", "expected Authorization: Bearer <token>")
        try:
            decoded = jwt.decode(token, self._signing, algorithms=[ACCESS_ALG])
            claims = dict(decoded.claims)
            jwt.JWTClaimsRegistry(
                iss={"essential": True, "value": self.issuer},
                aud={"essential": True, "value": self.audience},
                exp={"essential": True},
                sub={"essential": True},
            ).validate(claims)
        except (JoseError, ValueError, UnicodeError) as exc:
            raise AuthError(401, "invalid_token", f"bearer token rejected: {exc}") from None
        if decoded.header.get("typ") != "at+jwt":
            raise AuthError(401, "invalid_token", "not an access token")
        client_id = claims.get("client_id")
        scope = claims.get("scope")
        subscriber = claims.get("subscriber")
        if not isinstance(client_id, str) or not isinstance(scope, str):
            raise AuthError(401, "invalid_token", "bearer token lacks client_id or scope")
        if subscriber is not None and not isinstance(subscriber, str):
            raise AuthError(401, "invalid_token", "bearer token: bad subscriber")
        client = self.client(client_id)
        if client is None or client.get("subscriber") != subscriber:
            raise AuthError(401, "invalid_token", f"client {client_id!r} is no longer registered")
        return Principal(
            client_id=client_id, scopes=frozenset(scope.split()), subscriber=subscriber
        )

    # -- the embedded default's development client ---------------------------------------

    def ensure_dev_client(self, scopes: Iterable[str] = DEV_SCOPES) -> str:
        """Register the development client (ES384 key kept like the signing key); its id."""
        key = self._load_or_create(DEV_KEY, "dev-client.jwk", "P-384")
        public = dict(key.as_dict(private=False))
        public.update(use="sig", alg="ES384")
        current = self.client(DEV_CLIENT_ID)
        wanted = sorted(set(scopes))
        if (
            current is None
            or current["jwks"] != {"keys": [public]}
            or current["scopes"] != wanted
            or current.get("subscriber") is not None
        ):
            self.register_client(DEV_CLIENT_ID, {"keys": [public]}, wanted, None)
        self.r.set(TOKEN_URL_KEY, self.token_url)
        return DEV_CLIENT_ID

    def ensure_dev_reader(self) -> str:
        """Register the development reader: the ``dev`` subscriber (API only, no snapshots)
        and a client reading as it, with the development client's key. Its id."""
        from fhirtwin.subscribers import Registry, make_subscriber

        registry = Registry(self.r)
        if registry.get(DEV_SUBSCRIBER) is None:
            sub = make_subscriber(
                DEV_SUBSCRIBER,
                actor=[f"urn:fhirtwin:client|{DEV_READER_ID}"],
                purpose=["TREAT"],
                scope="patient-privacy",
                default="permit",
            )
            sub.extra["api_only"] = True
            registry.put(sub)
        key = self._load_or_create(DEV_KEY, "dev-client.jwk", "P-384")
        public = dict(key.as_dict(private=False))
        public.update(use="sig", alg="ES384")
        current = self.client(DEV_READER_ID)
        if current is None or current["jwks"] != {"keys": [public]}:
            self.register_client(DEV_READER_ID, {"keys": [public]}, ["system/*.rs"], DEV_SUBSCRIBER)
        return DEV_READER_ID

    def dev_token(self, scopes: Iterable[str] = ("system/*.rs",)) -> str:
        """A fresh access token for the embedded default, got through :meth:`issue` with a
        client assertion signed by the development key, as any client would: from the
        development reader (reads twins as the ``dev`` subscriber) unless an admin or
        audit scope is asked for, then from the development client."""
        scopes = list(scopes)
        if {ADMIN_SCOPE, AUDIT_SCOPE} & set(scopes):
            client_id = self.ensure_dev_client()
        else:
            self.ensure_dev_client()
            client_id = self.ensure_dev_reader()
        key = self._load_or_create(DEV_KEY, "dev-client.jwk", "P-384")
        now = int(time.time())
        assertion = jwt.encode(
            {"alg": "ES384", "typ": "JWT", "kid": key.kid},
            {
                "iss": client_id,
                "sub": client_id,
                "aud": self.token_url,
                "exp": now + 240,
                "iat": now,
                "jti": secrets.token_urlsafe(16),
            },
            key,
            algorithms=["ES384"],
        )
        answer = self.issue(
            {
                "grant_type": "client_credentials",
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion,
                "scope": " ".join(scopes),
            }
        )
        return str(answer["access_token"])

    def smart_configuration(self) -> dict[str, Any]:
        base = self.token_url.rsplit("/auth/token", 1)[0]
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{base}/auth/jwks",
            "token_endpoint": self.token_url,
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGS),
            "scopes_supported": [
                "system/*.rs",
                "system/*.r",
                "system/*.s",
                *sorted(PRIVILEGED_SCOPES),
            ],
            "capabilities": ["client-confidential-asymmetric", "permission-v2"],
        }


def _audience_for(token_url: str) -> str:
    """Access tokens are for the FHIR API beside the token endpoint: ``…/fhir``."""
    if token_url.endswith("/auth/token"):
        return token_url[: -len("/auth/token")] + "/fhir"
    return token_url


# -- HTTP ---------------------------------------------------------------------------------


def _form(body: bytes) -> dict[str, str]:
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeError, ValueError):
        raise AuthError(400, "invalid_request", "the body is not a form") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:  # RFC 6749 §3.2: parameters MUST NOT be repeated
            raise AuthError(400, "invalid_request", f"parameter {name} given twice")
        form[name] = value
    return form


def router(authority: Authority) -> APIRouter:
    """``POST /auth/token``, ``GET /auth/jwks`` and ``GET /fhir/.well-known/smart-configuration``
    (include it at the application's root)."""
    api = APIRouter(tags=["auth"])
    no_store = {"Cache-Control": "no-store", "Pragma": "no-cache"}

    @api.post("/auth/token")
    async def token(request: Request) -> JSONResponse:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if ctype != "application/x-www-form-urlencoded":
                raise AuthError(
                    400, "invalid_request", "send the request as application/x-www-form-urlencoded"
                )
            form = _form(await request.body())
            answer = authority.issue(form)
        except AuthError as exc:
            return JSONResponse(
                {"error": exc.code, "error_description": exc.message},
                status_code=exc.status,
                headers=no_store,
            )
        return JSONResponse(answer, headers=no_store)

    @api.get("/auth/jwks")
    def jwks() -> JSONResponse:
        return JSONResponse(authority.public_jwks())

    @api.get("/fhir/.well-known/smart-configuration")
    def smart_configuration() -> JSONResponse:
        return JSONResponse(authority.smart_configuration())

    return api
