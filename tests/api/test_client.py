"""medledger.client against the live server: SMART Backend Services, FHIR, and the ledger's
proofs checked on the client (including answers tampered with on the way)."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest

from medledger.client import Client, ClientKey, RemoteError, Trust
from medledger.crypto.signing import SigningKey
from medledger.errors import CheckpointError, ProofError
from medledger.ledger.note import NoteSigner, sign_note
from medledger.node import checkpoint_origin

from .conftest import NETWORK, Api, LiveServer, lab_observation

Rewrite = Callable[[httpx.Request, bytes], bytes]


class Tamper(httpx.AsyncBaseTransport):
    """Passes requests to the real server; ``rewrite`` may change an answer's body."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.rewrite: Rewrite | None = None
        self.hosts: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.hosts.append(request.url.host)
        response = await self.inner.handle_async_request(request)
        body = await response.aread()
        if self.rewrite is not None and response.status_code == 200:
            body = self.rewrite(request, body)
        headers = [(k, v) for k, v in response.headers.items() if k.lower() != "content-length"]
        return httpx.Response(response.status_code, headers=headers, content=body)

    async def aclose(self) -> None:
        await self.inner.aclose()


def trust_of(live: LiveServer, **kw: Any) -> Trust:
    """The nodes' checkpoint keys, pinned as a client would (here read off the node)."""
    keys = live.runtime.node.verifier_keys()
    return Trust.from_verifier_keys(keys, origin=checkpoint_origin(NETWORK), **kw)


def register(live: LiveServer, org: str, scope: str, **kw: Any) -> tuple[str, ClientKey]:
    key = ClientKey.generate()
    registered = live.call(
        live.runtime.require_smart().register_client(
            org=org, jwks={"keys": [key.public_jwk()]}, scope=scope, **kw
        )
    )
    return registered.client_id, key


@pytest.fixture
async def lab(live: LiveServer) -> AsyncIterator[tuple[Client, Tamper]]:
    client_id, key = register(live, "lab", "system/*.cruds")
    tamper = Tamper()
    async with httpx.AsyncClient(transport=tamper, timeout=60) as http:
        client = Client(
            live.fhir,
            client_id=client_id,
            key=key,
            scope="system/*.cruds",
            trust=trust_of(live),
            http=http,
        )
        async with client:
            yield client, tamper


async def test_fhir_round_trip_with_decimals_versions_and_errors(
    api: Api, lab: tuple[Client, Tamper]
) -> None:
    client, tamper = lab
    pid = api.new_patient()
    body = lab_observation(pid)
    body["valueQuantity"]["value"] = Decimal("5.40")
    created = await client.create(body)
    assert created["valueQuantity"]["value"] == Decimal("5.40")  # digits kept both ways
    assert created["meta"]["versionId"] == "1"
    oid = created["id"]
    assert (await client.read("Observation", oid))["valueQuantity"]["value"] == Decimal("5.40")

    changed = {**created, "valueQuantity": {**created["valueQuantity"], "value": 6.1}}
    updated = await client.update(changed, version=1)
    assert updated["meta"]["versionId"] == "2"
    with pytest.raises(RemoteError) as stale:
        await client.update(changed, version=1)
    assert stale.value.status == 412 and stale.value.outcome is not None
    assert stale.value.outcome["issue"][0]["code"] == "conflict"
    assert (await client.vread("Observation", oid, 1))["valueQuantity"]["value"] == Decimal("5.40")
    assert [r["meta"]["versionId"] for r in await client.history("Observation", oid)] == ["2", "1"]

    # search follows the next links: five matches in pages of two
    for i in range(4):
        await client.create(lab_observation(pid, value=1.0 + i))
    found = await client.search_all("Observation", patient=pid, _count=2)
    assert len(found) == 5 and len({r["id"] for r in found}) == 5

    # a server's paging link naming another host does not take the token there
    def elsewhere(request: httpx.Request, body: bytes) -> bytes:
        doc = json.loads(body)
        for link in doc.get("link", []) if doc.get("resourceType") == "Bundle" else []:
            link["url"] = link["url"].replace(
                f"{request.url.host}:{request.url.port}", "evil.invalid"
            )
        return json.dumps(doc).encode()

    tamper.rewrite, tamper.hosts = elsewhere, []
    assert len(await client.search_all("Observation", patient=pid, _count=2)) == 5
    assert tamper.hosts and set(tamper.hosts) == {"127.0.0.1"}

    def loop(request: httpx.Request, body: bytes) -> bytes:  # next always names page two
        doc = json.loads(body)
        for link in doc.get("link", []) if doc.get("resourceType") == "Bundle" else []:
            if link["relation"] == "next":
                link["url"] = re.sub(r"_offset=\d+", "_offset=2", link["url"])
        return json.dumps(doc).encode()

    tamper.rewrite = loop
    with pytest.raises(RemoteError, match="repeats"):
        await client.search_all("Observation", patient=pid, _count=2)
    tamper.rewrite = None
    await client.delete("Observation", oid, version=2)
    with pytest.raises(RemoteError) as gone:
        await client.read("Observation", oid)
    assert gone.value.status == 410
    with pytest.raises(RemoteError) as missing:
        await client.read("Observation", "no-such-id")
    assert missing.value.status == 404 and "no-such-id" in str(missing.value)


async def test_conditional_create_through_the_client(api: Api, lab: tuple[Client, Tamper]) -> None:
    client, _ = lab
    pid = api.new_patient()
    criteria = f"patient={pid}&code=http://loinc.org|2339-0"
    body = lab_observation(pid, code="2339-0", display="Glucose")
    first = await client.create(body, if_none_exist=criteria)
    again = await client.create(body, if_none_exist=criteria)
    assert again["id"] == first["id"] and again["meta"]["versionId"] == "1"
    await client.create(body)  # a second one, unconditionally
    with pytest.raises(RemoteError) as several:
        await client.create(body, if_none_exist=criteria)
    assert several.value.status == 412
    assert several.value.outcome is not None
    assert several.value.outcome["issue"][0]["code"] == "multiple-matches"


async def test_erasure_through_the_client(api: Api, live: LiveServer) -> None:
    pid = api.new_patient("hospital")
    obs = api.observation(pid, "lab")
    client_id, key = register(live, "hospital", "system/*.cruds")
    async with Client(live.fhir, client_id=client_id, key=key, scope="system/*.cruds") as c:
        outcome = await c.erase(pid)
        assert outcome["resourceType"] == "OperationOutcome" and "erased" in str(outcome)
        with pytest.raises(RemoteError) as gone:
            await c.read("Patient", pid)
        assert gone.value.status == 410
    assert api.get(f"Observation/{obs['id']}", "system:lab").status_code == 410


async def test_tokens_are_reused_and_renewed_after_a_401(
    api: Api, lab: tuple[Client, Tamper]
) -> None:
    client, _ = lab
    pid = api.new_patient()
    first = await client.token()
    assert await client.token() == first  # cached
    client._token = "expired-or-revoked"  # the server no longer knows it
    page = await client.search_page("Observation", {"_count": 1, "patient": pid})
    assert page["resourceType"] == "Bundle"
    assert client._token not in (None, "expired-or-revoked", first)


async def test_an_unregistered_key_or_no_server_is_a_remote_error(live: LiveServer) -> None:
    client_id, _ = register(live, "lab", "system/*.rs")
    async with Client(live.fhir, client_id=client_id, key=ClientKey.generate()) as client:
        with pytest.raises(RemoteError) as refused:
            await client.token()
        assert refused.value.status in (400, 401)
    async with Client(
        "http://127.0.0.1:9/fhir", client_id="x", key=ClientKey.generate(), timeout=2
    ) as nowhere:
        with pytest.raises(RemoteError) as down:
            await nowhere.token()
        assert down.value.status == 0


async def test_access_proofs_and_append_only_are_checked_here(
    api: Api, live: LiveServer, lab: tuple[Client, Tamper]
) -> None:
    client, tamper = lab
    kept = await client.checkpoint()
    assert kept.size > 0
    # a practitioner of the hospital reads the lab's Observation of a consenting patient
    pid = api.new_patient("hospital")
    obs = api.observation(pid, "lab")
    api.consent(pid, to_org="hospital", types=["Observation"])
    r = api.get(f"Observation/{obs['id']}", "practitioner:dr-house")
    assert r.status_code == 200, r.text
    events = [
        e
        for e in await client.search_all("AuditEvent", patient=pid)
        if any(obs["id"] in str(o.get("what")) for o in e.get("entity", []))
    ]
    assert events, "no AuditEvent for the read"
    proof = await client.access_proof(events[0]["id"])
    entry = proof.entry  # from the signed transaction itself, not the server's rendering
    assert entry["actor"] == "dr-house" and entry["patient"] == pid
    assert obs["id"] in entry["records"] and entry["outcome"] == "permit"
    assert proof.leaf_index < proof.checkpoint.size
    newer = await client.prove_append_only(kept)
    assert newer.size > kept.size

    # a checkpoint that was never the log's (its root changed) is not extended by it
    with pytest.raises(ProofError):
        await client.prove_append_only(dataclasses.replace(kept, root=bytes(32)))

    # answers altered on the way are refused
    def params_rewrite(change: Callable[[dict[str, Any]], None]) -> Rewrite:
        def rewrite(request: httpx.Request, body: bytes) -> bytes:
            if not request.url.path.endswith("/$proof"):
                return body
            doc = json.loads(body)
            change(doc)
            return json.dumps(doc).encode()

        return rewrite

    def param(doc: dict[str, Any], name: str) -> dict[str, Any]:
        return next(p for p in doc["parameter"] if p["name"] == name)

    def flip_path(doc: dict[str, Any]) -> None:
        p = param(doc, "proof")
        p["valueString"] = ("0" if p["valueString"][0] != "0" else "1") + p["valueString"][1:]

    def other_index(doc: dict[str, Any]) -> None:
        param(doc, "leafIndex")["valueInteger"] += 1

    def flip_tx(doc: dict[str, Any]) -> None:
        p = param(doc, "canonicalTransaction")
        raw = bytearray(base64.b64decode(p["valueBase64Binary"]))
        raw[-5] ^= 1
        p["valueBase64Binary"] = base64.b64encode(bytes(raw)).decode()

    def unsigned_checkpoint(doc: dict[str, Any]) -> None:
        p = param(doc, "checkpoint")
        text = p["valueString"].split("\n\n")[0] + "\n"
        forger = NoteSigner(f"{NETWORK}/hospital", SigningKey.generate())
        p["valueString"] = sign_note(text, [forger])

    for change, error in (
        (flip_path, ProofError),
        (other_index, ProofError),
        (flip_tx, ProofError),  # its bytes no longer hash to the event's id
        (unsigned_checkpoint, CheckpointError),
    ):
        tamper.rewrite = params_rewrite(change)
        with pytest.raises(error):
            await client.access_proof(events[0]["id"])
    tamper.rewrite = None
    assert (await client.access_proof(events[0]["id"])).entry == entry

    # keys the client does not trust cannot vouch for a checkpoint
    strangers = Trust.from_verifier_keys(
        [NoteSigner(f"{NETWORK}/org-{i}", SigningKey.generate()).verifier_key() for i in range(3)]
    )
    client.trust = strangers
    with pytest.raises(CheckpointError):
        await client.checkpoint()
    client.trust = trust_of(live, quorum=3)  # every node signs in embedded mode
    assert (await client.checkpoint()).size >= newer.size


async def test_proof_at_a_given_checkpoint_and_cosigned_checkpoints(
    api: Api, lab: tuple[Client, Tamper]
) -> None:
    """The server side of the client's checks: ``$proof?height=`` and ``min_signatures``."""
    client, _ = lab
    pid = api.new_patient("hospital")
    obs = api.observation(pid, "lab")
    api.consent(pid, to_org="hospital", types=["Observation"])
    assert api.get(f"Observation/{obs['id']}", "practitioner:dr-house").status_code == 200
    event = next(
        e
        for e in await client.search_all("AuditEvent", patient=pid)
        if any(obs["id"] in str(o.get("what")) for o in e.get("entity", []))
    )
    at = await client.checkpoint()
    block = at.block_info()
    assert block is not None
    proved = await client.access_proof(event["id"], at)
    assert proved.checkpoint == at
    path = f"AuditEvent/{event['id']}/$proof"
    outcome = api.get(f"{path}?height=1", "system:lab")  # long before the entry
    assert outcome.status_code == 422 and outcome.json()["resourceType"] == "OperationOutcome"
    assert api.get(f"{path}?height=999999999", "system:lab").status_code == 404
    assert api.get(f"{path}?height=-1", "system:lab").status_code == 400
    assert api.get(f"{path}?height=x", "system:lab").status_code == 400
    with pytest.raises(ProofError):  # the server's checkpoint at that height is not `at`
        old = await client.checkpoint()
        await client.access_proof(event["id"], dataclasses.replace(old, size=1))
    # embedded: every checkpoint is signed by the three organisations' keys
    assert api.http.get("/api/ledger/checkpoint", params={"min_signatures": 3}).status_code == 200
    assert api.http.get("/api/ledger/checkpoint", params={"min_signatures": 4}).status_code == 404


async def test_cosigned_lookups_read_only_new_blocks() -> None:
    """``min_signatures`` remembers its last answer: later calls read only newer blocks."""
    from medledger.api.explorer import _cosigned

    signers = [NoteSigner(f"{NETWORK}/org-{i}", SigningKey.generate()) for i in range(3)]
    verifiers = [s.verifier() for s in signers]
    notes = {h: sign_note(f"medledger/{NETWORK}\n{h}\nroot{h}\n", signers[:1]) for h in range(50)}
    notes[40] = sign_note(f"medledger/{NETWORK}\n40\nroot40\n", signers[:2])  # co-signed
    reads: list[int] = []

    class Store:
        def head_height(self) -> int:
            return max(notes)

        def get_checkpoint(self, height: int) -> tuple[int, str] | None:
            reads.append(height)
            return (height, notes[height]) if height in notes else None

    class FakeNode:
        async def storage(self, fn: Callable[[Store], Any]) -> Any:
            return fn(Store())

    found: dict[int, tuple[int, str]] = {}
    node: Any = FakeNode()
    assert await _cosigned(node, verifiers, 2, found) == notes[40]
    assert reads == list(range(49, 39, -1))
    reads.clear()
    for h in range(50, 55):  # five new blocks, signed by one node only
        notes[h] = sign_note(f"medledger/{NETWORK}\n{h}\nroot{h}\n", signers[:1])
    assert await _cosigned(node, verifiers, 2, found) == notes[40]
    assert reads == list(range(54, 40, -1))  # down to the remembered one, not 1000 back
    reads.clear()
    assert await _cosigned(node, verifiers, 4, found) is None and reads == []  # > members


async def test_client_audit_refuses_an_entry_about_another_patient(
    api: Api, live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``medledger client audit``: a node that slips another patient's (genuine, proved)
    entry into the answer is caught."""
    from medledger.cli import _verified_audit

    mine, theirs = api.new_patient("hospital"), api.new_patient("hospital")
    for pid in (mine, theirs):
        assert api.get(f"Patient/{pid}", "system:hospital").status_code == 200
    client_id, key = register(live, "hospital", "system/*.rs")
    async with Client(
        live.fhir, client_id=client_id, key=key, scope="system/*.rs", trust=trust_of(live)
    ) as c:
        other = (await c.search_all("AuditEvent", patient=theirs))[0]["id"]
        honest = await _verified_audit(
            live.fhir, client_id, key, "system/*.rs", trust_of(live), True, mine, None
        )
    assert honest[0] and {r["outcome"] for r in honest[0]} == {"permit"}

    tamper = Tamper()

    def slip_in(request: httpx.Request, body: bytes) -> bytes:
        if request.url.path.endswith("/AuditEvent") and mine in str(request.url):
            doc = json.loads(body)
            doc.setdefault("entry", []).append(
                {"resource": {"resourceType": "AuditEvent", "id": other}, "search": {}}
            )
            return json.dumps(doc).encode()
        return body

    tamper.rewrite = slip_in
    real = httpx.AsyncClient
    monkeypatch.setattr(
        httpx, "AsyncClient", lambda **kw: real(transport=tamper, timeout=kw.get("timeout", 60))
    )
    with pytest.raises(ProofError, match="another patient"):
        await _verified_audit(
            live.fhir, client_id, key, "system/*.rs", trust_of(live), True, mine, None
        )
