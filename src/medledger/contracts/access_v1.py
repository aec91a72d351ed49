"""Access-log contract, version 1: the audit trail of access decisions (AccessLogged).

The decision itself is :func:`medledger.contracts.access.decide` (pure, run by the
serving node); this contract records what was decided, following the IHE Basic
Audit Log Patterns (BALP) content for a consent decision.

Transactions
------------
``access.log`` (signed by the ``node`` of the serving org, ``org`` == signer's org)::

    {"request":        request id (unique per org),
     "actor":          principal id of who accessed,
     "org":            serving / acting org,
     "role":           role the actor acted in | null,
     "on_behalf":      app / client id the request came through | null,
     "patient":        patient id,
     "resource_types": [FHIR types], "records": [record ids],
     "purpose":        PurposeOfUse code, "action": consent action,
     "outcome":        "permit" | "deny",
     "consents":       [consent ids used], "rule": decision rule,
     "break_glass":    bool,
     "time":           ms, when the decision was made}

State keys owned
----------------
::

    audit/<patient>/<height:012d>/<tx id hex>   the entry + {"height", "tx", "by"}
    audit-req/<org>/<request id>                {"patient", "height"}   request ids are unique

A patient's feed is the prefix scan ``audit/<patient>/`` (oldest first).

Patients reading their own records
----------------------------------
A patient exercising the right of access (HIPAA 164.524) is logged like any
other reader: ``actor`` is the patient id, ``org`` the serving org (whose node
signs), ``role`` null, purpose usually ``PATRQT`` and ``rule`` ``"self"``. A
*permit* under rule ``self`` is accepted only when ``actor == patient``: a
patient may only be granted their own records.

``records`` lists at most :data:`MAX_RECORDS` ids (a search result page is one
access and is logged as one entry).
"""

from __future__ import annotations

from typing import Any

from medledger.contracts._common import (
    ACTIONS,
    FHIR_TYPES,
    MAX_LIST,
    PURPOSES,
    code_list,
    is_id,
    only_keys,
    req_id,
    req_int,
    require_kind,
)
from medledger.contracts.base import Effects, Env, Handler, require_absent, require_obj
from medledger.contracts.core import ROLES
from medledger.contracts.patients_v1 import k_patient
from medledger.errors import MalformedTransaction, Unauthorized
from medledger.ledger.tx import Transaction
from medledger.state.base import StateReader

__all__ = ["HANDLERS", "MAX_RECORDS", "RULES", "k_audit", "k_audit_prefix"]

#: decision rules (see medledger.contracts.access)
RULES = frozenset(
    {
        "invalid-request",
        "actor",
        "patient",
        "record",
        "shredded",
        "role",
        "custodian",
        "consent",
        "patient-rule",
        "default",
        "break-glass",
        "self",
    }
)
#: most record ids one entry may list
MAX_RECORDS = 1000
_FIELDS = {
    "request",
    "actor",
    "org",
    "role",
    "on_behalf",
    "patient",
    "resource_types",
    "records",
    "purpose",
    "action",
    "outcome",
    "consents",
    "rule",
    "break_glass",
    "time",
}


def k_audit(patient: str, height: int, tx_id: bytes) -> bytes:
    return f"audit/{patient}/{height:012d}/{tx_id.hex()}".encode()


def k_audit_prefix(patient: str) -> bytes:
    return f"audit/{patient}/".encode()


def k_audit_req(org: str, request: str) -> bytes:
    return f"audit-req/{org}/{request}".encode()


def _ids(value: Any, what: str, limit: int = MAX_LIST) -> list[str]:
    if not isinstance(value, list) or len(value) > limit or not all(is_id(v) for v in value):
        raise MalformedTransaction(f"{what} must be a list of at most {limit} ids")
    return list(value)


def access_log(state: StateReader, tx: Transaction, env: Env) -> Effects:
    require_kind(env.principal, {"node"}, "access.log")
    p = tx.payload
    only_keys(p, _FIELDS, "access.log")
    missing = _FIELDS - set(p)
    if missing:
        raise MalformedTransaction(f"access.log: missing field(s) {sorted(missing)}")
    org = req_id(p, "org")
    if org != env.principal["org"]:
        raise Unauthorized("access.log must be signed by the node of the serving org")
    request = req_id(p, "request", "request id")
    patient = req_id(p, "patient")
    entry = {
        "request": request,
        "actor": req_id(p, "actor"),
        "org": org,
        "role": p["role"],
        "on_behalf": p["on_behalf"],
        "patient": patient,
        "resource_types": code_list(p["resource_types"], FHIR_TYPES, "resource_types"),
        "records": _ids(p["records"], "records", MAX_RECORDS),
        "purpose": p["purpose"],
        "action": p["action"],
        "outcome": p["outcome"],
        "consents": _ids(p["consents"], "consents"),
        "rule": p["rule"],
        "break_glass": p["break_glass"],
        "time": req_int(p["time"], "time"),
    }
    if entry["role"] is not None and entry["role"] not in ROLES:
        raise MalformedTransaction("role must be a known role or null")
    if entry["on_behalf"] is not None and not is_id(entry["on_behalf"]):
        raise MalformedTransaction("on_behalf must be an id or null")
    if entry["purpose"] not in PURPOSES or entry["action"] not in ACTIONS:
        raise MalformedTransaction("unknown purpose or action")
    if entry["outcome"] not in ("permit", "deny") or entry["rule"] not in RULES:
        raise MalformedTransaction("outcome must be permit|deny and rule a decision rule")
    if not isinstance(entry["break_glass"], bool):
        raise MalformedTransaction("break_glass must be a bool")
    if entry["rule"] == "self" and entry["outcome"] == "permit" and entry["actor"] != patient:
        raise MalformedTransaction("a self-access permit must name the patient as the actor")
    require_obj(state, k_patient(patient), f"patient {patient}")
    require_absent(state, k_audit_req(org, request), f"audit entry for request {request}")
    fx = Effects()
    fx.put(
        k_audit(patient, env.height, env.tx_id),
        {**entry, "height": env.height, "tx": env.tx_id, "by": env.principal["id"]},
    )
    fx.put(k_audit_req(org, request), {"patient": patient, "height": env.height})
    fx.emit(
        "access.logged",
        patient=patient,
        request=request,
        outcome=entry["outcome"],
        break_glass=entry["break_glass"],
    )
    return fx


HANDLERS: dict[str, Handler] = {"access.log": access_log}
