"""The on-disk keystore (medledger.crypto.keystore).

scrypt runs with n=2**4 here (``Keystore(..., scrypt_n=...)``) so the suite stays
fast; the default cost is checked separately without running it.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from medledger.crypto.aead import generate_record_key
from medledger.crypto.kem import unwrap_key, wrap_key
from medledger.crypto.keystore import (
    FORMAT_VERSION,
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    WRONG_PASSPHRASE,
    Identity,
    Keystore,
)
from medledger.crypto.signing import ALG_MLKEM768_X25519, ALG_X25519
from medledger.errors import KeystoreError

FAST_N = 2**4
PASSPHRASE = "correct horse battery staple"


class Clock:
    """A settable clock (Unix seconds)."""

    def __init__(self, now: int = 1_700_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def store(store_dir: Path, clock: Clock) -> Keystore:
    return Keystore(store_dir, clock=clock, scrypt_n=FAST_N)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _doc(store: Keystore, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((store.path / f"{name}.json").read_text())
    return data


def _put_doc(store: Keystore, name: str, doc: dict[str, Any]) -> None:
    path = store.path / f"{name}.json"
    path.write_text(json.dumps(doc))
    os.chmod(path, 0o600)


def _private_material(identity: Identity) -> list[bytes]:
    keys = [identity.signing.seed(), identity.encryption.private_bytes()]
    if identity.pq_encryption is not None:
        pq = identity.pq_encryption.private_bytes()
        keys += [pq, pq[:64], pq[64:]]
    keys += [k.private_bytes() for k in identity.retired_encryption]
    return keys


def _encodings(secret: bytes) -> list[bytes]:
    return [
        secret,
        secret.hex().encode(),
        base64.b64encode(secret),
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
    ]


# --------------------------------------------------------------------- basics


def test_default_scrypt_cost_is_strong() -> None:
    assert SCRYPT_N >= 2**15
    assert SCRYPT_R >= 8
    assert SCRYPT_P >= 1


def test_create_and_load_round_trip(store: Keystore, clock: Clock) -> None:
    created = store.create("clinic-a")
    assert created.name == "clinic-a"
    assert created.created == created.activated == clock.now
    assert created.pq_encryption is None
    assert created.history == []
    assert created.encryption.alg == ALG_X25519
    loaded = store.load("clinic-a")
    assert loaded.signing.seed() == created.signing.seed()
    assert loaded.encryption.private_bytes() == created.encryption.private_bytes()
    assert loaded.created == created.created
    assert loaded.key_id == created.key_id
    assert store.names() == ["clinic-a"]


def test_pq_identity(store: Keystore) -> None:
    created = store.create("lab", pq=True)
    assert created.pq_encryption is not None
    assert created.pq_encryption.alg == ALG_MLKEM768_X25519
    loaded = store.load("lab")
    assert loaded.pq_encryption is not None
    assert loaded.pq_encryption.private_bytes() == created.pq_encryption.private_bytes()
    wrapped = wrap_key(created.pq_encryption.public, b"k" * 32, b"info")
    assert unwrap_key(loaded.pq_encryption, wrapped, b"info") == b"k" * 32


def test_names_sorted_and_ignores_other_files(store: Keystore) -> None:
    for name in ("zeta", "alpha", "m.i_d-1"):
        store.create(name)
    (store.path / "notes.txt").write_text("x")
    (store.path / ".hidden.json").write_text("{}")
    assert store.names() == ["alpha", "m.i_d-1", "zeta"]


def test_create_refuses_existing(store: Keystore) -> None:
    first = store.create("a")
    with pytest.raises(KeystoreError, match="already exists"):
        store.create("a")
    assert store.load("a").signing.seed() == first.signing.seed()


@pytest.mark.parametrize(
    "name", ["", ".hidden", "../escape", "a/b", "a\\b", "x" * 65, "-dash", "sp ace", "é"]
)
def test_invalid_names(store: Keystore, name: str) -> None:
    with pytest.raises(KeystoreError, match="invalid identity name"):
        store.create(name)
    with pytest.raises(KeystoreError, match="invalid identity name"):
        store.load(name)


def test_load_missing(store: Keystore) -> None:
    with pytest.raises(KeystoreError, match="no identity named 'ghost'"):
        store.load("ghost")


def test_bad_scrypt_parameters_refused(store_dir: Path) -> None:
    for n, r, p in [(3, 8, 1), (1, 8, 1), (2**4, 0, 1), (2**4, 8, 0), (2**30, 8, 1)]:
        with pytest.raises(KeystoreError):
            Keystore(store_dir, scrypt_n=n, scrypt_r=r, scrypt_p=p)


def test_clock_must_return_int(store_dir: Path) -> None:
    store = Keystore(store_dir, clock=lambda: 1.5, scrypt_n=FAST_N)  # type: ignore[arg-type,return-value]
    with pytest.raises(KeystoreError, match="clock"):
        store.create("a")


# --------------------------------------------------------------------- permissions


def test_permissions(store: Keystore, store_dir: Path) -> None:
    assert _mode(store_dir) == 0o700
    store.create("a")
    store.create("b", passphrase=PASSPHRASE)
    store.rotate("a")
    for name in ("a", "b"):
        assert _mode(store_dir / f"{name}.json") == 0o600
    # no temporary files left behind
    assert sorted(p.name for p in store_dir.iterdir()) == ["a.json", "b.json"]


def test_permissions_ignore_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        store = Keystore(tmp_path / "k", scrypt_n=FAST_N)
        store.create("a")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "k") == 0o700
    assert _mode(tmp_path / "k" / "a.json") == 0o600


def test_existing_loose_directory_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "loose"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    Keystore(path, scrypt_n=FAST_N)
    assert _mode(path) == 0o700


def test_group_readable_key_file_is_refused(store: Keystore) -> None:
    store.create("a")
    os.chmod(store.path / "a.json", 0o640)
    with pytest.raises(KeystoreError, match="accessible by other users"):
        store.load("a")


def test_symlinked_key_file_is_refused(store: Keystore, tmp_path: Path) -> None:
    store.create("a")
    (store.path / "a.json").rename(tmp_path / "elsewhere.json")
    (store.path / "a.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(KeystoreError):
        store.load("a")


def test_keystore_path_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(KeystoreError):
        Keystore(path)


# --------------------------------------------------------------------- file format


def test_unencrypted_file_format(store: Keystore) -> None:
    identity = store.create("a")
    doc = _doc(store, "a")
    assert doc["format"] == FORMAT_VERSION == 1
    assert doc["name"] == "a"
    assert doc["secret"]["protection"] == "none"
    assert base64.b64decode(doc["public"]["signing"]) == identity.signing.public.raw
    assert base64.b64decode(doc["public"]["encryption"]) == identity.encryption.public.raw
    assert doc["public"]["pq_encryption"] is None
    assert doc["history"] == []


def test_encrypted_file_stores_kdf_parameters(store: Keystore) -> None:
    store.create("a", passphrase=PASSPHRASE)
    secret = _doc(store, "a")["secret"]
    assert secret["protection"] == "scrypt-aes-256-gcm"
    assert set(secret) == {"protection", "kdf", "ciphertext"}
    kdf = secret["kdf"]
    assert kdf["name"] == "scrypt"
    assert (kdf["n"], kdf["r"], kdf["p"]) == (FAST_N, 8, 1)
    assert len(base64.b64decode(kdf["salt"])) == 16


def test_salt_is_fresh_per_file(store: Keystore) -> None:
    store.create("a", passphrase=PASSPHRASE)
    store.create("b", passphrase=PASSPHRASE)
    assert _doc(store, "a")["secret"]["kdf"]["salt"] != _doc(store, "b")["secret"]["kdf"]["salt"]


@pytest.mark.parametrize("pq", [False, True], ids=["x25519", "pq"])
def test_private_keys_do_not_appear_in_encrypted_file(store: Keystore, pq: bool) -> None:
    store.create("a", passphrase=PASSPHRASE, pq=pq)
    identity = store.rotate("a", passphrase=PASSPHRASE)  # retired keys are secret too
    data = (store.path / "a.json").read_bytes()
    secrets = _private_material(identity)
    assert len(secrets) >= 3
    for secret in secrets:
        for encoded in _encodings(secret):
            assert encoded not in data


def test_unencrypted_file_does_contain_private_keys(store: Keystore) -> None:
    """Sanity check of the test above: the search would find an unprotected seed."""
    identity = store.create("a")
    doc = _doc(store, "a")
    plaintext = base64.b64decode(doc["secret"]["plaintext"])
    assert identity.signing.seed() in plaintext


# --------------------------------------------------------------------- passphrases


def test_passphrase_round_trip(store: Keystore) -> None:
    created = store.create("a", passphrase=PASSPHRASE, pq=True)
    loaded = store.load("a", passphrase=PASSPHRASE)
    assert loaded.signing.seed() == created.signing.seed()
    assert loaded.pq_encryption is not None and created.pq_encryption is not None
    assert loaded.pq_encryption.private_bytes() == created.pq_encryption.private_bytes()


def test_passphrase_is_unicode_normalised(store: Keystore) -> None:
    store.create("a", passphrase="caf\u00e9")  # precomposed
    store.load("a", passphrase="cafe\u0301")  # decomposed: same NFC form


@pytest.mark.parametrize("wrong", ["wrong", PASSPHRASE + " ", PASSPHRASE.upper()])
def test_wrong_passphrase(store: Keystore, wrong: str) -> None:
    store.create("a", passphrase=PASSPHRASE)
    with pytest.raises(KeystoreError) as excinfo:
        store.load("a", passphrase=wrong)
    assert str(excinfo.value) == WRONG_PASSPHRASE == "wrong passphrase or corrupted key file"
    assert excinfo.value.__cause__ is None


def test_missing_passphrase(store: Keystore) -> None:
    store.create("a", passphrase=PASSPHRASE)
    with pytest.raises(KeystoreError, match="is encrypted: a passphrase is required"):
        store.load("a")
    with pytest.raises(KeystoreError, match="passphrase is required"):
        store.rotate("a")


def test_empty_passphrase_refused(store: Keystore) -> None:
    with pytest.raises(KeystoreError, match="must not be empty"):
        store.create("a", passphrase="")
    assert store.names() == []


def test_passphrase_for_unencrypted_file_is_ignored(store: Keystore) -> None:
    created = store.create("a")
    assert store.load("a", passphrase="anything").key_id == created.key_id


def _tamper_encrypted(doc: dict[str, Any], what: str, other: Identity) -> None:
    if what == "public-signing":
        doc["public"]["signing"] = base64.b64encode(other.signing.public.raw).decode()
    elif what == "created":
        doc["created"] += 1
    elif what == "kdf-n":
        doc["secret"]["kdf"]["n"] *= 2
    elif what == "salt":
        salt = bytearray(base64.b64decode(doc["secret"]["kdf"]["salt"]))
        salt[0] ^= 1
        doc["secret"]["kdf"]["salt"] = base64.b64encode(bytes(salt)).decode()
    elif what == "ciphertext":
        blob = bytearray(base64.b64decode(doc["secret"]["ciphertext"]))
        blob[-1] ^= 1
        doc["secret"]["ciphertext"] = base64.b64encode(bytes(blob)).decode()
    elif what == "extra-field":
        doc["comment"] = "hello"
    else:  # pragma: no cover
        raise AssertionError(what)


@pytest.mark.parametrize(
    "what", ["public-signing", "created", "kdf-n", "salt", "ciphertext", "extra-field"]
)
def test_tampered_encrypted_file(store: Keystore, what: str) -> None:
    store.create("a", passphrase=PASSPHRASE)
    other = store.create("other")
    doc = _doc(store, "a")
    _tamper_encrypted(doc, what, other)
    _put_doc(store, "a", doc)
    with pytest.raises(KeystoreError) as excinfo:
        store.load("a", passphrase=PASSPHRASE)
    assert str(excinfo.value) == WRONG_PASSPHRASE


def test_tampered_encrypted_history(store: Keystore, clock: Clock) -> None:
    store.create("a", passphrase=PASSPHRASE)
    clock.now += 10
    store.rotate("a", passphrase=PASSPHRASE)
    doc = _doc(store, "a")
    doc["history"][0]["retired"] += 1
    _put_doc(store, "a", doc)
    with pytest.raises(KeystoreError) as excinfo:
        store.load("a", passphrase=PASSPHRASE)
    assert str(excinfo.value) == WRONG_PASSPHRASE


def test_unencrypted_public_private_mismatch(store: Keystore) -> None:
    store.create("a")
    other = store.create("b")
    doc = _doc(store, "a")
    doc["public"]["encryption"] = base64.b64encode(other.encryption.public.raw).decode()
    _put_doc(store, "a", doc)
    with pytest.raises(KeystoreError, match="do not match"):
        store.load("a")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(format=2),
        lambda d: d.update(name="b"),
        lambda d: d.pop("public"),
        lambda d: d.update(created="yesterday"),
        lambda d: d["public"].update(signing="!!!"),
        lambda d: d["public"].update(signing=base64.b64encode(b"short").decode()),
        lambda d: d["secret"].update(protection="rot13"),
        lambda d: d["secret"].update(plaintext=base64.b64encode(b"\xa0").decode()),
        lambda d: d.update(history=[{"signing": "x"}]),
    ],
)
def test_malformed_file(store: Keystore, mutate: Callable[[dict[str, Any]], object]) -> None:
    store.create("a")
    doc = _doc(store, "a")
    mutate(doc)
    _put_doc(store, "a", doc)
    with pytest.raises(KeystoreError):
        store.load("a")


@pytest.mark.parametrize("content", [b"", b"not json", b"[]", b"\xff\xfe", b"null"])
def test_garbage_file(store: Keystore, content: bytes) -> None:
    path = store.path / "a.json"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(KeystoreError):
        store.load("a")


def test_unreasonable_scrypt_parameters_in_file_refused(store: Keystore) -> None:
    store.create("a", passphrase=PASSPHRASE)
    doc = _doc(store, "a")
    doc["secret"]["kdf"]["n"] = 2**40
    _put_doc(store, "a", doc)
    with pytest.raises(KeystoreError, match="malformed"):
        store.load("a", passphrase=PASSPHRASE)


def test_file_written_with_other_cost_is_readable(store_dir: Path) -> None:
    Keystore(store_dir, scrypt_n=2**5, scrypt_r=4, scrypt_p=2).create("a", passphrase=PASSPHRASE)
    Keystore(store_dir, scrypt_n=FAST_N).load("a", passphrase=PASSPHRASE)


# --------------------------------------------------------------------- rotation


@pytest.mark.parametrize("passphrase", [None, PASSPHRASE], ids=["plain", "encrypted"])
@pytest.mark.parametrize("pq", [False, True], ids=["x25519", "pq"])
def test_rotation_keeps_history(
    store: Keystore, clock: Clock, passphrase: str | None, pq: bool
) -> None:
    t0 = clock.now
    first = store.create("a", passphrase=passphrase, pq=pq)
    old_signature = first.signing.sign(b"signed before rotation")
    record_key = generate_record_key()
    old_wrapped = wrap_key(first.encryption.public, record_key, b"rec-1/v1")

    clock.now = t0 + 100
    second = store.rotate("a", passphrase=passphrase)
    clock.now = t0 + 250
    third = store.rotate("a", passphrase=passphrase)

    assert second.key_id != first.key_id != third.key_id
    assert third.encryption.key_id not in (first.encryption.key_id, second.encryption.key_id)
    assert third.created == t0
    assert third.activated == t0 + 250
    assert [(h.activated, h.retired) for h in third.history] == [
        (t0, t0 + 100),
        (t0 + 100, t0 + 250),
    ]
    assert [h.signing for h in third.history] == [first.signing.public, second.signing.public]
    assert third.public_keys() == [
        first.signing.public,
        second.signing.public,
        third.signing.public,
    ]
    if pq:
        assert first.pq_encryption is not None and third.pq_encryption is not None
        assert third.history[0].pq_encryption == first.pq_encryption.public
        assert len(third.encryption_public_keys()) == 6
    else:
        assert third.pq_encryption is None
        assert third.history[0].pq_encryption is None
        assert len(third.encryption_public_keys()) == 3

    loaded = store.load("a", passphrase=passphrase)
    assert loaded.signing.seed() == third.signing.seed()
    assert loaded.public_keys() == third.public_keys()
    assert loaded.history == third.history
    # old signatures stay verifiable with the old public key from history
    old_key = loaded.verify_key(first.key_id)
    old_key.verify(old_signature, b"signed before rotation")
    assert not loaded.signing.public.is_valid(old_signature, b"signed before rotation")
    # record keys wrapped to a retired encryption key can still be unwrapped
    retired = loaded.decryption_key(first.encryption.key_id)
    assert unwrap_key(retired, old_wrapped, b"rec-1/v1") == record_key
    # the file keeps its protection
    protection = _doc(store, "a")["secret"]["protection"]
    assert protection == ("none" if passphrase is None else "scrypt-aes-256-gcm")


def test_rotation_with_wrong_passphrase_changes_nothing(store: Keystore) -> None:
    store.create("a", passphrase=PASSPHRASE)
    before = (store.path / "a.json").read_bytes()
    with pytest.raises(KeystoreError, match=WRONG_PASSPHRASE):
        store.rotate("a", passphrase="nope")
    assert (store.path / "a.json").read_bytes() == before


def test_lookup_of_unknown_key_ids(store: Keystore) -> None:
    identity = store.create("a")
    with pytest.raises(KeystoreError, match="no signing key"):
        identity.verify_key(b"\x00" * 16)
    with pytest.raises(KeystoreError, match="no encryption key"):
        identity.decryption_key(b"\x00" * 16)
    assert identity.decryption_key(identity.encryption.key_id) is identity.encryption


# --------------------------------------------------------------------- public export


@pytest.mark.parametrize("pq", [False, True], ids=["x25519", "pq"])
def test_public_record(store: Keystore, clock: Clock, pq: bool) -> None:
    store.create("a", passphrase=PASSPHRASE, pq=pq)
    clock.now += 60
    identity = store.rotate("a", passphrase=PASSPHRASE)
    record = identity.public_record()
    text = json.dumps(record)  # JSON-serialisable
    assert json.loads(text) == record
    assert record["format"] == FORMAT_VERSION
    assert record["name"] == "a"
    assert record["signing"] == {
        "alg": "ed25519",
        "key_id": identity.key_id.hex(),
        "public_key": base64.b64encode(identity.signing.public.raw).decode(),
    }
    algs = [e["alg"] for e in record["encryption"]]
    assert algs == (["x25519", "mlkem768-x25519"] if pq else ["x25519"])
    assert record["encryption"][0]["key_id"] == identity.encryption.key_id.hex()
    assert len(record["history"]) == 1
    assert record["history"][0]["signing"]["key_id"] == identity.history[0].signing.key_id.hex()
    assert record["history"][0]["retired"] == clock.now
    for secret in _private_material(identity):
        for encoded in _encodings(secret):
            assert encoded.decode("ascii", "replace") not in text
