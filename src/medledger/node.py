"""The node: wires store, contracts, ledger and orderer together.

This is the only module that owns long-running tasks and threads. All store
access happens on one dedicated storage thread (stores are synchronous and not
thread-safe); everything public here is ``async``.

Lifecycle::

    node = await Node.create(store_url, genesis_doc, signers=[...])   # once
    node = await Node.open(store_url, signers=[...])                   # afterwards
    await node.start()              # starts the orderer (embedded; or node.start("etcd://..."))
    receipt = await node.submit(tx) # returns once the tx's block is durable
    await node.close()
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time as _time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from medledger.contracts import make_registry
from medledger.contracts.base import Registry
from medledger.contracts.core import genesis_effects, normalise_genesis
from medledger.crypto.signing import SigningKey
from medledger.encoding import decode, encode
from medledger.errors import (
    BadTransactionSignature,
    IntegrityError,
    NotFoundError,
    OrdererError,
    ProofError,
    StorageError,
    TransactionRejected,
)
from medledger.ledger.apply import BlockResult, ChainReader, build_block, genesis_header
from medledger.ledger.block import BlockHeader
from medledger.ledger.checkpoint import BlockRef, Checkpoint, checkpoint_of, sign_checkpoint
from medledger.ledger.note import NoteSigner
from medledger.ledger.tx import Transaction
from medledger.merkle.compact import CompactRange, border_ids, root_from_border
from medledger.merkle.hasher import EMPTY_ROOT, leaf_hash
from medledger.merkle.proof import consistency_nodes, inclusion_nodes
from medledger.state.base import StateReader
from medledger.state.overlay import Overlay
from medledger.state.smt import (
    TOP_DEPTH,
    SparseMerkleTree,
    apply_writes,
    rebuild_top,
    split_top,
)
from medledger.store import BlockRecord, LedgerStore, TxRecord, open_store
from medledger.store.base import BlockWrite

__all__ = [
    "BlockSpec",
    "InclusionProof",
    "Node",
    "Receipt",
    "checkpoint_origin",
    "signer_name",
]

T = TypeVar("T")


def checkpoint_origin(network: str) -> str:
    """The checkpoint origin line of a network's log."""
    return f"medledger/{network}"


def signer_name(network: str, org: str) -> str:
    """The signed-note key name of an organisation's node."""
    return f"{network}/{org}"


@dataclass(frozen=True, slots=True)
class Receipt:
    """Proof of acceptance: the transaction is in a durable block at ``index``."""

    tx_id: bytes
    index: int
    height: int


@dataclass(frozen=True, slots=True)
class InclusionProof:
    leaf_index: int
    tree_size: int
    leaf_hash: bytes
    proof: list[bytes]
    checkpoint: str

    def to_json(self) -> dict[str, Any]:
        return {
            "leaf_index": self.leaf_index,
            "tree_size": self.tree_size,
            "leaf_hash": self.leaf_hash.hex(),
            "proof": [h.hex() for h in self.proof],
            "checkpoint": self.checkpoint,
        }


class _Generations:
    """A bounded read-through map in two generations.

    New entries (loads, writes) go to the young generation; when that holds
    ``half`` entries it becomes the old one and the previous old one is dropped.
    A hit in the old generation moves the entry back to the young one, so what is
    read again and again survives a turnover. Lookups try the young generation
    first, and every write goes there, so the newest value wins.
    """

    __slots__ = ("half", "old", "young")

    def __init__(self, half: int) -> None:
        self.half = max(1, half)
        self.young: dict[bytes, bytes | None] = {}
        self.old: dict[bytes, bytes | None] = {}

    def __len__(self) -> int:
        """Entries in the young generation (the old one is at most ``half`` more)."""
        return len(self.young)

    def get(self, key: bytes, load: Callable[[bytes], bytes | None]) -> bytes | None:
        try:
            return self.young[key]
        except KeyError:
            pass
        old = self.old
        value = old[key] if key in old else load(key)
        self._turn_if_full()
        self.young[key] = value
        return value

    def update(self, changes: Mapping[bytes, bytes | None]) -> None:
        self.young.update(changes)
        self._turn_if_full()

    def _turn_if_full(self) -> None:
        if len(self.young) >= self.half:
            self.old, self.young = self.young, {}


class _ReadCache:
    """Read-through cache of committed state rows and state-tree nodes.

    The node's storage thread is the only writer, so the cache is updated with a
    block's changes right after that block commits, and is never stale. It is
    bounded, each table in two :class:`_Generations` of ``limit / 2`` entries, so
    what is read again and again (signers' keys, sequence numbers, the upper
    levels of the state tree) survives a turnover instead of being re-read from
    the store after a clear-all.

    ``top`` holds the internal nodes of the top of the state tree, which the store
    does not (:func:`medledger.state.smt.split_top`): all of them, derived from the
    store when the ledger is opened (:meth:`Node._load_head`), then kept up to date
    by :meth:`committed`.
    """

    def __init__(self, store: LedgerStore, limit: int = 500_000) -> None:
        self.store = store
        self.rows = _Generations(limit // 2)
        self.nodes = _Generations(limit // 2)
        self.top: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.rows.get(key, self.store.get)

    def scan(
        self, prefix: bytes, *, start: bytes | None = None, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        return self.store.scan(prefix, start=start, limit=limit)

    def get_node(self, node_key: bytes) -> bytes | None:
        if node_key[0] < TOP_DEPTH:
            got = self.top.get(node_key)
            if got is not None:
                return got
        return self.nodes.get(node_key, self.store.get_node)

    def has_tx(self, tx_id: bytes) -> bool:
        return self.store.has_tx(tx_id)

    def known_txs(self, tx_ids: Sequence[bytes]) -> set[bytes]:
        return self.store.known_txs(tx_ids)

    def committed(
        self, rows: Mapping[bytes, bytes | None], nodes: Mapping[bytes, bytes | None]
    ) -> None:
        """Take in a committed block's state rows and (all of its) state-tree writes."""
        self.rows.update(rows)
        stored, changes = split_top(nodes, self.top)
        apply_writes(self.top, changes)
        self.nodes.update(stored)


class _PendingView:
    """The committed state (``cache``) plus blocks derived but not yet committed.

    While a group of consecutive blocks is derived for one store transaction,
    block N+1 is built on N's post-state: state rows, state-tree nodes and
    transaction ids of the earlier blocks of the group are read from here. Nothing
    reaches the cache until the group's commit has returned.
    """

    def __init__(self, cache: _ReadCache, asked: Sequence[bytes] = ()) -> None:
        self.cache = cache
        self.state = Overlay(cache)
        self.nodes: dict[bytes, bytes | None] = {}
        self.tx_ids: set[bytes] = set()
        # the log ids among ``asked`` (every transaction of the group): one store
        # lookup for the group instead of one per block
        self.asked = set(asked)
        self.on_ledger = cache.known_txs(list(self.asked)) if self.asked else set()

    def get(self, key: bytes) -> bytes | None:
        return self.state.get(key)

    def scan(
        self, prefix: bytes, *, start: bytes | None = None, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        return self.state.scan(prefix, start=start, limit=limit)

    def get_node(self, node_key: bytes) -> bytes | None:
        nodes = self.nodes
        if node_key in nodes:
            return nodes[node_key]
        return self.cache.get_node(node_key)

    def has_tx(self, tx_id: bytes) -> bool:
        return tx_id in self.tx_ids or self.cache.has_tx(tx_id)

    def known_txs(self, tx_ids: Sequence[bytes]) -> set[bytes]:
        mine, asked, on_ledger = self.tx_ids, self.asked, self.on_ledger
        found = {t for t in tx_ids if t in mine or t in on_ledger}
        rest = [t for t in tx_ids if t not in asked and t not in mine]
        return found | (self.cache.known_txs(rest) if rest else set())

    def add(self, result: BlockResult) -> None:
        for key, value in result.state_changes.items():
            if value is None:
                self.state.delete(key)
            else:
                self.state.put(key, value)
        self.nodes.update(result.smt_writes)
        self.tx_ids.update(tx.tx_id for tx in result.txs)


@dataclass(slots=True)
class BlockSpec:
    """One block to derive in :meth:`Node.commit_group` (the arguments of commit_batch)."""

    txs: Sequence[Transaction]
    signatures: Sequence[bool] | None = None
    block_time: int | None = None
    proposer: bytes | None = None
    #: ``precheck(state, head)``: raising one of ``commit_group``'s ``refusals`` refuses
    #: this block alone (the others go on); any other exception aborts the group
    precheck: Callable[[StateReader, BlockHeader], None] | None = None


class _Head:
    """In-memory view of the last committed block, updated only after a commit."""

    def __init__(self, header: BlockHeader, compact: CompactRange) -> None:
        self.header = header
        self.compact = compact


#: the storage thread's name for the operating system (``top -H``, ``/proc``), which
#: Python 3.11 does not set from ``thread_name_prefix``; at most 15 bytes
STORAGE_THREAD = "ml-store"


def _name_os_thread(name: str) -> None:
    """Name the calling thread for the operating system (Linux; elsewhere a no-op)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name)
    except OSError:
        pass


def _storage_executor() -> ThreadPoolExecutor:
    """The node's one storage thread (every store call runs there, in order)."""
    return ThreadPoolExecutor(
        max_workers=1,
        thread_name_prefix="medledger-store",
        initializer=_name_os_thread,
        initargs=(STORAGE_THREAD,),
    )


class Node:
    """One organisation's ledger node (or, embedded, every organisation's)."""

    def __init__(
        self,
        store: LedgerStore,
        genesis: Mapping[str, Any],
        signers: Sequence[tuple[str, SigningKey]],
        executor: ThreadPoolExecutor,
    ) -> None:
        self.store = store
        self.genesis = genesis
        self.network: str = genesis["network"]
        self.origin = checkpoint_origin(self.network)
        self.config: dict[str, Any] = decode(store.get(b"cfg/network") or encode({}))
        self.registry: Registry = make_registry(self.config)
        self.signers = list(signers)
        self.proposer: SigningKey | None = self.signers[0][1] if self.signers else None
        self.note_signers = [NoteSigner(signer_name(self.network, org), k) for org, k in signers]
        self._io = executor
        self._cache = _ReadCache(store)
        self._head: _Head | None = None
        self._orderer: Any = None
        self._halted: str | None = None
        self.clock: Callable[[], int] = lambda: int(_time.time() * 1000)

    # -- construction ------------------------------------------------------------------
    @classmethod
    async def create(
        cls,
        store_url: str,
        genesis_doc: Mapping[str, Any],
        signers: Sequence[tuple[str, SigningKey]],
    ) -> Node:
        """Create a new ledger from a genesis document, writing block 0."""
        genesis = normalise_genesis(genesis_doc)
        io = _storage_executor()
        loop = asyncio.get_running_loop()

        def _create() -> LedgerStore:
            store = open_store(store_url)
            if store.head_height() is not None:
                store.close()
                raise StorageError(f"{store_url} already holds a ledger")
            fx = genesis_effects(genesis)
            changes = dict(fx.writes)
            upd = SparseMerkleTree(store).update(changes)
            ghash = hashlib.sha256(encode(genesis)).digest()
            header = genesis_header(
                genesis["network"], ghash, upd.root, genesis["time"], EMPTY_ROOT
            )
            store.set_meta("genesis", encode(genesis))
            store.commit_block(
                BlockRecord(0, header.to_bytes(), signers[0][1].sign(header.hash)),
                [],
                [],
                changes,
                split_top(upd.node_writes, {})[0],
            )
            return store

        store = await loop.run_in_executor(io, _create)
        node = cls(store, genesis, signers, io)
        await node._load_head()
        return node

    @classmethod
    async def open(cls, store_url: str, signers: Sequence[tuple[str, SigningKey]]) -> Node:
        """Open an existing ledger."""
        io = _storage_executor()
        loop = asyncio.get_running_loop()

        def _open() -> tuple[LedgerStore, dict[str, Any]]:
            store = open_store(store_url)
            raw = store.get_meta("genesis")
            if raw is None or store.head_height() is None:
                store.close()
                raise StorageError(f"{store_url} holds no ledger (run `medledger init` first)")
            return store, decode(raw)

        store, genesis = await loop.run_in_executor(io, _open)
        node = cls(store, genesis, signers, io)
        await node._load_head()
        return node

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn)

    async def _load_head(self) -> None:
        def _load() -> _Head:
            height = self.store.head_height()
            assert height is not None
            rec = self.store.get_block(height)
            assert rec is not None
            header = BlockHeader.from_bytes(rec.header)
            compact = CompactRange.from_hashes(
                header.log_size, self.store.get_tree_nodes(border_ids(header.log_size))
            )
            if compact.root() != header.log_root:
                raise IntegrityError(
                    f"stored tree nodes do not match the log root of block {height}"
                )
            # the top of the state tree is not stored: derive it from the nodes below
            self._cache.top = rebuild_top(self.store.iter_nodes(b"", bytes([TOP_DEPTH + 1])))
            if SparseMerkleTree(self._cache).root() != header.state_root:
                raise IntegrityError(
                    f"stored state tree nodes do not match the state root of block {height}"
                )
            return _Head(header, compact)

        self._head = await self._run(_load)

    @property
    def head(self) -> BlockHeader:
        assert self._head is not None
        return self._head.header

    # -- ordering and commit -----------------------------------------------------------
    @property
    def orderer(self) -> Any:
        """The running orderer (None before :meth:`start`)."""
        return self._orderer

    async def start(
        self,
        orderer_url: str | None = None,
        *,
        max_batch: int = 2000,
        max_wait: float = 0.005,
        verify_workers: int = 1,
        **orderer_options: Any,
    ) -> None:
        """Start ordering: the embedded orderer (default) or the one ``orderer_url`` names.

        ``orderer_url`` is ``embedded`` / None, or ``etcd://host:port,host:port,...``
        (see :func:`medledger.orderer.make_orderer`; extra options are passed on).
        """
        from medledger.orderer import make_orderer

        if self.proposer is None:
            raise RuntimeError("this node was opened read-only (no node key)")
        if self._orderer is None:
            orderer = make_orderer(
                orderer_url,
                self,
                max_batch=max_batch,
                max_wait=max_wait,
                verify_workers=verify_workers,
                **orderer_options,
            )
            await orderer.start()
            self._orderer = orderer

    async def stop_orderer(self) -> None:
        """Stop ordering (pending submits fail with OrdererError); :meth:`start` may follow.

        E.g. after the etcd orderer raised ``CatchUpRequired``: stop it, append the
        missing blocks (:meth:`append_block`), record the etcd position, start again.
        """
        if self._orderer is not None:
            orderer, self._orderer = self._orderer, None
            await orderer.stop()

    def halt_writes(self, reason: str | None) -> None:
        """Refuse new submissions with ``OrdererError(reason)`` (None: accept them again).

        Blocks ordered by others are still applied; only this node's writes stop
        (e.g. when its state diverged from the consortium's).
        """
        self._halted = reason

    @property
    def halted(self) -> str | None:
        """Why writes are halted, or None."""
        return self._halted

    async def close(self) -> None:
        await self.stop_orderer()
        await self._run(self.store.close)
        self._io.shutdown(wait=True)

    async def submit(self, tx: Transaction | bytes) -> Receipt:
        """Submit a transaction; return once it is committed in a durable block.

        Raises a :class:`TransactionRejected` subclass if it is refused.
        """
        if isinstance(tx, (bytes, bytearray)):
            tx = Transaction.from_bytes(bytes(tx))
        if self._halted is not None:
            raise OrdererError(self._halted)
        if self._orderer is None:
            raise RuntimeError("node not started")
        receipt: Receipt = await self._orderer.submit(tx)
        return receipt

    def enqueue(self, tx: Transaction) -> asyncio.Future[Receipt]:
        """Queue a transaction in submission order; await the future for its receipt."""
        if self._halted is not None:
            raise OrdererError(self._halted)
        if self._orderer is None:
            raise RuntimeError("node not started")
        fut: asyncio.Future[Receipt] = self._orderer.enqueue(tx)
        return fut

    async def commit_batch(
        self,
        txs: Sequence[Transaction],
        signatures: Sequence[bool] | None = None,
        *,
        block_time: int | None = None,
        proposer: bytes | None = None,
    ) -> list[Receipt | TransactionRejected]:
        """Build, sign and durably commit one block from ``txs`` (orderer callback).

        ``signatures``, when given, holds the already checked validity of each
        transaction's signature (see :func:`medledger.ledger.tx.check_signed`).

        An orderer that decides blocks outside this node (etcd) passes the block
        time and the proposer's key id taken from the ordered proposal, so every
        node derives the same header; by default they are this node's clock and
        key. When every transaction is rejected, no block is written. (The etcd
        orderer commits through :meth:`commit_group`.)
        """
        bt = self.clock() if block_time is None else block_time
        return await self._run(lambda: self._commit_sync(txs, bt, signatures, proposer))

    async def commit_group(
        self,
        specs: Sequence[BlockSpec],
        *,
        refusals: tuple[type[Exception], ...] = (),
        meta: Callable[[int], Mapping[str, bytes]] | None = None,
    ) -> list[list[Receipt | TransactionRejected] | Exception]:
        """Derive consecutive blocks, one per spec, and commit them in ONE store transaction.

        Group commit: each block is built exactly as :meth:`commit_batch` would build
        it on the state the previous ones leave (the blocks and their headers are
        the same as when committed one by one); only the durability is batched: one
        store commit for the group, and nothing is reported (or visible to readers)
        before it has returned. A spec whose ``precheck`` raises one of
        ``refusals`` gets that exception and makes no block; one whose transactions
        are all rejected makes no block. ``meta(head_height)`` gives the metadata
        written with the group (the head after it), also when it makes no block.
        """
        now = self.clock()

        def _commit() -> list[list[Receipt | TransactionRejected] | Exception]:
            head = self._head
            assert head is not None
            view = _PendingView(self._cache, [tx.tx_id for spec in specs for tx in spec.txs])
            reader: ChainReader = view
            header, compact = head.header, head.compact
            out: list[list[Receipt | TransactionRejected] | Exception] = []
            results: list[BlockResult] = []
            for spec in specs:
                if spec.precheck is not None:
                    try:
                        spec.precheck(reader, header)
                    except refusals as exc:
                        out.append(exc)
                        continue
                next_compact = compact.copy()
                bt = now if spec.block_time is None else spec.block_time
                result, receipts = self._derive(
                    reader, header, next_compact, spec.txs, bt, spec.signatures, spec.proposer
                )
                out.append(receipts)
                if result is None:
                    continue
                results.append(result)
                view.add(result)
                header, compact = result.header, next_compact
            extra = meta(header.height) if meta is not None else None
            if results:
                self.store.commit_blocks([self._block_write(r) for r in results], extra)
                for r in results:
                    self._cache.committed(r.state_changes, r.smt_writes)
                head.header, head.compact = header, compact
            elif extra:
                for k, v in extra.items():
                    self.store.set_meta(k, v)
            return out

        return await self._run(_commit)

    async def append_block(
        self,
        header: bytes,
        sig: bytes | None,
        txs: Sequence[Transaction],
        *,
        before_write: Callable[[LedgerStore, int], None] | None = None,
    ) -> BlockHeader:
        """Re-derive another node's block on this node's state; commit it if identical.

        For catch-up from peers' blocks. The block is rebuilt from the committed
        state with the block's own transactions, time and proposer (every signature
        checked); every transaction must be accepted and the derived header must
        equal ``header`` byte for byte, else :class:`IntegrityError` and nothing is
        committed. It is stored signed by this node's key, like every block a node
        derives (``sig``, the peer's signature, is kept only by a node without a
        key), with this node's signed checkpoint. ``before_write`` as in
        :meth:`commit_batch`. Stop the orderer first (:meth:`stop_orderer`).
        """

        def _append() -> BlockHeader:
            head = self._head
            assert head is not None
            want = BlockHeader.from_bytes(header)
            if want.height != head.header.height + 1 or want.prev != head.header.hash:
                raise IntegrityError(
                    f"block {want.height} does not follow this node's head {head.header.height}"
                )
            compact = head.compact.copy()
            result = build_block(
                self._cache,
                head.header,
                compact,
                list(txs),
                block_time=want.time,
                proposer=want.proposer,
                registry=self.registry,
                config=self.config,
            )
            if result.rejected:
                bad = result.rejected[0]
                raise IntegrityError(
                    f"block {want.height}: transaction {bad.tx.tx_id.hex()} is rejected on "
                    f"re-application ({bad.error.code}: {bad.error})"
                )
            if result.header.to_bytes() != header:
                diff = [k for k, v in result.header.to_map().items() if want.to_map().get(k) != v]
                raise IntegrityError(
                    f"block {want.height}: re-derived header differs in {', '.join(diff)}"
                )
            if before_write is not None:
                before_write(self.store, want.height)
            self._write_block(result, sig=sig if self.proposer is None else None)
            head.header, head.compact = result.header, compact
            return result.header

        return await self._run(_append)

    async def storage(self, fn: Callable[[LedgerStore], T]) -> T:
        """Run ``fn(store)`` on the storage thread (orderer bookkeeping, e.g. metadata)."""
        return await self._run(lambda: fn(self.store))

    def _commit_sync(
        self,
        txs: Sequence[Transaction],
        block_time: int,
        signatures: Sequence[bool] | None = None,
        proposer: bytes | None = None,
    ) -> list[Receipt | TransactionRejected]:
        head = self._head
        assert head is not None
        compact = head.compact.copy()
        result, out = self._derive(
            self._cache, head.header, compact, txs, block_time, signatures, proposer
        )
        if result is None:
            return out
        self._write_block(result)
        head.header, head.compact = result.header, compact
        return out

    def _derive(
        self,
        reader: ChainReader,
        prev: BlockHeader,
        compact: CompactRange,
        txs: Sequence[Transaction],
        block_time: int,
        signatures: Sequence[bool] | None,
        proposer: bytes | None,
    ) -> tuple[BlockResult | None, list[Receipt | TransactionRejected]]:
        """Build the block of ``txs`` on ``reader`` (``compact`` advanced in place).

        Returns the block (None if every transaction is rejected) and each
        transaction's receipt or rejection, in input order.
        """
        assert self.proposer is not None
        # keyed by position, not id(tx): the same object may be submitted twice in a batch
        rejected: dict[int, TransactionRejected] = {}
        candidates: list[Transaction] = list(txs)
        positions = list(range(len(txs)))
        if signatures is not None:
            candidates, positions = [], []
            for i, (tx, ok) in enumerate(zip(txs, signatures, strict=True)):
                if ok:
                    candidates.append(tx)
                    positions.append(i)
                else:
                    rejected[i] = BadTransactionSignature(
                        f"signature of transaction {tx.tx_id.hex()} does not verify"
                    )
        result = build_block(
            reader,
            prev,
            compact,
            candidates,
            block_time=block_time,
            proposer=self.proposer.key_id if proposer is None else proposer,
            registry=self.registry,
            config=self.config,
            signatures_checked=signatures is not None,
        )
        rejected.update({positions[r.position]: r.error for r in result.rejected})
        if not result.txs:
            return None, [rejected[i] for i in range(len(txs))]
        out: list[Receipt | TransactionRejected] = []
        index = result.header.first
        for i, tx in enumerate(txs):
            if i in rejected:
                out.append(rejected[i])
            else:
                out.append(Receipt(tx.tx_id, index, result.header.height))
                index += 1
        return result, out

    def _block_write(self, result: BlockResult, sig: bytes | None = None) -> BlockWrite:
        # Every node signs the headers it stores with its own key, also when another
        # node proposed the block (etcd ordering): the header (with its proposer key id)
        # is identical everywhere; verify accepts any member node key's signature.
        header = result.header
        if sig is None:
            assert self.proposer is not None
            sig = header.sign(self.proposer)
        records = [
            TxRecord(header.first + i, tx.tx_id, header.height, tx.raw, rc)
            for i, (tx, rc) in enumerate(zip(result.txs, result.receipts, strict=True))
        ]
        return BlockWrite(
            BlockRecord(header.height, header.to_bytes(), sig),
            records,
            result.tree_nodes,
            result.state_changes,
            # not the top of the state tree (rebuilt when the ledger is opened); in a
            # group, a later block may delete a position an earlier one already did
            split_top(result.smt_writes, self._cache.top)[0],
            self._sign_checkpoint(header),
            result.smt_created,
        )

    def _write_block(self, result: BlockResult, sig: bytes | None = None) -> None:
        self.store.commit_blocks([self._block_write(result, sig)])
        self._cache.committed(result.state_changes, result.smt_writes)

    def _sign_checkpoint(self, header: BlockHeader) -> str:
        cp = Checkpoint.for_block(
            self.origin,
            header.log_size,
            header.log_root,
            BlockRef(header.height, header.hash, header.state_root),
        )
        return sign_checkpoint(cp, self.note_signers)

    # -- queries -------------------------------------------------------------------------
    async def checkpoint(self) -> str:
        """The latest signed checkpoint note (signing one for genesis if none yet)."""

        def _get() -> str:
            got = self.store.get_checkpoint()
            if got is not None:
                return got[1]
            return self._sign_checkpoint(self.head)

        return await self._run(_get)

    def verifier_keys(self) -> list[str]:
        return [s.verifier_key() for s in self.note_signers]

    async def get_tx(self, tx_id: bytes) -> TxRecord:
        rec = await self._run(lambda: self.store.get_tx(tx_id))
        if rec is None:
            raise NotFoundError(f"transaction {tx_id.hex()} is not on the ledger")
        return rec

    async def list_txs(self, start: int = 0, limit: int = 100) -> list[TxRecord]:
        return await self._run(lambda: list(self.store.iter_txs(start, start + limit)))

    async def get_block(self, height: int) -> tuple[BlockHeader, bytes]:
        rec = await self._run(lambda: self.store.get_block(height))
        if rec is None:
            raise NotFoundError(f"block {height} does not exist")
        return BlockHeader.from_bytes(rec.header), rec.sig

    async def read(self, fn: Callable[[StateReader], T]) -> T:
        """Run a pure read ``fn(committed_state)`` on the storage thread (a consistent view)."""
        return await self._run(lambda: fn(self._cache))

    async def state_get(self, key: bytes) -> bytes | None:
        return await self._run(lambda: self.store.get(key))

    async def state_scan(
        self, prefix: bytes, limit: int | None = None
    ) -> list[tuple[bytes, bytes]]:
        return await self._run(lambda: list(self.store.scan(prefix, limit=limit)))

    async def inclusion_proof(self, tx_id: bytes, height: int | None = None) -> InclusionProof:
        """Inclusion proof of a transaction against the latest signed checkpoint, or against
        the checkpoint of block ``height`` (e.g. one its client holds co-signed by a majority).

        Raises :class:`NotFoundError` for an unknown transaction or height, and
        :class:`ProofError` when the transaction is not yet in the log at ``height``.
        """

        def _prove() -> InclusionProof:
            rec = self.store.get_tx(tx_id)
            if rec is None:
                raise NotFoundError(f"transaction {tx_id.hex()} is not on the ledger")
            got = self.store.get_checkpoint(height)
            if got is None:
                raise NotFoundError(f"no checkpoint at height {height}")
            note = got[1]
            size = checkpoint_of(note).size
            if rec.index >= size:
                raise ProofError(
                    f"transaction {tx_id.hex()} is entry {rec.index}, not in the log of "
                    f"{size} entries at height {got[0]}"
                )
            nodes = inclusion_nodes(rec.index, size)
            proof = nodes.rehash(self.store.get_tree_nodes(nodes.ids))
            return InclusionProof(rec.index, size, leaf_hash(rec.raw), proof, note)

        return await self._run(_prove)

    async def consistency_proof(self, size1: int, size2: int) -> tuple[bytes, bytes, list[bytes]]:
        """(root1, root2, proof) for log sizes ``size1 <= size2`` (both committed)."""

        def _prove() -> tuple[bytes, bytes, list[bytes]]:
            if size2 > self.head.log_size:
                raise NotFoundError(f"the log has only {self.head.log_size} entries")
            nodes = consistency_nodes(size1, size2)
            proof = nodes.rehash(self.store.get_tree_nodes(nodes.ids))
            return self._root_at(size1), self._root_at(size2), proof

        return await self._run(_prove)

    def _root_at(self, size: int) -> bytes:
        return root_from_border(self.store.get_tree_nodes(border_ids(size)))

    async def root_at(self, size: int) -> bytes:
        return await self._run(lambda: self._root_at(size))
