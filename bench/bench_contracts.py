"""Benchmark of the healthcare contracts (not a test: prints, asserts nothing).

Measures, in one run:

a. **Access decisions per second** (:func:`medledger.contracts.access.decide`) with
   10**6 consents in state spread over 100,000 patients (``--quick``: 10**5 over
   10,000). The state is built directly, not through transactions, in the
   workload's in-memory mirror (:class:`~medledger.workload.MirrorState`, a dict
   with a sorted key list): orgs, admins and staff come from a
   :class:`~medledger.workload.Workload`; then, per patient, one ``patient/<id>``
   row and its consents are written as pre-encoded canonical CBOR rows
   (``consent/<patient>/<id>`` and ``consent-id/<id>``) in one bulk ``apply``.
   Each consent takes one of 64 provision trees drawn by the workload generator
   and normalised by ``consent_v1.validate_consent`` (so rows have exactly the
   shape ``consent.grant`` writes); 10% are revoked, 25% have a validity period.
   Building 10**6 consents takes ~25 s and ~1 GB RSS on one core. Requests: a random
   non-privacy-officer staff member, a random patient, 1-3 clinical resource
   types, a mix of purposes, no record.
b. **Commit throughput** of a mixed workload (10% record registrations, 10%
   consent grants/revocations, 80% ``access.log`` with the outcome ``decide``
   gave) on an embedded node with a durable SQLite store (WAL,
   ``synchronous=FULL``) in a temporary directory. The transactions are
   generated and signed beforehand; the clock is the workload's (all inside the
   skew window). Timed: enqueue everything, wait for every receipt.
c. **The ceiling**: single-core Ed25519 verifications per second (``cryptography``)
   of a typical transaction's signing bytes, and the ratios of (a) and (b) to it
   (each committed transaction costs at least one verification).

Run: ``.venv/bin/python bench/bench_contracts.py [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from medledger.contracts import consent_v1
from medledger.contracts.access import CLINICAL_TYPES, AccessRequest, decide
from medledger.contracts.patients_v1 import k_patient
from medledger.encoding import encode
from medledger.ledger.tx import Transaction
from medledger.node import Node
from medledger.workload import DEFAULT_MIX, Workload

PURPOSES = ("TREAT",) * 6 + ("ETREAT", "HRESCH", "CAREMGT")


# -- (c) the ceiling -----------------------------------------------------------------------


def ed25519_verify_rate(seconds: float = 2.0) -> tuple[float, int]:
    """Single-core Ed25519 verifications/s on the signing bytes of a typical tx."""
    wl = Workload("bench-ceiling", orgs=1, patients_per_org=2)
    wl.setup_txs()
    tx = wl.mixed(1, mix={"access": 1.0})[0]
    message, sig = tx.signing_bytes(), tx.sig
    from medledger.crypto.signing import VerifyKey  # as the node verifies transactions

    key = VerifyKey(tx.pub)
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        for _ in range(1000):
            key.verify(sig, message)
        n += 1000
    return n / elapsed, len(message)


# -- (a) decisions per second ---------------------------------------------------------------


def build_consent_state(wl: Workload, patients: int, consents: int, rng: random.Random) -> int:
    """Write ``patients`` patients and ``consents`` consents straight into ``wl.state``."""
    templates = []
    for _ in range(64):
        doc = {"id": "t", "patient": "t", "policy": "opt-in", "provision": wl._provision()}
        templates.append(consent_v1.validate_consent(doc)["provision"])
    now = wl.time
    periods = ([None, None],) * 3 + ([now - 86_400_000, now + 365 * 86_400_000],)
    org = wl.org_ids[0]
    rows: dict[bytes, bytes | None] = {}
    per = consents // patients
    extra = consents - per * patients
    for p in range(patients):
        pid = f"pat-{p:032x}"
        rows[k_patient(pid)] = encode(
            {
                "id": pid,
                "links": [{"org": org, "commitment": bytes(32)}],
                "orgs": [org],
                "claim": None,
                "claimed": True,
                "since": 1,
            }
        )
        for c in range(per + (1 if p < extra else 0)):
            cid = f"cns-{p:07d}-{c:02d}"
            rows[consent_v1.k_consent(pid, cid)] = encode(
                {
                    "id": cid,
                    "patient": pid,
                    "period": rng.choice(periods),
                    "policy": "opt-in",
                    "provision": rng.choice(templates),
                    "status": "active" if rng.random() < 0.9 else "revoked",
                    "by": pid,
                    "height": 2,
                    "revoked_at": None,
                }
            )
            rows[consent_v1.k_consent_id(cid)] = encode({"patient": pid})
    wl.state.apply(rows)
    return len(rows)


def bench_decide(quick: bool) -> float:
    patients, consents, requests = (10_000, 100_000, 5_000) if quick else (100_000, 10**6, 50_000)
    rng = random.Random(1)
    wl = Workload("bench-decide", orgs=3, patients_per_org=1)
    wl.setup_txs()
    t0 = time.perf_counter()
    n_rows = build_consent_state(wl, patients, consents, rng)
    state = wl.state
    next(state.scan(b"consent/", limit=1))  # sort the key list now, not in the timed loop
    print(
        f"(a) state: {consents:,} consents over {patients:,} patients "
        f"({n_rows:,} rows, {len(state):,} in state) built in {time.perf_counter() - t0:.1f} s"
    )
    staff = [
        (p, org)
        for org in wl.org_ids
        for p, roles in wl.staff[org]
        if "privacy-officer" not in roles
    ]
    clinical = sorted(CLINICAL_TYPES)
    reqs = [
        AccessRequest(
            actor=(who := rng.choice(staff))[0],
            org=who[1],
            patient=f"pat-{rng.randrange(patients):032x}",
            resource_types=tuple(rng.sample(clinical, rng.randint(1, 3))),
            purpose=rng.choice(PURPOSES),
            time=wl.time,
        )
        for _ in range(requests)
    ]
    rules: Counter[str] = Counter()
    permits = 0
    t0 = time.perf_counter()
    for req in reqs:
        d = decide(state, req)
        permits += d.permit
        rules[d.rule] += 1
    rate = requests / (time.perf_counter() - t0)
    print(
        f"(a) decide: {rate:,.0f} decisions/s ({requests:,} random requests, "
        f"{permits / requests:.0%} permit; rules {dict(rules.most_common())})"
    )
    return rate


# -- (b) commit throughput ----------------------------------------------------------------------


async def bench_commit(quick: bool) -> float:
    n, chunk = (3_000, 1_000) if quick else (30_000, 2_000)
    wl = Workload("bench-commit", orgs=3, patients_per_org=100)
    setup = wl.setup_txs()
    t0 = time.perf_counter()
    batches: list[tuple[int, list[Transaction]]] = []
    for _ in range(0, n, chunk):
        wl.time += 60_000
        batches.append((wl.time, wl.mixed(chunk, mix=DEFAULT_MIX)))
    gen = time.perf_counter() - t0
    kinds = Counter(tx.type for _, b in batches for tx in b)
    print(f"(b) generated and signed {n:,} txs in {gen:.1f} s: {dict(kinds)}")
    with tempfile.TemporaryDirectory() as tmp:
        node = await Node.create(f"sqlite:///{Path(tmp) / 'bench.db'}", wl.genesis, wl.signers)
        now = wl.genesis["time"] + 1_000
        node.clock = lambda: now
        await node.start(max_batch=2000)
        try:
            await asyncio.gather(*(node.enqueue(tx) for tx in setup))
            per_chunk = []
            t0 = time.perf_counter()
            for block_time, txs in batches:
                now = block_time
                c0 = time.perf_counter()
                await asyncio.gather(*(node.enqueue(tx) for tx in txs))
                per_chunk.append(len(txs) / (time.perf_counter() - c0))
            elapsed = time.perf_counter() - t0
            height = node.head.height
        finally:
            await node.close()
    rate = n / elapsed
    print(
        f"(b) commit: {rate:,.0f} tx/s ({n:,} txs in {elapsed:.2f} s, head height {height}, "
        f"median chunk {statistics.median(per_chunk):,.0f} tx/s), durable SQLite"
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds, not minutes)")
    args = parser.parse_args()

    ceiling, msg_len = ed25519_verify_rate(1.0 if args.quick else 3.0)
    print(f"(c) ceiling: {ceiling:,.0f} Ed25519 verifications/s (one core, {msg_len}-byte message)")
    decisions = bench_decide(args.quick)
    commits = asyncio.run(bench_commit(args.quick))
    print(f"ratio decide / verify: {decisions / ceiling:.3f}")
    print(f"ratio commit / verify: {commits / ceiling:.3f}")


if __name__ == "__main__":
    main()
