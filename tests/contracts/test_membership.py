from __future__ import annotations

from typing import Any

import pytest

from medledger.contracts import core
from medledger.contracts.access import AccessRequest, decide
from medledger.crypto.signing import SigningKey
from medledger.errors import Conflict, MalformedTransaction, NotFound, Unauthorized, UnknownSigner

from .conftest import Ledger


def _new_org(led: Ledger, oid: str) -> dict[str, Any]:
    key = led.keys[f"node:{oid}"] = SigningKey.generate()
    return {
        "id": oid,
        "name": oid.upper(),
        "node_key": key.public.raw,
        "enc_key": b"e" * 32,
        "enc_alg": 2,
    }


def test_add_needs_strict_majority() -> None:
    led = Ledger(("h1", "h2", "h3", "h4"))
    led.submit("admin-h1", "org.propose", {"action": "add", "org": _new_org(led, "h5")})
    pid = led.last_tx_id.hex()
    assert led.get(f"proposal/{pid}")["approvals"] == ["h1"]
    led.submit("node:h2", "org.approve", {"proposal": pid})
    # 2 of 4 is not a strict majority
    assert led.get("org/h5") is None and led.get(f"proposal/{pid}")["status"] == "open"
    led.reject(Conflict, "admin-h2", "org.approve", {"proposal": pid})  # one vote per org
    led.submit("admin-h3", "org.approve", {"proposal": pid})
    assert led.get("org/h5")["status"] == "active"
    assert led.get(f"proposal/{pid}")["status"] == "applied"
    # the new org's node can sign at once
    led.submit(
        "node:h5",
        "patient.register",
        {
            "id": "pat-" + "ab" * 16,
            "links": [{"org": "h5", "commitment": b"c" * 32}],
            "claim": b"x" * 32,
        },
    )
    led.reject(Conflict, "admin-h4", "org.approve", {"proposal": pid})


def test_single_member_applies_at_once_and_duplicates_refused() -> None:
    led = Ledger(("h1",))
    led.submit("admin-h1", "org.propose", {"action": "add", "org": _new_org(led, "h2")})
    assert led.get("org/h2")["status"] == "active"
    assert led.get("principal/node:h2")["kind"] == "node"
    led.reject(Conflict, "admin-h1", "org.propose", {"action": "add", "org": _new_org(led, "h2")})


def test_remove_org_blocks_its_principals() -> None:
    led = Ledger(("h1", "h2", "h3"))
    led.practitioner("h3", "doc-h3", ["physician"])
    pat = led.patient("h1")
    led.consent(pat, {"id": "c", "patient": pat, "provision": {"type": "permit"}})
    req = AccessRequest("doc-h3", "h3", pat, ("Observation",), "TREAT", led.time + 1)
    assert decide(led.state, req).permit
    led.submit("node:h1", "org.propose", {"action": "remove", "org": {"id": "h3"}})
    pid = led.last_tx_id.hex()
    led.submit("admin-h2", "org.approve", {"proposal": pid})
    assert led.get("org/h3")["status"] == "removed"
    # a practitioner of a removed organisation: refused by core.check_signer
    led.reject(Unauthorized, "doc-h3", "referral.cancel", {"patient": pat, "id": "x"})
    led.reject(Unauthorized, "admin-h3", "org.propose", {"action": "remove", "org": {"id": "h1"}})
    assert not decide(led.state, req).permit
    assert decide(led.state, req).rule == "actor"


def test_malformed_proposals(ledger: Ledger) -> None:
    ledger.reject(
        MalformedTransaction, "admin-h1", "org.propose", {"action": "merge", "org": {"id": "x"}}
    )
    bad = _new_org(ledger, "h9")
    bad["node_key"] = b"short"
    ledger.reject(MalformedTransaction, "admin-h1", "org.propose", {"action": "add", "org": bad})
    ledger.reject(NotFound, "admin-h1", "org.propose", {"action": "remove", "org": {"id": "zz"}})
    ledger.practitioner("h1", "doc", ["physician"])
    ledger.reject(Unauthorized, "doc", "org.propose", {"action": "remove", "org": {"id": "h2"}})
    ledger.reject(NotFound, "admin-h1", "org.approve", {"proposal": "00" * 32})


def test_principal_register_suspend_reinstate(ledger: Ledger) -> None:
    ledger.practitioner("h1", "doc", ["physician", "emergency-clinician"])
    assert ledger.get("principal/doc")["roles"] == ["emergency-clinician", "physician"]
    pat = ledger.patient("h1")
    ledger.reject(Unauthorized, "admin-h2", "principal.suspend", {"id": "doc"})
    ledger.reject(Unauthorized, "doc", "principal.suspend", {"id": "doc"})
    ledger.submit("admin-h1", "principal.suspend", {"id": "doc"})
    ledger.reject(Conflict, "admin-h1", "principal.suspend", {"id": "doc"})
    # a suspended practitioner can sign nothing (core.check_signer)
    ledger.reject(
        Unauthorized,
        "doc",
        "breakglass.declare",
        {"patient": pat, "reason": "x", "resource_types": []},
    )
    req = AccessRequest("doc", "h1", pat, ("Observation",), "TREAT", ledger.time + 1)
    assert decide(ledger.state, req).reason.endswith("unknown or suspended actor")
    ledger.submit("admin-h1", "principal.reinstate", {"id": "doc"})
    ledger.submit(
        "doc", "breakglass.declare", {"patient": pat, "reason": "x", "resource_types": []}
    )


@pytest.mark.parametrize(
    "payload",
    [
        {"id": "x", "kind": "admin", "roles": [], "pub": b"p" * 32},
        {"id": "x", "kind": "practitioner", "roles": ["admin"], "pub": b"p" * 32},
        {"id": "x", "kind": "practitioner", "roles": ["surgeon"], "pub": b"p" * 32},
        {"id": "node:x", "kind": "practitioner", "roles": [], "pub": b"p" * 32},
        {"id": "x/y", "kind": "app", "roles": [], "pub": b"p" * 32},
    ],
)
def test_principal_register_validation(ledger: Ledger, payload: dict[str, Any]) -> None:
    ledger.reject(MalformedTransaction, "admin-h1", "principal.register", payload)


def test_only_admins_register_staff(ledger: Ledger) -> None:
    key = SigningKey.generate()
    payload = {"id": "x", "kind": "app", "roles": [], "pub": key.public.raw}
    ledger.reject(Unauthorized, "node:h1", "principal.register", payload)
    ledger.submit("admin-h1", "principal.register", payload)
    ledger.reject(Conflict, "admin-h2", "principal.register", payload)


def test_unknown_signer() -> None:
    led = Ledger(("h1",))
    led.keys["stranger"] = SigningKey.generate()
    led.reject(UnknownSigner, "stranger", "org.propose", {"action": "remove", "org": {"id": "h1"}})
    assert core.ROLES  # roles are the core list
