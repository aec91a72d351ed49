"""Proposal pacing (``min_interval``): a node cuts its proposals at least that far apart."""

from __future__ import annotations

import asyncio

from medledger.node import Node
from medledger.orderer.etcd import EtcdOrderer

from .conftest import Network


def etcd_orderer(node: Node) -> EtcdOrderer:
    orderer = node.orderer
    assert isinstance(orderer, EtcdOrderer)
    return orderer


async def test_what_arrives_within_the_interval_goes_into_one_block(net: Network) -> None:
    a = await net.node("h1", min_interval=1.0)
    signer = net.signer("h1")
    first = await a.submit(signer.anchor())
    futures = []
    for _ in range(3):  # 0.1 s apart: without pacing, each would be its own proposal
        futures.append(a.enqueue(signer.anchor()))
        await asyncio.sleep(0.1)
    receipts = await asyncio.gather(*futures)
    assert {r.height for r in receipts} == {first.height + 1}
    assert [r.index for r in receipts] == [first.index + 1, first.index + 2, first.index + 3]


async def test_without_an_interval_the_same_arrivals_make_several_blocks(net: Network) -> None:
    # the control for the test above: the first arrival finds nothing pending and is
    # cut on its own at once
    a = await net.node("h1")
    signer = net.signer("h1")
    first = await a.submit(signer.anchor())
    futures = []
    for _ in range(3):
        futures.append(a.enqueue(signer.anchor()))
        await asyncio.sleep(0.1)
    receipts = await asyncio.gather(*futures)
    assert receipts[0].height == first.height + 1
    assert len({r.height for r in receipts}) > 1


async def test_a_full_proposal_is_cut_at_once(net: Network) -> None:
    a = await net.node("h1", min_interval=60.0, max_batch=3)
    signer = net.signer("h1")
    first = await a.submit(signer.anchor())
    txs = [signer.anchor() for _ in range(3)]
    async with asyncio.timeout(20):  # far below the 60 s interval
        receipts = await asyncio.gather(*(a.enqueue(tx) for tx in txs))
    assert {r.height for r in receipts} == {first.height + 1}


async def test_the_wait_is_what_remains_of_the_interval(net: Network) -> None:
    a = await net.node("h1", min_interval=60.0)
    orderer = etcd_orderer(a)
    loop = asyncio.get_running_loop()
    orderer._last_cut = loop.time() - 61.0  # the last proposal is older than the interval
    async with asyncio.timeout(5):
        await orderer._pace()
    orderer._last_cut = loop.time()  # just cut: the next one waits
    pace = asyncio.ensure_future(orderer._pace())
    await asyncio.sleep(0.3)
    assert not pace.done()
    pace.cancel()
