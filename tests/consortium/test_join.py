"""A new organisation joins a running consortium: keys, proposal, approval, catch-up, service."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import typer
from typer.testing import CliRunner

from medledger.cli_network import node_app
from medledger.consortium.config import GossipConfig, HttpEndpoint, NodeConfig, PeerRef, dump_config
from medledger.consortium.network import free_port
from medledger.crypto.keystore import Keystore
from medledger.encoding import decode, encode
from medledger.ledger.tx import make_tx

from .procs import Load, LocalNetwork

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str) -> Result:
    """Run ``medledger node ...`` in this process (as the CLI would)."""
    app = typer.Typer()
    app.add_typer(node_app, name="node")
    res = CliRunner().invoke(app, list(args))
    return Result(res.exit_code, res.stdout, str(res.exception or ""))


def spawn(base: Path) -> subprocess.Popen[bytes]:
    with (base / "node.log").open("wb") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "medledger.consortium.process",
                "--config",
                str(base / "node.toml"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


async def test_a_new_organisation_joins_and_catches_up_from_peers(tmp_path: Path) -> None:
    net = await asyncio.to_thread(
        LocalNetwork, tmp_path, sqlite=True, load_keys=1, orderer_options={"compact_interval": 1.0}
    )
    proc: subprocess.Popen[bytes] | None = None
    try:
        await asyncio.to_thread(net.start)
        load = Load(net, batch=10)
        load.start([(o, net.load_keys(o)[0]) for o in net.orgs])
        await asyncio.sleep(1)
        # the joining organisation makes its keys and hands over the public parts
        base = tmp_path / "org-4"
        keys = await asyncio.to_thread(
            cli, "node", "keys", "--data-dir", str(base / "data"), "--org", "org-4", "--json"
        )
        assert keys.returncode == 0, keys.stderr
        await asyncio.to_thread((base / "keys.json").write_text, keys.stdout)
        public = json.loads(keys.stdout)
        assert set(public) == {"org", "node_key", "enc_key", "enc_alg", "admin_key"}
        # org-1 proposes, org-2 approves: 2 of 3 members is a majority
        cfg1, cfg2 = net.node("org-1")["config"], net.node("org-2")["config"]
        prop = await asyncio.to_thread(
            cli, "node", "org-add", "--config", cfg1, "--keys", str(base / "keys.json"), "--json"
        )
        assert prop.returncode == 0, prop.stderr
        proposal = json.loads(prop.stdout)["proposal"]
        appr = await asyncio.to_thread(cli, "node", "org-approve", proposal, "--config", cfg2)
        assert appr.returncode == 0, appr.stderr
        await asyncio.sleep(1.5)  # more blocks; etcd history is compacted every second
        await load.stop()
        # the new node: the network's genesis, its own store, the members as peers
        shutil.copy(Path(net.node("org-1")["data_dir"]) / "genesis.json", base / "data")
        cfg = NodeConfig(
            network=net.network,
            org="org-4",
            data_dir=base / "data",
            store=f"sqlite:///{base / 'data' / 'ledger.db'}",
            records=f"sqlite:///{base / 'data' / 'records.db'}",
            orderer=net.layout["orderer"],
            api=HttpEndpoint("127.0.0.1", free_port(), enabled=False),
            peer=HttpEndpoint("127.0.0.1", free_port()),
            peers=tuple(PeerRef(n["org"], n["peer"]) for n in net.layout["nodes"]),
            gossip=GossipConfig(interval=0.5),
        )
        (base / "node.toml").write_text(dump_config(cfg))
        proc = await asyncio.to_thread(spawn, base)
        url = cfg.peer.url
        deadline = time.monotonic() + 90
        health = None
        async with httpx.AsyncClient(timeout=5) as http:
            while time.monotonic() < deadline:
                assert proc.poll() is None, (base / "node.log").read_text()[-3000:]
                try:
                    health = (await http.get(url + "/health")).json()
                except httpx.HTTPError:
                    health = None
                if health and health["phase"] == "serving" and len(health["agreeing"]) == 3:
                    break
                await asyncio.sleep(0.3)
            assert health is not None and health["phase"] == "serving", health
            text = (base / "node.log").read_text()
            assert "catch-up: height 0 ->" in text, text[-3000:]
            assert health["members"] == 4
            assert health["agreeing"] == ["org-1", "org-2", "org-3"]
            converged = await net.converged(within=30)
            assert health["height"] <= converged[0]["height"]
            # the new member writes through its own node (signed by its node key)
            key = Keystore(base / "data" / "keys").load("node-org-4").signing
            tx = make_tx(
                key,
                net.network,
                "note.anchor",
                {"digest": b"\x04" * 32, "kind": "document"},
                seq=1,
                time=int(time.time() * 1000),
            )
            resp = await http.post(url + "/ledger/v1/txs", content=encode([tx.raw]))
            (res,) = decode(resp.content)
            assert res["ok"], res
            # and every node has it
            await asyncio.sleep(1)
            for org in net.orgs:
                h = await net.health(org)
                assert h is not None and h["height"] >= res["height"]
    finally:
        if proc is not None:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 20)
        await asyncio.to_thread(net.close)
