"""Fixtures for the etcd orderer tests: a real etcd cluster and a 3-organisation network.

* ``etcd``      a 3-member etcd cluster (real processes on free loopback ports), shared
                by the tests of a module; each test uses its own key prefix (``root``);
* ``net``       a :class:`Network`: genesis with three orgs (``h1``, ``h2``, ``h3``), their
                node keys and one admin each; ``await net.node("h1")`` creates a node on
                its own SQLite file and starts it on the etcd orderer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from etcd_cluster import EtcdCluster
from medledger.crypto.signing import SigningKey
from medledger.ledger.tx import Transaction, make_tx
from medledger.node import Node

NETWORK = "medledger-etcd-test"
ORGS = ("h1", "h2", "h3")
_roots = itertools.count(1)


def seeded_key(label: str) -> SigningKey:
    return SigningKey.from_seed(hashlib.sha256(b"etcd-test-key/" + label.encode()).digest())


def now_ms() -> int:
    return int(time.time() * 1000)


class Signer:
    """Signs ``note.anchor`` transactions for one admin key with seq 1, 2, 3, ..."""

    def __init__(self, key: SigningKey, label: str) -> None:
        self.key = key
        self.label = label
        self.seq = 0

    def anchor(self) -> Transaction:
        self.seq += 1
        digest = hashlib.sha256(f"{self.label}/{self.seq}/{time.time_ns()}".encode()).digest()
        return make_tx(
            self.key,
            NETWORK,
            "note.anchor",
            {"digest": digest, "kind": "document"},
            seq=self.seq,
            time=now_ms(),
        )


class Network:
    def __init__(self, base: Path, url: str) -> None:
        self.base = base
        self.url = url
        self.node_keys = {org: seeded_key(f"node-{org}") for org in ORGS}
        self.admin_keys = {org: seeded_key(f"admin-{org}") for org in ORGS}
        self.genesis: dict[str, Any] = {
            "network": NETWORK,
            "time": now_ms() - 1000,
            "orgs": [
                {
                    "id": org,
                    "name": org.upper(),
                    "node_key": self.node_keys[org].public.raw,
                    "enc_key": hashlib.sha256(b"enc/" + org.encode()).digest(),
                }
                for org in ORGS
            ],
            "admins": [
                {"id": f"admin-{org}", "org": org, "key": self.admin_keys[org].public.raw}
                for org in ORGS
            ],
        }
        self.nodes: list[Node] = []
        self._names = itertools.count(1)

    def signer(self, org: str) -> Signer:
        return Signer(self.admin_keys[org], f"admin-{org}")

    def store_url(self, name: str) -> str:
        return f"sqlite:///{self.base / (name + '.db')}"

    async def create(self, org: str, name: str | None = None) -> Node:
        """A node of ``org`` on a new SQLite store (not started)."""
        name = name or f"{org}-{next(self._names)}"
        node = await Node.create(self.store_url(name), self.genesis, [(org, self.node_keys[org])])
        self.nodes.append(node)
        return node

    async def reopen(self, org: str, name: str) -> Node:
        node = await Node.open(self.store_url(name), [(org, self.node_keys[org])])
        self.nodes.append(node)
        return node

    async def start(self, node: Node, url: str | None = None, **options: Any) -> Node:
        opts: dict[str, Any] = {
            "verify_workers": 0,
            "request_timeout": 1.0,
            "submit_timeout": 5.0,
            "report_interval": 0.1,
            "compact_interval": None,
        }
        opts.update(options)
        await node.start(url or self.url, **opts)
        return node

    async def node(self, org: str, name: str | None = None, **options: Any) -> Node:
        return await self.start(await self.create(org, name), **options)

    async def close(self) -> None:
        for node in self.nodes:
            try:
                await node.close()
            except Exception:  # already closed by the test
                pass
        self.nodes.clear()


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), size=3) as cluster:
        yield cluster


@contextlib.asynccontextmanager
async def open_network(tmp_path: Path, url: str) -> AsyncIterator[Network]:
    """A :class:`Network` ordered by the etcd ``url``, closed on the way out."""
    network = Network(tmp_path, url)
    try:
        yield network
    finally:
        await network.close()


@pytest.fixture
async def net(tmp_path: Path, etcd: EtcdCluster) -> AsyncIterator[Network]:
    async with open_network(tmp_path, f"{etcd.url}/t{next(_roots)}") as network:
        yield network


def _await_chain(coro: Any) -> str:
    out = []
    while coro is not None:
        fr = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if fr is not None:
            out.append(f"{fr.f_code.co_name}:{fr.f_lineno}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return " -> ".join(out)


@pytest.fixture(autouse=True)
async def _hang_dump() -> AsyncIterator[None]:
    """Print every task's await chain if a test runs past 45 s (hang diagnostics)."""

    async def dump() -> None:
        await asyncio.sleep(45)
        for task in asyncio.all_tasks():
            print("TASK", task.get_name(), _await_chain(task.get_coro()))

    t = asyncio.create_task(dump())
    yield
    t.cancel()
