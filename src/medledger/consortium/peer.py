"""The inter-node HTTP API of a node (its "peer API"), and the ledger submission endpoint.

Routes (all ``/peer/v1/...`` requests must be signed by a member's node key,
see :mod:`medledger.consortium.auth`):

``GET /health``
    unauthenticated; this node's height and consortium status (503 while writes
    are halted because of a divergence).
``GET /peer/v1/status``
    head height, hash, log size and roots, and the consortium status.
``GET /peer/v1/checkpoint[?height=h]``
    ``{"height", "note"}``: the latest signed checkpoint (or the one at ``h``),
    with the co-signatures collected so far.
``POST /peer/v1/cosign`` (body: a signed checkpoint note of the caller)
    co-sign it if this node has the same block at that height; otherwise say
    ``behind`` (with this node's latest) or ``divergent`` (with this node's own
    checkpoint at that height). See :mod:`medledger.consortium.gossip`.
``GET /peer/v1/blocks?start=h&limit=n`` → CBOR ``{"head", "blocks": [...], "position"}``
    signed blocks with their transactions, for catch-up, and the node's etcd
    ordering position ``[height, revision]`` (see :mod:`medledger.orderer.etcd`).
``POST /peer/v1/records/fetch`` (CBOR :class:`~medledger.consortium.client.RecordRequest`)
    → CBOR :class:`~medledger.consortium.client.RemoteRecord`. Served by the
    record's custodian only: it decides access on its own ledger state for the
    caller's practitioner, records the decision as an ``access.log`` transaction
    signed by its node (permit or deny), and on permit returns the ciphertext
    with the record key re-wrapped for the caller's organisation. When the
    caller's node already decided and logged the read (``access_tx``: the id of
    its committed ``access.log``), the custodian first waits (up to ``log_wait``)
    until that entry is on its own ledger, and with it everything ordered before
    it (the actor's registration, the consents the caller's node decided on), then
    still decides on its own state but only checks that entry (by the caller's
    node, naming this actor, record and purpose, recent) instead of logging a
    second one.
``/peer/v1/relay`` (WebSocket; the handshake is signed)
    another member's node hands over the transactions it received, for this node
    to propose (see "Relaying" in :mod:`medledger.orderer.etcd`): each message, a
    CBOR array of signed transactions, is answered in order with CBOR
    ``{"queued", "revision"}`` once they are queued (all or none), or
    ``{"error", "message", "status"}`` (400 if one does not parse, 503 while
    writes are halted or the node is not ordering). See
    :mod:`medledger.consortium.relay`.
``GET /ledger/v1/seq/<key id hex>``
    ``{"seq"}``: the last sequence number the key used on this node's ledger
    (what a client signing its own transactions needs next, plus one).
``POST /ledger/v1/txs`` (CBOR list of signed transactions)
    submit and wait for commitment; one result per transaction. Transactions
    authenticate themselves (every one is signed by a registered key), so this
    endpoint needs no node key; it answers 503 while writes are halted.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from starlette.requests import HTTPConnection

from medledger.consortium.auth import PeerAuthError, RequestVerifier, current_node_keys
from medledger.consortium.client import CBOR, BlockBundle, RecordRequest, RemoteRecord
from medledger.consortium.gossip import CheckpointBook, ConsortiumMonitor
from medledger.consortium.relay import RELAY_PATH
from medledger.contracts.access import AccessRequest, Decision, decide
from medledger.contracts.base import get_obj
from medledger.contracts.core import k_key, k_org, k_principal, k_seq
from medledger.contracts.records_v1 import k_record
from medledger.crypto.aead import record_aad
from medledger.crypto.kem import EncryptionKey, EncryptionPublicKey, unwrap_key, wrap_key
from medledger.crypto.signing import SigningKey
from medledger.encoding import decode, encode
from medledger.errors import (
    CheckpointError,
    EncodingError,
    MedledgerError,
    NotFoundError,
    OrdererError,
    StorageError,
    TransactionRejected,
)
from medledger.ledger.checkpoint import Checkpoint
from medledger.ledger.note import add_signatures, note_text, open_note
from medledger.ledger.tx import Transaction
from medledger.node import Node, Receipt
from medledger.orderer.etcd import MAX_PROPOSAL_TXS, EtcdOrderer
from medledger.state.base import StateReader
from medledger.store import TxRecord

__all__ = ["PeerService", "RecordSource", "create_peer_app", "health_json"]

log = logging.getLogger("medledger.consortium")

MAX_BLOCKS = 512
MAX_SUBMIT = 10_000


class RecordSource(Protocol):
    """What the custodian side needs of a record store (a subset of ``RecordStore``)."""

    async def get_version(self, record: str, version: int | None = None) -> Any: ...
    async def get_wrapped(self, record: str, version: int, recipient: str) -> bytes | None: ...


class RecordServer(Protocol):
    """The custodian side of the record service (``RecordService``)."""

    store: Any

    async def serve_ciphertext(
        self, custodian: str, record: str, version: int, reader_org: str
    ) -> tuple[bytes, bytes, bytes | None]: ...


class Submit(Protocol):
    async def submit(self, key: SigningKey, type_: str, payload: dict[str, Any]) -> Receipt: ...


class Refused(MedledgerError):
    """The peer request is refused (HTTP 4xx)."""

    code = "refused"

    def __init__(self, message: str, status: int = 400, error: str = "refused") -> None:
        super().__init__(message)
        self.status = status
        self.error = error


class PeerService:
    """Everything the peer API serves, for one organisation's node."""

    def __init__(
        self,
        node: Node,
        *,
        org: str,
        key: SigningKey,
        monitor: ConsortiumMonitor,
        book: CheckpointBook | None = None,
        submitter: Submit | None = None,
        records: RecordServer | None = None,
        store: RecordSource | None = None,
        encryption: EncryptionKey | None = None,
        max_skew_ms: int = 30_000,
        clock: Callable[[], int] | None = None,
        log_wait: float = 5.0,
        health: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.node = node
        self.org = org
        self.key = key
        self.monitor = monitor
        self.book = book or CheckpointBook(node, monitor)
        if submitter is None:
            from medledger.services.submitter import Submitter

            submitter = Submitter(node)
        self.submitter = submitter
        self.records = records
        self.store = store
        self.encryption = encryption
        self.log_wait = log_wait
        self._health = health
        self.clock = clock or node.clock
        self.verifier = RequestVerifier(
            network=node.network,
            audience=org,
            keys=self._keys,
            max_skew_ms=max_skew_ms,
            clock=self.clock,
        )

    async def _keys(self, org: str) -> Sequence[bytes]:
        return await self.node.read(lambda state: current_node_keys(state, org))

    # -- status ----------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        if self._health is not None:
            return self._health()
        return health_json(self.node, self.org, self.monitor)

    # -- checkpoints -------------------------------------------------------------------
    async def checkpoint(self, height: int | None) -> dict[str, Any]:
        if height is None:
            h, note = await self.book.latest()
            return {"height": h, "note": note}
        at = await self.book.at(height)
        if at is None:
            raise NotFoundError(f"no block at height {height} yet (head {self.node.head.height})")
        return {"height": height, "note": at}

    async def cosign(self, caller: str, note: str) -> dict[str, Any]:
        verifiers = await self.book.verifiers()
        verifier = verifiers.get(caller)
        if verifier is None:
            raise Refused(f"{caller!r} is not an active member", 403, "forbidden")
        try:
            open_note(note, [verifier])
            cp = Checkpoint.parse(note_text(note))
        except CheckpointError as exc:
            msg = f"not a checkpoint signed by {caller}: {exc}"
            raise Refused(msg, 400, "bad-checkpoint") from None
        ref = cp.block_info()
        if ref is None or cp.origin != self.node.origin:
            raise Refused("not a checkpoint of this network's log", 400, "bad-checkpoint")
        head = self.node.head.height
        if ref.height > head:
            h, mine = await self.book.latest()
            return {"status": "behind", "height": h, "head": head, "note": mine}
        verdict, height, ours = await self.book.compare(caller, note, verifiers)
        assert ours is not None
        if verdict == "same":
            cosigned = add_signatures(note, self.node.note_signers)
            return {"status": "cosigned", "height": height, "head": head, "note": cosigned}
        return {"status": "divergent", "height": height, "head": head, "note": ours}

    # -- blocks ------------------------------------------------------------------------
    async def blocks(self, start: int, limit: int) -> dict[str, Any]:
        from medledger.consortium import _nodeio

        if start < 0 or limit < 1:
            raise Refused("start must be >= 0 and limit >= 1")
        limit = min(limit, MAX_BLOCKS)
        bundles: list[BlockBundle]
        bundles, position = await _nodeio.blocks_and_position(self.node, start, limit)
        return {
            "head": self.node.head.height,
            "blocks": [b.to_wire() for b in bundles],
            "position": None if position is None else list(position),
        }

    # -- records -----------------------------------------------------------------------
    async def fetch_record(self, caller: str, req: RecordRequest) -> RemoteRecord:
        if self.records is None and (self.store is None or self.encryption is None):
            raise Refused("this node serves no records", 404, "not-found")
        if not self.monitor.writes_allowed:
            # its ledger (consents included) disagrees with the majority: decide nothing
            raise Refused(f"this node is halted: {self.monitor.halted_reason}", 503, "halted")
        logged: TxRecord | None = None
        if req.access_tx is not None:
            # The reader's node decided on its own state and logged the read: that entry
            # is ordered after everything its decision relied on (the actor's
            # registration, the patient's consents). Once it is on this ledger, so is all
            # of that; deciding before it arrives would refuse a read only because this
            # node is a few blocks behind the reader's.
            logged = await self._wait_logged(req.access_tx)
        now = self.clock()

        def _look(state: StateReader) -> tuple[Any, ...]:
            rec = get_obj(state, k_record(req.record))
            if rec is None:
                return None, None, None
            request = AccessRequest(
                actor=req.actor,
                org=caller,
                patient=rec["patient"],
                resource_types=(rec["resource_type"],),
                purpose=req.purpose,
                time=now,
                break_glass=req.break_glass,
                record=req.record,
            )
            return rec, decide(state, request), get_obj(state, k_principal(req.actor))

        rec, decision, actor = await self.node.read(_look)
        if rec is None:
            raise Refused(f"record {req.record} is not on the ledger", 404, "not-found")
        if rec["custodian"] != self.org:
            held = rec["custodian"]
            raise Refused(f"record {req.record} is held by {held}", 409, "not-custodian")
        if actor is None or actor.get("org") != caller:
            raise Refused(f"{req.actor!r} does not act for {caller!r}", 403, "forbidden")
        version = req.version if req.version is not None else int(rec["version"])
        if not 1 <= version <= int(rec["version"]):
            raise Refused(f"record {req.record} has no version {version}", 404, "not-found")
        assert isinstance(decision, Decision)
        if req.access_tx is not None and decision.permit:
            # the reader's node decided and logged already: check its entry, log nothing more
            if logged is None:
                raise Refused(
                    f"access entry {req.access_tx.hex()} is not on this node's ledger",
                    409,
                    "unknown-access-entry",
                )
            await self._check_logged(caller, req, logged, now)
            access_tx = req.access_tx
        else:
            receipt = await self._log_access(caller, req, rec, decision, actor, now)
            access_tx = receipt.tx_id
        if not decision.permit:
            raise Refused(
                f"access denied ({decision.rule}): {decision.reason}; logged as {access_tx.hex()}",
                403,
                "forbidden",
            )
        return await self._serve(caller, req.record, version, access_tx)

    async def _serve(
        self, caller: str, record: str, version: int, access_tx: bytes
    ) -> RemoteRecord:
        """Ciphertext, salt and record key wrapped for ``caller`` (after the decision)."""
        store = self.records.store if self.records is not None else self.store
        assert store is not None
        stored = await store.get_version(record, version)
        if self.records is not None:
            ciphertext, salt, wrapped = await self.records.serve_ciphertext(
                self.org, record, version, caller
            )
            stored = stored or await store.get_version(record, version)
        else:
            if stored is None:
                raise StorageError(f"record {record} version {version} is not in the store")
            ciphertext, salt, wrapped = stored.ciphertext, stored.salt, None
            if not stored.deleted:
                wrapped = await self._rewrap(caller, stored)
        if stored is None:
            raise StorageError(f"record {record} version {version} is not in the store")
        if not stored.deleted and not ciphertext:
            raise Refused(f"record {record} version {version} was erased", 410, "gone")
        return RemoteRecord(
            record=record,
            version=version,
            patient=stored.patient,
            custodian=stored.custodian,
            resource_type=stored.resource_type,
            salt=salt,
            ciphertext=ciphertext,
            last_updated=stored.last_updated,
            deleted=stored.deleted,
            wrapped=wrapped or b"",
            access_tx=access_tx,
        )

    async def _rewrap(self, caller: str, stored: Any) -> bytes:
        assert self.store is not None and self.encryption is not None
        if not stored.ciphertext:
            raise Refused(f"record {stored.record} was erased", 410, "gone")
        aad = record_aad(stored.record, stored.version, stored.patient)
        mine = await self.store.get_wrapped(stored.record, stored.version, f"org:{self.org}")
        if mine is None:
            raise StorageError(f"no key of {self.org} for record {stored.record}")
        org = await self.node.read(lambda st: get_obj(st, k_org(caller)))
        recipient = EncryptionPublicKey(int(org["enc_alg"]), bytes(org["enc_key"]))
        return wrap_key(recipient, unwrap_key(self.encryption, mine, aad), aad)

    async def _wait_logged(self, tx_id: bytes) -> TxRecord | None:
        """The committed transaction ``tx_id`` once this node has applied it, waiting up to
        ``log_wait`` seconds; None if it has not arrived by then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.log_wait
        while True:
            try:
                return await self.node.get_tx(tx_id)
            except NotFoundError:
                if loop.time() > deadline:
                    return None
                await asyncio.sleep(0.02)

    async def _check_logged(self, caller: str, req: RecordRequest, rec: TxRecord, now: int) -> None:
        """The access entry the reader's node committed (``rec``) must match the request."""
        assert req.access_tx is not None
        tx = Transaction.from_bytes(rec.raw)

        def _signer(state: StateReader) -> Any:
            key = get_obj(state, k_key(tx.signer))
            return None if key is None else key.get("principal")

        signer = await self.node.read(_signer)
        p = tx.payload
        skew = int(self.node.config["policy"]["max_tx_skew_ms"])
        if (
            tx.type != "access.log"
            or signer != f"node:{caller}"
            or p.get("org") != caller
            or p.get("actor") != req.actor
            or p.get("outcome") != "permit"
            or p.get("purpose") != req.purpose
            or req.record not in (p.get("records") or [])
            or not isinstance(p.get("time"), int)
            or abs(now - p["time"]) > skew
        ):
            raise Refused(
                f"access entry {req.access_tx.hex()} does not permit this read", 403, "forbidden"
            )

    async def _log_access(
        self,
        caller: str,
        req: RecordRequest,
        rec: dict[str, Any],
        decision: Decision,
        actor: dict[str, Any],
        now: int,
    ) -> Receipt:
        roles = sorted(actor.get("roles") or [])
        payload = {
            "request": "peer-" + secrets.token_hex(12),
            "actor": req.actor,
            "org": self.org,
            "role": roles[0] if roles else None,
            "on_behalf": req.on_behalf,
            "patient": rec["patient"],
            "resource_types": [rec["resource_type"]],
            "records": [req.record],
            "purpose": req.purpose,
            "action": "access",
            "outcome": "permit" if decision.permit else "deny",
            "consents": list(decision.consents),
            "rule": decision.rule,
            "break_glass": decision.break_glass,
            "time": now,
        }
        if not self.monitor.writes_allowed:
            raise Refused("writes are halted on this node (divergence)", 503, "halted")
        return await self.submitter.submit(self.key, "access.log", payload)

    # -- submissions -------------------------------------------------------------------
    async def submit_txs(self, raws: list[bytes]) -> list[dict[str, Any]]:
        if not self.monitor.writes_allowed:
            raise Refused(f"writes are halted: {self.monitor.halted_reason}", 503, "halted")

        # Queued in request order (a signer's sequence numbers must stay in order), then
        # awaited together: one future per transaction, no task per transaction.
        out: list[dict[str, Any] | None] = [None] * len(raws)
        waiting: list[tuple[int, asyncio.Future[Receipt]]] = []
        for i, raw in enumerate(raws):
            try:
                waiting.append((i, self.node.enqueue(Transaction.from_bytes(raw))))
            except (TransactionRejected, OrdererError) as exc:
                out[i] = {"ok": False, "error": exc.code, "message": str(exc)}
        done = await asyncio.gather(*(f for _, f in waiting), return_exceptions=True)
        for (i, _), res in zip(waiting, done, strict=True):
            if isinstance(res, (TransactionRejected, OrdererError)):
                out[i] = {"ok": False, "error": res.code, "message": str(res)}
            elif isinstance(res, BaseException):
                raise res
            else:
                out[i] = {
                    "ok": True,
                    "tx_id": res.tx_id,
                    "index": res.index,
                    "height": res.height,
                }
        return [r for r in out if r is not None]

    async def relay_txs(self, caller: str, raws: list[bytes]) -> dict[str, Any]:
        """Queue transactions another member's node relays here for this node's proposals.

        All or nothing: every transaction must parse (the relaying node parsed the
        same bytes), and the etcd orderer must be running here; nothing is awaited.
        """
        if not self.monitor.writes_allowed:
            raise Refused(f"writes are halted: {self.monitor.halted_reason}", 503, "halted")
        orderer = self.node.orderer
        if not isinstance(orderer, EtcdOrderer):
            raise Refused("this node does not order through etcd", 503, "not-ordering")
        try:
            txs = [Transaction.from_bytes(raw) for raw in raws]
        except TransactionRejected as exc:
            raise Refused(f"relayed transaction refused: {exc}", 400, exc.code) from None
        try:
            revision = orderer.accept_relayed(txs)
        except OrdererError as exc:
            raise Refused(f"not proposing here: {exc}", 503, exc.code) from None
        log.debug("queued %d transactions relayed by %s", len(txs), caller)
        return {"queued": len(txs), "revision": revision}


def health_json(node: Node, org: str, monitor: ConsortiumMonitor) -> dict[str, Any]:
    head = node.head
    return {
        "org": org,
        "network": node.network,
        "height": head.height,
        "head_hash": head.hash.hex(),
        "log_size": head.log_size,
        "log_root": head.log_root.hex(),
        "state_root": head.state_root.hex(),
        **monitor.to_json(),
    }


def _raw_target(request: HTTPConnection) -> str:
    raw = request.scope.get("raw_path") or request.scope["path"].encode("utf-8")
    path = raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)
    qs = request.scope.get("query_string") or b""
    return path + ("?" + qs.decode("latin-1") if qs else "")


def _raw_txs(data: bytes, what: str, least: int, most: int) -> list[bytes]:
    """``data`` decoded as a CBOR array of ``least``..``most`` signed transactions (their
    bytes). Raises :class:`EncodingError` for bad CBOR, :class:`Refused` otherwise (413
    for the count)."""
    doc = decode(data)
    if not isinstance(doc, list) or not all(isinstance(r, bytes) for r in doc):
        raise Refused(f"{what} must be a CBOR array of signed transactions")
    if not least <= len(doc) <= most:
        raise Refused(f"{least}..{most} transactions per request ({what}): {len(doc)}", 413)
    return doc


def _cbor_response(doc: Any, status: int = 200) -> Response:
    return Response(encode(doc), status_code=status, media_type=CBOR)


def create_peer_app(service: PeerService) -> FastAPI:
    """The peer API application of one node."""
    app = FastAPI(
        title="medledger peer API",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.peer = service

    async def caller(request: Request) -> str:
        body = await request.body()
        return await service.verifier.verify(
            request.method, _raw_target(request), request.headers, body
        )

    Caller = Depends(caller)

    @app.exception_handler(PeerAuthError)
    async def _auth(request: Request, exc: PeerAuthError) -> JSONResponse:
        log.warning("refused peer request %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"error": exc.code, "message": str(exc)}, status_code=401)

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused) -> JSONResponse:
        return JSONResponse({"error": exc.error, "message": str(exc)}, status_code=exc.status)

    @app.exception_handler(NotFoundError)
    async def _not_found(request: Request, exc: NotFoundError) -> JSONResponse:
        return JSONResponse({"error": exc.code, "message": str(exc)}, status_code=404)

    @app.exception_handler(EncodingError)
    async def _encoding(request: Request, exc: EncodingError) -> JSONResponse:
        return JSONResponse({"error": exc.code, "message": str(exc)}, status_code=400)

    @app.exception_handler(TransactionRejected)
    async def _rejected(request: Request, exc: TransactionRejected) -> JSONResponse:
        return JSONResponse({"error": exc.code, "message": str(exc)}, status_code=422)

    @app.exception_handler(OrdererError)
    async def _orderer(request: Request, exc: OrdererError) -> JSONResponse:
        return JSONResponse({"error": exc.code, "message": str(exc)}, status_code=503)

    @app.get("/health")
    async def health() -> JSONResponse:
        doc = service.health()
        return JSONResponse(doc, status_code=200 if service.monitor.writes_allowed else 503)

    @app.get("/peer/v1/status")
    async def status(org: str = Caller) -> dict[str, Any]:
        return service.health()

    @app.get("/peer/v1/checkpoint")
    async def checkpoint(height: int | None = None, org: str = Caller) -> dict[str, Any]:
        return await service.checkpoint(height)

    @app.post("/peer/v1/cosign")
    async def cosign(request: Request, org: str = Caller) -> dict[str, Any]:
        body = await request.body()
        try:
            note = body.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused("checkpoint note is not UTF-8", 400, "bad-checkpoint") from None
        return await service.cosign(org, note)

    @app.get("/peer/v1/blocks")
    async def blocks(start: int, limit: int = 256, org: str = Caller) -> Response:
        return _cbor_response(await service.blocks(start, limit))

    @app.post("/peer/v1/records/fetch")
    async def fetch_record(request: Request, org: str = Caller) -> Response:
        doc = decode(await request.body())
        if not isinstance(doc, dict) or not isinstance(doc.get("record"), str):
            raise Refused("a record request is a map with record, actor, purpose")
        actor = doc.get("actor")
        version = doc.get("version")
        purpose = doc.get("purpose", "TREAT")
        on_behalf = doc.get("on_behalf")
        access_tx = doc.get("access_tx")
        if (
            not (access_tx is None or (isinstance(access_tx, bytes) and len(access_tx) == 32))
            or not isinstance(actor, str)
            or not isinstance(purpose, str)
            or not (version is None or isinstance(version, int))
            or not isinstance(doc.get("break_glass", False), bool)
            or not (on_behalf is None or isinstance(on_behalf, str))
        ):
            raise Refused("malformed record request")
        req = RecordRequest(
            record=doc["record"],
            actor=actor,
            purpose=purpose,
            version=version,
            break_glass=bool(doc.get("break_glass", False)),
            on_behalf=on_behalf,
            access_tx=access_tx,
        )
        remote = await service.fetch_record(org, req)
        return _cbor_response(remote.to_wire())

    @app.websocket(RELAY_PATH)
    async def relay(ws: WebSocket) -> None:
        # the handshake is a signed GET (see medledger.consortium.relay); then each
        # message is answered in order, with its queueing or its refusal
        try:
            org = await service.verifier.verify("GET", _raw_target(ws), ws.headers, b"")
        except PeerAuthError as exc:
            log.warning("refused a relay connection: %s", exc)
            await ws.close(code=1008, reason="not signed by a member's node key")
            return
        await ws.accept()
        try:
            while True:
                received = await ws.receive()
                if received["type"] == "websocket.disconnect":
                    return
                try:
                    message = received.get("bytes")
                    if message is None:
                        raise Refused("relay messages are binary (CBOR)")
                    raws = _raw_txs(message, "a relay message", 1, MAX_PROPOSAL_TXS)
                    answer = await service.relay_txs(org, raws)
                except Refused as exc:
                    answer = {"error": exc.error, "message": str(exc), "status": exc.status}
                except EncodingError as exc:
                    answer = {"error": exc.code, "message": str(exc), "status": 400}
                await ws.send_bytes(encode(answer))
        except WebSocketDisconnect:
            return

    @app.get("/ledger/v1/seq/{key_id}")
    async def last_seq(key_id: str) -> dict[str, Any]:
        try:
            kid = bytes.fromhex(key_id)
        except ValueError:
            raise Refused("key id must be hex") from None
        raw = await service.node.state_get(k_seq(kid))
        return {"key_id": key_id, "seq": 0 if raw is None else int(decode(raw))}

    @app.post("/ledger/v1/txs")
    async def submit(request: Request) -> Response:
        raws = _raw_txs(await request.body(), "the body", 0, MAX_SUBMIT)
        return _cbor_response(await service.submit_txs(raws))

    return app
