"""AES-256-GCM record encryption (medledger.crypto.aead)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from medledger.crypto import aead
from medledger.crypto.aead import (
    AEAD_VERSION,
    NONCE_SIZE,
    OVERHEAD,
    TAG_SIZE,
    decrypt,
    encrypt,
    generate_record_key,
    record_aad,
)
from medledger.encoding import decode
from medledger.errors import CryptoError, DecryptionError

AAD = record_aad("rec-1", 3, "patient-42")
OPAQUE = str(DecryptionError())


def _assert_opaque(excinfo: pytest.ExceptionInfo[DecryptionError]) -> None:
    """Every failure is the same class, the same message, and chains nothing."""
    exc = excinfo.value
    assert type(exc) is DecryptionError
    assert str(exc) == OPAQUE
    assert exc.__cause__ is None
    assert exc.__context__ is None


def test_generate_record_key() -> None:
    keys = {generate_record_key() for _ in range(16)}
    assert len(keys) == 16
    assert all(len(k) == 32 for k in keys)


def test_round_trip_and_layout() -> None:
    key = generate_record_key()
    blob = encrypt(key, b"hello, record", AAD)
    assert len(blob) == len(b"hello, record") + OVERHEAD
    assert blob[0] == AEAD_VERSION
    assert decrypt(key, blob, AAD) == b"hello, record"
    # The layout is plain AES-256-GCM with the version byte prefixed to the AAD.
    nonce, sealed = blob[1 : 1 + NONCE_SIZE], blob[1 + NONCE_SIZE :]
    assert AESGCM(key).decrypt(nonce, sealed, bytes([AEAD_VERSION]) + AAD) == b"hello, record"


def test_empty_plaintext() -> None:
    key = generate_record_key()
    blob = encrypt(key, b"", b"")
    assert len(blob) == OVERHEAD
    assert decrypt(key, blob, b"") == b""


def test_nonces_are_fresh() -> None:
    key = generate_record_key()
    blobs = {encrypt(key, b"same", AAD) for _ in range(32)}
    assert len(blobs) == 32


def test_every_byte_of_blob_is_authenticated() -> None:
    key = generate_record_key()
    blob = encrypt(key, b"patient record body", AAD)
    # version byte, every nonce byte, every ciphertext byte, every tag byte
    for i in range(len(blob)):
        for bit in (0, 7):
            damaged = bytearray(blob)
            damaged[i] ^= 1 << bit
            with pytest.raises(DecryptionError) as excinfo:
                decrypt(key, bytes(damaged), AAD)
            _assert_opaque(excinfo)


def test_every_truncation_and_extension_is_rejected() -> None:
    key = generate_record_key()
    blob = encrypt(key, b"abc", AAD)
    for n in range(len(blob)):
        with pytest.raises(DecryptionError) as excinfo:
            decrypt(key, blob[:n], AAD)
        _assert_opaque(excinfo)
    with pytest.raises(DecryptionError) as excinfo:
        decrypt(key, blob + b"\x00", AAD)
    _assert_opaque(excinfo)


def test_unknown_version_is_rejected_even_with_valid_tag() -> None:
    key = generate_record_key()
    nonce = b"\x00" * NONCE_SIZE
    sealed = AESGCM(key).encrypt(nonce, b"x", b"\x02" + AAD)
    with pytest.raises(DecryptionError) as excinfo:
        decrypt(key, b"\x02" + nonce + sealed, AAD)
    _assert_opaque(excinfo)


@pytest.mark.parametrize(
    "aad",
    [
        b"",
        record_aad("rec-1", 4, "patient-42"),
        record_aad("rec-2", 3, "patient-42"),
        record_aad("rec-1", 3, "patient-43"),
        AAD + b"\x00",
        AAD[:-1],
    ],
)
def test_wrong_aad(aad: bytes) -> None:
    key = generate_record_key()
    blob = encrypt(key, b"secret", AAD)
    with pytest.raises(DecryptionError) as excinfo:
        decrypt(key, blob, aad)
    _assert_opaque(excinfo)


def test_wrong_key() -> None:
    blob = encrypt(generate_record_key(), b"secret", AAD)
    with pytest.raises(DecryptionError) as excinfo:
        decrypt(generate_record_key(), blob, AAD)
    _assert_opaque(excinfo)


@pytest.mark.parametrize("blob", [None, "text", 42, [1, 2]])
def test_non_bytes_blob(blob: object) -> None:
    with pytest.raises(DecryptionError) as excinfo:
        decrypt(generate_record_key(), blob, AAD)  # type: ignore[arg-type]
    _assert_opaque(excinfo)


@pytest.mark.parametrize("length", [0, 16, 24, 31, 33])
def test_bad_key_length_is_a_crypto_error(length: int) -> None:
    with pytest.raises(CryptoError) as excinfo:
        encrypt(bytes(length), b"x", b"")
    assert not isinstance(excinfo.value, DecryptionError)
    with pytest.raises(CryptoError):
        decrypt(bytes(length), b"\x01" + bytes(NONCE_SIZE + TAG_SIZE), b"")


def test_record_aad_is_deterministic_canonical_cbor() -> None:
    assert record_aad("rec-1", 3, "patient-42") == AAD
    assert decode(AAD) == ["medledger/record-aad/v1", "rec-1", 3, "patient-42"]
    # pinned bytes: canonical CBOR array of 4 items
    assert AAD.hex() == (
        "84"  # array(4)
        "776d65646c65646765722f7265636f72642d6161642f7631"  # "medledger/record-aad/v1"
        "657265632d31"  # "rec-1"
        "03"  # 3
        "6a70617469656e742d3432"  # "patient-42"
    )


@pytest.mark.parametrize(
    "args",
    [(1, 1, "p"), ("r", -1, "p"), ("r", True, "p"), ("r", 1, None), ("r", 1.0, "p")],
)
def test_record_aad_rejects_bad_types(args: tuple[object, object, object]) -> None:
    with pytest.raises(CryptoError):
        record_aad(*args)  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(
    a=st.tuples(st.text(max_size=20), st.integers(0, 2**64 - 1), st.text(max_size=20)),
    b=st.tuples(st.text(max_size=20), st.integers(0, 2**64 - 1), st.text(max_size=20)),
)
def test_record_aad_is_injective(a: tuple[str, int, str], b: tuple[str, int, str]) -> None:
    assert (record_aad(*a) == record_aad(*b)) == (a == b)


@settings(max_examples=100, deadline=None)
@given(plaintext=st.binary(max_size=4096), aad=st.binary(max_size=256))
def test_round_trip_property(plaintext: bytes, aad: bytes) -> None:
    key = generate_record_key()
    blob = encrypt(key, plaintext, aad)
    assert len(blob) == len(plaintext) + OVERHEAD
    assert decrypt(key, blob, aad) == plaintext


@settings(max_examples=100, deadline=None)
@given(
    plaintext=st.binary(max_size=64),
    position=st.integers(min_value=0),
    mask=st.integers(min_value=1, max_value=255),
)
def test_any_corruption_property(plaintext: bytes, position: int, mask: int) -> None:
    key = generate_record_key()
    blob = bytearray(encrypt(key, plaintext, AAD))
    blob[position % len(blob)] ^= mask
    with pytest.raises(DecryptionError) as excinfo:
        decrypt(key, bytes(blob), AAD)
    _assert_opaque(excinfo)


def test_module_exports() -> None:
    assert set(aead.__all__) >= {"encrypt", "decrypt", "generate_record_key", "record_aad"}
