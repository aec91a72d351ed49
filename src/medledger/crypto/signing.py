"""Ed25519 signing identities with stable key ids.

A key id is the first 16 bytes of SHA-256("medledger/key-id/v1" || alg || public
key), where ``alg`` is one byte naming the algorithm (0x01 Ed25519, 0x02 X25519,
0x03 ML-KEM-768+X25519). It is stable for the lifetime of the key and is what
transactions name as their signer.

Signing uses pyca/cryptography (OpenSSL). Verification uses libsodium through
PyNaCl (also a PyCA project): it checks the same RFC 8032 equation about 1.7x
faster, which matters because every node verifies every transaction, and its
rules are the strict ones: a public key must be a canonical encoding of a point
of the prime-order subgroup that is not of small order (checked when a
:class:`VerifyKey` is made, so such a key can never be registered), ``S`` must be
canonical and ``R`` must not be of small order. OpenSSL accepts some signatures
under small-order keys or with small-order ``R`` that only the key's own
(adversarial) creator can make; medledger refuses them, on every node alike,
since this module is the only place a signature is verified.
"""

from __future__ import annotations

import nacl.bindings
import nacl.exceptions
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from medledger.crypto.hashing import sha256
from medledger.errors import CryptoError, InvalidSignature

__all__ = [
    "ALG_ED25519",
    "ALG_MLKEM768_X25519",
    "ALG_X25519",
    "KEY_ID_SIZE",
    "SigningKey",
    "VerifyKey",
    "key_id",
]

ALG_ED25519 = 0x01
ALG_X25519 = 0x02
ALG_MLKEM768_X25519 = 0x03
KEY_ID_SIZE = 16
_KID_DOMAIN = b"medledger/key-id/v1"


#: raw public keys already checked (the subgroup check costs about as much as a
#: verification): raw key -> key id; public data, bounded
_CHECKED: dict[bytes, bytes] = {}
_CHECKED_LIMIT = 100_000


def key_id(alg: int, public_bytes: bytes) -> bytes:
    """The stable 16-byte id of a public key."""
    return sha256(_KID_DOMAIN, bytes([alg]), public_bytes)[:KEY_ID_SIZE]


class VerifyKey:
    """An Ed25519 public key."""

    __slots__ = ("key_id", "raw")

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != 32:
            raise CryptoError("an Ed25519 public key is 32 bytes")
        self.raw = bytes(raw)
        kid = _CHECKED.get(self.raw)
        if kid is None:
            # canonical, on the curve, in the prime-order subgroup, not of small order
            if not nacl.bindings.crypto_core_ed25519_is_valid_point(self.raw):
                raise CryptoError("invalid Ed25519 public key")
            kid = key_id(ALG_ED25519, self.raw)
            if len(_CHECKED) >= _CHECKED_LIMIT:
                _CHECKED.clear()
            _CHECKED[self.raw] = kid
        self.key_id = kid

    def verify(self, signature: bytes, message: bytes) -> None:
        """Raise :class:`InvalidSignature` unless ``signature`` signs ``message``."""
        if len(signature) != 64:
            raise InvalidSignature("an Ed25519 signature is 64 bytes")
        try:
            nacl.bindings.crypto_sign_open(bytes(signature) + bytes(message), self.raw)
        except nacl.exceptions.BadSignatureError:
            raise InvalidSignature() from None

    def is_valid(self, signature: bytes, message: bytes) -> bool:
        try:
            self.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"VerifyKey({self.key_id.hex()})"


class SigningKey:
    """An Ed25519 private key."""

    __slots__ = ("_key", "public")

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self._key = key
        self.public = VerifyKey(
            key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        )

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        if len(seed) != 32:
            raise CryptoError("an Ed25519 seed is 32 bytes")
        return cls(ed25519.Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def key_id(self) -> bytes:
        return self.public.key_id

    def seed(self) -> bytes:
        """The 32-byte private seed (handle with care)."""
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"SigningKey({self.key_id.hex()})"
