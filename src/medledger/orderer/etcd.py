"""The etcd orderer: every node of a consortium derives the same chain from etcd.

etcd gives every write one cluster-wide revision, so its key space is a totally
ordered, durable log (a write is acknowledged once a majority has fsynced it).
This orderer uses that log and nothing else from etcd: no locks, no leases, no
elections (Jepsen found etcd's locks unsafe).

Keys, under ``<root>/<network>/`` (root defaults to ``/medledger``)::

    genesis                   hash of block 0; created once, checked by every node
    proposals/<org>/<nonce>   one proposal: a batch of transactions (see Proposal)
    applied/<org>             {"rev", "height"}: how far that org's node has applied

**Proposing.** A node collects submitted transactions into a proposal signed by
its node key (domain ``medledger/proposal/v1``) and creates
``proposals/<org>/<nonce>`` with a ``create_revision == 0`` transaction, retried
under the same key until it succeeds or finds the key present, so an ambiguous
write (a timeout) never lands twice. A node writes one proposal at a time, so its
proposals are ordered as its submissions, and cuts the next one only once it has
applied its previous one (``max_pending``): under load proposals grow rather than
multiply, and every node pays the fixed cost of a block fewer times.

**Pacing.** Under many concurrent small submissions, self-clocking alone makes
blocks as small as the nodes can apply them: blocks multiply until the machines are
saturated, and every node pays each block's fixed cost. A node is *busy* when at
least ``busy_threshold`` transactions reached it in the last second while one of
its own proposals was in flight (cut and not yet applied here) or while it held
its next one back: submitters did not wait for each other. While busy, it spaces
its proposals so that the consortium makes about ``busy_rate`` blocks a second:
``n / busy_rate`` seconds apart (at most ``BUSY_MAX_INTERVAL``, 1 s), ``n`` being
the organisations whose proposals it applied in the last second (itself
included); what arrives meanwhile goes into the same proposal. A client that
waits for each answer before submitting again never makes a node busy (its next
transaction arrives only once its previous proposal is applied), so alone it is
never slowed, and neither is light load. ``min_interval`` spaces proposals
always (off by default).

**Deriving blocks.** Every node watches the proposals prefix from the revision
after the last one it applied and turns the *creation* event of each proposal
key (``version == 1``; at most one per revision) into the next block, in
revision order. Block time and proposer come from the proposal (never from the
local clock), so headers are byte-identical on every node. The decision is a pure
function of the ordered log and the previous committed state:

1. the value parses as a canonical proposal for this network, its key is
   ``proposals/<org>/<nonce hex>`` of its own fields, and it holds 1..10,000 txs;
2. its proposer key is the current node key of ``org`` (an active member) and its
   signature verifies;
3. it is not stale: the previous block's time is at most the network's
   ``max_tx_skew_ms`` after the proposal time (old proposals replayed later are
   dropped whole);
4. its transactions go through :func:`medledger.ledger.apply.build_block` as
   usual: a transaction already on the ledger or earlier in the block is refused
   (``ReplayedTransaction``), so a proposal replayed into etcd (same key or a new
   one) never applies anything twice. A proposal of which nothing is accepted
   makes no block.

Overwrites of a proposal key, deletions and unrelated keys are ignored.

**Signatures.** The block record's signature (``BlockRecord.sig``) is made by the
node that stored the block over the (identical) header hash; the header's
``proposer`` names the proposing node, whose signature over the proposal every
node checked before deriving the block (the proposal itself is not kept on the
ledger). Checkpoint notes are likewise signed by each node with its own key.

**Group commit.** The proposals that arrive while the previous ones commit are
parsed and their signatures checked meanwhile; then they are derived one after
the other (each block on the state the previous one leaves, exactly as if each
were committed alone: the blocks are the same) and committed in ONE store
transaction (``max_group`` blocks at most), so under steady load a node pays the
store's commit once per group rather than once per block. Submitters are
answered only once that transaction is durable.

**Position and restart.** With block ``h`` derived from the proposal at revision
``r`` (the last event of a group), in the same store transaction, the node writes
``(h, r)`` into store metadata (two slots, by the parity of ``h``); after
proposals that make no block it records ``(head, r)``. On restart it resumes
after the revision recorded for its head height: proposals after it made no
block and are decided again on the same state, with the same outcome.

**Relaying.** Every proposal costs every node a block (deriving, signing and
committing it, its etcd write and watch events): with each node proposing what it
receives, a consortium of ``n`` nodes makes ``n`` times as many blocks as one
proposer would, each smaller. With a :class:`Relay` (the node process gives one
that knows the other members' nodes when its configuration says ``relay = true``;
off by default, as near saturation the one proposer's pipeline, which never
overlaps one block's etcd round trip and checks with the previous block's
application, becomes the bottleneck), a node hands the transactions it receives
to the first node of ``relay.proposers()`` (the same preference order on every
node; its own organisation is among them) and that node proposes them with its
own: one node then proposes for the consortium. Relaying changes nothing that
the ledger decides, only who proposes. The relaying node answers its submitters
as before, once the block holding each transaction is committed here: it
recognises its transactions (by id) in whichever proposal carries them after the
hand-over (above the etcd revision it had seen when it sent them, raised to the one
the proposer names when it queues them: an earlier copy is someone else's
submission, which makes this one a replay), with the acceptance or rejection that
proposal's block gives them. Hand-overs are not awaited one by one (at most
``relay_window`` unanswered): the relay keeps them in order. Transactions that
could not be handed over (the proposer refuses or is unreachable) are proposed
here, and so are those handed over that no proposal has carried after
``relay_timeout`` seconds while their proposer landed nothing (it died: what it
had not proposed is lost with it), or after half the submit timeout in any case;
relayed before, they are proposed here in the order they were submitted, and a
transaction carried twice is decided where it first lands (the second copy is a
replay, refused). A proposer that failed is passed over for ``relay_retry``
seconds. Transactions a node receives by relay are proposed there, never relayed
again.

**Submit.** ``submit`` resolves once the block holding the transaction is
committed on *this* node (or with the rejection, or with :class:`OrdererError`
after ``submit_timeout`` when etcd has no quorum: then nothing was acknowledged;
the transaction may still commit later, and resubmitting it is always safe).

**Compaction.** Nodes record their applied revision under ``applied/<org>``;
:meth:`EtcdOrderer.compact` deletes proposals at or below the minimum of those
records and compacts etcd's history there. A node whose next revision has been
compacted cannot continue from etcd: it raises :class:`CatchUpRequired` (with the
height it needs from peers) and must fetch signed blocks from other nodes, then
record its position with :func:`write_position`. A node that stops for good
holds compaction back until its ``applied/<org>`` key is deleted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import aetcd
import grpc
from aetcd import rpc as etcd_rpc
from aetcd import watcher as etcd_watcher

from medledger.contracts.base import get_obj
from medledger.contracts.core import k_key, k_org, k_principal
from medledger.crypto.signing import SigningKey, VerifyKey
from medledger.encoding import decode, encode
from medledger.errors import (
    EncodingError,
    MalformedTransaction,
    MedledgerError,
    OrdererError,
    TransactionRejected,
)
from medledger.ledger.tx import Transaction, check_signed
from medledger.node import BlockSpec

if TYPE_CHECKING:
    from medledger.ledger.block import BlockHeader
    from medledger.node import Node, Receipt
    from medledger.state.base import StateReader
    from medledger.store.base import LedgerStore

__all__ = [
    "MAX_PROPOSAL_BYTES",
    "MAX_PROPOSAL_TXS",
    "PROPOSAL_DOMAIN",
    "CatchUpRequired",
    "EtcdOrderer",
    "EtcdTLS",
    "InvalidProposal",
    "Proposal",
    "Relay",
    "check_proposal",
    "position_meta",
    "read_position",
    "write_position",
]

log = logging.getLogger("medledger.orderer.etcd")
T = TypeVar("T")

PROPOSAL_DOMAIN = b"medledger/proposal/v1\x00"
PROPOSAL_VERSION = 1
#: etcd refuses requests over 1.5 MiB by default; stay well below
MAX_PROPOSAL_BYTES = 1_000_000
MAX_PROPOSAL_TXS = 10_000
#: the longest a busy node holds its next proposal back (see Pacing), whatever
#: ``busy_rate`` and the number of proposers say: well within any submit timeout
BUSY_MAX_INTERVAL = 1.0
_NONCE_SIZE = 16
_FIELDS = frozenset({"v", "net", "org", "proposer", "time", "nonce", "txs", "sig"})
_POSITION_META = "orderer/etcd/position/{}"


class CatchUpRequired(OrdererError):
    """etcd no longer holds the history this node needs: fetch blocks from peers.

    ``from_height`` is the first block height the node lacks and
    ``compacted_revision`` a revision it needed that etcd no longer holds (the
    compaction point or before it). After importing
    verified blocks up to some height ``h`` whose etcd revision ``r`` a peer
    reports, record it with :func:`write_position` and start the orderer again.
    """

    code = "catch-up"

    def __init__(self, from_height: int, compacted_revision: int, message: str = "") -> None:
        self.from_height = from_height
        self.compacted_revision = compacted_revision
        super().__init__(
            message
            or (
                f"etcd history this node needs (revision {compacted_revision}) has been "
                f"compacted: catch up from block {from_height} using other nodes' signed "
                "blocks"
            )
        )


class InvalidProposal(MedledgerError):
    """A proposal in etcd is refused as a whole (every node refuses it alike)."""

    code = "invalid-proposal"


# -- proposals ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Proposal:
    """A batch of transactions proposed by one node, signed by its node key."""

    network: str
    org: str
    proposer: bytes  # key id of the proposing node key
    time: int  # the proposer's clock (ms): becomes the block time
    nonce: bytes
    txs: tuple[bytes, ...]
    sig: bytes
    raw: bytes = field(repr=False, default=b"")

    @staticmethod
    def _body(
        network: str, org: str, proposer: bytes, time_ms: int, nonce: bytes, txs: Sequence[bytes]
    ) -> dict[str, Any]:
        return {
            "v": PROPOSAL_VERSION,
            "net": network,
            "org": org,
            "proposer": proposer,
            "time": time_ms,
            "nonce": nonce,
            "txs": list(txs),
        }

    def signing_bytes(self) -> bytes:
        body = self._body(self.network, self.org, self.proposer, self.time, self.nonce, self.txs)
        return PROPOSAL_DOMAIN + encode(body)

    @property
    def id(self) -> bytes:
        return hashlib.sha256(self.raw).digest()

    @classmethod
    def create(
        cls,
        key: SigningKey,
        network: str,
        org: str,
        time_ms: int,
        txs: Sequence[bytes],
        nonce: bytes | None = None,
    ) -> Proposal:
        nonce = os.urandom(_NONCE_SIZE) if nonce is None else nonce
        body = cls._body(network, org, key.key_id, time_ms, nonce, txs)
        body["sig"] = key.sign(PROPOSAL_DOMAIN + encode(body))
        raw = encode(body)
        return cls(network, org, key.key_id, time_ms, nonce, tuple(txs), body["sig"], raw)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Proposal:
        """Parse canonical proposal bytes (structure only; see :func:`check_proposal`)."""
        if len(raw) > MAX_PROPOSAL_BYTES * 3 // 2:
            raise InvalidProposal("proposal too large")
        try:
            m = decode(raw)
        except EncodingError as exc:
            raise InvalidProposal(f"proposal is not canonical CBOR: {exc}") from exc
        if not isinstance(m, dict) or set(m) != _FIELDS:
            raise InvalidProposal("proposal has the wrong fields")
        if m["v"] != PROPOSAL_VERSION or isinstance(m["v"], bool):
            raise InvalidProposal(f"unsupported proposal version {m['v']!r}")
        net, org, proposer, t, nonce, txs, sig = (
            m["net"],
            m["org"],
            m["proposer"],
            m["time"],
            m["nonce"],
            m["txs"],
            m["sig"],
        )
        if not isinstance(net, str) or not isinstance(org, str) or not org or "/" in org:
            raise InvalidProposal("proposal net/org must be strings (org without '/')")
        if not isinstance(proposer, bytes) or not isinstance(sig, bytes) or len(sig) != 64:
            raise InvalidProposal("proposal proposer/sig malformed")
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise InvalidProposal("proposal time must be a non-negative integer")
        if not isinstance(nonce, bytes) or len(nonce) != _NONCE_SIZE:
            raise InvalidProposal(f"proposal nonce must be {_NONCE_SIZE} bytes")
        if not isinstance(txs, list) or not 1 <= len(txs) <= MAX_PROPOSAL_TXS:
            raise InvalidProposal(f"a proposal holds 1..{MAX_PROPOSAL_TXS} transactions")
        if not all(isinstance(x, bytes) for x in txs):
            raise InvalidProposal("proposal transactions must be byte strings")
        return cls(net, org, proposer, t, nonce, tuple(txs), sig, bytes(raw))


def check_proposal(
    state: StateReader, prev: BlockHeader, config: Mapping[str, Any], p: Proposal
) -> None:
    """Refuse (:class:`InvalidProposal`) a proposal that must not become a block.

    Pure: reads only the committed state and the previous header, so every node
    decides the same.
    """
    if p.network != config["network"]:
        raise InvalidProposal(f"proposal is for network {p.network!r}")
    key = get_obj(state, k_key(p.proposer))
    if key is None:
        raise InvalidProposal(f"proposer key {p.proposer.hex()} is not registered")
    height = prev.height + 1
    if key["until"] is not None and height >= key["until"]:
        raise InvalidProposal(f"proposer key {p.proposer.hex()} was retired")
    principal = get_obj(state, k_principal(key["principal"])) or {}
    if principal.get("kind") != "node" or principal.get("org") != p.org:
        raise InvalidProposal(f"proposer key is not the node key of {p.org}")
    if principal.get("status") != "active":
        raise InvalidProposal(f"node of {p.org} is {principal.get('status')}")
    org = get_obj(state, k_org(p.org))
    if org is None or org.get("status") != "active":
        raise InvalidProposal(f"organisation {p.org} is not an active member")
    if not VerifyKey(key["pub"]).is_valid(p.sig, p.signing_bytes()):
        raise InvalidProposal("proposal signature does not verify")
    skew = int(config["policy"]["max_tx_skew_ms"])
    if prev.time - p.time > skew:
        raise InvalidProposal(
            f"stale proposal: time {p.time} is more than {skew} ms before block time {prev.time}"
        )


def _precheck(
    config: Mapping[str, Any], p: Proposal, state: StateReader, prev: BlockHeader
) -> None:
    check_proposal(state, prev, config, p)


# -- position in the etcd log (store metadata) ----------------------------------------------


def position_meta(height: int, revision: int) -> dict[str, bytes]:
    """The store metadata entry recording position ``(height, revision)``."""
    return {_POSITION_META.format(height % 2): encode({"height": height, "rev": revision})}


def write_position(store: LedgerStore, height: int, revision: int) -> None:
    """Record that the proposals up to ``revision`` are applied, with head ``height``.

    Written in the same store transaction as block ``height`` (see
    :func:`position_meta`; slot by parity, so the previous height's record is never
    overwritten by a block that did not commit) and on its own after a proposal that
    made no block. Also what catch-up calls after importing blocks from peers.
    """
    for key, value in position_meta(height, revision).items():
        store.set_meta(key, value)


def read_position(store: LedgerStore) -> tuple[int, int] | None:
    """(head height, etcd revision) for the store's head block, or None if unknown."""
    head = store.head_height()
    if head is None:
        return None
    raw = store.get_meta(_POSITION_META.format(head % 2))
    if raw is None:
        return None
    rec = decode(raw)
    if rec.get("height") != head:
        return None
    return head, int(rec["rev"])


# -- etcd connection with endpoint failover -------------------------------------------------
# (asyncio.timeout, never asyncio.wait_for, in the long-running tasks: on Python 3.11
# wait_for drops a cancellation that arrives as the awaited operation completes, and a
# task that loses its cancellation makes stop() hang.)

_TRANSIENT = (aetcd.ClientError, asyncio.TimeoutError, OSError)


@dataclass(frozen=True, slots=True)
class EtcdTLS:
    """TLS to etcd (``etcds://``): the CA that signed the members' certificates and,
    for etcd's ``--client-cert-auth``, this node's client certificate and key (PEM).

    The members' certificates must name the endpoint hosts (IP or DNS SAN).
    """

    ca: bytes
    cert: bytes | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("an etcd client certificate needs its key, and the other way round")

    @classmethod
    def from_files(
        cls, ca: str | os.PathLike[str], cert: str | None = None, key: str | None = None
    ) -> EtcdTLS:
        def read(path: str | os.PathLike[str] | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as exc:
                raise ValueError(f"cannot read the etcd TLS {what} {path}: {exc}") from exc

        got = read(ca, "CA certificate")
        assert got is not None
        return cls(got, read(cert, "client certificate"), read(key, "client key"))


class _TLSClient(aetcd.Client):  # type: ignore[misc]
    """An aetcd client on a TLS channel (aetcd itself only opens plaintext channels).

    ``connect`` is aetcd 1.0's own, with ``secure_channel`` in place of
    ``insecure_channel`` (no etcd user/password: members authenticate clients by
    certificate).
    """

    def __init__(self, tls: EtcdTLS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = grpc.ssl_channel_credentials(
            root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
        )

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]
            async with asyncio.timeout(self._connect_wait_timeout):  # not wait_for (above)
                await self._connected.wait()
            return
        try:
            self._is_connecting = True
            target = f"{self._host}:{self._port}"
            self.channel = etcd_rpc.secure_channel(
                target, self._credentials, options=self._options.items()
            )
            self.kvstub = etcd_rpc.KVStub(self.channel)
            self.clusterstub = etcd_rpc.ClusterStub(self.channel)
            self.leasestub = etcd_rpc.LeaseStub(self.channel)
            self.maintenancestub = etcd_rpc.MaintenanceStub(self.channel)
            self._watcher = etcd_watcher.Watcher(
                etcd_rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False


class _Conn:
    """One aetcd client at a time, moving to the next endpoint after a failure."""

    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        timeout: float,
        start: int = 0,
        tls: EtcdTLS | None = None,
    ):
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.tls = tls
        self._i = start % len(self.endpoints)
        self._client: Any = None

    @property
    def endpoint(self) -> str:
        host, port = self.endpoints[self._i]
        return f"{host}:{port}"

    async def client(self) -> Any:
        if self._client is None:
            host, port = self.endpoints[self._i]
            if self.tls is None:
                client = aetcd.Client(host=host, port=port, timeout=self.timeout)
            else:
                client = _TLSClient(self.tls, host=host, port=port, timeout=self.timeout)
            await client.connect()
            self._client = client
        return self._client

    async def rotate(self) -> None:
        await self.close()
        self._i = (self._i + 1) % len(self.endpoints)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await client.close()


def _range_request(
    key: bytes,
    range_end: bytes,
    *,
    revision: int = 0,
    limit: int = 0,
    keys_only: bool = False,
    count_only: bool = False,
    sort_create_desc: bool = False,
) -> Any:
    req = etcd_rpc.RangeRequest(
        key=key,
        range_end=range_end,
        revision=revision,
        limit=limit,
        keys_only=keys_only,
        count_only=count_only,
    )
    if sort_create_desc:
        req.sort_order = etcd_rpc.RangeRequest.DESCEND
        req.sort_target = etcd_rpc.RangeRequest.CREATE
    return req


def _prefix_end(prefix: bytes) -> bytes:
    end: bytes = aetcd.utils.prefix_range_end(prefix)
    return end


# -- relaying ---------------------------------------------------------------------------------


def _consume(fut: asyncio.Future[Any]) -> None:
    """Retrieve a future's outcome that nobody awaits (no 'never retrieved' warning)."""
    if not fut.cancelled():
        fut.exception()


class Relay(Protocol):
    """Which node proposes this node's transactions, and the way to hand them over."""

    def proposers(self) -> Sequence[str]:
        """Organisations whose nodes may propose this node's transactions, preferred first
        (this node's own organisation among them); every node should give the same order."""
        ...

    async def forward(self, org: str, raws: Sequence[bytes]) -> int:
        """Hand signed transactions to ``org``'s node for its next proposals, in order.

        Returns, once that node has queued them, what its ``accept_relayed`` returned
        (an etcd revision that no proposal carrying them can be at or below); raises
        (any :class:`Exception`) when they were not handed over.
        """
        ...


# -- the orderer ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Item:
    tx: Transaction
    fut: asyncio.Future[Receipt]
    size: int
    relayed_in: bool = False  # received from another node's relay: proposed here
    relayed_at: float = 0.0  # loop time it was handed to ``relayed_to`` (0: not relayed)
    relayed_to: str = ""
    floor: int = 0  # relayed: proposals at or below this revision predate the hand-over


@dataclass(slots=True)
class _Event:
    rev: int
    key: bytes
    value: bytes
    proposal: bool  # False: not a proposal creation (ignored, only advances progress)


@dataclass(slots=True)
class _Prepared:
    event: _Event
    proposal: Proposal | None
    reason: str
    txs: list[Transaction]
    positions: list[int]  # position in the proposal of each parsed transaction
    malformed: dict[int, TransactionRejected]
    verdicts: list[bool] | None


class EtcdOrderer:
    """Orders transactions for ``node`` through an etcd cluster (see module docstring).

    Options: ``root`` key prefix root; ``org`` (default: the node's first signer);
    ``max_batch`` / ``max_bytes`` per proposal; ``max_wait`` seconds to gather a
    proposal once the first transaction arrives; ``submit_timeout`` seconds before
    an unacknowledged submit fails with :class:`OrdererError`; ``request_timeout``
    per etcd request; ``verify_workers`` processes checking transaction signatures
    (0: inline); ``report_interval`` seconds between ``applied/<org>`` updates;
    ``compact_interval`` seconds between automatic :meth:`compact` runs (None: only
    when called); ``max_pending`` proposals of this node landed in etcd but not yet
    applied here before it waits (1: the largest blocks, the fewest per second);
    ``max_group`` blocks at most committed in one store transaction (group commit of
    the proposals that arrived while the previous group committed; 1: one at a time);
    ``min_interval`` seconds at least between two proposals of this node (0, the
    default: none; a longer interval means fewer, larger blocks for more latency);
    ``busy_rate`` blocks a second the consortium aims at while this node is busy
    (0: no such pacing) and ``busy_threshold`` transactions a second arriving while
    this node's proposal is in flight that make it busy (module docstring, Pacing);
    ``tls`` an :class:`EtcdTLS` to reach etcd over TLS (``etcds://``); ``relay`` a
    :class:`Relay` (None: this node proposes what it receives), ``relay_timeout``
    seconds before transactions handed to a proposer that has landed nothing since
    are proposed here, ``relay_retry`` seconds a failed proposer is passed over,
    ``relay_window`` relayed batches at most awaiting the proposer's answer.
    """

    def __init__(
        self,
        node: Node,
        endpoints: Sequence[tuple[str, int]],
        *,
        root: str = "/medledger",
        org: str | None = None,
        key: SigningKey | None = None,
        max_batch: int = 2000,
        max_bytes: int = MAX_PROPOSAL_BYTES,
        max_wait: float = 0.002,
        submit_timeout: float = 10.0,
        request_timeout: float = 2.0,
        verify_workers: int = 1,
        parallel_threshold: int = 16,
        report_interval: float = 0.5,
        compact_interval: float | None = 60.0,
        max_pending: int = 1,
        max_group: int = 8,
        tls: EtcdTLS | None = None,
        min_interval: float = 0.0,
        busy_rate: float = 30.0,
        busy_threshold: int = 100,
        relay: Relay | None = None,
        relay_timeout: float = 2.0,
        relay_retry: float = 5.0,
        relay_window: int = 8,
    ) -> None:
        if not endpoints:
            raise ValueError("the etcd orderer needs at least one endpoint")
        if not 1 <= max_batch <= MAX_PROPOSAL_TXS or max_bytes > MAX_PROPOSAL_BYTES:
            raise ValueError(f"max_batch must be 1..{MAX_PROPOSAL_TXS}, max_bytes <= 1 MB")
        if not node.signers and (org is None or key is None):
            raise ValueError("the etcd orderer needs the node's organisation and key")
        self._node = node
        self.org: str = org if org is not None else node.signers[0][0]
        self._key: SigningKey = key if key is not None else node.signers[0][1]
        self.endpoints = list(endpoints)
        self.prefix = f"{root.rstrip('/')}/{node.network}/".encode()
        self._p_genesis = self.prefix + b"genesis"
        self._p_proposals = self.prefix + b"proposals/"
        self._p_applied = self.prefix + b"applied/"
        self._max_batch = max_batch
        self._max_bytes = max_bytes
        self._max_wait = max_wait
        self._submit_timeout = submit_timeout
        self._request_timeout = request_timeout
        self._verify_workers = verify_workers
        self._parallel_threshold = parallel_threshold
        self._report_interval = report_interval
        self._compact_interval = compact_interval
        self._max_pending = max(1, max_pending)
        self._max_group = max(1, max_group)
        self._min_interval = max(0.0, min_interval)
        self._last_cut = 0.0  # loop time of this node's last proposal cut
        if busy_rate < 0 or busy_threshold < 1:
            raise ValueError("busy_rate must be >= 0 and busy_threshold >= 1")
        self._busy_rate = float(busy_rate)
        self._busy_threshold = int(busy_threshold)
        # transactions that arrived while an own proposal was in flight, counted per
        # whole second of loop time: [second, count in it, count in the one before]
        self._overlap = [0, 0, 0]
        self._holding = False  # the propose loop is waiting out its interval
        self._relay = relay
        self._relay_timeout = relay_timeout
        self._relay_retry = relay_retry
        self._relay_down: dict[str, float] = {}  # proposer -> loop time it may be tried again
        # handed to another node's proposals, not yet decided: tx id -> items, and the
        # items in the order they were handed over (done ones are dropped lazily)
        self._relayed: dict[bytes, list[_Item]] = {}
        self._relay_order: collections.deque[_Item] = collections.deque()
        self._landed_by: dict[str, float] = {}  # org -> loop time its last proposal was applied
        self._front: collections.deque[_Item] = collections.deque()  # to propose before the queue
        self._relay_slots = asyncio.Semaphore(max(1, relay_window))
        self._relay_failed = False  # a hand-over failed: take back what is undecided
        self._kick = asyncio.Event()  # wakes the propose loop when that happens
        self._handing: set[asyncio.Task[None]] = set()
        self._pool: ProcessPoolExecutor | None = None
        # connections: writes and reads; the watch stream has its own
        self._conn = _Conn(endpoints, request_timeout, tls=tls)
        self._watch_conn = _Conn(endpoints, request_timeout, tls=tls)
        self._aux_conn = _Conn(endpoints, request_timeout, tls=tls)  # applied, compaction

        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        # submit deadlines in submission order (the timeout is fixed, so this is also
        # deadline order): one timer for the earliest, not one per transaction
        self._expiry: collections.deque[tuple[float, asyncio.Future[Receipt]]] = collections.deque()
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._inflight: dict[bytes, list[_Item]] = {}
        self._events: asyncio.Queue[_Event] = asyncio.Queue(maxsize=32)
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closed = False
        self._failure: OrdererError | None = None
        self._last_error = ""

        self.base_revision = 0  # revision of the genesis key: the network's first
        self.height = 0  # head height after the last applied proposal
        self.revision = 0  # durable: every proposal <= revision is applied
        self._next_rev = 1  # next revision the watch must deliver
        self._done_rev = 0  # every event up to here has been handled
        self._landed_rev = 0  # highest revision at which one of our proposals landed
        self._watch_alive_at = 0.0  # when the watch last delivered (or was created)
        self._progress = asyncio.Condition()
        self._reported = 0
        self._carry: _Item | None = None

    # -- public ---------------------------------------------------------------------------
    @property
    def failure(self) -> OrdererError | None:
        """Why the orderer stopped deriving blocks (e.g. :class:`CatchUpRequired`)."""
        return self._failure

    @property
    def position(self) -> tuple[int, int]:
        """(head height, etcd revision applied through)."""
        return self.height, self.revision

    def enqueue(self, tx: Transaction) -> asyncio.Future[Receipt]:
        """Queue ``tx`` for the next proposal; the future resolves once it is committed here."""
        return self._enqueue(tx, relayed_in=False)

    def accept_relayed(self, txs: Sequence[Transaction]) -> int:
        """Queue transactions another node relayed here, in order, for this node's proposals.

        Nobody waits here for them: the relaying node answers its submitters when it
        applies the block that carries them. Returns the highest etcd revision this
        node knows to exist: the proposals that will carry ``txs`` land above it, so
        the relaying node does not take an earlier copy of one of them (someone else's
        submission, which makes this one a replay) for its own. Raises like
        :meth:`enqueue` when this node cannot propose (nothing is queued then).
        """
        self._check_running()
        for tx in txs:
            self._enqueue(tx, relayed_in=True).add_done_callback(_consume)
        return max(self._next_rev - 1, self._landed_rev)

    def _check_running(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed or not self._started:
            raise OrdererError("the etcd orderer is not running; not committed")

    def _enqueue(self, tx: Transaction, *, relayed_in: bool) -> asyncio.Future[Receipt]:
        self._check_running()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Receipt] = loop.create_future()
        self._queue.put_nowait(_Item(tx, fut, len(tx.raw) + 8, relayed_in))
        now = loop.time()
        if self._inflight or self._holding:  # a proposal of this node is being ordered,
            self._count_overlap(int(now))  # or its next is held back: did not wait
        when = now + self._submit_timeout
        self._expiry.append((when, fut))
        if self._expiry_timer is None:
            self._expiry_timer = loop.call_at(when, self._sweep)
        return fut

    async def submit(self, tx: Transaction) -> Receipt:
        return await self.enqueue(tx)

    async def start(self) -> None:
        """Join the network in etcd, apply everything ordered so far, then accept submits.

        Raises :class:`CatchUpRequired` when etcd's history no longer reaches back
        to this node's position, :class:`OrdererError` when etcd is unreachable or
        belongs to another network.
        """
        if self._started:
            return
        try:
            await self._join()
        except BaseException:
            for conn in (self._conn, self._watch_conn, self._aux_conn):
                await conn.close()
            raise
        self._started = True
        await self._verify([])  # start the signature worker now, not on the first proposal
        self._spawn(self._watch_loop(), "watch")
        self._spawn(self._apply_loop(), "apply")
        try:
            target = await self._latest_proposal_revision()
            await self.wait_revision(target)
        except BaseException:
            await self.stop()
            raise
        self._spawn(self._propose_loop(), "propose")
        self._spawn(self._report_loop(), "report")
        if self._compact_interval is not None:
            self._spawn(self._compact_loop(), "compact")

    async def stop(self) -> None:
        self._closed = True
        tasks = (*self._tasks, *self._handing)
        for task in tasks:
            task.cancel()
        for task in tasks:
            # A cancellation can be lost on the way: aetcd waits with asyncio.wait_for,
            # which on Python 3.11 drops one that arrives as the awaited operation
            # completes (e.g. a watch being created as the node stops). Cancel again
            # until the task has ended, so that stop() never hangs.
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                if not task.done():
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        close = getattr(self._relay, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()
        self._fail_all(OrdererError("the node is shutting down; not committed"))
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        self._expiry.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        for conn in (self._conn, self._watch_conn, self._aux_conn):
            await conn.close()

    async def wait_revision(self, revision: int) -> None:
        """Wait until every proposal up to ``revision`` has been applied on this node.

        ``revision`` must be that of a write under the proposals prefix (e.g. where a
        proposal landed), or an earlier one: other keys produce no watch event. Raises
        the orderer's failure (e.g. :class:`CatchUpRequired`) if it stops.
        """
        async with self._progress:
            while self._done_rev < revision:
                if self._failure is not None:
                    raise self._failure
                await self._progress.wait()

    async def sync(self) -> None:
        """Wait until this node has applied every proposal in etcd right now."""
        await self.wait_revision(await self._latest_proposal_revision())

    async def compact(self) -> int | None:
        """Delete proposals every node applied and compact etcd's history below them.

        The floor is the minimum revision recorded under ``applied/`` (nodes that
        never recorded one are not waited for: they catch up from peers). Returns
        the revision compacted at, or None when there is nothing to do.
        """
        client = await self._aux_conn.client()
        try:
            got = await client.get_prefix(self._p_applied)
            revs = [int(decode(kv.value)["rev"]) for kv in got]
            if not revs:
                return None
            floor = min(revs)
            keys = await client.get_prefix(self._p_proposals, keys_only=True)
            stale = [kv.key for kv in keys if kv.mod_revision <= floor]
            tx = client.transactions
            for i in range(0, len(stale), 100):
                chunk = stale[i : i + 100]
                await client.transaction(
                    compare=[], success=[tx.delete(k) for k in chunk], failure=[]
                )
            try:
                await client.compact(floor)
            except aetcd.ClientError as exc:
                if "compacted" not in str(exc):
                    raise
            log.info("etcd history compacted at revision %d", floor)
            return floor
        except _TRANSIENT as exc:
            await self._aux_conn.rotate()
            raise OrdererError(f"etcd compaction failed: {exc}") from exc

    # -- joining --------------------------------------------------------------------------
    async def _join(self) -> None:
        node = self._node
        header, _ = await node.get_block(0)
        genesis_hash = header.hash
        base, current = await self._with_retry(lambda c: self._ensure_genesis(c, genesis_hash))
        self.base_revision = base
        pos = await node.storage(read_position)
        head = node.head.height
        if pos is None:
            if head != 0:
                raise OrdererError(
                    f"this ledger has {head} blocks but no recorded etcd position: it was not "
                    "built by the etcd orderer (import blocks with write_position)"
                )
            pos = (0, base)
        self.height, self.revision = pos
        self._next_rev = self.revision + 1
        self._done_rev = self.revision
        self._reported = 0
        if self._next_rev <= current:
            await self._with_retry(lambda c: self._check_not_compacted(c, self._next_rev))

    async def _ensure_genesis(self, client: Any, genesis_hash: bytes) -> tuple[int, int]:
        tx = client.transactions
        await client.transaction(
            compare=[tx.create(self._p_genesis) == 0],
            success=[tx.put(self._p_genesis, genesis_hash)],
            failure=[],
        )
        got = await client.get(self._p_genesis)
        if got is None:  # pragma: no cover - deleted by hand in between
            raise OrdererError("etcd lost the network's genesis key")
        if got.value != genesis_hash:
            raise OrdererError(
                f"etcd prefix {self.prefix.decode()} belongs to a different network (genesis "
                f"{bytes(got.value).hex()[:16]}..., ours {genesis_hash.hex()[:16]}...)"
            )
        return int(got.create_revision), int(got.header.revision)

    async def _check_not_compacted(self, client: Any, revision: int) -> None:
        req = _range_request(
            self._p_proposals, _prefix_end(self._p_proposals), revision=revision, count_only=True
        )
        try:
            await client.kvstub.Range(req, timeout=self._request_timeout)
        except etcd_rpc.AioRpcError as exc:
            if exc.code() == etcd_rpc.StatusCode.OUT_OF_RANGE and "compacted" in (
                exc.details() or ""
            ):
                raise CatchUpRequired(self.height + 1, revision) from None
            aetcd.exceptions._handle_exception(exc)

    async def _latest_proposal_revision(self) -> int:
        """Create revision of the newest live proposal key (0 if none)."""

        async def _get(client: Any) -> int:
            req = _range_request(
                self._p_proposals,
                _prefix_end(self._p_proposals),
                limit=1,
                keys_only=True,
                sort_create_desc=True,
            )
            try:
                resp = await client.kvstub.Range(req, timeout=self._request_timeout)
            except etcd_rpc.AioRpcError as exc:
                aetcd.exceptions._handle_exception(exc)
                raise  # pragma: no cover - _handle_exception always raises
            return int(resp.kvs[0].create_revision) if resp.kvs else 0

        return await self._with_retry(_get)

    async def _with_retry(self, fn: Callable[[Any], Awaitable[T]], attempts: int = 3) -> T:
        """Run ``fn(client)`` against the cluster, trying other endpoints on failure."""
        last: BaseException | None = None
        for _ in range(max(attempts, len(self.endpoints))):
            try:
                return await fn(await self._conn.client())
            except CatchUpRequired:
                raise
            except _TRANSIENT as exc:
                last = exc
                self._last_error = f"{type(exc).__name__}: {exc}"
                await self._conn.rotate()
        eps = ", ".join(f"{h}:{p}" for h, p in self.endpoints)
        raise OrdererError(f"etcd cluster unreachable at {eps}: {last}") from last

    # -- tasks ----------------------------------------------------------------------------
    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        async def _guard() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except OrdererError as exc:
                self._fail(exc)
            except Exception as exc:
                log.exception("etcd orderer %s task failed", name)
                self._fail(OrdererError(f"etcd orderer {name} task failed: {exc}"))

        self._tasks.append(asyncio.create_task(_guard(), name=f"medledger-etcd-{name}"))

    def _fail(self, exc: OrdererError) -> None:
        if self._failure is None:
            self._failure = exc
            log.error("etcd orderer stopped: %s", exc)
        self._fail_all(exc)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._progress:
            self._progress.notify_all()

    def _fail_all(self, exc: OrdererError) -> None:
        for items in (*self._inflight.values(), *self._relayed.values(), self._front):
            for it in items:
                if not it.fut.done():
                    it.fut.set_exception(exc)
        self._inflight.clear()
        self._relayed.clear()
        self._relay_order.clear()
        self._front.clear()
        while not self._queue.empty():
            it = self._queue.get_nowait()
            if not it.fut.done():
                it.fut.set_exception(exc)

    def _sweep(self) -> None:
        """Fail the submits whose deadline has passed; re-arm for the next deadline."""
        loop = asyncio.get_running_loop()
        self._expiry_timer = None
        now = loop.time()
        queue = self._expiry
        while queue and (queue[0][0] <= now or queue[0][1].done()):
            self._expire(queue.popleft()[1])
        if queue and not self._closed:
            self._expiry_timer = loop.call_at(queue[0][0], self._sweep)

    def _expire(self, fut: asyncio.Future[Receipt]) -> None:
        if fut.done():
            return
        if self._last_error:
            why = (
                "the etcd cluster is unavailable or has no quorum "
                f"(last etcd error: {self._last_error})"
            )
        else:
            why = "it was not ordered and applied on this node in time"
        fut.set_exception(
            OrdererError(
                f"not committed within {self._submit_timeout:g} s: {why}. Nothing was "
                "acknowledged; the transaction may still commit later, and resubmitting "
                "it is safe (duplicates are refused)"
            )
        )

    # -- proposing ------------------------------------------------------------------------
    async def _collect(self) -> list[_Item]:
        loop = asyncio.get_running_loop()
        first, self._carry = self._carry, None
        if first is None:
            first = await self._next()
        batch, size = [first], first.size
        deadline = loop.time() + self._max_wait
        while len(batch) < self._max_batch:
            if self._front:
                item = self._front.popleft()
            elif self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        item = await self._queue.get()
                except TimeoutError:
                    break
            else:
                item = self._queue.get_nowait()
            if size + item.size > self._max_bytes:
                self._carry = item  # first of the next proposal: submission order is kept
                break
            batch.append(item)
            size += item.size
        return batch

    async def _next(self) -> _Item:
        """The first item of the next batch: re-queued ones before the queue. While it
        waits, transactions relayed to a proposer that failed or does not carry them
        come back (nothing is half-collected then, so they keep their place)."""
        if self._relay is None:  # nothing is ever relayed or taken back: just the queue
            return await self._queue.get()
        while True:
            if self._relay_failed:
                self._fall_back()
            wait = self._check_relayed()
            if self._front:
                return self._front.popleft()
            if not self._queue.empty():
                return self._queue.get_nowait()
            self._kick.clear()
            getter = asyncio.ensure_future(self._queue.get())
            kicked = asyncio.ensure_future(self._kick.wait())
            try:
                await asyncio.wait(
                    {getter, kicked}, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                kicked.cancel()
                if not getter.done():
                    getter.cancel()  # nothing was taken: the queue keeps its items
            if getter.done() and not getter.cancelled():
                return getter.result()

    # -- relaying -------------------------------------------------------------------------
    def _relay_target(self, batch: list[_Item]) -> str | None:
        """The organisation whose node should propose ``batch`` (None: this node)."""
        if self._relay is None or any(it.relayed_in for it in batch):
            return None
        now = asyncio.get_running_loop().time()
        for org in self._relay.proposers():
            if org == self.org:
                return None
            if self._relay_down.get(org, 0.0) <= now:
                return org
        return None

    def _hand_over(self, org: str, batch: list[_Item]) -> None:
        """Relay ``batch`` to ``org``'s node without waiting for the answer (the relay
        keeps the order of its calls); a refusal or failure takes it back (see
        :meth:`_fall_back`). Until the answer names the proposer's revision, the
        revision this node has seen stands for it: no proposal up to there carries
        ``batch``, and one that does is recognised even if it lands first."""
        assert self._relay is not None
        now = asyncio.get_running_loop().time()
        seen = max(1, self._next_rev - 1)
        fresh = [it for it in batch if it.floor == 0]  # handed over for the first time
        for it in fresh:
            it.floor = seen
        for it in batch:
            it.relayed_at, it.relayed_to = now, org
            self._relayed.setdefault(it.tx.tx_id, []).append(it)
            self._relay_order.append(it)
        task = asyncio.create_task(self._handed_over(org, batch, fresh))
        self._handing.add(task)
        task.add_done_callback(self._handing.discard)

    async def _handed_over(self, org: str, batch: list[_Item], fresh: list[_Item]) -> None:
        assert self._relay is not None
        try:
            floor = await self._relay.forward(org, [it.tx.raw for it in batch])
        except Exception as exc:  # whatever the transport raises: maybe not handed over
            if not self._relay_failed:
                log.warning(
                    "relaying %d transactions to %s failed (%s); proposing them here",
                    len(batch),
                    org,
                    exc,
                )
            self._relay_down[org] = asyncio.get_running_loop().time() + self._relay_retry
            self._relay_failed = True  # taken back by the propose loop, in order
            self._kick.set()
        else:
            # only the first hand-over's answer may raise the floor: an earlier copy,
            # if one landed, came from that one
            for it in fresh:
                it.floor = max(it.floor, int(floor))
        finally:
            self._relay_slots.release()

    def _requeue(self, batch: list[_Item]) -> None:
        """Put a collected batch back in front (with the item carried after it)."""
        behind = list(self._front)
        if self._carry is not None:
            behind.insert(0, self._carry)
            self._carry = None
        self._front.clear()
        self._front.extend(batch)
        self._front.extend(behind)

    def _fall_back(self) -> None:
        """Propose here what was relayed and is still undecided, before anything queued
        after it (submission order kept).

        The re-queued transactions stay known by id, so that they are answered from
        whichever proposal carries them first (the other copy is refused as a replay).
        """
        self._relay_failed = False
        ahead = [it for it in self._relay_order if not it.fut.done()]
        self._relay_order.clear()
        for it in ahead:
            it.relayed_at, it.relayed_to = 0.0, ""
        back: dict[int, _Item] = {}  # an item handed over twice goes back once
        for it in ahead:
            back.setdefault(id(it), it)
        self._requeue(list(back.values()))
        if ahead:
            log.warning("%d relayed transactions taken back to be proposed here", len(ahead))

    def _check_relayed(self) -> float | None:
        """Take back relayed transactions that their proposer does not carry in time.

        Returns the seconds until the next check is due (None: nothing relayed is
        pending). The oldest pending one comes back (with every later one) once it is
        ``relay_timeout`` old and its proposer landed no proposal for that long (it
        died), or once half the submit timeout has passed whatever the proposer did.
        """
        order = self._relay_order
        while order and order[0].fut.done():
            order.popleft()
        if len(self._relayed) > 2 * len(order) + 1024:  # drop answered (e.g. timed out) ones
            self._relayed = {
                k: v for k, v in self._relayed.items() if any(not it.fut.done() for it in v)
            }
        if not order:
            return None
        now = asyncio.get_running_loop().time()
        first = order[0]
        age = now - first.relayed_at
        if age < self._relay_timeout:
            return self._relay_timeout - age
        limit = self._submit_timeout / 2
        alive = self._landed_by.get(first.relayed_to, -1e18) >= now - self._relay_timeout
        if alive and age < limit:
            return min(limit - age, self._relay_timeout / 4)
        log.warning("%s did not propose what was relayed to it in time", first.relayed_to)
        self._relay_down[first.relayed_to] = now + self._relay_retry
        self._fall_back()
        return 0.0

    def _settle(self, tx_id: bytes, rev: int, outcome: Receipt | Exception) -> None:
        """Answer the oldest undecided relayed submission of ``tx_id`` that the proposal
        at revision ``rev`` can carry with ``outcome``."""
        items = self._relayed.get(tx_id)
        if items is None:
            return
        items[:] = [it for it in items if not it.fut.done()]
        for i, it in enumerate(items):
            if it.floor < rev:
                del items[i]
                if isinstance(outcome, Exception):
                    it.fut.set_exception(outcome)
                else:
                    it.fut.set_result(outcome)
                break
        if not items:
            del self._relayed[tx_id]

    def _count_overlap(self, second: int) -> None:
        ov = self._overlap
        if ov[0] != second:
            ov[2] = ov[1] if ov[0] == second - 1 else 0
            ov[0], ov[1] = second, 0
        ov[1] += 1

    def _busy(self, now: float) -> bool:
        """Whether at least ``busy_threshold`` transactions arrived in the last second
        (this whole second of loop time and the part of the one before it that is
        within a second) while one of this node's proposals was in flight or its next
        one was held back."""
        second = int(now)
        ov = self._overlap
        if ov[0] == second:
            current, before = ov[1], ov[2]
        elif ov[0] == second - 1:
            current, before = 0, ov[1]
        else:
            return False
        recent = current + before * (1.0 - (now - second))  # the earlier part, pro rata
        return recent >= self._busy_threshold

    def _interval(self, now: float) -> float:
        """Seconds at least between this node's proposals now (see Pacing)."""
        interval = self._min_interval
        if self._busy_rate > 0 and self._busy(now):
            since = now - 1.0
            others = sum(1 for org, t in self._landed_by.items() if t >= since and org != self.org)
            interval = max(interval, min((1 + others) / self._busy_rate, BUSY_MAX_INTERVAL))
        return interval

    async def _pace(self) -> None:
        """Wait until this node's interval has passed since its last proposal.

        Trades latency for CPU under load: transactions that arrive meanwhile go
        into the same proposal, so every node derives, checks and commits fewer,
        larger blocks (a block has a fixed cost on every node and in etcd). The
        interval is ``min_interval``, or longer while the node is busy (module
        docstring, Pacing). A node whose last proposal is older than the interval
        cuts at once, and so does one with ``max_batch`` transactions already waiting
        when the wait would begin.
        """
        now = asyncio.get_running_loop().time()
        gap = self._last_cut + self._interval(now) - now
        if gap > 0 and self._queue.qsize() < self._max_batch:
            self._holding = True
            try:
                await asyncio.sleep(gap)
            finally:
                self._holding = False

    async def _propose_loop(self) -> None:
        # Self-clocking: a new proposal is cut only while fewer than ``max_pending`` of
        # this node's proposals are landed but not yet applied here, so under load
        # proposals (and blocks) grow instead of multiplying: every node pays a fixed
        # cost per block.
        pending: collections.deque[int] = collections.deque()
        while True:
            while pending and pending[0] <= self._done_rev:
                pending.popleft()
            if len(pending) >= self._max_pending:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._submit_timeout):
                        await self.wait_revision(pending[0])
                if pending[0] > self._done_rev:
                    pending.popleft()  # not applied in time (watch trouble): do not stall
                continue
            await self._pace()
            batch = [it for it in await self._collect() if not it.fut.done()]
            self._last_cut = asyncio.get_running_loop().time()
            if not batch:
                continue
            target = self._relay_target(batch)
            if target is not None:
                await self._relay_slots.acquire()  # at most relay_window unanswered
                if self._relay_failed:  # one failed meanwhile: what it carried goes first
                    self._relay_slots.release()
                    self._requeue(batch)
                    continue
                self._hand_over(target, batch)
                continue
            if self._relay_failed:
                self._requeue(batch)
                continue
            p = Proposal.create(
                self._key,
                self._node.network,
                self.org,
                self._node.clock(),
                [it.tx.raw for it in batch],
            )
            key = self._p_proposals + f"{self.org}/{p.nonce.hex()}".encode()
            self._inflight[key] = batch
            landed = await self._put_proposal(key, p.raw, batch)
            if landed is None:
                self._inflight.pop(key, None)
            elif landed:
                pending.append(landed)

    async def _put_proposal(self, key: bytes, value: bytes, batch: list[_Item]) -> int | None:
        """Create ``key`` once: its revision, 0 if an earlier attempt created it, None if not."""
        delay = 0.05
        while True:
            try:
                client = await self._conn.client()
                tx = client.transactions
                ok, responses = await client.transaction(
                    compare=[tx.create(key) == 0], success=[tx.put(key, value)], failure=[]
                )
                self._last_error = ""
                if not (ok and responses):
                    return 0
                rev = int(responses[0].response_put.header.revision)
                self._landed_rev = max(self._landed_rev, rev)
                return rev
            except _TRANSIENT as exc:
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.warning("proposal write via %s failed: %s", self._conn.endpoint, exc)
                await self._conn.rotate()
            if all(it.fut.done() for it in batch):
                return None  # every submitter has been answered (timed out)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    # -- watching -------------------------------------------------------------------------
    async def _watch_loop(self) -> None:
        delay = 0.05
        while True:
            try:
                client = await self._watch_conn.client()
                watch = await client.watch_prefix(self._p_proposals, start_revision=self._next_rev)
            except aetcd.RevisionCompactedError as exc:
                raise CatchUpRequired(self.height + 1, int(exc.compacted_revision)) from exc
            except _TRANSIENT as exc:
                log.warning("watch via %s failed: %s", self._watch_conn.endpoint, exc)
                await self._watch_conn.rotate()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            self._watch_alive_at = time.monotonic()
            consumer = asyncio.create_task(self._consume(watch))
            try:
                while not consumer.done():
                    await asyncio.wait({consumer}, timeout=1.0)
                    if not consumer.done() and self._stalled():
                        log.warning("watch via %s stalled; reconnecting", self._watch_conn.endpoint)
                        consumer.cancel()
                        await asyncio.wait({consumer})
            finally:
                if not consumer.done():
                    consumer.cancel()
                    await asyncio.wait({consumer})
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await watch.cancel()
            error = None if consumer.cancelled() else consumer.exception()
            if isinstance(error, aetcd.RevisionCompactedError):
                raise CatchUpRequired(self.height + 1, int(error.compacted_revision)) from error
            if error is not None and not isinstance(error, _TRANSIENT):
                raise error
            if error is not None:
                log.warning("watch via %s ended: %s", self._watch_conn.endpoint, error)
            await self._watch_conn.rotate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _stalled(self) -> bool:
        """One of our proposals landed but the watch has not delivered anything for a while."""
        return (
            self._landed_rev >= self._next_rev
            and time.monotonic() - self._watch_alive_at > 2 * self._request_timeout
        )

    async def _consume(self, watch: Any) -> None:
        # Only the first event of each revision counts (a proposal is never written in a
        # multi-key etcd transaction, so nothing honest is lost), and it is a proposal
        # only if it creates its key (version 1): overwrites and deletions are ignored.
        async for ev in watch:
            self._watch_alive_at = time.monotonic()
            kv = ev.kv
            rev = int(kv.mod_revision)
            if rev < self._next_rev:
                continue  # a later event of the same revision, or a redelivery
            creation = ev.kind == "PUT" and kv.version == 1
            await self._events.put(_Event(rev, bytes(kv.key), bytes(kv.value), creation))
            self._next_rev = rev + 1

    # -- applying -------------------------------------------------------------------------
    async def _apply_loop(self) -> None:
        # While a group of proposals commits on the storage thread, the proposals that
        # arrive meanwhile are parsed and their signatures checked (in a worker process
        # for large ones); they then become consecutive blocks committed in ONE store
        # transaction (group commit): under steady load every node pays the store
        # commit once per group instead of once per block.
        committing: asyncio.Task[None] | None = None
        ready: list[_Prepared] = []
        try:
            while True:
                if not ready:
                    ready.append(await self._prepare(await self._events.get()))
                while committing is not None and not committing.done():
                    getter = asyncio.ensure_future(self._events.get())
                    try:
                        await asyncio.wait(
                            {getter, committing}, return_when=asyncio.FIRST_COMPLETED
                        )
                    finally:
                        if not getter.done():
                            getter.cancel()  # the event stays queued
                            await asyncio.wait({getter})
                    if not getter.cancelled():
                        ready.append(await self._prepare(getter.result()))
                if committing is not None:
                    await committing
                while not self._events.empty() and len(ready) < self._max_group:
                    ready.append(await self._prepare(self._events.get_nowait()))
                group, ready = ready[: self._max_group], ready[self._max_group :]
                committing = asyncio.create_task(self._apply_and_notify(group))
        finally:
            if committing is not None and not committing.done():
                committing.cancel()
                await asyncio.wait({committing})

    async def _apply_and_notify(self, group: list[_Prepared]) -> None:
        try:
            await self._apply(group)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # storage failure: stop deriving blocks
            log.exception(
                "applying the proposals at revisions %d..%d failed",
                group[0].event.rev,
                group[-1].event.rev,
            )
            self._fail(OrdererError(f"applying ordered proposals failed: {exc}"))
            raise
        async with self._progress:
            self._done_rev = group[-1].event.rev
            self._progress.notify_all()

    async def _prepare(self, event: _Event) -> _Prepared:
        empty = _Prepared(event, None, "", [], [], {}, None)
        if not event.proposal:
            return empty
        try:
            p = Proposal.from_bytes(event.value)
        except InvalidProposal as exc:
            empty.reason = str(exc)
            return empty
        expected = self._p_proposals + f"{p.org}/{p.nonce.hex()}".encode()
        if event.key != expected:
            empty.reason = "proposal stored under a key that does not match its org and nonce"
            return empty
        txs: list[Transaction] = []
        positions: list[int] = []
        malformed: dict[int, TransactionRejected] = {}
        # This node's own proposal: its transactions were parsed when submitted, from
        # the very bytes the proposal carries (checked one by one); so were those it
        # relayed (found by id: the hash of those bytes); others are parsed.
        mine = self._inflight.get(event.key)
        if mine is not None and len(mine) != len(p.txs):
            mine = None
        relayed = self._relayed
        for i, raw in enumerate(p.txs):
            if mine is not None and mine[i].tx.raw == raw:
                txs.append(mine[i].tx)
                positions.append(i)
                continue
            if relayed:
                got = relayed.get(hashlib.sha256(raw).digest())
                if got and got[0].tx.raw == raw:
                    txs.append(got[0].tx)
                    positions.append(i)
                    continue
            try:
                txs.append(Transaction.from_bytes(raw))
                positions.append(i)
            except MalformedTransaction as exc:
                malformed[i] = exc
        verdicts = await self._verify(txs)
        return _Prepared(event, p, "", txs, positions, malformed, verdicts)

    async def _verify(self, txs: list[Transaction]) -> list[bool] | None:
        """Signature verdicts from the worker process, or None (checked inline when applied).

        The transactions were parsed here from the proposal's bytes; the worker gets
        each one's public key, signature and signing bytes (derived from those same
        bytes) and only verifies.
        """
        if self._verify_workers == 0 or 0 < len(txs) < self._parallel_threshold:
            return None
        items = [(tx.pub, tx.sig, tx.signing_bytes()) for tx in txs]
        try:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=self._verify_workers, mp_context=mp.get_context("spawn")
                )
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, check_signed, items)
        except (BrokenProcessPool, OSError, RuntimeError) as exc:
            log.warning("signature workers unavailable (%s); checking inline", exc)
            self._verify_workers = 0
            return None

    async def _apply(self, group: list[_Prepared]) -> None:
        """Derive the blocks of consecutive events and commit them in one store transaction.

        Each valid proposal becomes the block it would be on its own (checked and
        built on the state the group's earlier blocks leave); the position after
        the group's last event is written in the same transaction. Submitters
        hear back only once that transaction is durable.
        """
        node = self._node
        if not any(prep.event.proposal for prep in group):
            return  # overwrites, deletions, unrelated keys: nothing to apply or record
        specs: list[BlockSpec] = []
        valid: list[tuple[_Prepared, list[_Item] | None]] = []
        invalid: list[tuple[_Prepared, list[_Item] | None]] = []
        for prep in group:
            ev = prep.event
            if not ev.proposal:
                continue
            items = self._inflight.pop(ev.key, None)
            p = prep.proposal
            if p is None:
                invalid.append((prep, items))
                continue
            specs.append(
                BlockSpec(
                    prep.txs,
                    prep.verdicts,
                    block_time=p.time,
                    proposer=p.proposer,
                    precheck=functools.partial(_precheck, node.config, p),
                )
            )
            valid.append((prep, items))
        rev = group[-1].event.rev
        outcomes = await node.commit_group(
            specs, refusals=(InvalidProposal,), meta=lambda h: position_meta(h, rev)
        )
        self.height, self.revision = node.head.height, rev
        for prep, items in invalid:
            ev = prep.event
            log.warning("ignoring proposal %s at revision %d: %s", ev.key, ev.rev, prep.reason)
            self._refuse(items, prep.reason)
        now = asyncio.get_running_loop().time()
        for (prep, items), outcome in zip(valid, outcomes, strict=True):
            assert prep.proposal is not None
            self._landed_by[prep.proposal.org] = now
            if self._relayed:  # this node's relayed transactions, wherever they landed
                if isinstance(outcome, Exception):
                    refused = OrdererError(f"proposal refused by the network: {outcome}")
                    for tx in prep.txs:
                        self._settle(tx.tx_id, prep.event.rev, refused)
                else:
                    for tx, res in zip(prep.txs, outcome, strict=True):
                        self._settle(tx.tx_id, prep.event.rev, res)
            if isinstance(outcome, Exception):
                ev = prep.event
                log.warning("refusing proposal %s at revision %d: %s", ev.key, ev.rev, outcome)
                self._refuse(items, str(outcome))
                continue
            if items is None:
                continue
            by_pos: dict[int, Receipt | TransactionRejected] = dict(prep.malformed)
            by_pos.update(zip(prep.positions, outcome, strict=True))
            for i, it in enumerate(items):
                if it.fut.done():
                    continue
                res = by_pos[i]
                if isinstance(res, TransactionRejected):
                    it.fut.set_exception(res)
                else:
                    it.fut.set_result(res)

    @staticmethod
    def _refuse(items: list[_Item] | None, reason: str) -> None:
        for it in items or []:
            if not it.fut.done():
                it.fut.set_exception(OrdererError(f"proposal refused by the network: {reason}"))

    # -- reporting and compaction -----------------------------------------------------------
    async def _report_loop(self) -> None:
        key = self._p_applied + self.org.encode()
        while True:
            if self.revision > self._reported:
                rev, height = self.revision, self.height
                try:
                    client = await self._aux_conn.client()
                    await client.put(key, encode({"rev": rev, "height": height}))
                    self._reported = rev
                except _TRANSIENT:
                    await self._aux_conn.rotate()
            await asyncio.sleep(self._report_interval)

    async def _compact_loop(self) -> None:
        assert self._compact_interval is not None
        while True:
            await asyncio.sleep(self._compact_interval)
            try:
                await self.compact()
            except OrdererError as exc:
                log.warning("%s", exc)
