"""The key of a SMART Backend Services client: EC P-384, signing ES384 client assertions.

A client (a hospital system, an app acting for a patient) keeps its private key;
the server only ever sees the public JWK it registered and the short-lived
``private_key_jwt`` assertions signed with it (SMART App Launch 2.x, Backend
Services: ``iss`` = ``sub`` = the client id, ``aud`` = the token endpoint, ``exp``
at most five minutes ahead, a fresh ``jti``).
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from medledger.errors import KeystoreError

__all__ = ["MAX_ASSERTION_SECONDS", "ClientKey"]

#: the longest lifetime of a client assertion the SMART specification allows
MAX_ASSERTION_SECONDS = 300


class ClientKey:
    """An EC P-384 private key with its key id (``kid``), for ES384 client assertions."""

    __slots__ = ("_key", "kid")

    def __init__(self, key: ec.EllipticCurvePrivateKey, kid: str) -> None:
        if key.curve.name != "secp384r1":
            raise KeystoreError("a client key is an EC P-384 key (ES384)")
        self._key = key
        self.kid = kid

    @classmethod
    def generate(cls, kid: str | None = None) -> ClientKey:
        return cls(ec.generate_private_key(ec.SECP384R1()), kid or secrets.token_hex(8))

    @classmethod
    def from_pem(cls, pem: bytes | str, kid: str) -> ClientKey:
        """An unencrypted PEM private key (PKCS#8 or SEC1); :class:`KeystoreError` if not."""
        data = pem.encode() if isinstance(pem, str) else pem
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeystoreError(f"not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KeystoreError("a client key is an EC P-384 key (ES384)")
        return cls(key, kid)

    @classmethod
    def load(cls, path: str | Path, kid: str) -> ClientKey:
        try:
            return cls.from_pem(Path(path).read_bytes(), kid)
        except OSError as exc:
            raise KeystoreError(f"cannot read the client key {path}: {exc}") from None

    def pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (write it with mode 0600)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_jwk(self) -> dict[str, Any]:
        """The public JWK to register (``kid``, ``alg`` ES384, ``use`` sig)."""
        jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(self._key.public_key()))
        jwk.update({"kid": self.kid, "alg": "ES384", "use": "sig"})
        return jwk

    def assertion(
        self,
        client_id: str,
        token_url: str,
        *,
        lifetime: int = 240,
        now: int | None = None,
        jti: str | None = None,
    ) -> str:
        """A signed client assertion for ``token_url``.

        ``now`` (Unix seconds) and ``jti`` (default: a fresh UUID) are for tests and
        demonstrations, e.g. showing that a replayed assertion is refused.
        """
        if not 1 <= lifetime <= MAX_ASSERTION_SECONDS:
            raise ValueError(f"an assertion lives 1..{MAX_ASSERTION_SECONDS} s")
        issued = int(time.time()) if now is None else now
        claims = {
            "iss": client_id,
            "sub": client_id,
            "aud": token_url,
            "iat": issued,
            "exp": issued + lifetime,
            "jti": jti or str(uuid.uuid4()),
        }
        return jwt.encode(claims, self._key, algorithm="ES384", headers={"kid": self.kid})

    def __repr__(self) -> str:
        return f"ClientKey(kid={self.kid!r})"
