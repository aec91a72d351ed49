"""Reading a node's ledger file directly in tests (read-only; no node needed).

``tests/`` is on ``sys.path`` in pytest's default import mode, so test modules
``import ledger_files`` (as they ``import pg``).
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

from medledger.ledger.tx import Transaction


def ledger_txs(ledger_db: Path) -> list[Transaction]:
    """Every transaction in an SQLite ledger file, in log order."""
    db = sqlite3.connect(f"file:{ledger_db}?mode=ro", uri=True)
    try:
        return [Transaction.from_bytes(r[0]) for r in db.execute("SELECT raw FROM txs")]
    finally:
        db.close()


def registrations(ledger_db: Path) -> Counter[str]:
    """record id -> registrations naming it (``record.register`` transactions and
    ``record.register_batch`` entries)."""
    out: Counter[str] = Counter()
    for tx in ledger_txs(ledger_db):
        if tx.type == "record.register":
            out[tx.payload["record"]] += 1
        elif tx.type == "record.register_batch":
            out.update(e["record"] for e in tx.payload["records"])
    return out
