"""Membership contract, version 1: organisations join and leave by majority; org staff.

Transactions
------------
``org.propose`` (signed by an ``admin`` or ``node`` of an active member)::

    {"action": "add", "org": {"id", "name", "node_key": 32 bytes, "enc_key": bytes,
                              "enc_alg": int}}
    {"action": "remove", "org": {"id"}}

The proposal id is the hex tx id of the proposal. The proposer's org counts as
the first approval.

``org.approve`` ``{"proposal": hex id}`` (``admin``/``node`` of an active member):
one approval per member org. As soon as the approvals *from currently active
member orgs* form a strict majority of the currently active member orgs
(``2 * approvals > members``) the proposal is applied: ``add`` writes the org and
registers its node principal ``node:<id>``; ``remove`` sets the org's status to
``removed`` (its principals can then sign nothing: see ``core.check_signer``).
The check also runs at proposal time, so a one-member network applies at once.

``principal.register`` (``admin`` of an org, for its own org)::

    {"id", "kind": "practitioner" | "app", "roles": [subset of core.ROLES except "admin"],
     "pub": 32 bytes}

``principal.suspend`` / ``principal.reinstate`` ``{"id"}`` (``admin`` of the same org;
targets practitioners, apps and other admins, never nodes or oneself).

State keys owned
----------------
::

    proposal/<tx id hex>   {"id", "action", "org", "by_org", "approvals": [org ids],
                            "status": "open"|"applied", "height", "applied_at"}
    org/<id>               written on an applied "add"; status set on "remove"
    principal/<pid>        practitioners/apps (via core.register_principal); status changes
"""

from __future__ import annotations

from typing import Any

from medledger.contracts._common import (
    is_id,
    only_keys,
    principal,
    req_bytes,
    req_id,
    req_int,
    require_kind,
)
from medledger.contracts.base import Effects, Env, Handler, get_obj, require_obj, scan_objs
from medledger.contracts.core import ROLES, k_org, k_principal, register_node, register_principal
from medledger.errors import Conflict, MalformedTransaction, NotFound, Unauthorized
from medledger.ledger.tx import Transaction
from medledger.state.base import StateReader

__all__ = ["HANDLERS", "active_members", "k_proposal"]

STAFF_KINDS = frozenset({"practitioner", "app"})
STAFF_ROLES = frozenset(r for r in ROLES if r != "admin")


def k_proposal(pid: str) -> bytes:
    return f"proposal/{pid}".encode()


def active_members(state: StateReader) -> list[str]:
    """Ids of the organisations whose status is ``active``, ascending."""
    return [org["id"] for _, org in scan_objs(state, b"org/") if org["status"] == "active"]


def _validate_org(action: Any, org: Any, state: StateReader) -> dict[str, Any]:
    if action not in ("add", "remove"):
        raise MalformedTransaction("action must be 'add' or 'remove'")
    if not isinstance(org, dict):
        raise MalformedTransaction("org must be a map")
    oid = req_id(org, "id", "org.id")
    if action == "remove":
        only_keys(org, {"id"}, "org")
        return {"id": oid}
    only_keys(org, {"id", "name", "node_key", "enc_key", "enc_alg"}, "org")
    name = org.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= 200:
        raise MalformedTransaction("org.name must be a non-empty string (at most 200 chars)")
    enc_key = org.get("enc_key")
    if not isinstance(enc_key, bytes) or not 0 < len(enc_key) <= 2048:
        raise MalformedTransaction("org.enc_key must be bytes")
    return {
        "id": oid,
        "name": name,
        "node_key": req_bytes(org, "node_key", 32),
        "enc_key": enc_key,
        "enc_alg": req_int(org.get("enc_alg"), "org.enc_alg", minimum=1),
    }


def _check_applicable(state: StateReader, action: str, org: dict[str, Any]) -> None:
    existing = get_obj(state, k_org(org["id"]))
    if action == "add":
        if existing is not None:
            raise Conflict(f"organisation {org['id']} already exists ({existing['status']})")
        if get_obj(state, k_principal(f"node:{org['id']}")) is not None:
            raise Conflict(f"principal node:{org['id']} already exists")
    else:
        if existing is None:
            raise NotFound(f"organisation {org['id']} not found")
        if existing["status"] != "active":
            raise Conflict(f"organisation {org['id']} is already {existing['status']}")


def _maybe_apply(
    state: StateReader, proposal: dict[str, Any], env: Env, fx: Effects
) -> dict[str, Any]:
    members = active_members(state)
    votes = [o for o in proposal["approvals"] if o in members]
    if 2 * len(votes) <= len(members):
        return proposal
    org = proposal["org"]
    if proposal["action"] == "add":
        fx.put(k_org(org["id"]), {**org, "status": "active", "since": env.height})
        register_node(fx, state, org, height=env.height)
    else:
        record = dict(require_obj(state, k_org(org["id"]), f"organisation {org['id']}"))
        record["status"] = "removed"
        record["removed_at"] = env.height
        fx.put(k_org(org["id"]), record)
    fx.emit("org.applied", proposal=proposal["id"], action=proposal["action"], org=org["id"])
    return {**proposal, "status": "applied", "applied_at": env.height}


def org_propose(state: StateReader, tx: Transaction, env: Env) -> Effects:
    require_kind(env.principal, {"admin", "node"}, "org.propose")
    only_keys(tx.payload, {"action", "org"}, "org.propose")
    action = tx.payload.get("action")
    org = _validate_org(action, tx.payload.get("org"), state)
    assert isinstance(action, str)
    _check_applicable(state, action, org)
    pid = env.tx_id.hex()
    proposal = {
        "id": pid,
        "action": action,
        "org": org,
        "by_org": env.principal["org"],
        "approvals": [env.principal["org"]],
        "status": "open",
        "height": env.height,
        "applied_at": None,
    }
    fx = Effects()
    fx.emit("org.proposed", proposal=pid, action=action, org=org["id"])
    fx.put(k_proposal(pid), _maybe_apply(state, proposal, env, fx))
    return fx


def org_approve(state: StateReader, tx: Transaction, env: Env) -> Effects:
    require_kind(env.principal, {"admin", "node"}, "org.approve")
    only_keys(tx.payload, {"proposal"}, "org.approve")
    pid = tx.payload.get("proposal")
    if not isinstance(pid, str) or len(pid) != 64:
        raise MalformedTransaction("proposal must be a 64-hex-digit proposal id")
    proposal = dict(require_obj(state, k_proposal(pid), f"proposal {pid}"))
    if proposal["status"] != "open":
        raise Conflict(f"proposal {pid} is already {proposal['status']}")
    voter = env.principal["org"]
    if voter in proposal["approvals"]:
        raise Conflict(f"organisation {voter} has already approved proposal {pid}")
    _check_applicable(state, proposal["action"], proposal["org"])
    proposal["approvals"] = sorted([*proposal["approvals"], voter])
    fx = Effects()
    fx.emit("org.approved", proposal=pid, by_org=voter)
    fx.put(k_proposal(pid), _maybe_apply(state, proposal, env, fx))
    return fx


def _require_admin(env: Env, action: str) -> str:
    require_kind(env.principal, {"admin"}, action)
    return str(env.principal["org"])


def principal_register(state: StateReader, tx: Transaction, env: Env) -> Effects:
    org = _require_admin(env, "principal.register")
    p = tx.payload
    only_keys(p, {"id", "kind", "roles", "pub"}, "principal.register")
    pid = req_id(p, "id", "principal id")
    if pid.startswith(("node:", "pat-")):
        raise MalformedTransaction("principal ids starting with 'node:' or 'pat-' are reserved")
    kind = p.get("kind")
    if kind not in STAFF_KINDS:
        raise MalformedTransaction(f"kind must be one of {sorted(STAFF_KINDS)}")
    roles = p.get("roles")
    if (
        not isinstance(roles, list)
        or not all(isinstance(r, str) and r in STAFF_ROLES for r in roles)
        or len(set(roles)) != len(roles)
    ):
        raise MalformedTransaction(f"roles must be distinct roles from {sorted(STAFF_ROLES)}")
    pub = req_bytes(p, "pub", 32)
    fx = Effects()
    register_principal(
        fx, state, pid=pid, kind=str(kind), org=org, roles=list(roles), pub=pub, height=env.height
    )
    fx.emit("principal.registered", principal=pid, kind=kind, org=org, roles=sorted(roles))
    return fx


def _set_status(state: StateReader, tx: Transaction, env: Env, want: str) -> Effects:
    action = "principal.suspend" if want == "suspended" else "principal.reinstate"
    org = _require_admin(env, action)
    only_keys(tx.payload, {"id"}, action)
    pid = tx.payload.get("id")
    if not is_id(pid):
        raise MalformedTransaction("id must be a principal id")
    assert isinstance(pid, str)
    target = principal(state, pid)
    if target is None:
        raise NotFound(f"principal {pid} not found")
    if target["org"] != org:
        raise Unauthorized(f"principal {pid} belongs to another organisation")
    if target["kind"] not in ("practitioner", "app", "admin") or pid == env.principal["id"]:
        raise Unauthorized(f"{action} cannot target principal {pid}")
    if target["status"] == want:
        raise Conflict(f"principal {pid} is already {want}")
    target["status"] = want
    fx = Effects()
    fx.put(k_principal(pid), target)
    event = "principal.suspended" if want == "suspended" else "principal.reinstated"
    fx.emit(event, principal=pid, by=env.principal["id"])
    return fx


def principal_suspend(state: StateReader, tx: Transaction, env: Env) -> Effects:
    return _set_status(state, tx, env, "suspended")


def principal_reinstate(state: StateReader, tx: Transaction, env: Env) -> Effects:
    return _set_status(state, tx, env, "active")


HANDLERS: dict[str, Handler] = {
    "org.propose": org_propose,
    "org.approve": org_approve,
    "principal.register": principal_register,
    "principal.suspend": principal_suspend,
    "principal.reinstate": principal_reinstate,
}
