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
   and only then is the write acknowledged.

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
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from medledger.contracts._common import policy
from medledger.contracts.access import AccessRequest, Decision
from medledger.contracts.access_v1 import MAX_RECORDS
from medledger.contracts.base import get_obj
from medledger.contracts.core import k_org
from medledger.contracts.patients_v1 import k_patient, patient_enc_key
from medledger.contracts.records_v1 import PUBLIC_CATEGORIES, get_record, k_patrec, k_recver
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
    NotFoundError,
    StorageError,
    TransactionRejected,
    Unauthorized,
)
from medledger.node import Node
from medledger.services.access import AccessService, combine_decisions, decide_for
from medledger.services.submitter import Submitter
from medledger.state.base import StateReader
from medledger.store.records import IndexEntry, RecordStore, RecordVersion, WrappedKey

__all__ = [
    "Caller",
    "OrgCrypto",
    "RecordService",
    "StoredRecord",
    "derive_index_key",
    "is_gone",
]

SALT_SIZE = 32
_INDEX_KEY_SALT = b"medledger/index-key/v1"
_INDEX_KEY_INFO = b"search-index-tokens"
_LOCK_STRIPES = 64
#: the purpose logged when a patient reads their own records (v3 ActReason "patient requested")
PATIENT_PURPOSE = "PATRQT"


def derive_index_key(encryption: EncryptionKey) -> bytes:
    """HKDF-SHA256 (RFC 5869) of an organisation's private encryption key: its search index key.

    Deterministic, so every process serving the organisation computes the same
    tokens, and independent of the key's other uses (its own salt and info).
    """
    prk = hmac.new(_INDEX_KEY_SALT, encryption.private_bytes(), hashlib.sha256).digest()
    return hmac.new(prk, _INDEX_KEY_INFO + b"\x01", hashlib.sha256).digest()


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


def _resource(plaintext: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(plaintext)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict):
        raise MalformedTransaction(f"{what} is not a JSON object")
    return doc


class RecordService:
    """Encrypted record writes, audited reads, erasure; one per node."""

    def __init__(
        self,
        node: Node,
        submitter: Submitter,
        access: AccessService,
        store: RecordStore,
        orgs: Mapping[str, OrgCrypto],
    ) -> None:
        self.node = node
        self.submitter = submitter
        self.access = access
        self.store = store
        self.orgs = dict(orgs)
        self._locks = [asyncio.Lock() for _ in range(_LOCK_STRIPES)]

    # -- helpers ------------------------------------------------------------------------
    def _org(self, org: str) -> OrgCrypto:
        crypto = self.orgs.get(org)
        if crypto is None:
            raise NotFoundError(f"this node does not hold the keys of organisation {org!r}")
        return crypto

    def _lock(self, record: str) -> asyncio.Lock:
        digest = hashlib.sha256(record.encode()).digest()
        return self._locks[int.from_bytes(digest[:4], "big") % _LOCK_STRIPES]

    async def _ledger_record(self, record: str) -> dict[str, Any] | None:
        return await self.node.read(lambda st: get_record(st, record))

    async def _commitment(self, record: str, version: int) -> bytes | None:
        entry = await self.node.read(lambda st: get_obj(st, k_recver(record, version)))
        return None if entry is None else bytes(entry["commitment"])

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
        message = f"{kind}|{system or ''}|{value}".encode()
        return hmac.new(self._org(org).index_key, message, hashlib.sha256).digest()

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
        if deleted:
            plaintext, resource = b"", None
        else:
            resource = _resource(plaintext, "the resource")
        async with self._lock(record_id):
            rec = await self._ledger_record(record_id)
            current = 0 if rec is None else int(rec["version"])
            if rec is not None:
                completed = await self._repair(record_id)
                same = completed.get(current)
                if (
                    same is not None
                    and expected_version in (None, current - 1)
                    and same.custodian == org
                    and same.patient == patient
                    and same.resource_type == resource_type
                    and same.deleted == deleted
                    and await self._plaintext_of(same) == plaintext
                ):
                    # an earlier attempt of this very write committed; it is now stored
                    return StoredRecord(
                        record_id,
                        resource_type,
                        patient,
                        org,
                        current,
                        same.last_updated,
                        resource,
                    )
            if expected_version is not None and expected_version != current:
                raise Conflict(
                    f"record {record_id} is at version {current}, not {expected_version}",
                    current=current,
                )
            if rec is not None:
                if rec["status"] == "shredded":
                    raise _gone(record_id)
                if rec["custodian"] != org:
                    raise Unauthorized(f"record {record_id} is held by {rec['custodian']}")
                if rec["patient"] != patient or rec["resource_type"] != resource_type:
                    raise Conflict("a new version cannot change the patient or resource type")
            return await self._write_version(
                crypto,
                rec,
                resource_type,
                record_id,
                patient,
                plaintext,
                resource,
                category=category,
                code_tokens=code_tokens,
                codes_for_commitment=codes_for_commitment,
                date=date,
                deleted=deleted,
                author_key=author_key,
            )

    async def _write_version(
        self,
        crypto: OrgCrypto,
        rec: dict[str, Any] | None,
        resource_type: str,
        record_id: str,
        patient: str,
        plaintext: bytes,
        resource: dict[str, Any] | None,
        *,
        category: str | None,
        code_tokens: Sequence[bytes],
        codes_for_commitment: Sequence[str],
        date: int | None,
        deleted: bool,
        author_key: SigningKey | None,
    ) -> StoredRecord:
        org = crypto.org
        version = 1 if rec is None else int(rec["version"]) + 1
        now = self.node.clock()
        aad = aead.record_aad(record_id, version, patient)
        salt = os.urandom(SALT_SIZE)
        keys: list[WrappedKey] = []
        if deleted:
            ciphertext = b""
        else:
            record_key = aead.generate_record_key()
            ciphertext = aead.encrypt(record_key, plaintext, aad)
            keys.append(
                WrappedKey(
                    record_id,
                    version,
                    f"org:{org}",
                    kem.wrap_key(crypto.encryption.public, record_key, aad),
                )
            )
            patient_key = await self.node.read(lambda st: patient_enc_key(st, patient))
            if patient_key is not None:
                pub = EncryptionPublicKey(patient_key[1], patient_key[0])
                keys.append(
                    WrappedKey(
                        record_id,
                        version,
                        f"patient:{patient}",
                        kem.wrap_key(pub, record_key, aad),
                    )
                )
        commitment = sha256(salt, ciphertext)
        stored = RecordVersion(
            record_id, version, patient, org, resource_type, salt, ciphertext, now, deleted
        )
        index = IndexEntry(
            record_id,
            resource_type,
            patient,
            org,
            tuple(sorted({bytes(t) for t in code_tokens})),
            date,
            now,
            version,
            deleted,
        )
        payload: dict[str, Any] = {
            "record": record_id,
            "patient": patient,
            "resource_type": resource_type,
            "commitment": commitment,
            "version": version,
            "prev": None if rec is None else rec["commitment"],
        }
        if category in PUBLIC_CATEGORIES:
            payload["category"] = category
        if codes_for_commitment:
            payload["code_commitment"] = sha256(salt, codes_for_commitment[0].encode())
        if date is not None and date >= 0:
            payload["effective"] = date
        await self.store.stage(stored, keys, index, now)
        try:
            receipt = await self.submitter.submit(
                author_key or crypto.signing, "record.register", payload
            )
        except TransactionRejected:
            with contextlib.suppress(StorageError):  # else recover() drops it later
                await self.store.unstage(record_id, version, salt)
            raise
        await self.store.put_version(stored, keys, index)
        return StoredRecord(
            record_id, resource_type, patient, org, version, now, resource, receipt.tx_id
        )

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
                await self.store.put_version(v, s.keys, s.index)
                promoted[v.version] = v
            else:
                await self.store.unstage(record, v.version, v.salt)
        return promoted

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
                        await self.store.put_version(v, s.keys, s.index)
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
            # a genesis written with hex keys may hold an unusable ledger key (see
            # /work/spec/CHANGES.md); an organisation this node serves still has its own
            local = self.orgs.get(reader_org)
            if local is None:
                raise IntegrityError(
                    f"the encryption key of {reader_org} on the ledger is not usable"
                ) from exc
            pub = local.encryption.public
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
        ciphertext, salt, wrapped = served
        commitment = await self._commitment(record, version)
        if commitment is None:
            raise NotFoundError(f"record {record} has no version {version} on the ledger")
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

    async def _read(self, caller: Caller, rec: Mapping[str, Any], version: int) -> StoredRecord:
        custodian = str(rec["custodian"])
        reader = self._reader_org(caller, custodian)
        stored, wrapped = await self._serve(custodian, str(rec["id"]), version, reader)
        plaintext = await self.open(
            reader,
            stored.record,
            version,
            str(rec["patient"]),
            (stored.ciphertext, stored.salt, wrapped),
        )
        resource = None if plaintext is None else _resource(plaintext, f"record {rec['id']}")
        return StoredRecord(
            stored.record,
            str(rec["resource_type"]),
            str(rec["patient"]),
            custodian,
            version,
            stored.last_updated,
            resource,
        )

    def _raise_denied(self, decision: Decision, record: str | None = None) -> None:
        if decision.rule == "shredded" and record is not None:
            raise _gone(record)
        raise Unauthorized(f"access denied: {decision.reason}", rule=decision.rule)

    async def _decide_record(
        self, caller: Caller, record_id: str
    ) -> tuple[dict[str, Any], AccessRequest, Decision]:
        """The ledger entry of a record and the decision about reading it, in one snapshot."""
        kind = self._kind(caller)
        now = self.node.clock()

        def look(st: StateReader) -> tuple[dict[str, Any], AccessRequest, Decision] | None:
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
            return rec, req, decide_for(st, req, kind)

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
        """
        rec, req, decision = await self._decide_record(caller, record_id)
        if version is not None and not 1 <= version <= int(rec["version"]):
            raise NotFoundError(f"record {record_id} has no version {version}")
        await self.access.log(req, decision, on_behalf=caller.client, records=[record_id])
        if not decision.permit:
            self._raise_denied(decision, record_id)
        return await self._read(caller, rec, version or int(rec["version"]))

    async def history(self, caller: Caller, record_id: str) -> list[StoredRecord]:
        """Every version of a record, oldest first, under one logged access decision."""
        rec, req, decision = await self._decide_record(caller, record_id)
        await self.access.log(req, decision, on_behalf=caller.client, records=[record_id])
        if not decision.permit:
            self._raise_denied(decision, record_id)
        return [await self._read(caller, rec, v) for v in range(1, int(rec["version"]) + 1)]

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
        entries = [e for e in entries if e.patient == patient]
        if len(entries) > MAX_RECORDS:
            raise MalformedTransaction(f"read at most {MAX_RECORDS} records at once")
        types = tuple(dict.fromkeys([*(e.resource_type for e in entries), *resource_types]))
        if not types:
            return [], []
        now = self.node.clock()

        def look(
            st: StateReader,
        ) -> tuple[dict[str, dict[str, Any] | None], AccessRequest, list[Decision]] | None:
            pat = get_obj(st, k_patient(patient))
            if pat is None:
                return None
            recs = {e.record: get_record(st, e.record) for e in entries}
            custodians = [r["custodian"] for r in recs.values() if r is not None]
            serving = custodians[0] if custodians else str(pat["orgs"][0])
            base = self._request(caller, patient, types, now, serving=serving)
            per = [
                decide_for(
                    st, replace(base, resource_types=(e.resource_type,), record=e.record), kind
                )
                for e in entries
            ] or [decide_for(st, base, kind)]
            return recs, base, per

        found = await self.node.read(look)
        if found is None:
            raise NotFoundError(f"patient {patient} is not registered")
        recs, base, per = found
        decision = combine_decisions(per)
        allowed = [e for e, d in zip(entries, per, strict=False) if d.permit]
        logged = [e.record for e in (allowed if decision.permit else entries)]
        await self.access.log(
            base, decision, on_behalf=caller.client, records=list(dict.fromkeys(logged))
        )
        if not decision.permit:
            self._raise_denied(decision)
        withheld = list(dict.fromkeys(t for d in per for t in d.denied_types))

        async def one(e: IndexEntry) -> StoredRecord | None:
            rec = recs[e.record]
            assert rec is not None  # permitted implies it is on the ledger
            latest = int(rec["version"])
            try:
                return await self._read(
                    caller, rec, e.version if 1 <= e.version <= latest else latest
                )
            except NotFoundError as exc:
                if is_gone(exc):
                    return None
                raise

        results = await asyncio.gather(*(one(e) for e in allowed))
        return [r for r in results if r is not None], withheld

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
