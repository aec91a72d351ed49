"""Relaying: a node hands what it receives to another node, which proposes it.

The relay here is in-process (it calls the proposer's ``accept_relayed``); the
node process's relay over the peer API is tested in ``tests/consortium``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest

from medledger.errors import OrdererError, ReplayedTransaction
from medledger.ledger.block import BlockHeader
from medledger.ledger.tx import Transaction
from medledger.node import Node, Receipt
from medledger.orderer.etcd import EtcdOrderer

from .conftest import Network


def etcd_orderer(node: Node) -> EtcdOrderer:
    orderer = node.orderer
    assert isinstance(orderer, EtcdOrderer)
    return orderer


class LocalRelay:
    """Hands transactions to another node of the test, or fails / loses them on demand."""

    def __init__(self, order: Sequence[str]) -> None:
        self.order = list(order)
        self.nodes: dict[str, Node] = {}
        self.unreachable: set[str] = set()
        self.lose: set[str] = set()  # accepted, then lost (the proposer died)
        self.calls: list[tuple[str, list[bytes]]] = []
        self.called = asyncio.Event()

    def proposers(self) -> list[str]:
        return list(self.order)

    async def forward(self, org: str, raws: Sequence[bytes]) -> int:
        self.calls.append((org, list(raws)))
        self.called.set()
        if org in self.unreachable:
            raise OrdererError(f"node of {org} unreachable")
        orderer = etcd_orderer(self.nodes[org])
        if org in self.lose:
            return orderer.revision
        return orderer.accept_relayed([Transaction.from_bytes(r) for r in raws])


async def relaying_pair(
    net: Network, *, unreachable: Sequence[str] = (), lose: Sequence[str] = (), **options: Any
) -> tuple[Node, Node, LocalRelay]:
    """h1's node, and h2's node relaying to it (through ``LocalRelay``, set up as asked)."""
    a = await net.node("h1")
    relay = LocalRelay(["h1", "h2"])
    relay.unreachable.update(unreachable)
    relay.lose.update(lose)
    b = await net.node("h2", relay=relay, **options)
    relay.nodes = {"h1": a, "h2": b}
    return a, b, relay


async def proposer_of(node: Node, receipt: Receipt) -> bytes:
    header, _ = await node.get_block(receipt.height)
    assert isinstance(header, BlockHeader)
    return header.proposer


async def test_a_relaying_node_answers_from_the_blocks_its_proposer_makes(net: Network) -> None:
    a, b, relay = await relaying_pair(net)
    signer = net.signer("h2")
    txs = [signer.anchor() for _ in range(5)]
    receipts = await asyncio.gather(*(b.submit(tx) for tx in txs))
    # handed over in submission order, proposed by h1's node only
    assert [raw for _, raws in relay.calls for raw in raws] == [tx.raw for tx in txs]
    assert {org for org, _ in relay.calls} == {"h1"}
    indexes = [r.index for r in receipts]
    assert indexes == sorted(indexes) and len(set(indexes)) == 5
    for r in receipts:
        assert await proposer_of(b, r) == net.node_keys["h1"].key_id
        rec = await a.get_tx(r.tx_id)  # the same entry on the proposer's ledger
        assert (rec.index, rec.height) == (r.index, r.height)
    # and the relaying node proposes nothing itself: every block on it came from h1
    for height in range(1, b.head.height + 1):
        header, _ = await b.get_block(height)
        assert header.proposer == net.node_keys["h1"].key_id


async def test_the_proposer_decision_reaches_the_relaying_submitter(net: Network) -> None:
    a, b, relay = await relaying_pair(net)
    signer = net.signer("h2")
    tx = signer.anchor()
    await a.submit(tx)
    # once h2 has applied that block, a later copy is what its submission gets: a replay
    await etcd_orderer(b).wait_revision(etcd_orderer(a).revision)
    with pytest.raises(ReplayedTransaction):
        await b.submit(tx)  # carried by h1's next proposal, refused as a replay
    assert relay.calls and relay.calls[-1] == ("h1", [tx.raw])
    # the same transaction twice in one post: the first commits, the second is a replay
    again = signer.anchor()
    first, second = await asyncio.gather(b.submit(again), b.submit(again), return_exceptions=True)
    assert isinstance(first, Receipt) and isinstance(second, ReplayedTransaction)


async def test_an_unreachable_proposer_is_passed_over_and_the_node_proposes_itself(
    net: Network,
) -> None:
    a, b, relay = await relaying_pair(net, unreachable=["h1"], relay_retry=60.0)
    signer = net.signer("h2")
    receipt = await b.submit(signer.anchor())
    assert await proposer_of(b, receipt) == net.node_keys["h2"].key_id
    assert [org for org, _ in relay.calls] == ["h1"]
    more = await asyncio.gather(*(b.submit(signer.anchor()) for _ in range(3)))
    assert [org for org, _ in relay.calls] == ["h1"]  # not tried again within relay_retry
    assert [r.index for r in more] == sorted(r.index for r in more)
    for r in more:
        assert await proposer_of(b, r) == net.node_keys["h2"].key_id
    assert (await a.get_tx(receipt.tx_id)).index == receipt.index  # h1 applied it all the same


async def test_what_a_dead_proposer_never_proposed_is_proposed_here_in_order(net: Network) -> None:
    # h1 takes them and never proposes them
    a, b, _ = await relaying_pair(net, lose=["h1"], relay_timeout=0.5)
    signer = net.signer("h2")
    txs = [signer.anchor() for _ in range(3)]  # seq 1, 2, 3: must land in this order
    t0 = time.monotonic()
    receipts = await asyncio.gather(*(b.submit(tx) for tx in txs))
    assert time.monotonic() - t0 >= 0.5
    assert [r.index for r in receipts] == sorted(r.index for r in receipts)
    for r in receipts:
        assert await proposer_of(b, r) == net.node_keys["h2"].key_id
    # h1 proposes them late after all: refused as replays everywhere, answered nowhere
    height = a.head.height
    etcd_orderer(a).accept_relayed(txs)
    follow = await a.submit(net.signer("h1").anchor())  # after those in h1's queue
    assert follow.height > height
    await etcd_orderer(b).wait_revision(etcd_orderer(a).revision)
    for tx, r in zip(txs, receipts, strict=True):
        assert (await b.get_tx(tx.tx_id)).index == r.index  # still the one entry each


async def test_a_proposer_that_keeps_landing_proposals_is_waited_for(net: Network) -> None:
    # h1 is alive (its own proposals land) but slow to carry h2's: h2 waits for it up to
    # half the submit timeout instead of proposing copies after relay_timeout
    a, b, _ = await relaying_pair(net, lose=["h1"], relay_timeout=0.3, submit_timeout=4.0)

    async def keep_landing() -> None:
        signer = net.signer("h1")
        while True:
            await a.submit(signer.anchor())
            await asyncio.sleep(0.05)

    lander = asyncio.create_task(keep_landing())
    try:
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        receipt = await b.submit(net.signer("h2").anchor())
        waited = time.monotonic() - t0
    finally:
        lander.cancel()
        await asyncio.gather(lander, return_exceptions=True)
    assert 2.0 <= waited < 4.0, waited  # half the submit timeout, not relay_timeout
    assert await proposer_of(b, receipt) == net.node_keys["h2"].key_id


async def test_relayed_transactions_are_proposed_where_they_arrive(net: Network) -> None:
    # h1's own submissions would go to h3, but what h2 relays to h1 is proposed by h1
    relay_a = LocalRelay(["h3", "h1"])
    a = await net.node("h1", relay=relay_a)
    relay_b = LocalRelay(["h1", "h2"])
    b = await net.node("h2", relay=relay_b)
    c = await net.node("h3")
    relay_a.nodes = relay_b.nodes = {"h1": a, "h2": b, "h3": c}
    receipt = await b.submit(net.signer("h2").anchor())
    assert await proposer_of(b, receipt) == net.node_keys["h1"].key_id
    assert relay_a.calls == []
    own = await a.submit(net.signer("h1").anchor())
    assert await proposer_of(a, own) == net.node_keys["h3"].key_id
    assert [org for org, _ in relay_a.calls] == ["h3"]


async def test_a_node_that_is_first_in_the_order_proposes_itself(net: Network) -> None:
    relay = LocalRelay(["h1", "h2"])
    a = await net.node("h1", relay=relay)
    receipt = await a.submit(net.signer("h1").anchor())
    assert relay.calls == []
    assert await proposer_of(a, receipt) == net.node_keys["h1"].key_id


async def test_a_stopped_node_fails_what_it_relayed_and_refuses_relays(net: Network) -> None:
    _, b, relay = await relaying_pair(net, lose=["h1"])
    fut = b.enqueue(net.signer("h2").anchor())
    await relay.called.wait()
    orderer = etcd_orderer(b)
    await b.stop_orderer()
    with pytest.raises(OrdererError, match="shutting down"):
        await fut
    with pytest.raises(OrdererError, match="not running"):
        orderer.accept_relayed([net.signer("h1").anchor()])
