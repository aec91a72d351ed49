"""``medledger import`` of Synthea NDJSON and Bundles: idempotent, resumable, no PHI at rest.

The command runs as a real subprocess against a fresh embedded network; the
results are then checked through the record service and the raw files.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ledger_files
from medledger.api.runtime import Runtime
from medledger.api.settings import Settings
from medledger.datadir import DataDir
from medledger.ledger.tx import Transaction
from medledger.services.fhir import RECORD_TYPES, Auth, Importer
from medledger.services.records import Caller

from .conftest import BUNDLE_FILE, DATA, NDJSON_DIR, build_network

BIN = Path(sys.executable).with_name("medledger")


def medledger(*args: str | Path, check: bool = True, timeout: float = 300) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDLEDGER_")}
    proc = subprocess.run(
        [str(BIN), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    doc: dict[str, Any] = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    return doc


def expected_counts() -> tuple[int, Counter[str]]:
    """How many resources of served types the test data holds, and the skipped types."""
    served, skipped = 0, Counter[str]()
    resources: list[dict[str, Any]] = []
    for f in NDJSON_DIR.glob("*.ndjson"):
        resources += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    bundle = json.loads(BUNDLE_FILE.read_text())
    resources += [e["resource"] for e in bundle["entry"]]
    for r in resources:
        if r["resourceType"] in RECORD_TYPES:
            served += 1
        else:
            skipped[r["resourceType"]] += 1
    return served, skipped


def ledger_summary(data_dir: Path) -> tuple[int, Counter[str]]:
    """(log size, transaction types) of the ledger, read straight from its file."""
    db = sqlite3.connect(f"file:{data_dir / 'ledger.db'}?mode=ro", uri=True)
    try:
        raws = [r[0] for r in db.execute("SELECT raw FROM txs ORDER BY idx")]
    finally:
        db.close()
    return len(raws), Counter(Transaction.from_bytes(r).type for r in raws)


def registrations(data_dir: Path) -> Counter[str]:
    """record id -> registrations naming it (``record.register`` and batch entries)."""
    return ledger_files.registrations(data_dir / "ledger.db")


def store_versions(data_dir: Path) -> tuple[Counter[str], int]:
    """Versions per record, and staged leftovers, in records.db."""
    db = sqlite3.connect(f"file:{data_dir / 'records.db'}?mode=ro", uri=True)
    try:
        per = Counter(r[0] for r in db.execute("SELECT record FROM rec_versions"))
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        staged = 0
        for t in tables:
            if "stag" in t:
                staged += db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
    finally:
        db.close()
    return per, staged


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A fresh network with the test data imported once for the hospital."""
    path = tmp_path_factory.mktemp("import") / "node"
    build_network(path, practitioners=False)
    report = medledger("import", DATA, "--org", "hospital", "--data-dir", path, "--json")
    yield path, report


def test_import_creates_every_served_resource(imported: tuple[Path, dict[str, Any]]) -> None:
    path, report = imported
    served, skipped = expected_counts()
    assert report["failed"] == []
    assert report["created"] == served
    assert report["skipped"] == dict(skipped)
    _, types = ledger_summary(path)
    regs = registrations(path)
    assert len(regs) == served and set(regs.values()) == {1}
    # batched: far fewer ledger transactions than records
    assert types["record.register_batch"] >= 1
    assert types["record.register"] + types["record.register_batch"] < served / 4
    assert types["patient.register"] == 4  # 3 NDJSON patients + the Bundle's
    # the batched registrations pass the ledger's own check from genesis
    assert medledger("verify", "--json", "--data-dir", path)["ok"] is True
    per, staged = store_versions(path)
    assert len(per) == served and set(per.values()) == {1} and staged == 0


def test_reimport_changes_nothing(imported: tuple[Path, dict[str, Any]]) -> None:
    path, _ = imported
    before = ledger_summary(path)[0], store_versions(path)
    again = medledger("import", DATA, "--org", "hospital", "--data-dir", path, "--json")
    assert again["created"] == 0 and again["failed"] == []
    assert again["resumed"] == again["resumed"] > 0  # the checkpoint says every file is done
    for f in (path / "imports").iterdir():
        f.unlink()
    fresh = medledger(
        "import", DATA, "--org", "hospital", "--data-dir", path, "--json", "--workers", "0"
    )
    served, _ = expected_counts()
    assert fresh["created"] == 0 and fresh["existing"] == served  # deterministic ids
    assert (ledger_summary(path)[0], store_versions(path)) == before


async def test_imported_bundle_references_are_rewritten(
    imported: tuple[Path, dict[str, Any]],
) -> None:
    path, _ = imported
    runtime = await Runtime.open(Settings(data_dir=path), smart=False)
    try:
        importer = Importer(runtime.fhir, "hospital", state_dir=path / "imports")
        bundle = json.loads(BUNDLE_FILE.read_text())
        by_url = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
        patient_src = next(r for r in by_url.values() if r["resourceType"] == "Patient")
        pid = importer.ledger_id("Patient", patient_src["id"])
        auth = Auth(Caller("system", "test-client", "hospital"))
        report_src = next(r for r in by_url.values() if r["resourceType"] == "DiagnosticReport")
        rid = importer.ledger_id("DiagnosticReport", report_src["id"])
        report = (await runtime.fhir.read(auth, "DiagnosticReport", rid)).resource
        assert report["subject"]["reference"] == f"Patient/{pid}"
        for ref, src in zip(report["result"], report_src["result"], strict=True):
            target = by_url[src["reference"]]
            assert (
                ref["reference"] == f"Observation/{importer.ledger_id('Observation', target['id'])}"
            )
            obs = (
                await runtime.fhir.read(auth, "Observation", ref["reference"].split("/")[1])
            ).resource
            assert obs["code"] == target["code"]  # the content is the source's, unchanged
        # NDJSON: Encounter references from other files resolve to the imported Encounters
        cond_src = json.loads((NDJSON_DIR / "Condition.000.ndjson").read_text().splitlines()[0])
        cond = (
            await runtime.fhir.read(
                auth, "Condition", importer.ledger_id("Condition", cond_src["id"])
            )
        ).resource
        enc_id = cond["encounter"]["reference"].split("/")[1]
        enc = (await runtime.fhir.read(auth, "Encounter", enc_id)).resource
        assert enc["period"] is not None
        # the imported lab results answer a duplicate check
        loinc = next(
            r["code"]["coding"][0]["code"]
            for r in by_url.values()
            if r["resourceType"] == "Observation"
            and r["category"][0]["coding"][0]["code"] == "laboratory"
        )
        found = await runtime.fhir.duplicate_check(
            auth, [("patient", pid), ("code", f"http://loinc.org|{loinc}")]
        )
        assert any(e["search"]["mode"] == "match" for e in found["entry"])
    finally:
        await runtime.close()


def _needles() -> set[str]:
    """Names, identifiers, addresses, phone numbers, codes and code texts from the data."""
    out: set[str] = set()
    resources: list[dict[str, Any]] = []
    for f in NDJSON_DIR.glob("*.ndjson"):
        resources += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    resources += [e["resource"] for e in json.loads(BUNDLE_FILE.read_text())["entry"]]
    for r in resources:
        if r["resourceType"] not in RECORD_TYPES:
            continue
        if r["resourceType"] == "Patient":
            for name in r.get("name", []):
                out.update(name.get("given", []))
                out.add(name["family"])
            out.update(i["value"] for i in r.get("identifier", []))
            for a in r.get("address", []):
                out.update(a.get("line", []))
            out.update(t["value"] for t in r.get("telecom", []))
        for key in ("code", "vaccineCode", "medicationCodeableConcept"):
            for coding in (r.get(key) or {}).get("coding", []):
                out.add(coding["code"])
                if coding.get("display"):
                    out.add(coding["display"])
    return {n for n in out if len(n) >= 5}


def test_no_plaintext_phi_at_rest(imported: tuple[Path, dict[str, Any]]) -> None:
    path, _ = imported
    needles = _needles()
    assert len(needles) > 100  # names, MRNs, SSNs, addresses, LOINC/SNOMED/RxNorm codes...
    files = [p for p in path.rglob("*") if p.is_file()]
    assert {"ledger.db", "records.db"} <= {p.name for p in files}
    # a short code such as 786-4 also occurs by chance inside hex ids and UUIDs
    # ("...a786-4b2e..."); stored as a value it would stand alone, so only count
    # occurrences not flanked by hex digits or dashes
    patterns = [
        (n, re.compile(rb"(?<![0-9A-Fa-f-])" + re.escape(n.encode()) + rb"(?![0-9A-Fa-f-])"))
        for n in needles
    ]
    # the detector itself works: plaintext FHIR JSON (or CBOR) of the data would be caught
    plain = (NDJSON_DIR / "Condition.000.ndjson").read_bytes()
    assert sum(1 for _, pattern in patterns if pattern.search(plain)) > 10
    for f in files:
        data = f.read_bytes()
        leaked = sorted(n for n, pattern in patterns if pattern.search(data))
        assert not leaked, f"{f.name} holds plaintext {leaked[:5]}"


async def test_gzipped_ndjson_and_unreadable_lines(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "node"
    await asyncio.to_thread(build_network, path, practitioners=False)
    src = tmp_path / "export"
    src.mkdir()
    lines = (NDJSON_DIR / "Patient.000.ndjson").read_bytes()
    (src / "Patient.000.ndjson.gz").write_bytes(gzip.compress(lines))
    allergies = (NDJSON_DIR / "AllergyIntolerance.000.ndjson").read_text().splitlines()
    (src / "AllergyIntolerance.000.ndjson").write_text(
        "\n".join([allergies[0], "{not json", '{"no": "type"}', *allergies[1:]]) + "\n"
    )
    (src / "log.ndjson").write_text('{"bulk": "export log"}\n')  # a bulk export's log: ignored
    runtime = await Runtime.open(Settings(data_dir=path), smart=False)
    try:
        report = await Importer(runtime.fhir, "lab", state_dir=path / "imports").run(src)
    finally:
        await runtime.close()
    assert report.created == 3 + len(allergies)
    assert [f["where"] for f in report.failed] == [
        "AllergyIntolerance.000.ndjson:2",
        "AllergyIntolerance.000.ndjson:3",
    ]


def test_import_resumes_after_being_killed(tmp_path: Path) -> None:
    path = tmp_path / "node"
    build_network(path, practitioners=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDLEDGER_")}
    proc = subprocess.Popen(
        [
            str(BIN),
            "import",
            str(NDJSON_DIR),
            "--org",
            "clinic",
            "--data-dir",
            str(path),
            "--json",
            "--concurrency",
            "8",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    deadline = time.monotonic() + 120
    checkpoint_dir = path / "imports"
    while time.monotonic() < deadline:  # wait until some files are done, then kill -9
        done = (
            [
                f
                for f in checkpoint_dir.glob("*.json")
                if sum(s["done"] for s in json.loads(f.read_text())["sources"].values()) > 0
            ]
            if checkpoint_dir.exists()
            else []
        )
        if done or proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    partial, _ = store_versions(path)
    assert len(partial) < 200  # killed part-way through (266 resources in the data)
    report = medledger("import", NDJSON_DIR, "--org", "clinic", "--data-dir", path, "--json")
    assert report["failed"] == []
    served = sum(
        1
        for f in NDJSON_DIR.glob("*.ndjson")
        for line in f.read_text().splitlines()
        if json.loads(line)["resourceType"] in RECORD_TYPES
    )
    assert report["resumed"] + report["created"] + report["existing"] >= served - len(partial)
    per, staged = store_versions(path)
    assert len(per) == served and set(per.values()) == {1} and staged == 0
    regs = registrations(path)
    assert len(regs) == served and set(regs.values()) == {1}  # nothing registered twice
    assert DataDir(path).config()["org"] == "hospital"
