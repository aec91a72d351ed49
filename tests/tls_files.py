"""Test certificates: :mod:`medledger.crypto.tls` (a CA, a server certificate for
127.0.0.1/localhost and a client certificate, as PEM files), for tests that start TLS
servers themselves (etcd with ``--client-cert-auth``)."""

from medledger.crypto.tls import TLSFiles, make_tls_files

__all__ = ["TLSFiles", "make_tls_files"]
