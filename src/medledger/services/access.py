"""Access decisions at the moment of a read, each recorded on the ledger.

The serving node decides on its own committed state, then records the
decision, permit or deny, as an ``access.log`` transaction signed by an
organisation's node key. The data may be released only after that
transaction is committed: a read that cannot be logged is refused.

Who decides what (:func:`decide_for`):

* practitioners and apps: :func:`medledger.contracts.access.decide` (role,
  custodian, consent, rules, break-glass); the entry's ``org`` is the org they
  act for;
* patients (HIPAA right of access): :func:`decide_self`, own records only; the
  entry's ``actor`` is the patient id and ``org`` the serving org, rule ``self``;
* backend system clients acting as their organisation's node:
  :func:`decide_system`, that organisation's own records only (rule ``custodian``).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from medledger.contracts import records_v1
from medledger.contracts.access import AccessRequest, Decision, TypeDecision, decide
from medledger.contracts.access_v1 import k_audit_prefix
from medledger.contracts.base import get_obj
from medledger.contracts.core import k_org, k_principal
from medledger.contracts.patients_v1 import k_patient
from medledger.crypto.signing import SigningKey
from medledger.encoding import decode
from medledger.errors import NotFoundError
from medledger.node import Node, Receipt
from medledger.services.submitter import Submitter
from medledger.state.base import StateReader

__all__ = [
    "AccessService",
    "combine_decisions",
    "decide_for",
    "decide_self",
    "decide_system",
    "decision_json",
]


def decision_json(decision: Decision) -> dict[str, Any]:
    doc = asdict(decision)
    doc["details"] = [asdict(d) for d in decision.details]
    return doc


def _uniform(req: AccessRequest, permit: bool, rule: str, reason: str) -> Decision:
    """The same outcome for every requested type."""
    types = tuple(dict.fromkeys(req.resource_types))
    details = tuple(TypeDecision(t, permit, rule, reason, ()) for t in types)
    permitted = types if permit else ()
    denied = () if permit else types
    return Decision(permit and bool(types), permitted, denied, rule, reason, (), False, details)


def _record_check(state: StateReader, req: AccessRequest) -> Decision | None:
    """Deny when the patient or the named record is unknown, foreign or shredded."""
    if get_obj(state, k_patient(req.patient)) is None:
        return _uniform(req, False, "patient", "unknown patient")
    if req.record is not None:
        record = records_v1.get_record(state, req.record)
        if record is None or record["patient"] != req.patient:
            return _uniform(req, False, "record", "unknown record")
        if record["status"] == "shredded":
            return _uniform(req, False, "shredded", "the record was shredded")
    return None


def decide_self(state: StateReader, request: AccessRequest) -> Decision:
    """A patient reading their own records (right of access): permit own records only.

    ``request.actor`` is the patient's principal id and ``request.org`` the
    serving organisation (it signs the log entry).
    """
    req = request
    if not req.resource_types:
        return _uniform(req, False, "invalid-request", "no resource type requested")
    actor = get_obj(state, k_principal(req.actor))
    if actor is None or actor.get("kind") != "patient" or actor.get("status") != "active":
        return _uniform(req, False, "actor", "unknown or suspended patient")
    if req.actor != req.patient:
        return _uniform(req, False, "self", "patients may read only their own records")
    denied = _record_check(state, req)
    if denied is not None:
        return denied
    return _uniform(req, True, "self", "a patient may read their own records")


def decide_system(state: StateReader, request: AccessRequest) -> Decision:
    """A backend system client acting as ``request.org``'s node: that org's own records only.

    Without ``request.record`` the decision permits, and the caller must release
    only records held by ``request.org``.
    """
    req = request
    if not req.resource_types:
        return _uniform(req, False, "invalid-request", "no resource type requested")
    org = get_obj(state, k_org(req.org))
    if org is None or org.get("status") != "active":
        return _uniform(req, False, "actor", "unknown or inactive organisation")
    denied = _record_check(state, req)
    if denied is not None:
        return denied
    if req.record is not None:
        record = records_v1.get_record(state, req.record)
        assert record is not None
        if record["custodian"] != req.org:
            reason = f"a system client of {req.org} may read only records {req.org} holds"
            return _uniform(req, False, "custodian", reason)
    return _uniform(req, True, "custodian", f"{req.org} reads its own records")


def decide_for(state: StateReader, request: AccessRequest, kind: str | None = None) -> Decision:
    """The decision for a caller of ``kind`` (``None``: the actor's principal kind)."""
    if kind is None:
        actor = get_obj(state, k_principal(request.actor))
        kind = "patient" if actor is not None and actor.get("kind") == "patient" else "practitioner"
    if kind == "patient":
        return decide_self(state, request)
    if kind == "system":
        return decide_system(state, request)
    return decide(state, request)


def combine_decisions(decisions: Sequence[Decision]) -> Decision:
    """One decision for a batch (a search): permits if any part permits."""
    if not decisions:
        raise ValueError("no decisions to combine")
    details = tuple(d for dec in decisions for d in dec.details)
    permitted = tuple(dict.fromkeys(t for d in decisions for t in d.permitted_types))
    denied = tuple(
        dict.fromkeys(t for d in decisions for t in d.denied_types if t not in permitted)
    )
    lead = next((d for d in decisions if d.permit), decisions[0])
    reasons = list(dict.fromkeys(d.reason for d in decisions))
    return Decision(
        permit=any(d.permit for d in decisions),
        permitted_types=permitted,
        denied_types=denied,
        rule=lead.rule,
        reason="; ".join(reasons),
        consents=tuple(sorted({c for d in decisions for c in d.consents})),
        break_glass=any(d.break_glass for d in decisions),
        details=details,
    )


class AccessService:
    def __init__(
        self, node: Node, submitter: Submitter, org_keys: Mapping[str, SigningKey]
    ) -> None:
        self.node = node
        self.submitter = submitter
        self.org_keys = dict(org_keys)

    async def actor_org(self, actor: str) -> tuple[str, list[str]]:
        """The organisation and roles of a practitioner or app principal."""

        def _get(state: StateReader) -> Any:
            return get_obj(state, k_principal(actor))

        principal = await self.node.read(_get)
        if principal is None or principal.get("org") is None:
            raise NotFoundError(f"no practitioner or app {actor!r} is registered")
        return principal["org"], list(principal.get("roles") or [])

    async def decide(self, request: AccessRequest, *, kind: str | None = None) -> Decision:
        """Decide on the committed state (``kind`` as in :func:`decide_for`)."""
        return await self.node.read(lambda state: decide_for(state, request, kind))

    async def log(
        self,
        request: AccessRequest,
        decision: Decision,
        *,
        on_behalf: str | None = None,
        records: Sequence[str] | None = None,
    ) -> Receipt:
        """Commit the ``access.log`` entry of a decision, signed by ``request.org``'s node."""
        key = self.org_keys.get(request.org)
        if key is None:
            raise NotFoundError(f"this node does not hold the node key of {request.org!r}")

        def _roles(state: StateReader) -> list[str]:
            principal = get_obj(state, k_principal(request.actor))
            if principal is None or principal.get("kind") not in ("practitioner", "app"):
                return []
            return list(principal.get("roles") or [])

        roles = await self.node.read(_roles)
        payload = {
            "request": "req-" + secrets.token_hex(12),
            "actor": request.actor,
            "org": request.org,
            "role": sorted(roles)[0] if roles else None,
            "on_behalf": on_behalf,
            "patient": request.patient,
            "resource_types": list(dict.fromkeys(request.resource_types)),
            "records": list(records or ([request.record] if request.record else [])),
            "purpose": request.purpose,
            "action": request.action,
            "outcome": "permit" if decision.permit else "deny",
            "consents": list(decision.consents),
            "rule": decision.rule,
            "break_glass": decision.break_glass,
            "time": request.time,
        }
        return await self.submitter.submit(key, "access.log", payload)

    async def decide_and_log(
        self,
        request: AccessRequest,
        *,
        on_behalf: str | None = None,
        records: list[str] | None = None,
        kind: str | None = None,
    ) -> tuple[Decision, Receipt]:
        """Decide now and commit the AccessLogged entry; returns both.

        A practitioner or app must be registered (:class:`NotFoundError`
        otherwise, nothing logged), as before; patients and system clients
        (``kind``) are decided by :func:`decide_for`.
        """
        if kind is None or kind in ("practitioner", "app"):
            actor = await self.node.read(lambda st: get_obj(st, k_principal(request.actor)))
            if actor is None or (actor.get("org") is None and actor.get("kind") != "patient"):
                raise NotFoundError(f"no practitioner or app {request.actor!r} is registered")
            if actor.get("kind") == "patient":
                kind = "patient"
        decision = await self.decide(request, kind=kind)
        receipt = await self.log(request, decision, on_behalf=on_behalf, records=records)
        return decision, receipt

    async def audit_feed(self, patient: str) -> list[dict[str, Any]]:
        """Every logged access decision about ``patient``, oldest first."""
        rows = await self.node.state_scan(k_audit_prefix(patient))
        out = []
        for _key, raw in rows:
            entry = decode(raw)
            out.append({k: (v.hex() if isinstance(v, bytes) else v) for k, v in entry.items()})
        return out
