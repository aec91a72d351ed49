"""decide() against a small, independent reference model: full matrix + random consents.

The reference model restates the policy for a small universe of resource
types and purposes; it does not call any medledger code.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medledger.contracts.access import AccessRequest, decide

from .conftest import Ledger

ROLES = ["physician", "nurse", "lab", "pharmacist", "emergency-clinician", "privacy-officer"]
CONSENT_STATES = ["none", "permit", "deny", "nested", "expired", "revoked", "notyet"]
PURPOSES = ["TREAT", "ETREAT", "HRESCH"]
TYPES = ["Observation", "Condition", "MedicationRequest", "Specimen", "AuditEvent"]

# -- the reference model (independent restatement of the policy) ------------------------
CLINICAL = {"Observation", "Condition", "MedicationRequest", "Specimen"}
REF_ROLE_TYPES = {
    "physician": CLINICAL,
    "nurse": CLINICAL,
    "emergency-clinician": CLINICAL,
    "lab": {"Observation", "Specimen"},
    "pharmacist": {"Condition", "MedicationRequest"},
    "privacy-officer": {"AuditEvent"},
}
REF_ROLE_PURPOSES = {
    "physician": {"TREAT", "ETREAT", "HRESCH"},
    "nurse": {"TREAT", "ETREAT", "HRESCH"},
    "emergency-clinician": {"TREAT", "ETREAT"},
    "lab": {"TREAT", "HRESCH"},
    "pharmacist": {"TREAT", "ETREAT"},
    "privacy-officer": set(),
}
PERMIT_PURPOSES = {"TREAT", "ETREAT"}
PERMIT_TYPES = {"Observation", "Condition", "MedicationRequest", "AuditEvent"}


def reference(role: str, consent: str, purpose: str, rtype: str, bg: bool, default: str) -> bool:
    if rtype not in REF_ROLE_TYPES[role] or purpose not in REF_ROLE_PURPOSES[role]:
        return False
    if consent == "permit":
        outcome = "permit" if purpose in PERMIT_PURPOSES and rtype in PERMIT_TYPES else None
    elif consent == "deny":
        outcome = "deny"
    elif consent == "nested":  # permit everything to h2, except Condition
        outcome = "deny" if rtype == "Condition" else "permit"
    else:  # none, expired, revoked, not yet valid: nothing applies
        outcome = None
    if outcome == "permit":
        return True
    if outcome is None and default == "opt-out" and purpose in {"TREAT", "ETREAT"}:
        return True
    # denied so far: break-glass can rescue an emergency clinician in an emergency
    return bg and purpose == "ETREAT" and role == "emergency-clinician"


# -- the ledger under test ------------------------------------------------------------
def build(default: str) -> tuple[Ledger, dict[str, str], int]:
    led = Ledger(("h1", "h2"), policy={"consent_default": default})
    for role in ROLES:
        led.practitioner("h2", f"{role}-h2", [role])
    patients = {state: led.patient("h1") for state in CONSENT_STATES}
    now = led.time + 1_000_000
    permit = {
        "type": "permit",
        "actors": [{"kind": "org", "id": "h2"}],
        "purposes": sorted(PERMIT_PURPOSES),
        "resource_types": sorted(PERMIT_TYPES),
    }
    specs: dict[str, tuple[list[Any], dict[str, Any]]] = {
        "permit": ([None, None], permit),
        "deny": ([None, None], {"type": "deny", "actors": [{"kind": "org", "id": "h2"}]}),
        "nested": (
            [None, None],
            {
                "type": "permit",
                "actors": [{"kind": "org", "id": "h2"}],
                "provisions": [{"type": "deny", "resource_types": ["Condition"]}],
            },
        ),
        "expired": ([0, now - 1], permit),
        "revoked": ([None, None], permit),
        "notyet": ([now + 1, None], permit),
    }
    for state, (period, provision) in specs.items():
        pid = patients[state]
        led.consent(
            pid, {"id": f"c-{state}", "patient": pid, "period": period, "provision": provision}
        )
    led.submit(patients["revoked"], "consent.revoke", {"id": "c-revoked"})
    for pid in patients.values():
        led.submit(
            "emergency-clinician-h2",
            "breakglass.declare",
            {"patient": pid, "reason": "unconscious on arrival", "resource_types": []},
        )
    return led, patients, now


@pytest.mark.parametrize("default", ["opt-in", "opt-out"])
def test_matrix(default: str) -> None:
    led, patients, now = build(default)
    assert now - 1000 * 60 * 60 < led.time < now  # break-glass windows (60 min) still open
    checked = 0
    for role, cstate, purpose, rtype, bg in itertools.product(
        ROLES, CONSENT_STATES, PURPOSES, TYPES, (False, True)
    ):
        req = AccessRequest(
            actor=f"{role}-h2",
            org="h2",
            patient=patients[cstate],
            resource_types=(rtype,),
            purpose=purpose,
            time=now,
            break_glass=bg,
        )
        d = decide(led.state, req)
        want = reference(role, cstate, purpose, rtype, bg, default)
        assert d.permit is want, (role, cstate, purpose, rtype, bg, d)
        assert (d.permitted_types, d.denied_types) == (((rtype,), ()) if want else ((), (rtype,)))
        if d.break_glass:
            assert d.rule == "break-glass" and role == "emergency-clinician"
        if cstate in ("deny", "nested") and d.rule == "consent" and not d.permit:
            assert d.consents == (f"c-{cstate}",)
        checked += 1
    assert checked == len(ROLES) * len(CONSENT_STATES) * len(PURPOSES) * len(TYPES) * 2


def test_break_glass_window_expires() -> None:
    led, patients, _ = build("opt-in")
    req = AccessRequest(
        actor="emergency-clinician-h2",
        org="h2",
        patient=patients["none"],
        resource_types=("Observation",),
        purpose="ETREAT",
        time=led.time + 60 * 60 * 1000 + 60_000,  # after the 60-minute window
        break_glass=True,
    )
    d = decide(led.state, req)
    assert not d.permit and d.rule == "default"


def test_multiple_types_partial_permit() -> None:
    led, patients, now = build("opt-in")
    d = decide(
        led.state,
        AccessRequest(
            actor="physician-h2",
            org="h2",
            patient=patients["nested"],
            resource_types=("Observation", "Condition", "AuditEvent"),
            purpose="TREAT",
            time=now,
        ),
    )
    assert d.permit and d.permitted_types == ("Observation",)
    assert d.denied_types == ("Condition", "AuditEvent")
    assert [x.rule for x in d.details] == ["consent", "consent", "role"]
    assert "Condition: denied by consent c-nested" in d.reason


# -- random consent sets ------------------------------------------------------------------
H_TYPES = ["Observation", "Condition", "Specimen"]
H_PURPOSES = ["TREAT", "ETREAT", "HRESCH"]
H_ACTORS = [
    {"kind": "org", "id": "h1"},
    {"kind": "org", "id": "h2"},
    {"kind": "practitioner", "id": "physician-h2"},
    {"kind": "role", "id": "physician"},
    {"kind": "role", "id": "lab"},
]
H_REQUESTERS = {
    "physician-h2": ("h2", "physician"),
    "lab-h2": ("h2", "lab"),
    "doc-h1": ("h1", "physician"),
}
T = 5_000_000_000_000  # request time in the random tests


def _subset(items: list[Any]) -> st.SearchStrategy[list[Any]]:
    return st.lists(st.sampled_from(items), unique_by=repr, max_size=2)


def _provision(depth: int) -> st.SearchStrategy[dict[str, Any]]:
    children = st.just([]) if depth >= 3 else st.lists(_provision(depth + 1), max_size=2)
    return st.fixed_dictionaries(
        {
            "type": st.sampled_from(["permit", "deny"]),
            "actors": _subset(H_ACTORS),
            "purposes": _subset(H_PURPOSES),
            "resource_types": _subset(H_TYPES),
            "provisions": children,
        }
    )


PERIODS = [[None, None], [0, T - 1], [T + 1, None], [T - 10, T + 10], [T, T + 1], [0, T]]
consent_st = st.fixed_dictionaries(
    {
        "period": st.sampled_from(PERIODS),
        "provision": _provision(1),
        "revoked": st.booleans(),
    }
)


def ref_applies(p: dict[str, Any], who: str, t: str, purpose: str) -> bool:
    org, role = H_REQUESTERS[who]
    actor_ok = not p["actors"] or any(
        (a["kind"] == "org" and a["id"] == org)
        or (a["kind"] == "practitioner" and a["id"] == who)
        or (a["kind"] == "role" and a["id"] == role)
        for a in p["actors"]
    )
    purpose_ok = not p["purposes"] or purpose in p["purposes"]
    type_ok = not p["resource_types"] or t in p["resource_types"]
    return actor_ok and purpose_ok and type_ok


def ref_eval(p: dict[str, Any], who: str, t: str, purpose: str) -> str | None:
    if not ref_applies(p, who, t, purpose):
        return None
    below = [ref_eval(c, who, t, purpose) for c in p["provisions"]]
    below = [b for b in below if b is not None]
    if not below:
        return str(p["type"])
    return "deny" if "deny" in below else "permit"


def ref_decide(consents: list[dict[str, Any]], who: str, t: str, purpose: str) -> bool:
    _, role = H_REQUESTERS[who]
    if t not in REF_ROLE_TYPES[role] or purpose not in REF_ROLE_PURPOSES[role]:
        return False
    live = [
        c
        for c in consents
        if not c["revoked"]
        and (c["period"][0] is None or c["period"][0] <= T)
        and (c["period"][1] is None or T < c["period"][1])
    ]
    results = [ref_eval(c["provision"], who, t, purpose) for c in live]
    if "deny" in results:
        return False
    return "permit" in results  # opt-in network: nothing applicable -> deny


_SHARED: dict[str, Ledger] = {}


def shared_ledger() -> Ledger:
    if "led" not in _SHARED:
        led = Ledger(("h1", "h2"))
        led.practitioner("h2", "physician-h2", ["physician"])
        led.practitioner("h2", "lab-h2", ["lab"])
        led.practitioner("h1", "doc-h1", ["physician"])
        _SHARED["led"] = led
    return _SHARED["led"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    consents=st.lists(consent_st, max_size=3),
    who=st.sampled_from(sorted(H_REQUESTERS)),
    purpose=st.sampled_from(H_PURPOSES),
)
def test_random_consents_match_reference(
    consents: list[dict[str, Any]], who: str, purpose: str
) -> None:
    led = shared_ledger()
    pid = led.patient("h1")
    for i, c in enumerate(consents):
        cid = f"{pid[-8:]}-{i}"
        led.consent(
            pid, {"id": cid, "patient": pid, "period": c["period"], "provision": c["provision"]}
        )
        if c["revoked"]:
            led.submit(pid, "consent.revoke", {"id": cid})
    org = H_REQUESTERS[who][0]
    d = decide(
        led.state,
        AccessRequest(
            actor=who, org=org, patient=pid, resource_types=tuple(H_TYPES), purpose=purpose, time=T
        ),
    )
    want = tuple(t for t in H_TYPES if ref_decide(consents, who, t, purpose))
    assert d.permitted_types == want, (d.reason, consents)
