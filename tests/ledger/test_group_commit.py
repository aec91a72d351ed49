"""Group commit (:meth:`Node.commit_group`): consecutive blocks in one store transaction.

The blocks are those :meth:`Node.commit_batch` derives one at a time (every stored
byte identical), each built on the state the group's earlier blocks leave
(sequence numbers, replays across blocks); a precheck refusal drops one block
only; a failed store commit leaves the node exactly as before the group (nothing
reported, nothing cached), so the same transactions commit afterwards.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from medledger.errors import (
    OutOfOrderSequence,
    ReplayedTransaction,
    StorageError,
    UnknownTransactionType,
)
from medledger.ledger.block import BlockHeader
from medledger.ledger.tx import Transaction
from medledger.ledger.verify import verify_ledger
from medledger.node import STORAGE_THREAD, BlockSpec, Node, Receipt
from medledger.state.base import StateReader

from .conftest import BLOCK_TIME, Keys, TxFactory, new_node


async def everything(node: Node) -> dict[str, Any]:
    def _snap() -> dict[str, Any]:
        st = node.store
        return {
            "blocks": list(st.iter_blocks()),
            "txs": list(st.iter_txs()),
            "state": list(st.iter_state()),
            "smt": list(st.iter_nodes()),
            "tree": list(st.iter_tree_nodes()),
            "checkpoints": list(st.iter_checkpoints()),
        }

    return await node._run(_snap)


def batches(anchors: TxFactory) -> list[list[Transaction]]:
    a1, a2, a3, a4, a5 = (anchors.anchor() for _ in range(5))
    return [
        [a1, a2],
        [a1, a3, anchors.tx("no.such.type", {}, seq=9)],  # a1 replayed from the block before
        [anchors.anchor(seq=99)],  # every transaction rejected: no block
        [a4, a5, a4],
    ]


def norm(results: list[Any]) -> list[Any]:
    """Receipts as they are, rejections as (type, message): exceptions compare by identity."""
    return [
        [r if isinstance(r, Receipt) else (type(r), str(r)) for r in rs]
        if isinstance(rs, list)
        else (type(rs), str(rs))
        for rs in results
    ]


class Refused(Exception):
    pass


async def test_a_group_stores_the_blocks_committed_one_by_one(
    tmp_path: Path, genesis: dict[str, Any], keys: Keys
) -> None:
    one = await new_node(tmp_path / "one.db", genesis, keys)
    grp = await new_node(tmp_path / "grp.db", genesis, keys)
    try:
        txs = batches(TxFactory(keys.admin))
        singles = [await one.commit_batch(b, block_time=BLOCK_TIME + i) for i, b in enumerate(txs)]
        specs = [BlockSpec(b, block_time=BLOCK_TIME + i) for i, b in enumerate(txs)]
        got = await grp.commit_group(specs, meta=lambda h: {"pos": b"%d" % h})
        assert norm(got) == norm(singles)
        assert [type(r) for r in got[1]] == [
            ReplayedTransaction,
            Receipt,
            UnknownTransactionType,
        ]
        assert all(isinstance(r, OutOfOrderSequence) for r in got[2])  # type: ignore[union-attr]
        assert isinstance(got[3][2], ReplayedTransaction)  # type: ignore[index]
        assert await everything(grp) == await everything(one)
        assert grp.head == one.head and grp.head.height == 3
        assert await grp.storage(lambda s: s.get_meta("pos")) == b"3"
        report = await grp._run(lambda: verify_ledger(grp.store))
        assert report.ok, report.failure
        # and the node goes on from the group's head
        more = TxFactory(keys.admin, start_seq=5).anchor()
        assert norm([await grp.commit_batch([more])]) == norm([await one.commit_batch([more])])
    finally:
        await one.close()
        await grp.close()


async def test_a_refused_precheck_drops_that_block_only(node: Node, anchors: TxFactory) -> None:
    seen: list[int] = []

    def refuse(state: StateReader, head: BlockHeader) -> None:
        seen.append(head.height)
        raise Refused("no")

    def accept(state: StateReader, head: BlockHeader) -> None:
        seen.append(head.height)

    a1, a2, a3 = anchors.anchor(), anchors.anchor(), anchors.anchor()
    got = await node.commit_group(
        [
            BlockSpec([a1], precheck=accept),
            BlockSpec([a2], precheck=refuse),
            BlockSpec([a2, a3], precheck=accept),
        ],
        refusals=(Refused,),
    )
    assert seen == [0, 1, 1]  # each precheck sees the head the group has reached
    assert isinstance(got[1], Refused)
    assert got[0] == [Receipt(a1.tx_id, 0, 1)]
    assert got[2] == [Receipt(a2.tx_id, 1, 2), Receipt(a3.tx_id, 2, 2)]
    assert node.head.height == 2

    def boom(state: StateReader, head: BlockHeader) -> None:
        raise ValueError("not a refusal")

    before = await everything(node)
    with pytest.raises(ValueError):
        await node.commit_group(
            [BlockSpec([anchors.anchor()]), BlockSpec([anchors.anchor()], precheck=boom)],
            refusals=(Refused,),
        )
    assert await everything(node) == before and node.head.height == 2


async def test_a_group_that_makes_no_block_writes_its_meta(node: Node, anchors: TxFactory) -> None:
    got = await node.commit_group(
        [BlockSpec([anchors.anchor(seq=7)])], meta=lambda h: {"pos": b"at %d" % h}
    )
    assert isinstance(got[0][0], OutOfOrderSequence)  # type: ignore[index]
    assert node.head.height == 0
    assert await node.storage(lambda s: s.get_meta("pos")) == b"at 0"


async def test_a_failed_group_commit_changes_nothing(
    node: Node, anchors: TxFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    txs = [[anchors.anchor(), anchors.anchor()], [anchors.anchor()]]
    before = await everything(node)
    head = node.head

    def fail(*args: Any, **kwargs: Any) -> None:
        raise StorageError("disk on fire")

    monkeypatch.setattr(node.store, "commit_blocks", fail)
    with pytest.raises(StorageError):
        await node.commit_group([BlockSpec(b) for b in txs])
    monkeypatch.undo()
    assert node.head == head
    assert await everything(node) == before
    # nothing of the failed group was cached: the same transactions commit now
    got = await node.commit_group([BlockSpec(b) for b in txs])
    assert [[type(r) for r in rs] for rs in got] == [[Receipt, Receipt], [Receipt]]  # type: ignore[union-attr]
    assert node.head.height == 2


async def test_the_storage_thread_is_named_for_the_operating_system(node: Node) -> None:
    # top -H and /proc show it (the consortium bench splits a node's CPU by it);
    # Python 3.11 names only its own Thread objects
    def comm() -> str:
        return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()

    assert await node._run(comm) == STORAGE_THREAD == "ml-store"
    assert comm() != STORAGE_THREAD  # the event loop's thread keeps its own name
