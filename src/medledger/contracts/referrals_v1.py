"""Referrals contract, version 1: a treating practitioner refers a patient to another provider.

Transactions
------------
``referral.create`` (signed by a ``practitioner``)::

    {"patient", "to": {"kind": "org"|"practitioner", "id"},
     "resource_types": [FHIR types] (1..64), "period": [start_ms | null, end_ms]}

The referral id is the tx id hex; ``period`` must have an end (referrals expire).
The signer must have a *treating relationship* with the patient, i.e. either

a. the signer's org is the custodian of a (non-shredded) record of the patient, or
b. :func:`medledger.contracts.access.decide` permits the signer every one of the
   referral's resource types for purpose ``TREAT`` at the block time (you cannot
   refer what you may not see).

A referral on its own grants nothing: the referred provider is permitted only
where a consent of the patient permits actor kind ``referred`` (see
:mod:`medledger.contracts.access`).

``referral.cancel`` ``{"patient", "id"}``: by the referring practitioner, an
``admin`` of the referring org, or the patient (or their representative).

State keys owned
----------------
::

    referral/<patient>/<id>   {"id", "patient", "from", "from_org", "to", "resource_types",
                               "period", "status": "active"|"cancelled", "height"}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medledger.contracts._common import (
    FHIR_TYPES,
    code_list,
    in_period,
    is_id,
    only_keys,
    period,
    principal,
    req_id,
)
from medledger.contracts.base import Effects, Env, Handler, get_obj, require_obj, scan_objs
from medledger.contracts.core import k_org
from medledger.contracts.patients_v1 import is_representative, k_patient
from medledger.errors import Conflict, MalformedTransaction, NotFound, Unauthorized
from medledger.ledger.tx import Transaction
from medledger.state.base import StateReader

__all__ = ["HANDLERS", "k_referral", "referral_covers", "treating_relationship"]


def k_referral(patient: str, rid: str = "") -> bytes:
    return f"referral/{patient}/{rid}".encode()


def referral_covers(
    state: StateReader, patient: str, actor: str, org: str, rtype: str, time: int
) -> list[str]:
    """Ids of the active referrals of ``patient`` to ``actor`` (or its org) covering ``rtype``."""
    out = []
    for _, ref in scan_objs(state, k_referral(patient)):
        to = ref["to"]
        if (
            ref["status"] == "active"
            and in_period(ref["period"], time)
            and rtype in ref["resource_types"]
            and (to["kind"], to["id"]) in (("org", org), ("practitioner", actor))
        ):
            out.append(ref["id"])
    return out


def treating_relationship(
    state: StateReader, actor: Mapping[str, Any], patient: str, types: list[str], time: int
) -> bool:
    """See the module docstring: custodian of a live record, or a TREAT permit for ``types``."""
    from medledger.contracts.access import AccessRequest, decide
    from medledger.contracts.records_v1 import get_record, k_patrec

    for key, entry in scan_objs(state, k_patrec(patient)):
        if entry["custodian"] == actor["org"]:
            rec = get_record(state, key.decode().rsplit("/", 1)[1])
            if rec is not None and rec["status"] == "active":
                return True
    decision = decide(
        state,
        AccessRequest(
            actor=str(actor["id"]),
            org=str(actor["org"]),
            patient=patient,
            resource_types=tuple(types),
            purpose="TREAT",
            time=time,
        ),
    )
    return not decision.denied_types and bool(decision.permitted_types)


def referral_create(state: StateReader, tx: Transaction, env: Env) -> Effects:
    p = tx.payload
    only_keys(p, {"patient", "to", "resource_types", "period"}, "referral.create")
    if env.principal["kind"] != "practitioner":
        raise Unauthorized("referrals are created by practitioners")
    patient = req_id(p, "patient")
    to = p.get("to")
    if (
        not isinstance(to, dict)
        or set(to) != {"kind", "id"}
        or to["kind"] not in ("org", "practitioner")
        or not is_id(to["id"])
    ):
        raise MalformedTransaction("to must be {kind: org|practitioner, id}")
    types = code_list(p.get("resource_types"), FHIR_TYPES, "resource_types")
    if not types:
        raise MalformedTransaction("a referral names at least one resource type")
    valid = period(p.get("period"), "period", require_end=True)
    require_obj(state, k_patient(patient), f"patient {patient}")
    if to["kind"] == "org":
        org = get_obj(state, k_org(to["id"]))
        if org is None or org["status"] != "active":
            raise NotFound(f"active organisation {to['id']} not found")
    else:
        target = principal(state, to["id"])
        if target is None or target["kind"] != "practitioner" or target["status"] != "active":
            raise NotFound(f"active practitioner {to['id']} not found")
    if not treating_relationship(state, env.principal, patient, types, env.time):
        raise Unauthorized("referrer has no treating relationship with the patient")
    rid = env.tx_id.hex()
    fx = Effects()
    fx.put(
        k_referral(patient, rid),
        {
            "id": rid,
            "patient": patient,
            "from": env.principal["id"],
            "from_org": env.principal["org"],
            "to": {"kind": to["kind"], "id": to["id"]},
            "resource_types": types,
            "period": valid,
            "status": "active",
            "height": env.height,
        },
    )
    fx.emit("referral.created", id=rid, patient=patient, to=to)
    return fx


def referral_cancel(state: StateReader, tx: Transaction, env: Env) -> Effects:
    only_keys(tx.payload, {"patient", "id"}, "referral.cancel")
    patient = req_id(tx.payload, "patient")
    rid = req_id(tx.payload, "id", "referral id")
    ref = dict(require_obj(state, k_referral(patient, rid), f"referral {rid}"))
    s = env.principal
    allowed = (
        s["id"] == ref["from"]
        or (s["kind"] == "admin" and s["org"] == ref["from_org"])
        or (s["kind"] == "patient" and s["id"] == patient)
        or is_representative(state, patient, str(s["id"]))
    )
    if not allowed:
        raise Unauthorized("only the referrer, its org admin or the patient may cancel a referral")
    if ref["status"] != "active":
        raise Conflict(f"referral {rid} is already {ref['status']}")
    ref["status"] = "cancelled"
    fx = Effects()
    fx.put(k_referral(patient, rid), ref)
    fx.emit("referral.cancelled", id=rid, patient=patient, by=s["id"])
    return fx


HANDLERS: dict[str, Handler] = {
    "referral.create": referral_create,
    "referral.cancel": referral_cancel,
}
