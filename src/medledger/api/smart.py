"""SMART on FHIR Backend Services authorisation (``client_credentials`` + ``private_key_jwt``).

A client is registered with its public keys (a JWKS document), the organisation
it acts for, optionally the practitioner or patient it acts as, and the scopes
it may ever receive. To get an access token it posts a client assertion: a JWT
signed with one of its keys (RS384, ES384 or EdDSA), naming itself as ``iss``
and ``sub``, the token endpoint as ``aud``, expiring within five minutes, with
a ``jti`` it has never used before. The authority answers with an opaque bearer
token valid for 300 seconds, carrying the requested scopes narrowed to the
registered ones.

What is persisted, and why:

* clients (``smart_clients``), so tokens can be requested after a restart;
* every accepted ``jti`` with its expiry (``smart_jtis``), so a restart cannot
  be used to replay an assertion; rows are purged once the assertion has expired
  (an expired assertion is refused on its ``exp`` anyway);
* issued tokens (``smart_tokens``) as SHA-256 hashes only, so a copy of the
  database does not hand out usable tokens.

Backends: SQLite (``sqlite:///path/smart.db``, stdlib ``sqlite3`` on one worker
thread) and PostgreSQL (``postgresql://...``, psycopg 3 async, tables prefixed
``smart_`` so they can share the node's database).

Not supported: registering a JWKS by URL and the ``jku`` assertion header (a
client registers the JWKS document itself; an assertion carrying ``jku`` is
refused because it cannot match a registered URL), token revocation, refresh
tokens, the authorisation-code (app launch) flows and v2 scope query
restrictions (see :mod:`medledger.api.scopes`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import secrets
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from medledger.api.scopes import (
    CONTEXTS,
    Scope,
    format_scopes,
    intersect_scopes,
    normalise_scopes,
    parse_scopes,
    unrecognised_scopes,
)
from medledger.errors import MedledgerError, StorageError

__all__ = [
    "ALGORITHMS",
    "ASSERTION_TYPE",
    "MAX_ASSERTION_LIFETIME",
    "TOKEN_TTL",
    "Client",
    "SmartAuthority",
    "SmartError",
    "TokenInfo",
]

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALGORITHMS = ("RS384", "ES384", "EdDSA")
"""Client assertion algorithms: the two SMART requires, plus EdDSA (Ed25519/Ed448)."""
TOKEN_TTL = 300
"""Lifetime of an access token, seconds."""
MAX_ASSERTION_LIFETIME = 300
"""How far in the future an assertion's ``exp`` may lie (SMART: at most five minutes)."""

_MAX_ASSERTION_BYTES = 16_384
_MAX_JTI = 255
_MAX_TOKEN = 256
_MIN_RSA_BITS = 2048
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_PURGE_EVERY = 60.0
_CACHE_SIZE = 4096

_T = TypeVar("_T")


class SmartError(MedledgerError):
    """An OAuth 2.0 error (RFC 6749 §5.2, RFC 6750 §3.1).

    The API answers it with ``status`` and the JSON :meth:`body`
    ``{"error", "error_description"}``.
    """

    code = "smart"

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description, status=status, error=error)
        self.status = status
        self.error = error
        self.description = description

    def body(self) -> dict[str, str]:
        """The JSON body of the OAuth error response."""
        return {"error": self.error, "error_description": self.description}

    def headers(self) -> dict[str, str]:
        """Response headers: the RFC 6750 ``WWW-Authenticate`` challenge for a bad bearer token."""
        if self.error != "invalid_token":
            return {}
        desc = self.description.replace("\\", "\\\\").replace('"', '\\"')
        return {"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{desc}"'}


@dataclass(frozen=True, slots=True)
class Client:
    """A registered Backend Services client."""

    client_id: str
    org: str  # organisation the client acts for
    practitioner: str | None  # practitioner it acts as (user/ scopes), if any
    patient: str | None  # patient it acts as (patient/ scopes), if any
    jwks: dict[str, Any]  # its public keys, {"keys": [...]}, each with a "kid"
    scope: str  # the most it may ever be granted
    created: int  # registration time, seconds since the epoch

    @property
    def subject(self) -> tuple[str, str]:
        """``(kind, id)`` of whom the client acts as: practitioner, patient or itself (system)."""
        if self.practitioner is not None:
            return "practitioner", self.practitioner
        if self.patient is not None:
            return "patient", self.patient
        return "system", self.client_id


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What a valid access token stands for."""

    token: str
    client: Client
    scopes: list[Scope]
    scope_text: str
    expires_at: int  # seconds since the epoch
    subject_kind: str  # "practitioner" | "patient" | "system"
    subject: str  # practitioner id, patient id, or the client id for "system"


def _invalid_client(description: str) -> SmartError:
    return SmartError(401, "invalid_client", description)


def _metadata_error(description: str) -> SmartError:
    return SmartError(400, "invalid_client_metadata", description)


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


# --------------------------------------------------------------------------- keys


def _check_jwk(jwk: Any) -> tuple[str, str, jwt.PyJWK]:
    """Validate one registered public JWK; returns its kid, the algorithm it verifies, the key."""
    if not isinstance(jwk, dict):
        raise _metadata_error("every JWKS key must be a JSON object")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise _metadata_error("every JWKS key needs a non-empty string 'kid'")
    if _PRIVATE_MEMBERS & jwk.keys():
        raise _metadata_error(f"key {kid!r} contains private key material; register public keys")
    kty, alg = jwk.get("kty"), jwk.get("alg")
    if alg is not None and alg not in ALGORITHMS:
        raise _metadata_error(f"key {kid!r}: alg {alg!r} is not one of {', '.join(ALGORITHMS)}")
    if jwk.get("use", "sig") != "sig":
        raise _metadata_error(f"key {kid!r}: 'use' must be 'sig'")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise _metadata_error(f"key {kid!r}: 'key_ops' must include 'verify'")
    if kty == "RSA":
        usable = "RS384"
    elif kty == "EC" and jwk.get("crv") == "P-384":
        usable = "ES384"
    elif kty == "OKP" and jwk.get("crv") in ("Ed25519", "Ed448"):
        usable = "EdDSA"
    else:
        raise _metadata_error(
            f"key {kid!r}: unsupported key type (RSA, EC P-384, OKP Ed25519/Ed448 are accepted)"
        )
    if alg is not None and alg != usable:
        raise _metadata_error(f"key {kid!r}: alg {alg!r} does not fit a {kty} key")
    try:
        loaded = jwt.PyJWK(jwk, usable)
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError) as exc:
        raise _metadata_error(f"key {kid!r} cannot be loaded: {exc}") from exc
    if isinstance(loaded.key, rsa.RSAPublicKey) and loaded.key.key_size < _MIN_RSA_BITS:
        raise _metadata_error(f"key {kid!r}: RSA keys need at least {_MIN_RSA_BITS} bits")
    return kid, usable, loaded


def _load_jwks(jwks: Any) -> dict[str, tuple[str, jwt.PyJWK]]:
    """Validate a registered JWKS document; returns ``kid -> (algorithm, key)``."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
        raise _metadata_error('jwks must be a JWK Set: {"keys": [ ...public keys... ]}')
    keys: dict[str, tuple[str, jwt.PyJWK]] = {}
    for jwk in jwks["keys"]:
        kid, alg, loaded = _check_jwk(jwk)
        if kid in keys:
            raise _metadata_error(f"duplicate kid {kid!r} in jwks")
        keys[kid] = (alg, loaded)
    return keys


# --------------------------------------------------------------------------- storage


class _Backend(Protocol):
    async def insert_client(self, client: Client) -> None: ...
    async def get_client(self, client_id: str) -> Client | None: ...
    async def use_jti(self, client_id: str, jti: str, exp: int) -> bool: ...
    async def purge(self, now: float) -> None: ...
    async def insert_token(self, digest: bytes, client_id: str, scope: str, exp: int) -> None: ...
    async def get_token(self, digest: bytes) -> tuple[str, str, int] | None: ...
    async def close(self) -> None: ...


def _client_row(row: Sequence[Any]) -> Client:
    client_id, org, practitioner, patient, jwks, scope, created = row
    return Client(
        client_id=client_id,
        org=org,
        practitioner=practitioner,
        patient=patient,
        jwks=json.loads(jwks),
        scope=scope,
        created=int(created),
    )


def _client_params(c: Client) -> tuple[Any, ...]:
    jwks = json.dumps(c.jwks, sort_keys=True, separators=(",", ":"))
    return (c.client_id, c.org, c.practitioner, c.patient, jwks, c.scope, c.created)


_CLIENT_COLUMNS = "client_id, org, practitioner, patient, jwks, scope, created"

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS smart_clients (
    client_id TEXT PRIMARY KEY, org TEXT NOT NULL, practitioner TEXT, patient TEXT,
    jwks TEXT NOT NULL, scope TEXT NOT NULL, created INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS smart_jtis (
    client_id TEXT NOT NULL, jti TEXT NOT NULL, exp INTEGER NOT NULL,
    PRIMARY KEY (client_id, jti)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS smart_jtis_exp ON smart_jtis (exp);
CREATE TABLE IF NOT EXISTS smart_tokens (
    token_hash BLOB PRIMARY KEY, client_id TEXT NOT NULL, scope TEXT NOT NULL,
    expires_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS smart_tokens_exp ON smart_tokens (expires_at);
"""


class _SqliteBackend:
    """One SQLite connection used only from one worker thread (so calls are serialised)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smart-sqlite")
        self._db: sqlite3.Connection | None = None

    async def _run(self, what: str, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        def call() -> _T:
            if self._db is None:
                raise StorageError("smart store is closed")
            try:
                return fn(self._db)
            except sqlite3.Error as exc:
                raise StorageError(f"sqlite: smart {what}: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def open(self) -> None:
        def do() -> None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(str(self.path), isolation_level=None, timeout=10.0)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.executescript(_SQLITE_SCHEMA)
            except (sqlite3.Error, OSError) as exc:
                raise StorageError(f"sqlite: open smart store {self.path}: {exc}") from exc
            self._db = db

        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, do)
        except BaseException:
            self._pool.shutdown(wait=False)
            raise

    async def insert_client(self, client: Client) -> None:
        sql = f"INSERT INTO smart_clients ({_CLIENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
        await self._run("register client", lambda db: db.execute(sql, _client_params(client)))

    async def get_client(self, client_id: str) -> Client | None:
        sql = f"SELECT {_CLIENT_COLUMNS} FROM smart_clients WHERE client_id = ?"
        row = await self._run("get client", lambda db: db.execute(sql, (client_id,)).fetchone())
        return None if row is None else _client_row(row)

    async def use_jti(self, client_id: str, jti: str, exp: int) -> bool:
        sql = "INSERT OR IGNORE INTO smart_jtis (client_id, jti, exp) VALUES (?, ?, ?)"
        cur = await self._run("record jti", lambda db: db.execute(sql, (client_id, jti, exp)))
        return cur.rowcount == 1

    async def purge(self, now: float) -> None:
        def do(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM smart_jtis WHERE exp < ?", (math.floor(now),))
            db.execute("DELETE FROM smart_tokens WHERE expires_at < ?", (math.floor(now),))

        await self._run("purge", do)

    async def insert_token(self, digest: bytes, client_id: str, scope: str, exp: int) -> None:
        sql = "INSERT INTO smart_tokens (token_hash, client_id, scope, expires_at) VALUES (?,?,?,?)"
        await self._run("store token", lambda db: db.execute(sql, (digest, client_id, scope, exp)))

    async def get_token(self, digest: bytes) -> tuple[str, str, int] | None:
        sql = "SELECT client_id, scope, expires_at FROM smart_tokens WHERE token_hash = ?"
        row = await self._run("get token", lambda db: db.execute(sql, (digest,)).fetchone())
        return None if row is None else (row[0], row[1], int(row[2]))

    async def close(self) -> None:
        def do(db: sqlite3.Connection) -> None:
            db.close()

        if self._db is not None:
            try:
                await self._run("close", do)
            finally:
                self._db = None
                self._pool.shutdown(wait=True)


_PG_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS smart_clients (
        client_id TEXT PRIMARY KEY, org TEXT NOT NULL, practitioner TEXT, patient TEXT,
        jwks TEXT NOT NULL, scope TEXT NOT NULL, created BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS smart_jtis (
        client_id TEXT NOT NULL, jti TEXT NOT NULL, exp BIGINT NOT NULL,
        PRIMARY KEY (client_id, jti))""",
    "CREATE INDEX IF NOT EXISTS smart_jtis_exp ON smart_jtis (exp)",
    """CREATE TABLE IF NOT EXISTS smart_tokens (
        token_hash BYTEA PRIMARY KEY, client_id TEXT NOT NULL, scope TEXT NOT NULL,
        expires_at BIGINT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS smart_tokens_exp ON smart_tokens (expires_at)",
)
_PG_SCHEMA_LOCK = 0x736D617274  # advisory lock id ("smart"): one schema creator at a time


class _PostgresBackend:
    """One psycopg 3 async connection in autocommit mode (psycopg serialises its use)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Any = None
        self._reconnect = asyncio.Lock()

    async def _exec(self, what: str, sql: str, params: Sequence[Any] = ()) -> Any:
        import psycopg

        if self._conn is None:
            raise StorageError("smart store is closed")
        if self._conn.broken or self._conn.closed:
            # The connection was lost on an earlier call: reconnect before this
            # statement (never retry a statement whose outcome is unknown).
            async with self._reconnect:
                old = self._conn
                if old is not None and (old.broken or old.closed):
                    await self._connect()
                    await old.close()
            if self._conn is None:
                raise StorageError("smart store is closed")
        try:
            return await self._conn.execute(sql, params)
        except psycopg.Error as exc:
            raise StorageError(f"postgresql: smart {what}: {exc}") from exc

    async def open(self) -> None:
        await self._connect()

    async def _connect(self) -> None:
        import psycopg

        try:
            conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        except psycopg.Error as exc:
            raise StorageError(f"postgresql: open smart store: {exc}") from exc
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_SCHEMA_LOCK,))
                for stmt in _PG_SCHEMA:
                    await conn.execute(stmt)
        except psycopg.Error as exc:
            await conn.close()
            raise StorageError(f"postgresql: create smart tables: {exc}") from exc
        self._conn = conn

    async def insert_client(self, client: Client) -> None:
        sql = f"INSERT INTO smart_clients ({_CLIENT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)"
        await self._exec("register client", sql, _client_params(client))

    async def get_client(self, client_id: str) -> Client | None:
        sql = f"SELECT {_CLIENT_COLUMNS} FROM smart_clients WHERE client_id = %s"
        row = await (await self._exec("get client", sql, (client_id,))).fetchone()
        return None if row is None else _client_row(row)

    async def use_jti(self, client_id: str, jti: str, exp: int) -> bool:
        sql = (
            "INSERT INTO smart_jtis (client_id, jti, exp) VALUES (%s, %s, %s) "
            "ON CONFLICT (client_id, jti) DO NOTHING"
        )
        cur = await self._exec("record jti", sql, (client_id, jti, exp))
        return bool(cur.rowcount == 1)

    async def purge(self, now: float) -> None:
        cutoff = math.floor(now)
        await self._exec("purge jtis", "DELETE FROM smart_jtis WHERE exp < %s", (cutoff,))
        await self._exec(
            "purge tokens", "DELETE FROM smart_tokens WHERE expires_at < %s", (cutoff,)
        )

    async def insert_token(self, digest: bytes, client_id: str, scope: str, exp: int) -> None:
        sql = (
            "INSERT INTO smart_tokens (token_hash, client_id, scope, expires_at) "
            "VALUES (%s, %s, %s, %s)"
        )
        await self._exec("store token", sql, (digest, client_id, scope, exp))

    async def get_token(self, digest: bytes) -> tuple[str, str, int] | None:
        sql = "SELECT client_id, scope, expires_at FROM smart_tokens WHERE token_hash = %s"
        row = await (await self._exec("get token", sql, (digest,))).fetchone()
        return None if row is None else (row[0], row[1], int(row[2]))

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()


async def _open_backend(url: str) -> _Backend:
    parsed = urlparse(url)
    backend: _SqliteBackend | _PostgresBackend
    if parsed.scheme in ("postgresql", "postgres"):
        backend = _PostgresBackend(url)
    elif parsed.scheme == "sqlite" and not parsed.netloc and parsed.path:
        backend = _SqliteBackend(Path(parsed.path))
    elif parsed.scheme == "" and url:
        backend = _SqliteBackend(Path(url))
    else:
        raise StorageError(
            f"unsupported smart store URL {url!r} (sqlite:///path/smart.db or postgresql://...)"
        )
    await backend.open()
    return backend


# --------------------------------------------------------------------------- authority


class SmartAuthority:
    """The SMART Backend Services authorisation server of one node."""

    def __init__(
        self, backend: _Backend, *, url: str, token_url: str, clock: Callable[[], float]
    ) -> None:
        """Use :meth:`open`."""
        self._backend = backend
        self.url = url
        self.token_url = token_url
        self._clock = clock
        self._clients: dict[str, Client] = {}  # clients are immutable once registered
        self._keys: dict[str, dict[str, tuple[str, jwt.PyJWK]]] = {}
        self._tokens: dict[bytes, TokenInfo] = {}  # bounded cache of valid tokens
        self._next_purge = 0.0

    @classmethod
    async def open(
        cls, url: str, *, token_url: str, clock: Callable[[], float] = time.time
    ) -> SmartAuthority:
        """Open (creating if needed) the store at ``url``; ``token_url`` is the expected ``aud``."""
        if not token_url:
            raise ValueError("token_url is required (it is the audience of client assertions)")
        backend = await _open_backend(url)
        return cls(backend, url=url, token_url=token_url, clock=clock)

    async def close(self) -> None:
        """Close the store; the authority cannot be used afterwards."""
        self._tokens.clear()
        await self._backend.close()

    # ----------------------------------------------------------------- clients

    async def register_client(
        self,
        *,
        org: str,
        practitioner: str | None = None,
        patient: str | None = None,
        jwks: dict[str, Any],
        scope: str,
    ) -> Client:
        """Register a client with its public JWKS and the most it may ever be granted.

        Raises :class:`SmartError` (``invalid_client_metadata``/``invalid_scope``) for
        keys that are not usable public keys, a client bound to both a practitioner
        and a patient, or scopes that are not SMART resource scopes.
        """
        if not isinstance(org, str) or not org:
            raise _metadata_error("org is required")
        if practitioner is not None and patient is not None:
            raise _metadata_error("a client acts as a practitioner or as a patient, not both")
        for name, value in (("practitioner", practitioner), ("patient", patient)):
            if value is not None and (not isinstance(value, str) or not value):
                raise _metadata_error(f"{name} must be a non-empty string")
        keys = _load_jwks(jwks)
        bad = unrecognised_scopes(scope)
        if bad:
            raise SmartError(400, "invalid_scope", f"unrecognised scopes: {' '.join(bad)}")
        if not parse_scopes(scope):
            raise SmartError(400, "invalid_scope", "at least one resource scope is required")
        client = Client(
            client_id="cli-" + secrets.token_hex(16),
            org=org,
            practitioner=practitioner,
            patient=patient,
            jwks=json.loads(json.dumps(jwks)),
            scope=" ".join(scope.split()),
            created=int(self._clock()),
        )
        await self._backend.insert_client(client)
        self._clients[client.client_id] = client
        self._keys[client.client_id] = keys
        return client

    async def get_client(self, client_id: str) -> Client | None:
        """The registered client, or ``None``."""
        client = self._clients.get(client_id)
        if client is None:
            client = await self._backend.get_client(client_id)
            if client is not None:
                self._clients[client_id] = client
        return client

    def _client_keys(self, client: Client) -> dict[str, tuple[str, jwt.PyJWK]]:
        keys = self._keys.get(client.client_id)
        if keys is None:
            try:
                keys = _load_jwks(client.jwks)
            except SmartError as exc:
                raise _invalid_client(f"the client's registered JWKS is unusable: {exc}") from exc
            self._keys[client.client_id] = keys
        return keys

    # ----------------------------------------------------------------- tokens

    async def token(self, form: Mapping[str, str]) -> dict[str, Any]:
        """Answer a token request (the POSTed form of ``client_credentials`` + ``private_key_jwt``).

        Returns ``{"access_token", "token_type": "bearer", "expires_in", "scope"}``.
        Raises :class:`SmartError`: 400 ``invalid_request`` / ``unsupported_grant_type``
        / ``invalid_scope``; 401 ``invalid_client`` for every client authentication
        failure (RFC 6749 §5.2, RFC 7523 §3.2).
        """
        grant_type = form.get("grant_type")
        if not grant_type:
            raise SmartError(400, "invalid_request", "grant_type is required")
        if grant_type != "client_credentials":
            raise SmartError(
                400, "unsupported_grant_type", "only grant_type=client_credentials is supported"
            )
        assertion_type = form.get("client_assertion_type")
        assertion = form.get("client_assertion")
        if not isinstance(assertion_type, str) or not isinstance(assertion, str):
            raise _invalid_client("client_assertion_type and client_assertion are required")
        if not (assertion_type and assertion):
            raise _invalid_client("client_assertion_type and client_assertion are required")
        if assertion_type != ASSERTION_TYPE:
            raise _invalid_client(f"client_assertion_type must be {ASSERTION_TYPE}")
        now = self._clock()
        client, claims = await self._authenticate(assertion, now, form.get("client_id"))

        requested = form.get("scope")
        if not isinstance(requested, str) or not requested.strip():
            raise SmartError(400, "invalid_scope", "scope is required")
        granted = intersect_scopes(parse_scopes(requested), parse_scopes(client.scope))
        if not granted:
            raise SmartError(
                400, "invalid_scope", "none of the requested scopes is registered for this client"
            )

        await self._maybe_purge(now)
        if not await self._backend.use_jti(client.client_id, claims["jti"], claims["exp"]):
            raise _invalid_client("jti has already been used")
        info = await self._issue(client, granted, TOKEN_TTL, now)
        return {
            "access_token": info.token,
            "token_type": "bearer",
            "expires_in": TOKEN_TTL,
            "scope": info.scope_text,
        }

    async def _authenticate(
        self, assertion: str, now: float, form_client_id: str | None
    ) -> tuple[Client, dict[str, Any]]:
        """Verify a client assertion; returns the client and the checked claims (jti, exp)."""
        if len(assertion) > _MAX_ASSERTION_BYTES:
            raise _invalid_client("client_assertion is too large")
        jws = jwt.PyJWS()
        try:
            header = jws.get_unverified_header(assertion)
            unverified = json.loads(
                jws.decode_complete(assertion, options={"verify_signature": False})["payload"]
            )
        except (jwt.InvalidTokenError, ValueError) as exc:
            raise _invalid_client(f"client_assertion is not a valid JWS: {exc}") from exc
        if not isinstance(unverified, dict):
            raise _invalid_client("client_assertion payload is not a JSON object")

        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise _invalid_client(f"assertion alg must be one of {', '.join(ALGORITHMS)}")
        if "jku" in header or "x5u" in header or "jwk" in header:
            raise _invalid_client(
                "jku/x5u/jwk headers are not supported: keys come from the registered JWKS"
            )
        typ = header.get("typ")
        if typ is not None and str(typ).upper() != "JWT":
            raise _invalid_client("assertion typ must be JWT")

        iss, sub = unverified.get("iss"), unverified.get("sub")
        if not isinstance(iss, str) or not iss:
            raise _invalid_client("assertion iss (the client id) is required")
        if sub != iss:
            raise _invalid_client("assertion sub must equal iss (the client id)")
        if form_client_id is not None and form_client_id != iss:
            raise _invalid_client("client_id does not match the assertion's iss")
        client = await self.get_client(iss)
        if client is None:
            raise _invalid_client("unknown client")

        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _invalid_client("assertion kid header is required")
        found = self._client_keys(client).get(kid)
        if found is None:
            raise _invalid_client(f"kid {kid!r} is not in the client's registered JWKS")
        key_alg, key = found
        if key_alg != alg:
            raise _invalid_client(f"key {kid!r} verifies {key_alg}, not {alg}")
        try:
            verified = jws.decode_complete(assertion, key.key, algorithms=[alg])
            claims = json.loads(verified["payload"])
        except (jwt.InvalidTokenError, ValueError) as exc:
            raise _invalid_client("client_assertion signature does not verify") from exc
        if claims != unverified:  # cannot differ, but never act on unverified data
            raise _invalid_client("client_assertion changed during verification")

        aud = claims.get("aud")
        if not (aud == self.token_url or (isinstance(aud, list) and self.token_url in aud)):
            raise _invalid_client(f"assertion aud must be the token endpoint {self.token_url}")
        exp = claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
            raise _invalid_client("assertion exp (a NumericDate) is required")
        if exp <= now:
            raise _invalid_client("client_assertion has expired")
        if exp > now + MAX_ASSERTION_LIFETIME:
            raise _invalid_client(
                f"assertion exp is more than {MAX_ASSERTION_LIFETIME} seconds in the future"
            )
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and not isinstance(nbf, bool) and nbf > now:
            raise _invalid_client("client_assertion is not valid yet (nbf)")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise _invalid_client("assertion jti is required")
        if len(jti) > _MAX_JTI:
            raise _invalid_client(f"assertion jti is longer than {_MAX_JTI} characters")
        return client, {"jti": jti, "exp": math.ceil(exp)}

    async def issue(self, client: Client, scope: str, ttl: int = TOKEN_TTL) -> TokenInfo:
        """Issue a token for ``client`` directly (no assertion): the demo identity picker, tests.

        The scopes are narrowed to the registered ones exactly as for :meth:`token`.
        """
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        granted = intersect_scopes(parse_scopes(scope), parse_scopes(client.scope))
        if not granted:
            raise SmartError(
                400, "invalid_scope", "none of the requested scopes is registered for this client"
            )
        now = self._clock()
        await self._maybe_purge(now)
        return await self._issue(client, granted, ttl, now)

    async def _issue(self, client: Client, granted: list[Scope], ttl: int, now: float) -> TokenInfo:
        token = secrets.token_urlsafe(32)
        digest = _token_hash(token)
        scope_text = format_scopes(granted)
        expires_at = math.floor(now) + ttl
        await self._backend.insert_token(digest, client.client_id, scope_text, expires_at)
        kind, subject = client.subject
        info = TokenInfo(token, client, granted, scope_text, expires_at, kind, subject)
        self._remember(digest, info)
        return info

    def _remember(self, digest: bytes, info: TokenInfo) -> None:
        if len(self._tokens) >= _CACHE_SIZE:
            self._tokens.pop(next(iter(self._tokens)))
        self._tokens[digest] = info

    async def introspect(self, bearer: str) -> TokenInfo:
        """What the bearer token stands for.

        Raises :class:`SmartError` 401 ``invalid_token`` if the token is unknown or expired.
        """
        if not bearer or len(bearer) > _MAX_TOKEN:
            raise SmartError(401, "invalid_token", "unknown access token")
        digest = _token_hash(bearer)
        now = self._clock()
        info = self._tokens.get(digest)
        if info is None:
            row = await self._backend.get_token(digest)
            if row is None:
                raise SmartError(401, "invalid_token", "unknown access token")
            client_id, scope_text, expires_at = row
            client = await self.get_client(client_id)
            if client is None:
                raise SmartError(401, "invalid_token", "the token's client is not registered")
            kind, subject = client.subject
            scopes = normalise_scopes(parse_scopes(scope_text))
            info = TokenInfo(bearer, client, scopes, scope_text, expires_at, kind, subject)
            if expires_at > now:
                self._remember(digest, info)
        if info.expires_at <= now:
            self._tokens.pop(digest, None)
            raise SmartError(401, "invalid_token", "access token has expired")
        return info

    async def _maybe_purge(self, now: float) -> None:
        if now >= self._next_purge:
            self._next_purge = now + _PURGE_EVERY
            await self._backend.purge(now)

    # ----------------------------------------------------------------- discovery

    def smart_configuration(self) -> dict[str, Any]:
        """The ``/.well-known/smart-configuration`` document: only what is implemented."""
        return {
            "token_endpoint": self.token_url,
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": list(ALGORITHMS),
            "grant_types_supported": ["client_credentials"],
            "scopes_supported": [f"{c}/*.{p}" for c in CONTEXTS for p in ("cruds", "rs")],
            "capabilities": [
                "client-confidential-asymmetric",
                "permission-v1",
                "permission-v2",
                "permission-patient",
                "permission-user",
            ],
        }
