"""A node keeps the top of the state tree in memory and never stores it (SQLite and PostgreSQL).

``medledger.state.smt``'s module docstring, "The top of the tree": the internal nodes
above ``TOP_DEPTH`` are left out of every commit and derived again from the stored
nodes when the ledger is opened. Checked here on real stores: nothing of the top is
stored, a reopened node has the same tree and goes on committing, the ledger
verifies, and a store whose stored nodes do not give the head's state root is
refused when opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from medledger.errors import IntegrityError
from medledger.ledger.verify import verify_ledger
from medledger.node import BlockSpec, Node
from medledger.state.smt import TOP_DEPTH, SparseMerkleTree, in_top
from medledger.store import open_store

from .conftest import BLOCK_TIME, ORG, Keys, TxFactory


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return str(request.getfixturevalue("pg_url"))


async def _commit(node: Node, anchors: TxFactory, blocks: int, size: int) -> None:
    for _ in range(blocks):
        await node.commit_batch([anchors.anchor() for _ in range(size)])


def _stored_nodes(url: str) -> dict[bytes, bytes]:
    store = open_store(url)
    try:
        return dict(store.iter_nodes())
    finally:
        store.close()


async def test_the_top_is_not_stored_and_a_reopened_node_goes_on(
    url: str, genesis: dict[str, Any], keys: Keys, anchors: TxFactory
) -> None:
    node = await Node.create(url, genesis, [(ORG, keys.node)])
    node.clock = lambda: BLOCK_TIME
    await node.start()
    try:
        # 1,500 anchors: internal nodes down to depth 2 or 3, leaves moving down as it fills
        await _commit(node, anchors, 30, 50)
        root, top = node.head.state_root, dict(node._cache.top)
    finally:
        await node.close()
    assert {0, 1, 2} <= {nk[0] for nk in top}
    stored = _stored_nodes(url)
    assert not [nk for nk, v in stored.items() if in_top(nk, v)]
    assert not set(stored) & set(top)

    node = await Node.open(url, [(ORG, keys.node)])
    node.clock = lambda: BLOCK_TIME
    await node.start()
    try:
        assert node._cache.top == top
        assert await node.read(lambda st: SparseMerkleTree(st).root()) == root
        await _commit(node, anchors, 5, 50)
        after = node.head
    finally:
        await node.close()
    store = open_store(url)
    try:
        report = verify_ledger(store)
    finally:
        store.close()
    assert report.ok, report.failure
    assert report.state_root == after.state_root.hex()
    assert report.blocks == after.height + 1


async def test_a_store_whose_nodes_do_not_give_the_state_root_is_refused(
    tmp_path: Path, genesis: dict[str, Any], keys: Keys, anchors: TxFactory
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    node = await Node.create(url, genesis, [(ORG, keys.node)])
    node.clock = lambda: BLOCK_TIME
    await node.start()
    try:
        await _commit(node, anchors, 4, 50)
    finally:
        await node.close()
    store = open_store(url)
    try:
        # a leaf just below the top, with its value hash altered
        nk, v = next((k, v) for k, v in store.iter_nodes() if k[0] <= TOP_DEPTH and v[0] == 0)
        store._db.execute("UPDATE smt SET v = ? WHERE k = ?", (v[:-1] + bytes([v[-1] ^ 1]), nk))
        store._db.commit()
    finally:
        store.close()
    with pytest.raises(IntegrityError, match="do not match the state root"):
        await Node.open(url, [(ORG, keys.node)])


async def test_groups_whose_blocks_grow_the_top_store_exactly_the_rest(
    url: str, genesis: dict[str, Any], keys: Keys, anchors: TxFactory
) -> None:
    """Group commits from a small state: within a group, positions of the top turn from
    leaves into internal nodes block after block (each block's writes are split against
    the top before the group), and the store must end up with exactly the canonical
    nodes less the top, as ``verify`` checks."""
    node = await Node.create(url, genesis, [(ORG, keys.node)])
    node.clock = lambda: BLOCK_TIME
    await node.start()
    try:
        for _ in range(12):
            specs = [
                BlockSpec([anchors.anchor() for _ in range(3)], [True] * 3, block_time=BLOCK_TIME)
                for _ in range(5)
            ]
            outcomes = await node.commit_group(specs)
            assert all(isinstance(o, list) for o in outcomes)
        top, head = dict(node._cache.top), node.head
    finally:
        await node.close()
    assert head.height == 60
    store = open_store(url)
    try:
        report = verify_ledger(store)
        stored = dict(store.iter_nodes())
    finally:
        store.close()
    assert report.ok, report.failure
    assert not set(stored) & set(top)
    node = await Node.open(url, [(ORG, keys.node)])
    try:
        assert node._cache.top == top
    finally:
        await node.close()
