"""The etcd orderer derives one chain: identical blocks everywhere, nothing applied twice."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import aetcd
import pytest

from medledger.crypto.signing import VerifyKey
from medledger.errors import OrdererError, ReplayedTransaction
from medledger.ledger.block import BlockHeader
from medledger.ledger.checkpoint import checkpoint_of
from medledger.ledger.verify import verify_ledger
from medledger.node import Node, Receipt
from medledger.orderer import make_orderer, parse_etcd_url
from medledger.orderer.embedded import EmbeddedOrderer
from medledger.orderer.etcd import EtcdOrderer, Proposal, read_position

from .conftest import Network, now_ms


async def chain(node: Node) -> list[tuple[bytes, list[tuple[int, bytes, bytes]]]]:
    """Every block's header bytes with its transactions (index, raw, receipt)."""

    def _read() -> list[tuple[bytes, list[tuple[int, bytes, bytes]]]]:
        out = []
        for rec in node.store.iter_blocks(0):
            header = rec.header
            h = BlockHeader.from_bytes(header)
            txs = [(t.index, t.raw, t.receipt) for t in node.store.iter_txs(h.first, h.log_size)]
            out.append((header, txs))
        return out

    return await node.storage(lambda _s: _read())


async def state_rows(node: Node) -> list[tuple[bytes, bytes]]:
    return await node.storage(lambda s: list(s.iter_state()))


def etcd_client(url: str) -> aetcd.Client:
    (host, port), *_ = parse_etcd_url(url)[0]
    return aetcd.Client(host=host, port=port, timeout=5)


def prefix_of(node: Node) -> bytes:
    orderer = node.orderer
    assert isinstance(orderer, EtcdOrderer)
    return orderer.prefix


async def test_two_nodes_derive_byte_identical_blocks(net: Network) -> None:
    a = await net.node("h1")
    b = await net.node("h2")
    sa, sb = net.signer("h1"), net.signer("h2")
    # both nodes propose concurrently, several rounds, so proposals interleave in etcd
    for _ in range(4):
        ra = [a.enqueue(sa.anchor()) for _ in range(25)]
        rb = [b.enqueue(sb.anchor()) for _ in range(25)]
        receipts = await asyncio.gather(*ra, *rb)
        assert all(isinstance(r, Receipt) for r in receipts)
    for n in (a, b):
        await n.orderer.sync()
    assert a.head.height >= 2 and a.head.log_size == 200
    ca, cb = await chain(a), await chain(b)
    assert ca == cb  # headers, transactions and receipts byte for byte
    assert await state_rows(a) == await state_rows(b)
    # blocks carry the proposer's key id, not the deriving node's: both orgs proposed
    proposers = {(await a.get_block(h))[0].proposer for h in range(1, a.head.height + 1)}
    assert proposers == {net.node_keys["h1"].key_id, net.node_keys["h2"].key_id}
    # each node signs its own copy of every header (same hash, its own key)
    for h in range(1, a.head.height + 1):
        ha, sig_a = await a.get_block(h)
        hb, sig_b = await b.get_block(h)
        assert ha.hash == hb.hash
        VerifyKey(net.node_keys["h1"].public.raw).verify(sig_a, ha.hash)
        VerifyKey(net.node_keys["h2"].public.raw).verify(sig_b, hb.hash)
    # checkpoint bodies agree (only the signature lines differ)
    cpa, cpb = checkpoint_of(await a.checkpoint()), checkpoint_of(await b.checkpoint())
    assert (cpa.size, cpa.root, cpa.block_info()) == (cpb.size, cpb.root, cpb.block_info())

    # a third node started later replays the same etcd history into the same chain
    c = await net.node("h3")
    await c.orderer.sync()
    assert await chain(c) == ca
    assert await state_rows(c) == await state_rows(a)
    # and every node's ledger verifies from genesis (signatures by its own node key)
    for n in (a, b, c):
        report = await n.storage(verify_ledger)
        assert report.ok, report.failure
        assert report.transactions == 200


async def test_proposals_applied_as_one_group_make_the_same_blocks(net: Network) -> None:
    a = await net.node("h1", max_group=1)  # one store commit per block
    b = await net.node("h2")
    c = await net.node("h3")
    groups: list[int] = []
    commit_blocks = c.store.commit_blocks

    def recording(blocks: Any, meta: Any = None) -> None:
        groups.append(len(blocks))
        commit_blocks(blocks, meta)

    c.store.commit_blocks = recording  # type: ignore[method-assign]
    # hold c's storage thread while a and b commit several proposals: c then applies
    # them as consecutive blocks in one store transaction
    held = threading.Event()
    stuck = asyncio.get_running_loop().run_in_executor(c._io, held.wait)
    sa, sb = net.signer("h1"), net.signer("h2")
    for _ in range(3):
        await asyncio.gather(*(a.enqueue(sa.anchor()) for _ in range(10)))
        await asyncio.gather(*(b.enqueue(sb.anchor()) for _ in range(10)))
    tx = net.signer("h3").anchor()
    pending = asyncio.ensure_future(c.submit(tx))  # acknowledged only after its group commits
    await asyncio.sleep(0.3)
    assert not pending.done()
    held.set()
    await stuck
    receipt = await pending
    assert (await c.get_tx(tx.tx_id)).index == receipt.index
    for n in (a, b, c):
        await n.orderer.sync()
    assert max(groups) > 1, groups
    assert a.head.log_size == 61
    assert await chain(c) == await chain(a) == await chain(b)
    assert await state_rows(c) == await state_rows(a)
    report = await c.storage(verify_ledger)
    assert report.ok, report.failure
    # c restarts from the position its last group recorded
    assert await c.storage(read_position) == (c.head.height, c.orderer.position[1])


async def test_submit_returns_after_local_commit_and_tx_reaches_every_node(
    net: Network,
) -> None:
    a = await net.node("h1")
    b = await net.node("h2")
    tx = net.signer("h1").anchor()
    receipt = await a.submit(tx)
    # committed on the submitting node when submit returns
    rec = await a.get_tx(tx.tx_id)
    assert (rec.index, rec.height) == (receipt.index, receipt.height)
    assert a.head.height == receipt.height
    # and the other node derives the same block
    await b.orderer.sync()
    rec_b = await b.get_tx(tx.tx_id)
    assert (rec_b.index, rec_b.height, rec_b.raw) == (rec.index, rec.height, rec.raw)


async def test_same_tx_submitted_to_two_nodes_commits_once(net: Network) -> None:
    a = await net.node("h1")
    b = await net.node("h2")
    tx = net.signer("h3").anchor()
    results = await asyncio.gather(a.submit(tx), b.submit(tx), return_exceptions=True)
    ok = [r for r in results if isinstance(r, Receipt)]
    replayed = [r for r in results if isinstance(r, ReplayedTransaction)]
    assert len(ok) == 1 and len(replayed) == 1, results
    for n in (a, b):
        await n.orderer.sync()
    assert a.head.log_size == b.head.log_size == 1
    assert await chain(a) == await chain(b)


async def test_replayed_proposal_does_not_apply_twice(net: Network) -> None:
    a = await net.node("h1")
    b = await net.node("h2")
    signer = net.signer("h1")
    receipts = await asyncio.gather(*(a.enqueue(signer.anchor()) for _ in range(10)))
    assert len(receipts) == 10
    await b.orderer.sync()
    height, size = a.head.height, a.head.log_size
    before = await chain(a)

    prefix = prefix_of(a)
    client = etcd_client(net.url)
    async with client:
        proposals = list(await client.get_prefix(prefix + b"proposals/"))
        assert proposals
        kv = proposals[0]
        key, value = bytes(kv.key), bytes(kv.value)
        assert Proposal.from_bytes(value).txs  # it is a real proposal
        # 1. overwrite the same key (a new version: not a creation) -> ignored
        await client.put(key, value)
        # 2. delete it and create it again: a fresh creation of a valid, signed proposal,
        #    whose transactions are all on the ledger already -> refused, no block
        await client.delete(key)
        await client.put(key, value)
        # 3. the same bytes under another key -> ignored (key must match org/nonce)
        await client.put(prefix + b"proposals/h1/" + b"00" * 16, value)
        # 4. a forged proposal: re-signed by an admin key, not a node key -> refused
        p = Proposal.from_bytes(value)
        forged = Proposal.create(net.admin_keys["h1"], p.network, "h1", now_ms(), p.txs)
        put = await client.put(prefix + f"proposals/h1/{forged.nonce.hex()}".encode(), forged.raw)
        forged_rev = put.header.revision
    for n in (a, b):
        await n.orderer.sync()  # up to the forged proposal, the newest proposal key
        assert n.orderer.revision == forged_rev
        assert (n.head.height, n.head.log_size) == (height, size)
        assert await chain(n) == before

    # the chain keeps growing normally afterwards, identically on both nodes
    await a.submit(signer.anchor())
    await b.orderer.sync()
    assert b.head.log_size == size + 1
    assert await chain(a) == await chain(b)
    # and a node replaying the whole history (replays included) derives the same chain
    c = await net.node("h3")
    await c.orderer.sync()
    assert await chain(c) == await chain(a)


async def test_restart_resumes_from_recorded_position(net: Network) -> None:
    a = await net.create("h1", name="a")
    await net.start(a)
    b = await net.node("h2")
    sa, sb = net.signer("h1"), net.signer("h2")
    await asyncio.gather(*(a.enqueue(sa.anchor()) for _ in range(5)))
    await a.close()
    # while a is down, b keeps committing
    await asyncio.gather(*(b.enqueue(sb.anchor()) for _ in range(5)))
    a2 = await net.start(await net.reopen("h1", "a"))
    # start() returns once a has applied everything ordered so far
    assert a2.head.log_size == b.head.log_size == 10
    await a2.submit(sa.anchor())
    await b.orderer.sync()
    assert await chain(a2) == await chain(b)
    # nothing was applied twice: every transaction appears once
    raws = [raw for _h, txs in await chain(a2) for _i, raw, _r in txs]
    assert len(raws) == len(set(raws)) == 11


async def test_etcd_unreachable_at_start_is_a_clear_error(net: Network) -> None:
    node = await net.create("h1")
    with pytest.raises(OrdererError, match="unreachable"):
        await net.start(node, url="etcd://127.0.0.1:1,127.0.0.1:2", request_timeout=0.5)


async def test_other_network_in_the_same_prefix_is_refused(net: Network) -> None:
    a = await net.node("h1")
    assert a.head.height == 0
    other = Network(net.base / "other", net.url)  # same names, other keys: other genesis
    (net.base / "other").mkdir()
    node = await other.create("h1")
    try:
        with pytest.raises(OrdererError, match="different network"):
            await other.start(node)
    finally:
        await other.close()


def test_make_orderer_chooses_by_url() -> None:
    assert parse_etcd_url("etcd://127.0.0.1:2379,10.0.0.2:2380") == (
        [("127.0.0.1", 2379), ("10.0.0.2", 2380)],
        "/medledger",
    )
    assert parse_etcd_url("etcd://h:1/consortium/")[1] == "/consortium"
    for bad in ("etcd://h", "etcd://h:x", "http://h:1"):
        with pytest.raises(ValueError):
            parse_etcd_url(bad)


async def test_make_orderer_embedded_and_etcd(net: Network) -> None:
    node = await net.create("h1")
    assert isinstance(make_orderer(None, node), EmbeddedOrderer)
    assert isinstance(make_orderer("embedded", node, max_batch=10), EmbeddedOrderer)
    etcd_orderer = make_orderer("etcd://127.0.0.1:1,127.0.0.1:2/x", node)
    assert isinstance(etcd_orderer, EtcdOrderer)
    assert etcd_orderer.prefix == b"/x/" + node.network.encode() + b"/"
    with pytest.raises(ValueError):
        make_orderer("etcds://127.0.0.1:1", node)
    with pytest.raises(ValueError):
        make_orderer("kafka://x", node)


async def test_halt_writes_and_restart_orderer(net: Network) -> None:
    a = await net.node("h1")
    b = await net.node("h2")
    signer = net.signer("h1")
    a.halt_writes("state diverged from the consortium at block 7")
    with pytest.raises(OrdererError, match="diverged"):
        await a.submit(signer.anchor())
    signer.seq -= 1  # that transaction was never queued
    # a halted node still applies what others order
    tx = net.signer("h2").anchor()
    await b.submit(tx)
    await a.orderer.sync()
    assert (await a.get_tx(tx.tx_id)).raw == tx.raw
    a.halt_writes(None)
    await a.submit(signer.anchor())
    # the orderer can be stopped and started again (e.g. around a catch-up)
    await a.stop_orderer()
    assert a.orderer is None
    with pytest.raises(RuntimeError):
        await a.submit(signer.anchor())
    signer.seq -= 1
    await net.start(a)
    await a.submit(signer.anchor())
    await b.orderer.sync()
    assert await chain(a) == await chain(b)


async def test_stop_cancels_again_a_task_that_lost_its_cancellation(net: Network) -> None:
    # aetcd waits with asyncio.wait_for, which on Python 3.11 drops a cancellation that
    # arrives as the awaited operation completes; a task of the orderer can then go on
    # (the watch loop would wait for events forever) and stop() must not hang on it
    a = await net.node("h1")
    orderer = a.orderer
    assert isinstance(orderer, EtcdOrderer)
    lost = asyncio.Event()

    async def loses_one_cancellation() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            lost.set()  # as wait_for can: the cancellation goes no further
        await asyncio.sleep(3600)

    task = asyncio.create_task(loses_one_cancellation())
    await asyncio.sleep(0)  # it is waiting
    orderer._tasks.append(task)
    stopping = asyncio.create_task(a.stop_orderer())
    done, _ = await asyncio.wait({stopping}, timeout=20)  # a hang, not a speed, check
    if not done:
        stopping.cancel()  # (cascades into the task: the fixture can close the node)
        await asyncio.wait({stopping})
    assert stopping in done, "stop() hung on a task that lost its cancellation"
    assert lost.is_set()
    assert task.cancelled()
