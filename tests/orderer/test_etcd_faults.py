"""Fault tests against real etcd processes: lose one member, then the quorum, then recover.

Under a steady load from background tasks (each client resubmits the same signed
transaction after an error until it is committed, as a client should):

* kill one of three members: writes go on;
* kill a second: submits fail with OrdererError within a bounded time and no
  acknowledgement is given;
* restart both: writes resume; every acknowledged transaction is on the ledger of
  every node, once, and both nodes hold byte-identical chains.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from etcd_cluster import EtcdCluster
from medledger.errors import OrdererError, ReplayedTransaction
from medledger.node import Node

from .conftest import Network, Signer
from .test_etcd_chain import chain

SUBMIT_TIMEOUT = 3.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path / "etcd", size=3) as c:
        yield c


@dataclass
class Load:
    acked: dict[bytes, float] = field(default_factory=dict)  # tx id -> time of its receipt
    committed_unacked: set[bytes] = field(default_factory=set)
    errors: list[tuple[float, OrdererError]] = field(default_factory=list)
    stop: bool = False
    failed: asyncio.Event = field(default_factory=asyncio.Event)  # set on each OrdererError

    async def client(self, node: Node, signer: Signer) -> None:
        while not self.stop:
            tx = signer.anchor()
            while True:
                try:
                    await node.submit(tx)
                except OrdererError as exc:
                    self.errors.append((time.monotonic(), exc))
                    self.failed.set()
                    await asyncio.sleep(0.1)
                    continue  # resubmit the same transaction: duplicates are refused
                except ReplayedTransaction:
                    self.committed_unacked.add(tx.tx_id)  # an earlier attempt committed it
                else:
                    self.acked[tx.tx_id] = time.monotonic()
                break

    def acks_between(self, t0: float, t1: float = float("inf")) -> int:
        return sum(1 for t in self.acked.values() if t0 <= t < t1)


async def test_etcd_member_faults_under_load(tmp_path: Path, cluster: EtcdCluster) -> None:
    m = cluster.endpoints
    net = Network(tmp_path, f"etcd://{m[0]},{m[1]},{m[2]}/faults")
    options = {"submit_timeout": SUBMIT_TIMEOUT, "request_timeout": 1.0}
    try:
        # a talks to member 0 first, b to member 2: killing 0 forces a to fail over
        a = await net.node("h1", **options)
        b = await net.start(
            await net.create("h2"), f"etcd://{m[2]},{m[1]},{m[0]}/faults", **options
        )
        load = Load()
        clients = [
            asyncio.create_task(load.client(a, net.signer("h1"))),
            asyncio.create_task(load.client(a, net.signer("h3"))),
            asyncio.create_task(load.client(b, net.signer("h2"))),
        ]
        await asyncio.sleep(1.5)
        assert load.acks_between(0) > 10

        # one member down: writes go on (after failover / a new election)
        t_kill1 = time.monotonic()
        cluster.kill(0)
        await asyncio.sleep(3.5)
        assert load.acks_between(t_kill1 + 0.1) > 10, "writes stopped with 2 of 3 members up"

        # two members down: no quorum; submits fail with a clear error, nothing is acked
        t_kill2 = time.monotonic()
        cluster.kill(1)
        load.failed.clear()
        await asyncio.wait_for(load.failed.wait(), SUBMIT_TIMEOUT + 3.0)
        failures = [e for t, e in load.errors if t > t_kill2]
        assert failures, "no submit failed within the bounded time after losing quorum"
        assert "not committed within" in str(failures[0])
        assert "Nothing was acknowledged" in str(failures[0])
        await asyncio.sleep(1.5)
        t_restore = time.monotonic()
        assert load.acks_between(t_kill2 + 1.0, t_restore) == 0, "acknowledged without quorum"

        # members return: writes resume
        cluster.restart(0)
        cluster.restart(1)
        await cluster.wait_healthy_async()
        t_healthy = time.monotonic()
        await asyncio.sleep(3.0)
        assert load.acks_between(t_restore) > 10, "writes did not resume"
    finally:
        load.stop = True
        await asyncio.wait(clients, timeout=SUBMIT_TIMEOUT + 5)
        for task in clients:
            task.cancel()

    try:
        for n in (a, b):
            await asyncio.wait_for(n.orderer.sync(), 10)
        ca, cb = await chain(a), await chain(b)
        assert ca == cb
        on_ledger = [raw for _h, txs in ca for _i, raw, _r in txs]
        assert len(on_ledger) == len(set(on_ledger))
        for tx_id in load.acked:
            ra, rb = await a.get_tx(tx_id), await b.get_tx(tx_id)
            assert ra.index == rb.index
        assert len(load.acked) > 30
        print(
            f"acked {len(load.acked)}, errors {len(load.errors)}, "
            f"recovered {t_healthy - t_restore:.1f}s after restart"
        )
    finally:
        await net.close()
