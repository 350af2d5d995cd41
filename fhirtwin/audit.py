"""The audit log: AuditEvents on Kafka, sequenced into an RFC 6962 Merkle tree in Redis.

* ``twin.audit`` (one partition: one total order) holds every AuditEvent as canonical
  JSON bytes (orjson, keys sorted). It is the log; it must never be truncated.
* The **sequencer** (`fhirtwin worker audit`) is the single writer of the tree. Leaf *i*
  is the record at offset *i*, so a sequencer that crashed after writing the tree but
  before committing its Kafka offset skips what it already appended (and checks that the
  leaf hashes agree) instead of appending twice. After each batch it signs a checkpoint
  (C2SP tlog-checkpoint, Ed25519), publishes it on ``twin.audit.checkpoints`` (durable,
  for auditors and witnesses) and keeps a copy in Redis (``ft:audit:checkpoints``).
* The tree's nodes live in Redis (``ft:audit:nodes``, ``ft:audit:size``; on a Redis
  Cluster ``ft:audit:{tree}:nodes`` and ``ft:audit:{tree}:size``, one hash slot for the
  commit script); a flush and rebuild from Kafka gives the same roots, so old checkpoints
  still verify.
* `fhirtwin audit verify` recomputes the log from Kafka (or from an exported file) and
  checks it against every signed checkpoint, naming the first altered, missing or
  reordered entry.

The signing key comes from ``$FHIRTWIN_AUDIT_SIGNER`` (a ``PRIVATE+KEY+…`` note key), else
from ``$FHIRTWIN_HOME/audit-signer.key``, created on first use for a development setup
together with the verifier key auditors need (``audit-verifier.key``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fhirtwin import bus
from fhirtwin.infra import state_path
from fhirtwin.merkle import (
    LogVerification,
    MerkleLog,
    NodeKey,
    StoreConflictError,
    generate_key,
    leaf_hash,
    parse_signer_key,
    parse_verifier_key,
    sign_checkpoint,
    verify_log,
)
from fhirtwin.redisconn import RedisClient, connect, is_cluster
from fhirtwin.worker import Out, StreamWorker

__all__ = [
    "ORIGIN",
    "AuditSequencer",
    "RedisNodeStore",
    "checkpoints",
    "proof",
    "signer",
    "verifier",
    "verify",
]

ORIGIN = os.environ.get("FHIRTWIN_AUDIT_ORIGIN", "fhirtwin.local/audit")
NODES, SIZE, CHECKPOINTS = "ft:audit:nodes", "ft:audit:size", "ft:audit:checkpoints"
# A Redis Cluster runs a script only on keys of one slot: there the tree's two keys share a
# hash tag. A single server keeps the names above (docs/deploy.md, "Redis Cluster").
CLUSTER_NODES, CLUSTER_SIZE = "ft:audit:{tree}:nodes", "ft:audit:{tree}:size"


def tree_keys(client: Any) -> tuple[str, str]:
    """(nodes hash, size) of the tree for this client: tagged on a cluster."""
    return (CLUSTER_NODES, CLUSTER_SIZE) if is_cluster(client) else (NODES, SIZE)


_COMMIT = r"""
local size = tonumber(redis.call('GET', KEYS[2]) or '0')
if size ~= tonumber(ARGV[1]) then return size end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SET', KEYS[2], ARGV[2])
return -1
"""


class RedisNodeStore:
    """The Merkle tree's complete-subtree hashes in one Redis hash (field ``level:index``).

    ``commit`` is one Lua script: the nodes and the new size appear together, and only if
    the size is still the one the sequencer started from (no forked log).
    """

    def __init__(self, client: RedisClient) -> None:
        self.r: Any = client
        self._commit = client.register_script(_COMMIT)
        self.nodes_key, self.size_key = tree_keys(client)

    def size(self) -> int:
        return int(self.r.get(self.size_key) or 0)

    def get_nodes(self, keys: Sequence[NodeKey]) -> list[bytes]:
        if not keys:
            return []
        vals = self.r.hmget(self.nodes_key, [f"{lvl}:{idx}" for lvl, idx in keys])
        missing = [k for k, v in zip(keys, vals, strict=True) if v is None]
        if missing:
            raise KeyError(f"audit tree nodes missing from Redis: {missing[:3]}")
        return list(vals)

    def commit(self, old_size: int, new_size: int, nodes: Mapping[NodeKey, bytes]) -> None:
        args: list[Any] = [old_size, new_size]
        for (lvl, idx), h in nodes.items():
            args += [f"{lvl}:{idx}", h]
        got = self._commit(keys=[self.nodes_key, self.size_key], args=args)
        if int(got) != -1:
            raise StoreConflictError(f"audit tree size is {got}, expected {old_size}")


def _key_dir() -> Path:
    return state_path().parent


def signer() -> tuple[str, Any]:
    """(key name, Ed25519 private key) for signing checkpoints."""
    text = os.environ.get("FHIRTWIN_AUDIT_SIGNER")
    if not text:
        path = _key_dir() / "audit-signer.key"
        if not path.exists():
            skey, vkey = generate_key(ORIGIN)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(skey + "\n")
            path.chmod(0o600)
            (_key_dir() / "audit-verifier.key").write_text(vkey + "\n")
        text = path.read_text().strip()
    return parse_signer_key(text)


def verifier(text: str | None = None) -> tuple[str, Any]:
    """(key name, public key) from a verifier key text, the env, or the dev key file."""
    text = text or os.environ.get("FHIRTWIN_AUDIT_VERIFIER")
    if not text:
        path = _key_dir() / "audit-verifier.key"
        if not path.exists():
            raise FileNotFoundError(
                f"no audit verifier key: pass --verifier-key, set FHIRTWIN_AUDIT_VERIFIER, "
                f"or run the sequencer once to create {path}"
            )
        text = path.read_text().strip()
    return parse_verifier_key(text)


class AuditSequencer:
    """Consumes ``twin.audit`` in order and appends every record to the Merkle tree."""

    def __init__(self, bootstrap: str, redis_url: str) -> None:
        self.r: Any = connect(redis_url)
        self.log = MerkleLog(RedisNodeStore(self.r))
        self.key_name, self.key = signer()
        self.stream = StreamWorker(
            bootstrap, "fhirtwin-audit-sequencer", [bus.AUDIT], self.handle, batch=1000
        )

    def run(self, stop: threading.Event, idle_exit: float | None = None) -> int:
        return self.stream.run(stop, idle_exit=idle_exit)

    def handle(self, recs: list[bus.Record]) -> list[list[Out]]:
        note = self.append(recs)
        outs: list[list[Out]] = [[] for _ in recs]
        if note is not None:  # published before the offsets are committed
            outs[-1].append(Out(bus.AUDIT_CHECKPOINTS, note.encode()))
        return outs

    def append(self, recs: Iterable[bus.Record]) -> str | None:
        """Append what is new; the signed checkpoint of the new size (None if nothing was)."""
        size = self.log.size
        new: list[bytes] = []
        for rec in sorted(recs, key=lambda r: r.offset):
            if rec.offset < size:  # appended before a crash: it must be the same bytes
                if self.log.leaf_hashes(rec.offset, rec.offset + 1)[0] != leaf_hash(rec.value):
                    raise RuntimeError(
                        f"audit record {rec.ref} differs from leaf {rec.offset} already in the "
                        "tree: the topic or the tree was altered; run `fhirtwin audit verify`"
                    )
                continue
            if rec.offset != size + len(new):
                raise RuntimeError(
                    f"audit record {rec.ref} leaves a gap after leaf {size + len(new) - 1}: "
                    "the audit topic must have one partition and must never be truncated"
                )
            new.append(rec.value)
        if not new:
            return None
        self.log.extend(new)
        return self.checkpoint()

    def checkpoint(self) -> str:
        note = sign_checkpoint(ORIGIN, self.log.size, self.log.root(), self.key_name, self.key)
        self.r.rpush(CHECKPOINTS, note.encode())
        return note


def checkpoints(redis_url: str, bootstrap: str | None = None) -> list[str]:
    """Every signed checkpoint: those published on Kafka, plus Redis's copies."""
    client: Any = connect(redis_url)
    notes = [c.decode() for c in client.lrange(CHECKPOINTS, 0, -1)]
    if bootstrap:
        seen = set(notes)
        for rec in bus.read_topic(bootstrap, bus.AUDIT_CHECKPOINTS, timeout=3):
            note = rec.value.decode()
            if note not in seen:
                seen.add(note)
                notes.append(note)
    return notes


def entries(bootstrap: str) -> list[bytes]:
    """Every audit record, in log order (offset order of the single partition)."""
    recs = sorted(bus.read_topic(bootstrap, bus.AUDIT), key=lambda r: (r.partition, r.offset))
    return [r.value for r in recs]


def verify(
    bootstrap: str,
    redis_url: str,
    *,
    verifier_key: str | None = None,
    log_entries: Iterable[bytes] | None = None,
) -> LogVerification:
    """Check the audit log (Kafka's, or ``log_entries``) against every signed checkpoint."""
    name, public = verifier(verifier_key)
    notes = checkpoints(redis_url, bootstrap)
    store = RedisNodeStore(connect(redis_url))
    size = store.size()
    leaves = MerkleLog(store).leaf_hashes(0, size) if size else []
    data = entries(bootstrap) if log_entries is None else log_entries
    return verify_log(data, notes, name, public, origin=ORIGIN, leaf_hashes=leaves)


def proof(
    redis_url: str, *, index: int | None = None, old_size: int | None = None
) -> dict[str, Any]:
    """An inclusion proof for leaf ``index`` or a consistency proof from ``old_size``,
    against the tree's current size and root (hex hashes, RFC 6962 order)."""
    log = MerkleLog(RedisNodeStore(connect(redis_url)))
    size = log.size
    out: dict[str, Any] = {"origin": ORIGIN, "size": size, "root": log.root().hex()}
    if index is not None:
        out["index"] = index
        out["leaf_hash"] = log.leaf_hashes(index, index + 1)[0].hex()
        out["inclusion"] = [h.hex() for h in log.inclusion_proof(index, size)]
    if old_size is not None:
        out["old_size"] = old_size
        out["old_root"] = log.root(old_size).hex()
        out["consistency"] = [h.hex() for h in log.consistency_proof(old_size, size)]
    return out


def rebuild_tree(bootstrap: str, redis_url: str) -> int:
    """Empty the tree (not the checkpoints) and append the whole topic again."""
    client: Any = connect(redis_url)
    client.delete(*tree_keys(client))
    log = MerkleLog(RedisNodeStore(client))
    log.extend(entries(bootstrap))
    return log.size
