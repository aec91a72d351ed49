from __future__ import annotations

from typing import Any

import pytest

from medledger.contracts.access import AccessRequest, decide
from medledger.crypto.signing import SigningKey
from medledger.errors import Conflict, MalformedTransaction, NotFound, Unauthorized

from .conftest import Ledger


def _consent(pid: str, cid: str = "c1", **provision: Any) -> dict[str, Any]:
    return {
        "id": cid,
        "patient": pid,
        "period": [None, None],
        "provision": {"type": "permit", **provision},
    }


@pytest.mark.parametrize("forger", ["node:h1", "admin-h1", "doc", "other-patient"])
def test_forged_consent_is_unauthorized_and_changes_nothing(ledger: Ledger, forger: str) -> None:
    ledger.practitioner("h1", "doc", ["physician"])
    pid = ledger.patient("h1")
    other = ledger.patient("h1")
    ledger.keys["other-patient"] = ledger.keys[other]
    err = ledger.reject(Unauthorized, forger, "consent.grant", {"consent": _consent(pid)})
    assert str(err) == "consent must be signed by the patient or their representative"


def test_patient_and_representative_grant_and_revoke(ledger: Ledger) -> None:
    ledger.practitioner("h2", "doc", ["physician"])
    pid = ledger.patient("h1")
    rep_key = SigningKey.generate()
    ledger.keys["rep-1"] = rep_key
    ledger.submit(
        pid,
        "representative.register",
        {"patient": pid, "representative": "rep-1", "pub": rep_key.public.raw},
    )
    ledger.consent("rep-1", _consent(pid, "c-rep", actors=[{"kind": "org", "id": "h2"}]))
    assert ledger.get(f"consent/{pid}/c-rep")["by"] == "rep-1"
    req = AccessRequest("doc", "h2", pid, ("Observation",), "TREAT", ledger.time + 1)
    assert decide(ledger.state, req).permit
    # the patient revokes what the representative granted
    ledger.submit(pid, "consent.revoke", {"id": "c-rep"})
    assert ledger.get(f"consent/{pid}/c-rep")["status"] == "revoked"
    assert not decide(ledger.state, req).permit
    ledger.reject(Conflict, pid, "consent.revoke", {"id": "c-rep"})
    ledger.reject(NotFound, pid, "consent.revoke", {"id": "nope"})
    # once removed, the representative can no longer act
    ledger.submit(pid, "representative.remove", {"patient": pid, "representative": "rep-1"})
    ledger.reject(Unauthorized, "rep-1", "consent.grant", {"consent": _consent(pid, "c2")})


def test_duplicate_consent_id(ledger: Ledger) -> None:
    pid = ledger.patient()
    ledger.consent(pid, _consent(pid))
    ledger.reject(Conflict, pid, "consent.grant", {"consent": _consent(pid)})


def _deep(depth: int) -> dict[str, Any]:
    prov: dict[str, Any] = {"type": "deny"}
    for _ in range(depth - 1):
        prov = {"type": "permit", "provisions": [prov]}
    return prov


@pytest.mark.parametrize(
    "bad",
    [
        {"purposes": ["TREATMENT"]},
        {"actions": ["read"]},
        {"resource_types": ["Patients"]},
        {"actors": [{"kind": "nurse", "id": "x"}]},
        {"actors": [{"kind": "role", "id": "surgeon"}]},
        {"actors": [{"kind": "org"}]},
        {"data_period": [10, 5]},
        {"data_period": [1]},
        {"purposes": ["TREAT", "TREAT"]},
        {"type": "maybe"},
        {"extra": 1},
        {"provisions": [_deep(4)]},  # root + 4 = depth 5
    ],
)
def test_malformed_consents(ledger: Ledger, bad: dict[str, Any]) -> None:
    pid = ledger.patient()
    ledger.reject(MalformedTransaction, pid, "consent.grant", {"consent": _consent(pid, **bad)})


@pytest.mark.parametrize(
    "consent_patch",
    [{"period": [5, 5]}, {"period": [None]}, {"policy": "maybe"}, {"provision": None}],
)
def test_malformed_consent_envelope(ledger: Ledger, consent_patch: dict[str, Any]) -> None:
    pid = ledger.patient()
    c = {**_consent(pid), **consent_patch}
    ledger.reject(MalformedTransaction, pid, "consent.grant", {"consent": c})


def test_depth_four_is_accepted_and_empty_means_any(ledger: Ledger) -> None:
    ledger.practitioner("h2", "doc", ["physician"])
    pid = ledger.patient()
    ledger.consent(pid, {**_consent(pid), "provision": _deep(4)})
    # root permit(any) > permit > permit > deny(any): the deepest deny decides
    req = AccessRequest("doc", "h2", pid, ("Observation",), "TREAT", ledger.time + 1)
    d = decide(ledger.state, req)
    assert not d.permit and d.rule == "consent" and d.consents == ("c1",)


def test_data_period_is_conservative(ledger: Ledger) -> None:
    ledger.practitioner("h2", "doc", ["physician"])
    pid = ledger.patient("h1")
    ledger.record("h1", pid, "r-old", "Observation", effective=100)
    ledger.record("h1", pid, "r-new", "Observation", effective=10_000)
    ledger.consent(
        pid, _consent(pid, actors=[{"kind": "org", "id": "h2"}], data_period=[1000, None])
    )
    t = ledger.time + 1

    def ok(record: str | None) -> bool:
        req = AccessRequest("doc", "h2", pid, ("Observation",), "TREAT", t, record=record)
        return decide(ledger.state, req).permit

    assert ok("r-new") and not ok("r-old") and not ok(None)
