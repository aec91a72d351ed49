"""The explorer and demo sign-in endpoints (api/explorer.py) on the real app; the portal's headers.

Everything the explorer returns is checked with medledger's own verifiers:
the checkpoint note with the returned verifier keys, inclusion and consistency
proofs against the checkpoint roots.
"""

from __future__ import annotations

import base64
import hashlib
import re
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from medledger.api import explorer
from medledger.ledger.checkpoint import checkpoint_of, verify_checkpoint
from medledger.ledger.note import NoteVerifier
from medledger.ledger.tx import Transaction
from medledger.merkle.hasher import leaf_hash
from medledger.merkle.verify import verify_consistency, verify_inclusion
from medledger.web import STATIC_DIR, mount_portal

from .conftest import ServerThread
from .network import Network, demo_token


def _get(
    server: ServerThread, path: str, token: str | None = None, **params: Any
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(server.url + path, headers=headers, params=params, timeout=60)


def _verifiers(keys: list[str]) -> list[NoteVerifier]:
    return [NoteVerifier.from_verifier_key(k) for k in keys]


def test_checkpoint_is_public_and_co_signed(server: ServerThread) -> None:
    r = _get(server, "/api/ledger/checkpoint")
    assert r.status_code == 200
    doc = r.json()
    cp = verify_checkpoint(doc["note"], _verifiers(doc["verifier_keys"]), quorum=3)
    assert doc["size"] == cp.size and doc["root"] == cp.root.hex() and doc["origin"] == cp.origin
    assert {s["org"] for s in doc["signatures"]} == {"hospital", "clinic", "lab"}
    assert all(s["known"] and s["verified"] for s in doc["signatures"])
    assert {o["name"] for o in doc["orgs"]} == {
        "St Mary's Hospital",
        "Riverside Clinic",
        "Northside Laboratory",
    }
    assert doc["block"]["height"] >= 1


@pytest.mark.parametrize(
    "path",
    [
        "/api/ledger/blocks",
        "/api/ledger/blocks/0",
        "/api/ledger/tx/" + "ab" * 32,
        "/api/ledger/tx/" + "ab" * 32 + "/proof",
        "/api/ledger/verify",
        "/api/ledger/directory",
        "/api/session",
    ],
)
def test_explorer_needs_a_valid_token(server: ServerThread, path: str) -> None:
    for token in (None, "not-a-token"):
        r = _get(server, path, token)
        assert r.status_code == 401, (path, token, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_demo_sign_in(server: ServerThread, net: Network) -> None:
    idents = _get(server, "/api/demo/identities").json()
    by_id = {i["id"]: i for i in idents}
    assert by_id[net.patient]["kind"] == "patient"
    assert by_id["dr-grey"] == {
        "id": "dr-grey",
        "label": "dr-grey (physician)",
        "kind": "practitioner",
        "org": "clinic",
        "org_name": "Riverside Clinic",
        "roles": ["physician"],
    }
    assert all("client_id" not in i for i in idents)
    r = httpx.post(server.url + "/api/demo/login", json={"identity": "dr-grey"})
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    doc = r.json()
    assert doc["token_type"] == "bearer" and doc["expires_in"] == 900
    assert doc["identity"]["subject_kind"] == "practitioner"
    assert doc["identity"]["subject"] == "dr-grey"
    who = _get(server, "/api/session", doc["access_token"]).json()
    assert who["subject"] == "dr-grey" and who["org"] == "clinic"
    # the token is a real API token
    r = _get(server, f"/fhir/Patient/{net.patient}/$everything", doc["access_token"])
    assert r.status_code in (200, 403)
    assert (
        httpx.post(server.url + "/api/demo/login", json={"identity": "nobody"}).status_code == 404
    )
    assert httpx.post(server.url + "/api/demo/login", json={}).status_code == 422


async def test_demo_endpoints_absent_without_demo_identities() -> None:
    app = FastAPI()
    app.include_router(explorer.router, prefix="/api")
    app.state.runtime = SimpleNamespace(demo_identities=[], node=None, smart=None)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://portal") as client:
        assert (await client.get("/api/demo/identities")).status_code == 404
        r = await client.post("/api/demo/login", json={"identity": "dr-grey"})
        assert r.status_code == 404


def test_blocks_transactions_and_proofs(server: ServerThread) -> None:
    token = demo_token(server.url, "dr-grey")
    page = _get(server, "/api/ledger/blocks", token, limit=5).json()
    head = page["head"]
    assert [b["height"] for b in page["blocks"]] == list(range(head, max(-1, head - 5), -1))
    assert (
        _get(server, "/api/ledger/blocks", token, start=0, limit=2).json()["blocks"][-1]["height"]
        == 0
    )
    assert _get(server, "/api/ledger/blocks", token, limit=0).status_code == 422
    assert _get(server, f"/api/ledger/blocks/{head + 1000}", token).status_code == 404
    assert _get(server, "/api/ledger/tx/xyz", token).status_code == 422
    assert _get(server, "/api/ledger/tx/" + "00" * 32, token).status_code == 404

    block = _get(server, "/api/ledger/blocks/1", token).json()
    assert block["sig_verified"] is True and block["height"] == 1
    assert block["txs"][0]["type"] == "principal.register"
    assert block["txs"][0]["signer_principal"] == "admin-clinic"
    tx_id = block["txs"][0]["tx_id"]

    tx = _get(server, f"/api/ledger/tx/{tx_id}", token).json()
    raw = base64.b64decode(tx["canonical_bytes"])
    assert hashlib.sha256(raw).hexdigest() == tx_id
    assert tx["payload"] == Transaction.from_bytes(raw).to_json()["payload"]
    assert not tx["redacted"]

    proof = _get(server, f"/api/ledger/tx/{tx_id}/proof", token).json()
    cp = verify_checkpoint(proof["checkpoint"], _verifiers(proof["verifier_keys"]), quorum=3)
    assert proof["tree_size"] == cp.size and proof["leaf_hash"] == leaf_hash(raw).hex()
    verify_inclusion(
        proof["leaf_index"],
        proof["tree_size"],
        leaf_hash(raw),
        [bytes.fromhex(h) for h in proof["proof"]],
        cp.root,
    )

    size = checkpoint_of(_get(server, "/api/ledger/checkpoint").json()["note"]).size
    cons = _get(server, "/api/ledger/consistency", first=3, second=size).json()  # public
    verify_consistency(
        3,
        size,
        [bytes.fromhex(h) for h in cons["proof"]],
        bytes.fromhex(cons["root1"]),
        bytes.fromhex(cons["root2"]),
    )
    assert _get(server, "/api/ledger/consistency", first=5, second=3).status_code == 400
    assert _get(server, "/api/ledger/consistency", first=1, second=size + 10).status_code == 404


def test_patient_sees_only_transactions_about_them(server: ServerThread, net: Network) -> None:
    staff = demo_token(server.url, "dr-grey")
    patient = demo_token(server.url, net.patient)
    # the patient's own read is an access.log about them
    assert _get(server, f"/fhir/Patient/{net.patient}/$everything", patient).status_code == 200
    head = _get(server, "/api/ledger/blocks", staff, limit=1).json()["head"]
    mine = other = None
    for height in range(head, 0, -1):
        for t in _get(server, f"/api/ledger/blocks/{height}", staff).json()["txs"]:
            payload = _get(server, f"/api/ledger/tx/{t['tx_id']}", staff).json()["payload"]
            if t["type"] == "access.log" and payload["patient"] == net.patient and mine is None:
                mine = t["tx_id"]
            if t["type"] == "principal.register" and other is None:
                other = t["tx_id"]
        if mine and other:
            break
    if other is None:
        other = _get(server, "/api/ledger/blocks/1", staff).json()["txs"][0]["tx_id"]
    assert mine is not None
    seen = _get(server, f"/api/ledger/tx/{mine}", patient).json()
    assert not seen["redacted"] and seen["payload"]["patient"] == net.patient
    assert _get(server, f"/api/ledger/tx/{mine}/proof", patient).json()["canonical_bytes"]
    hidden = _get(server, f"/api/ledger/tx/{other}", patient).json()
    assert hidden["redacted"] and hidden["payload"] is None and hidden["canonical_bytes"] is None
    assert hidden["type"] == "principal.register"
    assert _get(server, f"/api/ledger/tx/{other}/proof", patient).json()["canonical_bytes"] is None


def test_verify_endpoint(server: ServerThread) -> None:
    token = demo_token(server.url, "system:hospital")
    r = _get(server, "/api/ledger/verify", token)
    assert r.status_code == 200
    doc = r.json()
    assert doc["ok"] is True and doc["blocks"] == doc["head_height"] + 1
    assert doc["checkpoints"] >= 1 and "failure" not in doc


def test_directory(server: ServerThread) -> None:
    doc = _get(server, "/api/ledger/directory", demo_token(server.url, "dr-grey")).json()
    assert {o["id"] for o in doc["orgs"]} == {"hospital", "clinic", "lab"}
    assert {p["id"] for p in doc["practitioners"]} == {"dr-grey", "dr-ross", "po-clinic", "dr-hale"}
    assert "TREAT" in doc["purposes"] and "physician" in doc["roles"]


def test_portal_pages_and_headers(server: ServerThread) -> None:
    r = _get(server, "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'data-idle-timeout="900"' in r.text and "__IDLE_TIMEOUT__" not in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    js = _get(server, "/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert js.headers["content-security-policy"] == csp
    assert _get(server, "/static/nope.js").status_code == 404
    assert _get(server, "/static/../__init__.py").status_code == 404


def test_static_files_fetch_nothing_from_elsewhere() -> None:
    """Offline: no CDN, no absolute URL loaded by the pages; modules import only siblings."""
    for path in STATIC_DIR.iterdir():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".js":
            for spec in re.findall(r"^import .* from \"([^\"]+)\";", text, re.M):
                assert spec.startswith("./"), (path.name, spec)
            assert "import(" not in text, path.name
            for call in re.findall(r"fetch\(([^,)]+)", text):
                assert "http" not in call, (path.name, call)
        if path.suffix in (".html", ".css"):
            assert not re.search(r"(src|href)=\"(https?:)?//", text), path.name
            assert "url(http" not in text and "@import" not in text, path.name


def test_mount_portal_refuses_a_tiny_idle_timeout() -> None:
    with pytest.raises(ValueError):
        mount_portal(FastAPI(), idle_timeout=5)


def _post(server: ServerThread, path: str, token: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        server.url + path, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60
    )


def test_access_requests(server: ServerThread, net: Network) -> None:
    grey = demo_token(server.url, "dr-grey")
    patient = demo_token(server.url, net.patient)
    ross = demo_token(server.url, "dr-ross")
    ask = {"patient": net.patient, "purpose": "TREAT", "note": "follow-up"}
    assert _post(server, "/api/access-requests", patient, ask).status_code == 403
    unknown = {**ask, "patient": "pat-" + "0" * 32}
    assert _post(server, "/api/access-requests", grey, unknown).status_code == 404
    assert _post(server, "/api/access-requests", grey, {**ask, "purpose": "FUN"}).status_code == 422
    bad_type = {**ask, "resource_types": ["not a type"]}
    assert _post(server, "/api/access-requests", grey, bad_type).status_code == 422
    first = _post(server, "/api/access-requests", grey, ask)
    assert first.status_code == 201
    req = first.json()
    assert (
        req["status"] == "pending" and req["practitioner"] == "dr-grey" and req["org"] == "clinic"
    )
    again = _post(server, "/api/access-requests", grey, {**ask, "note": "please"}).json()
    assert again["id"] == req["id"] and again["note"] == "please"  # one pending request each
    mine = _get(server, "/api/access-requests", patient).json()
    assert [r["id"] for r in mine] == [req["id"]]
    assert _get(server, "/api/access-requests", ross).json() == []
    path = f"/api/access-requests/{req['id']}"
    assert _post(server, path, ross, {"status": "declined"}).status_code == 403
    assert _post(server, path, patient, {"status": "maybe"}).status_code == 422
    answered = _post(server, path, patient, {"status": "declined"}).json()
    assert answered["status"] == "declined"
    assert _get(server, "/api/access-requests", grey).json()[0]["status"] == "declined"
    missing = "/api/access-requests/req-" + "0" * 16
    assert _post(server, missing, patient, {"status": "declined"}).status_code == 404


def test_break_glass_declaration(server: ServerThread, net: Network) -> None:
    body = {"patient": net.patient, "reason": "Unconscious in the emergency department."}
    grey = demo_token(server.url, "dr-grey")  # a physician, not an emergency clinician
    r = _post(server, "/api/break-glass", grey, body)
    assert r.status_code == 403 and "emergency-clinician" in r.json()["detail"]
    patient = demo_token(server.url, net.patient)
    assert _post(server, "/api/break-glass", patient, body).status_code == 403
    ross = demo_token(server.url, "dr-ross")
    assert _post(server, "/api/break-glass", ross, {**body, "reason": "short"}).status_code == 422
    unknown = {**body, "patient": "pat-" + "1" * 32}
    assert _post(server, "/api/break-glass", ross, unknown).status_code == 404
    r = _post(server, "/api/break-glass", ross, body)
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["actor"] == "dr-ross" and doc["org"] == "clinic" and doc["until"] > 0
    # the declaration is on the ledger, signed by the clinic's node for dr-ross
    tx = _get(server, f"/api/ledger/tx/{doc['id']}", ross).json()
    assert tx["type"] == "breakglass.declare" and tx["signer_principal"] == "node:clinic"
    assert tx["payload"]["actor"] == "dr-ross"
    # and it opens emergency reads
    r = _emergency_read(server, ross, net.patient)
    assert r.status_code == 200 and r.json()["entry"]


def _emergency_read(server: ServerThread, token: str, patient: str) -> httpx.Response:
    """``$everything`` of the patient under break-glass."""
    return httpx.get(
        f"{server.url}/fhir/Patient/{patient}/$everything",
        headers={
            "Authorization": f"Bearer {token}",
            "X-Purpose-Of-Use": "ETREAT",
            "X-Break-Glass": "true",
        },
        timeout=60,
    )


def test_a_privacy_officer_reviews_a_break_glass_declaration(
    server: ServerThread, net: Network
) -> None:
    ross = demo_token(server.url, "dr-ross")
    body = {"patient": net.patient, "reason": "Collapsed in the waiting room, no history."}
    declared = _post(server, "/api/break-glass", ross, body)
    assert declared.status_code == 201, declared.text
    bid = declared.json()["id"]
    assert _emergency_read(server, ross, net.patient).status_code == 200
    officer = demo_token(server.url, "po-clinic")
    # only the organisation's privacy officer sees and closes reviews (a patient sees the
    # declarations about them, without the reads: those are in their own access record)
    for who in ("dr-grey", "dr-ross", net.patient):
        token = demo_token(server.url, who)
        listed = _get(server, "/api/break-glass/reviews", token)
        if who == net.patient:
            mine = [i for i in listed.json() if i["id"] == bid]
            assert len(mine) == 1 and mine[0]["status"] == "open" and mine[0]["reads"] == []
            assert {i["patient"] for i in listed.json()} == {net.patient}
        else:
            assert listed.status_code == 403
        verdict = {"outcome": "justified"}
        assert _post(server, f"/api/break-glass/reviews/{bid}", token, verdict).status_code == 403
    listed = _get(server, "/api/break-glass/reviews", officer, status="open")
    assert listed.status_code == 200, listed.text
    item = next(i for i in listed.json() if i["id"] == bid)
    assert (item["actor"], item["org"], item["status"], item["reason"]) == (
        "dr-ross",
        "clinic",
        "open",
        body["reason"],
    )
    assert item["from"] <= item["until"] and not item["overdue"]
    # the emergency read is listed under the declaration, with its access-log entry
    assert item["reads"] and all(read["purpose"] == "ETREAT" for read in item["reads"])
    entry = _get(server, f"/api/ledger/tx/{item['reads'][0]['tx']}", officer).json()
    assert entry["type"] == "access.log" and entry["payload"]["break_glass"] is True
    # bad outcomes and unknown declarations are refused before anything is signed
    bad = _post(server, f"/api/break-glass/reviews/{bid}", officer, {"outcome": "fine"})
    assert bad.status_code == 422
    unknown = _post(
        server, "/api/break-glass/reviews/" + "0" * 64, officer, {"outcome": "justified"}
    )
    assert unknown.status_code == 404
    verdict = {"outcome": "unjustified", "note": "No emergency on record at that time."}
    closed = _post(server, f"/api/break-glass/reviews/{bid}", officer, verdict)
    assert closed.status_code == 200, closed.text
    assert (closed.json()["status"], closed.json()["reviewer"]) == ("closed", "po-clinic")
    # the review is on the ledger, signed by the officer's own key
    tx = _get(server, f"/api/ledger/tx/{closed.json()['tx']}", officer).json()
    assert tx["type"] == "breakglass.review" and tx["signer_principal"] == "po-clinic"
    assert tx["payload"] == {"id": bid, "outcome": "unjustified", "note": verdict["note"]}
    again = _post(server, f"/api/break-glass/reviews/{bid}", officer, verdict)
    assert again.status_code == 409
    item = next(
        i for i in _get(server, "/api/break-glass/reviews", officer).json() if i["id"] == bid
    )
    assert (item["status"], item["outcome"], item["reviewer"]) == (
        "closed",
        "unjustified",
        "po-clinic",
    )
    assert bid not in [
        i["id"] for i in _get(server, "/api/break-glass/reviews", officer, status="open").json()
    ]


def test_custodians_from_the_ledger(server: ServerThread, net: Network) -> None:
    staff = demo_token(server.url, "system:hospital")
    patient = demo_token(server.url, net.patient)
    bundle = _get(server, f"/fhir/Patient/{net.patient}/$everything", patient).json()
    ids = {e["resource"]["id"]: e["resource"]["resourceType"] for e in bundle["entry"]}
    body = {"ids": [*ids, "no-such-record"]}
    mine = _post(server, "/api/ledger/custodians", patient, body).json()
    assert set(mine) == set(ids)
    for rid, org in mine.items():
        want = "lab" if ids[rid] == "DiagnosticReport" else None
        assert org in ("hospital", "lab") and (want is None or org == want)
    assert mine[net.patient] == "hospital"
    assert _post(server, "/api/ledger/custodians", staff, body).json() == mine
    other = demo_token(server.url, "dr-grey")
    assert _post(server, "/api/ledger/custodians", other, {"ids": ["x" * 200]}).status_code == 422
