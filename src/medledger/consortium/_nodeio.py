"""Store reads and writes of a :class:`~medledger.node.Node` the consortium needs.

They run on the node's storage thread through :meth:`Node.storage`, like every
store access.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from medledger.consortium.client import BlockBundle
from medledger.ledger.block import BlockHeader
from medledger.ledger.tx import Transaction
from medledger.node import Node
from medledger.store import LedgerStore

__all__ = [
    "append_block",
    "block_bundles",
    "blocks_and_position",
    "put_checkpoint",
    "stop_orderer",
    "stored_checkpoint",
]


async def stored_checkpoint(node: Node, height: int) -> str | None:
    """The signed checkpoint note stored for block ``height``, if any."""

    def _get(store: LedgerStore) -> str | None:
        got = store.get_checkpoint(height)
        return None if got is None else got[1]

    return await node.storage(_get)


async def put_checkpoint(node: Node, height: int, note: str) -> None:
    """Replace the stored checkpoint note of block ``height`` (e.g. with co-signatures)."""
    await node.storage(lambda store: store.put_checkpoint(height, note))


async def block_bundles(
    node: Node, start: int, limit: int, max_bytes: int = 8 << 20
) -> list[BlockBundle]:
    """Stored blocks ``start..`` with their transactions, at most ``limit`` / ~``max_bytes``."""
    return (await blocks_and_position(node, start, limit, max_bytes))[0]


async def blocks_and_position(
    node: Node, start: int, limit: int, max_bytes: int = 8 << 20
) -> tuple[list[BlockBundle], tuple[int, int] | None]:
    """Stored blocks ``start..`` and, read at the same moment, the node's ordering position.

    The position is the etcd orderer's ``(head height, revision)`` record (None
    for a ledger not ordered by etcd): a node that catches up to that height
    records the same position, so its own orderer resumes after that revision.
    """
    from medledger.orderer.etcd import read_position

    def _read(store: LedgerStore) -> tuple[list[BlockBundle], tuple[int, int] | None]:
        out: list[BlockBundle] = []
        size = 0
        height = start
        while len(out) < limit:
            rec = store.get_block(height)
            if rec is None:
                break
            hdr = BlockHeader.from_bytes(rec.header)
            txs = tuple(t.raw for t in store.iter_txs(hdr.first, hdr.first + hdr.count))
            out.append(BlockBundle(height, rec.header, rec.sig, txs))
            size += len(rec.header) + sum(len(t) for t in txs)
            height += 1
            if size >= max_bytes:
                break
        return out, read_position(store)

    return await node.storage(_read)


async def append_block(
    node: Node,
    header: bytes,
    sig: bytes,
    txs: Sequence[Transaction],
    *,
    before_write: Callable[[LedgerStore, int], None] | None = None,
) -> BlockHeader:
    """Re-derive a peer's block on this node's committed state and commit it if identical.

    See :meth:`Node.append_block`: every transaction re-applied (signatures
    checked), the derived header byte-identical to ``header``, else
    :class:`~medledger.errors.IntegrityError` and nothing committed.
    """
    return await node.append_block(header, sig, txs, before_write=before_write)


async def stop_orderer(node: Node) -> None:
    """Stop the node's orderer so that ``node.start`` can start a fresh one."""
    await node.stop_orderer()
