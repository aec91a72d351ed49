"""The record service on a real embedded network (three organisations, one node, SQLite).

Covers the write path (ledger first, nothing stored on refusal, idempotent
retry after a store failure, recovery), the read path (one access.log per
fetch / fetch_many, permit or deny; cross-organisation key re-wrapping; the
reader verifying the ledger commitment), patients reading their own records,
tampering, crypto-shredding, and the absence of plaintext PHI in every file.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import itertools
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from contracts.conftest import NETWORK, Ledger
from medledger.contracts.base import get_obj
from medledger.contracts.patients_v1 import claim_message
from medledger.contracts.records_v1 import k_recver
from medledger.crypto import aead, kem
from medledger.crypto.kem import EncryptionKey
from medledger.crypto.signing import ALG_MLKEM768_X25519, SigningKey
from medledger.datadir import DataDir
from medledger.errors import (
    Conflict,
    IntegrityError,
    MalformedTransaction,
    NotFoundError,
    StorageError,
    Unauthorized,
)
from medledger.ledger.verify import verify_ledger
from medledger.node import Node
from medledger.services.access import AccessService
from medledger.services.records import (
    Caller,
    NamedLocks,
    OrgCrypto,
    RecordService,
    RecordWrite,
    StoredRecord,
    derive_index_key,
    is_gone,
)
from medledger.services.submitter import Submitter
from medledger.store import open_store
from medledger.store.records import (
    IndexEntry,
    RecordStore,
    RecordVersion,
    WrappedKey,
    open_record_store,
)

DATA = Path(__file__).parent / "data"
ORGS = (("h1", "Hospital One"), ("h2", "Hospital Two"), ("h3", "Clinic Three"))


@dataclass
class Patient:
    id: str
    key: SigningKey
    enc: EncryptionKey | None


@dataclass
class Net:
    path: Path
    admins: dict[str, SigningKey]
    node: Node
    sub: Submitter
    access: AccessService
    store: RecordStore
    svc: RecordService
    keys: dict[str, SigningKey] = field(default_factory=dict)
    closed: bool = False

    def node_key(self, org: str) -> SigningKey:
        return self.svc.orgs[org].signing

    async def practitioner(
        self, org: str, pid: str, roles: Sequence[str] = ("physician",)
    ) -> Caller:
        key = self.keys[pid] = SigningKey.generate()
        await self.sub.submit(
            self.admins[org],
            "principal.register",
            {"id": pid, "kind": "practitioner", "roles": sorted(roles), "pub": key.public.raw},
        )
        return Caller("practitioner", pid, org)

    async def patient(self, org: str = "h1", *, enc: bool = True) -> Patient:
        pid = "pat-" + os.urandom(16).hex()
        key = SigningKey.generate()
        ek = EncryptionKey.generate() if enc else None
        payload: dict[str, Any] = {
            "id": pid,
            "links": [{"org": org, "commitment": os.urandom(32)}],
            "pub": key.public.raw,
        }
        if ek is not None:
            payload.update(enc_key=ek.public.raw, enc_alg=ek.public.alg)
        await self.sub.submit(self.node_key(org), "patient.register", payload)
        self.keys[pid] = key
        return Patient(pid, key, ek)

    async def link(self, patient: Patient, org: str) -> None:
        await self.sub.submit(
            self.node_key(org),
            "patient.link",
            {"patient": patient.id, "commitment": os.urandom(32)},
        )

    async def consent(self, patient: Patient, org: str, types: Sequence[str] = ()) -> None:
        consent = {
            "id": "cons-" + os.urandom(6).hex(),
            "patient": patient.id,
            "provision": {
                "type": "permit",
                "actors": [{"kind": "org", "id": org}],
                "purposes": ["TREAT"],
                "resource_types": list(types),
            },
        }
        await self.sub.submit(patient.key, "consent.grant", {"consent": consent})

    async def audit(self, patient: Patient | str) -> list[dict[str, Any]]:
        pid = patient if isinstance(patient, str) else patient.id
        return await self.access.audit_feed(pid)

    async def write(
        self,
        org: str,
        rtype: str,
        rid: str,
        patient: Patient | str,
        resource: dict[str, Any] | None = None,
        *,
        codes: Sequence[tuple[str, str]] = (),
        date: int | None = None,
        category: str | None = None,
        **kw: Any,
    ) -> StoredRecord:
        pid = patient if isinstance(patient, str) else patient.id
        body = resource if resource is not None else observation(rid, pid)
        tokens = [self.svc.index_token(org, "code", s, c) for s, c in codes]
        return await self.svc.write(
            org,
            rtype,
            rid,
            pid,
            json.dumps(body).encode(),
            category=category,
            code_tokens=tokens,
            codes_for_commitment=[f"{s}|{c}" for s, c in codes],
            date=date,
            **kw,
        )

    def tamper(self, sql: str, params: Sequence[Any]) -> None:
        db = sqlite3.connect(self.path / "records.db")
        try:
            with db:
                db.execute(sql, params)
        finally:
            db.close()


def observation(rid: str, patient: str, value: float = 5.4) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "valueQuantity": {"value": value, "unit": "%"},
    }


async def open_net(path: Path, store_url: str | None = None, *, datadir: bool = False) -> Net:
    """A started embedded network of :data:`ORGS`.

    ``datadir``: built by :meth:`DataDir.init_embedded` (keystore identities, JSON
    genesis) as ``medledger genesis new`` does; otherwise from a genesis with raw keys.
    """
    if datadir:
        dd = DataDir(path)
        node = await dd.init_embedded(network="records-test", orgs=ORGS)
        orgs = {o: OrgCrypto.from_identity(o, i) for o, i in dd.org_keys().items()}
        admins = {o: dd.identity(f"admin-{o}").signing for o, _ in ORGS}
    else:
        orgs = {}
        for o, _ in ORGS:
            enc = EncryptionKey.generate()
            orgs[o] = OrgCrypto(o, SigningKey.generate(), enc, derive_index_key(enc))
        admins = {o: SigningKey.generate() for o, _ in ORGS}
        genesis = {
            "network": "records-test",
            "time": int(time.time() * 1000),
            "orgs": [
                {
                    "id": o,
                    "name": name,
                    "node_key": orgs[o].signing.public.raw,
                    "enc_key": orgs[o].encryption.public.raw,
                    "enc_alg": orgs[o].encryption.public.alg,
                }
                for o, name in ORGS
            ],
            "admins": [
                {"id": f"admin-{o}", "org": o, "key": admins[o].public.raw} for o, _ in ORGS
            ],
        }
        node = await Node.create(
            f"sqlite:///{path / 'ledger.db'}", genesis, [(o, c.signing) for o, c in orgs.items()]
        )
    await node.start(max_wait=0.001)
    sub = Submitter(node)
    access = AccessService(node, sub, dict(node.signers))
    store = await open_record_store(store_url or f"sqlite:///{path / 'records.db'}")
    svc = RecordService(node, sub, access, store, orgs)
    return Net(path, admins, node, sub, access, store, svc)


async def close_net(net: Net) -> None:
    if not net.closed:
        net.closed = True
        await net.store.close()
        await net.node.close()


@pytest.fixture
async def net(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Net]:
    monkeypatch.delenv("MEDLEDGER_PASSPHRASE", raising=False)
    n = await open_net(tmp_path / "node")
    try:
        yield n
    finally:
        await close_net(n)


def latest_entry(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return entries[-1]


# -- writing ----------------------------------------------------------------------------


async def test_write_commits_encrypts_and_wraps_for_custodian_and_patient(net: Net) -> None:
    pat = await net.patient("h1")
    assert pat.enc is not None
    rec = await net.write(
        "h1",
        "Observation",
        "obs-1",
        pat,
        codes=[("http://loinc.org", "4548-4")],
        date=1_700_000_000_000,
        category="laboratory",
    )
    assert (rec.id, rec.version, rec.custodian, rec.patient) == ("obs-1", 1, "h1", pat.id)
    assert rec.resource == observation("obs-1", pat.id) and rec.tx_id is not None
    on_ledger = await net.svc._ledger_record("obs-1")
    assert on_ledger is not None
    stored = await net.store.get_version("obs-1")
    assert stored is not None and stored.custodian == "h1"
    assert on_ledger["commitment"] == hashlib.sha256(stored.salt + stored.ciphertext).digest()
    assert on_ledger["category"] == "laboratory" and on_ledger["effective"] == 1_700_000_000_000
    assert (
        on_ledger["code_commitment"]
        == hashlib.sha256(stored.salt + b"http://loinc.org|4548-4").digest()
    )
    # the record key is wrapped for the custodian and for the patient's own key
    aad = aead.record_aad("obs-1", 1, pat.id)
    own = await net.store.get_wrapped("obs-1", 1, "org:h1")
    mine = await net.store.get_wrapped("obs-1", 1, f"patient:{pat.id}")
    assert own is not None and mine is not None
    plain = aead.decrypt(kem.unwrap_key(pat.enc, mine, aad), stored.ciphertext, aad)
    assert json.loads(plain) == rec.resource
    assert await net.store.get_wrapped("obs-1", 1, "org:h2") is None
    # the index holds the custodian's HMAC tokens only
    page, total = await net.store.search(
        resource_type="Observation",
        patient=pat.id,
        tokens=[net.svc.index_token("h1", "code", "http://loinc.org", "4548-4")],
    )
    assert total == 1 and page[0].date == 1_700_000_000_000
    assert net.svc.index_token("h1", "code", None, "x") != net.svc.index_token(
        "h2", "code", None, "x"
    )
    # a patient without an encryption key: the custodian's wrap only
    bare = await net.patient("h1", enc=False)
    await net.write("h1", "Observation", "obs-bare", bare)
    assert await net.store.get_wrapped("obs-bare", 1, f"patient:{bare.id}") is None


async def test_versions_expected_version_and_tombstones(net: Net) -> None:
    pat = await net.patient("h1")
    doc = await net.practitioner("h1", "doc-1")
    v1 = await net.write("h1", "Observation", "obs-1", pat, observation("obs-1", pat.id, 1.0))
    with pytest.raises(Conflict):
        await net.write("h1", "Observation", "obs-1", pat, expected_version=0)
    v2 = await net.write(
        "h1", "Observation", "obs-1", pat, observation("obs-1", pat.id, 2.0), expected_version=1
    )
    assert v2.version == 2
    with pytest.raises(Conflict):  # stale If-Match
        await net.write("h1", "Observation", "obs-1", pat, expected_version=1)
    ledger = await net.svc._ledger_record("obs-1")
    assert ledger is not None and ledger["version"] == 2
    # a practitioner's own key may sign the version
    v3 = await net.write(
        "h1",
        "Observation",
        "obs-1",
        pat,
        observation("obs-1", pat.id, 3.0),
        author_key=net.keys["doc-1"],
    )
    assert v3.version == 3
    assert (await net.svc.fetch(doc, "obs-1")).resource == v3.resource
    old = await net.svc.fetch(doc, "obs-1", 1)
    assert old.version == 1 and old.resource == v1.resource
    before = len(await net.audit(pat))
    with pytest.raises(NotFoundError):
        await net.svc.fetch(doc, "obs-1", 9)
    with pytest.raises(NotFoundError):
        await net.svc.fetch(doc, "no-such-record")
    assert len(await net.audit(pat)) == before  # nothing to decide about: nothing logged
    # delete: a tombstone version without content or keys
    gone = await net.svc.write(
        "h1",
        "Observation",
        "obs-1",
        pat.id,
        b"",
        category=None,
        code_tokens=(),
        codes_for_commitment=(),
        date=None,
        deleted=True,
    )
    assert gone.version == 4 and gone.resource is None
    read = await net.svc.fetch(doc, "obs-1")
    assert read.version == 4 and read.resource is None
    assert await net.store.get_wrapped("obs-1", 4, "org:h1") is None
    history = await net.svc.history(doc, "obs-1")
    assert [h.version for h in history] == [1, 2, 3, 4]
    assert [h.resource is None for h in history] == [False, False, False, True]
    assert len(await net.audit(pat)) == before + 2  # one per fetch, one for the history
    # only the custodian may write versions; the patient and type are fixed
    with pytest.raises(Unauthorized):
        await net.write("h2", "Observation", "obs-1", pat)
    with pytest.raises(Conflict):
        await net.write("h1", "Condition", "obs-1", pat)
    with pytest.raises(MalformedTransaction):
        await net.svc.write(
            "h1",
            "Observation",
            "obs-x",
            pat.id,
            b"not json",
            category=None,
            code_tokens=(),
            codes_for_commitment=(),
            date=None,
        )


async def test_refused_ledger_write_stores_nothing(net: Net) -> None:
    pat = await net.patient("h1")
    # h2 has no link to the patient: the ledger refuses, the store holds nothing
    with pytest.raises(Unauthorized):
        await net.write("h2", "Observation", "obs-h2", pat)
    assert await net.store.get_version("obs-h2") is None
    assert await net.store.staged() == []
    assert await net.store.search(resource_type=None) == ([], 0)
    # a practitioner of another org cannot sign for h1
    outsider = await net.practitioner("h2", "doc-h2")
    assert outsider.org == "h2"
    with pytest.raises(Unauthorized):
        await net.write("h1", "Observation", "obs-x", pat, author_key=net.keys["doc-h2"])
    assert await net.store.get_version("obs-x") is None
    assert await net.store.staged() == []
    with pytest.raises(NotFoundError):
        await net.write("h9", "Observation", "obs-y", pat)


class FlakyStore:
    """A record store whose next ``failures`` promotions fail (a disk error after commit)."""

    def __init__(self, inner: RecordStore) -> None:
        self.inner = inner
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def put_version(
        self, v: RecordVersion, keys: Sequence[WrappedKey], index: IndexEntry
    ) -> None:
        if self.failures:
            self.failures -= 1
            raise StorageError("simulated: disk full")
        await self.inner.put_version(v, keys, index)


async def test_store_failure_after_commit_is_recovered(net: Net) -> None:
    flaky = FlakyStore(net.store)
    net.svc.store = flaky  # type: ignore[assignment]
    pat = await net.patient("h1")
    doc = await net.practitioner("h1", "doc-1")
    body = observation("obs-1", pat.id)
    flaky.failures = 1
    with pytest.raises(StorageError):
        await net.write("h1", "Observation", "obs-1", pat, body)
    ledger = await net.svc._ledger_record("obs-1")
    assert ledger is not None and ledger["version"] == 1  # committed on the ledger
    assert await net.store.get_version("obs-1") is None  # not promoted...
    assert len(await net.store.staged("obs-1")) == 1  # ...but safe on disk
    # retrying the same write completes it: same version, no second version
    again = await net.write("h1", "Observation", "obs-1", pat, body)
    assert again.version == 1 and again.resource == body
    ledger = await net.svc._ledger_record("obs-1")
    assert ledger is not None and ledger["version"] == 1
    assert await net.store.staged() == []
    assert (await net.svc.fetch(doc, "obs-1")).resource == body

    # a failure followed by a read: the read promotes the committed version itself
    flaky.failures = 1
    with pytest.raises(StorageError):
        await net.write("h1", "Observation", "obs-2", pat)
    assert (await net.svc.fetch(doc, "obs-2")).version == 1

    # a failure followed by a restart: recover() promotes it
    flaky.failures = 1
    with pytest.raises(StorageError):
        await net.write("h1", "Observation", "obs-3", pat)
    # plus a staged version whose transaction never reached the ledger (crash before submit)
    orphan = RecordVersion("obs-4", 1, pat.id, "h1", "Observation", os.urandom(32), b"c", 0)
    idx = IndexEntry("obs-4", "Observation", pat.id, "h1", (), None, 0, 1, False)
    await net.store.stage(orphan, [], idx, staged_at=0)  # long ago
    fresh = RecordVersion("obs-5", 1, pat.id, "h1", "Observation", os.urandom(32), b"c", 0)
    idx5 = IndexEntry("obs-5", "Observation", pat.id, "h1", (), None, 0, 1, False)
    await net.store.stage(fresh, [], idx5, staged_at=net.node.clock())  # may still commit
    assert await net.svc.recover() == (1, 1)
    assert [s.version.record for s in await net.store.staged()] == ["obs-5"]
    assert (await net.svc.fetch(doc, "obs-3")).version == 1
    # a different write after a failed promotion: the old version is completed, the new
    # one becomes version 2
    flaky.failures = 1
    with pytest.raises(StorageError):
        await net.write("h1", "Observation", "obs-6", pat, observation("obs-6", pat.id, 1.0))
    newer = await net.write("h1", "Observation", "obs-6", pat, observation("obs-6", pat.id, 2.0))
    assert newer.version == 2
    assert [v.version for v in await net.store.versions("obs-6")] == [1, 2]


async def committed_at(net: Net, rid: str, version: int) -> int:
    """The time of the block holding ``rid`` ``version``'s registration."""
    entry = await net.node.read(lambda st: get_obj(st, k_recver(rid, version)))
    assert entry is not None
    header, _ = await net.node.get_block(int(entry["height"]))
    return int(header.time)


async def test_last_updated_is_the_commit_block_time(net: Net) -> None:
    """A version's lastUpdated is its block's time (what every node shows), not the
    custodian's clock when it staged it; on every path that promotes a version."""
    ticks = itertools.count()
    base = net.node.clock()
    net.node.clock = lambda: base + 5 * next(ticks)  # every reading of the clock differs
    flaky = FlakyStore(net.store)
    net.svc.store = flaky  # type: ignore[assignment]
    pat = await net.patient("h1")
    doc = await net.practitioner("h1", "doc-1")

    async def check(rid: str, version: int = 1) -> None:
        at = await committed_at(net, rid, version)
        assert (await net.svc.fetch(doc, rid)).last_updated == at  # (promotes, if staged)
        stored = await net.store.get_version(rid, version)
        assert stored is not None and stored.last_updated == at
        page, _ = await net.store.search(resource_type="Observation", patient=pat.id)
        assert [e.last_updated for e in page if e.record == rid] == [at]

    written = await net.write("h1", "Observation", "obs-w", pat)  # a single write
    assert written.last_updated == await committed_at(net, "obs-w", 1)
    await check("obs-w")
    many = await net.svc.write_many(
        "h1",
        [
            RecordWrite("Observation", rid, pat.id, json.dumps(observation(rid, pat.id)).encode())
            for rid in ("obs-m1", "obs-m2")
        ],
    )
    for got in many:
        assert isinstance(got, StoredRecord)
        assert got.last_updated == await committed_at(net, got.id, 1)
        await check(got.id)
    flaky.failures = 1  # committed, not promoted: a later read promotes it
    with pytest.raises(StorageError):
        await net.write("h1", "Observation", "obs-r", pat)
    await check("obs-r")
    flaky.failures = 1  # committed, not promoted: recover() promotes it
    with pytest.raises(StorageError):
        await net.write("h1", "Observation", "obs-s", pat)
    assert await net.svc.recover() == (1, 0)
    await check("obs-s")


# -- reading --------------------------------------------------------------------------------


async def test_own_org_read_logs_one_permit(net: Net) -> None:
    pat = await net.patient("h1")
    doc = await net.practitioner("h1", "doc-1")
    written = await net.write("h1", "Observation", "obs-1", pat)
    got = await net.svc.fetch(Caller("practitioner", "doc-1", "h1", client="client-7"), "obs-1")
    assert got.resource == written.resource and got.custodian == "h1"
    [entry] = await net.audit(pat)
    assert entry["outcome"] == "permit" and entry["rule"] == "custodian"
    assert (entry["actor"], entry["org"], entry["records"]) == ("doc-1", "h1", ["obs-1"])
    assert entry["on_behalf"] == "client-7" and entry["role"] == "physician"
    assert doc.org == "h1"


async def test_cross_org_read_by_consent(net: Net) -> None:
    pat = await net.patient("h1")
    await net.write("h1", "Observation", "obs-1", pat)
    other = await net.practitioner("h2", "doc-h2")
    # no consent yet (opt-in network): denied, logged once, nothing handed out
    with pytest.raises(Unauthorized):
        await net.svc.fetch(other, "obs-1")
    [deny] = await net.audit(pat)
    assert deny["outcome"] == "deny" and deny["actor"] == "doc-h2" and deny["org"] == "h2"
    assert await net.store.get_wrapped("obs-1", 1, "org:h2") is None
    # the patient consents to h2: the custodian re-wraps the key for h2
    await net.consent(pat, "h2", ["Observation"])
    got = await net.svc.fetch(other, "obs-1")
    assert got.resource == observation("obs-1", pat.id) and got.custodian == "h1"
    entries = await net.audit(pat)
    assert len(entries) == 2 and entries[-1]["outcome"] == "permit"
    assert entries[-1]["rule"] == "consent" and entries[-1]["consents"]
    grant = await net.store.get_wrapped("obs-1", 1, "org:h2")
    assert grant is not None
    aad = aead.record_aad("obs-1", 1, pat.id)
    kem.unwrap_key(net.svc.orgs["h2"].encryption, grant, aad)  # h2's own key opens it
    with pytest.raises(Exception):  # noqa: B017 - and h3's does not
        kem.unwrap_key(net.svc.orgs["h3"].encryption, grant, aad)
    # the two sides, as separate steps exchanging only (ciphertext, salt, wrapped key)
    served = await net.svc.serve_ciphertext("h1", "obs-1", 1, "h3")
    assert served[2] is not None
    plain = await net.svc.open("h3", "obs-1", 1, pat.id, served)
    assert plain is not None and json.loads(plain) == got.resource
    with pytest.raises(IntegrityError):  # h2 cannot open what was wrapped for h3
        await net.svc.open("h2", "obs-1", 1, pat.id, served)
    with pytest.raises(IntegrityError):  # bound to the patient: moved ciphertext fails
        await net.svc.open("h3", "obs-1", 1, "pat-" + "0" * 32, served)


async def test_patient_reads_own_records_only(net: Net) -> None:
    pat = await net.patient("h1")
    other = await net.patient("h1")
    await net.write("h1", "Observation", "obs-1", pat)
    me = Caller("patient", pat.id, None)
    got = await net.svc.fetch(me, "obs-1")
    assert got.resource == observation("obs-1", pat.id)
    [entry] = await net.audit(pat)
    assert entry["outcome"] == "permit" and entry["rule"] == "self"
    assert (entry["actor"], entry["org"], entry["role"]) == (pat.id, "h1", None)
    assert entry["purpose"] == "PATRQT"
    with pytest.raises(Unauthorized):
        await net.svc.fetch(Caller("patient", other.id, None), "obs-1")
    entries = await net.audit(pat)
    assert len(entries) == 2
    assert (entries[1]["outcome"], entries[1]["actor"], entries[1]["rule"]) == (
        "deny",
        other.id,
        "self",
    )
    # their search results too, in one logged access
    page, _ = await net.store.search(resource_type="Observation", patient=pat.id)
    records, withheld = await net.svc.fetch_many(me, pat.id, page)
    assert [r.id for r in records] == ["obs-1"] and withheld == []
    assert len(await net.audit(pat)) == 3


async def test_system_client_reads_its_org_records_only(net: Net) -> None:
    pat = await net.patient("h1")
    await net.link(pat, "h2")
    await net.write("h1", "Observation", "obs-1", pat)
    await net.write("h2", "Observation", "obs-2", pat)
    bot = Caller("system", "bulk-client", "h1")
    assert (await net.svc.fetch(bot, "obs-1")).id == "obs-1"
    with pytest.raises(Unauthorized):
        await net.svc.fetch(bot, "obs-2")
    page, _ = await net.store.search(resource_type="Observation", patient=pat.id)
    records, withheld = await net.svc.fetch_many(bot, pat.id, page)
    assert [r.id for r in records] == ["obs-1"] and withheld == ["Observation"]
    outcomes = [e["outcome"] for e in await net.audit(pat)]
    assert outcomes == ["permit", "deny", "permit"]


async def test_fetch_many_logs_exactly_once(net: Net) -> None:
    pat = await net.patient("h1")
    await net.link(pat, "h2")
    for i in range(3):
        await net.write("h1", "Observation", f"obs-{i}", pat)
    await net.write("h1", "Condition", "cond-1", pat, {"resourceType": "Condition", "id": "c"})
    await net.write("h2", "Observation", "obs-h2", pat)
    doc = await net.practitioner("h1", "doc-1")
    page, total = await net.store.search(resource_type=None, patient=pat.id)
    assert total == 5
    records, withheld = await net.svc.fetch_many(doc, pat.id, page)
    # h1's own records by the custodian rule; h2's Observation withheld (no consent)
    assert sorted(r.id for r in records) == ["cond-1", "obs-0", "obs-1", "obs-2"]
    assert withheld == ["Observation"]
    [entry] = await net.audit(pat)
    assert entry["outcome"] == "permit"
    assert sorted(entry["records"]) == ["cond-1", "obs-0", "obs-1", "obs-2"]
    assert sorted(entry["resource_types"]) == ["Condition", "Observation"]
    # with consent for h1 everything is released, still one entry
    await net.consent(pat, "h1")
    records, withheld = await net.svc.fetch_many(doc, pat.id, page)
    assert len(records) == 5 and withheld == []
    assert len(await net.audit(pat)) == 2
    # an outsider: all denied, one deny entry listing what was asked for
    stranger = await net.practitioner("h3", "doc-h3")
    with pytest.raises(Unauthorized):
        await net.svc.fetch_many(stranger, pat.id, page)
    entries = await net.audit(pat)
    assert len(entries) == 3 and entries[-1]["outcome"] == "deny"
    assert sorted(entries[-1]["records"]) == sorted(e.record for e in page)
    # an empty result is still one decision when the searched types are named
    records, withheld = await net.svc.fetch_many(doc, pat.id, [], resource_types=["Procedure"])
    assert records == [] and len(await net.audit(pat)) == 4
    assert await net.svc.fetch_many(doc, pat.id, []) == ([], [])
    assert len(await net.audit(pat)) == 4
    with pytest.raises(NotFoundError):
        await net.svc.fetch_many(doc, "pat-" + "f" * 32, [], resource_types=["Observation"])
    # a history as one batch: each entry's version is read
    await net.write("h1", "Observation", "obs-0", pat, observation("obs-0", pat.id, 9.9))
    versions = await net.store.versions("obs-0")
    batch = [
        IndexEntry(v.record, v.resource_type, v.patient, v.custodian, (), None, 0, v.version, False)
        for v in versions
    ]
    records, _ = await net.svc.fetch_many(doc, pat.id, batch)
    assert [r.version for r in records] == [1, 2]
    assert [r.resource and r.resource["valueQuantity"]["value"] for r in records] == [5.4, 9.9]


# -- tampering -------------------------------------------------------------------------------


async def test_tampered_ciphertext_salt_or_key_is_refused(net: Net) -> None:
    pat = await net.patient("h1")
    doc = await net.practitioner("h1", "doc-1")
    await net.write("h1", "Observation", "obs-1", pat)
    stored = await net.store.get_version("obs-1")
    assert stored is not None
    flipped = bytearray(stored.ciphertext)
    flipped[20] ^= 0x01
    net.tamper("UPDATE rec_versions SET ciphertext = ? WHERE record = 'obs-1'", [bytes(flipped)])
    with pytest.raises(IntegrityError, match="commitment"):
        await net.svc.fetch(doc, "obs-1")
    assert [e["outcome"] for e in await net.audit(pat)] == ["permit"]  # logged exactly once
    # restore the ciphertext, change the salt
    net.tamper(
        "UPDATE rec_versions SET ciphertext = ?, salt = ? WHERE record = 'obs-1'",
        [stored.ciphertext, os.urandom(32)],
    )
    with pytest.raises(IntegrityError, match="commitment"):
        await net.svc.fetch(doc, "obs-1")
    assert len(await net.audit(pat)) == 2
    # restore the salt: readable again
    net.tamper("UPDATE rec_versions SET salt = ? WHERE record = 'obs-1'", [stored.salt])
    assert (await net.svc.fetch(doc, "obs-1")).resource is not None
    # the commitment matches but the key is another one: AES-GCM refuses
    aad = aead.record_aad("obs-1", 1, pat.id)
    wrong = kem.wrap_key(net.svc.orgs["h1"].encryption.public, aead.generate_record_key(), aad)
    net.tamper(
        "UPDATE rec_keys SET wrapped = ? WHERE record = 'obs-1' AND recipient = 'org:h1'",
        [wrong],
    )
    with pytest.raises(IntegrityError, match="AES-GCM"):
        await net.svc.fetch(doc, "obs-1")
    # a wrapped key that does not unwrap
    net.tamper(
        "UPDATE rec_keys SET wrapped = ? WHERE record = 'obs-1' AND recipient = 'org:h1'",
        [wrong[:-1] + bytes([wrong[-1] ^ 1])],
    )
    with pytest.raises(IntegrityError, match="unwrap"):
        await net.svc.fetch(doc, "obs-1")
    # the ciphertext missing from the store altogether
    net.tamper("DELETE FROM rec_versions WHERE record = 'obs-1'", [])
    with pytest.raises(IntegrityError, match="missing"):
        await net.svc.fetch(doc, "obs-1")
    assert [e["outcome"] for e in await net.audit(pat)] == ["permit"] * 6


# -- erasure -------------------------------------------------------------------------------


async def test_shred_patient(net: Net) -> None:
    pat = await net.patient("h1")
    keep = await net.patient("h1")
    await net.link(pat, "h2")
    doc = await net.practitioner("h1", "doc-1")
    await net.write("h1", "Observation", "obs-1", pat)
    await net.write("h1", "Observation", "obs-1", pat)  # version 2
    await net.write("h2", "Condition", "cond-2", pat, {"resourceType": "Condition", "id": "x"})
    await net.write("h1", "Observation", "obs-keep", keep)
    await net.consent(pat, "h3")
    reader = await net.practitioner("h3", "doc-h3")
    await net.svc.fetch(reader, "obs-1")  # a grant for h3 exists now
    wrapped = [
        await net.store.get_wrapped(r, v, who)
        for r, v, who in [
            ("obs-1", 1, "org:h1"),
            ("obs-1", 2, "org:h1"),
            ("obs-1", 2, "org:h3"),
            ("obs-1", 2, f"patient:{pat.id}"),
            ("cond-2", 1, "org:h2"),
        ]
    ]
    assert all(w is not None for w in wrapped)
    with pytest.raises(Unauthorized):
        await net.svc.shred_patient("h3", pat.id)  # h3 holds no link to the patient
    assert await net.svc.shred_patient("h1", pat.id) == 2
    assert await net.svc.shred_patient("h1", pat.id) == 0  # safe to repeat
    for rid in ("obs-1", "cond-2"):
        ledger = await net.svc._ledger_record(rid)
        assert ledger is not None and ledger["status"] == "shredded"
    before = len(await net.audit(pat))
    with pytest.raises(NotFoundError, match="erased") as info:
        await net.svc.fetch(doc, "obs-1")
    assert is_gone(info.value)
    entries = await net.audit(pat)
    assert len(entries) == before + 1 and entries[-1]["rule"] == "shredded"
    with pytest.raises(NotFoundError, match="erased"):
        await net.svc.fetch(Caller("patient", pat.id, None), "cond-2")
    with pytest.raises(NotFoundError, match="erased"):
        await net.write("h1", "Observation", "obs-1", pat)
    assert await net.store.search(resource_type=None, patient=pat.id) == ([], 0)
    # the other patient is untouched
    assert (await net.svc.fetch(doc, "obs-keep")).resource is not None
    # no key or ciphertext bytes remain in the store's files; the ledger still verifies
    data = b"".join(p.read_bytes() for p in net.path.glob("records.db*"))
    assert not any(w in data for w in wrapped if w is not None)
    await close_net(net)
    store = open_store(f"sqlite:///{net.path / 'ledger.db'}")
    try:
        report = verify_ledger(store)
    finally:
        store.close()
    assert report.ok, report.failure


# -- no plaintext PHI in any file -----------------------------------------------------------


def synthea() -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / "synthea_sample.ndjson").read_text().splitlines()]


async def test_no_plaintext_phi_in_store_or_ledger(net: Net) -> None:
    patient_res, *conditions = synthea()
    source_id = patient_res["id"]
    pat = await net.patient("h1")
    mine = copy.deepcopy(patient_res)
    mine["id"] = pat.id
    await net.write("h1", "Patient", pat.id, pat, mine, date=None)
    for cond in conditions:
        body = json.loads(json.dumps(cond).replace(f"Patient/{source_id}", f"Patient/{pat.id}"))
        coding = body["code"]["coding"][0]
        await net.write(
            "h1",
            "Condition",
            body["id"],
            pat,
            body,
            codes=[(coding["system"], coding["code"])],
            date=1_000_000_000_000,
        )
    doc = await net.practitioner("h1", "doc-1")
    back = await net.svc.fetch(doc, pat.id)
    assert back.resource is not None and back.resource["name"] == patient_res["name"]
    name = patient_res["name"][0]
    secrets_ = [
        name["family"],
        name["given"][0],
        patient_res["birthDate"],
        patient_res["telecom"][0]["value"],
        patient_res["address"][0]["line"][0],
        next(i["value"] for i in patient_res["identifier"] if i["value"].startswith("999-")),
        source_id,  # the source system's MRN
        *(c["code"]["coding"][0]["code"] for c in conditions),
        *(c["code"]["coding"][0]["display"] for c in conditions),
    ]
    files = [p for p in net.path.rglob("*") if p.is_file() and p.suffix != ".json"]
    names = {p.name for p in files}
    assert {"records.db", "ledger.db"} <= names and "records.db-wal" in names
    for path in files:
        data = path.read_bytes()
        for text in secrets_:
            assert text.encode() not in data, (text, path.name)
    # and after a clean shutdown (checkpointed WAL) too
    await close_net(net)
    for path in (p for p in net.path.rglob("*") if p.is_file() and p.suffix != ".json"):
        data = path.read_bytes()
        for text in secrets_:
            assert text.encode() not in data, (text, path.name)


# -- PostgreSQL backend ----------------------------------------------------------------------


async def test_read_write_shred_on_postgresql(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEDLEDGER_PASSPHRASE", raising=False)
    net = await open_net(tmp_path / "node", pg_url, datadir=True)
    try:
        pat = await net.patient("h1")
        await net.write("h1", "Observation", "obs-1", pat)
        reader = await net.practitioner("h2", "doc-h2")
        await net.consent(pat, "h2")
        assert (await net.svc.fetch(reader, "obs-1")).resource == observation("obs-1", pat.id)
        assert await net.store.get_wrapped("obs-1", 1, "org:h2") is not None
        page, _ = await net.store.search(resource_type="Observation", patient=pat.id)
        records, _ = await net.svc.fetch_many(reader, pat.id, page)
        assert [r.id for r in records] == ["obs-1"]
        assert len(await net.audit(pat)) == 2
        assert await net.svc.shred_patient("h1", pat.id) == 1
        with pytest.raises(NotFoundError, match="erased"):
            await net.svc.fetch(reader, "obs-1")
    finally:
        await close_net(net)


# -- contract changes: patient encryption keys and self-access log entries --------------------


def test_patient_encryption_key_on_register_claim_and_rotation() -> None:
    led = Ledger()
    enc = EncryptionKey.generate()
    pid = "pat-" + "1" * 32
    led.keys[pid] = SigningKey.generate()
    base = {
        "id": pid,
        "links": [{"org": "h1", "commitment": b"c" * 32}],
        "pub": led.keys[pid].public.raw,
    }
    led.reject(MalformedTransaction, "node:h1", "patient.register", {**base, "enc_key": b"x"})
    led.reject(
        MalformedTransaction,
        "node:h1",
        "patient.register",
        {**base, "enc_key": b"x" * 31, "enc_alg": 2},
    )
    led.reject(
        MalformedTransaction,
        "node:h1",
        "patient.register",
        {**base, "enc_key": enc.public.raw, "enc_alg": 9},
    )
    led.submit("node:h1", "patient.register", {**base, "enc_key": enc.public.raw, "enc_alg": 2})
    record = led.get(f"patient/{pid}")
    assert (record["enc_key"], record["enc_alg"]) == (enc.public.raw, 2)
    # rotation to a post-quantum hybrid key, signed by the patient only
    pq = EncryptionKey.generate(ALG_MLKEM768_X25519)
    rotate = {"patient": pid, "enc_key": pq.public.raw, "enc_alg": ALG_MLKEM768_X25519}
    led.reject(Unauthorized, "node:h1", "patient.set_enc_key", rotate)
    led.reject(MalformedTransaction, pid, "patient.set_enc_key", {"patient": pid})
    led.submit(pid, "patient.set_enc_key", rotate)
    assert led.get(f"patient/{pid}")["enc_key"] == pq.public.raw
    # without a key the record has no enc fields (unchanged shape)
    plain = led.patient("h1")
    assert "enc_key" not in led.get(f"patient/{plain}")


def test_patient_claim_binds_the_encryption_key() -> None:
    led = Ledger()
    pid = led.patient("h1", claimed=False)
    code = b"claim-code-" + pid.encode()
    key, enc, evil = SigningKey.generate(), EncryptionKey.generate(), EncryptionKey.generate()

    def claim(enc_key: bytes, signed_enc: bytes) -> dict[str, Any]:
        seq = led.seqs.get("node:h1", 0) + 1
        node = led.keys["node:h1"].key_id
        msg = claim_message(NETWORK, pid, key.public.raw, node, seq, signed_enc, 2)
        return {
            "patient": pid,
            "pub": key.public.raw,
            "claim_code": code,
            "patient_sig": key.sign(msg),
            "enc_key": enc_key,
            "enc_alg": 2,
        }

    # a relaying node cannot swap in its own encryption key
    led.reject(Unauthorized, "node:h1", "patient.claim", claim(evil.public.raw, enc.public.raw))
    led.submit("node:h1", "patient.claim", claim(enc.public.raw, enc.public.raw))
    assert led.get(f"patient/{pid}")["enc_key"] == enc.public.raw


def test_access_log_self_rule() -> None:
    led = Ledger()
    pid, other = led.patient("h1"), led.patient("h1")
    entry = {
        "request": "req-1",
        "actor": pid,
        "org": "h1",
        "role": None,
        "on_behalf": None,
        "patient": pid,
        "resource_types": ["Observation"],
        "records": [f"r{i}" for i in range(200)],  # a full search page
        "purpose": "PATRQT",
        "action": "access",
        "outcome": "permit",
        "consents": [],
        "rule": "self",
        "break_glass": False,
        "time": 1,
    }
    led.submit("node:h1", "access.log", entry)
    led.reject(
        MalformedTransaction,
        "node:h1",
        "access.log",
        {**entry, "request": "req-2", "actor": other},
    )
    led.submit(
        "node:h1",
        "access.log",
        {**entry, "request": "req-3", "actor": other, "outcome": "deny"},
    )


async def test_named_locks_serialise_a_name_and_forget_it_once_free() -> None:
    locks = NamedLocks()
    events: list[tuple[str, int]] = []

    async def hold(names: list[str], tag: int) -> None:
        async with locks.hold(names):
            events.append(("in", tag))
            await asyncio.sleep(0.01)
            events.append(("out", tag))

    first = asyncio.create_task(hold(["a"], 1))
    await asyncio.sleep(0)
    assert len(locks) == 1
    await asyncio.gather(first, hold(["b", "a"], 2), hold(["c"], 3))
    # the two holders of "a" never overlap; "c" ran beside them
    a_events = [e for e in events if e[1] in (1, 2)]
    assert a_events == [("in", 1), ("out", 1), ("in", 2), ("out", 2)]
    assert events.index(("in", 3)) < events.index(("out", 1))
    assert len(locks) == 0  # nothing is kept for names nobody holds
