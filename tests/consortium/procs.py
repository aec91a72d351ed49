"""A real local consortium for fault tests: etcd members and node processes on loopback.

Built with :mod:`medledger.consortium.network` (the code behind ``medledger
network up``), so the tests exercise exactly what users start. :class:`Load`
submits signed ``note.anchor`` transactions to the nodes' ``/ledger/v1/txs``
endpoints and remembers every acknowledged one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

import pg
from medledger.consortium import network as net
from medledger.crypto.keystore import Keystore
from medledger.crypto.signing import SigningKey
from medledger.encoding import decode, encode
from medledger.ledger.tx import make_tx


class LocalNetwork:
    def __init__(
        self,
        base: Path,
        *,
        orgs: int = 3,
        sqlite: bool = False,
        load_keys: int = 2,
        orderer_options: dict[str, Any] | None = None,
        gossip_interval: float = 0.5,
    ) -> None:
        self.dir = base / "net"
        self.layout = net.create_network(
            self.dir,
            orgs=orgs,
            sqlite=sqlite,
            network="medledger-fault",
            pg_admin=pg.ADMIN_URL,
            load_keys=load_keys,
            gossip_interval=gossip_interval,
            orderer_options=orderer_options,
            fhir=False,
        )
        self.orgs = [n["org"] for n in self.layout["nodes"]]
        self.network = self.layout["network"]

    def node(self, org: str) -> dict[str, Any]:
        return next(n for n in self.layout["nodes"] if n["org"] == org)

    def pids(self) -> dict[str, Any]:
        return json.loads((self.dir / net.PIDS).read_text())

    def start(self, timeout: float = 90.0) -> None:
        net.start_network(self.dir, timeout=timeout)

    def kill(self, org: str, sig: signal.Signals = signal.SIGKILL) -> None:
        pid = int(self.pids()["nodes"][org])
        os.kill(pid, sig)
        deadline = time.monotonic() + 20
        while net._alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not net._alive(pid), f"node {org} did not exit"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            net.stop_network(self.dir, purge=True)

    def keys(self, org: str, names: list[str]) -> list[SigningKey]:
        ks = Keystore(Path(self.node(org)["data_dir"]) / "keys")
        return [ks.load(n).signing for n in names]

    def load_keys(self, org: str) -> list[SigningKey]:
        ks = Keystore(Path(self.node(org)["data_dir"]) / "keys")
        return [ks.load(n).signing for n in sorted(ks.names()) if n.startswith("load-")]

    async def health(self, org: str) -> dict[str, Any] | None:
        async with httpx.AsyncClient(timeout=3) as c:
            try:
                r = await c.get(self.node(org)["peer"] + "/health")
            except httpx.HTTPError:
                return None
            doc: dict[str, Any] = r.json()
            return doc

    async def converged(self, within: float = 30.0, orgs: list[str] | None = None) -> list[Any]:
        """Wait until the nodes serve at the same head with the same roots; their health docs."""
        orgs = orgs or self.orgs
        deadline = time.monotonic() + within
        last: list[Any] = []
        while time.monotonic() < deadline:
            last = [await self.health(o) for o in orgs]
            if all(h is not None and h["phase"] == "serving" for h in last):
                heads = {
                    (h["height"], h["head_hash"], h["log_root"], h["state_root"]) for h in last
                }
                if len(heads) == 1:
                    return last
            await asyncio.sleep(0.3)
        raise AssertionError(f"nodes did not converge: {json.dumps(last)[:2000]}")


@dataclass
class Load:
    """Workers submitting batches of signed transactions, failing over between nodes."""

    net: LocalNetwork
    batch: int = 20
    pause: float = 0.0
    acked: dict[bytes, float] = field(default_factory=dict)
    replayed: set[bytes] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, assignments: list[tuple[str, SigningKey]]) -> None:
        for org, key in assignments:
            self._tasks.append(asyncio.create_task(self._worker(org, key)))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _worker(self, org: str, key: SigningKey) -> None:
        seq = 0
        async with httpx.AsyncClient(timeout=30) as http:
            while not self._stop.is_set():
                now = int(time.time() * 1000)
                txs = []
                for _ in range(self.batch):
                    seq += 1
                    digest = hashlib.sha256(key.key_id + seq.to_bytes(8, "big")).digest()
                    txs.append(
                        make_tx(
                            key,
                            self.net.network,
                            "note.anchor",
                            {"digest": digest, "kind": "document"},
                            seq=seq,
                            time=now,
                        )
                    )
                await self._submit(http, org, txs)
                if self.pause:
                    await asyncio.sleep(self.pause)

    async def _submit(self, http: httpx.AsyncClient, org: str, txs: list[Any]) -> None:
        """Submit until every transaction is acknowledged (or known committed)."""
        pending = {tx.tx_id: tx for tx in txs}
        order = [org] + [o for o in self.net.orgs if o != org]
        attempt = 0
        while pending:
            if attempt > 300:
                self.errors.append(f"gave up on {len(pending)} transactions")
                return
            target = order[attempt % len(order)] if attempt else org
            attempt += 1
            url = self.net.node(target)["peer"] + "/ledger/v1/txs"
            try:
                resp = await http.post(url, content=encode([t.raw for t in pending.values()]))
            except httpx.HTTPError as exc:
                self.errors.append(f"{target}: {type(exc).__name__}")
                await asyncio.sleep(0.1)
                continue
            if resp.status_code != 200:
                self.errors.append(f"{target}: HTTP {resp.status_code}")
                await asyncio.sleep(0.2)
                continue
            for tx, res in zip(list(pending.values()), decode(resp.content), strict=True):
                if res["ok"]:
                    self.acked[tx.tx_id] = time.monotonic()
                    del pending[tx.tx_id]
                elif res["error"] == "replayed" and "already on the ledger" in res["message"]:
                    self.replayed.add(tx.tx_id)
                    del pending[tx.tx_id]
                else:
                    self.errors.append(f"{target}: {res['error']}: {res['message'][:80]}")
                    if res["error"] in ("replayed", "out-of-order", "bad-signature", "malformed"):
                        return  # a bug in the test, not a fault to ride out
            if pending:
                await asyncio.sleep(0.1)
