"""Tamper-evident audit log core: an RFC 6962 Merkle log with C2SP signed checkpoints.

Pure code, no I/O: the sequencer, the Redis node store and the Kafka audit topic are wired
elsewhere. Everything an offline auditor needs to check the log is in this module.

**Hashes** (RFC 6962 §2.1). A leaf is hashed as ``SHA-256(0x00 ‖ leaf)`` and an interior node
as ``SHA-256(0x01 ‖ left ‖ right)``; the different prefixes make a leaf hash impossible to pass
off as a node hash (second-preimage attack). The root of ``n`` leaves is MTH: split at the
largest power of two ``k < n``, ``MTH(D[0:n]) = node(MTH(D[0:k]), MTH(D[k:n]))``; the empty
tree's root is ``SHA-256("")``.

**Node store.** :class:`MerkleLog` keeps only *complete* subtrees: node ``(level, index)`` is
the root of leaves ``[index·2^level, (index+1)·2^level)`` and never changes once written. Any
root or proof of any size ``≤ n`` is a fold of O(log n) such nodes, so an append writes the
leaf plus at most log₂ n parents and reads at most log₂ n left siblings; proofs and historic
roots read one batch of nodes. That is what lets the lead back the log with a Redis hash
(one round trip per operation) and rebuild it from Kafka to the same roots.

**Checkpoints** are C2SP ``tlog-checkpoint`` notes (origin, size, base64 root) signed as C2SP
``signed-note`` Ed25519 signatures (key ID ``SHA-256(name ‖ 0x0A ‖ 0x01 ‖ pubkey)[:4]``). Keys
travel in the Go ``note`` text forms: verifier key ``name+hash+base64(0x01 ‖ pubkey)`` and
signer key ``PRIVATE+KEY+name+hash+base64(0x01 ‖ seed)``.

See ``docs/audit-log.md`` for the formats, what each proof proves and the auditor's procedure.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "EMPTY_ROOT",
    "Checkpoint",
    "CheckpointError",
    "DictStore",
    "LogVerification",
    "MerkleLog",
    "NodeStore",
    "StoreConflictError",
    "generate_key",
    "key_id",
    "leaf_hash",
    "node_hash",
    "open_note",
    "parse_signer_key",
    "parse_verifier_key",
    "root",
    "sign_checkpoint",
    "sign_note",
    "verifier_key",
    "verify_checkpoint",
    "verify_consistency",
    "verify_inclusion",
    "verify_log",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

# C2SP signed-note: signature type byte for Ed25519, signature-line prefix (U+2014, space).
ALG_ED25519 = 0x01
SIG_PREFIX = "\u2014 "
# The spec asks verifiers to accept at least 16 signatures and to cap the count.
MAX_SIGNATURES = 100

NodeKey = tuple[int, int]  # (level, index); level 0 = leaf hashes


# ---------------------------------------------------------------------------------------------
# Hashing and the Merkle tree hash
# ---------------------------------------------------------------------------------------------


def leaf_hash(data: bytes) -> bytes:
    """RFC 6962 leaf hash ``SHA-256(0x00 ‖ data)``."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash ``SHA-256(0x01 ‖ left ‖ right)``."""
    return hashlib.sha256(b"\x01" + left + right).digest()


class _Frontier:
    """The compact range of a growing tree: the roots of its maximal complete subtrees.

    Appending is amortised O(1) and the root is a right fold of at most log₂ n hashes, so
    streaming a whole log (``root``, ``verify_log``, ``MerkleLog.extend``) needs O(log n)
    memory, never the full list of leaves.
    """

    __slots__ = ("nodes", "size")

    def __init__(self, size: int = 0, nodes: Sequence[bytes] = ()) -> None:
        # nodes[i] is the root of the i-th subtree of the binary decomposition of size,
        # largest (leftmost) first; len(nodes) == popcount(size).
        self.size = size
        self.nodes = list(nodes)

    def append(self, h: bytes, created: dict[NodeKey, bytes] | None = None) -> None:
        index = self.size
        if created is not None:
            created[(0, index)] = h
        level = 0
        while index & 1:
            h = node_hash(self.nodes.pop(), h)
            index >>= 1
            level += 1
            if created is not None:
                created[(level, index)] = h
        self.nodes.append(h)
        self.size += 1

    def root(self) -> bytes:
        return _fold(self.nodes)


def _fold(hashes: Sequence[bytes]) -> bytes:
    """MTH of a range given its decomposition into complete subtrees, left to right.

    MTH splits off the largest power of two on the left, so the tree over the pieces leans
    right: ``node(a, node(b, c))``.
    """
    if not hashes:
        return EMPTY_ROOT
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


def root(leaf_hashes: Iterable[bytes]) -> bytes:
    """MTH over already-hashed leaves (RFC 6962 §2.1); ``SHA-256("")`` for none."""
    frontier = _Frontier()
    for h in leaf_hashes:
        frontier.append(h)
    return frontier.root()


def _largest_pow2_below(n: int) -> int:
    """The k of MTH's split: the largest power of two strictly less than ``n`` (n ≥ 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _range_keys(start: int, end: int) -> list[NodeKey]:
    """Complete subtrees covering leaves ``[start, end)``, left to right, each maximal.

    For a range that MTH's recursion produces (``start`` aligned to a power of two ≥ the
    range length) folding these nodes gives ``MTH(D[start:end])``.
    """
    keys: list[NodeKey] = []
    while start < end:
        level = (end - start).bit_length() - 1
        if start:
            level = min(level, (start & -start).bit_length() - 1)
        keys.append((level, start >> level))
        start += 1 << level
    return keys


def _inclusion_ranges(index: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """Leaf ranges whose MTHs form PATH(index, D[lo:hi]) (RFC 6962 §2.1.1), leaf side first."""
    out: list[tuple[int, int]] = []
    while hi - lo > 1:
        k = _largest_pow2_below(hi - lo)
        if index < lo + k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo += k
    out.reverse()
    return out


def _consistency_ranges(m: int, n: int) -> list[tuple[int, int]]:
    """Leaf ranges whose MTHs form PROOF(m, D[0:n]) (RFC 6962 §2.1.2), for 0 < m ≤ n."""
    out: list[tuple[int, int]] = []  # collected root side first, reversed at the end
    lo, hi, whole = 0, n, True  # SUBPROOF(m - lo, D[lo:hi], whole)
    while True:
        size = hi - lo
        if m - lo == size:
            if not whole:
                out.append((lo, hi))
            break
        k = _largest_pow2_below(size)
        if m - lo <= k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo += k
            whole = False
    out.reverse()
    return out


# ---------------------------------------------------------------------------------------------
# Node store and the incremental log
# ---------------------------------------------------------------------------------------------


class StoreConflictError(RuntimeError):
    """The store's size moved under us: another sequencer appended. Never retry blindly."""


class NodeStore(Protocol):
    """Key-value storage of complete-subtree hashes; what a Redis backend must implement.

    Nodes are immutable once written. ``commit`` is the only write and must be atomic (a
    Redis MULTI/EXEC or Lua script): new nodes and the new size become visible together,
    and only if the size is still ``old_size``, so a second sequencer cannot fork the log.
    """

    def size(self) -> int:
        """Number of leaves committed."""
        ...

    def get_nodes(self, keys: Sequence[NodeKey]) -> list[bytes]:
        """The hashes at ``keys``, in order (one round trip); ``KeyError`` if one is missing."""
        ...

    def commit(self, old_size: int, new_size: int, nodes: Mapping[NodeKey, bytes]) -> None:
        """Atomically store ``nodes`` and set the size, iff the size is ``old_size``.

        Raises :class:`StoreConflictError` otherwise.
        """
        ...


class DictStore:
    """In-memory :class:`NodeStore` (tests, offline rebuilds, the auditor's own replica)."""

    def __init__(self) -> None:
        self.nodes: dict[NodeKey, bytes] = {}
        self._size = 0

    def size(self) -> int:
        return self._size

    def get_nodes(self, keys: Sequence[NodeKey]) -> list[bytes]:
        return [self.nodes[k] for k in keys]

    def commit(self, old_size: int, new_size: int, nodes: Mapping[NodeKey, bytes]) -> None:
        if self._size != old_size:
            raise StoreConflictError(f"store size is {self._size}, expected {old_size}")
        self.nodes.update(nodes)
        self._size = new_size


class MerkleLog:
    """Append-only RFC 6962 log over a :class:`NodeStore`.

    Holds no state of its own beyond the store, so any number of readers (proof servers)
    can share one store with a single writer (the sequencer).
    """

    def __init__(self, store: NodeStore) -> None:
        self.store = store

    @property
    def size(self) -> int:
        return self.store.size()

    def _frontier(self, size: int) -> _Frontier:
        return _Frontier(size, self.store.get_nodes(_range_keys(0, size)))

    def append(self, leaf_data: bytes) -> int:
        """Append one entry (the raw leaf bytes, hashed here); returns its index.

        Reads ≤ log₂ n nodes and writes ≤ log₂ n + 1, in one commit each way.
        """
        return self.extend([leaf_data]).start

    def extend(self, leaves: Iterable[bytes]) -> range:
        """Append many entries in a single commit (bulk rebuild from Kafka); their indexes."""
        old_size = self.store.size()
        frontier = self._frontier(old_size)
        created: dict[NodeKey, bytes] = {}
        for data in leaves:
            frontier.append(leaf_hash(data), created)
        if frontier.size != old_size:
            self.store.commit(old_size, frontier.size, created)
        return range(old_size, frontier.size)

    def _check_size(self, size: int | None) -> int:
        current = self.store.size()
        if size is None:
            return current
        if not 0 <= size <= current:
            raise ValueError(f"tree size {size} outside 0..{current}")
        return size

    def _range_hashes(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """MTH of each range, with all the nodes they need fetched in one batch."""
        per_range = [_range_keys(s, e) for s, e in ranges]
        keys = list(dict.fromkeys(k for ks in per_range for k in ks))
        got = dict(zip(keys, self.store.get_nodes(keys), strict=True))
        return [_fold([got[k] for k in ks]) for ks in per_range]

    def root(self, size: int | None = None) -> bytes:
        """Root at ``size`` (default: now), for any size ever reached; O(log n) nodes."""
        size = self._check_size(size)
        return _fold(self.store.get_nodes(_range_keys(0, size)))

    def leaf_hashes(self, start: int = 0, end: int | None = None) -> list[bytes]:
        """Stored leaf hashes ``[start, end)``: the reference :func:`verify_log` localizes with."""
        end = self._check_size(end)
        return self.store.get_nodes([(0, i) for i in range(start, end)])

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """Audit path for leaf ``index`` in the tree of ``size`` leaves, leaf side first."""
        size = self._check_size(size)
        if not 0 <= index < size:
            raise ValueError(f"leaf index {index} outside tree of size {size}")
        return self._range_hashes(_inclusion_ranges(index, 0, size))

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """Proof that the tree of ``old_size`` is a prefix of the tree of ``new_size``.

        Empty when ``old_size`` is 0 or equal to ``new_size`` (nothing to prove).
        """
        new_size = self._check_size(new_size)
        if not 0 <= old_size <= new_size:
            raise ValueError(f"old size {old_size} outside 0..{new_size}")
        if old_size in (0, new_size):
            return []
        return self._range_hashes(_consistency_ranges(old_size, new_size))


# ---------------------------------------------------------------------------------------------
# Proof verification (RFC 9162 §2.1.3.2 and §2.1.4.2)
# ---------------------------------------------------------------------------------------------


def _valid_hashes(*hashes: bytes) -> bool:
    return all(isinstance(h, bytes) and len(h) == HASH_SIZE for h in hashes)


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """True iff ``proof`` shows the leaf with ``leaf_hash`` at ``index`` in the tree ``root``.

    Walks from the leaf to the root: at each level the path hash is a left sibling when
    the node is a right child or the last node of its level (which has no right sibling
    and is promoted unchanged until it becomes a right child).
    """
    if not 0 <= index < size or not _valid_hashes(leaf_hash, root, *proof):
        return False
    fn, sn = index, size - 1
    r = leaf_hash
    for p in proof:
        if sn == 0:
            return False  # proof longer than the tree is tall
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """True iff ``proof`` shows the tree ``old_root`` is a prefix of the tree ``new_root``.

    The proof rebuilds both roots from the same hashes, so the old tree is proven unchanged
    inside the new one. Equal sizes need an empty proof and equal roots; every tree extends
    the empty tree.
    """
    if not 0 <= old_size <= new_size or not _valid_hashes(old_root, new_root, *proof):
        return False
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    if old_size == new_size:
        return not proof and old_root == new_root
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        # The old tree is one complete subtree of the new one: its root is the start node.
        path.insert(0, old_root)
    if not path:
        return False
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


# ---------------------------------------------------------------------------------------------
# Keys, signed notes and checkpoints (C2SP signed-note, tlog-checkpoint)
# ---------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint or key that is malformed, unsigned by the expected key, or altered."""


class Checkpoint(NamedTuple):
    origin: str
    size: int
    root: bytes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    """Strict standard base64: no whitespace, no junk, canonical padding."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise CheckpointError(f"{what}: invalid base64") from exc
    if _b64(data) != text:
        raise CheckpointError(f"{what}: non-canonical base64")
    return data


def _check_key_name(name: str) -> None:
    # Names appear in "name+hash+key" strings and space-separated signature lines.
    if not name or "+" in name or any(c.isspace() or ord(c) < 0x20 for c in name):
        raise CheckpointError(f"invalid key name {name!r}: empty, space or '+'")


def _public_bytes(key: Ed25519PublicKey | bytes) -> bytes:
    if isinstance(key, Ed25519PublicKey):
        return key.public_bytes_raw()
    if len(key) != 32:
        raise CheckpointError("Ed25519 public key must be 32 bytes")
    return bytes(key)


def key_id(name: str, public_key: Ed25519PublicKey | bytes) -> bytes:
    """Signed-note key ID: ``SHA-256(name ‖ 0x0A ‖ 0x01 ‖ pubkey)[:4]``."""
    data = name.encode() + b"\n" + bytes([ALG_ED25519]) + _public_bytes(public_key)
    return hashlib.sha256(data).digest()[:4]


def verifier_key(name: str, public_key: Ed25519PublicKey | bytes) -> str:
    """Verifier key text ``name+<8 hex key ID>+base64(0x01 ‖ pubkey)`` (what auditors get)."""
    _check_key_name(name)
    pub = _public_bytes(public_key)
    return f"{name}+{key_id(name, pub).hex()}+{_b64(bytes([ALG_ED25519]) + pub)}"


def generate_key(name: str) -> tuple[str, str]:
    """A fresh Ed25519 key as ``(signer key, verifier key)`` texts; keep the first secret."""
    _check_key_name(name)
    private = Ed25519PrivateKey.generate()
    seed = private.private_bytes_raw()
    kid = key_id(name, private.public_key()).hex()
    skey = f"PRIVATE+KEY+{name}+{kid}+{_b64(bytes([ALG_ED25519]) + seed)}"
    return skey, verifier_key(name, private.public_key())


def _split_key(text: str, what: str) -> tuple[str, bytes, bytes]:
    parts = text.strip().split("+", 2)  # base64 may itself contain "+"
    if len(parts) != 3:
        raise CheckpointError(f"{what}: expected name+hash+key")
    name, kid_hex, data_b64 = parts
    _check_key_name(name)
    data = _unb64(data_b64, what)
    if len(data) != 33 or data[0] != ALG_ED25519:
        raise CheckpointError(f"{what}: not an Ed25519 key")
    if len(kid_hex) != 8:
        raise CheckpointError(f"{what}: key hash must be 8 hex digits")
    try:
        kid = bytes.fromhex(kid_hex)
    except ValueError as exc:
        raise CheckpointError(f"{what}: key hash must be 8 hex digits") from exc
    return name, kid, data[1:]


def parse_verifier_key(vkey: str) -> tuple[str, Ed25519PublicKey]:
    """``(name, public key)`` from a verifier key text, checking its key hash."""
    name, kid, pub = _split_key(vkey, "verifier key")
    if key_id(name, pub) != kid:
        raise CheckpointError("verifier key: key hash does not match name and key")
    return name, Ed25519PublicKey.from_public_bytes(pub)


def parse_signer_key(skey: str) -> tuple[str, Ed25519PrivateKey]:
    """``(name, private key)`` from a ``PRIVATE+KEY+…`` signer key text."""
    prefix = "PRIVATE+KEY+"
    if not skey.strip().startswith(prefix):
        raise CheckpointError("signer key: missing PRIVATE+KEY+ prefix")
    name, kid, seed = _split_key(skey.strip()[len(prefix) :], "signer key")
    private = Ed25519PrivateKey.from_private_bytes(seed)
    if key_id(name, private.public_key()) != kid:
        raise CheckpointError("signer key: key hash does not match name and key")
    return name, private


def _checkpoint_text(origin: str, size: int, root: bytes) -> str:
    if not origin or any(ord(c) < 0x20 for c in origin):
        raise CheckpointError(f"invalid origin {origin!r}")
    if size < 0:
        raise CheckpointError(f"invalid tree size {size}")
    if len(root) != HASH_SIZE:
        raise CheckpointError("root hash must be 32 bytes")
    return f"{origin}\n{size}\n{_b64(root)}\n"


def sign_note(text: str, key_name: str, private_key: Ed25519PrivateKey) -> str:
    """A C2SP signed note: ``text`` (newline-terminated), a blank line, one Ed25519 signature."""
    _check_key_name(key_name)
    if not text.endswith("\n") or any(ord(c) < 0x20 and c != "\n" for c in text):
        raise CheckpointError("note text must end with a newline and hold no control characters")
    sig = private_key.sign(text.encode())
    kid = key_id(key_name, private_key.public_key())
    return f"{text}\n{SIG_PREFIX}{key_name} {_b64(kid + sig)}\n"


def sign_checkpoint(
    origin: str, size: int, root: bytes, key_name: str, private_key: Ed25519PrivateKey
) -> str:
    """The signed checkpoint note for ``(origin, size, root)``.

    C2SP asks that the key name equal the origin; this is not enforced so a key rotation
    or a witness can sign under another name.
    """
    return sign_note(_checkpoint_text(origin, size, root), key_name, private_key)


def _parse_checkpoint_text(text: str) -> Checkpoint:
    lines = text.split("\n")
    # text ends with "\n", so the split leaves one trailing empty string.
    if len(lines) < 4 or lines[-1] != "" or any(not line for line in lines[:-1]):
        raise CheckpointError("checkpoint text needs origin, size and root on non-empty lines")
    origin, size_text, root_text = lines[0], lines[1], lines[2]
    # Extension lines (lines[3:-1]) are allowed by C2SP and ignored: they are signed but not
    # auditable, and fhirtwin never writes them.
    if not size_text.isascii() or not size_text.isdigit():
        raise CheckpointError(f"checkpoint size {size_text!r} is not a decimal number")
    if len(size_text) > 1 and size_text[0] == "0":
        raise CheckpointError(f"checkpoint size {size_text!r} has leading zeroes")
    root_hash = _unb64(root_text, "checkpoint root")
    if len(root_hash) != HASH_SIZE:
        raise CheckpointError("checkpoint root is not a 32-byte hash")
    return Checkpoint(origin, int(size_text), root_hash)


def open_note(note: str, key_name: str, public_key: Ed25519PublicKey | bytes) -> str:
    """The text of a signed note once a signature by ``key_name``/``public_key`` verifies.

    Follows the signed-note rules: signatures from other keys (other name or key ID) are
    ignored, so witness cosignatures may ride along; a signature from our key that does not
    verify rejects the note; a note without one is rejected.
    """
    _check_key_name(key_name)
    pub = _public_bytes(public_key)
    if any(ord(c) < 0x20 and c != "\n" for c in note):
        raise CheckpointError("note contains control characters")
    if not note.endswith("\n"):
        raise CheckpointError("note must end with a newline")
    cut = note.rfind("\n\n")
    if cut < 0:
        raise CheckpointError("note has no blank line before its signatures")
    text, sig_block = note[: cut + 1], note[cut + 2 :]
    sig_lines = sig_block.split("\n")[:-1]
    if not sig_lines:
        raise CheckpointError("note has no signature lines")
    if len(sig_lines) > MAX_SIGNATURES:
        raise CheckpointError(f"note has more than {MAX_SIGNATURES} signatures")
    want_id = key_id(key_name, pub)
    verified = False
    for line in sig_lines:
        if not line.startswith(SIG_PREFIX):
            raise CheckpointError(f"malformed signature line {line!r}")
        name, sep, sig_b64 = line[len(SIG_PREFIX) :].partition(" ")
        if not sep or not name or " " in sig_b64:
            raise CheckpointError(f"malformed signature line {line!r}")
        sig = _unb64(sig_b64, "signature")
        if len(sig) < 5:
            raise CheckpointError("signature too short")
        if name != key_name or sig[:4] != want_id:
            continue  # someone else's key (witness, rotated key): ignored per spec
        try:
            Ed25519PublicKey.from_public_bytes(pub).verify(sig[4:], text.encode())
        except InvalidSignature as exc:
            raise CheckpointError(f"signature by {key_name} does not verify") from exc
        verified = True
    if not verified:
        raise CheckpointError(f"note is not signed by {key_name} with the expected key")
    return text


def verify_checkpoint(
    note: str,
    key_name: str,
    public_key: Ed25519PublicKey | bytes,
    *,
    origin: str | None = None,
) -> Checkpoint:
    """Check a signed checkpoint note and return ``(origin, size, root)``.

    The signature is checked first (:func:`open_note`), the text parsed only after: an
    unsigned text is never interpreted. ``origin``, when given, must match the first line.
    Raises :class:`CheckpointError` saying what is wrong.
    """
    checkpoint = _parse_checkpoint_text(open_note(note, key_name, public_key))
    if origin is not None and checkpoint.origin != origin:
        raise CheckpointError(f"checkpoint origin {checkpoint.origin!r}, expected {origin!r}")
    return checkpoint


# ---------------------------------------------------------------------------------------------
# Whole-log verification (what `fhirtwin audit verify` calls)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogVerification:
    """Outcome of :func:`verify_log`.

    ``first_bad_index`` is the first entry that differs from what was signed, when it can
    be pinned down; otherwise ``bad_range`` ``[lo, hi)`` bounds it (between two
    checkpoints). ``unsigned`` counts entries after the newest checkpoint: not covered by
    any signature yet, so neither trusted nor blamed.
    """

    ok: bool
    reason: str
    checkpoint: Checkpoint | None = None
    entries: int = 0
    first_bad_index: int | None = None
    bad_range: tuple[int, int] | None = None
    unsigned: int = 0


def verify_log(
    entries: Iterable[bytes],
    checkpoints: str | Sequence[str],
    key_name: str,
    public_key: Ed25519PublicKey | bytes,
    *,
    origin: str | None = None,
    leaf_hashes: Sequence[bytes] | None = None,
) -> LogVerification:
    """Recompute the log from its entries and check it against signed checkpoints.

    Fails on any flipped byte, deleted, inserted or reordered entry before the newest
    checkpoint's size. To name the first bad entry it needs a trustworthy reference:

    * ``leaf_hashes`` — leaf hashes kept by the log (the Redis tree, ``MerkleLog.leaf_hashes``)
      or by an auditor's mirror. They are used only after their root is shown equal to the
      signed root, so a store altered together with the entries cannot mislead; each entry
      is then compared to its hash and the first difference is exact.
    * otherwise the checkpoints themselves: the first checkpoint whose root the entries do
      not reproduce bounds the damage to ``[previous checkpoint size, its size)``; exact
      when checkpoints are one entry apart.

    Entries are streamed with O(log n) memory (plus ``leaf_hashes`` if given).
    """
    notes = [checkpoints] if isinstance(checkpoints, str) else list(checkpoints)
    if not notes:
        return LogVerification(False, "no checkpoint given")
    verified: list[Checkpoint] = []
    for i, note in enumerate(notes):
        try:
            verified.append(verify_checkpoint(note, key_name, public_key, origin=origin))
        except CheckpointError as exc:
            return LogVerification(False, f"checkpoint {i}: {exc}")
    if len({cp.origin for cp in verified}) > 1:
        return LogVerification(False, "checkpoints name different origins")
    by_size: dict[int, Checkpoint] = {}
    for cp in verified:
        if by_size.setdefault(cp.size, cp).root != cp.root:
            return LogVerification(False, f"two signed checkpoints of size {cp.size} disagree")
    sizes = sorted(by_size)
    newest = by_size[sizes[-1]]
    signed = newest.size

    reference: Sequence[bytes] | None = None
    note_ref = ""
    if leaf_hashes is not None:
        if len(leaf_hashes) >= signed and root(leaf_hashes[:signed]) == newest.root:
            reference = leaf_hashes
        else:
            note_ref = "; reference leaf hashes do not match the checkpoint (ignored)"

    frontier = _Frontier()
    pending = [s for s in sizes if s > 0]  # checkpoint sizes still to compare, ascending
    if sizes[0] == 0 and by_size[0].root != EMPTY_ROOT:
        return LogVerification(False, "checkpoint of size 0 has a non-empty root", newest)
    last_good = 0
    count = 0
    for count, data in enumerate(entries, start=1):
        i = count - 1
        if i >= signed:
            continue  # unsigned tail: counted, not judged
        h = leaf_hash(data)
        if reference is not None and h != reference[i]:
            return LogVerification(
                False,
                f"entry {i} differs from the signed log{note_ref}",
                newest,
                count,
                first_bad_index=i,
                bad_range=(i, i + 1),
            )
        frontier.append(h)
        if pending and frontier.size == pending[0]:
            cp = by_size[pending.pop(0)]
            if frontier.root() != cp.root:
                lo, hi = last_good, cp.size
                why = (
                    f"checkpoint of size {hi} is inconsistent with the newest one (forked log)"
                    if reference is not None
                    else f"entries 0..{hi - 1} do not reproduce the root signed at size {hi}"
                )
                return LogVerification(
                    False,
                    f"{why}{note_ref}",
                    newest,
                    count,
                    first_bad_index=lo if hi - lo == 1 else None,
                    bad_range=(lo, hi),
                )
            last_good = cp.size
    if count < signed:
        missing_from = count
        if reference is None:
            # Unknown which entries went missing; the damage lies after the last good prefix.
            lo = last_good
            return LogVerification(
                False,
                f"log has {count} entries but a checkpoint signs {signed}{note_ref}",
                newest,
                count,
                first_bad_index=lo if signed - lo == 1 else None,
                bad_range=(lo, signed),
            )
        return LogVerification(
            False,
            f"log has {count} entries but a checkpoint signs {signed}: entry {missing_from} "
            "is missing",
            newest,
            count,
            first_bad_index=missing_from,
            bad_range=(missing_from, missing_from + 1),
        )
    return LogVerification(
        True,
        f"{signed} entries match the checkpoint{note_ref}",
        newest,
        count,
        unsigned=count - signed,
    )
