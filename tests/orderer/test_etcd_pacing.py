"""Proposal pacing (``min_interval``): a node cuts its proposals at least that far apart."""

from __future__ import annotations

import asyncio

import pytest

from medledger.node import Node
from medledger.orderer.etcd import BUSY_MAX_INTERVAL, EtcdOrderer

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


# -- busy pacing (busy_rate, busy_threshold): on by default, only under concurrent load --


async def test_a_client_that_waits_for_each_answer_never_makes_a_node_busy(net: Network) -> None:
    # the most sensitive setting: one overlapping arrival would make the node busy
    a = await net.node("h1", busy_rate=1.0, busy_threshold=1)
    orderer = etcd_orderer(a)
    signer = net.signer("h1")
    receipts = [await a.submit(signer.anchor()) for _ in range(8)]
    # each transaction arrived once the previous one's proposal was applied: none
    # counted, the node never busy, every transaction cut at once in a block of its own
    assert orderer._overlap[1] == orderer._overlap[2] == 0
    assert not orderer._busy(asyncio.get_running_loop().time())
    assert [r.height for r in receipts] == list(range(receipts[0].height, receipts[0].height + 8))


async def test_arrivals_while_a_proposal_is_in_flight_make_the_node_busy(net: Network) -> None:
    a = await net.node("h1", busy_rate=1.0, busy_threshold=3)
    orderer = etcd_orderer(a)  # busy: 3 overlapping arrivals in the last second
    signer = net.signer("h1")
    await a.submit(signer.anchor())
    loop = asyncio.get_running_loop()
    first = a.enqueue(signer.anchor())
    async with asyncio.timeout(10):
        while not orderer._inflight:  # noqa: ASYNC110 (its proposal: cut, not yet applied)
            await asyncio.sleep(0.001)
    assert not orderer._busy(loop.time())
    rest = [a.enqueue(signer.anchor()) for _ in range(4)]  # they did not wait
    assert orderer._busy(loop.time())
    # one proposer seen (this node): 1 / busy_rate = 1 s between its proposals
    assert orderer._interval(loop.time()) == 1.0
    r1 = await first
    receipts = await asyncio.gather(*rest)
    assert {r.height for r in receipts} == {r1.height + 1}
    h1, _ = await a.get_block(r1.height)
    h2, _ = await a.get_block(r1.height + 1)
    # the next proposal was held back for the interval (block times are the proposals'
    # times, in ms); without pacing it would follow within milliseconds
    assert h2.time - h1.time >= 990


async def test_the_interval_follows_the_proposers_seen_and_busy_ends(net: Network) -> None:
    a = await net.node("h1", busy_rate=30.0, busy_threshold=10)
    orderer = etcd_orderer(a)
    now = asyncio.get_running_loop().time()
    second = int(now)
    orderer._overlap = [second, 10, 0]  # ten arrivals in flight this second: busy
    assert orderer._busy(now)
    orderer._landed_by = {"h1": now, "h2": now - 0.5, "h3": now - 2.0}
    # itself and h2 proposed within the last second; h3 did not
    assert orderer._interval(now) == 2 / 30.0
    orderer._landed_by["h3"] = now - 0.1
    assert orderer._interval(now) == 3 / 30.0
    # a second later the count is only partly within the last second; two later, gone
    assert not orderer._busy(second + 1.5)
    orderer._overlap = [second, 0, 20]  # twenty in the second before this one
    assert orderer._busy(second + 0.4)  # 20 x 0.6 = 12 within the last second
    assert not orderer._busy(second + 0.6)  # 20 x 0.4 = 8
    assert not orderer._busy(second + 2.0)
    assert orderer._interval(second + 2.0) == 0.0  # not busy: cut at once


async def test_a_busy_node_holds_its_proposals_back_a_second_at_most(net: Network) -> None:
    a = await net.node("h1", busy_rate=0.5, busy_threshold=1)
    orderer = etcd_orderer(a)
    now = asyncio.get_running_loop().time()
    orderer._overlap = [int(now), 1000, 0]
    orderer._landed_by = {"h2": now, "h3": now}
    assert orderer._interval(now) == BUSY_MAX_INTERVAL == 1.0  # not 3 / 0.5 = 6 s


async def test_busy_pacing_can_be_turned_off(net: Network) -> None:
    a = await net.node("h1", busy_rate=0, busy_threshold=1)
    orderer = etcd_orderer(a)
    now = asyncio.get_running_loop().time()
    orderer._overlap = [int(now), 1000, 0]
    assert orderer._busy(now)
    assert orderer._interval(now) == 0.0
    b = await net.node("h2", busy_rate=0, busy_threshold=1, min_interval=0.25)
    orderer = etcd_orderer(b)
    orderer._overlap = [int(now), 1000, 0]
    assert orderer._interval(now) == 0.25  # min_interval still applies


async def test_bad_pacing_options_are_refused(net: Network) -> None:
    node = await net.create("h1")
    for options in ({"busy_rate": -1.0}, {"busy_threshold": 0}):
        with pytest.raises(ValueError, match="busy_"):
            await net.start(node, **options)
