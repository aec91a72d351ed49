"""``medledger network up / status / down`` and ``node status`` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medledger.cli_network", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def get(url: str) -> tuple[int, dict[str, object]]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_network_up_status_down(tmp_path: Path) -> None:
    d = tmp_path / "net"
    up = cli("network", "up", "--orgs", "3", "--sqlite", "--dir", str(d), "--json")
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        doc = json.loads(up.stdout)
        assert [n["org"] for n in doc["nodes"]] == ["org-1", "org-2", "org-3"]
        assert doc["orderer"].startswith("etcd://") and len(doc["etcd"]) == 3
        pids = [n["pid"] for n in doc["nodes"]] + list(doc["etcd"].values())
        assert all(alive(p) for p in pids)
        for n in doc["nodes"]:
            status, health = get(n["peer"] + "/health")
            assert status == 200 and health["phase"] == "serving" and health["members"] == 3
            status, meta = get(n["fhir"] + "/metadata")
            assert status == 200 and meta["resourceType"] == "CapabilityStatement"
            status, health = get(n["fhir"].removesuffix("/fhir") + "/health")
            assert status == 200 and health["org"] == n["org"]
            assert n["store"].startswith("sqlite:///") and Path(n["config"]).exists()
        st = cli("network", "status", "--dir", str(d))
        assert st.returncode == 0, st.stdout + st.stderr
        assert st.stdout.count("healthy") == 3 and "org-3: " in st.stdout
        ns = cli("node", "status", "--config", doc["nodes"][1]["config"], "--json")
        assert ns.returncode == 0 and json.loads(ns.stdout)["org"] == "org-2"

        down = cli("network", "down", "--dir", str(d))
        assert down.returncode == 0 and "stopped 6 processes" in down.stdout
        assert not any(alive(p) for p in pids)
        st = cli("network", "status", "--dir", str(d))
        assert st.returncode == 1 and "DOWN" in st.stdout
    finally:
        purge = cli("network", "down", "--dir", str(d), "--purge")
    assert purge.returncode == 0, purge.stderr
    assert not d.exists()


def test_errors_are_one_line(tmp_path: Path) -> None:
    res = cli("network", "down", "--dir", str(tmp_path / "nothing"))
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "holds no network" in res.stderr
    bad = tmp_path / "node.toml"
    bad.write_text('network = "x"\n')
    res = cli("node", "status", "--config", str(bad))
    assert res.returncode != 0 and "org is required" in res.stderr


def test_network_up_with_tls_everywhere(tmp_path: Path) -> None:
    import hashlib
    import ssl
    import time

    from medledger.crypto.keystore import Keystore
    from medledger.encoding import decode, encode
    from medledger.ledger.tx import make_tx

    d = tmp_path / "net"
    up = cli(
        "network", "up", "--orgs", "3", "--sqlite", "--tls", "--load-keys", "1", "--dir", str(d)
    )
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        layout = json.loads((d / "network.json").read_text())
        assert layout["orderer"].startswith("etcds://")
        tls = layout["etcd"]["tls"]
        port = layout["etcd"]["members"][0]["client_port"]
        # the members take neither plain HTTP nor TLS without a client certificate
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
        anonymous = ssl.create_default_context(cafile=tls["ca"])
        with pytest.raises(OSError):
            urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=5, context=anonymous)
        st = cli("network", "status", "--dir", str(d))
        assert st.returncode == 0 and st.stdout.count("healthy") == 3, st.stdout + st.stderr
        # the nodes' peer and FHIR APIs serve HTTPS with the network's certificate
        trusted = ssl.create_default_context(cafile=tls["ca"])

        def health(url: str) -> dict[str, Any]:
            with urllib.request.urlopen(url + "/health", timeout=10, context=trusted) as resp:
                doc: dict[str, Any] = json.loads(resp.read())
                return doc

        for n in layout["nodes"]:
            assert n["peer"].startswith("https://") and n["api"].startswith("https://")
            assert health(n["peer"])["phase"] == "serving"
        with pytest.raises(OSError):
            urllib.request.urlopen(layout["nodes"][0]["peer"] + "/health", timeout=5)  # no CA
        node_status = cli("node", "status", "--config", layout["nodes"][1]["config"], "--json")
        assert node_status.returncode == 0 and json.loads(node_status.stdout)["org"] == "org-2"
        # a transaction posted to one node commits on all three, ordered through TLS etcd
        node = layout["nodes"][0]
        key = Keystore(Path(node["data_dir"]) / "keys").load("load-org-1-0").signing
        tx = make_tx(
            key,
            layout["network"],
            "note.anchor",
            {"digest": hashlib.sha256(b"tls").digest()},
            seq=1,
            time=int(time.time() * 1000),
        )
        req = urllib.request.Request(
            node["peer"] + "/ledger/v1/txs", data=encode([tx.raw]), method="POST"
        )
        with urllib.request.urlopen(req, timeout=60, context=trusted) as resp:
            result = decode(resp.read())
        assert result[0]["ok"] is True, result
        height = result[0]["height"]
        deadline = time.monotonic() + 30
        while True:
            healths = [health(n["peer"]) for n in layout["nodes"]]
            # ... and the nodes gossip their checkpoints over HTTPS: every peer reachable
            gossiping = all(all(peer["reachable"] for peer in h["peers"].values()) for h in healths)
            if gossiping and all(int(str(h["height"])) >= height for h in healths):
                if len({h["log_root"] for h in healths}) == 1:
                    break
            assert time.monotonic() < deadline, healths
            time.sleep(0.2)
    finally:
        purge = cli("network", "down", "--dir", str(d), "--purge")
    assert purge.returncode == 0, purge.stderr
