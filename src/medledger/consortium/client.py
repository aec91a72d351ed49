"""The client side of the inter-node API: signed requests to other organisations' nodes.

Every call names the peer by organisation id; the request is signed with this
node's key for that peer as audience (see :mod:`medledger.consortium.auth`).
Transport failures and server errors raise :class:`PeerUnavailable` (try again
later or elsewhere); refusals (4xx) raise :class:`PeerRequestError` with the
peer's reason.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from medledger.consortium.auth import sign_request
from medledger.crypto.signing import SigningKey
from medledger.encoding import decode, encode
from medledger.errors import (
    Conflict,
    EncodingError,
    MedledgerError,
    NotFoundError,
    OrdererError,
    Unauthorized,
)

__all__ = [
    "CBOR",
    "BlockBundle",
    "BlocksPage",
    "CosignResult",
    "PeerClient",
    "PeerRequestError",
    "PeerUnavailable",
    "RecordRequest",
    "RemoteCustodians",
    "RemoteRecord",
]

CBOR = "application/cbor"


class PeerUnavailable(MedledgerError):
    """A peer node could not be reached or failed to answer."""

    code = "peer-unavailable"


class PeerRequestError(MedledgerError):
    """A peer node refused the request."""

    code = "peer-refused"

    def __init__(self, message: str = "", *, status: int = 400, error: str = "") -> None:
        super().__init__(message, status=status, error=error)
        self.status = status
        self.error = error


@dataclass(frozen=True, slots=True)
class BlockBundle:
    """A block as served by a peer: header bytes, the proposer's signature and its txs."""

    height: int
    header: bytes
    sig: bytes
    txs: tuple[bytes, ...]
    meta: Mapping[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "height": self.height,
            "header": self.header,
            "sig": self.sig,
            "txs": list(self.txs),
        }
        if self.meta:
            doc["meta"] = dict(self.meta)
        return doc

    @classmethod
    def from_wire(cls, doc: object) -> BlockBundle:
        if not isinstance(doc, dict):
            raise EncodingError("a block bundle is a map")
        height, header = doc.get("height"), doc.get("header")
        sig, txs = doc.get("sig"), doc.get("txs")
        if (
            not isinstance(height, int)
            or not isinstance(header, bytes)
            or not isinstance(sig, bytes)
            or not isinstance(txs, list)
            or not all(isinstance(t, bytes) for t in txs)
        ):
            raise EncodingError("malformed block bundle")
        meta = doc.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise EncodingError("block bundle meta must be a map")
        return cls(height, header, sig, tuple(txs), meta)


@dataclass(frozen=True, slots=True)
class BlocksPage:
    """A page of a peer's blocks, its head height and its etcd position (height, revision)."""

    head: int
    blocks: list[BlockBundle]
    position: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class CosignResult:
    """A peer's answer to "co-sign my checkpoint".

    ``status`` is ``cosigned`` (``note`` is ours with the peer's signature added),
    ``behind`` (the peer has not reached our height; ``note`` is its latest
    checkpoint, at ``height``) or ``divergent`` (``note`` is the peer's own,
    different checkpoint at our height).
    """

    status: str
    height: int
    head: int
    note: str


@dataclass(frozen=True, slots=True)
class RecordRequest:
    """Who asks a custodian for a record, and why (checked and logged by the custodian)."""

    record: str
    actor: str
    purpose: str = "TREAT"
    version: int | None = None
    break_glass: bool = False
    on_behalf: str | None = None
    access_tx: bytes | None = None  # the caller's node's committed access.log, if any

    def to_wire(self) -> dict[str, Any]:
        return {
            "access_tx": self.access_tx,
            "record": self.record,
            "version": self.version,
            "actor": self.actor,
            "purpose": self.purpose,
            "break_glass": self.break_glass,
            "on_behalf": self.on_behalf,
        }


@dataclass(frozen=True, slots=True)
class RemoteRecord:
    """An encrypted record version from its custodian, its key wrapped for the caller's org."""

    record: str
    version: int
    patient: str
    custodian: str
    resource_type: str
    salt: bytes
    ciphertext: bytes
    last_updated: int
    deleted: bool
    wrapped: bytes
    access_tx: bytes

    def to_wire(self) -> dict[str, Any]:
        return {
            "record": self.record,
            "version": self.version,
            "patient": self.patient,
            "custodian": self.custodian,
            "resource_type": self.resource_type,
            "salt": self.salt,
            "ciphertext": self.ciphertext,
            "last_updated": self.last_updated,
            "deleted": self.deleted,
            "wrapped": self.wrapped,
            "access_tx": self.access_tx,
        }

    @classmethod
    def from_wire(cls, doc: object) -> RemoteRecord:
        if not isinstance(doc, dict):
            raise EncodingError("a record answer is a map")
        try:
            out = cls(
                record=doc["record"],
                version=doc["version"],
                patient=doc["patient"],
                custodian=doc["custodian"],
                resource_type=doc["resource_type"],
                salt=doc["salt"],
                ciphertext=doc["ciphertext"],
                last_updated=doc["last_updated"],
                deleted=doc["deleted"],
                wrapped=doc["wrapped"],
                access_tx=doc["access_tx"],
            )
        except KeyError as exc:
            raise EncodingError(f"record answer lacks {exc}") from None
        for name in ("salt", "ciphertext", "wrapped", "access_tx"):
            if not isinstance(getattr(out, name), bytes):
                raise EncodingError(f"record answer {name} must be bytes")
        for name in ("version", "last_updated"):
            if not isinstance(getattr(out, name), int):
                raise EncodingError(f"record answer {name} must be an int")
        return out


def tls_context(ca_file: Path | None) -> ssl.SSLContext | bool:
    """Client TLS verification: the consortium CA if given, else the system store."""
    if ca_file is None:
        return True
    return ssl.create_default_context(cafile=str(ca_file))


class PeerClient:
    """Signed HTTP calls from this node (``org``) to the other members' peer APIs."""

    def __init__(
        self,
        *,
        network: str,
        org: str,
        key: SigningKey,
        peers: Mapping[str, str],
        timeout: float = 10.0,
        verify: ssl.SSLContext | bool = True,
        transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
    ) -> None:
        self.network = network
        self.org = org
        self.key = key
        self.peers = {o: u.rstrip("/") for o, u in peers.items()}
        self._timeout = timeout
        self._verify = verify
        self._transports = dict(transports or {})
        self._clients: dict[str, httpx.AsyncClient] = {}

    @property
    def timeout(self) -> float:
        """Seconds a request may take by default."""
        return self._timeout

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """How peers' TLS certificates are checked (as given to httpx)."""
        return self._verify

    def _client(self, org: str) -> httpx.AsyncClient:
        client = self._clients.get(org)
        if client is None:
            if org not in self.peers:
                raise PeerUnavailable(f"no address known for the node of {org!r}")
            transport = self._transports.get(org)
            client = httpx.AsyncClient(
                base_url=self.peers[org],
                timeout=self._timeout,
                verify=self._verify,
                transport=transport,
            )
            self._clients[org] = client
        return client

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    async def request(
        self,
        org: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: bytes = b"",
        content_type: str | None = None,
        wait: float | None = None,
    ) -> httpx.Response:
        """Send one signed request; return the 2xx response or raise."""
        client = self._client(org)
        headers = {"content-type": content_type} if content_type else {}
        req = client.build_request(
            method,
            path,
            params=dict(params) if params else None,
            content=body,
            headers=headers,
            timeout=wait if wait is not None else self._timeout,
        )
        raw_path = req.url.raw_path.decode("ascii")
        req.headers.update(
            sign_request(
                self.key,
                network=self.network,
                org=self.org,
                audience=org,
                method=method,
                path=raw_path,
                body=body,
            )
        )
        try:
            resp = await client.send(req)
        except httpx.HTTPError as exc:
            what = f"{type(exc).__name__}: {exc}"
            raise PeerUnavailable(f"node of {org!r} unreachable: {what}") from exc
        if resp.status_code >= 500:
            raise PeerUnavailable(f"node of {org!r} answered {resp.status_code}: {_reason(resp)}")
        if resp.status_code >= 400:
            err = _error_code(resp)
            raise PeerRequestError(
                f"node of {org!r} refused ({resp.status_code}): {_reason(resp)}",
                status=resp.status_code,
                error=err,
            )
        return resp

    # -- calls ------------------------------------------------------------------------
    async def status(self, org: str) -> dict[str, Any]:
        resp = await self.request(org, "GET", "/peer/v1/status")
        doc: dict[str, Any] = resp.json()
        return doc

    async def checkpoint(self, org: str, height: int | None = None) -> tuple[int, str]:
        """The peer's latest signed checkpoint (or the one at ``height``): (height, note)."""
        params = None if height is None else {"height": height}
        resp = await self.request(org, "GET", "/peer/v1/checkpoint", params=params)
        doc = resp.json()
        return int(doc["height"]), str(doc["note"])

    async def cosign(self, org: str, note: str) -> CosignResult:
        resp = await self.request(
            org,
            "POST",
            "/peer/v1/cosign",
            body=note.encode("utf-8"),
            content_type="text/plain; charset=utf-8",
        )
        doc = resp.json()
        status = doc.get("status")
        if status not in ("cosigned", "behind", "divergent"):
            raise PeerUnavailable(f"node of {org!r} gave an unknown cosign status {status!r}")
        return CosignResult(status, int(doc["height"]), int(doc["head"]), str(doc["note"]))

    async def blocks(self, org: str, start: int, limit: int = 256) -> BlocksPage:
        """Blocks ``start..`` (at most ``limit``), the peer's head and ordering position."""
        resp = await self.request(
            org, "GET", "/peer/v1/blocks", params={"start": start, "limit": limit}, wait=60.0
        )
        doc = _cbor(resp, org)
        if not isinstance(doc, dict) or not isinstance(doc.get("blocks"), list):
            raise PeerUnavailable(f"node of {org!r} sent a malformed block list")
        try:
            bundles = [BlockBundle.from_wire(b) for b in doc["blocks"]]
        except EncodingError as exc:
            raise PeerUnavailable(f"node of {org!r} sent a malformed block: {exc}") from exc
        pos = doc.get("position")
        position = None
        if isinstance(pos, list) and len(pos) == 2 and all(isinstance(x, int) for x in pos):
            position = (pos[0], pos[1])
        return BlocksPage(int(doc["head"]), bundles, position)

    async def fetch_record(self, custodian: str, request: RecordRequest) -> RemoteRecord:
        """Ask the custodian's node for a record (it checks consent and logs the access)."""
        resp = await self.request(
            custodian,
            "POST",
            "/peer/v1/records/fetch",
            body=encode(request.to_wire()),
            content_type=CBOR,
        )
        try:
            return RemoteRecord.from_wire(_cbor(resp, custodian))
        except EncodingError as exc:
            raise PeerUnavailable(f"node of {custodian!r} sent a malformed record: {exc}") from exc

    async def submit_txs(self, org: str, raws: Sequence[bytes]) -> list[dict[str, Any]]:
        """Submit signed transactions to a node; one result map per transaction."""
        resp = await self.request(
            org, "POST", "/ledger/v1/txs", body=encode(list(raws)), content_type=CBOR, wait=60.0
        )
        doc = _cbor(resp, org)
        if not isinstance(doc, list):
            raise PeerUnavailable(f"node of {org!r} sent a malformed submit answer")
        return doc


def _cbor(resp: httpx.Response, org: str) -> Any:
    try:
        return decode(resp.content)
    except EncodingError as exc:
        raise PeerUnavailable(f"node of {org!r} sent invalid CBOR: {exc}") from exc


def _reason(resp: httpx.Response) -> str:
    try:
        doc = resp.json()
    except (ValueError, json.JSONDecodeError):
        return resp.text[:200]
    if isinstance(doc, dict) and "message" in doc:
        return str(doc["message"])
    return resp.text[:200]


def _error_code(resp: httpx.Response) -> str:
    try:
        doc = resp.json()
    except (ValueError, json.JSONDecodeError):
        return ""
    return str(doc.get("error", "")) if isinstance(doc, dict) else ""


class RemoteCustodians:
    """The reading side of cross-organisation reads, for ``RecordService``.

    When a record's custodian is another organisation, its ciphertext lives only
    on that organisation's node: :meth:`serve` fetches ``(ciphertext, salt,
    wrapped key)`` from it, the same triple ``RecordService.serve_ciphertext``
    returns locally, for ``RecordService.open`` to verify against this node's
    ledger and decrypt. ``access_tx`` is this node's committed ``access.log`` of
    the read (the custodian then checks it instead of logging a second entry).

    Peer failures come out as :mod:`medledger.errors` the API already maps: a
    refusal (403) as :class:`~medledger.errors.Unauthorized`, 404 as
    :class:`~medledger.errors.NotFoundError`, 410 as a "gone" one (``details``
    ``gone=True``), an access entry the custodian has not applied yet and an
    unreachable or failing node as :class:`~medledger.errors.OrdererError`
    (503, try again).
    """

    def __init__(self, client: PeerClient) -> None:
        self.client = client

    def serves(self, custodian: str) -> bool:
        return custodian in self.client.peers

    async def serve(
        self,
        custodian: str,
        record: str,
        version: int,
        *,
        actor: str,
        purpose: str = "TREAT",
        break_glass: bool = False,
        on_behalf: str | None = None,
        access_tx: bytes | None = None,
    ) -> tuple[bytes, bytes, bytes | None]:
        try:
            remote = await self.client.fetch_record(
                custodian,
                RecordRequest(
                    record=record,
                    actor=actor,
                    purpose=purpose,
                    version=version,
                    break_glass=break_glass,
                    on_behalf=on_behalf,
                    access_tx=access_tx,
                ),
            )
        except PeerRequestError as exc:
            raise _read_error(exc, custodian, record) from exc
        except PeerUnavailable as exc:
            raise OrdererError(
                f"the node of {custodian}, which holds record {record}, is unavailable: {exc}"
            ) from exc
        return remote.ciphertext, remote.salt, (remote.wrapped or None)


def _read_error(exc: PeerRequestError, custodian: str, record: str) -> MedledgerError:
    """A custodian's refusal of a record read, as the error the FHIR API maps."""
    if exc.status == 403:
        return Unauthorized(f"the custodian {custodian} refused: {exc}", rule="custodian")
    if exc.status == 410:
        return NotFoundError(
            f"record {record} was erased (crypto-shredded) by its custodian {custodian}",
            gone=True,
            record=record,
        )
    if exc.status == 404:
        return NotFoundError(f"the custodian {custodian} does not serve record {record}: {exc}")
    if exc.status == 409 and exc.error == "unknown-access-entry":
        return OrdererError(
            f"the node of {custodian} has not yet applied this read's access entry; "
            f"try again: {exc}"
        )
    if exc.status == 409:
        return Conflict(f"record {record}: {exc}")
    return MedledgerError(f"the node of {custodian} refused to serve record {record}: {exc}")
