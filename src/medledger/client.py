"""The medledger Python client: FHIR through SMART Backend Services, with the ledger's proofs
checked on the client.

A hospital system, an auditor or a patient's app talks to any medledger node (the
embedded server or one organisation's consortium node) with this client, and does
not have to trust that node for what the ledger says::

    from medledger.client import Client, ClientKey, Trust

    trust = Trust.from_verifier_keys(PINNED_NODE_KEYS)      # e.g. 2 of 3 member nodes
    key = ClientKey.load("ehr-key.pem", kid)    # ``medledger client keygen`` wrote it
    async with Client("https://node.example/fhir", client_id=CLIENT_ID, key=key, trust=trust) as c:
        patient = await c.read("Patient", pid)
        async for obs in c.search("Observation", patient=pid, code="http://loinc.org|4548-4"):
            ...
        kept = await c.checkpoint()                  # signed by a quorum of the pinned keys
        for event in await c.search_all("AuditEvent", patient=pid):
            access = await c.access_proof(event["id"])   # the signed access.log entry, included
        await c.prove_append_only(kept)              # later: the log only grew since ``kept``

**Authentication** is SMART Backend Services: the client signs a short-lived
``private_key_jwt`` assertion (ES384, ``iss`` = ``sub`` = the client id, ``aud`` = the
token URL, a fresh ``jti``) with its own key and exchanges it at the token endpoint
(found in ``.well-known/smart-configuration`` unless given) for a bearer token, which
it reuses until shortly before it expires and renews once on a 401.

**FHIR**: read, vread, history, search (one page, every page, or an async iterator
following ``next`` links, by their query only and always under this client's own
base, so no server link can take the bearer token elsewhere), create, update with
``If-Match``, delete, ``$everything``, ``$erase`` and Bundles. Decimals keep the digits the
server sent (``5.40`` stays ``5.40``, see :mod:`medledger.fhir.jsontext`). An error
answer raises :class:`RemoteError` with the HTTP status and the server's
OperationOutcome.

**Proofs**, checked here with the same pure verifiers the nodes use
(:mod:`medledger.merkle.verify`, :func:`~medledger.ledger.checkpoint.verify_checkpoint`):

* :meth:`Client.checkpoint`: the newest checkpoint that at least ``trust.quorum``
  distinct pinned node keys signed (in a consortium the others' signatures arrive a
  gossip round after a block), accepted only if those signatures verify here (a
  failing signature of a pinned key rejects it: :class:`CheckpointError`);
* :meth:`Client.access_proof`: an AuditEvent's ``access.log`` transaction, its bytes
  hashing to the event's id, its signature, and its inclusion in a trusted checkpoint's
  log (:class:`ProofError`, :class:`BadTransactionSignature` otherwise). What it
  returns is the signed entry itself (who, which records, why, permit or deny), not the
  server's rendering of it;
* :meth:`Client.prove_append_only`: that the log of a newer trusted checkpoint extends
  the log of one kept earlier (nothing was removed or rewritten).

Async only, on ``httpx``; one :class:`Client` per registered client (its identity).
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from medledger.crypto.client_key import ClientKey
from medledger.errors import CheckpointError, ProofError, RemoteError
from medledger.fhir.jsontext import dump_json, load_json
from medledger.ledger.checkpoint import Checkpoint, verify_checkpoint
from medledger.ledger.note import NoteVerifier
from medledger.ledger.tx import Transaction
from medledger.merkle.hasher import leaf_hash
from medledger.merkle.verify import verify_consistency, verify_inclusion

__all__ = ["AccessProof", "Client", "ClientKey", "RemoteError", "Trust"]

FHIR_JSON = "application/fhir+json"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: a token is renewed this many seconds before it expires
_RENEW_MARGIN = 30.0


@dataclass(frozen=True, slots=True)
class Trust:
    """Which node keys vouch for a checkpoint, and how many must.

    ``verifiers`` are the member nodes' checkpoint keys, pinned by the caller (from
    ``medledger checkpoint --verifier-key`` at each organisation, or the consortium's
    published list), never taken from the server being checked. ``quorum`` distinct
    organisations must have signed a checkpoint for it to be accepted; ``origin``, when
    given, must be the checkpoint's origin line (``medledger/<network>``).
    """

    verifiers: tuple[NoteVerifier, ...]
    quorum: int
    origin: str | None = None

    @classmethod
    def from_verifier_keys(
        cls, keys: Iterable[str], *, quorum: int | None = None, origin: str | None = None
    ) -> Trust:
        """Parse C2SP verifier keys (``<name>+<hash>+<base64>``); default quorum: a majority."""
        verifiers = tuple(NoteVerifier.from_verifier_key(k.strip()) for k in keys)
        if not verifiers:
            raise CheckpointError("no verifier keys to trust")
        need = len(verifiers) // 2 + 1 if quorum is None else quorum
        if not 1 <= need <= len(verifiers):
            raise CheckpointError(f"quorum {need} is not between 1 and {len(verifiers)}")
        return cls(verifiers, need, origin)

    def check(self, note: str) -> Checkpoint:
        """The checkpoint of a signed note, if a quorum of the pinned keys signed it."""
        return verify_checkpoint(note, self.verifiers, quorum=self.quorum, origin=self.origin)


@dataclass(frozen=True, slots=True)
class AccessProof:
    """A verified ``access.log`` entry: the signed transaction and where the log holds it."""

    transaction: Transaction
    leaf_index: int
    checkpoint: Checkpoint
    audit_path: tuple[bytes, ...] = ()

    @property
    def entry(self) -> dict[str, Any]:
        """The signed entry (actor, org, patient, records, purpose, outcome, rule ...)."""
        return dict(self.transaction.payload)


class Client:
    """One registered SMART Backend Services client of a medledger node (see module doc).

    ``fhir_base`` is the FHIR base URL (``https://host/fhir``); the ledger's public
    endpoints are at ``ledger_base`` (default: ``/api/ledger`` beside it).
    ``key`` is the client's :class:`~medledger.crypto.client_key.ClientKey` (its EC
    P-384 private key and the ``kid`` of the public JWK it registered; e.g.
    ``ClientKey.load("ehr-key.pem", kid)`` for ``medledger client keygen``'s files).
    ``purpose`` is sent as ``X-Purpose-Of-Use`` (the server's default is ``TREAT``).
    ``http`` may be given to share a connection pool or set TLS options (its
    ``base_url`` is not used).
    """

    def __init__(
        self,
        fhir_base: str,
        *,
        client_id: str,
        key: ClientKey,
        scope: str = "system/*.rs",
        purpose: str | None = None,
        trust: Trust | None = None,
        token_url: str | None = None,
        ledger_base: str | None = None,
        http: httpx.AsyncClient | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.fhir_base = fhir_base.rstrip("/")
        self.ledger_base = (ledger_base or _sibling(self.fhir_base, "api/ledger")).rstrip("/")
        self.client_id = client_id
        self.key = key
        self.scope = scope
        self.purpose = purpose
        self.trust = trust
        self.token_url = token_url
        self._http = http if http is not None else httpx.AsyncClient(timeout=timeout)
        self._own_http = http is None
        self._token: str | None = None
        self._expires = 0.0

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    # -- authentication ------------------------------------------------------------------
    async def token(self, *, renew: bool = False) -> str:
        """A bearer token for this client (cached until shortly before it expires)."""
        if not renew and self._token is not None and time.time() < self._expires:
            return self._token
        if self.token_url is None:
            conf = await self._json("GET", f"{self.fhir_base}/.well-known/smart-configuration")
            if not isinstance(conf.get("token_endpoint"), str):
                raise RemoteError("the server's SMART configuration names no token endpoint")
            self.token_url = str(conf["token_endpoint"])
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.key.assertion(self.client_id, self.token_url),
            "scope": self.scope,
        }
        doc = await self._json("POST", self.token_url, data=form)
        token, expires_in = doc.get("access_token"), doc.get("expires_in", 300)
        if not isinstance(token, str) or str(doc.get("token_type", "")).lower() != "bearer":
            raise RemoteError("the token endpoint answered without a bearer token")
        lifetime = float(expires_in) if isinstance(expires_in, int | float) else 300.0
        self._token = token
        self._expires = time.time() + max(0.0, lifetime - _RENEW_MARGIN)
        return token

    # -- FHIR ----------------------------------------------------------------------------
    async def read(self, resource_type: str, rid: str) -> dict[str, Any]:
        return await self._fhir("GET", f"{resource_type}/{rid}")

    async def vread(self, resource_type: str, rid: str, version: int | str) -> dict[str, Any]:
        return await self._fhir("GET", f"{resource_type}/{rid}/_history/{version}")

    async def history(self, resource_type: str, rid: str) -> list[dict[str, Any]]:
        """Every version of a resource, newest first (deleted versions have no resource)."""
        bundle = await self._fhir("GET", f"{resource_type}/{rid}/_history")
        return [e["resource"] for e in bundle.get("entry", []) if "resource" in e]

    async def search_page(
        self, resource_type: str, params: Mapping[str, str | int] | None = None
    ) -> dict[str, Any]:
        """One searchset Bundle (``_count``, ``_offset`` as parameters)."""
        query = {k: str(v) for k, v in (params or {}).items()}
        return await self._fhir("GET", resource_type, params=query)

    async def search(
        self, resource_type: str, **params: str | int
    ) -> AsyncIterator[dict[str, Any]]:
        """Every match, following the Bundles' ``next`` links (each page is one logged access)."""
        bundle = await self.search_page(resource_type, params)
        seen: set[str] = set()
        while True:
            for entry in bundle.get("entry", []):
                if entry.get("search", {}).get("mode", "match") == "match" and "resource" in entry:
                    yield entry["resource"]
            nxt = next(
                (ln["url"] for ln in bundle.get("link", []) if ln["relation"] == "next"), None
            )
            if nxt is None:
                return
            # only the link's query is taken, and asked of this client's own base: a
            # server's link cannot send the bearer token to another host
            query = urlsplit(str(nxt)).query
            if query in seen:
                raise RemoteError(f"the server's next link repeats a page ({query})")
            seen.add(query)
            bundle = await self._fhir("GET", f"{resource_type}?{query}")

    async def search_all(self, resource_type: str, **params: str | int) -> list[dict[str, Any]]:
        return [r async for r in self.search(resource_type, **params)]

    async def create(
        self, resource: Mapping[str, Any], *, if_none_exist: str | None = None
    ) -> dict[str, Any]:
        """POST the resource; returns it as stored (with its id and version).

        With ``if_none_exist`` (search criteria, e.g. ``"identifier=system|value"``) a
        conditional create: the resource the criteria match is returned instead when
        there is one, and :class:`RemoteError` 412 when several may match.
        """
        headers = {"If-None-Exist": if_none_exist} if if_none_exist is not None else None
        return await self._fhir(
            "POST", str(resource["resourceType"]), body=resource, headers=headers
        )

    async def update(
        self, resource: Mapping[str, Any], *, version: int | str | None = None
    ) -> dict[str, Any]:
        """PUT the resource; with ``version``, only if that is still the current one (412)."""
        headers = {"If-Match": f'W/"{version}"'} if version is not None else None
        path = f"{resource['resourceType']}/{resource['id']}"
        return await self._fhir("PUT", path, body=resource, headers=headers)

    async def delete(
        self, resource_type: str, rid: str, *, version: int | str | None = None
    ) -> None:
        headers = {"If-Match": f'W/"{version}"'} if version is not None else None
        await self._fhir("DELETE", f"{resource_type}/{rid}", headers=headers)

    async def everything(self, patient: str) -> dict[str, Any]:
        """``Patient/[id]/$everything``: a searchset Bundle of what this client may see."""
        return await self._fhir("GET", f"Patient/{patient}/$everything")

    async def erase(self, patient: str) -> dict[str, Any]:
        """``Patient/[id]/$erase``: crypto-shred every record of the patient (asked by the
        patient, or by a custodian's system client); returns the OperationOutcome."""
        return await self._fhir("POST", f"Patient/{patient}/$erase")

    async def bundle(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        """POST a ``transaction`` or ``batch`` Bundle; returns the response Bundle."""
        return await self._fhir("POST", "", body=bundle)

    # -- the ledger, verified here ---------------------------------------------------------
    async def checkpoint(self) -> Checkpoint:
        """The node's newest checkpoint that a quorum of the pinned keys signed (verified here).

        In a consortium each node signs its newest checkpoint alone and gathers the
        others' signatures over the next gossip round, so this asks for the newest one
        with ``trust.quorum`` signers (:class:`RemoteError` 404 if none is recent).
        """
        return (await self.checkpoint_note())[0]

    async def checkpoint_note(self) -> tuple[Checkpoint, str]:
        """:meth:`checkpoint` with its signed note, to keep (``trust.check(note)`` reopens it)."""
        trust = self._trust()
        doc = await self._json(
            "GET",
            f"{self.ledger_base}/checkpoint",
            params={"min_signatures": str(trust.quorum)},
        )
        note = _text(doc, "note")
        return trust.check(note), note

    async def access_proof(self, audit_event: str, at: Checkpoint | None = None) -> AccessProof:
        """Verify an AuditEvent's ``access.log`` entry and its inclusion in the ledger.

        The proof is asked against ``at`` (default: :meth:`checkpoint`, the newest one a
        quorum signed). Checks, here: the transaction's bytes hash to the event's id; its
        signature; the leaf hash; the checkpoint's signatures (:attr:`trust`) and that
        it is ``at``; the inclusion proof against its root. Raises :class:`ProofError`
        (also when the entry is newer than ``at``: ask again after the next gossip
        round), :class:`CheckpointError` or
        :class:`~medledger.errors.BadTransactionSignature`.
        """
        trust = self._trust()
        if at is None:
            at = await self.checkpoint()
        block = at.block_info()
        query = {"height": str(block.height)} if block is not None else None
        try:
            doc = await self._fhir("GET", f"AuditEvent/{audit_event}/$proof", params=query)
        except RemoteError as exc:
            if exc.status == 422:
                raise ProofError(f"{exc} (not yet in the checkpoint of {at.size} entries)") from exc
            raise
        params: dict[str, list[Any]] = {}
        for p in doc.get("parameter", []):
            value = next((v for k, v in p.items() if k.startswith("value")), None)
            params.setdefault(str(p.get("name")), []).append(value)

        def one(name: str) -> Any:
            got = params.get(name) or [None]
            if len(got) != 1 or got[0] is None:
                raise ProofError(f"the proof has no single {name}")
            return got[0]

        try:
            raw = base64.b64decode(str(one("canonicalTransaction")), validate=True)
        except ValueError as exc:
            raise ProofError("the transaction bytes are not base64") from exc
        if hashlib.sha256(raw).hexdigest() != audit_event.lower():
            raise ProofError(f"the proved transaction is not AuditEvent/{audit_event}")
        tx = Transaction.from_bytes(raw)
        tx.verify_signature()
        if tx.type != "access.log":
            raise ProofError(f"AuditEvent/{audit_event} is a {tx.type}, not an access.log entry")
        leaf = leaf_hash(raw)
        if str(one("leafHash")).lower() != leaf.hex():
            raise ProofError("the leaf hash does not match the transaction")
        cp = trust.check(str(one("checkpoint")))
        if (cp.size, cp.root) != (at.size, at.root):
            raise ProofError("the proof is against another checkpoint than the one asked for")
        index, size = one("leafIndex"), one("treeSize")
        if not isinstance(index, int) or not isinstance(size, int) or size != cp.size:
            raise ProofError("the proof is not for the checkpoint's tree size")
        try:
            path = [bytes.fromhex(str(h)) for h in params.get("proof", [])]
        except ValueError as exc:
            raise ProofError("the audit path is not hex") from exc
        verify_inclusion(index, size, leaf, path, cp.root)
        return AccessProof(tx, index, cp, tuple(path))

    async def prove_append_only(
        self, older: Checkpoint, newer: Checkpoint | None = None
    ) -> Checkpoint:
        """Check that the log at ``newer`` (default: the latest trusted checkpoint) extends
        the log at ``older``; returns ``newer``. Raises :class:`ProofError` if it does not."""
        if newer is None:
            newer = await self.checkpoint()
        if newer.size < older.size:
            raise ProofError(f"the log shrank from {older.size} to {newer.size} entries")
        doc = await self._json(
            "GET",
            f"{self.ledger_base}/consistency",
            params={"first": str(older.size), "second": str(newer.size)},
        )
        proof = doc.get("proof")
        if not isinstance(proof, list):
            raise ProofError("the consistency answer holds no proof")
        try:
            hashes = [bytes.fromhex(str(h)) for h in proof]
        except ValueError as exc:
            raise ProofError("the consistency proof is not hex") from exc
        verify_consistency(older.size, newer.size, hashes, older.root, newer.root)
        return newer

    # -- plumbing ----------------------------------------------------------------------------
    def _trust(self) -> Trust:
        if self.trust is None:
            raise CheckpointError("no trusted node keys: give the client a Trust")
        return self.trust

    async def _fhir(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        url = f"{self.fhir_base}/{path}".rstrip("/")  # always under the FHIR base
        extra = {"Accept": FHIR_JSON, **(headers or {})}
        if self.purpose:
            extra["X-Purpose-Of-Use"] = self.purpose
        content = None
        if body is not None:
            extra["Content-Type"] = FHIR_JSON
            content = dump_json(body).encode()
        for attempt in (0, 1):
            extra["Authorization"] = f"Bearer {await self.token(renew=attempt == 1)}"
            r = await self._send(method, url, params=params, headers=extra, content=content)
            if r.status_code != 401:
                break
        return _answer(r)

    async def _json(
        self,
        method: str,
        url: str,
        *,
        data: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        return _answer(await self._send(method, url, data=data, params=params))

    async def _send(self, method: str, url: str, **kw: Any) -> httpx.Response:
        try:
            return await self._http.request(method, url, **kw)
        except httpx.HTTPError as exc:  # no answer: connection refused, timeout, TLS ...
            raise RemoteError(f"{method} {url}: {exc!r}", status=0) from exc


def _answer(r: httpx.Response) -> dict[str, Any]:
    """The JSON object of a 2xx answer; :class:`RemoteError` otherwise."""
    try:
        doc = load_json(r.content) if r.content else {}
    except ValueError:
        doc = None
    if r.is_success and isinstance(doc, dict):
        return doc
    outcome = (
        doc if isinstance(doc, dict) and doc.get("resourceType") == "OperationOutcome" else None
    )
    if outcome is not None:
        message = "; ".join(
            str(i.get("diagnostics") or i.get("code")) for i in outcome.get("issue", [])
        )
    elif isinstance(doc, dict):
        message = str(doc.get("error_description") or doc.get("detail") or doc.get("error") or "")
    else:
        message = r.text[:200]
    if r.is_success:
        message = "the answer is not a JSON object"
    raise RemoteError(
        f"{r.request.method} {r.request.url}: {r.status_code} {message}".rstrip(),
        status=r.status_code,
        outcome=outcome,
    )


def _text(doc: Mapping[str, Any], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str):
        raise CheckpointError(f"the answer holds no {name}")
    return value


def _sibling(fhir_base: str, path: str) -> str:
    """``https://h/x/fhir`` -> ``https://h/x/<path>``."""
    parts = urlsplit(fhir_base)
    prefix = parts.path.rstrip("/")
    if prefix.endswith("/fhir"):
        prefix = prefix[: -len("/fhir")]
    return urlunsplit((parts.scheme, parts.netloc, f"{prefix}/{path}", "", ""))
