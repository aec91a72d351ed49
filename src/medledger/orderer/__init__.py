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

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from medledger.orderer.base import Orderer

if TYPE_CHECKING:
    from medledger.node import Node

__all__ = ["TLS_OPTIONS", "Orderer", "check_tls_options", "make_orderer", "parse_etcd_url"]

_EMBEDDED_ONLY = ("max_batch", "max_wait", "verify_workers", "parallel_threshold")
#: the TLS file options of ``etcds://`` (PEM file paths)
TLS_OPTIONS = ("tls_ca", "tls_cert", "tls_key")


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


def check_tls_options(scheme: str, options: Mapping[str, Any]) -> dict[str, str]:
    """The TLS file options (``tls_ca``, ``tls_cert``, ``tls_key``) among ``options``.

    Raises :class:`ValueError` unless they fit ``scheme``: ``etcds`` needs
    ``tls_ca``, ``tls_cert`` and ``tls_key`` go together, and no other scheme takes
    any of them. Used by :func:`make_orderer` and when ``node.toml`` is read.
    """
    paths = {k: str(options[k]) for k in TLS_OPTIONS if k in options}
    if scheme != "etcds":
        if paths:
            names = ", ".join(sorted(paths))
            raise ValueError(f"{names} apply to TLS only: TLS to etcd needs etcds://")
        return paths
    if "tls_ca" not in paths:
        raise ValueError("etcds:// needs the tls_ca option (the etcd members' CA, PEM)")
    if ("tls_cert" in paths) != ("tls_key" in paths):
        raise ValueError("tls_cert and tls_key go together")
    return paths


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
        accepted = set(inspect.signature(EtcdOrderer).parameters) - {"node", "endpoints", "tls"}
        unknown = sorted(set(options) - accepted - set(TLS_OPTIONS))
        if unknown:
            raise ValueError(f"options not understood by the etcd orderer: {unknown}")
        paths = check_tls_options(scheme, options)
        for name in paths:
            del options[name]
        tls = None
        if paths:
            tls = EtcdTLS.from_files(paths["tls_ca"], paths.get("tls_cert"), paths.get("tls_key"))
        return EtcdOrderer(node, endpoints, root=root, tls=tls, **options)
    raise ValueError(
        f"unknown orderer URL {url!r} (expected embedded, etcd:// or etcds://host:port,...)"
    )
