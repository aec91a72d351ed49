"""Cross-organisation FHIR reads between real node processes (etcd ordering, SQLite).

Two organisations, each a ``medledger node start`` process with its FHIR API, and
a two-member etcd cluster, all on loopback (built with
:mod:`medledger.consortium.network`, as ``medledger network up --sqlite`` does).
org-1 holds a patient's Observation; a physician of org-2 reads it through
org-2's FHIR API with a real SMART token. org-2's node decides on its ledger
copy, logs the read once and fetches the ciphertext from org-1's node, which
checks that entry instead of logging its own; org-2 verifies the ciphertext
against its own ledger commitment before decrypting.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import pg
from api.conftest import SmartClient, lab_observation, new_key, synthea_patient
from medledger.api.settings import Settings
from medledger.api.smart import SmartAuthority
from medledger.client import AccessProof, Client, ClientKey, Trust
from medledger.consortium import network as net
from medledger.consortium.config import load_config
from medledger.crypto.keystore import Keystore
from medledger.crypto.signing import SigningKey
from medledger.encoding import decode, encode
from medledger.errors import ProofError
from medledger.fhir.index import INDEX_VERSION
from medledger.ledger.note import NoteSigner
from medledger.ledger.tx import make_tx
from medledger.node import checkpoint_origin, signer_name
from medledger.store import open_store
from medledger.store.records import WrappedKey, open_record_store

from .test_records import flip_ciphertext

pytestmark = pytest.mark.timeout(240)

NETWORK = "medledger-xread"
FHIR_JSON = "application/fhir+json"


@dataclass
class XNet:
    layout: dict[str, Any]
    clients: dict[str, SmartClient]  # "system:org-1", "practitioner:phys-b"
    dir: Path

    def node(self, org: str) -> dict[str, Any]:
        return next(n for n in self.layout["nodes"] if n["org"] == org)


async def _register_clients(
    layout: dict[str, Any], wanted: list[tuple[str, str, str | None]] | None = None
) -> dict[str, SmartClient]:
    """SMART clients in each node's client store, before the nodes start."""
    wanted = wanted or [("system:org-1", "org-1", None), ("practitioner:phys-b", "org-2", "phys-b")]
    out: dict[str, SmartClient] = {}
    for who, org, practitioner in wanted:
        node = next(n for n in layout["nodes"] if n["org"] == org)
        settings = Settings(data_dir=Path(node["data_dir"]), base_url=node["api"])
        smart = await SmartAuthority.open(settings.smart_store, token_url=settings.token_url)
        try:
            key, jwk = new_key()
            scope = "user/*.cruds" if practitioner else "system/*.cruds"
            client = await smart.register_client(
                org=org, practitioner=practitioner, jwks={"keys": [jwk]}, scope=scope
            )
        finally:
            await smart.close()
        out[who] = SmartClient(client.client_id, key, jwk["kid"], settings.token_url, scope)
    return out


@pytest.fixture(scope="module")
def xnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XNet]:
    d = tmp_path_factory.mktemp("xread") / "net"
    layout = net.create_network(
        d,
        orgs=2,
        sqlite=True,
        network=NETWORK,
        gossip_interval=0.5,
        policy={"consent_default": "opt-in"},
    )
    try:
        clients = asyncio.run(_register_clients(layout))
        net.start_network(d, timeout=120)
        yield XNet(layout, clients, d)
    finally:
        with contextlib.suppress(Exception):
            net.stop_network(d, purge=True)


# -- helpers ---------------------------------------------------------------------------------


def token(x: XNet, who: str) -> str:
    client = x.clients[who]
    api = client.token_url.removesuffix("/auth/token")
    r = httpx.post(f"{api}/auth/token", data=client.form(), timeout=30)
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def submit(x: XNet, org: str, key: SigningKey, type_: str, payload: dict[str, Any]) -> None:
    """A signed transaction through ``org``'s node (committed there when this returns)."""
    peer = x.node(org)["peer"]
    seq = httpx.get(f"{peer}/ledger/v1/seq/{key.key_id.hex()}", timeout=10).json()["seq"]
    tx = make_tx(key, NETWORK, type_, payload, seq=seq + 1, time=int(time.time() * 1000))
    r = httpx.post(f"{peer}/ledger/v1/txs", content=encode([tx.raw]), timeout=60)
    (res,) = decode(r.content)
    assert res["ok"], res


def key_of(x: XNet, org: str, name: str) -> SigningKey:
    return Keystore(Path(x.node(org)["data_dir"]) / "keys").load(name).signing


def converge(x: XNet, within: float = 30.0) -> None:
    """Wait until both nodes are at the same height."""
    deadline = time.monotonic() + within
    heights: list[int] = []
    while time.monotonic() < deadline:
        heights = [
            httpx.get(n["peer"] + "/health", timeout=5).json()["height"] for n in x.layout["nodes"]
        ]
        if len(set(heights)) == 1:
            return
        time.sleep(0.1)
    raise AssertionError(f"nodes did not converge: {heights}")


def audit(x: XNet, org: str, patient: str) -> list[dict[str, Any]]:
    """The access entries about ``patient`` in ``org``'s ledger copy, oldest first."""
    store = open_store(x.node(org)["store"])
    try:
        return [decode(raw) for _, raw in store.scan(f"audit/{patient}/".encode())]
    finally:
        store.close()


def fhir(x: XNet, org: str) -> str:
    return str(x.node(org)["api"]) + "/fhir"


async def verified_reads(x: XNet, patient: str) -> list[AccessProof]:
    """phys-b's access entries about ``patient``, each verified by a client of org-1 against
    a checkpoint signed by both member nodes (their keys pinned from their keystores)."""
    smart = x.clients["system:org-1"]
    keys = [
        NoteSigner(signer_name(NETWORK, org), key_of(x, org, f"node-{org}")).verifier_key()
        for org in ("org-1", "org-2")
    ]
    trust = Trust.from_verifier_keys(keys, origin=checkpoint_origin(NETWORK))
    assert trust.quorum == 2
    key = ClientKey(smart.key, smart.kid)
    async with Client(
        fhir(x, "org-1"), client_id=smart.client_id, key=key, scope=smart.scope, trust=trust
    ) as client:
        kept = await client.checkpoint()
        events = await client.search_all("AuditEvent", patient=patient)
        wanted = [e["id"] for e in events if "phys-b" in json.dumps(e)]
        deadline = time.monotonic() + 30
        while True:  # until a checkpoint both signed holds every one of them
            at = await client.checkpoint()
            try:
                proofs = [await client.access_proof(e, at) for e in wanted]
                break
            except ProofError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        assert (await client.prove_append_only(kept, at)).size >= kept.size
        return proofs


# -- the test -------------------------------------------------------------------------------


def test_a_practitioner_reads_a_record_held_by_another_nodes_organisation(xnet: XNet) -> None:
    x = xnet
    a, b = fhir(x, "org-1"), fhir(x, "org-2")
    sys_a = {"Authorization": f"Bearer {token(x, 'system:org-1')}", "Content-Type": FHIR_JSON}
    # org-1 registers the patient and an Observation; org-2 registers a physician
    r = httpx.post(f"{a}/Patient", json=copy.deepcopy(synthea_patient()), headers=sys_a)
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    r = httpx.post(f"{a}/Observation", json=lab_observation(pid), headers=sys_a, timeout=30)
    assert r.status_code == 201, r.text
    written = r.json()
    oid = written["id"]
    submit(
        x,
        "org-2",
        key_of(x, "org-2", "admin-org-2"),
        "principal.register",
        {
            "id": "phys-b",
            "kind": "practitioner",
            "roles": ["physician"],
            "pub": SigningKey.generate().public.raw,
        },
    )
    converge(x)
    phys = {"Authorization": f"Bearer {token(x, 'practitioner:phys-b')}"}

    # no consent (opt-in network): 403 OperationOutcome, one deny entry, logged by org-2
    r = httpx.get(f"{b}/Observation/{oid}", headers=phys, timeout=30)
    assert r.status_code == 403, r.text
    assert r.json()["resourceType"] == "OperationOutcome"
    entries = [e for e in audit(x, "org-2", pid) if e["actor"] == "phys-b"]
    assert [(e["org"], e["outcome"], e["records"]) for e in entries] == [("org-2", "deny", [oid])]

    # the patient consents (signed with the patient's key, kept by org-1's node)
    consent = {
        "id": "cons-" + secrets.token_hex(6),
        "patient": pid,
        "provision": {
            "type": "permit",
            "actors": [{"kind": "org", "id": "org-2"}],
            "purposes": ["TREAT"],
        },
    }
    submit(x, "org-1", key_of(x, "org-1", pid), "consent.grant", {"consent": consent})
    converge(x)

    # the read at org-2: org-1's plaintext, exactly one access entry on the shared ledger
    r = httpx.get(f"{b}/Observation/{oid}", headers=phys, timeout=30)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["meta"]["versionId"] == "1" and r.headers["etag"] == 'W/"1"'
    # lastUpdated is the commit block's time on both nodes, as the custodian answered
    assert got["meta"]["lastUpdated"] == written["meta"]["lastUpdated"]
    assert (
        r.headers["last-modified"]
        == (httpx.get(f"{a}/Observation/{oid}", headers=sys_a, timeout=30).headers["last-modified"])
    )
    for field in ("code", "valueQuantity", "subject", "effectiveDateTime", "status"):
        assert got[field] == written[field]
    converge(x)
    for org in ("org-1", "org-2"):  # both ledger copies hold the same, single entry
        entries = [e for e in audit(x, org, pid) if e["actor"] == "phys-b"]
        assert [(e["org"], e["outcome"]) for e in entries] == [
            ("org-2", "deny"),
            ("org-2", "permit"),
        ], org
        assert entries[1]["records"] == [oid] and entries[1]["on_behalf"]

    # $everything and a patient search at org-2 include org-1's records (one entry each)
    r = httpx.get(f"{b}/Patient/{pid}/$everything", headers=phys, timeout=30)
    assert r.status_code == 200, r.text
    ids = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in r.json()["entry"]}
    assert {("Observation", oid), ("Patient", pid)} <= ids
    r = httpx.get(f"{b}/Observation", params={"patient": pid}, headers=phys, timeout=30)
    assert r.status_code == 200, r.text
    assert [e["resource"]["id"] for e in r.json()["entry"]] == [oid]
    assert r.json()["total"] == 1
    # sorted by clinical date: this node's rows and the records held elsewhere, merged
    r = httpx.get(
        f"{b}/Observation", params={"patient": pid, "_sort": "-date"}, headers=phys, timeout=30
    )
    assert r.status_code == 200, r.text
    assert [e["resource"]["id"] for e in r.json()["entry"]] == [oid]
    # with the Patient the results are about, read from org-1 too (a second decision)
    r = httpx.get(
        f"{b}/Observation",
        params={"patient": pid, "_include": "Observation:patient"},
        headers=phys,
        timeout=30,
    )
    assert r.status_code == 200, r.text
    modes = [(e["search"]["mode"], e["resource"]["id"]) for e in r.json()["entry"]]
    assert modes == [("match", oid), ("include", pid)]
    # clinical filters search this node's index only (org-2 holds nothing of the patient)
    code = "http://loinc.org|4548-4"
    r = httpx.get(
        f"{b}/Observation", params={"patient": pid, "code": code}, headers=phys, timeout=30
    )
    assert r.status_code == 200 and r.json()["total"] == 0
    converge(x)
    entries = [e for e in audit(x, "org-1", pid) if e["actor"] == "phys-b"]
    assert [e["org"] for e in entries] == ["org-2"] * 8  # org-1 logged none of these

    # the patient's custodian checks org-2's reads with medledger.client, trusting no single
    # node: checkpoints co-signed by both members, each entry proved in the shared log
    proofs = asyncio.run(verified_reads(x, pid))
    assert sorted(p.transaction.tx_id.hex() for p in proofs) == sorted(
        e["tx"].hex() for e in entries
    )
    assert {(p.entry["org"], p.entry["actor"]) for p in proofs} == {("org-2", "phys-b")}
    assert all(p.checkpoint.size > p.leaf_index for p in proofs)

    # org-1's stored ciphertext altered: org-2 refuses it (commitment on its own ledger)
    data = Path(x.node("org-1")["data_dir"])
    flip_ciphertext(data / "records.db", oid)
    r = httpx.get(f"{b}/Observation/{oid}", headers=phys, timeout=30)
    assert r.status_code == 500, r.text
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "does not match its commitment" in outcome["issue"][0]["diagnostics"]


def test_a_client_is_registered_with_a_running_nodes_config(xnet: XNet, tmp_path: Path) -> None:
    """``medledger client register --config node.toml``: onboarding a client of a consortium
    node (no embedded data directory), while the node runs; it gets a token at once."""
    medledger = Path(sys.executable).with_name("medledger")

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(medledger), *map(str, args)], capture_output=True, text=True, timeout=120
        )

    assert run("client", "keygen", "--out", tmp_path / "ehr").returncode == 0
    config = xnet.node("org-2")["config"]
    common = ["--jwks", tmp_path / "ehr-jwks.json", "--scope", "system/*.rs", "--config", config]
    done = run("client", "register", "--org", "org-2", *common)
    assert done.returncode == 0, done.stderr
    client_id = done.stdout.strip()
    token_url = str(xnet.node("org-2")["api"]) + "/auth/token"
    assertion = run(
        "client", "assertion", "--client-id", client_id, "--key", tmp_path / "ehr-key.pem",
        "--aud", token_url,
    ).stdout.strip()  # fmt: skip
    r = httpx.post(
        token_url,
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
            "scope": "system/*.rs",
        },
        timeout=30,
    )
    assert r.status_code == 200, r.text
    meta = httpx.get(fhir(xnet, "org-2") + "/metadata", timeout=30)
    assert meta.status_code == 200
    # the node serves one organisation; a practitioner it does not know is refused
    other = run("client", "register", "--org", "org-1", *common)
    assert other.returncode == 2 and "serves organisation 'org-2'" in other.stderr
    nobody = run("client", "register", "--org", "org-2", "--practitioner", "nobody", *common)
    assert nobody.returncode == 2 and "not a practitioner of org-2" in nobody.stderr


def _sql(url: str, statements: list[tuple[str, tuple[Any, ...]]]) -> list[list[Any]]:
    """Run ``statements`` (``?`` placeholders) in one transaction on a SQLite or PostgreSQL
    record store, behind the node's back; the rows each returns."""
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn, conn:
            return [conn.execute(q, args).fetchall() for q, args in statements]
    import psycopg

    with psycopg.connect(url) as conn, conn.cursor() as cur:
        out = []
        for q, args in statements:
            cur.execute(q.replace("?", "%s"), args)
            out.append(cur.fetchall() if cur.description else [])
        return out


async def _unpromote(url: str, record: str) -> None:
    """Put ``record``'s promoted version back into staging, as if the node process had died
    between the version's commit and its promotion (the rows a write leaves then)."""
    store = await open_record_store(url)
    try:
        v = await store.get_version(record)
        assert v is not None
        (entry,), _ = await store.search(resource_type=None, ids=[record])
        select = ("SELECT recipient, wrapped FROM rec_keys WHERE record = ?", (record,))
        deletes = [
            (f"DELETE FROM {table} WHERE record = ?", (record,))
            for table in ("rec_versions", "rec_keys", "rec_index", "rec_tokens")
        ]
        rows = _sql(url, [select, *deletes])[0]
        keys = [WrappedKey(record, v.version, str(r), bytes(w)) for r, w in rows]
        assert keys and entry.tokens
        await store.stage(v, keys, entry, staged_at=int(time.time() * 1000))
        assert await store.get_version(record) is None
    finally:
        await store.close()


async def _settled(url: str, org: str) -> tuple[int, bytes | None]:
    """(staged versions, recorded search index version) of a record store."""
    store = await open_record_store(url)
    try:
        return len(await store.staged()), await store.get_meta(f"search-index-version/{org}")
    finally:
        await store.close()


def _restart_after_a_kill_between_commit_and_promotion(
    directory: Path, layout: dict[str, Any], client: SmartClient
) -> tuple[str, str, dict[str, Any]]:
    """Write a Patient and an Observation at org-1, kill org-1's node with the Observation
    committed but only staged, restart it, and check it settled its record store before
    serving FHIR: the version is searchable again (not only readable, which repairs one
    record on demand), staging is empty, the index version is recorded. Returns the ids
    written and ``medledger verify --records --config`` of the node, run while it serves."""
    node = next(n for n in layout["nodes"] if n["org"] == "org-1")
    records_url = load_config(node["config"]).records
    api = str(node["api"]) + "/fhir"

    def headers() -> dict[str, str]:
        r = httpx.post(client.token_url, data=client.form(), timeout=30)
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['access_token']}", "Content-Type": FHIR_JSON}

    sys_a = headers()
    r = httpx.post(f"{api}/Patient", json=copy.deepcopy(synthea_patient()), headers=sys_a)
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    r = httpx.post(f"{api}/Observation", json=lab_observation(pid), headers=sys_a, timeout=30)
    assert r.status_code == 201, r.text
    oid = r.json()["id"]

    pid_1 = int(json.loads((directory / net.PIDS).read_text())["nodes"]["org-1"])
    os.kill(pid_1, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while net._alive(pid_1) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not net._alive(pid_1)
    asyncio.run(_unpromote(records_url, oid))

    net.start_network(directory, timeout=120)
    r = httpx.get(f"{api}/Observation", params={"patient": pid}, headers=headers(), timeout=30)
    assert r.status_code == 200, r.text
    found = [e["resource"] for e in r.json().get("entry", [])]
    assert [(o["id"], o["meta"]["versionId"]) for o in found] == [(oid, "1")]
    assert asyncio.run(_settled(records_url, "org-1")) == (0, str(INDEX_VERSION).encode())
    assert "record store: 1 staged versions promoted" in Path(node["log"]).read_text()
    medledger = Path(sys.executable).with_name("medledger")
    done = subprocess.run(
        [str(medledger), "verify", "--records", "--json", "--config", node["config"]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    (check,) = json.loads(done.stdout)["records"]
    assert check["org"] == "org-1" and check["versions"] >= 2
    assert done.returncode == (1 if check["problems"] else 0), done.stderr
    return pid, oid, check


def test_a_restarted_node_promotes_what_its_killed_process_left_staged(xnet: XNet) -> None:
    pid, oid, check = _restart_after_a_kill_between_commit_and_promotion(
        xnet.dir, xnet.layout, xnet.clients["system:org-1"]
    )
    # (another test of this module alters a ciphertext of org-1 on purpose: only that one
    # may be reported)
    assert all(p.endswith("(altered)") for p in check["problems"]), check["problems"]
    assert not any(oid in p or pid in p for p in check["problems"])


def test_a_restarted_postgresql_node_settles_its_record_store(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The same with the node's ledger and record store in PostgreSQL (one organisation)."""
    d = tmp_path_factory.mktemp("pgrestart") / "net"
    layout = net.create_network(
        d, orgs=1, network=NETWORK, gossip_interval=0.5, pg_admin=pg.ADMIN_URL
    )
    try:
        clients = asyncio.run(_register_clients(layout, [("system:org-1", "org-1", None)]))
        net.start_network(d, timeout=120)
        _, _, check = _restart_after_a_kill_between_commit_and_promotion(
            d, layout, clients["system:org-1"]
        )
        assert check["ok"] and check["problems"] == [] and check["index"] >= 2
    finally:
        with contextlib.suppress(Exception):
            net.stop_network(d, purge=True)
