"""PostgreSQL ledger store (psycopg 3, synchronous).

The same contract as :class:`medledger.store.sqlite.SqliteStore`, in tables named
``ledger_*`` of the database (and schema, see below) the URL names, created on first
open. A node keeps its ledger in a database of its own; the encrypted record store
may share that database (its tables are prefixed ``rec_``).

Durability: every block is written in one transaction committed with
``synchronous_commit=on`` (forced for the session whatever the server default), so
once :meth:`PostgresStore.commit_block` returns the block survives a crash of the
node or of the server. A block either commits whole or not at all.

Bulk writes: a block of 2,000 transactions touches some 20,000 rows (transactions,
log tree nodes, state rows, state-tree nodes). They travel with binary ``COPY``:
every row into one session-local staging table (``pg_temp``, emptied at every
commit) from which one statement inserts the transactions and every row known to
be new, and upserts the others (SQLite's ``INSERT OR REPLACE``; see
``_apply_stage``); deleted keys go in one more. That is about four times faster
than one statement with the rows as arrays (``unnest``), and a commit costs the
same few round trips whatever its size (see ``_STAGING``).

Fewer round trips: a query costs a network round trip (~100 us on loopback, against
~5 us for an SQLite read), and while a block is built most point reads ask for keys
that do not exist (new record, request and consent ids, new transaction ids). So
the store keeps a Bloom filter over the state keys and one over the transaction ids
(12 bits a key, about 0.3 % false positives, built on first use, then grown in
layers without reading the table again: under 0.6 % however large; see
:class:`_Presence`): ``get`` and ``has_tx`` answer "absent" without a query when the
filter says so. Building a block asks for all its transaction ids at once
(``known_txs``, one query), which needs no filter; a filter is loaded only on
first use. This assumes the store is the only writer of its tables while it is open,
which holds for a node (one storage thread, and a second writer would break the
chain anyway); pass ``presence_filters=False`` to query every time.

Connection loss: if the connection drops (server restart, idle kill), the next call
reconnects once and retries; reads and upserts are idempotent, and a block whose
``COMMIT`` may or may not have reached the server is looked up by height before it
is retried, so a block is never applied twice nor reported failed when it committed.

Query plans: psycopg prepares a statement on the server once it has run a few
times, and PostgreSQL may then keep one generic plan for it. For a lookup of a
list of keys (``WHERE k = ANY($1)``) the generic plan made while a table was
small can be a sequential scan, and nothing replaces it while the table grows
unless the table is analysed (autovacuum may be off): every block's
``known_txs`` then reads the whole transaction table. Those queries are
therefore never prepared (:meth:`PostgresStore._any`): each is planned for its
own keys and the table's current size, an index scan. So are a commit's deletions
(``_DELETE_KEYS``): they used to join the staged keys inside the prepared commit
statement, whose plan, made at a new node's first (large) commit on empty tables, then
read the whole table at every commit that deleted a key. Single-key lookups
(``k = $1``) keep their prepared index plan.

Schema: the tables are created in the connection's current schema, normally
``public``. To keep several ledgers in one database, give each node its own
(existing) PostgreSQL schema with ``?options=-csearch_path%3Dnode_a`` in the URL.

Every ``psycopg`` error is translated into :class:`medledger.errors.StorageError`.
Like every store, this one is used from a single thread at a time.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.string import BytesBinaryDumper

from medledger.errors import StorageError
from medledger.state.base import scan_bounds
from medledger.store.base import BlockRecord, BlockWrite, TxRecord

__all__ = ["PostgresStore"]

log = logging.getLogger("medledger.store")

T = TypeVar("T")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_meta (k TEXT PRIMARY KEY, v BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS ledger_blocks (
    height BIGINT PRIMARY KEY, header BYTEA NOT NULL, sig BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS ledger_txs (
    idx BIGINT PRIMARY KEY, tx_id BYTEA NOT NULL UNIQUE, height BIGINT NOT NULL,
    raw BYTEA NOT NULL, receipt BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS ledger_tree (id BIGINT PRIMARY KEY, hash BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS ledger_state (k BYTEA PRIMARY KEY, v BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS ledger_smt (k BYTEA PRIMARY KEY, v BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS ledger_checkpoints (height BIGINT PRIMARY KEY, note TEXT NOT NULL);
"""

#: serialises schema creation when several processes open a fresh database at once
_SCHEMA_LOCK = 0x6D6C_6C65_6467_6572  # "mlledger"

_LEVEL_SHIFT = 56  # log tree node id = level << 56 | index, as in the SQLite store
_MASK = (1 << _LEVEL_SHIFT) - 1
_NO_END = 2**62

#: rows fetched per query by the iterators (keyset pagination: no long-lived cursor)
PAGE = 5000

_TX_COLS = "idx, tx_id, height, raw, receipt"

# A session-local staging table for a commit's writes, created by a session's first
# commit (so read-only users never make it) and emptied by every commit that used it
# (a transaction that did not touch it does not pay for that). A commit sends every
# row with ONE COPY into the staging table (``t`` says which table a row is for; a
# transaction's row also fills ``h``, its height, and ``r``, its receipt) and applies
# them all with ONE statement: BEGIN, the COPY (two round trips: it starts, then
# ends), the statement and COMMIT, whatever the number of blocks and tables. (A
# second COPY straight into ledger_txs cost two more round trips a commit, more than
# passing the transactions through the staging table, which is not WAL-logged.)
# Deleted keys are not staged: a commit that deletes any runs one more statement,
# never prepared (``_DELETE_KEYS``).
_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS ledger_stage (
    t SMALLINT NOT NULL, id BIGINT, k BYTEA, v BYTEA, h BIGINT, r BYTEA) ON COMMIT DELETE ROWS;
"""
(
    _ST_TREE,
    _ST_STATE,
    _ST_SMT,
    _ST_BLOCK,
    _ST_CHECKPOINT,
    _ST_META,
    _ST_TX,
    _ST_STATE_NEW,
    _ST_SMT_NEW,
) = range(9)
_COPY_STAGE = "COPY pg_temp.ledger_stage(t, id, k, v, h, r) FROM STDIN (FORMAT BINARY)"
_STAGE_TYPES = ("int2", "int8", "bytea", "bytea", "int8", "bytea")


# Every data-modifying WITH clause runs (referenced or not) against the same snapshot;
# a commit never both writes and deletes one key (the writes are merged per key first).
#
# Rows known to be new are inserted plainly; the others are upserts (SQLite's INSERT OR
# REPLACE). An upsert first looks the key up in the index (ON CONFLICT's check), then
# inserts: two descents of the index where an insert needs one. That check was about a
# quarter of PostgreSQL's CPU under load, and most rows are new: every log tree node
# (append-only: a perfect node is written once, by the block holding its last leaf),
# state keys the presence filter knows to be absent, and state tree positions where the
# tree held no node (``BlockWrite.smt_new``). A block height or transaction id already
# present fails the commit, as before.
def _apply_stage(fast: bool) -> str:
    """The statement applying the staged rows; ``fast=False``: every row an upsert."""

    def rows(cols: str, codes: tuple[int, ...]) -> str:
        where = f"t = {codes[0]}" if len(codes) == 1 else f"t IN {codes}"
        return f"SELECT {cols} FROM pg_temp.ledger_stage WHERE {where}"

    state: tuple[int, ...]
    smt: tuple[int, ...]
    if fast:
        tree = f"INSERT INTO ledger_tree(id, hash) {rows('id, v', (_ST_TREE,))}"
        news = f"""
  state_new AS (INSERT INTO ledger_state(k, v) {rows("k, v", (_ST_STATE_NEW,))}),
  smt_new AS (INSERT INTO ledger_smt(k, v) {rows("k, v", (_ST_SMT_NEW,))}),"""
        state, smt = (_ST_STATE,), (_ST_SMT,)
    else:
        tree = (
            f"INSERT INTO ledger_tree(id, hash) {rows('id, v', (_ST_TREE,))}"
            " ON CONFLICT (id) DO UPDATE SET hash = EXCLUDED.hash"
        )
        news = ""
        state, smt = (_ST_STATE, _ST_STATE_NEW), (_ST_SMT, _ST_SMT_NEW)
    return f"""
WITH
  txs AS (INSERT INTO ledger_txs(idx, tx_id, height, raw, receipt)
    {rows("id, k, h, v, r", (_ST_TX,))}),
  blocks AS (INSERT INTO ledger_blocks(height, header, sig) {rows("id, k, v", (_ST_BLOCK,))}),
  tree AS ({tree}),{news}
  state AS (INSERT INTO ledger_state(k, v) {rows("k, v", state)}
    ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v),
  smt AS (INSERT INTO ledger_smt(k, v) {rows("k, v", smt)}
    ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v),
  checkpoints AS (INSERT INTO ledger_checkpoints(height, note)
    {rows("id, convert_from(v, 'UTF8')", (_ST_CHECKPOINT,))}
    ON CONFLICT (height) DO UPDATE SET note = EXCLUDED.note),
  meta AS (INSERT INTO ledger_meta(k, v) {rows("convert_from(k, 'UTF8'), v", (_ST_META,))}
    ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v)
SELECT 1
"""


_APPLY_STAGE = _apply_stage(fast=True)
#: the same rows with every row an upsert: a commit whose "new" row was not new after
#: all (a unique violation: a bug, or another writer of the tables) is retried with it
_APPLY_STAGE_UPSERT = _apply_stage(fast=False)
# The keys a commit deletes, as two arrays, run in the same transaction after
# _APPLY_STAGE (a commit never both writes and deletes one key). Never prepared: it
# is planned for its keys and the tables' current size, an index lookup per key (why
# it is not part of _APPLY_STAGE: "Query plans" in the module docstring).
_DELETE_KEYS = """
WITH
  state_del AS (DELETE FROM ledger_state WHERE k = ANY(%b)),
  smt_del AS (DELETE FROM ledger_smt WHERE k = ANY(%b))
SELECT 1
"""

_UPSERT_META = (
    "INSERT INTO ledger_meta(k, v) VALUES (%s, %s) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
)
_UPSERT_CHECKPOINT = (
    "INSERT INTO ledger_checkpoints(height, note) VALUES (%s, %s) "
    "ON CONFLICT (height) DO UPDATE SET note = EXCLUDED.note"
)


#: Bloom filter parameters: ~0.3 % false positives in the first layer at capacity;
#: every further layer holds twice as many keys at ``BLOOM_BITS_STEP`` more bits a key
BLOOM_BITS_PER_KEY = 12
BLOOM_BITS_STEP = 2
BLOOM_HASHES = 8
BLOOM_MIN_CAPACITY = 1 << 16

#: (count query, keys query) of the tables with a presence filter
_FILTERED = {
    "state": ("SELECT count(*) FROM ledger_state", "SELECT k FROM ledger_state"),
    "txs": ("SELECT count(*) FROM ledger_txs", "SELECT tx_id FROM ledger_txs"),
}


class _BloomLayer:
    __slots__ = ("_bits", "_m", "capacity", "count")

    def __init__(self, capacity: int, bits_per_key: int) -> None:
        self.capacity = capacity
        self._m = capacity * bits_per_key
        self._bits = bytearray((self._m + 7) // 8)
        self.count = 0

    def add(self, h1: int, h2: int) -> None:
        m, bits = self._m, self._bits
        for i in range(BLOOM_HASHES):
            p = (h1 + i * h2) % m
            bits[p >> 3] |= 1 << (p & 7)
        self.count += 1

    def __contains__(self, h: tuple[int, int]) -> bool:
        h1, h2 = h
        m, bits = self._m, self._bits
        for i in range(BLOOM_HASHES):
            p = (h1 + i * h2) % m
            if not bits[p >> 3] & (1 << (p & 7)):
                return False
        return True


class _Presence:
    """A Bloom filter over a table's keys: ``key not in f`` means certainly absent.

    It grows without ever reading the table again (a scalable Bloom filter, Almeida
    et al. 2007): when its newest layer holds its capacity, new keys go to a new
    layer twice as big with ``BLOOM_BITS_STEP`` more bits a key, and a key is present
    if any layer has it. The layers' false-positive rates (about 0.31 %, 0.13 %,
    0.06 %, ...) sum to under 0.6 % however large the table grows. (It used to be
    rebuilt from the table, twice as big, when full: a node paused for the whole
    rebuild, ~0.5 s at 65,536 keys and twice that at every doubling.)
    """

    __slots__ = ("count", "layers")

    def __init__(self, capacity: int) -> None:
        self.layers = [_BloomLayer(max(capacity, BLOOM_MIN_CAPACITY), BLOOM_BITS_PER_KEY)]
        self.count = 0

    @staticmethod
    def _hashes(key: bytes) -> tuple[int, int]:
        d = hashlib.blake2b(key, digest_size=16).digest()
        return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little") | 1

    def add(self, key: bytes, *, new: bool = False) -> bool:
        """Add ``key``, unless the filter already answers "present" for it (an updated
        key is written again and again: counting it once keeps the layers few); ``new``
        skips that check for keys known to be distinct (a table's, when it is loaded).
        True if ``key`` was certainly absent before (or ``new``)."""
        h = self._hashes(key)
        if not new and any(h in layer for layer in reversed(self.layers)):
            return False
        layer = self.layers[-1]
        if layer.count >= layer.capacity:
            bits = BLOOM_BITS_PER_KEY + BLOOM_BITS_STEP * len(self.layers)
            layer = _BloomLayer(2 * layer.capacity, bits)
            self.layers.append(layer)
        layer.add(*h)
        self.count += 1
        return True

    def __contains__(self, key: bytes) -> bool:
        h = self._hashes(key)
        return any(h in layer for layer in reversed(self.layers))


def _node_id(level: int, index: int) -> int:
    return (level << _LEVEL_SHIFT) | index


def _copy(
    cur: psycopg.Cursor[tuple[Any, ...]],
    sql: str,
    types: Sequence[str],
    rows: Iterable[tuple[object, ...]],
) -> None:
    with cur.copy(sql) as copy:
        copy.set_types(list(types))
        for row in rows:
            copy.write_row(row)


def _page_sql(table: str, key: str, cols: str, *, inclusive: bool, bounded: bool) -> str:
    sql = f"SELECT {cols} FROM {table} WHERE {key} {'>=' if inclusive else '>'} %s"
    if bounded:
        sql += f" AND {key} < %s"
    return sql + f" ORDER BY {key} LIMIT %s"


def _redact(url: str) -> str:
    """The URL without its password, for error messages."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return "<invalid postgresql URL>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


class PostgresStore:
    """A :class:`~medledger.store.base.LedgerStore` in a PostgreSQL database."""

    def __init__(
        self, url: str, *, connect_timeout: int = 10, presence_filters: bool = True
    ) -> None:
        self.url = url
        self._use_filters = presence_filters
        self._filters: dict[str, _Presence | None] = dict.fromkeys(_FILTERED)
        self._where = _redact(url)
        self._connect_timeout = connect_timeout
        self._closed = False
        self._db = self._connect()
        #: the connection whose session has the staging tables (made by the first commit)
        self._staging: psycopg.Connection[tuple[Any, ...]] | None = None
        try:
            self._create_schema()
        except BaseException:
            self._db.close()
            raise

    # -- connection --------------------------------------------------------------------
    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        try:
            params = conninfo_to_dict(self.url)
            extra: dict[str, Any] = {}
            if "connect_timeout" not in params:
                extra["connect_timeout"] = self._connect_timeout
            if "application_name" not in params:
                extra["application_name"] = "medledger-ledger"
            extra["client_encoding"] = "utf8"  # notes and meta keys are str
            conn = psycopg.connect(self.url, autocommit=True, **extra)
        except psycopg.Error as exc:
            raise StorageError(f"postgresql: cannot connect to {self._where}: {exc}") from exc
        # A binary COPY picks its dumpers by column type, and the last one registered for
        # bytea is psycopg's DB-API ``Binary`` wrapper's, a Python subclass called once per
        # value; registering the plain bytes dumper again makes it the bytea one (its C
        # version), which halves the client's cost of a commit's rows.
        conn.adapters.register_dumper(bytes, BytesBinaryDumper)
        try:
            conn.execute("SET synchronous_commit TO on")
        except psycopg.Error as exc:
            conn.close()
            raise StorageError(f"postgresql: cannot configure session: {exc}") from exc
        return conn

    def _conn(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._closed:
            raise StorageError("postgresql: the store is closed")
        if self._db.closed or self._db.broken:
            self._db.close()
            self._db = self._connect()
        return self._db

    def _call(self, what: str, fn: Callable[[psycopg.Connection[tuple[Any, ...]]], T]) -> T:
        """Run ``fn`` on the connection, reconnecting and retrying once if it was lost.

        Only for idempotent work (reads, upserts).
        """
        for attempt in (0, 1):
            conn = self._conn()
            try:
                return fn(conn)
            except psycopg.OperationalError as exc:
                if attempt == 0 and conn.broken:
                    continue
                raise StorageError(f"postgresql: {what}: {exc}") from exc
            except psycopg.Error as exc:
                raise StorageError(f"postgresql: {what}: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _one(self, what: str, sql: str, args: Sequence[object]) -> tuple[Any, ...] | None:
        return self._call(what, lambda c: c.execute(sql, args, binary=True).fetchone())

    def _all(self, what: str, sql: str, args: Sequence[object]) -> list[tuple[Any, ...]]:
        return self._call(what, lambda c: c.execute(sql, args, binary=True).fetchall())

    def _any(self, what: str, sql: str, keys: Sequence[object]) -> list[tuple[Any, ...]]:
        """Rows of a ``= ANY(...)`` lookup of ``keys``: never prepared (module docstring)."""
        return self._call(
            what, lambda c: c.execute(sql, (keys,), binary=True, prepare=False).fetchall()
        )

    def _create_schema(self) -> None:
        def create(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                conn.execute(_SCHEMA)
                row = conn.execute("SELECT v FROM ledger_meta WHERE k = 'schema'").fetchone()
                if row is None:
                    conn.execute(
                        "INSERT INTO ledger_meta(k, v) VALUES ('schema', %s)",
                        (str(SCHEMA_VERSION).encode(),),
                    )
                elif bytes(row[0]) != str(SCHEMA_VERSION).encode():
                    raise StorageError(f"unsupported store schema {bytes(row[0])!r}")

        self._call("open", create)

    def _absent(self, table: str, key: bytes) -> bool:
        """True if ``key`` is certainly not stored in ``table`` (no query needed)."""
        if not self._use_filters:
            return False
        f = self._filters[table]
        if f is None:
            f = self._filters[table] = self._load_filter(table)
        return key not in f

    def _load_filter(self, table: str) -> _Presence:
        count_sql, keys_sql = _FILTERED[table]

        def load(conn: psycopg.Connection[tuple[Any, ...]]) -> _Presence:
            row = conn.execute(count_sql).fetchone()
            f = _Presence(2 * int(row[0]) if row else 0)
            with conn.cursor(binary=True) as cur:
                for (key,) in cur.stream(keys_sql, size=10_000):
                    f.add(bytes(key), new=True)
            return f

        return self._call(f"load the {table} filter", load)

    def _will_store(self, table: str, keys: Iterable[bytes]) -> set[bytes] | None:
        """Add keys about to be written (before the write: a failed write only costs
        false positives, a missed key would be a wrong answer). Returns those the
        filter knew to be absent (new rows), or None when the filter is not loaded."""
        f = self._filters[table]
        if f is None:
            return None
        return {key for key in keys if f.add(key)}

    def _pages(
        self,
        what: str,
        table: str,
        key: str,
        cols: str,
        low: object,
        high: object | None,
        limit: int | None = None,
    ) -> Iterator[tuple[Any, ...]]:
        """Rows with ``low <= key < high`` in key order, fetched ``PAGE`` at a time."""
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        inclusive = True
        remaining = limit
        while remaining is None or remaining > 0:
            n = PAGE if remaining is None else min(PAGE, remaining)
            sql = _page_sql(table, key, cols, inclusive=inclusive, bounded=high is not None)
            args = [low, n] if high is None else [low, high, n]
            rows = self._all(what, sql, args)
            yield from rows
            if len(rows) < n:
                return
            if remaining is not None:
                remaining -= len(rows)
            low, inclusive = rows[-1][0], False

    # -- metadata -----------------------------------------------------------------------
    def get_meta(self, key: str) -> bytes | None:
        row = self._one("get_meta", "SELECT v FROM ledger_meta WHERE k = %s", (key,))
        return None if row is None else bytes(row[0])

    def set_meta(self, key: str, value: bytes) -> None:
        self._call(
            "set_meta",
            lambda c: c.execute(_UPSERT_META, (key, value)),
        )

    # -- state ------------------------------------------------------------------------------
    def get(self, key: bytes) -> bytes | None:
        if self._absent("state", key):
            return None
        row = self._one("get", "SELECT v FROM ledger_state WHERE k = %s", (key,))
        return None if row is None else bytes(row[0])

    def scan(
        self, prefix: bytes, *, start: bytes | None = None, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        low, high = scan_bounds(prefix, start)
        for k, v in self._pages("scan", "ledger_state", "k", "k, v", low, high, limit):
            yield bytes(k), bytes(v)

    def get_node(self, node_key: bytes) -> bytes | None:
        row = self._one("get_node", "SELECT v FROM ledger_smt WHERE k = %s", (node_key,))
        return None if row is None else bytes(row[0])

    def iter_state(self) -> Iterator[tuple[bytes, bytes]]:
        for k, v in self._pages("iter_state", "ledger_state", "k", "k, v", b"", None):
            yield bytes(k), bytes(v)

    def iter_nodes(
        self, start: bytes = b"", end: bytes | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        for k, v in self._pages("iter_nodes", "ledger_smt", "k", "k, v", start, end):
            yield bytes(k), bytes(v)

    # -- log ----------------------------------------------------------------------------------
    def has_tx(self, tx_id: bytes) -> bool:
        if self._absent("txs", tx_id):
            return False
        return (
            self._one("has_tx", "SELECT 1 FROM ledger_txs WHERE tx_id = %s", (tx_id,)) is not None
        )

    def known_txs(self, tx_ids: Sequence[bytes]) -> set[bytes]:
        # One indexed query for the lot: cheaper than the Bloom filter's Python hashing
        # per id (which a node that asks only this never loads nor maintains).
        ids = list(dict.fromkeys(tx_ids))
        if not ids:
            return set()
        # %b: the ids go as a binary bytea array (a text one escapes every id)
        rows = self._any("known_txs", "SELECT tx_id FROM ledger_txs WHERE tx_id = ANY(%b)", ids)
        return {bytes(r[0]) for r in rows}

    @staticmethod
    def _tx(row: tuple[Any, ...]) -> TxRecord:
        idx, tx_id, height, raw, receipt = row
        return TxRecord(int(idx), bytes(tx_id), int(height), bytes(raw), bytes(receipt))

    def get_tx(self, tx_id: bytes) -> TxRecord | None:
        row = self._one("get_tx", f"SELECT {_TX_COLS} FROM ledger_txs WHERE tx_id = %s", (tx_id,))
        return None if row is None else self._tx(row)

    def get_tx_at(self, index: int) -> TxRecord | None:
        row = self._one("get_tx_at", f"SELECT {_TX_COLS} FROM ledger_txs WHERE idx = %s", (index,))
        return None if row is None else self._tx(row)

    def iter_txs(self, start: int = 0, end: int | None = None) -> Iterator[TxRecord]:
        stop = end if end is not None else _NO_END
        for row in self._pages("iter_txs", "ledger_txs", "idx", _TX_COLS, start, stop):
            yield self._tx(row)

    def get_tree_nodes(self, ids: Sequence[tuple[int, int]]) -> list[bytes]:
        if not ids:
            return []
        keys = [_node_id(level, index) for level, index in ids]
        rows = self._any(
            "get_tree_nodes",
            "SELECT id, hash FROM ledger_tree WHERE id = ANY(%s::int8[])",
            sorted(set(keys)),
        )
        found = {int(nid): bytes(h) for nid, h in rows}
        missing = [ids[i] for i, k in enumerate(keys) if k not in found]
        if missing:
            raise StorageError(f"tree nodes missing from store: {missing[:4]}")
        return [found[k] for k in keys]

    def iter_tree_nodes(self) -> Iterator[tuple[int, int, bytes]]:
        for nid, h in self._pages("iter_tree_nodes", "ledger_tree", "id", "id, hash", 0, None):
            yield int(nid) >> _LEVEL_SHIFT, int(nid) & _MASK, bytes(h)

    # -- blocks and checkpoints ----------------------------------------------------------------
    def head_height(self) -> int | None:
        row = self._one("head_height", "SELECT max(height) FROM ledger_blocks", ())
        return None if row is None or row[0] is None else int(row[0])

    def get_block(self, height: int) -> BlockRecord | None:
        row = self._one(
            "get_block",
            "SELECT height, header, sig FROM ledger_blocks WHERE height = %s",
            (height,),
        )
        if row is None:
            return None
        return BlockRecord(height=int(row[0]), header=bytes(row[1]), sig=bytes(row[2]))

    def iter_blocks(self, start: int = 0) -> Iterator[BlockRecord]:
        cols = "height, header, sig"
        for h, header, sig in self._pages(
            "iter_blocks", "ledger_blocks", "height", cols, start, None
        ):
            yield BlockRecord(height=int(h), header=bytes(header), sig=bytes(sig))

    def get_checkpoint(self, height: int | None = None) -> tuple[int, str] | None:
        if height is None:
            row = self._one(
                "get_checkpoint",
                "SELECT height, note FROM ledger_checkpoints ORDER BY height DESC LIMIT 1",
                (),
            )
        else:
            row = self._one(
                "get_checkpoint",
                "SELECT height, note FROM ledger_checkpoints WHERE height = %s",
                (height,),
            )
        return None if row is None else (int(row[0]), str(row[1]))

    def put_checkpoint(self, height: int, note: str) -> None:
        self._call("put_checkpoint", lambda c: c.execute(_UPSERT_CHECKPOINT, (height, note)))

    def iter_checkpoints(self) -> Iterator[tuple[int, str]]:
        pages = self._pages(
            "iter_checkpoints", "ledger_checkpoints", "height", "height, note", 0, None
        )
        for h, note in pages:
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
        # consecutive blocks' writes merged in order: a later block's write of a row
        # replaces an earlier one's, as if each had committed on its own
        tree: dict[int, bytes] = {}
        state_changes: dict[bytes, bytes | None] = {}
        smt_writes: dict[bytes, bytes | None] = {}
        # a state tree position is new to the table if the first block of the group
        # that touches it found no node there (a later one may find the first one's)
        smt_new: set[bytes] = set()
        stage: list[tuple[object, ...]] = []
        for w in blocks:
            tree.update((_node_id(lv, ix), h) for (lv, ix), h in w.tree_nodes)
            state_changes.update(w.state_changes)
            if w.smt_new:
                smt_new.update(k for k in w.smt_new if k not in smt_writes)
            smt_writes.update(w.smt_writes)
            stage.extend((_ST_TX, t.index, t.tx_id, t.raw, t.height, t.receipt) for t in w.txs)
            stage.append((_ST_BLOCK, w.block.height, w.block.header, w.block.sig, None, None))
        stage.extend((_ST_TREE, i, None, h, None, None) for i, h in tree.items())
        for w in blocks:
            self._will_store("txs", (t.tx_id for t in w.txs))
        state_new = self._will_store(
            "state", (k for k, v in state_changes.items() if v is not None)
        )
        deleted: tuple[list[bytes], list[bytes]] = ([], [])
        for put, put_new, new, gone, changes in (
            (_ST_STATE, _ST_STATE_NEW, state_new or (), deleted[0], state_changes),
            (_ST_SMT, _ST_SMT_NEW, smt_new, deleted[1], smt_writes),
        ):
            for k, v in changes.items():
                if v is None:
                    gone.append(k)
                else:
                    stage.append((put_new if k in new else put, None, k, v, None, None))
        stage.extend(
            (_ST_CHECKPOINT, w.block.height, None, w.checkpoint.encode("utf-8"), None, None)
            for w in blocks
            if w.checkpoint is not None
        )
        stage.extend(
            (_ST_META, None, k.encode("utf-8"), v, None, None) for k, v in (meta or {}).items()
        )
        last = blocks[-1].block
        first_height = blocks[0].block.height
        heights = f"{first_height}..{last.height}" if len(blocks) > 1 else str(last.height)

        apply = _APPLY_STAGE

        def write(cur: psycopg.Cursor[tuple[Any, ...]]) -> None:
            _copy(cur, _COPY_STAGE, _STAGE_TYPES, stage)
            cur.execute(apply, prepare=True)
            if deleted[0] or deleted[1]:
                cur.execute(_DELETE_KEYS, deleted, prepare=False)

        attempt = 0
        while attempt < 2:
            conn = self._conn()
            try:
                if self._staging is not conn:
                    conn.execute(_STAGING)
                    self._staging = conn
                with conn.transaction(), conn.cursor() as cur:
                    write(cur)
                return
            except psycopg.errors.UniqueViolation as exc:
                if apply is _APPLY_STAGE_UPSERT:
                    raise StorageError(
                        f"postgresql: commit of block {heights} failed: {exc}"
                    ) from exc
                # rolled back; a row taken for new was there (or the block itself
                # is): once more, every row an upsert
                log.warning("commit of block %s: %s; retrying with upserts", heights, exc)
                apply = _APPLY_STAGE_UPSERT
                continue
            except psycopg.OperationalError as exc:
                if attempt == 0 and conn.broken:
                    # The connection dropped: if it dropped during COMMIT the blocks may
                    # be in (all or none: the last one tells); otherwise the server
                    # rolled them back and they can be retried.
                    if self._committed(last):
                        return
                    attempt += 1
                    continue
                raise StorageError(f"postgresql: commit of block {heights} failed: {exc}") from exc
            except psycopg.Error as exc:
                raise StorageError(f"postgresql: commit of block {heights} failed: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _committed(self, block: BlockRecord) -> bool:
        stored = self.get_block(block.height)
        return stored is not None and stored.header == block.header and stored.sig == block.sig

    def close(self) -> None:
        self._closed = True
        self._db.close()
