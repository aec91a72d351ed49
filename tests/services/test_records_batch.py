"""Batch writes (``RecordService.write_many``), group commit in the record store, and the
submitter's recovery of sequence numbers, on a real embedded network (SQLite).

What a batch must keep from the single write: every entry staged before its
``record.register`` is submitted and acknowledged only once promoted; a refused
entry leaves nothing behind; an entry committed but not promoted is completed by
a retry or by ``recover()``. What it adds: entries are independent (one refused
entry does not sink the others, nor the transactions queued after it), and the
whole batch costs a few store transactions and a few blocks.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import ledger_files
from medledger.errors import (
    Conflict,
    MalformedTransaction,
    MedledgerError,
    NotFound,
    OrdererError,
    StorageError,
    TransactionRejected,
    Unauthorized,
)
from medledger.ledger.tx import Transaction
from medledger.services.records import RecordWrite, StoredRecord
from medledger.store.records import (
    IndexEntry,
    RecordStore,
    RecordVersion,
    SqliteRecordStore,
    WrappedKey,
    open_record_store,
)
from services.test_records import Net, close_net, observation, open_net


@pytest.fixture
async def net(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Net]:
    monkeypatch.delenv("MEDLEDGER_PASSPHRASE", raising=False)
    n = await open_net(tmp_path / "node")
    try:
        yield n
    finally:
        await close_net(n)


def ledger_types(net: Net) -> Counter[str]:
    db = sqlite3.connect(f"file:{net.path / 'ledger.db'}?mode=ro", uri=True)
    try:
        return Counter(Transaction.from_bytes(r[0]).type for r in db.execute("SELECT raw FROM txs"))
    finally:
        db.close()


def registered(net: Net) -> Counter[str]:
    """record id -> how many registrations name it."""
    return ledger_files.registrations(net.path / "ledger.db")


def entry(rid: str, patient: str, **kw: Any) -> RecordWrite:
    body = json.dumps(observation(rid, patient)).encode()
    return RecordWrite("Observation", rid, patient, body, **kw)


async def test_write_many_stores_every_entry_in_few_blocks(net: Net) -> None:
    pat = await net.patient("h1")
    doc = await net.practitioner("h1", "doc-1")
    height = net.node.head.height
    writes = [
        entry(
            f"obs-{i}",
            pat.id,
            category="laboratory",
            code_tokens=[net.svc.index_token("h1", "code", "http://loinc.org", "4548-4")],
            codes_for_commitment=["http://loinc.org|4548-4"],
            date=1_700_000_000_000 + i,
            expected_version=0,
        )
        for i in range(60)
    ]
    results = await net.svc.write_many("h1", writes)
    assert all(isinstance(r, StoredRecord) for r in results)
    assert [r.id for r in results if isinstance(r, StoredRecord)] == [w.record_id for w in writes]
    assert {r.version for r in results if isinstance(r, StoredRecord)} == {1}
    assert all(isinstance(r, StoredRecord) and r.tx_id for r in results)
    # one batch of transactions: a handful of blocks, not one per record
    assert net.node.head.height - height <= 6
    assert registered(net) == Counter({w.record_id: 1 for w in writes})
    # ... and one record.register_batch transaction (one signature) for all of them
    assert len({r.tx_id for r in results if isinstance(r, StoredRecord)}) == 1
    assert await net.store.staged() == []
    for w in writes[:3]:
        got = await net.svc.fetch(doc, w.record_id)
        assert got.resource == json.loads(w.plaintext)
        # wrapped for the custodian and for the patient, as a single write does
        assert await net.store.get_wrapped(w.record_id, 1, "org:h1") is not None
        assert await net.store.get_wrapped(w.record_id, 1, f"patient:{pat.id}") is not None
    ledger = await net.svc._ledger_record("obs-0")
    assert ledger is not None and ledger["category"] == "laboratory"
    page, total = await net.store.search(
        resource_type="Observation",
        tokens=[net.svc.index_token("h1", "code", "http://loinc.org", "4548-4")],
    )
    assert total == 60 and len(page) == 60


async def test_a_failing_entry_does_not_sink_the_others(net: Net) -> None:
    """Each entry lands or fails on its own; refused ones leave nothing behind."""
    pat = await net.patient("h1")
    other = await net.patient("h2")  # linked to h2 only: h1 may not register records for it
    ghost = "pat-" + "0" * 32  # not registered at all
    await net.write("h1", "Observation", "obs-old", pat)
    writes = [
        entry("obs-a", pat.id),
        RecordWrite("Observation", "obs-bad-json", pat.id, b"{not json"),
        entry("obs-b", pat.id),
        entry("obs-ghost", ghost),  # the ledger refuses it (unknown patient)...
        entry("obs-c", pat.id),  # ...and the transactions queued after it still commit
        entry("obs-old", pat.id, expected_version=0),  # exists already
        entry("obs-other", other.id),  # refused by the ledger: no link to h2's patient
        entry("obs-a", pat.id),  # the same record twice in one batch
        entry("obs-d", pat.id, expected_version=0),
    ]
    results = await net.svc.write_many("h1", writes)
    kinds = [type(r).__name__ for r in results]
    assert isinstance(results[0], StoredRecord)
    assert isinstance(results[1], MalformedTransaction)
    assert isinstance(results[2], StoredRecord)
    assert isinstance(results[3], NotFound) and isinstance(results[3], TransactionRejected)
    assert isinstance(results[4], StoredRecord)
    assert isinstance(results[5], Conflict) and results[5].details.get("current") == 1, kinds
    assert isinstance(results[6], Unauthorized)
    assert isinstance(results[7], Conflict)
    assert isinstance(results[8], StoredRecord)
    landed = {"obs-a", "obs-b", "obs-c", "obs-d"}
    assert registered(net) == Counter({**{r: 1 for r in landed}, "obs-old": 1})
    for rid in landed:
        assert [v.version for v in await net.store.versions(rid)] == [1]
    for rid in ("obs-bad-json", "obs-ghost", "obs-other"):
        assert await net.store.versions(rid) == []
        assert await net.svc._ledger_record(rid) is None
    assert await net.store.staged() == []  # refused entries were unstaged
    assert [v.version for v in await net.store.versions("obs-old")] == [1]
    # the node key's sequence numbers are back in step: single writes work at once
    rec = await net.write("h1", "Observation", "obs-after", pat)
    assert rec.version == 1


async def test_write_many_is_idempotent(net: Net) -> None:
    pat = await net.patient("h1")
    writes = [entry(f"obs-{i}", pat.id, expected_version=0) for i in range(20)]
    first = await net.svc.write_many("h1", writes)
    assert all(isinstance(r, StoredRecord) for r in first)
    before = ledger_types(net)
    again = await net.svc.write_many("h1", writes)
    assert all(isinstance(r, Conflict) and r.details.get("current") == 1 for r in again)
    assert ledger_types(net) == before
    for w in writes:
        assert [v.version for v in await net.store.versions(w.record_id)] == [1]


async def test_write_many_without_decoding_and_beyond_one_ledger_batch(net: Net) -> None:
    """More entries than one ``record.register_batch`` holds: several batches, every entry
    stored; ``decoded=False`` leaves the results without the resource, nothing else."""
    from medledger.contracts.records_v1 import MAX_BATCH

    pat = await net.patient("h1")
    doc = await net.practitioner("h1", "doc-1")
    writes = [entry(f"obs-{i}", pat.id, expected_version=0) for i in range(MAX_BATCH + 3)]
    before = ledger_types(net)
    results = await net.svc.write_many("h1", writes, decoded=False)
    assert all(isinstance(r, StoredRecord) and r.resource is None for r in results)
    after = ledger_types(net)
    assert after["record.register_batch"] - before["record.register_batch"] == 2
    assert after["record.register"] == before["record.register"]
    assert registered(net) == Counter({w.record_id: 1 for w in writes})
    got = await net.svc.fetch(doc, writes[-1].record_id)
    assert got.resource == json.loads(writes[-1].plaintext)


class FailingPromotion:
    """A record store whose next batch promotion fails (a disk error after the commit)."""

    def __init__(self, inner: RecordStore) -> None:
        self.inner = inner
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def put_versions(
        self, items: Sequence[tuple[RecordVersion, Sequence[WrappedKey], IndexEntry]]
    ) -> list[Conflict | None]:
        if self.failures:
            self.failures -= 1
            raise StorageError("simulated: disk full")
        return await self.inner.put_versions(items)


async def test_committed_but_unpromoted_batch_is_completed(net: Net) -> None:
    flaky = FailingPromotion(net.store)
    net.svc.store = flaky
    pat = await net.patient("h1")
    doc = await net.practitioner("h1", "doc-1")
    writes = [entry(f"obs-{i}", pat.id, expected_version=0) for i in range(10)]
    flaky.failures = 1
    results = await net.svc.write_many("h1", writes)
    assert all(isinstance(r, StorageError) for r in results)
    assert registered(net) == Counter({w.record_id: 1 for w in writes})  # on the ledger...
    assert len(await net.store.staged()) == 10  # ...and safe on disk, not yet visible
    assert await net.store.latest_versions([w.record_id for w in writes]) == {}
    # the same batch again completes the earlier attempt: no second version anywhere
    again = await net.svc.write_many("h1", writes)
    assert all(isinstance(r, StoredRecord) and r.version == 1 for r in again)
    assert registered(net) == Counter({w.record_id: 1 for w in writes})
    assert await net.store.staged() == []
    assert (await net.svc.fetch(doc, "obs-3")).resource == json.loads(writes[3].plaintext)

    # or recover() at start-up promotes them
    more = [entry(f"obs-r{i}", pat.id, expected_version=0) for i in range(5)]
    flaky.failures = 1
    assert all(isinstance(r, StorageError) for r in await net.svc.write_many("h1", more))
    assert await net.svc.recover() == (5, 0)
    assert await net.store.latest_versions([w.record_id for w in more]) == {
        w.record_id: 1 for w in more
    }


async def test_batches_and_single_writes_of_one_record_serialise(net: Net) -> None:
    """Concurrent writers of the same records never create two versions from one base."""
    pat = await net.patient("h1")
    await net.svc.write_many("h1", [entry(f"obs-{i}", pat.id) for i in range(10)])
    updates = [entry(f"obs-{i}", pat.id, expected_version=1) for i in range(10)]
    single = net.write("h1", "Observation", "obs-5", pat, expected_version=1)
    batch, one = await asyncio.gather(
        net.svc.write_many("h1", updates), single, return_exceptions=True
    )
    assert isinstance(batch, list)
    outcomes = [*batch, one]
    # obs-5 went to version 2 exactly once; the loser got a Conflict
    assert sum(isinstance(r, Conflict) for r in outcomes) == 1
    assert [v.version for v in await net.store.versions("obs-5")] == [1, 2]
    assert registered(net)["obs-5"] == 2


# -- reads overlap the access.log commit, but release nothing before it ----------------------


async def test_a_read_whose_access_cannot_be_logged_releases_nothing(net: Net) -> None:
    pat = await net.patient("h1")
    await net.consent(pat, "h2")
    doc = await net.practitioner("h2", "doc-2")  # another organisation: cross-org path
    rec = await net.write("h1", "Observation", "obs-1", pat)
    first = await net.svc.fetch(doc, "obs-1")  # grants the key to h2
    assert first.resource == rec.resource
    before = len(await net.audit(pat))
    net.node.halt_writes("maintenance")
    try:
        with pytest.raises(OrdererError):
            await net.svc.fetch(doc, "obs-1")
        with pytest.raises(OrdererError):
            await net.svc.fetch_many(
                doc,
                pat.id,
                [(await net.store.search(resource_type="Observation", patient=pat.id))[0][0]],
            )
    finally:
        net.node.halt_writes(None)
    assert len(await net.audit(pat)) == before
    again = await net.svc.fetch(doc, "obs-1")
    assert again.resource == rec.resource
    page, _ = await net.store.search(resource_type="Observation", patient=pat.id)
    found, withheld = await net.svc.fetch_many(doc, pat.id, page)
    assert [r.resource for r in found] == [rec.resource] and withheld == []
    assert len(await net.audit(pat)) == before + 2  # one entry per call


# -- the record store: group commit -------------------------------------------------------------


def version(rid: str, n: int = 1) -> tuple[RecordVersion, list[WrappedKey], IndexEntry]:
    v = RecordVersion(rid, n, "pat-" + "a" * 32, "h1", "Observation", os.urandom(32), b"c", 1)
    return v, [], IndexEntry(rid, "Observation", v.patient, "h1", (), None, 1, n, False)


async def test_group_commit_coalesces_writes_and_isolates_failures(net: Net) -> None:
    store = net.store
    assert isinstance(store, SqliteRecordStore)
    flushes = 0
    flush = store._flush

    def counting() -> None:
        nonlocal flushes
        flushes += 1
        flush()

    store._flush = counting  # type: ignore[method-assign]
    clash = version("rec-clash")
    await store.put_version(*clash)
    other = replace(clash[0], salt=os.urandom(32), ciphertext=b"x")
    versions = [version(f"rec-{i}") for i in range(100)]
    outcomes = await asyncio.gather(
        *(store.put_version(*v) for v in versions[:50]),
        store.put_version(other, [], clash[2]),  # other content, same version: Conflict
        *(store.stage(*v, staged_at=1) for v in versions[50:]),
        return_exceptions=True,
    )
    assert isinstance(outcomes[50], Conflict)
    assert all(o is None for i, o in enumerate(outcomes) if i != 50)
    assert flushes <= 5  # 101 writes, a few transactions
    # the conflicting write rolled back alone: everything else is there
    assert await store.latest_versions([f"rec-{i}" for i in range(50)]) == {
        f"rec-{i}": 1 for i in range(50)
    }
    assert len(await store.staged()) == 50
    assert (await store.get_version("rec-clash")) == clash[0]


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RecordStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'records.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    s = await open_record_store(url)
    try:
        yield s
    finally:
        await s.close()


async def test_batch_store_calls(store: RecordStore) -> None:
    items = [version(f"rec-{i}") for i in range(30)]
    await store.stage_many(items, 7)
    assert {s.version.record for s in await store.staged()} == {f"rec-{i}" for i in range(30)}
    clash = replace(items[3][0], salt=b"s" * 32, ciphertext=b"x")
    await store.put_version(*items[3])
    results = await store.put_versions([*items[:3], (clash, [], items[3][2]), *items[4:10]])
    assert [type(r).__name__ for r in results] == ["NoneType"] * 3 + ["Conflict"] + ["NoneType"] * 6
    await store.unstage_many([(v.record, v.version, v.salt) for v, _, _ in items[10:20]])
    left = {s.version.record for s in await store.staged()}
    assert left == {f"rec-{i}" for i in range(20, 30)}
    got, key = await store.get_sealed("rec-3", 1, "org:h1")
    assert got == items[3][0] and key is None  # stored without keys
    assert await store.get_sealed("nope", 1, "org:h1") == (None, None)
    assert await store.latest_versions(["rec-0", "rec-3", "rec-15", "nope"]) == {
        "rec-0": 1,
        "rec-3": 1,
    }
    # the conflicting item wrote nothing: rec-3 keeps its own content, the rest are indexed
    assert await store.get_version("rec-3") == items[3][0]
    page, total = await store.search(resource_type="Observation")
    assert total == 10 and {e.record for e in page} == {f"rec-{i}" for i in range(10)}


# -- the submitter ---------------------------------------------------------------------------------


async def test_submitter_recovers_sequence_after_a_refusal(net: Net) -> None:
    key = net.node_key("h1")
    pat = await net.patient("h1")
    items: list[tuple[str, dict[str, Any]]] = []
    for i in range(30):
        rid = f"rec-{i}"
        patient = pat.id if i != 7 else "pat-" + "f" * 32  # #7: unknown patient
        items.append(
            (
                "record.register",
                {
                    "record": rid,
                    "patient": patient,
                    "resource_type": "Observation",
                    "commitment": os.urandom(32),
                    "version": 1,
                    "prev": None,
                },
            )
        )
    outcomes = await net.sub.submit_many(key, items)
    assert isinstance(outcomes[7], NotFound)
    assert all(not isinstance(o, MedledgerError) for i, o in enumerate(outcomes) if i != 7)
    # concurrent single submissions after the refusal also go through
    more = await asyncio.gather(
        *(
            net.sub.submit(
                key,
                "record.register",
                {
                    "record": f"more-{i}",
                    "patient": pat.id,
                    "resource_type": "Observation",
                    "commitment": os.urandom(32),
                    "version": 1,
                    "prev": None,
                },
            )
            for i in range(10)
        )
    )
    assert len({r.tx_id for r in more}) == 10
    with pytest.raises(NotFound):
        await net.sub.submit(key, *items[7])


async def test_write_many_on_postgresql(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEDLEDGER_PASSPHRASE", raising=False)
    n = await open_net(tmp_path / "node", pg_url)
    try:
        pat = await n.patient("h1")
        doc = await n.practitioner("h1", "doc-1")
        writes = [entry(f"obs-{i}", pat.id, expected_version=0) for i in range(25)]
        writes.append(entry("obs-ghost", "pat-" + "0" * 32))
        results = await n.svc.write_many("h1", writes)
        assert all(isinstance(r, StoredRecord) for r in results[:25])
        assert isinstance(results[25], NotFound)
        assert await n.store.staged() == []
        assert (await n.svc.fetch(doc, "obs-7")).resource == json.loads(writes[7].plaintext)
        again = await n.svc.write_many("h1", writes[:25])
        assert all(isinstance(r, Conflict) for r in again)
        assert await n.store.latest_versions([w.record_id for w in writes]) == {
            w.record_id: 1 for w in writes[:25]
        }
    finally:
        await close_net(n)
