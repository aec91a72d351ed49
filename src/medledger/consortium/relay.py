"""Relaying: one member's node proposes the transactions every node receives.

The etcd orderer can hand the transactions a node receives to another node, which
proposes them with its own (see "Relaying" in :mod:`medledger.orderer.etcd`):
every proposal costs every node a block, so one proposer for the consortium makes
fewer, larger blocks than one per node. :class:`PeerRelay` is the node process's
:class:`~medledger.orderer.etcd.Relay`: the proposer is the first organisation,
in sorted order, of this node and the members' nodes not known to be unreachable
or divergent (what gossip last found), so every healthy node picks the same one;
transactions reach it through the peer API (``POST /peer/v1/relay``, signed with
this node's key).
"""

from __future__ import annotations

from collections.abc import Sequence

from medledger.consortium.client import PeerClient
from medledger.consortium.gossip import ConsortiumMonitor

__all__ = ["PeerRelay"]


class PeerRelay:
    """Relay to the first healthy member node in organisation order, over the peer API."""

    def __init__(self, client: PeerClient, monitor: ConsortiumMonitor, wait: float = 5.0) -> None:
        self.client = client
        self.monitor = monitor
        self.wait = wait

    def proposers(self) -> list[str]:
        eligible = [self.client.org]
        for org in self.client.peers:
            state = self.monitor.peers.get(org)
            if state is not None and (state.reachable is False or state.divergence is not None):
                continue
            eligible.append(org)
        return sorted(eligible)

    async def forward(self, org: str, raws: Sequence[bytes]) -> int:
        return await self.client.relay_txs(org, raws, wait=self.wait)
