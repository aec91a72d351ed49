"""Access decisions at the moment of a read, each recorded on the ledger.

The serving node decides with :func:`medledger.contracts.access.decide` on its
own committed state, then records the decision, permit or deny, as an
``access.log`` transaction signed by its organisation's node key. The data may
be released only after that transaction is committed: a read that cannot be
logged is refused.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from medledger.contracts.access import AccessRequest, Decision, decide
from medledger.contracts.base import get_obj
from medledger.contracts.core import k_principal
from medledger.crypto.signing import SigningKey
from medledger.encoding import decode
from medledger.errors import NotFoundError
from medledger.node import Node, Receipt
from medledger.services.submitter import Submitter
from medledger.state.base import StateReader

__all__ = ["AccessService", "decision_json"]


def decision_json(decision: Decision) -> dict[str, Any]:
    doc = asdict(decision)
    doc["details"] = [asdict(d) for d in decision.details]
    return doc


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

    async def decide(self, request: AccessRequest) -> Decision:
        return await self.node.read(lambda state: decide(state, request))

    async def decide_and_log(
        self,
        request: AccessRequest,
        *,
        on_behalf: str | None = None,
        records: list[str] | None = None,
    ) -> tuple[Decision, Receipt]:
        """Decide now and commit the AccessLogged entry; returns both."""
        decision = await self.decide(request)
        key = self.org_keys.get(request.org)
        if key is None:
            raise NotFoundError(f"this node does not hold the node key of {request.org!r}")
        _, roles = await self.actor_org(request.actor)
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
        receipt = await self.submitter.submit(key, "access.log", payload)
        return decision, receipt

    async def audit_feed(self, patient: str) -> list[dict[str, Any]]:
        """Every logged access decision about ``patient``, oldest first."""
        rows = await self.node.state_scan(f"audit/{patient}/".encode())
        out = []
        for _key, raw in rows:
            entry = decode(raw)
            out.append({k: (v.hex() if isinstance(v, bytes) else v) for k, v in entry.items()})
        return out
