"""``medledger serve`` with TLS, ``medledger client ...``, the data directory lock (subprocess).

This is the README walk-through run for real: keys and a client made with the
CLI, the server started with a self-signed certificate, a token obtained at
``/auth/token`` and a first authorised FHIR read over HTTPS.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from api.conftest import NDJSON_DIR, build_network, records_digest, synthea_patient
from medledger.crypto.signing import SigningKey, VerifyKey
from medledger.ledger.note import NoteSigner, NoteVerifier
from medledger.node import signer_name

BIN = Path(sys.executable).with_name("medledger")


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDLEDGER_")}
    env["COLUMNS"] = "200"
    proc = subprocess.run(
        [str(BIN), *map(str, args)], capture_output=True, text=True, timeout=120, env=env
    )
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.fixture
def node(tmp_path: Path) -> Path:
    path = tmp_path / "node"
    build_network(path)
    return path


@pytest.fixture
def tls_server(node: Path, tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen[str]]]:
    cert, key = self_signed(tmp_path)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDLEDGER_")}
    proc = subprocess.Popen(
        [
            str(BIN),
            "serve",
            "--data-dir",
            str(node),
            "--port",
            str(port),
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    base = f"https://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if (
                httpx.get(
                    f"{base}/fhir/metadata", verify=ssl.create_default_context(cafile=str(cert))
                ).status_code
                == 200
            ):
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("server did not start: " + proc.communicate()[1])
        time.sleep(0.1)
    try:
        yield base, cert, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_serve_with_tls_and_a_cli_registered_client(
    node: Path, tmp_path: Path, tls_server: tuple[str, Path, subprocess.Popen[str]]
) -> None:
    base, cert, proc = tls_server
    prefix = tmp_path / "ehr"
    run("client", "keygen", "--out", prefix)
    key_file, jwks_file = Path(f"{prefix}-key.pem"), Path(f"{prefix}-jwks.json")
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert "d" not in json.loads(jwks_file.read_text())["keys"][0]  # public part only
    client_id = run(
        "client",
        "register",
        "--org",
        "hospital",
        "--jwks",
        jwks_file,
        "--scope",
        "system/*.cruds",
        "--data-dir",
        node,
    ).stdout.strip()
    assert client_id.startswith("cli-")

    with httpx.Client(
        base_url=base, verify=ssl.create_default_context(cafile=str(cert)), timeout=60
    ) as http:
        meta = http.get("/fhir/metadata")
        assert meta.headers["strict-transport-security"].startswith("max-age=")
        token_url = meta.json()["rest"][0]["security"]["extension"][0]["extension"][0]["valueUri"]
        assert token_url == f"{base}/auth/token"
        assertion = run(
            "client", "assertion", "--client-id", client_id, "--key", key_file, "--aud", token_url
        ).stdout.strip()
        r = http.post(
            "/auth/token",
            data={
                "grant_type": "client_credentials",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": assertion,
                "scope": "system/*.cruds",
            },
        )
        assert r.status_code == 200, r.text
        headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
        created = http.post(
            "/fhir/Patient",
            content=json.dumps(synthea_patient()),
            headers={**headers, "Content-Type": "application/fhir+json"},
        )
        assert created.status_code == 201, created.text
        pid = created.json()["id"]
        got = http.get(f"/fhir/Patient/{pid}", headers=headers)
        assert got.status_code == 200 and got.json()["name"] == synthea_patient()["name"]
        # a second assertion with the same jti would be refused; a fresh one works
        again = run(
            "client", "assertion", "--client-id", client_id, "--key", key_file, "--aud", token_url
        ).stdout.strip()
        assert again != assertion

    # the access log checked from outside with the client (trusting the genesis node keys)
    genesis = json.loads((node / "genesis.json").read_text())
    trusted = [
        NoteVerifier(
            signer_name(genesis["network"], org["id"]), VerifyKey(bytes.fromhex(org["node_key"]))
        ).verifier_key()
        for org in genesis["orgs"]
    ]
    kept = tmp_path / "kept.note"
    audit = [
        "client", "audit", "--fhir", f"{base}/fhir", "--client-id", client_id, "--key", key_file,
        "--patient", pid, "--cacert", cert, "--keep", kept, "--scope", "system/*.cruds",
    ]  # fmt: skip
    for k in trusted:
        audit += ["--trust", k]
    first = json.loads(run(*audit, "--json").stdout)
    assert first["append_only_since"] is None and first["checkpoint"]["quorum"] == 2
    assert [r["outcome"] for r in first["verified"]] == ["permit"]  # the Patient read above
    assert first["verified"][0]["org"] == "hospital"
    assert kept.read_text().startswith("medledger/")
    second = json.loads(run(*audit, "--json").stdout)  # the first check was logged too
    assert second["append_only_since"] == first["checkpoint"]["size"]
    assert len(second["verified"]) > 1 and {r["outcome"] for r in second["verified"]} == {"permit"}
    assert second["checkpoint"]["size"] > first["checkpoint"]["size"]
    table = run(*audit).stdout
    assert "verified against a checkpoint" in table and "the log only grew" in table
    # a kept checkpoint that the trusted keys did not sign is refused, with one line
    origin, size, rest = kept.read_text().split("\n", 2)
    kept.write_text(f"{origin}\n{int(size) - 1}\n{rest}")  # a log the nodes never signed
    bad = run(*audit, check=False)
    assert bad.returncode != 0 and "does not verify" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    # keys the node's checkpoints are not signed with: nothing is trusted
    stranger = NoteSigner(f"{genesis['network']}/hospital", SigningKey.generate()).verifier_key()
    kept.unlink()
    untrusted = [a for a in audit if a not in trusted and a != "--trust"] + ["--trust", stranger]
    refused = run(*untrusted, check=False)
    assert refused.returncode == 1 and "checkpoint" in refused.stderr

    # plain HTTP to the TLS port is not served
    with pytest.raises(httpx.HTTPError):
        httpx.get(base.replace("https://", "http://") + "/fhir/metadata", timeout=5)
    # the data directory is in use: an import must not open a second writer
    imp = run("import", tmp_path, "--org", "hospital", "--data-dir", node, check=False)
    assert imp.returncode != 0 and "in use" in imp.stderr

    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0


def test_client_register_checks_its_arguments(node: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "c"
    run("client", "keygen", "--out", prefix)
    jwks = Path(f"{prefix}-jwks.json")
    common = ["--jwks", jwks, "--data-dir", node]
    ok = run(
        "client",
        "register",
        "--org",
        "clinic",
        "--practitioner",
        "dr-clinic",
        "--scope",
        "user/*.rs",
        "--json",
        *common,
    )
    doc = json.loads(ok.stdout)
    assert doc["practitioner"] == "dr-clinic" and doc["org"] == "clinic"
    for args, message in [
        (["--org", "clinic", "--practitioner", "dr-house"], "not a practitioner of clinic"),
        (["--org", "nowhere"], "does not serve"),
        (["--org", "lab", "--patient", "pat-" + "0" * 32], "not a patient"),
        (["--org", "lab", "--practitioner", "tech-lab", "--patient", "x"], "not both"),
    ]:
        bad = run("client", "register", *args, "--scope", "system/*.rs", *common, check=False)
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1  # one-line errors
    bad_scope = run(
        "client", "register", "--org", "lab", "--scope", "everything", *common, check=False
    )
    assert bad_scope.returncode != 0 and "scope" in bad_scope.stderr
    again = run("client", "keygen", "--out", prefix, check=False)
    assert again.returncode != 0 and "already exists" in again.stderr


def test_serve_refuses_half_a_tls_configuration(node: Path, tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path)
    r = run("serve", "--data-dir", node, "--tls-cert", cert, check=False)
    assert r.returncode == 2 and "--tls-key" in r.stderr
    r = run("serve", "--data-dir", tmp_path / "nothing-here", check=False)
    assert r.returncode != 0 and "not a medledger data directory" in r.stderr


def test_reindex_rewrites_only_what_changed(node: Path) -> None:
    patients = NDJSON_DIR / "Patient.000.ndjson"
    run("import", patients, "--org", "hospital", "--workers", "0", "--data-dir", node)
    doc = json.loads(run("reindex", "--data-dir", node, "--json").stdout)
    assert set(doc) == {"hospital", "clinic", "lab"}
    count = len(patients.read_text().splitlines())
    assert doc["hospital"] == {"checked": count, "rewritten": 0}  # indexed as now already
    assert doc["clinic"] == {"checked": 0, "rewritten": 0}
    text = run("reindex", "--org", "hospital", "--data-dir", node).stdout
    assert f"hospital: {count} records checked, 0 reindexed" in text
    bad = run("reindex", "--org", "nowhere", "--data-dir", node, check=False)
    assert bad.returncode == 2 and "does not serve nowhere" in bad.stderr
    # on a store an older version indexed (tokens missing, version 1), the command does the
    # reindexing itself and says so: it is not done first, unreported, when it opens
    with contextlib.closing(sqlite3.connect(node / "records.db")) as db, db:
        db.execute("DELETE FROM rec_tokens")
        db.execute("UPDATE rec_meta SET v = x'31' WHERE k = 'search-index-version/hospital'")
    doc = json.loads(run("reindex", "--org", "hospital", "--data-dir", node, "--json").stdout)
    assert doc == {"hospital": {"checked": count, "rewritten": count}}


def test_verify_records_checks_what_is_held_at_rest(node: Path, tmp_path: Path) -> None:
    src = tmp_path / "export"
    src.mkdir()
    for name in ("Patient.000.ndjson", "AllergyIntolerance.000.ndjson"):
        (src / name).write_bytes((NDJSON_DIR / name).read_bytes())
    run("import", src, "--org", "hospital", "--workers", "0", "--data-dir", node)

    async def erase(patient: str) -> None:
        from medledger.api.runtime import Runtime
        from medledger.api.settings import Settings
        from medledger.services.fhir import Auth
        from medledger.services.records import Caller

        runtime = await Runtime.open(Settings(data_dir=node), smart=False)
        try:
            await runtime.fhir.erase(Auth(Caller("system", "test", "hospital")), patient)
        finally:
            await runtime.close()

    with contextlib.closing(sqlite3.connect(node / "records.db")) as db:
        (erased,) = db.execute(
            "SELECT patient FROM rec_versions GROUP BY patient ORDER BY COUNT(*), patient"
        ).fetchone()
    asyncio.run(erase(erased))
    with contextlib.closing(sqlite3.connect(node / "records.db")) as db:
        held = db.execute(
            "SELECT record, patient FROM rec_versions WHERE custodian = 'hospital' ORDER BY record"
        ).fetchall()
    gone = [r for r, p in held if p == erased]
    kept = [r for r, p in held if p != erased]
    assert gone and len(kept) >= 4

    before = records_digest(node)
    doc = json.loads(run("verify", "--records", "--json", "--data-dir", node).stdout)
    assert doc["ok"] is True
    by_org = {c["org"]: c for c in doc["records"]}
    assert set(by_org) == {"hospital", "clinic", "lab"}
    hospital = by_org["hospital"]
    assert hospital["ok"] and hospital["problems"] == []
    assert hospital["records"] == len(held) and hospital["versions"] == len(kept)
    assert hospital["shredded"] == len(gone) and hospital["index"] == len(kept)
    assert by_org["clinic"]["records"] == 0 and by_org["clinic"]["ok"]
    text = run("verify", "--records", "--data-dir", node).stdout
    assert f"OK: records of hospital: {len(held)} records, {len(kept)} versions" in text
    assert records_digest(node) == before  # verify reads only
    both = run("verify", "--config", tmp_path / "node.toml", "--data-dir", node, check=False)
    assert both.returncode == 2 and "not both" in both.stderr

    # what an alteration at rest looks like: each one is named, and verify fails
    altered, missing, unindexed, extended = kept[:4]
    with contextlib.closing(sqlite3.connect(node / "records.db")) as db, db:
        (blob,) = db.execute(
            "SELECT ciphertext FROM rec_versions WHERE record = ?", (altered,)
        ).fetchone()
        flipped = bytearray(blob)
        flipped[len(flipped) // 2] ^= 0x01
        db.execute(
            "UPDATE rec_versions SET ciphertext = ? WHERE record = ?", (bytes(flipped), altered)
        )
        db.execute("DELETE FROM rec_versions WHERE record = ?", (missing,))
        db.execute("DELETE FROM rec_tokens WHERE record = ?", (unindexed,))
        db.execute("UPDATE rec_versions SET ciphertext = x'00ff' WHERE record = ?", (gone[0],))
        db.execute(  # a version 2 the ledger never saw
            "INSERT INTO rec_versions SELECT record, 2, patient, custodian, resource_type, "
            "salt, ciphertext, last_updated, deleted FROM rec_versions WHERE record = ?",
            (extended,),
        )
    bad = run("verify", "--records", "--json", "--data-dir", node, check=False)
    assert bad.returncode == 1
    problems = {c["org"]: c for c in json.loads(bad.stdout)["records"]}["hospital"]["problems"]
    assert sorted(problems) == sorted(
        [
            f"{altered} v1: does not match its commitment on the ledger (altered)",
            f"{missing} v1: committed on the ledger, missing from the store",
            f"{unindexed}: the search index row differs from the record "
            "(medledger reindex rewrites it)",
            f"{gone[0]} v1: shredded, but its data remains",
            f"{extended} v2: stored, but not on the ledger",
        ]
    )
    text = run("verify", "--records", "--data-dir", node, check=False)
    assert text.returncode == 1 and "records FAILED: records of hospital" in text.stderr
    assert f"{altered} v1: does not match its commitment" in text.stderr
    assert text.stdout.startswith("OK:")  # the ledger itself is intact
    # the altered ciphertext put back and a reindex (which refuses to index a record its
    # key does not open): two problems are left, the missing version and the shred
    with contextlib.closing(sqlite3.connect(node / "records.db")) as db, db:
        db.execute("UPDATE rec_versions SET ciphertext = ? WHERE record = ?", (blob, altered))
    run("reindex", "--org", "hospital", "--data-dir", node)
    checks = json.loads(
        run("verify", "--records", "--json", "--data-dir", node, check=False).stdout
    )["records"]
    problems = {c["org"]: c for c in checks}["hospital"]["problems"]
    assert sorted(problems) == sorted(
        [
            f"{missing} v1: committed on the ledger, missing from the store",
            f"{gone[0]} v1: shredded, but its data remains",
            f"{extended} v2: stored, but not on the ledger",
        ]
    )
