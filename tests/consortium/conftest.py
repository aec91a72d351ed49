"""In-process consortium helpers: several nodes with their own SQLite stores.

``lockstep`` commits the same transactions on every node with the same block
time and proposer, as an external orderer would, so the nodes derive identical
chains without etcd; peer APIs are reached through httpx's ASGI transport.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from medledger.consortium.client import PeerClient
from medledger.consortium.gossip import CheckpointBook, ConsortiumMonitor, Gossip
from medledger.consortium.peer import PeerService, create_peer_app
from medledger.crypto.kem import EncryptionKey
from medledger.crypto.signing import ALG_X25519, SigningKey
from medledger.ledger.tx import Transaction, make_tx
from medledger.node import Node

NETWORK = "medledger-ctest"


@dataclass
class Org:
    id: str
    node_key: SigningKey
    enc: EncryptionKey
    admin: SigningKey
    seq: int = 0

    def anchor(self, n: int, t: int, tag: str = "") -> list[Transaction]:
        """``n`` note.anchor transactions signed by the admin (next sequence numbers)."""
        out = []
        for _ in range(n):
            self.seq += 1
            digest = hashlib.sha256(f"{self.id}/{tag}/{self.seq}".encode()).digest()
            out.append(
                make_tx(
                    self.admin,
                    NETWORK,
                    "note.anchor",
                    {"digest": digest, "kind": "document"},
                    seq=self.seq,
                    time=t,
                )
            )
        return out


def make_orgs(n: int) -> list[Org]:
    return [
        Org(
            f"org-{i + 1}",
            SigningKey.generate(),
            EncryptionKey.generate(ALG_X25519),
            SigningKey.generate(),
        )
        for i in range(n)
    ]


def genesis_doc(orgs: Sequence[Org], policy: dict[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "network": NETWORK,
        "time": int(time.time() * 1000) - 60_000,
        "orgs": [
            {
                "id": o.id,
                "name": o.id.upper(),
                "node_key": o.node_key.public.raw,
                "enc_key": o.enc.public.raw,
                "enc_alg": o.enc.public.alg,
            }
            for o in orgs
        ],
        "admins": [{"id": f"admin-{o.id}", "org": o.id, "key": o.admin.public.raw} for o in orgs],
    }
    if policy:
        doc["policy"] = policy
    return doc


@dataclass
class Member:
    org: Org
    node: Node
    monitor: ConsortiumMonitor
    book: CheckpointBook
    service: PeerService
    app: Any
    client: PeerClient | None = None
    gossip: Gossip | None = None


@dataclass
class Consortium:
    orgs: list[Org]
    genesis: dict[str, Any]
    members: list[Member] = field(default_factory=list)
    clock: int = 0

    def by_org(self, org: str) -> Member:
        return next(m for m in self.members if m.org.id == org)

    async def lockstep(
        self, txs: Sequence[Transaction], *, members: Sequence[Member] | None = None
    ) -> None:
        """Commit ``txs`` as one block on every node (proposed by the first org)."""
        self.clock += 1000
        t = self.genesis["time"] + self.clock
        proposer = self.orgs[0].node_key.key_id
        for m in members if members is not None else self.members:
            res = await m.node.commit_batch(list(txs), block_time=t, proposer=proposer)
            assert all(not isinstance(r, Exception) for r in res), res

    def connect(self, member: Member, peers: Sequence[Member] | None = None) -> PeerClient:
        """A peer client of ``member`` reaching the other members' apps in-process."""
        others = [m for m in (peers if peers is not None else self.members) if m is not member]
        client = PeerClient(
            network=NETWORK,
            org=member.org.id,
            key=member.org.node_key,
            peers={m.org.id: f"http://{m.org.id}.test" for m in others},
            transports={m.org.id: httpx.ASGITransport(app=m.app) for m in others},
        )
        member.client = client
        member.gossip = Gossip(member.node, member.book, client, member.monitor, interval=0.05)
        return client


async def add_member(
    c: Consortium, tmp: Path, org: Org, *, start: bool = False, **service: Any
) -> Member:
    url = f"sqlite:///{tmp / (org.id + '.db')}"
    node = await Node.create(url, c.genesis, [(org.id, org.node_key)])
    if start:
        await node.start()
    monitor = ConsortiumMonitor(org.id, phase="serving")
    book = CheckpointBook(node, monitor)
    svc = PeerService(node, org=org.id, key=org.node_key, monitor=monitor, book=book, **service)
    m = Member(org, node, monitor, book, svc, create_peer_app(svc))
    c.members.append(m)
    return m


@pytest.fixture
async def consortium(tmp_path: Path) -> AsyncIterator[Consortium]:
    """Three lockstep nodes (org-1..3), each with its peer app and a gossip client."""
    orgs = make_orgs(3)
    c = Consortium(orgs, genesis_doc(orgs))
    for org in orgs:
        await add_member(c, tmp_path, org)
    for m in c.members:
        c.connect(m)
    try:
        yield c
    finally:
        for m in c.members:
            if m.client is not None:
                await m.client.close()
            await m.node.close()
