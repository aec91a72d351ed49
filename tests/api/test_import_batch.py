"""The batched ``medledger import``: crash safety at every step of a batch, independence of
the entries of a batch, and the worker processes.

A crashing import is a real process killed with SIGKILL, either at a chosen point of
a chosen batch (a small driver script patches the import to kill itself right after
staging, right after the ledger committed, or right after the promotion) or at a
random moment of a real ``medledger import``. The re-run is always the real CLI;
afterwards every served resource must be on the ledger exactly once and stored
exactly once, with nothing left staged.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

import ledger_files
from medledger.api.runtime import Runtime
from medledger.api.settings import Settings
from medledger.services.fhir import RECORD_TYPES, Importer

from .conftest import BUNDLE_FILE, NDJSON_DIR, build_network
from .test_import import medledger

#: kills the import at a chosen point of its N-th batch of records (argv: DIR SRC POINT N)
DRIVER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from pathlib import Path

    from medledger.api.runtime import Runtime
    from medledger.api.settings import Settings
    from medledger.services.fhir import Importer
    from medledger.services.submitter import Submitter
    from medledger.store.records import SqliteRecordStore

    data_dir, source = Path(sys.argv[1]), Path(sys.argv[2])
    point, nth = sys.argv[3], int(sys.argv[4])
    batches = promotions = 0

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    submit_many = Submitter.submit_many

    async def patched_submit(self, key, items):
        global batches
        mine = 0
        if items and items[0][0].startswith("record.register"):
            batches += 1
            mine = batches
        if mine == nth and point == "staged":
            die()  # staged in the store, nothing submitted
        out = await submit_many(self, key, items)
        if mine == nth and point == "committed":
            die()  # committed on the ledger, not promoted in the store
        return out

    put_versions = SqliteRecordStore.put_versions

    async def patched_put(self, items):
        global promotions
        out = await put_versions(self, items)
        promotions += 1
        if promotions == nth and point == "promoted":
            die()  # stored, but the checkpoint does not know yet
        return out

    Submitter.submit_many = patched_submit
    SqliteRecordStore.put_versions = patched_put

    async def main():
        runtime = await Runtime.open(Settings(data_dir=data_dir), smart=False, max_wait=0.005)
        try:
            importer = Importer(
                runtime.fhir, "clinic", state_dir=data_dir / "imports", concurrency=40
            )
            await importer.run(source)
        finally:
            await runtime.close()

    if __name__ == "__main__":
        asyncio.run(main())
        sys.exit(3)  # never reached: the import must have been killed
    """
)


def served_ids(path: Path) -> int:
    return sum(
        1
        for f in path.glob("*.ndjson")
        for line in f.read_text().splitlines()
        if line.strip() and json.loads(line)["resourceType"] in RECORD_TYPES
    )


def ledger_records(data_dir: Path) -> Counter[str]:
    """record id -> registrations naming it, read from the ledger file."""
    return ledger_files.registrations(data_dir / "ledger.db")


def store_rows(data_dir: Path) -> tuple[Counter[str], int]:
    """(versions per record, staged rows) in records.db."""
    db = sqlite3.connect(f"file:{data_dir / 'records.db'}?mode=ro", uri=True)
    try:
        per = Counter(r[0] for r in db.execute("SELECT record FROM rec_versions"))
        staged = int(db.execute("SELECT count(*) FROM rec_staging").fetchone()[0])
    finally:
        db.close()
    return per, staged


def assert_exactly_once(data_dir: Path, served: int) -> None:
    on_ledger = ledger_records(data_dir)
    per, staged = store_rows(data_dir)
    assert len(on_ledger) == served and set(on_ledger.values()) == {1}
    assert set(per) == set(on_ledger) and set(per.values()) == {1}
    assert staged == 0


@pytest.mark.parametrize("point", ["staged", "committed", "promoted"])
def test_killed_inside_a_batch_then_rerun_imports_each_resource_once(
    tmp_path: Path, point: str
) -> None:
    path = tmp_path / "node"
    build_network(path, practitioners=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDLEDGER_")}
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.run(
        [sys.executable, str(driver), str(path), str(NDJSON_DIR), point, "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    on_ledger = ledger_records(path)
    per, staged = store_rows(path)
    served = served_ids(NDJSON_DIR)
    assert 0 < len(per) < served  # killed part-way
    # (other batches were in flight too: they may be staged or committed as well)
    assert set(per) <= set(on_ledger)  # nothing stored that the ledger does not know
    if point == "staged":
        assert staged > 0  # the killed batch, never submitted
    elif point == "committed":
        assert staged > 0 and set(per) < set(on_ledger)  # committed, not yet promoted
    assert set(on_ledger.values()) == {1}
    report = medledger("import", NDJSON_DIR, "--org", "clinic", "--data-dir", path, "--json")
    assert report["failed"] == []
    assert_exactly_once(path, served)
    # and once more from scratch (no checkpoint): everything is found, nothing is written
    for f in (path / "imports").iterdir():
        f.unlink()
    again = medledger("import", NDJSON_DIR, "--org", "clinic", "--data-dir", path, "--json")
    assert again["created"] == 0 and again["existing"] == served and again["failed"] == []
    assert_exactly_once(path, served)


def test_killed_at_a_random_moment_of_a_large_import(tmp_path: Path) -> None:
    """SIGKILL of the real CLI while batches are in flight, then a re-run."""
    path = tmp_path / "node"
    build_network(path, practitioners=False)
    src = tmp_path / "export"
    src.mkdir()
    for f in NDJSON_DIR.glob("*.ndjson"):
        (src / f.name).write_bytes(f.read_bytes())
    (src / "bundle.json").write_bytes(BUNDLE_FILE.read_bytes())
    bundle = json.loads(BUNDLE_FILE.read_text())
    served = served_ids(src) + sum(
        1 for e in bundle["entry"] if e["resource"]["resourceType"] in RECORD_TYPES
    )
    assert served > 300
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDLEDGER_")}
    bin_ = Path(sys.executable).with_name("medledger")
    proc = subprocess.Popen(
        [
            str(bin_),
            "import",
            str(src),
            "--org",
            "hospital",
            "--data-dir",
            str(path),
            "--json",
            "--concurrency",
            "128",  # 4 batches of 32 resources in flight
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(ledger_records(path)) >= 100:
                break
        except sqlite3.Error:
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert len(ledger_records(path)) < served  # killed part-way
    report = medledger("import", src, "--org", "hospital", "--data-dir", path, "--json")
    assert report["failed"] == []
    assert_exactly_once(path, served)


async def test_a_failing_entry_fails_alone_and_duplicates_are_written_once(
    tmp_path: Path,
) -> None:
    """In one batch: an invalid resource, one whose patient is unknown, a duplicate line."""
    path = tmp_path / "node"
    await asyncio.to_thread(build_network, path, practitioners=False)
    src = tmp_path / "export"
    src.mkdir()
    (src / "Patient.000.ndjson").write_bytes((NDJSON_DIR / "Patient.000.ndjson").read_bytes())
    lines = (NDJSON_DIR / "Condition.000.ndjson").read_text().splitlines()
    invalid = json.loads(lines[3])
    del invalid["subject"]  # a Condition must reference its patient: 422
    orphan = json.loads(lines[4])
    orphan["id"] = "orphan-condition"
    orphan["subject"] = {"reference": "Patient/not-in-this-export"}  # unknown patient: 422
    body = [*lines[:3], json.dumps(invalid), json.dumps(orphan), *lines[5:], lines[0]]
    (src / "Condition.000.ndjson").write_text("\n".join(body) + "\n")
    runtime = await Runtime.open(Settings(data_dir=path), smart=False)
    try:
        for workers in (1, 0):  # the worker processes and this process agree
            importer = Importer(runtime.fhir, "lab", state_dir=path / "imports", workers=workers)
            report = await importer.run(src)
            if workers == 1:
                assert report.created == 3 + len(lines) - 2  # patients + the valid conditions
                assert report.existing == 1  # the duplicate line: written once
                for f in (path / "imports").iterdir():
                    f.unlink()
            else:
                assert report.created == 0 and report.existing == 3 + len(lines) - 1
            failed = {f["where"]: f for f in report.failed}
            assert set(failed) == {"Condition.000.ndjson:4", "Condition.000.ndjson:5"}
            assert {f["status"] for f in failed.values()} == {422}
            assert "not known to the ledger" in failed["Condition.000.ndjson:5"]["error"]
    finally:
        await runtime.close()
    on_ledger = ledger_records(path)
    assert set(on_ledger.values()) == {1} and len(on_ledger) == 3 + len(lines) - 2
    per, staged = store_rows(path)
    assert set(per) == set(on_ledger) and staged == 0


FORK_CHECK = textwrap.dedent(
    """
    import os, threading
    from medledger.services.fhir import _warm_worker, fork_import_workers

    assert fork_import_workers(0) is None  # no workers wanted
    workers = fork_import_workers(2)  # this process runs one thread: forked now
    assert workers is not None and workers.count == 2
    pids = {workers.pool.submit(_warm_worker).result() for _ in range(8)}
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids
    workers.shutdown()
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert fork_import_workers(2) is None  # never fork beside another thread
    finally:
        stop.set()
        other.join()
    print("ok")
    """
)


def test_workers_are_forked_only_from_a_single_threaded_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", FORK_CHECK], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
