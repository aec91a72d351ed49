"""Records contract, version 1: commitments to encrypted FHIR resources, versions, shredding.

The ledger never holds a record's content, only a commitment (salted SHA-256
of the ciphertext) and non-identifying metadata.

Transactions
------------
``record.register`` (signed by the custodian org's ``node`` or one of its
``practitioner``\\ s; the custodian is the signer's org)::

    {"record": id, "patient": patient id, "resource_type": FHIR R4 type,
     "commitment": 32 bytes, "version": int >= 1, "prev": 32 bytes | null,
     "category": code | absent, "code_commitment": 32 bytes | absent,
     "effective": ms | absent}

* version 1 creates the record (``prev`` must be null); version ``n > 1`` is an
  amendment: the record must exist, be held by the same custodian, not be
  shredded, and ``version == last + 1`` and ``prev == last commitment`` (patient
  and resource type cannot change).
* ``category`` is stored in clear only if it is one of the public FHIR category
  codes in :data:`PUBLIC_CATEGORIES` (any other value is refused).
* Clinical codes (LOINC/SNOMED) are PHI-adjacent (a code can reveal a
  diagnosis), so a plaintext ``code`` is refused: only ``code_commitment``,
  ``SHA-256(salt || code)`` computed by the custodian, is recorded. Matching on
  codes (e.g. duplicate tests) happens on the custodian side.
* Every registration evaluates the sharing rules (:func:`rules_v1.apply_rules`).

``record.register_batch`` (same signers; the custodian is the signer's org)::

    {"records": [record.register payload, ...]}     1 to MAX_BATCH entries

Registers many versions with one signature and one log leaf (bulk import).
Each entry is checked and applied exactly as a ``record.register`` with that
payload, in order, each seeing the writes of the entries before it (same
state keys, same rules evaluation, same events, concatenated in entry order).
All or nothing: the first refused entry refuses the whole transaction (same
error class, its position in the message and ``details["entry"]``) and
nothing is written.

``record.shred`` ``{"record"}`` (``node`` or ``admin`` of the custodian org): marks
the record ``shredded`` (the off-ledger ciphertext and keys are destroyed by the
custodian), keeps its commitments for audit, removes its grants.

State keys owned
----------------
::

    record/<id>                     {"id", "patient", "custodian", "resource_type", "category",
                                     "code_commitment", "effective", "version", "commitment",
                                     "status": "active"|"shredded", "by", "height"}
    recver/<id>/<version:08d>       {"commitment", "prev", "by", "height"}
    patrec/<patient>/<record>       {"custodian", "resource_type"}   a patient's records
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from medledger.contracts import rules_v1
from medledger.contracts._common import (
    FHIR_TYPES,
    only_keys,
    opt_bytes,
    req_bytes,
    req_id,
    req_int,
    require_kind,
)
from medledger.contracts.base import Effects, Env, Handler, get_obj, require_obj, scan_objs
from medledger.contracts.patients_v1 import k_patient
from medledger.errors import (
    Conflict,
    MalformedTransaction,
    NotFound,
    TransactionRejected,
    Unauthorized,
)
from medledger.ledger.tx import Transaction
from medledger.state.base import StateReader
from medledger.state.overlay import Overlay

__all__ = ["HANDLERS", "MAX_BATCH", "PUBLIC_CATEGORIES", "k_patrec", "k_record"]

#: entries of one ``record.register_batch`` at most
MAX_BATCH = 256

#: FHIR category codes that reveal nothing sensitive by themselves
#: (observation-category and diagnostic-service-section basics).
PUBLIC_CATEGORIES = frozenset(
    {"laboratory", "vital-signs", "imaging", "procedure", "exam", "therapy", "activity", "survey"}
)


def k_record(rid: str) -> bytes:
    return f"record/{rid}".encode()


def k_recver(rid: str, version: int) -> bytes:
    return f"recver/{rid}/{version:08d}".encode()


def k_patrec(patient: str, rid: str = "") -> bytes:
    return f"patrec/{patient}/{rid}".encode()


def record_register(state: StateReader, tx: Transaction, env: Env) -> Effects:
    require_kind(env.principal, {"node", "practitioner"}, "record.register")
    return _register(state, tx.payload, env)


def _register(state: StateReader, p: Mapping[str, Any], env: Env) -> Effects:
    """Check and derive one registration (``p``: a ``record.register`` payload)."""
    custodian = str(env.principal["org"])
    if "code" in p:
        raise MalformedTransaction("plaintext codes are not accepted: send code_commitment")
    only_keys(
        p,
        {
            "record",
            "patient",
            "resource_type",
            "commitment",
            "version",
            "prev",
            "category",
            "code_commitment",
            "effective",
        },
        "record.register",
    )
    rid = req_id(p, "record", "record id")
    patient_id = req_id(p, "patient")
    rtype = p.get("resource_type")
    if rtype not in FHIR_TYPES:
        raise MalformedTransaction(f"resource_type {rtype!r} is not a FHIR R4 resource type")
    commitment = req_bytes(p, "commitment", 32)
    version = req_int(p.get("version"), "version", minimum=1)
    prev = opt_bytes(p, "prev", 32)
    category = p.get("category")
    if category is not None and category not in PUBLIC_CATEGORIES:
        raise MalformedTransaction(
            f"category must be one of {sorted(PUBLIC_CATEGORIES)} (others are not recorded)"
        )
    code_commitment = opt_bytes(p, "code_commitment", 32)
    effective = p.get("effective")
    if effective is not None:
        req_int(effective, "effective")
    patient = require_obj(state, k_patient(patient_id), f"patient {patient_id}")
    if custodian not in patient["orgs"]:
        raise Unauthorized(f"organisation {custodian} has no link to patient {patient_id}")
    existing = get_obj(state, k_record(rid))
    if version == 1:
        if existing is not None:
            raise Conflict(f"record {rid} already exists (at version {existing['version']})")
        if prev is not None:
            raise MalformedTransaction("version 1 has no prev")
    else:
        if existing is None:
            raise NotFound(f"record {rid} not found")
        if existing["custodian"] != custodian:
            raise Unauthorized(f"record {rid} is held by {existing['custodian']}")
        if existing["status"] == "shredded":
            raise Conflict(f"record {rid} is shredded")
        if version != existing["version"] + 1:
            nxt = existing["version"] + 1
            raise Conflict(f"record {rid} is at version {nxt - 1}; the next version is {nxt}")
        if prev != existing["commitment"]:
            raise Conflict("prev does not match the commitment of the last version")
        if existing["patient"] != patient_id or existing["resource_type"] != rtype:
            raise Conflict("an amendment cannot change the patient or resource type")
    record: dict[str, Any] = {
        "id": rid,
        "patient": patient_id,
        "custodian": custodian,
        "resource_type": rtype,
        "category": category,
        "code_commitment": code_commitment,
        "effective": effective,
        "version": version,
        "commitment": commitment,
        "status": "active",
        "by": env.principal["id"],
        "height": env.height,
    }
    fx = Effects()
    fx.put(k_record(rid), record)
    fx.put(
        k_recver(rid, version),
        {"commitment": commitment, "prev": prev, "by": env.principal["id"], "height": env.height},
    )
    fx.put(k_patrec(patient_id, rid), {"custodian": custodian, "resource_type": rtype})
    fx.emit("record.registered", record=rid, version=version, custodian=custodian)
    rules_v1.apply_rules(state, fx, record, patient, env.height)
    return fx


class _BatchState:
    """What an entry of a batch reads: the state before the batch plus the earlier entries'
    writes. Scans are remembered until a write lands under their prefix (every entry
    scans the same rule indexes)."""

    __slots__ = ("_overlay", "_scans")

    def __init__(self, base: StateReader) -> None:
        self._overlay = Overlay(base)
        #: (prefix, start, limit) -> result, grouped by the prefix's first path segment
        self._scans: dict[bytes, dict[tuple[bytes, bytes | None, int | None], list[Any]]] = {}

    @staticmethod
    def _group(key: bytes) -> bytes:
        head, sep, _ = key.partition(b"/")
        return head if sep else b""

    def get(self, key: bytes) -> bytes | None:
        return self._overlay.get(key)

    def scan(
        self, prefix: bytes, *, start: bytes | None = None, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        cached = self._scans.setdefault(self._group(prefix), {})
        found = cached.get((prefix, start, limit))
        if found is None:
            found = cached[(prefix, start, limit)] = list(
                self._overlay.scan(prefix, start=start, limit=limit)
            )
        return iter(found)

    def apply(self, writes: Mapping[bytes, bytes | None]) -> None:
        for key, value in writes.items():
            if value is None:
                self._overlay.delete(key)
            else:
                self._overlay.put(key, value)
            # a scan whose prefix has no "/" may cover any key; others only their segment
            for group in (self._group(key), b""):
                cached = self._scans.get(group)
                if cached:
                    for k in [k for k in cached if key.startswith(k[0])]:
                        del cached[k]


def record_register_batch(state: StateReader, tx: Transaction, env: Env) -> Effects:
    require_kind(env.principal, {"node", "practitioner"}, "record.register_batch")
    only_keys(tx.payload, {"records"}, "record.register_batch")
    entries = tx.payload.get("records")
    if not isinstance(entries, list) or not 0 < len(entries) <= MAX_BATCH:
        raise MalformedTransaction(f"records must be a list of 1 to {MAX_BATCH} registrations")
    view = _BatchState(state)
    fx = Effects()
    for n, entry in enumerate(entries):
        try:
            if not isinstance(entry, dict):
                raise MalformedTransaction("a registration must be a map")
            one = _register(view, entry, env)
        except TransactionRejected as exc:
            rid = entry.get("record") if isinstance(entry, dict) else None
            where = f"records[{n}]" + (f" ({rid})" if isinstance(rid, str) else "")
            raise type(exc)(f"{where}: {exc.message}", **{**exc.details, "entry": n}) from None
        view.apply(one.writes)
        fx.merge(one)
    return fx


def record_shred(state: StateReader, tx: Transaction, env: Env) -> Effects:
    require_kind(env.principal, {"node", "admin"}, "record.shred")
    only_keys(tx.payload, {"record"}, "record.shred")
    rid = req_id(tx.payload, "record", "record id")
    record = dict(require_obj(state, k_record(rid), f"record {rid}"))
    if record["custodian"] != env.principal["org"]:
        raise Unauthorized("only the custodian may shred a record")
    if record["status"] == "shredded":
        raise Conflict(f"record {rid} is already shredded")
    record["status"] = "shredded"
    record["shredded_at"] = env.height
    fx = Effects()
    fx.put(k_record(rid), record)
    for key, _ in scan_objs(state, rules_v1.k_grant_prefix(rid)):
        fx.delete(key)
    fx.emit("record.shredded", record=rid, by=env.principal["id"])
    return fx


def get_record(state: StateReader, rid: str) -> dict[str, Any] | None:
    value = get_obj(state, k_record(rid))
    return None if value is None else dict(value)


HANDLERS: dict[str, Handler] = {
    "record.register": record_register,
    "record.register_batch": record_register_batch,
    "record.shred": record_shred,
}
