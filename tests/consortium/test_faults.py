"""Fault tests against real processes: etcd members and node processes on loopback.

One PostgreSQL-backed network serves the first two tests (in order): a node
killed with SIGKILL under load and restarted, then a node whose database is
wiped and which must catch up from peers' blocks after etcd compaction. The
tamper test gets its own network.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aetcd
import psycopg
import pytest

from medledger.contracts.core import k_seq
from medledger.ledger.checkpoint import checkpoint_of
from medledger.store import open_store

from .procs import Load, LocalNetwork

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    net = LocalNetwork(tmp_path_factory.mktemp("faults"), orderer_options={"compact_interval": 1.0})
    try:
        net.start()
        yield net
    finally:
        net.close()


def stored(net: LocalNetwork, org: str, tx_ids: list[bytes]) -> tuple[list[bytes], int, str]:
    """(missing tx ids, head height, checkpoint body at the head) read from the node's store."""
    store = open_store(net.node(org)["store"])
    try:
        missing = [t for t in tx_ids if not store.has_tx(t)]
        head = store.head_height()
        assert head is not None
        got = store.get_checkpoint(head)
        assert got is not None
        return missing, head, checkpoint_of(got[1]).to_text()
    finally:
        store.close()


async def assert_all_hold(net: LocalNetwork, acked: list[bytes], height: int) -> None:
    """Every node's store holds every acknowledged transaction, at ``height``, with the
    same checkpoint body."""
    bodies = set()
    for org in net.orgs:
        missing, head, body = await asyncio.to_thread(stored, net, org, acked)
        assert not missing, f"{org} lost {len(missing)} acknowledged transactions"
        assert head == height
        bodies.add(body)
    assert len(bodies) == 1


async def test_kill_9_a_node_under_load_loses_nothing(shared: LocalNetwork) -> None:
    net = shared
    load = Load(net, batch=10, pause=0.05)
    load.start([(org, net.load_keys(org)[0]) for org in net.orgs])
    await asyncio.sleep(3)
    before = len(load.acked)
    net.kill("org-2")  # SIGKILL: no shutdown at all
    t_kill = time.monotonic()
    await asyncio.sleep(3)
    during = sum(1 for t in load.acked.values() if t > t_kill)
    await asyncio.to_thread(net.start)  # restarts the dead node and waits until it serves
    await asyncio.sleep(2)
    await load.stop()
    assert before > 100 and during > 100, (before, during, load.errors[-5:])
    healths = await net.converged(within=60)
    # identical checkpoints: same body on every node, co-signed by all three
    acked = list(load.acked)
    await asyncio.sleep(2 * 0.5 + 0.5)  # a gossip round or two
    for org in net.orgs:
        h = await net.health(org)
        assert h is not None and h["status"] == "ok" and h["writes"]
        assert h["agreeing"] == [o for o in net.orgs if o != org]
    await assert_all_hold(net, acked, healths[0]["height"])
    assert len(acked) > 200
    # and every node's ledger verifies from genesis
    for org in net.orgs:
        report = await asyncio.to_thread(verify, net, org)
        assert report.returncode == 0, report.stdout + report.stderr


async def test_a_wiped_node_catches_up_from_peers_after_compaction(shared: LocalNetwork) -> None:
    net = shared
    net.kill("org-3")
    # forget org-3 in etcd (it would otherwise hold compaction back) and wipe its database
    endpoints = net.layout["etcd"]["members"]
    async with aetcd.Client(host="127.0.0.1", port=endpoints[0]["client_port"]) as client:
        await client.delete(f"/medledger/{net.network}/applied/org-3".encode())
    dbname = net.node("org-3")["store"].rsplit("/", 1)[1]
    with psycopg.connect(net.node("org-3")["store"], autocommit=True) as conn:
        conn.execute(
            "DROP TABLE IF EXISTS ledger_meta, ledger_blocks, ledger_txs, ledger_tree, "
            "ledger_state, ledger_smt, ledger_checkpoints CASCADE"
        )
    assert dbname
    load = Load(net, batch=20)
    load.start([(org, key) for org in ("org-1", "org-2") for key in net.load_keys(org)])
    await asyncio.sleep(4)  # the other nodes compact etcd every second
    await load.stop()
    async with aetcd.Client(host="127.0.0.1", port=endpoints[0]["client_port"]) as client:
        with pytest.raises(aetcd.RevisionCompactedError):
            watch = await client.watch_prefix(
                f"/medledger/{net.network}/proposals/".encode(), start_revision=2
            )
            async for _ in watch:
                break
    log = Path(net.node("org-3")["log"])
    mark = (await asyncio.to_thread(log.stat)).st_size
    await asyncio.to_thread(net.start)
    healths = await net.converged(within=60)
    text = (await asyncio.to_thread(log.read_text))[mark:]
    assert "catch-up: height 0 ->" in text, text[-3000:]
    assert healths[2]["height"] > 10
    acked = list(load.acked)
    missing, _, _ = await asyncio.to_thread(stored, net, "org-3", acked)
    assert not missing
    # and it orders new transactions again through etcd
    more = Load(net, batch=5)
    more.start([("org-3", net.keys("org-3", ["admin-org-3"])[0])])  # a key unused so far
    await asyncio.sleep(2)
    await more.stop()
    assert more.acked, more.errors[-5:]
    await net.converged(within=30)


def verify(net: LocalNetwork, org: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "medledger.cli",
            "verify",
            "--json",
            "--data-dir",
            net.node(org)["data_dir"],
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


async def test_a_flipped_byte_in_postgres_is_caught(tmp_path: Path) -> None:
    net = await asyncio.to_thread(LocalNetwork, tmp_path, load_keys=2)
    try:
        await asyncio.to_thread(net.start)
        keys = net.load_keys("org-1")
        load = Load(net, batch=10)
        load.start([("org-1", k) for k in keys])  # every block proposed by org-1
        await asyncio.sleep(3)
        await load.stop()
        await net.converged()
        assert (await asyncio.to_thread(verify, net, "org-1")).returncode == 0
        net.kill("org-1")
        # flip one bit of a state row (the sequence number of a load key) in org-1's database
        key = k_seq(keys[0].key_id)
        with psycopg.connect(net.node("org-1")["store"], autocommit=True) as conn:
            (value,) = conn.execute("SELECT v FROM ledger_state WHERE k = %s", (key,)).fetchone()
            flipped = bytearray(value)
            flipped[-1] ^= 0x01
            conn.execute("UPDATE ledger_state SET v = %s WHERE k = %s", (bytes(flipped), key))
        report = await asyncio.to_thread(verify, net, "org-1")
        assert report.returncode == 1
        failure = json.loads(report.stdout)["failure"]
        assert failure["what"] == "state row" and "altered" in failure["message"]
        await asyncio.to_thread(net.start)
        # the next transactions of that key are refused by org-1 only: its chain forks
        load = Load(net, batch=10)
        load.start([("org-1", k) for k in keys])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            h1, h2, h3 = [await net.health(o) for o in net.orgs]
            if (
                h1
                and h2
                and h3
                and not h1["writes"]
                and h2["divergent_peers"] == ["org-1"]
                and h3["divergent_peers"] == ["org-1"]
            ):
                break
            await asyncio.sleep(0.3)
        await load.stop()
        h1, h2, h3 = [await net.health(o) for o in net.orgs]
        assert h1 is not None and h2 is not None and h3 is not None
        assert (
            h2["divergent_peers"] == ["org-1"] and h2["writes"] and h2["status"] == "peer-divergent"
        )
        assert h3["divergent_peers"] == ["org-1"] and h3["writes"]
        assert not h1["writes"] and h1["status"] == "divergent"
        assert h1["divergent_peers"] == ["org-2", "org-3"]
        d = h2["peers"]["org-1"]["diverged"]
        assert "state root" in d["differs"] or "log root" in d["differs"]
        # the halted node refuses writes; its CLI status says so
        status = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "medledger.cli_network",
                "node",
                "status",
                "--config",
                net.node("org-1")["config"],
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert status.returncode == 1 and "DIVERGENCE" in status.stderr
        log = await asyncio.to_thread(Path(net.node("org-1")["log"]).read_text)
        assert "CRITICAL" in log and "DIVERGENCE" in log
    finally:
        await asyncio.to_thread(net.close)
