"""medledger.orderer: who decides the order of transactions.

* ``embedded`` (default): one process batches submissions into blocks
  (:class:`~medledger.orderer.embedded.EmbeddedOrderer`).
* ``etcd://host:port,host:port,...[/root]``: an etcd cluster orders proposals from
  every node of a consortium; each node derives the same chain from etcd's revision
  order (:class:`~medledger.orderer.etcd.EtcdOrderer`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from medledger.orderer.base import Orderer

if TYPE_CHECKING:
    from medledger.node import Node

__all__ = ["Orderer", "make_orderer", "parse_etcd_url"]

_EMBEDDED_ONLY = ("max_batch", "max_wait", "verify_workers", "parallel_threshold")


def parse_etcd_url(url: str) -> tuple[list[tuple[str, int]], str]:
    """``etcd://h1:p1,h2:p2/root`` -> ([(h1, p1), (h2, p2)], "/root").

    The root (key prefix) defaults to ``/medledger``.
    """
    parts = urlsplit(url)
    if parts.scheme != "etcd":
        raise ValueError(f"not an etcd:// URL: {url!r}")
    endpoints: list[tuple[str, int]] = []
    for item in parts.netloc.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"etcd endpoint must be host:port, got {item!r} in {url!r}")
        endpoints.append((host.strip("[]"), int(port)))
    root = parts.path.rstrip("/") or "/medledger"
    return endpoints, root


def make_orderer(url: str | None, node: Node, **options: Any) -> Orderer:
    """The orderer ``url`` names, for ``node`` (not started).

    ``None``, ``""`` or ``embedded`` selects the embedded orderer (options:
    ``max_batch``, ``max_wait``, ``verify_workers``, ``parallel_threshold``);
    ``etcd://host:port,...`` the etcd orderer (options: see
    :class:`~medledger.orderer.etcd.EtcdOrderer`). ``etcds://`` (TLS) is not
    supported yet.
    """
    if url is None or url in ("", "embedded", "embedded:", "embedded://"):
        from medledger.orderer.embedded import EmbeddedOrderer

        known = {k: v for k, v in options.items() if k in _EMBEDDED_ONLY}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"options not understood by the embedded orderer: {unknown}")
        return EmbeddedOrderer(node, **known)
    scheme = urlsplit(url).scheme
    if scheme == "etcd":
        from medledger.orderer.etcd import EtcdOrderer

        endpoints, root = parse_etcd_url(url)
        options.pop("parallel_threshold", None)
        return EtcdOrderer(node, endpoints, root=root, **options)
    if scheme == "etcds":
        raise ValueError("etcds:// (TLS to etcd) is not supported yet; use etcd://")
    raise ValueError(f"unknown orderer URL {url!r} (expected embedded or etcd://host:port,...)")
