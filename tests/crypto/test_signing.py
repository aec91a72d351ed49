"""Ed25519 signing keys and key ids (medledger.crypto.signing).

Checked-in vectors live in ``vectors/ed25519.json``: RFC 8032 section 7.1 tests 1-3
plus seeds computed once and pinned, and damaged copies that must be rejected.
An empty or missing vector file fails the suite instead of running nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medledger.crypto.signing import (
    ALG_ED25519,
    ALG_MLKEM768_X25519,
    ALG_X25519,
    KEY_ID_SIZE,
    SigningKey,
    VerifyKey,
    key_id,
)
from medledger.errors import CryptoError, InvalidSignature

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "ed25519.json").read_text(encoding="utf-8")
)
VALID: list[dict[str, str]] = VECTORS["valid"]
INVALID: list[dict[str, str]] = VECTORS["invalid"]


def _ids(items: list[dict[str, str]]) -> list[str]:
    return [item["name"] for item in items]


def test_vector_file_is_not_empty() -> None:
    assert len(VALID) >= 5
    assert len(INVALID) >= 40
    assert {v["name"] for v in VALID} >= {"rfc8032-test-1", "rfc8032-test-2", "rfc8032-test-3"}


@pytest.mark.parametrize("vector", VALID, ids=_ids(VALID))
def test_valid_vector(vector: dict[str, str]) -> None:
    seed = bytes.fromhex(vector["seed"])
    message = bytes.fromhex(vector["message"])
    signature = bytes.fromhex(vector["signature"])
    key = SigningKey.from_seed(seed)
    assert key.seed() == seed
    assert key.public.raw.hex() == vector["public_key"]
    assert key.sign(message).hex() == vector["signature"]  # Ed25519 is deterministic
    assert key.key_id.hex() == vector["key_id"]
    assert key.public.key_id.hex() == vector["key_id"]
    verify = VerifyKey(bytes.fromhex(vector["public_key"]))
    verify.verify(signature, message)
    assert verify.is_valid(signature, message)


@pytest.mark.parametrize("vector", VALID, ids=_ids(VALID))
def test_key_id_matches_spelled_out_formula(vector: dict[str, str]) -> None:
    public = bytes.fromhex(vector["public_key"])
    expected = hashlib.sha256(b"medledger/key-id/v1" + b"\x01" + public).digest()[:16]
    assert key_id(ALG_ED25519, public) == expected
    assert expected.hex() == vector["key_id"]


@pytest.mark.parametrize("vector", INVALID, ids=_ids(INVALID))
def test_invalid_vector_is_rejected(vector: dict[str, str]) -> None:
    error = vector["error"]
    if error == "bad-seed":
        with pytest.raises(CryptoError):
            SigningKey.from_seed(bytes.fromhex(vector["seed"]))
        return
    public = bytes.fromhex(vector["public_key"])
    signature = bytes.fromhex(vector["signature"])
    message = bytes.fromhex(vector["message"])
    if error == "bad-public-key":
        with pytest.raises(CryptoError) as info:
            VerifyKey(public)
        assert not isinstance(info.value, InvalidSignature)
        return
    expected: type[Exception] = InvalidSignature if error == "invalid-signature" else CryptoError
    with pytest.raises(expected):
        VerifyKey(public).verify(signature, message)
    if error == "invalid-signature":
        assert not VerifyKey(public).is_valid(signature, message)


def test_key_id_pinned_vector() -> None:
    # Computed once (seed = bytes 0..31) and pinned; any change to the key-id
    # derivation or to the Ed25519 key derivation breaks this test.
    key = SigningKey.from_seed(bytes(range(32)))
    assert key.public.raw.hex() == (
        "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
    )
    assert key.key_id.hex() == "415ba36542ab329e76cee5fbc4f5904b"
    assert len(key.key_id) == KEY_ID_SIZE


def test_key_id_depends_on_algorithm() -> None:
    public = bytes(range(32))
    ids = {key_id(alg, public) for alg in (ALG_ED25519, ALG_X25519, ALG_MLKEM768_X25519)}
    assert len(ids) == 3


def test_key_id_is_stable_across_instances() -> None:
    key = SigningKey.generate()
    again = SigningKey.from_seed(key.seed())
    assert again.key_id == key.key_id
    assert VerifyKey(key.public.raw).key_id == key.key_id
    assert VerifyKey(key.public.raw) == key.public
    assert hash(VerifyKey(key.public.raw)) == hash(key.public)


def test_sign_verify_round_trip() -> None:
    key = SigningKey.generate()
    signature = key.sign(b"hello")
    assert len(signature) == 64
    key.public.verify(signature, b"hello")
    with pytest.raises(InvalidSignature):
        key.public.verify(signature, b"hello!")
    with pytest.raises(InvalidSignature):
        SigningKey.generate().public.verify(signature, b"hello")


def test_every_bit_flip_of_signature_is_rejected() -> None:
    key = SigningKey.from_seed(bytes(range(32)))
    message = b"medledger"
    signature = key.sign(message)
    for i in range(len(signature) * 8):
        damaged = bytearray(signature)
        damaged[i // 8] ^= 1 << (i % 8)
        assert not key.public.is_valid(bytes(damaged), message), i


@pytest.mark.parametrize("length", [0, 1, 31, 33, 64])
def test_wrong_length_public_key(length: int) -> None:
    with pytest.raises(CryptoError):
        VerifyKey(bytes(length))


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_wrong_length_seed(length: int) -> None:
    with pytest.raises(CryptoError):
        SigningKey.from_seed(bytes(length))


@pytest.mark.parametrize("length", [0, 63, 65, 128])
def test_wrong_length_signature(length: int) -> None:
    key = SigningKey.generate()
    with pytest.raises(InvalidSignature):
        key.public.verify(bytes(length), b"m")


def test_repr_shows_no_private_material() -> None:
    key = SigningKey.from_seed(bytes(range(32)))
    assert key.seed().hex() not in repr(key)
    assert key.key_id.hex() in repr(key)


@settings(max_examples=50, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32), message=st.binary(max_size=512))
def test_sign_verify_property(seed: bytes, message: bytes) -> None:
    key = SigningKey.from_seed(seed)
    signature = key.sign(message)
    assert signature == key.sign(message)
    assert key.public.is_valid(signature, message)
    assert not key.public.is_valid(signature, message + b"\x00")


# -- verification rules: libsodium's strict checks against pyca/OpenSSL's -------------------
# Small-order points: the identity (y = 1) and the point of order 2 (y = -1).
_IDENTITY = bytes([1]) + bytes(31)
_ORDER_2 = bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")


@pytest.mark.parametrize("point", [_IDENTITY, _ORDER_2], ids=["identity", "order-2"])
def test_small_order_public_key_is_refused(point: bytes) -> None:
    with pytest.raises(CryptoError):
        VerifyKey(point)


def test_signature_openssl_accepts_under_a_small_order_key_is_refused() -> None:
    # R = identity, S = 0: [S]B == R + [k]A holds for A = identity, whatever the
    # message. OpenSSL (pyca) accepts this "signature"; medledger's verifier refuses
    # the key, and the signature check alone (if the key were forced in) as well.
    from cryptography.hazmat.primitives.asymmetric import ed25519 as pyca_ed25519

    forged = _IDENTITY + bytes(32)
    pyca_ed25519.Ed25519PublicKey.from_public_bytes(_IDENTITY).verify(forged, b"any message")
    with pytest.raises(CryptoError):
        VerifyKey(_IDENTITY)
    import nacl.bindings
    import nacl.exceptions

    with pytest.raises(nacl.exceptions.BadSignatureError):
        nacl.bindings.crypto_sign_open(forged + b"any message", _IDENTITY)


def test_non_canonical_public_key_encoding_is_refused() -> None:
    # y = p + 1 encodes the identity non-canonically (y >= p)
    p_plus_1 = (2**255 - 19 + 1).to_bytes(32, "little")
    with pytest.raises(CryptoError):
        VerifyKey(p_plus_1)


@given(seed=st.binary(min_size=32, max_size=32), message=st.binary(max_size=300))
@settings(max_examples=60, deadline=None)
def test_verifier_agrees_with_pyca_on_honest_and_damaged_signatures(
    seed: bytes, message: bytes
) -> None:
    # The reference: pyca/cryptography (OpenSSL) on the same bytes.
    from cryptography.exceptions import InvalidSignature as PycaInvalid
    from cryptography.hazmat.primitives.asymmetric import ed25519 as pyca_ed25519

    key = SigningKey.from_seed(seed)
    ref = pyca_ed25519.Ed25519PublicKey.from_public_bytes(key.public.raw)
    sig = key.sign(message)
    ref.verify(sig, message)
    assert key.public.is_valid(sig, message)
    damaged = bytearray(sig)
    damaged[len(message) % 64] ^= 0x10
    with pytest.raises(PycaInvalid):
        ref.verify(bytes(damaged), message)
    assert not key.public.is_valid(bytes(damaged), message)
    assert not key.public.is_valid(sig, message + b"\x00")
