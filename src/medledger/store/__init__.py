"""Ledger stores, chosen by URL."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from medledger.errors import StorageError
from medledger.store.base import BlockRecord, LedgerStore, TxRecord
from medledger.store.records import open_record_store

__all__ = ["BlockRecord", "LedgerStore", "TxRecord", "open_record_store", "open_store"]

#: URL schemes of the PostgreSQL store (libpq connection URIs)
POSTGRES_SCHEMES = ("postgresql", "postgres")


def open_store(url: str) -> LedgerStore:
    """Open the store named by ``url``.

    * ``sqlite:///path/to/file.db`` (or a plain path): one SQLite file;
    * ``postgresql://user@host:port/dbname`` (libpq URI, ``postgres://`` too): tables
      ``ledger_*`` in that database, created on first open.
    """
    try:
        parsed = urlparse(url)
    except ValueError as exc:
        raise StorageError(f"invalid store URL: {exc}") from exc
    if parsed.scheme in ("", "file") or (parsed.scheme == "sqlite"):
        from medledger.store.sqlite import SqliteStore

        path = parsed.path if parsed.scheme else url
        if parsed.scheme == "sqlite" and parsed.netloc:
            raise StorageError("sqlite URLs take the form sqlite:///absolute/or/relative/path")
        return SqliteStore(Path(path))
    if parsed.scheme in POSTGRES_SCHEMES:
        from medledger.store.postgres import PostgresStore

        return PostgresStore(url)
    raise StorageError(f"unsupported store URL scheme {parsed.scheme!r}")
