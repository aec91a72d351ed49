"""SMART Backend Services authorisation against SQLite and PostgreSQL, with real signed JWTs."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from medledger.api.scopes import parse_scopes
from medledger.api.smart import (
    ASSERTION_TYPE,
    Client,
    SmartAuthority,
    SmartError,
)
from medledger.errors import MedledgerError

TOKEN_URL = "https://ehr.example.org/auth/token"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
T0 = 1_800_000_000.0


class Clock:
    """A settable clock for the authority."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Key:
    alg: str
    kid: str
    private: Any
    jwk: dict[str, Any]


def _make_key(alg: str) -> Key:
    kid = f"{alg.lower()}-{secrets.token_hex(4)}"
    if alg == "RS384":
        priv: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = RSAAlgorithm.to_jwk(priv.public_key(), as_dict=True)
    elif alg == "ES384":
        priv = ec.generate_private_key(ec.SECP384R1())
        jwk = ECAlgorithm.to_jwk(priv.public_key(), as_dict=True)
    elif alg == "EdDSA":
        priv = ed25519.Ed25519PrivateKey.generate()
        jwk = OKPAlgorithm.to_jwk(priv.public_key(), as_dict=True)
    else:  # pragma: no cover
        raise AssertionError(alg)
    assert isinstance(jwk, dict)
    jwk = {**jwk, "kid": kid, "alg": alg, "use": "sig"}
    return Key(alg, kid, priv, jwk)


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    """One key per algorithm (RSA generation is slow, so once per module)."""
    return {alg: _make_key(alg) for alg in ("RS384", "ES384", "EdDSA")}


def jwks(*ks: Key) -> dict[str, Any]:
    return {"keys": [k.jwk for k in ks]}


def assertion(
    client_id: str,
    key: Key,
    now: float,
    *,
    aud: Any = TOKEN_URL,
    lifetime: float = 240,
    jti: Any = ...,
    headers: dict[str, Any] | None = None,
    alg: str | None = None,
    **claims: Any,
) -> str:
    """A Backend Services client assertion, signed the way SMART describes it."""
    body: dict[str, Any] = {
        "iss": client_id,
        "sub": client_id,
        "aud": aud,
        "exp": int(now + lifetime),
        "jti": str(uuid.uuid4()) if jti is ... else jti,
    }
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    head = {"kid": key.kid, "typ": "JWT", **(headers or {})}
    return jwt.encode(body, key.private, algorithm=alg or key.alg, headers=head)


def form(client_assertion: str, scope: str = "system/Observation.rs") -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "scope": scope,
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": client_assertion,
    }


# --------------------------------------------------------------------------- backends


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this module, dropped afterwards."""
    name = f"medledger_smart_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'smart.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def auth(url: str, clock: Clock) -> AsyncIterator[SmartAuthority]:
    a = await SmartAuthority.open(url, token_url=TOKEN_URL, clock=clock)
    try:
        yield a
    finally:
        await a.close()


def query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the store directly (to check what is, and is not, persisted)."""
    if url.startswith("sqlite:"):
        with sqlite3.connect(urlparse(url).path) as db:
            return db.execute(sql, params).fetchall()
    with psycopg.connect(url) as conn:
        return conn.execute(sql.replace("?", "%s"), params).fetchall()


async def refused(coro: Any, status: int, error: str, words: str = "") -> SmartError:
    with pytest.raises(SmartError) as info:
        await coro
    exc = info.value
    assert (exc.status, exc.error) == (status, error), exc.body()
    assert words.lower() in exc.description.lower(), exc.description
    assert exc.body() == {"error": error, "error_description": exc.description}
    assert isinstance(exc, MedledgerError)
    return exc


# --------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize("alg", ["RS384", "ES384", "EdDSA"])
async def test_token_for_each_algorithm(
    auth: SmartAuthority, clock: Clock, keys: dict[str, Key], alg: str
) -> None:
    key = keys[alg]
    client = await auth.register_client(
        org="h1", jwks=jwks(key), scope="system/Observation.rs system/Patient.r"
    )
    resp = await auth.token(form(assertion(client.client_id, key, clock.now)))
    assert resp["token_type"] == "bearer"
    assert resp["expires_in"] == 300
    assert resp["scope"] == "system/Observation.rs"
    token = resp["access_token"]
    assert isinstance(token, str) and len(token) >= 43

    info = await auth.introspect(token)
    assert info.token == token
    assert info.client == client
    assert info.scopes == parse_scopes("system/Observation.rs")
    assert info.scope_text == "system/Observation.rs"
    assert info.expires_at == int(clock.now) + 300
    assert (info.subject_kind, info.subject) == ("system", client.client_id)


async def test_multi_key_jwks_selects_by_kid(
    auth: SmartAuthority, clock: Clock, keys: dict[str, Key]
) -> None:
    ks = keys.values()
    client = await auth.register_client(org="h1", jwks=jwks(*ks), scope="system/*.rs")
    for key in ks:
        resp = await auth.token(form(assertion(client.client_id, key, clock.now)))
        assert resp["scope"] == "system/Observation.rs"


async def test_practitioner_and_patient_clients_carry_their_subject(
    auth: SmartAuthority, clock: Clock, keys: dict[str, Key]
) -> None:
    key = keys["ES384"]
    doc = await auth.register_client(
        org="h2", practitioner="prac-1", jwks=jwks(key), scope="user/*.cruds"
    )
    pat = await auth.register_client(
        org="h2", patient="pat-" + "a" * 32, jwks=jwks(key), scope="patient/*.rs"
    )
    for client, scope, kind, subject in (
        (doc, "user/Observation.rs", "practitioner", "prac-1"),
        (pat, "patient/*.rs", "patient", "pat-" + "a" * 32),
    ):
        resp = await auth.token(form(assertion(client.client_id, key, clock.now), scope))
        info = await auth.introspect(resp["access_token"])
        assert (info.subject_kind, info.subject, info.client.org) == (kind, subject, "h2")
        assert info.scope_text == scope


# --------------------------------------------------------------------------- refusals


async def test_replayed_jti_refused_even_after_reopen(
    url: str, clock: Clock, keys: dict[str, Key]
) -> None:
    key = keys["ES384"]
    a = await SmartAuthority.open(url, token_url=TOKEN_URL, clock=clock)
    try:
        client = await a.register_client(org="h1", jwks=jwks(key), scope="system/*.rs")
        signed = assertion(client.client_id, key, clock.now, jti="once-only")
        await a.token(form(signed))
        clock.now += 5
        await refused(a.token(form(signed)), 401, "invalid_client", "jti")
        # A fresh assertion with the same jti is a replay too.
        again = assertion(client.client_id, key, clock.now, jti="once-only")
        await refused(a.token(form(again)), 401, "invalid_client", "jti")
    finally:
        await a.close()

    b = await SmartAuthority.open(url, token_url=TOKEN_URL, clock=clock)
    try:
        await refused(b.token(form(signed)), 401, "invalid_client", "jti")
        fresh = assertion(client.client_id, key, clock.now)
        assert (await b.token(form(fresh)))["scope"] == "system/Observation.rs"
    finally:
        await b.close()


async def test_jti_is_per_client(auth: SmartAuthority, clock: Clock, keys: dict[str, Key]) -> None:
    key = keys["EdDSA"]
    c1 = await auth.register_client(org="h1", jwks=jwks(key), scope="system/*.rs")
    c2 = await auth.register_client(org="h1", jwks=jwks(key), scope="system/*.rs")
    await auth.token(form(assertion(c1.client_id, key, clock.now, jti="shared")))
    await auth.token(form(assertion(c2.client_id, key, clock.now, jti="shared")))


async def test_wrong_audience_refused(
    auth: SmartAuthority, clock: Clock, keys: dict[str, Key]
) -> None:
    key = keys["RS384"]
    client = await auth.register_client(org="h1", jwks=jwks(key), scope="system/*.rs")
    for aud in (
        "https://other.example.org/auth/token",
        TOKEN_URL + "/",
        "https://ehr.example.org/fhir",
        ["https://other.example.org/auth/token"],
        None,
    ):
        signed = assertion(client.client_id, key, clock.now, aud=aud)
        await refused(auth.token(form(signed)), 401, "invalid_client", "aud")
    # RFC 7519: aud may be an array containing the token endpoint.
    signed = assertion(client.client_id, key, clock.now, aud=[TOKEN_URL, "https://x.example"])
    assert (await auth.token(form(signed)))["access_token"]


async def test_expired_assertion_refused(
    auth: SmartAuthority, clock: Clock, keys: dict[str, Key]
) -> None:
    key = keys["ES384"]
    client = await auth.register_client(org="h1", jwks=jwks(key), scope="system/*.rs")
    signed = assertion(client.client_id, key, clock.now, lifetime=60)
    clock.now += 60  # exp == now: no longer valid
    await refused(auth.token(form(signed)), 401, "invalid_client", "expired")
    clock.now += 1000
    await refused(auth.token(form(signed)), 401, "invalid_client", "expired")
    past = assertion(client.client_id, key, clock.now, lifetime=-1)
    await refused(auth.token(form(past)), 401, "invalid_client", "expired")


async def test_exp_more_than_five_minutes_ahead_refused(
    auth: SmartAuthority, clock: Clock, keys: dict[str, Key]
) -> None:
    key = keys["EdDSA"]
    client = await auth.register_client(org="h1", jwks=jwks(key), scope="system/*.rs")
    for lifetime in (301, 3600, 10**9):
        signed = assertion(client.client_id, key, clock.now, lifetime=lifetime)
        await refused(auth.token(form(signed)), 401, "invalid_client", "300 seconds")
    ok = assertion(client.client_id, key, clock.now, lifetime=300)
    assert (await auth.token(form(ok)))["access_token"]


async def test_missing_claims_refused(
    auth: SmartAuthority, clock: Clock, keys: dict[str, Key]
) -> None:
    key = keys["ES384"]
    client = await auth.register_client(org="h1", jwks=jwks(key), scope="system/*.rs")
    cid = client.client_id
    cases: list[tuple[dict[str, Any], str]] = [
        ({"exp": None}, "exp"),
        ({"exp": "soon"}, "exp"),
        ({"jti": None}, "jti"),
        ({"jti": ""}, "jti"),
        ({"jti": 12345}, "jti"),
        ({"jti": "x" * 300}, "jti"),
        ({"nbf": int(clock.now) + 60}, "nbf"),
    ]
    for claims, words in cases:
        signed = assertion(cid, key, clock.now, **claims)
        await refused(auth.token(form(signed)), 401, "invalid_client", words)


async def test_unknown_kid_refused(
    auth: SmartAuthority, clock: Clock, keys: dict[str, Key]
) -> None:
    key = keys["ES384"]
    client = await auth.register_client(org="h1", jwks=jwks(key), scope="system/*.rs")
    signed = assertion(client.client_id, key, clock.now, headers={"kid": "not-registered"})
    await refused(auth.token(form(signed)), 401, "invalid_client", "kid")
    body = {"iss": client.client_id, "sub": client.client_id, "aud": TOKEN_URL}
    no_kid = jwt.encode(
        {**body, "exp": int(clock.now + 60), "jti": "k"}, key.private, algorithm="ES384"
    )
    await refused(auth.token(form(no_kid)), 401, "invalid_client", "kid")


async def test_wrong_iss_or_sub_refused(
    auth: SmartAuthority, clock: Clock, keys: dict[str, Key]
) -> None:
    key = keys["RS384"]
    client = await auth.register_client(org="h1", jwks=jwks(key), scope="system/*.rs")
    other = await auth.register_client(org="h2", jwks=jwks(key), scope="system/*.rs")
    cid = client.client_id
    cases: list[tuple[dict[str, Any], str]] = [
        ({"sub": other.client_id}, "sub"),
        ({"sub": None}, "sub"),
        ({"iss": None}, "iss"),
        ({"iss": other.client_id}, "sub"),
    ]
    for claims, words in cases:
        signed = assertion(cid, key, clock.now, **claims)
        await refused(auth.token(form(signed)), 401, "invalid_client", words)
    # A client_id form parameter, when sent, must name the same client.
    f = form(assertion(cid, key, clock.now)) | {"client_id": other.client_id}
    await refused(auth.token(f), 401, "invalid_client", "client_id")


async def test_bad_signature_refused(
    auth: SmartAuthority, clock: Clock, keys: dict[str, Key]
) -> None:
    for alg in ("RS384", "ES384", "EdDSA"):
        key = keys[alg]
        client = await auth.register_client(org="h1", jwks=jwks(key), scope="system/*.rs")
        impostor = _make_key(alg)  # same kid, another private key
        forged = Key(alg, key.kid, impostor.private, key.jwk)
        signed = assertion(client.client_id, forged, clock.now)
        await refused(auth.token(form(signed)), 401, "invalid_client", "signature")
        # Tamper with the payload of a genuinely signed assertion.
        head, _, sig = assertion(client.client_id, key, clock.now).split(".")
        evil = jwt.utils.base64url_encode(
            jwt.api_jws.json.dumps(
                {
                    "iss": client.client_id,
                    "sub": client.client_id,
                    "aud": TOKEN_URL,
                    "exp": int(clock.now + 60),
                    "jti": "tampered",
                }
            ).encode()
        ).decode()
        await refused(auth.token(form(f"{head}.{evil}.{sig}")), 401, "invalid_client", "signature")


async def test_wrong_or_weak_algorithms_refused(
    auth: SmartAuthority, clock: Clock, keys: dict[str, Key]
) -> None:
    rsa_key, ec_key = keys["RS384"], keys["ES384"]
    client = await auth.register_client(org="h1", jwks=jwks(rsa_key, ec_key), scope="system/*.rs")
    cid = client.client_id
    rs256 = assertion(cid, rsa_key, clock.now, alg="RS256")
    await refused(auth.token(form(rs256)), 401, "invalid_client", "alg")
    hs = jwt.encode(
        {"iss": cid, "sub": cid, "aud": TOKEN_URL, "exp": int(clock.now + 60), "jti": "h"},
        "s" * 48,
        algorithm="HS384",
        headers={"kid": rsa_key.kid},
    )
    await refused(auth.token(form(hs)), 401, "invalid_client", "alg")
    none = jwt.encode(
        {"iss": cid, "sub": cid, "aud": TOKEN_URL, "exp": int(clock.now + 60), "jti": "n"},
        None,
        algorithm="none",
        headers={"kid": rsa_key.kid},
    )
    await refused(auth.token(form(none)), 401, "invalid_client", "alg")
    # The EC key's kid with an RS384 signature: the key decides the algorithm.
    mixed = assertion(cid, rsa_key, clock.now, headers={"kid": ec_key.kid})
    await refused(auth.token(form(mixed)), 401, "invalid_client", "ES384")
    jku = assertion(cid, rsa_key, clock.now, headers={"jku": "https://attacker.example/jwks"})
    await refused(auth.token(form(jku)), 401, "invalid_client", "jku")
    await refused(auth.token(form("not.a.jwt")), 401, "invalid_client", "JWS")
    await refused(auth.token(form("x" * 20_000)), 401, "invalid_client", "large")


async def test_unknown_client_refused(
    auth: SmartAuthority, clock: Clock, keys: dict[str, Key]
) -> None:
    key = keys["EdDSA"]
    signed = assertion("cli-" + "0" * 32, key, clock.now)
    await refused(auth.token(form(signed)), 401, "invalid_client", "unknown client")
    assert await auth.get_client("cli-" + "0" * 32) is None


async def test_request_shape_errors(
    auth: SmartAuthority, clock: Clock, keys: dict[str, Key]
) -> None:
    key = keys["EdDSA"]
    client = await auth.register_client(org="h1", jwks=jwks(key), scope="system/*.rs")
    good = form(assertion(client.client_id, key, clock.now))
    await refused(auth.token({**good, "grant_type": ""}), 400, "invalid_request", "grant_type")
    await refused(
        auth.token({**good, "grant_type": "authorization_code"}), 400, "unsupported_grant_type"
    )
    await refused(
        auth.token({**good, "client_assertion_type": "urn:other"}),
        401,
        "invalid_client",
        "client_assertion_type",
    )
    no_assertion = {k: v for k, v in good.items() if k != "client_assertion"}
    await refused(auth.token(no_assertion), 401, "invalid_client", "client_assertion")
    await refused(auth.token({**good, "scope": " "}), 400, "invalid_scope", "required")
    # None of those consumed the jti: the same assertion still works.
    assert (await auth.token(good))["scope"] == "system/Observation.rs"


async def test_scope_is_narrowed_to_registration(
    auth: SmartAuthority, clock: Clock, keys: dict[str, Key]
) -> None:
    key = keys["ES384"]
    client = await auth.register_client(
        org="h1", jwks=jwks(key), scope="system/Observation.rs system/Patient.r"
    )
    cid = client.client_id
    cases = [
        ("system/*.cruds", "system/Observation.rs system/Patient.r"),
        ("system/Observation.cruds system/Condition.rs", "system/Observation.rs"),
        ("system/Observation.read", "system/Observation.rs"),  # v1 form
        ("launch/patient openid system/Patient.rs", "system/Patient.r"),
    ]
    for requested, granted in cases:
        resp = await auth.token(form(assertion(cid, key, clock.now), requested))
        assert resp["scope"] == granted
        info = await auth.introspect(resp["access_token"])
        assert info.scopes == parse_scopes(granted)
    for requested in ("system/Condition.rs", "user/*.cruds", "patient/Observation.rs", "openid"):
        signed = assertion(cid, key, clock.now)
        await refused(auth.token(form(signed, requested)), 400, "invalid_scope")

    info = await auth.issue(client, "system/*.cruds")
    assert info.scope_text == "system/Observation.rs system/Patient.r"
    await refused(auth.issue(client, "system/Condition.r"), 400, "invalid_scope")


async def test_introspection_refuses_expired_and_unknown(
    url: str, auth: SmartAuthority, clock: Clock, keys: dict[str, Key]
) -> None:
    key = keys["EdDSA"]
    client = await auth.register_client(org="h1", jwks=jwks(key), scope="system/*.rs")
    resp = await auth.token(form(assertion(client.client_id, key, clock.now)))
    token = resp["access_token"]
    clock.now += 299
    assert (await auth.introspect(token)).client.client_id == client.client_id
    clock.now += 1
    exc = await refused(auth.introspect(token), 401, "invalid_token", "expired")
    assert exc.headers()["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    # Also when the token is not cached (a fresh authority on the same store).
    other = await SmartAuthority.open(url, token_url=TOKEN_URL, clock=clock)
    try:
        await refused(other.introspect(token), 401, "invalid_token", "expired")
    finally:
        await other.close()
    await refused(auth.introspect(secrets.token_urlsafe(32)), 401, "invalid_token", "unknown")
    await refused(auth.introspect(""), 401, "invalid_token")
    await refused(auth.introspect(token[:-1]), 401, "invalid_token", "unknown")

    short = await auth.issue(client, "system/Patient.r", ttl=10)
    assert short.expires_at == int(clock.now) + 10
    clock.now += 10
    await refused(auth.introspect(short.token), 401, "invalid_token", "expired")


async def test_persistence_across_reopen(url: str, clock: Clock, keys: dict[str, Key]) -> None:
    key = keys["RS384"]
    a = await SmartAuthority.open(url, token_url=TOKEN_URL, clock=clock)
    try:
        client = await a.register_client(
            org="h3", practitioner="prac-9", jwks=jwks(key), scope="user/Observation.cruds"
        )
        resp = await a.token(form(assertion(client.client_id, key, clock.now), "user/*.rs"))
        issued = await a.issue(client, "user/Observation.c")
    finally:
        await a.close()

    clock.now += 30
    b = await SmartAuthority.open(url, token_url=TOKEN_URL, clock=clock)
    try:
        again = await b.get_client(client.client_id)
        assert again == client
        assert isinstance(again, Client) and again.jwks == jwks(key)
        info = await b.introspect(resp["access_token"])
        assert (info.scope_text, info.subject_kind, info.subject) == (
            "user/Observation.rs",
            "practitioner",
            "prac-9",
        )
        assert (await b.introspect(issued.token)).scope_text == "user/Observation.c"
        fresh = await b.token(form(assertion(client.client_id, key, clock.now), "user/*.cruds"))
        assert fresh["scope"] == "user/Observation.cruds"
    finally:
        await b.close()


async def test_only_token_hashes_are_stored_and_expired_rows_purged(
    url: str, auth: SmartAuthority, clock: Clock, keys: dict[str, Key]
) -> None:
    key = keys["ES384"]
    client = await auth.register_client(org="h1", jwks=jwks(key), scope="system/*.rs")
    cid = client.client_id
    resp = await auth.token(form(assertion(cid, key, clock.now, jti="j-1", lifetime=100)))
    token = resp["access_token"]
    rows = query(url, "SELECT token_hash, client_id FROM smart_tokens WHERE client_id = ?", (cid,))
    assert [(bytes(h), c) for h, c in rows] == [(hashlib.sha256(token.encode()).digest(), cid)]
    assert not query(url, "SELECT 1 FROM smart_tokens WHERE scope = ?", (token,))
    assert query(url, "SELECT jti, exp FROM smart_jtis WHERE client_id = ?", (cid,)) == [
        ("j-1", int(clock.now) + 100)
    ]

    clock.now += 1000  # the assertion and the token have expired
    await auth.token(form(assertion(cid, key, clock.now, jti="j-2")))
    assert query(url, "SELECT jti FROM smart_jtis WHERE client_id = ?", (cid,)) == [("j-2",)]
    digests = {bytes(r[0]) for r in query(url, "SELECT token_hash FROM smart_tokens")}
    assert hashlib.sha256(token.encode()).digest() not in digests


async def test_registration_validation(auth: SmartAuthority, keys: dict[str, Key]) -> None:
    key = keys["ES384"]
    good = jwks(key)
    bad_metadata: list[dict[str, Any]] = [
        {},
        {"keys": []},
        {"keys": [{k: v for k, v in key.jwk.items() if k != "kid"}]},
        {"keys": [key.jwk, key.jwk]},  # duplicate kid
        {"keys": [{**key.jwk, "use": "enc"}]},
        {"keys": [{**key.jwk, "alg": "ES256"}]},
        {"keys": [{**key.jwk, "alg": "RS384"}]},
        {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "sym"}]},
    ]
    p256 = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key(), as_dict=True)
    assert isinstance(p256, dict)
    bad_metadata.append({"keys": [{**p256, "kid": "p256"}]})
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    small_jwk = RSAAlgorithm.to_jwk(small.public_key(), as_dict=True)
    assert isinstance(small_jwk, dict)
    bad_metadata.append({"keys": [{**small_jwk, "kid": "small"}]})
    private = ECAlgorithm.to_jwk(key.private, as_dict=True)
    assert isinstance(private, dict)
    bad_metadata.append({"keys": [{**private, "kid": "priv"}]})
    for doc in bad_metadata:
        await refused(
            auth.register_client(org="h1", jwks=doc, scope="system/*.rs"),
            400,
            "invalid_client_metadata",
        )
    await refused(
        auth.register_client(org="h1", practitioner="p", patient="q", jwks=good, scope="user/*.r"),
        400,
        "invalid_client_metadata",
        "not both",
    )
    await refused(
        auth.register_client(org="", jwks=good, scope="system/*.rs"),
        400,
        "invalid_client_metadata",
        "org",
    )
    await refused(
        auth.register_client(org="h1", jwks=good, scope="system/*.rs bogus"),
        400,
        "invalid_scope",
        "bogus",
    )
    await refused(auth.register_client(org="h1", jwks=good, scope="openid"), 400, "invalid_scope")
    client = await auth.register_client(org="h1", jwks=good, scope="  system/*.rs   openid ")
    assert client.scope == "system/*.rs openid"
    assert client.client_id.startswith("cli-")


def test_smart_configuration_tells_the_truth(tmp_path: Path) -> None:
    async def go() -> dict[str, Any]:
        a = await SmartAuthority.open(f"sqlite:///{tmp_path / 's.db'}", token_url=TOKEN_URL)
        try:
            return a.smart_configuration()
        finally:
            await a.close()

    conf = asyncio.run(go())
    assert conf["token_endpoint"] == TOKEN_URL
    assert conf["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert conf["grant_types_supported"] == ["client_credentials"]
    assert set(conf["token_endpoint_auth_signing_alg_values_supported"]) == {
        "RS384",
        "ES384",
        "EdDSA",
    }
    caps = set(conf["capabilities"])
    assert {"client-confidential-asymmetric", "permission-v2"} <= caps
    # Nothing claimed that is not implemented: no launch flows, no refresh, no OIDC.
    assert not caps & {
        "launch-ehr",
        "launch-standalone",
        "client-public",
        "client-confidential-symmetric",
        "sso-openid-connect",
        "permission-offline",
        "authorize-post",
    }
    assert "authorization_endpoint" not in conf
    assert all(parse_scopes(s) for s in conf["scopes_supported"])


async def test_default_clock_is_wall_time(tmp_path: Path, keys: dict[str, Key]) -> None:
    a = await SmartAuthority.open(f"sqlite:///{tmp_path / 's.db'}", token_url=TOKEN_URL)
    try:
        key = keys["EdDSA"]
        client = await a.register_client(org="h1", jwks=jwks(key), scope="system/*.rs")
        assert abs(client.created - time.time()) < 5
        resp = await a.token(form(assertion(client.client_id, key, time.time())))
        assert (await a.introspect(resp["access_token"])).client == client
    finally:
        await a.close()


async def test_bad_store_url(tmp_path: Path) -> None:
    with pytest.raises(MedledgerError):
        await SmartAuthority.open("mysql://x/y", token_url=TOKEN_URL)
    with pytest.raises(MedledgerError):
        await SmartAuthority.open("postgresql://postgres@127.0.0.1:1/none", token_url=TOKEN_URL)


# --------------------------------------------------------------------------- fhirclient


async def test_fhirclient_backend_services_request(
    auth: SmartAuthority, clock: Clock, keys: dict[str, Key]
) -> None:
    """fhirclient sends a caller-built assertion (settings ``jwt_token``); we accept its request.

    fhirclient does not build the JWT itself: the app signs it (here with PyJWT)
    and fhirclient posts grant_type=client_credentials, its ``desired_scope``
    (which prefixes ``launch/patient``), client_assertion_type and
    client_assertion to the token URI, then reads ``access_token``/``expires_in``.
    """
    from fhirclient import client as fhir_client
    from fhirclient.auth import FHIROAuth2Auth

    key = keys["ES384"]
    registered = await auth.register_client(org="h1", jwks=jwks(key), scope="system/*.rs")
    signed = assertion(registered.client_id, key, clock.now)
    smart = fhir_client.FHIRClient(
        settings={
            "app_id": registered.client_id,
            "api_base": "https://ehr.example.org/fhir/",
            "scope": "system/Observation.rs system/Patient.rs",
            "jwt_token": signed,
        },
        save_func=lambda state: None,
    )
    server = smart.server
    server.auth = FHIROAuth2Auth(state={"token_uri": TOKEN_URL, "jwt_token": signed})
    loop = asyncio.get_running_loop()
    seen: list[tuple[str, dict[str, str], Any]] = []

    class Response:
        def __init__(self, body: dict[str, Any]) -> None:
            self._body = body

        def json(self) -> dict[str, Any]:
            return self._body

    def post_as_form(url: str, formdata: dict[str, str], auth: Any = None) -> Response:
        seen.append((url, dict(formdata), auth))
        body = asyncio.run_coroutine_threadsafe(auth_server.token(formdata), loop).result(10)
        return Response(body)

    auth_server = auth
    server.post_as_form = post_as_form  # type: ignore[method-assign]
    await asyncio.to_thread(server.auth.authorize, server)

    url, sent, basic = seen[0]
    assert url == TOKEN_URL and basic is None
    assert sent["client_assertion_type"] == ASSERTION_TYPE
    assert sent["scope"].split()[0] == "launch/patient"
    token = server.auth.access_token
    assert server.auth.signed_headers({})["Authorization"] == f"Bearer {token}"
    info = await auth.introspect(token)
    assert info.scope_text == "system/Observation.rs system/Patient.rs"
    assert info.client.client_id == registered.client_id


async def test_postgresql_reconnects_after_losing_its_connection(
    pg_url: str, clock: Clock, keys: dict[str, Key]
) -> None:
    key = keys["EdDSA"]
    a = await SmartAuthority.open(pg_url, token_url=TOKEN_URL, clock=clock)
    try:
        client = await a.register_client(org="h1", jwks=jwks(key), scope="system/*.rs")
        name = urlparse(pg_url).path.lstrip("/")
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
        signed = assertion(client.client_id, key, clock.now)
        with pytest.raises(MedledgerError):  # the statement in flight fails loudly
            await a.issue(client, "system/Patient.r")
        resp = await a.token(form(signed))  # the next call reconnects
        assert (await a.introspect(resp["access_token"])).client == client
    finally:
        await a.close()
