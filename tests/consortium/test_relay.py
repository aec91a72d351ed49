"""Relaying over the peer API: ``POST /peer/v1/relay`` and :class:`PeerRelay`.

Two members' nodes order through a real (one-member) etcd cluster; their peer
apps are reached in-process through httpx's ASGI transport.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from etcd_cluster import EtcdCluster
from medledger.consortium.client import CBOR, PeerClient, PeerRequestError, PeerUnavailable
from medledger.consortium.gossip import ConsortiumMonitor, Divergence
from medledger.consortium.relay import PeerRelay
from medledger.encoding import decode, encode

from .conftest import NETWORK, Consortium, Member, add_member, genesis_doc, make_orgs


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), size=1) as cluster:
        yield cluster


@dataclass
class Pair:
    c: Consortium
    leader: Member  # org-1: first in organisation order, proposes for both
    follower: Member  # org-2: relays to org-1
    relay: PeerRelay


_roots = iter(range(1, 1_000_000))


def now() -> int:
    return int(time.time() * 1000)


@pytest.fixture
async def pair(tmp_path: Path, etcd: EtcdCluster) -> AsyncIterator[Pair]:
    orgs = make_orgs(2)
    c = Consortium(orgs, genesis_doc(orgs))
    for org in orgs:
        await add_member(c, tmp_path, org)
    leader, follower = c.members
    for m in c.members:
        c.connect(m)
    assert follower.client is not None
    relay = PeerRelay(follower.client, follower.monitor)
    url = f"{etcd.url}/relay{next(_roots)}"
    opts: dict[str, Any] = {"verify_workers": 0, "request_timeout": 1.0, "compact_interval": None}
    await leader.node.start(url, **opts)
    await follower.node.start(url, relay=relay, **opts)
    try:
        yield Pair(c, leader, follower, relay)
    finally:
        for m in c.members:
            if m.client is not None:
                await m.client.close()
            await m.node.close()


async def post_txs(member: Member, raws: list[bytes]) -> list[dict[str, object]]:
    """``POST /ledger/v1/txs`` to ``member``'s peer app: wait for commitment."""
    transport = httpx.ASGITransport(app=member.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://node.test") as http:
        resp = await http.post(
            "/ledger/v1/txs", content=encode(raws), headers={"content-type": CBOR}
        )
    assert resp.status_code == 200, resp.text
    doc = decode(resp.content)
    assert isinstance(doc, list)
    return doc


async def test_what_a_follower_receives_is_proposed_by_the_first_member(pair: Pair) -> None:
    org2 = pair.c.orgs[1]
    txs = org2.anchor(4, now())
    got = await post_txs(pair.follower, [tx.raw for tx in txs])
    assert [r["ok"] for r in got] == [True] * 4, got
    leader_kid = pair.c.orgs[0].node_key.key_id
    for r in got:
        header, _ = await pair.follower.node.get_block(int(r["height"]))  # type: ignore[call-overload]
        assert header.proposer == leader_kid
        rec = await pair.leader.node.get_tx(r["tx_id"])  # type: ignore[arg-type]
        assert (rec.index, rec.height) == (r["index"], r["height"])
    # a rejection comes back the same way: the same transactions again are replays
    again = await post_txs(pair.follower, [tx.raw for tx in txs[:1]])
    assert again[0]["ok"] is False and again[0]["error"] == "replayed"


async def test_the_relay_endpoint_takes_only_signed_member_requests(pair: Pair) -> None:
    raws = [tx.raw for tx in pair.c.orgs[1].anchor(1, now())]
    transport = httpx.ASGITransport(app=pair.leader.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://node.test") as http:
        resp = await http.post("/peer/v1/relay", content=encode(raws))
    assert resp.status_code == 401
    client = pair.follower.client
    assert client is not None
    # malformed bodies and transactions are refused whole
    with pytest.raises(PeerRequestError) as bad:
        await client.request(
            "org-1", "POST", "/peer/v1/relay", body=encode({"txs": raws}), content_type=CBOR
        )
    assert bad.value.status == 400
    with pytest.raises(PeerRequestError) as bad:
        await client.relay_txs("org-1", [b"\x01not a transaction"])
    assert bad.value.status == 400
    with pytest.raises(PeerRequestError) as bad:
        await client.relay_txs("org-1", [])
    assert bad.value.status == 413
    # queued, not awaited: the answer names a revision below the proposal to come
    rev = await client.relay_txs("org-1", raws)
    assert isinstance(rev, int) and rev > 0


async def test_a_halted_or_stopped_proposer_refuses_relays(pair: Pair) -> None:
    client = pair.follower.client
    assert client is not None
    raws = [tx.raw for tx in pair.c.orgs[1].anchor(1, now())]
    pair.leader.monitor.halted_reason = "divergence at height 3"
    with pytest.raises(PeerUnavailable, match="halted"):
        await client.relay_txs("org-1", raws)
    pair.leader.monitor.halted_reason = None
    await pair.leader.node.stop_orderer()
    with pytest.raises(PeerUnavailable, match="etcd"):
        await client.relay_txs("org-1", raws)
    # the follower then proposes what it receives itself
    got = await post_txs(pair.follower, raws)
    assert got[0]["ok"] is True, got
    header, _ = await pair.follower.node.get_block(int(got[0]["height"]))  # type: ignore[call-overload]
    assert header.proposer == pair.c.orgs[1].node_key.key_id


def test_the_proposer_is_the_first_healthy_member_in_order() -> None:
    client = PeerClient(
        network=NETWORK,
        org="org-3",
        key=make_orgs(1)[0].node_key,
        peers={"org-2": "http://org-2.test", "org-1": "http://org-1.test"},
    )
    monitor = ConsortiumMonitor("org-3")
    relay = PeerRelay(client, monitor)
    assert relay.proposers() == ["org-1", "org-2", "org-3"]  # not contacted yet: eligible
    monitor.contact("org-1", 5)
    monitor.unreachable("org-2", "connection refused")
    assert relay.proposers() == ["org-1", "org-3"]
    monitor.peer("org-1").divergence = Divergence("org-1", 4, ("state root",), "", "", 0.0)
    assert relay.proposers() == ["org-3"]
    monitor.contact("org-2", 6)
    assert relay.proposers() == ["org-2", "org-3"]
    asyncio.run(client.close())
