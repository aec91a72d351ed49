"""HPKE encryption identities and key wrapping (medledger.crypto.kem)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519
from hypothesis import given, settings
from hypothesis import strategies as st

from medledger.crypto.aead import generate_record_key
from medledger.crypto.kem import (
    WRAP_VERSION,
    EncryptionKey,
    EncryptionPublicKey,
    unwrap_key,
    wrap_key,
)
from medledger.crypto.signing import ALG_ED25519, ALG_MLKEM768_X25519, ALG_X25519, key_id
from medledger.encoding import encode
from medledger.errors import CryptoError, DecryptionError

ALGS = [ALG_X25519, ALG_MLKEM768_X25519]
ALG_IDS = ["x25519", "mlkem768-x25519"]
SIZES = {  # alg: (private, public, enc)
    ALG_X25519: (32, 32, 32),
    ALG_MLKEM768_X25519: (96, 1216, 1120),
}
HEADER = 2 + 16
TAG = 16
INFO = b"record rec-1 version 3"
OPAQUE = str(DecryptionError())

# One key per suite for the whole module: ML-KEM key generation is cheap, but
# there is no need to repeat it in every test.
KEYS = {alg: EncryptionKey.generate(alg) for alg in ALGS}


def _assert_opaque(excinfo: pytest.ExceptionInfo[DecryptionError]) -> None:
    exc = excinfo.value
    assert type(exc) is DecryptionError
    assert str(exc) == OPAQUE
    assert exc.__cause__ is None
    assert exc.__context__ is None


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS)
def test_key_sizes_and_serialisation(alg: int) -> None:
    key = KEYS[alg]
    private, public, _ = SIZES[alg]
    assert key.alg == alg
    assert len(key.private_bytes()) == private
    assert len(key.public.raw) == public
    assert key.public.alg == alg
    assert key.public.key_id == key_id(alg, key.public.raw)
    assert key.key_id == key.public.key_id
    again = EncryptionKey.from_bytes(alg, key.private_bytes())
    assert again.public == key.public
    assert EncryptionPublicKey.from_bytes(alg, key.public.raw) == key.public
    assert hash(EncryptionPublicKey.from_bytes(alg, key.public.raw)) == hash(key.public)
    assert key.private_bytes().hex() not in repr(key)


def test_key_id_differs_between_suites_for_same_x25519_half() -> None:
    pq = KEYS[ALG_MLKEM768_X25519]
    x_half = EncryptionKey.from_bytes(ALG_X25519, pq.private_bytes()[64:])
    assert pq.public.raw[1184:] == x_half.public.raw
    assert pq.key_id != x_half.key_id


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS)
def test_round_trip_and_layout(alg: int) -> None:
    key = KEYS[alg]
    record_key = generate_record_key()
    wrapped = wrap_key(key.public, record_key, INFO)
    _, _, enc = SIZES[alg]
    assert len(wrapped) == HEADER + enc + len(record_key) + TAG
    assert wrapped[0] == WRAP_VERSION
    assert wrapped[1] == alg
    assert wrapped[2:18] == key.key_id
    assert unwrap_key(key, wrapped, INFO) == record_key
    # Wrapping is randomised (fresh ephemeral key / encapsulation every time).
    assert wrap_key(key.public, record_key, INFO) != wrapped


def test_x25519_wrap_is_standard_hpke_base_mode() -> None:
    """The body after the header is plain RFC 9180 single-shot Seal output."""
    key = KEYS[ALG_X25519]
    record_key = generate_record_key()
    wrapped = wrap_key(key.public, record_key, INFO)
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    info = encode(["medledger/key-wrap/v1", wrapped[:HEADER], INFO])
    private = x25519.X25519PrivateKey.from_private_bytes(key.private_bytes())
    assert suite.decrypt(wrapped[HEADER:], private, info=info) == record_key


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS)
def test_every_byte_of_wrapped_key_is_authenticated(alg: int) -> None:
    key = KEYS[alg]
    wrapped = wrap_key(key.public, generate_record_key(), INFO)
    # version, alg, key id, every byte of enc, ciphertext and tag
    for i in range(len(wrapped)):
        damaged = bytearray(wrapped)
        damaged[i] ^= 0x01 if i % 2 else 0x80
        with pytest.raises(DecryptionError) as excinfo:
            unwrap_key(key, bytes(damaged), INFO)
        _assert_opaque(excinfo)


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS)
def test_truncated_and_extended_wrapped_key(alg: int) -> None:
    key = KEYS[alg]
    wrapped = wrap_key(key.public, generate_record_key(), INFO)
    for n in range(len(wrapped)):
        with pytest.raises(DecryptionError) as excinfo:
            unwrap_key(key, wrapped[:n], INFO)
        _assert_opaque(excinfo)
    with pytest.raises(DecryptionError) as excinfo:
        unwrap_key(key, wrapped + b"\x00", INFO)
    _assert_opaque(excinfo)


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS)
@pytest.mark.parametrize("info", [b"", b"record rec-1 version 4", INFO + b"\x00", INFO[:-1]])
def test_wrong_info(alg: int, info: bytes) -> None:
    key = KEYS[alg]
    wrapped = wrap_key(key.public, generate_record_key(), INFO)
    with pytest.raises(DecryptionError) as excinfo:
        unwrap_key(key, wrapped, info)
    _assert_opaque(excinfo)


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS)
def test_wrong_recipient_same_suite(alg: int) -> None:
    wrapped = wrap_key(KEYS[alg].public, generate_record_key(), INFO)
    with pytest.raises(DecryptionError) as excinfo:
        unwrap_key(EncryptionKey.generate(alg), wrapped, INFO)
    _assert_opaque(excinfo)


def test_wrong_recipient_other_suite() -> None:
    x = KEYS[ALG_X25519]
    pq = KEYS[ALG_MLKEM768_X25519]
    for sender, receiver in [(x, pq), (pq, x)]:
        wrapped = wrap_key(sender.public, generate_record_key(), INFO)
        with pytest.raises(DecryptionError) as excinfo:
            unwrap_key(receiver, wrapped, INFO)
        _assert_opaque(excinfo)


def test_header_rewritten_to_other_recipient_is_rejected() -> None:
    """Pointing a blob at another key (even with a matching id) fails: the header is bound."""
    alice = KEYS[ALG_X25519]
    bob = EncryptionKey.generate(ALG_X25519)
    wrapped = wrap_key(alice.public, generate_record_key(), INFO)
    forged = wrapped[:2] + bob.key_id + wrapped[HEADER:]
    with pytest.raises(DecryptionError) as excinfo:
        unwrap_key(bob, forged, INFO)
    _assert_opaque(excinfo)


@pytest.mark.parametrize("wrapped", [None, "text", 7])
def test_non_bytes_wrapped(wrapped: object) -> None:
    with pytest.raises(DecryptionError) as excinfo:
        unwrap_key(KEYS[ALG_X25519], wrapped, INFO)  # type: ignore[arg-type]
    _assert_opaque(excinfo)


def test_unsupported_algorithms() -> None:
    for alg in (ALG_ED25519, 0, 4, 255, True):
        with pytest.raises(CryptoError):
            EncryptionKey.generate(alg)
        with pytest.raises(CryptoError):
            EncryptionPublicKey.from_bytes(alg, bytes(32))


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS)
def test_wrong_key_sizes(alg: int) -> None:
    private, public, _ = SIZES[alg]
    for n in (0, private - 1, private + 1):
        with pytest.raises(CryptoError):
            EncryptionKey.from_bytes(alg, bytes(n))
    for n in (0, public - 1, public + 1):
        with pytest.raises(CryptoError):
            EncryptionPublicKey.from_bytes(alg, bytes(n))


def test_low_order_x25519_public_key_cannot_be_wrapped_to() -> None:
    zero = EncryptionPublicKey.from_bytes(ALG_X25519, bytes(32))
    with pytest.raises(CryptoError) as excinfo:
        wrap_key(zero, generate_record_key(), INFO)
    assert not isinstance(excinfo.value, DecryptionError)


def test_wrap_rejects_bad_arguments() -> None:
    public = KEYS[ALG_X25519].public
    with pytest.raises(CryptoError):
        wrap_key(public, b"", INFO)
    with pytest.raises(CryptoError):
        wrap_key(public, "key", INFO)  # type: ignore[arg-type]
    with pytest.raises(CryptoError):
        wrap_key(public, b"k", "info")  # type: ignore[arg-type]
    with pytest.raises(CryptoError):
        wrap_key(KEYS[ALG_X25519], b"k", INFO)  # type: ignore[arg-type]


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS)
@settings(max_examples=25, deadline=None)
@given(secret=st.binary(min_size=1, max_size=128), info=st.binary(max_size=128))
def test_round_trip_property(alg: int, secret: bytes, info: bytes) -> None:
    key = KEYS[alg]
    assert unwrap_key(key, wrap_key(key.public, secret, info), info) == secret


@settings(max_examples=50, deadline=None)
@given(info=st.binary(max_size=64), other=st.binary(max_size=64))
def test_info_binding_property(info: bytes, other: bytes) -> None:
    key = KEYS[ALG_X25519]
    wrapped = wrap_key(key.public, b"k" * 32, info)
    if info == other:
        assert unwrap_key(key, wrapped, other) == b"k" * 32
    else:
        with pytest.raises(DecryptionError):
            unwrap_key(key, wrapped, other)
