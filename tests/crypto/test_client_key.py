"""ClientKey: the EC P-384 key of a SMART Backend Services client."""

from __future__ import annotations

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm

from medledger.crypto.client_key import MAX_ASSERTION_SECONDS, ClientKey
from medledger.errors import KeystoreError


def test_pem_round_trip_jwk_and_assertion() -> None:
    key = ClientKey.generate("k1")
    again = ClientKey.from_pem(key.pem(), "k1")
    jwk = key.public_jwk()
    assert jwk == again.public_jwk()
    assert (jwk["kty"], jwk["crv"], jwk["kid"], jwk["alg"], jwk["use"]) == (
        "EC",
        "P-384",
        "k1",
        "ES384",
        "sig",
    )
    assert "d" not in jwk  # public only
    token = again.assertion("client-1", "https://h/auth/token", lifetime=120, now=1_000)
    assert jwt.get_unverified_header(token) == {"alg": "ES384", "kid": "k1", "typ": "JWT"}
    public = ECAlgorithm.from_jwk(jwk)
    claims = jwt.decode(
        token,
        public,  # type: ignore[arg-type]
        algorithms=["ES384"],
        audience="https://h/auth/token",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims["iss"] == claims["sub"] == "client-1"
    assert (claims["iat"], claims["exp"]) == (1_000, 1_120) and claims["jti"]
    other = key.assertion("client-1", "https://h/auth/token")
    assert jwt.decode(other, options={"verify_signature": False})["jti"] != claims["jti"]


def test_bad_keys_and_lifetimes_are_refused() -> None:
    with pytest.raises(KeystoreError):
        ClientKey.from_pem(b"not a key", "k")
    p256 = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(KeystoreError):
        ClientKey(p256, "k")
    ed = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(KeystoreError):
        ClientKey.from_pem(ed, "k")
    with pytest.raises(KeystoreError):
        ClientKey.load("/nonexistent/key.pem", "k")
    key = ClientKey.generate()
    for lifetime in (0, MAX_ASSERTION_SECONDS + 1):
        with pytest.raises(ValueError):
            key.assertion("c", "https://h/token", lifetime=lifetime)
