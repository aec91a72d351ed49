"""The encrypted record store, on both backends (SQLite file and a fresh PostgreSQL database)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from medledger.errors import Conflict, StorageError
from medledger.store.records import (
    SEARCH_ORDERS,
    IndexEntry,
    RecordStore,
    RecordVersion,
    WrappedKey,
    open_record_store,
    order_key,
)

T0 = 1_764_000_000_000
PAT_A = "pat-" + "a" * 32
PAT_B = "pat-" + "b" * 32


def tok(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def version(
    record: str,
    n: int = 1,
    *,
    patient: str = PAT_A,
    custodian: str = "h1",
    rtype: str = "Observation",
    updated: int = T0,
    deleted: bool = False,
) -> RecordVersion:
    return RecordVersion(
        record,
        n,
        patient,
        custodian,
        rtype,
        os.urandom(32),
        b"" if deleted else os.urandom(64),
        updated,
        deleted,
    )


def index_of(
    v: RecordVersion, tokens: tuple[bytes, ...] = (), date: int | None = None
) -> IndexEntry:
    return IndexEntry(
        v.record,
        v.resource_type,
        v.patient,
        v.custodian,
        tokens,
        date,
        v.last_updated,
        v.version,
        v.deleted,
    )


def key_of(v: RecordVersion, recipient: str = "org:h1") -> WrappedKey:
    return WrappedKey(v.record, v.version, recipient, os.urandom(80))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'records.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[RecordStore]:
    s = await open_record_store(store_url)
    try:
        yield s
    finally:
        await s.close()


async def put(
    store: RecordStore, v: RecordVersion, *, tokens: tuple[bytes, ...] = (), date: int | None = None
) -> list[WrappedKey]:
    keys = [] if v.deleted else [key_of(v)]
    await store.put_version(v, keys, index_of(v, tokens, date))
    return keys


async def test_put_get_versions_and_keys(store: RecordStore) -> None:
    v1 = version("obs-1", 1, updated=T0)
    v2 = version("obs-1", 2, updated=T0 + 5)
    k1 = await put(store, v1)
    k2 = await put(store, v2)
    assert await store.get_version("obs-1") == v2
    assert await store.get_version("obs-1", 1) == v1
    assert await store.get_version("obs-1", 3) is None
    assert await store.get_version("nope") is None
    assert await store.versions("obs-1") == [v1, v2]
    assert await store.versions("nope") == []
    assert await store.get_wrapped("obs-1", 1, "org:h1") == k1[0].wrapped
    assert await store.get_wrapped("obs-1", 2, "org:h1") == k2[0].wrapped
    assert await store.get_wrapped("obs-1", 2, "org:h2") is None


async def test_put_version_is_idempotent_and_conflicts_on_other_content(
    store: RecordStore,
) -> None:
    v = version("obs-1")
    first = key_of(v)
    await store.put_version(v, [first], index_of(v))
    # the identical version again, with one more key: accepted, the new key is added
    extra = key_of(v, "patient:" + PAT_A)
    await store.put_version(v, [first, extra], index_of(v))
    assert await store.get_wrapped("obs-1", 1, extra.recipient) == extra.wrapped
    assert await store.versions("obs-1") == [v]
    other = RecordVersion(
        v.record, 1, v.patient, v.custodian, v.resource_type, v.salt, b"x" * 64, T0
    )
    with pytest.raises(Conflict):
        await store.put_version(other, [], index_of(other))
    resalted = RecordVersion(
        v.record, 1, v.patient, v.custodian, v.resource_type, os.urandom(32), v.ciphertext, T0
    )
    with pytest.raises(Conflict):
        await store.put_version(resalted, [], index_of(resalted))
    assert await store.get_version("obs-1") == v  # unchanged after the refusals


async def test_put_wrapped_grants(store: RecordStore) -> None:
    v = version("obs-1")
    await put(store, v)
    grant = key_of(v, "org:h2")
    await store.put_wrapped([grant])
    await store.put_wrapped([grant, key_of(v, "org:h2")])  # idempotent: the first stays
    assert await store.get_wrapped("obs-1", 1, "org:h2") == grant.wrapped
    # keys for a version that is not stored are ignored
    await store.put_wrapped([WrappedKey("ghost", 1, "org:h2", b"k" * 80)])
    assert await store.get_wrapped("ghost", 1, "org:h2") is None


async def test_index_follows_the_newest_version(store: RecordStore) -> None:
    v1 = version("obs-1", 1, updated=T0)
    v2 = version("obs-1", 2, updated=T0 + 10)
    await put(store, v2, tokens=(tok("new"),))
    await put(store, v1, tokens=(tok("old"),))  # an older version arriving late
    page, total = await store.search(resource_type="Observation")
    assert total == 1
    assert page[0].version == 2 and page[0].tokens == (tok("new"),)
    assert (await store.search(resource_type=None, tokens=[tok("old")]))[1] == 0
    # a tombstone version hides the record unless deleted ones are asked for
    v3 = version("obs-1", 3, updated=T0 + 20, deleted=True)
    await put(store, v3)
    assert await store.search(resource_type="Observation") == ([], 0)
    page, total = await store.search(resource_type="Observation", include_deleted=True)
    assert total == 1 and page[0].deleted and page[0].version == 3


async def test_search_filters_order_and_paging(store: RecordStore) -> None:
    glucose, hba1c, vitals = tok("code|http://loinc.org|2345-7"), tok("code||4548-4"), tok("cat")
    # 12 observations of patient A at h1, alternating codes; dates one day apart
    day = 86_400_000
    for i in range(12):
        v = version(f"obs-{i:02d}", updated=T0 + i)
        await put(store, v, tokens=(glucose if i % 2 else hba1c, vitals), date=T0 - i * day)
    await put(store, version("cond-1", rtype="Condition", updated=T0 + 100), tokens=(glucose,))
    await put(store, version("obs-b", patient=PAT_B, custodian="h2", updated=T0 + 50))
    await put(store, version("obs-nodate", updated=T0 - 1), tokens=(glucose,))

    page, total = await store.search(resource_type="Observation", patient=PAT_A)
    assert total == 13
    # newest last_updated first, then by record id
    assert [e.record for e in page[:3]] == ["obs-11", "obs-10", "obs-09"]
    assert page[-1].record == "obs-nodate"
    assert all(e.patient == PAT_A and e.custodian == "h1" for e in page)
    assert page[0].tokens == tuple(sorted((glucose, vitals)))
    assert page[0].date == T0 - 11 * day

    # paging keeps the total
    p1, t1 = await store.search(resource_type="Observation", patient=PAT_A, limit=5)
    p2, t2 = await store.search(resource_type="Observation", patient=PAT_A, offset=5, limit=5)
    p3, t3 = await store.search(resource_type="Observation", patient=PAT_A, offset=10, limit=5)
    assert t1 == t2 == t3 == 13
    assert [len(p1), len(p2), len(p3)] == [5, 5, 3]
    assert [e.record for e in p1 + p2 + p3] == [e.record for e in page]
    assert await store.search(resource_type="Observation", offset=50) == ([], 14)

    # tokens: any-of; type and patient filters combine
    assert (await store.search(resource_type="Observation", tokens=[glucose]))[1] == 7
    assert (await store.search(resource_type="Observation", tokens=[glucose, hba1c]))[1] == 13
    assert (await store.search(resource_type=None, tokens=[glucose]))[1] == 8
    assert (await store.search(resource_type="Observation", tokens=[tok("none")]))[1] == 0
    # dates: half-open, rows without a date never match a date bound
    page, total = await store.search(
        resource_type="Observation", date_ge=T0 - 3 * day, date_lt=T0 - day + 1
    )
    assert total == 3 and {e.record for e in page} == {"obs-01", "obs-02", "obs-03"}
    assert (await store.search(resource_type="Observation", date_lt=T0 + 1))[1] == 12
    # last updated
    page, total = await store.search(resource_type=None, updated_ge=T0 + 11, updated_lt=T0 + 60)
    assert [e.record for e in page] == ["obs-b", "obs-11"]
    # custodian, ids
    page, total = await store.search(resource_type=None, custodian="h2")
    assert [e.record for e in page] == ["obs-b"] and total == 1
    page, total = await store.search(resource_type=None, ids=["obs-03", "cond-1", "missing"])
    assert [e.record for e in page] == ["cond-1", "obs-03"] and total == 2
    # types: any of several, counted and paged over those only ($everything's)
    page, total = await store.search(
        resource_type=None, resource_types=["Condition", "Procedure"], patient=PAT_A
    )
    assert [e.record for e in page] == ["cond-1"] and total == 1
    page, total = await store.search(
        resource_type=None, resource_types=["Observation", "Condition"], patient=PAT_A, limit=2
    )
    assert [e.record for e in page] == ["cond-1", "obs-11"] and total == 14
    with pytest.raises(StorageError):
        await store.search(resource_type=None, limit=-1)


async def test_search_orders_by_last_updated_or_clinical_date(store: RecordStore) -> None:
    day = 86_400_000
    # dates out of step with the writes; two share a date; one has none
    dates = {"o-a": 3, "o-b": 1, "o-c": 5, "o-d": 1, "o-e": None, "o-f": 4}
    for i, (rid, d) in enumerate(dates.items()):
        await put(store, version(rid, updated=T0 + i), date=None if d is None else T0 + d * day)

    async def order(order: str, **kw: Any) -> list[str]:
        page, total = await store.search(resource_type="Observation", order=order, **kw)
        assert total == 6
        return [e.record for e in page]

    assert await order("-updated") == ["o-f", "o-e", "o-d", "o-c", "o-b", "o-a"]
    assert await order("updated") == ["o-a", "o-b", "o-c", "o-d", "o-e", "o-f"]
    # by date; ties newest last_updated first; no date last either way
    assert await order("-date") == ["o-c", "o-f", "o-a", "o-d", "o-b", "o-e"]
    assert await order("date") == ["o-d", "o-b", "o-a", "o-f", "o-c", "o-e"]
    assert await order("-date", offset=2, limit=2) == ["o-a", "o-d"]
    # the in-memory key sorts as the store does
    every, _ = await store.search(resource_type="Observation")
    for o in SEARCH_ORDERS:
        assert [e.record for e in sorted(every, key=order_key(o))] == await order(o)
    with pytest.raises(StorageError):
        await store.search(resource_type="Observation", order="date; DROP TABLE rec_index")


async def test_shred_patient_destroys_keys_and_ciphertexts(store: RecordStore) -> None:
    a1, a2 = version("obs-a", 1), version("obs-a", 2, updated=T0 + 1)
    b1 = version("obs-b", patient=PAT_B)
    for v in (a1, a2, b1):
        await put(store, v, tokens=(tok("x"),))
    await store.put_wrapped([key_of(a2, "org:h2")])
    pending = version("obs-a", 3)
    await store.stage(pending, [key_of(pending)], index_of(pending), T0)
    assert await store.shred_patient(PAT_A) == 1
    for n in (1, 2):
        got = await store.get_version("obs-a", n)
        assert got is not None and got.ciphertext == b"" and not got.deleted
        assert await store.get_wrapped("obs-a", n, "org:h1") is None
    assert await store.get_wrapped("obs-a", 2, "org:h2") is None
    assert await store.staged() == []
    assert await store.search(resource_type=None, patient=PAT_A) == ([], 0)
    # nothing comes back: no grants, no re-put of the old content
    await store.put_wrapped([key_of(a2, "org:h3")])
    assert await store.get_wrapped("obs-a", 2, "org:h3") is None
    with pytest.raises(Conflict):
        await store.put_version(a2, [], index_of(a2))
    assert await store.shred_patient(PAT_A) == 0
    # the other patient is untouched
    assert await store.get_version("obs-b") == b1
    assert (await store.search(resource_type=None, patient=PAT_B))[1] == 1


async def test_staging(store: RecordStore) -> None:
    v1 = version("obs-1")
    keys = [key_of(v1), key_of(v1, "patient:" + PAT_A)]
    idx = index_of(v1, (tok("b"), tok("a")), T0 - 5)
    await store.stage(v1, keys, idx, T0 + 7)
    # staged versions are invisible to reads and search
    assert await store.get_version("obs-1") is None
    assert await store.search(resource_type=None) == ([], 0)
    [staged] = await store.staged()
    assert staged.version == v1 and list(staged.keys) == keys and staged.staged_at == T0 + 7
    assert staged.index == index_of(v1, tuple(sorted((tok("a"), tok("b")))), T0 - 5)
    assert await store.staged("obs-1") == [staged]
    assert await store.staged("other") == []
    # promotion removes the staged copy
    await store.put_version(staged.version, staged.keys, staged.index)
    assert await store.staged() == []
    assert await store.get_version("obs-1") == v1
    v2 = version("obs-1", 2)
    await store.stage(v2, [], index_of(v2), T0)
    await store.unstage("obs-1", 2, v2.salt)
    assert await store.staged() == []


async def test_reopen_keeps_everything(store_url: str) -> None:
    s = await open_record_store(store_url)
    v = version("obs-1")
    keys = await put(s, v, tokens=(tok("a"),), date=T0)
    await s.close()
    await s.close()  # closing twice is harmless
    with pytest.raises(StorageError):
        await s.get_version("obs-1")
    s = await open_record_store(store_url)
    try:
        assert await s.get_version("obs-1") == v
        assert await s.get_wrapped("obs-1", 1, "org:h1") == keys[0].wrapped
        assert (await s.search(resource_type=None, tokens=[tok("a")]))[1] == 1
    finally:
        await s.close()


async def test_meta_values_are_kept_and_replaced(store_url: str) -> None:
    s = await open_record_store(store_url)
    try:
        assert await s.get_meta("search-index-version/h1") is None
        await s.set_meta("search-index-version/h1", b"1")
        await s.set_meta("search-index-version/h1", b"2")
        await s.set_meta("other", b"\x00\xff")
        assert await s.get_meta("search-index-version/h1") == b"2"
    finally:
        await s.close()
    s = await open_record_store(store_url)
    try:
        assert await s.get_meta("search-index-version/h1") == b"2"
        assert await s.get_meta("other") == b"\x00\xff"
        assert await s.get_meta("search-index-version/h2") is None
    finally:
        await s.close()


async def test_bad_urls() -> None:
    with pytest.raises(StorageError):
        await open_record_store("mysql://localhost/x")
    with pytest.raises(StorageError):
        await open_record_store("sqlite://host/path.db")
    with pytest.raises(StorageError):
        await open_record_store("postgresql://postgres@127.0.0.1:1/none")


async def test_pg_key_list_lookups_use_the_index_after_the_tables_grew(pg_url: str) -> None:
    # As for the ledger store: a prepared "= ANY($1)" lookup whose generic plan was made
    # while the table was small would go on reading the whole table as it grows.
    store = await open_record_store(pg_url)
    try:
        for i in range(300):
            await put(store, version(f"obs-{i:05d}", updated=T0 + i), tokens=(tok(f"t{i}"),))
        first = [f"obs-{i:05d}" for i in range(30)]
        for _ in range(60):  # past the prepare threshold on every pooled connection
            assert len(await store.latest_versions(first)) == 30
            page, _ = await store.search(resource_type="Observation", patient=PAT_A, limit=30)
            assert len(page) == 30
        with psycopg.connect(pg_url, autocommit=True) as conn, conn.cursor() as cur:
            with cur.copy("COPY rec_versions FROM STDIN") as copy:
                for i in range(300, 30_300):
                    v = version(f"obs-{i:05d}", patient=PAT_B)
                    copy.write_row(
                        (v.record, 1, PAT_B, "h1", "Observation", v.salt, v.ciphertext, T0, False)
                    )
            with cur.copy("COPY rec_tokens FROM STDIN") as copy:
                for i in range(300, 30_300):
                    copy.write_row((tok(f"t{i}"), f"obs-{i:05d}"))

        async def seq_scans() -> dict[str, int]:
            for c in store._all:  # type: ignore[attr-defined]
                await c.execute("SELECT pg_stat_force_next_flush()")
                await c.execute("SELECT 1")  # flushed once idle
            with psycopg.connect(pg_url, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT relname, seq_scan FROM pg_stat_user_tables"
                    " WHERE relname IN ('rec_versions', 'rec_tokens')"
                ).fetchall()
            return {str(r): int(n) for r, n in rows}

        before = await seq_scans()
        last = [f"obs-{i:05d}" for i in range(30_000, 30_030)]
        for _ in range(8):
            assert len(await store.latest_versions(last)) == 30
            page, total = await store.search(resource_type="Observation", patient=PAT_A, limit=30)
            assert total == 300 and all(len(e.tokens) == 1 for e in page)
        assert await seq_scans() == before  # neither table was read whole
    finally:
        await store.close()


async def test_sqlite_file_keeps_no_shredded_bytes(tmp_path: Path) -> None:
    path = tmp_path / "records.db"
    store = await open_record_store(f"sqlite:///{path}")
    try:
        v = version("obs-1")
        keys = await put(store, v)
        grant = key_of(v, "org:h2")
        await store.put_wrapped([grant])

        def file_bytes() -> bytes:
            return b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())

        assert v.ciphertext in file_bytes() and keys[0].wrapped in file_bytes()
        await store.shred_patient(PAT_A)
        data = file_bytes()
        assert v.ciphertext not in data
        assert keys[0].wrapped not in data and grant.wrapped not in data
    finally:
        await store.close()


async def test_sqlite_moves_staged_versions_of_an_older_file(tmp_path: Path) -> None:
    """Stores written before staged rows moved to ``rec_staging`` keep their staged versions."""
    import sqlite3

    from medledger.store.records import _encode_staged

    path = tmp_path / "records.db"
    store = await open_record_store(f"sqlite:///{path}")
    await store.close()
    v = version("obs-1")
    keys = [key_of(v)]
    idx = index_of(v, (tok("a"),), T0)
    db = sqlite3.connect(path, isolation_level=None)
    try:  # the table as older versions created it, with one staged version
        db.execute("DROP TABLE rec_staging")
        db.execute(
            "CREATE TABLE rec_staged (record TEXT NOT NULL, version INTEGER NOT NULL, "
            "salt BLOB NOT NULL, patient TEXT NOT NULL, staged_at INTEGER NOT NULL, "
            "item BLOB NOT NULL, PRIMARY KEY (record, version, salt)) WITHOUT ROWID"
        )
        db.execute(
            "INSERT INTO rec_staged VALUES (?, ?, ?, ?, ?, ?)",
            (v.record, v.version, v.salt, v.patient, T0, _encode_staged(v, keys, idx)),
        )
    finally:
        db.close()
    store = await open_record_store(f"sqlite:///{path}")
    try:
        [staged] = await store.staged()
        assert (staged.version, list(staged.keys), staged.staged_at) == (v, keys, T0)
        await store.put_version(staged.version, staged.keys, staged.index)
        assert await store.staged() == [] and await store.get_version("obs-1") == v
    finally:
        await store.close()
    db = sqlite3.connect(path)
    try:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        db.close()
    assert "rec_staged" not in names and "rec_staging" in names


async def test_sqlite_works_on_an_older_without_rowid_versions_table(tmp_path: Path) -> None:
    """Files written before ``rec_versions`` became a rowid table work as they are."""
    import sqlite3

    path = tmp_path / "records.db"
    store = await open_record_store(f"sqlite:///{path}")
    await store.close()
    db = sqlite3.connect(path, isolation_level=None)
    try:  # the table as older versions created it
        db.execute("DROP TABLE rec_versions")
        db.execute(
            "CREATE TABLE rec_versions (record TEXT NOT NULL, version INTEGER NOT NULL, "
            "patient TEXT NOT NULL, custodian TEXT NOT NULL, resource_type TEXT NOT NULL, "
            "salt BLOB NOT NULL, ciphertext BLOB NOT NULL, last_updated INTEGER NOT NULL, "
            "deleted INTEGER NOT NULL, PRIMARY KEY (record, version)) WITHOUT ROWID"
        )
    finally:
        db.close()
    store = await open_record_store(f"sqlite:///{path}")
    try:
        v1, v2 = version("obs-1"), version("obs-1", 2)
        for v in (v1, v2):
            await store.stage(v, [key_of(v)], index_of(v, (tok("a"),), T0), T0)
        assert await store.put_versions(
            [(v, [key_of(v)], index_of(v, (tok("a"),), T0)) for v in (v1, v2)]
        ) == [None, None]
        assert await store.get_version("obs-1") == v2
        assert await store.versions("obs-1") == [v1, v2]
        assert await store.latest_versions(["obs-1", "nope"]) == {"obs-1": 2}
        other = version("obs-1", 2)  # another salt and ciphertext
        [conflict] = await store.put_versions(
            [(other, [key_of(other)], index_of(other, (tok("a"),), T0))]
        )
        assert isinstance(conflict, Conflict)
        assert await store.shred_patient(v1.patient) == 1
        assert (await store.get_version("obs-1", 1)).ciphertext == b""  # type: ignore[union-attr]
    finally:
        await store.close()
    db = sqlite3.connect(path)
    try:
        [sql] = db.execute("SELECT sql FROM sqlite_master WHERE name = 'rec_versions'").fetchone()
    finally:
        db.close()
    assert "WITHOUT ROWID" in sql


async def test_sqlite_new_files_keep_versions_in_a_rowid_table(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "records.db"
    store = await open_record_store(f"sqlite:///{path}")
    await store.close()
    db = sqlite3.connect(path)
    try:
        [sql] = db.execute("SELECT sql FROM sqlite_master WHERE name = 'rec_versions'").fetchone()
    finally:
        db.close()
    assert "WITHOUT ROWID" not in sql and "UNIQUE (record, version)" in sql
