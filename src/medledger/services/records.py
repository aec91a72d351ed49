"""The record service: encrypted FHIR records, their ledger commitments and every read's audit.

Writing a version (:meth:`RecordService.write`)
-----------------------------------------------
1. A fresh AES-256-GCM record key encrypts the FHIR JSON with associated data
   :func:`~medledger.crypto.aead.record_aad` (record id, version, patient), so a
   ciphertext cannot be moved to another record, version or patient.
2. The key is wrapped with HPKE (:func:`~medledger.crypto.kem.wrap_key`, ``info`` =
   the same associated data) for the custodian organisation and, when the
   patient registered an encryption key on the ledger, for the patient.
3. The complete version is **staged** durably in the store, then the
   ``record.register`` transaction carrying ``SHA-256(salt || ciphertext)`` is
   submitted. Refused: the staged copy is dropped and the error raised (nothing
   is stored). Committed: the version is promoted (:meth:`RecordStore.put_version`),
   and only then is the write acknowledged. Its lastUpdated is the time of the
   block that committed it, so every node shows the same one (the staged copy
   carries the custodian's clock until then).

Why this order: the ledger is the source of truth for which versions exist, so
it must never hold a commitment whose ciphertext is lost. Staging before the
commit means that whatever happens after the commit (a store error, a crash),
the ciphertext and its keys are already on disk; the next write or read of the
record, or :meth:`RecordService.recover` at start-up, promotes the staged copy
once its commitment is on the ledger. A retried write whose earlier attempt
committed but was not promoted completes that attempt and returns it (same
plaintext), instead of creating another version. A staged copy whose
transaction can never commit (older than twice the network's accepted clock
skew and not on the ledger) is dropped by :meth:`RecordService.recover`.

Writing many versions at once (:meth:`RecordService.write_many`)
----------------------------------------------------------------
The same steps for a batch (bulk import): every version is encrypted (in a
process pool when one is given), all are staged in ONE store transaction,
the registrations are committed as ``record.register_batch`` transactions of
up to :data:`~medledger.contracts.records_v1.MAX_BATCH` entries each (one
signature and one log leaf per batch, all or nothing on the ledger), and the
committed ones are promoted in ONE store transaction. The order of the single
write is kept for every entry (staged before its transaction is submitted,
acknowledged only once promoted), so the crash and recovery reasoning above
holds for each of them. Entries are independent: the entries of a refused
batch are submitted again one by one, so one entry refused by the ledger (or
failing its checks) is reported in its slot of the result and dropped from the
store, and the others land.

Reading (:meth:`RecordService.fetch`, :meth:`RecordService.fetch_many`)
-------------------------------------------------------------------------
The decision is made on the node's committed state and logged as exactly one
``access.log`` per call, permit or deny, before anything is released; a denial
raises :class:`~medledger.errors.Unauthorized` after logging. On a permit the
custodian side (:meth:`RecordService.serve_ciphertext`) hands out the
ciphertext, its salt and the record key wrapped for the reader's organisation
(unwrapping its own copy and re-wrapping it to the reader organisation's
encryption key from the ledger when the reader is another organisation, and
keeping that grant in the store). The reading side (:meth:`RecordService.open`)
checks ``SHA-256(salt || ciphertext)`` against the commitment on **its own
ledger copy**, unwraps with its own key and decrypts. A mismatch or a failed
decryption raises :class:`~medledger.errors.IntegrityError`. In the embedded
network every organisation lives in this process, but the two sides are still
separate steps that exchange only ``(ciphertext, salt, wrapped key)``.

In a consortium (one node per organisation) a record whose custodian this node
does not serve is fetched from the custodian's node (``remote``, a
:class:`RemoteRecords`) once this node's ``access.log`` is committed; the request
names that entry, so the custodian, which decides again on its own ledger copy,
checks it instead of logging a second one. The triple is then verified and
opened here exactly as above. Only practitioners and apps read this way
(:meth:`RecordService.remote_entries` lists such records for searches); a
patient is sent to the custodian's node.

Erasure
-------
:meth:`RecordService.shred_patient` marks the patient's records ``shredded`` on
the ledger (``record.shred``) and destroys every wrapped key and ciphertext in
the store. Afterwards reads fail with :class:`~medledger.errors.NotFoundError`
whose ``details["gone"]`` is ``True`` (an API answers 410 Gone). The ledger
keeps its commitments, so ``verify`` still passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from medledger.contracts._common import policy
from medledger.contracts.access import AccessRequest, Decision
from medledger.contracts.access_v1 import MAX_RECORDS
from medledger.contracts.base import get_obj, scan_objs
from medledger.contracts.core import k_org
from medledger.contracts.patients_v1 import k_patient, patient_enc_key
from medledger.contracts.records_v1 import (
    MAX_BATCH,
    PUBLIC_CATEGORIES,
    get_record,
    k_patrec,
    k_recver,
)
from medledger.crypto import aead, kem
from medledger.crypto.hashing import sha256
from medledger.crypto.kem import EncryptionKey, EncryptionPublicKey
from medledger.crypto.keystore import Identity
from medledger.crypto.signing import SigningKey
from medledger.errors import (
    Conflict,
    CryptoError,
    DecryptionError,
    IntegrityError,
    MalformedTransaction,
    MedledgerError,
    NotFoundError,
    StorageError,
    TransactionRejected,
    Unauthorized,
)
from medledger.fhir.jsontext import load_json
from medledger.node import Node, Receipt
from medledger.services.access import AccessService, combine_decisions, decide_for
from medledger.services.submitter import Submitter
from medledger.state.base import StateReader
from medledger.store.records import IndexEntry, RecordStore, RecordVersion, WrappedKey

__all__ = [
    "Caller",
    "NamedLocks",
    "OrgCrypto",
    "RecordService",
    "RecordWrite",
    "RemoteRecords",
    "StoreCheck",
    "StoredRecord",
    "derive_index_key",
    "index_token",
    "is_gone",
    "seal_versions",
]

SALT_SIZE = 32
_INDEX_KEY_SALT = b"medledger/index-key/v1"
_INDEX_KEY_INFO = b"search-index-tokens"
#: versions sealed per process-pool task (and per slice between event-loop yields)
_SEAL_SLICE = 64
#: the purpose logged when a patient reads their own records (v3 ActReason "patient requested")
PATIENT_PURPOSE = "PATRQT"


def derive_index_key(encryption: EncryptionKey) -> bytes:
    """HKDF-SHA256 (RFC 5869) of an organisation's private encryption key: its search index key.

    Deterministic, so every process serving the organisation computes the same
    tokens, and independent of the key's other uses (its own salt and info).
    """
    prk = hmac.new(_INDEX_KEY_SALT, encryption.private_bytes(), hashlib.sha256).digest()
    return hmac.new(prk, _INDEX_KEY_INFO + b"\x01", hashlib.sha256).digest()


def index_token(index_key: bytes, kind: str, system: str | None, value: str) -> bytes:
    """HMAC-SHA256 search token ``kind|system|value`` (see :meth:`RecordService.index_token`)."""
    return hmac.digest(index_key, f"{kind}|{system or ''}|{value}".encode(), "sha256")


#: a recipient public key as ``(alg, raw)`` (picklable, for process pools)
RawPublicKey = tuple[int, bytes]
#: what :func:`seal_versions` seals: plaintext, associated data, recipients, committed code
SealJob = tuple[bytes, bytes, Sequence[RawPublicKey], str | None]
#: what it returns: salt, ciphertext, record key wrapped per recipient, code commitment
Sealed = tuple[bytes, bytes, list[bytes], bytes | None]


def seal_versions(jobs: Sequence[SealJob]) -> list[Sealed]:
    """Encrypt each plaintext under a fresh record key wrapped for its recipients.

    A pure function of its arguments (public keys only; the record keys never
    leave it), so a batch can be sealed in a worker process. The associated
    data is also the HPKE ``info`` of every wrap; the code commitment is
    ``SHA-256(salt || code)``.
    """
    out: list[Sealed] = []
    for plaintext, aad, recipients, code in jobs:
        salt = os.urandom(SALT_SIZE)
        record_key = aead.generate_record_key()
        ciphertext = aead.encrypt(record_key, plaintext, aad)
        wrapped = [
            kem.wrap_key(EncryptionPublicKey(alg, raw), record_key, aad) for alg, raw in recipients
        ]
        out.append(
            (salt, ciphertext, wrapped, None if code is None else sha256(salt, code.encode()))
        )
    return out


@dataclass(frozen=True, slots=True)
class RecordWrite:
    """One version for :meth:`RecordService.write_many` (the arguments of ``write``)."""

    resource_type: str
    record_id: str
    patient: str
    plaintext: bytes
    category: str | None = None
    code_tokens: Sequence[bytes] = ()
    codes_for_commitment: Sequence[str] = ()
    date: int | None = None
    expected_version: int | None = None
    deleted: bool = False


@dataclass(slots=True)
class _Built:
    """A version ready to stage: what the store keeps and what the ledger gets."""

    version: RecordVersion
    keys: list[WrappedKey]
    index: IndexEntry
    payload: dict[str, Any]
    resource: dict[str, Any] | None

    def result(self, tx_id: bytes | None) -> StoredRecord:
        v = self.version
        return StoredRecord(
            v.record,
            v.resource_type,
            v.patient,
            v.custodian,
            v.version,
            v.last_updated,
            self.resource,
            tx_id,
        )


@dataclass(slots=True)
class _LockEntry:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # holding or waiting; the entry is dropped at 0


class NamedLocks:
    """One asyncio lock per name (a record id, say), held for any number of names at once.

    Names are locked in sorted order, so two batches never deadlock; entries
    exist only while someone holds or waits for them.
    """

    def __init__(self) -> None:
        self._locks: dict[str, _LockEntry] = {}

    def __len__(self) -> int:
        """How many names are held or waited for now."""
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, records: Iterable[str]) -> AsyncIterator[None]:
        entries: list[tuple[str, _LockEntry]] = []
        for name in sorted(set(records)):
            entry = self._locks.get(name)
            if entry is None:
                entry = self._locks[name] = _LockEntry()
            entry.users += 1
            entries.append((name, entry))
        acquired = 0
        try:
            for _, entry in entries:
                await entry.lock.acquire()
                acquired += 1
            yield
        finally:
            for n, (name, entry) in enumerate(entries):
                if n < acquired:
                    entry.lock.release()
                entry.users -= 1
                if entry.users == 0:
                    del self._locks[name]


@dataclass(frozen=True, slots=True)
class OrgCrypto:
    """What a node holds for an organisation it serves."""

    org: str
    signing: SigningKey
    encryption: EncryptionKey
    index_key: bytes  # HKDF of the encryption private key (derive_index_key)

    @classmethod
    def from_identity(cls, org: str, identity: Identity) -> OrgCrypto:
        """From the organisation's node identity (keystore ``node-<org>``)."""
        return cls(
            org, identity.signing, identity.encryption, derive_index_key(identity.encryption)
        )


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking (built by the API from a SMART token, or by the CLI)."""

    kind: str  # "practitioner" | "app" | "patient" | "system"
    id: str  # principal id (practitioner / app / patient id); for "system": the client id
    org: str | None  # org the caller acts for (None for patients)
    purpose: str = "TREAT"
    break_glass: bool = False
    client: str | None = None  # SMART client id (logged as on_behalf)


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """Result of a write or read."""

    id: str
    resource_type: str
    patient: str
    custodian: str
    version: int
    last_updated: int
    resource: dict[str, Any] | None  # plaintext FHIR JSON (None for a deleted version)
    tx_id: bytes | None = None  # the record.register tx


def is_gone(exc: BaseException) -> bool:
    """Is ``exc`` the "record was erased" :class:`NotFoundError` (HTTP 410)?"""
    return isinstance(exc, NotFoundError) and bool(exc.details.get("gone"))


def _gone(record: str) -> NotFoundError:
    return NotFoundError(
        f"record {record} was erased (crypto-shredded): its content is gone for good",
        gone=True,
        record=record,
    )


def _at_time(v: RecordVersion, index: IndexEntry, at: int) -> tuple[RecordVersion, IndexEntry]:
    """``v`` and its index row with ``last_updated`` = ``at`` (unchanged when ``at`` is 0:
    no commit time known)."""
    if not at or at == v.last_updated:
        return v, index
    return replace(v, last_updated=at), replace(index, last_updated=at)


def _resource(plaintext: bytes, what: str) -> dict[str, Any]:
    try:
        doc = load_json(plaintext)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict):
        raise MalformedTransaction(f"{what} is not a JSON object")
    return doc


class RemoteRecords(Protocol):
    """The custodians whose records other nodes hold (the consortium's ``RemoteCustodians``).

    :meth:`serve` returns the triple :meth:`RecordService.serve_ciphertext` returns
    locally, fetched from the custodian's node, which checks ``access_tx`` (this
    node's committed ``access.log`` of the read) instead of logging a second
    entry. It raises :mod:`medledger.errors` only: :class:`Unauthorized` when the
    custodian refuses, :class:`NotFoundError` (``gone`` for an erased record),
    :class:`OrdererError` when the custodian's node is unavailable or has not yet
    applied the access entry.
    """

    def serves(self, custodian: str) -> bool: ...

    async def serve(
        self,
        custodian: str,
        record: str,
        version: int,
        *,
        actor: str,
        purpose: str = "TREAT",
        break_glass: bool = False,
        on_behalf: str | None = None,
        access_tx: bytes | None = None,
    ) -> tuple[bytes, bytes, bytes | None]: ...


def _read_result(
    rec: Mapping[str, Any], version: int, last_updated: int, plaintext: bytes | None
) -> StoredRecord:
    """What a read returns: the ledger entry ``rec``'s metadata and the decrypted resource
    (None for a deleted version)."""
    record = str(rec["id"])
    return StoredRecord(
        record,
        str(rec["resource_type"]),
        str(rec["patient"]),
        str(rec["custodian"]),
        version,
        last_updated,
        None if plaintext is None else _resource(plaintext, f"record {record}"),
    )


@dataclass(slots=True)
class StoreCheck:
    """What :meth:`RecordService.check_store` found for one custodian organisation."""

    org: str
    records: int = 0  # records the ledger says the organisation holds
    versions: int = 0  # versions checked against their commitment
    shredded: int = 0  # shredded records whose ciphertexts and keys are confirmed gone
    index: int = 0  # search index rows checked against their record
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "org": self.org,
            "ok": self.ok,
            "records": self.records,
            "versions": self.versions,
            "shredded": self.shredded,
            "index": self.index,
            "problems": list(self.problems),
        }


class RecordService:
    """Encrypted record writes, audited reads, erasure; one per node."""

    def __init__(
        self,
        node: Node,
        submitter: Submitter,
        access: AccessService,
        store: RecordStore,
        orgs: Mapping[str, OrgCrypto],
        *,
        remote: RemoteRecords | None = None,
    ) -> None:
        self.node = node
        self.submitter = submitter
        self.access = access
        self.store = store
        self.orgs = dict(orgs)
        self.remote = remote  # custodians served by other nodes (consortium)
        self._locks = NamedLocks()

    # -- helpers ------------------------------------------------------------------------
    def _org(self, org: str) -> OrgCrypto:
        crypto = self.orgs.get(org)
        if crypto is None:
            raise NotFoundError(f"this node does not hold the keys of organisation {org!r}")
        return crypto

    def _lock(self, record: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self._locks.hold((record,))

    async def _ledger_record(self, record: str) -> dict[str, Any] | None:
        return await self.node.read(lambda st: get_record(st, record))

    async def _commitment(self, record: str, version: int) -> bytes | None:
        entry = await self.node.read(lambda st: get_obj(st, k_recver(record, version)))
        return None if entry is None else bytes(entry["commitment"])

    async def _block_time(self, height: int) -> int:
        """The time of block ``height`` (ms): the lastUpdated of the versions it committed."""
        header, _ = await self.node.get_block(height)
        return int(header.time)

    async def _stamped(
        self, v: RecordVersion, index: IndexEntry, height: int | None = None
    ) -> tuple[RecordVersion, IndexEntry]:
        """``v`` and its index row with ``last_updated`` set to the time of the block
        that committed it (``height``, else read from the version's ledger entry).

        A version is staged with the custodian's clock, but its lastUpdated is its
        commit time on the ledger, the same on every node: a reader on another node
        shows exactly what the custodian shows (see :meth:`_committed_at`).
        """
        if height is None:
            at = await self._committed_at(v.record, v.version)
        else:
            at = await self._block_time(height)
        return _at_time(v, index, at)

    @staticmethod
    def patient_key_fields(identity: Identity) -> dict[str, Any]:
        """The ``enc_key``/``enc_alg`` fields of ``patient.register``/``patient.claim`` for a
        patient identity, so custodians wrap record keys for the patient too."""
        pub = identity.encryption.public
        return {"enc_key": pub.raw, "enc_alg": pub.alg}

    def index_token(self, org: str, kind: str, system: str | None, value: str) -> bytes:
        """HMAC-SHA256 search token ``kind|system|value`` keyed by ``org``'s index key.

        Tokens of the same code differ between organisations and reveal nothing
        without the key; the custodian's tokens are what its search index holds.
        """
        return index_token(self._org(org).index_key, kind, system, value)

    # -- writing ------------------------------------------------------------------------
    async def write(
        self,
        org: str,
        resource_type: str,
        record_id: str,
        patient: str,
        plaintext: bytes,
        *,
        category: str | None,
        code_tokens: Sequence[bytes],
        codes_for_commitment: Sequence[str],
        date: int | None,
        expected_version: int | None = None,
        deleted: bool = False,
        author_key: SigningKey | None = None,
    ) -> StoredRecord:
        """Encrypt and store a new version of a record held by ``org``, committed on the ledger.

        ``code_tokens`` are every search token of the resource (codes and
        categories, made with :meth:`index_token` for ``org``). ``category`` is
        recorded on the ledger only when it is one of the public categories.
        ``codes_for_commitment[0]`` (if any) is committed to as
        ``SHA-256(salt || code)``; ``date`` (ms) goes to the index and, when not
        negative, to the ledger as ``effective``. ``expected_version`` is the
        version the caller expects to be current (0: the record must not exist);
        a mismatch is a :class:`Conflict`. ``deleted`` writes a tombstone version.
        The version is signed with ``author_key`` (a practitioner of ``org``) or
        the organisation's node key.
        """
        crypto = self._org(org)
        w = RecordWrite(
            resource_type,
            record_id,
            patient,
            b"" if deleted else plaintext,
            category,
            tuple(code_tokens),
            tuple(codes_for_commitment),
            date,
            expected_version,
            deleted,
        )
        resource = self._parse(w)
        async with self._lock(record_id):
            rec = await self._ledger_record(record_id)
            done = await self._check(org, w, rec, resource)
            if done is not None:
                return done
            patient_key = (
                None if deleted else await self.node.read(lambda st: patient_enc_key(st, patient))
            )
            now = self.node.clock()
            job = self._seal_job(crypto, w, rec, patient_key)
            sealed = None if job is None else seal_versions([job])[0]
            b = self._build(crypto, w, rec, resource, now, sealed)
            await self.store.stage(b.version, b.keys, b.index, now)
            try:
                receipt = await self.submitter.submit(
                    author_key or crypto.signing, "record.register", b.payload
                )
            except TransactionRejected:
                with contextlib.suppress(StorageError):  # else recover() drops it later
                    await self.store.unstage(record_id, b.version.version, b.version.salt)
                raise
            b.version, b.index = await self._stamped(b.version, b.index, receipt.height)
            await self.store.put_version(b.version, b.keys, b.index)
            return b.result(receipt.tx_id)

    async def write_many(
        self,
        org: str,
        writes: Sequence[RecordWrite],
        *,
        author_key: SigningKey | None = None,
        executor: Executor | None = None,
        decoded: bool = True,
    ) -> list[StoredRecord | MedledgerError]:
        """:meth:`write` for many records of ``org`` at once; one result per entry, in order.

        Each slot holds the entry's :class:`StoredRecord` (committed and
        stored) or the error that entry met (the same errors :meth:`write`
        raises: :class:`Conflict`, a ledger refusal, :class:`StorageError` ...).
        Entries are independent; a record id may appear once per call (later
        duplicates get :class:`Conflict`). Three store transactions and one
        ``record.register_batch`` per :data:`~medledger.contracts.records_v1.MAX_BATCH`
        entries serve the whole call. ``executor`` (e.g.
        a process pool) encrypts and wraps the keys off the event loop
        (:func:`seal_versions`). ``decoded=False`` skips decoding each plaintext
        for the results (their ``resource`` is None): for a caller whose
        plaintexts are serialised resources it validated itself (the importer).
        """
        crypto = self._org(org)
        results: list[StoredRecord | MedledgerError | None] = [None] * len(writes)
        resources: dict[int, dict[str, Any] | None] = {}
        seen: set[str] = set()
        todo: list[int] = []
        for i, w in enumerate(writes):
            if w.record_id in seen:
                results[i] = Conflict(f"record {w.record_id} is written twice in one batch")
                continue
            seen.add(w.record_id)
            try:
                resources[i] = self._parse(w) if decoded else None
            except MalformedTransaction as exc:
                results[i] = exc
                continue
            todo.append(i)
        async with self._locks.hold(writes[i].record_id for i in todo):
            ids = [writes[i].record_id for i in todo]
            patients = {writes[i].patient for i in todo if not writes[i].deleted}

            def look(
                st: StateReader,
            ) -> tuple[dict[str, dict[str, Any] | None], dict[str, tuple[bytes, int] | None]]:
                return (
                    {r: get_record(st, r) for r in ids},
                    {p: patient_enc_key(st, p) for p in patients},
                )

            recs, patient_keys = await self.node.read(look)
            ready: list[int] = []
            for i in todo:
                w = writes[i]
                try:
                    done = await self._check(org, w, recs[w.record_id], resources[i])
                except MedledgerError as exc:
                    results[i] = exc
                    continue
                if done is not None:
                    results[i] = done
                else:
                    ready.append(i)
            if ready:
                await self._write_ready(
                    crypto,
                    [writes[i] for i in ready],
                    [recs[writes[i].record_id] for i in ready],
                    [resources[i] for i in ready],
                    patient_keys,
                    author_key,
                    executor,
                    results,
                    ready,
                )
        out: list[StoredRecord | MedledgerError] = []
        for r in results:
            assert r is not None
            out.append(r)
        return out

    async def _write_ready(
        self,
        crypto: OrgCrypto,
        writes: list[RecordWrite],
        recs: list[dict[str, Any] | None],
        resources: list[dict[str, Any] | None],
        patient_keys: Mapping[str, tuple[bytes, int] | None],
        author_key: SigningKey | None,
        executor: Executor | None,
        results: list[StoredRecord | MedledgerError | None],
        slots: list[int],
    ) -> None:
        """Seal, stage, commit and promote checked entries (records locked by the caller)."""
        jobs = [
            self._seal_job(crypto, w, rec, None if w.deleted else patient_keys.get(w.patient))
            for w, rec in zip(writes, recs, strict=True)
        ]
        sealed = await self._seal(jobs, executor)
        now = self.node.clock()
        built = [
            self._build(crypto, w, rec, res, now, sl)
            for w, rec, res, sl in zip(writes, recs, resources, sealed, strict=True)
        ]
        try:
            await self.store.stage_many([(b.version, b.keys, b.index) for b in built], now)
        except StorageError as exc:  # nothing was submitted
            for i in slots:
                results[i] = exc
            return
        outcomes = await self._register_many(
            author_key or crypto.signing, [b.payload for b in built]
        )
        committed: list[tuple[int, _Built, Receipt]] = []
        refused: list[_Built] = []
        for i, b, outcome in zip(slots, built, outcomes, strict=True):
            if isinstance(outcome, Receipt):
                committed.append((i, b, outcome))
                continue
            results[i] = outcome
            if isinstance(outcome, TransactionRejected):
                refused.append(b)
            # else (not committed, outcome unknown): left staged; recover() decides
        if refused:
            with contextlib.suppress(StorageError):  # else recover() drops them later
                await self.store.unstage_many(
                    [(b.version.record, b.version.version, b.version.salt) for b in refused]
                )
        if not committed:
            return
        times: dict[int, int] = {}
        for _, b, receipt in committed:
            if receipt.height not in times:
                times[receipt.height] = await self._block_time(receipt.height)
            b.version, b.index = _at_time(b.version, b.index, times[receipt.height])
        try:
            conflicts = await self.store.put_versions(
                [(b.version, b.keys, b.index) for _, b, _ in committed]
            )
        except StorageError as exc:  # committed and staged: the next read, write or recover()
            for i, _, _ in committed:
                results[i] = exc
            return
        for (i, b, receipt), conflict in zip(committed, conflicts, strict=True):
            results[i] = conflict if conflict is not None else b.result(receipt.tx_id)

    async def _register_many(
        self, key: SigningKey, payloads: Sequence[dict[str, Any]]
    ) -> list[Receipt | MedledgerError]:
        """Commit ``record.register`` payloads; one outcome per payload, in order.

        Up to :data:`~medledger.contracts.records_v1.MAX_BATCH` payloads go in
        one ``record.register_batch`` transaction (one signature, one log leaf;
        all or nothing), a lone payload as ``record.register``. The entries of a
        refused batch are submitted again one by one, so each gets the outcome
        of its own content, as if it had been submitted alone.
        """
        groups = [payloads[k : k + MAX_BATCH] for k in range(0, len(payloads), MAX_BATCH)]
        items = [
            ("record.register", g[0])
            if len(g) == 1
            else ("record.register_batch", {"records": list(g)})
            for g in groups
        ]
        outcomes = await self.submitter.submit_many(key, items)
        out: list[Receipt | MedledgerError] = []
        again: list[tuple[int, Sequence[dict[str, Any]]]] = []
        for g, outcome in zip(groups, outcomes, strict=True):
            if len(g) > 1 and isinstance(outcome, TransactionRejected):
                again.append((len(out), g))  # nothing of it was applied
            out.extend([outcome] * len(g))
        if again:
            singles = iter(
                await self.submitter.submit_many(
                    key, [("record.register", p) for _, g in again for p in g]
                )
            )
            for start, g in again:
                for k in range(len(g)):
                    out[start + k] = next(singles)
        return out

    @staticmethod
    def _parse(w: RecordWrite) -> dict[str, Any] | None:
        return None if w.deleted else _resource(w.plaintext, "the resource")

    async def _check(
        self,
        org: str,
        w: RecordWrite,
        rec: dict[str, Any] | None,
        resource: dict[str, Any] | None,
    ) -> StoredRecord | None:
        """May ``w`` be written on top of the ledger entry ``rec``? (record locked)

        Returns the stored result when an earlier attempt of this very write
        committed (it is completed now instead of writing another version);
        raises :class:`Conflict` / :class:`Unauthorized` / gone when it may not.
        """
        current = 0 if rec is None else int(rec["version"])
        if rec is not None:
            completed = await self._repair(w.record_id)
            same = completed.get(current)
            if (
                same is not None
                and w.expected_version in (None, current - 1)
                and same.custodian == org
                and same.patient == w.patient
                and same.resource_type == w.resource_type
                and same.deleted == w.deleted
                and await self._plaintext_of(same) == (b"" if w.deleted else w.plaintext)
            ):
                # an earlier attempt of this very write committed; it is now stored
                return StoredRecord(
                    w.record_id,
                    w.resource_type,
                    w.patient,
                    org,
                    current,
                    same.last_updated,
                    resource,
                )
        if w.expected_version is not None and w.expected_version != current:
            raise Conflict(
                f"record {w.record_id} is at version {current}, not {w.expected_version}",
                current=current,
            )
        if rec is not None:
            if rec["status"] == "shredded":
                raise _gone(w.record_id)
            if rec["custodian"] != org:
                raise Unauthorized(f"record {w.record_id} is held by {rec['custodian']}")
            if rec["patient"] != w.patient or rec["resource_type"] != w.resource_type:
                raise Conflict("a new version cannot change the patient or resource type")
        return None

    @staticmethod
    def _seal_job(
        crypto: OrgCrypto,
        w: RecordWrite,
        rec: dict[str, Any] | None,
        patient_key: tuple[bytes, int] | None,
    ) -> SealJob | None:
        """What :func:`seal_versions` needs for ``w`` (None: a tombstone, nothing to seal)."""
        if w.deleted:
            return None
        version = 1 if rec is None else int(rec["version"]) + 1
        recipients: list[RawPublicKey] = [
            (crypto.encryption.public.alg, crypto.encryption.public.raw)
        ]
        if patient_key is not None:
            recipients.append((patient_key[1], patient_key[0]))
        code = w.codes_for_commitment[0] if w.codes_for_commitment else None
        return (
            w.plaintext,
            aead.record_aad(w.record_id, version, w.patient),
            recipients,
            code,
        )

    async def _seal(
        self, jobs: Sequence[SealJob | None], executor: Executor | None
    ) -> list[Sealed | None]:
        """:func:`seal_versions` of every job, in ``executor`` or in slices on the loop."""
        real = [j for j in jobs if j is not None]
        parts = [real[k : k + _SEAL_SLICE] for k in range(0, len(real), _SEAL_SLICE)]
        done: list[Sealed] = []
        if executor is not None and len(parts) > 1:
            loop = asyncio.get_running_loop()
            for got in await asyncio.gather(
                *(loop.run_in_executor(executor, seal_versions, part) for part in parts)
            ):
                done.extend(got)
        else:
            for n, part in enumerate(parts):
                if n:
                    await asyncio.sleep(0)  # let commits and reads through between slices
                done.extend(seal_versions(part))
        it = iter(done)
        return [None if j is None else next(it) for j in jobs]

    def _build(
        self,
        crypto: OrgCrypto,
        w: RecordWrite,
        rec: dict[str, Any] | None,
        resource: dict[str, Any] | None,
        now: int,
        sealed: Sealed | None,
    ) -> _Built:
        org = crypto.org
        version = 1 if rec is None else int(rec["version"]) + 1
        keys: list[WrappedKey] = []
        code_commitment: bytes | None = None
        if sealed is None:  # a tombstone
            salt, ciphertext = os.urandom(SALT_SIZE), b""
            if w.codes_for_commitment:
                code_commitment = sha256(salt, w.codes_for_commitment[0].encode())
        else:
            salt, ciphertext, wrapped, code_commitment = sealed
            recipients = [f"org:{org}", f"patient:{w.patient}"]
            keys = [
                WrappedKey(w.record_id, version, who, blob)
                for who, blob in zip(recipients, wrapped, strict=False)
            ]
        stored = RecordVersion(
            w.record_id,
            version,
            w.patient,
            org,
            w.resource_type,
            salt,
            ciphertext,
            now,
            w.deleted,
        )
        index = IndexEntry(
            w.record_id,
            w.resource_type,
            w.patient,
            org,
            tuple(sorted({bytes(t) for t in w.code_tokens})),
            w.date,
            now,
            version,
            w.deleted,
        )
        payload: dict[str, Any] = {
            "record": w.record_id,
            "patient": w.patient,
            "resource_type": w.resource_type,
            "commitment": sha256(salt, ciphertext),
            "version": version,
            "prev": None if rec is None else rec["commitment"],
        }
        if w.category in PUBLIC_CATEGORIES:
            payload["category"] = w.category
        if code_commitment is not None:
            payload["code_commitment"] = code_commitment
        if w.date is not None and w.date >= 0:
            payload["effective"] = w.date
        return _Built(stored, keys, index, payload, resource)

    async def _plaintext_of(self, v: RecordVersion) -> bytes | None:
        """The custodian's own decryption of a stored version (``b""`` for a tombstone)."""
        if v.deleted:
            return b""
        crypto = self.orgs.get(v.custodian)
        wrapped = await self.store.get_wrapped(v.record, v.version, f"org:{v.custodian}")
        if crypto is None or wrapped is None:
            return None
        aad = aead.record_aad(v.record, v.version, v.patient)
        try:
            return aead.decrypt(kem.unwrap_key(crypto.encryption, wrapped, aad), v.ciphertext, aad)
        except CryptoError:
            return None

    async def _repair(self, record: str) -> dict[int, RecordVersion]:
        """Promote staged versions of ``record`` whose commitment is on the ledger.

        Drops staged versions another commitment won; returns the promoted ones
        by version.
        """
        promoted: dict[int, RecordVersion] = {}
        for s in await self.store.staged(record):
            v = s.version
            on_ledger = await self._commitment(record, v.version)
            if on_ledger is None:
                continue  # in flight, or never committed: recover() decides
            if on_ledger == sha256(v.salt, v.ciphertext):
                v, index = await self._stamped(v, s.index)
                await self.store.put_version(v, s.keys, index)
                promoted[v.version] = v
            else:
                await self.store.unstage(record, v.version, v.salt)
        return promoted

    async def reindex(
        self,
        org: str,
        tokens_of: Callable[[str, bytes], Sequence[bytes]],
        *,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> tuple[int, int]:
        """Recompute the search tokens of every current version ``org`` holds.

        For an upgrade that indexes more than the version it stored (e.g. Patient
        identifiers): ``tokens_of(resource_type, plaintext)`` gives a version's tokens,
        computed as when it is written. Each current version is decrypted with the
        custodian's own key, like the write path it repeats (nothing is served, so no
        access is decided or logged); rows whose tokens differ are rewritten with the
        same version, dates and content, and nothing goes on the ledger. Returns
        ``(checked, rewritten)``; ``on_progress(done, total)`` after each page.
        """
        if org not in self.orgs:
            raise NotFoundError(f"this node holds no keys of organisation {org}")
        checked = rewritten = 0
        async for page, done, total in self._index_pages(org, limit=200):
            for entry in page:
                v = await self.store.get_version(entry.record, entry.version)
                if v is None or v.deleted:
                    continue
                plaintext = await self._plaintext_of(v)
                if plaintext is None:
                    raise IntegrityError(
                        f"record {v.record} v{v.version}: the custodian's key does not open it"
                    )
                checked += 1
                want = tuple(dict.fromkeys(tokens_of(v.resource_type, plaintext)))
                if set(want) != set(entry.tokens):
                    await self.store.put_version(v, [], replace(entry, tokens=want))
                    rewritten += 1
            if on_progress is not None:
                on_progress(done, total)
        return checked, rewritten

    async def _index_pages(
        self, org: str, *, limit: int, include_deleted: bool = False
    ) -> AsyncIterator[tuple[list[IndexEntry], int, int]]:
        """The search index rows of the records ``org`` holds, a page at a time, with how
        many rows have been given so far and the total."""
        offset = 0
        while True:
            page, total = await self.store.search(
                resource_type=None,
                custodian=org,
                include_deleted=include_deleted,
                offset=offset,
                limit=limit,
            )
            offset += len(page)
            yield page, offset, total
            if not page or offset >= total:
                return

    async def check_store(
        self,
        org: str,
        tokens_of: Callable[[str, bytes], Sequence[bytes]],
        *,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> StoreCheck:
        """Check the records ``org`` holds at rest against the ledger; change nothing.

        For every record the ledger says ``org`` holds: every version is in the store,
        its salt and ciphertext hash to the version's commitment, the custodian's own
        key opens it (AES-GCM, bound to the record, version and patient) and it names
        the ledger's patient and type; the search index row matches what the current
        version is indexed under now (``tokens_of``, as a write computes them). A
        shredded record must have no ciphertext and no key left. Versions and index
        rows the ledger does not know are reported too. ``on_progress(done, total)``
        after each record.
        """
        if org not in self.orgs:
            raise NotFoundError(f"this node holds no keys of organisation {org}")
        check = StoreCheck(org)

        def held(st: StateReader) -> list[dict[str, Any]]:
            return [
                dict(rec)
                for _, rec in scan_objs(st, b"record/")
                if isinstance(rec, dict) and rec.get("custodian") == org
            ]

        # the index before the ledger: a version is indexed only once committed, so on a
        # node that keeps writing every row read here is already on the ledger read next
        index: dict[str, IndexEntry] = {}
        async for page, _, _ in self._index_pages(org, limit=500, include_deleted=True):
            index.update((e.record, e) for e in page)
        ledger = sorted(await self.node.read(held), key=lambda r: str(r["id"]))
        known = {str(r["id"]): r for r in ledger}
        problems = check.problems
        for n, rec in enumerate(ledger, 1):
            rid, latest = str(rec["id"]), int(rec["version"])
            check.records += 1
            stored = {v.version: v for v in await self.store.versions(rid)}
            if rec.get("status") == "shredded":
                check.shredded += 1
                for v in stored.values():
                    if v.ciphertext or await self.store.get_wrapped(rid, v.version, f"org:{org}"):
                        problems.append(f"{rid} v{v.version}: shredded, but its data remains")
                if rid in index:
                    problems.append(f"{rid}: shredded, but still in the search index")
            else:
                for version in range(1, latest + 1):
                    problems.extend(
                        await self._check_version(rid, version, rec, stored.get(version))
                    )
                    check.versions += 1
                entry = index.get(rid)
                current = stored.get(latest)
                if entry is None:
                    problems.append(f"{rid}: not in the search index")
                elif current is not None and entry.version != latest:
                    problems.append(
                        f"{rid}: the search index shows v{entry.version}, the ledger v{latest}"
                    )
                elif current is not None and not current.deleted:
                    check.index += 1
                    plaintext = await self._plaintext_of(current)
                    if plaintext is not None:
                        want = set(tokens_of(current.resource_type, plaintext))
                        if want != set(entry.tokens):
                            problems.append(
                                f"{rid}: the search index row differs from the record "
                                "(medledger reindex rewrites it)"
                            )
            extra = sorted(v for v in stored if v > latest)
            if extra:  # or committed since the ledger was read: ask it again
                now = await self._ledger_record(rid)
                newest = latest if now is None else int(now["version"])
                problems.extend(
                    f"{rid} v{ver}: stored, but not on the ledger" for ver in extra if ver > newest
                )
            if on_progress is not None:
                on_progress(n, len(ledger))
        for rid in sorted(set(index) - set(known)):
            problems.append(f"{rid}: in the search index, but the ledger has no such record")
        return check

    async def _check_version(
        self, rid: str, version: int, rec: Mapping[str, Any], v: RecordVersion | None
    ) -> list[str]:
        """What is wrong with stored version ``v`` of ledger record ``rec`` (nothing: [])."""
        where = f"{rid} v{version}"
        if v is None:
            staged = [s for s in await self.store.staged(rid) if s.version.version == version]
            if staged:
                return [f"{where}: committed but only staged (a server start promotes it)"]
            return [f"{where}: committed on the ledger, missing from the store"]
        commitment = await self._commitment(rid, version)
        if commitment is None or sha256(v.salt, v.ciphertext) != commitment:
            return [f"{where}: does not match its commitment on the ledger (altered)"]
        out = []
        if (v.patient, v.resource_type, v.custodian) != (
            rec["patient"],
            rec["resource_type"],
            rec["custodian"],
        ):
            out.append(f"{where}: stored with another patient, type or custodian")
        if not v.deleted and await self._plaintext_of(v) is None:
            out.append(f"{where}: the custodian's key does not open it")
        return out

    async def recover(self) -> tuple[int, int]:
        """Finish or discard every staged version (run at start-up, before serving).

        Promotes staged versions whose commitment is on the ledger; drops those
        another commitment won and those that can never commit (staged longer
        ago than twice the network's ``max_tx_skew_ms``). Returns
        ``(promoted, dropped)``.
        """
        config = await self.node.read(lambda st: get_obj(st, b"cfg/network") or {})
        horizon = self.node.clock() - 2 * int(policy(config)["max_tx_skew_ms"])
        promoted = dropped = 0
        for s in await self.store.staged():
            v = s.version
            async with self._lock(v.record):
                on_ledger = await self._commitment(v.record, v.version)
                rec = await self._ledger_record(v.record)
                if on_ledger is not None and on_ledger == sha256(v.salt, v.ciphertext):
                    if rec is not None and rec["status"] == "shredded":
                        await self.store.unstage(v.record, v.version, v.salt)
                        dropped += 1
                    else:
                        v, index = await self._stamped(v, s.index)
                        await self.store.put_version(v, s.keys, index)
                        promoted += 1
                elif on_ledger is not None or s.staged_at < horizon:
                    await self.store.unstage(v.record, v.version, v.salt)
                    dropped += 1
        return promoted, dropped

    # -- the two sides of a read -----------------------------------------------------------
    async def _stored(self, record: str, version: int) -> RecordVersion:
        stored = await self.store.get_version(record, version)
        if stored is None:
            async with self._lock(record):
                await self._repair(record)
            stored = await self.store.get_version(record, version)
        if stored is None:
            raise IntegrityError(
                f"record {record} version {version} is on the ledger but its ciphertext "
                "is missing from the store"
            )
        return stored

    async def _serve(
        self, custodian: str, record: str, version: int, reader_org: str
    ) -> tuple[RecordVersion, bytes | None]:
        stored = await self._stored(record, version)
        if stored.custodian != custodian:
            raise IntegrityError(f"record {record} is stored as held by {stored.custodian}")
        if stored.deleted:
            return stored, None
        if not stored.ciphertext:
            raise _gone(record)
        recipient = f"org:{reader_org}"
        wrapped = await self.store.get_wrapped(record, version, recipient)
        if wrapped is not None:
            return stored, wrapped
        own = await self.store.get_wrapped(record, version, f"org:{custodian}")
        if own is None:
            raise IntegrityError(f"the custodian's key of record {record} v{version} is missing")
        aad = aead.record_aad(record, version, stored.patient)
        try:
            record_key = kem.unwrap_key(self._org(custodian).encryption, own, aad)
        except DecryptionError as exc:
            raise IntegrityError(
                f"the custodian's wrapped key of record {record} v{version} does not unwrap"
            ) from exc
        org = await self.node.read(lambda st: get_obj(st, k_org(reader_org)))
        if org is None or org.get("status") != "active":
            raise Unauthorized(f"organisation {reader_org} is not an active member")
        try:
            pub = EncryptionPublicKey(int(org["enc_alg"]), bytes(org["enc_key"]))
        except (CryptoError, KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(
                f"the encryption key of {reader_org} on the ledger is not usable"
            ) from exc
        wrapped = kem.wrap_key(pub, record_key, aad)
        await self.store.put_wrapped([WrappedKey(record, version, recipient, wrapped)])
        return stored, wrapped

    async def serve_ciphertext(
        self, custodian: str, record: str, version: int, reader_org: str
    ) -> tuple[bytes, bytes, bytes | None]:
        """Custodian side: ``(ciphertext, salt, record key wrapped for reader_org)``.

        For another organisation the custodian unwraps its own copy of the key
        and wraps it to ``reader_org``'s encryption key from the ledger (kept as
        a grant in the store). The wrapped key is ``None`` for a deleted
        (tombstone) version. Call only after the access was decided and logged.
        """
        stored, wrapped = await self._serve(custodian, record, version, reader_org)
        return stored.ciphertext, stored.salt, wrapped

    async def open(
        self,
        reader_org: str,
        record: str,
        version: int,
        patient: str,
        served: tuple[bytes, bytes, bytes | None],
    ) -> bytes | None:
        """Reader side: verify against the ledger's commitment, unwrap, decrypt.

        Returns the plaintext, or ``None`` for a deleted (tombstone) version.
        Raises :class:`IntegrityError` when the ciphertext or salt does not match
        the commitment on this node's ledger, or when the key does not unwrap or
        the ciphertext does not decrypt.
        """
        commitment = await self._commitment(record, version)
        if commitment is None:
            raise NotFoundError(f"record {record} has no version {version} on the ledger")
        return self._verify_and_decrypt(reader_org, record, version, patient, served, commitment)

    def _verify_and_decrypt(
        self,
        reader_org: str,
        record: str,
        version: int,
        patient: str,
        served: tuple[bytes, bytes, bytes | None],
        commitment: bytes,
    ) -> bytes | None:
        """The checks and decryption of :meth:`open`, against ``commitment`` from the ledger."""
        ciphertext, salt, wrapped = served
        if sha256(salt, ciphertext) != commitment:
            raise IntegrityError(
                f"record {record} version {version}: the ciphertext does not match its "
                "commitment on the ledger (the stored data was tampered with or corrupted)"
            )
        if wrapped is None:
            if ciphertext == b"":
                return None
            raise IntegrityError(f"record {record} version {version} came without its key")
        aad = aead.record_aad(record, version, patient)
        try:
            record_key = kem.unwrap_key(self._org(reader_org).encryption, wrapped, aad)
        except DecryptionError as exc:
            raise IntegrityError(
                f"record {record} version {version}: the record key does not unwrap with "
                f"the key of {reader_org}"
            ) from exc
        try:
            return aead.decrypt(record_key, ciphertext, aad)
        except DecryptionError as exc:
            raise IntegrityError(
                f"record {record} version {version}: AES-GCM decryption failed (the key or "
                "associated data does not match the ciphertext)"
            ) from exc

    # -- reading ------------------------------------------------------------------------
    def _kind(self, caller: Caller) -> str:
        if caller.kind in ("practitioner", "app"):
            return "practitioner"
        if caller.kind in ("patient", "system"):
            return caller.kind
        raise Unauthorized(f"unknown caller kind {caller.kind!r}")

    def _request(
        self,
        caller: Caller,
        patient: str,
        types: tuple[str, ...],
        time: int,
        *,
        serving: str,
        record: str | None = None,
    ) -> AccessRequest:
        if caller.kind == "patient":
            org, purpose = serving, PATIENT_PURPOSE
        else:
            if caller.org is None:
                raise Unauthorized(f"a {caller.kind} caller must act for an organisation")
            org, purpose = caller.org, caller.purpose
        return AccessRequest(
            actor=caller.id,
            org=org,
            patient=patient,
            resource_types=types,
            purpose=purpose,
            time=time,
            break_glass=caller.break_glass,
            record=record,
        )

    def _reader_org(self, caller: Caller, custodian: str) -> str:
        """Whose key opens the data: the caller's org, or the serving custodian for patients."""
        return custodian if caller.kind == "patient" or caller.org is None else caller.org

    def _is_remote(self, caller: Caller, rec: Mapping[str, Any]) -> bool:
        """Is the record held by another node? Raises when this node cannot read it from there.

        Called once decided, before anything is logged. Patients read their records
        at the custodian's node: the peer API serves organisations' practitioners
        and apps (the custodian checks the actor acts for the calling node's
        organisation), and a patient's read is logged by the custodian's node key.
        """
        custodian = str(rec["custodian"])
        if custodian in self.orgs:
            return False
        record = str(rec["id"])
        if caller.kind == "patient":
            raise NotFoundError(
                f"record {record} is held by {custodian}, whose node serves it to its "
                f"patients: read it through {custodian}'s FHIR API or patient portal",
                held_by=custodian,
                record=record,
            )
        if self.remote is None or not self.remote.serves(custodian):
            raise NotFoundError(
                f"record {record} is held by {custodian}, and this node has no peer "
                f"address for {custodian}'s node",
                held_by=custodian,
                record=record,
            )
        return True

    async def _committed_at(self, record: str, version: int) -> int:
        """The time of the block that committed ``version``: its lastUpdated, on every node."""
        entry = await self.node.read(lambda st: get_obj(st, k_recver(record, version)))
        if entry is None or not isinstance(entry.get("height"), int):
            return 0
        try:
            header, _ = await self.node.get_block(int(entry["height"]))
        except NotFoundError:
            return 0
        return int(header.time)

    async def _read_remote(
        self,
        caller: Caller,
        rec: Mapping[str, Any],
        version: int,
        access_tx: bytes,
        commitment: bytes | None = None,
    ) -> StoredRecord:
        """Reader side of a record another node holds: fetch the triple from the custodian's
        node (which checks ``access_tx``, this node's committed ``access.log``), then verify
        it against THIS node's ledger commitment, unwrap with the caller's organisation's
        key and decrypt."""
        assert self.remote is not None and caller.org is not None
        custodian, record, patient = str(rec["custodian"]), str(rec["id"]), str(rec["patient"])
        served = await self.remote.serve(
            custodian,
            record,
            version,
            actor=caller.id,
            purpose=caller.purpose,
            break_glass=caller.break_glass,
            on_behalf=caller.client,
            access_tx=access_tx,
        )
        if commitment is None:
            plaintext = await self.open(caller.org, record, version, patient, served)
        else:
            plaintext = self._verify_and_decrypt(
                caller.org, record, version, patient, served, commitment
            )
        return _read_result(rec, version, await self._committed_at(record, version), plaintext)

    async def _read(
        self,
        caller: Caller,
        rec: Mapping[str, Any],
        version: int,
        access_tx: bytes | None = None,
    ) -> StoredRecord:
        custodian = str(rec["custodian"])
        if custodian not in self.orgs and access_tx is not None:
            return await self._read_remote(caller, rec, version, access_tx)
        reader = self._reader_org(caller, custodian)
        stored, wrapped = await self._serve(custodian, str(rec["id"]), version, reader)
        plaintext = await self.open(
            reader,
            stored.record,
            version,
            str(rec["patient"]),
            (stored.ciphertext, stored.salt, wrapped),
        )
        return _read_result(rec, version, stored.last_updated, plaintext)

    def _raise_denied(self, decision: Decision, record: str | None = None) -> None:
        if decision.rule == "shredded" and record is not None:
            raise _gone(record)
        raise Unauthorized(f"access denied: {decision.reason}", rule=decision.rule)

    async def _decide_record(
        self, caller: Caller, record_id: str, version: int | None = None
    ) -> tuple[dict[str, Any], AccessRequest, Decision, bytes | None]:
        """The ledger entry of a record, the decision about reading it and the commitment
        of ``version`` (default: the latest; None if there is no such version), in one
        snapshot."""
        kind = self._kind(caller)
        now = self.node.clock()

        def look(
            st: StateReader,
        ) -> tuple[dict[str, Any], AccessRequest, Decision, bytes | None] | None:
            rec = get_record(st, record_id)
            if rec is None:
                return None
            req = self._request(
                caller,
                rec["patient"],
                (rec["resource_type"],),
                now,
                serving=rec["custodian"],
                record=record_id,
            )
            entry = get_obj(st, k_recver(record_id, version or int(rec["version"])))
            commitment = None if entry is None else bytes(entry["commitment"])
            return rec, req, decide_for(st, req, kind), commitment

        found = await self.node.read(look)
        if found is None:
            raise NotFoundError(f"record {record_id} is not on the ledger")
        return found

    async def fetch(
        self, caller: Caller, record_id: str, version: int | None = None
    ) -> StoredRecord:
        """Read one record (latest or ``version``) with one logged access decision.

        Raises :class:`NotFoundError` (nothing logged) for a record or version
        not on the ledger; after logging: :class:`Unauthorized` when denied, a
        "gone" :class:`NotFoundError` (:func:`is_gone`) for an erased record,
        :class:`IntegrityError` for data that fails verification.

        While the ``access.log`` transaction of a permitted read commits, the
        ciphertext is already read, checked and decrypted (read-only work, in
        memory only); nothing is returned, and nothing is written (a key grant
        for another organisation), before that transaction is committed.

        A record another node holds (its custodian is not served here) is
        fetched from that node once the ``access.log`` is committed, naming it
        (the custodian checks that entry and logs none of its own), and verified
        against this node's ledger (see :meth:`_read_remote`); a patient is sent
        to the custodian's node (:class:`NotFoundError`, nothing logged).
        """
        rec, req, decision, commitment = await self._decide_record(caller, record_id, version)
        if version is not None and not 1 <= version <= int(rec["version"]):
            raise NotFoundError(f"record {record_id} has no version {version}")
        remote = self._is_remote(caller, rec)
        logged = asyncio.ensure_future(
            self.access.log(req, decision, on_behalf=caller.client, records=[record_id])
        )
        if not decision.permit:
            await logged
            self._raise_denied(decision, record_id)
        wanted = version or int(rec["version"])
        if remote:
            receipt = await logged
            return await self._read_remote(caller, rec, wanted, receipt.tx_id, commitment)
        try:
            early = await self._read_prepared(caller, rec, wanted, commitment)
        except BaseException:
            await logged  # the decision is on the ledger before any error is reported
            raise
        await logged  # raises if the access could not be logged: nothing is released
        if early is not None:
            return early
        return await self._read(caller, rec, wanted)

    async def _read_prepared(
        self, caller: Caller, rec: Mapping[str, Any], version: int, commitment: bytes | None
    ) -> StoredRecord | None:
        """:meth:`_read` when it needs no write: the version is stored and the reader's
        organisation already holds its key. None: take the full path (after logging)."""
        custodian = str(rec["custodian"])
        reader = self._reader_org(caller, custodian)
        if commitment is None or custodian not in self.orgs or reader not in self.orgs:
            return None
        record = str(rec["id"])
        stored, wrapped = await self.store.get_sealed(record, version, f"org:{reader}")
        if stored is None or stored.custodian != custodian:
            return None
        if stored.deleted:
            wrapped = None
        elif not stored.ciphertext or wrapped is None:
            return None  # erased, or no key for the reader yet: the full path decides
        plaintext = self._verify_and_decrypt(
            reader,
            record,
            version,
            str(rec["patient"]),
            (stored.ciphertext, stored.salt, wrapped),
            commitment,
        )
        return _read_result(rec, version, stored.last_updated, plaintext)

    async def history(self, caller: Caller, record_id: str) -> list[StoredRecord]:
        """Every version of a record, oldest first, under one logged access decision."""
        rec, req, decision, _ = await self._decide_record(caller, record_id)
        remote = self._is_remote(caller, rec)
        receipt = await self.access.log(req, decision, on_behalf=caller.client, records=[record_id])
        if not decision.permit:
            self._raise_denied(decision, record_id)
        access_tx = receipt.tx_id if remote else None
        return [
            await self._read(caller, rec, v, access_tx) for v in range(1, int(rec["version"]) + 1)
        ]

    async def fetch_many(
        self,
        caller: Caller,
        patient: str,
        entries: Sequence[IndexEntry],
        *,
        resource_types: Sequence[str] = (),
    ) -> tuple[list[StoredRecord], list[str]]:
        """Read a search result for one patient: one decision and ONE ``access.log`` for all.

        Each entry is decided on its own (custodian, consent, data period...) in
        one state snapshot; the combined decision is logged once, listing the
        released records (or, when all are denied, the requested ones). Returns
        ``(permitted records, withheld resource types)``; raises
        :class:`Unauthorized` (after logging) when nothing is permitted.
        ``resource_types`` names the searched types, so that an empty result is
        still decided and logged; entries of other patients are ignored; an
        erased record in the batch is left out. Each entry's ``version`` is
        read (the latest when it is not on the ledger), so a record's history
        can be read as one batch too.
        """
        kind = self._kind(caller)
        entries = [
            e
            for e in entries
            if e.patient == patient
            and (e.custodian in self.orgs or self._reads_remote(caller, e.custodian))
        ]
        if len(entries) > MAX_RECORDS:
            raise MalformedTransaction(f"read at most {MAX_RECORDS} records at once")
        types = tuple(dict.fromkeys([*(e.resource_type for e in entries), *resource_types]))
        if not types:
            return [], []
        now = self.node.clock()

        def look(
            st: StateReader,
        ) -> (
            tuple[
                dict[str, dict[str, Any] | None],
                AccessRequest,
                list[Decision],
                list[tuple[int, bytes | None]],
            ]
            | None
        ):
            pat = get_obj(st, k_patient(patient))
            if pat is None:
                return None
            recs = {e.record: get_record(st, e.record) for e in entries}
            custodians = [r["custodian"] for r in recs.values() if r is not None]
            local = [o for o in [*custodians, *pat["orgs"]] if o in self.orgs]
            serving = str(local[0]) if local else str(pat["orgs"][0])
            base = self._request(caller, patient, types, now, serving=serving)
            per = [
                decide_for(
                    st, replace(base, resource_types=(e.resource_type,), record=e.record), kind
                )
                for e in entries
            ] or [decide_for(st, base, kind)]
            versions: list[tuple[int, bytes | None]] = []
            for e in entries:  # the version each entry reads, and its commitment
                rec = recs[e.record]
                latest = 0 if rec is None else int(rec["version"])
                v = e.version if 1 <= e.version <= latest else latest
                entry = get_obj(st, k_recver(e.record, v)) if v else None
                versions.append((v, None if entry is None else bytes(entry["commitment"])))
            return recs, base, per, versions

        found = await self.node.read(look)
        if found is None:
            raise NotFoundError(f"patient {patient} is not registered")
        recs, base, per, versions = found
        decision = combine_decisions(per)
        allowed = [(e, v) for e, d, v in zip(entries, per, versions, strict=False) if d.permit]
        logged = [e.record for e in ([e for e, _ in allowed] if decision.permit else entries)]
        log = asyncio.ensure_future(
            self.access.log(
                base, decision, on_behalf=caller.client, records=list(dict.fromkeys(logged))
            )
        )
        if not decision.permit:
            await log
            self._raise_denied(decision)
        withheld = list(dict.fromkeys(t for d in per for t in d.denied_types))

        def ledger_entry(e: IndexEntry) -> dict[str, Any]:
            rec = recs[e.record]
            assert rec is not None  # permitted implies it is on the ledger
            return rec

        # read-only work while the access.log commits (see fetch); released only after it
        try:
            early = await asyncio.gather(
                *(self._read_prepared(caller, ledger_entry(e), v, c) for e, (v, c) in allowed)
            )
        except BaseException:
            await log
            raise
        receipt = await log
        refused: list[str] = []  # types a custodian's node refused although we permitted

        async def one(
            e: IndexEntry, version: int, commitment: bytes | None, got: StoredRecord | None
        ) -> StoredRecord | None:
            if got is not None:
                return got
            rec = ledger_entry(e)
            try:
                if rec["custodian"] in self.orgs:
                    return await self._read(caller, rec, version)
                return await self._read_remote(caller, rec, version, receipt.tx_id, commitment)
            except NotFoundError as exc:
                if is_gone(exc):
                    return None
                raise
            except Unauthorized:
                refused.append(e.resource_type)
                return None

        results = await asyncio.gather(
            *(one(e, v, c, got) for (e, (v, c)), got in zip(allowed, early, strict=True))
        )
        released = [r for r in results if r is not None]
        shown = {r.resource_type for r in released}
        withheld.extend(t for t in dict.fromkeys(refused) if t not in shown and t not in withheld)
        return released, withheld

    def _reads_remote(self, caller: Caller, custodian: str) -> bool:
        """Can ``caller`` read, through this node, records ``custodian``'s node holds?"""
        return (
            caller.kind in ("practitioner", "app")
            and self.remote is not None
            and self.remote.serves(custodian)
        )

    async def remote_entries(
        self, caller: Caller, patient: str, resource_types: Iterable[str] | None = None
    ) -> list[IndexEntry]:
        """The patient's active records held by other nodes that ``caller`` may ask for.

        Taken from the ledger (``patrec`` rows), newest first (by the height of
        the latest version), as index entries without search tokens, for a
        search or ``$everything`` to read with :meth:`fetch_many`. Empty for
        patients and system clients (they read at the custodian's node) and on
        a node without ``remote``.
        """
        if caller.kind not in ("practitioner", "app") or self.remote is None:
            return []
        types = None if resource_types is None else set(resource_types)

        def look(st: StateReader) -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            for key, row in scan_objs(st, k_patrec(patient)):
                rid = key.decode().rsplit("/", 1)[1]
                if not isinstance(row, dict) or row.get("custodian") in self.orgs:
                    continue
                if types is not None and row.get("resource_type") not in types:
                    continue
                rec = get_record(st, rid)
                if rec is not None and rec["status"] == "active" and rec["patient"] == patient:
                    out.append(rec)
            return out

        recs = await self.node.read(look)
        recs = [r for r in recs if self.remote.serves(str(r["custodian"]))]
        recs.sort(key=lambda r: (-int(r.get("height") or 0), str(r["id"])))
        return [
            IndexEntry(
                str(r["id"]),
                str(r["resource_type"]),
                patient,
                str(r["custodian"]),
                (),
                r.get("effective") if isinstance(r.get("effective"), int) else None,
                0,
                int(r["version"]),
                False,
            )
            for r in recs
        ]

    # -- erasure ------------------------------------------------------------------------
    async def shred_patient(self, org: str, patient: str) -> int:
        """Erase a patient's records held on this node (right to erasure).

        ``org`` (served by this node and linked to the patient) requests it.
        Every active record of the patient whose custodian this node serves is
        marked ``record.shred`` on the ledger (signed by its custodian's node
        key); then the store destroys every wrapped key and ciphertext of the
        patient. Safe to repeat. Returns the number of records shredded now.
        """
        self._org(org)

        def look(st: StateReader) -> tuple[Any, list[dict[str, Any]]]:
            pat = get_obj(st, k_patient(patient))
            rows = [
                get_record(st, key.decode().rsplit("/", 1)[1])
                for key, _ in st.scan(k_patrec(patient))
            ]
            return pat, [r for r in rows if r is not None]

        pat, records = await self.node.read(look)
        if pat is None:
            raise NotFoundError(f"patient {patient} is not registered")
        if org not in pat["orgs"]:
            raise Unauthorized(f"organisation {org} has no link to patient {patient}")
        targets = [r for r in records if r["status"] == "active" and r["custodian"] in self.orgs]
        results = await asyncio.gather(
            *(
                self.submitter.submit(
                    self.orgs[r["custodian"]].signing, "record.shred", {"record": r["id"]}
                )
                for r in targets
            ),
            return_exceptions=True,
        )
        await self.store.shred_patient(patient)
        errors = [
            e for e in results if isinstance(e, BaseException) and not isinstance(e, Conflict)
        ]
        if errors:
            raise errors[0]
        return sum(1 for e in results if not isinstance(e, BaseException))
