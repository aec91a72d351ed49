"""Consent contract, version 1: FHIR Consent semantics for sharing a patient's data.

Transactions
------------
``consent.grant`` ``{"consent": {...}}`` where the consent is::

    {
      "id":        consent id (unique on the network),
      "patient":   pseudonymous patient id,
      "period":    [start_ms | null, end_ms | null]   validity, half-open start <= t < end
      "policy":    "opt-in" | "opt-out"   optional, informational (FHIR policyRule)
      "provision": provision
    }

    provision = {
      "type":           "permit" | "deny",                        required
      "actors":         [{"kind": "org"|"practitioner"|"role"|"referred", "id": str}],
      "actions":        ["access"|"collect"|"use"|"disclose"|"correct"],
      "purposes":       [PurposeOfUse codes, e.g. "TREAT", "ETREAT", "HRESCH"],
      "resource_types": [FHIR R4 resource types],
      "data_period":    [start_ms | null, end_ms | null],   on the record's effective time
      "provisions":     [nested provisions, same shape]
    }

An absent or empty list means *any* (no restriction on that dimension). An
``actor`` of kind ``referred`` matches any actor holding an active referral for
the patient (its ``id`` is ignored and may be omitted). Nested provisions refine
(and override) their parent; nesting depth is at most :data:`MAX_DEPTH` (the
root provision is depth 1) and a consent holds at most :data:`MAX_PROVISIONS`
provisions. How consents are combined into a decision is documented in
:mod:`medledger.contracts.access`.

``consent.revoke`` ``{"id": consent id}``: sets the consent's status to ``revoked``.

Only the patient themself (principal kind ``patient`` with id == consent.patient)
or a representative registered for that patient may grant or revoke a consent.

State keys owned
----------------
::

    consent/<patient>/<id>   {"id", "patient", "period", "policy", "provision",
                              "status": "active"|"revoked", "by", "height", "revoked_at"}
    consent-id/<id>          {"patient"}   index for revocation by id
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medledger.contracts._common import (
    ACTIONS,
    FHIR_TYPES,
    MAX_LIST,
    PURPOSES,
    code_list,
    is_id,
    only_keys,
    period,
    req_id,
)
from medledger.contracts.base import Effects, Env, Handler, get_obj, require_absent, require_obj
from medledger.contracts.core import ROLES
from medledger.contracts.patients_v1 import is_representative, k_patient
from medledger.errors import Conflict, MalformedTransaction, Unauthorized
from medledger.ledger.tx import Transaction
from medledger.state.base import StateReader

__all__ = ["HANDLERS", "MAX_DEPTH", "k_consent", "k_consent_id", "validate_consent"]

MAX_DEPTH = 4
MAX_PROVISIONS = 64
ACTOR_KINDS = frozenset({"org", "practitioner", "role", "referred"})
POLICIES = frozenset({"opt-in", "opt-out"})
_PROVISION_KEYS = {
    "type",
    "actors",
    "actions",
    "purposes",
    "resource_types",
    "data_period",
    "provisions",
}


def k_consent(patient: str, cid: str) -> bytes:
    return f"consent/{patient}/{cid}".encode()


def k_consent_prefix(patient: str) -> bytes:
    return f"consent/{patient}/".encode()


def k_consent_id(cid: str) -> bytes:
    return f"consent-id/{cid}".encode()


def _actors(value: Any, where: str) -> list[dict[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise MalformedTransaction(f"{where}.actors must be a list of at most {MAX_LIST}")
    out: list[dict[str, str]] = []
    for i, actor in enumerate(value):
        if not isinstance(actor, dict) or actor.get("kind") not in ACTOR_KINDS:
            raise MalformedTransaction(
                f"{where}.actors[{i}] must be {{kind, id}} with kind in {sorted(ACTOR_KINDS)}"
            )
        only_keys(actor, {"kind", "id"}, f"{where}.actors[{i}]")
        kind = actor["kind"]
        if kind == "referred":
            entry = {"kind": "referred", "id": ""}
            if actor.get("id") not in (None, "", "*"):
                raise MalformedTransaction(f"{where}.actors[{i}]: a referred actor has no id")
        else:
            if not is_id(actor.get("id")):
                raise MalformedTransaction(f"{where}.actors[{i}].id must be an id")
            entry = {"kind": kind, "id": actor["id"]}
            if kind == "role":
                if entry["id"] not in ROLES:
                    raise MalformedTransaction(f"{where}.actors[{i}]: unknown role {entry['id']!r}")
        if entry in out:
            raise MalformedTransaction(f"{where}.actors[{i}] is a duplicate")
        out.append(entry)
    return sorted(out, key=lambda a: (a["kind"], a["id"]))


def _provision(value: Any, where: str, depth: int, counter: list[int]) -> dict[str, Any]:
    if depth > MAX_DEPTH:
        raise MalformedTransaction(f"{where}: provisions nest deeper than {MAX_DEPTH} levels")
    counter[0] += 1
    if counter[0] > MAX_PROVISIONS:
        raise MalformedTransaction(f"a consent holds at most {MAX_PROVISIONS} provisions")
    if not isinstance(value, dict):
        raise MalformedTransaction(f"{where} must be a map")
    only_keys(value, _PROVISION_KEYS, where)
    if value.get("type") not in ("permit", "deny"):
        raise MalformedTransaction(f"{where}.type must be 'permit' or 'deny'")
    children = value.get("provisions") or []
    if not isinstance(children, list):
        raise MalformedTransaction(f"{where}.provisions must be a list")
    return {
        "type": value["type"],
        "actors": _actors(value.get("actors"), where),
        "actions": code_list(value.get("actions"), ACTIONS, f"{where}.actions"),
        "purposes": code_list(value.get("purposes"), PURPOSES, f"{where}.purposes"),
        "resource_types": code_list(
            value.get("resource_types"), FHIR_TYPES, f"{where}.resource_types"
        ),
        "data_period": period(value.get("data_period"), f"{where}.data_period"),
        "provisions": [
            _provision(child, f"{where}.provisions[{i}]", depth + 1, counter)
            for i, child in enumerate(children)
        ],
    }


def validate_consent(value: Any) -> dict[str, Any]:
    """Check a consent document and return its normalised form (sorted, defaults filled)."""
    if not isinstance(value, dict):
        raise MalformedTransaction("payload.consent must be a map")
    only_keys(value, {"id", "patient", "period", "policy", "provision"}, "consent")
    cid = req_id(value, "id", "consent.id")
    patient = req_id(value, "patient", "consent.patient")
    pol = value.get("policy")
    if pol is not None and pol not in POLICIES:
        raise MalformedTransaction(f"consent.policy must be one of {sorted(POLICIES)}")
    if "provision" not in value:
        raise MalformedTransaction("consent.provision is required")
    return {
        "id": cid,
        "patient": patient,
        "period": period(value.get("period"), "consent.period"),
        "policy": pol,
        "provision": _provision(value["provision"], "consent.provision", 1, [0]),
    }


def _require_patient_or_rep(state: StateReader, signer: Mapping[str, Any], patient: str) -> None:
    if signer.get("kind") == "patient" and signer.get("id") == patient:
        return
    if signer.get("kind") in ("representative", "patient") and is_representative(
        state, patient, str(signer.get("id"))
    ):
        return
    raise Unauthorized("consent must be signed by the patient or their representative")


def consent_grant(state: StateReader, tx: Transaction, env: Env) -> Effects:
    only_keys(tx.payload, {"consent"}, "consent.grant")
    consent = validate_consent(tx.payload.get("consent"))
    patient, cid = consent["patient"], consent["id"]
    require_obj(state, k_patient(patient), f"patient {patient}")
    _require_patient_or_rep(state, env.principal, patient)
    require_absent(state, k_consent_id(cid), f"consent {cid}")
    record = {
        **consent,
        "status": "active",
        "by": env.principal["id"],
        "height": env.height,
        "revoked_at": None,
    }
    fx = Effects()
    fx.put(k_consent(patient, cid), record)
    fx.put(k_consent_id(cid), {"patient": patient})
    fx.emit("consent.granted", consent=cid, patient=patient, by=env.principal["id"])
    return fx


def consent_revoke(state: StateReader, tx: Transaction, env: Env) -> Effects:
    only_keys(tx.payload, {"id"}, "consent.revoke")
    cid = req_id(tx.payload, "id", "consent id")
    index = require_obj(state, k_consent_id(cid), f"consent {cid}")
    patient = index["patient"]
    _require_patient_or_rep(state, env.principal, patient)
    record = dict(require_obj(state, k_consent(patient, cid), f"consent {cid}"))
    if record["status"] != "active":
        raise Conflict(f"consent {cid} is already {record['status']}")
    record["status"] = "revoked"
    record["revoked_at"] = env.height
    fx = Effects()
    fx.put(k_consent(patient, cid), record)
    fx.emit("consent.revoked", consent=cid, patient=patient, by=env.principal["id"])
    return fx


def get_consent(state: StateReader, cid: str) -> dict[str, Any] | None:
    index = get_obj(state, k_consent_id(cid))
    if index is None:
        return None
    value = get_obj(state, k_consent(index["patient"], cid))
    return None if value is None else dict(value)


HANDLERS: dict[str, Handler] = {
    "consent.grant": consent_grant,
    "consent.revoke": consent_revoke,
}
