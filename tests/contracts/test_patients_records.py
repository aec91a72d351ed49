from __future__ import annotations

from medledger.contracts.access import AccessRequest, decide
from medledger.contracts.base import scan_objs
from medledger.contracts.patients_v1 import claim_message
from medledger.crypto.signing import SigningKey
from medledger.errors import Conflict, MalformedTransaction, NotFound, Unauthorized

from .conftest import NETWORK, Ledger, commitment


def _claim(led: Ledger, node: str, pid: str, key: SigningKey, code: bytes) -> dict[str, object]:
    seq = led.seqs.get(node, 0) + 1
    sig = key.sign(claim_message(NETWORK, pid, key.public.raw, led.keys[node].key_id, seq))
    return {"patient": pid, "pub": key.public.raw, "claim_code": code, "patient_sig": sig}


def test_patient_claim_flow(ledger: Ledger) -> None:
    pid = ledger.patient("h1", claimed=False)
    assert ledger.get(f"principal/{pid}") is None
    code = b"claim-code-" + pid.encode()
    key = SigningKey.generate()
    # wrong code, wrong signature, wrong relaying node
    ledger.reject(
        Unauthorized, "node:h1", "patient.claim", _claim(ledger, "node:h1", pid, key, b"x" * 20)
    )
    forged = _claim(ledger, "node:h1", pid, key, code)
    forged["patient_sig"] = SigningKey.generate().sign(b"nope")
    ledger.reject(Unauthorized, "node:h1", "patient.claim", forged)
    ledger.reject(
        Unauthorized, "node:h2", "patient.claim", _claim(ledger, "node:h2", pid, key, code)
    )
    # a signature made for another sequence number does not replay
    stale = _claim(ledger, "node:h1", pid, key, code)
    ledger.submit("node:h1", "patient.link", {"patient": pid, "commitment": commitment("mrn-2")})
    ledger.reject(Unauthorized, "node:h1", "patient.claim", stale)
    ledger.submit("node:h1", "patient.claim", _claim(ledger, "node:h1", pid, key, code))
    assert ledger.get(f"principal/{pid}")["kind"] == "patient"
    assert ledger.get(f"patient/{pid}")["claimed"] is True
    ledger.keys[pid] = key
    ledger.consent(pid, {"id": "c", "patient": pid, "provision": {"type": "permit"}})
    ledger.reject(
        Conflict,
        "node:h1",
        "patient.claim",
        _claim(ledger, "node:h1", pid, SigningKey.generate(), code),
    )


def test_patient_register_validation(ledger: Ledger) -> None:
    good = {
        "id": "pat-" + "0" * 32,
        "links": [{"org": "h1", "commitment": b"c" * 32}],
        "claim": b"k" * 32,
    }
    ledger.reject(Unauthorized, "node:h2", "patient.register", good)
    ledger.reject(MalformedTransaction, "node:h1", "patient.register", {**good, "id": "alice"})
    ledger.reject(MalformedTransaction, "node:h1", "patient.register", {**good, "pub": b"p" * 32})
    ledger.reject(MalformedTransaction, "node:h1", "patient.register", {**good, "name": "Alice"})
    ledger.practitioner("h1", "doc", ["physician"])
    ledger.reject(Unauthorized, "doc", "patient.register", good)
    ledger.submit("admin-h1", "patient.register", good)
    ledger.reject(Conflict, "node:h1", "patient.register", good)


def test_patient_link(ledger: Ledger) -> None:
    pid = ledger.patient("h1")
    ledger.submit("node:h2", "patient.link", {"patient": pid, "commitment": commitment("mrn-h2")})
    assert ledger.get(f"patient/{pid}")["orgs"] == ["h1", "h2"]
    ledger.reject(
        Conflict, "node:h2", "patient.link", {"patient": pid, "commitment": commitment("mrn-h2")}
    )
    # now h2 may register records for the patient, h3 may not
    ledger.record("h2", pid, "r2", "Observation")
    ledger.reject(
        Unauthorized,
        "node:h3",
        "record.register",
        {
            "record": "r3",
            "patient": pid,
            "resource_type": "Observation",
            "commitment": b"c" * 32,
            "version": 1,
            "prev": None,
        },
    )


def test_record_versions_and_shredding(ledger: Ledger) -> None:
    ledger.practitioner("h1", "doc", ["physician"])
    pid = ledger.patient("h1")
    c1 = ledger.record(
        "h1", pid, "r1", "Observation", category="laboratory", code_commitment=b"k" * 32
    )
    rec = ledger.get("record/r1")
    assert (rec["version"], rec["commitment"], rec["custodian"]) == (1, c1, "h1")
    # amendments: version must be last + 1 and prev the last commitment
    base = {"record": "r1", "patient": pid, "resource_type": "Observation", "commitment": b"n" * 32}
    ledger.reject(Conflict, "node:h1", "record.register", {**base, "version": 3, "prev": c1})
    ledger.reject(Conflict, "node:h1", "record.register", {**base, "version": 2, "prev": b"z" * 32})
    ledger.reject(Conflict, "node:h1", "record.register", {**base, "version": 1, "prev": None})
    ledger.reject(
        Conflict,
        "node:h1",
        "record.register",
        {**base, "resource_type": "Condition", "version": 2, "prev": c1},
    )
    c2 = ledger.record("h1", pid, "r1", "Observation", version=2, prev=c1)
    assert ledger.get("record/r1")["version"] == 2
    assert ledger.get("recver/r1/00000001")["commitment"] == c1
    assert ledger.get("recver/r1/00000002")["prev"] == c1
    # the practitioner of the custodian may register too; others may not amend
    ledger.submit("doc", "record.register", {**base, "version": 3, "prev": c2})
    ledger.submit("node:h2", "patient.link", {"patient": pid, "commitment": commitment("x")})
    ledger.reject(
        Unauthorized, "node:h2", "record.register", {**base, "version": 4, "prev": b"n" * 32}
    )
    # PHI guards
    ledger.reject(
        MalformedTransaction,
        "node:h1",
        "record.register",
        {**base, "record": "r9", "version": 1, "prev": None, "code": "1234-5"},
    )
    ledger.reject(
        MalformedTransaction,
        "node:h1",
        "record.register",
        {**base, "record": "r9", "version": 1, "prev": None, "category": "mental-health"},
    )
    ledger.reject(
        MalformedTransaction,
        "node:h1",
        "record.register",
        {**base, "record": "r9", "version": 1, "prev": None, "resource_type": "Obs"},
    )
    # the custodian reads its own record for TREAT without consent
    req = AccessRequest("doc", "h1", pid, ("Observation",), "TREAT", ledger.time + 1, record="r1")
    assert decide(ledger.state, req).rule == "custodian"
    # shredding: custodian only; keeps the commitment; access denied afterwards
    ledger.reject(Unauthorized, "node:h2", "record.shred", {"record": "r1"})
    ledger.reject(Unauthorized, "doc", "record.shred", {"record": "r1"})
    ledger.submit("admin-h1", "record.shred", {"record": "r1"})
    rec = ledger.get("record/r1")
    assert rec["status"] == "shredded" and rec["commitment"] == b"n" * 32
    ledger.reject(Conflict, "node:h1", "record.shred", {"record": "r1"})
    ledger.reject(Conflict, "node:h1", "record.register", {**base, "version": 4, "prev": b"n" * 32})
    d = decide(ledger.state, req)
    assert not d.permit and d.rule == "shredded"
    ledger.reject(NotFound, "node:h1", "record.shred", {"record": "nope"})


def test_access_log_audit_feed(ledger: Ledger) -> None:
    pid = ledger.patient("h1")
    entry = {
        "request": "req-1",
        "actor": "doc",
        "org": "h2",
        "role": "physician",
        "on_behalf": "app-1",
        "patient": pid,
        "resource_types": ["Observation"],
        "records": ["r1"],
        "purpose": "TREAT",
        "action": "access",
        "outcome": "deny",
        "consents": [],
        "rule": "default",
        "break_glass": False,
        "time": ledger.time,
    }
    ledger.reject(Unauthorized, "node:h1", "access.log", entry)
    ledger.reject(Unauthorized, "admin-h2", "access.log", entry)
    ledger.reject(MalformedTransaction, "node:h2", "access.log", {**entry, "outcome": "maybe"})
    ledger.reject(
        MalformedTransaction,
        "node:h2",
        "access.log",
        {k: v for k, v in entry.items() if k != "time"},
    )
    ledger.submit("node:h2", "access.log", entry)
    ledger.reject(Conflict, "node:h2", "access.log", entry)
    ledger.submit("node:h2", "access.log", {**entry, "request": "req-2", "outcome": "permit"})
    feed = [v for _, v in scan_objs(ledger.state, f"audit/{pid}/".encode())]
    assert [e["request"] for e in feed] == ["req-1", "req-2"]
    assert feed[0]["height"] < feed[1]["height"] and feed[0]["on_behalf"] == "app-1"
