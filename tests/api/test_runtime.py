"""Opening an embedded runtime: the record store is settled before anything is served."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from medledger.api.runtime import Runtime
from medledger.api.settings import Settings
from medledger.fhir.index import INDEX_VERSION
from medledger.services.fhir import Importer
from medledger.store.records import IndexEntry, RecordStore

from .conftest import NDJSON_DIR, build_network

VERSION = str(INDEX_VERSION).encode()


async def _patients(store: RecordStore) -> list[IndexEntry]:
    page, total = await store.search(resource_type="Patient", custodian="hospital", limit=1000)
    assert len(page) == total
    return page


async def test_a_store_indexed_by_another_index_version_is_reindexed_at_open(
    tmp_path: Path,
) -> None:
    path = tmp_path / "node"
    await asyncio.to_thread(build_network, path, practitioners=False)
    src = tmp_path / "export"
    src.mkdir()
    (src / "Patient.000.ndjson").write_bytes((NDJSON_DIR / "Patient.000.ndjson").read_bytes())

    runtime = await Runtime.open(Settings(data_dir=path), smart=False)
    try:
        # a new store records the index version at its first open, for every organisation
        for org in ("hospital", "clinic", "lab"):
            assert await runtime.store.get_meta(f"search-index-version/{org}") == VERSION
        await Importer(runtime.fhir, "hospital", state_dir=path / "imports").run(src)
        indexed = await _patients(runtime.store)
        assert len(indexed) >= 3 and all(e.tokens for e in indexed)
        # as a store written by an older version leaves it: other tokens (here none) and
        # an older index version (or none at all, before versions were recorded)
        for e in indexed:
            v = await runtime.store.get_version(e.record, e.version)
            assert v is not None
            await runtime.store.put_version(v, [], dataclasses.replace(e, tokens=()))
        await runtime.store.set_meta("search-index-version/hospital", b"1")
    finally:
        await runtime.close()

    runtime = await Runtime.open(Settings(data_dir=path), smart=False)
    try:
        again = await _patients(runtime.store)
        assert {e.record: set(e.tokens) for e in again} == {
            e.record: set(e.tokens) for e in indexed
        }
        assert [e.version for e in again] == [e.version for e in indexed]
        assert [e.last_updated for e in again] == [e.last_updated for e in indexed]
        assert await runtime.store.get_meta("search-index-version/hospital") == VERSION
        # once recorded, an open reindexes nothing
        assert await runtime.fhir.upgrade_index() == {}
    finally:
        await runtime.close()
