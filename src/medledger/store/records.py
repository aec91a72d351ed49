"""The encrypted record store: FHIR resource ciphertexts, wrapped record keys, search index.

The ledger holds only a salted commitment to each record version
(``SHA-256(salt || ciphertext)``, see :mod:`medledger.contracts.records_v1`);
this store holds what the commitment commits to, plus each version's record
key wrapped (HPKE) for every recipient allowed to open it, plus a search index
of the current version of every record. Nothing here is plaintext PHI: content
is AES-256-GCM ciphertext, keys are HPKE-wrapped, and search tokens are
HMAC-SHA256 values keyed by the custodian's index key.

Two backends behind one async :class:`RecordStore` protocol:

* :class:`SqliteRecordStore` (``sqlite:///path``): standard-library ``sqlite3``
  in its own file (``datadir/records.db``), WAL with ``synchronous=FULL`` and
  ``secure_delete=ON``; writes run on one dedicated thread and connection,
  reads on a second (read-only) one, so the API stays async, no connection is
  shared between threads, and a read never waits behind a write. Writes are
  *group-committed*: the write calls waiting for the writer thread run together
  in one transaction (each in its own savepoint, so one call's failure leaves
  the others intact) and one ``fsync``; each caller still returns only after
  the transaction holding its write committed. Batch writes insert many rows
  per statement (the thread hands the GIL back and forth once per statement,
  which under load costs more than the rows themselves).
* :class:`PostgresRecordStore` (``postgresql://...``): psycopg 3 async, a small
  pool of connections, tables prefixed ``rec_`` created when missing (they may
  share the node's ledger database).

Every method is atomic (one database transaction, or one savepoint of a group
commit). Backend errors surface as :class:`~medledger.errors.StorageError`; a
version stored twice with different content is a :class:`~medledger.errors.Conflict`.

Batches (bulk import): :meth:`RecordStore.stage_many`,
:meth:`RecordStore.put_versions` and :meth:`RecordStore.unstage_many` do the
work of many single calls in one transaction; :meth:`RecordStore.latest_versions`
answers "which of these records are stored" in one query.

Staging (crash safety of writes)
--------------------------------
Besides the protocol methods of the shared interface, the store keeps *staged*
versions (:meth:`RecordStore.stage`, :meth:`RecordStore.staged`,
:meth:`RecordStore.unstage`): a writer stages the complete encrypted version
durably *before* its ``record.register`` transaction is submitted, and
promotes it with :meth:`RecordStore.put_version` once the ledger committed.
If the process dies in between, or the store fails after the ledger commit,
the staged copy is still there and
:meth:`medledger.services.records.RecordService.recover` (or the next write or
read of the record) promotes it if its commitment is on the ledger, or drops it
if it can never be. Staged versions are invisible to reads and search.

Erasure
-------
:meth:`RecordStore.shred_patient` deletes every wrapped key of the patient's
records and empties their ciphertexts (and staged versions and index rows).
SQLite runs with ``secure_delete`` and truncates its WAL afterwards so the
destroyed bytes do not linger in the files; PostgreSQL leaves dead tuples until
the next ``VACUUM`` (the keys there are still useless without the
organisation's private key, but a real deployment should vacuum).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

from medledger.encoding import decode, encode
from medledger.errors import Conflict, MedledgerError, StorageError

__all__ = [
    "SEARCH_ORDERS",
    "IndexEntry",
    "PostgresRecordStore",
    "RecordStore",
    "RecordVersion",
    "SqliteRecordStore",
    "StagedVersion",
    "WrappedKey",
    "open_record_store",
    "order_key",
]

T = TypeVar("T")

#: Most record ids one :meth:`RecordStore.search` call may filter on (``ids``).
MAX_IDS = 1000
#: Most tokens one search may match on.
MAX_TOKENS = 500
#: Most ``?`` parameters in one SQLite statement (the library's default limit is 32766).
_SQLITE_MAX_VARIABLES = 30_000


@dataclass(frozen=True, slots=True)
class RecordVersion:
    """One encrypted version of a FHIR resource."""

    record: str
    version: int
    patient: str
    custodian: str
    resource_type: str
    salt: bytes  # 32 random bytes; commitment = sha256(salt || ciphertext)  (see records_v1)
    ciphertext: bytes  # aead.encrypt(record_key, fhir_json, record_aad(record, version, patient))
    last_updated: int  # ms
    deleted: bool = False  # a FHIR delete creates a tombstone version (ciphertext b"")


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A version's record key, wrapped for one recipient."""

    record: str
    version: int
    recipient: str  # "org:<org id>" | "patient:<patient id>"
    wrapped: bytes  # kem.wrap_key(..., info=record_aad(record, version, patient))


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """Search index row for the current version of a record (no plaintext PHI)."""

    record: str
    resource_type: str
    patient: str
    custodian: str
    tokens: tuple[bytes, ...]  # HMAC-SHA256(index_key, b"code|system|value") etc.
    date: int | None  # clinically relevant date (ms), e.g. effectiveDateTime
    last_updated: int
    version: int
    deleted: bool


@dataclass(frozen=True, slots=True)
class StagedVersion:
    """A complete version written before its ledger transaction committed."""

    version: RecordVersion
    keys: tuple[WrappedKey, ...]
    index: IndexEntry
    staged_at: int  # ms, when it was staged


class RecordStore(Protocol):
    """Async store of encrypted record versions (one per node)."""

    url: str

    async def put_version(
        self, v: RecordVersion, keys: Sequence[WrappedKey], index: IndexEntry
    ) -> None:
        """Store a version with its wrapped keys and index row, atomically.

        Idempotent when the same (record, version) with identical salt and
        ciphertext exists (missing keys are added); :class:`Conflict` otherwise.
        The index row is replaced only by a version at least as new as the
        indexed one. A staged copy of this version is removed in the same
        transaction.
        """
        ...

    async def get_version(self, record: str, version: int | None = None) -> RecordVersion | None:
        """A stored version (``None``: the latest), or ``None`` if there is none."""
        ...

    async def versions(self, record: str) -> list[RecordVersion]:
        """Every stored version of ``record``, oldest first."""
        ...

    async def get_wrapped(self, record: str, version: int, recipient: str) -> bytes | None:
        """The record key of a version wrapped for ``recipient``, if held."""
        ...

    async def put_wrapped(self, keys: Sequence[WrappedKey]) -> None:
        """Add keys for grantees (idempotent; ignored for missing or shredded versions)."""
        ...

    async def get_sealed(
        self, record: str, version: int, recipient: str
    ) -> tuple[RecordVersion | None, bytes | None]:
        """:meth:`get_version` and :meth:`get_wrapped` of one version in one call (a read)."""
        ...

    async def search(
        self,
        *,
        resource_type: str | None,
        resource_types: Sequence[str] = (),
        patient: str | None = None,
        custodian: str | None = None,
        tokens: Sequence[bytes] = (),
        date_ge: int | None = None,
        date_lt: int | None = None,
        updated_ge: int | None = None,
        updated_lt: int | None = None,
        ids: Sequence[str] = (),
        include_deleted: bool = False,
        offset: int = 0,
        limit: int = 100,
        order: str = "-updated",
    ) -> tuple[list[IndexEntry], int]:
        """``(page, total)`` of index rows in ``order`` (one of :data:`SEARCH_ORDERS`):
        by default newest ``last_updated`` first, then by record.

        ``resource_types`` (besides ``resource_type``), ``tokens`` and ``ids`` match any
        of their values; a date bound excludes rows without a date. Returned tokens are
        sorted and deduplicated.
        """
        ...

    async def shred_patient(self, patient: str) -> int:
        """Destroy every wrapped key and ciphertext of the patient's records.

        Ciphertexts become ``b""``; staged versions and index rows of the patient
        are deleted. Returns how many records lost data (0 when repeated).
        """
        ...

    async def stage(
        self, v: RecordVersion, keys: Sequence[WrappedKey], index: IndexEntry, staged_at: int
    ) -> None:
        """Durably keep a version whose ledger transaction is about to be submitted."""
        ...

    async def staged(self, record: str | None = None) -> list[StagedVersion]:
        """Staged versions (of one record, or all), oldest first."""
        ...

    async def unstage(self, record: str, version: int, salt: bytes) -> None:
        """Forget a staged version (its transaction was refused or can never commit)."""
        ...

    async def stage_many(
        self,
        items: Sequence[tuple[RecordVersion, Sequence[WrappedKey], IndexEntry]],
        staged_at: int,
    ) -> None:
        """:meth:`stage` for many versions in one transaction (all or none)."""
        ...

    async def put_versions(
        self, items: Sequence[tuple[RecordVersion, Sequence[WrappedKey], IndexEntry]]
    ) -> list[Conflict | None]:
        """:meth:`put_version` for many versions in one transaction.

        Returns, per item, ``None`` (stored, or already stored identically) or
        the :class:`Conflict` that item met (nothing of it was written); any
        other failure raises and stores nothing.
        """
        ...

    async def unstage_many(self, items: Sequence[tuple[str, int, bytes]]) -> None:
        """:meth:`unstage` of many ``(record, version, salt)`` in one transaction."""
        ...

    async def latest_versions(self, records: Sequence[str]) -> dict[str, int]:
        """The latest stored version number of each of ``records`` that has one."""
        ...

    async def get_meta(self, key: str) -> bytes | None:
        """A small value the services keep about the store itself (e.g. index format)."""
        ...

    async def set_meta(self, key: str, value: bytes) -> None:
        """Set (or replace) a :meth:`get_meta` value, durably."""
        ...

    async def close(self) -> None: ...


# -- shared helpers ---------------------------------------------------------------------


def _check_version(v: RecordVersion, keys: Sequence[WrappedKey], index: IndexEntry) -> None:
    if v.version < 1:
        raise StorageError("record versions start at 1")
    if index.record != v.record or index.version != v.version:
        raise StorageError("the index entry must describe the version being stored")
    for k in keys:
        if (k.record, k.version) != (v.record, v.version):
            raise StorageError("a wrapped key must belong to the version being stored")


#: The orders :meth:`RecordStore.search` returns rows in: by ``last_updated`` or by the
#: clinical ``date``, newest first (``-``) or oldest first. Rows without a date come
#: last either way; ties go newest ``last_updated`` first, then by record.
SEARCH_ORDERS: dict[str, str] = {
    "-updated": "i.last_updated DESC, i.record",
    "updated": "i.last_updated ASC, i.record",
    "-date": "(i.date IS NULL), i.date DESC, i.last_updated DESC, i.record",
    "date": "(i.date IS NULL), i.date ASC, i.last_updated DESC, i.record",
}


def _order_sql(order: str) -> str:
    try:
        return SEARCH_ORDERS[order]
    except KeyError:
        raise StorageError(f"unknown search order {order!r}") from None


def order_key(order: str) -> Callable[[IndexEntry], tuple[Any, ...]]:
    """The sort key of :data:`SEARCH_ORDERS` ``order`` for entries in memory (to merge
    rows from several sources in the order the store gives its own)."""
    _order_sql(order)
    if order == "-updated":
        return lambda e: (-e.last_updated, e.record)
    if order == "updated":
        return lambda e: (e.last_updated, e.record)
    sign = -1 if order == "-date" else 1
    return lambda e: (e.date is None, sign * (e.date or 0), -e.last_updated, e.record)


def _check_page(offset: int, limit: int, tokens: Sequence[bytes], ids: Sequence[str]) -> None:
    if offset < 0 or limit < 0:
        raise StorageError("offset and limit must not be negative")
    if len(tokens) > MAX_TOKENS or len(ids) > MAX_IDS:
        raise StorageError(f"search takes at most {MAX_TOKENS} tokens and {MAX_IDS} ids")


def _staged_rows(
    items: Sequence[tuple[RecordVersion, Sequence[WrappedKey], IndexEntry]], staged_at: int
) -> list[tuple[Any, ...]]:
    """The staging table rows of ``items`` (each checked first), for either backend."""
    rows: list[tuple[Any, ...]] = []
    for v, keys, index in items:
        _check_version(v, keys, index)
        rows.append(
            (v.record, v.version, v.salt, v.patient, staged_at, _encode_staged(v, keys, index))
        )
    return rows


def _encode_staged(v: RecordVersion, keys: Sequence[WrappedKey], index: IndexEntry) -> bytes:
    return encode(
        {
            "v": [
                v.record,
                v.version,
                v.patient,
                v.custodian,
                v.resource_type,
                v.salt,
                v.ciphertext,
                v.last_updated,
                v.deleted,
            ],
            "keys": [[k.recipient, k.wrapped] for k in keys],
            "index": [
                index.resource_type,
                index.patient,
                index.custodian,
                sorted(set(index.tokens)),
                index.date,
                index.last_updated,
                index.version,
                index.deleted,
            ],
        }
    )


def _decode_staged(raw: bytes, staged_at: int) -> StagedVersion:
    doc = decode(raw)
    v = RecordVersion(*doc["v"])
    keys = tuple(WrappedKey(v.record, v.version, r, w) for r, w in doc["keys"])
    rt, patient, custodian, tokens, date, updated, version, deleted = doc["index"]
    index = IndexEntry(
        v.record, rt, patient, custodian, tuple(tokens), date, updated, version, deleted
    )
    return StagedVersion(v, keys, index, staged_at)


def _search_sql(
    ph: str,
    *,
    resource_type: str | None,
    resource_types: Sequence[str],
    patient: str | None,
    custodian: str | None,
    tokens: Sequence[bytes],
    date_ge: int | None,
    date_lt: int | None,
    updated_ge: int | None,
    updated_lt: int | None,
    ids: Sequence[str],
    include_deleted: bool,
) -> tuple[str, list[Any]]:
    """The WHERE clause (and its parameters) of a search, with placeholder ``ph``."""
    conds: list[str] = []
    params: list[Any] = []

    def eq(column: str, op: str, value: Any) -> None:
        conds.append(f"i.{column} {op} {ph}")
        params.append(value)

    def any_of(column: str, values: Sequence[Any]) -> None:
        uniq = list(dict.fromkeys(values))
        conds.append(f"i.{column} IN ({', '.join([ph] * len(uniq))})")
        params.extend(uniq)

    if resource_type is not None:
        eq("resource_type", "=", resource_type)
    if resource_types:
        any_of("resource_type", resource_types)
    if patient is not None:
        eq("patient", "=", patient)
    if custodian is not None:
        eq("custodian", "=", custodian)
    if date_ge is not None:
        eq("date", ">=", date_ge)
    if date_lt is not None:
        eq("date", "<", date_lt)
    if updated_ge is not None:
        eq("last_updated", ">=", updated_ge)
    if updated_lt is not None:
        eq("last_updated", "<", updated_lt)
    if not include_deleted:
        eq("deleted", "=", False)
    if ids:
        any_of("record", ids)
    if tokens:
        uniq_t = list(dict.fromkeys(bytes(t) for t in tokens))
        conds.append(
            "EXISTS (SELECT 1 FROM rec_tokens t WHERE t.record = i.record AND t.token IN "
            f"({', '.join([ph] * len(uniq_t))}))"
        )
        params.extend(uniq_t)
    where = " AND ".join(conds) if conds else "TRUE"
    return where, params


_INDEX_COLUMNS = "i.record, i.resource_type, i.patient, i.custodian, i.date, i.last_updated, " + (
    "i.version, i.deleted"
)
_VERSION_COLUMNS = (
    "record, version, patient, custodian, resource_type, salt, ciphertext, last_updated, deleted"
)


def _version_row(row: Sequence[Any]) -> RecordVersion:
    return RecordVersion(
        str(row[0]),
        int(row[1]),
        str(row[2]),
        str(row[3]),
        str(row[4]),
        bytes(row[5]),
        bytes(row[6]),
        int(row[7]),
        bool(row[8]),
    )


def _index_rows(rows: Sequence[Sequence[Any]], tokens: dict[str, list[bytes]]) -> list[IndexEntry]:
    return [
        IndexEntry(
            str(r[0]),
            str(r[1]),
            str(r[2]),
            str(r[3]),
            tuple(sorted(tokens.get(str(r[0]), []))),
            None if r[4] is None else int(r[4]),
            int(r[5]),
            int(r[6]),
            bool(r[7]),
        )
        for r in rows
    ]


# -- SQLite ---------------------------------------------------------------------------

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS rec_versions (
    record TEXT NOT NULL, version INTEGER NOT NULL, patient TEXT NOT NULL,
    custodian TEXT NOT NULL, resource_type TEXT NOT NULL, salt BLOB NOT NULL,
    ciphertext BLOB NOT NULL, last_updated INTEGER NOT NULL, deleted INTEGER NOT NULL,
    UNIQUE (record, version));
CREATE INDEX IF NOT EXISTS rec_versions_patient ON rec_versions (patient);
CREATE TABLE IF NOT EXISTS rec_keys (
    record TEXT NOT NULL, version INTEGER NOT NULL, recipient TEXT NOT NULL,
    wrapped BLOB NOT NULL, PRIMARY KEY (record, version, recipient)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rec_index (
    record TEXT PRIMARY KEY, resource_type TEXT NOT NULL, patient TEXT NOT NULL,
    custodian TEXT NOT NULL, date INTEGER, last_updated INTEGER NOT NULL,
    version INTEGER NOT NULL, deleted INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rec_index_type ON rec_index (resource_type, last_updated, record);
CREATE INDEX IF NOT EXISTS rec_index_patient ON rec_index (patient, resource_type);
CREATE TABLE IF NOT EXISTS rec_tokens (
    token BLOB NOT NULL, record TEXT NOT NULL, PRIMARY KEY (token, record)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rec_tokens_record ON rec_tokens (record);
CREATE TABLE IF NOT EXISTS rec_staging (
    record TEXT NOT NULL, version INTEGER NOT NULL, salt BLOB NOT NULL, patient TEXT NOT NULL,
    staged_at INTEGER NOT NULL, item BLOB NOT NULL, UNIQUE (record, version, salt));
CREATE INDEX IF NOT EXISTS rec_staging_patient ON rec_staging (patient);
CREATE TABLE IF NOT EXISTS rec_meta (k TEXT PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;
"""
#: ``rec_versions`` is a rowid table (its rows hold ciphertexts, a few kB each): as a
#: WITHOUT ROWID table (files written before) it took about twice the space and half as
#: long again to write. Older files keep their table; the two answer the same statements.
#: Staged versions lived in ``rec_staged`` (WITHOUT ROWID) until staged rows, a few kB
#: each, moved to the rowid table ``rec_staging`` (about half the cost per row written):
#: moved over when a store opens.
_SQLITE_MIGRATE_STAGED = (
    "INSERT OR REPLACE INTO rec_staging (record, version, salt, patient, staged_at, item) "
    "SELECT record, version, salt, patient, staged_at, item FROM rec_staged",
    "DROP TABLE rec_staged",
)


@contextmanager
def _sqlite_errors(what: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise StorageError(f"record store (sqlite): {what}: {exc}") from exc


def _sqlite_put(
    db: sqlite3.Connection, v: RecordVersion, keys: Sequence[WrappedKey], index: IndexEntry
) -> None:
    """The body of :meth:`SqliteRecordStore.put_version` (inside a transaction).

    A :class:`Conflict` is raised before anything of the version is written.
    """
    cur = db.execute(
        f"INSERT OR IGNORE INTO rec_versions ({_VERSION_COLUMNS}) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            v.record,
            v.version,
            v.patient,
            v.custodian,
            v.resource_type,
            v.salt,
            v.ciphertext,
            v.last_updated,
            int(v.deleted),
        ),
    )
    if cur.rowcount == 0:
        row = db.execute(
            "SELECT salt, ciphertext FROM rec_versions WHERE record = ? AND version = ?",
            (v.record, v.version),
        ).fetchone()
        if row is None or bytes(row[0]) != v.salt or bytes(row[1]) != v.ciphertext:
            raise Conflict(
                f"record {v.record} version {v.version} is already stored with other content"
            )
    db.executemany(
        "INSERT OR IGNORE INTO rec_keys (record, version, recipient, wrapped) VALUES (?, ?, ?, ?)",
        [(k.record, k.version, k.recipient, k.wrapped) for k in keys],
    )
    updated = db.execute(
        "INSERT INTO rec_index (record, resource_type, patient, custodian, date, "
        "last_updated, version, deleted) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (record) DO UPDATE SET resource_type = excluded.resource_type, "
        "patient = excluded.patient, custodian = excluded.custodian, "
        "date = excluded.date, last_updated = excluded.last_updated, "
        "version = excluded.version, deleted = excluded.deleted "
        "WHERE excluded.version >= rec_index.version RETURNING record",
        (
            index.record,
            index.resource_type,
            index.patient,
            index.custodian,
            index.date,
            index.last_updated,
            index.version,
            int(index.deleted),
        ),
    ).fetchall()
    if updated:
        db.execute("DELETE FROM rec_tokens WHERE record = ?", (index.record,))
        db.executemany(
            "INSERT OR IGNORE INTO rec_tokens (token, record) VALUES (?, ?)",
            [(bytes(t), index.record) for t in set(index.tokens)],
        )
    db.execute("DELETE FROM rec_staging WHERE record = ? AND version = ?", (v.record, v.version))


def _insert_rows(
    db: sqlite3.Connection, head: str, rows: Sequence[tuple[Any, ...]], tail: str = ""
) -> None:
    """``head VALUES (..), (..) tail`` for many rows in as few statements as possible.

    One statement runs in one step of the SQLite engine, so the store thread
    gives up and takes back the GIL once per statement rather than once per row.
    """
    if not rows:
        return
    width = len(rows[0])
    per = max(1, _SQLITE_MAX_VARIABLES // width)
    one = "(" + ", ".join("?" * width) + ")"
    for part in _chunks(rows, per):
        db.execute(
            f"{head} VALUES {', '.join([one] * len(part))} {tail}",
            [value for row in part for value in row],
        )


def _sqlite_put_many(
    db: sqlite3.Connection, items: Sequence[tuple[RecordVersion, Sequence[WrappedKey], IndexEntry]]
) -> list[Conflict | None]:
    """:func:`_sqlite_put` of many versions, a few statements for all (same outcome)."""
    if len({v.record for v, _, _ in items}) < len(items):
        # a record twice: the index rule depends on the order; one version at a time
        out: list[Conflict | None] = []
        for v, keys, index in items:
            try:
                _sqlite_put(db, v, keys, index)
            except Conflict as exc:
                out.append(exc)
            else:
                out.append(None)
        return out
    records = [v.record for v, _, _ in items]
    stored: dict[tuple[str, int], tuple[bytes, bytes]] = {}
    indexed: dict[str, int] = {}
    for part in _chunks(records, _SQLITE_MAX_VARIABLES):
        marks = ", ".join("?" * len(part))
        for r, n, salt, ct in db.execute(
            f"SELECT record, version, salt, ciphertext FROM rec_versions WHERE record IN ({marks})",
            list(part),
        ):
            stored[(str(r), int(n))] = (bytes(salt), bytes(ct))
        for r, n in db.execute(
            f"SELECT record, version FROM rec_index WHERE record IN ({marks})", list(part)
        ):
            indexed[str(r)] = int(n)
    results: list[Conflict | None] = []
    ok: list[tuple[RecordVersion, Sequence[WrappedKey], IndexEntry]] = []
    for v, keys, index in items:
        have = stored.get((v.record, v.version))
        if have is not None and have != (v.salt, v.ciphertext):
            results.append(
                Conflict(
                    f"record {v.record} version {v.version} is already stored with other content"
                )
            )
            continue
        results.append(None)
        ok.append((v, keys, index))
    _insert_rows(
        db,
        f"INSERT OR IGNORE INTO rec_versions ({_VERSION_COLUMNS})",
        [
            (
                v.record,
                v.version,
                v.patient,
                v.custodian,
                v.resource_type,
                v.salt,
                v.ciphertext,
                v.last_updated,
                int(v.deleted),
            )
            for v, _, _ in ok
            if (v.record, v.version) not in stored
        ],
    )
    _insert_rows(
        db,
        "INSERT OR IGNORE INTO rec_keys (record, version, recipient, wrapped)",
        [(k.record, k.version, k.recipient, k.wrapped) for _, keys, _ in ok for k in keys],
    )
    # the index row follows the newest version (the rule of the upsert in _sqlite_put)
    newer = [index for _, _, index in ok if index.version >= indexed.get(index.record, 0)]
    _insert_rows(
        db,
        "INSERT INTO rec_index (record, resource_type, patient, custodian, date, "
        "last_updated, version, deleted)",
        [
            (
                i.record,
                i.resource_type,
                i.patient,
                i.custodian,
                i.date,
                i.last_updated,
                i.version,
                int(i.deleted),
            )
            for i in newer
        ],
        "ON CONFLICT (record) DO UPDATE SET resource_type = excluded.resource_type, "
        "patient = excluded.patient, custodian = excluded.custodian, "
        "date = excluded.date, last_updated = excluded.last_updated, "
        "version = excluded.version, deleted = excluded.deleted",
    )
    replaced = [i.record for i in newer if i.record in indexed]
    for part in _chunks(replaced, _SQLITE_MAX_VARIABLES):
        db.execute(
            f"DELETE FROM rec_tokens WHERE record IN ({', '.join('?' * len(part))})", list(part)
        )
    _insert_rows(
        db,
        "INSERT OR IGNORE INTO rec_tokens (token, record)",
        [(bytes(t), i.record) for i in newer for t in sorted(set(i.tokens))],
    )
    done = [(v.record, v.version) for v, _, _ in ok]
    for pairs in _chunks(done, _SQLITE_MAX_VARIABLES // 2):
        db.execute(
            "DELETE FROM rec_staging WHERE (record, version) IN "
            f"(VALUES {', '.join(['(?, ?)'] * len(pairs))})",
            [x for pair in pairs for x in pair],
        )
    return results


def _chunks(items: Sequence[T], size: int = 500) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass(slots=True)
class _Job:
    """A write waiting for the next group commit."""

    what: str
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def _resolve(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():  # the caller was cancelled; its write ran (or not) all the same
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class SqliteRecordStore:
    """A :class:`RecordStore` in one SQLite file: one writer thread, one reader thread.

    Writes (group-committed) run on the writer's connection; reads run on a
    second connection in their own thread, so a read never waits behind a
    batch being written (WAL: a read sees every transaction committed before
    it starts, so a caller always reads its own acknowledged writes).
    """

    def __init__(
        self,
        path: Path,
        db: sqlite3.Connection,
        executor: ThreadPoolExecutor,
        reader: sqlite3.Connection,
        reader_executor: ThreadPoolExecutor,
    ) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self._db = db
        self._io = executor
        self._rdb = reader
        self._rio = reader_executor
        self._closed = False
        self._pending: list[_Job] = []
        self._pending_lock = threading.Lock()
        self._flushing = False  # a group commit is queued on (or running in) the thread

    @classmethod
    async def open(cls, path: str | Path) -> SqliteRecordStore:
        p = Path(path)
        io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medledger-records")
        rio = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medledger-records-read")
        loop = asyncio.get_running_loop()

        def _open() -> sqlite3.Connection:
            with _sqlite_errors("open"):
                p.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(str(p), isolation_level=None, check_same_thread=False)
                try:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("PRAGMA synchronous=FULL")
                    db.execute("PRAGMA secure_delete=ON")
                    db.execute("PRAGMA busy_timeout=10000")
                    db.executescript(_SQLITE_SCHEMA)
                    if db.execute(
                        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'rec_staged'"
                    ).fetchone():
                        db.execute("BEGIN IMMEDIATE")
                        for sql in _SQLITE_MIGRATE_STAGED:
                            db.execute(sql)
                        db.execute("COMMIT")
                except BaseException:
                    db.close()
                    raise
                return db

        def _open_reader() -> sqlite3.Connection:
            with _sqlite_errors("open"):
                db = sqlite3.connect(str(p), isolation_level=None, check_same_thread=False)
                try:
                    db.execute("PRAGMA busy_timeout=10000")
                    db.execute("PRAGMA query_only=ON")
                except BaseException:
                    db.close()
                    raise
                return db

        db: sqlite3.Connection | None = None
        try:
            db = await loop.run_in_executor(io, _open)
            reader = await loop.run_in_executor(rio, _open_reader)
        except BaseException:
            if db is not None:
                await loop.run_in_executor(io, db.close)
            io.shutdown(wait=False)
            rio.shutdown(wait=False)
            raise
        return cls(p, db, io, reader, rio)

    async def _run(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read ``fn`` on the reader connection (its own thread)."""
        if self._closed:
            raise StorageError("the record store is closed")

        def call() -> T:
            with _sqlite_errors(what):
                return fn(self._rdb)

        return await asyncio.get_running_loop().run_in_executor(self._rio, call)

    async def _run_writer(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the writer connection outside a transaction (e.g. a checkpoint)."""
        if self._closed:
            raise StorageError("the record store is closed")

        def call() -> T:
            with _sqlite_errors(what):
                return fn(self._db)

        return await asyncio.get_running_loop().run_in_executor(self._io, call)

    async def _tx(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in the next group commit; return once that transaction committed.

        Every write waiting when the store thread becomes free joins one
        ``BEGIN IMMEDIATE`` ... ``COMMIT`` (one ``fsync`` for all), each in its
        own savepoint: ``fn`` raising rolls back its own changes only. If the
        transaction itself fails, every write of it fails with StorageError.
        """
        if self._closed:
            raise StorageError("the record store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._pending_lock:
            self._pending.append(_Job(what, fn, future, loop))
            start = not self._flushing
            self._flushing = True
        if start:
            self._schedule_flush()
        return await future

    def _schedule_flush(self) -> None:
        try:
            self._io.submit(self._flush)
        except RuntimeError:  # the executor was shut down (store closed)
            self._fail_pending(StorageError("the record store is closed"))

    def _fail_pending(self, exc: StorageError) -> None:
        with self._pending_lock:
            jobs, self._pending = self._pending, []
            self._flushing = False
        for job in jobs:
            job.loop.call_soon_threadsafe(_resolve, job.future, False, exc)

    def _flush(self) -> None:
        """One group commit of the waiting writes (on the store thread)."""
        with self._pending_lock:
            jobs, self._pending = self._pending, []
        results: list[tuple[bool, Any]] = []
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                for job in jobs:
                    db.execute("SAVEPOINT job")
                    try:
                        value = job.fn(db)
                    except sqlite3.Error as exc:
                        db.execute("ROLLBACK TO job")
                        db.execute("RELEASE job")
                        err = StorageError(f"record store (sqlite): {job.what}: {exc}")
                        err.__cause__ = exc
                        results.append((False, err))
                    except Exception as exc:  # Conflict, StorageError: this write only
                        db.execute("ROLLBACK TO job")
                        db.execute("RELEASE job")
                        results.append((False, exc))
                    else:
                        db.execute("RELEASE job")
                        results.append((True, value))
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
        except Exception as exc:  # the transaction failed: none of its writes happened
            what = ", ".join(sorted({j.what for j in jobs}))
            err = StorageError(f"record store (sqlite): {what}: {exc}")
            err.__cause__ = exc
            results = [(False, err)] * len(jobs)
        for job, (ok, value) in zip(jobs, results, strict=True):
            job.loop.call_soon_threadsafe(_resolve, job.future, ok, value)
        with self._pending_lock:
            again = bool(self._pending)
            self._flushing = again
        if again:  # re-queue behind the reads submitted meanwhile, so they are not starved
            self._schedule_flush()

    # -- writes -------------------------------------------------------------------------
    async def put_version(
        self, v: RecordVersion, keys: Sequence[WrappedKey], index: IndexEntry
    ) -> None:
        _check_version(v, keys, index)
        await self._tx("put_version", lambda db: _sqlite_put(db, v, keys, index))

    async def put_versions(
        self, items: Sequence[tuple[RecordVersion, Sequence[WrappedKey], IndexEntry]]
    ) -> list[Conflict | None]:
        for v, keys, index in items:
            _check_version(v, keys, index)
        if not items:
            return []

        return await self._tx("put_versions", lambda db: _sqlite_put_many(db, items))

    async def put_wrapped(self, keys: Sequence[WrappedKey]) -> None:
        if not keys:
            return

        def put(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT OR IGNORE INTO rec_keys (record, version, recipient, wrapped) "
                "SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM rec_versions "
                "WHERE record = ? AND version = ? AND length(ciphertext) > 0)",
                [(k.record, k.version, k.recipient, k.wrapped, k.record, k.version) for k in keys],
            )

        await self._tx("put_wrapped", put)

    async def stage(
        self, v: RecordVersion, keys: Sequence[WrappedKey], index: IndexEntry, staged_at: int
    ) -> None:
        await self.stage_many([(v, keys, index)], staged_at)

    async def stage_many(
        self,
        items: Sequence[tuple[RecordVersion, Sequence[WrappedKey], IndexEntry]],
        staged_at: int,
    ) -> None:
        rows = _staged_rows(items, staged_at)
        if not rows:
            return

        def put(db: sqlite3.Connection) -> None:
            _insert_rows(
                db,
                "INSERT OR REPLACE INTO rec_staging (record, version, salt, patient, staged_at, "
                "item)",
                rows,
            )

        await self._tx("stage", put)

    async def staged(self, record: str | None = None) -> list[StagedVersion]:
        def get(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
            if record is None:
                return db.execute(
                    "SELECT item, staged_at FROM rec_staging ORDER BY staged_at, record, version"
                ).fetchall()
            return db.execute(
                "SELECT item, staged_at FROM rec_staging WHERE record = ? "
                "ORDER BY staged_at, version",
                (record,),
            ).fetchall()

        rows = await self._run("staged", get)
        return [_decode_staged(bytes(r[0]), int(r[1])) for r in rows]

    async def unstage(self, record: str, version: int, salt: bytes) -> None:
        await self.unstage_many([(record, version, salt)])

    async def unstage_many(self, items: Sequence[tuple[str, int, bytes]]) -> None:
        rows = [(r, int(n), bytes(salt)) for r, n, salt in items]
        if not rows:
            return

        def delete(db: sqlite3.Connection) -> None:
            db.executemany(
                "DELETE FROM rec_staging WHERE record = ? AND version = ? AND salt = ?", rows
            )

        await self._tx("unstage", delete)

    async def latest_versions(self, records: Sequence[str]) -> dict[str, int]:
        ids = list(dict.fromkeys(records))

        def get(db: sqlite3.Connection) -> dict[str, int]:
            out: dict[str, int] = {}
            for part in _chunks(ids):
                out.update(
                    (str(r), int(n))
                    for r, n in db.execute(
                        "SELECT record, MAX(version) FROM rec_versions WHERE record IN "
                        f"({', '.join('?' * len(part))}) GROUP BY record",
                        list(part),
                    )
                )
            return out

        return await self._run("latest_versions", get) if ids else {}

    async def get_meta(self, key: str) -> bytes | None:
        def get(db: sqlite3.Connection) -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = db.execute(
                "SELECT v FROM rec_meta WHERE k = ?", (key,)
            ).fetchone()
            return row

        row = await self._run("get_meta", get)
        return None if row is None else bytes(row[0])

    async def set_meta(self, key: str, value: bytes) -> None:
        def put(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO rec_meta(k, v) VALUES (?, ?)", (key, bytes(value)))

        await self._tx("set_meta", put)

    async def shred_patient(self, patient: str) -> int:
        def shred(db: sqlite3.Connection) -> int:
            affected = {
                str(r[0])
                for r in db.execute(
                    "SELECT DISTINCT v.record FROM rec_versions v WHERE v.patient = ? AND "
                    "(length(v.ciphertext) > 0 OR EXISTS (SELECT 1 FROM rec_keys k "
                    "WHERE k.record = v.record AND k.version = v.version))",
                    (patient,),
                )
            }
            db.execute(
                "DELETE FROM rec_keys WHERE record IN "
                "(SELECT record FROM rec_versions WHERE patient = ?)",
                (patient,),
            )
            db.execute(
                "UPDATE rec_versions SET ciphertext = x'' WHERE patient = ? "
                "AND length(ciphertext) > 0",
                (patient,),
            )
            db.execute(
                "DELETE FROM rec_tokens WHERE record IN "
                "(SELECT record FROM rec_index WHERE patient = ?)",
                (patient,),
            )
            db.execute("DELETE FROM rec_index WHERE patient = ?", (patient,))
            db.execute("DELETE FROM rec_staging WHERE patient = ?", (patient,))
            return len(affected)

        count = await self._tx("shred_patient", shred)
        # move the WAL into the database (secure_delete zeroes freed content) and empty it,
        # so the destroyed keys and ciphertexts do not linger in the -wal file
        await self._run_writer(
            "checkpoint", lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        )
        return count

    # -- reads --------------------------------------------------------------------------
    async def get_version(self, record: str, version: int | None = None) -> RecordVersion | None:
        def get(db: sqlite3.Connection) -> tuple[Any, ...] | None:
            if version is None:
                row = db.execute(
                    f"SELECT {_VERSION_COLUMNS} FROM rec_versions WHERE record = ? "
                    "ORDER BY version DESC LIMIT 1",
                    (record,),
                ).fetchone()
            else:
                row = db.execute(
                    f"SELECT {_VERSION_COLUMNS} FROM rec_versions WHERE record = ? AND version = ?",
                    (record, version),
                ).fetchone()
            return None if row is None else tuple(row)

        row = await self._run("get_version", get)
        return None if row is None else _version_row(row)

    async def versions(self, record: str) -> list[RecordVersion]:
        def get(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return db.execute(
                f"SELECT {_VERSION_COLUMNS} FROM rec_versions WHERE record = ? ORDER BY version",
                (record,),
            ).fetchall()

        return [_version_row(r) for r in await self._run("versions", get)]

    async def get_wrapped(self, record: str, version: int, recipient: str) -> bytes | None:
        def get(db: sqlite3.Connection) -> tuple[Any, ...] | None:
            row = db.execute(
                "SELECT wrapped FROM rec_keys WHERE record = ? AND version = ? AND recipient = ?",
                (record, version, recipient),
            ).fetchone()
            return None if row is None else tuple(row)

        row = await self._run("get_wrapped", get)
        return None if row is None else bytes(row[0])

    async def get_sealed(
        self, record: str, version: int, recipient: str
    ) -> tuple[RecordVersion | None, bytes | None]:
        def get(db: sqlite3.Connection) -> tuple[RecordVersion | None, bytes | None]:
            db.execute("BEGIN")  # one snapshot for both
            try:
                row = db.execute(
                    f"SELECT {_VERSION_COLUMNS} FROM rec_versions WHERE record = ? AND version = ?",
                    (record, version),
                ).fetchone()
                key = db.execute(
                    "SELECT wrapped FROM rec_keys WHERE record = ? AND version = ? "
                    "AND recipient = ?",
                    (record, version, recipient),
                ).fetchone()
            finally:
                db.execute("COMMIT")
            return (
                None if row is None else _version_row(row),
                None if key is None else bytes(key[0]),
            )

        return await self._run("get_sealed", get)

    async def search(
        self,
        *,
        resource_type: str | None,
        resource_types: Sequence[str] = (),
        patient: str | None = None,
        custodian: str | None = None,
        tokens: Sequence[bytes] = (),
        date_ge: int | None = None,
        date_lt: int | None = None,
        updated_ge: int | None = None,
        updated_lt: int | None = None,
        ids: Sequence[str] = (),
        include_deleted: bool = False,
        offset: int = 0,
        limit: int = 100,
        order: str = "-updated",
    ) -> tuple[list[IndexEntry], int]:
        _check_page(offset, limit, tokens, ids)
        order_by = _order_sql(order)
        where, params = _search_sql(
            "?",
            resource_type=resource_type,
            resource_types=resource_types,
            patient=patient,
            custodian=custodian,
            tokens=tokens,
            date_ge=date_ge,
            date_lt=date_lt,
            updated_ge=updated_ge,
            updated_lt=updated_lt,
            ids=ids,
            include_deleted=include_deleted,
        )

        def run(db: sqlite3.Connection) -> tuple[list[IndexEntry], int]:
            db.execute("BEGIN")  # one snapshot for the page and the total
            try:
                total = int(
                    db.execute(
                        f"SELECT COUNT(*) FROM rec_index i WHERE {where}", params
                    ).fetchone()[0]
                )
                rows = db.execute(
                    f"SELECT {_INDEX_COLUMNS} FROM rec_index i WHERE {where} "
                    f"ORDER BY {order_by} LIMIT ? OFFSET ?",
                    [*params, limit, offset],
                ).fetchall()
                toks: dict[str, list[bytes]] = {}
                if rows:
                    recs = [r[0] for r in rows]
                    for rec, tok in db.execute(
                        "SELECT record, token FROM rec_tokens WHERE record IN "
                        f"({', '.join('?' * len(recs))})",
                        recs,
                    ):
                        toks.setdefault(str(rec), []).append(bytes(tok))
            finally:
                db.execute("COMMIT")
            return _index_rows(rows, toks), total

        return await self._run("search", run)

    async def close(self) -> None:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        self._closed = True
        try:
            await loop.run_in_executor(self._rio, self._rdb.close)
            await loop.run_in_executor(self._io, self._db.close)  # after queued group commits
        finally:
            self._rio.shutdown(wait=True)
            self._io.shutdown(wait=True)


# -- PostgreSQL -----------------------------------------------------------------------

_PG_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS rec_versions (
        record TEXT NOT NULL, version BIGINT NOT NULL, patient TEXT NOT NULL,
        custodian TEXT NOT NULL, resource_type TEXT NOT NULL, salt BYTEA NOT NULL,
        ciphertext BYTEA NOT NULL, last_updated BIGINT NOT NULL, deleted BOOLEAN NOT NULL,
        PRIMARY KEY (record, version))""",
    "CREATE INDEX IF NOT EXISTS rec_versions_patient ON rec_versions (patient)",
    """CREATE TABLE IF NOT EXISTS rec_keys (
        record TEXT NOT NULL, version BIGINT NOT NULL, recipient TEXT NOT NULL,
        wrapped BYTEA NOT NULL, PRIMARY KEY (record, version, recipient))""",
    """CREATE TABLE IF NOT EXISTS rec_index (
        record TEXT PRIMARY KEY, resource_type TEXT NOT NULL, patient TEXT NOT NULL,
        custodian TEXT NOT NULL, date BIGINT, last_updated BIGINT NOT NULL,
        version BIGINT NOT NULL, deleted BOOLEAN NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS rec_index_type ON rec_index (resource_type, last_updated, record)",
    "CREATE INDEX IF NOT EXISTS rec_index_patient ON rec_index (patient, resource_type)",
    """CREATE TABLE IF NOT EXISTS rec_tokens (
        token BYTEA NOT NULL, record TEXT NOT NULL, PRIMARY KEY (token, record))""",
    "CREATE INDEX IF NOT EXISTS rec_tokens_record ON rec_tokens (record)",
    """CREATE TABLE IF NOT EXISTS rec_staged (
        record TEXT NOT NULL, version BIGINT NOT NULL, salt BYTEA NOT NULL,
        patient TEXT NOT NULL, staged_at BIGINT NOT NULL, item BYTEA NOT NULL,
        PRIMARY KEY (record, version, salt))""",
    "CREATE INDEX IF NOT EXISTS rec_staged_patient ON rec_staged (patient)",
    "CREATE TABLE IF NOT EXISTS rec_meta (k TEXT PRIMARY KEY, v BYTEA NOT NULL)",
]
#: advisory lock id taken while creating the schema (concurrent openers do not race)
_PG_SCHEMA_LOCK = 0x6D65_6472_6563  # "medrec"


async def _pg_put(
    conn: Any, v: RecordVersion, keys: Sequence[WrappedKey], index: IndexEntry
) -> None:
    """The body of :meth:`PostgresRecordStore.put_version` (inside a transaction)."""
    cur = await conn.execute(
        f"INSERT INTO rec_versions ({_VERSION_COLUMNS}) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (record, version) DO NOTHING RETURNING record",
        (
            v.record,
            v.version,
            v.patient,
            v.custodian,
            v.resource_type,
            v.salt,
            v.ciphertext,
            v.last_updated,
            v.deleted,
        ),
    )
    if await cur.fetchone() is None:
        cur = await conn.execute(
            "SELECT salt, ciphertext FROM rec_versions WHERE record = %s AND version = %s",
            (v.record, v.version),
        )
        row = await cur.fetchone()
        if row is None or bytes(row[0]) != v.salt or bytes(row[1]) != v.ciphertext:
            raise Conflict(
                f"record {v.record} version {v.version} is already stored with other content"
            )
    if keys:
        async with conn.cursor() as c:
            await c.executemany(
                "INSERT INTO rec_keys (record, version, recipient, wrapped) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                [(k.record, k.version, k.recipient, k.wrapped) for k in keys],
            )
    cur = await conn.execute(
        "INSERT INTO rec_index AS r (record, resource_type, patient, custodian, date, "
        "last_updated, version, deleted) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (record) DO UPDATE SET resource_type = excluded.resource_type, "
        "patient = excluded.patient, custodian = excluded.custodian, "
        "date = excluded.date, last_updated = excluded.last_updated, "
        "version = excluded.version, deleted = excluded.deleted "
        "WHERE excluded.version >= r.version RETURNING r.record",
        (
            index.record,
            index.resource_type,
            index.patient,
            index.custodian,
            index.date,
            index.last_updated,
            index.version,
            index.deleted,
        ),
    )
    if await cur.fetchone() is not None:
        await conn.execute("DELETE FROM rec_tokens WHERE record = %s", (index.record,))
        if index.tokens:
            async with conn.cursor() as c:
                await c.executemany(
                    "INSERT INTO rec_tokens (token, record) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                    [(bytes(t), index.record) for t in set(index.tokens)],
                )
    await conn.execute(
        "DELETE FROM rec_staged WHERE record = %s AND version = %s",
        (v.record, v.version),
    )


class PostgresRecordStore:
    """A :class:`RecordStore` in PostgreSQL tables prefixed ``rec_`` (psycopg 3 async)."""

    def __init__(self, url: str, conns: list[Any]) -> None:
        self.url = url
        self._all = conns
        self._pool: asyncio.Queue[Any] = asyncio.Queue()
        for c in conns:
            self._pool.put_nowait(c)
        self._closed = False

    @classmethod
    async def open(cls, url: str, *, pool_size: int = 4) -> PostgresRecordStore:
        import psycopg

        conns: list[Any] = []
        try:
            for _ in range(max(1, pool_size)):
                conns.append(await psycopg.AsyncConnection.connect(url, autocommit=True))
            async with conns[0].transaction():
                await conns[0].execute("SELECT pg_advisory_xact_lock(%s)", (_PG_SCHEMA_LOCK,))
                for stmt in _PG_SCHEMA:
                    await conns[0].execute(stmt)
        except psycopg.Error as exc:
            for c in conns:
                await c.close()
            raise StorageError(f"record store (postgresql): open: {exc}") from exc
        return cls(url, conns)

    async def _run(self, what: str, fn: Callable[[Any], Any], *, tx: bool = True) -> Any:
        """Run ``fn(conn)`` on a pooled connection (in one transaction unless ``tx`` is off)."""
        import psycopg

        if self._closed:
            raise StorageError("the record store is closed")
        conn = await self._pool.get()
        try:
            if tx:
                async with conn.transaction():
                    return await fn(conn)
            return await fn(conn)
        except psycopg.Error as exc:
            raise StorageError(f"record store (postgresql): {what}: {exc}") from exc
        finally:
            self._pool.put_nowait(conn)

    # -- writes -------------------------------------------------------------------------
    async def put_version(
        self, v: RecordVersion, keys: Sequence[WrappedKey], index: IndexEntry
    ) -> None:
        _check_version(v, keys, index)

        async def put(conn: Any) -> None:
            await _pg_put(conn, v, keys, index)

        await self._run("put_version", put)

    async def put_versions(
        self, items: Sequence[tuple[RecordVersion, Sequence[WrappedKey], IndexEntry]]
    ) -> list[Conflict | None]:
        for v, keys, index in items:
            _check_version(v, keys, index)
        if not items:
            return []

        async def put(conn: Any) -> list[Conflict | None]:
            out: list[Conflict | None] = []
            for v, keys, index in items:
                try:
                    await _pg_put(conn, v, keys, index)
                except Conflict as exc:
                    out.append(exc)
                else:
                    out.append(None)
            return out

        result: list[Conflict | None] = await self._run("put_versions", put)
        return result

    async def put_wrapped(self, keys: Sequence[WrappedKey]) -> None:
        if not keys:
            return

        async def put(conn: Any) -> None:
            async with conn.cursor() as c:
                await c.executemany(
                    "INSERT INTO rec_keys (record, version, recipient, wrapped) "
                    "SELECT %s, %s, %s, %s WHERE EXISTS (SELECT 1 FROM rec_versions "
                    "WHERE record = %s AND version = %s AND length(ciphertext) > 0) "
                    "ON CONFLICT DO NOTHING",
                    [
                        (k.record, k.version, k.recipient, k.wrapped, k.record, k.version)
                        for k in keys
                    ],
                )

        await self._run("put_wrapped", put)

    async def stage(
        self, v: RecordVersion, keys: Sequence[WrappedKey], index: IndexEntry, staged_at: int
    ) -> None:
        await self.stage_many([(v, keys, index)], staged_at)

    async def stage_many(
        self,
        items: Sequence[tuple[RecordVersion, Sequence[WrappedKey], IndexEntry]],
        staged_at: int,
    ) -> None:
        rows = _staged_rows(items, staged_at)
        if not rows:
            return

        async def put(conn: Any) -> None:
            async with conn.cursor() as c:
                await c.executemany(
                    "INSERT INTO rec_staged (record, version, salt, patient, staged_at, item) "
                    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (record, version, salt) "
                    "DO UPDATE SET item = excluded.item, staged_at = excluded.staged_at",
                    rows,
                )

        await self._run("stage", put)

    async def staged(self, record: str | None = None) -> list[StagedVersion]:
        async def get(conn: Any) -> list[Any]:
            if record is None:
                cur = await conn.execute(
                    "SELECT item, staged_at FROM rec_staged ORDER BY staged_at, record, version"
                )
            else:
                cur = await conn.execute(
                    "SELECT item, staged_at FROM rec_staged WHERE record = %s "
                    "ORDER BY staged_at, version",
                    (record,),
                )
            rows: list[Any] = await cur.fetchall()
            return rows

        rows = await self._run("staged", get, tx=False)
        return [_decode_staged(bytes(r[0]), int(r[1])) for r in rows]

    async def unstage(self, record: str, version: int, salt: bytes) -> None:
        await self.unstage_many([(record, version, salt)])

    async def unstage_many(self, items: Sequence[tuple[str, int, bytes]]) -> None:
        rows = [(r, int(n), bytes(salt)) for r, n, salt in items]
        if not rows:
            return

        async def delete(conn: Any) -> None:
            async with conn.cursor() as c:
                await c.executemany(
                    "DELETE FROM rec_staged WHERE record = %s AND version = %s AND salt = %s",
                    rows,
                )

        await self._run("unstage", delete)

    async def latest_versions(self, records: Sequence[str]) -> dict[str, int]:
        ids = list(dict.fromkeys(records))
        if not ids:
            return {}

        async def get(conn: Any) -> list[Any]:
            cur = await conn.execute(
                "SELECT record, MAX(version) FROM rec_versions WHERE record = ANY(%s) "
                "GROUP BY record",
                (ids,),
                prepare=False,  # a generic plan of a key list may scan the table (postgres.py)
            )
            rows: list[Any] = await cur.fetchall()
            return rows

        return {str(r): int(n) for r, n in await self._run("latest_versions", get, tx=False)}

    async def get_meta(self, key: str) -> bytes | None:
        async def get(conn: Any) -> Any:
            cur = await conn.execute("SELECT v FROM rec_meta WHERE k = %s", (key,))
            return await cur.fetchone()

        row = await self._run("get_meta", get, tx=False)
        return None if row is None else bytes(row[0])

    async def set_meta(self, key: str, value: bytes) -> None:
        async def put(conn: Any) -> None:
            await conn.execute(
                "INSERT INTO rec_meta(k, v) VALUES (%s, %s) "
                "ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v",
                (key, bytes(value)),
            )

        await self._run("set_meta", put)

    async def shred_patient(self, patient: str) -> int:
        async def shred(conn: Any) -> int:
            cur = await conn.execute(
                "SELECT DISTINCT v.record FROM rec_versions v WHERE v.patient = %s AND "
                "(length(v.ciphertext) > 0 OR EXISTS (SELECT 1 FROM rec_keys k "
                "WHERE k.record = v.record AND k.version = v.version))",
                (patient,),
            )
            affected = len(await cur.fetchall())
            await conn.execute(
                "DELETE FROM rec_keys WHERE record IN "
                "(SELECT record FROM rec_versions WHERE patient = %s)",
                (patient,),
            )
            await conn.execute(
                "UPDATE rec_versions SET ciphertext = ''::bytea WHERE patient = %s "
                "AND length(ciphertext) > 0",
                (patient,),
            )
            await conn.execute(
                "DELETE FROM rec_tokens WHERE record IN "
                "(SELECT record FROM rec_index WHERE patient = %s)",
                (patient,),
            )
            await conn.execute("DELETE FROM rec_index WHERE patient = %s", (patient,))
            await conn.execute("DELETE FROM rec_staged WHERE patient = %s", (patient,))
            return affected

        count: int = await self._run("shred_patient", shred)
        return count

    # -- reads --------------------------------------------------------------------------
    async def get_version(self, record: str, version: int | None = None) -> RecordVersion | None:
        async def get(conn: Any) -> Any:
            if version is None:
                cur = await conn.execute(
                    f"SELECT {_VERSION_COLUMNS} FROM rec_versions WHERE record = %s "
                    "ORDER BY version DESC LIMIT 1",
                    (record,),
                )
            else:
                cur = await conn.execute(
                    f"SELECT {_VERSION_COLUMNS} FROM rec_versions "
                    "WHERE record = %s AND version = %s",
                    (record, version),
                )
            return await cur.fetchone()

        row = await self._run("get_version", get, tx=False)
        return None if row is None else _version_row(row)

    async def versions(self, record: str) -> list[RecordVersion]:
        async def get(conn: Any) -> Any:
            cur = await conn.execute(
                f"SELECT {_VERSION_COLUMNS} FROM rec_versions WHERE record = %s ORDER BY version",
                (record,),
            )
            return await cur.fetchall()

        return [_version_row(r) for r in await self._run("versions", get, tx=False)]

    async def get_wrapped(self, record: str, version: int, recipient: str) -> bytes | None:
        async def get(conn: Any) -> Any:
            cur = await conn.execute(
                "SELECT wrapped FROM rec_keys WHERE record = %s AND version = %s "
                "AND recipient = %s",
                (record, version, recipient),
            )
            return await cur.fetchone()

        row = await self._run("get_wrapped", get, tx=False)
        return None if row is None else bytes(row[0])

    async def get_sealed(
        self, record: str, version: int, recipient: str
    ) -> tuple[RecordVersion | None, bytes | None]:
        async def get(conn: Any) -> tuple[Any, Any]:
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            cur = await conn.execute(
                f"SELECT {_VERSION_COLUMNS} FROM rec_versions WHERE record = %s AND version = %s",
                (record, version),
            )
            row = await cur.fetchone()
            cur = await conn.execute(
                "SELECT wrapped FROM rec_keys WHERE record = %s AND version = %s "
                "AND recipient = %s",
                (record, version, recipient),
            )
            return row, await cur.fetchone()

        row, key = await self._run("get_sealed", get)
        return (
            None if row is None else _version_row(row),
            None if key is None else bytes(key[0]),
        )

    async def search(
        self,
        *,
        resource_type: str | None,
        resource_types: Sequence[str] = (),
        patient: str | None = None,
        custodian: str | None = None,
        tokens: Sequence[bytes] = (),
        date_ge: int | None = None,
        date_lt: int | None = None,
        updated_ge: int | None = None,
        updated_lt: int | None = None,
        ids: Sequence[str] = (),
        include_deleted: bool = False,
        offset: int = 0,
        limit: int = 100,
        order: str = "-updated",
    ) -> tuple[list[IndexEntry], int]:
        _check_page(offset, limit, tokens, ids)
        order_by = _order_sql(order)
        where, params = _search_sql(
            "%s",
            resource_type=resource_type,
            resource_types=resource_types,
            patient=patient,
            custodian=custodian,
            tokens=tokens,
            date_ge=date_ge,
            date_lt=date_lt,
            updated_ge=updated_ge,
            updated_lt=updated_lt,
            ids=ids,
            include_deleted=include_deleted,
        )

        async def run(conn: Any) -> tuple[list[IndexEntry], int]:
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            cur = await conn.execute(f"SELECT COUNT(*) FROM rec_index i WHERE {where}", params)
            row = await cur.fetchone()
            total = int(row[0])
            cur = await conn.execute(
                f"SELECT {_INDEX_COLUMNS} FROM rec_index i WHERE {where} "
                f"ORDER BY {order_by} LIMIT %s OFFSET %s",
                [*params, limit, offset],
            )
            rows = await cur.fetchall()
            toks: dict[str, list[bytes]] = {}
            if rows:
                cur = await conn.execute(
                    "SELECT record, token FROM rec_tokens WHERE record = ANY(%s)",
                    ([r[0] for r in rows],),
                    prepare=False,  # as in latest_versions
                )
                for rec, tok in await cur.fetchall():
                    toks.setdefault(str(rec), []).append(bytes(tok))
            return _index_rows(rows, toks), total

        result: tuple[list[IndexEntry], int] = await self._run("search", run)
        return result

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for c in self._all:
            with contextlib.suppress(Exception):  # closing is best effort
                await c.close()


# -- opening --------------------------------------------------------------------------


async def open_record_store(url: str) -> RecordStore:
    """Open the record store at ``url``: ``sqlite:///path`` (or a path) | ``postgresql://...``."""
    parsed = urlparse(url)
    try:
        if parsed.scheme in ("postgresql", "postgres"):
            return await PostgresRecordStore.open(url)
        if parsed.scheme in ("", "file", "sqlite"):
            if parsed.scheme == "sqlite" and parsed.netloc:
                raise StorageError("sqlite URLs take the form sqlite:///absolute/or/relative/path")
            return await SqliteRecordStore.open(parsed.path if parsed.scheme else url)
    except MedledgerError:
        raise
    except OSError as exc:
        raise StorageError(f"record store: cannot open {url}: {exc}") from exc
    raise StorageError(f"unsupported record store URL scheme {parsed.scheme!r}")
