"""Ledger stores, chosen by URL."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from medledger.errors import StorageError
from medledger.store.base import BlockRecord, LedgerStore, TxRecord

__all__ = ["BlockRecord", "LedgerStore", "TxRecord", "open_store"]


def open_store(url: str) -> LedgerStore:
    """Open the store named by ``url``: ``sqlite:///path/to/file.db`` (or a plain path)."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file") or (parsed.scheme == "sqlite"):
        from medledger.store.sqlite import SqliteStore

        path = parsed.path if parsed.scheme else url
        if parsed.scheme == "sqlite" and parsed.netloc:
            raise StorageError("sqlite URLs take the form sqlite:///absolute/or/relative/path")
        return SqliteStore(Path(path))
    raise StorageError(f"unsupported store URL scheme {parsed.scheme!r}")
