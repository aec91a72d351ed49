"""medledger.orderer: who decides the order of transactions.

* ``embedded`` (default): one process batches submissions into blocks
  (:class:`~medledger.orderer.embedded.EmbeddedOrderer`).
* ``etcd://host:port,host:port,...[/root]``: an etcd cluster orders proposals from
  every node of a consortium; each node derives the same chain from etcd's revision
  order (:class:`~medledger.orderer.etcd.EtcdOrderer`). ``etcds://`` is the same
  over TLS (options ``tls_ca``, and ``tls_cert`` with ``tls_key`` for members that
  require client certificates: PEM file paths).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from medledger.orderer.base import Orderer

if TYPE_CHECKING:
    from medledger.node import Node

__all__ = ["Orderer", "make_orderer", "parse_etcd_url"]

_EMBEDDED_ONLY = ("max_batch", "max_wait", "verify_workers", "parallel_threshold")
_TLS_OPTIONS = ("tls_ca", "tls_cert", "tls_key")


def parse_etcd_url(url: str) -> tuple[list[tuple[str, int]], str]:
    """``etcd://h1:p1,h2:p2/root`` -> ([(h1, p1), (h2, p2)], "/root").

    The root (key prefix) defaults to ``/medledger``. ``etcds://`` parses alike.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("etcd", "etcds"):
        raise ValueError(f"not an etcd:// or etcds:// URL: {url!r}")
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
    :class:`~medledger.orderer.etcd.EtcdOrderer`), ``etcds://host:port,...`` the
    same over TLS (options ``tls_ca``, ``tls_cert``, ``tls_key``: PEM file paths;
    the CA is required, the client certificate and key go together).
    """
    if url is None or url in ("", "embedded", "embedded:", "embedded://"):
        from medledger.orderer.embedded import EmbeddedOrderer

        known = {k: v for k, v in options.items() if k in _EMBEDDED_ONLY}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"options not understood by the embedded orderer: {unknown}")
        return EmbeddedOrderer(node, **known)
    scheme = urlsplit(url).scheme
    if scheme in ("etcd", "etcds"):
        from medledger.orderer.etcd import EtcdOrderer, EtcdTLS

        endpoints, root = parse_etcd_url(url)
        paths = {k: options.pop(k) for k in _TLS_OPTIONS if k in options}
        tls = None
        if scheme == "etcds":
            if "tls_ca" not in paths:
                raise ValueError("etcds:// needs the tls_ca option (the etcd members' CA, PEM)")
            tls = EtcdTLS.from_files(
                str(paths["tls_ca"]),
                None if paths.get("tls_cert") is None else str(paths["tls_cert"]),
                None if paths.get("tls_key") is None else str(paths["tls_key"]),
            )
        elif paths:
            raise ValueError(f"{sorted(paths)} apply to etcds:// (TLS) only, not {url!r}")
        return EtcdOrderer(node, endpoints, root=root, tls=tls, **options)
    raise ValueError(
        f"unknown orderer URL {url!r} (expected embedded, etcd:// or etcds://host:port,...)"
    )
