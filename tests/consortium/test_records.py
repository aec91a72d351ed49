"""Encrypted records served by their custodian to another organisation's node."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from medledger.consortium.client import (
    PeerClient,
    PeerRequestError,
    RecordRequest,
    RemoteCustodians,
)
from medledger.contracts.core import k_seq
from medledger.crypto import aead
from medledger.crypto.kem import unwrap_key, wrap_key
from medledger.crypto.signing import SigningKey
from medledger.encoding import decode
from medledger.errors import IntegrityError, NotFoundError, OrdererError, Unauthorized
from medledger.ledger.tx import make_tx
from medledger.node import Node
from medledger.services.access import AccessService
from medledger.services.records import Caller, OrgCrypto, RecordService, derive_index_key
from medledger.services.submitter import Submitter
from medledger.store.records import (
    IndexEntry,
    RecordStore,
    RecordVersion,
    WrappedKey,
    open_record_store,
)

from .conftest import NETWORK, Consortium, Member, Org, genesis_doc, make_orgs

RESOURCE = {"resourceType": "Observation", "id": "obs-1", "status": "final"}


@dataclass
class Setup:
    c: Consortium
    custodian: Member
    store: RecordStore
    sub: Submitter
    patient: str
    record: str
    reader: Org
    client: PeerClient


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    orgs = make_orgs(2)
    c = Consortium(orgs, genesis_doc(orgs, policy={"consent_default": "opt-out"}))
    store = await open_record_store(f"sqlite:///{tmp_path / 'records.db'}")
    # the custodian node (org-1) and one Submitter shared by its services
    node = await Node.create(
        f"sqlite:///{tmp_path / 'org-1.db'}", c.genesis, [("org-1", orgs[0].node_key)]
    )
    await node.start()
    sub = Submitter(node)
    custodian = await _member(c, tmp_path, orgs[0], node, store, sub)
    # org-2's admin registers a physician (on the shared ledger)
    await sub.submit(
        orgs[1].admin,
        "principal.register",
        {
            "id": "phys-b",
            "kind": "practitioner",
            "roles": ["physician"],
            "pub": SigningKey.generate().public.raw,
        },
    )
    patient = "pat-" + secrets.token_hex(16)
    await sub.submit(
        orgs[0].node_key,
        "patient.register",
        {
            "id": patient,
            "links": [{"org": "org-1", "commitment": hashlib.sha256(b"mrn-1").digest()}],
            "claim": hashlib.sha256(b"claim").digest(),
        },
    )
    # the custodian encrypts a record, commits it, keeps ciphertext + its own wrapped key
    record = "obs-1"
    key = aead.generate_record_key()
    aad = aead.record_aad(record, 1, patient)
    ciphertext = aead.encrypt(key, json.dumps(RESOURCE).encode(), aad)
    salt = os.urandom(32)
    await sub.submit(
        orgs[0].node_key,
        "record.register",
        {
            "record": record,
            "patient": patient,
            "resource_type": "Observation",
            "commitment": hashlib.sha256(salt + ciphertext).digest(),
            "version": 1,
            "prev": None,
        },
    )
    await store.put_version(
        RecordVersion(record, 1, patient, "org-1", "Observation", salt, ciphertext, 1),
        [WrappedKey(record, 1, "org:org-1", wrap_key(orgs[0].enc.public, key, aad))],
        IndexEntry(record, "Observation", patient, "org-1", (), None, 1, 1, False),
    )
    client = PeerClient(
        network=NETWORK,
        org="org-2",
        key=orgs[1].node_key,
        peers={"org-1": "http://org-1.test"},
        transports={"org-1": httpx.ASGITransport(app=custodian.app)},
    )
    try:
        yield Setup(c, custodian, store, sub, patient, record, orgs[1], client)
    finally:
        await client.close()
        await store.close()
        await node.close()


async def _member(
    c: Consortium, tmp: Path, org: Org, node: Node, store: RecordStore, sub: Submitter
) -> Member:
    from medledger.consortium.gossip import CheckpointBook, ConsortiumMonitor
    from medledger.consortium.peer import PeerService, create_peer_app

    monitor = ConsortiumMonitor(org.id, phase="serving")
    svc = PeerService(
        node,
        org=org.id,
        key=org.node_key,
        monitor=monitor,
        submitter=sub,
        store=store,
        encryption=org.enc,
    )
    m = Member(org, node, monitor, CheckpointBook(node, monitor), svc, create_peer_app(svc))
    c.members.append(m)
    return m


async def test_a_permitted_read_gets_the_key_wrapped_for_the_readers_org(setup: Setup) -> None:
    s = setup
    remote = await s.client.fetch_record("org-1", RecordRequest(s.record, actor="phys-b"))
    assert (remote.record, remote.version, remote.patient, remote.custodian) == (
        s.record,
        1,
        s.patient,
        "org-1",
    )
    # the reader's node checks the ciphertext against the ledger's commitment, then opens it
    rec = decode(await s.custodian.node.state_get(f"record/{s.record}".encode()) or b"")
    assert hashlib.sha256(remote.salt + remote.ciphertext).digest() == rec["commitment"]
    aad = aead.record_aad(remote.record, remote.version, remote.patient)
    key = unwrap_key(s.reader.enc, remote.wrapped, aad)
    assert json.loads(aead.decrypt(key, remote.ciphertext, aad)) == RESOURCE
    # exactly one access entry, logged by the custodian's node, naming the reader
    feed = await AccessService(s.custodian.node, s.sub, {}).audit_feed(s.patient)
    assert len(feed) == 1
    entry = feed[0]
    assert (entry["actor"], entry["org"], entry["outcome"], entry["rule"]) == (
        "phys-b",
        "org-1",
        "permit",
        "default",
    )
    assert entry["tx"] == remote.access_tx.hex()


async def test_a_denied_read_is_logged_and_refused(setup: Setup) -> None:
    s = setup
    with pytest.raises(PeerRequestError, match="access denied") as info:
        await s.client.fetch_record(
            "org-1", RecordRequest(s.record, actor="phys-b", purpose="HRESCH")
        )
    assert info.value.status == 403
    feed = await AccessService(s.custodian.node, s.sub, {}).audit_feed(s.patient)
    assert [(e["actor"], e["outcome"], e["purpose"]) for e in feed] == [
        ("phys-b", "deny", "HRESCH")
    ]


async def test_refusals_without_a_decision(setup: Setup) -> None:
    s = setup
    # an actor that does not act for the calling org
    with pytest.raises(PeerRequestError, match="does not act for") as info:
        await s.client.fetch_record("org-1", RecordRequest(s.record, actor="admin-org-1"))
    assert info.value.status == 403
    with pytest.raises(PeerRequestError) as info:
        await s.client.fetch_record("org-1", RecordRequest("obs-unknown", actor="phys-b"))
    assert info.value.status == 404
    # nothing was logged for these
    assert await AccessService(s.custodian.node, s.sub, {}).audit_feed(s.patient) == []


def _permit_entry(s: Setup, actor: str) -> dict[str, Any]:
    """The access.log payload of the reader's node (org-2) permitting ``actor``'s read."""
    return {
        "request": "req-" + secrets.token_hex(8),
        "actor": actor,
        "org": "org-2",
        "role": "physician",
        "on_behalf": None,
        "patient": s.patient,
        "resource_types": ["Observation"],
        "records": [s.record],
        "purpose": "TREAT",
        "action": "access",
        "outcome": "permit",
        "consents": [],
        "rule": "default",
        "break_glass": False,
        "time": s.custodian.node.clock(),
    }


async def test_a_read_already_logged_by_the_readers_node_is_not_logged_twice(
    setup: Setup,
) -> None:
    s = setup
    # the reader's node (org-2) decides and logs first, then asks the custodian
    entry = _permit_entry(s, "phys-b")
    logged = await s.sub.submit(s.reader.node_key, "access.log", entry)
    remote = await s.client.fetch_record(
        "org-1", RecordRequest(s.record, actor="phys-b", access_tx=logged.tx_id)
    )
    assert remote.access_tx == logged.tx_id
    feed = await AccessService(s.custodian.node, s.sub, {}).audit_feed(s.patient)
    assert [(e["org"], e["actor"]) for e in feed] == [("org-2", "phys-b")]
    # an entry that does not cover the request is refused
    with pytest.raises(PeerRequestError, match="does not permit this read") as info:
        await s.client.fetch_record(
            "org-1",
            RecordRequest(s.record, actor="phys-b", purpose="ETREAT", access_tx=logged.tx_id),
        )
    assert info.value.status == 403
    with pytest.raises(PeerRequestError, match="not on this node's ledger"):
        s.custodian.service.log_wait = 0.05
        await s.client.fetch_record(
            "org-1", RecordRequest(s.record, actor="phys-b", access_tx=bytes(32))
        )


async def test_a_custodian_behind_the_readers_node_waits_for_its_entry_then_serves(
    setup: Setup,
) -> None:
    """The reader's node registered a physician and logged a read by them; the custodian's
    node has applied neither yet. It waits for the entry (and so for the registration
    ordered before it), then serves: no refusal for an actor it does not know yet, and
    no deny entry of its own."""
    s = setup
    kid = s.reader.node_key.public.key_id
    raw = await s.custodian.node.state_get(k_seq(kid))
    seq = 0 if raw is None else int(decode(raw))
    entry = _permit_entry(s, "phys-c")
    logged = make_tx(
        s.reader.node_key, NETWORK, "access.log", entry, seq=seq + 1, time=entry["time"]
    )
    fetch = asyncio.create_task(
        s.client.fetch_record(
            "org-1", RecordRequest(s.record, actor="phys-c", access_tx=logged.tx_id)
        )
    )
    await asyncio.sleep(0.3)
    assert not fetch.done()  # waiting for the entry, not refusing
    await s.sub.submit(
        s.c.orgs[1].admin,
        "principal.register",
        {
            "id": "phys-c",
            "kind": "practitioner",
            "roles": ["physician"],
            "pub": SigningKey.generate().public.raw,
        },
    )
    await s.custodian.node.submit(logged)
    remote = await asyncio.wait_for(fetch, 10)
    assert (remote.record, remote.access_tx) == (s.record, logged.tx_id)
    feed = await AccessService(s.custodian.node, s.sub, {}).audit_feed(s.patient)
    assert [(e["org"], e["actor"], e["outcome"]) for e in feed] == [("org-2", "phys-c", "permit")]


async def test_served_through_the_record_service(setup: Setup) -> None:
    s = setup
    org = s.c.orgs[0]
    crypto = OrgCrypto("org-1", org.node_key, org.enc, derive_index_key(org.enc))
    access = AccessService(s.custodian.node, s.sub, {"org-1": org.node_key})
    service = RecordService(s.custodian.node, s.sub, access, s.store, {"org-1": crypto})
    body = json.dumps({"resourceType": "Condition", "id": "cond-9"}).encode()
    written = await service.write(
        "org-1",
        "Condition",
        "cond-9",
        s.patient,
        body,
        category=None,
        code_tokens=[],
        codes_for_commitment=[],
        date=None,
    )
    assert written.version == 1
    s.custodian.service.records = service
    remote = await s.client.fetch_record("org-1", RecordRequest("cond-9", actor="phys-b"))
    aad = aead.record_aad("cond-9", 1, s.patient)
    key = unwrap_key(s.reader.enc, remote.wrapped, aad)
    assert aead.decrypt(key, remote.ciphertext, aad) == body
    # the custodian kept the grant for org-2 in its store
    assert await s.store.get_wrapped("cond-9", 1, "org:org-2") == remote.wrapped


# -- the reading side: RecordService at org-2 reading records org-1's node holds ----------------


def _reader(s: Setup) -> RecordService:
    """org-2's record service (its own store, its own keys), custodians reached via the peer API."""
    org = s.reader
    crypto = OrgCrypto("org-2", org.node_key, org.enc, derive_index_key(org.enc))
    access = AccessService(s.custodian.node, s.sub, {"org-2": org.node_key})
    return RecordService(
        s.custodian.node,
        s.sub,
        access,
        s.store,  # holds only org-1's records; org-2 has none of its own here
        {"org-2": crypto},
        remote=RemoteCustodians(s.client),
    )


async def test_a_practitioner_reads_through_its_own_node_with_one_access_entry(
    setup: Setup,
) -> None:
    s = setup
    reader = _reader(s)
    phys = Caller("practitioner", "phys-b", "org-2", client="cli-b")
    got = await reader.fetch(phys, s.record)
    assert got.resource == RESOURCE and got.custodian == "org-1" and got.version == 1
    assert got.last_updated > 0  # the block time of the version on org-2's ledger copy
    feed = await reader.access.audit_feed(s.patient)
    assert [(e["org"], e["actor"], e["outcome"], e["on_behalf"]) for e in feed] == [
        ("org-2", "phys-b", "permit", "cli-b")
    ]
    # history and a search page: one more entry each, none by the custodian
    (v1,) = await reader.history(phys, s.record)
    assert v1.resource == RESOURCE
    held = await reader.remote_entries(phys, s.patient)
    assert [(e.record, e.custodian) for e in held] == [(s.record, "org-1")]
    assert await reader.remote_entries(phys, s.patient, ["Condition"]) == []
    found, withheld = await reader.fetch_many(phys, s.patient, held)
    assert [r.resource for r in found] == [RESOURCE] and withheld == []
    feed = await reader.access.audit_feed(s.patient)
    assert [e["org"] for e in feed] == ["org-2"] * 3


async def test_denials_patients_and_tampering_on_the_reading_side(setup: Setup) -> None:
    s = setup
    reader = _reader(s)
    # denied on org-2's ledger copy: logged once (by org-2), nothing asked of org-1
    with pytest.raises(Unauthorized, match="access denied"):
        await reader.fetch(Caller("practitioner", "phys-b", "org-2", "HRESCH"), s.record)
    feed = await reader.access.audit_feed(s.patient)
    assert [(e["org"], e["outcome"]) for e in feed] == [("org-2", "deny")]
    # patients and system clients are not offered other nodes' records
    patient = Caller("patient", s.patient, None)
    with pytest.raises(NotFoundError, match="read it through org-1's FHIR API"):
        await reader.fetch(patient, s.record)
    assert await reader.remote_entries(patient, s.patient) == []
    assert await reader.remote_entries(Caller("system", "cli", "org-2"), s.patient) == []
    assert len(await reader.access.audit_feed(s.patient)) == 1  # nothing more logged
    # a custodian that is not a known peer
    lonely = RecordService(reader.node, reader.submitter, reader.access, reader.store, reader.orgs)
    with pytest.raises(NotFoundError, match="no peer address"):
        await lonely.fetch(Caller("practitioner", "phys-b", "org-2"), s.record)
    # the custodian's copy altered: org-2 checks it against its own ledger's commitment
    flip_ciphertext(s.store.path, s.record)  # type: ignore[attr-defined]
    with pytest.raises(IntegrityError, match="does not match its commitment"):
        await reader.fetch(Caller("practitioner", "phys-b", "org-2"), s.record)


async def test_custodian_refusals_become_medledger_errors(setup: Setup) -> None:
    s = setup
    remote = RemoteCustodians(s.client)
    assert remote.serves("org-1") and not remote.serves("org-3")
    # an actor the custodian does not accept for org-2: 403 -> Unauthorized
    with pytest.raises(Unauthorized, match="custodian org-1 refused"):
        await remote.serve("org-1", s.record, 1, actor="admin-org-1")
    with pytest.raises(NotFoundError):
        await remote.serve("org-1", "obs-unknown", 1, actor="phys-b")
    s.custodian.service.log_wait = 0.05
    with pytest.raises(OrdererError, match="not yet applied"):
        await remote.serve("org-1", s.record, 1, actor="phys-b", access_tx=bytes(32))
    with pytest.raises(OrdererError, match="unavailable"):
        await remote.serve("org-3", s.record, 1, actor="phys-b")


def flip_ciphertext(db_path: Path | str, record: str) -> None:
    """Flip one bit of every stored version of ``record`` in a SQLite record store."""
    with contextlib.closing(sqlite3.connect(db_path)) as db, db:
        rows = db.execute(
            "SELECT version, ciphertext FROM rec_versions WHERE record = ?", (record,)
        ).fetchall()
        for version, ciphertext in rows:
            bad = bytes([ciphertext[0] ^ 1]) + bytes(ciphertext[1:])
            db.execute(
                "UPDATE rec_versions SET ciphertext = ? WHERE record = ? AND version = ?",
                (bad, record, version),
            )


class _Refusing:
    """A custodian node that refuses every read (its ledger copy lags, say)."""

    def serves(self, custodian: str) -> bool:
        return True

    async def serve(self, *args: object, **kwargs: object) -> tuple[bytes, bytes, bytes | None]:
        raise Unauthorized("the custodian org-1 refused: access denied")


async def test_a_custodian_refusal_in_a_search_page_withholds_the_type(setup: Setup) -> None:
    s = setup
    reader = _reader(s)
    reader.remote = _Refusing()
    phys = Caller("practitioner", "phys-b", "org-2")
    held = await reader.remote_entries(phys, s.patient)
    found, withheld = await reader.fetch_many(phys, s.patient, held)
    assert found == [] and withheld == ["Observation"]
    with pytest.raises(Unauthorized, match="custodian org-1 refused"):
        await reader.fetch(phys, s.record)


def test_pages_list_this_nodes_rows_then_the_records_held_elsewhere() -> None:
    from medledger.services.fhir import _after_local

    def rows(*ids: str) -> list[IndexEntry]:
        return [IndexEntry(i, "Observation", "p", "org-1", (), None, 0, 1, False) for i in ids]

    held = rows("r1", "r2", "r3")
    assert _after_local(rows("l1", "l2"), 2, held, 0, 3) == (rows("l1", "l2", "r1"), 5)
    assert _after_local(rows("l3"), 3, held, 2, 2) == (rows("l3", "r1"), 6)
    assert _after_local([], 3, held, 4, 2) == (rows("r2", "r3"), 6)
    assert _after_local([], 0, held, 3, 2) == ([], 3)


def test_a_sorted_page_merges_this_nodes_rows_with_the_records_held_elsewhere() -> None:
    from medledger.fhir.index import parse_search
    from medledger.services.fhir import _merged

    def row(rid: str, date: int | None, updated: int = 0) -> IndexEntry:
        return IndexEntry(rid, "Observation", "p", "org-1", (), date, updated, 1, False)

    # this node's first rows in the order asked for (-date), 3 of its 4 in all
    local = [row("l1", 50, 7), row("l2", 30, 9), row("l3", 10, 8)]
    held = [row("r1", 40), row("r2", None), row("r3", 60)]  # held elsewhere, ledger order
    q = parse_search("Observation", [("patient", "p"), ("_sort", "-date"), ("_count", "3")])
    page, total = _merged(local, 4, held, q)
    assert [e.record for e in page] == ["r3", "l1", "r1"] and total == 7
    q2 = parse_search(
        "Observation", [("patient", "p"), ("_sort", "-date"), ("_count", "3"), ("_offset", "3")]
    )
    assert [e.record for e in _merged(local, 4, held, q2)[0]] == ["l2", "l3", "r2"]
    # oldest first: rows without a date still come last
    q3 = parse_search("Observation", [("patient", "p"), ("_sort", "date")])
    assert [e.record for e in _merged(local[::-1], 4, held, q3)[0]] == [
        "l3",
        "l2",
        "r1",
        "l1",
        "r3",
        "r2",
    ]
