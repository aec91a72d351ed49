from __future__ import annotations

from typing import Any

from medledger.contracts.access import AccessRequest, decide
from medledger.contracts.base import get_obj, scan_objs
from medledger.contracts.patients_v1 import claim_message
from medledger.contracts.records_v1 import MAX_BATCH
from medledger.crypto.signing import SigningKey
from medledger.errors import Conflict, MalformedTransaction, MedledgerError, NotFound, Unauthorized

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


def _reg(rid: str, pid: str, version: int = 1, prev: bytes | None = None, **extra: Any) -> Any:
    return {
        "record": rid,
        "patient": pid,
        "resource_type": "Observation",
        "commitment": commitment(f"{rid}/{version}"),
        "version": version,
        "prev": prev,
        **extra,
    }


def _rule_grant(led: Ledger, pid: str) -> None:
    """Rules of the patient and of h1, so every registration evaluates both."""
    led.submit(
        pid,
        "rule.register",
        {
            "id": "lab-to-h2",
            "owner": pid,
            "expression": 'record.category == "laboratory"',
            "grantee": {"kind": "org", "id": "h2"},
        },
    )
    led.submit(
        "admin-h1",
        "rule.register",
        {
            "id": "all-to-h3",
            "owner": "h1",
            "expression": "record.version >= 1",
            "grantee": {"kind": "org", "id": "h3"},
        },
    )


def test_record_register_batch_equals_single_registrations() -> None:
    single, batch = Ledger(), Ledger()
    entries: list[Any] = []
    for led in (single, batch):
        pid = led.patient("h1")
        _rule_grant(led, pid)
        entries = [
            _reg("r1", pid, category="laboratory", code_commitment=b"k" * 32, effective=5),
            _reg("r2", pid),
            _reg("r1", pid, version=2, prev=commitment("r1/1")),  # sees r1 of this batch
        ]
        if led is single:
            for e in entries:
                led.submit("node:h1", "record.register", e)
        else:
            fx = led.submit("node:h1", "record.register_batch", {"records": entries})
            assert [e["event"] for e in fx.events].count("record.registered") == 3

    # the same state keys and values (heights differ: one block per registration there)
    def norm(led: Ledger) -> dict[bytes, Any]:
        out = {}
        for k in led.state.items():
            if k.startswith((b"record/", b"recver/", b"patrec/", b"grant/")):
                doc = get_obj(led.state, k)
                if isinstance(doc, dict):
                    doc = {f: x for f, x in doc.items() if f != "height"}
                out[k] = doc
        return out

    a, b = norm(single), norm(batch)
    pid_a = single.get("record/r1")["patient"]
    pid_b = batch.get("record/r1")["patient"]
    b = {k.replace(pid_b.encode(), pid_a.encode()): v for k, v in b.items()}
    b = {
        k: ({**v, "patient": pid_a} if isinstance(v, dict) and "patient" in v else v)
        for k, v in b.items()
    }
    assert a == b
    assert batch.get("record/r1")["version"] == 2
    assert batch.get("grant/r2/org:h3")["version"] == 1
    # version 1 matched the patient's rule; version 2 (no category) saw that grant and removed it
    assert batch.get("grant/r1/org:h2") is None
    assert [e["event"] for e in batch.events].count("grant.removed") == 1
    single_events = [e["event"] for e in single.events if e["event"] != "rule.registered"]
    batch_events = [e["event"] for e in batch.events if e["event"] != "rule.registered"]
    assert single_events[-len(batch_events) :] == batch_events


def test_record_register_batch_is_all_or_nothing(ledger: Ledger) -> None:
    ledger.practitioner("h1", "doc", ["physician"])
    pid = ledger.patient("h1")
    other = ledger.patient("h2")
    ledger.record("h1", pid, "old", "Observation")
    good = [_reg("a", pid), _reg("b", pid)]
    cases: list[tuple[type[MedledgerError], Any, int]] = [
        (Conflict, _reg("old", pid), 2),  # exists already
        (Unauthorized, _reg("c", other), 2),  # h1 has no link to that patient
        (MalformedTransaction, {**_reg("c", pid), "code": "1234-5"}, 2),
        (MalformedTransaction, _reg("c", pid, category="mental-health"), 2),
        (NotFound, _reg("c", pid, version=2, prev=b"p" * 32), 2),
        (Conflict, _reg("a", pid), 2),  # the same record twice as version 1
        (MalformedTransaction, "not a map", 2),
    ]
    for exc, bad, at in cases:
        err = ledger.reject(exc, "node:h1", "record.register_batch", {"records": [*good, bad]})
        assert err.details["entry"] == at and str(err).startswith(f"records[{at}]")
    for payload in (
        {"records": []},
        {"records": "x"},
        {"records": [_reg(f"x{i}", pid) for i in range(MAX_BATCH + 1)]},
        {"records": good, "extra": 1},
    ):
        ledger.reject(MalformedTransaction, "node:h1", "record.register_batch", payload)
    ledger.reject(Unauthorized, "admin-h1", "record.register_batch", {"records": good})
    assert ledger.get("record/a") is None
    # a practitioner of the custodian may batch too, up to MAX_BATCH entries
    many = [_reg(f"m{i}", pid) for i in range(MAX_BATCH)]
    ledger.submit("doc", "record.register_batch", {"records": many})
    assert ledger.get(f"record/m{MAX_BATCH - 1}")["by"] == "doc"
    assert ledger.get(f"patrec/{pid}/m0") == {"custodian": "h1", "resource_type": "Observation"}
