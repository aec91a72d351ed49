"""Benchmark of the FHIR layer (not a test: prints, asserts nothing).

Measures, in one run, on a fresh embedded network (hospital, clinic, lab; durable
SQLite ledger and record store in a temporary directory):

a. **Synthea import**, resources created per second, with the real importer
   (``medledger import``'s engine: validation and indexing in worker processes,
   deterministic ids, encryption, HPKE key wrapping, ``record.register_batch``
   commits, group-committed store writes). What is counted, start to finish:
   from the start of the import as the command does it (loading the validation
   models of the imported types, which load lazily, and forking the worker
   processes with them: :func:`~medledger.services.fhir.fork_import_workers`)
   to the last record promoted in the store, including reading and decoding
   the files. Not counted: the interpreter and module start-up and opening the
   node (figure a2 has them). The import runs first, before anything else of
   the bench has loaded a model, so the figure pays for the models as the
   command does. Also printed: the rate after the first quarter of the
   resources (the workers up, the pipeline full). Data: the Synthea NDJSON
   directory and transaction Bundles given with ``--data`` (default:
   ``../shared/testdata/synthea-10``, 7,000 resources, when it exists, else the
   project's test subset ``tests/api/data``).
a2. **The command**: ``medledger import`` of the same data into a second fresh
   node, in a new process: wall time from starting the process to its exit
   (interpreter start-up, imports, opening and closing the node, the import),
   as resources/s.
b. **The ceiling**: ``fhir.resources`` (R4B) validation alone of the same
   resources (:func:`medledger.fhir.validate.parse_resource`), resources/s, and
   the ratio of (a) to it.
c. **Authorised read latency**, p50 / p99 over ``--reads`` sequential reads of
   one Observation by a practitioner of another organisation whose patient
   consented: the consent decision, the ``access.log`` transaction committed in
   a durable block, the cross-organisation key wrap, the commitment check on the
   ledger and the decryption. Measured twice: in-process through
   ``FhirService.read``, and end to end over HTTP against uvicorn on a loopback
   port (with bearer-token introspection and JSON rendering).

Every figure is printed with the load average at that moment (the machine may be
shared). Run: ``.venv/bin/python bench/bench_fhir.py [--data DIR] [--reads N]
[--quick] [--workers N]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

if TYPE_CHECKING:
    from medledger.api.runtime import Runtime
    from medledger.services.fhir import ImportWorkers

# medledger, uvicorn and httpx are imported inside the functions: the orderer's
# signature-checking worker process (multiprocessing "spawn") re-imports this
# module, and it should not pay for the FHIR models and the web stack while the
# import is being measured.

ORGS = [("hospital", "City Hospital"), ("clinic", "Family Clinic"), ("lab", "Central Lab")]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load_resources(data: Path) -> list[dict[str, Any]]:
    from medledger.fhir.ndjson import iter_bundle_resources, iter_ndjson

    out: list[dict[str, Any]] = []
    for f in sorted(data.rglob("*.ndjson")):
        if f.name == "log.ndjson":
            continue
        out += [doc for _, doc in iter_ndjson(f)]
    for f in sorted(data.rglob("*.json")):
        out += [item.resource for item in iter_bundle_resources(f)]
    return out


# -- (b) the ceiling ------------------------------------------------------------------------


def validation_rate(resources: list[dict[str, Any]]) -> tuple[float, int]:
    from medledger.fhir.validate import parse_resource
    from medledger.services.fhir import RECORD_TYPES

    served = [r for r in resources if r["resourceType"] in RECORD_TYPES]
    start = time.perf_counter()
    for r in served:
        parse_resource(r, r["resourceType"])
    return len(served) / (time.perf_counter() - start), len(served)


# -- network ----------------------------------------------------------------------------------


async def build(path: Path) -> None:
    from medledger.datadir import DataDir
    from medledger.services.submitter import Submitter

    dd = DataDir(path)
    node = await dd.init_embedded(
        network="bench-fhir", orgs=ORGS, policy={"consent_default": "opt-in"}
    )
    try:
        await node.start()
        sub = Submitter(node)
        ident = dd.keystore.create("dr-bench")
        await sub.submit(
            dd.identity("admin-clinic").signing,
            "principal.register",
            {
                "id": "dr-bench",
                "kind": "practitioner",
                "roles": ["physician"],
                "pub": ident.signing.public.raw,
            },
        )
    finally:
        await node.close()


# -- (a) import ---------------------------------------------------------------------------------


def import_rate(path: Path, data: Path, workers: int | None) -> dict[str, Any]:
    """Import ``data`` for the hospital as ``medledger import`` does; the report + rates.

    Like the command, the worker processes are forked first, while this process
    runs a single thread (:func:`~medledger.services.fhir.fork_import_workers`,
    which first loads the validation models of the imported types; else the
    importer starts them from the forkserver during the run); the time the
    models and the fork take counts in the figures, opening the node does not.
    """
    import threading

    from medledger.services.fhir import fork_import_workers

    threads = threading.active_count()
    start = time.monotonic()
    pool = fork_import_workers(workers)
    fork_s = time.monotonic() - start
    try:
        doc = asyncio.run(_import_rate(path, data, workers, pool))
    finally:
        if pool is not None:
            pool.shutdown()
    doc["worker_start"] = (
        f"forked ahead in {fork_s * 1000:.0f} ms"
        if pool is not None
        else f"forkserver, during the run ({threads} threads were running)"
    )
    doc["seconds"] += fork_s
    doc["resources_per_second"] = doc["created"] / doc["seconds"] if doc["seconds"] else 0.0
    if doc["first_quarter_s"] is not None:
        doc["first_quarter_s"] += fork_s
    return doc


async def _import_rate(
    path: Path, data: Path, workers: int | None, pool: ImportWorkers | None
) -> dict[str, Any]:
    from medledger.api.runtime import Runtime
    from medledger.api.settings import Settings
    from medledger.services.fhir import Importer

    runtime = await Runtime.open(Settings(data_dir=path), smart=False, max_wait=0.005)
    marks: list[tuple[float, int]] = []
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        marks.append((time.monotonic(), done))

    try:
        importer = Importer(
            runtime.fhir,
            "hospital",
            state_dir=path / "imports",
            concurrency=1024,
            workers=workers,
            pool=pool,
            on_advance=advance,
        )
        started = time.monotonic()
        doc = (await importer.run(data)).to_json()
    finally:
        await runtime.close()
    doc["workers"] = importer.workers
    # the rate once the worker processes are up: from 25% of the resources to the end
    total = marks[-1][1] if marks else 0
    later = [m for m in marks if m[1] >= total // 4]
    if len(later) >= 2 and later[-1][0] > later[0][0]:
        doc["steady_rate"] = (later[-1][1] - later[0][1]) / (later[-1][0] - later[0][0])
    doc["first_quarter_s"] = later[0][0] - started if later else None
    return doc


def command_rate(path: Path, data: Path, workers: int | None) -> tuple[int, float]:
    """``medledger import data`` into the node at ``path`` in a new process:
    (resources created, wall seconds from starting the process to its exit)."""
    import subprocess

    cmd = [sys.executable, "-m", "medledger.cli", "import", str(data), "--org", "hospital"]
    cmd += ["--data-dir", str(path), "--json"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    start = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    wall = time.monotonic() - start
    return int(json.loads(done.stdout)["created"]), wall


# -- (c) reads ------------------------------------------------------------------------------------


def observation(patient: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": "2021-02-03T10:00:00Z",
        "valueQuantity": {"value": 5.9, "unit": "%"},
    }


async def setup_read(runtime: Runtime) -> tuple[str, str]:
    """A patient at the hospital, a lab result held by the lab, consent for the clinic."""
    from medledger.services.fhir import Auth
    from medledger.services.records import Caller

    fhir = runtime.fhir
    hospital = Auth(Caller("system", "bench-hospital", "hospital"))
    lab = Auth(Caller("system", "bench-lab", "lab"))
    patient = {"resourceType": "Patient", "name": [{"family": "Bench", "given": ["Mark"]}]}
    pid = (await fhir.create(hospital, "Patient", patient)).resource["id"]
    oid = (await fhir.create(lab, "Observation", observation(pid))).resource["id"]
    consent = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{pid}"},
        "policyRule": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}
            ]
        },
        "provision": {
            "type": "permit",
            "actor": [
                {
                    "role": {"coding": [{"code": "IRCP"}]},
                    "reference": {"reference": "Organization/clinic"},
                }
            ],
        },
    }
    await fhir.create(Auth(Caller("patient", pid, None)), "Consent", consent)
    return pid, oid


async def service_reads(path: Path, n: int) -> tuple[list[float], str, str]:
    from medledger.api.runtime import Runtime
    from medledger.api.settings import Settings
    from medledger.services.fhir import Auth
    from medledger.services.records import Caller

    runtime = await Runtime.open(Settings(data_dir=path), smart=False)
    try:
        pid, oid = await setup_read(runtime)
        who = Auth(Caller("practitioner", "dr-bench", "clinic"))
        for _ in range(20):  # warm up
            await runtime.fhir.read(who, "Observation", oid)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await runtime.fhir.read(who, "Observation", oid)
            times.append((time.perf_counter() - t) * 1000)
        return times, pid, oid
    finally:
        await runtime.close()


def http_reads(path: Path, oid: str, n: int) -> list[float]:
    import httpx
    import uvicorn

    from medledger.api.app import create_app
    from medledger.api.settings import Settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings.for_listen(path, port=port)
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", loop="asyncio")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        runtime: Runtime = app.state.runtime
        smart = runtime.require_smart()
        loop = app.state.loop
        from cryptography.hazmat.primitives.asymmetric import ec
        from jwt.algorithms import ECAlgorithm

        key = ec.generate_private_key(ec.SECP384R1())
        jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
        jwk.update({"kid": "bench", "alg": "ES384"})
        client = asyncio.run_coroutine_threadsafe(
            smart.register_client(
                org="clinic", practitioner="dr-bench", jwks={"keys": [jwk]}, scope="user/*.rs"
            ),
            loop,
        ).result()
        token = (
            asyncio.run_coroutine_threadsafe(smart.issue(client, "user/*.rs", ttl=3600), loop)
            .result()
            .token
        )
        headers = {"Authorization": f"Bearer {token}"}
        times = []
        with httpx.Client(base_url=settings.base_url) as http:
            for _ in range(20):
                http.get(f"/fhir/Observation/{oid}", headers=headers).raise_for_status()
            for _ in range(n):
                t = time.perf_counter()
                r = http.get(f"/fhir/Observation/{oid}", headers=headers)
                times.append((time.perf_counter() - t) * 1000)
                r.raise_for_status()
        return times
    finally:
        server.should_exit = True
        thread.join()


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = ROOT.parent / "shared" / "testdata" / "synthea-10"
    default = shared if shared.is_dir() else ROOT / "tests" / "api" / "data"
    parser.add_argument("--data", type=Path, default=default)
    parser.add_argument("--reads", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="200 reads")
    parser.add_argument(
        "--workers", type=int, default=None, help="import worker processes (default: one per CPU)"
    )
    args = parser.parse_args()
    reads = 200 if args.quick else args.reads
    tmp = Path(tempfile.mkdtemp(prefix="bench-fhir-"))
    try:
        print(f"[{load()}]")
        node = tmp / "node"
        asyncio.run(build(node))
        report = import_rate(node, args.data, args.workers)  # first: no model loaded yet
        rate = report["resources_per_second"]
        print(
            f"(a) import: {report['created']:,} resources in {report['seconds']:.2f} s = "
            f"{rate:,.0f} resources/s (skipped types {report['skipped']}, "
            f"failed {len(report['failed'])}; {report['workers']} worker process(es), "
            f"{report['worker_start']})  "
            f"[{load()}]"
        )
        steady = report.get("steady_rate")
        if steady:
            print(
                f"    after the first quarter ({report['first_quarter_s']:.2f} s): "
                f"{steady:,.0f} resources/s"
            )
        second = tmp / "node2"
        asyncio.run(build(second))
        created, wall = command_rate(second, args.data, args.workers)
        print(
            f"(a2) the command, medledger import in a new process: {created:,} resources in "
            f"{wall:.2f} s wall = {created / wall:,.0f} resources/s  [{load()}]"
        )
        resources = load_resources(args.data)
        ceiling, served = validation_rate(resources)
        print(
            f"(b) ceiling: fhir.resources R4B validation alone: {ceiling:,.0f} resources/s "
            f"({served:,} resources of served types in {args.data})  [{load()}]"
        )
        print(f"    ratio import / validation: {rate / ceiling:.3f}")
        times, _, oid = asyncio.run(service_reads(node, reads))
        print(
            f"(c) authorised cross-org read, in-process (decision + access.log commit + unwrap + "
            f"verify + decrypt), {reads} sequential: p50 {statistics.median(times):.2f} ms, "
            f"p99 {percentile(times, 0.99):.2f} ms  [{load()}]"
        )
        times = http_reads(node, oid, reads)
        print(
            f"    the same over HTTP (uvicorn, loopback, bearer token): "
            f"p50 {statistics.median(times):.2f} ms, p99 {percentile(times, 0.99):.2f} ms  "
            f"[{load()}]"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
