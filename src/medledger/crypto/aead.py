"""Record encryption with AES-256-GCM.

Every record version is encrypted under its own fresh 256-bit *record key*
(:func:`generate_record_key`); the record key is then wrapped for each reader
with :func:`medledger.crypto.kem.wrap_key`. Because a record key encrypts only
a handful of messages, 96-bit random nonces are far from their collision bound.

Blob format (self-describing, version 1)::

    version (1 byte, 0x01) || nonce (12 bytes) || ciphertext || tag (16 bytes)

The version byte is authenticated too: the GCM associated data is
``version || aad``. Build ``aad`` with :func:`record_aad` so that a ciphertext
cannot be moved to another record, version or patient.

Like pyca's ``Fernet``, :func:`decrypt` raises one opaque
:class:`~medledger.errors.DecryptionError` (always the same message, no cause
chained) for every failure: wrong length, unknown version, wrong key, modified
ciphertext or tag, wrong associated data.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medledger.encoding import encode
from medledger.errors import CryptoError, DecryptionError

__all__ = [
    "AEAD_VERSION",
    "KEY_SIZE",
    "NONCE_SIZE",
    "OVERHEAD",
    "TAG_SIZE",
    "decrypt",
    "encrypt",
    "generate_record_key",
    "record_aad",
]

AEAD_VERSION = 0x01
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
_HEADER = bytes([AEAD_VERSION])
#: Bytes a blob adds to its plaintext.
OVERHEAD = len(_HEADER) + NONCE_SIZE + TAG_SIZE
_RECORD_AAD_DOMAIN = "medledger/record-aad/v1"


def generate_record_key() -> bytes:
    """A fresh random 32-byte AES-256-GCM key."""
    return os.urandom(KEY_SIZE)


def _cipher(key: bytes) -> AESGCM:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_SIZE:
        raise CryptoError("an AES-256-GCM record key is 32 bytes")
    return AESGCM(bytes(key))


def _check_bytes(name: str, value: object) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise CryptoError(f"{name} must be bytes, not {type(value).__name__}")
    return bytes(value)


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt ``plaintext`` under ``key``, authenticating ``aad``.

    Returns ``version || nonce || ciphertext || tag``. Raises
    :class:`CryptoError` for a key that is not 32 bytes or non-bytes input.
    """
    cipher = _cipher(key)
    plaintext = _check_bytes("plaintext", plaintext)
    aad = _check_bytes("aad", aad)
    nonce = os.urandom(NONCE_SIZE)
    try:
        sealed = cipher.encrypt(nonce, plaintext, _HEADER + aad)
    except OverflowError as exc:  # pragma: no cover - needs >2 GiB of input
        raise CryptoError("plaintext too large for one AES-GCM message") from exc
    return _HEADER + nonce + sealed


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Decrypt a blob made by :func:`encrypt`.

    Raises :class:`DecryptionError` (one message for every cause) if the blob
    is malformed, of an unknown version, was modified, or if ``key`` or ``aad``
    is not the one it was made with. A key that is not 32 bytes at all is a
    programming error and raises :class:`CryptoError`.
    """
    cipher = _cipher(key)
    plaintext = _open(cipher, blob, aad)
    if plaintext is None:
        # Raised outside any ``except`` block: no cause or context to leak.
        raise DecryptionError()
    return plaintext


def _open(cipher: AESGCM, blob: object, aad: object) -> bytes | None:
    if not isinstance(blob, (bytes, bytearray, memoryview)) or not isinstance(
        aad, (bytes, bytearray, memoryview)
    ):
        return None
    data = bytes(blob)
    if len(data) < OVERHEAD or data[:1] != _HEADER:
        return None
    nonce = data[1 : 1 + NONCE_SIZE]
    try:
        return cipher.decrypt(nonce, data[1 + NONCE_SIZE :], _HEADER + bytes(aad))
    except (InvalidTag, ValueError, OverflowError):
        return None


def record_aad(record_id: str, version: int, patient_id: str) -> bytes:
    """Associated data binding a record ciphertext to its record, version and patient.

    Canonical CBOR of ``["medledger/record-aad/v1", record_id, version,
    patient_id]``: deterministic and injective (distinct inputs never give the
    same bytes).
    """
    if not isinstance(record_id, str) or not isinstance(patient_id, str):
        raise CryptoError("record_id and patient_id must be strings")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise CryptoError("version must be a non-negative integer")
    return encode([_RECORD_AAD_DOMAIN, record_id, version, patient_id])
