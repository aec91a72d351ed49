"""Relaying over the peer API: ``POST /peer/v1/relay`` and :class:`PeerRelay`.

Two members' nodes order through a real (one-member) etcd cluster; their peer
apps serve on loopback ports (uvicorn), as the WebSocket needs a real server.
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
import uvicorn
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from etcd_cluster import EtcdCluster, free_port
from medledger.consortium.auth import sign_request
from medledger.consortium.client import (
    CBOR,
    PeerClient,
    PeerRequestError,
    PeerUnavailable,
    tls_context,
)
from medledger.consortium.config import load_config
from medledger.consortium.gossip import ConsortiumMonitor, Divergence
from medledger.consortium.relay import RELAY_PATH, PeerRelay
from medledger.datadir import DataDir
from medledger.encoding import decode, encode
from medledger.ledger.block import BlockHeader
from medledger.store import open_store
from tls_files import TLSFiles, make_tls_files

from .conftest import NETWORK, Consortium, Member, add_member, genesis_doc, make_orgs
from .procs import Load, LocalNetwork


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
    leader_url: str


_roots = iter(range(1, 1_000_000))


def now() -> int:
    return int(time.time() * 1000)


async def serve(
    app: Any, tls: TLSFiles | None = None
) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    """``app`` on a loopback port (WebSockets need a real server), over TLS if given."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
            ssl_certfile=None if tls is None else str(tls.server_cert),
            ssl_keyfile=None if tls is None else str(tls.server_key),
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    return server, task, f"{'http' if tls is None else 'https'}://127.0.0.1:{port}"


@pytest.fixture
async def pair(tmp_path: Path, etcd: EtcdCluster) -> AsyncIterator[Pair]:
    orgs = make_orgs(2)
    c = Consortium(orgs, genesis_doc(orgs))
    for org in orgs:
        await add_member(c, tmp_path, org)
    leader, follower = c.members
    servers = [await serve(m.app) for m in c.members]
    for m in c.members:
        m.client = PeerClient(
            network=NETWORK,
            org=m.org.id,
            key=m.org.node_key,
            peers={
                o.org.id: url
                for o, (_, _, url) in zip(c.members, servers, strict=True)
                if o is not m
            },
        )
    assert follower.client is not None
    relay = PeerRelay(follower.client, follower.monitor)
    url = f"{etcd.url}/relay{next(_roots)}"
    opts: dict[str, Any] = {"verify_workers": 0, "request_timeout": 1.0, "compact_interval": None}
    await leader.node.start(url, **opts)
    await follower.node.start(url, relay=relay, **opts)
    try:
        yield Pair(c, leader, follower, relay, servers[0][2])
    finally:
        for m in c.members:
            await m.node.close()
            if m.client is not None:
                await m.client.close()
        await relay.close()
        for server, task, _ in servers:
            server.should_exit = True
            await task


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


async def test_the_relay_takes_only_a_signed_member_connection(pair: Pair) -> None:
    url = "ws" + pair.leader_url[4:] + RELAY_PATH
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url):
            pass
    assert refused.value.response.status_code == 403
    headers = sign_request(
        pair.c.orgs[1].admin,  # not a node key
        network=NETWORK,
        org="org-2",
        audience="org-1",
        method="GET",
        path=RELAY_PATH,
    )
    with pytest.raises(InvalidStatus):
        async with connect(url, additional_headers=headers):
            pass
    # a member's node that sends text instead of CBOR is answered with a refusal
    assert pair.follower.client is not None
    client = pair.follower.client
    signed = sign_request(
        client.key, network=NETWORK, org="org-2", audience="org-1", method="GET", path=RELAY_PATH
    )
    async with connect(url, additional_headers=signed) as ws:
        await ws.send("not cbor")
        answer = decode(await ws.recv(decode=False))
        assert answer["status"] == 400 and "binary" in answer["message"]


async def test_malformed_relays_are_refused_one_by_one(pair: Pair) -> None:
    raws = [tx.raw for tx in pair.c.orgs[1].anchor(1, now())]
    with pytest.raises(PeerRequestError) as bad:
        await pair.relay.forward("org-1", [b"\x01not a transaction"])
    assert bad.value.status == 400
    with pytest.raises(PeerRequestError) as bad:
        await pair.relay.forward("org-1", [])
    assert bad.value.status == 413
    # queued, not awaited: the answer names a revision below the proposal to come
    rev = await pair.relay.forward("org-1", raws)
    assert isinstance(rev, int) and rev > 0


async def test_bad_submit_bodies_are_refused_and_change_nothing(pair: Pair) -> None:
    # the submit endpoint and the relay share one check of a batch of transactions
    node = pair.follower.node
    height = node.head.height
    transport = httpx.ASGITransport(app=pair.follower.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://node.test") as http:
        for body, status in [
            (b"\xff", 400),  # not CBOR
            (encode({"txs": []}), 400),  # not an array
            (encode(["text"]), 400),  # not transactions
            (encode([b"x"] * 10_001), 413),  # too many
        ]:
            resp = await http.post("/ledger/v1/txs", content=body)
            assert resp.status_code == status, (body[:20], resp.text)
            assert "message" in resp.json()
    assert node.head.height == height


async def test_a_halted_or_stopped_proposer_refuses_relays(pair: Pair) -> None:
    raws = [tx.raw for tx in pair.c.orgs[1].anchor(1, now())]
    pair.leader.monitor.halted_reason = "divergence at height 3"
    with pytest.raises(PeerRequestError, match="halted") as refused:
        await pair.relay.forward("org-1", raws)
    assert refused.value.status == 503
    pair.leader.monitor.halted_reason = None
    await pair.leader.node.stop_orderer()
    with pytest.raises(PeerRequestError, match="etcd"):
        await pair.relay.forward("org-1", raws)
    # the follower then proposes what it receives itself
    got = await post_txs(pair.follower, raws)
    assert got[0]["ok"] is True, got
    header, _ = await pair.follower.node.get_block(int(got[0]["height"]))  # type: ignore[call-overload]
    assert header.proposer == pair.c.orgs[1].node_key.key_id


async def test_the_relay_runs_over_tls_with_the_consortium_ca(
    tmp_path: Path, etcd: EtcdCluster
) -> None:
    tls = make_tls_files(tmp_path / "tls", "peer")
    orgs = make_orgs(2)
    c = Consortium(orgs, genesis_doc(orgs))
    for org in orgs:
        await add_member(c, tmp_path, org)
    leader, follower = c.members
    server, task, url = await serve(leader.app, tls)
    assert url.startswith("https://")

    def client(verify: Any) -> PeerClient:
        return PeerClient(
            network=NETWORK, org="org-2", key=orgs[1].node_key, peers={"org-1": url}, verify=verify
        )

    trusting, untrusting = client(tls_context(tls.ca)), client(True)
    relay, stranger = PeerRelay(trusting, follower.monitor), PeerRelay(untrusting, follower.monitor)
    await leader.node.start(
        f"{etcd.url}/relay{next(_roots)}", verify_workers=0, compact_interval=None
    )
    try:
        raws = [tx.raw for tx in orgs[1].anchor(2, now())]
        assert await relay.forward("org-1", raws) > 0  # wss://, the consortium CA trusted
        with pytest.raises(PeerUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await stranger.forward("org-1", raws)  # a server it cannot verify: refused
    finally:
        await relay.close()
        await stranger.close()
        for m in c.members:
            await m.node.close()
        server.should_exit = True
        await task


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


async def test_a_consortium_with_relay_on_has_one_proposer(tmp_path: Path) -> None:
    # real node processes started from node.toml with relay = true
    net = await asyncio.to_thread(LocalNetwork, tmp_path, orderer_options={"relay": True})
    try:
        await asyncio.to_thread(net.start)
        load = Load(net, batch=10)
        load.start([(org, net.load_keys(org)[0]) for org in net.orgs])
        await asyncio.sleep(3)
        await load.stop()
        assert len(load.acked) > 100 and not load.errors, load.errors[-5:]
        healths = await net.converged()
        org1 = load_config(net.node("org-1")["config"])
        leader = DataDir(org1.data_dir).identity(org1.node_key_name).signing.key_id
        store = open_store(net.node("org-3")["store"])
        try:
            proposers = set()
            for height in range(1, int(healths[0]["height"]) + 1):
                block = store.get_block(height)
                assert block is not None
                proposers.add(BlockHeader.from_bytes(block.header).proposer)
            # every acknowledged transaction is on org-3's ledger, all proposed by org-1
            assert all(store.has_tx(t) for t in load.acked)
        finally:
            store.close()
        assert proposers == {leader}
    finally:
        await asyncio.to_thread(net.close)


@pytest.mark.timeout(240)
async def test_kill_9_the_relaying_proposer_under_load_loses_nothing(tmp_path: Path) -> None:
    # relay = true: org-2 and org-3 hand what they receive to org-1's node. Killed with
    # SIGKILL under load, org-1 takes with it whatever it had queued but not proposed;
    # the others must propose that themselves (relay_timeout), pass org-1 over, and go
    # on taking writes; once it is back, every acknowledged transaction is on every
    # node's ledger and the three agree.
    from .test_faults import assert_all_hold, verify

    net = await asyncio.to_thread(LocalNetwork, tmp_path, orderer_options={"relay": True})
    load = Load(net, batch=10, pause=0.05)
    try:
        await asyncio.to_thread(net.start)
        load.start([(org, net.load_keys(org)[0]) for org in net.orgs])
        await asyncio.sleep(3)
        before = len(load.acked)
        net.kill("org-1")
        t_kill = time.monotonic()
        await asyncio.sleep(6)
        during = sum(1 for t in load.acked.values() if t > t_kill)
        await asyncio.to_thread(net.start)  # restarts org-1 and waits until it serves
        await asyncio.sleep(2)
        await load.stop()
        assert before > 100 and during > 100, (before, during, load.errors[-5:])
        # the only failures the clients saw were posts to the dead node (then retried
        # elsewhere): no transaction timed out or was refused at org-2 or org-3
        assert all(e.startswith("org-1: ") for e in load.errors), load.errors[-5:]
        healths = await net.converged(within=60)
        acked = list(load.acked)
        org1 = load_config(net.node("org-1")["config"])
        leader = DataDir(org1.data_dir).identity(org1.node_key_name).signing.key_id
        await assert_all_hold(net, acked, healths[0]["height"])
        proposers = set()
        store = open_store(net.node("org-3")["store"])
        try:
            for height in range(1, int(healths[0]["height"]) + 1):
                block = store.get_block(height)
                assert block is not None
                proposers.add(BlockHeader.from_bytes(block.header).proposer)
        finally:
            store.close()
        # org-1 proposed before the kill, someone else while it was down
        assert leader in proposers and len(proposers) > 1
        for org in net.orgs:
            report = await asyncio.to_thread(verify, net, org)
            assert report.returncode == 0, report.stdout + report.stderr
    finally:
        await load.stop()  # again after a failure midway; a no-op when already stopped
        await asyncio.to_thread(net.close)
