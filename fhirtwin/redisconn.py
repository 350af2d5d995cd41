"""One way to connect to Redis: a single server (with or without replicas) or a Redis Cluster.

``connect(url)`` returns a ``redis.Redis``, or a ``redis.RedisCluster`` when

* the URL's query says ``cluster=true`` (also ``1``/``yes``/``on``; the parameter is removed
  before redis-py reads the URL), or
* ``$FHIRTWIN_REDIS_CLUSTER`` is true and the URL does not say otherwise (the Helm chart
  sets it from ``redis.cluster.enabled``). The key store's URL (``FHIRTWIN_KEYSTORE``, a
  Redis of its own) ignores the variable: ``connect(url, use_env=False)``.

The URL carries the rest: ``rediss://`` for TLS, ``?ssl_ca_certs=…`` for a private CA, the
ACL user and password (``redis://user:password@host:port/0``). When the URL names no
password and ``$FHIRTWIN_REDIS_PASSWORD`` is set, that is the password (so it need not be
URL-safe). A cluster has one database: the URL's must be ``0`` (or absent).

On a cluster, a command or script may only touch keys of one hash slot. The helpers here
keep fhirtwin's multi-key reads and writes working on both kinds of client with the
single-server behaviour unchanged: :func:`mget` / :func:`mset` (split by slot on a
cluster), :func:`multi` (a ``MULTI`` transaction on one server; a plain pipeline, each
command atomic alone, on a cluster). ``client.delete`` / ``unlink`` / ``exists`` and
``scan_iter`` already span slots and nodes on a ``RedisCluster``. docs/deploy.md, "Redis
Cluster", lists which keys must share a slot.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.exceptions import RedisClusterException

__all__ = [
    "CLUSTER_ENV",
    "PASSWORD_ENV",
    "RedisClient",
    "cluster_url",
    "connect",
    "is_cluster",
    "mget",
    "mset",
    "multi",
]

CLUSTER_ENV = "FHIRTWIN_REDIS_CLUSTER"
PASSWORD_ENV = "FHIRTWIN_REDIS_PASSWORD"

RedisClient: TypeAlias = redis.Redis | redis.RedisCluster

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _flag(value: str, where: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{where}={value!r}: expected true or false")


def cluster_url(url: str, *, use_env: bool = True) -> tuple[str, bool]:
    """(the URL without fhirtwin's ``cluster`` parameter, whether it names a cluster)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    said = [v for k, v in query if k == "cluster"]
    if said:
        cluster = _flag(said[-1], "cluster")
        rest = [(k, v) for k, v in query if k != "cluster"]
        url = urlunsplit(parts._replace(query=urlencode(rest)))
    else:
        env = os.environ.get(CLUSTER_ENV, "") if use_env else ""
        cluster = _flag(env, CLUSTER_ENV)
    return url, cluster


def connect(
    url: str, *, cluster: bool | None = None, use_env: bool = True, **kwargs: Any
) -> RedisClient:
    """A client for ``url`` (see the module docstring); ``kwargs`` go to redis-py
    (``socket_timeout`` …). ``cluster`` forces the mode. ``use_env=False``: neither
    ``$FHIRTWIN_REDIS_CLUSTER`` nor ``$FHIRTWIN_REDIS_PASSWORD`` apply (the key store)."""
    url, said = cluster_url(url, use_env=use_env)
    if cluster is None:
        cluster = said
    password = os.environ.get(PASSWORD_ENV) if use_env else None
    if password and not urlsplit(url).password and "password" not in kwargs:
        kwargs["password"] = password
    if not cluster:
        return redis.Redis.from_url(url, **kwargs)
    try:
        return redis.RedisCluster.from_url(url, **kwargs)
    except RedisClusterException as exc:
        # no node answered, or the URL does not suit a cluster (a database other than 0):
        # as a connection error, like a single server that does not answer
        raise redis.ConnectionError(f"Redis Cluster at {_safe(url)}: {exc}") from exc


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


def is_cluster(client: Any) -> bool:
    """Is this a Redis Cluster client (commands of one call must stay in one slot)?"""
    return isinstance(client, redis.RedisCluster)


def mget(client: Any, keys: Sequence[Any]) -> list[Any]:
    """``MGET`` of keys that may lie in several slots (split by slot on a cluster)."""
    if not keys:
        return []
    if is_cluster(client):
        return list(client.mget_nonatomic(list(keys)))
    return list(client.mget(list(keys)))


def mset(client: Any, mapping: Mapping[Any, Any]) -> None:
    """``MSET`` of keys that may lie in several slots (one ``MSET`` per slot on a cluster)."""
    if not mapping:
        return
    if is_cluster(client):
        client.mset_nonatomic(dict(mapping))
    else:
        client.mset(dict(mapping))


def multi(client: Any) -> Any:
    """A pipeline that is a ``MULTI`` transaction on a single server. On a cluster, whose
    transactions cannot span slots, a plain pipeline: each command is atomic, the group is
    not (callers order their commands so that a partial group is harmless)."""
    if is_cluster(client):
        return client.pipeline(transaction=False)
    return client.pipeline(transaction=True)
