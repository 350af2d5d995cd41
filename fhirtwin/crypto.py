"""Encryption at rest: per-twin data keys, key wrapping, blind indexes, crypto-shredding.

Every twin has its own 256-bit data key (DEK). Resource bodies, their history, identity
decisions and the twin's events on ``fhir.resources`` are sealed with it (AES-256-GCM, a
random 96-bit nonce per value, associated data that binds the value to its twin, resource
and version, so a ciphertext copied to another field or twin does not open). Identifiers
used for lookups (``ft:id:…``) are keyed hashes (HMAC-SHA-256, "blind indexes"), never the
identifier itself.

Data keys are wrapped by the key-encryption key (KEK) and kept in a **key store that is not
the data store**: erasing a patient destroys their data key there, so every copy of their
ciphertext — in an old Redis RDB file, a replica, a Kafka segment of ``fhir.resources`` —
stays unreadable even when that copy is restored. (A key kept beside the data would come
back with the backup.) Raw topics (``ehr.*``) and dead letters hold PHI before the twin is
known; they are sealed with *epoch keys* (one per UTC day) that the key store destroys
after the raw retention (docs/security.md).

Configuration (environment; every fhirtwin process of one installation needs the same):

``FHIRTWIN_KEK``            the KEK, base64 of 32 bytes (production: from a Secret / KMS)
``FHIRTWIN_KEK_FILE``       … or a file holding it (base64)
``FHIRTWIN_KEK_PREVIOUS``   earlier KEKs (base64, comma-separated) still accepted for
                            unwrapping while ``fhirtwin keys rotate`` re-wraps
``FHIRTWIN_KEYSTORE``       ``file:///dir`` (default ``$FHIRTWIN_HOME/keys``) or
                            ``redis://…`` (a Redis that is *not* the twin store, with its
                            own, short-lived backups) or ``package.module:Factory`` (a KMS
                            plug point: a callable taking the URL-less config, returning a
                            :class:`KeyStore`)
``FHIRTWIN_RAW_KEY_DAYS``   days an epoch key lives (default 7: the raw topics' retention)
``FHIRTWIN_REQUIRE_KEYS``   ``1``: refuse to start without an explicit KEK and key store (a
                            cluster: never let a pod make keys of its own)

With none of the KEK variables set, the KEK is ``$FHIRTWIN_HOME/kek`` (``~/.fhirtwin``),
created on first use with mode 0600 — the embedded default.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import hmac
import importlib
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "CryptoError",
    "ErasedError",
    "FileKeyStore",
    "KeyRing",
    "KeyStore",
    "RedisKeyStore",
    "default_keyring",
    "reset_default_keyring",
]

SEALED = 0x01  # version byte of a sealed value: 0x01 | nonce (12) | ciphertext + tag (16)
# A sealed raw record starts with this (no HL7 v2, JSON, XML or CSV record can).
RAW_MAGIC = b"\x01FTR"
RAW_AAD = b"fhirtwin raw record"
_WRAPPED = b"W1"  # wrapped key: "W1" | KEK fingerprint (4) | nonce (12) | ciphertext + tag
_WRAPPED_LEN = len(_WRAPPED) + 4 + 12 + 32 + 16  # of a 32-byte data key (GCM tag 16)
_INDEX_KEY = "index"  # the blind-index key's name in the key store


class CryptoError(Exception):
    """A value could not be opened: wrong key, tampered, or not sealed by fhirtwin."""


class ErasedError(CryptoError):
    """The twin was erased: its data key is destroyed, nothing of it can be read or written."""


class KeyStore(Protocol):
    """Where wrapped keys live. Names are ``twin:<id>``, ``epoch:<YYYYMMDD>`` and ``index``."""

    def get(self, name: str) -> bytes | None: ...

    def put_new(self, name: str, blob: bytes) -> bytes:
        """Store ``blob`` unless ``name`` exists; return what is stored (first writer wins)."""
        ...

    def replace(self, name: str, blob: bytes) -> None: ...

    def destroy(self, name: str) -> bool:
        """Delete the key and leave a tombstone (``erased`` is then true); False if absent."""
        ...

    def erased(self, name: str) -> bool: ...

    def names(self, prefix: str) -> Iterator[str]: ...


class FileKeyStore:
    """One file per key under a directory (the embedded default; every process of one
    machine shares it). Creation is atomic (``link`` of a temporary file), so two workers
    that meet a new twin at once agree on one key.

    A new key is made durable (its file and its directory entry fsynced) before anything
    sealed with it can be: normally at once. Inside ``deferring()`` (the normalize worker
    wraps each batch in it) the thread's new keys are linked at once, so other processes
    agree on them, but made durable together when the block ends, with one ``syncfs`` of
    the key store's file system; the worker writes nothing sealed with them before that.
    Per new key that is ~50 µs instead of ~500 µs here (two fsyncs), and far more on a
    slow disk; a first import makes one key per patient. Until it is synced a key file
    has mode 0400 instead of 0600; a process that reads such a file (another worker met
    the same new patient) syncs it before using it, since a crash must never keep data
    whose key it lost. An unsynced file that does not hold a whole wrapped key was cut
    short by a crash before its sync, so nothing sealed with it was written: it is
    removed and the key made again."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._local = threading.local()  # .pending: the paths to sync while deferring

    def _path(self, name: str) -> Path:
        kind, _, rest = name.partition(":")
        if (kind in ("twin", "epoch") and not rest) or "/" in rest or rest.startswith("."):
            raise CryptoError(f"key name {name!r}: not a twin id or an epoch")
        if kind == "twin":
            return self.root / "twin" / rest[:2] / rest
        return self.root / kind / rest if rest else self.root / kind

    def _tomb(self, name: str) -> Path:
        return self.root / "erased" / name.replace(":", "_")

    @contextmanager
    def deferring(self) -> Iterator[None]:
        """New keys of this thread become durable when the (outermost) block ends."""
        local = self._local
        if getattr(local, "pending", None) is not None:
            yield  # nested: the outer block syncs
            return
        local.pending = set()
        try:
            yield
        finally:
            pending, local.pending = local.pending, None
            _make_durable(self.root, pending)

    def _unsynced(self, path: Path) -> None:
        """``path`` may not be on disk yet: sync it now, or at the end of the block."""
        pending = getattr(self._local, "pending", None)
        if pending is not None:
            pending.add(path)
        else:
            _make_durable(self.root, {path})

    def get(self, name: str) -> bytes | None:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                blob = f.read()
                synced = os.fstat(f.fileno()).st_mode & _SYNCED
        except FileNotFoundError:
            return None
        if not synced:
            if not _whole_key(blob):
                # Linked in a deferred block and cut short by a crash before its sync: nothing
                # sealed with it was written (that waits for the sync), so it is not a key.
                path.unlink(missing_ok=True)
                return None
            self._unsynced(path)
        return blob

    def put_new(self, name: str, blob: bytes) -> bytes:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pending = getattr(self._local, "pending", None)
        if _create_once(path, blob, sync=pending is None):
            if pending is not None:
                pending.add(path)
            return blob
        got = self.get(name)  # another process made it first: its key stands
        if got is None:
            raise CryptoError(f"key {name}: made by another process and removed at once")
        return got

    def replace(self, name: str, blob: bytes) -> None:
        path = self._path(name)
        os.replace(_synced_temp(path, blob), path)
        _fsync(path.parent)

    def destroy(self, name: str) -> bool:
        tomb = self._tomb(name)
        tomb.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tomb.touch(mode=0o600)
        _fsync(tomb.parent)  # the tombstone outlives a crash before the key goes
        path = self._path(name)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        os.chmod(path, 0o600)  # a key never synced is read-only (0400)
        with open(path, "r+b") as f:  # overwrite before unlinking (best effort on SSDs)
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
        path.unlink(missing_ok=True)
        _fsync(path.parent)
        return True

    def erased(self, name: str) -> bool:
        return self._tomb(name).exists()

    def names(self, prefix: str) -> Iterator[str]:
        kind = prefix.partition(":")[0]
        base = self.root / kind
        if base.is_file():  # a single key such as "index"
            yield kind
            return
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                name = f"{kind}:{path.name}"
                if name.startswith(prefix):
                    yield name


# A key file's owner-write bit says it is on disk: files made in a deferred block are
# linked with mode 0400 and get 0600 once synced (that chmod need not be durable: a
# file that lost it is only synced again by its next reader).
_SYNCED = 0o200
_libc: Any = None


def _whole_key(blob: bytes) -> bool:
    """A wrapped key as ``KeyRing`` makes them: "W1", KEK fingerprint, nonce, 32 + 16 bytes."""
    return len(blob) == _WRAPPED_LEN and blob[:2] == _WRAPPED


def _syncfs(fd: int) -> bool:
    """syncfs(2) (Linux): write back the whole file system ``fd`` is on. False elsewhere."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.syncfs.argtypes = [ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    if _libc is False:
        return False
    return bool(_libc.syncfs(fd) == 0)


def _make_durable(root: Path, paths: set[Path]) -> None:
    """The files at ``paths`` and their directory entries on disk: one ``syncfs`` of the
    file system (Linux), else an fsync of each file and of each directory once."""
    if not paths:
        return
    fd = os.open(root, os.O_RDONLY)
    try:
        done = _syncfs(fd)
    finally:
        os.close(fd)
    if not done:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):  # destroyed meanwhile
                _fsync(path)
        for parent in {p.parent for p in paths}:
            _fsync(parent)
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path, 0o600)


def _synced_temp(path: Path, blob: bytes, *, sync: bool = True) -> Path:
    """``blob`` written and fsynced to a new temporary file (mode 0600) beside ``path``;
    without ``sync``, written only (mode 0400: not on disk yet, see ``_SYNCED``)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if sync else 0o400)
    try:
        os.write(fd, blob)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def _create_once(path: Path, blob: bytes, *, sync: bool = True) -> bool:
    """``blob`` at ``path`` unless the name exists already (another process was first: its
    file stands); True if it is ours. Written to a temporary file and hard-linked into
    place, which is atomic and fails if the name exists: no reader ever sees a half-written
    file. ``sync``: the bytes and the new name are on disk before this returns; without
    it the caller makes them durable (``_make_durable``) before relying on them."""
    tmp = _synced_temp(path, blob, sync=sync)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    else:
        if sync:
            _fsync(path.parent)  # the new name must survive a crash as well as the bytes
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Make a file's bytes, or a directory's entries (a new, renamed or removed file),
    durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RedisKeyStore:
    """Keys in a Redis of their own (``FHIRTWIN_KEYSTORE=redis://…``): shared by every pod.
    It must not be the twin store's Redis, and its backups must expire within the erasure
    deadline: a restored key store would bring erased keys back."""

    def __init__(self, url: str) -> None:
        from fhirtwin.redisconn import connect

        # only the URL says whether it is a cluster (FHIRTWIN_REDIS_CLUSTER is the data's)
        self.r: Any = connect(url, use_env=False)

    def get(self, name: str) -> bytes | None:
        got = self.r.get(f"ftk:{name}")
        return bytes(got) if got is not None else None

    def put_new(self, name: str, blob: bytes) -> bytes:
        self.r.set(f"ftk:{name}", blob, nx=True)
        return bytes(self.r.get(f"ftk:{name}"))

    def replace(self, name: str, blob: bytes) -> None:
        self.r.set(f"ftk:{name}", blob)

    def destroy(self, name: str) -> bool:
        from fhirtwin.redisconn import is_cluster

        if is_cluster(self.r):  # two slots, no MULTI: the tombstone first, then the key
            self.r.set(f"ftk:erased:{name}", 1)
            return bool(self.r.delete(f"ftk:{name}"))
        pipe = self.r.pipeline()
        pipe.set(f"ftk:erased:{name}", 1)
        pipe.delete(f"ftk:{name}")
        return bool(pipe.execute()[1])

    def erased(self, name: str) -> bool:
        return bool(self.r.exists(f"ftk:erased:{name}"))

    def names(self, prefix: str) -> Iterator[str]:
        for key in self.r.scan_iter(match=f"ftk:{prefix}*", count=1000):
            yield key.decode()[4:]


def _b64key(text: str, where: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=False)
    except ValueError as exc:
        raise CryptoError(f"{where}: not base64 ({exc})") from None
    if len(raw) != 32:
        raise CryptoError(
            f"{where}: a key-encryption key is 32 bytes (base64, 44 characters); got "
            f"{len(raw)} bytes. Make one with: fhirtwin keys new-kek"
        )
    return raw


def home() -> Path:
    return Path(os.environ.get("FHIRTWIN_HOME") or Path.home() / ".fhirtwin")


def _required() -> None:
    """With FHIRTWIN_REQUIRE_KEYS=1 (the Helm chart sets it) a process refuses to make its
    own KEK or key store: one pod with keys of its own would write data no other can read."""
    if os.environ.get("FHIRTWIN_REQUIRE_KEYS") != "1":
        return
    missing = []
    if not (os.environ.get("FHIRTWIN_KEK") or os.environ.get("FHIRTWIN_KEK_FILE")):
        missing.append("FHIRTWIN_KEK or FHIRTWIN_KEK_FILE")
    if not os.environ.get("FHIRTWIN_KEYSTORE"):
        missing.append("FHIRTWIN_KEYSTORE")
    if missing:
        raise CryptoError(
            f"FHIRTWIN_REQUIRE_KEYS=1 but {' and '.join(missing)} not set: every process of "
            "an installation needs the same key-encryption key and key store (docs/security.md; "
            "the Helm chart's secrets.kek and secrets.keystore)"
        )


def load_kek() -> tuple[bytes, list[bytes]]:
    """(current KEK, previous KEKs) from the environment, or the embedded default's file."""
    _required()
    previous = [
        _b64key(k, "FHIRTWIN_KEK_PREVIOUS")
        for k in os.environ.get("FHIRTWIN_KEK_PREVIOUS", "").split(",")
        if k.strip()
    ]
    if env := os.environ.get("FHIRTWIN_KEK"):
        return _b64key(env, "FHIRTWIN_KEK"), previous
    path = Path(os.environ.get("FHIRTWIN_KEK_FILE") or home() / "kek")
    if not path.exists():
        if os.environ.get("FHIRTWIN_KEK_FILE"):
            raise CryptoError(f"FHIRTWIN_KEK_FILE={path}: no such file")
        _create_kek_file(path)
    return _b64key(path.read_text(), str(path)), previous


def _create_kek_file(path: Path) -> None:
    """A new KEK at ``path``, unless another process made one first (``fhirtwin up`` starts
    every worker at once on a fresh home): ``_create_once``, so no process ever reads a
    half-written key, and all of them end up with the same one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _create_once(path, base64.b64encode(secrets.token_bytes(32)) + b"\n")


def open_keystore(spec: str | None = None) -> KeyStore:
    spec = spec or os.environ.get("FHIRTWIN_KEYSTORE") or ""
    if not spec:
        return FileKeyStore(home() / "keys")
    if spec.startswith("file://"):
        return FileKeyStore(Path(spec[len("file://") :]))
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisKeyStore(spec)
    if ":" in spec and "/" not in spec:
        module, _, attr = spec.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        store: KeyStore = factory()
        return store
    raise CryptoError(
        f"FHIRTWIN_KEYSTORE={spec!r}: expected file:///dir, redis://host:port/db, or "
        "package.module:Factory"
    )


def _fingerprint(kek: bytes) -> bytes:
    return hashlib.sha256(b"fhirtwin kek\0" + kek).digest()[:4]


class KeyRing:
    """The keys of one process: KEK(s), the key store, and a cache of unwrapped keys."""

    def __init__(
        self,
        kek: bytes,
        store: KeyStore,
        *,
        previous: list[bytes] | None = None,
        epoch_days: int | None = None,
        cache: int = 4096,
    ) -> None:
        self._keks = {_fingerprint(k): AESGCM(k) for k in [kek, *(previous or [])]}
        self._current = _fingerprint(kek)
        self.store = store
        self.epoch_days = epoch_days or int(os.environ.get("FHIRTWIN_RAW_KEY_DAYS") or 7)
        self._cache: OrderedDict[str, AESGCM] = OrderedDict()
        self._cache_max = cache
        self._lock = threading.Lock()
        self._index = hmac.new(self._unwrap_or_create(_INDEX_KEY), digestmod=hashlib.sha256)

    # -- wrapping ----------------------------------------------------------------------

    def _wrap(self, name: str, key: bytes) -> bytes:
        nonce = secrets.token_bytes(12)
        ct = self._keks[self._current].encrypt(nonce, key, name.encode())
        return _WRAPPED + self._current + nonce + ct

    def _unwrap(self, name: str, blob: bytes) -> bytes:
        if blob[:2] != _WRAPPED:
            raise CryptoError(f"key {name}: not a key wrapped by fhirtwin")
        kek = self._keks.get(blob[2:6])
        if kek is None:
            raise CryptoError(
                f"key {name} is wrapped by a key-encryption key this process does not have "
                "(rotated? set FHIRTWIN_KEK_PREVIOUS to the old one while re-wrapping)"
            )
        try:
            return kek.decrypt(blob[6:18], blob[18:], name.encode())
        except InvalidTag:
            raise CryptoError(f"key {name}: unwrapping failed (wrong KEK or tampered)") from None

    def _unwrap_or_create(self, name: str, *, create: bool = True) -> bytes:
        blob = self.store.get(name)
        if blob is None:
            if self.store.erased(name):
                raise ErasedError(f"{name} was erased")
            if not create:  # not erased, yet no key: this process reads another key store
                raise CryptoError(
                    f"{name}: no such key in the key store. Every fhirtwin process of one "
                    "installation must use the same FHIRTWIN_KEYSTORE and KEK (docs/security.md)"
                )
            blob = self.store.put_new(name, self._wrap(name, secrets.token_bytes(32)))
        return self._unwrap(name, blob)

    def _aead(self, name: str, *, create: bool) -> AESGCM:
        with self._lock:
            got = self._cache.get(name)
            if got is not None:
                self._cache.move_to_end(name)
                return got
        aead = AESGCM(self._unwrap_or_create(name, create=create))
        with self._lock:
            self._cache[name] = aead
            if len(self._cache) > self._cache_max:
                self._cache.popitem(last=False)
        return aead

    def deferred(self) -> AbstractContextManager[None]:
        """A block whose new keys become durable together at its end (the key store's
        ``deferring``, where it has one): seal nothing that is written anywhere durable
        before the block ends. The normalize worker wraps each batch in it."""
        deferring = getattr(self.store, "deferring", None)
        return deferring() if deferring is not None else contextlib.nullcontext()

    def forget(self, name: str) -> None:
        with self._lock:
            self._cache.pop(name, None)

    # -- twins -------------------------------------------------------------------------

    def seal(self, twin: str, data: bytes, aad: bytes) -> bytes:
        """Seal ``data`` with the twin's key (created on first use; ErasedError if erased)."""
        nonce = secrets.token_bytes(12)
        aead = self._aead(f"twin:{twin}", create=True)
        return bytes((SEALED,)) + nonce + aead.encrypt(nonce, data, aad)

    def open(self, twin: str, blob: bytes, aad: bytes) -> bytes:
        if not blob or blob[0] != SEALED:
            raise CryptoError(f"twin {twin}: value is not sealed by fhirtwin")
        aead = self._aead(f"twin:{twin}", create=False)
        try:
            return aead.decrypt(blob[1:13], blob[13:], aad)
        except InvalidTag:
            raise CryptoError(
                f"twin {twin}: value does not open (tampered, or moved from another place)"
            ) from None

    def erase(self, twin: str) -> bool:
        """Destroy the twin's data key (crypto-shredding); the tombstone stays."""
        self.forget(f"twin:{twin}")
        return self.store.destroy(f"twin:{twin}")

    def erased(self, twin: str) -> bool:
        return self.store.erased(f"twin:{twin}")

    # -- blind indexes -----------------------------------------------------------------

    def blind(self, value: str) -> str:
        """A keyed hash of a lookup value (an identifier, a demographic key): 128 bits, hex."""
        h = self._index.copy()
        h.update(value.encode())
        return h.hexdigest()[:32]

    # -- raw records (epoch keys) --------------------------------------------------------

    @staticmethod
    def epoch_of(when: datetime) -> str:
        return when.astimezone(UTC).strftime("%Y%m%d")

    def seal_raw(self, data: bytes, aad: bytes = RAW_AAD, *, now: datetime | None = None) -> bytes:
        """Seal a raw record with today's epoch key: ``\\x01FTR`` | epoch (8) | nonce | ct."""
        epoch = self.epoch_of(now or datetime.now(UTC))
        nonce = secrets.token_bytes(12)
        aead = self._aead(f"epoch:{epoch}", create=True)
        return RAW_MAGIC + epoch.encode() + nonce + aead.encrypt(nonce, data, aad)

    def open_raw(self, blob: bytes, aad: bytes = RAW_AAD) -> bytes:
        """The raw record; a value without the magic prefix is returned as it is (a site's
        own producer may write clear records to the raw topics)."""
        if not is_sealed_raw(blob):
            return blob
        if len(blob) < 40:
            raise CryptoError("raw record is truncated")
        epoch = blob[4:12].decode("ascii", "replace")
        try:
            aead = self._aead(f"epoch:{epoch}", create=False)
        except ErasedError:
            raise ErasedError(
                f"raw record of {epoch}: its epoch key has expired (older than "
                f"{self.epoch_days} days) and was destroyed"
            ) from None
        try:
            return aead.decrypt(blob[12:24], blob[24:], aad)
        except InvalidTag:
            raise CryptoError("raw record does not open (tampered, or moved)") from None

    def expire_epochs(self, *, now: datetime | None = None) -> list[str]:
        """Destroy epoch keys older than ``epoch_days``; the names destroyed."""
        cutoff = self.epoch_of((now or datetime.now(UTC)) - timedelta(days=self.epoch_days))
        gone = []
        for name in list(self.store.names("epoch:")):
            if name[len("epoch:") :] < cutoff:
                self.forget(name)
                if self.store.destroy(name):
                    gone.append(name)
        return gone

    # -- rotation ----------------------------------------------------------------------

    def rewrap_all(self) -> int:
        """Re-wrap every stored key with the current KEK (after a KEK rotation)."""
        n = 0
        for prefix in ("twin:", "epoch:", _INDEX_KEY):
            for name in list(self.store.names(prefix)):
                blob = self.store.get(name)
                if blob is None or blob[2:6] == self._current:
                    continue
                self.store.replace(name, self._wrap(name, self._unwrap(name, blob)))
                n += 1
        return n


_default: KeyRing | None = None
_default_lock = threading.Lock()


def default_keyring() -> KeyRing:
    """The process's key ring, configured from the environment (see the module docstring)."""
    global _default
    with _default_lock:
        if _default is None:
            kek, previous = load_kek()
            _default = KeyRing(kek, open_keystore(), previous=previous)
        return _default


def reset_default_keyring() -> None:
    """Forget the cached key ring (tests, and after `fhirtwin keys rotate`)."""
    global _default
    with _default_lock:
        _default = None


def is_sealed_raw(value: bytes | None) -> bool:
    return bool(value) and value[:4] == RAW_MAGIC  # type: ignore[index]


# Headers that may name the patient (a Synthea file is named after them; a dead letter's
# reason can quote the field it could not read).
SEALED_HEADERS = frozenset(
    {
        "fhirtwin-filename",
        "fhirtwin-patient-identifiers",
        "fhirtwin-dl-reason",
        "fhirtwin-dl-error",
    }
)


def seal_raw_record(
    keys: KeyRing,
    value: bytes,
    key: bytes | None,
    headers: list[tuple[str, bytes]],
) -> tuple[bytes, bytes | None, list[tuple[str, bytes]]]:
    """(value, key, headers) of a raw record as fhirtwin writes it to Kafka: the value and
    the headers in SEALED_HEADERS sealed with today's epoch key, the key (a patient
    identifier, for ordering) replaced by its blind index (same patient, same partition)."""
    return (
        keys.seal_raw(value),
        keys.blind(key.decode("utf-8", "replace")).encode() if key else key,
        [(k, keys.seal_raw(v) if k in SEALED_HEADERS and v else v) for k, v in headers],
    )


def open_raw_headers(
    keys: KeyRing, headers: tuple[tuple[str, bytes], ...]
) -> tuple[tuple[str, bytes], ...]:
    return tuple(
        (k, keys.open_raw(v) if k in SEALED_HEADERS and is_sealed_raw(v) else v) for k, v in headers
    )


# -- the twin's events on fhir.resources ------------------------------------------------------

_EVENT_AAD = b"fhir.resources|"


def seal_event(keys: KeyRing, twin: str, event: bytes) -> bytes:
    """A ``fhir.resources`` value: the event sealed with its twin's key (record key = twin),
    so erasing the twin makes its events in every Kafka segment unreadable too."""
    return keys.seal(twin, event, _EVENT_AAD + twin.encode())


def open_event(keys: KeyRing, twin: str, value: bytes) -> bytes:
    """The JSON of a ``fhir.resources`` value; ErasedError for an erased twin's event."""
    return keys.open(twin, value, _EVENT_AAD + twin.encode())
