"""Checkpoint gossip between in-process nodes: co-signatures and divergence."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest

from medledger.consortium.client import PeerRequestError
from medledger.consortium.gossip import member_verifiers, merge_notes
from medledger.contracts.core import k_seq
from medledger.encoding import encode
from medledger.errors import CheckpointError
from medledger.ledger.checkpoint import checkpoint_of, verify_checkpoint
from medledger.ledger.note import open_note
from medledger.ledger.verify import verify_ledger
from medledger.node import Node

from .conftest import Consortium


async def verifiers(c: Consortium) -> list:  # type: ignore[type-arg]
    found = await c.members[0].node.read(lambda s: member_verifiers(s, c.genesis["network"]))
    return list(found.values())


async def test_agreeing_nodes_cosign_each_others_checkpoints(consortium: Consortium) -> None:
    c = consortium
    for _ in range(3):
        await c.lockstep(c.orgs[0].anchor(5, c.genesis["time"] + c.clock + 1000))
    for m in c.members:
        assert m.gossip is not None
        await m.gossip.round()
    vs = await verifiers(c)
    notes = []
    for m in c.members:
        height, note = await m.book.latest()
        assert height == 3
        opened = open_note(note, vs)
        assert len(opened.verified) == 3  # its own signature and both peers'
        assert verify_checkpoint(note, vs, quorum=3, origin=m.node.origin).size == 15
        assert m.monitor.status == "ok" and m.monitor.writes_allowed
        assert m.monitor.agreeing_peers == sorted(o.id for o in c.orgs if o is not m.org)
        assert m.monitor.cosigned_height == 3 and len(m.monitor.cosigned_by) == 3
        notes.append(checkpoint_of(note).to_text())
        # the co-signed note replaced the stored one
        assert (await m.node.checkpoint()) == note
    assert len(set(notes)) == 1
    # and every ledger, co-signed checkpoints included, still verifies
    for m in c.members:
        report = await m.node._run(lambda m=m: verify_ledger(m.node.store))
        assert report.ok and report.checkpoints == 3, report.failure


async def test_a_lagging_peer_cosigns_the_height_it_has(consortium: Consortium) -> None:
    c = consortium
    a, b, lagging = c.members
    await c.lockstep(c.orgs[0].anchor(2, c.genesis["time"] + 1000))
    await c.lockstep(c.orgs[0].anchor(2, c.genesis["time"] + 2000), members=[a, b])
    assert a.gossip is not None
    await a.gossip.round()
    # the lagging node answered "behind" with its checkpoint at height 1, which matches ours
    assert a.monitor.peers[lagging.org.id].agreed_height == 1
    assert a.monitor.peers[lagging.org.id].head == 1
    assert a.monitor.peers[b.org.id].agreed_height == 2
    vs = await verifiers(c)
    note1 = await a.book.at(1)
    assert note1 is not None
    names = [sig.name.split("/")[1] for sig in open_note(note1, vs).verified]
    assert names == ["org-1", "org-3"]  # ours, and the lagging node's from its answer
    assert a.monitor.status == "ok"


async def test_a_forked_node_halts_and_the_majority_flags_it(consortium: Consortium) -> None:
    c = consortium
    a, b, forked = c.members
    t = c.genesis["time"]
    await c.lockstep(c.orgs[0].anchor(3, t + 1000))
    # the third node commits a different block at height 2
    saved = c.orgs[0].seq
    await c.lockstep(c.orgs[0].anchor(1, t + 2000, tag="fork"), members=[forked])
    c.orgs[0].seq = saved
    await c.lockstep(c.orgs[0].anchor(1, t + 2000), members=[a, b])
    for m in c.members:
        assert m.gossip is not None
        await m.gossip.round()
    for m in (a, b):
        assert m.monitor.divergent_peers == [forked.org.id]
        assert m.monitor.writes_allowed and m.monitor.status == "peer-divergent"
        d = m.monitor.peers[forked.org.id].divergence
        assert d is not None and d.height == 2
        assert set(d.differs) >= {"log root", "block hash", "state root"}
    assert forked.monitor.divergent_peers == [a.org.id, b.org.id]
    assert not forked.monitor.writes_allowed and forked.monitor.status == "divergent"
    assert "writes are halted" in (forked.monitor.halted_reason or "")
    # /health is loud about it; the ledger endpoint refuses writes
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=forked.app), base_url="http://x"
    ) as http:
        health = await http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "divergent"
        resp = await http.post("/ledger/v1/txs", content=encode([]))
        assert resp.status_code == 503
    # the forked node's checkpoint never gains the others' signatures
    vs = await verifiers(c)
    _, note = await forked.book.latest()
    assert [s.name for s in open_note(note, vs).verified] == [f"{c.genesis['network']}/org-3"]


async def test_tampered_state_shows_up_as_divergence(
    consortium: Consortium, tmp_path: Path
) -> None:
    c = consortium
    tampered, a, b = c.members  # org-1 proposed every block: its own ledger verifies
    t = c.genesis["time"]
    await c.lockstep(c.orgs[1].anchor(2, t + 1000))
    # flip a byte of a state row in org-1's database (org-2's admin's sequence number)
    await tampered.node.close()
    db = sqlite3.connect(tmp_path / "org-1.db")
    key = k_seq(c.orgs[1].admin.key_id)
    (value,) = db.execute("SELECT v FROM state WHERE k=?", (key,)).fetchone()
    assert value == encode(2)
    db.execute("UPDATE state SET v=? WHERE k=?", (bytes([value[0] ^ 0x05]), key))
    db.commit()
    db.close()
    node = await Node.open(f"sqlite:///{tmp_path / 'org-1.db'}", [("org-1", c.orgs[0].node_key)])
    tampered.node = tampered.book.node = tampered.service.node = node
    assert tampered.gossip is not None
    tampered.gossip.node = node
    report = await node._run(lambda: verify_ledger(node.store))
    assert not report.ok and "state row" in str(report.failure), report.failure
    # the next block: org-1 rejects the admin's transaction (sequence 3 is "already used"),
    # the others accept it, so the blocks at height 2 differ
    txs = c.orgs[1].anchor(1, t + 2000) + c.orgs[0].anchor(1, t + 2000)
    await c.lockstep(txs, members=[a, b])
    c.clock -= 1000
    await c.lockstep(txs[1:], members=[tampered])
    res = await node.commit_batch(txs[:1], block_time=t, proposer=c.orgs[0].node_key.key_id)
    assert isinstance(res[0], Exception)
    for m in c.members:
        assert m.gossip is not None
        await m.gossip.round()
    assert a.monitor.divergent_peers == b.monitor.divergent_peers == ["org-1"]
    assert a.monitor.writes_allowed and b.monitor.writes_allowed
    assert not tampered.monitor.writes_allowed
    assert tampered.monitor.divergent_peers == ["org-2", "org-3"]


async def test_cosign_requires_the_callers_signature(consortium: Consortium) -> None:
    c = consortium
    a, b, _ = c.members
    await c.lockstep(c.orgs[0].anchor(1, c.genesis["time"] + 1000))
    _, note_b = await b.book.latest()
    assert a.client is not None
    # org-1 presents org-2's checkpoint as its own: refused (not signed by the caller)
    with pytest.raises(PeerRequestError, match="not a checkpoint signed by org-1"):
        await a.client.cosign("org-2", note_b)
    # an unsigned request is refused before anything else
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=b.app), base_url="http://x"
    ) as h:
        resp = await h.post("/peer/v1/cosign", content=note_b.encode())
        assert resp.status_code == 401 and resp.json()["error"] == "peer-auth"


async def test_merge_notes_checks_texts_and_signatures(consortium: Consortium) -> None:
    c = consortium
    await c.lockstep(c.orgs[0].anchor(1, c.genesis["time"] + 1000))
    vs = await verifiers(c)
    n1 = await c.members[0].book.at(1)
    n2 = await c.members[1].book.at(1)
    n0 = await c.members[1].book.at(0)
    assert n1 and n2 and n0
    merged = merge_notes(n1, n2, vs)
    assert len(open_note(merged, vs).verified) == 2
    assert merge_notes(merged, n2, vs) == merged  # idempotent
    with pytest.raises(CheckpointError, match="different checkpoints"):
        merge_notes(n1, n0, vs)
    forged = n2[:-10] + ("A" if n2[-10] != "A" else "B") + n2[-9:]
    with pytest.raises(CheckpointError):
        merge_notes(n1, forged, vs)
