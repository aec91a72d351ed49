"""Sharing-rules contract, version 1: CEL rules that grant access to matching records.

Transactions
------------
``rule.register``::

    {"id", "owner", "expression": CEL source, "grantee": {"kind": "org"|"practitioner", "id"}}

``owner`` is either a patient id (the signer must be that patient: the rule
covers that patient's records) or an org id (the signer must be an ``admin`` of
that org: the rule covers the records that org holds as custodian). The
expression is parsed, type-checked and statically cost-bounded by
:func:`medledger.contracts.cel_rules.check_rule`; any failure is a
:class:`~medledger.errors.RuleError` and nothing is written.

``rule.remove`` ``{"id"}``: same authority as registration; existing grants stay
(they are bound to record versions already registered) until the record is
amended or shredded.

Semantics
---------
Rules are evaluated by ``record.register`` on every version (see
:func:`apply_rules`). A rule that evaluates to ``true`` writes
``grant/<record>/<kind>:<grantee>``; ``false`` deletes a grant that rule wrote
earlier. A runtime error in one rule yields no grant and a ``rule.error`` event,
never a rejected transaction.

* A **patient** rule acts as consent: its grant permits the grantee to access
  that record for TREAT/ETREAT (a consent *deny* still wins; see
  :mod:`medledger.contracts.access`).
* An **org** rule only marks the record for proactive key wrapping to the
  grantee (so the data is ready to decrypt); the grantee still needs a consent
  permit when it reads.

State keys owned
----------------
::

    rule/<id>                             {"id", "owner", "owner_kind": "patient"|"org",
                                           "expression", "grantee", "by", "height"}
    rule-by/<patient|org>/<owner>/<id>    {}   index: the rules covering an owner's records
    grant/<record>/<org|practitioner>:<id> {"record", "rule", "basis": "patient"|"org",
                                           "grantee", "version", "height"}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medledger.contracts import cel_rules
from medledger.contracts._common import is_id, only_keys, principal, req_id
from medledger.contracts.base import (
    Effects,
    Env,
    Handler,
    get_obj,
    require_absent,
    require_obj,
    scan_objs,
)
from medledger.contracts.core import k_org
from medledger.contracts.patients_v1 import k_patient
from medledger.errors import MalformedTransaction, NotFound, RuleError, Unauthorized
from medledger.ledger.tx import Transaction
from medledger.state.base import StateReader

__all__ = ["HANDLERS", "apply_rules", "k_grant", "k_grant_prefix"]

GRANTEE_KINDS = frozenset({"org", "practitioner"})


def k_rule(rid: str) -> bytes:
    return f"rule/{rid}".encode()


def k_rule_by(owner_kind: str, owner: str, rid: str = "") -> bytes:
    return f"rule-by/{owner_kind}/{owner}/{rid}".encode()


def k_grant(record: str, kind: str, grantee: str) -> bytes:
    return f"grant/{record}/{kind}:{grantee}".encode()


def k_grant_prefix(record: str) -> bytes:
    return f"grant/{record}/".encode()


def _owner_kind(state: StateReader, signer: Mapping[str, Any], owner: str) -> str:
    if signer.get("kind") == "patient" and signer.get("id") == owner:
        return "patient"
    if signer.get("kind") == "admin" and signer.get("org") == owner:
        return "org"
    raise Unauthorized(
        "a rule must be signed by the patient who owns it or an admin of the owning org"
    )


def rule_register(state: StateReader, tx: Transaction, env: Env) -> Effects:
    p = tx.payload
    only_keys(p, {"id", "owner", "expression", "grantee"}, "rule.register")
    rid = req_id(p, "id", "rule id")
    owner = req_id(p, "owner")
    grantee = p.get("grantee")
    if (
        not isinstance(grantee, dict)
        or set(grantee) != {"kind", "id"}
        or grantee["kind"] not in GRANTEE_KINDS
        or not is_id(grantee["id"])
    ):
        raise MalformedTransaction("grantee must be {kind: org|practitioner, id}")
    owner_kind = _owner_kind(state, env.principal, owner)
    compiled = cel_rules.check_rule(p.get("expression"))
    require_absent(state, k_rule(rid), f"rule {rid}")
    if grantee["kind"] == "org":
        if get_obj(state, k_org(grantee["id"])) is None:
            raise NotFound(f"organisation {grantee['id']} not found")
    else:
        target = principal(state, grantee["id"])
        if target is None or target["kind"] not in ("practitioner", "app"):
            raise NotFound(f"practitioner {grantee['id']} not found")
    if owner_kind == "patient":
        require_obj(state, k_patient(owner), f"patient {owner}")
    fx = Effects()
    fx.put(
        k_rule(rid),
        {
            "id": rid,
            "owner": owner,
            "owner_kind": owner_kind,
            "expression": compiled.source,
            "grantee": {"kind": grantee["kind"], "id": grantee["id"]},
            "by": env.principal["id"],
            "height": env.height,
        },
    )
    fx.put(k_rule_by(owner_kind, owner, rid), {})
    fx.emit("rule.registered", rule=rid, owner=owner, owner_kind=owner_kind, nodes=compiled.nodes)
    return fx


def rule_remove(state: StateReader, tx: Transaction, env: Env) -> Effects:
    only_keys(tx.payload, {"id"}, "rule.remove")
    rid = req_id(tx.payload, "id", "rule id")
    rule = require_obj(state, k_rule(rid), f"rule {rid}")
    _owner_kind(state, env.principal, rule["owner"])
    fx = Effects()
    fx.delete(k_rule(rid))
    fx.delete(k_rule_by(rule["owner_kind"], rule["owner"], rid))
    fx.emit("rule.removed", rule=rid)
    return fx


def apply_rules(
    state: StateReader,
    fx: Effects,
    record: Mapping[str, Any],
    patient: Mapping[str, Any],
    height: int,
) -> None:
    """Evaluate the rules covering ``record`` (its patient's and its custodian's).

    Deterministic: rules run in key order; errors become events, never exceptions.
    """
    variables = {
        "id": record["id"],
        "resource_type": record["resource_type"],
        "category": record.get("category") or "",
        "custodian": record["custodian"],
        "version": record["version"],
        "effective": record.get("effective") or 0,
    }
    pvars = {"id": patient["id"], "orgs": list(patient["orgs"])}
    owners = (("patient", record["patient"]), ("org", record["custodian"]))
    granted: set[bytes] = set()
    for owner_kind, owner in owners:
        for key, _ in list(scan_objs(state, k_rule_by(owner_kind, owner))):
            rid = key.decode().rsplit("/", 1)[1]
            rule = get_obj(state, k_rule(rid))
            if rule is None:  # pragma: no cover - index invariant
                continue
            grantee = rule["grantee"]
            gkey = k_grant(record["id"], grantee["kind"], grantee["id"])
            try:
                matched = cel_rules.evaluate(rule["expression"], variables, pvars)
            except RuleError as exc:
                fx.emit("rule.error", rule=rid, record=record["id"], error=exc.message[:200])
                continue
            if matched:
                granted.add(gkey)
                fx.put(
                    gkey,
                    {
                        "record": record["id"],
                        "rule": rid,
                        "basis": owner_kind,
                        "grantee": grantee,
                        "version": record["version"],
                        "height": height,
                    },
                )
                fx.emit("grant.created", rule=rid, record=record["id"], grantee=grantee)
            else:
                existing = get_obj(state, gkey)
                if existing is not None and existing["rule"] == rid and gkey not in granted:
                    fx.delete(gkey)
                    fx.emit("grant.removed", rule=rid, record=record["id"], grantee=grantee)


HANDLERS: dict[str, Handler] = {
    "rule.register": rule_register,
    "rule.remove": rule_remove,
}
