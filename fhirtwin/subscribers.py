"""The subscriber registry: who may receive twin snapshots, for what, and how (in Redis).

A subscriber is a simulation service (precision-medicine model, synthetic control arm,
hospital operations…) registered once with its organisation/app identifiers, purpose of use,
scope, wanted resource types, de-identification profile and default for NOT_APPLICABLE.
What a subscriber is — never a request header — is what the consent engine judges.

Keys (all under ``ft:sub:``, outside every twin's hash tag; see ``docs/snapshots.md``):

===============================  ======  ===================================================
key                              type    content
===============================  ======  ===================================================
``ft:sub:_ids``                  set     registered subscriber ids
``ft:sub:<id>``                  string  the subscriber record (JSON)
``ft:sub:<id>:pseudo:<twin>``    string  random pseudonym of that twin for that subscriber
``ft:sub:<id>:rid:<twin>``       hash    ``Type/id`` → random resource id (de-identified)
``ft:sub:<id>:access``           hash    twin → ``1`` when the last evaluation disclosed,
                                         ``0`` when it did not (drives withdrawal notices)
===============================  ======  ===================================================

Subscriber ids start with a letter or digit, so ``_ids`` can never be one.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from fhirtwin.consent import RequestError, parse_request, prepare, terminology
from fhirtwin.redisconn import RedisClient, connect, is_cluster, mget, multi

__all__ = [
    "DEFAULT_EXCLUDED_TYPES",
    "PROFILES",
    "Registry",
    "Subscriber",
    "SubscriberError",
    "make_subscriber",
    "topic_for",
]

PREFIX = "ft:sub:"
IDS_KEY = f"{PREFIX}_ids"
PROFILES = ("none", "safe-harbor")
SCOPES = ("patient-privacy", "research")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TYPE = re.compile(r"^[A-Z][A-Za-z]+$")
_LITERAL = re.compile(r"^[A-Z][A-Za-z]+/[A-Za-z0-9.-]{1,64}$")

# Never disclosed unless a subscriber asks for them by name: consents are policy, not data;
# message plumbing says which system sent what when.
DEFAULT_EXCLUDED_TYPES = frozenset(
    {"Consent", "MessageHeader", "Provenance", "AuditEvent", "Device", "Bundle"}
)


class SubscriberError(ValueError):
    """A registration that cannot be accepted; the message says why."""


def topic_for(sub_id: str) -> str:
    return f"twin.snapshots.{sub_id}"


@dataclass(frozen=True)
class Subscriber:
    id: str
    actor: tuple[str, ...]
    purpose: tuple[str, ...]
    scope: str
    types: tuple[str, ...] | None = None  # None: every type but DEFAULT_EXCLUDED_TYPES
    default: str = "deny"
    deidentify: str = "none"
    topic: str = ""
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # A public JWK (EC P-256/384/521 or X25519): every value on the subscriber's topic is
    # then a JWE (ECDH-ES+A256KW, A256GCM) only its private key opens (open_snapshot).
    encryption_key: dict[str, Any] | None = None

    def request(self) -> dict[str, Any]:
        """The consent-engine request (docs/consent.md) this subscriber makes."""
        req: dict[str, Any] = {
            "subscriber": self.id,
            "actor": list(self.actor),
            "purpose": list(self.purpose),
            "scope": self.scope,
            "default": self.default,
            "simulation": True,
        }
        if self.types is not None:
            req["class"] = list(self.types)
        if self.deidentify != "none":
            req["deidentify"] = self.deidentify
        return req

    def wants(self, rtype: str) -> bool:
        if rtype == "Patient":
            return True  # a snapshot is about a patient; still decided per resource
        if self.types is None:
            return rtype not in DEFAULT_EXCLUDED_TYPES
        return rtype in self.types

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["actor"] = list(self.actor)
        d["purpose"] = list(self.purpose)
        d["types"] = list(self.types) if self.types is not None else None
        if not d["extra"]:
            del d["extra"]
        if d["encryption_key"] is None:
            del d["encryption_key"]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Subscriber:
        return cls(
            id=d["id"],
            actor=tuple(d["actor"]),
            purpose=tuple(d["purpose"]),
            scope=d["scope"],
            types=tuple(d["types"]) if d.get("types") is not None else None,
            default=d.get("default", "deny"),
            deidentify=d.get("deidentify", "none"),
            topic=d.get("topic") or topic_for(d["id"]),
            created=d.get("created", ""),
            extra=d.get("extra") or {},
            encryption_key=d.get("encryption_key") or None,
        )


def _split(values: Iterable[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return out


def make_subscriber(
    sub_id: str,
    *,
    actor: Sequence[str],
    purpose: Sequence[str],
    scope: str,
    types: Sequence[str] | None = None,
    default: str | None = None,
    deidentify: str | None = None,
    encryption_key: Mapping[str, Any] | None = None,
) -> Subscriber:
    """Check a registration and apply the fixed rules: research ⇒ safe-harbor and deny.

    Raises :class:`SubscriberError` naming the offending field.
    """
    if not _ID.match(sub_id):
        raise SubscriberError(
            f"subscriber id {sub_id!r}: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    actors = _split(actor)
    if not actors:
        raise SubscriberError("--actor: at least one organisation/app identifier (system|value)")
    for a in actors:
        system, bar, value = a.partition("|")
        if not (bar and system and value) and not _LITERAL.match(a):
            raise SubscriberError(
                f"--actor {a!r}: expected system|value (e.g. urn:oid:1.2.3|sim-care) "
                "or a literal reference Type/id"
            )
    purposes = _split(purpose)
    if not purposes:
        raise SubscriberError("--purpose: at least one v3 ActReason code (e.g. TREAT)")
    if scope not in SCOPES:
        raise SubscriberError(f"--scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    term = terminology()
    for p in purposes:
        code = p.rpartition("|")[2]
        if not term.ancestors(code) and code not in term.break_glass:
            raise SubscriberError(
                f"--purpose {p!r}: not a purpose-of-use code of v3 ActReason "
                "(see mappings/consent/actreason.yaml)"
            )
    wanted: tuple[str, ...] | None = None
    if types:
        wanted = tuple(sorted(set(_split(types))))
        bad = [t for t in wanted if not _TYPE.match(t)]
        if bad:
            raise SubscriberError(f"--types {bad[0]!r}: not a FHIR resource type name")
    research = scope == "research"
    if research:
        if default == "permit":
            raise SubscriberError(
                "--default permit is not allowed for research: NOT_APPLICABLE is always deny"
            )
        if deidentify == "none":
            raise SubscriberError("--deidentify none is not allowed for research: safe-harbor")
    profile = "safe-harbor" if research else (deidentify or "none")
    if profile not in PROFILES:
        raise SubscriberError(f"--deidentify must be one of {', '.join(PROFILES)}")
    chosen = "deny" if research else (default or "deny")
    if chosen not in ("permit", "deny"):
        raise SubscriberError("--default must be permit or deny")
    sub = Subscriber(
        id=sub_id,
        actor=tuple(actors),
        purpose=tuple(purposes),
        scope=scope,
        types=wanted,
        default=chosen,
        deidentify=profile,
        topic=topic_for(sub_id),
        created=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        encryption_key=check_encryption_key(encryption_key) if encryption_key else None,
    )
    # The engine is the judge of what a request may be: scope/purpose coherence, and
    # break-glass, which it rejects for simulation subscribers (CONSENT.md rule 8).
    try:
        parse_request(sub.request())
    except RequestError as exc:
        raise SubscriberError(str(exc)) from None
    verdict = prepare([], sub.request(), now=datetime.now(UTC)).decide()
    if verdict.reasons:
        raise SubscriberError(f"--purpose: rejected by the consent engine: {verdict.reasons[0]}")
    return sub


# -- snapshots sealed for their subscriber (JWE) --------------------------------------------

JWE_HEADER = {"alg": "ECDH-ES+A256KW", "enc": "A256GCM"}
_CURVES = {"EC": ("P-256", "P-384", "P-521"), "OKP": ("X25519",)}


def _public_key(jwk: Mapping[str, Any]) -> Any:
    from joserfc.jwk import ECKey, OKPKey

    return (ECKey if jwk.get("kty") == "EC" else OKPKey).import_key(dict(jwk))


def check_encryption_key(jwk: Mapping[str, Any]) -> dict[str, Any]:
    """The subscriber's public encryption JWK, checked; SubscriberError says what is wrong."""
    if not isinstance(jwk, Mapping):
        raise SubscriberError("--encryption-key: a JWK (a JSON object)")
    if isinstance(jwk.get("keys"), list) and len(jwk["keys"]) == 1:
        jwk = jwk["keys"][0]  # a JWKS of one key
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty not in _CURVES or crv not in _CURVES[kty]:
        raise SubscriberError(
            f"--encryption-key: kty {kty!r} crv {crv!r}: expected an EC key (P-256, P-384, "
            "P-521) or an OKP X25519 key, for ECDH-ES+A256KW"
        )
    if "d" in jwk:
        raise SubscriberError(
            "--encryption-key: this JWK holds the private key ('d'); register the public key "
            "only and keep the private one with the subscriber"
        )
    if jwk.get("use") not in (None, "enc"):
        raise SubscriberError(f"--encryption-key: use {jwk.get('use')!r}: must be 'enc'")
    try:
        _public_key(jwk)
    except Exception as exc:  # joserfc raises several kinds for a malformed key
        raise SubscriberError(f"--encryption-key: not a usable key ({exc})") from None
    return {k: jwk[k] for k in ("kty", "crv", "x", "y", "kid", "use") if k in jwk}


def seal_for(sub: Subscriber, value: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A value for the subscriber's topic: a JWE compact token when it registered a key
    (plus the header saying so), else the value as it is."""
    if not sub.encryption_key:
        return value, []
    from joserfc import jwe

    token = jwe.encrypt_compact(dict(JWE_HEADER), value, _public_key(sub.encryption_key))
    return token.encode(), [("fhirtwin-encryption", b"jwe")]


def open_snapshot(value: bytes, private_jwk: Mapping[str, Any]) -> bytes:
    """For a subscriber: the snapshot (or notice) JSON of a value on its topic, opened with
    its private JWK. A value that is not a JWE is returned as it is."""
    if not value.startswith(b"eyJ"):
        return value
    from joserfc import jwe
    from joserfc.jwk import ECKey, OKPKey

    key = (ECKey if private_jwk.get("kty") == "EC" else OKPKey).import_key(dict(private_jwk))
    return bytes(jwe.decrypt_compact(value.decode(), key).plaintext or b"")


class Registry:
    """Subscribers in Redis (a redis-py client is passed in)."""

    def __init__(self, client: RedisClient) -> None:
        self.r: Any = client

    @classmethod
    def connect(cls, url: str) -> Registry:
        return cls(connect(url))

    @staticmethod
    def key(sub_id: str) -> str:
        return f"{PREFIX}{sub_id}"

    def put(self, sub: Subscriber) -> None:
        """Store (or replace) a subscriber as given: callers go through make_subscriber."""
        pipe = multi(self.r)  # a cluster: two writes, each atomic (all() skips a bare id)
        pipe.set(self.key(sub.id), orjson.dumps(sub.to_json(), option=orjson.OPT_SORT_KEYS))
        pipe.sadd(IDS_KEY, sub.id)
        pipe.execute()

    def get(self, sub_id: str) -> Subscriber | None:
        raw = self.r.get(self.key(sub_id))
        return Subscriber.from_json(orjson.loads(raw)) if raw else None

    def all(self) -> list[Subscriber]:
        ids = sorted(i.decode() for i in self.r.smembers(IDS_KEY))
        if not ids:
            return []
        raws = mget(self.r, [self.key(i) for i in ids])
        return [Subscriber.from_json(orjson.loads(raw)) for raw in raws if raw]

    def remove(self, sub_id: str) -> bool:
        """Forget the subscriber, its pseudonyms and access state (its topic is kept)."""
        if not self.r.exists(self.key(sub_id)):
            return False
        keys = list(self.r.scan_iter(match=f"{self.key(sub_id)}:*", count=1000))
        if is_cluster(self.r):  # keys of many slots, no MULTI: unlisted first, then gone
            self.r.srem(IDS_KEY, sub_id)
            self.r.delete(self.key(sub_id), *keys)
            return True
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.key(sub_id), *keys)
        pipe.srem(IDS_KEY, sub_id)
        pipe.execute()
        return True

    # -- per (subscriber, twin) state --------------------------------------------------

    def pseudonym(self, sub_id: str, twin: str) -> str:
        """The twin's pseudonym for this subscriber: random (uuid4), made once, then kept."""
        key = f"{self.key(sub_id)}:pseudo:{twin}"
        self.r.set(key, str(uuid.uuid4()), nx=True)
        return str(self.r.get(key).decode())

    def resource_ids(self, sub_id: str, twin: str, refs: Sequence[str]) -> dict[str, str]:
        """Random, stable ids for ``Type/id`` refs of this twin, for this subscriber."""
        if not refs:
            return {}
        key = f"{self.key(sub_id)}:rid:{twin}"
        pipe = self.r.pipeline(transaction=False)
        for ref in refs:
            pipe.hsetnx(key, ref, str(uuid.uuid4()))
        pipe.hmget(key, list(refs))
        values = pipe.execute()[-1]
        return {ref: v.decode() for ref, v in zip(refs, values, strict=True)}

    def access(self, sub_id: str, twins: Sequence[str]) -> dict[str, bool | None]:
        if not twins:
            return {}
        values = self.r.hmget(f"{self.key(sub_id)}:access", list(twins))
        return {t: (None if v is None else v == b"1") for t, v in zip(twins, values, strict=True)}

    def forget_twin(self, twin: str) -> None:
        """After an erasure: every subscriber's pseudonym and resource ids of the twin go;
        the access entry stays ``0`` (results about it are refused)."""
        pipe = self.r.pipeline(transaction=False)
        for raw in self.r.smembers(IDS_KEY):
            key = self.key(raw.decode())
            pseudo = self.r.get(f"{key}:pseudo:{twin}")
            pipe.delete(f"{key}:pseudo:{twin}")  # one key per DEL: a cluster pipeline's rule
            pipe.delete(f"{key}:rid:{twin}")
            pipe.hset(f"{key}:access", twin, "0")
            if pseudo is not None:
                pipe.hdel(f"{key}:twinof", pseudo)
        pipe.execute()

    def set_access(self, changes: Iterable[tuple[str, str, bool]]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for sub_id, twin, ok in changes:
            pipe.hset(f"{self.key(sub_id)}:access", twin, "1" if ok else "0")
        pipe.execute()
