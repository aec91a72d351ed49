"""Encryption identities and key wrapping with HPKE (RFC 9180, base mode).

Two suites, named by the algorithm byte of :mod:`medledger.crypto.signing`:

* ``ALG_X25519`` (0x02): DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM.
* ``ALG_MLKEM768_X25519`` (0x03): the hybrid post-quantum KEM ML-KEM-768 +
  X25519 (HPKE KEM ``MLKEM768_X25519``), HKDF-SHA256, AES-256-GCM.

Key encodings (``raw``):

* X25519: private 32 bytes, public 32 bytes.
* ML-KEM-768+X25519: private = ML-KEM-768 seed (64 bytes, ``d || z``) ||
  X25519 private key (32 bytes) = 96 bytes; public = ML-KEM-768 encapsulation
  key (1184 bytes) || X25519 public key (32 bytes) = 1216 bytes. (pyca builds
  the hybrid key from its two components, so the components are what we keep.)

Wrapped-key format (self-describing, version 1)::

    version (0x01) || alg (1 byte) || recipient key id (16 bytes) || enc || ct

where ``enc || ct`` is the output of HPKE single-shot ``Seal`` (``enc`` is
32 bytes for X25519 and 1120 bytes for the hybrid; ``ct`` is the wrapped key
plus a 16-byte tag). The HPKE ``info`` is the canonical CBOR of
``["medledger/key-wrap/v1", header, info]``, so the header (version, alg,
recipient key id) and the caller's context ``info`` (record id / version, ...)
are both bound into the key schedule: changing any of them makes unwrapping fail.

:func:`unwrap_key` raises one opaque :class:`~medledger.errors.DecryptionError`
(same message, nothing chained) for every failure, including a blob addressed
to another key or algorithm.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from medledger.crypto.signing import ALG_MLKEM768_X25519, ALG_X25519, key_id
from medledger.encoding import encode
from medledger.errors import CryptoError, DecryptionError

__all__ = [
    "ENCRYPTION_ALGS",
    "ENC_PUBLIC_SIZES",
    "WRAP_VERSION",
    "EncryptionKey",
    "EncryptionPublicKey",
    "unwrap_key",
    "wrap_key",
]

WRAP_VERSION = 0x01
_WRAP_INFO_DOMAIN = "medledger/key-wrap/v1"
_TAG_SIZE = 16
_X25519_SIZE = 32
_MLKEM768_SEED_SIZE = 64
_MLKEM768_PUBLIC_SIZE = 1184

#: Algorithm byte -> human-readable name.
ENCRYPTION_ALGS: dict[int, str] = {
    ALG_X25519: "x25519",
    ALG_MLKEM768_X25519: "mlkem768-x25519",
}

_SUITES: dict[int, hpke.Suite] = {
    ALG_X25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    ALG_MLKEM768_X25519: hpke.Suite(
        hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM
    ),
}
_ENC_SIZES: dict[int, int] = {
    ALG_X25519: hpke.KEM.X25519.enc_length(),
    ALG_MLKEM768_X25519: hpke.KEM.MLKEM768_X25519.enc_length(),
}
_PRIVATE_SIZES: dict[int, int] = {
    ALG_X25519: _X25519_SIZE,
    ALG_MLKEM768_X25519: _MLKEM768_SEED_SIZE + _X25519_SIZE,
}
_PUBLIC_SIZES: dict[int, int] = {
    ALG_X25519: _X25519_SIZE,
    ALG_MLKEM768_X25519: _MLKEM768_PUBLIC_SIZE + _X25519_SIZE,
}

_PublicHandle = x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey
_PrivateHandle = x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey


def _check_alg(alg: object) -> int:
    if isinstance(alg, bool) or not isinstance(alg, int) or alg not in ENCRYPTION_ALGS:
        raise CryptoError(f"unsupported encryption algorithm {alg!r}")
    return alg


def _check_raw(alg: int, raw: object, sizes: dict[int, int], what: str) -> bytes:
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != sizes[alg]:
        raise CryptoError(f"a {ENCRYPTION_ALGS[alg]} {what} key is {sizes[alg]} bytes")
    return bytes(raw)


class EncryptionPublicKey:
    """A public encryption key: what senders wrap record keys to."""

    __slots__ = ("_key", "alg", "key_id", "raw")

    def __init__(self, alg: int, raw: bytes) -> None:
        self.alg = _check_alg(alg)
        self.raw = _check_raw(self.alg, raw, _PUBLIC_SIZES, "public")
        self._key: _PublicHandle
        try:
            if self.alg == ALG_X25519:
                self._key = x25519.X25519PublicKey.from_public_bytes(self.raw)
            else:
                self._key = hpke.MLKEM768X25519PublicKey(
                    mlkem.MLKEM768PublicKey.from_public_bytes(self.raw[:_MLKEM768_PUBLIC_SIZE]),
                    x25519.X25519PublicKey.from_public_bytes(self.raw[_MLKEM768_PUBLIC_SIZE:]),
                )
        except ValueError as exc:
            raise CryptoError(f"invalid {ENCRYPTION_ALGS[self.alg]} public key") from exc
        self.key_id = key_id(self.alg, self.raw)

    @classmethod
    def from_bytes(cls, alg: int, raw: bytes) -> EncryptionPublicKey:
        return cls(alg, raw)

    @property
    def alg_name(self) -> str:
        return ENCRYPTION_ALGS[self.alg]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, EncryptionPublicKey)
            and other.alg == self.alg
            and other.raw == self.raw
        )

    def __hash__(self) -> int:
        return hash((self.alg, self.raw))

    def __repr__(self) -> str:
        return f"EncryptionPublicKey({self.alg_name}, {self.key_id.hex()})"


class EncryptionKey:
    """A private encryption key (X25519 or ML-KEM-768+X25519)."""

    __slots__ = ("_key", "_raw", "alg", "public")

    def __init__(self, alg: int, raw: bytes) -> None:
        """Prefer :meth:`generate` or :meth:`from_bytes`."""
        self.alg = _check_alg(alg)
        self._raw = _check_raw(self.alg, raw, _PRIVATE_SIZES, "private")
        self._key: _PrivateHandle
        try:
            if self.alg == ALG_X25519:
                xk = x25519.X25519PrivateKey.from_private_bytes(self._raw)
                self._key = xk
                public_raw = xk.public_key().public_bytes_raw()
            else:
                mk = mlkem.MLKEM768PrivateKey.from_seed_bytes(self._raw[:_MLKEM768_SEED_SIZE])
                xk = x25519.X25519PrivateKey.from_private_bytes(self._raw[_MLKEM768_SEED_SIZE:])
                self._key = hpke.MLKEM768X25519PrivateKey(mk, xk)
                public_raw = mk.public_key().public_bytes_raw() + xk.public_key().public_bytes_raw()
        except ValueError as exc:
            raise CryptoError(f"invalid {ENCRYPTION_ALGS[self.alg]} private key") from exc
        self.public = EncryptionPublicKey(self.alg, public_raw)

    @classmethod
    def generate(cls, alg: int = ALG_X25519) -> EncryptionKey:
        alg = _check_alg(alg)
        if alg == ALG_X25519:
            raw = x25519.X25519PrivateKey.generate().private_bytes_raw()
        else:
            raw = (
                mlkem.MLKEM768PrivateKey.generate().private_bytes_raw()
                + x25519.X25519PrivateKey.generate().private_bytes_raw()
            )
        return cls(alg, raw)

    @classmethod
    def from_bytes(cls, alg: int, raw: bytes) -> EncryptionKey:
        return cls(alg, raw)

    @property
    def key_id(self) -> bytes:
        return self.public.key_id

    @property
    def alg_name(self) -> str:
        return ENCRYPTION_ALGS[self.alg]

    def private_bytes(self) -> bytes:
        """The raw private key (see the module docstring; handle with care)."""
        return self._raw

    def __repr__(self) -> str:
        return f"EncryptionKey({self.alg_name}, {self.key_id.hex()})"


def _header(alg: int, kid: bytes) -> bytes:
    return bytes([WRAP_VERSION, alg]) + kid


def _hpke_info(header: bytes, info: bytes) -> bytes:
    return encode([_WRAP_INFO_DOMAIN, header, info])


def wrap_key(recipient: EncryptionPublicKey, key: bytes, info: bytes) -> bytes:
    """Encrypt ``key`` (e.g. a record key) to ``recipient``, bound to ``info``.

    Returns ``version || alg || recipient key id || enc || ct``.
    """
    if not isinstance(recipient, EncryptionPublicKey):
        raise CryptoError("recipient must be an EncryptionPublicKey")
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise CryptoError("the key to wrap must be non-empty bytes")
    if not isinstance(info, (bytes, bytearray)):
        raise CryptoError("info must be bytes")
    header = _header(recipient.alg, recipient.key_id)
    suite = _SUITES[recipient.alg]
    try:
        sealed = suite.encrypt(bytes(key), recipient._key, info=_hpke_info(header, bytes(info)))
    except ValueError as exc:  # e.g. a low-order X25519 point
        raise CryptoError("cannot wrap to this public key") from exc
    return header + sealed


def unwrap_key(recipient: EncryptionKey, wrapped: bytes, info: bytes) -> bytes:
    """Recover a key wrapped by :func:`wrap_key` for ``recipient`` and ``info``.

    Raises :class:`DecryptionError` (one message for every cause) if the blob is
    malformed, addressed to another key or algorithm, modified, or if ``info``
    differs from the one it was wrapped with.
    """
    if not isinstance(recipient, EncryptionKey):
        raise CryptoError("recipient must be an EncryptionKey")
    key = _open(recipient, wrapped, info)
    if key is None:
        # Raised outside any ``except`` block: no cause or context to leak.
        raise DecryptionError()
    return key


def _open(recipient: EncryptionKey, wrapped: object, info: object) -> bytes | None:
    if not isinstance(wrapped, (bytes, bytearray, memoryview)) or not isinstance(
        info, (bytes, bytearray, memoryview)
    ):
        return None
    data = bytes(wrapped)
    header = _header(recipient.alg, recipient.key_id)
    enc_size = _ENC_SIZES[recipient.alg]
    if len(data) < len(header) + enc_size + _TAG_SIZE or data[: len(header)] != header:
        return None
    suite = _SUITES[recipient.alg]
    try:
        return suite.decrypt(
            data[len(header) :], recipient._key, info=_hpke_info(header, bytes(info))
        )
    except (InvalidTag, ValueError):
        return None


#: Public key size in bytes of each key-wrapping algorithm.
ENC_PUBLIC_SIZES: dict[int, int] = dict(_PUBLIC_SIZES)
