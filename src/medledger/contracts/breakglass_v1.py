"""Break-glass contract, version 1: emergency access windows and their mandatory review.

Transactions
------------
``breakglass.declare``::

    {"patient", "reason": 1..500 chars, "resource_types": [FHIR types] (empty = any),
     "actor": practitioner id   (only when signed by a node)}

Signed by an ``emergency-clinician`` practitioner (``actor`` absent: the signer is
the actor), or by the ``node`` of that practitioner's org acting on its behalf
(``actor`` names an active emergency-clinician practitioner of the node's org).
Opens an access window ``[time, time + policy.break_glass_minutes)`` from the
block time and a review due by ``time + policy.break_glass_review_hours``.
Always emits a ``breakglass.declared`` event. The declaration id is the tx id hex.
The reason is free text: clients must keep identifying details out of it.

``breakglass.review`` ``{"id", "outcome": "justified"|"unjustified", "note": <= 1000 chars}``
signed by a ``privacy-officer`` practitioner of the same org as the declaring
actor; closes the review (once).

:func:`overdue_reviews` lists open reviews past their deadline and
:func:`declarations` an organisation's (or a patient's) declarations with their
reviews and the reads made under them (both pure).

State keys owned
----------------
::

    bg/<patient>/<id>    {"id", "patient", "actor", "org", "reason", "resource_types",
                          "from", "until", "by", "height"}
    review/<id>          {"id", "patient", "actor", "org", "deadline",
                          "status": "open"|"closed", "outcome", "note", "reviewer", "closed_at"}
"""

from __future__ import annotations

from typing import Any

from medledger.contracts._common import (
    FHIR_TYPES,
    code_list,
    only_keys,
    policy,
    principal,
    req_id,
)
from medledger.contracts.access_v1 import k_audit_prefix
from medledger.contracts.base import Effects, Env, Handler, get_obj, require_obj, scan_objs
from medledger.contracts.patients_v1 import k_patient
from medledger.errors import Conflict, MalformedTransaction, Unauthorized
from medledger.ledger.tx import Transaction
from medledger.state.base import StateReader

__all__ = [
    "HANDLERS",
    "active_declarations",
    "declarations",
    "k_bg",
    "k_review",
    "overdue_reviews",
]

MAX_REASON = 500
MAX_NOTE = 1000
OUTCOMES = frozenset({"justified", "unjustified"})


def k_bg(patient: str, bid: str = "") -> bytes:
    return f"bg/{patient}/{bid}".encode()


def k_review(bid: str = "") -> bytes:
    return f"review/{bid}".encode()


def _is_emergency_clinician(p: dict[str, Any] | None) -> bool:
    return (
        p is not None
        and p["kind"] == "practitioner"
        and p["status"] == "active"
        and "emergency-clinician" in p["roles"]
    )


def breakglass_declare(state: StateReader, tx: Transaction, env: Env) -> Effects:
    p = tx.payload
    only_keys(p, {"patient", "reason", "resource_types", "actor"}, "breakglass.declare")
    patient = req_id(p, "patient")
    reason = p.get("reason")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON:
        raise MalformedTransaction(f"reason must be non-empty text of at most {MAX_REASON} chars")
    types = code_list(p.get("resource_types"), FHIR_TYPES, "resource_types")
    signer = env.principal
    if signer["kind"] == "node":
        actor_id = req_id(p, "actor", "actor (practitioner id)")
        actor = principal(state, actor_id)
        if actor is None or actor["org"] != signer["org"]:
            raise Unauthorized("a node may only declare for a practitioner of its own org")
    else:
        if "actor" in p and p["actor"] != signer["id"]:
            raise Unauthorized("a practitioner declares break-glass only for themself")
        actor = dict(signer)
    if not _is_emergency_clinician(actor):
        raise Unauthorized("break-glass must be declared by (or for) an emergency-clinician")
    assert actor is not None
    require_obj(state, k_patient(patient), f"patient {patient}")
    pol = policy(env.config)
    bid = env.tx_id.hex()
    until = env.time + int(pol["break_glass_minutes"]) * 60_000
    deadline = env.time + int(pol["break_glass_review_hours"]) * 3_600_000
    fx = Effects()
    fx.put(
        k_bg(patient, bid),
        {
            "id": bid,
            "patient": patient,
            "actor": actor["id"],
            "org": actor["org"],
            "reason": reason,
            "resource_types": types,
            "from": env.time,
            "until": until,
            "by": signer["id"],
            "height": env.height,
        },
    )
    fx.put(
        k_review(bid),
        {
            "id": bid,
            "patient": patient,
            "actor": actor["id"],
            "org": actor["org"],
            "deadline": deadline,
            "status": "open",
            "outcome": None,
            "note": None,
            "reviewer": None,
            "closed_at": None,
        },
    )
    fx.emit(
        "breakglass.declared",
        id=bid,
        patient=patient,
        actor=actor["id"],
        org=actor["org"],
        until=until,
        review_deadline=deadline,
    )
    return fx


def breakglass_review(state: StateReader, tx: Transaction, env: Env) -> Effects:
    p = tx.payload
    only_keys(p, {"id", "outcome", "note"}, "breakglass.review")
    bid = req_id(p, "id", "declaration id")
    outcome = p.get("outcome")
    if outcome not in OUTCOMES:
        raise MalformedTransaction(f"outcome must be one of {sorted(OUTCOMES)}")
    note = p.get("note", "")
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise MalformedTransaction(f"note must be text of at most {MAX_NOTE} chars")
    signer = env.principal
    if signer["kind"] != "practitioner" or "privacy-officer" not in signer["roles"]:
        raise Unauthorized("break-glass reviews must be signed by a privacy-officer")
    review = dict(require_obj(state, k_review(bid), f"break-glass declaration {bid}"))
    if review["org"] != signer["org"]:
        raise Unauthorized("a privacy-officer reviews only declarations of their own org")
    if review["status"] != "open":
        raise Conflict(f"declaration {bid} was already reviewed")
    review.update(
        status="closed",
        outcome=outcome,
        note=note,
        reviewer=signer["id"],
        closed_at=env.time,
    )
    fx = Effects()
    fx.put(k_review(bid), review)
    fx.emit("breakglass.reviewed", id=bid, outcome=outcome, reviewer=signer["id"])
    return fx


def active_declarations(state: StateReader, patient: str, actor: str, time: int) -> list[Any]:
    """The actor's declarations for ``patient`` whose window covers ``time``."""
    return [
        d
        for _, d in scan_objs(state, k_bg(patient))
        if d["actor"] == actor and d["from"] <= time < d["until"]
    ]


def overdue_reviews(state: StateReader, now: int) -> list[dict[str, Any]]:
    """Open reviews whose deadline has passed (``deadline < now``), by deadline then id."""
    out = [
        dict(r)
        for _, r in scan_objs(state, k_review())
        if r["status"] == "open" and r["deadline"] < now
    ]
    return sorted(out, key=lambda r: (r["deadline"], r["id"]))


def declarations(
    state: StateReader,
    now: int,
    *,
    org: str | None = None,
    patient: str | None = None,
    status: str = "all",
    reads: bool = True,
) -> list[dict[str, Any]]:
    """Declarations of ``org`` (or about ``patient``) with their reviews: open ones first,
    soonest deadline first, then closed ones, latest first. ``status``: ``open``,
    ``closed`` or ``all``; ``overdue``: open past its deadline.

    With ``reads``, each carries the break-glass reads its actor made of the patient
    during the window, from the access log (``audit/<patient>/``): time, outcome,
    purpose, resource types, records and the entry's transaction id (hex).
    """
    if (org is None) == (patient is None):
        raise ValueError("declarations of one org or about one patient")
    if patient is not None:
        reviews = []
        for _, declared in scan_objs(state, k_bg(patient)):
            review = get_obj(state, k_review(declared["id"]))
            if review is not None:
                reviews.append(review)
    else:
        reviews = [r for _, r in scan_objs(state, k_review()) if r.get("org") == org]
    out = []
    # a patient's break-glass entries, read once however many declarations concern them
    glass: dict[str, list[dict[str, Any]]] = {}
    for review in reviews:
        if status != "all" and review["status"] != status:
            continue
        pid, bid = review["patient"], review["id"]
        declared = get_obj(state, k_bg(pid, bid)) or {}
        start, until = declared.get("from", 0), declared.get("until", 0)
        if reads and pid not in glass:
            glass[pid] = [
                e for _, e in scan_objs(state, k_audit_prefix(pid)) if e.get("break_glass")
            ]
        found: list[dict[str, Any]] = []
        for entry in glass.get(pid, ()):
            when = int(entry.get("time") or 0)
            if entry.get("actor") == review["actor"] and start <= when < until:
                tx = entry.get("tx")
                found.append(
                    {
                        "tx": tx.hex() if isinstance(tx, bytes) else None,
                        "time": entry.get("time"),
                        "outcome": entry.get("outcome"),
                        "purpose": entry.get("purpose"),
                        "resource_types": list(entry.get("resource_types") or []),
                        "records": list(entry.get("records") or []),
                    }
                )
        out.append(
            {
                "id": bid,
                "patient": pid,
                "actor": review["actor"],
                "org": review["org"],
                "reason": declared.get("reason"),
                "resource_types": list(declared.get("resource_types") or []),
                "from": start,
                "until": until,
                "deadline": review["deadline"],
                "overdue": review["status"] == "open" and review["deadline"] < now,
                "status": review["status"],
                "outcome": review.get("outcome"),
                "note": review.get("note"),
                "reviewer": review.get("reviewer"),
                "closed_at": review.get("closed_at"),
                "reads": found,
            }
        )
    pending = sorted((d for d in out if d["status"] == "open"), key=lambda d: d["deadline"])
    closed = sorted(
        (d for d in out if d["status"] != "open"),
        key=lambda d: d["closed_at"] or 0,
        reverse=True,
    )
    return pending + closed


HANDLERS: dict[str, Handler] = {
    "breakglass.declare": breakglass_declare,
    "breakglass.review": breakglass_review,
}
