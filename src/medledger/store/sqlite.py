"""SQLite ledger store (standard library ``sqlite3``).

Durability: WAL journal with ``synchronous=FULL``, so a committed block survives
power loss and ``kill -9``; every block is written in one ``BEGIN IMMEDIATE``
transaction. ``sqlite3`` errors are translated into :class:`StorageError`.

The connection is opened with ``check_same_thread=False`` because the node
hands it to its single storage thread; it must never be used from two threads
at once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from medledger.errors import StorageError
from medledger.store.base import BlockRecord, BlockWrite, TxRecord

__all__ = ["SqliteStore"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (
    height INTEGER PRIMARY KEY, header BLOB NOT NULL, sig BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS txs (
    idx INTEGER PRIMARY KEY, tx_id BLOB NOT NULL UNIQUE, height INTEGER NOT NULL,
    raw BLOB NOT NULL, receipt BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS tree (id INTEGER PRIMARY KEY, hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS state (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS smt (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (height INTEGER PRIMARY KEY, note TEXT NOT NULL);
"""

_IN_CHUNK = 500  # parameters per "IN (...)" query (old SQLite builds allow 999)
_LEVEL_SHIFT = 56  # tree node id = level << 56 | index (index < 2**56 leaves)


def _node_id(level: int, index: int) -> int:
    return (level << _LEVEL_SHIFT) | index


def _prefix_end(prefix: bytes) -> bytes | None:
    """Smallest byte string greater than every string starting with ``prefix``."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return None
    p[-1] += 1
    return bytes(p)


@contextmanager
def _translate(what: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise StorageError(f"sqlite: {what}: {exc}") from exc


class SqliteStore:
    """A :class:`~medledger.store.base.LedgerStore` in one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        with _translate("open"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA cache_size=-65536")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT v FROM meta WHERE k='schema'").fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO meta(k, v) VALUES('schema', ?)", (str(SCHEMA_VERSION).encode(),)
                )
            elif int(row[0]) != SCHEMA_VERSION:
                raise StorageError(f"unsupported store schema {row[0]!r}")

    # -- metadata -----------------------------------------------------------------------
    def get_meta(self, key: str) -> bytes | None:
        with _translate("get_meta"):
            row = self._db.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def set_meta(self, key: str, value: bytes) -> None:
        with _translate("set_meta"):
            self._db.execute("INSERT OR REPLACE INTO meta(k, v) VALUES(?, ?)", (key, value))

    # -- state ------------------------------------------------------------------------------
    def get(self, key: bytes) -> bytes | None:
        with _translate("get"):
            row = self._db.execute("SELECT v FROM state WHERE k=?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def scan(
        self, prefix: bytes, *, start: bytes | None = None, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        lo = max(prefix, start) if start is not None else prefix
        hi = _prefix_end(prefix)
        sql = "SELECT k, v FROM state WHERE k >= ?"
        args: list[object] = [lo]
        if hi is not None:
            sql += " AND k < ?"
            args.append(hi)
        sql += " ORDER BY k"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with _translate("scan"):
            rows = self._db.execute(sql, args).fetchall()
        for k, v in rows:
            yield bytes(k), bytes(v)

    def get_node(self, node_key: bytes) -> bytes | None:
        with _translate("get_node"):
            row = self._db.execute("SELECT v FROM smt WHERE k=?", (node_key,)).fetchone()
        return None if row is None else bytes(row[0])

    def iter_state(self) -> Iterator[tuple[bytes, bytes]]:
        with _translate("iter_state"):
            cur = self._db.execute("SELECT k, v FROM state ORDER BY k")
            for k, v in cur:
                yield bytes(k), bytes(v)

    def iter_nodes(
        self, start: bytes = b"", end: bytes | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        with _translate("iter_nodes"):
            if end is None:
                cur = self._db.execute("SELECT k, v FROM smt WHERE k >= ? ORDER BY k", (start,))
            else:
                cur = self._db.execute(
                    "SELECT k, v FROM smt WHERE k >= ? AND k < ? ORDER BY k", (start, end)
                )
            for k, v in cur:
                yield bytes(k), bytes(v)

    # -- log ----------------------------------------------------------------------------------
    def has_tx(self, tx_id: bytes) -> bool:
        with _translate("has_tx"):
            row = self._db.execute("SELECT 1 FROM txs WHERE tx_id=?", (tx_id,)).fetchone()
        return row is not None

    def known_txs(self, tx_ids: Sequence[bytes]) -> set[bytes]:
        found: set[bytes] = set()
        ids = list(dict.fromkeys(tx_ids))
        with _translate("known_txs"):
            for i in range(0, len(ids), _IN_CHUNK):
                chunk = ids[i : i + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT tx_id FROM txs WHERE tx_id IN ({marks})"
                found.update(bytes(r[0]) for r in self._db.execute(sql, chunk))
        return found

    @staticmethod
    def _tx(row: tuple[object, ...] | None) -> TxRecord | None:
        if row is None:
            return None
        idx, tx_id, height, raw, receipt = row
        return TxRecord(
            index=int(idx),  # type: ignore[call-overload]
            tx_id=bytes(tx_id),  # type: ignore[call-overload]
            height=int(height),  # type: ignore[call-overload]
            raw=bytes(raw),  # type: ignore[call-overload]
            receipt=bytes(receipt),  # type: ignore[call-overload]
        )

    def get_tx(self, tx_id: bytes) -> TxRecord | None:
        with _translate("get_tx"):
            row = self._db.execute(
                "SELECT idx, tx_id, height, raw, receipt FROM txs WHERE tx_id=?", (tx_id,)
            ).fetchone()
        return self._tx(row)

    def get_tx_at(self, index: int) -> TxRecord | None:
        with _translate("get_tx_at"):
            row = self._db.execute(
                "SELECT idx, tx_id, height, raw, receipt FROM txs WHERE idx=?", (index,)
            ).fetchone()
        return self._tx(row)

    def iter_txs(self, start: int = 0, end: int | None = None) -> Iterator[TxRecord]:
        stop = end if end is not None else 2**62
        with _translate("iter_txs"):
            cur = self._db.execute(
                "SELECT idx, tx_id, height, raw, receipt FROM txs "
                "WHERE idx >= ? AND idx < ? ORDER BY idx",
                (start, stop),
            )
            for row in cur:
                rec = self._tx(row)
                assert rec is not None
                yield rec

    def get_tree_nodes(self, ids: Sequence[tuple[int, int]]) -> list[bytes]:
        if not ids:
            return []
        keys = [_node_id(level, index) for level, index in ids]
        found: dict[int, bytes] = {}
        with _translate("get_tree_nodes"):
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                marks = ",".join("?" * len(chunk))
                for nid, h in self._db.execute(
                    f"SELECT id, hash FROM tree WHERE id IN ({marks})", chunk
                ):
                    found[int(nid)] = bytes(h)
        missing = [ids[i] for i, k in enumerate(keys) if k not in found]
        if missing:
            raise StorageError(f"tree nodes missing from store: {missing[:4]}")
        return [found[k] for k in keys]

    def iter_tree_nodes(self) -> Iterator[tuple[int, int, bytes]]:
        with _translate("iter_tree_nodes"):
            cur = self._db.execute("SELECT id, hash FROM tree ORDER BY id")
            mask = (1 << _LEVEL_SHIFT) - 1
            for nid, h in cur:
                yield int(nid) >> _LEVEL_SHIFT, int(nid) & mask, bytes(h)

    # -- blocks and checkpoints ----------------------------------------------------------------
    def head_height(self) -> int | None:
        with _translate("head_height"):
            row = self._db.execute("SELECT MAX(height) FROM blocks").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def get_block(self, height: int) -> BlockRecord | None:
        with _translate("get_block"):
            row = self._db.execute(
                "SELECT height, header, sig FROM blocks WHERE height=?", (height,)
            ).fetchone()
        if row is None:
            return None
        return BlockRecord(height=int(row[0]), header=bytes(row[1]), sig=bytes(row[2]))

    def iter_blocks(self, start: int = 0) -> Iterator[BlockRecord]:
        with _translate("iter_blocks"):
            cur = self._db.execute(
                "SELECT height, header, sig FROM blocks WHERE height >= ? ORDER BY height",
                (start,),
            )
            for h, header, sig in cur:
                yield BlockRecord(height=int(h), header=bytes(header), sig=bytes(sig))

    def get_checkpoint(self, height: int | None = None) -> tuple[int, str] | None:
        with _translate("get_checkpoint"):
            if height is None:
                row = self._db.execute(
                    "SELECT height, note FROM checkpoints ORDER BY height DESC LIMIT 1"
                ).fetchone()
            else:
                row = self._db.execute(
                    "SELECT height, note FROM checkpoints WHERE height=?", (height,)
                ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def put_checkpoint(self, height: int, note: str) -> None:
        with _translate("put_checkpoint"):
            self._db.execute(
                "INSERT OR REPLACE INTO checkpoints(height, note) VALUES(?, ?)", (height, note)
            )

    def iter_checkpoints(self) -> Iterator[tuple[int, str]]:
        with _translate("iter_checkpoints"):
            cur = self._db.execute("SELECT height, note FROM checkpoints ORDER BY height")
            for h, note in cur:
                yield int(h), str(note)

    # -- atomic commit ------------------------------------------------------------------------
    def commit_block(
        self,
        block: BlockRecord,
        txs: Sequence[TxRecord],
        tree_nodes: Sequence[tuple[tuple[int, int], bytes]],
        state_changes: dict[bytes, bytes | None],
        smt_writes: dict[bytes, bytes | None],
        checkpoint: str | None = None,
        meta: Mapping[str, bytes] | None = None,
    ) -> None:
        self.commit_blocks(
            [BlockWrite(block, txs, tree_nodes, state_changes, smt_writes, checkpoint)], meta
        )

    def commit_blocks(
        self, blocks: Sequence[BlockWrite], meta: Mapping[str, bytes] | None = None
    ) -> None:
        if not blocks:
            raise ValueError("commit_blocks needs at least one block")
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            for w in blocks:
                block = w.block
                db.execute(
                    "INSERT INTO blocks(height, header, sig) VALUES(?, ?, ?)",
                    (block.height, block.header, block.sig),
                )
                db.executemany(
                    "INSERT INTO txs(idx, tx_id, height, raw, receipt) VALUES(?, ?, ?, ?, ?)",
                    [(t.index, t.tx_id, t.height, t.raw, t.receipt) for t in w.txs],
                )
                db.executemany(
                    "INSERT OR REPLACE INTO tree(id, hash) VALUES(?, ?)",
                    [(_node_id(lv, ix), h) for (lv, ix), h in w.tree_nodes],
                )
                puts = [(k, v) for k, v in w.state_changes.items() if v is not None]
                dels = [(k,) for k, v in w.state_changes.items() if v is None]
                db.executemany("INSERT OR REPLACE INTO state(k, v) VALUES(?, ?)", puts)
                db.executemany("DELETE FROM state WHERE k=?", dels)
                nputs = [(k, v) for k, v in w.smt_writes.items() if v is not None]
                ndels = [(k,) for k, v in w.smt_writes.items() if v is None]
                db.executemany("INSERT OR REPLACE INTO smt(k, v) VALUES(?, ?)", nputs)
                db.executemany("DELETE FROM smt WHERE k=?", ndels)
                if w.checkpoint is not None:
                    db.execute(
                        "INSERT OR REPLACE INTO checkpoints(height, note) VALUES(?, ?)",
                        (block.height, w.checkpoint),
                    )
            if meta:
                db.executemany("INSERT OR REPLACE INTO meta(k, v) VALUES(?, ?)", meta.items())
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(db)
            raise StorageError(f"sqlite: commit of block {_heights(blocks)} failed: {exc}") from exc
        except BaseException:
            _rollback(db)
            raise

    def close(self) -> None:
        with _translate("close"):
            self._db.close()


def _heights(blocks: Sequence[BlockWrite]) -> str:
    first, last = blocks[0].block.height, blocks[-1].block.height
    return str(first) if first == last else f"{first}..{last}"


def _rollback(db: sqlite3.Connection) -> None:
    """Roll back an open transaction; a closed or broken connection has none to roll back."""
    try:
        if db.in_transaction:
            db.execute("ROLLBACK")
    except sqlite3.Error:
        pass
