from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from medledger.contracts import MODULES, consent_v1, make_registry
from medledger.contracts.access import AccessRequest, decide
from medledger.contracts.base import Effects, Env
from medledger.contracts.breakglass_v1 import overdue_reviews
from medledger.errors import (
    Conflict,
    MalformedTransaction,
    NotFound,
    Unauthorized,
    UnknownTransactionType,
)
from medledger.ledger.tx import Transaction
from medledger.state.base import StateReader

from .conftest import Ledger

MIN = 60_000
HOUR = 60 * MIN


def _bg(pid: str, **extra: Any) -> dict[str, Any]:
    return {
        "patient": pid,
        "reason": "unresponsive, no history available",
        "resource_types": [],
        **extra,
    }


def test_break_glass_window_and_reviews() -> None:
    led = Ledger(("h1", "h2"), policy={"break_glass_minutes": 30, "break_glass_review_hours": 24})
    led.practitioner("h2", "er", ["emergency-clinician"])
    led.practitioner("h2", "nurse", ["nurse"])
    led.practitioner("h2", "po", ["privacy-officer"])
    led.practitioner("h1", "po-h1", ["privacy-officer"])
    pid = led.patient("h1")
    # who may declare
    led.reject(Unauthorized, "nurse", "breakglass.declare", _bg(pid))
    led.reject(Unauthorized, "node:h2", "breakglass.declare", _bg(pid, actor="nurse"))
    led.reject(Unauthorized, "node:h1", "breakglass.declare", _bg(pid, actor="er"))
    led.reject(MalformedTransaction, "er", "breakglass.declare", _bg(pid, reason=""))
    led.reject(MalformedTransaction, "er", "breakglass.declare", _bg(pid, reason="x" * 501))
    led.reject(NotFound, "er", "breakglass.declare", _bg("pat-" + "f" * 32))
    fx = led.submit("er", "breakglass.declare", _bg(pid, resource_types=["Observation"]))
    bid = led.last_tx_id.hex()
    declared = led.time
    assert fx.events[0]["event"] == "breakglass.declared"
    assert led.get(f"bg/{pid}/{bid}")["until"] == declared + 30 * MIN

    def req(t: int, rtype: str = "Observation", bg: bool = True) -> Any:
        return decide(
            led.state, AccessRequest("er", "h2", pid, (rtype,), "ETREAT", t, break_glass=bg)
        )

    assert req(declared).rule == "break-glass" and req(declared).break_glass
    assert req(declared + 30 * MIN - 1).permit
    assert not req(declared + 30 * MIN).permit  # window closed
    assert not req(declared - 1).permit  # not before the declaration
    assert not req(declared, "Condition").permit  # outside the declared types
    assert not req(declared, bg=False).permit  # must be asked for
    # the node may declare on behalf of its clinician
    led.submit("node:h2", "breakglass.declare", _bg(pid, actor="er"))
    second = led.last_tx_id.hex()
    # reviews: privacy officer of the same org only, once
    deadline = declared + 24 * HOUR
    assert overdue_reviews(led.state, deadline) == []
    assert [r["id"] for r in overdue_reviews(led.state, deadline + 1)] == [bid]
    led.reject(Unauthorized, "po-h1", "breakglass.review", {"id": bid, "outcome": "justified"})
    led.reject(Unauthorized, "nurse", "breakglass.review", {"id": bid, "outcome": "justified"})
    led.reject(MalformedTransaction, "po", "breakglass.review", {"id": bid, "outcome": "fine"})
    led.submit(
        "po", "breakglass.review", {"id": bid, "outcome": "justified", "note": "cardiac arrest"}
    )
    led.reject(Conflict, "po", "breakglass.review", {"id": bid, "outcome": "unjustified"})
    assert [r["id"] for r in overdue_reviews(led.state, deadline + 10 * HOUR)] == [second]
    assert led.get(f"review/{bid}")["reviewer"] == "po"


def _referral(
    pid: str, to: dict[str, str], t: int, types: list[str] | None = None
) -> dict[str, Any]:
    return {
        "patient": pid,
        "to": to,
        "resource_types": types or ["Observation"],
        "period": [None, t],
    }


@pytest.mark.parametrize("consent_allows", [False, True])
def test_referrals_need_consent_for_referred(consent_allows: bool) -> None:
    led = Ledger(("h1", "h2", "h3"))
    led.practitioner("h1", "gp", ["physician"])
    led.practitioner("h2", "cardio", ["physician"])
    led.practitioner("h3", "stranger", ["physician"])
    pid = led.patient("h1")
    led.record("h1", pid, "ecg", "Observation")
    end = led.time + 10 * HOUR
    if consent_allows:
        led.consent(
            pid,
            {
                "id": "ref-ok",
                "patient": pid,
                "provision": {
                    "type": "permit",
                    "actors": [{"kind": "referred"}],
                    "purposes": ["TREAT"],
                },
            },
        )
    # no treating relationship: h3 holds no record and has no permit
    led.reject(
        Unauthorized,
        "stranger",
        "referral.create",
        _referral(pid, {"kind": "org", "id": "h2"}, end),
    )
    led.reject(
        NotFound,
        "gp",
        "referral.create",
        _referral(pid, {"kind": "practitioner", "id": "ghost"}, end),
    )
    led.reject(
        MalformedTransaction,
        "gp",
        "referral.create",
        {**_referral(pid, {"kind": "org", "id": "h2"}, end), "period": [None, None]},
    )
    led.reject(
        Unauthorized, "node:h1", "referral.create", _referral(pid, {"kind": "org", "id": "h2"}, end)
    )

    def cardio(t: int, rtype: str = "Observation") -> Any:
        return decide(led.state, AccessRequest("cardio", "h2", pid, (rtype,), "TREAT", t))

    assert not cardio(led.time + 1).permit
    led.submit("gp", "referral.create", _referral(pid, {"kind": "org", "id": "h2"}, end))
    rid = led.last_tx_id.hex()
    t = led.time + 1
    assert cardio(t).permit is consent_allows
    assert not cardio(t, "Condition").permit  # not in the referral
    assert not cardio(end).permit  # referral expired
    # the referred provider, once permitted, has a treating relationship and may refer on
    if consent_allows:
        led.submit(
            "cardio",
            "referral.create",
            _referral(pid, {"kind": "practitioner", "id": "stranger"}, end),
        )
    else:
        led.reject(
            Unauthorized,
            "cardio",
            "referral.create",
            _referral(pid, {"kind": "practitioner", "id": "stranger"}, end),
        )
    led.reject(Unauthorized, "stranger", "referral.cancel", {"patient": pid, "id": rid})
    led.submit(pid, "referral.cancel", {"patient": pid, "id": rid})
    led.reject(Conflict, "gp", "referral.cancel", {"patient": pid, "id": rid})
    assert not cardio(led.time + 1).permit


def _v2_grant(state: StateReader, tx: Transaction, env: Env) -> Effects:
    fx = Effects()
    fx.emit("consent.v2", height=env.height)
    return fx


def test_registry_activates_versions_by_height() -> None:
    fake_v2 = SimpleNamespace(HANDLERS={"consent.grant": _v2_grant})  # drops consent.revoke
    modules = {**MODULES, "consent": {1: consent_v1, 2: fake_v2}}
    led = Ledger(("h1",), contracts={"consent": [[0, 1], [5, 2]]}, modules=modules)  # type: ignore[dict-item]
    pid = led.patient("h1")  # height 1
    led.consent(pid, {"id": "c1", "patient": pid, "provision": {"type": "permit"}})  # height 2
    assert led.get(f"consent/{pid}/c1") is not None
    while led.height < 4:
        led.submit("admin-h1", "note.anchor", {"digest": bytes([led.height]) * 32})
    fx = led.submit(pid, "consent.grant", {"consent": {"id": "c2"}})  # height 5: v2
    assert fx.events == [{"event": "consent.v2", "height": 5}]
    with pytest.raises(UnknownTransactionType):
        led.submit(pid, "consent.revoke", {"id": "c1"})
    reg = make_registry({"contracts": {"consent": [[0, 1], [5, 2]]}}, modules)  # type: ignore[arg-type]
    assert "consent.revoke" in reg.known_types(4) and "consent.revoke" not in reg.known_types(5)
    with pytest.raises(ValueError):
        make_registry({"contracts": {"consent": [[0, 3]]}})
