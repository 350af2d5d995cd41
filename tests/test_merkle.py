"""The audit log's Merkle core: roots, proofs, checkpoints and tamper detection.

Everything is checked against a brute-force transcription of RFC 6962 §2.1 (MTH, PATH,
PROOF on plain lists) that shares no code with ``fhirtwin.merkle``, plus published
known-answer vectors, so a bug common to the incremental tree and its verifiers cannot hide.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhirtwin.merkle import (
    EMPTY_ROOT,
    Checkpoint,
    CheckpointError,
    DictStore,
    MerkleLog,
    StoreConflictError,
    generate_key,
    key_id,
    leaf_hash,
    node_hash,
    open_note,
    parse_signer_key,
    parse_verifier_key,
    root,
    sign_checkpoint,
    sign_note,
    verifier_key,
    verify_checkpoint,
    verify_consistency,
    verify_inclusion,
    verify_log,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ORIGIN = "audit.fhirtwin.example/log"

Keys = tuple[str, Ed25519PrivateKey, str]  # key name, signer, verifier key text
SignedLog = tuple[list[bytes], MerkleLog, list[str], Ed25519PublicKey]

# ---------------------------------------------------------------------------------------------
# Brute-force RFC 6962 §2.1, straight from the text
# ---------------------------------------------------------------------------------------------


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _k(n: int) -> int:
    """Largest power of two smaller than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(d: list[bytes]) -> bytes:
    n = len(d)
    if n == 0:
        return _h(b"")
    if n == 1:
        return _h(b"\x00" + d[0])
    k = _k(n)
    return _h(b"\x01" + mth(d[:k]) + mth(d[k:]))


def path(m: int, d: list[bytes]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return [*path(m, d[:k]), mth(d[k:])]
    return [*path(m - k, d[k:]), mth(d[:k])]


def subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [mth(d)]
    k = _k(n)
    if m <= k:
        return [*subproof(m, d[:k], b), mth(d[k:])]
    return [*subproof(m - k, d[k:], False), mth(d[:k])]


def proof(m: int, d: list[bytes]) -> list[bytes]:
    return subproof(m, d, True)


def entries(n: int) -> list[bytes]:
    return [f'{{"AuditEvent":{i}}}'.encode() for i in range(n)]


def build(data: list[bytes]) -> MerkleLog:
    log = MerkleLog(DictStore())
    for d in data:
        log.append(d)
    return log


@pytest.fixture(scope="module")
def log70() -> tuple[MerkleLog, list[bytes]]:
    data = entries(70)
    return build(data), data


def flip(h: bytes) -> bytes:
    return bytes([h[0] ^ 1]) + h[1:]


# ---------------------------------------------------------------------------------------------
# Known answers
# ---------------------------------------------------------------------------------------------

# Leaves, roots and complete-subtree hashes from transparency-dev/merkle, testonly/constants.go
# (the RFC 6962 vectors of google/certificate-transparency), and proofs from proof/verify_test.go
# of the same repository; there the inclusion vectors number leaves from 1, here from 0.
CT_LEAVES = [
    bytes.fromhex(x)
    for x in (
        *("", "00", "10", "2021", "3031", "40414243", "5051525354555657"),
        "606162636465666768696a6b6c6d6e6f",
    )
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_NODES = {
    (0, 1): "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
    (0, 7): "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
    (1, 1): "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
    (1, 3): "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    (2, 1): "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
}
CT_INCLUSION = {
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 3): ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
    (1, 5): [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}
CT_CONSISTENCY = {
    (1, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (6, 8): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
    (6, 7): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}

# golang.org/x/mod/sumdb/note, package documentation example ("PeterNeumann"): a signer key,
# its verifier key and the exact signed note Go produces. Ed25519 is deterministic, so matching
# it byte for byte shows our key IDs, key texts and note layout interoperate.
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT + "\n— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNX"
    "gKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)


def test_hash_primitives() -> None:
    assert leaf_hash(b"x") == _h(b"\x00x")
    assert node_hash(b"a" * 32, b"b" * 32) == _h(b"\x01" + b"a" * 32 + b"b" * 32)
    assert root([]) == EMPTY_ROOT == _h(b"")


def test_ct_vector_roots_and_nodes() -> None:
    log = build(CT_LEAVES)
    for n, want in enumerate(CT_ROOTS):
        assert log.root(n).hex() == want
        assert root(leaf_hash(x) for x in CT_LEAVES[:n]).hex() == want
    store = log.store
    assert isinstance(store, DictStore)
    for key, want in CT_NODES.items():
        assert store.nodes[key].hex() == want


@pytest.mark.parametrize(("index", "size"), sorted(CT_INCLUSION))
def test_ct_vector_inclusion(index: int, size: int) -> None:
    log = build(CT_LEAVES)
    want = [bytes.fromhex(x) for x in CT_INCLUSION[(index, size)]]
    assert log.inclusion_proof(index, size) == want
    lh = leaf_hash(CT_LEAVES[index])
    assert verify_inclusion(lh, index, size, want, bytes.fromhex(CT_ROOTS[size]))


@pytest.mark.parametrize(("m", "n"), sorted(CT_CONSISTENCY))
def test_ct_vector_consistency(m: int, n: int) -> None:
    log = build(CT_LEAVES)
    want = [bytes.fromhex(x) for x in CT_CONSISTENCY[(m, n)]]
    assert log.consistency_proof(m, n) == want
    old, new = bytes.fromhex(CT_ROOTS[m]), bytes.fromhex(CT_ROOTS[n])
    assert verify_consistency(m, n, old, new, want)


def test_go_signed_note_vector() -> None:
    name, private = parse_signer_key(GO_SKEY)
    vname, public = parse_verifier_key(GO_VKEY)
    assert name == vname == "PeterNeumann"
    assert verifier_key(name, private.public_key()) == GO_VKEY
    assert key_id(name, public).hex() == "c74f20a3"
    assert sign_note(GO_TEXT, name, private) == GO_NOTE
    assert open_note(GO_NOTE, name, public) == GO_TEXT
    with pytest.raises(CheckpointError):
        open_note(GO_NOTE.replace("cryptography", "cryptographY"), name, public)


# ---------------------------------------------------------------------------------------------
# Roots and proofs against brute force
# ---------------------------------------------------------------------------------------------


def test_roots_match_brute_force_0_to_70(log70: tuple[MerkleLog, list[bytes]]) -> None:
    log, data = log70
    assert log.size == 70
    for n in range(71):
        want = mth(data[:n])
        assert log.root(n) == want, n
        assert root(leaf_hash(d) for d in data[:n]) == want
        assert build(data[:n]).root() == want  # the current root of a log of that size


def test_extend_equals_appends(log70: tuple[MerkleLog, list[bytes]]) -> None:
    log, data = log70
    bulk = MerkleLog(DictStore())
    assert bulk.extend(data[:33]) == range(33)
    assert bulk.extend([]) == range(33, 33)
    assert bulk.extend(data[33:]) == range(33, 70)
    assert isinstance(bulk.store, DictStore) and isinstance(log.store, DictStore)
    assert bulk.store.nodes == log.store.nodes
    assert bulk.leaf_hashes() == [leaf_hash(d) for d in data]


def test_inclusion_proofs_sizes_1_to_40(log70: tuple[MerkleLog, list[bytes]]) -> None:
    log, data = log70
    for n in range(1, 41):
        r = log.root(n)
        for i in range(n):
            p = log.inclusion_proof(i, n)
            assert p == path(i, data[:n]), (i, n)
            lh = leaf_hash(data[i])
            assert verify_inclusion(lh, i, n, p, r)
            assert not verify_inclusion(leaf_hash(data[i] + b" "), i, n, p, r)
            assert not verify_inclusion(lh, i, n, p, flip(r))
            if n > 1:
                assert not verify_inclusion(lh, (i + 1) % n, n, p, r)
            # The proof's length fixes the tree height, not the exact size (a signed
            # checkpoint does that): a size of another height must fail.
            assert not verify_inclusion(lh, i, n * 2, p, r)
            assert not verify_inclusion(lh, i, n // 2, p, r)
            assert not verify_inclusion(lh, i, n, [*p, r], r)  # trailing garbage
            if p:
                assert not verify_inclusion(lh, i, n, p[:-1], r)
                assert not verify_inclusion(lh, i, n, [flip(p[0]), *p[1:]], r)


def test_consistency_proofs_1_to_40(log70: tuple[MerkleLog, list[bytes]]) -> None:
    log, data = log70
    roots = [log.root(n) for n in range(41)]
    for n in range(1, 41):
        for m in range(1, n + 1):
            p = log.consistency_proof(m, n)
            assert p == (proof(m, data[:n]) if m < n else []), (m, n)
            assert verify_consistency(m, n, roots[m], roots[n], p)
            assert not verify_consistency(m, n, flip(roots[m]), roots[n], p)
            assert not verify_consistency(m, n, roots[m], flip(roots[n]), p)
            if m < n:
                other = roots[m - 1] if m > 1 else roots[m + 1]
                assert not verify_consistency(m, n, other, roots[n], p)
                assert not verify_consistency(m, n, roots[m], roots[n], [])
                assert not verify_consistency(m, n, roots[m], roots[n], [*p, roots[n]])
                assert not verify_consistency(m, n, roots[m], roots[n], p[:-1])
                assert not verify_consistency(m, n, roots[m], roots[n], [flip(p[0]), *p[1:]])
                assert not verify_consistency(n, m, roots[n], roots[m], p)
                # A claimed size of another height must fail even with the right roots (as
                # for inclusion, the exact size is fixed by the signed checkpoints).
                assert not verify_consistency(m, n * 2, roots[m], roots[n], p)


def test_consistency_edge_cases(log70: tuple[MerkleLog, list[bytes]]) -> None:
    log, _ = log70
    r5 = log.root(5)
    assert log.consistency_proof(0, 5) == []
    assert verify_consistency(0, 5, EMPTY_ROOT, r5, [])
    assert not verify_consistency(0, 5, r5, r5, [])
    assert not verify_consistency(0, 5, EMPTY_ROOT, r5, [r5])
    assert verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    assert not verify_consistency(5, 5, r5, r5, [r5])
    assert not verify_consistency(5, 5, r5, flip(r5), [])


def test_inclusion_edge_cases(log70: tuple[MerkleLog, list[bytes]]) -> None:
    log, data = log70
    lh = leaf_hash(data[0])
    assert log.inclusion_proof(0, 1) == []
    assert verify_inclusion(lh, 0, 1, [], lh)
    assert not verify_inclusion(lh, 0, 0, [], EMPTY_ROOT)
    assert not verify_inclusion(lh, 1, 1, [], lh)
    assert not verify_inclusion(b"short", 0, 1, [], b"short")


def test_bad_arguments(log70: tuple[MerkleLog, list[bytes]]) -> None:
    log, _ = log70
    with pytest.raises(ValueError):
        log.root(71)
    with pytest.raises(ValueError):
        log.inclusion_proof(5, 5)
    with pytest.raises(ValueError):
        log.consistency_proof(6, 5)


@SETTINGS
@given(data=st.lists(st.binary(max_size=40), min_size=1, max_size=300), draw=st.data())
def test_random_logs(data: list[bytes], draw: st.DataObject) -> None:
    n = len(data)
    m = draw.draw(st.integers(1, n), label="old size")
    i = draw.draw(st.integers(0, n - 1), label="leaf index")
    log = MerkleLog(DictStore())
    log.extend(data)
    assert log.root() == mth(data)
    assert verify_inclusion(leaf_hash(data[i]), i, n, log.inclusion_proof(i), log.root())
    assert verify_consistency(m, n, log.root(m), log.root(), log.consistency_proof(m))


def test_store_conflict() -> None:
    store = DictStore()
    a, b = MerkleLog(store), MerkleLog(store)
    a.append(b"x")
    with pytest.raises(StoreConflictError):
        store.commit(0, 1, {(0, 0): leaf_hash(b"y")})
    assert b.append(b"y") == 1  # a second handle sees the committed size


# ---------------------------------------------------------------------------------------------
# Keys and checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> Keys:
    skey, vkey = generate_key(ORIGIN)
    name, private = parse_signer_key(skey)
    assert name == ORIGIN
    return name, private, vkey


def test_key_texts(keys: Keys) -> None:
    name, private, vkey = keys
    vname, public = parse_verifier_key(vkey)
    assert vname == name
    assert public.public_bytes_raw() == private.public_key().public_bytes_raw()
    kid = hashlib.sha256(name.encode() + b"\n\x01" + public.public_bytes_raw()).digest()[:4]
    assert vkey.split("+")[1] == kid.hex()
    for bad in (
        vkey.replace(name, "other.example/log"),  # hash no longer matches the name
        vkey[:-2] + "A=",
        "no-plus-signs",
        "a b+00000000+" + vkey.split("+", 2)[2],
    ):
        with pytest.raises(CheckpointError):
            parse_verifier_key(bad)
    with pytest.raises(CheckpointError):
        generate_key("has space")
    with pytest.raises(CheckpointError):
        parse_signer_key(vkey)


def test_checkpoint_round_trip(keys: Keys) -> None:
    name, private, vkey = keys
    _, public = parse_verifier_key(vkey)
    log = build(entries(13))
    note = sign_checkpoint(ORIGIN, 13, log.root(), name, private)
    lines = note.split("\n")
    assert lines[:4] == [ORIGIN, "13", base64.b64encode(log.root()).decode(), ""]
    assert lines[4].startswith(f"— {name} ") and lines[5] == ""
    sig = base64.b64decode(lines[4].split(" ")[2])
    assert sig[:4] == key_id(name, public) and len(sig) == 68
    got = verify_checkpoint(note, name, public, origin=ORIGIN)
    assert got == Checkpoint(ORIGIN, 13, log.root())
    origin, size, r = got
    assert (origin, size, r) == (ORIGIN, 13, log.root())
    assert verify_checkpoint(note, name, public.public_bytes_raw()) == got
    empty = sign_checkpoint(ORIGIN, 0, EMPTY_ROOT, name, private)
    assert verify_checkpoint(empty, name, public).size == 0


def test_checkpoint_tampering_rejected(keys: Keys) -> None:
    name, private, vkey = keys
    _, public = parse_verifier_key(vkey)
    r = build(entries(13)).root()
    note = sign_checkpoint(ORIGIN, 13, r, name, private)
    other_root = base64.b64encode(flip(r)).decode()
    tampered = {
        "size": note.replace("\n13\n", "\n12\n"),
        "root": note.replace(base64.b64encode(r).decode(), other_root),
        "origin": note.replace(ORIGIN + "\n", "evil.example/log\n", 1),
        "signature": note[:-4] + ("AAA=" if note[-4:] != "AAA=" else "AQA=") + "\n",
        "no signature": note[: note.rindex("\n\n") + 2],
        "no blank line": note.replace("\n\n", "\n"),
        "extra text": "x\n" + note,
    }
    for what, bad in tampered.items():
        with pytest.raises(CheckpointError):
            verify_checkpoint(bad, name, public)
            pytest.fail(f"accepted tampered {what}")
    _, other = parse_verifier_key(generate_key(name)[1])
    with pytest.raises(CheckpointError, match="not signed"):
        verify_checkpoint(note, name, other)  # same name, another key
    with pytest.raises(CheckpointError, match="not signed"):
        verify_checkpoint(note, "another.example/key", public)
    with pytest.raises(CheckpointError, match="origin"):
        verify_checkpoint(note, name, public, origin="another.example/log")


def test_checkpoint_cosignatures(keys: Keys) -> None:
    """Unknown signatures (a witness) are ignored; a bad one from our key rejects the note."""
    name, private, vkey = keys
    _, public = parse_verifier_key(vkey)
    note = sign_checkpoint(ORIGIN, 3, build(entries(3)).root(), name, private)
    witness = Ed25519PrivateKey.generate()
    text = note[: note.rindex("\n\n") + 1]
    witness_line = sign_note(text, "witness.example/w1", witness).split("\n\n")[-1]
    assert verify_checkpoint(note + witness_line, name, public).size == 3
    assert verify_checkpoint(text + "\n" + witness_line + note.split("\n\n")[1], name, public)
    ours = note.split("\n\n")[1]
    sig = base64.b64decode(ours.split(" ")[2])
    bad_sig = base64.b64encode(sig[:4] + flip(sig[4:])).decode()  # our key ID, wrong signature
    with pytest.raises(CheckpointError, match="does not verify"):
        verify_checkpoint(f"{note}— {name} {bad_sig}\n", name, public)


def test_checkpoint_parse_strictness(keys: Keys) -> None:
    name, private, vkey = keys
    _, public = parse_verifier_key(vkey)
    r64 = base64.b64encode(EMPTY_ROOT).decode()
    for text in (
        f"{ORIGIN}\n013\n{r64}\n",  # leading zero
        f"{ORIGIN}\n-1\n{r64}\n",
        f"{ORIGIN}\n1\n{r64[:-4]}\n",  # not 32 bytes
        f"{ORIGIN}\n1\n",  # no root line
    ):
        with pytest.raises(CheckpointError):
            verify_checkpoint(sign_note(text, name, private), name, public)
    ext = sign_note(f"{ORIGIN}\n1\n{r64}\nextension\n", name, private)
    assert verify_checkpoint(ext, name, public) == Checkpoint(ORIGIN, 1, EMPTY_ROOT)
    with pytest.raises(CheckpointError):
        sign_checkpoint("two\nlines", 1, EMPTY_ROOT, name, private)


# ---------------------------------------------------------------------------------------------
# Whole-log verification and tamper tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signed_log(
    keys: Keys,
) -> SignedLog:
    """20 entries, a checkpoint after each append (like a busy sequencer), and the final one."""
    name, private, vkey = keys
    _, public = parse_verifier_key(vkey)
    data = entries(20)
    log = MerkleLog(DictStore())
    notes = []
    for d in data:
        log.append(d)
        notes.append(sign_checkpoint(ORIGIN, log.size, log.root(), name, private))
    return data, log, notes, public


def _tampered(data: list[bytes]) -> dict[str, tuple[list[bytes], int]]:
    flipped = list(data)
    flipped[7] = flipped[7][:3] + bytes([flipped[7][3] ^ 0x01]) + flipped[7][4:]
    swapped = list(data)
    swapped[4], swapped[11] = swapped[11], swapped[4]
    return {
        "flipped byte": (flipped, 7),
        "deleted entry": (data[:9] + data[10:], 9),
        "deleted last": (data[:-1], 19),
        "swapped entries": (swapped, 4),
        "inserted entry": ([*data[:2], b"{}", *data[2:]], 2),
    }


def test_verify_log_accepts_intact(keys: Keys, signed_log: SignedLog) -> None:
    name = keys[0]
    data, log, notes, public = signed_log
    res = verify_log(data, notes[-1], name, public, origin=ORIGIN)
    assert res.ok and res.first_bad_index is None and res.entries == 20, res
    assert res.checkpoint == Checkpoint(ORIGIN, 20, log.root())
    # Entries past the checkpoint are counted, not judged.
    res = verify_log([*data, b"later"], notes[9], name, public, leaf_hashes=log.leaf_hashes())
    assert res.ok and res.unsigned == 11


@pytest.mark.parametrize("case", list(_tampered(entries(20))))
def test_tamper_named_with_reference(keys: Keys, signed_log: SignedLog, case: str) -> None:
    """With the log's leaf hashes (authenticated by the signed root) the first bad entry is exact."""
    name = keys[0]
    data, log, notes, public = signed_log
    bad, first = _tampered(data)[case]
    res = verify_log(bad, notes[-1], name, public, leaf_hashes=log.leaf_hashes())
    assert not res.ok
    assert res.first_bad_index == first, res


@pytest.mark.parametrize("case", list(_tampered(entries(20))))
def test_tamper_named_with_checkpoints(keys: Keys, signed_log: SignedLog, case: str) -> None:
    """A checkpoint per entry localizes exactly; a single checkpoint only says "somewhere"."""
    name = keys[0]
    data, _, notes, public = signed_log
    bad, first = _tampered(data)[case]
    res = verify_log(bad, list(reversed(notes)), name, public)
    assert not res.ok
    assert res.first_bad_index == first, res
    res = verify_log(bad, notes[-1], name, public)
    assert not res.ok and res.bad_range is not None
    lo, hi = res.bad_range
    assert lo <= first < hi


def test_tamper_with_forged_reference(keys: Keys, signed_log: SignedLog) -> None:
    """A store rewritten to match the altered entries is caught by the signed root."""
    name = keys[0]
    data, _, notes, public = signed_log
    bad, first = _tampered(data)["flipped byte"]
    forged = [leaf_hash(d) for d in bad]
    res = verify_log(bad, notes[-1], name, public, leaf_hashes=forged)
    assert not res.ok and "reference" in res.reason
    res = verify_log(bad, notes, name, public, leaf_hashes=forged)
    assert res.first_bad_index == first


def test_verify_log_rejects_bad_checkpoints(keys: Keys, signed_log: SignedLog) -> None:
    name, private, _ = keys
    data, log, notes, public = signed_log
    res = verify_log(data, notes[-1].replace("\n20\n", "\n21\n"), name, public)
    assert not res.ok and "checkpoint 0" in res.reason
    fork = sign_checkpoint(ORIGIN, 20, flip(log.root()), name, private)
    res = verify_log(data, [notes[-1], fork], name, public)
    assert not res.ok and "disagree" in res.reason
    res = verify_log(data, [], name, public)
    assert not res.ok


def test_append_after_checkpoint_stays_consistent(keys: Keys) -> None:
    name, private, vkey = keys
    _, public = parse_verifier_key(vkey)
    log = build(entries(11))
    old = verify_checkpoint(sign_checkpoint(ORIGIN, 11, log.root(), name, private), name, public)
    for d in entries(30)[11:]:
        log.append(d)
        new = verify_checkpoint(
            sign_checkpoint(ORIGIN, log.size, log.root(), name, private), name, public
        )
        p = log.consistency_proof(old.size, new.size)
        assert verify_consistency(old.size, new.size, old.root, new.root, p)
        assert log.root(old.size) == old.root  # history is unchanged
    # A rewritten history (entry 3 changed) cannot be proven consistent with the old checkpoint.
    rewritten = entries(30)
    rewritten[3] = b"{}"
    forged = build(rewritten)
    p = forged.consistency_proof(11, 30)
    assert not verify_consistency(11, 30, old.root, forged.root(), p)
