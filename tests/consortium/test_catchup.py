"""Catch-up from peers' blocks, verifying every block."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from medledger.consortium import _nodeio
from medledger.consortium.catchup import BlockVerificationError, CatchUp, verify_and_append
from medledger.consortium.client import BlockBundle, PeerClient
from medledger.consortium.peer import PeerService, create_peer_app
from medledger.crypto.signing import SigningKey
from medledger.ledger.block import BlockHeader
from medledger.ledger.verify import verify_ledger
from medledger.node import Node

from .conftest import NETWORK, Consortium, add_member, genesis_doc, make_orgs


async def source(tmp_path: Path, blocks: int = 4) -> Consortium:
    """A consortium whose first node holds ``blocks`` blocks (the others are not started)."""
    orgs = make_orgs(3)
    c = Consortium(orgs, genesis_doc(orgs))
    a = await add_member(c, tmp_path, orgs[0])
    for i in range(blocks):
        await c.lockstep(
            orgs[0].anchor(3, c.genesis["time"] + 1000 * (i + 1))
            + orgs[1].anchor(2, c.genesis["time"] + 1000 * (i + 1)),
            members=[a],
        )
    return c


def client_for(org_id: str, key: SigningKey, apps: dict[str, Any]) -> PeerClient:
    return PeerClient(
        network=NETWORK,
        org=org_id,
        key=key,
        peers={o: f"http://{o}.test" for o in apps},
        transports={o: httpx.ASGITransport(app=app) for o, app in apps.items()},
    )


async def test_a_new_node_catches_up_and_derives_identical_blocks(tmp_path: Path) -> None:
    c = await source(tmp_path)
    a = c.members[0]
    fresh = await Node.create(
        f"sqlite:///{tmp_path / 'fresh.db'}", c.genesis, [("org-1", c.orgs[0].node_key)]
    )
    client = client_for("org-2", c.orgs[1].node_key, {"org-1": a.app})
    try:
        summary = await CatchUp(fresh, client, page=3).run()
        assert summary == {"from": 0, "to": 4, "sources": ["org-1"], "bad_peers": {}}
        assert fresh.head.to_bytes() == a.node.head.to_bytes()
        for h in range(1, 5):
            assert await fresh.get_block(h) == await a.node.get_block(h)
        assert await fresh.list_txs(0, 100) == await a.node.list_txs(0, 100)
        # its own checkpoint at the head has the same body as the source's
        ours, theirs = await fresh.checkpoint(), await a.node.checkpoint()
        assert ours.split("\n\n")[0] == theirs.split("\n\n")[0]
        report = await fresh._run(lambda: verify_ledger(fresh.store))
        assert report.ok and report.blocks == 5 and report.transactions == 20, report.failure
        # and it goes on from there: the next ordered block gives the same header on both
        txs = c.orgs[0].anchor(1, c.genesis["time"] + 9000)
        await c.lockstep(txs, members=[a])
        res = await fresh.commit_batch(
            txs, block_time=a.node.head.time, proposer=c.orgs[0].node_key.key_id
        )
        assert not isinstance(res[0], Exception)
        assert fresh.head.to_bytes() == a.node.head.to_bytes()
    finally:
        await client.close()
        await fresh.close()
        await a.node.close()


async def bundles(node: Node) -> list[BlockBundle]:
    return await _nodeio.block_bundles(node, 1, 100)


@pytest.mark.parametrize(
    "damage", ["tx-byte", "drop-tx", "header", "foreign-proposer", "foreign-sig", "swap-tx"]
)
async def test_damaged_blocks_are_refused_and_nothing_is_committed(
    tmp_path: Path, damage: str
) -> None:
    c = await source(tmp_path, blocks=2)
    a = c.members[0]
    fresh = await Node.create(
        f"sqlite:///{tmp_path / 'fresh.db'}", c.genesis, [("org-2", c.orgs[1].node_key)]
    )
    try:
        good = await bundles(a.node)
        await verify_and_append(fresh, good[0])
        b = good[1]
        if damage == "tx-byte":
            raw = bytearray(b.txs[1])
            raw[-5] ^= 0x01
            bad = replace(b, txs=(b.txs[0], bytes(raw), *b.txs[2:]))
        elif damage == "drop-tx":
            bad = replace(b, txs=b.txs[:-1])
        elif damage == "header":
            hdr = BlockHeader.from_bytes(b.header)
            bad = replace(b, header=replace(hdr, state_root=bytes(32)).to_bytes())
        elif damage == "foreign-sig":
            # the genuine header, signed by a key that is no member's node key
            bad = replace(b, sig=BlockHeader.from_bytes(b.header).sign(SigningKey.generate()))
        elif damage == "foreign-proposer":
            # re-signed by a key that is no node key on the ledger
            hdr = BlockHeader.from_bytes(b.header)
            rogue = SigningKey.generate()
            forged = replace(hdr, proposer=rogue.key_id)
            bad = replace(b, header=forged.to_bytes(), sig=forged.sign(rogue))
        else:
            # a valid, signed transaction of the right signer, but not the one ordered:
            # the header (log root) no longer matches, although the signature is genuine
            other = c.orgs[0].anchor(1, BlockHeader.from_bytes(b.header).time, tag="other")
            c.orgs[0].seq -= 1
            bad = replace(b, txs=(*b.txs[:2], other[0].raw, *b.txs[3:]))
            assert bad.txs[2] != b.txs[2]
        before = fresh.head.to_bytes()
        with pytest.raises(BlockVerificationError):
            await verify_and_append(fresh, bad)
        assert fresh.head.to_bytes() == before
        assert await fresh.state_get(b"anchor/") is None
        # the genuine block still applies afterwards: nothing of the bad one was kept
        await verify_and_append(fresh, b)
        assert fresh.head.to_bytes() == a.node.head.to_bytes()
    finally:
        await fresh.close()
        await a.node.close()


class Corrupting(PeerService):
    """A peer that serves blocks with one byte of a transaction flipped."""

    async def blocks(self, start: int, limit: int) -> dict[str, Any]:
        doc = await super().blocks(start, limit)
        for b in doc["blocks"]:
            if b["txs"]:
                raw = bytearray(b["txs"][0])
                raw[-3] ^= 0x40
                b["txs"][0] = bytes(raw)
        return doc


async def test_a_bad_peer_is_dropped_and_a_good_one_used(tmp_path: Path) -> None:
    c = await source(tmp_path)
    a = c.members[0]
    # the bad peer has the same chain (it is a second view of the same node's store)
    liar_service = Corrupting(a.node, org="org-3", key=c.orgs[2].node_key, monitor=a.monitor)
    liar = create_peer_app(liar_service)
    fresh = await Node.create(
        f"sqlite:///{tmp_path / 'fresh.db'}", c.genesis, [("org-2", c.orgs[1].node_key)]
    )
    # org-3 (the liar) is listed first, and reports the same height
    client = client_for("org-2", c.orgs[1].node_key, {"org-3": liar, "org-1": a.app})
    try:
        catchup = CatchUp(fresh, client)
        summary = await catchup.run()
        assert summary["to"] == 4 and summary["sources"] == ["org-1"]
        assert "org-3" in summary["bad_peers"]
        assert fresh.head.to_bytes() == a.node.head.to_bytes()
        report = await fresh._run(lambda: verify_ledger(fresh.store))
        assert report.ok and report.blocks == 5, report.failure
    finally:
        await client.close()
        await fresh.close()
        await a.node.close()


async def test_catch_up_to_a_target_and_unreachable_peers(tmp_path: Path) -> None:
    c = await source(tmp_path)
    a = c.members[0]
    fresh = await Node.create(
        f"sqlite:///{tmp_path / 'fresh.db'}", c.genesis, [("org-2", c.orgs[1].node_key)]
    )
    client = PeerClient(
        network=NETWORK,
        org="org-2",
        key=c.orgs[1].node_key,
        peers={"org-1": "http://org-1.test", "org-3": "http://127.0.0.1:9"},
        transports={"org-1": httpx.ASGITransport(app=a.app)},
        timeout=2.0,
    )
    try:
        assert (await CatchUp(fresh, client).run(target=2))["to"] == 2
        assert fresh.head.height == 2
        with pytest.raises(Exception, match="no peer served up to 9"):
            await CatchUp(fresh, client).run(target=9)
        assert fresh.head.height == 4  # took what there was
    finally:
        await client.close()
        await fresh.close()
        await a.node.close()
