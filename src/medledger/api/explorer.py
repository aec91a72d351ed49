"""The portal's own API (mounted at ``/api``): ledger explorer, demo sign-in, break-glass
declarations and access requests.

The portal must be able to show, and let the browser check for itself, what is
on the ledger: blocks, the latest signed checkpoint with its co-signatures and
the keys that verify it, a transaction with its canonical bytes and inclusion
proof, consistency between two log sizes, and the result of a full ``verify``.

Who may see what:

* ``GET /ledger/checkpoint`` and ``GET /ledger/consistency`` are public: checkpoints
  exist to be gossiped and proofs hold only hashes; the verifier keys are the member
  organisations' registered node keys.
* Everything else needs a bearer token from the SMART authority. Transaction
  payloads carry no plaintext PHI, only pseudonymous ids, commitments, consents
  and access decisions; practitioners and system clients of member organisations
  (whose nodes replicate the whole ledger anyway) see them, a patient sees a
  payload only when the transaction concerns them (their own access log entries,
  consents and records) and otherwise only its envelope. ``/ledger/custodians``
  tells which organisation holds each record (a patient: their own only).

Break-glass (``POST /break-glass``): an emergency clinician opens an emergency
access window with a reason (``breakglass.declare``, signed by their
organisation's node); FHIR reads with ``X-Purpose-Of-Use: ETREAT`` and
``X-Break-Glass: true`` then succeed, each logged as break-glass. Every
declaration awaits review by a privacy officer of the same organisation:
``GET /break-glass/reviews`` lists the organisation's declarations (open ones
first, by deadline) with the break-glass reads logged under each (to a patient:
the declarations about them, from every organisation, and their reviews), and
``POST /break-glass/reviews/{id}`` closes one (``breakglass.review``, signed with
the officer's own key, which this node must hold; otherwise the officer signs
with ``medledger breakglass review``).

Access requests (``/access-requests``): a refused clinician asks the patient for
access; the patient answers with a consent (on the ledger, through the FHIR API)
or declines. Requests are messages kept by the node, not ledger entries.

Demo sign-in (``/demo/...``) exists only while the runtime carries demo
identities: it issues a token for a pre-registered client directly through
:meth:`SmartAuthority.issue`, standing in for a real SMART launch.

The router reads ``request.app.state.runtime`` (:class:`medledger.api.runtime.Runtime`)
for ``node``, ``smart``, ``demo_identities``, ``demo_token_ttl``, ``orgs``,
``submitter`` and ``data_dir``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import secrets
import time
from pathlib import Path as FsPath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from pydantic import BaseModel, Field, StringConstraints

from medledger.contracts._common import PURPOSES
from medledger.contracts.breakglass_v1 import declarations, k_review
from medledger.contracts.core import ROLES, k_key, k_principal
from medledger.crypto.signing import VerifyKey
from medledger.encoding import decode
from medledger.errors import (
    Conflict,
    IntegrityError,
    MedledgerError,
    NotFound,
    NotFoundError,
    TransactionRejected,
    Unauthorized,
)
from medledger.ledger.block import BlockHeader
from medledger.ledger.checkpoint import checkpoint_of
from medledger.ledger.note import NoteVerifier, note_text, signature_lines
from medledger.ledger.tx import Transaction
from medledger.ledger.verify import verify_ledger
from medledger.node import Node, signer_name
from medledger.state.base import StateReader

__all__ = ["router"]

router = APIRouter(tags=["portal"])

MAX_PAGE = 100
MAX_BLOCK_TXS = 500  # transactions listed with a block (an import block can hold thousands)
MAX_HEIGHT = 2**62
TX_ID_PATTERN = r"^[0-9a-fA-F]{64}$"
DEFAULT_DEMO_TTL = 900
_NO_STORE = {"Cache-Control": "no-store"}
_BEARER = {"WWW-Authenticate": 'Bearer realm="medledger"'}
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing, unknown or expired bearer token"},
    404: {"description": "not found"},
}


# -- runtime and caller ----------------------------------------------------------------------


def _runtime(request: Request) -> Any:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise HTTPException(503, "the node is not running")
    return runtime


Runtime = Annotated[Any, Depends(_runtime)]


class Viewer:
    """Who is looking, as far as the explorer cares."""

    __slots__ = ("client_id", "expires_at", "kind", "org", "scope", "subject")

    def __init__(
        self,
        kind: str,
        subject: str,
        org: str | None,
        client_id: str,
        scope: str,
        expires_at: int,
    ) -> None:
        self.kind = kind
        self.subject = subject
        self.org = org
        self.client_id = client_id
        self.scope = scope
        self.expires_at = expires_at

    @classmethod
    def from_token(cls, info: Any) -> Viewer:
        client = info.client
        if client.patient:
            kind, subject, org = "patient", str(client.patient), None
        elif client.practitioner:
            kind, subject, org = "practitioner", str(client.practitioner), client.org
        else:
            kind, subject, org = "system", str(client.client_id), client.org
        return cls(kind, subject, org, client.client_id, info.scope_text, int(info.expires_at))

    def to_json(self) -> dict[str, Any]:
        return {
            "subject_kind": self.kind,
            "subject": self.subject,
            "org": self.org,
            "client_id": self.client_id,
            "scope": self.scope,
            "expires_at": self.expires_at,
        }


async def _viewer(request: Request, runtime: Runtime) -> Viewer:
    from medledger.api.smart import SmartError

    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(401, "a bearer token is required", headers=_BEARER)
    try:
        info = await runtime.smart.introspect(token)
    except SmartError as exc:
        detail = getattr(exc, "description", None) or str(exc) or "invalid token"
        raise HTTPException(401, detail, headers=_BEARER) from exc
    return Viewer.from_token(info)


CurrentViewer = Annotated[Viewer, Depends(_viewer)]


def _node(runtime: Any) -> Node:
    node: Node = runtime.node
    return node


# -- ledger lookups ------------------------------------------------------------------------


def _org_rows(state: StateReader) -> list[dict[str, Any]]:
    out = []
    for key, raw in state.scan(b"org/"):
        org = decode(raw)
        out.append(
            {
                "id": key[4:].decode(),
                "name": org.get("name"),
                "status": org.get("status"),
                "node_key": org["node_key"],
            }
        )
    return out


async def _orgs(node: Node) -> list[dict[str, Any]]:
    return await node.read(_org_rows)


def _verifiers(node: Node, orgs: list[dict[str, Any]]) -> list[NoteVerifier]:
    """Note verifiers of every member organisation's registered node key."""
    return [
        NoteVerifier(signer_name(node.network, o["id"]), VerifyKey(o["node_key"])) for o in orgs
    ]


def _principal_of_key(state: StateReader, key_id: bytes) -> str | None:
    raw = state.get(k_key(key_id))
    if raw is None:
        return None
    principal: str = decode(raw)["principal"]
    return principal


def _principals(state: StateReader, key_ids: list[bytes]) -> dict[bytes, str | None]:
    return {kid: _principal_of_key(state, kid) for kid in set(key_ids)}


def _proposer_org(state: StateReader, key_id: bytes) -> str | None:
    pid = _principal_of_key(state, key_id)
    if pid is None:
        return None
    raw = state.get(k_principal(pid))
    if raw is None:
        return None
    org: str | None = decode(raw).get("org")
    return org


def _hex(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _hex(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_hex(v) for v in value]
    return value


def _concerns(viewer: Viewer, tx: Transaction, signer: str | None) -> bool:
    """Whether a patient may see this transaction's payload."""
    if viewer.kind != "patient":
        return True
    if signer == viewer.subject:
        return True
    payload = tx.payload
    if payload.get("patient") == viewer.subject:
        return True
    consent = payload.get("consent")
    return isinstance(consent, dict) and consent.get("patient") == viewer.subject


def _block_json(header: BlockHeader, sig: bytes, proposer_org: str | None) -> dict[str, Any]:
    doc = header.to_json()
    doc["sig"] = sig.hex()
    doc["proposer_org"] = proposer_org
    return doc


# -- public endpoints ----------------------------------------------------------------------


#: how many blocks back ``min_signatures`` looks for a checkpoint signed often enough
COSIGNED_DEPTH = 1000


def _signers(note: str, known: set[tuple[str, bytes]]) -> int:
    """Distinct member key names with a signature line on ``note`` (lines are not verified:
    a node stores co-signatures only after verifying them, and clients verify again)."""
    return len({sig.name for _, sig in signature_lines(note) if (sig.name, sig.key_hash) in known})


async def _cosigned(
    node: Node, verifiers: list[NoteVerifier], need: int, found: dict[int, tuple[int, str]]
) -> str | None:
    """The newest stored checkpoint signed by at least ``need`` members (of the last
    :data:`COSIGNED_DEPTH` blocks), or None.

    ``found`` remembers the last answer per ``need`` (signatures are only ever added),
    so a call reads only the blocks committed since: the store has one thread, and a
    public endpoint must not be able to make it read a thousand checkpoints per request.
    """
    if need > len(verifiers):
        return None  # more signers than members: never
    known = {(v.name, v.key_hash) for v in verifiers}
    last = found.get(need)

    def scan(store: Any) -> tuple[int, str] | None:
        head = store.head_height()
        floor = max(-1, head - COSIGNED_DEPTH)
        if last is not None:
            floor = max(floor, last[0])
        for height in range(head, floor, -1):
            got = store.get_checkpoint(height)
            if got is not None and _signers(got[1], known) >= need:
                return int(got[0]), str(got[1])
        return last if last is not None and last[0] > head - COSIGNED_DEPTH else None

    hit = await node.storage(scan)
    if hit is None:
        found.pop(need, None)
        return None
    found[need] = hit
    return hit[1]


@router.get(
    "/ledger/checkpoint",
    summary="Latest signed checkpoint with its co-signatures",
    responses={404: {"description": "no recent checkpoint has min_signatures signers"}},
)
async def get_checkpoint(
    runtime: Runtime,
    request: Request,
    response: Response,
    min_signatures: Annotated[
        int,
        Query(
            ge=1,
            le=64,
            description="the newest checkpoint signed by at least this many member nodes "
            "(in a consortium the newest one has its own node's signature until the next "
            "gossip round)",
        ),
    ] = 1,
) -> dict[str, Any]:
    """The latest checkpoint note, its parsed body, each signature line and the verifier keys.

    ``verified`` on a signature is the server's own check; the portal checks again in
    the browser with the listed ``verifier_keys``. With ``min_signatures``, the newest
    checkpoint of the last blocks that at least that many member nodes signed.
    """
    node = _node(runtime)
    orgs = await _orgs(node)
    verifiers = _verifiers(node, orgs)
    if min_signatures > 1:
        cache: dict[int, tuple[int, str]] | None = getattr(
            request.app.state, "explorer_cosigned", None
        )
        if cache is None:
            cache = request.app.state.explorer_cosigned = {}
        found = await _cosigned(node, verifiers, min_signatures, cache)
        if found is None:
            raise HTTPException(
                404,
                f"no checkpoint of the last {COSIGNED_DEPTH} blocks has {min_signatures} signers",
            )
        note = found
    else:
        note = await node.checkpoint()
    by_id = {(v.name, v.key_hash): v for v in verifiers}
    names = {signer_name(node.network, o["id"]): o for o in orgs}
    text = note_text(note)
    cp = checkpoint_of(note)
    sigs = []
    for _line, sig in signature_lines(note):
        known = by_id.get((sig.name, sig.key_hash))
        org = names.get(sig.name)
        sigs.append(
            {
                "name": sig.name,
                "key_hash": sig.key_hash.hex(),
                "org": org["id"] if org else None,
                "org_name": org["name"] if org else None,
                "known": known is not None,
                "verified": known is not None and known.verify(text, sig),
            }
        )
    block = cp.block_info()
    response.headers["Cache-Control"] = "no-cache"
    return {
        "note": note,
        "origin": cp.origin,
        "size": cp.size,
        "root": cp.root.hex(),
        "block": None
        if block is None
        else {
            "height": block.height,
            "hash": block.block_hash.hex(),
            "state_root": block.state_root.hex(),
        },
        "signatures": sigs,
        "verifier_keys": [v.verifier_key() for v in verifiers],
        "orgs": [{"id": o["id"], "name": o["name"], "status": o["status"]} for o in orgs],
    }


# -- demo sign-in --------------------------------------------------------------------------


def _demo_identities(runtime: Any) -> list[dict[str, Any]]:
    identities = getattr(runtime, "demo_identities", None)
    if not identities:
        raise HTTPException(404, "demo sign-in is not enabled on this node")
    return list(identities)


def _public_identity(ident: dict[str, Any]) -> dict[str, Any]:
    return {k: ident.get(k) for k in ("id", "label", "kind", "org", "org_name", "roles")}


@router.get("/demo/identities", summary="Demo identities for the sign-in picker", responses=_ERRORS)
async def demo_identities(runtime: Runtime) -> list[dict[str, Any]]:
    return [_public_identity(i) for i in _demo_identities(runtime)]


class DemoLogin(BaseModel):
    identity: str = Field(min_length=1, max_length=200)


@router.post("/demo/login", summary="Sign in as a demo identity", responses=_ERRORS)
async def demo_login(body: DemoLogin, runtime: Runtime, response: Response) -> dict[str, Any]:
    """Issue an access token for a demo identity's registered SMART client."""
    idents = {i["id"]: i for i in _demo_identities(runtime)}
    ident = idents.get(body.identity)
    if ident is None:
        raise HTTPException(404, f"no demo identity {body.identity!r}")
    client = await runtime.smart.get_client(ident["client_id"])
    if client is None:
        raise HTTPException(404, f"the client of demo identity {body.identity!r} is gone")
    ttl = int(getattr(runtime, "demo_token_ttl", None) or DEFAULT_DEMO_TTL)
    info = await runtime.smart.issue(client, client.scope, ttl=ttl)
    viewer = Viewer.from_token(info)
    response.headers.update(_NO_STORE)
    return {
        "access_token": info.token,
        "token_type": "bearer",
        "expires_in": ttl,
        "scope": info.scope_text,
        "identity": {**_public_identity(ident), **viewer.to_json()},
    }


@router.get("/session", summary="Who the bearer token speaks for", responses=_ERRORS)
async def session(viewer: CurrentViewer, response: Response) -> dict[str, Any]:
    response.headers.update(_NO_STORE)
    return viewer.to_json()


# -- authenticated explorer endpoints ----------------------------------------------------------


@router.get("/ledger/directory", summary="Organisations, practitioners, roles and purposes")
async def directory(runtime: Runtime, viewer: CurrentViewer) -> dict[str, Any]:
    """What a consent form can name: member organisations, practitioners, roles, purposes."""
    node = _node(runtime)

    def _read(state: StateReader) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        people = []
        for _key, raw in state.scan(b"principal/"):
            p = decode(raw)
            if p.get("kind") in ("practitioner", "app"):
                people.append(
                    {
                        "id": p["id"],
                        "kind": p["kind"],
                        "org": p.get("org"),
                        "roles": list(p.get("roles") or []),
                        "status": p.get("status"),
                    }
                )
        return _org_rows(state), people

    orgs, people = await node.read(_read)
    return {
        "orgs": [{"id": o["id"], "name": o["name"], "status": o["status"]} for o in orgs],
        "practitioners": people,
        "roles": list(ROLES),
        "purposes": sorted(PURPOSES),
    }


class CustodianQuery(BaseModel):
    ids: list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] = Field(
        max_length=1000
    )


@router.post(
    "/ledger/custodians",
    summary="Which organisation holds each record, as registered on the ledger",
    responses=_ERRORS,
)
async def custodians(
    body: CustodianQuery, runtime: Runtime, viewer: CurrentViewer
) -> dict[str, str]:
    """``{record id: custodian org}`` from the ledger's ``record/<id>`` entries.

    The portal labels each record of a timeline with the organisation that holds it.
    A patient learns this only for their own records; unknown ids are left out.
    """
    node = _node(runtime)
    wanted = list(dict.fromkeys(body.ids))

    def _read(state: StateReader) -> dict[str, str]:
        out = {}
        for rid in wanted:
            raw = state.get(f"record/{rid}".encode())
            if raw is None:
                continue
            rec = decode(raw)
            if viewer.kind == "patient" and rec.get("patient") != viewer.subject:
                continue
            if isinstance(rec.get("custodian"), str):
                out[rid] = rec["custodian"]
        return out

    return await node.read(_read)


@router.get("/ledger/blocks", summary="A page of block headers, newest first", responses=_ERRORS)
async def list_blocks(
    runtime: Runtime,
    viewer: CurrentViewer,
    start: Annotated[int | None, Query(ge=0, le=MAX_HEIGHT, description="lowest height")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
) -> dict[str, Any]:
    node = _node(runtime)
    head = node.head.height
    first = max(0, head - limit + 1) if start is None else start
    last = min(head, first + limit - 1)
    blocks = []
    for height in range(last, first - 1, -1):
        header, sig = await node.get_block(height)
        org = await node.read(functools.partial(_proposer_org, key_id=header.proposer))
        blocks.append(_block_json(header, sig, org))
    return {"head": head, "start": first, "limit": limit, "blocks": blocks}


@router.get("/ledger/blocks/{height}", summary="One block with its transactions", responses=_ERRORS)
async def get_block(
    runtime: Runtime,
    viewer: CurrentViewer,
    height: Annotated[int, Path(ge=0, le=MAX_HEIGHT)],
) -> dict[str, Any]:
    node = _node(runtime)
    try:
        header, sig = await node.get_block(height)
    except NotFoundError as exc:
        raise HTTPException(404, str(exc)) from exc
    shown = min(header.count, MAX_BLOCK_TXS)
    recs = await node.list_txs(header.first, shown) if shown else []
    parsed = [Transaction.from_bytes(r.raw) for r in recs]

    def _read(state: StateReader) -> tuple[dict[bytes, str | None], str | None, bool | None]:
        signers = _principals(state, [t.signer for t in parsed])
        org = _proposer_org(state, header.proposer)
        key_raw = state.get(k_key(header.proposer)) if header.proposer else None
        sig_ok: bool | None = None
        if key_raw is not None:
            try:
                header.verify_signature(decode(key_raw)["pub"], sig)
                sig_ok = True
            except IntegrityError:
                sig_ok = False
        return signers, org, sig_ok

    signers, org, sig_ok = await node.read(_read)
    stored = await node._run(lambda: node.store.get_checkpoint(height))
    doc = _block_json(header, sig, org)
    doc["sig_verified"] = sig_ok
    doc["checkpoint"] = stored[1] if stored is not None and stored[0] == height else None
    doc["txs_truncated"] = header.count > shown
    doc["txs"] = [
        {
            "index": r.index,
            "tx_id": r.tx_id.hex(),
            "type": t.type,
            "signer": t.signer.hex(),
            "signer_principal": signers.get(t.signer),
            "time": t.time,
        }
        for r, t in zip(recs, parsed, strict=True)
    ]
    return doc


async def _tx_record(node: Node, tx_id: str) -> Any:
    try:
        return await node.get_tx(bytes.fromhex(tx_id))
    except NotFoundError as exc:
        raise HTTPException(404, str(exc)) from exc


TxId = Annotated[str, Path(pattern=TX_ID_PATTERN, description="transaction id (64 hex digits)")]


@router.get(
    "/ledger/tx/{tx_id}", summary="One transaction and its canonical bytes", responses=_ERRORS
)
async def get_tx(runtime: Runtime, viewer: CurrentViewer, tx_id: TxId) -> dict[str, Any]:
    """The transaction envelope; payload and canonical bytes when the viewer may see them."""
    node = _node(runtime)
    rec = await _tx_record(node, tx_id)
    tx = Transaction.from_bytes(rec.raw)
    signer = await node.read(lambda s: _principal_of_key(s, tx.signer))
    visible = _concerns(viewer, tx, signer)
    return {
        "tx_id": rec.tx_id.hex(),
        "index": rec.index,
        "height": rec.height,
        "network": tx.network,
        "type": tx.type,
        "signer": tx.signer.hex(),
        "signer_principal": signer,
        "seq": tx.seq,
        "time": tx.time,
        "redacted": not visible,
        "payload": _hex(tx.payload) if visible else None,
        "canonical_bytes": base64.b64encode(rec.raw).decode() if visible else None,
    }


@router.get(
    "/ledger/tx/{tx_id}/proof",
    summary="Inclusion proof of a transaction against the latest checkpoint",
    responses=_ERRORS,
)
async def get_tx_proof(runtime: Runtime, viewer: CurrentViewer, tx_id: TxId) -> dict[str, Any]:
    """The proof, the checkpoint it verifies against, the verifier keys and (when the
    viewer may see the transaction) its canonical bytes, so the browser can check it all.

    Not an access to a patient's records, so nothing is logged.
    """
    node = _node(runtime)
    rec = await _tx_record(node, tx_id)
    proof = await node.inclusion_proof(rec.tx_id)
    tx = Transaction.from_bytes(rec.raw)
    signer = await node.read(lambda s: _principal_of_key(s, tx.signer))
    visible = _concerns(viewer, tx, signer)
    orgs = await _orgs(node)
    return {
        "tx_id": rec.tx_id.hex(),
        **proof.to_json(),
        "canonical_bytes": base64.b64encode(rec.raw).decode() if visible else None,
        "verifier_keys": [v.verifier_key() for v in _verifiers(node, orgs)],
    }


@router.get(
    "/ledger/consistency",
    summary="Consistency proof between two log sizes",
    responses={**_ERRORS, 400: {"description": "first > second"}},
)
async def get_consistency(
    runtime: Runtime,
    first: Annotated[int, Query(ge=0, le=MAX_HEIGHT)],
    second: Annotated[int, Query(ge=0, le=MAX_HEIGHT)],
) -> dict[str, Any]:
    """Proof that the log at ``second`` entries extends the log at ``first`` entries.

    Public, like checkpoints: it holds only hashes, and lets anyone holding an older
    checkpoint check that the log only grew.
    """
    node = _node(runtime)
    if first > second:
        raise HTTPException(400, "first must not exceed second")
    try:
        root1, root2, proof = await node.consistency_proof(first, second)
    except (NotFoundError, MedledgerError) as exc:
        raise HTTPException(404, str(exc)) from exc
    return {
        "first": first,
        "second": second,
        "root1": root1.hex(),
        "root2": root2.hex(),
        "proof": [h.hex() for h in proof],
    }


class _VerifyCache:
    """One full verification at a time; the last report is reused while the head is unchanged."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.height: int | None = None
        self.report: dict[str, Any] | None = None


@router.get("/ledger/verify", summary="Verify the whole ledger from genesis", responses=_ERRORS)
async def verify(runtime: Runtime, viewer: CurrentViewer, request: Request) -> dict[str, Any]:
    """``medledger verify`` for the running node (cached until the next block)."""
    node = _node(runtime)
    cache: _VerifyCache | None = getattr(request.app.state, "explorer_verify", None)
    if cache is None:
        cache = _VerifyCache()
        request.app.state.explorer_verify = cache
    async with cache.lock:
        height = node.head.height
        if cache.report is None or cache.height != height:
            # On the storage thread: a consistent snapshot (commits wait meanwhile).
            report = await node._run(lambda: verify_ledger(node.store))
            cache.report, cache.height = report.to_json(), height
        assert cache.report is not None
        return {**cache.report, "head_height": cache.height}


# -- access requests ---------------------------------------------------------------------------
#
# A clinician who is refused can ask the patient for access; the patient answers by
# granting a consent (a signed ledger transaction, through POST /fhir/Consent) or by
# declining. The request itself is only a message between the two, kept by the node
# next to its data (``DIR/access-requests.json``), never on the ledger.

MAX_REQUESTS = 10_000
PATIENT_ID_PATTERN = r"^pat-[0-9a-f]{32}$"
ResourceType = Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Za-z]{1,63}$")]


class AccessRequestIn(BaseModel):
    patient: str = Field(pattern=PATIENT_ID_PATTERN)
    purpose: str = Field(default="TREAT", min_length=2, max_length=16)
    resource_types: list[ResourceType] = Field(default_factory=list, max_length=20)
    note: str = Field(default="", max_length=500)


class AccessRequestUpdate(BaseModel):
    status: Literal["granted", "declined"]
    consent: str | None = Field(default=None, max_length=100)


class _Requests:
    """The node's access requests, persisted as one JSON file (or in memory)."""

    def __init__(self, path: FsPath | None) -> None:
        self.path = path
        self.lock = asyncio.Lock()
        self.items: list[dict[str, Any]] = []
        if path is not None and path.exists():
            try:
                loaded = json.loads(path.read_text())
            except (OSError, ValueError):
                loaded = []
            self.items = (
                [i for i in loaded if isinstance(i, dict)] if isinstance(loaded, list) else []
            )

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.items, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def _requests(request: Request, runtime: Any) -> _Requests:
    store: _Requests | None = getattr(request.app.state, "access_requests", None)
    if store is None:
        data_dir = getattr(getattr(runtime, "data_dir", None), "path", None)
        path = FsPath(data_dir) / "access-requests.json" if data_dir is not None else None
        store = _Requests(path)
        request.app.state.access_requests = store
    return store


@router.post(
    "/access-requests",
    status_code=201,
    summary="A clinician asks a patient for access",
    responses={**_ERRORS, 403: {"description": "not a practitioner"}},
)
async def create_access_request(
    body: AccessRequestIn, request: Request, runtime: Runtime, viewer: CurrentViewer
) -> dict[str, Any]:
    if viewer.kind != "practitioner":
        raise HTTPException(403, "only a practitioner can ask a patient for access")
    if body.purpose not in PURPOSES:
        raise HTTPException(422, f"unknown purpose of use {body.purpose!r}")
    node = _node(runtime)
    if await node.state_get(f"patient/{body.patient}".encode()) is None:
        raise HTTPException(404, f"no patient {body.patient} on the ledger")
    store = _requests(request, runtime)
    now = int(time.time() * 1000)
    async with store.lock:
        for item in store.items:
            if (
                item["patient"] == body.patient
                and item["practitioner"] == viewer.subject
                and item["status"] == "pending"
            ):
                item.update(
                    purpose=body.purpose,
                    resource_types=list(body.resource_types),
                    note=body.note,
                    created=now,
                )
                store.save()
                return dict(item)
        if len(store.items) >= MAX_REQUESTS:
            store.items = [i for i in store.items if i["status"] == "pending"][-MAX_REQUESTS // 2 :]
        item = {
            "id": "req-" + secrets.token_hex(8),
            "patient": body.patient,
            "practitioner": viewer.subject,
            "org": viewer.org,
            "purpose": body.purpose,
            "resource_types": list(body.resource_types),
            "note": body.note,
            "created": now,
            "status": "pending",
            "consent": None,
        }
        store.items.append(item)
        store.save()
        return dict(item)


@router.get("/access-requests", summary="Access requests for or by the caller", responses=_ERRORS)
async def list_access_requests(
    request: Request, runtime: Runtime, viewer: CurrentViewer
) -> list[dict[str, Any]]:
    """A patient sees requests made to them; a practitioner the ones they made."""
    store = _requests(request, runtime)
    key = {"patient": "patient", "practitioner": "practitioner"}.get(viewer.kind)
    if key is None:
        return [dict(i) for i in reversed(store.items) if i.get("org") == viewer.org][:MAX_PAGE]
    return [dict(i) for i in reversed(store.items) if i.get(key) == viewer.subject][:MAX_PAGE]


@router.post(
    "/access-requests/{request_id}",
    summary="The patient answers an access request",
    responses={**_ERRORS, 403: {"description": "not the patient asked"}},
)
async def answer_access_request(
    body: AccessRequestUpdate,
    request: Request,
    runtime: Runtime,
    viewer: CurrentViewer,
    request_id: Annotated[str, Path(pattern=r"^req-[0-9a-f]{16}$")],
) -> dict[str, Any]:
    store = _requests(request, runtime)
    async with store.lock:
        item = next((i for i in store.items if i["id"] == request_id), None)
        if item is None:
            raise HTTPException(404, f"no access request {request_id}")
        if viewer.kind != "patient" or viewer.subject != item["patient"]:
            raise HTTPException(403, "only the patient asked can answer")
        item.update(status=body.status, consent=body.consent, answered=int(time.time() * 1000))
        store.save()
        return dict(item)


# -- break-glass -------------------------------------------------------------------------------


class BreakGlassIn(BaseModel):
    patient: str = Field(pattern=PATIENT_ID_PATTERN)
    reason: str = Field(min_length=10, max_length=500)
    resource_types: list[ResourceType] = Field(default_factory=list, max_length=20)


@router.post(
    "/break-glass",
    status_code=201,
    summary="Declare emergency (break-glass) access to a patient's records",
    responses={
        **_ERRORS,
        403: {"description": "not an emergency clinician"},
        422: {"description": "invalid reason or resource types"},
    },
)
async def declare_break_glass(
    body: BreakGlassIn, runtime: Runtime, viewer: CurrentViewer
) -> dict[str, Any]:
    """Open an emergency access window for the calling practitioner (``breakglass.declare``).

    Signed by the node of the practitioner's organisation on their behalf. Reads made
    with ``X-Purpose-Of-Use: ETREAT`` and ``X-Break-Glass: true`` are then permitted
    until the window closes, each logged as break-glass, and the declaration awaits
    review by the organisation's privacy officer.
    """
    if viewer.kind != "practitioner" or viewer.org is None:
        raise HTTPException(403, "only a practitioner can declare break-glass")
    orgs = getattr(runtime, "orgs", {}) or {}
    crypto = orgs.get(viewer.org)
    if crypto is None:
        raise HTTPException(403, f"this node does not act for {viewer.org}")
    payload = {
        "patient": body.patient,
        "reason": body.reason.strip(),
        "resource_types": list(dict.fromkeys(body.resource_types)),
        "actor": viewer.subject,
    }
    try:
        receipt = await runtime.submitter.submit(crypto.signing, "breakglass.declare", payload)
    except (Unauthorized, NotFound) as exc:
        raise HTTPException(403 if isinstance(exc, Unauthorized) else 404, str(exc)) from exc
    except TransactionRejected as exc:
        raise HTTPException(422, str(exc)) from exc
    bid = receipt.tx_id.hex()
    declared = await runtime.node.state_get(f"bg/{body.patient}/{bid}".encode())
    until = decode(declared).get("until") if declared is not None else None
    return {
        "id": bid,
        "patient": body.patient,
        "actor": viewer.subject,
        "org": viewer.org,
        "until": until,
    }


# -- break-glass reviews -----------------------------------------------------------------------


class BreakGlassReviewIn(BaseModel):
    outcome: Literal["justified", "unjustified"]
    note: str = Field(default="", max_length=1000)


async def _privacy_officer(runtime: Any, viewer: Viewer) -> str:
    """The organisation the caller reviews for: an active privacy officer of an org of
    this node; 403 otherwise."""
    if viewer.kind != "practitioner" or viewer.org is None:
        raise HTTPException(403, "only a privacy officer reviews break-glass declarations")
    raw = await _node(runtime).state_get(k_principal(viewer.subject))
    principal = decode(raw) if raw is not None else {}
    if (
        principal.get("status") != "active"
        or principal.get("org") != viewer.org
        or "privacy-officer" not in (principal.get("roles") or [])
    ):
        raise HTTPException(403, "only a privacy officer reviews break-glass declarations")
    if viewer.org not in (getattr(runtime, "orgs", {}) or {}):
        raise HTTPException(403, f"this node does not act for {viewer.org}")
    return viewer.org


@router.get(
    "/break-glass/reviews",
    summary="The organisation's break-glass declarations, their reviews and the reads under them",
    responses={**_ERRORS, 403: {"description": "neither a privacy officer nor a patient"}},
)
async def list_break_glass_reviews(
    runtime: Runtime,
    viewer: CurrentViewer,
    status: Annotated[Literal["open", "closed", "all"], Query()] = "all",
) -> list[dict[str, Any]]:
    """Every declaration of the caller's organisation with its review (open ones first,
    soonest deadline first; then closed ones, latest first), each with the break-glass
    reads its actor made of the patient during the window (from the ledger's access
    log: time, outcome, purpose, resource types, records and the entry's transaction).
    ``overdue``: open past its deadline.

    A patient gets the declarations about them, from every organisation, with their
    reviews (the reads are in their own access record already).
    """
    patient_view = viewer.kind == "patient"
    org = None if patient_view else await _privacy_officer(runtime, viewer)
    node = _node(runtime)
    now = node.clock()
    items = await node.read(
        lambda state: declarations(
            state,
            now,
            org=org,
            patient=viewer.subject if patient_view else None,
            status=status,
            reads=not patient_view,
        )
    )
    return items[:MAX_PAGE]


@router.post(
    "/break-glass/reviews/{declaration}",
    summary="A privacy officer closes the review of a break-glass declaration",
    responses={
        **_ERRORS,
        403: {"description": "not a privacy officer of the declaring organisation"},
        409: {"description": "already reviewed"},
        422: {"description": "this node does not hold the officer's key"},
    },
)
async def review_break_glass(
    body: BreakGlassReviewIn,
    runtime: Runtime,
    viewer: CurrentViewer,
    declaration: Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")],
) -> dict[str, Any]:
    """Record the outcome (``breakglass.review``), signed with the officer's own key."""
    org = await _privacy_officer(runtime, viewer)
    raw = await _node(runtime).state_get(k_review(declaration))
    if raw is None:
        raise HTTPException(404, f"no break-glass declaration {declaration}")
    if decode(raw).get("org") != org:
        raise HTTPException(403, "a privacy officer reviews only their own organisation's")
    key = await runtime.fhir.practitioner_key(viewer.subject)
    if key is None:
        raise HTTPException(
            422,
            f"this node does not hold the key of {viewer.subject}: sign the review with "
            "your own key (medledger breakglass review)",
        )
    payload = {"id": declaration, "outcome": body.outcome, "note": body.note.strip()}
    try:
        receipt = await runtime.submitter.submit(key, "breakglass.review", payload)
    except Conflict as exc:
        raise HTTPException(409, str(exc)) from exc
    except Unauthorized as exc:
        raise HTTPException(403, str(exc)) from exc
    except TransactionRejected as exc:
        raise HTTPException(422, str(exc)) from exc
    return {
        "id": declaration,
        "status": "closed",
        "outcome": body.outcome,
        "reviewer": viewer.subject,
        "tx": receipt.tx_id.hex(),
    }
