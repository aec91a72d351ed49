"""The ledger store interface.

One small interface, several backends (SQLite now, PostgreSQL later), chosen by
URL in :func:`medledger.store.open_store`. A store keeps, for one node:

* the genesis document and node metadata,
* blocks (header bytes, proposer signature) and their transactions (log order),
* the RFC 9162 tree's perfect-subtree nodes (for O(log n) proofs at any size),
* world state rows and the sparse Merkle tree nodes over them,
* signed checkpoint notes.

Methods are synchronous and are called only from the node's single storage
thread (:class:`medledger.node.Node` exposes the async API). A block commits
atomically and durably in :meth:`LedgerStore.commit_block`: after it returns,
a crash at any moment loses nothing of that block. Backends translate their
native errors into :class:`medledger.errors.StorageError`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["BlockRecord", "BlockWrite", "LedgerStore", "TxRecord"]


@dataclass(frozen=True, slots=True)
class BlockRecord:
    height: int
    header: bytes
    sig: bytes


@dataclass(frozen=True, slots=True)
class TxRecord:
    index: int
    tx_id: bytes
    height: int
    raw: bytes
    receipt: bytes


@dataclass(frozen=True, slots=True)
class BlockWrite:
    """Everything one block writes (the arguments of :meth:`LedgerStore.commit_block`)."""

    block: BlockRecord
    txs: Sequence[TxRecord]
    tree_nodes: Sequence[tuple[tuple[int, int], bytes]]
    state_changes: dict[bytes, bytes | None]
    smt_writes: dict[bytes, bytes | None]
    checkpoint: str | None = None
    #: keys of ``smt_writes`` where no node was stored before this block (a store may
    #: insert them without looking for a row to replace; empty: look for every key)
    smt_new: frozenset[bytes] = frozenset()


class LedgerStore(Protocol):
    url: str

    # -- metadata -------------------------------------------------------------------
    def get_meta(self, key: str) -> bytes | None: ...
    def set_meta(self, key: str, value: bytes) -> None: ...

    # -- state (StateReader) and sparse Merkle nodes (NodeStore) --------------------
    def get(self, key: bytes) -> bytes | None: ...
    def scan(
        self, prefix: bytes, *, start: bytes | None = None, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]: ...
    def get_node(self, node_key: bytes) -> bytes | None: ...
    def iter_state(self) -> Iterator[tuple[bytes, bytes]]: ...
    def iter_nodes(
        self, start: bytes = b"", end: bytes | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """Stored nodes with ``start <= node key < end`` (no ``end``: to the last), in key
        order."""
        ...

    # -- log ------------------------------------------------------------------------
    def has_tx(self, tx_id: bytes) -> bool: ...
    def known_txs(self, tx_ids: Sequence[bytes]) -> set[bytes]:
        """The ids among ``tx_ids`` that are in the log (one lookup for many)."""
        ...

    def get_tx(self, tx_id: bytes) -> TxRecord | None: ...
    def get_tx_at(self, index: int) -> TxRecord | None: ...
    def iter_txs(self, start: int = 0, end: int | None = None) -> Iterator[TxRecord]: ...
    def get_tree_nodes(self, ids: Sequence[tuple[int, int]]) -> list[bytes]: ...
    def iter_tree_nodes(self) -> Iterator[tuple[int, int, bytes]]: ...

    # -- blocks and checkpoints -----------------------------------------------------
    def head_height(self) -> int | None: ...
    def get_block(self, height: int) -> BlockRecord | None: ...
    def iter_blocks(self, start: int = 0) -> Iterator[BlockRecord]: ...
    def get_checkpoint(self, height: int | None = None) -> tuple[int, str] | None: ...
    def put_checkpoint(self, height: int, note: str) -> None: ...
    def iter_checkpoints(self) -> Iterator[tuple[int, str]]: ...

    # -- atomic commit ----------------------------------------------------------------
    def commit_block(
        self,
        block: BlockRecord,
        txs: Sequence[TxRecord],
        tree_nodes: Sequence[tuple[tuple[int, int], bytes]],
        state_changes: dict[bytes, bytes | None],
        smt_writes: dict[bytes, bytes | None],
        checkpoint: str | None = None,
        meta: Mapping[str, bytes] | None = None,
    ) -> None:
        """Write one block and everything it changes, atomically and durably.

        ``meta`` entries (as :meth:`set_meta`) are written in the same transaction,
        e.g. the orderer's position for this block.
        """
        ...

    def commit_blocks(
        self, blocks: Sequence[BlockWrite], meta: Mapping[str, bytes] | None = None
    ) -> None:
        """Write consecutive blocks in ONE transaction, atomically and durably (group commit).

        The same rows as one :meth:`commit_block` per block, in order (a later
        block's writes replace an earlier one's), with a single durable commit:
        after it returns every block is in; after a crash either all of them are
        or none is. ``meta`` is written in the same transaction.
        """
        ...

    def close(self) -> None: ...
