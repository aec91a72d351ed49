"""The FHIR service: FHIR R4 interactions on top of the ledger, the record store and consent.

Everything the REST API (and ``medledger import``) does with FHIR resources goes
through :class:`FhirService`; it speaks FHIR JSON dicts in and out and raises
:class:`~medledger.fhir.outcome.FhirError` with the HTTP status to answer.

How FHIR maps onto the ledger
-----------------------------
* A clinical resource is a *record*: its JSON is encrypted and stored off the
  ledger by :class:`~medledger.services.records.RecordService`, which commits a
  ``record.register`` transaction holding only the salted commitment, the
  resource type, a public category (``laboratory``, ``vital-signs`` ...) and the
  clinical date. Codes never reach the ledger: the search index holds
  HMAC-SHA256 tokens of ``code``/``category`` keyed by the custodian's index key.
* A ``Patient`` resource is the record whose id is the ledger patient id
  (``pat-`` + 32 hex digits). Creating one registers the pseudonymous patient on
  the ledger (``patient.register``, signed by the organisation's node key) with
  a link that is a keyed commitment to the organisation's identifier.
* ``Consent`` is not a record: a patient's POST becomes a ``consent.grant``
  transaction signed with the *patient's* key; reads render the ledger consent.
* ``AuditEvent`` is not a record either: every ``access.log`` entry about a
  patient is rendered as an IHE BALP AuditEvent whose id is the transaction id,
  with ``$proof`` returning its inclusion proof and the signed checkpoint.

Who holds a patient's key
-------------------------
``consent.grant`` must be signed by the patient (or a registered
representative); the contract refuses anything else, so a node cannot grant
consent *for* a patient by itself. When an organisation registers a patient
through this API the node creates the patient's identity in the data
directory's keystore (encrypted under ``MEDLEDGER_PASSPHRASE`` when set) and
uses it only on a request authenticated as *that patient*: a bearer token of a
SMART client registered for the patient (``medledger client register --patient``)
and authenticated with the patient's own private-key JWT. This is a custodial
key, the usual model of patient portals; a patient who wants sole control
exports the key file (``medledger patient add --key-file``) or signs
``consent.grant`` themself (``medledger consent grant``) and the node then holds
no key: a Consent POST for such a patient is refused with 422.

Audit
-----
Every read, search, history, ``$everything`` and ``$duplicate-check`` of patient
data makes exactly one access decision, recorded as one ``access.log``
transaction before anything is returned (by the record service), permit or
deny. Reads of Consent and AuditEvent are decided and recorded the same way
here. A request the token's *scopes* do not cover is refused (403) before any
data is looked up and is not logged (nothing about a patient was decided);
requests for ids that do not exist cannot name a patient and are not logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import json
import logging
import multiprocessing as mp
import os
import secrets
import select
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medledger.api.scopes import Scope, scope_allows
from medledger.contracts.access import ROLE_TYPES
from medledger.contracts.access_v1 import MAX_RECORDS
from medledger.contracts.base import get_obj
from medledger.contracts.patients_v1 import PATIENT_ID, k_patient
from medledger.crypto.keystore import Identity, Keystore
from medledger.crypto.signing import SigningKey
from medledger.encoding import decode
from medledger.errors import (
    Conflict,
    KeystoreError,
    MedledgerError,
    NotFound,
    NotFoundError,
    ProofError,
    TransactionRejected,
    Unauthorized,
)
from medledger.fhir.jsontext import dump_json, load_json
from medledger.fhir.outcome import FhirError, from_medledger_error, operation_outcome
from medledger.fhir.validate import SUPPORTED_TYPES
from medledger.ledger.tx import Transaction
from medledger.node import Node
from medledger.services.access import AccessService
from medledger.services.records import (
    PATIENT_PURPOSE,
    Caller,
    NamedLocks,
    OrgCrypto,
    RecordService,
    RecordWrite,
    StoreCheck,
    StoredRecord,
    index_token,
    is_gone,
)
from medledger.services.submitter import Submitter
from medledger.state.base import StateReader
from medledger.store.records import MAX_IDS, MAX_TOKENS, IndexEntry, RecordStore, order_key

__all__ = [
    "Auth",
    "FhirService",
    "ImportReport",
    "Importer",
    "Result",
    "etag",
    "parse_etag",
]

FHIR_JSON = "application/fhir+json"
#: Every type the API serves.
API_TYPES: frozenset[str] = SUPPORTED_TYPES
#: Resource types stored as encrypted records (Consent and AuditEvent live on the ledger).
RECORD_TYPES: frozenset[str] = SUPPORTED_TYPES - {"Consent", "AuditEvent"}
MAX_PAGE = 100
DEFAULT_PAGE = 20
_EVERYTHING_PAGE = MAX_RECORDS  # one page of $everything is one access.log entry
_INCLUDE_MAX = 100  # resources of one type _revinclude adds to a page
_SCAN_MAX = 5000  # most index rows read to AND two token filters / rank duplicate checks
_INTERACTIONS = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}


log = logging.getLogger(__name__)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _criteria(text: str) -> list[tuple[str, str]]:
    """The search criteria of an ``If-None-Exist`` header (a query string, ``?`` optional)."""
    from urllib.parse import parse_qsl

    from medledger.fhir.index import RESULT_PARAMS

    pairs = parse_qsl(text.strip().removeprefix("?"), keep_blank_values=True)
    if not any(value for _, value in pairs):
        raise _err(400, "invalid", "If-None-Exist needs search criteria, e.g. identifier=s|v")
    named = sorted({name for name, _ in pairs if name.partition(":")[0] in RESULT_PARAMS})
    if named:
        raise _err(
            400, "invalid", f"If-None-Exist takes search criteria only, not {', '.join(named)}"
        )
    return pairs


def _criteria_key(rtype: str, criteria: Sequence[tuple[str, str]]) -> str:
    """The name conditional creates of ``rtype`` with these criteria are serialised by."""
    return f"{rtype}?{sorted(criteria)!r}"


def _index_version_key(org: str) -> str:
    """The record-store meta key of the index version ``org``'s records were indexed by."""
    return f"search-index-version/{org}"


def instant(ms: int) -> str:
    """A FHIR ``instant`` for milliseconds since the epoch (UTC)."""
    text = datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def etag(version: int) -> str:
    return f'W/"{version}"'


def parse_etag(value: str | None) -> int | None:
    """The version an ``If-Match`` header names (``W/"3"``, ``"3"`` or ``3``); 400 if malformed."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    if not text.isdigit() or len(text) > 12:
        raise FhirError(400, "invalid", f'If-Match {value!r} is not a version ETag like W/"1"')
    return int(text)


def new_id(rtype: str, *_: Any) -> str:
    """A fresh logical id: ``pat-`` + 32 hex digits for a Patient, else a random UUID."""
    return "pat-" + secrets.token_hex(16) if rtype == "Patient" else str(uuid.uuid4())


def _patient_only(query: Any) -> bool:
    """Does a search filter by patient alone (besides type, ``_count`` and ``_offset``)?

    Only such searches include records other members' nodes hold: their
    clinical search tokens and dates live in the custodian's own index.
    """
    return not (
        query.ids
        or query.codes
        or query.categories
        or query.date_ge is not None
        or query.date_lt is not None
        or query.updated_ge is not None
        or query.updated_lt is not None
    )


def _merged(
    head: list[IndexEntry], total: int, held: Sequence[IndexEntry], query: Any
) -> tuple[list[IndexEntry], int]:
    """The page ``query`` asks for of this node's first index rows (``head``, in the
    query's order by clinical date, ``total`` in all) and ``held`` (rows of records held
    elsewhere, dated from the ledger), sorted together in that order."""
    rows = sorted([*head, *held], key=order_key(query.order))
    return rows[query.offset : query.offset + query.count], total + len(held)


def _after_local(
    page: list[IndexEntry], total: int, held: Sequence[IndexEntry], offset: int, count: int
) -> tuple[list[IndexEntry], int]:
    """A page of this node's index rows (``total`` of them) followed by ``held`` (rows of
    records held elsewhere), paged as one list: local rows first, then the others."""
    start = max(0, offset - total)
    room = max(0, count - len(page))
    return [*page, *held[start : start + room]], total + len(held)


def _err(status: int, code: str, text: str, *expression: str) -> FhirError:
    return FhirError(status, code, text, expression)


@dataclass(frozen=True, slots=True)
class Auth:
    """Who is asking (:class:`Caller`) and what their token's scopes allow.

    ``scopes`` ``None`` means no token is involved (command-line tools acting
    with the node's own authority).
    """

    caller: Caller
    scopes: tuple[Scope, ...] | None = None

    def allows(self, resource_type: str, interaction: str) -> bool:
        return self.scopes is None or scope_allows(self.scopes, resource_type, interaction)

    def require(self, resource_type: str, interaction: str) -> None:
        if not self.allows(resource_type, interaction):
            raise _err(
                403,
                "forbidden",
                f"the access token's scopes do not allow {_INTERACTIONS[interaction]} of "
                f"{resource_type}",
            )


@dataclass(frozen=True, slots=True)
class Result:
    """A resource to return, with what the HTTP layer needs for headers."""

    resource: dict[str, Any]
    status: int = 200
    version: int | None = None
    last_updated: int | None = None
    location: str | None = None


@dataclass(slots=True)
class _Planned:
    """A resource write decided by the pre-flight of a write or a transaction."""

    rtype: str
    rid: str
    resource: dict[str, Any]
    patient: str
    expected: int | None  # 0: create; None: no check (import resume); else the version replaced
    created: bool
    register_patient: bool = False
    link_patient: bool = False
    deleted: bool = False


class FhirService:
    """FHIR interactions for every organisation this node serves."""

    def __init__(
        self,
        *,
        node: Node,
        submitter: Submitter,
        access: AccessService,
        records: RecordService,
        store: RecordStore,
        orgs: Mapping[str, OrgCrypto],
        keystore: Keystore,
        passphrase: str | None,
        base_url: str,
    ) -> None:
        self.node = node
        self.submitter = submitter
        self.access = access
        self.records = records
        self.store = store
        self.orgs = dict(orgs)
        self.keystore = keystore
        self.passphrase = passphrase
        self.base_url = base_url.rstrip("/")
        self._identities: dict[str, Identity] = {}
        self._patient_locks = NamedLocks()
        self._conditional_locks = NamedLocks()

    # ------------------------------------------------------------------ helpers
    def url(self, rtype: str, rid: str, version: int | None = None) -> str:
        base = f"{self.base_url}/{rtype}/{rid}"
        return base if version is None else f"{base}/_history/{version}"

    def _check_type(self, rtype: str) -> None:
        if rtype not in API_TYPES:
            raise _err(404, "not-supported", f"resource type {rtype} is not served here")

    async def _state(self, key: str) -> Any:
        raw = await self.node.state_get(key.encode())
        return None if raw is None else decode(raw)

    def _org_of(self, auth: Auth) -> str:
        caller = auth.caller
        if caller.kind == "patient":
            raise _err(403, "forbidden", "a patient may read their records and post Consent only")
        if caller.org is None or caller.org not in self.orgs:
            raise _err(403, "forbidden", f"this node does not act for organisation {caller.org}")
        return caller.org

    async def _writer(self, auth: Auth, rtype: str) -> tuple[str, SigningKey | None]:
        """The organisation a write is made for, and the practitioner key that signs it."""
        org = self._org_of(auth)
        caller = auth.caller
        if caller.kind != "practitioner":
            return org, None
        principal = await self._state(f"principal/{caller.id}")
        if (
            not isinstance(principal, dict)
            or principal.get("status") != "active"
            or principal.get("org") != org
        ):
            raise _err(403, "forbidden", f"{caller.id} is not an active practitioner of {org}")
        roles = principal.get("roles") or []
        if not any(rtype in ROLE_TYPES.get(r, ()) for r in roles):
            raise _err(403, "forbidden", f"roles {sorted(roles)} may not write {rtype}")
        return org, await self.practitioner_key(caller.id)

    async def _identity(self, name: str, *, create: bool = False) -> Identity | None:
        """A keystore identity (cached); the file work and scrypt run off the event loop."""
        ident = self._identities.get(name)
        if ident is None:

            def load() -> Identity | None:
                if (self.keystore.path / f"{name}.json").exists():  # not names(): may be huge
                    return self.keystore.load(name, self.passphrase)
                return self.keystore.create(name, self.passphrase) if create else None

            ident = await asyncio.to_thread(load)
            if ident is not None:
                self._identities[name] = ident
        return ident

    async def practitioner_key(self, pid: str) -> SigningKey | None:
        """The practitioner's own signing key, when the keystore holds it (authorship on ledger)."""
        try:
            ident = await self._identity(pid)
        except KeystoreError:
            return None
        return None if ident is None else ident.signing

    def _present(self, rec: StoredRecord) -> dict[str, Any]:
        if rec.resource is None:
            raise _err(410, "deleted", f"{rec.resource_type}/{rec.id} was deleted")
        resource = dict(rec.resource)
        resource["id"] = rec.id
        meta = dict(resource.get("meta") or {})
        meta["versionId"] = str(rec.version)
        meta["lastUpdated"] = instant(rec.last_updated)
        resource["meta"] = meta
        return resource

    def _result(self, rec: StoredRecord, status: int = 200) -> Result:
        return Result(
            self._present(rec),
            status=status,
            version=rec.version,
            last_updated=rec.last_updated,
            location=self.url(rec.resource_type, rec.id, rec.version) if status == 201 else None,
        )

    @staticmethod
    def _plaintext(resource: Mapping[str, Any]) -> bytes:
        body = dict(resource)
        meta = dict(body.get("meta") or {})
        meta.pop("versionId", None)
        meta.pop("lastUpdated", None)
        if meta:
            body["meta"] = meta
        else:
            body.pop("meta", None)
        return dump_json(body).encode()

    def _token(self, org: str, term: tuple[str, str | None, str]) -> bytes:
        """The search token of an index term for ``org``.

        ``(kind, None, value)`` (any system) is keyed with system ``*``, which no
        coding can have, so it stays distinct from ``(kind, "", value)`` (no system).
        """
        kind, system, value = term
        return self.records.index_token(org, kind, "*" if system is None else system, value)

    def _index_tokens(self, org: str, terms: Iterable[tuple[str, str | None, str]]) -> list[bytes]:
        return list(dict.fromkeys(self._token(org, t) for t in terms))

    async def reindex(
        self, org: str, *, on_progress: Callable[[int, int], None] | None = None
    ) -> tuple[int, int]:
        """Recompute the search index of every record ``org`` holds, as writes index them
        now (after an upgrade: e.g. Patient identifiers). Returns ``(checked, rewritten)``;
        see :meth:`RecordService.reindex`."""
        from medledger.fhir.index import INDEX_VERSION

        done = await self.records.reindex(org, self._tokens_of(org), on_progress=on_progress)
        await self.store.set_meta(_index_version_key(org), str(INDEX_VERSION).encode())
        return done

    def _tokens_of(self, org: str) -> Callable[[str, bytes], list[bytes]]:
        """``tokens_of(resource_type, plaintext)``: the index tokens a write of ``org`` stores."""
        from medledger.fhir.index import extract

        def tokens_of(rtype: str, plaintext: bytes) -> list[bytes]:
            return self._index_tokens(org, extract(load_json(plaintext)).terms())

        return tokens_of

    async def check_store(
        self, org: str, *, on_progress: Callable[[int, int], None] | None = None
    ) -> StoreCheck:
        """The records ``org`` holds at rest, checked against the ledger and the search
        index (read only; see :meth:`RecordService.check_store`)."""
        return await self.records.check_store(org, self._tokens_of(org), on_progress=on_progress)

    async def upgrade_index(self) -> dict[str, tuple[int, int]]:
        """Reindex each organisation whose records were indexed by another version of the
        index (:data:`medledger.fhir.index.INDEX_VERSION`); run at start-up, before serving.

        A store that has never recorded the version (written before it was kept, or new)
        is reindexed once: for an empty store that costs one page read. The version is
        recorded only after its reindex has finished, so an interrupted one runs again.
        Returns ``{org: (checked, rewritten)}`` for the organisations reindexed.
        """
        from medledger.fhir.index import INDEX_VERSION

        done: dict[str, tuple[int, int]] = {}
        for org in sorted(self.orgs):
            if await self.store.get_meta(_index_version_key(org)) == str(INDEX_VERSION).encode():
                continue
            done[org] = checked, rewritten = await self.reindex(org)
            if checked:
                log.warning(
                    "search index of %s upgraded to version %d: %d records checked, %d reindexed",
                    org,
                    INDEX_VERSION,
                    checked,
                    rewritten,
                )
        return done

    def _query_tokens(self, terms: Iterable[tuple[str, str | None, str]]) -> list[bytes]:
        """Search tokens for every custodian this node serves (tokens are keyed per org)."""
        terms = list(terms)
        if len(terms) * len(self.orgs) > MAX_TOKENS:
            raise _err(400, "too-costly", f"search at most {MAX_TOKENS // len(self.orgs)} codes")
        return [self._token(org, t) for org in sorted(self.orgs) for t in terms]

    # ------------------------------------------------------------------ patients
    def _link_commitment(self, org: str, patient: str, local_id: str) -> bytes:
        """``SHA-256(salt || local id)``; only ``org`` can recompute the salt (its index key)."""
        salt = hmac.new(
            self.orgs[org].index_key, b"medledger/patient-link/v1|" + patient.encode(), "sha256"
        ).digest()[:16]
        return hashlib.sha256(salt + local_id.encode()).digest()

    @staticmethod
    def _local_id(resource: Mapping[str, Any], patient: str) -> str:
        for ident in resource.get("identifier") or []:
            if isinstance(ident, dict) and isinstance(ident.get("value"), str):
                return f"{ident.get('system') or ''}|{ident['value']}"
        return patient

    def _lock(self, patient: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self._patient_locks.hold([patient])

    async def _ensure_patient(
        self, org: str, patient: str, *, register: bool, local_id: str | None = None
    ) -> None:
        """Register ``patient`` (a Patient create) or link it to ``org`` if needed."""
        async with self._lock(patient):
            state = await self._state(f"patient/{patient}")
            key = self.orgs[org].signing
            if state is None:
                if not register:
                    raise _err(
                        422,
                        "business-rule",
                        f"Patient/{patient} is not registered on the ledger",
                        "subject",
                    )
                ident = await self._identity(patient, create=True)
                assert ident is not None
                payload: dict[str, Any] = {
                    "id": patient,
                    "links": [
                        {
                            "org": org,
                            "commitment": self._link_commitment(org, patient, local_id or patient),
                        }
                    ],
                    "pub": ident.signing.public.raw,
                }
                payload.update(self.records.patient_key_fields(ident))
                await self.submitter.submit(key, "patient.register", payload)
            elif org not in (state.get("orgs") or []):
                await self.submitter.submit(
                    key,
                    "patient.link",
                    {
                        "patient": patient,
                        "commitment": self._link_commitment(org, patient, local_id or patient),
                    },
                )

    async def _ensure_patients(
        self, org: str, wanted: Mapping[str, tuple[bool, str | None]]
    ) -> dict[str, FhirError]:
        """:meth:`_ensure_patient` for many patients at once (bulk import).

        ``wanted`` maps a patient id to ``(register, local id)``. Registrations
        and links are submitted as one batch of transactions; returns the
        patients that could not be registered or linked, with the reason.
        """
        if not wanted:
            return {}
        ids = sorted(wanted)
        errors: dict[str, FhirError] = {}
        async with self._patient_locks.hold(ids):  # sorted: two batches never deadlock

            def look(st: StateReader) -> dict[str, Any]:
                return {pid: get_obj(st, k_patient(pid)) for pid in ids}

            states = await self.node.read(look)
            register = [p for p in ids if states[p] is None and wanted[p][0]]
            for p in ids:
                if states[p] is None and not wanted[p][0]:
                    errors[p] = _err(
                        422,
                        "business-rule",
                        f"Patient/{p} is not known to the ledger",
                        "subject",
                    )
            idents: dict[str, Identity] = {}
            if register:
                try:
                    idents = await self._identities_for(register)
                except KeystoreError as exc:
                    for p in register:
                        errors[p] = from_medledger_error(exc)
                    register = []
            txs: list[tuple[str, tuple[str, dict[str, Any]]]] = []
            for p in register:
                payload: dict[str, Any] = {
                    "id": p,
                    "links": [
                        {
                            "org": org,
                            "commitment": self._link_commitment(org, p, wanted[p][1] or p),
                        }
                    ],
                    "pub": idents[p].signing.public.raw,
                }
                payload.update(self.records.patient_key_fields(idents[p]))
                txs.append((p, ("patient.register", payload)))
            for p in ids:
                state = states[p]
                if state is not None and org not in (state.get("orgs") or []):
                    commitment = self._link_commitment(org, p, wanted[p][1] or p)
                    txs.append((p, ("patient.link", {"patient": p, "commitment": commitment})))
            if txs:
                outcomes = await self.submitter.submit_many(
                    self.orgs[org].signing, [tx for _, tx in txs]
                )
                for (p, _), outcome in zip(txs, outcomes, strict=True):
                    if isinstance(outcome, MedledgerError):
                        errors[p] = from_medledger_error(outcome)
        return errors

    async def _identities_for(self, patients: Sequence[str]) -> dict[str, Identity]:
        """Keystore identities of ``patients`` (created when missing), in one worker thread."""
        missing = [p for p in patients if p not in self._identities]

        def load() -> dict[str, Identity]:
            out: dict[str, Identity] = {}
            for name in missing:
                if (self.keystore.path / f"{name}.json").exists():
                    out[name] = self.keystore.load(name, self.passphrase)
                else:
                    out[name] = self.keystore.create(name, self.passphrase)
            return out

        if missing:
            self._identities.update(await asyncio.to_thread(load))
        return {p: self._identities[p] for p in patients}

    # ------------------------------------------------------------------ planning writes
    async def _plan(
        self,
        org: str,
        rtype: str,
        rid: str,
        resource: dict[str, Any],
        *,
        expected: int | None,
        must_exist: bool,
        if_match: int | None = None,
        patients_planned: Mapping[str, bool] | None = None,
        resume: bool = False,
    ) -> _Planned:
        """Check a write without changing anything; the pre-flight of every write.

        ``patients_planned``: patients a transaction creates before this entry.
        """
        from medledger.fhir.index import extract

        resource["id"] = rid
        current = await self.store.get_version(rid)
        if current is not None and current.resource_type != rtype:
            raise _err(409, "conflict", f"id {rid} is used by a {current.resource_type}")
        if current is None and not resume:
            # resume (import): a committed but unstored version is finished by the record service
            ledger = await self._state(f"record/{rid}")
            if ledger is not None:
                raise _err(409, "conflict", f"id {rid} is already registered on the ledger")
        if must_exist and current is None:
            raise _err(404, "not-found", f"{rtype}/{rid} does not exist")
        if if_match is not None and (current is None or current.version != if_match):
            have = "none" if current is None else str(current.version)
            raise _err(
                412, "conflict", f"If-Match names version {if_match}; the current one is {have}"
            )
        if current is not None and current.custodian != org:
            raise _err(403, "forbidden", f"{rtype}/{rid} is held by {current.custodian}")
        if current is not None:
            shredded = await self._state(f"record/{rid}")
            if isinstance(shredded, dict) and shredded.get("status") == "shredded":
                raise _err(410, "deleted", f"{rtype}/{rid} was erased")
        if rtype == "Patient":
            if not PATIENT_ID.fullmatch(rid):
                raise _err(
                    400, "value", "a Patient id is 'pat-' followed by 32 hex digits", "Patient.id"
                )
            patient = rid
        else:
            ref = extract(resource).patient
            if ref is None:
                raise _err(
                    422,
                    "required",
                    f"{rtype} must reference its Patient (subject or patient)",
                    f"{rtype}.subject",
                )
            patient = ref
        if current is not None and current.patient != patient:
            raise _err(422, "business-rule", "an update cannot move a record to another patient")
        register = link = False
        state = await self._state(f"patient/{patient}")
        if state is None:
            if rtype == "Patient" or (patients_planned or {}).get(patient):
                register = rtype == "Patient"
            else:
                raise _err(
                    422,
                    "business-rule",
                    f"Patient/{patient} is not known to the ledger",
                    f"{rtype}.subject",
                )
        elif org not in (state.get("orgs") or []):
            link = True
        return _Planned(
            rtype=rtype,
            rid=rid,
            resource=resource,
            patient=patient,
            # 0: must not exist yet (a concurrent create of the same id is a conflict)
            expected=(None if resume else 0) if current is None else current.version,
            created=current is None,
            register_patient=register,
            link_patient=link,
        )

    async def _commit(self, org: str, plan: _Planned, author: SigningKey | None) -> StoredRecord:
        from medledger.fhir.index import extract

        if plan.register_patient or plan.link_patient:
            await self._ensure_patient(
                org,
                plan.patient,
                register=plan.register_patient,
                local_id=self._local_id(plan.resource, plan.patient),
            )
        if plan.deleted:
            return await self.records.write(
                org,
                plan.rtype,
                plan.rid,
                plan.patient,
                b"",
                category=None,
                code_tokens=(),
                codes_for_commitment=(),
                date=None,
                expected_version=plan.expected,
                deleted=True,
                author_key=author,
            )
        ex = extract(plan.resource)
        tokens = self._index_tokens(org, ex.terms())
        return await self.records.write(
            org,
            plan.rtype,
            plan.rid,
            plan.patient,
            self._plaintext(plan.resource),
            category=ex.public_category,
            code_tokens=tokens,
            codes_for_commitment=ex.code_strings(),
            date=ex.date,
            expected_version=plan.expected,
            author_key=author,
        )

    # ------------------------------------------------------------------ create / update / delete
    async def create(
        self,
        auth: Auth,
        rtype: str,
        body: bytes | dict[str, Any],
        *,
        if_none_exist: str | None = None,
    ) -> Result:
        """``POST [base]/[type]``; with ``If-None-Exist`` a conditional create.

        The criteria (a query string) are searched as the caller would search them,
        a logged access like any search: no match creates (201); one match is answered
        with that resource (200) and nothing is written; more than one, or results the
        access decision withheld (a match cannot be ruled out), is 412.
        """
        from medledger.fhir.validate import parse_resource

        self._check_type(rtype)
        if rtype == "AuditEvent":
            raise _err(
                405, "not-supported", "AuditEvents are written by the ledger, not by clients"
            )
        auth.require(rtype, "c")
        resource = parse_resource(body, rtype)
        if rtype == "Consent":
            if if_none_exist is not None:
                raise _err(400, "not-supported", "a Consent cannot be created conditionally")
            return await self.consent_create(auth, resource)
        if if_none_exist is None:
            return await self._create(auth, rtype, new_id(rtype), resource)
        return await self._create_if_none(auth, rtype, new_id(rtype), resource, if_none_exist)

    async def _create_if_none(
        self, auth: Auth, rtype: str, rid: str, resource: dict[str, Any], if_none_exist: str
    ) -> Result:
        criteria = _criteria(if_none_exist)
        # conditional creates with the same criteria one at a time: two sent together must
        # not both find nothing (a custodian's records are written by its node only)
        async with self._conditional_locks.hold([_criteria_key(rtype, criteria)]):
            found = await self._match(auth, rtype, criteria)
            if found is not None:
                return found
            return await self._create(auth, rtype, rid, resource)

    async def _match(
        self, auth: Auth, rtype: str, criteria: list[tuple[str, str]]
    ) -> Result | None:
        """The one resource ``criteria`` find for the caller, None for none, 412 otherwise."""
        from medledger.fhir.index import parse_search

        auth.require(rtype, "s")
        query = parse_search(rtype, [*criteria, ("_count", "2")])
        try:
            records, total, withheld = await self._search(auth, rtype, query)
        except FhirError as exc:
            if exc.code != "multiple-matches":
                raise
            raise _err(412, "multiple-matches", f"If-None-Exist: {exc.diagnostics}") from None
        if withheld:
            raise _err(
                412,
                "multiple-matches",
                "If-None-Exist: results the access decision withheld may match; not created",
            )
        if len(records) > 1 or total > 1:
            raise _err(
                412, "multiple-matches", "If-None-Exist: the criteria match more than one resource"
            )
        if not records:
            return None
        rec = records[0]
        return replace(self._result(rec), location=self.url(rtype, rec.id, rec.version))

    async def _create(self, auth: Auth, rtype: str, rid: str, resource: dict[str, Any]) -> Result:
        org, author = await self._writer(auth, rtype)
        plan = await self._plan(org, rtype, rid, resource, expected=None, must_exist=False)
        if not plan.created:
            raise _err(409, "conflict", f"{rtype}/{rid} already exists")
        rec = await self._guarded(self._commit(org, plan, author))
        return self._result(rec, 201)

    async def update(
        self,
        auth: Auth,
        rtype: str,
        rid: str,
        body: bytes | dict[str, Any],
        *,
        if_match: str | None = None,
    ) -> Result:
        """``PUT [base]/[type]/[id]`` (update, or create with a client-chosen id)."""
        from medledger.fhir.validate import parse_resource

        self._check_type(rtype)
        if rtype in ("AuditEvent", "Consent"):
            raise _err(
                405,
                "not-supported",
                f"{rtype} cannot be updated (a Consent is revoked with DELETE and granted anew)",
            )
        auth.require(rtype, "u")
        resource = parse_resource(body, rtype)
        if resource.get("id") not in (None, rid):
            raise _err(400, "invalid", "the id in the body differs from the id in the URL", "id")
        return await self._update(auth, rtype, rid, resource, parse_etag(if_match))

    async def _update(
        self, auth: Auth, rtype: str, rid: str, resource: dict[str, Any], expected: int | None
    ) -> Result:
        org, author = await self._writer(auth, rtype)
        plan = await self._plan(
            org, rtype, rid, resource, expected=expected, must_exist=False, if_match=expected
        )
        if plan.created:
            raise _err(
                404,
                "not-found",
                f"{rtype}/{rid} does not exist (create it with POST: ids are "
                "assigned by the server)",
            )
        rec = await self._guarded(self._commit(org, plan, author), if_match=expected is not None)
        return self._result(rec)

    async def delete(
        self, auth: Auth, rtype: str, rid: str, *, if_match: str | None = None
    ) -> Result:
        """``DELETE [base]/[type]/[id]``: a tombstone version (Consent: revoke)."""
        self._check_type(rtype)
        if rtype == "AuditEvent":
            raise _err(405, "not-supported", "AuditEvents cannot be deleted")
        auth.require(rtype, "d")
        if rtype == "Consent":
            return await self.consent_revoke(auth, rid)
        return await self._delete(auth, rtype, rid, parse_etag(if_match))

    async def _delete(self, auth: Auth, rtype: str, rid: str, expected: int | None) -> Result:
        org, author = await self._writer(auth, rtype)
        plan = await self._plan_delete(org, rtype, rid, expected)
        if plan is None:
            return Result(operation_outcome(200, f"{rtype}/{rid} is already deleted"))
        rec = await self._guarded(self._commit(org, plan, author), if_match=expected is not None)
        return Result(
            operation_outcome(200, f"{rtype}/{rid} deleted (version {rec.version})"),
            version=rec.version,
        )

    async def _plan_delete(
        self, org: str, rtype: str, rid: str, expected: int | None
    ) -> _Planned | None:
        """Pre-flight of a delete; ``None`` when the record is already deleted."""
        current = await self.store.get_version(rid)
        if current is None or current.resource_type != rtype:
            raise _err(404, "not-found", f"{rtype}/{rid} does not exist")
        if expected is not None and expected != current.version:
            raise _err(
                412,
                "conflict",
                f"If-Match names version {expected}; the current one is {current.version}",
            )
        if current.custodian != org:
            raise _err(403, "forbidden", f"{rtype}/{rid} is held by {current.custodian}")
        if current.deleted:
            return None
        return _Planned(rtype, rid, {}, current.patient, current.version, False, deleted=True)

    @staticmethod
    async def _guarded(coro: Any, *, if_match: bool = False) -> StoredRecord:
        try:
            rec: StoredRecord = await coro
        except Conflict as exc:
            raise _err(412 if if_match else 409, "conflict", str(exc)) from exc
        except FhirError:
            raise
        except NotFoundError as exc:
            if is_gone(exc):
                raise _err(410, "deleted", str(exc)) from exc
            raise _err(404, "not-found", str(exc)) from exc
        except TransactionRejected as exc:
            raise from_medledger_error(exc) from exc
        return rec

    # ------------------------------------------------------------------ reads
    async def _existing(self, rtype: str, rid: str) -> None:
        """404/410 before any decision when the id is not a ``rtype`` record (nothing logged)."""
        current = await self.store.get_version(rid)
        if current is not None and current.resource_type == rtype:
            return
        ledger = await self._state(f"record/{rid}")
        if isinstance(ledger, dict) and ledger.get("resource_type") == rtype:
            if ledger.get("status") == "shredded":
                raise _err(410, "deleted", f"{rtype}/{rid} was erased")
            return  # on the ledger; the record service finishes a pending write
        raise _err(404, "not-found", f"{rtype}/{rid} does not exist")

    @staticmethod
    def _read_error(exc: MedledgerError) -> FhirError:
        if isinstance(exc, Unauthorized):
            return _err(403, "forbidden", str(exc))
        if is_gone(exc):
            return _err(410, "deleted", str(exc))
        if isinstance(exc, NotFound | NotFoundError):
            return _err(404, "not-found", str(exc))
        return from_medledger_error(exc)

    async def _fetch(self, auth: Auth, rid: str, version: int | None = None) -> StoredRecord:
        try:
            return await self.records.fetch(auth.caller, rid, version)
        except (Unauthorized, NotFound, NotFoundError) as exc:
            raise self._read_error(exc) from exc

    async def _fetch_many(
        self,
        auth: Auth,
        patient: str,
        entries: Sequence[IndexEntry],
        types: Sequence[str],
    ) -> tuple[list[StoredRecord], list[str]]:
        """One decision and one ``access.log`` for a page of results (even an empty one)."""
        try:
            return await self.records.fetch_many(
                auth.caller, patient, entries, resource_types=types
            )
        except (Unauthorized, NotFound, NotFoundError) as exc:
            raise self._read_error(exc) from exc

    async def read(self, auth: Auth, rtype: str, rid: str) -> Result:
        """``GET [base]/[type]/[id]``: one access decision, logged, then decrypt and verify."""
        self._check_type(rtype)
        auth.require(rtype, "r")
        if rtype == "Consent":
            return await self.consent_read(auth, rid)
        if rtype == "AuditEvent":
            return await self.audit_read(auth, rid)
        await self._existing(rtype, rid)
        return self._result(await self._fetch(auth, rid))

    async def vread(self, auth: Auth, rtype: str, rid: str, vid: str) -> Result:
        """``GET [base]/[type]/[id]/_history/[vid]``."""
        self._check_type(rtype)
        auth.require(rtype, "r")
        if rtype in ("Consent", "AuditEvent"):
            res = await self.read(auth, rtype, rid)
            if vid != str(res.version):
                raise _err(404, "not-found", f"{rtype}/{rid} has no version {vid}")
            return res
        if not vid.isdigit() or len(vid) > 12 or int(vid) < 1:
            raise _err(404, "not-found", f"{rtype}/{rid} has no version {vid!r}")
        await self._existing(rtype, rid)
        return self._result(await self._fetch(auth, rid, int(vid)))

    async def history(self, auth: Auth, rtype: str, rid: str) -> dict[str, Any]:
        """``GET [base]/[type]/[id]/_history``: every version, newest first (one decision)."""
        from medledger.fhir.bundle import history_bundle

        self._check_type(rtype)
        auth.require(rtype, "r")
        if rtype in ("Consent", "AuditEvent"):
            res = await self.read(auth, rtype, rid)
            single = StoredRecord(
                rid, rtype, "", "", res.version or 1, res.last_updated or 0, res.resource
            )
            return history_bundle([single], base_url=self.base_url)
        await self._existing(rtype, rid)
        try:
            versions = await self.records.history(auth.caller, rid)
        except (Unauthorized, NotFound, NotFoundError) as exc:
            raise self._read_error(exc) from exc
        shown = [
            rec if rec.resource is None else replace(rec, resource=self._present(rec))
            for rec in reversed(versions)
        ]
        return history_bundle(shown, base_url=self.base_url)

    # ------------------------------------------------------------------ search
    async def search(
        self, auth: Auth, rtype: str, params: Sequence[tuple[str, str]], *, lenient: bool = False
    ) -> dict[str, Any]:
        """``GET [base]/[type]?...``: one access decision for the one patient searched."""
        from medledger.fhir.index import parse_search, search_links

        self._check_type(rtype)
        auth.require(rtype, "s")
        if rtype == "Consent":
            return await self.consent_search(auth, params, lenient=lenient)
        if rtype == "AuditEvent":
            return await self.audit_search(auth, params, lenient=lenient)
        query = parse_search(rtype, list(params), lenient=lenient)
        for t in query.included_types:  # refused before anything is searched or logged
            auth.require(t, "s")
        records, total, withheld = await self._search(auth, rtype, query)
        resources = [query.subset(self._present(r)) for r in records]
        links = search_links(self.base_url, query, total)
        included: list[dict[str, Any]] = []
        notes: list[dict[str, Any]] = []
        if records and (query.include or query.revinclude):
            included, notes = await self._included(auth, records[0].patient, query)
        return self._searchset(resources, total, links, withheld, notes, included)

    async def _included(
        self, auth: Auth, patient: str, query: Any
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The resources ``_include`` (the Patient) and ``_revinclude`` (the patient's
        records of the types named, at most :data:`_INCLUDE_MAX` each, from every
        custodian) add to a page of results about ``patient``, and warnings.

        They are read with one more access decision, logged like any read; what it does
        not permit is left out with a warning, as are records past the limit. (The
        caller's scopes were checked for these types before the search.)"""
        types = query.included_types
        entries: list[IndexEntry] = []
        notes: list[dict[str, Any]] = []
        for t in types:
            held = await self.records.remote_entries(auth.caller, patient, (t,))
            if t == "Patient":  # the patient's own Patient resource
                found, _ = await self.store.search(resource_type=t, ids=[patient], limit=1)
                held = [e for e in held if e.record == patient]
            else:
                found, _ = await self.store.search(
                    resource_type=t, patient=patient, limit=_INCLUDE_MAX + 1
                )
            rows = [*found, *held]
            # at most _INCLUDE_MAX a type, and what one access.log entry may name in all
            room = min(_INCLUDE_MAX, MAX_RECORDS - len(entries))
            if len(rows) > room:
                rows = rows[:room]
                notes.append(
                    operation_outcome(
                        200,
                        f"_revinclude: only the first {room} {t} resources are "
                        f"included; search {t}?patient=Patient/{patient} for all of them",
                        code="too-costly",
                        severity="warning",
                    )
                )
            entries.extend(rows)
        if not entries:
            return [], notes
        try:
            fetched, withheld = await self._fetch_many(auth, patient, entries, types)
        except FhirError as exc:
            if exc.status != 403:
                raise
            fetched, withheld = [], list(types)
        if withheld:
            notes.append(
                operation_outcome(
                    200,
                    f"included resources of type {', '.join(sorted(withheld))} were withheld: "
                    "the access decision did not permit them",
                    code="suppressed",
                    severity="warning",
                )
            )
        return [self._present(r) for r in fetched if r.resource is not None], notes

    async def _search(
        self, auth: Auth, rtype: str, query: Any
    ) -> tuple[list[StoredRecord], int, list[str]]:
        """The records of a parsed search the caller may see (one decision, logged), the
        total, and the resource types the decision withheld."""
        if rtype == "Patient" and query.patient is None and not query.ids and query.codes:
            found = await self._patient_by_identifier(auth, query)
            if found is None:
                return [], 0, []
            patient = found
        else:
            patient = await self._search_patient(auth, rtype, query.patient, query.ids)
        page: list[IndexEntry] = []
        total = 0
        if not query.impossible:
            # records of the patient other members' nodes hold (clinical filters: local only)
            held: list[IndexEntry] = []
            if _patient_only(query):
                held = await self.records.remote_entries(auth.caller, patient, (rtype,))
            if held and query.order in ("date", "-date"):
                # the order by clinical date holds across both: merge from the first row
                # (records held elsewhere have no last update known here: by that order
                # they follow this node's, as in the natural order)
                if query.offset + query.count > _SCAN_MAX:
                    raise _err(
                        400,
                        "too-costly",
                        f"a sorted search pages through at most {_SCAN_MAX} results",
                        "_offset",
                    )
                first = replace(query, offset=0, count=query.offset + query.count)
                head, total = await self._index_search(rtype, patient, first)
                page, total = _merged(head, total, held, query)
            else:
                page, total = await self._index_search(rtype, patient, query)
                if held:
                    page, total = _after_local(page, total, held, query.offset, query.count)
        fetched, withheld = await self._fetch_many(auth, patient, page, (rtype,))
        records = [r for r in fetched if r.resource is not None]
        if withheld:
            total = len(records) if query.offset == 0 and len(page) < query.count else total
        return records, total, withheld

    async def _index_search(
        self, rtype: str, patient: str, query: Any
    ) -> tuple[list[IndexEntry], int]:
        kwargs: dict[str, Any] = {
            "resource_type": rtype,
            "patient": patient,
            "date_ge": query.date_ge,
            "date_lt": query.date_lt,
            "updated_ge": query.updated_ge,
            "updated_lt": query.updated_lt,
            "ids": list(query.ids),
            "order": query.order,
        }
        if len(query.ids) > MAX_IDS:
            raise _err(400, "too-costly", f"search at most {MAX_IDS} ids", "_id")
        code_tokens = self._query_tokens(query.code_terms())
        cat_tokens = self._query_tokens(query.category_terms())
        if code_tokens and cat_tokens:
            # the store matches any-of one token set: AND the second set here
            found: list[IndexEntry] = []
            offset = 0
            while True:
                chunk, total = await self.store.search(
                    tokens=code_tokens, offset=offset, limit=MAX_PAGE, **kwargs
                )
                found.extend(chunk)
                offset += len(chunk)
                if not chunk or offset >= total or offset >= _SCAN_MAX:
                    break
            wanted = set(cat_tokens)
            matched = [e for e in found if wanted.intersection(e.tokens)]
            return matched[query.offset : query.offset + query.count], len(matched)
        return await self.store.search(
            tokens=code_tokens or cat_tokens, offset=query.offset, limit=query.count, **kwargs
        )

    async def _patient_by_identifier(self, auth: Auth, query: Any) -> str | None:
        """The patient whose Patient record at the caller's organisation carries the
        identifier searched (``Patient?identifier=system|value``), or None.

        Only the caller's own organisation's identifiers are looked up (an MRN means
        something only to the organisation that issued it); a patient finds only
        themself. The search that follows is then an ordinary one-patient search:
        one access decision, logged.
        """
        caller = auth.caller
        if caller.kind == "patient":
            return caller.id
        if caller.org is None or caller.org not in self.orgs:
            raise _err(
                403,
                "forbidden",
                "an identifier search looks up the caller's own organisation's patients",
                "identifier",
            )
        terms = list(query.code_terms())
        if len(terms) > MAX_TOKENS:
            raise _err(400, "too-costly", f"search at most {MAX_TOKENS} identifiers")
        tokens = [self._token(caller.org, t) for t in terms]
        found, _ = await self.store.search(
            resource_type="Patient", custodian=caller.org, tokens=tokens, limit=2
        )
        owners = {e.patient for e in found if e.custodian == caller.org and not e.deleted}
        if len(owners) > 1:
            raise _err(
                400,
                "multiple-matches",
                "the identifier matches more than one patient: give its system (system|value)",
                "identifier",
            )
        return owners.pop() if owners else None

    async def _search_patient(
        self, auth: Auth, rtype: str, patient: str | None, ids: Sequence[str]
    ) -> str:
        """The one patient a search is about (a search is one access about one patient)."""
        caller = auth.caller
        if rtype == "Patient" and ids:
            if len(ids) > 1:
                raise _err(400, "not-supported", "search one Patient _id at a time", "_id")
            patient = ids[0]
        elif patient is None and ids:
            found, _ = await self.store.search(resource_type=rtype, ids=list(ids), limit=MAX_PAGE)
            owners = {e.patient for e in found}
            if len(owners) > 1:
                raise _err(400, "not-supported", "a search must concern one patient", "_id")
            patient = owners.pop() if owners else None
            if patient is None:
                ledger = [await self._state(f"record/{i}") for i in ids]
                owners = {r["patient"] for r in ledger if isinstance(r, dict)}
                patient = owners.pop() if len(owners) == 1 else None
        if patient is None and caller.kind == "patient":
            patient = caller.id
        if patient is None:
            if ids:
                raise _err(404, "not-found", f"no {rtype} has that _id", "_id")
            raise _err(
                400,
                "required",
                f"searching {rtype} needs a patient (patient=) or an _id",
                "patient",
            )
        if await self._state(f"patient/{patient}") is None:
            raise _err(404, "not-found", f"Patient/{patient} does not exist", "patient")
        return patient

    def _searchset(
        self,
        resources: list[dict[str, Any]],
        total: int,
        links: Mapping[str, str],
        withheld: Sequence[str] = (),
        extra: Sequence[dict[str, Any]] = (),
        included: Sequence[dict[str, Any]] = (),
    ) -> dict[str, Any]:
        from medledger.fhir.bundle import SearchEntry, searchset

        items: list[dict[str, Any] | SearchEntry] = list(resources)
        items.extend(SearchEntry(r, "include") for r in included)
        if withheld:
            note = operation_outcome(
                200,
                f"results of type {', '.join(sorted(withheld))} were withheld: "
                "the access decision did not permit them",
                code="suppressed",
                severity="warning",
            )
            items.append(SearchEntry(note, "outcome"))
        items.extend(SearchEntry(o, "outcome") for o in extra)
        return searchset(items, total, links, base_url=self.base_url)

    async def everything(
        self, auth: Auth, patient: str, params: Sequence[tuple[str, str]] = ()
    ) -> dict[str, Any]:
        """``GET [base]/Patient/[id]/$everything``: what the caller may see, from every custodian.

        One page (``_count``, default and at most 1000 resources) is one access
        decision and one ``access.log``; ``next`` links page on.
        """
        from medledger.fhir.index import SearchQuery, search_links

        auth.require("Patient", "r")
        values = self._simple_params(params, {"_count", "_offset", "_type"}, lenient=False)
        count = self._int_value(values, "_count", _EVERYTHING_PAGE, 1, _EVERYTHING_PAGE)
        offset = self._int_value(values, "_offset", 0, 0, 10**9)
        if await self._state(f"patient/{patient}") is None:
            raise _err(404, "not-found", f"Patient/{patient} does not exist")
        allowed = sorted(t for t in RECORD_TYPES if auth.allows(t, "r") or auth.allows(t, "s"))
        if "_type" in values:
            wanted = {t.strip() for t in values["_type"].split(",")}
            allowed = [t for t in allowed if t in wanted]
        entries: list[IndexEntry] = []
        total = 0
        if allowed:
            # only the types the caller may ask for: the total and the pages count no
            # others (a scope or _type leaves out)
            found, total = await self.store.search(
                resource_type=None,
                resource_types=allowed,
                patient=patient,
                offset=offset,
                limit=count,
            )
            # then the patient's records other members' nodes hold (from the ledger)
            held = await self.records.remote_entries(auth.caller, patient, allowed)
            entries, total = _after_local(found, total, held, offset, count)
        records, withheld = await self._fetch_many(auth, patient, entries, allowed or ["Patient"])
        resources = [self._present(r) for r in records if r.resource is not None]
        resources.sort(key=lambda r: (r["resourceType"] != "Patient", r["resourceType"]))
        query = SearchQuery(
            "Patient",
            count=count,
            offset=offset,
            params=tuple((k, v) for k, v in params if k not in ("_count", "_offset")),
        )
        links = search_links(self.base_url, query, total, path=f"Patient/{patient}/$everything")
        return self._searchset(resources, total, links, withheld)

    def _int_value(
        self, values: Mapping[str, str], name: str, default: int, lo: int, hi: int
    ) -> int:
        text = values.get(name)
        if text is None or text == "":
            return default
        if not text.isdigit() or len(text) > 10:
            raise _err(400, "value", f"{name} must be a non-negative integer", name)
        return max(lo, min(int(text), hi))

    async def duplicate_check(
        self, auth: Auth, params: Sequence[tuple[str, str]]
    ) -> dict[str, Any]:
        """``GET [base]/Observation/$duplicate-check?patient=&code=system|code[&since=][&_count=]``.

        Recent results of one test (a LOINC code) for one patient from every
        custodian the caller may see, newest first, so that a clinician sees an
        existing result before ordering the test again. One access decision, one
        ``access.log``. A final ``OperationOutcome`` entry (search mode
        ``outcome``) summarises: how many results, the latest date and custodians.
        """
        from medledger.fhir.dates import parse_range
        from medledger.fhir.index import SearchQuery, search_links

        auth.require("Observation", "s")
        values = self._simple_params(params, {"patient", "code", "since", "_count"}, False)
        patient = values.get("patient", "")
        if patient.startswith("Patient/"):
            patient = patient[len("Patient/") :]
        code = values.get("code", "")
        if not patient or not code:
            raise _err(400, "required", "$duplicate-check needs patient and code (system|code)")
        system, sep, value = code.partition("|")
        if not value if sep else not system:
            raise _err(400, "value", "code must be system|code or code", "code")
        term = ("code", system, value) if sep else ("code", None, system)
        since: int | None = None
        if values.get("since"):
            try:
                since = parse_range(values["since"], lenient_time=True).start
            except ValueError as exc:
                raise _err(400, "value", f"since: {exc}", "since") from exc
        count = self._int_value(values, "_count", 10, 1, MAX_PAGE)
        if await self._state(f"patient/{patient}") is None:
            raise _err(404, "not-found", f"Patient/{patient} does not exist", "patient")
        found, _ = await self.store.search(
            resource_type="Observation",
            patient=patient,
            tokens=self._query_tokens([term]),
            date_ge=since,
            limit=_SCAN_MAX,
        )
        found.sort(key=lambda e: (e.date or 0, e.last_updated), reverse=True)
        records, withheld = await self._fetch_many(auth, patient, found[:count], ("Observation",))
        rank = {e.record: i for i, e in enumerate(found)}  # newest clinical date first
        records.sort(key=lambda r: rank.get(r.id, len(rank)))
        resources = [self._present(r) for r in records if r.resource is not None]
        summary: list[dict[str, Any]] = []
        if resources:
            custodians = sorted({r.custodian for r in records})
            latest = resources[0].get("effectiveDateTime") or resources[0]["meta"]["lastUpdated"]
            summary.append(
                operation_outcome(
                    200,
                    f"{len(resources)} earlier result(s) for {code}; the latest is from {latest} "
                    f"(held by {', '.join(custodians)})",
                    code="informational",
                )
            )
        query = SearchQuery(
            "Observation", count=count, params=tuple((k, v) for k, v in params if k != "_count")
        )
        links = search_links(self.base_url, query, None, path="Observation/$duplicate-check")
        return self._searchset(resources, len(resources), links, withheld, summary)

    # ------------------------------------------------------------------ Consent/AuditEvent log
    async def _authorize_meta(
        self, auth: Auth, patient: str, rtype: str, *, action: str = "access"
    ) -> None:
        """Decide and log (one ``access.log``) a read of a patient's consents or audit trail.

        The patient may read their own. An organisation's privacy officer, or its
        system client, may read them for a patient the organisation holds
        (``patient/<id>.orgs``): keeping and reviewing the audit trail is the
        custodian's duty (HIPAA 164.312(b)) and cannot hinge on the patient's
        consent. Everyone else is refused, and the refusal is logged too.
        """
        caller = auth.caller
        state = await self._state(f"patient/{patient}")
        if state is None:
            raise _err(404, "not-found", f"Patient/{patient} does not exist")
        linked = [o for o in (state.get("orgs") or []) if o in self.orgs]
        role: str | None = None
        purpose = caller.purpose
        if caller.kind == "patient":
            org = linked[0] if linked else None
            purpose = PATIENT_PURPOSE
            permit = caller.id == patient
            rule = "self"
            reason = "a patient may see their own" if permit else "another patient's data"
        else:
            org = caller.org if caller.org in self.orgs else None
            permit, rule, reason = False, "default", "the organisation does not hold the patient"
            if caller.kind == "practitioner":
                principal = await self._state(f"principal/{caller.id}")
                roles = list(principal.get("roles") or []) if isinstance(principal, dict) else []
                role = sorted(roles)[0] if roles else None
                if (
                    not isinstance(principal, dict)
                    or principal.get("status") != "active"
                    or principal.get("org") != caller.org
                ):
                    rule, reason = "actor", "unknown or suspended actor"
                elif "privacy-officer" not in roles:
                    rule, reason = "role", f"roles {sorted(roles)} may not review {rtype}"
                elif caller.org in (state.get("orgs") or []):
                    permit, rule, reason = True, "custodian", "privacy officer of the custodian"
            elif caller.org in (state.get("orgs") or []):
                permit, rule, reason = True, "custodian", "system client of the custodian"
        if org is None:
            raise _err(403, "forbidden", "this node does not serve an organisation of the caller")
        payload = {
            "request": "req-" + secrets.token_hex(12),
            "actor": caller.id,
            "org": org,
            "role": role,
            "on_behalf": caller.client if caller.client != caller.id else None,
            "patient": patient,
            "resource_types": [rtype],
            "records": [],
            "purpose": purpose,
            "action": action,
            "outcome": "permit" if permit else "deny",
            "consents": [],
            "rule": rule,
            "break_glass": False,
            "time": _now_ms(),
        }
        try:
            await self.submitter.submit(self.orgs[org].signing, "access.log", payload)
        except TransactionRejected as exc:
            raise from_medledger_error(exc) from exc
        if not permit:
            raise _err(403, "forbidden", f"access denied: {reason}")

    # ------------------------------------------------------------------ Consent
    async def _patient_signer(self, patient: str) -> SigningKey:
        try:
            ident = await self._identity(patient)
        except KeystoreError as exc:
            raise _err(500, "exception", f"the key of {patient} cannot be opened") from exc
        if ident is None:
            raise _err(
                422,
                "business-rule",
                f"this node does not hold the key of {patient}: sign consent.grant with the "
                "patient's own key (medledger consent grant)",
            )
        return ident.signing

    async def consent_create(self, auth: Auth, resource: dict[str, Any]) -> Result:
        """A patient's Consent becomes a ``consent.grant`` signed with the patient's key."""
        from medledger.fhir.consent import consent_to_payload
        from medledger.fhir.index import extract

        caller = auth.caller
        if caller.kind != "patient":
            raise _err(
                403,
                "forbidden",
                "a Consent is granted by the patient: use a token of a client registered for "
                "the patient",
            )
        patient = extract(resource).patient or caller.id
        if patient != caller.id:
            raise _err(403, "forbidden", "a patient may grant consent for themself only")
        payload = consent_to_payload(resource, patient, consent_id=str(uuid.uuid4()))
        key = await self._patient_signer(patient)
        try:
            await self.submitter.submit(key, "consent.grant", payload)
        except TransactionRejected as exc:
            raise from_medledger_error(exc) from exc
        cid = payload["consent"]["id"]
        consent = await self._consent_state(cid)
        return Result(
            self._render_consent(consent),
            status=201,
            version=1,
            location=self.url("Consent", cid, 1),
        )

    async def _consent_state(self, cid: str) -> dict[str, Any]:
        index = await self._state(f"consent-id/{cid}")
        consent = None if index is None else await self._state(f"consent/{index['patient']}/{cid}")
        if not isinstance(consent, dict):
            raise _err(404, "not-found", f"Consent/{cid} does not exist")
        return consent

    def _render_consent(self, consent: Mapping[str, Any]) -> dict[str, Any]:
        from medledger.fhir.consent import payload_to_consent

        resource = payload_to_consent(dict(consent))
        meta = dict(resource.get("meta") or {})
        meta["versionId"] = "2" if consent.get("status") == "revoked" else "1"
        resource["meta"] = meta
        return resource

    async def consent_read(self, auth: Auth, cid: str) -> Result:
        consent = await self._consent_state(cid)
        await self._authorize_meta(auth, consent["patient"], "Consent")
        resource = self._render_consent(consent)
        return Result(resource, version=int(resource["meta"]["versionId"]))

    async def consent_revoke(self, auth: Auth, cid: str) -> Result:
        consent = await self._consent_state(cid)
        caller = auth.caller
        if caller.kind != "patient" or caller.id != consent["patient"]:
            raise _err(403, "forbidden", "only the patient may revoke their consent")
        if consent.get("status") == "revoked":
            return Result(operation_outcome(200, f"Consent/{cid} is already revoked"))
        try:
            await self.submitter.submit(
                await self._patient_signer(caller.id), "consent.revoke", {"id": cid}
            )
        except TransactionRejected as exc:
            raise from_medledger_error(exc) from exc
        return Result(operation_outcome(200, f"Consent/{cid} revoked"), version=2)

    async def consent_search(
        self, auth: Auth, params: Sequence[tuple[str, str]], *, lenient: bool = False
    ) -> dict[str, Any]:
        """``GET [base]/Consent?patient=``: the patient's consents on the ledger."""
        values = self._simple_params(params, {"patient", "_count", "_offset"}, lenient)
        patient = self._patient_param(auth, values.get("patient"))
        await self._authorize_meta(auth, patient, "Consent")
        rows = await self.node.state_scan(f"consent/{patient}/".encode())
        resources = [self._render_consent(decode(raw)) for _, raw in rows]
        return self._page("Consent", resources, params, values)

    # ------------------------------------------------------------------ AuditEvent
    def _simple_params(
        self, params: Sequence[tuple[str, str]], known: set[str], lenient: bool
    ) -> dict[str, str]:
        values: dict[str, str] = {}
        for k, v in params:
            if k not in known:
                if lenient:
                    continue
                raise _err(400, "not-supported", f"unknown search parameter {k!r}", k)
            values[k] = v
        return values

    @staticmethod
    def _patient_param(auth: Auth, value: str | None) -> str:
        if value and value.startswith("Patient/"):
            value = value[len("Patient/") :]
        if not value:
            if auth.caller.kind == "patient":
                return auth.caller.id
            raise _err(400, "required", "the patient parameter is required", "patient")
        return value

    def _page(
        self,
        rtype: str,
        resources: list[dict[str, Any]],
        params: Sequence[tuple[str, str]],
        values: Mapping[str, str],
    ) -> dict[str, Any]:
        from medledger.fhir.index import SearchQuery, search_links

        count = self._int_value(values, "_count", DEFAULT_PAGE, 1, MAX_PAGE)
        offset = self._int_value(values, "_offset", 0, 0, 10**9)
        query = SearchQuery(
            rtype,
            count=count,
            offset=offset,
            params=tuple((k, v) for k, v in params if k not in ("_count", "_offset")),
        )
        links = search_links(self.base_url, query, len(resources))
        return self._searchset(resources[offset : offset + count], len(resources), links)

    async def _audit_entry(self, tx_hex: str) -> tuple[dict[str, Any], bytes]:
        """The ``access.log`` entry (as in the audit feed) with id ``tx_hex``, and its raw tx."""
        try:
            tx_id = bytes.fromhex(tx_hex)
        except ValueError:
            tx_id = b""
        if len(tx_id) != 32:
            raise _err(404, "not-found", f"AuditEvent/{tx_hex} does not exist")
        try:
            rec = await self.node.get_tx(tx_id)
        except NotFoundError as exc:
            raise _err(404, "not-found", f"AuditEvent/{tx_hex} does not exist") from exc
        tx = Transaction.from_bytes(rec.raw)
        if tx.type != "access.log" or not isinstance(tx.payload.get("patient"), str):
            raise _err(404, "not-found", f"AuditEvent/{tx_hex} does not exist")
        key = f"audit/{tx.payload['patient']}/{rec.height:012d}/{tx_hex}"
        raw = await self.node.state_get(key.encode())
        if raw is None:  # pragma: no cover - a committed access.log always writes its entry
            raise _err(404, "not-found", f"AuditEvent/{tx_hex} does not exist")
        entry = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in decode(raw).items()}
        return entry, rec.raw

    async def audit_read(self, auth: Auth, aid: str) -> Result:
        from medledger.fhir.audit import audit_event

        entry, _ = await self._audit_entry(aid.lower())
        await self._authorize_meta(auth, entry["patient"], "AuditEvent")
        return Result(audit_event(entry, tx_id_hex=aid.lower()), version=1)

    async def audit_search(
        self, auth: Auth, params: Sequence[tuple[str, str]], *, lenient: bool = False
    ) -> dict[str, Any]:
        """``GET [base]/AuditEvent?patient=``: the patient's access decisions, newest first.

        The search is itself an access to the patient's audit trail and is logged
        first, so it appears in its own result.
        """
        from medledger.fhir.audit import audit_event

        values = self._simple_params(params, {"patient", "_count", "_offset"}, lenient)
        patient = self._patient_param(auth, values.get("patient"))
        await self._authorize_meta(auth, patient, "AuditEvent")
        feed = await self.access.audit_feed(patient)
        events = [audit_event(e, tx_id_hex=str(e["tx"])) for e in reversed(feed)]
        return self._page("AuditEvent", events, params, values)

    async def audit_proof(self, auth: Auth, aid: str, height: str | None = None) -> dict[str, Any]:
        """``GET [base]/AuditEvent/[id]/$proof[?height=H]``: the inclusion proof of the
        entry's transaction.

        A Parameters resource with the canonical transaction bytes, the leaf index,
        tree size, leaf hash, audit path and the signed checkpoint (C2SP signed
        note) it verifies against, plus the verifier keys of the signing nodes. The
        checkpoint is the latest one, or the one of block ``height`` (a checkpoint the
        client already holds, e.g. co-signed by a majority of the members: in a
        consortium the newest checkpoint carries only its own node's signature until
        the next gossip round). 404 for a height without a checkpoint, 422 when the
        entry is not yet in the log at that height.
        """
        import base64

        auth.require("AuditEvent", "r")
        if height is not None and (not height.isdigit() or len(height) > 18):
            raise _err(400, "value", f"height={height!r} is not a block height")
        tx_hex = aid.lower()
        entry, raw = await self._audit_entry(tx_hex)
        await self._authorize_meta(auth, entry["patient"], "AuditEvent")
        at = None if height is None else int(height)
        try:
            proof = await self.node.inclusion_proof(bytes.fromhex(tx_hex), at)
        except NotFoundError as exc:
            raise _err(404, "not-found", str(exc)) from exc
        except ProofError as exc:
            raise _err(422, "processing", str(exc)) from exc
        params: list[dict[str, Any]] = [
            {"name": "transaction", "valueString": tx_hex},
            {"name": "canonicalTransaction", "valueBase64Binary": base64.b64encode(raw).decode()},
            {"name": "leafIndex", "valueInteger": proof.leaf_index},
            {"name": "treeSize", "valueInteger": proof.tree_size},
            {"name": "leafHash", "valueString": proof.leaf_hash.hex()},
            *({"name": "proof", "valueString": h.hex()} for h in proof.proof),
            {"name": "checkpoint", "valueString": proof.checkpoint},
            *({"name": "verifierKey", "valueString": k} for k in self.node.verifier_keys()),
        ]
        return {"resourceType": "Parameters", "parameter": params}

    # ------------------------------------------------------------------ erasure
    async def erase(self, auth: Auth, patient: str) -> dict[str, Any]:
        """``POST [base]/Patient/[id]/$erase``: crypto-shred every record of the patient.

        Asked by the patient themself or by a system client (``Patient.d``) of an
        organisation holding the patient. Every record is marked ``record.shred``
        on the ledger and its ciphertext and wrapped keys are destroyed; the
        ledger keeps the commitments, so ``verify`` still passes.
        """
        auth.require("Patient", "d")
        caller = auth.caller
        state = await self._state(f"patient/{patient}")
        if state is None:
            raise _err(404, "not-found", f"Patient/{patient} does not exist")
        linked = [o for o in (state.get("orgs") or []) if o in self.orgs]
        if caller.kind == "patient":
            if caller.id != patient:
                raise _err(403, "forbidden", "a patient may erase only their own records")
        elif caller.kind != "system" or caller.org not in linked:
            raise _err(
                403, "forbidden", "erasure is asked by the patient or a custodian's system client"
            )
        if not linked:
            raise _err(403, "forbidden", "this node serves no organisation of the patient")
        try:
            count = await self.records.shred_patient(linked[0], patient)
        except TransactionRejected as exc:
            raise from_medledger_error(exc) from exc
        return operation_outcome(200, f"{count} record(s) of Patient/{patient} erased")

    # ------------------------------------------------------------------ Bundles
    async def bundle(self, auth: Auth, body: bytes | dict[str, Any]) -> dict[str, Any]:
        """``POST [base]``: a ``transaction`` (all or nothing) or a ``batch`` Bundle."""
        from medledger.fhir.bundle import plan_transaction
        from medledger.fhir.validate import parse_json

        doc = parse_json(body) if not isinstance(body, dict) else body
        entries = plan_transaction(doc, new_id=new_id)
        if not (isinstance(doc, dict) and doc.get("type") == "transaction"):
            return await self._batch(auth, entries)
        conditional = [
            e
            for e in entries
            if e.interaction == "create" and e.if_none_exist and e.resource_type in RECORD_TYPES
        ]  # (other types are refused by the pre-flight, before anything is searched)
        if not conditional:
            return await self._transaction(auth, entries, {})
        # conditional creates: their criteria are searched first (each a logged search) and
        # held, so that no identical conditional create runs until this Bundle is done
        criteria = {e.index: _criteria(e.if_none_exist or "") for e in conditional}
        names = [_criteria_key(e.resource_type, criteria[e.index]) for e in conditional]
        async with self._conditional_locks.hold(names):
            found: dict[int, Result] = {}
            for e in conditional:
                auth.require(e.resource_type, "c")
                try:
                    match = await self._match(auth, e.resource_type, criteria[e.index])
                except FhirError as exc:
                    where = f"Bundle.entry[{e.index}].request.ifNoneExist"
                    raise FhirError(exc.status, exc.code, exc.diagnostics, [where]) from None
                if match is not None:
                    found[e.index] = match
            if found:
                ids = {i: str(r.resource["id"]) for i, r in found.items()}
                entries = plan_transaction(doc, new_id=new_id, matched=ids)
            return await self._transaction(auth, entries, found)

    async def _transaction(
        self, auth: Auth, entries: list[Any], matched: Mapping[int, Result]
    ) -> dict[str, Any]:
        """All or nothing: every entry is checked before anything is written.

        ``matched`` holds the resources the conditional creates' criteria found (those
        entries write nothing and answer 200 with the resource found).

        The pre-flight runs every check the contracts and the record service
        would (validation, scopes, the writer's role, custodian, versions and
        If-Match, patient registered or created in this Bundle, ids free), so a
        failing entry leaves the ledger, the state and the store untouched.
        Reads are not allowed in a transaction (they would be logged before the
        outcome is known); send them in a batch.
        """
        from medledger.fhir.bundle import EntryResult, processing_order, transaction_response

        plans: dict[int, _Planned | None] = {}
        writers: dict[str, tuple[str, SigningKey | None]] = {}
        creating: dict[str, bool] = {}
        for e in processing_order(entries):
            if e.matched:
                continue
            where = f"Bundle.entry[{e.index}]"
            try:
                plans[e.index] = await self._preflight(auth, e, writers, creating)
            except FhirError as exc:
                raise (
                    exc.prefixed(e.resource_type or "Bundle", where)
                    if exc.expression
                    else (
                        FhirError(
                            exc.status, exc.code, f"entry {e.index}: {exc.diagnostics}", [where]
                        )
                    )
                ) from None
        results: dict[int, EntryResult] = {}

        async def run(e: Any) -> None:
            if e.matched:
                res = matched[e.index]
                results[e.index] = EntryResult(
                    200, e.resource_type, e.id, res.version, res.last_updated
                )
                return
            plan = plans[e.index]
            if plan is None:
                results[e.index] = EntryResult(
                    200,
                    e.resource_type,
                    e.id,
                    outcome=operation_outcome(200, f"{e.reference} is already deleted"),
                )
                return
            org, author = writers[e.resource_type]
            rec = await self._guarded(self._commit(org, plan, author), if_match=bool(e.if_match))
            status = 201 if plan.created else 200
            results[e.index] = EntryResult(
                status, rec.resource_type, rec.id, rec.version, rec.last_updated
            )

        ordered = processing_order(entries)
        phases = [
            [e for e in ordered if e.method == "DELETE"],
            [e for e in ordered if e.method != "DELETE" and e.resource_type == "Patient"],
            [e for e in ordered if e.method != "DELETE" and e.resource_type != "Patient"],
        ]
        for phase in phases:
            outcome = await asyncio.gather(*(run(e) for e in phase), return_exceptions=True)
            failed = [x for x in outcome if isinstance(x, BaseException)]
            if failed:
                done = sorted(results)
                err = failed[0]
                base = err if isinstance(err, FhirError) else from_medledger_error(err)
                raise FhirError(
                    base.status,
                    base.code,
                    f"{base.diagnostics} (a concurrent change after the pre-flight check; "
                    f"entries already committed: {done or 'none'})",
                )
        return transaction_response(
            [results[e.index] for e in entries], base_url=self.base_url, timestamp=_now_ms()
        )

    async def _preflight(
        self,
        auth: Auth,
        e: Any,
        writers: dict[str, tuple[str, SigningKey | None]],
        creating: dict[str, bool],
    ) -> _Planned | None:
        rtype = e.resource_type
        if e.method in ("GET", "HEAD"):
            raise _err(400, "not-supported", "a transaction may only write: send reads in a batch")
        if rtype not in RECORD_TYPES:
            raise _err(400, "not-supported", f"{rtype} cannot be written in a transaction")
        if e.if_none_match:
            raise _err(400, "not-supported", "ifNoneMatch is not supported in a transaction")
        interaction = {"POST": "c", "PUT": "u", "DELETE": "d"}[e.method]
        auth.require(rtype, interaction)
        if rtype not in writers:
            writers[rtype] = await self._writer(auth, rtype)
        org = writers[rtype][0]
        expected = parse_etag(e.if_match)
        if e.method == "DELETE":
            return await self._plan_delete(org, rtype, e.id, expected)
        plan = await self._plan(
            org,
            rtype,
            e.id,
            e.resource,
            expected=expected,
            must_exist=False,
            if_match=expected,
            patients_planned=creating,
        )
        if e.method == "POST" and not plan.created:
            raise _err(409, "conflict", f"{rtype}/{e.id} already exists")
        if plan.created and e.method == "PUT":
            raise _err(404, "not-found", f"{rtype}/{e.id} does not exist (create it with POST)")
        if rtype == "Patient" and plan.created:
            creating[plan.patient] = True
        return plan

    async def _batch(self, auth: Auth, entries: list[Any]) -> dict[str, Any]:
        """Each entry on its own, in request order; failures become entry outcomes."""
        from medledger.fhir.bundle import EntryResult, batch_response

        results: list[EntryResult] = []
        for e in entries:
            try:
                if e.error is not None:
                    raise e.error
                results.append(await self._batch_entry(auth, e))
            except FhirError as exc:
                results.append(EntryResult.from_error(exc))
            except MedledgerError as exc:
                results.append(EntryResult.from_error(from_medledger_error(exc)))
        return batch_response(results, base_url=self.base_url, timestamp=_now_ms())

    async def _batch_entry(self, auth: Auth, e: Any) -> Any:
        from medledger.fhir.bundle import EntryResult

        rtype = e.resource_type
        self._check_type(rtype)

        def done(res: Result, status: int | None = None) -> EntryResult:
            rid = res.resource.get("id") if res.resource.get("resourceType") == rtype else e.id
            return EntryResult(
                status or res.status,
                rtype,
                rid,
                res.version,
                res.last_updated,
                resource=res.resource if e.method == "GET" else None,
                outcome=res.resource
                if res.resource.get("resourceType") == "OperationOutcome"
                else None,
            )

        def bundle_result(doc: dict[str, Any]) -> EntryResult:
            return EntryResult(200, resource=doc)

        if e.method == "POST":
            if rtype in ("Consent", "AuditEvent"):
                return done(
                    await self.create(auth, rtype, e.resource, if_none_exist=e.if_none_exist)
                )
            auth.require(rtype, "c")
            if e.if_none_exist is not None:
                return done(
                    await self._create_if_none(auth, rtype, e.id, e.resource, e.if_none_exist)
                )
            return done(await self._create(auth, rtype, e.id, e.resource))
        if e.method == "PUT":
            return done(await self.update(auth, rtype, e.id, e.resource, if_match=e.if_match))
        if e.method == "DELETE":
            return done(await self.delete(auth, rtype, e.id, if_match=e.if_match))
        if e.interaction == "read":
            return done(await self.read(auth, rtype, e.id))
        if e.interaction == "vread":
            return done(await self.vread(auth, rtype, e.id, str(e.version)))
        if e.interaction == "search-type":
            return bundle_result(await self.search(auth, rtype, e.query))
        if e.interaction == "history-instance":
            return bundle_result(await self.history(auth, rtype, e.id))
        if e.interaction == "operation":
            op, rid = e.operation, e.url.split("?")[0].split("/")
            if rtype == "Patient" and op == "$everything" and len(rid) >= 3:
                return bundle_result(await self.everything(auth, rid[-2], e.query))
            if rtype == "Observation" and op == "$duplicate-check":
                return bundle_result(await self.duplicate_check(auth, e.query))
            if rtype == "AuditEvent" and op == "$proof" and len(rid) >= 3:
                return bundle_result(await self.audit_proof(auth, rid[-2]))
        raise _err(400, "not-supported", f"{e.method} {e.url} is not supported in a batch")


# ---------------------------------------------------------------------------------- import


@dataclass(slots=True)
class ImportReport:
    """What one ``medledger import`` run did."""

    path: str
    org: str
    sources: int = 0
    seen: int = 0  # resources read in this run
    created: int = 0
    existing: int = 0  # already imported (an earlier run); nothing written
    resumed: int = 0  # skipped without reading them again, thanks to the checkpoint
    skipped: dict[str, int] = field(default_factory=dict)  # types the API does not serve
    failed: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        """Resources created per second."""
        return self.created / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "org": self.org,
            "sources": self.sources,
            "seen": self.seen,
            "created": self.created,
            "existing": self.existing,
            "resumed": self.resumed,
            "skipped": dict(sorted(self.skipped.items())),
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "resources_per_second": round(self.rate, 1),
        }


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


#: files of a bulk export directory that are not resources (the export's own log)
_NOT_RESOURCES = frozenset({"log.ndjson"})


@dataclass(slots=True)
class _Item:
    """One resource to import: where it came from and its source identity."""

    where: str  # file:line or file#entry
    rtype: str
    source_id: str
    resource: dict[str, Any] | None
    error: str | None = None


@dataclass(slots=True)
class _Source:
    key: str  # path relative to the import root
    path: Path
    kind: str  # "ndjson" | "bundle"


def _import_ledger_id(index_key: bytes, source: str, rtype: str, source_id: str) -> str:
    """The deterministic ledger id of a source resource (see :class:`Importer`)."""
    digest = hmac.new(
        index_key, f"medledger/import/v1|{source}|{rtype}|{source_id}".encode(), "sha256"
    ).digest()
    if rtype == "Patient":
        return "pat-" + digest[:16].hex()
    return str(uuid.UUID(bytes=digest[:16], version=5))


def _import_reference(
    ref: str, urns: Mapping[str, tuple[str, str]], index_key: bytes, source: str
) -> str | None:
    """The reference a source reference is imported as (None: kept as it is)."""
    if ref.startswith("urn:") and ref in urns:
        rtype, sid = urns[ref]
        if rtype in RECORD_TYPES:
            return f"{rtype}/{_import_ledger_id(index_key, source, rtype, sid)}"
        return f"{rtype}/{sid}"
    parts = ref.split("/")
    if len(parts) == 2 and parts[0] in RECORD_TYPES and "?" not in ref:
        return f"{parts[0]}/{_import_ledger_id(index_key, source, parts[0], parts[1])}"
    return None


def _import_mapping(
    resource: Mapping[str, Any],
    urns: Mapping[str, tuple[str, str]],
    index_key: bytes,
    source: str,
) -> dict[str, str]:
    """Source references of ``resource`` -> the ledger ids they are imported under."""
    from medledger.fhir.index import iter_references

    out: dict[str, str] = {}
    for ref in iter_references(resource):
        if ref not in out:
            new = _import_reference(ref, urns, index_key, source)
            if new is not None:
                out[ref] = new
    return out


def _rewrite_import(value: Any, resolve: Callable[[str], str]) -> Any:
    """A copy of ``value`` with every ``Reference.reference`` replaced by ``resolve(ref)``.

    One pass (the same result as :func:`medledger.fhir.bundle.rewrite_references`
    with :func:`_import_mapping`).
    """
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                out[key] = resolve(item)
            elif isinstance(item, dict | list):
                out[key] = _rewrite_import(item, resolve)
            else:
                out[key] = item
        return out
    if isinstance(value, list):
        return [
            _rewrite_import(item, resolve) if isinstance(item, dict | list) else item
            for item in value
        ]
    return value


#: an import item ready to write: plaintext, patient, public category, search tokens,
#: codes (system|code), clinical date, local id (for a patient link)
_Ready = tuple[bytes, str, str | None, list[bytes], list[str], int | None, str]
#: or why it cannot be imported: (HTTP status, IssueType code, diagnostics)
_Refused = tuple[int, str, str]


def _prepare_import(
    jobs: Sequence[tuple[str, str, dict[str, Any]]],
    urns: Mapping[str, tuple[str, str]],
    index_key: bytes,
    source: str,
) -> list[_Ready | _Refused]:
    """Rewrite references, validate and index ``(type, ledger id, source resource)`` jobs.

    A pure function (no I/O), so the importer runs it in worker processes; the
    organisation's index key is the only secret it needs (for search tokens).
    """
    from medledger.fhir.index import extract
    from medledger.fhir.validate import parse_resource

    memo: dict[str, str] = {}

    def resolve(ref: str) -> str:
        new = memo.get(ref)
        if new is None:
            new = memo[ref] = _import_reference(ref, urns, index_key, source) or ref
        return new

    out: list[_Ready | _Refused] = []
    for rtype, rid, raw in jobs:
        try:
            resource = _rewrite_import(raw, resolve)
            resource["id"] = rid
            meta = resource.get("meta")
            if isinstance(meta, dict):
                meta = {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
                if meta:
                    resource["meta"] = meta
                else:
                    resource.pop("meta")
            resource = parse_resource(resource, rtype)
            ex = extract(resource)
            if rtype == "Patient":
                if not PATIENT_ID.fullmatch(rid):
                    raise _err(400, "value", "a Patient id is 'pat-' followed by 32 hex digits")
                patient = rid
            elif ex.patient is None:
                raise _err(
                    422,
                    "required",
                    f"{rtype} must reference its Patient (subject or patient)",
                    f"{rtype}.subject",
                )
            else:
                patient = ex.patient
            tokens = list(
                dict.fromkeys(
                    index_token(index_key, kind, "*" if system is None else system, value)
                    for kind, system, value in ex.terms()
                )
            )
            out.append(
                (
                    FhirService._plaintext(resource),
                    patient,
                    ex.public_category,
                    tokens,
                    ex.code_strings(),
                    ex.date,
                    FhirService._local_id(resource, patient),
                )
            )
        except FhirError as exc:
            out.append((exc.status, exc.code, str(exc)))
        except MedledgerError as exc:
            out.append((500, "exception", str(exc)))
    return out


def _init_worker(parent: int) -> None:
    """Set up an import worker: lower priority, and gone when the importing process is.

    Workers yield the CPU to the node's own threads (commits, the store). A pool's
    workers outlive a parent killed with SIGKILL (they wait on a queue whose pipe
    they hold themselves), so each one watches the importing process and exits
    with it.
    """
    with contextlib.suppress(OSError):
        os.nice(5)
    threading.Thread(
        target=_exit_with, args=(parent,), daemon=True, name="medledger-import-watch"
    ).start()


def _exit_with(parent: int) -> None:
    try:
        fd = os.pidfd_open(parent)
    except ProcessLookupError:
        os._exit(0)
    except OSError:  # no pidfd (old kernel): poll
        while True:
            time.sleep(0.5)
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(0)
            except OSError:
                pass
    select.select([fd], [], [])  # readable once the process has exited
    os._exit(0)


def _warm_worker() -> int:
    """Run in each new import worker (and before forking them): load what a chunk needs,
    the validation models of the types an import writes and the indexer, before the
    first chunk (models otherwise load on first use)."""
    from medledger.fhir.index import extract
    from medledger.fhir.validate import load_models, parse_resource

    load_models(RECORD_TYPES)
    with contextlib.suppress(FhirError):
        extract(parse_resource({"resourceType": "Patient", "id": "warm"}, "Patient"))
    return os.getpid()


def _import_error(exc: BaseException) -> FhirError:
    """The FHIR status of a failed import write (as the REST API would answer it)."""
    if isinstance(exc, FhirError):
        return exc
    if isinstance(exc, Conflict):
        return _err(409, "conflict", str(exc))
    if isinstance(exc, NotFoundError):
        if is_gone(exc):
            return _err(410, "deleted", str(exc))
        return _err(404, "not-found", str(exc))
    if isinstance(exc, TransactionRejected):
        return from_medledger_error(exc)
    return _err(500, "exception", str(exc))


def default_import_workers() -> int:
    """Worker processes an import uses by default: one per CPU (they run at a lower
    priority than the node's own threads, so they only take what those leave)."""
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class ImportWorkers:
    """Import worker processes started ahead of an :class:`Importer` (its ``pool``)."""

    pool: ProcessPoolExecutor
    count: int

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def fork_import_workers(workers: int | None = None) -> ImportWorkers | None:
    """Start import workers now by forking this process, if it runs a single thread.

    A forked worker starts with the validation models this process loads here
    first (those of :data:`RECORD_TYPES`), so it is ready at once, where a
    worker of the forkserver (the :class:`Importer`'s own way) waits for a fresh
    interpreter to load them again: seconds of CPU. Forking is safe only while
    no other thread runs (a lock held by another thread at the fork would stay
    held in the child for good), so this returns None when other threads run
    (also off Linux, and when no workers are wanted); call it early, e.g.
    before opening the node. Every worker is forked before this returns (the
    pool's own threads start after them). The caller shuts the workers down
    (:meth:`ImportWorkers.shutdown`) after the import.
    """
    count = default_import_workers() if workers is None else max(0, workers)
    # Linux only: elsewhere (macOS) system libraries are not fork-safe even then
    if count == 0 or threading.active_count() != 1 or not sys.platform.startswith("linux"):
        return None
    _warm_worker()  # here, once: every worker starts warm
    pool = ProcessPoolExecutor(
        max_workers=count,
        mp_context=mp.get_context("fork"),
        initializer=_init_worker,
        initargs=(os.getpid(),),
    )
    # the first submit forks every worker (a "fork" pool starts them all at once, in this
    # thread, before its management thread exists)
    for _ in range(count):
        pool.submit(_warm_worker)
    return ImportWorkers(pool, count)


@dataclass(slots=True)
class _Chunk:
    """A run of one source's items, imported as one batch."""

    source: int  # index into the loaded sources
    end: int  # position in the source's items after this chunk
    items: list[_Item]
    urns: Mapping[str, tuple[str, str]]
    patients_done: asyncio.Event = field(default_factory=asyncio.Event)
    #: its validation jobs are queued at the workers (the next chunk's queue behind them)
    dispatched: asyncio.Event = field(default_factory=asyncio.Event)
    done: bool = False


class Importer:
    """Loads FHIR Bulk Data NDJSON files and transaction/batch/collection Bundles for ``org``.

    * **Deterministic ids.** A resource's ledger id is derived from its source
      identity: ``HMAC-SHA256(org index key, "medledger/import/v1|source|type|id")``
      as a UUID (``pat-`` + 32 hex digits for a Patient). References between
      imported resources (``Patient/<id>``, ``urn:uuid:<fullUrl>``) are rewritten
      the same way, so a re-run maps every resource to the same record and skips
      what is already stored: importing twice changes nothing.
    * **Batches.** Resources are imported in chunks: validation and indexing run
      in worker processes (``workers``; 0: in this process), each chunk's new
      patients are registered in one batch of transactions, and its records are
      written with :meth:`RecordService.write_many` (one staging transaction,
      one ``record.register_batch`` transaction, one promotion transaction). A
      few chunks are in flight at once (``concurrency`` bounds the resources in
      flight), so validating one overlaps committing another, and the sources
      are read one by one while the first chunks are already being imported.
      Workers started ahead (``pool``, see :func:`fork_import_workers`) are
      used as they are; else the importer starts its own from the forkserver.
      Every record is written as "must not exist yet": a record another chunk
      (or an earlier run) already wrote is counted as existing, never written twice.
    * **Resumable.** Progress is checkpointed per file (resources done, in
      chunks, only ever past chunks that finished) in ``DIR/imports/``; a run
      after an interruption starts after the last completed chunk, and anything
      in flight at the interruption is either found stored (skipped) or finished
      by the record service's recovery.
    * Patients come first (their files, or their entries in a Bundle): every
      other resource needs its patient registered on the ledger, so a chunk
      writes its other resources only once the patients of every earlier chunk
      and its own are registered.
    * Types the API does not serve (Organization, Claim ...) are counted and skipped,
      and so is a bulk export's ``log.ndjson`` when a directory is imported.
    """

    CHUNK = 256  # resources per batch at most
    PIPELINE = 4  # batches in flight (``concurrency`` resources in all)

    def __init__(
        self,
        fhir: FhirService,
        org: str,
        *,
        state_dir: Path,
        source: str = "import",
        concurrency: int = 128,
        workers: int | None = None,
        pool: ImportWorkers | None = None,
        on_total: Callable[[int], None] | None = None,
        on_advance: Callable[[int], None] | None = None,
    ) -> None:
        if org not in fhir.orgs:
            raise _err(404, "not-found", f"this node does not serve organisation {org!r}")
        self.fhir = fhir
        self.org = org
        self.state_dir = state_dir
        self.source = source
        self.concurrency = max(1, concurrency)
        self.pipeline = min(self.PIPELINE, self.concurrency)
        self.chunk = max(1, min(self.CHUNK, self.concurrency // self.pipeline))
        if pool is not None:
            self.workers = pool.count
        else:
            self.workers = default_import_workers() if workers is None else max(0, workers)
        self.on_total = on_total
        self.on_advance = on_advance
        self._index_key = fhir.orgs[org].index_key
        self._given = pool
        self._pool: ProcessPoolExecutor | None = None
        self._warm: asyncio.Future[Any] | None = None

    # -- identities ---------------------------------------------------------------------
    def ledger_id(self, rtype: str, source_id: str) -> str:
        """The deterministic ledger id of a source resource."""
        return _import_ledger_id(self._index_key, self.source, rtype, source_id)

    def _mapping(
        self, resource: Mapping[str, Any], urns: Mapping[str, tuple[str, str]]
    ) -> dict[str, str]:
        return _import_mapping(resource, urns, self._index_key, self.source)

    # -- discovery ----------------------------------------------------------------------
    def _sources(self, path: Path) -> list[_Source]:
        def kind(p: Path) -> str | None:
            name = p.name.removesuffix(".gz")
            if name.endswith(".ndjson"):
                return "ndjson"
            return "bundle" if name.endswith(".json") else None

        if path.is_file():
            files, root = [path], path.parent
        elif path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and kind(p) is not None and p.name not in _NOT_RESOURCES
            )
            root = path
        else:
            raise _err(404, "not-found", f"{path} does not exist")
        out = [_Source(str(p.relative_to(root)), p, kind(p) or "bundle") for p in files]
        # patients first: every other resource needs its patient on the ledger
        out.sort(key=lambda s: (s.kind != "ndjson", not s.path.name.startswith("Patient"), s.key))
        return out

    def _checkpoint_file(self, path: Path) -> Path:
        ident = f"{path.resolve()}|{self.org}|{self.source}".encode()
        return self.state_dir / f"import-{hashlib.sha256(ident).hexdigest()[:20]}.json"

    def _load_checkpoint(self, file: Path) -> dict[str, Any]:
        try:
            doc = json.loads(file.read_text())
        except (OSError, ValueError):
            return {"sources": {}}
        return (
            doc
            if isinstance(doc, dict) and isinstance(doc.get("sources"), dict)
            else {"sources": {}}
        )

    def _save_checkpoint(self, file: Path, doc: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(file)

    # -- reading ------------------------------------------------------------------------
    @staticmethod
    def _ndjson_items(src: _Source) -> list[_Item]:
        from medledger.fhir.ndjson import NdjsonError, iter_ndjson

        items: list[_Item] = []
        start = 1
        while True:  # a bad line is reported and skipped; reading goes on after it
            try:
                for n, doc in iter_ndjson(src.path, start_line=start):
                    items.append(Importer._item(f"{src.key}:{n}", doc, None))
                return items
            except NdjsonError as exc:
                items.append(_Item(f"{src.key}:{exc.line}", "", "", None, exc.diagnostics))
                start = exc.line + 1
            except OSError as exc:
                items.append(_Item(src.key, "", "", None, str(exc)))
                return items

    @staticmethod
    def _item(where: str, doc: Any, fallback_id: str | None) -> _Item:
        if not isinstance(doc, dict) or not isinstance(doc.get("resourceType"), str):
            return _Item(where, "", "", None, "not a FHIR resource (no resourceType)")
        sid = doc.get("id")
        if not isinstance(sid, str) or not sid:
            if fallback_id is None:
                canon = dump_json(doc, sort_keys=True).encode()
                fallback_id = "sha256-" + hashlib.sha256(canon).hexdigest()
            sid = fallback_id
        return _Item(where, doc["resourceType"], sid, doc)

    @staticmethod
    def _bundle_items(src: _Source) -> tuple[list[_Item], dict[str, tuple[str, str]]]:
        from medledger.fhir.ndjson import iter_bundle_resources, read_json

        try:
            doc = read_json(src.path)
            if isinstance(doc, dict) and doc.get("resourceType") not in (None, "Bundle"):
                return [Importer._item(src.key, doc, None)], {}  # a single resource
            found = list(iter_bundle_resources(doc))
        except (OSError, FhirError) as exc:
            return [_Item(src.key, "", "", None, str(exc))], {}
        items: list[_Item] = []
        urns: dict[str, tuple[str, str]] = {}
        for entry in found:
            full = entry.full_url
            fallback = full.rsplit(":", 1)[-1].rsplit("/", 1)[-1] if full else None
            item = Importer._item(f"{src.key}#entry[{entry.position}]", entry.resource, fallback)
            items.append(item)
            if full and item.resource is not None:
                urns[full] = (item.rtype, item.source_id)
        return items, urns

    # -- worker processes ----------------------------------------------------------------
    def _start_pool(self) -> None:
        """Start the worker processes in the background (the first chunks run here meanwhile).

        The workers given as ``pool`` (see :func:`fork_import_workers`) are used
        as they are. Else ``forkserver``: workers fork from a clean server process
        (never from this process and its threads) and each loads the validation
        models of :data:`RECORD_TYPES` before its first chunk.
        """
        if self._given is not None:
            self._pool = self._given.pool
            self._warm = asyncio.get_running_loop().create_future()
            self._warm.set_result(None)
            return
        if self.workers == 0:
            return
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["medledger.services.fhir", "medledger.fhir.validate"])
        pool = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(os.getpid(),),
        )

        def warm() -> None:  # starting a forkserver process blocks: not on the event loop
            for f in [pool.submit(_warm_worker) for _ in range(self.workers)]:
                f.result()

        self._pool = pool
        self._warm = asyncio.ensure_future(asyncio.to_thread(warm))

    def _executor(self) -> Executor | None:
        """The worker pool once it is up (None: work in this process)."""
        warm = self._warm
        if self._pool is None or warm is None or not warm.done():
            return None
        if warm.cancelled() or warm.exception() is not None:
            self._pool = None  # could not start workers: carry on in this process
            return None
        return self._pool

    async def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if self._warm is not None:
            with contextlib.suppress(BaseException):
                await self._warm
            self._warm = None
        if pool is not None and (self._given is None or pool is not self._given.pool):
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)

    async def _prepare(
        self,
        todo: Sequence[tuple[_Item, str]],
        urns: Mapping[str, tuple[str, str]],
        queued: asyncio.Event | None = None,
    ) -> list[_Ready | _Refused]:
        """Validate and index ``todo`` (in the workers); ``queued`` is set once the jobs
        are queued there (or running here)."""
        from concurrent.futures.process import BrokenProcessPool

        jobs = [(it.rtype, rid, it.resource or {}) for it, rid in todo]
        if queued is not None:
            queued.set()  # set early; the jobs are queued below before anything awaits
        if not jobs:
            return []
        pool = self._executor()
        if pool is not None:
            parts = max(2 * self.workers, -(-len(jobs) // 64))
            size = -(-len(jobs) // parts)
            loop = asyncio.get_running_loop()
            try:
                done = await asyncio.gather(
                    *(
                        loop.run_in_executor(
                            pool,
                            _prepare_import,
                            jobs[k : k + size],
                            urns,
                            self._index_key,
                            self.source,
                        )
                        for k in range(0, len(jobs), size)
                    )
                )
            except BrokenProcessPool:
                self._pool = None  # a worker died: carry on in this process
            else:
                return [r for part in done for r in part]
        out: list[_Ready | _Refused] = []
        for k in range(0, len(jobs), 32):
            if k:
                await asyncio.sleep(0)  # let commits through
            out.extend(_prepare_import(jobs[k : k + 32], urns, self._index_key, self.source))
        return out

    # -- writing ------------------------------------------------------------------------
    @staticmethod
    def _fail(report: ImportReport, item: _Item, exc: BaseException) -> None:
        err = _import_error(exc)
        report.failed.append({"where": item.where, "status": err.status, "error": str(err)})

    async def _write(
        self,
        entries: Sequence[tuple[_Item, str, _Ready]],
        report: ImportReport,
        *,
        register: bool,
    ) -> None:
        """Register or link the entries' patients, then write the entries as one batch."""
        if not entries:
            return
        wanted: dict[str, tuple[bool, str | None]] = {}
        for _, _, ready in entries:
            wanted.setdefault(ready[1], (register, ready[6]))
        try:
            errors = await self.fhir._ensure_patients(self.org, wanted)
        except MedledgerError as exc:
            for item, _, _ in entries:
                self._fail(report, item, exc)
            return
        writes: list[RecordWrite] = []
        written: list[_Item] = []
        for item, rid, (plain, patient, category, tokens, codes, date, _) in entries:
            if patient in errors:
                self._fail(report, item, errors[patient])
                continue
            writes.append(
                RecordWrite(
                    item.rtype,
                    rid,
                    patient,
                    plain,
                    category,
                    tokens,
                    codes,
                    date,
                    expected_version=0,  # never a second version of an imported resource
                )
            )
            written.append(item)
        try:
            results = await self.fhir.records.write_many(
                self.org, writes, executor=self._executor(), decoded=False
            )
        except MedledgerError as exc:  # e.g. the ledger state could not be read: nothing written
            for item in written:
                self._fail(report, item, exc)
            return
        for item, result in zip(written, results, strict=True):
            if isinstance(result, StoredRecord):
                report.created += 1
            elif isinstance(result, Conflict) and "current" in result.details:
                report.existing += 1  # written meanwhile (same id twice in the data)
            else:
                self._fail(report, item, result)

    async def _import(
        self,
        items: Sequence[_Item],
        urns: Mapping[str, tuple[str, str]],
        report: ImportReport,
        gate: Callable[[], Awaitable[None]] | None = None,
        turn: tuple[Callable[[], Awaitable[None]], asyncio.Event] | None = None,
    ) -> None:
        """Import ``items``: patients first, then (after ``gate``) the other resources.

        ``turn``: what to wait for before queueing the validation jobs, and the
        event to set once they are queued (chunks queue theirs in chunk order, so
        the first chunk, whose patients every later chunk waits for, goes first).
        """
        pending: list[tuple[_Item, str]] = []
        seen: set[str] = set()
        again: list[_Item] = []  # the same id twice in this batch: after the first
        for item in items:
            if item.resource is None:
                self._fail(report, item, _err(400, "structure", item.error or "unreadable"))
            elif item.rtype not in RECORD_TYPES:
                report.skipped[item.rtype] = report.skipped.get(item.rtype, 0) + 1
            else:
                rid = self.ledger_id(item.rtype, item.source_id)
                if rid in seen:
                    again.append(item)
                else:
                    seen.add(rid)
                    pending.append((item, rid))
        try:
            stored = await self.fhir.store.latest_versions([rid for _, rid in pending])
        except MedledgerError as exc:
            for item, _ in pending:
                self._fail(report, item, exc)
            pending, again, stored = [], [], {}
        todo = [(item, rid) for item, rid in pending if rid not in stored]
        report.existing += len(pending) - len(todo)
        if turn is not None:
            await turn[0]()
        prepared = await self._prepare(todo, urns, None if turn is None else turn[1])
        ready: list[tuple[_Item, str, _Ready]] = []
        for (item, rid), got in zip(todo, prepared, strict=True):
            if len(got) == 3:
                status, code, text = got
                self._fail(report, item, FhirError(status, code, text))
            else:
                ready.append((item, rid, got))
        await self._write([r for r in ready if r[0].rtype == "Patient"], report, register=True)
        if gate is not None:
            await gate()
        await self._write([r for r in ready if r[0].rtype != "Patient"], report, register=False)
        if again:
            await self._import(again, urns, report)

    async def _run_chunk(self, chunk: _Chunk, prev: _Chunk | None, report: ImportReport) -> None:
        async def gate() -> None:  # the patients of every earlier batch are registered
            if prev is not None:
                await prev.patients_done.wait()
            chunk.patients_done.set()

        async def turn() -> None:  # the validation jobs of the batch before are queued
            if prev is not None:
                await prev.dispatched.wait()

        report.seen += len(chunk.items)
        try:
            await self._import(chunk.items, chunk.urns, report, gate, (turn, chunk.dispatched))
        finally:
            chunk.dispatched.set()
            chunk.patients_done.set()
        if self.on_advance is not None:
            self.on_advance(len(chunk.items))

    async def run(self, path: Path) -> ImportReport:
        """Import everything under ``path``; safe to repeat and to resume."""
        started = time.monotonic()
        report = ImportReport(str(path), self.org)
        self._start_pool()
        # The resources read are a large, long-lived and acyclic object graph: no cyclic
        # garbage collection while reading them, and none of them scanned again by the
        # full collections during the import (those pauses stop every thread of the
        # node). Undone when the run ends.
        thresholds = gc.get_threshold()
        gc.set_threshold(thresholds[0], thresholds[1], max(thresholds[2], 100))
        try:
            await self._run(path, report)
        finally:
            gc.set_threshold(*thresholds)
            gc.unfreeze()
            await self._stop_pool()
        report.seconds = time.monotonic() - started
        return report

    async def _run(self, path: Path, report: ImportReport) -> None:
        """Read the sources one by one and import their chunks as soon as they are read.

        Reading (JSON decoding, in this thread) overlaps the workers validating
        the first chunks instead of coming before them, and goes only as far
        ahead as the chunks in flight need. Chunks are imported in the order of
        the sources (patients first), ``pipeline`` at a time.
        """
        sources = self._sources(path)
        report.sources = len(sources)
        ck_file = self._checkpoint_file(path)
        checkpoint = self._load_checkpoint(ck_file)
        # file names can be PHI (Synthea names bundles after the patient): keep only hashes
        checkpoint.update({"org": self.org, "source": self.source})
        loaded: list[tuple[_Source, os.stat_result]] = []
        chunks: list[_Chunk] = []
        ready = asyncio.Condition()  # chunks were added, or reading ended
        reading = True
        total = 0

        def mark_done(n: int, done: int) -> None:
            src, stat = loaded[n]
            checkpoint["sources"][_key_hash(src.key)] = {
                "done": done,
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
            }

        flushed = 0  # chunks[:flushed] are finished and in the checkpoint
        next_chunk = 0

        def wanted() -> bool:  # read on while fewer chunks wait than run at once
            return len(chunks) - next_chunk < self.pipeline

        async def read() -> None:
            nonlocal reading, total
            # The resources read are a large, long-lived and acyclic object graph: no
            # cyclic garbage collection while reading them (see run()).
            enabled = gc.isenabled()
            gc.disable()
            try:
                for src in sources:
                    # just in time: reading holds up the event loop (and so the commits)
                    async with ready:
                        await ready.wait_for(wanted)
                    items, urns, done, stat = self._load(src, checkpoint)
                    n = len(loaded)
                    loaded.append((src, stat))
                    total += len(items)
                    report.resumed += done
                    if done and self.on_advance is not None:
                        self.on_advance(done)
                    if not items:
                        mark_done(n, 0)
                    for pos in range(done, len(items), self.chunk):
                        chunk_items = items[pos : pos + self.chunk]
                        chunks.append(_Chunk(n, pos + len(chunk_items), chunk_items, urns))
                    async with ready:
                        ready.notify_all()
            finally:
                if enabled:
                    gc.enable()
                gc.freeze()
                reading = False
                async with ready:
                    ready.notify_all()
            if self.on_total is not None:
                self.on_total(total)

        async def worker() -> None:
            nonlocal flushed, next_chunk

            def startable() -> bool:
                return next_chunk < len(chunks) or not reading

            while True:
                async with ready:
                    await ready.wait_for(startable)
                    if next_chunk >= len(chunks):
                        return
                    k = next_chunk
                    next_chunk += 1
                    ready.notify_all()  # the reader may read ahead
                await self._run_chunk(chunks[k], chunks[k - 1] if k else None, report)
                chunks[k].done = True
                advanced = False
                while flushed < len(chunks) and chunks[flushed].done:
                    mark_done(chunks[flushed].source, chunks[flushed].end)
                    flushed += 1
                    advanced = True
                if advanced:  # only past batches that finished: a resume redoes the rest
                    self._save_checkpoint(ck_file, checkpoint)

        async with asyncio.TaskGroup() as group:
            group.create_task(read())
            for _ in range(self.pipeline):
                group.create_task(worker())
        self._save_checkpoint(ck_file, checkpoint)

    def _load(
        self, src: _Source, checkpoint: dict[str, Any]
    ) -> tuple[list[_Item], dict[str, tuple[str, str]], int, os.stat_result]:
        """Read one source; with where the checkpoint says to resume it, and its stat."""
        urns: dict[str, tuple[str, str]] = {}
        if src.kind == "ndjson":
            items = self._ndjson_items(src)
        else:
            items, urns = self._bundle_items(src)
        # patients first inside a Bundle too; the order is fixed, so the checkpoint holds
        items.sort(key=lambda it: it.rtype != "Patient")
        stat = src.path.stat()
        mark = checkpoint["sources"].get(_key_hash(src.key)) or {}
        same = mark.get("size") == stat.st_size and mark.get("mtime_ns") == stat.st_mtime_ns
        done = int(mark.get("done", 0)) if same else 0
        return items, urns, min(done, len(items)), stat
