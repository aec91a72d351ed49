"""The node process wiring, in-process (embedded orderer, SQLite, no FHIR API)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from medledger.consortium.config import HttpEndpoint, NodeConfig
from medledger.consortium.network import free_port
from medledger.consortium.process import NodeProcess
from medledger.datadir import DataDir
from medledger.encoding import decode, encode
from medledger.errors import MedledgerError, OrdererError
from medledger.ledger.tx import Transaction, make_tx


async def make_config(tmp_path: Path) -> NodeConfig:
    dd = DataDir(tmp_path / "data")
    node = await dd.init(network="medledger-proc", org="org-1")
    await node.close()
    return NodeConfig(
        network="medledger-proc",
        org="org-1",
        data_dir=dd.path,
        store=f"sqlite:///{dd.path / 'ledger2.db'}",  # created from the genesis on start
        records=f"sqlite:///{dd.path / 'records.db'}",
        orderer="embedded",
        api=HttpEndpoint("127.0.0.1", free_port(), enabled=False),
        peer=HttpEndpoint("127.0.0.1", free_port()),
    )


@contextlib.asynccontextmanager
async def running(cfg: NodeConfig) -> AsyncIterator[NodeProcess]:
    """A node process opened and running in this event loop; stopped and closed after."""
    proc = NodeProcess(cfg)
    await proc.open()
    stop = asyncio.Event()
    runner = asyncio.create_task(proc.run(stop))
    try:
        yield proc
    finally:
        stop.set()
        await runner
        await proc.close()


async def wait_serving(http: httpx.AsyncClient, tries: int = 200) -> dict[str, Any]:
    """The node's /health once it says ``serving`` (the last answer if it never does)."""
    health: dict[str, Any] = {}
    for _ in range(tries):
        try:
            health = (await http.get("/health")).json()
            if health["phase"] == "serving":
                break
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.05)
    return health


def anchor(cfg: NodeConfig, label: bytes) -> Transaction:
    """The org admin's first ``note.anchor`` (seq 1)."""
    admin = DataDir(cfg.data_dir).identity("admin-org-1").signing
    return make_tx(
        admin,
        cfg.network,
        "note.anchor",
        {"digest": hashlib.sha256(label).digest()},
        seq=1,
        time=int(time.time() * 1000),
    )


async def test_a_node_process_serves_halts_and_stops(tmp_path: Path) -> None:
    cfg = await make_config(tmp_path)
    async with (
        running(cfg) as proc,
        httpx.AsyncClient(base_url=cfg.peer.url, timeout=10) as http,
    ):
        health = await wait_serving(http)
        assert health["org"] == "org-1" and health["members"] == 1 and health["writes"]
        assert health["fhir"] is False and health["orderer"]["running"]
        admin = DataDir(cfg.data_dir).identity("admin-org-1").signing
        seq = (await http.get(f"/ledger/v1/seq/{admin.key_id.hex()}")).json()["seq"]
        assert seq == 0
        tx = anchor(cfg, b"p")
        (res,) = decode((await http.post("/ledger/v1/txs", content=encode([tx.raw]))).content)
        assert res["ok"] and res["height"] == 1
        (again,) = decode((await http.post("/ledger/v1/txs", content=encode([tx.raw]))).content)
        assert again["error"] == "replayed"
        assert (await http.get(f"/ledger/v1/seq/{admin.key_id.hex()}")).json()["seq"] == 1
        # a second process on the same data directory is refused
        with pytest.raises(MedledgerError, match="in use"):
            await NodeProcess(cfg).open()
        # halted: the shared submitter and the ledger endpoint refuse writes
        proc.monitor.set_halted("test")
        assert proc.submitter is not None
        with pytest.raises(OrdererError, match="halted"):
            await proc.submitter.submit(admin, "note.anchor", {"digest": bytes(32)})
        assert proc.node is not None and proc.node.halted == "test"
        with pytest.raises(OrdererError, match="test"):
            await proc.node.submit(tx)
        resp = await http.post("/ledger/v1/txs", content=encode([tx.raw]))
        assert resp.status_code == 503
        assert (await http.get("/health")).status_code == 503
    assert proc.monitor.phase == "stopping"


async def test_a_node_process_says_serving_only_once_its_fhir_api_listens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whoever waits for the phase `serving` (`medledger network up`, the tests) then uses
    # the FHIR API at once: while the record store is being settled the node says
    # `preparing`, and nothing listens on the FHIR port yet.
    from dataclasses import replace

    cfg = replace(await make_config(tmp_path), api=HttpEndpoint("127.0.0.1", free_port()))
    proc = NodeProcess(cfg)
    await proc.open()
    assert proc.runtime is not None and proc.fhir_app is not None
    release = asyncio.Event()
    recover = proc.runtime.records.recover

    async def held_recover() -> tuple[int, int]:
        await release.wait()
        result: tuple[int, int] = await recover()
        return result

    monkeypatch.setattr(proc.runtime.records, "recover", held_recover)
    stop = asyncio.Event()
    runner = asyncio.create_task(proc.run(stop))
    try:
        async with (
            httpx.AsyncClient(base_url=cfg.peer.url, timeout=10) as peer,
            httpx.AsyncClient(base_url=cfg.api.url, timeout=10) as api,
        ):
            health: dict[str, Any] = {}
            for _ in range(200):
                with contextlib.suppress(httpx.HTTPError):
                    health = (await peer.get("/health")).json()
                    if health["phase"] not in ("starting", "catching-up"):
                        break
                await asyncio.sleep(0.05)
            assert health["phase"] == "preparing", health
            with pytest.raises(httpx.ConnectError):
                await api.get("/fhir/metadata")
            release.set()
            assert (await wait_serving(peer))["phase"] == "serving"
            meta = await api.get("/fhir/metadata")
            assert meta.status_code == 200 and meta.json()["resourceType"] == "CapabilityStatement"
    finally:
        release.set()
        stop.set()
        await runner
        await proc.close()


async def test_a_node_process_orders_through_etcd_over_tls(tmp_path: Path) -> None:
    # node.toml with orderer = "etcds://..." and the TLS files under [orderer_options],
    # written and read back as a file, against a 1-member etcd that requires client
    # certificates: the node process starts, commits and serves over TLS to etcd.
    from dataclasses import replace

    from etcd_cluster import EtcdCluster
    from medledger.consortium.config import dump_config, load_config
    from tls_files import make_tls_files

    tls = make_tls_files(tmp_path / "tls", "etcd")
    with EtcdCluster(tmp_path / "etcd", size=1, tls=tls) as etcd:
        base = await make_config(tmp_path)
        path = tmp_path / "node.toml"
        path.write_text(
            dump_config(
                replace(
                    base,
                    orderer=etcd.url,
                    orderer_options={
                        "tls_ca": "tls/etcd-ca.pem",  # relative to node.toml
                        "tls_cert": str(tls.client_cert),
                        "tls_key": str(tls.client_key),
                    },
                )
            )
        )
        cfg = load_config(path)
        assert cfg.orderer.startswith("etcds://")
        async with (
            running(cfg),
            httpx.AsyncClient(base_url=cfg.peer.url, timeout=10) as http,
        ):
            health = await wait_serving(http)
            assert health["phase"] == "serving"
            assert health["orderer"]["running"]
            body = encode([anchor(cfg, b"tls").raw])
            (res,) = decode((await http.post("/ledger/v1/txs", content=body)).content)
            assert res["ok"] and res["height"] == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tls_ca": "missing-ca.pem"}, "cannot read the etcd TLS CA certificate"),
        (
            {"tls_ca": "missing-ca.pem", "bogus": 1},
            r"not understood by the etcd orderer: \['bogus'\]",
        ),
    ],
)
def test_a_bad_orderer_setting_stops_the_node_with_one_line(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    options: dict[str, Any],
    message: str,
) -> None:
    # what node.toml cannot check by itself (a TLS file that is not there, an option
    # the orderer does not take) ends `medledger node start` with exit status 1 and
    # one error line, not a traceback
    from dataclasses import replace

    from medledger.consortium.config import dump_config
    from medledger.consortium.process import main

    cfg = replace(asyncio.run(make_config(tmp_path)), orderer="etcds://127.0.0.1:1")
    path = tmp_path / "node.toml"
    path.write_text(dump_config(replace(cfg, orderer_options=options)))
    with caplog.at_level("ERROR", logger="medledger.consortium"):
        assert main(["--config", str(path)]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith("config: orderer etcds://127.0.0.1:1: ")
    assert re.search(message, errors[0]), errors[0]
