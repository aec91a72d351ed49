"""The etcd orderer over TLS (``etcds://``), against a real 3-member etcd cluster
that requires client certificates on client and peer traffic."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from etcd_cluster import EtcdCluster
from medledger.errors import OrdererError
from medledger.orderer import make_orderer, parse_etcd_url
from medledger.orderer.etcd import EtcdTLS
from tls_files import TLSFiles, make_tls_files

from .conftest import Network, open_network


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"), "etcd")


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory, tls: TLSFiles) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path_factory.mktemp("etcd-tls"), size=3, tls=tls) as cluster:
        yield cluster


@pytest.fixture
async def tls_net(tmp_path: Path, tls_etcd: EtcdCluster) -> AsyncIterator[Network]:
    async with open_network(tmp_path, f"{tls_etcd.url}/tls") as network:
        yield network


def _tls_options(tls: TLSFiles, **extra: Any) -> dict[str, Any]:
    return {
        "tls_ca": str(tls.ca),
        "tls_cert": str(tls.client_cert),
        "tls_key": str(tls.client_key),
        **extra,
    }


async def test_two_nodes_commit_through_etcd_over_tls(tls_net: Network, tls: TLSFiles) -> None:
    a = await tls_net.node("h1", **_tls_options(tls))
    b = await tls_net.node("h2", **_tls_options(tls))
    signer = tls_net.signer("h1")
    receipts = [await a.submit(signer.anchor()) for _ in range(3)]
    assert [r.height for r in receipts] == sorted(r.height for r in receipts)
    await b.orderer.wait_revision(a.orderer.revision)
    assert b.head.height == a.head.height >= receipts[-1].height
    assert b.head.hash == a.head.hash
    assert (await b.get_tx(receipts[-1].tx_id)).raw == (await a.get_tx(receipts[-1].tx_id)).raw


async def test_without_a_client_certificate_the_members_refuse(
    tls_net: Network, tls: TLSFiles
) -> None:
    node = await tls_net.create("h1")
    with pytest.raises(OrdererError, match="unreachable"):
        await tls_net.start(node, tls_ca=str(tls.ca))
    assert node.head.height == 0


async def test_a_client_that_trusts_another_ca_refuses_the_members(
    tls_net: Network, tmp_path: Path
) -> None:
    other = make_tls_files(tmp_path / "other", "other")
    node = await tls_net.create("h1")
    with pytest.raises(OrdererError, match="unreachable"):
        await tls_net.start(node, **_tls_options(other))


async def test_plaintext_etcd_url_against_tls_members_fails_clearly(
    tls_net: Network, tls_etcd: EtcdCluster
) -> None:
    node = await tls_net.create("h1")
    plain = "etcd://" + ",".join(tls_etcd.endpoints) + "/tls"
    with pytest.raises(OrdererError, match="unreachable"):
        await tls_net.start(node, plain)


def test_etcds_url_parses_like_etcd() -> None:
    assert parse_etcd_url("etcds://a:1,b:2/x") == ([("a", 1), ("b", 2)], "/x")


async def test_make_orderer_checks_tls_options(tls_net: Network, tls: TLSFiles) -> None:
    node = await tls_net.create("h1")
    url = "etcds://127.0.0.1:1"
    with pytest.raises(ValueError, match="tls_ca"):
        make_orderer(url, node)
    with pytest.raises(ValueError, match="etcds"):
        make_orderer("etcd://127.0.0.1:1", node, tls_ca=str(tls.ca))
    with pytest.raises(ValueError, match="cannot read"):
        make_orderer(url, node, tls_ca=str(tls.ca) + ".missing")
    with pytest.raises(ValueError, match="key"):
        make_orderer(url, node, tls_ca=str(tls.ca), tls_cert=str(tls.client_cert))
    orderer = make_orderer(url, node, **_tls_options(tls))
    assert orderer is not None


def test_tls_settings_need_cert_and_key_together(tls: TLSFiles) -> None:
    with pytest.raises(ValueError):
        EtcdTLS(tls.ca.read_bytes(), cert=tls.client_cert.read_bytes())
    full = EtcdTLS.from_files(tls.ca, str(tls.client_cert), str(tls.client_key))
    assert full.cert is not None and full.key is not None
    assert "PRIVATE KEY" not in repr(full)  # the private key is kept out of repr
